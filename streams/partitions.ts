/**
 * Partition tables of any disk: `readPartitionTable(source)` lists the
 * partitions of an MBR (with the logical partitions of an extended one), a
 * GPT or an Apple Partition Map; `partition(image, n | name)` gives one of
 * them as an image of its own (a view: reads and the allocation map pass
 * through, shifted by the partition's offset).
 *
 * This module is browser compatible.
 *
 * Layouts (all sectors 512 bytes unless said):
 *
 * MBR (sector 0; the "Master Boot Record" of the IBM PC, as fdisk writes it):
 *
 * | offset | size | field                                               |
 * | ------ | ---- | --------------------------------------------------- |
 * | 446    | 4×16 | partition entries                                   |
 * | 510    | 2    | signature 55 AA                                     |
 *
 * Each entry: 0 status (00 or 80 = bootable), 4 type, 8 first LBA (le32),
 * 12 sector count (le32). Types 05, 0F and 85 are extended partitions: a
 * chain of EBRs (same layout) whose entry 0 is a logical partition
 * (relative to the EBR) and entry 1 the next EBR (relative to the extended
 * partition's start).
 *
 * GPT (UEFI specification 2.x, chapter 5): the header at LBA 1 (and its
 * backup at the last LBA), little-endian:
 *
 * | offset | size | field                                               |
 * | ------ | ---- | --------------------------------------------------- |
 * | 0      | 8    | Signature "EFI PART"                                |
 * | 12     | 4    | HeaderSize (92 .. sector size)                      |
 * | 16     | 4    | HeaderCRC32 (over HeaderSize bytes, this field 0)   |
 * | 24     | 8    | MyLBA                                               |
 * | 32     | 8    | AlternateLBA                                        |
 * | 40     | 8    | FirstUsableLBA                                      |
 * | 48     | 8    | LastUsableLBA                                       |
 * | 56     | 16   | DiskGUID                                            |
 * | 72     | 8    | PartitionEntryLBA                                   |
 * | 80     | 4    | NumberOfPartitionEntries                            |
 * | 84     | 4    | SizeOfPartitionEntry (128 × 2^n)                    |
 * | 88     | 4    | PartitionEntryArrayCRC32                            |
 *
 * Each entry: 0 PartitionTypeGUID, 16 UniquePartitionGUID, 32 StartingLBA,
 * 40 EndingLBA (inclusive), 48 Attributes, 56 PartitionName (36 UTF-16LE
 * code units).
 *
 * Apple Partition Map (Inside Macintosh: Devices, "SCSI Manager",
 * big-endian): block 0 is the driver descriptor, block 1.. the map entries.
 *
 * | offset | size | field (driver descriptor)  | field (map entry)        |
 * | ------ | ---- | -------------------------- | ------------------------ |
 * | 0      | 2    | sbSig "ER"                 | pmSig "PM"               |
 * | 2      | 2    | sbBlkSize                  | (pad)                    |
 * | 4      | 4    | sbBlkCount                 | pmMapBlkCnt              |
 * | 8      | 4    |                            | pmPyPartStart (blocks)   |
 * | 12     | 4    |                            | pmPartBlkCnt (blocks)    |
 * | 16     | 32   |                            | pmPartName               |
 * | 48     | 32   |                            | pmParType                |
 *
 * Blocks are sbBlkSize bytes (512, or 2048 on CD-ROMs), as Linux's
 * `fs/partitions/mac.c` reads them; a map not found at sbBlkSize is looked
 * for in 512-byte blocks.
 *
 * @module
 */

import { be16, be32, le32, le64 } from "../drivers/_binary.ts";
import { ChecksumError, ImageFormatError } from "./errors.ts";
import {
  checkRange,
  type Extent,
  extentsOf,
  type Image,
  type Source,
} from "./types.ts";

