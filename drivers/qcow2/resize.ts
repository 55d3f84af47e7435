/**
 * qcow2 `resize` in place, as QEMU's `qcow2_co_truncate` does it for
 * `qemu-img resize` without preallocation:
 *
 * - growing sets the size and, when the L1 table needs more entries than
 *   its clusters hold, writes a bigger table at the end of the file, points
 *   the header at it and frees the old one; an image with a backing file
 *   gets the new area marked as zero clusters, so that the backing file
 *   does not show through (qemu-img does so when the backing file is
 *   longer than the old size; compat=0.10 images have no zero clusters and
 *   are refused there, as by qemu-img);
 * - shrinking sets the size, frees every cluster from the first whole
 *   cluster past the new end (data clusters, compressed clusters, then the
 *   L2 tables wholly past it), clears their entries, and truncates the file
 *   after its last used cluster.
 *
 * Refcounts stay exact, so `qemu-img check` finds no leak.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { setBe32, setBe64 } from "../_binary.ts";
import { ImageFormatError, UnsupportedError } from "../../streams/errors.ts";
import type { Sink, Source } from "../../streams/types.ts";
import {
  AUTOCLEAR,
  l1Entry,
  l2Table,
  openState,
  type State,
} from "../qcow2.ts";
import {
  allocate,
  openRefcounts,
  refcountOf,
  type Refcounts,
  refuseUnwritable,
  setRefcountOf,
} from "./writable.ts";

const FORMAT = "qcow2";
const SECTOR = 512;
/** QEMU's QCOW_MAX_L1_SIZE. */
const MAX_L1_BYTES = 32 << 20;

/**
 * Changes the virtual size of the qcow2 image in `file` to `size` bytes.
 *
 * @param file the image file, readable and writable
 * @param size the new virtual size: a multiple of 512
 * @throws {ImageFormatError} for a size the format cannot hold
 * @throws {UnsupportedError} for images it cannot change safely
 *
 * @example
 * ```ts
 * import { memorySink, open, qcow2 } from "../../mod.ts";
 * import { resizeQcow2 } from "./resize.ts";
 * const sink = memorySink();
 * await (await qcow2.create!(sink, { size: 1 << 20 })).flush!();
 * await resizeQcow2(sink, 4 << 20);
 * console.log((await open(sink.source())).size); // 4194304
 * ```
 */
export async function resizeQcow2(
  file: Source & Sink,
  size: number,
): Promise<void> {
  const state = await openState(file, {});
  const h = state.header;
  refuseUnwritable(state, "resize");
  if (size % SECTOR !== 0) {
    throw new ImageFormatError(
      {
        format: FORMAT,
        field: "size",
        value: size,
        limit: "a multiple of 512",
      },
      `the new size ${size} must be a multiple of 512`,
    );
  }
  if (h.bitmaps && (h.autoclear & AUTOCLEAR.bitmaps)) {
    throw new UnsupportedError(
      { format: FORMAT, field: "bitmaps", value: h.bitmaps.count },
      "cannot resize: the image has persistent dirty bitmaps (qemu-img refuses too)",
    );
  }
  const span = state.clusterSize * state.l2Entries;
  const newL1Size = Math.ceil(size / span);
  if (newL1Size * 8 > MAX_L1_BYTES) {
    throw new ImageFormatError(
      {
        format: FORMAT,
        field: "l1_size",
        value: newL1Size,
        limit: `at most ${MAX_L1_BYTES / 8} entries`,
      },
      `a size of ${size} bytes needs ${newL1Size} L1 entries, more than QEMU's ${
        MAX_L1_BYTES / 8
      }`,
    );
  }
  const oldSize = h.size;
  const backed = h.backingFileOffset !== 0;
  if (size > oldSize && backed) {
    if (h.version < 3) {
      throw new UnsupportedError(
        { format: FORMAT, field: "version", value: h.version },
        "cannot grow a compat=0.10 image with a backing file: it has no zero clusters to keep the backing file from showing through the new area (qemu-img fails there too)",
      );
    }
    if (oldSize % state.subclusterSize !== 0) {
      throw new UnsupportedError(
        { format: FORMAT, field: "size", value: oldSize },
        `cannot grow an image with a backing file from a size that is not a multiple of its ${state.subclusterSize}-byte (sub)clusters`,
      );
    }
  }
  const r = await openRefcounts(state);
  if (h.autoclear !== 0n) {
    // Unknown auto-clear features are not kept up to date: cleared.
    await file.write(88, new Uint8Array(8));
  }
  if (size > oldSize) {
    if (newL1Size > h.l1Size) await growL1(state, file, r, newL1Size);
    const field = new Uint8Array(8);
    setBe64(field, 0, size);
    await file.write(24, field);
    state.size = size;
    if (backed) await zeroArea(state, file, r, oldSize, size);
  } else if (size < oldSize) {
    const field = new Uint8Array(8);
    setBe64(field, 0, size);
    await file.write(24, field);
    await file.flush();
    await discardFrom(state, file, r, size, newL1Size);
    await truncateTail(state, file, r);
  }
  await file.flush();
}

