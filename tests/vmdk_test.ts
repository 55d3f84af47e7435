import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import { createHash } from "node:crypto";
import {
  BackingFileError,
  convert,
  createOutputFile,
  fileResolver,
  fromBytes,
  fromFile,
  type Image,
  ImageFormatError,
  memorySink,
  open,
  probe,
  type Source,
  UnsupportedError,
  vmdk,
} from "../mod.ts";
import {
  assertQemuIdentical,
  cli,
  pseudoRandom,
  qemuIo,
  referenceBytes,
  referenceFile,
  referenceImages,
  rejects,
  run,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

const SUBFORMATS = [
  "monolithicSparse",
  "streamOptimized",
  "monolithicFlat",
  "twoGbMaxExtentSparse",
  "twoGbMaxExtentFlat",
];

/** A disk of `size` bytes: pseudo-random 64 KiB runs with holes between. */
function sampleDisk(size: number, seed = 7): Uint8Array<ArrayBuffer> {
  const disk = new Uint8Array(size);
  const random = pseudoRandom(size, seed);
  for (let at = 0; at < size; at += 65536) {
    if ((at / 65536) % 3 !== 1) {
      disk.set(random.subarray(at, Math.min(size, at + 65536)), at);
    }
  }
  // A run of text-like bytes that compresses, and a partly zero grain.
  disk.fill(0x41, 3 << 16, (3 << 16) + 40000);
  disk.fill(0, (6 << 16) + 4096, (6 << 16) + 8192);
  return disk;
}

/** Opens an image file the way the CLI should: extent files beside it. */
async function openPath(path: string): Promise<Image> {
  return await open(await fromFile(path), { resolveFile: fileResolver(path) });
}

async function kinds(image: Image) {
  const seen: string[] = [];
  for await (const e of image.extents(0, image.size)) {
    if (!seen.includes(e.kind)) seen.push(e.kind);
  }
  return seen.sort();
}

async function qemuRaw(path: string, dir: string): Promise<Uint8Array> {
  await run("qemu-img", ["convert", "-O", "raw", path, `${dir}/qemu.raw`]);
  return await Deno.readFile(`${dir}/qemu.raw`);
}

/** A valid monolithicSparse image made by our writer, as bytes. */
async function smallSparse(size = 1 << 20): Promise<Uint8Array> {
  const sink = memorySink();
  await vmdk.encode!(fromBytes(sampleDisk(size)), sink, {
    options: { subformat: "monolithicSparse" },
  });
  return sink.bytes().slice();
}

/** A valid streamOptimized image made by our writer, as bytes. */
async function smallStream(size = 1 << 20): Promise<Uint8Array> {
  const sink = memorySink();
  await vmdk.encode!(fromBytes(sampleDisk(size)), sink, {
    options: { subformat: "streamOptimized" },
  });
  return sink.bytes().slice();
}

function poke64(b: Uint8Array, at: number, v: bigint) {
  new DataView(b.buffer, b.byteOffset).setBigUint64(at, v, true);
}
function poke32(b: Uint8Array, at: number, v: number) {
  new DataView(b.buffer, b.byteOffset).setUint32(at, v, true);
}
function peek32(b: Uint8Array, at: number) {
  return new DataView(b.buffer, b.byteOffset).getUint32(at, true);
}

for (const subformat of SUBFORMATS) {
  Deno.test({
    name:
      `a ${subformat} image made by qemu-img decodes to the bytes qemu-img decodes`,
    ignore: skip(["qemu-img"]),
    fn: () =>
      withTemp(async (dir) => {
        const disk = sampleDisk((5 << 20) + (3 << 16));
        await Deno.writeFile(`${dir}/src.raw`, disk);
        await run("qemu-img", [
          "convert",
          "-f",
          "raw",
          "-O",
          "vmdk",
          "-o",
          `subformat=${subformat}`,
          `${dir}/src.raw`,
          `${dir}/disk.vmdk`,
        ]);
        const expected = await qemuRaw(`${dir}/disk.vmdk`, dir);
        const image = await openPath(`${dir}/disk.vmdk`);
        assertEquals(image.format, "vmdk");
        assertEquals(image.details?.subformat, subformat);
        assertEquals(image.size, expected.length);
        assertEquals(
          sha256Hex(await image.read(0, image.size)),
          sha256Hex(expected),
        );
        const sink = memorySink();
        await convert(image, sink);
        assertEquals(sha256Hex(sink.bytes()), sha256Hex(expected));
        await image.close?.();
      }),
  });
}

Deno.test({
  name: "qemu-io writes into each subformat read back as qemu-img reads them",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      for (const subformat of SUBFORMATS) {
        if (subformat === "streamOptimized") continue; // append-only in qemu
        const path = `${dir}/${subformat}.vmdk`;
        await run("qemu-img", [
          "create",
          "-f",
          "vmdk",
          "-o",
          `subformat=${subformat}`,
          path,
          "8M",
        ]);
        await qemuIo(
          "vmdk",
          path,
          "write -P 0xab 0 1M",
          "write -P 0x5c 3000k 70k",
          "write -P 0x01 8191k 1k",
        );
        const expected = await qemuRaw(path, dir);
        const image = await openPath(path);
        assertEquals(
          sha256Hex(await image.read(0, image.size)),
          sha256Hex(expected),
          subformat,
        );
        await image.close?.();
      }
    }),
});