/** One partition of a {@linkcode PartitionTable}. */
export interface Partition {
  /**
   * Its number, as Linux names it (`sda1`): MBR primaries 1–4 by slot,
   * logicals from 5; GPT entries by slot from 1; APM map entries from 1.
   */
  index: number;
  /** The name stored in the table (GPT, APM), if any. */
  name?: string;
  /** The type as stored: `0x83` (MBR), a GUID (GPT), `Apple_HFS` (APM). */
  type: string;
  /** The type in words, for the common types (`Linux filesystem`). */
  typeName?: string;
  /** Byte offset of its first byte in the disk. */
  offset: number;
  /** Its size in bytes. */
  size: number;
  /** Its first sector (in `sectorSize` units of the table). */
  firstSector: number;
  /** Its length in sectors. */
  sectorCount: number;
  /** MBR: `primary`, `extended` or `logical`. */
  role?: "primary" | "extended" | "logical";
  /** MBR: the boot flag (status 0x80). */
  bootable?: boolean;
  /** GPT: UniquePartitionGUID. */
  guid?: string;
  /** GPT: the Attributes field, in hexadecimal. */
  attributes?: string;
}

/** The partition table of a disk. */
export interface PartitionTable {
  /** Which kind of table. */
  scheme: "mbr" | "gpt" | "apm";
  /** The unit of its sector numbers, in bytes. */
  sectorSize: number;
  /** GPT: DiskGUID. */
  diskGuid?: string;
  /** GPT: which header was used (`backup` when the primary is broken). */
  header?: "primary" | "backup";
  /** GPT: why the primary header was not used, when it was not. */
  primaryError?: string;
  /** The partitions, in table order (empty slots left out). */
  partitions: Partition[];
}

/** Most logical partitions (EBRs) followed in an extended partition. */
export const MAX_LOGICAL_PARTITIONS = 1024;
/** Most GPT entries read (NumberOfPartitionEntries). */
export const MAX_GPT_ENTRIES = 16384;
/** Most bytes of a GPT entry array. */
export const MAX_GPT_ARRAY_BYTES = 4 << 20;
/** Most APM map entries read (pmMapBlkCnt). */
export const MAX_APM_ENTRIES = 1024;

const SECTOR = 512;

function fail(
  format: string,
  field: string,
  value: unknown,
  limit: string,
  offset?: number,
): ImageFormatError {
  return new ImageFormatError({ format, field, value, limit, offset });
}

/** A GUID as text, from its mixed-endian bytes (the first three fields little-endian). */
function guidText(b: Uint8Array, at: number): string {
  const hex = (from: number, to: number, reverse: boolean) => {
    const bytes = Array.from(b.subarray(at + from, at + to));
    if (reverse) bytes.reverse();
    return bytes.map((x) => x.toString(16).padStart(2, "0")).join("");
  };
  return [
    hex(0, 4, true),
    hex(4, 6, true),
    hex(6, 8, true),
    hex(8, 10, false),
    hex(10, 16, false),
  ].join("-").toUpperCase();
}

/** Names of common GPT partition types (as sgdisk and the UEFI/vendor documents call them). */
export const GPT_TYPE_NAMES: Readonly<Record<string, string>> = {
  "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
  "21686148-6449-6E6F-744E-656564454649": "BIOS boot partition",
  "024DEE41-33E7-11D3-9D69-0008C781F39F": "MBR partition scheme",
  "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
  "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
  "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
  "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
  "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux x86-64 root (/)",
  "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux /home",
  "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
  "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
  "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery environment",
  "48465300-0000-11AA-AA11-00306543ECAC": "Apple HFS/HFS+",
  "7C3457EF-0000-11AA-AA11-00306543ECAC": "Apple APFS",
  "55465300-0000-11AA-AA11-00306543ECAC": "Apple UFS",
  "426F6F74-0000-11AA-AA11-00306543ECAC": "Apple boot",
  "53746F72-6167-11AA-AA11-00306543ECAC": "Apple Core Storage",
  "516E7CB4-6ECF-11D6-8FF8-00022D09712B": "FreeBSD disklabel",
  "83BD6B9D-7F41-11DC-BE0B-001560B84F0F": "FreeBSD boot",
};

