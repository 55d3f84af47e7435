/**
 * vpc: Microsoft Virtual PC / Hyper-V VHD images (fixed, dynamic and
 * differencing), read and written.
 *
 * This module is browser compatible.
 *
 * Every field is big-endian. Offsets are in bytes.
 *
 * Footer (512 bytes; at the end of every VHD, and copied at offset 0 of
 * dynamic and differencing disks):
 *
 * | offset | size | field                                             |
 * | -----: | ---: | ------------------------------------------------- |
 * |      0 |    8 | cookie `conectix`                                 |
 * |      8 |    4 | features (bit 1 reserved, always set)             |
 * |     12 |    4 | file_format_version 0x00010000                    |
 * |     16 |    8 | data_offset: the dynamic header (all ones: fixed) |
 * |     24 |    4 | timestamp (seconds since 2000-01-01 UTC)          |
 * |     28 |    4 | creator_app (`vpc `, `win `, `d2v `, `qemu`, ...) |
 * |     32 |    4 | creator_version                                   |
 * |     36 |    4 | creator_host_os (`Wi2k`, `Mac `)                  |
 * |     40 |    8 | original_size                                     |
 * |     48 |    8 | current_size                                      |
 * |     56 |    2 | cylinders                                         |
 * |     58 |    1 | heads                                             |
 * |     59 |    1 | sectors_per_track                                 |
 * |     60 |    4 | disk_type: 2 fixed, 3 dynamic, 4 differencing     |
 * |     64 |    4 | checksum: ones' complement of the byte sum        |
 * |     68 |   16 | unique_id                                         |
 * |     84 |    1 | saved_state                                       |
 *
 * Dynamic disk header (1024 bytes at the footer's data_offset):
 *
 * | offset | size | field                                               |
 * | -----: | ---: | --------------------------------------------------- |
 * |      0 |    8 | cookie `cxsparse`                                   |
 * |      8 |    8 | data_offset (unused, all ones)                      |
 * |     16 |    8 | table_offset: the Block Allocation Table (BAT)      |
 * |     24 |    4 | header_version 0x00010000                           |
 * |     28 |    4 | max_table_entries                                   |
 * |     32 |    4 | block_size (a power of two, 2 MiB usually)          |
 * |     36 |    4 | checksum                                            |
 * |     40 |   16 | parent_unique_id (differencing)                     |
 * |     56 |    4 | parent_timestamp                                    |
 * |     64 |  512 | parent_unicode_name (UTF-16BE)                      |
 * |    576 |  192 | 8 parent locators of 24 bytes: platform_code (4),   |
 * |        |      | data_space (4), data_length (4), reserved (4),      |
 * |        |      | data_offset (8)                                     |
 *
 * The BAT holds one 32-bit entry per block: the block's file offset in
 * 512-byte sectors, or 0xFFFFFFFF when unallocated. A block stores a sector
 * bitmap (one bit per sector, most significant bit first, padded to 512
 * bytes) followed by the block's data. A bit of 0 means the sector is not
 * in this file: zeros in a dynamic disk, the parent's bytes in a
 * differencing disk.
 *
 * @module
 */

import { probeVpc, VPC_FOOTER_SIZE as FOOTER_SIZE } from "./_signatures.ts";
import { checkWriteOptions, optionErrors } from "../streams/options.ts";
import {
  ascii,
  be16,
  be32,
  be64,
  formatErrors,
  safeNumber,
  setBe16,
  setBe32,
  setBe64,
  uuidText,
} from "./_binary.ts";
import { readBackSource, requireRandomAccess, writeSink } from "./_image.ts";
import {
  BackingFileError,
  check,
  ChecksumError,
  UnsupportedError,
} from "../streams/errors.ts";
import type {
  CreateSpec,
  Driver,
  Extent,
  ExtentKind,
  Geometry,
  Image,
  OpenOptions,
  Sink,
  Source,
  WindowSource,
} from "../streams/types.ts";
import {
  checkRange,
  readInto as readIntoSource,
  storesDataIn,
} from "../streams/types.ts";

const FORMAT = "vpc";
const optionFail = optionErrors(FORMAT);
const SECTOR = 512;
const DYNAMIC_HEADER_SIZE = 1024;
const ALL_ONES = 0xffffffffffffffffn;
const UNALLOCATED = 0xffffffff;

/** Disk types of the footer's disk_type field. */
const DISK_FIXED = 2;
const DISK_DYNAMIC = 3;
const DISK_DIFFERENCING = 4;
const DISK_TYPE_NAMES: Record<number, string> = {
  [DISK_FIXED]: "fixed",
  [DISK_DYNAMIC]: "dynamic",
  [DISK_DIFFERENCING]: "differencing",
};

/** QEMU's size ceiling: 2040 GiB (VHD_MAX_SECTORS). */
const MAX_SECTORS = 0xff000000;
/** The largest geometry the format can state (VHD_MAX_GEOMETRY). */
const MAX_GEOMETRY = 65535 * 16 * 255;
/** QEMU refuses more BAT entries than this (INT_MAX / 4). */
const MAX_TABLE_ENTRIES = Math.floor(0x7fffffff / 4);
/** Largest block size accepted: 256 MiB (Hyper-V writes 2 MiB, others 512 KiB). */
const MAX_BLOCK_SIZE = 256 << 20;
/** Sectors in a MiB: Azure takes fixed VHDs of whole MiBs only. */
const MIB_SECTORS = (1 << 20) / SECTOR;
/** Largest BAT kept in memory: 64 MiB (2040 GiB in 128 KiB blocks). */
const MAX_BAT_BYTES = 64 << 20;
/** Largest parent locator read: a path, not a file. */
const MAX_LOCATOR_BYTES = 64 << 10;
/** Block size of the images `create` writes (as QEMU and Hyper-V do). */
const CREATE_BLOCK_SIZE = 2 << 20;
/** Sector bitmaps kept in memory before the oldest are dropped (or written). */
const BITMAP_CACHE = 256;

/**
 * Creator applications whose images take their size from current_size
 * rather than the CHS geometry (QEMU's table, qemu-iotests 146).
 */
const CURRENT_SIZE_CREATORS = new Set([
  "win ",
  "qem2",
  "d2v ",
  "CTXS",
  "tap\0",
]);

/** The parsed footer. */
interface Footer {
  features: number;
  version: number;
  dataOffset: bigint;
  timestamp: number;
  creatorApp: string;
  creatorVersion: number;
  creatorHostOs: string;
  originalSize: number;
  currentSize: number;
  geometry: Geometry;
  diskType: number;
  checksum: number;
  uniqueId: Uint8Array;
  savedState: number;
}

/** One parent locator entry of a differencing disk. */
interface Locator {
  platform: string;
  dataSpace: number;
  dataLength: number;
  dataOffset: number;
  /** The decoded path. */
  path?: string;
}

/** The parsed dynamic disk header. */
interface DynamicHeader {
  tableOffset: number;
  version: number;
  maxTableEntries: number;
  blockSize: number;
  parentUniqueId: Uint8Array;
  parentTimestamp: number;
  parentName: string;
  locators: Locator[];
}

/** Ones' complement of the byte sum, skipping the 4 checksum bytes at `skip`. */
function vhdChecksum(bytes: Uint8Array, skip: number): number {
  let sum = 0;
  for (let i = 0; i < bytes.length; i++) {
    if (i >= skip && i < skip + 4) continue;
    sum += bytes[i];
  }
  return (~sum) >>> 0;
}

