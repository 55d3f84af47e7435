/**
 * vvfat: a tree of folders and files presented as a read-only raw disk, as
 * QEMU's `fat:DIR` does: an MBR with one partition holding a FAT12, FAT16
 * or FAT32 file system whose files are the tree's files.
 *
 * This module is browser compatible.
 *
 * The disk (512-byte sectors):
 *
 * | sector                  | what                                                   |
 * | ----------------------- | ------------------------------------------------------ |
 * | 0                       | MBR: one partition, type 0x01, 0x06/0x0e or 0x0c       |
 * | 1 .. 2047               | zeros (the partition starts at 1 MiB)                  |
 * | P = 2048                | boot sector with the BPB                               |
 * | P+1, P+6, P+7 (FAT32)   | FSInfo, backup boot sector, backup FSInfo              |
 * | P + reserved            | FAT 1, then FAT 2 (identical), `fatSectors` each       |
 * | then (FAT12/16)         | the root folder, `rootEntries` entries of 32 bytes     |
 * | then                    | the data region: clusters 2, 3, ... of `clusterSize`   |
 *
 * Boot sector (Microsoft's FAT specification names): 0 BS_jmpBoot, 3
 * BS_OEMName, 11 BPB_BytsPerSec, 13 BPB_SecPerClus, 14 BPB_RsvdSecCnt, 16
 * BPB_NumFATs, 17 BPB_RootEntCnt, 19 BPB_TotSec16, 21 BPB_Media, 22
 * BPB_FATSz16, 24 BPB_SecPerTrk, 26 BPB_NumHeads, 28 BPB_HiddSec, 32
 * BPB_TotSec32; FAT12/16: 36 BS_DrvNum, 38 BS_BootSig, 39 BS_VolID, 43
 * BS_VolLab, 54 BS_FilSysType; FAT32: 36 BPB_FATSz32, 40 BPB_ExtFlags, 42
 * BPB_FSVer, 44 BPB_RootClus, 48 BPB_FSInfo, 50 BPB_BkBootSec, 64
 * BS_DrvNum, 66 BS_BootSig, 67 BS_VolID, 71 BS_VolLab, 82 BS_FilSysType;
 * 510 the signature 0x55 0xAA.
 *
 * Directory entry (32 bytes): 0 DIR_Name (8.3, space padded), 11 DIR_Attr,
 * 12 DIR_NTRes, 13 DIR_CrtTimeTenth, 14 DIR_CrtTime, 16 DIR_CrtDate, 18
 * DIR_LstAccDate, 20 DIR_FstClusHI, 22 DIR_WrtTime, 24 DIR_WrtDate, 26
 * DIR_FstClusLO, 28 DIR_FileSize. A long name precedes it as LFN entries
 * (DIR_Attr 0x0F) of 13 UTF-16 units each, last part first: 0 LDIR_Ord
 * (0x40 on the last), 1 LDIR_Name1 (5 units), 11 LDIR_Attr, 12 LDIR_Type,
 * 13 LDIR_Chksum (of the short name), 14 LDIR_Name2 (6), 26
 * LDIR_FstClusLO (0), 28 LDIR_Name3 (2).
 *
 * Laziness: opening lists the tree (names, sizes, times) and lays it out
 * (each folder and file gets a contiguous run of clusters, folders first);
 * no file is read. Reading a sector builds that sector alone: a FAT sector
 * from the runs, a folder sector from the entries it holds, a file sector
 * from one read of that file's bytes.
 *
 * @module
 */

import { probeVvfat } from "./_signatures.ts";
import { setLe16, setLe32 } from "./_binary.ts";
import {
  ImageFormatError,
  type ImageFormatErrorInit,
  TreeError,
  UnsupportedError,
} from "../streams/errors.ts";
import type {
  Driver,
  Extent,
  Image,
  Tree,
  TreeEntry,
} from "../streams/types.ts";
import { checkRange } from "../streams/types.ts";

const FORMAT = "vvfat";
const SECTOR = 512;
/** The partition starts at 1 MiB, as current partitioning tools align it. */
const PARTITION_START = 2048;
/** The geometry the MBR's CHS fields and the BPB use. */
const HEADS = 255;
const SECTORS_PER_TRACK = 63;
const ENTRY = 32;
/** A folder may hold at most 65536 entries (Microsoft's FAT specification). */
const MAX_FOLDER_ENTRIES = 65536;
/** BPB_RootEntCnt is 16 bits, and a whole number of sectors. */
const MAX_ROOT_ENTRIES = 65520;
const MAX_FILE_SIZE = 0xffffffff;
const MAX_NAME_UNITS = 255;
const LFN_UNITS = 13;
const MIN_CLUSTER = 512;
const MAX_CLUSTER = 32768;
const ATTR_VOLUME_ID = 0x08;
const ATTR_DIRECTORY = 0x10;
const ATTR_ARCHIVE = 0x20;
const ATTR_LONG_NAME = 0x0f;
/** The FAT epoch and the last time a FAT date can hold (UTC). */
const FAT_FIRST = Date.UTC(1980, 0, 1);
const FAT_LAST = Date.UTC(2107, 11, 31, 23, 59, 58);

/** A FAT type: the width of a FAT entry in bits. */
export type FatType = 12 | 16 | 32;

/**
 * Cluster counts each type may have. Microsoft's specification decides the
 * type by the count alone (below 4085: FAT12; below 65525: FAT16); these
 * ranges keep 16 clusters away from each boundary, as it advises, so no
 * reader that counts a little differently takes one type for another.
 */
const CLUSTER_RANGE: Record<FatType, [number, number]> = {
  12: [1, 4084 - 16],
  16: [4085 + 16, 65524 - 16],
  32: [65525 + 16, 0x0ffffff5 - 16],
};
/** End of chain, and the first two FAT entries (media 0xF8, clean). */
const EOC: Record<FatType, number> = { 12: 0xfff, 16: 0xffff, 32: 0x0fffffff };
const MEDIA = 0xf8;

