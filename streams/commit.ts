/**
 * `commitTo(top, base)`: copies what an overlay holds into the image below
 * it, as QEMU's `bdrv_commit` (`qemu-img commit`) does.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { isZero } from "../drivers/_binary.ts";
import type { OverlayImage } from "./overlay.ts";
import type { Image, Sink } from "./types.ts";

/** Options for {@linkcode commitTo}. */
export interface CommitOptions {
  /** Called as the work advances: bytes of `top` walked so far, and its size. */
  onProgress?: (done: number, total: number) => void;
  /** Stops the work between blocks (the promise rejects with the signal's reason). */
  signal?: AbortSignal;
  /** Bytes per read and write. @default 2097152 */
  blockSize?: number;
}

/** What {@linkcode commitTo} copied. */
export interface CommitResult {
  /** Bytes of `top`'s data runs written to `base`. */
  dataBytes: number;
  /** Bytes of `top`'s zero runs that `base` did not already read as zeros, written as zeros. */
  zeroBytes: number;
}

/**
 * Copies every allocated run of `top`'s own layer into `base`: `data` runs
 * as their bytes, `zero` runs as zeros (skipped where `base`, when it can be
 * read, already reads as zeros); `unallocated` runs are left alone.
 * Afterwards the chain `top` over `base` reads exactly as before, and `base`
 * alone reads as the chain did. `top` is only read and is not emptied
 * (see the CLI's `commit` for how that differs from `qemu-img commit`).
 *
 * When `top` is an `overlay` chain or a `snapshot`
 * view, its top layer (its `top`) is what is committed. `base` is a writable Image (opened through its format, so a
 * vmdk or VHD base allocates as it should) or any Sink (a raw file), and is
 * flushed at the end.
 *
 * Crash guarantees: `top` is never written, so an interrupted commit (an
 * error, an abort, a killed process) leaves the overlay intact and the chain
 * reading as before; `base` alone may then be half-updated, so do not use it
 * on its own until the commit has been run again to completion, which
 * rewrites every run and ends in the same bytes. Where `base`'s format
 * allocates by appending (vmdk, VHD) an interrupted run can leave unused
 * space at its end, never wrong bytes.
 *
 * @param top the overlay (its own layer alone, or an overlay chain)
 * @param base the image below it, writable, or a Sink
 * @param options progress, cancellation, block size
 * @returns how many bytes were copied
 *
 * @example
 * ```ts
 * import { commitTo, fromBytes, memorySink, open, snapshot } from "../mod.ts";
 * const base = memorySink(new Uint8Array(8192));
 * const top = snapshot(await open(fromBytes(new Uint8Array(8192))), {
 *   clusterSize: 4096,
 * });
 * await top.write(5000, new Uint8Array([7]));
 * const result = await commitTo(top, base);
 * console.log(result.dataBytes, base.bytes()[5000]); // 4096 7: one cluster
 * ```
 */
export async function commitTo(
  top: Image,
  base: Image | Sink,
  options: CommitOptions = {},
): Promise<CommitResult> {
  const layer = (top as Partial<OverlayImage>).top ?? top;
  const blockSize = options.blockSize ?? 2 << 20;
  if (!Number.isSafeInteger(blockSize) || blockSize < 512) {
    throw new RangeError(`commit blockSize ${blockSize} must be at least 512`);
  }
  if (!base.write) {
    throw new TypeError(
      `commit: the base ${
        (base as Image).name ?? ""
      } is not writable (open it with writable: true)`,
    );
  }
  const baseSize = (base as Partial<Image>).size;
  const baseRead = (base as Partial<Image>).read?.bind(base);
  const result: CommitResult = { dataBytes: 0, zeroBytes: 0 };
  const total = layer.size;
  const report = (done: number) => options.onProgress?.(done, total);
  let zeros: Uint8Array | undefined;
  report(0);
  for await (const run of layer.extents(0, layer.size)) {
    if (run.kind === "unallocated") {
      report(run.offset + run.length);
      continue;
    }
    const end = run.offset + run.length;
    if (baseSize !== undefined && end > baseSize) {
      throw new RangeError(
        `commit: ${
          top.name ?? "the top"
        } holds data at ${run.offset}..${end}, past the end of the base (${baseSize} bytes); the base cannot be grown`,
      );
    }
    for (let at = run.offset; at < end;) {
      options.signal?.throwIfAborted();
      const next = Math.min(end, (Math.floor(at / blockSize) + 1) * blockSize);
      const length = next - at;
      if (run.kind === "data") {
        await base.write(at, await layer.read(at, length));
        result.dataBytes += length;
      } else if (!baseRead || !isZero(await baseRead(at, length))) {
        if (!zeros || zeros.length < length) zeros = new Uint8Array(blockSize);
        await base.write(at, zeros.subarray(0, length));
        result.zeroBytes += length;
      }
      at = next;
      report(at);
    }
  }
  await base.flush?.();
  return result;
}
