/**
 * The UDIF trailer (`UDIFResourceFile`, "koly"): the last 512 bytes of a
 * dmg, all numbers big-endian.
 *
 * | offset | size | field                                            |
 * | ------ | ---- | ------------------------------------------------ |
 * | 0      | 4    | Signature `koly`                                 |
 * | 4      | 4    | Version: 4                                       |
 * | 8      | 4    | HeaderSize: 512                                  |
 * | 12     | 4    | Flags (1: flattened)                             |
 * | 16     | 8    | RunningDataForkOffset                            |
 * | 24     | 8    | DataForkOffset: where chunk offsets count from   |
 * | 32     | 8    | DataForkLength                                   |
 * | 40     | 8    | RsrcForkOffset: a classic Mac resource fork      |
 * | 48     | 8    | RsrcForkLength                                   |
 * | 56     | 4    | SegmentNumber                                    |
 * | 60     | 4    | SegmentCount                                     |
 * | 64     | 16   | SegmentID (a UUID)                               |
 * | 80     | 4    | DataChecksumType (2: CRC-32)                     |
 * | 84     | 4    | DataChecksumSize, in bits (32)                   |
 * | 88     | 128  | DataChecksum (CRC-32 of the data fork in 88..91)  |
 * | 216    | 8    | XMLOffset: the XML property list                 |
 * | 224    | 8    | XMLLength                                        |
 * | 232    | 64   | reserved (7-zip reads a code signature at 296)   |
 * | 296    | 8    | CodeSignatureOffset                              |
 * | 304    | 8    | CodeSignatureLength                              |
 * | 312    | 40   | reserved                                         |
 * | 352    | 4    | MasterChecksumType (2: CRC-32)                   |
 * | 356    | 4    | MasterChecksumSize, in bits                      |
 * | 360    | 128  | MasterChecksum: CRC-32 of every blkx checksum    |
 * | 488    | 4    | ImageVariant                                     |
 * | 492    | 8    | SectorCount: the disk's size in 512-byte sectors |
 * | 500    | 12   | reserved                                         |
 *
 * This module is browser compatible.
 *
 * @module
 */

import {
  be32,
  be64,
  formatErrors,
  safeNumber,
  setBe32,
  setBe64,
} from "../_binary.ts";
import { KOLY_MAGIC, KOLY_SIZE } from "../_signatures.ts";

const dmgError = formatErrors("dmg");

// The trailer's size and magic live with the probes (drivers/_signatures.ts).
export { KOLY_MAGIC, KOLY_SIZE };
/** The checksum type of CRC-32 (`kUDIFChecksumCRC32`). */
export const CHECKSUM_CRC32 = 2;

/** A UDIF checksum field: type, size in bits, and the first word of data. */
export interface Checksum {
  /** 0: none; 2: CRC-32. */
  type: number;
  /** Size of the checksum in bits (32 for CRC-32). */
  bits: number;
  /** The checksum bytes (bits / 8 of them, at most 128). */
  data: Uint8Array;
}

/** The trailer's fields, validated. */
export interface Koly {
  /** File offset of the trailer itself. */
  offset: number;
  flags: number;
  /** Where this file's data fork starts in the data of all segments. */
  runningDataForkOffset: number;
  dataForkOffset: number;
  dataForkLength: number;
  rsrcForkOffset: number;
  rsrcForkLength: number;
  segmentNumber: number;
  segmentCount: number;
  /** SegmentID as hex. */
  segmentId: string;
  dataChecksum: Checksum;
  xmlOffset: number;
  xmlLength: number;
  masterChecksum: Checksum;
  imageVariant: number;
  sectorCount: number;
}

/** Reads a checksum field at `at` and checks its size. */
function readChecksum(
  b: Uint8Array,
  at: number,
  field: string,
  base: number,
  file?: string,
): Checksum {
  const type = be32(b, at);
  const bits = be32(b, at + 4);
  if (bits > 1024 || bits % 8) {
    throw dmgError(
      `${field}.size`,
      bits,
      "a whole number of bytes, 1024 bits or fewer",
      base + at + 4,
      file,
    );
  }
  if (type === CHECKSUM_CRC32 && bits !== 32) {
    throw dmgError(
      `${field}.size`,
      bits,
      "32 for a CRC-32 (type 2)",
      base + at + 4,
      file,
    );
  }
  return { type, bits, data: b.slice(at + 8, at + 8 + bits / 8) };
}

