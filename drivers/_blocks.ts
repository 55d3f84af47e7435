/**
 * Reading for formats that map a virtual disk in fixed-size blocks through
 * a table (vdi, vhdx, qed, parallels): the driver says, block by block,
 * what each part of a block is and where its bytes live in the file; this
 * module turns that into `read`, `readInto` and `extents`.
 *
 * This module is browser compatible.
 *
 * @module
 */

import {
  checkRange,
  type Extent,
  type ExtentKind,
  readInto as readIntoSource,
  type Source,
} from "../streams/types.ts";

/**
 * One run within a block: `[from, to)` in bytes from the block's start,
 * what it holds and, for `data`, the file offset of its byte `from`.
 */
export interface BlockRun {
  /** First byte of the run, from the block's start. */
  from: number;
  /** One past the last byte, from the block's start. */
  to: number;
  /** What the run holds. */
  kind: ExtentKind;
  /** For `data`: where byte `from` lives in the file. */
  at?: number;
}

/** What {@linkcode blockReader} needs from a driver. */
export interface BlockMap {
  /** The image file. */
  source: Source;
  /** The virtual disk's size in bytes. */
  size: number;
  /** Bytes per block (the last block may be cut short by `size`). */
  blockSize: number;
  /**
   * The runs of block `block`, in order, covering `[0, blockSize)` (or up
   * to the disk's end for the last block). Usually one run.
   */
  lookup(block: number): BlockRun[] | Promise<BlockRun[]>;
  /**
   * Called for an `unallocated` run that `read` meets: throw to refuse
   * (a differencing image whose parent was not opened); return to read
   * zeros.
   */
  unallocated?(offset: number, length: number): void;
}

/** The reading half of an image over a {@linkcode BlockMap}. */
export interface BlockReader {
  /** Reads `length` bytes of the disk at `offset`. */
  read(offset: number, length: number): Promise<Uint8Array>;
  /** Reads into the caller's buffer. */
  readInto(offset: number, into: Uint8Array): Promise<void>;
  /**
   * The allocation map of `[offset, offset + length)`; `data` runs carry
   * their `fileOffset` in `source` (runs merge only where they follow each
   * other in the file too, as qemu-img map shows them).
   */
  extents(offset: number, length: number): AsyncIterable<Extent>;
}

/**
 * `read`, `readInto` and `extents` over a block table.
 *
 * @param map the disk's size, block size and per-block lookup
 * @returns the functions to set on the image
 *
 * @example
 * ```ts
 * import { blockReader } from "./_blocks.ts";
 * import { fromBytes } from "../mod.ts";
 * const file = new Uint8Array(1024).fill(9);
 * const r = blockReader({
 *   source: fromBytes(file),
 *   size: 2048,
 *   blockSize: 1024,
 *   lookup: (b) => [b === 0
 *     ? { from: 0, to: 1024, kind: "data", at: 0 }
 *     : { from: 0, to: 1024, kind: "zero" }],
 * });
 * console.log((await r.read(1020, 8)).join(",")); // 9,9,9,9,0,0,0,0
 * ```
 */
export function blockReader(map: BlockMap): BlockReader {
  const { source, size, blockSize } = map;

  async function* extents(
    offset: number,
    length: number,
  ): AsyncIterable<Extent> {
    checkRange(size, offset, length);
    const end = offset + length;
    let run: Extent | undefined;
    for (let at = offset; at < end;) {
      const block = Math.floor(at / blockSize);
      const start = block * blockSize;
      const stop = Math.min(end, start + blockSize);
      for (const r of await map.lookup(block)) {
        const from = Math.max(at, start + r.from);
        const to = Math.min(stop, start + r.to);
        if (from >= to) continue;
        const where = r.kind === "data"
          ? r.at! + (from - start - r.from)
          : undefined;
        if (
          run && run.kind === r.kind && run.offset + run.length === from &&
          (where === undefined || run.fileOffset! + run.length === where)
        ) {
          run.length += to - from;
        } else {
          if (run) yield run;
          run = where === undefined
            ? { offset: from, length: to - from, kind: r.kind }
            : {
              offset: from,
              length: to - from,
              kind: r.kind,
              fileOffset: where,
            };
        }
      }
      at = stop;
    }
    if (run) yield run;
  }

  async function readInto(offset: number, into: Uint8Array): Promise<void> {
    const length = into.length;
    checkRange(size, offset, length);
    const end = offset + length;
    const pending: Promise<void>[] = [];
    for (let at = offset; at < end;) {
      const block = Math.floor(at / blockSize);
      const start = block * blockSize;
      const stop = Math.min(end, start + blockSize);
      for (const r of await map.lookup(block)) {
        const from = Math.max(at, start + r.from);
        const to = Math.min(stop, start + r.to);
        if (from >= to) continue;
        const part = into.subarray(from - offset, to - offset);
        if (r.kind === "data") {
          pending.push(
            readIntoSource(source, r.at! + (from - start - r.from), part),
          );
        } else {
          if (r.kind === "unallocated") map.unallocated?.(from, to - from);
          part.fill(0);
        }
      }
      at = stop;
    }
    await Promise.all(pending);
  }

  async function read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(size, offset, length);
    // The common case (convert reads within one stored block): one read of
    // the file, returned as it is, without a copy into a fresh buffer.
    const block = Math.floor(offset / blockSize);
    const start = block * blockSize;
    if (length > 0 && offset + length <= start + blockSize) {
      const runs = await map.lookup(block);
      const r = runs.find((r) => start + r.to > offset);
      if (
        r && r.kind === "data" && start + r.from <= offset &&
        offset + length <= start + r.to
      ) {
        return await source.read(r.at! + (offset - start - r.from), length);
      }
    }
    const out = new Uint8Array(length);
    await readInto(offset, out);
    return out;
  }

  return { read, readInto, extents };
}

/**
 * The usual block: one run of `kind` over `[0, length)`.
 *
 * @param length the block's length
 * @param kind what it holds
 * @param at for `data`, where it lives in the file
 * @returns the block's runs
 *
 * @example
 * ```ts
 * import { wholeBlock } from "./_blocks.ts";
 * console.log(wholeBlock(512, "zero")); // [ { from: 0, to: 512, kind: "zero", at: undefined } ]
 * ```
 */
export function wholeBlock(
  length: number,
  kind: ExtentKind,
  at?: number,
): BlockRun[] {
  return [{ from: 0, to: length, kind, at }];
}
