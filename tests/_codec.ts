// Samples and checks the codec tests (lz4, lzo, xz, zstd) share.
import { assertEquals, assertTrue } from "./_asserts.ts";
import { ByteFeed } from "../drivers/codecs/_feed.ts";
import { pseudoRandom } from "./_helpers.ts";
import { CodecError } from "../mod.ts";
import { useWasm, wasmAvailable } from "../drivers/codecs/_wasm.ts";

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

/**
 * Registers a test (in any of `Deno.test`'s forms used here) twice: once with the WebAssembly decoders (where
 * WebAssembly runs, else the test is ignored) and once with the
 * TypeScript ones, so that both paths meet the same checks.
 */
export function bothPaths(
  nameOrTest:
    | string
    | { name: string; ignore?: boolean; fn: () => Promise<void> | void },
  optionsOrBody?: { ignore?: boolean } | (() => Promise<void> | void),
  body?: () => Promise<void> | void,
): void {
  const test = typeof nameOrTest !== "string"
    ? nameOrTest
    : typeof optionsOrBody === "function"
    ? { name: nameOrTest, ignore: false, fn: optionsOrBody }
    : { name: nameOrTest, ignore: optionsOrBody?.ignore, fn: body! };
  for (const wasm of [true, false]) {
    Deno.test({
      name: `${test.name} (${wasm ? "WebAssembly" : "TypeScript"})`,
      ignore: test.ignore || (wasm && !wasmAvailable()),
      async fn() {
        const before = useWasm(wasm);
        try {
          await test.fn();
        } finally {
          useWasm(before);
        }
      },
    });
  }
}

let realCache: Uint8Array | undefined;

/**
 * `size` bytes of real files: the regular files under /usr/lib, in sorted
 * path order, joined (machine code, text, compressed data: what disks
 * hold). The same bytes every call on one machine.
 */
export function realFiles(size: number): Uint8Array {
  if (realCache && realCache.length >= size) return realCache.slice(0, size);
  const out = new Uint8Array(size);
  let filled = 0;
  const walk = (dir: string) => {
    let entries: Deno.DirEntry[];
    try {
      entries = [...Deno.readDirSync(dir)];
    } catch {
      return;
    }
    entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const e of entries) {
      if (filled >= size) return;
      const path = `${dir}/${e.name}`;
      if (e.isDirectory) walk(path);
      else if (e.isFile) {
        try {
          const bytes = Deno.readFileSync(path);
          const take = Math.min(bytes.length, size - filled);
          out.set(bytes.subarray(0, take), filled);
          filled += take;
        } catch { /* unreadable: skipped */ }
      }
    }
  };
  walk("/usr/lib");
  if (filled < size) throw new Error(`/usr/lib holds only ${filled} bytes`);
  realCache = out;
  return out.slice();
}

/**
 * Everything a streaming decoder (xz's or zstd's `decodeStreaming`) yields
 * for `packed`, fed to it `step` bytes at a time, joined.
 */
export async function decodeFed(
  decodeStreaming: (feed: ByteFeed) => AsyncIterable<Uint8Array>,
  packed: Uint8Array,
  step: number,
): Promise<Uint8Array> {
  let at = 0;
  const feed = new ByteFeed(() => {
    if (at >= packed.length) return Promise.resolve(null);
    const piece = packed.slice(at, at + step);
    at += step;
    return Promise.resolve(piece);
  });
  const pieces: Uint8Array[] = [];
  let total = 0;
  for await (const piece of decodeStreaming(feed)) {
    pieces.push(piece.slice());
    total += piece.length;
  }
  const out = new Uint8Array(total);
  let o = 0;
  for (const p of pieces) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}
