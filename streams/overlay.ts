/**
 * `overlay(top, base)`: a backing-file chain. Reads fall through the
 * unallocated runs of `top` to `base`; writes go to `top`.
 *
 * This module is browser compatible.
 *
 * @module
 */

import type { Extent, Image, Source } from "./types.ts";
import { checkRange, extentsOf } from "./types.ts";

/**
 * Stacks `top` on `base`. The result reports `top`'s format and metadata,
 * with `backing` set to `base`; its allocation map merges both layers (runs
 * unallocated in `top` take `base`'s kind; past `base`'s end they read as
 * zeros).
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
export function overlay(top: Image, base: Source): Image {
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
    read,
    extents,
    write: top.write?.bind(top),
    flush: top.flush?.bind(top),
    async close() {
      await top.close?.();
      await base.close?.();
    },
  };
}
