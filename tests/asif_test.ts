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
import { nonZeroBands, writeAsif } from "./_apple_writers.ts";

const MiB = 1 << 20;

/** A disk of `chunks` chunks of `chunkSize`, the chunks in `empty` all zeros. */
function diskOf(
  chunkSize: number,
  chunks: number,
  empty: number[],
): Uint8Array {
  const disk = pseudoRandom(chunkSize * chunks, 13);
  for (const c of empty) disk.fill(0, c * chunkSize, (c + 1) * chunkSize);
  return disk;
}

async function decode(file: Uint8Array): Promise<Uint8Array> {
  const image = await open(fromBytes(file, "test.asif"));
  assertEquals(image.format, "asif");
  const sink = memorySink();
  await convert(image, sink);
  return sink.bytes();
}

Deno.test("an ASIF image of 1 MiB chunks decodes to the exact disk; the allocation map shows its holes", async () => {
  const disk = diskOf(MiB, 6, [1, 2, 5]);
  const file = writeAsif(disk);
  assertEquals(sha256Hex(await decode(file)), sha256Hex(disk));
  const image = await open(fromBytes(file));
  assertEquals(
    (await runs(image)).map((r) => [r.kind, r.offset / MiB, r.length / MiB]),
    [["data", 0, 1], ["zero", 1, 2], ["data", 3, 2], ["zero", 5, 1]],
  );
  assertEquals(image.details?.chunkSize, MiB);
  assertEquals(image.details?.blockSize, 512);
  assertEquals(image.details?.uuid, "a0a1a2a3-a4a5-a6a7-a8a9-aaabacadaeaf");
});

Deno.test("chunks stored out of disk order, and the current directory chosen by sequence number", async () => {
  const chunk = 32 << 10;
  const disk = diskOf(chunk, 12, [3, 7]);
  const order = nonZeroBands(disk, chunk).reverse();
  for (const staleFirst of [false, true]) {
    const file = writeAsif(disk, { chunkSize: chunk, order, staleFirst });
    assertEquals(sha256Hex(await decode(file)), sha256Hex(disk));
  }
});

Deno.test("chunks written in part read their unwritten sectors as zeros, by the group's bitmap", async () => {
  const chunk = 32 << 10;
  const disk = diskOf(chunk, 8, [6]);
  // Chunk 2: only every third sector written; chunk 4: only its first.
  for (let s = 0; s < chunk / 512; s++) {
    if (s % 3) disk.fill(0, 2 * chunk + s * 512, 2 * chunk + (s + 1) * 512);
  }
  disk.fill(0, 4 * chunk + 512, 5 * chunk);
  const file = writeAsif(disk, { chunkSize: chunk, partial: [2, 4] });
  assertEquals(sha256Hex(await decode(file)), sha256Hex(disk));
  const image = await open(fromBytes(file));
  // A read that starts and ends inside sectors.
  assertEquals(
    sha256Hex(await image.read(2 * chunk + 700, 5000)),
    sha256Hex(disk.subarray(2 * chunk + 700, 2 * chunk + 5700)),
  );
});

Deno.test("a disk spanning several tables, one of them absent, decodes exactly", async () => {
  // The smallest chunk with a whole chunk group: 33 sectors; a table then
  // maps 2048 chunks (34.6 MB), so 80 MB needs three tables.
  const chunk = 33 * 512;
  const chunks = Math.ceil((80 * 1000 * 1000) / chunk);
  const disk = new Uint8Array(chunks * chunk);
  const stored = [0, 5, 2047, 2048 * 2 + 1, chunks - 1];
  for (const c of stored) disk.set(pseudoRandom(chunk, c + 1), c * chunk);
  const file = writeAsif(disk, { chunkSize: chunk });
  const image = await open(fromBytes(file));
  assertEquals(image.details?.tables, 3);
  assertEquals(image.details?.tablesPresent, 2);
  assertEquals(sha256Hex(await decode(file)), sha256Hex(disk));
  const map = await runs(image);
  assertEquals(map.filter((r) => r.kind === "data").length, stored.length);
});

