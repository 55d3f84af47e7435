/**
 * asif: the Apple Sparse Image Format of macOS 26 (`.asif`, `shdw`),
 * read-only.
 *
 * This module is browser compatible.
 *
 * Apple publishes no description; this follows the reverse-engineered ones
 * of huven/asif-format and fox-it's dissect.hypervisor (`asif.py`). All
 * numbers are big-endian.
 *
 * Header (at 0):
 *
 * | offset | size | field                                                   |
 * | -----: | ---: | ------------------------------------------------------- |
 * |      0 |    4 | signature `shdw`                                        |
 * |      4 |    4 | version (1)                                             |
 * |      8 |    4 | header size                                             |
 * |     12 |    4 | flags                                                   |
 * |     16 |   16 | two directory offsets (bytes), 8 each                   |
 * |     32 |   16 | UUID                                                    |
 * |     48 |    8 | sector count: the disk's size in blocks                 |
 * |     56 |    8 | maximum sector count: the size it may grow to           |
 * |     64 |    4 | chunk size (bytes; typically 1 MiB)                     |
 * |     68 |    2 | block (sector) size (bytes; typically 512)              |
 * |     70 |    2 | (unknown)                                               |
 * |     72 |    8 | metadata chunk (a logical chunk past the disk's end)    |
 *
 * With N = 4 × block size data chunks per chunk group, a group takes
 * S = 8 × (N + 1) bytes (N data-chunk entries, then one bitmap-chunk
 * entry), a table holds C = ⌊chunk size / S⌋ groups and maps
 * D = C × N × chunk size bytes of the disk.
 *
 * A directory is a sequence number (8 bytes) and then, for each D bytes
 * of the disk in turn, the chunk number of the table mapping them (0: no
 * table, all zeros). Of the two directories the one with the higher
 * sequence number is current. A table sits at its chunk number × chunk
 * size; the entry of data chunk `k` of the table is at index
 * `⌊k / N⌋ × (N + 1) + k mod N`.
 *
 * An entry's low 55 bits are a chunk number (bytes at chunk × chunk
 * size), bits 55-61 reserved, bits 63-62 its status: 00 with chunk 0,
 * never written (zeros); 01, written whole; 11, written in part, each
 * sector's state in the group's bitmap chunk (2 bits per sector, least
 * significant first: 00 never written, 01 written). Other states are not
 * characterised and are refused rather than guessed.
 *
 * @module
 */

import { ASIF_SIGNATURE as SIGNATURE, probeAsif } from "./_signatures.ts";
import {
  ascii,
  be16,
  be32,
  be64,
  formatErrors,
  safeNumber,
} from "./_binary.ts";
import { bandReader } from "./_bands.ts";
import { UnsupportedError } from "../streams/errors.ts";
import {
  type Driver,
  type Image,
  type OpenOptions,
  readInto,
  type Source,
} from "../streams/types.ts";

const FORMAT = "asif";
const VERSION = 1;
const HEADER_BYTES = 80;
/** The largest chunk accepted (a table is read whole, and is at most a chunk). */
const MAX_CHUNK = 64 << 20;
const MAX_BLOCK = 1 << 16;
const CHUNK_MASK = (1n << 55n) - 1n;
/** Tables kept in memory (each at most a chunk, typically 1 MiB). */
const TABLE_CACHE = 16;

const fail = formatErrors(FORMAT);

/** The parsed header. */
interface Header {
  version: number;
  headerSize: number;
  flags: number;
  directories: [number, number];
  uuid: string;
  diskSize: number;
  maxSize: number;
  chunkSize: number;
  blockSize: number;
  metadataChunk: number;
}

