/**
 * diskcopy42: Apple DiskCopy 4.2 floppy images (`.image`, `.img`, `.dsk`,
 * `.dc42`), bare or inside a MacBinary wrapper, read-only, with both
 * checksums verified when the image is opened.
 *
 * This module is browser compatible.
 *
 * The header (84 bytes, big-endian), as Apple II File Type Note $e0/8005
 * and the DiskCopy 4.2 format notes describe it:
 *
 * | offset | size | field                                                   |
 * | -----: | ---: | ------------------------------------------------------- |
 * |      0 |   64 | diskName: a length byte (0..63), then Mac OS Roman text  |
 * |     64 |    4 | dataSize: bytes of disk data, a multiple of 512          |
 * |     68 |    4 | tagSize: bytes of tag data, a multiple of 12 (may be 0)  |
 * |     72 |    4 | dataChecksum                                             |
 * |     76 |    4 | tagChecksum (0 without tags)                             |
 * |     80 |    1 | diskFormat: 0 400K GCR, 1 800K GCR, 2 720K MFM, 3 1440K MFM |
 * |     81 |    1 | formatByte: $12/$02 400K, $22 800K Mac, $24 800K ProDOS  |
 * |     82 |    2 | private: $0100                                           |
 * |     84 |    … | the disk data, then the tag data                         |
 *
 * A checksum is the 32-bit sum of the area's big-endian 16-bit words, the
 * sum rotated right by one bit after each word. The tag checksum leaves
 * out the first 12 bytes of the tags (for DiskCopy's older versions).
 *
 * A MacBinary (I, II or III) file holds the image as its data fork: a
 * 128-byte header (byte 0 zero, name length 1..63 at 1, type at 65,
 * creator at 69, byte 74 zero, byte 82 zero, data fork length at 83,
 * resource fork length at 87, version at 122, and from MacBinary II a
 * CRC-16/XMODEM of bytes 0..123 at 124), then the data fork. DiskCopy
 * images are type `dImg`, creator `dCpy`.
 *
 * NDIF images (DiskCopy 6, creator `ddsk`) keep their block map in the
 * resource fork, which no public description covers: they are recognised
 * (in a MacBinary wrapper) and refused by name.
 *
 * @module
 */

import {
  DISKCOPY_HEADER_SIZE as HEADER_SIZE,
  DISKCOPY_PRIVATE as PRIVATE,
  looksLikeDiskCopyHeader,
  looksLikeMacBinary,
  MACBINARY_HEADER,
  probeDiskcopy42,
} from "./_signatures.ts";
import { ascii, be16, be32, formatErrors } from "./_binary.ts";
import { ChecksumError, UnsupportedError } from "../streams/errors.ts";
import {
  checkRange,
  type Driver,
  type Image,
  type OpenOptions,
  readInto,
  type Source,
} from "../streams/types.ts";

const FORMAT = "diskcopy42";
const TAG_BYTES_UNCHECKED = 12;
/** Bytes read per step when checksumming. */
const CHECKSUM_STEP = 1 << 20;

/** The disk formats the diskFormat byte names. */
const DISK_FORMATS = ["400K GCR", "800K GCR", "720K MFM", "1440K MFM"];

const fail = formatErrors(FORMAT);

/** The parsed DiskCopy header. */
interface Header {
  diskName: string;
  dataSize: number;
  tagSize: number;
  dataChecksum: number;
  tagChecksum: number;
  diskFormat: number;
  formatByte: number;
}

/** A MacBinary header that passed its checks. */
interface MacBinary {
  name: string;
  type: string;
  creator: string;
  dataForkLength: number;
  version: number;
}

/**
 * CRC-16/XMODEM (polynomial 0x1021, initial 0), as MacBinary II stores
 * over its header's first 124 bytes.
 */
export function crc16Xmodem(bytes: Uint8Array): number {
  let crc = 0;
  for (const byte of bytes) {
    crc ^= byte << 8;
    for (let bit = 0; bit < 8; bit++) {
      crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
    }
  }
  return crc;
}

/**
 * The DiskCopy 4.2 checksum of `bytes` (an even length), continuing from
 * `sum`: add each big-endian 16-bit word, then rotate right by one bit.
 *
 * @example
 * ```ts
 * import { diskCopyChecksum } from "./diskcopy42.ts";
 * console.log(diskCopyChecksum(new Uint8Array([0, 2]))); // 1
 * ```
 */
