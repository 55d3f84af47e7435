/**
 * xz: a decoder for `.xz` streams (one or several, with stream padding)
 * whose blocks hold LZMA2, checking the block header, index and footer
 * CRC-32s and each block's check (none, CRC-32, CRC-64 or SHA-256), and
 * an encoder that writes one LZMA2 block with a CRC-32 check, which
 * `xz -d`, 7-Zip and the Linux kernel's XZ Embedded decoder (cloop 4)
 * accept.
 *
 * dmg ULMO chunks (type 0x80000008) and cloop 4 blocks with compressor 2
 * are whole xz streams; the cloop module decodes them with the kernel's
 * xz_dec, which checks only CRC-32, so the encoder writes CRC-32 checks
 * (as `xz --check=crc32`) and a dictionary no larger than the input (and
 * at most 8 MiB, xz -6's).
 *
 * Written here rather than taken from npm: xz-decompress is a wasm build
 * that only streams and cannot stop at a declared size, lzma (LZMA-JS)
 * handles `.lzma` files only, and @napi-rs/lzma is a native addon.
 *
 * The stream (all integers little-endian; "varint" is 7 bits a byte, low
 * first, at most 9 bytes):
 *
 * | size     | field                                                      |
 * | -------- | ---------------------------------------------------------- |
 * | 6        | magic FD 37 7A 58 5A 00                                    |
 * | 2        | stream flags: 0, check type (0 none, 1 CRC-32, 4 CRC-64, 10 SHA-256) |
 * | 4        | CRC-32 of the stream flags                                 |
 * | per block: |                                                          |
 * | 1        | header size / 4 - 1 (0 marks the index instead)            |
 * | 1        | block flags: filters - 1 (bits 0-1), sizes present (bits 6, 7) |
 * | varints  | compressed size, uncompressed size (when flagged)          |
 * | per filter: | varint id (0x21 LZMA2), varint properties size, properties |
 * | 0..3 + 4 | zero padding to the header size, CRC-32 of the header      |
 * | ...      | LZMA2 chunks, then zero padding to a multiple of 4         |
 * | 0..32    | the check of the uncompressed data                         |
 * | index:   | 0, varint record count, per block varint unpadded size and uncompressed size, padding, CRC-32 |
 * | 4        | footer: CRC-32 of the next 6 bytes                         |
 * | 4        | backward size: index size / 4 - 1                          |
 * | 2        | stream flags again                                         |
 * | 2        | magic "YZ"                                                 |
 *
 * LZMA2 chunks: a control byte; 0 ends, 1 and 2 are stored chunks (1
 * resets the dictionary) of a big-endian 16-bit size + 1 bytes, 0x80..0xff
 * are LZMA chunks whose bits 0-4 and two more bytes give the unpacked size
 * - 1, two bytes the packed size - 1, bits 5-6 what is reset (0 nothing,
 * 1 state, 2 state and new properties byte, 3 everything with the
 * dictionary).
 *
 * This module is browser compatible.
 *
 * @module
 */

import { CodecError } from "../../streams/errors.ts";
import { concat } from "../_binary.ts";
import { crc32 } from "./crc32.ts";
import type { ByteFeed } from "./_feed.ts";
import {
  acquireWasm,
  MAX_WASM_MEMORY,
  releaseWasm,
  WASM_COPY_LIMIT,
  WASM_SLACK,
  type WasmInstance,
} from "./_wasm.ts";

const CODEC = "xz";

function fail(message: string): never {
  throw new CodecError(CODEC, message);
}

const MAGIC = [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00];
const FOOTER_MAGIC = [0x59, 0x5a];
const CHECK_CRC32 = 1;
const CHECK_CRC64 = 4;
const CHECK_SHA256 = 10;
/** Bytes of each check type's field (types without a name keep their size). */
const CHECK_SIZES = [0, 4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64];
const FILTER_LZMA2 = 0x21;
const FILTER_NAMES: Record<number, string> = {
  0x03: "delta",
  0x04: "x86 BCJ",
  0x05: "PowerPC BCJ",
  0x06: "IA-64 BCJ",
  0x07: "ARM BCJ",
  0x08: "ARM-Thumb BCJ",
  0x09: "SPARC BCJ",
  0x0a: "ARM64 BCJ",
  0x0b: "RISC-V BCJ",
};

// ---------------------------------------------------------------------------
// CRC-64 (ECMA-182, reflected), as two 32-bit halves.

const CRC64_LO = new Uint32Array(256);
const CRC64_HI = new Uint32Array(256);
{
  const polyLo = 0xd7870f42;
  const polyHi = 0xc96c5795;
  for (let n = 0; n < 256; n++) {
    let lo = n;
    let hi = 0;
    for (let k = 0; k < 8; k++) {
      const low = lo & 1;
      lo = ((lo >>> 1) | (hi << 31)) >>> 0;
      hi >>>= 1;
      if (low) {
        lo = (lo ^ polyLo) >>> 0;
        hi = (hi ^ polyHi) >>> 0;
      }
    }
    CRC64_LO[n] = lo;
    CRC64_HI[n] = hi;
  }
}

/** An incremental CRC-64 (xz's check type 4). */
class Crc64 {
  lo = 0xffffffff;
  hi = 0xffffffff;

  update(bytes: Uint8Array): void {
    // In WebAssembly (crc64.c, about 6x this loop) in 1 MiB pieces.
    const wasm = bytes.length >= 4096 ? acquireWasm() : undefined;
    if (wasm) {
      try {
        const at = wasm.heapBase;
        if (wasm.ensure(at + (1 << 20))) {
          for (let from = 0; from < bytes.length; from += 1 << 20) {
            const piece = bytes.subarray(from, from + (1 << 20));
            wasm.bytes.set(piece, at);
            this.lo = wasm.exports.crc64_update(
              this.lo,
              this.hi,
              at,
              piece.length,
            ) >>> 0;
            this.hi = wasm.exports.crc64_high() >>> 0;
          }
          return;
        }
      } finally {
        releaseWasm(wasm);
      }
    }
    let lo = this.lo;
    let hi = this.hi;
    for (let i = 0; i < bytes.length; i++) {
      const index = (lo ^ bytes[i]) & 0xff;
      lo = ((lo >>> 8) | (hi << 24)) ^ CRC64_LO[index];
      hi = (hi >>> 8) ^ CRC64_HI[index];
    }
    this.lo = lo;
    this.hi = hi;
  }

  /** The CRC as 8 little-endian bytes (the order xz stores it). */
  digest(): Uint8Array {
    const out = new Uint8Array(8);
    const v = new DataView(out.buffer);
    v.setUint32(0, ~this.lo >>> 0, true);
    v.setUint32(4, ~this.hi >>> 0, true);
    return out;
  }
}

/** CRC-64 of `bytes` as 8 little-endian bytes (the order xz stores it). */
function crc64(bytes: Uint8Array): Uint8Array {
  const c = new Crc64();
  c.update(bytes);
  return c.digest();
}

function le32(b: Uint8Array, at: number): number {
  return (b[at] | (b[at + 1] << 8) | (b[at + 2] << 16) | (b[at + 3] << 24)) >>>
    0;
}

