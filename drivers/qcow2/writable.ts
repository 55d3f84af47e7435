/**
 * Writable qcow2: `create`, and writes to an opened image that allocate
 * clusters (and L2 tables, refcount blocks, a bigger refcount table when
 * the file outgrows it) at the end of the file, keeping every refcount
 * exact so that `qemu-img check` finds no leak.
 *
 * This module is browser compatible.
 *
 * What a write does to the cluster it lands in: a standard cluster whose
 * refcount is one is written in place; an unallocated or zero cluster gets
 * a new cluster (zeros around the bytes written, or with extended L2 only
 * the subclusters written, marked allocated); a compressed cluster is
 * inflated into a new cluster and its old host clusters lose a reference.
 * Clusters and L2 tables shared with an internal snapshot (their "copied"
 * flag clear: a refcount above one) are copied first, as QEMU does: the
 * write goes to the copy, the shared one loses a reference, and what the
 * snapshot reads never changes.
 *
 * @module
 */

import { alignUp, setBe32, setBe64 } from "../_binary.ts";
import {
  readBackSource,
  requireRandomAccess,
  serializedWrites,
  type WriteQueue,
} from "../_image.ts";
import { UnsupportedError } from "../../streams/errors.ts";
import type {
  CreateSpec,
  Image,
  SectorCipher,
  Sink,
  Source,
} from "../../streams/types.ts";
import { checkRange } from "../../streams/types.ts";
import {
  getRefcount,
  headerCluster,
  l1SizeFor,
  newLuks,
  qcow2Settings,
  RefcountCounter,
  refcountStructures,
  setRefcount,
} from "./layout.ts";
import { encodeQcow2 } from "./encode.ts";
import { createWithDataFile } from "./data_file.ts";
import {
  INCOMPAT,
  l1Entry,
  l2Table,
  openState,
  qcow2Image,
  type State,
} from "../qcow2.ts";

const FORMAT = "qcow2";
const SECTOR = 512;
const COPIED_HIGH = 0x80000000;

/** What the allocator keeps of the refcount structures. */
export interface Refcounts {
  table: Uint8Array;
  tableOffset: number;
  width: number;
  perBlock: number;
  blocks: Map<number, Uint8Array>;
  nextFree: number;
}

/**
 * Refuses, with an `UnsupportedError`, an image this driver cannot change
 * safely: corrupt or dirty (refcounts not to be trusted), with internal
 * snapshots (shared clusters), an external data file, or opened at a
 * snapshot.
 *
 * @param state an opened image's state
 * @param what what was asked (`write`, `resize`)
 * @throws {UnsupportedError} naming the reason
 */
export function refuseUnwritable(state: State, what = "write"): void {
  const h = state.header;
  const refuse = (why: string) => {
    throw new UnsupportedError({ format: FORMAT }, `cannot ${what}: ${why}`);
  };
  if (h.incompatible & INCOMPAT.corrupt) {
    refuse("the image is marked corrupt (run qemu-img check -r all)");
  }
  if (h.incompatible & INCOMPAT.dirty) {
    // openQcow2 repairs a dirty image before this; one left dirty is not
    // written.
    refuse(
      "the image is dirty, its refcounts may be wrong (run check -r all)",
    );
  }
  if (state.hasDataFile) refuse("the image has an external data file");
  if (state.details.snapshot !== undefined) refuse("a snapshot is read-only");
}

/**
 * The refcount table of `state`'s image, read, with new clusters to be
 * allocated at the end of the file.
 *
 * @param state an opened image's state
 * @returns what {@linkcode allocate} and {@linkcode setRefcountOf} keep
 */
export async function openRefcounts(state: State): Promise<Refcounts> {
  const h = state.header;
  const clusterSize = state.clusterSize;
  const tableBytes = h.refcountTableClusters * clusterSize;
  return {
    table: (await state.source.read(h.refcountTableOffset, tableBytes)).slice(),
    tableOffset: h.refcountTableOffset,
    width: 2 ** h.refcountOrder,
    perBlock: (clusterSize * 8) / 2 ** h.refcountOrder,
    blocks: new Map(),
    nextFree: alignUp(state.source.size, clusterSize),
  };
}

/**
 * Makes the views of `state` writable through `sink` (the same file).
 *
 * @param state an opened image's state
 * @param sink where its writes go
 * @throws {UnsupportedError} for images this driver cannot write safely
 */
