/**
 * Compressed files as wrappers: a `.gz` (any number of members), `.xz`
 * (streams and blocks), `.bz2` (streams) or `.zst` (frames, skippable
 * frames) file is not a disk but a disk image packed once more. It is
 * opened as the bytes it decodes to, and those are probed and opened like
 * any file: `disk.img.xz` opens as the raw disk, `image.qcow.xz` as the
 * qcow's disk. Two ways to read them at random:
 *
 * - **index**: where the container lists parts that decode alone (the xz
 *   blocks its indexes list, zstd frames that declare their size), each
 *   at most {@linkcode MAX_SEGMENT}, a read decodes the parts it touches
 *   (xz blocks on the codec workers, a few ahead of a forward reader). A
 *   corrupt part is found when it is read.
 * - **scratch**: otherwise the file is decoded once, front to back with
 *   bounded memory, into a scratch store (a temporary file in Deno
 *   through `OpenOptions.scratch`, memory up to
 *   {@linkcode MEMORY_SCRATCH_LIMIT} elsewhere); zero runs of 64 KiB are
 *   never stored and are `zero` in the allocation map, so `convert`
 *   leaves them as holes. Every checksum is verified before the image
 *   inside is opened.
 *
 * Either way a truncated or corrupt file is an {@linkcode ImageFormatError}
 * naming the container.
 *
 * | container | recognised by (at byte 0)                                   |
 * | --------- | ----------------------------------------------------------- |
 * | gzip      | 1F 8B 08 (deflate)                                          |
 * | xz        | FD 37 7A 58 5A 00                                           |
 * | bzip2     | `BZh1`..`BZh9` then a block (31 41 59 26 53 59) or end (17 72 45 38 50 90) magic |
 * | zstd      | 28 B5 2F FD, or a skippable frame 50..5F 2A 4D 18           |
 *
 * The registry asks for this only when no driver claims the file: a dmg
 * whose chunks start with bzip2 or xz magic is a dmg (its `koly` trailer
 * says so).
 *
 * This module is browser compatible.
 *
 * @module
 */

import { detectCompression, type FileCompression } from "../drivers/_magic.ts";
import { isZeroRange, Scratch, wordsOf } from "../drivers/_binary.ts";
import { writeSparse } from "./_sparse.ts";
import { ByteFeed } from "../drivers/codecs/_feed.ts";
import { nodeZlibModule } from "../drivers/codecs/_node_zlib.ts";
import * as bzip2 from "../drivers/codecs/bzip2.ts";
import * as xz from "../drivers/codecs/xz.ts";
import * as zstd from "../drivers/codecs/zstd.ts";
import {
  codecPool,
  XZ_CHUNK,
  ZSTD_FRAME_CHUNK,
} from "../drivers/codecs/_pool.ts";
import { CodecError, ImageFormatError, UnsupportedError } from "./errors.ts";
import {
  checkRange,
  type Extent,
  type Image,
  type OpenOptions,
  PROBE_BYTES,
  readInto,
  type ScratchFile,
  type Sink,
  type Source,
  type UnpackTarget,
} from "./types.ts";

// The containers' magics live with the probes' (the registry checks them
// without loading the decoders).
export { detectCompression, type FileCompression };

/** The most decoded data bytes a memory scratch store holds. */
export const MEMORY_SCRATCH_LIMIT = 512 * 2 ** 20;

/** Zero runs are found (and left unstored) at this granularity. */
const GRANULE = 1 << 16;

/**
 * The largest xz block or zstd frame decoded whole on its own (the
 * container's own index path); files with larger ones are decoded front
 * to back into scratch.
 */
export const MAX_SEGMENT = 64 << 20;

/** Compressed bytes read from the source at a time. */
const READ_SIZE = 1 << 20;

/**
 * Pulls `source` front to back, `READ_SIZE` bytes at a time, telling
 * `onProgress` how far it has got.
 */
function puller(
  source: Source,
  onProgress?: (done: number, total: number) => void,
): () => Promise<Uint8Array | null> {
  let offset = 0;
  return async () => {
    if (offset >= source.size) return null;
    const length = Math.min(READ_SIZE, source.size - offset);
    const bytes = await source.read(offset, length);
    offset += length;
    onProgress?.(offset, source.size);
    return bytes;
  };
}

/**
 * The decoded bytes of a compressed `source`, front to back in one pass,
 * in pieces (each only valid until the next is asked for). Memory stays
 * bounded by the container's window (xz's dictionary, zstd's window, a
 * bzip2 block, zlib's 32 KiB), never by the file's size. Errors are
 * {@linkcode CodecError}s.
 *
 * @param source the compressed file
 * @param compression its container
 * @param onProgress told the compressed bytes read so far, and their total
 * @returns the decoded bytes
 *
 * @example
 * ```ts
 * import { decompress } from "./compressed.ts";
 * import { fromBytes } from "./sources.ts";
 * const gz = new Uint8Array(
 *   await new Response(
 *     new Blob([new Uint8Array(1000)]).stream()
 *       .pipeThrough(new CompressionStream("gzip")),
 *   ).arrayBuffer(),
 * );
 * let total = 0;
 * for await (const piece of decompress(fromBytes(gz), "gzip")) total += piece.length;
 * console.log(total); // 1000
 * ```
 */
