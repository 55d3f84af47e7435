/**
 * Encrypted Apple disk images: the `encrcdsa` (version 2) header at the
 * start of the file or the `cdsaencr` (version 1) trailer at its end, the
 * password key records, and the decrypting source of what they protect
 * (a whole UDIF file, or a raw disk). All integers are big-endian.
 *
 * Written from the public descriptions: apfs-fuse `ApfsLib/DiskImageFile.cpp`,
 * dmg2img `vfdecrypt.c`, dmgwiz `src/crypto`, and notes measured on images
 * current `hdiutil` writes.
 *
 * Version 2 header (offset 0):
 *
 * | offset | size   | field                                               |
 * | ------ | ------ | --------------------------------------------------- |
 * | 0      | 8      | signature `encrcdsa`                                |
 * | 8      | 4      | version (2)                                         |
 * | 12     | 4      | EncIvSize (16)                                      |
 * | 16     | 4      | EncMode                                             |
 * | 20     | 4      | EncAlgorithm (0x80000001, AES)                      |
 * | 24     | 4      | EncKeyBits: 128 or 256 (AES-128 or AES-256)         |
 * | 28     | 4      | PrngAlgorithm                                       |
 * | 32     | 4      | PrngKeySize (160: the HMAC-SHA1 key)                |
 * | 36     | 16     | UUID                                                |
 * | 52     | 4      | BlockSize: bytes per encrypted chunk (512; 4096 old) |
 * | 56     | 8      | DataSize: bytes of plaintext                        |
 * | 64     | 8      | DataOffset: where the first chunk's ciphertext is   |
 * | 72     | 4      | KeyCount                                            |
 * | 76     | 20 × n | key pointers: type (4; 1 = password), offset (8), length (8) |
 *
 * A password key record (at its pointer's offset; vfdecrypt assumes 0x2a8,
 * current hdiutil writes 0x60):
 *
 * | offset | size | field                                                  |
 * | ------ | ---- | ------------------------------------------------------ |
 * | 0      | 4    | KdfAlgorithm (103: PBKDF2-HMAC-SHA1)                   |
 * | 4      | 4    | KdfPrngAlgorithm                                       |
 * | 8      | 4    | KdfIterationCount                                      |
 * | 12     | 4    | KdfSaltLen (20)                                        |
 * | 16     | 32   | KdfSalt                                                |
 * | 48     | 4    | BlobEncIvSize (8)                                      |
 * | 52     | 32   | BlobEncIv (zero-extended to the wrapping cipher's block) |
 * | 84     | 4    | BlobEncKeyBits (192)                                   |
 * | 88     | 4    | BlobEncAlgorithm: 17 (3DES-EDE) or 0x80000001 (AES)    |
 * | 92     | 4    | BlobEncPadding (7: PKCS#7)                             |
 * | 96     | 4    | BlobEncMode (6: CBC)                                   |
 * | 100    | 4    | EncryptedKeyblobSize                                   |
 * | 104    | n    | EncryptedKeyblob                                       |
 *
 * The wrapping key is PBKDF2-HMAC-SHA1(password, salt, iterations,
 * BlobEncKeyBits / 8); the key blob decrypts (CBC) to the AES key, the
 * 20-byte HMAC-SHA1 key, `CKIE` and a zero byte, then PKCS#7 padding:
 * valid padding and the `CKIE` marker are the password check.
 *
 * Version 1 trailer (the last 0x4fc bytes; data from offset 0, chunks of
 * BlockSize, AES-128):
 *
 * | offset | size | field                                                  |
 * | ------ | ---- | ------------------------------------------------------ |
 * | 0      | 16   | UUID                                                   |
 * | 16     | 4    | BlockSize                                              |
 * | 48     | 4    | KdfIterationCount                                      |
 * | 52     | 4    | KdfSaltLen                                             |
 * | 56     | 32   | KdfSalt                                                |
 * | 136    | 4    | wrapped AES key length                                 |
 * | 140    | 256  | wrapped AES key                                        |
 * | 436    | 4    | wrapped HMAC-SHA1 key length                           |
 * | 440    | 256  | wrapped HMAC-SHA1 key                                  |
 * | 1256   | 8    | decrypted data length                                  |
 * | 1268   | 8    | signature `cdsaencr`                                   |
 *
 * Its keys are wrapped as RFC 3217 describes (3DES-CBC with the IV
 * 4adda22c79e82105, the result reversed, decrypted again with its first
 * 8 bytes as IV; a 4-byte prefix, then the key).
 *
 * Chunk `n` (from 0) of either version is AES-CBC with the IV
 * HMAC-SHA1(HMAC key, n as 4 big-endian bytes) cut to 16 bytes.
 *
 * This module is browser compatible.
 *
 * @module
 */

