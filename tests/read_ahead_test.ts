import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  convert,
  fromBytes,
  fromUrl,
  open,
  readAhead,
  type Source,
} from "../mod.ts";
import {
  fileServer,
  pseudoRandom,
  rejects,
  run,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

const KIB = 1024;

/** A source over `bytes` that counts its reads and can be told to fail some. */
function counted(bytes: Uint8Array) {
  const inner = fromBytes(bytes);
  const reads: [number, number][] = [];
  let failAt: number | undefined;
  const source: Source = {
    size: bytes.length,
    name: "counted",
    read(offset, length) {
      reads.push([offset, length]);
      if (
        failAt !== undefined && offset <= failAt && failAt < offset + length
      ) {
        failAt = undefined; // once
        return Promise.reject(new Error("the network went away"));
      }
      return inner.read(offset, length);
    },
  };
  return { source, reads, failOnce: (at: number) => failAt = at };
}

Deno.test("readAhead serves reads in order from a few large windows, with the source's bytes", async () => {
  const bytes = pseudoRandom(1000 * KIB + 7, 3);
  const { source, reads } = counted(bytes);
  const ahead = readAhead(source, { window: 128 * KIB });
  assertEquals(ahead.size, bytes.length);
  assertEquals(ahead.name, "counted");
  // Uneven reads one after another, four at a time, as convert issues them.
  const pieces: [number, number][] = [];
  for (let at = 0, k = 0; at < bytes.length; k++) {
    const n = Math.min(bytes.length - at, 10 * KIB + (k * 7919) % (60 * KIB));
    pieces.push([at, n]);
    at += n;
  }
  for (let k = 0; k < pieces.length; k += 4) {
    const got = await Promise.all(
      pieces.slice(k, k + 4).map(([at, n]) => ahead.read(at, n)),
    );
    got.forEach((b, j) => {
      const [at, n] = pieces[k + j];
      assertEquals(b, bytes.subarray(at, at + n), `read at ${at}`);
    });
  }
  // The first read as it is, then windows one after the other: four
  // times the read that began the run (the second), then 128 KiB (the
  // last one shorter).
  assertEquals(reads[0], pieces[0]);
  assertEquals(reads[1], [pieces[1][0], 4 * pieces[1][1]]);
  assertTrue(reads.length <= 10, `${reads.length} source reads`);
  assertTrue(
    reads.slice(2).every(([at, n], k, all) =>
      (n === 128 * KIB || k === all.length - 1) &&
      at === (k ? all[k - 1][0] + all[k - 1][1] : reads[1][0] + reads[1][1])
    ),
  );
});

Deno.test("readAhead follows overlapping reads, and small reads elsewhere that run on from each other, without a request per read", async () => {
  // A vmdk's runs of grains by URL: each read ends a little past where
  // the next one begins, and between two of them come two small reads
  // far ahead, one after the other (its grain tables). The second of
  // those began a run of windows and let go of the first run's windows;
  // the overlapping reads then never ran on from the one before them.
  const bytes = pseudoRandom(2000 * KIB, 9);
  const { source, reads } = counted(bytes);
  const ahead = readAhead(source, { window: 128 * KIB });
  const check = async (at: number, n: number) =>
    assertEquals(await ahead.read(at, n), bytes.subarray(at, at + n), `${at}`);
  await check(0, 512);
  for (let at = 512, k = 0; at < 1500 * KIB; k++) {
    const n = 20 * KIB + (k * 4999) % (20 * KIB);
    await check(at, n);
    if (k % 10 === 5) {
      const table = 1800 * KIB + k * 2048;
      await check(table, 2048);
      await check(table + 2048, 2048);
    }
    at += n - 2 * KIB;
  }
  const fetched = reads.reduce((sum, [, n]) => sum + n, 0);
  const what = `${reads.length} source reads, ${fetched} bytes`;
  assertTrue(reads.length <= 12 + 8, what);
  assertTrue(fetched <= 1.2 * 1500 * KIB + 2 * 128 * KIB, what);
});

Deno.test("readAhead fetches each byte about once when small reads run far ahead of the reads it serves, and reads skip small gaps", async () => {
  // A qcow by URL: the allocation map reads 4 KiB tables far ahead of
  // the clusters' reads (inside the windows, one after the other), and
  // each run of clusters ends 4 KiB (a table) before the next begins.
  // The tables' reads fetched window after window, each let go before
  // the clusters' reads came to it, which then went out one by one.
  const bytes = pseudoRandom(4000 * KIB, 10);
  const { source, reads } = counted(bytes);
  const ahead = readAhead(source, { window: 256 * KIB });
  const check = async (at: number, n: number) =>
    assertEquals(await ahead.read(at, n), bytes.subarray(at, at + n), `${at}`);
  await check(0, 512);
  let table = 300 * KIB;
  for (let at = 512; at < 2000 * KIB; at += 64 * KIB) {
    await Promise.all([check(at, 60 * KIB), check(table, 4 * KIB)]);
    table += 100 * KIB;
  }
  const fetched = reads.reduce((sum, [, n]) => sum + n, 0);
  const what = `${reads.length} source reads, ${fetched} bytes`;
  // The clusters' bytes once, with three windows ahead at most, and each
  // table as it is (5 MB fetched before, most clusters twice).
  assertTrue(fetched <= (2000 + 3 * 256 + 32 * 4) * KIB, what);
});

Deno.test("readAhead passes reads out of order and long reads to the source as they are", async () => {
  const bytes = pseudoRandom(600 * KIB, 4);
  const { source, reads } = counted(bytes);
  const ahead = readAhead(source, { window: 64 * KIB });
  const asked: [number, number][] = [[500 * KIB, 100], [3, 4000], [
    200 * KIB,
    64 * KIB,
  ], [10, 10]];
  for (const [at, n] of asked) {
    assertEquals(await ahead.read(at, n), bytes.subarray(at, at + n));
  }
  assertEquals(reads, asked);
  const into = new Uint8Array(5000).fill(0xee);
  await ahead.readInto!(20, into); // runs on from the last read
  assertEquals(into, bytes.subarray(20, 5020));
  // The windows from 20 on: the first, and the next one, fetched as the
  // reads entered the first.
  assertEquals(reads.slice(-2), [[20, 64 * KIB], [20 + 64 * KIB, 64 * KIB]]);
});

Deno.test("readAhead fails the reads a failed window holds and fetches it again for the next", async () => {
  const bytes = pseudoRandom(300 * KIB, 5);
  const { source, failOnce } = counted(bytes);
  const ahead = readAhead(source, { window: 64 * KIB });
  await ahead.read(0, 1000);
  failOnce(70 * KIB); // inside the second window
  // The first starts the windows at 1000 (and fetches the second, which
  // fails); the second, issued at once, reads from both.
  const first = ahead.read(1000, 1000);
  const second = ahead.read(60 * KIB, 20 * KIB);
  assertEquals(await first, bytes.subarray(1000, 2000));
  await rejects(() => second, Error, /went away/);
  assertEquals(
    await ahead.read(60 * KIB, 20 * KIB),
    bytes.subarray(60 * KIB, 80 * KIB),
  );
  const rest = await ahead.read(80 * KIB, 40 * KIB);
  assertEquals(rest, bytes.subarray(80 * KIB, 120 * KIB));
});

Deno.test("readAhead reads a source that reads into buffers into a few reused ones, never one still read from", async () => {
  const bytes = pseudoRandom(2000 * KIB + 3, 6);
  const plain = fromBytes(bytes);
  const buffers = new Set<ArrayBufferLike>();
  const source: Source = {
    size: bytes.length,
    read: (offset, length) => plain.read(offset, length),
    async readInto(offset, into) {
      buffers.add(into.buffer);
      // Slow, in pieces, so that reads overlap the window being filled.
      for (let at = 0; at < into.length; at += 16 * KIB) {
        await new Promise((resolve) => setTimeout(resolve, 0));
        into.set(
          bytes.subarray(
            offset + at,
            offset + Math.min(into.length, at + 16 * KIB),
          ),
          at,
        );
      }
    },
  };
  const ahead = readAhead(source, { window: 100 * KIB });
  const pieces: [number, number][] = [];
  for (let at = 0; at < bytes.length; at += 30 * KIB) {
    pieces.push([at, Math.min(30 * KIB, bytes.length - at)]);
  }
  for (let k = 0; k < pieces.length; k += 5) {
    const got = await Promise.all(
      pieces.slice(k, k + 5).map(([at, n]) => ahead.read(at, n)),
    );
    got.forEach((b, j) => {
      const [at, n] = pieces[k + j];
      assertEquals(b, bytes.subarray(at, at + n), `read at ${at}`);
    });
  }
  assertTrue(buffers.size <= 6, `${buffers.size} buffers for 21 windows`);
});

Deno.test({
  name:
    "a streamOptimized vmdk converted by URL (fromUrl reads ahead) reads qemu-img's bytes in a few large range requests",
  ignore: skip(["qemu-img"]),
  async fn() {
    await withTemp(async (dir) => {
      // 192 MiB of text, random bytes and zeros in 64 KiB grains:
      // qemu-img puts the grain tables first (2 KiB each, one per 32 MiB
      // of disk, read two by two, one after the other, as convert goes),
      // and its runs of grains end a grain or two past where the next run
      // begins. A grain table that runs on from the one before it began a
      // run of windows and let go of the grains' windows, and the grains'
      // runs, which overlap, began none: every later read was a request
      // of its own.
      const MIB = 1 << 20;
      const disk = new Uint8Array(192 * MIB);
      const words = new TextEncoder().encode("grain table marker stream ");
      for (let i = 0; i < 8 * MIB; i++) disk[i] = words[(i * 7) % 26];
      disk.set(pseudoRandom(4 * MIB, 21), 8 * MIB);
      for (const at of [64, 128, 160]) disk.copyWithin(at * MIB, 0, 12 * MIB);
      await Deno.writeFile(`${dir}/disk.raw`, disk);
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        `${dir}/disk.raw`,
        `${dir}/disk.vmdk`,
      ]);
      await run("qemu-img", [
        "convert",
        "-f",
        "vmdk",
        "-O",
        "raw",
        `${dir}/disk.vmdk`,
        `${dir}/qemu.raw`,
      ]);
      const expected = sha256Hex(disk);
      assertEquals(await sha256File(`${dir}/qemu.raw`), expected);
      const fileSize = (await Deno.stat(`${dir}/disk.vmdk`)).size;
      const { server, base } = fileServer(dir);
      try {
        // Every range asked for, through the source's fetch.
        const ranges: number[] = [];
        const counting: typeof fetch = (input, init) => {
          const range = new Headers(init?.headers).get("range") ?? "";
          const m = /bytes=(\d+)-(\d+)/.exec(range);
          if (m) ranges.push(Number(m[2]) - Number(m[1]) + 1);
          return fetch(input, init);
        };
        const window = 4 * MIB;
        // fromUrl reads ahead (here in windows of at most 4 MiB).
        const source = await fromUrl(`${base}/disk.vmdk`, {
          fetch: counting,
          readAhead: { window },
        });
        const image = await open(source, { format: "vmdk" });
        ranges.length = 0;
        const nowhere = {
          write: () => Promise.resolve(),
          flush: () => Promise.resolve(),
          close: () => Promise.resolve(),
        };
        const result = await convert(image, nowhere, { hash: true });
        await image.close?.();
        assertEquals(result.sha256, expected);
        // About one request per 4 MiB window of the file and a few small
        // ones for the tables, each byte fetched about once.
        const fetched = ranges.reduce((a, b) => a + b, 0);
        const what =
          `${ranges.length} range requests, ${fetched} bytes, for a ${fileSize}-byte file`;
        assertTrue(ranges.length <= Math.ceil(fileSize / window) + 8, what);
        assertTrue(fetched <= fileSize * 1.1, what);
      } finally {
        await server.shutdown();
      }
    });
  },
});