function hexBytes(b: Uint8Array): string {
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

// ---------------------------------------------------------------------------
// LZMA decoding.

/** Probabilities are 11-bit; this is one half. */
const PROB_INIT = 1024;
const STATES = 12;
const POS_STATES_MAX = 16;
const MATCH_LEN_MIN = 2;
const MATCH_LEN_MAX = 273;
const DIST_MODEL_END = 14;
const FULL_DISTANCES = 128;

// Where each probability group starts in one Uint16Array.
const IS_MATCH = 0;
const IS_REP = IS_MATCH + STATES * POS_STATES_MAX;
const IS_REP_G0 = IS_REP + STATES;
const IS_REP_G1 = IS_REP_G0 + STATES;
const IS_REP_G2 = IS_REP_G1 + STATES;
const IS_REP0_LONG = IS_REP_G2 + STATES;
const POS_SLOT = IS_REP0_LONG + STATES * POS_STATES_MAX;
const SPEC_POS = POS_SLOT + 4 * 64;
const ALIGN = SPEC_POS + FULL_DISTANCES - DIST_MODEL_END;
const LEN_CODER = ALIGN + 16;
// A length coder: choice, choice2, low[16][8], mid[16][8], high[256].
const LEN_CHOICE = 0;
const LEN_CHOICE2 = 1;
const LEN_LOW = 2;
const LEN_MID = LEN_LOW + POS_STATES_MAX * 8;
const LEN_HIGH = LEN_MID + POS_STATES_MAX * 8;
const LEN_SIZE = LEN_HIGH + 256;
const REP_LEN_CODER = LEN_CODER + LEN_SIZE;
const LITERAL = REP_LEN_CODER + LEN_SIZE;

/** State after a literal, a match, a repeated match, a short repeat. */
const NEXT_LITERAL = [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 4, 5];
const NEXT_MATCH = 7;
const NEXT_REP = 8;
const NEXT_SHORT_REP = 9;

/** lc, lp, pb from an LZMA properties byte. */
interface Properties {
  lc: number;
  lp: number;
  pb: number;
}

function parseProperties(byte: number): Properties {
  if (byte >= 9 * 5 * 5) fail(`LZMA properties byte ${byte} must be below 225`);
  const lc = byte % 9;
  const lp = Math.floor(byte / 9) % 5;
  const pb = Math.floor(byte / 45);
  if (lc + lp > 4) fail(`LZMA2 needs lc + lp <= 4, found lc ${lc} lp ${lp}`);
  return { lc, lp, pb };
}

/**
 * The LZMA decoder of one LZMA2 block: probabilities, state and repeat
 * distances live across chunks until a chunk resets them. The output
 * buffer is the dictionary (the whole block is in memory), so matches copy
 * within it.
 */
class LzmaDecoder {
  probs = new Uint16Array(LITERAL + 0x300 * 16);
  state = 0;
  rep0 = 0;
  rep1 = 0;
  rep2 = 0;
  rep3 = 0;
  props: Properties = { lc: 0, lp: 0, pb: 0 };
  /**
   * Distances must stay below this (the block's dictionary size) when the
   * output is a sliding window that keeps only that much history.
   */
  dictSize = Infinity;
  // The range decoder.
  input: Uint8Array = new Uint8Array(0);
  inPos = 0;
  inEnd = 0;
  /**
   * The range coder's range and code, 32-bit unsigned. In a typed array,
   * not fields: values past 2^30 in a field are boxed numbers, and storing
   * one per decoded bit showed in the V8 profile (15% of the time on the
   * line storing the code after a 1 bit).
   */
  rc = new Uint32Array(2);

  resetState(): void {
    this.probs.fill(
      PROB_INIT,
      0,
      LITERAL + (0x300 << (this.props.lc + this.props.lp)),
    );
    this.state = 0;
    this.rep0 =
      this.rep1 =
      this.rep2 =
      this.rep3 =
        0;
  }

  /** Decodes one bit with the probability at `index`. */
  bit(index: number): number {
    const probs = this.probs;
    const rc = this.rc;
    const p = probs[index];
    let range = rc[0];
    if (range < 0x1000000) {
      if (this.inPos >= this.inEnd) fail("LZMA chunk data ends early");
      range = (range << 8) >>> 0;
      rc[1] = (rc[1] << 8) | this.input[this.inPos++];
    }
    const bound = (range >>> 11) * p;
    const code = rc[1];
    if (code < bound) {
      rc[0] = bound;
      probs[index] = p + ((2048 - p) >>> 5);
      return 0;
    }
    rc[0] = range - bound;
    rc[1] = code - bound;
    probs[index] = p - (p >>> 5);
    return 1;
  }

  /** Decodes `bits` equiprobable bits, most significant first. */
  direct(bits: number): number {
    const rc = this.rc;
    let range = rc[0], code = rc[1];
    let result = 0;
    for (let i = 0; i < bits; i++) {
      if (range < 0x1000000) {
        if (this.inPos >= this.inEnd) fail("LZMA chunk data ends early");
        range = (range << 8) >>> 0;
        code = ((code << 8) | this.input[this.inPos++]) >>> 0;
      }
      range >>>= 1;
      let bit = 0;
      if (code >= range) {
        code -= range;
        bit = 1;
      }
      result = ((result << 1) | bit) >>> 0;
    }
    rc[0] = range;
    rc[1] = code;
    return result;
  }

  tree(base: number, bits: number): number {
    let m = 1;
    for (let i = 0; i < bits; i++) m = (m << 1) | this.bit(base + m);
    return m - (1 << bits);
  }

  reverseTree(base: number, bits: number): number {
    let m = 1;
    let result = 0;
    for (let i = 0; i < bits; i++) {
      const b = this.bit(base + m);
      m = (m << 1) | b;
      result |= b << i;
    }
    return result;
  }

  length(base: number, posState: number): number {
    if (this.bit(base + LEN_CHOICE) === 0) {
      return this.tree(base + LEN_LOW + posState * 8, 3);
    }
    if (this.bit(base + LEN_CHOICE2) === 0) {
      return 8 + this.tree(base + LEN_MID + posState * 8, 3);
    }
    return 16 + this.tree(base + LEN_HIGH, 8);
  }

  /**
   * Decodes one LZMA chunk: `packed` input bytes at `inPos` to `unpacked`
   * output bytes at `op`. `dictStart` is where the dictionary was last
   * reset: no match reaches before it.
   */
  chunk(
    input: Uint8Array,
    inPos: number,
    packed: number,
    out: Uint8Array,
    op: number,
    unpacked: number,
    dictStart: number,
  ): void {
    this.input = input;
    this.inPos = inPos + 5;
    this.inEnd = inPos + packed;
    if (packed < 5 || input[inPos] !== 0) {
      fail("LZMA chunk does not start a range coder");
    }
    this.rc[1] = le32BE(input, inPos + 1);
    this.rc[0] = 0xffffffff;
    const { lc, lp, pb } = this.props;
    const pbMask = (1 << pb) - 1;
    const lpMask = (1 << lp) - 1;
    const end = op + unpacked;
    const probs = this.probs;
    let state = this.state;
    while (op < end) {
      const pos = op - dictStart;
      const posState = pos & pbMask;
      if (this.bit(IS_MATCH + (state << 4) + posState) === 0) {
        // A literal, coded against the byte at rep0 after a match.
        const prev = op > dictStart ? out[op - 1] : 0;
        const base = LITERAL +
          0x300 * (((pos & lpMask) << lc) + (prev >>> (8 - lc)));
        // The literal's eight or so bits decoded here rather than by
        // `bit()`, with the range coder in locals: `bit()` was not inlined
        // into this big loop, and literals are most of the calls (V8
        // profile, 16 MiB of a tar of /usr/lib: 47% of the time in `bit`).
        // With the typed-array state below: 25 -> 28 MB/s per core.
        const rc = this.rc;
        let range = rc[0], code = rc[1], inPos = this.inPos;
        const inEnd = this.inEnd;
        let symbol = 1;
        if (state < 7) {
          while (symbol < 0x100) {
            const i = base + symbol;
            const p = probs[i];
            if (range < 0x1000000) {
              if (inPos >= inEnd) fail("LZMA chunk data ends early");
              range = (range << 8) >>> 0;
              code = ((code << 8) | input[inPos++]) >>> 0;
            }
            const bound = (range >>> 11) * p;
            if (code < bound) {
              range = bound;
              probs[i] = p + ((2048 - p) >>> 5);
              symbol <<= 1;
            } else {
              range -= bound;
              code -= bound;
              probs[i] = p - (p >>> 5);
              symbol = (symbol << 1) | 1;
            }
          }
        } else {
          let matchByte = out[op - this.rep0 - 1] << 1;
          let offset = 0x100;
          while (symbol < 0x100) {
            const matchBit = matchByte & offset;
            matchByte <<= 1;
            const i = base + offset + matchBit + symbol;
            const p = probs[i];
            if (range < 0x1000000) {
              if (inPos >= inEnd) fail("LZMA chunk data ends early");
              range = (range << 8) >>> 0;
              code = ((code << 8) | input[inPos++]) >>> 0;
            }
            const bound = (range >>> 11) * p;
            if (code < bound) {
              range = bound;
              probs[i] = p + ((2048 - p) >>> 5);
              symbol <<= 1;
              offset &= ~matchBit;
            } else {
              range -= bound;
              code -= bound;
              probs[i] = p - (p >>> 5);
              symbol = (symbol << 1) | 1;
              offset = matchBit;
            }
          }
        }
        rc[0] = range;
        rc[1] = code;
        this.inPos = inPos;
        out[op++] = symbol & 0xff;
        state = NEXT_LITERAL[state];
        continue;
      }
      let len: number;
      if (this.bit(IS_REP + state) === 0) {
        // A match with a new distance.
        len = this.length(LEN_CODER, posState);
        const lenState = len < 4 ? len : 3;
        const slot = this.tree(POS_SLOT + lenState * 64, 6);
        let dist: number;
        if (slot < 4) {
          dist = slot;
        } else {
          const footer = (slot >>> 1) - 1;
          dist = ((2 | (slot & 1)) << footer) >>> 0;
          if (slot < DIST_MODEL_END) {
            dist += this.reverseTree(SPEC_POS + dist - slot - 1, footer);
          } else {
            dist += this.direct(footer - 4) * 16;
            dist += this.reverseTree(ALIGN, 4);
          }
        }
        if (dist === 0xffffffff) fail("end marker inside an LZMA2 chunk");
        this.rep3 = this.rep2;
        this.rep2 = this.rep1;
        this.rep1 = this.rep0;
        this.rep0 = dist;
        state = state < 7 ? NEXT_MATCH : 10;
      } else {
        if (this.bit(IS_REP_G0 + state) === 0) {
          if (this.bit(IS_REP0_LONG + (state << 4) + posState) === 0) {
            // Short repeat: one byte from rep0.
            if (this.rep0 >= op - dictStart || this.rep0 >= this.dictSize) {
              fail("distance reaches before the dictionary");
            }
            out[op] = out[op - this.rep0 - 1];
            op++;
            state = state < 7 ? NEXT_SHORT_REP : 11;
            continue;
          }
        } else {
          let dist: number;
          if (this.bit(IS_REP_G1 + state) === 0) {
            dist = this.rep1;
          } else {
            if (this.bit(IS_REP_G2 + state) === 0) {
              dist = this.rep2;
            } else {
              dist = this.rep3;
              this.rep3 = this.rep2;
            }
            this.rep2 = this.rep1;
          }
          this.rep1 = this.rep0;
          this.rep0 = dist;
        }
        len = this.length(REP_LEN_CODER, posState);
        state = state < 7 ? NEXT_REP : 11;
      }
      len += MATCH_LEN_MIN;
      const dist = this.rep0;
      if (dist >= op - dictStart || dist >= this.dictSize) {
        fail("distance reaches before the dictionary");
      }
      if (len > end - op) fail("a match runs past the chunk's unpacked size");
      // Byte by byte: the source may overlap the destination.
      let from = op - dist - 1;
      if (dist + 1 >= len && len > 16) {
        // copyWithin's call costs more than a short loop.
        out.copyWithin(op, from, from + len);
        op += len;
      } else {
        for (const stop = op + len; op < stop;) out[op++] = out[from++];
      }
    }
    this.state = state;
    // The chunk's range coder must end exactly at its packed size.
    const rc = this.rc;
    if (rc[0] < 0x1000000 && this.inPos < this.inEnd) {
      rc[0] = rc[0] << 8;
      rc[1] = (rc[1] << 8) | input[this.inPos++];
    }
    if (this.inPos !== this.inEnd || rc[1] !== 0) {
      fail("LZMA chunk does not end where its packed size says");
    }
    void probs;
  }
}

function le32BE(b: Uint8Array, at: number): number {
  return ((b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]) >>>
    0;
}

/** Decoded output and where it has got to. */
interface Output {
  out: Uint8Array;
  length: number;
}

/**
 * Decodes the LZMA2 data of one block starting at `pos`, appending to
 * `o`; returns the position after the end-of-data byte. In WebAssembly,
 * the block decodes into a window in linear memory and each chunk is
 * copied out; in TypeScript, straight into `o.out`.
 */
function decodeLzma2(
  input: Uint8Array,
  pos: number,
  end: number,
  o: Output,
  dictSize: number,
  declared: number | undefined,
): number {
  const limit = Math.min(o.out.length - o.length, declared ?? Infinity);
  const keep = Math.min(dictSize, limit);
  // The window is copied out chunk by chunk: on top of the output, so
  // only while it stays small (see WASM_COPY_LIMIT).
  const window =
    (keep <= WASM_COPY_LIMIT
      ? WasmWindow.open(keep, dictSize, limit)
      : undefined) ??
      new ScriptWindow(keep, dictSize, limit, o.out, o.length);
  const copyOut = window.out !== o.out;
  try {
    return decodeChunks(input, pos, end, o, window, copyOut);
  } finally {
    window.release();
  }
}

/** {@linkcode decodeLzma2}'s chunks, into `window` (and `o.out` when `copyOut`). */
function decodeChunks(
  input: Uint8Array,
  pos: number,
  end: number,
  o: Output,
  window: Window,
  copyOut: boolean,
): number {
  let needDictReset = true;
  let needProperties = true;
  for (;;) {
    if (pos >= end) fail("LZMA2 data ends without its end byte");
    const control = input[pos++];
    if (control === 0) return pos;
    if (control >= 0xe0 || control === 1) {
      needProperties = true;
      needDictReset = false;
      window.dictStart = window.length;
    } else if (needDictReset) {
      fail(
        `LZMA2 chunk control 0x${
          control.toString(16)
        } must reset the dictionary first`,
      );
    }
    let unpacked: number;
    if (control < 0x80) {
      if (control > 2) {
        fail(`LZMA2 control byte 0x${control.toString(16)} is invalid`);
      }
      if (pos + 2 > end) fail("LZMA2 chunk header truncated");
      unpacked = ((input[pos] << 8) | input[pos + 1]) + 1;
      pos += 2;
      if (pos + unpacked > end) fail("stored LZMA2 chunk truncated");
      if (o.length + unpacked > o.out.length) tooLong(o.out.length);
      window.room(unpacked);
      window.out.set(input.subarray(pos, pos + unpacked), window.length);
      pos += unpacked;
    } else {
      if (pos + 4 > end) fail("LZMA2 chunk header truncated");
      unpacked = ((control & 0x1f) << 16) +
        ((input[pos] << 8) | input[pos + 1]) + 1;
      const packed = ((input[pos + 2] << 8) | input[pos + 3]) + 1;
      pos += 4;
      const reset = (control >>> 5) & 3;
      if (reset >= 2) {
        if (pos >= end) fail("LZMA2 chunk header truncated");
        window.properties(parseProperties(input[pos++]));
        needProperties = false;
      } else if (needProperties) {
        fail("the first LZMA2 chunk must carry properties");
      }
      if (reset >= 1) window.resetState();
      if (pos + packed > end) fail("LZMA2 chunk truncated");
      if (o.length + unpacked > o.out.length) tooLong(o.out.length);
      window.room(unpacked);
      window.lzma(input, pos, packed, unpacked);
      pos += packed;
    }
    if (copyOut) {
      o.out.set(
        window.out.subarray(window.length, window.length + unpacked),
        o.length,
      );
    }
    window.length += unpacked;
    o.length += unpacked;
  }
}

function tooLong(limit: number): never {
  fail(`decodes to more than the declared ${limit} bytes`);
}

// ---------------------------------------------------------------------------
// The container.

/** Reads a varint at `r.pos`. */
function varint(
  b: Uint8Array,
  r: { pos: number },
  end: number,
  what: string,
): number {
  let value = 0;
  for (let i = 0; i < 9; i++) {
    if (r.pos >= end) fail(`${what} truncated`);
    const byte = b[r.pos++];
    value += (byte & 0x7f) * 2 ** (7 * i);
    if (!(byte & 0x80)) {
      if (byte === 0 && i > 0) fail(`${what} is not minimally encoded`);
      if (!Number.isSafeInteger(value)) fail(`${what} ${value} is too large`);
      return value;
    }
  }
  fail(`${what} is longer than 9 bytes`);
}

function isAligned(n: number): boolean {
  return n % 4 === 0;
}

/** The check of one block's data, compared with what is stored. */
async function verifyCheck(
  type: number,
  data: Uint8Array,
  stored: Uint8Array,
  block: number,
): Promise<void> {
  let computed: Uint8Array;
  if (type === CHECK_CRC32) {
    computed = new Uint8Array(4);
    new DataView(computed.buffer).setUint32(0, crc32(data), true);
  } else if (type === CHECK_CRC64) {
    computed = crc64(data);
  } else if (type === CHECK_SHA256) {
    if (data.buffer instanceof ArrayBuffer) {
      computed = new Uint8Array(
        await crypto.subtle.digest("SHA-256", data as Uint8Array<ArrayBuffer>),
      );
    } else {
      // WebCrypto refuses views of shared memory (a block decoded by a
      // worker into a buffer it shares with the caller).
      const check = (await newCheck(type))!;
      check.update(data);
      computed = await check.digest();
    }
  } else {
    return; // none, or a type this decoder cannot compute (xz warns and goes on)
  }
  for (let i = 0; i < computed.length; i++) {
    if (computed[i] !== stored[i]) {
      fail(
        `block ${block} check mismatch: stored ${hexBytes(stored)}, computed ${
          hexBytes(computed)
        }`,
      );
    }
  }
}

/** What a block header declares. */
interface BlockHeader {
  headerSize: number;
  compressedSize?: number;
  uncompressedSize?: number;
  /** The LZMA2 dictionary size. */
  dictSize: number;
}

/**
 * Parses and checks the block header at `pos` (all of its bytes, as its
 * first byte gives their number, must be in `input`).
 */
function parseBlockHeader(
  input: Uint8Array,
  pos: number,
  where: string,
): BlockHeader {
  const headerSize = (input[pos] + 1) * 4;
  const headerEnd = pos + headerSize - 4;
  if (crc32(input.subarray(pos, headerEnd)) !== le32(input, headerEnd)) {
    fail(`${where}: header CRC-32 mismatch`);
  }
  const blockFlags = input[pos + 1];
  if (blockFlags & 0x3c) {
    fail(`${where}: flags 0x${blockFlags.toString(16)} use reserved bits`);
  }
  const r = { pos: pos + 2 };
  const compressedSize = blockFlags & 0x40
    ? varint(input, r, headerEnd, "compressed size")
    : undefined;
  const uncompressedSize = blockFlags & 0x80
    ? varint(input, r, headerEnd, "uncompressed size")
    : undefined;
  if (compressedSize === 0) fail(`${where}: compressed size 0`);
  const nFilters = (blockFlags & 3) + 1;
  let dictSize = 0;
  for (let f = 0; f < nFilters; f++) {
    const id = varint(input, r, headerEnd, "filter id");
    const propsSize = varint(input, r, headerEnd, "filter properties size");
    if (r.pos + propsSize > headerEnd) {
      fail(`${where}: filter properties truncated`);
    }
    if (id !== FILTER_LZMA2) {
      const name = FILTER_NAMES[id] ?? "unknown";
      fail(`${where}: filter 0x${id.toString(16)} (${name}) is not supported`);
    }
    if (f !== nFilters - 1) fail(`${where}: LZMA2 must be the last filter`);
    if (propsSize !== 1) {
      fail(`${where}: LZMA2 properties size ${propsSize} must be 1`);
    }
    const d = input[r.pos];
    if (d > 40) {
      fail(`${where}: LZMA2 dictionary size byte ${d} must be at most 40`);
    }
    dictSize = d === 40
      ? 0xffffffff
      : (2 | (d & 1)) * 2 ** (Math.floor(d / 2) + 11);
    if (dictSize > MAX_STREAMING_DICTIONARY) {
      fail(
        `${where}: LZMA2 dictionary of ${dictSize} bytes is over the ${MAX_STREAMING_DICTIONARY} accepted (xz's own largest)`,
      );
    }
    r.pos += propsSize;
  }
  for (let i = r.pos; i < headerEnd; i++) {
    if (input[i] !== 0) fail(`${where}: header padding is not zero`);
  }
  return { headerSize, compressedSize, uncompressedSize, dictSize };
}

/**
 * Decodes one stream at `start`; returns the position after its footer.
 */
async function decodeStream(
  input: Uint8Array,
  start: number,
  o: Output,
  streamNumber: number,
): Promise<number> {
  const n = input.length;
  const where = `stream ${streamNumber}`;
  if (n - start < 24) fail(`${where}: truncated (${n - start} bytes)`);
  for (let i = 0; i < 6; i++) {
    if (input[start + i] !== MAGIC[i]) {
      fail(
        streamNumber === 1
          ? "not an xz stream (bad magic)"
          : `${where}: bad magic`,
      );
    }
  }
  // A copy: the footer is compared with it after the blocks, whose
  // output may by then have overwritten the header (a block decoded in
  // place: see inPlaceStart).
  const flags = input.slice(start + 6, start + 8);
  if (flags[0] !== 0 || flags[1] > 0x0f) {
    fail(`${where}: stream flags ${hexBytes(flags)} use reserved bits`);
  }
  if (crc32(flags) !== le32(input, start + 8)) {
    fail(`${where}: stream header CRC-32 mismatch`);
  }
  const checkType = flags[1];
  const checkSize = CHECK_SIZES[checkType];
  let pos = start + 12;
  const records: Array<[number, number]> = [];
  for (let block = 1;; block++) {
    if (pos >= n) fail(`${where}: truncated before the index`);
    if (input[pos] === 0) break; // the index
    // Block header.
    const headerStart = pos;
    const headerSize = (input[pos] + 1) * 4;
    if (pos + headerSize > n) fail(`${where} block ${block}: header truncated`);
    const { compressedSize, uncompressedSize, dictSize } = parseBlockHeader(
      input,
      pos,
      `${where} block ${block}`,
    );
    const headerEnd = pos + headerSize - 4;
    // Data.
    pos = headerEnd + 4;
    const dataStart = pos;
    const outStart = o.length;
    if (
      uncompressedSize !== undefined &&
      outStart + uncompressedSize > o.out.length
    ) {
      tooLong(o.out.length);
    }
    const dataLimit = compressedSize === undefined
      ? n
      : Math.min(n, dataStart + compressedSize);
    pos = decodeLzma2(input, pos, dataLimit, o, dictSize, uncompressedSize);
    const packed = pos - dataStart;
    const produced = o.length - outStart;
    if (compressedSize !== undefined && packed !== compressedSize) {
      fail(
        `${where} block ${block}: compressed size ${packed}, header says ${compressedSize}`,
      );
    }
    if (uncompressedSize !== undefined && produced !== uncompressedSize) {
      fail(
        `${where} block ${block}: uncompressed size ${produced}, header says ${uncompressedSize}`,
      );
    }
    while (!isAligned(pos - start)) {
      if (pos >= n || input[pos] !== 0) {
        fail(`${where} block ${block}: padding is not zero`);
      }
      pos++;
    }
    if (pos + checkSize > n) fail(`${where} block ${block}: check truncated`);
    await verifyCheck(
      checkType,
      o.out.subarray(outStart, o.length),
      input.subarray(pos, pos + checkSize),
      block,
    );
    pos += checkSize;
    records.push([headerSize + packed + checkSize, produced]);
    void headerStart;
  }
  // Index.
  const indexStart = pos;
  const r = { pos: pos + 1 };
  const count = varint(input, r, n, "index record count");
  if (count !== records.length) {
    fail(
      `${where}: index lists ${count} blocks, the stream has ${records.length}`,
    );
  }
  for (let i = 0; i < count; i++) {
    const unpadded = varint(input, r, n, "index unpadded size");
    const size = varint(input, r, n, "index uncompressed size");
    if (unpadded !== records[i][0] || size !== records[i][1]) {
      fail(
        `${where}: index record ${
          i + 1
        } (${unpadded}, ${size}) does not match block (${records[i][0]}, ${
          records[i][1]
        })`,
      );
    }
  }
  while (!isAligned(r.pos - indexStart)) {
    if (r.pos >= n || input[r.pos] !== 0) {
      fail(`${where}: index padding is not zero`);
    }
    r.pos++;
  }
  if (r.pos + 4 > n) fail(`${where}: index truncated`);
  if (crc32(input.subarray(indexStart, r.pos)) !== le32(input, r.pos)) {
    fail(`${where}: index CRC-32 mismatch`);
  }
  pos = r.pos + 4;
  // Footer.
  if (pos + 12 > n) fail(`${where}: footer truncated`);
  if (crc32(input.subarray(pos + 4, pos + 10)) !== le32(input, pos)) {
    fail(`${where}: footer CRC-32 mismatch`);
  }
  const backward = (le32(input, pos + 4) + 1) * 4;
  if (backward !== pos - indexStart) {
    fail(
      `${where}: footer backward size ${backward}, index is ${
        pos - indexStart
      } bytes`,
    );
  }
  if (input[pos + 8] !== flags[0] || input[pos + 9] !== flags[1]) {
    fail(`${where}: footer flags differ from the header's`);
  }
  if (
    input[pos + 10] !== FOOTER_MAGIC[0] || input[pos + 11] !== FOOTER_MAGIC[1]
  ) {
    fail(`${where}: bad footer magic`);
  }
  return pos + 12;
}

/**
 * Decodes one or more concatenated `.xz` streams to exactly `expectedSize`
 * bytes, verifying every CRC and check; stops with a
 * {@linkcode CodecError} before the output would pass `expectedSize`.
 *
 * @param input the `.xz` bytes (streams, with zero stream padding between and after)
 * @param expectedSize how many bytes the streams must decode to
 * @returns the decoded bytes
 *
 * @example
 * ```ts
 * import { decode, encode } from "./xz.ts";
 * const text = new TextEncoder().encode("hello hello hello hello");
 * const packed = await encode(text);
 * console.log(new TextDecoder().decode(await decode(packed, text.length)));
 * ```
 */
export async function decode(
  input: Uint8Array,
  expectedSize: number,
): Promise<Uint8Array> {
  if (!Number.isSafeInteger(expectedSize) || expectedSize < 0) {
    fail(`expected size ${expectedSize} is not a byte count`);
  }
  let out: Uint8Array;
  try {
    out = new Uint8Array(expectedSize);
  } catch {
    fail(`expected size ${expectedSize} cannot be allocated`);
  }
  await decodeInto(input, out);
  return out;
}

/**
 * Decodes `.xz` data (as {@linkcode decode}) into `out`, which it must
 * fill exactly: a 64 MiB dmg chunk decodes straight into the caller's
 * (or a worker's shared) buffer, with no array of its own.
 *
 * @param input one or more `.xz` streams
 * @param out where the decoded bytes go; its length is the expected size
 *
 * @example
 * ```ts
 * import { decodeInto, encode } from "./xz.ts";
 * const text = new TextEncoder().encode("xz xz xz xz xz xz");
 * const out = new Uint8Array(text.length);
 * await decodeInto(await encode(text), out);
 * console.log(new TextDecoder().decode(out)); // xz xz xz xz xz xz
 * ```
 */
export async function decodeInto(
  input: Uint8Array,
  out: Uint8Array,
): Promise<void> {
  const expectedSize = out.length;
  const o: Output = { out, length: 0 };
  let pos = 0;
  for (let stream = 1;; stream++) {
    pos = await decodeStream(input, pos, o, stream);
    // Stream padding: zero bytes in fours, then the end or another stream.
    const padStart = pos;
    while (pos < input.length && input[pos] === 0) pos++;
    if (pos === input.length) {
      if (!isAligned(pos - padStart)) {
        fail("stream padding is not a multiple of 4 bytes");
      }
      break;
    }
    if (!isAligned(pos - padStart)) {
      fail("stream padding is not a multiple of 4 bytes");
    }
  }
  if (o.length !== expectedSize) {
    fail(`decodes to ${o.length} bytes, ${expectedSize} declared`);
  }
}

// ---------------------------------------------------------------------------
// Streaming decoding: `.xz` files of any size in bounded memory.

/** The largest LZMA2 dictionary accepted: xz's own largest, 1.5 GiB (only 4 GiB - 1 is larger). */
export const MAX_STREAMING_DICTIONARY = 1536 * 2 ** 20;

/** An incremental check of one block's data. */
interface Check {
  update(bytes: Uint8Array): void;
  digest(): Uint8Array | Promise<Uint8Array>;
}

async function newCheck(type: number): Promise<Check | undefined> {
  if (type === CHECK_CRC32) {
    let crc = 0;
    return {
      update: (bytes) => void (crc = crc32(bytes, crc)),
      digest: () => {
        const out = new Uint8Array(4);
        new DataView(out.buffer).setUint32(0, crc, true);
        return out;
      },
    };
  }
  if (type === CHECK_CRC64) return new Crc64();
  if (type === CHECK_SHA256) {
    const { createSHA256 } = await import("npm:hash-wasm@4.13.0");
    const h = await createSHA256();
    h.init();
    return {
      update: (bytes) => void h.update(bytes),
      digest: () => h.digest("binary"),
    };
  }
  return undefined;
}

/**
 * The output of one block as a sliding window, with the block's LZMA
 * state: LZMA matches reach back at most the dictionary size, so only that
 * much history is kept, and the buffer grows only as far as the block's
 * output needs. {@linkcode ScriptWindow} keeps it in a Uint8Array and
 * decodes with {@linkcode LzmaDecoder}; {@linkcode WasmWindow} keeps it in
 * WebAssembly linear memory and decodes with drivers/codecs/_wasm/lzma.c.
 */
abstract class Window {
  length = 0;
  /** Where the dictionary was last reset, in `out` (negative once that has slid out). */
  dictStart = 0;
  /** Bytes before `out[0]`, for the block's total. */
  dropped = 0;

  /**
   * @param keepSize the history kept when sliding (the dictionary, or less when the block is smaller)
   * @param maxDistance no match reaches this far back (the block's dictionary size)
   * @param limit the most bytes the block may decode to
   */
  constructor(
    readonly keepSize: number,
    readonly maxDistance: number,
    readonly limit: number,
  ) {}

  /** The window's bytes (a new view after {@linkcode room}). */
  abstract readonly out: Uint8Array;
  /** Sets lc, lp and pb. */
  abstract properties(props: Properties): void;
  /** Resets the LZMA state and probabilities. */
  abstract resetState(): void;
  /**
   * Decodes the LZMA chunk of `packed` bytes at `input[pos]` to `unpacked`
   * bytes at `out[length]` (the caller made room, and advances `length`).
   */
  abstract lzma(
    input: Uint8Array,
    pos: number,
    packed: number,
    unpacked: number,
  ): void;
  /** Ends the block (gives back what the window holds). */
  release(): void {}
  /** Replaces the buffer by one of `capacity` bytes holding the same `length` bytes. */
  protected abstract grow(capacity: number): void;

  /** Room for `n` more bytes, sliding or growing the window as needed. */
  room(n: number): void {
    const capacity = this.out.length;
    if (this.length + n <= capacity) return;
    const keep = Math.min(this.keepSize, this.length);
    const headroom = Math.max(n, CHUNK_UNPACKED_MAX * 4);
    const want = keep + headroom;
    if (capacity < want && capacity < this.keepSize + n) {
      // Grow (doubling) towards dictionary + chunk; small blocks stay small,
      // and no block's window outgrows what the block can still produce.
      this.grow(
        Math.min(
          Math.max(want, capacity * 2),
          this.keepSize + headroom,
          Math.max(this.limit - this.dropped, this.length + n),
        ),
      );
      if (this.length + n <= this.out.length) return;
    }
    const drop = this.length - keep;
    this.out.copyWithin(0, drop, this.length);
    this.length = keep;
    this.dictStart -= drop;
    this.dropped += drop;
  }
}

/** A {@linkcode Window} in a Uint8Array, decoded by {@linkcode LzmaDecoder}. */
class ScriptWindow extends Window {
  out: Uint8Array;
  #lzma = new LzmaDecoder();

  /**
   * `buffer`, when given, is the whole output with `length` bytes already
   * in it: the block decodes straight into it, and `limit` must fit.
   */
  constructor(
    keepSize: number,
    maxDistance: number,
    limit: number,
    buffer: Uint8Array = new Uint8Array(0),
    length = 0,
  ) {
    super(keepSize, maxDistance, limit);
    this.out = buffer;
    this.length = this.dictStart = length;
    this.#lzma.dictSize = maxDistance;
  }

  properties(props: Properties): void {
    this.#lzma.props = props;
  }

  resetState(): void {
    this.#lzma.resetState();
  }

  lzma(input: Uint8Array, pos: number, packed: number, unpacked: number) {
    this.#lzma.chunk(
      input,
      pos,
      packed,
      this.out,
      this.length,
      unpacked,
      this.dictStart,
    );
  }

  protected grow(capacity: number): void {
    const grown = new Uint8Array(capacity);
    grown.set(this.out.subarray(0, this.length));
    this.out = grown;
  }
}

