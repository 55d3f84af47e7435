/**
 * qcow: QEMU's first copy-on-write format (version 1), read and written,
 * with compressed clusters and AES encryption (through `decrypt`).
 *
 * This module is browser compatible.
 *
 * Header (48 bytes, every field big-endian):
 *
 * | offset | size | field                                               |
 * | -----: | ---: | --------------------------------------------------- |
 * |      0 |    4 | magic `QFI\xfb`                                     |
 * |      4 |    4 | version (1)                                         |
 * |      8 |    8 | backing_file_offset (0: none)                       |
 * |     16 |    4 | backing_file_size (at most 1023)                    |
 * |     20 |    4 | mtime                                               |
 * |     24 |    8 | size: virtual size in bytes (read as whole sectors) |
 * |     32 |    1 | cluster_bits (9 to 16)                              |
 * |     33 |    1 | l2_bits: entries per L2 table (6 to 13)             |
 * |     34 |    2 | padding                                             |
 * |     36 |    4 | crypt_method: 0 none, 1 AES                         |
 * |     40 |    8 | l1_table_offset                                     |
 *
 * The L1 table holds ceil(size / 2^(cluster_bits + l2_bits)) 64-bit
 * entries: the file offset of an L2 table, or 0. An L2 table holds
 * 2^l2_bits entries: the file offset of a cluster, or 0 (unallocated: the
 * backing file's bytes, or zeros). An entry with its top bit set is a
 * compressed cluster: raw deflate (window 4 KiB), its byte offset in the
 * low 63 - cluster_bits bits and its compressed size in the cluster_bits
 * bits above them. Plain clusters of an AES image are AES-128-CBC per
 * 512-byte sector with the sector number as IV; compressed ones are not
 * encrypted. There are no zero clusters and no refcounts.
 *
 * @module
 */

import { probeQcow, QCOW_MAGIC as MAGIC } from "./_signatures.ts";
import { checkWriteOptions } from "../streams/options.ts";
import {
  alignUp,
  concat,
  formatErrors,
  isZero,
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
  decode as inflate,
  decodeInto as inflateInto,
  encode as deflate,
} from "./codecs/zlib.ts";
import {
  CLUSTER_DEFLATE,
  decodeMany,
  holdPool,
  poolWorthIt,
  readSpan,
  type Span,
} from "./codecs/_clusters.ts";
import {
  BackingFileError,
  check,
  CodecError,
  KeyError,
  UnsupportedError,
} from "../streams/errors.ts";
import { cipherFor, decrypt } from "../streams/decrypt.ts";
import type {
  CreateSpec,
  Driver,
  EncodeOptions,
  Extent,
  ExtentKind,
  Image,
  OpenOptions,
  SectorCipher,
  Sink,
  Source,
} from "../streams/types.ts";
import {
  checkRange,
  extentsOf,
  readInto as readIntoSource,
} from "../streams/types.ts";

const FORMAT = "qcow";
const HEADER_SIZE = 48;
const SECTOR = 512;
const CRYPT_NONE = 0;
const CRYPT_AES = 1;
/** QEMU's limits on the header. */
const MIN_CLUSTER_BITS = 9;
const MAX_CLUSTER_BITS = 16;
const MIN_L2_BITS = 6;
const MAX_L2_BITS = 13;
const MAX_BACKING_NAME = 1023;
/** QEMU refuses an L1 table of more than INT_MAX bytes. */
const MAX_L1_ENTRIES = Math.floor(0x7fffffff / 8);
/** L2 tables kept in memory (at most 64 KiB each). */
const L2_CACHE = 64;
/** Compressed clusters closer than this in the file are read in one go. */
const READ_GAP = 64 << 10;

/** The parsed header. */
interface Header {
  backingFileOffset: number;
  backingFileSize: number;
  mtime: number;
  /** The size field as stored. */
  storedSize: number;
  clusterBits: number;
  l2Bits: number;
  cryptMethod: number;
  l1TableOffset: number;
  l1Size: number;
}

const fail = formatErrors(FORMAT);

