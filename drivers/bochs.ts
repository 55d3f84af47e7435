/**
 * bochs: the growing and redolog images of the Bochs emulator (bximage),
 * header versions 1 and 2, read-only.
 *
 * This module is browser compatible.
 *
 * Header (512 bytes, little-endian):
 *
 * | offset | size | field                                                |
 * | -----: | ---: | ---------------------------------------------------- |
 * |      0 |   32 | magic `Bochs Virtual HD Image` (NUL-padded)          |
 * |     32 |   16 | type `Redolog`                                       |
 * |     48 |   16 | subtype `Growing`, `Undoable` or `Volatile`          |
 * |     64 |    4 | version: 0x00020000 (v2) or 0x00010000 (v1)          |
 * |     68 |    4 | header: header size, where the catalog starts        |
 * |     72 |    4 | catalog: number of catalog entries (extents)         |
 * |     76 |    4 | bitmap: bytes of each extent's sector bitmap         |
 * |     80 |    4 | extent: bytes of data per extent                     |
 * |     84 |    4 | v2: timestamp (v1: the disk size starts here)        |
 * |     88 |    8 | v2: disk size in bytes (v1: at 84)                   |
 *
 * The catalog (`catalog` 32-bit entries at `header`) maps each extent of
 * the disk to its index among the stored extents, or 0xFFFFFFFF when none
 * is stored. Stored extent `i` begins at `header + catalog * 4 + i *
 * (bitmap blocks + extent blocks) * 512` (sizes rounded up to 512): its
 * bitmap (one bit per sector, least significant bit first) and then its
 * data. A clear bit: the sector is not stored here.
 *
 * @module
 */

import { BOCHS_MAGIC as MAGIC, probeBochs } from "./_signatures.ts";
import { cString, formatErrors, le32, le64, safeNumber } from "./_binary.ts";
import { check, ImageFormatError } from "../streams/errors.ts";
import type {
  Driver,
  Extent,
  ExtentKind,
  Image,
  OpenOptions,
  Source,
} from "../streams/types.ts";
import { checkRange } from "../streams/types.ts";

const FORMAT = "bochs";
const SECTOR = 512;
const HEADER_SIZE = 512;
const REDOLOG_TYPE = "Redolog";
const SUBTYPES = ["Growing", "Undoable", "Volatile"];
const VERSION_2 = 0x00020000;
const VERSION_1 = 0x00010000;
const UNALLOCATED = 0xffffffff;
/** QEMU's catalog limit: 1M entries (the largest bximage image, ~8 TB). */
const MAX_CATALOG = 0x100000;
/** QEMU's extent size limit: 8 MiB. */
const MAX_EXTENT = 0x800000;
/** Bitmaps kept in memory. */
const BITMAP_CACHE = 256;

/** The parsed header. */
interface Header {
  subtype: string;
  version: number;
  headerSize: number;
  catalogEntries: number;
  bitmapSize: number;
  extentSize: number;
  diskSize: number;
  timestamp?: number;
}

const fail = formatErrors(FORMAT);