/**
 * Parses and validates the trailer `b` (512 bytes) found at `offset` of a
 * file of `fileSize` bytes: magic, version, header size, and every fork
 * within the bytes before the trailer.
 */
export function parseKoly(
  b: Uint8Array,
  offset: number,
  fileSize: number,
  file?: string,
): Koly {
  const fail = (field: string, value: unknown, limit: string, at: number) => {
    throw dmgError(field, value, limit, offset + at, file);
  };
  const magic = be32(b, 0);
  if (magic !== KOLY_MAGIC) {
    fail("koly.Signature", b.subarray(0, 4), '"koly" (6b6f6c79)', 0);
  }
  const version = be32(b, 4);
  if (version !== 4) fail("koly.Version", version, "4", 4);
  const headerSize = be32(b, 8);
  if (headerSize !== KOLY_SIZE) fail("koly.HeaderSize", headerSize, "512", 8);
  const u64 = (at: number, field: string) =>
    safeNumber(be64(b, at), "dmg", field, offset + at);
  // Every fork lies in the bytes before the trailer.
  const fork = (at: number, name: string) => {
    const start = u64(at, `koly.${name}Offset`);
    const length = u64(at + 8, `koly.${name}Length`);
    if (start > offset) {
      fail(
        `koly.${name}Offset`,
        start,
        `at most ${offset} (the trailer's offset in the ${fileSize}-byte file)`,
        at,
      );
    }
    if (length > offset - start) {
      fail(
        `koly.${name}Length`,
        length,
        `at most ${
          offset - start
        } (the fork at ${start} must end before the trailer at ${offset})`,
        at + 8,
      );
    }
    return [start, length];
  };
  const [dataForkOffset, dataForkLength] = fork(24, "DataFork");
  const [rsrcForkOffset, rsrcForkLength] = fork(40, "RsrcFork");
  const [xmlOffset, xmlLength] = fork(216, "XML");
  const sectorCount = u64(492, "koly.SectorCount");
  if (sectorCount > 2 ** 53 / 512) {
    fail("koly.SectorCount", sectorCount, `at most 2^44 sectors`, 492);
  }
  let segmentId = "";
  for (let i = 64; i < 80; i++) {
    segmentId += b[i].toString(16).padStart(2, "0");
  }
  return {
    offset,
    flags: be32(b, 12),
    runningDataForkOffset: u64(16, "koly.RunningDataForkOffset"),
    dataForkOffset,
    dataForkLength,
    rsrcForkOffset,
    rsrcForkLength,
    segmentNumber: be32(b, 56),
    segmentCount: be32(b, 60),
    segmentId,
    dataChecksum: readChecksum(b, 80, "koly.DataChecksum", offset, file),
    xmlOffset,
    xmlLength,
    masterChecksum: readChecksum(b, 352, "koly.MasterChecksum", offset, file),
    imageVariant: be32(b, 488),
    sectorCount,
  };
}

/** What the writer puts in a trailer. */
export interface KolyInit {
  dataForkLength: number;
  xmlOffset: number;
  xmlLength: number;
  dataForkCrc: number;
  masterCrc: number;
  sectorCount: number;
  /** 16 bytes. */
  segmentId: Uint8Array;
}

/** A trailer as hdiutil writes one for a flattened image with an XML plist. */
export function kolyBytes(init: KolyInit): Uint8Array {
  const b = new Uint8Array(KOLY_SIZE);
  setBe32(b, 0, KOLY_MAGIC);
  setBe32(b, 4, 4);
  setBe32(b, 8, KOLY_SIZE);
  setBe32(b, 12, 1); // kUDIFFlagsFlattened
  setBe64(b, 16, 0); // RunningDataForkOffset
  setBe64(b, 24, 0); // DataForkOffset
  setBe64(b, 32, init.dataForkLength);
  setBe32(b, 56, 1); // SegmentNumber
  setBe32(b, 60, 1); // SegmentCount
  b.set(init.segmentId.subarray(0, 16), 64);
  setBe32(b, 80, CHECKSUM_CRC32);
  setBe32(b, 84, 32);
  setBe32(b, 88, init.dataForkCrc);
  setBe64(b, 216, init.xmlOffset);
  setBe64(b, 224, init.xmlLength);
  setBe32(b, 352, CHECKSUM_CRC32);
  setBe32(b, 356, 32);
  setBe32(b, 360, init.masterCrc);
  setBe32(b, 488, 1); // ImageVariant: kUDIFDeviceImageType
  setBe64(b, 492, init.sectorCount);
  return b;
}
