// Encrypted Apple disk images (drivers/dmg_encrypted.ts): images made by
// tests/_encrypted_dmg_writer.ts (from the public descriptions, with
// node:crypto's ciphers) around UDIF files made by our dmg writer decode
// to the exact disk; Debian's vfdecrypt decrypts our images in its layout
// and 7-Zip extracts the UDIF it gives; wrong passwords and broken headers
// are typed errors after bounded work.
import {
  decrypt,
  dmg,
  fromBytes,
  ImageFormatError,
  KeyError,
  memorySink,
  open,
  probe,
  UnsupportedError,
} from "../mod.ts";
import { encryptDmg, encryptDmgV1 } from "./_encrypted_dmg_writer.ts";
import { decryptedSource } from "../drivers/dmg/_encrcdsa.ts";
import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  assertBoundedWork,
  cli,
  countingSource,
  pseudoRandom,
  rejects,
  run,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

const PASSWORD = "correct horse";

/** A 1 MiB disk of text, zeros and noise (so the dmg has every kind of chunk). */
function testDisk(): Uint8Array<ArrayBuffer> {
  const disk = new Uint8Array(1 << 20);
  const text = new TextEncoder().encode(
    "the quick brown fox jumps. ".repeat(8),
  );
  for (let at = 0; at < 256 << 10; at += text.length) {
    disk.set(text.subarray(0, Math.min(text.length, (256 << 10) - at)), at);
  }
  disk.set(pseudoRandom(300 << 10, 3), 600 << 10);
  return disk;
}

/** Our UDIF of `disk`, in 32 KiB chunks (so chunks and encrypted chunks straddle). */
async function udif(disk: Uint8Array): Promise<Uint8Array<ArrayBuffer>> {
  const sink = memorySink();
  await dmg.encode!(fromBytes(disk), sink, {
    options: { chunk_sectors: "64" },
  });
  return sink.bytes() as Uint8Array<ArrayBuffer>;
}

const DISK = testDisk();
const UDIF = await udif(DISK);

async function decodeAll(bytes: Uint8Array, key?: string) {
  const image = await open(fromBytes(bytes), { key });
  const out = await image.read(0, image.size);
  return { image, out };
}

Deno.test("an AES-128 image as hdiutil writes it (AES-wrapped key, 512-byte chunks) decodes to the disk", async () => {
  const made = await encryptDmg(UDIF, {
    password: PASSWORD,
    keyBits: 128,
    iterations: 2000,
  });
  assertEquals(made.blockSize, 512);
  assertEquals(
    (await probe(fromBytes(made.bytes)))[0].format,
    "dmg-encrypted",
  );
  const { image, out } = await decodeAll(made.bytes, PASSWORD);
  assertEquals(image.format, "dmg-encrypted");
  assertEquals(image.encrypted, true);
  assertEquals(image.size, DISK.length);
  assertEquals(out, DISK);
  const details = image.details as Record<string, unknown>;
  assertEquals(details.inner, "dmg");
  const encryption = details.encryption as Record<string, unknown>;
  assertEquals(encryption.cipher, "AES-128-CBC");
  assertEquals(encryption.chunk_bytes, 512);
  assertEquals(encryption.key_records, [{
    type: "password",
    kdf: "PBKDF2-HMAC-SHA1, 2000 iterations",
    wrap: "AES-192-CBC",
  }]);
  // The inner dmg's checksums: every partition's and the data fork's are
  // checked as chunks are read.
  assertMatch(
    String((details.checksums as Record<string, unknown>).checked_as_decoded),
    /partitions and of the data fork/,
  );
});

Deno.test("an AES-256 image decodes to the disk, with a 3DES-wrapped or an AES-wrapped key", async () => {
  for (const wrap of ["3des", "aes"] as const) {
    const made = await encryptDmg(UDIF, {
      password: PASSWORD,
      keyBits: 256,
      wrap,
      iterations: 1500,
    });
    const { image, out } = await decodeAll(made.bytes, PASSWORD);
    assertEquals(out, DISK, wrap);
    const encryption = (image.details as Record<string, unknown>)
      .encryption as Record<string, unknown>;
    assertEquals(encryption.cipher, "AES-256-CBC");
  }
});

Deno.test("reads at odd offsets decrypt only what they touch and match the disk", async () => {
  const made = await encryptDmg(UDIF, {
    password: PASSWORD,
    keyBits: 256,
    iterations: 1000,
  });
  const image = await open(fromBytes(made.bytes), { key: PASSWORD });
  for (
    const [offset, length] of [[0, 1], [511, 2], [700001, 70000], [
      (1 << 20) - 5,
      5,
    ]]
  ) {
    assertEquals(
      await image.read(offset, length),
      DISK.slice(offset, offset + length),
    );
  }
});

