/**
 * Internal snapshots of qcow2 images, made, applied and deleted as
 * `qemu-img snapshot -c|-a|-d` does (QEMU's `block/qcow2-snapshot.c`):
 *
 * - create: the active L1 table is copied to new clusters, every cluster
 *   it reaches (L2 tables, data clusters, the host clusters of compressed
 *   ones) gains a reference, the "copied" flags of the active tables are
 *   cleared where a refcount passes one, and a new snapshot table (the old
 *   entries and the new one) replaces the old table.
 * - apply: the snapshot's clusters gain a reference, its L1 table is
 *   copied over the active one, the old active clusters lose one.
 * - delete: the table without the entry replaces the old one, the
 *   snapshot's clusters lose a reference (freed at zero), its L1 table is
 *   freed, and the copied flags of the active tables are set again where a
 *   refcount came back to one.
 *
 * A snapshot table entry (big-endian, padded to 8 bytes):
 *
 * | offset | size | field                                                |
 * | -----: | ---: | ---------------------------------------------------- |
 * |      0 |    8 | l1_table_offset                                      |
 * |      8 |    4 | l1_size (entries)                                    |
 * |     12 |    2 | id_str_size                                          |
 * |     14 |    2 | name_size                                            |
 * |     16 |    4 | date_sec                                             |
 * |     20 |    4 | date_nsec                                            |
 * |     24 |    8 | vm_clock_nsec                                        |
 * |     32 |    4 | vm_state_size                                        |
 * |     36 |    4 | extra_data_size (24 as QEMU 7.2 writes it)           |
 * |     40 |    8 | extra: vm_state_size_large                           |
 * |     48 |    8 | extra: disk_size                                     |
 * |     56 |    8 | extra: icount (-1: none; qemu-img writes 0)          |
 * |     64 |    n | id string, then name                                 |
 *
 * New clusters are taken past the end of the file; freed ones keep a
 * refcount of zero (qemu-img check finds no leak).
 *
 * This module is browser compatible.
 *
 * @module
 */

import { setBe16, setBe32, setBe64 } from "../_binary.ts";
import { ImageFormatError, UnsupportedError } from "../../streams/errors.ts";
import type { Sink, Source } from "../../streams/types.ts";
import {
  INCOMPAT,
  l2Table,
  openState,
  readSnapshots,
  type Snapshot,
  type State,
} from "../qcow2.ts";
import { checkImage } from "./check.ts";
import {
  openRefcounts,
  refcountOf,
  type Refcounts,
  release,
  setRefcountOf,
} from "./writable.ts";

const FORMAT = "qcow2";
const OFFSET_MASK = 0x00fffffffffffe00n;
const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;
/** QEMU's limits: snapshots in a table, bytes of an L1 table. */
const MAX_SNAPSHOTS = 65536;
const MAX_L1_BYTES = 32 << 20;
/** The extra data QEMU 7.2 writes: vm_state_size_large, disk_size, icount. */
const EXTRA_BYTES = 24;

/** A file that is read and written: the image. */
export type ImageFile = Source & Sink;

/** Options of {@linkcode createSnapshot}. */
export interface CreateSnapshotOptions {
  /**
   * The snapshot's date, in milliseconds since 1970.
   * @default Date.now()
   */
  date?: number;
}

/**
 * Opens the image in `file` for a change of its metadata: refused when
 * corrupt or with an external data file; a dirty image is repaired first.
 *
 * @param file the image file
 * @returns its state
 */
export async function openForChange(file: ImageFile): Promise<State> {
  let state = await openState(file, {});
  const refuse = (why: string) => {
    throw new UnsupportedError({ format: FORMAT, field: "snapshot" }, why);
  };
  const h = state.header;
  if (h.incompatible & INCOMPAT.corrupt) {
    refuse("the image is marked corrupt (run check -r all)");
  }
  if (state.hasDataFile) {
    refuse("internal snapshots are not supported with an external data file");
  }
  if (h.incompatible & INCOMPAT.dirty) {
    // As a writable open: refcounts repaired first.
    const result = await checkImage(file, {
      format: FORMAT,
      repairAll: true,
      sink: file,
    });
    if (result.corruptions || result.checkErrors) {
      refuse("the image is dirty and its refcounts could not be repaired");
    }
    state = await openState(file, {});
  }
  return state;
}

