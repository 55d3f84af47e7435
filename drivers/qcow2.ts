/**
 * qcow2: QEMU's copy-on-write format, versions 2 (compat 0.10) and 3
 * (compat 1.1), read with everything qemu-img 7.2 writes: zero clusters,
 * extended L2 entries (subclusters), compressed clusters, backing files
 * with their format, external data files, internal snapshots, AES and
 * LUKS encryption (see `qcow2/luks.ts`).
 *
 * This module is browser compatible.
 *
 * The layout, from QEMU's `docs/interop/qcow2.txt` (every field
 * big-endian):
 *
 * | offset | size | field                                                |
 * | -----: | ---: | ---------------------------------------------------- |
 * |      0 |    4 | magic `QFI\xfb`                                      |
 * |      4 |    4 | version (2 or 3)                                     |
 * |      8 |    8 | backing_file_offset (0: none)                        |
 * |     16 |    4 | backing_file_size (at most 1023)                     |
 * |     20 |    4 | cluster_bits (9 to 21: 512 B to 2 MiB)               |
 * |     24 |    8 | size: virtual size in bytes                          |
 * |     32 |    4 | crypt_method: 0 none, 1 AES, 2 LUKS                  |
 * |     36 |    4 | l1_size: entries of the active L1 table              |
 * |     40 |    8 | l1_table_offset (cluster aligned)                    |
 * |     48 |    8 | refcount_table_offset (cluster aligned)              |
 * |     56 |    4 | refcount_table_clusters                              |
 * |     60 |    4 | nb_snapshots                                         |
 * |     64 |    8 | snapshots_offset (cluster aligned)                   |
 * |     72 |    8 | incompatible_features (version 3 on)                 |
 * |     80 |    8 | compatible_features (bit 0: lazy refcounts)          |
 * |     88 |    8 | autoclear_features (bit 0 bitmaps, bit 1 raw data)   |
 * |     96 |    4 | refcount_order (refcount_bits = 1 << order, 0 to 6)  |
 * |    100 |    4 | header_length (104 or more, a multiple of 8)         |
 * |    104 |    1 | compression_type: 0 zlib, 1 zstd                     |
 *
 * Incompatible features: bit 0 dirty, 1 corrupt, 2 external data file,
 * 3 compression type, 4 extended L2 entries. Header extensions follow the
 * header (type, length, data padded to 8 bytes) up to the end of the first
 * cluster or the backing file name: backing format (0xe2792aca), feature
 * name table (0x6803f857), bitmaps (0x23852875), full-disk encryption
 * header (0x0537be77), external data file name (0x44415441).
 *
 * L1 entries: bits 9-55 the offset of an L2 table (0: unallocated), bit
 * 63 "copied" (refcount 1). L2 entries (64 bits, or 128 with extended L2:
 * the entry then a bitmap, 32 "allocated" bits and 32 "reads as zero"
 * bits, one per subcluster): bit 62 compressed, bit 63 copied. A standard
 * entry has bit 0 "reads as zero" (version 3 without extended L2) and the
 * cluster's offset in bits 9-55. A compressed one, with x = 62 -
 * (cluster_bits - 8), has its byte offset in bits 0 to x-1 and the number
 * of 512-byte sectors past the first in bits x to 61.
 *
 * @module
 */

import { probeQcow2, QCOW_MAGIC as MAGIC } from "./_signatures.ts";
import { formatErrors, safeNumber } from "./_binary.ts";
import {
  BackingFileError,
  CodecError,
  ImageFormatError,
  KeyError,
  UnsupportedError,
} from "../streams/errors.ts";
import {
  CLUSTER_DEFLATE,
  CLUSTER_ZSTD,
  decodeCluster,
  decodeMany,
  holdPool,
  type PackedCluster,
  poolWorthIt,
  readSpan,
  type Span,
} from "./codecs/_clusters.ts";
import { QCOW2_OPTIONS } from "./qcow2/_options.ts";
import { writeSink } from "./_image.ts";
import type {
  Driver,
  Extent,
  Image,
  OpenOptions,
  SectorCipher,
  Source,
} from "../streams/types.ts";
import {
  checkRange,
  mapLooksIntoFile,
  readInto as readIntoSource,
  storesDataIn,
} from "../streams/types.ts";

/** The driver's name. */
export const FORMAT = "qcow2";
const V2_HEADER = 72;
const V3_HEADER = 104;
const SECTOR = 512;
/** QEMU's limits: clusters of 512 B to 2 MiB. */
export const MIN_CLUSTER_BITS = 9;
/** The largest cluster QEMU opens (2 MiB). */
export const MAX_CLUSTER_BITS = 21;
/** QEMU's limit on the active L1 table (QCOW_MAX_L1_SIZE). */
const MAX_L1_BYTES = 32 << 20;
/** QEMU's limit on the refcount table (QCOW_MAX_REFTABLE_SIZE). */
const MAX_REFCOUNT_TABLE_BYTES = 8 << 20;
/** QEMU's limits on the snapshot table. */
const MAX_SNAPSHOTS = 65536;
const MAX_SNAPSHOT_EXTRA = 1024;
const MAX_BACKING_NAME = 1023;
/** L2 tables kept in memory, in bytes of tables. */
const L2_CACHE_BYTES = 16 << 20;
/** Compressed clusters closer than this in the file are read in one go. */
const READ_GAP = 64 << 10;

/** Header extension types. */
export const EXT = {
  end: 0,
  backingFormat: 0xe2792aca,
  featureTable: 0x6803f857,
  bitmaps: 0x23852875,
  crypto: 0x0537be77,
  dataFile: 0x44415441,
} as const;

/** Incompatible feature bits. */
export const INCOMPAT = {
  dirty: 1n,
  corrupt: 2n,
  dataFile: 4n,
  compressionType: 8n,
  extendedL2: 16n,
} as const;
const KNOWN_INCOMPAT = 0x1fn;
/** Compatible feature bit 0. */
export const COMPAT_LAZY_REFCOUNTS = 1n;
/** Autoclear feature bits. */
export const AUTOCLEAR = { bitmaps: 1n, dataFileRaw: 2n } as const;

/** crypt_method values. */
export const CRYPT = { none: 0, aes: 1, luks: 2 } as const;
/** compression_type values and their names. */
export const COMPRESSION_TYPES = ["zlib", "zstd"] as const;

const INCOMPAT_NAMES = [
  "dirty bit",
  "corrupt bit",
  "external data file",
  "compression type",
  "extended L2 entries",
];

const fail = formatErrors(FORMAT);

/** The parsed header and its extensions. */
export interface Header {
  version: number;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Header extensions. */
  backingFormat?: string;
  dataFile?: string;
  crypto?: { offset: number; length: number };
  bitmaps?: { count: number; directorySize: number; directoryOffset: number };
  /** Feature names by `type:bit` (type 0 incompatible, 1 compatible, 2 autoclear). */
  featureNames: Map<string, string>;
}

/** The bytes {@linkcode parseHeader} needs: the first cluster, or the file if shorter. */
export function headBytes(clusterBits: number, fileSize: number): number {
  return Math.min(2 ** clusterBits, fileSize);
}

/**
 * Parses and validates a qcow2 header and its extensions. `b` holds the
 * start of the file: at least the first cluster when the file has one.
 *
 * @param b the head of the file
 * @param fileSize the file's size in bytes
 * @returns the header
 * @throws {ImageFormatError} naming the first field that is wrong
 * @throws {UnsupportedError} for incompatible features this driver lacks
 *
 * @example
 * ```ts
 * import { parseHeader } from "./qcow2.ts";
 * try {
 *   parseHeader(new Uint8Array(72), 72);
 * } catch (e) {
 *   console.log((e as Error).message.startsWith("qcow2: magic")); // true
 * }
 * ```
 */
