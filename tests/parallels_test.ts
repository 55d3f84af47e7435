import { assertEquals } from "./_asserts.ts";
import {
  convert,
  fromBytes,
  fromFile,
  ImageFormatError,
  memorySink,
  open,
  probe,
  type Source,
} from "../mod.ts";
import {
  assertBoundedWork,
  countingSource,
  pseudoRandom,
  qemuIo,
  referenceBytes,
  referenceImages,
  rejects,
  run,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

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

async function readAll(image: Source): Promise<Uint8Array> {
  const out = new Uint8Array(image.size);
  for (let at = 0; at < image.size; at += MiB) {
    out.set(await image.read(at, Math.min(MiB, image.size - at)), at);
  }
  return out;
}

async function qemuRaw(path: string, dir: string): Promise<Uint8Array> {
  await run("qemu-img", [
    "convert",
    "-f",
    "parallels",
    "-O",
    "raw",
    path,
    `${dir}/expected.raw`,
  ]);
  return await Deno.readFile(`${dir}/expected.raw`);
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
        const expected = await qemuRaw(path, dir);
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
