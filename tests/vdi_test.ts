import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  BackingFileError,
  convert,
  createOutputFile,
  fromBytes,
  fromFile,
  ImageFormatError,
  memorySink,
  open,
  probe,
  UnsupportedError,
  vdi,
} from "../mod.ts";
import {
  assertBoundedWork,
  assertQemuIdentical,
  cli,
  countingSource,
  pseudoRandom,
  qemuIo,
  readAll,
  rejects,
  run,
  runs,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";
import { qemuRaw } from "./_layers.ts";

/** A disk of `size` bytes: pseudo-random 64 KiB runs with holes between. */
function sampleDisk(size: number, seed = 5): Uint8Array<ArrayBuffer> {
  const disk = new Uint8Array(size);
  const random = pseudoRandom(size, seed);
  for (let at = 0; at < size; at += 65536) {
    if ((at / 65536) % 5 < 2) {
      disk.set(random.subarray(at, Math.min(size, at + 65536)), at);
    }
  }
  return disk;
}

for (
  const [isStatic, extra] of [
    ["off", ""],
    ["on", ""],
    ["off", ",preallocation=full"],
  ]
) {
  Deno.test({
    name:
      `a vdi qemu-img converts with static=${isStatic}${extra} reads as qemu-img's raw bytes`,
    ignore: skip(["qemu-img"]),
    fn: () =>
      withTemp(async (dir) => {
        const disk = sampleDisk((5 << 20) + 3 * 512, 3);
        await Deno.writeFile(`${dir}/src.raw`, disk);
        await run("qemu-img", [
          "convert",
          "-f",
          "raw",
          "-O",
          "vdi",
          "-o",
          `static=${isStatic}${extra}`,
          `${dir}/src.raw`,
          `${dir}/d.vdi`,
        ]);
        const expected = await qemuRaw(`${dir}/d.vdi`, dir, "vdi");
        const source = await fromFile(`${dir}/d.vdi`);
        assertEquals((await probe(source))[0].format, "vdi");
        const image = await open(source);
        assertEquals(image.format, "vdi");
        assertEquals(image.size, expected.length);
        assertEquals(
          image.details?.imageType,
          isStatic === "on" ? "static" : "dynamic",
        );
        assertEquals(sha256Hex(await readAll(image)), sha256Hex(expected));
        const sink = memorySink();
        await convert(image, sink);
        assertEquals(sha256Hex(sink.bytes()), sha256Hex(expected));
        await image.close?.();
      }),
  });
}

Deno.test({
  name:
    "a vdi written by qemu-io (data, holes, zero writes, rewrites) reads as qemu-img's raw bytes",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      const path = `${dir}/d.vdi`;
      await run("qemu-img", ["create", "-f", "vdi", path, "9M"]);
      await qemuIo(
        "vdi",
        path,
        "write -P 0x11 0 512",
        "write -P 0x22 3145728 65536",
        "write -z 5242880 1048576",
        "write -P 0x33 7340032 4096",
        "write -P 0x44 3146240 1024", // a rewrite inside a stored block
        "write -z 7340032 512", // zeros over data
        "write -P 0x55 9436672 512", // the last sector
      );
      const expected = await qemuRaw(path, dir, "vdi");
      const image = await open(await fromFile(path));
      assertEquals(image.size, 9 << 20);
      assertEquals(sha256Hex(await readAll(image)), sha256Hex(expected));
      const kinds = (await runs(image)).map((e) => e.kind);
      assertTrue(kinds.includes("unallocated") && kinds.includes("data"));
      // readInto, across block boundaries, gives the same bytes.
      const into = new Uint8Array(3 << 20);
      await image.readInto!(2 << 20, into);
      assertEquals(
        sha256Hex(into),
        sha256Hex(expected.subarray(2 << 20, 5 << 20)),
      );
      await image.close?.();
    }),
});

/** A small vdi made by our writer, its bytes and the disk it holds. */
async function smallVdi(): Promise<{ bytes: Uint8Array; disk: Uint8Array }> {
  const sink = memorySink();
  const image = await vdi.create!(sink, {
    size: 4 << 20,
    options: { block_size: "65536" },
  });
  const disk = new Uint8Array(4 << 20);
  const data = pseudoRandom(100_000, 7);
  disk.set(data, 70_000);
  await image.write!(70_000, data);
  await image.flush!();
  return { bytes: sink.bytes().slice(), disk };
}

