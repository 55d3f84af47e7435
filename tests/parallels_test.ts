import { assertEquals } from "./_asserts.ts";
import {
  convert,
  fromBytes,
  fromFile,
  ImageFormatError,
  memorySink,
  open,
  probe,
} from "../mod.ts";
import {
  assertBoundedWork,
  countingSource,
  pseudoRandom,
  qemuIo,
  readAll,
  referenceBytes,
  referenceImages,
  rejects,
  run,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";
import { qemuRaw } from "./_layers.ts";

const MiB = 1 << 20;

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

Deno.test({
  name:
    "the reference parallels images (both signatures) read as their listed hashes",
  ignore: skip(["bzip2"], true),
  fn: async () => {
    const images = referenceImages().filter((i) => i.format === "parallels");
    assertEquals(images.length, 2);
    for (const ref of images) {
      const bytes = (await referenceBytes(ref.path))!;
      const image = await open(fromBytes(bytes));
      assertEquals(image.format, "parallels");
      assertEquals(image.size, ref.virtual_size);
      assertEquals(sha256Hex(await readAll(image)), ref.raw_sha256);
    }
  },
});

for (const cluster of ["4K", "64K", "1M"]) {
  Deno.test({
    name:
      `a parallels image qemu-img converts (cluster_size=${cluster}) and writes with qemu-io reads as qemu-img's bytes`,
    ignore: skip(["qemu-img", "qemu-io"]),
    fn: () =>
      withTemp(async (dir) => {
        const disk = sampleDisk(5 * MiB + 1536, 3);
        await Deno.writeFile(`${dir}/src.raw`, disk);
        const path = `${dir}/d.hds`;
        await run("qemu-img", [
          "convert",
          "-f",
          "raw",
          "-O",
          "parallels",
          "-o",
          `cluster_size=${cluster}`,
          `${dir}/src.raw`,
          path,
        ]);
        await qemuIo(
          "parallels",
          path,
          "write -P 0x11 0 512",
          "write -P 0x22 2097152 65536",
          "write -z 3145728 131072",
          "write -P 0x44 2098176 1024",
        );
        const expected = await qemuRaw(path, dir, "parallels");
        const source = await fromFile(path);
        assertEquals((await probe(source))[0].format, "parallels");
        const image = await open(source);
        assertEquals(image.size, expected.length);
        assertEquals(sha256Hex(await readAll(image)), sha256Hex(expected));
        const sink = memorySink();
        await convert(image, sink);
        assertEquals(sha256Hex(sink.bytes()), sha256Hex(expected));
        await image.close?.();
      }),
  });
}

async function refused(bytes: Uint8Array, pattern: RegExp) {
  const counted = countingSource(bytes);
  await rejects(
    async () => {
      const image = await open(counted.source, { format: "parallels" });
      await readAll(image);
    },
    ImageFormatError,
    pattern,
  );
  assertBoundedWork(counted, bytes.length);
}

function poked(b: Uint8Array, at: number, v: number | bigint): Uint8Array {
  const out = b.slice();
  const view = new DataView(out.buffer);
  if (typeof v === "bigint") view.setBigUint64(at, v, true);
  else view.setUint32(at, v, true);
  return out;
}

Deno.test({
  name:
    "malformed parallels headers and catalogs are typed errors with bounded work",
  ignore: skip(["bzip2"], true),
  fn: async () => {
    for (const name of ["parallels-v1", "parallels-v2"]) {
      const good = (await referenceBytes(`qemu-iotests/${name}.bz2`))!;
      await refused(poked(good, 32, 0x7fffffff), /bat_entries/);
      await refused(poked(good, 32, 2), /nb_sectors/);
      await refused(poked(good, 28, 0), /tracks/);
      await refused(poked(good, 28, 0x7fffffff), /tracks/);
      await refused(poked(good, 36, 0xfffff000), /nb_sectors/);
      await refused(poked(good, 64, 0x10000000), /bat\[0\]/);
      // Inside the catalog (v1 counts in sectors; v2's 1 is its first cluster).
      if (name === "parallels-v1") {
        await refused(poked(good, 64, 1), /bat\[0\]/);
      }
      await refused(poked(good, 48, 0x7fffffff), /data_off/);
      await refused(poked(good, 16, 3), /version/);
      await refused(good.subarray(0, 100), /bat_entries/);
      await refused(good.subarray(0, good.length - 1000), /bat\[3\]/);
    }
  },
});

// DiskDescriptor.xml bundles, laid out as Parallels Desktop writes them.

const GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";

function descriptor(
  diskSectors: number,
  storages: { start: number; end: number; type: string; file: string }[],
  shots = [GUID],
): string {
  return `<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
    <Disk_Parameters>
        <Disk_size>${diskSectors}</Disk_size>
        <Cylinders>16</Cylinders>
        <Heads>16</Heads>
        <Sectors>32</Sectors>
        <Padding>0</Padding>
    </Disk_Parameters>
    <StorageData>
${
    storages.map((s) =>
      `        <Storage>
            <Start>${s.start}</Start>
            <End>${s.end}</End>
            <Blocksize>2048</Blocksize>
            <Image>
                <GUID>${GUID}</GUID>
                <Type>${s.type}</Type>
                <File>${s.file}</File>
            </Image>
        </Storage>`
    ).join("\n")
  }
    </StorageData>
    <Snapshots>
${
    shots.map((g) =>
      `        <Shot>
            <GUID>${g}</GUID>
            <ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>
        </Shot>`
    ).join("\n")
  }
    </Snapshots>
</Parallels_disk_image>
`;
}

Deno.test({
  name:
    "a Parallels bundle folder (an expanding and a plain storage) converts through its DiskDescriptor.xml",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const first = sampleDisk(3 * MiB, 4);
      const second = pseudoRandom(MiB, 5);
      await Deno.writeFile(`${dir}/first.raw`, first);
      const bundle = `${dir}/disk.hdd`;
      await Deno.mkdir(bundle);
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "parallels",
        `${dir}/first.raw`,
        `${bundle}/disk.hdd.0.hds`,
      ]);
      await Deno.writeFile(`${bundle}/disk.hdd.1.hds`, second);
      await Deno.writeTextFile(
        `${bundle}/DiskDescriptor.xml`,
        descriptor(8192, [
          { start: 0, end: 6144, type: "Compressed", file: "disk.hdd.0.hds" },
          { start: 6144, end: 8192, type: "Plain", file: "disk.hdd.1.hds" },
        ]),
      );
      const r = await run(Deno.execPath(), [
        "run",
        "-A",
        new URL("../cli.ts", import.meta.url).pathname,
        "convert",
        bundle,
        `${dir}/out.raw`,
      ]);
      assertEquals(r.code, 0);
      const out = await Deno.readFile(`${dir}/out.raw`);
      const expected = new Uint8Array(4 * MiB);
      expected.set(first);
      expected.set(second, 3 * MiB);
      assertEquals(sha256Hex(out), sha256Hex(expected));
      // Through the API: the descriptor, with a resolver for its files.
      const image = await open(
        await fromFile(`${bundle}/DiskDescriptor.xml`),
        { resolveFile: (name) => fromFile(`${bundle}/${name}`) },
      );
      assertEquals(image.format, "parallels");
      assertEquals(image.details?.storages, 2);
      assertEquals(sha256Hex(await readAll(image)), sha256Hex(expected));
      await image.close?.();
    }),
});

