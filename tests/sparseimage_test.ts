import { assertEquals } from "./_asserts.ts";
import {
  convert,
  fromBytes,
  ImageFormatError,
  memorySink,
  open,
  probe,
  UnsupportedError,
} from "../mod.ts";
import {
  assertBoundedWork,
  cli,
  countingSource,
  pseudoRandom,
  rejects,
  runs,
  sha256Hex,
  withTemp,
} from "./_helpers.ts";
import { nonZeroBands, writeSparseimage } from "./_apple_writers.ts";

/** A disk of `bands` bands of `bandSize`, with the bands in `empty` all zeros. */
function diskOf(bandSize: number, bands: number, empty: number[]): Uint8Array {
  const disk = pseudoRandom(bandSize * bands, 7);
  for (const b of empty) disk.fill(0, b * bandSize, (b + 1) * bandSize);
  return disk;
}

async function decode(file: Uint8Array): Promise<Uint8Array> {
  const image = await open(fromBytes(file, "test.sparseimage"));
  assertEquals(image.format, "sparseimage");
  const sink = memorySink();
  await convert(image, sink);
  return sink.bytes();
}

Deno.test("a sparseimage of 1 MiB bands decodes to the exact disk, unwritten bands as zero runs", async () => {
  const band = 1 << 20;
  const disk = diskOf(band, 6, [1, 2, 5]);
  const file = writeSparseimage(disk);
  assertEquals(file.length, 4096 + 3 * band);
  assertEquals(sha256Hex(await decode(file)), sha256Hex(disk));
  const image = await open(fromBytes(file));
  assertEquals(
    (await runs(image)).map((r) => [r.kind, r.offset / band, r.length / band]),
    [["data", 0, 1], ["zero", 1, 2], ["data", 3, 2], ["zero", 5, 1]],
  );
  assertEquals(image.details?.bandSize, band);
  assertEquals(image.details?.bandsPresent, 3);
});

Deno.test("bands stored out of disk order read back in place", async () => {
  const band = 64 << 10;
  const disk = diskOf(band, 8, [4]);
  const file = writeSparseimage(disk, {
    bandSize: band,
    order: [7, 2, 0, 6, 1, 3, 5],
  });
  assertEquals(sha256Hex(await decode(file)), sha256Hex(disk));
  // Reads that straddle bands stored far apart.
  const image = await open(fromBytes(file));
  assertEquals(
    sha256Hex(await image.read(band - 100, 3 * band)),
    sha256Hex(disk.subarray(band - 100, 4 * band - 100)),
  );
});

Deno.test("64 KiB bands: the band size comes from the header", async () => {
  const band = 64 << 10;
  const disk = diskOf(band, 20, [0, 3, 4, 19]);
  const file = writeSparseimage(disk, { bandSize: band });
  const image = await open(fromBytes(file));
  assertEquals(image.details?.bandSize, band);
  assertEquals(image.size, disk.length);
  assertEquals(sha256Hex(await decode(file)), sha256Hex(disk));
});

Deno.test("more bands than the header node holds continue in index nodes", async () => {
  const band = 512;
  const bands = 2500; // 1008 in the header node, 1010 in the next, the rest in a third
  const disk = diskOf(band, bands, [5, 1500, 2499]);
  const order = nonZeroBands(disk, band).reverse();
  const file = writeSparseimage(disk, { bandSize: band, order });
  const image = await open(fromBytes(file));
  assertEquals(image.details?.nodes, 3);
  assertEquals(image.details?.bandsPresent, bands - 3);
  assertEquals(sha256Hex(await decode(file)), sha256Hex(disk));
});

Deno.test("a disk whose size is not a whole number of bands ends in a short band, stored whole or cut short", async () => {
  const band = 64 << 10;
  const disk = pseudoRandom(3 * band + 4096, 3);
  for (const shortLastBand of [false, true]) {
    const file = writeSparseimage(disk, { bandSize: band, shortLastBand });
    assertEquals(sha256Hex(await decode(file)), sha256Hex(disk));
  }
});

