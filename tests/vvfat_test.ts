import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  convert,
  directoryTree,
  type FatType,
  fromBytes,
  ImageFormatError,
  memorySink,
  memoryTree,
  type MemoryTreeValue,
  open,
  openTree,
  parseFatSpelling,
  type Tree,
  type TreeEntry,
  TreeError,
  UnsupportedError,
  vvfat,
} from "../mod.ts";
import {
  cli,
  pseudoRandom,
  rejects,
  ROOT,
  run,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

const MiB = 1 << 20;

/** `fn` run as a promise, so `rejects` can check what it throws. */
const later = <T>(fn: () => T): Promise<T> => Promise.resolve().then(fn);
const enc = new TextEncoder();

/**
 * The tree the reference tools check: long names (Unicode, spaces, mixed
 * case, a plus sign), names whose short forms collide (and a literal
 * `LONGFI~1.TXT` that must keep its own), a folder nested seven deep, 300
 * files in one folder (several folder clusters even with 16 KiB clusters),
 * an empty file, an empty folder and a 40 MiB file of pseudo-random bytes.
 */
function sampleTree(bigSize = 40 * MiB): Record<string, MemoryTreeValue> {
  const files: Record<string, MemoryTreeValue> = {
    "Read Me First.txt": enc.encode("read me\n"),
    "README.TXT": enc.encode("the 8.3 name\n"),
    "mixed Case Name.Markdown": enc.encode("# mixed\n"),
    "Long File Name 1.txt": enc.encode("one\n"),
    "long file name 2.TXT": enc.encode("two\n"),
    "LONGFI~1.TXT": enc.encode("literal tail\n"),
    "Ünïcödé naïve файл 日本語.md": enc.encode("unicode ✓\n"),
    "c++ notes; v1,2 [draft]=ok.txt": enc.encode("punctuation\n"),
    ".hidden config": enc.encode("leading period\n"),
    "empty.dat": new Uint8Array(0),
    "Empty Folder/": null,
    "a/b/c/d/e/f/g/deep file.txt": enc.encode("seven folders down\n"),
    "a/b/sibling.bin": pseudoRandom(70_000, 3),
    "big/Large Random File.bin": pseudoRandom(bigSize, 9),
  };
  for (let i = 0; i < 300; i++) {
    files[`many files/File number ${String(i).padStart(3, "0")}.txt`] = enc
      .encode(`this is file ${i}\n`.repeat(i % 7));
  }
  return files;
}

/** Writes a tree's files into `dir`. */
async function writeTree(dir: string, files: Record<string, MemoryTreeValue>) {
  for (const [path, value] of Object.entries(files)) {
    const full = `${dir}/${path}`;
    if (value === null) {
      await Deno.mkdir(full, { recursive: true });
      continue;
    }
    await Deno.mkdir(full.slice(0, full.lastIndexOf("/")), { recursive: true });
    await Deno.writeFile(full, value as Uint8Array);
  }
}

/** Every file (path -> sha256) and folder (path -> "dir") under `dir`. */
async function snapshotDir(dir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const walk = async (rel: string) => {
    for await (const e of Deno.readDir(rel ? `${dir}/${rel}` : dir)) {
      const path = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory) {
        out.set(path, "dir");
        await walk(path);
      } else {
        out.set(path, sha256Hex(await Deno.readFile(`${dir}/${path}`)));
      }
    }
  };
  await walk("");
  return out;
}

/** The same map for an in-memory tree description. */
function snapshotFiles(files: Record<string, MemoryTreeValue>) {
  const out = new Map<string, string>();
  for (const [path, value] of Object.entries(files)) {
    const names = path.split("/").filter(Boolean);
    for (let i = 1; i < names.length; i++) {
      out.set(names.slice(0, i).join("/"), "dir");
    }
    out.set(
      names.join("/"),
      value === null ? "dir" : sha256Hex(value as Uint8Array),
    );
  }
  return out;
}

/** The partition's byte offset, from the MBR's first entry. */
function partitionOffset(disk: Uint8Array): number {
  return new DataView(disk.buffer, disk.byteOffset).getUint32(446 + 8, true) *
    512;
}

/** Runs an mtools command in UTF-8 and UTC (FAT times are local times). */
function mtools(tool: string, args: string[]) {
  return run("env", ["LANG=C.UTF-8", "TZ=UTC", tool, ...args], {
    allowFail: true,
  });
}

/** The partition's byte offset of a disk file. */
async function filePartitionOffset(path: string): Promise<number> {
  using file = await Deno.open(path);
  const mbr = new Uint8Array(512);
  await file.read(mbr);
  return partitionOffset(mbr);
}

