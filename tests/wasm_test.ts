// The WebAssembly decoders (drivers/codecs/_wasm/*.c, loaded by _wasm.ts):
// the committed module is what tools/build_wasm.sh builds, and on every
// mutation of real compressed data they answer what the TypeScript
// decoders answer (the same bytes, or an error where TypeScript has one).
import { assertEquals, assertTrue } from "./_asserts.ts";
import { have, pseudoRandom, ROOT, run, withTemp } from "./_helpers.ts";
import { realFiles } from "./_codec.ts";
import {
  acquireWasm,
  decodeLz,
  releaseWasm,
  useWasm,
  WASM_COPY_LIMIT,
  wasmAvailable,
  WasmInstance,
} from "../drivers/codecs/_wasm.ts";
import { WASM_COMPILER } from "../drivers/codecs/_wasm_module.ts";
import * as lz4 from "../drivers/codecs/lz4.ts";
import * as lzo from "../drivers/codecs/lzo.ts";
import * as lzfse from "../drivers/codecs/lzfse.ts";
import * as xz from "../drivers/codecs/xz.ts";
import { ByteFeed } from "../drivers/codecs/_feed.ts";
import { CodecError } from "../mod.ts";

/** The local clang's version line, or undefined without clang. */
function clangVersion(): string | undefined {
  if (!have("clang") || !have("wasm-ld")) return undefined;
  const out = new Deno.Command("clang", { args: ["--version"] }).outputSync();
  return new TextDecoder().decode(out.stdout).split("\n")[0];
}

// Not skip(): CI does not install clang (the module is committed, and CI
// sets VDISK_REQUIRE_TOOLS, which turns a skip into a failure), so this
// check runs only where the same clang that built the module is present.
Deno.test({
  name: "the committed WebAssembly module is what tools/build_wasm.sh builds",
  ignore: clangVersion() !== WASM_COMPILER,
  async fn() {
    await withTemp(async (dir) => {
      await run("sh", [`${ROOT}tools/build_wasm.sh`, `${dir}/module.ts`]);
      const built = await Deno.readTextFile(`${dir}/module.ts`);
      const committed = await Deno.readTextFile(
        `${ROOT}drivers/codecs/_wasm_module.ts`,
      );
      // deno fmt may re-wrap the committed file; the base64 must match.
      const base64 = (s: string) => s.match(/"([A-Za-z0-9+/=]{100,})"/)![1];
      assertEquals(base64(built), base64(committed));
    });
  },
});

/** xorshift32 numbers for the mutations. */
function numbers(seed: number) {
  let x = seed;
  return (below: number) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % below;
  };
}

/** `bytes` with a few bytes changed, cut short, or junk added (by `pick`). */
function mutate(bytes: Uint8Array, next: (below: number) => number) {
  const kind = next(4);
  if (kind === 0) return bytes.subarray(0, next(bytes.length + 1));
  if (kind === 1) {
    const junk = pseudoRandom(1 + next(40), 1 + next(1000));
    const out = new Uint8Array(bytes.length + junk.length);
    out.set(bytes);
    out.set(junk, bytes.length);
    return out;
  }
  const out = bytes.slice();
  for (let k = 1 + next(kind === 2 ? 2 : 8); k > 0; k--) {
    out[next(out.length)] = next(256);
  }
  return out;
}

/** What the TypeScript decoder makes of `input`: its bytes or its error message. */
function scriptOutcome(
  decodeInto: (input: Uint8Array, out: Uint8Array) => Uint8Array,
  input: Uint8Array,
  size: number,
): Uint8Array | string {
  const before = useWasm(false);
  try {
    return decodeInto(input, new Uint8Array(size)).slice();
  } catch (e) {
    assertTrue(e instanceof CodecError, String(e));
    return (e as Error).message;
  } finally {
    useWasm(before);
  }
}

