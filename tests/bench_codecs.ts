// `deno task bench codecs`: each decoder of drivers/codecs against its
// reference tool, in MB/s (10^6 bytes of decoded output a second) per core:
// decoded bytes over the CPU time (user + system) the process used, the
// best of BENCH_RUNS runs. CPU time rather than wall time, as the machine
// is shared: a busy neighbour slows both sides' wall clocks, not their CPU
// seconds as much.
//
// The data: a 64 MiB sample of real files, every 8th MiB of the first
// 512 MiB of a tar of /usr/lib (the same tar as the bench disk), cached
// under $TMPDIR/vdisk-bench-codecs.
//
// - zlib, bzip2, xz: ours decodes the very file the tool made (gzip -n's
//   deflate body; the .bz2; the .xz, made with -T1 as one block), and the
//   tool decodes it with -d to /dev/null.
// - lz4, lzo, lzfse, lzvn, adc: ours decodes 1 MiB chunks made by our
//   encoder (as in a dmg; lzvn: LZFSE streams of one LZVN block each);
//   lz4 -d and lzop -d decode their own file of the sample; 7zz decodes a
//   dmg of the sample with lzfse (or adc) chunks made by our writer, or
//   (lzvn) one of the same LZVN chunks ours decodes (tests/_ulfo.ts).
// - zstd: ours decodes the .zst the tool made (zstd -3, one stream of
//   frames, streamed through the window as a `.zst` input is), and the
//   tool decodes it with -d to /dev/null.
//
// Ours runs in this process, one codec at a time on the main thread; its
// CPU time is this process's (/proc/self/stat), so V8's helper threads
// (compiler, GC) are counted too.
import * as adc from "../drivers/codecs/adc.ts";
import * as bzip2 from "../drivers/codecs/bzip2.ts";
import * as lz4 from "../drivers/codecs/lz4.ts";
import * as lzfse from "../drivers/codecs/lzfse.ts";
import * as lzo from "../drivers/codecs/lzo.ts";
import * as xz from "../drivers/codecs/xz.ts";
import * as zlib from "../drivers/codecs/zlib.ts";
import * as zstd from "../drivers/codecs/zstd.ts";
import { ByteFeed } from "../drivers/codecs/_feed.ts";
import { have, ROOT, run } from "./_helpers.ts";
import { ulfoImage } from "./_ulfo.ts";
import { useWasm } from "../drivers/codecs/_wasm.ts";
import { deflateSync } from "node:zlib";

const MIB = 1024 * 1024;
const PIECES = 64;
const SIZE = PIECES * MIB;
const RUNS = Number(Deno.env.get("BENCH_RUNS") ?? 3);
// BENCH_REPEAT=n: each timed run decodes n times (both sides), for fast
// codecs whose run is a few of the 10 ms clock ticks CPU time counts in.
const REPEAT = Number(Deno.env.get("BENCH_REPEAT") ?? 1);
const DIR = `${Deno.env.get("TMPDIR") ?? "/tmp"}/vdisk-bench-codecs`;
const SAMPLE = `${DIR}/sample.raw`;
const TICKS = 100; // CLK_TCK on Linux
const filters = Deno.args.slice(1);
// BENCH_WASM=off: the TypeScript decoders only (the "before" figures).
if (Deno.env.get("BENCH_WASM") === "off") useWasm(false);