/** fsck.fat -n on the partition of a disk file: its exit code and output. */
async function fsck(dir: string, disk: string) {
  const part = `${dir}/partition.img`;
  await run("dd", [
    `if=${disk}`,
    `of=${part}`,
    "bs=512",
    `skip=${(await filePartitionOffset(disk)) / 512}`,
    "conv=sparse",
    "status=none",
  ]);
  const r = await run("fsck.fat", ["-n", part], { allowFail: true });
  await Deno.remove(part);
  return { code: r.code, output: (r.text + r.stderr).trim() };
}

for (const fatType of [12, 16, 32] as const) {
  Deno.test({
    name:
      `a tree as FAT${fatType} passes fsck.fat -n, and mcopy -s gets every file back byte-identical`,
    ignore: skip(["fsck.fat", "mcopy", "mdir", "minfo"]),
    fn: () =>
      withTemp(async (dir) => {
        const files = sampleTree();
        await writeTree(`${dir}/tree`, files);
        const converted = await cli([
          "convert",
          `fat:${fatType}:${dir}/tree`,
          `${dir}/disk.raw`,
        ]);
        assertEquals(converted.code, 0, converted.stderr);
        const disk = await Deno.readFile(`${dir}/disk.raw`);
        const offset = partitionOffset(disk);
        assertEquals(disk[446 + 4], { 12: 0x01, 16: 0x06, 32: 0x0c }[fatType]);

        const checked = await fsck(dir, `${dir}/disk.raw`);
        assertEquals(checked.code, 0, checked.output);
        // Two lines: the version and the summary; nothing to complain about.
        assertEquals(checked.output.split("\n").length, 2, checked.output);
        assertMatch(
          checked.output,
          /partition\.img: 3\d\d files, \d+\/\d+ clusters/,
        );

        const image = `${dir}/disk.raw@@${offset}`;
        const info = await mtools("minfo", ["-i", image, "::"]);
        assertEquals(info.code, 0, info.stderr);
        assertMatch(info.text, new RegExp(`disk type="FAT${fatType} *"`));
        const listing = await mtools("mdir", ["-i", image, "::/"]);
        assertEquals(listing.code, 0, listing.stderr);
        assertMatch(listing.text, /Read Me First\.txt/);
        assertMatch(listing.text, /Ünïcödé naïve файл 日本語\.md/);
        // The literal 8.3 name keeps LONGFI~1; the long names get other tails.
        assertMatch(listing.text, /^LONGFI~1 TXT +13 /m);
        assertMatch(listing.text, /^LONGFI~2 TXT +4 .*Long File Name 1\.txt$/m);
        assertMatch(listing.text, /^LONGFI~3 TXT +4 .*long file name 2\.TXT$/m);
        assertMatch(listing.text, /^README {3}TXT +13 /m);

        await Deno.mkdir(`${dir}/out`);
        const copied = await mtools("mcopy", [
          "-s",
          "-n",
          "-i",
          image,
          "::/",
          `${dir}/out`,
        ]);
        assertEquals(copied.code, 0, copied.stderr);
        assertEquals(await snapshotDir(`${dir}/out`), snapshotFiles(files));
      }),
  });
}

Deno.test({
  name: "file times come back through mcopy -m, to FAT's two seconds",
  ignore: skip(["mcopy"]),
  fn: () =>
    withTemp(async (dir) => {
      const times: Record<string, number> = {
        "old.txt": Date.UTC(1999, 11, 31, 23, 59, 59, 500),
        "new.txt": Date.UTC(2024, 1, 29, 12, 34, 56),
        "sub/odd second.txt": Date.UTC(2010, 6, 15, 8, 0, 3),
      };
      await Deno.mkdir(`${dir}/tree/sub`, { recursive: true });
      for (const [path, ms] of Object.entries(times)) {
        await Deno.writeTextFile(`${dir}/tree/${path}`, path);
        await Deno.utime(`${dir}/tree/${path}`, ms / 1000, ms / 1000);
      }
      const disk = await openTree(await directoryTree(`${dir}/tree`));
      const sink = memorySink();
      await convert(disk, sink);
      await Deno.writeFile(`${dir}/disk.raw`, sink.bytes());
      await Deno.mkdir(`${dir}/out`);
      const r = await mtools("mcopy", [
        "-s",
        "-m",
        "-i",
        `${dir}/disk.raw@@${partitionOffset(sink.bytes())}`,
        "::/",
        `${dir}/out`,
      ]);
      assertEquals(r.code, 0, r.stderr);
      for (const [path, ms] of Object.entries(times)) {
        const stat = await Deno.stat(`${dir}/out/${path}`);
        assertEquals(stat.mtime?.getTime(), Math.floor(ms / 2000) * 2000, path);
      }
    }),
});

