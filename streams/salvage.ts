/**
 * `salvaging(source)`: a source whose unreadable parts read as zeros, each
 * one recorded with its offset and cause (`convert --salvage`).
 *
 * This module is browser compatible.
 *
 * @module
 */

import type { Extent, Source } from "./types.ts";

/** One run of a source that could not be read and reads as zeros instead. */
export interface SalvagedRun {
  /** Byte offset in the virtual disk. */
  offset: number;
  /** Length in bytes. */
  length: number;
  /** The error's message (the first one of the run). */
  cause: string;
}

/** Options for {@linkcode salvaging}. */
export interface SalvageOptions {
  /**
   * The smallest piece a failing read is split into before it is given up
   * as zeros (a sector, as qemu-img's `--salvage`). @default 512
   */
  minPiece?: number;
  /** Called with each run given up, as soon as it is known. */
  onSalvaged?: (run: SalvagedRun) => void;
  /** Errors are never salvaged once this is aborted (the abort goes through). */
  signal?: AbortSignal;
}

/** What {@linkcode salvaging} returns. */
export interface SalvagingSource extends Source {
  /** The runs read as zeros so far, in the order met, adjacent runs merged. */
  readonly salvaged: SalvagedRun[];
}

/**
 * Wraps `source` so that a read that fails is retried in halves, down to
 * `minPiece` bytes, and only the pieces that still fail read as zeros.
 * Every such run is recorded (`salvaged`, `onSalvaged`). An allocation map
 * that fails part way says "data" for the rest, whose reads are then
 * salvaged the same way. Errors are never hidden without this wrapper.
 *
 * @param source the damaged source
 * @param options the smallest piece, a callback per run, a signal
 * @returns the source, with the list of what was given up
 *
 * @example
 * ```ts
 * import { salvaging, type Source } from "../mod.ts";
 * const broken: Source = {
 *   size: 4096,
 *   read: (offset, length) =>
 *     offset < 1024 && offset + length > 512
 *       ? Promise.reject(new Error("bad sector"))
 *       : Promise.resolve(new Uint8Array(length).fill(7)),
 * };
 * const safe = salvaging(broken);
 * const bytes = await safe.read(0, 4096);
 * console.log(bytes[0], bytes[600], safe.salvaged); // 7 0 [{ offset: 512, length: 512, cause: "bad sector" }]
 * ```
 */
export function salvaging(
  source: Source,
  options: SalvageOptions = {},
): SalvagingSource {
  const minPiece = Math.max(1, options.minPiece ?? 512);
  const salvaged: SalvagedRun[] = [];
  const record = (offset: number, length: number, e: unknown) => {
    const cause = e instanceof Error ? e.message : String(e);
    const last = salvaged.at(-1);
    if (last && last.offset + last.length === offset && last.cause === cause) {
      last.length += length;
    } else {
      const run = { offset, length, cause };
      salvaged.push(run);
    }
    options.onSalvaged?.({ offset, length, cause });
  };
  const fill = async (offset: number, into: Uint8Array): Promise<void> => {
    try {
      if (source.readInto) await source.readInto(offset, into);
      else into.set(await source.read(offset, into.length));
      return;
    } catch (e) {
      if (options.signal?.aborted) throw e;
      if (into.length <= minPiece) {
        into.fill(0);
        record(offset, into.length, e);
        return;
      }
      // Halves cut at a multiple of minPiece in disk terms, so that pieces
      // stay aligned to sectors.
      const middle = offset + into.length / 2;
      let cut = Math.floor(middle / minPiece) * minPiece - offset;
      if (cut <= 0) cut = Math.min(into.length, minPiece - (offset % minPiece));
      if (cut >= into.length) {
        into.fill(0);
        record(offset, into.length, e);
        return;
      }
      await fill(offset, into.subarray(0, cut));
      await fill(offset + cut, into.subarray(cut));
    }
  };
  return {
    size: source.size,
    name: source.name,
    salvaged,
    async read(offset, length) {
      const into = new Uint8Array(length);
      await fill(offset, into);
      return into;
    },
    readInto: (offset, into) => fill(offset, into),
    extents: source.extents &&
      async function* (offset: number, length: number): AsyncIterable<Extent> {
        let at = offset;
        try {
          for await (const e of source.extents!(offset, length)) {
            yield e;
            at = e.offset + e.length;
          }
        } catch (e) {
          if (options.signal?.aborted) throw e;
          // The map is damaged from here: read the rest (salvaging reads).
          if (at < offset + length) {
            yield { offset: at, length: offset + length - at, kind: "data" };
          }
        }
      },
    close: () => source.close?.() ?? Promise.resolve(),
  };
}
