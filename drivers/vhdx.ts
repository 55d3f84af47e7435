/**
 * vhdx: Hyper-V's VHDX images (fixed, dynamic and differencing), read with
 * the log replayed in memory; fixed, dynamic and differencing ones created
 * (`create`, `convert -O vhdx`, `-b`/`-B` for a differencing one) and
 * written through (`write`, overlays, `commit` into them; in a differencing
 * one a block not wholly written is stored partially present: only its
 * written sectors, with their bits in the sector bitmap).
 *
 * This module is browser compatible.
 *
 * Described by Microsoft's [MS-VHDX] (version 1.0) and libyal's libvhdi
 * notes. Every field is little-endian; GUIDs are stored as Windows lays
 * them out (the first three fields little-endian).
 *
 * The file begins with five 64 KiB structures:
 *
 * | offset  | what                                                       |
 * | ------: | ---------------------------------------------------------- |
 * |       0 | file type identifier: `vhdxfile`, creator (UTF-16, 512 B)  |
 * |  64 KiB | header 1 (4 KiB used)                                      |
 * | 128 KiB | header 2                                                   |
 * | 192 KiB | region table 1                                             |
 * | 256 KiB | region table 2 (a copy)                                    |
 *
 * Header (4 KiB; the valid one with the larger sequence number is current):
 *
 * | offset | size | field                                                |
 * | -----: | ---: | ---------------------------------------------------- |
 * |      0 |    4 | signature `head`                                     |
 * |      4 |    4 | checksum: CRC-32C of the 4 KiB with this field zero  |
 * |      8 |    8 | sequence number                                      |
 * |     16 |   16 | file write GUID                                      |
 * |     32 |   16 | data write GUID (a parent's links its children)      |
 * |     48 |   16 | log GUID: all zeros when the log is empty            |
 * |     64 |    2 | log version (0)                                      |
 * |     66 |    2 | version (1)                                          |
 * |     68 |    4 | log length (a multiple of 1 MiB)                     |
 * |     72 |    8 | log offset (a multiple of 1 MiB)                     |
 *
 * Region table (64 KiB): signature `regi`, CRC-32C of the 64 KiB with its
 * field zero, entry count (at most 2047), then 32-byte entries: GUID, file
 * offset (8), length (4), required flag (4). The BAT region and the
 * metadata region are the two every file has.
 *
 * Metadata region: a 64 KiB table (signature `metadata`, entry count at
 * 10, 32-byte entries from 32: item GUID, offset from the region's start
 * (4), length (4), flags (4): bit 2 required) and the items: file
 * parameters (block size; flags: bit 0 leave blocks allocated, bit 1 has
 * parent), virtual disk size, page 83 data, logical and physical sector
 * size, and the parent locator of a differencing file (a type GUID, then
 * UTF-16 key/value pairs: `parent_linkage`, `relative_path`,
 * `absolute_win32_path`, ...).
 *
 * BAT: 64-bit entries, the state in bits 0-2 and the file offset in MiB
 * in bits 20-63. Payload block entries come in chunks of `chunk ratio`
 * (2^23 * logical sector size / block size), each chunk followed by the
 * entry of its sector bitmap block (1 MiB, one bit per logical sector,
 * bit 0 of byte 0 first: 1 means the sector is in this file). Payload
 * states: 0 not present, 1 undefined, 2 zero, 3 unmapped, 6 fully
 * present, 7 partially present (differencing files only); sector bitmap
 * states: 0 not present, 6 present.
 *
 * Log: a circular buffer of 4 KiB sectors holding entries (`loge` header
 * of 64 bytes with CRC-32C, entry length, tail, sequence number,
 * descriptor count, log GUID, flushed and last file offsets; 32-byte
 * `desc` and `zero` descriptors; 4 KiB `data` sectors carrying 4084 bytes
 * of each written sector, the first 8 and last 4 being in the descriptor).
 * A log whose GUID matches the header's must be replayed before anything
 * else is read: the entry with the largest sequence number is the head,
 * its tail names the first entry to replay. Here the replay happens in
 * memory, over a view of the file; the input is never written.
 *
 * @module
 */

import { probeVhdx } from "./_signatures.ts";
import { checkWriteOptions } from "../streams/options.ts";
import {
  ascii,
  formatErrors,
  isZero,
  le16,
  le32,
  le64,
  safeNumber,
  setLe16,
  setLe32,
  setLe64,
  uuidText,
  view,
} from "./_binary.ts";
import { blockReader, type BlockRun, wholeBlock } from "./_blocks.ts";
import {
  readBackSource,
  requireRandomAccess,
  serializedWrites,
  writeSink,
} from "./_image.ts";
import { crc32c } from "./codecs/crc32c.ts";
import {
  BackingFileError,
  check,
  ImageFormatError,
  UnsupportedError,
} from "../streams/errors.ts";
import type {
  CreateSpec,
  Driver,
  EncodeOptions,
  Extent,
  Image,
  OpenOptions,
  Sink,
  Source,
} from "../streams/types.ts";
import {
  checkRange,
  extentsOf,
  readInto,
  storesDataIn,
} from "../streams/types.ts";
import { fileMapOf } from "../streams/_file_map.ts";

const FORMAT = "vhdx";
const KiB = 1024;
const MiB = 1024 * KiB;
const HEADER_OFFSETS = [64 * KiB, 128 * KiB];
const HEADER_SIZE = 4 * KiB;
const REGION_OFFSETS = [192 * KiB, 256 * KiB];
const REGION_TABLE_SIZE = 64 * KiB;
const MAX_REGION_ENTRIES = 2047;
const METADATA_TABLE_SIZE = 64 * KiB;
const MAX_METADATA_ENTRIES = 2047;
const LOG_SECTOR = 4 * KiB;
/** The largest log read into memory to replay (Hyper-V and QEMU write 1 MiB). */
const MAX_LOG = 64 * MiB;
const MAX_VIRTUAL_SIZE = 64 * 1024 * 1024 * MiB; // 64 TiB
const MIN_BLOCK = MiB;
const MAX_BLOCK = 256 * MiB;
/** BAT pages (64 KiB, 8192 entries) kept in memory. */
const BAT_PAGE = 64 * KiB;
const BAT_CACHE = 256;
const BITMAP_CACHE = 1024;

const BAT_GUID = "2dc27766-f623-4200-9d64-115e9bfd4a08";
const METADATA_GUID = "8b7ca206-4790-4b9a-b8fe-575f050f886e";
const FILE_PARAMETERS = "caa16737-fa36-4d43-b3b6-33f0aa44e76b";
const VIRTUAL_DISK_SIZE = "2fa54224-cd1b-4876-b211-5dbed83bf4b8";
const PAGE_83 = "beca12ab-b2e6-4523-93ef-c309e000c746";
const LOGICAL_SECTOR = "8141bf1d-a96f-4709-ba47-f233a8faab5f";
const PHYSICAL_SECTOR = "cda348c7-445d-4471-9cc9-e9885251c556";
const PARENT_LOCATOR = "a8d35f2d-b30b-454d-abf7-d3d84834ab0c";
const VHDX_PARENT_TYPE = "b04aefb7-d19e-4a81-b789-25b8e9445913";

// Payload block states.
const NOT_PRESENT = 0;
const UNDEFINED = 1;
const ZERO = 2;
const UNMAPPED = 3;
const FULLY_PRESENT = 6;
const PARTIALLY_PRESENT = 7;
const SB_PRESENT = 6;

const fail = formatErrors(FORMAT);

/** A GUID as text (Windows layout: the first three fields little-endian). */
const guidAt = uuidText;

/** The 16 bytes of a GUID written as text. */
function guidBytes(text: string): Uint8Array {
  const hex = text.replaceAll("-", "");
  const raw = Array.from(
    { length: 16 },
    (_, i) => parseInt(hex.slice(i * 2, i * 2 + 2), 16),
  );
  const order = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15];
  return new Uint8Array(order.map((i) => raw[i]));
}

const ZERO_GUID = "00000000-0000-0000-0000-000000000000";

/** CRC-32C of `b` with the 4 bytes at `at` taken as zero. */
function checksumWithout(b: Uint8Array, at: number): number {
  let crc = crc32c(b.subarray(0, at));
  crc = crc32c(new Uint8Array(4), crc);
  return crc32c(b.subarray(at + 4), crc);
}

/** A parsed header. */
interface Header {
  index: number;
  sequence: bigint;
  fileWriteGuid: string;
  dataWriteGuid: string;
  logGuid: string;
  logVersion: number;
  version: number;
  logLength: number;
  logOffset: number;
}

/** Parses header `index` (0 or 1); a string says why it is not valid. */
function parseHeader(b: Uint8Array, index: number): Header | string {
  if (ascii(b, 0, 4) !== "head") {
    return `signature ${JSON.stringify(ascii(b, 0, 4))} is not "head"`;
  }
  const stored = le32(b, 4);
  const actual = checksumWithout(b, 4);
  if (stored !== actual) {
    return `checksum 0x${stored.toString(16)} does not match the CRC-32C 0x${
      actual.toString(16)
    }`;
  }
  const version = le16(b, 66);
  if (version !== 1) return `version ${version} is not 1`;
  return {
    index,
    sequence: le64(b, 8),
    fileWriteGuid: guidAt(b, 16),
    dataWriteGuid: guidAt(b, 32),
    logGuid: guidAt(b, 48),
    logVersion: le16(b, 64),
    version,
    logLength: le32(b, 68),
    logOffset: safeNumber(le64(b, 72), FORMAT, "header.log_offset", 72),
  };
}