/** Parses and validates the header against a file of `fileSize` bytes. */
function parseHeader(b: Uint8Array, fileSize: number): Header {
  check(b.length >= HEADER_SIZE, {
    format: FORMAT,
    field: "file size",
    value: fileSize,
    limit: `at least ${HEADER_SIZE} bytes (the header)`,
  });
  const v = new DataView(b.buffer, b.byteOffset, b.length);
  const magic = v.getUint32(0);
  check(magic === MAGIC, {
    format: FORMAT,
    field: "magic",
    value: `0x${magic.toString(16)}`,
    limit: "0x514649fb (QFI\\xfb)",
    offset: 0,
  });
  const version = v.getUint32(4);
  if (version !== 1) {
    if (version === 2 || version === 3) {
      throw new UnsupportedError(
        { format: FORMAT, field: "version", value: version, offset: 4 },
        `version ${version} is qcow2, not qcow (version 1)`,
      );
    }
    throw fail("version", version, "1", 4);
  }
  const size = v.getBigUint64(24);
  if (size <= 1n) {
    throw fail("size", size, "at least 2 bytes (QEMU's limit)", 24);
  }
  const storedSize = safeNumber(size, FORMAT, "size", 24);
  const clusterBits = b[32];
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw fail(
      "cluster_bits",
      clusterBits,
      `from ${MIN_CLUSTER_BITS} to ${MAX_CLUSTER_BITS} (clusters of 512 bytes to 64 KiB)`,
      32,
    );
  }
  const l2Bits = b[33];
  if (l2Bits < MIN_L2_BITS || l2Bits > MAX_L2_BITS) {
    throw fail(
      "l2_bits",
      l2Bits,
      `from ${MIN_L2_BITS} to ${MAX_L2_BITS} (L2 tables of 512 bytes to 64 KiB)`,
      33,
    );
  }
  const cryptMethod = v.getUint32(36);
  if (cryptMethod !== CRYPT_NONE && cryptMethod !== CRYPT_AES) {
    throw fail("crypt_method", cryptMethod, "0 (none) or 1 (AES)", 36);
  }
  const span = 2 ** (clusterBits + l2Bits);
  const l1Size = Math.ceil(storedSize / span);
  if (l1Size > MAX_L1_ENTRIES) {
    throw fail(
      "size",
      storedSize,
      `small enough for an L1 table of at most ${MAX_L1_ENTRIES} entries (QEMU's limit)`,
      24,
    );
  }
  const l1TableOffset = safeNumber(
    v.getBigUint64(40),
    FORMAT,
    "l1_table_offset",
    40,
  );
  if (
    l1TableOffset < HEADER_SIZE || l1TableOffset + l1Size * 8 > fileSize
  ) {
    throw fail(
      "l1_table_offset",
      l1TableOffset,
      `past the header and within the file's ${fileSize} bytes with its ${
        l1Size * 8
      }-byte L1 table (size ${storedSize})`,
      40,
    );
  }
  const backingFileOffset = safeNumber(
    v.getBigUint64(8),
    FORMAT,
    "backing_file_offset",
    8,
  );
  const backingFileSize = v.getUint32(16);
  if (backingFileOffset !== 0) {
    if (backingFileSize > MAX_BACKING_NAME) {
      throw fail(
        "backing_file_size",
        backingFileSize,
        `at most ${MAX_BACKING_NAME} bytes`,
        16,
      );
    }
    if (backingFileOffset + backingFileSize > fileSize) {
      throw fail(
        "backing_file_offset",
        backingFileOffset,
        `within the file's ${fileSize} bytes with its ${backingFileSize}-byte name`,
        8,
      );
    }
  }
  return {
    backingFileOffset,
    backingFileSize,
    mtime: v.getUint32(20),
    storedSize,
    clusterBits,
    l2Bits,
    cryptMethod,
    l1TableOffset,
    l1Size,
  };
}

/** One L2 entry, decoded. */
type Cluster =
  | { kind: "unallocated" }
  | { kind: "plain"; offset: number }
  | { kind: "compressed"; offset: number; size: number };

const UNALLOCATED: Cluster = { kind: "unallocated" };

/**
 * What an opened qcow shares between its locked and unlocked views, the
 * queue of writes included (allocation must not interleave).
 */
interface State extends WriteQueue {
  source: Source;
  header: Header;
  /** Virtual size: whole sectors of the size field, as QEMU reads it. */
  size: number;
  clusterSize: number;
  l2Entries: number;
  l1: number[];
  /** L2 tables by file offset (least recently used first). */
  l2Cache: Map<number, Uint8Array>;
  backingFile?: string;
  details: Record<string, unknown>;
  sink?: Sink;
  /** Where the next cluster or L2 table goes. */
  nextFree: number;
  /** The last inflated cluster, for small reads inside it. */
  inflated?: { offset: number; bytes: Uint8Array };
  /** Lets go of the decode workers, held since the first read that used them. */
  letGoOfPool?: () => void;
}

async function l2Table(state: State, l1Index: number): Promise<Uint8Array> {
  const at = state.l1[l1Index];
  const hit = state.l2Cache.get(at);
  if (hit) {
    state.l2Cache.delete(at);
    state.l2Cache.set(at, hit);
    return hit;
  }
  const table = await state.source.read(at, state.l2Entries * 8);
  state.l2Cache.set(at, table);
  if (state.l2Cache.size > L2_CACHE) {
    state.l2Cache.delete(state.l2Cache.keys().next().value!);
  }
  return table;
}

/** Decodes entry `index` of an L2 table (read from the file at `tableAt`). */
function decodeEntry(
  state: State,
  table: Uint8Array,
  index: number,
  tableAt: number,
): Cluster {
  const v = new DataView(table.buffer, table.byteOffset, table.length);
  const high = v.getUint32(index * 8);
  const low = v.getUint32(index * 8 + 4);
  if (high === 0 && low === 0) return UNALLOCATED;
  const fileSize = state.source.size;
  const cb = state.header.clusterBits;
  if (high & 0x80000000) {
    // Offset: bits 0 .. 62 - cluster_bits; size: the cluster_bits above.
    const entry = (BigInt(high) << 32n) | BigInt(low);
    const offsetBits = BigInt(63 - cb);
    const offset = Number(entry & ((1n << offsetBits) - 1n));
    const size = Number((entry >> offsetBits) & BigInt(state.clusterSize - 1));
    if (size === 0 || offset + size > fileSize) {
      throw fail(
        `l2[${index}]`,
        entry,
        `a compressed cluster (${size} bytes at ${offset}) within the file's ${fileSize} bytes`,
        tableAt + index * 8,
      );
    }
    return { kind: "compressed", offset, size };
  }
  const offset = high * 2 ** 32 + low;
  if (offset % SECTOR !== 0 || offset + state.clusterSize > fileSize) {
    throw fail(
      `l2[${index}]`,
      offset,
      `a cluster offset, a multiple of 512, with its ${state.clusterSize} bytes within the file's ${fileSize} bytes`,
      tableAt + index * 8,
    );
  }
  return { kind: "plain", offset };
}

