/**
 * LUKS (version 1) inside qcow2: the header qemu-img writes in the
 * clusters its full-disk-encryption extension points at, the key slots
 * unlocked with a passphrase, and the sector cipher of the master key.
 *
 * This module is browser compatible.
 *
 * The partition header (cryptsetup's "LUKS On-Disk Format Specification",
 * version 1.2.3; every number big-endian), 592 bytes:
 *
 * | offset | size | field                                             |
 * | -----: | ---: | ------------------------------------------------- |
 * |      0 |    6 | magic `LUKS\xba\xbe`                              |
 * |      6 |    2 | version (1)                                       |
 * |      8 |   32 | cipher_name (`aes`)                               |
 * |     40 |   32 | cipher_mode (`xts-plain64`, `cbc-plain64`, ...)   |
 * |     72 |   32 | hash_spec (`sha256`, `sha1`, `sha512`, ...)       |
 * |    104 |    4 | payload_offset (sectors; unused inside qcow2)     |
 * |    108 |    4 | key_bytes: length of the master key               |
 * |    112 |   20 | mk_digest: PBKDF2 of the master key               |
 * |    132 |   32 | mk_digest_salt                                    |
 * |    164 |    4 | mk_digest_iter                                    |
 * |    168 |   40 | uuid                                              |
 * |    208 |  384 | 8 key slots of 48 bytes                           |
 *
 * A key slot: active (0x00ac71f3, or 0x0000dead), iterations, salt (32),
 * key_material_offset (sectors from the header's start), stripes. The
 * slot's key material, key_bytes x stripes bytes, is encrypted with the
 * PBKDF2 of the passphrase (the cipher and mode of the header, sectors
 * numbered from 0) and merged by the anti-forensic splitter (AF-merge with
 * hash_spec) into the master key, which is right when its PBKDF2 matches
 * mk_digest. Inside qcow2 the payload's sectors are numbered by their
 * offset in the qcow2 file (the "physical" sector).
 *
 * @module
 */

import { formatErrors } from "../_binary.ts";
import { KeyError, UnsupportedError } from "../../streams/errors.ts";
import { cbcSectors, expandKey, xtsSectors } from "../../streams/_aes.ts";
import type { SectorCipher, Source } from "../../streams/types.ts";

const FORMAT = "qcow2";
const SECTOR = 512;
/** The partition header's size. */
export const LUKS_HEADER_SIZE = 592;
const MAGIC = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe];
const SLOT_ACTIVE = 0x00ac71f3;
const SLOT_INACTIVE = 0x0000dead;
const SLOTS = 8;
/** The stripes of every LUKS1 key slot (QEMU and cryptsetup use 4000). */
export const STRIPES = 4000;
/**
 * PBKDF2 iterations past this are refused: an untrusted header must not
 * make an open spend minutes (qemu-img's default 2 s of PBKDF2 gives a
 * few million on a fast machine).
 */
export const MAX_ITERATIONS = 1 << 26;
const DIGEST_SIZE = 20;

const fail = formatErrors(FORMAT);

/** The WebCrypto names of the LUKS hash_spec values. */
const HASHES: Record<string, { name: string; bytes: number }> = {
  sha1: { name: "SHA-1", bytes: 20 },
  sha256: { name: "SHA-256", bytes: 32 },
  sha384: { name: "SHA-384", bytes: 48 },
  sha512: { name: "SHA-512", bytes: 64 },
};

/** A key slot. */
interface KeySlot {
  index: number;
  iterations: number;
  salt: Uint8Array;
  keyMaterialOffset: number;
  stripes: number;
}

/** The parsed partition header. */
export interface LuksHeader {
  cipherName: string;
  cipherMode: string;
  hashSpec: string;
  keyBytes: number;
  mkDigest: Uint8Array;
  mkDigestSalt: Uint8Array;
  mkDigestIter: number;
  uuid: string;
  slots: KeySlot[];
}

const text = (b: Uint8Array, at: number, length: number) => {
  let stop = at;
  while (stop < at + length && b[stop] !== 0) stop++;
  return new TextDecoder().decode(b.subarray(at, stop));
};

/**
 * Parses and validates a LUKS1 partition header found at file offset
 * `at` (for the errors), with `length` bytes of header area.
 */
