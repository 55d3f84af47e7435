/**
 * dmg: Apple UDIF disk images (`hdiutil` UDRW/UDRO raw, UDZO zlib, UDBZ
 * bzip2, UDCO ADC, ULFO LZFSE and ULMO LZMA), read and written.
 *
 * A flattened UDIF file, as hdiutil writes it:
 *
 * | where                 | what                                                    |
 * | --------------------- | ------------------------------------------------------- |
 * | DataForkOffset        | the data fork: every chunk's bytes, one after another   |
 * | XMLOffset             | an XML property list whose `resource-fork` → `blkx` array holds one block table (`mish`, base64) per partition, with its `Name`/`CFName` |
 * | RsrcForkOffset        | older images: a classic resource fork with `blkx` resources instead of the XML |
 * | last 512 bytes        | the `koly` trailer (see `dmg/_koly.ts`)                  |
 *
 * A block table (`dmg/_mish.ts`) lists the partition's chunks: sectors of
 * the disk and the bytes in the data fork that hold them, each of one
 * type: zero-fill (0), raw (1), ignore (2, free space: zeros), ADC
 * (0x80000004), zlib (0x80000005), bzip2 (0x80000006), LZFSE (0x80000007),
 * LZMA (0x80000008, a whole xz stream), comment (0x7ffffffe) and the
 * terminator (0xffffffff). Sectors no chunk covers read as zeros.
 *
 * Checksums: the trailer's DataChecksum is the CRC-32 of the data fork's
 * bytes; each block table's checksum is the CRC-32 of the partition's
 * decoded chunks in order (zero-fill chunks as zeros, ignore chunks left
 * out); the trailer's MasterChecksum is the CRC-32 of the block tables'
 * checksums, 4 big-endian bytes each. Reading verifies both kinds as
 * chunks are decoded (see {@linkcode dmg}).
 *
 * This module is browser compatible.
 *
 * @module
 */

import { probeDmg } from "./_signatures.ts";
import { checkWriteOptions, optionErrors } from "../streams/options.ts";
import { ascii, be32, formatErrors, isZero, le32, Scratch } from "./_binary.ts";
import * as zlib from "./codecs/zlib.ts";
import { crc32, crc32Combine, crc32Zeros } from "./codecs/crc32.ts";
import {
  ChecksumError,
  CodecError,
  ImageFormatError,
  UnsupportedError,
} from "../streams/errors.ts";
import {
  checkRange,
  type Driver,
  type EncodeOptions,
  type Extent,
  extentsOf,
  type Image,
  type OpenOptions,
  readInto as readIntoSource,
  type Sink,
  type Source,
} from "../streams/types.ts";
import {
  type Checksum,
  CHECKSUM_CRC32,
  type Koly,
  KOLY_SIZE,
  kolyBytes,
  parseKoly,
} from "./dmg/_koly.ts";
import {
  CHUNK_TYPES,
  type Mish,
  mishBytes,
  parseMish,
  TYPE,
} from "./dmg/_mish.ts";
import {
  encodeBase64,
  escapeXml,
  parsePlist,
  type PlistValue,
} from "./dmg/_plist.ts";
import { parseResourceFork } from "./dmg/_rsrc.ts";
import { codecPool } from "./codecs/_pool.ts";
import { joinSegments, refuseLaterSegment } from "./dmg/_segments.ts";

const FORMAT = "dmg";
const optionFail = optionErrors(FORMAT);
const SECTOR = 512;

/**
 * The largest XML plist or resource fork read: a 1 TiB disk in 1 MiB
 * chunks needs about 55 MiB; the parsed tables take a few times that.
 */
const MAX_TABLE_BYTES = 64 << 20;
/** Decoded chunks kept for reads that do not cover a chunk whole, in bytes. */
const CACHE_BYTES = 16 << 20;
/**
 * Compressed pieces of at least this many decoded bytes (dmg chunks of 4
 * to 64 MiB; hdiutil's are 1 MiB at most, ours `-o chunk_sectors`) are
 * read and decoded into buffers kept for reuse, two of each kind: a fresh
 * 64 MiB array per chunk stayed resident until V8 collected it, and a
 * convert of 64 MiB chunks peaked at 248 MiB RSS.
 */
const BIG_PIECE_BYTES = 4 << 20;
/**
 * Decoded big pieces alive at once (cached, in use or decoding) in bytes,
 * at least one whatever its size: 64 MiB chunks decode one at a time, so
 * a convert of them stays under 256 MiB RSS (the budget of issue 15).
 * Reads that need a piece while the budget is spent wait for the pieces
 * before it to be copied out, and cached big pieces nobody uses are
 * dropped to make room.
 */
const BIG_BUDGET_BYTES = 96 << 20;
/** How many bytes of neighbouring chunks one file read fetches at most. */
const READ_BYTES = 8 << 20;
/** Runs of chunks one `readInto` decodes at once (each from one file read). */
const RUNS_IN_FLIGHT = 4;
/**
 * Shared buffers kept for reuse, of each kind (packed runs, decoded
 * halves): convert keeps up to five 2 MiB reads in flight, each a run
 * decoded in two halves, so ten outputs are in use at once. With four kept
 * (Scratch's default), every read past the second took fresh shared
 * buffers, which are freed only once both the main thread and the worker
 * that saw them collect: reading the bench's 1 GiB LZFSE dmg four reads
 * at a time peaked at 277 MiB RSS, two at a time at 123 MiB. Kept buffers
 * are never more than were in use at once.
 */
const SHARED_KEEP = 16;
/** Raw chunks are read (and checksummed) in pieces of this many bytes. */
const RAW_PIECE_BYTES = 1 << 20;
/**
 * Images with at least this many compressed chunks decode them on the
 * worker pool (small images decode inline: starting workers costs more),
 * except zlib chunks where node:zlib is there ({@linkcode inflatesHere}),
 * which always inflate on this thread: node:zlib
 * inflates the bench's 1 GiB disk in about 70 ms, less than posting the
 * chunks to workers and back cost, and an image without other codecs
 * then starts no worker (each is a V8 isolate: peak RSS 74 MiB against
 * 205-250 MiB with the two workers; convert 0.3 s against 0.7-0.9 s).
 * bzip2 on the pool: 1.55 s against about 2.5 s inline.
 */
const POOL_MIN_CHUNKS = 16;

/**
 * Chunk types decoded on the calling thread whatever the image's size:
 * zlib where the runtime inflates natively (Deno, Node). Browsers inflate
 * through DecompressionStream, and their zlib chunks stay on the pool.
 */
const inflatesHere = (type: number) =>
  type === TYPE.zlib && zlib.hasNativeInflate();

/** Codec module names (drivers/codecs/*.ts) by chunk type. */
const CODECS: ReadonlyMap<number, string> = new Map([
  [TYPE.adc, "adc"],
  [TYPE.zlib, "zlib"],
  [TYPE.bzip2, "bzip2"],
  [TYPE.lzfse, "lzfse"],
  [TYPE.lzma, "xz"],
]);

/** A codec module (see drivers/codecs/zlib.ts for the contract). */
interface Codec {
  decode(input: Uint8Array, expectedSize: number): Promise<Uint8Array>;
  encode(input: Uint8Array): Promise<Uint8Array>;
  /** Decodes into `out`, filling it exactly (zlib, bzip2, lzfse, xz have it). */
  decodeInto?(input: Uint8Array, out: Uint8Array): Promise<void>;
}

/**
 * The codec modules by name, loaded on first use: an image of zlib chunks
 * never compiles the 4,000 lines of bzip2, LZFSE, xz and ADC (about 5 ms of
 * start-up). The specifiers are literal, so `deno bundle` still puts every
 * codec in the browser bundle.
 */
const CODEC_LOADERS: Record<string, () => Promise<Codec>> = {
  zlib: () => Promise.resolve(zlib),
  // ADC's decodeInto is synchronous and returns its output: not this one.
  adc: () =>
    import("./codecs/adc.ts").then((m) => ({
      decode: m.decode,
      encode: m.encode,
    })),
  bzip2: () => import("./codecs/bzip2.ts"),
  lzfse: () => import("./codecs/lzfse.ts"),
  xz: () => import("./codecs/xz.ts"),
};

