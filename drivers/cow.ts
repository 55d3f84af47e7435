/**
 * cow: User-Mode Linux copy-on-write files (versions 2 and 3, as
 * `uml_mkcow` and the UML kernel's `ubd` driver write them), read, written
 * and created.
 *
 * This module is browser compatible.
 *
 * Every field is big-endian. Version 3 (what `uml_mkcow` writes; packed):
 *
 * | offset | size | field                                     |
 * | -----: | ---: | ----------------------------------------- |
 * |      0 |    4 | magic 0x4f4f4f4d (`OOOM`)                 |
 * |      4 |    4 | version (3)                               |
 * |      8 |    4 | mtime of the backing file                 |
 * |     12 |    8 | size of the disk in bytes                 |
 * |     20 |    4 | sectorsize (512)                          |
 * |     24 |    4 | alignment of bitmap and data (4096)       |
 * |     28 |    4 | cow_format (0: a sector bitmap)           |
 * |     32 | 4096 | backing_file, NUL-terminated              |
 *
 * The bitmap starts at the header's size rounded up to `alignment`, one
 * bit per sector (least significant bit first): set means the sector is in
 * this file, clear means the backing file has it. The data starts after
 * the bitmap, rounded up to `alignment`; sector `n` lives at
 * `data + n * sectorsize`. Before December 2005 64-bit builds wrote the
 * header unpacked (mtime 8 bytes, everything after it 4 bytes later); the
 * kernel recognises those by the zero `cow_format` landing in the first
 * bytes of the name, and so does this driver.
 *
 * Version 2: magic, version, backing_file (4096 bytes) at 8, mtime (4) at
 * 4104, size (8) at 4108, sectorsize (4) at 4116; the bitmap right after
 * (4120), the data at the next multiple of sectorsize.
 *
 * @module
 */

import { COW_MAGIC as MAGIC, probeCow } from "./_signatures.ts";
import { optionErrors } from "../streams/options.ts";
import {
  alignUp,
  cString,
  formatErrors,
  safeNumber,
  setBe32,
  setBe64,
} from "./_binary.ts";
import {
  readBackSource,
  requireRandomAccess,
  serializedWrites,
  type WriteQueue,
  writeSink,
} from "./_image.ts";
import {
  BackingFileError,
  check,
  UnsupportedError,
} from "../streams/errors.ts";
import type {
  CreateSpec,
  Driver,
  Extent,
  ExtentKind,
  Image,
  OpenOptions,
  Sink,
  Source,
} from "../streams/types.ts";
import { checkRange } from "../streams/types.ts";

const FORMAT = "cow";
const optionFail = optionErrors(FORMAT);
const PATH_LEN = 4096;
const V3_HEADER = 32 + PATH_LEN;
/** The unpacked 64-bit layout, padded to 8 bytes. */
const V3_BROKEN_HEADER = 4136;
const V2_HEADER = 8 + PATH_LEN + 4 + 8 + 4;
const MAX_SECTOR_SIZE = 64 << 10;
const MAX_ALIGNMENT = 1 << 20;
/** Bitmap bytes read (and cached) at a time: 16 MiB of disk in 512-byte sectors. */
const CHUNK = 4096;

/** The parsed header. */
interface Header {
  version: number;
  layout: "v2" | "v3" | "v3-unpacked";
  mtime: number;
  size: number;
  sectorSize: number;
  alignment: number;
  backingFile: string;
  bitmapOffset: number;
  dataOffset: number;
}

const fail = formatErrors(FORMAT);

const isPowerOfTwo = (n: number) => n > 0 && (n & (n - 1)) === 0;