Deno.test("the image inside may be raw: it is probed as any image is", async () => {
  const raw = pseudoRandom(40000, 9); // not a multiple of the chunk size
  const made = await encryptDmg(raw, {
    password: PASSWORD,
    iterations: 1000,
  });
  const { image, out } = await decodeAll(made.bytes, PASSWORD);
  assertEquals((image.details as Record<string, unknown>).inner, "raw");
  assertEquals(out, raw);
});

Deno.test("key records of other types are listed and skipped; the password record after them unlocks", async () => {
  const made = await encryptDmg(UDIF, {
    password: PASSWORD,
    otherRecords: 2,
    iterations: 1000,
  });
  const { image, out } = await decodeAll(made.bytes, PASSWORD);
  assertEquals(out, DISK);
  const records = ((image.details as Record<string, unknown>)
    .encryption as Record<string, unknown>).key_records as unknown[];
  assertEquals(records.length, 3);
  assertMatch(JSON.stringify(records[0]), /type 2 \(not a password/);
});

Deno.test("a version 1 image (cdsaencr trailer, RFC 3217 wrapped keys) decodes to the disk", async () => {
  const made = encryptDmgV1(UDIF, { password: PASSWORD });
  assertEquals(
    (await probe(fromBytes(made.bytes)))[0].format,
    "dmg-encrypted",
  );
  const { image, out } = await decodeAll(made.bytes, PASSWORD);
  assertEquals(out, DISK);
  const encryption = (image.details as Record<string, unknown>)
    .encryption as Record<string, unknown>;
  assertMatch(String(encryption.header), /cdsaencr version 1/);
  await rejects(
    () => open(fromBytes(made.bytes), { key: "wrong" }),
    KeyError,
    /wrong password/,
  );
});

Deno.test("a wrong password is a KeyError; no password opens the image locked", async () => {
  const made = await encryptDmg(UDIF, {
    password: PASSWORD,
    keyBits: 256,
    iterations: 1000,
  });
  await rejects(
    () => open(fromBytes(made.bytes), { key: "correct horse!" }),
    KeyError,
    /wrong password .*1 password key record tried/,
  );
  const locked = await open(fromBytes(made.bytes));
  assertEquals(locked.format, "dmg-encrypted");
  assertEquals(locked.encrypted, true);
  const details = locked.details as Record<string, unknown>;
  assertEquals(
    (details.encryption as Record<string, unknown>).cipher,
    "AES-256-CBC",
  );
  // Nothing secret in what info shows.
  const shown = JSON.stringify(details);
  for (const secret of [made.aesKey, made.hmacKey]) {
    const hex = Array.from(
      secret.subarray(0, 8),
      (b) => b.toString(16).padStart(2, "0"),
    ).join("");
    assertTrue(!shown.includes(hex));
  }
  await rejects(() => locked.read(0, 512), KeyError, /give its password/);
  await rejects(
    () => Promise.resolve(decrypt(locked, PASSWORD)),
    KeyError,
    /unlocked as it opens/,
  );
});

Deno.test("the CLI: info shows the encryption, convert --key-file writes the disk", async () => {
  await withTemp(async (dir) => {
    const made = await encryptDmg(UDIF, {
      password: PASSWORD,
      keyBits: 256,
      iterations: 1000,
    });
    await Deno.writeFile(`${dir}/secret.dmg`, made.bytes);
    await Deno.writeTextFile(`${dir}/pw`, `${PASSWORD}\n`);
    await Deno.chmod(`${dir}/pw`, 0o600);
    const locked = await cli(["info", "--output=json", `${dir}/secret.dmg`]);
    assertEquals(locked.code, 0, locked.stderr);
    const info = JSON.parse(locked.text);
    assertEquals(info.format, "dmg-encrypted");
    assertEquals(info.encrypted, true);
    assertEquals(info["format-specific"].data.encryption.cipher, "AES-256-CBC");
    const unlocked = await cli([
      "info",
      "--output=json",
      "--key-file",
      `${dir}/pw`,
      `${dir}/secret.dmg`,
    ]);
    assertEquals(unlocked.code, 0, unlocked.stderr);
    const inner = JSON.parse(unlocked.text);
    assertEquals(inner["virtual-size"], DISK.length);
    assertEquals(inner["format-specific"].data.inner, "dmg");
    const converted = await cli([
      "convert",
      "--key-file",
      `${dir}/pw`,
      "-O",
      "raw",
      `${dir}/secret.dmg`,
      `${dir}/disk.raw`,
    ]);
    assertEquals(converted.code, 0, converted.stderr);
    assertEquals(await Deno.readFile(`${dir}/disk.raw`), DISK);
    const noKey = await cli([
      "convert",
      "-O",
      "raw",
      `${dir}/secret.dmg`,
      `${dir}/nokey.raw`,
    ]);
    assertEquals(noKey.code, 1);
    assertMatch(noKey.stderr, /give its password/);
  });
});

// ---------------------------------------------------------------------------
// Against dmg2img's vfdecrypt and 7-Zip

/** The hex of bytes. */
const hex = (b: Uint8Array) =>
  Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

Deno.test(
  "vfdecrypt -p decrypts our image in its layout to our UDIF, and 7zz extracts that to the disk",
  { ignore: skip(["vfdecrypt", "7zz"]) },
  async () => {
    // vfdecrypt (dmg2img 1.6.7) takes the AES key and the HMAC key both from
    // the start of the key blob (bytes 0-15 and 0-19), where the format has
    // the HMAC key after the AES key: with an HMAC key that repeats the AES
    // key (K || K[0..4]) both readings agree, so its password path is
    // checked too (PBKDF2, 3DES unwrap, chunk IVs).
    const aesKey = pseudoRandom(16, 21);
    const hmacKey = new Uint8Array(20);
    hmacKey.set(aesKey);
    hmacKey.set(aesKey.subarray(0, 4), 16);
    const made = await encryptDmg(UDIF, {
      password: PASSWORD,
      layout: "vfdecrypt",
      aesKey,
      hmacKey,
    });
    await withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/enc.dmg`, made.bytes);
      await run("vfdecrypt", [
        "-i",
        `${dir}/enc.dmg`,
        "-o",
        `${dir}/plain.dmg`,
        "-p",
        PASSWORD,
      ]);
      const plain = await Deno.readFile(`${dir}/plain.dmg`);
      assertEquals(plain, UDIF);
      const extracted = await run("7zz", [
        "x",
        "-tdmg",
        "-so",
        `${dir}/plain.dmg`,
      ]);
      assertEquals(sha256Hex(extracted.stdout), sha256Hex(DISK));
    });
    const { out } = await decodeAll(made.bytes, PASSWORD);
    assertEquals(out, DISK);
  },
);

Deno.test(
  "vfdecrypt -k (the AES and HMAC keys) decrypts our AES-128 images with random keys, 4096- and 512-byte chunks",
  { ignore: skip(["vfdecrypt"]) },
  async () => {
    for (const blockSize of [4096, 512]) {
      const made = await encryptDmg(UDIF, {
        password: PASSWORD,
        layout: "vfdecrypt",
        blockSize,
      });
      await withTemp(async (dir) => {
        await Deno.writeFile(`${dir}/enc.dmg`, made.bytes);
        await run("vfdecrypt", [
          "-i",
          `${dir}/enc.dmg`,
          "-o",
          `${dir}/plain.dmg`,
          "-k",
          hex(made.aesKey) + hex(made.hmacKey),
        ]);
        assertEquals(await Deno.readFile(`${dir}/plain.dmg`), UDIF);
      });
      const { out } = await decodeAll(made.bytes, PASSWORD);
      assertEquals(out, DISK, `${blockSize}-byte chunks`);
    }
  },
);

// ---------------------------------------------------------------------------
// Broken input: typed errors, bounded work

/** A copy of `bytes` with a big-endian u32 (or u64) written at `at`. */
function poke(
  bytes: Uint8Array,
  at: number,
  value: number,
  width: 4 | 8 = 4,
): Uint8Array<ArrayBuffer> {
  const out = bytes.slice();
  const view = new DataView(out.buffer);
  if (width === 4) view.setUint32(at, value);
  else view.setBigUint64(at, BigInt(value));
  return out;
}

async function refused(
  bytes: Uint8Array,
  type: typeof ImageFormatError,
  pattern: RegExp,
  key: string | undefined = PASSWORD,
) {
  const counted = countingSource(bytes);
  await rejects(() => open(counted.source, { key }), type, pattern);
  assertBoundedWork(counted, bytes.length, 100, 2);
}

Deno.test("broken headers and key records are typed errors after bounded work", async () => {
  const made = await encryptDmg(UDIF, {
    password: PASSWORD,
    iterations: 1000,
  });
  const b = made.bytes;
  const r = made.recordOffset;
  // Iteration counts of 0 and 2^31 (hours of PBKDF2 per attempt).
  await refused(poke(b, r + 8, 0), ImageFormatError, /KdfIterationCount 0/);
  await refused(
    poke(b, r + 8, 2 ** 31),
    ImageFormatError,
    /KdfIterationCount 2147483648 must be from 1 to 10000000/,
  );
  // A key record cut short by the end of the file, or pointing past it.
  await refused(
    b.slice(0, r + 40),
    ImageFormatError,
    /DataSize .*truncated/,
  );
  await refused(
    poke(b, 0x4c + 12, 50, 8),
    ImageFormatError,
    /key pointer 0 length 50 must be from 104/,
  );
  await refused(
    poke(b, 0x4c + 4, b.length - 10, 8),
    ImageFormatError,
    /key pointer 0 offset \+ length/,
  );
  await refused(
    poke(b, r + 0x64, 0x1000),
    ImageFormatError,
    /EncryptedKeyblobSize 4096/,
  );
  await refused(poke(b, r + 12, 33), ImageFormatError, /KdfSaltLen 33/);
  await refused(poke(b, r, 5), UnsupportedError, /KdfAlgorithm 5/);
  // Chunk counts and offsets beyond the file.
  await refused(
    poke(b, 0x38, 2 ** 40, 8),
    ImageFormatError,
    /DataSize 1099511627776 .*chunks/,
  );
  await refused(
    poke(b, 0x40, b.length, 8),
    ImageFormatError,
    /DataSize .*end by byte/,
  );
  await refused(poke(b, 0x40, 8, 8), ImageFormatError, /DataOffset 8/);
  await refused(
    b.slice(0, b.length - 512),
    ImageFormatError,
    /DataSize .*truncated/,
  );
  await refused(poke(b, 0x48, 100000), ImageFormatError, /KeyCount 100000/);
  await refused(poke(b, 0x34, 1000), ImageFormatError, /BlockSize 1000/);
  await refused(poke(b, 0x18, 192), UnsupportedError, /EncKeyBits 192/);
  await refused(poke(b, 8, 3), UnsupportedError, /version 3/);
  // Without a key too: the header is checked as it opens.
  await refused(
    poke(b, r + 8, 0),
    ImageFormatError,
    /KdfIterationCount 0/,
    undefined,
  );
  // Three pointers to one record of 8,000,000 iterations: 24 million
  // PBKDF2 rounds for every wrong password.
  const legacy = await encryptDmg(new Uint8Array(4096), {
    password: PASSWORD,
    layout: "vfdecrypt",
  });
  const many = poke(
    poke(legacy.bytes, legacy.recordOffset + 8, 8_000_000),
    0x48,
    3,
  );
  many.copyWithin(0x4c + 20, 0x4c, 0x4c + 20);
  many.copyWithin(0x4c + 40, 0x4c, 0x4c + 20);
  await refused(
    many,
    ImageFormatError,
    /KdfIterationCount \(all password key records\) 24000000 must be at most 20000000/,
  );
  // A truncated version 1 trailer.
  const v1 = encryptDmgV1(new Uint8Array(8192), { password: PASSWORD });
  const t = v1.bytes.length - 0x4fc;
  await refused(
    poke(v1.bytes, t + 0x30, 0),
    ImageFormatError,
    /KdfIterationCount 0/,
  );
  await refused(
    poke(v1.bytes, t + 0x4e8, 2 ** 30, 8),
    ImageFormatError,
    /decrypted data length/,
  );
  await refused(
    poke(v1.bytes, t + 0x88, 1000),
    ImageFormatError,
    /wrapped AES key length 1000/,
  );
});

Deno.test("an inner image that is damaged is the inner format's typed error", async () => {
  const tables = UDIF.slice();
  const view = new DataView(tables.buffer);
  // koly.XMLLength past the decrypted image's end.
  view.setBigUint64(tables.length - 512 + 224, 1n << 40n);
  const made = await encryptDmg(tables, {
    password: PASSWORD,
    iterations: 1000,
  });
  await rejects(
    () => open(fromBytes(made.bytes), { key: PASSWORD }),
    ImageFormatError,
    /XMLLength/,
  );
});

Deno.test("a read failing in two groups at once is one rejection, none left unhandled", async () => {
  // 12 MiB: three 4 MiB groups, two in flight; each read of the file fails.
  const size = 12 << 20;
  const failing = {
    size,
    name: "failing.dmg",
    read: () =>
      Promise.reject(new ImageFormatError({ format: "test" }, "gone")),
    readInto: () =>
      Promise.reject(new ImageFormatError({ format: "test" }, "gone")),
  };
  const plain = decryptedSource(failing, {
    version: 2,
    keyBits: 128,
    blockSize: 512,
    dataOffset: 0,
    dataSize: size,
    uuid: "",
    records: [],
  }, { aesKey: new Uint8Array(16), hmacKey: new Uint8Array(20) });
  await rejects(() => plain.read(0, size), ImageFormatError, /gone/);
  // An unhandled rejection of the group left behind would fail this test.
  await new Promise((r) => setTimeout(r, 50));
});
