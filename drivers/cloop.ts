/**
 * cloop: Knoppix compressed loop images, versions 2.0 and 4.0, read and
 * written.
 *
 * The header (all numbers big-endian), as QEMU's `block/cloop.c` and the
 * cloop 4.x kernel module's `cloop.h` describe it:
 *
 * | offset | size                 | field                                        |
 * | ------ | -------------------- | -------------------------------------------- |
 * | 0      | 128                  | preamble: a shell script, `#!/bin/sh\n#V2.0 Format\n...`; the signature `V2.0` or `V4.0` sits at byte 11 |
 * | 128    | 4                    | block_size: bytes per uncompressed block      |
 * | 132    | 4                    | n_blocks: number of blocks                    |
 * | 136    | 8 × (n_blocks + 1)   | offsets: where each compressed block starts; the last one is where the last block ends |
 *
 * Version 2 keeps the header first and every block is zlib (RFC 1950,
 * made by zlib or by 7-zip's deflate). Version 4 may keep the 136-byte
 * header first (then the pointer table, then the blocks) or last (blocks,
 * then the pointer table, then the header: a "streaming" layout), and each
 * 64-bit block pointer carries the block's compressor in its top 4 bits
 * (`CLOOP_BLOCK_FLAGS`) and its file offset in the low 60
 * (`CLOOP_BLOCK_OFFSET`): 0 zlib, 1 none (stored), 2 xz, 3 lz4, 4 lzo1x.
 * Offsets are from the start of the file in every layout. The disk is
 * n_blocks × block_size bytes; every block decodes to block_size bytes.
 *
 * This module is browser compatible.
 *
 * @module
 */

import {
  CLOOP_HEADER_SIZE as HEADER_SIZE,
  CLOOP_HEADROOM as HEADROOM,
  CLOOP_SIGNATURE_OFFSET as SIGNATURE_OFFSET,
  cloopSignature,
  probeCloop,
} from "./_signatures.ts";
import { checkWriteOptions, optionErrors } from "../streams/options.ts";
import {
  be32,
  be64,
  formatErrors,
  isZero,
  safeNumber,
  Scratch,
  setBe32,
  setBe64,
} from "./_binary.ts";
import * as zlib from "./codecs/zlib.ts";
import { codecPool } from "./codecs/_pool.ts";
import {
  CodecError,
  ImageFormatError,
  UnsupportedError,
} from "../streams/errors.ts";
import {
  checkRange,
  type Driver,
  type EncodeOptions,
  type Extent,
  type Image,
  readInto as readIntoSource,
  type Sink,
  type Source,
} from "../streams/types.ts";

const FORMAT = "cloop";
const optionFail = optionErrors(FORMAT);

/**
 * QEMU's `MAX_BLOCK_SIZE` (block/cloop.c): block_size above 64 MiB is
 * refused ("block_size %u must be 64 MB or less").
 */
const MAX_BLOCK_SIZE = 64 * 1024 * 1024;
/**
 * QEMU refuses n_blocks above (UINT32_MAX - 1) / sizeof(uint64_t) so that
 * (n_blocks + 1) × 8 cannot overflow 32 bits.
 */
const MAX_N_BLOCKS = Math.floor((0xffffffff - 1) / 8);
/**
 * QEMU refuses an offsets table above 512 MiB ("image requires too many
 * offsets, try increasing block size"): 16 TB at 256 KiB blocks.
 */
const MAX_OFFSETS_SIZE = 512 * 1024 * 1024;
/**
 * QEMU refuses a compressed block above 2 × MAX_BLOCK_SIZE ("invalid
 * compressed block size at index %u"), the size of its compressed buffer.
 */
const MAX_COMPRESSED_SIZE = 2 * MAX_BLOCK_SIZE;

/** The compressors of version 4 (`CLOOP_COMPRESSOR_*`), by flag value. */
const COMPRESSORS = ["zlib", "none", "xz", "lz4", "lzo"] as const;
/** One of {@linkcode COMPRESSORS}. */
type Compressor = typeof COMPRESSORS[number];
const NONE = 1;

/** The preamble create_compressed_fs writes (a script mounting the image). */
const preamble = (version: 2 | 4) =>
  `#!/bin/sh\n#V${version}.0 Format\n` +
  "modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\nexit $?\n";