export function parseHeader(b: Uint8Array, fileSize: number): Header {
  if (b.length < V2_HEADER) {
    throw fail(
      "file size",
      fileSize,
      `at least ${V2_HEADER} bytes (the header)`,
    );
  }
  const v = new DataView(b.buffer, b.byteOffset, b.length);
  const magic = v.getUint32(0);
  if (magic !== MAGIC) {
    throw fail("magic", `0x${magic.toString(16)}`, "0x514649fb (QFI\\xfb)", 0);
  }
  const version = v.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new UnsupportedError(
      { format: FORMAT, field: "version", value: version, offset: 4 },
      `version ${version} is not one this driver reads (2 and 3${
        version === 1 ? "; version 1 is the qcow format" : ""
      })`,
    );
  }
  const clusterBits = v.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw fail(
      "cluster_bits",
      clusterBits,
      `from ${MIN_CLUSTER_BITS} to ${MAX_CLUSTER_BITS} (clusters of 512 bytes to 2 MiB)`,
      20,
    );
  }
  const clusterSize = 2 ** clusterBits;
  const size = safeNumber(v.getBigUint64(24), FORMAT, "size", 24);
  const cryptMethod = v.getUint32(32);
  if (cryptMethod > CRYPT.luks) {
    throw fail(
      "crypt_method",
      cryptMethod,
      "0 (none), 1 (AES) or 2 (LUKS)",
      32,
    );
  }
  let incompatible = 0n;
  let compatible = 0n;
  let autoclear = 0n;
  let refcountOrder = 4;
  let headerLength = V2_HEADER;
  let compressionType = 0;
  if (version === 3) {
    if (b.length < V3_HEADER) {
      throw fail(
        "file size",
        fileSize,
        `at least ${V3_HEADER} bytes (a version 3 header)`,
      );
    }
    incompatible = v.getBigUint64(72);
    compatible = v.getBigUint64(80);
    autoclear = v.getBigUint64(88);
    refcountOrder = v.getUint32(96);
    if (refcountOrder > 6) {
      throw fail(
        "refcount_order",
        refcountOrder,
        "at most 6 (64-bit refcounts)",
        96,
      );
    }
    headerLength = v.getUint32(100);
    if (
      headerLength < V3_HEADER || headerLength % 8 !== 0 ||
      headerLength > clusterSize
    ) {
      throw fail(
        "header_length",
        headerLength,
        `a multiple of 8 from ${V3_HEADER} to the cluster size ${clusterSize}`,
        100,
      );
    }
    if (headerLength > b.length) {
      throw fail(
        "header_length",
        headerLength,
        `within the file's ${fileSize} bytes`,
        100,
      );
    }
    if (headerLength > V3_HEADER) compressionType = b[104];
  }
  // Extensions: from the header's end to the backing file name, or the
  // end of the first cluster.
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
    if (
      backingFileOffset < headerLength ||
      backingFileOffset + backingFileSize > Math.min(clusterSize, b.length)
    ) {
      throw fail(
        "backing_file_offset",
        backingFileOffset,
        `past the header and, with its ${backingFileSize}-byte name, within the first cluster of the file`,
        8,
      );
    }
  }
  const header: Header = {
    version,
    backingFileOffset,
    backingFileSize,
    clusterBits,
    size,
    cryptMethod,
    l1Size: v.getUint32(36),
    l1TableOffset: safeNumber(
      v.getBigUint64(40),
      FORMAT,
      "l1_table_offset",
      40,
    ),
    refcountTableOffset: safeNumber(
      v.getBigUint64(48),
      FORMAT,
      "refcount_table_offset",
      48,
    ),
    refcountTableClusters: v.getUint32(56),
    nbSnapshots: v.getUint32(60),
    snapshotsOffset: safeNumber(
      v.getBigUint64(64),
      FORMAT,
      "snapshots_offset",
      64,
    ),
    incompatible,
    compatible,
    autoclear,
    refcountOrder,
    headerLength,
    compressionType,
    featureNames: new Map(),
  };
  parseExtensions(
    b,
    header,
    backingFileOffset !== 0
      ? backingFileOffset
      : Math.min(clusterSize, b.length),
  );
  checkFeatures(header);
  checkTables(header, fileSize);
  return header;
}

/** Reads the header extensions in `b[header.headerLength, end)`. */
function parseExtensions(b: Uint8Array, header: Header, end: number) {
  const v = new DataView(b.buffer, b.byteOffset, b.length);
  const text = (at: number, length: number) =>
    new TextDecoder().decode(b.subarray(at, at + length));
  const seen = new Set<number>();
  // Each extension takes 8 bytes at least: bounded by the first cluster.
  for (let at = header.headerLength; at + 8 <= end;) {
    const type = v.getUint32(at);
    const length = v.getUint32(at + 4);
    if (type === EXT.end) return;
    const data = at + 8;
    if (length > end - data) {
      throw fail(
        `header extension 0x${type.toString(16)} length`,
        length,
        `within the ${end - data} bytes left of the header area`,
        at + 4,
      );
    }
    if (seen.has(type) && type !== 0) {
      throw fail(
        `header extension 0x${type.toString(16)}`,
        "repeated",
        "present at most once",
        at,
      );
    }
    seen.add(type);
    switch (type) {
      case EXT.backingFormat:
        header.backingFormat = text(data, length);
        break;
      case EXT.dataFile:
        header.dataFile = text(data, length);
        break;
      case EXT.featureTable:
        for (let e = data; e + 48 <= data + length; e += 48) {
          let stop = e + 2;
          while (stop < e + 48 && b[stop] !== 0) stop++;
          header.featureNames.set(
            `${b[e]}:${b[e + 1]}`,
            text(e + 2, stop - e - 2),
          );
        }
        break;
      case EXT.crypto:
        if (length < 16) {
          throw fail(
            "full disk encryption header extension length",
            length,
            "16 bytes (offset and length)",
            at + 4,
          );
        }
        header.crypto = {
          offset: safeNumber(
            v.getBigUint64(data),
            FORMAT,
            "crypto header offset",
            data,
          ),
          length: safeNumber(
            v.getBigUint64(data + 8),
            FORMAT,
            "crypto header length",
            data + 8,
          ),
        };
        break;
      case EXT.bitmaps:
        if (length >= 24) {
          header.bitmaps = {
            count: v.getUint32(data),
            directorySize: safeNumber(
              v.getBigUint64(data + 8),
              FORMAT,
              "bitmap_directory_size",
              data + 8,
            ),
            directoryOffset: safeNumber(
              v.getBigUint64(data + 16),
              FORMAT,
              "bitmap_directory_offset",
              data + 16,
            ),
          };
        }
        break;
    }
    at = data + Math.ceil(length / 8) * 8;
  }
}

/** The feature name the image gives bit `bit` of bitmap `type`, or a description. */
function featureName(header: Header, type: number, bit: number): string {
  const named = header.featureNames.get(`${type}:${bit}`);
  return named ? `"${named}" (bit ${bit})` : `bit ${bit}`;
}

