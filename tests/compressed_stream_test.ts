// Compressed files decoded straight into a raw output (OpenOptions.unpackTo,
// what `convert disk.img.zst out.raw` does; issue 15): one decode, no
// scratch store, the tools' own bytes; an image that is not raw goes
// through scratch (found from its head) or is converted again from the
// output (found at its end); an error found after bytes were written
// fails the convert and leaves no output.
import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  fromBytes,
  ImageFormatError,
  memorySink,
  open,
  type Source,
  type UnpackTarget,
} from "../mod.ts";
import { openCompressed } from "../streams/compressed.ts";
import { fileDataRanges } from "../streams/_file_copy.ts";
import {
  cli,
  countingSource,
  pseudoRandom,
  rejects,
  run,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

/** A disk of `mib` MiB: random, text and zero stretches (the zeros are holes). */
function sampleDisk(mib: number, seed = 3): Uint8Array<ArrayBuffer> {
  const disk = new Uint8Array(mib << 20);
  let x = seed;
  const text = new TextEncoder().encode("a line of a text file on the disk\n");
  const piece = 192 << 10;
  for (let at = 0; at < disk.length; at += piece) {
    const kind = (at / piece) % 3;
    const end = Math.min(disk.length, at + piece);
    for (let i = at; i < end; i++) {
      if (kind === 0) {
        x = (x * 1103515245 + 12345) >>> 0;
        disk[i] = x >>> 24;
      } else if (kind === 1) disk[i] = text[i % text.length];
    }
  }
  return disk;
}

/** Packs `bytes` with `cmd args` (stdin to stdout). */
async function pack(cmd: string, args: string[], bytes: Uint8Array) {
  return (await run(cmd, args, { stdin: bytes })).stdout;
}

/** What the tool itself decodes `packed` to. */
async function toolDecodes(cmd: string, packed: Uint8Array) {
  return (await run(cmd, ["-dc"], { stdin: packed })).stdout;
}

function join(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** An unpack target over a memory sink, counting its opens. */
function memoryTarget() {
  const sink = memorySink();
  let opens = 0;
  const target: UnpackTarget = {
    open() {
      opens++;
      return Promise.resolve(sink);
    },
  };
  return { sink, target, opens: () => opens };
}

const SKIPPABLE = new Uint8Array([0x5e, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);

/** Each case: its tool, and how it packs the two halves of a disk. */
const CASES: {
  name: string;
  tool: string;
  pack: (a: Uint8Array, b: Uint8Array) => Promise<Uint8Array>;
  /** A second half of 72 MiB (mostly zeros): an xz block of more than 64 MiB is not read through the index. */
  big?: boolean;
}[] = [
  {
    name: "gzip, one member",
    tool: "gzip",
    pack: (a, b) => pack("gzip", ["-c"], join(a, b)),
  },
  {
    name: "gzip, two members",
    tool: "gzip",
    pack: async (a, b) =>
      join(await pack("gzip", ["-c"], a), await pack("gzip", ["-c"], b)),
  },
  {
    name: "zstd, one frame",
    tool: "zstd",
    pack: (a, b) => pack("zstd", ["-q", "-c"], join(a, b)),
  },
  {
    name: "zstd, two frames and skippable frames",
    tool: "zstd",
    pack: async (a, b) =>
      join(
        SKIPPABLE,
        await pack("zstd", ["-q", "-c"], a),
        SKIPPABLE,
        await pack("zstd", ["-q", "-c", "--no-check", "-9"], b),
      ),
  },
  {
    name: "xz, one block",
    tool: "xz",
    big: true,
    pack: (a, b) => pack("xz", ["-c", "-T1", "-1"], join(a, b)),
  },
  {
    name: "xz, two streams and padding",
    tool: "xz",
    big: true,
    pack: async (a, b) =>
      join(
        await pack("xz", ["-c", "-T1"], a),
        new Uint8Array(8),
        await pack("xz", ["-c", "-T1", "-1", "--check=sha256"], b),
      ),
  },
  {
    name: "bzip2, two streams",
    tool: "bzip2",
    pack: async (a, b) =>
      join(await pack("bzip2", ["-c"], a), await pack("bzip2", ["-c"], b)),
  },
];

for (const c of CASES) {
  Deno.test(
    `${c.name}: a raw disk decodes once, straight into the output, to the bytes ${c.tool} -dc gives`,
    { ignore: skip([c.tool]) },
    async () => {
      const a = sampleDisk(2, 1);
      const b = c.big
        ? join(new Uint8Array(70 << 20), sampleDisk(2, 2))
        : sampleDisk(3, 2);
      const packed = await c.pack(a, b);
      const expected = await toolDecodes(c.tool, packed);
      assertEquals(expected.length, a.length + b.length);
      const counted = countingSource(packed);
      const { sink, target, opens } = memoryTarget();
      const image = await open(counted.source, { unpackTo: target });
      assertEquals(target.outcome, "raw");
      assertEquals(opens(), 1);
      assertEquals(image.format, "raw");
      assertEquals(image.size, expected.length);
      assertEquals(image.details?.compressed_access, "output");
      assertEquals(sha256Hex(sink.bytes()), sha256Hex(expected));
      // One pass over the compressed bytes (the container's own look at
      // its end aside).
      assertTrue(
        counted.bytesRead() <= packed.length + (1 << 20),
        `${counted.bytesRead()} bytes read of ${packed.length}`,
      );
      // The image reads back what was written, zero runs as zero.
      assertEquals(
        sha256Hex(await image.read(0, image.size)),
        sha256Hex(expected),
      );
      let zero = 0;
      for await (const run of image.extents(0, image.size)) {
        if (run.kind === "zero") zero += run.length;
      }
      assertTrue(zero >= expected.length / 4, `${zero} zero bytes`);
      await image.close?.();
    },
  );
}

Deno.test(
  "the command line converts a one-frame .zst (zstd -T0 from a file) to zstd -dc's bytes, zero runs as holes",
  { ignore: skip(["zstd"]) },
  () =>
    withTemp(async (dir) => {
      // More than 64 MiB in one frame: not read through frames.
      const disk = sampleDisk(72, 4);
      await Deno.writeFile(`${dir}/disk.img`, disk);
      await run("zstd", ["-q", "-T0", `${dir}/disk.img`]);
      await Deno.remove(`${dir}/disk.img`);
      const r = await cli(["convert", `${dir}/disk.img.zst`, `${dir}/out.raw`]);
      assertEquals(r.code, 0, r.stderr);
      await run("sh", [
        "-c",
        `zstd -dc ${dir}/disk.img.zst > ${dir}/zstd.raw`,
      ]);
      assertEquals(
        await sha256File(`${dir}/out.raw`),
        await sha256File(`${dir}/zstd.raw`),
      );
      const stat = await Deno.stat(`${dir}/out.raw`);
      assertEquals(stat.size, disk.length);
      assertTrue((stat.blocks ?? 0) * 512 <= disk.length * 0.7);
      const names = [...Deno.readDirSync(dir)].map((e) => e.name).sort();
      assertEquals(names, ["disk.img.zst", "out.raw", "zstd.raw"]);
    }),
);

Deno.test(
  "an xz of many blocks is still read through its index (on the workers), not decoded into the output",
  { ignore: skip(["xz"]) },
  async () => {
    const disk = sampleDisk(3, 5);
    const packed = await pack("xz", ["-c", "--block-size=500000"], disk);
    const { target, opens } = memoryTarget();
    const image = await open(fromBytes(packed), { unpackTo: target });
    assertEquals(target.outcome, undefined);
    assertEquals(opens(), 0);
    assertEquals(image.details?.compressed_access, "index");
    assertEquals(sha256Hex(await image.read(0, image.size)), sha256Hex(disk));
    await image.close?.();
  },
);

/** Each tool, and where its checksum at the end of `packed` lies. */
const CHECKSUMS: {
  tool: string;
  args: string[];
  at: (p: Uint8Array) => number;
  suffix: string;
}[] = [
  // The frame's content checksum: its last 4 bytes.
  { tool: "zstd", args: ["-q", "-c"], suffix: "zst", at: (p) => p.length - 2 },
  // The member's CRC-32, before its length.
  { tool: "gzip", args: ["-c"], suffix: "gz", at: (p) => p.length - 7 },
  // The block's CRC-64, just before the index (the footer's backward size
  // says where that begins).
  {
    tool: "xz",
    args: ["-c", "-T1", "-1"],
    suffix: "xz",
    at: (p) => {
      const view = new DataView(p.buffer, p.byteOffset, p.length);
      const index = (view.getUint32(p.length - 8, true) + 1) * 4;
      return p.length - 12 - index - 1;
    },
  },
  // The stream's combined CRC: the last bits of the file.
  { tool: "bzip2", args: ["-c"], suffix: "bz2", at: (p) => p.length - 1 },
];

for (const c of CHECKSUMS) {
  Deno.test(
    `a ${c.tool} file whose checksum at the end does not match fails the convert after its bytes were written: a typed error naming the file, exit 1, no output left`,
    { ignore: skip([c.tool]) },
    () =>
      withTemp(async (dir) => {
        // Larger than the buffers decoded bytes wait in: some are written
        // before the checksum is read.
        // An xz block of more than 64 MiB: not read through the index.
        const disk = c.tool === "xz"
          ? join(sampleDisk(12, 6), new Uint8Array(60 << 20))
          : sampleDisk(12, 6);
        const packed = await pack(c.tool, c.args, disk);
        const poked = packed.slice();
        poked[c.at(poked)] ^= 0xff;
        // The tool itself refuses it.
        const theirs = await run(c.tool, ["-dc"], {
          stdin: poked,
          allowFail: true,
        });
        assertTrue(theirs.code !== 0, `${c.tool} -dc took it`);
        const { sink, target } = memoryTarget();
        const named = { ...fromBytes(poked), name: `disk.img.${c.suffix}` };
        const e = await rejects(
          () => open(named, { unpackTo: target }),
          ImageFormatError,
        );
        assertMatch(
          e.message,
          new RegExp(`disk\\.img\\.${c.suffix}: ${c.tool}: `),
        );
        assertMatch(e.message, /check|crc|checksum/i);
        // The error came after the disk was decoded into the output.
        assertTrue(sink.size >= 4 << 20, `${sink.size} bytes written`);
        const input = `${dir}/disk.img.${c.suffix}`;
        await Deno.writeFile(input, poked);
        const r = await cli(["convert", input, `${dir}/out.raw`]);
        assertEquals(r.code, 1, r.stderr);
        assertMatch(
          r.stderr,
          new RegExp(`disk\\.img\\.${c.suffix}: ${c.tool}: `),
        );
        assertEquals([...Deno.readDirSync(dir)].map((e) => e.name), [
          `disk.img.${c.suffix}`,
        ]);
      }),
  );
}

Deno.test(
  "a truncated one-frame .zst fails the convert after bytes were written: typed error, exit 1, no output left",
  { ignore: skip(["zstd"]) },
  () =>
    withTemp(async (dir) => {
      const packed = await pack("zstd", ["-q", "-c"], sampleDisk(12, 7));
      const cut = packed.subarray(0, packed.length - 1000);
      const { sink, target } = memoryTarget();
      await rejects(
        () => open(fromBytes(cut), { unpackTo: target }),
        ImageFormatError,
        /zstd: .*truncated/,
      );
      assertTrue(sink.size > 0);
      await Deno.writeFile(`${dir}/disk.img.zst`, cut);
      const r = await cli(["convert", `${dir}/disk.img.zst`, `${dir}/out.raw`]);
      assertEquals(r.code, 1, r.stderr);
      assertMatch(r.stderr, /disk\.img\.zst: zstd: .*truncated/);
      assertEquals([...Deno.readDirSync(dir)].map((e) => e.name), [
        "disk.img.zst",
      ]);
    }),
);

Deno.test(
  "a qcow2 inside a .zst is found from its head and goes through scratch, as qemu-img reads it",
  { ignore: skip(["zstd", "qemu-img"]) },
  () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/disk.raw`, sampleDisk(4, 8));
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        `${dir}/disk.raw`,
        `${dir}/disk.qcow2`,
      ]);
      const bytes = await Deno.readFile(`${dir}/disk.qcow2`);
      const packed = await pack("zstd", ["-q", "-c"], bytes);
      const { target, opens } = memoryTarget();
      const image = await open(fromBytes(packed), { unpackTo: target });
      assertEquals(image.format, "qcow2");
      assertEquals(image.details?.compressed_access, "scratch");
      assertEquals(target.outcome, undefined);
      assertEquals(opens(), 0);
      await image.close?.();
      await Deno.writeFile(`${dir}/disk.qcow2.zst`, packed);
      const r = await cli([
        "convert",
        `${dir}/disk.qcow2.zst`,
        `${dir}/out.raw`,
      ]);
      assertEquals(r.code, 0, r.stderr);
      assertEquals(
        await sha256File(`${dir}/out.raw`),
        await sha256File(`${dir}/disk.raw`),
      );
    }),
);

Deno.test(
  "a fixed VHD inside a .zst looks raw from its head: found by its footer at the end, converted again from the output, as qemu-img reads it",
  { ignore: skip(["zstd", "qemu-img"]) },
  () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/disk.raw`, sampleDisk(4, 9));
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed,force_size=on",
        `${dir}/disk.raw`,
        `${dir}/disk.vhd`,
      ]);
      await run("qemu-img", [
        "convert",
        "-f",
        "vpc",
        "-O",
        "raw",
        `${dir}/disk.vhd`,
        `${dir}/qemu.raw`,
      ]);
      const bytes = await Deno.readFile(`${dir}/disk.vhd`);
      const packed = await pack("zstd", ["-q", "-c"], bytes);
      const { sink, target } = memoryTarget();
      const image = await open(fromBytes(packed), { unpackTo: target });
      assertEquals(target.outcome, "scratch");
      assertEquals(image.format, "vpc");
      // The output held the decoded file: the image reads from it.
      assertEquals(sha256Hex(sink.bytes()), sha256Hex(bytes));
      await image.close?.();
      await Deno.writeFile(`${dir}/disk.vhd.zst`, packed);
      const r = await cli(["convert", `${dir}/disk.vhd.zst`, `${dir}/out.raw`]);
      assertEquals(r.code, 0, r.stderr);
      assertEquals(
        await sha256File(`${dir}/out.raw`),
        await sha256File(`${dir}/qemu.raw`),
      );
      assertEquals(
        [...Deno.readDirSync(dir)].map((e) => e.name).sort(),
        [
          "disk.raw",
          "disk.vhd",
          "disk.vhd.zst",
          "out.raw",
          "qemu.raw",
        ],
      );
    }),
);