/** The sample: every 8th MiB of the first 512 MiB of a tar of /usr/lib. */
async function buildSample(): Promise<Uint8Array> {
  try {
    const bytes = await Deno.readFile(SAMPLE);
    if (bytes.length === SIZE) return bytes;
  } catch { /* build it */ }
  await Deno.mkdir(DIR, { recursive: true });
  console.error(`building the ${PIECES} MiB codec sample at ${SAMPLE}`);
  const tar = new Deno.Command("tar", {
    args: ["--sort=name", "-cf", "-", "-C", "/", "usr/lib"],
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const sample = new Uint8Array(SIZE);
  let seen = 0; // bytes of the tar read so far
  let kept = 0;
  const reader = tar.stdout.getReader();
  while (kept < SIZE) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the tar of /usr/lib is smaller than 512 MiB");
    for (let at = 0; at < value.length && kept < SIZE;) {
      const inMib = seen % MIB;
      const take = Math.min(value.length - at, MIB - inMib);
      if (Math.floor(seen / MIB) % 8 === 0) {
        sample.set(value.subarray(at, at + take), kept);
        kept += take;
      }
      at += take;
      seen += take;
    }
  }
  await reader.cancel();
  try {
    tar.kill();
  } catch { /* already gone */ }
  await tar.status;
  await Deno.writeFile(SAMPLE, sample);
  return sample;
}

/** CPU seconds (user + system) this process has used so far. */
function cpuSeconds(): number {
  const stat = Deno.readTextFileSync("/proc/self/stat");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / TICKS;
}

interface Timing {
  cpu: number;
  wall: number;
}

/**
 * What a codec's run answers: nothing, or a check of the bytes it made,
 * run after its time is taken (comparing 64 MiB in a JavaScript loop is
 * not the decoder's time).
 */
type Run = () => Promise<void | (() => void)>;

/** Best of RUNS runs of `fn`, by CPU time. */
async function timeOurs(fn: Run): Promise<Timing> {
  let best: Timing = { cpu: Infinity, wall: Infinity };
  for (let i = 0; i < RUNS; i++) {
    const cpu0 = cpuSeconds(), wall0 = performance.now();
    let check: void | (() => void) = undefined;
    for (let r = 0; r < REPEAT; r++) check = await fn();
    const cpu = (cpuSeconds() - cpu0) / REPEAT,
      wall = (performance.now() - wall0) / 1000 / REPEAT;
    check?.();
    if (cpu < best.cpu) best = { cpu, wall };
  }
  return best;
}

/** Best of RUNS runs of a shell command, by its CPU time (GNU time). */
async function timeTool(command: string): Promise<Timing> {
  let best: Timing = { cpu: Infinity, wall: Infinity };
  for (let i = 0; i < RUNS; i++) {
    const r = await run("/usr/bin/time", [
      "-f",
      "%e %U %S",
      "sh",
      "-c",
      REPEAT > 1 ? `for i in $(seq ${REPEAT}); do ${command}; done` : command,
    ], { allowFail: true });
    if (r.code !== 0) throw new Error(`${command}: ${r.stderr.slice(-300)}`);
    const [wall, user, sys] = r.stderr.trim().split("\n").pop()!.split(" ")
      .map((v) => Number(v) / REPEAT);
    if (user + sys < best.cpu) best = { cpu: user + sys, wall };
  }
  return best;
}

/** Makes `path` once, with a shell command or a function. */
async function make(path: string, command: string | (() => Promise<void>)) {
  try {
    if ((await Deno.stat(path)).size > 0) return;
  } catch { /* make it */ }
  if (typeof command === "string") await run("sh", ["-c", command]);
  else await command();
}

/** The sample cut into 1 MiB chunks, each encoded by `encode`. */
function chunks(
  sample: Uint8Array,
  encode: (b: Uint8Array) => Uint8Array,
): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let at = 0; at < sample.length; at += MIB) {
    out.push(encode(sample.subarray(at, at + MIB)));
  }
  return out;
}