import {
  ENCRYPTED_V1_MAGIC,
  ENCRYPTED_V2_MAGIC,
  encryptedVersion,
} from "../_signatures.ts";
import { ascii, be32, be64, formatErrors, Scratch } from "../_binary.ts";
import {
  ImageFormatError,
  KeyError,
  UnsupportedError,
} from "../../streams/errors.ts";
import {
  checkRange,
  readInto as readFrom,
  type Source,
} from "../../streams/types.ts";
import { tripleDesCbcDecrypt } from "../../streams/_des.ts";
import { type HmacSha1, hmacSha1 } from "../../streams/_sha1.ts";
import {
  type AesKey,
  decryptBlock,
  encryptBlock,
  expandKey,
} from "../../streams/_aes.ts";

/** The driver name errors carry. */
export const FORMAT = "dmg-encrypted";

// The signatures and their check live with the probes (drivers/_signatures.ts).
export { encryptedVersion };
/** The version 2 signature, at offset 0. */
export const V2_MAGIC = ENCRYPTED_V2_MAGIC;
/** The version 1 signature, the file's last 8 bytes. */
export const V1_MAGIC = ENCRYPTED_V1_MAGIC;

const V2_HEADER_BYTES = 0x4c;
const KEY_POINTER_BYTES = 20;
const KEY_RECORD_FIXED_BYTES = 0x68;
/** Size of the version 1 trailer. */
export const V1_TRAILER_BYTES = 0x4fc;

/**
 * The most PBKDF2 iterations a key record may ask for. hdiutil calibrates
 * the count to its machine (hundreds of thousands); a forged record with
 * 2^31 would make every password attempt take hours.
 */
export const MAX_ITERATIONS = 10_000_000;
/**
 * The most PBKDF2 iterations of all password key records together: a
 * wrong password tries each record, so 64 records of 10,000,000 would
 * take minutes.
 */
export const MAX_TOTAL_ITERATIONS = 2 * MAX_ITERATIONS;
/** The most key pointers a header may list. */
const MAX_KEYS = 64;
/** The largest key blob read (real ones are 48 or 64 bytes). */
const MAX_BLOB_BYTES = 4096;
/** The largest chunk (BlockSize) accepted. */
const MAX_BLOCK_BYTES = 1 << 20;
/** Ciphertext decrypted per WebCrypto call at most. */
const GROUP_BYTES = 4 << 20;

const CSSM_ALGID_PKCS5_PBKDF2 = 103;
const CSSM_ALGID_3DES_3KEY_EDE = 17;
const CSSM_ALGID_AES = 0x80000001;
/** Key pointer type of a password-wrapped key record. */
const KEY_TYPE_PASSWORD = 1;
/** The IV of RFC 3217's first unwrap step. */
// deno-fmt-ignore
const RFC3217_IV = Uint8Array.from([0x4a, 0xdd, 0xa2, 0x2c, 0x79, 0xe8, 0x21, 0x05]);

const fail = formatErrors(FORMAT);

/** One key record a version 2 header points at. */
export interface KeyRecord {
  /** Its place in the pointer table. */
  index: number;
  /** The pointer's type (1: a password record). */
  type: number;
  /** File offset and length of the record. */
  offset: number;
  length: number;
  /** The fields of a password record (type 1); absent for other types. */
  password?: {
    iterations: number;
    salt: Uint8Array;
    /** The blob cipher's IV, zero-extended to its block. */
    iv: Uint8Array;
    /** 3DES-EDE-CBC or AES-CBC. */
    cipher: "3des" | "aes";
    /** Bits of the wrapping key (192 for 3DES). */
    keyBits: number;
    blob: Uint8Array;
  };
}

/** What the header or trailer says. */
export interface EncryptedLayout {
  /** 2: the `encrcdsa` header; 1: the `cdsaencr` trailer. */
  version: 1 | 2;
  /** AES key bits of the data (128 or 256). */
  keyBits: number;
  /** Bytes per chunk. */
  blockSize: number;
  /** File offset of chunk 0's ciphertext. */
  dataOffset: number;
  /** Bytes of plaintext. */
  dataSize: number;
  /** The header's UUID, as hex. */
  uuid: string;
  /** Version 2's key records. */
  records: KeyRecord[];
  /** Version 1's key material. */
  v1?: {
    iterations: number;
    salt: Uint8Array;
    wrappedAesKey: Uint8Array;
    wrappedHmacKey: Uint8Array;
  };
}

/** The keys a password unlocks. */
export interface DataKeys {
  aesKey: Uint8Array;
  hmacKey: Uint8Array;
}

