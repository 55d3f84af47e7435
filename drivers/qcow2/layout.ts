/**
 * qcow2 writing, the shared parts: the `-o` options qemu-img takes, the
 * header cluster of a new image, refcount blocks, and the LUKS header of a
 * new encrypted image.
 *
 * This module is browser compatible.
 *
 * @module
 */

import {
  alignUp,
  formatErrors,
  setBe16,
  setBe32,
  setBe64,
} from "../_binary.ts";
import { QCOW_MAGIC } from "../_signatures.ts";
import { checkWriteOptions, optionErrors } from "../../streams/options.ts";
import { KeyError } from "../../streams/errors.ts";
import type { SectorCipher } from "../../streams/types.ts";
import { QCOW2_OPTIONS } from "./_options.ts";
import {
  afSplit,
  LUKS_HEADER_SIZE,
  luksSectorCipher,
  masterKeyDigest,
  slotKey,
  STRIPES,
} from "./luks.ts";

const FORMAT = "qcow2";
const SECTOR = 512;
const fail = optionErrors(FORMAT);

// The options' declarations are their own module: the driver's table
// holds them without loading what writes images.
export { QCOW2_OPTIONS };

/** Validated write settings. */
export interface Qcow2Settings {
  version: 2 | 3;
  clusterBits: number;
  refcountOrder: number;
  lazyRefcounts: boolean;
  extendedL2: boolean;
  /** compression_type: 0 zlib, 1 zstd. */
  compressionType: 0 | 1;
  /** The external data file's name (data_file). */
  dataFile?: string;
  /** data_file_raw: the data file reads as the disk. */
  dataFileRaw: boolean;
  preallocation: "off" | "metadata";
  encrypt?: "aes" | "luks";
  luks: {
    cipherAlg: string;
    cipherMode: string;
    ivgenAlg: string;
    hashAlg: string;
    iterTime: number;
  };
  backingFile?: string;
  backingFormat?: string;
}

/** Parses a size with qemu-img's suffixes (k, M, G: powers of 1024). */
function parseSize(text: string): number {
  const m = /^(\d+)([kKmMgGtT]?)$/.exec(text.trim());
  if (!m) return NaN;
  const scale = { "": 1, k: 1024, m: 1 << 20, g: 1 << 30, t: 2 ** 40 }[
    m[2].toLowerCase() as "" | "k" | "m" | "g" | "t"
  ];
  return Number(m[1]) * scale;
}

const onOff = (value: string | undefined, name: string): boolean => {
  if (value === undefined || value === "off" || value === "false") return false;
  if (value === "on" || value === "true") return true;
  throw fail(name, value, "on or off");
};

/**
 * Validates qemu-img `-o` options of a qcow2 to write: unknown keys and
 * values out of range are errors naming them.
 *
 * @param options the `-o` options
 * @param key the passphrase, when one was given
 * @returns the settings
 * @throws {ImageFormatError} for an unknown option or a bad value
 * @throws {KeyError} when encryption is asked for without a passphrase
 *
 * @example
 * ```ts
 * import { qcow2Settings } from "./layout.ts";
 * console.log(qcow2Settings({ cluster_size: "4k" }).clusterBits); // 12
 * ```
 */