/** The current header: the valid one with the larger sequence number. */
async function currentHeader(source: Source): Promise<Header> {
  const found: (Header | string)[] = [];
  for (let i = 0; i < 2; i++) {
    found.push(
      parseHeader(await source.read(HEADER_OFFSETS[i], HEADER_SIZE), i),
    );
  }
  const valid = found.filter((h): h is Header => typeof h !== "string");
  if (valid.length === 0) {
    throw new ImageFormatError(
      {
        format: FORMAT,
        field: "headers",
        value: "both invalid",
        offset: HEADER_OFFSETS[0],
        file: source.name,
      },
      `neither header is valid: header 1 (at 64 KiB): ${
        found[0]
      }; header 2 (at 128 KiB): ${found[1]}`,
    );
  }
  return valid.reduce((a, b) => (b.sequence > a.sequence ? b : a));
}

// ---------------------------------------------------------------------------
// The log, replayed in memory.

/** One valid log entry. */
interface LogEntry {
  at: number;
  length: number;
  tail: number;
  sequence: bigint;
  flushedFileOffset: bigint;
  lastFileOffset: bigint;
  /** In order: data sectors (4 KiB at `offset`) and zero runs. */
  writes: { offset: number; length: number; data?: Uint8Array }[];
}

/**
 * The file as it is once the log is replayed: `pages` (4 KiB at their
 * offset) and `zeros` (runs) laid over the bytes of `source`.
 */
function patchedSource(
  source: Source,
  pages: Map<number, Uint8Array>,
  zeros: { offset: number; length: number }[],
  size: number,
): Source {
  const keys = [...pages.keys()].sort((a, b) => a - b);
  return {
    size,
    name: source.name,
    async read(offset, length) {
      const out = new Uint8Array(length);
      const end = offset + length;
      const fromFile = Math.min(end, source.size) - offset;
      if (fromFile > 0) out.set(await source.read(offset, fromFile));
      for (const z of zeros) {
        const from = Math.max(offset, z.offset);
        const to = Math.min(end, z.offset + z.length);
        if (from < to) out.fill(0, from - offset, to - offset);
      }
      // Pages overlapping [offset, end): binary search for the first.
      let lo = 0;
      let hi = keys.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (keys[mid] + LOG_SECTOR <= offset) lo = mid + 1;
        else hi = mid;
      }
      for (let i = lo; i < keys.length && keys[i] < end; i++) {
        const page = pages.get(keys[i])!;
        const from = Math.max(offset, keys[i]);
        const to = Math.min(end, keys[i] + LOG_SECTOR);
        out.set(
          page.subarray(from - keys[i], to - keys[i]),
          from - offset,
        );
      }
      return out;
    },
    close: () => source.close?.() ?? Promise.resolve(),
  };
}

/**
 * Finds the active sequence of the log and returns the file as it is
 * after replaying it (the source itself when there is nothing to replay),
 * with the number of entries replayed.
 */
async function replayLog(
  source: Source,
  header: Header,
): Promise<{ source: Source; replayed: number }> {
  const { logOffset, logLength, logGuid } = header;
  if (logGuid === ZERO_GUID || logLength === 0) return { source, replayed: 0 };
  const headerAt = HEADER_OFFSETS[header.index];
  if (header.logVersion !== 0) {
    throw fail("header.log_version", header.logVersion, "0", headerAt + 64);
  }
  if (logLength % MiB !== 0) {
    throw fail(
      "header.log_length",
      logLength,
      "a multiple of 1 MiB",
      headerAt + 68,
    );
  }
  if (
    logOffset < MiB || logOffset % MiB !== 0 ||
    logOffset + logLength > source.size
  ) {
    throw fail(
      "header.log_offset",
      logOffset,
      `a multiple of 1 MiB from 1 MiB, the log's ${logLength} bytes within the file's ${source.size}`,
      headerAt + 72,
      source.name,
    );
  }
  if (logLength > MAX_LOG) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "header.log_length",
        value: logLength,
        limit: `at most ${MAX_LOG}`,
        offset: headerAt + 68,
      },
      `the log (${logLength} bytes) must be replayed, and logs over ${MAX_LOG} bytes are not replayed here`,
    );
  }
  const log = await source.read(logOffset, logLength);
  const L = logLength;
  /** Bytes of the circular log from `at`, `length` long. */
  const span = (at: number, length: number): Uint8Array => {
    at %= L;
    if (at + length <= L) return log.subarray(at, at + length);
    const out = new Uint8Array(length);
    out.set(log.subarray(at));
    out.set(log.subarray(0, length - (L - at)), L - at);
    return out;
  };
  // Validating an entry checksums its whole length: a forged log could
  // make every sector claim the whole log, so the checksummed bytes are
  // capped (a real log checksums each of its bytes about once).
  let budget = 8 * L;
  const memo = new Map<number, LogEntry | undefined>();
  const entryAt = (at: number): LogEntry | undefined => {
    if (memo.has(at)) return memo.get(at);
    const entry = parseEntry(at);
    memo.set(at, entry);
    return entry;
  };
  const parseEntry = (at: number): LogEntry | undefined => {
    const head = log.subarray(at, at + LOG_SECTOR);
    if (ascii(head, 0, 4) !== "loge") return undefined;
    const length = le32(head, 8);
    const sequence = le64(head, 16);
    const count = le32(head, 24);
    if (
      length === 0 || length % LOG_SECTOR !== 0 || length > L ||
      sequence === 0n || guidAt(head, 32) !== logGuid
    ) {
      return undefined;
    }
    const descSectors = Math.ceil((count + 2) / 128);
    if (descSectors * LOG_SECTOR > length) return undefined;
    budget -= length;
    if (budget < 0) {
      throw new UnsupportedError(
        { format: FORMAT, field: "log" },
        "the log's entries overlap too much to be searched within bounds; it cannot be replayed",
      );
    }
    const whole = span(at, length);
    if (le32(whole, 4) !== checksumWithout(whole, 4)) return undefined;
    const writes: LogEntry["writes"] = [];
    let dataAt = descSectors * LOG_SECTOR;
    for (let i = 0; i < count; i++) {
      const d = whole.subarray(64 + i * 32, 96 + i * 32);
      const kind = ascii(d, 0, 4);
      if (le64(d, 24) !== sequence) return undefined;
      const offset = le64(d, 16);
      if (offset % BigInt(LOG_SECTOR) !== 0n || offset > BigInt(2 ** 52)) {
        return undefined;
      }
      if (kind === "zero") {
        const n = le64(d, 8);
        if (n % BigInt(LOG_SECTOR) !== 0n || n > BigInt(2 ** 52)) {
          return undefined;
        }
        writes.push({ offset: Number(offset), length: Number(n) });
      } else if (kind === "desc") {
        if (dataAt + LOG_SECTOR > length) return undefined;
        const s = whole.subarray(dataAt, dataAt + LOG_SECTOR);
        dataAt += LOG_SECTOR;
        const seq = (BigInt(le32(s, 4)) << 32n) | BigInt(le32(s, 4092));
        if (ascii(s, 0, 4) !== "data" || seq !== sequence) return undefined;
        const data = new Uint8Array(LOG_SECTOR);
        data.set(d.subarray(8, 16), 0); // leading bytes
        data.set(s.subarray(8, 4092), 8);
        data.set(d.subarray(4, 8), 4092); // trailing bytes
        writes.push({ offset: Number(offset), length: LOG_SECTOR, data });
      } else {
        return undefined;
      }
    }
    return {
      at,
      length,
      tail: le32(head, 12),
      sequence,
      flushedFileOffset: le64(head, 48),
      lastFileOffset: le64(head, 56),
      writes,
    };
  };
  let head: LogEntry | undefined;
  for (let at = 0; at < L; at += LOG_SECTOR) {
    const e = entryAt(at);
    if (e && (!head || e.sequence > head.sequence)) head = e;
  }
  if (!head) return { source, replayed: 0 };
  // The active sequence runs from the head's tail to the head, each entry
  // the next sequence number after the one before it.
  if (head.tail % LOG_SECTOR !== 0 || head.tail >= L) {
    throw fail(
      "log entry tail",
      head.tail,
      `a 4 KiB sector of the ${L}-byte log`,
      logOffset + head.at + 12,
      source.name,
    );
  }
  const sequence: LogEntry[] = [];
  let e = entryAt(head.tail);
  for (let steps = 0; e !== head; steps++) {
    const previous = sequence.at(-1);
    if (
      !e || steps > L / LOG_SECTOR ||
      (previous && e.sequence !== previous.sequence + 1n)
    ) {
      throw new ImageFormatError(
        {
          format: FORMAT,
          field: "log",
          value: `head ${head.sequence} at ${head.at}`,
          offset: logOffset + head.at,
          file: source.name,
        },
        `the log's active sequence is broken between its tail (at ${head.tail}) and its head (sequence ${head.sequence}): it cannot be replayed`,
      );
    }
    sequence.push(e);
    e = entryAt((e.at + e.length) % L);
  }
  const previous = sequence.at(-1);
  if (previous && head.sequence !== previous.sequence + 1n) {
    throw new ImageFormatError(
      { format: FORMAT, field: "log", file: source.name },
      `the log's head (sequence ${head.sequence}) does not follow entry ${previous.sequence}: it cannot be replayed`,
    );
  }
  sequence.push(head);
  if (head.flushedFileOffset > BigInt(source.size)) {
    throw fail(
      "log entry flushed_file_offset",
      head.flushedFileOffset,
      `at most the file's size ${source.size} (the file is truncated)`,
      logOffset + head.at + 48,
      source.name,
    );
  }
  const pages = new Map<number, Uint8Array>();
  const zeros: { offset: number; length: number }[] = [];
  let size = Math.max(
    source.size,
    Number(
      head.lastFileOffset < BigInt(2 ** 52) ? head.lastFileOffset : 0n,
    ),
  );
  for (const entry of sequence) {
    for (const w of entry.writes) {
      size = Math.max(size, w.offset + w.length);
      if (w.data) {
        pages.set(w.offset, w.data);
        continue;
      }
      for (const key of [...pages.keys()]) {
        if (key >= w.offset && key < w.offset + w.length) pages.delete(key);
      }
      zeros.push({ offset: w.offset, length: w.length });
    }
  }
  return {
    source: patchedSource(source, pages, zeros, size),
    replayed: sequence.length,
  };
}