/** Options for {@linkcode openTree}. */
export interface VvfatOptions {
  /**
   * The FAT type. By default the smallest that holds the tree: FAT12 up to
   * about 16 MiB, FAT16 up to about 512 MiB, FAT32 beyond.
   */
  fatType?: FatType;
  /**
   * Bytes per cluster, a power of two from 512 to 32768. By default the
   * smallest the FAT type allows for the tree (at least 4 KiB for FAT32
   * volumes above 260 MiB, 8 KiB above 8 GiB, ... as Microsoft formats).
   */
  clusterSize?: number;
  /**
   * The volume label: up to 11 characters that a short name allows, or
   * spaces (stored in upper case). @default no label ("NO NAME")
   */
  label?: string;
  /** The volume serial number. @default a hash of the tree's listing */
  serial?: number;
}

interface NodeBase {
  /** The long name. */
  name: string;
  /** The path in the tree. */
  path: string;
  mtime: number;
  /** The 8.3 name as stored (11 bytes, space padded). */
  shortName: Uint8Array;
  /** LFN entries before the short entry (0 when the name is its own 8.3 name). */
  lfnEntries: number;
  /** First cluster (0: none, for an empty file). */
  first: number;
  /** Clusters allocated. */
  clusters: number;
}

interface FileNode extends NodeBase {
  kind: "file";
  size: number;
}

interface FolderNode extends NodeBase {
  kind: "dir";
  parent?: FolderNode;
  children: Node[];
  /** Entries before the children's: `.` and `..`, or the volume label in the root. */
  leading: number;
  /** The entry index where each child's entries begin. */
  starts: number[];
  /** Entries in all. */
  entries: number;
}

type Node = FileNode | FolderNode;

function fail(init: Omit<ImageFormatErrorInit, "format">): ImageFormatError {
  return new ImageFormatError({ format: FORMAT, ...init });
}

// ---------------------------------------------------------------------------
// Names

/** Characters a long name may not hold (besides control characters). */
const FORBIDDEN = '"*/:<>?\\|';
/** ASCII characters a short name may hold besides letters and digits. */
const SHORT_EXTRA = "!#$%&'()-@^_`{}~";

function isShortChar(c: string): boolean {
  return (c >= "A" && c <= "Z") || (c >= "0" && c <= "9") ||
    SHORT_EXTRA.includes(c);
}

/** Refuses names FAT cannot hold, naming the path and the rule. */
function checkName(name: string, path: string): void {
  const bad = (limit: string) => fail({ field: "name", value: path, limit });
  if (name.length === 0 || name.length > MAX_NAME_UNITS) {
    throw bad(
      `1 to ${MAX_NAME_UNITS} UTF-16 units long (it has ${name.length})`,
    );
  }
  if (!name.isWellFormed()) {
    throw bad("valid Unicode (it holds an unpaired surrogate)");
  }
  for (const c of name) {
    if (c < " " || FORBIDDEN.includes(c)) {
      throw bad(
        `free of control characters and of ${FORBIDDEN.split("").join(" ")} ` +
          `(it holds ${JSON.stringify(c)})`,
      );
    }
  }
  if (name.endsWith(".") || name.endsWith(" ")) {
    throw bad("without a trailing period or space (FAT readers drop them)");
  }
}

/** Upper case one UTF-16 unit at a time, as FAT's case-insensitive compare does. */
function foldCase(name: string): string {
  let out = "";
  for (const c of name) {
    const upper = c.toUpperCase();
    out += upper.length === c.length ? upper : c;
  }
  return out;
}

/** True when `name` is a valid 8.3 name in upper case: it needs no long name. */
function isShortName(name: string): boolean {
  const dot = name.indexOf(".");
  const base = dot < 0 ? name : name.slice(0, dot);
  const ext = dot < 0 ? "" : name.slice(dot + 1);
  if (base.length < 1 || base.length > 8 || ext.length > 3) return false;
  if (dot >= 0 && ext.length === 0) return false;
  return [...base, ...ext].every(isShortChar);
}

/** The 11 stored bytes of a base and extension. */
function shortBytes(base: string, ext: string): string {
  return base.padEnd(8, " ") + ext.padEnd(3, " ");
}

/**
 * The basis of a short name (Microsoft's specification): upper case, spaces
 * and leading periods dropped, characters a short name cannot hold as `_`,
 * the part after the last period as the extension. `lossless` when the
 * long name is this short name up to case.
 */
function basisName(
  name: string,
): { base: string; ext: string; lossless: boolean } {
  const map = (part: string) => {
    let out = "";
    for (const c of part) {
      if (c === " " || c === ".") continue;
      const upper = c >= "a" && c <= "z" ? c.toUpperCase() : c;
      out += isShortChar(upper) ? upper : "_";
    }
    return out;
  };
  const trimmed = name.replace(/^\.+/, "");
  const dot = trimmed.lastIndexOf(".");
  const base = map(dot < 0 ? trimmed : trimmed.slice(0, dot));
  const ext = map(dot < 0 ? "" : trimmed.slice(dot + 1));
  const short = base.slice(0, 8) + (ext ? "." + ext.slice(0, 3) : "");
  return {
    base: base.slice(0, 8) || "_",
    ext: ext.slice(0, 3),
    lossless: foldCase(name) === short,
  };
}

/**
 * Gives every child of a folder a unique short name: names that are valid
 * 8.3 names keep them (no long name), the others get their basis, with a
 * numeric tail `~N` when the basis lost something or is taken. Refuses
 * names that differ only in case (FAT compares names without case).
 */
function nameChildren(folder: FolderNode): void {
  const seen = new Map<string, string>();
  for (const child of folder.children) {
    const key = foldCase(child.name);
    const other = seen.get(key);
    if (other !== undefined) {
      throw fail({
        field: "name",
        value: child.path,
        limit:
          `different from "${other}" in more than case (FAT names are case-insensitive)`,
      });
    }
    seen.set(key, child.name);
  }
  const taken = new Set<string>();
  const rest: Node[] = [];
  const encoder = new TextEncoder();
  for (const child of folder.children) {
    if (isShortName(child.name)) {
      const dot = child.name.indexOf(".");
      const stored = dot < 0
        ? shortBytes(child.name, "")
        : shortBytes(child.name.slice(0, dot), child.name.slice(dot + 1));
      taken.add(stored);
      child.shortName = encoder.encode(stored);
      child.lfnEntries = 0;
    } else {
      rest.push(child);
    }
  }
  /** The next tail to try for each basis, so a folder of similar names stays linear. */
  const nextTail = new Map<string, number>();
  for (const child of rest) {
    const { base, ext, lossless } = basisName(child.name);
    let stored = shortBytes(base, ext);
    if (!lossless || taken.has(stored)) {
      const key = shortBytes(base, ext);
      let n = nextTail.get(key) ?? 1;
      for (;; n++) {
        const tail = `~${n}`;
        stored = shortBytes(base.slice(0, 8 - tail.length) + tail, ext);
        if (!taken.has(stored)) break;
      }
      nextTail.set(key, n + 1);
    }
    taken.add(stored);
    child.shortName = encoder.encode(stored);
    child.lfnEntries = Math.ceil(child.name.length / LFN_UNITS);
  }
}

