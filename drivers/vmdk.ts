/**
 * vmdk: VMware virtual disks. Reads hosted sparse extents ("KDMV", versions
 * 1-3, monolithicSparse and streamOptimized), flat extents and text
 * descriptors naming extent files (monolithicFlat, twoGbMaxExtentSparse,
 * twoGbMaxExtentFlat); writes monolithicSparse (at random) and
 * streamOptimized (in one pass).
 *
 * This module is browser compatible.
 *
 * Every field is little-endian. Sizes and offsets ending in "sectors" count
 * 512-byte sectors.
 *
 * Hosted sparse extent header (512 bytes at offset 0; streamOptimized
 * images repeat it in a footer when gdOffset is GD_AT_END):
 *
 * | offset | size | field                                                  |
 * | -----: | ---: | ------------------------------------------------------ |
 * |      0 |    4 | magicNumber `KDMV`                                     |
 * |      4 |    4 | version (1, 2: zeroed-grain GTEs, 3: changed tracking) |
 * |      8 |    4 | flags: bit 0 newline test, bit 1 redundant GD, bit 2   |
 * |        |      | zeroed-grain GTEs, bit 16 compressed, bit 17 markers   |
 * |     12 |    8 | capacity (sectors)                                     |
 * |     20 |    8 | grainSize (sectors)                                    |
 * |     28 |    8 | descriptorOffset (sectors; 0: none)                    |
 * |     36 |    8 | descriptorSize (sectors)                               |
 * |     44 |    4 | numGTEsPerGT (512)                                     |
 * |     48 |    8 | rgdOffset: redundant grain directory (sectors)         |
 * |     56 |    8 | gdOffset: grain directory (sectors; all ones: footer)  |
 * |     64 |    8 | overHead: sectors before the first grain               |
 * |     72 |    1 | uncleanShutdown                                        |
 * |     73 |    4 | "\n", " ", "\r", "\n" (newline corruption test)        |
 * |     77 |    2 | compressAlgorithm (0 none, 1 deflate)                  |
 *
 * The grain directory (GD) holds one 32-bit sector offset per grain table
 * (GT, 0: no table); a GT holds numGTEsPerGT grain table entries (GTE): the
 * grain's sector offset, 0 when unallocated, 1 when a zeroed grain (with
 * flag bit 2). A compressed grain starts with a 12-byte marker (lba u64,
 * size u32) followed by `size` bytes of zlib data; metadata markers (lba:
 * sectors that follow, size 0, type u32: 0 end of stream, 1 GT, 2 GD, 3
 * footer) occupy one sector each.
 *
 * @module
 */

import {
  probeVmdk,
  VMDK_MAGIC as MAGIC,
  VMDK_MAX_DESCRIPTOR_BYTES as MAX_DESCRIPTOR_BYTES,
} from "./_signatures.ts";
import {
  formatErrors,
  isZero,
  le32,
  le64,
  setLe32,
  setLe64,
} from "./_binary.ts";
import { writeSink } from "./_image.ts";
import {
  CodecError,
  ImageFormatError,
  UnsupportedError,
} from "../streams/errors.ts";
import type {
  CreateSpec,
  Driver,
  EncodeOptions,
  Extent,
  ExtentKind,
  Geometry,
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
import * as zlib from "./codecs/zlib.ts";
import { codecPool } from "./codecs/_pool.ts";
import { seSparse } from "./sesparse.ts";

const FORMAT = "vmdk";
const SECTOR = 512;
const FLAG_RGD = 1 << 1;
const FLAG_ZERO_GRAIN = 1 << 2;
const FLAG_COMPRESS = 1 << 16;
const FLAG_MARKER = 1 << 17;
const FLAG_NL_DETECT = 1 << 0;
const GD_AT_END = 0xffffffffffffffffn;
const MARKER_EOS = 0;
const MARKER_GT = 1;
const MARKER_GD = 2;
const MARKER_FOOTER = 3;
/** A GTE of 1 marks a zeroed grain. */
const GTE_ZEROED = 1;
/** QEMU's limit: grains larger than 1 GiB are refused ("Invalid granularity"). */
const MAX_GRAIN_SECTORS = 0x200000;
/** Compressed grains are decoded whole, so their size is bounded harder. */
const MAX_COMPRESSED_GRAIN_SECTORS = 2048;
/** QEMU's limit on grain table entries ("L2 table size too big"). */
const MAX_GTES_PER_GT = 512;
/** QEMU's limit on grain directory entries ("L1 size too big"). */
const MAX_GD_ENTRIES = 32 * 1024 * 1024;
/** How many extents a descriptor may name. */
const MAX_EXTENTS = 16384;
/** Grain tables kept in memory per extent. */
const GT_CACHE = 256;
/**
 * Where the platform has no native inflater (browsers), the whole grains
 * of one read inflate on the decode workers (drivers/codecs/_pool.ts) in one
 * call, when there are at least this many: one thread's
 * DecompressionStream per 64 KiB grain is what a browser's conversion
 * spent its time on.
 */
const POOL_MIN_GRAINS = 4;
/** The UDIF chunk type of zlib, which the decode workers know. */
const WORKER_ZLIB = 0x80000005;
/** Decompressed grains kept in memory per extent. */
const GRAIN_CACHE = 4;
/** The most file bytes read ahead at once for compressed grains. */
const MAX_SPAN = 16 << 20;
/** Grain size of the images this driver writes (64 KiB, as QEMU and VMware). */
const WRITE_GRAIN_SECTORS = 128;

// ---------------------------------------------------------------------------
// Header

/** A parsed and validated hosted sparse extent header. */
interface SparseHeader {
  version: number;
  flags: number;
  /** Sectors. */
  capacity: number;
  /** Sectors. */
  grainSize: number;
  descriptorOffset: number;
  descriptorSize: number;
  numGTEsPerGT: number;
  rgdOffset: number;
  gdOffset: number;
  overHead: number;
  compressAlgorithm: number;
  /** Grain directory entries. */
  gdEntries: number;
  /** True when the header came from a streamOptimized footer. */
  fromFooter: boolean;
}

const fail = formatErrors(FORMAT);

/**
 * Validates the header at `base` in `bytes` (512 bytes) against a file of
 * `fileSize` bytes. `at` is the header's offset in the file (for messages).
 */
function parseHeader(
  bytes: Uint8Array,
  fileSize: number,
  at: number,
  file: string | undefined,
  fromFooter: boolean,
): SparseHeader {
  const magic = String.fromCharCode(...bytes.subarray(0, 4));
  if (magic !== MAGIC) throw fail("magicNumber", magic, `"${MAGIC}"`, at, file);
  const version = le32(bytes, 4);
  if (version < 1 || version > 3) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "version",
        value: version,
        offset: at + 4,
        file,
      },
      `version ${version} is not supported (1, 2 and 3 are)`,
    );
  }
  const flags = le32(bytes, 8);
  const compressAlgorithm = bytes[77] | (bytes[78] << 8);
  if (compressAlgorithm > 1) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "compressAlgorithm",
        value: compressAlgorithm,
        offset: at + 77,
        file,
      },
      `compressAlgorithm ${compressAlgorithm} is not supported (0 none, 1 deflate)`,
    );
  }
  const grainSize = le64(bytes, 20);
  if (grainSize < 1n || grainSize > BigInt(MAX_GRAIN_SECTORS)) {
    throw fail(
      "grainSize",
      grainSize,
      `between 1 and ${MAX_GRAIN_SECTORS} sectors (1 GiB)`,
      at + 20,
      file,
    );
  }
  if (
    compressAlgorithm === 1 && grainSize > BigInt(MAX_COMPRESSED_GRAIN_SECTORS)
  ) {
    throw fail(
      "grainSize",
      grainSize,
      `at most ${MAX_COMPRESSED_GRAIN_SECTORS} sectors (1 MiB) for compressed grains`,
      at + 20,
      file,
    );
  }
  const numGTEsPerGT = le32(bytes, 44);
  if (numGTEsPerGT < 1 || numGTEsPerGT > MAX_GTES_PER_GT) {
    throw fail(
      "numGTEsPerGT",
      numGTEsPerGT,
      `between 1 and ${MAX_GTES_PER_GT} (L2 table size)`,
      at + 44,
      file,
    );
  }
  const capacity = le64(bytes, 12);
  const gdEntriesBig = (capacity + BigInt(numGTEsPerGT) * grainSize - 1n) /
    (BigInt(numGTEsPerGT) * grainSize);
  if (gdEntriesBig > BigInt(MAX_GD_ENTRIES)) {
    throw fail(
      "grain directory size (L1 size)",
      gdEntriesBig,
      `at most ${MAX_GD_ENTRIES} entries: L1 size too big (capacity ${capacity} sectors)`,
      at + 12,
      file,
    );
  }
  if (capacity * 512n > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw fail("capacity", capacity, "at most 2^53-1 bytes", at + 12, file);
  }
  const fileSectors = Math.ceil(fileSize / SECTOR);
  const sectorField = (o: number, name: string, allowAtEnd = false) => {
    const v = le64(bytes, o);
    if (allowAtEnd && v === GD_AT_END) return -1;
    if (v > BigInt(fileSectors)) {
      throw fail(
        name,
        v,
        `within the file's ${fileSectors} sectors`,
        at + o,
        file,
      );
    }
    return Number(v);
  };
  const descriptorOffset = sectorField(28, "descriptorOffset");
  const descriptorSize = le64(bytes, 36);
  if (descriptorSize > BigInt(MAX_DESCRIPTOR_BYTES / SECTOR)) {
    throw fail(
      "descriptorSize",
      descriptorSize,
      `at most ${
        MAX_DESCRIPTOR_BYTES / SECTOR
      } sectors (1 MiB): descriptor too big`,
      at + 36,
      file,
    );
  }
  const rgdOffset = sectorField(48, "rgdOffset");
  const gdOffset = sectorField(56, "gdOffset", !fromFooter);
  const overHead = le64(bytes, 64);
  // Every sector of the overhead (header, descriptor, tables) must be in the
  // file: a file cut short inside it is truncated, not a disk of zeros.
  if (overHead * BigInt(SECTOR) > BigInt(fileSize)) {
    throw fail(
      "overHead",
      overHead,
      `at most ${
        Math.floor(fileSize / SECTOR)
      } sectors, the whole sectors of the file's ${fileSize} bytes (the file is truncated)`,
      at + 64,
      file,
    );
  }
  return {
    version,
    flags,
    capacity: Number(capacity),
    grainSize: Number(grainSize),
    descriptorOffset,
    descriptorSize: Number(descriptorSize),
    numGTEsPerGT,
    rgdOffset,
    gdOffset,
    overHead: Number(overHead),
    compressAlgorithm,
    gdEntries: Number(gdEntriesBig),
    fromFooter,
  };
}

