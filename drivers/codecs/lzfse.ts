/**
 * LZFSE: a decoder for whole LZFSE streams (Apple's `compression_lzfse`,
 * the chunks of dmg ULFO images, type 0x80000007) with every block kind
 * the format has, and an encoder that writes FSE-coded `bvx2` blocks (LZVN
 * `bvxn` blocks for small inputs, or on request), which Apple's decoder and
 * 7-Zip accept.
 *
 * Written here from the format as Apple's open-source reference library
 * (lzfse 1.0) defines it: no npm package decodes LZFSE in plain JavaScript
 * that can stop at a declared size.
 *
 * A stream is a sequence of blocks, each starting with a 4-byte magic; all
 * integers are little-endian:
 *
 * | magic  | header (bytes)      | payload                                       |
 * | ------ | ------------------- | --------------------------------------------- |
 * | `bvx-` | 8: magic, n_raw_bytes | n_raw_bytes stored bytes (read, never written: 7-Zip 26.02 cannot read them, its copy loop never counts down) |
 * | `bvxn` | 12: magic, n_raw_bytes, n_payload_bytes | LZVN opcodes ending with the 8-byte end-of-stream opcode (0x06) |
 * | `bvx1` | 772: the v1 header below, frequency tables as 360 uint16 | literal bits, then L/M/D bits |
 * | `bvx2` | header_size: 32 bytes, then the frequency tables packed | literal bits, then L/M/D bits |
 * | `bvx$` | 4: end of stream    | (nothing; bytes after it are ignored)         |
 *
 * The v1 header: n_raw_bytes, n_payload_bytes, n_literals, n_matches,
 * n_literal_payload_bytes, n_lmd_payload_bytes (uint32 each), literal_bits
 * (int32), literal_state\[4\] (uint16), lmd_bits (int32), l_state, m_state,
 * d_state (uint16), then the normalized frequencies of the 20 L, 20 M, 64
 * D and 256 literal symbols (uint16), padded to 772 bytes. The v2 header
 * packs the same fields after magic and n_raw_bytes into three uint64:
 *
 * | word | bits                                                               |
 * | ---- | ------------------------------------------------------------------ |
 * | 0    | n_literals (0-19), n_literal_payload_bytes (20-39), n_matches (40-59), literal_bits + 7 (60-62) |
 * | 1    | literal_state\[0..3\] (10 bits each, 0-39), n_lmd_payload_bytes (40-59), lmd_bits + 7 (60-62) |
 * | 2    | header_size (0-31), l_state (32-41), m_state (42-51), d_state (52-61) |
 *
 * then the 360 frequencies with a prefix code read least significant bit
 * first (codes shown most significant bit first: `00`→0, `10`→1, `001`→2,
 * `101`→3, `vv011`→4+v, `vvvv0111`→8+v, 10 bits v then `1111`→24+v),
 * ending within the last byte of header_size. Both FSE (tANS) payloads are read backwards from
 * their last bit (the `*_bits` field, -7..0, tells how many bits of the last
 * byte are unused). The literal payload holds n_literals bytes from four
 * interleaved states over 1024 states; the L/M/D payload holds n_matches
 * triples, each L (64 states), M (64) and D (256) a symbol plus extra bits.
 * A D of 0 repeats the previous distance. Distances count back from the
 * current output position and may reach into earlier blocks.
 *
 * The encoder finds matches over hash chains of 4-byte prefixes, and
 * holds each back one byte for a longer one (lazy parsing: 2.8% smaller
 * output than greedy for 10% more time). As Apple's encoder, it writes one
 * LZVN block for inputs under 4 KiB and
 * `bvx2` blocks otherwise, each closed at 10000 triples or 40000 literals,
 * with distances up to 262139 that may reach into earlier blocks; LZVN
 * blocks (on request) hold up to 1 MiB and reach 65535 back within the
 * block. On 64 MiB of /usr files in 1 MiB chunks it wrote 40.9% of the
 * input (zlib level 6: 43.6%; LZVN: 49.3%).
 *
 * This module is browser compatible.
 *
 * @module
 */

import { CodecError } from "../../streams/errors.ts";
import {
  acquireWasm,
  releaseWasm,
  WASM_COPY_LIMIT,
  WASM_SLACK,
  type WasmInstance,
} from "./_wasm.ts";
import { concat, le32, setLe32 } from "../_binary.ts";

const CODEC = "lzfse";

function fail(message: string): never {
  throw new CodecError(CODEC, message);
}

/** `bvx$`, `bvx-`, `bvx1`, `bvx2`, `bvxn` as little-endian numbers. */
const MAGIC_END = 0x24787662;
const MAGIC_RAW = 0x2d787662;
const MAGIC_V1 = 0x31787662;
const MAGIC_V2 = 0x32787662;
const MAGIC_LZVN = 0x6e787662;

const V1_HEADER_SIZE = 772;
const V2_FIXED_SIZE = 32;
/** Most literals and matches in one LZFSE block (LZFSE_LITERALS_PER_BLOCK, LZFSE_MATCHES_PER_BLOCK). */
const LITERALS_PER_BLOCK = 40000;
const MATCHES_PER_BLOCK = 10000;

const L_SYMBOLS = 20;
const M_SYMBOLS = 20;
const D_SYMBOLS = 64;
const LITERAL_SYMBOLS = 256;
const L_STATES = 64;
const M_STATES = 64;
const D_STATES = 256;
const LITERAL_STATES = 1024;
const FREQ_COUNT = L_SYMBOLS + M_SYMBOLS + D_SYMBOLS + LITERAL_SYMBOLS;

/** Base values from extra-bit counts: each symbol starts where the last ended. */
function bases(extraBits: Uint8Array): Int32Array {
  const base = new Int32Array(extraBits.length);
  for (let i = 1; i < base.length; i++) {
    base[i] = base[i - 1] + (1 << extraBits[i - 1]);
  }
  return base;
}

/** L and M: sixteen single values, then four symbols with extra bits. */
const L_EXTRA_BITS = Uint8Array.of(...new Array(16).fill(0), 2, 3, 5, 8);
const M_EXTRA_BITS = Uint8Array.of(...new Array(16).fill(0), 3, 5, 8, 11);
/** D: 0..3 alone, then groups of four carrying 1..15 extra bits. */
const D_EXTRA_BITS = Uint8Array.from(
  { length: D_SYMBOLS },
  (_, i) => i >> 2,
);
const L_BASE = bases(L_EXTRA_BITS);
const M_BASE = bases(M_EXTRA_BITS);
const D_BASE = bases(D_EXTRA_BITS);

// ---------------------------------------------------------------------------
// FSE tables.

/**
 * Checks a normalized frequency table: its sum must be the number of
 * states (Apple's encoder always fills every state), or 0 when the table
 * is never used.
 */
function checkFrequencies(
  freq: Uint16Array,
  start: number,
  count: number,
  states: number,
  used: boolean,
  what: string,
  where: string,
): void {
  let sum = 0;
  for (let i = start; i < start + count; i++) sum += freq[i];
  if (sum === states || (sum === 0 && !used)) return;
  fail(
    `${where}: ${what} frequencies sum to ${sum}, must be ${states}` +
      (used ? "" : " (or 0 for an unused table)"),
  );
}

/**
 * Fills a symbol decoder table (the literals): per state, the symbol, the
 * bits to read and the base of the next state, packed as
 * `delta << 16 | symbol << 8 | bits`.
 */
function buildSymbolTable(
  freq: Uint16Array,
  start: number,
  count: number,
  states: number,
  table: Int32Array,
): void {
  const statesClz = Math.clz32(states);
  let t = 0;
  for (let symbol = 0; symbol < count; symbol++) {
    const f = freq[start + symbol];
    if (f === 0) continue;
    // k: the shift that brings f into [states, 2 * states).
    const k = Math.clz32(f) - statesClz;
    const j0 = ((2 * states) >> k) - f;
    for (let j = 0; j < f; j++) {
      table[t++] = j < j0
        ? ((((f + j) << k) - states) << 16) | (symbol << 8) | k
        : (((j - j0) << (k - 1)) << 16) | (symbol << 8) | (k - 1);
    }
  }
}

/**
 * Fills a value decoder table (L, M, D): per state `entry` packs the bits
 * to read (state bits plus extra bits), the extra bits and the next
 * state's base as `delta << 16 | extra << 8 | total`; `base` holds the
 * symbol's base value.
 */
