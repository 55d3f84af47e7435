/**
 * sparseimage: Apple's sparse disk image (UDSP, `.sparseimage`), read-only.
 *
 * This module is browser compatible.
 *
 * The file is a chain of 4096-byte nodes, each followed by the bands it
 * maps (all numbers big-endian), as libyal's libmodi documentation and
 * apfs-fuse's `DeviceSparseImage` describe it:
 *
 * Header node (at 0):
 *
 * | offset | size | field                                                 |
 * | -----: | ---: | ----------------------------------------------------- |
 * |      0 |    4 | signature `sprs`                                      |
 * |      4 |    4 | version (3)                                           |
 * |      8 |    4 | sectors_per_band: the band size in 512-byte sectors   |
 * |     12 |    4 | flags                                                 |
 * |     16 |    4 | total_sectors_low: the low 32 bits of total_sectors   |
 * |     20 |    8 | next_node_offset: the next index node, 0 for none     |
 * |     28 |    8 | total_sectors: the disk's size in sectors             |
 * |     36 |   28 | zeros                                                 |
 * |     64 | 4032 | band_id[1008]                                         |
 *
 * Index node (at next_node_offset):
 *
 * | offset | size | field                                                 |
 * | -----: | ---: | ----------------------------------------------------- |
 * |      0 |    4 | signature `sprs`                                      |
 * |      4 |    4 | index_node_number                                     |
 * |      8 |    4 | flags                                                 |
 * |     12 |    8 | next_node_offset                                      |
 * |     20 |   36 | zeros                                                 |
 * |     56 | 4040 | band_id[1010]                                         |
 *
 * Slot `k` of the node at `N` holds band `band_id[k] - 1` of the disk (0:
 * an empty slot) and its bytes sit at `N + 4096 + k × band size`. Bands
 * are stored in the order they were first written, not in disk order; a
 * band no slot names was never written and reads as zeros.
 *
 * @module
 */

import {
  probeSparseimage,
  SPARSEIMAGE_SIGNATURE as SIGNATURE,
} from "./_signatures.ts";
import { ascii, be32, be64, formatErrors, safeNumber } from "./_binary.ts";
import { bandReader, nextPresent } from "./_bands.ts";
import { UnsupportedError } from "../streams/errors.ts";
import {
  type Driver,
  type Image,
  type OpenOptions,
  readInto,
  type Source,
} from "../streams/types.ts";

const FORMAT = "sparseimage";
const SECTOR = 512;
const NODE_SIZE = 4096;
/** Band slots of the header node, from byte 64. */
const HEADER_SLOTS = 1008;
const HEADER_SLOTS_AT = 64;
/** Band slots of an index node, from byte 56. */
const INDEX_SLOTS = 1010;
const INDEX_SLOTS_AT = 56;
const VERSION = 3;
/**
 * The largest band accepted: 4 GiB (hdiutil's `sparse-band-size` tops out
 * far below). Bands are read in slices, so this bounds no allocation; it
 * keeps offsets arithmetic far from 2^53.
 */
const MAX_BAND_SECTORS = 1 << 23;

const fail = formatErrors(FORMAT);

/** The parsed header node. */
interface Header {
  version: number;
  bandSize: number;
  flags: number;
  diskSize: number;
  nextNode: number;
}

function parseHeader(b: Uint8Array): Header {
  if (ascii(b, 0, 4) !== SIGNATURE) {
    throw fail("signature", ascii(b, 0, 4), JSON.stringify(SIGNATURE), 0);
  }
  const version = be32(b, 4);
  if (version !== VERSION) {
    throw new UnsupportedError(
      { format: FORMAT, field: "version", value: version, offset: 4 },
      `version ${version} is not the one described (${VERSION})`,
    );
  }
  const sectorsPerBand = be32(b, 8);
  if (sectorsPerBand < 1 || sectorsPerBand > MAX_BAND_SECTORS) {
    throw fail(
      "sectors_per_band",
      sectorsPerBand,
      `from 1 to ${MAX_BAND_SECTORS}`,
      8,
    );
  }
  const low = be32(b, 16);
  let sectors = safeNumber(be64(b, 28), FORMAT, "total_sectors", 28);
  if (sectors === 0) {
    sectors = low;
  } else if (sectors % 2 ** 32 !== low) {
    throw fail(
      "total_sectors_low",
      low,
      `the low 32 bits of total_sectors ${sectors}`,
      16,
    );
  }
  const diskSize = sectors * SECTOR;
  if (!Number.isSafeInteger(diskSize)) {
    throw fail("total_sectors", sectors, "at most 2^53 bytes of disk", 28);
  }
  return {
    version,
    bandSize: sectorsPerBand * SECTOR,
    flags: be32(b, 12),
    diskSize,
    nextNode: safeNumber(be64(b, 20), FORMAT, "next_node_offset", 20),
  };
}

