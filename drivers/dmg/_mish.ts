/**
 * The block table of one UDIF partition (`BLKXTable`, "mish"), as stored
 * base64 in a `blkx` entry of the plist or in a `blkx` resource; all
 * numbers big-endian.
 *
 * | offset | size | field                                                   |
 * | ------ | ---- | ------------------------------------------------------- |
 * | 0      | 4    | Signature `mish`                                        |
 * | 4      | 4    | Version: 1                                              |
 * | 8      | 8    | SectorNumber: the partition's first sector on the disk  |
 * | 16     | 8    | SectorCount                                             |
 * | 24     | 8    | DataOffset: added to every chunk's CompressedOffset     |
 * | 32     | 4    | BuffersNeeded                                           |
 * | 36     | 4    | BlockDescriptors (the partition's ID)                   |
 * | 40     | 24   | reserved                                                |
 * | 64     | 4    | Checksum type (2: CRC-32)                               |
 * | 68     | 4    | Checksum size in bits                                   |
 * | 72     | 128  | Checksum data: CRC-32 of the partition's bytes          |
 * | 200    | 4    | NumberOfBlockChunks                                     |
 * | 204    | 40×n | chunks                                                  |
 *
 * A chunk (`BLKXChunkEntry`, 40 bytes):
 *
 * | offset | size | field                                                   |
 * | ------ | ---- | ------------------------------------------------------- |
 * | 0      | 4    | EntryType (see {@linkcode CHUNK_TYPES})                 |
 * | 4      | 4    | Comment                                                 |
 * | 8      | 8    | SectorNumber, from the partition's first sector         |
 * | 16     | 8    | SectorCount                                             |
 * | 24     | 8    | CompressedOffset, from the data fork plus DataOffset    |
 * | 32     | 8    | CompressedLength                                        |
 *
 * This module is browser compatible.
 *
 * @module
 */

import { be32, be64, formatErrors, setBe32, setBe64 } from "../_binary.ts";
import { type Checksum, CHECKSUM_CRC32 } from "./_koly.ts";

const dmgError = formatErrors("dmg");

/** `mish` as a big-endian number. */
const MISH_MAGIC = 0x6d697368;
/** Bytes before the first chunk. */
export const MISH_HEADER_SIZE = 204;
/** Bytes per chunk entry. */
export const CHUNK_SIZE = 40;

/** Chunk types by EntryType value. */
export const CHUNK_TYPES: ReadonlyMap<number, string> = new Map([
  [0x00000000, "zero"],
  [0x00000001, "raw"],
  [0x00000002, "ignore"],
  [0x80000004, "adc"],
  [0x80000005, "zlib"],
  [0x80000006, "bzip2"],
  [0x80000007, "lzfse"],
  [0x80000008, "lzma"],
  [0x7ffffffe, "comment"],
  [0xffffffff, "terminator"],
]);
/** EntryType values by name. */
export const TYPE = {
  zero: 0x00000000,
  raw: 0x00000001,
  ignore: 0x00000002,
  adc: 0x80000004,
  zlib: 0x80000005,
  bzip2: 0x80000006,
  lzfse: 0x80000007,
  lzma: 0x80000008,
  comment: 0x7ffffffe,
  terminator: 0xffffffff,
} as const;

/**
 * The most a compressed chunk may decode to, and the most compressed bytes
 * it may have: QEMU's DMG_LENGTHS_MAX (64 MiB; hdiutil writes 1 MiB chunks,
 * or 256 KiB in older images).
 */
export const MAX_CHUNK_BYTES = 64 << 20;
/** The disk's size limit in sectors, so byte offsets stay below 2^53. */
const MAX_SECTORS = 2 ** 44;

/** One chunk of a partition, in disk sectors and data-fork bytes. */
export interface Chunk {
  /** Its entry number in the table (comments and the terminator count). */
  entry: number;
  type: number;
  /** First sector on the disk (the partition's first sector added). */
  sector: number;
  sectors: number;
  /** CompressedOffset plus the table's DataOffset. */
  offset: number;
  length: number;
}

