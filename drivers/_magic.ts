/**
 * The magics of the compressed containers (gzip, xz, bzip2, zstd), which
 * the decompressing wrappers open: drivers that claim files by weaker
 * signs (a name, a header without a magic) leave these files alone.
 *
 * This module is browser compatible.
 *
 * | container | magic at byte 0                        |
 * | --------- | -------------------------------------- |
 * | gzip      | 1f 8b                                  |
 * | xz        | fd 37 7a 58 5a 00                      |
 * | bzip2     | `BZh` and a block size digit `1`-`9`   |
 * | zstd      | 28 b5 2f fd (a frame), 5? 2a 4d 18 (a skippable frame) |
 *
 * @module
 */

/**
 * The compressed container whose magic `head` starts with, if any.
 *
 * @param head the first bytes of a file
 * @returns `gzip`, `xz`, `bzip2`, `zstd` or undefined
 *
 * @example
 * ```ts
 * import { compressorMagic } from "./_magic.ts";
 * console.log(compressorMagic(new Uint8Array([0x1f, 0x8b, 8, 0]))); // gzip
 * ```
 */
export function compressorMagic(
  head: Uint8Array,
): "gzip" | "xz" | "bzip2" | "zstd" | undefined {
  const starts = (bytes: number[]) =>
    head.length >= bytes.length && bytes.every((b, i) => head[i] === b);
  if (starts([0x1f, 0x8b])) return "gzip";
  if (starts([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00])) return "xz";
  if (starts([0x42, 0x5a, 0x68]) && head[3] >= 0x31 && head[3] <= 0x39) {
    return "bzip2";
  }
  if (starts([0x28, 0xb5, 0x2f, 0xfd])) return "zstd";
  if (
    head.length >= 4 && (head[0] & 0xf0) === 0x50 && head[1] === 0x2a &&
    head[2] === 0x4d && head[3] === 0x18
  ) {
    return "zstd";
  }
  return undefined;
}

/** The compressed-file containers that are opened as wrappers. */
export type FileCompression = "gzip" | "xz" | "bzip2" | "zstd";

/**
 * The container `head` (the first bytes of a file) starts, if any.
 *
 * @param head the file's first bytes (6 or more)
 * @returns the container, or undefined
 *
 * @example
 * ```ts
 * import { detectCompression } from "./_magic.ts";
 * console.log(detectCompression(new Uint8Array([0x1f, 0x8b, 8, 0]))); // gzip
 * ```
 */
export function detectCompression(
  head: Uint8Array,
): FileCompression | undefined {
  const at = (i: number, bytes: number[]) =>
    bytes.every((b, k) => head[i + k] === b);
  if (at(0, [0x1f, 0x8b, 0x08])) return "gzip";
  if (at(0, [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00])) return "xz";
  if (
    at(0, [0x42, 0x5a, 0x68]) && head[3] >= 0x31 && head[3] <= 0x39 &&
    (at(4, [0x31, 0x41, 0x59, 0x26, 0x53, 0x59]) ||
      at(4, [0x17, 0x72, 0x45, 0x38, 0x50, 0x90]))
  ) {
    return "bzip2";
  }
  if (at(0, [0x28, 0xb5, 0x2f, 0xfd])) return "zstd";
  if (
    (head[0] & 0xf0) === 0x50 && at(1, [0x2a, 0x4d, 0x18]) && head.length >= 4
  ) {
    return "zstd";
  }
  return undefined;
}