Deno.test("4096-byte blocks", async () => {
  const chunk = 256 << 10;
  const disk = diskOf(chunk, 5, [1]);
  const file = writeAsif(disk, {
    chunkSize: chunk,
    blockSize: 4096,
    partial: [3],
  });
  assertEquals(sha256Hex(await decode(file)), sha256Hex(disk));
});

Deno.test("the CLI converts an ASIF image to the raw disk; probing finds it", async () => {
  const disk = diskOf(MiB, 4, [2]);
  const file = writeAsif(disk);
  assertEquals((await probe(fromBytes(file)))[0].format, "asif");
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/disk.asif`, file);
    const r = await cli([
      "convert",
      "-O",
      "raw",
      `${dir}/disk.asif`,
      `${dir}/disk.raw`,
    ]);
    assertEquals(r.code, 0, r.stderr);
    assertEquals(
      sha256Hex(await Deno.readFile(`${dir}/disk.raw`)),
      sha256Hex(disk),
    );
  });
});

const view = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset);
/** A valid image to poke: 32 KiB chunks, the table at chunk 1, data from chunk 2. */
function pokeable(): Uint8Array {
  return writeAsif(diskOf(32 << 10, 8, [3]), {
    chunkSize: 32 << 10,
    partial: [5],
  });
}
const TABLE = 32 << 10;

const broken: [string, (b: Uint8Array) => Uint8Array, RegExp][] = [
  ["a truncated header", (b) => b.slice(0, 40), /file size 40/],
  [
    "a block size of 100",
    (b) => (view(b).setUint16(68, 100), b),
    /block size 100/,
  ],
  ["a chunk size of 0", (b) => (view(b).setUint32(64, 0), b), /chunk size 0/],
  [
    "a huge chunk size",
    (b) => (view(b).setUint32(64, 0xfffffe00), b),
    /chunk size/,
  ],
  [
    "a huge sector count",
    (b) => (view(b).setBigUint64(48, 1n << 62n), b),
    /sector count/,
  ],
  [
    "a sector count past the maximum",
    (b) => (view(b).setBigUint64(56, 1n), b),
    /sector count/,
  ],
  [
    "a directory outside the file",
    (b) => (view(b).setBigUint64(16, 1n << 40n), b),
    /directory offset 0/,
  ],
  [
    "a table chunk outside the file",
    (b) => (view(b).setBigUint64(512 + 8, 1n << 30n), b),
    /directory\[0\]/,
  ],
  [
    "a data chunk outside the file",
    (b) => (view(b).setBigUint64(TABLE, (1n << 62n) | 999999n), b),
    /table 0 entry 0/,
  ],
  [
    "a file cut short",
    (b) => b.slice(0, b.length - (32 << 10) - 5000),
    /within the file/,
  ],
];
for (const [what, poke, message] of broken) {
  Deno.test(`an ASIF image with ${what} is a typed error, with bounded work`, async () => {
    const file = poke(pokeable());
    const counted = countingSource(file);
    await rejects(
      () =>
        open(counted.source, { format: "asif" }).then((i) =>
          convert(i, memorySink())
        ),
      ImageFormatError,
      message,
    );
    assertBoundedWork(counted, file.length, 200, 3);
  });
}

Deno.test("uncharacterised chunk states and other header versions are refused, not guessed", async () => {
  const states = pokeable();
  view(states).setBigUint64(TABLE, (2n << 62n) | 2n);
  await rejects(
    () => open(fromBytes(states)).then((i) => i.read(0, 512)),
    UnsupportedError,
    /status 10/,
  );
  const version = pokeable();
  view(version).setUint32(4, 2);
  await rejects(() => open(fromBytes(version)), UnsupportedError, /version 2/);
});