/** Refuses unknown incompatible features and impossible combinations. */
function checkFeatures(header: Header) {
  const unknown = header.incompatible & ~KNOWN_INCOMPAT;
  if (unknown !== 0n) {
    const names: string[] = [];
    for (let bit = 0; bit < 64; bit++) {
      if (unknown & (1n << BigInt(bit))) {
        names.push(featureName(header, 0, bit));
      }
    }
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "incompatible_features",
        value: `0x${header.incompatible.toString(16)}`,
        offset: 72,
      },
      `unknown incompatible feature${names.length > 1 ? "s" : ""} ${
        names.join(", ")
      }: an image using ${
        names.length > 1 ? "them" : "it"
      } cannot be read safely (known: ${INCOMPAT_NAMES.join(", ")})`,
    );
  }
  const compressionFlag =
    (header.incompatible & INCOMPAT.compressionType) !== 0n;
  if (compressionFlag !== (header.compressionType !== 0)) {
    throw fail(
      "compression_type",
      header.compressionType,
      compressionFlag
        ? "non-zero when the compression type bit is set"
        : "0 (zlib) when the compression type bit is clear",
      104,
    );
  }
  if (header.compressionType >= COMPRESSION_TYPES.length) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "compression_type",
        value: header.compressionType,
        offset: 104,
      },
      `compression_type ${header.compressionType} is unknown (0 zlib, 1 zstd)`,
    );
  }
  const extendedL2 = (header.incompatible & INCOMPAT.extendedL2) !== 0n;
  if (extendedL2 && header.clusterBits < 14) {
    throw fail(
      "cluster_bits",
      header.clusterBits,
      "at least 14 (16 KiB clusters) with extended L2 entries",
      20,
    );
  }
  const dataFile = (header.incompatible & INCOMPAT.dataFile) !== 0n;
  if ((header.autoclear & AUTOCLEAR.dataFileRaw) && !dataFile) {
    throw fail(
      "autoclear_features",
      `0x${header.autoclear.toString(16)}`,
      "without the raw external data bit unless the external data file bit is set",
      88,
    );
  }
  if (header.dataFile !== undefined && !dataFile) {
    // QEMU ignores the name then; so do we.
    header.dataFile = undefined;
  }
  if ((header.cryptMethod === CRYPT.luks) !== (header.crypto !== undefined)) {
    throw fail(
      "full disk encryption header extension",
      header.crypto === undefined ? "absent" : "present",
      "present exactly when crypt_method is 2 (LUKS)",
      32,
    );
  }
}

/** The L2 entries per table. */
export function l2EntriesOf(header: Header): number {
  const extended = (header.incompatible & INCOMPAT.extendedL2) !== 0n;
  return 2 ** header.clusterBits / (extended ? 16 : 8);
}

/** Checks the tables the header points at against the file. */
function checkTables(header: Header, fileSize: number) {
  const clusterSize = 2 ** header.clusterBits;
  const span = clusterSize * l2EntriesOf(header);
  const minL1 = Math.ceil(header.size / span);
  if (header.l1Size * 8 > MAX_L1_BYTES) {
    throw fail(
      "l1_size",
      header.l1Size,
      `at most ${MAX_L1_BYTES / 8} entries (QEMU's limit of 32 MiB)`,
      36,
    );
  }
  if (header.l1Size < minL1) {
    throw fail(
      "l1_size",
      header.l1Size,
      `at least ${minL1} entries for a size of ${header.size} bytes`,
      36,
    );
  }
  const aligned = (
    value: number,
    field: string,
    at: number,
    bytes: number,
  ) => {
    if (value % clusterSize !== 0 || value + bytes > fileSize) {
      throw fail(
        field,
        value,
        `a multiple of the cluster size ${clusterSize} with its ${bytes} bytes within the file's ${fileSize} bytes`,
        at,
      );
    }
  };
  if (header.l1Size > 0) {
    aligned(header.l1TableOffset, "l1_table_offset", 40, header.l1Size * 8);
  }
  if (header.refcountTableClusters * clusterSize > MAX_REFCOUNT_TABLE_BYTES) {
    throw fail(
      "refcount_table_clusters",
      header.refcountTableClusters,
      `at most ${
        MAX_REFCOUNT_TABLE_BYTES / clusterSize
      } (QEMU's limit of 8 MiB)`,
      56,
    );
  }
  aligned(
    header.refcountTableOffset,
    "refcount_table_offset",
    48,
    header.refcountTableClusters * clusterSize,
  );
  if (header.nbSnapshots > MAX_SNAPSHOTS) {
    throw fail(
      "nb_snapshots",
      header.nbSnapshots,
      `at most ${MAX_SNAPSHOTS}`,
      60,
    );
  }
  if (header.nbSnapshots > 0) {
    aligned(
      header.snapshotsOffset,
      "snapshots_offset",
      64,
      header.nbSnapshots * 40,
    );
  }
  if (header.crypto) {
    aligned(
      header.crypto.offset,
      "crypto header offset",
      header.headerLength,
      header.crypto.length,
    );
  }
}

/** One internal snapshot, as its table entry gives it. */
export interface Snapshot {
  /** The unique ID string. */
  id: string;
  /** The name (tag). */
  name: string;
  l1TableOffset: number;
  l1Size: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  /** The virtual size of the snapshot's disk (the header's size when absent). */
  diskSize: number;
  icount?: number;
  /** Bytes of its table entry, padding included. */
  entryBytes: number;
}

/**
 * Reads the snapshot table: `header.nbSnapshots` entries of 40 bytes plus
 * their extra data, ID and name, each padded to 8 bytes.
 *
 * @param source the image file
 * @param header its header
 * @returns the snapshots, in table order
 * @throws {ImageFormatError} for a table past the end of the file
 */
export async function readSnapshots(
  source: Source,
  header: Header,
): Promise<Snapshot[]> {
  const out: Snapshot[] = [];
  let at = header.snapshotsOffset;
  // A window of the file read ahead, grown only as entries need it.
  let window: Uint8Array = new Uint8Array(0);
  let windowAt = at;
  const need = async (offset: number, length: number) => {
    if (offset + length > source.size) {
      throw fail(
        "snapshot table",
        offset,
        `within the file's ${source.size} bytes (an entry of ${length} bytes)`,
        offset,
      );
    }
    if (offset < windowAt || offset + length > windowAt + window.length) {
      windowAt = offset;
      window = await source.read(
        offset,
        Math.min(source.size - offset, Math.max(length, 64 << 10)),
      );
    }
    return window.subarray(offset - windowAt, offset - windowAt + length);
  };
  for (let i = 0; i < header.nbSnapshots; i++) {
    const fixed = await need(at, 40);
    const v = new DataView(fixed.buffer, fixed.byteOffset, 40);
    const idSize = v.getUint16(12);
    const nameSize = v.getUint16(14);
    const extraSize = v.getUint32(36);
    if (extraSize > MAX_SNAPSHOT_EXTRA) {
      throw fail(
        `snapshot ${i} extra_data_size`,
        extraSize,
        `at most ${MAX_SNAPSHOT_EXTRA} bytes`,
        at + 36,
      );
    }
    const l1Size = v.getUint32(8);
    const l1TableOffset = safeNumber(
      v.getBigUint64(0),
      FORMAT,
      `snapshot ${i} l1_table_offset`,
      at,
    );
    const entry = {
      l1TableOffset,
      l1Size,
      dateSec: v.getUint32(16),
      dateNsec: v.getUint32(20),
      vmClockNsec: safeNumber(
        v.getBigUint64(24),
        FORMAT,
        `snapshot ${i} vm_clock_nsec`,
        at + 24,
      ),
      vmStateSize: v.getUint32(32),
    };
    const rest = await need(at + 40, extraSize + idSize + nameSize);
    const rv = new DataView(rest.buffer, rest.byteOffset, rest.length);
    let vmStateSize = entry.vmStateSize;
    let diskSize = header.size;
    let icount: number | undefined;
    if (extraSize >= 8) {
      vmStateSize = safeNumber(
        rv.getBigUint64(0),
        FORMAT,
        "vm_state_size_large",
      );
    }
    if (extraSize >= 16) {
      diskSize = safeNumber(rv.getBigUint64(8), FORMAT, "disk_size", at + 48);
    }
    if (extraSize >= 24) {
      const raw = rv.getBigUint64(16);
      if (raw !== 0xffffffffffffffffn) icount = Number(raw);
    }
    const decoder = new TextDecoder();
    out.push({
      ...entry,
      vmStateSize,
      diskSize,
      icount,
      entryBytes: Math.ceil((40 + extraSize + idSize + nameSize) / 8) * 8,
      id: decoder.decode(rest.subarray(extraSize, extraSize + idSize)),
      name: decoder.decode(
        rest.subarray(extraSize + idSize, extraSize + idSize + nameSize),
      ),
    });
    at += Math.ceil((40 + extraSize + idSize + nameSize) / 8) * 8;
  }
  return out;
}