/** Reads the streamOptimized footer: marker, header copy, end-of-stream marker. */
async function readFooter(source: Source): Promise<SparseHeader> {
  const at = source.size - 3 * SECTOR;
  if (at < SECTOR) {
    throw fail(
      "footer",
      source.size,
      "present (gdOffset is GD_AT_END but the file is too short for a footer)",
      0,
      source.name,
    );
  }
  const b = await source.read(at, 3 * SECTOR);
  const markerOk = le32(b, 8) === 0 && le32(b, 12) === MARKER_FOOTER;
  const eosOk = le64(b, 1024) === 0n && le32(b, 1032) === 0 &&
    le32(b, 1036) === MARKER_EOS;
  if (!markerOk || !eosOk) {
    throw fail(
      "footer",
      "missing",
      "a footer marker, a header copy and an end-of-stream marker in the last three sectors",
      at,
      source.name,
    );
  }
  return parseHeader(
    b.subarray(512, 1024),
    source.size,
    at + 512,
    source.name,
    true,
  );
}

// ---------------------------------------------------------------------------
// Descriptor

/** One extent line of a descriptor. */
interface ExtentLine {
  access: string;
  sectors: number;
  type: string;
  file: string;
  offset: number;
}

/** What a text descriptor says. */
interface Descriptor {
  fields: Map<string, string>;
  extents: ExtentLine[];
}

function parseDescriptor(text: string, file?: string): Descriptor {
  const fields = new Map<string, string>();
  const extents: ExtentLine[] = [];
  const lines = text.split(/\r?\n/);
  for (const raw of lines) {
    const line = raw.replace(/\0.*$/s, "").trim();
    if (line === "" || line.startsWith("#")) continue;
    const ext =
      /^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$/
        .exec(line);
    if (ext) {
      if (extents.length >= MAX_EXTENTS) {
        throw fail(
          "extent count",
          extents.length + 1,
          `at most ${MAX_EXTENTS}`,
          0,
          file,
        );
      }
      const sectors = Number(ext[2]);
      const offset = Number(ext[5] ?? 0);
      if (!Number.isSafeInteger(sectors * SECTOR) || sectors <= 0) {
        throw fail("extent sectors", ext[2], "between 1 and 2^53/512", 0, file);
      }
      if (!Number.isSafeInteger(offset * SECTOR)) {
        throw fail("extent offset", ext[5], "at most 2^53/512", 0, file);
      }
      if (ext[3] !== "ZERO" && ext[4] === undefined) {
        throw fail("extent line", line, "a quoted file name", 0, file);
      }
      extents.push({
        access: ext[1],
        sectors,
        type: ext[3],
        file: ext[4] ?? "",
        offset,
      });
      continue;
    }
    const kv = /^([A-Za-z0-9_.]+)\s*=\s*(.*)$/.exec(line);
    if (kv) {
      const value = kv[2].trim().replace(/^"(.*)"$/, "$1");
      fields.set(kv[1], value);
    }
  }
  return { fields, extents };
}

function hexField(d: Descriptor, key: string): string | undefined {
  const v = d.fields.get(key);
  return v === undefined ? undefined : v.toLowerCase();
}

/** Refuses extent names that could leave the descriptor's folder. */
function checkExtentName(name: string, file?: string) {
  if (
    name === "" || name.startsWith("/") || name.startsWith("\\") ||
    /^[A-Za-z]:/.test(name) || name.split(/[/\\]/).includes("..") ||
    name.includes("\0")
  ) {
    throw fail(
      "extent file name",
      name,
      "a relative name inside the descriptor's folder (no absolute paths, no ..)",
      0,
      file,
    );
  }
}

// ---------------------------------------------------------------------------
// Extents of the virtual disk

/** A run of an extent, with where its bytes are. */
interface Piece {
  offset: number;
  length: number;
  kind: ExtentKind;
  /** File offset of the piece's first byte (plain data). */
  at?: number;
  /** The compressed grain's sector (compressed data); `offset` lies in it. */
  grainSector?: number;
  /** Virtual offset of that grain's start within the extent. */
  grainStart?: number;
}

/** File bytes read ahead for several compressed grains. */
interface Span {
  at: number;
  bytes: Uint8Array;
}

/** One extent: a part of the virtual disk. */
interface Part {
  /** Bytes. */
  readonly length: number;
  pieces(offset: number, length: number): AsyncIterable<Piece>;
  readBytes(piece: Piece, span?: Span): Promise<Uint8Array>;
  prefetch?(pieces: Piece[]): Promise<Span | undefined>;
  /** Reads the bytes of `pieces` (from `base` on, all of them) into `into`. */
  readInto?(pieces: Piece[], base: number, into: Uint8Array): Promise<void>;
  /**
   * Like `readInto`, into a new array of `length` bytes (zeros where no
   * piece is), which it answers: the array may have been to a worker and
   * back.
   */
  readNew?(pieces: Piece[], base: number, length: number): Promise<Uint8Array>;
  write?(offset: number, bytes: Uint8Array): Promise<void>;
}

function readChecked(
  source: Source,
  offset: number,
  length: number,
  what: string,
  fileSize = source.size,
): Promise<Uint8Array> {
  if (offset + length > fileSize) {
    throw fail(
      what,
      offset,
      `within the file's ${fileSize} bytes (${length} bytes wanted)`,
      offset,
      source.name,
    );
  }
  return source.read(offset, length);
}

class FlatPart implements Part {
  constructor(
    readonly source: Source,
    readonly start: number,
    readonly length: number,
  ) {}
  async *pieces(offset: number, length: number): AsyncIterable<Piece> {
    yield { offset, length, kind: "data", at: this.start + offset };
  }
  readBytes(p: Piece) {
    return readChecked(this.source, p.at!, p.length, "flat extent data");
  }
}