/** The checksum of a short name that each of its LFN entries carries. */
function shortNameChecksum(name: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < 11; i++) {
    sum = (((sum & 1) << 7) + (sum >> 1) + name[i]) & 0xff;
  }
  return sum;
}

/** Checks and encodes a volume label (11 bytes, space padded). */
function labelBytes(label: string): Uint8Array {
  const upper = label.replace(/[a-z]/g, (c) => c.toUpperCase());
  if (
    upper.length === 0 || upper.length > 11 || upper.startsWith(" ") ||
    ![...upper].every((c) => c === " " || isShortChar(c))
  ) {
    throw fail({
      field: "label",
      value: label,
      limit: `1 to 11 letters, digits, spaces (not first) or ${
        SHORT_EXTRA.split("").join(" ")
      }`,
    });
  }
  return new TextEncoder().encode(upper.padEnd(11, " "));
}

// ---------------------------------------------------------------------------
// Times

/** FAT date and time (two-second resolution) and the tenths, in UTC. */
function fatTime(ms: number): { date: number; time: number; tenth: number } {
  const t = new Date(Math.min(FAT_LAST, Math.max(FAT_FIRST, Math.floor(ms))));
  const seconds = t.getUTCSeconds();
  return {
    date: ((t.getUTCFullYear() - 1980) << 9) | ((t.getUTCMonth() + 1) << 5) |
      t.getUTCDate(),
    time: (t.getUTCHours() << 11) | (t.getUTCMinutes() << 5) | (seconds >> 1),
    // DIR_CrtTimeTenth counts 10 ms units, 0..199, the odd second included.
    tenth: (seconds & 1) * 100 + Math.floor(t.getUTCMilliseconds() / 10),
  };
}

// ---------------------------------------------------------------------------
// Listing the tree

async function listTree(
  tree: Tree,
): Promise<{ root: FolderNode; files: FileNode[]; folders: FolderNode[] }> {
  const root: FolderNode = {
    kind: "dir",
    name: "",
    path: "",
    mtime: FAT_FIRST,
    shortName: new Uint8Array(11),
    lfnEntries: 0,
    first: 0,
    clusters: 0,
    children: [],
    leading: 0,
    starts: [],
    entries: 0,
  };
  const files: FileNode[] = [];
  const folders: FolderNode[] = [root];
  // Depth first, pre-order, with an explicit stack: deep trees must not
  // exhaust the call stack.
  const stack = [root];
  while (stack.length) {
    const folder = stack.pop()!;
    const entries: TreeEntry[] = await tree.list(folder.path);
    // Sorted, so the disk is the same whatever order the tree lists in.
    entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const entry of entries) {
      const path = folder.path === ""
        ? entry.name
        : `${folder.path}/${entry.name}`;
      checkName(entry.name, path);
      if (!Number.isFinite(entry.mtime)) {
        throw new TreeError(`mtime ${entry.mtime} is not a time`, path);
      }
      const base = {
        name: entry.name,
        path,
        mtime: entry.mtime,
        shortName: new Uint8Array(11),
        lfnEntries: 0,
        first: 0,
        clusters: 0,
      };
      if (entry.kind === "dir") {
        const child: FolderNode = {
          ...base,
          kind: "dir",
          parent: folder,
          children: [],
          leading: 2,
          starts: [],
          entries: 0,
        };
        folder.children.push(child);
      } else if (entry.kind === "file") {
        if (!Number.isSafeInteger(entry.size) || entry.size < 0) {
          throw new TreeError(`size ${entry.size} is not a byte count`, path);
        }
        if (entry.size > MAX_FILE_SIZE) {
          throw fail({
            field: "file size",
            value: entry.size,
            limit:
              `at most ${MAX_FILE_SIZE} bytes (4 GiB - 1, FAT's limit) for ${path}`,
          });
        }
        const child: FileNode = { ...base, kind: "file", size: entry.size };
        folder.children.push(child);
        files.push(child);
      } else {
        throw new TreeError(`unknown kind ${JSON.stringify(entry.kind)}`, path);
      }
    }
    nameChildren(folder);
    // Pushed in reverse, so folders are listed in name order.
    const subfolders = folder.children.filter((c): c is FolderNode =>
      c.kind === "dir"
    );
    for (let i = subfolders.length - 1; i >= 0; i--) stack.push(subfolders[i]);
    folders.push(...subfolders);
  }
  return { root, files, folders };
}

/** Lays out a folder's entries: leading ones, then each child's LFN entries and short entry. */
function layoutEntries(folder: FolderNode, hasLabel: boolean): void {
  folder.leading = folder.parent ? 2 : hasLabel ? 1 : 0;
  let at = folder.leading;
  folder.starts = folder.children.map((child) => {
    const start = at;
    at += child.lfnEntries + 1;
    return start;
  });
  folder.entries = at;
}

// ---------------------------------------------------------------------------
// Choosing the file system's shape

/** Where everything lies in the partition (in sectors from its start). */
interface Layout {
  fatType: FatType;
  clusterSize: number;
  sectorsPerCluster: number;
  reservedSectors: number;
  fatSectors: number;
  /** BPB_RootEntCnt (0 for FAT32, whose root folder lives in clusters). */
  rootEntries: number;
  rootSectors: number;
  totalSectors: number;
  clusterCount: number;
}