/** A run of the virtual disk, as the tables map it. */
export type Segment =
  | { kind: "data"; at: number; length: number; host: number }
  | {
    kind: "zero";
    at: number;
    length: number;
    /** Where its cluster is preallocated in the file, if it is. */
    host?: number;
  }
  | { kind: "unallocated"; at: number; length: number }
  | {
    kind: "compressed";
    at: number;
    length: number;
    /** Where the compressed bytes start in the file, and how many (at most). */
    offset: number;
    size: number;
    /** Where the run starts within its cluster. */
    within: number;
  };

/**
 * The decompressor of a compression_type: decodes `input` (which may run
 * past the end of the stream) into exactly `out.length` bytes.
 */
export type ClusterDecoder = (
  input: Uint8Array,
  out: Uint8Array,
) => Promise<void>;

/** Decoders of compressed clusters by compression_type (0 zlib, 1 zstd). */
const DECODERS: Record<number, ClusterDecoder | undefined> = {
  0: (input, out) => decodeCluster(CLUSTER_DEFLATE, input, out),
  1: (input, out) => decodeCluster(CLUSTER_ZSTD, input, out),
};

/** The decoder of `compressionType`, or an UnsupportedError naming it. */
export function clusterDecoder(compressionType: number): ClusterDecoder {
  const decoder = DECODERS[compressionType];
  if (!decoder) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "compression_type",
        value: COMPRESSION_TYPES[compressionType] ?? compressionType,
        offset: 104,
      },
      `compressed clusters of compression_type ${
        COMPRESSION_TYPES[compressionType] ?? compressionType
      } cannot be decoded yet (zlib clusters can)`,
    );
  }
  return decoder;
}

/** What an opened qcow2 shares between its views (locked and unlocked). */
export interface State {
  source: Source;
  header: Header;
  /** Where guest clusters live: the image, or the external data file. */
  data: Source;
  /** The external data file is in use (offset 0 is valid in L2 entries). */
  hasDataFile: boolean;
  /** Virtual size of the disk read (the active layer or a snapshot). */
  size: number;
  clusterSize: number;
  l2Entries: number;
  /** Bytes per L2 entry: 8, or 16 with extended L2. */
  entryBytes: number;
  extendedL2: boolean;
  subclusterSize: number;
  /** The L1 table read (raw big-endian entries) and where it lives. */
  l1: Uint8Array;
  l1Offset: number;
  /** L2 tables by file offset (least recently used first). */
  l2Cache: Map<number, Uint8Array>;
  backingFile?: string;
  backingFormat?: string;
  details: Record<string, unknown>;
  /** The last decompressed cluster, for small reads inside it. */
  inflated?: { offset: number; bytes: Uint8Array };
  /** Lets go of the decode workers, held since the first read that used them. */
  letGoOfPool?: () => void;
  /** Adds `write` and `flush` to a view (set by a writable open). */
  writable?: (image: Image, cipher?: SectorCipher) => Image;
  /** Scheme and sector numbering of the encryption. */
  encryption?: {
    scheme: string;
    /** LUKS numbers sectors by host offset, AES by guest offset. */
    physical: boolean;
    /** Makes the cipher from a passphrase (LUKS: derives the master key). */
    cipher: (key: string | Uint8Array) => Promise<SectorCipher>;
  };
}

/** L1 entry `index`: the offset of its L2 table, or 0. */
export function l1Entry(state: State, index: number): number {
  if (index * 8 >= state.l1.length) return 0;
  const v = new DataView(state.l1.buffer, state.l1.byteOffset);
  const high = v.getUint32(index * 8);
  const low = v.getUint32(index * 8 + 4);
  const offset = (high & 0x00ffffff) * 2 ** 32 + ((low & 0xfffffe00) >>> 0);
  if ((high & 0x7f000000) !== 0 || (low & 0x1ff) !== 0) {
    throw fail(
      `l1[${index}]`,
      v.getBigUint64(index * 8),
      "an L2 table offset with reserved bits 0-8 and 56-62 clear",
      state.l1Offset + index * 8,
    );
  }
  if (
    offset !== 0 &&
    (offset % state.clusterSize !== 0 ||
      offset + state.clusterSize > state.source.size)
  ) {
    throw fail(
      `l1[${index}]`,
      offset,
      `an L2 table offset aligned to ${state.clusterSize} with its table within the file's ${state.source.size} bytes`,
      state.l1Offset + index * 8,
    );
  }
  const metadata = offset === 0 ? undefined : overlapsMetadata(state, offset);
  if (metadata) {
    throw fail(
      `l1[${index}]`,
      offset,
      `an L2 table offset clear of the ${metadata}`,
      state.l1Offset + index * 8,
    );
  }
  return offset;
}

/**
 * Which metadata the cluster at `at` overlaps (the header, the L1 table,
 * the refcount table), or undefined: a table pointing at them is a
 * corrupt image (one that could loop a table onto itself), refused for
 * the cost of three comparisons.
 */
function overlapsMetadata(state: State, at: number): string | undefined {
  const h = state.header;
  const end = at + state.clusterSize;
  if (at < state.clusterSize) return "header cluster";
  if (at < state.l1Offset + state.l1.length && state.l1Offset < end) {
    return "L1 table";
  }
  const refcountEnd = h.refcountTableOffset +
    h.refcountTableClusters * state.clusterSize;
  if (at < refcountEnd && h.refcountTableOffset < end) {
    return "refcount table";
  }
  return undefined;
}

/** The L2 table at file offset `at` (cached). */
export async function l2Table(state: State, at: number): Promise<Uint8Array> {
  const hit = state.l2Cache.get(at);
  if (hit) {
    state.l2Cache.delete(at);
    state.l2Cache.set(at, hit);
    return hit;
  }
  const table = await state.source.read(at, state.clusterSize);
  state.l2Cache.set(at, table);
  while (state.l2Cache.size * state.clusterSize > L2_CACHE_BYTES) {
    state.l2Cache.delete(state.l2Cache.keys().next().value!);
  }
  return table;
}

/**
 * The runs of `[offset, offset + length)` as the tables map them:
 * adjacent runs of one kind merged (data runs when their host bytes
 * follow each other too); one run per compressed cluster.
 */
