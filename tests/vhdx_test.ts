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
  streamSink,
  UnsupportedError,
  vhdx,
} from "../mod.ts";
import { crc32c } from "../drivers/codecs/crc32c.ts";
import {
  assertBoundedWork,
  assertQemuIdentical,
  cli,
  countingSource,
  pseudoRandom,
  qemuIo,
  readAll,
  referenceFile,
  rejects,
  run,
  runs,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";
import { qemuRaw } from "./_layers.ts";

const MiB = 1 << 20;

/** A disk of `size` bytes: pseudo-random 64 KiB runs with holes between. */
function sampleDisk(size: number, seed = 5): Uint8Array<ArrayBuffer> {
  const disk = new Uint8Array(size);
  const random = pseudoRandom(size, seed);
  for (let at = 0; at < size; at += 65536) {
    if ((at / 65536) % 37 < 3) {
      disk.set(random.subarray(at, Math.min(size, at + 65536)), at);
    }
  }
  return disk;
}

const qemuMade: [string, string[]][] = [
  ["dynamic", []],
  ["fixed", ["-o", "subformat=fixed"]],
  ["block_size=1M", ["-o", "block_size=1M"]],
  ["block_size=32M,log_size=4M", ["-o", "block_size=32M,log_size=4M"]],
  ["block_state_zero=off", ["-o", "block_state_zero=off"]],
  ["preallocation=full", ["-o", "preallocation=full"]],
];
for (const [what, args] of qemuMade) {
  Deno.test({
    name: `a vhdx qemu-img converts (${what}) reads as qemu-img's raw bytes`,
    ignore: skip(["qemu-img"]),
    fn: () =>
      withTemp(async (dir) => {
        const disk = sampleDisk(40 * MiB + 3 * 512, 3);
        await Deno.writeFile(`${dir}/src.raw`, disk);
        await run("qemu-img", [
          "convert",
          "-f",
          "raw",
          "-O",
          "vhdx",
          ...args,
          `${dir}/src.raw`,
          `${dir}/d.vhdx`,
        ]);
        const expected = await qemuRaw(`${dir}/d.vhdx`, dir, "vhdx");
        const before = await sha256File(`${dir}/d.vhdx`);
        const source = await fromFile(`${dir}/d.vhdx`);
        assertEquals((await probe(source))[0].format, "vhdx");
        const image = await open(source);
        assertEquals(image.format, "vhdx");
        assertEquals(image.size, expected.length);
        assertEquals(sha256Hex(await readAll(image)), sha256Hex(expected));
        const sink = memorySink();
        await convert(image, sink);
        assertEquals(sha256Hex(sink.bytes()), sha256Hex(expected));
        await image.close?.();
        assertEquals(await sha256File(`${dir}/d.vhdx`), before);
      }),
  });
}

Deno.test({
  name:
    "a vhdx written by qemu-io (data, holes, zero writes, rewrites) reads as qemu-img's raw bytes",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      const path = `${dir}/d.vhdx`;
      await run("qemu-img", [
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        path,
        "9M",
      ]);
      await qemuIo(
        "vhdx",
        path,
        "write -P 0x11 0 512",
        "write -P 0x22 3145728 65536",
        "write -z 5242880 1048576",
        "write -P 0x33 7340032 4096",
        "write -P 0x44 3146240 1024",
        "write -z 7340032 512",
        "write -P 0x55 9436672 512",
      );
      const expected = await qemuRaw(path, dir, "vhdx");
      const image = await open(await fromFile(path));
      assertEquals(image.size, 9 * MiB);
      assertEquals(sha256Hex(await readAll(image)), sha256Hex(expected));
      const kinds = (await runs(image)).map((e) => e.kind);
      assertTrue(kinds.includes("data"), kinds.join());
      await image.close?.();
    }),
});

Deno.test({
  name:
    "the reference vhdx with a pending log is replayed in memory: qemu's bytes after its replay, the input unchanged",
  ignore: skip(["qemu-img", "bzip2"], true),
  fn: () =>
    withTemp(async (dir) => {
      const path = await referenceFile(
        "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2",
        dir,
      );
      const before = await sha256File(path!);
      // qemu replays the log by writing it into a copy.
      await Deno.copyFile(path!, `${dir}/q.vhdx`);
      await run("qemu-img", ["check", "-r", "all", `${dir}/q.vhdx`]);
      await run("qemu-img", [
        "dd",
        "-f",
        "vhdx",
        "-O",
        "raw",
        `if=${dir}/q.vhdx`,
        `of=${dir}/q.raw`,
        "bs=1M",
        "count=64",
      ]);
      const expected = await Deno.readFile(`${dir}/q.raw`);
      const image = await open(await fromFile(path!));
      assertEquals(image.size, 10 * 1024 * MiB);
      assertEquals(image.details?.logReplayedInMemory, 1);
      assertEquals(
        sha256Hex(await image.read(0, 64 * MiB)),
        sha256Hex(expected),
      );
      // The rest of the disk is not stored.
      const map = await runs(image);
      assertEquals(map.at(-1)?.kind, "unallocated");
      assertTrue(map.at(-1)!.offset <= 64 * MiB);
      await image.close?.();
      assertEquals(await sha256File(path!), before);
      // Without the replay the bytes differ: the log matters.
      const bytes = await Deno.readFile(path!);
      for (const at of [64 * 1024, 128 * 1024]) {
        bytes.fill(0, at + 48, at + 64); // log GUID
        fixHeader(bytes, at);
      }
      const stale = await open(fromBytes(bytes));
      assertEquals(stale.details?.logReplayedInMemory, 0);
      assertTrue(
        sha256Hex(await stale.read(0, 64 * MiB)) !== sha256Hex(expected),
      );
    }),
});

Deno.test({
  name: "the reference dynamic vhdx reads as its listed hash",
  ignore: skip(["bzip2"], true),
  fn: () =>
    withTemp(async (dir) => {
      const path = await referenceFile(
        "qemu-iotests/iotest-dynamic-1G.vhdx.bz2",
        dir,
      );
      const image = await open(await fromFile(path!));
      const h = await import("node:crypto").then((c) => c.createHash("sha256"));
      for (let at = 0; at < image.size; at += 8 * MiB) {
        h.update(await image.read(at, 8 * MiB));
      }
      assertEquals(
        h.digest("hex"),
        "d3d112d8dab7fd360609f7d5a7b769904b7a2a7d7b6b8c535f65a23293c05478",
      );
      await image.close?.();
    }),
});