export function diskCopyChecksum(bytes: Uint8Array, sum = 0): number {
  // Unsigned 32-bit arithmetic: `>>> 0` after each step keeps the sum a
  // uint32 (the add can carry past 2^32 and must wrap, as in C).
  for (let i = 0; i + 1 < bytes.length; i += 2) {
    sum = (sum + ((bytes[i] << 8) | bytes[i + 1])) >>> 0;
    sum = ((sum >>> 1) | ((sum & 1) << 31)) >>> 0;
  }
  return sum;
}

function parseMacBinary(b: Uint8Array, fileSize: number): MacBinary {
  const version = b[122];
  if (version >= 129) {
    // MacBinary II and III carry a CRC of the header.
    const stored = be16(b, 124);
    const computed = crc16Xmodem(b.subarray(0, 124));
    if (stored !== computed) {
      throw new ChecksumError(
        { format: FORMAT, field: "MacBinary header CRC", offset: 124 },
        `0x${stored.toString(16).padStart(4, "0")}`,
        `0x${computed.toString(16).padStart(4, "0")}`,
      );
    }
  }
  const dataForkLength = be32(b, 83);
  if (MACBINARY_HEADER + dataForkLength > fileSize) {
    throw fail(
      "MacBinary data fork length",
      dataForkLength,
      `within the file: ${MACBINARY_HEADER} + ${dataForkLength} bytes pass its end at ${fileSize}`,
      83,
    );
  }
  return {
    name: new TextDecoder("macintosh").decode(b.subarray(2, 2 + b[1])),
    type: ascii(b, 65, 69),
    creator: ascii(b, 69, 73),
    dataForkLength,
    version,
  };
}

/** Parses and validates the header at `at` against the bytes `room` that hold the image. */
function parseHeader(b: Uint8Array, at: number, room: number): Header {
  const nameLength = b[at];
  if (nameLength > 63) {
    throw fail("diskName length", nameLength, "at most 63", at);
  }
  const priv = be16(b, at + 82);
  if (priv !== PRIVATE) {
    throw fail("private", `0x${priv.toString(16)}`, "0x0100", at + 82);
  }
  const dataSize = be32(b, at + 64);
  if (dataSize % 512 !== 0) {
    throw fail("dataSize", dataSize, "a multiple of 512", at + 64);
  }
  const tagSize = be32(b, at + 68);
  if (tagSize % 12 !== 0) {
    throw fail("tagSize", tagSize, "a multiple of 12", at + 68);
  }
  if (HEADER_SIZE + dataSize + tagSize > room) {
    throw fail(
      "dataSize",
      dataSize,
      `with tagSize ${tagSize} within the image's ${room} bytes (84 + data + tags)`,
      at + 64,
    );
  }
  return {
    diskName: new TextDecoder("macintosh").decode(
      b.subarray(at + 1, at + 1 + nameLength),
    ),
    dataSize,
    tagSize,
    dataChecksum: be32(b, at + 72),
    tagChecksum: be32(b, at + 76),
    diskFormat: b[at + 80],
    formatByte: b[at + 81],
  };
}

/** The checksum of `length` bytes of `source` at `offset`, read in steps. */
async function checksumOf(
  source: Source,
  offset: number,
  length: number,
): Promise<number> {
  const buffer = new Uint8Array(Math.min(length, CHECKSUM_STEP));
  let sum = 0;
  for (let at = 0; at < length; at += buffer.length) {
    const piece = buffer.subarray(0, Math.min(buffer.length, length - at));
    await readInto(source, offset + at, piece);
    sum = diskCopyChecksum(piece, sum);
  }
  return sum;
}

const hex32 = (n: number) => `0x${n.toString(16).padStart(8, "0")}`;