export function parseLuksHeader(
  b: Uint8Array,
  at: number,
  length: number,
): LuksHeader {
  if (b.length < LUKS_HEADER_SIZE) {
    throw fail(
      "LUKS header length",
      b.length,
      `at least ${LUKS_HEADER_SIZE} bytes`,
      at,
    );
  }
  if (MAGIC.some((m, i) => b[i] !== m)) {
    throw fail("LUKS magic", b.subarray(0, 6), "LUKS\\xba\\xbe", at);
  }
  const v = new DataView(b.buffer, b.byteOffset, b.length);
  const version = v.getUint16(6);
  if (version !== 1) {
    throw new UnsupportedError(
      { format: FORMAT, field: "LUKS version", value: version, offset: at + 6 },
      `LUKS version ${version} is not read (qemu-img writes version 1)`,
    );
  }
  const keyBytes = v.getUint32(108);
  if (keyBytes < 16 || keyBytes > 64 || keyBytes % 8 !== 0) {
    throw fail(
      "LUKS key_bytes",
      keyBytes,
      "from 16 to 64, a multiple of 8",
      at + 108,
    );
  }
  const mkDigestIter = v.getUint32(164);
  if (mkDigestIter < 1 || mkDigestIter > MAX_ITERATIONS) {
    throw fail(
      "LUKS mk_digest_iter",
      mkDigestIter,
      `from 1 to ${MAX_ITERATIONS}`,
      at + 164,
    );
  }
  const slots: KeySlot[] = [];
  for (let i = 0; i < SLOTS; i++) {
    const o = 208 + 48 * i;
    const active = v.getUint32(o);
    if (active === SLOT_INACTIVE) continue;
    if (active !== SLOT_ACTIVE) {
      throw fail(
        `LUKS key slot ${i} active`,
        `0x${active.toString(16)}`,
        "0x00ac71f3 (active) or 0x0000dead (inactive)",
        at + o,
      );
    }
    const iterations = v.getUint32(o + 4);
    const keyMaterialOffset = v.getUint32(o + 40);
    const stripes = v.getUint32(o + 44);
    if (iterations < 1 || iterations > MAX_ITERATIONS) {
      throw fail(
        `LUKS key slot ${i} iterations`,
        iterations,
        `from 1 to ${MAX_ITERATIONS}`,
        at + o + 4,
      );
    }
    if (stripes !== STRIPES) {
      throw fail(
        `LUKS key slot ${i} stripes`,
        stripes,
        `${STRIPES}`,
        at + o + 44,
      );
    }
    const end = keyMaterialOffset * SECTOR + keyBytes * stripes;
    if (keyMaterialOffset * SECTOR < LUKS_HEADER_SIZE || end > length) {
      throw fail(
        `LUKS key slot ${i} key_material_offset`,
        keyMaterialOffset,
        `past the header with its ${
          keyBytes * stripes
        } bytes within the ${length}-byte encryption header`,
        at + o + 40,
      );
    }
    slots.push({
      index: i,
      iterations,
      salt: b.slice(o + 8, o + 40),
      keyMaterialOffset,
      stripes,
    });
  }
  return {
    cipherName: text(b, 8, 32),
    cipherMode: text(b, 40, 32),
    hashSpec: text(b, 72, 32),
    keyBytes,
    mkDigest: b.slice(112, 132),
    mkDigestSalt: b.slice(132, 164),
    mkDigestIter,
    uuid: text(b, 168, 40),
    slots,
  };
}

/** The WebCrypto hash of `hashSpec`, or an UnsupportedError naming it. */
function hashOf(hashSpec: string) {
  const hash = HASHES[hashSpec];
  if (!hash) {
    throw new UnsupportedError(
      { format: FORMAT, field: "LUKS hash_spec", value: hashSpec },
      `LUKS hash ${hashSpec} is not supported (${
        Object.keys(HASHES).join(", ")
      } are)`,
    );
  }
  return hash;
}

/**
 * The sector cipher of `cipherName`/`cipherMode` with `key`: AES in XTS
 * or CBC, with the plain64 (or plain) IV.
 *
 * @param cipherName the LUKS cipher_name
 * @param cipherMode the LUKS cipher_mode
 * @param key the key (both halves for XTS)
 * @returns the cipher
 * @throws {UnsupportedError} for other ciphers and modes
 */