export async function mapRange(
  state: State,
  offset: number,
  length: number,
): Promise<Segment[]> {
  const out: Segment[] = [];
  const push = (s: Segment) => {
    const last = out[out.length - 1];
    const host = (x: Segment) => (x as { host?: number }).host;
    if (
      last && last.kind === s.kind && s.kind !== "compressed" &&
      (host(last) === undefined
        ? host(s) === undefined
        : host(last)! + last.length === host(s))
    ) {
      last.length += s.length;
    } else {
      out.push(s);
    }
  };
  const { clusterSize, l2Entries } = state;
  const span = clusterSize * l2Entries;
  const end = offset + length;
  for (let at = offset; at < end;) {
    const l1Index = Math.floor(at / span);
    const tableStop = Math.min(end, (l1Index + 1) * span);
    const tableAt = l1Entry(state, l1Index);
    if (tableAt === 0) {
      push({ kind: "unallocated", at, length: tableStop - at });
      at = tableStop;
      continue;
    }
    const table = await l2Table(state, tableAt);
    const v = new DataView(table.buffer, table.byteOffset, table.length);
    while (at < tableStop) {
      const clusterStart = at - at % clusterSize;
      const stop = Math.min(tableStop, clusterStart + clusterSize);
      const index = (clusterStart / clusterSize) % l2Entries;
      decodeEntry(state, v, index, tableAt, at, stop, clusterStart, push);
      at = stop;
    }
  }
  return out;
}

/** Decodes L2 entry `index` for the guest bytes `[at, stop)` of its cluster. */
function decodeEntry(
  state: State,
  v: DataView,
  index: number,
  tableAt: number,
  at: number,
  stop: number,
  clusterStart: number,
  push: (s: Segment) => void,
) {
  const e = index * state.entryBytes;
  const where = tableAt + e;
  const high = v.getUint32(e);
  const low = v.getUint32(e + 4);
  const bad = (value: unknown, limit: string) =>
    fail(`l2[${index}] of the table at ${tableAt}`, value, limit, where);
  if (high & 0x40000000) {
    if (state.hasDataFile) {
      throw bad(
        v.getBigUint64(e),
        "not compressed: images with an external data file have no compressed clusters",
      );
    }
    if (state.extendedL2 && (v.getUint32(e + 8) | v.getUint32(e + 12)) !== 0) {
      throw bad(
        v.getBigUint64(e + 8),
        "a zero subcluster bitmap for a compressed cluster",
      );
    }
    // x = 62 - (cluster_bits - 8) bits of offset; the rest up to bit 61
    // count the 512-byte sectors past the first.
    const x = 62 - (state.header.clusterBits - 8);
    const entry = (BigInt(high & 0x3fffffff) << 32n) | BigInt(low);
    const offset = Number(entry & ((1n << BigInt(x)) - 1n));
    const sectors = Number(entry >> BigInt(x)) + 1;
    const size = sectors * SECTOR - (offset % SECTOR);
    if (offset >= state.source.size || offset < SECTOR) {
      throw bad(
        offset,
        `a compressed cluster offset past the header and within the file's ${state.source.size} bytes`,
      );
    }
    push({
      kind: "compressed",
      at,
      length: stop - at,
      offset,
      size,
      within: at - clusterStart,
    });
    return;
  }
  if ((low & 0x1fe) !== 0 || (high & 0x3f000000) !== 0) {
    throw bad(
      v.getBigUint64(e),
      "a cluster descriptor with reserved bits 1-8 and 56-61 clear",
    );
  }
  const host = (high & 0x00ffffff) * 2 ** 32 + ((low & 0xfffffe00) >>> 0);
  if (host % state.clusterSize !== 0) {
    throw bad(host, `a cluster offset aligned to ${state.clusterSize}`);
  }
  const copied = (high & 0x80000000) !== 0;
  const allocated = host !== 0 || (state.hasDataFile && copied);
  const metadata = host === 0 || state.hasDataFile
    ? undefined
    : overlapsMetadata(state, host);
  if (metadata) throw bad(host, `a cluster offset clear of the ${metadata}`);
  const zeroFlag = (low & 1) !== 0;
  if (!state.extendedL2) {
    if (zeroFlag) {
      if (state.header.version < 3) {
        throw bad(
          v.getBigUint64(e),
          "without the zero flag (bit 0) in a version 2 image",
        );
      }
      push({
        kind: "zero",
        at,
        length: stop - at,
        ...(allocated && !state.hasDataFile
          ? { host: host + at - clusterStart }
          : {}),
      });
    } else if (!allocated) {
      push({ kind: "unallocated", at, length: stop - at });
    } else {
      push({
        kind: "data",
        at,
        length: stop - at,
        host: host + at - clusterStart,
      });
    }
    return;
  }
  if (zeroFlag) {
    throw bad(
      v.getBigUint64(e),
      "without bit 0, which is reserved with extended L2 entries",
    );
  }
  const allocBits = v.getUint32(e + 12);
  const zeroBits = v.getUint32(e + 8);
  if ((allocBits & zeroBits) !== 0 || (!allocated && allocBits !== 0)) {
    throw bad(
      v.getBigUint64(e + 8),
      allocated
        ? "a subcluster bitmap with no subcluster both allocated and zero"
        : "a subcluster bitmap with no allocated subcluster in an unallocated cluster",
    );
  }
  const sub = state.subclusterSize;
  for (let s = at; s < stop;) {
    const k = Math.floor((s - clusterStart) / sub);
    const subStop = Math.min(stop, clusterStart + (k + 1) * sub);
    const bit = 1 << k;
    if (zeroBits & bit) {
      push({
        kind: "zero",
        at: s,
        length: subStop - s,
        ...(allocated && !state.hasDataFile
          ? { host: host + s - clusterStart }
          : {}),
      });
    } else if (allocBits & bit) {
      push({
        kind: "data",
        at: s,
        length: subStop - s,
        host: host + s - clusterStart,
      });
    } else push({ kind: "unallocated", at: s, length: subStop - s });
    s = subStop;
  }
}

/**
 * Reads the host bytes `[host, host + into.length)` of the data file into
 * `into` (through `span`, the image file's bytes read at once, where it
 * has them).
 */
async function readHost(
  state: State,
  host: number,
  into: Uint8Array,
  span?: Span,
) {
  if (host + into.length > state.data.size) {
    throw fail(
      "cluster offset",
      host,
      `with the ${into.length} bytes read, within the ${
        state.hasDataFile ? "external data file's" : "file's"
      } ${state.data.size} bytes`,
    );
  }
  if (span && !state.hasDataFile) await span.readInto(host, into);
  else await readIntoSource(state.data, host, into);
}

/** The typed error for a compressed cluster that did not decode (`message`: the codec's). */
function clusterError(
  state: State,
  seg: { offset: number; size: number },
  message: string,
): Error {
  return fail(
    "compressed cluster",
    seg.offset,
    `${
      COMPRESSION_TYPES[state.header.compressionType]
    } data of at most ${seg.size} bytes decoding to exactly ${state.clusterSize} bytes (${message})`,
    seg.offset,
  );
}

/** Decompresses `packed` (a compressed cluster) into `out` (a whole cluster). */
async function decompress(
  state: State,
  seg: { offset: number; size: number },
  packed: Uint8Array,
  out: Uint8Array,
) {
  const decode = clusterDecoder(state.header.compressionType);
  try {
    await decode(packed, out);
  } catch (e) {
    if (!(e instanceof CodecError)) throw e;
    throw clusterError(state, seg, e.message);
  }
}

