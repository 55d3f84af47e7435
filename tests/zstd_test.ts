// The zstd decoder (drivers/codecs/zstd.ts with _wasm/zstd.c): files the
// zstd tool made at every level and option decode to the tool's input;
// frames from our encoder round-trip; hostile frames (mutated, truncated,
// poked headers) end in typed errors, and a mutated frame that still
// decodes gives the bytes `zstd -d` gives.
import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  pseudoRandom,
  rejects,
  run,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";
import {
  decodeFrameInto,
  decodeStreaming,
  MAX_WINDOW,
} from "../drivers/codecs/zstd.ts";
import { encodeFrame } from "../drivers/codecs/zstd_encode.ts";
import { decodeFed } from "./_codec.ts";
import {
  acquireZstdWasm,
  releaseWasm,
  useWasm,
  useZstdSimd,
  zstdSimdAvailable,
} from "../drivers/codecs/_wasm.ts";
import { CodecError, UnsupportedError } from "../streams/errors.ts";

/** Everything `decodeStreaming` yields for `packed`, fed `step` bytes at a time. */
function decodeAll(packed: Uint8Array, step = 1 << 20): Promise<Uint8Array> {
  return decodeFed(decodeStreaming, packed, step);
}

/** Real files: a piece of a tar of /usr/lib (binaries, text) of `size` bytes. */
async function realFiles(size: number): Promise<Uint8Array> {
  const tar = await run("sh", [
    "-c",
    `tar cf - -C / usr/lib/os-release usr/lib/x86_64-linux-gnu 2>/dev/null | head -c ${size}`,
  ], { allowFail: true });
  return tar.stdout;
}

async function zstd(args: string[], input: Uint8Array): Promise<Uint8Array> {
  return (await run("zstd", ["-q", "-c", ...args], { stdin: input })).stdout;
}

Deno.test(
  "files the zstd tool makes at every level decode to its input",
  { ignore: skip(["zstd", "tar"]) },
  async () => {
    const input = await realFiles(6 << 20);
    assertTrue(input.length === 6 << 20, "the tar of /usr/lib is too small");
    const want = sha256Hex(input);
    const cases: [string, string[], Uint8Array][] = [
      ["-1", ["-1"], input],
      ["-3", ["-3"], input],
      ["-9", ["-9"], input],
      ["-19", ["-19"], input.subarray(0, 3 << 20)],
      ["--ultra -22", ["--ultra", "-22"], input.subarray(0, 2 << 20)],
      ["--long", ["--long", "-3"], input],
      ["--no-check", ["--no-check", "-3"], input],
      ["--no-content-size", ["--no-content-size", "-3"], input],
      ["-1 --no-check --no-content-size", [
        "-1",
        "--no-check",
        "--no-content-size",
      ], input],
    ];
    for (const [name, args, data] of cases) {
      const packed = await zstd(args, data);
      assertEquals(sha256Hex(await decodeAll(packed)), sha256Hex(data), name);
      if (data === input) assertEquals(sha256Hex(data), want);
      // Fed in small, odd pieces: blocks straddle every piece boundary.
      if (name === "-3") {
        assertEquals(
          sha256Hex(await decodeAll(packed, 4093)),
          sha256Hex(data),
          `${name}, 4093-byte pieces`,
        );
      }
    }
  },
);

Deno.test(
  "matches reaching far back across window moves decode (a stream longer than the window and the room ahead)",
  { ignore: skip(["zstd"]) },
  async () => {
    // Random blocks repeated: every match is as far back as the block.
    const repeated = (block: number, times: number, seed: number) => {
      const unit = pseudoRandom(block, seed);
      const out = new Uint8Array(block * times);
      for (let i = 0; i < times; i++) out.set(unit, i * block);
      return out;
    };
    const cases: [string, string[], Uint8Array][] = [
      // An 8 MiB window: 40 MiB kept, 48 MiB decoded, matches 6 MiB back.
      [
        "--long=23",
        ["--long=23", "-1", "--no-content-size"],
        repeated(6 << 20, 8, 3),
      ],
      // A 512 KiB window: 8.5 MiB kept, 20 MiB decoded, matches 400 KiB back.
      ["-1", ["-1"], repeated(400 << 10, 51, 4)],
    ];
    for (const [name, args, input] of cases) {
      const packed = await zstd(args, input);
      assertTrue(packed.length < input.length / 4, `${name}: matches found`);
      assertEquals(sha256Hex(await decodeAll(packed)), sha256Hex(input), name);
    }
  },
);