/** Parses and validates the header of a file of `fileSize` bytes. */
function parseHeader(b: Uint8Array, fileSize: number): Header {
  check(b.length >= 8, {
    format: FORMAT,
    field: "file size",
    value: fileSize,
    limit: "at least 8 bytes (magic and version)",
  });
  const v = new DataView(b.buffer, b.byteOffset, b.length);
  const magic = v.getUint32(0);
  if (magic === 0x4d4f4f4f) {
    throw new UnsupportedError(
      { format: FORMAT, field: "version", value: v.getUint32(4, true) },
      "a version 1 (host-endian) COW file; only versions 2 and 3 are read",
    );
  }
  check(magic === MAGIC, {
    format: FORMAT,
    field: "magic",
    value: `0x${magic.toString(16)}`,
    limit: "0x4f4f4f4d (OOOM)",
    offset: 0,
  });
  const version = v.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw fail("version", version, "2 or 3", 4);
  }
  const headerSize = version === 2 ? V2_HEADER : V3_HEADER;
  check(b.length >= headerSize, {
    format: FORMAT,
    field: "file size",
    value: fileSize,
    limit: `at least ${headerSize} bytes (the version ${version} header)`,
  });
  let layout: Header["layout"];
  let at: { mtime: number; size: number; sector: number; align?: number };
  let nameAt: number;
  if (version === 2) {
    layout = "v2";
    at = { mtime: 8 + PATH_LEN, size: 12 + PATH_LEN, sector: 20 + PATH_LEN };
    nameAt = 8;
  } else if (v.getUint32(32) !== 0) {
    layout = "v3";
    at = { mtime: 8, size: 12, sector: 20, align: 24 };
    nameAt = 32;
    check(v.getUint32(28) === 0, {
      format: FORMAT,
      field: "cow_format",
      value: v.getUint32(28),
      limit: "0 (a sector bitmap, the only format)",
      offset: 28,
    });
  } else {
    layout = "v3-unpacked";
    check(b.length >= V3_BROKEN_HEADER, {
      format: FORMAT,
      field: "file size",
      value: fileSize,
      limit:
        `at least ${V3_BROKEN_HEADER} bytes (the unpacked version 3 header)`,
    });
    at = { mtime: 12, size: 16, sector: 24, align: 28 };
    nameAt = 36;
  }
  const size = safeNumber(v.getBigUint64(at.size), FORMAT, "size", at.size);
  const sectorSize = v.getUint32(at.sector);
  if (
    !isPowerOfTwo(sectorSize) || sectorSize < 512 ||
    sectorSize > MAX_SECTOR_SIZE
  ) {
    throw fail(
      "sectorsize",
      sectorSize,
      `a power of two from 512 to ${MAX_SECTOR_SIZE}`,
      at.sector,
    );
  }
  const alignment = at.align === undefined ? sectorSize : v.getUint32(at.align);
  if (!isPowerOfTwo(alignment) || alignment > MAX_ALIGNMENT) {
    throw fail(
      "alignment",
      alignment,
      `a power of two up to ${MAX_ALIGNMENT}`,
      at.align,
    );
  }
  const sectors = Math.ceil(size / sectorSize);
  const bitmapBytes = Math.ceil(sectors / 8);
  let bitmapOffset: number;
  let dataOffset: number;
  if (version === 2) {
    bitmapOffset = V2_HEADER;
    // ubd's formula, one byte short for some sizes (the "rounding bug" v3
    // fixed): the bits past it live in the padding before the data.
    const stored = Math.floor((size + sectorSize - 1) / (8 * sectorSize));
    dataOffset = alignUp(bitmapOffset + stored, sectorSize);
  } else {
    bitmapOffset = alignUp(
      layout === "v3" ? V3_HEADER : V3_BROKEN_HEADER,
      alignment,
    );
    dataOffset = alignUp(bitmapOffset + bitmapBytes, alignment);
  }
  if (dataOffset - bitmapOffset < bitmapBytes) {
    throw fail(
      "size",
      size,
      `covered by the bitmap's ${
        (dataOffset - bitmapOffset) * 8
      } bits (${sectors} sectors of ${sectorSize} bytes)`,
      at.size,
    );
  }
  if (bitmapOffset + bitmapBytes > fileSize) {
    throw fail(
      "bitmap",
      `${bitmapBytes} bytes at ${bitmapOffset}`,
      `within the file's ${fileSize} bytes: the bitmap is shorter than the disk (${sectors} sectors)`,
      bitmapOffset,
    );
  }
  return {
    version,
    layout,
    mtime: v.getUint32(at.mtime),
    size,
    sectorSize,
    alignment,
    backingFile: cString(b, nameAt, nameAt + PATH_LEN),
    bitmapOffset,
    dataOffset,
  };
}