/** `n` clusters in a row past the end of the file, each of refcount one. */
async function allocateRun(
  state: State,
  sink: Sink,
  r: Refcounts,
  n: number,
): Promise<number> {
  const at = r.nextFree;
  r.nextFree += n * state.clusterSize;
  for (let k = 0; k < n; k++) {
    await setRefcountOf(state, sink, r, at / state.clusterSize + k, 1);
  }
  return at;
}

/** The host clusters a compressed L2 entry's bytes cover. */
function compressedClusters(state: State, entry: bigint): [number, number] {
  const bits = state.header.clusterBits;
  const x = BigInt(62 - (bits - 8));
  const offset = Number(entry & ((1n << x) - 1n));
  const sectors = Number((entry >> x) & ((1n << BigInt(bits - 8)) - 1n)) + 1;
  const end = offset - (offset % 512) + sectors * 512;
  return [
    Math.floor(offset / state.clusterSize),
    Math.floor((end - 1) / state.clusterSize),
  ];
}

/** The L2 tables an L1 table points at, validated against the file. */
function l2Offsets(state: State, l1: Uint8Array): [number, bigint][] {
  const v = new DataView(l1.buffer, l1.byteOffset, l1.length);
  const out: [number, bigint][] = [];
  const seen = new Set<number>();
  for (let i = 0; i < l1.length / 8; i++) {
    const entry = v.getBigUint64(i * 8);
    const at = Number(entry & OFFSET_MASK);
    if (at === 0) continue;
    if (seen.has(at)) {
      // A loop QEMU would follow (counting the table twice); refused, and
      // the walk stays one pass over distinct tables.
      throw new ImageFormatError({
        format: FORMAT,
        field: `L1 entry ${i}`,
        value: at,
        limit: "an L2 table no other entry of the L1 table points at",
      });
    }
    seen.add(at);
    if (
      at % state.clusterSize !== 0 || at + state.clusterSize > state.source.size
    ) {
      throw new ImageFormatError({
        format: FORMAT,
        field: `L1 entry ${i}`,
        value: at,
        limit:
          `an L2 table aligned to ${state.clusterSize} within the file's ${state.source.size} bytes`,
      });
    }
    out.push([i, entry]);
  }
  return out;
}

/**
 * The L2 tables `l1` points at, once every cluster they reach is known to
 * lie in the file and (when adding) to keep its refcount within the
 * width: the dry run before anything is written.
 */
async function checkReach(
  state: State,
  r: Refcounts,
  l1: Uint8Array,
  addend: number,
): Promise<[number, bigint][]> {
  const { clusterSize, entryBytes } = state;
  const tables = l2Offsets(state, l1);
  const max = r.width >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** r.width - 1;
  const gains = new Map<number, number>();
  const gain = (index: number, at: number) => {
    if ((index + 1) * clusterSize > state.source.size + clusterSize - 1) {
      throw new ImageFormatError({
        format: FORMAT,
        field: `L2 entry of the table at ${at}`,
        value: index * clusterSize,
        limit: `a cluster within the file's ${state.source.size} bytes`,
      });
    }
    gains.set(index, (gains.get(index) ?? 0) + 1);
  };
  for (const [, entry] of tables) {
    const at = Number(entry & OFFSET_MASK);
    gain(at / clusterSize, at);
    const table = await l2Table(state, at);
    const v = new DataView(table.buffer, table.byteOffset, table.length);
    for (let j = 0; j < state.l2Entries; j++) {
      const e = v.getBigUint64(j * entryBytes);
      if (e & COMPRESSED) {
        const [first, last] = compressedClusters(state, e);
        for (let k = first; k <= last; k++) gain(k, at);
      } else if (e & OFFSET_MASK) {
        gain(Math.floor(Number(e & OFFSET_MASK) / clusterSize), at);
      }
    }
  }
  if (addend > 0) {
    for (const [index, n] of gains) {
      const now = await refcountOf(state, r, index);
      if (now + n * addend > max) {
        throw new UnsupportedError(
          {
            format: FORMAT,
            field: "refcount_bits",
            value: r.width,
            limit: `a refcount of at most ${max}`,
          },
          `cluster ${index} would need a refcount of ${
            now + n
          }: too many references for ${r.width}-bit refcounts`,
        );
      }
    }
  }
  return tables;
}