export function luksSectorCipher(
  cipherName: string,
  cipherMode: string,
  key: Uint8Array,
): SectorCipher {
  const unsupported = () =>
    new UnsupportedError(
      {
        format: FORMAT,
        field: "LUKS cipher",
        value: `${cipherName}-${cipherMode}`,
      },
      `LUKS cipher ${cipherName}-${cipherMode} with a ${
        key.length * 8
      }-bit key is not supported (aes in xts-plain64, xts-plain, cbc-plain64 or cbc-plain are)`,
    );
  if (cipherName !== "aes") throw unsupported();
  const [mode, iv] = cipherMode.split("-");
  if (iv !== "plain64" && iv !== "plain") throw unsupported();
  // "plain" is the sector number truncated to 32 bits.
  const ivOf = (sector: number) => iv === "plain" ? sector % 2 ** 32 : sector;
  if (mode === "xts" && [32, 48, 64].includes(key.length)) {
    const half = key.length / 2;
    const dataKey = expandKey(key.subarray(0, half));
    const tweakKey = expandKey(key.subarray(half));
    if (iv === "plain") {
      return {
        decrypt: (sector, bytes) =>
          Promise.resolve(
            perSector(sector, bytes, (n, b) =>
              xtsSectors(dataKey, tweakKey, ivOf(n), b, false)),
          ),
        encrypt: (sector, bytes) =>
          Promise.resolve(
            perSector(sector, bytes, (n, b) =>
              xtsSectors(dataKey, tweakKey, ivOf(n), b, true)),
          ),
      };
    }
    return {
      decrypt(sector, bytes) {
        xtsSectors(dataKey, tweakKey, sector, bytes, false);
        return Promise.resolve();
      },
      encrypt(sector, bytes) {
        xtsSectors(dataKey, tweakKey, sector, bytes, true);
        return Promise.resolve();
      },
    };
  }
  if (mode === "cbc" && [16, 24, 32].includes(key.length)) {
    const expanded = expandKey(key);
    return {
      decrypt: (sector, bytes) =>
        Promise.resolve(
          perSector(sector, bytes, (n, b) =>
            cbcSectors(expanded, ivOf(n), b, false)),
        ),
      encrypt: (sector, bytes) =>
        Promise.resolve(
          perSector(sector, bytes, (n, b) =>
            cbcSectors(expanded, ivOf(n), b, true)),
        ),
    };
  }
  throw unsupported();
}

/** Runs `fn` on each 512-byte sector of `bytes` (numbered from `sector`). */
function perSector(
  sector: number,
  bytes: Uint8Array,
  fn: (n: number, b: Uint8Array) => void,
) {
  for (let at = 0; at < bytes.length; at += SECTOR) {
    fn(sector + at / SECTOR, bytes.subarray(at, at + SECTOR));
  }
}

/** PBKDF2 of `password` with WebCrypto. */
async function pbkdf2(
  hash: string,
  password: Uint8Array,
  salt: Uint8Array,
  iterations: number,
  bytes: number,
): Promise<Uint8Array> {
  const key = await crypto.subtle.importKey(
    "raw",
    password.slice() as Uint8Array<ArrayBuffer>,
    "PBKDF2",
    false,
    ["deriveBits"],
  );
  return new Uint8Array(
    await crypto.subtle.deriveBits(
      {
        name: "PBKDF2",
        hash,
        salt: salt.slice() as Uint8Array<ArrayBuffer>,
        iterations,
      },
      key,
      bytes * 8,
    ),
  );
}

/** A synchronous hash: `digest(input)` of one hash_spec. */
type SyncHash = (input: Uint8Array) => Uint8Array;

/**
 * The synchronous hash of `hashSpec` from hash-wasm (already the
 * toolkit's SHA-256 for `--hash`): AF-merge hashes 8,000 small pieces in
 * a chain, and WebCrypto's digest, one promise each, took 1.5 s for it.
 */
async function syncHash(hashSpec: string): Promise<SyncHash> {
  hashOf(hashSpec);
  const wasm = await import("npm:hash-wasm@4.13.0");
  const make = {
    sha1: wasm.createSHA1,
    sha256: wasm.createSHA256,
    sha384: wasm.createSHA384,
    sha512: wasm.createSHA512,
  }[hashSpec]!;
  const h = await make();
  return (input) => {
    h.init();
    h.update(input);
    return h.digest("binary");
  };
}

/** The AF diffusion of `block` (in place): each digest-sized piece hashed with its index. */
function diffuse(hash: SyncHash, bytes: number, block: Uint8Array) {
  const input = new Uint8Array(4 + bytes);
  const v = new DataView(input.buffer);
  for (let i = 0, at = 0; at < block.length; i++, at += bytes) {
    const piece = block.subarray(at, Math.min(block.length, at + bytes));
    v.setUint32(0, i);
    input.set(piece, 4);
    piece.set(
      hash(input.subarray(0, 4 + piece.length)).subarray(0, piece.length),
    );
  }
}

/** AF-merge: the key `split` (stripes x keyBytes) was spread into. */
async function afMerge(
  hashSpec: string,
  split: Uint8Array,
  keyBytes: number,
  stripes: number,
): Promise<Uint8Array> {
  const hash = await syncHash(hashSpec);
  const bytes = hashOf(hashSpec).bytes;
  const d = new Uint8Array(keyBytes);
  for (let i = 0; i < stripes - 1; i++) {
    for (let j = 0; j < keyBytes; j++) d[j] ^= split[i * keyBytes + j];
    diffuse(hash, bytes, d);
  }
  for (let j = 0; j < keyBytes; j++) {
    d[j] ^= split[(stripes - 1) * keyBytes + j];
  }
  return d;
}

/**
 * AF-split: spreads `key` over `stripes` blocks (random but the last),
 * the inverse of the merge.
 */
