// Compressed files as wrappers: gzip, xz, bzip2 and zstd files made by the
// tools themselves decode to the exact bytes of what they packed, raw disks
// and images alike; broken ones are errors naming the container and leave
// no output.
import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  CodecError,
  convert,
  decompress,
  fromBytes,
  fromFile,
  ImageFormatError,
  memorySink,
  open,
  scratchFiles,
} from "../mod.ts";
import { decodeToScratch, detectCompression } from "../streams/compressed.ts";
import { UnsupportedError } from "../mod.ts";
import { crc32 } from "../drivers/codecs/crc32.ts";
import {
  assertBoundedWork,
  cli,
  countingSource,
  pseudoRandom,
  rejects,
  ROOT,
  run,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

/**
 * A disk of `mib` MiB: random, text and zero stretches of 64 KiB and
 * more, so that the zero runs are long enough to be holes.
 */
function sampleDisk(mib: number, seed = 5): Uint8Array<ArrayBuffer> {
  const size = mib << 20;
  const disk = new Uint8Array(size);
  const random = pseudoRandom(size, seed);
  const text = new TextEncoder().encode(
    "a line of text as a file system holds it\n".repeat(8192),
  );
  const piece = 256 << 10;
  for (let at = 0; at < size; at += piece) {
    const kind = (at / piece) % 3;
    const n = Math.min(piece, size - at);
    if (kind === 0) disk.set(random.subarray(at, at + n), at);
    if (kind === 1) disk.set(text.subarray(0, n), at);
  }
  return disk;
}

/** The tool, its compress arguments (stdin to stdout), and file suffix. */
const TOOLS = {
  gzip: { cmd: "gzip", args: ["-c"], suffix: "gz" },
  xz: { cmd: "xz", args: ["-c", "-T1"], suffix: "xz" },
  bzip2: { cmd: "bzip2", args: ["-c"], suffix: "bz2" },
  zstd: { cmd: "zstd", args: ["-q", "-c"], suffix: "zst" },
} as const;

async function pack(
  tool: keyof typeof TOOLS,
  bytes: Uint8Array,
  extra: string[] = [],
): Promise<Uint8Array> {
  const t = TOOLS[tool];
  return (await run(t.cmd, [...t.args, ...extra], { stdin: bytes })).stdout;
}

/** Converts `input` with the CLI and returns the output's sha256 and allocated bytes. */
async function cliConvert(dir: string, input: string) {
  const out = `${dir}/out.raw`;
  const r = await cli(["convert", input, out]);
  assertEquals(r.code, 0, r.stderr);
  const stat = await Deno.stat(out);
  return {
    sha: await sha256File(out),
    size: stat.size,
    allocated: (stat.blocks ?? 0) * 512,
  };
}

for (const tool of Object.keys(TOOLS) as (keyof typeof TOOLS)[]) {
  Deno.test(
    `a raw disk packed by ${tool} converts to its exact bytes, zero runs left as holes`,
    { ignore: skip([TOOLS[tool].cmd]) },
    () =>
      withTemp(async (dir) => {
        const disk = sampleDisk(4);
        const input = `${dir}/disk.img.${TOOLS[tool].suffix}`;
        await Deno.writeFile(input, await pack(tool, disk));
        const got = await cliConvert(dir, input);
        assertEquals(got.sha, sha256Hex(disk));
        assertEquals(got.size, disk.length);
        // A third of the disk is zeros: never written.
        assertTrue(got.allocated <= disk.length * 0.7, `${got.allocated}`);
        const info = await cli(["info", "--output=json", input]);
        const json = JSON.parse(info.text);
        assertEquals(json.format, "raw");
        assertEquals(json["virtual-size"], disk.length);
        // info --output=json spells detail keys as qemu-img does (dashes).
        assertEquals(json["format-specific"]?.data?.["file-compression"], tool);
        const human = await cli(["info", input]);
        assertMatch(human.text, new RegExp(`file.compression: ${tool}`));
      }),
  );

  Deno.test(
    `a truncated ${tool} file is an error naming ${tool} and leaves no output`,
    { ignore: skip([TOOLS[tool].cmd]) },
    () =>
      withTemp(async (dir) => {
        const packed = await pack(tool, sampleDisk(2));
        const input = `${dir}/disk.img.${TOOLS[tool].suffix}`;
        await Deno.writeFile(input, packed.subarray(0, packed.length - 100));
        const r = await cli(["convert", input, `${dir}/out.raw`]);
        assertEquals(r.code, 1, r.stderr);
        assertMatch(r.stderr, new RegExp(tool));
        assertEquals([...Deno.readDirSync(dir)].map((e) => e.name), [
          `disk.img.${TOOLS[tool].suffix}`,
        ]);
        await rejects(
          () => open(fromBytes(packed.subarray(0, packed.length / 2))),
          ImageFormatError,
          new RegExp(tool),
        );
      }),
  );

  Deno.test(
    `a corrupt ${tool} file (one byte changed) is an ImageFormatError naming ${tool}`,
    { ignore: skip([TOOLS[tool].cmd]) },
    async () => {
      const packed = await pack(tool, sampleDisk(2));
      // A byte in the middle of the compressed data: a checksum (or the
      // decoder itself) must notice.
      for (const at of [Math.floor(packed.length / 2), packed.length - 20]) {
        const poked = packed.slice();
        poked[at] ^= 0x55;
        await rejects(
          () => open(fromBytes(poked)),
          ImageFormatError,
          new RegExp(tool),
        );
      }
    },
  );
}

Deno.test(
  "multi-member gzip, multi-stream xz and bzip2, multi-frame zstd with skippable frames decode whole",
  { ignore: skip(["gzip", "xz", "bzip2", "zstd"]) },
  async () => {
    const a = sampleDisk(1, 7);
    const b = sampleDisk(2, 8);
    const whole = new Uint8Array(a.length + b.length);
    whole.set(a);
    whole.set(b, a.length);
    const skippable = new Uint8Array([
      0x5e,
      0x2a,
      0x4d,
      0x18,
      3,
      0,
      0,
      0,
      1,
      2,
      3,
    ]);
    const cases: Record<string, Uint8Array[]> = {
      gzip: [await pack("gzip", a), await pack("gzip", b)],
      xz: [
        await pack("xz", a),
        new Uint8Array(8),
        await pack("xz", b, ["--check=sha256"]),
      ],
      bzip2: [await pack("bzip2", a), await pack("bzip2", b)],
      zstd: [
        skippable,
        await pack("zstd", a),
        skippable,
        await pack("zstd", b, ["--no-check"]),
        skippable,
      ],
    };
    for (const [name, parts] of Object.entries(cases)) {
      const joined = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
      let at = 0;
      for (const p of parts) {
        joined.set(p, at);
        at += p.length;
      }
      const image = await open(fromBytes(joined));
      assertEquals(image.size, whole.length, name);
      assertEquals(
        sha256Hex(await image.read(0, image.size)),
        sha256Hex(whole),
        name,
      );
      assertEquals(image.details?.file_compression, name);
    }
  },
);

Deno.test(
  "xz with --block-size (many blocks) decodes to the exact bytes",
  { ignore: skip(["xz"]) },
  async () => {
    const disk = sampleDisk(3);
    const packed = await pack("xz", disk, ["--block-size=300000"]);
    const image = await open(fromBytes(packed));
    assertEquals(sha256Hex(await image.read(0, image.size)), sha256Hex(disk));
  },
);

Deno.test(
  "a qcow and a vmdk packed by xz and zstd open as their disks, as qemu-img reads them",
  { ignore: skip(["qemu-img", "xz", "zstd"]) },
  () =>
    withTemp(async (dir) => {
      const disk = sampleDisk(3);
      await Deno.writeFile(`${dir}/disk.raw`, disk);
      for (const format of ["qcow", "vmdk"]) {
        await run("qemu-img", [
          "convert",
          "-f",
          "raw",
          "-O",
          format,
          `${dir}/disk.raw`,
          `${dir}/image.${format}`,
        ]);
        await run("qemu-img", [
          "convert",
          "-O",
          "raw",
          `${dir}/image.${format}`,
          `${dir}/qemu.raw`,
        ]);
        const expected = await sha256File(`${dir}/qemu.raw`);
        const bytes = await Deno.readFile(`${dir}/image.${format}`);
        for (const tool of ["xz", "zstd"] as const) {
          const input = `${dir}/image.${format}.${TOOLS[tool].suffix}`;
          await Deno.writeFile(input, await pack(tool, bytes));
          const image = await open(await fromFile(input), {
            scratch: scratchFiles(dir),
          });
          assertEquals(image.format, format, `${format}.${tool}`);
          assertEquals(image.details?.file_compression, tool);
          await image.close?.();
          const got = await cliConvert(dir, input);
          assertEquals(got.sha, expected, `${format}.${tool}`);
        }
      }
    }),
);

Deno.test(
  "a dmg packed by gzip and bzip2 opens as the dmg's disk, as 7-Zip extracts it",
  { ignore: skip(["gzip", "bzip2", "7zz"]) },
  () =>
    withTemp(async (dir) => {
      const dmg = await Deno.readFile(`${ROOT}testdata/demo.dmg`);
      const extracted = await run("7zz", [
        "x",
        "-tdmg",
        "-so",
        `${ROOT}testdata/demo.dmg`,
      ]);
      const expected = sha256Hex(extracted.stdout);
      for (const tool of ["gzip", "bzip2"] as const) {
        const input = `${dir}/demo.dmg.${TOOLS[tool].suffix}`;
        await Deno.writeFile(input, await pack(tool, dmg));
        const image = await open(fromBytes(await Deno.readFile(input)));
        assertEquals(image.format, "dmg");
        assertEquals(
          (await convert(image, memorySink(), { hash: true })).sha256,
          expected,
        );
        assertEquals((await cliConvert(dir, input)).sha, expected);
      }
    }),
);

Deno.test("a dmg whose data starts with bzip2 magic is still a dmg (its trailer decides)", async () => {
  const dmg = await Deno.readFile(`${ROOT}testdata/demo.dmg`);
  const poked = dmg.slice();
  poked.set([0x42, 0x5a, 0x68, 0x39, 0x31, 0x41, 0x59, 0x26, 0x53, 0x59], 0);
  assertEquals(detectCompression(poked), "bzip2");
  const image = await open(fromBytes(poked)).catch((e) => e as Error);
  // Claimed by the dmg driver (it may fail reading the poked chunk, but
  // never as bzip2).
  if (image instanceof Error) {
    assertTrue(!/bzip2:/.test(image.message), image.message);
  } else assertEquals(image.format, "dmg");
});

Deno.test("a writable open of a compressed file is refused", {
  ignore: skip(["gzip"]),
}, async () => {
  const packed = await pack("gzip", new Uint8Array(4096));
  await rejects(
    () => open(fromBytes(packed), { writable: true, sink: memorySink() }),
    ImageFormatError,
    /decompress it/,
  );
});

Deno.test(
  "a many-block xz is read through its index: exact bytes, holes, and a corrupt later block fails the convert leaving no output",
  { ignore: skip(["xz"]) },
  () =>
    withTemp(async (dir) => {
      const disk = sampleDisk(4);
      const packed = await pack("xz", disk, ["--block-size=1000000"]);
      const input = `${dir}/disk.img.xz`;
      await Deno.writeFile(input, packed);
      const image = await open(fromBytes(packed));
      assertEquals(image.details?.compressed_access, "index");
      const got = await cliConvert(dir, input);
      assertEquals(got.sha, sha256Hex(disk));
      assertTrue(got.allocated <= disk.length * 0.7, `${got.allocated}`);
      await Deno.remove(`${dir}/out.raw`);
      // A byte of the fourth block's data: the index still reads, the
      // block's check does not.
      const poked = packed.slice();
      poked[Math.floor(packed.length * 0.8)] ^= 0x55;
      await Deno.writeFile(input, poked);
      const r = await cli(["convert", input, `${dir}/out.raw`]);
      assertEquals(r.code, 1, r.stderr);
      assertMatch(r.stderr, /xz/);
      assertEquals([...Deno.readDirSync(dir)].map((e) => e.name), [
        "disk.img.xz",
      ]);
    }),
);

Deno.test(
  "zstd frames that declare their sizes (cat of files packed by zstd) are read through them",
  { ignore: skip(["zstd"]) },
  () =>
    withTemp(async (dir) => {
      const a = sampleDisk(2, 11);
      const b = sampleDisk(1, 12);
      await Deno.writeFile(`${dir}/a`, a);
      await Deno.writeFile(`${dir}/b`, b);
      await run("sh", [
        "-c",
        `zstd -q -c ${dir}/a > ${dir}/d.zst && zstd -q -c --no-check ${dir}/b >> ${dir}/d.zst`,
      ]);
      const packed = await Deno.readFile(`${dir}/d.zst`);
      const image = await open(fromBytes(packed));
      assertEquals(image.details?.compressed_access, "index");
      assertEquals(image.size, a.length + b.length);
      assertEquals(sha256Hex(await image.read(0, a.length)), sha256Hex(a));
      assertEquals(
        sha256Hex(await image.read(a.length, b.length)),
        sha256Hex(b),
      );
      // The first frame's checksum, poked: its read fails naming zstd.
      const poked = packed.slice();
      const firstEnd = packed.length -
        (await run("zstd", ["-q", "-c", "--no-check", `${dir}/b`])).stdout
          .length;
      poked[firstEnd - 2] ^= 1;
      const broken = await open(fromBytes(poked)).catch((e) => e as Error);
      const error = broken instanceof Error
        ? broken
        : await broken.read(0, 4096).then(() => undefined, (e) => e as Error);
      assertTrue(error instanceof ImageFormatError, String(error));
      assertMatch(error!.message, /zstd: .*checksum mismatch/);
    }),
);

Deno.test(
  "decoding into memory stops at its limit with an UnsupportedError saying what to do",
  { ignore: skip(["gzip"]) },
  async () => {
    const packed = await pack("gzip", pseudoRandom(3 << 20, 9));
    await rejects(
      () => decodeToScratch(fromBytes(packed), "gzip", undefined, 1 << 20),
      UnsupportedError,
      /more than 1048576 bytes of data to hold in memory/,
    );
  },
);

Deno.test(
  "a scratch file leaves nothing behind in its folder",
  { ignore: skip(["bzip2"]) },
  () =>
    withTemp(async (dir) => {
      const disk = sampleDisk(2);
      const packed = await pack("bzip2", disk);
      const image = await open(fromBytes(packed), {
        scratch: scratchFiles(dir),
      });
      assertEquals(image.details?.compressed_access, "scratch");
      assertEquals([...Deno.readDirSync(dir)].length, 0);
      assertEquals(sha256Hex(await image.read(0, image.size)), sha256Hex(disk));
      await image.close?.();
    }),
);

Deno.test(
  "malformed headers are the container's errors, refused before anything is allocated by them",
  { ignore: skip(["xz", "zstd", "gzip"]) },
  async () => {
    const text = new TextEncoder().encode("hello hello hello\n".repeat(100));
    const expectError = async (bytes: Uint8Array, pattern: RegExp) => {
      const counted = countingSource(bytes);
      await rejects(() => open(counted.source), ImageFormatError, pattern);
      assertBoundedWork(counted, bytes.length, 50, 8);
    };
    // xz: a block header declaring a 4 GiB dictionary (its CRC made right).
    const xzBytes = await pack("xz", text);
    const poked = xzBytes.slice();
    poked[16] = 40;
    new DataView(poked.buffer).setUint32(
      20,
      crc32(poked.subarray(12, 20)),
      true,
    );
    await expectError(poked, /xz: .*dictionary/);
    // xz: the stream flags naming a reserved bit.
    const flags = xzBytes.slice();
    flags[6] = 0x80;
    await expectError(flags, /xz: .*stream (flags|header)/);
    // zstd: a window of 2 TiB (window descriptor 0xf8).
    const zstdBytes = await pack("zstd", text);
    const window = zstdBytes.slice();
    window[5] = 0xf8;
    await expectError(window, /zstd: .*window of 2199023255552 bytes/);
    // zstd: the reserved block type 3.
    const block = zstdBytes.slice();
    block[6] = (block[6] & ~6) | 6;
    await expectError(block, /zstd: .*reserved type 3/);
    // zstd: a frame declaring 1 TiB of content that holds 1800 bytes.
    const sized = new Uint8Array([
      0x28,
      0xb5,
      0x2f,
      0xfd,
      0xc4,
      0x58,
      0,
      0,
      0,
      0,
      0,
      1,
      0,
      0,
      ...zstdBytes.subarray(6),
    ]);
    await expectError(sized, /zstd: .*declares 1099511627776/);
    // gzip: the length of the member poked.
    const gz = await pack("gzip", text);
    const length = gz.slice();
    length[length.length - 1] ^= 1;
    await expectError(length, /gzip: /);
  },
);

Deno.test(
  "map of a compressed raw disk shows its zero runs and no host offsets; compare finds it identical to the disk",
  { ignore: skip(["gzip"]) },
  () =>
    withTemp(async (dir) => {
      const disk = sampleDisk(2);
      await Deno.writeFile(`${dir}/disk.img`, disk);
      await Deno.writeFile(`${dir}/disk.img.gz`, await pack("gzip", disk));
      const r = await cli(["map", "--output=json", `${dir}/disk.img.gz`]);
      assertEquals(r.code, 0, r.stderr);
      const runs = JSON.parse(r.text) as Record<string, unknown>[];
      assertTrue(runs.some((e) => e.zero === true), r.text);
      assertTrue(runs.every((e) => !("offset" in e)), r.text);
      const same = await cli([
        "compare",
        `${dir}/disk.img.gz`,
        `${dir}/disk.img`,
      ]);
      assertEquals(same.code, 0, same.stderr);
    }),
);

Deno.test(
  "xz stream padding: a little is read through the index, a lot through the stream, both in few reads",
  { ignore: skip(["xz"]) },
  async () => {
    const disk = sampleDisk(1);
    const packed = await pack("xz", disk);
    for (const [padding, access] of [[4096, "index"], [1 << 20, "scratch"]]) {
      const padded = new Uint8Array(packed.length + (padding as number));
      padded.set(packed);
      const counted = countingSource(padded);
      const image = await open(counted.source);
      assertEquals(image.details?.compressed_access, access);
      assertEquals(sha256Hex(await image.read(0, image.size)), sha256Hex(disk));
      assertBoundedWork(counted, padded.length, 50, 4);
    }
  },
);

Deno.test("a zstd frame whose FSE-coded Huffman weights read no bits is a typed error, not an endless loop", async () => {
  // A zstd cluster of a qemu-img qcow2 with 4 bytes set to 0xff, which the
  // fuzzer found: `zstd -t` says "Data corruption detected"; fzstd 0.1.1
  // (the decoder used before ours) looped forever in its weight decoding.
  const frame = await Deno.readFile(`${ROOT}testdata/zstd-weights-loop.zst`);
  await rejects(
    async () => {
      for await (const _ of decompress(fromBytes(frame), "zstd")) { /* */ }
    },
    CodecError,
    /more than 255 Huffman weights/,
  );
  // As a qcow2 cluster: the image's typed error, naming the cluster.
  const image = await open(
    fromBytes(await Deno.readFile(`${ROOT}testdata/zstd-weights-loop.qcow2`)),
  );
  await rejects(
    () => convert(image, memorySink()),
    ImageFormatError,
    /compressed cluster .* more than 255 Huffman weights/,
  );
});

Deno.test(
  "without shared memory (a page that is not cross-origin isolated) many-block xz and many-frame zstd still decode on the workers to the exact bytes",
  { ignore: skip(["xz", "zstd"]) },
  () =>
    withTemp(async (dir) => {
      // Segments decode into buffers shared with the workers where there
      // is shared memory; without it, into arrays the workers move back.
      const disk = sampleDisk(4);
      const xzPacked = await pack("xz", disk, ["--block-size=1000000"]);
      // zstd writes the content size of a file it packs, not of a pipe's.
      await Deno.writeFile(`${dir}/a`, disk.subarray(0, 2 << 20));
      await Deno.writeFile(`${dir}/b`, disk.subarray(2 << 20));
      await run("sh", [
        "-c",
        `zstd -q -c ${dir}/a > ${dir}/disk.img.zst && zstd -q -c ${dir}/b >> ${dir}/disk.img.zst`,
      ]);
      await Deno.writeFile(`${dir}/disk.img.xz`, xzPacked);
      const script = `
        delete globalThis.SharedArrayBuffer;
        const { open, fromBytes, decodeWorkerStats } = await import(${
        JSON.stringify(new URL("../mod.ts", import.meta.url).href)
      });
        for (const name of ["disk.img.xz", "disk.img.zst"]) {
          const image = await open(fromBytes(await Deno.readFile(${
        JSON.stringify(dir)
      } + "/" + name)));
          const bytes = await image.read(0, image.size);
          const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
          console.log(name, image.details.compressed_access,
            Array.from(hash, (b) => b.toString(16).padStart(2, "0")).join(""));
          await image.close();
        }
        console.log("jobs", decodeWorkerStats().jobs);
      `;
      const r = await run(Deno.execPath(), ["eval", script]);
      const lines = r.text.trim().split("\n");
      assertEquals(lines.slice(0, 2), [
        `disk.img.xz index ${sha256Hex(disk)}`,
        `disk.img.zst index ${sha256Hex(disk)}`,
      ]);
      assertTrue(Number(lines[2].split(" ")[1]) >= 6, lines[2]);
    }),
);

Deno.test(
  "many reads at once across the blocks of an xz and the frames of a zstd file, more than its buffers hold, each give the disk's bytes",
  { ignore: skip(["xz", "zstd"]) },
  () =>
    withTemp(async (dir) => {
      // Two or so decode buffers for a dozen blocks: reads wait for one,
      // none waits while holding one, and a block decoded ahead is not
      // handed to another block under a reader.
      const disk = sampleDisk(6, 21);
      const xzPacked = await pack("xz", disk, ["--block-size=500000"]);
      for (let at = 0; at < disk.length; at += 1 << 20) {
        await Deno.writeFile(`${dir}/${at}`, disk.subarray(at, at + (1 << 20)));
        await run("sh", ["-c", `zstd -q -c ${dir}/${at} >> ${dir}/d.zst`]);
      }
      const zstdPacked = await Deno.readFile(`${dir}/d.zst`);
      for (const packed of [xzPacked, zstdPacked]) {
        const image = await open(fromBytes(packed));
        try {
          assertEquals(image.details?.compressed_access, "index");
          const starts = Array.from(
            { length: 40 },
            (_, k) => (k * 2654435761) % (disk.length - 700000),
          );
          const reads = await Promise.all(
            starts.map((at) => image.read(at, 700000)),
          );
          for (const [k, at] of starts.entries()) {
            assertEquals(
              sha256Hex(reads[k]),
              sha256Hex(disk.subarray(at, at + 700000)),
              `at ${at}`,
            );
          }
          assertEquals(
            sha256Hex(await image.read(0, disk.length)),
            sha256Hex(disk),
          );
        } finally {
          await image.close?.();
        }
      }
    }),
);

Deno.test("opening a .gz reads its head once: the probe's bytes also tell its compression", async () => {
  const disk = pseudoRandom(64 << 10, 41);
  const packed = new Uint8Array(
    await new Response(
      new Blob([disk]).stream().pipeThrough(new CompressionStream("gzip")),
    ).arrayBuffer(),
  );
  const inner = fromBytes(packed);
  const reads: [number, number][] = [];
  const source = {
    size: inner.size,
    read(offset: number, length: number) {
      reads.push([offset, length]);
      return inner.read(offset, length);
    },
  };
  const image = await open(source);
  try {
    assertEquals(image.details?.file_compression, "gzip");
    assertEquals(await image.read(0, disk.length), disk);
    // The probe's head, and no second look at the first 16 bytes.
    const heads = reads.filter(([offset]) => offset === 0);
    assertTrue(heads.length >= 1, JSON.stringify(reads));
    assertTrue(
      !heads.some(([, length]) => length === 16),
      JSON.stringify(reads),
    );
  } finally {
    await image.close?.();
  }
});
