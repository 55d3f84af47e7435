/**
 * LZ4 block format: the codec of cloop version 4 blocks with compressor 3
 * (the kernel's `LZ4_decompress_safe`), decoded and encoded. A block is raw
 * LZ4, with no frame, no sizes and no checksum: the cloop offsets say where
 * it ends and the block size what it decodes to.
 *
 * A block is a run of sequences:
 *
 * | size    | field                                                            |
 * | ------- | ---------------------------------------------------------------- |
 * | 1       | token: literal length (high 4 bits), match length - 4 (low 4 bits) |
 * | 0..n    | when the literal length is 15: more bytes, each added, until one is not 255 |
 * | l       | the literals                                                     |
 * | 2       | match offset, little-endian (1..65535 back)                      |
 * | 0..n    | when the match length is 15: more bytes, as for literals         |
 *
 * The last sequence has literals only (it ends the block after them). The
 * encoder keeps the format's end rules: the last 5 bytes are literals and
 * no match starts in the last 12 bytes, so every LZ4 decoder accepts it.
 *
 * Like every codec module here, `decode(input, expectedSize)` returns
 * exactly `expectedSize` bytes or throws a `CodecError`, and never writes
 * past `expectedSize`.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { CodecError } from "../../streams/errors.ts";
import { copyLiterals, copyMatch, decodeSized } from "./_lz.ts";
import { decodeLz } from "./_wasm.ts";

const CODEC = "lz4";
const MIN_MATCH = 4;
/** The last bytes of a block that are always literals. */
const LAST_LITERALS = 5;
/** No match starts this close to the end. */
const MF_LIMIT = 12;
const MAX_DISTANCE = 65535;
/** Bits of the encoder's hash table (16 Ki entries). */
const HASH_BITS = 14;

function fail(message: string): never {
  throw new CodecError(CODEC, message);
}

/**
 * Decodes one LZ4 block into `out`, which must be exactly the declared
 * size; every input byte must be used.
 *
 * @param input the block
 * @param out where the bytes go (its length is the declared size)
 * @returns `out`
 *
 * @example
 * ```ts
 * import { decodeInto } from "./lz4.ts";
 * // token 0x50: five literals "hello", no match
 * const block = new Uint8Array([0x50, 104, 101, 108, 108, 111]);
 * console.log(new TextDecoder().decode(decodeInto(block, new Uint8Array(5)))); // hello
 * ```
 */
export function decodeInto(input: Uint8Array, out: Uint8Array): Uint8Array {
  // The WebAssembly loop (drivers/codecs/_wasm/lz.c) where it runs; the
  // TypeScript one below where it does not, and to name an error.
  if (decodeLz("lz4_decode", input, out)) return out;
  return decodeScript(input, out);
}

/** The TypeScript decoder (see {@linkcode decodeInto}). */
function decodeScript(input: Uint8Array, out: Uint8Array): Uint8Array {
  const n = input.length;
  const size = out.length;
  let i = 0;
  let o = 0;
  // Every length is checked against both buffers before bytes move, so a
  // corrupt block cannot read past `input` or write past `out`.
  for (;;) {
    if (i >= n) fail(`block ends after ${o} of ${size} bytes were decoded`);
    const token = input[i++];
    let literals = token >>> 4;
    if (literals === 15) {
      for (;;) {
        if (i >= n) fail("block ends inside a literal length");
        const b = input[i++];
        literals += b;
        if (b !== 255) break;
      }
    }
    if (literals > n - i) {
      fail(`a run of ${literals} literals runs past the end of the block`);
    }
    if (literals > size - o) {
      fail(`decodes to more than the ${size} bytes declared`);
    }
    copyLiterals(input, i, out, o, literals);
    i += literals;
    o += literals;
    if (i === n) break; // the last sequence: literals only
    if (i + 2 > n) fail("block ends inside a match offset");
    const distance = input[i] | (input[i + 1] << 8);
    i += 2;
    if (distance === 0) fail(`a match at byte ${o} has offset 0`);
    if (distance > o) {
      fail(
        `a match at byte ${o} reaches ${distance} bytes back, before the start`,
      );
    }
    let length = token & 15;
    if (length === 15) {
      for (;;) {
        if (i >= n) fail("block ends inside a match length");
        const b = input[i++];
        length += b;
        if (b !== 255) break;
      }
    }
    length += MIN_MATCH;
    if (length > size - o) {
      fail(`decodes to more than the ${size} bytes declared`);
    }
    o = copyMatch(out, o, distance, length);
  }
  if (o !== size) fail(`decodes to ${o} bytes, ${size} declared`);
  return out;
}