function buildValueTable(
  freq: Uint16Array,
  start: number,
  count: number,
  states: number,
  extraBits: Uint8Array,
  baseValues: Int32Array,
  entry: Int32Array,
  base: Int32Array,
): void {
  const statesClz = Math.clz32(states);
  let t = 0;
  for (let symbol = 0; symbol < count; symbol++) {
    const f = freq[start + symbol];
    if (f === 0) continue;
    const k = Math.clz32(f) - statesClz;
    const j0 = ((2 * states) >> k) - f;
    const extra = extraBits[symbol];
    for (let j = 0; j < f; j++) {
      entry[t] = j < j0
        ? ((((f + j) << k) - states) << 16) | (extra << 8) | (k + extra)
        : (((j - j0) << (k - 1)) << 16) | (extra << 8) | (k - 1 + extra);
      base[t++] = baseValues[symbol];
    }
  }
}

/** Scratch space for LZFSE blocks, allocated once per stream. */
interface BlockTables {
  freq: Uint16Array;
  literal: Int32Array;
  lEntry: Int32Array;
  lBase: Int32Array;
  mEntry: Int32Array;
  mBase: Int32Array;
  dEntry: Int32Array;
  dBase: Int32Array;
  literals: Uint8Array;
}

/**
 * The tables, in JavaScript memory or (with `wasm`) in the WebAssembly
 * instance's memory at `wasm.tablesAt`, laid out as lzfse.c reads them:
 * the literal table, then L, M and D entries and bases, then the literals.
 */
function newTables(wasm?: WasmBlocks): BlockTables {
  if (!wasm) {
    return {
      freq: new Uint16Array(FREQ_COUNT),
      literal: new Int32Array(LITERAL_STATES),
      lEntry: new Int32Array(L_STATES),
      lBase: new Int32Array(L_STATES),
      mEntry: new Int32Array(M_STATES),
      mBase: new Int32Array(M_STATES),
      dEntry: new Int32Array(D_STATES),
      dBase: new Int32Array(D_STATES),
      literals: new Uint8Array(LITERALS_PER_BLOCK),
    };
  }
  const buffer = wasm.instance.bytes.buffer;
  let at = wasm.tablesAt;
  const ints = (count: number) => {
    const view = new Int32Array(buffer, at, count);
    at += count * 4;
    return view;
  };
  return {
    freq: new Uint16Array(FREQ_COUNT),
    literal: ints(LITERAL_STATES),
    lEntry: ints(L_STATES),
    lBase: ints(L_STATES),
    mEntry: ints(M_STATES),
    mBase: ints(M_STATES),
    dEntry: ints(D_STATES),
    dBase: ints(D_STATES),
    literals: new Uint8Array(buffer, at, LITERALS_PER_BLOCK),
  };
}

/** Bytes of {@linkcode newTables}' layout in WebAssembly memory. */
const WASM_TABLES_SIZE =
  (LITERAL_STATES + 2 * (L_STATES + M_STATES + D_STATES)) * 4 +
  LITERALS_PER_BLOCK + WASM_SLACK;

/**
 * A stream decoding in WebAssembly: the tables at `tablesAt`, the input
 * copied to `inAt`, the output at `outAt` (each followed by
 * {@linkcode WASM_SLACK} spare bytes for lzfse.c's 8-byte copies).
 */
interface WasmBlocks {
  instance: WasmInstance;
  tablesAt: number;
  inAt: number;
  outAt: number;
}

/** What lzfse.c answers when a block does not decode (the TypeScript decoder then names why). */
class WasmRefused extends Error {}

// ---------------------------------------------------------------------------
// LZFSE blocks (bvx1, bvx2).

/**
 * Copies `m` bytes from `d` back to `dst` as a byte-by-byte copy would
 * (an overlapping source repeats its first `d` bytes), in native
 * `copyWithin` calls of a growing multiple of `d` bytes. Short matches
 * stay in the callers' byte loops: below about 32 bytes a call costs more
 * than the loop.
 */
function copyMatch(out: Uint8Array, dst: number, d: number, m: number): void {
  const src = dst - d;
  if (d >= m) {
    out.copyWithin(dst, src, src + m);
    return;
  }
  // Every copied length is a multiple of d, so the source [src, dst + done)
  // holds the pattern and ends where the copy starts.
  for (let done = 0; done < m;) {
    const length = Math.min(done + d, m - done);
    out.copyWithin(dst + done, src, src + length);
    done += length;
  }
}

/** The fields of a v1 or v2 header, validated. */
interface LzfseHeader {
  rawBytes: number;
  literals: number;
  matches: number;
  literalPayload: number;
  lmdPayload: number;
  literalBits: number;
  literalState: number[];
  lmdBits: number;
  lState: number;
  mState: number;
  dState: number;
  headerSize: number;
}

/** Bits each 5-bit window of a v2 frequency code consumes, and its value for codes of 5 bits or fewer. */
// deno-fmt-ignore
const FREQ_CODE_BITS = Int8Array.of(
  2, 3, 2, 5, 2, 3, 2, 8, 2, 3, 2, 5, 2, 3, 2, 14,
  2, 3, 2, 5, 2, 3, 2, 8, 2, 3, 2, 5, 2, 3, 2, 14,
);
// deno-fmt-ignore
const FREQ_CODE_VALUE = Int8Array.of(
  0, 2, 1, 4, 0, 3, 1, -1, 0, 2, 1, 5, 0, 3, 1, -1,
  0, 2, 1, 6, 0, 3, 1, -1, 0, 2, 1, 7, 0, 3, 1, -1,
);

/** Reads the packed frequency tables of a v2 header into `freq`. */
function readV2Frequencies(
  input: Uint8Array,
  start: number,
  end: number,
  freq: Uint16Array,
  where: string,
): void {
  if (start === end) {
    freq.fill(0);
    return;
  }
  let src = start;
  let accum = 0;
  let bits = 0;
  for (let i = 0; i < FREQ_COUNT; i++) {
    while (src < end && bits <= 24) {
      accum = (accum | (input[src++] << bits)) >>> 0;
      bits += 8;
    }
    const code = accum & 31;
    const n = FREQ_CODE_BITS[code];
    if (n > bits) {
      fail(`${where}: frequency tables end inside value ${i} of ${FREQ_COUNT}`);
    }
    freq[i] = n === 8
      ? 8 + ((accum >>> 4) & 0xf)
      : n === 14
      ? 24 + ((accum >>> 4) & 0x3ff)
      : FREQ_CODE_VALUE[code];
    accum >>>= n;
    bits -= n;
  }
  if (bits >= 8 || src !== end) {
    fail(
      `${where}: frequency tables end ${
        end - src + (bits >> 3)
      } byte(s) before header_size`,
    );
  }
}

