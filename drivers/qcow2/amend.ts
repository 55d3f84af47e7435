/**
 * `amend` for qcow2, as `qemu-img amend -o` does it (QEMU's
 * `qcow2_amend_options`), in qemu's order:
 *
 * 1. compat=1.1 on a version 2 image: the header is rewritten as version 3
 *    (header length 112, the feature name table).
 * 2. lazy_refcounts=on|off: compatible feature bit 0 (version 3 only).
 * 3. refcount_bits=N: new refcount blocks and table of the new width
 *    written past the end of the file, the header pointed at them, the
 *    old ones freed; refused when a refcount does not fit the new width.
 * 4. compat=0.10 on a version 3 image: refused for refcount widths other
 *    than 16, external data files, snapshots with VM state or another
 *    size, incompatible features (extended L2, zstd compression: its
 *    clusters would read as zlib), persistent bitmaps and LUKS; zero
 *    clusters are expanded (preallocated ones filled with zeros; plain
 *    ones dropped when nothing is under them, else given a cluster of
 *    zeros), then the header is rewritten as version 2.
 *
 * Options qemu-img only takes at creation (cluster_size, extended_l2,
 * compression_type, preallocation, encryption) and the backing file
 * (qemu-img 7.2 sends users to `rebase`) are refused with qemu-img's
 * messages.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { setBe32, setBe64 } from "../_binary.ts";
import { OptionError, UnsupportedError } from "../../streams/errors.ts";
import type { Sink } from "../../streams/types.ts";
import {
  AUTOCLEAR,
  COMPAT_LAZY_REFCOUNTS,
  CRYPT,
  INCOMPAT,
  l2Table,
  openState,
  readSnapshots,
  type State,
} from "../qcow2.ts";
import {
  headerCluster,
  QCOW2_OPTIONS,
  type Qcow2Settings,
  RefcountCounter,
  refcountStructures,
} from "./layout.ts";
import { type ImageFile, openForChange } from "./snapshots.ts";
import {
  allocate,
  openRefcounts,
  refcountOf,
  type Refcounts,
  setRefcountOf,
} from "./writable.ts";

const FORMAT = "qcow2";
const OFFSET_MASK = 0x00fffffffffffe00n;
const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;

/** The options `amend` changes; the rest of the `-o` list is creation only. */
const AMENDABLE = new Set(["compat", "lazy_refcounts", "refcount_bits"]);

/** qemu-img's message for an option it refuses, as an OptionError. */
function invalid(option: string, value: string, message: string) {
  return new OptionError(
    { format: FORMAT, option, value, expected: message },
    message,
  );
}

function refuse(field: string, value: unknown, message: string): never {
  throw new UnsupportedError({ format: FORMAT, field, value }, message);
}

/**
 * Changes the qcow2 image in `file` as `qemu-img amend -o OPTIONS` does:
 * compat (0.10, 1.1), lazy_refcounts (on, off), refcount_bits.
 *
 * @param file the image file, read and written
 * @param options the `-o` options
 * @throws {OptionError} for options amend does not take (qemu-img's messages)
 * @throws {UnsupportedError} for changes the image cannot take
 *
 * @example
 * ```ts
 * import { amendQcow2, create, memorySink, open } from "../../mod.ts";
 * const sink = memorySink();
 * await create("qcow2", sink, { size: 1 << 20 });
 * await amendQcow2(sink, { compat: "0.10" });
 * console.log((await open(sink.source())).details?.compat); // 0.10
 * ```
 */
export async function amendQcow2(
  file: ImageFile,
  options: Record<string, string>,
): Promise<void> {
  for (const name of Object.keys(options)) {
    if (name === "backing_file" || name === "backing_fmt") {
      throw invalid(
        name,
        options[name],
        "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
      );
    }
    if (!AMENDABLE.has(name)) {
      const known = QCOW2_OPTIONS.some((o) => o.name === name);
      throw invalid(
        name,
        options[name],
        `Invalid parameter '${name}'${
          known ? "\nThis option is only supported for image creation" : ""
        }`,
      );
    }
  }
  let state = await openForChange(file);
  const h = state.header;
  const oldVersion = h.version;
  let newVersion = oldVersion;
  if (options.compat !== undefined) {
    const c = options.compat;
    if (c === "0.10" || c === "v2") newVersion = 2;
    else if (c === "1.1" || c === "v3") newVersion = 3;
    else throw invalid("compat", c, `Invalid compatibility level: '${c}'`);
  }
  const lazyNow = (h.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n;
  let lazy = lazyNow;
  if (options.lazy_refcounts !== undefined) {
    const v = options.lazy_refcounts;
    if (v !== "on" && v !== "off") {
      throw invalid(
        "lazy_refcounts",
        v,
        `Parameter 'lazy_refcounts' expects 'on' or 'off'`,
      );
    }
    lazy = v === "on";
  }
  let refcountOrder = h.refcountOrder;
  if (options.refcount_bits !== undefined) {
    const bits = Number(options.refcount_bits);
    const order = Math.log2(bits);
    if (!Number.isInteger(order) || order < 0 || order > 6) {
      throw invalid(
        "refcount_bits",
        options.refcount_bits,
        "Refcount width must be a power of two and may not exceed 64 bits",
      );
    }
    refcountOrder = order;
  }

  if (newVersion > oldVersion) {
    state = await rewriteHeader(file, state, 3);
  }
  if (lazy !== lazyNow) {
    if (lazy && newVersion < 3) {
      refuse(
        "lazy_refcounts",
        "on",
        "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
      );
    }
    state.header.compatible = lazy
      ? state.header.compatible | COMPAT_LAZY_REFCOUNTS
      : state.header.compatible & ~COMPAT_LAZY_REFCOUNTS;
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, state.header.compatible);
    await file.write(80, b);
  }
  if (refcountOrder !== state.header.refcountOrder) {
    if (newVersion < 3 && refcountOrder !== 4) {
      refuse(
        "refcount_bits",
        2 ** refcountOrder,
        "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
      );
    }
    await changeRefcountOrder(file, state, refcountOrder);
    state = await openState(file, {});
  }
  if (newVersion < oldVersion) await downgrade(file, state);
  await file.flush?.();
}

