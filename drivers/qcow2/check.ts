/**
 * Consistency check of qcow2 images, as `qemu-img check` does it: the
 * refcount every cluster should have is counted from the header, the L1
 * and L2 tables (the active ones and every snapshot's), the snapshot
 * table, the refcount table and blocks and the crypto header, then
 * compared with the stored refcounts. A cluster whose stored refcount is
 * too low is a corruption, one whose refcount is higher than its uses is
 * a leak. Leaks can be repaired by rewriting the stored refcounts.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { emptyCheckResult } from "../_check.ts";
import { UnsupportedError } from "../../streams/errors.ts";
import type { Sink, Source } from "../../streams/types.ts";
import { probe } from "../_registry.ts";
import { checkVdi } from "../_vdi_check.ts";
import { checkQed } from "../_qed_check.ts";
import {
  AUTOCLEAR,
  headBytes,
  type Header,
  INCOMPAT,
  l2EntriesOf,
  parseHeader,
} from "../qcow2.ts";
import {
  getRefcount,
  RefcountCounter,
  refcountStructures,
  setRefcount,
} from "./layout.ts";

const FORMAT = "qcow2";
const OFFSET_MASK = 0x00fffffffffffe00n;
const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;
const ZERO = 1n;
/** Bits 1-8 and 56-61 of a standard L2 entry. */
const STD_RESERVED = 0x3f000000000001fen;
/** Clusters of the file counted at most (a 2^26-entry table is 256 MiB). */
const MAX_CLUSTERS = 2 ** 26;
/** L1 and L2 tables kept after their first read. */
const TABLE_CACHE_BYTES = 64 << 20;

/** Options of {@linkcode checkImage}. */
export interface CheckOptions {
  /** The image's format; probed when not given. */
  format?: string;
  /**
   * Repair leaked clusters (qemu-img's `-r leaks`) by writing their
   * refcounts through `sink`.
   * @default false
   */
  repairLeaks?: boolean;
  /**
   * Repair refcount mismatches both ways, OFLAG_COPIED flags, and broken
   * refcount structures (rebuilt), as qemu-img's `-r all` does; implies
   * `repairLeaks`.
   * @default false
   */
  repairAll?: boolean;
  /** Where repairs are written: the same file as the source. */
  sink?: Sink;
}

/** What a check found, with qemu-img's `--output=json` names in comments. */
export interface CheckResult {
  /** `format` */
  format: string;
  /** `check-errors`: internal errors that kept the check from finishing. */
  checkErrors: number;
  /** `corruptions`: references the refcounts do not cover, broken tables. */
  corruptions: number;
  /** `leaks`: clusters with a refcount above their uses. */
  leaks: number;
  /** `leaks-fixed`: leaks repaired by this check. */
  leaksFixed: number;
  /** `corruptions-fixed`: corruptions repaired by this check. */
  corruptionsFixed: number;
  /** `image-end-offset`: the end of the last cluster in use. */
  imageEndOffset: number;
  /** `total-clusters`: clusters of the virtual disk. */
  totalClusters: number;
  /** `allocated-clusters` */
  allocatedClusters: number;
  /** `fragmented-clusters` */
  fragmentedClusters: number;
  /** `compressed-clusters` */
  compressedClusters: number;
  /** The problems found, one line each, as qemu-img prints them on stderr. */
  messages: string[];
}

const hex = (n: number | bigint) => n.toString(16);

/**
 * Checks a qcow2 image's refcounts against its tables, as `qemu-img
 * check` does, and optionally repairs leaked clusters.
 *
 * @param source the image file
 * @param options format, repair
 * @returns what was found (after a repair: what a second check found,
 *   with `leaksFixed` from the first)
 * @throws {UnsupportedError} with field `check` for formats without checks
 * @throws {ImageFormatError} for a header that cannot be read at all
 *
 * @example
 * ```ts
 * import { checkImage, create, fromBytes, memorySink } from "../../mod.ts";
 * const sink = memorySink();
 * await create("qcow2", sink, { size: 1 << 20 });
 * const result = await checkImage(fromBytes(sink.bytes()));
 * console.log(result.corruptions, result.leaks); // 0 0
 * ```
 */
