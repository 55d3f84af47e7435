/**
 * SHA-1 (FIPS 180-4) and HMAC-SHA1 (RFC 2104), synchronous: the per-chunk
 * IVs of encrypted Apple disk images are HMAC-SHA1(key, chunk number).
 * WebCrypto's `sign` is one promise per call, which costs more than the
 * hash itself for a 4-byte message; here the HMAC's inner and outer key
 * blocks are hashed once per key, so each IV costs two compressions.
 *
 * Checked against WebCrypto's HMAC in `tests/dmg_encrypted_test.ts`.
 *
 * This module is browser compatible.
 *
 * @module
 */

/**
 * One 64-byte block into the five-word state `h` (in place). Four loops
 * instead of one with a branch per round, and no allocation: the IV of
 * every 512-byte chunk of an image costs two of these (measured here:
 * about 0.25 µs each).
 */
function compress(h: Int32Array, block: Uint8Array, at: number, w: Int32Array) {
  for (let i = 0; i < 16; i++) {
    const o = at + 4 * i;
    w[i] = (block[o] << 24) | (block[o + 1] << 16) | (block[o + 2] << 8) |
      block[o + 3];
  }
  compressWords(h, w);
}

/** {@linkcode compress} of a block already in `w[0..16)` as big-endian words. */
function compressWords(h: Int32Array, w: Int32Array) {
  for (let i = 16; i < 80; i++) {
    const x = w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16];
    w[i] = (x << 1) | (x >>> 31);
  }
  let a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
  for (let i = 0; i < 80; i += 5) {
    // Five rounds per step with the variables renamed, so no shuffling.
    let f: number, k: number;
    if (i < 20) {
      k = 0x5a827999;
      f = (b & c) | (~b & d);
      e = (((a << 5) | (a >>> 27)) + f + e + k + w[i]) | 0;
      b = (b << 30) | (b >>> 2);
      f = (a & b) | (~a & c);
      d = (((e << 5) | (e >>> 27)) + f + d + k + w[i + 1]) | 0;
      a = (a << 30) | (a >>> 2);
      f = (e & a) | (~e & b);
      c = (((d << 5) | (d >>> 27)) + f + c + k + w[i + 2]) | 0;
      e = (e << 30) | (e >>> 2);
      f = (d & e) | (~d & a);
      b = (((c << 5) | (c >>> 27)) + f + b + k + w[i + 3]) | 0;
      d = (d << 30) | (d >>> 2);
      f = (c & d) | (~c & e);
      a = (((b << 5) | (b >>> 27)) + f + a + k + w[i + 4]) | 0;
      c = (c << 30) | (c >>> 2);
    } else if (i < 40 || i >= 60) {
      k = i < 40 ? 0x6ed9eba1 : 0xca62c1d6;
      e = (((a << 5) | (a >>> 27)) + (b ^ c ^ d) + e + k + w[i]) | 0;
      b = (b << 30) | (b >>> 2);
      d = (((e << 5) | (e >>> 27)) + (a ^ b ^ c) + d + k + w[i + 1]) | 0;
      a = (a << 30) | (a >>> 2);
      c = (((d << 5) | (d >>> 27)) + (e ^ a ^ b) + c + k + w[i + 2]) | 0;
      e = (e << 30) | (e >>> 2);
      b = (((c << 5) | (c >>> 27)) + (d ^ e ^ a) + b + k + w[i + 3]) | 0;
      d = (d << 30) | (d >>> 2);
      a = (((b << 5) | (b >>> 27)) + (c ^ d ^ e) + a + k + w[i + 4]) | 0;
      c = (c << 30) | (c >>> 2);
    } else {
      k = 0x8f1bbcdc;
      e = (((a << 5) | (a >>> 27)) + ((b & c) | (b & d) | (c & d)) + e + k +
        w[i]) | 0;
      b = (b << 30) | (b >>> 2);
      d = (((e << 5) | (e >>> 27)) + ((a & b) | (a & c) | (b & c)) + d + k +
        w[i + 1]) | 0;
      a = (a << 30) | (a >>> 2);
      c = (((d << 5) | (d >>> 27)) + ((e & a) | (e & b) | (a & b)) + c + k +
        w[i + 2]) | 0;
      e = (e << 30) | (e >>> 2);
      b = (((c << 5) | (c >>> 27)) + ((d & e) | (d & a) | (e & a)) + b + k +
        w[i + 3]) | 0;
      d = (d << 30) | (d >>> 2);
      a = (((b << 5) | (b >>> 27)) + ((c & d) | (c & e) | (d & e)) + a + k +
        w[i + 4]) | 0;
      c = (c << 30) | (c >>> 2);
    }
  }
  h[0] = (h[0] + a) | 0;
  h[1] = (h[1] + b) | 0;
  h[2] = (h[2] + c) | 0;
  h[3] = (h[3] + d) | 0;
  h[4] = (h[4] + e) | 0;
}

