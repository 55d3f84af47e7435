/**
 * qed: QEMU Enhanced Disk images, read-only.
 *
 * This module is browser compatible.
 *
 * Described by QEMU's `docs/interop/qed_spec.rst`. Every field is
 * little-endian.
 *
 * | offset | size | field                                                   |
 * | -----: | ---: | ------------------------------------------------------- |
 * |      0 |    4 | magic `QED\0`                                           |
 * |      4 |    4 | cluster_size: a power of two from 4 KiB to 64 MiB       |
 * |      8 |    4 | table_size: clusters per L1/L2 table, a power of two 1-16 |
 * |     12 |    4 | header_size, in clusters                                |
 * |     16 |    8 | features: 1 backing file, 2 need check, 4 backing raw   |
 * |     24 |    8 | compat_features                                         |
 * |     32 |    8 | autoclear_features                                      |
 * |     40 |    8 | l1_table_offset                                         |
 * |     48 |    8 | image_size                                              |
 * |     56 |    4 | backing_filename_offset                                 |
 * |     60 |    4 | backing_filename_size                                   |
 *
 * The L1 table (table_size clusters of 64-bit entries at l1_table_offset)
 * points at L2 tables of the same size, whose entries give each data
 * cluster's offset in the file: 0 when the cluster is not allocated (the
 * backing file's bytes, or zeros), 1 for a zero cluster. The need-check
 * feature says the image was not closed cleanly (QEMU checks it when
 * opening it writable); it is read anyway, and `info` says so.
 *
 * @module
 */

import { probeQed, QED_MAGIC as MAGIC } from "./_signatures.ts";
import {
  ascii,
  formatErrors,
  le32,
  le64,
  safeNumber,
  view,
} from "./_binary.ts";
import { blockReader, wholeBlock } from "./_blocks.ts";
import { check, UnsupportedError } from "../streams/errors.ts";
import type { Driver, Image, OpenOptions, Source } from "../streams/types.ts";
import { storesDataIn } from "../streams/types.ts";

const FORMAT = "qed";
const HEADER_BYTES = 64;
const MIN_CLUSTER = 4096;
const MAX_CLUSTER = 64 << 20;
const MAX_TABLE = 16;
const F_BACKING = 1n;
const F_NEED_CHECK = 2n;
const F_BACKING_RAW = 4n;
const KNOWN_FEATURES = F_BACKING | F_NEED_CHECK | F_BACKING_RAW;
/** QEMU's limit for the backing file name. */
const MAX_BACKING_NAME = 1023;
/** L2 tables kept in memory. */
const L2_CACHE = 64;

const fail = formatErrors(FORMAT);
const isPowerOfTwo = (n: number) => n > 0 && (n & (n - 1)) === 0;

