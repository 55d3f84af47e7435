/**
 * CRC-32 (IEEE 802.3, the polynomial of zlib, PNG and UDIF checksums):
 * incremental, table-driven, and combinable (the CRC of two pieces joined
 * from the CRCs of the pieces, so pieces may be checked in any order).
 *
 * The native `crc32` of `node:zlib` is used by feature detection when the
 * runtime has it (Deno and Node: 24 GB/s against about 1 GB/s for the
 * table code below, measured on the 2-core bench machine); elsewhere
 * (browsers) WebAssembly (`crc32_update` in `_wasm/inflate.c`) for
 * inputs of 1 KiB and more, where it can run: the same slicing by 8, and
 * past 47 KiB words folded forward by a multiple of the polynomial (4.6
 * against 1.9 GB/s, copies into linear memory included); else the table
 * code below. All give the same numbers.
 *
 * This module is browser compatible.
 *
 * @module
 */
import { crcSliced, slicingTables } from "./_crc_slicing.ts";
import { nodeZlibModule } from "./_node_zlib.ts";
import { acquireWasm, releaseWasm, WASM_SLACK } from "./_wasm.ts";

/** The reflected IEEE polynomial. */
const POLY = 0xedb88320;

/**
 * The slicing-by-8 tables (`_crc_slicing.ts`), built by the first
 * table-driven CRC, not at module load: about 1.3 ms that every command
 * paid at start-up (the dmg driver imports this module), though Deno and
 * Node use the native CRC.
 */
let tables: Int32Array | undefined;

/** The subset of node:zlib used when the runtime has it. */
type NativeCrc32 = (data: Uint8Array, value?: number) => number;

/** node:zlib's crc32, once checked against the standard check value. `null` until looked up. */
let nativeFound: NativeCrc32 | undefined | null = null;
function native(): NativeCrc32 | undefined {
  if (nativeFound !== null) return nativeFound;
  const f = (nodeZlibModule() as { crc32?: NativeCrc32 } | undefined)?.crc32;
  nativeFound = typeof f === "function" &&
      f(new TextEncoder().encode("123456789"), 0) === 0xcbf43926
    ? f
    : undefined;
  return nativeFound;
}

/**
 * The table-driven CRC-32 (no native code), exported so tests can compare
 * it with the native one.
 *
 * @param bytes the data
 * @param previous the CRC of the bytes before these (0 to start)
 * @returns the CRC of the previous bytes followed by `bytes`
 *
 * @example
 * ```ts
 * import { crc32Table } from "./crc32.ts";
 * console.log(crc32Table(new TextEncoder().encode("123456789")).toString(16)); // cbf43926
 * ```
 */
export function crc32Table(bytes: Uint8Array, previous = 0): number {
  return crcSliced(tables ??= slicingTables(POLY), bytes, previous);
}

/**
 * CRC-32 of `bytes`, continuing from `previous` (the CRC of what came
 * before), so a long input can be fed in pieces.
 *
 * @param bytes the data
 * @param previous the CRC of the bytes before these (0 to start)
 * @returns the CRC as an unsigned 32-bit number
 *
 * @example
 * ```ts
 * import { crc32 } from "./crc32.ts";
 * const text = new TextEncoder().encode("123456789");
 * console.log(crc32(text).toString(16)); // cbf43926
 * console.log(crc32(text.subarray(4), crc32(text.subarray(0, 4))) === crc32(text)); // true
 * ```
 */
export function crc32(bytes: Uint8Array, previous = 0): number {
  // Small inputs: the call into native code costs more than the loop.
  if (bytes.length >= 64) {
    const f = native();
    if (f) return f(bytes, previous) >>> 0;
    if (bytes.length >= 1024) {
      const crc = crc32Wasm(bytes, previous);
      if (crc !== undefined) return crc;
    }
  }
  return crc32Table(bytes, previous);
}

/** The most bytes copied into linear memory at once. */
const WASM_PIECE = 1 << 20;