export function qcow2Settings(
  options: Record<string, string> = {},
  key?: string | Uint8Array,
): Qcow2Settings {
  checkWriteOptions(
    {
      name: FORMAT,
      description: "qcow2",
      writeOptions: QCOW2_OPTIONS,
      compresses: true,
      probe: () => 0,
      open: () => Promise.reject(new Error("not for opening")),
    },
    options,
  );
  const compat = options.compat ?? "1.1";
  let version: 2 | 3;
  if (compat === "0.10" || compat === "v2") version = 2;
  else if (compat === "1.1" || compat === "v3") version = 3;
  else throw fail("compat", compat, "0.10 or 1.1 (v2 or v3)");
  const clusterSize = parseSize(options.cluster_size ?? "64k");
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
    throw fail(
      "cluster_size",
      options.cluster_size,
      "a power of two from 512 to 2M",
    );
  }
  const refcountBits = Number(options.refcount_bits ?? 16);
  const refcountOrder = Math.log2(refcountBits);
  if (
    !Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6
  ) {
    throw fail(
      "refcount_bits",
      options.refcount_bits,
      "1, 2, 4, 8, 16, 32 or 64",
    );
  }
  const lazyRefcounts = onOff(options.lazy_refcounts, "lazy_refcounts");
  const extendedL2 = onOff(options.extended_l2, "extended_l2");
  if (version === 2 && (refcountBits !== 16 || lazyRefcounts || extendedL2)) {
    throw fail(
      "compat",
      compat,
      "1.1 for refcount_bits other than 16, lazy_refcounts and extended_l2",
    );
  }
  if (extendedL2 && clusterBits < 14) {
    throw fail(
      "cluster_size",
      options.cluster_size,
      "at least 16k with extended_l2",
    );
  }
  const compression = options.compression_type ?? "zlib";
  if (compression !== "zlib" && compression !== "zstd") {
    throw fail("compression_type", compression, "zlib or zstd");
  }
  if (compression === "zstd" && version === 2) {
    throw fail(
      "compat",
      compat,
      "1.1 for compression_type zstd (a non-zlib compression type)",
    );
  }
  const dataFile = options.data_file;
  const dataFileRaw = onOff(options.data_file_raw, "data_file_raw");
  if (dataFile !== undefined && version === 2) {
    throw fail("compat", compat, "1.1 for an external data file (data_file)");
  }
  if (dataFile === "") throw fail("data_file", dataFile, "a file name");
  if (dataFileRaw && dataFile === undefined) {
    throw fail("data_file_raw", "on", "only with data_file");
  }
  const preallocation = options.preallocation ?? "off";
  if (preallocation !== "off" && preallocation !== "metadata") {
    throw fail("preallocation", preallocation, "off or metadata");
  }
  let encrypt: "aes" | "luks" | undefined;
  const format = options["encrypt.format"];
  if (format !== undefined) {
    if (format !== "aes" && format !== "luks") {
      throw fail("encrypt.format", format, "luks or aes");
    }
    encrypt = format;
  } else if (onOff(options.encryption, "encryption")) {
    encrypt = "aes";
  }
  if (encrypt && key === undefined) {
    throw new KeyError(
      "qcow2: an encrypted image needs a passphrase (the key option)",
      "qcow2: an encrypted image needs a passphrase (--key-file FILE)",
    );
  }
  const iterTime = Number(options["encrypt.iter-time"] ?? 2000);
  if (!Number.isSafeInteger(iterTime) || iterTime < 1) {
    throw fail(
      "encrypt.iter-time",
      options["encrypt.iter-time"],
      "a whole number of milliseconds, 1 or more",
    );
  }
  const luks = {
    cipherAlg: options["encrypt.cipher-alg"] ?? "aes-256",
    cipherMode: options["encrypt.cipher-mode"] ?? "xts",
    ivgenAlg: options["encrypt.ivgen-alg"] ?? "plain64",
    hashAlg: options["encrypt.hash-alg"] ?? "sha256",
    iterTime,
  };
  if (!/^aes-(128|192|256)$/.test(luks.cipherAlg)) {
    throw fail(
      "encrypt.cipher-alg",
      luks.cipherAlg,
      "aes-128, aes-192 or aes-256",
    );
  }
  if (luks.cipherMode !== "xts" && luks.cipherMode !== "cbc") {
    throw fail("encrypt.cipher-mode", luks.cipherMode, "xts or cbc");
  }
  if (luks.ivgenAlg !== "plain64" && luks.ivgenAlg !== "plain") {
    throw fail("encrypt.ivgen-alg", luks.ivgenAlg, "plain64 or plain");
  }
  if (!["sha1", "sha256", "sha384", "sha512"].includes(luks.hashAlg)) {
    throw fail(
      "encrypt.hash-alg",
      luks.hashAlg,
      "sha1, sha256, sha384 or sha512",
    );
  }
  return {
    version,
    clusterBits,
    refcountOrder,
    lazyRefcounts,
    extendedL2,
    compressionType: compression === "zstd" ? 1 : 0,
    dataFile,
    dataFileRaw,
    preallocation,
    encrypt,
    luks,
    backingFile: options.backing_file,
    backingFormat: options.backing_fmt,
  };
}

/**
 * The L1 entries a disk of `size` bytes needs, refusing sizes whose L1
 * table would pass QEMU's 32 MiB limit (before anything is allocated).
 *
 * @param s the settings
 * @param size the virtual size in bytes
 * @returns the L1 table's entries
 * @throws {ImageFormatError} naming the size and the largest one allowed
 */