const codecModules = new Map<string, Promise<Codec>>();
/** The codec module `name` (one of {@linkcode CODECS}' values). */
function codecModule(name: string): Promise<Codec> {
  let found = codecModules.get(name);
  if (!found) {
    found = CODEC_LOADERS[name]();
    codecModules.set(name, found);
  }
  return found;
}

const fail = formatErrors(FORMAT);

/** One partition: a `blkx` entry and its parsed block table. */
interface Partition {
  /** `blkx[i] "Name"`, for messages. */
  where: string;
  name: string;
  id: number | string;
  mish: Mish;
}

/** What the plist or resource fork holds. */
interface Tables {
  koly: Koly;
  partitions: Partition[];
  /** Where the block tables came from. */
  from: "xml" | "resource fork";
}

const asString = (v: PlistValue | undefined): string | undefined =>
  typeof v === "string" ? v : undefined;

/** Reads the trailer and the block tables (XML plist, else resource fork). */
async function readTables(source: Source): Promise<Tables> {
  const file = source.name;
  const size = source.size;
  if (size < KOLY_SIZE) {
    throw fail(
      "file size",
      size,
      `at least ${KOLY_SIZE} bytes (the koly trailer)`,
      0,
      file,
    );
  }
  const at = size - KOLY_SIZE;
  const koly = parseKoly(await source.read(at, KOLY_SIZE), at, size, file);
  refuseLaterSegment(koly, file);
  const partitions: Partition[] = [];
  let from: Tables["from"];
  if (koly.xmlLength > 0) {
    from = "xml";
    if (koly.xmlLength > MAX_TABLE_BYTES) {
      throw fail(
        "koly.XMLLength",
        koly.xmlLength,
        `at most ${MAX_TABLE_BYTES}`,
        at + 224,
        file,
      );
    }
    const bytes = await source.read(koly.xmlOffset, koly.xmlLength);
    let text: string;
    try {
      text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
    } catch {
      throw fail("XML plist", "bytes", "UTF-8 text", koly.xmlOffset, file);
    }
    const root = parsePlist(text, koly.xmlOffset, file);
    const rf = root instanceof Map ? root.get("resource-fork") : undefined;
    const blkx = rf instanceof Map ? rf.get("blkx") : undefined;
    if (!Array.isArray(blkx)) {
      throw fail(
        "XML plist resource-fork.blkx",
        blkx === undefined ? "missing" : typeof blkx,
        "an array of partition dicts",
        koly.xmlOffset,
        file,
      );
    }
    blkx.forEach((entry, i) => {
      if (!(entry instanceof Map)) {
        throw fail(`blkx[${i}]`, typeof entry, "a dict", koly.xmlOffset, file);
      }
      const name = asString(entry.get("CFName")) ||
        asString(entry.get("Name")) || "";
      const where = `blkx[${i}] ${JSON.stringify(name)}`;
      const data = entry.get("Data");
      if (!(data instanceof Uint8Array)) {
        throw fail(
          `${where} Data`,
          data === undefined ? "missing" : typeof data,
          "base64 <data>",
          koly.xmlOffset,
          file,
        );
      }
      const rawId = entry.get("ID");
      const id = typeof rawId === "string" && /^-?\d+$/.test(rawId)
        ? Number(rawId)
        : typeof rawId === "bigint"
        ? Number(rawId)
        : asString(rawId) ?? i;
      partitions.push({ where, name, id, mish: parseMish(data, where, file) });
    });
  } else if (koly.rsrcForkLength > 0) {
    from = "resource fork";
    if (koly.rsrcForkLength > MAX_TABLE_BYTES) {
      throw fail(
        "koly.RsrcForkLength",
        koly.rsrcForkLength,
        `at most ${MAX_TABLE_BYTES}`,
        at + 48,
        file,
      );
    }
    const fork = await source.read(koly.rsrcForkOffset, koly.rsrcForkLength);
    const resources = parseResourceFork(fork, koly.rsrcForkOffset, file);
    resources.filter((r) => r.type === "blkx").forEach((r, i) => {
      const where = `blkx[${i}] ${JSON.stringify(r.name)}`;
      partitions.push({
        where,
        name: r.name,
        id: r.id,
        mish: parseMish(r.data, where, file),
      });
    });
  } else {
    throw fail(
      "koly.XMLLength",
      0,
      "non-zero, or a resource fork (koly.RsrcForkLength) holding the block tables",
      at + 224,
      file,
    );
  }
  return { koly, partitions, from };
}

/**
 * Every chunk of every partition as pieces in disk order: raw chunks are
 * cut into pieces of at most {@linkcode RAW_PIECE_BYTES}; comments and
 * terminators are gone. Typed arrays, so a huge table stays small.
 */
interface Index {
  count: number;
  /** First disk sector. */
  sector: Float64Array;
  sectors: Float64Array;
  /** File offset of the packed bytes (data fork offset added). */
  offset: Float64Array;
  /** Packed bytes. */
  length: Float64Array;
  type: Uint32Array;
  /** Which partition. */
  partition: Uint32Array;
  /** The chunk's entry number in its table (for messages). */
  entry: Uint32Array;
}

const isData = (type: number) => type !== TYPE.zero && type !== TYPE.ignore;

/** Builds the piece index, checking chunks against the disk, the file and each other. */
function buildIndex(
  tables: Tables,
  diskSectors: number,
  fileEnd: number,
  file?: string,
): Index {
  const { koly, partitions } = tables;
  const step = RAW_PIECE_BYTES / SECTOR;
  // Checked and counted first, so the index is allocated once.
  let count = 0;
  for (const p of partitions) {
    for (const c of p.mish.chunks) {
      const at = koly.dataForkOffset + c.offset;
      const field = `${p.where} chunk ${c.entry}`;
      if (c.sector + c.sectors > diskSectors) {
        throw fail(
          `${field} SectorNumber + SectorCount`,
          c.sector + c.sectors,
          `at most koly.SectorCount ${diskSectors} (the chunk runs past the disk)`,
          undefined,
          file,
        );
      }
      if (isData(c.type) && (at > fileEnd || c.length > fileEnd - at)) {
        throw fail(
          `${field} CompressedOffset + CompressedLength`,
          at + c.length,
          `at most ${fileEnd} (the chunk runs past the data before the trailer)`,
          undefined,
          file,
        );
      }
      // A raw chunk's length is its sectors × 512, now known to fit in the file.
      count += c.type === TYPE.raw ? Math.ceil(c.sectors / step) : 1;
    }
  }
  const all: Index = {
    count,
    sector: new Float64Array(count),
    sectors: new Float64Array(count),
    offset: new Float64Array(count),
    length: new Float64Array(count),
    type: new Uint32Array(count),
    partition: new Uint32Array(count),
    entry: new Uint32Array(count),
  };
  let n = 0;
  const add = (
    sector: number,
    sectors: number,
    offset: number,
    length: number,
    type: number,
    partition: number,
    entry: number,
  ) => {
    all.sector[n] = sector;
    all.sectors[n] = sectors;
    all.offset[n] = offset;
    all.length[n] = length;
    all.type[n] = type;
    all.partition[n] = partition;
    all.entry[n] = entry;
    n++;
  };
  partitions.forEach((p, pi) => {
    for (const c of p.mish.chunks) {
      const at = koly.dataForkOffset + c.offset;
      if (c.type !== TYPE.raw) {
        add(
          c.sector,
          c.sectors,
          at,
          isData(c.type) ? c.length : 0,
          c.type,
          pi,
          c.entry,
        );
        continue;
      }
      for (let s = 0; s < c.sectors; s += step) {
        const k = Math.min(step, c.sectors - s);
        add(c.sector + s, k, at + s * SECTOR, k * SECTOR, c.type, pi, c.entry);
      }
    }
  });
  // Partitions are listed in disk order in every image seen; others are sorted.
  let index = all;
  let sorted = true;
  for (let i = 1; i < count && sorted; i++) {
    sorted = all.sector[i] >= all.sector[i - 1];
  }
  if (!sorted) {
    const order = Uint32Array.from({ length: count }, (_, i) => i)
      .sort((a, b) => all.sector[a] - all.sector[b]);
    const pick = <T extends Float64Array | Uint32Array>(from: T): T =>
      from.map((_, i) => from[order[i]]) as T;
    index = {
      count,
      sector: pick(all.sector),
      sectors: pick(all.sectors),
      offset: pick(all.offset),
      length: pick(all.length),
      type: pick(all.type),
      partition: pick(all.partition),
      entry: pick(all.entry),
    };
  }
  for (let i = 1; i < count; i++) {
    const end = index.sector[i - 1] + index.sectors[i - 1];
    if (index.sector[i] < end) {
      const here = partitions[index.partition[i]].where;
      const before = partitions[index.partition[i - 1]].where;
      throw fail(
        `${here} chunk ${index.entry[i]} SectorNumber`,
        index.sector[i],
        `at least ${end}: it overlaps ${before} chunk ${index.entry[i - 1]}`,
        undefined,
        file,
      );
    }
  }
  return index;
}