export function decompress(
  source: Source,
  compression: FileCompression,
  onProgress?: (done: number, total: number) => void,
): AsyncGenerator<Uint8Array> {
  const feed = new ByteFeed(puller(source, onProgress));
  switch (compression) {
    case "xz":
      return xz.decodeStreaming(feed);
    case "bzip2":
      return bzip2.decodeStreaming(feed);
    case "zstd":
      return zstd.decodeStreaming(feed);
    case "gzip":
      return gunzip(source, onProgress);
  }
}

/** The part of node:zlib's streaming gunzip used here. */
interface NodeGunzip {
  on(event: "data", listener: (chunk: Uint8Array) => void): void;
  on(event: "error", listener: (error: Error) => void): void;
  on(event: "end", listener: () => void): void;
  write(chunk: Uint8Array, callback: (error?: Error | null) => void): void;
  end(): void;
}

/**
 * gzip, every member: node:zlib's streaming gunzip where the runtime has
 * it (it reads concatenated members and checks each CRC-32 and length),
 * else the platform's `DecompressionStream("gzip")`.
 */
async function* gunzip(
  source: Source,
  onProgress?: (done: number, total: number) => void,
): AsyncGenerator<Uint8Array> {
  const zlib = nodeZlibModule() as
    | { createGunzip?: (options: { chunkSize: number }) => NodeGunzip }
    | undefined;
  const pull = puller(source, onProgress);
  if (!zlib?.createGunzip) {
    const input = new ReadableStream<BufferSource>({
      async pull(controller) {
        const piece = await pull();
        if (piece === null) controller.close();
        else controller.enqueue(piece as Uint8Array<ArrayBuffer>);
      },
    });
    try {
      for await (
        const piece of input.pipeThrough(new DecompressionStream("gzip"))
      ) yield piece as Uint8Array;
    } catch (e) {
      // Browsers' (and Deno's) DecompressionStream reads one member and
      // fails on whatever follows it.
      throw new CodecError(
        "gzip",
        `${
          e instanceof Error ? e.message : String(e)
        } (this runtime's DecompressionStream reads a single gzip member: a file of several members, or with bytes after its member, needs node:zlib)`,
      );
    }
    return;
  }
  const g = zlib.createGunzip({ chunkSize: 1 << 20 });
  const out: Uint8Array[] = [];
  let failure: Error | undefined;
  let ended = false;
  let wake: (() => void) | undefined;
  g.on("data", (chunk) => out.push(chunk));
  g.on("error", (e) => {
    failure = e;
    wake?.();
  });
  g.on("end", () => {
    ended = true;
    wake?.();
  });
  const fail = (e: unknown): never => {
    throw new CodecError("gzip", e instanceof Error ? e.message : String(e));
  };
  for (;;) {
    const piece = await pull();
    if (piece === null) break;
    // 32 KiB at a time: what one write inflates to waits in `out` (deflate
    // expands at most 1032 times, so at most ~32 MiB). 64 KiB peaked at
    // 250-293 MiB converting the bench's 1 GiB disk from a .gz (its zero
    // quarter inflates a thousandfold), 32 KiB at 170-180 MiB (load 8-10).
    for (let at = 0; at < piece.length; at += 1 << 15) {
      await new Promise<void>((resolve) => {
        g.write(piece.subarray(at, at + (1 << 15)), (e) => {
          if (e) failure ??= e;
          resolve();
        });
      });
      if (failure) fail(failure);
      while (out.length) yield out.shift()!;
    }
  }
  const done = new Promise<void>((resolve) => {
    wake = resolve;
    if (ended || failure) resolve();
  });
  g.end();
  await done;
  if (failure) fail(failure);
  while (out.length) yield out.shift()!;
}

/**
 * A codec's error as the container's: an {@linkcode ImageFormatError}
 * whose format is the container and whose message names the file.
 */
function containerError(
  e: unknown,
  compression: FileCompression,
  source: Source,
): unknown {
  if (!(e instanceof CodecError)) return e;
  const what = e.message.startsWith(`${e.codec}: `)
    ? e.message.slice(e.codec.length + 2)
    : e.message;
  return new ImageFormatError(
    {
      format: compression,
      field: "compressed data",
      value: what,
      limit: `a complete, valid ${compression} file`,
      file: source.name,
    },
    `${source.name ? `${source.name}: ` : ""}${compression}: ${what}`,
  );
}

/** A part of a compressed file that decodes alone. */
interface Segment {
  packedOffset: number;
  packedLength: number;
  /** Where its bytes go in the decoded file. */
  offset: number;
  size: number;
  /** Bytes that go before and after its packed bytes to make it decodable alone (an xz block's stream framing). */
  head?: Uint8Array;
  tail?: Uint8Array;
}

/** How the segments of one container decode. */
interface SegmentCodec {
  /** The pool's chunk type for them (see `CodecPool.batchInto`). */
  chunkType: number;
  /** The worker's name for their codec (see `CodecPool.run`). */
  poolName: string;
  /** Decodes `packed` (framed) into `out`, filling it exactly, on this thread. */
  decodeInto(packed: Uint8Array, out: Uint8Array): Promise<void>;
  /**
   * The least offset `packed` (framed) may start at in the buffer its
   * `size` decoded bytes fill from the start, for decoding in place; or
   * undefined where it cannot be told.
   */
  inPlaceStart(packed: Uint8Array, size: number): number | undefined;
}