/** lzma.c's answers but 0, by number. */
const WASM_LZMA_ERRORS = [
  "",
  "LZMA chunk data ends early",
  "distance reaches before the dictionary",
  "a match runs past the chunk's unpacked size",
  "end marker inside an LZMA2 chunk",
  "LZMA chunk does not end where its packed size says",
  "LZMA chunk does not start a range coder",
];

/** The most packed bytes of one LZMA2 chunk. */
const CHUNK_PACKED_LIMIT = 1 << 16;

/**
 * A {@linkcode Window} in WebAssembly linear memory, decoded by lzma.c
 * (about twice the TypeScript decoder's speed: see the README's Codecs
 * section). Linear memory holds, from the instance's heap base: the LZMA
 * state (probabilities, distances), one chunk's packed bytes (copied in
 * per chunk, at most 64 KiB), then the window; each region has
 * {@linkcode WASM_SLACK} spare bytes after it for the C code's 8-byte
 * copies. The window is last, so growing it is growing the memory.
 */
class WasmWindow extends Window {
  #wasm: WasmInstance;
  #state: number;
  #inAt: number;
  #at: number;
  #capacity = 0;

  private constructor(
    wasm: WasmInstance,
    keepSize: number,
    maxDistance: number,
    limit: number,
  ) {
    super(keepSize, maxDistance, limit);
    this.#wasm = wasm;
    this.#state = wasm.heapBase;
    this.#inAt = align8(this.#state + wasm.exports.lzma_state_size());
    this.#at = align8(this.#inAt + CHUNK_PACKED_LIMIT + WASM_SLACK);
  }

