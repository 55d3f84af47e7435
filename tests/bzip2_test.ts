// The bzip2 decoder (drivers/codecs/bzip2.ts, blocks in _wasm/bzip2.c)
// against the bzip2 tool: real files at levels 1 and 9, edge cases,
// crafted hostile blocks (each a CodecError naming the field), and
// mutations of real streams (each a CodecError or bzip2's exact bytes).
import { assertMatch, assertTrue } from "./_asserts.ts";
import { pseudoRandom, run, skip } from "./_helpers.ts";
import { decodeFed, realFiles } from "./_codec.ts";
import {
  decode,
  decodeInto,
  decodeStreaming,
  encode,
} from "../drivers/codecs/bzip2.ts";
import { CodecError } from "../mod.ts";

async function pack(bytes: Uint8Array, level: number): Promise<Uint8Array> {
  return (await run("bzip2", [`-${level}`, "-c"], { stdin: bytes })).stdout;
}

/** What `bzip2 -d` makes of `bytes`, or undefined where it fails. */
async function unpack(bytes: Uint8Array): Promise<Uint8Array | undefined> {
  const r = await run("bzip2", ["-d", "-c"], { stdin: bytes, allowFail: true });
  return r.code === 0 ? r.stdout : undefined;
}

/** Decodes `packed` all three ways and checks each gives `expected`. */
async function assertDecodes(
  packed: Uint8Array,
  expected: Uint8Array,
  what: string,
) {
  assertTrue(equal(await decode(packed, expected.length), expected), what);
  const out = new Uint8Array(expected.length);
  await decodeInto(packed, out);
  assertTrue(equal(out, expected), `${what}: decodeInto`);
  for (const step of [4093, 1 << 20]) {
    const fed = await decodeFed(decodeStreaming, packed, step);
    assertTrue(equal(fed, expected), `${what}: streamed ${step} at a time`);
  }
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** A CodecError whose message matches `pattern`. */
async function assertCodecError(work: Promise<unknown>, pattern: RegExp) {
  try {
    await work;
  } catch (e) {
    assertTrue(e instanceof CodecError, `not a CodecError: ${e}`);
    assertMatch((e as Error).message, pattern);
    return;
  }
  throw new Error(`no error; expected ${pattern}`);
}

Deno.test(
  "real files packed by bzip2 -1 and -9 decode to the same bytes, whole, into a buffer and streamed",
  { ignore: skip(["bzip2"]) },
  async () => {
    const files = realFiles(3 << 20);
    for (const level of [1, 9]) {
      const packed = await pack(files, level);
      await assertDecodes(packed, files, `level ${level}`);
    }
  },
);

Deno.test(
  "edge cases decode as bzip2 -d decodes them: empty, one byte, long runs, run-length boundaries, random bytes",
  { ignore: skip(["bzip2"]) },
  async () => {
    // Runs of every length around the run-length step's 4 and 4 + 255.
    const runs: number[] = [];
    for (let n = 1; n <= 270; n++) {
      for (let k = 0; k < n; k++) runs.push(n & 1 ? 0x41 : 0x42);
    }
    const ramp = new Uint8Array(300_000).map((_, i) => (i * 31) >> 8);
    const samples: [string, Uint8Array][] = [
      ["empty", new Uint8Array(0)],
      ["one byte", Uint8Array.of(7)],
      ["four equal bytes", new Uint8Array(4).fill(9)],
      ["five equal bytes", new Uint8Array(5).fill(9)],
      ["zeros", new Uint8Array(3_000_000)],
      ["runs of 1 to 270", Uint8Array.from(runs)],
      ["every byte value", new Uint8Array(256).map((_, i) => i)],
      ["a ramp", ramp],
      // Level-9 blocks of about 0.9 MB: more than the streaming decoder's
      // first input window.
      ["random", pseudoRandom(2_000_000, 5)],
    ];
    for (const [name, bytes] of samples) {
      for (const level of [1, 9]) {
        const packed = await pack(bytes, level);
        const theirs = await unpack(packed);
        assertTrue(theirs && equal(theirs, bytes), `bzip2 -d on ${name}`);
        await assertDecodes(packed, bytes, `${name} at level ${level}`);
      }
    }
  },
);

Deno.test(
  "concatenated streams and zero padding decode whole; other bytes after a stream are an error",
  { ignore: skip(["bzip2"]) },
  async () => {
    const a = realFiles(200_000);
    const b = pseudoRandom(150_000, 2);
    const pa = await pack(a, 1);
    const pb = await pack(b, 9);
    const both = new Uint8Array(pa.length + pb.length + 10);
    both.set(pa);
    both.set(pb, pa.length);
    const expected = new Uint8Array(a.length + b.length);
    expected.set(a);
    expected.set(b, a.length);
    await assertDecodes(both, expected, "two streams and zeros");
    both[both.length - 3] = 1;
    await assertCodecError(
      decode(both, expected.length),
      /unexpected bytes after stream 2/,
    );
  },
);

Deno.test("a declared size that differs from the stream's is a CodecError", async () => {
  const bytes = new Uint8Array(100_000).map((_, i) => i % 251);
  const packed = await encode(bytes);
  await assertCodecError(
    decode(packed, bytes.length - 1),
    /more than the declared 99999 bytes/,
  );
  await assertCodecError(
    decode(packed, bytes.length + 1),
    /decodes to 100000 bytes, 100001 declared/,
  );
  await assertCodecError(decode(packed, -1), /not a byte count/);
});

// ---------------------------------------------------------------------------
// Crafted blocks: a stream of one block over the bytes `a` and `b`, with
// every field given, so that each check can be hit alone.

/** bzip2's CRC-32 of `bytes`. */
function crc(bytes: Uint8Array): number {
  let c = -1;
  for (const b of bytes) {
    c ^= b << 24;
    for (let k = 0; k < 8; k++) {
      c = c & 0x80000000 ? (c << 1) ^ 0x04c11db7 : c << 1;
    }
  }
  return ~c >>> 0;
}

/** Bits, most significant first, into bytes (zero padded). */
function pack_bits(fields: [number, number][]): Uint8Array {
  const out: number[] = [];
  let acc = 0;
  let count = 0;
  for (const [n, v] of fields) {
    for (let i = n - 1; i >= 0; i--) {
      acc = (acc << 1) | (Math.floor(v / 2 ** i) & 1);
      if (++count === 8) {
        out.push(acc);
        acc = 0;
        count = 0;
      }
    }
  }
  if (count) out.push(acc << (8 - count));
  return Uint8Array.from(out);
}

/** RUNA (0) / RUNB (1) digits of a run of `n`. */
function runSymbols(n: number): number[] {
  const out: number[] = [];
  while (n > 0) {
    const digit = n & 1 ? 0 : 1;
    out.push(digit);
    n = (n - 1 - digit) / 2;
  }
  return out;
}

interface Craft {
  level?: number;
  randomised?: number;
  origPtr?: number;
  nGroups?: number;
  /** Selectors as unary counts; default one per 50 symbols, all 0. */
  selectors?: number[];
  nSelectors?: number;
  /** Each table's code lengths as the 5-bit start and the deltas per symbol. */
  tables?: [number, number[]][];
  /** Symbols: 0 RUNA, 1 RUNB, 2 MTF 1, 3 end of block. */
  symbols: number[];
  /** The block's bytes, for its CRC (default: what the symbols give). */
  text: Uint8Array;
  blockCrc?: number;
  streamCrc?: number;
}

/**
 * One stream of one block over `a` and `b`; every table gives RUNA,
 * RUNB, MTF-1 and end-of-block the codes 00, 01, 10, 11 unless told.
 */
function craft(c: Craft): Uint8Array {
  const nGroups = c.nGroups ?? 2;
  const tables = c.tables ?? Array(nGroups).fill([2, [0, 0, 0, 0]]);
  const selectors = c.selectors ??
    Array(Math.ceil(c.symbols.length / 50)).fill(0);
  const blockCrc = c.blockCrc ?? crc(c.text);
  const f: [number, number][] = [
    [24, 0x425a68],
    [8, 0x30 + (c.level ?? 1)],
    [24, 0x314159],
    [24, 0x265359],
    [32, blockCrc],
    [1, c.randomised ?? 0],
    [24, c.origPtr ?? 0],
    [16, 0x0200], // range 6 (0x60..0x6f)
    [16, 0x6000], // 0x61 a, 0x62 b
    [3, nGroups],
    [15, c.nSelectors ?? selectors.length],
  ];
  for (const s of selectors) {
    for (let k = 0; k < s; k++) f.push([1, 1]);
    f.push([1, 0]);
  }
  for (const [start, deltas] of tables) {
    f.push([5, start]);
    for (const d of deltas) {
      for (let k = 0; k < Math.abs(d); k++) f.push([2, d > 0 ? 2 : 3]);
      f.push([1, 0]);
    }
  }
  for (const s of c.symbols) f.push([2, s]);
  f.push([24, 0x177245], [24, 0x385090], [32, c.streamCrc ?? blockCrc]);
  return pack_bits(f);
}

/**
 * The symbols and origPtr of a block holding `text` (over `a` and `b`,
 * no four equal bytes in a row): rotations sorted, the last column
 * move-to-front coded (`a` starts in front), zero runs as RUNA/RUNB.
 */
function blockOf(text: Uint8Array): { symbols: number[]; origPtr: number } {
  const n = text.length;
  const rows = [...Array(n).keys()].sort((x, y) => {
    for (let k = 0; k < n; k++) {
      const d = text[(x + k) % n] - text[(y + k) % n];
      if (d) return d;
    }
    return 0;
  });
  const symbols: number[] = [];
  let front = 0x61;
  let zeros = 0;
  for (const row of rows) {
    const byte = text[(row + n - 1) % n];
    if (byte === front) {
      zeros++;
      continue;
    }
    symbols.push(...runSymbols(zeros), 2);
    zeros = 0;
    front = byte;
  }
  symbols.push(...runSymbols(zeros), 3);
  return { symbols, origPtr: rows.indexOf(0) };
}

/** `n` bytes of `a` and `b`, mixed, with no four equal in a row. */
function abText(n: number): Uint8Array {
  const next = numbers(12345);
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    out[i] = 0x61 + next(2);
    if (
      i >= 3 && out[i] === out[i - 1] && out[i] === out[i - 2] &&
      out[i] === out[i - 3]
    ) {
      out[i] ^= 3;
    }
  }
  return out;
}

