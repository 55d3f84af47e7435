/**
 * A check of a zstd compressed block's Huffman weights before the block
 * goes to fzstd, for the hostile input on which fzstd 0.1.1 never returns
 * (found by `tests/fuzz_test.ts`, a qcow2 zstd cluster with 4 bytes
 * changed): Huffman weights coded with FSE (RFC 8878 4.2.1.2) whose
 * states read no bits, so that fzstd's weight loop never reaches the
 * start of the stream. The reference decoder stops at 255 weights; this
 * walk does the same and refuses a stream that yields more.
 *
 * Only the block's headers and tables are walked (a few hundred bytes), not
 * its data. What this walk cannot parse is refused as malformed; what it
 * passes is then decoded (and checked) by fzstd.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { CodecError } from "../../streams/errors.ts";

function fail(where: string, message: string): never {
  throw new CodecError("zstd", `${where}: ${message}`);
}

/** `n` (at most 16) bits of `b` from bit `pos`, least significant first. */
function bitsAt(b: Uint8Array, pos: number, n: number): number {
  const at = pos >> 3;
  const word = (b[at] ?? 0) | ((b[at + 1] ?? 0) << 8) |
    ((b[at + 2] ?? 0) << 16);
  return (word >>> (pos & 7)) & ((1 << n) - 1);
}

/** The index of the highest set bit of `v` (> 0). */
function highBit(v: number): number {
  return 31 - Math.clz32(v);
}

/** An FSE table description read (RFC 8878 4.1.1). */
interface FseDescription {
  /** The accuracy log: the table has `1 << accuracyLog` states. */
  accuracyLog: number;
  /** Each symbol's count; -1 for "less than 1". */
  counts: number[];
  /** The byte after the description. */
  end: number;
}

/**
 * Reads the FSE table description at byte `at` (before `end`); one that
 * does not add up to its table size is refused.
 */
function readFse(
  b: Uint8Array,
  at: number,
  end: number,
  maxLog: number,
  maxSymbol: number,
  where: string,
): FseDescription {
  if (at >= end) fail(where, "FSE table description truncated");
  const accuracyLog = (b[at] & 15) + 5;
  if (accuracyLog > maxLog) {
    fail(where, `FSE accuracy log ${accuracyLog} is over ${maxLog}`);
  }
  const size = 1 << accuracyLog;
  let pos = at * 8 + 4;
  let remaining = size + 1;
  let threshold = size;
  let nbBits = accuracyLog + 1;
  const counts: number[] = [];
  while (remaining > 1 && counts.length <= maxSymbol) {
    if (pos >= end * 8) fail(where, "FSE table description truncated");
    const max = 2 * threshold - 1 - remaining;
    const v = bitsAt(b, pos, nbBits);
    let count: number;
    if ((v & (threshold - 1)) < max) {
      count = v & (threshold - 1);
      pos += nbBits - 1;
    } else {
      count = v & (2 * threshold - 1);
      if (count >= threshold) count -= max;
      pos += nbBits;
    }
    count -= 1;
    remaining -= count < 0 ? -count : count;
    counts.push(count);
    if (count === 0) {
      for (;;) {
        const repeat = bitsAt(b, pos, 2);
        pos += 2;
        for (let i = 0; i < repeat; i++) counts.push(0);
        if (repeat !== 3) break;
        if (counts.length > maxSymbol + 1) break;
      }
    }
    while (remaining < threshold && nbBits > 1) {
      nbBits--;
      threshold >>= 1;
    }
  }
  if (remaining !== 1 || counts.length > maxSymbol + 1) {
    fail(where, "FSE table description does not sum to its table size");
  }
  const stop = (pos + 7) >> 3;
  if (stop > end) fail(where, "FSE table description truncated");
  return { accuracyLog, counts, end: stop };
}

/**
 * Walks FSE-coded Huffman weights as fzstd decodes them (two interleaved
 * states from the end of the stream) and refuses more than 255 weights.
 */
