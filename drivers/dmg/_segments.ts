/**
 * Segmented UDIF images (`hdiutil segment`): the first file, `NAME.dmg` or
 * `NAME.001.dmg`, holds the block tables (XML plist) and the start of the
 * data fork; `NAME.002.dmgpart`, `NAME.003.dmgpart`, ... hold the rest.
 * Every file ends with its own koly trailer:
 *
 * | koly field            | in segment k of n                                   |
 * | --------------------- | --------------------------------------------------- |
 * | RunningDataForkOffset | where its data fork starts in the data of all segments |
 * | DataForkOffset/Length | its data fork, in this file                          |
 * | SegmentNumber         | k (from 1)                                           |
 * | SegmentCount          | n                                                    |
 * | SegmentID             | the same UUID in every segment                       |
 *
 * Chunk offsets in the block tables count in the data of all segments
 * joined (each segment's fork placed at its running offset), so a chunk
 * may begin in one file and end in the next. Written from the UDIF trailer
 * description (libyal's libmodi notes) and libmirage's DMG filter, which
 * reads segmented images.
 *
 * This module is browser compatible.
 *
 * @module
 */

import {
  BackingFileError,
  ImageFormatError,
  UnsupportedError,
} from "../../streams/errors.ts";
import type { OpenOptions, Source } from "../../streams/types.ts";
import { type Koly, KOLY_SIZE, parseKoly } from "./_koly.ts";

const FORMAT = "dmg";

/** The most segments an image may have (names carry three digits). */
export const MAX_SEGMENTS = 999;

/** One file of a segmented image. */
export interface Segment {
  /** Its file name, as resolved beside the first. */
  name: string;
  source: Source;
  /** Its koly fields. */
  koly: Koly;
}

/**
 * The names of the other segments of the image whose first file is called
 * `firstName`: `NAME.dmg` and `NAME.001.dmg` both have `NAME.002.dmgpart`,
 * ... up to segment `count`.
 *
 * @param firstName the first file's name (a path: its last component counts)
 * @param count SegmentCount
 * @returns the names of segments 2..count, or undefined when the first file's name gives no stem
 *
 * @example
 * ```ts
 * import { segmentNames } from "./_segments.ts";
 * console.log(segmentNames("dir/disk.001.dmg", 3)); // [ "disk.002.dmgpart", "disk.003.dmgpart" ]
 * ```
 */
export function segmentNames(
  firstName: string,
  count: number,
): string[] | undefined {
  const base = firstName.slice(firstName.lastIndexOf("/") + 1);
  const stem = /^(.+)\.001\.dmg$/i.exec(base)?.[1] ??
    /^(.+)\.dmg$/i.exec(base)?.[1];
  if (stem === undefined) return undefined;
  return Array.from(
    { length: count - 1 },
    (_, i) => `${stem}.${String(i + 2).padStart(3, "0")}.dmgpart`,
  );
}

/**
 * Refuses a later segment opened on its own (its trailer has no block
 * tables): the first segment is the image.
 *
 * @param koly the file's trailer
 * @param file its name
 *
 * @example
 * ```ts ignore
 * refuseLaterSegment(koly, source.name);
 * ```
 */
export function refuseLaterSegment(koly: Koly, file?: string): void {
  if (koly.segmentCount > 1 && koly.segmentNumber !== 1) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "koly.SegmentNumber",
        value: koly.segmentNumber,
        offset: koly.offset + 56,
        file,
      },
      `this file is segment ${koly.segmentNumber} of ${koly.segmentCount} of a segmented dmg: open the first segment (NAME.dmg or NAME.001.dmg), which finds the others`,
    );
  }
}

/**
 * Opens and checks the other segments of a segmented image (through
 * `options.resolveFile`, the same policy as vmdk extent files: beside the
 * first file, never outside its folder) and returns the data of all
 * segments as one source, in the first file's offsets: byte
 * `DataForkOffset + r` of it is byte `r` of the joined data forks. A
 * missing part, a part of another image (SegmentID), out of order
 * (SegmentNumber) or not contiguous (RunningDataForkOffset) is an error
 * naming the file.
 *
 * @param first the first segment
 * @param koly its trailer
 * @param options the open's options (`resolveFile` finds the parts)
 * @returns the joined data and the segments
 *
 * @example
 * ```ts ignore
 * const { data, segments } = await joinSegments(source, koly, options);
 * ```
 */
