/**
 * Writing a buffer with holes: the one zero-skipping writer that
 * `convert` (every block it writes) and the compressed-file decoder
 * (`compressed.ts`, decoding straight into the output) share.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { isZeroRange, wordsOf } from "../drivers/_binary.ts";

/**
 * Writes the non-zero parts of `bytes` (which belong at `offset`) with
 * `write`, skipping all-zero granules of `granule` bytes (aligned to the
 * disk, not to `bytes`; 0 or less: everything is written). Each run of
 * data is one `write`, and each run of zero granules, whole, goes to
 * `zeroFill` where given (to write zeros over a target, or to note the
 * run). Returns the bytes written.
 *
 * @example
 * ```ts
 * import { writeSparse } from "./_sparse.ts";
 * const bytes = new Uint8Array(3 * 4096);
 * bytes[5000] = 1; // only the second 4 KiB block holds data
 * const runs: string[] = [];
 * const written = await writeSparse(
 *   (at, data) => (runs.push(`data ${at}+${data.length}`), Promise.resolve()),
 *   0,
 *   bytes,
 *   4096,
 *   (at, length) => (runs.push(`zero ${at}+${length}`), Promise.resolve()),
 * );
 * console.log(written, runs); // 4096 [ "zero 0+4096", "data 4096+4096", "zero 8192+4096" ]
 * ```
 */
export async function writeSparse(
  write: (offset: number, bytes: Uint8Array) => Promise<void>,
  offset: number,
  bytes: Uint8Array,
  granule: number,
  zeroFill?: (offset: number, length: number) => Promise<void>,
): Promise<number> {
  if (granule <= 0) {
    await write(offset, bytes);
    return bytes.length;
  }
  let written = 0;
  let runStart = -1;
  let zeroStart = -1;
  const words = wordsOf(bytes);
  for (let i = 0; i < bytes.length;) {
    const end = Math.min(
      bytes.length,
      (Math.floor((offset + i) / granule) + 1) * granule - offset,
    );
    const zero = isZeroRange(bytes, words, i, end);
    if (!zero && runStart < 0) {
      runStart = i;
      if (zeroStart >= 0) {
        await zeroFill!(offset + zeroStart, i - zeroStart);
        zeroStart = -1;
      }
    }
    if (zero && runStart >= 0) {
      await write(offset + runStart, bytes.subarray(runStart, i));
      written += i - runStart;
      runStart = -1;
    }
    if (zero && zeroFill && zeroStart < 0) zeroStart = i;
    i = end;
  }
  if (runStart >= 0) {
    await write(offset + runStart, bytes.subarray(runStart));
    written += bytes.length - runStart;
  }
  if (zeroStart >= 0) {
    await zeroFill!(offset + zeroStart, bytes.length - zeroStart);
  }
  return written;
}