/** Writes an L1 table of `entries` at the end of the file and frees the old one. */
async function growL1(
  state: State,
  file: Sink,
  r: Refcounts,
  entries: number,
): Promise<void> {
  const h = state.header;
  const clusterSize = state.clusterSize;
  const oldClusters = Math.ceil(h.l1Size * 8 / clusterSize);
  const clusters = Math.ceil(entries * 8 / clusterSize);
  const table = new Uint8Array(clusters * clusterSize);
  table.set(state.l1);
  // Reserved first: a refcount block allocated meanwhile goes after it.
  const at = r.nextFree;
  r.nextFree += clusters * clusterSize;
  await file.write(at, table);
  for (let k = 0; k < clusters; k++) {
    await setRefcountOf(state, file, r, at / clusterSize + k, 1);
  }
  await file.flush();
  const fields = new Uint8Array(12);
  setBe32(fields, 0, entries);
  setBe64(fields, 4, at);
  await file.write(36, fields);
  await file.flush();
  const oldAt = state.l1Offset;
  for (let k = 0; k < oldClusters; k++) {
    const index = oldAt / clusterSize + k;
    const count = await refcountOf(state, r, index);
    if (count > 0) await setRefcountOf(state, file, r, index, count - 1);
  }
  state.l1 = table.subarray(0, entries * 8);
  state.l1Offset = at;
  h.l1Size = entries;
  h.l1TableOffset = at;
}

/** The L2 table of L1 entry `index`, allocated (all zeros) when missing. */
async function tableFor(
  state: State,
  file: Sink,
  r: Refcounts,
  index: number,
): Promise<number> {
  const at = l1Entry(state, index);
  if (at !== 0) {
    if ((state.l1[index * 8] & 0x80) === 0) {
      throw new UnsupportedError(
        { format: FORMAT, field: `l1[${index}]`, value: at },
        "cannot resize: the L2 table is shared (its copied flag is clear)",
      );
    }
    return at;
  }
  const fresh = await allocate(state, file, r);
  const table = new Uint8Array(state.clusterSize);
  await file.write(fresh, table);
  state.l2Cache.set(fresh, table);
  const entry = new Uint8Array(8);
  setBe64(entry, 0, fresh);
  entry[0] |= 0x80; // copied: refcount one
  state.l1.set(entry, index * 8);
  await file.write(state.l1Offset + index * 8, entry);
  return fresh;
}

/** What an L2 entry refers to: host clusters that each lose one reference. */
function hostClusters(state: State, table: Uint8Array, e: number): number[] {
  const v = new DataView(table.buffer, table.byteOffset, table.length);
  const high = v.getUint32(e);
  const low = v.getUint32(e + 4);
  const clusterSize = state.clusterSize;
  if ((high & 0x40000000) !== 0) {
    const x = 62 - (state.header.clusterBits - 8);
    const entry = (BigInt(high & 0x3fffffff) << 32n) | BigInt(low);
    const offset = Number(entry & ((1n << BigInt(x)) - 1n));
    const sectors = Number(entry >> BigInt(x)) + 1;
    const last = Math.floor(
      (offset - offset % SECTOR + sectors * SECTOR - 1) / clusterSize,
    );
    const out: number[] = [];
    for (let k = Math.floor(offset / clusterSize); k <= last; k++) out.push(k);
    return out;
  }
  const host = (high & 0x00ffffff) * 2 ** 32 + ((low & 0xfffffe00) >>> 0);
  return host === 0 ? [] : [host / clusterSize];
}

/**
 * Takes one reference off each cluster of `clusters`, first checking that
 * each is inside the file and has a reference to lose (an image whose
 * tables and refcounts disagree is refused before anything changes).
 */
