import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  bochs,
  convert,
  fromBytes,
  fromFile,
  ImageFormatError,
  memorySink,
  open,
  probe,
} from "../mod.ts";
import {
  pseudoRandom,
  referenceBytes,
  referenceImages,
  rejects,
  run,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

interface BuildOptions {
  /** The disk's bytes. */
  disk: Uint8Array;
  /** Bytes per extent. @default 4096 */
  extentSize?: number;
  /** Header version 1 or 2. @default 2 */
  version?: 1 | 2;
  /** Subtype. @default "Growing" */
  subtype?: string;
  /** Which sectors are stored (default: the non-zero ones). */
  stored?: (sector: number) => boolean;
}

/**
 * A bochs image built from the format description (as bximage lays it out):
 * header, catalog, then stored extents in order of first use, each a
 * 512-byte bitmap (least significant bit first) and the extent's data.
 */
function buildBochs(o: BuildOptions): Uint8Array {
  const extentSize = o.extentSize ?? 4096;
  const sectorsPerExtent = extentSize / 512;
  const extents = Math.ceil(o.disk.length / extentSize);
  const catalogEntries = Math.max(extents, 8);
  const headerSize = 512;
  const catalogBytes = Math.ceil((catalogEntries * 4) / 512) * 512;
  const stored = o.stored ??
    ((s: number) => o.disk.subarray(s * 512, s * 512 + 512).some((b) => b));
  const chunks: Uint8Array[] = [];
  const catalog = new Uint32Array(catalogEntries).fill(0xffffffff);
  for (let e = 0; e < extents; e++) {
    const bitmap = new Uint8Array(512);
    let any = false;
    for (let s = 0; s < sectorsPerExtent; s++) {
      if (stored(e * sectorsPerExtent + s)) {
        bitmap[s >> 3] |= 1 << (s & 7);
        any = true;
      }
    }
    if (!any) continue;
    catalog[e] = chunks.length / 2;
    const data = new Uint8Array(extentSize);
    data.set(o.disk.subarray(e * extentSize, (e + 1) * extentSize));
    // Sectors whose bit is clear hold junk that must never be read.
    for (let s = 0; s < sectorsPerExtent; s++) {
      if (!(bitmap[s >> 3] & (1 << (s & 7)))) {
        data.fill(0xee, s * 512, s * 512 + 512);
      }
    }
    chunks.push(bitmap, data);
  }
  const size = headerSize + catalogBytes +
    chunks.reduce((n, c) => n + c.length, 0);
  const out = new Uint8Array(size);
  const v = new DataView(out.buffer);
  const text = new TextEncoder();
  out.set(text.encode("Bochs Virtual HD Image"), 0);
  out.set(text.encode("Redolog"), 32);
  out.set(text.encode(o.subtype ?? "Growing"), 48);
  v.setUint32(64, o.version === 1 ? 0x00010000 : 0x00020000, true);
  v.setUint32(68, headerSize, true);
  // The catalog is padded to whole sectors, as bximage does, and the
  // entry count covers the padding.
  v.setUint32(72, catalogBytes / 4, true);
  v.setUint32(76, 512, true);
  v.setUint32(80, extentSize, true);
  v.setBigUint64(o.version === 1 ? 84 : 88, BigInt(o.disk.length), true);
  for (let i = 0; i < catalogBytes / 4; i++) {
    v.setUint32(headerSize + i * 4, catalog[i] ?? 0xffffffff, true);
  }
  let at = headerSize + catalogBytes;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** A disk with random sectors, zero sectors and whole empty extents. */
function sampleDisk(size: number): Uint8Array {
  const disk = pseudoRandom(size, 11);
  for (let s = 0; s < size / 512; s++) {
    if (s % 5 === 2 || (s >= 64 && s < 96)) {
      disk.fill(0, s * 512, s * 512 + 512);
    }
  }
  return disk;
}

async function qemuDecode(dir: string, bytes: Uint8Array): Promise<Uint8Array> {
  await Deno.writeFile(`${dir}/img.bochs`, bytes);
  await run("qemu-img", [
    "convert",
    "-f",
    "bochs",
    "-O",
    "raw",
    `${dir}/img.bochs`,
    `${dir}/out.raw`,
  ]);
  return await Deno.readFile(`${dir}/out.raw`);
}

Deno.test({
  name:
    "an empty growing image made by bximage is all unallocated and reads as zeros",
  ignore: skip(["bximage", "qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      await run("bximage", [
        "-func=create",
        "-hd=10M",
        "-imgmode=growing",
        "-q",
        `${dir}/e.img`,
      ]);
      const image = await open(await fromFile(`${dir}/e.img`));
      assertEquals(image.format, "bochs");
      const expected = await qemuDecode(
        dir,
        await Deno.readFile(`${dir}/e.img`),
      );
      assertEquals(image.size, expected.length);
      const kinds = [];
      for await (const e of image.extents(0, image.size)) kinds.push(e.kind);
      assertEquals(kinds, ["unallocated"]);
      const sink = memorySink();
      await convert(image, sink);
      assertEquals(sha256Hex(sink.bytes()), sha256Hex(expected));
      await image.close?.();
    }),
});