for (
  const [name, codec, fn] of [
    ["lz4", lz4, "lz4_decode"],
    ["lzo", lzo, "lzo_decode"],
  ] as const
) {
  Deno.test({
    name:
      `${name}: WebAssembly and TypeScript agree on 1,500 mutations of real blocks`,
    ignore: !wasmAvailable(),
    fn() {
      const data = realFiles(1 << 20);
      const next = numbers(name === "lz4" ? 11 : 12);
      const blocks: [Uint8Array, Uint8Array][] = [];
      for (let k = 0; k < 24; k++) {
        const at = next(data.length - 70_000);
        const plain = data.subarray(at, at + 1 + next(65_536));
        blocks.push([plain, codec.encodeSync(plain)]);
      }
      let failures = 0;
      for (let round = 0; round < 1500; round++) {
        const [plain, packed] = blocks[round % blocks.length];
        const input = round % 10 === 0 ? packed : mutate(packed, next);
        const size = round % 7 === 0 ? next(plain.length * 2) : plain.length;
        const expected = scriptOutcome(codec.decodeInto, input, size);
        const out = new Uint8Array(size);
        const ok = decodeLz(fn, input, out);
        if (typeof expected === "string") {
          failures++;
          assertEquals(
            ok,
            false,
            `round ${round}: TypeScript says ${expected}`,
          );
        } else {
          assertEquals(ok, true, `round ${round}: WebAssembly refused`);
          assertEquals(out, expected, `round ${round}`);
        }
      }
      // The mutations reach the error paths, not just the happy one.
      assertTrue(failures > 500, `${failures} failures`);
    },
  });
}

/** What `decode` makes of `input` on one path: its bytes' sum or its error. */
async function outcome(
  decode: (input: Uint8Array, size: number) => Promise<Uint8Array>,
  input: Uint8Array,
  size: number,
  wasm: boolean,
): Promise<string> {
  const before = useWasm(wasm);
  try {
    const out = await decode(input, size);
    return `${out.length} bytes, sum ${out.reduce((s, b) => s + b, 0)}`;
  } catch (e) {
    assertTrue(e instanceof CodecError, String(e));
    return (e as Error).message;
  } finally {
    useWasm(before);
  }
}

Deno.test({
  name:
    "lzfse: WebAssembly and TypeScript agree on 600 mutations of real FSE and LZVN streams",
  ignore: !wasmAvailable(),
  async fn() {
    const data = realFiles(1 << 20);
    const next = numbers(14);
    const streams: [Uint8Array, number][] = [];
    for (let k = 0; k < 6; k++) {
      const at = next(data.length - 300_000);
      // Small pieces are LZVN blocks, larger ones FSE (bvx2) blocks.
      const plain = data.subarray(at, at + (k < 2 ? 3000 : 200_000));
      streams.push([await lzfse.encode(plain), plain.length]);
    }
    let errors = 0;
    for (let round = 0; round < 600; round++) {
      const [packed, size] = streams[round % streams.length];
      const input = round < streams.length ? packed : mutate(packed, next);
      const wasm = await outcome(lzfse.decode, input, size, true);
      assertEquals(
        wasm,
        await outcome(lzfse.decode, input, size, false),
        `round ${round}`,
      );
      if (wasm.startsWith("lzfse:")) errors++;
    }
    assertTrue(errors > 200, `${errors} errors`);
  },
});

/** An LZVN (bvxn) stream of one block: `raw` bytes from `ops`, then end-of-stream. */
function lzvnStream(raw: number, ops: number[]): Uint8Array {
  const payload = [...ops, 0x06, 0, 0, 0, 0, 0, 0, 0];
  const b = new Uint8Array(12 + payload.length + 4);
  const v = new DataView(b.buffer);
  b.set([0x62, 0x76, 0x78, 0x6e]);
  v.setUint32(4, raw, true);
  v.setUint32(8, payload.length, true);
  b.set(payload, 12);
  b.set([0x62, 0x76, 0x78, 0x24], 12 + payload.length);
  return b;
}

Deno.test({
  name:
    "lzvn: lzvn.c itself decodes real LZVN blocks, the same bytes as TypeScript",
  ignore: !wasmAvailable(),
  async fn() {
    // Straight to the export, so a C decoder that refused everything (and
    // left the work to the TypeScript fallback) would fail here.
    const data = realFiles(3 << 20);
    for (const size of [1, 3000, 200_000, 1 << 20]) {
      const plain = data.subarray(size, 2 * size);
      const packed = await lzfse.encode(plain, { method: "lzvn" });
      const v = new DataView(packed.buffer, packed.byteOffset);
      assertEquals(v.getUint32(0, true), 0x6e787662); // bvxn
      assertEquals(v.getUint32(4, true), size); // one block
      const payload = v.getUint32(8, true);
      const wasm = acquireWasm()!;
      try {
        const inAt = wasm.heapBase;
        const outAt = inAt + packed.length + 32;
        wasm.ensure(outAt + size + 32);
        wasm.bytes.set(packed, inAt);
        const status = wasm.exports.lzvn_decode(
          inAt,
          12,
          12 + payload,
          outAt,
          0,
          size,
        );
        assertEquals(status, 0, `${size} bytes`);
        assertEquals(wasm.bytes.slice(outAt, outAt + size), plain);
      } finally {
        releaseWasm(wasm);
      }
    }
  },
});