const ourOptions: Record<string, string>[] = [
  {},
  { subformat: "fixed" },
  { block_size: "1M" },
  { block_size: "16M", log_size: "2M" },
  { logical_sector_size: "4096" },
];
for (const options of ourOptions) {
  Deno.test({
    name: `a vhdx we convert to (${
      JSON.stringify(options)
    }) passes qemu-img check and compare, and 7-Zip extracts it`,
    ignore: skip(["qemu-img", "7zz"]),
    fn: () =>
      withTemp(async (dir) => {
        // 7-Zip 26.02 refuses 4096-byte-sector files whose size is not a
        // multiple of 8 KiB (20 MiB + 4 KiB fails); this size suits all.
        const disk = sampleDisk(20 * MiB + 8192, 9);
        await Deno.writeFile(`${dir}/src.raw`, disk);
        const out = await createOutputFile(`${dir}/out.vhdx`);
        await convert(fromBytes(disk), out, { format: "vhdx", options });
        await out.commit();
        // QEMU reads only 512-byte logical sectors.
        if (options.logical_sector_size !== "4096") {
          await run("qemu-img", ["check", "-f", "vhdx", `${dir}/out.vhdx`]);
          await assertQemuIdentical(
            `${dir}/src.raw`,
            `${dir}/out.vhdx`,
            "vhdx",
          );
        }
        await run("7zz", ["x", "-y", `-o${dir}/x`, `${dir}/out.vhdx`]);
        const names = [...Deno.readDirSync(`${dir}/x`)].map((e) => e.name);
        assertEquals(names.length, 1, names.join(","));
        const extracted = await Deno.readFile(`${dir}/x/${names[0]}`);
        assertEquals(sha256Hex(extracted), sha256Hex(disk));
        const image = await open(await fromFile(`${dir}/out.vhdx`));
        assertEquals(sha256Hex(await readAll(image)), sha256Hex(disk));
        assertEquals(
          image.details?.logicalSectorSize,
          Number(options.logical_sector_size ?? 512),
        );
        await image.close?.();
      }),
  });
}

// Images built from the specification: a differencing file.

/** CRC-32C put back into the header at `at`. */
function fixHeader(bytes: Uint8Array, at: number) {
  const v = new DataView(bytes.buffer, bytes.byteOffset);
  v.setUint32(at + 4, 0, true);
  v.setUint32(at + 4, crc32c(bytes.subarray(at, at + 4096)), true);
}

/** CRC-32C put back into both region tables. */
function fixRegions(bytes: Uint8Array) {
  const v = new DataView(bytes.buffer, bytes.byteOffset);
  for (const at of [192 * 1024, 256 * 1024]) {
    v.setUint32(at + 4, 0, true);
    v.setUint32(at + 4, crc32c(bytes.subarray(at, at + 65536)), true);
  }
}

async function ours(disk: Uint8Array, options = {}): Promise<Uint8Array> {
  const sink = memorySink();
  await convert(fromBytes(disk), sink, {
    format: "vhdx",
    options: { block_size: "1M", ...options },
  });
  return sink.bytes().slice();
}

/** Where the region table puts `guid`'s region: [offset, length]. */
function region(bytes: Uint8Array, first: number): [number, number] {
  const v = new DataView(bytes.buffer, bytes.byteOffset);
  const count = v.getUint32(192 * 1024 + 8, true);
  for (let i = 0; i < count; i++) {
    const o = 192 * 1024 + 16 + i * 32;
    if (bytes[o] === first) {
      return [Number(v.getBigUint64(o + 16, true)), v.getUint32(o + 24, true)];
    }
  }
  throw new Error("no such region");
}
const batRegion = (b: Uint8Array) => region(b, 0x66);
const metadataRegion = (b: Uint8Array) => region(b, 0x06);

function utf16(text: string): Uint8Array {
  const out = new Uint8Array(text.length * 2);
  for (let i = 0; i < text.length; i++) {
    out[i * 2] = text.charCodeAt(i);
    out[i * 2 + 1] = text.charCodeAt(i) >> 8;
  }
  return out;
}

/**
 * A differencing vhdx over a 4 MiB parent, built from the specification:
 * block 0 fully present, block 1 partially present (every other 4 KiB
 * run of sectors), block 2 not present (the parent's), block 3 zero.
 */
async function differencingPair() {
  const base = pseudoRandom(4 * MiB, 21);
  const baseFile = await ours(base);
  const linkage = (await open(fromBytes(baseFile))).details
    ?.dataWriteGuid as string;
  const topDisk = pseudoRandom(4 * MiB, 22);
  const top = await ours(topDisk, {});
  const v = new DataView(top.buffer);
  const [meta] = metadataRegion(top);
  // File parameters: has_parent.
  const paramsAt = meta + v.getUint32(meta + 32 + 16, true);
  v.setUint32(paramsAt + 4, 2, true);
  // A parent locator item: metadata table entry 5, its bytes at 8 KiB.
  const pairs: [string, string][] = [
    ["parent_linkage", `{${linkage.toUpperCase()}}`],
    ["relative_path", ".\\base.vhdx"],
  ];
  const item = new Uint8Array(1024);
  const iv = new DataView(item.buffer);
  const typeGuid = [
    0xb7,
    0xef,
    0x4a,
    0xb0,
    0x9e,
    0xd1,
    0x81,
    0x4a,
    0xb7,
    0x89,
    0x25,
    0xb8,
    0xe9,
    0x44,
    0x59,
    0x13,
  ];
  item.set(typeGuid, 0);
  iv.setUint16(18, pairs.length, true);
  let at = 20 + pairs.length * 12;
  pairs.forEach(([k, val], i) => {
    const kb = utf16(k);
    const vb = utf16(val);
    iv.setUint32(20 + i * 12, at, true);
    item.set(kb, at);
    at += kb.length;
    iv.setUint32(20 + i * 12 + 4, at, true);
    item.set(vb, at);
    at += vb.length;
    iv.setUint16(20 + i * 12 + 8, kb.length, true);
    iv.setUint16(20 + i * 12 + 10, vb.length, true);
  });
  const entry = meta + 32 + 5 * 32;
  top.set(
    [
      0x2d,
      0x5f,
      0xd3,
      0xa8,
      0x0b,
      0xb3,
      0x4d,
      0x45,
      0xab,
      0xf7,
      0xd3,
      0xd8,
      0x48,
      0x34,
      0xab,
      0x0c,
    ],
    entry,
  );
  v.setUint32(entry + 16, 128 * 1024, true);
  v.setUint32(entry + 20, at, true);
  v.setUint32(entry + 24, 4, true);
  top.set(item.subarray(0, at), meta + 128 * 1024);
  v.setUint16(meta + 10, 6, true);
  // BAT: blocks 0-3 then the sector bitmap entry at 4096 (chunk ratio).
  const [bat] = batRegion(top);
  const blockAt = (b: number) => (v.getUint32(bat + b * 8, true) >>> 20) * MiB;
  const state = (b: number, s: number, offsetMiB?: number) => {
    const lo = v.getUint32(bat + b * 8, true);
    v.setUint32(
      bat + b * 8,
      ((offsetMiB === undefined ? lo & ~7 : offsetMiB << 20) | s) >>> 0,
      true,
    );
  };
  state(1, 7);
  state(2, 0, 0);
  state(3, 2, 0);
  // The sector bitmap block, appended at the end of the file.
  const bitmapAt = top.length;
  state(4096, 6, bitmapAt / MiB);
  const bitmap = new Uint8Array(MiB);
  const expected = base.slice();
  expected.set(topDisk.subarray(0, MiB), 0);
  for (let s = 2048; s < 4096; s++) {
    if (Math.floor(s / 8) % 2 === 0) {
      bitmap[s >> 3] |= 1 << (s & 7);
      expected.set(topDisk.subarray(s * 512, s * 512 + 512), s * 512);
    }
  }
  expected.fill(0, 3 * MiB, 4 * MiB);
  assertEquals(blockAt(1) > 0, true);
  const file = new Uint8Array(top.length + MiB);
  file.set(top);
  file.set(bitmap, bitmapAt);
  return { top: file, base: baseFile, expected };
}