// ---------------------------------------------------------------------------
// Region table and metadata.

interface Region {
  guid: string;
  offset: number;
  length: number;
  required: boolean;
}

function parseRegionTable(b: Uint8Array, at: number): Region[] | string {
  if (ascii(b, 0, 4) !== "regi") {
    return `signature ${JSON.stringify(ascii(b, 0, 4))} is not "regi"`;
  }
  const stored = le32(b, 4);
  const actual = checksumWithout(b, 4);
  if (stored !== actual) {
    return `checksum 0x${stored.toString(16)} does not match the CRC-32C 0x${
      actual.toString(16)
    }`;
  }
  const count = le32(b, 8);
  if (count > MAX_REGION_ENTRIES) {
    return `entry count ${count} is over ${MAX_REGION_ENTRIES}`;
  }
  const regions: Region[] = [];
  for (let i = 0; i < count; i++) {
    const o = 16 + i * 32;
    regions.push({
      guid: guidAt(b, o),
      offset: safeNumber(
        le64(b, o + 16),
        FORMAT,
        `region[${i}].offset`,
        at + o + 16,
      ),
      length: le32(b, o + 24),
      required: (le32(b, o + 28) & 1) !== 0,
    });
  }
  return regions;
}

async function regionTable(source: Source): Promise<Region[]> {
  const why: string[] = [];
  for (const at of REGION_OFFSETS) {
    const found = parseRegionTable(
      await source.read(at, REGION_TABLE_SIZE),
      at,
    );
    if (typeof found !== "string") return found;
    why.push(found);
  }
  throw new ImageFormatError(
    {
      format: FORMAT,
      field: "region tables",
      value: "both invalid",
      offset: REGION_OFFSETS[0],
      file: source.name,
    },
    `neither region table is valid: table 1 (at 192 KiB): ${
      why[0]
    }; table 2 (at 256 KiB): ${why[1]}`,
  );
}

/** What the metadata region says. */
interface Metadata {
  blockSize: number;
  leaveBlocksAllocated: boolean;
  hasParent: boolean;
  virtualSize: number;
  logicalSectorSize: number;
  physicalSectorSize: number;
  page83?: string;
  parentLocator?: Record<string, string>;
  parentType?: string;
}

function utf16(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i + 1 < b.length; i += 2) {
    s += String.fromCharCode(b[i] | (b[i + 1] << 8));
  }
  return s;
}

async function readMetadata(source: Source, region: Region): Promise<Metadata> {
  const base = region.offset;
  check(region.length >= METADATA_TABLE_SIZE, {
    format: FORMAT,
    field: "metadata region length",
    value: region.length,
    limit: `at least ${METADATA_TABLE_SIZE}`,
  });
  const table = await source.read(base, METADATA_TABLE_SIZE);
  if (ascii(table, 0, 8) !== "metadata") {
    throw fail(
      "metadata.signature",
      ascii(table, 0, 8),
      '"metadata"',
      base,
      source.name,
    );
  }
  const count = le16(table, 10);
  if (count > MAX_METADATA_ENTRIES) {
    throw fail(
      "metadata.entry_count",
      count,
      `at most ${MAX_METADATA_ENTRIES}`,
      base + 10,
    );
  }
  const items = new Map<string, Uint8Array>();
  for (let i = 0; i < count; i++) {
    const o = 32 + i * 32;
    const guid = guidAt(table, o);
    const offset = le32(table, o + 16);
    const length = le32(table, o + 20);
    const flags = le32(table, o + 24);
    const known = [
      FILE_PARAMETERS,
      VIRTUAL_DISK_SIZE,
      PAGE_83,
      LOGICAL_SECTOR,
      PHYSICAL_SECTOR,
      PARENT_LOCATOR,
    ].includes(guid);
    if (!known) {
      if (flags & 4) {
        throw new UnsupportedError(
          {
            format: FORMAT,
            field: `metadata[${i}]`,
            value: guid,
            offset: base + o,
          },
          `the required metadata item ${guid} is not one this reader knows`,
        );
      }
      continue;
    }
    if (length === 0) continue;
    if (
      offset < METADATA_TABLE_SIZE || offset + length > region.length ||
      length > MiB
    ) {
      throw fail(
        `metadata[${i}] (${guid})`,
        `${length} bytes at ${offset}`,
        `within the metadata region's ${region.length} bytes, past its 64 KiB table, at most 1 MiB`,
        base + o + 16,
        source.name,
      );
    }
    items.set(guid, await source.read(base + offset, length));
  }
  const need = (guid: string, name: string, size: number): Uint8Array => {
    const item = items.get(guid);
    if (!item || item.length < size) {
      throw fail(
        `metadata ${name}`,
        item ? `${item.length} bytes` : "missing",
        `present, at least ${size} bytes`,
        base,
        source.name,
      );
    }
    return item;
  };
  const params = need(FILE_PARAMETERS, "file parameters", 8);
  const blockSize = le32(params, 0);
  if (
    blockSize < MIN_BLOCK || blockSize > MAX_BLOCK ||
    (blockSize & (blockSize - 1)) !== 0
  ) {
    throw fail(
      "file parameters block_size",
      blockSize,
      `a power of two from ${MIN_BLOCK} to ${MAX_BLOCK}`,
    );
  }
  const flags = le32(params, 4);
  const logicalSectorSize = le32(
    need(LOGICAL_SECTOR, "logical sector size", 4),
    0,
  );
  if (logicalSectorSize !== 512 && logicalSectorSize !== 4096) {
    throw fail("logical_sector_size", logicalSectorSize, "512 or 4096");
  }
  const physicalSectorSize = le32(
    need(PHYSICAL_SECTOR, "physical sector size", 4),
    0,
  );
  if (physicalSectorSize !== 512 && physicalSectorSize !== 4096) {
    throw fail("physical_sector_size", physicalSectorSize, "512 or 4096");
  }
  const sizeValue = le64(need(VIRTUAL_DISK_SIZE, "virtual disk size", 8), 0);
  if (
    sizeValue > BigInt(MAX_VIRTUAL_SIZE) ||
    sizeValue % BigInt(logicalSectorSize) !== 0n
  ) {
    throw fail(
      "virtual_disk_size",
      sizeValue,
      `a multiple of the logical sector size ${logicalSectorSize}, at most 64 TiB`,
    );
  }
  const metadata: Metadata = {
    blockSize,
    leaveBlocksAllocated: (flags & 1) !== 0,
    hasParent: (flags & 2) !== 0,
    virtualSize: Number(sizeValue),
    logicalSectorSize,
    physicalSectorSize,
  };
  const page83 = items.get(PAGE_83);
  if (page83 && page83.length >= 16) metadata.page83 = guidAt(page83, 0);
  const locator = items.get(PARENT_LOCATOR);
  if (metadata.hasParent) {
    if (!locator || locator.length < 20) {
      throw fail(
        "metadata parent locator",
        locator ? `${locator.length} bytes` : "missing",
        "present in a differencing file (file parameters has_parent)",
        base,
        source.name,
      );
    }
    metadata.parentType = guidAt(locator, 0);
    if (metadata.parentType !== VHDX_PARENT_TYPE) {
      throw new UnsupportedError(
        {
          format: FORMAT,
          field: "parent locator type",
          value: metadata.parentType,
        },
        `parent locator type ${metadata.parentType} is not the VHDX one (${VHDX_PARENT_TYPE})`,
      );
    }
    const pairs = le16(locator, 18);
    const entries: Record<string, string> = {};
    for (let i = 0; i < pairs; i++) {
      const o = 20 + i * 12;
      if (o + 12 > locator.length) {
        throw fail(
          "parent locator key_value_count",
          pairs,
          `entries within the item's ${locator.length} bytes`,
        );
      }
      const keyAt = le32(locator, o);
      const valueAt = le32(locator, o + 4);
      const keyLength = le16(locator, o + 8);
      const valueLength = le16(locator, o + 10);
      if (
        keyAt + keyLength > locator.length ||
        valueAt + valueLength > locator.length
      ) {
        throw fail(
          `parent locator entry ${i}`,
          `key ${keyLength} bytes at ${keyAt}, value ${valueLength} at ${valueAt}`,
          `within the item's ${locator.length} bytes`,
        );
      }
      entries[utf16(locator.subarray(keyAt, keyAt + keyLength))] = utf16(
        locator.subarray(valueAt, valueAt + valueLength),
      );
    }
    metadata.parentLocator = entries;
  }
  return metadata;
}