/**
 * Adds `addend` (1, -1 or 0) to the refcount of every cluster the L1
 * table `l1` reaches, and sets the copied flags of its L1 and L2 entries
 * where a refcount is one (clears them elsewhere), as QEMU's
 * `qcow2_update_snapshot_refcount`. The L1 table is written back at
 * `l1Offset` when a flag changed, unless `addend` is -1 (it is dropped).
 * Refcounts that would pass the width are refused before any is changed.
 */
async function updateRefcounts(
  state: State,
  sink: Sink,
  r: Refcounts,
  l1: Uint8Array,
  l1Offset: number,
  addend: number,
): Promise<void> {
  const { clusterSize, entryBytes } = state;
  const tables = await checkReach(state, r, l1, addend);
  const lv = new DataView(l1.buffer, l1.byteOffset, l1.length);
  let l1Modified = false;
  for (const [i, entry] of tables) {
    const at = Number(entry & OFFSET_MASK);
    const table = await l2Table(state, at);
    const v = new DataView(table.buffer, table.byteOffset, table.length);
    let modified = false;
    for (let j = 0; j < state.l2Entries; j++) {
      const e = v.getBigUint64(j * entryBytes);
      let count: number;
      if (e & COMPRESSED) {
        if (addend !== 0) {
          const [first, last] = compressedClusters(state, e);
          for (let k = first; k <= last; k++) {
            const now = await refcountOf(state, r, k);
            await setRefcountOf(state, sink, r, k, Math.max(0, now + addend));
          }
        }
        continue; // compressed clusters never carry the copied flag
      }
      const host = Number(e & OFFSET_MASK);
      if (host === 0) count = 0;
      else {
        const index = host / clusterSize;
        count = await refcountOf(state, r, index);
        if (addend !== 0) {
          count = Math.max(0, count + addend);
          await setRefcountOf(state, sink, r, index, count);
        }
      }
      const flagged = count === 1 ? e | COPIED : e & ~COPIED;
      if (flagged !== e) {
        v.setBigUint64(j * entryBytes, flagged);
        modified = true;
      }
    }
    if (modified) await sink.write(at, table);
    const index = at / clusterSize;
    let count = await refcountOf(state, r, index);
    if (addend !== 0) {
      count = Math.max(0, count + addend);
      await setRefcountOf(state, sink, r, index, count);
    }
    const flagged = count === 1 ? entry | COPIED : entry & ~COPIED;
    if (flagged !== entry) {
      lv.setBigUint64(i * 8, flagged);
      l1Modified = true;
    }
  }
  if (addend >= 0 && l1Modified) await sink.write(l1Offset, l1);
}

/** One snapshot table entry's bytes. */
function entryBytes(s: {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  diskSize: number;
}): Uint8Array {
  const encoder = new TextEncoder();
  const id = encoder.encode(s.id);
  const name = encoder.encode(s.name);
  const length = 40 + EXTRA_BYTES + id.length + name.length;
  const b = new Uint8Array(Math.ceil(length / 8) * 8);
  setBe64(b, 0, s.l1TableOffset);
  setBe32(b, 8, s.l1Size);
  setBe16(b, 12, id.length);
  setBe16(b, 14, name.length);
  setBe32(b, 16, s.dateSec);
  setBe32(b, 20, s.dateNsec);
  // vm_clock_nsec, vm_state_size: 0 (a disk-only snapshot).
  setBe32(b, 36, EXTRA_BYTES);
  setBe64(b, 48, s.diskSize);
  // icount: 0, as qemu-img leaves it.
  b.set(id, 64);
  b.set(name, 64 + id.length);
  return b;
}

