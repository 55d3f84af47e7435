/**
 * A coarse allocation map for the writers: a raw disk in a local file
 * mapped by the file system's data ranges and holes (`SEEK_DATA` /
 * `SEEK_HOLE`), without reading a byte. Raw's own map reads every byte
 * to find 4 KiB zero blocks, and an encoder then reads the data again
 * to write it: `convert -O vhdx` of the bench's 1 GiB disk read it twice,
 * holes included. A writer that checks the bytes it reads for zeros
 * itself (qcow2's clusters, vhdx's blocks) gets the same allocation from
 * this map at one read of the data only.
 *
 * This module is browser compatible (it only asks the source underneath
 * whether it can say; `streams/file.ts` answers on Linux).
 *
 * @module
 */

import {
  type DataRangeSource,
  type Extent,
  piecesOf,
  type Source,
  windowBase,
} from "./types.ts";

/**
 * The file-system map of `source` when it is a raw disk over a local file
 * (through windows), else undefined: `[offset, offset + length)` as `data`
 * runs (the file's data ranges, which may hold zeros) and `zero` runs (its
 * holes), or undefined where the file cannot say.
 *
 * @param source what a writer reads
 * @returns the map, or undefined when `source` is not a raw local file
 *
 * @example
 * ```ts
 * import { fromBytes, open } from "../mod.ts";
 * import { fileMapOf } from "./_file_map.ts";
 * const image = await open(fromBytes(new Uint8Array(512)), { format: "raw" });
 * console.log(fileMapOf(image)); // undefined: bytes in memory, no file
 * ```
 */
export function fileMapOf(
  source: Source,
):
  | ((offset: number, length: number) => Promise<Extent[] | undefined>)
  | undefined {
  const own = (source as { fileMap?: ReturnType<typeof fileMapOf> }).fileMap;
  if (own) return own;
  if ((source as { format?: string }).format !== "raw") return undefined;
  // A small disk is read for its map as before: the first query loads the
  // kernel copier's module and opens libc (1.4 ms of wall, 2 ms of CPU),
  // more than reading a MiB or two costs.
  if (source.size < FILE_MAP_MIN) return undefined;
  const base = windowBase(source);
  const file = base?.source as DataRangeSource | undefined;
  if (!file?.dataRanges) return undefined;
  const shift = base!.shift;
  const ranges = file.dataRanges.bind(file);
  // The file's ranges over a window at a time: each query costs system
  // calls (lseek pairs, and finding the descriptor), and the writers ask
  // for every 4 MiB chunk.
  let window: { start: number; end: number; found: [number, number][] } = {
    start: 0,
    end: 0,
    found: [],
  };
  const map = async (offset: number, length: number) => {
    const start = offset + shift;
    const end = start + length;
    if (start < window.start || end > window.end) {
      const to = Math.max(
        end,
        Math.min(start + MAP_WINDOW, source.size + shift),
      );
      const found = await ranges(start, to - start);
      if (!found) return undefined;
      window = { start, end: to, found };
    }
    const found = window.found;
    // The first range that ends past `start`.
    let lo = 0;
    for (let hi = found.length; lo < hi;) {
      const mid = (lo + hi) >>> 1;
      if (found[mid][1] <= start) lo = mid + 1;
      else hi = mid;
    }
    const inside: [number, number][] = [];
    for (let i = lo; i < found.length && found[i][0] < end; i++) {
      const from = Math.max(start, found[i][0]);
      const to = Math.min(end, found[i][1]);
      if (to > from) inside.push([from, to]);
    }
    return [...piecesOf(start, length, inside)].map((
      [from, to, data],
    ): Extent => ({
      offset: from - shift,
      length: to - from,
      kind: data ? "data" : "zero",
    }));
  };
  return map;
}

/** Raw disks smaller than this are not mapped by the file system (see `fileMapOf`). */
const FILE_MAP_MIN = 2 << 20;

/** Bytes of a file whose data ranges are asked for at once (a window). */
const MAP_WINDOW = 256 << 20;