// ---------------------------------------------------------------------------
// Choosing the FAT type

/** A tree that reports files of the given sizes without holding their bytes. */
function sizedTree(
  sizes: number[],
  folderEntries: Record<string, number> = {},
): Tree & {
  reads: { path: string; offset: number; length: number }[];
} {
  const reads: { path: string; offset: number; length: number }[] = [];
  return {
    reads,
    list(path) {
      if (path === "") {
        const out: TreeEntry[] = sizes.map((size, i) => ({
          name: `F${i}.BIN`,
          kind: "file",
          size,
          mtime: 0,
        }));
        for (const name of Object.keys(folderEntries)) {
          out.push({ name, kind: "dir", size: 0, mtime: 0 });
        }
        return Promise.resolve(out);
      }
      const count = folderEntries[path] ?? 0;
      return Promise.resolve(
        Array.from({ length: count }, (_, i) => ({
          name: `F${i}`,
          kind: "file" as const,
          size: 0,
          mtime: 0,
        })),
      );
    },
    read(path, offset, length) {
      reads.push({ path, offset, length });
      return Promise.resolve(new Uint8Array(length).fill(0x5a));
    },
  };
}

Deno.test("the FAT type follows the tree's size: FAT12, then FAT16, then FAT32", async () => {
  const cases: [number[], FatType][] = [
    [[10_000], 12],
    [[15 * MiB], 12],
    [[40 * MiB], 16],
    [[500 * MiB], 16],
    [[600 * MiB], 32],
    [[3 * 2 ** 30, 3 * 2 ** 30, 3 * 2 ** 30], 32],
  ];
  for (const [sizes, expected] of cases) {
    const disk = await openTree(sizedTree(sizes));
    assertEquals(disk.details?.fatType, expected, `${sizes}`);
    const clusters = disk.details?.clusters as number;
    const [min, max] =
      { 12: [1, 4084], 16: [4085, 65524], 32: [65525, 0x0ffffff5] }[
        expected
      ];
    assertTrue(clusters >= min && clusters <= max, `${clusters} clusters`);
  }
  // A 9 GiB FAT32 volume gets 8 KiB clusters, as Microsoft formats it.
  const big = await openTree(
    sizedTree([3 * 2 ** 30, 3 * 2 ** 30, 3 * 2 ** 30]),
  );
  assertEquals(big.details?.clusterSize, 8192);
});

Deno.test("fat:12:, fat:16: and fat:32: force the type, and FAT32 has at least 65525 clusters", async () => {
  const tree = memoryTree({ "a.txt": enc.encode("a") });
  for (const fatType of [12, 16, 32] as const) {
    const disk = await openTree(tree, { fatType });
    assertEquals(disk.details?.fatType, fatType);
    const boot = await disk.read(disk.details?.partitionOffset as number, 512);
    const label = fatType === 32 ? 82 : 54;
    assertEquals(
      new TextDecoder().decode(boot.subarray(label, label + 8)),
      `FAT${fatType}   `,
    );
  }
  const fat32 = await openTree(tree, { fatType: 32 });
  assertTrue((fat32.details?.clusters as number) >= 65525);
  assertEquals(parseFatSpelling("fat:16:/a:b"), { dir: "/a:b", fatType: 16 });
  assertEquals(parseFatSpelling("fat:dir"), { dir: "dir" });
  assertEquals(parseFatSpelling("disk.raw"), undefined);
  await rejects(
    () => later(() => parseFatSpelling("fat:rw:dir")),
    UnsupportedError,
    /read-only/,
  );
  await rejects(
    () => later(() => parseFatSpelling("fat:16:")),
    ImageFormatError,
    /folder/,
  );
});

// ---------------------------------------------------------------------------
// Laziness

/** A memory tree that counts what is read of it. */
function countingTree(files: Record<string, MemoryTreeValue>) {
  const inner = memoryTree(files);
  const reads: { path: string; offset: number; length: number }[] = [];
  const tree: Tree = {
    list: (path) => inner.list(path),
    read(path, offset, length) {
      reads.push({ path, offset, length });
      return inner.read(path, offset, length);
    },
  };
  return { tree, reads };
}