/** Reads and validates a bvx1 or bvx2 header at `at` (fills `t.freq`). */
function readLzfseHeader(
  input: Uint8Array,
  at: number,
  magic: number,
  t: BlockTables,
  where: string,
): LzfseHeader {
  const avail = input.length - at;
  let h: LzfseHeader;
  if (magic === MAGIC_V2) {
    if (avail < V2_FIXED_SIZE) fail(`${where}: truncated bvx2 header`);
    const w0lo = le32(input, at + 8);
    const w0hi = le32(input, at + 12);
    const w1lo = le32(input, at + 16);
    const w1hi = le32(input, at + 20);
    const w2lo = le32(input, at + 24);
    const w2hi = le32(input, at + 28);
    h = {
      rawBytes: le32(input, at + 4),
      literals: w0lo & 0xfffff,
      literalPayload: (w0lo >>> 20) | ((w0hi & 0xff) << 12),
      matches: (w0hi >>> 8) & 0xfffff,
      literalBits: ((w0hi >>> 28) & 7) - 7,
      literalState: [
        w1lo & 0x3ff,
        (w1lo >>> 10) & 0x3ff,
        (w1lo >>> 20) & 0x3ff,
        (w1lo >>> 30) | ((w1hi & 0xff) << 2),
      ],
      lmdPayload: (w1hi >>> 8) & 0xfffff,
      lmdBits: ((w1hi >>> 28) & 7) - 7,
      headerSize: w2lo,
      lState: w2hi & 0x3ff,
      mState: (w2hi >>> 10) & 0x3ff,
      dState: (w2hi >>> 20) & 0x3ff,
    };
    const maxHeader = V2_FIXED_SIZE + 2 * FREQ_COUNT;
    if (h.headerSize < V2_FIXED_SIZE || h.headerSize > maxHeader) {
      fail(
        `${where}: header_size ${h.headerSize} must be ${V2_FIXED_SIZE}..${maxHeader}`,
      );
    }
    if (avail < h.headerSize) fail(`${where}: truncated bvx2 header`);
    readV2Frequencies(
      input,
      at + V2_FIXED_SIZE,
      at + h.headerSize,
      t.freq,
      where,
    );
  } else {
    if (avail < V1_HEADER_SIZE) fail(`${where}: truncated bvx1 header`);
    const u16 = (o: number) => input[at + o] | (input[at + o + 1] << 8);
    h = {
      rawBytes: le32(input, at + 4),
      literals: le32(input, at + 12),
      matches: le32(input, at + 16),
      literalPayload: le32(input, at + 20),
      lmdPayload: le32(input, at + 24),
      literalBits: le32(input, at + 28) | 0,
      literalState: [u16(32), u16(34), u16(36), u16(38)],
      lmdBits: le32(input, at + 40) | 0,
      lState: u16(44),
      mState: u16(46),
      dState: u16(48),
      headerSize: V1_HEADER_SIZE,
    };
    for (let i = 0; i < FREQ_COUNT; i++) t.freq[i] = u16(50 + 2 * i);
    if (h.literalBits < -8 || h.literalBits > 0) {
      fail(`${where}: literal_bits ${h.literalBits} must be -8..0`);
    }
    if (h.lmdBits < -8 || h.lmdBits > 0) {
      fail(`${where}: lmd_bits ${h.lmdBits} must be -8..0`);
    }
  }
  if (h.literals > LITERALS_PER_BLOCK) {
    fail(
      `${where}: n_literals ${h.literals} must be ${LITERALS_PER_BLOCK} or fewer`,
    );
  }
  if (h.matches > MATCHES_PER_BLOCK) {
    fail(
      `${where}: n_matches ${h.matches} must be ${MATCHES_PER_BLOCK} or fewer`,
    );
  }
  for (let i = 0; i < 4; i++) {
    if (h.literalState[i] >= LITERAL_STATES) {
      fail(
        `${where}: literal_state[${i}] ${
          h.literalState[i]
        } must be below ${LITERAL_STATES}`,
      );
    }
  }
  if (h.lState >= L_STATES) {
    fail(`${where}: l_state ${h.lState} must be below ${L_STATES}`);
  }
  if (h.mState >= M_STATES) {
    fail(`${where}: m_state ${h.mState} must be below ${M_STATES}`);
  }
  if (h.dState >= D_STATES) {
    fail(`${where}: d_state ${h.dState} must be below ${D_STATES}`);
  }
  if (h.headerSize + h.literalPayload + h.lmdPayload > avail) {
    fail(
      `${where}: truncated: header and payload need ${
        h.headerSize + h.literalPayload + h.lmdPayload
      } bytes, ${avail} left`,
    );
  }
  const used = h.matches > 0;
  checkFrequencies(t.freq, 0, L_SYMBOLS, L_STATES, used, "L", where);
  checkFrequencies(t.freq, L_SYMBOLS, M_SYMBOLS, M_STATES, used, "M", where);
  checkFrequencies(
    t.freq,
    L_SYMBOLS + M_SYMBOLS,
    D_SYMBOLS,
    D_STATES,
    used,
    "D",
    where,
  );
  checkFrequencies(
    t.freq,
    L_SYMBOLS + M_SYMBOLS + D_SYMBOLS,
    LITERAL_SYMBOLS,
    LITERAL_STATES,
    h.literals > 0,
    "literal",
    where,
  );
  return h;
}

/**
 * Decodes one bvx1/bvx2 block at `at` into `out` from `dst`; returns the
 * input position after it.
 *
 * The bit readers are inlined as local variables: `acc` holds `n` unread
 * bits (n ≤ 31, so every shift stays in 32-bit integers), refilled a byte
 * at a time from `pos` downwards while n ≤ 23, which leaves at least 24
 * bits: enough for the longest code (D: 8 state bits + 15 extra bits).
 * Everything in the loops is a local or a typed-array read (no objects,
 * no calls but the rare long copy). Measured here (Deno 2.9, 2 shared
 * cores, best of 3, 1 MiB chunks of a 64 MiB sample of /usr files): about
 * 240 MB/s of output for bvx2 and 380 MB/s for bvxn, 690 MB/s on
 * hdiutil's mostly-zero chunks; {@linkcode copyMatch} took a sparse
 * sample from 480 to 1950 MB/s.
 */
function decodeLzfseBlock(
  input: Uint8Array,
  at: number,
  magic: number,
  out: Uint8Array,
  dst: number,
  t: BlockTables,
  where: string,
  wasm?: WasmBlocks,
): number {
  const h = readLzfseHeader(input, at, magic, t, where);
  if (h.rawBytes > out.length - dst) {
    fail(
      `${where}: n_raw_bytes ${h.rawBytes} would pass the expected size ${out.length} (${dst} bytes written)`,
    );
  }
  const blockEnd = dst + h.rawBytes;
  const literalStart = at + h.headerSize;
  const lmdStart = literalStart + h.literalPayload;
  const lmdEnd = lmdStart + h.lmdPayload;

  // Literals: four interleaved states, read backwards from the payload's end.
  const literals = t.literals;
  const literalCount = (h.literals + 3) & ~3;
  if (literalCount > 0) {
    buildSymbolTable(
      t.freq,
      L_SYMBOLS + M_SYMBOLS + D_SYMBOLS,
      LITERAL_SYMBOLS,
      LITERAL_STATES,
      t.literal,
    );
    if (wasm) {
      const w = wasm.instance;
      const status = w.exports.lzfse_literals(
        wasm.tablesAt,
        wasm.inAt,
        literalStart,
        lmdStart,
        h.literalBits,
        h.literalState[0],
        h.literalState[1],
        h.literalState[2],
        h.literalState[3],
        literalCount,
        t.literals.byteOffset,
      );
      if (status !== 0) throw new WasmRefused();
    }
  }
  if (literalCount > 0 && !wasm) {
    const table = t.literal;
    let pos = lmdStart;
    let acc = 0;
    let n = 0;
    if (h.literalBits < 0) {
      if (pos <= literalStart) fail(`${where}: empty literal payload`);
      acc = input[--pos];
      n = 8 + h.literalBits;
      if (acc >>> n) fail(`${where}: literal stream padding bits are not zero`);
    }
    let s0 = h.literalState[0];
    let s1 = h.literalState[1];
    let s2 = h.literalState[2];
    let s3 = h.literalState[3];
    for (let i = 0; i < literalCount; i += 4) {
      while (n <= 23 && pos > literalStart) {
        acc = (acc << 8) | input[--pos];
        n += 8;
      }
      let e = table[s0];
      let k = e & 0xff;
      if (k > n) fail(`${where}: literal payload ends at literal ${i}`);
      n -= k;
      s0 = (e >> 16) + ((acc >>> n) & ((1 << k) - 1));
      literals[i] = e >>> 8;
      e = table[s1];
      k = e & 0xff;
      if (k > n) fail(`${where}: literal payload ends at literal ${i}`);
      n -= k;
      s1 = (e >> 16) + ((acc >>> n) & ((1 << k) - 1));
      literals[i + 1] = e >>> 8;
      while (n <= 23 && pos > literalStart) {
        acc = (acc << 8) | input[--pos];
        n += 8;
      }
      e = table[s2];
      k = e & 0xff;
      if (k > n) fail(`${where}: literal payload ends at literal ${i}`);
      n -= k;
      s2 = (e >> 16) + ((acc >>> n) & ((1 << k) - 1));
      literals[i + 2] = e >>> 8;
      e = table[s3];
      k = e & 0xff;
      if (k > n) fail(`${where}: literal payload ends at literal ${i}`);
      n -= k;
      s3 = (e >> 16) + ((acc >>> n) & ((1 << k) - 1));
      literals[i + 3] = e >>> 8;
    }
  }

  // L, M, D triples, executed as they are read.
  if (h.matches > 0) {
    buildValueTable(
      t.freq,
      0,
      L_SYMBOLS,
      L_STATES,
      L_EXTRA_BITS,
      L_BASE,
      t.lEntry,
      t.lBase,
    );
    buildValueTable(
      t.freq,
      L_SYMBOLS,
      M_SYMBOLS,
      M_STATES,
      M_EXTRA_BITS,
      M_BASE,
      t.mEntry,
      t.mBase,
    );
    buildValueTable(
      t.freq,
      L_SYMBOLS + M_SYMBOLS,
      D_SYMBOLS,
      D_STATES,
      D_EXTRA_BITS,
      D_BASE,
      t.dEntry,
      t.dBase,
    );
  }
  if (wasm) {
    const status = wasm.instance.exports.lzfse_lmd(
      t.lEntry.byteOffset,
      wasm.inAt,
      lmdStart,
      lmdEnd,
      h.lmdBits,
      h.lState,
      h.mState,
      h.dState,
      h.matches,
      h.literals,
      t.literals.byteOffset,
      wasm.outAt,
      dst,
      blockEnd,
    );
    if (status !== 0) throw new WasmRefused();
    return lmdEnd;
  }
  const lEntry = t.lEntry;
  const lBase = t.lBase;
  const mEntry = t.mEntry;
  const mBase = t.mBase;
  const dEntry = t.dEntry;
  const dBase = t.dBase;
  let pos = lmdEnd;
  let acc = 0;
  let n = 0;
  if (h.matches > 0 && h.lmdBits < 0) {
    if (pos <= lmdStart) fail(`${where}: empty L/M/D payload`);
    acc = input[--pos];
    n = 8 + h.lmdBits;
    if (acc >>> n) fail(`${where}: L/M/D stream padding bits are not zero`);
  }
  let lState = h.lState;
  let mState = h.mState;
  let dState = h.dState;
  let lit = 0;
  let d = -1;
  for (let i = 0; i < h.matches; i++) {
    while (n <= 23 && pos > lmdStart) {
      acc = (acc << 8) | input[--pos];
      n += 8;
    }
    let e = lEntry[lState];
    let total = e & 0xff;
    if (total > n) fail(`${where}: L/M/D payload ends at match ${i}`);
    n -= total;
    let bits = (acc >>> n) & ((1 << total) - 1);
    let extra = (e >>> 8) & 0xff;
    const l = lBase[lState] + (bits & ((1 << extra) - 1));
    lState = (e >> 16) + (bits >>> extra);

    while (n <= 23 && pos > lmdStart) {
      acc = (acc << 8) | input[--pos];
      n += 8;
    }
    e = mEntry[mState];
    total = e & 0xff;
    if (total > n) fail(`${where}: L/M/D payload ends at match ${i}`);
    n -= total;
    bits = (acc >>> n) & ((1 << total) - 1);
    extra = (e >>> 8) & 0xff;
    const m = mBase[mState] + (bits & ((1 << extra) - 1));
    mState = (e >> 16) + (bits >>> extra);

    while (n <= 23 && pos > lmdStart) {
      acc = (acc << 8) | input[--pos];
      n += 8;
    }
    e = dEntry[dState];
    total = e & 0xff;
    if (total > n) fail(`${where}: L/M/D payload ends at match ${i}`);
    n -= total;
    bits = (acc >>> n) & ((1 << total) - 1);
    extra = (e >>> 8) & 0xff;
    const newD = dBase[dState] + (bits & ((1 << extra) - 1));
    dState = (e >> 16) + (bits >>> extra);
    if (newD !== 0) d = newD;

    if (lit + l > h.literals) {
      fail(`${where}: match ${i} uses literals past n_literals ${h.literals}`);
    }
    if (l + m > blockEnd - dst) {
      fail(`${where}: match ${i} writes past n_raw_bytes ${h.rawBytes}`);
    }
    for (let j = 0; j < l; j++) out[dst++] = literals[lit++];
    if (d < 1 || d > dst) {
      fail(
        `${where}: match ${i} distance ${d} reaches before the start of the output (at ${dst})`,
      );
    }
    if (m > 32) {
      copyMatch(out, dst, d, m);
      dst += m;
    } else {
      for (let j = 0; j < m; j++, dst++) out[dst] = out[dst - d];
    }
  }
  if (dst !== blockEnd) {
    fail(
      `${where}: decodes to ${
        h.rawBytes - (blockEnd - dst)
      } bytes, n_raw_bytes says ${h.rawBytes}`,
    );
  }
  return lmdEnd;
}

