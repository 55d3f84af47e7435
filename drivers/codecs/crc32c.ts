/**
 * CRC-32C (Castagnoli, the checksum of VHDX headers, region tables and log
 * entries): incremental and table-driven.
 *
 * VHDX checksums a few kilobytes per open (two 4 KiB headers, two 64 KiB
 * region tables, the log when there is one), so one 256-entry table is
 * enough; it is built on first use.
 *
 * This module is browser compatible.
 *
 * @module
 */

/** The reflected Castagnoli polynomial. */
const POLY = 0x82f63b78;

let table: Uint32Array | undefined;
function crcTable(): Uint32Array {
  if (table) return table;
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ POLY : c >>> 1;
    t[n] = c >>> 0;
  }
  return table = t;
}

/**
 * The CRC-32C of `bytes`, continuing from `crc` (the CRC of the bytes
 * before them; 0 to start).
 *
 * @param bytes the bytes to add
 * @param crc the CRC so far
 * @returns the CRC of everything so far
 *
 * @example
 * ```ts
 * import { crc32c } from "./crc32c.ts";
 * const all = crc32c(new TextEncoder().encode("123456789"));
 * console.log(all.toString(16)); // e3069283
 * const part = crc32c(new TextEncoder().encode("1234"));
 * console.log(crc32c(new TextEncoder().encode("56789"), part) === all); // true
 * ```
 */
export function crc32c(bytes: Uint8Array, crc = 0): number {
  const t = crcTable();
  let c = ~crc >>> 0;
  for (let i = 0; i < bytes.length; i++) {
    c = t[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  }
  return ~c >>> 0;
}