export async function checkImage(
  source: Source,
  options: CheckOptions = {},
): Promise<CheckResult> {
  const format = options.format ?? (await probe(source))[0]?.format;
  if (format === "qed") {
    // qemu-img checks qed tables; -r leaks and -r all clear invalid
    // offsets alike, then check again.
    const repair = options.repairLeaks || options.repairAll;
    if (!repair) return await checkQed(source);
    const first = await checkQed(source, options.sink);
    if (first.corruptionsFixed === 0) return first;
    const second = await checkQed(source);
    second.corruptionsFixed = first.corruptionsFixed;
    return second;
  }
  if (format === "vdi" && !options.repairLeaks && !options.repairAll) {
    // qemu-img checks vdi block maps, and repairs nothing (-r: exit 63).
    return await checkVdi(source);
  }
  if (format !== FORMAT) {
    throw new UnsupportedError(
      { format: format ?? "unknown", field: "check" },
      "This image format does not support checks",
    );
  }
  const fix: Fix = {
    leaks: options.repairLeaks === true || options.repairAll === true,
    errors: options.repairAll === true,
  };
  if (!fix.leaks) return await checkOnce(source, undefined, NO_FIX);
  if (!options.sink) {
    throw new UnsupportedError(
      { format: FORMAT, field: "check" },
      "repairing needs a writable image (CheckOptions.sink)",
    );
  }
  const first = await checkOnce(source, options.sink, fix);
  if (first.leaksFixed === 0 && first.corruptionsFixed === 0) return first;
  const second = await checkOnce(source, undefined, NO_FIX);
  second.leaksFixed = first.leaksFixed;
  second.corruptionsFixed = first.corruptionsFixed;
  second.messages = [...first.messages, ...second.messages];
  return second;
}

/** What a pass may repair: leaks (`-r leaks`), and errors too (`-r all`). */
interface Fix {
  leaks: boolean;
  errors: boolean;
  /** After a rebuild: compare once, repairing, without a first report. */
  afterRebuild?: boolean;
}
const NO_FIX: Fix = { leaks: false, errors: false };