// ---------------------------------------------------------------------------
// LZVN blocks (bvxn).

/**
 * Decodes the LZVN opcodes in `input[src..srcEnd)` into `out[dst..dstEnd)`;
 * the payload must end with the end-of-stream opcode exactly at `srcEnd`,
 * having written exactly up to `dstEnd`.
 *
 * Opcodes (L literal bytes follow the opcode, M match bytes are copied
 * from D back; `pre` reuses the previous D):
 *
 * | opcode bits                | meaning                                  |
 * | -------------------------- | ---------------------------------------- |
 * | `LLMMMDDD DDDDDDDD`        | sml_d: L 0-3, M 3-10, D 0-1535           |
 * | `LLMMM110`                 | pre_d: L 1-3, M 3-10, previous D         |
 * | `LLMMM111 D(16 bits, LE)`  | lrg_d: L 0-3, M 3-10, D 0-65535          |
 * | `101LLMMM DDDDDDMM DDDDDDDD` | med_d: L 0-3, M 3-34, D 0-16383        |
 * | `1110LLLL` / `11100000 L-16` | literal of 1-15 / 16-271 bytes         |
 * | `1111MMMM` / `11110000 M-16` | match of 1-15 / 16-271, previous D     |
 * | 0x06 + 7 bytes             | end of stream                            |
 * | 0x0e, 0x16                 | no operation                             |
 * | 0x1e-0x3e (low bits 110), 0x70-0x7f, 0xd0-0xdf | undefined        |
 *
 * Where WebAssembly runs, `lzvn_decode` in `_wasm/lzvn.c` decodes the
 * block instead (the same checks; 559 against 268 MB/s per core here on
 * 1 MiB LZVN chunks of real files); this decoder runs where it cannot,
 * and names the error when the C code refuses a block.
 */
function decodeLzvnBlock(
  input: Uint8Array,
  src: number,
  srcEnd: number,
  out: Uint8Array,
  dst: number,
  dstEnd: number,
  where: string,
): void {
  let d = 0;
  for (;;) {
    if (src >= srcEnd) {
      fail(`${where}: LZVN payload ends without end-of-stream`);
    }
    const op = input[src];
    let l: number;
    let m: number;
    let opLength: number;
    if (op >= 0xe0) {
      if (op >= 0xf0) {
        // Match only, previous distance.
        l = 0;
        if (op === 0xf0) {
          opLength = 2;
          if (src + 2 >= srcEnd) break;
          m = input[src + 1] + 16;
        } else {
          opLength = 1;
          m = op & 0xf;
        }
      } else {
        // Literal only.
        m = 0;
        if (op === 0xe0) {
          opLength = 2;
          if (src + 2 >= srcEnd) break;
          l = input[src + 1] + 16;
        } else {
          opLength = 1;
          l = op & 0xf;
        }
      }
    } else if (op >= 0xa0 && op < 0xc0) {
      // med_d
      opLength = 3;
      l = (op >> 3) & 3;
      if (src + 3 + l >= srcEnd) break;
      const b1 = input[src + 1];
      m = (((op & 7) << 2) | (b1 & 3)) + 3;
      d = (b1 >> 2) | (input[src + 2] << 6);
    } else if ((op & 0xf0) === 0x70 || (op & 0xf0) === 0xd0) {
      fail(
        `${where}: undefined LZVN opcode 0x${op.toString(16)} at byte ${src}`,
      );
    } else {
      l = op >> 6;
      m = ((op >> 3) & 7) + 3;
      const low = op & 7;
      if (low === 6) {
        if (l === 0) {
          if (op === 0x06) {
            // End of stream: the opcode and 7 more bytes, ending the payload.
            if (src + 8 !== srcEnd) {
              fail(
                `${where}: LZVN end-of-stream at byte ${src} leaves ${
                  srcEnd - src - 8
                } payload bytes`,
              );
            }
            if (dst !== dstEnd) {
              fail(
                `${where}: LZVN block ends ${
                  dstEnd - dst
                } bytes short of n_raw_bytes`,
              );
            }
            return;
          }
          if (op === 0x0e || op === 0x16) {
            src++;
            continue;
          }
          fail(
            `${where}: undefined LZVN opcode 0x${
              op.toString(16)
            } at byte ${src}`,
          );
        }
        opLength = 1;
        if (src + 1 + l >= srcEnd) break;
      } else if (low === 7) {
        opLength = 3;
        if (src + 3 + l >= srcEnd) break;
        d = input[src + 1] | (input[src + 2] << 8);
      } else {
        opLength = 2;
        if (src + 2 + l >= srcEnd) break;
        d = (low << 8) | input[src + 1];
      }
    }
    src += opLength;
    if (l > 0) {
      if (src + l >= srcEnd) break;
      if (l > dstEnd - dst) {
        fail(`${where}: LZVN literal at byte ${src} writes past n_raw_bytes`);
      }
      for (const e = src + l; src < e;) out[dst++] = input[src++];
    }
    if (m > 0) {
      if (d < 1 || d > dst) {
        fail(
          `${where}: LZVN match distance ${d} reaches before the start of the output (at ${dst})`,
        );
      }
      if (m > dstEnd - dst) {
        fail(`${where}: LZVN match writes past n_raw_bytes`);
      }
      if (m > 32) {
        copyMatch(out, dst, d, m);
        dst += m;
      } else {
        for (const e = dst + m; dst < e; dst++) out[dst] = out[dst - d];
      }
    }
  }
  fail(`${where}: LZVN payload is truncated (opcode at byte ${src})`);
}

// ---------------------------------------------------------------------------
// The stream.