Deno.test("a differencing vhdx reads through its parent, named by the parent locator", async () => {
  const { top, base, expected } = await differencingPair();
  const alone = await open(fromBytes(top));
  assertEquals(alone.details?.subformat, "differencing");
  assertEquals(alone.backingFile, "base.vhdx");
  assertEquals(
    sha256Hex(await alone.read(0, MiB)),
    sha256Hex(expected.subarray(0, MiB)),
  );
  await rejects(
    () => alone.read(MiB + 4096, 4096),
    BackingFileError,
    /parent/,
  );
  const kinds = new Set((await runs(alone)).map((e) => e.kind));
  assertEquals([...kinds].sort(), ["data", "unallocated", "zero"]);
  const image = await open(fromBytes(top), {
    resolveBacking: (name) => {
      assertEquals(name, "base.vhdx");
      return Promise.resolve(fromBytes(base));
    },
  });
  assertEquals(sha256Hex(await readAll(image)), sha256Hex(expected));
});

// Malformed input: one typed error each, with bounded work.

async function refused(
  bytes: Uint8Array,
  pattern: RegExp,
  type: typeof ImageFormatError = ImageFormatError,
) {
  const counted = countingSource(bytes);
  await rejects(
    async () => {
      const image = await open(counted.source, { format: "vhdx" });
      await readAll(image);
    },
    type,
    pattern,
  );
  assertBoundedWork(counted, bytes.length);
}

Deno.test("a vhdx with both headers broken is refused; with one, the other is used", async () => {
  const good = await ours(sampleDisk(3 * MiB));
  const bad = good.slice();
  bad[64 * 1024] = 0x58; // header 1's signature
  bad[128 * 1024 + 200] ^= 1; // header 2's checksum no longer matches
  await refused(bad, /neither header is valid.*signature.*checksum/);
  // Header 2 (sequence 2) is current; broken, header 1 serves.
  const one = good.slice();
  one[128 * 1024 + 200] ^= 1;
  const image = await open(fromBytes(one));
  assertEquals(image.details?.activeHeader, 1);
  assertEquals((await open(fromBytes(good))).details?.activeHeader, 2);
});

Deno.test("a vhdx region table or BAT outside the file is refused", async () => {
  const good = await ours(sampleDisk(3 * MiB));
  const v = (b: Uint8Array) => new DataView(b.buffer);
  // The BAT region (entry 0) moved past the end.
  const far = good.slice();
  v(far).setBigUint64(192 * 1024 + 32, 1n << 40n, true);
  fixRegions(far);
  await refused(far, /region\[0\]/);
  // Both region tables broken.
  const broken = good.slice();
  broken[192 * 1024] = 0;
  broken[256 * 1024] = 0;
  await refused(broken, /neither region table/);
  // A BAT entry pointing past the end of the file.
  const entry = good.slice();
  const [bat] = batRegion(entry);
  v(entry).setUint32(bat, (4000 << 20) | 6, true);
  await refused(entry, /BAT\[0\]/);
  // A reserved state.
  const reserved = good.slice();
  v(reserved).setUint32(bat, v(reserved).getUint32(bat, true) & ~7 | 4, true);
  await refused(reserved, /BAT\[0\]/);
});

Deno.test("vhdx metadata out of range is refused", async () => {
  const good = await ours(sampleDisk(3 * MiB));
  const [meta] = metadataRegion(good);
  const v = (b: Uint8Array) => new DataView(b.buffer);
  const item = (b: Uint8Array, i: number) =>
    meta + v(b).getUint32(meta + 32 + i * 32 + 16, true);
  for (const size of [0, 512 * 1024, 3 * MiB, 512 * MiB]) {
    const b = good.slice();
    v(b).setUint32(item(b, 0), size, true);
    await refused(b, /block_size/);
  }
  const sector = good.slice();
  v(sector).setUint32(item(sector, 3), 1000, true);
  await refused(sector, /logical_sector_size/);
  const huge = good.slice();
  v(huge).setBigUint64(item(huge, 1), 1n << 60n, true);
  await refused(huge, /virtual_disk_size/);
  const big = good.slice();
  v(big).setBigUint64(item(big, 1), 60n << 40n, true);
  await refused(big, /BAT region length/);
  const outside = good.slice();
  v(outside).setUint32(meta + 32 + 16, 0x7fffffff, true);
  await refused(outside, /metadata\[0\]/);
  const count = good.slice();
  v(count).setUint16(meta + 10, 60000, true);
  await refused(count, /entry_count/);
  const required = good.slice();
  required[meta + 32 + 2 * 32] ^= 0xff; // an unknown GUID, flagged required
  await refused(required, /required metadata item/, UnsupportedError);
});