export async function makeWritable(state: State, sink: Sink): Promise<void> {
  refuseUnwritable(state);
  const h = state.header;
  const refcounts = await openRefcounts(state);
  const queue: WriteQueue = { writing: Promise.resolve() };
  let headerCleared = h.autoclear === 0n;
  state.writable = (image, cipher) =>
    Object.assign(
      image,
      serializedWrites(queue, sink, async (offset, bytes) => {
        if (!headerCleared) {
          // Bitmaps (and unknown auto-clear features) are not kept up to
          // date by these writes: their bits are cleared, as the spec asks.
          await sink.write(88, new Uint8Array(8));
          h.autoclear = 0n;
          headerCleared = true;
        }
        await writeImage(state, sink, refcounts, image, cipher, offset, bytes);
      }),
    );
}

/** The offset in a refcount table entry (bits 9-63). */
function tableEntry(r: Refcounts, index: number): number {
  if (index * 8 >= r.table.length) return 0;
  const v = new DataView(r.table.buffer, r.table.byteOffset);
  return v.getUint32(index * 8) * 2 ** 32 +
    ((v.getUint32(index * 8 + 4) & 0xfffffe00) >>> 0);
}

/** The refcount block at `at` (cached; read from the file once). */
async function block(
  state: State,
  r: Refcounts,
  at: number,
): Promise<Uint8Array> {
  let b = r.blocks.get(at);
  if (!b) {
    b = (await state.source.read(at, state.clusterSize)).slice();
    r.blocks.set(at, b);
  }
  return b;
}

/** The refcount of cluster `index` (0 past the table). */
export async function refcountOf(
  state: State,
  r: Refcounts,
  index: number,
): Promise<number> {
  const at = tableEntry(r, Math.floor(index / r.perBlock));
  if (at === 0) return 0;
  return getRefcount(await block(state, r, at), index % r.perBlock, r.width);
}

/** Sets the refcount of cluster `index`, allocating what it needs. */
export async function setRefcountOf(
  state: State,
  sink: Sink,
  r: Refcounts,
  index: number,
  value: number,
): Promise<void> {
  const clusterSize = state.clusterSize;
  const tableIndex = Math.floor(index / r.perBlock);
  if ((tableIndex + 1) * 8 > r.table.length) {
    await growTable(state, sink, r, tableIndex);
  }
  let at = tableEntry(r, tableIndex);
  if (at === 0) {
    at = r.nextFree;
    r.nextFree += clusterSize;
    const fresh = new Uint8Array(clusterSize);
    r.blocks.set(at, fresh);
    await sink.write(at, fresh);
    const entry = new Uint8Array(8);
    setBe64(entry, 0, at);
    r.table.set(entry, tableIndex * 8);
    await sink.write(r.tableOffset + tableIndex * 8, entry);
    await setRefcountOf(state, sink, r, at / clusterSize, 1);
  }
  const b = await block(state, r, at);
  const i = index % r.perBlock;
  const max = r.width >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** r.width - 1;
  if (value < 0 || value > max) {
    throw new UnsupportedError(
      { format: FORMAT, field: "refcount", value },
      `refcount of cluster ${index} out of the ${r.width}-bit range`,
    );
  }
  setRefcount(b, i, r.width, value);
  // The 8 bytes around the entry (whole entries for every width).
  const byte = Math.floor((i * r.width) / 8);
  const from = byte - byte % 8;
  await sink.write(at + from, b.slice(from, from + 8));
}

