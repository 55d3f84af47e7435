// The xz decoder on both paths (the LZMA loop in WebAssembly and in
// TypeScript): streams the xz tool makes from real files, with every
// literal/position setting, block layout and check, decode to the tool's
// input, whole and streamed (where the window slides); corrupt streams are
// CodecErrors.
import { assertEquals, assertTrue } from "./_asserts.ts";
import { pseudoRandom, rejects, run, skip } from "./_helpers.ts";
import { bothPaths, decodeFed, realFiles } from "./_codec.ts";
import {
  blockAsStream,
  decode,
  decodeInto,
  decodeStreaming,
  encode,
  inPlaceStart,
  readIndex,
  type XzEncodeWork,
} from "../drivers/codecs/xz.ts";
import { CodecError } from "../mod.ts";

const packedCache = new Map<string, Uint8Array>();
/** `data` packed by `xz -c -T1 args`, once per file (both paths use it). */
async function xzOf(data: Uint8Array, args: string[]): Promise<Uint8Array> {
  const key = `${data.length} ${args.join(" ")}`;
  let packed = packedCache.get(key);
  if (!packed) {
    packed = (await run("xz", ["-c", "-T1", ...args], { stdin: data })).stdout;
    packedCache.set(key, packed);
  }
  return packed;
}

/** Decodes `input` with decodeStreaming, fed in pieces of `step` bytes. */
function streamed(input: Uint8Array, step = 100_000) {
  return decodeFed(decodeStreaming, input, step);
}

bothPaths({
  name:
    "xz decodes what the xz tool makes of real files, for every preset, lc/lp/pb, block layout and check",
  ignore: skip(["xz"]),
  async fn() {
    const data = realFiles(1536 << 10);
    for (
      const args of [
        ["-0"],
        ["-6"],
        ["-9e"],
        ["--lzma2=preset=6,lc=0,lp=0,pb=0"],
        ["--lzma2=preset=3,lc=4,lp=0,pb=4"],
        ["--lzma2=preset=3,lc=1,lp=3,pb=1"],
        ["--lzma2=preset=6,dict=4KiB"],
        ["-6", "--block-size=500000", "--check=sha256"],
        ["-1", "--check=none"],
        ["-1", "--check=crc64"],
      ]
    ) {
      const packed = await xzOf(data, args);
      assertEquals(await decode(packed, data.length), data, args.join(" "));
      assertEquals(await streamed(packed), data, args.join(" "));
    }
  },
});

bothPaths({
  name:
    "xz streams a 12 MiB real-data stream with a 64 KiB dictionary: the window slides and the bytes match",
  ignore: skip(["xz"]),
  async fn() {
    const data = realFiles(12 << 20);
    const packed = await xzOf(data, ["--lzma2=preset=1,dict=64KiB"]);
    assertEquals(await streamed(packed, 1 << 20), data);
    assertEquals(await decode(packed, data.length), data);
  },
});

bothPaths({
  name: "xz -d decodes what our encoder writes, and so do we",
  ignore: skip(["xz"]),
  async fn() {
    const data = realFiles(1 << 20);
    const packed = await encode(data);
    assertEquals(
      (await run("xz", ["-d", "-c"], { stdin: packed })).stdout,
      data,
    );
    assertEquals(await decode(packed, data.length), data);
  },
});

bothPaths({
  name: "xz refuses corrupt streams with a CodecError",
  ignore: skip(["xz"]),
  async fn() {
    const data = realFiles(200_000);
    const packed = await xzOf(data, ["--check=none"]);
    // Cut inside the LZMA data.
    await rejects(
      () => decode(packed.subarray(0, packed.length >> 1), data.length),
      CodecError,
    );
    // Declared one byte short: the output would run past it.
    await rejects(
      () => decode(packed, data.length - 1),
      CodecError,
      /more than/,
    );
    // A range coder that does not start with 0 (the first LZMA chunk's first byte).
    const poked = packed.slice();
    poked[12 + 12 + 6] = 1;
    await rejects(() => decode(poked, data.length), CodecError);
    // Every byte of the LZMA data changed in turn, near the start: an error
    // or (with no check) the declared size, never a crash or a hang.
    let errors = 0;
    for (let at = 30; at < 400; at += 7) {
      const bad = packed.slice();
      bad[at] ^= 0x55;
      try {
        const out = await decode(bad, data.length);
        assertEquals(out.length, data.length);
      } catch (e) {
        assertTrue(e instanceof CodecError, String(e));
        errors++;
      }
    }
    assertTrue(errors > 10, `${errors} errors`);
  },
});