/**
 * Decodes a whole LZFSE stream (any sequence of `bvx-`, `bvxn`, `bvx1` and
 * `bvx2` blocks up to `bvx$`) to exactly `expectedSize` bytes; throws a
 * {@linkcode CodecError} for a bad magic, a truncated stream, an invalid
 * frequency table, a distance before the start of the output, or a total
 * other than `expectedSize`, checking every block's size before writing
 * it, so it never allocates more than `expectedSize` plus about 60 KiB of
 * tables.
 *
 * @param input the stream (bytes after `bvx$` are ignored, as Apple's decoder does)
 * @param expectedSize how many bytes the stream must decode to
 * @returns the decoded bytes
 *
 * @example
 * ```ts
 * import { decode, encode } from "./lzfse.ts";
 * const text = new TextEncoder().encode("hello hello hello hello");
 * const packed = await encode(text);
 * console.log(new TextDecoder().decode(await decode(packed, text.length)));
 * ```
 */
export function decode(
  input: Uint8Array,
  expectedSize: number,
): Promise<Uint8Array> {
  try {
    return Promise.resolve(decodeStream(input, expectedSize));
  } catch (e) {
    return Promise.reject(e);
  }
}

/**
 * Decodes a whole LZFSE stream (as {@linkcode decode}) into `out`, which
 * it must fill exactly: a 64 MiB dmg chunk decodes straight into the
 * caller's (or a worker's shared) buffer, with no array of its own.
 *
 * @param input the stream
 * @param out where the decoded bytes go; its length is the expected size
 *
 * @example
 * ```ts
 * import { decodeInto, encode } from "./lzfse.ts";
 * const text = new TextEncoder().encode("hello hello hello hello");
 * const out = new Uint8Array(text.length);
 * await decodeInto(await encode(text), out);
 * console.log(new TextDecoder().decode(out)); // hello hello hello hello
 * ```
 */
export function decodeInto(input: Uint8Array, out: Uint8Array): Promise<void> {
  try {
    decodeStream(input, out.length, out);
    return Promise.resolve();
  } catch (e) {
    return Promise.reject(e);
  }
}

function decodeStream(
  input: Uint8Array,
  expectedSize: number,
  into?: Uint8Array,
): Uint8Array {
  if (!Number.isSafeInteger(expectedSize) || expectedSize < 0) {
    fail(`expected size ${expectedSize} is not a byte count`);
  }
  // In WebAssembly where it runs: the FSE and LZVN loops in lzfse.c and
  // lzvn.c. Up to WASM_COPY_LIMIT the whole output is in its memory, then
  // copied out once; past it (64 MiB dmg chunks) only a window is, each
  // block copied out as it is decoded (see OutputWindow). Any refusal
  // there is decoded again in TypeScript, which names it.
  const instance = acquireWasm();
  let out: Uint8Array | undefined = into;
  if (instance) {
    try {
      const tablesAt = instance.heapBase;
      const inAt = tablesAt + WASM_TABLES_SIZE;
      const outAt = (inAt + input.length + WASM_SLACK + 7) & ~7;
      const whole = expectedSize <= WASM_COPY_LIMIT;
      const room = whole ? expectedSize : WINDOW_BYTES;
      if (instance.ensure(outAt + room + WASM_SLACK)) {
        const wasm = { instance, tablesAt, inAt, outAt };
        instance.bytes.set(input, inAt);
        if (whole) {
          const view = instance.bytes.subarray(outAt, outAt + expectedSize);
          decodeBlocks(input, expectedSize, view, wasm);
          if (!into) return view.slice();
          into.set(view);
          return into;
        }
        out ??= allocate(expectedSize);
        const window = new OutputWindow(instance, outAt, out);
        decodeBlocks(input, expectedSize, out, wasm, window);
        return out;
      }
    } catch (e) {
      if (!(e instanceof CodecError || e instanceof WasmRefused)) throw e;
    } finally {
      releaseWasm(instance);
    }
  }
  return decodeBlocks(input, expectedSize, out ?? allocate(expectedSize));
}

function allocate(size: number): Uint8Array {
  try {
    return new Uint8Array(size);
  } catch {
    fail(`expected size ${size} cannot be allocated`);
  }
}

/**
 * Bytes of history an output window keeps: more than the farthest match
 * an LZFSE block can code (D up to 262143) or LZVN's (65535). A stream
 * reaching farther (it cannot, by the format's tables) would be refused
 * in WebAssembly and decoded again in TypeScript.
 */
const WINDOW_HISTORY = 1 << 20;
/** The window's usual size in linear memory: history plus room for blocks. */
const WINDOW_BYTES = 4 << 20;

/**
 * The output of a stream over {@linkcode WASM_COPY_LIMIT}, in WebAssembly
 * memory: a window at `outAt` holding output bytes from `base` on, each
 * block decoded at its end and then copied to its place in `out`. Before
 * a block that does not fit, the window keeps its last
 * {@linkcode WINDOW_HISTORY} bytes and starts there (a block larger than
 * the window grows linear memory to hold it). A 64 MiB chunk thus costs
 * its input and about 4 MiB of linear memory instead of a second 64 MiB,
 * and decodes at the WebAssembly loops' speed rather than TypeScript's.
 */
class OutputWindow {
  base = 0;
  constructor(
    readonly instance: WasmInstance,
    readonly outAt: number,
    readonly out: Uint8Array,
  ) {}

  /**
   * Makes room for `raw` bytes at output position `dst` and answers the
   * window's bytes up to the block's end (position `dst - base` in it).
   */
  room(dst: number, raw: number): Uint8Array {
    const memory = this.instance;
    let held = dst - this.base;
    const capacity = memory.exports.memory.buffer.byteLength - this.outAt -
      WASM_SLACK;
    if (held + raw > capacity) {
      const keep = Math.min(held, WINDOW_HISTORY);
      const at = this.outAt;
      memory.bytes.copyWithin(at, at + held - keep, at + held);
      this.base = dst - keep;
      held = keep;
      if (!memory.ensure(at + held + raw + WASM_SLACK)) {
        throw new WasmRefused();
      }
    }
    return memory.bytes.subarray(this.outAt, this.outAt + held + raw);
  }

  /** Copies the block just decoded, `raw` bytes at output position `dst`, to `out`. */
  done(dst: number, raw: number): void {
    const from = this.outAt + dst - this.base;
    this.out.set(this.instance.bytes.subarray(from, from + raw), dst);
  }
}

/**
 * Decodes the stream's blocks into `out` (of `expectedSize` bytes); with
 * `window`, into the WebAssembly window, each block then copied to `out`.
 */
function decodeBlocks(
  input: Uint8Array,
  expectedSize: number,
  out: Uint8Array,
  wasm?: WasmBlocks,
  window?: OutputWindow,
): Uint8Array {
  let tables: BlockTables | undefined;
  let dst = 0;
  let at = 0;
  for (let block = 0;; block++) {
    if (input.length - at < 4) {
      fail(
        at === 0
          ? "empty input: no block magic"
          : `truncated at byte ${at}: no end-of-stream block (bvx$)`,
      );
    }
    const magic = le32(input, at);
    const where = `block ${block} (at byte ${at})`;
    if (magic === MAGIC_END) break;
    // Where this block's bytes go: `out` at dst, or the window at `local`.
    let target = out;
    let local = dst;
    let windowRaw = 0;
    if (window) {
      if (input.length - at < 8) throw new WasmRefused();
      windowRaw = le32(input, at + 4);
      if (windowRaw > expectedSize - dst) throw new WasmRefused();
      target = window.room(dst, windowRaw);
      local = dst - window.base;
      // Linear memory grown for a large block: the tables' views went
      // with the old buffer, so they are laid out again.
      if (tables?.literals.buffer !== wasm!.instance.exports.memory.buffer) {
        tables = undefined;
      }
    }
    if (magic === MAGIC_RAW || magic === MAGIC_LZVN) {
      const headerSize = magic === MAGIC_RAW ? 8 : 12;
      if (input.length - at < headerSize) fail(`${where}: truncated header`);
      const raw = le32(input, at + 4);
      if (raw > expectedSize - dst) {
        fail(
          `${where}: n_raw_bytes ${raw} would pass the expected size ${expectedSize} (${dst} bytes written)`,
        );
      }
      const payload = magic === MAGIC_RAW ? raw : le32(input, at + 8);
      const start = at + headerSize;
      if (payload > input.length - start) {
        fail(
          `${where}: truncated: payload of ${payload} bytes, ${
            input.length - start
          } left`,
        );
      }
      if (magic === MAGIC_RAW) {
        target.set(input.subarray(start, start + raw), local);
      } else if (wasm) {
        // lzvn.c: offsets count from the input's and the output's start.
        const status = wasm.instance.exports.lzvn_decode(
          wasm.inAt,
          start,
          start + payload,
          wasm.outAt,
          local,
          local + raw,
        );
        if (status !== 0) throw new WasmRefused();
      } else {
        decodeLzvnBlock(
          input,
          start,
          start + payload,
          target,
          local,
          local + raw,
          where,
        );
      }
      dst += raw;
      at = start + payload;
    } else if (magic === MAGIC_V1 || magic === MAGIC_V2) {
      tables ??= newTables(wasm);
      const end = decodeLzfseBlock(
        input,
        at,
        magic,
        target,
        local,
        tables,
        where,
        wasm,
      );
      dst += le32(input, at + 4);
      at = end;
    } else {
      const shown = Array.from(
        input.subarray(at, at + 4),
        (b) => b.toString(16).padStart(2, "0"),
      ).join(" ");
      fail(
        `${where}: bad block magic ${shown} (expected bvx$, bvx-, bvxn, bvx1 or bvx2)`,
      );
    }
    if (window) window.done(dst - windowRaw, windowRaw);
  }
  if (dst !== expectedSize) {
    fail(`stream decodes to ${dst} bytes, expected ${expectedSize}`);
  }
  return out;
}

