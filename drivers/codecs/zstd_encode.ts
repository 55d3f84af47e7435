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
 * compressed, or raw. A compressed block is
 *
 * - a literals section of raw literals (type 0, a 1, 2 or 3-byte header);
 * - a sequences section: their count, the modes byte 0 (the predefined
 *   FSE distributions of RFC 8878 3.1.1.3.2.2 for literal lengths, match
 *   lengths and offsets), then one backward bitstream.
 *
 * Sequences come from a greedy LZ77 pass: a hash table of 4-byte prefixes
 * over the whole frame (the window is the frame: single segment), matches
 * of 4 bytes or more extended both ways, and a stride that grows over
 * data that does not match (so random data costs little time). Offsets
 * are always coded as new offsets (Offset_Value = offset + 3): repeat
 * offsets are never used, which every decoder accepts.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { writeLiterals } from "./_huffman_literals.ts";

const MAGIC = [0x28, 0xb5, 0x2f, 0xfd];
/** The largest block content (RFC 8878 3.1.1.2.4). */
const BLOCK_MAX = 128 << 10;
const MIN_MATCH = 4;
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

/**
 * An FSE table turned around for encoding: for each symbol, the decoder
 * state to move to given the state that follows it.
 */
interface FseEncoder {
  tableLog: number;
  /** Per decoder state: the bits read on leaving it, and their baseline. */
  nbBits: Uint8Array;
  baseline: Uint16Array;
  /** `from[symbol * size + next]`: the state whose range holds `next`. */
  from: Uint16Array;
  /** A state of each symbol (the one the last sequence starts in). */
  first: Uint16Array;
}

/**
 * Builds the decoding table of a distribution exactly as RFC 8878 4.1.1
 * spreads it, then inverts it: for every symbol its states' ranges
 * `[baseline, baseline + 2^nbBits)` cover the table once, so any next
 * state has exactly one predecessor for that symbol.
 */
function fseEncoder(distribution: number[], tableLog: number): FseEncoder {
  const size = 1 << tableLog;
  const symbols = new Int16Array(size);
  let high = size - 1;
  const next = new Uint16Array(distribution.length);
  distribution.forEach((count, s) => {
    if (count === -1) {
      symbols[high--] = s;
      next[s] = 1;
    } else next[s] = count;
  });
  const step = (size >>> 1) + (size >>> 3) + 3;
  let position = 0;
  distribution.forEach((count, s) => {
    for (let i = 0; i < count; i++) {
      symbols[position] = s;
      do position = (position + step) & (size - 1); while (position > high);
    }
  });
  if (position !== 0) throw new Error("zstd: bad predefined distribution");
  const nbBits = new Uint8Array(size);
  const baseline = new Uint16Array(size);
  const from = new Uint16Array(distribution.length * size);
  const first = new Uint16Array(distribution.length);
  const seen = new Uint8Array(distribution.length);
  for (let state = 0; state < size; state++) {
    const s = symbols[state];
    const n = next[s]++;
    const bits = tableLog - highBit(n);
    nbBits[state] = bits;
    baseline[state] = (n << bits) - size;
    for (let k = 0; k < 1 << bits; k++) {
      from[s * size + baseline[state] + k] = state;
    }
    if (!seen[s]) first[s] = state;
    seen[s] = 1;
  }
  return { tableLog, nbBits, baseline, from, first };
}

const LL_FSE = fseEncoder(LL_DISTRIBUTION, 6);
const ML_FSE = fseEncoder(ML_DISTRIBUTION, 6);
const OF_FSE = fseEncoder(OF_DISTRIBUTION, 5);

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

/** The repeat offsets after the block just compressed. */
const blockReps = new Uint32Array(3);

/** Per-call buffers, reused while they are large enough. */
let scratchSize = 0;
let literals = new Uint8Array(0);
let literalLengths = new Uint32Array(0);
let matchLengths = new Uint32Array(0);
let offsets = new Uint32Array(0);
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

/**
 * Compresses `input` into one zstd frame (no checksum, single segment,
 * content size declared), smaller than `input` wherever LZ77 finds
 * repeats; at worst the input stored raw plus a few header bytes
 * ({@linkcode frameBound}).
 *
 * @param input the bytes to compress (up to 4 GiB - 1)
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
export function encodeFrame(input: Uint8Array): Uint8Array {
  const n = input.length;
  if (n > 0xffffffff) throw new RangeError("zstd: input over 4 GiB");
  const out = new Uint8Array(frameBound(n));
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
    return out.subarray(0, at);
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
  // Sequences section header: the count, then the modes (all predefined).
  if (count < 128) blockOut[at++] = count;
  else if (count < 0x7f00) {
    blockOut[at++] = (count >>> 8) + 128;
    blockOut[at++] = count & 0xff;
  } else {
    blockOut[at++] = 0xff;
    blockOut[at++] = (count - 0x7f00) & 0xff;
    blockOut[at++] = (count - 0x7f00) >>> 8;
  }
  blockOut[at++] = 0;
  const w = new BitWriter(blockOut, at);
  // Sequences are written last to first: the decoder reads them forwards.
  let llState = 0;
  let mlState = 0;
  let ofState = 0;
  for (let k = count - 1; k >= 0; k--) {
    const ll = literalLengths[k];
    const ml = matchLengths[k] - 3;
    const offsetValue = offsets[k];
    const llCode = ll < 64 ? LL_CODE[ll] : highBit(ll) + 19;
    const mlCode = ml < 128 ? ML_CODE[ml] : highBit(ml) + 36;
    const ofCode = highBit(offsetValue);
    if (k === count - 1) {
      llState = LL_FSE.first[llCode];
      mlState = ML_FSE.first[mlCode];
      ofState = OF_FSE.first[ofCode];
    } else {
      // The state transitions into sequence k + 1, in the reverse of the
      // order the decoder reads them (literal lengths, match lengths,
      // offsets).
      let s = OF_FSE.from[ofCode * 32 + ofState];
      w.add(ofState - OF_FSE.baseline[s], OF_FSE.nbBits[s]);
      ofState = s;
      s = ML_FSE.from[mlCode * 64 + mlState];
      w.add(mlState - ML_FSE.baseline[s], ML_FSE.nbBits[s]);
      mlState = s;
      s = LL_FSE.from[llCode * 64 + llState];
      w.add(llState - LL_FSE.baseline[s], LL_FSE.nbBits[s]);
      llState = s;
    }
    // Extra bits, the reverse of the decoder's order (offset, match, literal).
    if (llCode >= 16) w.add(ll - LL_BASE[llCode - 16], LL_BITS[llCode - 16]);
    if (mlCode >= 32) {
      w.add(ml + 3 - ML_BASE[mlCode - 32], ML_BITS[mlCode - 32]);
    }
    w.add(offsetValue - (1 << ofCode), ofCode);
    if (w.at >= size) return 0;
  }
  w.add(mlState, 6);
  w.add(ofState, 5);
  w.add(llState, 6);
  at = w.finish();
  return at < size ? at : 0;
}