/** A 64-bit field as a number, or the error naming it when past 2^53. */
function u64(
  b: Uint8Array,
  at: number,
  field: string,
  offset: number,
  file?: string,
): number {
  const value = be64(b, at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw fail(field, value, "at most 2^53-1", offset, file);
  }
  return Number(value);
}

const hexOf = (b: Uint8Array) =>
  Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

/** Checks a chunk size field. */
function checkBlockSize(value: number, offset: number, file?: string) {
  if (value < 16 || value > MAX_BLOCK_BYTES || value % 16 !== 0) {
    throw fail(
      "BlockSize",
      value,
      `a multiple of 16 (the AES block) from 16 to ${MAX_BLOCK_BYTES}`,
      offset,
      file,
    );
  }
}

/** Checks an iteration count field. */
function checkIterations(value: number, offset: number, file?: string) {
  if (value < 1 || value > MAX_ITERATIONS) {
    throw fail(
      "KdfIterationCount",
      value,
      `from 1 to ${MAX_ITERATIONS} (PBKDF2 rounds per password attempt)`,
      offset,
      file,
    );
  }
}

/** Checks that the chunks of `dataSize` bytes lie within `[dataOffset, end)`. */
function checkData(
  layout: { blockSize: number; dataOffset: number; dataSize: number },
  end: number,
  field: string,
  offset: number,
  file?: string,
) {
  const chunks = Math.ceil(layout.dataSize / layout.blockSize);
  if (chunks > 2 ** 32) {
    throw fail(field, layout.dataSize, "at most 2^32 chunks", offset, file);
  }
  const needed = layout.dataOffset + chunks * layout.blockSize;
  if (needed > end) {
    throw fail(
      field,
      layout.dataSize,
      `such that its ${chunks} chunks of ${layout.blockSize} bytes from byte ${layout.dataOffset} end by byte ${end} (they end at ${needed}: the file is truncated or the field is wrong)`,
      offset,
      file,
    );
  }
}

/** Options of {@linkcode parseEncrypted}. */
export interface ParseOptions {
  /**
   * The source is a sparse bundle's `token`: the header and key records
   * only, the data being in the band files. DataOffset and DataSize then
   * describe no bytes of this file and are not checked against it.
   * @default false
   */
  token?: boolean;
}

/**
 * Reads and checks the header (or trailer) and the key records of an
 * encrypted image: every field that sizes a read or a loop is checked
 * first, with an {@linkcode ImageFormatError} naming it.
 *
 * @param source the encrypted file (or a sparse bundle's token)
 * @param options whether `source` is a bundle's token
 * @returns the layout
 *
 * @example
 * ```ts ignore
 * import { parseEncrypted } from "./_encrcdsa.ts";
 * const layout = await parseEncrypted(source);
 * console.log(layout.version, layout.keyBits, layout.records.length);
 * ```
 */
export async function parseEncrypted(
  source: Source,
  options: ParseOptions = {},
): Promise<EncryptedLayout> {
  const file = source.name;
  const size = source.size;
  const token = options.token === true;
  const head = await source.read(0, Math.min(8, size));
  if (head.length === 8 && ascii(head, 0, 8) === V2_MAGIC) {
    return await parseV2(source, token);
  }
  if (size < V1_TRAILER_BYTES) {
    throw fail(
      "file size",
      size,
      `at least ${V1_TRAILER_BYTES} bytes (the cdsaencr trailer), or an encrcdsa header at byte 0`,
      0,
      file,
    );
  }
  const at = size - V1_TRAILER_BYTES;
  const t = await source.read(at, V1_TRAILER_BYTES);
  if (ascii(t, V1_TRAILER_BYTES - 8) !== V1_MAGIC) {
    throw fail(
      "signature",
      ascii(head, 0, head.length),
      `"${V2_MAGIC}" at byte 0 or "${V1_MAGIC}" in the last 8 bytes`,
      0,
      file,
    );
  }
  const blockSize = be32(t, 0x10);
  checkBlockSize(blockSize, at + 0x10, file);
  const iterations = be32(t, 0x30);
  checkIterations(iterations, at + 0x30, file);
  const saltLength = be32(t, 0x34);
  if (saltLength < 1 || saltLength > 32) {
    throw fail("KdfSaltLen", saltLength, "from 1 to 32", at + 0x34, file);
  }
  const wrapped = (lengthAt: number, field: string) => {
    const length = be32(t, lengthAt);
    if (length < 16 || length > 256 || length % 8 !== 0) {
      throw fail(
        field,
        length,
        "a multiple of 8 from 16 to 256 (3DES blocks)",
        at + lengthAt,
        file,
      );
    }
    return t.slice(lengthAt + 4, lengthAt + 4 + length);
  };
  const layout: EncryptedLayout = {
    version: 1,
    keyBits: 128,
    blockSize,
    dataOffset: 0,
    dataSize: u64(t, 0x4e8, "decrypted data length", at + 0x4e8, file),
    uuid: hexOf(t.subarray(0, 16)),
    records: [],
    v1: {
      iterations,
      salt: t.slice(0x38, 0x38 + saltLength),
      wrappedAesKey: wrapped(0x88, "wrapped AES key length"),
      wrappedHmacKey: wrapped(0x1b4, "wrapped HMAC-SHA1 key length"),
    },
  };
  if (!token) {
    checkData(layout, at, "decrypted data length", at + 0x4e8, file);
  }
  return layout;
}