/** Decodes every chunk into one reused 1 MiB buffer and checks the bytes. */
function chunkDecoder(
  sample: Uint8Array,
  encoded: Uint8Array[],
  decodeChunk: (input: Uint8Array, out: Uint8Array) => unknown,
): () => Promise<void> {
  const out = new Uint8Array(MIB);
  return async () => {
    for (let i = 0; i < encoded.length; i++) {
      await decodeChunk(encoded[i], out);
      if (i === 0 && !equal(out, sample.subarray(0, MIB))) {
        throw new Error("decoded bytes differ from the sample");
      }
    }
  };
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** A dmg of the sample with `compression` chunks, made by our writer. */
function dmgOf(compression: string): string {
  return `${Deno.execPath()} run -A ${ROOT}cli.ts convert -f raw -O dmg -o compression=${compression},partitions=whole ${SAMPLE} ${DIR}/sample-${compression}.dmg`;
}

interface Codec {
  name: string;
  /** Makes the files both sides decode; returns our decode run. */
  prepare?: (sample: Uint8Array) => Promise<Run>;
  /** The reference tool's name (for `have`) and its decode command. */
  tool: string;
  toolMake: [string, string | (() => Promise<void>)];
  toolDecode: string;
  /** Decoded bytes a run makes, when not the whole sample. */
  bytes?: number;
}

/** The sample cut into 64 KiB zlib blocks (node:zlib -6), as cloop and dmg keep them. */
function zlibBlocks(sample: Uint8Array): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let at = 0; at < sample.length; at += 65536) {
    out.push(new Uint8Array(deflateSync(sample.subarray(at, at + 65536))));
  }
  return out;
}

/** A 64 KiB block decoder run over every block, checking the first. */
function blockDecoder(
  sample: Uint8Array,
  decodeBlock: (input: Uint8Array, out: Uint8Array) => unknown,
): () => Promise<void> {
  const blocks = zlibBlocks(sample);
  const out = new Uint8Array(65536);
  return async () => {
    for (let i = 0; i < blocks.length; i++) {
      await decodeBlock(blocks[i], out);
      if (i === 0 && !equal(out, sample.subarray(0, 65536))) {
        throw new Error("zlib block bytes differ");
      }
    }
  };
}

/** Inflates through a `DecompressionStream` into `out` (what browsers did before). */
async function streamInflate(input: Uint8Array, out: Uint8Array) {
  const reader = new Blob([input as Uint8Array<ArrayBuffer>]).stream()
    .pipeThrough(new DecompressionStream("deflate")).getReader();
  let at = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    out.set(value, at);
    at += value.length;
  }
}

/** gzip -d on the whole sample, the peer of every zlib row but the 32 MiB one. */
const GZIP_SAMPLE = {
  tool: "gzip",
  toolMake: [
    `${DIR}/sample.gz`,
    `gzip -n -6 -c ${SAMPLE} > ${DIR}/sample.gz`,
  ] as [string, string],
  toolDecode: `gzip -d -c ${DIR}/sample.gz > /dev/null`,
};

