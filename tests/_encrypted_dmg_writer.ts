// A writer of encrypted Apple disk images, for the tests only. It is built
// from the public descriptions of the format (apfs-fuse's
// DiskImageFile.cpp, dmg2img's vfdecrypt.c, dmgwiz's src/crypto, notes on
// images current hdiutil writes), separately from the reader in
// drivers/dmg/_encrcdsa.ts, and its ciphers are node:crypto's and
// WebCrypto's, not ours: a mistake shared by reader and writer cannot hide
// behind our own 3DES or SHA-1.
import crypto from "node:crypto";
import { bundlePlist, nonZeroBands } from "./_apple_writers.ts";

/** How an encrypted image is laid out. */
export interface EncryptedDmgOptions {
  /** The password. */
  password: string;
  /** AES key bits of the data. @default 128 */
  keyBits?: 128 | 256;
  /**
   * `hdiutil`: what current hdiutil writes (the key record at 0x60 its
   * pointer gives, an AES-192 key blob, 512-byte chunks, 250000
   * iterations unless `iterations` says otherwise); `vfdecrypt`: what
   * dmg2img's vfdecrypt reads (the record at 0x2a8, a 3DES key blob, a
   * 20-byte salt, 1000 iterations, 4096-byte chunks). @default "hdiutil"
   */
  layout?: "hdiutil" | "vfdecrypt";
  /** Overrides the layout's key-blob cipher. */
  wrap?: "3des" | "aes";
  /** Overrides the layout's PBKDF2 iteration count. */
  iterations?: number;
  /** Overrides the layout's chunk size. */
  blockSize?: number;
  /** The data keys (random by default). */
  aesKey?: Uint8Array;
  hmacKey?: Uint8Array;
  /** Key pointers of another type (a certificate's) listed before the password one. */
  otherRecords?: number;
}

/** The keys and offsets the writer chose, for tests that poke at them. */
export interface EncryptedDmg {
  bytes: Uint8Array<ArrayBuffer>;
  aesKey: Uint8Array;
  hmacKey: Uint8Array;
  /** Where the password key record is. */
  recordOffset: number;
  dataOffset: number;
  blockSize: number;
}

const u32 = (b: Uint8Array, at: number, v: number) =>
  new DataView(b.buffer, b.byteOffset).setUint32(at, v);
const u64 = (b: Uint8Array, at: number, v: number) =>
  new DataView(b.buffer, b.byteOffset).setBigUint64(at, BigInt(v));

/** AES-CBC of whole blocks (no padding) with node:crypto. */
function aesCbc(key: Uint8Array, iv: Uint8Array, data: Uint8Array) {
  const c = crypto.createCipheriv(`aes-${key.length * 8}-cbc`, key, iv);
  c.setAutoPadding(false);
  return new Uint8Array(Buffer.concat([c.update(data), c.final()]));
}

/** The chunks of `plain`, each AES-CBC with IV = HMAC-SHA1(hmacKey, n)[0..16]. */
function encryptChunks(
  plain: Uint8Array,
  aesKey: Uint8Array,
  hmacKey: Uint8Array,
  blockSize: number,
): Uint8Array {
  const chunks = Math.ceil(plain.length / blockSize);
  const out = new Uint8Array(chunks * blockSize);
  out.set(plain);
  for (let n = 0; n < chunks; n++) {
    const number = new Uint8Array(4);
    u32(number, 0, n);
    const iv = crypto.createHmac("sha1", hmacKey).update(number).digest()
      .subarray(0, 16);
    const at = n * blockSize;
    out.set(aesCbc(aesKey, iv, out.subarray(at, at + blockSize)), at);
  }
  return out;
}

/** PKCS#7 padding to `block`. */
function pad(data: Uint8Array, block: number): Uint8Array {
  const n = block - (data.length % block);
  const out = new Uint8Array(data.length + n);
  out.set(data);
  out.fill(n, data.length);
  return out;
}

