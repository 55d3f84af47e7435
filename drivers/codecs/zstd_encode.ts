/**
 * zstd encoding (RFC 8878): one frame per call, the form qcow2's
 * `compression_type=zstd` clusters take (QEMU writes one frame per
 * cluster, without a checksum). The decoder is `zstd.ts`.
 *
 * What a frame holds here:
 *
 * | size  | field                                                              |
 * | ----- | ------------------------------------------------------------------ |
 * | 4     | magic 28 B5 2F FD                                                  |
 * | 1     | descriptor: single segment (bit 5) and a content size of 1, 2 or 4 bytes (bits 6-7); no checksum, no dictionary |
 * | 1/2/4 | content size, little-endian (the 2-byte form stores size - 256)   |
 * | ...   | blocks of at most 128 KiB of content, each a 3-byte header (last bit 0, type bits 1-2, size bits 3-23) and its body |
 *
 * Each block is the smallest of three forms: RLE (one byte repeated),
 * compressed, or raw. A compressed block holds its literals raw, RLE or
 * Huffman-coded (`_huffman_literals.ts`), then its sequences with, for
 * each of the three codes, the predefined FSE table, RLE or a table of
 * its own (`_fse.ts`), whichever costs least.
 *
 * Two encoders write this: `_wasm/zstd_enc.c` (WebAssembly, the one that
 * runs wherever WebAssembly does) and the TypeScript one below (the
 * fallback). Their match finders differ (see {@linkcode EncodeFrameOptions}
 * and the C file's notes); the TypeScript one is a greedy LZ77 pass over
 * a hash table of 4-byte prefixes, matches extended both ways, a lazy
 * check one byte on, and a stride that grows over data that does not
 * match. Measured on 64 KiB clusters of a /usr/lib tar (CPU time, one
 * core): TypeScript 45 MB/s; WebAssembly 150 MB/s on its binaries and
 * 290 MB/s on the whole tar, about 0.7 of libzstd level 3 natively (the
 * C code natively ran at 1.1 of libzstd's speed for the same output).
 *
 * This module is browser compatible.
 *
 * @module
 */

import { writeLiterals } from "./_huffman_literals.ts";
import {
  acquireWasm,
  releaseWasm,
  WASM_COPY_LIMIT,
  WASM_SLACK,
} from "./_wasm.ts";
import {
  type FseTable,
  fseTable,
  normalize,
  rleTable,
  writeDistribution,
} from "./_fse.ts";

const MAGIC = [0x28, 0xb5, 0x2f, 0xfd];
/** The largest block content (RFC 8878 3.1.1.2.4). */
const BLOCK_MAX = 128 << 10;
const MIN_MATCH = 4;
/** Matches shorter than this are checked against one a byte further. */
const LAZY_BELOW = 32;
/** Matches are cut at this length so their code stays in range. */
const MAX_MATCH = 65536 + 3;

// The predefined distributions (RFC 8878 3.1.1.3.2.2).
const LL_DISTRIBUTION = [
  4,
  3,
  2,
  2,
  2,
  2,
  2,
  2,
  2,
  2,
  2,
  2,
  2,
  1,
  1,
  1,
  2,
  2,
  2,
  2,
  2,
  2,
  2,
  2,
  2,
  3,
  2,
  1,
  1,
  1,
  1,
  1,
  -1,
  -1,
  -1,
  -1,
];
const ML_DISTRIBUTION = [
  1,
  4,
  3,
  2,
  2,
  2,
  2,
  2,
  2,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
  -1,
];
const OF_DISTRIBUTION = [
  1,
  1,
  1,
  1,
  1,
  1,
  2,
  2,
  2,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  1,
  -1,
  -1,
  -1,
  -1,
  -1,
];