/** Decoded blocks kept for reads that do not cover a block whole. */
const CACHE_BYTES = 4 << 20;
/**
 * Blocks decoded at once. The platform's inflater gains about a third from
 * a few decodes in flight (73 µs per 64 KiB block one at a time, 46 µs with
 * 4 or 16 in flight, on the 2-core bench machine); more only holds memory.
 */
const DECODERS = 6;
/** How many compressed blocks one file read fetches at most. */
const READ_BYTES = 8 << 20;
/**
 * Where the platform has no native inflater (browsers), images of at least
 * this many blocks inflate their zlib runs on the decode workers
 * (drivers/codecs/_pool.ts), a run per call: one thread's DecompressionStream
 * per 64 KiB block left a browser's conversion 5x slower than the CLI.
 */
const POOL_MIN_BLOCKS = 16;
/** The UDIF chunk types the decode workers know: zlib and raw. */
const WORKER_ZLIB = 0x80000005, WORKER_RAW = 1;

/**
 * The largest compressed block this driver accepts for a block_size: the
 * worst expansion of every cloop codec (stored deflate adds 5 bytes per
 * 64 KiB, lzo1x n/16 + 67, lz4 n/255 + 16, xz about 3 bytes per 64 KiB plus
 * 64 of headers) is far below n/8 + 64 KiB, and QEMU's 2 × MAX_BLOCK_SIZE
 * caps it.
 */
function compressedLimit(blockSize: number): number {
  return Math.min(
    MAX_COMPRESSED_SIZE,
    blockSize + Math.floor(blockSize / 8) + 65536,
  );
}

/** A codec module (see drivers/codecs/zlib.ts for the contract). */
interface Codec {
  decode(input: Uint8Array, expectedSize: number): Promise<Uint8Array>;
  encode(input: Uint8Array): Promise<Uint8Array>;
}

/**
 * The codec modules other than zlib, loaded on first use (only images that
 * use them pay for them). Literal specifiers, so that `deno bundle` puts
 * them in the browser bundle.
 */
const LOADERS: Record<string, () => Promise<Codec>> = {
  xz: () => import("./codecs/xz.ts"),
  lz4: () => import("./codecs/lz4.ts"),
  lzo: () => import("./codecs/lzo.ts"),
};

const codecs = new Map<Compressor, Promise<Codec>>();
/** Loads a codec module on first use (xz, lz4 and lzo are only loaded for images that use them). */
function codec(name: Compressor): Promise<Codec> {
  let found = codecs.get(name);
  if (!found) {
    const load = LOADERS[name];
    if (name === "zlib") {
      found = Promise.resolve(zlib);
    } else if (!load) {
      found = Promise.reject(
        new UnsupportedError(
          { format: FORMAT, field: "compressor", value: name },
          `the ${name} codec is not available`,
        ),
      );
    } else {
      found = load().catch((e) => {
        codecs.delete(name);
        throw new UnsupportedError(
          { format: FORMAT, field: "compressor", value: name },
          `the ${name} codec is not available (${(e as Error).message})`,
        );
      });
    }
    codecs.set(name, found);
  }
  return found;
}

/** What {@linkcode parseHeader} found. */
interface Header {
  version: 2 | 4;
  /** Where the 136-byte header is: first or last in the file. */
  placement: "first" | "last";
  blockSize: number;
  nBlocks: number;
  /** File offset of the offsets table. */
  tableOffset: number;
}

const fail = formatErrors(FORMAT);