async function checkOnce(
  source: Source,
  sink: Sink | undefined,
  fix: Fix,
): Promise<CheckResult> {
  const fileSize = source.size;
  const first = await source.read(0, Math.min(24, fileSize));
  const bits = first.length >= 24
    ? new DataView(first.buffer, first.byteOffset).getUint32(20)
    : 9;
  const head = await source.read(
    0,
    headBytes(Math.min(Math.max(bits, 9), 21), fileSize),
  );
  const h = parseHeader(head, fileSize);
  const clusterSize = 2 ** h.clusterBits;
  const extended = (h.incompatible & INCOMPAT.extendedL2) !== 0n;
  const hasDataFile = (h.incompatible & INCOMPAT.dataFile) !== 0n;
  const entryBytes = extended ? 16 : 8;
  const l2Entries = l2EntriesOf(h);
  const width = 2 ** h.refcountOrder;
  const perBlock = (clusterSize * 8) / width;
  const refMax = width >= 32 ? 0xffffffff : 2 ** width - 1;
  const nbClusters = Math.ceil(fileSize / clusterSize);
  if (nbClusters + 1 > MAX_CLUSTERS) {
    throw new UnsupportedError(
      { format: FORMAT, field: "file size", value: fileSize },
      `checking more than ${MAX_CLUSTERS} clusters is not supported`,
    );
  }
  const r = emptyCheckResult(FORMAT, Math.ceil(h.size / clusterSize));
  const say = (line: string) => r.messages.push(line);
  // Expected refcounts; one spare cluster for a last cluster written short.
  const expected = new Uint32Array(nbClusters + 1);

  const inc = (offset: number, size: number) => {
    if (size <= 0) return;
    if (offset + size - fileSize >= clusterSize) {
      say(
        `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${
          hex(offset)
        } size 0x${hex(size)}`,
      );
      r.corruptions++;
      return;
    }
    const last = Math.floor((offset + size - 1) / clusterSize);
    for (let k = Math.floor(offset / clusterSize); k <= last; k++) {
      if (expected[k] >= refMax) {
        say(`ERROR: overflow cluster offset=0x${hex(k * clusterSize)}`);
        r.corruptions++;
        continue;
      }
      expected[k]++;
    }
  };

  // Tables read once each (up to TABLE_CACHE_BYTES): snapshots share L1
  // and L2 tables, and a crafted image could point at one table many times.
  const tables = new Map<string, Uint8Array>();
  let cached = 0;
  const readTable = async (offset: number, length: number) => {
    const key = `${offset}:${length}`;
    let t = tables.get(key);
    if (!t) {
      t = await source.read(offset, length);
      if (cached + length <= TABLE_CACHE_BYTES) {
        tables.set(key, t);
        cached += length;
      }
    }
    return t;
  };
  const readL1 = async (offset: number, size: number) =>
    size === 0 || offset + size * 8 > fileSize
      ? new Uint8Array(0)
      : await readTable(offset, size * 8);

  const checkL2 = async (at: number, active: boolean) => {
    const table = await readTable(at, clusterSize);
    const v = new DataView(table.buffer, table.byteOffset, table.length);
    let nextContiguous = 0;
    for (let j = 0; j < l2Entries; j++) {
      const entry = v.getBigUint64(j * entryBytes);
      const bitmap = extended ? v.getBigUint64(j * entryBytes + 8) : 0n;
      if (!(entry & COMPRESSED) && (entry & STD_RESERVED)) {
        say(`ERROR found l2 entry with reserved bits set: ${hex(entry)}`);
        r.corruptions++;
      }
      if (entry & COMPRESSED) {
        const csizeShift = BigInt(62 - (h.clusterBits - 8));
        const coffset = Number(entry & ((1n << csizeShift) - 1n));
        const sectors = Number(
          (entry >> csizeShift) & ((1n << BigInt(h.clusterBits - 8)) - 1n),
        ) + 1;
        if (entry & COPIED) {
          say(
            `ERROR: coffset=0x${
              hex(coffset)
            }: copied flag must never be set for compressed clusters`,
          );
          r.corruptions++;
        }
        if (bitmap) {
          say(
            `ERROR compressed cluster ${j} with non-zero subcluster allocation bitmap, entry=0x${
              hex(entry)
            }`,
          );
          r.corruptions++;
        }
        if (active) {
          r.allocatedClusters++;
          r.compressedClusters++;
          r.fragmentedClusters++;
        }
        inc(coffset, sectors * 512 - (coffset % 512));
        continue;
      }
      const offset = Number(entry & OFFSET_MASK);
      const zeroFlag = !extended && (entry & ZERO) !== 0n;
      const allocated = offset !== 0 ||
        (hasDataFile && (entry & COPIED) !== 0n);
      if (!allocated) {
        if (!zeroFlag && (bitmap & 0xffffffffn)) {
          say(
            "ERROR: Unallocated cluster has non-zero subcluster allocation bitmap",
          );
          r.corruptions++;
        }
        continue;
      }
      if ((bitmap >> 32n) & bitmap) {
        say(
          `ERROR offset=${
            hex(offset)
          }: Allocated cluster has corrupted subcluster allocation bitmap`,
        );
        r.corruptions++;
      }
      if (offset % clusterSize !== 0) {
        r.corruptions++;
        const data = extended ? (bitmap & 0xffffffffn) !== 0n : !zeroFlag;
        say(
          `ERROR offset=${hex(offset)}: ${
            data ? "Data" : "Preallocated"
          } cluster is not properly aligned; L2 entry corrupted.`,
        );
      }
      if (active) {
        r.allocatedClusters++;
        if (nextContiguous && offset !== nextContiguous) {
          r.fragmentedClusters++;
        }
        nextContiguous = offset + clusterSize;
      }
      if (!hasDataFile) inc(offset, clusterSize);
    }
  };

  const checkL1 = async (offset: number, size: number, active: boolean) => {
    inc(offset, size * 8);
    const l1 = await readL1(offset, size);
    const v = new DataView(l1.buffer, l1.byteOffset, l1.length);
    // An L2 table twice in one L1 table is walked once: the refcount of
    // the table itself shows the corruption, and the work stays bounded.
    const walked = new Set<number>();
    for (let i = 0; i < l1.length / 8; i++) {
      const l2 = Number(v.getBigUint64(i * 8) & OFFSET_MASK);
      if (l2 === 0) continue;
      inc(l2, clusterSize);
      if (l2 % clusterSize !== 0) {
        say(
          `ERROR l2_offset=${
            hex(l2)
          }: Table is not cluster aligned; L1 entry corrupted`,
        );
        r.corruptions++;
      }
      // qemu-img walks an unaligned table all the same.
      if (!walked.has(l2) && l2 + clusterSize <= fileSize) {
        walked.add(l2);
        await checkL2(l2, active);
      }
    }
  };

  /**
   * The bitmap directory, each bitmap's table and the clusters it points at.
   * Entries: table offset u64, table size u32, flags u32, type u8,
   * granularity u8, name size u16, extra data size u32, then extra data
   * and name, padded to 8 bytes.
   */
  const countBitmaps = async () => {
    const { directoryOffset, directorySize, count } = h.bitmaps!;
    inc(directoryOffset, directorySize);
    if (directoryOffset + directorySize > fileSize) return;
    const dir = await source.read(directoryOffset, directorySize);
    const dv = new DataView(dir.buffer, dir.byteOffset, dir.length);
    let at = 0;
    for (let i = 0; i < count && at + 24 <= dir.length; i++) {
      const tableOffset = Number(dv.getBigUint64(at));
      const tableSize = dv.getUint32(at + 8);
      inc(tableOffset, tableSize * 8);
      if (tableOffset + tableSize * 8 <= fileSize) {
        const t = await source.read(tableOffset, tableSize * 8);
        const tv = new DataView(t.buffer, t.byteOffset, t.length);
        for (let k = 0; k < tableSize; k++) {
          const data = Number(tv.getBigUint64(k * 8) & OFFSET_MASK);
          if (data !== 0) inc(data, clusterSize);
        }
      }
      at += Math.ceil(
        (24 + dv.getUint32(at + 20) + dv.getUint16(at + 18)) / 8,
      ) * 8;
    }
  };

  inc(0, clusterSize);
  await checkL1(h.l1TableOffset, h.l1Size, true);
  if (hasDataFile && h.nbSnapshots) {
    say(`ERROR ${h.nbSnapshots} snapshots in image with data file`);
    r.corruptions++;
  }
  // The snapshot table: entries of 40 bytes plus extra data, ID and name.
  let at = h.snapshotsOffset;
  for (let i = 0; i < h.nbSnapshots; i++) {
    if (at + 40 > fileSize) {
      throw new UnsupportedError(
        { format: FORMAT, field: "snapshot table", value: at },
        `snapshot ${i} lies past the end of the file`,
      );
    }
    const e = await source.read(at, 40);
    const v = new DataView(e.buffer, e.byteOffset, 40);
    const l1Offset = Number(v.getBigUint64(0));
    const l1Size = v.getUint32(8);
    const idSize = v.getUint16(12);
    const nameSize = v.getUint16(14);
    const extra = v.getUint32(36);
    const name = async () => {
      const t = await source.read(
        at + 40 + extra,
        Math.min(idSize + nameSize, Math.max(0, fileSize - at - 40 - extra)),
      );
      const d = new TextDecoder();
      return `${d.decode(t.subarray(0, idSize))} (${
        d.decode(t.subarray(idSize))
      })`;
    };
    if (l1Offset % clusterSize !== 0) {
      say(
        `ERROR snapshot ${await name()} l1_offset=0x${
          hex(l1Offset)
        }: L1 table is not cluster aligned; snapshot table entry corrupted`,
      );
      r.corruptions++;
    } else if (l1Size > (32 << 20) / 8) {
      say(
        `ERROR snapshot ${await name()} l1_size=0x${
          hex(l1Size)
        }: L1 table is too large; snapshot table entry corrupted`,
      );
      r.corruptions++;
    } else await checkL1(l1Offset, l1Size, false);
    at += Math.ceil((40 + extra + idSize + nameSize) / 8) * 8;
  }
  inc(h.snapshotsOffset, at - h.snapshotsOffset);
  inc(h.refcountTableOffset, h.refcountTableClusters * clusterSize);
  if (h.crypto) inc(h.crypto.offset, h.crypto.length);
  if (h.bitmaps && (h.autoclear & AUTOCLEAR.bitmaps)) await countBitmaps();

  // The refcount blocks.
  let rebuild = false;
  const refTable = await source.read(
    h.refcountTableOffset,
    h.refcountTableClusters * clusterSize,
  );
  const rt = new DataView(refTable.buffer, refTable.byteOffset);
  const tableEntries = refTable.length / 8;
  for (let i = 0; i < tableEntries; i++) {
    const raw = rt.getBigUint64(i * 8);
    const offset = Number(raw & ~0x1ffn);
    if (raw & 0x1ffn) {
      say(`ERROR refcount table entry ${i} has reserved bits set`);
      r.corruptions++;
      rebuild = true;
      continue;
    }
    if (offset % clusterSize !== 0) {
      say(
        `ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`,
      );
      r.corruptions++;
      rebuild = true;
      continue;
    }
    if (offset / clusterSize >= nbClusters) {
      say(`ERROR refcount block ${i} is outside image`);
      r.corruptions++;
      rebuild = true;
      continue;
    }
    if (offset !== 0) {
      inc(offset, clusterSize);
      const n = expected[offset / clusterSize];
      if (n !== 1) {
        say(`ERROR refcount block ${i} refcount=${n}`);
        r.corruptions++;
        rebuild = true;
      }
    }
  }

  // The stored refcounts, block by block.
  const blocks = new Map<number, Uint8Array | null>();
  const stored = async (index: number): Promise<number | undefined> => {
    const t = Math.floor(index / perBlock);
    if (t >= tableEntries) return 0;
    const offset = Number(rt.getBigUint64(t * 8) & ~0x1ffn);
    if (offset === 0) return 0;
    let b = blocks.get(offset);
    if (b === undefined) {
      b = offset % clusterSize === 0 && offset + clusterSize <= fileSize
        ? (await source.read(offset, clusterSize)).slice()
        : null;
      blocks.set(offset, b);
    }
    if (b === null) return undefined;
    return getRefcount(b, index % perBlock, width);
  };

  /** Stored against expected refcounts, repairing what `pass` allows. */
  const compare = async (pass: Fix) => {
    let highest = 0;
    for (let i = 0; i < nbClusters; i++) {
      const have = await stored(i);
      if (have === undefined) {
        say(`Can't get refcount for cluster ${i}: Input/output error`);
        r.checkErrors++;
        continue;
      }
      const want = expected[i];
      if (have > 0 || want > 0) highest = i;
      if (have === want) continue;
      let fixed: "leaksFixed" | "corruptionsFixed" | undefined;
      if (have === 0) rebuild = true;
      else if (have > want && pass.leaks) fixed = "leaksFixed";
      else if (have < want && pass.errors) fixed = "corruptionsFixed";
      say(
        `${
          fixed ? "Repairing" : have < want ? "ERROR" : "Leaked"
        } cluster ${i} refcount=${have} reference=${want}`,
      );
      if (fixed && sink) {
        const t = Math.floor(i / perBlock);
        const offset = Number(rt.getBigUint64(t * 8) & ~0x1ffn);
        const b = blocks.get(offset)!;
        const k = i % perBlock;
        setRefcount(b, k, width, want);
        const byte = Math.floor((k * width) / 8);
        const from = byte - byte % 8;
        await sink.write(offset + from, b.slice(from, from + 8));
        r[fixed]++;
        continue;
      }
      if (have < want) r.corruptions++;
      else r.leaks++;
    }
    return highest;
  };

  // As qemu-img: a first pass reports; a repair compares again, fixing.
  const corruptionsBefore = r.corruptions;
  let highest = await compare(
    fix.afterRebuild ? { leaks: true, errors: false } : NO_FIX,
  );
  /** Clears the dirty and corrupt bits of an image found clean, as qemu does. */
  const markClean = async (result: CheckResult) => {
    if (
      sink && !result.checkErrors && !result.corruptions && h.version >= 3 &&
      (h.incompatible & (INCOMPAT.dirty | INCOMPAT.corrupt))
    ) {
      const bits = new Uint8Array(8);
      new DataView(bits.buffer).setBigUint64(
        0,
        h.incompatible & ~(INCOMPAT.dirty | INCOMPAT.corrupt),
      );
      await sink.write(72, bits);
      await sink.flush?.();
    }
  };
  if (sink && rebuild && fix.errors && !fix.afterRebuild) {
    say("Rebuilding refcount structure");
    const before = { corruptions: r.corruptions, leaks: r.leaks };
    await rebuildRefcounts(source, sink, h, expected);
    // The old structures are leaked now: the recount repairs them.
    const again = await checkOnce(source, sink, {
      leaks: true,
      errors: true,
      afterRebuild: true,
    });
    again.messages = [...r.messages, ...again.messages];
    const fresh = again.leaks;
    again.corruptionsFixed += Math.max(
      0,
      before.corruptions - again.corruptions,
    );
    again.leaksFixed = Math.max(0, before.leaks - again.leaks);
    again.leaks = fresh;
    await markClean(again);
    return again;
  }
  if (sink && (fix.leaks || fix.errors) && !fix.afterRebuild) {
    if (rebuild) {
      say("ERROR need to rebuild refcount structures");
      r.checkErrors++;
      return r;
    }
    if (r.leaks || r.corruptions) {
      r.leaks = 0;
      r.corruptions = corruptionsBefore;
      highest = await compare(fix);
    }
  }
  if (sink && (r.leaksFixed || r.corruptionsFixed)) await sink.flush?.();

  // OFLAG_COPIED: set exactly where the stored refcount is 1. qemu-img
  // repairs the flags with -r all, and with -r leaks on an image otherwise
  // clean.
  const repairFlags = sink !== undefined &&
    (fix.errors ||
      (fix.leaks && !r.checkErrors && !r.corruptions && !r.leaks));
  const l1 = (await readL1(h.l1TableOffset, h.l1Size)).slice();
  const v1 = new DataView(l1.buffer, l1.byteOffset, l1.length);
  const seen = new Set<number>();
  for (let i = 0; i < l1.length / 8; i++) {
    const entry = v1.getBigUint64(i * 8);
    const l2 = Number(entry & OFFSET_MASK);
    if (l2 === 0) continue;
    const n = await stored(Math.floor(l2 / clusterSize));
    if (n === undefined) continue;
    if ((n === 1) !== ((entry & COPIED) !== 0n)) {
      say(
        `${
          repairFlags ? "Repairing" : "ERROR"
        } OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${
          hex(entry)
        } refcount=${n}`,
      );
      if (repairFlags) {
        v1.setBigUint64(i * 8, n === 1 ? entry | COPIED : entry & ~COPIED);
        await sink.write(h.l1TableOffset + i * 8, l1.slice(i * 8, i * 8 + 8));
        r.corruptionsFixed++;
      } else r.corruptions++;
    }
    if (
      l2 % clusterSize !== 0 || l2 + clusterSize > fileSize || seen.has(l2)
    ) continue;
    seen.add(l2);
    const table = (await readTable(l2, clusterSize)).slice();
    const v = new DataView(table.buffer, table.byteOffset, table.length);
    for (let j = 0; j < l2Entries; j++) {
      const e = v.getBigUint64(j * entryBytes);
      if (e & COMPRESSED) continue;
      const offset = Number(e & OFFSET_MASK);
      const normal = offset !== 0 || (hasDataFile && (e & COPIED) !== 0n);
      if (!normal) continue;
      const count = hasDataFile ? 1 : await stored(
        Math.floor(offset / clusterSize),
      );
      if (count === undefined) continue;
      if ((count === 1) !== ((e & COPIED) !== 0n)) {
        say(
          `${
            repairFlags ? "Repairing" : "ERROR"
          } OFLAG_COPIED data cluster: l2_entry=${hex(e)} refcount=${count}`,
        );
        if (repairFlags) {
          v.setBigUint64(
            j * entryBytes,
            count === 1 ? e | COPIED : e & ~COPIED,
          );
          const at = j * entryBytes;
          await sink.write(l2 + at, table.slice(at, at + 8));
          r.corruptionsFixed++;
        } else r.corruptions++;
      }
    }
    tables.set(`${l2}:${clusterSize}`, table);
  }
  if (!fix.afterRebuild) await markClean(r);
  r.imageEndOffset = (highest + 1) * clusterSize;
  return r;
}