const SEGMENT_CODECS: Partial<Record<FileCompression, SegmentCodec>> = {
  xz: {
    chunkType: XZ_CHUNK,
    poolName: "xz",
    decodeInto: (packed, out) => xz.decodeInto(packed, out),
    inPlaceStart: xz.inPlaceStart,
  },
  zstd: {
    chunkType: ZSTD_FRAME_CHUNK,
    poolName: "zstd frame",
    // decodeFrameInto reads the whole frame before it writes the output.
    inPlaceStart: () => 0,
    async decodeInto(packed, out) {
      const used = await zstd.decodeFrameInto(packed, out);
      if (used !== packed.length) {
        throw new CodecError(
          "zstd",
          `frame ends ${packed.length - used} bytes early`,
        );
      }
    },
  },
};

/**
 * The parts of `source` that decode alone, from the container's own
 * index: xz blocks (from the streams' indexes at the end) and zstd frames
 * that declare their content size, each at most {@linkcode MAX_SEGMENT}.
 * Undefined when the container has no such index.
 */
async function segmentsOf(
  source: Source,
  compression: FileCompression,
): Promise<Segment[] | undefined> {
  const read = (offset: number, length: number) => source.read(offset, length);
  if (compression === "xz") {
    const blocks = await xz.readIndex(read, source.size);
    if (!blocks || blocks.some((b) => b.size > MAX_SEGMENT)) return undefined;
    return blocks.filter((b) => b.size > 0).map((b) => ({
      packedOffset: b.packedOffset,
      packedLength: b.packedLength,
      offset: b.offset,
      size: b.size,
      ...xz.blockFraming(b),
    }));
  }
  if (compression === "zstd") {
    // readFrames uses each piece only until it asks for the next, and
    // walks every block header of the file, a MiB at a time: one buffer
    // for all of them (a fresh one per MiB was garbage the size of the
    // file).
    let window = new Uint8Array(0);
    const reuse = async (offset: number, length: number) => {
      if (window.length < length) window = new Uint8Array(length);
      const piece = window.subarray(0, length);
      await readInto(source, offset, piece);
      return piece;
    };
    const frames = await zstd.readFrames(reuse, source.size, MAX_SEGMENT);
    if (!frames) return undefined;
    return frames.filter((f) => f.size > 0);
  }
  return undefined;
}

/** Shared memory for the workers to decode into, where the platform has it. */
const hasShared = typeof SharedArrayBuffer === "function";

/** A decoded segment in one of the buffers. */
interface Slot {
  /** Its decoded bytes, once decoded. */
  decoded: Promise<Uint8Array>;
  /** The buffer it decodes into (whole: its first `size` bytes are the segment's). */
  buffer: Uint8Array;
  /** Reads copying from it now, and its decode while it runs. */
  users: number;
  /** Decoded ahead of a reader and not read yet: evicted last. */
  ahead: boolean;
}

/**
 * The decoded file read at random through its segments: a read decodes
 * the segments it touches, and a reader going forward has the next ones
 * decoding on the codec workers meanwhile.
 *
 * Memory is a fixed number of decoded segments
 * ({@linkcode segmentSlots}), each decoded into one of as many buffers
 * sized for the largest segment and reused, shared with the workers,
 * which decode straight into them (issue 15). Before, each decode made a
 * fresh array on a worker, moved it here, and up to 4 were cached
 * besides the ones decoding ahead: a convert of the bench's 1 GiB
 * `xz -T0 -6` file (43 blocks of 24 MiB) peaked at 549-612 MiB of RSS,
 * V8 freeing the dropped arrays late. No segment decodes on this thread
 * beside the workers' ones: here only when workers cannot run (then
 * nothing decodes ahead), or to name the error of a segment a worker
 * could not decode.
 */