// Literal length codes 16 to 35 and match length codes 32 to 52: their
// baselines and extra bits (RFC 8878 3.1.1.3.2.1.1).
const LL_BASE = [
  16,
  18,
  20,
  22,
  24,
  28,
  32,
  40,
  48,
  64,
  128,
  256,
  512,
  1024,
  2048,
  4096,
  8192,
  16384,
  32768,
  65536,
];
const LL_BITS = [
  1,
  1,
  1,
  1,
  2,
  2,
  3,
  3,
  4,
  6,
  7,
  8,
  9,
  10,
  11,
  12,
  13,
  14,
  15,
  16,
];
const ML_BASE = [
  35,
  37,
  39,
  41,
  43,
  47,
  51,
  59,
  67,
  83,
  99,
  131,
  259,
  515,
  1027,
  2051,
  4099,
  8195,
  16387,
  32771,
  65539,
];
const ML_BITS = [
  1,
  1,
  1,
  1,
  2,
  2,
  3,
  3,
  4,
  4,
  5,
  7,
  8,
  9,
  10,
  11,
  12,
  13,
  14,
  15,
  16,
];

/** Code of each literal length below 64 (past that: bit length + 19). */
const LL_CODE = new Uint8Array(64);
/** Code of each match length - 3 below 128 (past that: bit length + 36). */
const ML_CODE = new Uint8Array(128);
for (let v = 0; v < 64; v++) {
  let code = v;
  if (v >= 16) {
    code = 16;
    while (code - 16 + 1 < LL_BASE.length && LL_BASE[code - 16 + 1] <= v) {
      code++;
    }
  }
  LL_CODE[v] = code;
}
for (let v = 0; v < 128; v++) {
  let code = v;
  if (v >= 32) {
    code = 32;
    while (code - 32 + 1 < ML_BASE.length && ML_BASE[code - 32 + 1] <= v + 3) {
      code++;
    }
  }
  ML_CODE[v] = code;
}

const highBit = (v: number) => 31 - Math.clz32(v);

const LL_PREDEFINED = fseTable(LL_DISTRIBUTION, 6);
const ML_PREDEFINED = fseTable(ML_DISTRIBUTION, 6);
const OF_PREDEFINED = fseTable(OF_DISTRIBUTION, 5);

/**
 * Writes bits low to high (the decoder reads them back from the end).
 * Integer operations only (a `2 **` here cost a third of the time): the
 * pending bits stay below 8 after each `add`, and values of more than 24
 * bits are added in two pieces, so the accumulator fits in 32 bits.
 */
class BitWriter {
  bits = 0;
  pending = 0;
  constructor(public out: Uint8Array, public at: number) {}
  add(value: number, count: number) {
    if (count > 24) {
      this.add(value & 0xffffff, 24);
      value = Math.floor(value / 0x1000000);
      count -= 24;
    }
    this.bits |= value << this.pending;
    this.pending += count;
    while (this.pending >= 8) {
      this.out[this.at++] = this.bits;
      this.bits >>>= 8;
      this.pending -= 8;
    }
  }
  /** The end mark (one 1 bit), then the last byte. */
  finish(): number {
    this.add(1, 1);
    if (this.pending > 0) this.out[this.at++] = this.bits;
    this.bits = 0;
    this.pending = 0;
    return this.at;
  }
}

const llHistogram = new Uint32Array(36);
const mlHistogram = new Uint32Array(53);
const ofHistogram = new Uint32Array(32);
const description = new Uint8Array(256);

/** A table chosen for one of the three codes of a block's sequences. */
interface Chosen {
  /** 0 predefined, 1 RLE, 2 described (FSE_Compressed_Mode). */
  mode: number;
  table: FseTable;
  /** What follows the modes byte for it. */
  description: Uint8Array;
}

/**
 * The cheapest table for a histogram of `count` codes: the predefined
 * distribution, RLE (one code only), or a distribution of the block's own
 * (accuracy log at most `maxLog`) with its description. Costs are
 * estimated in bits: -log2 of each code's probability, plus the
 * description.
 */