/** The parent's file name from the locator, as a relative path when there is one. */
function parentName(locator: Record<string, string>): string | undefined {
  const relative = locator["relative_path"];
  if (relative) return relative.replaceAll("\\", "/").replace(/^(\.\/)+/, "");
  const absolute = locator["absolute_win32_path"];
  // Without a drive letter (as this toolkit writes a POSIX path): `/`s.
  if (absolute && /^\\[^\\?]/.test(absolute)) {
    return absolute.replaceAll("\\", "/");
  }
  return absolute ?? locator["volume_path"];
}

// ---------------------------------------------------------------------------
// Opening.

async function openVhdx(
  input: Source,
  options: OpenOptions & { fillFrom?: Source },
): Promise<Image> {
  const sink = writeSink(options, FORMAT);
  check(input.size >= MiB, {
    format: FORMAT,
    field: "file size",
    value: input.size,
    limit: "at least 1 MiB (the headers and region tables)",
    file: input.name,
  });
  const fileId = await input.read(0, 8);
  check(ascii(fileId) === "vhdxfile", {
    format: FORMAT,
    field: "file type identifier",
    value: ascii(fileId),
    limit: '"vhdxfile"',
    offset: 0,
    file: input.name,
  });
  const header = await currentHeader(input);
  const { source, replayed } = await replayLog(input, header);
  const regions = await regionTable(source);
  let bat: Region | undefined;
  let meta: Region | undefined;
  for (const [i, r] of regions.entries()) {
    if (r.guid === BAT_GUID) bat = r;
    else if (r.guid === METADATA_GUID) meta = r;
    else if (r.required) {
      throw new UnsupportedError(
        { format: FORMAT, field: `region[${i}]`, value: r.guid },
        `the required region ${r.guid} is not one this reader knows`,
      );
    }
    if (
      r.offset < MiB || r.offset % MiB !== 0 || r.length % MiB !== 0 ||
      r.offset + r.length > source.size
    ) {
      throw fail(
        `region[${i}] (${r.guid})`,
        `${r.length} bytes at ${r.offset}`,
        `1 MiB aligned, from 1 MiB, within the file's ${source.size} bytes`,
        REGION_OFFSETS[0] + 16 + i * 32 + 16,
        source.name,
      );
    }
  }
  if (!bat || !meta) {
    throw fail(
      "region table",
      `${regions.length} regions`,
      "a BAT region and a metadata region",
      REGION_OFFSETS[0],
      source.name,
    );
  }
  const metadata = await readMetadata(source, meta);
  const { blockSize, virtualSize, logicalSectorSize, hasParent } = metadata;
  const chunkRatio = (2 ** 23 * logicalSectorSize) / blockSize;
  const payloadBlocks = Math.ceil(virtualSize / blockSize);
  const bitmapBlocks = Math.ceil(payloadBlocks / chunkRatio);
  const entries = hasParent
    ? bitmapBlocks * (chunkRatio + 1)
    : payloadBlocks + Math.floor(Math.max(0, payloadBlocks - 1) / chunkRatio);
  if (entries * 8 > bat.length) {
    throw fail(
      "BAT region length",
      bat.length,
      `at least ${
        entries * 8
      } bytes (${entries} entries for ${payloadBlocks} blocks of ${blockSize})`,
      undefined,
      source.name,
    );
  }
  const sectorsPerBlock = blockSize / logicalSectorSize;

  // BAT pages are read and checked as they are first needed.
  const batPages = new Map<number, Float64Array>();
  async function batEntry(index: number): Promise<number> {
    const page = Math.floor((index * 8) / BAT_PAGE);
    let entries = batPages.get(page);
    if (!entries) {
      const from = page * BAT_PAGE;
      const length = Math.min(BAT_PAGE, bat!.length - from);
      const bytes = await source.read(bat!.offset + from, length);
      entries = new Float64Array(length / 8);
      // One DataView for the page (le32 makes one per call: 16384 for a
      // 64 KiB page, a few milliseconds of a small image's convert).
      const words = view(bytes);
      for (let i = 0; i < entries.length; i++) {
        const lo = words.getUint32(i * 8, true);
        const hi = words.getUint32(i * 8 + 4, true);
        // State in bits 0-2; file offset in MiB in bits 20-63 (as a
        // number: at most 2^44 MiB, so MiB * offset stays exact).
        const offsetMiB = (lo >>> 20) + hi * 4096;
        entries[i] = offsetMiB * 8 + (lo & 7);
      }
      batPages.set(page, entries);
      if (batPages.size > BAT_CACHE) {
        batPages.delete(batPages.keys().next().value!);
      }
    }
    return entries[index - (page * BAT_PAGE) / 8];
  }

  const bitmaps = new Map<number, Uint8Array>();
  async function bitmapOf(block: number): Promise<Uint8Array> {
    const hit = bitmaps.get(block);
    if (hit) return hit;
    const chunk = Math.floor(block / chunkRatio);
    const index = chunk * (chunkRatio + 1) + chunkRatio;
    const entry = await batEntry(index);
    const state = entry % 8;
    const at = Math.floor(entry / 8) * MiB;
    if (state !== SB_PRESENT || at < MiB || at + MiB > source.size) {
      throw fail(
        `BAT[${index}] (sector bitmap of chunk ${chunk})`,
        `state ${state}, at ${at}`,
        `present (6), its 1 MiB within the file's ${source.size} bytes, for partially present block ${block}`,
        bat!.offset + index * 8,
        source.name,
      );
    }
    const bitmap = await source.read(
      at + ((block % chunkRatio) * sectorsPerBlock) / 8,
      sectorsPerBlock / 8,
    );
    bitmaps.set(block, bitmap);
    if (bitmaps.size > BITMAP_CACHE) {
      bitmaps.delete(bitmaps.keys().next().value!);
    }
    return bitmap;
  }

  async function lookup(block: number): Promise<BlockRun[]> {
    const length = Math.min(blockSize, virtualSize - block * blockSize);
    const index = block + Math.floor(block / chunkRatio);
    const entry = await batEntry(index);
    const state = entry % 8;
    const at = Math.floor(entry / 8) * MiB;
    const bad = (why: string) =>
      fail(
        `BAT[${index}] (block ${block})`,
        `state ${state}, at ${at}`,
        why,
        bat!.offset + index * 8,
        source.name,
      );
    switch (state) {
      case NOT_PRESENT:
        return wholeBlock(length, "unallocated");
      case UNDEFINED:
      case ZERO:
      case UNMAPPED:
        return wholeBlock(length, "zero");
      case FULLY_PRESENT:
      case PARTIALLY_PRESENT: {
        if (at < MiB || at + length > source.size) {
          throw bad(
            `a block of ${length} bytes from 1 MiB within the file's ${source.size} bytes`,
          );
        }
        if (state === FULLY_PRESENT) return wholeBlock(length, "data", at);
        if (!hasParent) {
          throw bad("not partially present (7) in a file without a parent");
        }
        const bitmap = await bitmapOf(block);
        const runs: BlockRun[] = [];
        const sector = logicalSectorSize;
        for (let s = 0; s * sector < length;) {
          const present = (bitmap[s >> 3] & (1 << (s & 7))) !== 0;
          let e = s + 1;
          while (
            e * sector < length &&
            ((bitmap[e >> 3] & (1 << (e & 7))) !== 0) === present
          ) e++;
          runs.push({
            from: s * sector,
            to: Math.min(length, e * sector),
            kind: present ? "data" : "unallocated",
            at: present ? at + s * sector : undefined,
          });
          s = e;
        }
        return runs;
      }
      default:
        throw bad("0, 1, 2, 3, 6 or 7 (4 and 5 are reserved)");
    }
  }

  const backingFile = hasParent && metadata.parentLocator
    ? parentName(metadata.parentLocator)
    : undefined;
  const reader = blockReader({
    source,
    size: virtualSize,
    blockSize,
    lookup,
    unallocated(offset, length) {
      if (!hasParent) return;
      throw new BackingFileError(
        `vhdx: bytes ${offset}..${
          offset + length
        } of this differencing disk are in its parent ${
          JSON.stringify(backingFile ?? "")
        }, which was not opened: open it through the registry with resolveBacking`,
        backingFile ?? "",
      );
    },
  });
  const details: Record<string, unknown> = {
    subformat: hasParent
      ? "differencing"
      : metadata.leaveBlocksAllocated
      ? "fixed"
      : "dynamic",
    blockSize,
    logicalSectorSize,
    physicalSectorSize: metadata.physicalSectorSize,
    logSize: header.logLength,
    activeHeader: header.index + 1,
    headerSequence: header.sequence.toString(),
    dataWriteGuid: header.dataWriteGuid,
    logReplayedInMemory: replayed,
    ...(metadata.page83 ? { diskId: metadata.page83 } : {}),
  };
  if (hasParent) {
    details.parentLocator = metadata.parentLocator;
    details.parentLocatorType = metadata.parentType;
  }
  // The parent is the file whose data write GUID is parent_linkage: a
  // file of that name with other data is refused (registry, backingId).
  const linkage = metadata.parentLocator?.["parent_linkage"];
  const image: Image & { readonly requiresBacking: boolean } = {
    format: FORMAT,
    size: virtualSize,
    name: input.name,
    encrypted: false,
    backingFile,
    backingFormat: backingFile === undefined ? undefined : FORMAT,
    backingId: backingFile !== undefined && linkage !== undefined
      ? `vhdx ${linkage.replace(/^\{|\}$/g, "").toLowerCase()}`
      : undefined,
    id: `vhdx ${header.dataWriteGuid}`,
    requiresBacking: hasParent,
    details,
    ...reader,
    close: () => input.close?.() ?? Promise.resolve(),
  };
  // Read-only, stored blocks read as their bytes in `source` (the file, or
  // the file with its log replayed over it, which convert reads instead of
  // copying): convert copies them file to file (in the kernel).
  if (!sink) return storesDataIn(image, source);
  if (header.logGuid !== ZERO_GUID) {
    throw new UnsupportedError(
      { format: FORMAT, field: "header.log_guid", value: header.logGuid },
      "this vhdx has a log to replay: it is replayed in memory for reading, never written; open it read-only (or convert it)",
    );
  }
  // Writes. A block not stored yet is stored at the end of the file (its
  // BAT entry updated in place after its bytes are written). In a file
  // without a parent the block is stored whole (zeros around the bytes
  // written). In a differencing file only the written sectors are: the
  // block becomes partially present, the sectors' bits set in its chunk's
  // sector bitmap block (allocated, 1 MiB of zeros, with the chunk's first
  // such block), and the other sectors read from the parent. The BAT is
  // not written through the log: an interrupted write can leave space
  // stored but unmapped (lost, never wrong bytes); a block's bitmap bits
  // are written before its entry says partially present, and a new
  // block's whole slice of the bitmap is written, so stale bits from an
  // interrupted write are cleared.
  //
  // A write covering only part of a logical sector the file does not hold
  // needs the rest of that sector: from the parent when `create` made the
  // file (`fillFrom`), as zeros when the registry stacks this file on its
  // parent (the overlay then copies the parent's bytes into the rest, as
  // for any cluster a write allocates); otherwise it is refused.
  const parentBytes = hasParent ? options.fillFrom : undefined;
  const inOverlay = hasParent && backingFile !== undefined &&
    options.resolveBacking !== undefined;
  let nextFree = Math.ceil(source.size / MiB) * MiB;
  const batAt = bat.offset;
  const sector = logicalSectorSize;
  async function setEntry(index: number, state: number, at: number) {
    const bytes = new Uint8Array(8);
    const offsetMiB = at / MiB;
    setLe32(bytes, 0, (state | ((offsetMiB % 4096) << 20)) >>> 0);
    setLe32(bytes, 4, Math.floor(offsetMiB / 4096));
    await sink!.write(batAt + index * 8, bytes);
    const page = batPages.get(Math.floor((index * 8) / BAT_PAGE));
    if (page) {
      page[index - (Math.floor((index * 8) / BAT_PAGE) * BAT_PAGE) / 8] =
        offsetMiB * 8 + state;
    }
  }
  /** The file offset of `block`'s chunk's sector bitmap block, allocated when absent. */
  async function bitmapBlockFor(block: number): Promise<number> {
    const chunk = Math.floor(block / chunkRatio);
    const index = chunk * (chunkRatio + 1) + chunkRatio;
    const entry = await batEntry(index);
    const state = entry % 8;
    const at = Math.floor(entry / 8) * MiB;
    if (state === NOT_PRESENT) {
      const fresh = nextFree;
      nextFree += MiB;
      await sink!.write(fresh, new Uint8Array(MiB));
      await setEntry(index, SB_PRESENT, fresh);
      return fresh;
    }
    if (state !== SB_PRESENT || at < MiB || at + MiB > source.size) {
      throw fail(
        `BAT[${index}] (sector bitmap of chunk ${chunk})`,
        `state ${state}, at ${at}`,
        `not present (0) or present (6) with its 1 MiB within the file's ${source.size} bytes`,
        batAt + index * 8,
        source.name,
      );
    }
    return at;
  }
  /** Sector `s` of `block` as it reads now, for a write covering part of it. */
  async function sectorBefore(
    block: number,
    s: number,
    runs: BlockRun[],
  ): Promise<Uint8Array> {
    const from = s * sector;
    const run = runs.find((r) => r.from <= from && from < r.to)!;
    if (run.kind === "data") {
      return await source.read(run.at! + from - run.from, sector);
    }
    if (run.kind !== "unallocated") return new Uint8Array(sector);
    const out = new Uint8Array(sector);
    const at = block * blockSize + from;
    if (parentBytes) {
      const inside = Math.min(sector, parentBytes.size - at);
      if (inside > 0) out.set(await parentBytes.read(at, inside));
      return out;
    }
    if (inOverlay) return out; // the overlay copies the parent's bytes in
    throw parentNeeded(block, s);
  }
  function parentNeeded(block: number, s: number) {
    return new UnsupportedError(
      {
        format: FORMAT,
        field: `block ${block} sector ${s}`,
        value: "in the parent",
      },
      `a write of part of a ${sector}-byte logical sector this differencing vhdx does not hold needs its parent's bytes: write whole sectors, or open it with its parent (resolveBacking)`,
    );
  }
  /**
   * Refuses, before anything is written, a write whose first or last
   * logical sector is partly covered and in the parent, when the parent's
   * bytes are not at hand.
   */
  async function checkSectorsAtHand(offset: number, length: number) {
    if (!hasParent || parentBytes || inOverlay) return;
    for (const edge of [offset, offset + length]) {
      if (edge % sector === 0) continue;
      const block = Math.floor(edge / blockSize);
      const from = edge - block * blockSize;
      const run = (await lookup(block)).find((r) =>
        r.from <= from && from < r.to
      );
      if (run?.kind === "unallocated") {
        throw parentNeeded(block, Math.floor(from / sector));
      }
    }
  }
  async function writeBlockPart(
    block: number,
    within: number,
    part: Uint8Array,
  ) {
    const runs = await lookup(block);
    if (runs.length === 1 && runs[0].kind === "data") {
      await sink!.write(runs[0].at! + within, part);
      return;
    }
    const index = block + Math.floor(block / chunkRatio);
    const length = runs.at(-1)!.to;
    const first = Math.floor(within / sector);
    const last = Math.ceil((within + part.length) / sector);
    const entry = await batEntry(index);
    const state = entry % 8;
    // (A write of the whole block stores it whole; any less, in a
    // differencing file, keeps the parent's bytes around it.)
    const partial = hasParent &&
      (state === PARTIALLY_PRESENT || state === NOT_PRESENT) &&
      !(within === 0 && part.length === length);
    if (state === PARTIALLY_PRESENT && !partial) {
      // Every sector written: the block is fully present where it is.
      await sink!.write(Math.floor(entry / 8) * MiB, part);
      await setEntry(index, FULLY_PRESENT, Math.floor(entry / 8) * MiB);
      return;
    }
    if (!partial) {
      // Stored whole: zeros (or, made by create over its parent, the
      // parent's bytes) around the bytes written.
      const at = nextFree;
      nextFree += blockSize;
      const whole = new Uint8Array(blockSize);
      if (parentBytes && runs[0].kind === "unallocated") {
        const from = block * blockSize;
        const inside = Math.min(blockSize, parentBytes.size - from);
        if (inside > 0) whole.set(await parentBytes.read(from, inside));
      }
      whole.set(part, within);
      await sink!.write(at, whole);
      await setEntry(index, FULLY_PRESENT, at);
      return;
    }
    // Whole logical sectors, the ends completed from what they read now.
    let bytes = part;
    if (first * sector !== within || last * sector !== within + part.length) {
      bytes = new Uint8Array((last - first) * sector);
      bytes.set(await sectorBefore(block, first, runs), 0);
      if (last - 1 > first) {
        bytes.set(
          await sectorBefore(block, last - 1, runs),
          (last - 1 - first) * sector,
        );
      }
      bytes.set(part, within - first * sector);
    }
    const bitmapAt = await bitmapBlockFor(block) +
      ((block % chunkRatio) * sectorsPerBlock) / 8;
    let at: number;
    let bits: Uint8Array;
    if (state === NOT_PRESENT) {
      at = nextFree;
      nextFree += blockSize;
      // The block's whole length in the file (its last sector a zero one
      // unless written), then the data.
      if (last * sector < blockSize) {
        await sink!.write(at + blockSize - sector, new Uint8Array(sector));
      }
      bits = new Uint8Array(sectorsPerBlock / 8);
    } else {
      at = Math.floor(entry / 8) * MiB;
      bits = (await bitmapOf(block)).slice();
    }
    await sink!.write(at + first * sector, bytes);
    for (let s = first; s < last; s++) bits[s >> 3] |= 1 << (s & 7);
    if (state === NOT_PRESENT) {
      await sink!.write(bitmapAt, bits);
    } else {
      const from = first >> 3;
      const to = ((last - 1) >> 3) + 1;
      await sink!.write(bitmapAt + from, bits.subarray(from, to));
    }
    bitmaps.set(block, bits);
    // Every sector of the block present: fully present.
    const sectors = Math.ceil(length / sector);
    let every = true;
    for (let s = 0; s < sectors && every; s++) {
      every = (bits[s >> 3] & (1 << (s & 7))) !== 0;
    }
    if (every) await setEntry(index, FULLY_PRESENT, at);
    else if (state === NOT_PRESENT) {
      await setEntry(index, PARTIALLY_PRESENT, at);
    }
  }
  // The headers get new file and data write GUIDs and the next sequence
  // numbers before the first write changes the file (MS-VHDX 2.2.2.1, as
  // QEMU does): children linked to the old data write GUID are refused
  // afterwards, their parent having changed under them.
  let headersUpdated = false;
  async function updateHeaders() {
    if (headersUpdated) return;
    headersUpdated = true;
    const head = (await source.read(HEADER_OFFSETS[header.index], HEADER_SIZE))
      .slice();
    const dataWrite = randomGuid();
    setLe64(head, 8, header.sequence + 1n);
    head.set(randomGuid(), 16);
    head.set(dataWrite, 32);
    setLe32(head, 4, checksumWithout(head, 4));
    await sink!.write(HEADER_OFFSETS[1 - header.index], head);
    await sink!.flush();
    setLe64(head, 8, header.sequence + 2n);
    setLe32(head, 4, checksumWithout(head, 4));
    await sink!.write(HEADER_OFFSETS[header.index], head);
    await sink!.flush();
    details.dataWriteGuid = guidAt(dataWrite, 0);
    details.headerSequence = (header.sequence + 2n).toString();
  }
  const queue = { writing: Promise.resolve() as Promise<unknown> };
  return {
    ...image,
    ...serializedWrites(queue, sink, async (offset, bytes) => {
      checkRange(virtualSize, offset, bytes.length);
      if (bytes.length === 0) return;
      await checkSectorsAtHand(offset, bytes.length);
      await updateHeaders();
      for (let at = offset; at < offset + bytes.length;) {
        const block = Math.floor(at / blockSize);
        const stop = Math.min(offset + bytes.length, (block + 1) * blockSize);
        await writeBlockPart(
          block,
          at - block * blockSize,
          bytes.subarray(at - offset, stop - offset),
        );
        at = stop;
      }
    }),
  };
}