const codecs: Codec[] = [
  {
    name: "zlib (deflate; ours is node:zlib's inflate in Deno)",
    ...GZIP_SAMPLE,
    prepare: async (sample) => {
      const gz = await Deno.readFile(`${DIR}/sample.gz`);
      // gzip -n: a 10-byte header without a name, 8 bytes of trailer.
      const body = gz.subarray(10, gz.length - 8);
      return async () => {
        const out = await zlib.decode(body, sample.length, "deflate-raw");
        return () => {
          if (!equal(out, sample)) throw new Error("zlib bytes differ");
        };
      };
    },
  },
  {
    name: "zlib, our WebAssembly inflater (gzip -6, 32 MiB)",
    tool: "gzip",
    toolMake: [
      `${DIR}/sample-32.gz`,
      `head -c ${32 * MIB} ${SAMPLE} | gzip -n -6 > ${DIR}/sample-32.gz`,
    ],
    toolDecode: `gzip -d -c ${DIR}/sample-32.gz > /dev/null`,
    // WASM_COPY_LIMIT: outputs over 32 MiB are not inflated through linear memory.
    bytes: 32 * MIB,
    prepare: async (sample) => {
      const gz = await Deno.readFile(`${DIR}/sample-32.gz`);
      const out = new Uint8Array(32 * MIB);
      return () => {
        if (!zlib.inflateWasmInto(gz, out, "gzip")) {
          throw new Error("no WebAssembly");
        }
        return Promise.resolve(() => {
          if (!equal(out, sample.subarray(0, 32 * MIB))) {
            throw new Error("zlib bytes differ");
          }
        });
      };
    },
  },
  {
    name: "zlib 64 KiB blocks, WebAssembly (browsers now)",
    ...GZIP_SAMPLE,
    prepare: (sample) =>
      Promise.resolve(blockDecoder(sample, (input, out) => {
        if (!zlib.inflateWasmInto(input, out)) {
          throw new Error("no WebAssembly");
        }
      })),
  },
  {
    name: "zlib 64 KiB blocks, node:zlib (Deno)",
    ...GZIP_SAMPLE,
    prepare: (sample) =>
      Promise.resolve(
        blockDecoder(sample, (input, out) => zlib.decodeInto(input, out)),
      ),
  },
  {
    name: "zlib 64 KiB blocks, Deno's DecompressionStream",
    ...GZIP_SAMPLE,
    prepare: (sample) => Promise.resolve(blockDecoder(sample, streamInflate)),
  },
  {
    name: "bzip2",
    tool: "bzip2",
    toolMake: [
      `${DIR}/sample.bz2`,
      `bzip2 -9 -c ${SAMPLE} > ${DIR}/sample.bz2`,
    ],
    toolDecode: `bzip2 -d -c ${DIR}/sample.bz2 > /dev/null`,
    prepare: async (sample) => {
      const input = await Deno.readFile(`${DIR}/sample.bz2`);
      const out = new Uint8Array(sample.length);
      return async () => {
        await bzip2.decodeInto(input, out);
        return () => {
          if (!equal(out, sample)) throw new Error("bzip2 bytes differ");
        };
      };
    },
  },
  {
    name: "xz (LZMA2)",
    tool: "xz",
    toolMake: [`${DIR}/sample.xz`, `xz -6 -T1 -c ${SAMPLE} > ${DIR}/sample.xz`],
    toolDecode: `xz -d -T1 -c ${DIR}/sample.xz > /dev/null`,
    prepare: async (sample) => {
      const input = await Deno.readFile(`${DIR}/sample.xz`);
      return async () => {
        const out = await xz.decode(input, sample.length);
        return () => {
          if (!equal(out, sample)) throw new Error("xz bytes differ");
        };
      };
    },
  },
  {
    name: "lzfse (7zz: a dmg of lzfse chunks)",
    tool: "7zz",
    toolMake: [`${DIR}/sample-lzfse.dmg`, dmgOf("lzfse")],
    toolDecode: `7zz x -tdmg -so ${DIR}/sample-lzfse.dmg > /dev/null`,
    prepare: async (sample) => {
      const encoded: Uint8Array[] = [];
      for (let at = 0; at < sample.length; at += MIB) {
        encoded.push(await lzfse.encode(sample.subarray(at, at + MIB)));
      }
      return chunkDecoder(sample, encoded, async (input, out) => {
        out.set(await lzfse.decode(input, out.length));
      });
    },
  },
  {
    name: "lzvn (lzfse's bvxn blocks; 7zz: a dmg of them)",
    tool: "7zz",
    // Our writer picks FSE blocks for 1 MiB chunks: this dmg's chunks are
    // one LZVN block each, as the encoder makes them on request.
    toolMake: [
      `${DIR}/sample-lzvn.dmg`,
      async () =>
        await Deno.writeFile(
          `${DIR}/sample-lzvn.dmg`,
          await ulfoImage(await buildSample(), { method: "lzvn" }),
        ),
    ],
    toolDecode: `7zz x -tdmg -so ${DIR}/sample-lzvn.dmg > /dev/null`,
    prepare: async (sample) => {
      const encoded: Uint8Array[] = [];
      for (let at = 0; at < sample.length; at += MIB) {
        const piece = sample.subarray(at, at + MIB);
        encoded.push(await lzfse.encode(piece, { method: "lzvn" }));
      }
      return chunkDecoder(sample, encoded, async (input, out) => {
        out.set(await lzfse.decode(input, out.length));
      });
    },
  },
  {
    name: "adc (7zz: a dmg of adc chunks)",
    tool: "7zz",
    toolMake: [`${DIR}/sample-adc.dmg`, dmgOf("adc")],
    toolDecode: `7zz x -tdmg -so ${DIR}/sample-adc.dmg > /dev/null`,
    prepare: (sample) =>
      Promise.resolve(
        chunkDecoder(sample, chunks(sample, adc.encodeSync), adc.decodeInto),
      ),
  },
  {
    name: "lz4 (block format, 1 MiB chunks)",
    tool: "lz4",
    toolMake: [`${DIR}/sample.lz4`, `lz4 -q -c ${SAMPLE} > ${DIR}/sample.lz4`],
    toolDecode: `lz4 -d -q -c ${DIR}/sample.lz4 > /dev/null`,
    prepare: (sample) =>
      Promise.resolve(
        chunkDecoder(sample, chunks(sample, lz4.encodeSync), lz4.decodeInto),
      ),
  },
  {
    name: "lzo (LZO1X, 1 MiB chunks)",
    tool: "lzop",
    toolMake: [`${DIR}/sample.lzo`, `lzop -q -c ${SAMPLE} > ${DIR}/sample.lzo`],
    toolDecode: `lzop -d -q -c ${DIR}/sample.lzo > /dev/null`,
    prepare: (sample) =>
      Promise.resolve(
        chunkDecoder(sample, chunks(sample, lzo.encodeSync), lzo.decodeInto),
      ),
  },
  {
    name: "zstd (-3, streamed)",
    tool: "zstd",
    toolMake: [`${DIR}/sample.zst`, `zstd -q -c ${SAMPLE} > ${DIR}/sample.zst`],
    toolDecode: `zstd -d -q -c ${DIR}/sample.zst > /dev/null`,
    prepare: async (sample) => {
      const input = await Deno.readFile(`${DIR}/sample.zst`);
      const out = new Uint8Array(sample.length);
      return async () => {
        let given = false;
        const feed = new ByteFeed(() =>
          Promise.resolve(given ? null : (given = true, input))
        );
        let at = 0;
        for await (const piece of zstd.decodeStreaming(feed)) {
          out.set(piece, at);
          at += piece.length;
        }
        return () => {
          if (at !== sample.length || !equal(out, sample)) {
            throw new Error("zstd bytes differ");
          }
        };
      };
    },
  },
];