/** Encrypts a key blob: 3DES-EDE-CBC (node:crypto) or AES-CBC (WebCrypto, which has AES-192). */
async function wrapBlob(
  cipher: "3des" | "aes",
  kek: Uint8Array,
  iv: Uint8Array,
  blob: Uint8Array,
): Promise<Uint8Array> {
  if (cipher === "3des") {
    const c = crypto.createCipheriv("des-ede3-cbc", kek, iv);
    c.setAutoPadding(false);
    return new Uint8Array(Buffer.concat([c.update(pad(blob, 8)), c.final()]));
  }
  const key = await crypto.subtle.importKey(
    "raw",
    kek.slice(),
    { name: "AES-CBC" },
    false,
    ["encrypt"],
  );
  const iv16 = new Uint8Array(16);
  iv16.set(iv);
  // WebCrypto pads with PKCS#7 itself.
  return new Uint8Array(
    await crypto.subtle.encrypt(
      { name: "AES-CBC", iv: iv16 },
      key,
      blob.slice(),
    ),
  );
}

/**
 * Wraps `plain` (a whole image file: a UDIF dmg, or a raw disk) in an
 * `encrcdsa` version 2 encrypted image.
 */
export async function encryptDmg(
  plain: Uint8Array,
  options: EncryptedDmgOptions,
): Promise<EncryptedDmg> {
  const vfdecrypt = options.layout === "vfdecrypt";
  const keyBits = options.keyBits ?? 128;
  const wrap = options.wrap ?? (vfdecrypt ? "3des" : "aes");
  const iterations = options.iterations ?? (vfdecrypt ? 1000 : 250000);
  const blockSize = options.blockSize ?? (vfdecrypt ? 4096 : 512);
  const aesKey = options.aesKey ??
    crypto.getRandomValues(new Uint8Array(keyBits / 8));
  const hmacKey = options.hmacKey ?? crypto.getRandomValues(new Uint8Array(20));
  const others = options.otherRecords ?? 0;
  const keyCount = others + 1;
  const tableEnd = 0x4c + 20 * keyCount;
  // vfdecrypt reads the record at 0x2a8 whatever the pointer says; hdiutil
  // puts it right after the pointer table (0x60 for one key).
  const recordOffset = vfdecrypt ? 0x2a8 : tableEnd + others * 64;
  const blobCapacity = vfdecrypt ? 0x30 : 0x200;
  const recordLength = 0x68 + blobCapacity;
  const dataOffset = Math.ceil((recordOffset + recordLength) / 4096) * 4096;
  const data = encryptChunks(plain, aesKey, hmacKey, blockSize);
  const bytes = new Uint8Array(dataOffset + data.length);

  // The header.
  bytes.set(new TextEncoder().encode("encrcdsa"), 0);
  u32(bytes, 8, 2); // version
  u32(bytes, 12, 16); // EncIvSize
  u32(bytes, 16, 5); // EncMode
  u32(bytes, 20, 0x80000001); // EncAlgorithm: AES
  u32(bytes, 24, keyBits);
  u32(bytes, 28, 91); // PrngAlgorithm
  u32(bytes, 32, 160); // PrngKeySize
  bytes.set(crypto.getRandomValues(new Uint8Array(16)), 36); // UUID
  u32(bytes, 52, blockSize);
  u64(bytes, 56, plain.length); // DataSize
  u64(bytes, 64, dataOffset);
  u32(bytes, 72, keyCount);
  for (let i = 0; i < others; i++) {
    // A certificate's record: listed, never unwrapped with a password.
    const p = 0x4c + 20 * i;
    u32(bytes, p, 2);
    u64(bytes, p + 4, tableEnd + i * 64);
    u64(bytes, p + 12, 64);
  }
  const p = 0x4c + 20 * others;
  u32(bytes, p, 1); // a password record
  u64(bytes, p + 4, recordOffset);
  u64(bytes, p + 12, recordLength);

  // The password key record.
  const salt = crypto.getRandomValues(new Uint8Array(20));
  const iv = crypto.getRandomValues(new Uint8Array(8));
  const kekBytes = 24;
  const kek = new Uint8Array(
    crypto.pbkdf2Sync(options.password, salt, iterations, kekBytes, "sha1"),
  );
  const keyblob = new Uint8Array(keyBits / 8 + 20 + 5);
  keyblob.set(aesKey, 0);
  keyblob.set(hmacKey, keyBits / 8);
  keyblob.set(new TextEncoder().encode("CKIE"), keyBits / 8 + 20);
  const sealed = await wrapBlob(wrap, kek, iv, keyblob);
  const r = recordOffset;
  u32(bytes, r, 103); // PBKDF2
  u32(bytes, r + 4, 0);
  u32(bytes, r + 8, iterations);
  u32(bytes, r + 12, salt.length);
  bytes.set(salt, r + 16);
  u32(bytes, r + 0x30, 8); // BlobEncIvSize
  bytes.set(iv, r + 0x34);
  u32(bytes, r + 0x54, 192);
  u32(bytes, r + 0x58, wrap === "3des" ? 17 : 0x80000001);
  u32(bytes, r + 0x5c, 7); // PKCS#7
  u32(bytes, r + 0x60, 6); // CBC
  u32(bytes, r + 0x64, sealed.length);
  bytes.set(sealed, r + 0x68);

  bytes.set(data, dataOffset);
  return { bytes, aesKey, hmacKey, recordOffset, dataOffset, blockSize };
}

