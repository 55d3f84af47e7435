import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  type Extent,
  fileBackingResolver,
  fromBytes,
  fromFile,
  type Image,
  open,
  snapshot,
} from "../mod.ts";
import {
  pseudoRandom,
  runs,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";
import { LAYERED, PLAIN, qemuRaw, qemuWrite } from "./_layers.ts";

const MiB = 1 << 20;

/** Writes spanning clusters, inside one, unaligned, and at the very end. */
function writesFor(size: number): [number, Uint8Array][] {
  return [
    [100, pseudoRandom(70_000, 1)],
    [MiB + 3, pseudoRandom(5, 2)],
    [2 * MiB - 65536, pseudoRandom(65536, 3)],
    [size - 700, pseudoRandom(700, 4)],
  ];
}

for (const plain of PLAIN) {
  Deno.test({
    name:
      `writes through a snapshot of a ${plain.format} image read back, and the file is not modified even when opened writable`,
    ignore: skip(plain.tools),
    async fn() {
      await withTemp(async (dir) => {
        const size = 4 * MiB;
        const path = `${dir}/disk.${plain.ext}`;
        await plain.createBase(path, size);
        await qemuWrite(path, plain.format, [[0x11, 0, MiB], [
          0x12,
          3 * MiB,
          4096,
        ]]);
        const expected = await qemuRaw(path, dir);
        const before = await sha256File(path);

        const file = await fromFile(path, { write: true });
        const image = await open(file, { writable: true, sink: file });
        assertTrue(image.write, "opened writable");
        const view = snapshot(image);
        for (const [offset, bytes] of writesFor(size)) {
          await view.write(offset, bytes);
          expected.set(bytes, offset);
        }
        assertEquals(sha256Hex(await view.read(0, size)), sha256Hex(expected));
        // Unaligned reads across held and not-held clusters.
        assertEquals(
          await view.read(65000, 200_000),
          expected.slice(65000, 265_000),
        );
        for (const e of await runs(view)) {
          if (e.kind !== "data") {
            assertTrue(
              expected.subarray(e.offset, e.offset + e.length).every((b) =>
                b === 0
              ),
              `${e.kind} run at ${e.offset} holds data`,
            );
          }
        }
        await view.close();
        assertEquals(
          await sha256File(path),
          before,
          "the snapshot wrote the file",
        );
      });
    },
  });
}

for (const layered of LAYERED) {
  Deno.test({
    name:
      `a snapshot of a ${layered.format} backing chain takes writes without modifying either file`,
    ignore: skip(layered.tools),
    async fn() {
      await withTemp(async (dir) => {
        const size = 2 * MiB;
        const base = `${dir}/base.${layered.ext}`;
        const top = `${dir}/top.${layered.ext}`;
        await layered.createBase(base, size);
        await qemuWrite(base, layered.format, [[0x21, 0, MiB]]);
        await layered.createOverlay(top, `base.${layered.ext}`, size);
        const expected = await qemuRaw(base, dir);
        const hashes = [await sha256File(base), await sha256File(top)];

        const file = await fromFile(top, { write: true });
        const chain = await open(file, {
          writable: true,
          sink: file,
          resolveBacking: fileBackingResolver(top),
        });
        const view = snapshot(chain, { clusterSize: 4096 });
        for (const [offset, bytes] of writesFor(size)) {
          await view.write(offset, bytes);
          expected.set(bytes, offset);
        }
        assertEquals(sha256Hex(await view.read(0, size)), sha256Hex(expected));
        await view.close();
        assertEquals(
          [await sha256File(base), await sha256File(top)],
          hashes,
          "the snapshot wrote a file",
        );
      });
    },
  });
}

Deno.test("the allocation map reports written clusters as data and keeps the image's runs elsewhere", async () => {
  const image = await open(fromBytes(new Uint8Array(65536)));
  const view = snapshot(image, { clusterSize: 4096 });
  assertEquals(await runs(view), [{ offset: 0, length: 65536, kind: "zero" }]);
  await view.write(4096 + 10, new Uint8Array([1]));
  await view.write(8192, new Uint8Array(4096)); // zeros written are data too
  await view.write(40000, new Uint8Array([2]));
  assertEquals(await runs(view), [
    { offset: 0, length: 4096, kind: "zero" },
    { offset: 4096, length: 8192, kind: "data" },
    { offset: 12288, length: 24576, kind: "zero" },
    { offset: 36864, length: 4096, kind: "data" },
    { offset: 40960, length: 24576, kind: "zero" },
  ]);
  assertEquals(view.layerBytes, 3 * 4096);
  const layer: Extent[] = [];
  for await (const e of view.top.extents(0, 65536)) layer.push(e);
  assertEquals(layer.map((e) => e.kind), [
    "unallocated",
    "data",
    "unallocated",
    "data",
    "unallocated",
  ]);
  view.discard();
  assertEquals(view.layerBytes, 0);
  assertEquals((await view.read(4106, 1))[0], 0);
});

Deno.test("a write to the short last cluster of an odd-sized image keeps the image's bytes around it", async () => {
  const bytes = pseudoRandom(5000, 9);
  const view = snapshot(await open(fromBytes(bytes)), { clusterSize: 4096 });
  await view.write(4999, new Uint8Array([0]));
  const expected = bytes.slice();
  expected[4999] = 0;
  assertEquals(await view.read(0, 5000), expected);
  assertEquals(view.layerBytes, 904); // the last cluster is 5000 - 4096 bytes
});

Deno.test("a snapshot of a 1 TiB image holds only what was written, and maps it quickly", async () => {
  const size = 2 ** 40;
  const image: Image = {
    format: "fake",
    size,
    encrypted: false,
    read: (_o, length) => Promise.resolve(new Uint8Array(length)),
    async *extents(offset, length) {
      yield { offset, length, kind: "zero" };
    },
  };
  const view = snapshot(image);
  for (let i = 0; i < 1000; i++) {
    await view.write(i * 2 ** 30 + 7, new Uint8Array([i & 0xff, 1]));
  }
  assertEquals(view.layerBytes, 1000 * 65536);
  const all = await runs(view);
  assertEquals(all.filter((e) => e.kind === "data").length, 1000);
  assertEquals((await view.read(999 * 2 ** 30 + 7, 2)).join(), "231,1");
});

Deno.test("snapshot refuses a cluster size that is not a power of two from 512", () => {
  const image = { size: 0 } as Image;
  for (const clusterSize of [0, 256, 1000, 3 * 4096]) {
    let threw = false;
    try {
      snapshot(image, { clusterSize });
    } catch (e) {
      threw = e instanceof RangeError;
    }
    assertTrue(threw, `clusterSize ${clusterSize} accepted`);
  }
});