const load = () =>
  Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3).join(" ");
const sample = await buildSample();
const mbps = (t: Timing, bytes = SIZE) =>
  (bytes / 1e6 / Math.max(t.cpu, 0.01 / REPEAT)).toFixed(1);
console.log(
  `codecs: ${PIECES} MiB of a tar of /usr/lib, best of ${RUNS} by CPU time${
    REPEAT > 1 ? ` (each ${REPEAT} decodes)` : ""
  }; MB/s per core (wall s); load average ${load()}`,
);
console.log(
  `${"codec".padEnd(52)} ${"ours".padStart(16)} ${
    "tool".padStart(16)
  }  speed ours/tool (above 1: ours faster)`,
);
for (const c of codecs) {
  if (filters.length && !filters.some((f) => c.name.includes(f))) continue;
  if (!have(c.tool)) {
    console.log(`${c.name.padEnd(52)} skipped (${c.tool} not installed)`);
    continue;
  }
  await make(...c.toolMake);
  const tool = await timeTool(c.toolDecode);
  const ours = c.prepare ? await timeOurs(await c.prepare(sample)) : undefined;
  const cell = (t?: Timing) =>
    t
      ? `${mbps(t, c.bytes)} (${t.wall.toFixed(2)} s)`.padStart(16)
      : "-".padStart(16);
  console.log(
    `${c.name.padEnd(52)} ${cell(ours)} ${cell(tool)}  ${
      ours ? (tool.cpu / Math.max(ours.cpu, 0.01 / REPEAT)).toFixed(2) : "-"
    }`,
  );
}
console.log(`load average at the end: ${load()}`);
