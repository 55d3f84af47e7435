// The LZ4 block codec (cloop version 4, compressor 3): blocks made by the
// reference `lz4` tool decode to its input, our blocks decode with `lz4 -d`,
// and corrupt blocks are CodecErrors.
import { assertEquals, assertTrue } from "./_asserts.ts";
import { pseudoRandom, rejects, run, skip } from "./_helpers.ts";
import { decode, encode } from "../drivers/codecs/lz4.ts";
import { concat } from "../drivers/_binary.ts";
import { CodecError } from "../mod.ts";
import {
  assertJunkIsCodecError,
  bothPaths,
  lzSamples,
  realFiles,
  textSample,
} from "./_codec.ts";

/** Samples: the shared ones, twelve bytes and long repeats. */
function samples(): [string, Uint8Array][] {
  const far = new Uint8Array(200_000);
  const chunk = pseudoRandom(1000, 4);
  for (let at = 0; at + 1000 <= far.length; at += 65_000) far.set(chunk, at);
  return lzSamples(70_000, [
    ["twelve bytes", new Uint8Array(12).fill(9)],
    ["repeats 65000 apart", far],
    ["1 MiB of real files (/usr/lib)", realFiles(1 << 20)],
  ]);
}

bothPaths(
  "lz4 round-trips every sample through our encoder and decoder",
  async () => {
    for (const [name, bytes] of samples()) {
      const packed = await encode(bytes);
      assertEquals(await decode(packed, bytes.length), bytes, name);
      assertTrue(
        packed.length <= bytes.length + Math.ceil(bytes.length / 255) + 16,
        `${name}: ${packed.length} bytes`,
      );
    }
    const zeros = await encode(new Uint8Array(100_000));
    assertTrue(zeros.length < 500, `zeros packed to ${zeros.length}`);
  },
);

// ---------------------------------------------------------------- frames

/** xxHash32 (for the frame header's checksum byte). */
function xxh32(b: Uint8Array, seed = 0): number {
  const P1 = 2654435761, P2 = 2246822519, P3 = 3266489917;
  const P4 = 668265263, P5 = 374761393;
  const rotl = (x: number, r: number) => (x << r) | (x >>> (32 - r));
  const u32 = (i: number) =>
    (b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | (b[i + 3] << 24)) >>> 0;
  let i = 0;
  let h: number;
  if (b.length >= 16) {
    const v = [seed + P1 + P2, seed + P2, seed, seed - P1].map((x) => x >>> 0);
    for (; i + 16 <= b.length; i += 16) {
      for (let k = 0; k < 4; k++) {
        v[k] = Math.imul(
          rotl((v[k] + Math.imul(u32(i + 4 * k), P2)) >>> 0, 13),
          P1,
        );
      }
    }
    h = rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18);
  } else {
    h = seed + P5;
  }
  h = (h + b.length) >>> 0;
  for (; i + 4 <= b.length; i += 4) {
    h = Math.imul(rotl((h + Math.imul(u32(i), P3)) >>> 0, 17), P4);
  }
  for (; i < b.length; i++) {
    h = Math.imul(rotl((h + Math.imul(b[i], P5)) >>> 0, 11), P1);
  }
  h ^= h >>> 15;
  h = Math.imul(h, P2);
  h ^= h >>> 13;
  h = Math.imul(h, P3);
  h ^= h >>> 16;
  return h >>> 0;
}

/**
 * Wraps blocks (each of at most 64 KiB decoded) into an LZ4 frame; a block
 * that did not shrink goes in stored, as the frame format requires.
 */
function frame(blocks: { bytes: Uint8Array; stored: boolean }[]): Uint8Array {
  const descriptor = Uint8Array.of(0x60, 0x40); // v1, independent blocks; 64 KiB
  const parts: Uint8Array[] = [
    Uint8Array.of(0x04, 0x22, 0x4d, 0x18),
    descriptor,
    Uint8Array.of((xxh32(descriptor) >>> 8) & 0xff),
  ];
  for (const b of blocks) {
    const size = new Uint8Array(4);
    new DataView(size.buffer).setUint32(
      0,
      (b.bytes.length | (b.stored ? 0x80000000 : 0)) >>> 0,
      true,
    );
    parts.push(size, b.bytes);
  }
  parts.push(new Uint8Array(4));
  return concat(parts);
}