/** What a cow image holds while open. */
interface State extends WriteQueue {
  source: Source;
  header: Header;
  /** Bitmap chunks of CHUNK bytes by index, loaded on demand. */
  chunks: Map<number, Uint8Array>;
  sink?: Sink;
}

async function chunk(state: State, index: number): Promise<Uint8Array> {
  const hit = state.chunks.get(index);
  if (hit) return hit;
  const sectors = Math.ceil(state.header.size / state.header.sectorSize);
  const start = index * CHUNK;
  const length = Math.min(CHUNK, Math.ceil(sectors / 8) - start);
  const bytes = new Uint8Array(CHUNK);
  bytes.set(await state.source.read(state.header.bitmapOffset + start, length));
  state.chunks.set(index, bytes);
  return bytes;
}

function cowImage(state: State): Image {
  const { header } = state;
  const sectorSize = header.sectorSize;
  const sectorsPerChunk = CHUNK * 8;
  const backingFile = header.backingFile || undefined;

  async function* extents(
    offset: number,
    length: number,
  ): AsyncIterable<Extent> {
    checkRange(header.size, offset, length);
    const end = offset + length;
    let run: Extent | undefined;
    let sector = Math.floor(offset / sectorSize);
    let at = offset;
    while (at < end) {
      const c = await chunk(state, Math.floor(sector / sectorsPerChunk));
      const chunkEnd = (Math.floor(sector / sectorsPerChunk) + 1) *
        sectorsPerChunk;
      // Within a chunk: whole bytes of 0x00 or 0xff are 8 sectors at once.
      while (sector < chunkEnd && at < end) {
        const bit = sector % sectorsPerChunk;
        const byte = c[bit >> 3];
        let count: number;
        let kind: ExtentKind;
        if ((bit & 7) === 0 && (byte === 0 || byte === 0xff)) {
          count = 8;
          kind = byte ? "data" : "unallocated";
        } else {
          count = 1;
          kind = (byte >> (bit & 7)) & 1 ? "data" : "unallocated";
        }
        const stop = Math.min(end, (sector + count) * sectorSize);
        if (run && run.kind === kind) {
          run.length += stop - at;
        } else {
          if (run) yield run;
          run = { offset: at, length: stop - at, kind };
        }
        at = stop;
        sector += count;
      }
    }
    if (run) yield run;
  }

  async function read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(header.size, offset, length);
    const out = new Uint8Array(length);
    const pending: Promise<void>[] = [];
    for await (const run of extents(offset, length)) {
      if (run.kind === "data") {
        // A data run is contiguous in the file too.
        if (run.length === length) {
          return await state.source.read(header.dataOffset + offset, length);
        }
        pending.push(
          state.source.read(header.dataOffset + run.offset, run.length).then(
            (b) => out.set(b, run.offset - offset),
          ),
        );
      } else if (backingFile !== undefined) {
        throw new BackingFileError(
          `cow: bytes ${run.offset}..${
            run.offset + run.length
          } of this COW file are in its backing file ${
            JSON.stringify(backingFile)
          }, which was not opened: open it through the registry with resolveBacking`,
          backingFile,
        );
      }
    }
    await Promise.all(pending);
    return out;
  }

  const image: Image = {
    format: FORMAT,
    get size() {
      return header.size;
    },
    name: state.source.name,
    encrypted: false,
    backingFile,
    details: {
      version: header.version,
      layout: header.layout,
      sectorSize,
      alignment: header.alignment,
      mtime: header.mtime,
      bitmapOffset: header.bitmapOffset,
      dataOffset: header.dataOffset,
    },
    read,
    extents,
    close: () => state.source.close?.() ?? Promise.resolve(),
  };
  if (!state.sink) return image;
  const sink = state.sink;

  /**
   * This layer's bytes of sector `s`, for a partial write: zeros where
   * unallocated without a backing file; with one, those bytes are the
   * backing file's, which a layer cannot read on its own.
   */
  async function sectorOf(s: number): Promise<Uint8Array> {
    const from = s * sectorSize;
    const length = Math.min(sectorSize, header.size - from);
    for await (const run of extents(from, length)) {
      if (run.kind !== "data" && backingFile !== undefined) {
        throw new UnsupportedError(
          { format: FORMAT },
          `a write of part of sector ${s} needs the backing file's bytes of it; write whole sectors of ${sectorSize} bytes`,
        );
      }
    }
    return await read(from, length);
  }

  async function doWrite(offset: number, bytes: Uint8Array) {
    checkRange(header.size, offset, bytes.length);
    if (bytes.length === 0) return;
    const end = offset + bytes.length;
    const first = Math.floor(offset / sectorSize);
    const last = Math.ceil(end / sectorSize); // exclusive
    // Partial sectors at either end are merged with this layer's bytes;
    // without them here they are the backing file's, which a layer cannot
    // read on its own.
    const start = first * sectorSize;
    const stop = Math.min(header.size, last * sectorSize);
    let data = bytes;
    if (start !== offset || stop !== end) {
      data = new Uint8Array(stop - start);
      if (start !== offset) data.set(await sectorOf(first), 0);
      const lastStart = (last - 1) * sectorSize;
      if (stop !== end && (lastStart !== start || start === offset)) {
        data.set(await sectorOf(last - 1), lastStart - start);
      }
      data.set(bytes, offset - start);
    }
    await sink.write(header.dataOffset + start, data);
    // Set the bits, then write the bitmap bytes that changed.
    let lowByte = Infinity;
    let highByte = -1;
    for (let s = first; s < last; s++) {
      const c = await chunk(state, Math.floor(s / sectorsPerChunk));
      const bit = s % sectorsPerChunk;
      const mask = 1 << (bit & 7);
      if (!(c[bit >> 3] & mask)) {
        c[bit >> 3] |= mask;
        lowByte = Math.min(lowByte, s >> 3);
        highByte = Math.max(highByte, s >> 3);
      }
    }
    for (let b = lowByte; b <= highByte;) {
      const index = Math.floor(b / CHUNK);
      const c = await chunk(state, index);
      const to = Math.min(highByte + 1, (index + 1) * CHUNK);
      await sink.write(
        header.bitmapOffset + b,
        c.slice(b - index * CHUNK, to - index * CHUNK),
      );
      b = to;
    }
  }

  return Object.assign(image, serializedWrites(state, sink, doWrite));
}