/** Names of common MBR partition types (as fdisk lists them). */
export const MBR_TYPE_NAMES: Readonly<Record<number, string>> = {
  0x01: "FAT12",
  0x04: "FAT16 <32M",
  0x05: "Extended",
  0x06: "FAT16",
  0x07: "HPFS/NTFS/exFAT",
  0x0b: "W95 FAT32",
  0x0c: "W95 FAT32 (LBA)",
  0x0e: "W95 FAT16 (LBA)",
  0x0f: "W95 Ext'd (LBA)",
  0x82: "Linux swap / Solaris",
  0x83: "Linux",
  0x85: "Linux extended",
  0x8e: "Linux LVM",
  0xa5: "FreeBSD",
  0xa8: "Darwin UFS",
  0xaf: "HFS / HFS+",
  0xee: "GPT",
  0xef: "EFI (FAT-12/16/32)",
  0xfd: "Linux raid autodetect",
};

const isExtended = (type: number) =>
  type === 0x05 || type === 0x0f || type === 0x85;

async function readSector(
  source: Source,
  offset: number,
  length: number,
): Promise<Uint8Array | undefined> {
  if (offset < 0 || offset + length > source.size) return undefined;
  return await source.read(offset, length);
}

/**
 * Refuses partitions that pass the end of the disk or overlap one
 * another (sorted by offset: one pass).
 */
function checkLayout(
  format: string,
  parts: Partition[],
  diskSize: number,
): void {
  for (const p of parts) {
    if (p.offset + p.size > diskSize) {
      throw fail(
        format,
        `partition ${p.index} end`,
        p.offset + p.size,
        `at most the disk size ${diskSize}`,
      );
    }
  }
  const sorted = parts.filter((p) => p.size > 0 && p.role !== "extended")
    .sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < sorted.length; i++) {
    const before = sorted[i - 1], p = sorted[i];
    if (p.offset < before.offset + before.size) {
      throw fail(
        format,
        `partition ${p.index} offset`,
        p.offset,
        `at least ${
          before.offset + before.size
        } (the end of partition ${before.index}: partitions must not overlap)`,
      );
    }
  }
}

// ---------------------------------------------------------------------------
// MBR

function mbrEntry(
  sector: Uint8Array,
  slot: number,
): { status: number; type: number; first: number; count: number } {
  const at = 446 + 16 * slot;
  return {
    status: sector[at],
    type: sector[at + 4],
    first: le32(sector, at + 8),
    count: le32(sector, at + 12),
  };
}

/** True when sector 0 is a FAT or NTFS boot sector rather than an MBR. */
function isVolumeBootSector(sector: Uint8Array): boolean {
  const text = (at: number, n: number) =>
    String.fromCharCode(...sector.subarray(at, at + n));
  const jump = sector[0] === 0xeb || sector[0] === 0xe9;
  return jump &&
    (text(3, 4) === "NTFS" || text(3, 5) === "EXFAT" ||
      text(54, 3) === "FAT" || text(82, 3) === "FAT");
}

function mbrPartition(
  index: number,
  role: Partition["role"],
  status: number,
  type: number,
  first: number,
  count: number,
): Partition {
  return {
    index,
    type: `0x${type.toString(16).padStart(2, "0")}`,
    typeName: MBR_TYPE_NAMES[type],
    offset: first * SECTOR,
    size: count * SECTOR,
    firstSector: first,
    sectorCount: count,
    role,
    bootable: status === 0x80,
  };
}

async function readMbr(
  source: Source,
  sector0: Uint8Array,
): Promise<PartitionTable | undefined> {
  if (sector0[510] !== 0x55 || sector0[511] !== 0xaa) return undefined;
  const entries = [0, 1, 2, 3].map((slot) => mbrEntry(sector0, slot));
  // Status bytes other than 00/80 mean these 64 bytes are not a table.
  if (entries.some((e) => e.status !== 0 && e.status !== 0x80)) {
    return undefined;
  }
  if (entries.every((e) => e.type === 0)) return undefined;
  if (isVolumeBootSector(sector0)) return undefined;
  const parts: Partition[] = [];
  let extended: Partition | undefined;
  for (const [slot, e] of entries.entries()) {
    if (e.type === 0) continue;
    const field = `partition ${slot + 1}`;
    if (e.count === 0) {
      throw fail("mbr", `${field} sector count`, 0, "above 0", 446 + 16 * slot);
    }
    if (e.first === 0) {
      throw fail(
        "mbr",
        `${field} first sector`,
        0,
        "above 0 (sector 0 holds the table)",
        446 + 16 * slot,
      );
    }
    const p = mbrPartition(
      slot + 1,
      isExtended(e.type) ? "extended" : "primary",
      e.status,
      e.type,
      e.first,
      e.count,
    );
    if (isExtended(e.type)) {
      if (extended) {
        throw fail(
          "mbr",
          `${field} type`,
          p.type,
          `not a second extended partition (partition ${extended.index} is one)`,
          446 + 16 * slot + 4,
        );
      }
      extended = p;
    }
    parts.push(p);
  }
  checkLayout("mbr", parts, source.size);
  if (extended) parts.push(...await readLogicals(source, extended));
  checkLayout("mbr", parts, source.size);
  return { scheme: "mbr", sectorSize: SECTOR, partitions: parts };
}

