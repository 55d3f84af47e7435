/**
 * What the CLI prints for info, map and compare comes from the library
 * (issue 17): scripts, workers and the service get the same answers.
 */
import { assertEquals } from "./_asserts.ts";
import {
  allocatedBytes,
  describeImage,
  fileBackingResolver,
  firstDifference,
  formatInfo,
  fromBytes,
  fromFile,
  layers,
  mapChain,
  open,
} from "../mod.ts";
import { cli, pseudoRandom, run, skip, withTemp } from "./_helpers.ts";

Deno.test("formatInfo(describeImage(...)) is what info prints, for one image and for each layer of a chain", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/base.raw`, pseudoRandom(1 << 20, 4));
    assertEquals(
      (await cli([
        "create",
        "-f",
        "qcow",
        "-b",
        "base.raw",
        `${dir}/top.qcow`,
        "1M",
      ])).code,
      0,
    );
    await Deno.writeFile(`${dir}/data.bin`, pseudoRandom(70_000, 5));
    const wrote = await cli([
      "write",
      `${dir}/top.qcow`,
      "4096",
      `${dir}/data.bin`,
    ]);
    assertEquals(wrote.code, 0, wrote.stderr);
    const path = `${dir}/top.qcow`;
    const file = await fromFile(path);
    const image = await open(file);
    const text = formatInfo(
      await describeImage(image, {
        filename: path,
        actualSize: await file.allocatedBytes(),
        partitions: true,
      }),
    );
    assertEquals((await cli(["info", path])).text, text);
    await image.close?.();
    const chain = await open(await fromFile(path), {
      resolveBacking: fileBackingResolver(path),
    });
    assertEquals(layers(chain).map((l) => l.format), ["qcow", "raw"]);
    await chain.close?.();
  });
});

Deno.test({
  name:
    "mapChain gives qemu-img map's depths for a chain, and firstDifference what compare reports",
  ignore: skip(["qemu-img", "qemu-io"]),
  async fn() {
    await withTemp(async (dir) => {
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "raw",
        `${dir}/base.raw`,
        "4M",
      ]);
      await run("qemu-io", [
        "-f",
        "raw",
        "-c",
        "write -P 1 0 1M",
        `${dir}/base.raw`,
      ]);
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        "base.raw",
        "-F",
        "raw",
        `${dir}/top.qcow`,
        "4M",
      ]);
      await run("qemu-io", [
        "-f",
        "qcow",
        "-c",
        "write -P 2 2M 64k",
        `${dir}/top.qcow`,
      ]);
      const path = `${dir}/top.qcow`;
      const chain = await open(await fromFile(path), {
        resolveBacking: fileBackingResolver(path),
      });
      const ours = [];
      for await (const run of mapChain(chain)) {
        if (run.kind === "data") ours.push([run.offset, run.length, run.depth]);
      }
      const theirs = (JSON.parse(
        (await run("qemu-img", ["map", "--output=json", path])).text,
      ) as { start: number; length: number; depth: number; data: boolean }[])
        .filter((e) => e.data).map((e) => [e.start, e.length, e.depth]);
      assertEquals(ours, theirs);
      const plain = await open(
        fromBytes(await Deno.readFile(`${dir}/base.raw`)),
      );
      assertEquals(await firstDifference(chain, plain), 2 << 20);
      assertEquals(await firstDifference(plain, plain), undefined);
      await chain.close?.();
    });
  },
});

Deno.test("allocatedBytes of a raw file counts the data ranges its file system reports, reading none of the disk", async () => {
  await withTemp(async (dir) => {
    const path = `${dir}/sparse.raw`;
    // 8 MiB with 64 KiB of data at 4 MiB, its first 4 KiB zeros written
    // out: data to the file system, a zero block to a scan.
    const data = pseudoRandom(64 << 10, 9);
    data.fill(0, 0, 4096);
    const out = await Deno.open(path, { create: true, write: true });
    await out.truncate(8 << 20);
    await out.seek(4 << 20, Deno.SeekMode.Start);
    for (let at = 0; at < data.length;) {
      at += await out.write(data.subarray(at));
    }
    out.close();
    const file = await fromFile(path);
    const image = await open(file, { format: "raw" });
    const ranges = await file.dataRanges?.(0, image.size);
    assertEquals(ranges, [[4 << 20, (4 << 20) + (64 << 10)]]);
    // Not one byte of the disk is read to count them.
    const refuse = () => {
      throw new Error("allocatedBytes read the disk");
    };
    Object.assign(file, { read: refuse, readInto: refuse });
    assertEquals(await allocatedBytes(image), 64 << 10);
    await image.close?.();
    const info = await cli(["info", "--output=json", path]);
    assertEquals(JSON.parse(info.text)["allocated-bytes"], 64 << 10);
    // Bytes in memory have no file system to ask: their zero blocks are
    // found by reading.
    const inMemory = await open(fromBytes(data));
    assertEquals(await allocatedBytes(inMemory), 60 << 10);
  });
});

Deno.test({
  name:
    "map of a raw file, alone and as a qcow2's backing file, is qemu-img map's: data where the file system has data (a written zero block too), holes as zeros",
  ignore: skip(["qemu-img", "qemu-io"]),
  async fn() {
    await withTemp(async (dir) => {
      const path = `${dir}/base.raw`;
      const data = pseudoRandom(64 << 10, 11);
      data.fill(0, 0, 4096);
      const out = await Deno.open(path, { create: true, write: true });
      await out.truncate(8 << 20);
      for (const at of [0, 4 << 20]) {
        await out.seek(at, Deno.SeekMode.Start);
        for (let n = 0; n < data.length;) {
          n += await out.write(data.subarray(n));
        }
      }
      out.close();
      const top = `${dir}/top.qcow2`;
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        top,
      ]);
      await run("qemu-io", ["-c", "write -P 7 1M 64k", top]);
      for (const [image, format] of [[path, "raw"], [top, "qcow2"]]) {
        const ours = await cli(["map", "--output=json", "-f", format, image]);
        assertEquals(ours.code, 0, ours.stderr);
        const theirs = await run("qemu-img", [
          "map",
          "--output=json",
          "-f",
          format,
          image,
        ]);
        assertEquals(ours.text.trim(), theirs.text.trim());
      }
    });
  },
});

Deno.test("firstDifference finds the first differing byte wherever it lies: in a word group, a tail, past the shorter image's end, against a zero block", async () => {
  const size = (4 << 20) + 4096 + 37; // a second block, odd in length
  const base = pseudoRandom(size, 12);
  // Zero blocks: the map says so and they are not read.
  base.fill(0, 1 << 20, 2 << 20);
  const naive = (x: Uint8Array, y: Uint8Array) => {
    for (let i = 0; i < Math.max(x.length, y.length); i++) {
      if ((x[i] ?? 0) !== (y[i] ?? 0)) return i;
    }
    return undefined;
  };
  const positions = [
    0,
    1,
    31,
    32,
    33,
    (1 << 20) + 5, // inside the zero block
    (4 << 20) - 1,
    4 << 20,
    size - 37,
    size - 1,
  ];
  for (const at of positions) {
    for (const second of [undefined, at + 3, size - 2]) {
      const other = base.slice();
      other[at] ^= 0x40;
      if (second !== undefined && second < size) other[second] ^= 1;
      const a = await open(fromBytes(base));
      const b = await open(fromBytes(other));
      assertEquals(await firstDifference(a, b), naive(base, other), `${at}`);
      assertEquals(await firstDifference(b, a), naive(base, other), `${at}`);
    }
  }
  // Sizes differ: the shorter one reads as zeros past its end.
  const shorter = base.subarray(0, size - 100);
  const longer = new Uint8Array(size);
  longer.set(shorter);
  const a = await open(fromBytes(shorter));
  assertEquals(
    await firstDifference(a, await open(fromBytes(longer))),
    undefined,
  );
  longer[size - 5] = 9;
  assertEquals(
    await firstDifference(a, await open(fromBytes(longer))),
    size - 5,
  );
  assertEquals(
    await firstDifference(await open(fromBytes(longer)), a),
    size - 5,
  );
  assertEquals(
    await firstDifference(a, await open(fromBytes(base))),
    size - 100 + base.subarray(size - 100).findIndex((v) => v !== 0),
  );
});
