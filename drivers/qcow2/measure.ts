/**
 * `measure` for qcow2 by formula, as QEMU's `qcow2_measure` computes it
 * (block/qcow2.c): no image is written, so `--size 16T` takes no longer
 * than `--size 1M`.
 *
 * - fully allocated: the header cluster, every L2 table and the L1 table
 *   for the virtual size rounded up to a cluster, the refcount blocks and
 *   table that count all of it (found as a fixed point, as
 *   `qcow2_refcount_metadata_size` does), the data, and the LUKS header
 *   rounded up to a cluster;
 * - required: the same less the data clusters that hold nothing: an input
 *   image counts each cluster holding any data run (zero and unallocated
 *   runs are skipped), all of them when a backing file is named (its
 *   content is unknown), and every cluster with `preallocation=full` or
 *   `falloc`.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { ImageFormatError } from "../../streams/errors.ts";
import { type Image, mappedExtents, type Source } from "../../streams/types.ts";
import { STRIPES } from "./luks.ts";
import { qcow2Settings } from "./layout.ts";

const FORMAT = "qcow2";
const SECTOR = 512;
/** QEMU's QCOW_MAX_L1_SIZE. */
const MAX_L1_BYTES = 32 << 20;

/** What {@linkcode measureQcow2} finds (qemu-img measure's fields). */
export interface Qcow2Measurement {
  /** Bytes of the file for this image. */
  required: number;
  /** Bytes of the file when every cluster holds data. */
  fullyAllocated: number;
  /**
   * Bytes the input's persistent bitmaps would take (qemu-img prints it
   * for a qcow2 input written as compat 1.1): 0, for an input without
   * bitmaps; absent otherwise.
   */
  bitmaps?: number;
}

const roundUp = (n: number, to: number) => Math.ceil(n / to) * to;

/**
 * Refcount blocks and table clusters that count `clusters` clusters and
 * themselves: the fixed point of QEMU's `qcow2_refcount_metadata_size`.
 *
 * @returns their bytes
 */
function refcountMetadataSize(
  clusters: number,
  clusterSize: number,
  refcountOrder: number,
): number {
  const perTableCluster = clusterSize / 8;
  const perBlock = clusterSize * 8 / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / perBlock);
    table = Math.ceil(blocks / perTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/**
 * The file a fully allocated qcow2 of `size` bytes takes without its
 * encryption header (QEMU's `qcow2_calc_prealloc_size`).
 */
function preallocSize(
  size: number,
  clusterSize: number,
  refcountOrder: number,
  extendedL2: boolean,
): number {
  const aligned = roundUp(size, clusterSize);
  const entryBytes = extendedL2 ? 16 : 8;
  let meta = clusterSize;
  const l2Entries = roundUp(aligned / clusterSize, clusterSize / entryBytes);
  meta += l2Entries * entryBytes;
  const l1Entries = roundUp(
    l2Entries * entryBytes / clusterSize,
    clusterSize / 8,
  );
  meta += l1Entries * 8;
  meta += refcountMetadataSize(
    (meta + aligned) / clusterSize,
    clusterSize,
    refcountOrder,
  );
  return meta + aligned;
}

/**
 * The sizes of a qcow2 file for `subject` (an image to convert, or a
 * virtual size) with the `-o` options `options`, as `qemu-img measure -O
 * qcow2` gives them. Besides the options `create` takes, `preallocation`
 * takes `full` and `falloc` here (they only count every cluster).
 *
 * @param subject the image, or a virtual size in bytes
 * @param options qemu-img `-o` options of the qcow2 to write
 * @returns required and fully allocated bytes (and bitmaps for an image)
 * @throws {ImageFormatError} for bad options or a size too large
 *
 * @example
 * ```ts
 * import { measureQcow2 } from "./measure.ts";
 * const sizes = await measureQcow2(1 << 30);
 * console.log(sizes.required, sizes.fullyAllocated); // 393216 1074135040
 * ```
 */
export async function measureQcow2(
  subject: Source | number,
  options: Record<string, string> = {},
): Promise<Qcow2Measurement> {
  const rest = { ...options };
  const preallocation = rest.preallocation ?? "off";
  if (preallocation === "full" || preallocation === "falloc") {
    delete rest.preallocation;
  }
  // The compression type changes no size; zstd is measured though not written.
  if (rest.compression_type === "zstd") delete rest.compression_type;
  // No passphrase is needed to measure: only the header's size.
  const s = qcow2Settings(rest, "");
  const clusterSize = 2 ** s.clusterBits;
  const entryBytes = s.extendedL2 ? 16 : 8;
  let size = typeof subject === "number" ? subject : subject.size;
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new RangeError(`invalid size ${size}: a whole number of bytes`);
  }
  size = roundUp(size, clusterSize);
  const l2Tables = Math.ceil(size / clusterSize / (clusterSize / entryBytes));
  if (l2Tables * 8 > MAX_L1_BYTES) {
    throw new ImageFormatError(
      {
        format: FORMAT,
        field: "size",
        value: size,
        limit: `an L1 table of at most ${MAX_L1_BYTES} bytes`,
      },
      "The image size is too large (try using a larger cluster size)",
    );
  }
  let luksBytes = 0;
  if (s.encrypt === "luks") {
    const bits = Number(s.luks.cipherAlg.slice(4));
    const keyBytes = (bits / 8) * (s.luks.cipherMode === "xts" ? 2 : 1);
    const material = roundUp(Math.ceil(keyBytes * STRIPES / SECTOR), 8);
    luksBytes = roundUp((8 + 8 * material) * SECTOR, clusterSize);
  }
  let data = 0;
  let bitmaps: number | undefined;
  if (typeof subject !== "number") {
    if (s.backingFile !== undefined) {
      data = size;
    } else {
      // Each cluster holding any data counts whole, once.
      let counted = -1;
      for await (const run of mappedExtents(subject, 0, subject.size)) {
        if (run.kind !== "data" || run.length === 0) continue;
        const first = Math.max(
          Math.floor(run.offset / clusterSize),
          counted + 1,
        );
        const last = Math.floor((run.offset + run.length - 1) / clusterSize);
        if (last >= first) {
          data += (last - first + 1) * clusterSize;
          counted = last;
        }
      }
    }
    const image = subject as Partial<Image>;
    if (
      s.version >= 3 && image.format === FORMAT &&
      image.details?.bitmaps === undefined
    ) {
      bitmaps = 0;
    }
  }
  if (preallocation === "full" || preallocation === "falloc") data = size;
  const fullyAllocated = luksBytes +
    preallocSize(size, clusterSize, s.refcountOrder, s.extendedL2);
  return {
    required: fullyAllocated - size + data,
    fullyAllocated,
    ...(bitmaps === undefined ? {} : { bitmaps }),
  };
}