/**
 * Replaces the refcount table and blocks of the image by new ones holding
 * `expected`, written past the end of the file (counting themselves and,
 * still, the old structures, which the recount then finds leaked).
 */
async function rebuildRefcounts(
  source: Source,
  sink: Sink,
  h: Header,
  expected: Uint32Array,
) {
  const clusterSize = 2 ** h.clusterBits;
  const counter = new RefcountCounter(h.refcountOrder);
  for (let k = 0; k < expected.length; k++) {
    for (let c = Math.min(expected[k], counter.max); c > 0; c--) counter.add(k);
  }
  const first = Math.ceil(source.size / clusterSize);
  const built = refcountStructures(counter, h.clusterBits, first);
  await sink.write(first * clusterSize, built.bytes);
  await sink.flush?.();
  const fields = new Uint8Array(12);
  const v = new DataView(fields.buffer);
  v.setBigUint64(0, BigInt(built.tableOffset));
  v.setUint32(8, built.tableClusters);
  await sink.write(48, fields);
  await sink.flush?.();
}

/**
 * The result as qemu-img's `--output=json` object (keys it omits when
 * zero are omitted here too).
 *
 * @param result a check's result
 * @param filename the image's name
 * @returns the JSON object
 *
 * @example
 * ```ts
 * import {
 *   checkImage,
 *   checkJson,
 *   create,
 *   fromBytes,
 *   memorySink,
 * } from "../../mod.ts";
 * const sink = memorySink();
 * await create("qcow2", sink, { size: 1 << 20 });
 * const json = checkJson(await checkImage(fromBytes(sink.bytes())), "x.qcow2");
 * console.log(json["check-errors"], json["total-clusters"]); // 0 16
 * ```
 */