/** Validates block_size and n_blocks at `at`, as QEMU's cloop_open does. */
function checkSizes(
  bytes: Uint8Array,
  at: number,
  base: number,
  fileSize: number,
  file?: string,
): { blockSize: number; nBlocks: number } {
  const blockSize = be32(bytes, at + HEADROOM);
  const bsAt = base + HEADROOM;
  if (blockSize === 0) throw fail("block_size", 0, "non-zero", bsAt, file);
  if (blockSize % 512) {
    throw fail("block_size", blockSize, "a multiple of 512", bsAt, file);
  }
  if (blockSize > MAX_BLOCK_SIZE) {
    throw fail(
      "block_size",
      blockSize,
      "64 MiB (67108864) or less",
      bsAt,
      file,
    );
  }
  const nBlocks = be32(bytes, at + HEADROOM + 4);
  const nAt = bsAt + 4;
  if (nBlocks > MAX_N_BLOCKS) {
    throw fail(
      "n_blocks",
      nBlocks,
      `${MAX_N_BLOCKS} or less (the offsets table size would overflow)`,
      nAt,
      file,
    );
  }
  const tableSize = (nBlocks + 1) * 8;
  if (tableSize > MAX_OFFSETS_SIZE) {
    throw fail(
      "n_blocks",
      nBlocks,
      `${
        MAX_OFFSETS_SIZE / 8 - 1
      } or less (QEMU's 512 MiB offsets table limit; ` +
        "the image requires too many offsets, try a larger block size)",
      nAt,
      file,
    );
  }
  if (HEADER_SIZE + tableSize > fileSize) {
    throw fail(
      "n_blocks",
      nBlocks,
      `at most ${
        Math.max(0, Math.floor((fileSize - HEADER_SIZE) / 8) - 1)
      } (its ${tableSize}-byte offsets table does not fit in the file's ${fileSize} bytes)`,
      nAt,
      file,
    );
  }
  return { blockSize, nBlocks };
}

/** Finds the header (first, else last) and validates its fields. */
async function parseHeader(source: Source): Promise<Header> {
  const size = source.size;
  if (size < HEADER_SIZE) {
    throw fail(
      "file size",
      size,
      `at least ${HEADER_SIZE} bytes (the header)`,
      0,
      source.name,
    );
  }
  const head = await source.read(0, HEADER_SIZE);
  const first = cloopSignature(head, 0);
  if (first) {
    const { blockSize, nBlocks } = checkSizes(head, 0, 0, size, source.name);
    return {
      version: first,
      placement: "first",
      blockSize,
      nBlocks,
      tableOffset: HEADER_SIZE,
    };
  }
  const base = size - HEADER_SIZE;
  const tail = await source.read(base, HEADER_SIZE);
  const last = cloopSignature(tail, 0);
  if (!last) {
    throw fail(
      "signature",
      head.subarray(SIGNATURE_OFFSET, SIGNATURE_OFFSET + 4),
      `"V2.0" or "V4.0" at byte ${SIGNATURE_OFFSET} of the first or last ${HEADER_SIZE} bytes`,
      SIGNATURE_OFFSET,
      source.name,
    );
  }
  const { blockSize, nBlocks } = checkSizes(tail, 0, base, size, source.name);
  return {
    version: last,
    placement: "last",
    blockSize,
    nBlocks,
    tableOffset: base - (nBlocks + 1) * 8,
  };
}

/** The offsets table, decoded and checked entry by entry. */
interface Table {
  /** File offset where block i starts; entry n_blocks is where the last ends. */
  offsets: Float64Array;
  /** Compressor index per block (version 4); all zlib for version 2. */
  kinds: Uint8Array;
}

/** Reads the table in 1 MiB pieces, checking every entry as QEMU does. */
async function readTable(source: Source, header: Header): Promise<Table> {
  const { nBlocks, tableOffset, blockSize, version } = header;
  const count = nBlocks + 1;
  const offsets = new Float64Array(count);
  const kinds = new Uint8Array(nBlocks);
  const limit = compressedLimit(blockSize);
  const dataEnd = header.placement === "first" ? source.size : tableOffset;
  const piece = 1 << 17; // entries per read (1 MiB)
  for (let start = 0; start < count; start += piece) {
    const n = Math.min(piece, count - start);
    const bytes = await source.read(tableOffset + start * 8, n * 8);
    for (let j = 0; j < n; j++) {
      const i = start + j;
      const at = tableOffset + i * 8;
      let pointer = be64(bytes, j * 8);
      if (version === 4) {
        // CLOOP_BLOCK_FLAGS: the top 4 bits; CLOOP_BLOCK_OFFSET: the rest.
        const flags = Number(pointer >> 60n);
        pointer &= 0x0fffffffffffffffn;
        if (i < nBlocks) {
          if (flags >= COMPRESSORS.length) {
            throw fail(
              `block_ptrs[${i}].flags`,
              flags,
              "a compressor from 0 to 4 (zlib, none, xz, lz4, lzo)",
              at,
              source.name,
            );
          }
          kinds[i] = flags;
        }
      }
      const offset = safeNumber(pointer, FORMAT, `offsets[${i}]`, at);
      offsets[i] = offset;
      if (i === 0) continue;
      const previous = offsets[i - 1];
      if (offset < previous) {
        throw fail(
          `offsets[${i}]`,
          offset,
          `at least offsets[${i - 1}] (${previous}): offsets must not decrease`,
          at,
          source.name,
        );
      }
      if (offset - previous > limit) {
        throw fail(
          `offsets[${i}]`,
          offset,
          `within ${limit} bytes of offsets[${i - 1}] (${previous}): ` +
            `block ${i - 1} would be ${offset - previous} bytes compressed, ` +
            `more than block_size ${blockSize} can need`,
          at,
          source.name,
        );
      }
    }
  }
  if (offsets[nBlocks] > dataEnd) {
    throw fail(
      `offsets[${nBlocks}]`,
      offsets[nBlocks],
      `at most ${dataEnd} (the end of the block data)`,
      tableOffset + nBlocks * 8,
      source.name,
    );
  }
  return { offsets, kinds };
}