/** Where a file of the root folder starts on the disk, found as a FAT reader would. */
async function rootFileOffset(
  disk: Awaited<ReturnType<typeof openTree>>,
  short: string,
) {
  const p = disk.details?.partitionOffset as number;
  const b = await disk.read(p, 512);
  const v = new DataView(b.buffer);
  const sectorsPerCluster = b[13];
  const reserved = v.getUint16(14, true);
  const rootEntries = v.getUint16(17, true);
  const fatSectors = v.getUint16(22, true) || v.getUint32(36, true);
  const rootSector = reserved + 2 * fatSectors;
  const dataSector = rootSector + (rootEntries * 32) / 512;
  assertEquals(rootEntries > 0, true, "FAT12/16 root folder expected");
  const root = await disk.read(p + rootSector * 512, rootEntries * 32);
  for (let at = 0; at < root.length; at += 32) {
    const name = new TextDecoder().decode(root.subarray(at, at + 11));
    if (name === short) {
      const cluster = new DataView(root.buffer).getUint16(at + 26, true);
      return p + (dataSector + (cluster - 2) * sectorsPerCluster) * 512;
    }
  }
  throw new Error(`${short} not in the root folder`);
}

Deno.test("opening and reading metadata sectors read no file bytes; one cluster of a file reads only that range", async () => {
  const files = sampleTree(8 * MiB);
  files["BIG.BIN"] = pseudoRandom(3 * MiB, 21);
  const { tree, reads } = countingTree(files);
  const disk = await openTree(tree, { fatType: 16, clusterSize: 4096 });
  assertEquals(reads.length, 0);
  const p = disk.details?.partitionOffset as number;
  await disk.read(0, 512); // MBR
  await disk.read(p, 512); // boot sector
  await disk.read(p + 512, 64 * 512); // FAT
  const start = await rootFileOffset(disk, "BIG     BIN");
  assertEquals(reads.length, 0);
  // The 100th cluster of BIG.BIN: one read of exactly that cluster.
  const bytes = await disk.read(start + 100 * 4096, 4096);
  assertEquals(reads, [{ path: "BIG.BIN", offset: 100 * 4096, length: 4096 }]);
  assertEquals(bytes, (files["BIG.BIN"] as Uint8Array).slice(409600, 413696));
  // Half a sector straddling two clusters: two reads of 256 bytes.
  reads.length = 0;
  await disk.read(start + 5 * 4096 - 256, 512);
  assertEquals(reads, [
    { path: "BIG.BIN", offset: 5 * 4096 - 256, length: 512 },
  ]);
});

Deno.test("a tree of many GiB opens without reading a file, and metadata sectors read none", async () => {
  const tree = sizedTree(Array(20).fill(2 ** 32 - 1), {
    "huge folder": 60_000,
  });
  const disk = await openTree(tree);
  assertEquals(disk.details?.fatType, 32);
  assertEquals(disk.details?.clusterSize, 32768);
  assertTrue(disk.size > 80 * 2 ** 30);
  const p = disk.details?.partitionOffset as number;
  const boot = await disk.read(p, 512);
  const fatSectors = new DataView(boot.buffer).getUint32(36, true);
  const dataStart = p + (32 + 2 * fatSectors) * 512;
  // The last sector of each FAT, and the root folder and the 60000-entry
  // folder (1 + 59 clusters, before the files' clusters).
  await disk.read(p + (32 + fatSectors - 1) * 512, 512);
  await disk.read(p + (32 + 2 * fatSectors - 1) * 512, 512);
  const folders = await disk.read(dataStart, 60 * 32768);
  assertEquals(tree.reads.length, 0);
  assertEquals(
    new TextDecoder().decode(folders.subarray(32768 + 64, 32768 + 75)),
    "F0         ",
  );
  // The next sector is the first of the first file: one read of it.
  await disk.read(dataStart + 60 * 32768, 512);
  assertEquals(tree.reads, [{ path: "F0.BIN", offset: 0, length: 512 }]);
});

Deno.test("free clusters and unused FAT sectors are zero runs that read as zeros", async () => {
  const disk = await openTree(memoryTree({ "a.txt": enc.encode("hello") }), {
    fatType: 32,
  });
  let zero = 0;
  let data = 0;
  for await (const run of disk.extents(0, disk.size)) {
    if (run.kind === "zero") {
      zero += run.length;
      const bytes = await disk.read(run.offset, run.length);
      assertTrue(bytes.every((b) => b === 0), `zero run at ${run.offset}`);
    } else data += run.length;
  }
  assertEquals(zero + data, disk.size);
  assertTrue(data < 64 * 1024, `${data} data bytes`);
  const sink = memorySink();
  const result = await convert(disk, sink);
  assertTrue(result.dataBytes <= data, `${result.dataBytes} bytes written`);
  assertEquals(sink.bytes(), await disk.read(0, disk.size));
});