/**
 * {@linkcode crc32Table}'s loop in WebAssembly, `bytes` copied into linear
 * memory a mebibyte at a time; undefined where WebAssembly cannot run.
 * In chromium's decode workers the table code took as long as inflating
 * a dmg's zlib chunks (about 430 ms of 1,050 for the bench's 256 MiB
 * disk); the copy is a small part of a WebAssembly CRC's time.
 *
 * @param bytes the data
 * @param previous the CRC of the bytes before these (0 to start)
 * @returns the CRC of the previous bytes followed by `bytes`, or undefined
 *
 * @example
 * ```ts
 * import { crc32Wasm } from "./crc32.ts";
 * const crc = crc32Wasm(new TextEncoder().encode("123456789"));
 * console.log(crc === undefined || crc.toString(16) === "cbf43926"); // true
 * ```
 */
export function crc32Wasm(
  bytes: Uint8Array,
  previous = 0,
): number | undefined {
  const wasm = acquireWasm();
  if (!wasm) return undefined;
  try {
    const at = wasm.heapBase;
    const piece = Math.min(bytes.length, WASM_PIECE);
    if (!wasm.ensure(at + piece + WASM_SLACK)) return undefined;
    let crc = previous >>> 0;
    for (let i = 0; i < bytes.length; i += piece) {
      const part = bytes.subarray(i, i + piece);
      wasm.bytes.set(part, at);
      crc = wasm.exports.crc32_update(crc, at, part.length) >>> 0;
    }
    return crc;
  } finally {
    releaseWasm(wasm);
  }
}

/** Multiplies two polynomials modulo the CRC polynomial (reflected bit order). */
function multiply(a: number, b: number): number {
  let m = 0x80000000;
  let p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) === 0) break;
    }
    m >>>= 1;
    if (m === 0) break;
    b = b & 1 ? (b >>> 1) ^ POLY : b >>> 1;
  }
  return p >>> 0;
}

/** x^(2^k) modulo the polynomial, for k = 0..63; built on first use (0.6 ms). */
let powers: Uint32Array | undefined;
function squarings(): Uint32Array {
  if (powers) return powers;
  const t = new Uint32Array(64);
  let p = 0x40000000; // x^1
  t[0] = p;
  for (let k = 1; k < 64; k++) t[k] = p = multiply(p, p);
  return powers = t;
}

/** x^(8 × length) modulo the polynomial: appending `length` zero bytes. */
function zerosOperator(length: number): number {
  const table = squarings();
  let p = 0x80000000; // x^0
  let k = 3; // a byte is 2^3 bits
  for (let n = length; n > 0; n = Math.floor(n / 2), k++) {
    if (n % 2) p = multiply(table[k & 63], p);
  }
  return p;
}

/**
 * The CRC-32 of A followed by B, from the CRC of A, the CRC of B and B's
 * length (zlib's `crc32_combine`), in O(log length) steps.
 *
 * @param crcA CRC of the first piece
 * @param crcB CRC of the second piece
 * @param lengthB length of the second piece in bytes
 * @returns the CRC of both pieces joined
 *
 * @example
 * ```ts
 * import { crc32, crc32Combine } from "./crc32.ts";
 * const a = new TextEncoder().encode("1234"), b = new TextEncoder().encode("56789");
 * console.log(crc32Combine(crc32(a), crc32(b), b.length).toString(16)); // cbf43926
 * ```
 */
export function crc32Combine(
  crcA: number,
  crcB: number,
  lengthB: number,
): number {
  if (lengthB <= 0) return crcA >>> 0;
  return (multiply(zerosOperator(lengthB), crcA >>> 0) ^ crcB) >>> 0;
}

/**
 * The CRC-32 after `length` zero bytes more, without touching them: the
 * CRC of a zero-filled run of any size in O(log length) steps.
 *
 * @param previous the CRC of the bytes before the zeros (0 to start)
 * @param length how many zero bytes follow
 * @returns the CRC of the previous bytes followed by the zeros
 *
 * @example
 * ```ts
 * import { crc32, crc32Zeros } from "./crc32.ts";
 * console.log(crc32Zeros(0, 1000) === crc32(new Uint8Array(1000))); // true
 * ```
 */
export function crc32Zeros(previous: number, length: number): number {
  if (length <= 0) return previous >>> 0;
  // The register (the CRC without its final inversion) moves by the zeros
  // operator; the inversions on either side are undone and redone.
  return ~multiply(zerosOperator(length), ~previous >>> 0) >>> 0;
}