/** A parsed block table. */
export interface Mish {
  firstSector: number;
  sectorCount: number;
  dataOffset: number;
  buffersNeeded: number;
  descriptor: number;
  checksum: Checksum;
  /** The data-bearing chunks (comments and the terminator left out), in order. */
  chunks: Chunk[];
}

/**
 * Parses and validates a block table. `where` names it in messages (e.g.
 * `blkx[2] "Apple_HFS"`).
 */
export function parseMish(
  b: Uint8Array,
  where: string,
  file?: string,
): Mish {
  const fail = (field: string, value: unknown, limit: string): never => {
    throw dmgError(`${where} ${field}`, value, limit, undefined, file);
  };
  if (b.length < MISH_HEADER_SIZE) {
    fail(
      "length",
      b.length,
      `at least ${MISH_HEADER_SIZE} bytes (a mish header)`,
    );
  }
  if (be32(b, 0) !== MISH_MAGIC) {
    fail("mish.Signature", b.subarray(0, 4), '"mish" (6d697368)');
  }
  if (be32(b, 4) !== 1) fail("mish.Version", be32(b, 4), "1");
  // 64-bit fields past 2^44 sectors (2^53 bytes) are refused outright.
  const big = (at: number, field: string, limit: number) => {
    const v = be64(b, at);
    if (v > BigInt(limit)) fail(field, v, `at most ${limit}`);
    return Number(v);
  };
  const firstSector = big(8, "mish.SectorNumber", MAX_SECTORS);
  const sectorCount = big(16, "mish.SectorCount", MAX_SECTORS);
  const dataOffset = big(24, "mish.DataOffset", Number.MAX_SAFE_INTEGER);
  const type = be32(b, 64);
  const bits = be32(b, 68);
  if (bits > 1024 || bits % 8) {
    fail(
      "mish.Checksum.size",
      bits,
      "a whole number of bytes, 1024 bits or fewer",
    );
  }
  if (type === CHECKSUM_CRC32 && bits !== 32) {
    fail("mish.Checksum.size", bits, "32 for a CRC-32 (type 2)");
  }
  const checksum = { type, bits, data: b.slice(72, 72 + bits / 8) };
  const count = be32(b, 200);
  if (MISH_HEADER_SIZE + count * CHUNK_SIZE !== b.length) {
    fail(
      "mish.NumberOfBlockChunks",
      count,
      `${
        (b.length - MISH_HEADER_SIZE) / CHUNK_SIZE
      } (the table's ${b.length} bytes hold ${MISH_HEADER_SIZE} of header and ${CHUNK_SIZE} per chunk)`,
    );
  }
  const chunks: Chunk[] = [];
  let previousEnd = 0;
  let ended = false;
  for (let k = 0; k < count; k++) {
    const at = MISH_HEADER_SIZE + k * CHUNK_SIZE;
    const entry = `chunk ${k}`;
    const chunkType = be32(b, at);
    const name = CHUNK_TYPES.get(chunkType);
    if (name === undefined) {
      fail(
        `${entry} type`,
        `0x${chunkType.toString(16).padStart(8, "0")}`,
        "a known chunk type (zero 0x00000000, raw 0x00000001, ignore 0x00000002, " +
          "adc 0x80000004, zlib 0x80000005, bzip2 0x80000006, lzfse 0x80000007, " +
          "lzma 0x80000008, comment 0x7ffffffe, terminator 0xffffffff)",
      );
    }
    if (ended) {
      fail(`${entry} type`, name, "nothing after the terminator chunk");
    }
    if (chunkType === TYPE.comment) continue;
    if (chunkType === TYPE.terminator) {
      ended = true;
      continue;
    }
    const sector = big(at + 8, `${entry} SectorNumber`, MAX_SECTORS);
    const sectors = big(at + 16, `${entry} SectorCount`, MAX_SECTORS);
    const offset = big(
      at + 24,
      `${entry} CompressedOffset`,
      Number.MAX_SAFE_INTEGER,
    );
    const length = big(
      at + 32,
      `${entry} CompressedLength`,
      Number.MAX_SAFE_INTEGER,
    );
    if (sector < previousEnd) {
      fail(
        `${entry} SectorNumber`,
        sector,
        `at least ${previousEnd} (it would overlap the chunk before it, which ends there)`,
      );
    }
    if (sector + sectors > sectorCount) {
      fail(
        `${entry} SectorNumber + SectorCount`,
        sector + sectors,
        `at most the partition's SectorCount ${sectorCount} (the chunk runs past its partition)`,
      );
    }
    previousEnd = sector + sectors;
    if (sectors === 0) continue;
    if (chunkType === TYPE.raw && length !== sectors * 512) {
      fail(
        `${entry} CompressedLength`,
        length,
        `${sectors * 512} (SectorCount × 512 for a raw chunk)`,
      );
    }
    if (
      chunkType !== TYPE.raw && chunkType !== TYPE.zero &&
      chunkType !== TYPE.ignore
    ) {
      if (sectors * 512 > MAX_CHUNK_BYTES) {
        fail(
          `${entry} SectorCount`,
          sectors,
          `at most ${MAX_CHUNK_BYTES / 512} (64 MiB) for a compressed chunk`,
        );
      }
      if (length > MAX_CHUNK_BYTES) {
        fail(
          `${entry} CompressedLength`,
          length,
          `at most ${MAX_CHUNK_BYTES} (64 MiB)`,
        );
      }
    }
    if (dataOffset + offset > Number.MAX_SAFE_INTEGER) {
      fail(
        `${entry} CompressedOffset`,
        offset,
        "at most 2^53-1 with DataOffset added",
      );
    }
    chunks.push({
      entry: k,
      type: chunkType,
      sector: firstSector + sector,
      sectors,
      offset: dataOffset + offset,
      length,
    });
  }
  return {
    firstSector,
    sectorCount,
    dataOffset,
    buffersNeeded: be32(b, 32),
    descriptor: be32(b, 36),
    checksum,
    chunks,
  };
}