Deno.test(
  "text, zeros, random and tiny inputs decode, whole and streamed",
  { ignore: skip(["zstd"]) },
  async () => {
    const text = new TextEncoder().encode(
      Array.from({ length: 20000 }, (_, i) => `line ${i} of ${i % 13}\n`)
        .join(""),
    );
    const inputs: [string, Uint8Array][] = [
      ["empty", new Uint8Array(0)],
      ["one byte", Uint8Array.of(7)],
      ["text", text],
      ["zeros", new Uint8Array(3 << 20)],
      ["random", pseudoRandom(300_000, 5)],
      ["runs", pseudoRandom(200_000, 9).map((b, i) => (i >> 9) & 1 ? 0 : b)],
    ];
    for (const [name, input] of inputs) {
      for (const level of ["-1", "-19"]) {
        const packed = await zstd([level], input);
        assertEquals(sha256Hex(await decodeAll(packed)), sha256Hex(input));
        const out = new Uint8Array(input.length);
        const used = await decodeFrameInto(packed, out);
        assertEquals(used, packed.length, `${name} ${level}`);
        assertEquals(sha256Hex(out), sha256Hex(input), `${name} ${level}`);
      }
    }
  },
);

Deno.test(
  "several frames and skippable frames decode as one stream",
  { ignore: skip(["zstd"]) },
  async () => {
    const a = new TextEncoder().encode("first frame ".repeat(5000));
    const b = pseudoRandom(100_000, 3);
    const skippable = new Uint8Array(8 + 5);
    new DataView(skippable.buffer).setUint32(0, 0x184d2a53, true);
    new DataView(skippable.buffer).setUint32(4, 5, true);
    const parts = [
      skippable,
      await zstd(["-3"], a),
      skippable,
      await zstd(["--no-check", "--no-content-size"], b),
      await zstd(["-19"], a),
      skippable,
    ];
    const packed = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      packed.set(p, at);
      at += p.length;
    }
    const want = new Uint8Array(a.length * 2 + b.length);
    want.set(a, 0);
    want.set(b, a.length);
    want.set(a, a.length + b.length);
    assertEquals(sha256Hex(await decodeAll(packed)), sha256Hex(want));
    assertEquals(
      sha256Hex(await decodeAll(packed, 7)),
      sha256Hex(want),
      "7-byte pieces",
    );
  },
);

Deno.test("zstd decodes with the other codecs' WebAssembly turned off (it has no TypeScript twin)", async () => {
  const input = new TextEncoder().encode("twin ".repeat(10000));
  const before = useWasm(false);
  try {
    assertEquals(
      sha256Hex(await decodeAll(encodeFrame(input))),
      sha256Hex(input),
    );
  } finally {
    useWasm(before);
  }
});

Deno.test(
  "the SIMD build of the decoder and the scalar one give the zstd tool's input, and the same errors",
  { ignore: skip(["zstd", "tar"]) },
  async () => {
    const wasm = await acquireZstdWasm();
    if (wasm) releaseWasm(wasm);
    // Deno has SIMD128: the first build is the SIMD one.
    assertTrue(zstdSimdAvailable(), "the SIMD module did not compile");
    const input = await realFiles(3 << 20);
    const packed: Uint8Array[] = [];
    for (const level of ["-1", "-3", "-19"]) {
      packed.push(await zstd([level], input.subarray(0, 1 << 20)));
    }
    // A frame broken in its sequences: both builds must refuse it alike.
    const broken = packed[1].slice();
    broken[broken.length >> 1] ^= 0x5a;
    const outcome = async (frame: Uint8Array) => {
      try {
        return sha256Hex(await decodeAll(frame));
      } catch (e) {
        return `${(e as Error).name}: ${(e as Error).message}`;
      }
    };
    const results: string[][] = [];
    for (const simd of [true, false]) {
      const before = useZstdSimd(simd);
      try {
        assertEquals(zstdSimdAvailable(), simd);
        results.push(await Promise.all([...packed, broken].map(outcome)));
      } finally {
        useZstdSimd(before);
      }
    }
    const want = sha256Hex(input.subarray(0, 1 << 20));
    assertEquals(results[0].slice(0, 3), [want, want, want]);
    assertEquals(results[1], results[0]);
  },
);

Deno.test("frames from our encoder decode to its input", async () => {
  const inputs = [
    new Uint8Array(0),
    Uint8Array.of(1, 2, 3),
    new TextEncoder().encode("the quick brown fox ".repeat(20000)),
    pseudoRandom(200_000, 11),
    new Uint8Array(1 << 20),
    pseudoRandom(300_000, 2).map((b) => b & 0x0f),
  ];
  for (const input of inputs) {
    const frame = encodeFrame(input);
    const out = new Uint8Array(input.length);
    await decodeFrameInto(frame, out);
    assertEquals(sha256Hex(out), sha256Hex(input));
    assertEquals(sha256Hex(await decodeAll(frame)), sha256Hex(input));
  }
});

