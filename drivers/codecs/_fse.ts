/**
 * FSE (finite state entropy, RFC 8878 4.1) on the encoding side, shared
 * by zstd's Huffman weights and sequences: a bit writer, normalized
 * distributions, their table description, and the decoding table turned
 * around for encoding (for each symbol, the state whose range of next
 * states holds a given one).
 *
 * This module is browser compatible.
 *
 * @module
 */

const highBit = (v: number) => 31 - Math.clz32(v);

/** An FSE table for encoding: see {@linkcode fseTable}. */
export interface FseTable {
  tableLog: number;
  size: number;
  /** Per decoder state: the bits read on leaving it. */
  nbBits: Uint8Array;
  /**
   * The states of each symbol, in table order, one run per symbol; with
   * the two per-symbol offsets below, the predecessor of a state (see
   * {@linkcode previousState}).
   */
  stateTable: Uint16Array;
  deltaNbBits: Int32Array;
  deltaFindState: Int32Array;
  /** A state of each symbol with the most bits (its first in the table). */
  first: Int16Array | Uint16Array;
}

/** Writes bits low to high (values of 24 bits or fewer at a time). */
export class Bits {
  bits = 0;
  pending = 0;
  constructor(public out: Uint8Array, public at: number) {}
  add(value: number, count: number) {
    this.bits |= value << this.pending;
    this.pending += count;
    while (this.pending >= 8) {
      this.out[this.at++] = this.bits;
      this.bits >>>= 8;
      this.pending -= 8;
    }
  }
  /** Flushes the last partial byte (forward streams: no end mark). */
  flushForward(): number {
    if (this.pending > 0) this.out[this.at++] = this.bits;
    this.bits = 0;
    this.pending = 0;
    return this.at;
  }
  /** The end mark (one 1 bit), then the last byte (backward streams). */
  finish(): number {
    this.add(1, 1);
    return this.flushForward();
  }
}

/**
 * A normalized distribution of `counts` summing to 2^log, every symbol
 * present getting at least 1; empty when they cannot all fit.
 *
 * @example
 * ```ts
 * import { normalize } from "./_fse.ts";
 * console.log(normalize([30, 0, 10, 1], 5)); // [ 23, 0, 8, 1 ]
 * ```
 */
export function normalize(counts: number[], log: number): number[] {
  const total = counts.reduce((a, b) => a + b, 0);
  const size = 1 << log;
  const norm = counts.map((c) =>
    c === 0 ? 0 : Math.max(1, Math.round((c * size) / total))
  );
  let sum = norm.reduce((a, b) => a + b, 0);
  while (sum !== size) {
    // Take from (or give to) the largest: the relative change is smallest.
    let big = 0;
    for (let s = 1; s < norm.length; s++) if (norm[s] > norm[big]) big = s;
    if (sum > size) {
      const give = Math.min(sum - size, norm[big] - 1);
      if (give <= 0) return [];
      norm[big] -= give;
      sum -= give;
    } else {
      norm[big] += size - sum;
      sum = size;
    }
  }
  return norm;
}

/**
 * FSE table description (RFC 8878 4.1.1) of `norm` (accuracy log `log`)
 * at `out[at]`; returns the end.
 */
export function writeDistribution(
  norm: number[],
  log: number,
  out: Uint8Array,
  at: number,
): number {
  const w = new Bits(out, at);
  w.add(log - 5, 4);
  let remaining = (1 << log) + 1;
  let threshold = 1 << log;
  let nbBits = log + 1;
  let last = norm.length - 1;
  while (norm[last] === 0) last--;
  for (let s = 0; s <= last;) {
    const value = norm[s] + 1; // -1 .. n stored as 0 .. n+1
    const max = 2 * threshold - 1 - remaining;
    if (value < max) w.add(value, nbBits - 1);
    else if (value < threshold) w.add(value, nbBits);
    else w.add(value + max, nbBits);
    remaining -= Math.abs(norm[s]);
    while (remaining < threshold) {
      nbBits--;
      threshold >>= 1;
    }
    s++;
    if (value === 1) {
      // A zero: 2-bit counts of the zeros that follow it (3: more follow).
      let zeros = 0;
      while (s + zeros <= last && norm[s + zeros] === 0) zeros++;
      s += zeros;
      while (zeros >= 3) {
        w.add(3, 2);
        zeros -= 3;
      }
      w.add(zeros, 2);
    }
  }
  return w.flushForward();
}

