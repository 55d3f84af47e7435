/**
 * ADC, Apple Data Compression: the LZ77 codec of UDCO disk images
 * (chunk type 0x80000004), decoded and encoded.
 *
 * A stream is a sequence of tokens, told apart by the first byte:
 *
 * | first byte  | size    | meaning                                                        |
 * | ----------- | ------- | -------------------------------------------------------------- |
 * | `1nnnnnnn`  | 1 + n+1 | a literal run: the next n + 1 bytes (1..128) are copied out     |
 * | `01nnnnnn`  | 3       | a match of n + 4 bytes (4..67), distance (bytes 2-3, big-endian) + 1 (1..65536) back |
 * | `00nnnndd`  | 2       | a match of n + 3 bytes (3..18), distance (dd << 8 \| byte 2) + 1 (1..1024) back |
 *
 * A match may overlap its own output (distance shorter than its length),
 * as in every LZ77 codec. There is no header, no end marker and no
 * checksum: the chunk's sizes say where a stream ends.
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

/**
 * Decodes an ADC stream into `out`, which must be exactly the declared
 * size; every input byte must be used.
 *
 * @param input the compressed bytes
 * @param out where the bytes go (its length is the declared size)
 * @returns `out`
 *
 * @example
 * ```ts
 * import { decodeInto } from "./adc.ts";
 * // a literal "ab", then a 3-byte match 2 back: "ababa"
 * const out = decodeInto(new Uint8Array([0x81, 0x61, 0x62, 0x00, 0x01]), new Uint8Array(5));
 * console.log(new TextDecoder().decode(out)); // ababa
 * ```
 */
export function decodeInto(input: Uint8Array, out: Uint8Array): Uint8Array {
  const n = input.length;
  const size = out.length;
  let i = 0;
  let o = 0;
  // One token per iteration; every bound is checked before a byte moves,
  // so corrupt input cannot write past `out` or read past `input`.
  while (o < size) {
    if (i >= n) {
      throw new CodecError(
        "adc",
        `input ends after ${o} of ${size} bytes were decoded`,
      );
    }
    const b = input[i];
    if (b & 0x80) {
      const length = (b & 0x7f) + 1;
      if (i + 1 + length > n) {
        throw new CodecError(
          "adc",
          `literal run of ${length} bytes at input byte ${i} runs past the input's ${n} bytes`,
        );
      }
      if (o + length > size) {
        throw new CodecError(
          "adc",
          `decodes to more than the declared ${size} bytes`,
        );
      }
      copyLiterals(input, i + 1, out, o, length);
      o += length;
      i += 1 + length;
      continue;
    }
    let length: number;
    let distance: number;
    if (b & 0x40) {
      if (i + 3 > n) {
        throw new CodecError("adc", `input ends inside a match at byte ${i}`);
      }
      length = (b & 0x3f) + 4;
      distance = ((input[i + 1] << 8) | input[i + 2]) + 1;
      i += 3;
    } else {
      if (i + 2 > n) {
        throw new CodecError("adc", `input ends inside a match at byte ${i}`);
      }
      length = ((b >> 2) & 0x0f) + 3;
      distance = (((b & 3) << 8) | input[i + 1]) + 1;
      i += 2;
    }
    if (distance > o) {
      throw new CodecError(
        "adc",
        `match at output byte ${o} reaches ${distance} bytes back, before the start`,
      );
    }
    if (o + length > size) {
      throw new CodecError(
        "adc",
        `decodes to more than the declared ${size} bytes`,
      );
    }
    o = copyMatch(out, o, distance, length);
  }
  if (i !== n) {
    throw new CodecError(
      "adc",
      `${n - i} bytes of input left after the declared ${size} bytes`,
    );
  }
  return out;
}