/** Follows the EBR chain of `extended`, each EBR and logical inside it. */
async function readLogicals(
  source: Source,
  extended: Partition,
): Promise<Partition[]> {
  const start = extended.firstSector;
  const end = start + extended.sectorCount;
  const out: Partition[] = [];
  const seen = new Set<number>();
  let ebr = start;
  while (true) {
    const where = ebr * SECTOR;
    if (seen.has(ebr)) {
      throw fail(
        "mbr",
        `EBR ${out.length + 1} next EBR`,
        ebr,
        "a sector not visited before (the EBR chain loops)",
        where,
      );
    }
    if (seen.size >= MAX_LOGICAL_PARTITIONS) {
      throw fail(
        "mbr",
        "logical partitions",
        seen.size + 1,
        `at most ${MAX_LOGICAL_PARTITIONS}`,
        where,
      );
    }
    seen.add(ebr);
    if (ebr < start || ebr >= end) {
      throw fail(
        "mbr",
        `EBR ${seen.size} sector`,
        ebr,
        `inside the extended partition (sectors ${start}..${end - 1})`,
      );
    }
    const sector = await readSector(source, where, SECTOR);
    if (!sector) {
      throw fail(
        "mbr",
        `EBR ${seen.size} sector`,
        ebr,
        `before the end of the disk (${source.size} bytes)`,
      );
    }
    if (sector[510] !== 0x55 || sector[511] !== 0xaa) {
      throw fail(
        "mbr",
        `EBR ${seen.size} signature`,
        sector.subarray(510, 512),
        "55aa",
        where + 510,
      );
    }
    const logical = mbrEntry(sector, 0);
    const next = mbrEntry(sector, 1);
    if (logical.type !== 0 && logical.count > 0) {
      const first = ebr + logical.first;
      const index = 5 + out.length;
      if (logical.first === 0 || first + logical.count > end) {
        throw fail(
          "mbr",
          `partition ${index} sectors`,
          `${first}..${first + logical.count - 1}`,
          `after its EBR (sector ${ebr}) and inside the extended partition (sectors ${start}..${
            end - 1
          })`,
          where + 446,
        );
      }
      out.push(
        mbrPartition(
          index,
          "logical",
          logical.status,
          logical.type,
          first,
          logical.count,
        ),
      );
    }
    if (next.type === 0 || next.first === 0) break;
    if (!isExtended(next.type)) {
      throw fail(
        "mbr",
        `EBR ${seen.size} next EBR type`,
        `0x${next.type.toString(16)}`,
        "an extended type (0x05, 0x0f or 0x85)",
        where + 462 + 4,
      );
    }
    ebr = start + next.first;
  }
  return out;
}

// ---------------------------------------------------------------------------
// GPT

interface GptHeader {
  myLba: number;
  alternateLba: number;
  firstUsable: number;
  lastUsable: number;
  diskGuid: string;
  entryLba: number;
  entryCount: number;
  entrySize: number;
  entriesCrc: number;
}

function u64(
  b: Uint8Array,
  at: number,
  field: string,
  where: number,
): number {
  const value = le64(b, at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw fail("gpt", field, value, "at most 2^53-1", where + at);
  }
  return Number(value);
}

/**
 * The CRC-32 GPT checks, imported when a GPT header is found: a disk
 * without one (and `info` of it) loads no checksum code.
 */
async function gptCrc32(): Promise<(bytes: Uint8Array) => number> {
  return (await import("../drivers/codecs/crc32.ts")).crc32;
}