// ---------------------------------------------------------------------------
// LZVN encoding.

/**
 * Raw bytes per block the encoder writes: hdiutil's ULFO chunk size, so a
 * chunk is one block. The format allows 2^32 - 1 (n_raw_bytes and
 * n_payload_bytes are uint32); LZVN distances reach 65535 back whatever
 * the block size, and the encoder never reaches into an earlier block.
 */
const BLOCK_SIZE = 1 << 20;
/** Longest distance an LZVN opcode carries (lrg_d: 16 bits). */
const LZVN_MAX_DISTANCE = 0xffff;
const LZVN_MIN_MATCH = 4;
const HASH_BITS = 16;
/** Candidates tried per position; more gains little on disk data. */
const CHAIN_DEPTH = 16;
/** A match this long ends the search at once. */
const GOOD_MATCH = 256;

/** Writes literal-only opcodes for `input[from..from+count)` at `q`; returns the new `q`. */
function emitLiterals(
  input: Uint8Array,
  from: number,
  count: number,
  out: Uint8Array,
  q: number,
): number {
  while (count > 0) {
    const chunk = count > 271 ? 271 : count;
    if (chunk >= 16) {
      out[q++] = 0xe0;
      out[q++] = chunk - 16;
    } else {
      out[q++] = 0xe0 | chunk;
    }
    for (let i = 0; i < chunk; i++) out[q++] = input[from++];
    count -= chunk;
  }
  return q;
}

/**
 * Writes `length` literals from `from` followed by a match of `m` bytes at
 * distance `d` (`previous` is the distance of the last match); returns the
 * new `q`.
 */
function emitMatch(
  input: Uint8Array,
  from: number,
  length: number,
  m: number,
  d: number,
  previous: number,
  out: Uint8Array,
  q: number,
): number {
  // All but the last 0-3 literals go in literal-only opcodes.
  const keep = length & 3;
  if (length > 3) q = emitLiterals(input, from, length - keep, out, q);
  from += length - keep;
  // sml_d, pre_d and lrg_d hold M up to 10, 8, 6 or 4 for 0-3 literals
  // (the other opcode values are med_d, literal and undefined ones).
  const short = 10 - 2 * keep;
  let first: number;
  if (d === previous && keep === 0) {
    first = 0; // the whole match as match-only opcodes below
  } else if (d === previous) {
    first = m > short ? short : m;
    out[q++] = (keep << 6) | ((first - 3) << 3) | 6; // pre_d
  } else if (d < 1536 && m <= short) {
    first = m;
    out[q++] = (keep << 6) | ((first - 3) << 3) | (d >> 8); // sml_d
    out[q++] = d & 0xff;
  } else if (d < 16384) {
    first = m > 34 ? 34 : m;
    out[q++] = 0xa0 | (keep << 3) | ((first - 3) >> 2); // med_d
    out[q++] = ((first - 3) & 3) | ((d & 0x3f) << 2);
    out[q++] = d >> 6;
  } else {
    first = m > short ? short : m;
    out[q++] = (keep << 6) | ((first - 3) << 3) | 7; // lrg_d
    out[q++] = d & 0xff;
    out[q++] = d >> 8;
  }
  // The 0-3 literals follow the opcode.
  for (let i = 0; i < keep; i++) out[q++] = input[from + i];
  // The rest of the match repeats the distance.
  let rest = m - first;
  while (rest > 0) {
    const chunk = rest > 271 ? 271 : rest;
    if (chunk >= 16) {
      out[q++] = 0xf0;
      out[q++] = chunk - 16;
    } else {
      out[q++] = 0xf0 | chunk;
    }
    rest -= chunk;
  }
  return q;
}

/** Reusable matcher state. */
interface Matcher {
  head: Int32Array;
  chain: Int32Array;
  payload: Uint8Array;
}

/**
 * Compresses `input[start..end)` as LZVN opcodes ending with end-of-stream
 * into `m.payload`; returns the payload length (at most 1% over the raw
 * size, for incompressible bytes).
 *
 * Greedy parsing over hash chains of 4-byte prefixes: `head` holds the
 * last position of each hash, `chain` the previous position with the same
 * hash (indexes relative to `start`).
 */
function lzvnBlock(
  input: Uint8Array,
  start: number,
  end: number,
  m: Matcher,
): number {
  const { head, chain, payload } = m;
  head.fill(-1);
  let q = 0;
  let literalStart = start;
  let previous = 0;
  let i = start;
  const last = end - LZVN_MIN_MATCH; // last position a match may start
  while (i <= last) {
    const word = input[i] | (input[i + 1] << 8) | (input[i + 2] << 16) |
      (input[i + 3] << 24);
    const h = Math.imul(word, 0x9e3779b1) >>> (32 - HASH_BITS);
    let candidate = head[h];
    head[h] = i - start;
    chain[i - start] = candidate;
    let bestLength = 0;
    let bestDistance = 0;
    const maxLength = end - i;
    for (let depth = 0; depth < CHAIN_DEPTH && candidate >= 0; depth++) {
      const c = candidate + start;
      const distance = i - c;
      if (distance > LZVN_MAX_DISTANCE) break;
      if (input[c + bestLength] === input[i + bestLength]) {
        let n = 0;
        while (n < maxLength && input[c + n] === input[i + n]) n++;
        if (n > bestLength || (n === bestLength && distance === previous)) {
          bestLength = n;
          bestDistance = distance;
          if (n >= GOOD_MATCH) break;
        }
      }
      candidate = chain[candidate];
    }
    if (bestLength < LZVN_MIN_MATCH) {
      i++;
      continue;
    }
    q = emitMatch(
      input,
      literalStart,
      i - literalStart,
      bestLength,
      bestDistance,
      previous,
      payload,
      q,
    );
    previous = bestDistance;
    // Index the positions inside the match too.
    const matchEnd = i + bestLength;
    for (i++; i < matchEnd && i <= last; i++) {
      const w = input[i] | (input[i + 1] << 8) | (input[i + 2] << 16) |
        (input[i + 3] << 24);
      const hh = Math.imul(w, 0x9e3779b1) >>> (32 - HASH_BITS);
      chain[i - start] = head[hh];
      head[hh] = i - start;
    }
    i = matchEnd;
    literalStart = i;
  }
  q = emitLiterals(input, literalStart, end - literalStart, payload, q);
  // End of stream: opcode 0x06 and seven zero bytes.
  payload.fill(0, q, q + 8);
  payload[q] = 0x06;
  q += 8;
  return q;
}

/**
 * Appends LZVN blocks for `input[from..to)`, even where they come out
 * larger than the bytes: 7-Zip (26.02 and earlier) cannot read stored
 * `bvx-` blocks (its copy loop never counts down), so the encoder writes
 * none, as Apple's writes none for inputs of 4 KiB or more.
 */
function lzvnBlocks(
  input: Uint8Array,
  from: number,
  to: number,
  parts: Uint8Array[],
): void {
  const blockMax = Math.min(to - from, BLOCK_SIZE);
  const m: Matcher = {
    head: new Int32Array(1 << HASH_BITS),
    chain: new Int32Array(blockMax),
    // Room for a payload overshooting the raw size by one emission.
    payload: new Uint8Array(blockMax + (blockMax >> 2) + 1024),
  };
  for (let start = from; start < to; start += BLOCK_SIZE) {
    const end = Math.min(to, start + BLOCK_SIZE);
    const size = lzvnBlock(input, start, end, m);
    const part = new Uint8Array(12 + size);
    setLe32(part, 0, MAGIC_LZVN);
    setLe32(part, 4, end - start);
    setLe32(part, 8, size);
    part.set(m.payload.subarray(0, size), 12);
    parts.push(part);
  }
}

// ---------------------------------------------------------------------------
// LZFSE (bvx2) encoding.