class ZeroPart implements Part {
  constructor(readonly length: number, readonly kind: ExtentKind) {}
  async *pieces(offset: number, length: number): AsyncIterable<Piece> {
    yield { offset, length, kind: this.kind };
  }
  readBytes(p: Piece) {
    return Promise.resolve(new Uint8Array(p.length));
  }
}

/** A hosted sparse extent (optionally writable through `sink`). */
class SparsePart implements Part {
  readonly length: number;
  readonly grainBytes: number;
  readonly compressed: boolean;
  readonly markers: boolean;
  readonly zeroGrains: boolean;
  #gtCache = new Map<number, Uint32Array>();
  #grainCache = new Map<number, Promise<Uint8Array>>();
  /** Next free sector (writable only). */
  #end = 0;
  #sink?: Sink;

  constructor(
    readonly source: Source,
    readonly header: SparseHeader,
    readonly gd: Uint32Array,
    readonly rgd: Uint32Array | undefined,
    length: number,
    sink?: Sink,
  ) {
    this.length = length;
    this.grainBytes = header.grainSize * SECTOR;
    this.compressed = header.compressAlgorithm === 1;
    this.markers = (header.flags & FLAG_MARKER) !== 0;
    this.zeroGrains = (header.flags & FLAG_ZERO_GRAIN) !== 0 ||
      header.version >= 2;
    if (sink) {
      this.#sink = sink;
      this.#end = Math.ceil(source.size / SECTOR);
    }
  }

  get fileSize(): number {
    return Math.max(this.source.size, this.#end * SECTOR);
  }

  async table(index: number): Promise<Uint32Array> {
    const cached = this.#gtCache.get(index);
    if (cached) {
      this.#gtCache.delete(index);
      this.#gtCache.set(index, cached);
      return cached;
    }
    const at = this.gd[index] * SECTOR;
    const bytes = await readChecked(
      this.source,
      at,
      this.header.numGTEsPerGT * 4,
      `grain directory entry ${index} (grain table offset)`,
      this.fileSize,
    );
    const table = new Uint32Array(this.header.numGTEsPerGT);
    for (let i = 0; i < table.length; i++) table[i] = le32(bytes, i * 4);
    if (this.#gtCache.size >= GT_CACHE) {
      this.#gtCache.delete(this.#gtCache.keys().next().value!);
    }
    this.#gtCache.set(index, table);
    return table;
  }

  async *pieces(offset: number, length: number): AsyncIterable<Piece> {
    const end = offset + length;
    const g = this.grainBytes;
    const perTable = this.header.numGTEsPerGT;
    let run: Piece | undefined;
    for (let pos = offset; pos < end;) {
      const grain = Math.floor(pos / g);
      const gdIndex = Math.floor(grain / perTable);
      let piece: Piece;
      if (gdIndex >= this.gd.length || this.gd[gdIndex] === 0) {
        const stop = Math.min(end, (gdIndex + 1) * perTable * g);
        piece = { offset: pos, length: stop - pos, kind: "unallocated" };
      } else {
        const table = await this.table(gdIndex);
        const gte = table[grain % perTable];
        const stop = Math.min(end, (grain + 1) * g);
        piece = { offset: pos, length: stop - pos, kind: "unallocated" };
        if (gte === GTE_ZEROED && this.zeroGrains) {
          piece.kind = "zero";
        } else if (gte !== 0) {
          piece.kind = "data";
          if (gte * SECTOR >= this.fileSize) {
            throw fail(
              `grain table entry ${grain % perTable} of grain table ${gdIndex}`,
              gte,
              `a sector within the file's ${this.fileSize} bytes`,
              this.gd[gdIndex] * SECTOR + (grain % perTable) * 4,
              this.source.name,
            );
          }
          if (this.compressed) {
            piece.grainSector = gte;
            piece.grainStart = grain * g;
          } else {
            piece.at = gte * SECTOR + (pos - grain * g);
          }
        }
      }
      pos += piece.length;
      if (
        run && run.kind === piece.kind && piece.grainSector === undefined &&
        run.grainSector === undefined &&
        (run.at === undefined || run.at + run.length === piece.at)
      ) {
        run.length += piece.length;
        continue;
      }
      if (run) yield run;
      run = piece;
    }
    if (run) yield run;
  }

  /**
   * Reads at once the file span holding the compressed grains of `pieces`
   * (consecutive grains lie one after the other in streamOptimized files),
   * so that decoding them costs one file read instead of two per grain.
   * With `reuse`, into a buffer from `codecPool.buffer`, which the caller
   * gives back.
   */
  async prefetch(pieces: Piece[], reuse = false): Promise<Span | undefined> {
    let first = Infinity;
    let last = -1;
    for (const p of pieces) {
      if (p.grainSector === undefined) continue;
      if (this.#grainCache.has(p.grainSector)) continue;
      first = Math.min(first, p.grainSector);
      last = Math.max(last, p.grainSector);
    }
    if (last < 0 || !this.markers) return undefined;
    const at = first * SECTOR;
    const end = Math.min(this.fileSize, last * SECTOR + 2 * this.grainBytes);
    if (end - at > MAX_SPAN || end <= at) return undefined;
    if (!reuse) return { at, bytes: await this.source.read(at, end - at) };
    const bytes = codecPool.buffer(end - at);
    try {
      await readInto(this.source, at, bytes);
    } catch (e) {
      codecPool.giveBack(bytes);
      throw e;
    }
    return { at, bytes };
  }

  grain(sector: number, span?: Span): Promise<Uint8Array> {
    const cached = this.#grainCache.get(sector);
    if (cached) return cached;
    const promise = this.#decodeGrain(sector, span);
    promise.catch(() => this.#grainCache.delete(sector));
    if (this.#grainCache.size >= GRAIN_CACHE) {
      this.#grainCache.delete(this.#grainCache.keys().next().value!);
    }
    this.#grainCache.set(sector, promise);
    return promise;
  }

  /**
   * Reads `pieces` into `into` (the caller's buffer, which may hold old
   * bytes: runs that are not data are zeroed). Whole compressed grains
   * inflate straight into it, on this thread: no 64 KiB array per grain
   * (freed late and kept by the C allocator, those and the inflate
   * workers this replaced held the peak RSS of `deno task bench`'s
   * streamOptimized case near 280 MiB; now 77 MiB, and 0.70 -> 0.39 s).
   * Where they go to the decode workers instead (browsers), spread over
   * all of them ({@linkcode spreadInto}).
   */
  async readInto(
    pieces: Piece[],
    base: number,
    into: Uint8Array,
    pool = true,
  ): Promise<void> {
    if (pool && this.#poolable(pieces)) {
      if (await this.#spreadInto(pieces, base, into)) return;
    }
    const span = this.markers
      ? await this.prefetch(pieces.filter((p) => p.kind === "data"))
      : undefined;
    for (const p of pieces) {
      const target = into.subarray(p.offset - base, p.offset - base + p.length);
      if (p.kind !== "data") {
        target.fill(0);
      } else if (this.#whole(p)) {
        const data = await this.#packedGrain(p.grainSector!, span);
        await this.#inflate(
          p.grainSector!,
          () => zlib.decodeInto(data, target),
        );
      } else {
        target.set(await this.readBytes(p, span));
      }
    }
  }

  /**
   * Reads `pieces` into `into` with their whole grains inflated on every
   * decode worker at once (`CodecPool.spread`: the grains cut into one
   * run per worker, each moved there in a reused buffer and decoded into
   * another, then copied to its place). The file span holding the grains
   * is read into a reused buffer too. False when the workers did not
   * decode them (the caller then does it all here, which also names a bad
   * grain). In chromium, a read's grains went to one worker in a new
   * array moved there and back, then copied into `into`: one worker idle
   * per read, and a fresh 2 MiB array faulted in per read (the bench's
   * streamOptimized image by URL: the decode workers idle 50-60% of the
   * time, 220 ms of their time in the copies around the inflater).
   */
  async #spreadInto(
    pieces: Piece[],
    base: number,
    into: Uint8Array,
  ): Promise<boolean> {
    const data = pieces.filter((p) => p.kind === "data");
    const span = this.markers ? await this.prefetch(data, true) : undefined;
    try {
      const grains: Piece[] = [];
      for (const p of pieces) {
        const target = into.subarray(
          p.offset - base,
          p.offset - base + p.length,
        );
        if (this.#whole(p)) grains.push(p);
        else if (p.kind === "data") target.set(await this.readBytes(p, span));
        else target.fill(0);
      }
      const { input, jobs } = await this.#grainJobs(grains, base, span);
      return await codecPool.spread(input, jobs, into, false) !== null;
    } finally {
      if (span) codecPool.giveBack(span.bytes);
    }
  }

  /** A compressed grain read whole and not cached: inflated straight to its place. */
  #whole(p: Piece): boolean {
    return p.kind === "data" && p.grainSector !== undefined &&
      p.length === this.grainBytes && !this.#grainCache.has(p.grainSector);
  }

  /** Whether the whole grains of `pieces` inflate on the decode workers. */
  #poolable(pieces: Piece[]): boolean {
    return this.compressed && !zlib.hasNativeInflate() && codecPool.usable &&
      pieces.filter((p) => this.#whole(p)).length >= POOL_MIN_GRAINS;
  }

  /**
   * Reads `pieces` into a new array of `length` bytes (disk offset
   * `base`). Where whole grains inflate on the decode workers (browsers,
   * no native inflater), the file span read for them (one read for the
   * whole run of grains, see {@linkcode prefetch}) and the new array are
   * moved to a worker, which inflates each grain straight into its place
   * and moves the array back: no copy of the compressed grains into one
   * buffer, no 64 KiB array per grain sent back and copied into place
   * (those copies were a quarter of the browser's module worker time for
   * the bench's streamOptimized image). If the workers fail, all of it is
   * done again here, which also names a bad grain.
   */
  async readNew(
    pieces: Piece[],
    base: number,
    length: number,
  ): Promise<Uint8Array> {
    const out = new Uint8Array(length);
    if (!this.#poolable(pieces)) {
      await this.readInto(pieces, base, out, false);
      return out;
    }
    const span = this.markers
      ? await this.prefetch(pieces.filter((p) => p.kind === "data"))
      : undefined;
    // The others first, here: the span is gone once moved to the worker.
    const grains: Piece[] = [];
    for (const p of pieces) {
      if (this.#whole(p)) grains.push(p);
      else if (p.kind === "data") {
        out.set(await this.readBytes(p, span), p.offset - base);
      }
    }
    const { input, jobs } = await this.#grainJobs(grains, base, span);
    const filled = await codecPool.batchMoved(input, jobs, out);
    if (filled) return filled;
    const again = new Uint8Array(length);
    await this.readInto(pieces, base, again, false);
    return again;
  }

  /**
   * The decode workers' jobs for whole `grains` (disk offset `base`): one
   * input holding their packed bytes (the file span itself when every
   * grain lies in it, else a copy of the grains one after the other) and,
   * per grain, the codec, its place in the input, its sizes and where it
   * goes in the output.
   */
  async #grainJobs(
    grains: Piece[],
    base: number,
    span?: Span,
  ): Promise<{ input: Uint8Array; jobs: number[] }> {
    const packed: Uint8Array[] = [];
    for (const p of grains) {
      packed.push(await this.#packedGrain(p.grainSector!, span));
    }
    const inSpan = span !== undefined &&
      packed.every((d) => d.buffer === span.bytes.buffer);
    let input: Uint8Array;
    if (inSpan) input = span.bytes;
    else {
      input = new Uint8Array(packed.reduce((n, d) => n + d.length, 0));
      let at = 0;
      for (const d of packed) {
        input.set(d, at);
        at += d.length;
      }
    }
    const jobs: number[] = [];
    let at = 0;
    grains.forEach((p, k) => {
      const from = inSpan ? packed[k].byteOffset - input.byteOffset : at;
      jobs.push(WORKER_ZLIB, from, packed[k].length, this.grainBytes);
      jobs.push(p.offset - base);
      at += packed[k].length;
    });
    return { input, jobs };
  }

  async #decodeGrain(sector: number, span?: Span): Promise<Uint8Array> {
    const data = await this.#packedGrain(sector, span);
    return await this.#inflate(
      sector,
      () => zlib.decode(data, this.grainBytes),
    );
  }

  /** Runs `decode` for the grain at `sector`, naming the grain in its errors. */
  async #inflate<T>(sector: number, decode: () => Promise<T>): Promise<T> {
    try {
      return await decode();
    } catch (e) {
      if (!(e instanceof CodecError)) throw e;
      throw new ImageFormatError(
        { format: FORMAT, offset: sector * SECTOR, file: this.source.name },
        `compressed grain at sector ${sector}: ${e.message}`,
      );
    }
  }