async function parseV2(
  source: Source,
  token: boolean,
): Promise<EncryptedLayout> {
  const file = source.name;
  const size = source.size;
  if (size < V2_HEADER_BYTES) {
    throw fail(
      "file size",
      size,
      `at least ${V2_HEADER_BYTES} bytes (the encrcdsa header)`,
      0,
      file,
    );
  }
  const h = await source.read(0, V2_HEADER_BYTES);
  const version = be32(h, 8);
  if (version !== 2) {
    throw new UnsupportedError(
      { format: FORMAT, field: "version", value: version, offset: 8, file },
      `encrcdsa header version ${version}: only version 2 is known`,
    );
  }
  const keyBits = be32(h, 0x18);
  if (keyBits !== 128 && keyBits !== 256) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "EncKeyBits",
        value: keyBits,
        offset: 0x18,
        file,
      },
      `EncKeyBits ${keyBits}: only AES-128 and AES-256 images are known`,
    );
  }
  const blockSize = be32(h, 0x34);
  checkBlockSize(blockSize, 0x34, file);
  const number = (at: number, field: string) => u64(h, at, field, at, file);
  const dataSize = number(0x38, "DataSize");
  const dataOffset = number(0x40, "DataOffset");
  const keyCount = be32(h, 0x48);
  if (keyCount < 1 || keyCount > MAX_KEYS) {
    throw fail("KeyCount", keyCount, `from 1 to ${MAX_KEYS}`, 0x48, file);
  }
  const tableEnd = V2_HEADER_BYTES + keyCount * KEY_POINTER_BYTES;
  if (tableEnd > size) {
    throw fail(
      "KeyCount",
      keyCount,
      `such that its ${keyCount} key pointers end within the file's ${size} bytes`,
      0x48,
      file,
    );
  }
  if (!token && dataOffset < tableEnd) {
    throw fail(
      "DataOffset",
      dataOffset,
      `at least ${tableEnd} (after the header and its key pointers)`,
      0x40,
      file,
    );
  }
  const layout: EncryptedLayout = {
    version: 2,
    keyBits,
    blockSize,
    dataOffset,
    dataSize,
    uuid: hexOf(h.subarray(0x24, 0x34)),
    records: [],
  };
  if (!token) checkData(layout, size, "DataSize", 0x38, file);
  const table = await source.read(
    V2_HEADER_BYTES,
    keyCount * KEY_POINTER_BYTES,
  );
  let total = 0;
  for (let i = 0; i < keyCount; i++) {
    const p = i * KEY_POINTER_BYTES;
    const where = V2_HEADER_BYTES + p;
    const type = be32(table, p);
    const offset = u64(
      table,
      p + 4,
      `key pointer ${i} offset`,
      where + 4,
      file,
    );
    const length = u64(
      table,
      p + 12,
      `key pointer ${i} length`,
      where + 12,
      file,
    );
    const record: KeyRecord = { index: i, type, offset, length };
    layout.records.push(record);
    if (offset > size || length > size - offset) {
      throw fail(
        `key pointer ${i} offset + length`,
        offset + length,
        `at most the file's ${size} bytes (the key record is truncated)`,
        where + 4,
        file,
      );
    }
    if (type !== KEY_TYPE_PASSWORD) continue; // listed, never unwrapped
    if (length < KEY_RECORD_FIXED_BYTES || length > 0x10000) {
      throw fail(
        `key pointer ${i} length`,
        length,
        `from ${KEY_RECORD_FIXED_BYTES} to 65536 (a password key record)`,
        where + 12,
        file,
      );
    }
    record.password = parsePasswordRecord(
      await source.read(offset, length),
      i,
      offset,
      file,
    );
    total += record.password!.iterations;
    if (total > MAX_TOTAL_ITERATIONS) {
      throw fail(
        "KdfIterationCount (all password key records)",
        total,
        `at most ${MAX_TOTAL_ITERATIONS} in all (each is tried with a wrong password)`,
        offset + 8,
        file,
      );
    }
  }
  return layout;
}