Deno.test("an in-memory tree becomes a disk with no Deno APIs at all", async () => {
  const script = `
    const m = await import(${
    JSON.stringify(new URL("../mod.ts", import.meta.url).href)
  });
    const saved = globalThis.Deno;
    delete globalThis.Deno;
    const tree = m.memoryTree({
      "Long name.txt": new TextEncoder().encode("hello"),
      "blob/from a Blob.bin": new Blob([new Uint8Array(70000).fill(7)]),
      "empty/": null,
    });
    const disk = await m.openTree(tree, { fatType: 16, label: "browser" });
    const sink = m.memorySink();
    await m.convert(disk, sink);
    globalThis.Deno = saved;
    console.log(disk.size, sink.bytes().length, typeof saved);
  `;
  const path = await Deno.makeTempFile({ suffix: ".js" });
  try {
    await Deno.writeTextFile(path, script);
    const r = await run(Deno.execPath(), ["run", "--no-config", path], {
      allowFail: true,
    });
    assertEquals(r.code, 0, r.stderr);
    const [size, written, denoType] = r.text.trim().split(" ");
    assertEquals(size, written);
    assertEquals(denoType, "object");
  } finally {
    await Deno.remove(path);
  }
});

// ---------------------------------------------------------------------------
// Against qemu-img

Deno.test({
  name:
    "qemu-img's vvfat and ours present the same files; ours passes fsck.fat as FAT32",
  ignore: skip(["qemu-img", "fsck.fat", "mcopy"]),
  fn: () =>
    withTemp(async (dir) => {
      const files: Record<string, MemoryTreeValue> = {
        "hello.txt": enc.encode("hello\n"),
        "Long Name File.txt": enc.encode("long\n"),
        "sub/data.bin": pseudoRandom(300_000, 4),
      };
      await writeTree(`${dir}/tree`, files);
      const extract = async (disk: string, out: string) => {
        await Deno.mkdir(out);
        const r = await mtools("mcopy", [
          "-s",
          "-i",
          `${disk}@@${await filePartitionOffset(disk)}`,
          "::/",
          out,
        ]);
        assertEquals(r.code, 0, r.stderr);
        return await snapshotDir(out);
      };
      await run("qemu-img", [
        "convert",
        "-f",
        "vvfat",
        "-O",
        "raw",
        `fat:16:${dir}/tree`,
        `${dir}/qemu16.raw`,
      ]);
      const ours = await cli([
        "convert",
        `fat:16:${dir}/tree`,
        `${dir}/ours16.raw`,
      ]);
      assertEquals(ours.code, 0, ours.stderr);
      const qemuFiles = await extract(`${dir}/qemu16.raw`, `${dir}/qemu16`);
      assertEquals(
        await extract(`${dir}/ours16.raw`, `${dir}/ours16`),
        qemuFiles,
      );
      assertEquals(qemuFiles, snapshotFiles(files));

      // FAT32: ours passes; qemu-img 7.2's fails here (not asserted: it is
      // qemu's bug, reported for comparison).
      await run("qemu-img", [
        "convert",
        "-f",
        "vvfat",
        "-O",
        "raw",
        `fat:32:${dir}/tree`,
        `${dir}/qemu32.raw`,
      ], {
        allowFail: true,
      });
      const ours32 = await cli([
        "convert",
        `fat:32:${dir}/tree`,
        `${dir}/ours32.raw`,
      ]);
      assertEquals(ours32.code, 0, ours32.stderr);
      const checked = await fsck(dir, `${dir}/ours32.raw`);
      assertEquals(checked.code, 0, checked.output);
      const theirs = await fsck(dir, `${dir}/qemu32.raw`);
      console.log(
        `fsck.fat -n on qemu-img's FAT32: exit ${theirs.code}; on ours: exit 0`,
      );
    }),
});

// ---------------------------------------------------------------------------
// The command line