Deno.test({
  name:
    "unallocated grains are unallocated, zeroed grains zero and written grains data",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      const path = `${dir}/z.vmdk`;
      await run("qemu-img", [
        "create",
        "-f",
        "vmdk",
        "-o",
        "zeroed_grain=on",
        path,
        "4M",
      ]);
      await qemuIo("vmdk", path, "write -P 0x11 0 128k", "write -z 0 64k");
      const image = await openPath(path);
      assertEquals(image.details?.zeroedGrains, true);
      const runs = [];
      for await (const e of image.extents(0, image.size)) runs.push(e);
      assertEquals(runs, [
        { offset: 0, length: 65536, kind: "zero" },
        { offset: 65536, length: 65536, kind: "data" },
        { offset: 131072, length: (4 << 20) - 131072, kind: "unallocated" },
      ]);
      const expected = await qemuRaw(path, dir);
      assertEquals(
        sha256Hex(await image.read(0, image.size)),
        sha256Hex(expected),
      );
      await image.close?.();
    }),
});

Deno.test({
  name:
    "the version-3 reference image has its listed size and contents (16 GiB streamed)",
  ignore: skip([], true),
  fn: async () => {
    const entry = referenceImages().find((i) =>
      i.path === "qemu-iotests/iotest-version3.vmdk.bz2"
    )!;
    const bytes = (await referenceBytes(entry.path))!;
    const image = await open(fromBytes(bytes));
    assertEquals(image.format, "vmdk");
    assertEquals(image.size, entry.virtual_size);
    assertEquals(image.details?.version, 3);
    // Hashing 16 GiB: data runs are read, zero runs hashed from one buffer.
    const hash = createHash("sha256");
    const zeros = new Uint8Array(8 << 20);
    for await (const e of image.extents(0, image.size)) {
      for (let at = e.offset; at < e.offset + e.length;) {
        const n = Math.min(zeros.length, e.offset + e.length - at);
        hash.update(
          e.kind === "data" ? await image.read(at, n) : zeros.subarray(0, n),
        );
        at += n;
      }
    }
    assertEquals(hash.digest("hex"), entry.raw_sha256);
  },
});

Deno.test({
  name:
    "the fuzzed afl9 reference fails with 'L1 size too big' and no large allocation",
  ignore: skip([], true),
  fn: async () => {
    const bytes = (await referenceBytes("qemu-iotests/afl9.vmdk.bz2"))!;
    const before = Deno.memoryUsage().rss;
    await rejects(
      () => open(fromBytes(bytes)),
      ImageFormatError,
      /L1 size too big/,
    );
    assertTrue(Deno.memoryUsage().rss - before < 64 << 20);
  },
});