export function checkJson(
  result: CheckResult,
  filename: string,
): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const put = (key: string, value: number) => {
    if (value !== 0) out[key] = value;
  };
  put("image-end-offset", result.imageEndOffset);
  put("total-clusters", result.totalClusters);
  out["check-errors"] = result.checkErrors;
  put("leaks", result.leaks);
  put("leaks-fixed", result.leaksFixed);
  put("corruptions-fixed", result.corruptionsFixed);
  put("corruptions", result.corruptions);
  put("allocated-clusters", result.allocatedClusters);
  put("fragmented-clusters", result.fragmentedClusters);
  put("compressed-clusters", result.compressedClusters);
  out.filename = filename;
  out.format = result.format;
  return out;
}

/**
 * The result as qemu-img prints it for humans.
 *
 * @param result a check's result
 * @returns the text, lines ending in newlines
 *
 * @example
 * ```ts
 * import {
 *   checkHuman,
 *   checkImage,
 *   create,
 *   fromBytes,
 *   memorySink,
 * } from "../../mod.ts";
 * const sink = memorySink();
 * await create("qcow2", sink, { size: 1 << 20 });
 * console.log(checkHuman(await checkImage(fromBytes(sink.bytes()))).split("\n")[0]);
 * // No errors were found on the image.
 * ```
 */