function segmentedSource(
  source: Source,
  compression: FileCompression,
  segments: Segment[],
): DecodedSource {
  const codec = SEGMENT_CODECS[compression]!;
  const last = segments[segments.length - 1];
  const size = last ? last.offset + last.size : 0;
  const largest = segments.reduce((m, s) => Math.max(m, s.size), 0);
  // The workers stay alive from open to close (see _pool.ts), for a file
  // of several segments (one alone gains nothing from a worker).
  const pooled = segments.length > 1 && codecPool.usable;
  const letGo = pooled ? codecPool.hold() : () => {};
  const shared = pooled && hasShared;
  // Room for the packed bytes of a segment that does not compress, or
  // barely, to be decoded in place too (see `decode`).
  const slotBytes = largest + Math.max(1 << 20, largest >>> 6);
  const slotCount = segmentSlots(slotBytes, pooled ? codecPool.size : 0);
  const make = (n: number) =>
    shared ? new Uint8Array(new SharedArrayBuffer(n)) : new Uint8Array(n);
  /** Decode buffers not holding a segment. */
  const free: Uint8Array[] = [];
  let made = 0;
  /** Packed bytes of the decodes in flight that cannot be decoded in place, reused. */
  const packedBuffers = new Scratch(make, slotCount, Infinity);
  /** Segments in buffers, least recently used first. */
  const slots = new Map<number, Slot>();
  let waiting: (() => void)[] = [];
  const wake = () => {
    const w = waiting;
    waiting = [];
    for (const f of w) f();
  };
  let closed = false;

  /**
   * A buffer for a segment: a free one, a new one while fewer than
   * `slotCount` exist, or the least recently used segment nobody uses
   * (segments decoded ahead and not read yet only when `evictAhead`).
   * Undefined when there is none now.
   */
  const takeBuffer = (evictAhead: boolean): Uint8Array | undefined => {
    const buffer = free.pop();
    if (buffer) return buffer;
    if (made < slotCount) {
      made++;
      return make(slotBytes);
    }
    for (const pass of evictAhead ? [false, true] : [false]) {
      for (const [k, slot] of slots) {
        if (slot.users === 0 && slot.ahead === pass) {
          slots.delete(k);
          return slot.buffer;
        }
      }
    }
    return undefined;
  };

  /**
   * Decodes segment `i` into the start of `buffer`, on a worker where
   * they run. Its packed bytes are read into the end of the same buffer
   * when decoding in place never overwrites one before it is read (the
   * decoded bytes, written from the start, reach past where the packed
   * ones begin only over those already read): then the packed bytes take
   * no memory of their own, the pages they were read into being the ones
   * the decoded bytes fill. Else into a buffer of their own.
   */
  const decode = async (i: number, buffer: Uint8Array): Promise<Uint8Array> => {
    const s = segments[i];
    const out = buffer.subarray(0, s.size);
    const head = s.head?.length ?? 0;
    const framed = head + s.packedLength + (s.tail?.length ?? 0);
    const load = async (packed: Uint8Array) => {
      if (s.head) packed.set(s.head);
      await readInto(
        source,
        s.packedOffset,
        packed.subarray(head, head + s.packedLength),
      );
      if (s.tail) packed.set(s.tail, head + s.packedLength);
    };
    const start = buffer.length - framed;
    let own = start < 0;
    let packed = own
      ? packedBuffers.take(framed)
      : buffer.subarray(start, buffer.length);
    try {
      await load(packed);
      if (
        !own && !((codec.inPlaceStart(packed, s.size) ?? Infinity) <= start)
      ) {
        const copy = packedBuffers.take(framed);
        copy.set(packed);
        packed = copy;
        own = true;
      }
      const asked = pooled && codecPool.usable;
      let done: unknown = null;
      if (asked && shared) {
        done = await codecPool.batchInto(
          packed,
          [codec.chunkType, 0, framed, s.size, 0],
          out,
          true,
          false,
        );
      } else if (asked) {
        // No shared memory (a browser page that is not cross-origin
        // isolated): the worker answers an array of its own, copied here.
        const decoded = await codecPool.run(
          "decode",
          codec.poolName,
          packed,
          s.size,
        );
        if (decoded) out.set(decoded);
        done = decoded;
      }
      if (!done) {
        // Not decoded there (no workers, or the segment is corrupt): here,
        // which names what is wrong, from the packed bytes read again
        // where the worker's output may have overwritten them.
        if (asked && !own) await load(packed);
        await codec.decodeInto(packed, out);
      }
      return out;
    } catch (e) {
      throw containerError(e, compression, source);
    } finally {
      if (own) packedBuffers.give(packed);
    }
  };

  /** Starts decoding segment `i` into `buffer`; its slot has one user (the caller's). */
  const start = (i: number, buffer: Uint8Array, ahead: boolean): Slot => {
    const slot: Slot = { decoded: decode(i, buffer), buffer, users: 1, ahead };
    slots.set(i, slot);
    slot.decoded.catch(() => {
      // A failed decode is not kept: the next read tries again.
      if (slots.get(i) === slot) slots.delete(i);
    });
    return slot;
  };

  /** Lets go of a use of `slot`; a dropped slot's buffer is free once unused. */
  const release = (i: number, slot: Slot) => {
    slot.users--;
    if (slot.users === 0 && slots.get(i) !== slot) free.push(slot.buffer);
    wake();
  };

  /** Segment `i` held for reading (waits for a buffer when all are in use). */
  const hold = async (i: number): Promise<Slot> => {
    for (;;) {
      const cached = slots.get(i);
      if (cached) {
        slots.delete(i);
        slots.set(i, cached); // most recently used last
        cached.ahead = false;
        cached.users++;
        return cached;
      }
      const buffer = takeBuffer(true);
      if (buffer) {
        const slot = start(i, buffer, false);
        slot.users++; // the decode's, let go when it settles
        slot.decoded.then(() => release(i, slot), () => release(i, slot));
        return slot;
      }
      await new Promise<void>((resolve) => waiting.push(resolve));
    }
  };

  /** Starts decoding the segments after `i` into buffers free now (never evicting ones decoded ahead). */
  const decodeAhead = (i: number) => {
    if (!pooled || !codecPool.usable || closed) return;
    for (let k = i + 1; k <= i + slotCount && k < segments.length; k++) {
      if (slots.has(k)) continue;
      const buffer = takeBuffer(false);
      if (!buffer) return;
      const slot = start(k, buffer, true);
      slot.decoded.then(() => release(k, slot), () => release(k, slot));
    }
  };

  const find = (offset: number): number => {
    let lo = 0;
    let hi = segments.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if (segments[mid].offset <= offset) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  };
  const readIntoSegments = async (offset: number, into: Uint8Array) => {
    checkRange(size, offset, into.length);
    let i = find(offset);
    for (let at = 0; at < into.length; i++) {
      const s = segments[i];
      // One segment held at a time: a read never waits for a buffer
      // while it holds one.
      const slot = await hold(i);
      try {
        decodeAhead(i);
        const decoded = await slot.decoded;
        const from = offset + at - s.offset;
        const n = Math.min(s.size - from, into.length - at);
        into.set(decoded.subarray(from, from + n), at);
        at += n;
      } finally {
        release(i, slot);
      }
    }
  };
  return {
    compression,
    compressedSize: source.size,
    access: "index",
    size,
    name: source.name,
    async read(offset, length) {
      const out = new Uint8Array(length);
      await readIntoSegments(offset, out);
      return out;
    },
    readInto: readIntoSegments,
    async *extents(offset, length) {
      checkRange(size, offset, length);
      if (length) yield { offset, length, kind: "data" };
    },
    async close() {
      closed = true;
      slots.clear();
      free.length = 0;
      letGo();
      await source.close?.();
    },
  };
}