export async function afSplit(
  hashSpec: string,
  key: Uint8Array,
  stripes: number,
): Promise<Uint8Array> {
  const hash = await syncHash(hashSpec);
  const bytes = hashOf(hashSpec).bytes;
  const split = new Uint8Array(key.length * stripes);
  for (let at = 0; at < (stripes - 1) * key.length; at += 65536) {
    crypto.getRandomValues(
      split.subarray(at, Math.min((stripes - 1) * key.length, at + 65536)),
    );
  }
  const d = new Uint8Array(key.length);
  for (let i = 0; i < stripes - 1; i++) {
    for (let j = 0; j < key.length; j++) d[j] ^= split[i * key.length + j];
    diffuse(hash, bytes, d);
  }
  for (let j = 0; j < key.length; j++) {
    split[(stripes - 1) * key.length + j] = d[j] ^ key[j];
  }
  return split;
}

/** The PBKDF2 digest that checks a master key. */
export async function masterKeyDigest(
  hashSpec: string,
  masterKey: Uint8Array,
  salt: Uint8Array,
  iterations: number,
): Promise<Uint8Array> {
  return await pbkdf2(
    hashOf(hashSpec).name,
    masterKey,
    salt,
    iterations,
    DIGEST_SIZE,
  );
}

/** PBKDF2 of a passphrase for a key slot. */
export async function slotKey(
  hashSpec: string,
  passphrase: Uint8Array,
  salt: Uint8Array,
  iterations: number,
  keyBytes: number,
): Promise<Uint8Array> {
  return await pbkdf2(
    hashOf(hashSpec).name,
    passphrase,
    salt,
    iterations,
    keyBytes,
  );
}

/**
 * The master key of `header`, from the first key slot `passphrase`
 * opens.
 *
 * @param source the qcow2 file
 * @param where the LUKS header's offset (key material offsets count from it)
 * @param header the parsed header
 * @param passphrase the passphrase
 * @returns the master key
 * @throws {KeyError} when no active slot opens with the passphrase
 */
export async function unlockMasterKey(
  source: Source,
  where: number,
  header: LuksHeader,
  passphrase: string | Uint8Array,
): Promise<Uint8Array> {
  hashOf(header.hashSpec);
  const password = typeof passphrase === "string"
    ? new TextEncoder().encode(passphrase)
    : passphrase;
  // Fails early (before any PBKDF2) on a cipher this module lacks.
  luksSectorCipher(
    header.cipherName,
    header.cipherMode,
    new Uint8Array(header.keyBytes),
  );
  for (const slot of header.slots) {
    const derived = await slotKey(
      header.hashSpec,
      password,
      slot.salt,
      slot.iterations,
      header.keyBytes,
    );
    const length = header.keyBytes * slot.stripes;
    const material = await source.read(
      where + slot.keyMaterialOffset * SECTOR,
      Math.ceil(length / SECTOR) * SECTOR,
    );
    await luksSectorCipher(header.cipherName, header.cipherMode, derived)
      .decrypt(0, material);
    const candidate = await afMerge(
      header.hashSpec,
      material,
      header.keyBytes,
      slot.stripes,
    );
    const digest = await masterKeyDigest(
      header.hashSpec,
      candidate,
      header.mkDigestSalt,
      header.mkDigestIter,
    );
    if (digest.every((b, i) => b === header.mkDigest[i])) return candidate;
  }
  throw new KeyError(
    header.slots.length === 0
      ? "qcow2: the LUKS header has no active key slot"
      : `qcow2: the passphrase opens none of the LUKS header's ${header.slots.length} active key slot(s): wrong passphrase`,
  );
}

/**
 * The sector cipher of a qcow2's LUKS header, unlocked with `key`.
 *
 * @param source the qcow2 file
 * @param where the LUKS header's offset and length in it
 * @param key the passphrase
 * @returns the cipher of the payload
 * @throws {KeyError} for a wrong passphrase
 * @throws {ImageFormatError} for a malformed header
 */
export async function luksCipher(
  source: Source,
  where: { offset: number; length: number },
  key: string | Uint8Array,
): Promise<SectorCipher> {
  const header = await readLuksHeader(source, where);
  const master = await unlockMasterKey(source, where.offset, header, key);
  return luksSectorCipher(header.cipherName, header.cipherMode, master);
}

/** Reads and parses the LUKS header at `where`. */
export async function readLuksHeader(
  source: Source,
  where: { offset: number; length: number },
): Promise<LuksHeader> {
  if (where.length < LUKS_HEADER_SIZE) {
    throw fail(
      "crypto header length",
      where.length,
      `at least ${LUKS_HEADER_SIZE} bytes (a LUKS header)`,
    );
  }
  const b = await source.read(where.offset, LUKS_HEADER_SIZE);
  return parseLuksHeader(b, where.offset, where.length);
}