Deno.test("fromUrl's read ahead serves a read from a window's first bytes before the rest of the window has arrived", async () => {
  const bytes = pseudoRandom(1 << 20, 7);
  const ranges: string[] = [];
  // The body of each range longer than 4 KiB (a window's) comes in two
  // halves; the second waits for `more`.
  let more!: () => void;
  const held = new Promise<void>((resolve) => more = resolve);
  const fake: typeof fetch = (_input, init) => {
    const range = new Headers(init?.headers).get("range")!;
    ranges.push(range);
    const [a, b] = /bytes=(\d+)-(\d+)/.exec(range)!.slice(1).map(Number);
    const body = bytes.slice(a, b + 1);
    const half = Math.ceil(body.length / 2);
    const stream = new ReadableStream<Uint8Array>({
      async start(controller) {
        controller.enqueue(body.slice(0, half));
        if (body.length > 4 * KIB) await held;
        if (half < body.length) controller.enqueue(body.slice(half));
        controller.close();
      },
    });
    return Promise.resolve(
      new Response(stream, {
        status: 206,
        headers: {
          "content-range": `bytes ${a}-${b}/${bytes.length}`,
          "content-length": String(body.length),
        },
      }),
    );
  };
  const source = await fromUrl("http://example.invalid/disk", {
    fetch: fake,
    readAhead: { window: 256 * KIB },
  });
  // The first read goes to the source as it is; the next, running on from
  // it, starts a run whose first window is 64 KiB (at 1000): its first
  // half arrives, the second is held.
  assertEquals(await source.read(0, 1000), bytes.subarray(0, 1000));
  const first = source.read(1000, 1000);
  const early = await Promise.race([
    first.then(() => "served"),
    new Promise((resolve) => setTimeout(() => resolve("waited"), 200)),
  ]);
  assertEquals(early, "served");
  assertEquals(await first, bytes.subarray(1000, 2000));
  // A read in the held half waits for it, and gets the right bytes.
  const later = source.read(40 * KIB, 20 * KIB);
  let done = false;
  later.then(() => done = true);
  await new Promise((resolve) => setTimeout(resolve, 50));
  assertEquals(done, false);
  more();
  assertEquals(await later, bytes.subarray(40 * KIB, 60 * KIB));
  // Reads in order on through the source: windows, not a request per read.
  for (let at = 60 * KIB; at < bytes.length; at += 16 * KIB) {
    const n = Math.min(16 * KIB, bytes.length - at);
    assertEquals(await source.read(at, n), bytes.subarray(at, at + n));
  }
  await source.close?.();
  // The probe, the first read, then windows of 64, 128 and 256 KiB.
  assertTrue(ranges.length <= 9, ranges.join(", "));
});