for (const subformat of ["monolithicSparse", "streamOptimized"]) {
  Deno.test({
    name:
      `our ${subformat} output passes qemu-img compare, qemu-img check and vmdkinfo`,
    ignore: skip(["qemu-img", "vmdkinfo"]),
    fn: () =>
      withTemp(async (dir) => {
        const disk = sampleDisk((3 << 20) + (5 << 16));
        await Deno.writeFile(`${dir}/src.raw`, disk);
        const out = await createOutputFile(`${dir}/out.vmdk`);
        await convert(fromBytes(disk), out, {
          format: "vmdk",
          options: { subformat },
        });
        await out.commit();
        await assertQemuIdentical(`${dir}/src.raw`, `${dir}/out.vmdk`, "vmdk");
        await run("qemu-img", ["check", `${dir}/out.vmdk`]);
        const info = await run("vmdkinfo", [`${dir}/out.vmdk`]);
        assertMatch(
          info.text,
          subformat === "streamOptimized"
            ? /Stream optimized/
            : /Monolithic sparse/,
        );
        const image = await openPath(`${dir}/out.vmdk`);
        assertEquals(image.details?.subformat, subformat);
        assertEquals(
          sha256Hex(await image.read(0, image.size)),
          sha256Hex(disk),
        );
        assertEquals(await kinds(image), ["data", "unallocated"]);
        await image.close?.();
      }),
  });
}

Deno.test({
  name: "convert -c picks streamOptimized when no subformat is given",
  fn: async () => {
    const sink = memorySink();
    await convert(fromBytes(sampleDisk(1 << 20)), sink, {
      format: "vmdk",
      compress: true,
    });
    const image = await open(fromBytes(sink.bytes()));
    assertEquals(image.details?.subformat, "streamOptimized");
    assertEquals(image.details?.footer, true);
  },
});

Deno.test({
  name: "random writes through create land where qemu-img reads them",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const size = 6 << 20;
      const expected = new Uint8Array(size);
      const out = await createOutputFile(`${dir}/rw.vmdk`);
      const image = await vmdk.create!(out, { size });
      const writes: [number, number][] = [
        [5 << 20, 70000],
        [100, 3000],
        [65536 - 10, 20],
        [1 << 20, 1 << 20],
        [2000, 100],
        [(6 << 20) - 512, 512],
      ];
      let seed = 3;
      for (const [at, n] of writes) {
        const bytes = pseudoRandom(n, seed++);
        expected.set(bytes, at);
        await image.write!(at, bytes);
      }
      assertEquals(sha256Hex(await image.read(0, size)), sha256Hex(expected));
      await image.flush!();
      await out.commit();
      await Deno.writeFile(`${dir}/expected.raw`, expected);
      await assertQemuIdentical(
        `${dir}/expected.raw`,
        `${dir}/rw.vmdk`,
        "vmdk",
      );
      await run("qemu-img", ["check", `${dir}/rw.vmdk`]);
    }),
});

Deno.test({
  name: "a qemu-img image opened writable takes writes qemu-img then reads",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const path = `${dir}/w.vmdk`;
      await run("qemu-img", ["create", "-f", "vmdk", path, "4M"]);
      const file = await fromFile(path, { write: true });
      const image = await open(file, { writable: true, sink: file });
      const bytes = pseudoRandom(100000, 9);
      await image.write!(300000, bytes);
      await image.flush!();
      await file.close();
      const raw = await qemuRaw(path, dir);
      assertEquals(sha256Hex(raw.subarray(300000, 400000)), sha256Hex(bytes));
      assertTrue(raw.subarray(0, 300000).every((b) => b === 0));
    }),
});