const fail = formatErrors(FORMAT);

/** Parses and validates a 512-byte footer found at `at` in the file. */
function parseFooter(b: Uint8Array, at: number, file?: string): Footer {
  check(ascii(b, 0, 8) === "conectix", {
    format: FORMAT,
    field: "footer.cookie",
    value: ascii(b, 0, 8),
    limit: '"conectix"',
    offset: at,
    file,
  });
  const checksum = be32(b, 64);
  const actual = vhdChecksum(b, 64);
  if (checksum !== actual) {
    throw new ChecksumError(
      { format: FORMAT, field: "footer.checksum", offset: at + 64, file },
      checksum,
      actual,
    );
  }
  const diskType = be32(b, 60);
  check(DISK_TYPE_NAMES[diskType] !== undefined, {
    format: FORMAT,
    field: "footer.disk_type",
    value: diskType,
    limit: "2 (fixed), 3 (dynamic) or 4 (differencing)",
    offset: at + 60,
    file,
  });
  return {
    features: be32(b, 8),
    version: be32(b, 12),
    dataOffset: be64(b, 16),
    timestamp: be32(b, 24),
    creatorApp: ascii(b, 28, 32),
    creatorVersion: be32(b, 32),
    creatorHostOs: ascii(b, 36, 40),
    originalSize: safeNumber(
      be64(b, 40),
      FORMAT,
      "footer.original_size",
      at + 40,
    ),
    currentSize: safeNumber(
      be64(b, 48),
      FORMAT,
      "footer.current_size",
      at + 48,
    ),
    geometry: { cylinders: be16(b, 56), heads: b[58], sectors: b[59] },
    diskType,
    checksum,
    uniqueId: b.slice(68, 84),
    savedState: b[84],
  };
}

/** How the virtual size is computed, QEMU's `force_size_calc` option. */
type SizeRule = "chs" | "current_size";

/**
 * The virtual size by QEMU's rule: the CHS geometry for Virtual PC and
 * unknown creators, current_size for Hyper-V, Disk2VHD, XenServer and
 * `qem2`, and current_size whenever the geometry is the maximum one (it
 * cannot say more). `force` picks one rule outright.
 */
function virtualSizeOf(footer: Footer, force?: SizeRule): {
  size: number;
  rule: SizeRule;
} {
  const g = footer.geometry;
  const chsSectors = g.cylinders * g.heads * g.sectors;
  let rule: SizeRule = force ??
    (CURRENT_SIZE_CREATORS.has(footer.creatorApp) ? "current_size" : "chs");
  if (chsSectors === MAX_GEOMETRY) rule = "current_size";
  const sectors = rule === "chs"
    ? chsSectors
    : Math.floor(footer.currentSize / SECTOR);
  if (sectors > MAX_SECTORS) {
    throw fail(
      rule === "chs" ? "footer.geometry" : "footer.current_size",
      sectors * SECTOR,
      `at most ${MAX_SECTORS * SECTOR} bytes (2040 GiB)`,
    );
  }
  return { size: sectors * SECTOR, rule };
}

/** Decodes UTF-16 (`le` or big-endian) up to the first NUL character. */
function utf16(b: Uint8Array, le: boolean): string {
  let end = b.length & ~1;
  for (let i = 0; i + 1 < b.length; i += 2) {
    if (b[i] === 0 && b[i + 1] === 0) {
      end = i;
      break;
    }
  }
  return new TextDecoder(le ? "utf-16le" : "utf-16be").decode(
    b.subarray(0, end),
  );
}

/** Parses and validates the dynamic disk header at `at`. */
function parseDynamicHeader(
  b: Uint8Array,
  at: number,
  fileSize: number,
  virtualSize: number,
): DynamicHeader {
  check(ascii(b, 0, 8) === "cxsparse", {
    format: FORMAT,
    field: "dynamic_header.cookie",
    value: ascii(b, 0, 8),
    limit: '"cxsparse"',
    offset: at,
  });
  // The fields QEMU checks come first (its messages name them even when
  // the rest of the header is cut off), then the whole header's checksum.
  const blockSize = be32(b, 32);
  if (
    blockSize < SECTOR || blockSize > MAX_BLOCK_SIZE ||
    (blockSize & (blockSize - 1)) !== 0
  ) {
    throw fail(
      "dynamic_header.block_size",
      blockSize,
      `a power of two from 512 to ${MAX_BLOCK_SIZE}`,
      at + 32,
    );
  }
  const maxTableEntries = be32(b, 28);
  if (maxTableEntries > MAX_TABLE_ENTRIES) {
    throw fail(
      "dynamic_header.max_table_entries",
      maxTableEntries,
      `at most ${MAX_TABLE_ENTRIES} (QEMU's limit)`,
      at + 28,
    );
  }
  if (maxTableEntries * blockSize < virtualSize) {
    throw fail(
      "dynamic_header.max_table_entries",
      maxTableEntries,
      `at least ${
        Math.ceil(virtualSize / blockSize)
      } (${virtualSize} bytes in blocks of ${blockSize})`,
      at + 28,
    );
  }
  check(b.length === DYNAMIC_HEADER_SIZE, {
    format: FORMAT,
    field: "dynamic_header",
    value: `${b.length} bytes`,
    limit: `${DYNAMIC_HEADER_SIZE} bytes within the file`,
    offset: at,
  });
  const checksum = be32(b, 36);
  const actual = vhdChecksum(b, 36);
  if (checksum !== actual) {
    throw new ChecksumError(
      { format: FORMAT, field: "dynamic_header.checksum", offset: at + 36 },
      checksum,
      actual,
    );
  }
  const tableOffset = safeNumber(
    be64(b, 16),
    FORMAT,
    "dynamic_header.table_offset",
    at + 16,
  );
  const needed = Math.ceil(virtualSize / blockSize);
  if (needed * 4 > MAX_BAT_BYTES) {
    throw fail(
      "dynamic_header.block_size",
      blockSize,
      `large enough for a BAT of at most ${MAX_BAT_BYTES} bytes (${needed} blocks needed)`,
      at + 32,
    );
  }
  if (tableOffset + needed * 4 > fileSize) {
    throw fail(
      "dynamic_header.table_offset",
      tableOffset,
      `within the file's ${fileSize} bytes with its ${needed * 4}-byte BAT`,
      at + 16,
    );
  }
  const locators: Locator[] = [];
  for (let i = 0; i < 8; i++) {
    const o = 576 + i * 24;
    const platform = ascii(b, o, o + 4);
    if (be32(b, o) === 0) continue;
    const dataLength = be32(b, o + 8);
    const dataOffset = safeNumber(
      be64(b, o + 16),
      FORMAT,
      `parent_locator[${i}].data_offset`,
      at + o + 16,
    );
    if (dataLength > MAX_LOCATOR_BYTES) {
      throw fail(
        `parent_locator[${i}].data_length`,
        dataLength,
        `at most ${MAX_LOCATOR_BYTES}`,
        at + o + 8,
      );
    }
    if (dataOffset + dataLength > fileSize) {
      throw fail(
        `parent_locator[${i}].data_offset`,
        dataOffset,
        `within the file's ${fileSize} bytes (${dataLength} bytes of locator)`,
        at + o + 16,
      );
    }
    locators.push({
      platform,
      dataSpace: be32(b, o + 4),
      dataLength,
      dataOffset,
    });
  }
  return {
    tableOffset,
    version: be32(b, 24),
    maxTableEntries,
    blockSize,
    parentUniqueId: b.slice(40, 56),
    parentTimestamp: be32(b, 56),
    parentName: utf16(b.subarray(64, 576), false),
    locators,
  };
}

