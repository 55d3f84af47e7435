/**
 * zstd: our decoder of `.zst` files and zstd frames (RFC 8878): any number
 * of frames, skippable frames between them, each frame's content checksum
 * (XXH64) and declared content size verified.
 *
 * Frames and block headers are walked here (so that each frame's window
 * is limited before anything is allocated, and a truncated file is named
 * as such); raw and RLE blocks are copied here; compressed blocks
 * (literals with their Huffman tables, sequences with their FSE tables,
 * repeat offsets) and the XXH64 are decoded by `_wasm/zstd.c`, written
 * from RFC 8878, in WebAssembly. There is no TypeScript twin: where
 * WebAssembly is missing altogether, zstd data is an UnsupportedError.
 * The window lives in the instance's memory: `window + min(max(4 *
 * window, 8 MiB), 32 MiB)` bytes, the last `window` bytes moved to the front when
 * the rest is used, so a stream holds at most its window and 32 MiB (a
 * frame whose content size fits in that much is decoded whole).
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

import { CodecError, UnsupportedError } from "../../streams/errors.ts";
import {
  acquireZstdWasm,
  releaseWasm,
  WASM_SLACK,
  type WasmInstance,
} from "./_wasm.ts";
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
    throw new UnsupportedError(
      {
        format: CODEC,
        field: "dictionary id",
        value: dictId,
        limit: "0 (frames made without a dictionary)",
      },
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

/** What each error of `_wasm/zstd.c` means (by its negated code). */
const BLOCK_ERRORS = [
  "",
  "literals section header truncated or past the block",
  "literals section regenerates more than 128 KiB",
  "Huffman tree description malformed or truncated",
  "Huffman weights do not make a complete prefix code of at most 12 bits",
  "treeless literals without an earlier Huffman table in the frame",
  "Huffman-coded literals corrupt (a stream that does not end on its first bit, or a bad jump table)",
  "sequences section header truncated",
  "sequences section sets the reserved bits of its modes",
  "FSE table description malformed (does not sum to its table size, or truncated)",
  "FSE table accuracy log over its limit (9 for lengths, 8 for offsets, 6 for Huffman weights)",
  "RLE sequence symbol over the largest code",
  "repeat table mode without an earlier table in the frame",
  "sequences bitstream corrupt (does not end on its first bit)",
  "sequences use more literals than the literals section holds",
  "decodes past its limit",
  "match offset reaches before the window or the frame's first byte",
  "more than 255 Huffman weights (coded with FSE: states that read no bits)",
  "bytes after a sequences section of no sequences",
];
const E_OUTPUT = 15;

/** The most linear memory of an instance given back for reuse after a stream. */
const KEEP_MEMORY = 16 << 20;

/** Decoded bytes handed out about this many at a time. */
const PIECE = 1 << 20;

const align8 = (n: number) => (n + 7) & ~7;

/** The bytes a stream's frame keeps: its window and room to decode ahead of it. */
function streamBufferSize(header: FrameHeader): number {
  const window = header.windowSize;
  // Room to decode ahead of the window before it moves back to the front:
  // 4 windows (at least 8 MiB, at most 32 MiB), so a move copies at most a
  // quarter of a byte per byte decoded where windows are small (it was 9%
  // of the time with one window of room).
  const ahead = Math.min(Math.max(4 * window, 8 << 20), 32 << 20);
  if (
    header.contentSize !== undefined && header.contentSize <= window + ahead
  ) {
    return header.contentSize;
  }
  return window + ahead;
}

/** An instance to decode with, or an UnsupportedError where none can run. */
async function zstdWasm(): Promise<WasmInstance> {
  const wasm = await acquireZstdWasm();
  if (!wasm) {
    throw new UnsupportedError(
      { format: CODEC, field: "runtime", value: "no WebAssembly" },
      "decoding zstd needs WebAssembly, which this runtime lacks",
    );
  }
  return wasm;
}

/**
 * One frame being decoded in a WebAssembly instance: the C context, one
 * block's input, and the output buffer (the window and what is decoded
 * ahead of it), laid out from the instance's heap base.
 */
