// Our inflater in WebAssembly (drivers/codecs/_wasm/inflate.c, what zlib.ts
// runs where there is no native inflater): real streams made by gzip -1/-6/-9
// and node:zlib (raw, zlib, gzip; levels 0-9) decode to the bytes gzip -dc
// and node:zlib give; mutated, cut and mis-declared streams are CodecErrors
// or decode to exactly what node:zlib decodes, each in bounded time.
import { gunzipSync, inflateRawSync, inflateSync } from "node:zlib";
import {
  deflateRawSync,
  deflateSync,
  gzipSync,
  type ZlibOptions,
} from "node:zlib";
import { assertEquals, assertTrue } from "./_asserts.ts";
import { have, pseudoRandom, run, withTemp } from "./_helpers.ts";
import { type DeflateFormat, inflateWasmInto } from "../drivers/codecs/zlib.ts";
import { CodecError } from "../mod.ts";

/** The bytes of a tar of /usr/lib, cut at `size` (files sorted by name). */
async function usrLibTar(size: number): Promise<Uint8Array> {
  const r = await run("sh", [
    "-c",
    `(tar --sort=name -cf - -C / usr/lib 2>/dev/null || true) | head -c ${size}`,
  ]);
  assertEquals(r.stdout.length, size);
  return r.stdout;
}

/** Ours, or the CodecError's message. */
function ours(
  input: Uint8Array,
  size: number,
  format: DeflateFormat,
): Uint8Array | string {
  const out = new Uint8Array(size);
  try {
    assertTrue(inflateWasmInto(input, out, format), "WebAssembly ran");
  } catch (e) {
    if (!(e instanceof CodecError)) throw e;
    return e.message;
  }
  return out;
}

/** node:zlib's bytes (at most `limit`), or undefined where it refuses the stream. */
function reference(
  input: Uint8Array,
  limit: number,
  format: DeflateFormat,
): Uint8Array | undefined {
  const options = { maxOutputLength: limit };
  try {
    return new Uint8Array(
      format === "deflate"
        ? inflateSync(input, options)
        : format === "gzip"
        ? gunzipSync(input, options)
        : inflateRawSync(input, options),
    );
  } catch {
    return undefined;
  }
}

const same = (a: Uint8Array, b: Uint8Array) =>
  a.length === b.length && a.every((x, i) => x === b[i]);

Deno.test("our inflater decodes gzip -1, -6 and -9 files of a /usr/lib tar, zeros and random bytes to what gzip -dc gives", async () => {
  if (!have("gzip")) return;
  const tar = await usrLibTar(4 << 20);
  const mixed = new Uint8Array(5 << 20); // 3 MiB of tar, 1 of zeros, 1 of random
  mixed.set(tar.subarray(0, 3 << 20));
  mixed.set(pseudoRandom(1 << 20, 9), 4 << 20);
  const data: [string, Uint8Array][] = [
    ["tar 4 MiB", tar],
    ["tar 5000 bytes", tar.subarray(1 << 20, (1 << 20) + 5000)],
    ["zeros 3 MiB", new Uint8Array(3 << 20)],
    ["random 1 MiB", pseudoRandom(1 << 20, 5)],
    ["tar, zeros, random", mixed],
    ["one byte", Uint8Array.of(42)],
    ["empty", new Uint8Array(0)],
  ];
  await withTemp(async (dir) => {
    for (const [name, bytes] of data) {
      await Deno.writeFile(`${dir}/in`, bytes);
      for (const level of [1, 6, 9]) {
        const packed = (await run("sh", [
          "-c",
          `gzip -${level} -c ${dir}/in > ${dir}/in.gz && cat ${dir}/in.gz`,
        ])).stdout;
        const expected = (await run("gzip", ["-dc", `${dir}/in.gz`])).stdout;
        assertTrue(same(expected, bytes), `gzip -dc gives ${name} back`);
        const got = ours(packed, expected.length, "gzip");
        assertTrue(
          typeof got !== "string" && same(got, expected),
          `${name}, gzip -${level}: ${
            typeof got === "string" ? got : "bytes differ"
          }`,
        );
      }
    }
  });
});