async function openCow(source: Source, options: OpenOptions): Promise<Image> {
  const sink = writeSink(options, FORMAT);
  const head = await source.read(0, Math.min(V3_BROKEN_HEADER, source.size));
  const header = parseHeader(head, source.size);
  return cowImage({
    source,
    header,
    chunks: new Map(),
    sink,
    writing: Promise.resolve(),
  });
}

async function createCow(sink: Sink, spec: CreateSpec): Promise<Image> {
  requireRandomAccess(sink, FORMAT, "cow files");
  if (spec.backingFile === undefined || spec.backingFile === "") {
    throw new UnsupportedError(
      { format: FORMAT },
      "a UML COW file needs a backing file (create -b BACKING, convert -B BACKING)",
    );
  }
  if (spec.backingFormat !== undefined && spec.backingFormat !== "raw") {
    throw new UnsupportedError(
      { format: FORMAT },
      `a UML COW file's backing file is a raw disk, not ${spec.backingFormat}`,
    );
  }
  const name = new TextEncoder().encode(spec.backingFile);
  if (name.length > PATH_LEN - 1) {
    throw fail(
      "backing_file",
      spec.backingFile,
      `at most ${PATH_LEN - 1} bytes long`,
    );
  }
  const mtime = Number(spec.options?.mtime ?? 0);
  if (!Number.isInteger(mtime) || mtime < 0 || mtime > 0xffffffff) {
    throw optionFail(
      "mtime",
      spec.options?.mtime,
      "seconds since 1970, 32-bit",
    );
  }
  // uml_mkcow's choices: 512-byte sectors, bitmap and data aligned to 4096.
  const sectorSize = 512;
  const alignment = 4096;
  const header = new Uint8Array(V3_HEADER);
  setBe32(header, 0, MAGIC);
  setBe32(header, 4, 3);
  setBe32(header, 8, mtime);
  setBe64(header, 12, spec.size);
  setBe32(header, 20, sectorSize);
  setBe32(header, 24, alignment);
  setBe32(header, 28, 0);
  header.set(name, 32);
  const bitmapOffset = alignUp(V3_HEADER, alignment);
  const bitmapBytes = Math.ceil(Math.ceil(spec.size / sectorSize) / 8);
  const dataOffset = alignUp(bitmapOffset + bitmapBytes, alignment);
  await sink.write(0, header);
  const total = dataOffset + spec.size;
  if (sink.resize) await sink.resize(total);
  else await sink.write(total - 1, new Uint8Array(1));
  await sink.flush();
  const source = readBackSource(sink, FORMAT, () => total);
  return await openCow(source, { writable: true, sink });
}