export function l1SizeFor(s: Qcow2Settings, size: number): number {
  const clusterSize = 2 ** s.clusterBits;
  const span = clusterSize * (clusterSize / (s.extendedL2 ? 16 : 8));
  const l1Size = Math.ceil(size / span);
  const max = (32 << 20) / 8;
  if (!Number.isSafeInteger(size) || l1Size > max) {
    throw formatErrors(FORMAT)(
      "size",
      size,
      `at most ${
        max * span
      } bytes with ${clusterSize}-byte clusters (an L1 table of 32 MiB, QEMU's limit): use a larger cluster_size`,
    );
  }
  return l1Size;
}

/** The feature name table qemu-img writes. */
const FEATURE_NAMES: [number, number, string][] = [
  [0, 0, "dirty bit"],
  [0, 1, "corrupt bit"],
  [0, 2, "external data file"],
  [0, 3, "compression type"],
  [0, 4, "extended L2 entries"],
  [1, 0, "lazy refcounts"],
  [2, 0, "bitmaps"],
  [2, 1, "raw external data"],
];

/** Where the tables of a new image are. */
export interface HeaderFields {
  size: number;
  l1TableOffset: number;
  l1Size: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  crypto?: { offset: number; length: number };
}

/**
 * The first cluster of a new image: the header, its extensions (backing
 * format, encryption header, feature names) and the backing file name.
 *
 * @param s the settings
 * @param f where the tables are
 * @returns the cluster's bytes
 * @throws {ImageFormatError} when the names do not fit in the cluster
 */
export function headerCluster(s: Qcow2Settings, f: HeaderFields): Uint8Array {
  const clusterSize = 2 ** s.clusterBits;
  const b = new Uint8Array(clusterSize);
  setBe32(b, 0, QCOW_MAGIC);
  setBe32(b, 4, s.version);
  setBe32(b, 20, s.clusterBits);
  setBe64(b, 24, f.size);
  setBe32(b, 32, s.encrypt === "luks" ? 2 : s.encrypt === "aes" ? 1 : 0);
  setBe32(b, 36, f.l1Size);
  setBe64(b, 40, f.l1TableOffset);
  setBe64(b, 48, f.refcountTableOffset);
  setBe32(b, 56, f.refcountTableClusters);
  let at = 72;
  if (s.version === 3) {
    // Incompatible features: external data file (bit 2), compression
    // type (3), extended L2 (4); autoclear bit 1: raw external data.
    setBe64(
      b,
      72,
      (s.extendedL2 ? 16 : 0) | (s.compressionType ? 8 : 0) |
        (s.dataFile !== undefined ? 4 : 0),
    );
    setBe64(b, 80, s.lazyRefcounts ? 1 : 0);
    setBe64(b, 88, s.dataFileRaw ? 2 : 0);
    b[104] = s.compressionType;
    setBe32(b, 96, s.refcountOrder);
    setBe32(b, 100, 112);
    at = 112;
  }
  const encoder = new TextEncoder();
  const extension = (type: number, data: Uint8Array) => {
    const padded = alignUp(data.length, 8);
    if (at + 8 + padded + 8 > clusterSize) {
      throw fail(
        "header extensions",
        at + 8 + padded,
        `within the first cluster (${clusterSize} bytes)`,
      );
    }
    setBe32(b, at, type);
    setBe32(b, at + 4, data.length);
    b.set(data, at + 8);
    at += 8 + padded;
  };
  if (s.backingFile !== undefined && s.backingFormat !== undefined) {
    extension(0xe2792aca, encoder.encode(s.backingFormat));
  }
  if (f.crypto) {
    const data = new Uint8Array(16);
    setBe64(data, 0, f.crypto.offset);
    setBe64(data, 8, f.crypto.length);
    extension(0x0537be77, data);
  }
  if (s.dataFile !== undefined) {
    extension(0x44415441, encoder.encode(s.dataFile));
  }
  const nameBytes = s.backingFile === undefined
    ? 0
    : encoder.encode(s.backingFile).length;
  // The feature name table is optional: left out, as qemu-img leaves it,
  // where it does not fit (512-byte clusters with a data file name).
  if (
    s.version === 3 &&
    at + 8 + 48 * FEATURE_NAMES.length + 8 + nameBytes <= clusterSize
  ) {
    const table = new Uint8Array(48 * FEATURE_NAMES.length);
    FEATURE_NAMES.forEach(([type, bit, name], i) => {
      table[48 * i] = type;
      table[48 * i + 1] = bit;
      table.set(encoder.encode(name), 48 * i + 2);
    });
    extension(0x6803f857, table);
  }
  at += 8; // the end marker (zeros)
  if (s.backingFile !== undefined) {
    const name = encoder.encode(s.backingFile);
    if (name.length > 1023 || at + name.length > clusterSize) {
      throw fail(
        "backing_file",
        s.backingFile,
        `at most 1023 bytes, fitting in the first cluster`,
      );
    }
    setBe64(b, 8, at);
    setBe32(b, 16, name.length);
    b.set(name, at);
  }
  return b;
}