/** The fields of a password key record, checked. */
function parsePasswordRecord(
  r: Uint8Array,
  i: number,
  at: number,
  file?: string,
): KeyRecord["password"] {
  const field = (name: string) => `key record ${i} ${name}`;
  const kdf = be32(r, 0);
  if (kdf !== CSSM_ALGID_PKCS5_PBKDF2) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: field("KdfAlgorithm"),
        value: kdf,
        offset: at,
        file,
      },
      `${field("KdfAlgorithm")} ${kdf}: only PBKDF2 (103) is known`,
    );
  }
  const iterations = be32(r, 8);
  if (iterations < 1 || iterations > MAX_ITERATIONS) {
    throw fail(
      field("KdfIterationCount"),
      iterations,
      `from 1 to ${MAX_ITERATIONS} (PBKDF2 rounds per password attempt)`,
      at + 8,
      file,
    );
  }
  const saltLength = be32(r, 12);
  if (saltLength < 1 || saltLength > 32) {
    throw fail(field("KdfSaltLen"), saltLength, "from 1 to 32", at + 12, file);
  }
  const algorithm = be32(r, 0x58);
  const keyBits = be32(r, 0x54);
  let cipher: "3des" | "aes";
  if (algorithm === CSSM_ALGID_3DES_3KEY_EDE && keyBits === 192) {
    cipher = "3des";
  } else if (
    algorithm === CSSM_ALGID_AES &&
    (keyBits === 128 || keyBits === 192 || keyBits === 256)
  ) {
    cipher = "aes";
  } else {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: field("BlobEncAlgorithm"),
        value: algorithm,
        offset: at + 0x58,
        file,
      },
      `${
        field("BlobEncAlgorithm")
      } ${algorithm} with ${keyBits}-bit keys: only 3DES-EDE (17, 192 bits) and AES (0x80000001) key blobs are known`,
    );
  }
  const block = cipher === "3des" ? 8 : 16;
  const ivSize = be32(r, 0x30);
  if (ivSize < 1 || ivSize > block) {
    throw fail(
      field("BlobEncIvSize"),
      ivSize,
      `from 1 to ${block} (the ${cipher === "3des" ? "3DES" : "AES"} block)`,
      at + 0x30,
      file,
    );
  }
  const blobSize = be32(r, 0x64);
  if (
    blobSize < block || blobSize > MAX_BLOB_BYTES || blobSize % block !== 0 ||
    blobSize > r.length - KEY_RECORD_FIXED_BYTES
  ) {
    throw fail(
      field("EncryptedKeyblobSize"),
      blobSize,
      `a multiple of ${block} from ${block} to ${
        Math.min(MAX_BLOB_BYTES, r.length - KEY_RECORD_FIXED_BYTES)
      } (within the ${r.length}-byte record)`,
      at + 0x64,
      file,
    );
  }
  const iv = new Uint8Array(block);
  iv.set(r.subarray(0x34, 0x34 + ivSize));
  return {
    iterations,
    salt: r.slice(16, 16 + saltLength),
    iv,
    cipher,
    keyBits,
    blob: r.slice(KEY_RECORD_FIXED_BYTES, KEY_RECORD_FIXED_BYTES + blobSize),
  };
}

/**
 * What `info` shows of the encryption (no keys, salts or blobs).
 *
 * @param layout the parsed header
 * @returns JSON-serialisable facts
 *
 * @example
 * ```ts ignore
 * console.log(describeEncryption(layout).cipher); // AES-256-CBC
 * ```
 */
export function describeEncryption(
  layout: EncryptedLayout,
): Record<string, unknown> {
  const kdf = (iterations: number) =>
    `PBKDF2-HMAC-SHA1, ${iterations} iterations`;
  return {
    header: layout.version === 2
      ? "encrcdsa version 2 (at the start)"
      : "cdsaencr version 1 (at the end)",
    cipher: `AES-${layout.keyBits}-CBC`,
    iv: "HMAC-SHA1(key, chunk number), first 16 bytes",
    chunk_bytes: layout.blockSize,
    data_offset: layout.dataOffset,
    data_bytes: layout.dataSize,
    uuid: layout.uuid,
    key_records: layout.version === 1
      ? [{
        type: "password",
        kdf: kdf(layout.v1!.iterations),
        wrap: "3DES-EDE-CBC (RFC 3217)",
      }]
      : layout.records.map((r) =>
        r.password
          ? {
            type: "password",
            kdf: kdf(r.password.iterations),
            wrap: r.password.cipher === "3des"
              ? "3DES-EDE-CBC"
              : `AES-${r.password.keyBits}-CBC`,
          }
          : { type: `type ${r.type} (not a password: not unlocked here)` }
      ),
  };
}