/** Reads and checks the header at `lba`; throws what is wrong with it. */
async function readGptHeader(
  source: Source,
  lba: number,
  sectorSize: number,
): Promise<GptHeader> {
  const where = lba * sectorSize;
  const b = await readSector(source, where, sectorSize);
  if (!b) {
    throw fail("gpt", "header LBA", lba, "inside the disk", where);
  }
  const signature = String.fromCharCode(...b.subarray(0, 8));
  if (signature !== "EFI PART") {
    throw fail("gpt", "Signature", signature, '"EFI PART"', where);
  }
  const headerSize = le32(b, 12);
  if (headerSize < 92 || headerSize > sectorSize) {
    throw fail(
      "gpt",
      "HeaderSize",
      headerSize,
      `between 92 and ${sectorSize}`,
      where + 12,
    );
  }
  const stored = le32(b, 16);
  const copy = b.slice(0, headerSize);
  copy.fill(0, 16, 20);
  const computed = (await gptCrc32())(copy);
  if (stored !== computed) {
    throw new ChecksumError(
      { format: "gpt", field: "HeaderCRC32", offset: where + 16 },
      stored.toString(16).padStart(8, "0"),
      computed.toString(16).padStart(8, "0"),
    );
  }
  const header: GptHeader = {
    myLba: u64(b, 24, "MyLBA", where),
    alternateLba: u64(b, 32, "AlternateLBA", where),
    firstUsable: u64(b, 40, "FirstUsableLBA", where),
    lastUsable: u64(b, 48, "LastUsableLBA", where),
    diskGuid: guidText(b, 56),
    entryLba: u64(b, 72, "PartitionEntryLBA", where),
    entryCount: le32(b, 80),
    entrySize: le32(b, 84),
    entriesCrc: le32(b, 88),
  };
  const sectors = Math.floor(source.size / sectorSize);
  if (header.myLba !== lba) {
    throw fail("gpt", "MyLBA", header.myLba, `${lba}`, where + 24);
  }
  if (
    header.lastUsable >= sectors || header.firstUsable > header.lastUsable + 1
  ) {
    throw fail(
      "gpt",
      "LastUsableLBA",
      header.lastUsable,
      `at least FirstUsableLBA - 1 (${
        header.firstUsable - 1
      }) and below the disk's ${sectors} sectors`,
      where + 48,
    );
  }
  if (header.entryCount > MAX_GPT_ENTRIES) {
    throw fail(
      "gpt",
      "NumberOfPartitionEntries",
      header.entryCount,
      `at most ${MAX_GPT_ENTRIES}`,
      where + 80,
    );
  }
  const size = header.entrySize;
  if (size < 128 || size > 4096 || (size & (size - 1)) !== 0) {
    throw fail(
      "gpt",
      "SizeOfPartitionEntry",
      size,
      "128 times a power of two, at most 4096",
      where + 84,
    );
  }
  const arrayBytes = header.entryCount * size;
  if (arrayBytes > MAX_GPT_ARRAY_BYTES) {
    throw fail(
      "gpt",
      "NumberOfPartitionEntries",
      header.entryCount,
      `at most ${
        MAX_GPT_ARRAY_BYTES / size
      } entries of ${size} bytes (${MAX_GPT_ARRAY_BYTES} bytes)`,
      where + 80,
    );
  }
  if (
    header.entryLba < 1 ||
    header.entryLba * sectorSize + arrayBytes > sectors * sectorSize
  ) {
    throw fail(
      "gpt",
      "PartitionEntryLBA",
      header.entryLba,
      `a sector from 1 whose ${arrayBytes}-byte entry array ends inside the disk`,
      where + 72,
    );
  }
  return header;
}