/**
 * Decodes the whole compressed clusters `segments` of one read (at disk
 * offset `offset`, into `out`) on the decode workers, a few mebibytes of
 * packed bytes per message (see codecs/_clusters.ts).
 */
async function decodeOnWorkers(
  state: State,
  segments: Extract<Segment, { kind: "compressed" }>[],
  offset: number,
  out: Uint8Array,
  span?: Span,
) {
  const kind = state.header.compressionType === 1
    ? CLUSTER_ZSTD
    : CLUSTER_DEFLATE;
  clusterDecoder(state.header.compressionType); // refuses an unknown type
  state.letGoOfPool ??= holdPool();
  const clusters: PackedCluster[] = segments.map((s) => ({
    offset: s.offset,
    size: Math.min(s.size, state.source.size - s.offset),
    target: out.subarray(s.at - offset, s.at - offset + s.length),
  }));
  await decodeMany({
    kind,
    clusterSize: state.clusterSize,
    readInto: span?.readInto ??
      ((at, into) => readIntoSource(state.source, at, into)),
    bytes: span?.bytes,
    error: (c, message) =>
      clusterError(state, { offset: c.offset, size: c.size }, message),
  }, clusters);
}

/** The image over `state`: locked when encrypted and `cipher` is absent. */
export function qcow2Image(state: State, cipher?: SectorCipher): Image {
  const encrypted = state.header.cryptMethod !== CRYPT.none;
  const locked = encrypted && !cipher;
  const { clusterSize } = state;

  async function* extents(
    offset: number,
    length: number,
  ): AsyncIterable<Extent> {
    checkRange(state.size, offset, length);
    let run: Extent | undefined;
    // Table by table, so that a whole-disk walk holds one table's runs.
    const span = clusterSize * state.l2Entries;
    for (let at = offset; at < offset + length;) {
      const stop = Math.min(
        offset + length,
        (Math.floor(at / span) + 1) * span,
      );
      for (const s of await mapRange(state, at, stop - at)) {
        const kind = s.kind === "compressed" ? "data" : s.kind;
        // Where plain data lies in the image file, as qemu-img map says.
        const fileOffset =
          (s.kind === "data" || s.kind === "zero") && !encrypted &&
            !state.hasDataFile
            ? s.host
            : undefined;
        if (
          run && run.kind === kind &&
          (run.fileOffset === undefined
            ? fileOffset === undefined
            : run.fileOffset + run.length === fileOffset)
        ) run.length += s.length;
        else {
          if (run) yield run;
          run = { offset: s.at, length: s.length, kind };
          if (fileOffset !== undefined) run.fileOffset = fileOffset;
        }
      }
      at = stop;
    }
    if (run) yield run;
  }

  const unlockNeeded = () => {
    const what = `${state.source.name ?? "the qcow2 image"} is encrypted`;
    return new KeyError(
      `${what}: give its passphrase (open it with { key })`,
      `${what}: give its passphrase with --key-file FILE`,
    );
  };

  /** Reads the data run `s` into `target`, decrypting it. */
  async function readData(
    s: { at: number; length: number; host: number },
    target: Uint8Array,
    span?: Span,
  ) {
    if (!cipher) return await readHost(state, s.host, target, span);
    // Whole sectors: a cluster (and subcluster) is a whole number of them.
    const skip = s.at % SECTOR;
    const whole = Math.ceil((skip + s.length) / SECTOR) * SECTOR;
    const buffer = skip === 0 && whole === s.length
      ? target
      : new Uint8Array(whole);
    await readHost(state, s.host - skip, buffer, span);
    const first = state.encryption!.physical ? s.host - skip : s.at - skip;
    await cipher.decrypt(first / SECTOR, buffer);
    if (buffer !== target) target.set(buffer.subarray(skip, skip + s.length));
  }

  /** Reads the compressed runs `group` (near each other in the file). */
  async function readCompressed(
    group: Extract<Segment, { kind: "compressed" }>[],
    offset: number,
    out: Uint8Array,
    span?: Span,
  ) {
    if (group.length === 1 && state.inflated?.offset === group[0].offset) {
      const s = group[0];
      out.set(
        state.inflated.bytes.subarray(s.within, s.within + s.length),
        s.at - offset,
      );
      return;
    }
    const from = group[0].offset;
    const to = Math.min(
      state.source.size,
      Math.max(...group.map((s) => s.offset + s.size)),
    );
    const packed = span?.bytes(from, to - from) ??
      await state.source.read(from, to - from);
    for (const s of group) {
      const input = packed.subarray(
        s.offset - from,
        Math.min(to, s.offset + s.size) - from,
      );
      const target = out.subarray(s.at - offset, s.at - offset + s.length);
      if (s.length === clusterSize) {
        await decompress(state, s, input, target);
      } else {
        const bytes = new Uint8Array(clusterSize);
        await decompress(state, s, input, bytes);
        state.inflated = { offset: s.offset, bytes };
        target.set(bytes.subarray(s.within, s.within + s.length));
      }
    }
  }

  /** Fills `out` with the bytes at `offset`: every byte of it. */
  async function fill(offset: number, out: Uint8Array) {
    const segments = await mapRange(state, offset, out.length);
    if (locked && segments.some((s) => s.kind === "data")) {
      throw unlockNeeded();
    }
    // The file span of every cluster wanted, in one read when they lie
    // close together: over HTTP, one range request instead of one per
    // run of plain clusters and per job of compressed ones.
    const fileSize = state.source.size;
    const ranges: [number, number][] = [];
    for (const s of segments) {
      if (s.kind === "compressed") {
        ranges.push([s.offset, Math.min(fileSize, s.offset + s.size)]);
      } else if (
        s.kind === "data" && !state.hasDataFile && s.host + s.length <= fileSize
      ) ranges.push([s.host - s.at % SECTOR, s.host + s.length]);
    }
    const span = await readSpan(
      (at, into) => readIntoSource(state.source, at, into),
      ranges,
      clusterSize,
    );
    try {
      await fillSegments(segments, offset, out, span);
    } finally {
      span?.done();
    }
  }

  /** {@linkcode fill}'s work, the file's bytes read through `span` where it has them. */
  async function fillSegments(
    segments: Segment[],
    offset: number,
    out: Uint8Array,
    span?: Span,
  ) {
    const pending: Promise<void>[] = [];
    // Many whole compressed clusters: decoded on the workers, the rest here.
    const whole = (s: Segment) =>
      s.kind === "compressed" && s.length === clusterSize;
    const wholeCount = segments.reduce((n, s) => n + (whole(s) ? 1 : 0), 0);
    if (
      poolWorthIt(
        wholeCount,
        state.header.compressionType === 1 ? CLUSTER_ZSTD : CLUSTER_DEFLATE,
        clusterSize,
      )
    ) {
      pending.push(decodeOnWorkers(
        state,
        segments.filter(whole) as Extract<Segment, { kind: "compressed" }>[],
        offset,
        out,
        span,
      ));
      segments = segments.filter((s) => !whole(s));
    }
    for (let i = 0; i < segments.length;) {
      const s = segments[i];
      const target = out.subarray(s.at - offset, s.at - offset + s.length);
      if (s.kind === "zero") {
        target.fill(0);
      } else if (s.kind === "unallocated") {
        if (state.backingFile !== undefined) {
          throw new BackingFileError(
            `qcow2: bytes ${s.at}..${
              s.at + s.length
            } of this image are in its backing file ${
              JSON.stringify(state.backingFile)
            }, which was not opened: open it through the registry with resolveBacking`,
            state.backingFile,
          );
        }
        target.fill(0);
      } else if (s.kind === "data") {
        pending.push(readData(s, target, span));
      } else {
        let j = i + 1;
        let to = s.offset + s.size;
        while (j < segments.length) {
          const n = segments[j];
          if (
            n.kind !== "compressed" || n.offset < s.offset ||
            n.offset - to > READ_GAP
          ) break;
          to = Math.max(to, n.offset + n.size);
          j++;
        }
        pending.push(
          readCompressed(
            segments.slice(i, j) as Extract<Segment, { kind: "compressed" }>[],
            offset,
            out,
            span,
          ),
        );
        i = j;
        continue;
      }
      i++;
    }
    // All settle before a failure is reported: none writes into `out`
    // (a buffer the caller may reuse) after this read has failed.
    const settled = await Promise.allSettled(pending);
    for (const p of settled) if (p.status === "rejected") throw p.reason;
  }

  async function readInto(offset: number, into: Uint8Array): Promise<void> {
    checkRange(state.size, offset, into.length);
    if (into.length > 0) await fill(offset, into);
  }

  async function read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(state.size, offset, length);
    const out = new Uint8Array(length);
    if (length > 0) await fill(offset, out);
    return out;
  }

  const enc = state.encryption;
  const image: Image = {
    format: FORMAT,
    get size() {
      return state.size;
    },
    name: state.source.name,
    encrypted,
    encryption: locked && enc
      ? {
        scheme: enc.scheme,
        unlock: (c) => qcow2Image(state, c),
        cipher: (key) => lazyCipher(enc.cipher(key)),
      }
      : undefined,
    backingFile: state.backingFile,
    backingFormat: state.backingFormat,
    details: state.details,
    read,
    readInto,
    extents,
    async close() {
      state.letGoOfPool?.();
      state.letGoOfPool = undefined;
      if (state.data !== state.source) await state.data.close?.();
      await state.source.close?.();
    },
  };
  if (state.writable) return state.writable(image, cipher);
  // Plain clusters in the image file: their fileOffsets are its bytes.
  if (encrypted || state.hasDataFile) return image;
  let preallocated: Promise<boolean> | undefined;
  return mapLooksIntoFile(
    storesDataIn(image, state.source),
    () => preallocated ??= metadataPreallocated(state),
  );
}