/** WebCrypto, or an error saying this runtime lacks it. */
function subtle(): SubtleCrypto {
  const s = (globalThis.crypto as Crypto | undefined)?.subtle;
  if (!s) {
    throw new UnsupportedError(
      { format: FORMAT },
      "decrypting an encrypted dmg needs WebCrypto (crypto.subtle), which this runtime lacks",
    );
  }
  return s;
}

/** PBKDF2-HMAC-SHA1 through WebCrypto. */
async function pbkdf2(
  password: Uint8Array,
  salt: Uint8Array,
  iterations: number,
  bytes: number,
): Promise<Uint8Array> {
  const s = subtle();
  const key = await s.importKey(
    "raw",
    password.slice() as Uint8Array<ArrayBuffer>,
    "PBKDF2",
    false,
    ["deriveBits"],
  );
  return new Uint8Array(
    await s.deriveBits(
      {
        name: "PBKDF2",
        hash: "SHA-1",
        salt: salt.slice() as Uint8Array<ArrayBuffer>,
        iterations,
      },
      key,
      bytes * 8,
    ),
  );
}

/** AES-CBC decryption with the table AES (key blobs: a few blocks). */
function aesCbcDecrypt(
  key: Uint8Array,
  iv: Uint8Array,
  data: Uint8Array,
): Uint8Array {
  const expanded = expandKey(key);
  const out = data.slice();
  let previous = iv;
  for (let at = 0; at < out.length; at += 16) {
    const block = out.subarray(at, at + 16);
    decryptBlock(expanded, block);
    for (let i = 0; i < 16; i++) block[i] ^= previous[i];
    previous = data.subarray(at, at + 16);
  }
  return out;
}

/** The length without PKCS#7 padding of `block`-byte blocks, or -1 when the padding is not valid. */
function unpad(bytes: Uint8Array, block: number): number {
  const n = bytes[bytes.length - 1];
  if (n < 1 || n > block || n > bytes.length) return -1;
  for (let i = bytes.length - n; i < bytes.length; i++) {
    if (bytes[i] !== n) return -1;
  }
  return bytes.length - n;
}

/** RFC 3217's unwrap, as version 1 stores its keys; undefined when a check fails. */
function unwrapV1(
  kek: Uint8Array,
  wrapped: Uint8Array,
): Uint8Array | undefined {
  const first = tripleDesCbcDecrypt(kek, RFC3217_IV, wrapped);
  const firstLength = unpad(first, 8);
  if (firstLength < 16 || firstLength % 8 !== 0) return undefined;
  const reversed = first.subarray(0, firstLength).reverse();
  const second = tripleDesCbcDecrypt(
    kek,
    reversed.subarray(0, 8),
    reversed.subarray(8),
  );
  const length = unpad(second, 8);
  if (length < 4) return undefined;
  return second.slice(4, length);
}

/**
 * The data keys a password unlocks: version 2 tries each password key
 * record in turn (PBKDF2 for each); version 1 unwraps its two keys. A
 * password none unlocks is a {@linkcode KeyError}.
 *
 * @param layout the parsed header
 * @param password the password (a string is taken as UTF-8)
 * @param file the image's name, for the message
 * @returns the AES key and the HMAC-SHA1 key
 *
 * @example
 * ```ts ignore
 * const keys = await unlockKeys(layout, "secret");
 * ```
 */
export async function unlockKeys(
  layout: EncryptedLayout,
  password: string | Uint8Array,
  file?: string,
): Promise<DataKeys> {
  const bytes = typeof password === "string"
    ? new TextEncoder().encode(password)
    : password;
  const keyBytes = layout.keyBits / 8;
  const wrong = (tried: string) =>
    new KeyError(
      `${FORMAT}: wrong password for ${file ?? "the image"}: ${tried}`,
    );
  if (layout.version === 1) {
    const v1 = layout.v1!;
    const kek = await pbkdf2(bytes, v1.salt, v1.iterations, 24);
    const aesKey = unwrapV1(kek, v1.wrappedAesKey);
    const hmacKey = unwrapV1(kek, v1.wrappedHmacKey);
    if (aesKey?.length !== keyBytes || hmacKey?.length !== 20) {
      throw wrong("the wrapped keys of its cdsaencr trailer do not unwrap");
    }
    return { aesKey, hmacKey };
  }
  const records = layout.records.filter((r) => r.password);
  if (records.length === 0) {
    throw new UnsupportedError(
      { format: FORMAT, field: "key pointers", file },
      `${file ?? "the image"} has no password key record (types ${
        layout.records.map((r) => r.type).join(", ")
      }): it is unlocked by a certificate or keychain, not a password`,
    );
  }
  for (const record of records) {
    const p = record.password!;
    const kek = await pbkdf2(bytes, p.salt, p.iterations, p.keyBits / 8);
    const plain = p.cipher === "3des"
      ? tripleDesCbcDecrypt(kek, p.iv, p.blob)
      : aesCbcDecrypt(kek, p.iv, p.blob);
    const length = unpad(plain, p.iv.length);
    if (
      length >= keyBytes + 24 &&
      ascii(plain, keyBytes + 20, keyBytes + 24) === "CKIE"
    ) {
      return {
        aesKey: plain.slice(0, keyBytes),
        hmacKey: plain.slice(keyBytes, keyBytes + 20),
      };
    }
  }
  throw wrong(
    `${records.length} password key record${
      records.length === 1 ? "" : "s"
    } tried, none unwraps (bad padding or no CKIE marker)`,
  );
}

