import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  cloop,
  convert,
  fromBytes,
  fromFile,
  ImageFormatError,
  memorySink,
  open,
  OptionError,
  probe,
  streamSink,
} from "../mod.ts";
import * as zlib from "../drivers/codecs/zlib.ts";
import {
  assertBoundedWork,
  countingSource,
  pseudoRandom,
  referenceBytes,
  referenceImages,
  rejects,
  run,
  sha256Hex,
  skip,
  unsharedRead,
  withTemp,
} from "./_helpers.ts";

/** A disk with random, zero and text-like blocks, `size` bytes. */
function sampleDisk(size: number, seed = 3): Uint8Array {
  const disk = new Uint8Array(size);
  const random = pseudoRandom(size, seed);
  const text = new TextEncoder().encode("cloop block of text ".repeat(4096));
  for (let at = 0; at < size; at += 4096) {
    const n = Math.min(4096, size - at);
    const kind = (at / 4096) % 3;
    if (kind === 0) disk.set(random.subarray(at, at + n), at);
    if (kind === 1) disk.set(text.subarray(at % 8192, (at % 8192) + n), at);
  }
  return disk;
}

/** `bytes` zero-padded to a multiple of `blockSize` (cloop's virtual size). */
function padded(bytes: Uint8Array, blockSize: number): Uint8Array {
  const out = new Uint8Array(Math.ceil(bytes.length / blockSize) * blockSize);
  out.set(bytes);
  return out;
}

async function decodeAll(image: Uint8Array): Promise<Uint8Array> {
  const opened = await open(fromBytes(image));
  assertEquals(opened.format, "cloop");
  return await opened.read(0, opened.size);
}

async function createCompressedFs(
  dir: string,
  disk: Uint8Array,
  args: string[],
): Promise<Uint8Array> {
  await Deno.writeFile(`${dir}/in.bin`, disk);
  await run("create_compressed_fs", [
    "-q",
    ...args,
    `${dir}/in.bin`,
    `${dir}/out.cloop`,
  ]);
  return await Deno.readFile(`${dir}/out.cloop`);
}

async function qemuRaw(dir: string, image: Uint8Array): Promise<Uint8Array> {
  await Deno.writeFile(`${dir}/q.cloop`, image);
  await run("qemu-img", [
    "convert",
    "-f",
    "cloop",
    "-O",
    "raw",
    `${dir}/q.cloop`,
    `${dir}/q.raw`,
  ]);
  return await Deno.readFile(`${dir}/q.raw`);
}

async function ours(
  disk: Uint8Array,
  options: Record<string, string> = {},
): Promise<Uint8Array> {
  const sink = memorySink();
  await convert(fromBytes(disk), sink, { format: "cloop", options });
  return sink.bytes();
}

// ---------------------------------------------------------------- fixtures

/** The pointer flags of version 4 (cloop.h's CLOOP_COMPRESSOR_*). */
const KIND = { zlib: 0, none: 1, xz: 2, lz4: 3, lzo: 4 } as const;
type Kind = keyof typeof KIND;

/** A codec module: every cloop 4 codec has one. */
async function codecModule(name: Kind): Promise<
  { encode(b: Uint8Array): Promise<Uint8Array> }
> {
  if (name === "zlib") return zlib;
  if (name === "none") return { encode: (b) => Promise.resolve(b) };
  return await import(`../drivers/codecs/${name}.ts`);
}

/**
 * A version 4 image built from cloop.h's description: each block of `disk`
 * compressed with the codec `kinds[i]`, header first or last.
 */
function buildV4(
  blockSize: number,
  packed: { kind: Kind; bytes: Uint8Array }[],
  placement: "first" | "last",
): Uint8Array {
  const n = packed.length;
  const header = new Uint8Array(136);
  header.set(
    new TextEncoder().encode("#!/bin/sh\n#V4.0 Format\nexit $?\n"),
  );
  const dv = new DataView(header.buffer);
  dv.setUint32(128, blockSize);
  dv.setUint32(132, n);
  const table = new Uint8Array((n + 1) * 8);
  const tv = new DataView(table.buffer);
  const dataLength = packed.reduce((s, p) => s + p.bytes.length, 0);
  const out = new Uint8Array(136 + table.length + dataLength);
  let at = placement === "first" ? 136 + table.length : 0;
  packed.forEach((p, i) => {
    tv.setBigUint64(i * 8, BigInt(at) | (BigInt(KIND[p.kind]) << 60n));
    out.set(p.bytes, at);
    at += p.bytes.length;
  });
  tv.setBigUint64(n * 8, BigInt(at));
  if (placement === "first") {
    out.set(header, 0);
    out.set(table, 136);
  } else {
    out.set(table, at);
    out.set(header, at + table.length);
  }
  return out;
}

