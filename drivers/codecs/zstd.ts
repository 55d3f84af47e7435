/**
 * zstd: a streaming decoder for `.zst` files (RFC 8878): any number of
 * frames, skippable frames between them, each frame's content checksum
 * (XXH64) and declared content size verified.
 *
 * The frames and their blocks are walked here (so that each frame's
 * checksum can be checked, its window size limited before anything is
 * allocated, and a truncated file named as such); the entropy decoding of
 * the blocks is `npm:fzstd` (pure JavaScript, 8 kB, streaming, maintained
 * by the author of fflate), which skips checksums itself. The XXH64 comes
 * from `npm:hash-wasm`, which the toolkit already uses for SHA-256.
 *
 * | size   | field (a frame; integers little-endian)                          |
 * | ------ | ---------------------------------------------------------------- |
 * | 4      | magic 28 B5 2F FD                                                |
 * | 1      | descriptor: content-size flag (bits 6-7), single segment (5), reserved (3), checksum (2), dictionary-id flag (0-1) |
 * | 0/1    | window descriptor (absent in single-segment frames): exponent (bits 3-7), mantissa (0-2) |
 * | 0-4    | dictionary id                                                    |
 * | 0-8    | content size (2 bytes: + 256)                                    |
 * | blocks | 3-byte header: last (bit 0), type (1-2: raw, RLE, compressed, reserved), size (3-23); then the block |
 * | 0/4    | low 32 bits of the XXH64 of the content                          |
 *
 * A skippable frame is a magic 0x184D2A50..0x184D2A5F, a 4-byte size and
 * that many bytes.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { Decompress } from "npm:fzstd@0.1.1";
import { CodecError } from "../../streams/errors.ts";
import { checkBlockTables } from "./_zstd_check.ts";
import type { ByteFeed } from "./_feed.ts";

const CODEC = "zstd";

function fail(message: string): never {
  throw new CodecError(CODEC, message);
}

const FRAME_MAGIC = 0xfd2fb528;
const SKIPPABLE_MASK = 0xfffffff0;
const SKIPPABLE_MAGIC = 0x184d2a50;
/** The largest block, compressed or not (RFC 8878 3.1.1.2.4). */
const BLOCK_MAX = 128 << 10;

/**
 * The largest window accepted: `zstd -d`'s own default limit (window log
 * 27). Frames made with `--long=28` and above need `zstd -d --memory`
 * there and are refused here.
 */
export const MAX_WINDOW = 1 << 27;

function le32(b: Uint8Array, at: number): number {
  return (b[at] | (b[at + 1] << 8) | (b[at + 2] << 16) | (b[at + 3] << 24)) >>>
    0;
}

/** What a frame header declares. */
export interface FrameHeader {
  /** Bytes of the header, magic included. */
  headerSize: number;
  /** The content size, when the frame declares it. */
  contentSize?: number;
  /** The window (the most history a match reaches). */
  windowSize: number;
  /** Whether a 4-byte checksum follows the last block. */
  checksum: boolean;
}

/**
 * Parses the frame header at `at` (magic included); `b` must hold its
 * bytes (at most 18) or the rest of the input.
 */
export function parseFrameHeader(
  b: Uint8Array,
  at: number,
  end: number,
  where: string,
): FrameHeader {
  if (end - at < 6) fail(`${where}: header truncated`);
  const descriptor = b[at + 4];
  const fcsFlag = descriptor >>> 6;
  const single = (descriptor >>> 5) & 1;
  if (descriptor & 0x08) {
    fail(
      `${where}: descriptor 0x${descriptor.toString(16)} sets the reserved bit`,
    );
  }
  const dictBytes = [0, 1, 2, 4][descriptor & 3];
  const fcsBytes = fcsFlag === 0 ? single : 1 << fcsFlag;
  let pos = at + 5;
  let windowSize = 0;
  if (!single) {
    const w = b[pos++];
    const base = 2 ** (10 + (w >>> 3));
    windowSize = base + (base / 8) * (w & 7);
  }
  const headerSize = pos - at + dictBytes + fcsBytes;
  if (end - at < headerSize) fail(`${where}: header truncated`);
  let dictId = 0;
  for (let i = 0; i < dictBytes; i++) dictId += b[pos + i] * 2 ** (8 * i);
  pos += dictBytes;
  if (dictId !== 0) {
    fail(
      `${where}: needs dictionary ${dictId} (dictionaries are not supported)`,
    );
  }
  let contentSize: number | undefined;
  if (fcsBytes) {
    let v = 0;
    for (let i = 0; i < fcsBytes; i++) v += b[pos + i] * 2 ** (8 * i);
    if (fcsBytes === 2) v += 256;
    if (!Number.isSafeInteger(v)) {
      fail(`${where}: content size ${v} is too large`);
    }
    contentSize = v;
  }
  if (single) windowSize = contentSize!;
  if (windowSize > MAX_WINDOW) {
    fail(
      `${where}: window of ${windowSize} bytes is over the ${MAX_WINDOW} allowed (zstd -d's default limit)`,
    );
  }
  return {
    headerSize,
    contentSize,
    windowSize,
    checksum: ((descriptor >>> 2) & 1) === 1,
  };
}