function chooseTable(
  histogram: Uint32Array,
  count: number,
  predefined: FseTable,
  predefinedNorm: number[],
  maxLog: number,
): Chosen {
  let distinct = 0;
  let only = 0;
  let last = 0;
  for (let s = 0; s < histogram.length; s++) {
    if (histogram[s]) {
      distinct++;
      only = s;
      last = s;
    }
  }
  if (distinct === 1 && count > 1) {
    return { mode: 1, table: rleTable(only), description: Uint8Array.of(only) };
  }
  let predefinedCost = Infinity;
  if (last < predefinedNorm.length) {
    predefinedCost = 0;
    for (let s = 0; s <= last; s++) {
      if (histogram[s]) {
        predefinedCost += histogram[s] *
          (predefined.tableLog - Math.log2(Math.abs(predefinedNorm[s])));
      }
    }
  }
  const predefinedChoice = {
    mode: 0,
    table: predefined,
    description: new Uint8Array(0),
  };
  // Few codes: a description would cost more than it saves.
  if (count < 16 && predefinedCost < Infinity) return predefinedChoice;
  const log = Math.min(
    maxLog,
    Math.max(5, highBit(distinct) + 2, highBit(count - 1) - 2),
  );
  const norm = normalize(Array.from(histogram.subarray(0, last + 1)), log);
  if (norm.length === 0 && predefinedCost === Infinity) {
    throw new Error("zstd: no table for these codes"); // unreachable: log >= distinct
  }
  if (norm.length === 0) return predefinedChoice;
  const end = writeDistribution(norm, log, description, 0);
  let cost = end * 8;
  for (let s = 0; s <= last; s++) {
    if (histogram[s]) cost += histogram[s] * (log - Math.log2(norm[s]));
  }
  if (cost >= predefinedCost) return predefinedChoice;
  return {
    mode: 2,
    table: fseTable(norm, log),
    description: description.slice(0, end),
  };
}

let frameOut = new Uint8Array(0);
/** The largest output buffer kept between calls (2 MiB clusters fit). */
const KEPT_OUTPUT = 4 << 20;

/** The repeat offsets after the block just compressed. */
const blockReps = new Uint32Array(3);

/** Per-call buffers, reused while they are large enough. */
let scratchSize = 0;
let literals = new Uint8Array(0);
let literalLengths = new Uint32Array(0);
let matchLengths = new Uint32Array(0);
let offsets = new Uint32Array(0);
let llCodes = new Uint8Array(0);
let mlCodes = new Uint8Array(0);
let ofCodes = new Uint8Array(0);
let blockOut = new Uint8Array(0);
let hashTable = new Int32Array(0);

function scratch(blockMax: number, hashLog: number) {
  if (scratchSize < blockMax) {
    scratchSize = blockMax;
    literals = new Uint8Array(blockMax);
    const most = Math.ceil(blockMax / MIN_MATCH) + 1;
    literalLengths = new Uint32Array(most);
    matchLengths = new Uint32Array(most);
    offsets = new Uint32Array(most);
    llCodes = new Uint8Array(most);
    mlCodes = new Uint8Array(most);
    ofCodes = new Uint8Array(most);
    // Worst case of a compressed block before it is dropped for a raw one:
    // literals, 3 + 3 header bytes, and at most 11 bytes a sequence.
    blockOut = new Uint8Array(blockMax + 16 + most * 11);
  }
  if (hashTable.length !== 1 << hashLog) {
    hashTable = new Int32Array(1 << hashLog);
  } else hashTable.fill(0);
}

/** The bound of `encodeFrame`'s output for `length` bytes of input. */
export function frameBound(length: number): number {
  return 4 + 1 + 4 + Math.max(1, Math.ceil(length / BLOCK_MAX)) * 3 + length;
}