async function openSparseimage(
  source: Source,
  options: OpenOptions,
): Promise<Image> {
  if (options.writable) {
    throw new UnsupportedError(
      { format: FORMAT },
      "sparseimage files are read-only here",
    );
  }
  if (source.size < NODE_SIZE) {
    throw fail(
      "file size",
      source.size,
      `at least ${NODE_SIZE} bytes (the header node)`,
    );
  }
  const first = await source.read(0, NODE_SIZE);
  const header = parseHeader(first);
  const { bandSize, diskSize } = header;
  const bandCount = Math.ceil(diskSize / bandSize);
  /** File offset of each stored band, by band number. */
  const where = new Map<number, number>();
  let nodes = 1;

  const takeSlots = (
    node: Uint8Array,
    nodeAt: number,
    slotsAt: number,
    slots: number,
  ) => {
    for (let k = 0; k < slots; k++) {
      const id = be32(node, slotsAt + k * 4);
      if (id === 0) continue;
      const field = `band_id[${k}]`;
      const fieldAt = nodeAt + slotsAt + k * 4;
      if (id > bandCount) {
        throw fail(
          field,
          id,
          `from 1 to ${bandCount} (the disk's bands of ${bandSize} bytes)`,
          fieldAt,
        );
      }
      const band = id - 1;
      if (where.has(band)) {
        throw fail(
          field,
          id,
          "named by one slot only (it is named twice)",
          fieldAt,
        );
      }
      const at = nodeAt + NODE_SIZE + k * bandSize;
      const stored = Math.min(bandSize, diskSize - band * bandSize);
      if (at + stored > source.size) {
        throw fail(
          field,
          id,
          `a band within the file: its ${stored} bytes at ${at} pass the file's end at ${source.size}`,
          fieldAt,
        );
      }
      where.set(band, at);
    }
  };

  takeSlots(first, 0, HEADER_SLOTS_AT, HEADER_SLOTS);
  // The index nodes: each must lie past the one before (no loops) and
  // within the file, so the walk reads each byte of the file at most once.
  let nodeAt = 0;
  let next = header.nextNode;
  let nextField = 20;
  while (next !== 0) {
    if (next < nodeAt + NODE_SIZE || next + NODE_SIZE > source.size) {
      throw fail(
        "next_node_offset",
        next,
        `past the node before it (at ${nodeAt}) and within the file's ${source.size} bytes`,
        nodeAt + nextField,
      );
    }
    nodeAt = next;
    const node = await source.read(nodeAt, NODE_SIZE);
    if (ascii(node, 0, 4) !== SIGNATURE) {
      throw fail(
        "index node signature",
        ascii(node, 0, 4),
        JSON.stringify(SIGNATURE),
        nodeAt,
      );
    }
    takeSlots(node, nodeAt, INDEX_SLOTS_AT, INDEX_SLOTS);
    nodes++;
    nextField = 12;
    next = safeNumber(be64(node, 12), FORMAT, "next_node_offset", nodeAt + 12);
  }

  const present = [...where.keys()].sort((a, b) => a - b);
  const reader = bandReader({
    size: diskSize,
    bandSize,
    hole: "zero",
    place(band) {
      const at = where.get(band);
      if (at === undefined) {
        return { holeUntil: nextPresent(present, band, bandCount) };
      }
      return {
        read: (offsetInBand, into) => readInto(source, at + offsetInBand, into),
      };
    },
  });

  return {
    format: FORMAT,
    size: diskSize,
    name: source.name,
    encrypted: false,
    details: {
      version: header.version,
      bandSize,
      bands: bandCount,
      bandsPresent: where.size,
      nodes,
      flags: header.flags,
    },
    ...reader,
    close: () => source.close?.() ?? Promise.resolve(),
  };
}

/**
 * The sparseimage driver: Apple's sparse disk images (hdiutil's `UDSP`
 * format, `.sparseimage` files), read-only. Bands never written are `zero`
 * runs in the allocation map.
 *
 * @example
 * ```ts
 * import { sparseimage } from "../mod.ts";
 * const head = new TextEncoder().encode("sprs");
 * console.log(sparseimage.probe({ head, tail: head, size: 4 })); // 100
 * ```
 */
export const sparseimage: Driver = {
  name: FORMAT,
  description: "Apple sparse disk image (.sparseimage, UDSP; read-only)",
  probe: probeSparseimage,
  open: openSparseimage,
};