  /**
   * A window in WebAssembly, or undefined where it cannot run or its
   * largest size would not fit in {@linkcode MAX_WASM_MEMORY}.
   */
  static open(
    keepSize: number,
    maxDistance: number,
    limit: number,
  ): WasmWindow | undefined {
    if (keepSize + CHUNK_UNPACKED_MAX * 4 + (1 << 20) > MAX_WASM_MEMORY) {
      return undefined;
    }
    const wasm = acquireWasm();
    if (!wasm) return undefined;
    const window = new WasmWindow(wasm, keepSize, maxDistance, limit);
    if (!wasm.ensure(window.#at + WASM_SLACK)) {
      releaseWasm(wasm);
      return undefined;
    }
    return window;
  }

  get out(): Uint8Array {
    return this.#wasm.bytes.subarray(this.#at, this.#at + this.#capacity);
  }

  properties(props: Properties): void {
    this.#wasm.exports.lzma_set_props(
      this.#state,
      props.lc,
      props.lp,
      props.pb,
    );
  }

  resetState(): void {
    this.#wasm.exports.lzma_reset(this.#state);
  }

  lzma(input: Uint8Array, pos: number, packed: number, unpacked: number) {
    if (packed > CHUNK_PACKED_LIMIT) fail("LZMA2 chunk over 64 KiB packed");
    const wasm = this.#wasm;
    wasm.bytes.set(input.subarray(pos, pos + packed), this.#inAt);
    const status = wasm.exports.lzma_chunk(
      this.#state,
      this.#inAt,
      packed,
      this.#at,
      this.length,
      unpacked,
      Math.max(this.dictStart, 0),
      -this.dictStart | 0,
      this.maxDistance >>> 0,
    );
    if (status !== 0) fail(WASM_LZMA_ERRORS[status] ?? `lzma.c ${status}`);
  }

  override release(): void {
    releaseWasm(this.#wasm);
  }

  protected grow(capacity: number): void {
    if (!this.#wasm.ensure(this.#at + capacity + WASM_SLACK)) {
      throw new RangeError(`${capacity} bytes of LZMA window do not fit`);
    }
    this.#capacity = capacity;
  }
}

function align8(n: number): number {
  return (n + 7) & ~7;
}

/**
 * A window for one block: in WebAssembly where it runs, else in
 * TypeScript (see {@linkcode Window}'s parameters).
 */
function openWindow(
  keepSize: number,
  maxDistance: number,
  limit: number,
): Window {
  return WasmWindow.open(keepSize, maxDistance, limit) ??
    new ScriptWindow(keepSize, maxDistance, limit);
}

async function feedCrc(feed: ByteFeed, bytes: Uint8Array, what: string) {
  if ((await feed.ensure(4)) < 4) fail(`${what} truncated`);
  if (crc32(bytes) !== le32(feed.bytes, feed.start)) {
    fail(`${what} CRC-32 mismatch`);
  }
  feed.skip(4);
}

/**
 * Decodes `.xz` streams (one or several, with stream padding) as they
 * arrive from `feed`, yielding the output in order in pieces of about
 * 1 MiB or more; each piece is only valid until the next is asked for.
 * Memory is the largest dictionary plus a few MiB. Every CRC, check and
 * index record is verified; the last piece is yielded only after the
 * last check passed.
 *
 * @param feed the compressed bytes
 * @returns the decoded bytes, piece by piece
 *
 * @example
 * ```ts
 * import { decodeStreaming, encode } from "./xz.ts";
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
  for (let stream = 1;; stream++) {
    const where = `stream ${stream}`;
    const streamStart = feed.consumed;
    if ((await feed.ensure(12)) < 12) {
      fail(`${where}: truncated (${feed.available} bytes)`);
    }
    const head = feed.bytes.subarray(feed.start, feed.start + 12);
    for (let i = 0; i < 6; i++) {
      if (head[i] !== MAGIC[i]) {
        fail(
          stream === 1 ? "not an xz stream (bad magic)" : `${where}: bad magic`,
        );
      }
    }
    const flags = head.slice(6, 8);
    if (flags[0] !== 0 || flags[1] > 0x0f) {
      fail(`${where}: stream flags ${hexBytes(flags)} use reserved bits`);
    }
    if (crc32(flags) !== le32(head, 8)) {
      fail(`${where}: stream header CRC-32 mismatch`);
    }
    feed.skip(12);
    const checkType = flags[1];
    const checkSize = CHECK_SIZES[checkType];
    const records: Array<[number, number]> = [];
    for (let block = 1;; block++) {
      const at = `${where} block ${block}`;
      if ((await feed.ensure(1)) < 1) {
        fail(`${where}: truncated before the index`);
      }
      if (feed.bytes[feed.start] === 0) break; // the index
      const headerSize = (feed.bytes[feed.start] + 1) * 4;
      if ((await feed.ensure(headerSize)) < headerSize) {
        fail(`${at}: header truncated`);
      }
      const header = parseBlockHeader(feed.bytes, feed.start, at);
      feed.skip(headerSize);
      const dataStart = feed.consumed;
      const check = await newCheck(checkType);
      const limit = header.uncompressedSize ?? Infinity;
      const window = openWindow(
        Math.min(header.dictSize, limit),
        header.dictSize,
        limit,
      );
      let needDictReset = true;
      let needProperties = true;
      let emitted = 0; // window offset of the first byte not yet yielded
      for (;;) {
        if ((await feed.ensure(6)) < 1) {
          fail(`${at}: LZMA2 data ends without its end byte`);
        }
        const b = feed.bytes;
        let pos = feed.start;
        const control = b[pos++];
        if (control === 0) {
          feed.skip(1);
          break;
        }
        if (control >= 0xe0 || control === 1) {
          needProperties = true;
          needDictReset = false;
          window.dictStart = window.length;
        } else if (needDictReset) {
          fail(
            `${at}: LZMA2 chunk control 0x${
              control.toString(16)
            } must reset the dictionary first`,
          );
        }
        let unpacked: number;
        let packed: number;
        if (control < 0x80) {
          if (control > 2) {
            fail(
              `${at}: LZMA2 control byte 0x${control.toString(16)} is invalid`,
            );
          }
          if (feed.end - pos < 2) fail(`${at}: LZMA2 chunk header truncated`);
          unpacked = packed = ((b[pos] << 8) | b[pos + 1]) + 1;
          pos += 2;
        } else {
          if (feed.end - pos < 4) fail(`${at}: LZMA2 chunk header truncated`);
          unpacked = ((control & 0x1f) << 16) + ((b[pos] << 8) | b[pos + 1]) +
            1;
          packed = ((b[pos + 2] << 8) | b[pos + 3]) + 1;
          pos += 4;
        }
        const headerLength = pos - feed.start + (control >= 0xc0 ? 1 : 0);
        if (
          (await feed.ensure(headerLength + packed)) < headerLength + packed
        ) {
          fail(`${at}: LZMA2 chunk truncated`);
        }
        // The buffer may have moved: the data follows the header (and the
        // properties byte, read below).
        const input = feed.bytes;
        pos = feed.start + headerLength - (control >= 0xc0 ? 1 : 0);
        if (window.dropped + window.length + unpacked > limit) {
          fail(`${at}: decodes to more than its header's ${limit} bytes`);
        }
        if (window.length + unpacked > window.out.length) {
          // Yield what is pending before the window slides under it.
          if (window.length > emitted) {
            const piece = window.out.subarray(emitted, window.length);
            check?.update(piece);
            yield piece;
          }
          window.room(unpacked);
          emitted = window.length;
        }
        if (control < 0x80) {
          window.out.set(input.subarray(pos, pos + packed), window.length);
        } else {
          const reset = (control >>> 5) & 3;
          if (reset >= 2) {
            window.properties(parseProperties(input[pos++]));
            needProperties = false;
          } else if (needProperties) {
            fail(`${at}: the first LZMA2 chunk must carry properties`);
          }
          if (reset >= 1) window.resetState();
          try {
            window.lzma(input, pos, packed, unpacked);
          } catch (e) {
            if (e instanceof CodecError) {
              fail(`${at}: ${e.message.slice(CODEC.length + 2)}`);
            }
            throw e;
          }
        }
        window.length += unpacked;
        feed.skip(headerLength + packed);
        if (window.length - emitted >= 1 << 20) {
          const piece = window.out.subarray(emitted, window.length);
          check?.update(piece);
          emitted = window.length;
          yield piece;
        }
      }
      // Copied: the window's memory goes back to be reused.
      const last = window.out.slice(emitted, window.length);
      window.release();
      check?.update(last);
      const packedSize = feed.consumed - dataStart;
      const produced = window.dropped + window.length;
      if (
        header.compressedSize !== undefined &&
        packedSize !== header.compressedSize
      ) {
        fail(
          `${at}: compressed size ${packedSize}, header says ${header.compressedSize}`,
        );
      }
      if (
        header.uncompressedSize !== undefined &&
        produced !== header.uncompressedSize
      ) {
        fail(
          `${at}: uncompressed size ${produced}, header says ${header.uncompressedSize}`,
        );
      }
      const padding = (4 - ((feed.consumed - streamStart) % 4)) % 4;
      if ((await feed.ensure(padding + checkSize)) < padding + checkSize) {
        fail(`${at}: check truncated`);
      }
      for (let i = 0; i < padding; i++) {
        if (feed.bytes[feed.start + i] !== 0) {
          fail(`${at}: padding is not zero`);
        }
      }
      feed.skip(padding);
      if (check) {
        const computed = await check.digest();
        const stored = feed.bytes.subarray(feed.start, feed.start + checkSize);
        for (let i = 0; i < computed.length; i++) {
          if (computed[i] !== stored[i]) {
            fail(
              `${at} check mismatch: stored ${hexBytes(stored)}, computed ${
                hexBytes(computed)
              }`,
            );
          }
        }
      }
      feed.skip(checkSize);
      records.push([headerSize + packedSize + checkSize, produced]);
      // The block's last bytes go out only once its check has passed.
      if (last.length) yield last;
    }
    // Index: its bytes are kept for the CRC (at most ~18 bytes a block).
    const indexStart = feed.consumed;
    const indexBytes: number[] = [];
    const take = async (what: string) => {
      await feed.ensure(9);
      const r = { pos: feed.start };
      const value = varint(feed.bytes, r, feed.end, what);
      for (let i = feed.start; i < r.pos; i++) indexBytes.push(feed.bytes[i]);
      feed.skip(r.pos - feed.start);
      return value;
    };
    indexBytes.push(0);
    feed.skip(1);
    const count = await take("index record count");
    if (count !== records.length) {
      fail(
        `${where}: index lists ${count} blocks, the stream has ${records.length}`,
      );
    }
    for (let i = 0; i < count; i++) {
      const unpadded = await take("index unpadded size");
      const size = await take("index uncompressed size");
      if (unpadded !== records[i][0] || size !== records[i][1]) {
        fail(
          `${where}: index record ${
            i + 1
          } (${unpadded}, ${size}) does not match block (${records[i][0]}, ${
            records[i][1]
          })`,
        );
      }
    }
    while (!isAligned(feed.consumed - indexStart)) {
      if ((await feed.ensure(1)) < 1 || feed.bytes[feed.start] !== 0) {
        fail(`${where}: index padding is not zero`);
      }
      indexBytes.push(0);
      feed.skip(1);
    }
    await feedCrc(feed, new Uint8Array(indexBytes), `${where}: index`);
    const indexSize = feed.consumed - indexStart - 4;
    // Footer.
    if ((await feed.ensure(12)) < 12) fail(`${where}: footer truncated`);
    const foot = feed.bytes.subarray(feed.start, feed.start + 12);
    if (crc32(foot.subarray(4, 10)) !== le32(foot, 0)) {
      fail(`${where}: footer CRC-32 mismatch`);
    }
    const backward = (le32(foot, 4) + 1) * 4;
    if (backward !== indexSize + 4) {
      fail(
        `${where}: footer backward size ${backward}, index is ${
          indexSize + 4
        } bytes`,
      );
    }
    if (foot[8] !== flags[0] || foot[9] !== flags[1]) {
      fail(`${where}: footer flags differ from the header's`);
    }
    if (foot[10] !== FOOTER_MAGIC[0] || foot[11] !== FOOTER_MAGIC[1]) {
      fail(`${where}: bad footer magic`);
    }
    feed.skip(12);
    // Stream padding: zero bytes in fours, then the end or another stream.
    let padding = 0;
    while ((await feed.ensure(1)) > 0) {
      // Whole buffered runs of zeros at a time, not a byte per await.
      let k = feed.start;
      while (k < feed.end && feed.bytes[k] === 0) k++;
      padding += k - feed.start;
      const more = k === feed.end;
      feed.skip(k - feed.start);
      if (!more) break;
    }
    if (!isAligned(padding)) {
      fail("stream padding is not a multiple of 4 bytes");
    }
    if (feed.available === 0) return;
  }
}

// ---------------------------------------------------------------------------
// The index: where each block is, read from the end of the file.

/** One block of an `.xz` file, as the streams' indexes list it. */
export interface XzBlock {
  /** Offset of the block header in the file. */
  packedOffset: number;
  /** Bytes of the block in the file (header, data, padding, check). */
  packedLength: number;
  /** The index's unpadded size (without the padding before the check). */
  unpaddedSize: number;
  /** Offset of the block's first decoded byte in the decoded file. */
  offset: number;
  /** Decoded bytes. */
  size: number;
  /** The stream flags (the check type) of the block's stream. */
  streamFlags: Uint8Array;
}

/** The most index bytes {@linkcode readIndex} reads (a million blocks or so). */
const MAX_INDEX_BYTES = 16 << 20;

/**
 * Reads the index of every stream of an `.xz` file from its end: where
 * each block lies and what it decodes to, so that blocks can be decoded
 * alone. The stream headers, footers and indexes are checked (CRC-32s,
 * magic, flags, sizes adding up); the blocks are not read. Answers
 * `undefined` when the file does not end as an `.xz` file should (then
 * the streaming decoder, reading it front to back, says what is wrong).
 *
 * @param read reads bytes of the file
 * @param size the file's size
 * @returns the blocks in order, or undefined
 *
 * @example
 * ```ts
 * import { encode, readIndex } from "./xz.ts";
 * const packed = await encode(new Uint8Array(1000));
 * const blocks = await readIndex(
 *   (offset, length) => Promise.resolve(packed.slice(offset, offset + length)),
 *   packed.length,
 * );
 * console.log(blocks?.length, blocks?.[0].size); // 1 1000
 * ```
 */
export async function readIndex(
  read: (offset: number, length: number) => Promise<Uint8Array>,
  size: number,
): Promise<XzBlock[] | undefined> {
  const streams: XzBlock[][] = [];
  let end = size;
  while (end > 0) {
    // Stream padding: zero bytes in fours before a stream's footer (more
    // than 64 KiB of it is left to the streaming decoder, which reads it
    // in large pieces, rather than read here four bytes at a time).
    const paddingEnd = end;
    for (let zeros = true; zeros && end >= 4;) {
      const piece = await read(end - Math.min(end, 4096), Math.min(end, 4096));
      let k = piece.length;
      while (
        k >= 4 && !(piece[k - 1] | piece[k - 2] | piece[k - 3] | piece[k - 4])
      ) {
        k -= 4;
      }
      zeros = k < 4;
      end -= piece.length - k;
      if (paddingEnd - end > 1 << 16) return undefined;
    }
    if (end < 24) return undefined;
    const foot = await read(end - 12, 12);
    if (foot[10] !== FOOTER_MAGIC[0] || foot[11] !== FOOTER_MAGIC[1]) {
      return undefined;
    }
    if (crc32(foot.subarray(4, 10)) !== le32(foot, 0)) return undefined;
    const indexSize = (le32(foot, 4) + 1) * 4;
    if (indexSize > MAX_INDEX_BYTES || indexSize + 24 > end) return undefined;
    const indexStart = end - 12 - indexSize;
    const index = await read(indexStart, indexSize);
    if (index[0] !== 0) return undefined;
    if (
      crc32(index.subarray(0, indexSize - 4)) !== le32(index, indexSize - 4)
    ) {
      return undefined;
    }
    const records: Array<[number, number]> = [];
    try {
      const r = { pos: 1 };
      const count = varint(index, r, indexSize - 4, "index record count");
      if (count > indexSize / 2) return undefined;
      for (let i = 0; i < count; i++) {
        const unpadded = varint(index, r, indexSize - 4, "index unpadded size");
        const decoded = varint(
          index,
          r,
          indexSize - 4,
          "index uncompressed size",
        );
        if (unpadded < 5 || unpadded > 2 ** 50) return undefined;
        records.push([unpadded, decoded]);
      }
      for (let i = r.pos; i < indexSize - 4; i++) {
        if (index[i]) return undefined;
      }
      if (indexSize - 4 - r.pos > 3) return undefined;
    } catch (e) {
      if (e instanceof CodecError) return undefined;
      throw e;
    }
    let blocksLength = 0;
    for (const [unpadded] of records) {
      blocksLength += Math.ceil(unpadded / 4) * 4;
    }
    const streamStart = indexStart - blocksLength - 12;
    if (streamStart < 0) return undefined;
    const head = await read(streamStart, 12);
    for (let i = 0; i < 6; i++) if (head[i] !== MAGIC[i]) return undefined;
    if (head[6] !== foot[8] || head[7] !== foot[9]) return undefined;
    if (crc32(head.subarray(6, 8)) !== le32(head, 8)) return undefined;
    const streamFlags = head.slice(6, 8);
    const blocks: XzBlock[] = [];
    let at = streamStart + 12;
    for (const [unpadded, decoded] of records) {
      const packedLength = Math.ceil(unpadded / 4) * 4;
      blocks.push({
        packedOffset: at,
        packedLength,
        unpaddedSize: unpadded,
        offset: 0,
        size: decoded,
        streamFlags,
      });
      at += packedLength;
    }
    streams.unshift(blocks);
    end = streamStart;
  }
  const all = streams.flat();
  let offset = 0;
  for (const block of all) {
    block.offset = offset;
    offset += block.size;
  }
  return Number.isSafeInteger(offset) ? all : undefined;
}

/**
 * What goes around one block of an `.xz` file (as {@linkcode readIndex}
 * located it) to make it a stream of its own, which {@linkcode decode}
 * decodes with every check: the block header's CRC-32, the block's check,
 * and the sizes the index gave. `head` (the stream header, 12 bytes) goes
 * before the block's `packedLength` bytes, `tail` (an index listing just
 * that block, and the stream footer) after them; a caller reading blocks
 * into buffers it reuses reads each block between the two in place.
 *
 * @param block where the block is
 * @returns the bytes before and after the block
 *
 * @example
 * ```ts
 * import { blockFraming, decode, encode, readIndex } from "./xz.ts";
 * const packed = await encode(new Uint8Array(1000).fill(3));
 * const read = (o: number, n: number) => Promise.resolve(packed.slice(o, o + n));
 * const [block] = (await readIndex(read, packed.length))!;
 * const { head, tail } = blockFraming(block);
 * const alone = new Uint8Array(head.length + block.packedLength + tail.length);
 * alone.set(head);
 * alone.set(await read(block.packedOffset, block.packedLength), head.length);
 * alone.set(tail, head.length + block.packedLength);
 * console.log((await decode(alone, block.size))[999]); // 3
 * ```
 */
export function blockFraming(
  block: XzBlock,
): { head: Uint8Array; tail: Uint8Array } {
  const head = new Uint8Array(12);
  head.set(MAGIC, 0);
  head.set(block.streamFlags, 6);
  new DataView(head.buffer).setUint32(8, crc32(block.streamFlags), true);
  const index = [
    0,
    1,
    ...varintBytes(block.unpaddedSize),
    ...varintBytes(block.size),
  ];
  while (index.length % 4) index.push(0);
  const indexLength = index.length + 4;
  const tail = new Uint8Array(indexLength + 12);
  const v = new DataView(tail.buffer);
  tail.set(index, 0);
  v.setUint32(index.length, crc32(new Uint8Array(index)), true);
  const at = indexLength;
  v.setUint32(at + 4, indexLength / 4 - 1, true);
  tail.set(block.streamFlags, at + 8);
  tail.set(FOOTER_MAGIC, at + 10);
  v.setUint32(at, crc32(tail.subarray(at + 4, at + 10)), true);
  return { head, tail };
}

/**
 * For decoding a block in place: how far into the buffer its `size`
 * decoded bytes go (from the buffer's start) the block, framed as by
 * {@linkcode blockFraming}, must start at least, so that
 * {@linkcode decodeInto} never overwrites a packed byte before reading
 * it. The decoder writes a chunk's bytes at most up to where that chunk
 * ends in the output, and only after reading the chunk's header: the
 * least start is the most, over the LZMA2 chunks, of the output's end
 * after the chunk less the chunk's first byte in the stream (the check
 * and the index after the data being read after the last output byte).
 * Answers `undefined` when the chunk headers cannot be walked (the
 * decoder, given a buffer of its own, names what is wrong).
 *
 * @param stream the block framed as a stream of its own
 * @param size the block's decoded size
 * @returns the least offset of `stream` in the buffer, or undefined
 *
 * @example
 * ```ts
 * import { blockAsStream, encode, inPlaceStart, readIndex } from "./xz.ts";
 * const packed = await encode(new Uint8Array(100000).fill(3));
 * const read = (o: number, n: number) => Promise.resolve(packed.slice(o, o + n));
 * const [block] = (await readIndex(read, packed.length))!;
 * const alone = blockAsStream(block, await read(block.packedOffset, block.packedLength));
 * console.log(inPlaceStart(alone, block.size)! < block.size); // true
 * ```
 */
export function inPlaceStart(
  stream: Uint8Array,
  size: number,
): number | undefined {
  const n = stream.length;
  if (n < 13) return undefined;
  let pos = 12 + (stream[12] + 1) * 4; // after the stream and block headers
  let produced = 0;
  let least = 0;
  for (;;) {
    if (pos >= n) return undefined;
    const control = stream[pos];
    const chunkStart = pos;
    if (control === 0) break;
    let unpacked: number;
    if (control === 1 || control === 2) {
      if (pos + 3 > n) return undefined;
      unpacked = ((stream[pos + 1] << 8) | stream[pos + 2]) + 1;
      pos += 3 + unpacked;
    } else if (control >= 0x80) {
      if (pos + 5 > n) return undefined;
      unpacked = ((control & 0x1f) << 16) +
        ((stream[pos + 1] << 8) | stream[pos + 2]) + 1;
      const packed = ((stream[pos + 3] << 8) | stream[pos + 4]) + 1;
      pos += 5 + (((control >>> 5) & 3) >= 2 ? 1 : 0) + packed;
    } else {
      return undefined;
    }
    produced += unpacked;
    if (produced > size) return undefined;
    least = Math.max(least, produced - chunkStart);
  }
  // The end byte, padding, check and index are read once all is written.
  return Math.max(least, size - pos);
}

/**
 * One block of an `.xz` file (its bytes as {@linkcode readIndex} located
 * them) wrapped as a stream of its own (see {@linkcode blockFraming});
 * the block's bytes are copied once.
 *
 * @param block where the block is
 * @param bytes the block's `packedLength` bytes
 * @returns a complete `.xz` stream holding just that block
 *
 * @example
 * ```ts
 * import { blockAsStream, decode, encode, readIndex } from "./xz.ts";
 * const packed = await encode(new Uint8Array(1000).fill(3));
 * const read = (o: number, n: number) => Promise.resolve(packed.slice(o, o + n));
 * const [block] = (await readIndex(read, packed.length))!;
 * const alone = blockAsStream(block, await read(block.packedOffset, block.packedLength));
 * console.log((await decode(alone, block.size))[999]); // 3
 * ```
 */
export function blockAsStream(block: XzBlock, bytes: Uint8Array): Uint8Array {
  const { head, tail } = blockFraming(block);
  const out = new Uint8Array(head.length + bytes.length + tail.length);
  out.set(head);
  out.set(bytes, head.length);
  out.set(tail, head.length + bytes.length);
  return out;
}

// ---------------------------------------------------------------------------
// LZMA encoding.

/** A range encoder writing into a growing buffer. */
class RangeEncoder {
  out: Uint8Array;
  pos = 0;
  low = 0;
  range = 0xffffffff;
  cache = 0;
  cacheSize = 1;
  probs: Uint16Array;

  constructor(probs: Uint16Array, capacity: number) {
    this.probs = probs;
    this.out = new Uint8Array(capacity);
  }

  /** Bytes this chunk will take once flushed. */
  get size(): number {
    return this.pos + this.cacheSize + 4;
  }

  #emit(byte: number): void {
    if (this.pos >= this.out.length) {
      const grown = new Uint8Array(this.out.length * 2);
      grown.set(this.out);
      this.out = grown;
    }
    this.out[this.pos++] = byte;
  }

  shiftLow(): void {
    // `low` holds up to 33 bits: bit 32 is a carry into the cached bytes.
    if (this.low < 0xff000000 || this.low >= 0x100000000) {
      const carry = this.low >= 0x100000000 ? 1 : 0;
      let byte = this.cache;
      do {
        this.#emit((byte + carry) & 0xff);
        byte = 0xff;
      } while (--this.cacheSize !== 0);
      this.cache = (this.low >>> 24) & 0xff;
    }
    this.cacheSize++;
    this.low = (this.low & 0xffffff) * 256;
  }

  bit(index: number, bit: number): void {
    const p = this.probs[index];
    const bound = (this.range >>> 11) * p;
    if (bit === 0) {
      this.range = bound;
      this.probs[index] = p + ((2048 - p) >>> 5);
    } else {
      this.low += bound;
      this.range -= bound;
      this.probs[index] = p - (p >>> 5);
    }
    while (this.range < 0x1000000) {
      this.range = (this.range << 8) >>> 0;
      this.shiftLow();
    }
  }

  direct(value: number, bits: number): void {
    for (let i = bits - 1; i >= 0; i--) {
      this.range >>>= 1;
      if ((value >>> i) & 1) this.low += this.range;
      while (this.range < 0x1000000) {
        this.range = (this.range << 8) >>> 0;
        this.shiftLow();
      }
    }
  }

  tree(base: number, bits: number, value: number): void {
    let m = 1;
    for (let i = bits - 1; i >= 0; i--) {
      const b = (value >>> i) & 1;
      this.bit(base + m, b);
      m = (m << 1) | b;
    }
  }

  reverseTree(base: number, bits: number, value: number): void {
    let m = 1;
    for (let i = 0; i < bits; i++) {
      const b = value & 1;
      value >>>= 1;
      this.bit(base + m, b);
      m = (m << 1) | b;
    }
  }

  length(base: number, posState: number, len: number): void {
    const l = len - MATCH_LEN_MIN;
    if (l < 8) {
      this.bit(base + LEN_CHOICE, 0);
      this.tree(base + LEN_LOW + posState * 8, 3, l);
    } else if (l < 16) {
      this.bit(base + LEN_CHOICE, 1);
      this.bit(base + LEN_CHOICE2, 0);
      this.tree(base + LEN_MID + posState * 8, 3, l - 8);
    } else {
      this.bit(base + LEN_CHOICE, 1);
      this.bit(base + LEN_CHOICE2, 1);
      this.tree(base + LEN_HIGH, 8, l - 16);
    }
  }

  finish(): Uint8Array {
    for (let i = 0; i < 5; i++) this.shiftLow();
    return this.out.subarray(0, this.pos);
  }
}

/** The LZMA properties the encoder uses: lc 3, lp 0, pb 2 (xz's default). */
const ENC_LC = 3;
const ENC_PB = 2;
const ENC_PROPS = (ENC_PB * 5 + 0) * 9 + ENC_LC;
/** LZMA2 limits: 2 MiB unpacked and 64 KiB packed per chunk. */
const CHUNK_UNPACKED_MAX = 1 << 21;
const CHUNK_PACKED_MAX = 1 << 16;
/** Stop a chunk this far below the packed limit: one symbol writes far less. */
const CHUNK_PACKED_MARGIN = 64;
/**
 * The match finder's window (xz -6's dictionary, 8 MiB): matches reach at
 * most this far back, and its chain links are a ring of this many
 * entries, whatever the input's size.
 */
const WINDOW_BITS = 23;
/** The 3-byte table: the newest position of each hash (3-byte matches are only taken near). */
const HASH3_BITS = 16;
/** Candidates tried per position: the speed/ratio trade of the match finder. */
const CHAIN_DEPTH = 24;
/** A match this long ends the search (xz -6's nice_len). */
const NICE_LENGTH = 64;
/** After this many literals in a row, positions are searched one in SKIP_STEP (incompressible data). */
const SKIP_AFTER = 256;
const SKIP_STEP = 8;

/**
 * What one encode did, for tests that bound the work: positions searched,
 * chain candidates looked at, and the match finder's table bytes.
 */
export interface XzEncodeWork {
  /** Positions the match finder searched. */
  searches: number;
  /** Hash chain candidates it looked at (at most CHAIN_DEPTH a search). */
  candidates: number;
  /** Bytes of its hash heads and chain links. */
  tableBytes: number;
}

/**
 * Hash chains of 4-byte prefixes over a window of the input (links in a
 * ring of window size), and a table of the newest position of each
 * 3-byte prefix.
 *
 * Before, the chains hashed 3 bytes into 2^16 heads with a link per input
 * byte, and matches could reach the whole input: a 64 MiB dmg chunk of
 * random bytes walked 24 candidates at each position, each a cache miss
 * in a 256 MiB link array (8 MiB of random bytes took 12 s of CPU, 64 MiB
 * took minutes). 4-byte hashes over 2^20 heads make false candidates
 * rare, the ring bounds the memory to 36 MiB, and long literal runs are
 * searched (and their positions added) at every 8th position only.
 */
class MatchFinder {
  readonly head3 = new Int32Array(1 << HASH3_BITS).fill(-1);
  readonly head4: Int32Array;
  readonly prev: Int32Array;
  readonly mask: number;
  readonly window: number;
  readonly hash4Shift: number;
  /** Positions below this are in the chains. */
  inserted = 0;
  bestDist = 0;
  searches = 0;
  candidates = 0;

