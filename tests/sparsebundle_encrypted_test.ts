// Encrypted sparse bundles (drivers/sparsebundle.ts with the encrcdsa layer
// of drivers/dmg/_encrcdsa.ts): bundles made by encryptSparsebundle in
// tests/_encrypted_dmg_writer.ts (from keramics' and hdimount's
// descriptions, with node:crypto's ciphers) decode to the exact disk,
// AES-128 and AES-256, with missing bands and a short last band; wrong
// passwords are KeyErrors; broken tokens and band files are typed errors
// after bounded work.
import {
  convert,
  decrypt,
  ImageFormatError,
  KeyError,
  memorySink,
  memoryTree,
  openSparsebundle,
  type Tree,
} from "../mod.ts";
import { encryptSparsebundle } from "./_encrypted_dmg_writer.ts";
import { writeFolder } from "./_apple_writers.ts";
import { assertEquals, assertMatch } from "./_asserts.ts";
import {
  assertBoundedWork,
  cli,
  pseudoRandom,
  rejects,
  runs,
  sha256Hex,
  withTemp,
} from "./_helpers.ts";

const KiB = 1024;
const PASSWORD = "bands of secrets";

/** `bands` bands of `bandSize` (the last cut to `tail` bytes), the bands in `empty` zeros. */
function diskOf(
  bandSize: number,
  bands: number,
  empty: number[],
  tail = bandSize,
): Uint8Array {
  const disk = pseudoRandom(bandSize * (bands - 1) + tail, 23);
  for (const b of empty) disk.fill(0, b * bandSize, (b + 1) * bandSize);
  return disk;
}

async function decode(tree: Tree, key = PASSWORD): Promise<Uint8Array> {
  const image = await openSparsebundle(tree, { key });
  assertEquals(image.format, "sparsebundle");
  assertEquals(image.encrypted, true);
  const sink = memorySink();
  await convert(image, sink);
  return sink.bytes();
}

/** A tree that counts its reads. */
function counting(tree: Tree) {
  let reads = 0;
  let bytes = 0;
  const counted: Tree = {
    list: (path) => tree.list(path),
    read(path, offset, length) {
      reads++;
      bytes += length;
      return tree.read(path, offset, length);
    },
  };
  return { tree: counted, reads: () => reads, bytesRead: () => bytes };
}

for (const keyBits of [128, 256] as const) {
  Deno.test(`an AES-${keyBits} bundle decodes to the exact disk: missing bands are zero runs, the last band is short`, async () => {
    const band = 64 * KiB;
    const disk = diskOf(band, 12, [1, 2, 7], 3000);
    const { files } = await encryptSparsebundle(disk, {
      password: PASSWORD,
      keyBits,
      bandSize: band,
    });
    assertEquals(files["bands/1"], undefined);
    assertEquals(files["bands/b"]?.length, 3072); // 3000 bytes: 6 chunks
    assertEquals(sha256Hex(await decode(memoryTree(files))), sha256Hex(disk));
    const image = await openSparsebundle(memoryTree(files), { key: PASSWORD });
    assertEquals(
      (await runs(image)).map((r) => [r.kind, r.offset / band]),
      [["data", 0], ["zero", 1], ["data", 3], ["zero", 7], ["data", 8]],
    );
    const encryption = image.details?.encryption as Record<string, unknown>;
    assertEquals(encryption.cipher, `AES-${keyBits}-CBC`);
    assertEquals(encryption.chunk_bytes, 512);
    assertEquals(image.details?.bandsPresent, 9);
  });
}

Deno.test("chunks are numbered over the whole disk, across bands: reads at odd offsets match", async () => {
  // 4096-byte chunks (old images), 16 KiB bands: band 3 starts at chunk 12.
  const band = 16 * KiB;
  const disk = diskOf(band, 9, [4]);
  const { files } = await encryptSparsebundle(disk, {
    password: PASSWORD,
    keyBits: 256,
    bandSize: band,
    blockSize: 4096,
    trim: true,
  });
  const image = await openSparsebundle(memoryTree(files), { key: PASSWORD });
  for (
    const [offset, length] of [
      [0, 1],
      [4095, 2],
      [band - 100, 200], // across bands 0 and 1
      [3 * band + 1000, 5000],
      [4 * band - 7, 3 * band + 14], // into, over and out of the missing band 4
      [disk.length - 9, 9],
    ]
  ) {
    assertEquals(
      await image.read(offset, length),
      disk.subarray(offset, offset + length),
      `${length} bytes at ${offset}`,
    );
  }
});