  /** The compressed bytes of the grain at `sector`, checked against its marker. */
  async #packedGrain(sector: number, span?: Span): Promise<Uint8Array> {
    const at = sector * SECTOR;
    const limit = 2 * this.grainBytes;
    const within = (o: number, n: number) =>
      span && o >= span.at && o + n <= span.at + span.bytes.length
        ? span.bytes.subarray(o - span.at, o - span.at + n)
        : undefined;
    let data: Uint8Array;
    if (this.markers) {
      const head = within(at, 12) ?? await readChecked(
        this.source,
        at,
        12,
        "grain marker",
        this.fileSize,
      );
      const size = le32(head, 8);
      if (size === 0 || size > limit - 12) {
        throw fail(
          "grain marker size",
          size,
          `between 1 and ${limit - 12} (twice the grain size, less the marker)`,
          at + 8,
          this.source.name,
        );
      }
      data = within(at + 12, size) ??
        await readChecked(this.source, at + 12, size, "compressed grain");
    } else {
      data = await readChecked(
        this.source,
        at,
        Math.min(limit, this.fileSize - at),
        "compressed grain",
      );
    }
    return data;
  }

  async readBytes(p: Piece, span?: Span): Promise<Uint8Array> {
    if (p.kind !== "data") return new Uint8Array(p.length);
    if (p.grainSector !== undefined) {
      const grain = await this.grain(p.grainSector, span);
      const from = p.offset - p.grainStart!;
      // A view: the caller copies it out at once.
      return grain.subarray(from, from + p.length);
    }
    return await readChecked(
      this.source,
      p.at!,
      p.length,
      "grain data",
      this.fileSize,
    );
  }

  /** Writes at `offset` of the extent, allocating grain tables and grains at the end. */
  async write(offset: number, bytes: Uint8Array): Promise<void> {
    const sink = this.#sink!;
    const g = this.grainBytes;
    const perTable = this.header.numGTEsPerGT;
    for (let done = 0; done < bytes.length;) {
      const pos = offset + done;
      const grain = Math.floor(pos / g);
      const inGrain = pos - grain * g;
      const n = Math.min(bytes.length - done, g - inGrain);
      const part = bytes.subarray(done, done + n);
      const gdIndex = Math.floor(grain / perTable);
      if (this.gd[gdIndex] === 0) {
        // A new grain table (and its redundant copy) at the end of the file.
        const sectors = Math.ceil(perTable * 4 / SECTOR);
        for (const [dir, dirOffset] of this.directories()) {
          const sector = this.#end;
          this.#end += sectors;
          await sink.write(sector * SECTOR, new Uint8Array(sectors * SECTOR));
          dir[gdIndex] = sector;
          const entry = new Uint8Array(4);
          setLe32(entry, 0, sector);
          await sink.write(dirOffset * SECTOR + gdIndex * 4, entry);
        }
        this.#gtCache.set(gdIndex, new Uint32Array(perTable));
      }
      const table = await this.table(gdIndex);
      const index = grain % perTable;
      if (table[index] === 0 || table[index] === GTE_ZEROED) {
        const sector = this.#end;
        this.#end += this.header.grainSize;
        const whole = new Uint8Array(g);
        whole.set(part, inGrain);
        await sink.write(sector * SECTOR, whole);
        table[index] = sector;
        const entry = new Uint8Array(4);
        setLe32(entry, 0, sector);
        await sink.write(this.gd[gdIndex] * SECTOR + index * 4, entry);
        if (this.rgd && this.rgd[gdIndex] !== 0) {
          await sink.write(this.rgd[gdIndex] * SECTOR + index * 4, entry);
        }
      } else {
        await sink.write(table[index] * SECTOR + inGrain, part);
      }
      done += n;
    }
  }

  private directories(): [Uint32Array, number][] {
    const out: [Uint32Array, number][] = [[this.gd, this.header.gdOffset]];
    if (this.rgd) out.push([this.rgd, this.header.rgdOffset]);
    return out;
  }
}