/**
 * `rebase`: records `name` as the backing file, in the header's place for
 * it (by layout: 8, 32 or 36), NUL-padded; the backing file's mtime is
 * left as recorded. A COW file always has a backing file: removing it
 * (`-b ""`) is refused, `convert` makes a flat image instead.
 */
async function setCowBackingFile(
  file: Source & Sink,
  name: string | undefined,
  format?: string,
): Promise<void> {
  const head = await file.read(0, Math.min(V3_BROKEN_HEADER, file.size));
  const header = parseHeader(head, file.size);
  if (name === undefined || name === "") {
    throw new UnsupportedError(
      { format: FORMAT, field: "backing_file" },
      "a UML COW file always has a backing file; convert it to get a flat image",
    );
  }
  if (format !== undefined && format !== "raw") {
    throw new UnsupportedError(
      { format: FORMAT, field: "backing_format", value: format },
      `a UML COW file's backing file is a raw disk, not ${format}`,
    );
  }
  const bytes = new TextEncoder().encode(name);
  if (bytes.length > PATH_LEN - 1) {
    throw fail("backing_file", name, `at most ${PATH_LEN - 1} bytes long`);
  }
  const field = new Uint8Array(PATH_LEN);
  field.set(bytes);
  const at = header.layout === "v2" ? 8 : header.layout === "v3" ? 32 : 36;
  await file.write(at, field);
  await file.flush();
}

/**
 * The cow driver: User-Mode Linux COW files, versions 2 and 3. A COW file
 * always names its backing file (a raw disk): reading its unallocated runs
 * needs that file, opened through the registry's `resolveBacking`. Create
 * options: `mtime` (the backing file's modification time, in seconds,
 * which UML checks before using the pair).
 *
 * @example
 * ```ts
 * import { cow, memorySink } from "../mod.ts";
 * const sink = memorySink();
 * const image = await cow.create!(sink, { size: 8192, backingFile: "base.img" });
 * await image.write!(512, new Uint8Array(512).fill(9));
 * await image.flush!();
 * for await (const e of image.extents(0, 8192)) console.log(e.kind, e.offset, e.length);
 * // unallocated 0 512, data 512 512, unallocated 1024 7168
 * ```
 */
export const cow: Driver = {
  name: FORMAT,
  writeOptions: [
    {
      name: "mtime",
      help: "the backing file's modification time recorded",
      accepts: "seconds since 1970, 32-bit",
      default: "0",
    },
  ],
  description: "User-Mode Linux COW (versions 2 and 3)",
  probe: probeCow,
  open: openCow,
  create: createCow,
  setBackingFile: setCowBackingFile,
};