Deno.test("a discarded block (0xFFFFFFFE) reads as zeros and maps as zero", async () => {
  const { bytes, disk } = await smallVdi();
  const v = new DataView(bytes.buffer);
  const bmap = v.getUint32(340, true);
  // Block 1 (64 KiB .. 128 KiB) holds data; discard it.
  v.setUint32(bmap + 4, 0xfffffffe, true);
  disk.fill(0, 65536, 131072);
  const image = await open(fromBytes(bytes));
  assertEquals(sha256Hex(await readAll(image)), sha256Hex(disk));
  const map = await runs(image);
  assertTrue(
    map.some((e) => e.kind === "zero" && e.offset === 65536),
    JSON.stringify(map),
  );
});

Deno.test("a differencing vdi says so, and refuses its parent's bytes unless the parent is named", async () => {
  const base = await smallVdi();
  const top = await smallVdi();
  const v = new DataView(top.bytes.buffer);
  v.setUint32(76, 4, true);
  top.bytes.set(base.bytes.subarray(392, 408), 424); // uuid_link
  const image = await open(fromBytes(top.bytes));
  assertEquals(image.details?.differencing, true);
  assertEquals(image.backingFile, undefined);
  // Its own blocks read; a free block is the parent's.
  assertEquals(
    sha256Hex(await image.read(70_000, 1000)),
    sha256Hex(top.disk.subarray(70_000, 71_000)),
  );
  await rejects(() => image.read(0, 4096), BackingFileError, /parent/);
  // Named, the parent is followed through the registry's policy.
  const followed = await open(fromBytes(top.bytes), {
    options: { parent: "base.vdi" },
    resolveBacking: (name) => {
      assertEquals(name, "base.vdi");
      return Promise.resolve(fromBytes(base.bytes));
    },
  });
  assertEquals(followed.backingFile, "base.vdi");
  assertEquals(sha256Hex(await readAll(followed)), sha256Hex(top.disk));
});

Deno.test("a vdi we create and write reads back, with free blocks as zeros", async () => {
  for (const isStatic of ["off", "on"]) {
    const sink = memorySink();
    const image = await vdi.create!(sink, {
      size: 3 << 20,
      options: { static: isStatic },
    });
    const disk = new Uint8Array(3 << 20);
    for (
      const [at, n, seed] of [[1000, 5000, 1], [2 << 20, 4096, 2], [
        (1 << 20) - 100,
        300,
        3,
      ]]
    ) {
      const data = pseudoRandom(n, seed);
      disk.set(data, at);
      await image.write!(at, data);
    }
    await image.flush!();
    const back = await open(fromBytes(sink.bytes()));
    assertEquals(
      back.details?.imageType,
      isStatic === "on" ? "static" : "dynamic",
    );
    assertEquals(sha256Hex(await readAll(back)), sha256Hex(disk));
  }
});

for (const isStatic of ["off", "on"]) {
  Deno.test({
    name:
      `a vdi we convert to (static=${isStatic}) passes qemu-img check and compare, and 7-Zip extracts it`,
    ignore: skip(["qemu-img", "7zz"]),
    fn: () =>
      withTemp(async (dir) => {
        const disk = sampleDisk((3 << 20) + 1536, 9);
        await Deno.writeFile(`${dir}/src.raw`, disk);
        const out = await createOutputFile(`${dir}/out.vdi`);
        await convert(fromBytes(disk), out, {
          format: "vdi",
          options: { static: isStatic },
        });
        await out.commit();
        await run("qemu-img", ["check", "-f", "vdi", `${dir}/out.vdi`]);
        await assertQemuIdentical(`${dir}/src.raw`, `${dir}/out.vdi`, "vdi");
        await run("7zz", ["x", "-y", `-o${dir}/x`, `${dir}/out.vdi`]);
        const names = [...Deno.readDirSync(`${dir}/x`)].map((e) => e.name);
        assertEquals(names.length, 1, names.join(","));
        const extracted = await Deno.readFile(`${dir}/x/${names[0]}`);
        // 7-Zip gives the whole disk (the size rounded to sectors).
        assertEquals(
          sha256Hex(extracted.subarray(0, disk.length)),
          sha256Hex(disk),
        );
        assertTrue(extracted.subarray(disk.length).every((b) => b === 0));
      }),
  });
}