/**
 * Whether the image's metadata looks preallocated, by qemu's rule
 * (`qcow2_detect_metadata_preallocation`): more clusters of the file have
 * a refcount than max(10/9 of, 2 more than) the clusters the file system
 * stores. qemu-img map then reports data clusters over the file's holes
 * as zeros. False where the allocated size is unknown.
 */
async function metadataPreallocated(state: State): Promise<boolean> {
  const allocated = await (state.source as {
    allocatedBytes?: () => Promise<number | undefined>;
  }).allocatedBytes?.();
  if (allocated === undefined) return false;
  const stored = Math.floor(allocated / state.clusterSize);
  const threshold = Math.max(Math.floor(stored * 10 / 9), stored + 2);
  const { openRefcounts, refcountOf } = await import("./qcow2/writable.ts");
  const refcounts = await openRefcounts(state);
  const clusters = Math.ceil(state.source.size / state.clusterSize);
  let counted = 0;
  for (let i = 0; i < clusters && counted <= threshold; i++) {
    if (await refcountOf(state, refcounts, i) !== 0) counted++;
  }
  return counted > threshold;
}

/** A cipher that waits for `made` (a key derivation) on first use. */
function lazyCipher(made: Promise<SectorCipher>): SectorCipher {
  made.catch(() => {}); // reported by the first use
  return {
    decrypt: async (sector, bytes) => (await made).decrypt(sector, bytes),
    encrypt: async (sector, bytes) => (await made).encrypt(sector, bytes),
  };
}