async function readGptEntries(
  source: Source,
  header: GptHeader,
  sectorSize: number,
): Promise<Partition[]> {
  const start = header.entryLba * sectorSize;
  const array = await source.read(start, header.entryCount * header.entrySize);
  const computed = (await gptCrc32())(array);
  if (computed !== header.entriesCrc) {
    throw new ChecksumError(
      { format: "gpt", field: "PartitionEntryArrayCRC32", offset: start },
      header.entriesCrc.toString(16).padStart(8, "0"),
      computed.toString(16).padStart(8, "0"),
    );
  }
  const parts: Partition[] = [];
  for (let i = 0; i < header.entryCount; i++) {
    const at = i * header.entrySize;
    if (array.subarray(at, at + 16).every((x) => x === 0)) continue;
    const where = start + at;
    const first = u64(array, at + 32, `entry ${i + 1} StartingLBA`, start);
    const last = u64(array, at + 40, `entry ${i + 1} EndingLBA`, start);
    if (
      first < header.firstUsable || last > header.lastUsable || last < first
    ) {
      throw fail(
        "gpt",
        `entry ${i + 1} StartingLBA..EndingLBA`,
        `${first}..${last}`,
        `inside FirstUsableLBA..LastUsableLBA (${header.firstUsable}..${header.lastUsable})`,
        where + 32,
      );
    }
    let name = "";
    for (let k = 0; k < 72; k += 2) {
      const unit = array[at + 56 + k] | (array[at + 57 + k] << 8);
      if (unit === 0) break;
      name += String.fromCharCode(unit);
    }
    const type = guidText(array, at);
    const attributes = le64(array, at + 48);
    parts.push({
      index: i + 1,
      name,
      type,
      typeName: GPT_TYPE_NAMES[type],
      offset: first * sectorSize,
      size: (last - first + 1) * sectorSize,
      firstSector: first,
      sectorCount: last - first + 1,
      guid: guidText(array, at + 16),
      attributes: `0x${attributes.toString(16).padStart(16, "0")}`,
    });
  }
  checkLayout("gpt", parts, source.size);
  return parts;
}

async function readGpt(
  source: Source,
  sectorSize: number,
): Promise<PartitionTable> {
  let primaryError: Error;
  let alternate: number | undefined;
  try {
    const header = await readGptHeader(source, 1, sectorSize);
    alternate = header.alternateLba;
    return {
      scheme: "gpt",
      sectorSize,
      diskGuid: header.diskGuid,
      header: "primary",
      partitions: await readGptEntries(source, header, sectorSize),
    };
  } catch (e) {
    if (!(e instanceof ImageFormatError)) throw e;
    primaryError = e;
  }
  // The backup: where the primary says, else the last sector.
  const last = Math.floor(source.size / sectorSize) - 1;
  const tried = new Set<number>();
  for (const lba of [alternate, last]) {
    if (lba === undefined || lba <= 1 || lba > last || tried.has(lba)) continue;
    tried.add(lba);
    try {
      const header = await readGptHeader(source, lba, sectorSize);
      return {
        scheme: "gpt",
        sectorSize,
        diskGuid: header.diskGuid,
        header: "backup",
        primaryError: primaryError.message,
        partitions: await readGptEntries(source, header, sectorSize),
      };
    } catch (e) {
      if (!(e instanceof ImageFormatError)) throw e;
    }
  }
  throw primaryError;
}

// ---------------------------------------------------------------------------
// Apple Partition Map

function pascalish(b: Uint8Array, at: number, length: number): string {
  let text = "";
  for (let i = 0; i < length && b[at + i] !== 0; i++) {
    text += String.fromCharCode(b[at + i]);
  }
  return text;
}

async function readApm(
  source: Source,
  block0: Uint8Array,
): Promise<PartitionTable | undefined> {
  if (be16(block0, 0) !== 0x4552) return undefined; // "ER"
  const declared = be16(block0, 2);
  // Where the map is: in sbBlkSize blocks, else in 512-byte ones.
  let blockSize = 0;
  for (const size of [declared, SECTOR]) {
    if (![512, 1024, 2048, 4096].includes(size)) continue;
    const b = await readSector(source, size, SECTOR);
    if (b && be16(b, 0) === 0x504d) { // "PM"
      blockSize = size;
      break;
    }
  }
  if (blockSize === 0) return undefined;
  const first = await source.read(blockSize, SECTOR);
  const count = be32(first, 4);
  if (count < 1 || count > MAX_APM_ENTRIES) {
    throw fail(
      "apm",
      "pmMapBlkCnt",
      count,
      `between 1 and ${MAX_APM_ENTRIES}`,
      blockSize + 4,
    );
  }
  if ((count + 1) * blockSize > source.size) {
    throw fail(
      "apm",
      "pmMapBlkCnt",
      count,
      `at most ${
        Math.floor(source.size / blockSize) - 1
      } (the map must end inside the disk)`,
      blockSize + 4,
    );
  }
  const parts: Partition[] = [];
  for (let i = 1; i <= count; i++) {
    const where = i * blockSize;
    const b = i === 1 ? first : await source.read(where, SECTOR);
    if (be16(b, 0) !== 0x504d) {
      throw fail("apm", `entry ${i} pmSig`, be16(b, 0), '0x504d ("PM")', where);
    }
    const start = be32(b, 8);
    const blocks = be32(b, 12);
    const type = pascalish(b, 48, 32);
    parts.push({
      index: i,
      name: pascalish(b, 16, 32),
      type,
      typeName: APM_TYPE_NAMES[type],
      offset: start * blockSize,
      size: blocks * blockSize,
      firstSector: start,
      sectorCount: blocks,
    });
  }
  checkLayout("apm", parts, source.size);
  return { scheme: "apm", sectorSize: blockSize, partitions: parts };
}