Deno.test({
  name: "a child image names its parent and reads through it when allowed",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      await run("qemu-img", ["create", "-f", "vmdk", `${dir}/base.vmdk`, "2M"]);
      await qemuIo("vmdk", `${dir}/base.vmdk`, "write -P 0x77 0 1M");
      await run("qemu-img", [
        "create",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        `${dir}/child.vmdk`,
      ]);
      await qemuIo("vmdk", `${dir}/child.vmdk`, "write -P 0x22 512k 64k");
      const expected = await qemuRaw(`${dir}/child.vmdk`, dir);
      const alone = await open(await fromFile(`${dir}/child.vmdk`));
      assertEquals(alone.backingFile, "base.vmdk");
      assertEquals(alone.backingFormat, "vmdk");
      assertMatch(String(alone.details?.parentCID), /^[0-9a-f]+$/);
      await alone.close?.();
      const image = await open(await fromFile(`${dir}/child.vmdk`), {
        resolveBacking: (name) => fromFile(`${dir}/${name}`),
      });
      assertEquals(
        sha256Hex(await image.read(0, image.size)),
        sha256Hex(expected),
      );
    }),
});

Deno.test({
  name: "images are recognised by the KDMV magic and by a text descriptor",
  fn: async () => {
    assertEquals(
      (await probe(fromBytes(await smallSparse())))[0].format,
      "vmdk",
    );
    const text = new TextEncoder().encode(
      '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 8 FLAT "x-flat.vmdk" 0\n',
    );
    assertEquals((await probe(fromBytes(text)))[0].format, "vmdk");
    assertEquals(
      (await probe(fromBytes(new Uint8Array(4096))))[0].format,
      "raw",
    );
  },
});

function descriptor(extents: string, createType = "monolithicFlat") {
  return new TextEncoder().encode(
    `# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="${createType}"\n\n${extents}\n`,
  );
}

Deno.test({
  name: "a descriptor opened without a file resolver names the extent it needs",
  fn: async () => {
    await rejects(
      () => open(fromBytes(descriptor('RW 2048 FLAT "disk-flat.vmdk" 0'))),
      ImageFormatError,
      /extent file "disk-flat.vmdk" needs a file resolver/,
    );
  },
});

Deno.test({
  name: "extent names leaving the descriptor's folder are refused",
  fn: async () => {
    const resolveFile = () =>
      Promise.resolve(fromBytes(new Uint8Array(1 << 20)));
    for (const name of ["../secret", "/etc/passwd", "a/../../b", "C:\\x"]) {
      await rejects(
        () =>
          open(fromBytes(descriptor(`RW 2048 FLAT "${name}" 0`)), {
            resolveFile,
          }),
        ImageFormatError,
        /inside the descriptor's folder/,
      );
    }
  },
});

Deno.test({
  name: "the file resolver refuses names and symlinks that leave the folder",
  fn: () =>
    withTemp(async (dir) => {
      await Deno.mkdir(`${dir}/img`);
      await Deno.writeFile(`${dir}/outside`, new Uint8Array(1 << 20));
      await Deno.symlink(`${dir}/outside`, `${dir}/img/link-flat.vmdk`);
      const resolve = fileResolver(`${dir}/img/disk.vmdk`);
      await rejects(
        () => resolve("../outside"),
        BackingFileError,
        /outside its folder/,
      );
      await rejects(
        () => resolve(`${dir}/outside`),
        BackingFileError,
        /outside its folder/,
      );
      await rejects(
        () => resolve("link-flat.vmdk"),
        BackingFileError,
        /leads outside/,
      );
      await Deno.writeFile(`${dir}/img/ok-flat.vmdk`, new Uint8Array(1 << 20));
      const file = await resolve("ok-flat.vmdk");
      assertEquals(file.size, 1 << 20);
      await file.close();
    }),
});