  constructor(readonly data: Uint8Array) {
    let bits = 12;
    while (bits < WINDOW_BITS && 2 ** bits < data.length) bits++;
    this.window = 1 << bits;
    this.mask = this.window - 1;
    this.prev = new Int32Array(this.window);
    const hash4Bits = Math.min(20, bits - 2);
    this.hash4Shift = 32 - hash4Bits;
    this.head4 = new Int32Array(1 << hash4Bits).fill(-1);
  }

  get tableBytes(): number {
    return this.head3.byteLength + this.head4.byteLength + this.prev.byteLength;
  }

  /** Adds positions up to `to` (exclusive) to the tables. */
  insertUpTo(to: number): void {
    const d = this.data;
    const n = d.length;
    const { head3, head4, prev, mask, hash4Shift } = this;
    for (let p = this.inserted; p < to; p++) {
      if (p + 2 >= n) break;
      const v = d[p] | (d[p + 1] << 8) | (d[p + 2] << 16);
      head3[Math.imul(v, 0x9e3779b1) >>> (32 - HASH3_BITS)] = p;
      if (p + 3 < n) {
        const h = Math.imul(v | (d[p + 3] << 24), 0x9e3779b1) >>> hash4Shift;
        prev[p & mask] = head4[h];
        head4[h] = p;
      }
    }
    if (to > this.inserted) this.inserted = to;
  }

