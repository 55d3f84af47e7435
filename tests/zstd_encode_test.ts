// The zstd encoder (drivers/codecs/zstd_encode.ts): its frames decode to
// the same bytes in the zstd tool and in fzstd, and are smaller than their
// input wherever the input repeats.
import { assertEquals, assertTrue as assert } from "./_asserts.ts";
import { have, run, sha256Hex, skip } from "./_helpers.ts";
import {
  encodeFrame,
  type EncodeFrameOptions,
  frameBound,
} from "../drivers/codecs/zstd_encode.ts";
import { useWasm, wasmAvailable } from "../drivers/codecs/_wasm.ts";
import { decompress as fzstd } from "npm:fzstd@0.1.1";

/** Inputs of every kind: text, zeros, random, runs, a tar of real files. */
async function samples(): Promise<[string, Uint8Array][]> {
  const text = new TextEncoder().encode(
    Array.from(
      { length: 4000 },
      (_, i) => `line ${i}: the quick brown fox ${i % 7} jumps ${i * 31}\n`,
    ).join(""),
  );
  const random = new Uint8Array(300_000);
  for (let o = 0; o < random.length; o += 65536) {
    crypto.getRandomValues(random.subarray(o, o + 65536));
  }
  const mixed = new Uint8Array(400_000);
  mixed.set(text.subarray(0, 100_000), 0);
  mixed.set(random.subarray(0, 100_000), 150_000);
  mixed.fill(7, 260_000, 390_000);
  // Skewed alphabets: Huffman trees past 11 bits (clamped), weights
  // written directly (bytes up to 128) and FSE-compressed (bytes above).
  const skewed = (alphabet: number, seed: number) => {
    const out = new Uint8Array(200_000);
    let x = seed;
    for (let i = 0; i < out.length; i++) {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      // Symbol k with probability about 2^-(k+1): depths far past 11.
      const r = x >>> 8;
      const k = Math.min(alphabet - 1, Math.clz32(r | 1) - 8);
      out[i] = (k * 37 + seed) % 256;
    }
    return out;
  };
  const list: [string, Uint8Array][] = [
    ["empty", new Uint8Array(0)],
    ["one byte", new Uint8Array([42])],
    ["short text", new TextEncoder().encode("abcabcabcabcabcabc")],
    ["text", text],
    ["zeros", new Uint8Array(2 << 20)],
    ["random", random],
    ["mixed", mixed],
    ["skewed 24 symbols", skewed(24, 1)],
    ["skewed 24 symbols, high bytes", skewed(24, 200)],
    ["all byte values", random.map((b) => b % 3 === 0 ? b : b & 0x3f)],
    ["text of high bytes", text.map((b) => b | 0x80)],
    // A repeat 1 MiB back: matches from earlier blocks of a 2 MiB frame.
    [
      "random twice",
      new Uint8Array([...random, ...random.subarray(0, 200_000)]),
    ],
  ];
  if (have("tar")) {
    const tar = (await run("sh", [
      "-c",
      "tar cf - /usr/lib/os-release /usr/bin/true /usr/lib/x86_64-linux-gnu/libz.so* 2>/dev/null | head -c 2500000",
    ], { allowFail: true })).stdout;
    if (tar.length > 0) list.push(["tar of /usr files", tar]);
    // Libraries and text of /usr/lib: the bench disk's kind of data.
    const libs = (await run("sh", [
      "-c",
      "tar cf - /usr/lib/x86_64-linux-gnu/libc.so.6 /usr/lib/x86_64-linux-gnu/libstdc++.so.6* /usr/lib/os-release /usr/share/common-licenses 2>/dev/null | head -c 4000000",
    ], { allowFail: true })).stdout;
    if (libs.length > 0) list.push(["tar of /usr/lib libraries", libs]);
  }
  return list;
}

/** The encoders: WebAssembly at both levels, and TypeScript. */
const ENCODERS: [string, boolean, EncodeFrameOptions][] = [
  ["wasm level 1", true, { level: 1 }],
  ["wasm level 3", true, { level: 3 }],
  ["typescript", false, {}],
];

/** `encodeFrame` on the WebAssembly or the TypeScript path. */
function encodeWith(
  wasm: boolean,
  options: EncodeFrameOptions,
  input: Uint8Array,
): Uint8Array {
  const before = useWasm(wasm);
  try {
    return encodeFrame(input, options);
  } finally {
    useWasm(before);
  }
}

Deno.test("zstd: the WebAssembly encoder runs here (the tests below cover it)", () => {
  assert(wasmAvailable());
});

for (const [encoder, wasm, options] of ENCODERS) {
  Deno.test(`zstd frames (${encoder}) decode to their input in fzstd, and repeats shrink`, async () => {
    for (const [name, input] of await samples()) {
      const frame = encodeWith(wasm, options, input);
      assert(frame.length <= frameBound(input.length), name);
      assertEquals(sha256Hex(fzstd(frame)), sha256Hex(input), name);
      if (name === "text" || name === "zeros") {
        assert(frame.length < input.length / 2, `${name}: ${frame.length}`);
      }
      if (name === "random") {
        assert(frame.length <= input.length + 20, `${name}: ${frame.length}`);
      }
    }
  });

  Deno.test(
    `zstd frames (${encoder}) decode to their input in the zstd tool, in qcow2 cluster sizes 512 B to 2 MiB`,
    { ignore: skip(["zstd"]) },
    async () => {
      for (const [name, input] of await samples()) {
        const sizes = wasm
          ? [input.length, 2 << 20, 65536, 4096, 512]
          : [input.length, 65536, 4096];
        for (const size of sizes) {
          // Whole, and in qcow2-like pieces (a frame each, back to back).
          const frames: Uint8Array[] = [];
          for (let o = 0; o < Math.max(1, input.length); o += size || 1) {
            frames.push(encodeWith(wasm, options, input.subarray(o, o + size)));
          }
          const joined = new Uint8Array(
            frames.reduce((n, f) => n + f.length, 0),
          );
          let o = 0;
          for (const f of frames) {
            joined.set(f, o);
            o += f.length;
          }
          const out = await run("zstd", ["-d", "-q", "-c"], { stdin: joined });
          assertEquals(
            sha256Hex(out.stdout),
            sha256Hex(input),
            `${name} ${size}`,
          );
        }
      }
    },
  );
}