Deno.test({
  name: "the CLI creates a vdi that qemu-img check accepts",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const r = await run(Deno.execPath(), [
        "run",
        "-A",
        new URL("../cli.ts", import.meta.url).pathname,
        "create",
        "-f",
        "vdi",
        `${dir}/c.vdi`,
        "5M",
      ], { allowFail: true });
      assertEquals(r.code, 0, r.stderr);
      await run("qemu-img", ["check", "-f", "vdi", `${dir}/c.vdi`]);
      const info = JSON.parse(
        (await run("qemu-img", [
          "info",
          "--output=json",
          `${dir}/c.vdi`,
        ])).text,
      );
      assertEquals(info["virtual-size"], 5 << 20);
    }),
});

// Malformed input: each is one typed error, with bounded work.

async function refused(bytes: Uint8Array, pattern: RegExp) {
  const counted = countingSource(bytes);
  await rejects(
    async () => {
      const image = await open(counted.source, { format: "vdi" });
      await readAll(image);
    },
    ImageFormatError,
    pattern,
  );
  assertBoundedWork(counted, bytes.length);
}

function poked(
  bytes: Uint8Array,
  at: number,
  value: number | bigint,
): Uint8Array {
  const out = bytes.slice();
  const v = new DataView(out.buffer);
  if (typeof value === "bigint") v.setBigUint64(at, value, true);
  else v.setUint32(at, value, true);
  return out;
}

Deno.test("a vdi block size of 0, not a power of two or huge is refused", async () => {
  const { bytes } = await smallVdi();
  for (const size of [0, 1000, 0x80000000, 0xffffffff]) {
    await refused(poked(bytes, 376, size), /block_size/);
  }
});

Deno.test("a vdi blocks_in_image too small, huge or past the file is refused", async () => {
  const { bytes } = await smallVdi();
  await refused(poked(bytes, 384, 3), /disk_size/);
  await refused(poked(bytes, 384, 0xffffffff), /blocks_in_image/);
  await refused(poked(bytes, 384, 0x10000000), /blocks_in_image/);
  await refused(poked(bytes, 368, 1n << 60n), /disk_size/);
});

Deno.test("a vdi block map entry outside the file or used twice is refused", async () => {
  const { bytes } = await smallVdi();
  const bmap = new DataView(bytes.buffer).getUint32(340, true);
  await refused(poked(bytes, bmap + 4, 60), /block map\[1\]/);
  await refused(poked(bytes, bmap + 4, 0x7fffffff), /block map\[1\]/);
  const first = new DataView(bytes.buffer).getUint32(bmap + 4, true);
  await refused(poked(bytes, bmap + 12, first), /used|uses/);
});

Deno.test("a vdi with a bad signature, version, offsets or sector size is refused", async () => {
  const { bytes } = await smallVdi();
  await refused(poked(bytes, 68, 0x00010000), /version/);
  await refused(poked(bytes, 340, 0xffffff00), /offset_bmap/);
  await refused(poked(bytes, 344, 0x100), /offset_data/);
  await refused(poked(bytes, 360, 4096), /sector_size/);
  await refused(poked(bytes, 72, 0x10000000), /header_size/);
  await refused(poked(bytes, 380, 512), /block_extra/);
  await refused(bytes.subarray(0, 300), /file size/);
  // Truncated inside the stored blocks.
  await refused(
    bytes.subarray(0, bytes.length - 1000),
    /block map|read offset/,
  );
  // A signature with a broken header is vdi's error, not raw.
  const broken = poked(bytes, 376, 0);
  assertEquals((await probe(fromBytes(broken)))[0].format, "vdi");
});