/** A locator's bytes as a path: `\` becomes `/`, `file://` URLs become paths. */
function locatorPath(platform: string, data: Uint8Array): string | undefined {
  let text: string;
  if (
    platform === "W2ku" || platform === "W2ru" || platform === "Wi2k" ||
    platform === "Wi2r"
  ) {
    text = platform.startsWith("W2")
      ? utf16(data, true)
      : new TextDecoder().decode(data).replace(/\0.*$/s, "");
    text = text.replaceAll("\\", "/");
    if (text.startsWith("./")) text = text.slice(2);
    return text || undefined;
  }
  if (platform === "MacX") {
    text = new TextDecoder().decode(data).replace(/\0.*$/s, "");
    if (text.startsWith("file://")) {
      try {
        return decodeURIComponent(new URL(text).pathname);
      } catch {
        return undefined;
      }
    }
    return text || undefined;
  }
  return undefined; // "Mac " holds a Mac OS alias record, not a path.
}

/**
 * The backing file a differencing disk names: a relative locator first
 * (it survives moving the pair), then an absolute one, then the parent's
 * unicode name.
 */
function chooseBackingFile(header: DynamicHeader): string | undefined {
  for (const platform of ["W2ru", "Wi2r", "MacX", "W2ku", "Wi2k"]) {
    const found = header.locators.find((l) =>
      l.platform === platform && l.path
    );
    if (found) return found.path;
  }
  return header.parentName || undefined;
}

/** Reads sector bitmaps through a small cache. */
class BitmapCache {
  #entries = new Map<number, Uint8Array>();
  constructor(readonly limit: number) {}
  get(block: number): Uint8Array | undefined {
    const hit = this.#entries.get(block);
    if (hit) {
      this.#entries.delete(block);
      this.#entries.set(block, hit);
    }
    return hit;
  }
  set(block: number, bitmap: Uint8Array) {
    this.#entries.delete(block);
    this.#entries.set(block, bitmap);
    if (this.#entries.size > this.limit) {
      this.#entries.delete(this.#entries.keys().next().value!);
    }
  }
}

/** True when bit `sector` of a VHD sector bitmap is set (MSB first). */
function bitSet(bitmap: Uint8Array, sector: number): boolean {
  return (bitmap[sector >> 3] & (0x80 >> (sector & 7))) !== 0;
}

/** The state of an opened VHD (shared by reading and writing). */
interface State {
  source: Source;
  footer: Footer;
  footerBytes: Uint8Array;
  size: number;
  header?: DynamicHeader;
  bat?: Uint32Array;
  bitmapSize: number;
  /** Where the next block goes (the trailing footer sits there). */
  nextFree: number;
  sink?: Sink;
}