/**
 * `create -f vhdx`: an empty image laid out as `convert -O vhdx` lays one
 * out (a fixed one has every block stored), opened for writing.
 */
async function createVhdx(sink: Sink, spec: CreateSpec): Promise<Image> {
  requireRandomAccess(sink, FORMAT, "vhdx images");
  const parent = spec.backingFile === undefined ? undefined : parentLink(spec);
  const empty: Source = {
    size: spec.size,
    read: (_offset, length) => Promise.resolve(new Uint8Array(length)),
    async *extents(offset, length) {
      if (length > 0) yield { offset, length, kind: "zero" };
    },
  };
  await encodeVhdx(empty, sink, { options: spec.options }, parent);
  const source = readBackSource(sink, FORMAT, () => 0);
  return await openVhdx(source, {
    writable: true,
    sink,
    fillFrom: spec.backing,
  });
}

/** What a differencing file records of its parent. */
interface ParentLink {
  /** The parent's data write GUID. */
  linkage: string;
  /** The parent's name as given (`create -b`), `/` separated. */
  name: string;
}

/** The parent link of `create -b` / `convert -B`, from the opened parent. */
function parentLink(spec: CreateSpec): ParentLink {
  const opened = spec.backing;
  if (!opened) {
    throw new UnsupportedError(
      { format: FORMAT },
      `a differencing vhdx records its parent ${spec.backingFile}'s data write GUID: the parent must be opened to read it`,
    );
  }
  const parent = (opened as { top?: Image }).top ?? opened;
  const guid = parent.format === FORMAT
    ? parent.details?.dataWriteGuid
    : undefined;
  if (typeof guid !== "string") {
    throw new UnsupportedError(
      { format: FORMAT },
      `the parent ${spec.backingFile} is a ${parent.format} image: a differencing vhdx's parent is a vhdx (Hyper-V links them by the parent's data write GUID)`,
    );
  }
  if (parent.details?.logicalSectorSize !== undefined) {
    const wanted = spec.options?.logical_sector_size ?? "512";
    if (Number(wanted) !== parent.details.logicalSectorSize) {
      throw fail(
        "logical_sector_size",
        wanted,
        `the parent's (${parent.details.logicalSectorSize})`,
      );
    }
  }
  if (opened.size !== spec.size) {
    throw fail(
      "size",
      spec.size,
      `the parent's size (${opened.size} bytes): a differencing vhdx has its parent's size`,
    );
  }
  return { linkage: guid, name: spec.backingFile! };
}