/** A small LRU of decoded blocks, holding promises so concurrent reads share one decode. */
class BlockCache {
  #entries = new Map<number, Promise<Uint8Array>>();
  constructor(readonly capacity: number) {}
  has(block: number): boolean {
    return this.#entries.has(block);
  }
  get(block: number): Promise<Uint8Array> | undefined {
    const hit = this.#entries.get(block);
    if (hit) {
      this.#entries.delete(block);
      this.#entries.set(block, hit);
    }
    return hit;
  }
  set(block: number, value: Promise<Uint8Array>) {
    this.#entries.set(block, value);
    // A failed decode is not kept: the next read tries again and reports again.
    value.catch(() => this.#entries.delete(block));
    while (this.#entries.size > this.capacity) {
      this.#entries.delete(this.#entries.keys().next().value!);
    }
  }
}

function cloopImage(source: Source, header: Header, table: Table): Image {
  const { blockSize, nBlocks } = header;
  const { offsets, kinds } = table;
  const size = nBlocks * blockSize;
  const cache = new BlockCache(
    Math.max(4, Math.floor(CACHE_BYTES / blockSize)),
  );
  const packedScratch = new Scratch((n) => new Uint8Array(n));
  const usePool = nBlocks >= POOL_MIN_BLOCKS && !zlib.hasNativeInflate() &&
    codecPool.usable;
  // The workers stay alive from open to close (see _pool.ts).
  const letGo = usePool ? codecPool.hold() : () => {};

  /**
   * Decodes blocks first..end-1 (zlib or stored; packed in `packed`, which
   * starts at file offset `start`) on the decode workers into `into`
   * (disk offset `offset`); false when the workers did not (the caller
   * decodes them, which also names a bad block).
   */
  async function decodeRunPooled(
    first: number,
    end: number,
    packed: Uint8Array,
    start: number,
    offset: number,
    into: Uint8Array,
  ): Promise<boolean> {
    const jobs: number[] = [];
    for (let b = first; b < end; b++) {
      const name = COMPRESSORS[kinds[b]];
      if (name !== "zlib" && kinds[b] !== NONE) return false;
      jobs.push(
        kinds[b] === NONE ? WORKER_RAW : WORKER_ZLIB,
        offsets[b] - start,
        offsets[b + 1] - offsets[b],
        blockSize,
        b * blockSize - offset,
      );
    }
    // On every worker, each block straight into one moved buffer
    // (CodecPool.spread). One batch of the whole run on one worker, its
    // blocks answered as an array each, left the other worker idle and
    // cost the module worker a copy per block: 2.0-2.7 times the CLI's
    // time in chromium (the bench's 256 MiB disk, 64 KiB blocks).
    return await codecPool.spread(packed, jobs, into, false) !== null;
  }

  let decoding = 0;
  const waiting: (() => void)[] = [];

  /**
   * What a failed decode of block `i` throws: a CodecError becomes an
   * ImageFormatError naming the block; anything else stays as it is.
   */
  function blockError(
    e: unknown,
    i: number,
    packed: Uint8Array,
    codecName: string,
  ): unknown {
    if (!(e instanceof CodecError)) return e;
    return new ImageFormatError(
      {
        format: FORMAT,
        field: `block ${i}`,
        offset: offsets[i],
        file: source.name,
      },
      `block ${i} (${packed.length} bytes of ${codecName} at byte ${
        offsets[i]
      }) does not decode to ${blockSize} bytes: ${e.message}`,
    );
  }

  async function decodeBlock(i: number, packed: Uint8Array) {
    const kind = kinds[i];
    if (kind === NONE) {
      if (packed.length !== blockSize) {
        throw fail(
          `block ${i} length`,
          packed.length,
          `${blockSize} (block_size) for an uncompressed block`,
          offsets[i],
          source.name,
        );
      }
      // A copy: the view would keep the whole multi-block read alive in the cache.
      return packed.slice();
    }
    const name = COMPRESSORS[kind];
    const decoder = await codec(name);
    // At most DECODERS blocks decode at once: more gains no speed and
    // every live decoder holds its own buffers.
    while (decoding >= DECODERS) {
      await new Promise<void>((resolve) => waiting.push(resolve));
    }
    decoding++;
    try {
      return await decoder.decode(packed, blockSize);
    } catch (e) {
      throw blockError(e, i, packed, name);
    } finally {
      decoding--;
      waiting.shift()?.();
    }
  }

  /**
   * Decodes block `i` from `packed` straight into `into` (exactly one
   * block): zlib and stored blocks without an array of their own, other
   * codecs through `decodeBlock`.
   */
  async function decodeBlockInto(
    i: number,
    packed: Uint8Array,
    into: Uint8Array,
  ) {
    if (kinds[i] === NONE) {
      if (packed.length !== blockSize) await decodeBlock(i, packed); // throws
      into.set(packed);
    } else if (COMPRESSORS[kinds[i]] === "zlib") {
      try {
        await zlib.decodeInto(packed, into);
      } catch (e) {
        throw blockError(e, i, packed, "zlib");
      }
    } else {
      into.set(await decodeBlock(i, packed));
    }
  }

  /** Starts decoding blocks first..last that are not cached, one file read per run. */
  function load(first: number, last: number): Promise<Uint8Array>[] {
    const out: Promise<Uint8Array>[] = [];
    for (let i = first; i <= last;) {
      const hit = cache.get(i);
      if (hit) {
        out.push(hit);
        i++;
        continue;
      }
      // A run of uncached blocks whose compressed bytes are contiguous.
      let end = i + 1;
      while (
        end <= last && !cache.get(end) &&
        offsets[end + 1] - offsets[i] <= READ_BYTES
      ) end++;
      const start = offsets[i];
      const bytes = source.read(start, offsets[end] - start);
      for (let b = i; b < end; b++) {
        const decoded = bytes.then((all) =>
          decodeBlock(
            b,
            all.subarray(offsets[b] - start, offsets[b + 1] - start),
          )
        );
        cache.set(b, decoded);
        out.push(decoded);
      }
      i = end;
    }
    return out;
  }

  // `read` comes here too. Whole blocks not in the cache decode straight
  // into `into`, one file read per run of them, one block after another,
  // bypassing the cache (convert and streams read each block once);
  // partial and cached blocks go through `load` and the cache.
  async function readInto(offset: number, into: Uint8Array) {
    const length = into.length;
    checkRange(size, offset, length);
    if (length === 0) return;
    const first = Math.floor(offset / blockSize);
    const last = Math.floor((offset + length - 1) / blockSize);
    const direct = (i: number) =>
      i * blockSize >= offset &&
      (i + 1) * blockSize <= offset + length && !cache.has(i);
    const pending: Promise<void>[] = [];
    for (let i = first; i <= last;) {
      const blockStart = i * blockSize;
      if (!direct(i)) {
        const from = Math.max(offset, blockStart);
        const to = Math.min(offset + length, blockStart + blockSize);
        pending.push(
          load(i, i)[0].then((block) =>
            into.set(
              block.subarray(from - blockStart, to - blockStart),
              from - offset,
            )
          ),
        );
        i++;
        continue;
      }
      let end = i + 1;
      while (
        end <= last && direct(end) &&
        offsets[end + 1] - offsets[i] <= READ_BYTES
      ) end++;
      const start = offsets[i];
      const runFirst = i;
      const runEnd = end;
      pending.push((async () => {
        // The packed bytes go to a reused buffer: a fresh one per read
        // (up to 8 MiB) kept peak RSS 30 MiB higher until V8 collected them.
        const packed = packedScratch.take(offsets[runEnd] - start);
        try {
          await readIntoSource(source, start, packed);
          if (
            usePool && runEnd - runFirst > 1 &&
            await decodeRunPooled(runFirst, runEnd, packed, start, offset, into)
          ) return;
          for (let b = runFirst; b < runEnd; b++) {
            const at = b * blockSize - offset;
            await decodeBlockInto(
              b,
              packed.subarray(offsets[b] - start, offsets[b + 1] - start),
              into.subarray(at, at + blockSize),
            );
          }
        } finally {
          packedScratch.give(packed);
        }
      })());
      i = end;
    }
    await Promise.all(pending);
  }

  const counts: Record<string, number> = {};
  for (let i = 0; i < nBlocks; i++) {
    const name = header.version === 2 ? "zlib" : COMPRESSORS[kinds[i]];
    counts[name] = (counts[name] ?? 0) + 1;
  }

  return {
    format: FORMAT,
    size,
    name: source.name,
    encrypted: false,
    details: {
      version: header.version,
      header: header.placement,
      block_size: blockSize,
      n_blocks: nBlocks,
      codecs: counts,
    },
    async read(offset, length) {
      const out = new Uint8Array(length);
      await readInto(offset, out);
      return out;
    },
    readInto,
    // Every block stores bytes; zero blocks are found by convert's sparse
    // check after decoding.
    async *extents(offset, length): AsyncIterable<Extent> {
      checkRange(size, offset, length);
      if (length > 0) yield { offset, length, kind: "data" };
    },
    close() {
      letGo();
      return source.close?.() ?? Promise.resolve();
    },
  };
}

/** Encoder settings from `-o key=value`. */
interface WriteOptions {
  blockSize: number;
  version: 2 | 4;
  compressor: Compressor;
  placement: "first" | "last";
}

function writeOptions(options: Record<string, string> = {}): WriteOptions {
  checkWriteOptions(cloop, options);
  const blockSize = Number(options.block_size ?? 65536);
  if (
    !Number.isSafeInteger(blockSize) || blockSize <= 0 || blockSize % 512 ||
    blockSize > MAX_BLOCK_SIZE
  ) {
    throw optionFail(
      "block_size",
      options.block_size,
      "a non-zero multiple of 512, 64 MiB or less",
    );
  }
  const version = Number(options.version ?? 2);
  if (version !== 2 && version !== 4) {
    throw optionFail("version", options.version, "2 or 4");
  }
  const compressor = (options.compression ?? "zlib") as Compressor;
  if (!COMPRESSORS.includes(compressor)) {
    throw optionFail(
      "compression",
      options.compression,
      COMPRESSORS.join(", "),
    );
  }
  if (version === 2 && compressor !== "zlib") {
    throw optionFail(
      "compression",
      compressor,
      "zlib for version 2 (use version=4)",
    );
  }
  const placement = (options.header ?? "first") as "first" | "last";
  if (placement !== "first" && placement !== "last") {
    throw optionFail("header", options.header, "first or last");
  }
  return { blockSize, version: version as 2 | 4, compressor, placement };
}

/** One compressed block: its compressor index and bytes. */
interface Packed {
  kind: number;
  bytes: Uint8Array;
}

/**
 * The blocks of `source` compressed, in order, with a few compressions in
 * flight; the last block is padded with zeros to block_size, as
 * create_compressed_fs does.
 */
async function* packBlocks(
  source: Source,
  settings: WriteOptions,
  options: EncodeOptions,
): AsyncIterable<Packed> {
  const { blockSize, compressor, version } = settings;
  const nBlocks = Math.ceil(source.size / blockSize);
  const perRead = Math.max(1, Math.floor((1 << 20) / blockSize));
  const inFlight = Math.max(8, perRead * 2);
  const wanted = compressor === "none" ? undefined : await codec(compressor);
  let zeroBlock: Promise<Packed> | undefined;
  const pack = (block: Uint8Array): Promise<Packed> => {
    if (!wanted) return Promise.resolve({ kind: NONE, bytes: block });
    return wanted.encode(block).then((bytes) => {
      if (bytes.length < blockSize) {
        return { kind: COMPRESSORS.indexOf(compressor), bytes };
      }
      // A block that does not shrink: version 4 stores it as it is; version
      // 2 has only zlib, so it gets zlib's stored form, which stays within
      // extract_compressed_fs's buffer of block_size + block_size/1000 + 16
      // (the platform's deflater can overshoot that by a few bytes).
      return version === 4
        ? { kind: NONE, bytes: block }
        : { kind: COMPRESSORS.indexOf("zlib"), bytes: storedZlib(block) };
    });
  };
  const queue: Promise<Packed>[] = [];
  let done = 0;
  for (let first = 0; first < nBlocks; first += perRead) {
    options.signal?.throwIfAborted();
    const count = Math.min(perRead, nBlocks - first);
    const start = first * blockSize;
    const available = Math.min(count * blockSize, source.size - start);
    let chunk = await source.read(start, available);
    if (available < count * blockSize) {
      const padded = new Uint8Array(count * blockSize);
      padded.set(chunk);
      chunk = padded;
    }
    for (let k = 0; k < count; k++) {
      const block = chunk.subarray(k * blockSize, (k + 1) * blockSize);
      if (isZero(block)) {
        // Zero blocks compress alike: do it once.
        zeroBlock ??= pack(new Uint8Array(blockSize));
        queue.push(zeroBlock);
      } else {
        const p = pack(block);
        p.catch(() => {}); // observed in order below
        queue.push(p);
      }
      while (queue.length > inFlight) {
        yield await queue.shift()!;
        done = Math.min(source.size, done + blockSize);
        options.onProgress?.(done);
      }
    }
  }
  while (queue.length) {
    yield await queue.shift()!;
    done = Math.min(source.size, done + blockSize);
    options.onProgress?.(done);
  }
}

/**
 * `bytes` as a zlib stream (RFC 1950) of stored deflate blocks (RFC 1951
 * section 3.2.4): 2 header bytes, 5 per 65535 bytes, and the Adler-32.
 */
function storedZlib(bytes: Uint8Array): Uint8Array {
  const pieces = Math.max(1, Math.ceil(bytes.length / 65535));
  const out = new Uint8Array(2 + pieces * 5 + bytes.length + 4);
  out[0] = 0x78; // deflate, 32 KiB window
  out[1] = 0x01; // no dictionary, fastest level; (0x7801 % 31) === 0
  let at = 2;
  for (let k = 0; k < pieces; k++) {
    const chunk = bytes.subarray(k * 65535, (k + 1) * 65535);
    out[at] = k === pieces - 1 ? 1 : 0; // BFINAL, BTYPE 00
    out[at + 1] = chunk.length & 0xff;
    out[at + 2] = chunk.length >>> 8;
    out[at + 3] = ~chunk.length & 0xff;
    out[at + 4] = (~chunk.length >>> 8) & 0xff;
    out.set(chunk, at + 5);
    at += 5 + chunk.length;
  }
  let a = 1;
  let b = 0;
  for (let i = 0; i < bytes.length;) {
    // 5552 bytes keep the sums below 2^32 before the modulo (zlib's NMAX).
    const end = Math.min(bytes.length, i + 5552);
    for (; i < end; i++) {
      a += bytes[i];
      b += a;
    }
    a %= 65521;
    b %= 65521;
  }
  setBe32(out, at, ((b << 16) | a) >>> 0);
  return out;
}

/** The 136-byte header. */
function headerBytes(settings: WriteOptions, nBlocks: number): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE);
  out.set(new TextEncoder().encode(preamble(settings.version)));
  setBe32(out, HEADROOM, settings.blockSize);
  setBe32(out, HEADROOM + 4, nBlocks);
  return out;
}