/**
 * Refcounts of clusters, growable, with the refcount blocks and table
 * that store them.
 */
export class RefcountCounter {
  #counts = new Uint32Array(1024);
  /** Clusters counted (one past the highest index set). */
  clusters = 0;
  /** The largest refcount the width holds. */
  readonly max: number;
  constructor(readonly refcountOrder: number) {
    this.max = refcountOrder >= 5 ? 0xffffffff : 2 ** (2 ** refcountOrder) - 1;
  }
  /** The refcount of cluster `index`. */
  get(index: number): number {
    return index < this.#counts.length ? this.#counts[index] : 0;
  }
  /** Adds one to the refcounts of clusters `[from, to)`. */
  add(from: number, to = from + 1) {
    if (to > this.#counts.length) {
      const grown = new Uint32Array(Math.max(to, this.#counts.length * 2));
      grown.set(this.#counts);
      this.#counts = grown;
    }
    for (let i = from; i < to; i++) this.#counts[i]++;
    this.clusters = Math.max(this.clusters, to);
  }
}

/**
 * The refcount blocks and table for `counter`'s clusters, placed from
 * cluster `first` on (blocks, then the table), counting themselves.
 *
 * @returns the bytes to write at `first * clusterSize`, and the table's place
 */
export function refcountStructures(
  counter: RefcountCounter,
  clusterBits: number,
  first: number,
): { bytes: Uint8Array; tableOffset: number; tableClusters: number } {
  const clusterSize = 2 ** clusterBits;
  const width = 2 ** counter.refcountOrder;
  const perBlock = (clusterSize * 8) / width;
  // Blocks and table clusters cover every cluster, themselves included.
  let blocks = 0;
  let table = 0;
  for (;;) {
    const total = Math.max(counter.clusters, first + blocks + table);
    const needBlocks = Math.ceil(total / perBlock);
    const needTable = Math.max(1, Math.ceil((needBlocks * 8) / clusterSize));
    if (needBlocks <= blocks && needTable <= table) break;
    blocks = Math.max(blocks, needBlocks);
    table = Math.max(table, needTable);
  }
  counter.add(first, first + blocks + table);
  const bytes = new Uint8Array((blocks + table) * clusterSize);
  const tableAt = blocks * clusterSize;
  for (let k = 0; k < blocks; k++) {
    const block = bytes.subarray(k * clusterSize, (k + 1) * clusterSize);
    for (let i = 0; i < perBlock; i++) {
      const value = counter.get(k * perBlock + i);
      if (value !== 0) setRefcount(block, i, width, value);
    }
    setBe64(bytes, tableAt + k * 8, (first + k) * clusterSize);
  }
  return {
    bytes,
    tableOffset: (first + blocks) * clusterSize,
    tableClusters: table,
  };
}

/** Sets entry `i` of a refcount block of `width`-bit entries. */
export function setRefcount(
  block: Uint8Array,
  i: number,
  width: number,
  value: number,
) {
  if (width < 8) {
    const bit = i * width;
    const byte = bit >>> 3;
    const shift = bit & 7;
    const mask = ((1 << width) - 1) << shift;
    block[byte] = (block[byte] & ~mask) | ((value << shift) & mask);
  } else if (width === 8) block[i] = value;
  else if (width === 16) setBe16(block, i * 2, value);
  else if (width === 32) setBe32(block, i * 4, value);
  else setBe64(block, i * 8, value);
}

/** Reads entry `i` of a refcount block of `width`-bit entries. */
export function getRefcount(
  block: Uint8Array,
  i: number,
  width: number,
): number {
  const v = new DataView(block.buffer, block.byteOffset, block.length);
  if (width < 8) {
    const bit = i * width;
    return (block[bit >>> 3] >>> (bit & 7)) & ((1 << width) - 1);
  }
  if (width === 8) return block[i];
  if (width === 16) return v.getUint16(i * 2);
  if (width === 32) return v.getUint32(i * 4);
  return Number(v.getBigUint64(i * 8));
}

/** A new LUKS header area and the cipher of its master key. */
export interface NewLuks {
  /** The header and key material, `length` bytes. */
  bytes: Uint8Array;
  cipher: SectorCipher;
}

/** PBKDF2 iterations that take about `ms` milliseconds here (1000 at least). */
async function iterationsFor(hashAlg: string, ms: number): Promise<number> {
  const probe = 10000;
  const salt = new Uint8Array(32);
  const start = performance.now();
  await slotKey(hashAlg, new Uint8Array(8), salt, probe, 32);
  const elapsed = Math.max(1, performance.now() - start);
  return Math.max(1000, Math.min(1 << 24, Math.round((probe * ms) / elapsed)));
}

/**
 * A LUKS version 1 header for a new qcow2, as qemu-img lays it out: the
 * 592-byte header, then the key material of 8 slots (slot 0 holds
 * `passphrase`), each 4 KiB aligned.
 */
export async function newLuks(
  s: Qcow2Settings,
  passphrase: string | Uint8Array,
): Promise<NewLuks> {
  const { cipherAlg, cipherMode, ivgenAlg, hashAlg, iterTime } = s.luks;
  const bits = Number(cipherAlg.slice(4));
  const keyBytes = (bits / 8) * (cipherMode === "xts" ? 2 : 1);
  const mode = `${cipherMode}-${ivgenAlg}`;
  const master = crypto.getRandomValues(new Uint8Array(keyBytes));
  const materialSectors = alignUp(Math.ceil((keyBytes * STRIPES) / SECTOR), 8);
  const firstSlot = 8; // 4 KiB: past the 592-byte header
  const payloadSectors = firstSlot + 8 * materialSectors;
  const bytes = new Uint8Array(payloadSectors * SECTOR);
  const encoder = new TextEncoder();
  bytes.set([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
  setBe16(bytes, 6, 1);
  bytes.set(encoder.encode("aes"), 8);
  bytes.set(encoder.encode(mode), 40);
  bytes.set(encoder.encode(hashAlg), 72);
  setBe32(bytes, 104, payloadSectors);
  setBe32(bytes, 108, keyBytes);
  const digestSalt = crypto.getRandomValues(new Uint8Array(32));
  const digestIter = Math.max(
    1000,
    Math.round((await iterationsFor(hashAlg, iterTime)) / 8),
  );
  bytes.set(
    await masterKeyDigest(hashAlg, master, digestSalt, digestIter),
    112,
  );
  bytes.set(digestSalt, 132);
  setBe32(bytes, 164, digestIter);
  bytes.set(encoder.encode(crypto.randomUUID()), 168);
  const slotIter = await iterationsFor(hashAlg, iterTime);
  for (let i = 0; i < 8; i++) {
    const o = 208 + 48 * i;
    const offset = firstSlot + i * materialSectors;
    setBe32(bytes, o + 40, offset);
    setBe32(bytes, o + 44, STRIPES);
    if (i > 0) {
      setBe32(bytes, o, 0x0000dead);
      continue;
    }
    const salt = crypto.getRandomValues(new Uint8Array(32));
    setBe32(bytes, o, 0x00ac71f3);
    setBe32(bytes, o + 4, slotIter);
    bytes.set(salt, o + 8);
    const password = typeof passphrase === "string"
      ? encoder.encode(passphrase)
      : passphrase;
    const derived = await slotKey(hashAlg, password, salt, slotIter, keyBytes);
    const split = await afSplit(hashAlg, master, STRIPES);
    const material = new Uint8Array(materialSectors * SECTOR);
    material.set(split);
    await luksSectorCipher("aes", mode, derived).encrypt(0, material);
    bytes.set(material, offset * SECTOR);
  }
  if (bytes.length < LUKS_HEADER_SIZE) throw new Error("unreachable");
  return { bytes, cipher: luksSectorCipher("aes", mode, master) };
}
