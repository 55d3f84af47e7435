import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  convert,
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
  countingSource,
  pseudoRandom,
  qemuIo,
  readAll,
  rejects,
  run,
  runs,
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
    if ((at / 65536) % 5 < 2) {
      disk.set(random.subarray(at, Math.min(size, at + 65536)), at);
    }
  }
  return disk;
}

// table_size=1: qemu-img 7.2 creates such files but cannot open them
// ("QED table offset is invalid"), so 2 is the smallest tested.
for (
  const options of [
    "cluster_size=4K",
    "cluster_size=64K,table_size=2",
    "cluster_size=1M,table_size=16",
  ]
) {
  Deno.test({
    name: `a qed qemu-img converts (${options}) reads as qemu-img's raw bytes`,
    ignore: skip(["qemu-img"]),
    fn: () =>
      withTemp(async (dir) => {
        const disk = sampleDisk(5 * MiB + 1536, 3);
        await Deno.writeFile(`${dir}/src.raw`, disk);
        await run("qemu-img", [
          "convert",
          "-f",
          "raw",
          "-O",
          "qed",
          "-o",
          options,
          `${dir}/src.raw`,
          `${dir}/d.qed`,
        ]);
        const expected = await qemuRaw(`${dir}/d.qed`, dir);
        const source = await fromFile(`${dir}/d.qed`);
        assertEquals((await probe(source))[0].format, "qed");
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

Deno.test({
  name:
    "a qed written by qemu-io (data, holes, zero writes, rewrites) over a backing file reads as qemu-img's bytes",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/base.raw`, pseudoRandom(4 * MiB, 8));
      for (const [fmt, flag] of [["raw", "raw"], ["", undefined]] as const) {
        const path = `${dir}/top-${fmt || "probed"}.qed`;
        await run("qemu-img", [
          "create",
          "-f",
          "qed",
          "-b",
          "base.raw",
          ...(fmt ? ["-F", fmt] : ["-F", "raw", "-u"]),
          path,
          "5M",
        ]);
        if (!fmt) {
          // Clear the "backing is raw" feature: the base is then probed.
          const b = await Deno.readFile(path);
          b[16] &= ~4;
          await Deno.writeFile(path, b);
        }
        await qemuIo(
          "qed",
          path,
          "write -P 0x11 0 512",
          "write -P 0x22 1048576 65536",
          "write -z 2097152 131072",
          "write -P 0x33 3145728 4096",
          "write -P 0x44 1049600 1024",
          "write -z 3145728 65536",
          "write -P 0x55 5242368 512",
        );
        const expected = await qemuRaw(path, dir);
        const image = await open(await fromFile(path), {
          resolveBacking: (name) => fromFile(`${dir}/${name}`),
        });
        assertEquals(image.backingFile, "base.raw");
        assertEquals(image.backingFormat, flag);
        assertEquals(image.backing?.format, "raw");
        assertEquals(sha256Hex(await readAll(image)), sha256Hex(expected));
        // The layer alone: zero clusters and unallocated ones.
        const alone = await open(await fromFile(path));
        const kinds = new Set((await runs(alone)).map((e) => e.kind));
        assertTrue(kinds.has("zero") && kinds.has("unallocated"));
        await image.close?.();
        await alone.close?.();
      }
    }),
});

/** A small qed made by qemu-img, with data in its first cluster. */
async function smallQed(): Promise<Uint8Array> {
  return await withTemp(async (dir) => {
    await run("qemu-img", [
      "create",
      "-f",
      "qed",
      "-o",
      "cluster_size=4K,table_size=2",
      `${dir}/s.qed`,
      "1M",
    ]);
    await qemuIo("qed", `${dir}/s.qed`, "write -P 9 0 8192");
    return await Deno.readFile(`${dir}/s.qed`);
  });
}

Deno.test({
  name: "a qed with the need-check flag is read anyway, and says so",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: async () => {
    const bytes = await smallQed();
    bytes[16] |= 2;
    const image = await open(fromBytes(bytes));
    assertEquals(image.details?.needCheck, true);
    assertEquals((await image.read(0, 1))[0], 9);
  },
});

async function refused(
  bytes: Uint8Array,
  pattern: RegExp,
  type: typeof ImageFormatError = ImageFormatError,
) {
  const counted = countingSource(bytes);
  await rejects(
    async () => {
      const image = await open(counted.source, { format: "qed" });
      await readAll(image);
    },
    type,
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
  name: "malformed qed headers and tables are typed errors with bounded work",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: async () => {
    const good = await smallQed();
    for (const size of [0, 3000, 4097, 6144, 128 << 20]) {
      await refused(poked(good, 4, size), /cluster_size/);
    }
    for (const table of [0, 3, 32]) {
      await refused(poked(good, 8, table), /table_size/);
    }
    await refused(poked(good, 12, 1 << 20), /header_size/);
    await refused(poked(good, 48, 1n << 50n), /image_size/);
    await refused(poked(good, 48, 1000n), /image_size/);
    await refused(poked(good, 40, 1n << 40n), /l1_table_offset/);
    await refused(poked(good, 40, 4097n), /l1_table_offset/);
    await refused(poked(good, 16, 8n), /features/, UnsupportedError);
    // Backing file name outside the header.
    const named = poked(poked(good, 16, 1n), 60, 5000);
    await refused(poked(named, 56, 64), /backing_filename/);
    // L1 and L2 entries outside the file.
    const l1 = Number(new DataView(good.buffer).getBigUint64(40, true));
    await refused(poked(good, l1, 1n << 40n), /L1\[0\]/);
    const l2 = Number(new DataView(good.buffer).getBigUint64(l1, true));
    await refused(poked(good, l2, 1n << 40n), /L2\[0\]\[0\]/);
    await refused(poked(good, l2, 4097n), /L2\[0\]\[0\]/);
    await refused(good.subarray(0, 40), /file size/);
  },
});