Deno.test({
  name: "malformed Parallels descriptors are typed errors",
  ignore: skip(["bzip2"], true),
  fn: async () => {
    const hds = (await referenceBytes("qemu-iotests/parallels-v2.bz2"))!;
    const files: Record<string, Uint8Array> = { "a.hds": hds };
    const opts = {
      resolveFile: (name: string) =>
        files[name]
          ? Promise.resolve(fromBytes(files[name]))
          : Promise.reject(new ImageFormatError({ format: "parallels" }, name)),
    };
    const bad = async (xml: string, pattern: RegExp) => {
      await rejects(
        () => open(fromBytes(new TextEncoder().encode(xml)), opts),
        ImageFormatError,
        pattern,
      );
    };
    const one = { start: 0, end: 4096, type: "Compressed", file: "a.hds" };
    await bad(descriptor(4096, [{ ...one, end: 5000 }]), /Start\.\.End/);
    await bad(descriptor(8192, [one]), /to cover Disk_size/);
    await bad(descriptor(4096, [{ ...one, start: 7 }]), /Start\.\.End/);
    await bad(descriptor(4096, [{ ...one, type: "Weird" }]), /Type/);
    await bad(descriptor(4096, [{ ...one, file: "../x.hds" }]), /File/);
    await bad(descriptor(4096, [one], [GUID, GUID]), /snapshots/);
    await bad(descriptor(4096, []), /Storage/);
    await bad(
      descriptor(4096, [one]).replace("<Disk_size>4096", "<Disk_size>x"),
      /Disk_size/,
    );
    // Unclosed elements by the thousand: one forward scan, no blow-up.
    await bad(
      descriptor(4096, []).replace(
        "<StorageData>",
        "<StorageData>" + "<Storage><Start>".repeat(20000),
      ),
      /Storage/,
    );
    const ok = await open(
      fromBytes(new TextEncoder().encode(descriptor(4096, [one]))),
      opts,
    );
    assertEquals(ok.size, 4096 * 512);
  },
});