/** The first piece that ends after `sector` (binary search). */
function firstPiece(index: Index, sector: number): number {
  let lo = 0;
  let hi = index.count;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (index.sector[mid] + index.sectors[mid] <= sector) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The stored CRC-32 of a checksum field, or undefined when it is not a CRC-32. */
function storedCrc(c: Checksum): number | undefined {
  return c.type === CHECKSUM_CRC32 && c.data.length >= 4
    ? be32(c.data, 0)
    : undefined;
}

const hex = (n: number) => n.toString(16).padStart(8, "0");

function describeChecksum(c: Checksum): string {
  if (c.type === 0) return "none";
  const crc = storedCrc(c);
  return crc === undefined
    ? `type ${c.type} (${c.bits} bits, not checked)`
    : `CRC32 ${hex(crc)}`;
}

/**
 * The checksum bookkeeping: each data piece's CRC-32 (of its decoded and
 * of its packed bytes) is recorded when it is first decoded, in whatever
 * order reads come; once every piece of a partition (or of the data fork)
 * is known, the CRCs are joined in order with `crc32Combine` and compared.
 */
class Verifier {
  #decodedCrc: Uint32Array;
  #packedCrc: Uint32Array;
  #known: Uint8Array;
  /** Unknown data pieces per partition; -1 once checked (or not checkable). */
  #partitionLeft: Int32Array;
  #partitionFirst: Int32Array;
  #partitionLast: Int32Array;
  /** Unknown pieces of the data fork; -1 once checked or when unchecked. */
  #forkLeft: number;
  /** Piece indices in file order, when they tile the data fork exactly. */
  #forkOrder?: Uint32Array;
  /** Mismatches found, by partition (-1: the data fork); raised again by later reads. */
  #errors = new Map<number, ChecksumError>();

  constructor(
    readonly index: Index,
    readonly tables: Tables,
    readonly file?: string,
  ) {
    const n = index.count;
    this.#decodedCrc = new Uint32Array(n);
    this.#packedCrc = new Uint32Array(n);
    this.#known = new Uint8Array(n);
    const parts = tables.partitions.length;
    this.#partitionLeft = new Int32Array(parts).fill(-1);
    this.#partitionFirst = new Int32Array(parts).fill(-1);
    this.#partitionLast = new Int32Array(parts).fill(-1);
    tables.partitions.forEach((p, pi) => {
      if (storedCrc(p.mish.checksum) !== undefined) this.#partitionLeft[pi] = 0;
    });
    const data: number[] = [];
    for (let i = 0; i < n; i++) {
      const p = index.partition[i];
      if (this.#partitionFirst[p] < 0) this.#partitionFirst[p] = i;
      this.#partitionLast[p] = i;
      if (isData(index.type[i])) {
        if (this.#partitionLeft[p] >= 0) this.#partitionLeft[p]++;
        if (index.length[i] > 0) data.push(i);
      }
    }
    this.#forkLeft = -1;
    const { koly } = tables;
    if (storedCrc(koly.dataChecksum) !== undefined) {
      data.sort((a, b) => index.offset[a] - index.offset[b]);
      let at = koly.dataForkOffset;
      for (const i of data) {
        if (index.offset[i] !== at) {
          at = -1;
          break;
        }
        at += index.length[i];
      }
      if (at === koly.dataForkOffset + koly.dataForkLength) {
        this.#forkOrder = Uint32Array.from(data);
        this.#forkLeft = data.length;
      }
    }
    // The master checksum covers the tables' checksums: checked at once.
    const master = storedCrc(koly.masterChecksum);
    const sums = tables.partitions.map((p) => storedCrc(p.mish.checksum));
    if (master !== undefined && sums.every((s) => s !== undefined)) {
      const bytes = new Uint8Array(sums.length * 4);
      const view = new DataView(bytes.buffer);
      sums.forEach((s, i) => view.setUint32(i * 4, s!));
      const crc = crc32(bytes);
      if (crc !== master) {
        throw new ChecksumError(
          {
            format: FORMAT,
            field: "koly.MasterChecksum (CRC-32 of the partitions' checksums)",
            offset: koly.offset + 360,
            file,
          },
          hex(master),
          hex(crc),
        );
      }
    }
    // Partitions with nothing to decode are checked at once.
    for (let p = 0; p < parts; p++) {
      if (this.#partitionLeft[p] === 0) this.#checkPartition(p);
    }
    if (this.#forkLeft === 0) this.#checkFork();
  }

  /** What is checked, for `info`. */
  get coverage(): { partitions: number; dataFork: boolean } {
    let partitions = 0;
    for (const p of this.tables.partitions) {
      if (storedCrc(p.mish.checksum) !== undefined) partitions++;
    }
    return { partitions, dataFork: this.#forkOrder !== undefined };
  }

  /** Records piece `i`'s bytes; throws a ChecksumError when that completes a bad partition or data fork. */
  record(i: number, decoded: Uint8Array, packed: Uint8Array) {
    if (this.#known[i]) {
      this.recordCrc(i, 0, 0);
      return;
    }
    const crc = crc32(decoded);
    this.recordCrc(i, crc, packed === decoded ? crc : crc32(packed));
  }

  /** {@linkcode record} from the CRCs of the decoded and the packed bytes. */
  recordCrc(i: number, decodedCrc: number, packedCrc: number) {
    if (this.#known[i]) {
      const error = this.#errors.get(this.index.partition[i]) ??
        this.#errors.get(-1);
      if (error) throw error;
      return;
    }
    this.#known[i] = 1;
    this.#decodedCrc[i] = decodedCrc;
    this.#packedCrc[i] = packedCrc;
    const p = this.index.partition[i];
    if (this.#partitionLeft[p] > 0 && --this.#partitionLeft[p] === 0) {
      this.#checkPartition(p);
    }
    if (this.#forkLeft > 0 && --this.#forkLeft === 0) this.#checkFork();
  }

  #checkPartition(p: number) {
    this.#partitionLeft[p] = -1;
    const { index } = this;
    let crc = 0;
    const first = this.#partitionFirst[p];
    if (first >= 0) {
      for (let i = first; i <= this.#partitionLast[p]; i++) {
        const type = index.type[i];
        const bytes = index.sectors[i] * SECTOR;
        if (type === TYPE.ignore) continue;
        crc = type === TYPE.zero
          ? crc32Zeros(crc, bytes)
          : crc32Combine(crc, this.#decodedCrc[i], bytes);
      }
    }
    const partition = this.tables.partitions[p];
    const stored = storedCrc(partition.mish.checksum)!;
    if (crc !== stored) {
      const error = new ChecksumError(
        {
          format: FORMAT,
          field:
            `${partition.where} checksum (CRC-32 of the partition's chunks)`,
          file: this.file,
        },
        hex(stored),
        hex(crc),
      );
      this.#errors.set(p, error);
      throw error;
    }
  }

  #checkFork() {
    this.#forkLeft = -1;
    let crc = 0;
    for (const i of this.#forkOrder!) {
      crc = crc32Combine(crc, this.#packedCrc[i], this.index.length[i]);
    }
    const stored = storedCrc(this.tables.koly.dataChecksum)!;
    if (crc !== stored) {
      const error = new ChecksumError(
        {
          format: FORMAT,
          field: "koly.DataChecksum (CRC-32 of the data fork)",
          offset: this.tables.koly.offset + 88,
          file: this.file,
        },
        hex(stored),
        hex(crc),
      );
      this.#errors.set(-1, error);
      throw error;
    }
  }
}

/** A use of a cached piece: its decoded bytes, and `release` once they are copied out. */
interface Held {
  value: Promise<Uint8Array>;
  release(): void;
}

/** A piece in {@linkcode PieceCache}. */
interface CacheEntry {
  value: Promise<Uint8Array>;
  bytes: number;
  /** Reads (and the decode) using the piece's bytes now. */
  users: number;
  dropped: boolean;
  /** Hands the piece's buffer back for reuse: called once, when dropped and unused. */
  recycle?: () => void;
}

/**
 * A small LRU of decoded pieces by byte size, holding promises so
 * concurrent reads share one decode. Each use is held until its bytes are
 * copied out: a piece decoded into a recycled buffer
 * ({@linkcode BIG_PIECE_BYTES}) is handed back only when it has left the
 * cache and nothing uses it, so a buffer is never rewritten under a read.
 */
class PieceCache {
  #entries = new Map<number, CacheEntry>();
  #bytes = 0;
  /**
   * @param capacity bytes of decoded pieces kept
   * @param onUnused called when a piece with a buffer to hand back is no
   * longer used (a load waiting for room may now drop it)
   */
  constructor(readonly capacity: number, readonly onUnused?: () => void) {}
  has(i: number): boolean {
    return this.#entries.has(i);
  }
  get(i: number): Held | undefined {
    const hit = this.#entries.get(i);
    if (!hit) return undefined;
    this.#entries.delete(i);
    this.#entries.set(i, hit);
    return this.#hold(hit);
  }
  set(
    i: number,
    value: Promise<Uint8Array>,
    bytes: number,
    recycle?: () => void,
  ): Held {
    const entry: CacheEntry = {
      value,
      bytes,
      users: 0,
      dropped: false,
      recycle,
    };
    const held = this.#hold(entry);
    this.#entries.set(i, entry);
    this.#bytes += bytes;
    // A failed decode is not kept: the next read tries again and reports again.
    value.catch(() => {
      if (this.#entries.get(i) === entry) this.#drop(i);
    });
    // The newest entry stays even when it alone is over the budget.
    while (this.#bytes > this.capacity && this.#entries.size > 1) {
      this.#drop(this.#entries.keys().next().value!);
    }
    return held;
  }
  #hold(entry: CacheEntry): Held {
    entry.users++;
    let done = false;
    return {
      value: entry.value,
      release: () => {
        if (done) return;
        done = true;
        entry.users--;
        this.#recycle(entry);
        if (entry.users === 0 && !entry.dropped && entry.recycle) {
          this.onUnused?.();
        }
      },
    };
  }
  /** Drops the least recently used piece that has a buffer to hand back and no use; false when there is none. */
  dropUnusedRecyclable(): boolean {
    for (const [i, entry] of this.#entries) {
      if (entry.recycle && entry.users === 0) {
        this.#drop(i);
        return true;
      }
    }
    return false;
  }
  #recycle(entry: CacheEntry) {
    if (!entry.dropped || entry.users > 0 || !entry.recycle) return;
    const recycle = entry.recycle;
    entry.recycle = undefined;
    recycle();
  }
  #drop(i: number) {
    const entry = this.#entries.get(i);
    if (!entry) return;
    this.#entries.delete(i);
    this.#bytes -= entry.bytes;
    entry.dropped = true;
    this.#recycle(entry);
  }
}

/** Shared memory for the workers to decode into, where the platform has it. */
const hasShared = typeof SharedArrayBuffer === "function";

function dmgImage(
  source: Source,
  tables: Tables,
  diskSectors: number,
  options: OpenOptions,
  dataEnd = tables.koly.offset,
): Image {
  const file = source.name;
  // Every chunk lies before the trailer (or in the segments' data).
  const index = buildIndex(tables, diskSectors, dataEnd, file);
  const size = diskSectors * SECTOR;
  const verify = (options.options?.verify ?? "on") !== "off";
  const verifier = verify ? new Verifier(index, tables, file) : undefined;
  // A piece left unused may be dropped for a load waiting for room.
  const cache = new PieceCache(CACHE_BYTES, () => wakeBig());

  const counts: Record<string, number> = {};
  let compressed = 0;
  for (const p of tables.partitions) {
    for (const c of p.mish.chunks) {
      const name = CHUNK_TYPES.get(c.type)!;
      counts[name] = (counts[name] ?? 0) + 1;
      if (CODECS.has(c.type)) compressed++;
    }
  }
  const usePool = compressed >= POOL_MIN_CHUNKS;
  // The workers stay alive from open to close (see _pool.ts).
  const letGo = usePool ? codecPool.hold() : () => {};

  async function decodePiece(
    i: number,
    packed: Uint8Array,
  ): Promise<Uint8Array> {
    const type = index.type[i];
    const bytes = index.sectors[i] * SECTOR;
    let decoded: Uint8Array;
    if (type === TYPE.raw) {
      decoded = packed;
    } else {
      const name = CODECS.get(type)!;
      try {
        const pooled = usePool && codecPool.usable && !inflatesHere(type)
          ? await codecPool.run("decode", name, packed, bytes)
          : null;
        const codec = pooled ? undefined : await codecModule(name);
        if (pooled) decoded = pooled;
        else if (codec!.decodeInto) {
          // Straight into one array of the chunk's size: a 64 MiB chunk
          // through `decode` was made in pieces and joined, twice its size
          // at the peak, per request when the service reads in parallel.
          decoded = new Uint8Array(bytes);
          await codec!.decodeInto(packed, decoded);
        } else decoded = await codec!.decode(packed, bytes);
      } catch (e) {
        throw chunkError(i, packed.length, e);
      }
    }
    verifier?.record(i, decoded, packed);
    return decoded;
  }

  /** A codec's failure on piece `i` as an error naming the chunk. */
  function chunkError(i: number, packedLength: number, e: unknown): unknown {
    if (!(e instanceof CodecError)) return e;
    const p = tables.partitions[index.partition[i]];
    return new ImageFormatError(
      {
        format: FORMAT,
        field: `${p.where} chunk ${index.entry[i]}`,
        offset: index.offset[i],
        file,
      },
      `${p.where} chunk ${index.entry[i]} (${packedLength} bytes of ${
        CODECS.get(index.type[i])
      } at byte ${index.offset[i]}) does not decode to its ${
        index.sectors[i] * SECTOR
      } bytes: ${e.message}`,
    );
  }

  /** Starts loading piece `i` unless it is cached; release the answer once its bytes are copied out. */
  function load(i: number): Held {
    const hit = cache.get(i);
    if (hit) return hit;
    const bytes = index.sectors[i] * SECTOR;
    if (bytes >= BIG_PIECE_BYTES && index.type[i] !== TYPE.raw) {
      let recycle: (() => void) | undefined;
      const decoded = decodeBig(i, (r) => recycle = r);
      const held = cache.set(i, decoded, bytes, () => recycle?.());
      // The decode writes into its buffer until it settles: a use of its own.
      const decoding = cache.get(i)!;
      decoded.then(decoding.release, decoding.release);
      return held;
    }
    const decoded = source.read(index.offset[i], index.length[i]).then((
      packed,
    ) => decodePiece(i, packed));
    return cache.set(i, decoded, bytes);
  }

  /** Recycled buffers for big pieces' packed and decoded bytes, one of each kept. */
  // Shared only where workers decode into them: V8 collected dropped
  // shared buffers late (20 service reads of 64 MiB chunks, each its own
  // image, peaked at 1.4 GiB with them shared and two kept per image).
  const bigScratch = () =>
    new Scratch(
      (n) =>
        usePool && hasShared
          ? new Uint8Array(new SharedArrayBuffer(n))
          : new Uint8Array(n),
      1,
      Infinity,
    );
  const bigDecoded = bigScratch();
  const bigPacked = bigScratch();
  /** Bytes of decoded big pieces alive, and the loads waiting for room. */
  let bigAlive = 0;
  let bigWaiting: (() => void)[] = [];

  /** Waits until `bytes` more decoded bytes fit in {@linkcode BIG_BUDGET_BYTES}, dropping unused cached big pieces to make room. */
  async function reserveBig(bytes: number) {
    while (bigAlive > 0 && bigAlive + bytes > BIG_BUDGET_BYTES) {
      if (cache.dropUnusedRecyclable()) continue;
      await new Promise<void>((wake) => bigWaiting.push(wake));
    }
    bigAlive += bytes;
  }
  function unreserveBig(bytes: number) {
    bigAlive -= bytes;
    wakeBig();
  }
  /** Lets the loads waiting for room look again. */
  function wakeBig() {
    const waiting = bigWaiting;
    bigWaiting = [];
    for (const wake of waiting) wake();
  }

  /**
   * Decodes big compressed piece `i` within the budget: read into a
   * recycled buffer, decoded into another on a worker when the pool is in
   * use and memory is shared, else here (into it where the codec decodes
   * in place, else into the codec's own array). `onRecycle` receives what
   * hands the room and the buffer back once the piece is no longer used.
   */
  async function decodeBig(
    i: number,
    onRecycle: (recycle: () => void) => void,
  ): Promise<Uint8Array> {
    const bytes = index.sectors[i] * SECTOR;
    await reserveBig(bytes);
    let out: Uint8Array | undefined;
    onRecycle(() => {
      if (out) bigDecoded.give(out);
      unreserveBig(bytes);
    });
    const packed = bigPacked.take(index.length[i]);
    try {
      await readIntoSource(source, index.offset[i], packed);
      const codec = await codecModule(CODECS.get(index.type[i])!);
      const pooled = usePool && codecPool.usable && hasShared;
      if (pooled || codec.decodeInto) {
        out = bigDecoded.take(bytes);
        const crcs = pooled
          ? await codecPool.batchInto(
            packed,
            [index.type[i], 0, packed.length, bytes, 0],
            out,
            true,
          )
          : null;
        if (crcs) {
          verifier?.recordCrc(i, crcs[0], crc32(packed));
          return out;
        }
        // Not decoded there: decoded here, which also names a bad chunk.
        await decodeInline(i, packed, out);
        verifier?.record(i, out, packed);
        return out;
      }
      let decoded: Uint8Array;
      try {
        decoded = await codec.decode(packed, bytes);
      } catch (e) {
        throw chunkError(i, packed.length, e);
      }
      verifier?.record(i, decoded, packed);
      return decoded;
    } finally {
      bigPacked.give(packed);
    }
  }

  const packedScratch = new Scratch((n) => new Uint8Array(n));
  const sharedScratch = hasShared
    ? new Scratch(
      (n) => new Uint8Array(new SharedArrayBuffer(n)),
      SHARED_KEEP,
    )
    : undefined;
  // Packed bytes of runs the workers decode, read into shared memory they
  // read in place: a copy posted per job was garbage in the workers, freed
  // only at their next scavenge (about a second apart): 130 MiB of dead
  // inputs, 290 MiB peak RSS converting the bench's 1 GiB LZFSE dmg.
  const sharedPacked = hasShared
    ? new Scratch(
      (n) => new Uint8Array(new SharedArrayBuffer(n)),
      SHARED_KEEP,
    )
    : undefined;

  /** Decodes compressed piece `i` on this thread into `out`, its whole size. */
  async function decodeInline(i: number, packed: Uint8Array, out: Uint8Array) {
    const codec = await codecModule(CODECS.get(index.type[i])!);
    try {
      if (codec.decodeInto) await codec.decodeInto(packed, out);
      else out.set(await codec.decode(packed, out.length));
    } catch (e) {
      throw chunkError(i, packed.length, e);
    }
  }

  /**
   * Decodes pieces `list` (whole, compressed, not inflated here; their packed
   * bytes in `packed`, which starts at file offset `start`) on the worker
   * pool and places them in `into` (disk offset `offset`). Answers their
   * CRC-32s (and, where memory is not shared, those of their packed bytes,
   * made on the workers too), or null when the pool did not (the caller
   * decodes them).
   */
  async function decodePooled(
    list: number[],
    packed: Uint8Array,
    start: number,
    offset: number,
    into: Uint8Array,
  ): Promise<{ decoded: Uint32Array; packed?: Uint32Array } | null> {
    if (!sharedScratch) {
      // Browser pages that are not cross-origin isolated: one run of the
      // chunks per worker, each moved there and back with its output
      // buffer (CodecPool.spread). A batch per half that answered an
      // array per chunk, placed and checked here, kept the module
      // worker busy (chromium, the bench's zlib dmg by URL: 183 ms
      // placing chunks, 117 ms of CRC-32 of the packed bytes).
      const jobs: number[] = [];
      for (const i of list) {
        jobs.push(
          index.type[i],
          index.offset[i] - start,
          index.length[i],
          index.sectors[i] * SECTOR,
          index.sector[i] * SECTOR - offset,
        );
      }
      const crcs = await codecPool.spread(packed, jobs, into);
      if (!crcs) return null;
      const decoded = new Uint32Array(list.length);
      const packedCrcs = new Uint32Array(list.length);
      for (let k = 0; k < list.length; k++) {
        decoded[k] = crcs[2 * k];
        packedCrcs[k] = crcs[2 * k + 1];
      }
      return { decoded, packed: packedCrcs };
    }
    if (list.length >= 2) {
      // Two calls, each half the chunks: the least busy workers take
      // them, so one read's chunks decode on two cores at once. convert
      // waits for its reads in order, and a read's chunks on one worker
      // (two 1 MiB bzip2 chunks: 60-120 ms) left the other worker idle
      // 7-17% of a browser conversion behind it.
      const half = Math.ceil(list.length / 2);
      const parts = await Promise.all([
        decodeBatch(list.slice(0, half), packed, start, offset, into),
        decodeBatch(list.slice(half), packed, start, offset, into),
      ]);
      if (!parts[0] || !parts[1]) return null;
      const crcs = new Uint32Array(list.length);
      crcs.set(parts[0]);
      crcs.set(parts[1], half);
      return { decoded: crcs };
    }
    const crcs = await decodeBatch(list, packed, start, offset, into);
    return crcs && { decoded: crcs };
  }

  /** One call of {@linkcode decodePooled}: pieces `list` on one worker. */
  async function decodeBatch(
    list: number[],
    packed: Uint8Array,
    start: number,
    offset: number,
    into: Uint8Array,
  ): Promise<Uint32Array | null> {
    const jobs: number[] = [];
    let bytes = 0;
    // Only the packed bytes of `list` go (they are copied for the worker).
    const last = list[list.length - 1];
    const from = index.offset[list[0]] - start;
    const mine = packed.subarray(
      from,
      index.offset[last] + index.length[last] - start,
    );
    for (const i of list) {
      const size = index.sectors[i] * SECTOR;
      jobs.push(
        index.type[i],
        index.offset[i] - start - from,
        index.length[i],
        size,
        bytes,
      );
      bytes += size;
    }
    const place = (k: number, piece: Uint8Array) =>
      into.set(piece, index.sector[list[k]] * SECTOR - offset);
    // Reached only with shared memory (decodePooled spreads the chunks
    // otherwise): the workers decode into it and this thread copies out
    // (2 MiB in about 0.1 ms): no array is made or transferred per chunk.
    const shared = sharedScratch!.take(bytes);
    try {
      const crcs = await codecPool.batchInto(mine, jobs, shared, true);
      if (!crcs) return null;
      list.forEach((_, k) =>
        place(
          k,
          shared.subarray(jobs[k * 5 + 4], jobs[k * 5 + 4] + jobs[k * 5 + 3]),
        )
      );
      return crcs;
    } finally {
      sharedScratch!.give(shared);
    }
  }

  /**
   * Decodes pieces `run` (whole, compressed, packed bytes one run of the
   * file) into `into` (disk offset `offset`) from one file read: zlib on
   * this thread where node:zlib is there, straight into `into` (it inflates the bench's
   * 1 GiB disk in about 70 ms, less than posting it to a worker costs),
   * the other codecs (JavaScript, CPU-bound) on the worker pool when the
   * image is big enough for it.
   */
  async function decodeRun(run: number[], offset: number, into: Uint8Array) {
    const start = index.offset[run[0]];
    const last = run[run.length - 1];
    const onPool = usePool && codecPool.usable &&
      run.some((i) => !inflatesHere(index.type[i]));
    const scratch = onPool && sharedPacked ? sharedPacked : packedScratch;
    const packed = scratch.take(
      index.offset[last] + index.length[last] - start,
    );
    try {
      await readIntoSource(source, start, packed);
      const packedOf = (i: number) =>
        packed.subarray(
          index.offset[i] - start,
          index.offset[i] - start + index.length[i],
        );
      const viewOf = (i: number) =>
        into.subarray(
          index.sector[i] * SECTOR - offset,
          (index.sector[i] + index.sectors[i]) * SECTOR - offset,
        );
      const pooled = usePool && codecPool.usable
        ? run.filter((i) => !inflatesHere(index.type[i]))
        : [];
      // Posted first (the input is copied at once), so the workers start
      // while this thread inflates the zlib chunks.
      const crcs = pooled.length
        ? decodePooled(pooled, packed, start, offset, into)
        : undefined;
      crcs?.catch(() => {}); // awaited below, unless a zlib chunk fails first
      for (const i of run) {
        if (pooled.length && !inflatesHere(index.type[i])) continue;
        const view = viewOf(i);
        await decodeInline(i, packedOf(i), view);
        verifier?.recordCrc(i, crc32(view), crc32(packedOf(i)));
      }
      if (crcs) {
        const got = await crcs;
        for (const [k, i] of pooled.entries()) {
          const view = viewOf(i);
          // Not decoded there: decoded here, which also names a bad chunk.
          if (!got) await decodeInline(i, packedOf(i), view);
          verifier?.recordCrc(
            i,
            got ? got.decoded[k] : crc32(view),
            got?.packed ? got.packed[k] : crc32(packedOf(i)),
          );
        }
      }
    } finally {
      scratch.give(packed);
    }
  }

  /**
   * `read` comes here too. Pieces that lie wholly inside the read and are
   * not cached are read and decoded straight into `into` (convert and
   * streams read each piece once): raw pieces read from the file in place,
   * runs of compressed ones from one file read each. Pieces cut by the
   * read's ends go through `load` and the cache. What no data piece covers
   * is zeroed, as `into` may be a reused buffer.
   */
  async function readInto(offset: number, into: Uint8Array): Promise<void> {
    const length = into.length;
    checkRange(size, offset, length);
    if (length === 0) return;
    const end = offset + length;
    const last = Math.ceil(end / SECTOR);
    const pending: Promise<void>[] = [];
    const runs: number[][] = [];
    let run: number[] = [];
    const flush = () => {
      if (run.length) runs.push(run);
      run = [];
    };
    let at = offset; // bytes before this are placed, pending or zeroed
    for (
      let i = firstPiece(index, Math.floor(offset / SECTOR));
      i < index.count && index.sector[i] < last;
      i++
    ) {
      if (!isData(index.type[i])) continue;
      const pieceStart = index.sector[i] * SECTOR;
      const pieceEnd = pieceStart + index.sectors[i] * SECTOR;
      const from = Math.max(offset, pieceStart);
      const to = Math.min(end, pieceEnd);
      if (from > at) into.fill(0, at - offset, from - offset);
      at = Math.max(at, to);
      if (pieceStart < offset || pieceEnd > end || cache.has(i)) {
        flush();
        const held = load(i);
        pending.push(
          held.value.then((piece) =>
            into.set(
              piece.subarray(from - pieceStart, to - pieceStart),
              from - offset,
            )
          ).finally(held.release),
        );
      } else if (index.type[i] === TYPE.raw) {
        flush();
        const view = into.subarray(pieceStart - offset, pieceEnd - offset);
        pending.push(
          readIntoSource(source, index.offset[i], view).then(() =>
            verifier?.record(i, view, view)
          ),
        );
      } else {
        // A run ends where the packed bytes are not contiguous, or past
        // READ_BYTES packed or decoded (the scratch buffers' sizes).
        const first = run[0];
        if (
          run.length &&
          (index.offset[i] !== index.offset[run[run.length - 1]] +
                index.length[run[run.length - 1]] ||
            index.offset[i] + index.length[i] - index.offset[first] >
              READ_BYTES ||
            pieceEnd - index.sector[first] * SECTOR > READ_BYTES)
        ) flush();
        run.push(i);
      }
    }
    flush();
    if (at < end) into.fill(0, at - offset);
    // A few runs at a time: a read of a whole disk would otherwise hold
    // every run's packed and decoded scratch at once.
    let next = 0;
    const worker = async () => {
      while (next < runs.length) await decodeRun(runs[next++], offset, into);
    };
    for (let k = 0; k < Math.min(RUNS_IN_FLIGHT, runs.length); k++) {
      pending.push(worker());
    }
    await Promise.all(pending);
  }

  const partitions = tables.partitions.map((p) => ({
    name: p.name,
    id: p.id,
    first_sector: p.mish.firstSector,
    sector_count: p.mish.sectorCount,
    checksum: describeChecksum(p.mish.checksum),
  }));
  const coverage = verifier?.coverage;

  return {
    format: FORMAT,
    size,
    name: file,
    encrypted: false,
    details: {
      tables: tables.from,
      partitions,
      codecs: counts,
      checksums: {
        data_fork: describeChecksum(tables.koly.dataChecksum),
        master: describeChecksum(tables.koly.masterChecksum),
        // What open checked, and what is checked only as data is decoded
        // (info decodes nothing, so it cannot say those matched).
        checked_at_open: !verify
          ? "nothing (verify=off)"
          : storedCrc(tables.koly.masterChecksum) !== undefined &&
              tables.partitions.every((p) =>
                storedCrc(p.mish.checksum) !== undefined
              )
          ? "the master checksum (over the partitions' checksums): it matches"
          : "nothing (no master checksum)",
        checked_as_decoded: !verify
          ? "nothing (verify=off)"
          : `the CRC-32s of ${
            coverage!.partitions
          } of ${tables.partitions.length} partitions` +
            (coverage!.dataFork ? " and of the data fork" : "") +
            ", when their chunks are read",
      },
      segment: `${tables.koly.segmentNumber} of ${tables.koly.segmentCount}`,
    },
    async read(offset, length) {
      checkRange(size, offset, length);
      const out = new Uint8Array(length);
      await readInto(offset, out);
      return out;
    },
    readInto,
    async *extents(offset, length): AsyncIterable<Extent> {
      checkRange(size, offset, length);
      const end = offset + length;
      let runStart = offset;
      let runKind: Extent["kind"] | undefined;
      const emit = function* (at: number, to: number, kind: Extent["kind"]) {
        if (to <= at) return;
        if (runKind !== undefined && runKind !== kind) {
          yield { offset: runStart, length: at - runStart, kind: runKind };
          runStart = at;
        }
        runKind = kind;
      };
      let at = offset;
      for (
        let i = firstPiece(index, Math.floor(offset / SECTOR));
        i < index.count && at < end;
        i++
      ) {
        const from = Math.max(at, index.sector[i] * SECTOR);
        const to = Math.min(end, (index.sector[i] + index.sectors[i]) * SECTOR);
        if (from >= end) break;
        yield* emit(at, from, "zero"); // a gap no chunk covers
        yield* emit(from, to, isData(index.type[i]) ? "data" : "zero");
        at = Math.max(at, to);
      }
      yield* emit(at, end, "zero");
      if (runKind !== undefined && end > runStart) {
        yield { offset: runStart, length: end - runStart, kind: runKind };
      }
    },
    close() {
      letGo();
      codecPool.release();
      return source.close?.() ?? Promise.resolve();
    },
  };
}

// ---------------------------------------------------------------------------
// Writing

/** Encoder settings from `-o key=value`. */
interface WriteOptions {
  /** Chunk type written for data. */
  type: number;
  /** Codec module, or undefined for raw. */
  codec?: string;
  chunkSectors: number;
  /** `mbr`: a table per MBR partition when the MBR is simple; `whole`: one table. */
  partitions: "mbr" | "whole";
}

/** `-o compression=` values and their chunk types. */
const COMPRESSIONS: Record<string, number> = {
  raw: TYPE.raw,
  zlib: TYPE.zlib,
  bzip2: TYPE.bzip2,
  lzfse: TYPE.lzfse,
  lzma: TYPE.lzma,
  xz: TYPE.lzma,
  adc: TYPE.adc,
};

function writeOptions(options: Record<string, string> = {}): WriteOptions {
  checkWriteOptions(dmg, options);
  const name = options.compression ?? "zlib";
  const type = COMPRESSIONS[name];
  if (type === undefined) {
    throw optionFail(
      "compression",
      name,
      "one of raw, zlib, bzip2, lzfse, lzma, adc",
    );
  }
  const chunkSectors = Number(options.chunk_sectors ?? 2048);
  if (
    !Number.isSafeInteger(chunkSectors) || chunkSectors < 1 ||
    chunkSectors * SECTOR > (64 << 20)
  ) {
    throw optionFail(
      "chunk_sectors",
      options.chunk_sectors,
      "a whole number from 1 to 131072 (64 MiB)",
    );
  }
  const partitions = options.partitions ?? "mbr";
  if (partitions !== "mbr" && partitions !== "whole") {
    throw optionFail("partitions", partitions, "mbr (the default) or whole");
  }
  return {
    type,
    codec: CODECS.get(type),
    chunkSectors,
    partitions: partitions as WriteOptions["partitions"],
  };
}

/** One chunk ready to write. */
interface Packed {
  type: number;
  sectors: number;
  /** The bytes stored (empty for zero-fill). */
  bytes: Uint8Array;
  /** CRC-32 of the decoded sectors. */
  crc: number;
}

/**
 * Answers "does `[start, end)` hold data?" for increasing ranges, walking
 * the source's allocation map once.
 */
function dataProbe(source: Source) {
  const runs = extentsOf(source, 0, source.size)[Symbol.asyncIterator]();
  const held: Extent[] = [];
  let done = false;
  return async (start: number, end: number): Promise<boolean> => {
    while (held.length && held[0].offset + held[0].length <= start) {
      held.shift();
    }
    while (
      !done &&
      (held.length === 0 || held.at(-1)!.offset + held.at(-1)!.length < end)
    ) {
      const next = await runs.next();
      if (next.done) done = true;
      else if (next.value.offset + next.value.length > start) {
        held.push(next.value);
      }
    }
    return held.some((r) =>
      r.kind === "data" && r.offset < end && r.offset + r.length > start
    );
  };
}

/** The chunks of `source` packed, in order, with several compressions in flight. */
async function* packChunks(
  source: Source,
  settings: WriteOptions,
  layout: Layout[],
  options: EncodeOptions,
): AsyncIterable<Packed> {
  const { chunkSectors, type } = settings;
  // Chunks never cross a partition: [first sector, sectors] of each.
  const spans: [number, number][] = [];
  for (const part of layout) {
    for (let s = 0; s < part.sectors; s += chunkSectors) {
      spans.push([part.first + s, Math.min(chunkSectors, part.sectors - s)]);
    }
  }
  const count = spans.length;
  const hasData = dataProbe(source);
  const encoder = settings.codec
    ? await codecModule(settings.codec)
    : undefined;
  const usePool = encoder !== undefined && count >= POOL_MIN_CHUNKS;
  const inFlight = 8;
  const queue: Promise<Packed>[] = [];

  const pack = async (block: Uint8Array, n: number): Promise<Packed> => {
    const crc = crc32(block);
    if (!encoder) return { type: TYPE.raw, sectors: n, bytes: block, crc };
    const packed =
      (usePool && codecPool.usable
        ? await codecPool.run("encode", settings.codec!, block)
        : null) ?? await encoder.encode(block);
    // A chunk that does not shrink is stored raw, as hdiutil does.
    return packed.length < block.length
      ? { type, sectors: n, bytes: packed, crc }
      : { type: TYPE.raw, sectors: n, bytes: block, crc };
  };

  for (const [first, n] of spans) {
    options.signal?.throwIfAborted();
    const start = first * SECTOR;
    const end = Math.min(source.size, start + n * SECTOR);
    let next: Promise<Packed>;
    if (!(await hasData(start, end))) {
      next = Promise.resolve({
        type: TYPE.zero,
        sectors: n,
        bytes: new Uint8Array(0),
        crc: 0,
      });
    } else {
      let block = await source.read(start, end - start);
      if (block.length < n * SECTOR) {
        const padded = new Uint8Array(n * SECTOR);
        padded.set(block);
        block = padded;
      }
      next = isZero(block)
        ? Promise.resolve({
          type: TYPE.zero,
          sectors: n,
          bytes: new Uint8Array(0),
          crc: 0,
        })
        : pack(block, n);
      next.catch(() => {}); // observed in order below
    }
    queue.push(next);
    while (queue.length > inFlight) yield await queue.shift()!;
  }
  while (queue.length) yield await queue.shift()!;
}

/** One `blkx` entry the writer makes. */
interface Layout {
  first: number;
  sectors: number;
  /** Name and CFName, as hdiutil writes them (`" (DOS_FAT_32 : 1)"`). */
  name: string;
  /** The plist's ID (-1 for the MBR, as hdiutil numbers them). */
  id: number;
  /** The table's BlockDescriptors value. */
  descriptor: number;
}

/** hdiutil's names for MBR partition types. */
const MBR_TYPES: Record<number, string> = {
  0x01: "DOS_FAT_12",
  0x04: "DOS_FAT_16",
  0x06: "DOS_FAT_16",
  0x0b: "DOS_FAT_32",
  0x0c: "DOS_FAT_32",
  0x0e: "DOS_FAT_16",
  0x07: "Windows_NTFS",
  0x82: "Linux_Swap",
  0x83: "Linux",
  0xa8: "Apple_UFS",
  0xab: "Apple_Boot",
  0xaf: "Apple_HFS",
};

/**
 * The partitions written: for a disk with a simple MBR (signature 55 AA,
 * status 0x00 or 0x80 in every entry, primary partitions only, inside the
 * disk, not overlapping, no GPT protective entry) the MBR, each partition
 * and the gaps between them, as hdiutil lays out such a disk; otherwise
 * one whole-disk entry. Every sector is stored either way.
 */
async function layoutOf(
  source: Source,
  sectors: number,
  partitions: WriteOptions["partitions"],
): Promise<Layout[]> {
  const whole: Layout[] = [{
    first: 0,
    sectors,
    name: "whole disk (unknown partition : 0)",
    id: 0,
    descriptor: 0xfffffffe, // hdiutil's value for a whole-disk table
  }];
  if (partitions === "whole" || sectors < 2) return whole;
  const mbr = await source.read(0, SECTOR);
  if (mbr[510] !== 0x55 || mbr[511] !== 0xaa) return whole;
  const parts: { first: number; sectors: number; type: number }[] = [];
  for (let k = 0; k < 4; k++) {
    const at = 446 + 16 * k;
    const type = mbr[at + 4];
    const first = le32(mbr, at + 8);
    const count = le32(mbr, at + 12);
    // A volume boot record (FAT, NTFS) also ends in 55 AA: its code in
    // these bytes rarely has a status of 0x00 or 0x80 in all four entries.
    if (mbr[at] !== 0 && mbr[at] !== 0x80) return whole;
    if (type === 0 || count === 0) continue;
    if ([0x05, 0x0f, 0x85, 0xee, 0xef].includes(type)) return whole;
    if (first < 1 || first + count > sectors) return whole;
    parts.push({ first, sectors: count, type });
  }
  if (parts.length === 0) return whole;
  parts.sort((a, b) => a.first - b.first);
  const out: Layout[] = [{
    first: 0,
    sectors: 1,
    name: "Master Boot Record (MBR : 0)",
    id: -1,
    descriptor: 0,
  }];
  const add = (first: number, count: number, kind: string) => {
    const n = out.length;
    out.push({
      first,
      sectors: count,
      name: ` (${kind} : ${n})`,
      id: n - 1,
      descriptor: n,
    });
  };
  let at = 1;
  for (const p of parts) {
    if (p.first < at) return whole; // overlapping partitions
    if (p.first > at) add(at, p.first - at, "Apple_Free");
    const type = MBR_TYPES[p.type] ??
      `Unknown_0x${p.type.toString(16).padStart(2, "0")}`;
    add(p.first, p.sectors, type);
    at = p.first + p.sectors;
  }
  if (at < sectors) add(at, sectors - at, "Apple_Free");
  return out;
}

/** The XML property list hdiutil writes, one `blkx` entry per partition. */
function plistText(tables: { layout: Layout; mish: Uint8Array }[]): string {
  const entry = ({ layout, mish }: { layout: Layout; mish: Uint8Array }) => [
    "\t\t\t<dict>",
    "\t\t\t\t<key>Attributes</key>",
    "\t\t\t\t<string>0x0050</string>",
    "\t\t\t\t<key>CFName</key>",
    `\t\t\t\t<string>${escapeXml(layout.name)}</string>`,
    "\t\t\t\t<key>Data</key>",
    "\t\t\t\t<data>",
    encodeBase64(mish, "\t\t\t\t").trimEnd(),
    "\t\t\t\t</data>",
    "\t\t\t\t<key>ID</key>",
    `\t\t\t\t<string>${layout.id}</string>`,
    "\t\t\t\t<key>Name</key>",
    `\t\t\t\t<string>${escapeXml(layout.name)}</string>`,
    "\t\t\t</dict>",
  ];
  return [
    '<?xml version="1.0" encoding="UTF-8"?>',
    '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">',
    '<plist version="1.0">',
    "<dict>",
    "\t<key>resource-fork</key>",
    "\t<dict>",
    "\t\t<key>blkx</key>",
    "\t\t<array>",
    ...tables.flatMap(entry),
    "\t\t</array>",
    "\t</dict>",
    "</dict>",
    "</plist>",
    "",
  ].join("\n");
}

/** Writes `source` as a UDIF image (see {@linkcode dmg}). */
async function encode(
  source: Source,
  sink: Sink,
  options: EncodeOptions,
): Promise<void> {
  const settings = writeOptions(options.options);
  const sectors = Math.ceil(source.size / SECTOR);
  const layout = await layoutOf(source, sectors, settings.partitions);
  type Entry = {
    type: number;
    sector: number;
    sectors: number;
    offset: number;
    length: number;
  };
  const chunks: Entry[][] = layout.map(() => []);
  const crcs = layout.map(() => 0);
  let at = 0; // the data fork starts the file
  let forkCrc = 0;
  let part = 0;
  let sector = 0;
  try {
    for await (
      const chunk of packChunks(source, settings, layout, options)
    ) {
      while (sector >= layout[part].first + layout[part].sectors) part++;
      chunks[part].push({
        type: chunk.type,
        sector: sector - layout[part].first,
        sectors: chunk.sectors,
        offset: at,
        length: chunk.bytes.length,
      });
      if (chunk.type === TYPE.zero) {
        crcs[part] = crc32Zeros(crcs[part], chunk.sectors * SECTOR);
      } else {
        crcs[part] = crc32Combine(
          crcs[part],
          chunk.crc,
          chunk.sectors * SECTOR,
        );
        forkCrc = crc32(chunk.bytes, forkCrc);
        await sink.write(at, chunk.bytes);
        at += chunk.bytes.length;
      }
      sector += chunk.sectors;
      options.onProgress?.(Math.min(source.size, sector * SECTOR));
    }
  } finally {
    codecPool.release();
  }
  const tables = layout.map((l, k) => ({
    layout: l,
    mish: mishBytes({
      firstSector: l.first,
      sectorCount: l.sectors,
      descriptor: l.descriptor,
      crc: crcs[k],
      chunks: chunks[k],
      largestChunk: settings.chunkSectors,
    }),
  }));
  // The master checksum: the CRC-32 of every table's checksum.
  const sums = new Uint8Array(4 * layout.length);
  crcs.forEach((crc, k) => new DataView(sums.buffer).setUint32(4 * k, crc));
  const xml = new TextEncoder().encode(plistText(tables));
  await sink.write(at, xml);
  const segmentId = crypto.getRandomValues(new Uint8Array(16));
  await sink.write(
    at + xml.length,
    kolyBytes({
      dataForkLength: at,
      xmlOffset: at,
      xmlLength: xml.length,
      dataForkCrc: forkCrc,
      masterCrc: crc32(sums),
      sectorCount: sectors,
      segmentId,
    }),
  );
}

/** True when `head` starts with the "encrcdsa" magic of an encrypted image. */
/**
 * The signature of an encrypted image (FileVault's): `encrcdsa` at the
 * head (header version 2) or `cdsaencr` in the last 8 bytes (version 1).
 */
function encryptedSignature(
  head: Uint8Array,
  tail: Uint8Array,
): "encrcdsa" | "cdsaencr" | undefined {
  if (head.length >= 8 && ascii(head, 0, 8) === "encrcdsa") return "encrcdsa";
  if (tail.length >= 8 && ascii(tail, tail.length - 8) === "cdsaencr") {
    return "cdsaencr";
  }
  return undefined;
}

/**
 * The dmg driver: opens UDIF images (XML plist or resource-fork block
 * tables; zero-fill, raw, ignore, ADC, zlib, bzip2, LZFSE and LZMA chunks),
 * probed by the `koly` trailer whatever the file is called, and writes them
 * with `convert -O dmg`.
 *
 * Reading verifies the checksums as chunks are decoded, in any order: a
 * partition's CRC-32 once all its chunks have been decoded, the data
 * fork's once all of it has been read; a full convert checks them all, a
 * random read only what it completes. A mismatch is a
 * {@linkcode ChecksumError} naming the partition. Open with
 * `options: { verify: "off" }` to skip it.
 *
 * Writing options (`-o`): `compression` (`zlib`, the default UDZO, or
 * `raw`, `bzip2`, `lzfse`, `lzma`, `adc`), `chunk_sectors` (default 2048,
 * hdiutil's 1 MiB chunks) and `partitions` (`mbr`, the default: a disk
 * with a simple MBR gets a table for the MBR, each partition and each gap,
 * as hdiutil writes one; `whole`: one table for the disk). All-zero chunks
 * are zero-fill chunks; chunks that do not shrink are stored raw.
 *
 * @example
 * ```ts
 * import { dmg, fromBytes, memorySink } from "../mod.ts";
 * const disk = new Uint8Array(1 << 20).fill(7, 0, 1000);
 * const sink = memorySink();
 * await dmg.encode!(fromBytes(disk), sink, {});
 * const image = await dmg.open(fromBytes(sink.bytes()), {});
 * console.log(image.size, (await image.read(999, 2)).join(",")); // 1048576 7,0
 * ```
 */
export const dmg: Driver = {
  name: FORMAT,
  writeOptions: [
    {
      name: "compression",
      help: "chunk codec",
      values: ["raw", "zlib", "bzip2", "lzfse", "lzma", "xz", "adc"],
      default: "zlib",
    },
    {
      name: "chunk_sectors",
      help: "sectors per chunk",
      accepts: "1 to 131072 (64 MiB)",
      default: "2048",
    },
    {
      name: "partitions",
      help: "one table per MBR partition, or one for the whole disk",
      values: ["mbr", "whole"],
      default: "mbr",
    },
  ],
  compresses: true,
  description:
    "Apple UDIF disk image (dmg): raw, zlib, bzip2, ADC, LZFSE and LZMA chunks",
  probe: probeDmg,
  async open(source: Source, options: OpenOptions = {}): Promise<Image> {
    const ends = Math.min(8, source.size);
    const encrypted = encryptedSignature(
      await source.read(0, ends),
      await source.read(source.size - ends, ends),
    );
    if (encrypted) {
      throw new UnsupportedError(
        {
          format: FORMAT,
          field: "signature",
          value: encrypted,
          offset: encrypted === "encrcdsa" ? 0 : source.size - 8,
          file: source.name,
        },
        `an encrypted dmg (${encrypted}): open it as dmg-encrypted, with its password`,
      );
    }
    const tables = await readTables(source);
    let diskSectors = tables.koly.sectorCount;
    if (diskSectors === 0) {
      // Old images may leave SectorCount 0: the partitions tell the size.
      for (const p of tables.partitions) {
        diskSectors = Math.max(
          diskSectors,
          p.mish.firstSector + p.mish.sectorCount,
        );
      }
    }
    if (tables.koly.segmentCount <= 1) {
      return dmgImage(source, tables, diskSectors, options);
    }
    // A segmented image: the chunks are read from the data of all segments.
    const { data, segments } = await joinSegments(source, tables.koly, options);
    try {
      const image = dmgImage(data, tables, diskSectors, options, data.size);
      (image.details as Record<string, unknown>).segments = segments.map((
        s,
      ) => ({
        file: s.name,
        segment: s.koly.segmentNumber,
        data_fork_bytes: s.koly.dataForkLength,
      }));
      return image;
    } catch (e) {
      for (const s of segments.slice(1)) await s.source.close?.();
      throw e;
    }
  },
  encode,
};