Deno.test({
  name:
    "lzvn: WebAssembly and TypeScript agree on every opcode with every operand pattern tried",
  ignore: !wasmAvailable(),
  async fn() {
    // 16 literal bytes first, so that distances up to 16 are valid; then
    // each opcode with operand bytes that make short, long, zero and
    // too-long distances and lengths, with n_raw_bytes from 15 to 51 (the
    // right one among them wherever the opcode's lengths are small).
    const lead = [0xe0 + 15, ...Array.from({ length: 15 }, (_, i) => 65 + i)];
    const operands = [
      [],
      [0],
      [1],
      [3, 0],
      [0x40, 0],
      [5, 0, 1, 2],
      [0xff, 0xff, 0xff],
      [8, 0, 0x61, 0x62, 0x63],
      [0x2c, 0, 0x61, 0x62, 0x63, 0x64],
    ];
    let decoded = 0, refused = 0;
    for (let op = 0; op < 256; op++) {
      for (const tail of operands) {
        for (let raw = 15; raw < 52; raw++) {
          const input = lzvnStream(raw, [...lead, op, ...tail]);
          const wasm = await outcome(lzfse.decode, input, raw, true);
          assertEquals(
            wasm,
            await outcome(lzfse.decode, input, raw, false),
            `opcode 0x${op.toString(16)}, operands ${tail}, ${raw} bytes`,
          );
          if (wasm.startsWith("lzfse:")) refused++;
          else decoded++;
        }
      }
    }
    assertTrue(decoded > 40 && refused > 2000, `${decoded} ${refused}`);
  },
});

Deno.test({
  name:
    "lzvn: WebAssembly and TypeScript agree on 600 mutations of real LZVN streams of several blocks",
  ignore: !wasmAvailable(),
  async fn() {
    const data = realFiles(4 << 20);
    const next = numbers(15);
    const streams: [Uint8Array, number][] = [];
    for (const size of [700, 5000, 60_000, 300_000, (1 << 20) + 100_000]) {
      const at = next(data.length - size);
      const plain = data.subarray(at, at + size);
      streams.push([await lzfse.encode(plain, { method: "lzvn" }), size]);
    }
    let errors = 0;
    for (let round = 0; round < 600; round++) {
      const [packed, size] = streams[round % streams.length];
      const input = round < streams.length ? packed : mutate(packed, next);
      const wasm = await outcome(lzfse.decode, input, size, true);
      assertEquals(
        wasm,
        await outcome(lzfse.decode, input, size, false),
        `round ${round}`,
      );
      if (wasm.startsWith("lzfse:")) errors++;
    }
    assertTrue(errors > 200, `${errors} errors`);
  },
});

/** An LZFSE stream from raw blocks: [magic, raw, payload] each, then bvx$. */
function lzfseBlocks(blocks: [string, number, Uint8Array][]): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const [magic, raw, payload] of blocks) {
    const header = new Uint8Array(magic === "bvx-" ? 8 : 12);
    const v = new DataView(header.buffer);
    header.set(new TextEncoder().encode(magic));
    v.setUint32(4, raw, true);
    if (magic === "bvxn") v.setUint32(8, payload.length, true);
    parts.push(header, payload);
  }
  parts.push(new TextEncoder().encode("bvx$"));
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