/** Options for {@linkcode encryptSparsebundle}. */
export interface EncryptedBundleOptions {
  password: string;
  /** @default 128 */
  keyBits?: 128 | 256;
  /** band-size in bytes. @default 8 MiB */
  bandSize?: number;
  /** Chunk size (the token's BlockSize). @default 512 */
  blockSize?: number;
  /** PBKDF2 iterations. @default 1000 */
  iterations?: number;
  /** Band files to store. @default the bands holding a non-zero byte */
  bands?: number[];
  /** Cut each band file after its last chunk holding a non-zero byte. @default false */
  trim?: boolean;
  /**
   * 2: the token is an `encrcdsa` header; 1: a `cdsaencr` trailer (AES-128,
   * as keramics also reads a token). @default 2
   */
  version?: 1 | 2;
}

/**
 * The files of an encrypted sparse bundle of `disk`, as keramics'
 * `sparsebundle` reader and hdimount describe one: the `token` is an
 * `encrcdsa` header with its key records (nothing else), and the bands
 * hold the disk encrypted in chunks numbered over the whole disk, band `n`
 * holding chunks from `n × band-size / BlockSize`, stored from byte 0 of
 * its file. Made by encrypting the whole disk as one image and cutting
 * its data into band files.
 */
export async function encryptSparsebundle(
  disk: Uint8Array,
  options: EncryptedBundleOptions,
): Promise<
  { files: Record<string, Uint8Array | null>; aesKey: Uint8Array }
> {
  const bandSize = options.bandSize ?? 8 << 20;
  const settings = {
    password: options.password,
    blockSize: options.blockSize ?? 512,
    iterations: options.iterations ?? 1000,
  };
  const made = options.version === 1
    ? encryptDmgV1(disk, settings)
    : await encryptDmg(disk, { ...settings, keyBits: options.keyBits ?? 128 });
  const { dataOffset, blockSize } = made;
  const plist = new TextEncoder().encode(bundlePlist(bandSize, disk.length));
  const files: Record<string, Uint8Array | null> = {
    "Info.plist": plist,
    "Info.bckup": plist,
    "token": options.version === 1
      ? made.bytes.slice(made.bytes.length - 0x4fc)
      : made.bytes.slice(0, dataOffset),
    "bands/": null,
  };
  for (const band of options.bands ?? nonZeroBands(disk, bandSize)) {
    const from = band * bandSize;
    let to = Math.min(disk.length, from + bandSize);
    if (options.trim) {
      while (to > from && disk[to - 1] === 0) to--;
    }
    const length = Math.ceil((to - from) / blockSize) * blockSize;
    files[`bands/${band.toString(16)}`] = made.bytes.slice(
      dataOffset + from,
      dataOffset + from + length,
    );
    delete files["bands/"];
  }
  return { files, aesKey: made.aesKey };
}