/**
 * Decoded bytes alive at once in a segmented file (see
 * {@linkcode segmentSlots}): two 48 MiB segments, one of 64 MiB (the
 * most, {@linkcode MAX_SEGMENT}).
 */
const SEGMENT_BUDGET = 128 << 20;

/**
 * How many segments of `bytes` bytes (the largest, with room to decode it
 * in place) are decoded at once: one per worker (two without workers, for
 * reads that go back and forth), within {@linkcode SEGMENT_BUDGET} but at
 * least one, whatever their size. Copying a segment out takes a few
 * percent of the time decoding it takes, so one buffer per worker keeps
 * the workers busy: the one being read is free again long before the
 * other's decode ends. 64 MiB segments decode one at a time, on one
 * worker: two of them kept a convert at 251-259 MiB of peak RSS, at the
 * edge of the 256 MiB budget (issue 15), one at 180-190 MiB.
 *
 * @param bytes the buffer one segment needs
 * @param workers the workers decoding (0 when none run)
 */
function segmentSlots(bytes: number, workers: number): number {
  const fit = Math.floor(SEGMENT_BUDGET / Math.max(1, bytes));
  return Math.max(1, Math.min(Math.max(2, workers), fit));
}

/** A scratch store in memory: 1 MiB pages, zero pages not kept. */
function memoryScratch(limit: number, format: string): ScratchFile {
  const PAGE = 1 << 20;
  const pages = new Map<number, Uint8Array>();
  return {
    write(offset, bytes) {
      for (let at = 0; at < bytes.length;) {
        const index = Math.floor((offset + at) / PAGE);
        const within = (offset + at) % PAGE;
        const n = Math.min(PAGE - within, bytes.length - at);
        let page = pages.get(index);
        if (!page) {
          if (pages.size * PAGE >= limit) {
            return Promise.reject(
              new UnsupportedError(
                {
                  format,
                  field: "decoded data",
                  value: `more than ${limit} bytes`,
                  limit:
                    `at most ${limit} bytes in memory: decode it with xz/zstd/gzip/bzip2 -d first, ` +
                    "or open it where a scratch file can be used (Deno: the scratch option)",
                },
                `the decoded image has more than ${limit} bytes of data to hold in memory`,
              ),
            );
          }
          page = new Uint8Array(PAGE);
          pages.set(index, page);
        }
        page.set(bytes.subarray(at, at + n), within);
        at += n;
      }
      return Promise.resolve();
    },
    readInto(offset, into) {
      for (let at = 0; at < into.length;) {
        const index = Math.floor((offset + at) / PAGE);
        const within = (offset + at) % PAGE;
        const n = Math.min(PAGE - within, into.length - at);
        const page = pages.get(index);
        if (page) into.set(page.subarray(within, within + n), at);
        else into.fill(0, at, at + n);
        at += n;
      }
      return Promise.resolve();
    },
    close() {
      pages.clear();
      return Promise.resolve();
    },
  };
}

/** A growable bit per granule: set when the granule is all zeros. */
class ZeroMap {
  bits = new Uint8Array(1024);
  set(granule: number): void {
    const byte = granule >>> 3;
    if (byte >= this.bits.length) {
      const grown = new Uint8Array(Math.max(byte + 1, this.bits.length * 2));
      grown.set(this.bits);
      this.bits = grown;
    }
    this.bits[byte] |= 1 << (granule & 7);
  }
  has(granule: number): boolean {
    const byte = granule >>> 3;
    return byte < this.bits.length &&
      (this.bits[byte] & (1 << (granule & 7))) !== 0;
  }
  /** The allocation map of `[offset, offset + length)`: granules set are `zero`, the rest `data`. */
  async *runs(offset: number, length: number): AsyncGenerator<Extent> {
    const end = offset + length;
    let runStart = offset;
    let runZero = this.has(Math.floor(offset / GRANULE));
    for (let g = Math.floor(offset / GRANULE) + 1; g * GRANULE < end; g++) {
      const zero = this.has(g);
      if (zero !== runZero) {
        yield {
          offset: runStart,
          length: g * GRANULE - runStart,
          kind: runZero ? "zero" : "data",
        };
        runStart = g * GRANULE;
        runZero = zero;
      }
    }
    if (end > runStart) {
      yield {
        offset: runStart,
        length: end - runStart,
        kind: runZero ? "zero" : "data",
      };
    }
  }
}

