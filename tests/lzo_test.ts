// The LZO1X codec (cloop version 4, compressor 4): streams made by the
// reference `lzop` tool decode to its input, our streams decode with
// `lzop -d`, and corrupt streams are CodecErrors.
import { assertEquals, assertTrue } from "./_asserts.ts";
import { pseudoRandom, rejects, run, skip } from "./_helpers.ts";
import { decode, encode } from "../drivers/codecs/lzo.ts";
import { concat } from "../drivers/_binary.ts";
import { CodecError } from "../mod.ts";
import {
  assertJunkIsCodecError,
  bothPaths,
  lzSamples,
  realFiles,
  textSample,
} from "./_codec.ts";

/** Samples: the shared ones, three bytes and repeats at each distance form. */
function samples(): [string, Uint8Array][] {
  const spaced = (gap: number, length: number) => {
    const b = pseudoRandom(gap * 4 + length, gap);
    b.copyWithin(gap, 0, length);
    b.copyWithin(gap * 3, gap * 2, gap * 2 + length);
    return b;
  };
  return lzSamples(300_000, [
    ["three bytes", Uint8Array.of(1, 2, 3)],
    ["repeats 2000 apart", spaced(2000, 6)],
    ["repeats 16000 apart", spaced(16000, 40)],
    ["repeats 40000 apart", spaced(40000, 300)],
    ["1 MiB of real files (/usr/lib)", realFiles(1 << 20)],
  ]);
}

bothPaths(
  "lzo round-trips every sample through our encoder and decoder",
  async () => {
    for (const [name, bytes] of samples()) {
      const packed = await encode(bytes);
      assertEquals(await decode(packed, bytes.length), bytes, name);
      assertTrue(
        packed.length <= bytes.length + Math.ceil(bytes.length / 255) + 64,
        `${name}: ${packed.length} bytes`,
      );
    }
    const zeros = await encode(new Uint8Array(100_000));
    assertTrue(zeros.length < 600, `zeros packed to ${zeros.length}`);
  },
);

// ---------------------------------------------------------------- lzop files

/** Adler-32, as lzop checksums its header and blocks. */
function adler32(b: Uint8Array): number {
  let a = 1;
  let s = 0;
  for (let i = 0; i < b.length; i++) {
    a = (a + b[i]) % 65521;
    s = (s + a) % 65521;
  }
  return ((s << 16) | a) >>> 0;
}

const MAGIC = [0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a];

/** An lzop file (method LZO1X-1, no block checksums) of the given blocks. */
function lzopFile(blocks: { size: number; packed: Uint8Array }[]): Uint8Array {
  const header = [
    0x10,
    0x30, // version
    0x20,
    0xa0, // library version
    0x09,
    0x40, // version needed to extract
    1,
    5, // method LZO1X-1, level
    0x03,
    0,
    0,
    0, // flags: Unix, no checksums
    0,
    0,
    0x81,
    0xa4, // mode
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0, // mtime
    0, // no name
  ];
  const sum = adler32(Uint8Array.from(header));
  const parts: number[] = [
    ...MAGIC,
    ...header,
    sum >>> 24,
    (sum >>> 16) & 255,
    (sum >>> 8) & 255,
    sum & 255,
  ];
  const out: Uint8Array[] = [Uint8Array.from(parts)];
  for (const b of blocks) {
    const sizes = new Uint8Array(8);
    const dv = new DataView(sizes.buffer);
    dv.setUint32(0, b.size);
    dv.setUint32(4, b.packed.length);
    out.push(sizes, b.packed);
  }
  out.push(new Uint8Array(4));
  return concat(out);
}