async function openDiskCopy(
  source: Source,
  options: OpenOptions,
): Promise<Image> {
  if (options.writable) {
    throw new UnsupportedError(
      { format: FORMAT },
      "DiskCopy 4.2 images are read-only here",
    );
  }
  const head = await source.read(
    0,
    Math.min(source.size, MACBINARY_HEADER + HEADER_SIZE),
  );
  let base = 0;
  let room = source.size;
  let wrapper: MacBinary | undefined;
  if (!looksLikeDiskCopyHeader(head, 0) && looksLikeMacBinary(head)) {
    wrapper = parseMacBinary(head, source.size);
    const ndif = wrapper.creator === "ddsk" || wrapper.type === "rohd";
    if (ndif && !looksLikeDiskCopyHeader(head, MACBINARY_HEADER)) {
      throw new UnsupportedError(
        {
          format: FORMAT,
          field: "MacBinary type/creator",
          value: `${wrapper.type}/${wrapper.creator}`,
          offset: 65,
          file: source.name,
        },
        `this is an NDIF image (DiskCopy 6, ${wrapper.type}/${wrapper.creator}): its block map lives in the resource fork, which no public description covers; convert it to UDIF on a Mac (hdiutil convert -format UDRO)`,
      );
    }
    base = MACBINARY_HEADER;
    room = wrapper.dataForkLength;
  }
  if (head.length < base + HEADER_SIZE) {
    throw fail(
      "file size",
      source.size,
      `at least ${base + HEADER_SIZE} bytes (${
        wrapper ? "the MacBinary header and " : ""
      }the 84-byte header)`,
    );
  }
  const header = parseHeader(head, base, room);
  const dataAt = base + HEADER_SIZE;
  const { dataSize, tagSize } = header;

  // Both checksums, over every byte once: the images are floppies (at
  // most a few MiB) and a bad checksum must stop the open, not a read.
  // Emulators that write into images often leave the checksums stale:
  // `verify=off` (`convert --no-verify`) reads such an image anyway.
  const verify = options.options?.verify !== "off";
  const dataSum = verify
    ? await checksumOf(source, dataAt, dataSize)
    : header.dataChecksum;
  if (dataSum !== header.dataChecksum) {
    throw new ChecksumError(
      {
        format: FORMAT,
        field: "dataChecksum",
        offset: base + 72,
        file: source.name,
      },
      hex32(header.dataChecksum),
      hex32(dataSum),
    );
  }
  const tagSum = !verify
    ? header.tagChecksum
    : tagSize > TAG_BYTES_UNCHECKED
    ? await checksumOf(
      source,
      dataAt + dataSize + TAG_BYTES_UNCHECKED,
      tagSize - TAG_BYTES_UNCHECKED,
    )
    : 0;
  if (tagSum !== header.tagChecksum) {
    throw new ChecksumError(
      {
        format: FORMAT,
        field: "tagChecksum",
        offset: base + 76,
        file: source.name,
      },
      hex32(header.tagChecksum),
      hex32(tagSum),
    );
  }

  return {
    format: FORMAT,
    size: dataSize,
    name: source.name,
    encrypted: false,
    details: {
      diskName: header.diskName,
      diskFormat: header.diskFormat,
      diskFormatName: DISK_FORMATS[header.diskFormat] ?? "unknown",
      formatByte: `0x${header.formatByte.toString(16).padStart(2, "0")}`,
      tagSize,
      dataChecksum: hex32(header.dataChecksum),
      tagChecksum: hex32(header.tagChecksum),
      checksums: verify ? "verified" : "not checked (verify=off)",
      ...(wrapper
        ? {
          macBinary: {
            name: wrapper.name,
            type: wrapper.type,
            creator: wrapper.creator,
            version: wrapper.version,
          },
        }
        : {}),
    },
    read(offset, length) {
      checkRange(dataSize, offset, length);
      return source.read(dataAt + offset, length);
    },
    readInto(offset, into) {
      checkRange(dataSize, offset, into.length);
      return readInto(source, dataAt + offset, into);
    },
    async *extents(offset, length) {
      checkRange(dataSize, offset, length);
      if (length > 0) yield { offset, length, kind: "data" };
    },
    close: () => source.close?.() ?? Promise.resolve(),
  };
}

/**
 * The diskcopy42 driver: Apple DiskCopy 4.2 floppy images, bare or in a
 * MacBinary wrapper, read-only; the data and tag checksums are verified
 * when the image is opened (a mismatch is a `ChecksumError`; `options:
 * { verify: "off" }` skips them). NDIF images
 * (DiskCopy 6) in a MacBinary wrapper are recognised and refused.
 *
 * @example
 * ```ts
 * import { diskcopy42 } from "../mod.ts";
 * const head = new Uint8Array(84);
 * head[64 + 2] = 0x02; // dataSize 0x200
 * head[82] = 1; // private 0x0100
 * console.log(diskcopy42.probe({ head, tail: head, size: 84 + 512 })); // 50
 * ```
 */
export const diskcopy42: Driver = {
  name: FORMAT,
  description:
    "Apple DiskCopy 4.2 floppy image (.image, .dc42; also in MacBinary; read-only)",
  probe: probeDiskcopy42,
  open: openDiskCopy,
};