// ---------------------------------------------------------------------------
// Writing: convert -O vhdx lays the file out in one pass.

/** The `-o` options of `convert -O vhdx`. */
interface WriteOptions {
  subformat: "dynamic" | "fixed";
  blockSize: number;
  logSize: number;
  logicalSectorSize: number;
}

function writeOptions(options: Record<string, string> = {}): WriteOptions {
  checkWriteOptions(vhdx, options);
  const subformat = options.subformat ?? "dynamic";
  if (subformat !== "dynamic" && subformat !== "fixed") {
    throw fail("subformat", subformat, '"dynamic" or "fixed"');
  }
  const size = (key: string, fallback: number) => {
    const text = options[key];
    if (text === undefined) return fallback;
    const m = /^(\d+)([kKmMgG]?)$/.exec(text);
    const unit = { "": 1, k: KiB, m: MiB, g: 1024 * MiB }[
      (m?.[2] ?? "").toLowerCase() as "" | "k" | "m" | "g"
    ];
    return m ? Number(m[1]) * unit : NaN;
  };
  const blockSize = size("block_size", 0);
  if (
    blockSize !== 0 &&
    (!(blockSize >= MIN_BLOCK && blockSize <= MAX_BLOCK) ||
      (blockSize & (blockSize - 1)) !== 0)
  ) {
    throw fail(
      "block_size",
      options.block_size,
      "0 (chosen by size) or a power of two from 1M to 256M",
    );
  }
  const logSize = size("log_size", MiB);
  if (!(logSize >= MiB && logSize % MiB === 0 && logSize <= 4096 * MiB)) {
    throw fail("log_size", options.log_size, "a multiple of 1M, at least 1M");
  }
  const logicalSectorSize = size("logical_sector_size", 512);
  if (logicalSectorSize !== 512 && logicalSectorSize !== 4096) {
    throw fail(
      "logical_sector_size",
      options.logical_sector_size,
      "512 or 4096",
    );
  }
  return { subformat, blockSize, logSize, logicalSectorSize };
}

/** QEMU's choice of block size by disk size, when block_size is 0. */
function defaultBlockSize(size: number): number {
  if (size > 32 * 1024 * 1024 * MiB) return 64 * MiB;
  if (size > 1024 * 1024 * MiB) return 32 * MiB;
  return 8 * MiB;
}

function encodeUtf16(text: string): Uint8Array {
  const out = new Uint8Array(text.length * 2);
  for (let i = 0; i < text.length; i++) setLe16(out, i * 2, text.charCodeAt(i));
  return out;
}

/**
 * The parent locator item (VHDX type): the type GUID, 2 reserved bytes,
 * the key/value count, 12-byte entries (key offset, value offset, key
 * length, value length; offsets from the item's start), then the UTF-16
 * keys and values: `parent_linkage` ({GUID}), `relative_path` (from the
 * child's folder, `.\` and backslashes as Hyper-V writes it) and, for an
 * absolute name, `absolute_win32_path`.
 */
function parentLocator(parent: ParentLink): Uint8Array {
  const windows = parent.name.replaceAll("/", "\\");
  const absolute = /^([a-zA-Z]:)?\\/.test(windows);
  const pairs: [string, string][] = [
    ["parent_linkage", `{${parent.linkage}}`],
    absolute
      ? ["absolute_win32_path", windows]
      : ["relative_path", `.\\${windows}`],
  ];
  const encoded = pairs.map(([k, v]) => [encodeUtf16(k), encodeUtf16(v)]);
  const total = 20 + pairs.length * 12 +
    encoded.reduce((n, [k, v]) => n + k.length + v.length, 0);
  const item = new Uint8Array(total);
  item.set(guidBytes(VHDX_PARENT_TYPE), 0);
  setLe16(item, 18, pairs.length);
  let at = 20 + pairs.length * 12;
  encoded.forEach(([k, v], i) => {
    const entry = 20 + i * 12;
    setLe32(item, entry, at);
    item.set(k, at);
    at += k.length;
    setLe32(item, entry + 4, at);
    item.set(v, at);
    at += v.length;
    setLe16(item, entry + 8, k.length);
    setLe16(item, entry + 10, v.length);
  });
  return item;
}

function randomGuid(): Uint8Array {
  const g = crypto.getRandomValues(new Uint8Array(16));
  g[7] = (g[7] & 0x0f) | 0x40;
  g[8] = (g[8] & 0x3f) | 0x80;
  return g;
}

/**
 * `resize` of a vhdx that is not differencing, with an empty log: the
 * virtual disk size item changes; growing adds BAT entries (not present:
 * zeros) in the BAT region's room, or moves the BAT to a bigger region at
 * the end of the file (both region tables rewritten); shrinking marks the
 * blocks past the end not present and zeroes the bytes past it in the last
 * block. The headers get the next sequence number and new write GUIDs, as
 * for any change of the disk. New blocks of a fixed image are not stored
 * (they read as zeros).
 */