/** Options of {@linkcode encodeFrame}. */
export interface EncodeFrameOptions {
  /**
   * The WebAssembly match finder: 1 a table of 5-byte prefixes probed two
   * positions a round (libzstd's "fast" strategy), 3 a table of 8-byte and
   * one of 5-byte prefixes ("double fast", libzstd's level 3, which QEMU
   * uses). On the bench disk's 64 KiB clusters 3 made frames 1-3 % smaller
   * (as small as libzstd's level 3) and took 1.3 times the CPU of 1. The
   * TypeScript encoder (where WebAssembly cannot run) has one finder.
   * @default {1}
   */
  level?: 1 | 3;
}

/**
 * Compresses `input` into one zstd frame (no checksum, single segment,
 * content size declared), smaller than `input` wherever LZ77 finds
 * repeats; at worst the input stored raw plus a few header bytes
 * ({@linkcode frameBound}). Runs the WebAssembly encoder
 * (`_wasm/zstd_enc.c`) where WebAssembly runs, the TypeScript one
 * elsewhere (`useWasm(false)` in `_wasm.ts` forces it).
 *
 * @param input the bytes to compress (up to 4 GiB - 1)
 * @param options the match finder
 * @returns the frame
 *
 * @example
 * ```ts
 * import { encodeFrame } from "./zstd_encode.ts";
 * const text = new TextEncoder().encode("hello hello hello hello hello\n");
 * const frame = encodeFrame(text);
 * console.log(frame.length < text.length); // true
 * ```
 */
export function encodeFrame(
  input: Uint8Array,
  options: EncodeFrameOptions = {},
): Uint8Array {
  const n = input.length;
  if (n > 0xffffffff) throw new RangeError("zstd: input over 4 GiB");
  return encodeFrameWasm(input, options.level ?? 1) ?? encodeFrameTs(input);
}

const align8 = (n: number) => Math.ceil(n / 8) * 8;

/** Frames of a batch of clusters, back to back: see {@linkcode encodeClusters}. */
export interface EncodedClusters {
  /** The frames, one after the other (in `into` when given). */
  packed: Uint8Array;
  /** The size of each frame, in cluster order. */
  lengths: Uint32Array<ArrayBuffer>;
}

/**
 * Compresses each `clusterSize` piece of `input` (the last may be
 * shorter) into its own frame, as {@linkcode encodeFrame} does, and
 * answers them in one buffer: qcow2's `-c` workers compress a batch a
 * message. One copy in and one out per batch (a buffer per frame left V8
 * with hundreds of MiB of small external buffers to free late: peak RSS
 * of `convert -c` on the 1 GiB bench disk was 321 MiB).
 *
 * @param input the clusters, back to back
 * @param clusterSize the size of each piece (over 0)
 * @param options the match finder, and `into`: where the frames go (room
 *   for {@linkcode frameBound} of each piece; the workers' shared buffer),
 *   else a new buffer
 * @returns the frames and their sizes
 *
 * @example
 * ```ts
 * import { encodeClusters } from "./zstd_encode.ts";
 * const { packed, lengths } = encodeClusters(new Uint8Array(8192), 4096);
 * console.log(lengths.length, packed.length === lengths[0] + lengths[1]); // 2 true
 * ```
 */