  /** Leaves the positions up to `to` (exclusive) out of the tables. */
  skipTo(to: number): void {
    if (to > this.inserted) this.inserted = to;
  }

  /** The longest match at `p` (at least 3 bytes, else 0); its distance - 1 in `bestDist`. */
  find(p: number, maxLen: number): number {
    const d = this.data;
    const n = d.length;
    if (maxLen < 3 || p + 2 >= n) return 0;
    this.searches++;
    let best = 2;
    const v = d[p] | (d[p + 1] << 8) | (d[p + 2] << 16);
    // The newest 3-byte match, if near enough to be worth taking.
    const near = this.head3[Math.imul(v, 0x9e3779b1) >>> (32 - HASH3_BITS)];
    if (near >= 0 && p - near <= 0x8000) {
      let len = 0;
      while (len < maxLen && d[near + len] === d[p + len]) len++;
      if (len > best) {
        best = len;
        this.bestDist = p - near - 1;
        if (len >= NICE_LENGTH || len >= maxLen) return len;
      }
    }
    if (maxLen < 4 || p + 3 >= n) return best > 2 ? best : 0;
    const prev = this.prev;
    const mask = this.mask;
    // Links at or below `limit` are overwritten (or before the input).
    const limit = Math.max(p - this.window, -1);
    let candidate = this.head4[
      Math.imul(v | (d[p + 3] << 24), 0x9e3779b1) >>> this.hash4Shift
    ];
    let depth = CHAIN_DEPTH;
    for (; candidate > limit && depth > 0; depth--) {
      if (d[candidate + best] === d[p + best] && d[candidate] === d[p]) {
        let len = 0;
        while (len < maxLen && d[candidate + len] === d[p + len]) len++;
        if (len > best) {
          best = len;
          this.bestDist = p - candidate - 1;
          if (len >= NICE_LENGTH || len >= maxLen) {
            depth--;
            break;
          }
        }
      }
      candidate = prev[candidate & mask];
    }
    this.candidates += CHAIN_DEPTH - depth;
    return best > 2 ? best : 0;
  }
}

function repLength(
  d: Uint8Array,
  p: number,
  dist: number,
  maxLen: number,
): number {
  const from = p - dist - 1;
  if (from < 0) return 0;
  let len = 0;
  while (len < maxLen && d[from + len] === d[p + len]) len++;
  return len;
}

/** Position slot of a distance (distance - 1 as LZMA codes it). */
function posSlot(dist: number): number {
  if (dist < 4) return dist;
  const n = 31 - Math.clz32(dist);
  return (n << 1) | ((dist >>> (n - 1)) & 1);
}

/**
 * Encodes `data` as LZMA2 chunks (greedy hash-chain parsing; every LZMA
 * chunk resets the state so a chunk that does not shrink can be stored
 * instead), ending with the end byte.
 */
function encodeLzma2(
  data: Uint8Array,
  finder: MatchFinder,
): Uint8Array {
  const n = data.length;
  const parts: Uint8Array[] = [];
  const probs = new Uint16Array(LITERAL + (0x300 << ENC_LC));
  const pbMask = (1 << ENC_PB) - 1;
  let pos = 0;
  let first = true;
  let literalRun = 0;
  while (pos < n) {
    const chunkStart = pos;
    const chunkEnd = Math.min(n, chunkStart + CHUNK_UNPACKED_MAX);
    probs.fill(PROB_INIT);
    const rc = new RangeEncoder(probs, CHUNK_PACKED_MAX + 1024);
    let state = 0;
    const reps = [0, 0, 0, 0];
    while (pos < chunkEnd && rc.size < CHUNK_PACKED_MAX - CHUNK_PACKED_MARGIN) {
      const posState = pos & pbMask;
      const maxLen = Math.min(MATCH_LEN_MAX, chunkEnd - pos);
      // In long literal runs (random bytes) only one position in
      // SKIP_STEP is searched, and only those go into the tables.
      const skip = literalRun >= SKIP_AFTER && literalRun % SKIP_STEP !== 0;
      if (skip) finder.skipTo(pos);
      else finder.insertUpTo(pos);
      // The longest of the four repeat distances, and a new match.
      let repLen = 0;
      let repIndex = 0;
      if (maxLen >= 2) {
        for (let i = 0; i < 4; i++) {
          const len = repLength(data, pos, reps[i], maxLen);
          if (len > repLen) {
            repLen = len;
            repIndex = i;
          }
        }
      }
      // No search past a long repeat.
      let matchLen = skip || repLen >= NICE_LENGTH
        ? 0
        : finder.find(pos, maxLen);
      const matchDist = finder.bestDist;
      literalRun++;
      // A 3-byte match far away costs more than three literals.
      if (matchLen === 3 && matchDist >= 0x8000) matchLen = 0;
      if (repLen >= 2 && repLen + 1 >= matchLen) {
        rc.bit(IS_MATCH + (state << 4) + posState, 1);
        rc.bit(IS_REP + state, 1);
        if (repIndex === 0) {
          rc.bit(IS_REP_G0 + state, 0);
          rc.bit(IS_REP0_LONG + (state << 4) + posState, 1);
        } else {
          rc.bit(IS_REP_G0 + state, 1);
          if (repIndex === 1) {
            rc.bit(IS_REP_G1 + state, 0);
          } else {
            rc.bit(IS_REP_G1 + state, 1);
            rc.bit(IS_REP_G2 + state, repIndex === 3 ? 1 : 0);
          }
          const dist = reps[repIndex];
          for (let i = repIndex; i > 0; i--) reps[i] = reps[i - 1];
          reps[0] = dist;
        }
        rc.length(REP_LEN_CODER, posState, repLen);
        state = state < 7 ? NEXT_REP : 11;
        pos += repLen;
        literalRun = 0;
        continue;
      }
      if (matchLen >= 3) {
        rc.bit(IS_MATCH + (state << 4) + posState, 1);
        rc.bit(IS_REP + state, 0);
        rc.length(LEN_CODER, posState, matchLen);
        const lenState = matchLen - 2 < 4 ? matchLen - 2 : 3;
        const slot = posSlot(matchDist);
        rc.tree(POS_SLOT + lenState * 64, 6, slot);
        if (slot >= 4) {
          const footer = (slot >>> 1) - 1;
          const base = (2 | (slot & 1)) << footer;
          const reduced = matchDist - base;
          if (slot < DIST_MODEL_END) {
            rc.reverseTree(SPEC_POS + base - slot - 1, footer, reduced);
          } else {
            rc.direct(reduced >>> 4, footer - 4);
            rc.reverseTree(ALIGN, 4, reduced & 15);
          }
        }
        reps[3] = reps[2];
        reps[2] = reps[1];
        reps[1] = reps[0];
        reps[0] = matchDist;
        state = state < 7 ? NEXT_MATCH : 10;
        pos += matchLen;
        literalRun = 0;
        continue;
      }
      const byte = data[pos];
      const rep0From = pos - reps[0] - 1;
      if (rep0From >= 0 && data[rep0From] === byte && state >= 7) {
        // Short repeat: one byte from rep0, cheaper than a matched literal.
        rc.bit(IS_MATCH + (state << 4) + posState, 1);
        rc.bit(IS_REP + state, 1);
        rc.bit(IS_REP_G0 + state, 0);
        rc.bit(IS_REP0_LONG + (state << 4) + posState, 0);
        state = state < 7 ? NEXT_SHORT_REP : 11;
        pos++;
        continue;
      }
      rc.bit(IS_MATCH + (state << 4) + posState, 0);
      const prev = pos > 0 ? data[pos - 1] : 0;
      const base = LITERAL + 0x300 * (prev >>> (8 - ENC_LC));
      if (state < 7) {
        rc.tree(base, 8, byte);
      } else {
        let matchByte = data[rep0From] << 1;
        let offset = 0x100;
        let symbol = 1;
        for (let i = 7; i >= 0; i--) {
          const b = (byte >>> i) & 1;
          const matchBit = matchByte & offset;
          matchByte <<= 1;
          rc.bit(base + offset + matchBit + symbol, b);
          symbol = (symbol << 1) | b;
          offset = b ? matchBit : offset & ~matchBit;
        }
      }
      state = NEXT_LITERAL[state];
      pos++;
    }
    const packed = rc.finish();
    const unpacked = pos - chunkStart;
    if (packed.length < unpacked) {
      // LZMA chunk resetting state (0xc0) or everything (0xe0, the first).
      const header = new Uint8Array(6);
      const u = unpacked - 1;
      header[0] = (first ? 0xe0 : 0xc0) | (u >>> 16);
      header[1] = (u >>> 8) & 0xff;
      header[2] = u & 0xff;
      header[3] = (packed.length - 1) >>> 8;
      header[4] = (packed.length - 1) & 0xff;
      header[5] = ENC_PROPS;
      parts.push(header);
      parts.push(packed.slice());
    } else {
      // Stored chunks of at most 64 KiB (1 resets the dictionary, 2 not).
      for (let at = chunkStart; at < pos; at += CHUNK_PACKED_MAX) {
        const size = Math.min(CHUNK_PACKED_MAX, pos - at);
        parts.push(
          Uint8Array.of(first ? 1 : 2, (size - 1) >>> 8, (size - 1) & 0xff),
        );
        parts.push(data.subarray(at, at + size));
        first = false;
      }
    }
    first = false;
  }
  parts.push(Uint8Array.of(0));
  return concat(parts);
}

function varintBytes(value: number): number[] {
  const bytes: number[] = [];
  while (value >= 0x80) {
    bytes.push((value % 0x80) | 0x80);
    value = Math.floor(value / 0x80);
  }
  bytes.push(value);
  return bytes;
}

function crcBytes(data: Uint8Array): number[] {
  const c = crc32(data);
  return [c & 0xff, (c >>> 8) & 0xff, (c >>> 16) & 0xff, c >>> 24];
}

/**
 * Compresses `input` as one `.xz` stream: one block of LZMA2 (lc 3, lp 0,
 * pb 2, a dictionary of the input's size up to 8 MiB) with a CRC-32
 * check. Its time and memory grow linearly with the input (the match
 * finder's tables stay under 37 MiB).
 *
 * @param input the bytes
 * @param work when given, the match finder's work is added to it (tests)
 * @returns the `.xz` stream
 *
 * @example
 * ```ts
 * import { encode } from "./xz.ts";
 * const packed = await encode(new Uint8Array(100000));
 * console.log(packed.length < 200); // true
 * ```
 */
export function encode(
  input: Uint8Array,
  work?: XzEncodeWork,
): Promise<Uint8Array> {
  return Promise.resolve(encodeStream(input, work));
}

function encodeStream(input: Uint8Array, work?: XzEncodeWork): Uint8Array {
  const flags = Uint8Array.of(0, CHECK_CRC32);
  const parts: number[][] = [];
  const header = [...MAGIC, ...flags, ...crcBytes(flags)];
  const records: number[] = [];
  let body = new Uint8Array(0);
  if (input.length > 0) {
    // The smallest dictionary size that holds the match finder's window
    // (the whole input, up to 8 MiB).
    const finder = new MatchFinder(input);
    const reach = Math.min(input.length, finder.window);
    let dictByte = 0;
    while (
      dictByte < 40 &&
      (2 | (dictByte & 1)) * 2 ** (Math.floor(dictByte / 2) + 11) < reach
    ) {
      dictByte++;
    }
    const blockHeader = new Uint8Array(12);
    blockHeader.set([2, 0x00, FILTER_LZMA2, 1, dictByte]);
    blockHeader.set(crcBytes(blockHeader.subarray(0, 8)), 8);
    const lzma2 = encodeLzma2(input, finder);
    if (work) {
      work.searches += finder.searches;
      work.candidates += finder.candidates;
      work.tableBytes = Math.max(work.tableBytes, finder.tableBytes);
    }
    const padding = (4 - (lzma2.length % 4)) % 4;
    const check = crcBytes(input);
    body = new Uint8Array(blockHeader.length + lzma2.length + padding + 4);
    body.set(blockHeader);
    body.set(lzma2, blockHeader.length);
    body.set(check, blockHeader.length + lzma2.length + padding);
    records.push(...varintBytes(blockHeader.length + lzma2.length + 4));
    records.push(...varintBytes(input.length));
  }
  const index = [0, ...varintBytes(input.length > 0 ? 1 : 0), ...records];
  while (index.length % 4 !== 0) index.push(0);
  index.push(...crcBytes(Uint8Array.from(index)));
  const backward = index.length / 4 - 1;
  const footerBody = Uint8Array.of(
    backward & 0xff,
    (backward >>> 8) & 0xff,
    (backward >>> 16) & 0xff,
    backward >>> 24,
    ...flags,
  );
  const footer = [...crcBytes(footerBody), ...footerBody, ...FOOTER_MAGIC];
  parts.push(header);
  const out = new Uint8Array(
    header.length + body.length + index.length + footer.length,
  );
  out.set(header);
  out.set(body, header.length);
  out.set(index, header.length + body.length);
  out.set(footer, header.length + body.length + index.length);
  return out;
}