/**
 * Replaces the snapshot table by `entries` (raw entry bytes): new
 * clusters, then the header's count and offset, then the old clusters
 * freed, as QEMU's `qcow2_write_snapshots`.
 */
async function writeTable(
  state: State,
  sink: Sink,
  r: Refcounts,
  entries: Uint8Array[],
  oldBytes: number,
) {
  const h = state.header;
  const total = entries.reduce((n, e) => n + e.length, 0);
  let at = 0;
  if (entries.length > 0) {
    const clusters = Math.ceil(total / state.clusterSize);
    at = await allocateRun(state, sink, r, clusters);
    const table = new Uint8Array(clusters * state.clusterSize);
    let k = 0;
    for (const e of entries) {
      table.set(e, k);
      k += e.length;
    }
    await sink.write(at, table);
    await sink.flush?.();
  }
  const fields = new Uint8Array(12);
  setBe32(fields, 0, entries.length);
  setBe64(fields, 4, at);
  await sink.write(60, fields);
  await sink.flush?.();
  if (h.nbSnapshots > 0 && oldBytes > 0) {
    const first = Math.floor(h.snapshotsOffset / state.clusterSize);
    const last = Math.floor(
      (h.snapshotsOffset + oldBytes - 1) / state.clusterSize,
    );
    for (let k = first; k <= last; k++) await release(state, sink, r, k);
  }
  h.nbSnapshots = entries.length;
  h.snapshotsOffset = at;
}

/** The raw entries of the snapshot table, one per snapshot. */
async function rawEntries(
  state: State,
  snapshots: Snapshot[],
): Promise<Uint8Array[]> {
  const total = snapshots.reduce((n, s) => n + s.entryBytes, 0);
  if (total === 0) return [];
  const bytes = await state.source.read(state.header.snapshotsOffset, total);
  const out: Uint8Array[] = [];
  let at = 0;
  for (const s of snapshots) {
    out.push(bytes.slice(at, at + s.entryBytes));
    at += s.entryBytes;
  }
  return out;
}

/** The snapshot named `tag` (its ID first, then its name), or undefined. */
function find(snapshots: Snapshot[], tag: string): number {
  const byId = snapshots.findIndex((s) => s.id === tag);
  return byId >= 0 ? byId : snapshots.findIndex((s) => s.name === tag);
}

/** Reads a snapshot's L1 table, refusing one outside the file. */
async function snapshotL1(state: State, s: Snapshot): Promise<Uint8Array> {
  if (
    s.l1Size * 8 > MAX_L1_BYTES ||
    s.l1TableOffset % state.clusterSize !== 0 ||
    s.l1TableOffset + s.l1Size * 8 > state.source.size
  ) {
    throw new ImageFormatError({
      format: FORMAT,
      field: `snapshot ${s.id} l1_table_offset`,
      value: s.l1TableOffset,
      limit: `cluster aligned, with its ${s.l1Size} entries (at most ${
        MAX_L1_BYTES / 8
      }) within the file's ${state.source.size} bytes`,
    });
  }
  return s.l1Size === 0
    ? new Uint8Array(0)
    : (await state.source.read(s.l1TableOffset, s.l1Size * 8)).slice();
}

/**
 * Lists the internal snapshots of the qcow2 image in `source`.
 *
 * @param source the image file
 * @returns its snapshots, in table order
 * @throws {ImageFormatError} for a broken snapshot table
 *
 * @example
 * ```ts
 * import { create, listSnapshots, memorySink } from "../../mod.ts";
 * const sink = memorySink();
 * await create("qcow2", sink, { size: 1 << 20 });
 * console.log((await listSnapshots(sink.source())).length); // 0
 * ```
 */