/** The low 32 bits of an XXH64 (seed 0), incrementally. */
interface Xxh64 {
  update(bytes: Uint8Array): void;
  low32(): number;
}

async function xxh64(): Promise<Xxh64> {
  const { createXXHash64 } = await import("npm:hash-wasm@4.13.0");
  const h = await createXXHash64();
  h.init();
  return {
    update: (bytes) => void h.update(bytes),
    // The hex digest is the 64-bit value, most significant digit first.
    low32: () => parseInt(h.digest("hex").slice(8), 16),
  };
}

/**
 * Decodes zstd frames (and skips skippable ones) as they arrive from
 * `feed`, yielding the content in order, a block at a time. Each frame's
 * checksum and content size are verified as it ends; a frame that ends
 * early, a reserved block type, a block over 128 KiB or a window over
 * {@linkcode MAX_WINDOW} is a {@linkcode CodecError}.
 *
 * @param feed the compressed bytes
 * @returns the decoded bytes, piece by piece (each only valid until the next is asked for)
 *
 * @example
 * ```ts
 * import { decodeStreaming } from "./zstd.ts";
 * import { ByteFeed } from "./_feed.ts";
 * // `printf 'hello\n' | zstd -c`:
 * let packed: Uint8Array | null = new Uint8Array([
 *   0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x58, 0x31, 0x00, 0x00, 0x68, 0x65, 0x6c,
 *   0x6c, 0x6f, 0x0a, 0x53, 0x88, 0xbd, 0x91,
 * ]);
 * const feed = new ByteFeed(() => Promise.resolve([packed, packed = null][0]));
 * for await (const piece of decodeStreaming(feed)) {
 *   console.log(new TextDecoder().decode(piece)); // hello
 * }
 * ```
 */
export async function* decodeStreaming(
  feed: ByteFeed,
): AsyncGenerator<Uint8Array> {
  for (let frame = 1;; frame++) {
    const where = `frame ${frame} (byte ${feed.consumed})`;
    const got = await feed.ensure(18);
    if (got === 0 && frame > 1) return;
    if (got < 4) fail(`${where}: truncated (${got} bytes)`);
    const magic = le32(feed.bytes, feed.start);
    if ((magic & SKIPPABLE_MASK) >>> 0 === SKIPPABLE_MAGIC) {
      if (got < 8) fail(`${where}: skippable frame header truncated`);
      let left = le32(feed.bytes, feed.start + 4);
      feed.skip(8);
      while (left > 0) {
        const n = Math.min(left, await feed.ensure(Math.min(left, 1 << 20)));
        if (n === 0) fail(`${where}: skippable frame truncated`);
        feed.skip(n);
        left -= n;
      }
      continue;
    }
    if (magic !== FRAME_MAGIC) {
      fail(
        frame === 1
          ? "not a zstd frame (bad magic)"
          : `${where}: unexpected bytes after the last frame`,
      );
    }
    const header = parseFrameHeader(feed.bytes, feed.start, feed.end, where);
    const hash = header.checksum ? await xxh64() : undefined;
    const pieces: Uint8Array[] = [];
    let produced = 0;
    const decoder = new Decompress((piece) => {
      if (piece.length) pieces.push(piece);
    });
    const push = (bytes: Uint8Array, final: boolean) => {
      try {
        decoder.push(bytes, final);
      } catch (e) {
        fail(`${where}: ${e instanceof Error ? e.message : String(e)}`);
      }
    };
    push(feed.bytes.slice(feed.start, feed.start + header.headerSize), false);
    feed.skip(header.headerSize);
    for (let block = 1;; block++) {
      if ((await feed.ensure(3)) < 3) {
        fail(`${where}: block ${block} truncated`);
      }
      const b = feed.bytes;
      const h = b[feed.start] | (b[feed.start + 1] << 8) |
        (b[feed.start + 2] << 16);
      const last = (h & 1) === 1;
      const type = (h >>> 1) & 3;
      const size = h >>> 3;
      if (type === 3) fail(`${where}: block ${block} has the reserved type 3`);
      if (size > BLOCK_MAX || size > Math.max(header.windowSize, 1)) {
        fail(
          `${where}: block ${block} of ${size} bytes is over the ${
            Math.min(BLOCK_MAX, header.windowSize)
          } allowed`,
        );
      }
      const length = 3 + (type === 1 ? 1 : size);
      const tail = last && header.checksum ? 4 : 0;
      if ((await feed.ensure(length + tail)) < length + tail) {
        fail(`${where}: block ${block} truncated`);
      }
      if (type === 2) {
        // Tables fzstd would never finish with are refused first.
        checkBlockTables(
          feed.bytes,
          feed.start + 3,
          feed.start + length,
          `${where}: block ${block}`,
        );
      }
      // fzstd keeps the bytes it is given only while it waits for more.
      push(
        feed.bytes.subarray(feed.start, feed.start + length + tail),
        last,
      );
      feed.skip(length + tail);
      for (const piece of pieces) {
        produced += piece.length;
        if (header.contentSize !== undefined && produced > header.contentSize) {
          fail(
            `${where}: decodes to more than its content size ${header.contentSize}`,
          );
        }
        hash?.update(piece);
        yield piece;
      }
      pieces.length = 0;
      if (last) break;
    }
    if (header.contentSize !== undefined && produced !== header.contentSize) {
      fail(
        `${where}: decodes to ${produced} bytes, its header declares ${header.contentSize}`,
      );
    }
    if (hash) {
      const b = feed.bytes;
      const at = feed.start - 4;
      const stored = le32(b, at);
      const computed = hash.low32();
      if (stored !== computed) {
        fail(
          `${where}: content checksum mismatch: stored 0x${
            stored.toString(16).padStart(8, "0")
          }, computed 0x${computed.toString(16).padStart(8, "0")}`,
        );
      }
    }
  }
}

