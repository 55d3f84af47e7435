import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  convert,
  create,
  createOutputFile,
  decrypt,
  fromBytes,
  fromFile,
  type Image,
  ImageFormatError,
  imageInfo,
  KeyError,
  memorySink,
  open,
  type OpenOptions,
  overlay,
  probe,
  qcow,
  UnsupportedError,
} from "../mod.ts";
import {
  cbcSectors,
  decryptBlock,
  encryptBlock,
  expandKey,
  sectorCipher,
} from "../streams/_aes.ts";
import {
  assertBoundedWork,
  assertQemuIdentical,
  cli,
  countingSource,
  pseudoRandom,
  qemuIo,
  rejects,
  run,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

const PASS = "hunter2";
const SECRET = `secret,id=sec0,data=${PASS}`;
/** qemu's --image-opts for an AES qcow with the passphrase above. */
const aesOpts = (path: string) =>
  `driver=qcow,file.filename=${path},encrypt.key-secret=sec0`;

/** An AES qcow of `size` made by qemu-img, then written by qemu-io with each `-c` command. */
async function qemuAesImage(path: string, size: string, writes: string[]) {
  await run("qemu-img", [
    "create",
    "-f",
    "qcow",
    "--object",
    SECRET,
    "-o",
    "encrypt.format=aes,encrypt.key-secret=sec0",
    path,
    size,
  ]);
  await run("qemu-io", [
    "--object",
    SECRET,
    "--image-opts",
    aesOpts(path),
    ...writes.flatMap((w) => ["-c", w]),
  ]);
}

const hex = (s: string) =>
  new Uint8Array(s.match(/../g)!.map((h) => parseInt(h, 16)));
const toHex = (b: Uint8Array) =>
  Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

/** A disk with random, text-like and zero runs (1 MiB granules). */
function sampleDisk(mib: number): Uint8Array<ArrayBuffer> {
  const disk = new Uint8Array(mib << 20);
  const text = new TextEncoder().encode("a qcow cluster of text; ");
  for (let m = 0; m < mib; m++) {
    const at = m << 20;
    if (m % 3 === 0) disk.set(pseudoRandom(1 << 20, m + 1), at);
    if (m % 3 === 1) {
      for (let i = 0; i < 1 << 20; i++) disk[at + i] = text[i % text.length];
    }
  }
  return disk;
}

/** Opens an image file following its backing file in its folder. */
async function openChain(path: string, options: OpenOptions = {}) {
  const dir = path.slice(0, path.lastIndexOf("/"));
  return await open(await fromFile(path), {
    ...options,
    resolveBacking: (name) =>
      fromFile(name.startsWith("/") ? name : `${dir}/${name}`),
  });
}

/**
 * `qemu-img convert -c -O qcow`: qemu-img 7.2 writes a correct image, then
 * exits 1 without a message (its closing zero-length compressed write,
 * which the qcow driver refuses); the image is checked with compare.
 */
async function qemuCompressed(input: string, output: string) {
  const r = await run("qemu-img", [
    "convert",
    "-c",
    "-f",
    "raw",
    "-O",
    "qcow",
    input,
    output,
  ], { allowFail: true });
  assertTrue(r.code === 0 || (r.code === 1 && r.stderr === ""), r.stderr);
  await assertQemuIdentical(input, output, "qcow");
}

/** What qemu-img decodes an image to (`args` before the input). */
async function qemuRaw(dir: string, args: string[]): Promise<Uint8Array> {
  await run("qemu-img", ["convert", ...args, "-O", "raw", `${dir}/ref.raw`]);
  return await Deno.readFile(`${dir}/ref.raw`);
}

async function sameBytes(image: Image, expected: Uint8Array) {
  const bytes = await image.read(0, image.size);
  assertEquals(bytes.length, expected.length);
  assertEquals(sha256Hex(bytes), sha256Hex(expected));
}

// ---------------------------------------------------------------------------
// AES

Deno.test("AES-128 matches the FIPS-197 appendix B and C.1 vectors both ways", () => {
  const cases = [
    [
      "2b7e151628aed2a6abf7158809cf4f3c",
      "3243f6a8885a308d313198a2e0370734",
      "3925841d02dc09fbdc118597196a0b32",
    ],
    [
      "000102030405060708090a0b0c0d0e0f",
      "00112233445566778899aabbccddeeff",
      "69c4e0d86a7b0430d8cdb78070b4c55a",
    ],
  ];
  for (const [key, plain, cipher] of cases) {
    const k = expandKey(hex(key));
    const block = hex(plain);
    encryptBlock(k, block);
    assertEquals(toHex(block), cipher);
    decryptBlock(k, block);
    assertEquals(toHex(block), plain);
  }
});

Deno.test("AES-128 key expansion ends with FIPS-197 appendix A.1's last word", () => {
  const k = expandKey(hex("2b7e151628aed2a6abf7158809cf4f3c"));
  assertEquals(k.encrypt[43].toString(16), "b6630ca6");
});

Deno.test("WebCrypto's one-call CBC decryption of a run of sectors equals the table AES", async () => {
  const key = new TextEncoder().encode("0123456789abcdef");
  const plain = pseudoRandom(64 * 512, 9);
  const encrypted = plain.slice();
  cbcSectors(expandKey(key), 2 ** 33 + 5, encrypted, true);
  const web = encrypted.slice();
  await sectorCipher(key).decrypt(2 ** 33 + 5, web);
  const table = encrypted.slice();
  await sectorCipher(key, { webCrypto: false }).decrypt(2 ** 33 + 5, table);
  assertEquals(web, plain);
  assertEquals(table, plain);
});

// ---------------------------------------------------------------------------
// Images made by qemu-img and qemu-io

Deno.test({
  name:
    "a plain qcow made by qemu-img and written by qemu-io decodes as qemu-img decodes it",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/disk.raw`, sampleDisk(6));
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow",
        `${dir}/disk.raw`,
        `${dir}/d.qcow`,
      ]);
      await qemuIo("qcow", `${dir}/d.qcow`, "write -P 0x5a 64k 128k");
      await qemuIo("qcow", `${dir}/d.qcow`, "write -P 0x11 5000k 3k");
      const image = await open(await fromFile(`${dir}/d.qcow`));
      assertEquals(image.format, "qcow");
      await sameBytes(
        image,
        await qemuRaw(dir, ["-f", "qcow", `${dir}/d.qcow`]),
      );
      await image.close?.();
    }),
});

Deno.test({
  name:
    "a compressed qcow made by qemu-img convert -c and written by qemu-io decodes as qemu-img decodes it",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/disk.raw`, sampleDisk(6));
      await qemuCompressed(`${dir}/disk.raw`, `${dir}/c.qcow`);
      assertTrue((await Deno.stat(`${dir}/c.qcow`)).size < 4 << 20);
      // A partial write into a compressed cluster makes qemu inflate and copy it.
      await qemuIo("qcow", `${dir}/c.qcow`, "write -P 0x5a 1030k 2k");
      await qemuIo("qcow", `${dir}/c.qcow`, "write -P 0x5a 64k 128k");
      const image = await open(await fromFile(`${dir}/c.qcow`));
      await sameBytes(
        image,
        await qemuRaw(dir, ["-f", "qcow", `${dir}/c.qcow`]),
      );
      await image.close?.();
    }),
});