Deno.test("the CLI converts a sparseimage file to the raw disk", async () => {
  const disk = diskOf(64 << 10, 10, [2, 3]);
  await withTemp(async (dir) => {
    await Deno.writeFile(
      `${dir}/disk.sparseimage`,
      writeSparseimage(disk, {
        bandSize: 64 << 10,
        order: [9, 0, 1, 8, 4, 5, 6, 7],
      }),
    );
    const r = await cli([
      "convert",
      "-O",
      "raw",
      `${dir}/disk.sparseimage`,
      `${dir}/disk.raw`,
    ]);
    assertEquals(r.code, 0, r.stderr);
    assertEquals(
      sha256Hex(await Deno.readFile(`${dir}/disk.raw`)),
      sha256Hex(disk),
    );
    const info = await cli([
      "info",
      "--output=json",
      `${dir}/disk.sparseimage`,
    ]);
    assertEquals(JSON.parse(info.text).format, "sparseimage", info.stderr);
  });
});

Deno.test("probing picks sparseimage by its signature", async () => {
  const file = writeSparseimage(diskOf(1 << 20, 2, []));
  assertEquals((await probe(fromBytes(file)))[0].format, "sparseimage");
});

/** A valid image to poke: 1200 bands of 512 bytes, 1197 stored, some in an index node. */
function pokeable(): Uint8Array {
  return writeSparseimage(diskOf(512, 1200, [3, 4, 5]), { bandSize: 512 });
}
const view = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset);

const broken: [string, (b: Uint8Array) => Uint8Array, RegExp][] = [
  [
    "a file shorter than the header node",
    (b) => b.slice(0, 1000),
    /file size 1000/,
  ],
  [
    "sectors_per_band 0",
    (b) => (view(b).setUint32(8, 0), b),
    /sectors_per_band 0/,
  ],
  [
    "a huge total_sectors",
    (b) => (view(b).setBigUint64(28, 1n << 60n), b),
    /total_sectors/,
  ],
  [
    "total_sectors_low disagreeing",
    (b) => (view(b).setUint32(16, 7), b),
    /total_sectors_low 7/,
  ],
  [
    "a band number past the disk's bands",
    (b) => (view(b).setUint32(64, 5000), b),
    /band_id\[0\] 5000/,
  ],
  [
    "a band named twice",
    (b) => (view(b).setUint32(68, view(b).getUint32(64)), b),
    /named twice/,
  ],
  [
    "a band map pointing outside the file",
    (b) => b.slice(0, b.length - 1024),
    /within the file/,
  ],
  ["an index node pointing back at itself", (b) => {
    const node = Number(view(b).getBigUint64(20));
    view(b).setBigUint64(node + 12, BigInt(node));
    return b;
  }, /next_node_offset/],
  [
    "an index node outside the file",
    (b) => (view(b).setBigUint64(20, 1n << 40n), b),
    /next_node_offset/,
  ],
  ["an index node without its signature", (b) => {
    b[Number(view(b).getBigUint64(20))] = 0;
    return b;
  }, /index node signature/],
];

for (const [what, poke, message] of broken) {
  Deno.test(`a sparseimage with ${what} is a typed error, with bounded work`, async () => {
    const file = poke(pokeable());
    const counted = countingSource(file);
    await rejects(
      () =>
        open(counted.source, { format: "sparseimage" }).then((i) =>
          convert(i, memorySink())
        ),
      ImageFormatError,
      message,
    );
    assertBoundedWork(counted, file.length, 100, 2);
  });
}

Deno.test("a sparseimage of another version is refused by name", async () => {
  const file = pokeable();
  view(file).setUint32(4, 4);
  await rejects(() => open(fromBytes(file)), UnsupportedError, /version 4/);
});