/**
 * Decodes one LZ4 block of `expectedSize` bytes.
 *
 * @param input the block
 * @param expectedSize what it must decode to
 * @returns the bytes
 *
 * @example
 * ```ts
 * import { decode, encode } from "./lz4.ts";
 * const text = new TextEncoder().encode("abcabcabcabcabcabcabcabc");
 * const packed = await encode(text);
 * console.log(new TextDecoder().decode(await decode(packed, text.length)));
 * ```
 */
export function decode(
  input: Uint8Array,
  expectedSize: number,
): Promise<Uint8Array> {
  return decodeSized(CODEC, decodeInto, input, expectedSize);
}

/** Writes a length's continuation bytes (the part past 15) at `o`. */
function putLength(out: Uint8Array, o: number, rest: number): number {
  while (rest >= 255) {
    out[o++] = 255;
    rest -= 255;
  }
  out[o++] = rest;
  return o;
}

/**
 * Compresses `input` as one LZ4 block: a greedy parser with one hash-table
 * entry per 4-byte prefix, as the reference "fast" level does.
 * Incompressible input grows by at most 1/255 plus 16 bytes.
 *
 * @param input the bytes
 * @returns the block
 *
 * @example
 * ```ts
 * import { encodeSync } from "./lz4.ts";
 * console.log(encodeSync(new Uint8Array(65536)).length < 400); // true
 * ```
 */
export function encodeSync(input: Uint8Array): Uint8Array {
  const n = input.length;
  const out = new Uint8Array(n + Math.ceil(n / 255) + 16);
  const table = new Int32Array(1 << HASH_BITS).fill(-1);
  const view = new DataView(input.buffer, input.byteOffset, input.byteLength);
  const hash = (at: number) =>
    Math.imul(view.getUint32(at, true), 2654435761) >>> (32 - HASH_BITS);
  let o = 0;
  let anchor = 0; // first literal not yet written
  const matchLimit = n - MF_LIMIT; // no match starts at or past this
  const emit = (literals: number, distance: number, length: number) => {
    const tokenAt = o++;
    let token = Math.min(literals, 15) << 4;
    if (literals >= 15) o = putLength(out, o, literals - 15);
    out.set(input.subarray(anchor, anchor + literals), o);
    o += literals;
    if (length > 0) {
      out[o++] = distance & 0xff;
      out[o++] = distance >>> 8;
      const extra = length - MIN_MATCH;
      token |= Math.min(extra, 15);
      if (extra >= 15) o = putLength(out, o, extra - 15);
    }
    out[tokenAt] = token;
  };
  let i = 0;
  while (i < matchLimit) {
    const h = hash(i);
    const candidate = table[h];
    table[h] = i;
    if (
      candidate < 0 || i - candidate > MAX_DISTANCE ||
      view.getUint32(candidate, true) !== view.getUint32(i, true)
    ) {
      i++;
      continue;
    }
    // Extend the match; it must end 5 bytes before the end of the input.
    let length = MIN_MATCH;
    const maxLength = n - LAST_LITERALS - i;
    while (
      length < maxLength && input[i + length] === input[candidate + length]
    ) {
      length++;
    }
    emit(i - anchor, i - candidate, length);
    i += length;
    anchor = i;
    // Index a position inside the match so close repeats are found.
    if (i - 2 < matchLimit && i - 2 >= 0) table[hash(i - 2)] = i - 2;
  }
  emit(n - anchor, 0, 0);
  return out.slice(0, o);
}

/**
 * Compresses `input` as one LZ4 block (see {@linkcode encodeSync}).
 *
 * @param input the bytes
 * @returns the block
 *
 * @example
 * ```ts
 * import { decode, encode } from "./lz4.ts";
 * const packed = await encode(new Uint8Array(1000).fill(7));
 * console.log((await decode(packed, 1000))[999]); // 7
 * ```
 */
export function encode(input: Uint8Array): Promise<Uint8Array> {
  return Promise.resolve(encodeSync(input));
}