Deno.test("the CLI opens fat:DIR and -f vvfat DIR for info, map and compare", () =>
  withTemp(async (dir) => {
    await writeTree(`${dir}/tree`, {
      "a.txt": enc.encode("a\n"),
      "sub/b.txt": enc.encode("b\n"),
    });
    const info = await cli(["info", "--output=json", `fat:32:${dir}/tree`]);
    assertEquals(info.code, 0, info.stderr);
    const json = JSON.parse(info.text);
    assertEquals(json.format, "vvfat");
    assertEquals(json["format-specific"].data["fat-type"], 32);
    const info2 = await cli(["info", "-f", "vvfat", `${dir}/tree`]);
    assertEquals(info2.code, 0, info2.stderr);
    assertMatch(info2.text, /file format: vvfat/);
    const map = await cli(["map", "--output=json", `fat:${dir}/tree`]);
    assertEquals(map.code, 0, map.stderr);
    const runs = JSON.parse(map.text) as { data: boolean }[];
    assertTrue(runs.some((r) => r.data) && runs.some((r) => !r.data));
    const conv = await cli(["convert", `fat:${dir}/tree`, `${dir}/disk.raw`]);
    assertEquals(conv.code, 0, conv.stderr);
    const same = await cli(["compare", `fat:${dir}/tree`, `${dir}/disk.raw`]);
    assertEquals(same.code, 0, same.text + same.stderr);
    const rw = await cli(["info", `fat:rw:${dir}/tree`]);
    assertEquals(rw.code, 1);
    assertMatch(rw.stderr, /read-only/);
    const out = await cli([
      "convert",
      "-O",
      "vvfat",
      `${dir}/disk.raw`,
      `${dir}/x`,
    ]);
    assertEquals(out.code, 1);
    assertMatch(out.stderr, /cannot be written/);
  }));

Deno.test("the vvfat driver is listed but never claims an image file, and refuses to open one", async () => {
  const r = await cli(["formats"]);
  assertMatch(r.text, /^vvfat /m);
  const zeros = new Uint8Array(4096);
  assertEquals(vvfat.probe({ head: zeros, tail: zeros, size: 4096 }), 0);
  assertEquals((await open(fromBytes(zeros))).format, "raw");
  await rejects(
    () => open(fromBytes(zeros), { format: "vvfat" }),
    UnsupportedError,
    /openTree/,
  );
  const disk = await openTree(memoryTree({ "a": enc.encode("a") }));
  assertEquals("write" in disk, false);
});

// ---------------------------------------------------------------------------
// Errors

Deno.test("names FAT cannot hold are refused, naming the path", async () => {
  const bad: [string, RegExp][] = [
    ["what?.txt", /"\?"/],
    ["a:b", /":"/],
    ["back\\slash", /"\\\\"/],
    ["tab\there", /control characters/],
    ["trailing dot.", /trailing period/],
    ["trailing space ", /trailing period or space/],
    ["x".repeat(256), /1 to 255 UTF-16 units/],
    ["lone \ud800 surrogate", /unpaired surrogate/],
  ];
  for (const [name, pattern] of bad) {
    const e = await rejects(
      () => openTree(memoryTree({ [`dir/${name}`]: enc.encode("x") })),
      ImageFormatError,
      pattern,
    );
    assertTrue(e.message.includes(JSON.stringify(`dir/${name}`)), e.message);
  }
  // 255 units is fine, in UTF-16 units (an emoji is two).
  await openTree(memoryTree({ ["😀".repeat(127) + "a"]: enc.encode("x") }));
  await rejects(
    () => openTree(memoryTree({ ["😀".repeat(128)]: enc.encode("x") })),
    ImageFormatError,
    /256/,
  );
});

Deno.test("names that differ only in case are refused: FAT compares names without case", async () => {
  await rejects(
    () =>
      openTree(
        memoryTree({
          "Readme.txt": enc.encode("a"),
          "README.TXT": enc.encode("b"),
        }),
      ),
    ImageFormatError,
    /Readme\.txt.*more than case|README\.TXT.*more than case/,
  );
});

Deno.test("files of 4 GiB, folders of more than 65536 entries and trees too large for the FAT type are refused", async () => {
  await rejects(
    () => openTree(sizedTree([2 ** 32])),
    ImageFormatError,
    /file size 4294967296 must be at most 4294967295/,
  );
  await rejects(
    () => openTree(sizedTree([], { crowded: 65535 })),
    ImageFormatError,
    /folder entries 65537 must be at most 65536 in crowded/,
  );
  await openTree(sizedTree([], { full: 65534 }));
  await rejects(
    () => openTree(sizedTree([200 * MiB]), { fatType: 12 }),
    ImageFormatError,
    /within FAT12's 4068 clusters/,
  );
  await rejects(
    () => openTree(sizedTree([2 ** 31]), { fatType: 16 }),
    ImageFormatError,
    /within FAT16's/,
  );
  await rejects(
    () => openTree(sizedTree(Array(600).fill(2 ** 32 - 1))),
    ImageFormatError,
    /within FAT32's/,
  );
  await rejects(
    () => openTree(sizedTree(Array(65_530).fill(0)), { fatType: 16 }),
    ImageFormatError,
    /root folder entries 65530 must be at most 65520 on FAT16/,
  );
  assertEquals(
    (await openTree(sizedTree(Array(65_530).fill(0)))).details?.fatType,
    32,
  );
  await rejects(
    () => openTree(memoryTree({}), { label: "much too long" }),
    ImageFormatError,
    /label/,
  );
  await rejects(
    () => openTree(memoryTree({}), { clusterSize: 3000 }),
    ImageFormatError,
    /clusterSize/,
  );
});