Deno.test("our inflater decodes node:zlib's raw, zlib and gzip streams, levels 0 to 9, with the bytes", async () => {
  const tar = await usrLibTar(2 << 20);
  const data: [string, Uint8Array][] = [
    ["tar 2 MiB", tar],
    ["tar 64 KiB", tar.subarray(1 << 20, (1 << 20) + 65536)],
    ["zeros 1 MiB", new Uint8Array(1 << 20)],
    ["random 300 KiB", pseudoRandom(300_000, 7)],
    ["a repeated phrase", new TextEncoder().encode("sector ".repeat(9999))],
    ["empty", new Uint8Array(0)],
  ];
  const makers: [
    DeflateFormat,
    (b: Uint8Array, o: ZlibOptions) => Uint8Array,
  ][] = [
    ["deflate-raw", deflateRawSync],
    ["deflate", deflateSync],
    ["gzip", gzipSync],
  ];
  for (const [name, bytes] of data) {
    for (const [format, make] of makers) {
      for (const level of [0, 1, 4, 6, 9]) {
        // Small windows and memory levels make other block shapes.
        for (
          const options of [{ level }, { level, windowBits: 9, memLevel: 1 }]
        ) {
          const packed = new Uint8Array(make(bytes, options));
          const got = ours(packed, bytes.length, format);
          assertTrue(
            typeof got !== "string" && same(got, bytes),
            `${name}, ${format} ${JSON.stringify(options)}: ${
              typeof got === "string" ? got : "bytes differ"
            }`,
          );
        }
      }
    }
  }
  // Two gzip members, one after the other (as gzip -dc reads them).
  const a = tar.subarray(0, 70_000), b = tar.subarray(70_000, 150_000);
  const two = new Uint8Array([...gzipSync(a), ...gzipSync(b)]);
  const got = ours(two, 150_000, "gzip");
  assertTrue(typeof got !== "string" && same(got, tar.subarray(0, 150_000)));
});

Deno.test("our inflater refuses short, long, cut and corrupt streams with CodecErrors naming the fault", () => {
  const bytes = new TextEncoder().encode("a lazy dog sector ".repeat(4000));
  const zlib = new Uint8Array(deflateSync(bytes));
  const raw = new Uint8Array(deflateRawSync(bytes));
  const gzip = new Uint8Array(gzipSync(bytes));
  const cases: [string, Uint8Array, number, DeflateFormat, RegExp][] = [
    [
      "one byte declared too many",
      zlib,
      bytes.length + 1,
      "deflate",
      /inflates to 72000 bytes, 72001 declared/,
    ],
    [
      "one byte declared too few",
      raw,
      bytes.length - 1,
      "deflate-raw",
      /more than the declared 71999/,
    ],
    [
      "cut",
      zlib.subarray(0, zlib.length >> 1),
      bytes.length,
      "deflate",
      /input ends inside/,
    ],
    [
      "no Adler-32",
      zlib.subarray(0, zlib.length - 4),
      bytes.length,
      "deflate",
      /input ends inside/,
    ],
    [
      "bad Adler-32",
      Uint8Array.from(zlib, (x, i) => i === zlib.length - 1 ? x ^ 1 : x),
      bytes.length,
      "deflate",
      /Adler-32/,
    ],
    [
      "bad CRC-32",
      Uint8Array.from(gzip, (x, i) => i === gzip.length - 8 ? x ^ 1 : x),
      bytes.length,
      "gzip",
      /CRC-32/,
    ],
    [
      "bad ISIZE",
      Uint8Array.from(gzip, (x, i) => i === gzip.length - 4 ? x ^ 1 : x),
      bytes.length,
      "gzip",
      /ISIZE/,
    ],
    [
      "bad zlib header",
      Uint8Array.from(zlib, (x, i) => i === 0 ? 0x79 : x),
      bytes.length,
      "deflate",
      /zlib header/,
    ],
    [
      "preset dictionary",
      Uint8Array.of(0x78, 0xbb, 0, 0, 0, 1, 3, 0),
      0,
      "deflate",
      /dictionary/,
    ],
    ["block type 3", Uint8Array.of(0x07, 0), 0, "deflate-raw", /block type/],
    [
      "stored LEN/NLEN",
      Uint8Array.of(0x01, 5, 0, 0xfa, 0xfe, 1, 2, 3, 4, 5),
      5,
      "deflate-raw",
      /complement/,
    ],
    // Fixed code, distance 1 with nothing written yet: 0x03 = final fixed
    // block; then length symbol 257 (0000001) and distance code 0.
    [
      "distance before the start",
      Uint8Array.of(0x03, 0x02, 0x00, 0x00),
      3,
      "deflate-raw",
      /too far back/,
    ],
    [
      "not gzip",
      Uint8Array.of(0x1f, 0x8c, 8, 0, 0, 0, 0, 0, 0, 3, 3, 0),
      0,
      "gzip",
      /gzip header/,
    ],
    ["empty input", new Uint8Array(0), 1, "deflate-raw", /input ends inside/],
  ];
  for (const [name, input, size, format, pattern] of cases) {
    const got = ours(input, size, format);
    assertEquals(typeof got, "string", name);
    assertTrue(pattern.test(got as string), `${name}: ${got}`);
  }
});