/** A backing file name and format, for a header rewrite. */
interface Backing {
  backingFile?: string;
  backingFormat?: string;
}

/** The image's settings as `headerCluster` takes them. */
function settingsOf(
  state: State,
  version: 2 | 3,
  backing: Backing,
): Qcow2Settings {
  const h = state.header;
  return {
    version,
    clusterBits: h.clusterBits,
    refcountOrder: h.refcountOrder,
    lazyRefcounts: version === 3 &&
      (h.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n,
    extendedL2: state.extendedL2,
    compressionType: version === 3 && h.compressionType === 1 ? 1 : 0,
    dataFile: state.hasDataFile ? h.dataFile : undefined,
    dataFileRaw: (h.autoclear & AUTOCLEAR.dataFileRaw) !== 0n,
    preallocation: "off",
    encrypt: h.cryptMethod === CRYPT.luks
      ? "luks"
      : h.cryptMethod === CRYPT.aes
      ? "aes"
      : undefined,
    luks: {
      cipherAlg: "",
      cipherMode: "",
      ivgenAlg: "",
      hashAlg: "",
      iterTime: 0,
    },
    ...backing,
  };
}

/**
 * Writes the header cluster again for `version`, keeping the tables, the
 * snapshot table, the backing file and format and the encryption header.
 */
async function rewriteHeader(
  file: ImageFile,
  state: State,
  version: 2 | 3,
  backing: Backing = {
    backingFile: state.backingFile,
    backingFormat: state.backingFile === undefined
      ? undefined
      : state.header.backingFormat,
  },
): Promise<State> {
  const h = state.header;
  if (version === 3) {
    const snapshots = h.nbSnapshots > 0 ? await readSnapshots(file, h) : [];
    // Version 3 wants each snapshot's disk size in its extra data.
    const short = snapshots.find((s) => s.entryBytes < 40 + 16);
    if (short) {
      refuse(
        "snapshot",
        short.id,
        `snapshot ${short.id} has no disk size in its table entry: upgrading it is not supported`,
      );
    }
  }
  const cluster = headerCluster(settingsOf(state, version, backing), {
    size: h.size,
    l1TableOffset: h.l1TableOffset,
    l1Size: h.l1Size,
    refcountTableOffset: h.refcountTableOffset,
    refcountTableClusters: h.refcountTableClusters,
    crypto: h.crypto,
  });
  setBe32(cluster, 60, h.nbSnapshots);
  setBe64(cluster, 64, h.snapshotsOffset);
  if (version === 3 && h.version === 3) {
    // The feature bits and compression type stay (dirty and corrupt were
    // repaired and cleared on opening).
    const v = new DataView(cluster.buffer);
    v.setBigUint64(
      72,
      h.incompatible & ~(INCOMPAT.dirty | INCOMPAT.corrupt),
    );
    v.setBigUint64(80, h.compatible);
    v.setBigUint64(88, h.autoclear);
    cluster[104] = h.compressionType;
  }
  await file.write(0, cluster);
  await file.flush?.();
  return await openState(file, {});
}

/**
 * Rewrites the refcount structures with `order` (2^order-bit refcounts):
 * the refcounts of every cluster but the old structures' are copied into
 * new blocks and a new table past the end of the file.
 */
async function changeRefcountOrder(
  file: ImageFile,
  state: State,
  order: number,
) {
  const h = state.header;
  const clusterSize = state.clusterSize;
  const r = await openRefcounts(state);
  const old = new Set<number>();
  const tableFirst = h.refcountTableOffset / clusterSize;
  for (let k = 0; k < h.refcountTableClusters; k++) old.add(tableFirst + k);
  const tv = new DataView(r.table.buffer, r.table.byteOffset, r.table.length);
  for (let i = 0; i < r.table.length / 8; i++) {
    const at = Number(tv.getBigUint64(i * 8) & ~0x1ffn);
    if (at !== 0) old.add(at / clusterSize);
  }
  const counter = new RefcountCounter(order);
  const max = order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** order) - 1;
  const clusters = Math.ceil(file.size / clusterSize);
  for (let i = 0; i < clusters; i++) {
    if (old.has(i)) continue;
    const n = await refcountOf(state, r, i);
    if (n > max) {
      refuse(
        "refcount_bits",
        2 ** order,
        `Cannot decrease refcount entry width to ${
          2 ** order
        } bits: Cluster at offset 0x${
          (i * clusterSize).toString(16)
        } has a refcount of ${n}`,
      );
    }
    for (let c = 0; c < n; c++) counter.add(i);
  }
  const built = refcountStructures(counter, h.clusterBits, clusters);
  await file.write(clusters * clusterSize, built.bytes);
  await file.flush?.();
  const fields = new Uint8Array(12);
  setBe64(fields, 0, built.tableOffset);
  setBe32(fields, 8, built.tableClusters);
  const orderField = new Uint8Array(4);
  setBe32(orderField, 0, order);
  await file.write(48, fields);
  await file.write(96, orderField);
  await file.flush?.();
}

