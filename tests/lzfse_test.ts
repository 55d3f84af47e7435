import { assertEquals, assertMatch, assertTrue as assert } from "./_asserts.ts";
import { decode, decodeInto, encode } from "../drivers/codecs/lzfse.ts";
import { concat } from "../drivers/_binary.ts";
import { KOLY_SIZE, parseKoly } from "../drivers/dmg/_koly.ts";
import { parseMish, TYPE } from "../drivers/dmg/_mish.ts";
import { parsePlist, type PlistValue } from "../drivers/dmg/_plist.ts";
import { CodecError } from "../streams/errors.ts";
import { bothPaths } from "./_codec.ts";
import { ulfoImage } from "./_ulfo.ts";
import {
  pseudoRandom,
  referenceBytes,
  referenceImages,
  rejects,
  run,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

const REFERENCE_DMG = "udif/compression-lzfse.dmg";

/**
 * Asserts two byte arrays are equal, naming the first difference (a deep
 * equality diff of megabytes would take the machine's memory).
 */
function assertBytes(actual: Uint8Array, expected: Uint8Array, what = "") {
  let at = 0;
  const n = Math.min(actual.length, expected.length);
  while (at < n && actual[at] === expected[at]) at++;
  if (at === n && actual.length === expected.length) return;
  throw new Error(
    `${what}: ${actual.length} bytes against ${expected.length}, first difference at ${at}`,
  );
}

/** The blkx tables of a dmg, parsed with the dmg helpers. */
function blockTables(dmg: Uint8Array) {
  const at = dmg.length - KOLY_SIZE;
  const koly = parseKoly(dmg.subarray(at), at, dmg.length);
  const xml = new TextDecoder().decode(
    dmg.subarray(koly.xmlOffset, koly.xmlOffset + koly.xmlLength),
  );
  const plist = parsePlist(xml, koly.xmlOffset) as Map<string, PlistValue>;
  const fork = plist.get("resource-fork") as Map<string, PlistValue>;
  const blkx = fork.get("blkx") as Map<string, PlistValue>[];
  return {
    koly,
    tables: blkx.map((entry, i) =>
      parseMish(entry.get("Data") as Uint8Array, `blkx[${i}]`)
    ),
  };
}

/** The ULFO chunks of the reference image, each with its decoded size. */
async function referenceChunks(): Promise<
  { data: Uint8Array; size: number; sector: number }[] | undefined
> {
  const dmg = await referenceBytes(REFERENCE_DMG);
  if (!dmg) return undefined;
  const { koly, tables } = blockTables(dmg);
  const chunks = [];
  for (const table of tables) {
    for (const c of table.chunks) {
      if (c.type !== TYPE.lzfse) continue;
      const start = koly.dataForkOffset + c.offset;
      chunks.push({
        data: dmg.subarray(start, start + c.length),
        size: c.sectors * 512,
        sector: c.sector,
      });
    }
  }
  return chunks;
}

bothPaths(
  "lzfse decodes the ULFO chunks of an hdiutil image to the reference disk",
  { ignore: skip([], true) },
  async () => {
    const dmg = (await referenceBytes(REFERENCE_DMG))!;
    const manifest = referenceImages().find((i) => i.path === REFERENCE_DMG)!;
    const { koly, tables } = blockTables(dmg);
    const disk = new Uint8Array(koly.sectorCount * 512);
    const kinds = new Set<string>();
    let lzfseChunks = 0;
    for (const table of tables) {
      for (const c of table.chunks) {
        const start = koly.dataForkOffset + c.offset;
        const bytes = dmg.subarray(start, start + c.length);
        if (c.type === TYPE.lzfse) {
          kinds.add(new TextDecoder().decode(bytes.subarray(0, 4)));
          disk.set(await decode(bytes, c.sectors * 512), c.sector * 512);
          lzfseChunks++;
        } else if (c.type === TYPE.raw) {
          disk.set(bytes, c.sector * 512);
        } else {
          // zero and ignore chunks read as zeros: the disk is zeroed already.
          assert(
            c.type === TYPE.zero || c.type === TYPE.ignore,
            `type ${c.type}`,
          );
        }
      }
    }
    assertEquals(lzfseChunks, 3);
    // hdiutil wrote both an LZVN block and FSE (v2) blocks.
    assertEquals([...kinds].sort(), ["bvx2", "bvxn"]);
    assertEquals(sha256Hex(disk), manifest.raw_sha256);
  },
);

/** Block kinds in a stream, in order ("bvx2", "bvxn", ...). */
function blockKinds(stream: Uint8Array): string[] {
  const v = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  const kinds: string[] = [];
  for (let at = 0;;) {
    const kind = new TextDecoder().decode(stream.subarray(at, at + 4));
    kinds.push(kind);
    if (kind === "bvx$") return kinds;
    const raw = v.getUint32(at + 4, true);
    if (kind === "bvx-") at += 8 + raw;
    else if (kind === "bvxn") at += 12 + v.getUint32(at + 8, true);
    else if (kind === "bvx1") {
      at += 772 + v.getUint32(at + 20, true) + v.getUint32(at + 24, true);
    } else {
      const w0 = v.getBigUint64(at + 8, true);
      const w1 = v.getBigUint64(at + 16, true);
      at += v.getUint32(at + 24, true) + Number((w0 >> 20n) & 0xfffffn) +
        Number((w1 >> 40n) & 0xfffffn);
    }
  }
}

const METHODS = ["lzfse", "lzvn"] as const;

bothPaths(
  "lzfse round-trips empty input, one byte, zeros, random bytes and text",
  async () => {
    const text = new TextEncoder().encode(
      Array.from(
        { length: 30000 },
        (_, i) => `line ${(i * 7919) % 1000}: the quick brown fox\n`,
      ).join(""),
    );
    const random = pseudoRandom(200000, 5);
    const zeros = new Uint8Array(3 << 20);
    const cases: [string, Uint8Array][] = [
      ["empty", new Uint8Array(0)],
      ["one byte", Uint8Array.of(0x42)],
      ["zeros", zeros],
      ["random", random],
      ["text", text],
    ];
    for (const method of METHODS) {
      for (const [name, data] of cases) {
        const packed = await encode(data, { method });
        assertBytes(
          await decode(packed, data.length),
          data,
          `${method} ${name}`,
        );
        // No stored blocks: 7-Zip cannot read them.
        assert(!blockKinds(packed).includes("bvx-"), `${method} ${name}`);
      }
      assertEquals(
        await encode(new Uint8Array(0), { method }),
        Uint8Array.of(0x62, 0x76, 0x78, 0x24),
      );
      assert((await encode(text, { method })).length < text.length / 5, method);
      // Incompressible data grows by at most 2%.
      const grown = (await encode(random, { method })).length;
      assert(grown <= random.length * 1.02, `${method}: ${grown}`);
    }
    // FSE blocks beat LZVN on long runs and text; small inputs get LZVN.
    assert((await encode(zeros)).length < 4000);
    assert(
      (await encode(text)).length <
        (await encode(text, { method: "lzvn" })).length,
    );
    assertEquals(blockKinds(await encode(text)).slice(0, 1), ["bvx2"]);
    assertEquals(blockKinds(await encode(text.subarray(0, 4095))), [
      "bvxn",
      "bvx$",
    ]);
  },
);

bothPaths(
  "lzfse round-trips repeats at distances near each opcode's and the window's limits",
  async () => {
    // LZVN: sml_d 1535, med_d 16383, lrg_d 65535, and 65536 past its window;
    // FSE: 262139 (the largest D) and 262140 past it.
    const distances = [1, 2, 7, 8, 1535, 1536, 16383, 16384, 65535, 65536];
    for (const method of METHODS) {
      const all = method === "lzfse"
        ? [...distances, 262139, 262140]
        : distances;
      for (const distance of all) {
        const data = new Uint8Array(distance + 5000);
        data.set(pseudoRandom(distance, distance));
        for (let i = distance; i < data.length; i++) {
          data[i] = data[i - distance];
        }
        // Sprinkle a few changes so matches end and restart at every length.
        for (let i = distance + 3; i < data.length; i += 97) data[i] ^= 0x55;
        const packed = await encode(data, { method });
        assertBytes(
          await decode(packed, data.length),
          data,
          `${method} distance ${distance}`,
        );
        const reachable = method === "lzfse" ? 262139 : 65535;
        if (distance <= reachable) {
          // The repeat was found: it costs far less than its 5000 bytes.
          const prefix = await encode(data.subarray(0, distance), { method });
          assert(
            packed.length < prefix.length + 1500,
            `${method} distance ${distance}: ${packed.length}`,
          );
        }
      }
    }
  },
);

/** 1 MiB of mixed data: text, zeros, random, repeats and a ramp. */
function mixedData(size = 1 << 20): Uint8Array {
  const data = new Uint8Array(size);
  const text = new TextEncoder().encode(
    "LZFSE blocks: bvx-, bvxn, bvx1, bvx2, bvx$. ".repeat(2000),
  );
  data.set(text.subarray(0, Math.min(text.length, size >> 2)), 0);
  data.set(pseudoRandom(size >> 3, 3), size >> 2);
  for (let i = size >> 1; i < (size * 3) >> 2; i++) data[i] = i & 0xff;
  const tail = (size * 7) >> 3;
  data.set(data.subarray(1000, 1000 + (size >> 3)), tail);
  return data;
}

bothPaths("lzfse round-trips 1 MiB of mixed data", async () => {
  const data = mixedData();
  const packed = await encode(data);
  assertBytes(await decode(packed, data.length), data, "mixed");
  assert(packed.length < data.length / 4, `${packed.length}`);
});

bothPaths(
  "7-Zip extracts dmgs whose ULFO chunks this encoder wrote, FSE and LZVN",
  { ignore: skip(["7zz"]) },
  async () => {
    // 4 MiB: mixed data, an all-zero MiB (a zero chunk), a MiB of random
    // bytes (incompressible), and 1 MiB of mixed data plus random bytes.
    const disk = new Uint8Array(4 << 20);
    disk.set(mixedData());
    disk.set(pseudoRandom(1 << 20, 12), 2 << 20);
    disk.set(mixedData(), 3 << 20);
    disk.set(pseudoRandom(1 << 19, 11), (3 << 20) + 4096);
    for (const method of METHODS) {
      const image = await ulfoImage(disk, { method });
      // The image reads back through the parsers and this decoder.
      const { tables } = blockTables(image);
      assertEquals(tables[0].chunks.map((c) => c.type), [
        TYPE.lzfse,
        TYPE.zero,
        TYPE.lzfse,
        TYPE.lzfse,
      ]);
      await withTemp(async (dir) => {
        await Deno.writeFile(`${dir}/ulfo.dmg`, image);
        const list = await run("7zz", ["l", "-tdmg", `${dir}/ulfo.dmg`]);
        // 7-Zip sees the LZFSE chunks (and checks the partition's CRC-32).
        assertMatch(list.text, /Method = .*LZFSE/);
        const out = await run("7zz", ["x", "-tdmg", "-so", `${dir}/ulfo.dmg`]);
        assertEquals(out.stdout.length, disk.length, method);
        assert(
          sha256Hex(out.stdout) === sha256Hex(disk),
          `${method}: bytes differ`,
        );
      });
    }
  },
);

// ---------------------------------------------------------------------------
// Malformed streams.

bothPaths("lzfse refuses output longer or shorter than declared", async () => {
  const data = new TextEncoder().encode("hello hello hello hello hello");
  const packed = await encode(data);
  await rejects(
    () => decode(packed, data.length - 1),
    CodecError,
    /pass the expected size/,
  );
  await rejects(
    () => decode(packed, data.length + 1),
    CodecError,
    /decodes to 29 bytes, expected 30/,
  );
  await rejects(() => decode(packed, -1), CodecError, /not a byte count/);
  // bvx2 blocks: this encoder's, and hdiutil's when available.
  const mixed = mixedData(100000);
  const own = { data: await encode(mixed), size: mixed.length };
  const chunks = [own, ...(await referenceChunks() ?? [])];
  for (const c of chunks) {
    await rejects(
      () => decode(c.data, c.size - 1),
      CodecError,
      /pass the expected size/,
    );
    await rejects(
      () => decode(c.data, c.size + 1),
      CodecError,
      new RegExp(`decodes to ${c.size} bytes, expected ${c.size + 1}`),
    );
  }
  // A size no buffer can hold is refused, not a RangeError.
  await rejects(
    () => decode(packed, 2 ** 52),
    CodecError,
    /cannot be allocated/,
  );
});

bothPaths(
  "lzfse refuses truncated streams and streams without bvx$",
  async () => {
    const data = mixedData(200000);
    const streams = [await encode(data)];
    const chunks = await referenceChunks();
    const sizes = [data.length];
    for (const c of chunks ?? []) {
      streams.push(c.data);
      sizes.push(c.size);
    }
    for (let s = 0; s < streams.length; s++) {
      const packed = streams[s];
      for (
        const cut of [
          0,
          1,
          3,
          4,
          11,
          12,
          40,
          packed.length >> 1,
          packed.length - 5,
          packed.length - 4,
          packed.length - 1,
        ]
      ) {
        await rejects(
          () => decode(packed.subarray(0, cut), sizes[s]),
          CodecError,
        );
      }
    }
    // A whole stream with its end marker replaced by another block's start.
    const noEnd = streams[0].slice();
    noEnd.set([0x62, 0x76, 0x78, 0x2d], noEnd.length - 4); // bvx- with no size
    await rejects(() => decode(noEnd, data.length), CodecError, /truncated/);
    await rejects(
      () => decode(new Uint8Array(0), 0),
      CodecError,
      /empty input/,
    );
  },
);

bothPaths("lzfse refuses a poked block magic", async () => {
  const packed = await encode(new Uint8Array(5000));
  for (const [at, value] of [[0, 0x61], [3, 0x33], [packed.length - 1, 0x25]]) {
    const bad = packed.slice();
    bad[at] = value;
    await rejects(() => decode(bad, 5000), CodecError, /bad block magic/);
  }
});

/** A bvx2 chunk of the reference image, when ../shared is there. */
async function v2Chunk() {
  const chunks = await referenceChunks();
  return chunks?.find((c) =>
    new TextDecoder().decode(c.data.subarray(0, 4)) === "bvx2"
  );
}

/** A bvx2 stream of this encoder's to poke (hdiutil's has tests of its own). */
async function v2Sample(): Promise<{ data: Uint8Array; size: number }> {
  const data = mixedData(100000);
  return { data: await encode(data), size: data.length };
}

bothPaths(
  "lzfse refuses bvx2 headers with wrong frequency tables or fields",
  async () => {
    await pokeV2Header(await v2Sample());
  },
);

bothPaths(
  "lzfse refuses hdiutil's bvx2 chunk with wrong frequency tables or fields",
  { ignore: skip([], true) },
  async () => {
    await pokeV2Header((await v2Chunk())!);
  },
);

async function pokeV2Header(chunk: { data: Uint8Array; size: number }) {
  const headerSize = new DataView(
    chunk.data.buffer,
    chunk.data.byteOffset,
  ).getUint32(24, true);
  // Every byte of the packed frequency tables changed in turn: a table that
  // no longer sums to its states, or a code running past header_size, is
  // refused; a change that keeps both right must still not crash or hang.
  let refused = 0;
  for (let at = 32; at < headerSize; at++) {
    for (const flip of [0x01, 0x10, 0x80]) {
      const bad = chunk.data.slice();
      bad[at] ^= flip;
      try {
        await decode(bad, chunk.size);
      } catch (e) {
        assert(e instanceof CodecError, String(e));
        refused++;
      }
    }
  }
  assert(refused > (headerSize - 32) * 2, `${refused}`);
  const poke = (at: number, value: number) => {
    const bad = chunk.data.slice();
    bad[at] = value;
    return bad;
  };
  // header_size past the tables' largest size, and below the fixed part.
  await rejects(
    () => decode(poke(25, 0x10), chunk.size),
    CodecError,
    /header_size/,
  );
  await rejects(() => decode(poke(24, 0x04), chunk.size), CodecError);
  // n_matches past 10000 (bits 40-59 of the first word: byte 13..15).
  await rejects(
    () => decode(poke(15, 0x0f), chunk.size),
    CodecError,
    /n_matches/,
  );
  // n_literals past 40000 (bits 0-19 of the first word).
  const manyLiterals = chunk.data.slice();
  manyLiterals[10] |= 0x0f;
  await rejects(
    () => decode(manyLiterals, chunk.size),
    CodecError,
    /n_literals/,
  );
}

/** An LZVN block by hand: 12-byte header, opcodes, end-of-stream. */
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

bothPaths(
  "lzfse decodes hand-made LZVN opcodes and refuses bad distances",
  async () => {
    // "abc" as a literal, then a match of 6 at distance 3 (sml_d, L=0).
    const good = lzvnStream(9, [0xe3, 0x61, 0x62, 0x63, 0x18, 0x03]);
    assertEquals(new TextDecoder().decode(await decode(good, 9)), "abcabcabc");
    // Distance 4 with only 3 bytes written.
    await rejects(
      () => decode(lzvnStream(9, [0xe3, 0x61, 0x62, 0x63, 0x18, 0x04]), 9),
      CodecError,
      /distance 4 reaches before the start/,
    );
    // Distance 0.
    await rejects(
      () => decode(lzvnStream(9, [0xe3, 0x61, 0x62, 0x63, 0x18, 0x00]), 9),
      CodecError,
      /distance 0/,
    );
    // A match-only opcode before any distance was set.
    await rejects(
      () => decode(lzvnStream(3, [0xf3]), 3),
      CodecError,
      /distance 0/,
    );
    // Undefined opcodes.
    for (const op of [0x1e, 0x70, 0xd5]) {
      await rejects(
        () => decode(lzvnStream(3, [op, 0, 0, 0]), 3),
        CodecError,
        /undefined/,
      );
    }
    // Bytes left in the payload after end-of-stream, and a block that ends short.
    const extra = lzvnStream(3, [0xe3, 0x61, 0x62, 0x63]);
    new DataView(extra.buffer).setUint32(8, 13, true);
    await rejects(() => decode(extra, 3), CodecError);
    await rejects(
      () => decode(lzvnStream(4, [0xe3, 0x61, 0x62, 0x63]), 4),
      CodecError,
      /short of n_raw_bytes/,
    );
    // A literal writing past n_raw_bytes.
    await rejects(
      () => decode(lzvnStream(2, [0xe3, 0x61, 0x62, 0x63]), 3),
      CodecError,
      /past n_raw_bytes/,
    );
  },
);

bothPaths("lzfse refuses bad distances in FSE blocks", async () => {
  await flipLmd(await v2Sample());
});

bothPaths("lzfse refuses bad distances in hdiutil's FSE chunk", {
  ignore: skip([], true),
}, async () => {
  await flipLmd((await v2Chunk())!);
});

async function flipLmd(chunk: { data: Uint8Array; size: number }) {
  // Flipping bits across the L/M/D payload of a bvx2 stream must give a
  // typed error (most often a distance or size error) or the wrong bytes,
  // never a crash or a hang.
  const good = await decode(chunk.data, chunk.size);
  const errors = new Map<string, number>();
  for (let at = chunk.data.length - 5; at > chunk.data.length - 400; at -= 3) {
    const bad = chunk.data.slice();
    bad[at] ^= 0x5a;
    try {
      const out = await decode(bad, chunk.size);
      assert(out.length === chunk.size);
    } catch (e) {
      assert(e instanceof CodecError, String(e));
      const kind =
        /distance|n_raw_bytes|n_literals|ends|padding/.exec(e.message)?.[0] ??
          e.message;
      errors.set(kind, (errors.get(kind) ?? 0) + 1);
    }
  }
  assert(errors.has("distance"), [...errors.keys()].join(", "));
  assert(good.length === chunk.size);
}

bothPaths(
  "lzfse decodes stored blocks, and matches reaching into an earlier block",
  async () => {
    const hello = new TextEncoder().encode("hello");
    const stream = new Uint8Array(8 + 5 + 12 + 10 + 4);
    const v = new DataView(stream.buffer);
    stream.set([0x62, 0x76, 0x78, 0x2d]); // bvx-
    v.setUint32(4, 5, true);
    stream.set(hello, 8);
    stream.set([0x62, 0x76, 0x78, 0x6e], 13); // bvxn: 5 bytes from 5 back
    v.setUint32(17, 5, true);
    v.setUint32(21, 10, true);
    stream.set([0x10, 0x05, 0x06, 0, 0, 0, 0, 0, 0, 0], 25);
    stream.set([0x62, 0x76, 0x78, 0x24], 35);
    assertEquals(
      new TextDecoder().decode(await decode(stream, 10)),
      "hellohello",
    );
    // The stored block cut short.
    await rejects(
      () => decode(stream.subarray(0, 11), 10),
      CodecError,
      /truncated/,
    );
    // A stored block longer than the declared output.
    await rejects(
      () => decode(stream, 4),
      CodecError,
      /pass the expected size/,
    );
  },
);

/**
 * Rewrites every bvx2 block of a stream as bvx1 (the same payloads after
 * a 772-byte header with plain fields), reading the packed frequencies
 * with a decoder written differently from the codec's table-driven one.
 */
function toV1(stream: Uint8Array): Uint8Array {
  const v = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  const parts: Uint8Array[] = [];
  let at = 0;
  for (;;) {
    const kind = new TextDecoder().decode(stream.subarray(at, at + 4));
    if (kind === "bvx$") break;
    assertEquals(kind, "bvx2");
    const w0 = v.getBigUint64(at + 8, true);
    const w1 = v.getBigUint64(at + 16, true);
    const w2 = v.getBigUint64(at + 24, true);
    const field = (w: bigint, shift: number, bits: number) =>
      Number((w >> BigInt(shift)) & ((1n << BigInt(bits)) - 1n));
    const headerSize = field(w2, 0, 32);
    const literalPayload = field(w0, 20, 20);
    const lmdPayload = field(w1, 40, 20);
    const freqs: number[] = [];
    let bit = 8 * (at + 32);
    const bits = (n: number) => {
      let x = 0;
      for (let i = 0; i < n; i++) {
        x |= ((stream[(bit + i) >> 3] >> ((bit + i) & 7)) & 1) << i;
      }
      return x;
    };
    for (let i = 0; i < 360; i++) {
      const x = bits(14);
      const [n, f] = !(x & 1)
        ? [2, (x >> 1) & 1]
        : !(x & 2)
        ? [3, 2 + ((x >> 2) & 1)]
        : !(x & 4)
        ? [5, 4 + ((x >> 3) & 3)]
        : !(x & 8)
        ? [8, 8 + ((x >> 4) & 15)]
        : [14, 24 + ((x >> 4) & 0x3ff)];
      freqs.push(f);
      bit += n;
    }
    const h = new Uint8Array(772);
    const hv = new DataView(h.buffer);
    h.set([0x62, 0x76, 0x78, 0x31]);
    hv.setUint32(4, v.getUint32(at + 4, true), true);
    hv.setUint32(8, literalPayload + lmdPayload, true);
    hv.setUint32(12, field(w0, 0, 20), true);
    hv.setUint32(16, field(w0, 40, 20), true);
    hv.setUint32(20, literalPayload, true);
    hv.setUint32(24, lmdPayload, true);
    hv.setInt32(28, field(w0, 60, 3) - 7, true);
    for (let i = 0; i < 4; i++) {
      hv.setUint16(32 + 2 * i, field(w1, 10 * i, 10), true);
    }
    hv.setInt32(40, field(w1, 60, 3) - 7, true);
    hv.setUint16(44, field(w2, 32, 10), true);
    hv.setUint16(46, field(w2, 42, 10), true);
    hv.setUint16(48, field(w2, 52, 10), true);
    freqs.forEach((f, i) => hv.setUint16(50 + 2 * i, f, true));
    const payloadStart = at + headerSize;
    const payloadEnd = payloadStart + literalPayload + lmdPayload;
    parts.push(h, stream.subarray(payloadStart, payloadEnd));
    at = payloadEnd;
  }
  parts.push(stream.subarray(at, at + 4));
  return concat(parts);
}

bothPaths(
  "lzfse decodes bvx1 blocks (uncompressed tables) like the bvx2 blocks they mirror",
  async () => {
    // Eight-letter noise: short matches and many literals, so several blocks.
    const data = pseudoRandom(300000, 21).map((b) => 0x61 + (b & 7));
    const v2 = await encode(data);
    const v1 = toV1(v2);
    assert(blockKinds(v1).filter((k) => k === "bvx1").length >= 2);
    assertBytes(await decode(v1, data.length), data, "bvx1");
    const chunk = await v2Chunk();
    if (chunk) {
      assertBytes(
        await decode(toV1(chunk.data), chunk.size),
        await decode(chunk.data, chunk.size),
        "hdiutil's chunk as bvx1",
      );
    }
    // A v1 literal frequency pushed past the table's 1024 states.
    const bad = v1.slice();
    new DataView(bad.buffer).setUint16(50 + 2 * 104, 2000, true);
    await rejects(
      () => decode(bad, data.length),
      CodecError,
      /literal frequencies sum to/,
    );
  },
);

/** Damages each sample at random 300 times: a CodecError or the right length, never a crash or a hang. */
async function damageRandomly(samples: { data: Uint8Array; size: number }[]) {
  let seed = 7;
  const next = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0);
  let refused = 0;
  for (const sample of samples) {
    for (let round = 0; round < 300; round++) {
      const bad = sample.data.slice();
      for (let k = 1 + (next() % 4); k > 0; k--) {
        bad[next() % bad.length] ^= 1 << (next() % 8);
      }
      try {
        const out = await decode(bad, sample.size);
        assertEquals(out.length, sample.size);
      } catch (e) {
        assert(e instanceof CodecError, `${(e as Error).name}: ${e}`);
        refused++;
      }
    }
  }
  assert(refused > 0);
}

bothPaths(
  "lzfse turns randomly damaged streams into CodecErrors or bytes, never a crash or a hang",
  async () => {
    const data = mixedData(20000);
    await damageRandomly([
      { data: await encode(data), size: data.length },
      { data: await encode(data, { method: "lzvn" }), size: data.length },
    ]);
  },
);

bothPaths(
  "lzfse turns randomly damaged hdiutil chunks into CodecErrors or bytes",
  { ignore: skip([], true) },
  async () => {
    await damageRandomly((await referenceChunks())!);
  },
);

bothPaths(
  "lzfse decodeInto fills the caller's buffer (FSE and LZVN streams) and refuses a wrong size",
  async () => {
    const data = mixedData(300_000);
    for (const method of METHODS) {
      const packed = await encode(data, { method });
      const out = new Uint8Array(data.length);
      await decodeInto(packed, out);
      assertBytes(out, data, method);
      await rejects(
        () => decodeInto(packed, new Uint8Array(data.length + 1)),
        CodecError,
      );
    }
  },
);