async function resizeVhdx(file: Source & Sink, size: number): Promise<void> {
  await openVhdx(file, {}); // every structure checked
  const header = await currentHeader(file);
  if (header.logGuid !== ZERO_GUID) {
    throw new UnsupportedError(
      { format: FORMAT, field: "header.log_guid", value: header.logGuid },
      "this vhdx has a log to replay first (qemu-img check -r all replays it)",
    );
  }
  const regions = await regionTable(file);
  const bat = regions.find((r) => r.guid === BAT_GUID)!;
  const meta = regions.find((r) => r.guid === METADATA_GUID)!;
  const metadata = await readMetadata(file, meta);
  const { blockSize, logicalSectorSize, virtualSize, hasParent } = metadata;
  if (hasParent) {
    throw new UnsupportedError(
      { format: FORMAT },
      "a differencing vhdx is not resized: its parent would show through the new area",
    );
  }
  if (size % logicalSectorSize !== 0 || size < logicalSectorSize) {
    throw fail("size", size, `a multiple of ${logicalSectorSize}, not 0`);
  }
  if (size > MAX_VIRTUAL_SIZE) {
    throw fail("size", size, `at most ${MAX_VIRTUAL_SIZE} (64 TiB)`);
  }
  const chunkRatio = (2 ** 23 * logicalSectorSize) / blockSize;
  const entriesFor = (blocks: number) =>
    blocks + Math.floor(Math.max(0, blocks - 1) / chunkRatio);
  const indexOf = (block: number) => block + Math.floor(block / chunkRatio);
  const oldBlocks = Math.ceil(virtualSize / blockSize);
  const newBlocks = Math.ceil(size / blockSize);
  const oldEntries = entriesFor(oldBlocks);
  const newEntries = entriesFor(newBlocks);
  let batOffset = bat.offset;
  if (newEntries * 8 > bat.length) {
    // A bigger BAT region at the end of the file, the entries copied.
    const length = Math.ceil(newEntries * 8 / MiB) * MiB;
    const at = Math.ceil(file.size / MiB) * MiB;
    for (let done = 0; done < bat.length; done += MiB) {
      const n = Math.min(MiB, bat.length - done);
      await file.write(at + done, await file.read(bat.offset + done, n));
    }
    await file.write(at + bat.length, new Uint8Array(length - bat.length));
    await file.flush();
    const table = (await file.read(REGION_OFFSETS[0], REGION_TABLE_SIZE))
      .slice();
    const index = regions.indexOf(bat);
    setLe64(table, 16 + index * 32 + 16, at);
    setLe32(table, 16 + index * 32 + 24, length);
    setLe32(table, 4, checksumWithout(table, 4));
    for (const where of REGION_OFFSETS) await file.write(where, table);
    batOffset = at;
  } else if (newEntries > oldEntries) {
    await file.write(
      batOffset + oldEntries * 8,
      new Uint8Array((newEntries - oldEntries) * 8),
    );
  }
  if (newBlocks < oldBlocks) {
    // Payload entries past the end: not present (their sector bitmap
    // entries are 0 in a file without a parent).
    await file.write(
      batOffset + newEntries * 8,
      new Uint8Array((oldEntries - newEntries) * 8),
    );
  }
  const tail = size % blockSize;
  if (size < virtualSize && tail !== 0) {
    const entry = await file.read(batOffset + indexOf(newBlocks - 1) * 8, 8);
    const state = entry[0] & 7;
    const offset = Number(le64(entry, 0) >> 20n) * MiB;
    if (state === FULLY_PRESENT || state === PARTIALLY_PRESENT) {
      await file.write(offset + tail, new Uint8Array(blockSize - tail));
    }
  }
  // The virtual disk size item.
  const metaTable = await file.read(meta.offset, METADATA_TABLE_SIZE);
  const count = le16(metaTable, 10);
  for (let i = 0; i < count; i++) {
    const o = 32 + i * 32;
    if (guidAt(metaTable, o) !== VIRTUAL_DISK_SIZE) continue;
    const item = new Uint8Array(8);
    setLe64(item, 0, BigInt(size));
    await file.write(meta.offset + le32(metaTable, o + 16), item);
  }
  await file.flush();
  const head = (await file.read(HEADER_OFFSETS[header.index], HEADER_SIZE))
    .slice();
  setLe64(head, 8, header.sequence + 1n);
  head.set(randomGuid(), 16);
  head.set(randomGuid(), 32);
  setLe32(head, 4, checksumWithout(head, 4));
  const other = HEADER_OFFSETS[1 - header.index];
  await file.write(other, head);
  await file.flush();
  setLe64(head, 8, header.sequence + 2n);
  setLe32(head, 4, checksumWithout(head, 4));
  await file.write(HEADER_OFFSETS[header.index], head);
  await file.flush();
}

/**
 * `measure` by the layout `encode` writes: the 1 MiB of headers, the log,
 * the metadata, the BAT region, then every block when fully allocated (or
 * fixed). An image's own required size is left to writing it.
 */
function measureVhdx(
  subject: Source | number,
  options: Record<string, string> = {},
): Promise<{ required?: number; fullyAllocated: number }> {
  const o = writeOptions(options);
  const bytes = typeof subject === "number" ? subject : subject.size;
  const virtualSize = Math.ceil(bytes / o.logicalSectorSize) *
    o.logicalSectorSize;
  if (virtualSize > MAX_VIRTUAL_SIZE) {
    throw fail("size", bytes, "at most 64 TiB");
  }
  const blockSize = o.blockSize || defaultBlockSize(virtualSize);
  const chunkRatio = (2 ** 23 * o.logicalSectorSize) / blockSize;
  const payloadBlocks = Math.ceil(virtualSize / blockSize);
  const entries = payloadBlocks +
    Math.floor(Math.max(0, payloadBlocks - 1) / chunkRatio);
  const batLength = Math.max(MiB, Math.ceil((entries * 8) / MiB) * MiB);
  const dataStart = MiB + o.logSize + MiB + batLength;
  const full = dataStart + payloadBlocks * blockSize;
  const required = o.subformat === "fixed"
    ? full
    : typeof subject === "number"
    ? dataStart
    : undefined;
  return Promise.resolve({ required, fullyAllocated: full });
}

/** Bytes of the disk whose file-system map the vhdx writer asks for at a time. */
const FILE_MAP_STEP = 256 << 20;

/**
 * Writes `source` as a vhdx in one pass: the headers, region tables,
 * an empty log, metadata and the BAT first, then every block that holds
 * data (dynamic) or every block (fixed), in order.
 */