Deno.test({
  name:
    "a descriptor with ZERO extents and several flat extents reads in order",
  fn: async () => {
    const a = new Uint8Array(4096).fill(1);
    const b = new Uint8Array(8192).fill(2);
    const files: Record<string, Source> = {
      "a.vmdk": fromBytes(a),
      "b.vmdk": fromBytes(b),
    };
    const image = await open(
      fromBytes(
        descriptor(
          'RW 8 FLAT "a.vmdk" 0\nRW 4 ZERO\nRDONLY 8 FLAT "b.vmdk" 8',
          "twoGbMaxExtentFlat",
        ),
      ),
      { resolveFile: (name) => Promise.resolve(files[name]) },
    );
    assertEquals(image.size, 20 * 512);
    const bytes = await image.read(0, image.size);
    assertTrue(bytes.subarray(0, 4096).every((x) => x === 1));
    assertTrue(bytes.subarray(4096, 6144).every((x) => x === 0));
    assertTrue(bytes.subarray(6144).every((x) => x === 2));
    const runs = [];
    for await (const e of image.extents(0, image.size)) runs.push(e.kind);
    assertEquals(runs, ["data", "zero", "data"]);
  },
});

Deno.test({
  name:
    "a flat extent shorter than its descriptor line is refused, not zero-padded",
  fn: async () => {
    // 16 sectors declared from sector 2, 8 KiB + 1 KiB present: one sector short.
    const files: Record<string, Source> = {
      "a.vmdk": fromBytes(new Uint8Array(17 * 512).fill(1)),
    };
    await rejects(
      () =>
        open(fromBytes(descriptor('RW 16 FLAT "a.vmdk" 2', "monolithicFlat")), {
          resolveFile: (name) => Promise.resolve(files[name]),
        }),
      ImageFormatError,
      /flat extent "a\.vmdk" size 8704 must be at least 9216 bytes/,
    );
  },
});

// ---------------------------------------------------------------------------
// Malformed input (qemu-iotests 059 and beyond)

Deno.test({
  name: "a grain size of 0 or above 1 GiB is refused naming grainSize",
  fn: async () => {
    for (const v of [0n, 0x200001n]) {
      const b = await smallSparse();
      poke64(b, 20, v);
      await rejects(() => open(fromBytes(b)), ImageFormatError, /grainSize/);
    }
  },
});

Deno.test({
  name: "numGTEsPerGT of 0 or above 512 is refused",
  fn: async () => {
    for (const v of [0, 513, 0xffffffff]) {
      const b = await smallSparse();
      poke32(b, 44, v);
      await rejects(
        () => open(fromBytes(b)),
        ImageFormatError,
        /numGTEsPerGT \d+ must be between 1 and 512/,
      );
    }
  },
});

Deno.test({
  name:
    "a smaller numGTEsPerGT is read as QEMU reads it (a different table shape)",
  fn: async () => {
    const b = await smallSparse();
    poke32(b, 44, 256);
    // The GD now needs twice the entries; it still fits (QEMU accepts it too).
    const image = await open(fromBytes(b));
    await image.read(0, image.size);
  },
});

Deno.test({
  name: "a capacity needing more than 32M grain tables is 'L1 size too big'",
  fn: async () => {
    const b = await smallSparse();
    poke64(b, 12, 1n << 50n);
    await rejects(
      () => open(fromBytes(b)),
      ImageFormatError,
      /L1 size too big/,
    );
  },
});

Deno.test({
  name: "a grain directory that does not fit in the file is refused",
  fn: async () => {
    const b = await smallSparse();
    poke64(b, 12, 1n << 40n); // 512 TiB: 1M grain tables, 4 MiB of GD
    await rejects(() => open(fromBytes(b)), ImageFormatError, /gdOffset/);
  },
});

Deno.test({
  name: "a descriptor above 1 MiB is refused as too big",
  fn: async () => {
    const b = await smallSparse();
    poke64(b, 36, 4096n);
    await rejects(
      () => open(fromBytes(b)),
      ImageFormatError,
      /descriptor too big/,
    );
    const text = new Uint8Array((1 << 20) + 1).fill(0x20);
    text.set(descriptor('RW 8 FLAT "a" 0'));
    await rejects(
      () => open(fromBytes(text), { format: "vmdk" }),
      ImageFormatError,
      /descriptor too big/,
    );
  },
});

