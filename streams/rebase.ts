/**
 * `rebase(top, oldBacking, newBacking)`: the data half of `qemu-img
 * rebase`, which keeps what an overlay reads as while its backing file
 * changes.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { extentsOf, type Image, type Source } from "./types.ts";

/** Options for {@linkcode rebase}. */
export interface RebaseOptions {
  /**
   * The unit compared and copied, aligned to the disk: the overlay's
   * cluster size, so that whole clusters are written. @default the
   * image's `details.clusterSize`, or 65536
   */
  granule?: number;
  /** Called as the work advances: bytes of the disk done, and the total. */
  onProgress?: (done: number, total: number) => void;
  /** Stops the work (the promise rejects with the signal's reason). */
  signal?: AbortSignal;
}

/** What {@linkcode rebase} did. */
export interface RebaseResult {
  /** Bytes copied from the old backing disk into the overlay. */
  copiedBytes: number;
}

/**
 * Copies into `top` (a writable overlay layer, alone) every granule it
 * does not hold whose bytes differ between `oldBacking` and `newBacking`
 * (`undefined`: no backing disk, zeros; past a backing disk's end, zeros
 * too), so that once the header names the new backing file `top` reads
 * as it did. With `newBacking` undefined this flattens what `top` reads
 * from `oldBacking` into it. The header itself is the driver's
 * `setBackingFile`, done after this.
 *
 * @param top the overlay's own layer, opened writable
 * @param oldBacking the disk it reads through now (undefined: none)
 * @param newBacking the disk it will read through (undefined: none)
 * @param options granule, progress, cancellation
 * @returns the bytes copied
 *
 * @example
 * ```ts
 * import { fromBytes, memorySink, open, qcow, rebase } from "../mod.ts";
 * const top = await qcow.create!(memorySink(), { size: 8192, backingFile: "old" });
 * const old = fromBytes(new Uint8Array(8192).fill(1));
 * const result = await rebase(top, old, undefined);
 * console.log(result.copiedBytes, (await top.read(100, 1))[0]); // 8192 1
 * ```
 */
export async function rebase(
  top: Image,
  oldBacking: Source | undefined,
  newBacking: Source | undefined,
  options: RebaseOptions = {},
): Promise<RebaseResult> {
  if (!top.write) throw new Error(`${top.format}: the image is not writable`);
  const granule = options.granule ??
    (typeof top.details?.clusterSize === "number"
      ? top.details.clusterSize as number
      : 65536);
  const total = top.size;
  const step = Math.max(granule, Math.floor((1 << 20) / granule) * granule);
  const readOr = async (from: Source | undefined, at: number, n: number) => {
    const bytes = new Uint8Array(n);
    if (!from) return bytes;
    const inside = Math.max(0, Math.min(at + n, from.size) - at);
    if (inside > 0) bytes.set(await from.read(at, inside));
    return bytes;
  };
  let copiedBytes = 0;
  options.onProgress?.(0, total);
  for await (const run of extentsOf(top, 0, total)) {
    if (run.kind !== "unallocated") continue;
    // Compared granule by granule (aligned to the disk), but only inside
    // the run: a granule may hold bytes of the overlay's own (formats that
    // allocate by sector), which must not be written over.
    const end = run.offset + run.length;
    for (let at = run.offset; at < end;) {
      options.signal?.throwIfAborted();
      const stop = Math.min(end, Math.floor(at / granule) * granule + step);
      const n = stop - at;
      const before = await readOr(oldBacking, at, n);
      const after = await readOr(newBacking, at, n);
      for (let g = 0; g < n;) {
        const e = Math.min(
          n,
          (Math.floor((at + g) / granule) + 1) * granule - at,
        );
        let differs = false;
        for (let k = g; k < e; k++) {
          if (before[k] !== after[k]) {
            differs = true;
            break;
          }
        }
        if (differs) {
          await top.write(at + g, before.slice(g, e));
          copiedBytes += e - g;
        }
        g = e;
      }
      at = stop;
      options.onProgress?.(at, total);
    }
  }
  await top.flush?.();
  options.onProgress?.(total, total);
  return { copiedBytes };
}
