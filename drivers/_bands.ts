/**
 * The reading half that images made of fixed-size bands share (Apple's
 * sparseimage, sparsebundle and ASIF): the virtual disk is cut into bands
 * of one size, each stored somewhere or not at all. A driver says where a
 * band is; this module turns that into `read`, `readInto` and `extents`.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { checkRange, type Extent, type ExtentKind } from "../streams/types.ts";

/** Where a band's bytes are: how to read them, or that it is a hole. */
export type BandPlace =
  /** Stored: `read(offsetInBand, into)` fills `into` from the band. */
  | { read(offsetInBand: number, into: Uint8Array): Promise<void> }
  /**
   * Not stored, and neither are the bands after it up to (not including)
   * band `holeUntil`: one lookup covers a long run of holes.
   */
  | { holeUntil: number };

/** What a banded image is. */
export interface Bands {
  /** The virtual disk's size in bytes. */
  size: number;
  /** Bytes per band (the last band may be cut short by `size`). */
  bandSize: number;
  /** Where band `index` is (it may load a table first). */
  place(index: number): BandPlace | Promise<BandPlace>;
  /** What a hole is in the allocation map. */
  hole: ExtentKind;
}

/**
 * `read`, `readInto` and `extents` over a banded image.
 *
 * @param bands the layout
 * @returns the reading methods of the image
 *
 * @example
 * ```ts
 * import { bandReader } from "./_bands.ts";
 * const stored = new Uint8Array(4).fill(7);
 * const r = bandReader({
 *   size: 8,
 *   bandSize: 4,
 *   hole: "zero",
 *   place: (i) =>
 *     i === 1
 *       ? { read: async (at, into) => into.set(stored.subarray(at, at + into.length)) }
 *       : { holeUntil: 1 },
 * });
 * console.log(await r.read(2, 4)); // Uint8Array(4) [ 0, 0, 7, 7 ]
 * ```
 */
export function bandReader(bands: Bands): {
  read(offset: number, length: number): Promise<Uint8Array>;
  readInto(offset: number, into: Uint8Array): Promise<void>;
  extents(offset: number, length: number): AsyncIterable<Extent>;
} {
  const { size, bandSize, hole } = bands;

  async function readInto(offset: number, into: Uint8Array): Promise<void> {
    checkRange(size, offset, into.length);
    const end = offset + into.length;
    const pending: Promise<void>[] = [];
    for (let at = offset; at < end;) {
      const band = Math.floor(at / bandSize);
      const place = await bands.place(band);
      if ("holeUntil" in place) {
        const stop = Math.min(
          end,
          Math.max(band + 1, place.holeUntil) * bandSize,
        );
        into.fill(0, at - offset, stop - offset);
        at = stop;
        continue;
      }
      const stop = Math.min(end, (band + 1) * bandSize);
      pending.push(
        place.read(
          at - band * bandSize,
          into.subarray(at - offset, stop - offset),
        ),
      );
      at = stop;
    }
    await Promise.all(pending);
  }

  async function* extents(
    offset: number,
    length: number,
  ): AsyncIterable<Extent> {
    checkRange(size, offset, length);
    const end = offset + length;
    let run: Extent | undefined;
    for (let at = offset; at < end;) {
      const band = Math.floor(at / bandSize);
      const place = await bands.place(band);
      const kind: ExtentKind = "holeUntil" in place ? hole : "data";
      const bandsCovered = "holeUntil" in place
        ? Math.max(band + 1, place.holeUntil)
        : band + 1;
      const stop = Math.min(end, bandsCovered * bandSize);
      if (run && run.kind === kind) {
        run.length += stop - at;
      } else {
        if (run) yield run;
        run = { offset: at, length: stop - at, kind };
      }
      at = stop;
    }
    if (run) yield run;
  }

  return {
    readInto,
    async read(offset, length) {
      checkRange(size, offset, length);
      const out = new Uint8Array(length);
      await readInto(offset, out);
      return out;
    },
    extents,
  };
}

/**
 * The first entry of the sorted `present` above `index`, or `fallback`:
 * where a run of holes starting at `index` ends.
 *
 * @example
 * ```ts
 * import { nextPresent } from "./_bands.ts";
 * console.log(nextPresent([2, 5, 9], 3, 100)); // 5
 * ```
 */
export function nextPresent(
  present: readonly number[],
  index: number,
  fallback: number,
): number {
  let lo = 0;
  let hi = present.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (present[mid] <= index) lo = mid + 1;
    else hi = mid;
  }
  return lo < present.length ? present[lo] : fallback;
}
