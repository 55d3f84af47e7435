import { assertEquals, assertTrue } from "./_asserts.ts";
import { pseudoRandom, sha256Hex } from "./_helpers.ts";
import { fromBytes, readable, type Source } from "../mod.ts";

/** Everything a stream yields, joined. */
async function collect(
  stream: ReadableStream<Uint8Array>,
): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  for await (const part of stream) parts.push(part);
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    all.set(p, at);
    at += p.length;
  }
  return all;
}

/** A source over `bytes` whose reads wait until `release` is called, counting them. */
function gatedSource(bytes: Uint8Array) {
  const inner = fromBytes(bytes);
  let started = 0;
  const gates: (() => void)[] = [];
  const source: Source = {
    size: inner.size,
    async read(offset, length) {
      started++;
      await new Promise<void>((go) => gates.push(go));
      return inner.read(offset, length);
    },
  };
  return {
    source,
    started: () => started,
    release: () => gates.splice(0).forEach((go) => go()),
  };
}

Deno.test("readable streams every byte in order, with or without reading ahead, over odd chunk sizes and ranges", async () => {
  const disk = pseudoRandom(1_000_003, 7);
  for (const readAhead of [0, 1, 3, 8]) {
    for (const chunkSize of [4096, 65_537, 1 << 20]) {
      const all = await collect(
        readable(fromBytes(disk), { chunkSize, readAhead }),
      );
      assertEquals(sha256Hex(all), sha256Hex(disk));
      const part = await collect(
        readable(fromBytes(disk), {
          chunkSize,
          readAhead,
          start: 777,
          end: 900_001,
        }),
      );
      assertEquals(sha256Hex(part), sha256Hex(disk.subarray(777, 900_001)));
    }
  }
});

Deno.test("readable keeps readAhead reads in flight beyond the one the consumer waits for", async () => {
  const disk = pseudoRandom(64 << 10, 3);
  const gated = gatedSource(disk);
  const reader = readable(gated.source, { chunkSize: 4096, readAhead: 3 })
    .getReader();
  const first = reader.read();
  // Let the stream ask: the chunk awaited and three more are in flight.
  for (let i = 0; i < 10; i++) await Promise.resolve();
  await new Promise((r) => setTimeout(r, 10));
  assertEquals(gated.started(), 4);
  gated.release();
  assertEquals((await first).value!.length, 4096);
  await reader.cancel();
  gated.release();
});

Deno.test("readable reports a failing read as the stream's error", async () => {
  const inner = fromBytes(new Uint8Array(1 << 16));
  const source: Source = {
    size: inner.size,
    read: (offset, length) =>
      offset >= 1 << 15
        ? Promise.reject(new RangeError("bad sector"))
        : inner.read(offset, length),
  };
  let error: unknown;
  try {
    await collect(readable(source, { chunkSize: 4096 }));
  } catch (e) {
    error = e;
  }
  assertTrue(error instanceof RangeError, String(error));
});