Deno.test({
  name:
    "lzfse: streams over WASM_COPY_LIMIT decode in WebAssembly through a window, the same bytes as TypeScript, with its memory far below the output",
  ignore: !wasmAvailable(),
  async fn() {
    const MIB = 1 << 20;
    const size = WASM_COPY_LIMIT + 2 * MIB;
    const data = new Uint8Array(size);
    const real = realFiles(4 * MIB);
    for (let at = 0; at < size; at += 5 * MIB) {
      data.set(real.subarray(0, Math.min(4 * MIB, size - at)), at);
    }
    // FSE blocks, and LZVN blocks, each encoder's stream whole.
    const streams = [
      await lzfse.encode(data),
      await lzfse.encode(data, { method: "lzvn" }),
    ];
    // A stored block larger than the window (linear memory grows for it),
    // then an LZVN block copying from 65535 back into it.
    const head = data.subarray(0, size - 16);
    streams.push(lzfseBlocks([
      ["bvx-", head.length, head],
      // lrg_d: L 0, M 10, D 65535; then match of 6 more from the same D.
      [
        "bvxn",
        16,
        Uint8Array.of(0x3f, 0xff, 0xff, 0xf6, 6, 0, 0, 0, 0, 0, 0, 0),
      ],
    ]));
    const tail = data.subarray(size - 16 - 65535, size - 65535);
    const expected = [data, data, new Uint8Array(size)];
    expected[2].set(head);
    expected[2].set(tail, size - 16);
    const largest: number[] = [];
    const ensure = WasmInstance.prototype.ensure;
    for (const [k, packed] of streams.entries()) {
      largest[k] = 0;
      WasmInstance.prototype.ensure = function (n: number) {
        largest[k] = Math.max(largest[k], n);
        return ensure.call(this, n);
      };
      let wasm: Uint8Array;
      try {
        wasm = await lzfse.decode(packed, size);
      } finally {
        WasmInstance.prototype.ensure = ensure;
      }
      assertTrue(
        wasm.length === size && wasm.every((b, i) => b === expected[k][i]),
        `stream ${k}: WebAssembly bytes differ`,
      );
      const before = useWasm(false);
      try {
        const script = await lzfse.decode(packed, size);
        assertTrue(
          script.every((b, i) => b === expected[k][i]),
          `stream ${k}: TypeScript bytes differ`,
        );
      } finally {
        useWasm(before);
      }
      // Linear memory asked for: the input and a 4 MiB window, or the
      // stored block it had to hold; never the whole output.
      const limit = packed.length + (k < 2 ? 8 * MIB : size + 2 * MIB);
      assertTrue(largest[k] < limit, `stream ${k}: ${largest[k]}`);
    }
    // Damaged: both paths give the same bytes or the same error.
    const next = numbers(16);
    for (let round = 0; round < 6; round++) {
      const packed = streams[round % 2];
      const input = mutate(packed, next);
      assertEquals(
        await outcome(lzfse.decode, input, size, true),
        await outcome(lzfse.decode, input, size, false),
        `round ${round}`,
      );
    }
  },
});

/** What decode() and decodeStreaming() make of `input`, on one path. */
async function xzOutcome(
  input: Uint8Array,
  size: number,
  wasm: boolean,
): Promise<[string, string]> {
  const before = useWasm(wasm);
  try {
    let whole: string;
    try {
      const out = await xz.decode(input, size);
      whole = `${out.length} bytes, sum ${out.reduce((s, b) => s + b, 0)}`;
    } catch (e) {
      assertTrue(e instanceof CodecError, String(e));
      whole = (e as Error).message;
    }
    let streamed: string;
    let total = 0;
    let sum = 0;
    try {
      let packed: Uint8Array | null = input;
      const feed = new ByteFeed(() =>
        Promise.resolve([packed, packed = null][0])
      );
      for await (const piece of xz.decodeStreaming(feed)) {
        total += piece.length;
        sum = piece.reduce((s, b) => s + b, sum);
      }
      streamed = `${total} bytes, sum ${sum}`;
    } catch (e) {
      assertTrue(e instanceof CodecError, String(e));
      streamed = (e as Error).message;
    }
    return [whole, streamed];
  } finally {
    useWasm(before);
  }
}

Deno.test({
  name:
    "xz: WebAssembly and TypeScript agree on 200 mutations of real streams, whole and streamed",
  ignore: !wasmAvailable() || !have("xz"),
  async fn() {
    const data = realFiles(1 << 20);
    const streams: [Uint8Array, number][] = [];
    for (
      const args of [
        ["-6"],
        ["-0", "--check=none"],
        ["--lzma2=preset=1,lc=0,lp=2,pb=0", "--check=none"],
        ["--lzma2=preset=6,lc=4,pb=4", "--check=crc32"],
        ["--lzma2=preset=2,dict=4KiB", "--check=none"],
      ]
    ) {
      const plain = data.subarray(
        streams.length << 17,
        (streams.length + 1) << 17,
      );
      const r = await run("xz", ["-c", "-T1", ...args], { stdin: plain });
      streams.push([r.stdout, plain.length]);
    }
    const next = numbers(13);
    let errors = 0;
    for (let round = 0; round < 200; round++) {
      const [packed, size] = streams[round % streams.length];
      const input = round < streams.length ? packed : mutate(packed, next);
      const wasm = await xzOutcome(input, size, true);
      const script = await xzOutcome(input, size, false);
      assertEquals(wasm, script, `round ${round}`);
      if (wasm[0].startsWith("xz:")) errors++;
    }
    assertTrue(errors > 100, `${errors} errors`);
  },
});