// ---------------------------------------------------------------- reading

Deno.test({
  name: "cloop reads QEMU's simple-pattern.cloop to the manifest's sha256",
  ignore: skip(["bzip2"], true),
  async fn() {
    const entry = referenceImages().find((i) => i.format === "cloop")!;
    const bytes = (await referenceBytes(entry.path))!;
    const [best] = await probe(fromBytes(bytes));
    assertEquals(best.format, "cloop");
    const image = await open(fromBytes(bytes));
    assertEquals(image.size, entry.virtual_size);
    assertEquals(image.details?.version, 2);
    assertEquals(sha256Hex(await image.read(0, image.size)), entry.raw_sha256);
  },
});

for (
  const args of [
    ["-B", "65536"],
    ["-B", "512"],
    ["-B", "16384"],
    [
      "-B",
      "262144",
    ],
    ["-L", "-1", "-B", "32768"],
    ["-L", "0", "-B", "8192"],
  ]
) {
  Deno.test({
    name: `cloop reads create_compressed_fs ${
      args.join(" ")
    } images byte-identical to the source and to qemu-img`,
    ignore: skip(["create_compressed_fs", "qemu-img"]),
    async fn() {
      await withTemp(async (dir) => {
        const blockSize = Number(args[args.indexOf("-B") + 1]);
        const disk = sampleDisk(300_000 + 1234);
        const image = await createCompressedFs(dir, disk, args);
        const opened = await open(fromBytes(image));
        assertEquals(opened.details?.block_size, blockSize);
        assertEquals(opened.details?.version, 2);
        const decoded = await opened.read(0, opened.size);
        assertEquals(sha256Hex(decoded), sha256Hex(padded(disk, blockSize)));
        assertEquals(
          sha256Hex(decoded),
          sha256Hex(await qemuRaw(dir, image)),
        );
      });
    },
  });
}

Deno.test("cloop reads a committed create_compressed_fs -L -1 -B 4096 image to qemu-img's sha256", async () => {
  // Made with `create_compressed_fs -L -1 -B 4096` (cloop-utils 3.14) from
  // 30,000 bytes of words and 15,056 zeros; qemu-img convert gives this sha256.
  const bytes = await Deno.readFile(
    new URL("../testdata/cloop-7zip-b4096.cloop", import.meta.url),
  );
  const image = await open(fromBytes(bytes));
  assertEquals(image.details?.block_size, 4096);
  assertEquals(image.details?.n_blocks, 11);
  assertEquals(
    sha256Hex(await image.read(0, image.size)),
    "d4fa16b1bf3c1a126e8a7eb524d5fc8d5a95836d5ccd60ea8d4c465e8377dd96",
  );
});

Deno.test({
  name: "cloop reads at random offsets across block boundaries",
  ignore: skip(["create_compressed_fs"]),
  async fn() {
    await withTemp(async (dir) => {
      const disk = sampleDisk(200_000);
      const image = await open(
        fromBytes(await createCompressedFs(dir, disk, ["-B", "4096"])),
      );
      const want = padded(disk, 4096);
      let seed = 7;
      for (let k = 0; k < 300; k++) {
        seed = (seed * 1103515245 + 12345) >>> 0;
        const offset = seed % want.length;
        const length = Math.min(want.length - offset, (seed >>> 8) % 20_000);
        assertEquals(
          await image.read(offset, length),
          want.subarray(offset, offset + length),
        );
      }
      // Concurrent reads of the same blocks share decodes and agree.
      const reads = await Promise.all(
        [0, 1, 2, 3].map(() => image.read(4000, 9000)),
      );
      for (const r of reads) assertEquals(r, want.subarray(4000, 13000));
    });
  },
});

Deno.test("cloop reports every block as data and its details", async () => {
  const image = await open(fromBytes(await ours(new Uint8Array(150_000))));
  const runs = [];
  for await (const r of image.extents(0, image.size)) runs.push(r);
  assertEquals(runs, [{ offset: 0, length: 196608, kind: "data" }]);
  assertEquals(image.details, {
    version: 2,
    header: "first",
    block_size: 65536,
    n_blocks: 3,
    codecs: { zlib: 3 },
  });
});

// ---------------------------------------------------------------- writing