Deno.test("a vhdx log outside the file, or one too big to replay, is refused", async () => {
  const good = await ours(sampleDisk(3 * MiB));
  const v = (b: Uint8Array) => new DataView(b.buffer);
  const withLog = (offset: bigint, length: number) => {
    const b = good.slice();
    for (const at of [64 * 1024, 128 * 1024]) {
      b[at + 48] = 1; // a log GUID: the log must be replayed
      v(b).setUint32(at + 68, length, true);
      v(b).setBigUint64(at + 72, offset, true);
      fixHeader(b, at);
    }
    return b;
  };
  await refused(withLog(1n << 40n, MiB), /log_offset/);
  await refused(withLog(BigInt(MiB), 1000), /log_length/);
  // A log GUID with no valid entry: nothing to replay.
  const empty = await open(fromBytes(withLog(BigInt(MiB), MiB)));
  assertEquals(empty.details?.logReplayedInMemory, 0);
  // A truncated file is the vhdx's error.
  await refused(good.subarray(0, 200 * 1024), /file size/);
  await refused(good.subarray(0, good.length - MiB), /BAT\[|read offset/);
});

Deno.test("a vhdx we create and write reads back; one with a log to replay is never opened writable", async () => {
  for (
    const options of [{}, { subformat: "fixed" }, {
      logical_sector_size: "4096",
      block_size: "1M",
    }] as Record<string, string>[]
  ) {
    const sink = memorySink();
    const image = await vhdx.create!(sink, { size: 5 * MiB, options });
    const disk = new Uint8Array(5 * MiB);
    for (
      const [at, n, seed] of [[1000, 5000, 1], [2 * MiB - 100, 300, 2], [
        5 * MiB - 4096,
        4096,
        3,
      ]]
    ) {
      const data = pseudoRandom(n, seed);
      disk.set(data, at);
      await image.write!(at, data);
    }
    await image.flush!();
    const back = await open(fromBytes(sink.bytes()));
    assertEquals(sha256Hex(await readAll(back)), sha256Hex(disk));
  }
  const good = await ours(sampleDisk(3 * MiB));
  for (const at of [64 * 1024, 128 * 1024]) {
    good[at + 48] = 1;
    fixHeader(good, at);
  }
  const sink = memorySink();
  await rejects(
    () => open(fromBytes(good), { writable: true, sink }),
    UnsupportedError,
    /log to replay/,
  );
  assertEquals(sink.bytes().length, 0);
});

// A log built from the specification: entries (one wrapping around the end
// of the circular log), data and zero descriptors.

interface LogWrite {
  offset: number;
  data?: Uint8Array; // 4 KiB
  zeroLength?: number;
}

/** One log entry's bytes: header, descriptors, data sectors. */
function logEntry(
  sequence: bigint,
  tail: number,
  guid: Uint8Array,
  writes: LogWrite[],
  fileSize: number,
): Uint8Array {
  const descSectors = Math.ceil((writes.length + 2) / 128);
  const dataSectors = writes.filter((w) => w.data).length;
  const length = (descSectors + dataSectors) * 4096;
  const e = new Uint8Array(length);
  const v = new DataView(e.buffer);
  e.set(new TextEncoder().encode("loge"), 0);
  v.setUint32(8, length, true);
  v.setUint32(12, tail, true);
  v.setBigUint64(16, sequence, true);
  v.setUint32(24, writes.length, true);
  e.set(guid, 32);
  v.setBigUint64(48, BigInt(fileSize), true);
  v.setBigUint64(56, BigInt(fileSize), true);
  let data = descSectors * 4096;
  writes.forEach((w, i) => {
    const d = 64 + i * 32;
    if (w.data) {
      e.set(new TextEncoder().encode("desc"), d);
      e.set(w.data.subarray(4092, 4096), d + 4); // trailing bytes
      e.set(w.data.subarray(0, 8), d + 8); // leading bytes
      e.set(new TextEncoder().encode("data"), data);
      v.setUint32(data + 4, Number(sequence >> 32n), true);
      e.set(w.data.subarray(8, 4092), data + 8);
      v.setUint32(data + 4092, Number(sequence & 0xffffffffn), true);
      data += 4096;
    } else {
      e.set(new TextEncoder().encode("zero"), d);
      v.setBigUint64(d + 8, BigInt(w.zeroLength!), true);
    }
    v.setBigUint64(d + 16, BigInt(w.offset), true);
    v.setBigUint64(d + 24, sequence, true);
  });
  v.setUint32(4, crc32c(e), true);
  return e;
}

/** Our vhdx with a log of `entries` placed at the given log offsets. */
async function withLog(
  place: (guid: Uint8Array, base: Uint8Array) => [number, Uint8Array][],
) {
  const base = await ours(sampleDisk(3 * MiB, 12), { block_size: "1M" });
  const file = base.slice();
  const guid = new Uint8Array(16).fill(0x5a);
  const logAt = MiB; // our writer puts the 1 MiB log at 1 MiB
  for (const [at, bytes] of place(guid, base)) {
    for (let i = 0; i < bytes.length; i++) {
      file[logAt + ((at + i) % MiB)] = bytes[i];
    }
  }
  for (const at of [64 * 1024, 128 * 1024]) {
    file.set(guid, at + 48);
    fixHeader(file, at);
  }
  return { base, file };
}

for (const wrap of [false, true]) {
  Deno.test(`a log built from the specification (${wrap ? "wrapping around the log's end" : "in order"}; data and zero descriptors) is replayed in memory`, async () => {
    const page = pseudoRandom(4096, 77);
    let expectedFile: Uint8Array | undefined;
    const { file } = await withLog((guid, base) => {
      const [bat] = batRegion(base);
      const block0 = (new DataView(base.buffer).getUint32(bat, true) >>> 20) *
        MiB;
      // Block 2 mapped onto block 0's bytes, through a rewritten BAT page.
      const batPage = base.slice(bat, bat + 4096);
      new DataView(batPage.buffer).setUint32(
        16,
        (block0 / MiB) << 20 | 6,
        true,
      );
      new DataView(batPage.buffer).setUint32(20, 0, true);
      const first: LogWrite[] = [{ offset: block0 + 8192, data: page }];
      const second: LogWrite[] = [
        { offset: block0 + 16384, zeroLength: 8192 },
        { offset: bat, data: batPage },
      ];
      expectedFile = base.slice();
      expectedFile.set(page, block0 + 8192);
      expectedFile.fill(0, block0 + 16384, block0 + 24576);
      expectedFile.set(batPage, bat);
      const L = MiB;
      const stale = logEntry(
        3n,
        0,
        new Uint8Array(16).fill(1),
        first,
        base.length,
      );
      const start = wrap ? L - 4096 : 0;
      const a = logEntry(10n, start, guid, first, base.length);
      const b = logEntry(11n, start, guid, second, base.length);
      return [[8192 * 4, stale], [start, a], [(start + a.length) % L, b]];
    });
    const before = sha256Hex(file);
    const image = await open(fromBytes(file));
    assertEquals(image.details?.logReplayedInMemory, 2);
    const expected = await open(fromBytes(expectedFile!));
    assertEquals(
      sha256Hex(await readAll(image)),
      sha256Hex(await readAll(expected)),
    );
    assertEquals(sha256Hex(file), before);
    // Block 2 now reads block 0's (changed) bytes.
    assertEquals(
      sha256Hex(await image.read(2 * MiB, MiB)),
      sha256Hex(await image.read(0, MiB)),
    );
    // qemu replays the same log (into a copy) to the same bytes. Not when
    // it wraps: qemu 7.2 then takes the head entry alone for the active
    // sequence (it ranks sequences by their first entry), where the
    // specification replays from the head's tail.
    if (!wrap && !skip(["qemu-img"])) {
      await withTemp(async (dir) => {
        await Deno.writeFile(`${dir}/l.vhdx`, file);
        await run("qemu-img", ["check", "-r", "all", `${dir}/l.vhdx`]);
        const replayed = await qemuRaw(`${dir}/l.vhdx`, dir, "vhdx");
        assertEquals(sha256Hex(await readAll(image)), sha256Hex(replayed));
      });
    }
  });
}

Deno.test("a log whose active sequence is broken is refused, not half replayed", async () => {
  const { file } = await withLog((guid, base) => {
    const w: LogWrite[] = [{ offset: 2 * MiB, zeroLength: 4096 }];
    const a = logEntry(10n, 0, guid, w, base.length);
    // The head names the entry at 0 as its tail, but skips a number.
    const b = logEntry(12n, 0, guid, w, base.length);
    return [[0, a], [a.length, b]];
  });
  await refused(file, /active sequence is broken|does not follow/);
});

Deno.test({
  name:
    "convert -O vhdx -B writes a differencing vhdx (parent locator, has_parent) that reads through its parent, and 7-Zip extracts to the same bytes",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const size = 20 * MiB;
      const base = sampleDisk(size, 31);
      await Deno.writeFile(`${dir}/base.raw`, base);
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M",
        `${dir}/base.raw`,
        `${dir}/base.vhdx`,
      ]);
      const mod = base.slice();
      mod.set(pseudoRandom(3000, 32), 5 * MiB + 100); // part of a block
      mod.set(pseudoRandom(MiB, 33), 9 * MiB); // a whole block
      await Deno.writeFile(`${dir}/mod.raw`, mod);
      const made = await cli([
        "convert",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M",
        "-B",
        "base.vhdx",
        `${dir}/mod.raw`,
        `${dir}/top.vhdx`,
      ]);
      assertEquals(made.code, 0, made.stderr);
      const top = await open(await fromFile(`${dir}/top.vhdx`));
      assertEquals(top.details?.subformat, "differencing");
      assertEquals(top.backingFile, "base.vhdx");
      const locator = top.details?.parentLocator as Record<string, string>;
      const parent = await open(await fromFile(`${dir}/base.vhdx`));
      assertEquals(
        locator.parent_linkage,
        `{${parent.details?.dataWriteGuid}}`,
      );
      assertEquals(locator.relative_path, ".\\base.vhdx");
      // Only what differs is stored: the whole block, and the sectors of
      // the part of a block (partially present, the rest the parent's).
      const kinds = (await runs(top)).filter((r) => r.kind === "data");
      const stored = kinds.reduce((n, r) => n + r.length, 0);
      assertTrue(stored >= MiB + 3000 && stored <= MiB + 8192, `${stored}`);
      await top.close?.();
      await parent.close?.();
      const back = await cli([
        "convert",
        `${dir}/top.vhdx`,
        `${dir}/back.raw`,
      ]);
      assertEquals(back.code, 0, back.stderr);
      assertEquals(await sha256File(`${dir}/back.raw`), sha256Hex(mod));
      const same = await cli(["compare", `${dir}/top.vhdx`, `${dir}/mod.raw`]);
      assertEquals(same.code, 0, same.text + same.stderr);
      // qemu-img 7.2 refuses differencing vhdx files (it has no parent
      // support), so the file's own bytes are checked against MS-VHDX.
      const bytes = await Deno.readFile(`${dir}/top.vhdx`);
      const v = new DataView(bytes.buffer);
      const [meta] = metadataRegion(bytes);
      const paramsAt = meta + v.getUint32(meta + 32 + 16, true);
      assertEquals(v.getUint32(paramsAt + 4, true), 2); // has_parent
      const count = v.getUint16(meta + 10, true);
      let found = false;
      for (let i = 0; i < count; i++) {
        const entry = meta + 32 + i * 32;
        if (bytes[entry] === 0x2d && bytes[entry + 3] === 0xa8) {
          found = true;
          assertEquals(v.getUint32(entry + 24, true) & 4, 4); // required
        }
      }
      assertTrue(found, "no parent locator item");
      // 7-Zip follows relative_path to the parent (in the same folder).
      if (!skip(["7zz"])) {
        await run("7zz", ["x", "-y", `-o${dir}/x`, `${dir}/top.vhdx`]);
        const names = [...Deno.readDirSync(`${dir}/x`)].map((e) => e.name);
        assertEquals(names.length, 1, names.join(","));
        const extracted = await Deno.readFile(`${dir}/x/${names[0]}`);
        assertEquals(sha256Hex(extracted), sha256Hex(mod));
      }
    }),
});