Deno.test({
  name:
    "a qcow over a backing file, made by qemu-img and written by qemu-io, decodes as qemu-img decodes the chain",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/base.raw`, sampleDisk(3));
      await run("qemu-img", [
        "create",
        "-f",
        "qcow",
        "-b",
        "base.raw",
        "-F",
        "raw",
        `${dir}/top.qcow`,
      ]);
      await qemuIo("qcow", `${dir}/top.qcow`, "write -P 0x5a 64k 128k");
      await qemuIo("qcow", `${dir}/top.qcow`, "write -P 0x77 1000000 3000");
      const top = await open(await fromFile(`${dir}/top.qcow`));
      assertEquals(top.backingFile, "base.raw");
      assertEquals(top.backingFormat, undefined); // qcow stores none
      await rejects(() => top.read(0, 4096), Error, /backing file "base\.raw"/);
      const chain = await openChain(`${dir}/top.qcow`);
      await sameBytes(chain, await qemuRaw(dir, [`${dir}/top.qcow`]));
      await top.close?.();
      await chain.close?.();
    }),
});

Deno.test({
  name:
    "an AES qcow made by qemu-img with a passphrase and written by qemu-io decodes with our key as qemu-img decodes it",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      const path = `${dir}/e.qcow`;
      await qemuAesImage(path, "4M", [
        "write -P 0x5a 64k 128k",
        "write -P 0x33 1000k 5k",
      ]);
      const expected = await qemuRaw(dir, [
        "--object",
        SECRET,
        "--image-opts",
        aesOpts(path),
      ]);
      const image = await open(await fromFile(path), { key: PASS });
      assertTrue(image.encrypted);
      await sameBytes(image, expected);
      assertEquals((await image.read(65536 + 17, 3))[2], 0x5a);
      await image.close?.();
    }),
});

Deno.test({
  name:
    "an AES qcow without a key says so on reading data, while its info and map still work",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      const path = `${dir}/e.qcow`;
      await qemuAesImage(path, "1M", ["write -P 0x5a 0 8k"]);
      const image = await open(await fromFile(path));
      assertEquals(imageInfo(image).encrypted, true);
      assertTrue(image.encryption !== undefined);
      const kinds = [];
      for await (const e of image.extents(0, image.size)) kinds.push(e.kind);
      assertEquals(kinds, ["data", "unallocated"]);
      await rejects(
        () => image.read(0, 512),
        KeyError,
        /e\.qcow is encrypted: give its passphrase/,
      );
      // Unallocated runs hold nothing encrypted.
      assertEquals((await image.read(8192, 512)).every((b) => b === 0), true);
      const info = await cli(["info", "--output=json", path]);
      assertEquals(info.code, 0);
      assertEquals(JSON.parse(info.text).encrypted, true);
      const failed = await cli(["convert", path, `${dir}/x.raw`]);
      assertEquals(failed.code, 1);
      assertTrue(/is encrypted: give its passphrase/.test(failed.stderr));
      await image.close?.();
    }),
});

Deno.test({
  name:
    "a wrong passphrase reads an AES qcow as garbage without an error, as in QEMU (qcow has no key check)",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      const path = `${dir}/e.qcow`;
      await qemuAesImage(path, "1M", ["write -P 0x5a 0 4k"]);
      const image = await open(await fromFile(path), { key: "not it" });
      const bytes = await image.read(0, 4096);
      assertTrue(bytes.some((b) => b !== 0x5a));
      await image.close?.();
    }),
});

Deno.test({
  name:
    "writes through our driver into a qemu-img qcow read back in qemu-img as written",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const disk = sampleDisk(3);
      await Deno.writeFile(`${dir}/disk.raw`, disk);
      await qemuCompressed(`${dir}/disk.raw`, `${dir}/d.qcow`);
      const file = await fromFile(`${dir}/d.qcow`, { write: true });
      const image = await open(file, { writable: true, sink: file });
      const patch = pseudoRandom(70000, 3);
      await image.write!(1_500_001, patch); // into compressed clusters, unaligned
      await image.write!(2_999_000, patch.subarray(0, 9000)); // into holes
      await image.flush!();
      await file.close();
      disk.set(patch, 1_500_001);
      disk.set(patch.subarray(0, 9000), 2_999_000);
      await Deno.writeFile(`${dir}/want.raw`, disk);
      await assertQemuIdentical(`${dir}/want.raw`, `${dir}/d.qcow`, "qcow");
    }),
});

// ---------------------------------------------------------------------------
// Images we make, checked by qemu-img

for (
  const [label, args] of [
    ["plain", []],
    ["compressed (-c)", ["-c"]],
  ] as const
) {
  Deno.test({
    name:
      `our convert -O qcow ${label} passes qemu-img compare against its source`,
    ignore: skip(["qemu-img"]),
    fn: () =>
      withTemp(async (dir) => {
        const disk = sampleDisk(5);
        await Deno.writeFile(`${dir}/disk.raw`, disk);
        const r = await cli([
          "convert",
          "-O",
          "qcow",
          ...args,
          `${dir}/disk.raw`,
          `${dir}/o.qcow`,
        ]);
        assertEquals(r.code, 0, r.stderr);
        const size = (await Deno.stat(`${dir}/o.qcow`)).size;
        if (args.length) assertTrue(size < 3 << 20, `compressed to ${size}`);
        // qemu-img check has no checker for qcow (exit 63, "does not
        // support checks"); compare reads every cluster instead.
        const check = await run("qemu-img", ["check", `${dir}/o.qcow`], {
          allowFail: true,
        });
        assertEquals(check.code, 63, check.stderr);
        const info = await run("qemu-img", [
          "info",
          "--output=json",
          `${dir}/o.qcow`,
        ]);
        assertEquals(JSON.parse(info.text)["virtual-size"], disk.length);
        await assertQemuIdentical(`${dir}/disk.raw`, `${dir}/o.qcow`, "qcow");
        await sameBytes(await open(await fromFile(`${dir}/o.qcow`)), disk);
      }),
  });
}

Deno.test({
  name:
    "our encrypted qcow (convert -o encryption=on --key-file) passes qemu-img compare with the passphrase",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const disk = sampleDisk(3);
      await Deno.writeFile(`${dir}/disk.raw`, disk);
      await Deno.writeTextFile(`${dir}/key`, `${PASS}\n`);
      const r = await cli([
        "convert",
        "-O",
        "qcow",
        "-o",
        "encryption=on",
        "--key-file",
        `${dir}/key`,
        `${dir}/disk.raw`,
        `${dir}/e.qcow`,
      ]);
      assertEquals(r.code, 0, r.stderr);
      const cmp = await run("qemu-img", [
        "compare",
        "--object",
        SECRET,
        "--image-opts",
        `driver=raw,file.filename=${dir}/disk.raw`,
        aesOpts(`${dir}/e.qcow`),
      ]);
      assertTrue(/identical/.test(cmp.text));
      const back = await cli([
        "convert",
        "--key-file",
        `${dir}/key`,
        `${dir}/e.qcow`,
        `${dir}/back.raw`,
      ]);
      assertEquals(back.code, 0, back.stderr);
      assertEquals(
        sha256Hex(await Deno.readFile(`${dir}/back.raw`)),
        sha256Hex(disk),
      );
    }),
});

Deno.test({
  name:
    "our created qcow over a backing file, and one with AES, read in qemu-img as we wrote them",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const base = sampleDisk(2);
      await Deno.writeFile(`${dir}/base.raw`, base);
      const made = await cli([
        "create",
        "-f",
        "qcow",
        "-b",
        "base.raw",
        "-F",
        "raw",
        `${dir}/top.qcow`,
        "2M",
      ]);
      assertEquals(made.code, 0, made.stderr);
      const file = await fromFile(`${dir}/top.qcow`, { write: true });
      const top = await open(file, { writable: true, sink: file });
      const patch = new Uint8Array(3 * 512).fill(0x42);
      await top.write!(4096 + 512, patch); // whole 512-byte clusters
      await rejects(
        () => top.write!(10, new Uint8Array(5)),
        UnsupportedError,
        /whole clusters/,
      );
      await top.flush!();
      await file.close();
      const want = base.slice();
      want.set(patch, 4096 + 512);
      await Deno.writeFile(`${dir}/want.raw`, want);
      await assertQemuIdentical(`${dir}/want.raw`, `${dir}/top.qcow`, "qcow");
      await sameBytes(await openChain(`${dir}/top.qcow`), want);

      await Deno.writeTextFile(`${dir}/key`, PASS);
      const enc = await cli([
        "create",
        "-f",
        "qcow",
        "-o",
        "encryption=on",
        "--key-file",
        `${dir}/key`,
        `${dir}/e.qcow`,
        "1M",
      ]);
      assertEquals(enc.code, 0, enc.stderr);
      const efile = await fromFile(`${dir}/e.qcow`, { write: true });
      const locked = await open(efile, { writable: true, sink: efile });
      await rejects(() => locked.write!(0, new Uint8Array(512)), KeyError);
      const e = decrypt(locked, PASS);
      await e.write!(1000, new Uint8Array(3000).fill(0x61)); // unaligned, partial clusters
      await e.flush!();
      await efile.close();
      const expected = await qemuRaw(dir, [
        "--object",
        SECRET,
        "--image-opts",
        aesOpts(`${dir}/e.qcow`),
      ]);
      const plain = new Uint8Array(1 << 20);
      plain.fill(0x61, 1000, 4000);
      assertEquals(sha256Hex(expected), sha256Hex(plain));
    }),
});

Deno.test("an overlay whose base is encrypted reports encrypted, and open with a key unlocks every layer", async () => {
  const baseSink = memorySink();
  const base = await create("qcow", baseSink, { size: 65536, key: PASS });
  await base.write!(0, new Uint8Array(65536).fill(9));
  await base.flush!();
  const topSink = memorySink();
  const top = await create("qcow", topSink, {
    size: 65536,
    backingFile: "base.qcow",
  });
  await top.write!(512, new Uint8Array(512).fill(1));
  await top.flush!();
  const opened = (key?: string) =>
    open(topSink.source(), {
      key,
      resolveBacking: () => Promise.resolve(baseSink.source()),
    });
  const locked = await opened();
  assertEquals(locked.encrypted, true);
  assertEquals(imageInfo(locked).encrypted, true);
  await rejects(() => locked.read(0, 1024), KeyError);
  await rejects(
    () => Promise.resolve(decrypt(locked, PASS)),
    KeyError,
    /open the chain with \{ key \}/,
  );
  const chain = await opened(PASS);
  const bytes = await chain.read(0, 1024);
  assertEquals([bytes[0], bytes[511], bytes[512], bytes[1023]], [9, 9, 1, 1]);
  // overlay() on its own reports the base's encryption too.
  assertEquals(
    overlay(await open(topSink.source()), await open(baseSink.source()))
      .encrypted,
    true,
  );
});

Deno.test("qcow readInto gives the bytes read gives, plain, compressed and encrypted, over old bytes", async () => {
  const disk = sampleDisk(3);
  disk.fill(0, (2 << 20) + 4096, (2 << 20) + 65536); // unallocated clusters
  const ranges = [[0, 3 << 20], [100, 9000], [(2 << 20) - 700, 70_000]];
  for (
    const options of [{}, { compress: true }, { key: PASS }] as {
      compress?: boolean;
      key?: string;
    }[]
  ) {
    const sink = memorySink();
    await convert(fromBytes(disk), sink, { format: "qcow", ...options });
    const image = await open(sink.source(), { key: options.key });
    for (const [at, n] of ranges) {
      const into = new Uint8Array(n).fill(0xee);
      await image.readInto!(at, into);
      assertEquals(into, disk.subarray(at, at + n));
    }
  }
});

Deno.test("qcow is probed by its magic and version", async () => {
  const sink = memorySink();
  await create("qcow", sink, { size: 1 << 20 });
  assertEquals((await probe(sink.source()))[0].format, "qcow");
  const v2 = sink.bytes().slice();
  v2[7] = 2;
  assertTrue((await probe(fromBytes(v2)))[0].format !== "qcow");
});

Deno.test("encode refuses compression with encryption, and sequential sinks", async () => {
  const source = fromBytes(new Uint8Array(65536).fill(1));
  await rejects(
    () => qcow.encode!(source, memorySink(), { compress: true, key: "k" }),
    UnsupportedError,
    /compression or encryption/,
  );
  const chunks: Uint8Array[] = [];
  const stream = new WritableStream<Uint8Array>({
    write: (c) => void chunks.push(c),
  });
  const { streamSink } = await import("../mod.ts");
  await rejects(
    () => qcow.encode!(source, streamSink(stream), {}),
    UnsupportedError,
    /sequential/,
  );
});

// ---------------------------------------------------------------------------
// Malformed images: typed errors, quickly

/** A small valid qcow (4 KiB clusters) with two clusters written, plain and compressed. */
async function smallQcow(compress = false): Promise<Uint8Array> {
  const sink = memorySink();
  const disk = new Uint8Array(1 << 20);
  disk.fill(0x41, 0, 8192);
  disk.set(pseudoRandom(4096, 4), 65536);
  await qcow.encode!(fromBytes(disk), sink, { compress });
  return sink.bytes().slice();
}

function poke(
  bytes: Uint8Array,
  at: number,
  value: number | bigint,
  width: 1 | 4 | 8,
) {
  const v = new DataView(bytes.buffer, bytes.byteOffset);
  if (width === 1) bytes[at] = Number(value);
  else if (width === 4) v.setUint32(at, Number(value));
  else v.setBigUint64(at, BigInt(value));
  return bytes;
}

async function readWhole(bytes: Uint8Array) {
  const image = await open(fromBytes(bytes), { format: "qcow" });
  await image.read(0, image.size);
}

const headerCases: [string, (b: Uint8Array) => Uint8Array, RegExp][] = [
  [
    "a truncated header",
    (b) => b.slice(0, 40),
    /file size 40 must be at least 48/,
  ],
  ["a wrong magic", (b) => poke(b, 0, 0x51464900, 4), /magic/],
  ["version 2 (qcow2)", (b) => poke(b, 4, 2, 4), /version 2 is qcow2/],
  ["version 7", (b) => poke(b, 4, 7, 4), /version 7 must be 1/],
  [
    "cluster_bits 8",
    (b) => poke(b, 32, 8, 1),
    /cluster_bits 8 must be from 9 to 16/,
  ],
  [
    "cluster_bits 17",
    (b) => poke(b, 32, 17, 1),
    /cluster_bits 17 must be from 9 to 16/,
  ],
  ["l2_bits 5", (b) => poke(b, 33, 5, 1), /l2_bits 5 must be from 6 to 13/],
  ["l2_bits 14", (b) => poke(b, 33, 14, 1), /l2_bits 14 must be from 6 to 13/],
  ["crypt_method 2", (b) => poke(b, 36, 2, 4), /crypt_method 2/],
  ["size 1", (b) => poke(b, 24, 1, 8), /size 1 must be at least 2 bytes/],
  [
    "size 2^63 (past 2^53)",
    (b) => poke(b, 24, 1n << 63n, 8),
    /size 9223372036854775808 must be at most 2\^53-1/,
  ],
  [
    "size 2^40 (an L1 table past the file)",
    (b) => poke(b, 24, 1n << 40n, 8),
    /l1_table_offset 48 must be past the header and within the file/,
  ],
  [
    "size 2^53-1 with 512-byte clusters (L1 over QEMU's limit)",
    (b) => poke(poke(poke(b, 24, 2n ** 53n - 1n, 8), 32, 9, 1), 33, 6, 1),
    /L1 table of at most 268435455 entries/,
  ],
  [
    "l1_table_offset outside the file",
    (b) => poke(b, 40, 1n << 40n, 8),
    /l1_table_offset 1099511627776/,
  ],
  [
    "backing_file_size 1024",
    (b) => poke(poke(b, 8, 48, 8), 16, 1024, 4),
    /backing_file_size 1024 must be at most 1023/,
  ],
  [
    "backing_file_offset outside the file",
    (b) => poke(poke(b, 8, 1n << 33n, 8), 16, 5, 4),
    /backing_file_offset 8589934592/,
  ],
  [
    "an L1 entry outside the file",
    (b) => poke(b, 48, 1n << 36n, 8),
    /l1\[0\] 68719476736 must be an L2 table offset/,
  ],
];
for (const [what, mutate, message] of headerCases) {
  Deno.test(`a qcow with ${what} is an ImageFormatError`, async () => {
    const bytes = mutate(await smallQcow());
    const counted = countingSource(bytes);
    await rejects(
      async () => {
        const image = await open(counted.source, { format: "qcow" });
        await image.read(0, image.size);
      },
      ImageFormatError,
      message,
    );
    assertBoundedWork(counted, bytes.length, 4096);
  });
}

/** The file offset of L2 entry `index` of the first L2 table. */
function l2EntryAt(bytes: Uint8Array, index: number): number {
  const v = new DataView(bytes.buffer, bytes.byteOffset);
  return Number(v.getBigUint64(48)) + index * 8;
}

Deno.test("a qcow whose L2 entry points outside the file is an ImageFormatError", async () => {
  const bytes = await smallQcow();
  poke(bytes, l2EntryAt(bytes, 0), 1n << 40n, 8);
  await rejects(
    () => readWhole(bytes),
    ImageFormatError,
    /l2\[0\] 1099511627776 must be a cluster offset, a multiple of 512/,
  );
});

Deno.test("a qcow whose L2 entry is not sector aligned is an ImageFormatError", async () => {
  const bytes = await smallQcow();
  const at = l2EntryAt(bytes, 0);
  const v = new DataView(bytes.buffer);
  poke(bytes, at, v.getBigUint64(at) + 3n, 8);
  await rejects(
    () => readWhole(bytes),
    ImageFormatError,
    /must be a cluster offset, a multiple of 512/,
  );
});

Deno.test("a compressed cluster inflating past the cluster size is an ImageFormatError", async () => {
  const bytes = await smallQcow(true);
  const at = l2EntryAt(bytes, 0);
  const v = new DataView(bytes.buffer);
  const entry = v.getBigUint64(at);
  const offset = Number(entry & ((1n << 51n) - 1n));
  // Replace the stream with one that inflates to 8 KiB (in the same room).
  const { encode } = await import("../drivers/codecs/zlib.ts");
  const bomb = await encode(new Uint8Array(8192), "deflate-raw");
  const size = Number((entry >> 51n) & 4095n);
  assertTrue(bomb.length <= size + 64);
  bytes.set(bomb, offset);
  poke(
    bytes,
    at,
    (1n << 63n) | (BigInt(bomb.length) << 51n) | BigInt(offset),
    8,
  );
  await rejects(
    () => readWhole(bytes),
    ImageFormatError,
    /compressed cluster 4096 must be raw deflate of \d+ bytes inflating to exactly 4096 bytes/,
  );
  const image = await open(fromBytes(bytes), { format: "qcow" });
  await rejects(
    () => image.readInto!(0, new Uint8Array(8192)),
    ImageFormatError,
    /compressed cluster 4096 must be raw deflate of \d+ bytes inflating to exactly 4096 bytes/,
  );
});

Deno.test("a compressed cluster of size 0 or cut off by the end of the file is an ImageFormatError", async () => {
  const bytes = await smallQcow(true);
  const at = l2EntryAt(bytes, 0);
  const offset = Number(
    new DataView(bytes.buffer).getBigUint64(at) & ((1n << 51n) - 1n),
  );
  poke(bytes, at, (1n << 63n) | BigInt(offset), 8);
  await rejects(
    () => readWhole(bytes),
    ImageFormatError,
    /compressed cluster \(0 bytes/,
  );
  poke(bytes, at, (1n << 63n) | (4000n << 51n) | BigInt(bytes.length - 10), 8);
  await rejects(() => readWhole(bytes), ImageFormatError, /within the file/);
});

Deno.test("a truncated qcow fails with an ImageFormatError naming the read past the end", async () => {
  const bytes = await smallQcow();
  await rejects(
    () => readWhole(bytes.slice(0, bytes.length - 5000)),
    ImageFormatError,
  );
});

Deno.test("qcow create refuses an encrypted image without a passphrase and a too long backing name", async () => {
  await rejects(
    () =>
      create("qcow", memorySink(), {
        size: 4096,
        options: { encryption: "on" },
      }),
    KeyError,
    /needs a passphrase/,
  );
  await rejects(
    () =>
      create("qcow", memorySink(), {
        size: 4096,
        backingFile: "x".repeat(1024),
      }),
    ImageFormatError,
    /at most 1023 bytes/,
  );
});

Deno.test("a qcow created and encoded in memory round-trips through convert", async () => {
  const disk = sampleDisk(2);
  for (const compress of [false, true]) {
    const sink = memorySink();
    await convert(fromBytes(disk), sink, { format: "qcow", compress });
    await sameBytes(await open(sink.source()), disk);
  }
  const sink = memorySink();
  await convert(fromBytes(disk), sink, { format: "qcow", key: PASS });
  await sameBytes(await open(sink.source(), { key: PASS }), disk);
  const out = await withTemp(async (dir) => {
    const file = await createOutputFile(`${dir}/x.qcow`);
    await convert(fromBytes(disk), file, { format: "qcow", compress: true });
    await file.commit();
    return (await Deno.stat(`${dir}/x.qcow`)).size;
  });
  assertTrue(out < disk.length);
});

Deno.test({
  name:
    "info reports the bytes a qcow layer allocates, as qemu-img map counts them",
  ignore: skip(["qemu-img", "qemu-io"]),
  async fn() {
    await withTemp(async (dir) => {
      const path = `${dir}/a.qcow`;
      await run("qemu-img", ["create", "-q", "-f", "qcow", path, "16M"]);
      await run("qemu-io", [
        "-c",
        "write -P 1 0 1M",
        "-c",
        "write -P 2 5M 12k",
        path,
      ]);
      const ours = JSON.parse(
        (await cli(["info", "--output=json", path])).text,
      );
      const map = JSON.parse(
        (await run("qemu-img", ["map", "--output=json", path])).text,
      ) as { length: number; data: boolean; depth: number }[];
      const theirs = map.filter((r) => r.data && r.depth === 0)
        .reduce((s, r) => s + r.length, 0);
      assertEquals(ours["allocated-bytes"], theirs);
      assertEquals(theirs, (1 << 20) + 12 * 1024);
      const human = (await cli(["info", path])).text;
      assertMatch(
        human,
        /allocated: .*\(1060864 bytes of the virtual disk held in this layer; /,
      );
    });
  },
});