/** compat=0.10: the checks, zero clusters expanded, the header rewritten. */
async function downgrade(file: ImageFile, state: State) {
  const h = state.header;
  if (h.refcountOrder !== 4) {
    refuse(
      "refcount_bits",
      2 ** h.refcountOrder,
      "compat=0.10 requires refcount_bits=16",
    );
  }
  if (state.hasDataFile) {
    refuse(
      "data_file",
      h.dataFile,
      "Cannot downgrade an image with a data file",
    );
  }
  const snapshots = h.nbSnapshots > 0 ? await readSnapshots(file, h) : [];
  for (const s of snapshots) {
    if (s.vmStateSize !== 0 || s.diskSize !== h.size) {
      refuse("snapshot", s.id, "Internal snapshots prevent downgrade of image");
    }
  }
  const incompatible = h.incompatible & ~(INCOMPAT.dirty | INCOMPAT.corrupt);
  if (incompatible & ~INCOMPAT.compressionType) {
    refuse(
      "incompatible_features",
      `0x${incompatible.toString(16)}`,
      `Cannot downgrade an image with incompatible features 0x${
        incompatible.toString(16)
      } set`,
    );
  }
  if (incompatible & INCOMPAT.compressionType) {
    refuse(
      "compression_type",
      "zstd",
      "Cannot downgrade an image with zstd compression: version 2 has no compression type, its compressed clusters would read as zlib",
    );
  }
  if (h.bitmaps || (h.autoclear & AUTOCLEAR.bitmaps)) {
    refuse(
      "bitmaps",
      h.bitmaps?.count ?? 0,
      "Cannot downgrade an image with persistent bitmaps (version 2 cannot hold them): remove them first",
    );
  }
  if (h.cryptMethod === CRYPT.luks) {
    refuse("encrypt.format", "luks", "LUKS encryption needs compat=1.1");
  }
  const r = await openRefcounts(state);
  const l1s: Uint8Array[] = [state.l1];
  for (const s of snapshots) {
    if (s.l1Size > 0) l1s.push(await file.read(s.l1TableOffset, s.l1Size * 8));
  }
  const done = new Set<number>();
  for (const l1 of l1s) {
    const v = new DataView(l1.buffer, l1.byteOffset, l1.length);
    for (let i = 0; i < l1.length / 8; i++) {
      const at = Number(v.getBigUint64(i * 8) & OFFSET_MASK);
      if (at === 0 || done.has(at)) continue;
      done.add(at);
      await expandZeros(file, state, r, at);
    }
  }
  await file.flush?.();
  await rewriteHeader(file, state, 2);
}

/** The zero clusters of the L2 table at `at` made plain (version 2) ones. */
async function expandZeros(
  file: Sink,
  state: State,
  r: Refcounts,
  at: number,
) {
  const { clusterSize } = state;
  const table = await l2Table(state, at);
  const v = new DataView(table.buffer, table.byteOffset, table.length);
  let modified = false;
  const tableRefs = await refcountOf(state, r, at / clusterSize);
  for (let j = 0; j < state.l2Entries; j++) {
    const e = v.getBigUint64(j * 8);
    if ((e & COMPRESSED) || !(e & 1n)) continue;
    let host = Number(e & OFFSET_MASK);
    if (host === 0) {
      if (state.backingFile === undefined) {
        // Nothing under it: unallocated reads as zeros too.
        v.setBigUint64(j * 8, 0n);
        modified = true;
        continue;
      }
      host = await allocate(state, file, r);
      if (tableRefs > 1) {
        await setRefcountOf(state, file, r, host / clusterSize, tableRefs);
      }
    } else if (host + clusterSize > state.source.size) {
      refuse(
        `l2[${j}] of the table at ${at}`,
        host,
        `a preallocated cluster within the file's ${state.source.size} bytes`,
      );
    }
    await file.write(host, new Uint8Array(clusterSize));
    const count = await refcountOf(state, r, host / clusterSize);
    v.setBigUint64(j * 8, BigInt(host) | (count === 1 ? COPIED : 0n));
    modified = true;
  }
  if (modified) await file.write(at, table);
}