/** The pointer table from block starts (and the end of the last block). */
function tableBytes(starts: number[], kinds: number[]): Uint8Array {
  const out = new Uint8Array(starts.length * 8);
  for (let i = 0; i < starts.length; i++) {
    const flags = BigInt(kinds[i] ?? 0) << 60n;
    setBe64(out, i * 8, BigInt(starts[i]) | flags);
  }
  return out;
}

/** Writes `source` as a cloop image (see {@linkcode cloop}). */
async function encode(
  source: Source,
  sink: Sink,
  options: EncodeOptions,
): Promise<void> {
  const settings = writeOptions(options.options);
  const { blockSize, version } = settings;
  const nBlocks = Math.ceil(source.size / blockSize);
  if ((nBlocks + 1) * 8 > MAX_OFFSETS_SIZE) {
    throw fail(
      "n_blocks",
      nBlocks,
      `${MAX_OFFSETS_SIZE / 8 - 1} or less: use a larger block_size`,
    );
  }
  const tableSize = (nBlocks + 1) * 8;
  const starts: number[] = [];
  const kinds: number[] = [];
  const header = headerBytes(settings, nBlocks);

  if (version === 4 && settings.placement === "last") {
    // Streaming layout: blocks from byte 0, then the table, then the header.
    let at = 0;
    for await (const block of packBlocks(source, settings, options)) {
      starts.push(at);
      kinds.push(block.kind);
      await sink.write(at, block.bytes);
      at += block.bytes.length;
    }
    starts.push(at);
    await sink.write(at, tableBytes(starts, kinds));
    await sink.write(at + tableSize, header);
    return;
  }

  const dataStart = HEADER_SIZE + tableSize;
  if (!sink.sequential) {
    // Blocks first, after room for the table; then the header and table.
    let at = dataStart;
    for await (const block of packBlocks(source, settings, options)) {
      starts.push(at);
      kinds.push(block.kind);
      await sink.write(at, block.bytes);
      at += block.bytes.length;
    }
    starts.push(at);
    await sink.write(0, header);
    await sink.write(HEADER_SIZE, tableBytes(starts, kinds));
    return;
  }

  // A stream cannot go back for the table: compress once to learn the
  // sizes, write the table, then compress again (compression is
  // deterministic) and write the blocks. Memory stays bounded; time doubles.
  let at = dataStart;
  for await (
    const block of packBlocks(source, settings, { signal: options.signal })
  ) {
    starts.push(at);
    kinds.push(block.kind);
    at += block.bytes.length;
  }
  starts.push(at);
  await sink.write(0, header);
  await sink.write(HEADER_SIZE, tableBytes(starts, kinds));
  let i = 0;
  for await (const block of packBlocks(source, settings, options)) {
    if (starts[i] + block.bytes.length !== starts[i + 1]) {
      throw new Error(
        `cloop: block ${i} compressed to a different size on the second pass`,
      );
    }
    await sink.write(starts[i], block.bytes);
    i++;
  }
}