class FrameDecoder {
  readonly #wasm: WasmInstance;
  readonly #header: FrameHeader;
  readonly #where: string;
  readonly #ctx: number;
  readonly #inAt: number;
  /** Where the output buffer starts in linear memory. */
  readonly outAt: number;
  readonly #bufferSize: number;
  readonly #blockMax: number;
  /** The most this frame may decode to, and what says so. */
  readonly #limit: number;
  readonly #limitReason: string;
  /** Where the next decoded byte goes in the buffer. */
  pos = 0;
  /** The first byte of the buffer not yet handed out (nor hashed). */
  #handed = 0;
  /** Bytes the frame has decoded. */
  produced = 0;

  constructor(
    wasm: WasmInstance,
    header: FrameHeader,
    where: string,
    bufferSize: number,
    limit = header.contentSize ?? Infinity,
    limitReason = `its content size ${header.contentSize}`,
  ) {
    this.#wasm = wasm;
    this.#header = header;
    this.#where = where;
    this.#bufferSize = bufferSize;
    this.#limit = limit;
    this.#limitReason = limitReason;
    this.#blockMax = Math.min(BLOCK_MAX, header.windowSize);
    const e = wasm.exports;
    this.#ctx = align8(wasm.heapBase);
    this.#inAt = align8(this.#ctx + e.zstd_ctx_size());
    this.outAt = align8(this.#inAt + BLOCK_MAX + WASM_SLACK);
    if (!wasm.ensure(this.outAt + bufferSize + WASM_SLACK)) {
      fail(
        `${where}: a window of ${header.windowSize} bytes does not fit in memory`,
      );
    }
    e.zstd_reset(this.#ctx);
    if (header.checksum) e.zstd_hash_reset(this.#ctx);
  }

  /** Decoded bytes not yet handed out. */
  get pending(): number {
    return this.pos - this.#handed;
  }

  /** The most the next block may decode to. */
  #room(): number {
    return Math.min(this.#blockMax, this.#limit - this.produced);
  }

  /** Whether the next block fits after `pos` (else: hand out, then {@linkcode move}). */
  hasRoom(): boolean {
    return this.pos + this.#room() <= this.#bufferSize;
  }

  /** Moves the window (the last bytes decoded) to the buffer's start. */
  move(): void {
    const keep = Math.min(this.#header.windowSize, this.pos);
    const at = this.outAt;
    this.#wasm.bytes.copyWithin(at, at + this.pos - keep, at + this.pos);
    this.pos = this.#handed = keep;
  }

  /**
   * Decodes one block of type 0 (raw), 1 (RLE) or 2 (compressed) whose
   * `size` bytes (1 for RLE) are `input[at...]`.
   */
  block(
    type: number,
    size: number,
    input: Uint8Array,
    at: number,
    block: number,
  ): void {
    const room = Math.min(this.#room(), this.#bufferSize - this.pos);
    const bytes = this.#wasm.bytes;
    const to = this.outAt + this.pos;
    let n: number;
    if (type !== 2) {
      if (size > room) this.#tooMuch(block, size);
      if (type === 0) bytes.set(input.subarray(at, at + size), to);
      else bytes.fill(input[at], to, to + size);
      n = size;
    } else {
      bytes.set(input.subarray(at, at + size), this.#inAt);
      n = this.#wasm.exports.zstd_block(
        this.#ctx,
        this.#inAt,
        size,
        to,
        room,
        Math.min(this.#header.windowSize, this.pos),
      );
      if (n < 0) {
        if (n === -E_OUTPUT) this.#tooMuch(block);
        fail(
          `${this.#where}: block ${block}: ${
            BLOCK_ERRORS[-n] ?? `error ${-n}`
          }`,
        );
      }
    }
    this.pos += n;
    this.produced += n;
  }

  #tooMuch(block: number, size?: number): never {
    const what = size === undefined ? "" : ` (${size} bytes)`;
    if (this.produced + this.#blockMax >= this.#limit) {
      fail(
        `${this.#where}: block ${block}${what} decodes to more than ${this.#limitReason}`,
      );
    }
    fail(
      `${this.#where}: block ${block}${what} decodes to more than the ${this.#blockMax} bytes a block holds`,
    );
  }

  /** Hands out (and hashes) the decoded bytes not yet handed out. */
  take(): Uint8Array {
    const from = this.outAt + this.#handed;
    const n = this.pos - this.#handed;
    if (this.#header.checksum && n) {
      this.#wasm.exports.zstd_hash_update(this.#ctx, from, n);
    }
    this.#handed = this.pos;
    return this.#wasm.bytes.subarray(from, from + n);
  }

  /** Checks the content size and (with `stored`) the checksum at the frame's end. */
  finish(stored: number | undefined): void {
    const size = this.#header.contentSize;
    if (size !== undefined && this.produced !== size) {
      fail(
        `${this.#where}: decodes to ${this.produced} bytes, its header declares ${size}`,
      );
    }
    if (stored !== undefined) {
      const computed = this.#wasm.exports.zstd_hash_low32(this.#ctx) >>> 0;
      if (stored !== computed) {
        fail(
          `${this.#where}: content checksum mismatch: stored 0x${
            stored.toString(16).padStart(8, "0")
          }, computed 0x${computed.toString(16).padStart(8, "0")}`,
        );
      }
    }
  }
}

/** Block header fields, checked against the frame's block limit. */
function blockHeader(
  b: Uint8Array,
  at: number,
  header: FrameHeader,
  where: string,
  block: number,
): { last: boolean; type: number; size: number; length: number } {
  const h = b[at] | (b[at + 1] << 8) | (b[at + 2] << 16);
  const type = (h >>> 1) & 3;
  const size = h >>> 3;
  if (type === 3) fail(`${where}: block ${block} has the reserved type 3`);
  const max = Math.min(BLOCK_MAX, header.windowSize);
  if (size > BLOCK_MAX || (type !== 1 && size > max)) {
    fail(
      `${where}: block ${block} of ${size} bytes is over the ${max} allowed`,
    );
  }
  return {
    last: (h & 1) === 1,
    type,
    size,
    length: 3 + (type === 1 ? 1 : size),
  };
}

/**
 * Decodes zstd frames (and skips skippable ones) as they arrive from
 * `feed`, yielding the content in order, about a MiB at a time. Each
 * frame's checksum and content size are verified as it ends (the last
 * piece of a frame is handed out only once they are); a frame that ends
 * early, a reserved block type, a block over 128 KiB, malformed entropy
 * tables or sequences, or a window over {@linkcode MAX_WINDOW} is a
 * {@linkcode CodecError}; a frame that needs a dictionary is an
 * {@linkcode UnsupportedError}.
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
  const wasm = await zstdWasm();
  try {
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
      feed.skip(header.headerSize);
      const d = new FrameDecoder(
        wasm,
        header,
        where,
        streamBufferSize(header),
      );
      for (let block = 1;; block++) {
        if ((await feed.ensure(3)) < 3) {
          fail(`${where}: block ${block} truncated`);
        }
        const h = blockHeader(feed.bytes, feed.start, header, where, block);
        const tail = h.last && header.checksum ? 4 : 0;
        if ((await feed.ensure(h.length + tail)) < h.length + tail) {
          fail(`${where}: block ${block} truncated`);
        }
        if (!d.hasRoom()) {
          // The window moves: hand out what precedes the move first.
          if (d.pending) yield d.take();
          d.move();
        }
        d.block(h.type, h.size, feed.bytes, feed.start + 3, block);
        const stored = tail
          ? le32(feed.bytes, feed.start + h.length)
          : undefined;
        feed.skip(h.length + tail);
        if (h.last) {
          const piece = d.take();
          d.finish(stored);
          if (piece.length) yield piece;
          break;
        }
        if (d.pending >= PIECE) yield d.take();
      }
    }
  } finally {
    // An instance grown for a big window is left to the garbage collector
    // rather than kept idle (a stream's buffer is up to 160 MiB).
    if (wasm.bytes.length <= KEEP_MEMORY) releaseWasm(wasm);
  }
}

/**
 * Decodes the zstd frame at the start of `input` into `out`. With
 * `partial` (a qcow2 cluster: QEMU reads a frame until the cluster is
 * full, whatever follows) decoding stops once `out` is full, and a frame
 * that ends before is an error; without, the frame must decode to exactly
 * `out.length` bytes and its checksum, when it has one, must match.
 *
 * A whole frame decodes through a window in WebAssembly memory (its
 * window and room to decode ahead, as {@linkcode decodeStreaming}), the
 * bytes copied out as the room fills: a 64 MiB frame of a `.zst` file
 * took 64 MiB of linear memory on each worker, too large to keep, and
 * V8 freed the instances late (a convert of such frames peaked at
 * 511 MiB). `input` may lie in the same buffer as `out` (a frame read
 * into the end of the buffer it decodes into): no byte of it is
 * overwritten before it is read, the rest of the frame being read from
 * a copy when a piece of output would reach it.
 *
 * @param input the frame (and, with `partial`, whatever follows it)
 * @param out where the content goes
 * @param partial stop once `out` is full
 * @returns the bytes of `input` the frame used (up to where decoding stopped)
 * @throws {CodecError} for a malformed or short frame
 *
 * @example
 * ```ts
 * import { decodeFrameInto } from "./zstd.ts";
 * // `printf 'hello\n' | zstd -c`:
 * const packed = new Uint8Array([
 *   0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x58, 0x31, 0x00, 0x00, 0x68, 0x65, 0x6c,
 *   0x6c, 0x6f, 0x0a, 0x53, 0x88, 0xbd, 0x91,
 * ]);
 * const out = new Uint8Array(6);
 * await decodeFrameInto(packed, out);
 * console.log(new TextDecoder().decode(out)); // hello
 * ```
 */
export async function decodeFrameInto(
  input: Uint8Array,
  out: Uint8Array,
  partial = false,
): Promise<number> {
  const where = "frame";
  if (input.length < 4 || le32(input, 0) !== FRAME_MAGIC) {
    fail("not a zstd frame (bad magic)");
  }
  const header = parseFrameHeader(input, 0, input.length, where);
  const wasm = await zstdWasm();
  try {
    let limit = out.length;
    let reason = `the ${out.length} bytes expected`;
    if (partial) {
      limit = header.contentSize ?? Infinity;
      reason = `its content size ${header.contentSize}`;
    } else if (header.contentSize !== undefined) {
      if (header.contentSize !== out.length) {
        fail(
          `${where}: declares ${header.contentSize} bytes of content, not the ${out.length} expected`,
        );
      }
    }
    const bufferSize = partial
      ? out.length + BLOCK_MAX
      : Math.min(out.length, streamBufferSize(header));
    const d = new FrameDecoder(wasm, header, where, bufferSize, limit, reason);
    // The frame is read from `src` (`input`, or a copy of its rest), whose
    // byte 0 is byte `base` of `input`.
    let src = input;
    let base = 0;
    let at = header.headerSize;
    let written = 0;
    /** Copies the decoded bytes not yet copied out to `out`. */
    const copyOut = () => {
      const piece = d.take();
      const n = Math.min(piece.length, out.length - written);
      if (n === 0) return;
      if (src === input && overlaps(out, written, n, input, at)) {
        src = input.slice(at);
        base = at;
        at = 0;
      }
      out.set(piece.subarray(0, n), written);
      written += n;
    };
    for (let block = 1;; block++) {
      if (partial && d.pos >= out.length) break;
      if (at + 3 > src.length) fail(`${where}: block ${block} truncated`);
      const h = blockHeader(src, at, header, where, block);
      const tail = h.last && header.checksum ? 4 : 0;
      if (at + h.length + tail > src.length) {
        fail(`${where}: block ${block} truncated`);
      }
      if (!partial && !d.hasRoom()) {
        copyOut();
        d.move();
      }
      d.block(h.type, h.size, src, at + 3, block);
      at += h.length + tail;
      if (h.last) {
        const stored = tail ? le32(src, at - 4) : undefined;
        copyOut();
        d.finish(stored);
        if (written < out.length) {
          fail(
            `${where}: decodes to ${written} bytes, not the ${out.length} expected`,
          );
        }
        break;
      }
    }
    if (partial) copyOut();
    return base + at;
  } finally {
    releaseWasm(wasm);
  }
}

/**
 * Whether writing `n` bytes at `out[at]` would overwrite `input` from
 * `input[from]` on (the two views lying in one buffer).
 */
function overlaps(
  out: Uint8Array,
  at: number,
  n: number,
  input: Uint8Array,
  from: number,
): boolean {
  if (out.buffer !== input.buffer) return false;
  const writeStart = out.byteOffset + at;
  const readStart = input.byteOffset + from;
  return writeStart < input.byteOffset + input.length &&
    readStart < writeStart + n;
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
 * @param read reads bytes of the file (each piece is used only until the
 * next read: the reader may hand out views of one buffer it reuses)
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