Deno.test({
  name:
    "create -f vhdx -b makes an empty differencing vhdx; a parent whose data write GUID is not parent_linkage is refused",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const base = sampleDisk(8 * MiB, 41);
      await Deno.writeFile(`${dir}/base.raw`, base);
      for (const name of ["base.vhdx", "other.vhdx"]) {
        await run("qemu-img", [
          "convert",
          "-f",
          "raw",
          "-O",
          "vhdx",
          `${dir}/base.raw`,
          `${dir}/${name}`,
        ]);
      }
      const made = await cli([
        "create",
        "-f",
        "vhdx",
        "-b",
        "base.vhdx",
        `${dir}/top.vhdx`,
        "8M",
      ]);
      assertEquals(made.code, 0, made.stderr);
      const back = await cli(["convert", `${dir}/top.vhdx`, `${dir}/b.raw`]);
      assertEquals(back.code, 0, back.stderr);
      assertEquals(await sha256File(`${dir}/b.raw`), sha256Hex(base));
      // The same name, another file: refused by its data write GUID.
      await Deno.rename(`${dir}/other.vhdx`, `${dir}/base.vhdx`);
      const wrong = await cli(["convert", `${dir}/top.vhdx`, `${dir}/w.raw`]);
      assertTrue(wrong.code !== 0, wrong.stderr);
      assertTrue(
        /links its parent by identity vhdx/.test(wrong.stderr),
        wrong.stderr,
      );
      // Another size, a raw parent, fixed: refused.
      for (
        const [args, why] of [
          [["-b", "base.vhdx", `${dir}/t2.vhdx`, "9M"], /parent's size/],
          [
            ["-b", "base.raw", "-F", "raw", `${dir}/t3.vhdx`, "8M"],
            /is a raw image/,
          ],
          [
            [
              "-o",
              "subformat=fixed",
              "-b",
              "base.vhdx",
              `${dir}/t4.vhdx`,
              "8M",
            ],
            /dynamic for a differencing/,
          ],
        ] as const
      ) {
        const r = await cli(["create", "-f", "vhdx", ...args]);
        assertTrue(r.code !== 0 && why.test(r.stderr), r.stderr);
      }
      // Its parent replaced by another file, it is not written into.
      const w = await cli(["write", `${dir}/top.vhdx`, "0", `${dir}/base.raw`]);
      assertTrue(w.code !== 0, w.stderr);
    }),
});

// Writes into a differencing vhdx opened later: partially present blocks.

/** The state (bits 0-2) and file offset of BAT entry `index`. */
function batEntryOf(bytes: Uint8Array, index: number): [number, number] {
  const [bat] = batRegion(bytes);
  const v = new DataView(bytes.buffer, bytes.byteOffset);
  const lo = v.getUint32(bat + index * 8, true);
  const hi = v.getUint32(bat + index * 8 + 4, true);
  return [lo & 7, ((lo >>> 20) + hi * 4096) * MiB];
}