/**
 * Decrypts whole chunks. `cipher` holds chunk `first`, `first + 1`, ... in
 * all but its last 16 bytes, which are spare (overwritten); the plaintext
 * comes back as a new array of the chunks' length.
 *
 * One WebCrypto call decrypts all the chunks as a single CBC stream, which
 * is right for the first chunk (its IV is given) and wrong only in the
 * first block of each later one: CBC XORed it with the ciphertext block
 * before it instead of its own IV, so XORing in (that block XOR the IV)
 * mends it. WebCrypto removes PKCS#7 padding and refuses data without it:
 * the spare block is made to decrypt to a full block of padding
 * (E(0x10... XOR the last ciphertext block), with our table AES: one
 * block, no second WebCrypto round trip). The IVs, two SHA-1 compressions
 * each, are computed while WebCrypto decrypts on its own thread.
 */
async function decryptChunks(
  key: CryptoKey,
  aes: AesKey,
  mac: HmacSha1,
  blockSize: number,
  first: number,
  cipher: Uint8Array,
): Promise<Uint8Array> {
  const n = cipher.length - 16;
  if (n <= 0) return new Uint8Array(0);
  const pad = cipher.subarray(n);
  for (let i = 0; i < 16; i++) pad[i] = cipher[n - 16 + i] ^ 16;
  encryptBlock(aes, pad);
  const iv = new Uint8Array(16);
  mac.macNumberInto(first, iv, 0);
  const decrypted = subtle().decrypt(
    { name: "AES-CBC", iv },
    key,
    cipher as Uint8Array<ArrayBuffer>,
  );
  // Meanwhile, what mends each later chunk's first block.
  const count = n / blockSize;
  const mend = new Uint8Array(count * 16);
  for (let c = 1, at = blockSize - 16; c < count; c++, at += blockSize) {
    const m = 16 * c;
    mac.macNumberInto(first + c, mend, m);
    for (let i = 0; i < 16; i++) mend[m + i] ^= cipher[at + i];
  }
  const plain = new Uint8Array(await decrypted);
  for (let c = 1, at = blockSize; c < count; c++, at += blockSize) {
    const m = 16 * c;
    for (let i = 0; i < 16; i++) plain[at + i] ^= mend[m + i];
  }
  return plain;
}

/** Decrypts whole chunks of one image, numbered as the image numbers them. */
export interface ChunkDecryptor {
  /** Bytes per chunk. */
  readonly blockSize: number;
  /**
   * Decrypts `bytes` (whole chunks) in place; its first chunk is chunk
   * number `first`. Several chunks go through one WebCrypto call, a group
   * of at most 4 MiB at a time.
   */
  decrypt(first: number, bytes: Uint8Array): Promise<void>;
  /**
   * The plaintext of the whole chunks in `cipher`, all but its last 16
   * bytes (spare room the decryption overwrites), chunk `first` first, in
   * one WebCrypto call: no copy of the ciphertext. Returns a new array.
   */
  decryptSpare(first: number, cipher: Uint8Array): Promise<Uint8Array>;
}

/**
 * The chunk decryptor of unlocked keys: AES-CBC per chunk, the IV of chunk
 * `n` HMAC-SHA1(HMAC key, n) cut to 16 bytes. A dmg numbers its chunks
 * from its data offset; a sparse bundle over the whole disk, across bands.
 *
 * @param blockSize bytes per chunk (a multiple of 16)
 * @param keys the unlocked keys
 * @returns the decryptor
 *
 * @example
 * ```ts ignore
 * const chunks = chunkDecryptor(512, await unlockKeys(layout, "pw"));
 * await chunks.decrypt(7, bytes); // bytes: chunks 7, 8, ... in place
 * ```
 */
