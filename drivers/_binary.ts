/**
 * Byte-order helpers every driver reads and writes its fields with.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { ImageFormatError } from "../streams/errors.ts";

/** A DataView over the whole of `bytes` (respecting its offset). */
export function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Big-endian unsigned 16-bit read. */
export const be16 = (b: Uint8Array, o: number): number => view(b).getUint16(o);
/** Big-endian unsigned 32-bit read. */
export const be32 = (b: Uint8Array, o: number): number => view(b).getUint32(o);
/** Big-endian unsigned 64-bit read. */
export const be64 = (b: Uint8Array, o: number): bigint =>
  view(b).getBigUint64(o);
/** Little-endian unsigned 16-bit read. */
export const le16 = (b: Uint8Array, o: number): number =>
  view(b).getUint16(o, true);
/** Little-endian unsigned 32-bit read. */
export const le32 = (b: Uint8Array, o: number): number =>
  view(b).getUint32(o, true);
/** Little-endian unsigned 64-bit read. */
export const le64 = (b: Uint8Array, o: number): bigint =>
  view(b).getBigUint64(o, true);

/** Big-endian 16-bit write. */
export const setBe16 = (b: Uint8Array, o: number, v: number): void =>
  view(b).setUint16(o, v);
/** Big-endian 32-bit write. */
export const setBe32 = (b: Uint8Array, o: number, v: number): void =>
  view(b).setUint32(o, v);
/** Big-endian 64-bit write (from a safe integer or bigint). */
export const setBe64 = (b: Uint8Array, o: number, v: number | bigint): void =>
  view(b).setBigUint64(o, BigInt(v));
/** Little-endian 16-bit write. */
export const setLe16 = (b: Uint8Array, o: number, v: number): void =>
  view(b).setUint16(o, v, true);
/** Little-endian 32-bit write. */
export const setLe32 = (b: Uint8Array, o: number, v: number): void =>
  view(b).setUint32(o, v, true);
/** Little-endian 64-bit write (from a safe integer or bigint). */
export const setLe64 = (b: Uint8Array, o: number, v: number | bigint): void =>
  view(b).setBigUint64(o, BigInt(v), true);

/**
 * Converts a 64-bit field to a `number`, refusing values past 2^53 with an
 * {@linkcode ImageFormatError} naming the field.
 *
 * @example
 * ```ts
 * import { safeNumber } from "./_binary.ts";
 * safeNumber(4096n, "qcow", "size"); // 4096
 * ```
 */
export function safeNumber(
  value: bigint,
  format: string,
  field: string,
  offset?: number,
): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new ImageFormatError({
      format,
      field,
      value,
      limit: `at most 2^53-1`,
      offset,
    });
  }
  return Number(value);
}

/**
 * The error maker of one driver: `fail(field, value, limit, offset, file)`
 * gives the {@linkcode ImageFormatError} of `format` naming the field, the
 * value found and the limit broken. Drivers `throw fail(...)`.
 *
 * @example
 * ```ts
 * import { formatErrors } from "./_binary.ts";
 * const fail = formatErrors("qcow");
 * console.log(fail("cluster_bits", 8, "between 9 and 16", 28).message);
 * // qcow: cluster_bits 8 must be between 9 and 16 (at byte 28)
 * ```
 */
export function formatErrors(format: string): (
  field: string,
  value: unknown,
  limit: string,
  offset?: number,
  file?: string,
) => ImageFormatError {
  return (field, value, limit, offset, file) =>
    new ImageFormatError({ format, field, value, limit, offset, file });
}

/**
 * `n` rounded up to a multiple of `to`.
 *
 * @example
 * ```ts
 * import { alignUp } from "./_binary.ts";
 * alignUp(4100, 4096); // 8192
 * ```
 */
export const alignUp = (n: number, to: number): number =>
  Math.ceil(n / to) * to;

/** ASCII text of `bytes[start, end)` (NULs included). */
export function ascii(b: Uint8Array, start = 0, end = b.length): string {
  let s = "";
  for (let i = start; i < end; i++) s += String.fromCharCode(b[i]);
  return s;
}

/**
 * The 16 bytes at `at` as a UUID's text, the first three fields read
 * little-endian (how Windows lays out a GUID and VirtualBox an RTUUID:
 * vdi uuids, a VHD's unique id as VirtualBox prints it, vhdx GUIDs).
 *
 * @example
 * ```ts
 * import { uuidText } from "./_binary.ts";
 * uuidText(new Uint8Array(16).fill(1)); // "01010101-0101-0101-0101-010101010101"
 * ```
 */
export function uuidText(b: Uint8Array, at = 0): string {
  // The characters' codes in a buffer, made into one string: a UUID read
  // while opening an image (a vhdx reads a dozen) costs one allocation,
  // not forty (it runs before the JIT, and its garbage counts toward the
  // first scavenge).
  if (!(at >= 0 && at + 16 <= b.length)) {
    throw new TypeError(`no 16 bytes of a UUID at ${at} of ${b.length}`);
  }
  let c = 0;
  for (let k = 0; k < 16; k++) {
    const v = b[at + UUID_ORDER[k]];
    UUID_CODES[c++] = HEX_CODES[v >> 4];
    UUID_CODES[c++] = HEX_CODES[v & 15];
    if (k === 3 || k === 5 || k === 7 || k === 9) UUID_CODES[c++] = 0x2d; // -
  }
  return String.fromCharCode.apply(null, UUID_CODES as unknown as number[]);
}