export function encodeClusters(
  input: Uint8Array,
  clusterSize: number,
  options: EncodeFrameOptions & { into?: Uint8Array } = {},
): EncodedClusters {
  if (!(clusterSize > 0)) {
    throw new RangeError("zstd: cluster size must be over 0");
  }
  const count = Math.ceil(input.length / clusterSize);
  const lengths = new Uint32Array(count);
  const level = options.level ?? 1;
  const wasm = input.length <= WASM_COPY_LIMIT ? acquireWasm() : undefined;
  if (wasm) {
    try {
      let bound = 0;
      for (let k = 0; k < count; k++) {
        bound += frameBound(
          Math.min(clusterSize, input.length - k * clusterSize),
        );
      }
      if (options.into && options.into.length < bound) {
        throw new RangeError(
          `zstd: ${options.into.length} bytes for frames of up to ${bound}`,
        );
      }
      const inAt = align8(wasm.heapBase);
      const outAt = align8(inAt + input.length + WASM_SLACK);
      const workAt = align8(outAt + bound + WASM_SLACK);
      const end = workAt +
        wasm.exports.zstd_enc_work_size(Math.min(clusterSize, input.length)) +
        WASM_SLACK;
      if (wasm.ensure(end)) {
        const bytes = wasm.bytes;
        bytes.set(input, inAt);
        let at = outAt;
        for (let k = 0; k < count; k++) {
          const from = k * clusterSize;
          const n = Math.min(clusterSize, input.length - from);
          const size = wasm.exports.zstd_enc_frame(
            inAt + from,
            n,
            at,
            workAt,
            level,
          );
          if (size > frameBound(n)) {
            throw new Error(
              `zstd: the WebAssembly encoder wrote ${size} bytes`,
            );
          }
          lengths[k] = size;
          at += size;
        }
        if (options.into) {
          options.into.set(bytes.subarray(outAt, at));
          return { packed: options.into.subarray(0, at - outAt), lengths };
        }
        return { packed: bytes.slice(outAt, at), lengths };
      }
    } finally {
      releaseWasm(wasm);
    }
  }
  const frames: Uint8Array[] = [];
  let total = 0;
  for (let k = 0; k < count; k++) {
    const frame = encodeFrame(
      input.subarray(k * clusterSize, (k + 1) * clusterSize),
      options,
    );
    frames.push(frame);
    lengths[k] = frame.length;
    total += frame.length;
  }
  if (options.into && options.into.length < total) {
    throw new RangeError(
      `zstd: ${options.into.length} bytes for frames of ${total}`,
    );
  }
  const packed = options.into?.subarray(0, total) ?? new Uint8Array(total);
  let at = 0;
  for (const frame of frames) {
    packed.set(frame, at);
    at += frame.length;
  }
  return { packed, lengths };
}

/**
 * The frame made by the WebAssembly encoder (`_wasm/zstd_enc.c`), or
 * undefined where WebAssembly cannot run here (or the input is past
 * {@linkcode WASM_COPY_LIMIT}). Input, frame and work area sit one after
 * the other in the instance's memory, each followed by its slack.
 */
function encodeFrameWasm(
  input: Uint8Array,
  level: number,
): Uint8Array | undefined {
  const n = input.length;
  if (n > WASM_COPY_LIMIT) return undefined;
  const wasm = acquireWasm();
  if (!wasm) return undefined;
  try {
    const inAt = align8(wasm.heapBase);
    const outAt = align8(inAt + n + WASM_SLACK);
    const workAt = align8(outAt + frameBound(n) + WASM_SLACK);
    const end = workAt + wasm.exports.zstd_enc_work_size(n) + WASM_SLACK;
    if (!wasm.ensure(end)) return undefined;
    const bytes = wasm.bytes;
    bytes.set(input, inAt);
    const size = wasm.exports.zstd_enc_frame(inAt, n, outAt, workAt, level);
    if (size > frameBound(n)) {
      throw new Error(`zstd: the WebAssembly encoder wrote ${size} bytes`);
    }
    return bytes.slice(outAt, outAt + size);
  } finally {
    releaseWasm(wasm);
  }
}

