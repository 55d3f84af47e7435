/**
 * LZO1X: the codec of cloop version 4 blocks with compressor 4 (the
 * kernel's `lzo1x_decompress_safe`), decoded and encoded. A block is a raw
 * LZO1X stream, with no header and no checksum, ending with the end marker
 * `11 00 00`.
 *
 * The stream is a run of instructions; what a byte below 16 means depends
 * on the `state`, the number of literals the previous instruction copied
 * (0, 1..3, or 4 for "4 or more"):
 *
 * | first byte             | meaning                                                          |
 * | ---------------------- | ---------------------------------------------------------------- |
 * | 18..255 (stream start) | copy `byte - 17` literals; state = that count (4 when 4 or more)   |
 * | `0000LLLL`, state 0    | copy 3 + L literals (L = 0: 18 + zero bytes × 255 + the next non-zero byte); state 4 |
 * | `0000DDSS`, state 1..3 | copy 2 bytes from distance (next byte << 2) + D + 1              |
 * | `0000DDSS`, state 4    | copy 3 bytes from distance (next byte << 2) + D + 2049           |
 * | `0001HLLL`             | copy 2 + L bytes (L = 0: 9 + zero bytes × 255 + the next non-zero byte) from distance 16384 + (H << 14) + (next LE16 >> 2); distance 16384 ends the stream |
 * | `001LLLLL`             | copy 2 + L bytes (L = 0: 33 + zero bytes × 255 + ...) from distance (next LE16 >> 2) + 1 |
 * | `01LDDDSS`             | copy 3 + L bytes from distance (next byte << 3) + D + 1          |
 * | `1LLDDDSS`             | copy 5 + L bytes from distance (next byte << 3) + D + 1          |
 *
 * After every copy from the dictionary, S (the low 2 bits of the
 * instruction, or of its LE16) literals follow, and state = S.
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

const CODEC = "lzo";

function fail(message: string): never {
  throw new CodecError(CODEC, message);
}

/**
 * Decodes one LZO1X stream into `out`, which must be exactly the declared
 * size; the stream must end with its end marker on the last input byte.
 *
 * @param input the stream
 * @param out where the bytes go (its length is the declared size)
 * @returns `out`
 *
 * @example
 * ```ts
 * import { decodeInto } from "./lzo.ts";
 * // 3 literals "abc" (first byte 17 + 3), then the end marker
 * const stream = new Uint8Array([20, 97, 98, 99, 0x11, 0, 0]);
 * console.log(new TextDecoder().decode(decodeInto(stream, new Uint8Array(3)))); // abc
 * ```
 */
export function decodeInto(input: Uint8Array, out: Uint8Array): Uint8Array {
  // The WebAssembly loop (drivers/codecs/_wasm/lz.c) where it runs; the
  // TypeScript one below where it does not, and to name an error.
  if (decodeLz("lzo_decode", input, out)) return out;
  return decodeScript(input, out);
}

/** The TypeScript decoder (see {@linkcode decodeInto}). */
function decodeScript(input: Uint8Array, out: Uint8Array): Uint8Array {
  const n = input.length;
  const size = out.length;
  let i = 0;
  let o = 0;
  let state = 0;
  const need = (count: number) => {
    if (count > n - i) fail(`stream ends early, at byte ${i} of ${n}`);
  };
  /** The extension of a length whose field was 0: zero bytes count 255 each. */
  const extend = (base: number) => {
    let length = base;
    for (;;) {
      need(1);
      const b = input[i++];
      if (b !== 0) return length + b;
      length += 255;
      // A run of zero bytes longer than the output could ever need.
      if (length > size + 255) fail("a length runs past the declared size");
    }
  };
  const literals = (count: number) => {
    need(count);
    if (count > size - o) {
      fail(`decodes to more than the ${size} bytes declared`);
    }
    copyLiterals(input, i, out, o, count);
    i += count;
    o += count;
  };
  const copy = (distance: number, length: number) => {
    if (distance > o) {
      fail(
        `a match at byte ${o} reaches ${distance} bytes back, before the start`,
      );
    }
    if (length > size - o) {
      fail(`decodes to more than the ${size} bytes declared`);
    }
    o = copyMatch(out, o, distance, length);
  };
  need(1);
  if (input[0] > 17) {
    const count = input[i++] - 17;
    literals(count);
    state = count < 4 ? count : 4;
  }
  // One instruction per iteration; every count is checked before bytes move.
  for (;;) {
    need(1);
    const t = input[i++];
    let s: number;
    if (t < 16) {
      if (state === 0) {
        const count = t === 0 ? extend(18) : t + 3;
        literals(count);
        state = 4;
        continue;
      }
      need(1);
      const h = input[i++];
      if (state === 4) copy((h << 2) + ((t >>> 2) & 3) + 2049, 3);
      else copy((h << 2) + ((t >>> 2) & 3) + 1, 2);
      s = t & 3;
    } else if (t < 32) {
      const length = (t & 7) === 0 ? extend(9) : (t & 7) + 2;
      need(2);
      const le = input[i] | (input[i + 1] << 8);
      i += 2;
      const distance = 16384 + ((t & 8) << 11) + (le >>> 2);
      if (distance === 16384) {
        // The end marker: 11 00 00 as every encoder writes it.
        if (length !== 3 || le !== 0) fail("malformed end marker");
        break;
      }
      copy(distance, length);
      s = le & 3;
    } else if (t < 64) {
      const length = (t & 31) === 0 ? extend(33) : (t & 31) + 2;
      need(2);
      const le = input[i] | (input[i + 1] << 8);
      i += 2;
      copy((le >>> 2) + 1, length);
      s = le & 3;
    } else {
      need(1);
      const h = input[i++];
      const length = t < 128 ? 3 + ((t >>> 5) & 1) : 5 + ((t >>> 5) & 3);
      copy((h << 3) + ((t >>> 2) & 7) + 1, length);
      s = t & 3;
    }
    literals(s);
    state = s;
  }
  if (i !== n) fail(`${n - i} bytes follow the end marker`);
  if (o !== size) fail(`decodes to ${o} bytes, ${size} declared`);
  return out;
}