Deno.test(
  "a frame whose window is over 2^27 is refused, as zstd -d refuses it",
  { ignore: skip(["zstd"]) },
  async () => {
    // From a pipe the tool does not know the size, and keeps window log 31.
    const packed = await zstd(
      ["--long=31"],
      new TextEncoder().encode("abc".repeat(1000)),
    );
    assertEquals(packed[5] >> 3, 31 - 10, "window log 31 in the header");
    const tool = await run("zstd", ["-d", "-q", "-c"], {
      stdin: packed,
      allowFail: true,
    });
    assertTrue(tool.code !== 0, "zstd -d without --long=31 refuses it too");
    await rejects(
      () => decodeAll(packed),
      CodecError,
      new RegExp(`window of ${2 ** 31} bytes is over the ${MAX_WINDOW}`),
    );
  },
);

Deno.test("a frame that needs a dictionary is an UnsupportedError naming it", async () => {
  // Descriptor 0x21: single segment, a 1-byte dictionary id; content size 3.
  const frame = Uint8Array.of(
    0x28,
    0xb5,
    0x2f,
    0xfd,
    0x21,
    0x07,
    0x03,
    0x19,
    0x00,
    0x00,
    1,
    2,
    3,
  );
  await rejects(() => decodeAll(frame), UnsupportedError, /dictionary 7/);
});

Deno.test("poked headers and sizes are typed errors", async () => {
  const input = new TextEncoder().encode(
    "hello hello hello hello\n".repeat(400),
  );
  const frame = encodeFrame(input);
  // A declared content size one too small, and one too large.
  const header = frame[4];
  assertEquals(header >> 6 !== 0, true, "the encoder writes a content size");
  const wrong = (delta: number) => {
    const poked = frame.slice();
    const fcsAt = 5 + ((header & 0x20) ? 0 : 1) + [0, 1, 2, 4][header & 3];
    const bytes = [1, 2, 4, 8][header >> 6];
    let v = 0;
    for (let i = bytes - 1; i >= 0; i--) v = v * 256 + poked[fcsAt + i];
    v += delta;
    for (let i = 0; i < bytes; i++) poked[fcsAt + i] = (v >> (8 * i)) & 0xff;
    return poked;
  };
  for (const delta of [-1, 1]) {
    const poked = wrong(delta);
    await rejects(() => decodeAll(poked), CodecError, /content size|declares/);
  }
  // A reserved block type, a reserved descriptor bit.
  const fcsBytes = header >> 6
    ? [1, 2, 4, 8][header >> 6]
    : (header & 0x20 ? 1 : 0);
  const blockAt = 5 + ((header & 0x20) ? 0 : 1) + fcsBytes;
  const reservedBlock = frame.slice();
  reservedBlock[blockAt] |= 0x06;
  await rejects(() => decodeAll(reservedBlock), CodecError, /reserved type 3/);
  const reservedBit = frame.slice();
  reservedBit[4] |= 0x08;
  await rejects(() => decodeAll(reservedBit), CodecError, /reserved bit/);
  // Truncated at every length: a typed error each time, never a hang.
  for (let n = 0; n < frame.length; n++) {
    const cut = frame.slice(0, n);
    await rejects(() => decodeAll(cut), CodecError);
  }
});

Deno.test("the FSE-weights frame that hung fzstd is a typed error", async () => {
  const frame = await Deno.readFile(
    new URL("../testdata/zstd-weights-loop.zst", import.meta.url),
  );
  const e = await rejects(() => decodeAll(frame), CodecError);
  assertMatch(e.message, /Huffman weights/);
});

/** xorshift32, for mutations. */
function rng(seed: number) {
  let x = seed || 1;
  return (n: number) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
}

