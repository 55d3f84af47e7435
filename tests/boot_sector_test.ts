import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  bootSectorPatch,
  convert,
  type Extent,
  fromBytes,
  fromFile,
  memorySink,
  open,
} from "../mod.ts";
import {
  cli,
  pseudoRandom,
  run,
  runs,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";
import { PLAIN, qemuRaw, qemuWrite } from "./_layers.ts";

const MiB = 1 << 20;

Deno.test("sector 0 reads as the given bytes padded with zeros to 512, the rest as the image", async () => {
  const disk = pseudoRandom(8192, 5);
  const view = bootSectorPatch(
    await open(fromBytes(disk)),
    new Uint8Array([1, 2, 3]),
  );
  const expected = disk.slice();
  expected.fill(0, 0, 512);
  expected.set([1, 2, 3]);
  assertEquals(await view.read(0, 8192), expected);
  assertEquals(await view.read(510, 4), expected.slice(510, 514));
  assertEquals(await view.read(1000, 10), disk.slice(1000, 1010));
  assertEquals(view.format, "raw");
  assertEquals(view.size, 8192);
});

Deno.test("the allocation map reports sector 0 as data and keeps the image's runs after it", async () => {
  const view = bootSectorPatch(
    await open(fromBytes(new Uint8Array(65536))),
    new Uint8Array(512).fill(0x55),
  );
  assertEquals(await runs(view), [
    { offset: 0, length: 512, kind: "data" },
    { offset: 512, length: 65024, kind: "zero" },
  ]);
  const part: Extent[] = [];
  for await (const e of view.extents(100, 1000)) part.push(e);
  assertEquals(part, [
    { offset: 100, length: 412, kind: "data" },
    { offset: 512, length: 588, kind: "zero" },
  ]);
  // convert writes the patched sector of an otherwise empty disk.
  const sink = memorySink();
  await convert(view, sink);
  assertEquals(sink.bytes().subarray(0, 512), new Uint8Array(512).fill(0x55));
});

Deno.test("a boot sector longer than 512 bytes is a RangeError; an image under 512 bytes takes what fits", async () => {
  const image = await open(fromBytes(new Uint8Array(100).fill(9)));
  let threw: unknown;
  try {
    bootSectorPatch(image, new Uint8Array(513));
  } catch (e) {
    threw = e;
  }
  assertTrue(threw instanceof RangeError);
  assertMatch((threw as Error).message, /513 bytes: at most 512/);
  const view = bootSectorPatch(image, new Uint8Array(200).fill(7));
  assertEquals(await view.read(0, 100), new Uint8Array(100).fill(7));
  assertEquals(await runs(view), [{ offset: 0, length: 100, kind: "data" }]);
});

for (const plain of PLAIN) {
  Deno.test({
    name:
      `a patched ${plain.format} image reads as the patch over qemu-img's bytes, and the file is not modified`,
    ignore: skip(plain.tools),
    async fn() {
      await withTemp(async (dir) => {
        const path = `${dir}/disk.${plain.ext}`;
        await plain.createBase(path, 2 * MiB);
        await qemuWrite(path, plain.format, [[0x11, 0, 65536]]);
        const expected = await qemuRaw(path, dir);
        const before = await sha256File(path);
        const file = await fromFile(path, { write: true });
        const image = await open(file, { writable: true, sink: file });
        const patch = pseudoRandom(446, 8);
        const view = bootSectorPatch(image, patch);
        expected.fill(0, 0, 512);
        expected.set(patch);
        assertEquals(
          sha256Hex(await view.read(0, view.size)),
          sha256Hex(expected),
        );
        const sink = memorySink();
        await convert(view, sink);
        assertEquals(sha256Hex(sink.bytes()), sha256Hex(expected));
        await view.close?.();
        assertEquals(
          await sha256File(path),
          before,
          "the patch wrote the file",
        );
      });
    },
  });

  Deno.test({
    name:
      `convert --boot-sector patches sector 0 of a ${plain.format} image's output, raw and vpc, as qemu-img and dd would`,
    ignore: skip([...plain.tools, "dd"]),
    async fn() {
      await withTemp(async (dir) => {
        const path = `${dir}/disk.${plain.ext}`;
        await plain.createBase(path, 2 * MiB);
        await qemuWrite(path, plain.format, [[0x11, 0, 1024], [
          0x12,
          MiB,
          512,
        ]]);
        const boot = `${dir}/boot.bin`;
        await Deno.writeFile(boot, pseudoRandom(510, 3));
        const before = [await sha256File(path), await sha256File(boot)];
        // The reference: qemu-img's raw bytes with the sector written by dd.
        await run("qemu-img", ["convert", "-O", "raw", path, `${dir}/ref.raw`]);
        await run("dd", [
          `if=${boot}`,
          `of=${dir}/ref.raw`,
          "conv=notrunc",
          "status=none",
        ]);
        await run("dd", [
          "if=/dev/zero",
          `of=${dir}/ref.raw`,
          "bs=1",
          "seek=510",
          "count=2",
          "conv=notrunc",
          "status=none",
        ]);
        const reference = await sha256File(`${dir}/ref.raw`);

        const r = await cli([
          "convert",
          "--boot-sector",
          boot,
          path,
          `${dir}/out.raw`,
        ]);
        assertEquals(r.code, 0, r.stderr);
        assertEquals(await sha256File(`${dir}/out.raw`), reference);
        const v = await cli([
          "convert",
          "-O",
          "vpc",
          "-o",
          "force_size=on",
          "--boot-sector",
          boot,
          path,
          `${dir}/out.vhd`,
        ]);
        assertEquals(v.code, 0, v.stderr);
        const compared = await run("qemu-img", [
          "compare",
          "-q",
          "-F",
          "raw",
          `${dir}/out.vhd`,
          `${dir}/ref.raw`,
        ], { allowFail: true });
        assertEquals(compared.code, 0, compared.stderr);
        assertEquals([await sha256File(path), await sha256File(boot)], before);
      });
    },
  });
}

Deno.test("convert --boot-sector with a file over 512 bytes is a usage error, and makes no output", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/disk.raw`, new Uint8Array(4096));
    await Deno.writeFile(`${dir}/boot.bin`, new Uint8Array(600));
    const r = await cli([
      "convert",
      "--boot-sector",
      `${dir}/boot.bin`,
      `${dir}/disk.raw`,
      `${dir}/out.raw`,
    ]);
    assertEquals(r.code, 2);
    assertMatch(
      r.stderr,
      /boot\.bin is 600 bytes: at most 512 fit in sector 0/,
    );
    assertEquals(
      [...Deno.readDirSync(dir)].map((e) => e.name).sort(),
      ["boot.bin", "disk.raw"],
    );
  });
});