Deno.test("a token holding a cdsaencr (version 1) trailer unlocks the same way", async () => {
  const band = 16 * KiB;
  const disk = diskOf(band, 5, [3], 1536);
  const { files } = await encryptSparsebundle(disk, {
    password: PASSWORD,
    bandSize: band,
    version: 1,
  });
  assertEquals(files.token?.length, 0x4fc);
  assertEquals(sha256Hex(await decode(memoryTree(files))), sha256Hex(disk));
  await rejects(
    () => openSparsebundle(memoryTree(files), { key: "not it" }),
    KeyError,
  );
});

Deno.test("band files written in part (whole chunks) read as zeros past their end", async () => {
  const band = 32 * KiB;
  const disk = diskOf(band, 6, []);
  disk.fill(0, 2 * band + 700, 3 * band); // band 2 written at its start only
  const { files } = await encryptSparsebundle(disk, {
    password: PASSWORD,
    bandSize: band,
    trim: true,
  });
  assertEquals(files["bands/2"]?.length, 1024);
  assertEquals(sha256Hex(await decode(memoryTree(files))), sha256Hex(disk));
});

Deno.test("a wrong password is a KeyError; without one the bundle opens locked", async () => {
  const band = 16 * KiB;
  const disk = diskOf(band, 4, [2]);
  const { files } = await encryptSparsebundle(disk, {
    password: PASSWORD,
    bandSize: band,
  });
  await rejects(
    () => openSparsebundle(memoryTree(files), { key: "not it" }),
    KeyError,
    /wrong password/,
  );
  const locked = await openSparsebundle(memoryTree(files));
  assertEquals(locked.encrypted, true);
  assertEquals(locked.size, disk.length);
  assertMatch(String(locked.details?.locked), /password/);
  // The band map is not secret: it shows without the password.
  assertEquals(
    (await runs(locked)).map((r) => r.kind),
    ["data", "zero", "data"],
  );
  await rejects(() => locked.read(0, 512), KeyError, /give its password/);
  // decrypt() cannot unlock it afterwards: the key is given at open.
  await rejects(
    () => Promise.resolve().then(() => decrypt(locked, PASSWORD)),
    KeyError,
  );
});

Deno.test("the CLI: info shows the encryption, convert --key-file writes the disk", async () => {
  const band = 64 * KiB;
  const disk = diskOf(band, 6, [0, 3], 5 * KiB);
  const { files } = await encryptSparsebundle(disk, {
    password: PASSWORD,
    keyBits: 256,
    bandSize: band,
  });
  await withTemp(async (dir) => {
    await writeFolder(`${dir}/secret.sparsebundle`, files);
    await Deno.writeTextFile(`${dir}/pw`, `${PASSWORD}\n`);
    await Deno.chmod(`${dir}/pw`, 0o600);
    const info = await cli([
      "info",
      "--output=json",
      `${dir}/secret.sparsebundle`,
    ]);
    assertEquals(info.code, 0, info.stderr);
    const parsed = JSON.parse(info.text);
    assertEquals(parsed.encrypted, true);
    assertEquals(
      parsed["format-specific"].data.encryption.cipher,
      "AES-256-CBC",
    );
    const converted = await cli([
      "convert",
      "--key-file",
      `${dir}/pw`,
      "-O",
      "raw",
      `${dir}/secret.sparsebundle`,
      `${dir}/disk.raw`,
    ]);
    assertEquals(converted.code, 0, converted.stderr);
    assertEquals(
      sha256Hex(await Deno.readFile(`${dir}/disk.raw`)),
      sha256Hex(disk),
    );
    const noKey = await cli([
      "convert",
      "-O",
      "raw",
      `${dir}/secret.sparsebundle`,
      `${dir}/nokey.raw`,
    ]);
    assertEquals(noKey.code, 1);
    assertMatch(noKey.stderr, /give its password/);
    await Deno.writeTextFile(`${dir}/bad`, "nope\n");
    await Deno.chmod(`${dir}/bad`, 0o600);
    const wrong = await cli([
      "convert",
      "--key-file",
      `${dir}/bad`,
      "-O",
      "raw",
      `${dir}/secret.sparsebundle`,
      `${dir}/wrong.raw`,
    ]);
    assertEquals(wrong.code, 1);
    assertMatch(wrong.stderr, /wrong password/);
  });
});