Deno.test(
  "an output that cannot be resized still ends at the disk's size, holes at its end included, its last byte kept",
  { ignore: skip(["zstd"]) },
  async () => {
    for (const last of [0, 7]) {
      const disk = join(sampleDisk(9, 10), new Uint8Array(1 << 20));
      disk[disk.length - 1] = last;
      const packed = await pack("zstd", ["-q", "-c"], disk);
      const memory = memorySink();
      const sink = {
        get size() {
          return memory.size;
        },
        read: (offset: number, length: number) => memory.read(offset, length),
        write: (offset: number, bytes: Uint8Array) =>
          memory.write(offset, bytes),
        flush: () => memory.flush(),
        close: () => memory.close(),
      };
      const target: UnpackTarget = { open: () => Promise.resolve(sink) };
      const image = await open(fromBytes(packed), { unpackTo: target });
      assertEquals(target.outcome, "raw");
      assertEquals(memory.size, disk.length);
      assertEquals(sha256Hex(memory.bytes()), sha256Hex(disk));
      await image.close?.();
    }
  },
);

/**
 * 10 MiB + 1000 bytes: random bytes with zero runs of every kind (whole
 * 64 KiB granules across a 4 MiB buffer's end, a 4 KiB block inside
 * data, 8 KiB that cover one whole block only, and the last 64 KiB and
 * 1000 bytes).
 */
