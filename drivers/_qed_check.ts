/**
 * `check` for QED images, as QEMU's `qed_check` (block/qed-check.c) does
 * it: every L2 table the L1 table points at and every data cluster an L2
 * table points at must be cluster aligned, past the header and inside the
 * file, and referenced once; clusters of the file nobody references are
 * leaks. With a repair (`-r leaks` or `-r all`, which QEMU treats alike
 * for QED) invalid offsets are cleared from the tables and, when nothing
 * is left broken, the need-check feature bit is cleared. Leaks are
 * counted, never repaired. No messages are printed, only the counts.
 *
 * Header fields (little-endian): magic `QED\0` at 0, cluster_size at 4,
 * table_size (clusters per table) at 8, header_size (clusters) at 12,
 * features at 16 (bit 1: need check), l1_table_offset at 40, image_size
 * at 48. Table entries are 64-bit offsets: 0 unallocated, 1 a zero
 * cluster.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { emptyCheckResult } from "./_check.ts";
import { formatErrors } from "./_binary.ts";
import { UnsupportedError } from "../streams/errors.ts";
import type { Sink, Source } from "../streams/types.ts";
import type { CheckResult } from "./qcow2/check.ts";

const FORMAT = "qed";
const MAGIC = 0x00444551; // "QED\0" little-endian
const NEED_CHECK = 2n;
/** Clusters of the file checked at most (the bitmap takes 1 bit each). */
const MAX_CLUSTERS = 2 ** 31;
const fail = formatErrors(FORMAT);

/**
 * Checks the tables of the QED image in `source` as `qemu-img check`
 * does, clearing invalid offsets through `sink` when it is given.
 *
 * @param source the image file
 * @param sink where repairs go (the same file), for `-r`
 * @returns what was found
 * @throws {ImageFormatError} for a header the check cannot start from
 *
 * @example
 * ```ts
 * import { checkQed } from "./_qed_check.ts";
 * import { fromBytes } from "../mod.ts";
 * try {
 *   await checkQed(fromBytes(new Uint8Array(64)));
 * } catch (e) {
 *   console.log((e as Error).message.startsWith("qed: magic")); // true
 * }
 * ```
 */
export async function checkQed(
  source: Source,
  sink?: Sink,
): Promise<CheckResult> {
  const fileSize = source.size;
  if (fileSize < 64) {
    throw fail("file size", fileSize, "at least 64 bytes (the header)");
  }
  const head = await source.read(0, 64);
  const hv = new DataView(head.buffer, head.byteOffset, head.length);
  if (hv.getUint32(0, true) !== MAGIC) {
    throw fail("magic", hv.getUint32(0, true), "QED\\0", 0);
  }
  const clusterSize = hv.getUint32(4, true);
  if (
    clusterSize < 4096 || clusterSize > 64 << 20 ||
    (clusterSize & (clusterSize - 1)) !== 0
  ) {
    throw fail("cluster_size", clusterSize, "a power of two from 4K to 64M", 4);
  }
  const tableSize = hv.getUint32(8, true);
  if (tableSize < 1 || tableSize > 16 || (tableSize & (tableSize - 1))) {
    throw fail("table_size", tableSize, "a power of two from 1 to 16", 8);
  }
  const headerSize = hv.getUint32(12, true);
  const features = hv.getBigUint64(16, true);
  const l1Offset = Number(hv.getBigUint64(40, true));
  const imageSize = Number(hv.getBigUint64(48, true));
  const tableBytes = tableSize * clusterSize;
  if (
    headerSize < 1 || l1Offset % clusterSize !== 0 ||
    l1Offset < headerSize * clusterSize || l1Offset + tableBytes > fileSize
  ) {
    throw fail(
      "l1_table_offset",
      l1Offset,
      `cluster aligned past the header, its ${tableBytes} bytes within the file's ${fileSize} bytes`,
      40,
    );
  }
  const nclusters = Math.ceil(fileSize / clusterSize);
  if (nclusters > MAX_CLUSTERS) {
    throw new UnsupportedError(
      { format: FORMAT, field: "file size", value: fileSize },
      `checking more than ${MAX_CLUSTERS} clusters is not supported`,
    );
  }
  const r = emptyCheckResult(FORMAT, Math.ceil(imageSize / clusterSize));
  const used = new Uint8Array(Math.ceil((nclusters + tableSize) / 8));
  /** Marks `n` clusters from `offset` used; false when one already was. */
  const setUsed = (offset: number, n: number) => {
    let twice = 0;
    for (let c = Math.floor(offset / clusterSize); n-- > 0; c++) {
      if (used[c >> 3] & (1 << (c & 7))) twice++;
      used[c >> 3] |= 1 << (c & 7);
    }
    r.corruptions += twice;
    return twice === 0;
  };
  const clusterOk = (offset: number) =>
    offset % clusterSize === 0 && offset >= headerSize * clusterSize &&
    offset < fileSize;
  const tableOk = (offset: number) =>
    clusterOk(offset) && clusterOk(offset + (tableSize - 1) * clusterSize);
  const entries = tableBytes / 8;

  setUsed(l1Offset, tableSize);
  const l1 = (await source.read(l1Offset, tableBytes)).slice();
  const l1v = new DataView(l1.buffer, l1.byteOffset, l1.length);
  let l1Invalid = 0;
  for (let i = 0; i < entries; i++) {
    const raw = l1v.getBigUint64(i * 8, true);
    if (raw === 0n) continue;
    const offset = Number(raw);
    if (raw >= 2n ** 53n || !tableOk(offset)) {
      if (sink) {
        l1v.setBigUint64(i * 8, 0n, true);
        r.corruptionsFixed++;
      } else r.corruptions++;
      l1Invalid++;
      continue;
    }
    if (!setUsed(offset, tableSize)) continue; // a table used twice
    const l2 = (await source.read(offset, tableBytes)).slice();
    const l2v = new DataView(l2.buffer, l2.byteOffset, l2.length);
    let l2Invalid = 0;
    let last = 0;
    for (let j = 0; j < entries; j++) {
      const entry = l2v.getBigUint64(j * 8, true);
      if (entry === 0n || entry === 1n) continue;
      r.allocatedClusters++;
      const at = entry >= 2n ** 53n ? -1 : Number(entry);
      if (last && last + clusterSize !== at) r.fragmentedClusters++;
      last = at;
      if (at < 0 || !clusterOk(at)) {
        if (sink) {
          l2v.setBigUint64(j * 8, 0n, true);
          r.corruptionsFixed++;
        } else r.corruptions++;
        l2Invalid++;
        continue;
      }
      setUsed(at, 1);
    }
    if (l2Invalid > 0 && sink) await sink.write(offset, l2);
  }
  if (l1Invalid > 0 && sink) await sink.write(l1Offset, l1);
  for (let c = headerSize; c < nclusters; c++) {
    if (!(used[c >> 3] & (1 << (c & 7)))) r.leaks++;
  }
  if (sink && !r.corruptions && !r.checkErrors && (features & NEED_CHECK)) {
    await sink.flush?.();
    const bytes = new Uint8Array(8);
    new DataView(bytes.buffer).setBigUint64(0, features & ~NEED_CHECK, true);
    await sink.write(16, bytes);
  }
  if (sink) await sink.flush?.();
  return r;
}
