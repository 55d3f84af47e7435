/**
 * The literals section of a zstd block (RFC 8878 3.1.1.3.1), as the
 * encoder in `zstd_encode.ts` writes it: the smallest of raw literals,
 * one byte repeated (RLE), or Huffman-coded literals.
 *
 * Huffman-coded literals carry their tree as weights (4.2.1): a weight
 * per symbol up to the last one present, that last one implied. Weights
 * are written directly, 4 bits each, when every literal is at most 128;
 * otherwise FSE-compressed (4.1.1: a normalized distribution of accuracy
 * log 6 and two interleaved states). The code lengths come from a
 * Huffman tree limited to 11 bits, completed so that their Kraft sum is
 * exact (the implied weight needs it). Literals go in one stream below
 * 1 KiB, else in four, each a backward bitstream written last symbol
 * first.
 *
 * This module is browser compatible.
 *
 * @module
 */

import {
  Bits,
  fseTable,
  normalize,
  previousState,
  writeDistribution,
} from "./_fse.ts";

/** The longest Huffman code zstd decoders accept. */
const MAX_BITS = 11;
/** Below this many literals Huffman cannot pay for its tree. */
const MIN_HUFFMAN = 64;
const WEIGHT_LOG = 6;

/**
 * Code lengths of a Huffman tree over `counts` (nonzero entries), at most
 * `MAX_BITS` long, with a Kraft sum of exactly 2^maxBits.
 */
function codeLengths(counts: Uint32Array, symbols: number[]): Uint8Array {
  const lengths = new Uint8Array(256);
  // Huffman by repeated merging of the two lightest (n <= 256: a sorted
  // list is enough). Nodes: leaves 0..n-1, then internal ones.
  const n = symbols.length;
  const weight: number[] = symbols.map((s) => counts[s]);
  const parent = new Int32Array(2 * n).fill(-1);
  const queue = symbols.map((_, i) => i).sort((a, b) =>
    weight[a] - weight[b] || a - b
  );
  const internal: number[] = [];
  let qi = 0;
  let ii = 0;
  const take = () => {
    if (
      ii >= internal.length ||
      (qi < queue.length && weight[queue[qi]] <= weight[internal[ii]])
    ) return queue[qi++];
    return internal[ii++];
  };
  for (let k = n; k < 2 * n - 1; k++) {
    const a = take();
    const b = take();
    weight[k] = weight[a] + weight[b];
    parent[a] = k;
    parent[b] = k;
    internal.push(k);
  }
  const depth = new Uint8Array(2 * n);
  for (let k = 2 * n - 3; k >= 0; k--) depth[k] = depth[parent[k]] + 1;
  let longest = 0;
  for (let i = 0; i < n; i++) {
    lengths[symbols[i]] = Math.min(depth[i], MAX_BITS);
    longest = Math.max(longest, depth[i]);
  }
  if (longest > MAX_BITS) {
    // Clamped: the Kraft sum is over 2^11. Lengthen the shortest-but-rare
    // codes (least frequent first) until it fits, then shorten the
    // longest ones (most frequent first) while there is room.
    const full = 1 << MAX_BITS;
    let kraft = 0;
    for (const s of symbols) kraft += 1 << (MAX_BITS - lengths[s]);
    const rare = [...symbols].sort((a, b) => counts[a] - counts[b]);
    while (kraft > full) {
      for (const s of rare) {
        if (kraft <= full) break;
        if (lengths[s] < MAX_BITS) {
          kraft -= 1 << (MAX_BITS - lengths[s] - 1);
          lengths[s]++;
        }
      }
    }
    while (kraft < full) {
      // The longest code's step is the smallest: it always fits the room.
      let best = -1;
      for (const s of rare) {
        if (
          lengths[s] > 1 && (1 << (MAX_BITS - lengths[s])) <= full - kraft &&
          (best < 0 || lengths[s] > lengths[best] ||
            (lengths[s] === lengths[best] && counts[s] > counts[best]))
        ) best = s;
      }
      if (best < 0) break;
      kraft += 1 << (MAX_BITS - lengths[best]);
      lengths[best]--;
    }
  }
  return lengths;
}