/** The TypeScript encoder: where WebAssembly cannot run. */
function encodeFrameTs(input: Uint8Array): Uint8Array {
  const n = input.length;
  // Built in a buffer kept between calls, returned as a copy of its size
  // (one allocation a frame: the garbage collector had a tenth of the time).
  const bound = frameBound(n);
  if (frameOut.length < bound && bound <= KEPT_OUTPUT) {
    frameOut = new Uint8Array(bound);
  }
  const out = bound <= KEPT_OUTPUT ? frameOut : new Uint8Array(bound);
  out.set(MAGIC);
  let at = 5;
  if (n < 256) {
    out[4] = 0x20; // single segment, 1-byte content size
    out[at++] = n;
  } else if (n < 65536 + 256) {
    out[4] = 0x60; // 2-byte content size
    out[at++] = (n - 256) & 0xff;
    out[at++] = (n - 256) >>> 8;
  } else {
    out[4] = 0xa0; // 4-byte content size
    for (let i = 0; i < 4; i++) out[at++] = (n >>> (8 * i)) & 0xff;
  }
  if (n === 0) {
    out[at++] = 1; // last, raw, empty
    out[at++] = 0;
    out[at++] = 0;
    return out.slice(0, at);
  }
  const hashLog = Math.max(10, Math.min(16, Math.ceil(Math.log2(n)) - 2));
  const blockMax = Math.min(BLOCK_MAX, n);
  scratch(blockMax, hashLog);
  const reps = Uint32Array.of(1, 4, 8); // a frame's first repeat offsets
  for (let start = 0; start < n; start += BLOCK_MAX) {
    const end = Math.min(n, start + BLOCK_MAX);
    const last = end === n ? 1 : 0;
    const size = end - start;
    if (isRun(input, start, end)) {
      writeBlockHeader(out, at, last | (1 << 1) | (size << 3));
      out[at + 3] = input[start];
      at += 4;
      continue;
    }
    const packed = compressBlock(input, start, end, hashLog, reps);
    if (packed > 0 && packed < size) {
      // The decoder's repeat offsets move only through compressed blocks.
      reps.set(blockReps);
      writeBlockHeader(out, at, last | (2 << 1) | (packed << 3));
      out.set(blockOut.subarray(0, packed), at + 3);
      at += 3 + packed;
    } else {
      writeBlockHeader(out, at, last | (size << 3));
      out.set(input.subarray(start, end), at + 3);
      at += 3 + size;
    }
  }
  return out.slice(0, at);
}

function writeBlockHeader(out: Uint8Array, at: number, value: number) {
  out[at] = value & 0xff;
  out[at + 1] = (value >>> 8) & 0xff;
  out[at + 2] = (value >>> 16) & 0xff;
}

function isRun(b: Uint8Array, start: number, end: number): boolean {
  const first = b[start];
  for (let i = start + 1; i < end; i++) if (b[i] !== first) return false;
  return true;
}

const read32 = (b: Uint8Array, i: number) =>
  b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | (b[i + 3] << 24);

/**
 * Finds the sequences of `input[start, end)` (matches may reach back to
 * the frame's start) and writes the block body to `blockOut`.
 *
 * @returns the body's size, or 0 when it would not fit under `end - start`
 */