function uuidOf(b: Uint8Array): string {
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${
    hex.slice(16, 20)
  }-${hex.slice(20)}`;
}

function parseHeader(b: Uint8Array): Header {
  if (ascii(b, 0, 4) !== SIGNATURE) {
    throw fail("signature", ascii(b, 0, 4), JSON.stringify(SIGNATURE), 0);
  }
  const version = be32(b, 4);
  if (version !== VERSION) {
    throw new UnsupportedError(
      { format: FORMAT, field: "version", value: version, offset: 4 },
      `header version ${version} is not the one described (${VERSION})`,
    );
  }
  const blockSize = be16(b, 68);
  if (
    blockSize < 512 || blockSize > MAX_BLOCK ||
    (blockSize & (blockSize - 1)) !== 0
  ) {
    throw fail(
      "block size",
      blockSize,
      `a power of two from 512 to ${MAX_BLOCK}`,
      68,
    );
  }
  const chunkSize = be32(b, 64);
  const groupBytes = 8 * (4 * blockSize + 1);
  if (
    chunkSize % blockSize !== 0 || chunkSize < groupBytes ||
    chunkSize > MAX_CHUNK
  ) {
    throw fail(
      "chunk size",
      chunkSize,
      `a multiple of the block size ${blockSize}, from ${groupBytes} (one chunk group) to ${MAX_CHUNK}`,
      64,
    );
  }
  const sectors = safeNumber(be64(b, 48), FORMAT, "sector count", 48);
  const maxSectors = safeNumber(
    be64(b, 56),
    FORMAT,
    "maximum sector count",
    56,
  );
  const diskSize = sectors * blockSize;
  const maxSize = maxSectors * blockSize;
  if (!Number.isSafeInteger(maxSize)) {
    throw fail(
      "maximum sector count",
      maxSectors,
      "at most 2^53 bytes of disk",
      56,
    );
  }
  if (sectors > maxSectors) {
    throw fail(
      "sector count",
      sectors,
      `at most the maximum sector count ${maxSectors}`,
      48,
    );
  }
  return {
    version,
    headerSize: be32(b, 8),
    flags: be32(b, 12),
    directories: [
      safeNumber(be64(b, 16), FORMAT, "directory offset", 16),
      safeNumber(be64(b, 24), FORMAT, "directory offset", 24),
    ],
    uuid: uuidOf(b.subarray(32, 48)),
    diskSize,
    maxSize,
    chunkSize,
    blockSize,
    metadataChunk: safeNumber(be64(b, 72), FORMAT, "metadata chunk", 72),
  };
}

async function openAsif(source: Source, options: OpenOptions): Promise<Image> {
  if (options.writable) {
    throw new UnsupportedError(
      { format: FORMAT },
      "ASIF images are read-only here",
    );
  }
  if (source.size < HEADER_BYTES) {
    throw fail(
      "file size",
      source.size,
      `at least ${HEADER_BYTES} bytes (the header)`,
    );
  }
  const header = parseHeader(await source.read(0, HEADER_BYTES));
  const { chunkSize, blockSize, diskSize } = header;
  const perGroup = 4 * blockSize;
  const groups = Math.floor(chunkSize / (8 * (perGroup + 1)));
  const tableEntries = groups * (perGroup + 1);
  const chunksPerTable = groups * perGroup;
  const tableSpan = chunksPerTable * chunkSize;
  const tablesNeeded = Math.ceil(diskSize / tableSpan);
  const chunkCount = Math.ceil(diskSize / chunkSize);

  // The current directory: the higher sequence number of the two.
  const directories = await Promise.all(
    header.directories.map(async (at, i) => {
      const field = `directory offset ${i}`;
      if (at < HEADER_BYTES || at + 8 + tablesNeeded * 8 > source.size) {
        throw fail(
          field,
          at,
          `past the header and with its ${tablesNeeded} entries within the file's ${source.size} bytes`,
          16 + 8 * i,
        );
      }
      const bytes = await source.read(at, 8 + tablesNeeded * 8);
      return { at, sequence: be64(bytes, 0), bytes };
    }),
  );
  const current = directories[1].sequence > directories[0].sequence
    ? directories[1]
    : directories[0];
  const tableChunks: number[] = [];
  for (let t = 0; t < tablesNeeded; t++) {
    const fieldAt = current.at + 8 + t * 8;
    const chunk = safeNumber(
      be64(current.bytes, 8 + t * 8),
      FORMAT,
      `directory[${t}]`,
      fieldAt,
    );
    if (chunk !== 0 && (chunk * chunkSize + tableEntries * 8 > source.size)) {
      throw fail(
        `directory[${t}]`,
        chunk,
        `a table chunk within the file: ${tableEntries * 8} bytes at ${
          chunk * chunkSize
        } pass its end at ${source.size}`,
        fieldAt,
      );
    }
    tableChunks.push(chunk);
  }

  const tables = new Map<number, Promise<Uint8Array>>();
  const tableOf = (t: number): Promise<Uint8Array> => {
    let table = tables.get(t);
    if (!table) {
      table = source.read(tableChunks[t] * chunkSize, tableEntries * 8);
      tables.set(t, table);
      if (tables.size > TABLE_CACHE) tables.delete(tables.keys().next().value!);
    }
    return table;
  };

  /** The file offset of chunk number `chunk`, checked to hold `bytes` within the file. */
  const chunkAt = (
    chunk: number,
    bytes: number,
    field: string,
    fieldAt: number,
  ) => {
    const at = chunk * chunkSize;
    if (!Number.isSafeInteger(at) || at + bytes > source.size) {
      throw fail(
        field,
        chunk,
        `a chunk within the file: ${bytes} bytes at ${at} pass its end at ${source.size}`,
        fieldAt,
      );
    }
    return at;
  };

  const reader = bandReader({
    size: diskSize,
    bandSize: chunkSize,
    hole: "zero",
    async place(index) {
      const t = Math.floor(index / chunksPerTable);
      if (tableChunks[t] === 0) {
        return { holeUntil: Math.min(chunkCount, (t + 1) * chunksPerTable) };
      }
      const table = await tableOf(t);
      const k = index - t * chunksPerTable;
      const group = Math.floor(k / perGroup);
      const entryIndex = group * (perGroup + 1) + (k % perGroup);
      const field = `table ${t} entry ${entryIndex}`;
      const fieldAt = tableChunks[t] * chunkSize + entryIndex * 8;
      const entry = be64(table, entryIndex * 8);
      const status = Number(entry >> 62n);
      const chunk = Number(entry & CHUNK_MASK);
      if (status === 0 && chunk === 0) {
        return { holeUntil: index + 1 };
      }
      if (status === 0 || status === 2) {
        throw new UnsupportedError(
          {
            format: FORMAT,
            field,
            value: `0x${entry.toString(16)}`,
            offset: fieldAt,
          },
          `${field} has status ${
            status.toString(2).padStart(2, "0")
          } with chunk ${chunk}, a state no description covers`,
        );
      }
      const stored = Math.min(chunkSize, diskSize - index * chunkSize);
      const dataAt = chunkAt(chunk, stored, field, fieldAt);
      if (status === 1) {
        return { read: (at, into) => readInto(source, dataAt + at, into) };
      }
      // Written in part: the group's bitmap chunk says which sectors were.
      const bitmapIndex = group * (perGroup + 1) + perGroup;
      const bitmapEntry = be64(table, bitmapIndex * 8);
      const bitmapChunk = Number(bitmapEntry & CHUNK_MASK);
      const sectorsPerChunk = chunkSize / blockSize;
      const firstSector = (k % perGroup) * sectorsPerChunk;
      const bitmapField = `table ${t} entry ${bitmapIndex} (bitmap)`;
      const bitmapFieldAt = tableChunks[t] * chunkSize + bitmapIndex * 8;
      if (bitmapChunk === 0) {
        throw fail(
          bitmapField,
          0,
          `a bitmap chunk for the partly written ${field}`,
          bitmapFieldAt,
        );
      }
      const bitmapAt =
        chunkAt(bitmapChunk, chunkSize, bitmapField, bitmapFieldAt) +
        firstSector / 4;
      return {
        async read(at, into) {
          const first = Math.floor(at / blockSize);
          const last = Math.floor((at + into.length - 1) / blockSize);
          // Two bits per sector, four sectors a byte: the bytes covering first..last.
          const byteFirst = first >> 2;
          const bits = await source.read(
            bitmapAt + byteFirst,
            (last >> 2) - byteFirst + 1,
          );
          await readInto(source, dataAt + at, into);
          for (let s = first; s <= last; s++) {
            const state = (bits[(s >> 2) - byteFirst] >> ((s & 3) * 2)) & 3;
            if (state === 1) continue;
            if (state !== 0) {
              throw new UnsupportedError(
                {
                  format: FORMAT,
                  field: bitmapField,
                  value: state,
                  offset: bitmapAt + (s >> 2),
                },
                `sector ${firstSector + s} of ${field} has bitmap state ${
                  state.toString(2).padStart(2, "0")
                }, a state no description covers`,
              );
            }
            const from = Math.max(at, s * blockSize) - at;
            const to = Math.min(at + into.length, (s + 1) * blockSize) - at;
            into.fill(0, from, to);
          }
        },
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
      uuid: header.uuid,
      chunkSize,
      blockSize,
      maxSize: header.maxSize,
      directorySequence: Number(current.sequence),
      tables: tablesNeeded,
      tablesPresent: tableChunks.filter((c) => c !== 0).length,
      flags: header.flags,
    },
    ...reader,
    close: () => source.close?.() ?? Promise.resolve(),
  };
}

/**
 * The asif driver: Apple Sparse Image Format images (macOS 26, `diskutil
 * image create --format ASIF`), read-only. Chunks never written are `zero`
 * runs in the allocation map.
 *
 * @example
 * ```ts
 * import { asif } from "../mod.ts";
 * const head = new TextEncoder().encode("shdw");
 * console.log(asif.probe({ head, tail: head, size: 4 })); // 100
 * ```
 */
export const asif: Driver = {
  name: FORMAT,
  description: "Apple Sparse Image Format (.asif, macOS 26; read-only)",
  probe: probeAsif,
  open: openAsif,
};