async function openQed(source: Source, options: OpenOptions): Promise<Image> {
  if (options.writable) {
    throw new UnsupportedError(
      { format: FORMAT },
      "qed images are read-only here; convert them to qcow2 or raw to write",
    );
  }
  check(source.size >= HEADER_BYTES, {
    format: FORMAT,
    field: "file size",
    value: source.size,
    limit: `at least ${HEADER_BYTES} bytes (the header)`,
    file: source.name,
  });
  const h = await source.read(0, HEADER_BYTES);
  if (le32(h, 0) !== MAGIC) throw fail("magic", ascii(h, 0, 4), '"QED\\0"', 0);
  const clusterSize = le32(h, 4);
  if (
    !isPowerOfTwo(clusterSize) || clusterSize < MIN_CLUSTER ||
    clusterSize > MAX_CLUSTER
  ) {
    throw fail(
      "cluster_size",
      clusterSize,
      `a power of two from ${MIN_CLUSTER} to ${MAX_CLUSTER}`,
      4,
      source.name,
    );
  }
  const tableSize = le32(h, 8);
  if (!isPowerOfTwo(tableSize) || tableSize > MAX_TABLE) {
    throw fail(
      "table_size",
      tableSize,
      `a power of two from 1 to ${MAX_TABLE}`,
      8,
      source.name,
    );
  }
  const headerSize = le32(h, 12);
  if (headerSize === 0 || headerSize * clusterSize > source.size) {
    throw fail(
      "header_size",
      headerSize,
      `at least 1 cluster, within the file's ${source.size} bytes`,
      12,
      source.name,
    );
  }
  const features = le64(h, 16);
  if (features & ~KNOWN_FEATURES) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "features",
        value: `0x${features.toString(16)}`,
        offset: 16,
      },
      `features 0x${
        (features & ~KNOWN_FEATURES).toString(16)
      } are not known here (known: backing file, need check, raw backing)`,
    );
  }
  const tableBytes = tableSize * clusterSize;
  const entriesPerTable = tableBytes / 8;
  const maxSize = entriesPerTable * entriesPerTable * clusterSize;
  const imageSize = safeNumber(le64(h, 48), FORMAT, "image_size", 48);
  if (imageSize % 512 !== 0 || imageSize > maxSize) {
    throw fail(
      "image_size",
      imageSize,
      `a multiple of 512, at most ${maxSize} (L1 x L2 entries x cluster_size)`,
      48,
      source.name,
    );
  }
  const aligned = (offset: number) => offset % clusterSize === 0;
  const l1Offset = safeNumber(le64(h, 40), FORMAT, "l1_table_offset", 40);
  if (
    !aligned(l1Offset) || l1Offset < headerSize * clusterSize ||
    l1Offset + tableBytes > source.size
  ) {
    throw fail(
      "l1_table_offset",
      l1Offset,
      `cluster aligned, past the header, its ${tableBytes} bytes within the file's ${source.size}`,
      40,
      source.name,
    );
  }
  let backingFile: string | undefined;
  if (features & F_BACKING) {
    const at = le32(h, 56);
    const length = le32(h, 60);
    if (
      length === 0 || length > MAX_BACKING_NAME || at < HEADER_BYTES ||
      at + length > headerSize * clusterSize
    ) {
      throw fail(
        "backing_filename",
        `${length} bytes at ${at}`,
        `1 to ${MAX_BACKING_NAME} bytes within the header's ${
          headerSize * clusterSize
        }`,
        56,
        source.name,
      );
    }
    backingFile = new TextDecoder().decode(await source.read(at, length));
  }
  const backingFormat = backingFile !== undefined && (features & F_BACKING_RAW)
    ? "raw"
    : undefined;
  const l1Bytes = await source.read(l1Offset, tableBytes);
  const l1View = view(l1Bytes);
  const l1 = new Float64Array(entriesPerTable);
  const clustersPerL2 = entriesPerTable;
  const l2Needed = Math.ceil(imageSize / clusterSize / clustersPerL2);
  // Each entry as two 32-bit halves: the table has 32768 entries at the
  // default sizes, and a BigInt and a field name made for each cost
  // several milliseconds of every open (it runs once, before the JIT).
  // An entry past 2^53 (a high half of 2^21 or more) is refused by
  // safeNumber, as every entry used to be.
  for (let i = 0; i < entriesPerTable; i++) {
    const lo = l1View.getUint32(i * 8, true);
    const hi = l1View.getUint32(i * 8 + 4, true);
    // (hi 0 apart: the product is a double, and the interpreter boxes
    // each double it makes, 1 MiB of garbage for a table that is mostly
    // zeros, enough for a scavenge.)
    const entry = hi === 0
      ? lo
      : hi < 2 ** 21
      ? hi * 2 ** 32 + lo
      : safeNumber(le64(l1Bytes, i * 8), FORMAT, `L1[${i}]`, l1Offset + i * 8);
    if (entry === 0) continue;
    if (i >= l2Needed) continue; // past the disk: never read
    if (!aligned(entry) || entry + tableBytes > source.size) {
      throw fail(
        `L1[${i}]`,
        entry,
        `a cluster-aligned L2 table of ${tableBytes} bytes within the file's ${source.size}`,
        l1Offset + i * 8,
        source.name,
      );
    }
    l1[i] = entry;
  }
  const l2Cache = new Map<number, Float64Array>();
  async function l2Table(index: number): Promise<Float64Array> {
    const hit = l2Cache.get(index);
    if (hit) return hit;
    const bytes = await source.read(l1[index], tableBytes);
    const table = new Float64Array(entriesPerTable);
    // One DataView for the table (le32 makes one per call: 65536 of them
    // for a table at the default sizes, most of a small image's convert).
    const entries = view(bytes);
    for (let i = 0; i < entriesPerTable; i++) {
      const lo = entries.getUint32(i * 8, true);
      const hi = entries.getUint32(i * 8 + 4, true);
      // Offsets past 2^53 are never valid (they pass the file's end);
      // they are kept inexact and refused below. (hi 0 apart: see L1.)
      table[i] = hi === 0 ? lo : hi * 2 ** 32 + lo;
    }
    l2Cache.set(index, table);
    if (l2Cache.size > L2_CACHE) l2Cache.delete(l2Cache.keys().next().value!);
    return table;
  }

  const reader = blockReader({
    source,
    size: imageSize,
    blockSize: clusterSize,
    async lookup(cluster) {
      const length = Math.min(clusterSize, imageSize - cluster * clusterSize);
      const l1Index = Math.floor(cluster / clustersPerL2);
      if (l1[l1Index] === 0) return wholeBlock(length, "unallocated");
      const entry = (await l2Table(l1Index))[cluster % clustersPerL2];
      if (entry === 0) return wholeBlock(length, "unallocated");
      if (entry === 1) return wholeBlock(length, "zero");
      if (!aligned(entry) || entry + length > source.size) {
        throw fail(
          `L2[${l1Index}][${cluster % clustersPerL2}]`,
          entry,
          `a cluster-aligned data cluster within the file's ${source.size} bytes`,
          l1[l1Index] + (cluster % clustersPerL2) * 8,
          source.name,
        );
      }
      return wholeBlock(length, "data", entry);
    },
  });

  const needCheck = (features & F_NEED_CHECK) !== 0n;
  // Data clusters read as their bytes in the file: convert copies them
  // file to file (in the kernel) to a raw output.
  return storesDataIn({
    format: FORMAT,
    size: imageSize,
    name: source.name,
    encrypted: false,
    backingFile,
    backingFormat,
    details: {
      clusterSize,
      tableSize,
      headerSize,
      features: `0x${features.toString(16)}`,
      needCheck,
      ...(needCheck
        ? {
          note:
            "the need-check flag is set (not closed cleanly); read as it is, without a check",
        }
        : {}),
    },
    ...reader,
    close: () => source.close?.() ?? Promise.resolve(),
  }, source);
}

/**
 * The qed driver: QEMU Enhanced Disk images, read-only, with their backing
 * file (and its format, when the header says raw) named for the caller's
 * backing-file policy.
 *
 * @example
 * ```ts
 * import { qed } from "../mod.ts";
 * const head = new Uint8Array([0x51, 0x45, 0x44, 0]);
 * console.log(qed.probe({ head, tail: head, size: 4 })); // 100
 * ```
 */
export const qed: Driver = {
  name: FORMAT,
  description: "QEMU Enhanced Disk (read-only)",
  probe: probeQed,
  open: openQed,
};