/** A decoded file: its bytes in a scratch store, its zero runs known. */
export interface DecodedSource extends Source {
  /** The container it was decoded from. */
  readonly compression: FileCompression;
  /** Bytes of the compressed file. */
  readonly compressedSize: number;
  /**
   * How it is read at random: `index` (xz blocks or zstd frames that
   * decode alone, as the container lists them), `scratch` (decoded
   * front to back into a scratch store) or `output` (decoded front to
   * back straight into a convert's output, `OpenOptions.unpackTo`).
   */
  readonly access: "index" | "scratch" | "output";
  readInto(offset: number, into: Uint8Array): Promise<void>;
  extents(offset: number, length: number): AsyncIterable<Extent>;
  close(): Promise<void>;
}

/**
 * Decodes a compressed `source` whole, in one pass, into a scratch store
 * and returns the decoded bytes as a Source whose allocation map has the
 * zero runs (64 KiB granules) as `zero`. A container error (truncated,
 * corrupt, a checksum that does not match) is an
 * {@linkcode ImageFormatError} naming the container; the store is
 * released on every failure.
 *
 * @param source the compressed file
 * @param compression its container
 * @param scratch the scratch store factory (memory when absent)
 * @param memoryLimit the most data bytes a memory store holds
 * @param onProgress told the compressed bytes read so far, and their total
 * @returns the decoded bytes, read at random
 *
 * @example
 * ```ts
 * import { decodeToScratch } from "./compressed.ts";
 * import { fromBytes } from "./sources.ts";
 * const gz = new Uint8Array(
 *   await new Response(
 *     new Blob([new Uint8Array(1 << 20)]).stream()
 *       .pipeThrough(new CompressionStream("gzip")),
 *   ).arrayBuffer(),
 * );
 * const decoded = await decodeToScratch(fromBytes(gz), "gzip");
 * for await (const run of decoded.extents(0, decoded.size)) {
 *   console.log(run.kind, run.length); // zero 1048576
 * }
 * ```
 */
export function decodeToScratch(
  source: Source,
  compression: FileCompression,
  scratch?: () => Promise<ScratchFile>,
  memoryLimit: number = MEMORY_SCRATCH_LIMIT,
  onProgress?: (done: number, total: number) => void,
): Promise<DecodedSource> {
  return scratchFrom(
    decompress(source, compression, onProgress),
    source,
    compression,
    scratch,
    memoryLimit,
  );
}

/** {@linkcode decodeToScratch} from decoded `pieces` (each valid until the next is asked for). */
async function scratchFrom(
  pieces: AsyncIterable<Uint8Array>,
  source: Source,
  compression: FileCompression,
  scratch: (() => Promise<ScratchFile>) | undefined,
  memoryLimit: number,
): Promise<DecodedSource> {
  const store = scratch
    ? await scratch()
    : memoryScratch(memoryLimit, compression);
  const zeros = new ZeroMap();
  let size = 0;
  try {
    // Each piece is checked for zeros a granule (or the part of one it
    // holds) at a time and its runs of data written from it as they are:
    // zeros are never written (the store reads what was not written as
    // zeros), so a granule cut by a piece's end needs nothing kept. (The
    // pieces were copied into a staging buffer first: a pass over every
    // byte more.)
    let granuleData = false; // the granule at `size` holds a non-zero byte so far
    for await (const piece of pieces) {
      // A view starting on a 4-byte boundary, for isZeroRange's words.
      const skew = piece.byteOffset & 3;
      const wide = new Uint8Array(
        piece.buffer,
        piece.byteOffset - skew,
        piece.length + skew,
      );
      const words = wordsOf(wide);
      let runStart = -1; // where the run of data being gathered starts in `piece`
      for (let at = 0; at < piece.length;) {
        const within = (size + at) % GRANULE;
        const n = Math.min(GRANULE - within, piece.length - at);
        if (isZeroRange(wide, words, skew + at, skew + at + n)) {
          if (runStart >= 0) {
            await store.write(size + runStart, piece.subarray(runStart, at));
            runStart = -1;
          }
        } else {
          granuleData = true;
          if (runStart < 0) runStart = at;
        }
        at += n;
        if (within + n === GRANULE) {
          if (!granuleData) zeros.set((size + at) / GRANULE - 1);
          granuleData = false;
        }
      }
      if (runStart >= 0) {
        await store.write(size + runStart, piece.subarray(runStart));
      }
      size += piece.length;
    }
    if (size % GRANULE && !granuleData) zeros.set(Math.floor(size / GRANULE));
    if (!Number.isSafeInteger(size)) throw new RangeError("decoded size");
  } catch (e) {
    await store.close();
    throw containerError(e, compression, source);
  }
  const decodedSize = size;
  return {
    compression,
    compressedSize: source.size,
    access: "scratch",
    size: decodedSize,
    name: source.name,
    async read(offset, length) {
      checkRange(decodedSize, offset, length);
      const out = new Uint8Array(length);
      await store.readInto(offset, out);
      return out;
    },
    readInto(offset, into) {
      checkRange(decodedSize, offset, into.length);
      return store.readInto(offset, into);
    },
    extents(offset, length) {
      checkRange(decodedSize, offset, length);
      return zeros.runs(offset, length);
    },
    async close() {
      await store.close();
      await source.close?.();
    },
  };
}

/**
 * The decoded file as `first` (pieces already taken from `rest`: copies,
 * and the last one still valid) then the rest of `rest`, which is let go
 * of (its decoder released) however the reader stops.
 */
async function* replay(
  first: Uint8Array[],
  rest: AsyncIterator<Uint8Array>,
): AsyncGenerator<Uint8Array> {
  try {
    yield* first;
    for (;;) {
      const next = await rest.next();
      if (next.done) return;
      yield next.value;
    }
  } finally {
    await rest.return?.();
  }
}