export function chunkDecryptor(
  blockSize: number,
  keys: DataKeys,
): ChunkDecryptor {
  const mac = hmacSha1(keys.hmacKey);
  const aes = expandKey(keys.aesKey);
  const cryptoKey = subtle().importKey(
    "raw",
    keys.aesKey.slice() as Uint8Array<ArrayBuffer>,
    { name: "AES-CBC" },
    false,
    ["decrypt"],
  );
  const groupBytes = Math.max(1, Math.floor(GROUP_BYTES / blockSize)) *
    blockSize;
  const whole = (length: number) => {
    if (length < 0 || length % blockSize !== 0) {
      throw new RangeError(
        `${length} bytes are not whole chunks of ${blockSize}`,
      );
    }
  };
  return {
    blockSize,
    async decrypt(first, bytes) {
      whole(bytes.length);
      const key = await cryptoKey;
      for (let at = 0; at < bytes.length; at += groupBytes) {
        const end = Math.min(bytes.length, at + groupBytes);
        const cipher = new Uint8Array(end - at + 16);
        cipher.set(bytes.subarray(at, end));
        bytes.set(
          await decryptChunks(
            key,
            aes,
            mac,
            blockSize,
            first + at / blockSize,
            cipher,
          ),
          at,
        );
      }
    },
    async decryptSpare(first, cipher) {
      whole(cipher.length - 16);
      return await decryptChunks(
        await cryptoKey,
        aes,
        mac,
        blockSize,
        first,
        cipher,
      );
    },
  };
}

/**
 * The plaintext of an encrypted image as a {@linkcode Source} of
 * `layout.dataSize` bytes: a read decrypts only the chunks it touches
 * (several per WebCrypto call). A read past the end is an
 * {@linkcode ImageFormatError} (the table inside points outside it).
 *
 * @param source the encrypted file
 * @param layout its parsed header
 * @param keys the unlocked keys
 * @returns the decrypting source
 *
 * @example
 * ```ts ignore
 * const plain = decryptedSource(source, layout, await unlockKeys(layout, "pw"));
 * console.log(plain.size === layout.dataSize); // true
 * ```
 */
export function decryptedSource(
  source: Source,
  layout: EncryptedLayout,
  keys: DataKeys,
): Source {
  const { blockSize, dataOffset, dataSize } = layout;
  const chunks = chunkDecryptor(blockSize, keys);
  // A group and its spare block fit a kept 4 MiB buffer.
  const groupChunks = Math.max(1, Math.floor((GROUP_BYTES - 16) / blockSize));
  const scratch = new Scratch((n) => new Uint8Array(n));

  async function readInto(offset: number, into: Uint8Array): Promise<void> {
    const length = into.length;
    if (
      !Number.isSafeInteger(offset) || offset < 0 ||
      offset + length > dataSize
    ) {
      throw new ImageFormatError({
        format: FORMAT,
        field: "read offset",
        value: offset,
        limit:
          `within the decrypted image's ${dataSize} bytes (${length} bytes wanted): ` +
          "the image inside is truncated or a table points outside it",
        file: source.name,
      });
    }
    if (length === 0) return;
    const firstChunk = Math.floor(offset / blockSize);
    const lastChunk = Math.floor((offset + length - 1) / blockSize);
    // Each group is read into a kept buffer with 16 spare bytes (no copy
    // before decrypting, no fresh pages per group: on this VM fresh pages
    // cost a fault on the host) and copied once, its part of the range,
    // into `into`.
    // Two groups in flight: one decrypting on WebCrypto's thread while the
    // next is read and its IVs computed.
    const group = async (c: number) => {
      const count = Math.min(groupChunks, lastChunk - c + 1);
      const cipher = scratch.take(count * blockSize + 16);
      let plain: Uint8Array;
      try {
        await readFrom(
          source,
          dataOffset + c * blockSize,
          cipher.subarray(0, count * blockSize),
        );
        plain = await chunks.decryptSpare(c, cipher);
      } finally {
        scratch.give(cipher);
      }
      const from = Math.max(offset, c * blockSize);
      const to = Math.min(offset + length, (c + count) * blockSize);
      into.set(
        plain.subarray(from - c * blockSize, to - c * blockSize),
        from - offset,
      );
    };
    let previous: Promise<void> | undefined;
    for (let c = firstChunk; c <= lastChunk; c += groupChunks) {
      const current = group(c);
      // Awaited below; this only keeps the failure of a group left behind
      // (when the one before it failed first) from going unhandled.
      current.catch(() => {});
      if (previous) await previous;
      previous = current;
    }
    await previous;
  }

  return {
    size: dataSize,
    name: source.name,
    async read(offset, length) {
      checkRange(Number.MAX_SAFE_INTEGER, offset, length);
      const out = new Uint8Array(length);
      await readInto(offset, out);
      return out;
    },
    readInto,
    close: () => source.close?.() ?? Promise.resolve(),
  };
}