/** The cluster holding virtual offset `offset`. */
async function clusterAt(state: State, offset: number): Promise<Cluster> {
  const { clusterBits, l2Bits } = state.header;
  const l1Index = Math.floor(offset / 2 ** (clusterBits + l2Bits));
  if (state.l1[l1Index] === 0) return UNALLOCATED;
  const table = await l2Table(state, l1Index);
  const index = Math.floor(offset / state.clusterSize) % state.l2Entries;
  return decodeEntry(state, table, index, state.l1[l1Index]);
}

async function inflateCluster(
  state: State,
  cluster: { offset: number; size: number },
  compressed?: Uint8Array,
): Promise<Uint8Array> {
  if (state.inflated?.offset === cluster.offset) return state.inflated.bytes;
  const input = compressed ??
    await state.source.read(cluster.offset, cluster.size);
  const bytes = await inflated(
    state,
    cluster,
    () => inflate(input, state.clusterSize, "deflate-raw"),
  );
  state.inflated = { offset: cluster.offset, bytes };
  return bytes;
}

/** Runs `decode` for the compressed `cluster`, naming it in its errors. */
async function inflated<T>(
  state: State,
  cluster: { offset: number; size: number },
  decode: () => Promise<T>,
): Promise<T> {
  try {
    return await decode();
  } catch (e) {
    if (!(e instanceof CodecError)) throw e;
    throw clusterError(state, cluster, e.message);
  }
}

/** The typed error for a compressed cluster that did not inflate (`message`: the codec's). */
function clusterError(
  state: State,
  cluster: { offset: number; size: number },
  message: string,
): Error {
  return fail(
    "compressed cluster",
    cluster.offset,
    `raw deflate of ${cluster.size} bytes inflating to exactly ${state.clusterSize} bytes (${message})`,
    cluster.offset,
  );
}

/**
 * Inflates the whole compressed clusters `pieces` of one read (at disk
 * offset `offset`, into `out`) on the decode workers, a few hundred
 * kibibytes of packed bytes per message (see codecs/_clusters.ts).
 */
async function inflateOnWorkers(
  state: State,
  pieces: { at: number; length: number; cluster: Cluster }[],
  offset: number,
  out: Uint8Array,
  span?: Span,
) {
  state.letGoOfPool ??= holdPool();
  await decodeMany(
    {
      kind: CLUSTER_DEFLATE,
      clusterSize: state.clusterSize,
      readInto: span?.readInto ??
        ((at, into) => readIntoSource(state.source, at, into)),
      bytes: span?.bytes,
      error: (c, message) => clusterError(state, c, message),
    },
    pieces.map((p) => {
      const c = p.cluster as { offset: number; size: number };
      return {
        offset: c.offset,
        size: c.size,
        target: out.subarray(p.at - offset, p.at - offset + p.length),
      };
    }),
  );
}

function keyError(state: State): KeyError {
  const what = `${state.source.name ?? "the qcow image"} is encrypted`;
  return new KeyError(
    `${what}: give its passphrase (open it with { key })`,
    `${what}: give its passphrase with --key-file FILE`,
  );
}