Deno.test({
  name: "WebAssembly instances are reused, their memory grown only as needed",
  ignore: !wasmAvailable(),
  async fn() {
    const data = realFiles(1 << 20);
    const packed = lz4.encodeSync(data);
    for (let i = 0; i < 3; i++) {
      assertEquals(await lz4.decode(packed, data.length), data);
    }
    const wasm = acquireWasm()!;
    const size = wasm.exports.memory.buffer.byteLength;
    // Input, output and a little: not a copy per decode.
    assertTrue(size < packed.length + data.length + (2 << 20), `${size}`);
    releaseWasm(wasm);
  },
});

Deno.test({
  name:
    "outputs over WASM_COPY_LIMIT decode in TypeScript (LZ4) or through a window (LZFSE), and no instance kept for reuse holds more than the limit",
  ignore: !wasmAvailable(),
  async fn() {
    const size = WASM_COPY_LIMIT + (8 << 20);
    const big = new Uint8Array(size);
    big.set(realFiles(1 << 20), 5 << 20);
    const packedLz4 = lz4.encodeSync(big);
    assertEquals(await lz4.decode(packedLz4, size), big);
    const packedLzfse = await lzfse.encode(big);
    assertEquals(await lzfse.decode(packedLzfse, size), big);
    const wasm = acquireWasm()!;
    const memory = wasm.exports.memory.buffer.byteLength;
    assertTrue(memory <= WASM_COPY_LIMIT + (16 << 20), `${memory}`);
    releaseWasm(wasm);
  },
});

/**
 * A fresh copy of `_wasm.ts` (its own module state) run where
 * `new WebAssembly.Module` throws, as on a page's main thread for a
 * module this size, and where `WebAssembly.compile` does what
 * `compile` says; answers how many compiles it started.
 */
async function withEngine(
  tag: string,
  compile: (bytes: BufferSource) => Promise<WebAssembly.Module>,
  body: (wasm: typeof import("../drivers/codecs/_wasm.ts")) => Promise<void>,
): Promise<number> {
  const real = { Module: WebAssembly.Module, compile: WebAssembly.compile };
  let compiles = 0;
  const api = WebAssembly as unknown as Record<string, unknown>;
  api.Module = function () {
    throw new RangeError("WebAssembly.Module(): buffer size is too large");
  };
  api.compile = (bytes: BufferSource) => {
    compiles++;
    return compile(bytes);
  };
  try {
    await body(await import(`../drivers/codecs/_wasm.ts?${tag}`));
  } finally {
    Object.assign(api, real);
  }
  return compiles;
}

Deno.test("where modules compile only in the background (a page's main thread), the module is compiled once for every acquire", async () => {
  const realCompile = WebAssembly.compile;
  const compiles = await withEngine("page", realCompile, async (wasm) => {
    // Not there yet: the synchronous acquire starts the compile.
    assertEquals(wasm.acquireWasm(), undefined);
    const got = await Promise.all([
      wasm.acquireWasmAlways(),
      wasm.acquireWasmAlways(),
    ]);
    assertTrue(got.every((i) => i instanceof wasm.WasmInstance));
    // Compiled: the synchronous acquire has it now.
    assertTrue(wasm.acquireWasm() instanceof wasm.WasmInstance);
  });
  assertEquals(compiles, 1);
});

Deno.test("a module the engine refuses is compiled once, not again at each acquire", async () => {
  const compiles = await withEngine(
    "refused",
    () => Promise.reject(new WebAssembly.CompileError("refused")),
    async (wasm) => {
      for (let i = 0; i < 3; i++) {
        assertEquals(await wasm.acquireWasmAlways(), undefined);
        assertEquals(wasm.acquireWasm(), undefined);
      }
    },
  );
  assertEquals(compiles, 1);
});