/** Two parents and a raw disk for the differencing tests: base.vdi (qemu-img), mod.raw. */
async function differencingFiles(dir: string) {
  const size = 6 << 20;
  const base = sampleDisk(size, 11);
  await Deno.writeFile(`${dir}/base.raw`, base);
  await run("qemu-img", [
    "convert",
    "-f",
    "raw",
    "-O",
    "vdi",
    `${dir}/base.raw`,
    `${dir}/base.vdi`,
  ]);
  // What the differencing image holds: a few changes over the base, one
  // of them part of a block (the rest of that block is the base's).
  const mod = base.slice();
  mod.set(pseudoRandom(5000, 12), 100_000);
  mod.fill(0, 50 * 65536, 51 * 65536); // data in the base
  mod.set(pseudoRandom(512, 13), size - 512);
  await Deno.writeFile(`${dir}/mod.raw`, mod);
  return { size, base, mod };
}

Deno.test({
  name:
    "convert -O vdi -B writes a differencing vdi linked by UUID, read back only with --parent naming that parent",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const { mod } = await differencingFiles(dir);
      const made = await cli([
        "convert",
        "-O",
        "vdi",
        "-B",
        "base.vdi",
        `${dir}/mod.raw`,
        `${dir}/top.vdi`,
      ]);
      assertEquals(made.code, 0, made.stderr);
      // The header as VDICore.h describes a differencing image: type 4,
      // uuid_link the parent's uuid_image, uuid_parent its modification UUID.
      const top = await Deno.readFile(`${dir}/top.vdi`);
      const base = await Deno.readFile(`${dir}/base.vdi`);
      const view = new DataView(top.buffer);
      assertEquals(view.getUint32(76, true), 4);
      assertEquals(top.subarray(424, 440), base.subarray(392, 408));
      assertEquals(top.subarray(440, 456), base.subarray(408, 424));
      // Only the blocks that differ are stored.
      assertEquals(view.getUint32(388, true), 3);
      // info: differencing, and the parent must be named.
      const info = await cli(["info", "--output=json", `${dir}/top.vdi`]);
      assertEquals(info.code, 0, info.stderr);
      const facts = JSON.parse(info.text);
      assertEquals(facts["format-specific"]?.data?.differencing ?? true, true);
      assertTrue(/--parent FILE/.test(info.text), info.text);
      // Without --parent, reading it fails saying how to name the parent.
      const unnamed = await cli([
        "convert",
        `${dir}/top.vdi`,
        `${dir}/out.raw`,
      ]);
      assertEquals(unnamed.code !== 0, true);
      assertTrue(/--parent FILE/.test(unnamed.stderr), unnamed.stderr);
      // Named, from any folder (a path relative to the working folder).
      const named = await cli([
        "convert",
        "--parent",
        "base.vdi",
        "top.vdi",
        "out.raw",
      ], { cwd: dir });
      assertEquals(named.code, 0, named.stderr);
      assertEquals(
        await sha256File(`${dir}/out.raw`),
        sha256Hex(mod),
      );
      const same = await cli([
        "compare",
        "--parent",
        `${dir}/base.vdi`,
        `${dir}/top.vdi`,
        `${dir}/mod.raw`,
      ]);
      assertEquals(same.code, 0, same.text + same.stderr);
      const shown = await cli([
        "info",
        "--parent",
        `${dir}/base.vdi`,
        `${dir}/top.vdi`,
      ]);
      assertEquals(shown.code, 0, shown.stderr);
      assertTrue(/backing file: .*base\.vdi/.test(shown.text), shown.text);
      const map = await cli([
        "map",
        "--output=json",
        "--parent",
        `${dir}/base.vdi`,
        `${dir}/top.vdi`,
      ]);
      assertEquals(map.code, 0, map.stderr);
      const depths = new Set(
        JSON.parse(map.text).map((r: { depth: number }) => r.depth),
      );
      assertTrue(depths.has(0) && depths.has(1), map.text);
      // qemu-img's reading of the parent agrees with ours under the top.
      await assertQemuIdentical(`${dir}/base.raw`, `${dir}/base.vdi`, "vdi");
    }),
});

