/**
 * seSparse: the sparse extents ESXi 6.5+ writes for snapshots and linked
 * clones on VMFS 6, opened on their own (bare), read-only.
 *
 * This module is browser compatible.
 *
 * No public specification exists; the layout below is the one QEMU's
 * `block/vmdk.c` reads (its checks are kept: grain size 8 sectors, grain
 * tables of 64 sectors, no flags, zero padding). Every field is a 64-bit
 * little-endian number; offsets and sizes are in 512-byte sectors.
 *
 * Constant header (512 bytes at 0):
 *
 * | offset | field                                        |
 * | -----: | -------------------------------------------- |
 * |      0 | magic 0xCAFEBABE                             |
 * |      8 | version 0x0000000200000001                   |
 * |     16 | capacity (sectors)                           |
 * |     24 | grain_size (8)                               |
 * |     32 | grain_table_size (64: 4096 entries)          |
 * |     40 | flags (0)                                    |
 * |  48-79 | reserved (0)                                 |
 * |     80 | volatile_header_offset, 88: its size         |
 * |     96 | journal header offset and size, journal ...  |
 * |    128 | grain_dir_offset, 136: grain_dir_size        |
 * |    144 | grain_tables_offset, 152: grain_tables_size  |
 * |    160 | free bitmap, backmap (offset, size each)     |
 * |    192 | grains_offset, 200: grains_size              |
 *
 * Volatile header (512 bytes at volatile_header_offset): magic 0xCAFECAFE,
 * free_gt_number, next_txn_seq_number, replay_journal (non-zero: the image
 * is dirty; refused, as QEMU refuses it).
 *
 * Grain directory entries: 0 when the grain table is not allocated, else
 * 0x10000000 in the top 32 bits and the grain table's index below (tables
 * of 4096 entries at grain_tables_offset). Grain table entries, by their
 * top 4 bits: 0 not allocated (the whole entry 0), 1 unmapped and 2 zero
 * (zeros), 3 allocated: the grain number is bits 48-59 followed by bits
 * 0-47 shifted up by 12, its 4 KiB at grains_offset + number * 8 sectors.
 *
 * An extent alone does not name its parent (the descriptor does): its
 * unallocated grains are the parent's bytes, so reading them fails with a
 * {@linkcode BackingFileError}; the allocation map and `info` work.
 *
 * @module
 */

import { probeSeSparse } from "./_signatures.ts";
import { formatErrors, le32, le64 } from "./_binary.ts";
import { blockReader, wholeBlock } from "./_blocks.ts";
import {
  BackingFileError,
  check,
  UnsupportedError,
} from "../streams/errors.ts";
import type { Driver, Image, OpenOptions, Source } from "../streams/types.ts";

const FORMAT = "seSparse";
const SECTOR = 512;
const CONST_MAGIC = 0xcafebaben;
const VOLATILE_MAGIC = 0xcafecafen;
const VERSION = 0x0000000200000001n;
const GRAIN_SECTORS = 8n;
const TABLE_SECTORS = 64n;
const GRAIN = 4096;
const TABLE_ENTRIES = 4096;
const TABLE_BYTES = TABLE_ENTRIES * 8;
/** QEMU's limit: just under 64 TiB. */
const MAX_CAPACITY = (64n << 40n) / 512n;
const TABLE_CACHE = 64;

const fail = formatErrors(FORMAT);