async function encodeVhdx(
  source: Source,
  sink: Sink,
  options: EncodeOptions,
  parent?: ParentLink,
): Promise<void> {
  const o = writeOptions(options.options);
  if (parent && o.subformat === "fixed") {
    throw fail("subformat", "fixed", "dynamic for a differencing file");
  }
  const sector = o.logicalSectorSize;
  const virtualSize = Math.ceil(source.size / sector) * sector;
  if (virtualSize > MAX_VIRTUAL_SIZE) {
    throw fail("size", source.size, "at most 64 TiB");
  }
  const blockSize = o.blockSize || defaultBlockSize(virtualSize);
  const chunkRatio = (2 ** 23 * sector) / blockSize;
  const payloadBlocks = Math.ceil(virtualSize / blockSize);
  // A differencing file has a sector bitmap entry after every chunk, the
  // last one too (none present: no block is partially present).
  const entries = parent
    ? Math.ceil(payloadBlocks / chunkRatio) * (chunkRatio + 1)
    : payloadBlocks + Math.floor(Math.max(0, payloadBlocks - 1) / chunkRatio);
  const batLength = Math.max(MiB, Math.ceil((entries * 8) / MiB) * MiB);
  const logOffset = MiB;
  const metadataOffset = logOffset + o.logSize;
  const metadataLength = MiB;
  const batOffset = metadataOffset + metadataLength;
  const dataStart = batOffset + batLength;

  // Which blocks hold data: dynamic images store only those. A raw local
  // file is mapped by the file system (no byte read: raw's own map reads
  // the whole disk for zero blocks, and the blocks were then read again to
  // be written); its blocks with data ranges are candidates, each kept
  // once read if it is not all zeros (what raw's map would have said).
  const fileMap = o.subformat === "dynamic" && !sink.sequential
    ? fileMapOf(source)
    : undefined;
  const stored: boolean[] = new Array(payloadBlocks).fill(
    o.subformat === "fixed",
  );
  const mark = (e: Extent) => {
    if (e.kind !== "data" || e.length === 0) return;
    const first = Math.floor(e.offset / blockSize);
    const last = Math.floor((e.offset + e.length - 1) / blockSize);
    for (let b = first; b <= last; b++) stored[b] = true;
  };
  // The file's map a window at a time (a file of many small ranges would
  // otherwise be listed whole in memory).
  let coarse = fileMap !== undefined;
  for (let at = 0; coarse && at < source.size; at += FILE_MAP_STEP) {
    const runs = await fileMap!(at, Math.min(FILE_MAP_STEP, source.size - at));
    if (runs) runs.forEach(mark);
    else coarse = false;
  }
  if (o.subformat === "dynamic" && !coarse) {
    stored.fill(false);
    for await (const e of extentsOf(source, 0, source.size)) mark(e);
  }
  const bat = new Uint8Array(batLength);
  const where: number[] = [];
  /** Fills the BAT from `where` (the stored blocks' file offsets). */
  const fillBat = () => {
    for (let b = 0; b < payloadBlocks; b++) {
      const index = b + Math.floor(b / chunkRatio);
      const at = where[b];
      if (at !== undefined) {
        setLe32(bat, index * 8, FULLY_PRESENT | (((at / MiB) & 0xfff) << 20));
        setLe32(bat, index * 8 + 4, Math.floor(at / MiB / 4096));
      } else {
        setLe32(
          bat,
          index * 8,
          o.subformat === "fixed" ? FULLY_PRESENT : NOT_PRESENT,
        );
      }
    }
  };
  let next = dataStart;
  if (!coarse) {
    // Every candidate is stored: the BAT is known before the data.
    for (let b = 0; b < payloadBlocks; b++) {
      if (stored[b]) {
        where[b] = next;
        next += blockSize;
      }
    }
    fillBat();
  }

  const fileId = new Uint8Array(64 * KiB);
  fileId.set(new TextEncoder().encode("vhdxfile"), 0);
  fileId.set(encodeUtf16("vdisk toolkit"), 8);

  const dataWrite = randomGuid();
  const fileWrite = randomGuid();
  const headers = [1n, 2n].map((sequence) => {
    const h = new Uint8Array(64 * KiB);
    h.set(new TextEncoder().encode("head"), 0);
    setLe64(h, 8, sequence);
    h.set(fileWrite, 16);
    h.set(dataWrite, 32);
    setLe16(h, 64, 0);
    setLe16(h, 66, 1);
    setLe32(h, 68, o.logSize);
    setLe64(h, 72, logOffset);
    setLe32(h, 4, crc32c(h.subarray(0, HEADER_SIZE)));
    return h;
  });

  const regions = new Uint8Array(64 * KiB);
  regions.set(new TextEncoder().encode("regi"), 0);
  setLe32(regions, 8, 2);
  regions.set(guidBytes(BAT_GUID), 16);
  setLe64(regions, 32, batOffset);
  setLe32(regions, 40, batLength);
  setLe32(regions, 44, 1);
  regions.set(guidBytes(METADATA_GUID), 48);
  setLe64(regions, 64, metadataOffset);
  setLe32(regions, 72, metadataLength);
  setLe32(regions, 76, 1);
  setLe32(regions, 4, crc32c(regions));

  const metadata = new Uint8Array(metadataLength);
  metadata.set(new TextEncoder().encode("metadata"), 0);
  const items: [string, Uint8Array, number][] = [];
  const u32 = (v: number) => {
    const b = new Uint8Array(8);
    setLe32(b, 0, v);
    return b.subarray(0, 4);
  };
  const params = new Uint8Array(8);
  setLe32(params, 0, blockSize);
  // Flags: bit 0 leave_block_allocated, bit 1 has_parent.
  setLe32(params, 4, o.subformat === "fixed" ? 1 : parent ? 2 : 0);
  const sizeItem = new Uint8Array(8);
  setLe64(sizeItem, 0, virtualSize);
  // Flags: bit 1 is_virtual_disk, bit 2 is_required.
  items.push([FILE_PARAMETERS, params, 4]);
  items.push([VIRTUAL_DISK_SIZE, sizeItem, 6]);
  items.push([PAGE_83, randomGuid(), 6]);
  items.push([LOGICAL_SECTOR, u32(sector), 6]);
  items.push([PHYSICAL_SECTOR, u32(4096), 6]);
  if (parent) items.push([PARENT_LOCATOR, parentLocator(parent), 4]);
  setLe16(metadata, 10, items.length);
  let itemAt = METADATA_TABLE_SIZE;
  items.forEach(([guid, bytes, flags], i) => {
    const o = 32 + i * 32;
    metadata.set(guidBytes(guid), o);
    setLe32(metadata, o + 16, itemAt);
    setLe32(metadata, o + 20, bytes.length);
    setLe32(metadata, o + 24, flags);
    metadata.set(bytes, itemAt);
    itemAt += bytes.length;
  });

  await sink.write(0, fileId);
  await sink.write(HEADER_OFFSETS[0], headers[0]);
  await sink.write(HEADER_OFFSETS[1], headers[1]);
  await sink.write(REGION_OFFSETS[0], regions);
  await sink.write(REGION_OFFSETS[1], regions);
  // The log is left empty (zeros); QEMU and Hyper-V ignore it while the
  // headers' log GUID is zero.
  await sink.write(metadataOffset, metadata);
  if (!coarse) await sink.write(batOffset, bat);
  // Blocks are read and written a piece at a time, through a ring of
  // reused buffers (a fresh 8 MiB array per block cost page faults, and
  // blocks go up to 256 MiB): the file takes one piece (on Deno's I/O
  // thread) while the next is read. From the file system's map, a block
  // is placed at its first piece that is not all zeros (one that is all
  // zeros is not stored); its zero pieces are not written where the sink
  // can be sized at the end: the block's place is past the file's end,
  // so they read as zeros (a hole) all the same.
  const piece = Math.min(blockSize, 2 * MiB); // block sizes: powers of two
  const keeps = sink.sequential && !sink.copiesWrites;
  const ring = [0, 1, 2].map(() => new Uint8Array(keeps ? 0 : piece));
  const writing: Promise<void>[] = ring.map(() => Promise.resolve());
  const skipZeros = coarse && sink.resize !== undefined;
  let turn = 0;
  /** Where the next block found to hold data is placed. */
  let placed = dataStart;
  for (let b = 0; b < payloadBlocks; b++) {
    options.signal?.throwIfAborted();
    if (!stored[b]) continue;
    const from = b * blockSize;
    const length = Math.min(blockSize, virtualSize - from);
    const within = Math.min(length, Math.max(0, source.size - from));
    let at = coarse ? undefined : where[b];
    for (let p = 0; p < blockSize; p += piece) {
      const slot = turn;
      // A stream may keep what it is given: a fresh piece each time.
      const bytes = keeps ? new Uint8Array(piece) : ring[slot];
      await writing[slot];
      const n = Math.max(0, Math.min(piece, within - p));
      if (n > 0) await readInto(source, from + p, bytes.subarray(0, n));
      bytes.fill(0, n);
      if (coarse && isZero(bytes)) {
        if (at === undefined || skipZeros) continue;
      }
      if (at === undefined) {
        at = placed;
        where[b] = at;
        placed = at + blockSize;
      }
      writing[slot] = sink.write(at + p, bytes);
      writing[slot].catch(() => {}); // awaited before the buffer is reused
      // A stream takes its writes one at a time, in order.
      if (sink.sequential) await writing[slot];
      turn = (turn + 1) % ring.length;
    }
    options.onProgress?.(Math.min(from + length, source.size));
  }
  await Promise.all(writing);
  if (coarse) {
    next = placed;
    fillBat();
    await sink.write(batOffset, bat);
  }
  await sink.resize?.(next);
  options.onProgress?.(source.size);
  await sink.flush();
}

/**
 * The vhdx driver: Hyper-V VHDX images. Reads fixed, dynamic and
 * differencing files (the parent located through the parent locator's
 * `relative_path`, followed under the caller's backing-file policy), with
 * a pending log replayed in memory, the parent checked by its data write
 * GUID (`parent_linkage`); creates fixed, dynamic and differencing files
 * (`create -f vhdx [-b PARENT]`, `convert -O vhdx [-B PARENT]`; `-o
 * subformat=dynamic|fixed,block_size=,log_size=,logical_sector_size=512|4096`)
 * and writes into them when opened writable (differencing files too: a
 * block not wholly written becomes partially present, the parent showing
 * through its other sectors; not files with a log to replay). The first
 * write gives the headers new file and data write GUIDs, so children
 * linked to a file written into are refused afterwards, as Hyper-V does.
 *
 * @example
 * ```ts
 * import { convert, fromBytes, memorySink, open } from "../mod.ts";
 * const sink = memorySink();
 * await convert(fromBytes(new Uint8Array(1 << 20).fill(1)), sink, { format: "vhdx" });
 * const image = await open(fromBytes(sink.bytes()));
 * console.log(image.format, image.size, (await image.read(0, 1))[0]); // vhdx 1048576 1
 * ```
 */
export const vhdx: Driver = {
  name: FORMAT,
  description:
    "Hyper-V VHDX (fixed, dynamic, differencing; log replayed in memory)",
  probe: probeVhdx,
  writeOptions: [
    {
      name: "subformat",
      help: "dynamic (blocks stored as written) or fixed (every block stored)",
      values: ["dynamic", "fixed"],
      default: "dynamic",
    },
    {
      name: "block_size",
      help: "bytes per block (0: chosen by size, as qemu-img does)",
      accepts: "0, or a power of two from 1M to 256M",
      default: "0",
    },
    {
      name: "log_size",
      help: "bytes of the (empty) log",
      accepts: "a multiple of 1M, at least 1M",
      default: "1M",
    },
    {
      name: "logical_sector_size",
      help: "bytes per logical sector (QEMU reads only 512)",
      values: ["512", "4096"],
      default: "512",
    },
  ],
  open: openVhdx,
  create: createVhdx,
  createNeedsBacking: true,
  resize: resizeVhdx,
  measure: measureVhdx,
  encode: (source, sink, options) => encodeVhdx(source, sink, options),
};
