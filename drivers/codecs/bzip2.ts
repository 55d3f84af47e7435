/**
 * bzip2: a decoder for whole `.bz2` streams (one or several concatenated,
 * as dmg UDBZ chunks and `cat a.bz2 b.bz2` make them) that checks every
 * block CRC and stream CRC, and a compressor (run-length, Burrows-Wheeler,
 * move-to-front, multi-table Huffman) whose output `bzip2 -d` accepts.
 *
 * Written here rather than taken from npm: the JavaScript bzip2 readers
 * (seek-bzip, unbzip2-stream, compressjs, bzip2) are unmaintained, decode
 * bit by bit through generic readers, and some refuse valid streams that
 * declare more than 18002 selectors (lbzip2 wrote such streams; bzip2 1.0.8
 * accepts them). None of them compresses except compressjs, whose output
 * is not byte-compatible with every bzip2 decoder.
 *
 * The stream framing (header, block magics and stored CRCs, end magic and
 * stream CRC) is read here; each block is decoded by `_wasm/bzip2.c` in
 * WebAssembly (Huffman tables and selectors, symbols, move-to-front, the
 * inverse Burrows-Wheeler transform, the run-length step and the block
 * CRC). There is no TypeScript twin: where WebAssembly is missing
 * altogether, decoding bzip2 is an UnsupportedError. An instance holds
 * about 16 MiB: the block's links (8.1 MB for a level-9 block), a 4 MiB
 * window of input and a 4 MiB window of output, whatever the stream's
 * size.
 *
 * The stream, as bzip2 1.0.x writes it (bits are read most significant
 * first; no field is byte-aligned except the stream header):
 *
 * | bits        | field                                                     |
 * | ----------- | --------------------------------------------------------- |
 * | 32          | `BZh` and the level `1`..`9` (block size = level × 100 000) |
 * | per block:  |                                                           |
 * | 48          | block magic 0x314159265359                                |
 * | 32          | block CRC (CRC-32, polynomial 0x04c11db7, not reflected)  |
 * | 1           | randomised (only bzip2 0.9.0 set it; refused here)         |
 * | 24          | origPtr: the row of the original string after sorting     |
 * | 16 + 16 × n | the bytes in use: a 16-bit map of 16-byte ranges, then one 16-bit map per range |
 * | 3           | nGroups: Huffman tables, 2..6                             |
 * | 15          | nSelectors: one per 50 symbols, each move-to-front coded in unary |
 * | ...         | code lengths of each table, delta coded, 1..20            |
 * | ...         | the symbols: RUNA/RUNB zero runs, MTF indexes, end of block |
 * | at the end: |                                                           |
 * | 48          | end magic 0x177245385090                                  |
 * | 32          | stream CRC: each block CRC folded in by rotate-left-1 and xor |
 * | 0..7        | padding to a byte                                         |
 *
 * This module is browser compatible.
 *
 * @module
 */

import { CodecError, UnsupportedError } from "../../streams/errors.ts";
import type { ByteFeed } from "./_feed.ts";
import {
  acquireWasmAlways,
  releaseWasm,
  WASM_SLACK,
  type WasmInstance,
} from "./_wasm.ts";

const CODEC = "bzip2";

/** bzip2's CRC-32 table (polynomial 0x04c11db7, most significant bit first). */
const CRC_TABLE: Int32Array = (() => {
  const t = new Int32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i << 24;
    for (let k = 0; k < 8; k++) {
      c = c & 0x80000000 ? (c << 1) ^ 0x04c11db7 : c << 1;
    }
    t[i] = c;
  }
  return t;
})();

/** Symbols per selector. */
const GROUP_SIZE = 50;
/** Longest code length the format allows (the compressor keeps to 17). */
const MAX_CODE_LENGTH = 20;

function fail(message: string): never {
  throw new CodecError(CODEC, message);
}

/** A most-significant-bit-first reader over the input (the framing only). */
interface BitReader {
  input: Uint8Array;
  /** Next byte to load. */
  pos: number;
  /** Buffered bits (the low `count` bits are valid). */
  buf: number;
  count: number;
}

/** Reads `n` (at most 24) bits. */
function bits(r: BitReader, n: number): number {
  while (r.count < n) {
    if (r.pos >= r.input.length) fail("truncated stream");
    r.buf = (r.buf << 8) | r.input[r.pos++];
    r.count += 8;
  }
  r.count -= n;
  return (r.buf >>> r.count) & ((1 << n) - 1);
}