/**
 * The cloop driver: opens version 2.0 and 4.0 images (header first or last;
 * zlib, 7-zip deflate, and in version 4 also stored, xz, lz4 and lzo
 * blocks) and writes them with `convert -O cloop`. Options (`-o`):
 * `block_size` (default 65536, a multiple of 512), `version` (2, the
 * default, or 4), `compression` (version 4: zlib, none, xz, lz4, lzo) and
 * `header` (version 4: first or last).
 *
 * @example
 * ```ts
 * import { cloop, fromBytes, memorySink } from "../mod.ts";
 * const disk = new Uint8Array(131072).fill(7, 0, 1000);
 * const sink = memorySink();
 * await cloop.encode!(fromBytes(disk), sink, {});
 * const image = await cloop.open(fromBytes(sink.bytes()), {});
 * console.log(image.size, (await image.read(999, 2)).join(",")); // 131072 7,0
 * ```
 */
export const cloop: Driver = {
  name: FORMAT,
  writeOptions: [
    {
      name: "block_size",
      help: "bytes per compressed block",
      accepts: "a multiple of 512, 64 MiB or less",
      default: "65536",
    },
    {
      name: "version",
      help: "cloop version written",
      values: ["2", "4"],
      default: "2",
    },
    {
      name: "compression",
      help: "block codec (version 4 for all but zlib)",
      values: ["zlib", "none", "xz", "lz4", "lzo"],
      default: "zlib",
    },
    {
      name: "header",
      help: "where the version 4 header goes",
      values: ["first", "last"],
      default: "first",
    },
  ],
  compresses: true,
  description: "cloop compressed loop image (Knoppix), versions 2.0 and 4.0",
  // The signature alone: a cloop whose header is broken (block_size 0 or
  // 513) is a cloop, and `open` names the field.
  probe: probeCloop,
  async open(source: Source): Promise<Image> {
    const header = await parseHeader(source);
    const table = await readTable(source, header);
    return cloopImage(source, header, table);
  },
  encode,
};
