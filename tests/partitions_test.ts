import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  ChecksumError,
  conversionService,
  fromBytes,
  ImageFormatError,
  open,
  partition,
  readPartitionTable,
} from "../mod.ts";
import {
  assertBoundedWork,
  cli,
  countingSource,
  fileServer,
  pseudoRandom,
  REFERENCE,
  referenceFile,
  rejects,
  run,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";
import { crc32 } from "../drivers/codecs/crc32.ts";

const MiB = 1 << 20;

/** What `sfdisk --json` says of a disk: the reference listing. */
interface SfdiskPartition {
  node: string;
  start: number;
  size: number;
  type: string;
  uuid?: string;
  name?: string;
  bootable?: boolean;
}

async function sfdiskList(path: string): Promise<SfdiskPartition[]> {
  const out = await run("sfdisk", ["--json", path]);
  return JSON.parse(out.text).partitiontable.partitions;
}

const indexOf = (node: string) => Number(/(\d+)$/.exec(node)![1]);

/** Fills the first 256 KiB of each partition with its own bytes (the rest stays a hole). */
async function fillPartitions(path: string, list: SfdiskPartition[]) {
  const file = await Deno.open(path, { write: true });
  try {
    for (const p of list) {
      if (p.type === "5" || p.type === "f") continue; // the extended container
      const bytes = pseudoRandom(
        Math.min(256 << 10, p.size * 512),
        indexOf(p.node),
      );
      await file.seek(p.start * 512, Deno.SeekMode.Start);
      let done = 0;
      while (done < bytes.length) {
        done += await file.write(bytes.subarray(done));
      }
    }
  } finally {
    file.close();
  }
}

/** The bytes `dd` gives for sectors [start, start + count) of `disk`: their sha256. */
async function ddSha(dir: string, disk: string, start: number, count: number) {
  const out = `${dir}/dd-${start}-${count}.raw`;
  await run("dd", [
    `if=${disk}`,
    `of=${out}`,
    "bs=512",
    `skip=${start}`,
    `count=${count}`,
    "status=none",
  ]);
  return await sha256File(out);
}

/** Extracts partition `which` of `disk` with `cli.ts convert --partition`; its sha256. */
async function cliPartitionSha(dir: string, disk: string, which: string) {
  const out = `${dir}/part-${which.replace(/\W/g, "_")}.raw`;
  const r = await cli(["convert", "--partition", which, disk, out]);
  assertEquals(r.code, 0, r.stderr);
  return await sha256File(out);
}

async function makeGpt(dir: string): Promise<string> {
  const disk = `${dir}/gpt.img`;
  await run("truncate", ["-s", "8M", disk]);
  await run("sgdisk", [
    "-n1:2048:+1M",
    "-t1:ef00",
    "-c1:EFI",
    "-n2:0:+2M",
    "-t2:8300",
    "-c2:root fs",
    "-n3:0:+1M",
    "-t3:0700",
    "-c3:Données",
    "-n4:0:0",
    "-t4:8200",
    disk,
  ]);
  await fillPartitions(disk, await sfdiskList(disk));
  return disk;
}

async function makeMbr(dir: string): Promise<string> {
  const disk = `${dir}/mbr.img`;
  await run("truncate", ["-s", "16M", disk]);
  const n = "mbr.img";
  await run("sfdisk", ["-q", disk], {
    stdin: new TextEncoder().encode(
      [
        "label: dos",
        `${n}1 : start=2048, size=2048, type=83, bootable`,
        `${n}2 : start=4096, size=1024, type=7`,
        `${n}3 : start=6144, size=24576, type=5`,
        `${n}5 : size=1024, type=83`,
        `${n}6 : size=1024, type=82`,
        `${n}7 : size=2048, type=c`,
        "",
      ].join("\n"),
    ),
  });
  await fillPartitions(disk, await sfdiskList(disk));
  return disk;
}

Deno.test(
  "a GPT disk made by sgdisk lists as sfdisk lists it: numbers, sectors, type GUIDs, UTF-16 names",
  {
    ignore: skip(["sgdisk", "sfdisk"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const disk = await makeGpt(dir);
      const table =
        (await readPartitionTable(fromBytes(await Deno.readFile(disk))))!;
      assertEquals(table.scheme, "gpt");
      assertEquals(table.header, "primary");
      const reference = await sfdiskList(disk);
      assertEquals(
        table.partitions.map((
          p,
        ) => [p.index, p.firstSector, p.sectorCount, p.type, p.guid, p.name]),
        reference.map((
          p,
        ) => [indexOf(p.node), p.start, p.size, p.type, p.uuid, p.name ?? ""]),
      );
      assertEquals(
        table.partitions.map((p) => p.typeName),
        [
          "EFI System",
          "Linux filesystem",
          "Microsoft basic data",
          "Linux swap",
        ],
      );
    });
  },
);

Deno.test(
  "each partition of a GPT disk, raw and as vmdk, converts to the bytes dd gives at the listed offsets",
  {
    ignore: skip(["sgdisk", "sfdisk", "qemu-img", "dd"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const disk = await makeGpt(dir);
      const vmdk = `${dir}/gpt.vmdk`;
      await run("qemu-img", ["convert", "-O", "vmdk", disk, vmdk]);
      for (const p of await sfdiskList(disk)) {
        const want = await ddSha(dir, disk, p.start, p.size);
        const n = String(indexOf(p.node));
        assertEquals(
          await cliPartitionSha(dir, disk, n),
          want,
          `partition ${n}`,
        );
        assertEquals(
          await cliPartitionSha(dir, vmdk, n),
          want,
          `vmdk partition ${n}`,
        );
        if (p.name) {
          assertEquals(await cliPartitionSha(dir, vmdk, p.name), want, p.name);
        }
      }
    });
  },
);

Deno.test(
  "an MBR disk with an extended partition made by sfdisk lists its primaries and logicals as sfdisk does",
  {
    ignore: skip(["sfdisk"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const disk = await makeMbr(dir);
      const table =
        (await readPartitionTable(fromBytes(await Deno.readFile(disk))))!;
      assertEquals(table.scheme, "mbr");
      const reference = await sfdiskList(disk);
      assertEquals(
        table.partitions.map((
          p,
        ) => [
          p.index,
          p.firstSector,
          p.sectorCount,
          Number(p.type),
          p.bootable,
        ]),
        reference.map((
          p,
        ) => [
          indexOf(p.node),
          p.start,
          p.size,
          parseInt(p.type, 16),
          p.bootable === true,
        ]),
      );
      assertEquals(
        table.partitions.map((p) => p.role),
        ["primary", "primary", "extended", "logical", "logical", "logical"],
      );
    });
  },
);

Deno.test(
  "each partition of an MBR disk (logicals and the extended one too), raw and as vmdk, converts to dd's bytes",
  {
    ignore: skip(["sfdisk", "qemu-img", "dd"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const disk = await makeMbr(dir);
      const vmdk = `${dir}/mbr.vmdk`;
      await run("qemu-img", ["convert", "-O", "vmdk", disk, vmdk]);
      for (const p of await sfdiskList(disk)) {
        const want = await ddSha(dir, disk, p.start, p.size);
        const n = String(indexOf(p.node));
        assertEquals(
          await cliPartitionSha(dir, disk, n),
          want,
          `partition ${n}`,
        );
        assertEquals(
          await cliPartitionSha(dir, vmdk, n),
          want,
          `vmdk partition ${n}`,
        );
      }
    });
  },
);

Deno.test(
  "a partition view keeps the holes of the image below it, shifted to the partition's start",
  {
    ignore: skip(["sfdisk", "qemu-img"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const disk = await makeMbr(dir);
      const vmdk = `${dir}/mbr.vmdk`;
      await run("qemu-img", ["convert", "-O", "vmdk", disk, vmdk]);
      const image = await open(fromBytes(await Deno.readFile(vmdk)));
      const part = await partition(image, 5);
      assertEquals(part.size, 1024 * 512);
      const runs = [];
      for await (const r of part.extents(0, part.size)) {
        runs.push([r.offset, r.length, r.kind]);
      }
      // 256 KiB of data at the start, the rest never written.
      assertEquals(runs[0].slice(0, 3), [0, 256 << 10, "data"]);
      assertTrue(runs.slice(1).every((r) => r[2] !== "data"));
      assertEquals(
        sha256Hex(await part.read(0, 256 << 10)),
        sha256Hex(pseudoRandom(256 << 10, 5)),
      );
    });
  },
);

// ---------------------------------------------------------------------------
// Apple Partition Map, written here from Inside Macintosh's description

interface ApmEntry {
  name: string;
  type: string;
  start: number;
  blocks: number;
}

/** A disk with an Apple Partition Map in `blockSize`-byte blocks. */
function apmDisk(
  blockSize: number,
  totalBlocks: number,
  entries: ApmEntry[],
): Uint8Array {
  const disk = new Uint8Array(blockSize * totalBlocks);
  const dv = new DataView(disk.buffer);
  disk.set([0x45, 0x52], 0); // "ER"
  dv.setUint16(2, blockSize);
  dv.setUint32(4, totalBlocks);
  const ascii = (text: string, at: number) =>
    disk.set(new TextEncoder().encode(text), at);
  entries.forEach((e, i) => {
    const at = (i + 1) * blockSize;
    disk.set([0x50, 0x4d], at); // "PM"
    dv.setUint32(at + 4, entries.length);
    dv.setUint32(at + 8, e.start);
    dv.setUint32(at + 12, e.blocks);
    ascii(e.name, at + 16);
    ascii(e.type, at + 48);
    dv.setUint32(at + 84, e.blocks); // pmDataCnt
  });
  return disk;
}

const APM_ENTRIES = (map: number): ApmEntry[] => [
  { name: "Apple", type: "Apple_partition_map", start: 1, blocks: map },
  { name: "disk image", type: "Apple_HFS", start: 64, blocks: 1000 },
  { name: "", type: "Apple_Free", start: 1064, blocks: 24 },
];

for (const blockSize of [512, 2048]) {
  Deno.test(`an Apple Partition Map in ${blockSize}-byte blocks lists its entries and extracts them`, async () => {
    const disk = apmDisk(blockSize, 1088, APM_ENTRIES(63));
    disk.set(pseudoRandom(1000 * blockSize, 9), 64 * blockSize);
    const table = (await readPartitionTable(fromBytes(disk)))!;
    assertEquals(table.scheme, "apm");
    assertEquals(table.sectorSize, blockSize);
    assertEquals(
      table.partitions.map((p) => [p.index, p.name, p.type, p.offset, p.size]),
      APM_ENTRIES(63).map((
        e,
        i,
      ) => [i + 1, e.name, e.type, e.start * blockSize, e.blocks * blockSize]),
    );
    const hfs = await partition(await open(fromBytes(disk)), "disk image");
    assertEquals(
      sha256Hex(await hfs.read(0, hfs.size)),
      sha256Hex(disk.subarray(64 * blockSize, 1064 * blockSize)),
    );
  });
}

Deno.test(
  "an APM disk extracted by the CLI equals dd of it at the listed offsets",
  {
    ignore: skip(["dd"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const disk = apmDisk(512, 1088, APM_ENTRIES(63));
      disk.set(pseudoRandom(1000 * 512, 9), 64 * 512);
      await Deno.writeFile(`${dir}/apm.img`, disk);
      const info = await cli(["info", "--output=json", `${dir}/apm.img`]);
      const listed = JSON.parse(info.text)["partition-table"];
      assertEquals(listed.scheme, "apm");
      const hfs = listed.partitions[1];
      assertEquals([
        hfs.name,
        hfs.type,
        hfs["first-sector"],
        hfs["sector-count"],
      ], [
        "disk image",
        "Apple_HFS",
        64,
        1000,
      ]);
      assertEquals(
        await cliPartitionSha(dir, `${dir}/apm.img`, "2"),
        await ddSha(dir, `${dir}/apm.img`, 64, 1000),
      );
    });
  },
);

Deno.test("APM: a huge pmMapBlkCnt or an entry past the disk is refused naming the field", async () => {
  const huge = apmDisk(512, 1088, APM_ENTRIES(63));
  new DataView(huge.buffer).setUint32(512 + 4, 0x7fffffff);
  const counted = countingSource(huge);
  await rejects(
    () => readPartitionTable(counted.source),
    ImageFormatError,
    /apm: pmMapBlkCnt 2147483647/,
  );
  assertBoundedWork(counted, huge.length, 10, 1);
  const past = apmDisk(512, 1088, APM_ENTRIES(63));
  new DataView(past.buffer).setUint32(2 * 512 + 12, 5000);
  await rejects(
    () => readPartitionTable(fromBytes(past)),
    ImageFormatError,
    /apm: partition 2 end/,
  );
});

// ---------------------------------------------------------------------------
// The reference images made by hdiutil

Deno.test(
  "hdiutil's MBR dmg: info lists its two FAT16 partitions where the dmg's own map has them, and each converts to dd's bytes",
  {
    ignore: skip(["qemu-img", "dd"], true),
  },
  async () => {
    await withTemp(async (dir) => {
      const dmg = `${REFERENCE}/udif/compression-raw.dmg`;
      const raw = `${dir}/disk.raw`;
      await run("qemu-img", ["convert", "-O", "raw", dmg, raw]);
      const info = await cli(["info", "--output=json", dmg]);
      assertEquals(info.code, 0, info.stderr);
      const listed = JSON.parse(info.text);
      const table = listed["partition-table"];
      assertEquals(table.scheme, "mbr");
      // hdiutil's blkx map names the same partitions at the same sectors.
      const blkx = listed["format-specific"].data.partitions as {
        name: string;
        "first-sector": number;
        "sector-count": number;
      }[];
      const fat = blkx.filter((b) => b.name.includes("Windows_FAT_16"));
      assertEquals(
        table.partitions.map((
          p: Record<string, number>,
        ) => [p["first-sector"], p["sector-count"]]),
        fat.map((b) => [b["first-sector"], b["sector-count"]]),
      );
      for (const p of table.partitions) {
        assertEquals(
          await cliPartitionSha(dir, dmg, String(p.index)),
          await ddSha(dir, raw, p["first-sector"], p["sector-count"]),
        );
      }
    });
  },
);

Deno.test(
  "hdiutil's GPT dmg (qemu-iotests simple-dmg): its Apple_HFS partition lists as sfdisk lists it and converts to dd's bytes",
  { ignore: skip(["qemu-img", "dd", "sfdisk", "bzip2"], true) },
  async () => {
    await withTemp(async (dir) => {
      const dmg =
        (await referenceFile("qemu-iotests/simple-dmg.dmg.bz2", dir))!;
      const raw = `${dir}/disk.raw`;
      await run("qemu-img", ["convert", "-O", "raw", dmg, raw]);
      const [reference] = await sfdiskList(raw);
      const info = await cli(["info", "--output=json", dmg]);
      assertEquals(info.code, 0, info.stderr);
      const table = JSON.parse(info.text)["partition-table"];
      assertEquals(table.scheme, "gpt");
      assertEquals(table.partitions.length, 1);
      const p = table.partitions[0];
      assertEquals(
        [
          p.index,
          p.name,
          p.type,
          p["type-name"],
          p["first-sector"],
          p["sector-count"],
          p.guid,
        ],
        [
          1,
          reference.name,
          reference.type,
          "Apple HFS/HFS+",
          reference.start,
          reference.size,
          reference.uuid,
        ],
      );
      const want = await ddSha(dir, raw, p["first-sector"], p["sector-count"]);
      assertEquals(await cliPartitionSha(dir, dmg, "disk image"), want);
      assertEquals(await cliPartitionSha(dir, dmg, "1"), want);
      // The HFS+ volume header sits 1024 bytes into the partition.
      const volume = await partition(
        await open(fromBytes(await Deno.readFile(dmg))),
        "disk image",
      );
      assertEquals(new TextDecoder().decode(await volume.read(1024, 2)), "H+");
    });
  },
);

Deno.test(
  "hdiutil's gpt.dmg holds a bare HFS+ volume (no table on the disk): info says none",
  {
    ignore: skip([], true),
  },
  async () => {
    const r = await cli(["info", `${REFERENCE}/udif/gpt.dmg`]);
    assertEquals(r.code, 0, r.stderr);
    assertMatch(r.text, /partition table: none/);
    const convert = await cli([
      "convert",
      "--partition",
      "1",
      `${REFERENCE}/udif/gpt.dmg`,
      "-",
    ]);
    assertEquals(convert.code, 1);
    assertMatch(convert.stderr, /no partition table/);
  },
);

Deno.test("map --partitions labels each run with the partition it lies in", {
  ignore: skip([], true),
}, async () => {
  const r = await cli([
    "map",
    "--partitions",
    "--output=json",
    `${REFERENCE}/udif/compression-raw.dmg`,
  ]);
  assertEquals(r.code, 0, r.stderr);
  const runs = JSON.parse(r.text) as { start: number; partition?: number }[];
  for (const run of runs) {
    const want = run.start >= 65536 && run.start < 1114112
      ? 1
      : run.start >= 1114112 && run.start < 2162688
      ? 2
      : undefined;
    assertEquals(run.partition, want, `run at ${run.start}`);
  }
  assertTrue(runs.some((r) => r.start === 1114112));
});

// ---------------------------------------------------------------------------
// Small hand-made disks: no table, the API, the service, malformed tables

/** An MBR disk of `sectors` sectors with one Linux partition at sector 8 of 16 sectors. */
function smallMbr(sectors = 64): Uint8Array {
  const disk = new Uint8Array(sectors * 512);
  disk.set([0, 0, 0, 0, 0x83, 0, 0, 0, 8, 0, 0, 0, 16, 0, 0, 0], 446);
  disk.set([0x55, 0xaa], 510);
  disk.set(pseudoRandom(16 * 512, 3), 8 * 512);
  return disk;
}

Deno.test(
  "a disk of zeros, or a FAT volume without a table, has no partition table",
  {
    ignore: skip(["mkfs.fat"]),
  },
  async () => {
    assertEquals(
      await readPartitionTable(fromBytes(new Uint8Array(MiB))),
      undefined,
    );
    await withTemp(async (dir) => {
      await run("mkfs.fat", ["-C", `${dir}/fat.img`, "1440"]);
      assertEquals(
        await readPartitionTable(
          fromBytes(await Deno.readFile(`${dir}/fat.img`)),
        ),
        undefined,
      );
      const r = await cli(["info", "--output=json", `${dir}/fat.img`]);
      assertEquals(JSON.parse(r.text)["partition-table"], null);
    });
  },
);

Deno.test("partition() refuses a number or name the table does not have, listing what it has", async () => {
  const image = await open(fromBytes(smallMbr()));
  await rejects(
    () => partition(image, 2),
    RangeError,
    /no partition 2 in the mbr table: it has 1/,
  );
  await rejects(
    () => partition(image, "boot"),
    RangeError,
    /no partition "boot"/,
  );
  const part = await partition(image, "1");
  assertEquals(part.size, 16 * 512);
  await rejects(() => part.read(16 * 512 - 1, 2), RangeError, /outside/);
});

Deno.test("the service streams one partition with &partition=N and answers 404 for one that is not there", async () => {
  await withTemp(async (dir) => {
    const disk = smallMbr();
    await Deno.writeFile(`${dir}/disk.img`, disk);
    const { server, base } = fileServer(dir);
    try {
      const handler = conversionService({ allowPrivate: true });
      const res = await handler(
        new Request(`http://svc/convert?url=${base}/disk.img&partition=1`),
      );
      assertEquals(res.status, 200);
      assertEquals(
        sha256Hex(new Uint8Array(await res.arrayBuffer())),
        sha256Hex(disk.subarray(8 * 512, 24 * 512)),
      );
      const missing = await handler(
        new Request(`http://svc/convert?url=${base}/disk.img&partition=3`),
      );
      assertEquals(missing.status, 404);
      assertMatch((await missing.json()).error, /no partition "3"/);
    } finally {
      await server.shutdown();
    }
  });
});

Deno.test("compare --partition compares one partition of A with B; --hash and stdout take --partition too", async () => {
  await withTemp(async (dir) => {
    const disk = smallMbr();
    await Deno.writeFile(`${dir}/disk.img`, disk);
    await Deno.writeFile(`${dir}/part.raw`, disk.subarray(8 * 512, 24 * 512));
    const same = await cli([
      "compare",
      "--partition",
      "1",
      `${dir}/disk.img`,
      `${dir}/part.raw`,
    ]);
    assertEquals(same.code, 0, same.stderr + same.text);
    const both = await cli([
      "compare",
      "--partition",
      "1",
      "--partition-b",
      "1",
      `${dir}/disk.img`,
      `${dir}/disk.img`,
    ]);
    assertEquals(both.code, 0, both.stderr + both.text);
    const differ = await cli(["compare", `${dir}/disk.img`, `${dir}/part.raw`]);
    assertEquals(differ.code, 1);
    const out = await cli([
      "convert",
      "--hash",
      "--partition",
      "1",
      `${dir}/disk.img`,
      "-",
    ]);
    assertEquals(out.code, 0, out.stderr);
    const want = sha256Hex(disk.subarray(8 * 512, 24 * 512));
    assertEquals(sha256Hex(out.stdout), want);
    assertMatch(out.stderr, new RegExp(`sha256 ${want}`));
  });
});

Deno.test("MBR: an entry past the disk's end or overlapping another is refused naming the partition", async () => {
  const past = smallMbr();
  past.set([0x00, 0x10, 0, 0], 446 + 12); // 4096 sectors on a 64-sector disk
  await rejects(
    () => readPartitionTable(fromBytes(past)),
    ImageFormatError,
    /mbr: partition 1 end 2101248 must be at most the disk size 32768/,
  );
  const overlap = smallMbr();
  overlap.set([0, 0, 0, 0, 0x83, 0, 0, 0, 20, 0, 0, 0, 8, 0, 0, 0], 462);
  await rejects(
    () => readPartitionTable(fromBytes(overlap)),
    ImageFormatError,
    /mbr: partition 2 offset 10240 must be at least 12288/,
  );
  // info still shows the image, and says why the table is unreadable.
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/bad.img`, overlap);
    const r = await cli(["info", `${dir}/bad.img`]);
    assertEquals(r.code, 0, r.stderr);
    assertMatch(r.text, /partition table: unreadable: mbr: partition 2 offset/);
    const c = await cli([
      "convert",
      "--partition",
      "1",
      `${dir}/bad.img`,
      `${dir}/out.raw`,
    ]);
    assertEquals(c.code, 1);
    assertMatch(c.stderr, /partition 2 offset 10240/);
  });
});

/** An extended partition at sector 8 (56 sectors) whose EBRs are at sectors 8, 16, 24; `lastNext` is the third EBR's next pointer. */
function ebrChain(lastNext: number): Uint8Array {
  const disk = new Uint8Array(64 * 512);
  disk.set([0, 0, 0, 0, 0x05, 0, 0, 0, 8, 0, 0, 0, 56, 0, 0, 0], 446);
  disk.set([0x55, 0xaa], 510);
  for (const [i, ebr] of [8, 16, 24].entries()) {
    const at = ebr * 512;
    // Logical: 2 sectors from 1 after the EBR.
    disk.set([0, 0, 0, 0, 0x83, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0], at + 446);
    // The next EBR (ebr + 8), relative to the extended partition's start (8).
    const next = i < 2 ? ebr : lastNext;
    if (next > 0) {
      disk.set(
        [0, 0, 0, 0, 0x05, 0, 0, 0, next, 0, 0, 0, 3, 0, 0, 0],
        at + 462,
      );
    }
    disk.set([0x55, 0xaa], at + 510);
  }
  return disk;
}

Deno.test("MBR: a chain of EBRs gives logicals 5, 6, 7; an EBR chain that loops is refused after one pass", async () => {
  const good = (await readPartitionTable(fromBytes(ebrChain(0))))!;
  assertEquals(
    good.partitions.map((p) => [p.index, p.firstSector]),
    [[1, 8], [5, 9], [6, 17], [7, 25]],
  );
  const counted = countingSource(ebrChain(8)); // back to the second EBR
  await rejects(
    () => readPartitionTable(counted.source),
    ImageFormatError,
    /mbr: EBR 4 next EBR 16 must be a sector not visited before \(the EBR chain loops\)/,
  );
  assertBoundedWork(counted, 64 * 512, 10, 1);
});

// GPT fields poked in a disk made by sgdisk, with the CRCs made right again
// where the test is about another field.

function fixHeaderCrc(disk: Uint8Array, lba: number) {
  const dv = new DataView(disk.buffer, disk.byteOffset);
  const at = lba * 512;
  const size = dv.getUint32(at + 12, true);
  dv.setUint32(at + 16, 0, true);
  dv.setUint32(at + 16, crc32(disk.subarray(at, at + size)), true);
}

function fixEntriesCrc(disk: Uint8Array, lba: number) {
  const dv = new DataView(disk.buffer, disk.byteOffset);
  const at = lba * 512;
  const entries = Number(dv.getBigUint64(at + 72, true)) * 512;
  const bytes = dv.getUint32(at + 80, true) * dv.getUint32(at + 84, true);
  dv.setUint32(at + 88, crc32(disk.subarray(entries, entries + bytes)), true);
  fixHeaderCrc(disk, lba);
}

/** Both headers' LBAs and both entry arrays' byte offsets. */
function gptPlaces(disk: Uint8Array) {
  const last = disk.length / 512 - 1;
  const dv = new DataView(disk.buffer, disk.byteOffset);
  const array = (lba: number) =>
    Number(dv.getBigUint64(lba * 512 + 72, true)) * 512;
  return { headers: [1, last], arrays: [array(1), array(last)], dv };
}

Deno.test(
  "GPT: a broken primary header or entry array falls back to the backup; both broken is a ChecksumError",
  {
    ignore: skip(["sgdisk", "sfdisk"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const original = await Deno.readFile(await makeGpt(dir));
      const good = (await readPartitionTable(fromBytes(original)))!;
      const { headers, arrays } = gptPlaces(original);

      const badHeader = original.slice();
      badHeader[512 + 40] ^= 1;
      const viaBackup = (await readPartitionTable(fromBytes(badHeader)))!;
      assertEquals(viaBackup.header, "backup");
      assertMatch(viaBackup.primaryError!, /gpt: HeaderCRC32 mismatch/);
      assertEquals(viaBackup.partitions, good.partitions);

      const badEntries = original.slice();
      badEntries[arrays[0] + 60] ^= 1;
      const viaBackup2 = (await readPartitionTable(fromBytes(badEntries)))!;
      assertEquals(viaBackup2.header, "backup");
      assertEquals(viaBackup2.partitions, good.partitions);

      badEntries[arrays[1] + 60] ^= 1;
      await rejects(
        () => readPartitionTable(fromBytes(badEntries)),
        ChecksumError,
        /gpt: PartitionEntryArrayCRC32 mismatch/,
      );
      const bothHeaders = badHeader.slice();
      bothHeaders[headers[1] * 512 + 40] ^= 1;
      await rejects(
        () => readPartitionTable(fromBytes(bothHeaders)),
        ChecksumError,
        /gpt: HeaderCRC32 mismatch/,
      );
    });
  },
);

Deno.test(
  "GPT: a huge entry count, entries past the usable sectors or overlapping are refused naming the field, in bounded work",
  {
    ignore: skip(["sgdisk", "sfdisk"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const original = await Deno.readFile(await makeGpt(dir));
      const { headers, arrays } = gptPlaces(original);
      const poke = (edit: (disk: Uint8Array, dv: DataView) => void) => {
        const disk = original.slice();
        const dv = new DataView(disk.buffer);
        edit(disk, dv);
        return disk;
      };
      const huge = poke((disk, dv) => {
        for (const lba of headers) {
          dv.setUint32(lba * 512 + 80, 0xffffffff, true);
          fixHeaderCrc(disk, lba);
        }
      });
      const counted = countingSource(huge);
      await rejects(
        () => readPartitionTable(counted.source),
        ImageFormatError,
        /gpt: NumberOfPartitionEntries 4294967295 must be at most 16384/,
      );
      assertBoundedWork(counted, huge.length, 10, 0.01);

      const past = poke((disk, dv) => {
        for (const [i, lba] of headers.entries()) {
          dv.setBigUint64(arrays[i] + 128 * 3 + 40, 1n << 40n, true);
          fixEntriesCrc(disk, lba);
        }
      });
      await rejects(
        () => readPartitionTable(fromBytes(past)),
        ImageFormatError,
        /gpt: entry 4 StartingLBA\.\.EndingLBA "\d+\.\.1099511627776" must be inside FirstUsableLBA/,
      );

      const overlap = poke((disk, dv) => {
        for (const [i, lba] of headers.entries()) {
          dv.setBigUint64(arrays[i] + 128 * 1 + 32, 3000n, true);
          fixEntriesCrc(disk, lba);
        }
      });
      await rejects(
        () => readPartitionTable(fromBytes(overlap)),
        ImageFormatError,
        /gpt: partition 2 offset 1536000 must be at least 2097152/,
      );
    });
  },
);

Deno.test(
  "info lists a GPT table in human and JSON form with kebab-case keys",
  {
    ignore: skip(["sgdisk", "sfdisk"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const disk = await makeGpt(dir);
      const human = await cli(["info", disk]);
      assertMatch(
        human.text,
        /partition table: gpt \(512-byte sectors, disk GUID [0-9A-F-]{36}\)/,
      );
      assertMatch(
        human.text,
        /\n {4}2 +4096 +4096 +2097152 +2 MiB +0FC63DAF-8483-4772-8E79-3D69D8477DE4 Linux filesystem +root fs\n/,
      );
      const json = JSON.parse(
        (await cli(["info", "--output=json", disk])).text,
      );
      const p = json["partition-table"].partitions[2];
      assertEquals(
        [
          p.index,
          p.name,
          p["type-name"],
          p.offset,
          p.size,
          p["first-sector"],
          p["sector-count"],
        ],
        [3, "Données", "Microsoft basic data", 4194304, MiB, 8192, 2048],
      );
    });
  },
);

Deno.test(
  "a real GRUB boot sector alone (qemu-iotests grub_mbr.raw) names a partition past its 512 bytes: refused, info still works",
  {
    ignore: skip(["bzip2"], true),
  },
  async () => {
    await withTemp(async (dir) => {
      const path = (await referenceFile("qemu-iotests/grub_mbr.raw.bz2", dir))!;
      await rejects(
        async () =>
          await readPartitionTable(fromBytes(await Deno.readFile(path))),
        ImageFormatError,
        /mbr: partition 1 end \d+ must be at most the disk size 512/,
      );
      const r = await cli(["info", path]);
      assertEquals(r.code, 0, r.stderr);
      assertMatch(r.text, /partition table: unreadable: mbr: partition 1 end/);
    });
  },
);

Deno.test(
  "2,400 seeded mutants of the tables' sectors (GPT, MBR with EBRs, APM) end in a table, none, or a typed error, in bounded work",
  {
    ignore: skip(["sgdisk", "sfdisk"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const gpt = await Deno.readFile(await makeGpt(dir));
      const mbr = await Deno.readFile(await makeMbr(dir));
      const apm = apmDisk(512, 1088, APM_ENTRIES(63));
      const last = (d: Uint8Array) => d.length - 512;
      // Where each table lives: [start, length] of the bytes mutated.
      const disks: [Uint8Array, [number, number][]][] = [
        [gpt, [[446, 66], [512, 92], [1024, 512], [last(gpt), 92], [
          last(gpt) - 32 * 512,
          512,
        ]]],
        [mbr, [
          [446, 66],
          ...[6144, 10240, 14336].map((s) =>
            [s * 512 + 446, 66] as [number, number]
          ),
        ]],
        [apm, [[0, 8], [512, 96], [1024, 96], [1536, 96]]],
      ];
      let x = 2026;
      const next = (n: number) => {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        return (x >>> 0) % n;
      };
      const outcomes: Record<string, number> = {};
      for (let i = 0; i < 2400; i++) {
        const [disk, places] = disks[i % disks.length];
        const saved: [number, number][] = [];
        for (let k = 1 + next(6); k > 0; k--) {
          const [start, length] = places[next(places.length)];
          const at = start + next(length);
          saved.push([at, disk[at]]);
          disk[at] = next(256);
        }
        const counted = countingSource(disk);
        try {
          const table = await readPartitionTable(counted.source);
          const key = table ? table.scheme : "none";
          outcomes[key] = (outcomes[key] ?? 0) + 1;
        } catch (e) {
          if (!(e instanceof ImageFormatError)) throw e;
          outcomes.refused = (outcomes.refused ?? 0) + 1;
        }
        assertBoundedWork(counted, disk.length, 2000, 0.1);
        for (const [at, value] of saved.reverse()) disk[at] = value;
      }
      assertTrue(
        outcomes.refused > 100 && outcomes.gpt > 100,
        JSON.stringify(outcomes),
      );
    });
  },
);