Deno.test({
  name:
    "symbolic links inside the folder are followed; links leaving it, loops and dangling links are refused",
  ignore: Deno.build.os === "windows",
  fn: () =>
    withTemp(async (dir) => {
      await writeTree(`${dir}/tree`, {
        "data/a.txt": enc.encode("a"),
        "other/b.txt": enc.encode("b"),
      });
      await Deno.writeTextFile(`${dir}/secret.txt`, "outside");
      await Deno.symlink("data/a.txt", `${dir}/tree/link to a.txt`);
      await Deno.symlink("other", `${dir}/tree/link to other`);
      const disk = await openTree(await directoryTree(`${dir}/tree`));
      assertEquals(disk.details?.files, 4);
      assertEquals(disk.details?.folders, 3);

      await Deno.symlink("../../secret.txt", `${dir}/tree/data/escape`);
      await rejects(
        () => directoryTree(`${dir}/tree`).then(openTree),
        TreeError,
        /data\/escape: a symbolic link leaving the tree/,
      );
      await Deno.remove(`${dir}/tree/data/escape`);

      await Deno.symlink("..", `${dir}/tree/other/loop`);
      await rejects(
        () => directoryTree(`${dir}/tree`).then(openTree),
        TreeError,
        /loop/,
      );
      await Deno.remove(`${dir}/tree/other/loop`);

      await Deno.symlink("nowhere", `${dir}/tree/dangling`);
      await rejects(
        () => directoryTree(`${dir}/tree`).then(openTree),
        TreeError,
        /dangling: a symbolic link to nothing/,
      );
    }),
});