export function checkHuman(result: CheckResult): string {
  let s = "";
  if (result.leaksFixed || result.corruptionsFixed) {
    s +=
      `The following inconsistencies were found and repaired:\n\n    ${result.leaksFixed} leaked clusters\n    ${result.corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`;
  }
  if (!(result.corruptions || result.leaks || result.checkErrors)) {
    s += "No errors were found on the image.\n";
  } else {
    if (result.corruptions) {
      s +=
        `\n${result.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    }
    if (result.leaks) {
      s +=
        `\n${result.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    }
    if (result.checkErrors) {
      s +=
        `\n${result.checkErrors} internal errors have occurred during the check.\n`;
    }
  }
  const { totalClusters: t, allocatedClusters: a } = result;
  if (t !== 0 && a !== 0) {
    const pct = (n: number, d: number) => (n * 100 / d).toFixed(2);
    s += `${a}/${t} = ${pct(a, t)}% allocated, ${
      pct(result.fragmentedClusters, a)
    }% fragmented, ${pct(result.compressedClusters, a)}% compressed clusters\n`;
  }
  if (result.imageEndOffset) {
    s += `Image end offset: ${result.imageEndOffset}\n`;
  }
  return s;
}

/**
 * qemu-img check's exit code for a result: 1 internal errors, 2
 * corruptions, 3 leaks only, 0 clean.
 *
 * @param result a check's result
 * @returns the exit code
 *
 * @example
 * ```ts
 * import {
 *   checkExitCode,
 *   checkImage,
 *   create,
 *   fromBytes,
 *   memorySink,
 * } from "../../mod.ts";
 * const sink = memorySink();
 * await create("qcow2", sink, { size: 1 << 20 });
 * console.log(checkExitCode(await checkImage(fromBytes(sink.bytes())))); // 0
 * ```
 */
export function checkExitCode(result: CheckResult): number {
  if (result.checkErrors) return 1;
  if (result.corruptions) return 2;
  if (result.leaks) return 3;
  return 0;
}