Deno.test({
  name: "versions other than 1-3 and unknown compression are unsupported",
  fn: async () => {
    const b = await smallSparse();
    poke32(b, 4, 4);
    await rejects(() => open(fromBytes(b)), UnsupportedError, /version 4/);
    const c = await smallSparse();
    c[77] = 7;
    await rejects(
      () => open(fromBytes(c)),
      UnsupportedError,
      /compressAlgorithm 7/,
    );
  },
});

Deno.test({
  name: "a grain table entry pointing outside the file is an error naming it",
  fn: async () => {
    const b = await smallSparse();
    const gdOffset = Number(new DataView(b.buffer).getBigUint64(56, true)) *
      512;
    const gt = peek32(b, gdOffset) * 512;
    poke32(b, gt, 0x7fffffff);
    const image = await open(fromBytes(b));
    await rejects(
      () => image.read(0, 512),
      ImageFormatError,
      /grain table entry 0 of grain table 0 2147483647/,
    );
  },
});

Deno.test({
  name: "a compressed grain whose marker size is too big or corrupt is refused",
  fn: async () => {
    const b = await smallStream();
    const first = 65536; // our writer's first grain sits after 64 KiB of header
    poke32(b, first + 8, 1 << 30);
    const image = await open(fromBytes(b));
    await rejects(
      () => image.read(0, 512),
      ImageFormatError,
      /grain marker size/,
    );
    const c = await smallStream();
    c.fill(0xee, first + 12, first + 40);
    const broken = await open(fromBytes(c));
    await rejects(
      () => broken.read(0, 512),
      ImageFormatError,
      /compressed grain/,
    );
  },
});

Deno.test({
  name: "readInto gives the bytes read gives, over a buffer holding old bytes",
  fn: async () => {
    const size = 1 << 20;
    const disk = sampleDisk(size);
    for (const bytes of [await smallStream(size), await smallSparse(size)]) {
      const image = await open(fromBytes(bytes));
      for (
        const [at, n] of [[0, size], [1000, 200_000], [3 << 16, 1 << 16], [
          (1 << 16) + 7,
          1 << 16,
        ]]
      ) {
        const into = new Uint8Array(n).fill(0xee);
        await image.readInto!(at, into);
        assertEquals(into, disk.subarray(at, at + n));
      }
    }
  },
});

Deno.test({
  name: "readInto refuses a corrupt compressed grain, naming it",
  fn: async () => {
    const c = await smallStream();
    c.fill(0xee, 65536 + 12, 65536 + 40);
    const broken = await open(fromBytes(c));
    await rejects(
      () => broken.readInto!(0, new Uint8Array(1 << 20)),
      ImageFormatError,
      /compressed grain at sector 128/,
    );
  },
});

Deno.test({
  name: "a streamOptimized image without its footer is refused",
  fn: async () => {
    const b = await smallStream();
    await rejects(
      () => open(fromBytes(b.subarray(0, b.length - 512))),
      ImageFormatError,
      /footer/,
    );
  },
});

Deno.test({
  name: "a damaged primary grain directory falls back to the redundant one",
  fn: async () => {
    const b = await smallSparse();
    poke64(b, 56, 0n);
    const image = await open(fromBytes(b));
    assertMatch(String(image.details?.grainDirectory), /redundant/);
    assertEquals(
      sha256Hex(await image.read(0, image.size)),
      sha256Hex(sampleDisk(1 << 20)),
    );
  },
});