async function readDirectory(
  source: Source,
  sector: number,
  entries: number,
  field: string,
): Promise<Uint32Array> {
  const at = sector * SECTOR;
  if (sector === 0 || at + entries * 4 > source.size) {
    throw fail(
      field,
      sector,
      `a sector where ${entries} grain directory entries fit within the file's ${source.size} bytes`,
      at,
      source.name,
    );
  }
  const bytes = await source.read(at, entries * 4);
  const gd = new Uint32Array(entries);
  for (let i = 0; i < entries; i++) gd[i] = le32(bytes, i * 4);
  return gd;
}

/** Opens a hosted sparse extent file: header (or footer), grain directories. */
async function openSparse(
  source: Source,
  sink?: Sink,
): Promise<{ part: SparsePart; header: SparseHeader }> {
  if (source.size < SECTOR) {
    throw fail(
      "file size",
      source.size,
      "at least one 512-byte header",
      0,
      source.name,
    );
  }
  const head = await source.read(0, SECTOR);
  let header = parseHeader(head, source.size, 0, source.name, false);
  if (header.gdOffset === -1) header = await readFooter(source);
  const rgdWanted = (header.flags & FLAG_RGD) !== 0 && header.rgdOffset !== 0;
  let gd: Uint32Array;
  let rgd: Uint32Array | undefined;
  let usedRedundant = false;
  try {
    gd = await readDirectory(
      source,
      header.gdOffset,
      header.gdEntries,
      "gdOffset",
    );
  } catch (e) {
    // The primary directory is damaged or missing: the redundant copy (when
    // the header says there is one) describes the same grains.
    if (!rgdWanted || !(e instanceof ImageFormatError)) throw e;
    gd = await readDirectory(
      source,
      header.rgdOffset,
      header.gdEntries,
      "rgdOffset",
    );
    usedRedundant = true;
  }
  if (sink && rgdWanted && !usedRedundant) {
    rgd = await readDirectory(
      source,
      header.rgdOffset,
      header.gdEntries,
      "rgdOffset",
    );
  }
  const part = new SparsePart(
    source,
    header,
    gd,
    rgd,
    header.capacity * SECTOR,
    sink,
  );
  (part as { usedRedundant?: boolean }).usedRedundant = usedRedundant;
  return { part, header };
}

// ---------------------------------------------------------------------------
// The image

interface Placed {
  start: number;
  part: Part;
}