export async function listSnapshots(source: Source): Promise<Snapshot[]> {
  const state = await openState(source, {});
  return state.header.nbSnapshots > 0
    ? await readSnapshots(source, state.header)
    : [];
}

/**
 * Creates an internal snapshot named `tag` of the qcow2 image in `file`
 * (`qemu-img snapshot -c`): its ID is one past the largest numeric ID.
 *
 * @param file the image file, read and written
 * @param tag the snapshot's name
 * @param options its date
 * @returns the new snapshot
 * @throws {UnsupportedError} for images that cannot take one (data file,
 *   corrupt, 65536 snapshots, refcounts too narrow)
 *
 * @example
 * ```ts
 * import { create, createSnapshot, memorySink } from "../../mod.ts";
 * const sink = memorySink();
 * await create("qcow2", sink, { size: 1 << 20 });
 * console.log((await createSnapshot(sink, "before")).id); // 1
 * ```
 */
export async function createSnapshot(
  file: ImageFile,
  tag: string,
  options: CreateSnapshotOptions = {},
): Promise<Snapshot> {
  const state = await openForChange(file);
  const h = state.header;
  const snapshots = h.nbSnapshots > 0 ? await readSnapshots(file, h) : [];
  if (snapshots.length >= MAX_SNAPSHOTS) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "nb_snapshots",
        value: snapshots.length,
        limit: `at most ${MAX_SNAPSHOTS}`,
      },
      "the image has as many snapshots as QEMU allows",
    );
  }
  const name = new TextEncoder().encode(tag);
  if (name.length > 0xffff) {
    throw new UnsupportedError(
      { format: FORMAT, field: "name", value: name.length },
      "a snapshot name takes at most 65535 bytes",
    );
  }
  let idMax = 0;
  for (const s of snapshots) {
    const n = Number.parseInt(s.id, 10);
    if (Number.isFinite(n) && n > idMax) idMax = n;
  }
  const id = String(idMax + 1);
  const r = await openRefcounts(state);
  const l1 = state.l1.slice();
  await checkReach(state, r, state.l1, 1); // before anything is written
  // The copy of the active L1 table, as it is (flags included).
  let l1Copy = 0;
  if (h.l1Size > 0) {
    l1Copy = await allocateRun(
      state,
      file,
      r,
      Math.ceil((h.l1Size * 8) / state.clusterSize),
    );
    await file.write(l1Copy, l1);
  }
  await updateRefcounts(state, file, r, state.l1, state.l1Offset, 1);
  const date = options.date ?? Date.now();
  const entry = {
    l1TableOffset: l1Copy,
    l1Size: h.l1Size,
    id,
    name: tag,
    dateSec: Math.floor(date / 1000),
    dateNsec: Math.floor(date % 1000) * 1e6,
    diskSize: h.size,
  };
  const old = await rawEntries(state, snapshots);
  await writeTable(state, file, r, [...old, entryBytes(entry)], oldTotal(old));
  await file.flush?.();
  return {
    ...entry,
    vmClockNsec: 0,
    vmStateSize: 0,
    icount: 0,
    entryBytes: entryBytes(entry).length,
  };
}

const oldTotal = (entries: Uint8Array[]) =>
  entries.reduce((n, e) => n + e.length, 0);

/**
 * Reverts the active layer of the qcow2 image in `file` to the snapshot
 * `tag` (its ID or name; `qemu-img snapshot -a`).
 *
 * @param file the image file, read and written
 * @param tag the snapshot's ID or name
 * @throws {ImageFormatError} when there is no such snapshot, or its L1
 *   table lies outside the file
 * @throws {UnsupportedError} for a snapshot of another disk size
 *
 * @example
 * ```ts
 * import {
 *   applySnapshot,
 *   create,
 *   createSnapshot,
 *   memorySink,
 * } from "../../mod.ts";
 * const sink = memorySink();
 * await create("qcow2", sink, { size: 1 << 20 });
 * await createSnapshot(sink, "before");
 * await applySnapshot(sink, "before");
 * ```
 */