function vpcImage(state: State, details: Record<string, unknown>): Image {
  const { footer, header } = state;
  const blockSize = header?.blockSize ?? 0;
  const sectorsPerBlock = blockSize / SECTOR;
  const differencing = footer.diskType === DISK_DIFFERENCING;
  const bitmaps = new BitmapCache(BITMAP_CACHE);
  // Bitmaps changed by writes, written back at flush (or when too many).
  const dirtyBitmaps = new Map<number, Uint8Array>();
  const dirtyBat = new Set<number>(); // BAT sectors to write
  let footerDirty = false;
  const backingFile = header && differencing
    ? chooseBackingFile(header)
    : undefined;
  // Bits of 0 are zeros in a dynamic disk and the parent's in a differencing one.
  const holeKind: ExtentKind = differencing ? "unallocated" : "zero";
  const fullBitmap = (bitmap: Uint8Array) => {
    const whole = sectorsPerBlock >> 3;
    for (let i = 0; i < whole; i++) if (bitmap[i] !== 0xff) return false;
    return true;
  };

  async function writeBitmap(block: number, bitmap: Uint8Array) {
    await state.sink!.write(state.bat![block] * SECTOR, bitmap);
  }

  async function bitmapOf(block: number): Promise<Uint8Array> {
    const hit = dirtyBitmaps.get(block) ?? bitmaps.get(block);
    if (hit) return hit;
    const bitmap = await state.source.read(
      state.bat![block] * SECTOR,
      state.bitmapSize,
    );
    bitmaps.set(block, bitmap);
    return bitmap;
  }

  async function writeDirtyBitmaps() {
    for (const [block, bitmap] of dirtyBitmaps) {
      await writeBitmap(block, bitmap);
      bitmaps.set(block, bitmap);
    }
    dirtyBitmaps.clear();
  }

  /**
   * Runs of one stored block (`from`, `to` in bytes within the block),
   * read from its sector bitmap.
   */
  function blockRuns(
    bitmap: Uint8Array,
    from: number,
    to: number,
  ): { from: number; to: number; kind: ExtentKind }[] {
    if (fullBitmap(bitmap)) return [{ from, to, kind: "data" }];
    const runs: { from: number; to: number; kind: ExtentKind }[] = [];
    let start = from;
    let kind: ExtentKind | undefined;
    for (let at = from; at < to;) {
      const sector = Math.floor(at / SECTOR);
      const next = Math.min(to, (sector + 1) * SECTOR);
      const k: ExtentKind = bitSet(bitmap, sector) ? "data" : holeKind;
      if (kind !== undefined && k !== kind) {
        runs.push({ from: start, to: at, kind });
        start = at;
      }
      kind = k;
      at = next;
    }
    if (kind !== undefined) runs.push({ from: start, to, kind });
    return runs;
  }

  async function* extents(
    offset: number,
    length: number,
  ): AsyncIterable<Extent> {
    checkRange(state.size, offset, length);
    if (length === 0) return;
    if (!header) {
      // A fixed VHD: the disk's bytes are the file's, from its start.
      yield { offset, length, kind: "data", fileOffset: offset };
      return;
    }
    const bat = state.bat!;
    const end = offset + length;
    let run: Extent | undefined;
    const add = (o: number, n: number, kind: ExtentKind, at?: number) => {
      if (
        run && run.kind === kind && run.offset + run.length === o &&
        (at === undefined
          ? run.fileOffset === undefined
          : run.fileOffset! + run.length === at)
      ) {
        run.length += n;
        return undefined;
      }
      const done = run;
      run = at === undefined
        ? { offset: o, length: n, kind }
        : { offset: o, length: n, kind, fileOffset: at };
      return done;
    };
    for (let at = offset; at < end;) {
      let block = Math.floor(at / blockSize);
      if (bat[block] === UNALLOCATED) {
        // Unallocated blocks are skipped in a tight loop: a 127 GiB disk
        // with nothing stored has 65,000 of them.
        while (
          (block + 1) * blockSize < end && bat[block + 1] === UNALLOCATED
        ) {
          block++;
        }
        const stop = Math.min(end, (block + 1) * blockSize);
        // Zeros in a dynamic disk (qemu-img map says present and zero), the
        // parent's in a differencing one.
        const done = add(at, stop - at, holeKind);
        if (done) yield done;
        at = stop;
        continue;
      }
      const blockStart = block * blockSize;
      const stop = Math.min(end, blockStart + blockSize);
      const bitmap = await bitmapOf(block);
      // A block's sectors follow its bitmap in the file.
      const stored = bat[block] * SECTOR + state.bitmapSize;
      for (const r of blockRuns(bitmap, at - blockStart, stop - blockStart)) {
        const done = add(
          blockStart + r.from,
          r.to - r.from,
          r.kind,
          r.kind === "data" ? stored + r.from : undefined,
        );
        if (done) yield done;
      }
      at = stop;
    }
    if (run) yield run;
  }

  async function read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(state.size, offset, length);
    if (!header) return await state.source.read(offset, length);
    // The common case (convert reads whole blocks): one stored block with
    // every sector present is one read of the file, returned as it is. A
    // copy into a fresh buffer here cost as much as the read itself (page
    // faults on new memory) in the 300 MiB convert measured.
    const block = Math.floor(offset / blockSize);
    if (
      length > 0 && offset + length <= (block + 1) * blockSize &&
      state.bat![block] !== UNALLOCATED && fullBitmap(await bitmapOf(block))
    ) {
      return await state.source.read(
        state.bat![block] * SECTOR + state.bitmapSize + offset -
          block * blockSize,
        length,
      );
    }
    const out = new Uint8Array(length);
    const pending: Promise<void>[] = [];
    for await (const run of extents(offset, length)) {
      if (run.kind === "data") {
        const block = Math.floor(run.offset / blockSize);
        const within = run.offset - block * blockSize;
        const at = state.bat![block] * SECTOR + state.bitmapSize + within;
        // Runs never cross blocks here unless both blocks are data; split.
        const firstPart = Math.min(run.length, blockSize - within);
        if (firstPart === run.length) {
          pending.push(
            state.source.read(at, run.length).then((b) =>
              out.set(b, run.offset - offset)
            ),
          );
        } else {
          pending.push(
            read(run.offset, firstPart).then((b) =>
              out.set(b, run.offset - offset)
            ),
            read(run.offset + firstPart, run.length - firstPart).then((b) =>
              out.set(b, run.offset + firstPart - offset)
            ),
          );
        }
      } else if (run.kind === "unallocated" && differencing) {
        throw new BackingFileError(
          `vpc: bytes ${run.offset}..${
            run.offset + run.length
          } of this differencing disk are in its parent ${
            JSON.stringify(backingFile ?? "")
          }, which was not opened: open it through the registry with resolveBacking`,
          backingFile ?? "",
        );
      }
    }
    await Promise.all(pending);
    return out;
  }

  /** `read` into the caller's buffer: whole stored blocks go straight in. */
  async function readInto(offset: number, into: Uint8Array): Promise<void> {
    const length = into.length;
    checkRange(state.size, offset, length);
    if (!header) return await readIntoSource(state.source, offset, into);
    const block = Math.floor(offset / blockSize);
    if (
      length > 0 && offset + length <= (block + 1) * blockSize &&
      state.bat![block] !== UNALLOCATED && fullBitmap(await bitmapOf(block))
    ) {
      return await readIntoSource(
        state.source,
        state.bat![block] * SECTOR + state.bitmapSize + offset -
          block * blockSize,
        into,
      );
    }
    into.set(await read(offset, length));
  }

  const image: Image & {
    readonly requiresBacking: boolean;
    readonly windowOf?: WindowSource["windowOf"];
  } = {
    // A fixed disk's bytes are the file's from its start: convert may let
    // a file sink copy them in the kernel (see RangeCopySink).
    ...(header ? {} : { windowOf: { source: state.source, offset: 0 } }),
    format: FORMAT,
    get size() {
      return state.size;
    },
    name: state.source.name,
    encrypted: false,
    geometry: footer.geometry,
    backingFile,
    // A differencing disk's unallocated runs are its parent's bytes, never
    // zeros: callers that do not follow the parent must not read them as
    // zeros (see the module's notes and `read`).
    requiresBacking: differencing,
    // The unique id as VirtualBox reads it (the UUID a differencing vdi
    // over this disk links to).
    id: `uuid ${uuidText(footer.uniqueId)}`,
    details,
    read,
    readInto,
    extents,
    close: () => state.source.close?.() ?? Promise.resolve(),
  };
  // Read-only: the data runs' fileOffsets are the file's plain bytes.
  if (!state.sink) return storesDataIn(image, state.source);

  const sink = state.sink;

  /** Allocates block `block` at the end of the file; its bitmap is all zeros. */
  async function allocate(block: number): Promise<Uint8Array> {
    const at = state.nextFree;
    state.bat![block] = at / SECTOR;
    state.nextFree = at + state.bitmapSize + blockSize;
    // The block's data must read as zeros: past the old end that is a hole,
    // but the old footer sits at `at`, so write the bitmap over it and zero
    // the first sector of data the footer may have spilled into.
    // The bitmap (at least 512 bytes) overwrites the old trailing footer.
    const bitmap = new Uint8Array(state.bitmapSize);
    await sink.write(at, bitmap);
    // The trailing footer keeps the file its full length at once.
    await sink.write(state.nextFree, state.footerBytes);
    dirtyBat.add(Math.floor((block * 4) / SECTOR));
    footerDirty = true;
    dirtyBitmaps.set(block, bitmap);
    return bitmap;
  }

  async function writeSectors(offset: number, bytes: Uint8Array) {
    // offset and bytes.length are multiples of 512 and within one block.
    const block = Math.floor(offset / blockSize);
    const bitmap = state.bat![block] === UNALLOCATED
      ? await allocate(block)
      : await bitmapOf(block);
    const within = offset - block * blockSize;
    await sink.write(
      state.bat![block] * SECTOR + state.bitmapSize + within,
      bytes,
    );
    const first = within / SECTOR;
    const last = first + bytes.length / SECTOR;
    let changed = false;
    for (let s = first; s < last; s++) {
      const mask = 0x80 >> (s & 7);
      if (!(bitmap[s >> 3] & mask)) {
        bitmap[s >> 3] |= mask;
        changed = true;
      }
    }
    if (changed) {
      dirtyBitmaps.set(block, bitmap);
      if (dirtyBitmaps.size > BITMAP_CACHE) await writeDirtyBitmaps();
    }
  }

  /** The current bytes of one sector of this layer, for partial writes. */
  async function sectorBytes(sector: number): Promise<Uint8Array> {
    const offset = sector * SECTOR;
    const length = Math.min(SECTOR, state.size - offset);
    const out = new Uint8Array(SECTOR);
    for await (const run of extents(offset, length)) {
      if (run.kind === "data") {
        out.set(await read(run.offset, run.length), run.offset - offset);
      } else if (run.kind === "unallocated" && differencing) {
        throw new UnsupportedError(
          { format: FORMAT },
          `a write of part of sector ${sector} of a differencing disk needs the parent's bytes; write whole sectors`,
        );
      }
    }
    return out;
  }

  image.write = async (offset: number, bytes: Uint8Array) => {
    checkRange(state.size, offset, bytes.length);
    if (bytes.length === 0) return;
    if (!header) {
      await sink.write(offset, bytes);
      return;
    }
    const end = offset + bytes.length;
    let at = offset;
    // A partial first or last sector is merged with what is stored.
    const merge = async (sector: number) => {
      const start = sector * SECTOR;
      const buf = await sectorBytes(sector);
      const from = Math.max(start, offset);
      const to = Math.min(start + SECTOR, end);
      buf.set(bytes.subarray(from - offset, to - offset), from - start);
      await writeSectors(start, buf);
      return to;
    };
    if (at % SECTOR !== 0 || end - at < SECTOR) {
      at = await merge(Math.floor(at / SECTOR));
    }
    while (at < end) {
      const blockEnd = (Math.floor(at / blockSize) + 1) * blockSize;
      const wholeEnd = Math.min(blockEnd, end - (end % SECTOR));
      if (wholeEnd > at) {
        await writeSectors(at, bytes.subarray(at - offset, wholeEnd - offset));
        at = wholeEnd;
      } else {
        at = await merge(Math.floor(at / SECTOR));
      }
    }
  };

  image.flush = async () => {
    if (header) {
      await writeDirtyBitmaps();
      const batBytes = new Uint8Array(state.bat!.length * 4);
      const v = new DataView(batBytes.buffer);
      for (const sector of [...dirtyBat].sort((a, b) => a - b)) {
        const first = (sector * SECTOR) / 4;
        const last = Math.min(state.bat!.length, first + SECTOR / 4);
        for (let i = first; i < last; i++) v.setUint32(i * 4, state.bat![i]);
        await sink.write(
          header.tableOffset + first * 4,
          batBytes.subarray(first * 4, last * 4),
        );
      }
      dirtyBat.clear();
      if (footerDirty) {
        await sink.write(state.nextFree, state.footerBytes);
        footerDirty = false;
      }
    }
    await sink.flush();
  };
  return image;
}