Deno.test({
  name:
    "--parent naming a vdi with another UUID is refused, as is --parent for an image that is not differencing",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      await differencingFiles(dir);
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "vdi",
        `${dir}/base.raw`,
        `${dir}/other.vdi`,
      ]);
      assertEquals(
        (await cli([
          "create",
          "-f",
          "vdi",
          "-b",
          "base.vdi",
          `${dir}/top.vdi`,
          "6M",
        ])).code,
        0,
      );
      for (const command of ["convert", "info", "compare"]) {
        const args = command === "convert"
          ? [`${dir}/top.vdi`, `${dir}/out.raw`]
          : command === "compare"
          ? [`${dir}/top.vdi`, `${dir}/base.raw`]
          : [`${dir}/top.vdi`];
        const wrong = await cli([
          command,
          "--parent",
          `${dir}/other.vdi`,
          ...args,
        ]);
        assertTrue(wrong.code !== 0, command);
        assertTrue(
          /links its parent by identity uuid [0-9a-f-]+, but .*other\.vdi \(vdi\) is uuid [0-9a-f-]+: refused/
            .test(wrong.stderr),
          wrong.stderr,
        );
      }
      const raw = await cli([
        "convert",
        "--parent",
        `${dir}/base.raw`,
        `${dir}/top.vdi`,
        `${dir}/out.raw`,
      ]);
      assertTrue(/carries no identity/.test(raw.stderr), raw.stderr);
      const notDiff = await cli([
        "info",
        "--parent",
        `${dir}/base.vdi`,
        `${dir}/other.vdi`,
      ]);
      assertTrue(
        notDiff.code !== 0 && /not a differencing vdi/.test(notDiff.stderr),
        notDiff.stderr,
      );
      const missing = await cli([
        "info",
        "--parent",
        `${dir}/nothing.vdi`,
        `${dir}/top.vdi`,
      ]);
      assertTrue(/no such file/.test(missing.stderr), missing.stderr);
    }),
});

Deno.test({
  name:
    "create -f vdi -b makes an empty differencing vdi that reads as its parent, and a chain of two reads with two --parent",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const { base, mod } = await differencingFiles(dir);
      const created = await cli([
        "create",
        "-f",
        "vdi",
        "-b",
        "base.vdi",
        `${dir}/empty.vdi`,
        "6M",
      ]);
      assertEquals(created.code, 0, created.stderr);
      const empty = await cli([
        "convert",
        "--parent",
        `${dir}/base.vdi`,
        `${dir}/empty.vdi`,
        `${dir}/empty.raw`,
      ]);
      assertEquals(empty.code, 0, empty.stderr);
      assertEquals(await sha256File(`${dir}/empty.raw`), sha256Hex(base));
      // A size other than the parent's is refused.
      const sized = await cli([
        "create",
        "-f",
        "vdi",
        "-b",
        "base.vdi",
        `${dir}/bad.vdi`,
        "7M",
      ]);
      assertTrue(/parent's size/.test(sized.stderr), sized.stderr);
      // mid.vdi over base.vdi, top.vdi over mid.vdi.
      const mid = base.slice();
      mid.set(pseudoRandom(70_000, 21), 2 << 20);
      await Deno.writeFile(`${dir}/mid.raw`, mid);
      for (
        const [input, output, parents] of [
          ["mid.raw", "mid.vdi", ["base.vdi"]],
          ["mod.raw", "top.vdi", ["mid.vdi", "base.vdi"]],
        ] as const
      ) {
        const made = await cli([
          "convert",
          "-O",
          "vdi",
          "-B",
          parents[0],
          ...parents.slice(1).flatMap((p) => ["--parent", `${dir}/${p}`]),
          `${dir}/${input}`,
          `${dir}/${output}`,
        ]);
        assertEquals(made.code, 0, made.stderr);
      }
      const chain = await cli([
        "convert",
        "--parent",
        `${dir}/mid.vdi`,
        "--parent",
        `${dir}/base.vdi`,
        `${dir}/top.vdi`,
        `${dir}/top.raw`,
      ]);
      assertEquals(chain.code, 0, chain.stderr);
      assertEquals(await sha256File(`${dir}/top.raw`), sha256Hex(mod));
      // One --parent for a chain of two: the middle's parent is not named.
      const short = await cli([
        "convert",
        "--parent",
        `${dir}/mid.vdi`,
        `${dir}/top.vdi`,
        `${dir}/short.raw`,
      ]);
      assertTrue(/--parent FILE/.test(short.stderr), short.stderr);
    }),
});