/**
 * Decodes an ADC stream to exactly `expectedSize` bytes.
 *
 * @param input the compressed bytes
 * @param expectedSize how many bytes it must decode to
 * @returns the bytes
 *
 * @example
 * ```ts
 * import { decode, encode } from "./adc.ts";
 * const text = new TextEncoder().encode("abcabcabcabcabcabc");
 * const packed = await encode(text);
 * console.log(new TextDecoder().decode(await decode(packed, text.length))); // abcabcabcabcabcabc
 * ```
 */
export function decode(
  input: Uint8Array,
  expectedSize: number,
): Promise<Uint8Array> {
  return decodeSized("adc", decodeInto, input, expectedSize);
}

/** Bits of the match finder's hash table (64 Ki entries, 256 KiB). */
const HASH_BITS = 16;
/** The farthest back a match can reach. */
const MAX_DISTANCE = 65536;
/** The longest match a token can carry. */
const MAX_MATCH = 67;
/** The longest literal run. */
const MAX_LITERALS = 128;

/**
 * Compresses `input` as an ADC stream: a greedy LZ77 parser with one hash
 * table entry per 3-byte prefix (fast and simple; hdiutil's own encoder
 * packs somewhat tighter). Incompressible input grows by 1/128.
 *
 * @param input the bytes
 * @returns the compressed bytes
 *
 * @example
 * ```ts
 * import { encodeSync } from "./adc.ts";
 * console.log(encodeSync(new Uint8Array(65536)).length < 2000); // true
 * ```
 */
export function encodeSync(input: Uint8Array): Uint8Array {
  const n = input.length;
  // Worst case: all literals, one header byte per 128.
  const out = new Uint8Array(n + Math.ceil(n / MAX_LITERALS) + 1);
  const table = new Int32Array(1 << HASH_BITS).fill(-1);
  let o = 0;
  let literalStart = 0;
  const flush = (end: number) => {
    for (let s = literalStart; s < end;) {
      const run = Math.min(MAX_LITERALS, end - s);
      out[o++] = 0x80 | (run - 1);
      out.set(input.subarray(s, s + run), o);
      o += run;
      s += run;
    }
  };
  let i = 0;
  while (i + 3 <= n) {
    const h = Math.imul(
      input[i] | (input[i + 1] << 8) | (input[i + 2] << 16),
      0x9e3779b1,
    ) >>> (32 - HASH_BITS);
    const candidate = table[h];
    table[h] = i;
    const distance = i - candidate;
    if (
      candidate < 0 || distance > MAX_DISTANCE ||
      input[candidate] !== input[i] || input[candidate + 1] !== input[i + 1] ||
      input[candidate + 2] !== input[i + 2]
    ) {
      i++;
      continue;
    }
    let length = 3;
    const limit = Math.min(MAX_MATCH, n - i);
    while (length < limit && input[candidate + length] === input[i + length]) {
      length++;
    }
    // A 3-byte match only fits the short token (distance up to 1024).
    if (length === 3 && distance > 1024) {
      i++;
      continue;
    }
    flush(i);
    if (length <= 18 && distance <= 1024) {
      out[o++] = ((length - 3) << 2) | ((distance - 1) >> 8);
      out[o++] = (distance - 1) & 0xff;
    } else {
      out[o++] = 0x40 | (length - 4);
      out[o++] = (distance - 1) >> 8;
      out[o++] = (distance - 1) & 0xff;
    }
    i += length;
    literalStart = i;
  }
  flush(n);
  return out.slice(0, o);
}

/**
 * Compresses `input` as an ADC stream (see {@linkcode encodeSync}).
 *
 * @param input the bytes
 * @returns the compressed bytes
 *
 * @example
 * ```ts
 * import { decode, encode } from "./adc.ts";
 * const zeros = new Uint8Array(4096);
 * console.log((await decode(await encode(zeros), 4096)).every((b) => b === 0)); // true
 * ```
 */
export function encode(input: Uint8Array): Promise<Uint8Array> {
  return Promise.resolve(encodeSync(input));
}
