import { assertEquals, assertTrue } from "./_asserts.ts";
import { fromBytes, readAhead, type Source } from "../mod.ts";
import { pseudoRandom, rejects } from "./_helpers.ts";

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
  // The first read as it is, then 128 KiB windows (the last one shorter).
  assertEquals(reads[0], pieces[0]);
  assertTrue(reads.length <= 10, `${reads.length} source reads`);
  assertTrue(
    reads.slice(1).every(([, n], k, all) =>
      n === 128 * KIB || k === all.length - 1
    ),
  );
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
  assertEquals(reads[reads.length - 1], [20, 64 * KIB]);
});

Deno.test("readAhead fails the reads a failed window holds and fetches it again for the next", async () => {
  const bytes = pseudoRandom(300 * KIB, 5);
  const { source, failOnce } = counted(bytes);
  const ahead = readAhead(source, { window: 64 * KIB });
  await ahead.read(0, 1000);
  failOnce(70 * KIB); // inside the second window
  await ahead.read(1000, 1000); // starts the windows at 1000
  await rejects(() => ahead.read(60 * KIB, 20 * KIB), Error, /went away/);
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