/** A parent (ours, dynamic, `size` bytes of pseudo-random data) and an empty child made by create -b. */
async function emptyChild(size: number, options: Record<string, string> = {}) {
  const base = await ours(pseudoRandom(size, 61), options);
  const parent = await open(fromBytes(base));
  const sink = memorySink();
  const made = await vhdx.create!(sink, {
    size,
    backingFile: "base.vhdx",
    backing: parent,
    options: { block_size: "1M", ...options },
  });
  await made.flush!();
  return { base, child: sink.bytes().slice(), parent };
}

Deno.test("writes into a differencing vhdx opened later store only the written sectors, partially present with a sector bitmap; the parent shows through the rest", async () => {
  const size = 6 * MiB;
  const { base, child } = await emptyChild(size);
  const expected = (await readAll(await open(fromBytes(base)))).slice();
  const sink = memorySink(child);
  const image = await open(sink, {
    writable: true,
    resolveBacking: () => Promise.resolve(fromBytes(base)),
  });
  const writes: [number, number][] = [
    [MiB + 100, 3000], // part of block 1, sectors unaligned
    [MiB + 700_000, 512], // more of block 1
    [3 * MiB, MiB], // block 3 whole
    [4 * MiB - 512, 1024], // the end of block 3 and the start of block 4
    [5 * MiB + 4096, 8192], // block 5
  ];
  for (const [i, [at, n]] of writes.entries()) {
    const data = pseudoRandom(n, 70 + i);
    expected.set(data, at);
    await image.write!(at, data);
  }
  await image.flush!();
  assertEquals(sha256Hex(await readAll(image)), sha256Hex(expected));
  const bytes = sink.bytes();
  // Block 1 and 5 partially present, 3 fully present, 0 and 2 the parent's;
  // block 4 partially present (its first sector); one bitmap block for the
  // chunk (entry 4096: the chunk ratio of 1 MiB blocks, 512-byte sectors).
  assertEquals(
    [0, 1, 2, 3, 4, 5].map((b) => batEntryOf(bytes, b)[0]),
    [0, 7, 0, 6, 7, 7],
  );
  const [sbState, sbAt] = batEntryOf(bytes, 4096);
  assertEquals(sbState, 6);
  const bits = (block: number, sector: number) =>
    (bytes[sbAt + block * 256 + (sector >> 3)] >> (sector & 7)) & 1;
  assertEquals([bits(1, 0), bits(1, 1), bits(1, 6), bits(1, 7)], [1, 1, 1, 0]);
  assertEquals([bits(4, 0), bits(4, 1), bits(5, 7), bits(5, 8)], [1, 0, 0, 1]);
  // Alone, the child holds only what was written.
  const alone = await open(fromBytes(bytes));
  const stored = (await runs(alone)).filter((r) => r.kind === "data")
    .reduce((n, r) => n + r.length, 0);
  assertEquals(stored, 3584 + 512 + MiB + 512 + 512 + 8192);
  await rejects(() => alone.read(MiB + 4096, 512), BackingFileError);
  // Reopened through its parent: the same bytes.
  const again = await open(fromBytes(bytes), {
    resolveBacking: () => Promise.resolve(fromBytes(base)),
  });
  assertEquals(sha256Hex(await readAll(again)), sha256Hex(expected));
  // The headers changed before the first write: a new data write GUID.
  assertTrue(
    again.details?.dataWriteGuid !==
      (await open(fromBytes(child))).details?.dataWriteGuid,
  );
});

Deno.test("a differencing vhdx opened writable without its parent takes whole sectors; part of a sector it does not hold is refused", async () => {
  const { child } = await emptyChild(2 * MiB);
  const sink = memorySink(child);
  const image = await open(sink, { writable: true });
  // Refused before anything is written (the headers too).
  await rejects(
    () => image.write!(MiB - 100, new Uint8Array(200)),
    UnsupportedError,
    /part of a 512-byte logical sector/,
  );
  assertEquals(sha256Hex(sink.bytes()), sha256Hex(child));
  await image.write!(1024, pseudoRandom(1024, 3));
  assertEquals(await image.read(1024, 1024), pseudoRandom(1024, 3));
  await rejects(
    () => image.write!(4096 + 10, new Uint8Array(100)),
    UnsupportedError,
    /part of a 512-byte logical sector/,
  );
  // Within a sector it holds, any bytes.
  await image.write!(1030, new Uint8Array([1, 2, 3]));
  const back = await image.read(1024, 16);
  assertEquals([...back.subarray(6, 9)], [1, 2, 3]);
  await rejects(() => image.read(0, 1024), BackingFileError);
});

Deno.test("a differencing vhdx with 4096-byte logical sectors takes a 512-byte write through its parent (the rest of the sector the parent's)", async () => {
  const size = 3 * MiB;
  const { base, child } = await emptyChild(size, {
    logical_sector_size: "4096",
  });
  const expected = (await readAll(await open(fromBytes(base)))).slice();
  const sink = memorySink(child);
  const image = await open(sink, {
    writable: true,
    resolveBacking: () => Promise.resolve(fromBytes(base)),
  });
  const data = pseudoRandom(512, 9);
  expected.set(data, MiB + 1024);
  await image.write!(MiB + 1024, data);
  await image.flush!();
  const bytes = sink.bytes();
  assertEquals(batEntryOf(bytes, 1)[0], 7);
  const again = await open(fromBytes(bytes), {
    resolveBacking: () => Promise.resolve(fromBytes(base)),
  });
  assertEquals(sha256Hex(await readAll(again)), sha256Hex(expected));
});

Deno.test("a differencing vhdx past 4 GiB: the second chunk gets its own sector bitmap block, after its chunk's payload entries", async () => {
  const size = 5 * 1024 * MiB;
  const sink = memorySink();
  const parent = await vhdx.create!(sink, {
    size,
    options: { block_size: "1M" },
  });
  await parent.write!(4608 * MiB, pseudoRandom(MiB, 5)); // block 4608
  await parent.flush!();
  const base = sink.bytes().slice();
  const { child } = await (async () => {
    const top = memorySink();
    await vhdx.create!(top, {
      size,
      backingFile: "base.vhdx",
      backing: await open(fromBytes(base)),
      options: { block_size: "1M" },
    });
    return { child: top.bytes().slice() };
  })();
  const top = memorySink(child);
  const image = await open(top, {
    writable: true,
    resolveBacking: () => Promise.resolve(fromBytes(base)),
  });
  const at = 4608 * MiB + 4096;
  await image.write!(at, new Uint8Array(1024).fill(0xaa));
  await image.flush!();
  const bytes = top.bytes();
  // Block 4608 is entry 4608 + 1 (one bitmap entry before it); the second
  // chunk's bitmap entry is 2 * 4097 - 1.
  assertEquals(batEntryOf(bytes, 4609)[0], 7);
  assertEquals(batEntryOf(bytes, 4096)[0], 0);
  assertEquals(batEntryOf(bytes, 8193)[0], 6);
  const again = await open(fromBytes(bytes), {
    resolveBacking: () => Promise.resolve(fromBytes(base)),
  });
  const expected = pseudoRandom(MiB, 5);
  expected.fill(0xaa, 4096, 5120);
  assertEquals(
    sha256Hex(await again.read(4608 * MiB, MiB)),
    sha256Hex(expected),
  );
});