Deno.test({
  name: "truncated images fail with a clear error, never a crash",
  fn: async () => {
    const b = await smallSparse();
    for (const n of [0, 3, 100, 511, 600, 20000, b.length - 1000]) {
      const cut = b.subarray(0, n);
      // Every cut loses a header, a table or a grain: reading all of it
      // must fail, never come back zero-padded.
      await rejects(
        async () => {
          const image = await open(fromBytes(cut), { format: "vmdk" });
          await image.read(0, image.size);
        },
        ImageFormatError,
      );
    }
  },
});

Deno.test({
  name: "random header pokes give typed errors or valid reads, quickly",
  fn: async () => {
    const base = await smallStream(256 << 10);
    const random = pseudoRandom(4000, 11);
    for (let i = 0; i < 1000; i++) {
      const b = base.slice();
      const at = random[i * 4] % 80;
      b[at] = random[i * 4 + 1];
      if (i % 2) {
        b[base.length - 1024 + (random[i * 4 + 2] % 80)] = random[i * 4 + 3];
      }
      try {
        const image = await open(fromBytes(b), { format: "vmdk" });
        await image.read(0, Math.min(image.size, 256 << 10));
      } catch (e) {
        assertTrue(e instanceof ImageFormatError, `poke ${at}: ${e}`);
      }
    }
  },
});

Deno.test({
  name: "qemu-iotests 059: the reference images other than afl9 still open",
  ignore: skip([], true),
  fn: () =>
    withTemp(async (dir) => {
      for (const entry of referenceImages()) {
        if (entry.format !== "vmdk" || entry.corrupt) continue;
        const path = (await referenceFile(entry.path, dir))!;
        const image = await openPath(path);
        assertEquals(image.size, entry.virtual_size);
        await image.close?.();
      }
    }),
});

Deno.test({
  name:
    "the CLI reads descriptor vmdks with their extent files beside them, also as the backing file of a qcow in another folder",
  ignore: skip(["qemu-img", "qemu-io"]),
  async fn() {
    await withTemp(async (dir) => {
      await Deno.mkdir(`${dir}/base`);
      const base = `${dir}/base/disk.vmdk`;
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        base,
        "8M",
      ]);
      await run("qemu-io", ["-c", "write -P 0x5a 1M 2M", base]);
      const top = `${dir}/top.qcow`;
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        "base/disk.vmdk",
        "-F",
        "vmdk",
        top,
      ]);
      await run("qemu-io", ["-c", "write -P 0xa5 2M 64k", top]);
      for (const image of [base, top]) {
        const expected = `${dir}/expected.raw`;
        await run("qemu-img", ["convert", "-O", "raw", image, expected]);
        const ours = `${dir}/ours.raw`;
        const r = await cli(["convert", image, ours]);
        assertEquals(r.code, 0, r.stderr);
        assertEquals(await Deno.readFile(ours), await Deno.readFile(expected));
      }
    });
  },
});