export async function applySnapshot(
  file: ImageFile,
  tag: string,
): Promise<void> {
  const state = await openForChange(file);
  const h = state.header;
  const snapshots = h.nbSnapshots > 0 ? await readSnapshots(file, h) : [];
  const i = find(snapshots, tag);
  if (i < 0) throw notFound(snapshots, tag);
  const s = snapshots[i];
  const snapL1 = await snapshotL1(state, s);
  if (s.diskSize !== h.size) {
    throw new UnsupportedError(
      { format: FORMAT, field: "disk_size", value: s.diskSize },
      `loading snapshots with a different disk size (${s.diskSize}, the image's ${h.size}) is not supported`,
    );
  }
  if (s.l1Size > h.l1Size) {
    throw new UnsupportedError(
      { format: FORMAT, field: `snapshot ${s.id} l1_size`, value: s.l1Size },
      `an L1 table larger than the active one (${h.l1Size} entries) is not applied`,
    );
  }
  const r = await openRefcounts(state);
  await updateRefcounts(state, file, r, snapL1, s.l1TableOffset, 1);
  const next = new Uint8Array(state.l1.length);
  next.set(snapL1);
  await file.write(state.l1Offset, next);
  await file.flush?.();
  // The old active tables lose their references (the in-memory copy).
  await updateRefcounts(state, file, r, state.l1, state.l1Offset, -1);
  state.l1.set(next);
  await updateRefcounts(state, file, r, state.l1, state.l1Offset, 0);
  await file.flush?.();
}

/**
 * Deletes the first snapshot named `tag` of the qcow2 image in `file`
 * (`qemu-img snapshot -d`, which looks snapshots up by name only),
 * freeing what only it used.
 *
 * @param file the image file, read and written
 * @param tag the snapshot's name
 * @throws {ImageFormatError} when there is no such snapshot, or its L1
 *   table lies outside the file
 *
 * @example
 * ```ts
 * import {
 *   create,
 *   createSnapshot,
 *   deleteSnapshot,
 *   listSnapshots,
 *   memorySink,
 * } from "../../mod.ts";
 * const sink = memorySink();
 * await create("qcow2", sink, { size: 1 << 20 });
 * await createSnapshot(sink, "before");
 * await deleteSnapshot(sink, "before");
 * console.log((await listSnapshots(sink)).length); // 0
 * ```
 */
export async function deleteSnapshot(
  file: ImageFile,
  tag: string,
): Promise<void> {
  const state = await openForChange(file);
  const h = state.header;
  const snapshots = h.nbSnapshots > 0 ? await readSnapshots(file, h) : [];
  // By name only, as qemu-img snapshot -d looks it up.
  const i = snapshots.findIndex((s) => s.name === tag);
  if (i < 0) throw notFound(snapshots, tag);
  const s = snapshots[i];
  const snapL1 = await snapshotL1(state, s);
  const r = await openRefcounts(state);
  await checkReach(state, r, snapL1, -1); // refused before the table changes
  const old = await rawEntries(state, snapshots);
  await writeTable(
    state,
    file,
    r,
    old.filter((_, k) => k !== i),
    oldTotal(old),
  );
  await updateRefcounts(state, file, r, snapL1, s.l1TableOffset, -1);
  await updateRefcounts(state, file, r, state.l1, state.l1Offset, 0);
  if (s.l1Size > 0) {
    const first = s.l1TableOffset / state.clusterSize;
    const clusters = Math.ceil((s.l1Size * 8) / state.clusterSize);
    for (let k = 0; k < clusters; k++) {
      await release(state, file, r, first + k);
    }
  }
  await file.flush?.();
}

/** The error for a snapshot that is not there. */
function notFound(snapshots: Snapshot[], tag: string): ImageFormatError {
  return new ImageFormatError(
    {
      format: FORMAT,
      field: "snapshot",
      value: tag,
      limit: `one of the image's snapshots (${
        snapshots.map((s) => `${s.id} "${s.name}"`).join(", ") || "none"
      })`,
    },
  );
}