const INITIAL = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0];

/**
 * The SHA-1 digest of `message`, continuing from `state` after `prefix`
 * bytes already hashed (whole blocks).
 */
function finish(
  state: Int32Array,
  prefix: number,
  message: Uint8Array,
  w: Int32Array,
): Uint8Array {
  const h = state.slice();
  const total = prefix + message.length;
  const padded = new Uint8Array(Math.ceil((message.length + 9) / 64) * 64);
  padded.set(message);
  padded[message.length] = 0x80;
  const view = new DataView(padded.buffer);
  view.setUint32(padded.length - 8, Math.floor(total / 2 ** 29));
  view.setUint32(padded.length - 4, (total * 8) >>> 0);
  for (let at = 0; at < padded.length; at += 64) compress(h, padded, at, w);
  const out = new Uint8Array(20);
  const outView = new DataView(out.buffer);
  for (let i = 0; i < 5; i++) outView.setUint32(4 * i, h[i]);
  return out;
}

/**
 * The SHA-1 digest of `message`.
 *
 * @param message the bytes
 * @returns 20 bytes
 *
 * @example
 * ```ts
 * import { sha1 } from "./_sha1.ts";
 * const d = sha1(new TextEncoder().encode("abc"));
 * console.log(Array.from(d.subarray(0, 4), (b) => b.toString(16)).join("")); // a9993e36
 * ```
 */
export function sha1(message: Uint8Array): Uint8Array {
  return finish(Int32Array.from(INITIAL), 0, message, new Int32Array(80));
}

/** An HMAC-SHA1 key with its inner and outer blocks already hashed. */
export interface HmacSha1 {
  /** The MAC of `message` (20 bytes). */
  mac(message: Uint8Array): Uint8Array;
  /**
   * The first 16 bytes of the MAC of `n` as a big-endian 32-bit number,
   * written to `out` at `at`, without allocating: the IV of chunk `n` of
   * an encrypted Apple disk image.
   */
  macNumberInto(n: number, out: Uint8Array, at: number): void;
}

/**
 * HMAC-SHA1 with `key` (RFC 2104): keys longer than 64 bytes are hashed
 * first, as the RFC says.
 *
 * @param key the HMAC key
 * @returns the keyed MAC
 *
 * @example
 * ```ts
 * import { hmacSha1 } from "./_sha1.ts";
 * const mac = hmacSha1(new Uint8Array(20)).mac(new Uint8Array(4));
 * console.log(mac.length); // 20
 * ```
 */
export function hmacSha1(key: Uint8Array): HmacSha1 {
  const k = new Uint8Array(64);
  k.set(key.length > 64 ? sha1(key) : key);
  const w = new Int32Array(80);
  const inner = Int32Array.from(INITIAL);
  const outer = Int32Array.from(INITIAL);
  compress(inner, k.map((b) => b ^ 0x36), 0, w);
  compress(outer, k.map((b) => b ^ 0x5c), 0, w);
  // The last block of each hash, laid out once as words: the inner one
  // holds the 4-byte number, the outer one the inner digest, each followed
  // by the padding and the bit length (after a 64-byte key block).
  const innerWords = new Int32Array(80);
  innerWords[1] = 0x80000000 | 0;
  innerWords[15] = (64 + 4) * 8;
  const outerWords = new Int32Array(80);
  outerWords[5] = 0x80000000 | 0;
  outerWords[15] = (64 + 20) * 8;
  const h = new Int32Array(5);
  return {
    mac(message) {
      return finish(outer, 64, finish(inner, 64, message, w), w);
    },
    macNumberInto(n, out, at) {
      // Words 1-15 of both blocks never change (compressWords only writes
      // the schedule past them).
      innerWords[0] = n | 0;
      h.set(inner);
      compressWords(h, innerWords);
      for (let i = 0; i < 5; i++) outerWords[i] = h[i];
      h.set(outer);
      compressWords(h, outerWords);
      for (let i = 0; i < 4; i++) {
        const v = h[i];
        out[at + 4 * i] = v >>> 24;
        out[at + 4 * i + 1] = v >>> 16;
        out[at + 4 * i + 2] = v >>> 8;
        out[at + 4 * i + 3] = v;
      }
    },
  };
}