Deno.test({
  name:
    "without a native inflater (browsers) a read of a streamOptimized vmdk's grains is one file read and one decode-worker call (one per worker in convert's readInto), with qemu-img's bytes; a bad grain is named",
  ignore: skip(["qemu-img"]),
  async fn() {
    await withTemp(async (dir) => {
      // 2 MiB of text-like bytes, 2 MiB of zeros, 2 MiB of random bytes.
      const MIB = 1 << 20;
      const disk = new Uint8Array(6 * MIB);
      const words = new TextEncoder().encode(
        Array.from({ length: 300_000 }, (_, i) => `w${(i * 7919) % 4099}`)
          .join(" "),
      );
      disk.set(words.subarray(0, 2 * MIB));
      disk.set(pseudoRandom(2 * MIB, 7), 4 * MIB);
      const input = `${dir}/disk.raw`;
      await Deno.writeFile(input, disk);
      const image = `${dir}/disk.vmdk`;
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        input,
        image,
      ]);
      const expected = `${dir}/expected.raw`;
      await run("qemu-img", ["convert", "-O", "raw", image, expected]);
      const child = (path: string, env: Record<string, string> = {}) =>
        new Deno.Command(Deno.execPath(), {
          args: [
            "run",
            "-A",
            new URL("./_vmdk_pooled_read.ts", import.meta.url).pathname,
            path,
            expected,
            String(2 * MIB),
          ],
          env,
          stdout: "piped",
          stderr: "piped",
        }).output().then((o) => {
          if (!o.success) throw new Error(new TextDecoder().decode(o.stderr));
          return JSON.parse(new TextDecoder().decode(o.stdout));
        });
      const got = await child(image);
      assertEquals(got.nativeInflate, "undefined");
      type Read = {
        at: number;
        sourceReads: number;
        workerCalls: number;
        same: boolean;
      };
      const reads = got.reads as Read[];
      assertEquals(reads.map((r) => r.same), [true, true, true]);
      // The first read also loads the grain table; the zeros read nothing.
      assertEquals(reads.map((r) => r.sourceReads), [2, 0, 1]);
      assertEquals(reads.map((r) => r.workerCalls), [1, 0, 1]);
      // Convert's path (readInto): a read's grains spread over every
      // decode worker, one call each, into the caller's buffer.
      const workers = Math.min(4, Math.max(1, navigator.hardwareConcurrency));
      const into = (await child(image, { INTO: "1" })).reads as Read[];
      assertEquals(into.map((r) => r.same), [true, true, true]);
      assertEquals(into.map((r) => r.sourceReads), [2, 0, 1]);
      assertEquals(into.map((r) => r.workerCalls), [workers, 0, workers]);

      // A grain whose deflate bytes are poked: the workers fail, the read
      // is done again here and names the grain.
      const bytes = await Deno.readFile(image);
      const overHead = Number(
        new DataView(bytes.buffer).getBigUint64(64, true),
      );
      const grain = overHead * 512;
      bytes.fill(0xff, grain + 12 + 40, grain + 12 + 72);
      const bad = `${dir}/bad.vmdk`;
      await Deno.writeFile(bad, bytes);
      const bads: Record<string, string>[] = [{ BAD: "1" }, {
        BAD: "1",
        INTO: "1",
      }];
      for (const env of bads) {
        const failed = await child(bad, env);
        assertMatch(
          failed.error,
          new RegExp(
            `^ImageFormatError: .*compressed grain at sector ${overHead}`,
          ),
        );
      }
    });
  },
});

Deno.test(
  "a monolithicFlat vmdk's data runs say where they lie in its extent file, and map names that file as qemu-img does; several flat files give none",
  { ignore: skip(["qemu-img", "qemu-io"]) },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/flat.vmdk`;
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        path,
        "8M",
      ]);
      await qemuIo("vmdk", path, "write -P 7 1M 1M");
      const image = await openPath(path);
      const runs = [];
      for await (const e of image.extents(0, image.size)) runs.push(e);
      await image.close?.();
      assertEquals(runs, [
        { offset: 0, length: 8 << 20, kind: "data", fileOffset: 0 },
      ]);
      const ours = await cli(["map", path]);
      const theirs = await run("qemu-img", ["map", path]);
      assertEquals(ours.code, 0, ours.stderr);
      const files = (text: string) =>
        new Set(text.trim().split("\n").slice(1).map((l) => l.split(/\s+/)[3]));
      assertEquals(files(ours.text), files(theirs.text));
      assertEquals([...files(ours.text)], [`${dir}/flat-flat.vmdk`]);
      // Two flat extent files: convert reads them (no fileOffset).
      await Deno.writeFile(`${dir}/a.bin`, new Uint8Array(4096));
      await Deno.writeFile(`${dir}/b.bin`, new Uint8Array(4096));
      await Deno.writeTextFile(
        `${dir}/two.vmdk`,
        '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 8 FLAT "a.bin" 0\nRW 8 FLAT "b.bin" 0\n',
      );
      const two = await openPath(`${dir}/two.vmdk`);
      for await (const e of two.extents(0, two.size)) {
        assertEquals(e.fileOffset, undefined);
      }
      await two.close?.();
    }),
);