/**
 * Decoded bytes are copied into buffers of this size and written from
 * them, so that a buffer's writes run on the file's I/O thread while the
 * next is decoded (a decoder's pieces are valid only until the next is
 * asked for); {@linkcode UNPACK_BUFFERS} take turns.
 */
const UNPACK_BUFFER = 4 << 20;
/** Buffers being written or filled at once (16 MiB). */
const UNPACK_BUFFERS = 4;

/**
 * Writes the decoded `pieces` into `sink` in order, front to back:
 * granules of `sparse` bytes (aligned) that are all zeros are not written
 * (holes), and the sink is sized to the decoded size at the end. Each
 * piece is copied into one of {@linkcode UNPACK_BUFFERS} buffers; a full
 * buffer's data runs are handed to the sink at once (a file writes runs of
 * 256 KiB and more on its I/O thread, in order) and the buffer is taken
 * again once they are written, so decoding and writing overlap with
 * memory bounded by the buffers. Returns the decoded size and its 64 KiB
 * zero granules.
 */
async function writeDecoded(
  pieces: AsyncIterable<Uint8Array>,
  sink: Sink,
  sparse: number,
): Promise<{ size: number; zeros: ZeroMap }> {
  if (sparse > 0 && GRANULE % sparse !== 0) {
    throw new RangeError(`sparseSize ${sparse} must divide ${GRANULE}`);
  }
  const zeros = new ZeroMap();
  /** Buffers whose writes are running, oldest first: each resolves to its buffer. */
  const busy: Promise<Uint8Array>[] = [];
  let made = 0;
  /** A new buffer while fewer than UNPACK_BUFFERS exist, else the oldest once written. */
  const take = async (): Promise<Uint8Array> => {
    if (made < UNPACK_BUFFERS) {
      made++;
      return new Uint8Array(UNPACK_BUFFER);
    }
    return await busy.shift()!;
  };
  /** Hands the `length` bytes of `buffer` (decoded bytes from `offset`) to the sink. */
  const send = (buffer: Uint8Array, length: number, offset: number) => {
    const writes: Promise<void>[] = [];
    const end = offset + length;
    const written = writeSparse(
      // Started, not awaited: a file runs a buffer's writes in order on
      // its I/O thread while the next buffer is decoded.
      (at, bytes) => {
        const write = sink.write(at, bytes);
        write.catch(() => {}); // answered below, once all are started
        writes.push(write);
        return Promise.resolve();
      },
      offset,
      buffer.subarray(0, length),
      sparse,
      // A zero run (never written): the granules it covers whole are
      // zero in the map, and so is the last one where its part within
      // the file is. (`offset` is a multiple of the buffer's size: the
      // granules line up.)
      (at, n) => {
        for (let g = Math.ceil(at / GRANULE); g * GRANULE < at + n; g++) {
          if (Math.min((g + 1) * GRANULE, end) <= at + n) zeros.set(g);
        }
        return Promise.resolve();
      },
    ).then(() => Promise.all(writes)).then(() => buffer);
    written.catch(() => {}); // answered when the buffer is taken again, or at the end
    busy.push(written);
  };
  let size = 0;
  let buffer = await take();
  let filled = 0;
  let lastByte = 0;
  try {
    for await (const piece of pieces) {
      if (piece.length) lastByte = piece[piece.length - 1];
      for (let at = 0; at < piece.length;) {
        const n = Math.min(UNPACK_BUFFER - filled, piece.length - at);
        buffer.set(piece.subarray(at, at + n), filled);
        filled += n;
        at += n;
        if (filled === UNPACK_BUFFER) {
          send(buffer, filled, size);
          size += filled;
          filled = 0;
          buffer = await take();
        }
      }
    }
    if (filled) {
      send(buffer, filled, size);
      size += filled;
    }
    if (!Number.isSafeInteger(size)) throw new RangeError("decoded size");
    while (busy.length) await busy.shift();
  } finally {
    // No write from a buffer runs after this answers.
    await Promise.allSettled(busy);
  }
  if (sink.resize) await sink.resize(size);
  else if (size > 0) {
    // A sink that cannot be sized gets its last byte again, so that holes
    // at the end count.
    await sink.write(size - 1, new Uint8Array([lastByte]));
  }
  return { size, zeros };
}

/**
 * Decodes a compressed file that is read front to back, either straight
 * into `target`'s output or into scratch. The first decoded bytes (a
 * probe's head) decide: bytes another format claims (`mayBeRaw` says no),
 * or another compressed container, go to scratch as before, as does a
 * file that decodes to fewer bytes; otherwise the output is opened and
 * every byte goes there, in one pass (`streamed`). The decoded bytes are
 * then read back from the output, where `openCompressed` probes them
 * whole, as it would probe a scratch store.
 */