function holedDisk(): Uint8Array<ArrayBuffer> {
  const MIB = 1 << 20;
  const disk = pseudoRandom(10 * MIB + 1000, 31);
  disk.fill(0, 3.5 * MIB, 5 * MIB);
  disk.fill(0, 6 * MIB + 8192, 6 * MIB + 12288);
  disk.fill(0, 7 * MIB + 2048, 7 * MIB + 10240);
  disk.fill(0, 10 * MIB - 65536);
  return disk;
}

Deno.test(
  "a compressed disk decoded into its output writes every 4 KiB block that holds data and no other, and maps its 64 KiB zero granules as zero",
  { ignore: skip(["gzip"]) },
  async () => {
    const disk = holedDisk();
    const packed = await pack("gzip", ["-c"], disk);
    const memory = memorySink();
    const block = 4096;
    const written = new Uint8Array(Math.ceil(disk.length / block));
    const sink = Object.assign(Object.create(memory), {
      write(offset: number, bytes: Uint8Array) {
        for (let b = offset / block; b * block < offset + bytes.length; b++) {
          written[b] = 1;
        }
        return memory.write(offset, bytes);
      },
    });
    const target: UnpackTarget = { open: () => Promise.resolve(sink) };
    // The decoded bytes as the inner image sees them, with their map.
    let decoded: Source | undefined;
    const image = await openCompressed(
      fromBytes(packed),
      "gzip",
      { unpackTo: target },
      (bytes) => open(decoded = bytes, { format: "raw" }),
    );
    try {
      assertEquals(target.outcome, "raw");
      assertEquals(sha256Hex(memory.bytes()), sha256Hex(disk));
      const data = Array.from(
        written,
        (_, b) =>
          disk.subarray(b * block, (b + 1) * block).some((x) => x !== 0)
            ? 1
            : 0,
      );
      assertEquals([...written], data);
      // The map the decode kept: its 64 KiB granules that are all zeros
      // (the last one's part within the disk).
      const zero: [number, number][] = [];
      for await (const e of decoded!.extents!(0, disk.length)) {
        if (e.kind === "zero") zero.push([e.offset, e.offset + e.length]);
      }
      const MIB = 1 << 20;
      assertEquals(zero, [
        [3.5 * MIB, 5 * MIB],
        [10 * MIB - (1 << 16), disk.length],
      ]);
    } finally {
      await image.close?.();
    }
  },
);