/** Clusters the tree needs with clusters of `clusterSize` bytes. */
function neededClusters(
  fatType: FatType,
  clusterSize: number,
  files: FileNode[],
  folders: FolderNode[],
): number {
  let n = 0;
  for (const file of files) n += Math.ceil(file.size / clusterSize);
  for (const folder of folders) {
    if (folder.parent || fatType === 32) {
      n += Math.max(1, Math.ceil((folder.entries * ENTRY) / clusterSize));
    }
  }
  return n;
}

/**
 * The layout for a FAT type and cluster size, or undefined when the tree
 * does not fit it. The partition's sector count is a whole number of
 * tracks (mtools refuses others); the clusters that adds are free.
 */
function layoutFor(
  fatType: FatType,
  clusterSize: number,
  needed: number,
  rootUsed: number,
): Layout | undefined {
  const sectorsPerCluster = clusterSize / SECTOR;
  const reservedSectors = fatType === 32 ? 32 : 1;
  // 512 root entries is what the specification advises for FAT16.
  const rootEntries = fatType === 32
    ? 0
    : Math.max(512, Math.ceil(rootUsed / 16) * 16);
  if (rootEntries > MAX_ROOT_ENTRIES) return undefined;
  const rootSectors = (rootEntries * ENTRY) / SECTOR;
  const [min, max] = CLUSTER_RANGE[fatType];
  let clusterCount = Math.max(needed, min);
  // Rounding to a track adds clusters, which may grow the FAT by a sector,
  // which may move the rounding: a few rounds settle it.
  for (let round = 0; round < 8; round++) {
    const fatSectors = Math.ceil(((clusterCount + 2) * fatType) / 8 / SECTOR);
    const overhead = reservedSectors + 2 * fatSectors + rootSectors;
    const totalSectors = Math.ceil(
      (overhead + clusterCount * sectorsPerCluster) / SECTORS_PER_TRACK,
    ) * SECTORS_PER_TRACK;
    const count = Math.floor((totalSectors - overhead) / sectorsPerCluster);
    if (count === clusterCount) {
      if (
        clusterCount > max || PARTITION_START + totalSectors > 0xffffffff
      ) {
        return undefined;
      }
      return {
        fatType,
        clusterSize,
        sectorsPerCluster,
        reservedSectors,
        fatSectors,
        rootEntries,
        rootSectors,
        totalSectors,
        clusterCount,
      };
    }
    clusterCount = count;
  }
  return undefined;
}

const CLUSTER_SIZES = [512, 1024, 2048, 4096, 8192, 16384, 32768];

/** Microsoft's smallest FAT32 cluster for a volume of `bytes`. */
function fat32MinCluster(bytes: number): number {
  if (bytes <= 260 * 2 ** 20) return 512;
  if (bytes <= 8 * 2 ** 30) return 4096;
  if (bytes <= 16 * 2 ** 30) return 8192;
  if (bytes <= 32 * 2 ** 30) return 16384;
  return 32768;
}

function chooseLayout(
  options: VvfatOptions,
  files: FileNode[],
  folders: FolderNode[],
  root: FolderNode,
): Layout {
  const { fatType, clusterSize } = options;
  if (fatType !== undefined && ![12, 16, 32].includes(fatType)) {
    throw fail({ field: "fatType", value: fatType, limit: "12, 16 or 32" });
  }
  if (clusterSize !== undefined && !CLUSTER_SIZES.includes(clusterSize)) {
    throw fail({
      field: "clusterSize",
      value: clusterSize,
      limit: `a power of two from ${MIN_CLUSTER} to ${MAX_CLUSTER}`,
    });
  }
  let bytes = 0;
  for (const file of files) bytes += file.size;
  const types: FatType[] = fatType ? [fatType] : [12, 16, 32];
  for (const type of types) {
    let sizes = clusterSize ? [clusterSize] : CLUSTER_SIZES;
    if (!fatType && !clusterSize) {
      // Chosen by size: FAT12 up to 4 KiB clusters (~16 MiB), FAT16 up to
      // 8 KiB (~512 MiB), as formatting tools do; FAT32 beyond.
      if (type === 12) sizes = sizes.filter((c) => c <= 4096);
      if (type === 16) sizes = sizes.filter((c) => c <= 8192);
    }
    if (type === 32 && !clusterSize) {
      sizes = sizes.filter((c) => c >= fat32MinCluster(bytes));
    }
    for (const size of sizes) {
      const needed = neededClusters(type, size, files, folders);
      const layout = layoutFor(type, size, needed, root.entries);
      if (layout) return layout;
    }
  }
  const type = fatType ?? 32;
  if (
    type !== 32 &&
    Math.max(512, Math.ceil(root.entries / 16) * 16) > MAX_ROOT_ENTRIES
  ) {
    throw fail({
      field: "root folder entries",
      value: root.entries,
      limit:
        `at most ${MAX_ROOT_ENTRIES} on FAT${type} (long names take several; FAT32 has no such limit)`,
    });
  }
  const largest = clusterSize ?? MAX_CLUSTER;
  throw fail({
    field: "tree size",
    value: bytes,
    limit:
      `within FAT${type}'s ${
        CLUSTER_RANGE[type][1]
      } clusters of ${largest} bytes${
        type === 32 ? " and 2^32 sectors (2 TiB)" : ""
      } ` +
      `(${neededClusters(type, largest, files, folders)} needed)${
        type === 32 ? "" : "; a larger FAT type holds more"
      }`,
  });
}

// ---------------------------------------------------------------------------
// Fixed sectors

/** CHS bytes of a sector in the MBR (0xFE 0xFF 0xFF past cylinder 1023). */
function chs(lba: number): number[] {
  const cylinder = Math.floor(lba / (HEADS * SECTORS_PER_TRACK));
  if (cylinder > 1023) return [0xfe, 0xff, 0xff];
  const head = Math.floor(lba / SECTORS_PER_TRACK) % HEADS;
  const sector = (lba % SECTORS_PER_TRACK) + 1;
  return [head, sector | ((cylinder >> 2) & 0xc0), cylinder & 0xff];
}

/** Boot code for sectors that are not bootable: `int 18h` (try the next device), then halt. */
const NOT_BOOTABLE = [0xcd, 0x18, 0xeb, 0xfe];