Deno.test({
  name:
    "the xz encoder's work and tables stay linear in the input: random bytes, zeros, real files (xz -d reads them all)",
  ignore: skip(["xz"]),
  async fn() {
    // A 64 MiB dmg chunk of random bytes took 20 minutes before: the match
    // finder walked 24 candidates at every position through a link array
    // of 4 bytes per input byte. Counted here, not timed.
    const MIB = 1 << 20;
    const cases: [string, Uint8Array][] = [
      ["random", pseudoRandom(2 * MIB, 5)],
      ["zeros", new Uint8Array(16 * MIB)],
      ["real files", realFiles(2 * MIB)],
    ];
    for (const [name, data] of cases) {
      const work: XzEncodeWork = { searches: 0, candidates: 0, tableBytes: 0 };
      const packed = await encode(data, work);
      const back = (await run("xz", ["-d", "-c"], { stdin: packed })).stdout;
      assertTrue(
        back.length === data.length && back.every((b, i) => b === data[i]),
        `${name}: xz -d gives other bytes`,
      );
      // The tables: a ring of links over an 8 MiB window at most, 4 MiB
      // of 4-byte hash heads, 256 KiB of 3-byte heads.
      assertTrue(work.tableBytes <= 37 * MIB, `${name}: ${work.tableBytes}`);
      assertTrue(
        work.candidates <= 24 * work.searches,
        `${name}: ${work.candidates} candidates in ${work.searches} searches`,
      );
      if (name === "random") {
        // Long literal runs are searched at one position in 8, and their
        // chains are nearly empty.
        assertTrue(work.searches < data.length / 6, `${work.searches}`);
        assertTrue(work.candidates < work.searches, `${work.candidates}`);
      } else if (name === "zeros") {
        // One long repeat after another: hardly any searches.
        assertTrue(work.searches < 1000, `${work.searches}`);
      } else {
        assertTrue(work.searches <= data.length, `${work.searches}`);
        // And the ratio holds: within 15% of xz -6's size.
        const theirs = (await run("xz", ["-6", "-c"], { stdin: data })).stdout;
        assertTrue(
          packed.length < theirs.length * 1.15,
          `${packed.length} bytes, xz -6 ${theirs.length}`,
        );
      }
    }
  },
});

bothPaths(
  "xz decodeInto fills the caller's buffer and refuses a wrong size",
  async () => {
    const data = realFiles(300_000);
    const packed = await encode(data);
    const out = new Uint8Array(data.length);
    await decodeInto(packed, out);
    assertEquals(out, data);
    await rejects(
      () => decodeInto(packed, new Uint8Array(data.length - 1)),
      CodecError,
    );
  },
);

Deno.test(
  "an xz block decodes in place from where inPlaceStart says, in the buffer it fills, to the tool's input",
  { ignore: skip(["xz"]) },
  async () => {
    // Zeros first, then random bytes: the output runs ahead of the packed
    // bytes early, so the least start is well past size - packed.
    const data = new Uint8Array(6 << 20);
    data.set(pseudoRandom(3 << 20, 7), 3 << 20);
    const packed = await xzOf(data, ["-6", "--block-size=3000000"]);
    const read = (o: number, n: number) =>
      Promise.resolve(packed.slice(o, o + n));
    const blocks = (await readIndex(read, packed.length))!;
    assertEquals(blocks.length, 3);
    for (const block of blocks) {
      const framed = blockAsStream(
        block,
        await read(block.packedOffset, block.packedLength),
      );
      const start = inPlaceStart(framed, block.size)!;
      assertTrue(start >= block.size - framed.length);
      const buffer = new Uint8Array(
        new SharedArrayBuffer(Math.max(block.size, start + framed.length)),
      );
      buffer.set(framed, start);
      const out = buffer.subarray(0, block.size);
      await decodeInto(buffer.subarray(start, start + framed.length), out);
      assertEquals(
        Uint8Array.from(out),
        data.subarray(block.offset, block.offset + block.size),
      );
    }
  },
);