function checkWeights(
  b: Uint8Array,
  table: FseDescription,
  last: number,
  where: string,
) {
  const { accuracyLog, counts } = table;
  const size = 1 << accuracyLog;
  // The decoding table: symbol of each state, then bits and baseline.
  const symbol = new Uint8Array(size);
  let high = size - 1;
  counts.forEach((c, s) => {
    if (c === -1) symbol[high--] = s;
  });
  const step = (size >> 1) + (size >> 3) + 3;
  let at = 0;
  counts.forEach((c, s) => {
    for (let i = 0; i < c; i++) {
      symbol[at] = s;
      do at = (at + step) & (size - 1); while (at > high);
    }
  });
  const next = counts.map((c) => (c === -1 ? 1 : c));
  const bits = new Uint8Array(size);
  const base = new Uint16Array(size);
  for (let u = 0; u < size; u++) {
    const n = next[symbol[u]]++;
    bits[u] = accuracyLog - highBit(n);
    base[u] = (n << bits[u]) - size;
  }
  const lastByte = b[last];
  if (!lastByte) fail(where, "Huffman weights stream without its end mark");
  const start = table.end * 8;
  let pos = last * 8 + highBit(lastByte);
  let s1 = 0, s2 = 0, n1 = accuracyLog, n2 = accuracyLog;
  for (let weights = 0;;) {
    pos -= n1;
    if (pos < start) break;
    s1 += bitsAt(b, pos, n1);
    pos -= n2;
    if (pos < start) break;
    s2 += bitsAt(b, pos, n2);
    weights += 2;
    if (weights > 255) fail(where, "more than 255 Huffman weights");
    n1 = bits[s1];
    s1 = base[s1];
    n2 = bits[s2];
    s2 = base[s2];
  }
}

/**
 * Checks the tables of the compressed block `b[at, end)` (its content,
 * after the 3-byte block header) before fzstd decodes it.
 *
 * @param b bytes holding the block
 * @param at the block's first content byte
 * @param end one past its last byte
 * @param where the frame and block, for messages
 * @throws {CodecError} for weights fzstd could not finish, or tables this
 *   walk cannot read
 *
 * @example
 * ```ts
 * import { checkBlockTables } from "./_zstd_check.ts";
 * // Raw literals (3 bytes) and no sequences: nothing to refuse.
 * checkBlockTables(Uint8Array.of(0x18, 1, 2, 3, 0), 0, 5, "block 1");
 * ```
 */
export function checkBlockTables(
  b: Uint8Array,
  at: number,
  end: number,
  where: string,
): void {
  if (at >= end) fail(where, "empty compressed block");
  const b0 = b[at];
  const type = b0 & 3;
  const format = (b0 >> 2) & 3;
  const byte = (i: number) => {
    if (at + i >= end) fail(where, "literals section header truncated");
    return b[at + i];
  };
  let literalsEnd: number;
  if (type < 2) {
    let header: number, size: number;
    if (format === 0 || format === 2) {
      header = 1;
      size = b0 >> 3;
    } else if (format === 1) {
      header = 2;
      size = (b0 >> 4) + (byte(1) << 4);
    } else {
      header = 3;
      size = (b0 >> 4) + (byte(1) << 4) + (byte(2) << 12);
    }
    literalsEnd = at + header + (type === 0 ? size : 1);
  } else {
    let header: number, compressed: number;
    if (format < 2) {
      header = 3;
      compressed = (byte(1) >> 6) | (byte(2) << 2);
    } else if (format === 2) {
      header = 4;
      compressed = (byte(2) >> 2) | (byte(3) << 6);
    } else {
      header = 5;
      compressed = (byte(2) >> 6) | (byte(3) << 2) | (byte(4) << 10);
    }
    literalsEnd = at + header + compressed;
    if (literalsEnd > end) fail(where, "literals past the block's end");
    if (type === 2) {
      const tree = at + header;
      const hb = b[tree];
      if (hb < 128) {
        const last = tree + hb;
        if (hb === 0 || last >= literalsEnd) {
          fail(where, "Huffman tree description past the literals");
        }
        const table = readFse(b, tree + 1, last + 1, 6, 255, where);
        checkWeights(b, table, last, where);
      }
    }
  }
  if (literalsEnd > end) fail(where, "literals past the block's end");
  let pos = literalsEnd;
  if (pos >= end) return; // fzstd names a missing sequences section
  const s0 = b[pos];
  if (s0 === 0) return;
  pos += s0 < 128 ? 1 : s0 < 255 ? 2 : 3;
  if (pos >= end) return;
  const modes = b[pos++];
  // Literal lengths, offsets, match lengths: their largest accuracy log
  // and symbol (RFC 8878 3.1.1.3.2.2).
  const tables: [number, number, number][] = [
    [modes >> 6, 9, 35],
    [(modes >> 4) & 3, 8, 31],
    [(modes >> 2) & 3, 9, 52],
  ];
  for (const [mode, maxLog, maxSymbol] of tables) {
    if (mode === 1) pos += 1;
    else if (mode === 2) {
      pos = readFse(b, pos, end, maxLog, maxSymbol, where).end;
    }
  }
}