Deno.test({
  name:
    "a growing image bximage converts from a raw disk decodes to that disk, as qemu-img decodes it",
  ignore: skip(["bximage", "qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const disk = sampleDisk(1 << 20);
      await Deno.writeFile(`${dir}/flat.img`, disk);
      await run("bximage", [
        "-func=convert",
        "-imgmode=growing",
        "-q",
        `${dir}/flat.img`,
        `${dir}/g.img`,
      ]);
      const bytes = await Deno.readFile(`${dir}/g.img`);
      const expected = await qemuDecode(dir, bytes);
      assertEquals(sha256Hex(expected), sha256Hex(disk));
      const image = await open(fromBytes(bytes));
      assertEquals(image.format, "bochs");
      assertEquals(sha256Hex(await image.read(0, image.size)), sha256Hex(disk));
    }),
});

for (const version of [1, 2] as const) {
  Deno.test({
    name:
      `a version ${version} image built by the format description decodes as qemu-img decodes it`,
    ignore: skip(["qemu-img"]),
    fn: () =>
      withTemp(async (dir) => {
        const disk = sampleDisk(300 * 1024);
        const bytes = buildBochs({ disk, version, extentSize: 8192 });
        const expected = await qemuDecode(dir, bytes);
        const image = await bochs.open(fromBytes(bytes), {});
        assertEquals(image.details?.version, version);
        assertEquals(image.size, expected.length);
        assertEquals(
          sha256Hex(await image.read(0, image.size)),
          sha256Hex(expected),
        );
        assertEquals(sha256Hex(expected), sha256Hex(disk));
      }),
  });
}

Deno.test("sectors whose bitmap bit is clear are unallocated and read as zeros", async () => {
  const disk = pseudoRandom(16384, 2);
  const bytes = buildBochs({ disk, stored: (s) => s % 2 === 0 });
  const image = await bochs.open(fromBytes(bytes), {});
  const runs = [];
  for await (const e of image.extents(0, 4096)) {
    runs.push(`${e.kind}:${e.length}`);
  }
  assertEquals(runs, [
    "data:512",
    "unallocated:512",
    "data:512",
    "unallocated:512",
    "data:512",
    "unallocated:512",
    "data:512",
    "unallocated:512",
  ]);
  const back = await image.read(0, disk.length);
  for (let s = 0; s < 32; s++) {
    const part = back.subarray(s * 512, s * 512 + 512);
    const want = s % 2 === 0
      ? disk.subarray(s * 512, s * 512 + 512)
      : new Uint8Array(512);
    assertEquals(sha256Hex(part), sha256Hex(want), `sector ${s}`);
  }
});