/** One zstd frame that declares its content size. */
export interface ZstdFrame {
  /** Offset of the frame (its magic) in the file. */
  packedOffset: number;
  /** Bytes of the frame in the file, checksum included. */
  packedLength: number;
  /** Offset of its first decoded byte in the decoded file. */
  offset: number;
  /** Its content size. */
  size: number;
}

/**
 * Walks the frames of a `.zst` file from its start (headers and block
 * headers only, read a window at a time) while each frame declares a
 * content size of at most `maxFrame` bytes, so that frames can then be
 * decoded alone. Answers `undefined` as soon as one does not (a frame
 * without a content size, a larger one, anything malformed: the
 * streaming decoder then reads the file and names what is wrong).
 * Skippable frames are stepped over.
 *
 * @param read reads bytes of the file
 * @param size the file's size
 * @param maxFrame the largest content size wanted
 * @returns the frames in order, or undefined
 *
 * @example
 * ```ts ignore
 * import { readFrames } from "./zstd.ts";
 * const file = await Deno.readFile("disk.img.zst");
 * const read = (o: number, n: number) => Promise.resolve(file.slice(o, o + n));
 * console.log(await readFrames(read, file.length, 64 << 20));
 * ```
 */
export async function readFrames(
  read: (offset: number, length: number) => Promise<Uint8Array>,
  size: number,
  maxFrame: number,
): Promise<ZstdFrame[] | undefined> {
  // A window of the file, so that walking block headers is not a read each.
  let windowStart = 0;
  let window: Uint8Array = new Uint8Array(0);
  const bytesAt = async (
    at: number,
    n: number,
  ): Promise<Uint8Array | undefined> => {
    if (at + n > size) return undefined;
    if (at < windowStart || at + n > windowStart + window.length) {
      windowStart = at;
      window = await read(at, Math.min(size - at, Math.max(n, 1 << 20)));
    }
    return window.subarray(at - windowStart, at - windowStart + n);
  };
  const frames: ZstdFrame[] = [];
  let offset = 0;
  let at = 0;
  while (at < size) {
    const magicBytes = await bytesAt(at, 4);
    if (!magicBytes) return undefined;
    const magic = le32(magicBytes, 0);
    if ((magic & SKIPPABLE_MASK) >>> 0 === SKIPPABLE_MAGIC) {
      const head = await bytesAt(at, 8);
      if (!head) return undefined;
      at += 8 + le32(head, 4);
      continue;
    }
    if (magic !== FRAME_MAGIC) return undefined;
    const head = await bytesAt(at, Math.min(18, size - at));
    let header: FrameHeader;
    try {
      header = parseFrameHeader(head!, 0, head!.length, "frame");
    } catch (e) {
      if (e instanceof CodecError) return undefined;
      throw e;
    }
    if (header.contentSize === undefined || header.contentSize > maxFrame) {
      return undefined;
    }
    let pos = at + header.headerSize;
    for (;;) {
      const b = await bytesAt(pos, 3);
      if (!b) return undefined;
      const h = b[0] | (b[1] << 8) | (b[2] << 16);
      const type = (h >>> 1) & 3;
      if (type === 3) return undefined;
      pos += 3 + (type === 1 ? 1 : h >>> 3);
      if (h & 1) break;
    }
    pos += header.checksum ? 4 : 0;
    if (pos > size) return undefined;
    frames.push({
      packedOffset: at,
      packedLength: pos - at,
      offset,
      size: header.contentSize,
    });
    offset += header.contentSize;
    at = pos;
  }
  return Number.isSafeInteger(offset) ? frames : undefined;
}