/** Reads a source's footer: at 0 (dynamic, differencing) or at the end (fixed). */
async function readFooter(
  source: Source,
): Promise<{ footer: Footer; bytes: Uint8Array; at: number }> {
  check(source.size >= FOOTER_SIZE, {
    format: FORMAT,
    field: "file size",
    value: source.size,
    limit: `at least ${FOOTER_SIZE} bytes (the footer)`,
  });
  const head = await source.read(0, FOOTER_SIZE);
  if (ascii(head, 0, 8) === "conectix") {
    return { footer: parseFooter(head, 0, source.name), bytes: head, at: 0 };
  }
  const at = source.size - FOOTER_SIZE;
  const tail = await source.read(at, FOOTER_SIZE);
  return { footer: parseFooter(tail, at, source.name), bytes: tail, at };
}

/** The parsed and checked structures of the VHD in `source`. */
async function vpcState(
  source: Source,
  options: OpenOptions,
): Promise<{ state: State; details: Record<string, unknown> }> {
  const force = options.options?.force_size_calc;
  if (force !== undefined && force !== "chs" && force !== "current_size") {
    throw fail("force_size_calc", force, '"chs" or "current_size"');
  }
  const sink = writeSink(options, FORMAT);
  const { footer, bytes, at } = await readFooter(source);
  const { size, rule } = virtualSizeOf(footer, force as SizeRule | undefined);
  const details: Record<string, unknown> = {
    subformat: DISK_TYPE_NAMES[footer.diskType],
    creatorApp: footer.creatorApp.replace(/\0/g, "\\0"),
    creatorVersion: footer.creatorVersion,
    creatorHostOs: footer.creatorHostOs.replace(/\0/g, "\\0"),
    currentSize: footer.currentSize,
    originalSize: footer.originalSize,
    sizeFrom: rule,
    timestamp: footer.timestamp,
    uniqueId: hex(footer.uniqueId),
  };
  const state: State = {
    source,
    footer,
    footerBytes: bytes,
    size,
    bitmapSize: 0,
    nextFree: 0,
    sink,
  };
  if (footer.diskType === DISK_FIXED) {
    // The data is the file minus its footer.
    const dataSize = source.size - FOOTER_SIZE;
    if (size > dataSize) {
      throw fail(
        rule === "chs" ? "footer.geometry" : "footer.current_size",
        size,
        `at most the ${dataSize} bytes of data before the footer`,
        at + (rule === "chs" ? 56 : 48),
      );
    }
    return { state, details };
  }
  check(at === 0, {
    format: FORMAT,
    field: "footer copy",
    value: "missing",
    limit: "at offset 0 for a dynamic or differencing disk",
    offset: 0,
  });
  const dataOffset = footer.dataOffset < BigInt(source.size)
    ? Number(footer.dataOffset)
    : -1;
  if (
    dataOffset < FOOTER_SIZE || dataOffset + 40 > source.size
  ) {
    throw fail(
      "footer.data_offset",
      footer.dataOffset,
      `the dynamic header's offset, within the file's ${source.size} bytes`,
      16,
    );
  }
  const header = parseDynamicHeader(
    await source.read(
      dataOffset,
      Math.min(DYNAMIC_HEADER_SIZE, source.size - dataOffset),
    ),
    dataOffset,
    source.size,
    size,
  );
  const blocks = Math.ceil(size / header.blockSize);
  const bitmapSize = Math.ceil(header.blockSize / SECTOR / 8 / SECTOR) * SECTOR;
  const batBytes = await source.read(header.tableOffset, blocks * 4);
  const bat = new Uint32Array(blocks);
  const v = new DataView(batBytes.buffer, batBytes.byteOffset, batBytes.length);
  let nextFree = Math.ceil(
    (header.tableOffset + header.maxTableEntries * 4) / SECTOR,
  ) * SECTOR;
  for (let i = 0; i < blocks; i++) {
    const entry = v.getUint32(i * 4);
    bat[i] = entry;
    if (entry === UNALLOCATED) continue;
    const end = entry * SECTOR + bitmapSize + header.blockSize;
    if (end > source.size) {
      throw fail(
        `bat[${i}]`,
        entry,
        `a block (${bitmapSize} + ${header.blockSize} bytes at sector ${entry}) within the file's ${source.size} bytes`,
        header.tableOffset + i * 4,
      );
    }
    nextFree = Math.max(nextFree, end);
  }
  for (const l of header.locators) {
    if (l.dataLength > 0) {
      l.path = locatorPath(
        l.platform,
        await source.read(l.dataOffset, l.dataLength),
      );
    }
    nextFree = Math.max(
      nextFree,
      Math.ceil((l.dataOffset + l.dataLength) / SECTOR) * SECTOR,
    );
  }
  // The trailing footer goes after the last block; never over the header.
  nextFree = Math.max(nextFree, dataOffset + DYNAMIC_HEADER_SIZE);
  state.header = header;
  state.bat = bat;
  state.bitmapSize = bitmapSize;
  state.nextFree = nextFree;
  Object.assign(details, {
    blockSize: header.blockSize,
    maxTableEntries: header.maxTableEntries,
    allocatedBlocks: bat.reduce((n, e) => n + (e === UNALLOCATED ? 0 : 1), 0),
  });
  if (footer.diskType === DISK_DIFFERENCING) {
    Object.assign(details, {
      parentName: header.parentName,
      parentUniqueId: hex(header.parentUniqueId),
      parentTimestamp: header.parentTimestamp,
      parentLocators: header.locators.map((l) => ({
        platform: l.platform,
        path: l.path,
      })),
    });
  }
  return { state, details };
}