/** The byte order of {@linkcode uuidText}: the first three fields little-endian. */
const UUID_ORDER = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15];
/** The character codes of the hex digits, `0`-`9` and `a`-`f`. */
const HEX_CODES = Uint8Array.from("0123456789abcdef", (d) => d.charCodeAt(0));
/** The 36 character codes of the UUID being written. */
const UUID_CODES = new Uint8Array(36);

/** ASCII text up to the first NUL in `bytes[start, end)`. */
export function cString(b: Uint8Array, start = 0, end = b.length): string {
  let stop = start;
  while (stop < end && b[stop] !== 0) stop++;
  return new TextDecoder().decode(b.subarray(start, stop));
}

/** True when every byte of `b` is zero. Reads 4 bytes at a time when aligned. */
export function isZero(b: Uint8Array): boolean {
  return isZeroRange(b, wordsOf(b), 0, b.length);
}

/**
 * A Uint32Array over the bytes of `b` when `b` starts on a 4-byte boundary
 * (undefined otherwise), for {@linkcode isZeroRange}.
 */
export function wordsOf(b: Uint8Array): Uint32Array | undefined {
  return (b.byteOffset & 3) === 0
    ? new Uint32Array(b.buffer, b.byteOffset, b.length >>> 2)
    : undefined;
}

/**
 * True when `b[start, end)` is all zeros: `isZero(b.subarray(start, end))`
 * without making a subarray, given `words = wordsOf(b)` made once per
 * buffer. The hot loop of sparse detection: convert checks every 4 KiB of
 * the data it writes, 196,000 checks per 768 MiB, and a subarray per check
 * cost 8 ms of that. Comparing 32-bit words is ~4x faster than byte by
 * byte on large buffers, and OR-ing eight words per test another 2.4x
 * (4 KiB blocks of zeros: 15 against 36 ms per 320 MiB).
 */
export function isZeroRange(
  b: Uint8Array,
  words: Uint32Array | undefined,
  start: number,
  end: number,
): boolean {
  let i = start;
  if (words && end - i >= 64) {
    for (; i & 3; i++) if (b[i] !== 0) return false;
    let w = i >>> 2;
    const whole = w + ((((end >>> 2) - w) >>> 3) << 3);
    for (; w < whole; w += 8) {
      if (
        (words[w] | words[w + 1] | words[w + 2] | words[w + 3] |
          words[w + 4] | words[w + 5] | words[w + 6] | words[w + 7]) !== 0
      ) return false;
    }
    for (const stop = end >>> 2; w < stop; w++) {
      if (words[w] !== 0) return false;
    }
    i = w << 2;
  }
  for (; i < end; i++) if (b[i] !== 0) return false;
  return true;
}

/** Copies `parts` into one new array. */
export function concat(parts: Uint8Array[]): Uint8Array {
  let total = 0;
  for (const p of parts) total += p.length;
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Buffers of this many bytes at most are kept for reuse. */
const SCRATCH_KEEP_BYTES = 8 << 20;
/** How many buffers of each kind are kept. */
const SCRATCH_KEEP = 4;

/**
 * Reused buffers (packed bytes read from a file, or shared memory workers
 * decode into): `take(n)` gives a view of `n` bytes, `give` hands it back.
 * A fresh array per read cost page faults, and V8 frees array buffers
 * late, which showed in the peak RSS of `deno task bench` (dmg, cloop).
 *
 * @example
 * ```ts
 * import { Scratch } from "./_binary.ts";
 * const scratch = new Scratch((n) => new Uint8Array(n));
 * const a = scratch.take(1000);
 * scratch.give(a);
 * console.log(scratch.take(500).buffer === a.buffer); // true
 * ```
 */
export class Scratch {
  #free: Uint8Array[] = [];
  /**
   * @param make allocates a buffer of the given size (whole, not a view)
   * @param keep how many buffers are kept for reuse
   * @param keepBytes buffers bigger than this are not kept
   */
  constructor(
    readonly make: (bytes: number) => Uint8Array,
    readonly keep: number = SCRATCH_KEEP,
    readonly keepBytes: number = SCRATCH_KEEP_BYTES,
  ) {}
  /** A view of `bytes` bytes in a kept buffer big enough, or in a new one. */
  take(bytes: number): Uint8Array {
    const k = this.#free.findIndex((b) => b.length >= bytes);
    if (k >= 0) return this.#free.splice(k, 1)[0].subarray(0, bytes);
    // Sizes rounded up to a power of two (64 KiB at least), so that runs
    // of varying packed size find a kept buffer big enough.
    return this.make(Math.max(1 << 16, 2 ** Math.ceil(Math.log2(bytes))))
      .subarray(0, bytes);
  }
  /** Hands back a view from {@linkcode take}; its buffer may be kept for reuse. */
  give(view: Uint8Array) {
    const buffer = new Uint8Array(view.buffer);
    if (buffer.length > this.keepBytes) return;
    if (this.#free.length >= this.keep) {
      // Full: the smallest kept buffer makes way for a bigger one.
      let k = 0;
      this.#free.forEach((b, j) => {
        if (b.length < this.#free[k].length) k = j;
      });
      if (this.#free[k].length >= buffer.length) return;
      this.#free.splice(k, 1);
    }
    this.#free.push(buffer);
  }
}