/** RFC 3217's key wrap with 3DES, as version 1 images store their keys. */
function rfc3217Wrap(kek: Uint8Array, key: Uint8Array): Uint8Array {
  const cekIcv = new Uint8Array(4 + key.length);
  u32(cekIcv, 0, key.length * 8);
  cekIcv.set(key, 4);
  const iv = crypto.getRandomValues(new Uint8Array(8));
  const first = crypto.createCipheriv("des-ede3-cbc", kek, iv);
  first.setAutoPadding(false);
  const temp1 = Buffer.concat([first.update(pad(cekIcv, 8)), first.final()]);
  const temp2 = new Uint8Array(8 + temp1.length);
  temp2.set(iv);
  temp2.set(temp1, 8);
  temp2.reverse();
  const second = crypto.createCipheriv(
    "des-ede3-cbc",
    kek,
    Uint8Array.from([0x4a, 0xdd, 0xa2, 0x2c, 0x79, 0xe8, 0x21, 0x05]),
  );
  second.setAutoPadding(false);
  return new Uint8Array(
    Buffer.concat([second.update(pad(temp2, 8)), second.final()]),
  );
}

/**
 * Wraps `plain` in a version 1 encrypted image: AES-128 chunks from byte
 * 0, then the 0x4fc-byte `cdsaencr` trailer.
 */
export function encryptDmgV1(
  plain: Uint8Array,
  options: { password: string; iterations?: number; blockSize?: number },
): EncryptedDmg {
  const blockSize = options.blockSize ?? 4096;
  const iterations = options.iterations ?? 1000;
  const aesKey = crypto.getRandomValues(new Uint8Array(16));
  const hmacKey = crypto.getRandomValues(new Uint8Array(20));
  const data = encryptChunks(plain, aesKey, hmacKey, blockSize);
  const bytes = new Uint8Array(data.length + 0x4fc);
  bytes.set(data);
  const t = bytes.subarray(data.length);
  t.set(crypto.getRandomValues(new Uint8Array(16)), 0);
  u32(t, 0x10, blockSize);
  u32(t, 0x28, 103);
  u32(t, 0x30, iterations);
  const salt = crypto.getRandomValues(new Uint8Array(20));
  u32(t, 0x34, salt.length);
  t.set(salt, 0x38);
  const kek = new Uint8Array(
    crypto.pbkdf2Sync(options.password, salt, iterations, 24, "sha1"),
  );
  const wrappedAes = rfc3217Wrap(kek, aesKey);
  u32(t, 0x88, wrappedAes.length);
  t.set(wrappedAes, 0x8c);
  const wrappedHmac = rfc3217Wrap(kek, hmacKey);
  u32(t, 0x1b4, wrappedHmac.length);
  t.set(wrappedHmac, 0x1b8);
  u64(t, 0x4e8, plain.length);
  t.set(new TextEncoder().encode("cdsaencr"), 0x4f4);
  return {
    bytes,
    aesKey,
    hmacKey,
    recordOffset: data.length,
    dataOffset: 0,
    blockSize,
  };
}

// `deno run -A tests/_encrypted_dmg_writer.ts IN OUT PASSWORD [KEYBITS]
// [LAYOUT]`: wraps the file IN (a dmg) into the encrypted image OUT (the
// bench's input), and writes the data keys as vfdecrypt's -k hex to
// OUT.keys.
if (import.meta.main) {
  const [input, output, password, bits = "256", layout = "hdiutil"] = Deno.args;
  const made = await encryptDmg(await Deno.readFile(input), {
    password,
    keyBits: Number(bits) as 128 | 256,
    layout: layout as "hdiutil" | "vfdecrypt",
    iterations: 1000,
  });
  await Deno.writeFile(output, made.bytes);
  const hex = (b: Uint8Array) =>
    Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  await Deno.writeTextFile(
    `${output}.keys`,
    hex(made.aesKey) + hex(made.hmacKey),
  );
}
