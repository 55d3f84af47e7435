// The decode workers' pool (drivers/codecs/_pool.ts) called directly: a
// spread is answered by the workers themselves (its own op), not handed
// back for the caller to decode.
import { assertEquals, assertTrue } from "./_asserts.ts";
import { CodecPool } from "../drivers/codecs/_pool.ts";
import { crc32 } from "../drivers/codecs/crc32.ts";
import { pseudoRandom } from "./_helpers.ts";

async function zlibOf(bytes: Uint8Array): Promise<Uint8Array> {
  const stream = new Blob([bytes as Uint8Array<ArrayBuffer>]).stream()
    .pipeThrough(new CompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

Deno.test("CodecPool.spread decodes stored and zlib chunks on its workers, each into its place, with both CRC-32s", async () => {
  const pool = new CodecPool();
  const release = pool.hold();
  try {
    // Eight chunks of 64 KiB, alternately stored and zlib (UDIF types 1
    // and 0x80000005), placed in `into` in reverse order.
    const chunk = 64 << 10;
    const plain = Array.from(
      { length: 8 },
      (_, i) =>
        i % 2
          ? new TextEncoder().encode("text ".repeat(chunk / 5 + 1)).subarray(
            0,
            chunk,
          )
          : pseudoRandom(chunk, i + 1),
    );
    const packed = await Promise.all(
      plain.map((p, i) => i % 2 ? zlibOf(p) : Promise.resolve(p)),
    );
    const input = new Uint8Array(packed.reduce((n, p) => n + p.length, 0));
    const jobs: number[] = [];
    let at = 0;
    packed.forEach((p, i) => {
      input.set(p, at);
      jobs.push(i % 2 ? 0x80000005 : 1, at, p.length, chunk, (7 - i) * chunk);
      at += p.length;
    });
    const into = new Uint8Array(8 * chunk);
    const crcs = await pool.spread(input, jobs, into);
    assertTrue(crcs !== null, "the workers did not decode the chunks");
    plain.forEach((p, i) => {
      assertEquals(into.subarray((7 - i) * chunk, (8 - i) * chunk), p);
      assertEquals(crcs[2 * i], crc32(p));
      assertEquals(crcs[2 * i + 1], crc32(packed[i]));
    });
    // Without CRCs: none answered, the same bytes.
    into.fill(0);
    assertEquals((await pool.spread(input, jobs, into, false))?.length, 0);
    assertEquals(into.subarray(7 * chunk), plain[0]);
  } finally {
    release();
    pool.end();
  }
});