function masterBootRecord(layout: Layout, serial: number): Uint8Array {
  const b = new Uint8Array(SECTOR);
  b.set(NOT_BOOTABLE, 0);
  setLe32(b, 440, serial);
  const last = PARTITION_START + layout.totalSectors - 1;
  const type = layout.fatType === 12
    ? 0x01
    : layout.fatType === 32
    ? 0x0c
    : last < 1024 * HEADS * SECTORS_PER_TRACK
    ? 0x06
    : 0x0e;
  const entry = 446;
  b[entry] = 0x00; // not active
  b.set(chs(PARTITION_START), entry + 1);
  b[entry + 4] = type;
  b.set(chs(last), entry + 5);
  setLe32(b, entry + 8, PARTITION_START);
  setLe32(b, entry + 12, layout.totalSectors);
  b[510] = 0x55;
  b[511] = 0xaa;
  return b;
}

function bootSector(
  layout: Layout,
  serial: number,
  label: Uint8Array,
  rootCluster: number,
): Uint8Array {
  const b = new Uint8Array(SECTOR);
  const fat32 = layout.fatType === 32;
  b.set(fat32 ? [0xeb, 0x58, 0x90] : [0xeb, 0x3c, 0x90], 0); // BS_jmpBoot
  b.set(new TextEncoder().encode("MSWIN4.1"), 3); // BS_OEMName
  setLe16(b, 11, SECTOR); // BPB_BytsPerSec
  b[13] = layout.sectorsPerCluster; // BPB_SecPerClus
  setLe16(b, 14, layout.reservedSectors); // BPB_RsvdSecCnt
  b[16] = 2; // BPB_NumFATs
  setLe16(b, 17, layout.rootEntries); // BPB_RootEntCnt
  const small = !fat32 && layout.totalSectors < 0x10000;
  setLe16(b, 19, small ? layout.totalSectors : 0); // BPB_TotSec16
  b[21] = MEDIA; // BPB_Media
  setLe16(b, 22, fat32 ? 0 : layout.fatSectors); // BPB_FATSz16
  setLe16(b, 24, SECTORS_PER_TRACK); // BPB_SecPerTrk
  setLe16(b, 26, HEADS); // BPB_NumHeads
  setLe32(b, 28, PARTITION_START); // BPB_HiddSec
  setLe32(b, 32, small ? 0 : layout.totalSectors); // BPB_TotSec32
  let ext = 36;
  if (fat32) {
    setLe32(b, 36, layout.fatSectors); // BPB_FATSz32
    setLe16(b, 40, 0); // BPB_ExtFlags: both FATs mirrored
    setLe16(b, 42, 0); // BPB_FSVer 0.0
    setLe32(b, 44, rootCluster); // BPB_RootClus
    setLe16(b, 48, 1); // BPB_FSInfo
    setLe16(b, 50, 6); // BPB_BkBootSec
    ext = 64;
  }
  b[ext] = 0x80; // BS_DrvNum: a hard disk
  b[ext + 2] = 0x29; // BS_BootSig: the next three fields are present
  setLe32(b, ext + 3, serial); // BS_VolID
  b.set(label, ext + 7); // BS_VolLab
  b.set(
    new TextEncoder().encode(`FAT${layout.fatType}   `),
    ext + 18,
  ); // BS_FilSysType
  b.set(NOT_BOOTABLE, ext + 26);
  b[510] = 0x55;
  b[511] = 0xaa;
  return b;
}

function fsInfoSector(freeCount: number, nextFree: number): Uint8Array {
  const b = new Uint8Array(SECTOR);
  setLe32(b, 0, 0x41615252); // FSI_LeadSig
  setLe32(b, 484, 0x61417272); // FSI_StrucSig
  setLe32(b, 488, freeCount); // FSI_Free_Count
  setLe32(b, 492, nextFree); // FSI_Nxt_Free
  setLe32(b, 508, 0xaa550000); // FSI_TrailSig
  return b;
}

/** A 32-bit FNV-1a hash of the listing: the default volume serial number. */
function listingHash(files: FileNode[], folders: FolderNode[]): number {
  let h = 0x811c9dc5;
  const mix = (text: string) => {
    for (let i = 0; i < text.length; i++) {
      h = Math.imul(h ^ text.charCodeAt(i), 0x01000193) >>> 0;
    }
  };
  for (const f of folders) mix(`${f.path}/\0${f.mtime}\0`);
  for (const f of files) mix(`${f.path}\0${f.size}\0${f.mtime}\0`);
  return h >>> 0;
}

// ---------------------------------------------------------------------------
// The disk

/**
 * Presents a tree as a read-only raw disk: an MBR with one FAT12, FAT16 or
 * FAT32 partition holding the tree's folders and files, with long names,
 * unique 8.3 names and the files' modification times (as UTC). Opening
 * lists the whole tree but reads no file; each read builds only the
 * sectors asked for, reading only the file bytes they hold. Free clusters
 * and unused FAT sectors are `zero` in the allocation map.
 *
 * Errors ({@linkcode ImageFormatError}, format `vvfat`): names FAT cannot
 * hold (control characters, `" * / : < > ? \ |`, a trailing period or
 * space, more than 255 UTF-16 units, names differing only in case), files
 * of 4 GiB or more, folders of more than 65536 entries, trees too large for
 * the FAT type. The disk has no `write`: it is read-only (stack
 * `snapshot` on it to write in memory).
 *
 * @param tree the folders and files (`memoryTree`, or `directoryTree` in Deno)
 * @param options FAT type, cluster size, volume label, serial number
 * @returns the disk, as an Image of format `vvfat`
 *
 * @example
 * ```ts
 * import { memoryTree, openTree } from "../mod.ts";
 * const tree = memoryTree({
 *   "Read me first.txt": new TextEncoder().encode("hello\n"),
 *   "docs/guide.txt": new TextEncoder().encode("a guide\n"),
 * });
 * const disk = await openTree(tree, { label: "DEMO" });
 * console.log(disk.format, disk.details?.fatType); // vvfat 12
 * const mbr = await disk.read(0, 512);
 * console.log(mbr[510].toString(16), mbr[446 + 4]); // 55 1
 * ```
 */