/** The blocks of an lzop file: their sizes and bytes (stored when sizes match). */
function lzopBlocks(f: Uint8Array): { size: number; bytes: Uint8Array }[] {
  const dv = new DataView(f.buffer, f.byteOffset, f.length);
  let at = 9;
  const version = dv.getUint16(at);
  at += 6; // version, library version, version needed
  at += 2; // method, level
  const flags = dv.getUint32(at);
  at += 4;
  if (flags & 0x800) at += 4; // filter
  at += 4 + 4 + (version >= 0x0940 ? 4 : 0); // mode, mtime
  at += 1 + f[at]; // name
  at += 4; // header checksum
  if (flags & 0x40) at += 4 + dv.getUint32(at) + 4; // extra field
  const out = [];
  for (;;) {
    const size = dv.getUint32(at);
    at += 4;
    if (size === 0) break;
    const csize = dv.getUint32(at);
    at += 4;
    if (flags & 0x1) at += 4; // adler32 of the data
    if (flags & 0x100) at += 4; // crc32 of the data
    if (csize < size) {
      if (flags & 0x2) at += 4; // adler32 of the compressed data
      if (flags & 0x200) at += 4;
    }
    out.push({ size, bytes: f.subarray(at, at + csize) });
    at += csize;
  }
  return out;
}

bothPaths({
  name:
    "lzo decodes the streams lzop writes, at levels 1, 3 and 9 (LZO1X-1 and LZO1X-999)",
  ignore: skip(["lzop"]),
  async fn() {
    for (const [name, bytes] of samples()) {
      for (const level of ["-1", "-3", "-9"]) {
        const r = await run("lzop", [level, "-c"], { stdin: bytes });
        const joined = new Uint8Array(bytes.length);
        let at = 0;
        for (const b of lzopBlocks(r.stdout)) {
          joined.set(
            b.bytes.length < b.size ? await decode(b.bytes, b.size) : b.bytes,
            at,
          );
          at += b.size;
        }
        assertEquals(at, bytes.length, `${name} ${level}`);
        assertEquals(joined, bytes, `${name} ${level}`);
      }
    }
  },
});

bothPaths({
  name: "lzop -d decodes the streams our encoder writes",
  ignore: skip(["lzop"]),
  async fn() {
    for (const [name, bytes] of samples()) {
      if (bytes.length === 0) continue; // lzop writes no block for nothing
      const blocks = [];
      for (let at = 0; at < bytes.length; at += 256 << 10) {
        const block = bytes.subarray(at, at + (256 << 10));
        const packed = await encode(block);
        // lzop stores a block that does not shrink.
        blocks.push({
          size: block.length,
          packed: packed.length < block.length ? packed : block,
        });
      }
      const r = await run("lzop", ["-d", "-c"], { stdin: lzopFile(blocks) });
      assertEquals(r.stdout, bytes, name);
    }
  },
});

bothPaths("lzo refuses corrupt streams with a CodecError", async () => {
  const bytes = textSample(samples()).subarray(0, 50_000);
  const packed = await encode(bytes);
  await rejects(() => decode(packed, bytes.length + 1), CodecError, /declared/);
  await rejects(
    () => decode(packed, bytes.length - 1),
    CodecError,
    /more than/,
  );
  await rejects(
    () => decode(packed.subarray(0, 100), bytes.length),
    CodecError,
    /ends early/,
  );
  await rejects(() => decode(new Uint8Array(0), 10), CodecError, /ends early/);
  // Bytes after the end marker.
  await rejects(
    () => decode(Uint8Array.of(20, 97, 98, 99, 0x11, 0, 0, 7), 3),
    CodecError,
    /follow the end marker/,
  );
  // A 2 KiB-form match reaching before the start.
  await rejects(
    () => decode(Uint8Array.of(20, 97, 98, 99, 0x4c, 9, 0x11, 0, 0), 10),
    CodecError,
    /before the start/,
  );
  // A run of zero length bytes longer than the output.
  const zeros = new Uint8Array(1000);
  await rejects(() => decode(zeros, 10), CodecError);
  await rejects(() => decode(packed, -1), CodecError, /byte count/);
  await assertJunkIsCodecError(decode);
});