Deno.test("thousands of mutated, cut and mis-declared streams are each a CodecError or exactly node:zlib's bytes, in bounded time", async () => {
  const tar = await usrLibTar(1 << 20);
  const samples = [
    tar.subarray(300_000, 340_000),
    new TextEncoder().encode("cluster grain chunk ".repeat(1500)),
    new Uint8Array([...pseudoRandom(3000, 3), ...new Uint8Array(20000)]),
  ];
  let next = 12345;
  const rand = (n: number) => {
    next ^= next << 13;
    next ^= next >>> 17;
    next ^= next << 5;
    return (next >>> 0) % n;
  };
  let agreed = 0, refused = 0, slowest = 0;
  for (const bytes of samples) {
    for (
      const [format, packed] of [
        ["deflate-raw", deflateRawSync(bytes, { level: 6 })],
        ["deflate", deflateSync(bytes, { level: 1 })],
        ["gzip", gzipSync(bytes, { level: 9 })],
        ["deflate-raw", deflateRawSync(bytes, { level: 9, memLevel: 1 })],
      ] as [DeflateFormat, Uint8Array][]
    ) {
      for (let round = 0; round < 300; round++) {
        let input = new Uint8Array(packed);
        let size = bytes.length;
        const kind = round % 5;
        if (kind === 0) input = input.subarray(0, rand(input.length));
        else if (kind === 1 || kind === 2) {
          for (let k = 1 + rand(3); k > 0; k--) {
            const at = rand(input.length);
            input[at] = kind === 1 ? input[at] ^ (1 << rand(8)) : rand(256);
          }
        } else if (kind === 3) {
          // Bytes cut out of the middle, or inserted.
          const at = rand(input.length);
          input = rand(2)
            ? new Uint8Array([
              ...input.subarray(0, at),
              ...input.subarray(at + 1 + rand(8)),
            ])
            : new Uint8Array([
              ...input.subarray(0, at),
              rand(256),
              ...input.subarray(at),
            ]);
        } else {
          size += rand(5) - 2;
          input[rand(input.length)] ^= 1 << rand(8);
        }
        const t0 = performance.now();
        const got = ours(input, size, format);
        slowest = Math.max(slowest, performance.now() - t0);
        const expected = reference(input, size + 1, format);
        if (typeof got === "string") {
          refused++;
          // A stream node:zlib decodes to exactly the declared size is not
          // refused (unless it is only the declared size that differs).
          assertTrue(
            expected === undefined || expected.length !== size,
            `${format} round ${round}: refused (${got}) what node:zlib decodes`,
          );
        } else {
          agreed++;
          assertTrue(
            expected !== undefined && same(got, expected),
            `${format} round ${round}: decoded what node:zlib ${
              expected ? "decodes otherwise" : "refuses"
            }`,
          );
        }
      }
    }
  }
  assertTrue(
    refused > 2000 && agreed > 100,
    `${refused} refused, ${agreed} decoded`,
  );
  // No hang: a stream of at most 60 KiB is a millisecond's work.
  assertTrue(slowest < 2000, `slowest ${slowest} ms`);
});