Deno.test("a differencing vdi made by the API writes the rest of a block from its parent, and the registry checks the link", async () => {
  const base = await smallVdi();
  const parent = await open(fromBytes(base.bytes));
  const sink = memorySink();
  const top = await vdi.create!(sink, {
    size: parent.size,
    backingFile: "base.vdi",
    backing: parent,
    options: { block_size: "65536" },
  });
  await top.write!(70_000, new Uint8Array(10).fill(9));
  await top.flush!();
  const expected = base.disk.slice();
  expected.fill(9, 70_000, 70_010);
  const chain = await open(fromBytes(sink.bytes().slice()), {
    options: { parent: "base.vdi" },
    resolveBacking: () => Promise.resolve(fromBytes(base.bytes)),
  });
  assertEquals(sha256Hex(await readAll(chain)), sha256Hex(expected));
  // Another vdi as its parent: refused by UUID.
  const other = await smallVdi();
  await rejects(
    () =>
      open(fromBytes(sink.bytes().slice()), {
        options: { parent: "other.vdi" },
        resolveBacking: () => Promise.resolve(fromBytes(other.bytes)),
      }),
    BackingFileError,
    /links its parent by identity/,
  );
  // Opened writable with its parent, it is written through the overlay.
  const writableSink = memorySink();
  await writableSink.write(0, sink.bytes().slice());
  const writable = await open(writableSink, {
    writable: true,
    options: { parent: "base.vdi" },
    resolveBacking: () => Promise.resolve(fromBytes(base.bytes)),
  });
  await writable.write!(200_000, new Uint8Array(3).fill(4));
  await writable.flush!();
  expected.fill(4, 200_000, 200_003);
  assertEquals(sha256Hex(await readAll(writable)), sha256Hex(expected));
});

Deno.test({
  name:
    "commit --parent copies a differencing vdi into its parent, which qemu-img then checks and finds equal to the disk",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      await differencingFiles(dir);
      const made = await cli([
        "convert",
        "-O",
        "vdi",
        "-B",
        "base.vdi",
        `${dir}/mod.raw`,
        `${dir}/top.vdi`,
      ]);
      assertEquals(made.code, 0, made.stderr);
      const unnamed = await cli(["commit", `${dir}/top.vdi`]);
      assertTrue(unnamed.code !== 0, unnamed.text);
      const committed = await cli([
        "commit",
        "--parent",
        `${dir}/base.vdi`,
        `${dir}/top.vdi`,
      ]);
      assertEquals(committed.code, 0, committed.stderr);
      await run("qemu-img", ["check", "-f", "vdi", `${dir}/base.vdi`]);
      await assertQemuIdentical(`${dir}/mod.raw`, `${dir}/base.vdi`, "vdi");
      // The base got a new modification UUID, its uuid_image kept: the
      // child still links to it, and the chain reads as before.
      const base = await Deno.readFile(`${dir}/base.vdi`);
      const top = await Deno.readFile(`${dir}/top.vdi`);
      assertEquals(top.subarray(424, 440), base.subarray(392, 408));
      assertTrue(
        sha256Hex(top.subarray(440, 456)) !==
          sha256Hex(base.subarray(408, 424)),
      );
      const chain = await cli([
        "compare",
        "--parent",
        `${dir}/base.vdi`,
        `${dir}/top.vdi`,
        `${dir}/mod.raw`,
      ]);
      assertEquals(chain.code, 0, chain.text + chain.stderr);
    }),
});