/** The `info` details, with qemu-img's names where it has them. */
function detailsOf(
  header: Header,
  snapshots: Snapshot[],
): Record<string, unknown> {
  const d: Record<string, unknown> = {
    compat: header.version === 2 ? "0.10" : "1.1",
    "compression-type": COMPRESSION_TYPES[header.compressionType],
    "cluster-size": 2 ** header.clusterBits,
  };
  if (header.version >= 3) {
    d["lazy-refcounts"] = (header.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n;
    d["refcount-bits"] = 2 ** header.refcountOrder;
    d.corrupt = (header.incompatible & INCOMPAT.corrupt) !== 0n;
    d["extended-l2"] = (header.incompatible & INCOMPAT.extendedL2) !== 0n;
    if (header.incompatible & INCOMPAT.dirty) d.dirty = true;
  } else {
    d["refcount-bits"] = 16;
  }
  if (header.incompatible & INCOMPAT.dataFile) {
    d["data-file"] = header.dataFile;
    d["data-file-raw"] = (header.autoclear & AUTOCLEAR.dataFileRaw) !== 0n;
  }
  if (header.cryptMethod !== CRYPT.none) {
    d.encrypt = { format: header.cryptMethod === CRYPT.aes ? "aes" : "luks" };
  }
  if (header.bitmaps) d.bitmaps = header.bitmaps.count;
  if (snapshots.length) {
    d.snapshots = snapshots.map((s) => ({
      id: s.id,
      name: s.name,
      "vm-state-size": s.vmStateSize,
      "date-sec": s.dateSec,
      "date-nsec": s.dateNsec,
      "vm-clock-sec": Math.floor(s.vmClockNsec / 1e9),
      "vm-clock-nsec": s.vmClockNsec % 1e9,
      ...(s.icount === undefined ? {} : { icount: s.icount }),
    }));
  }
  return d;
}

/** The snapshot named by `wanted` (its ID, else its name). */
function findSnapshot(snapshots: Snapshot[], wanted: string): Snapshot {
  const found = snapshots.find((s) => s.id === wanted) ??
    snapshots.find((s) => s.name === wanted);
  if (!found) {
    throw new ImageFormatError(
      {
        format: FORMAT,
        field: "snapshot",
        value: wanted,
        limit: `one of the image's snapshots (${
          snapshots.map((s) => `${s.id} "${s.name}"`).join(", ") || "none"
        })`,
      },
    );
  }
  return found;
}

/** How the image's clusters are encrypted, and the cipher maker. */
function encryptionOf(
  source: Source,
  header: Header,
): State["encryption"] {
  if (header.cryptMethod === CRYPT.aes) {
    return {
      scheme: "qcow-aes",
      physical: false,
      cipher: async (key) =>
        (await import("../streams/decrypt.ts")).cipherFor("qcow-aes", key),
    };
  }
  if (header.cryptMethod === CRYPT.luks) {
    return {
      scheme: "qcow2-luks",
      physical: true,
      cipher: async (key) =>
        (await import("./qcow2/luks.ts")).luksCipher(
          source,
          header.crypto!,
          key,
        ),
    };
  }
  return undefined;
}

/**
 * Opens a qcow2 image for reading: parses the header, its extensions, the
 * snapshot table and the L1 table (of the active layer, or of the
 * snapshot named by `options.options.snapshot`).
 *
 * @param source the image file
 * @param options the open's options
 * @returns the state the image views share
 */
export async function openState(
  source: Source,
  options: OpenOptions,
): Promise<State> {
  const first = await source.read(0, Math.min(V3_HEADER, source.size));
  if (first.length >= 24) {
    const cb = new DataView(first.buffer, first.byteOffset).getUint32(20);
    if (cb >= MIN_CLUSTER_BITS && cb <= MAX_CLUSTER_BITS) {
      const n = headBytes(cb, source.size);
      const head = n > first.length ? await source.read(0, n) : first;
      return await stateFrom(source, head, options);
    }
  }
  return await stateFrom(source, first, options);
}

async function stateFrom(
  source: Source,
  head: Uint8Array,
  options: OpenOptions,
): Promise<State> {
  const header = parseHeader(head, source.size);
  const clusterSize = 2 ** header.clusterBits;
  const extendedL2 = (header.incompatible & INCOMPAT.extendedL2) !== 0n;
  const snapshots = header.nbSnapshots > 0
    ? await readSnapshots(source, header)
    : [];
  let l1Offset = header.l1TableOffset;
  let l1Size = header.l1Size;
  let size = header.size;
  const wanted = options.options?.snapshot;
  if (wanted !== undefined) {
    const snap = findSnapshot(snapshots, wanted);
    const span = clusterSize * l2EntriesOf(header);
    if (
      snap.l1Size * 8 > MAX_L1_BYTES ||
      snap.l1Size < Math.ceil(snap.diskSize / span) ||
      snap.l1TableOffset % clusterSize !== 0 ||
      snap.l1TableOffset + snap.l1Size * 8 > source.size
    ) {
      throw fail(
        `snapshot ${snap.id} l1_table_offset`,
        snap.l1TableOffset,
        `cluster aligned with its ${snap.l1Size} entries (enough for ${snap.diskSize} bytes) within the file's ${source.size} bytes`,
      );
    }
    l1Offset = snap.l1TableOffset;
    l1Size = snap.l1Size;
    size = snap.diskSize;
  }
  const l1 = l1Size > 0
    ? await source.read(l1Offset, l1Size * 8)
    : new Uint8Array(0);
  let backingFile: string | undefined;
  if (header.backingFileOffset !== 0) {
    backingFile = new TextDecoder().decode(
      head.subarray(
        header.backingFileOffset,
        header.backingFileOffset + header.backingFileSize,
      ),
    );
  }
  const hasDataFile = (header.incompatible & INCOMPAT.dataFile) !== 0n;
  let data = source;
  if (hasDataFile) {
    if (header.dataFile === undefined || header.dataFile === "") {
      throw new UnsupportedError(
        { format: FORMAT, field: "incompatible_features", offset: 72 },
        "the image keeps its data in an external data file but does not name it",
      );
    }
    if (!options.resolveFile) {
      throw new ImageFormatError(
        { format: FORMAT, file: source.name },
        `external data file "${header.dataFile}" needs a file resolver (OpenOptions.resolveFile)`,
      );
    }
    data = await options.resolveFile(header.dataFile, source.name);
  }
  const details = detailsOf(header, snapshots);
  if (wanted !== undefined) details.snapshot = wanted;
  if (header.crypto) {
    const { readLuksHeader } = await import("./qcow2/luks.ts");
    const luks = await readLuksHeader(source, header.crypto);
    const [mode, ivgen] = luks.cipherMode.split("-");
    details.encrypt = {
      format: "luks",
      "cipher-alg": `${luks.cipherName}-${
        mode === "xts" ? luks.keyBytes * 4 : luks.keyBytes * 8
      }`,
      "cipher-mode": mode,
      "ivgen-alg": ivgen,
      "hash-alg": luks.hashSpec,
      uuid: luks.uuid,
      "active-slots": luks.slots.map((s) => s.index),
    };
  }
  return {
    source,
    header,
    data,
    hasDataFile,
    size,
    clusterSize,
    l2Entries: l2EntriesOf(header),
    entryBytes: extendedL2 ? 16 : 8,
    extendedL2,
    subclusterSize: extendedL2 ? clusterSize / 32 : clusterSize,
    l1,
    l1Offset,
    l2Cache: new Map(),
    backingFile,
    backingFormat: backingFile === undefined ? undefined : header.backingFormat,
    details,
    encryption: encryptionOf(source, header),
  };
}

// The probe lives with the other signatures (the registry scores files
// without loading this driver).
export { probeQcow2 };

async function openQcow2(source: Source, options: OpenOptions): Promise<Image> {
  let state = await openState(source, options);
  if (options.writable) {
    const sink = writeSink(options, FORMAT)!;
    if (
      (state.header.incompatible & INCOMPAT.dirty) &&
      !(state.header.incompatible & INCOMPAT.corrupt) &&
      state.details.snapshot === undefined && !state.hasDataFile
    ) {
      // A dirty image (lazy refcounts) may have stale refcounts: QEMU
      // repairs them when it opens such an image for writing, as
      // `check -r all` would, and so do we. Imported here because the
      // check module reaches the registry, which imports this driver.
      const { checkImage } = await import("./qcow2/check.ts");
      const result = await checkImage(source, {
        format: FORMAT,
        repairAll: true,
        sink,
      });
      if (result.corruptions || result.checkErrors) {
        throw new UnsupportedError(
          { format: FORMAT, field: "incompatible_features", offset: 72 },
          `cannot write: the image is dirty and repairing its refcounts left ${result.corruptions} corruptions and ${result.checkErrors} check errors`,
        );
      }
      state = await openState(source, options);
    }
    const { makeWritable } = await import("./qcow2/writable.ts");
    await makeWritable(state, sink);
  }
  if (options.key !== undefined && state.encryption) {
    // Unlocked here (not by the registry's decrypt) so that a wrong LUKS
    // passphrase is refused at open.
    return qcow2Image(state, await state.encryption.cipher(options.key));
  }
  return qcow2Image(state);
}

/**
 * The qcow2 driver: QEMU's qcow2, versions 2 and 3. Reads standard,
 * zero, compressed (zlib) and extended-L2 clusters, backing files with
 * their format, external data files (through `OpenOptions.resolveFile`),
 * internal snapshots (`options: { snapshot: "ID or name" }`), AES and LUKS
 * encryption (`{ key }`).
 *
 * @example
 * ```ts
 * import { fromBytes, qcow2 } from "../mod.ts";
 * const head = new Uint8Array(8);
 * head.set([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);
 * console.log(qcow2.probe({ head, tail: head, size: 8 })); // 100
 * ```
 */
export const qcow2: Driver = {
  name: FORMAT,
  description:
    "QEMU qcow2, versions 2 and 3 (zero, compressed and extended L2 clusters, external data files, snapshots, AES and LUKS)",
  probe: probeQcow2,
  open: openQcow2,
  // Writing, resizing, measuring and rebasing load their modules when
  // called: reading an image loads none of them (nor the encoders).
  create: async (sink, spec) =>
    (await import("./qcow2/writable.ts")).createQcow2(sink, spec),
  encode: async (source, sink, options) =>
    (await import("./qcow2/encode.ts")).encodeQcow2(source, sink, options),
  writeOptions: QCOW2_OPTIONS,
  compresses: true,
  resize: async (file, size) =>
    (await import("./qcow2/resize.ts")).resizeQcow2(file, size),
  measure: async (subject, options) =>
    (await import("./qcow2/measure.ts")).measureQcow2(subject, options),
  setBackingFile: async (file, name, format) =>
    (await import("./qcow2/backing.ts")).setQcow2BackingFile(
      file,
      name,
      format,
    ),
};
