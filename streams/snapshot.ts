/**
 * `snapshot(image)`: QEMU's `-snapshot` mode. Writes land in a layer in
 * memory; the image underneath is never written.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { checkRange, type Extent, extentsOf, type Image } from "./types.ts";

/** Options for {@linkcode snapshot}. */
export interface SnapshotOptions {
  /**
   * Granularity of the in-memory layer in bytes: a power of two, at least
   * 512. A write to part of a cluster copies the rest of it from the image
   * first. @default 65536
   */
  clusterSize?: number;
}

/** The image {@linkcode snapshot} returns: the view, and what it holds. */
export interface SnapshotImage extends Image {
  /** Writes to the in-memory layer; the image underneath is never written. */
  write(offset: number, bytes: Uint8Array): Promise<void>;
  /** Does nothing: the layer lives in memory. */
  flush(): Promise<void>;
  /**
   * The in-memory layer alone: what was written, as `data`, the rest
   * `unallocated` (reading as zeros). {@linkcode commitTo} commits only
   * this, as QEMU's `commit` does in snapshot mode.
   */
  readonly top: Image;
  /** The image underneath. */
  readonly backing: Image;
  /** Bytes the in-memory layer holds (whole clusters). */
  readonly layerBytes: number;
  /** Drops every write: the view reads as the image again. */
  discard(): void;
  /** Drops the layer and closes the image underneath. */
  close(): Promise<void>;
}

/**
 * A writable view of `image` whose writes live in memory, sparse, one
 * cluster at a time: reads see them, the allocation map reports them as
 * `data`, and `image` itself is only read (it may be opened read-only).
 * Closing the view closes `image`. Memory grows with what is written, not
 * with the image's size.
 *
 * @param image what to read through (any Image, a chain too)
 * @param options the in-memory layer's cluster size
 * @returns the writable view
 *
 * @example
 * ```ts
 * import { fromBytes, open, snapshot } from "../mod.ts";
 * const bytes = new Uint8Array(4096);
 * const view = snapshot(await open(fromBytes(bytes)));
 * await view.write(10, new Uint8Array([1, 2, 3]));
 * console.log((await view.read(10, 3)).join(","), bytes[10]); // 1,2,3 0
 * ```
 */
export function snapshot(
  image: Image,
  options: SnapshotOptions = {},
): SnapshotImage {
  const clusterSize = options.clusterSize ?? 65536;
  if (
    !Number.isSafeInteger(clusterSize) || clusterSize < 512 ||
    (clusterSize & (clusterSize - 1)) !== 0 || clusterSize > 1 << 30
  ) {
    throw new RangeError(
      `snapshot clusterSize ${clusterSize} must be a power of two from 512 to 2^30`,
    );
  }
  const size = image.size;
  /** Cluster index to its bytes (the last cluster may be shorter). */
  const clusters = new Map<number, Uint8Array>();
  /** The indexes of `clusters`, sorted, for range walks. */
  let order: number[] = [];
  let layerBytes = 0;

  /** The first position in `order` whose index is >= `cluster`. */
  const firstAtOrAfter = (cluster: number) => {
    let lo = 0;
    let hi = order.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (order[mid] < cluster) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };

  /**
   * `[offset, offset + length)` split into runs held in memory (`held`) and
   * runs left to `image`, in order.
   */
  function* pieces(offset: number, length: number) {
    const end = offset + length;
    let at = offset;
    for (
      let i = firstAtOrAfter(Math.floor(offset / clusterSize));
      i < order.length && order[i] * clusterSize < end;
      i++
    ) {
      const start = Math.max(offset, order[i] * clusterSize);
      if (start > at) yield { offset: at, length: start - at, held: false };
      // Consecutive clusters merge into one run.
      let stop = Math.min(end, (order[i] + 1) * clusterSize);
      while (
        i + 1 < order.length && order[i + 1] === order[i] + 1 &&
        stop < end
      ) {
        i++;
        stop = Math.min(end, (order[i] + 1) * clusterSize);
      }
      yield { offset: start, length: stop - start, held: true };
      at = stop;
    }
    if (at < end) yield { offset: at, length: end - at, held: false };
  }

  async function read(offset: number, length: number) {
    checkRange(size, offset, length);
    const out = new Uint8Array(length);
    const pending: Promise<void>[] = [];
    for (const piece of pieces(offset, length)) {
      const into = piece.offset - offset;
      if (!piece.held) {
        pending.push(
          image.read(piece.offset, piece.length).then((b) => out.set(b, into)),
        );
        continue;
      }
      for (let at = piece.offset; at < piece.offset + piece.length;) {
        const cluster = Math.floor(at / clusterSize);
        const from = at - cluster * clusterSize;
        const n = Math.min(
          piece.offset + piece.length - at,
          clusterSize - from,
        );
        out.set(
          clusters.get(cluster)!.subarray(from, from + n),
          at - offset,
        );
        at += n;
      }
    }
    await Promise.all(pending);
    return out;
  }

  async function* extents(
    offset: number,
    length: number,
  ): AsyncIterable<Extent> {
    checkRange(size, offset, length);
    for (const piece of pieces(offset, length)) {
      if (piece.held) {
        yield { offset: piece.offset, length: piece.length, kind: "data" };
      } else {
        yield* extentsOf(image, piece.offset, piece.length);
      }
    }
  }

  const layer: Image = {
    format: "snapshot",
    size,
    name: image.name,
    encrypted: false,
    async read(offset, length) {
      checkRange(size, offset, length);
      const out = new Uint8Array(length);
      for (const piece of pieces(offset, length)) {
        if (piece.held) {
          out.set(
            await read(piece.offset, piece.length),
            piece.offset - offset,
          );
        }
      }
      return out;
    },
    async *extents(offset, length) {
      checkRange(size, offset, length);
      for (const piece of pieces(offset, length)) {
        yield {
          offset: piece.offset,
          length: piece.length,
          kind: piece.held ? "data" : "unallocated",
        };
      }
    },
  };

  async function write(offset: number, bytes: Uint8Array) {
    checkRange(size, offset, bytes.length);
    const end = offset + bytes.length;
    const added: number[] = [];
    for (let at = offset; at < end;) {
      const cluster = Math.floor(at / clusterSize);
      const start = cluster * clusterSize;
      const from = at - start;
      const n = Math.min(end - at, clusterSize - from);
      let held = clusters.get(cluster);
      if (!held) {
        const length = Math.min(clusterSize, size - start);
        // A whole cluster written needs nothing from the image.
        held = n === length
          ? new Uint8Array(length)
          : await read(start, length);
        clusters.set(cluster, held);
        layerBytes += length;
        added.push(cluster);
      }
      held.set(bytes.subarray(at - offset, at - offset + n), from);
      at += n;
    }
    if (added.length === 0) return;
    // Writes mostly move forward: appending keeps `order` sorted then.
    if (order.length === 0 || added[0] > order[order.length - 1]) {
      for (const c of added) order.push(c);
    } else {
      order = [...order, ...added].sort((a, b) => a - b);
    }
  }

  return {
    format: image.format,
    size,
    name: image.name,
    backingFile: image.backingFile,
    backingFormat: image.backingFormat,
    top: layer,
    backing: image,
    get encrypted() {
      return image.encrypted;
    },
    geometry: image.geometry,
    details: image.details,
    read,
    extents,
    write,
    flush: () => Promise.resolve(),
    get layerBytes() {
      return layerBytes;
    },
    discard() {
      clusters.clear();
      order = [];
      layerBytes = 0;
    },
    close: async () => {
      clusters.clear();
      order = [];
      await image.close?.();
    },
  };
}