/** The blocks of an LZ4 frame: [compressed bytes or undefined when stored, stored bytes]. */
function unframe(
  f: Uint8Array,
): { packed?: Uint8Array; stored?: Uint8Array }[] {
  const dv = new DataView(f.buffer, f.byteOffset, f.length);
  assertEquals(dv.getUint32(0, true), 0x184d2204);
  const flg = f[4];
  let at = 7 + (flg & 0x08 ? 8 : 0) + (flg & 0x01 ? 4 : 0);
  const out = [];
  for (;;) {
    const word = dv.getUint32(at, true);
    at += 4;
    if (word === 0) break;
    const size = word & 0x7fffffff;
    const bytes = f.subarray(at, at + size);
    out.push(word & 0x80000000 ? { stored: bytes } : { packed: bytes });
    at += size + (flg & 0x10 ? 4 : 0);
  }
  return out;
}

bothPaths({
  name: "lz4 decodes the blocks the lz4 tool writes, at every level",
  ignore: skip(["lz4"]),
  async fn() {
    for (const [name, bytes] of samples()) {
      for (const level of ["-1", "-9", "--fast=5"]) {
        const r = await run("lz4", [level, "-B4", "-c"], { stdin: bytes });
        const decoded: Uint8Array[] = [];
        for (const block of unframe(r.stdout)) {
          const expected = Math.min(
            65536,
            bytes.length - decoded.reduce((s, d) => s + d.length, 0),
          );
          decoded.push(
            block.stored ?? await decode(block.packed!, expected),
          );
        }
        const joined = concat(decoded);
        assertEquals(joined.length, bytes.length, `${name} ${level}`);
        assertEquals(joined, bytes, `${name} ${level}`);
      }
    }
  },
});

bothPaths({
  name: "lz4 -d decodes the blocks our encoder writes",
  ignore: skip(["lz4"]),
  async fn() {
    for (const [name, bytes] of samples()) {
      const blocks = [];
      for (let at = 0; at < bytes.length; at += 65536) {
        const block = bytes.subarray(at, at + 65536);
        const packed = await encode(block);
        blocks.push(
          packed.length < block.length
            ? { bytes: packed, stored: false }
            : { bytes: block, stored: true },
        );
      }
      const r = await run("lz4", ["-d", "-c"], { stdin: frame(blocks) });
      assertEquals(r.stdout, bytes, name);
    }
  },
});

bothPaths("lz4 refuses corrupt blocks with a CodecError", async () => {
  const bytes = textSample(samples()).subarray(0, 50_000);
  const packed = await encode(bytes);
  await rejects(
    () => decode(packed, bytes.length + 1),
    CodecError,
    /50000 bytes, 50001 declared|ends/,
  );
  await rejects(
    () => decode(packed, bytes.length - 1),
    CodecError,
    /more than/,
  );
  await rejects(
    () => decode(packed.subarray(0, 100), bytes.length),
    CodecError,
  );
  await rejects(() => decode(new Uint8Array(0), 10), CodecError, /ends/);
  // A match before the start of the output.
  await rejects(
    () => decode(Uint8Array.of(0x10, 65, 5, 0, 0x50, 1, 2, 3, 4, 5), 10),
    CodecError,
    /before the start/,
  );
  // Offset 0.
  await rejects(
    () => decode(Uint8Array.of(0x10, 65, 0, 0, 0x50, 1, 2, 3, 4, 5), 10),
    CodecError,
    /offset 0/,
  );
  // A literal length that runs on and on.
  await rejects(
    () => decode(Uint8Array.of(0xf0, 255, 255, 255, 255), 100),
    CodecError,
  );
  await rejects(() => decode(packed, -1), CodecError, /byte count/);
  await assertJunkIsCodecError(decode);
});
