import { assertEquals } from "./_asserts.ts";
import {
  BackingFileError,
  convert,
  cow,
  create,
  createOutputFile,
  fromBytes,
  fromFile,
  ImageFormatError,
  memorySink,
  open,
  probe,
  UnsupportedError,
} from "../mod.ts";
import {
  assertBoundedWork,
  cli,
  countingSource,
  pseudoRandom,
  rejects,
  run,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

/** Opens a COW file with its backing file followed (absolute, or in its folder). */
async function openChain(path: string) {
  const dir = path.slice(0, path.lastIndexOf("/"));
  return await open(await fromFile(path), {
    resolveBacking: (name) =>
      fromFile(name.startsWith("/") ? name : `${dir}/${name}`),
  });
}

/** Our convert of a chain to a raw file; its bytes. */
async function ourRaw(path: string, out: string): Promise<Uint8Array> {
  const image = await openChain(path);
  const file = await createOutputFile(out);
  await convert(image, file);
  await file.commit();
  await image.close?.();
  return await Deno.readFile(out);
}

const mtimeOf = (path: string) =>
  String(Math.floor(Deno.statSync(path).mtime!.getTime() / 1000));

Deno.test({
  name:
    "a cow made by uml_mkcow and written through our driver merges with uml_moo to exactly our convert output, the backing file untouched",
  ignore: skip(["uml_mkcow", "uml_moo"]),
  fn: () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/base.raw`, pseudoRandom(3 << 20, 7));
      const before = await sha256File(`${dir}/base.raw`);
      await run("uml_mkcow", [`${dir}/c.cow`, `${dir}/base.raw`]);
      const file = await fromFile(`${dir}/c.cow`, { write: true });
      const image = await open(file, { writable: true, sink: file });
      assertEquals(image.format, "cow");
      assertEquals(image.backingFile, `${dir}/base.raw`);
      assertEquals(image.size, 3 << 20);
      await image.write!(3 * 512, new Uint8Array(1024).fill(0x5a));
      await image.write!(1000 * 512, pseudoRandom(20 * 512, 2));
      await image.write!((3 << 20) - 512, new Uint8Array(512).fill(1));
      await image.flush!();
      await file.close();
      const ours = await ourRaw(`${dir}/c.cow`, `${dir}/ours.raw`);
      await run("uml_moo", [`${dir}/c.cow`, `${dir}/moo.raw`]);
      assertEquals(
        sha256Hex(ours),
        await sha256File(`${dir}/moo.raw`),
      );
      assertEquals(ours[3 * 512], 0x5a);
      assertEquals(await sha256File(`${dir}/base.raw`), before);
    }),
});

Deno.test({
  name:
    "a cow created by us (cli create -f cow) and written through our driver is merged by uml_moo as we read it",
  ignore: skip(["uml_moo"]),
  fn: () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/base.raw`, pseudoRandom(1 << 20, 3));
      const made = await cli([
        "create",
        "-f",
        "cow",
        "-b",
        `${dir}/base.raw`,
        `${dir}/n.cow`,
        "1M",
      ]);
      assertEquals(made.code, 0, made.stderr);
      const file = await fromFile(`${dir}/n.cow`, { write: true });
      const image = await open(file, { writable: true, sink: file });
      await image.write!(4096, new Uint8Array(8192).fill(7));
      await image.flush!();
      await file.close();
      await run("uml_moo", [`${dir}/n.cow`, `${dir}/moo.raw`]);
      const ours = await ourRaw(`${dir}/n.cow`, `${dir}/ours.raw`);
      assertEquals(sha256Hex(ours), await sha256File(`${dir}/moo.raw`));
      // The byte before the write is the backing file's; the written
      // ones are ours.
      assertEquals([ours[4095], ours[4096], ours[12287], ours[12288]], [
        pseudoRandom(1 << 20, 3)[4095],
        7,
        7,
        pseudoRandom(1 << 20, 3)[12288],
      ]);
    }),
});

/** A version 2 COW file (ubd's pre-v3 layout) over `backing` of `size` bytes. */
function v2Cow(backing: string, size: number, mtime: number): Uint8Array {
  const headerSize = 4120;
  const bitmapBytes = Math.floor((size + 511) / (8 * 512));
  const dataOffset = Math.ceil((headerSize + bitmapBytes) / 512) * 512;
  const out = new Uint8Array(dataOffset + size);
  const v = new DataView(out.buffer);
  v.setUint32(0, 0x4f4f4f4d);
  v.setUint32(4, 2);
  out.set(new TextEncoder().encode(backing), 8);
  v.setUint32(4104, mtime);
  v.setBigUint64(4108, BigInt(size));
  v.setUint32(4116, 512);
  // Sectors 2, 3 and 9 in the COW file.
  out[headerSize] = 0b1100;
  out[headerSize + 1] = 0b10;
  out.fill(0xaa, dataOffset + 2 * 512, dataOffset + 4 * 512);
  out.fill(0xbb, dataOffset + 9 * 512, dataOffset + 10 * 512);
  return out;
}

