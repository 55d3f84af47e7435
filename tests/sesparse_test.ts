import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  BackingFileError,
  fromBytes,
  ImageFormatError,
  open,
  probe,
  UnsupportedError,
} from "../mod.ts";
import {
  assertBoundedWork,
  cli,
  countingSource,
  pseudoRandom,
  readAll,
  rejects,
  run,
  runs,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

const GRAIN = 4096;

/**
 * An seSparse extent built from the layout QEMU reads: header at sector 0,
 * volatile header at 1, grain directory at 8, two grain tables at 16,
 * grains from 144. Grain g is allocated (g % 4 of 0 or 3, stored in
 * reverse order), zero (1) or unmapped (2); with `holes`, grain 5 and the
 * whole second table are not allocated.
 */
function buildExtent(sectors: number, holes = false) {
  const grains = Math.ceil((sectors * 512) / GRAIN);
  const disk = new Uint8Array(sectors * 512);
  const stored: number[] = [];
  const types: number[] = [];
  for (let g = 0; g < grains; g++) {
    const t = holes && (g === 5 || g >= 4096) ? 0 : [3, 2, 1, 3][g % 4];
    types.push(t);
    if (t === 3) stored.push(g);
  }
  const grainsAt = 144 * 512;
  const file = new Uint8Array(grainsAt + stored.length * GRAIN);
  const v = new DataView(file.buffer);
  const set = (at: number, value: bigint) => v.setBigUint64(at, value, true);
  set(0, 0xcafebaben);
  set(8, 0x200000001n);
  set(16, BigInt(sectors));
  set(24, 8n);
  set(32, 64n);
  set(80, 1n); // volatile header
  set(88, 1n);
  set(96, 2n); // journal header
  set(104, 1n);
  set(112, 3n); // journal
  set(120, 5n);
  set(128, 8n); // grain directory
  set(136, 8n);
  set(144, 16n); // grain tables
  set(152, 128n);
  set(192, 144n); // grains
  set(200, BigInt(stored.length * 8));
  set(512, 0xcafecafen);
  const tables = Math.ceil(grains / 4096);
  for (let t = 0; t < tables; t++) {
    if (!(holes && t === 1)) {
      set(8 * 512 + t * 8, 0x1000000000000000n | BigInt(t));
    }
  }
  // Stored in reverse order, so grain numbers do not follow the disk.
  stored.forEach((g, i) => {
    const number = stored.length - 1 - i;
    const data = pseudoRandom(GRAIN, g + 1);
    disk.set(
      data.subarray(0, Math.min(GRAIN, disk.length - g * GRAIN)),
      g * GRAIN,
    );
    file.set(data, grainsAt + number * GRAIN);
  });
  types.forEach((t, g) => {
    const at = 16 * 512 + g * 8;
    if (t === 0) return;
    if (t !== 3) {
      set(at, BigInt(t) << 60n);
      return;
    }
    const n = BigInt(stored.length - 1 - stored.indexOf(g));
    set(at, (3n << 60n) | ((n & 0xfffn) << 48n) | (n >> 12n));
  });
  return { file, disk };
}

Deno.test({
  name:
    "a bare seSparse extent reads as qemu-img reads it through a descriptor",
  ignore: skip(["qemu-img"]),
  fn: () =>
    withTemp(async (dir) => {
      const sectors = (17 << 20) / 512 + 8;
      const { file, disk } = buildExtent(sectors);
      await Deno.writeFile(`${dir}/disk-sesparse.vmdk`, file);
      await Deno.writeTextFile(
        `${dir}/disk.vmdk`,
        `# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="seSparse"

# Extent description
RW ${sectors} SESPARSE "disk-sesparse.vmdk"

# The Disk Data Base
#DDB
ddb.virtualHWVersion = "14"
`,
      );
      await run("qemu-img", [
        "convert",
        "-f",
        "vmdk",
        "-O",
        "raw",
        `${dir}/disk.vmdk`,
        `${dir}/q.raw`,
      ]);
      const expected = await Deno.readFile(`${dir}/q.raw`);
      assertEquals(sha256Hex(expected), sha256Hex(disk));
      const source = fromBytes(file);
      assertEquals((await probe(source))[0].format, "seSparse");
      const image = await open(source);
      assertEquals(image.size, sectors * 512);
      assertEquals(sha256Hex(await readAll(image)), sha256Hex(expected));
      const kinds = new Set((await runs(image)).map((e) => e.kind));
      assertEquals([...kinds].sort(), ["data", "zero"]);
    }),
});

Deno.test("a bare seSparse extent refuses to read its parent's grains as zeros, and maps them", async () => {
  const { file, disk } = buildExtent((17 << 20) / 512, true);
  const image = await open(fromBytes(file));
  assertEquals(
    sha256Hex(await image.read(0, 5 * GRAIN)),
    sha256Hex(disk.subarray(0, 5 * GRAIN)),
  );
  await rejects(() => image.read(5 * GRAIN, 10), BackingFileError, /parent/);
  await rejects(() => image.read(16 << 20, 10), BackingFileError, /parent/);
  const map = await runs(image);
  assertTrue(
    map.some((e) => e.kind === "unallocated" && e.offset === 5 * GRAIN),
  );
  assertEquals(map.at(-1)?.kind, "unallocated");
});

Deno.test("malformed seSparse extents are typed errors with bounded work", async () => {
  const { file } = buildExtent(4096);
  const poked = (at: number, value: bigint) => {
    const b = file.slice();
    new DataView(b.buffer).setBigUint64(at, value, true);
    return b;
  };
  const refused = async (
    bytes: Uint8Array,
    pattern: RegExp,
    type: typeof ImageFormatError = ImageFormatError,
  ) => {
    const counted = countingSource(bytes);
    await rejects(
      async () => {
        const image = await open(counted.source, { format: "seSparse" });
        await readAll(image);
      },
      type,
      pattern,
    );
    assertBoundedWork(counted, bytes.length);
  };
  await refused(poked(8, 3n), /version/, UnsupportedError);
  await refused(poked(24, 16n), /grain_size/, UnsupportedError);
  await refused(poked(32, 128n), /grain_table_size/, UnsupportedError);
  await refused(poked(40, 1n), /flags/, UnsupportedError);
  await refused(poked(16, 1n << 50n), /capacity/);
  await refused(poked(16, 1n << 30n), /grain_dir/);
  await refused(poked(128, 1n << 40n), /grain_dir/);
  await refused(poked(144, 1n << 40n), /grain_tables/);
  await refused(poked(8 * 512, 0x1000000000000009n), /grain_dir\[0\]/);
  await refused(poked(8 * 512, 0x2000000000000000n), /grain_dir\[0\]/);
  await refused(poked(16 * 512, 0x3000000000ffffffn), /grain_table\[0\]\[0\]/);
  await refused(poked(16 * 512, 0x7000000000000000n), /grain_table\[0\]\[0\]/);
  await refused(poked(16 * 512, 5n), /grain_table\[0\]\[0\]/);
  await refused(poked(512, 1n), /volatile_header.magic/);
  await refused(poked(512 + 24, 1n), /journal/, UnsupportedError);
  await refused(file.subarray(0, 100), /file size/);
});

Deno.test({
  name:
    "a vmdk descriptor naming a SESPARSE extent reads as qemu-img reads it, alone and over its parent",
  ignore: skip(["qemu-img", "qemu-io"]),
  fn: () =>
    withTemp(async (dir) => {
      const sectors = (17 << 20) / 512 + 8;
      const { file } = buildExtent(sectors, true);
      await Deno.writeFile(`${dir}/top-sesparse.vmdk`, file);
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "vmdk",
        `${dir}/base.vmdk`,
        String(sectors * 512),
      ]);
      await run("qemu-io", [
        "-f",
        "vmdk",
        "-c",
        "write -P 0x5a 0 17M",
        `${dir}/base.vmdk`,
      ]);
      const cid = /\nCID=([0-9a-f]+)/.exec(
        new TextDecoder("latin1").decode(
          (await Deno.readFile(`${dir}/base.vmdk`)).subarray(0, 4096),
        ),
      )![1];
      for (const parent of [false, true]) {
        const name = parent ? "top.vmdk" : "alone.vmdk";
        await Deno.writeTextFile(
          `${dir}/${name}`,
          `# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=${parent ? cid : "ffffffff"}
createType="seSparse"
${parent ? 'parentFileNameHint="base.vmdk"\n' : ""}
# Extent description
RW ${sectors} SESPARSE "top-sesparse.vmdk"

# The Disk Data Base
#DDB
ddb.virtualHWVersion = "14"
`,
        );
        await run("qemu-img", [
          "convert",
          "-f",
          "vmdk",
          "-O",
          "raw",
          `${dir}/${name}`,
          `${dir}/q.raw`,
        ]);
        const r = await cli(["convert", `${dir}/${name}`, `${dir}/o.raw`]);
        assertEquals(r.code, 0, r.stderr);
        assertEquals(
          sha256Hex(await Deno.readFile(`${dir}/o.raw`)),
          sha256Hex(await Deno.readFile(`${dir}/q.raw`)),
          name,
        );
      }
    }),
});