Deno.test("a differencing vhdx whose sector bitmap entry is broken is refused on write, with bounded work", async () => {
  const { base, child } = await emptyChild(2 * MiB);
  // One partially present block first.
  const sink = memorySink(child);
  const image = await open(sink, { writable: true });
  await image.write!(MiB, new Uint8Array(512).fill(1));
  await image.flush!();
  const good = sink.bytes().slice();
  const [bat] = batRegion(good);
  const poke = (state: number, offsetMiB: number) => {
    const bytes = good.slice();
    new DataView(bytes.buffer).setUint32(
      bat + 4096 * 8,
      ((offsetMiB << 20) | state) >>> 0,
      true,
    );
    new DataView(bytes.buffer).setUint32(bat + 4096 * 8 + 4, 0, true);
    return bytes;
  };
  for (
    const [what, bytes] of [
      ["outside the file", poke(6, 4000)],
      ["state 3", poke(3, batEntryOf(good, 4096)[1] / MiB)],
      ["state 7", poke(7, batEntryOf(good, 4096)[1] / MiB)],
    ] as const
  ) {
    const counted = countingSource(bytes);
    const target = memorySink(bytes);
    await rejects(
      async () => {
        const broken = await open(counted.source, {
          writable: true,
          sink: target,
          resolveBacking: () => Promise.resolve(fromBytes(base)),
        });
        // Block 1 partially present: its bitmap is needed to write and read.
        await broken.write!(MiB + 4096, new Uint8Array(512));
      },
      ImageFormatError,
      /sector bitmap of chunk 0/,
    );
    assertBoundedWork(counted, bytes.length);
    void what;
  }
  // A payload entry in a state no file has (4) is refused too.
  const bytes = good.slice();
  bytes[bat + 8] = (bytes[bat + 8] & ~7) | 4;
  const target = memorySink(bytes);
  const broken = await open(fromBytes(bytes), { writable: true, sink: target });
  await rejects(
    () => broken.write!(MiB, new Uint8Array(512)),
    ImageFormatError,
    /reserved/,
  );
});

Deno.test({
  name:
    "the CLI writes and commits into a differencing vhdx opened later; 7-Zip extracts it through its parent to the parent overlaid by the writes, and the parent is untouched",
  ignore: skip(["qemu-img", "7zz"]),
  fn: () =>
    withTemp(async (dir) => {
      const size = 12 * MiB;
      const base = sampleDisk(size, 81);
      await Deno.writeFile(`${dir}/base.raw`, base);
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "-o",
        "block_size=2M",
        `${dir}/base.raw`,
        `${dir}/base.vhdx`,
      ]);
      const parentHash = await sha256File(`${dir}/base.vhdx`);
      const made = await cli([
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=2M",
        "-b",
        "base.vhdx",
        `${dir}/top.vhdx`,
        "12M",
      ]);
      assertEquals(made.code, 0, made.stderr);
      const expected = base.slice();
      const writes: [number, number][] = [
        [100, 700], // inside one block, unaligned
        [2 * MiB - 300, 5000], // across blocks 0 and 1
        [6 * MiB, 2 * MiB], // block 3 whole
        [11 * MiB + 123, 64 * 1024], // the last block
      ];
      for (const [i, [at, n]] of writes.entries()) {
        const data = pseudoRandom(n, 90 + i);
        expected.set(data, at);
        await Deno.writeFile(`${dir}/d${i}`, data);
        const w = await cli([
          "write",
          `${dir}/top.vhdx`,
          `${at}`,
          `${dir}/d${i}`,
        ]);
        assertEquals(w.code, 0, w.stderr);
      }
      // commit into it: a qcow2 overlay over the differencing vhdx.
      const over = await cli([
        "create",
        "-f",
        "qcow2",
        "-b",
        "top.vhdx",
        "-F",
        "vhdx",
        `${dir}/over.qcow2`,
        "12M",
      ]);
      assertEquals(over.code, 0, over.stderr);
      const late = pseudoRandom(10_000, 99);
      expected.set(late, 9 * MiB + 77);
      await Deno.writeFile(`${dir}/late`, late);
      const w = await cli([
        "write",
        `${dir}/over.qcow2`,
        `${9 * MiB + 77}`,
        `${dir}/late`,
      ]);
      assertEquals(w.code, 0, w.stderr);
      const c = await cli(["commit", `${dir}/over.qcow2`]);
      assertEquals(c.code, 0, c.stderr);
      // The parent is as it was; qemu-img finds it clean.
      assertEquals(await sha256File(`${dir}/base.vhdx`), parentHash);
      await run("qemu-img", ["check", "-f", "vhdx", `${dir}/base.vhdx`]);
      // Blocks partially present, each chunk's bitmap present.
      const bytes = await Deno.readFile(`${dir}/top.vhdx`);
      const states = [0, 1, 2, 3, 4, 5].map((b) => batEntryOf(bytes, b)[0]);
      assertEquals(states, [7, 7, 0, 6, 7, 7]);
      assertEquals(batEntryOf(bytes, 2048)[0], 6); // chunk ratio of 2 MiB blocks
      const back = await cli(["convert", `${dir}/top.vhdx`, `${dir}/back.raw`]);
      assertEquals(back.code, 0, back.stderr);
      assertEquals(await sha256File(`${dir}/back.raw`), sha256Hex(expected));
      // 7-Zip opens the parent beside the child and reads the bitmaps.
      await run("7zz", ["x", "-y", `-o${dir}/x`, `${dir}/top.vhdx`]);
      const names = [...Deno.readDirSync(`${dir}/x`)].map((e) => e.name);
      assertEquals(names.length, 1, names.join(","));
      assertEquals(
        await sha256File(`${dir}/x/${names[0]}`),
        sha256Hex(expected),
      );
    }),
});