export async function openTree(
  tree: Tree,
  options: VvfatOptions = {},
): Promise<Image> {
  const label = options.label === undefined
    ? undefined
    : labelBytes(options.label);
  const { root, files, folders } = await listTree(tree);
  for (const folder of folders) {
    layoutEntries(folder, label !== undefined);
    if (folder.entries > MAX_FOLDER_ENTRIES) {
      throw fail({
        field: "folder entries",
        value: folder.entries,
        limit: `at most ${MAX_FOLDER_ENTRIES} in ${
          folder.path || "the root folder"
        } (each long name takes 1 + ⌈length / 13⌉)`,
      });
    }
  }
  const layout = chooseLayout(options, files, folders, root);
  const { fatType, clusterSize, clusterCount } = layout;

  // Clusters: the FAT32 root folder, the other folders, then the files, each
  // one contiguous run.
  const allocated: Node[] = [];
  let nextFree = 2;
  const allocate = (node: Node, clusters: number) => {
    if (clusters === 0) return;
    node.first = nextFree;
    node.clusters = clusters;
    nextFree += clusters;
    allocated.push(node);
  };
  for (const folder of folders) {
    if (folder.parent || fatType === 32) {
      allocate(
        folder,
        Math.max(1, Math.ceil((folder.entries * ENTRY) / clusterSize)),
      );
    }
  }
  for (const file of files) allocate(file, Math.ceil(file.size / clusterSize));
  const firsts = allocated.map((n) => n.first);

  /** The node holding `cluster`, or undefined for a free cluster. */
  const owner = (cluster: number): Node | undefined => {
    if (cluster < 2 || cluster >= nextFree) return undefined;
    let lo = 0;
    let hi = firsts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (firsts[mid] <= cluster) lo = mid;
      else hi = mid - 1;
    }
    return allocated[lo];
  };

  const serial = (options.serial ?? listingHash(files, folders)) >>> 0;
  const volumeLabel = label ?? new TextEncoder().encode("NO NAME    ");
  let newest = FAT_FIRST;
  for (const f of folders) newest = Math.max(newest, f.mtime);
  for (const f of files) newest = Math.max(newest, f.mtime);
  root.mtime = newest;

  const mbr = masterBootRecord(layout, serial);
  const boot = bootSector(layout, serial, volumeLabel, root.first);
  const fsInfo = fatType === 32
    ? fsInfoSector(
      clusterCount - (nextFree - 2),
      nextFree < clusterCount + 2 ? nextFree : 0xffffffff,
    )
    : undefined;
  const reservedSector = (index: number): Uint8Array | undefined => {
    if (index === 0 || index === 6 && fsInfo) return boot;
    if (index === 1 || index === 7) return fsInfo;
    return undefined;
  };

  // Byte offsets on the disk.
  const partition = PARTITION_START * SECTOR;
  const fatBytes = layout.fatSectors * SECTOR;
  const fatStart = partition + layout.reservedSectors * SECTOR;
  const rootStart = fatStart + 2 * fatBytes;
  const dataStart = rootStart + layout.rootSectors * SECTOR;
  const dataEnd = dataStart + clusterCount * clusterSize;
  const size = partition + layout.totalSectors * SECTOR;

  // --- FAT sectors ---------------------------------------------------------

  const entryValue = (cluster: number): number => {
    if (cluster === 0) return (EOC[fatType] & ~0xff) | MEDIA;
    if (cluster === 1) return EOC[fatType];
    const node = owner(cluster);
    if (!node) return 0;
    return cluster + 1 < node.first + node.clusters
      ? cluster + 1
      : EOC[fatType];
  };
  /** The whole FAT12 (at most 6 KiB): built once, as its entries straddle bytes. */
  let fat12: Uint8Array | undefined;
  const fat12Table = () => {
    if (fat12) return fat12;
    fat12 = new Uint8Array(fatBytes);
    for (let n = 0; n < nextFree; n++) {
      const v = entryValue(n);
      const at = (n * 3) >> 1;
      if (n & 1) {
        fat12[at] |= (v & 0x0f) << 4;
        fat12[at + 1] = v >> 4;
      } else {
        fat12[at] = v & 0xff;
        fat12[at + 1] |= v >> 8;
      }
    }
    return fat12;
  };
  /** Writes FAT bytes `[offset, offset + length)` (within one copy) into `out` at `at`. */
  const fatRange = (
    offset: number,
    length: number,
    out: Uint8Array,
    at: number,
  ) => {
    if (fatType === 12) {
      out.set(fat12Table().subarray(offset, offset + length), at);
      return;
    }
    const width = fatType / 8;
    const first = Math.floor(offset / width);
    const last = Math.min(nextFree, Math.ceil((offset + length) / width));
    if (first >= last) return; // free clusters only: zeros
    const entries = new Uint8Array((last - first) * width);
    for (let n = first; n < last; n++) {
      const v = entryValue(n);
      if (width === 2) setLe16(entries, (n - first) * 2, v);
      else setLe32(entries, (n - first) * 4, v);
    }
    const skip = offset - first * width;
    out.set(
      entries.subarray(skip, Math.min(entries.length, skip + length)),
      at,
    );
  };

  // --- Folder sectors ------------------------------------------------------

  const shortEntry = (
    into: Uint8Array,
    at: number,
    name: Uint8Array,
    attr: number,
    mtime: number,
    cluster: number,
    fileSize: number,
  ) => {
    const t = fatTime(mtime);
    into.set(name, at); // DIR_Name
    into[at + 11] = attr; // DIR_Attr
    into[at + 13] = t.tenth; // DIR_CrtTimeTenth
    setLe16(into, at + 14, t.time); // DIR_CrtTime
    setLe16(into, at + 16, t.date); // DIR_CrtDate
    setLe16(into, at + 18, t.date); // DIR_LstAccDate
    setLe16(into, at + 20, cluster >>> 16); // DIR_FstClusHI
    setLe16(into, at + 22, t.time); // DIR_WrtTime
    setLe16(into, at + 24, t.date); // DIR_WrtDate
    setLe16(into, at + 26, cluster & 0xffff); // DIR_FstClusLO
    setLe32(into, at + 28, fileSize); // DIR_FileSize
  };
  /** A child's LFN entries (last part first) and its short entry. */
  const childEntries = (child: Node): Uint8Array => {
    const count = child.lfnEntries;
    const b = new Uint8Array((count + 1) * ENTRY);
    const checksum = shortNameChecksum(child.shortName);
    const name = child.name;
    // Offsets of the 13 UTF-16 units in an LFN entry.
    const slots = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
    for (let k = 0; k < count; k++) {
      const order = count - k;
      const at = k * ENTRY;
      b[at] = order | (k === 0 ? 0x40 : 0); // LDIR_Ord
      b[at + 11] = ATTR_LONG_NAME; // LDIR_Attr
      b[at + 13] = checksum; // LDIR_Chksum
      for (let i = 0; i < LFN_UNITS; i++) {
        const unit = (order - 1) * LFN_UNITS + i;
        // The name, one NUL after it if there is room, then 0xFFFF padding.
        const value = unit < name.length
          ? name.charCodeAt(unit)
          : unit === name.length
          ? 0
          : 0xffff;
        setLe16(b, at + slots[i], value);
      }
    }
    shortEntry(
      b,
      count * ENTRY,
      child.shortName,
      child.kind === "dir" ? ATTR_DIRECTORY : ATTR_ARCHIVE,
      child.mtime,
      child.first,
      child.kind === "file" ? child.size : 0,
    );
    return b;
  };
  const dotName = new TextEncoder().encode(".          ");
  const dotDotName = new TextEncoder().encode("..         ");
  /** Writes bytes `[offset, offset + length)` of a folder into `out` at `at`. */
  const folderRange = (
    folder: FolderNode,
    offset: number,
    length: number,
    out: Uint8Array,
    at: number,
  ) => {
    const firstEntry = Math.floor(offset / ENTRY);
    const lastEntry = Math.min(
      folder.entries,
      Math.ceil((offset + length) / ENTRY),
    );
    if (firstEntry >= lastEntry) return; // past the last entry: zeros
    const window = new Uint8Array((lastEntry - firstEntry) * ENTRY);
    const place = (bytes: Uint8Array, entry: number) => {
      // `bytes` holds entries from `entry` on; copy the part in the window.
      const from = Math.max(0, firstEntry - entry) * ENTRY;
      const to = Math.min(bytes.length, (lastEntry - entry) * ENTRY);
      if (from < to) {
        window.set(
          bytes.subarray(from, to),
          Math.max(0, entry - firstEntry) * ENTRY,
        );
      }
    };
    if (firstEntry < folder.leading) {
      const leading = new Uint8Array(folder.leading * ENTRY);
      if (folder.parent) {
        const parent = folder.parent;
        shortEntry(
          leading,
          0,
          dotName,
          ATTR_DIRECTORY,
          folder.mtime,
          folder.first,
          0,
        );
        shortEntry(
          leading,
          ENTRY,
          dotDotName,
          ATTR_DIRECTORY,
          parent.parent ? parent.mtime : folder.mtime,
          // `..` of a folder in the root names cluster 0, even on FAT32.
          parent.parent ? parent.first : 0,
          0,
        );
      } else {
        shortEntry(leading, 0, volumeLabel, ATTR_VOLUME_ID, root.mtime, 0, 0);
      }
      place(leading, 0);
    }
    // The last child starting at or before the window's first entry.
    const { starts, children } = folder;
    let lo = 0;
    let hi = starts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (starts[mid] <= firstEntry) lo = mid;
      else hi = mid - 1;
    }
    for (let i = lo; i < children.length && starts[i] < lastEntry; i++) {
      place(childEntries(children[i]), starts[i]);
    }
    const skip = offset - firstEntry * ENTRY;
    out.set(
      window.subarray(skip, Math.min(window.length, skip + length)),
      at,
    );
  };

  // --- File bytes ----------------------------------------------------------

  const fileRange = async (
    file: FileNode,
    offset: number,
    length: number,
  ): Promise<Uint8Array> => {
    const bytes = await tree.read(file.path, offset, length);
    if (bytes.length !== length) {
      throw new TreeError(
        `read ${bytes.length} bytes where ${length} were asked at ${offset}: ` +
          "the file changed since the tree was listed",
        file.path,
      );
    }
    return bytes;
  };

  async function read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(size, offset, length);
    // A read within one file's bytes (most of convert's 2 MiB blocks) is the
    // tree's read as it is, with no copy.
    if (offset >= dataStart && offset < dataEnd && length > 0) {
      const node = owner(2 + Math.floor((offset - dataStart) / clusterSize));
      const nodeStart = node && dataStart + (node.first - 2) * clusterSize;
      if (
        node?.kind === "file" && offset + length <= nodeStart! + node.size
      ) {
        return await fileRange(node, offset - nodeStart!, length);
      }
    }
    const out = new Uint8Array(length);
    const pending: Promise<void>[] = [];
    const end = offset + length;
    for (let pos = offset; pos < end;) {
      let stop: number;
      if (pos < SECTOR) {
        stop = Math.min(end, SECTOR);
        out.set(mbr.subarray(pos, stop), pos - offset);
      } else if (pos < partition) {
        stop = Math.min(end, partition);
      } else if (pos < fatStart) {
        const index = Math.floor((pos - partition) / SECTOR);
        const sectorStart = partition + index * SECTOR;
        stop = Math.min(end, sectorStart + SECTOR);
        const sector = reservedSector(index);
        if (sector) {
          out.set(
            sector.subarray(pos - sectorStart, stop - sectorStart),
            pos - offset,
          );
        }
      } else if (pos < rootStart) {
        const copy = pos < fatStart + fatBytes ? fatStart : fatStart + fatBytes;
        stop = Math.min(end, copy + fatBytes);
        fatRange(pos - copy, stop - pos, out, pos - offset);
      } else if (pos < dataStart) {
        stop = Math.min(end, dataStart);
        folderRange(root, pos - rootStart, stop - pos, out, pos - offset);
      } else if (pos < dataEnd) {
        const node = owner(2 + Math.floor((pos - dataStart) / clusterSize));
        if (!node) {
          stop = Math.min(end, dataEnd); // free clusters, all after the used ones
        } else {
          const nodeStart = dataStart + (node.first - 2) * clusterSize;
          stop = Math.min(end, nodeStart + node.clusters * clusterSize);
          const within = pos - nodeStart;
          const into = pos - offset;
          if (node.kind === "dir") {
            folderRange(node, within, stop - pos, out, into);
          } else if (within < node.size) {
            const n = Math.min(stop - pos, node.size - within);
            pending.push(
              fileRange(node, within, n).then((b) => out.set(b, into)),
            );
          }
        }
      } else {
        stop = end;
      }
      pos = stop;
    }
    await Promise.all(pending);
    return out;
  }

  // --- The allocation map --------------------------------------------------

  const usedFatBytes = Math.ceil(
    Math.ceil((nextFree * fatType) / 8) / SECTOR,
  ) * SECTOR;
  const spans: [number, number][] = [
    [0, SECTOR],
    [partition, partition + SECTOR],
    ...(fsInfo
      ? [
        [partition + SECTOR, partition + 2 * SECTOR],
        [partition + 6 * SECTOR, partition + 8 * SECTOR],
      ] as [number, number][]
      : []),
    [fatStart, fatStart + usedFatBytes],
    [fatStart + fatBytes, fatStart + fatBytes + usedFatBytes],
    [
      rootStart,
      rootStart + Math.ceil((root.entries * ENTRY) / SECTOR) * SECTOR,
    ],
    [dataStart, dataStart + (nextFree - 2) * clusterSize],
  ];
  const dataSpans: [number, number][] = [];
  for (const [from, to] of spans) {
    if (from >= to) continue;
    const last = dataSpans[dataSpans.length - 1];
    if (last && last[1] >= from) last[1] = Math.max(last[1], to);
    else dataSpans.push([from, to]);
  }

  async function* extents(
    offset: number,
    length: number,
  ): AsyncIterable<Extent> {
    checkRange(size, offset, length);
    const end = offset + length;
    let pos = offset;
    for (const [from, to] of dataSpans) {
      if (to <= pos) continue;
      if (from >= end) break;
      if (from > pos) {
        yield { offset: pos, length: from - pos, kind: "zero" };
        pos = from;
      }
      const stop = Math.min(end, to);
      yield { offset: pos, length: stop - pos, kind: "data" };
      pos = stop;
    }
    if (pos < end) yield { offset: pos, length: end - pos, kind: "zero" };
  }

  const cylinders = Math.ceil(size / SECTOR / (HEADS * SECTORS_PER_TRACK));
  return {
    format: FORMAT,
    size,
    name: tree.name,
    encrypted: false,
    geometry: { cylinders, heads: HEADS, sectors: SECTORS_PER_TRACK },
    details: {
      fatType,
      clusterSize,
      clusters: clusterCount,
      usedClusters: nextFree - 2,
      files: files.length,
      folders: folders.length - 1,
      label: label ? new TextDecoder().decode(label).trimEnd() : null,
      serial: serial.toString(16).padStart(8, "0"),
      partitionOffset: partition,
    },
    read,
    extents,
    close: () => Promise.resolve(),
  };
}