async function openSeSparse(
  source: Source,
  options: OpenOptions,
): Promise<Image> {
  if (options.writable) {
    throw new UnsupportedError(
      { format: FORMAT },
      "seSparse extents are read-only (as in QEMU)",
    );
  }
  check(source.size >= SECTOR, {
    format: FORMAT,
    field: "file size",
    value: source.size,
    limit: `at least ${SECTOR} bytes (the header)`,
    file: source.name,
  });
  const h = await source.read(0, SECTOR);
  const field = (at: number) => le64(h, at);
  if (field(0) !== CONST_MAGIC) {
    throw fail("magic", `0x${field(0).toString(16)}`, "0xcafebabe", 0);
  }
  const unsupported = (name: string, at: number, want: string) =>
    new UnsupportedError(
      {
        format: FORMAT,
        field: name,
        value: `0x${field(at).toString(16)}`,
        offset: at,
      },
      `${name} 0x${field(at).toString(16)} is not supported: only ${want}`,
    );
  if (field(8) !== VERSION) throw unsupported("version", 8, "0x200000001");
  if (field(24) !== GRAIN_SECTORS) throw unsupported("grain_size", 24, "8");
  if (field(32) !== TABLE_SECTORS) {
    throw unsupported("grain_table_size", 32, "64");
  }
  if (field(40) !== 0n) throw unsupported("flags", 40, "0");
  for (let at = 48; at < 80; at += 8) {
    if (field(at) !== 0n) throw unsupported("reserved", at, "0");
  }
  if (h.subarray(208).some((b) => b !== 0)) {
    throw new UnsupportedError(
      { format: FORMAT, field: "padding", offset: 208 },
      "non-zero padding after the constant header's fields is not supported",
    );
  }
  const capacity = field(16);
  if (capacity > MAX_CAPACITY) {
    throw fail("capacity", capacity, `at most ${MAX_CAPACITY} sectors`, 16);
  }
  const size = Number(capacity) * SECTOR;
  const fileSectors = BigInt(Math.floor(source.size / SECTOR));
  /** A region [offset, offset + size) in sectors, checked to lie in the file. */
  const region = (name: string, at: number, minBytes = 0) => {
    const offset = field(at);
    const length = field(at + 8);
    if (
      offset === 0n || offset + length > fileSectors ||
      length * BigInt(SECTOR) < BigInt(minBytes)
    ) {
      throw fail(
        name,
        `${length} sectors at sector ${offset}`,
        `at least ${minBytes} bytes within the file's ${source.size}`,
        at,
        source.name,
      );
    }
    return { offset: Number(offset) * SECTOR, bytes: Number(length) * SECTOR };
  };
  const volatile = region("volatile_header", 80, SECTOR);
  const v = await source.read(volatile.offset, SECTOR);
  if (le64(v, 0) !== VOLATILE_MAGIC) {
    throw fail(
      "volatile_header.magic",
      `0x${le64(v, 0).toString(16)}`,
      "0xcafecafe",
      volatile.offset,
    );
  }
  if (le64(v, 24) !== 0n) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "volatile_header.replay_journal",
        value: le64(v, 24),
        offset: volatile.offset + 24,
      },
      "the extent is dirty (its journal must be replayed), which is not supported (as in QEMU)",
    );
  }
  const tableCover = TABLE_ENTRIES * GRAIN;
  const directoryEntries = Math.ceil(size / tableCover);
  const directory = region("grain_dir", 128, directoryEntries * 8);
  const tables = region("grain_tables", 144);
  const grains = region("grains", 192);
  const dirBytes = await source.read(directory.offset, directoryEntries * 8);
  const tableAt = new Float64Array(directoryEntries);
  for (let i = 0; i < directoryEntries; i++) {
    const lo = le32(dirBytes, i * 8);
    const hi = le32(dirBytes, i * 8 + 4);
    if (lo === 0 && hi === 0) continue;
    const at = tables.offset + lo * TABLE_BYTES;
    if (hi !== 0x10000000 || at + TABLE_BYTES > tables.offset + tables.bytes) {
      throw fail(
        `grain_dir[${i}]`,
        `0x${hi.toString(16).padStart(8, "0")}${
          lo.toString(16).padStart(8, "0")
        }`,
        `0, or 0x10000000 above the index of a grain table within grain_tables (${
          tables.bytes / TABLE_BYTES
        } tables)`,
        directory.offset + i * 8,
        source.name,
      );
    }
    tableAt[i] = at;
  }
  const cache = new Map<number, Uint8Array>();
  async function table(index: number): Promise<Uint8Array> {
    const hit = cache.get(index);
    if (hit) return hit;
    const bytes = await source.read(tableAt[index], TABLE_BYTES);
    cache.set(index, bytes);
    if (cache.size > TABLE_CACHE) cache.delete(cache.keys().next().value!);
    return bytes;
  }
  const reader = blockReader({
    source,
    size,
    blockSize: GRAIN,
    async lookup(grain) {
      const length = Math.min(GRAIN, size - grain * GRAIN);
      const index = Math.floor(grain / TABLE_ENTRIES);
      if (tableAt[index] === 0) return wholeBlock(length, "unallocated");
      const t = await table(index);
      const slot = (grain % TABLE_ENTRIES) * 8;
      const lo = le32(t, slot);
      const hi = le32(t, slot + 4);
      const bad = (why: string) =>
        fail(
          `grain_table[${index}][${grain % TABLE_ENTRIES}]`,
          `0x${hi.toString(16).padStart(8, "0")}${
            lo.toString(16).padStart(8, "0")
          }`,
          why,
          tableAt[index] + slot,
          source.name,
        );
      switch (hi >>> 28) {
        case 0:
          if (lo !== 0 || hi !== 0) throw bad("0 for a grain not allocated");
          return wholeBlock(length, "unallocated");
        case 1: // unmapped
        case 2: // zero
          return wholeBlock(length, "zero");
        case 3: {
          // Bits 48-59 are the low 12 bits of the grain number, bits 0-47
          // the rest.
          const number = ((hi >>> 16) & 0xfff) +
            ((hi & 0xffff) * 2 ** 32 + lo) * 4096;
          const at = grains.offset + number * GRAIN;
          if (at + length > grains.offset + grains.bytes) {
            throw bad(
              `a grain within the grains region (${grains.bytes} bytes at ${grains.offset})`,
            );
          }
          return wholeBlock(length, "data", at);
        }
        default:
          throw bad("of type 0, 1, 2 or 3 (top 4 bits)");
      }
    },
    unallocated(offset, length) {
      throw new BackingFileError(
        `seSparse: bytes ${offset}..${
          offset + length
        } of this extent are not stored in it: they are its parent's, which the extent does not name; open the .vmdk descriptor that names this extent`,
        "",
      );
    },
  });
  return {
    format: FORMAT,
    size,
    name: source.name,
    encrypted: false,
    details: {
      capacitySectors: Number(capacity),
      grainSize: GRAIN,
      grainTables: tables.bytes / TABLE_BYTES,
      note:
        "a bare extent: grains it does not store are its parent's (named by the descriptor, not here)",
    },
    ...reader,
    close: () => source.close?.() ?? Promise.resolve(),
  };
}

/**
 * The seSparse driver: a bare ESXi seSparse extent (magic 0xCAFEBABE),
 * read-only, sized by its header's capacity.
 *
 * @example
 * ```ts
 * import { seSparse } from "../mod.ts";
 * const head = new Uint8Array(512);
 * new DataView(head.buffer).setUint32(0, 0xcafebabe, true);
 * console.log(seSparse.probe({ head, tail: head, size: 512 })); // 100
 * ```
 */
export const seSparse: Driver = {
  name: FORMAT,
  description: "VMware ESXi seSparse extent, opened bare (read-only)",
  probe: probeSeSparse,
  open: openSeSparse,
};