/** What the writer puts in a block table. */
export interface MishInit {
  firstSector: number;
  sectorCount: number;
  descriptor: number;
  crc: number;
  /** Chunks with sectors relative to the partition and offsets in the data fork; a terminator is added. */
  chunks: {
    type: number;
    sector: number;
    sectors: number;
    offset: number;
    length: number;
  }[];
  /** The largest chunk in sectors (BuffersNeeded is this plus 8, as hdiutil writes). */
  largestChunk: number;
}

/** A block table as hdiutil writes one. */
export function mishBytes(init: MishInit): Uint8Array {
  const count = init.chunks.length + 1;
  const b = new Uint8Array(MISH_HEADER_SIZE + count * CHUNK_SIZE);
  setBe32(b, 0, MISH_MAGIC);
  setBe32(b, 4, 1);
  setBe64(b, 8, init.firstSector);
  setBe64(b, 16, init.sectorCount);
  setBe64(b, 24, 0);
  setBe32(b, 32, init.largestChunk + 8);
  setBe32(b, 36, init.descriptor >>> 0);
  setBe32(b, 64, CHECKSUM_CRC32);
  setBe32(b, 68, 32);
  setBe32(b, 72, init.crc);
  setBe32(b, 200, count);
  let at = MISH_HEADER_SIZE;
  let end = 0;
  for (const c of init.chunks) {
    setBe32(b, at, c.type);
    setBe64(b, at + 8, c.sector);
    setBe64(b, at + 16, c.sectors);
    setBe64(b, at + 24, c.offset);
    setBe64(b, at + 32, c.length);
    at += CHUNK_SIZE;
    end = c.offset + c.length;
  }
  setBe32(b, at, TYPE.terminator);
  setBe64(b, at + 8, init.sectorCount);
  setBe64(b, at + 24, end);
  return b;
}