async function decodeOnce(
  source: Source,
  compression: FileCompression,
  options: OpenOptions,
  target: UnpackTarget,
  mayBeRaw: (head: Uint8Array) => boolean,
): Promise<{ decoded: DecodedSource; streamed: boolean }> {
  const rest = decompress(source, compression, options.onDecodeProgress)
    [Symbol.asyncIterator]();
  const first: Uint8Array[] = [];
  let have = 0;
  let ended = false;
  try {
    while (have < PROBE_BYTES) {
      const next = await rest.next();
      if (next.done) {
        ended = true;
        break;
      }
      // Pieces before the last one taken are copied: they are valid only
      // until the next is asked for.
      const piece = next.value;
      first.push(have + piece.length < PROBE_BYTES ? piece.slice() : piece);
      have += piece.length;
    }
  } catch (e) {
    await rest.return?.(undefined);
    throw containerError(e, compression, source);
  }
  const head = new Uint8Array(Math.min(have, PROBE_BYTES));
  for (let at = 0, i = 0; at < head.length; i++) {
    const n = Math.min(first[i].length, head.length - at);
    head.set(first[i].subarray(0, n), at);
    at += n;
  }
  const pieces = replay(first, rest);
  let sink: Sink & Source;
  let written: { size: number; zeros: ZeroMap };
  try {
    if (ended || detectCompression(head) || !mayBeRaw(head)) {
      return {
        decoded: await scratchFrom(
          pieces,
          source,
          compression,
          options.scratch,
          MEMORY_SCRATCH_LIMIT,
        ),
        streamed: false,
      };
    }
    sink = await target.open();
    written = await writeDecoded(pieces, sink, target.sparseSize ?? 4096);
  } catch (e) {
    // The decoder is let go of even where `pieces` was never read.
    await rest.return?.(undefined);
    throw containerError(e, compression, source);
  }
  const { size, zeros } = written;
  return {
    streamed: true,
    decoded: {
      compression,
      compressedSize: source.size,
      access: "output",
      size,
      name: source.name,
      read(offset, length) {
        checkRange(size, offset, length);
        return sink.read(offset, length);
      },
      readInto(offset, into) {
        checkRange(size, offset, into.length);
        return readInto(sink, offset, into);
      },
      extents(offset, length) {
        checkRange(size, offset, length);
        return zeros.runs(offset, length);
      },
      // The output is the caller's.
      close: async () => await source.close?.(),
    },
  };
}

/**
 * Opens a compressed file as the image inside it: decodes it (see
 * {@linkcode decodeToScratch}), then opens what was decoded with
 * `openInner` (the registry's own open, which probes it). The image is
 * the inner one, with `details.file_compression` (the container) and
 * `details.compressed_size` added; closing it releases the scratch store.
 * Writable opens are refused: the file would have to be compressed again.
 * With `options.unpackTo`, a file read front to back whose first bytes
 * `mayBeRaw` is decoded straight into that output instead of scratch (see
 * {@linkcode UnpackTarget}).
 *
 * @param source the compressed file
 * @param compression its container
 * @param options open options (`scratch` says where to decode to)
 * @param openInner opens the decoded bytes
 * @param mayBeRaw whether decoded bytes starting with `head` (a probe's
 *   head; their tail is not known yet) may be a raw image: false when a
 *   format claims them from their head alone
 * @returns the image inside
 *
 * @example
 * ```ts
 * import { open } from "../mod.ts";
 * import { fromBytes } from "./sources.ts";
 * const gz = new Uint8Array(
 *   await new Response(
 *     new Blob([new Uint8Array(4096).fill(7)]).stream()
 *       .pipeThrough(new CompressionStream("gzip")),
 *   ).arrayBuffer(),
 * );
 * const image = await open(fromBytes(gz));
 * console.log(image.format, image.size, image.details?.file_compression); // raw 4096 gzip
 * ```
 */
export async function openCompressed(
  source: Source,
  compression: FileCompression,
  options: OpenOptions,
  openInner: (decoded: Source, options: OpenOptions) => Promise<Image>,
  mayBeRaw: (head: Uint8Array) => boolean = () => true,
): Promise<Image> {
  if (options.writable) {
    throw new UnsupportedError(
      {
        format: compression,
        field: "open mode",
        value: "writable",
        limit: "read-only (decompress the file to write to it)",
        file: source.name,
      },
      `${
        source.name ?? "the image"
      } is ${compression}-compressed and can only be read; decompress it to write to it`,
    );
  }
  const segments = await segmentsOf(source, compression);
  const target = segments ? undefined : options.unpackTo;
  let decoded: DecodedSource;
  let streamed = false;
  if (segments) decoded = segmentedSource(source, compression, segments);
  else if (target) {
    ({ decoded, streamed } = await decodeOnce(
      source,
      compression,
      options,
      target,
      mayBeRaw,
    ));
  } else {
    decoded = await decodeToScratch(
      source,
      compression,
      options.scratch,
      MEMORY_SCRATCH_LIMIT,
      options.onDecodeProgress,
    );
  }
  let inner: Image;
  try {
    // Opened as any file is: probed whole (head, tail and size), so an
    // image decoded into the output is raw only if probing says so. What
    // is inside is never decoded into the output too.
    inner = await openInner(decoded, { ...options, unpackTo: undefined });
  } catch (e) {
    await decoded.close();
    throw e;
  }
  if (streamed) {
    target!.outcome = inner.format === "raw" &&
        inner.details?.file_compression === undefined &&
        inner.size === decoded.size
      ? "raw"
      : "scratch";
  }
  const details = {
    ...inner.details,
    file_compression: compression,
    compressed_size: source.size,
    compressed_access: decoded.access,
  };
  return new Proxy(inner, {
    get(target, key) {
      if (key === "details") return details;
      if (key === "close") {
        return async () => {
          await target.close?.();
          await decoded.close();
        };
      }
      const value = Reflect.get(target, key, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
}