function bits32(r: BitReader): number {
  return ((bits(r, 16) << 16) | bits(r, 16)) >>> 0;
}

/** Where one stream's decoding has got to. */
interface Output {
  out: Uint8Array;
  length: number;
}

/**
 * Compressed bytes one block can take at most: 900 000 symbols of at most
 * 20 bits, plus the tables, rounded up. The streaming decoder buffers this
 * much ahead of each block.
 */
const MAX_BLOCK_BYTES = 4 << 20;
/**
 * Input the streaming decoder copies into linear memory for a block at
 * first (its window moves every block; a level-9 block of text takes
 * about 0.25 MB). A block that needs more (one of incompressible bytes
 * takes about 0.9 MB) is decoded again from a window of
 * {@linkcode MAX_BLOCK_BYTES}.
 */
const FIRST_WINDOW = 512 << 10;
/** Output bytes taken out of linear memory per call. */
const OUT_WINDOW = 4 << 20;
/** The largest block, level 9. */
const LARGEST_LEVEL = 9;

/** The messages of `bz2_block`'s error codes (`a`, `b`: its details). */
const BLOCK_ERRORS: Record<number, (a: number, b: number) => string> = {
  [-1]: () => "truncated stream",
  [-2]: () =>
    "randomised blocks (written only by bzip2 0.9.0) are not supported",
  [-3]: () => "a block uses no byte values",
  [-4]: (a) => `nGroups ${a} must be 2..6`,
  [-5]: () => "nSelectors 0 must be at least 1",
  [-6]: (a, b) => `selector ${a} names a table past ${b}`,
  [-7]: (a, b) => `table ${a} code length ${b} must be 1..20`,
  [-8]: (a) => `table ${a}: Huffman code lengths are oversubscribed`,
  [-9]: () => "invalid Huffman code",
  [-10]: () => "more symbols than selectors",
  [-11]: () => "a run is longer than the block",
  [-12]: (a) => `block longer than ${a} bytes`,
  [-13]: (a, b) => `origPtr ${a} is past the block's ${b} bytes`,
};

/**
 * One WebAssembly instance laid out for bzip2: the C block decoder's work
 * area (links and bytes of the largest block), a window of the input, and
 * a window of output, in that order from the heap base.
 */
class BlockDecoder {
  readonly wasm: WasmInstance;
  readonly #workAt: number;
  readonly #inAt: number;
  readonly #outAt: number;
  /** The input whose bytes `[winStart, winStart + winLength)` are at `#inAt`. */
  #source: Uint8Array | undefined;
  #winStart = 0;
  #winLength = 0;

