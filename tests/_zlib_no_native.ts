// Run by tests/zlib_test.ts as a subprocess: zlib as a browser runs it (no
// native inflater: our WebAssembly inflater; with the argument `stream`,
// WebAssembly off: DecompressionStream, and stored blocks copied), on
// streams node:zlib makes here. Prints, as JSON, per case: whether
// `decode` and `decodeInto` gave the bytes, or the error they threw.
import "./_no_native_inflate.ts";
import { useWasm } from "../drivers/codecs/_wasm.ts";
import { deflateRawSync, deflateSync } from "node:zlib";
import {
  decode,
  decodeInto,
  hasNativeInflate,
} from "../drivers/codecs/zlib.ts";
import { pseudoRandom } from "./_helpers.ts";

if (Deno.args[0] === "stream") useWasm(false);

const random = pseudoRandom(150_000, 3);
const text = new TextEncoder().encode("a disk sector ".repeat(5000));
const stored = new Uint8Array(deflateSync(random, { level: 0 }));
const poke = (bytes: Uint8Array, at: number, value: number) => {
  const copy = bytes.slice();
  copy[at] = value;
  return copy;
};
const small = new Uint8Array(
  deflateRawSync(random.subarray(0, 1000), { level: 0 }),
);
// Counts the DecompressionStreams made: none for a stream that is copied.
let streams = 0;
const Platform = globalThis.DecompressionStream;
globalThis.DecompressionStream = class extends Platform {
  constructor(format: CompressionFormat) {
    super(format);
    streams++;
  }
};

const cases: [string, Uint8Array, Uint8Array, "deflate" | "deflate-raw"][] = [
  ["stored zlib, three blocks", stored, random, "deflate"],
  [
    "stored raw",
    new Uint8Array(deflateRawSync(random, { level: 0 })),
    random,
    "deflate-raw",
  ],
  ["compressed zlib", new Uint8Array(deflateSync(text)), text, "deflate"],
  [
    "stored, Adler-32 poked",
    poke(stored, stored.length - 1, stored[stored.length - 1] ^ 1),
    random,
    "deflate",
  ],
  ["stored, NLEN poked", poke(stored, 5, stored[5] ^ 1), random, "deflate"],
  [
    "stored, cut short",
    stored.subarray(0, stored.length - 10),
    random,
    "deflate",
  ],
  [
    "stored, a byte after the end",
    new Uint8Array([...stored, 0]),
    random,
    "deflate",
  ],
  [
    "stored, declared one byte short",
    stored,
    random.subarray(0, random.length - 1),
    "deflate",
  ],
  [
    "stored, declared one byte long",
    stored,
    new Uint8Array([...random, 0]),
    "deflate",
  ],
  ["stored raw, 1000 bytes", small, random.subarray(0, 1000), "deflate-raw"],
];
const results = [];
for (const [name, input, expected, format] of cases) {
  const result: Record<string, unknown> = { name };
  streams = 0;
  try {
    const got = await decode(input, expected.length, format);
    result.decode = got.length === expected.length &&
      got.every((b, i) => b === expected[i]);
  } catch (e) {
    result.decode = `${(e as Error).name}: ${(e as Error).message}`;
  }
  try {
    const out = new Uint8Array(expected.length);
    await decodeInto(input, out, format);
    result.decodeInto = out.every((b, i) => b === expected[i]);
  } catch (e) {
    result.decodeInto = `${(e as Error).name}: ${(e as Error).message}`;
  }
  result.streams = streams;
  results.push(result);
}
console.log(JSON.stringify({ native: hasNativeInflate(), results }));
