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

// A bundle with a snapshot tree, written from prl-xml.rst: each snapshot's
// .hds a delta (qemu-img creates the empty expanding images, qemu-io
// writes each delta's clusters), the descriptor naming the tree.

const ROOT = "{00000000-0000-0000-0000-000000000000}";
const G = {
  base: "{1f4e2a10-0000-4000-8000-000000000001}",
  s1: "{1f4e2a10-0000-4000-8000-000000000002}",
  s2: "{1f4e2a10-0000-4000-8000-000000000003}",
  top: "{1f4e2a10-0000-4000-8000-000000000004}",
};

/** A descriptor of one storage whose images form the tree `shots`. */
function treeDescriptor(
  diskSectors: number,
  images: { guid: string; file: string; type?: string }[],
  shots: [string, string][],
  topGuid?: string,
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
        <Storage>
            <Start>0</Start>
            <End>${diskSectors}</End>
            <Blocksize>2048</Blocksize>
${
    images.map((im) =>
      `            <Image>
                <GUID>${im.guid}</GUID>
                <Type>${im.type ?? "Compressed"}</Type>
                <File>${im.file}</File>
            </Image>`
    ).join("\n")
  }
        </Storage>
    </StorageData>
    <Snapshots>
${topGuid ? `        <TopGUID>${topGuid}</TopGUID>\n` : ""}${
    shots.map(([g, p]) =>
      `        <Shot>
            <GUID>${g}</GUID>
            <ParentGUID>${p}</ParentGUID>
        </Shot>`
    ).join("\n")
  }
    </Snapshots>
</Parallels_disk_image>
`;
}

/**
 * base <- s1 <- top (the current state), and s2, another child of base.
 * Returns the disk each GUID's state holds.
 */
async function snapshotBundle(bundle: string) {
  const size = 8 * MiB;
  await Deno.mkdir(bundle);
  const disk = sampleDisk(size, 51);
  await Deno.writeFile(`${bundle}/../base.raw`, disk);
  await run("qemu-img", [
    "convert",
    "-f",
    "raw",
    "-O",
    "parallels",
    `${bundle}/../base.raw`,
    `${bundle}/base.hds`,
  ]);
  const states: Record<string, Uint8Array> = { [G.base]: disk };
  const deltas: [string, string, [number, number, number][]][] = [
    // [guid, parent, writes: offset, length, pattern]
    [G.s1, G.base, [[100_000, 5000, 0x11], [3 * MiB, MiB, 0x12]]],
    [G.top, G.s1, [[200_000, 700, 0x21], [3 * MiB + 4096, 512, 0x22]]],
    [G.s2, G.base, [[0, 4096, 0x31], [7 * MiB, 65536, 0x32]]],
  ];
  for (const [guid, parent, writes] of deltas) {
    const file = `${bundle}/${guid.slice(1, 9)}-${guid.slice(-2, -1)}.hds`;
    await run("qemu-img", ["create", "-f", "parallels", file, `${size}`]);
    const state = states[parent].slice();
    // A delta holds whole clusters (1 MiB): the rest of each cluster it
    // stores is its parent's bytes, as Parallels copies them.
    const cluster = MiB;
    const touched = new Set<number>();
    for (const [at, n, p] of writes) {
      state.fill(p, at, at + n);
      for (let c = Math.floor(at / cluster); c * cluster < at + n; c++) {
        touched.add(c);
      }
    }
    await qemuIo(
      "parallels",
      file,
      ...[...touched].map((c) => `write -P 0 ${c * cluster} ${cluster}`),
    );
    // The clusters' bytes written whole from the new state.
    const f = await Deno.open(file, { read: true, write: true });
    const header = new Uint8Array(64 + 8 * 4);
    await f.read(header);
    const tracks = new DataView(header.buffer).getUint32(28, true);
    assertEquals(tracks * 512, cluster);
    for (const c of touched) {
      const entry = new DataView(header.buffer).getUint32(64 + c * 4, true);
      assertEquals(entry !== 0, true);
      await f.seek(entry * cluster, Deno.SeekMode.Start);
      await f.write(state.subarray(c * cluster, (c + 1) * cluster));
    }
    f.close();
    states[guid] = state;
  }
  const file = (g: string) =>
    g === G.base ? "base.hds" : `${g.slice(1, 9)}-${g.slice(-2, -1)}.hds`;
  const images = Object.values(G).map((guid) => ({ guid, file: file(guid) }));
  const shots: [string, string][] = [
    [G.base, ROOT],
    [G.s1, G.base],
    [G.s2, G.base],
    [G.top, G.s1],
  ];
  return { size, states, images, shots };
}

Deno.test({
  name:
    "a Parallels bundle with a snapshot tree reads its current state (TopGUID) through the chain of deltas, and a named snapshot with -l",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      const bundle = `${dir}/disk.hdd`;
      const { size, states, images, shots } = await snapshotBundle(bundle);
      await Deno.writeTextFile(
        `${bundle}/DiskDescriptor.xml`,
        treeDescriptor(size / 512, images, shots, G.top),
      );
      const cliPath = new URL("../cli.ts", import.meta.url).pathname;
      const convertTo = async (out: string, ...extra: string[]) => {
        const r = await run(Deno.execPath(), [
          "run",
          "-A",
          cliPath,
          "convert",
          ...extra,
          bundle,
          out,
        ], { allowFail: true });
        assertEquals(r.code, 0, r.stderr);
        return sha256Hex(await Deno.readFile(out));
      };
      assertEquals(await convertTo(`${dir}/top.raw`), sha256Hex(states[G.top]));
      for (const guid of [G.s1, G.s2, G.base]) {
        assertEquals(
          await convertTo(`${dir}/s.raw`, "-l", guid),
          sha256Hex(states[guid]),
          guid,
        );
      }
      // info's facts: the state read, its chain, the tree.
      const image = await open(
        await fromFile(`${bundle}/DiskDescriptor.xml`),
        { resolveFile: (name) => fromFile(`${bundle}/${name}`) },
      );
      assertEquals(image.details?.snapshot, G.top);
      assertEquals(image.details?.chain, [G.top, G.s1, G.base]);
      assertEquals(
        (image.details?.snapshots as unknown[]).length,
        4,
      );
      await image.close?.();
    }),
});

Deno.test({
  name:
    "Parallels snapshot trees that loop, name missing parents or images, or a top that is not listed are typed errors",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      const bundle = `${dir}/disk.hdd`;
      const { size, images, shots } = await snapshotBundle(bundle);
      const opts = {
        resolveFile: (name: string) => fromFile(`${bundle}/${name}`),
      };
      const bad = async (xml: string, pattern: RegExp, snapshot?: string) => {
        await rejects(
          () =>
            open(fromBytes(new TextEncoder().encode(xml)), {
              ...opts,
              options: snapshot ? { snapshot } : undefined,
            }),
          ImageFormatError,
          pattern,
        );
      };
      const sectors = size / 512;
      // No TopGUID, and the predefined top GUID is not a snapshot.
      await bad(treeDescriptor(sectors, images, shots), /TopGUID/);
      // A loop: base's parent is top.
      await bad(
        treeDescriptor(
          sectors,
          images,
          shots.map(([g, p]) => g === G.base ? [g, G.top] : [g, p]),
          G.top,
        ),
        /loop/,
      );
      // A parent no snapshot has.
      await bad(
        treeDescriptor(
          sectors,
          images,
          shots.map(([g, p]) =>
            g === G.s1 ? [g, "{99999999-0000-4000-8000-000000000000}"] : [g, p]
          ),
          G.top,
        ),
        /ParentGUID/,
      );
      // A snapshot of the chain without an image in the storage.
      await bad(
        treeDescriptor(
          sectors,
          images.filter((im) => im.guid !== G.s1),
          shots,
          G.top,
        ),
        /Image/,
      );
      // A Plain image above the root.
      await bad(
        treeDescriptor(
          sectors,
          images.map((im) => im.guid === G.s1 ? { ...im, type: "Plain" } : im),
          shots,
          G.top,
        ),
        /Type/,
      );
      // -l naming no snapshot.
      await bad(
        treeDescriptor(sectors, images, shots, G.top),
        /snapshot/,
        "{12345678-0000-4000-8000-000000000000}",
      );
    }),
});