function compressBlock(
  input: Uint8Array,
  start: number,
  end: number,
  hashLog: number,
  reps: Uint32Array,
): number {
  const shift = 32 - hashLog;
  // Positions of earlier blocks stay in the table (the window is the
  // frame); those of RLE blocks were never hashed, which only costs matches.
  let anchor = start;
  let i = start;
  let count = 0;
  let literalCount = 0;
  const limit = end - MIN_MATCH; // the last position a match may start
  let rep0 = reps[0];
  let rep1 = reps[1];
  let rep2 = reps[2];
  let misses = 0;
  // Hot loop: greedy matching, one probe a position; the stride grows by
  // one every 32 misses (random data is passed over quickly, as LZ4 does).
  while (i <= limit) {
    const v = read32(input, i);
    const h = Math.imul(v, 0x9e3779b1) >>> shift;
    let candidate = hashTable[h] - 1;
    hashTable[h] = i + 1;
    // The last offset first (a repeat costs a few bits), then the table.
    if (rep0 <= i && read32(input, i - rep0) === v) candidate = i - rep0;
    else if (candidate < 0 || read32(input, candidate) !== v) {
      i += 1 + (misses++ >>> 5);
      continue;
    }
    misses = 0;
    // Extend forwards (to the block's end) and backwards (into literals).
    let length = MIN_MATCH;
    const most = Math.min(end - i, MAX_MATCH);
    while (length < most && input[i + length] === input[candidate + length]) {
      length++;
    }
    // Lazy matching: a longer match one byte on wins over this one (the
    // byte becomes a literal). Short matches only: long ones rarely lose.
    if (length < LAZY_BELOW && i + 1 <= limit) {
      const next = i + 1;
      const v1 = read32(input, next);
      const h1 = Math.imul(v1, 0x9e3779b1) >>> shift;
      let other = hashTable[h1] - 1;
      hashTable[h1] = next + 1;
      if (rep0 <= next && read32(input, next - rep0) === v1) {
        other = next - rep0;
      } else if (other >= 0 && read32(input, other) !== v1) other = -1;
      if (other >= 0) {
        let otherLength = MIN_MATCH;
        const otherMost = Math.min(end - next, MAX_MATCH);
        while (
          otherLength < otherMost &&
          input[next + otherLength] === input[other + otherLength]
        ) otherLength++;
        if (otherLength > length) {
          i = next;
          candidate = other;
          length = otherLength;
        }
      }
    }
    let from = i;
    let back = candidate;
    while (
      from > anchor && back > 0 && input[from - 1] === input[back - 1] &&
      length < MAX_MATCH
    ) {
      from--;
      back--;
      length++;
    }
    const literalLength = from - anchor;
    // A loop, not set(subarray()): most runs are short, and a subarray
    // each was a tenth of the time.
    for (let k = anchor; k < from; k++) literals[literalCount++] = input[k];
    literalLengths[count] = literalLength;
    matchLengths[count] = length;
    // Offset_Value and the repeat offsets, as the decoder will keep them
    // (RFC 8878 3.1.1.5): 1-3 name a repeat, past 3 a new offset + 3.
    const offset = from - back;
    let used = -1;
    if (literalLength > 0) {
      if (offset === rep0) used = 0;
      else if (offset === rep1) used = 1;
      else if (offset === rep2) used = 2;
      offsets[count] = used >= 0 ? used + 1 : offset + 3;
    } else {
      if (offset === rep1) used = 1;
      else if (offset === rep2) used = 2;
      else if (offset === rep0 - 1) used = 3;
      offsets[count] = used >= 0 ? used : offset + 3;
    }
    if (used < 0 || used === 3) {
      rep2 = rep1;
      rep1 = rep0;
      rep0 = offset;
    } else if (used === 1) {
      rep1 = rep0;
      rep0 = offset;
    } else if (used === 2) {
      rep2 = rep1;
      rep1 = rep0;
      rep0 = offset;
    }
    count++;
    // Hash a couple of positions inside the match for later matches.
    const after = from + length;
    if (after - 2 > i && after - 2 <= limit) {
      hashTable[Math.imul(read32(input, after - 2), 0x9e3779b1) >>> shift] =
        after - 2 + 1;
    }
    i = after;
    anchor = after;
  }
  blockReps[0] = rep0;
  blockReps[1] = rep1;
  blockReps[2] = rep2;
  const tail = end - anchor;
  literals.set(input.subarray(anchor, end), literalCount);
  literalCount += tail;
  const size = end - start;
  // Literals section: raw, RLE or Huffman, whichever is smallest.
  let at = writeLiterals(literals, literalCount, blockOut, 0);
  if (count === 0) {
    blockOut[at++] = 0; // no sequences (and no modes byte)
    return at < size ? at : 0;
  }
  if (at + 4 >= size) return 0;
  // Sequences section header: the count, then the modes byte.
  if (count < 128) blockOut[at++] = count;
  else if (count < 0x7f00) {
    blockOut[at++] = (count >>> 8) + 128;
    blockOut[at++] = count & 0xff;
  } else {
    blockOut[at++] = 0xff;
    blockOut[at++] = (count - 0x7f00) & 0xff;
    blockOut[at++] = (count - 0x7f00) >>> 8;
  }
  // The codes of every sequence, and their histograms.
  llHistogram.fill(0);
  mlHistogram.fill(0);
  ofHistogram.fill(0);
  for (let k = 0; k < count; k++) {
    const ll = literalLengths[k];
    const ml = matchLengths[k] - 3;
    const llCode = ll < 64 ? LL_CODE[ll] : highBit(ll) + 19;
    const mlCode = ml < 128 ? ML_CODE[ml] : highBit(ml) + 36;
    const ofCode = highBit(offsets[k]);
    llCodes[k] = llCode;
    mlCodes[k] = mlCode;
    ofCodes[k] = ofCode;
    llHistogram[llCode]++;
    mlHistogram[mlCode]++;
    ofHistogram[ofCode]++;
  }
  // Each table: predefined, RLE or described here, whichever costs less;
  // the descriptions follow the modes byte in the order LL, OF, ML.
  const modes = at++;
  const ll = chooseTable(llHistogram, count, LL_PREDEFINED, LL_DISTRIBUTION, 9);
  const of = chooseTable(ofHistogram, count, OF_PREDEFINED, OF_DISTRIBUTION, 8);
  const ml = chooseTable(mlHistogram, count, ML_PREDEFINED, ML_DISTRIBUTION, 9);
  blockOut[modes] = (ll.mode << 6) | (of.mode << 4) | (ml.mode << 2);
  for (const t of [ll, of, ml]) {
    blockOut.set(t.description, at);
    at += t.description.length;
  }
  if (at + 4 >= size) return 0;
  const llTable = ll.table;
  const mlTable = ml.table;
  const ofTable = of.table;
  const w = new BitWriter(blockOut, at);
  // Sequences are written last to first: the decoder reads them forwards.
  let llState = 0;
  let mlState = 0;
  let ofState = 0;
  for (let k = count - 1; k >= 0; k--) {
    const llCode = llCodes[k];
    const mlCode = mlCodes[k];
    const ofCode = ofCodes[k];
    if (k === count - 1) {
      llState = llTable.first[llCode];
      mlState = mlTable.first[mlCode];
      ofState = ofTable.first[ofCode];
    } else {
      // The state transitions into sequence k + 1, in the reverse of the
      // order the decoder reads them (literal lengths, match lengths,
      // offsets).
      // (v: the state plus the table size; see _fse.ts. Inlined: this
      // loop runs for every sequence.)
      let v = ofState + ofTable.size;
      let bits = (v + ofTable.deltaNbBits[ofCode]) >>> 16;
      w.add(v & ((1 << bits) - 1), bits);
      ofState =
        ofTable.stateTable[(v >> bits) + ofTable.deltaFindState[ofCode]];
      v = mlState + mlTable.size;
      bits = (v + mlTable.deltaNbBits[mlCode]) >>> 16;
      w.add(v & ((1 << bits) - 1), bits);
      mlState =
        mlTable.stateTable[(v >> bits) + mlTable.deltaFindState[mlCode]];
      v = llState + llTable.size;
      bits = (v + llTable.deltaNbBits[llCode]) >>> 16;
      w.add(v & ((1 << bits) - 1), bits);
      llState =
        llTable.stateTable[(v >> bits) + llTable.deltaFindState[llCode]];
    }
    // Extra bits, the reverse of the decoder's order (offset, match, literal).
    const literalLength = literalLengths[k];
    if (llCode >= 16) {
      w.add(literalLength - LL_BASE[llCode - 16], LL_BITS[llCode - 16]);
    }
    if (mlCode >= 32) {
      w.add(matchLengths[k] - ML_BASE[mlCode - 32], ML_BITS[mlCode - 32]);
    }
    w.add(offsets[k] - (1 << ofCode), ofCode);
    if (w.at >= size) return 0;
  }
  w.add(mlState, mlTable.tableLog);
  w.add(ofState, ofTable.tableLog);
  w.add(llState, llTable.tableLog);
  at = w.finish();
  return at < size ? at : 0;
}