Deno.test(
  "the command line converts a .gz with zero runs to a file with the holes cp --sparse=always makes of the disk",
  { ignore: skip(["gzip", "cp"]) || Deno.build.os !== "linux" },
  () =>
    withTemp(async (dir) => {
      const disk = holedDisk();
      await Deno.writeFile(`${dir}/disk.img`, disk);
      await run("cp", ["--sparse=always", `${dir}/disk.img`, `${dir}/cp.raw`]);
      await run("gzip", [`${dir}/disk.img`]);
      const r = await cli(["convert", `${dir}/disk.img.gz`, `${dir}/out.raw`]);
      assertEquals(r.code, 0, r.stderr);
      assertEquals(await sha256File(`${dir}/out.raw`), sha256Hex(disk));
      const blocks = async (p: string) => (await Deno.stat(p)).blocks;
      assertTrue((await blocks(`${dir}/out.raw`))! < disk.length / 512 * 0.9);
      // The same holes as cp's (st_blocks may differ by an extent-tree
      // block of the file system's own).
      const map = (p: string) => {
        const file = Deno.openSync(p);
        try {
          return fileDataRanges(file);
        } finally {
          file.close();
        }
      };
      assertEquals(map(`${dir}/out.raw`), map(`${dir}/cp.raw`));
    }),
);