async function release(
  state: State,
  file: Sink,
  r: Refcounts,
  clusters: number[],
  where: string,
): Promise<void> {
  const fileClusters = Math.ceil(state.source.size / state.clusterSize);
  const needed = new Map<number, number>();
  for (const k of clusters) needed.set(k, (needed.get(k) ?? 0) + 1);
  for (const [k, n] of needed) {
    const count = await refcountOf(state, r, k);
    if (k === 0 || k >= fileClusters || count < n) {
      throw new ImageFormatError(
        {
          format: FORMAT,
          field: where,
          value: k * state.clusterSize,
          limit: `a cluster inside the file with refcount at least ${n}`,
        },
        `${where} refers to cluster ${k} (offset ${
          k * state.clusterSize
        }) whose refcount is ${count}${
          k >= fileClusters ? ", past the end of the file" : ""
        } (run qemu-img check)`,
      );
    }
  }
  for (const [k, n] of needed) {
    const count = await refcountOf(state, r, k);
    await setRefcountOf(state, file, r, k, count - n);
  }
}

/** Frees and clears every cluster from the first whole one past `size`. */
async function discardFrom(
  state: State,
  file: Sink,
  r: Refcounts,
  size: number,
  newL1Size: number,
): Promise<void> {
  const clusterSize = state.clusterSize;
  const entries = state.l2Entries;
  const firstCluster = Math.ceil(size / clusterSize);
  const h = state.header;
  for (
    let index = Math.floor(firstCluster / entries);
    index < h.l1Size;
    index++
  ) {
    const at = l1Entry(state, index);
    if (at === 0) continue;
    const table = (await l2Table(state, at)).slice();
    const from = Math.max(0, firstCluster - index * entries);
    const freed: number[] = [];
    for (let i = from; i < entries; i++) {
      freed.push(...hostClusters(state, table, i * state.entryBytes));
    }
    const whole = index >= newL1Size;
    if (whole) freed.push(at / clusterSize);
    await release(state, file, r, freed, `l1[${index}]`);
    if (whole) {
      state.l1.fill(0, index * 8, index * 8 + 8);
      await file.write(state.l1Offset + index * 8, new Uint8Array(8));
    } else {
      table.fill(0, from * state.entryBytes);
      await file.write(
        at + from * state.entryBytes,
        table.subarray(from * state.entryBytes),
      );
    }
    state.l2Cache.delete(at);
  }
}

/** Truncates the file after its last cluster with a reference. */
async function truncateTail(
  state: State,
  file: Sink,
  r: Refcounts,
): Promise<void> {
  if (!file.resize) return;
  await file.flush();
  const clusterSize = state.clusterSize;
  let last = Math.ceil(state.source.size / clusterSize) - 1;
  while (last > 0 && await refcountOf(state, r, last) === 0) last--;
  const end = (last + 1) * clusterSize;
  if (end < state.source.size) await file.resize(end);
}

/**
 * Marks `[from, to)` as reading zeros: zero clusters, or zero subclusters
 * with extended L2 entries; the L2 tables it needs are allocated. `from`
 * is a multiple of the subcluster size.
 */
async function zeroArea(
  state: State,
  file: Sink,
  r: Refcounts,
  from: number,
  to: number,
): Promise<void> {
  const clusterSize = state.clusterSize;
  const entries = state.l2Entries;
  const sub = state.subclusterSize;
  const first = Math.floor(from / clusterSize);
  const end = Math.ceil(to / clusterSize);
  for (let c = first; c < end;) {
    const index = Math.floor(c / entries);
    const stop = Math.min(end, (index + 1) * entries);
    const at = await tableFor(state, file, r, index);
    const table = (await l2Table(state, at)).slice();
    const v = new DataView(table.buffer);
    const freed: number[] = [];
    for (; c < stop; c++) {
      const e = (c - index * entries) * state.entryBytes;
      const compressed = (v.getUint32(e) & 0x40000000) !== 0;
      if (compressed && c * clusterSize < from) {
        throw new UnsupportedError(
          { format: FORMAT, field: `l2[${c}]`, value: c * clusterSize },
          "cannot grow: the cluster at the old end is compressed and only part of it would become zeros",
        );
      }
      if (compressed) {
        freed.push(...hostClusters(state, table, e));
        table.fill(0, e, e + state.entryBytes);
      }
      if (state.extendedL2) {
        // Subclusters from `from` on, within this cluster.
        const firstSub = Math.max(0, (from - c * clusterSize) / sub);
        const mask = firstSub === 0
          ? 0xffffffff
          : (0xffffffff << firstSub) >>> 0;
        v.setUint32(e + 8, (v.getUint32(e + 8) | mask) >>> 0);
        v.setUint32(e + 12, (v.getUint32(e + 12) & ~mask) >>> 0);
      } else {
        v.setUint32(e + 4, (v.getUint32(e + 4) | 1) >>> 0);
      }
    }
    await release(state, file, r, freed, `l1[${index}]`);
    await file.write(at, table);
    state.l2Cache.set(at, table);
  }
}