/** The image over `state`: locked when encrypted and `cipher` is absent. */
function qcowImage(state: State, cipher?: SectorCipher): Image {
  const { clusterSize } = state;
  const span = clusterSize * state.l2Entries;
  const encrypted = state.header.cryptMethod === CRYPT_AES;
  const locked = encrypted && !cipher;

  async function* extents(
    offset: number,
    length: number,
  ): AsyncIterable<Extent> {
    checkRange(state.size, offset, length);
    const end = offset + length;
    let run: Extent | undefined;
    for (let at = offset; at < end;) {
      const l1Index = Math.floor(at / span);
      let kind: ExtentKind;
      let stop: number;
      if (state.l1[l1Index] === 0) {
        kind = "unallocated";
        stop = Math.min(end, (l1Index + 1) * span);
      } else {
        kind = (await clusterAt(state, at)).kind === "unallocated"
          ? "unallocated"
          : "data";
        stop = Math.min(end, (Math.floor(at / clusterSize) + 1) * clusterSize);
      }
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

  type Piece = { at: number; length: number; cluster: Cluster };

  /** The clusters of `[offset, offset + length)`, one piece per cluster. */
  async function piecesOf(offset: number, length: number): Promise<Piece[]> {
    const end = offset + length;
    const pieces: Piece[] = [];
    for (let at = offset; at < end;) {
      const stop = Math.min(
        end,
        (Math.floor(at / clusterSize) + 1) * clusterSize,
      );
      const l1Index = Math.floor(at / span);
      const cluster = state.l1[l1Index] === 0
        ? UNALLOCATED
        : await clusterAt(state, at);
      pieces.push({ at, length: stop - at, cluster });
      at = stop;
    }
    if (locked && pieces.some((p) => p.cluster.kind === "plain")) {
      throw keyError(state);
    }
    return pieces;
  }

  const fileAt = (p: Piece) =>
    (p.cluster as { offset: number }).offset + p.at % clusterSize;

  /** True when `pieces` are plain clusters laid out in order in the file. */
  const contiguous = (pieces: Piece[]) =>
    pieces.length > 0 &&
    pieces.every((p, i) =>
      p.cluster.kind === "plain" &&
      (i === 0 || fileAt(p) === fileAt(pieces[i - 1]) + pieces[i - 1].length)
    );

  /** Reads whole sectors (when encrypted) or any range. */
  async function readRange(
    offset: number,
    length: number,
  ): Promise<Uint8Array> {
    const pieces = await piecesOf(offset, length);
    // The common case of convert: one run of plain clusters laid out in
    // order in the file is one read, returned as it is.
    if (contiguous(pieces)) {
      const bytes = await state.source.read(fileAt(pieces[0]), length);
      if (cipher) await cipher.decrypt(offset / SECTOR, bytes);
      return bytes;
    }
    const out = new Uint8Array(length);
    await piecesInto(pieces, offset, out);
    return out;
  }

  /**
   * Reads `pieces` (from `offset` on) into `out`, every byte of it
   * (unallocated runs as zeros: `out` may be a reused buffer). Whole
   * compressed clusters inflate straight into `out`.
   */
  async function piecesInto(pieces: Piece[], offset: number, out: Uint8Array) {
    if (contiguous(pieces)) {
      await readIntoSource(state.source, fileAt(pieces[0]), out);
      if (cipher) await cipher.decrypt(offset / SECTOR, out);
      return;
    }
    // The file span of every cluster wanted, in one read when they lie
    // close together: over HTTP, one range request instead of one per
    // run of plain clusters and per group of compressed ones.
    const span = await readSpan(
      (at, into) => readIntoSource(state.source, at, into),
      pieces.flatMap((p): [number, number][] =>
        p.cluster.kind === "plain"
          ? [[fileAt(p), fileAt(p) + p.length]]
          : p.cluster.kind === "compressed"
          ? [[p.cluster.offset, p.cluster.offset + p.cluster.size]]
          : []
      ),
      clusterSize,
    );
    try {
      await readPieces(pieces, offset, out, span);
    } finally {
      span?.done();
    }
  }

  /** {@linkcode piecesInto}'s work, the file's bytes read through `span` where it has them. */
  async function readPieces(
    pieces: Piece[],
    offset: number,
    out: Uint8Array,
    span?: Span,
  ) {
    const readFile = span?.readInto ??
      ((at: number, into: Uint8Array) =>
        readIntoSource(state.source, at, into));
    const pending: Promise<void>[] = [];
    // Many whole compressed clusters: inflated on the workers, the rest here.
    const whole = (p: Piece) =>
      p.cluster.kind === "compressed" && p.length === clusterSize;
    const wholeCount = pieces.reduce((n, p) => n + (whole(p) ? 1 : 0), 0);
    if (poolWorthIt(wholeCount, CLUSTER_DEFLATE, clusterSize)) {
      pending.push(
        inflateOnWorkers(state, pieces.filter(whole), offset, out, span),
      );
      pieces = pieces.filter((p) => !whole(p));
    }
    for (let i = 0; i < pieces.length;) {
      const p = pieces[i];
      if (p.cluster.kind === "unallocated") {
        if (state.backingFile !== undefined) {
          throw new BackingFileError(
            `qcow: bytes ${p.at}..${
              p.at + p.length
            } of this image are in its backing file ${
              JSON.stringify(state.backingFile)
            }, which was not opened: open it through the registry with resolveBacking`,
            state.backingFile,
          );
        }
        out.fill(0, p.at - offset, p.at - offset + p.length);
        i++;
        continue;
      }
      if (p.cluster.kind === "plain") {
        let j = i + 1;
        while (
          j < pieces.length && pieces[j].cluster.kind === "plain" &&
          fileAt(pieces[j]) === fileAt(pieces[j - 1]) + pieces[j - 1].length
        ) j++;
        const first = p.at;
        const total = pieces[j - 1].at + pieces[j - 1].length - first;
        const into = out.subarray(first - offset, first - offset + total);
        pending.push(
          readFile(fileAt(p), into).then(async () => {
            if (cipher) await cipher.decrypt(first / SECTOR, into);
          }),
        );
        i = j;
        continue;
      }
      // Compressed clusters near each other in the file: one read.
      let j = i + 1;
      const from = p.cluster.offset;
      let to = p.cluster.offset + p.cluster.size;
      while (j < pieces.length && pieces[j].cluster.kind === "compressed") {
        const c = pieces[j].cluster as { offset: number; size: number };
        if (c.offset < to || c.offset - to > READ_GAP) break;
        to = c.offset + c.size;
        j++;
      }
      const group = pieces.slice(i, j);
      const groupTo = to; // `to` is not touched again; a const for the closure
      pending.push((async () => {
        const single = group.length === 1 &&
          state.inflated?.offset === from;
        const raw = single ? undefined : span?.bytes(from, groupTo - from) ??
          await state.source.read(from, groupTo - from);
        for (const g of group) {
          const c = g.cluster as { offset: number; size: number };
          const packed = raw?.subarray(
            c.offset - from,
            c.offset - from + c.size,
          );
          const target = out.subarray(g.at - offset, g.at - offset + g.length);
          if (packed && g.length === clusterSize) {
            // No array per cluster (see zlib's decodeInto).
            await inflated(
              state,
              c,
              () => inflateInto(packed, target, "deflate-raw"),
            );
          } else {
            const bytes = await inflateCluster(state, c, packed);
            const within = g.at % clusterSize;
            target.set(bytes.subarray(within, within + g.length));
          }
        }
      })());
      i = j;
    }
    // All settle before a failure is reported: none writes into `out`
    // (a buffer the caller may reuse) after this read has failed.
    const settled = await Promise.allSettled(pending);
    for (const p of settled) if (p.status === "rejected") throw p.reason;
  }

  // Convert's path: into a reused buffer; unaligned reads of an encrypted
  // image go through `read`, which decrypts whole sectors.
  async function readInto(offset: number, into: Uint8Array): Promise<void> {
    checkRange(state.size, offset, into.length);
    if (cipher && (offset % SECTOR !== 0 || into.length % SECTOR !== 0)) {
      into.set(await read(offset, into.length));
      return;
    }
    await piecesInto(await piecesOf(offset, into.length), offset, into);
  }

  async function read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(state.size, offset, length);
    if (length === 0) return new Uint8Array(0);
    if (cipher && (offset % SECTOR !== 0 || length % SECTOR !== 0)) {
      // Decryption works on whole sectors.
      const start = offset - offset % SECTOR;
      const stop = Math.min(state.size, alignUp(offset + length, SECTOR));
      const bytes = await readRange(start, stop - start);
      return bytes.slice(offset - start, offset - start + length);
    }
    return await readRange(offset, length);
  }

  const image: Image = {
    format: FORMAT,
    get size() {
      return state.size;
    },
    name: state.source.name,
    encrypted,
    encryption: locked
      ? { scheme: "qcow-aes", unlock: (c) => qcowImage(state, c) }
      : undefined,
    backingFile: state.backingFile,
    details: state.details,
    read,
    readInto,
    extents,
    close: () => {
      state.letGoOfPool?.();
      state.letGoOfPool = undefined;
      return state.source.close?.() ?? Promise.resolve();
    },
  };
  if (!state.sink) return image;
  const sink = state.sink;

  async function writeEntry(at: number, value: number | bigint) {
    const bytes = new Uint8Array(8);
    setBe64(bytes, 0, value);
    await sink.write(at, bytes);
  }

  /** The L2 table for `l1Index`, allocated (zeroed, linked from L1) if absent. */
  async function l2For(l1Index: number): Promise<Uint8Array> {
    if (state.l1[l1Index] !== 0) return await l2Table(state, l1Index);
    const at = state.nextFree;
    const table = new Uint8Array(state.l2Entries * 8);
    await sink.write(at, table);
    state.nextFree = alignUp(at + table.length, clusterSize);
    state.l1[l1Index] = at;
    await writeEntry(state.header.l1TableOffset + l1Index * 8, at);
    state.l2Cache.set(at, table);
    return table;
  }

  /** Writes `bytes` inside one cluster at virtual `offset`. */
  async function writeInCluster(offset: number, bytes: Uint8Array) {
    const l1Index = Math.floor(offset / span);
    const table = await l2For(l1Index);
    const tableAt = state.l1[l1Index];
    const index = Math.floor(offset / clusterSize) % state.l2Entries;
    const cluster = decodeEntry(state, table, index, tableAt);
    const clusterStart = offset - offset % clusterSize;
    const within = offset - clusterStart;
    if (cluster.kind === "plain") {
      if (!cipher) {
        await sink.write(cluster.offset + within, bytes);
        return;
      }
      // Whole sectors, merged with what is stored, encrypted.
      const from = within - within % SECTOR;
      const to = alignUp(within + bytes.length, SECTOR);
      const buffer = from === within && to === within + bytes.length
        ? bytes.slice()
        : await readRange(clusterStart + from, to - from);
      buffer.set(bytes, within - from);
      await cipher.encrypt((clusterStart + from) / SECTOR, buffer);
      await sink.write(cluster.offset + from, buffer);
      return;
    }
    // A new cluster: zeros (QEMU's choice too) or the inflated bytes of
    // the compressed cluster it replaces, with `bytes` over them.
    if (
      cluster.kind === "unallocated" && state.backingFile !== undefined &&
      bytes.length !== clusterSize
    ) {
      throw new UnsupportedError(
        { format: FORMAT },
        `a write of part of cluster ${
          clusterStart / clusterSize
        } would hide the rest of it in the backing file (qcow clusters are not copied from the backing file): write whole clusters of ${clusterSize} bytes`,
      );
    }
    const buffer = cluster.kind === "compressed"
      ? (await inflateCluster(state, cluster)).slice()
      : new Uint8Array(clusterSize);
    buffer.set(bytes, within);
    if (cipher) await cipher.encrypt(clusterStart / SECTOR, buffer);
    const at = state.nextFree;
    await sink.write(at, buffer);
    state.nextFree = at + clusterSize;
    setBe64(table, index * 8, at);
    await writeEntry(tableAt + index * 8, at);
  }

  async function doWrite(offset: number, bytes: Uint8Array) {
    checkRange(state.size, offset, bytes.length);
    if (locked) throw keyError(state);
    state.inflated = undefined;
    for (let at = offset; at < offset + bytes.length;) {
      const stop = Math.min(
        offset + bytes.length,
        (Math.floor(at / clusterSize) + 1) * clusterSize,
      );
      await writeInCluster(at, bytes.subarray(at - offset, stop - offset));
      at = stop;
    }
  }

  return Object.assign(image, serializedWrites(state, sink, doWrite));
}

async function openQcow(source: Source, options: OpenOptions): Promise<Image> {
  const sink = writeSink(options, FORMAT);
  const head = await source.read(0, Math.min(HEADER_SIZE, source.size));
  const header = parseHeader(head, source.size);
  const l1Bytes = await source.read(header.l1TableOffset, header.l1Size * 8);
  const view = new DataView(l1Bytes.buffer, l1Bytes.byteOffset, l1Bytes.length);
  const clusterSize = 2 ** header.clusterBits;
  const l2Entries = 2 ** header.l2Bits;
  const l1: number[] = new Array(header.l1Size);
  for (let i = 0; i < header.l1Size; i++) {
    const high = view.getUint32(i * 8);
    const entry = high * 2 ** 32 + view.getUint32(i * 8 + 4);
    if (
      entry !== 0 &&
      (high > 0x1fffff || entry + l2Entries * 8 > source.size)
    ) {
      throw fail(
        `l1[${i}]`,
        view.getBigUint64(i * 8),
        `an L2 table offset with its ${
          l2Entries * 8
        } bytes within the file's ${source.size} bytes`,
        header.l1TableOffset + i * 8,
      );
    }
    l1[i] = entry;
  }
  let backingFile: string | undefined;
  if (header.backingFileOffset !== 0) {
    backingFile = new TextDecoder().decode(
      await source.read(header.backingFileOffset, header.backingFileSize),
    );
  }
  const state: State = {
    source,
    header,
    size: Math.floor(header.storedSize / SECTOR) * SECTOR,
    clusterSize,
    l2Entries,
    l1,
    l2Cache: new Map(),
    backingFile,
    details: {
      clusterSize,
      l2Entries,
      encryption: header.cryptMethod === CRYPT_AES ? "aes" : "none",
      mtime: header.mtime,
    },
    sink,
    nextFree: alignUp(source.size, clusterSize),
    writing: Promise.resolve(),
  };
  return qcowImage(state);
}

/** Whether a create or encode asks for AES, and the passphrase. */
function wantsEncryption(
  options: Record<string, string> | undefined,
  key: string | Uint8Array | undefined,
): boolean {
  const flag = options?.encryption ?? options?.encrypt ?? "";
  const format = options?.["encrypt.format"];
  if (format !== undefined && format !== "aes") {
    throw fail("encrypt.format", format, '"aes" (the only qcow encryption)');
  }
  const on = flag === "on" || flag === "true" || format === "aes" ||
    (key !== undefined && flag !== "off");
  if (on && key === undefined) {
    throw new KeyError(
      "qcow: an encrypted image needs a passphrase (the key option)",
      "qcow: an encrypted image needs a passphrase (--key-file FILE)",
    );
  }
  return on;
}

/** The header, backing name and zeroed L1 of a new image. */
function newLayout(
  size: number,
  clusterBits: number,
  l2Bits: number,
  encrypted: boolean,
  backingFile?: string,
) {
  const name = backingFile === undefined
    ? new Uint8Array(0)
    : new TextEncoder().encode(backingFile);
  if (name.length > MAX_BACKING_NAME) {
    throw fail(
      "backing_file",
      backingFile,
      `at most ${MAX_BACKING_NAME} bytes long`,
    );
  }
  const l1Offset = alignUp(HEADER_SIZE + name.length, 8);
  const l1Size = Math.ceil(size / 2 ** (clusterBits + l2Bits));
  const l1Bytes = alignUp(l1Size * 8, SECTOR);
  const head = new Uint8Array(l1Offset + l1Bytes);
  setBe32(head, 0, MAGIC);
  setBe32(head, 4, 1);
  if (backingFile !== undefined) {
    setBe64(head, 8, HEADER_SIZE);
    setBe32(head, 16, name.length);
    head.set(name, HEADER_SIZE);
  }
  setBe64(head, 24, size);
  head[32] = clusterBits;
  head[33] = l2Bits;
  setBe32(head, 36, encrypted ? CRYPT_AES : CRYPT_NONE);
  setBe64(head, 40, l1Offset);
  return { head, l1Offset, l1Size };
}

function virtualSizeFor(requested: number): number {
  const size = alignUp(requested, SECTOR);
  if (size < SECTOR) {
    throw fail("size", requested, "at least 1 byte (one sector)");
  }
  return size;
}

/**
 * `measure` by the layout `encode` writes: the header and L1 table, then,
 * when fully allocated, every 4 KiB cluster with each group's L2 table
 * after it. An image's own required size is left to writing it.
 */
function measureQcow(
  subject: Source | number,
  options: Record<string, string> = {},
): Promise<{ required?: number; fullyAllocated: number }> {
  checkWriteOptions(qcow, options);
  const size = virtualSizeFor(
    typeof subject === "number" ? subject : subject.size,
  );
  const clusterSize = 4096;
  const l1Size = Math.ceil(size / (clusterSize * 512));
  const head = alignUp(HEADER_SIZE, 8) + alignUp(l1Size * 8, SECTOR);
  return Promise.resolve({
    required: typeof subject === "number" ? head : undefined,
    fullyAllocated: alignUp(head, clusterSize) +
      Math.ceil(size / clusterSize) * clusterSize + l1Size * clusterSize,
  });
}

async function createQcow(sink: Sink, spec: CreateSpec): Promise<Image> {
  requireRandomAccess(sink, FORMAT, "qcow images");
  const encrypted = wantsEncryption(spec.options, spec.key);
  const size = virtualSizeFor(spec.size);
  // QEMU's choice: 512-byte clusters over a backing file (no partial
  // cluster ever hides backing bytes), 4 KiB clusters otherwise.
  const [clusterBits, l2Bits] = spec.backingFile !== undefined
    ? [9, 12]
    : [12, 9];
  const { head } = newLayout(
    size,
    clusterBits,
    l2Bits,
    encrypted,
    spec.backingFile,
  );
  await sink.write(0, head);
  await sink.flush();
  const source = readBackSource(sink, FORMAT, () => head.length);
  const image = await openQcow(source, { writable: true, sink });
  return encrypted ? decrypt(image, spec.key!) : image;
}

/**
 * Writes `source` as a qcow in one pass: clusters in disk order, each L2
 * table after its clusters, the L1 table last. All-zero clusters stay
 * unallocated; with `compress`, clusters that deflate smaller are stored
 * compressed (QEMU's `convert -c`).
 */
async function encodeQcow(
  source: Source,
  sink: Sink,
  options: EncodeOptions,
): Promise<void> {
  if (sink.sequential) {
    throw new UnsupportedError(
      { format: FORMAT },
      "qcow's L1 table is written last, at the start of the file: a sequential sink (a stream) cannot hold one",
    );
  }
  const encrypted = wantsEncryption(options.options, options.key);
  if (encrypted && options.compress) {
    throw new UnsupportedError(
      { format: FORMAT },
      "qcow stores compressed clusters unencrypted: choose compression or encryption",
    );
  }
  const cipher = encrypted ? cipherFor("qcow-aes", options.key!) : undefined;
  const size = virtualSizeFor(source.size);
  const clusterBits = 12;
  const l2Bits = 9;
  const clusterSize = 2 ** clusterBits;
  const l2Entries = 2 ** l2Bits;
  const span = clusterSize * l2Entries;
  const { head, l1Offset, l1Size } = newLayout(
    size,
    clusterBits,
    l2Bits,
    encrypted,
  );
  await sink.write(0, head);
  const l1 = new Uint8Array(l1Size * 8);
  let nextFree = alignUp(head.length, clusterSize);
  const offsetBits = BigInt(63 - clusterBits);
  for (let group = 0; group < l1Size; group++) {
    options.signal?.throwIfAborted();
    const start = group * span;
    const length = Math.min(span, source.size - start);
    let hasData = false;
    if (length > 0) {
      for await (const e of extentsOf(source, start, length)) {
        if (e.kind === "data") {
          hasData = true;
          break;
        }
      }
    }
    if (!hasData) {
      options.onProgress?.(Math.min(source.size, start + span));
      continue;
    }
    const data = await source.read(start, length);
    const table = new Uint8Array(l2Entries * 8);
    const parts: Uint8Array[] = [];
    const base = nextFree;
    let at = base;
    for (let i = 0; i * clusterSize < length; i++) {
      let cluster = data.subarray(i * clusterSize, (i + 1) * clusterSize);
      if (isZero(cluster)) continue;
      if (cluster.length < clusterSize) {
        const padded = new Uint8Array(clusterSize);
        padded.set(cluster);
        cluster = padded;
      }
      if (options.compress) {
        const packed = await deflate(cluster, "deflate-raw");
        if (packed.length < clusterSize) {
          const entry = (1n << 63n) | (BigInt(packed.length) << offsetBits) |
            BigInt(at);
          setBe64(table, i * 8, entry);
          parts.push(packed);
          at += packed.length;
          continue;
        }
      }
      const aligned = alignUp(at, SECTOR);
      if (aligned > at) parts.push(new Uint8Array(aligned - at));
      if (cipher) {
        cluster = cluster.slice();
        await cipher.encrypt((start + i * clusterSize) / SECTOR, cluster);
      }
      setBe64(table, i * 8, aligned);
      parts.push(cluster);
      at = aligned + clusterSize;
    }
    const tableAt = alignUp(at, SECTOR);
    if (tableAt > at) parts.push(new Uint8Array(tableAt - at));
    parts.push(table);
    await sink.write(base, concat(parts));
    setBe64(l1, group * 8, tableAt);
    nextFree = alignUp(tableAt + table.length, clusterSize);
    options.onProgress?.(Math.min(source.size, start + span));
  }
  await sink.write(l1Offset, l1);
  await sink.flush();
}

/**
 * Moves the L1 table (`l1Size` entries, grown to `newL1Size` with zeros)
 * to the end of the file, on a cluster boundary, and points the header at
 * it. The table is written before the header names it, so an interrupted
 * run leaves the old table in use.
 */
async function relocateL1(
  file: Source & Sink,
  header: Header,
  newL1Size: number,
  storedSize: number,
): Promise<number> {
  const table = new Uint8Array(newL1Size * 8);
  table.set(
    await file.read(
      header.l1TableOffset,
      Math.min(header.l1Size, newL1Size) * 8,
    ),
  );
  const at = alignUp(file.size, 2 ** header.clusterBits);
  await file.write(at, table);
  await file.flush();
  const fields = new Uint8Array(24);
  setBe64(fields, 0, storedSize);
  fields[8] = header.clusterBits;
  fields[9] = header.l2Bits;
  setBe32(fields, 12, header.cryptMethod);
  setBe64(fields, 16, at);
  await file.write(24, fields);
  await file.flush();
  return at;
}

/** The header of the qcow in `file`, validated. */
async function headerOf(file: Source): Promise<Header> {
  return parseHeader(
    await file.read(0, Math.min(HEADER_SIZE, file.size)),
    file.size,
  );
}

/**
 * `resize`: sets the size field. A larger L1 table stays in place when it
 * fits in the sectors the old one took, and moves to the end of the file
 * otherwise. Shrinking clears the L1 and L2 entries past the new end, so
 * that growing again reads zeros there (the clusters stay in the file).
 */
async function resizeQcow(file: Source & Sink, size: number): Promise<void> {
  const header = await headerOf(file);
  if (size % SECTOR !== 0 || size < SECTOR) {
    throw fail(
      "size",
      size,
      "a whole number of 512-byte sectors, at least one",
    );
  }
  const span = 2 ** (header.clusterBits + header.l2Bits);
  const newL1Size = Math.ceil(size / span);
  if (newL1Size > MAX_L1_ENTRIES) {
    throw fail("size", size, `at most ${MAX_L1_ENTRIES} L1 entries`);
  }
  if (size < header.storedSize) {
    // Entries past the end: whole L2 tables dropped from the L1, then the
    // last table's entries past the end.
    if (newL1Size < header.l1Size) {
      await file.write(
        header.l1TableOffset + newL1Size * 8,
        new Uint8Array((header.l1Size - newL1Size) * 8),
      );
    }
    const tail = size % span;
    if (tail !== 0) {
      const entry = await file.read(
        header.l1TableOffset + (newL1Size - 1) * 8,
        8,
      );
      const tableAt = Number(new DataView(entry.buffer).getBigUint64(0));
      if (tableAt !== 0) {
        const first = Math.ceil(tail / 2 ** header.clusterBits);
        const entries = 2 ** header.l2Bits;
        await file.write(
          tableAt + first * 8,
          new Uint8Array((entries - first) * 8),
        );
      }
    }
  }
  if (newL1Size * 8 > alignUp(header.l1Size * 8, SECTOR)) {
    await relocateL1(file, header, newL1Size, size);
    return;
  }
  if (newL1Size > header.l1Size) {
    await file.write(
      header.l1TableOffset + header.l1Size * 8,
      new Uint8Array((newL1Size - header.l1Size) * 8),
    );
  }
  const field = new Uint8Array(8);
  setBe64(field, 0, size);
  await file.write(24, field);
  await file.flush();
}

/**
 * `rebase -u`: records `name` as the backing file (or none). The name sits
 * between the header and the L1 table; when it does not fit there, the
 * L1 table moves to the end of the file first.
 */
async function setQcowBackingFile(
  file: Source & Sink,
  name: string | undefined,
): Promise<void> {
  const header = await headerOf(file);
  const fields = new Uint8Array(12);
  if (name !== undefined && name !== "") {
    const bytes = new TextEncoder().encode(name);
    if (bytes.length > MAX_BACKING_NAME) {
      throw fail(
        "backing_file",
        name,
        `at most ${MAX_BACKING_NAME} bytes long`,
      );
    }
    if (HEADER_SIZE + bytes.length > header.l1TableOffset) {
      // The L1 table's sectors are free once it moves; data starts past them.
      const room = alignUp(header.l1TableOffset + header.l1Size * 8, SECTOR) -
        HEADER_SIZE;
      if (bytes.length > room) {
        throw new UnsupportedError(
          { format: FORMAT, field: "backing_file", value: bytes.length },
          `a backing file name of ${bytes.length} bytes does not fit in the ${room} bytes before the first cluster`,
        );
      }
      await relocateL1(file, header, header.l1Size, header.storedSize);
    }
    await file.write(HEADER_SIZE, bytes);
    setBe64(fields, 0, HEADER_SIZE);
    setBe32(fields, 8, bytes.length);
  }
  await file.write(8, fields);
  await file.flush();
}

/**
 * The qcow driver: QEMU's qcow version 1. Reads plain and compressed
 * clusters, writes (allocating clusters and L2 tables at the end of the
 * file), creates (with a backing file name, and AES with a passphrase),
 * and encodes whole images (`convert -O qcow`, compressed with `-c`). An
 * AES image opens locked (`encryption` set, reads of its data fail with a
 * `KeyError`) until `decrypt(image, key)` or `open(source, { key })`.
 *
 * @example
 * ```ts
 * import { memorySink, open, qcow } from "../mod.ts";
 * const sink = memorySink();
 * const image = await qcow.create!(sink, { size: 1 << 20 });
 * await image.write!(4096, new Uint8Array(4096).fill(7));
 * await image.flush!();
 * const again = await open(sink.source());
 * console.log(again.format, (await again.read(4096, 1))[0]); // qcow 7
 * ```
 */
export const qcow: Driver = {
  name: FORMAT,
  writeOptions: [
    {
      name: "encryption",
      help: "AES-CBC encryption (the passphrase from --key-file)",
      values: ["on", "off", "true", "false"],
      default: "off",
    },
    {
      name: "encrypt",
      help: "the same as encryption",
      values: ["on", "off", "true", "false"],
    },
    {
      name: "encrypt.format",
      help: "the encryption (qemu-img's spelling)",
      values: ["aes"],
    },
  ],
  compresses: true,
  description: "QEMU qcow version 1 (compressed clusters, AES encryption)",
  probe: probeQcow,
  open: openQcow,
  create: createQcow,
  encode: encodeQcow,
  resize: resizeQcow,
  setBackingFile: setQcowBackingFile,
  measure: measureQcow,
};
