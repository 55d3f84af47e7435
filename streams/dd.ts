/**
 * `ddSource(source, options)`: the part of a disk `qemu-img dd` copies
 * (`bs=`, `count=`, `skip=`), as a source to convert.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { checkRange, type Extent, extentsOf, type Source } from "./types.ts";

/** Options for {@linkcode ddSource}: qemu-img dd's operands. */
export interface DdOptions {
  /** Block size in bytes (`bs=`), from 1 to 2^31 - 1. @default 512 */
  blockSize?: number;
  /**
   * Blocks to copy (`count=`). As qemu-img counts them, from the start of
   * the input: `skip` blocks of them are then left out. @default all
   */
  count?: number;
  /** Blocks of the input left out at its start (`skip=`). @default 0 */
  skip?: number;
}

/**
 * The bytes `[offset, offset + length)` of `source` as a source of
 * `size` bytes (at least `length`): what lies past `length` reads as
 * zeros.
 *
 * @param source the whole disk
 * @param offset where the window starts
 * @param length how many bytes of `source` it shows
 * @param size its size (zeros past `length`) @default length
 * @returns the window
 *
 * @example
 * ```ts
 * import { fromBytes, slice } from "../mod.ts";
 * const part = slice(fromBytes(new Uint8Array([1, 2, 3, 4])), 1, 2, 4);
 * console.log(await part.read(0, 4)); // Uint8Array(4) [ 2, 3, 0, 0 ]
 * ```
 */
export function slice(
  source: Source,
  offset: number,
  length: number,
  size = length,
): Source {
  checkRange(source.size, offset, length);
  if (!Number.isSafeInteger(size) || size < length) {
    throw new RangeError(
      `slice size ${size} is less than its length ${length}`,
    );
  }
  const read = async (at: number, into: Uint8Array) => {
    checkRange(size, at, into.length);
    const inside = Math.max(0, Math.min(into.length, length - at));
    if (inside > 0) {
      const part = into.subarray(0, inside);
      if (source.readInto) await source.readInto(offset + at, part);
      else part.set(await source.read(offset + at, inside));
    }
    into.fill(0, inside);
  };
  return {
    size,
    name: source.name,
    async read(at, n) {
      const into = new Uint8Array(n);
      await read(at, into);
      return into;
    },
    readInto: read,
    async *extents(at: number, n: number): AsyncIterable<Extent> {
      checkRange(size, at, n);
      const inside = Math.max(0, Math.min(at + n, length) - at);
      if (inside > 0) {
        for await (const e of extentsOf(source, offset + at, inside)) {
          yield { offset: e.offset - offset, length: e.length, kind: e.kind };
        }
      }
      if (inside < n) {
        yield { offset: at + inside, length: n - inside, kind: "zero" };
      }
    },
  };
}

/**
 * What `qemu-img dd` writes from `source`: `count` blocks of `blockSize`
 * from its start (all of it when fewer), less the first `skip` blocks,
 * padded with zeros to a whole 512-byte sector as qemu-img's output is.
 * A `skip` past the end is a `RangeError` ("cannot skip to specified
 * offset").
 *
 * @param source the input disk
 * @param options bs, count, skip
 * @returns the output disk's bytes, to convert
 *
 * @example
 * ```ts
 * import { ddSource, fromBytes } from "../mod.ts";
 * const disk = fromBytes(new Uint8Array(4096).fill(1));
 * const out = ddSource(disk, { blockSize: 1000, count: 3, skip: 1 });
 * console.log(out.size); // 2048
 * ```
 */
export function ddSource(source: Source, options: DdOptions = {}): Source {
  const bs = options.blockSize ?? 512;
  if (!Number.isSafeInteger(bs) || bs < 1 || bs > 0x7fffffff) {
    throw new RangeError(
      `Invalid bs specified (${bs}). Must be between 1 and 2147483647.`,
    );
  }
  let size = source.size;
  if (options.count !== undefined && options.count * bs < size) {
    size = options.count * bs;
  }
  const skip = (options.skip ?? 0) * bs;
  if (!Number.isSafeInteger(skip) || skip > size) {
    throw new RangeError(
      `${source.name ?? "the input"}: cannot skip to specified offset`,
    );
  }
  const length = size - skip;
  return slice(source, skip, length, Math.ceil(length / 512) * 512);
}