for (const blockSize of [512, 65536, 131072]) {
  Deno.test({
    name:
      `cloop writes block_size ${blockSize} images that extract_compressed_fs and qemu-img read back byte-identical`,
    ignore: skip(["extract_compressed_fs", "qemu-img"]),
    async fn() {
      await withTemp(async (dir) => {
        const disk = sampleDisk(blockSize * 12 + 77, blockSize);
        const image = await ours(disk, { block_size: String(blockSize) });
        const want = sha256Hex(padded(disk, blockSize));
        await Deno.writeFile(`${dir}/o.cloop`, image);
        await run("extract_compressed_fs", [
          `${dir}/o.cloop`,
          `${dir}/o.raw`,
        ]);
        assertEquals(sha256Hex(await Deno.readFile(`${dir}/o.raw`)), want);
        assertEquals(sha256Hex(await qemuRaw(dir, image)), want);
        assertEquals(sha256Hex(await decodeAll(image)), want);
      });
    },
  });
}

Deno.test({
  name: "cloop writes the header qemu-img's probe recognises",
  ignore: skip(["qemu-img"]),
  async fn() {
    await withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/p.cloop`, await ours(sampleDisk(70_000)));
      const info = await run("qemu-img", ["info", `${dir}/p.cloop`]);
      assertMatch(info.text, /file format: cloop/);
    });
  },
});

Deno.test("cloop writes the same bytes to a stream as to a file", async () => {
  const disk = sampleDisk(400_000);
  const chunks: Uint8Array[] = [];
  const sink = streamSink(
    new WritableStream({ write: (c) => void chunks.push(c.slice()) }),
  );
  await cloop.encode!(fromBytes(disk), sink, {
    options: { block_size: "16384" },
  });
  await sink.close();
  const streamed = new Uint8Array(chunks.reduce((s, c) => s + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    streamed.set(c, at);
    at += c.length;
  }
  assertEquals(
    sha256Hex(streamed),
    sha256Hex(await ours(disk, { block_size: "16384" })),
  );
});

Deno.test("cloop writer refuses bad options", async () => {
  for (
    const options of <Record<string, string>[]> [
      { block_size: "1000" },
      { block_size: "0" },
      { block_size: String(128 << 20) },
      { version: "3" },
      { compression: "xz" }, // version 2 is zlib only
      { version: "4", compression: "brotli" },
      { version: "4", header: "middle" },
      { colour: "blue" },
    ]
  ) {
    await rejects(
      () =>
        cloop.encode!(fromBytes(new Uint8Array(512)), memorySink(), {
          options,
        }),
      OptionError,
      Object.keys(options).includes("colour")
        ? /cloop: unknown option 'colour' \(valid: block_size, version, compression, header\)/
        : /cloop: option \w+=\S* is invalid: must be/,
    );
  }
});

// ---------------------------------------------------------------- version 4

const EVERY_CODEC: Kind[] = ["zlib", "none", "xz", "lz4", "lzo"];

/** The blocks of `disk`, each packed by the next of every codec in turn. */
async function packEachCodec(disk: Uint8Array, blockSize: number) {
  const packed = [];
  for (let i = 0; i * blockSize < disk.length; i++) {
    const kind = EVERY_CODEC[i % EVERY_CODEC.length];
    const block = disk.subarray(i * blockSize, (i + 1) * blockSize);
    packed.push({
      kind,
      bytes: await (await codecModule(kind))!.encode(block),
    });
  }
  return packed;
}

Deno.test("cloop version 4 images mix codecs per block, header first or last", async () => {
  const blockSize = 16384;
  const disk = sampleDisk(blockSize * 10, 11);
  const packed = await packEachCodec(disk, blockSize);
  for (const placement of ["first", "last"] as const) {
    const image = buildV4(blockSize, packed, placement);
    const [best] = await probe(fromBytes(image));
    assertEquals(best.format, "cloop");
    const opened = await open(fromBytes(image));
    assertEquals(opened.details?.version, 4);
    assertEquals(opened.details?.header, placement);
    assertEquals(
      Object.keys(opened.details?.codecs as object).sort(),
      [...EVERY_CODEC].sort(),
    );
    assertEquals(sha256Hex(await opened.read(0, opened.size)), sha256Hex(disk));
  }
});

Deno.test("cloop readInto gives the bytes read gives, for every codec, whole and partial blocks, cached or not", async () => {
  const blockSize = 16384;
  const disk = sampleDisk(blockSize * 10, 12);
  const packed = await packEachCodec(disk, blockSize);
  const opened = await open(fromBytes(buildV4(blockSize, packed, "first")));
  const ranges = [
    [0, disk.length],
    [100, blockSize * 3], // partial blocks at both ends
    [blockSize * 2, blockSize * 4],
    [blockSize * 9 + 5, blockSize - 5],
  ];
  for (const [at, n] of [...ranges, ...ranges]) { // the second time cached
    const into = new Uint8Array(n).fill(0xee);
    await opened.readInto!(at, into);
    assertEquals(into, disk.subarray(at, at + n));
  }
});

Deno.test("cloop readInto reports a corrupt block as an ImageFormatError naming it", async () => {
  const image = (await sample()).slice();
  const second = Number(new DataView(image.buffer).getBigUint64(136 + 8));
  image.fill(0xaa, second + 2, second + 200);
  const opened = await cloop.open(fromBytes(image), {});
  await rejects(
    () => opened.readInto!(0, new Uint8Array(65536 * 3)),
    ImageFormatError,
    /block 1 \(.*zlib.*does not decode/,
  );
});

Deno.test("where memory is not shared (a browser page that is not cross-origin isolated), blocks are moved to the workers and back: the same bytes, a corrupt block named", async () => {
  await withTemp(async (dir) => {
    const disk = sampleDisk(3 << 20); // 48 blocks: enough for the pool
    const image = await ours(disk);
    await Deno.writeFile(`${dir}/good.cloop`, image);
    const got = await unsharedRead(`${dir}/good.cloop`);
    assertEquals(got.shared, "undefined", JSON.stringify(got));
    assertEquals(got.sha256, sha256Hex(disk));
    assertTrue(got.jobs! > 0, "decoded on the workers");
    const second = Number(new DataView(image.buffer).getBigUint64(136 + 8));
    image.fill(0xaa, second + 2, second + 200);
    await Deno.writeFile(`${dir}/bad.cloop`, image);
    assertMatch(
      (await unsharedRead(`${dir}/bad.cloop`)).error ?? "",
      /^ImageFormatError: .*block 1 \(.*zlib.*does not decode/,
    );
  });
});

Deno.test("cloop version 4 and version 2 images of one disk decode to the same bytes", async () => {
  const disk = sampleDisk(333_333);
  const v2 = await decodeAll(await ours(disk));
  for (const header of ["first", "last"]) {
    for (const compression of ["zlib", "none"]) {
      const image = await ours(disk, { version: "4", header, compression });
      const opened = await open(fromBytes(image));
      assertEquals(opened.details?.version, 4);
      assertEquals(opened.details?.header, header);
      assertEquals(sha256Hex(await opened.read(0, opened.size)), sha256Hex(v2));
    }
  }
});

Deno.test("cloop version 4 writer compresses with every codec this build has", async () => {
  const disk = sampleDisk(65536 * 4 + 100, 5);
  for (const compression of ["zlib", "none", "xz", "lz4", "lzo"] as Kind[]) {
    for (const header of ["first", "last"]) {
      const opened = await open(
        fromBytes(await ours(disk, { version: "4", compression, header })),
      );
      const codecs = Object.keys(opened.details?.codecs as object);
      assertTrue(codecs.includes(compression), `${compression}: ${codecs}`);
      assertEquals(
        sha256Hex(await opened.read(0, opened.size)),
        sha256Hex(padded(disk, 65536)),
      );
    }
  }
});

Deno.test("cloop version 4 writer stores incompressible blocks uncompressed", async () => {
  const disk = new Uint8Array(65536 * 3);
  disk.set(pseudoRandom(65536), 65536);
  const opened = await open(fromBytes(await ours(disk, { version: "4" })));
  assertEquals(opened.details?.codecs, { zlib: 2, none: 1 });
  assertEquals(await opened.read(0, opened.size), disk);
});

// ---------------------------------------------------------------- malformed

/** A small valid version 2 image to poke. */
async function sample(): Promise<Uint8Array> {
  return await ours(sampleDisk(65536 * 3), { block_size: "65536" });
}

function poke32(image: Uint8Array, at: number, value: number): Uint8Array {
  const copy = image.slice();
  new DataView(copy.buffer).setUint32(at, value);
  return copy;
}

function poke64(image: Uint8Array, at: number, value: bigint): Uint8Array {
  const copy = image.slice();
  new DataView(copy.buffer).setBigUint64(at, value);
  return copy;
}

async function refuses(image: Uint8Array, pattern: RegExp) {
  // Refused after a few reads of the header and table, never by reading
  // the image over and over (bounded by work, not by the clock).
  const counted = countingSource(image);
  const e = await rejects(
    () => cloop.open(counted.source, {}),
    ImageFormatError,
    pattern,
  );
  assertBoundedWork(counted, image.length, 16, 2);
  return e;
}

Deno.test("cloop refuses block_size 0, not a multiple of 512, or over 64 MiB", async () => {
  const image = await sample();
  await refuses(poke32(image, 128, 0), /block_size 0 must be non-zero/);
  await refuses(
    poke32(image, 128, 513),
    /block_size 513 must be a multiple of 512/,
  );
  await refuses(
    poke32(image, 128, 64 * 1024 * 1024 + 512),
    /block_size 67109376 must be 64 MiB/,
  );
});

Deno.test("cloop refuses n_blocks whose offsets table overflows, is over 512 MiB, or outruns the file", async () => {
  const image = await sample();
  // 0xFFFFFFFF must not allocate a 32 GiB table.
  const e = await refuses(
    poke32(image, 132, 0xffffffff),
    /n_blocks 4294967295 must be 536870911 or less/,
  );
  assertEquals((e as ImageFormatError).offset, 132);
  await refuses(
    poke32(image, 132, 67108864),
    /n_blocks 67108864 must be 67108863 or less/,
  );
  await refuses(poke32(image, 132, 1_000_000), /does not fit in the file/);
});

Deno.test("cloop refuses offsets that decrease", async () => {
  const image = await sample();
  await refuses(
    poke64(image, 136 + 16, 10n),
    /offsets\[2\] 10 must be at least offsets\[1\]/,
  );
});

Deno.test("cloop refuses a compressed block bigger than block_size can need", async () => {
  const image = await sample();
  const first = new DataView(image.buffer).getBigUint64(136);
  // 64 KiB blocks: at most 64 KiB + 8 KiB + 64 KiB compressed.
  await refuses(
    poke64(image, 136 + 8, first + 150_000n),
    /offsets\[1\] \d+ must be within 139264 bytes of offsets\[0\]/,
  );
  // QEMU's own ceiling, 2 × 64 MiB, whatever the block size.
  await refuses(
    poke64(image, 136 + 8, first + (200n << 20n)),
    /block 0 would be 209715200 bytes compressed/,
  );
});

Deno.test("cloop refuses a last offset past the end of the file", async () => {
  const image = await sample();
  await refuses(
    poke64(image, 136 + 3 * 8, BigInt(image.length + 1)),
    /offsets\[3\] \d+ must be at most/,
  );
});

Deno.test("cloop refuses offsets past 2^53 and unknown version 4 compressors", async () => {
  const image = await sample();
  await refuses(
    poke64(image, 136 + 8, 1n << 60n),
    /offsets\[1\] .* must be at most 2\^53-1/,
  );
  const v4 = await ours(sampleDisk(65536 * 2), { version: "4" });
  const flags = v4.slice();
  flags[136 + 8] = 0x70;
  await refuses(flags, /block_ptrs\[1\]\.flags 7 must be a compressor/);
});

Deno.test("cloop refuses files without a signature or shorter than a header", async () => {
  await refuses(new Uint8Array(100), /file size 100 must be at least 136/);
  await refuses(new Uint8Array(4096), /signature/);
  const image = await sample();
  await rejects(
    () => open(fromBytes(image.subarray(0, 2000))),
    ImageFormatError,
  );
});

Deno.test("cloop reports a corrupt block as an ImageFormatError naming it", async () => {
  const image = (await sample()).slice();
  const second = Number(new DataView(image.buffer).getBigUint64(136 + 8));
  image.fill(0xaa, second + 2, second + 200);
  const opened = await cloop.open(fromBytes(image), {});
  await rejects(() => opened.read(65536, 10), ImageFormatError, /block 1 /);
  // Other blocks still read.
  assertEquals((await opened.read(0, 10)).length, 10);
});

Deno.test({
  name: "cloop reads a file converted by the CLI as qemu-img does",
  ignore: skip(["qemu-img"]),
  async fn() {
    await withTemp(async (dir) => {
      const disk = sampleDisk(500_000);
      await Deno.writeFile(`${dir}/d.raw`, disk);
      const file = await fromFile(`${dir}/d.raw`);
      const sink = memorySink();
      await convert(await open(file), sink, { format: "cloop" });
      await file.close();
      assertEquals(
        sha256Hex(await qemuRaw(dir, sink.bytes())),
        sha256Hex(padded(disk, 65536)),
      );
    });
  },
});
