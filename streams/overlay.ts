/**
 * `overlay(top, base)`: a backing-file chain. Reads fall through the
 * unallocated runs of `top` to `base`; writes go to `top`, copying from
 * `base` the rest of any sector or cluster they allocate.
 *
 * This module is browser compatible.
 *
 * @module
 */

import type { Extent, Image, Source } from "./types.ts";
import { checkRange, extentsOf } from "./types.ts";

/** An {@linkcode overlay}'s result: the chain, with its top layer at hand. */
export interface OverlayImage extends Image {
  /** The top layer alone (its `extents` are its own allocation map). */
  readonly top: Image;
  /** The image below. */
  readonly backing: Image;
}

const SECTOR = 512;

/**
 * How far around a write the overlay looks for clusters the write allocated
 * in `top` (grains, clusters): the parts of them outside the write are filled
 * from `base`, as QEMU's copy-on-write does. Clusters up to this size are
 * covered (QEMU writes 64 KiB vmdk grains and qcow clusters, 2 MiB qcow2 at
 * most).
 */
const COW_WINDOW = 4 << 20;

/**
 * Stacks `top` on `base`. The result reports `top`'s format and metadata,
 * with `backing` set to `base`; its allocation map merges both layers (runs
 * unallocated in `top` take `base`'s kind; past `base`'s end they read as
 * zeros).
 *
 * When `top` is writable, so is the chain: a write is widened to whole
 * 512-byte sectors with the chain's bytes, and where it makes `top`
 * allocate a whole cluster (a vmdk grain, a qcow cluster) the parts of that
 * cluster it did not cover are copied from `base`, so the chain reads the
 * same everywhere but where it was written.
 *
 * @param top the overlay (a qcow, cow, vmdk with a parent...)
 * @param base what the overlay's unallocated runs read from
 * @returns an Image reading the chain
 *
 * @example
 * ```ts
 * import { fromBytes, open, overlay } from "../mod.ts";
 * const base = await open(fromBytes(new Uint8Array(1024).fill(7)));
 * const top = await open(fromBytes(new Uint8Array(1024)));
 * const chain = overlay(top, base);
 * console.log((await chain.read(0, 1))[0]); // 0: raw has every byte
 * ```
 */
export function overlay(top: Image, base: Source): OverlayImage {
  const baseExtents = (offset: number, length: number) => {
    const inside = Math.max(0, Math.min(length, base.size - offset));
    return inside > 0 ? extentsOf(base, offset, inside) : undefined;
  };
  async function* extents(offset: number, length: number) {
    checkRange(top.size, offset, length);
    for await (const run of top.extents(offset, length)) {
      if (run.kind !== "unallocated") {
        yield run;
        continue;
      }
      const below = baseExtents(run.offset, run.length);
      let covered = run.offset;
      if (below) {
        for await (const b of below) {
          yield b;
          covered = b.offset + b.length;
        }
      }
      const end = run.offset + run.length;
      if (covered < end) {
        yield {
          offset: covered,
          length: end - covered,
          kind: "zero",
        } as Extent;
      }
    }
  }
  async function read(offset: number, length: number) {
    checkRange(top.size, offset, length);
    const out = new Uint8Array(length);
    const pending: Promise<void>[] = [];
    for await (const run of top.extents(offset, length)) {
      const at = run.offset - offset;
      if (run.kind === "data") {
        pending.push(
          top.read(run.offset, run.length).then((b) => out.set(b, at)),
        );
      } else if (run.kind === "unallocated") {
        const inside = Math.min(run.length, base.size - run.offset);
        if (inside > 0) {
          pending.push(
            base.read(run.offset, inside).then((b) => out.set(b, at)),
          );
        }
      }
    }
    await Promise.all(pending);
    return out;
  }
  /** `top`'s unallocated runs in `[start, end)`. */
  async function holes(start: number, end: number) {
    const out: [number, number][] = [];
    for await (const run of top.extents(start, end - start)) {
      if (run.kind === "unallocated") {
        out.push([run.offset, run.offset + run.length]);
      }
    }
    return out;
  }
  async function write(offset: number, bytes: Uint8Array) {
    checkRange(top.size, offset, bytes.length);
    if (bytes.length === 0) return;
    // Whole sectors: a driver may refuse part of a sector it does not hold
    // (a VHD differencing disk), or fill the rest with zeros.
    const start = Math.floor(offset / SECTOR) * SECTOR;
    const end = Math.min(
      top.size,
      Math.ceil((offset + bytes.length) / SECTOR) * SECTOR,
    );
    let whole = bytes;
    if (start !== offset || end !== offset + bytes.length) {
      whole = new Uint8Array(end - start);
      whole.set(await read(start, Math.min(SECTOR, end - start)), 0);
      const last = Math.max(start, end - SECTOR);
      whole.set(await read(last, end - last), last - start);
      whole.set(bytes, offset - start);
    }
    const windowStart = Math.floor(start / COW_WINDOW) * COW_WINDOW;
    const windowEnd = Math.min(
      top.size,
      Math.ceil(end / COW_WINDOW) * COW_WINDOW,
    );
    const before = await holes(windowStart, windowEnd);
    await top.write!(start, whole);
    if (before.length === 0) return;
    // What was unallocated before, outside the write, and is allocated now
    // was allocated by it (with zeros): it gets base's bytes.
    const after = await holes(windowStart, windowEnd);
    const stillHole = (at: number) => after.some(([s, e]) => s <= at && at < e);
    for (const [holeStart, holeEnd] of before) {
      for (
        const [s, e] of [
          [holeStart, Math.min(holeEnd, start)],
          [Math.max(holeStart, end), holeEnd],
        ]
      ) {
        let at = s;
        while (at < e) {
          // Runs of `[s, e)` that are no longer holes, one at a time.
          if (stillHole(at)) {
            const hole = after.find(([hs, he]) => hs <= at && at < he)!;
            at = hole[1];
            continue;
          }
          const next = after.find(([hs]) => hs > at)?.[0] ?? Infinity;
          const stop = Math.min(e, next);
          const inside = Math.min(stop, base.size) - at;
          if (inside > 0) await top.write!(at, await base.read(at, inside));
          at = stop;
        }
      }
    }
  }
  return {
    format: top.format,
    get size() {
      return top.size;
    },
    name: top.name,
    backingFile: top.backingFile,
    backingFormat: top.backingFormat,
    backing: base as Image,
    get encrypted() {
      // QEMU's bdrv_is_encrypted: an encrypted base makes the chain encrypted.
      return top.encrypted || (base as Partial<Image>).encrypted === true;
    },
    geometry: top.geometry,
    details: top.details,
    top,
    read,
    extents,
    write: top.write ? write : undefined,
    flush: top.flush?.bind(top),
    async close() {
      await top.close?.();
      await base.close?.();
    },
  };
}