function findPart(parts: Placed[], offset: number): number {
  let lo = 0;
  let hi = parts.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (parts[mid].start <= offset) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

async function* allPieces(
  parts: Placed[],
  offset: number,
  length: number,
): AsyncIterable<{ piece: Piece; part: Part; start: number }> {
  const end = offset + length;
  for (let i = findPart(parts, offset); i < parts.length && offset < end; i++) {
    const { start, part } = parts[i];
    const from = Math.max(offset, start);
    const to = Math.min(end, start + part.length);
    if (to <= from) continue;
    for await (const piece of part.pieces(from - start, to - from)) {
      yield { piece, part, start };
    }
  }
}

function vmdkImage(
  parts: Placed[],
  size: number,
  meta: {
    name?: string;
    backingFile?: string;
    geometry?: Geometry;
    id?: string;
    details: Record<string, unknown>;
    close: () => Promise<void>;
  },
): Image {
  // Compressed grains inflate on the decode workers in browsers: they stay
  // alive from open to close (see _pool.ts).
  const letGo = !zlib.hasNativeInflate() && codecPool.usable &&
      parts.some((p) => p.part instanceof SparsePart && p.part.compressed)
    ? codecPool.hold()
    : () => {};
  // Flat extents all in one file (monolithicFlat, or a single VMFS
  // extent), the rest ZERO or NOACCESS: their data runs say where they lie
  // in it (`fileOffset`), so that convert lets a file sink copy them from
  // that file in the kernel (see `storesDataIn`).
  const flatFiles = new Set(
    parts.flatMap((p) => p.part instanceof FlatPart ? [p.part.source] : []),
  );
  const plainIn = flatFiles.size === 1 &&
      parts.every((p) =>
        p.part instanceof FlatPart || p.part instanceof ZeroPart
      )
    ? [...flatFiles][0]
    : undefined;
  const image: Image = {
    format: FORMAT,
    size,
    name: meta.name,
    encrypted: false,
    backingFile: meta.backingFile,
    backingFormat: meta.backingFile === undefined ? undefined : FORMAT,
    geometry: meta.geometry,
    id: meta.id,
    details: meta.details,
    async read(offset, length) {
      checkRange(size, offset, length);
      const wanted: { piece: Piece; part: Part; start: number }[] = [];
      for await (const p of allPieces(parts, offset, length)) {
        if (p.piece.kind === "data") wanted.push(p);
      }
      // Within one extent, the same path as readInto, into a new array.
      // (Grains used to inflate on a pool of workers here, a call per
      // grain: reading the bench's 1 GiB streamOptimized image in 2 MiB
      // reads took 550 ms and 300 MiB of RSS that way, 130-180 ms and 67
      // MiB inline. Browsers have no inline inflater: a read's grains go
      // to a worker in one call, see SparsePart.readNew.)
      const only = wanted[0]?.part;
      if (only?.readNew && wanted.every((w) => w.part === only)) {
        return await only.readNew(
          wanted.map((w) => w.piece),
          offset - wanted[0].start,
          length,
        );
      }
      const out = new Uint8Array(length);
      if (only?.readInto && wanted.every((w) => w.part === only)) {
        await only.readInto(
          wanted.map((w) => w.piece),
          offset - wanted[0].start,
          out,
        );
        return out;
      }
      let span: Span | undefined;
      let spanPart: Part | undefined;
      // Reads and decodes start together; the copies happen in order after.
      const reads: Promise<Uint8Array>[] = [];
      for (const { piece, part } of wanted) {
        if (part.prefetch && spanPart !== part) {
          spanPart = part;
          span = await part.prefetch(
            wanted.filter((w) => w.part === part).map((w) => w.piece),
          );
        }
        const read = part.readBytes(piece, span);
        read.catch(() => {}); // observed below, in order
        reads.push(read);
      }
      for (let i = 0; i < wanted.length; i++) {
        const { piece, start } = wanted[i];
        out.set(await reads[i], start + piece.offset - offset);
      }
      return out;
    },
    // Convert's path: one extent's pieces go straight into `into`.
    async readInto(offset, into) {
      checkRange(size, offset, into.length);
      const all: { piece: Piece; part: Part; start: number }[] = [];
      for await (const p of allPieces(parts, offset, into.length)) all.push(p);
      const only = all[0]?.part;
      if (only?.readInto && all.every((w) => w.part === only)) {
        await only.readInto(
          all.map((w) => w.piece),
          offset - all[0].start,
          into,
        );
      } else {
        into.set(await image.read(offset, into.length));
      }
    },
    async *extents(offset, length): AsyncIterable<Extent> {
      checkRange(size, offset, length);
      let run: Extent | undefined;
      for await (const { piece, start } of allPieces(parts, offset, length)) {
        const at = plainIn && piece.kind === "data" ? piece.at : undefined;
        if (
          run && run.kind === piece.kind &&
          (at === undefined || run.fileOffset! + run.length === at)
        ) {
          run.length += piece.length;
          continue;
        }
        if (run) yield run;
        run = {
          offset: start + piece.offset,
          length: piece.length,
          kind: piece.kind,
          ...(at === undefined ? {} : { fileOffset: at }),
        };
      }
      if (run) yield run;
    },
    async close() {
      letGo();
      await meta.close();
    },
  };
  return plainIn ? storesDataIn(image, plainIn) : image;
}

/**
 * `ddb.uuid.image` (VirtualBox writes it) as the image's identity: the
 * UUID a differencing vdi over this disk links to.
 */
function imageUuidOf(d: Descriptor): string | undefined {
  const text = d.fields.get("ddb.uuid.image")?.toLowerCase();
  return text && /^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$/.test(text)
    ? `uuid ${text}`
    : undefined;
}

function geometryOf(d: Descriptor): Geometry | undefined {
  const c = Number(d.fields.get("ddb.geometry.cylinders"));
  const h = Number(d.fields.get("ddb.geometry.heads"));
  const s = Number(d.fields.get("ddb.geometry.sectors"));
  if ([c, h, s].every((v) => Number.isSafeInteger(v) && v > 0)) {
    return { cylinders: c, heads: h, sectors: s };
  }
  return undefined;
}

function sparseDetails(header: SparseHeader, part: SparsePart) {
  return {
    version: header.version,
    grainSize: header.grainSize * SECTOR,
    compression: header.compressAlgorithm === 1 ? "deflate" : "none",
    markers: part.markers,
    zeroedGrains: (header.flags & FLAG_ZERO_GRAIN) !== 0,
    redundantGrainDirectory: (header.flags & FLAG_RGD) !== 0,
    grainDirectory: (part as { usedRedundant?: boolean }).usedRedundant
      ? "redundant (the primary is damaged)"
      : "primary",
    footer: header.fromFooter,
  };
}

function descriptorFacts(d: Descriptor) {
  const parentCID = hexField(d, "parentCID");
  const hint = d.fields.get("parentFileNameHint");
  return {
    subformat: d.fields.get("createType"),
    cid: hexField(d, "CID"),
    parentCID,
    // A parent is named only when parentCID is not the "none" value.
    backingFile: hint !== undefined && hint !== "" && parentCID !== "ffffffff"
      ? hint
      : undefined,
  };
}

async function readEmbeddedDescriptor(
  source: Source,
  header: SparseHeader,
): Promise<Descriptor | undefined> {
  if (header.descriptorOffset === 0 || header.descriptorSize === 0) {
    return undefined;
  }
  const at = header.descriptorOffset * SECTOR;
  const length = Math.min(header.descriptorSize * SECTOR, source.size - at);
  if (length <= 0) {
    throw fail(
      "descriptorOffset",
      header.descriptorOffset,
      `within the file's ${source.size} bytes (the file is truncated)`,
      28,
      source.name,
    );
  }
  const bytes = await source.read(at, length);
  const descriptor = parseDescriptor(
    new TextDecoder().decode(bytes),
    source.name,
  );
  // The header says a descriptor is there: a blank one (QEMU: "Invalid
  // argument", it finds no CID) is a broken image, not one without a
  // descriptor.
  if (descriptor.fields.size === 0 && descriptor.extents.length === 0) {
    throw fail(
      "embedded descriptor",
      `${length} blank bytes`,
      `descriptor text (the header's descriptorOffset ${header.descriptorOffset} and descriptorSize ${header.descriptorSize} say it is there)`,
      at,
      source.name,
    );
  }
  return descriptor;
}

async function openMonolithic(
  source: Source,
  options: OpenOptions,
): Promise<Image> {
  const sink = writeSink(options, FORMAT);
  const { part, header } = await openSparse(source, sink);
  if (sink && (part.compressed || header.version === 3)) {
    throw new UnsupportedError(
      { format: FORMAT, file: source.name },
      part.compressed
        ? "streamOptimized images are read-only (convert them instead)"
        : "version 3 images are read-only (as in QEMU)",
    );
  }
  const descriptor = await readEmbeddedDescriptor(source, header);
  const facts = descriptor ? descriptorFacts(descriptor) : undefined;
  const subformat = facts?.subformat ??
    (part.compressed ? "streamOptimized" : "monolithicSparse");
  const parts: Placed[] = [{ start: 0, part }];
  const image = vmdkImage(parts, part.length, {
    name: source.name,
    backingFile: facts?.backingFile,
    geometry: descriptor ? geometryOf(descriptor) : undefined,
    id: descriptor ? imageUuidOf(descriptor) : undefined,
    details: {
      subformat,
      ...sparseDetails(header, part),
      cid: facts?.cid,
      parentCID: facts?.parentCID,
      extents: descriptor?.extents.map((e) => ({ ...e })) ?? [],
    },
    close: () => source.close?.() ?? Promise.resolve(),
  });
  if (sink) {
    image.write = async (offset, bytes) => {
      checkRange(image.size, offset, bytes.length);
      await part.write(offset, bytes);
    };
    image.flush = () => sink.flush();
  }
  return image;
}

async function openDescriptorFile(
  source: Source,
  options: OpenOptions,
): Promise<Image> {
  if (source.size > MAX_DESCRIPTOR_BYTES) {
    throw fail(
      "descriptor size",
      source.size,
      `at most ${MAX_DESCRIPTOR_BYTES} bytes: descriptor too big`,
      0,
      source.name,
    );
  }
  if (options.writable) {
    throw new UnsupportedError(
      { format: FORMAT, file: source.name },
      "images made of a descriptor and extent files are read-only",
    );
  }
  const text = new TextDecoder().decode(await source.read(0, source.size));
  const descriptor = parseDescriptor(text, source.name);
  const facts = descriptorFacts(descriptor);
  if (descriptor.extents.length === 0) {
    throw fail("extents", 0, "at least one extent line", 0, source.name);
  }
  const opened: Source[] = [];
  const closeAll = async () => {
    for (const s of opened) await s.close?.();
    await source.close?.();
  };
  const parts: Placed[] = [];
  const extentDetails: Record<string, unknown>[] = [];
  let start = 0;
  try {
    for (const line of descriptor.extents) {
      const length = line.sectors * SECTOR;
      if (!Number.isSafeInteger(start + length)) {
        throw fail(
          "extent sectors",
          line.sectors,
          "a total under 2^53 bytes",
          0,
          source.name,
        );
      }
      let part: Part;
      const info: Record<string, unknown> = { ...line };
      if (line.type === "ZERO" || line.access === "NOACCESS") {
        part = new ZeroPart(
          length,
          line.type === "ZERO" ? "zero" : "unallocated",
        );
      } else if (["FLAT", "VMFS", "SPARSE", "SESPARSE"].includes(line.type)) {
        checkExtentName(line.file, source.name);
        if (!options.resolveFile) {
          throw new ImageFormatError(
            { format: FORMAT, file: source.name },
            `extent file "${line.file}" needs a file resolver (OpenOptions.resolveFile)`,
          );
        }
        const file = await options.resolveFile(line.file, source.name);
        opened.push(file);
        if (line.type === "SESPARSE") {
          // An ESXi snapshot extent: grains it does not store are the
          // parent's (the descriptor's parentFileNameHint), or zeros.
          const extent = await seSparse.open(file, {});
          if (extent.size < length) {
            throw fail(
              `capacity of extent "${line.file}"`,
              extent.size / SECTOR,
              `at least the ${line.sectors} sectors the descriptor gives it`,
              0,
              file.name,
            );
          }
          Object.assign(info, { seSparse: extent.details });
          part = new ImagePart(extent, length);
        } else if (line.type === "SPARSE") {
          const { part: sparse, header } = await openSparse(file);
          if (sparse.length < length) {
            throw fail(
              `capacity of extent "${line.file}"`,
              header.capacity,
              `at least the ${line.sectors} sectors the descriptor gives it`,
              12,
              file.name,
            );
          }
          Object.assign(info, sparseDetails(header, sparse));
          part = new SliceOf(sparse, length);
        } else {
          const end = line.offset * SECTOR + length;
          if (end > file.size) {
            throw fail(
              `flat extent "${line.file}" size`,
              file.size,
              `at least ${end} bytes (offset ${line.offset} + ${line.sectors} sectors)`,
              0,
              file.name,
            );
          }
          part = new FlatPart(file, line.offset * SECTOR, length);
        }
      } else {
        throw new UnsupportedError(
          {
            format: FORMAT,
            field: "extent type",
            value: line.type,
            file: source.name,
          },
          `extent type ${line.type} is not supported (FLAT, VMFS, SPARSE, SESPARSE and ZERO are)`,
        );
      }
      parts.push({ start, part });
      extentDetails.push(info);
      start += length;
    }
  } catch (e) {
    for (const s of opened) await s.close?.().catch(() => {});
    throw e;
  }
  return vmdkImage(parts, start, {
    name: source.name,
    backingFile: facts.backingFile,
    geometry: geometryOf(descriptor),
    id: imageUuidOf(descriptor),
    details: {
      subformat: facts.subformat,
      cid: facts.cid,
      parentCID: facts.parentCID,
      extents: extentDetails,
    },
    close: closeAll,
  });
}

/** A sparse extent seen through its first `length` bytes. */
/**
 * An extent that another driver reads (seSparse), as a part: its map's
 * runs are the pieces; its unallocated runs read as zeros here (the chain
 * above reads them from the parent, when there is one).
 */
class ImagePart implements Part {
  constructor(readonly image: Image, readonly length: number) {}
  async *pieces(offset: number, length: number): AsyncIterable<Piece> {
    for await (const run of extentsOf(this.image, offset, length)) {
      yield { offset: run.offset, length: run.length, kind: run.kind };
    }
  }
  readBytes(p: Piece) {
    return p.kind === "data"
      ? this.image.read(p.offset, p.length)
      : Promise.resolve(new Uint8Array(p.length));
  }
}

class SliceOf implements Part {
  constructor(readonly inner: Part, readonly length: number) {}
  pieces(offset: number, length: number) {
    return this.inner.pieces(offset, length);
  }
  readBytes(p: Piece, span?: Span) {
    return this.inner.readBytes(p, span);
  }
  prefetch(pieces: Piece[]) {
    return this.inner.prefetch?.(pieces) ?? Promise.resolve(undefined);
  }
  async readInto(pieces: Piece[], base: number, into: Uint8Array) {
    if (this.inner.readInto) {
      await this.inner.readInto(pieces, base, into);
      return;
    }
    for (const p of pieces) {
      const at = p.offset - base;
      if (p.kind !== "data") into.fill(0, at, at + p.length);
      else into.set(await this.inner.readBytes(p), at);
    }
  }
}

// ---------------------------------------------------------------------------
// Probing

// ---------------------------------------------------------------------------
// Writing

function randomCid(): string {
  const v = crypto.getRandomValues(new Uint32Array(1))[0] || 1;
  return v.toString(16).padStart(8, "0");
}

function extentFileName(sink: Sink): string {
  const base = (sink.name ?? "").split(/[/\\]/).pop() ?? "";
  const partial = /^\.(.+)\.partial-[a-z0-9]+$/.exec(base);
  const name = partial ? partial[1] : base;
  return name === "" || name === "stdout" || name.includes('"')
    ? "disk.vmdk"
    : name;
}

function descriptorText(
  subformat: string,
  sectors: number,
  extentName: string,
): string {
  const cylinders = Math.min(65535, Math.floor(sectors / (16 * 63)));
  return [
    "# Disk DescriptorFile",
    "version=1",
    `CID=${randomCid()}`,
    "parentCID=ffffffff",
    `createType="${subformat}"`,
    "",
    "# Extent description",
    `RW ${sectors} SPARSE "${extentName}"`,
    "",
    "# The Disk Data Base",
    "#DDB",
    "",
    'ddb.virtualHWVersion = "4"',
    `ddb.geometry.cylinders = "${cylinders}"`,
    'ddb.geometry.heads = "16"',
    'ddb.geometry.sectors = "63"',
    'ddb.adapterType = "ide"',
    "",
  ].join("\n");
}

function headerBytes(h: {
  version: number;
  flags: number;
  capacity: number;
  grainSize: number;
  descriptorOffset: number;
  descriptorSize: number;
  rgdOffset: number;
  gdOffset: bigint | number;
  overHead: number;
  compress: boolean;
}): Uint8Array {
  const b = new Uint8Array(SECTOR);
  b.set(new TextEncoder().encode(MAGIC), 0);
  setLe32(b, 4, h.version);
  setLe32(b, 8, h.flags);
  setLe64(b, 12, h.capacity);
  setLe64(b, 20, h.grainSize);
  setLe64(b, 28, h.descriptorOffset);
  setLe64(b, 36, h.descriptorSize);
  setLe32(b, 44, MAX_GTES_PER_GT);
  setLe64(b, 48, h.rgdOffset);
  setLe64(b, 56, h.gdOffset);
  setLe64(b, 64, h.overHead);
  b[72] = 0;
  b.set([0x0a, 0x20, 0x0d, 0x0a], 73);
  b[77] = h.compress ? 1 : 0;
  return b;
}

function checkSize(size: number) {
  if (!Number.isSafeInteger(size) || size < 0 || size % SECTOR !== 0) {
    throw fail("size", size, "a whole number of 512-byte sectors", 0);
  }
  // Grain directory entries are 32-bit sector offsets: 2 TiB is the format's limit.
  if (size > 2 ** 41) throw fail("size", size, "at most 2 TiB", 0);
}

function subformatOf(options?: Record<string, string>, compress?: boolean) {
  const sub = options?.subformat ??
    (compress ? "streamOptimized" : "monolithicSparse");
  if (sub !== "monolithicSparse" && sub !== "streamOptimized") {
    throw new UnsupportedError(
      { format: FORMAT, field: "subformat", value: sub },
      `subformat ${sub} cannot be written (monolithicSparse and streamOptimized can)`,
    );
  }
  return sub;
}

/** Creates an empty monolithicSparse image and returns it opened writable. */
async function createVmdk(sink: Sink, spec: CreateSpec): Promise<Image> {
  subformatOf(spec.options);
  if (spec.options?.subformat === "streamOptimized") {
    throw new UnsupportedError(
      { format: FORMAT, field: "subformat", value: "streamOptimized" },
      "streamOptimized images are written whole: use convert -O vmdk -o subformat=streamOptimized",
    );
  }
  if (spec.backingFile !== undefined) {
    throw new UnsupportedError(
      { format: FORMAT, field: "backingFile", value: spec.backingFile },
      "vmdk images with a parent cannot be created yet",
    );
  }
  checkSize(spec.size);
  const readable = sink as Partial<Source>;
  if (typeof readable.read !== "function") {
    throw new Error("vmdk: create needs a sink that can be read back (a file)");
  }
  const capacity = spec.size / SECTOR;
  const grain = WRITE_GRAIN_SECTORS;
  const gtCount = Math.ceil(capacity / (MAX_GTES_PER_GT * grain));
  const gtSectors = MAX_GTES_PER_GT * 4 / SECTOR;
  const gdSectors = Math.ceil(gtCount * 4 / SECTOR);
  const desc = new TextEncoder().encode(
    descriptorText("monolithicSparse", capacity, extentFileName(sink)),
  );
  const descriptorSize = Math.max(20, Math.ceil(desc.length / SECTOR));
  const rgdOffset = 1 + descriptorSize;
  const gdOffset = rgdOffset + gdSectors + gtCount * gtSectors;
  const tablesEnd = gdOffset + gdSectors + gtCount * gtSectors;
  const overHead = Math.ceil(tablesEnd / grain) * grain;
  const header = headerBytes({
    version: 1,
    flags: FLAG_NL_DETECT | FLAG_RGD,
    capacity,
    grainSize: grain,
    descriptorOffset: 1,
    descriptorSize,
    rgdOffset,
    gdOffset,
    overHead,
    compress: false,
  });
  const meta = new Uint8Array(overHead * SECTOR);
  meta.set(header, 0);
  meta.set(desc, SECTOR);
  // Every grain table exists from the start (as QEMU lays them out), so
  // writes only fill in entries.
  for (const dir of [rgdOffset, gdOffset]) {
    for (let i = 0; i < gtCount; i++) {
      setLe32(meta, dir * SECTOR + i * 4, dir + gdSectors + i * gtSectors);
    }
  }
  await sink.write(0, meta);
  await sink.resize?.(meta.length);
  const source: Source = {
    get size() {
      return (readable as { size?: number }).size ?? meta.length;
    },
    name: sink.name,
    read: (o, n) => readable.read!(o, n),
  };
  return await openMonolithic(source, { writable: true, sink });
}

/** Copies the data runs of `source` into the writable `image`, grain-sized and sparse. */
async function copyInto(
  source: Source,
  image: Image,
  options: EncodeOptions,
): Promise<void> {
  const chunk = 2 << 20;
  const g = WRITE_GRAIN_SECTORS * SECTOR;
  for (let start = 0; start < source.size; start += chunk) {
    options.signal?.throwIfAborted();
    const length = Math.min(chunk, source.size - start);
    for await (const run of extentsOf(source, start, length)) {
      if (run.kind !== "data") continue;
      const bytes = await source.read(run.offset, run.length);
      for (let at = 0; at < bytes.length;) {
        const end = Math.min(
          bytes.length,
          (Math.floor((run.offset + at) / g) + 1) * g - run.offset,
        );
        const piece = bytes.subarray(at, end);
        if (!isZero(piece)) await image.write!(run.offset + at, piece);
        at = end;
      }
    }
    options.onProgress?.(start + length);
    // Sync file writes complete as microtasks: let timers and signals run.
    await new Promise((resolve) => setTimeout(resolve, 0));
  }
}

function marker(lba: number, size: number, type: number): Uint8Array {
  const b = new Uint8Array(SECTOR);
  setLe64(b, 0, lba);
  setLe32(b, 8, size);
  setLe32(b, 12, type);
  return b;
}

/** Writes `source` as a streamOptimized image, in increasing offset order. */
async function encodeStream(
  source: Source,
  sink: Sink,
  options: EncodeOptions,
): Promise<void> {
  checkSize(source.size);
  const capacity = source.size / SECTOR;
  const grain = WRITE_GRAIN_SECTORS;
  const g = grain * SECTOR;
  const gtCount = Math.ceil(capacity / (MAX_GTES_PER_GT * grain));
  const desc = new TextEncoder().encode(
    descriptorText("streamOptimized", capacity, extentFileName(sink)),
  );
  const descriptorSize = Math.ceil(desc.length / SECTOR);
  const overHead = Math.ceil((1 + descriptorSize) / grain) * grain;
  const headerFields = {
    version: 3,
    flags: FLAG_NL_DETECT | FLAG_COMPRESS | FLAG_MARKER,
    capacity,
    grainSize: grain,
    descriptorOffset: 1,
    descriptorSize,
    rgdOffset: 0,
    overHead,
    compress: true,
  };
  let position = 0; // bytes written so far
  const emit = async (bytes: Uint8Array) => {
    await sink.write(position, bytes);
    position += bytes.length;
  };
  const start = new Uint8Array(overHead * SECTOR);
  start.set(headerBytes({ ...headerFields, gdOffset: GD_AT_END }), 0);
  start.set(desc, SECTOR);
  await emit(start);

  const gd = new Uint32Array(gtCount);
  let table: Uint32Array | undefined;
  let tableIndex = -1;
  const flushTable = async () => {
    if (!table) return;
    const bytes = new Uint8Array(MAX_GTES_PER_GT * 4);
    for (let i = 0; i < table.length; i++) setLe32(bytes, i * 4, table[i]);
    await emit(marker(bytes.length / SECTOR, 0, MARKER_GT));
    gd[tableIndex] = position / SECTOR;
    await emit(bytes);
    table = undefined;
  };

  const chunk = 1 << 20; // a multiple of the grain size
  // Reads run one chunk ahead of compression.
  const readChunk = async (at: number) => {
    const length = Math.min(chunk, source.size - at);
    let data = false;
    for await (const run of extentsOf(source, at, length)) {
      if (run.kind === "data") {
        data = true;
        break;
      }
    }
    return data ? await source.read(at, length) : undefined;
  };
  let next = source.size > 0 ? readChunk(0) : undefined;
  for (let at = 0; at < source.size; at += chunk) {
    options.signal?.throwIfAborted();
    const bytes = await next!;
    next = at + chunk < source.size ? readChunk(at + chunk) : undefined;
    next?.catch(() => {});
    if (bytes) {
      for (let o = 0; o < bytes.length; o += g) {
        let piece = bytes.subarray(o, Math.min(bytes.length, o + g));
        if (isZero(piece)) continue;
        if (piece.length < g) {
          const whole = new Uint8Array(g);
          whole.set(piece);
          piece = whole;
        }
        const grainIndex = (at + o) / g;
        const t = Math.floor(grainIndex / MAX_GTES_PER_GT);
        if (t !== tableIndex) {
          await flushTable();
          tableIndex = t;
          table = new Uint32Array(MAX_GTES_PER_GT);
        }
        const packed = await zlib.encode(piece);
        const record = new Uint8Array(
          Math.ceil((12 + packed.length) / SECTOR) * SECTOR,
        );
        setLe64(record, 0, (at + o) / SECTOR);
        setLe32(record, 8, packed.length);
        record.set(packed, 12);
        table![grainIndex % MAX_GTES_PER_GT] = position / SECTOR;
        await emit(record);
      }
    }
    options.onProgress?.(Math.min(source.size, at + chunk));
    if (at % (32 << 20) === 0) {
      await new Promise((resolve) => setTimeout(resolve, 0));
    }
  }
  await flushTable();
  const gdBytes = new Uint8Array(Math.ceil(gtCount * 4 / SECTOR) * SECTOR);
  for (let i = 0; i < gtCount; i++) setLe32(gdBytes, i * 4, gd[i]);
  await emit(marker(gdBytes.length / SECTOR, 0, MARKER_GD));
  const gdSector = position / SECTOR;
  if (gdBytes.length) await emit(gdBytes);
  await emit(marker(1, 0, MARKER_FOOTER));
  await emit(headerBytes({ ...headerFields, gdOffset: gdSector }));
  await emit(marker(0, 0, MARKER_EOS));
}

async function encodeVmdk(
  source: Source,
  sink: Sink,
  options: EncodeOptions,
): Promise<void> {
  const sub = subformatOf(options.options, options.compress);
  if (sub === "streamOptimized") {
    await encodeStream(source, sink, options);
    return;
  }
  if (sink.sequential) {
    throw new UnsupportedError(
      { format: FORMAT, field: "subformat", value: sub },
      "monolithicSparse needs a seekable output (use -o subformat=streamOptimized for a stream)",
    );
  }
  const image = await createVmdk(sink, {
    size: source.size,
    options: options.options,
  });
  await copyInto(source, image, options);
  await image.flush?.();
}

/**
 * The vmdk driver: monolithicSparse, streamOptimized, monolithicFlat and
 * twoGbMaxExtent images read; monolithicSparse (`create`, `encode`) and
 * streamOptimized (`encode`) written, chosen by `-o subformat=`. Extent
 * files of descriptor images are opened through `OpenOptions.resolveFile`.
 *
 * @example
 * ```ts
 * import { fromBytes, memorySink, vmdk } from "../mod.ts";
 * const sink = memorySink();
 * await vmdk.encode!(fromBytes(new Uint8Array(1 << 20).fill(7)), sink, {
 *   options: { subformat: "streamOptimized" },
 * });
 * const image = await vmdk.open(fromBytes(sink.bytes()), {});
 * console.log(image.details?.subformat, (await image.read(0, 4))[3]); // streamOptimized 7
 * ```
 */
export const vmdk: Driver = {
  name: FORMAT,
  writeOptions: [
    {
      name: "subformat",
      help: "the layout written (-c implies streamOptimized)",
      values: ["monolithicSparse", "streamOptimized"],
      default: "monolithicSparse",
    },
  ],
  compresses: true,
  description:
    "VMware VMDK (monolithicSparse, streamOptimized, monolithicFlat, twoGbMaxExtent*)",
  probe: probeVmdk,
  async open(source: Source, options: OpenOptions): Promise<Image> {
    if (source.size < 4) {
      throw fail("file size", source.size, "at least 4 bytes", 0, source.name);
    }
    const head = await source.read(0, 4);
    if (String.fromCharCode(...head) === MAGIC) {
      return await openMonolithic(source, options);
    }
    if (String.fromCharCode(...head) === "COWD") {
      throw new UnsupportedError(
        { format: FORMAT, file: source.name },
        "VMFS sparse (COWD) extents are not supported",
      );
    }
    return await openDescriptorFile(source, options);
  },
  create: createVmdk,
  encode: encodeVmdk,
};