Deno.test("a file that changed after the tree was listed is an error when read", () =>
  withTemp(async (dir) => {
    await writeTree(`${dir}/tree`, {
      "grows.txt": enc.encode("short"),
      "touched.txt": enc.encode("same"),
    });
    const disk = await openTree(await directoryTree(`${dir}/tree`));
    const listed = (await Deno.stat(`${dir}/tree/grows.txt`)).mtime!;
    await Deno.writeTextFile(`${dir}/tree/grows.txt`, "much longer now");
    await rejects(
      () => convert(disk, memorySink()),
      TreeError,
      /grows\.txt: changed since the tree was listed \(size 5 -> 15/,
    );
    await Deno.writeTextFile(`${dir}/tree/grows.txt`, "short");
    await Deno.utime(`${dir}/tree/grows.txt`, listed, listed);
    await convert(disk, memorySink()); // as listed again
    await Deno.utime(`${dir}/tree/touched.txt`, 1e9, 1e9);
    await rejects(
      () => convert(disk, memorySink()),
      TreeError,
      /touched\.txt: changed since the tree was listed \(size 4 -> 4, modified/,
    );
  }));

Deno.test("a Tree that returns fewer bytes than asked, or no valid time, is an error, not a wrong disk", async () => {
  const tree: Tree = {
    list: (path) =>
      Promise.resolve(
        path === "" ? [{ name: "f", kind: "file", size: 5000, mtime: 0 }] : [],
      ),
    read: () => Promise.resolve(new Uint8Array(3)),
  };
  const disk = await openTree(tree);
  await rejects(() => disk.read(0, disk.size), TreeError, /read 3 bytes where/);
  const timeless: Tree = {
    list: () =>
      Promise.resolve([{ name: "f", kind: "file", size: 1, mtime: NaN }]),
    read: () => Promise.resolve(new Uint8Array(1)),
  };
  await rejects(
    () => openTree(timeless),
    TreeError,
    /f: mtime NaN is not a time/,
  );
});

Deno.test("memoryTree refuses paths that are both a file and a folder, and bad segments", async () => {
  await rejects(
    () =>
      later(() => memoryTree({ "a": enc.encode("x"), "a/b": enc.encode("y") })),
    TreeError,
    /a is a file/,
  );
  await rejects(
    () => later(() => memoryTree({ "a/../b": enc.encode("x") })),
    TreeError,
    /".."/,
  );
  await rejects(
    () => later(() => memoryTree({ "a/": enc.encode("x") })),
    TreeError,
    /must be null/,
  );
});

Deno.test({
  name:
    "a folder of thousands of small files converts within a limit of 256 open files",
  ignore: Deno.build.os === "windows",
  fn: () =>
    withTemp(async (dir) => {
      const files: Record<string, MemoryTreeValue> = {};
      for (let i = 0; i < 3000; i++) {
        files[`f${i}.txt`] = enc.encode(`file ${i}\n`);
      }
      await writeTree(`${dir}/tree`, files);
      const r = await run("sh", [
        "-c",
        `ulimit -n 256 && exec "$0" run -A "$1" convert "fat:$2" "$3"`,
        Deno.execPath(),
        `${ROOT}cli.ts`,
        `${dir}/tree`,
        `${dir}/disk.raw`,
      ], { allowFail: true });
      assertEquals(r.code, 0, r.stderr);
      const disk = await openTree(await directoryTree(`${dir}/tree`));
      assertEquals(
        sha256Hex(await Deno.readFile(`${dir}/disk.raw`)),
        sha256Hex(await disk.read(0, disk.size)),
      );
    }),
});

/** A seeded tree of random names (spaces, periods, punctuation, Unicode) in random folders. */
function randomTree(
  seed: number,
  count: number,
): Record<string, MemoryTreeValue> {
  let x = seed;
  const next = (n: number) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
  const alphabet = [
    ..."abcXYZ019 ._-~!+,;=[]()'{}`@#$%&^",
    "é",
    "Ö",
    "ß",
    "ж",
    "中",
    "😀",
  ];
  const folders = [""];
  const files: Record<string, MemoryTreeValue> = {};
  const taken = new Set<string>();
  while (Object.keys(files).length < count) {
    let name = "";
    for (let i = 1 + next(next(4) ? 12 : 40); i > 0; i--) {
      name += alphabet[next(alphabet.length)];
    }
    if (/[. ]$/.test(name)) continue;
    const parent = folders[next(folders.length)];
    const path = parent ? `${parent}/${name}` : name;
    // FAT compares names without case: keep one of each.
    const key = (parent + "/" + name).split("").map((c) =>
      c.toUpperCase().length === 1 ? c.toUpperCase() : c
    )
      .join("");
    if (taken.has(key)) continue;
    taken.add(key);
    if (next(5) === 0) {
      folders.push(path);
      files[`${path}/`] = null;
    } else {
      files[path] = pseudoRandom(
        next(3) ? next(3000) : next(200_000),
        seed + count,
      );
    }
  }
  // A folder that later got children is not empty: drop its `null`.
  for (const folder of folders.slice(1)) {
    if (
      Object.keys(files).some((p) =>
        p.startsWith(`${folder}/`) && p !== `${folder}/`
      )
    ) {
      delete files[`${folder}/`];
    }
  }
  return files;
}

Deno.test({
  name:
    "random trees of odd names pass fsck.fat -n and come back whole through mcopy and 7-Zip",
  ignore: skip(["fsck.fat", "mcopy", "7zz"]),
  fn: () =>
    withTemp(async (dir) => {
      for (const [seed, fatType] of [[1, 12], [2, 16], [3, 32]] as const) {
        const files = randomTree(seed, 150);
        const disk = await openTree(memoryTree(files), { fatType });
        const sink = memorySink();
        await convert(disk, sink);
        await Deno.writeFile(`${dir}/disk.raw`, sink.bytes());
        const checked = await fsck(dir, `${dir}/disk.raw`);
        assertEquals(checked.code, 0, checked.output);
        assertEquals(checked.output.split("\n").length, 2, checked.output);
        const want = snapshotFiles(files);

        // 7-Zip reads the long names whole, surrogate pairs included.
        await Deno.writeFile(
          `${dir}/partition.img`,
          sink.bytes().subarray(partitionOffset(sink.bytes())),
        );
        const zipOut = `${dir}/7z${seed}`;
        const z = await run("env", [
          "LANG=C.UTF-8",
          "7zz",
          "x",
          "-y",
          `-o${zipOut}`,
          `${dir}/partition.img`,
        ], { allowFail: true });
        assertEquals(z.code, 0, z.text + z.stderr);
        assertEquals(await snapshotDir(zipOut), want, `seed ${seed}, 7zz`);

        // mtools 4.0.32 shows each half of a surrogate pair as "_".
        const out = `${dir}/out${seed}`;
        await Deno.mkdir(out);
        const r = await mtools("mcopy", [
          "-s",
          "-i",
          `${dir}/disk.raw@@${partitionOffset(sink.bytes())}`,
          "::/",
          out,
        ]);
        assertEquals(r.code, 0, r.stderr);
        const astral = /[\u{10000}-\u{10ffff}]/gu;
        assertEquals(
          await snapshotDir(out),
          new Map([...want].map(([k, v]) => [k.replace(astral, "__"), v])),
          `seed ${seed}, mcopy`,
        );
      }
    }),
});