/** Names of common APM partition types. */
export const APM_TYPE_NAMES: Readonly<Record<string, string>> = {
  Apple_partition_map: "the partition map",
  Apple_Driver: "Mac OS driver",
  Apple_Driver43: "SCSI Manager 4.3 driver",
  Apple_Driver_ATA: "ATA driver",
  Apple_Patches: "patches",
  Apple_HFS: "HFS/HFS+",
  Apple_HFSX: "HFSX",
  Apple_UFS: "UFS",
  Apple_Boot: "boot",
  Apple_Free: "free space",
  Apple_Scratch: "empty",
  Apple_Void: "unused",
  Apple_Bootstrap: "NewWorld bootstrap",
  DOS_FAT_32: "FAT32",
};

// ---------------------------------------------------------------------------
// The public functions

/**
 * Reads the partition table of a disk: an Apple Partition Map, a GPT (the
 * backup header when the primary is broken; 512- or 4096-byte sectors) or
 * an MBR with its logical partitions. A disk with none of them (a bare
 * file system, zeros) gives `undefined`; a table that is there but wrong
 * (entries past the disk or overlapping, a looping EBR chain, a huge entry
 * count, a bad CRC in both GPT headers) is an {@linkcode ImageFormatError}
 * naming the field. The work is bounded by the limits above, not by the
 * table's fields.
 *
 * @param source the disk (an image, or any source)
 * @returns the table, or undefined when there is none
 *
 * @example
 * ```ts
 * import { fromBytes, readPartitionTable } from "../mod.ts";
 * const disk = new Uint8Array(64 * 512);
 * disk.set([0x80, 0, 0, 0, 0x83, 0, 0, 0, 8, 0, 0, 0, 16, 0, 0, 0], 446);
 * disk.set([0x55, 0xaa], 510);
 * const table = await readPartitionTable(fromBytes(disk));
 * const [p] = table!.partitions;
 * console.log(table!.scheme, p.index, p.typeName, p.offset, p.size); // mbr 1 Linux 4096 8192
 * ```
 */
export async function readPartitionTable(
  source: Source,
): Promise<PartitionTable | undefined> {
  if (source.size < SECTOR) return undefined;
  const sector0 = await source.read(0, SECTOR);
  const apm = await readApm(source, sector0);
  if (apm) return apm;
  for (const sectorSize of [SECTOR, 4096]) {
    const b = await readSector(source, sectorSize, 8);
    if (b && String.fromCharCode(...b) === "EFI PART") {
      return await readGpt(source, sectorSize);
    }
  }
  const protective = sector0[510] === 0x55 && sector0[511] === 0xaa &&
    [0, 1, 2, 3].some((slot) => mbrEntry(sector0, slot).type === 0xee);
  if (protective) {
    // The primary header is gone: the backup may still be there.
    return await readGpt(source, SECTOR);
  }
  return await readMbr(source, sector0);
}