/**
 * The weights (symbols 0 .. last-1, the last implied) FSE-compressed with
 * two interleaved states; 0 when they do not compress under 128 bytes.
 */
function compressWeights(
  weights: Uint8Array,
  count: number,
  out: Uint8Array,
  at: number,
): number {
  if (count < 2) return 0;
  const histogram = new Array(MAX_BITS + 1).fill(0);
  for (let i = 0; i < count; i++) histogram[weights[i]]++;
  let lastWeight = MAX_BITS;
  while (histogram[lastWeight] === 0) lastWeight--;
  const norm = normalize(histogram.slice(0, lastWeight + 1), WEIGHT_LOG);
  if (norm.length === 0 || norm.some((c) => c === 1 << WEIGHT_LOG)) return 0;
  const start = at;
  at = writeDistribution(norm, WEIGHT_LOG, out, at);
  const t = fseTable(norm, WEIGHT_LOG);
  const w = new Bits(out, at);
  // Weights i = 0, 2, 4... come from state 1, odd ones from state 2; both
  // chains are written from their last weight back (the decoder reads
  // forwards), and each last weight's state reads bits past the stream's
  // start when left, which ends the decoding (its first state: the most
  // bits of that symbol, at least one).
  let s1 = -1;
  let s2 = -1;
  for (let i = count - 1; i >= 0; i--) {
    const symbol = weights[i];
    const odd = (i & 1) === 1;
    const current = odd ? s2 : s1;
    const state = current < 0
      ? t.first[symbol]
      : previousState(t, symbol, current, (v, n) => w.add(v, n));
    if (odd) s2 = state;
    else s1 = state;
    if (w.at - start > 127) return 0;
  }
  w.add(s2, WEIGHT_LOG);
  w.add(s1, WEIGHT_LOG);
  const end = w.finish();
  return end - start > 127 ? 0 : end;
}

/** One Huffman stream of `lits[from, to)`, last literal first. */
function huffmanStream(
  lits: Uint8Array,
  from: number,
  to: number,
  codes: Uint16Array,
  lengths: Uint8Array,
  out: Uint8Array,
  at: number,
): number {
  const w = new Bits(out, at);
  for (let i = to - 1; i >= from; i--) w.add(codes[lits[i]], lengths[lits[i]]);
  return w.finish();
}

/**
 * Writes the literals section of `lits[0, n)` at `out[at]` in its
 * smallest form; returns the end. `out` must have room for `n + 5`
 * bytes past `at` (a raw section), which no other form passes.
 *
 * @example
 * ```ts
 * import { writeLiterals } from "./_huffman_literals.ts";
 * const text = new TextEncoder().encode("abracadabra ".repeat(20));
 * const out = new Uint8Array(text.length + 5);
 * console.log(writeLiterals(text, text.length, out, 0) < text.length); // true
 * ```
 */
export function writeLiterals(
  lits: Uint8Array,
  n: number,
  out: Uint8Array,
  at: number,
): number {
  const counts = new Uint32Array(256);
  for (let i = 0; i < n; i++) counts[lits[i]]++;
  const symbols: number[] = [];
  for (let s = 0; s < 256; s++) if (counts[s]) symbols.push(s);
  if (symbols.length === 1 && n >= 4) {
    // RLE: the header of a raw section, then the byte.
    at = sizeHeader(1, n, out, at);
    out[at++] = symbols[0];
    return at;
  }
  if (n >= MIN_HUFFMAN && symbols.length > 1) {
    const end = huffman(lits, n, counts, symbols, out, at);
    if (end > 0) return end;
  }
  at = sizeHeader(0, n, out, at);
  out.set(lits.subarray(0, n), at);
  return at + n;
}

