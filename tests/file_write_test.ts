// The file sink's queued writes (streams/file.ts): writes of 256 KiB and
// more run on Deno's I/O thread and convert does not wait for each one
// (streams/convert.ts, WriteChain). They must land in the order asked for,
// every later op (a read, a small write, flush) must see them, a failure
// must reach the caller as a WriteError, and a convert through them must
// write qemu-img's bytes.

import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  convert,
  createOutputFile,
  fromBytes,
  fromFile,
  open,
  type Sink,
  WriteError,
} from "../mod.ts";
import {
  pseudoRandom,
  rejects,
  run,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

const KIB = 1024;

Deno.test("queued writes land in the order they were asked for, and a read waits for them", async () => {
  await withTemp(async (dir) => {
    const out = await createOutputFile(`${dir}/out.raw`);
    try {
      const expected = new Uint8Array(3 << 20);
      const writes: Promise<void>[] = [];
      const put = (offset: number, bytes: Uint8Array) => {
        expected.set(bytes, offset);
        writes.push(out.write(offset, bytes));
      };
      // Big writes (queued), small ones behind them, and overlaps: the
      // last one asked for must win wherever they overlap.
      put(0, new Uint8Array(1 << 20).fill(1));
      put(100, new Uint8Array(50).fill(2));
      put(512 * KIB, pseudoRandom(1 << 20, 7));
      put(600 * KIB, new Uint8Array(300 * KIB).fill(3));
      put(2 << 20, pseudoRandom(1 << 20, 8));
      put((2 << 20) + 10, new Uint8Array(10).fill(4));
      assertEquals(out.size, 3 << 20);
      // Not awaited: the read must still see every write before it.
      const read = out.read(0, 3 << 20);
      await Promise.all(writes);
      assertEquals(sha256Hex(await read), sha256Hex(expected));
      await out.commit();
      assertEquals(
        await sha256File(`${dir}/out.raw`),
        sha256Hex(expected),
      );
    } finally {
      await out.abort();
    }
  });
});

Deno.test("a queued write that fails rejects with a WriteError, and so do the writes and the flush after it", async () => {
  await withTemp(async (dir) => {
    const out = await fromFile(
      await Deno.makeTempFile({ dir }),
      { write: true },
    );
    // The kernel refusing the third big write (as a full disk would).
    const write = Deno.FsFile.prototype.write;
    let calls = 0;
    Deno.FsFile.prototype.write = function (this: Deno.FsFile, p) {
      if (++calls === 3) {
        return Promise.reject(
          new Error("No space left on device (os error 28)"),
        );
      }
      return write.call(this, p);
    };
    try {
      const big = new Uint8Array(1 << 20).fill(9);
      const results = await Promise.allSettled([
        out.write(0, big),
        out.write(1 << 20, big),
        out.write(2 << 20, big),
        out.write(3 << 20, big),
        out.write(10, new Uint8Array(5)),
      ]);
      assertEquals(
        results.map((r) => r.status),
        ["fulfilled", "fulfilled", "rejected", "rejected", "rejected"],
      );
      const failure = (results[2] as PromiseRejectedResult).reason;
      assertTrue(failure instanceof WriteError, String(failure));
      assertEquals(failure.offset, 2 << 20);
      assertEquals(failure.length, 1 << 20);
      assertTrue(/No space left/.test(failure.message), failure.message);
      // The same failure for everything after it, flush included.
      for (const r of results.slice(3)) {
        assertEquals((r as PromiseRejectedResult).reason, failure);
      }
      await rejects(() => out.flush(), WriteError, /No space left/);
      // What was written before it is there, and reads still work.
      assertEquals((await out.read((1 << 20) - 1, 2))[1], 9);
    } finally {
      Deno.FsFile.prototype.write = write;
      await out.close();
    }
  });
});

Deno.test("convert goes on reading while a block is written, and reports a failed write after every write settled", async () => {
  const disk = pseudoRandom(12 << 20, 3);
  const image = await open(fromBytes(disk));
  let reads = 0;
  const source = {
    ...image,
    readInto(offset: number, into: Uint8Array) {
      reads++;
      return image.readInto!(offset, into);
    },
  };
  let running = 0;
  let written = 0;
  let readDuringWrite = false;
  const sink: Sink = {
    async write(offset, bytes) {
      running++;
      const before = reads;
      await new Promise((resolve) => setTimeout(resolve, 2));
      if (reads > before) readDuringWrite = true;
      running--;
      if (offset >= 6 << 20) {
        throw new WriteError("sink", offset, bytes.length, "full");
      }
      written += bytes.length;
    },
    resize: () => Promise.resolve(),
    flush: () => Promise.resolve(),
    close: () => Promise.resolve(),
  };
  await rejects(() => convert(source, sink), WriteError, /full/);
  assertEquals(running, 0);
  assertEquals(written, 6 << 20);
  assertTrue(readDuringWrite, "no read was issued while a block was written");
});

Deno.test("a zstd-compressed qcow2 converted to a file through the queued writes is qemu-img's bytes", async () => {
  if (skip(["qemu-img"])) return;
  await withTemp(async (dir) => {
    // Text, random bytes and zeros, 16 MiB: several 2 MiB blocks of
    // compressed clusters in flight, each written with one queued write.
    const disk = new Uint8Array(16 << 20);
    const line = new TextEncoder().encode(
      Array.from({ length: 4000 }, (_, i) => `${i} zstd ${i * 31 % 97}\n`)
        .join(""),
    );
    for (let at = 0; at < 6 << 20; at += line.length) {
      disk.set(line.subarray(0, Math.min(line.length, (6 << 20) - at)), at);
    }
    disk.set(pseudoRandom(3 << 20, 11), 8 << 20);
    disk.fill(7, 14 << 20, (14 << 20) + 12345);
    await Deno.writeFile(`${dir}/disk.raw`, disk);
    await run("qemu-img", [
      "convert",
      "-c",
      "-f",
      "raw",
      "-O",
      "qcow2",
      "-o",
      "compression_type=zstd",
      `${dir}/disk.raw`,
      `${dir}/disk.qcow2`,
    ]);
    await run("qemu-img", [
      "convert",
      "-f",
      "qcow2",
      "-O",
      "raw",
      `${dir}/disk.qcow2`,
      `${dir}/qemu.raw`,
    ]);
    const input = await fromFile(`${dir}/disk.qcow2`);
    const out = await createOutputFile(`${dir}/ours.raw`);
    try {
      await convert(await open(input), out);
      await out.commit();
    } finally {
      await out.abort();
      await input.close();
    }
    assertEquals(
      await sha256File(`${dir}/ours.raw`),
      await sha256File(`${dir}/qemu.raw`),
    );
    assertEquals(await sha256File(`${dir}/ours.raw`), sha256Hex(disk));
  });
});

Deno.test("a queued write of several MiB, unaligned and of odd length, lands whole through its 1 MiB write calls", async () => {
  await withTemp(async (dir) => {
    const out = await createOutputFile(`${dir}/out.raw`);
    try {
      const bytes = pseudoRandom((3 << 20) + 12345, 21);
      const expected = new Uint8Array(4097 + bytes.length + 100);
      expected.set(bytes, 4097);
      expected.fill(5, expected.length - 100);
      const big = out.write(4097, bytes);
      const tail = out.write(expected.length - 100, expected.slice(-100));
      await Promise.all([big, tail]);
      await out.commit();
      assertEquals(
        await sha256File(`${dir}/out.raw`),
        sha256Hex(expected),
      );
    } finally {
      await out.abort();
    }
  });
});
