/**
 * Pieces the LZ77-family codecs (ADC, LZ4, LZO1X) share: the match copy
 * and the decode wrapper that sizes the output and turns a thrown error
 * into a rejected promise.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { CodecError } from "../../streams/errors.ts";

/**
 * Copies a match of `length` bytes from `distance` bytes back to `out[o]`,
 * returning the new output position. The caller has checked that the match
 * starts inside the output and fits in it. A match closer than its length
 * repeats bytes it has just written, so it goes byte by byte; others are
 * one `copyWithin`.
 *
 * @param out the output
 * @param o where the match goes
 * @param distance how far back it starts (1 or more, at most `o`)
 * @param length how many bytes
 * @returns `o + length`
 *
 * @example
 * ```ts
 * import { copyMatch } from "./_lz.ts";
 * const out = new Uint8Array([97, 98, 0, 0, 0]);
 * copyMatch(out, 2, 2, 3);
 * console.log(new TextDecoder().decode(out)); // ababa
 * ```
 */
export function copyMatch(
  out: Uint8Array,
  o: number,
  distance: number,
  length: number,
): number {
  let from = o - distance;
  // Short copies in a loop: copyWithin's call costs more than a few bytes
  // (`deno task bench codecs lz4`: most matches are under 16 bytes).
  if (distance >= length && length > 16) {
    out.copyWithin(o, from, from + length);
    return o + length;
  }
  const end = o + length;
  while (o < end) out[o++] = out[from++];
  return o;
}

/**
 * Copies `length` bytes from `input` at `i` to `out` at `o`: short runs in
 * a loop, long ones with `set` (a `subarray` per literal run cost an
 * allocation each, and the call more than a few bytes' copy).
 *
 * @param input where the bytes are
 * @param i their offset
 * @param out where they go
 * @param o its offset
 * @param length how many
 *
 * @example
 * ```ts
 * import { copyLiterals } from "./_lz.ts";
 * const out = new Uint8Array(3);
 * copyLiterals(Uint8Array.of(1, 2, 3, 4), 1, out, 0, 3);
 * console.log(out.join(",")); // 2,3,4
 * ```
 */
export function copyLiterals(
  input: Uint8Array,
  i: number,
  out: Uint8Array,
  o: number,
  length: number,
): void {
  if (length > 32) {
    out.set(input.subarray(i, i + length), o);
    return;
  }
  for (const end = i + length; i < end;) out[o++] = input[i++];
}

/**
 * The `decode(input, expectedSize)` of a codec whose decoder fills an
 * output of the declared size: checks the size, allocates it, and rejects
 * with what the decoder threw.
 *
 * @param codec the codec's name, for the error
 * @param decodeInto the decoder
 * @param input the compressed bytes
 * @param expectedSize what they must decode to
 * @returns the bytes
 *
 * @example
 * ```ts
 * import { decodeSized } from "./_lz.ts";
 * const copy = (input: Uint8Array, out: Uint8Array) => (out.set(input), out);
 * console.log((await decodeSized("copy", copy, new Uint8Array(3), 3)).length); // 3
 * ```
 */
export function decodeSized(
  codec: string,
  decodeInto: (input: Uint8Array, out: Uint8Array) => Uint8Array,
  input: Uint8Array,
  expectedSize: number,
): Promise<Uint8Array> {
  try {
    if (!Number.isSafeInteger(expectedSize) || expectedSize < 0) {
      throw new CodecError(
        codec,
        `expected size ${expectedSize} is not a byte count`,
      );
    }
    return Promise.resolve(decodeInto(input, new Uint8Array(expectedSize)));
  } catch (e) {
    return Promise.reject(e);
  }
}