/** Moves the refcount table to the end of the file, big enough for `tableIndex`. */
async function growTable(
  state: State,
  sink: Sink,
  r: Refcounts,
  tableIndex: number,
) {
  const clusterSize = state.clusterSize;
  const oldAt = r.tableOffset;
  const oldClusters = r.table.length / clusterSize;
  // Room for the entry wanted, the new table and blocks for all of it.
  let clusters = Math.max(oldClusters * 2, 1);
  while (clusters * clusterSize / 8 <= tableIndex + 2) clusters *= 2;
  if (clusters * clusterSize > 8 << 20) {
    throw new UnsupportedError(
      { format: FORMAT, field: "refcount table", value: clusters },
      "the refcount table would pass QEMU's 8 MiB limit",
    );
  }
  const at = r.nextFree;
  r.nextFree += clusters * clusterSize;
  const table = new Uint8Array(clusters * clusterSize);
  table.set(r.table);
  await sink.write(at, table);
  r.table = table;
  r.tableOffset = at;
  const fields = new Uint8Array(12);
  setBe64(fields, 0, at);
  setBe32(fields, 8, clusters);
  await sink.write(48, fields);
  await sink.flush();
  state.header.refcountTableOffset = at;
  state.header.refcountTableClusters = clusters;
  for (let k = 0; k < clusters; k++) {
    await setRefcountOf(state, sink, r, at / clusterSize + k, 1);
  }
  for (let k = 0; k < oldClusters; k++) {
    await setRefcountOf(state, sink, r, oldAt / clusterSize + k, 0);
  }
}

/** Cluster `index` loses one reference (a shared copy was replaced). */
export async function release(
  state: State,
  sink: Sink,
  r: Refcounts,
  index: number,
): Promise<void> {
  const count = await refcountOf(state, r, index);
  if (count > 0) await setRefcountOf(state, sink, r, index, count - 1);
}

/** A new cluster at the end of the file, its refcount one. */
export async function allocate(
  state: State,
  sink: Sink,
  r: Refcounts,
): Promise<number> {
  const at = r.nextFree;
  r.nextFree += state.clusterSize;
  await setRefcountOf(state, sink, r, at / state.clusterSize, 1);
  return at;
}

/** Writes `bytes` at virtual `offset` of the image (any range). */
async function writeImage(
  state: State,
  sink: Sink,
  r: Refcounts,
  image: Image,
  cipher: SectorCipher | undefined,
  offset: number,
  bytes: Uint8Array,
) {
  checkRange(state.size, offset, bytes.length);
  if (state.header.cryptMethod !== 0 && !cipher) {
    throw new UnsupportedError(
      { format: FORMAT },
      "the image is encrypted: unlock it with its passphrase before writing",
    );
  }
  state.inflated = undefined;
  const clusterSize = state.clusterSize;
  for (let at = offset; at < offset + bytes.length;) {
    const clusterStart = at - at % clusterSize;
    const stop = Math.min(offset + bytes.length, clusterStart + clusterSize);
    await writeCluster(
      state,
      sink,
      r,
      image,
      cipher,
      clusterStart,
      at - clusterStart,
      bytes.subarray(at - offset, stop - offset),
    );
    at = stop;
  }
}

/** Encrypts `buffer` (whole sectors) to be stored at `host` for guest `guest`. */
async function encryptFor(
  state: State,
  cipher: SectorCipher | undefined,
  buffer: Uint8Array,
  host: number,
  guest: number,
) {
  if (!cipher) return;
  const first = state.encryption!.physical ? host : guest;
  await cipher.encrypt(first / SECTOR, buffer);
}