async function openVpc(
  source: Source,
  options: OpenOptions,
): Promise<Image> {
  const { state, details } = await vpcState(source, options);
  return vpcImage(state, details);
}

function hex(b: Uint8Array): string {
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/**
 * The CHS geometry of `sectors` by the algorithm of the VHD specification
 * (at most 65535 cylinders, 16 heads, 255 sectors; it may round down).
 */
function geometryFor(sectors: number): Geometry {
  let total = Math.min(sectors, MAX_GEOMETRY);
  let spt: number;
  let heads: number;
  let cylTimesHeads: number;
  if (total >= 65535 * 16 * 63) {
    spt = 255;
    heads = 16;
    cylTimesHeads = Math.floor(total / spt);
  } else {
    spt = 17;
    cylTimesHeads = Math.floor(total / spt);
    heads = Math.max(4, Math.floor((cylTimesHeads + 1023) / 1024));
    if (cylTimesHeads >= heads * 1024 || heads > 16) {
      spt = 31;
      heads = 16;
      cylTimesHeads = Math.floor(total / spt);
    }
    if (cylTimesHeads >= heads * 1024) {
      spt = 63;
      heads = 16;
      cylTimesHeads = Math.floor(total / spt);
    }
  }
  total = Math.floor(cylTimesHeads / heads);
  return { cylinders: total, heads, sectors: spt };
}

/** Seconds since 2000-01-01 UTC, the VHD epoch. */
function vhdNow(): number {
  return Math.max(
    0,
    Math.floor((Date.now() - Date.UTC(2000, 0, 1)) / 1000),
  ) >>> 0;
}

function encodeUtf16(text: string, le: boolean): Uint8Array {
  const out = new Uint8Array(text.length * 2);
  const v = new DataView(out.buffer);
  for (let i = 0; i < text.length; i++) {
    v.setUint16(i * 2, text.charCodeAt(i), le);
  }
  return out;
}

/**
 * The sectors and CHS geometry of a disk of at least `requested` sectors,
 * as qemu-img sets them: rounded up to what the geometry states (unless
 * `exact`: current_size then holds the size), and past the largest
 * geometry the maximum one with current_size holding the size.
 */
function sizeAndGeometry(
  requested: number,
  exact: boolean,
): { geometry: Geometry; sectors: number } {
  let geometry = geometryFor(requested);
  let sectors = requested;
  if (requested >= MAX_GEOMETRY) {
    geometry = { cylinders: 65535, heads: 16, sectors: 255 };
  } else if (!exact) {
    for (
      let n = requested;
      geometry.cylinders * geometry.heads * geometry.sectors < requested;
      n++
    ) {
      geometry = geometryFor(n);
    }
    sectors = geometry.cylinders * geometry.heads * geometry.sectors;
    if (sectors === MAX_GEOMETRY) sectors = requested;
  }
  return { geometry, sectors };
}

/**
 * `resize` of a fixed or dynamic VHD: the footer (both copies) takes the
 * new size and geometry, rounded as qemu-img rounds a new image's (exact
 * for creators read by current_size); a fixed disk's footer moves to the
 * new end; a dynamic disk's BAT grows in its sector padding, or moves to
 * the end of the file when it needs more room. Shrinking unmaps the blocks
 * past the end and clears the sectors past it in the last one (bits and
 * bytes), so that growing again reads zeros. A differencing disk is refused: its
 * parent would show through the new area.
 */
async function resizeVpc(file: Source & Sink, size: number): Promise<void> {
  const { state } = await vpcState(file, {});
  const { footer } = state;
  if (footer.diskType === DISK_DIFFERENCING) {
    throw new UnsupportedError(
      { format: FORMAT, field: "footer.disk_type", value: footer.diskType },
      "a differencing VHD is not resized: its parent would show through the new area (resize a flattened copy)",
    );
  }
  if (size % SECTOR !== 0) throw fail("size", size, "a multiple of 512");
  const requested = size / SECTOR;
  if (requested > MAX_SECTORS) {
    throw fail(
      "size",
      size,
      `at most ${MAX_SECTORS * SECTOR} bytes (2040 GiB)`,
    );
  }
  const exact = virtualSizeOf(footer).rule === "current_size";
  const { geometry, sectors } = sizeAndGeometry(requested, exact);
  const newSize = sectors * SECTOR;
  const bytes = state.footerBytes.slice();
  setBe64(bytes, 48, newSize);
  setBe16(bytes, 56, geometry.cylinders);
  bytes[58] = geometry.heads;
  bytes[59] = geometry.sectors;
  setBe32(bytes, 64, vhdChecksum(bytes, 64));

  if (footer.diskType === DISK_FIXED) {
    const oldFooter = file.size - FOOTER_SIZE;
    await file.write(newSize, bytes);
    // What was past the old disk (its footer too) reads as zeros now.
    const zeros = new Uint8Array(1 << 20);
    const stop = Math.min(newSize, oldFooter + FOOTER_SIZE);
    for (let at = state.size; at < stop; at += zeros.length) {
      await file.write(
        at,
        zeros.subarray(0, Math.min(zeros.length, stop - at)),
      );
    }
    await file.flush();
    if (file.resize) await file.resize(newSize + FOOTER_SIZE);
    await file.flush();
    return;
  }

  const header = state.header!;
  const bat = state.bat!;
  const blockSize = header.blockSize;
  const newBlocks = Math.ceil(newSize / blockSize);
  const oldBlocks = bat.length;
  let trailer = state.nextFree;
  let tableOffset = header.tableOffset;
  let maxEntries = header.maxTableEntries;
  const roomEntries = Math.ceil(maxEntries * 4 / SECTOR) * SECTOR / 4;
  if (newBlocks > roomEntries) {
    // A new BAT where the trailing footer was; the footer follows it.
    const table = new Uint8Array(Math.ceil(newBlocks * 4 / SECTOR) * SECTOR)
      .fill(0xff);
    for (let i = 0; i < oldBlocks; i++) setBe32(table, i * 4, bat[i]);
    await file.write(trailer, table);
    tableOffset = trailer;
    trailer += table.length;
    maxEntries = newBlocks;
  } else if (newBlocks > oldBlocks) {
    // Entries past the old disk: unallocated, whatever the padding held.
    await file.write(
      tableOffset + oldBlocks * 4,
      new Uint8Array((newBlocks - oldBlocks) * 4).fill(0xff),
    );
    maxEntries = Math.max(maxEntries, newBlocks);
  } else {
    if (newBlocks < oldBlocks) {
      await file.write(
        tableOffset + newBlocks * 4,
        new Uint8Array((oldBlocks - newBlocks) * 4).fill(0xff),
      );
    }
    const tail = newSize % blockSize;
    const last = newBlocks - 1;
    if (tail !== 0 && bat[last] !== UNALLOCATED) {
      const at = bat[last] * SECTOR;
      const bitmap = (await file.read(at, state.bitmapSize)).slice();
      for (let k = tail / SECTOR; k < blockSize / SECTOR; k++) {
        bitmap[k >> 3] &= ~(0x80 >> (k & 7));
      }
      await file.write(at, bitmap);
      // QEMU reads a dynamic disk's allocated blocks whole, without the
      // bitmap: the bytes themselves become zeros.
      await file.write(
        at + state.bitmapSize + tail,
        new Uint8Array(blockSize - tail),
      );
    }
  }
  const dynamic =
    (await file.read(Number(footer.dataOffset), DYNAMIC_HEADER_SIZE))
      .slice();
  setBe64(dynamic, 16, tableOffset);
  setBe32(dynamic, 28, maxEntries);
  setBe32(dynamic, 36, vhdChecksum(dynamic, 36));
  await file.flush();
  await file.write(Number(footer.dataOffset), dynamic);
  await file.write(trailer, bytes);
  await file.write(0, bytes);
  await file.flush();
  if (file.resize && file.size > trailer + FOOTER_SIZE) {
    await file.resize(trailer + FOOTER_SIZE);
  }
  await file.flush();
}

/** The parent locators written for a parent named `name`: platform and UTF-16LE path. */
function locatorsFor(name: string): [string, Uint8Array][] {
  const windows = name.replaceAll("/", "\\");
  return name.startsWith("/") ? [["W2ku", encodeUtf16(windows, true)]] : [
    ["W2ru", encodeUtf16(".\\" + windows, true)],
    ["W2ku", encodeUtf16(windows, true)],
  ];
}

/**
 * `rebase` of a differencing VHD: the parent's name (UTF-16BE) and its
 * locators are rewritten (a locator's data in its old space when it fits,
 * else at the end of the file, the trailing footer after it), and, when
 * the new parent is given and is a VHD, its unique id and timestamp; with
 * no name the disk becomes a dynamic one (parent fields cleared). A VHD
 * without a parent is refused: its free blocks read as zeros, and would
 * read as the parent's bytes.
 */
async function setVpcBackingFile(
  file: Source & Sink,
  name: string | undefined,
  format?: string,
  backing?: Source,
): Promise<void> {
  const { state } = await vpcState(file, {});
  const { footer } = state;
  if (footer.diskType !== DISK_DIFFERENCING) {
    throw new UnsupportedError(
      { format: FORMAT, field: "footer.disk_type", value: footer.diskType },
      `a ${
        DISK_TYPE_NAMES[footer.diskType]
      } VHD does not take a parent here (its free blocks read as zeros); create a differencing one with convert -B`,
    );
  }
  if (format !== undefined && format !== FORMAT) {
    throw new UnsupportedError(
      { format: FORMAT, field: "backing_format", value: format },
      `a differencing VHD's parent is a VHD, not ${format}`,
    );
  }
  const headerAt = Number(footer.dataOffset);
  const dynamic = (await file.read(headerAt, DYNAMIC_HEADER_SIZE)).slice();
  const footerBytes = state.footerBytes.slice();
  let trailer = state.nextFree;
  const writes: [number, Uint8Array][] = [];
  dynamic.fill(0, 40, 576 + 8 * 24); // parent id, timestamp, name, locators
  if (name === undefined || name === "") {
    setBe32(footerBytes, 60, DISK_DYNAMIC);
  } else {
    if (backing && backing.size >= FOOTER_SIZE) {
      const parent = await readFooter(backing).catch(() => undefined);
      if (parent) {
        dynamic.set(parent.footer.uniqueId, 40);
        setBe32(dynamic, 56, parent.footer.timestamp);
      }
    }
    const base = name.slice(name.lastIndexOf("/") + 1);
    dynamic.set(encodeUtf16(base, false).subarray(0, 510), 64);
    const old = state.header!.locators;
    locatorsFor(name).forEach(([platform, data], i) => {
      const o = 576 + i * 24;
      const reuse = old[i] && old[i].dataSpace >= data.length &&
        old[i].dataOffset >= headerAt + DYNAMIC_HEADER_SIZE;
      const space = reuse
        ? old[i].dataSpace
        : Math.ceil(data.length / SECTOR) * SECTOR;
      const at = reuse ? old[i].dataOffset : trailer;
      if (!reuse) trailer += space;
      dynamic.set(new TextEncoder().encode(platform), o);
      setBe32(dynamic, o + 4, space);
      setBe32(dynamic, o + 8, data.length);
      setBe64(dynamic, o + 16, at);
      const padded = new Uint8Array(Math.ceil(data.length / SECTOR) * SECTOR);
      padded.set(data);
      writes.push([at, padded]);
    });
  }
  setBe32(dynamic, 36, vhdChecksum(dynamic, 36));
  setBe32(footerBytes, 64, vhdChecksum(footerBytes, 64));
  for (const [at, data] of writes) await file.write(at, data);
  await file.flush();
  await file.write(headerAt, dynamic);
  await file.write(trailer, footerBytes);
  await file.write(0, footerBytes);
  await file.flush();
}

/**
 * `measure` by the layout `create` writes: a fixed disk is its data (the
 * size rounded as qemu-img rounds it) and the footer; a dynamic one the
 * footer copy, dynamic header, BAT and trailing footer, and when fully
 * allocated every block with its sector bitmap. An image's own required
 * size is left to writing it.
 */
function measureVpc(
  subject: Source | number,
  options: Record<string, string> = {},
): Promise<{ required?: number; fullyAllocated: number }> {
  const subformat = options.subformat ?? "dynamic";
  if (subformat !== "dynamic" && subformat !== "fixed") {
    throw optionFail("subformat", subformat, '"dynamic" or "fixed"');
  }
  const forceSize = options.force_size ?? "off";
  if (forceSize !== "on" && forceSize !== "off") {
    throw optionFail("force_size", forceSize, '"on" or "off"');
  }
  checkWriteOptions(vpc, options);
  const bytes = typeof subject === "number" ? subject : subject.size;
  const requested = Math.ceil(bytes / SECTOR);
  if (requested > MAX_SECTORS) {
    throw fail(
      "size",
      bytes,
      `at most ${MAX_SECTORS * SECTOR} bytes (2040 GiB)`,
    );
  }
  const size = sizeAndGeometry(requested, forceSize === "on").sectors * SECTOR;
  if (subformat === "fixed") {
    return Promise.resolve({
      required: size + FOOTER_SIZE,
      fullyAllocated: size + FOOTER_SIZE,
    });
  }
  const entries = Math.ceil(size / CREATE_BLOCK_SIZE);
  const bitmap = Math.ceil(CREATE_BLOCK_SIZE / SECTOR / 8 / SECTOR) * SECTOR;
  const empty = FOOTER_SIZE + DYNAMIC_HEADER_SIZE +
    Math.ceil(entries * 4 / SECTOR) * SECTOR + FOOTER_SIZE;
  return Promise.resolve({
    required: typeof subject === "number" ? empty : undefined,
    fullyAllocated: empty + entries * (bitmap + CREATE_BLOCK_SIZE),
  });
}

async function createVpc(sink: Sink, spec: CreateSpec): Promise<Image> {
  requireRandomAccess(sink, FORMAT, "vpc images");
  const subformat = spec.options?.subformat ?? "dynamic";
  if (subformat !== "dynamic" && subformat !== "fixed") {
    throw optionFail("subformat", subformat, '"dynamic" or "fixed"');
  }
  const forceSize = spec.options?.force_size ?? "off";
  if (forceSize !== "on" && forceSize !== "off") {
    throw optionFail("force_size", forceSize, '"on" or "off"');
  }
  if (spec.backingFile !== undefined && subformat === "fixed") {
    throw new UnsupportedError(
      { format: FORMAT },
      "a fixed VHD cannot have a parent: use subformat=dynamic",
    );
  }
  if (spec.backingFormat !== undefined && spec.backingFormat !== FORMAT) {
    throw new UnsupportedError(
      { format: FORMAT },
      `a differencing VHD's parent is a VHD, not ${spec.backingFormat}`,
    );
  }
  const requested = Math.ceil(spec.size / SECTOR);
  if (requested > MAX_SECTORS) {
    throw fail(
      "size",
      spec.size,
      `at most ${MAX_SECTORS * SECTOR} bytes (2040 GiB)`,
    );
  }
  // Like qemu-img, the size is rounded up to what the CHS geometry can
  // state, so that readers using either rule agree; past the largest
  // geometry (about 127 GiB) current_size holds the size and the geometry
  // is the maximum, which every reader takes as "use current_size". With
  // force_size=on the size is kept exactly and the creator is `qem2`, the
  // creator QEMU reads by current_size.
  // A fixed image kept at its exact size is what Azure takes, which also
  // wants a whole number of MiB: such a size is rounded up to the next MiB
  // (the added bytes read as zeros) and the image says so in `warnings`.
  const azure = forceSize === "on" && subformat === "fixed" &&
    requested % MIB_SECTORS !== 0;
  const wanted = azure
    ? Math.ceil(requested / MIB_SECTORS) * MIB_SECTORS
    : requested;
  const creator = forceSize === "on" ? "qem2" : "vdtk";
  const { geometry, sectors } = sizeAndGeometry(wanted, forceSize === "on");
  const size = sectors * SECTOR;
  const diskType = spec.backingFile !== undefined
    ? DISK_DIFFERENCING
    : subformat === "fixed"
    ? DISK_FIXED
    : DISK_DYNAMIC;

  const footer = new Uint8Array(FOOTER_SIZE);
  footer.set(new TextEncoder().encode("conectix"), 0);
  setBe32(footer, 8, 2);
  setBe32(footer, 12, 0x00010000);
  setBe64(footer, 16, diskType === DISK_FIXED ? ALL_ONES : BigInt(FOOTER_SIZE));
  setBe32(footer, 24, vhdNow());
  footer.set(new TextEncoder().encode(creator), 28);
  setBe32(footer, 32, 0x00010000);
  footer.set(new TextEncoder().encode("Wi2k"), 36);
  setBe64(footer, 40, size);
  setBe64(footer, 48, size);
  setBe16(footer, 56, geometry.cylinders);
  footer[58] = geometry.heads;
  footer[59] = geometry.sectors;
  setBe32(footer, 60, diskType);
  const uuid = crypto.getRandomValues(new Uint8Array(16));
  uuid[6] = (uuid[6] & 0x0f) | 0x40;
  uuid[8] = (uuid[8] & 0x3f) | 0x80;
  footer.set(uuid, 68);
  setBe32(footer, 64, vhdChecksum(footer, 64));

  if (diskType === DISK_FIXED) {
    await sink.write(size, footer);
    await sink.resize?.(size + FOOTER_SIZE);
    await sink.flush();
  } else {
    const entries = Math.ceil(size / CREATE_BLOCK_SIZE);
    const tableOffset = FOOTER_SIZE + DYNAMIC_HEADER_SIZE;
    const batSize = Math.ceil((entries * 4) / SECTOR) * SECTOR;
    const header = new Uint8Array(DYNAMIC_HEADER_SIZE);
    header.set(new TextEncoder().encode("cxsparse"), 0);
    setBe64(header, 8, ALL_ONES);
    setBe64(header, 16, tableOffset);
    setBe32(header, 24, 0x00010000);
    setBe32(header, 28, entries);
    setBe32(header, 32, CREATE_BLOCK_SIZE);
    let end = tableOffset + batSize;
    const locatorData: [number, Uint8Array][] = [];
    if (spec.backingFile !== undefined) {
      const name = spec.backingFile;
      const base = name.slice(name.lastIndexOf("/") + 1);
      const unicode = encodeUtf16(base, false).subarray(0, 510);
      header.set(unicode, 64);
      const locators = locatorsFor(name);
      locators.forEach(([platform, data], i) => {
        const space = Math.ceil(data.length / SECTOR) * SECTOR;
        const o = 576 + i * 24;
        header.set(new TextEncoder().encode(platform), o);
        // Microsoft's tools store the space in bytes, as the spec's
        // examples do; it is rounded to whole sectors.
        setBe32(header, o + 4, space);
        setBe32(header, o + 8, data.length);
        setBe64(header, o + 16, end);
        locatorData.push([end, data]);
        end += space;
      });
    }
    setBe32(header, 36, vhdChecksum(header, 36));
    const bat = new Uint8Array(batSize).fill(0xff);
    await sink.write(0, footer);
    await sink.write(FOOTER_SIZE, header);
    await sink.write(tableOffset, bat);
    for (const [at, data] of locatorData) await sink.write(at, data);
    await sink.write(end, footer);
    await sink.flush();
  }
  // The sink grows as blocks are added; reads stay within what exists.
  const known = diskType === DISK_FIXED
    ? size + FOOTER_SIZE
    : FOOTER_SIZE + DYNAMIC_HEADER_SIZE;
  const source = readBackSource(sink, FORMAT, () => known);
  const image = await openVpc(source, { writable: true, sink });
  if (!azure) return image;
  return {
    ...image,
    warnings: [
      `vpc: the size ${spec.size} bytes is not a whole number of MiB: the fixed VHD is ${size} bytes (rounded up to the next MiB, the added bytes zeros), as Azure requires`,
    ],
  };
}

/**
 * The vpc driver: VHD images of Virtual PC, Hyper-V, Disk2VHD and QEMU.
 * Options: `force_size_calc=chs|current_size` when opening (QEMU's name);
 * `subformat=dynamic|fixed` and `force_size=on|off` when creating. A
 * differencing disk names its parent as `backingFile`; reading its
 * unallocated runs without the parent fails instead of returning zeros
 * (the image says so with `requiresBacking`).
 *
 * @example
 * ```ts
 * import { memorySink, vpc } from "../mod.ts";
 * const sink = memorySink();
 * const image = await vpc.create!(sink, { size: 1 << 20 });
 * await image.write!(0, new Uint8Array(512).fill(7));
 * await image.flush!();
 * console.log(image.size >= 1 << 20, (await image.read(0, 1))[0]); // true 7
 * ```
 */
export const vpc: Driver = {
  name: FORMAT,
  writeOptions: [
    {
      name: "subformat",
      help: "dynamic (sparse) or fixed (raw bytes and a footer)",
      values: ["dynamic", "fixed"],
      default: "dynamic",
    },
    {
      name: "force_size",
      help:
        "keep the size exactly instead of rounding to CHS geometry (a fixed image: to a whole MiB, as Azure requires)",
      values: ["on", "off"],
      default: "off",
    },
  ],
  description: "Virtual PC / Hyper-V VHD (fixed, dynamic, differencing)",
  probe: probeVpc,
  open: openVpc,
  create: createVpc,
  resize: resizeVpc,
  setBackingFile: setVpcBackingFile,
  measure: measureVpc,
};