/** Largest L, M and D one triple carries (LZFSE_ENCODE_MAX_*_VALUE). */
const MAX_L = L_BASE[L_SYMBOLS - 1] + (1 << L_EXTRA_BITS[L_SYMBOLS - 1]) - 1;
const MAX_M = M_BASE[M_SYMBOLS - 1] + (1 << M_EXTRA_BITS[M_SYMBOLS - 1]) - 1;
const MAX_D = D_BASE[D_SYMBOLS - 1] + (1 << D_EXTRA_BITS[D_SYMBOLS - 1]) - 1;
/** Inputs smaller than this get one LZVN block, as Apple's encoder does. */
const LZVN_THRESHOLD = 4096;
/** The match finder's window: a power of two above MAX_D. */
const WINDOW_BITS = 18;
const FSE_CHAIN_DEPTH = 12;

/** The L or M symbol of `value`: itself below 16, then four ranges. */
function lengthSymbol(base: Int32Array, value: number): number {
  if (value < 16) return value;
  return value < base[17]
    ? 16
    : value < base[18]
    ? 17
    : value < base[19]
    ? 18
    : 19;
}

/**
 * The D symbol of `value`: itself below 4, then groups of four symbols of
 * 2^g values each from 4 * (2^g - 1), so g = floor(log2(value + 4)) - 2.
 */
function distanceSymbol(value: number): number {
  if (value < 4) return value;
  const g = 29 - Math.clz32(value + 4);
  return 4 * g + ((value - 4 * ((1 << g) - 1)) >> g);
}

/**
 * Scales symbol counts to frequencies summing to `states`, every symbol
 * that occurs getting at least 1 (an unused table gets all states on
 * symbol 0, as Apple's encoder writes it).
 */
function normalize(
  counts: Uint32Array,
  states: number,
  freq: Uint16Array,
  at: number,
): void {
  let total = 0;
  for (let i = 0; i < counts.length; i++) total += counts[i];
  for (let i = 0; i < counts.length; i++) freq[at + i] = 0;
  if (total === 0) {
    freq[at] = states;
    return;
  }
  let sum = 0;
  let largest = 0;
  for (let i = 0; i < counts.length; i++) {
    if (counts[i] === 0) continue;
    const f = Math.max(1, Math.round((counts[i] * states) / total));
    freq[at + i] = f;
    sum += f;
    if (f > freq[at + largest] || counts[largest] === 0) largest = i;
  }
  // Rounding and the minimum of 1 leave the sum off by at most one per
  // symbol: take from (or give to) the largest frequencies.
  while (sum > states) {
    let best = -1;
    for (let i = 0; i < counts.length; i++) {
      if (freq[at + i] > 1 && (best < 0 || freq[at + i] > freq[at + best])) {
        best = i;
      }
    }
    freq[at + best]--;
    sum--;
  }
  freq[at + largest] += states - sum;
}

/** FSE encoder entries per symbol: s0, k, delta0, delta1. */
function encoderTable(
  freq: Uint16Array,
  at: number,
  count: number,
  states: number,
): Int32Array {
  const table = new Int32Array(4 * count);
  const statesClz = Math.clz32(states);
  let offset = 0;
  for (let symbol = 0; symbol < count; symbol++) {
    const f = freq[at + symbol];
    if (f === 0) continue;
    const k = Math.clz32(f) - statesClz;
    table[4 * symbol] = (f << k) - states;
    table[4 * symbol + 1] = k;
    table[4 * symbol + 2] = offset - f + (states >> k);
    table[4 * symbol + 3] = k > 0 ? offset - f + (states >> (k - 1)) : 0;
    offset += f;
  }
  return table;
}

/** A forward bit writer, least significant bit first. */
class BitWriter {
  out: Uint8Array;
  q: number;
  acc = 0;
  n = 0;
  constructor(out: Uint8Array, q: number) {
    this.out = out;
    this.q = q;
  }
  push(value: number, bits: number): void {
    this.acc |= value << this.n;
    this.n += bits;
    while (this.n >= 8) {
      this.out[this.q++] = this.acc & 0xff;
      this.acc >>>= 8;
      this.n -= 8;
    }
  }
  /** Writes the last partial byte; returns the unused bits as -7..0. */
  finish(): number {
    if (this.n === 0) return 0;
    this.out[this.q++] = this.acc & 0xff;
    const bits = this.n - 8;
    this.acc = 0;
    this.n = 0;
    return bits;
  }
}

/** Encodes `symbol` from `state` with `table`; returns the next state. */
function fseEncode(
  w: BitWriter,
  table: Int32Array,
  state: number,
  symbol: number,
): number {
  const e = 4 * symbol;
  const hi = state >= table[e];
  const bits = hi ? table[e + 1] : table[e + 1] - 1;
  w.push(state & ((1 << bits) - 1), bits);
  return (hi ? table[e + 2] : table[e + 3]) + (state >> bits);
}

/** The triples and literals of the block being built. */
interface PendingBlock {
  l: Int32Array;
  m: Int32Array;
  d: Int32Array;
  matches: number;
  literals: Uint8Array;
  literalCount: number;
  /** The block's raw size so far. */
  raw: number;
}

/** Writes the pending block as `bvx2`. */
function flushFseBlock(
  b: PendingBlock,
  parts: Uint8Array[],
): void {
  if (b.matches === 0) return;
  while (b.literalCount & 3) b.literals[b.literalCount++] = 0;
  // A D equal to the previous one is written as 0.
  let previous = 0;
  for (let i = 0; i < b.matches; i++) {
    if (b.d[i] === previous) b.d[i] = 0;
    else previous = b.d[i];
  }
  const lCounts = new Uint32Array(L_SYMBOLS);
  const mCounts = new Uint32Array(M_SYMBOLS);
  const dCounts = new Uint32Array(D_SYMBOLS);
  const literalCounts = new Uint32Array(LITERAL_SYMBOLS);
  const lSym = new Uint8Array(b.matches);
  const mSym = new Uint8Array(b.matches);
  const dSym = new Uint8Array(b.matches);
  for (let i = 0; i < b.matches; i++) {
    lCounts[lSym[i] = lengthSymbol(L_BASE, b.l[i])]++;
    mCounts[mSym[i] = lengthSymbol(M_BASE, b.m[i])]++;
    dCounts[dSym[i] = distanceSymbol(b.d[i])]++;
  }
  for (let i = 0; i < b.literalCount; i++) literalCounts[b.literals[i]]++;
  const freq = new Uint16Array(FREQ_COUNT);
  normalize(lCounts, L_STATES, freq, 0);
  normalize(mCounts, M_STATES, freq, L_SYMBOLS);
  normalize(dCounts, D_STATES, freq, L_SYMBOLS + M_SYMBOLS);
  const literalAt = L_SYMBOLS + M_SYMBOLS + D_SYMBOLS;
  normalize(literalCounts, LITERAL_STATES, freq, literalAt);

  const out = new Uint8Array(
    V2_FIXED_SIZE + 2 * FREQ_COUNT + 2 * b.literalCount + 8 +
      8 * b.matches + 16,
  );
  // Frequency tables, packed after the fixed part.
  const header = new BitWriter(out, V2_FIXED_SIZE);
  for (let i = 0; i < FREQ_COUNT; i++) {
    const f = freq[i];
    if (f < 2) header.push(f === 0 ? 0 : 2, 2);
    else if (f < 4) header.push(f === 2 ? 1 : 5, 3);
    else if (f < 8) header.push(3 + ((f - 4) << 3), 5);
    else if (f < 24) header.push(7 + ((f - 8) << 4), 8);
    else header.push(15 + ((f - 24) << 4), 14);
  }
  header.finish();
  const headerSize = header.q;

  // Literals, last first, so the decoder reads them first to last.
  const literalTable = encoderTable(
    freq,
    literalAt,
    LITERAL_SYMBOLS,
    LITERAL_STATES,
  );
  const w = new BitWriter(out, headerSize);
  let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  const lit = b.literals;
  for (let i = b.literalCount - 4; i >= 0; i -= 4) {
    s3 = fseEncode(w, literalTable, s3, lit[i + 3]);
    s2 = fseEncode(w, literalTable, s2, lit[i + 2]);
    s1 = fseEncode(w, literalTable, s1, lit[i + 1]);
    s0 = fseEncode(w, literalTable, s0, lit[i]);
  }
  const literalBits = w.finish();
  const literalPayload = w.q - headerSize;

  // L, M, D: 8 zero bytes first (Apple's decoder loads 8 bytes at a time
  // and must not start before the payload), then the triples, last first.
  const lmdStart = w.q;
  w.q += 8;
  const lTable = encoderTable(freq, 0, L_SYMBOLS, L_STATES);
  const mTable = encoderTable(freq, L_SYMBOLS, M_SYMBOLS, M_STATES);
  const dTable = encoderTable(freq, L_SYMBOLS + M_SYMBOLS, D_SYMBOLS, D_STATES);
  let lState = 0, mState = 0, dState = 0;
  for (let i = b.matches - 1; i >= 0; i--) {
    let sym = dSym[i];
    w.push(b.d[i] - D_BASE[sym], D_EXTRA_BITS[sym]);
    dState = fseEncode(w, dTable, dState, sym);
    sym = mSym[i];
    w.push(b.m[i] - M_BASE[sym], M_EXTRA_BITS[sym]);
    mState = fseEncode(w, mTable, mState, sym);
    sym = lSym[i];
    w.push(b.l[i] - L_BASE[sym], L_EXTRA_BITS[sym]);
    lState = fseEncode(w, lTable, lState, sym);
  }
  const lmdBits = w.finish();
  const lmdPayload = w.q - lmdStart;

  // The header's packed fields (see the module doc).
  setLe32(out, 0, MAGIC_V2);
  setLe32(out, 4, b.raw);
  setLe32(out, 8, (b.literalCount | ((literalPayload & 0xfff) << 20)) >>> 0);
  setLe32(
    out,
    12,
    ((literalPayload >>> 12) | (b.matches << 8) | ((literalBits + 7) << 28)) >>>
      0,
  );
  setLe32(out, 16, (s0 | (s1 << 10) | (s2 << 20) | ((s3 & 3) << 30)) >>> 0);
  setLe32(
    out,
    20,
    ((s3 >>> 2) | (lmdPayload << 8) | ((lmdBits + 7) << 28)) >>> 0,
  );
  setLe32(out, 24, headerSize);
  setLe32(out, 28, lState | (mState << 10) | (dState << 20));
  parts.push(out.slice(0, w.q));
  b.raw = 0;
  b.matches = 0;
  b.literalCount = 0;
}