Deno.test("reading a partially present block whose sector bitmap entry is outside the file, in another state, or in a file without a parent is refused", async () => {
  const { top, base } = await differencingPair();
  const [bat] = batRegion(top);
  const poked = (index: number, lo: number, hi = 0) => {
    const bytes = top.slice();
    const v = new DataView(bytes.buffer);
    v.setUint32(bat + index * 8, lo >>> 0, true);
    v.setUint32(bat + index * 8 + 4, hi, true);
    return bytes;
  };
  const sbAt = batEntryOf(top, 4096)[1] / MiB;
  for (
    const [bytes, pattern] of [
      [poked(4096, (4000 << 20) | 6), /sector bitmap of chunk 0/],
      [poked(4096, 6, 1 << 20), /sector bitmap of chunk 0/], // 2^52 bytes on
      [poked(4096, (sbAt << 20) | 3), /sector bitmap of chunk 0/],
      [poked(4096, 0), /sector bitmap of chunk 0/],
    ] as const
  ) {
    const counted = countingSource(bytes);
    await rejects(
      async () => {
        const image = await open(counted.source, {
          resolveBacking: () => Promise.resolve(fromBytes(base)),
        });
        await readAll(image);
      },
      ImageFormatError,
      pattern,
    );
    assertBoundedWork(counted, bytes.length);
  }
  // Partially present in a file without a parent.
  const plain = await ours(pseudoRandom(2 * MiB, 3));
  const [plainBat] = batRegion(plain);
  plain[plainBat + 8] = (plain[plainBat + 8] & ~7) | 7;
  await refused(plain, /without a parent/);
});

Deno.test("a write into a differencing vhdx short of a block's end by part of a sector keeps the parent's bytes there, or is refused without the parent", async () => {
  const { base, child } = await emptyChild(2 * MiB);
  const parentBytes = await readAll(await open(fromBytes(base)));
  const data = pseudoRandom(MiB - 100, 4);
  // Without the parent: the last sector's other 100 bytes are unknown.
  const alone = memorySink(child);
  const image = await open(alone, { writable: true });
  await rejects(
    () => image.write!(0, data),
    UnsupportedError,
    /part of a 512-byte logical sector/,
  );
  // Through the parent: they are the parent's; the block is then fully
  // present (every sector held).
  const sink = memorySink(child);
  const chain = await open(sink, {
    writable: true,
    resolveBacking: () => Promise.resolve(fromBytes(base)),
  });
  await chain.write!(0, data);
  const expected = parentBytes.slice();
  expected.set(data, 0);
  assertEquals(sha256Hex(await readAll(chain)), sha256Hex(expected));
  assertEquals(batEntryOf(sink.bytes(), 0)[0], 6);
  // Then a whole-block write into a partially present block stays in place.
  await chain.write!(MiB + 512, new Uint8Array(512).fill(1));
  const [, at] = batEntryOf(sink.bytes(), 1);
  assertEquals(batEntryOf(sink.bytes(), 1)[0], 7);
  const whole = pseudoRandom(MiB, 5);
  await chain.write!(MiB, whole);
  assertEquals(batEntryOf(sink.bytes(), 1), [6, at]);
  expected.set(whole, MiB);
  assertEquals(sha256Hex(await readAll(chain)), sha256Hex(expected));
});

Deno.test({
  name:
    "a write of part of a 4096-byte logical sector into a differencing vhdx opened later takes the rest of the sector from the parent; 7-Zip extracts the same bytes",
  ignore: skip(["7zz"]),
  fn: () =>
    withTemp(async (dir) => {
      const options = "logical_sector_size=4096,block_size=1M";
      const base = sampleDisk(8 * MiB, 85);
      await Deno.writeFile(`${dir}/base.raw`, base);
      for (
        const args of [
          ["convert", "-O", "vhdx", "-o", options, "base.raw", "base.vhdx"],
          [
            "create",
            "-f",
            "vhdx",
            "-o",
            options,
            "-b",
            "base.vhdx",
            "top.vhdx",
            "8M",
          ],
        ]
      ) {
        const r = await cli(args, { cwd: dir });
        assertEquals(r.code, 0, r.stderr);
      }
      const data = pseudoRandom(3000, 86);
      await Deno.writeFile(`${dir}/d`, data);
      const w = await cli(["write", "top.vhdx", "1000000", "d"], { cwd: dir });
      assertEquals(w.code, 0, w.stderr);
      const expected = base.slice();
      expected.set(data, 1000000);
      const bytes = await Deno.readFile(`${dir}/top.vhdx`);
      assertEquals(batEntryOf(bytes, 0)[0], 7);
      await run("7zz", ["x", "-y", `-o${dir}/x`, `${dir}/top.vhdx`]);
      const names = [...Deno.readDirSync(`${dir}/x`)].map((e) => e.name);
      assertEquals(names.length, 1, names.join(","));
      assertEquals(
        await sha256File(`${dir}/x/${names[0]}`),
        sha256Hex(expected),
      );
    }),
});

Deno.test({
  name:
    "commit of a differencing vhdx into its vhdx parent: qemu-img checks the parent clean and finds it equal to the chain; the child is refused over the changed parent",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const base = sampleDisk(8 * MiB, 87);
      await Deno.writeFile(`${dir}/base.raw`, base);
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        `${dir}/base.raw`,
        `${dir}/base.vhdx`,
      ]);
      const made = await cli(
        ["create", "-f", "vhdx", "-b", "base.vhdx", "top.vhdx", "8M"],
        { cwd: dir },
      );
      assertEquals(made.code, 0, made.stderr);
      const data = pseudoRandom(3000, 88);
      await Deno.writeFile(`${dir}/d`, data);
      const w = await cli(["write", "top.vhdx", "777", "d"], { cwd: dir });
      assertEquals(w.code, 0, w.stderr);
      const c = await cli(["commit", "top.vhdx"], { cwd: dir });
      assertEquals(c.code, 0, c.stderr);
      const expected = base.slice();
      expected.set(data, 777);
      await Deno.writeFile(`${dir}/expected.raw`, expected);
      await run("qemu-img", ["check", "-f", "vhdx", `${dir}/base.vhdx`]);
      await assertQemuIdentical(
        `${dir}/expected.raw`,
        `${dir}/base.vhdx`,
        "vhdx",
      );
      const stale = await cli(["convert", "top.vhdx", "x.raw"], { cwd: dir });
      assertTrue(
        stale.code !== 0 && /links its parent by identity/.test(stale.stderr),
        stale.stderr,
      );
    }),
});

Deno.test("vhdx convert into a stream that keeps what it is given (no copy) writes the bytes of a memory sink", async () => {
  // Three 2 MiB blocks of data, one of zeros, then data: pieces written
  // one at a time, each a fresh buffer (the stream keeps them).
  const disk = new Uint8Array(10 << 20);
  for (const at of [0, 2, 4, 8]) disk.set(pseudoRandom(1 << 20, at), at << 20);
  const chunks: Uint8Array[] = [];
  const stream = new WritableStream<Uint8Array>({
    write(chunk) {
      chunks.push(chunk); // kept as it is, not copied
    },
  });
  const options = { options: { block_size: "2M" }, format: "vhdx" };
  await convert(await open(fromBytes(disk)), streamSink(stream), options);
  const memory = memorySink();
  await convert(await open(fromBytes(disk)), memory, options);
  const streamed = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) streamed.set(c, (at += c.length) - c.length);
  const back = await open(fromBytes(streamed));
  assertEquals(back.format, "vhdx");
  assertEquals(sha256Hex(await readAll(back)), sha256Hex(disk));
  assertEquals(streamed.length, memory.bytes().length);
});