async function writeCluster(
  state: State,
  sink: Sink,
  r: Refcounts,
  image: Image,
  cipher: SectorCipher | undefined,
  clusterStart: number,
  within: number,
  bytes: Uint8Array,
) {
  const clusterSize = state.clusterSize;
  const span = clusterSize * state.l2Entries;
  const l1Index = Math.floor(clusterStart / span);
  let tableAt = l1Entry(state, l1Index);
  if (tableAt === 0) {
    tableAt = await allocate(state, sink, r);
    const table = new Uint8Array(clusterSize);
    await sink.write(tableAt, table);
    state.l2Cache.set(tableAt, table);
    const entry = new Uint8Array(8);
    setBe64(entry, 0, tableAt);
    entry[0] |= 0x80; // copied: refcount one
    state.l1.set(entry, l1Index * 8);
    await sink.write(state.l1Offset + l1Index * 8, entry);
  } else if ((state.l1[l1Index * 8] & 0x80) === 0) {
    // The L2 table is shared with a snapshot: this layer gets its own copy
    // (the data clusters keep their refcounts: the copy and the snapshot's
    // table refer to them, as the two tables did).
    const shared = await l2Table(state, tableAt);
    const copy = shared.slice();
    const at = await allocate(state, sink, r);
    await sink.write(at, copy);
    state.l2Cache.set(at, copy);
    const entry = new Uint8Array(8);
    setBe64(entry, 0, at);
    entry[0] |= 0x80;
    state.l1.set(entry, l1Index * 8);
    await sink.write(state.l1Offset + l1Index * 8, entry);
    await release(state, sink, r, tableAt / clusterSize);
    tableAt = at;
  }
  const table = await l2Table(state, tableAt);
  const v = new DataView(table.buffer, table.byteOffset, table.length);
  const index = (clusterStart / clusterSize) % state.l2Entries;
  const e = index * state.entryBytes;
  const high = v.getUint32(e);
  const low = v.getUint32(e + 4);
  let host = (high & 0x00ffffff) * 2 ** 32 + ((low & 0xfffffe00) >>> 0);
  const compressed = (high & 0x40000000) !== 0;
  const copied = (high & COPIED_HIGH) !== 0;
  const zeroFlag = (low & 1) !== 0;
  const end = within + bytes.length;

  const setEntry = async (
    at: number,
    allocBits?: number,
    zeroBits?: number,
  ) => {
    const entry = new Uint8Array(state.entryBytes);
    setBe64(entry, 0, at);
    entry[0] |= 0x80;
    if (state.extendedL2) {
      setBe32(entry, 8, zeroBits ?? 0);
      setBe32(entry, 12, allocBits ?? 0xffffffff);
    }
    table.set(entry, e);
    await sink.write(tableAt + e, entry);
  };

  if (!compressed && host !== 0 && !copied) {
    // Shared with a snapshot: copied to a cluster of this layer's own
    // (raw, re-encrypted where LUKS numbers sectors by host offset), the
    // shared one losing a reference. A preallocated zero cluster needs
    // no bytes: the write below fills the new one whole.
    const fresh = await allocate(state, sink, r);
    if (state.extendedL2 || !zeroFlag) {
      const old = await state.source.read(
        host,
        Math.min(clusterSize, state.source.size - host),
      );
      if (cipher && state.encryption!.physical) {
        await cipher.decrypt(host / SECTOR, old);
        await cipher.encrypt(fresh / SECTOR, old);
      }
      await sink.write(fresh, old);
    }
    await release(state, sink, r, host / clusterSize);
    host = fresh;
    if (state.extendedL2) {
      await setEntry(fresh, v.getUint32(e + 12), v.getUint32(e + 8));
    } else if (!zeroFlag) await setEntry(fresh);
  }

  if (state.extendedL2 && !compressed) {
    // Only the subclusters written: whole, zeros around the bytes where a
    // subcluster was not allocated before.
    const sub = state.subclusterSize;
    const first = Math.floor(within / sub);
    const last = Math.floor((end - 1) / sub);
    let zeroBits = v.getUint32(e + 8);
    let allocBits = v.getUint32(e + 12);
    const at = host !== 0 ? host : await allocate(state, sink, r);
    for (let k = first; k <= last; k++) {
      const bit = 2 ** k;
      const from = Math.max(within, k * sub);
      const to = Math.min(end, (k + 1) * sub);
      const part = bytes.subarray(from - within, to - within);
      if ((allocBits & bit) !== 0 && !cipher) {
        await sink.write(at + from, part);
        continue;
      }
      const buffer = (allocBits & bit) !== 0
        ? await image.read(clusterStart + k * sub, sub)
        : new Uint8Array(sub);
      buffer.set(part, from - k * sub);
      await encryptFor(
        state,
        cipher,
        buffer,
        at + k * sub,
        clusterStart + k * sub,
      );
      await sink.write(at + k * sub, buffer);
      allocBits = (allocBits | bit) >>> 0;
      zeroBits = (zeroBits & ~bit) >>> 0;
    }
    await setEntry(at, allocBits, zeroBits);
    return;
  }

  if (!compressed && host !== 0 && !zeroFlag) {
    // In place.
    if (!cipher) {
      await sink.write(host + within, bytes);
      return;
    }
    const from = within - within % SECTOR;
    const to = alignUp(end, SECTOR);
    const buffer = from === within && to === end
      ? bytes.slice()
      : await image.read(clusterStart + from, to - from);
    buffer.set(bytes, within - from);
    await encryptFor(state, cipher, buffer, host + from, clusterStart + from);
    await sink.write(host + from, buffer);
    return;
  }

  // A new cluster (or the preallocated one of a zero cluster): whole.
  const buffer = compressed
    ? await image.read(
      clusterStart,
      Math.min(clusterSize, state.size - clusterStart),
    )
    : new Uint8Array(clusterSize);
  const whole = new Uint8Array(clusterSize);
  whole.set(buffer);
  whole.set(bytes, within);
  const at = host !== 0 && !compressed ? host : await allocate(state, sink, r);
  await encryptFor(state, cipher, whole, at, clusterStart);
  await sink.write(at, whole);
  await setEntry(at);
  if (compressed) {
    // The old compressed bytes' host clusters lose one reference each.
    const x = 62 - (state.header.clusterBits - 8);
    const entry = (BigInt(high & 0x3fffffff) << 32n) | BigInt(low);
    const offset = Number(entry & ((1n << BigInt(x)) - 1n));
    const sectors = Number(entry >> BigInt(x)) + 1;
    const last = Math.floor(
      (offset - offset % SECTOR + sectors * SECTOR - 1) / clusterSize,
    );
    for (let k = Math.floor(offset / clusterSize); k <= last; k++) {
      const count = await refcountOf(state, r, k);
      if (count > 0) await setRefcountOf(state, sink, r, k, count - 1);
    }
  }
}