// ---------------------------------------------------------------------------
// QEMU's spelling and the driver entry

/** What a `fat:` name says: the folder, and the FAT type when forced. */
export interface FatSpelling {
  /** The folder to present. */
  dir: string;
  /** The FAT type named (`fat:12:`, `fat:16:`, `fat:32:`), if any. */
  fatType?: FatType;
}

/**
 * Parses QEMU's vvfat spelling: `fat:DIR`, `fat:16:DIR`, `fat:32:DIR`,
 * `fat:12:DIR`. Returns undefined for names that do not start with `fat:`.
 * QEMU's `rw:` and `floppy:` are refused with an
 * {@linkcode UnsupportedError}: these disks are read-only hard disks.
 *
 * @param text what the user wrote
 * @returns the folder and FAT type, or undefined
 *
 * @example
 * ```ts
 * import { parseFatSpelling } from "../mod.ts";
 * console.log(parseFatSpelling("fat:32:/srv/share")); // { dir: "/srv/share", fatType: 32 }
 * console.log(parseFatSpelling("disk.raw")); // undefined
 * ```
 */
export function parseFatSpelling(text: string): FatSpelling | undefined {
  if (!text.startsWith("fat:")) return undefined;
  let rest = text.slice(4);
  let fatType: FatType | undefined;
  for (;;) {
    const option = /^(12|16|32|rw|floppy):/.exec(rest);
    if (!option) break;
    if (option[1] === "rw" || option[1] === "floppy") {
      throw new UnsupportedError(
        { format: FORMAT, field: "fat option", value: option[1] },
        `fat:${
          option[1]
        }: is not supported: vvfat disks here are read-only hard disks`,
      );
    }
    fatType = Number(option[1]) as FatType;
    rest = rest.slice(option[0].length);
  }
  if (rest === "") {
    throw fail({
      field: "folder",
      value: text,
      limit: "named after fat: (fat:DIR)",
    });
  }
  return fatType === undefined ? { dir: rest } : { dir: rest, fatType };
}

/**
 * The vvfat driver, listed so that `formats` shows it. It never claims a
 * source (probe 0), and `open` refuses: a vvfat disk is made from a folder,
 * with {@linkcode openTree} (or `fat:DIR` / `-f vvfat DIR` on the command
 * line), not read from an image file.
 *
 * @example
 * ```ts
 * import { vvfat } from "../mod.ts";
 * const empty = new Uint8Array(512);
 * console.log(vvfat.name, vvfat.probe({ head: empty, tail: empty, size: 512 })); // vvfat 0
 * ```
 */
export const vvfat: Driver = {
  name: FORMAT,
  description:
    "a folder as a read-only FAT12/16/32 disk (fat:DIR; openTree in the API)",
  probe: probeVvfat,
  open(): Promise<Image> {
    return Promise.reject(
      new UnsupportedError(
        { format: FORMAT },
        "vvfat makes a disk from a folder, not from an image file: " +
          "use openTree(tree) in the API, or fat:DIR (or -f vvfat DIR) on the command line; the disk is read-only",
      ),
    );
  },
};
