import { assertEquals } from "./_asserts.ts";
import { create, fromBytes, memorySink, open, probe, raw } from "../mod.ts";
import { pseudoRandom } from "./_helpers.ts";

Deno.test("raw probes lowest so every other format wins", async () => {
  assertEquals(
    raw.probe({ head: new Uint8Array(0), tail: new Uint8Array(0), size: 0 }),
    1,
  );
  assertEquals((await probe(fromBytes(new Uint8Array(1024))))[0].format, "raw");
});

Deno.test("raw reports 4 KiB zero blocks as zero runs, aligned to the disk", async () => {
  const bytes = new Uint8Array(5 * 4096 + 100);
  bytes[4096 + 5] = 1; // block 1 holds data
  bytes[5 * 4096 + 50] = 2; // the tail holds data
  const image = await open(fromBytes(bytes));
  const runs = [];
  for await (const r of image.extents(0, bytes.length)) runs.push(r);
  assertEquals(runs, [
    { offset: 0, length: 4096, kind: "zero" },
    { offset: 4096, length: 4096, kind: "data" },
    { offset: 8192, length: 3 * 4096, kind: "zero" },
    { offset: 5 * 4096, length: 100, kind: "data" },
  ]);
  const middle = [];
  for await (const r of image.extents(4000, 300)) middle.push(r);
  assertEquals(middle, [
    { offset: 4000, length: 96, kind: "zero" },
    { offset: 4096, length: 204, kind: "data" },
  ]);
});

Deno.test("raw create makes a sized image that reads back what is written", async () => {
  const sink = memorySink();
  const image = await create("raw", sink, { size: 10_000 });
  const data = pseudoRandom(3000);
  await image.write!(5000, data);
  assertEquals(sink.bytes().length, 10_000);
  assertEquals(await image.read(5000, 3000), data);
});

Deno.test("raw create refuses a backing file", async () => {
  let message = "";
  try {
    await create("raw", memorySink(), { size: 1, backingFile: "x" });
  } catch (e) {
    message = (e as Error).message;
  }
  assertEquals(message, "raw: the raw format cannot record a backing file");
});

Deno.test("raw readInto gives the same bytes as read, inside and outside the chunk its map scanned", async () => {
  const bytes = pseudoRandom(9 << 20, 7);
  bytes.fill(0, 1 << 20, 3 << 20);
  const image = await open(fromBytes(bytes));
  const ranges: [number, number][] = [
    [0, 4096],
    [(4 << 20) - 100, 200], // across two scanned chunks
    [5 << 20, 1 << 20],
    [(9 << 20) - 10, 10],
  ];
  const check = async () => {
    for (const [at, n] of ranges) {
      const into = new Uint8Array(n);
      await image.readInto!(at, into);
      assertEquals(into, bytes.subarray(at, at + n));
      assertEquals(await image.read(at, n), bytes.subarray(at, at + n));
    }
  };
  await check(); // nothing scanned yet
  for await (const run of image.extents(0, bytes.length)) {
    if (run.kind === "data") await check(); // mid-walk, a chunk cached
  }
  await check();
});