Deno.test(
  "a crafted block decodes as bzip2 -d decodes it (the crafting is right)",
  { ignore: skip(["bzip2"]) },
  async () => {
    for (const n of [1, 2, 8, 200]) {
      const text = abText(n);
      const packed = craft({ ...blockOf(text), text });
      const theirs = await unpack(packed);
      assertTrue(theirs && equal(theirs, text), `bzip2 -d reads block ${n}`);
      assertTrue(equal(await decode(packed, text.length), text), `ours ${n}`);
    }
  },
);

Deno.test("hostile block fields are CodecErrors naming the field, within a second", async () => {
  const text = abText(8);
  const ok = { ...blockOf(text), text };
  const { symbols } = ok;
  const long = abText(300);
  const cases: [string, Uint8Array, RegExp][] = [
    ["randomised", craft({ ...ok, randomised: 1 }), /randomised blocks/],
    [
      "origPtr",
      craft({ ...ok, origPtr: 8 }),
      /origPtr 8 is past the block's 8 bytes/,
    ],
    ["origPtr max", craft({ ...ok, origPtr: 0xffffff }), /origPtr 16777215/],
    [
      "nGroups 1",
      craft({ ...ok, nGroups: 1, tables: [[2, [0, 0, 0, 0]]] }),
      /nGroups 1 must be 2..6/,
    ],
    [
      "nGroups 7",
      craft({ ...ok, nGroups: 7, tables: Array(7).fill([2, [0, 0, 0, 0]]) }),
      /nGroups 7 must be 2..6/,
    ],
    [
      "nSelectors 0",
      craft({ ...ok, nSelectors: 0, selectors: [] }),
      /nSelectors 0/,
    ],
    [
      "selector past the tables",
      craft({ ...ok, selectors: [2] }),
      /selector 0 names a table past 2/,
    ],
    [
      "code length 0",
      craft({ ...ok, tables: [[0, [0, 0, 0, 0]], [2, [0, 0, 0, 0]]] }),
      /table 0 code length 0/,
    ],
    [
      "code length 21",
      craft({ ...ok, tables: [[2, [0, 0, 0, 0]], [20, [1, 0, 0, 0]]] }),
      /table 1 code length 21/,
    ],
    [
      "oversubscribed",
      craft({ ...ok, tables: [[1, [0, 0, 0, 0]], [2, [0, 0, 0, 0]]] }),
      /oversubscribed/,
    ],
    [
      "more symbols than selectors",
      craft({
        ...blockOf(long),
        text: long,
        nSelectors: 1,
        selectors: [0],
      }),
      /more symbols than selectors/,
    ],
    [
      "a run past the block",
      craft({ symbols: [...Array(40).fill(1), 3], text }),
      /a run is longer than the block/,
    ],
    [
      "a run of exactly the block, then a byte",
      craft({ symbols: [...runSymbols(100_000), 2, 3], text }),
      /block longer than 100000 bytes/,
    ],
    [
      "a run one past the block",
      craft({ symbols: [...runSymbols(100_001), 3], text }),
      /a run is longer than the block/,
    ],
    [
      "bad block CRC",
      craft({ ...ok, blockCrc: crc(text) ^ 1, streamCrc: crc(text) }),
      /block 1: CRC mismatch/,
    ],
    [
      "bad stream CRC",
      craft({ ...ok, streamCrc: crc(text) ^ 1 }),
      /stream CRC mismatch/,
    ],
    ["truncated", craft(ok).subarray(0, 30), /truncated stream/],
    [
      "no end of block",
      craft({ ...ok, symbols: symbols.slice(0, -1) }).subarray(0, 36),
      /truncated stream|bad block magic|invalid Huffman|more than the declared|CRC mismatch/,
    ],
  ];
  for (const [name, packed, pattern] of cases) {
    const started = performance.now();
    await assertCodecError(decode(packed, text.length), pattern);
    const fed = decodeFed(decodeStreaming, packed, 7);
    await assertCodecError(fed, pattern);
    const ms = performance.now() - started;
    assertTrue(ms < 1000, `${name}: ${ms} ms`);
  }
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

Deno.test(
  "mutated real streams are each a CodecError or bzip2 -d's exact bytes, within time bounds",
  { ignore: skip(["bzip2"]) },
  async () => {
    const files = realFiles(400_000);
    const next = numbers(0x1b2c3d4e);
    let errors = 0;
    let decoded = 0;
    for (const level of [1, 9]) {
      const packed = await pack(files, level);
      for (let m = 0; m < 150; m++) {
        const kind = next(5);
        let mutant: Uint8Array;
        if (kind === 0) mutant = packed.subarray(0, next(packed.length));
        else if (kind === 1) {
          mutant = packed.slice();
          mutant[next(mutant.length)] ^= 1 << next(8);
        } else if (kind === 2) {
          // A byte in the first block's header and tables.
          mutant = packed.slice();
          mutant[10 + next(Math.min(400, mutant.length - 10))] = next(256);
        } else {
          mutant = packed.slice();
          for (let k = 1 + next(6); k > 0; k--) {
            mutant[next(mutant.length)] = next(256);
          }
        }
        const started = performance.now();
        let ours: Uint8Array | undefined;
        try {
          ours = await decode(mutant, files.length);
        } catch (e) {
          assertTrue(e instanceof CodecError, `mutant ${m}: ${e}`);
          errors++;
        }
        const ms = performance.now() - started;
        assertTrue(ms < 5000, `mutant ${m} took ${ms} ms`);
        if (ours) {
          decoded++;
          const theirs = await unpack(mutant);
          assertTrue(
            theirs && equal(ours, theirs),
            `mutant ${m}: bytes differ`,
          );
        }
      }
    }
    assertTrue(errors > 250, `${errors} errors, ${decoded} decoded`);
  },
);