Deno.test({
  name:
    "a write session gives a vdi a new modification UUID (uuid_last_snap) once, before its first write, and keeps every other header field but blocks_allocated",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const disk = sampleDisk(4 << 20, 51);
      await Deno.writeFile(`${dir}/d.raw`, disk);
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "vdi",
        `${dir}/d.raw`,
        `${dir}/d.vdi`,
      ]);
      const before = await Deno.readFile(`${dir}/d.vdi`);
      // Opened writable and not written: nothing changes.
      const idle = await open(`${dir}/d.vdi`, { writable: true });
      await idle.flush!();
      await idle.close?.();
      assertEquals(
        sha256Hex(await Deno.readFile(`${dir}/d.vdi`)),
        sha256Hex(before),
      );
      const image = await open(`${dir}/d.vdi`, { writable: true });
      const first = image.details?.uuidLastSnap;
      await image.write!(3 << 20, new Uint8Array(4096).fill(5));
      const second = image.details?.uuidLastSnap;
      await image.write!(100, new Uint8Array(10).fill(6));
      assertEquals(image.details?.uuidLastSnap, second);
      assertTrue(first !== second);
      await image.flush!();
      await image.close?.();
      const after = await Deno.readFile(`${dir}/d.vdi`);
      const header = (b: Uint8Array) => [
        ...b.subarray(0, 388),
        ...b.subarray(392, 408),
        ...b.subarray(424, 512),
      ];
      assertEquals(header(after), header(before));
      assertTrue(
        sha256Hex(after.subarray(408, 424)) !==
          sha256Hex(before.subarray(408, 424)),
      );
      const reopened = await open(`${dir}/d.vdi`);
      assertEquals(reopened.details?.uuidLastSnap, second);
      await reopened.close?.();
      await run("qemu-img", ["check", "-f", "vdi", `${dir}/d.vdi`]);
      const expected = disk.slice();
      expected.fill(5, 3 << 20, (3 << 20) + 4096);
      expected.fill(6, 100, 110);
      await Deno.writeFile(`${dir}/e.raw`, expected);
      await assertQemuIdentical(`${dir}/e.raw`, `${dir}/d.vdi`, "vdi");
    }),
});

Deno.test({
  name:
    "a differencing vdi over a VHD parent links its footer's unique id (as VirtualBox reads it) and is written and read through it; parents that keep no UUID are refused by name",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const size = 6 << 20;
      const base = sampleDisk(size, 61);
      await Deno.writeFile(`${dir}/base.raw`, base);
      for (const name of ["base.vhd", "other.vhd"]) {
        await run("qemu-img", [
          "convert",
          "-f",
          "raw",
          "-O",
          "vpc",
          "-o",
          "force_size=on",
          `${dir}/base.raw`,
          `${dir}/${name}`,
        ]);
      }
      const made = await cli([
        "create",
        "-f",
        "vdi",
        "-b",
        "base.vhd",
        "-F",
        "vpc",
        `${dir}/top.vdi`,
        "6M",
      ]);
      assertEquals(made.code, 0, made.stderr);
      // uuid_link: the VHD footer's unique id (at 68 of the footer), byte
      // for byte; uuid_parent nil (a VHD has no modification UUID).
      const top = await Deno.readFile(`${dir}/top.vdi`);
      const vhd = await Deno.readFile(`${dir}/base.vhd`);
      const footer = vhd.length - 512;
      assertEquals(
        top.subarray(424, 440),
        vhd.subarray(footer + 68, footer + 84),
      );
      assertEquals(top.subarray(440, 456), new Uint8Array(16));
      const data = pseudoRandom(5000, 62);
      await Deno.writeFile(`${dir}/d`, data);
      const w = await cli([
        "write",
        "--parent",
        `${dir}/base.vhd`,
        `${dir}/top.vdi`,
        "100000",
        `${dir}/d`,
      ]);
      assertEquals(w.code, 0, w.stderr);
      const expected = base.slice();
      expected.set(data, 100000);
      const back = await cli([
        "convert",
        "--parent",
        `${dir}/base.vhd`,
        `${dir}/top.vdi`,
        `${dir}/back.raw`,
      ]);
      assertEquals(back.code, 0, back.stderr);
      assertEquals(await sha256File(`${dir}/back.raw`), sha256Hex(expected));
      // Another VHD (another unique id), or a raw file: refused.
      for (
        const [parent, why] of [
          ["other.vhd", /\(vpc\) is uuid [0-9a-f-]+: refused/],
          ["base.raw", /\(raw\) carries no identity/],
        ] as const
      ) {
        const r = await cli([
          "convert",
          "--parent",
          `${dir}/${parent}`,
          `${dir}/top.vdi`,
          `${dir}/no.raw`,
        ]);
        assertTrue(r.code !== 0 && why.test(r.stderr), r.stderr);
      }
      // create over a parent that keeps no UUID: refused, saying why.
      const raw = await cli([
        "create",
        "-f",
        "vdi",
        "-b",
        "base.raw",
        "-F",
        "raw",
        `${dir}/t2.vdi`,
        "6M",
      ]);
      assertTrue(
        raw.code !== 0 && /keeps no UUID .*media registry/.test(raw.stderr),
        raw.stderr,
      );
    }),
});