export async function joinSegments(
  first: Source,
  koly: Koly,
  options: OpenOptions,
): Promise<{ data: Source; segments: Segment[] }> {
  const file = first.name;
  const count = koly.segmentCount;
  const at = koly.offset;
  const fail = (
    field: string,
    value: unknown,
    limit: string,
    offset?: number,
    where = file,
  ) =>
    new ImageFormatError({
      format: FORMAT,
      field,
      value,
      limit,
      offset,
      file: where,
    });
  refuseLaterSegment(koly, file);
  if (count > MAX_SEGMENTS) {
    throw fail("koly.SegmentCount", count, `at most ${MAX_SEGMENTS}`, at + 60);
  }
  if (koly.runningDataForkOffset !== 0) {
    throw fail(
      "koly.RunningDataForkOffset",
      koly.runningDataForkOffset,
      "0 in the first segment",
      at + 16,
    );
  }
  const names = file === undefined ? undefined : segmentNames(file, count);
  if (!options.resolveFile || !names) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "koly.SegmentCount",
        value: count,
        offset: at + 60,
        file,
      },
      `a segmented dmg (${count} segments) needs its other files, NAME.002.dmgpart and on, beside its first, ${
        !names
          ? `named NAME.dmg or NAME.001.dmg (not ${JSON.stringify(file ?? "")})`
          : "found through OpenOptions.resolveFile (the command line finds them beside it)"
      }`,
    );
  }
  const segments: Segment[] = [{ name: file!, source: first, koly }];
  try {
    let running = koly.dataForkLength;
    for (let k = 2; k <= count; k++) {
      const name = names[k - 2];
      let source: Source;
      try {
        source = await options.resolveFile(name, file);
      } catch (e) {
        if (e instanceof BackingFileError) throw e;
        throw new ImageFormatError(
          {
            format: FORMAT,
            field: `segment ${k} of ${count}`,
            value: name,
            file,
          },
          `segment ${k} of ${count}, ${name}, cannot be opened beside ${file}: ${
            (e as Error)?.message ?? e
          }`,
        );
      }
      segments.push({ name, source, koly });
      if (source.size < KOLY_SIZE) {
        throw fail(
          "file size",
          source.size,
          `at least ${KOLY_SIZE} bytes (its koly trailer): ${name} is not segment ${k} of ${file}`,
          0,
          name,
        );
      }
      const kolyAt = source.size - KOLY_SIZE;
      const part = parseKoly(
        await source.read(kolyAt, KOLY_SIZE),
        kolyAt,
        source.size,
        name,
      );
      segments[k - 1].koly = part;
      const foreign = (
        field: string,
        value: unknown,
        expected: string,
        offset: number,
      ) =>
        fail(
          field,
          value,
          `${expected}: ${name} is not segment ${k} of ${count} of ${file} (a part of another image, or misnamed)`,
          kolyAt + offset,
          name,
        );
      if (part.segmentId !== koly.segmentId) {
        throw foreign("koly.SegmentID", part.segmentId, koly.segmentId, 64);
      }
      if (part.segmentNumber !== k) {
        throw foreign("koly.SegmentNumber", part.segmentNumber, String(k), 56);
      }
      if (part.segmentCount !== count) {
        throw foreign(
          "koly.SegmentCount",
          part.segmentCount,
          String(count),
          60,
        );
      }
      if (part.runningDataForkOffset !== running) {
        throw foreign(
          "koly.RunningDataForkOffset",
          part.runningDataForkOffset,
          `${running} (where segment ${k - 1}'s data ends)`,
          16,
        );
      }
      running += part.dataForkLength;
    }
  } catch (e) {
    for (const s of segments.slice(1)) await s.source.close?.();
    throw e;
  }
  return { data: joined(first, koly, segments), segments };
}

/** The joined data forks as one source in the first file's offsets. */
function joined(first: Source, koly: Koly, segments: Segment[]): Source {
  const base = koly.dataForkOffset;
  const starts = segments.map((s) => s.koly.runningDataForkOffset);
  const total = segments.reduce((n, s) => n + s.koly.dataForkLength, 0);
  const size = base + total;
  /** The segment holding running offset `r` (binary search). */
  const find = (r: number) => {
    let lo = 0;
    let hi = segments.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if (starts[mid] <= r) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  };
  async function readInto(offset: number, into: Uint8Array): Promise<void> {
    if (offset + into.length > size) {
      throw new ImageFormatError({
        format: FORMAT,
        field: "read offset",
        value: offset,
        limit:
          `within the ${total} bytes of data of all ${segments.length} segments (${into.length} bytes wanted)`,
        file: first.name,
      });
    }
    let done = 0;
    if (offset < base) {
      // Below the data fork: the first file's own bytes.
      done = Math.min(into.length, base - offset);
      into.set(await first.read(offset, done));
    }
    while (done < into.length) {
      const r = offset + done - base;
      const s = segments[find(r)];
      const within = r - s.koly.runningDataForkOffset;
      const n = Math.min(into.length - done, s.koly.dataForkLength - within);
      const bytes = await s.source.read(s.koly.dataForkOffset + within, n);
      into.set(bytes, done);
      done += n;
    }
  }
  return {
    size,
    name: first.name,
    async read(offset, length) {
      const out = new Uint8Array(length);
      await readInto(offset, out);
      return out;
    },
    readInto,
    async close() {
      for (const s of segments) await s.source.close?.();
    },
  };
}