/**
 * Compresses `input` as `bvx2` blocks: lazy parsing over hash chains of
 * 4-byte prefixes with a 256 KiB window (matches may reach into earlier
 * blocks, as Apple's encoder's do), each block closed when it holds 10000
 * triples or 40000 literals (the decoder's limits).
 */
function fseBlocks(input: Uint8Array, parts: Uint8Array[]): void {
  const windowMask = (1 << WINDOW_BITS) - 1;
  const head = new Int32Array(1 << HASH_BITS).fill(-1);
  const chain = new Int32Array(1 << WINDOW_BITS);
  const b: PendingBlock = {
    l: new Int32Array(MATCHES_PER_BLOCK),
    m: new Int32Array(MATCHES_PER_BLOCK),
    d: new Int32Array(MATCHES_PER_BLOCK),
    matches: 0,
    literals: new Uint8Array(LITERALS_PER_BLOCK),
    literalCount: 0,
    raw: 0,
  };
  /** Adds one triple (L ≤ MAX_L, M ≤ MAX_M), closing the block first when full. */
  const push = (from: number, l: number, m: number, d: number) => {
    if (
      b.matches + 1 > MATCHES_PER_BLOCK ||
      b.literalCount + l + 4 > LITERALS_PER_BLOCK
    ) {
      flushFseBlock(b, parts);
    }
    b.l[b.matches] = l;
    b.m[b.matches] = m;
    b.d[b.matches++] = d;
    const literals = b.literals;
    let n = b.literalCount;
    for (const e = from + l; from < e;) literals[n++] = input[from++];
    b.literalCount = n;
    b.raw += l + m;
  };
  /** Adds literals `from..from+l` and a match of m at distance d (m may be 0). */
  const emit = (from: number, l: number, m: number, d: number) => {
    while (l > MAX_L) {
      push(from, MAX_L, 0, 1);
      from += MAX_L;
      l -= MAX_L;
    }
    while (m > MAX_M) {
      push(from, l, MAX_M, d);
      from += l;
      l = 0;
      m -= MAX_M;
    }
    if (l > 0 || m > 0) push(from, l, m, d);
  };
  const end = input.length;
  const last = end - LZVN_MIN_MATCH;
  /** Distance of the match the last `search` found. */
  let found = 0;
  /** Indexes position `i` and returns its longest match (distance in `found`). */
  const search = (i: number): number => {
    const word = input[i] | (input[i + 1] << 8) | (input[i + 2] << 16) |
      (input[i + 3] << 24);
    const h = Math.imul(word, 0x9e3779b1) >>> (32 - HASH_BITS);
    let candidate = head[h];
    head[h] = i;
    chain[i & windowMask] = candidate;
    let bestLength = 0;
    const maxLength = end - i;
    for (let depth = 0; depth < FSE_CHAIN_DEPTH && candidate >= 0; depth++) {
      const distance = i - candidate;
      if (distance > MAX_D) break;
      if (input[candidate + bestLength] === input[i + bestLength]) {
        let n = 0;
        while (n < maxLength && input[candidate + n] === input[i + n]) n++;
        if (n > bestLength) {
          bestLength = n;
          found = distance;
          if (n >= GOOD_MATCH) break;
        }
      }
      candidate = chain[candidate & windowMask];
    }
    return bestLength;
  };
  // Lazy parsing: a match is held back one position, and dropped for a
  // longer one starting there.
  let literalStart = 0;
  let pendingAt = -1;
  let pendingLength = 0;
  let pendingDistance = 0;
  let i = 0;
  while (i <= last) {
    const length = search(i);
    if (pendingAt >= 0) {
      if (length > pendingLength) {
        pendingAt = i;
        pendingLength = length;
        pendingDistance = found;
        i++;
        continue;
      }
      emit(
        literalStart,
        pendingAt - literalStart,
        pendingLength,
        pendingDistance,
      );
      const matchEnd = pendingAt + pendingLength;
      // Index the rest of the match (its first two positions already are).
      for (i++; i < matchEnd && i <= last; i++) {
        const w = input[i] | (input[i + 1] << 8) | (input[i + 2] << 16) |
          (input[i + 3] << 24);
        const hh = Math.imul(w, 0x9e3779b1) >>> (32 - HASH_BITS);
        chain[i & windowMask] = head[hh];
        head[hh] = i;
      }
      i = matchEnd;
      literalStart = i;
      pendingAt = -1;
      continue;
    }
    if (length >= LZVN_MIN_MATCH) {
      pendingAt = i;
      pendingLength = length;
      pendingDistance = found;
    } else if (i + 1 - literalStart >= 8 * MAX_L) {
      // Keep the literals of one triple within reach of a block.
      emit(literalStart, MAX_L, 0, 1);
      literalStart += MAX_L;
    }
    i++;
  }
  if (pendingAt >= 0) {
    emit(
      literalStart,
      pendingAt - literalStart,
      pendingLength,
      pendingDistance,
    );
    literalStart = pendingAt + pendingLength;
  }
  emit(literalStart, end - literalStart, 0, 1);
  flushFseBlock(b, parts);
}

/** How {@linkcode encode} builds its blocks. */
export interface EncodeOptions {
  /**
   * `lzfse`: FSE-coded `bvx2` blocks, as Apple's encoder writes for inputs
   * of 4 KiB or more; `lzvn`: LZVN `bvxn` blocks of up to 1 MiB, faster to
   * decode and weaker.
   *
   * @default {"lzfse"} (`lzvn` for inputs under 4096 bytes, as Apple's encoder)
   */
  method?: "lzfse" | "lzvn";
}

/**
 * Compresses `input` as an LZFSE stream ending with `bvx$`: `bvx2` blocks
 * (or `bvxn` for inputs under 4 KiB, as Apple's encoder chooses), and no
 * stored `bvx-` blocks, which 7-Zip cannot read. Apple's decoder and 7-Zip
 * read the result; empty input gives just `bvx$`.
 *
 * @param input the bytes
 * @param options the block kind
 * @returns the LZFSE stream
 *
 * @example
 * ```ts
 * import { decode, encode } from "./lzfse.ts";
 * const zeros = new Uint8Array(100000);
 * const packed = await encode(zeros);
 * console.log(packed.length < 200); // true
 * const lzvn = await encode(zeros, { method: "lzvn" });
 * console.log((await decode(lzvn, zeros.length)).length); // 100000
 * ```
 */
export function encode(
  input: Uint8Array,
  options: EncodeOptions = {},
): Promise<Uint8Array> {
  try {
    return Promise.resolve(encodeStream(input, options));
  } catch (e) {
    return Promise.reject(e);
  }
}

function encodeStream(input: Uint8Array, options: EncodeOptions): Uint8Array {
  const method = options.method ??
    (input.length < LZVN_THRESHOLD ? "lzvn" : "lzfse");
  const parts: Uint8Array[] = [];
  if (method === "lzvn") lzvnBlocks(input, 0, input.length, parts);
  else fseBlocks(input, parts);
  const end = new Uint8Array(4);
  setLe32(end, 0, MAGIC_END);
  parts.push(end);
  return concat(parts);
}