/**
 * Decodes one LZO1X stream of `expectedSize` bytes.
 *
 * @param input the stream
 * @param expectedSize what it must decode to
 * @returns the bytes
 *
 * @example
 * ```ts
 * import { decode, encode } from "./lzo.ts";
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

/** Bits of the encoder's hash table (16 Ki entries). */
const HASH_BITS = 14;
/** The farthest back the encoder looks (the `0001` form reaches 49151). */
const MAX_DISTANCE = 49151;
const MIN_MATCH = 3;

/**
 * Compresses `input` as one LZO1X stream: a greedy parser with one
 * hash-table entry per 4-byte prefix, using the 2 KiB, 16 KiB and 48 KiB
 * match forms and carrying up to 3 following literals in each match, as
 * LZO1X-1 does. Incompressible input grows by about 1/255 plus 5 bytes.
 *
 * @param input the bytes
 * @returns the stream
 *
 * @example
 * ```ts
 * import { encodeSync } from "./lzo.ts";
 * console.log(encodeSync(new Uint8Array(65536)).length < 400); // true
 * ```
 */
export function encodeSync(input: Uint8Array): Uint8Array {
  const n = input.length;
  const out = new Uint8Array(n + Math.ceil(n / 255) + 64);
  const table = new Int32Array(1 << HASH_BITS).fill(-1);
  const view = new DataView(input.buffer, input.byteOffset, input.byteLength);
  const hash = (at: number) =>
    Math.imul(view.getUint32(at, true), 2654435761) >>> (32 - HASH_BITS);
  let o = 0;
  let anchor = 0;
  /** Where the last match instruction's S bits are, or -1 at the start. */
  let lastS = -1;
  /** Writes a length field's extension (value past the field's maximum). */
  const extension = (rest: number) => {
    while (rest > 255) {
      out[o++] = 0;
      rest -= 255;
    }
    out[o++] = rest;
  };
  /** The literals from `anchor` to `end`, encoded as the state requires. */
  const putLiterals = (end: number) => {
    const count = end - anchor;
    if (count === 0) return;
    if (lastS < 0) {
      // At the start of the stream: the first byte carries short runs.
      if (count <= 238) {
        out[o++] = count + 17;
      } else {
        out[o++] = 0;
        extension(count - 18);
      }
    } else if (count <= 3) {
      out[lastS] |= count;
    } else if (count <= 18) {
      out[o++] = count - 3;
    } else {
      out[o++] = 0;
      extension(count - 18);
    }
    out.set(input.subarray(anchor, end), o);
    o += count;
  };
  /** One match; its S bits stay 0 until literals after it are known. */
  const putMatch = (distance: number, length: number) => {
    if (length <= 8 && distance <= 2048) {
      const d = distance - 1;
      if (length <= 4) {
        out[o++] = 0x40 | ((length - 3) << 5) | ((d & 7) << 2);
      } else {
        out[o++] = 0x80 | ((length - 5) << 5) | ((d & 7) << 2);
      }
      lastS = o - 1;
      out[o++] = d >>> 3;
      return;
    }
    if (distance <= 16384) {
      const d = distance - 1;
      if (length <= 33) {
        out[o++] = 0x20 | (length - 2);
      } else {
        out[o++] = 0x20;
        extension(length - 33);
      }
      lastS = o;
      out[o++] = (d << 2) & 0xff;
      out[o++] = d >>> 6;
      return;
    }
    const d = distance - 16384;
    const h = (d >>> 14) & 1;
    if (length <= 9) {
      out[o++] = 0x10 | (h << 3) | (length - 2);
    } else {
      out[o++] = 0x10 | (h << 3);
      extension(length - 9);
    }
    lastS = o;
    out[o++] = ((d & 0x3fff) << 2) & 0xff;
    out[o++] = (d & 0x3fff) >>> 6;
  };
  let i = 0;
  const last = n - 4; // a 4-byte prefix must fit
  while (i <= last) {
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
    const distance = i - candidate;
    let length = 4;
    while (i + length < n && input[i + length] === input[candidate + length]) {
      length++;
    }
    // The 2 KiB form needs no more than 8 bytes; the others need 3+.
    if (length < MIN_MATCH) {
      i++;
      continue;
    }
    putLiterals(i);
    putMatch(distance, length);
    i += length;
    anchor = i;
  }
  putLiterals(n);
  // The end marker: a 0001 instruction of length 3 at distance 16384.
  out[o++] = 0x11;
  out[o++] = 0;
  out[o++] = 0;
  return out.slice(0, o);
}

/**
 * Compresses `input` as one LZO1X stream (see {@linkcode encodeSync}).
 *
 * @param input the bytes
 * @returns the stream
 *
 * @example
 * ```ts
 * import { decode, encode } from "./lzo.ts";
 * const packed = await encode(new Uint8Array(1000).fill(7));
 * console.log((await decode(packed, 1000))[999]); // 7
 * ```
 */
export function encode(input: Uint8Array): Promise<Uint8Array> {
  return Promise.resolve(encodeSync(input));
}