Deno.test("an undoable redolog reads its stored sectors and leaves the rest unallocated", async () => {
  const disk = sampleDisk(65536);
  const image = await bochs.open(
    fromBytes(buildBochs({ disk, subtype: "Undoable" })),
    {},
  );
  assertEquals(image.details?.subtype, "Undoable");
  assertEquals(sha256Hex(await image.read(0, disk.length)), sha256Hex(disk));
});

Deno.test("probing finds bochs images and nothing else claims them", async () => {
  const bytes = buildBochs({ disk: sampleDisk(8192) });
  const [best] = await probe(fromBytes(bytes));
  assertEquals(best.format, "bochs");
  assertEquals(
    bochs.probe({
      head: new Uint8Array(512),
      tail: new Uint8Array(512),
      size: 512,
    }),
    0,
  );
});

Deno.test({
  name: "the reference empty.bochs decodes to its manifest hash",
  ignore: skip(["bzip2"], true),
  fn: async () => {
    const ref = referenceImages().find((r) =>
      r.path.endsWith("empty.bochs.bz2")
    )!;
    const image = await open(fromBytes((await referenceBytes(ref.path))!));
    assertEquals(image.format, "bochs");
    assertEquals(image.size, ref.virtual_size);
    const result = await convert(image, memorySink(), { hash: true });
    assertEquals(result.sha256, ref.raw_sha256);
  },
});

/** A small valid image with a few stored extents, for poking fields. */
function small(): Uint8Array {
  return buildBochs({ disk: sampleDisk(64 * 1024) });
}

function poke(bytes: Uint8Array, at: number, value: number | bigint) {
  const v = new DataView(bytes.buffer, bytes.byteOffset);
  if (typeof value === "bigint") v.setBigUint64(at, value, true);
  else v.setUint32(at, value, true);
  return bytes;
}

const malformed: [string, (b: Uint8Array) => Uint8Array, RegExp][] = [
  [
    "a negative catalog size",
    (b) => poke(b, 72, 0xffff0000),
    /catalog 4294901760 must be at most 1048576/,
  ],
  [
    "a catalog too small for the disk",
    (b) => poke(b, 72, 2),
    /catalog 2 must be at least 16/,
  ],
  [
    "a catalog larger than the file",
    (b) => poke(b, 72, 0x80000),
    /catalog .* within the file/,
  ],
  [
    "an extent size of zero",
    (b) => poke(b, 80, 0),
    /extent 0 must be a power of two/,
  ],
  ["a huge extent size", (b) => poke(b, 80, 0x80000000), /extent 2147483648/],
  [
    "an extent size that is not a power of two",
    (b) => poke(b, 80, 12345),
    /extent 12345/,
  ],
  ["a bitmap too small for the extent", (b) => poke(b, 76, 0), /bitmap 0/],
  [
    "a header offset past the end",
    (b) => poke(b, 68, 0x7fffffff),
    /header 2147483647/,
  ],
  [
    "a disk size past 2^53",
    (b) => poke(b, 88, 1n << 60n),
    /disk .* at most 2\^53-1/,
  ],
  [
    "a catalog entry outside the file",
    (b) => poke(b, 512, 0x00ffffff),
    /catalog\[0\]/,
  ],
  ["an unknown version", (b) => poke(b, 64, 0x30000), /version 196608/],
  ["a truncated file", (b) => b.slice(0, 300), /file size 300/],
];

for (const [what, mutate, pattern] of malformed) {
  Deno.test(`${what} is a clear ImageFormatError`, async () => {
    await rejects(
      () => bochs.open(fromBytes(mutate(small())), {}),
      ImageFormatError,
      pattern,
    );
  });
}

Deno.test("a stored extent cut off by the end of the file is refused when read", async () => {
  const bytes = small();
  const cut = bytes.slice(0, bytes.length - 1000);
  const image = await open(fromBytes(cut), { format: "bochs" });
  await rejects(() => image.read(0, image.size), ImageFormatError, /truncated/);
  assertTrue(image.size > 0);
});
