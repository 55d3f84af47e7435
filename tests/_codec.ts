// Samples and checks the LZ codec tests (lz4, lzo) share.
import { assertEquals, assertTrue } from "./_asserts.ts";
import { pseudoRandom } from "./_helpers.ts";
import { CodecError } from "../mod.ts";

/**
 * The samples every LZ codec packs: empty, one byte, zeros, `random` random
 * bytes, repeated text and 1 MiB mixing random bytes, text and a ramp, with
 * the codec's own `extra` samples before the mixed one.
 */
export function lzSamples(
  random: number,
  extra: [string, Uint8Array][],
): [string, Uint8Array][] {
  const text = new TextEncoder().encode(
    "The quick brown fox jumps over the lazy dog. ".repeat(3000),
  );
  const mixed = new Uint8Array(1 << 20);
  mixed.set(pseudoRandom(200_000, 3), 0);
  mixed.set(text.subarray(0, 300_000), 400_000);
  for (let i = 800_000; i < mixed.length; i++) mixed[i] = (i * 7) >> 9;
  return [
    ["empty", new Uint8Array(0)],
    ["one byte", new Uint8Array([42])],
    ["zeros", new Uint8Array(100_000)],
    ["random", pseudoRandom(random, 1)],
    ["text", text],
    ...extra,
    ["mixed 1 MiB", mixed],
  ];
}

/** The "text" sample of {@linkcode lzSamples}. */
export function textSample(samples: [string, Uint8Array][]): Uint8Array {
  return samples.find(([name]) => name === "text")![1];
}

/** Random junk decodes to exactly the bytes asked for or is a CodecError: never a crash or a hang. */
export async function assertJunkIsCodecError(
  decode: (input: Uint8Array, expectedSize: number) => Promise<Uint8Array>,
): Promise<void> {
  for (let seed = 1; seed < 300; seed++) {
    const junk = pseudoRandom(64, seed);
    try {
      const out = await decode(junk, 1000);
      assertEquals(out.length, 1000);
    } catch (e) {
      assertTrue(e instanceof CodecError, String(e));
    }
  }
}