/**
 * Finds a partition by its number (`3`, or `"3"`) or its name (GPT, APM):
 * the one {@linkcode partition} would give.
 *
 * @param table the disk's table
 * @param which a number or a name
 * @returns the partition
 * @throws {RangeError} when there is no such partition (the message lists them)
 *
 * @example
 * ```ts
 * import { findPartition } from "../mod.ts";
 * const table = { scheme: "gpt" as const, sectorSize: 512, partitions: [
 *   { index: 1, name: "EFI", type: "", offset: 1048576, size: 1048576, firstSector: 2048, sectorCount: 2048 },
 * ] };
 * console.log(findPartition(table, "EFI").offset); // 1048576
 * ```
 */
export function findPartition(
  table: PartitionTable,
  which: number | string,
): Partition {
  const byNumber = typeof which === "number"
    ? which
    : /^[1-9]\d{0,5}$/.test(which)
    ? Number(which)
    : undefined;
  const found = byNumber !== undefined
    ? table.partitions.find((p) => p.index === byNumber)
    : table.partitions.filter((p) => p.name === which);
  if (Array.isArray(found) && found.length > 1) {
    throw new RangeError(
      `partition name ${JSON.stringify(which)} is ambiguous: partitions ${
        found.map((p) => p.index).join(", ")
      } carry it; name one by number`,
    );
  }
  const p = Array.isArray(found) ? found[0] : found;
  if (!p) {
    const list = table.partitions.map((p) =>
      p.name ? `${p.index} (${p.name})` : `${p.index}`
    ).join(", ");
    throw new RangeError(
      `no partition ${JSON.stringify(which)} in the ${table.scheme} table${
        list ? `: it has ${list}` : ": it has none"
      }`,
    );
  }
  return p;
}

/**
 * One partition of a disk as an image of its own: a read-only view of
 * `image` from the partition's first byte for its size. Reads and the
 * allocation map pass through (shifted by the partition's offset; a run's
 * `fileOffset` stays where the image file holds it), so converting the
 * view gives the same bytes as `dd` of the raw disk at the same offsets,
 * with the holes kept.
 *
 * @param image the disk
 * @param which the partition's number or name (see {@linkcode findPartition})
 * @returns the view; `details.partition` says which partition it is
 * @throws {RangeError} when the disk has no table or no such partition
 * @throws {ImageFormatError} when the table is malformed
 *
 * @example
 * ```ts
 * import { fromBytes, open, partition } from "../mod.ts";
 * const disk = new Uint8Array(64 * 512);
 * disk.set([0, 0, 0, 0, 0x83, 0, 0, 0, 8, 0, 0, 0, 16, 0, 0, 0], 446);
 * disk.set([0x55, 0xaa], 510);
 * disk.fill(7, 8 * 512, 24 * 512);
 * const part = await partition(await open(fromBytes(disk)), 1);
 * console.log(part.size, (await part.read(0, 2)).join(",")); // 8192 7,7
 * ```
 */
export async function partition(
  image: Image,
  which: number | string,
): Promise<Image> {
  const table = await readPartitionTable(image);
  if (!table) {
    throw new RangeError(
      `no partition ${
        JSON.stringify(which)
      }: the disk has no partition table (MBR, GPT or APM)`,
    );
  }
  const p = findPartition(table, which);
  return partitionView(image, p, table.scheme);
}

function partitionView(
  image: Image,
  p: Partition,
  scheme: string,
): Image {
  const base = p.offset;
  const size = p.size;
  async function read(offset: number, length: number) {
    checkRange(size, offset, length);
    return await image.read(base + offset, length);
  }
  async function* extents(
    offset: number,
    length: number,
  ): AsyncIterable<Extent> {
    checkRange(size, offset, length);
    if (length === 0) return;
    for await (const run of extentsOf(image, base + offset, length)) {
      yield { ...run, offset: run.offset - base };
    }
  }
  const view: Image = {
    format: image.format,
    size,
    name: image.name,
    get encrypted() {
      return image.encrypted;
    },
    details: {
      partition: {
        scheme,
        index: p.index,
        ...(p.name ? { name: p.name } : {}),
        type: p.type,
        offset: p.offset,
        size: p.size,
      },
    },
    read,
    extents,
    close: () => image.close?.() ?? Promise.resolve(),
  };
  if (image.readInto) {
    const readInto = image.readInto.bind(image);
    view.readInto = async (offset, into) => {
      checkRange(size, offset, into.length);
      await readInto(base + offset, into);
    };
  }
  return view;
}
