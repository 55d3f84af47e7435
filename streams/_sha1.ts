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

/**
 * {@linkcode compress} of a block already in `w[0..16)` as big-endian
 * words (left as they are). All 80 rounds written out, the five working
 * variables renamed instead of shifted and the message schedule kept in 16
 * locals (a ring: word `i` replaces word `i - 16`): V8 keeps them in
 * registers. Measured here: 0.23 µs for the two compressions of a chunk
 * IV, against 0.42 µs for a loop of five-round steps over an 80-word
 * schedule array (IVs were a third of decrypting 512-byte chunks).
 */
// deno-fmt-ignore
function compressWords(h: Int32Array, w: Int32Array) {
  let a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
  let w0 = w[0]; let w1 = w[1]; let w2 = w[2]; let w3 = w[3]; let w4 = w[4]; let w5 = w[5]; let w6 = w[6]; let w7 = w[7]; let w8 = w[8]; let w9 = w[9]; let w10 = w[10]; let w11 = w[11]; let w12 = w[12]; let w13 = w[13]; let w14 = w[14]; let w15 = w[15];
  let x: number;
  e = (((a << 5) | (a >>> 27)) + ((b & c) | (~b & d)) + 0x5a827999 + e + w0) | 0; b = (b << 30) | (b >>> 2);
  d = (((e << 5) | (e >>> 27)) + ((a & b) | (~a & c)) + 0x5a827999 + d + w1) | 0; a = (a << 30) | (a >>> 2);
  c = (((d << 5) | (d >>> 27)) + ((e & a) | (~e & b)) + 0x5a827999 + c + w2) | 0; e = (e << 30) | (e >>> 2);
  b = (((c << 5) | (c >>> 27)) + ((d & e) | (~d & a)) + 0x5a827999 + b + w3) | 0; d = (d << 30) | (d >>> 2);
  a = (((b << 5) | (b >>> 27)) + ((c & d) | (~c & e)) + 0x5a827999 + a + w4) | 0; c = (c << 30) | (c >>> 2);
  e = (((a << 5) | (a >>> 27)) + ((b & c) | (~b & d)) + 0x5a827999 + e + w5) | 0; b = (b << 30) | (b >>> 2);
  d = (((e << 5) | (e >>> 27)) + ((a & b) | (~a & c)) + 0x5a827999 + d + w6) | 0; a = (a << 30) | (a >>> 2);
  c = (((d << 5) | (d >>> 27)) + ((e & a) | (~e & b)) + 0x5a827999 + c + w7) | 0; e = (e << 30) | (e >>> 2);
  b = (((c << 5) | (c >>> 27)) + ((d & e) | (~d & a)) + 0x5a827999 + b + w8) | 0; d = (d << 30) | (d >>> 2);
  a = (((b << 5) | (b >>> 27)) + ((c & d) | (~c & e)) + 0x5a827999 + a + w9) | 0; c = (c << 30) | (c >>> 2);
  e = (((a << 5) | (a >>> 27)) + ((b & c) | (~b & d)) + 0x5a827999 + e + w10) | 0; b = (b << 30) | (b >>> 2);
  d = (((e << 5) | (e >>> 27)) + ((a & b) | (~a & c)) + 0x5a827999 + d + w11) | 0; a = (a << 30) | (a >>> 2);
  c = (((d << 5) | (d >>> 27)) + ((e & a) | (~e & b)) + 0x5a827999 + c + w12) | 0; e = (e << 30) | (e >>> 2);
  b = (((c << 5) | (c >>> 27)) + ((d & e) | (~d & a)) + 0x5a827999 + b + w13) | 0; d = (d << 30) | (d >>> 2);
  a = (((b << 5) | (b >>> 27)) + ((c & d) | (~c & e)) + 0x5a827999 + a + w14) | 0; c = (c << 30) | (c >>> 2);
  e = (((a << 5) | (a >>> 27)) + ((b & c) | (~b & d)) + 0x5a827999 + e + w15) | 0; b = (b << 30) | (b >>> 2);
  x = w13 ^ w8 ^ w2 ^ w0; w0 = (x << 1) | (x >>> 31);
  d = (((e << 5) | (e >>> 27)) + ((a & b) | (~a & c)) + 0x5a827999 + d + w0) | 0; a = (a << 30) | (a >>> 2);
  x = w14 ^ w9 ^ w3 ^ w1; w1 = (x << 1) | (x >>> 31);
  c = (((d << 5) | (d >>> 27)) + ((e & a) | (~e & b)) + 0x5a827999 + c + w1) | 0; e = (e << 30) | (e >>> 2);
  x = w15 ^ w10 ^ w4 ^ w2; w2 = (x << 1) | (x >>> 31);
  b = (((c << 5) | (c >>> 27)) + ((d & e) | (~d & a)) + 0x5a827999 + b + w2) | 0; d = (d << 30) | (d >>> 2);
  x = w0 ^ w11 ^ w5 ^ w3; w3 = (x << 1) | (x >>> 31);
  a = (((b << 5) | (b >>> 27)) + ((c & d) | (~c & e)) + 0x5a827999 + a + w3) | 0; c = (c << 30) | (c >>> 2);
  x = w1 ^ w12 ^ w6 ^ w4; w4 = (x << 1) | (x >>> 31);
  e = (((a << 5) | (a >>> 27)) + (b ^ c ^ d) + 0x6ed9eba1 + e + w4) | 0; b = (b << 30) | (b >>> 2);
  x = w2 ^ w13 ^ w7 ^ w5; w5 = (x << 1) | (x >>> 31);
  d = (((e << 5) | (e >>> 27)) + (a ^ b ^ c) + 0x6ed9eba1 + d + w5) | 0; a = (a << 30) | (a >>> 2);
  x = w3 ^ w14 ^ w8 ^ w6; w6 = (x << 1) | (x >>> 31);
  c = (((d << 5) | (d >>> 27)) + (e ^ a ^ b) + 0x6ed9eba1 + c + w6) | 0; e = (e << 30) | (e >>> 2);
  x = w4 ^ w15 ^ w9 ^ w7; w7 = (x << 1) | (x >>> 31);
  b = (((c << 5) | (c >>> 27)) + (d ^ e ^ a) + 0x6ed9eba1 + b + w7) | 0; d = (d << 30) | (d >>> 2);
  x = w5 ^ w0 ^ w10 ^ w8; w8 = (x << 1) | (x >>> 31);
  a = (((b << 5) | (b >>> 27)) + (c ^ d ^ e) + 0x6ed9eba1 + a + w8) | 0; c = (c << 30) | (c >>> 2);
  x = w6 ^ w1 ^ w11 ^ w9; w9 = (x << 1) | (x >>> 31);
  e = (((a << 5) | (a >>> 27)) + (b ^ c ^ d) + 0x6ed9eba1 + e + w9) | 0; b = (b << 30) | (b >>> 2);
  x = w7 ^ w2 ^ w12 ^ w10; w10 = (x << 1) | (x >>> 31);
  d = (((e << 5) | (e >>> 27)) + (a ^ b ^ c) + 0x6ed9eba1 + d + w10) | 0; a = (a << 30) | (a >>> 2);
  x = w8 ^ w3 ^ w13 ^ w11; w11 = (x << 1) | (x >>> 31);
  c = (((d << 5) | (d >>> 27)) + (e ^ a ^ b) + 0x6ed9eba1 + c + w11) | 0; e = (e << 30) | (e >>> 2);
  x = w9 ^ w4 ^ w14 ^ w12; w12 = (x << 1) | (x >>> 31);
  b = (((c << 5) | (c >>> 27)) + (d ^ e ^ a) + 0x6ed9eba1 + b + w12) | 0; d = (d << 30) | (d >>> 2);
  x = w10 ^ w5 ^ w15 ^ w13; w13 = (x << 1) | (x >>> 31);
  a = (((b << 5) | (b >>> 27)) + (c ^ d ^ e) + 0x6ed9eba1 + a + w13) | 0; c = (c << 30) | (c >>> 2);
  x = w11 ^ w6 ^ w0 ^ w14; w14 = (x << 1) | (x >>> 31);
  e = (((a << 5) | (a >>> 27)) + (b ^ c ^ d) + 0x6ed9eba1 + e + w14) | 0; b = (b << 30) | (b >>> 2);
  x = w12 ^ w7 ^ w1 ^ w15; w15 = (x << 1) | (x >>> 31);
  d = (((e << 5) | (e >>> 27)) + (a ^ b ^ c) + 0x6ed9eba1 + d + w15) | 0; a = (a << 30) | (a >>> 2);
  x = w13 ^ w8 ^ w2 ^ w0; w0 = (x << 1) | (x >>> 31);
  c = (((d << 5) | (d >>> 27)) + (e ^ a ^ b) + 0x6ed9eba1 + c + w0) | 0; e = (e << 30) | (e >>> 2);
  x = w14 ^ w9 ^ w3 ^ w1; w1 = (x << 1) | (x >>> 31);
  b = (((c << 5) | (c >>> 27)) + (d ^ e ^ a) + 0x6ed9eba1 + b + w1) | 0; d = (d << 30) | (d >>> 2);
  x = w15 ^ w10 ^ w4 ^ w2; w2 = (x << 1) | (x >>> 31);
  a = (((b << 5) | (b >>> 27)) + (c ^ d ^ e) + 0x6ed9eba1 + a + w2) | 0; c = (c << 30) | (c >>> 2);
  x = w0 ^ w11 ^ w5 ^ w3; w3 = (x << 1) | (x >>> 31);
  e = (((a << 5) | (a >>> 27)) + (b ^ c ^ d) + 0x6ed9eba1 + e + w3) | 0; b = (b << 30) | (b >>> 2);
  x = w1 ^ w12 ^ w6 ^ w4; w4 = (x << 1) | (x >>> 31);
  d = (((e << 5) | (e >>> 27)) + (a ^ b ^ c) + 0x6ed9eba1 + d + w4) | 0; a = (a << 30) | (a >>> 2);
  x = w2 ^ w13 ^ w7 ^ w5; w5 = (x << 1) | (x >>> 31);
  c = (((d << 5) | (d >>> 27)) + (e ^ a ^ b) + 0x6ed9eba1 + c + w5) | 0; e = (e << 30) | (e >>> 2);
  x = w3 ^ w14 ^ w8 ^ w6; w6 = (x << 1) | (x >>> 31);
  b = (((c << 5) | (c >>> 27)) + (d ^ e ^ a) + 0x6ed9eba1 + b + w6) | 0; d = (d << 30) | (d >>> 2);
  x = w4 ^ w15 ^ w9 ^ w7; w7 = (x << 1) | (x >>> 31);
  a = (((b << 5) | (b >>> 27)) + (c ^ d ^ e) + 0x6ed9eba1 + a + w7) | 0; c = (c << 30) | (c >>> 2);
  x = w5 ^ w0 ^ w10 ^ w8; w8 = (x << 1) | (x >>> 31);
  e = (((a << 5) | (a >>> 27)) + ((b & c) | (b & d) | (c & d)) + 0x8f1bbcdc + e + w8) | 0; b = (b << 30) | (b >>> 2);
  x = w6 ^ w1 ^ w11 ^ w9; w9 = (x << 1) | (x >>> 31);
  d = (((e << 5) | (e >>> 27)) + ((a & b) | (a & c) | (b & c)) + 0x8f1bbcdc + d + w9) | 0; a = (a << 30) | (a >>> 2);
  x = w7 ^ w2 ^ w12 ^ w10; w10 = (x << 1) | (x >>> 31);
  c = (((d << 5) | (d >>> 27)) + ((e & a) | (e & b) | (a & b)) + 0x8f1bbcdc + c + w10) | 0; e = (e << 30) | (e >>> 2);
  x = w8 ^ w3 ^ w13 ^ w11; w11 = (x << 1) | (x >>> 31);
  b = (((c << 5) | (c >>> 27)) + ((d & e) | (d & a) | (e & a)) + 0x8f1bbcdc + b + w11) | 0; d = (d << 30) | (d >>> 2);
  x = w9 ^ w4 ^ w14 ^ w12; w12 = (x << 1) | (x >>> 31);
  a = (((b << 5) | (b >>> 27)) + ((c & d) | (c & e) | (d & e)) + 0x8f1bbcdc + a + w12) | 0; c = (c << 30) | (c >>> 2);
  x = w10 ^ w5 ^ w15 ^ w13; w13 = (x << 1) | (x >>> 31);
  e = (((a << 5) | (a >>> 27)) + ((b & c) | (b & d) | (c & d)) + 0x8f1bbcdc + e + w13) | 0; b = (b << 30) | (b >>> 2);
  x = w11 ^ w6 ^ w0 ^ w14; w14 = (x << 1) | (x >>> 31);
  d = (((e << 5) | (e >>> 27)) + ((a & b) | (a & c) | (b & c)) + 0x8f1bbcdc + d + w14) | 0; a = (a << 30) | (a >>> 2);
  x = w12 ^ w7 ^ w1 ^ w15; w15 = (x << 1) | (x >>> 31);
  c = (((d << 5) | (d >>> 27)) + ((e & a) | (e & b) | (a & b)) + 0x8f1bbcdc + c + w15) | 0; e = (e << 30) | (e >>> 2);
  x = w13 ^ w8 ^ w2 ^ w0; w0 = (x << 1) | (x >>> 31);
  b = (((c << 5) | (c >>> 27)) + ((d & e) | (d & a) | (e & a)) + 0x8f1bbcdc + b + w0) | 0; d = (d << 30) | (d >>> 2);
  x = w14 ^ w9 ^ w3 ^ w1; w1 = (x << 1) | (x >>> 31);
  a = (((b << 5) | (b >>> 27)) + ((c & d) | (c & e) | (d & e)) + 0x8f1bbcdc + a + w1) | 0; c = (c << 30) | (c >>> 2);
  x = w15 ^ w10 ^ w4 ^ w2; w2 = (x << 1) | (x >>> 31);
  e = (((a << 5) | (a >>> 27)) + ((b & c) | (b & d) | (c & d)) + 0x8f1bbcdc + e + w2) | 0; b = (b << 30) | (b >>> 2);
  x = w0 ^ w11 ^ w5 ^ w3; w3 = (x << 1) | (x >>> 31);
  d = (((e << 5) | (e >>> 27)) + ((a & b) | (a & c) | (b & c)) + 0x8f1bbcdc + d + w3) | 0; a = (a << 30) | (a >>> 2);
  x = w1 ^ w12 ^ w6 ^ w4; w4 = (x << 1) | (x >>> 31);
  c = (((d << 5) | (d >>> 27)) + ((e & a) | (e & b) | (a & b)) + 0x8f1bbcdc + c + w4) | 0; e = (e << 30) | (e >>> 2);
  x = w2 ^ w13 ^ w7 ^ w5; w5 = (x << 1) | (x >>> 31);
  b = (((c << 5) | (c >>> 27)) + ((d & e) | (d & a) | (e & a)) + 0x8f1bbcdc + b + w5) | 0; d = (d << 30) | (d >>> 2);
  x = w3 ^ w14 ^ w8 ^ w6; w6 = (x << 1) | (x >>> 31);
  a = (((b << 5) | (b >>> 27)) + ((c & d) | (c & e) | (d & e)) + 0x8f1bbcdc + a + w6) | 0; c = (c << 30) | (c >>> 2);
  x = w4 ^ w15 ^ w9 ^ w7; w7 = (x << 1) | (x >>> 31);
  e = (((a << 5) | (a >>> 27)) + ((b & c) | (b & d) | (c & d)) + 0x8f1bbcdc + e + w7) | 0; b = (b << 30) | (b >>> 2);
  x = w5 ^ w0 ^ w10 ^ w8; w8 = (x << 1) | (x >>> 31);
  d = (((e << 5) | (e >>> 27)) + ((a & b) | (a & c) | (b & c)) + 0x8f1bbcdc + d + w8) | 0; a = (a << 30) | (a >>> 2);
  x = w6 ^ w1 ^ w11 ^ w9; w9 = (x << 1) | (x >>> 31);
  c = (((d << 5) | (d >>> 27)) + ((e & a) | (e & b) | (a & b)) + 0x8f1bbcdc + c + w9) | 0; e = (e << 30) | (e >>> 2);
  x = w7 ^ w2 ^ w12 ^ w10; w10 = (x << 1) | (x >>> 31);
  b = (((c << 5) | (c >>> 27)) + ((d & e) | (d & a) | (e & a)) + 0x8f1bbcdc + b + w10) | 0; d = (d << 30) | (d >>> 2);
  x = w8 ^ w3 ^ w13 ^ w11; w11 = (x << 1) | (x >>> 31);
  a = (((b << 5) | (b >>> 27)) + ((c & d) | (c & e) | (d & e)) + 0x8f1bbcdc + a + w11) | 0; c = (c << 30) | (c >>> 2);
  x = w9 ^ w4 ^ w14 ^ w12; w12 = (x << 1) | (x >>> 31);
  e = (((a << 5) | (a >>> 27)) + (b ^ c ^ d) + 0xca62c1d6 + e + w12) | 0; b = (b << 30) | (b >>> 2);
  x = w10 ^ w5 ^ w15 ^ w13; w13 = (x << 1) | (x >>> 31);
  d = (((e << 5) | (e >>> 27)) + (a ^ b ^ c) + 0xca62c1d6 + d + w13) | 0; a = (a << 30) | (a >>> 2);
  x = w11 ^ w6 ^ w0 ^ w14; w14 = (x << 1) | (x >>> 31);
  c = (((d << 5) | (d >>> 27)) + (e ^ a ^ b) + 0xca62c1d6 + c + w14) | 0; e = (e << 30) | (e >>> 2);
  x = w12 ^ w7 ^ w1 ^ w15; w15 = (x << 1) | (x >>> 31);
  b = (((c << 5) | (c >>> 27)) + (d ^ e ^ a) + 0xca62c1d6 + b + w15) | 0; d = (d << 30) | (d >>> 2);
  x = w13 ^ w8 ^ w2 ^ w0; w0 = (x << 1) | (x >>> 31);
  a = (((b << 5) | (b >>> 27)) + (c ^ d ^ e) + 0xca62c1d6 + a + w0) | 0; c = (c << 30) | (c >>> 2);
  x = w14 ^ w9 ^ w3 ^ w1; w1 = (x << 1) | (x >>> 31);
  e = (((a << 5) | (a >>> 27)) + (b ^ c ^ d) + 0xca62c1d6 + e + w1) | 0; b = (b << 30) | (b >>> 2);
  x = w15 ^ w10 ^ w4 ^ w2; w2 = (x << 1) | (x >>> 31);
  d = (((e << 5) | (e >>> 27)) + (a ^ b ^ c) + 0xca62c1d6 + d + w2) | 0; a = (a << 30) | (a >>> 2);
  x = w0 ^ w11 ^ w5 ^ w3; w3 = (x << 1) | (x >>> 31);
  c = (((d << 5) | (d >>> 27)) + (e ^ a ^ b) + 0xca62c1d6 + c + w3) | 0; e = (e << 30) | (e >>> 2);
  x = w1 ^ w12 ^ w6 ^ w4; w4 = (x << 1) | (x >>> 31);
  b = (((c << 5) | (c >>> 27)) + (d ^ e ^ a) + 0xca62c1d6 + b + w4) | 0; d = (d << 30) | (d >>> 2);
  x = w2 ^ w13 ^ w7 ^ w5; w5 = (x << 1) | (x >>> 31);
  a = (((b << 5) | (b >>> 27)) + (c ^ d ^ e) + 0xca62c1d6 + a + w5) | 0; c = (c << 30) | (c >>> 2);
  x = w3 ^ w14 ^ w8 ^ w6; w6 = (x << 1) | (x >>> 31);
  e = (((a << 5) | (a >>> 27)) + (b ^ c ^ d) + 0xca62c1d6 + e + w6) | 0; b = (b << 30) | (b >>> 2);
  x = w4 ^ w15 ^ w9 ^ w7; w7 = (x << 1) | (x >>> 31);
  d = (((e << 5) | (e >>> 27)) + (a ^ b ^ c) + 0xca62c1d6 + d + w7) | 0; a = (a << 30) | (a >>> 2);
  x = w5 ^ w0 ^ w10 ^ w8; w8 = (x << 1) | (x >>> 31);
  c = (((d << 5) | (d >>> 27)) + (e ^ a ^ b) + 0xca62c1d6 + c + w8) | 0; e = (e << 30) | (e >>> 2);
  x = w6 ^ w1 ^ w11 ^ w9; w9 = (x << 1) | (x >>> 31);
  b = (((c << 5) | (c >>> 27)) + (d ^ e ^ a) + 0xca62c1d6 + b + w9) | 0; d = (d << 30) | (d >>> 2);
  x = w7 ^ w2 ^ w12 ^ w10; w10 = (x << 1) | (x >>> 31);
  a = (((b << 5) | (b >>> 27)) + (c ^ d ^ e) + 0xca62c1d6 + a + w10) | 0; c = (c << 30) | (c >>> 2);
  x = w8 ^ w3 ^ w13 ^ w11; w11 = (x << 1) | (x >>> 31);
  e = (((a << 5) | (a >>> 27)) + (b ^ c ^ d) + 0xca62c1d6 + e + w11) | 0; b = (b << 30) | (b >>> 2);
  x = w9 ^ w4 ^ w14 ^ w12; w12 = (x << 1) | (x >>> 31);
  d = (((e << 5) | (e >>> 27)) + (a ^ b ^ c) + 0xca62c1d6 + d + w12) | 0; a = (a << 30) | (a >>> 2);
  x = w10 ^ w5 ^ w15 ^ w13; w13 = (x << 1) | (x >>> 31);
  c = (((d << 5) | (d >>> 27)) + (e ^ a ^ b) + 0xca62c1d6 + c + w13) | 0; e = (e << 30) | (e >>> 2);
  x = w11 ^ w6 ^ w0 ^ w14; w14 = (x << 1) | (x >>> 31);
  b = (((c << 5) | (c >>> 27)) + (d ^ e ^ a) + 0xca62c1d6 + b + w14) | 0; d = (d << 30) | (d >>> 2);
  x = w12 ^ w7 ^ w1 ^ w15; w15 = (x << 1) | (x >>> 31);
  a = (((b << 5) | (b >>> 27)) + (c ^ d ^ e) + 0xca62c1d6 + a + w15) | 0; c = (c << 30) | (c >>> 2);
  h[0] = (h[0] + a) | 0; h[1] = (h[1] + b) | 0; h[2] = (h[2] + c) | 0; h[3] = (h[3] + d) | 0; h[4] = (h[4] + e) | 0;
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
      // Words 1-15 of both blocks never change (compressWords reads its
      // block without writing it).
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