  constructor(wasm: WasmInstance) {
    this.wasm = wasm;
    const e = wasm.exports;
    this.#workAt = align8(wasm.heapBase);
    this.#inAt = align8(this.#workAt + e.bz2_work_size(LARGEST_LEVEL));
    this.#outAt = align8(this.#inAt + MAX_BLOCK_BYTES + WASM_SLACK);
    if (!wasm.ensure(this.#outAt + OUT_WINDOW + WASM_SLACK)) {
      fail("no memory for the block decoder");
    }
  }

  /** Forgets the input window (the caller's bytes moved). */
  forget(): void {
    this.#source = undefined;
  }

  /**
   * Makes `input[from, from + want)` visible at the window, copying
   * `window` bytes (at least `want`) from `from` when it is not.
   */
  #load(input: Uint8Array, from: number, want: number, window: number) {
    if (
      this.#source === input && from >= this.#winStart &&
      from + want <= this.#winStart + this.#winLength
    ) return;
    const length = Math.min(input.length - from, Math.max(want, window));
    const bytes = this.wasm.bytes;
    bytes.set(input.subarray(from, from + length), this.#inAt);
    // The C bit reader loads 8 bytes at a time: zeros after the end.
    bytes.fill(0, this.#inAt + length, this.#inAt + length + WASM_SLACK);
    this.#source = input;
    this.#winStart = from;
    this.#winLength = length;
  }

  /**
   * Decodes the block whose header starts at bit `bitAt` of `input` (just
   * after its stored CRC) onto the end of `o`, answering the bit where the
   * block ends and the block's CRC.
   */
  block(
    input: Uint8Array,
    bitAt: number,
    level: number,
    o: Output,
    window: number,
  ): { end: number; crc: number } {
    const e = this.wasm.exports;
    const from = Math.floor(bitAt / 8);
    let want = Math.min(input.length - from, FIRST_WINDOW);
    let status: number;
    for (;;) {
      this.#load(input, from, want, window);
      const at = this.#inAt + (from - this.#winStart);
      const n = this.#winStart + this.#winLength - from;
      status = e.bz2_block(at, n, bitAt & 7, level, this.#workAt);
      // Truncated in the window, but not in the input: a longer window.
      if (status !== -1 || n >= input.length - from || n >= MAX_BLOCK_BYTES) {
        break;
      }
      want = Math.min(input.length - from, MAX_BLOCK_BYTES);
    }
    if (status < 0) {
      const message = BLOCK_ERRORS[status];
      fail(
        message
          ? message(e.bz2_detail_a(), e.bz2_detail_b())
          : `error ${status}`,
      );
    }
    const end = from * 8 + e.bz2_bitpos();
    e.bz2_bwt();
    const out = o.out;
    while (!e.bz2_done()) {
      const room = Math.min(OUT_WINDOW, out.length - o.length);
      if (room === 0) tooLong(out.length);
      const wrote = e.bz2_output(this.#outAt, room);
      out.set(
        this.wasm.bytes.subarray(this.#outAt, this.#outAt + wrote),
        o.length,
      );
      o.length += wrote;
    }
    return { end, crc: e.bz2_crc() >>> 0 };
  }
}

function align8(n: number): number {
  return (n + 7) & ~7;
}

/** An instance to decode with, or an UnsupportedError where none can run. */
async function blockDecoder(): Promise<BlockDecoder> {
  const wasm = await acquireWasmAlways();
  if (!wasm) {
    throw new UnsupportedError(
      { format: CODEC, field: "runtime", value: "no WebAssembly" },
      "decoding bzip2 needs WebAssembly, which this runtime lacks",
    );
  }
  try {
    return new BlockDecoder(wasm);
  } catch (e) {
    releaseWasm(wasm);
    throw e;
  }
}

function tooLong(limit: number): never {
  fail(`decodes to more than the declared ${limit} bytes`);
}

/**
 * Decodes one or more concatenated bzip2 streams to exactly `expectedSize`
 * bytes, checking every block CRC and stream CRC; stops with a
 * {@linkcode CodecError} as soon as the output would pass `expectedSize`.
 *
 * @param input the compressed bytes (zero bytes after the last stream are allowed)
 * @param expectedSize how many bytes the streams must decode to
 * @returns the decoded bytes
 *
 * @example
 * ```ts
 * import { decode, encode } from "./bzip2.ts";
 * const text = new TextEncoder().encode("hello hello hello hello");
 * const packed = await encode(text);
 * console.log(new TextDecoder().decode(await decode(packed, text.length)));
 * ```
 */
export async function decode(
  input: Uint8Array,
  expectedSize: number,
): Promise<Uint8Array> {
  checkSize(expectedSize);
  let out: Uint8Array;
  try {
    out = new Uint8Array(expectedSize);
  } catch {
    fail(`expected size ${expectedSize} cannot be allocated`);
  }
  await decodeInto(input, out);
  return out;
}

function checkSize(expectedSize: number): void {
  if (!Number.isSafeInteger(expectedSize) || expectedSize < 0) {
    fail(`expected size ${expectedSize} is not a byte count`);
  }
}

/**
 * Decodes one or more concatenated bzip2 streams into `out`, which they
 * must fill exactly (the checks of {@linkcode decode}, whose
 * `expectedSize` is `out.length`). No array is made for the output: the
 * dmg reader decodes chunks straight into the caller's buffer.
 *
 * @param input the compressed bytes (zero bytes after the last stream are allowed)
 * @param out where the bytes go; all of it is filled
 *
 * @example
 * ```ts
 * import { decodeInto, encode } from "./bzip2.ts";
 * const out = new Uint8Array(1000);
 * await decodeInto(await encode(new Uint8Array(1000).fill(7)), out);
 * console.log(out[999]); // 7
 * ```
 */
export async function decodeInto(
  input: Uint8Array,
  out: Uint8Array,
): Promise<void> {
  const d = await blockDecoder();
  try {
    decodeStreams(d, input, out);
  } finally {
    releaseWasm(d.wasm);
  }
}

function decodeStreams(
  d: BlockDecoder,
  input: Uint8Array,
  out: Uint8Array,
): void {
  const o: Output = { out, length: 0 };
  let pos = 0;
  for (let stream = 0;; stream++) {
    if (stream > 0) {
      // After a stream: the end of the input, zero padding, or another stream.
      let rest = pos;
      while (rest < input.length && input[rest] === 0) rest++;
      if (rest === input.length) break;
    }
    if (
      input.length - pos < 4 || input[pos] !== 0x42 ||
      input[pos + 1] !== 0x5a || input[pos + 2] !== 0x68 ||
      input[pos + 3] < 0x31 || input[pos + 3] > 0x39
    ) {
      fail(
        stream === 0
          ? "not a bzip2 stream (no BZh1..BZh9 header)"
          : `unexpected bytes after stream ${stream} at byte ${pos}`,
      );
    }
    const level = input[pos + 3] - 0x30;
    const r: BitReader = { input, pos: pos + 4, buf: 0, count: 0 };
    let combined = 0;
    for (let block = 0;; block++) {
      const high = bits(r, 24);
      const low = bits(r, 24);
      if (high === 0x314159 && low === 0x265359) {
        const stored = bits32(r);
        const computed = checkedBlock(
          d,
          r,
          level,
          o,
          stored,
          stream,
          block,
          MAX_BLOCK_BYTES,
        );
        combined = (((combined << 1) | (combined >>> 31)) ^ computed) >>> 0;
      } else if (high === 0x177245 && low === 0x385090) {
        const stored = bits32(r);
        if (stored !== combined) {
          fail(
            `stream ${stream + 1}: stream CRC mismatch: stored ${
              hex(stored)
            }, computed ${hex(combined)}`,
          );
        }
        break;
      } else {
        fail(
          `stream ${stream + 1}: bad block magic ${hex(high)}${
            hex(low).slice(2)
          }`,
        );
      }
    }
    // The padding bits left in the reader belong to the stream's last byte.
    pos = r.pos;
  }
  if (o.length !== out.length) {
    fail(`decodes to ${o.length} bytes, ${out.length} declared`);
  }
}

/**
 * Decodes bzip2 streams (one or several concatenated, zero bytes allowed
 * after the last) as they arrive from `feed`, yielding each block's output
 * once its CRC has passed; a piece is only valid until the next is asked
 * for. Memory: 4 MiB of input ahead and one block's output (at most
 * 46.6 MB, a block of nothing but runs), besides the WebAssembly
 * instance. The stream CRCs are checked before the generator finishes.
 *
 * @param feed the compressed bytes
 * @returns the decoded bytes, block by block
 *
 * @example
 * ```ts
 * import { decodeStreaming, encode } from "./bzip2.ts";
 * import { ByteFeed } from "./_feed.ts";
 * let packed: Uint8Array | null = await encode(new Uint8Array(5000).fill(9));
 * const feed = new ByteFeed(() => Promise.resolve([packed, packed = null][0]));
 * let total = 0;
 * for await (const piece of decodeStreaming(feed)) total += piece.length;
 * console.log(total); // 5000
 * ```
 */
export async function* decodeStreaming(
  feed: ByteFeed,
): AsyncGenerator<Uint8Array> {
  let o: Output | undefined;
  for (let stream = 0;; stream++) {
    if (stream > 0) {
      // After a stream: the end of the input, zero padding, or another stream.
      while ((await feed.ensure(1)) > 0) {
        // Whole buffered runs of zeros at a time, not a byte per await.
        let k = feed.start;
        while (k < feed.end && feed.bytes[k] === 0) k++;
        const more = k === feed.end;
        feed.skip(k - feed.start);
        if (!more) break;
      }
      if (feed.available === 0) return;
    }
    await feed.ensure(4);
    const b = feed.bytes;
    const p = feed.start;
    if (
      feed.available < 4 || b[p] !== 0x42 || b[p + 1] !== 0x5a ||
      b[p + 2] !== 0x68 || b[p + 3] < 0x31 || b[p + 3] > 0x39
    ) {
      fail(
        stream === 0
          ? "not a bzip2 stream (no BZh1..BZh9 header)"
          : `unexpected bytes after stream ${stream} at byte ${feed.consumed}`,
      );
    }
    const level = b[p + 3] - 0x30;
    // The most one block decodes to: every 5 symbols 4 equal bytes and a
    // run of 255 more.
    const most = Math.ceil(level * 100000 / 5) * 259;
    if (!o || o.out.length < most) o = { out: new Uint8Array(most), length: 0 };
    feed.skip(4);
    const r: BitReader = {
      input: feed.bytes,
      pos: feed.start,
      buf: 0,
      count: 0,
    };
    let combined = 0;
    for (let block = 0;; block++) {
      // Rebase the reader on the feed with a whole block ahead; the bits
      // it holds stay with it.
      feed.skip(r.pos - feed.start);
      await feed.ensure(MAX_BLOCK_BYTES);
      r.input = feed.bytes.subarray(0, feed.end);
      r.pos = feed.start;
      const high = bits(r, 24);
      const low = bits(r, 24);
      if (high === 0x314159 && low === 0x265359) {
        const stored = bits32(r);
        o.length = 0;
        // An instance per block: none is held while the consumer has the
        // piece (it may never ask for the next).
        const d = await blockDecoder();
        let computed: number;
        try {
          computed = checkedBlock(
            d,
            r,
            level,
            o,
            stored,
            stream,
            block,
            FIRST_WINDOW,
          );
        } finally {
          releaseWasm(d.wasm);
        }
        combined = (((combined << 1) | (combined >>> 31)) ^ computed) >>> 0;
        yield o.out.subarray(0, o.length);
      } else if (high === 0x177245 && low === 0x385090) {
        const stored = bits32(r);
        if (stored !== combined) {
          fail(
            `stream ${stream + 1}: stream CRC mismatch: stored ${
              hex(stored)
            }, computed ${hex(combined)}`,
          );
        }
        break;
      } else {
        fail(
          `stream ${stream + 1}: bad block magic ${hex(high)}${
            hex(low).slice(2)
          }`,
        );
      }
    }
    // The padding bits left in the reader belong to the stream's last byte.
    feed.skip(r.pos - feed.start);
  }
}

/**
 * Decodes one block (the reader is just after its stored CRC) onto the
 * end of `o` and checks its CRC against `stored`, leaving the reader
 * after the block; an error names the stream and block (counted from 0
 * here, from 1 in messages).
 */
function checkedBlock(
  d: BlockDecoder,
  r: BitReader,
  level: number,
  o: Output,
  stored: number,
  stream: number,
  block: number,
  window: number,
): number {
  let computed: number;
  try {
    const { end, crc } = d.block(
      r.input,
      r.pos * 8 - r.count,
      level,
      o,
      window,
    );
    computed = crc;
    r.pos = Math.floor(end / 8);
    r.buf = 0;
    r.count = 0;
    if (end & 7) bits(r, end & 7);
  } catch (e) {
    if (!(e instanceof CodecError)) throw e;
    fail(
      `stream ${stream + 1} block ${block + 1}: ${
        e.message.slice(CODEC.length + 2)
      }`,
    );
  }
  if (computed !== stored) {
    fail(
      `stream ${stream + 1} block ${block + 1}: CRC mismatch: stored ${
        hex(stored)
      }, computed ${hex(computed)}`,
    );
  }
  return computed;
}

function hex(n: number): string {
  return `0x${n.toString(16).padStart(8, "0")}`;
}

// ---------------------------------------------------------------------------
// Compression.

/** A most-significant-bit-first writer into a growing buffer. */
class BitWriter {
  #out: Uint8Array;
  #pos = 0;
  #acc = 0;
  #count = 0;

  constructor(capacity: number) {
    this.#out = new Uint8Array(Math.max(64, capacity));
  }

  /** Writes the low `n` (at most 24) bits of `value`. */
  put(n: number, value: number): void {
    this.#acc = (this.#acc << n) | value;
    this.#count += n;
    if (this.#count >= 8) {
      if (this.#pos + 4 > this.#out.length) {
        const grown = new Uint8Array(this.#out.length * 2);
        grown.set(this.#out);
        this.#out = grown;
      }
      while (this.#count >= 8) {
        this.#count -= 8;
        this.#out[this.#pos++] = this.#acc >>> this.#count;
      }
      this.#acc &= (1 << this.#count) - 1;
    }
  }

  put32(value: number): void {
    this.put(16, value >>> 16);
    this.put(16, value & 0xffff);
  }

  /** Pads to a byte and returns the bytes. */
  finish(): Uint8Array {
    if (this.#count > 0) this.put(8 - this.#count, 0);
    return this.#out.subarray(0, this.#pos);
  }
}

/**
 * Sorts the rotations of `s[0, n)` by prefix doubling (ranks of 2k-long
 * prefixes from pairs of k-long ones, each round a counting sort), so the
 * time stays O(n log n) even on repetitive data. Equal rotations (a
 * periodic block) may come in any order: they end in the same byte.
 */
function sortRotations(s: Uint8Array, n: number): Int32Array {
  const sa = new Int32Array(n);
  const second = new Int32Array(n);
  let rank = new Int32Array(n);
  let next = new Int32Array(n);
  const counts = new Int32Array(Math.max(257, n + 1));
  for (let i = 0; i < n; i++) counts[s[i] + 1]++;
  for (let i = 1; i <= 256; i++) counts[i] += counts[i - 1];
  for (let i = 0; i < n; i++) sa[counts[s[i]]++] = i;
  for (let i = 0; i < n; i++) rank[i] = s[i];
  let classes = 256;
  for (let k = 1; k < n; k <<= 1) {
    // Sorted by the second half: rotation i's second half starts at i + k.
    for (let j = 0; j < n; j++) {
      let i = sa[j] - k;
      if (i < 0) i += n;
      second[j] = i;
    }
    // Stable counting sort by the first half.
    counts.fill(0, 0, classes + 1);
    for (let i = 0; i < n; i++) counts[rank[i] + 1]++;
    for (let i = 1; i <= classes; i++) counts[i] += counts[i - 1];
    for (let j = 0; j < n; j++) {
      const i = second[j];
      sa[counts[rank[i]]++] = i;
    }
    // New ranks: equal when both halves are.
    let r = 0;
    next[sa[0]] = 0;
    for (let j = 1; j < n; j++) {
      const a = sa[j - 1];
      const b = sa[j];
      let a2 = a + k;
      if (a2 >= n) a2 -= n;
      let b2 = b + k;
      if (b2 >= n) b2 -= n;
      if (rank[a] !== rank[b] || rank[a2] !== rank[b2]) r++;
      next[b] = r;
    }
    const swap = rank;
    rank = next;
    next = swap;
    classes = r + 1;
    if (classes === n) break;
  }
  return sa;
}

/**
 * Huffman code lengths for `freq` no longer than `maxLength`: built with a
 * heap and, while too deep, rebuilt from flattened frequencies (bzip2's
 * own remedy). Every symbol gets a code, used or not.
 */
function codeLengths(
  freq: Int32Array,
  alphaSize: number,
  maxLength: number,
  lengths: Uint8Array,
): void {
  const weight = new Float64Array(alphaSize * 2);
  const parent = new Int32Array(alphaSize * 2);
  const heap = new Int32Array(alphaSize * 2 + 1);
  for (let i = 0; i < alphaSize; i++) weight[i] = Math.max(1, freq[i]) * 256;
  for (;;) {
    let size = 0;
    const push = (node: number) => {
      let at = ++size;
      while (at > 1 && weight[heap[at >> 1]] > weight[node]) {
        heap[at] = heap[at >> 1];
        at >>= 1;
      }
      heap[at] = node;
    };
    const pop = (): number => {
      const top = heap[1];
      const last = heap[size--];
      let at = 1;
      for (;;) {
        let child = at * 2;
        if (child > size) break;
        if (child < size && weight[heap[child + 1]] < weight[heap[child]]) {
          child++;
        }
        if (weight[heap[child]] >= weight[last]) break;
        heap[at] = heap[child];
        at = child;
      }
      heap[at] = last;
      return top;
    };
    for (let i = 0; i < alphaSize; i++) push(i);
    let nodes = alphaSize;
    while (size > 1) {
      const a = pop();
      const b = pop();
      parent[a] = parent[b] = nodes;
      // Ties prefer the shallower tree (depth kept in the low 8 bits).
      const depth = Math.max(weight[a] % 256, weight[b] % 256) + 1;
      weight[nodes] = Math.floor(weight[a] / 256) * 256 +
        Math.floor(weight[b] / 256) * 256 + depth;
      push(nodes++);
    }
    const root = nodes - 1;
    let deepest = 0;
    for (let i = 0; i < alphaSize; i++) {
      let depth = 0;
      for (let at = i; at !== root; at = parent[at]) depth++;
      lengths[i] = depth;
      if (depth > deepest) deepest = depth;
    }
    if (deepest <= maxLength) return;
    for (let i = 0; i < alphaSize; i++) {
      weight[i] = (1 + Math.floor(Math.floor(weight[i] / 256) / 2)) * 256;
    }
  }
}

/** The longest code the compressor makes (as bzip2's own, below the format's 20). */
const ENCODE_MAX_LENGTH = 17;

/** Compresses one block (already run-length coded) and writes it. */
function writeBlock(
  w: BitWriter,
  block: Uint8Array,
  n: number,
  crc: number,
): void {
  // Burrows-Wheeler: the byte before each sorted rotation.
  const sa = sortRotations(block, n);
  const last = new Uint8Array(n);
  let origPtr = -1;
  for (let j = 0; j < n; j++) {
    const i = sa[j];
    if (i === 0) origPtr = j;
    last[j] = block[i === 0 ? n - 1 : i - 1];
  }

  // The bytes in use, renumbered densely.
  const inUse = new Uint8Array(256);
  for (let i = 0; i < n; i++) inUse[block[i]] = 1;
  const unseqToSeq = new Uint8Array(256);
  let nInUse = 0;
  for (let b = 0; b < 256; b++) if (inUse[b]) unseqToSeq[b] = nInUse++;
  const alphaSize = nInUse + 2;
  const endOfBlock = nInUse + 1;

  // Move-to-front, zero runs as RUNA/RUNB digits.
  const symbols = new Uint16Array(n * 2 + 1);
  const freq = new Int32Array(alphaSize);
  let nSymbols = 0;
  const mtf = new Uint8Array(256);
  for (let i = 0; i < 256; i++) mtf[i] = i;
  let zeros = 0;
  const flushZeros = () => {
    while (zeros > 0) {
      const digit = (zeros & 1) ? 0 : 1;
      symbols[nSymbols++] = digit;
      freq[digit]++;
      zeros = (zeros - 1 - digit) >> 1;
    }
  };
  for (let i = 0; i < n; i++) {
    const v = unseqToSeq[last[i]];
    if (mtf[0] === v) {
      zeros++;
      continue;
    }
    flushZeros();
    let j = 1;
    while (mtf[j] !== v) j++;
    mtf.copyWithin(1, 0, j);
    mtf[0] = v;
    symbols[nSymbols++] = j + 1;
    freq[j + 1]++;
  }
  flushZeros();
  symbols[nSymbols++] = endOfBlock;
  freq[endOfBlock]++;

  // Tables: as many as the block is worth; start from slices of the
  // alphabet of equal total frequency, then refine by letting each group
  // of 50 symbols pick its cheapest table.
  const nGroups = nSymbols < 200
    ? 2
    : nSymbols < 600
    ? 3
    : nSymbols < 1200
    ? 4
    : nSymbols < 2400
    ? 5
    : 6;
  const lengths: Uint8Array[] = [];
  for (let t = 0; t < nGroups; t++) lengths.push(new Uint8Array(alphaSize));
  {
    let remaining = nSymbols;
    let lo = 0;
    for (let t = nGroups; t > 0; t--) {
      const target = remaining / t;
      let hi = lo - 1;
      let sum = 0;
      while (sum < target && hi < alphaSize - 1) sum += freq[++hi];
      const l = lengths[t - 1];
      for (let s = 0; s < alphaSize; s++) l[s] = s >= lo && s <= hi ? 0 : 15;
      lo = hi + 1;
      remaining -= sum;
    }
  }
  const nSelectors = Math.ceil(nSymbols / GROUP_SIZE);
  const selectors = new Uint8Array(nSelectors);
  const tableFreq: Int32Array[] = [];
  for (let t = 0; t < nGroups; t++) tableFreq.push(new Int32Array(alphaSize));
  const cost = new Int32Array(nGroups);
  for (let iteration = 0; iteration < 4; iteration++) {
    for (const f of tableFreq) f.fill(0);
    for (let g = 0; g < nSelectors; g++) {
      const from = g * GROUP_SIZE;
      const to = Math.min(from + GROUP_SIZE, nSymbols);
      cost.fill(0);
      for (let i = from; i < to; i++) {
        const s = symbols[i];
        for (let t = 0; t < nGroups; t++) cost[t] += lengths[t][s];
      }
      let best = 0;
      for (let t = 1; t < nGroups; t++) if (cost[t] < cost[best]) best = t;
      selectors[g] = best;
      const f = tableFreq[best];
      for (let i = from; i < to; i++) f[symbols[i]]++;
    }
    for (let t = 0; t < nGroups; t++) {
      codeLengths(tableFreq[t], alphaSize, ENCODE_MAX_LENGTH, lengths[t]);
    }
  }

  // Canonical codes, as the decoder rebuilds them.
  const codes: Int32Array[] = lengths.map((l) => {
    const code = new Int32Array(alphaSize);
    let next = 0;
    for (let len = 1; len <= MAX_CODE_LENGTH; len++) {
      for (let s = 0; s < alphaSize; s++) if (l[s] === len) code[s] = next++;
      next <<= 1;
    }
    return code;
  });

  // The block header.
  w.put(24, 0x314159);
  w.put(24, 0x265359);
  w.put32(crc);
  w.put(1, 0);
  w.put(24, origPtr);
  let ranges = 0;
  for (let i = 0; i < 16; i++) {
    for (let j = 0; j < 16; j++) if (inUse[i * 16 + j]) ranges |= 0x8000 >>> i;
  }
  w.put(16, ranges);
  for (let i = 0; i < 16; i++) {
    if (!(ranges & (0x8000 >>> i))) continue;
    let used = 0;
    for (let j = 0; j < 16; j++) if (inUse[i * 16 + j]) used |= 0x8000 >>> j;
    w.put(16, used);
  }
  w.put(3, nGroups);
  w.put(15, nSelectors);
  const groupMtf = [0, 1, 2, 3, 4, 5];
  for (let i = 0; i < nSelectors; i++) {
    let j = groupMtf.indexOf(selectors[i]);
    for (let k = 0; k < j; k++) w.put(1, 1);
    w.put(1, 0);
    for (; j > 0; j--) groupMtf[j] = groupMtf[j - 1];
    groupMtf[0] = selectors[i];
  }
  for (let t = 0; t < nGroups; t++) {
    const l = lengths[t];
    let current = l[0];
    w.put(5, current);
    for (let s = 0; s < alphaSize; s++) {
      while (current < l[s]) {
        w.put(2, 2);
        current++;
      }
      while (current > l[s]) {
        w.put(2, 3);
        current--;
      }
      w.put(1, 0);
    }
  }
  for (let g = 0; g < nSelectors; g++) {
    const l = lengths[selectors[g]];
    const code = codes[selectors[g]];
    const to = Math.min((g + 1) * GROUP_SIZE, nSymbols);
    for (let i = g * GROUP_SIZE; i < to; i++) {
      const s = symbols[i];
      w.put(l[s], code[s]);
    }
  }
}

/**
 * Compresses `input` as one bzip2 stream with 900 kB blocks (`bzip2 -9`).
 *
 * @param input the bytes
 * @returns the `.bz2` stream
 *
 * @example
 * ```ts
 * import { encode } from "./bzip2.ts";
 * const packed = await encode(new Uint8Array(100000));
 * console.log(packed.length < 100); // true
 * ```
 */
export function encode(input: Uint8Array): Promise<Uint8Array> {
  return Promise.resolve(encodeStream(input));
}

function encodeStream(input: Uint8Array): Uint8Array {
  const level = 9;
  // bzip2 leaves 19 bytes of slack below level × 100 000.
  const blockMax = level * 100000 - 19;
  const w = new BitWriter(Math.floor(input.length * 1.02) + 64);
  w.put(24, 0x425a68);
  w.put(8, 0x30 + level);
  const block = new Uint8Array(blockMax);
  let combined = 0;
  let at = 0;
  while (at < input.length) {
    // Runs of 4 to 255 equal bytes become 4 bytes and a count.
    let n = 0;
    let crc = -1;
    while (at < input.length && n + 5 <= blockMax) {
      const b = input[at];
      let run = 1;
      while (run < 255 && at + run < input.length && input[at + run] === b) {
        run++;
      }
      for (let k = 0; k < run; k++) {
        crc = (crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ b) & 0xff];
      }
      if (run < 4) {
        for (let k = 0; k < run; k++) block[n++] = b;
      } else {
        block[n++] = b;
        block[n++] = b;
        block[n++] = b;
        block[n++] = b;
        block[n++] = run - 4;
      }
      at += run;
    }
    const blockCrc = ~crc >>> 0;
    writeBlock(w, block, n, blockCrc);
    combined = (((combined << 1) | (combined >>> 31)) ^ blockCrc) >>> 0;
  }
  w.put(24, 0x177245);
  w.put(24, 0x385090);
  w.put32(combined);
  return w.finish();
}
