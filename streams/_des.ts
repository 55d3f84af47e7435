/**
 * Triple DES (3DES-EDE with three keys, FIPS 46-3 and SP 800-67) in CBC
 * mode, decrypting only: what the key records of encrypted Apple disk
 * images (`encrcdsa`, `cdsaencr`) are wrapped with. WebCrypto has no DES.
 *
 * Written for clarity, not speed: blocks are handled as arrays of bits and
 * every permutation is a table lookup, exactly as the standard states
 * them. An image's key records are a few dozen bytes, so this runs a
 * handful of blocks per open. The tables are checked against OpenSSL's
 * `des-ede3-cbc` in `tests/des_test.ts`.
 *
 * This module is browser compatible.
 *
 * @module
 */

// The standard's tables, bit positions counted from 1 at the most
// significant bit of the first byte.

/** Initial permutation (IP). */
// deno-fmt-ignore
const IP = [
  58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4,
  62, 54, 46, 38, 30, 22, 14, 6, 64, 56, 48, 40, 32, 24, 16, 8,
  57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3,
  61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7,
];

/** The final permutation, IP's inverse (computed, not typed in). */
const FP = (() => {
  const fp = new Array<number>(64);
  IP.forEach((from, to) => fp[from - 1] = to + 1);
  return fp;
})();

/** Expansion of the 32-bit half to 48 bits (E). */
// deno-fmt-ignore
const E = [
  32, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 8, 9, 10, 11, 12, 13,
  12, 13, 14, 15, 16, 17, 16, 17, 18, 19, 20, 21, 20, 21, 22, 23, 24, 25,
  24, 25, 26, 27, 28, 29, 28, 29, 30, 31, 32, 1,
];

/** The permutation after the S-boxes (P). */
// deno-fmt-ignore
const P = [
  16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10,
  2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25,
];

/** Permuted choice 1: the key's 56 bits (parity bits dropped). */
// deno-fmt-ignore
const PC1 = [
  57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18,
  10, 2, 59, 51, 43, 35, 27, 19, 11, 3, 60, 52, 44, 36,
  63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22,
  14, 6, 61, 53, 45, 37, 29, 21, 13, 5, 28, 20, 12, 4,
];

/** Permuted choice 2: a round's 48 key bits from C and D. */
// deno-fmt-ignore
const PC2 = [
  14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10,
  23, 19, 12, 4, 26, 8, 16, 7, 27, 20, 13, 2,
  41, 52, 31, 37, 47, 55, 30, 40, 51, 45, 33, 48,
  44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32,
];

/** Left rotations of C and D before each round. */
const SHIFTS = [1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1];

/** The eight S-boxes, each 4 rows of 16. */
// deno-fmt-ignore
export const SBOXES: readonly (readonly number[])[] = [
  [
    14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7,
    0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12, 11, 9, 5, 3, 8,
    4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0,
    15, 12, 8, 2, 4, 9, 1, 7, 5, 11, 3, 14, 10, 0, 6, 13,
  ],
  [
    15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10,
    3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1, 10, 6, 9, 11, 5,
    0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15,
    13, 8, 10, 1, 3, 15, 4, 2, 11, 6, 7, 12, 0, 5, 14, 9,
  ],
  [
    10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8,
    13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5, 14, 12, 11, 15, 1,
    13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7,
    1, 10, 13, 0, 6, 9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12,
  ],
  [
    7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15,
    13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2, 12, 1, 10, 14, 9,
    10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4,
    3, 15, 0, 6, 10, 1, 13, 8, 9, 4, 5, 11, 12, 7, 2, 14,
  ],
  [
    2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9,
    14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15, 10, 3, 9, 8, 6,
    4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14,
    11, 8, 12, 7, 1, 14, 2, 13, 6, 15, 0, 9, 10, 4, 5, 3,
  ],
  [
    12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11,
    10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13, 14, 0, 11, 3, 8,
    9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6,
    4, 3, 2, 12, 9, 5, 15, 10, 11, 14, 1, 7, 6, 0, 8, 13,
  ],
  [
    4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1,
    13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5, 12, 2, 15, 8, 6,
    1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2,
    6, 11, 13, 8, 1, 4, 10, 7, 9, 5, 0, 15, 14, 2, 3, 12,
  ],
  [
    13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7,
    1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6, 11, 0, 14, 9, 2,
    7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8,
    2, 1, 14, 7, 4, 10, 8, 13, 15, 12, 9, 0, 3, 5, 6, 11,
  ],
];

/** The bits of `bytes`, most significant first, one per array element. */
function bitsOf(bytes: Uint8Array): Uint8Array {
  const bits = new Uint8Array(bytes.length * 8);
  for (let i = 0; i < bits.length; i++) {
    bits[i] = (bytes[i >> 3] >> (7 - (i & 7))) & 1;
  }
  return bits;
}

/** The bytes of a bit array (its length a multiple of 8). */
function bytesOf(bits: Uint8Array): Uint8Array {
  const bytes = new Uint8Array(bits.length / 8);
  for (let i = 0; i < bits.length; i++) {
    bytes[i >> 3] |= bits[i] << (7 - (i & 7));
  }
  return bytes;
}

/** `table[i]`-th bit of `input` (counted from 1) at position i. */
function permute(input: Uint8Array, table: readonly number[]): Uint8Array {
  const out = new Uint8Array(table.length);
  for (let i = 0; i < table.length; i++) out[i] = input[table[i] - 1];
  return out;
}

/** The 16 round keys (48 bits each) of one 8-byte DES key. */
function roundKeys(key: Uint8Array): Uint8Array[] {
  const cd = permute(bitsOf(key), PC1);
  let c = Array.from(cd.subarray(0, 28));
  let d = Array.from(cd.subarray(28));
  return SHIFTS.map((shift) => {
    c = [...c.slice(shift), ...c.slice(0, shift)];
    d = [...d.slice(shift), ...d.slice(0, shift)];
    return permute(Uint8Array.from([...c, ...d]), PC2);
  });
}