/** Parses and validates the header against the file's size. */
function parseHeader(b: Uint8Array, fileSize: number): Header {
  check(cString(b, 0, 32) === MAGIC, {
    format: FORMAT,
    field: "magic",
    value: cString(b, 0, 32),
    limit: JSON.stringify(MAGIC),
    offset: 0,
  });
  check(cString(b, 32, 48) === REDOLOG_TYPE, {
    format: FORMAT,
    field: "type",
    value: cString(b, 32, 48),
    limit: JSON.stringify(REDOLOG_TYPE),
    offset: 32,
  });
  const subtype = cString(b, 48, 64);
  check(SUBTYPES.includes(subtype), {
    format: FORMAT,
    field: "subtype",
    value: subtype,
    limit: SUBTYPES.map((s) => JSON.stringify(s)).join(", ") + " or",
    offset: 48,
  });
  const version = le32(b, 64);
  if (version !== VERSION_1 && version !== VERSION_2) {
    throw fail("version", version, "0x00010000 or 0x00020000", 64);
  }
  const headerSize = le32(b, 68);
  if (headerSize < HEADER_SIZE || headerSize > fileSize) {
    throw fail(
      "header",
      headerSize,
      `from ${HEADER_SIZE} to the file's size ${fileSize}`,
      68,
    );
  }
  const catalogEntries = le32(b, 72);
  if (catalogEntries > MAX_CATALOG) {
    throw fail(
      "catalog",
      catalogEntries,
      `at most ${MAX_CATALOG} entries (QEMU's limit)`,
      72,
    );
  }
  const extentSize = le32(b, 80);
  if (
    extentSize < SECTOR || extentSize > MAX_EXTENT ||
    (extentSize & (extentSize - 1)) !== 0
  ) {
    throw fail(
      "extent",
      extentSize,
      `a power of two from ${SECTOR} to ${MAX_EXTENT}`,
      80,
    );
  }
  const bitmapSize = le32(b, 76);
  const bitmapNeeded = Math.ceil(extentSize / SECTOR / 8);
  if (bitmapSize < bitmapNeeded || bitmapSize > MAX_EXTENT) {
    throw fail(
      "bitmap",
      bitmapSize,
      `from ${bitmapNeeded} (a bit per sector of the extent) to ${MAX_EXTENT}`,
      76,
    );
  }
  const sizeAt = version === VERSION_1 ? 84 : 88;
  // QEMU reads whole sectors: a trailing partial sector is not part of the disk.
  const diskSize = Math.floor(
    safeNumber(le64(b, sizeAt), FORMAT, "disk", sizeAt) / SECTOR,
  ) * SECTOR;
  const needed = Math.ceil(diskSize / extentSize);
  if (catalogEntries < needed) {
    throw fail(
      "catalog",
      catalogEntries,
      `at least ${needed} entries for a disk of ${diskSize} bytes in extents of ${extentSize}`,
      72,
    );
  }
  if (headerSize + catalogEntries * 4 > fileSize) {
    throw fail(
      "catalog",
      catalogEntries,
      `within the file: ${
        catalogEntries * 4
      } bytes at ${headerSize} pass its end at ${fileSize}`,
      72,
    );
  }
  return {
    subtype,
    version,
    headerSize,
    catalogEntries,
    bitmapSize,
    extentSize,
    diskSize,
    timestamp: version === VERSION_2 ? le32(b, 84) : undefined,
  };
}

/** True when bit `sector` of a bochs bitmap is set (least significant first). */
function bitSet(bitmap: Uint8Array, sector: number): boolean {
  return (bitmap[sector >> 3] & (1 << (sector & 7))) !== 0;
}