/**
 * Creates an empty qcow2 on `sink` and opens it writable: the header
 * cluster, the LUKS header when encrypting, the L1 table, the refcounts.
 *
 * @param sink a random-access sink that can read back
 * @param spec size, backing file and format, key, `-o` options
 * @returns the new image, writable
 */
export async function createQcow2(
  sink: Sink,
  spec: CreateSpec,
): Promise<Image> {
  requireRandomAccess(sink, FORMAT, "qcow2 images");
  const s = qcow2Settings(spec.options, spec.key);
  if (s.dataFile !== undefined) return await createWithDataFile(sink, spec);
  s.backingFile = spec.backingFile ?? s.backingFile;
  s.backingFormat = spec.backingFormat ?? s.backingFormat;
  const size = alignUp(spec.size, SECTOR);
  l1SizeFor(s, size); // a size too large fails before anything is written
  if (s.preallocation === "metadata") {
    if (s.backingFile !== undefined) {
      throw new UnsupportedError(
        { format: FORMAT, field: "preallocation", value: "metadata" },
        "preallocation=metadata with a backing file is not written",
      );
    }
    const zeros: Source = {
      size,
      read: (_offset, length) => Promise.resolve(new Uint8Array(length)),
      async *extents(offset, length) {
        yield { offset, length, kind: "zero" };
      },
    };
    await encodeQcow2(zeros, sink, {
      options: spec.options,
      key: spec.key,
    });
  } else {
    const clusterSize = 2 ** s.clusterBits;
    const counter = new RefcountCounter(s.refcountOrder);
    counter.add(0);
    let next = clusterSize;
    let crypto: { offset: number; length: number } | undefined;
    if (s.encrypt === "luks") {
      const luks = await newLuks(s, spec.key!);
      crypto = { offset: next, length: luks.bytes.length };
      await sink.write(next, luks.bytes);
      const clusters = Math.ceil(luks.bytes.length / clusterSize);
      counter.add(next / clusterSize, next / clusterSize + clusters);
      next += clusters * clusterSize;
    }
    const l1Size = l1SizeFor(s, size);
    const l1Clusters = Math.max(1, Math.ceil((l1Size * 8) / clusterSize));
    const l1At = next;
    await sink.write(l1At, new Uint8Array(l1Clusters * clusterSize));
    counter.add(l1At / clusterSize, l1At / clusterSize + l1Clusters);
    next += l1Clusters * clusterSize;
    const refcounts = refcountStructures(
      counter,
      s.clusterBits,
      next / clusterSize,
    );
    await sink.write(next, refcounts.bytes);
    await sink.write(
      0,
      headerCluster(s, {
        size,
        l1TableOffset: l1At,
        l1Size,
        refcountTableOffset: refcounts.tableOffset,
        refcountTableClusters: refcounts.tableClusters,
        crypto,
      }),
    );
  }
  await sink.flush();
  const source = readBackSource(sink, FORMAT, () => 0);
  const state = await openState(source, {});
  await makeWritable(state, sink);
  if (spec.key !== undefined && state.encryption) {
    return qcow2Image(state, await state.encryption.cipher(spec.key));
  }
  return qcow2Image(state);
}