/** One DES block (8 bytes) through the 16 rounds with `keys` in order. */
function desBlock(block: Uint8Array, keys: Uint8Array[]): Uint8Array {
  const bits = permute(bitsOf(block), IP);
  let left = bits.subarray(0, 32);
  let right = bits.subarray(32);
  for (const k of keys) {
    const x = permute(right, E);
    for (let i = 0; i < 48; i++) x[i] ^= k[i];
    const s = new Uint8Array(32);
    for (let box = 0; box < 8; box++) {
      const b = x.subarray(box * 6, box * 6 + 6);
      const row = (b[0] << 1) | b[5];
      const column = (b[1] << 3) | (b[2] << 2) | (b[3] << 1) | b[4];
      const v = SBOXES[box][row * 16 + column];
      for (let j = 0; j < 4; j++) s[box * 4 + j] = (v >> (3 - j)) & 1;
    }
    const f = permute(s, P);
    const next = new Uint8Array(32);
    for (let i = 0; i < 32; i++) next[i] = left[i] ^ f[i];
    left = right;
    right = next;
  }
  // The halves are swapped after the last round: R16 L16.
  const joined = new Uint8Array(64);
  joined.set(right, 0);
  joined.set(left, 32);
  return bytesOf(permute(joined, FP));
}

/** A Triple-DES key's three schedules, each way. */
export interface TripleDesKey {
  /** Round keys of K1, K2, K3 in encryption order. */
  readonly encrypt: readonly Uint8Array[][];
  /** Round keys of K1, K2, K3 reversed, for decryption. */
  readonly decrypt: readonly Uint8Array[][];
}

/**
 * Expands a 24-byte 3DES key (K1, K2, K3, 8 bytes each; parity bits are
 * ignored, as the standard says).
 *
 * @param key 24 bytes
 * @returns the schedules
 *
 * @example
 * ```ts
 * import { tripleDesKey } from "./_des.ts";
 * console.log(tripleDesKey(new Uint8Array(24)).encrypt.length); // 3
 * ```
 */
export function tripleDesKey(key: Uint8Array): TripleDesKey {
  if (key.length !== 24) throw new RangeError("3DES needs a 24-byte key");
  const schedules = [0, 8, 16].map((at) => roundKeys(key.subarray(at, at + 8)));
  return {
    encrypt: schedules,
    decrypt: schedules.map((s) => [...s].reverse()),
  };
}

/**
 * Encrypts one 8-byte block with 3DES-EDE: E(K3, D(K2, E(K1, block))).
 *
 * @param key the expanded key
 * @param block 8 bytes
 * @returns the 8 bytes of ciphertext
 *
 * @example
 * ```ts
 * import { tripleDesEncryptBlock, tripleDesKey } from "./_des.ts";
 * const out = tripleDesEncryptBlock(tripleDesKey(new Uint8Array(24)), new Uint8Array(8));
 * console.log(out.length); // 8
 * ```
 */
export function tripleDesEncryptBlock(
  key: TripleDesKey,
  block: Uint8Array,
): Uint8Array {
  const a = desBlock(block, key.encrypt[0]);
  const b = desBlock(a, key.decrypt[1]);
  return desBlock(b, key.encrypt[2]);
}

/**
 * Decrypts one 8-byte block with 3DES-EDE: D(K1, E(K2, D(K3, block))).
 *
 * @param key the expanded key
 * @param block 8 bytes of ciphertext
 * @returns the 8 bytes of plaintext
 *
 * @example
 * ```ts
 * import { tripleDesDecryptBlock, tripleDesEncryptBlock, tripleDesKey } from "./_des.ts";
 * const key = tripleDesKey(new Uint8Array(24).map((_, i) => i));
 * const block = new Uint8Array(8).fill(5);
 * console.log(tripleDesDecryptBlock(key, tripleDesEncryptBlock(key, block))[0]); // 5
 * ```
 */
export function tripleDesDecryptBlock(
  key: TripleDesKey,
  block: Uint8Array,
): Uint8Array {
  const a = desBlock(block, key.decrypt[2]);
  const b = desBlock(a, key.encrypt[1]);
  return desBlock(b, key.decrypt[0]);
}

/**
 * Decrypts 3DES-EDE-CBC (no padding removed: the caller checks it).
 *
 * @param key the 24-byte key
 * @param iv the 8-byte IV
 * @param data the ciphertext, a multiple of 8 bytes
 * @returns the plaintext, as long as `data`
 *
 * @example
 * ```ts
 * import { tripleDesCbcDecrypt } from "./_des.ts";
 * const plain = tripleDesCbcDecrypt(new Uint8Array(24), new Uint8Array(8), new Uint8Array(16));
 * console.log(plain.length); // 16
 * ```
 */
export function tripleDesCbcDecrypt(
  key: Uint8Array,
  iv: Uint8Array,
  data: Uint8Array,
): Uint8Array {
  if (iv.length !== 8) throw new RangeError("3DES-CBC needs an 8-byte IV");
  if (data.length % 8 !== 0) {
    throw new RangeError("3DES-CBC ciphertext must be a multiple of 8 bytes");
  }
  const expanded = tripleDesKey(key);
  const out = new Uint8Array(data.length);
  let previous = iv;
  for (let at = 0; at < data.length; at += 8) {
    const block = data.subarray(at, at + 8);
    const plain = tripleDesDecryptBlock(expanded, block);
    for (let i = 0; i < 8; i++) out[at + i] = plain[i] ^ previous[i];
    previous = block;
  }
  return out;
}