Deno.test({
  name: "a version 2 COW file reads as uml_moo merges it",
  ignore: skip(["uml_moo"]),
  fn: () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/base.raw`, pseudoRandom(64 << 10, 5));
      const mtime = Number(mtimeOf(`${dir}/base.raw`));
      await Deno.writeFile(
        `${dir}/v2.cow`,
        v2Cow(`${dir}/base.raw`, 64 << 10, mtime),
      );
      const image = await open(await fromFile(`${dir}/v2.cow`));
      assertEquals(image.details?.version, 2);
      await run("uml_moo", [`${dir}/v2.cow`, `${dir}/moo.raw`]);
      const ours = await ourRaw(`${dir}/v2.cow`, `${dir}/ours.raw`);
      assertEquals(sha256Hex(ours), await sha256File(`${dir}/moo.raw`));
      assertEquals([ours[2 * 512], ours[9 * 512]], [0xaa, 0xbb]);
    }),
});

Deno.test("a version 3 COW file in the unpacked 64-bit layout of old UML builds reads", async () => {
  const size = 16384;
  const header = 4136; // 4 + 4 + 8 + 8 + 4 + 4 + 4 + 4096, padded to 8
  const out = new Uint8Array(8192 + 4096 + size);
  const v = new DataView(out.buffer);
  v.setUint32(0, 0x4f4f4f4d);
  v.setUint32(4, 3);
  v.setBigUint64(16, BigInt(size));
  v.setUint32(24, 512);
  v.setUint32(28, 4096);
  out.set(new TextEncoder().encode("/base.img"), 36);
  const bitmapAt = Math.ceil(header / 4096) * 4096;
  out[bitmapAt] = 0b1;
  out.fill(0x11, bitmapAt + 4096, bitmapAt + 4096 + 512);
  const image = await open(fromBytes(out));
  assertEquals(image.details?.layout, "v3-unpacked");
  assertEquals(image.backingFile, "/base.img");
  assertEquals((await image.read(0, 512))[511], 0x11);
});

Deno.test("reading a COW file's unallocated sectors without its backing file is a BackingFileError", async () => {
  const sink = memorySink();
  const image = await create("cow", sink, {
    size: 8192,
    backingFile: "base.img",
  });
  await image.write!(0, new Uint8Array(512).fill(3));
  assertEquals((await image.read(0, 512))[0], 3);
  await rejects(
    () => image.read(0, 1024),
    BackingFileError,
    /in its backing file "base\.img"/,
  );
  await rejects(
    () => image.write!(600, new Uint8Array(10)),
    UnsupportedError,
    /write whole sectors of 512 bytes/,
  );
  // A partial write inside a sector the COW file already holds is fine.
  await image.write!(10, new Uint8Array([1, 2, 3]));
  assertEquals(Array.from(await image.read(9, 5)), [3, 1, 2, 3, 3]);
});

Deno.test("cow is probed by its magic and version; version 1 is refused clearly", async () => {
  const sink = memorySink();
  await cow.create!(sink, { size: 4096, backingFile: "b" });
  assertEquals((await probe(sink.source()))[0].format, "cow");
  const v1 = sink.bytes().slice(0, 8192);
  new DataView(v1.buffer).setUint32(0, 0x4f4f4f4d, true);
  await rejects(
    () => open(fromBytes(v1), { format: "cow" }),
    UnsupportedError,
    /version 1/,
  );
});

// ---------------------------------------------------------------------------
// Malformed COW files

async function smallCow(): Promise<Uint8Array> {
  const sink = memorySink();
  const image = await cow.create!(sink, { size: 1 << 20, backingFile: "b" });
  await image.write!(0, new Uint8Array(4096).fill(1));
  return sink.bytes().slice();
}

function poke(bytes: Uint8Array, at: number, value: number | bigint) {
  const v = new DataView(bytes.buffer, bytes.byteOffset);
  if (typeof value === "bigint") v.setBigUint64(at, value);
  else v.setUint32(at, value);
  return bytes;
}

const cases: [string, (b: Uint8Array) => Uint8Array, RegExp][] = [
  ["a truncated header", (b) => b.slice(0, 100), /at least 4128 bytes/],
  ["version 4", (b) => poke(b, 4, 4), /version 4 must be 2 or 3/],
  ["sectorsize 0", (b) => poke(b, 20, 0), /sectorsize 0 must be a power/],
  ["sectorsize 1000", (b) => poke(b, 20, 1000), /sectorsize 1000/],
  ["alignment 0", (b) => poke(b, 24, 0), /alignment 0 must be a power/],
  ["alignment 2^30", (b) => poke(b, 24, 2 ** 30), /alignment 1073741824/],
  ["cow_format 1", (b) => poke(b, 28, 1), /cow_format 1 must be 0/],
  [
    "a bitmap shorter than the disk (file cut after the header)",
    (b) => b.slice(0, 8192 + 100),
    /the bitmap is shorter than the disk/,
  ],
  [
    "a huge size (bitmap past the end of the file)",
    (b) => poke(b, 12, 1n << 50n),
    /the bitmap is shorter than the disk/,
  ],
  ["a size past 2^53", (b) => poke(b, 12, 1n << 60n), /at most 2\^53-1/],
];
for (const [what, mutate, message] of cases) {
  Deno.test(`a COW file with ${what} is an ImageFormatError`, async () => {
    const bytes = mutate(await smallCow());
    const counted = countingSource(bytes);
    await rejects(
      async () => {
        const image = await open(counted.source, { format: "cow" });
        await image.read(0, 4096);
      },
      ImageFormatError,
      message,
    );
    assertBoundedWork(counted, bytes.length, 64);
  });
}

Deno.test("a COW file whose data is cut off fails with an ImageFormatError on reading it", async () => {
  const bytes = await smallCow();
  const image = await open(fromBytes(bytes.slice(0, 12288 + 1000)), {
    format: "cow",
  });
  await rejects(() => image.read(0, 4096), ImageFormatError, /read offset/);
});