// ---------------------------------------------------------------------------
// Broken tokens and band files

const u32 = (b: Uint8Array, at: number, v: number) =>
  new DataView(b.buffer, b.byteOffset).setUint32(at, v);

/** A copy of `files` with the token changed by `change`. */
function withToken(
  files: Record<string, Uint8Array | null>,
  change: (token: Uint8Array) => Uint8Array,
) {
  return { ...files, token: change(files.token!.slice()) };
}

Deno.test("broken tokens and band files are typed errors after bounded work", async () => {
  const band = 16 * KiB;
  const disk = diskOf(band, 4, []);
  const { files } = await encryptSparsebundle(disk, {
    password: PASSWORD,
    bandSize: band,
  });
  const record = 0x60; // the password key record, after one key pointer
  const cases: [string, Record<string, Uint8Array | null>, RegExp][] = [
    [
      "a token cut inside its key record",
      withToken(files, (t) => t.slice(0, record + 40)),
      /key pointer 0 offset \+ length/,
    ],
    [
      "a token cut inside its header",
      withToken(files, (t) => t.slice(0, 40)),
      /file size 40 must be at least 76/,
    ],
    [
      "an iteration count of 0",
      withToken(files, (t) => (u32(t, record + 8, 0), t)),
      /KdfIterationCount 0/,
    ],
    [
      "an iteration count of 2^31",
      withToken(files, (t) => (u32(t, record + 8, 2 ** 31), t)),
      /KdfIterationCount 2147483648 must be from 1 to 10000000/,
    ],
    [
      "a BlockSize band-size is not a multiple of",
      withToken(files, (t) => (u32(t, 52, 3 * 512), t)),
      /band-size 16384 must be a multiple of the token's BlockSize 1536/,
    ],
    [
      "a BlockSize of 0",
      withToken(files, (t) => (u32(t, 52, 0), t)),
      /BlockSize 0 must be a multiple of 16/,
    ],
    [
      "a band file ending inside a chunk",
      { ...files, "bands/1": files["bands/1"]!.slice(0, 1000) },
      /bands\/1 size 1000 must be whole encrypted chunks of 512 bytes/,
    ],
    [
      "a key count of 2^32-1",
      withToken(files, (t) => (u32(t, 0x48, 0xffffffff), t)),
      /KeyCount 4294967295 must be from 1 to 64/,
    ],
  ];
  for (const [what, broken, message] of cases) {
    const total = Object.values(broken).reduce(
      (n, f) => n + (f?.length ?? 0),
      0,
    );
    const counted = counting(memoryTree(broken));
    try {
      await rejects(
        () =>
          openSparsebundle(counted.tree, { key: PASSWORD }).then((i) =>
            convert(i, memorySink())
          ),
        ImageFormatError,
        message,
      );
      assertBoundedWork(counted, total, 20, 2);
    } catch (e) {
      throw new Error(`${what}: ${(e as Error).message}`);
    }
  }
});

Deno.test("a damaged band decrypts to other bytes, never a crash: the chunk's neighbours are untouched", async () => {
  // CBC has no integrity check (neither has Apple's format): a flipped
  // ciphertext bit changes its chunk only. Read as the format allows.
  const band = 16 * KiB;
  const disk = diskOf(band, 2, []);
  const { files } = await encryptSparsebundle(disk, {
    password: PASSWORD,
    bandSize: band,
  });
  const poked = files["bands/1"]!.slice();
  poked[600] ^= 1; // chunk 1 of band 1: disk chunk 33
  const out = await decode(memoryTree({ ...files, "bands/1": poked }));
  assertEquals(out.subarray(0, band + 512), disk.subarray(0, band + 512));
  assertEquals(out.subarray(band + 1024), disk.subarray(band + 1024));
});