Deno.test({
  name:
    "a differencing vdi over a VMDK parent links its ddb.uuid.image (as VirtualBox writes and reads it); a VMDK without one is refused",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const size = 4 << 20;
      const base = sampleDisk(size, 71);
      await Deno.writeFile(`${dir}/base.raw`, base);
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        `${dir}/base.raw`,
        `${dir}/plain.vmdk`,
      ]);
      // The descriptor as VirtualBox writes it: ddb.uuid.image.
      const uuid = "9f1c2b3a-4d5e-4f60-8172-8394a5b6c7d8";
      const text = (await Deno.readTextFile(`${dir}/plain.vmdk`)).replace(
        /\0+$/,
        "",
      ).replace(
        "ddb.virtualHWVersion",
        `ddb.uuid.image="${uuid.toUpperCase()}"\nddb.virtualHWVersion`,
      );
      await Deno.writeTextFile(`${dir}/base.vmdk`, text);
      const made = await cli([
        "create",
        "-f",
        "vdi",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        `${dir}/top.vdi`,
        "4M",
      ]);
      assertEquals(made.code, 0, made.stderr);
      const info = await cli([
        "info",
        "--output=json",
        "--parent",
        `${dir}/base.vmdk`,
        `${dir}/top.vdi`,
      ]);
      assertEquals(info.code, 0, info.stderr);
      assertTrue(info.text.includes(uuid), info.text);
      const back = await cli([
        "convert",
        "--parent",
        `${dir}/base.vmdk`,
        `${dir}/top.vdi`,
        `${dir}/back.raw`,
      ]);
      assertEquals(back.code, 0, back.stderr);
      assertEquals(await sha256File(`${dir}/back.raw`), sha256Hex(base));
      const plain = await cli([
        "convert",
        "--parent",
        `${dir}/plain.vmdk`,
        `${dir}/top.vdi`,
        `${dir}/no.raw`,
      ]);
      assertTrue(
        plain.code !== 0 && /\(vmdk\) carries no identity/.test(plain.stderr),
        plain.stderr,
      );
    }),
});

Deno.test("a differencing vdi opened writable without its parent takes whole free blocks, and refuses part of one before writing anything", async () => {
  const base = await smallVdi();
  const made = memorySink();
  await vdi.create!(made, {
    size: 4 << 20,
    backingFile: "base.vdi",
    backing: await open(fromBytes(base.bytes)),
    options: { block_size: "65536" },
  });
  const before = made.bytes().slice();
  const sink = memorySink(before);
  const image = await open(sink, { writable: true });
  await rejects(
    () => image.write!(70_000, new Uint8Array(10)),
    UnsupportedError,
    /part of block 1 .*--parent FILE/,
  );
  assertEquals(sha256Hex(sink.bytes()), sha256Hex(before)); // not even the UUID
  const whole = pseudoRandom(65536, 8);
  await image.write!(3 * 65536, whole);
  await image.flush!();
  assertEquals(await image.read(3 * 65536, 65536), whole);
  const chain = await open(fromBytes(sink.bytes().slice()), {
    options: { parent: "base.vdi" },
    resolveBacking: () => Promise.resolve(fromBytes(base.bytes)),
  });
  const expected = base.disk.slice();
  expected.set(whole, 3 * 65536);
  assertEquals(sha256Hex(await readAll(chain)), sha256Hex(expected));
});