Deno.test(
  "thousands of mutated frames: a typed error, or the bytes zstd -d gives, the same from the SIMD and the scalar build",
  { ignore: skip(["zstd", "tar"]) },
  async () => {
    const real = await realFiles(1 << 20);
    const text = new TextEncoder().encode(
      Array.from({ length: 3000 }, (_, i) => `${i}: ${i * 7 % 101} foo\n`)
        .join(""),
    );
    const sources: Uint8Array[] = [];
    for (const args of [["-1"], ["-19"], ["--no-check", "-3"], ["-9"]]) {
      sources.push(await zstd(args, text));
      sources.push(await zstd(args, real.subarray(200_000, 240_000)));
    }
    sources.push(encodeFrame(real.subarray(500_000, 530_000)));
    const random = rng(12345);
    const mutants: Uint8Array[] = [];
    const PER_SOURCE = 250;
    for (const source of sources) {
      for (let i = 0; i < PER_SOURCE; i++) {
        const m = source.slice();
        const kind = random(4);
        if (kind === 3) {
          // Truncated somewhere.
          mutants.push(m.slice(0, random(m.length)));
          continue;
        }
        const pokes = 1 + random(4);
        for (let k = 0; k < pokes; k++) {
          // Mostly past the frame header (magic and descriptor are easy).
          const at = 4 + random(m.length - 4);
          m[at] = kind === 0 ? m[at] ^ (1 << random(8)) : random(256);
        }
        mutants.push(m);
      }
    }
    await withTemp(async (dir) => {
      for (let i = 0; i < mutants.length; i++) {
        await Deno.writeFile(`${dir}/${i}.zst`, mutants[i]);
      }
      // One shell for all: zstd -d each, its exit status beside the output.
      await run("sh", [
        "-c",
        `cd ${dir} && for f in *.zst; do zstd -d -q -c "$f" > "$f.out" 2>/dev/null; echo $? > "$f.rc"; done`,
      ]);
      // Kinds of damage the mutants must have reached (each a typed error).
      const KINDS: [string, RegExp][] = [
        ["checksum", /checksum mismatch/],
        ["offset", /match offset reaches before/],
        ["huffman stream", /Huffman-coded literals corrupt/],
        ["sequence stream", /sequences bitstream corrupt/],
        ["literals overrun", /more literals than/],
        ["truncated", /truncated/],
      ];
      const seen = new Set<string>();
      let decoded = 0, refused = 0, agreed = 0, toolOnly = 0;
      for (let i = 0; i < mutants.length; i++) {
        const toolOk =
          (await Deno.readTextFile(`${dir}/${i}.zst.rc`)).trim() === "0";
        let ours: Uint8Array | undefined;
        let error = "";
        try {
          ours = await decodeAll(mutants[i]);
        } catch (e) {
          if (!(e instanceof CodecError || e instanceof UnsupportedError)) {
            throw new Error(`mutant ${i}: untyped ${e}`);
          }
          error = `${e.name}: ${e.message}`;
          for (const [name, pattern] of KINDS) {
            if (pattern.test(e.message)) seen.add(name);
          }
        }
        // The scalar build (engines without SIMD) gives the same answer.
        const before = useZstdSimd(false);
        try {
          const scalar = await decodeAll(mutants[i]);
          assertTrue(ours !== undefined, `mutant ${i}: only scalar decodes`);
          assertEquals(sha256Hex(scalar), sha256Hex(ours!), `mutant ${i}`);
        } catch (e) {
          if (ours !== undefined) throw e;
          const scalarError = e instanceof Error
            ? `${e.name}: ${e.message}`
            : String(e);
          assertEquals(scalarError, error, `mutant ${i}: scalar's error`);
        } finally {
          useZstdSimd(before);
        }
        if (ours === undefined) {
          // Refused where zstd -d decodes: only frames without a checksum
          // here, all Huffman streams that do not end on their first bit,
          // which libzstd 1.5's fast Huffman loop does not check (its
          // output is then whatever the corrupt stream gave).
          refused++;
          if (toolOk) toolOnly++;
          continue;
        }
        decoded++;
        // What we decode, the tool decodes to the same bytes.
        assertTrue(toolOk, `mutant ${i}: we decode it, zstd -d refuses it`);
        const tool = await Deno.readFile(`${dir}/${i}.zst.out`);
        assertEquals(sha256Hex(ours), sha256Hex(tool), `mutant ${i}`);
        agreed++;
      }
      assertEquals(decoded, agreed);
      console.log(
        `${mutants.length} mutants: ${decoded} decoded as zstd -d does, ${refused} refused (${toolOnly} of them decoded by zstd -d)`,
      );
      assertTrue(
        refused > mutants.length / 2,
        `${refused} refused (${toolOnly} of them decoded by zstd -d)`,
      );
    });
  },
);

Deno.test(
  "a zstd frame read into the end of the buffer it decodes into decodes in place, reading the rest from a copy where the output would reach it",
  { ignore: skip(["zstd"]) },
  async () => {
    // 40 MiB (past the 10 MiB window and room of a 2 MiB window, so the
    // output is copied out as it goes): zeros first, the output running
    // far ahead of the packed bytes, then random bytes.
    const data = new Uint8Array(40 << 20);
    data.set(pseudoRandom(20 << 20, 3), 20 << 20);
    const packed = (await run("zstd", ["-q", "-3", "-c"], { stdin: data }))
      .stdout;
    for (const margin of [0, 1 << 20]) {
      const buffer = new Uint8Array(
        new SharedArrayBuffer(data.length + margin),
      );
      const start = buffer.length - packed.length;
      buffer.set(packed, start);
      const out = buffer.subarray(0, data.length);
      const used = await decodeFrameInto(buffer.subarray(start), out);
      assertEquals(used, packed.length);
      assertEquals(sha256Hex(out), sha256Hex(data), `margin ${margin}`);
    }
  },
);