/**
 * The decoding table of a distribution, spread exactly as RFC 8878 4.1.1
 * spreads it ("less than 1" symbols, -1, at the top), then inverted: for
 * every symbol its states' ranges `[baseline, baseline + 2^nbBits)`
 * cover the table once, so any next state has exactly one predecessor
 * of that symbol.
 *
 * @param norm the normalized counts (summing to 2^log, -1 counting 1)
 * @param log the accuracy log
 * @returns the table for encoding
 *
 * @example
 * ```ts
 * import { fseTable } from "./_fse.ts";
 * const t = fseTable([16, 8, 8], 5);
 * // Symbol 0 from state t.first[0]: its bits lead to any next state.
 * console.log(t.size, t.nbBits[t.first[0]]); // 32 1
 * ```
 */
export function fseTable(norm: number[], log: number): FseTable {
  const size = 1 << log;
  const symbols = new Uint8Array(size);
  const next = new Uint16Array(norm.length);
  let high = size - 1;
  norm.forEach((count, s) => {
    if (count === -1) {
      symbols[high--] = s;
      next[s] = 1;
    } else next[s] = count;
  });
  const step = (size >>> 1) + (size >>> 3) + 3;
  let position = 0;
  norm.forEach((count, s) => {
    for (let i = 0; i < count; i++) {
      symbols[position] = s;
      do position = (position + step) & (size - 1); while (position > high);
    }
  });
  if (position !== 0) throw new Error("zstd: bad FSE distribution");
  const nbBits = new Uint8Array(size);
  const first = new Int16Array(norm.length).fill(-1);
  const cumulative = new Int32Array(norm.length + 1);
  norm.forEach((count, s) => {
    cumulative[s + 1] = cumulative[s] + (count === -1 ? 1 : count);
  });
  const stateTable = new Uint16Array(size);
  const at = cumulative.slice();
  for (let state = 0; state < size; state++) {
    const s = symbols[state];
    nbBits[state] = log - highBit(next[s]++);
    stateTable[at[s]++] = state;
    if (first[s] < 0) first[s] = state;
  }
  // State values v = size + state: the bits of v written are
  // (v + deltaNbBits) >> 16, and the predecessor is the entry
  // (v >> bits) + deltaFindState (the decoder's n = c .. 2c-1, minus c).
  const deltaNbBits = new Int32Array(norm.length);
  const deltaFindState = new Int32Array(norm.length);
  norm.forEach((value, s) => {
    const count = value === -1 ? 1 : value;
    if (count === 0) return;
    const most = count === 1 ? log : log - highBit(count - 1);
    deltaNbBits[s] = (most << 16) - (count << most);
    deltaFindState[s] = cumulative[s] - count;
  });
  return {
    tableLog: log,
    size,
    nbBits,
    stateTable,
    deltaNbBits,
    deltaFindState,
    first,
  };
}

/**
 * The table of a block whose symbols are all `symbol` (the RLE mode):
 * one state, no bits.
 */
export function rleTable(symbol: number): FseTable {
  const deltas = new Int32Array(symbol + 1);
  deltas[symbol] = -1;
  return {
    tableLog: 0,
    size: 1,
    nbBits: new Uint8Array(1),
    stateTable: new Uint16Array(1),
    deltaNbBits: deltas,
    deltaFindState: deltas.slice(),
    first: new Int16Array(symbol + 1),
  };
}

/**
 * The state to encode `symbol` in when the state after it is `next`
 * (both decoder states), writing the bits that lead from one to the
 * other (the decoder reads them back: `next = baseline + bits`).
 *
 * @param t the table
 * @param symbol the symbol encoded
 * @param next the state that follows
 * @param add writes `count` bits of `value`
 * @returns the state
 */
export function previousState(
  t: FseTable,
  symbol: number,
  next: number,
  add: (value: number, count: number) => void,
): number {
  const v = next + t.size;
  const bits = (v + t.deltaNbBits[symbol]) >>> 16;
  add(v & ((1 << bits) - 1), bits);
  return t.stateTable[(v >> bits) + t.deltaFindState[symbol]];
}