/** The 1, 2 or 3-byte header of a raw or RLE literals section. */
function sizeHeader(type: number, n: number, out: Uint8Array, at: number) {
  if (n < 32) out[at++] = type | (n << 3);
  else if (n < 4096) {
    out[at++] = type | (1 << 2) | ((n & 0xf) << 4);
    out[at++] = n >>> 4;
  } else {
    out[at++] = type | (3 << 2) | ((n & 0xf) << 4);
    out[at++] = (n >>> 4) & 0xff;
    out[at++] = n >>> 12;
  }
  return at;
}

/** Huffman-coded literals at `out[at]`; 0 when not smaller than raw. */
function huffman(
  lits: Uint8Array,
  n: number,
  counts: Uint32Array,
  symbols: number[],
  out: Uint8Array,
  at: number,
): number {
  const lengths = codeLengths(counts, symbols);
  let maxBits = 0;
  let bits = 0;
  for (const s of symbols) {
    maxBits = Math.max(maxBits, lengths[s]);
    bits += counts[s] * lengths[s];
  }
  const rawSize = n + (n < 32 ? 1 : n < 4096 ? 2 : 3);
  // Worth it? The streams alone, against raw (the tree adds up to 128).
  if (bits / 8 + 16 >= rawSize) return 0;
  // Weights and canonical codes: from the lowest weight (longest code)
  // up, in symbol order within a weight.
  const last = symbols[symbols.length - 1];
  const weights = new Uint8Array(last + 1);
  for (const s of symbols) weights[s] = maxBits + 1 - lengths[s];
  const codes = new Uint16Array(256);
  let code = 0;
  for (let weight = 1; weight <= maxBits; weight++) {
    for (const s of symbols) if (weights[s] === weight) codes[s] = code++;
    code >>= 1;
  }
  const single = n < 1024;
  const headerSize = single || n < 1024 ? 3 : n < 16384 ? 4 : 5;
  const start = at + headerSize;
  let p = start;
  // The tree: weights of symbols 0 .. last-1.
  if (last <= 128) {
    out[p++] = 127 + last;
    for (let i = 0; i < last; i += 2) {
      out[p++] = (weights[i] << 4) | (i + 1 < last ? weights[i + 1] : 0);
    }
  } else {
    const end = compressWeights(weights, last, out, p + 1);
    if (end === 0) return 0;
    out[p] = end - p - 1;
    p = end;
  }
  if (single) {
    p = huffmanStream(lits, 0, n, codes, lengths, out, p);
  } else {
    const segment = Math.floor((n + 3) / 4);
    const jump = p;
    p += 6;
    for (let k = 0; k < 4; k++) {
      const from = k * segment;
      const streamStart = p;
      p = huffmanStream(
        lits,
        from,
        k === 3 ? n : from + segment,
        codes,
        lengths,
        out,
        p,
      );
      if (k < 3) {
        out[jump + 2 * k] = (p - streamStart) & 0xff;
        out[jump + 2 * k + 1] = (p - streamStart) >>> 8;
      }
    }
  }
  const compressed = p - start;
  if (p - at >= rawSize) return 0;
  // Header: type 2, size format, then the two sizes (little-endian bits).
  const limit = headerSize === 3 ? 1023 : headerSize === 4 ? 16383 : 262143;
  if (compressed > limit) return 0;
  if (headerSize === 3) {
    const v = 2 | ((single ? 0 : 1) << 2) | (n << 4) | (compressed << 14);
    out[at] = v & 0xff;
    out[at + 1] = (v >>> 8) & 0xff;
    out[at + 2] = (v >>> 16) & 0xff;
  } else if (headerSize === 4) {
    const v = (2 | (2 << 2) | (n << 4) | (compressed << 18)) >>> 0;
    for (let k = 0; k < 4; k++) out[at + k] = (v >>> (8 * k)) & 0xff;
  } else {
    const v = 2 + 3 * 4 + n * 16 + compressed * 2 ** 22;
    for (let k = 0; k < 5; k++) {
      out[at + k] = Math.floor(v / 2 ** (8 * k)) & 0xff;
    }
  }
  return p;
}