async function openBochs(source: Source, options: OpenOptions): Promise<Image> {
  if (options.writable) {
    throw new ImageFormatError(
      { format: FORMAT },
      "bochs images are read-only here (as in QEMU)",
    );
  }
  check(source.size >= HEADER_SIZE, {
    format: FORMAT,
    field: "file size",
    value: source.size,
    limit: `at least ${HEADER_SIZE} bytes (the header)`,
  });
  const header = parseHeader(await source.read(0, HEADER_SIZE), source.size);
  const { extentSize, diskSize } = header;
  const catalogBytes = await source.read(
    header.headerSize,
    header.catalogEntries * 4,
  );
  const extents = Math.ceil(diskSize / extentSize);
  const catalog = new Uint32Array(extents);
  const bitmapBytes = Math.ceil(header.bitmapSize / SECTOR) * SECTOR;
  const stride = bitmapBytes + extentSize;
  const dataOffset = header.headerSize + header.catalogEntries * 4;
  let stored = 0;
  for (let i = 0; i < extents; i++) {
    const entry = le32(catalogBytes, i * 4);
    catalog[i] = entry;
    if (entry === UNALLOCATED) continue;
    stored++;
    const end = dataOffset + entry * stride + bitmapBytes;
    if (end > source.size) {
      throw fail(
        `catalog[${i}]`,
        entry,
        `an extent whose bitmap lies within the file's ${source.size} bytes`,
        header.headerSize + i * 4,
      );
    }
  }
  const bitmaps = new Map<number, Uint8Array>();
  const sectorsPerExtent = extentSize / SECTOR;

  async function bitmapOf(extent: number): Promise<Uint8Array> {
    const hit = bitmaps.get(extent);
    if (hit) return hit;
    const bitmap = await source.read(
      dataOffset + catalog[extent] * stride,
      Math.ceil(sectorsPerExtent / 8),
    );
    bitmaps.set(extent, bitmap);
    if (bitmaps.size > BITMAP_CACHE) {
      bitmaps.delete(bitmaps.keys().next().value!);
    }
    return bitmap;
  }

  async function* map(offset: number, length: number): AsyncIterable<Extent> {
    checkRange(diskSize, offset, length);
    const end = offset + length;
    let run: Extent | undefined;
    const push = function* (o: number, n: number, kind: ExtentKind) {
      if (run && run.kind === kind && run.offset + run.length === o) {
        run.length += n;
        return;
      }
      if (run) yield run;
      run = { offset: o, length: n, kind };
    };
    for (let at = offset; at < end;) {
      const extent = Math.floor(at / extentSize);
      const stop = Math.min(end, (extent + 1) * extentSize);
      if (catalog[extent] === UNALLOCATED) {
        yield* push(at, stop - at, "unallocated");
        at = stop;
        continue;
      }
      const bitmap = await bitmapOf(extent);
      while (at < stop) {
        const sector = Math.floor((at - extent * extentSize) / SECTOR);
        const next = Math.min(
          stop,
          extent * extentSize + (sector + 1) * SECTOR,
        );
        yield* push(
          at,
          next - at,
          bitSet(bitmap, sector) ? "data" : "unallocated",
        );
        at = next;
      }
    }
    if (run) yield run;
  }

  async function read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(diskSize, offset, length);
    const out = new Uint8Array(length);
    const pending: Promise<void>[] = [];
    for await (const run of map(offset, length)) {
      if (run.kind !== "data") continue;
      // A data run may span stored extents; read each piece.
      for (let at = run.offset; at < run.offset + run.length;) {
        const extent = Math.floor(at / extentSize);
        const stop = Math.min(
          run.offset + run.length,
          (extent + 1) * extentSize,
        );
        const fileAt = dataOffset + catalog[extent] * stride + bitmapBytes +
          (at - extent * extentSize);
        const into = at - offset;
        pending.push(
          source.read(fileAt, stop - at).then((b) => out.set(b, into)),
        );
        at = stop;
      }
    }
    await Promise.all(pending);
    return out;
  }

  return {
    format: FORMAT,
    size: diskSize,
    name: source.name,
    encrypted: false,
    details: {
      subtype: header.subtype,
      version: header.version === VERSION_1 ? 1 : 2,
      extentSize,
      catalogEntries: header.catalogEntries,
      bitmapSize: header.bitmapSize,
      storedExtents: stored,
      ...(header.timestamp === undefined
        ? {}
        : { timestamp: header.timestamp }),
    },
    read,
    extents: map,
    close: () => source.close?.() ?? Promise.resolve(),
  };
}

/**
 * The bochs driver: growing images and redologs written by bximage, read
 * only. Unstored extents and sectors are `unallocated` (zeros, for a
 * growing image; the base disk's bytes, for an undoable or volatile redolog,
 * whose base Bochs names outside the file).
 *
 * @example
 * ```ts
 * import { bochs } from "../mod.ts";
 * const header = new Uint8Array(512);
 * new TextEncoder().encodeInto("Bochs Virtual HD Image", header);
 * console.log(bochs.probe({ head: header, tail: header, size: 512 })); // 0
 * ```
 */
export const bochs: Driver = {
  name: FORMAT,
  description: "Bochs growing/redolog disk image (read-only)",
  probe: probeBochs,
  open: openBochs,
};
