import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  ChecksumError,
  convert,
  dmg,
  fromBytes,
  fromFile,
  type Image,
  ImageFormatError,
  memorySink,
  open,
  OptionError,
  probe,
  type Source,
  UnsupportedError,
} from "../mod.ts";
import { be32, setBe32, setBe64 } from "../drivers/_binary.ts";
import { decodeBase64, encodeBase64 } from "../drivers/dmg/_plist.ts";
import { resourceForkBytes } from "../drivers/dmg/_rsrc.ts";
import {
  assertBoundedWork,
  cli,
  countingSource,
  pseudoRandom,
  REFERENCE,
  referenceBytes,
  referenceImages,
  rejects,
  ROOT,
  run,
  sha256Hex,
  skip,
  unsharedRead,
  withTemp,
} from "./_helpers.ts";

const MIB = 1 << 20;
/** Every codec our writer has, as `-o compression=` names it. */
const CODECS = ["raw", "zlib", "bzip2", "adc", "lzma", "lzfse"] as const;
/** Which codecs the reference tools read correctly (found by trying: qemu-img and dmg2img write wrong bytes, exit 0, on the others). */
const QEMU_READS = new Set(["raw", "zlib"]);
const DMG2IMG_READS = new Set(["raw", "zlib", "bzip2", "adc"]);

/** A 3 MiB + 4.5 KiB disk: text, zeros, random bytes and a short tail. */
function sampleDisk(size = 3 * MIB + 4608): Uint8Array<ArrayBuffer> {
  const disk = new Uint8Array(size);
  const text = new TextEncoder().encode("a dmg chunk of text ".repeat(60000));
  disk.set(text.subarray(0, MIB), 0);
  const at = Math.min(2 * MIB, size >> 1);
  disk.set(pseudoRandom(Math.min(300000, size - at - 1024), 11), at);
  disk.fill(9, size - 700);
  return disk;
}

async function encodeDmg(
  disk: Uint8Array,
  options: Record<string, string> = {},
): Promise<Uint8Array<ArrayBuffer>> {
  const sink = memorySink();
  await dmg.encode!(fromBytes(disk), sink, { options });
  return sink.bytes() as Uint8Array<ArrayBuffer>;
}

async function readAll(image: Source): Promise<Uint8Array> {
  return await image.read(0, image.size);
}

/** What `7zz x -tdmg -so` writes for an image (every partition, in order). */
async function sevenZip(dir: string, image: Uint8Array): Promise<Uint8Array> {
  await Deno.writeFile(`${dir}/7z.dmg`, image);
  const r = await run("7zz", ["x", "-tdmg", "-so", `${dir}/7z.dmg`]);
  return r.stdout;
}

/** `7zz t` passes (it checks every CRC it finds). */
async function sevenZipTests(dir: string, image: Uint8Array): Promise<void> {
  await Deno.writeFile(`${dir}/7t.dmg`, image);
  const r = await run("7zz", ["t", "-tdmg", `${dir}/7t.dmg`]);
  assertMatch(r.text, /Everything is Ok/);
}

// ---------------------------------------------------------------------------
// Surgery on images, for the broken-input tests

interface Parts {
  bytes: Uint8Array<ArrayBuffer>;
  kolyAt: number;
  xmlOffset: number;
  xmlLength: number;
  xml: string;
}

function parts(bytes: Uint8Array<ArrayBuffer>): Parts {
  const kolyAt = bytes.length - 512;
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  const xmlOffset = Number(view.getBigUint64(kolyAt + 216));
  const xmlLength = Number(view.getBigUint64(kolyAt + 224));
  const xml = new TextDecoder().decode(
    bytes.subarray(xmlOffset, xmlOffset + xmlLength),
  );
  return { bytes, kolyAt, xmlOffset, xmlLength, xml };
}

/** The image with its XML plist replaced (the trailer follows it, its XMLLength updated). */
function withXml(
  bytes: Uint8Array<ArrayBuffer>,
  xml: string,
): Uint8Array<ArrayBuffer> {
  const p = parts(bytes);
  const text = new TextEncoder().encode(xml);
  const out = new Uint8Array(p.xmlOffset + text.length + 512);
  out.set(bytes.subarray(0, p.xmlOffset));
  out.set(text, p.xmlOffset);
  out.set(bytes.subarray(p.kolyAt), p.xmlOffset + text.length);
  setBe64(out, out.length - 512 + 224, text.length);
  return out;
}

/** The block tables of an image's plist, decoded. */
function mishTables(bytes: Uint8Array<ArrayBuffer>): Uint8Array[] {
  return [...parts(bytes).xml.matchAll(/<data>([^<]*)<\/data>/g)].map((m) =>
    decodeBase64(m[1], () => {
      throw new Error("bad base64");
    })
  );
}

/** The image with block table `k` changed by `poke` (in a copy). */
function withMish(
  bytes: Uint8Array<ArrayBuffer>,
  k: number,
  poke: (mish: Uint8Array) => Uint8Array,
): Uint8Array<ArrayBuffer> {
  let n = 0;
  const xml = parts(bytes).xml.replace(
    /<data>([^<]*)<\/data>/g,
    (whole, body) => {
      if (n++ !== k) return whole;
      const mish = decodeBase64(body, () => {
        throw new Error("bad base64");
      });
      return `<data>\n${
        encodeBase64(poke(mish.slice()), "\t\t\t\t")
      }\t\t\t\t</data>`;
    },
  );
  return withXml(bytes, xml);
}

/** Chunk `c`'s 40-byte entry starts here in a block table. */
const chunkAt = (c: number) => 204 + 40 * c;

/** Opens as dmg and reads everything; the error it ends in. */
async function failure(bytes: Uint8Array): Promise<Error> {
  try {
    const image = await open(fromBytes(bytes), { format: "dmg" });
    await readAll(image);
  } catch (e) {
    return e as Error;
  }
  throw new Error("expected an error, but the image read fine");
}

// ---------------------------------------------------------------------------
// Reference images

for (const ref of referenceImages().filter((r) => r.format === "dmg")) {
  Deno.test(`reference ${ref.path} decodes to its sha256`, async () => {
    const bytes = (await referenceBytes(ref.path))!;
    const image = await open(fromBytes(bytes));
    assertEquals(image.format, "dmg");
    assertEquals(image.size, ref.virtual_size);
    assertEquals(sha256Hex(await readAll(image)), ref.raw_sha256);
  });

  Deno.test(`reference ${ref.path} converts to what 7zz extracts`, {
    ignore: skip(["7zz"], true),
  }, async () => {
    await withTemp(async (dir) => {
      const bytes = (await referenceBytes(ref.path))!;
      const sink = memorySink();
      await convert(await open(fromBytes(bytes)), sink);
      assertEquals(
        sha256Hex(sink.bytes()),
        sha256Hex(await sevenZip(dir, bytes)),
      );
    });
  });
}

if (!REFERENCE) {
  // Says in the summary that the manifest's dmgs were not read.
  Deno.test("reference dmgs decode to their sha256 and to what 7zz extracts", {
    ignore: skip([], true),
  }, () => {});
}

Deno.test(
  "qemu's simple-dmg lists its GPT partitions, codecs and checksums in info",
  { ignore: skip([], true) },
  async () => {
    const bytes = (await referenceBytes("qemu-iotests/simple-dmg.dmg.bz2"))!;
    const image = await open(fromBytes(bytes));
    const details = image.details as {
      partitions: {
        name: string;
        first_sector: number;
        sector_count: number;
      }[];
      codecs: Record<string, number>;
      checksums: Record<string, string>;
    };
    assertEquals(details.partitions.length, 8);
    assertMatch(details.partitions[0].name, /^Protective Master Boot Record/);
    assertMatch(details.partitions[1].name, /^GPT Header/);
    assertMatch(details.partitions[4].name, /Apple_HFS/);
    assertEquals(details.partitions[4].first_sector, 40);
    assertEquals(details.partitions[4].sector_count, 3440);
    assertEquals(details.codecs, { zlib: 8, ignore: 4, zero: 2 });
    assertEquals(details.checksums.data_fork, "none");
    assertEquals(details.checksums.master, "CRC32 c1507aaa");
    // Open checks the master checksum; the partitions' CRC-32s only as
    // their chunks are read, which info does not do: it says so.
    assertMatch(details.checksums.checked_at_open, /master checksum.*matches/);
    assertEquals(
      details.checksums.checked_as_decoded,
      "the CRC-32s of 8 of 8 partitions, when their chunks are read",
    );
  },
);

Deno.test(
  "a reference image whose chunks are ignore runs maps them as zero extents",
  { ignore: skip([], true) },
  async () => {
    const image = await open(
      fromBytes((await referenceBytes("udif/compression-zlib.dmg"))!),
    );
    const runs = [];
    for await (const e of image.extents(0, image.size)) runs.push(e);
    assertEquals(runs[0], { offset: 0, length: 512, kind: "data" });
    assertEquals(runs.at(-1)!.kind, "zero");
    let total = 0;
    for (const r of runs) total += r.length;
    assertEquals(total, image.size);
  },
);

// ---------------------------------------------------------------------------
// Our writer, read back by 7zz, by us, by qemu-img and dmg2img

for (const codec of CODECS) {
  Deno.test(`our ${codec} dmg reads back identical in our reader`, async () => {
    const disk = sampleDisk();
    const image = await open(
      fromBytes(await encodeDmg(disk, { compression: codec })),
    );
    assertEquals(image.format, "dmg");
    assertEquals(image.size, disk.length);
    assertEquals(sha256Hex(await readAll(image)), sha256Hex(disk));
  });

  Deno.test(
    `our ${codec} dmg is extracted byte-identical by 7zz with its CRCs passing`,
    { ignore: skip(["7zz"]) },
    async () => {
      await withTemp(async (dir) => {
        const disk = sampleDisk();
        const image = await encodeDmg(disk, { compression: codec });
        await sevenZipTests(dir, image);
        assertEquals(sha256Hex(await sevenZip(dir, image)), sha256Hex(disk));
      });
    },
  );
}

for (const codec of QEMU_READS) {
  Deno.test(`our ${codec} dmg is read byte-identical by qemu-img`, {
    ignore: skip(["qemu-img"]),
  }, async () => {
    await withTemp(async (dir) => {
      const disk = sampleDisk();
      await Deno.writeFile(
        `${dir}/a.dmg`,
        await encodeDmg(disk, { compression: codec }),
      );
      await run("qemu-img", [
        "convert",
        "-f",
        "dmg",
        "-O",
        "raw",
        `${dir}/a.dmg`,
        `${dir}/a.raw`,
      ]);
      assertEquals(
        sha256Hex(await Deno.readFile(`${dir}/a.raw`)),
        sha256Hex(disk),
      );
    });
  });
}

for (const codec of DMG2IMG_READS) {
  Deno.test(`our ${codec} dmg is read byte-identical by dmg2img`, {
    ignore: skip(["dmg2img"]),
  }, async () => {
    await withTemp(async (dir) => {
      const disk = sampleDisk();
      await Deno.writeFile(
        `${dir}/a.dmg`,
        await encodeDmg(disk, { compression: codec }),
      );
      // dmg2img exits 0 even when it writes wrong bytes: only the bytes count.
      await run("dmg2img", ["-s", `${dir}/a.dmg`, `${dir}/a.raw`], {
        allowFail: true,
      });
      assertEquals(
        sha256Hex(await Deno.readFile(`${dir}/a.raw`)),
        sha256Hex(disk),
      );
    });
  });
}

Deno.test("our writer stores zero runs as zero-fill chunks and they convert to holes", async () => {
  const disk = new Uint8Array(8 * MIB);
  disk.fill(1, 3 * MIB, 3 * MIB + 10);
  const bytes = await encodeDmg(disk);
  assertTrue(bytes.length < 64 * 1024, `image is ${bytes.length} bytes`);
  const image = await open(fromBytes(bytes));
  assertEquals((image.details as { codecs: Record<string, number> }).codecs, {
    zero: 7,
    zlib: 1,
  });
  const kinds = [];
  for await (const e of image.extents(0, image.size)) {
    kinds.push([e.kind, e.length]);
  }
  assertEquals(kinds, [["zero", 3 * MIB], ["data", MIB], ["zero", 4 * MIB]]);
  const result = await convert(image, memorySink());
  assertEquals(result.dataBytes, 4096);
});

Deno.test("a disk whose size is not a whole number of sectors is padded to one", async () => {
  const disk = pseudoRandom(5000, 3);
  const image = await open(fromBytes(await encodeDmg(disk)));
  assertEquals(image.size, 5120);
  const back = await readAll(image);
  assertEquals(sha256Hex(back.subarray(0, 5000)), sha256Hex(disk));
  assertEquals(back.subarray(5000).every((b) => b === 0), true);
});

Deno.test("many small chunks decode on the worker pool, and a partial read decodes only the chunks it touches", async () => {
  const disk = sampleDisk(2 * MIB);
  const bytes = await encodeDmg(disk, { chunk_sectors: "64" }); // 32 KiB chunks
  let fileReads = 0;
  let fileBytes = 0;
  const counted: Source = {
    size: bytes.length,
    read(offset, length) {
      fileReads++;
      fileBytes += length;
      return Promise.resolve(bytes.slice(offset, offset + length));
    },
  };
  const image = await open(counted, { format: "dmg" });
  try {
    fileReads = fileBytes = 0;
    const piece = await image.read(MIB + 40000, 1000); // inside chunk 33
    assertEquals(
      sha256Hex(piece),
      sha256Hex(disk.subarray(MIB + 40000, MIB + 41000)),
    );
    assertEquals(fileReads, 1);
    assertTrue(fileBytes <= 32768, `read ${fileBytes} bytes for one chunk`);
    assertEquals(sha256Hex(await readAll(image)), sha256Hex(disk));
  } finally {
    await image.close?.();
  }
});

Deno.test("dmg readInto gives the bytes read gives, whole and cut chunks of every codec, over old bytes", async () => {
  const disk = sampleDisk();
  disk.fill(0, MIB + 65536, MIB + 200000); // zero-fill chunks
  const ranges = [
    [0, disk.length],
    [100, 9000],
    [MIB - 700, 70_000],
    [MIB + 60000, 150_000],
    [2 * MIB, MIB],
  ];
  for (const compression of CODECS) {
    // 32 KiB chunks: enough of them for the worker pool.
    const bytes = await encodeDmg(disk, { compression, chunk_sectors: "64" });
    const image = await open(fromBytes(bytes));
    try {
      for (const [at, n] of ranges) {
        const into = new Uint8Array(n).fill(0xee);
        await image.readInto!(at, into);
        assertEquals(
          sha256Hex(into),
          sha256Hex(disk.subarray(at, at + n)),
          `${compression} ${at}+${n}`,
        );
      }
    } finally {
      await image.close?.();
    }
  }
});

Deno.test("a corrupt bzip2 chunk decoded on the worker pool is named", async () => {
  const disk = sampleDisk(2 * MIB);
  const good = await encodeDmg(disk, {
    compression: "bzip2",
    chunk_sectors: "64",
  });
  const mish = mishTables(good)[0];
  const view = new DataView(mish.buffer, mish.byteOffset);
  const chunk3 = Number(view.getBigUint64(chunkAt(3) + 24));
  const corrupt = good.slice();
  corrupt[chunk3 + 40] ^= 0xff;
  const image = await open(fromBytes(corrupt));
  try {
    await rejects(
      () => image.readInto!(0, new Uint8Array(MIB)),
      ImageFormatError,
      /chunk 3 \(.* of bzip2 .*\) does not decode/,
    );
  } finally {
    await image.close?.();
  }
});

Deno.test("a dmg is probed by its koly trailer whatever the file is called", async () => {
  await withTemp(async (dir) => {
    const disk = sampleDisk();
    await Deno.writeFile(`${dir}/disk.img`, await encodeDmg(disk));
    const source = await fromFile(`${dir}/disk.img`);
    try {
      assertEquals((await probe(source))[0].format, "dmg");
      const image = await open(source);
      assertEquals(image.format, "dmg");
    } finally {
      await source.close?.();
    }
    const info = await cli(["info", "--output=json", `${dir}/disk.img`]);
    assertEquals(info.code, 0, info.stderr);
    const json = JSON.parse(info.text);
    assertEquals(json.format, "dmg");
    assertEquals(json["virtual-size"], disk.length);
    const out = await cli(["convert", `${dir}/disk.img`, `${dir}/disk.raw`]);
    assertEquals(out.code, 0, out.stderr);
    assertEquals(
      sha256Hex(await Deno.readFile(`${dir}/disk.raw`)),
      sha256Hex(disk),
    );
  });
});

Deno.test(
  "convert -O dmg -o compression=bzip2 on the command line writes what 7zz reads",
  { ignore: skip(["7zz"]) },
  async () => {
    await withTemp(async (dir) => {
      const disk = sampleDisk();
      await Deno.writeFile(`${dir}/in.raw`, disk);
      const r = await cli([
        "convert",
        "-O",
        "dmg",
        "-o",
        "compression=bzip2",
        `${dir}/in.raw`,
        `${dir}/out.dmg`,
      ]);
      assertEquals(r.code, 0, r.stderr);
      const bytes = await Deno.readFile(`${dir}/out.dmg`);
      const image = await open(fromBytes(bytes));
      assertEquals(
        (image.details as { codecs: Record<string, number> }).codecs.bzip2 > 0,
        true,
      );
      assertEquals(sha256Hex(await sevenZip(dir, bytes)), sha256Hex(disk));
    });
  },
);

Deno.test("unknown writer options and codecs are refused by name", async () => {
  await rejects(
    () => encodeDmg(new Uint8Array(512), { compression: "zstd" }),
    OptionError,
    /dmg: option compression=zstd is invalid: must be one of raw, zlib/,
  );
  await rejects(
    () => encodeDmg(new Uint8Array(512), { level: "9" }),
    OptionError,
    /dmg: unknown option 'level' \(valid: compression, chunk_sectors, partitions\)/,
  );
  await rejects(
    () => encodeDmg(new Uint8Array(512), { chunk_sectors: "0" }),
    OptionError,
    /chunk_sectors/,
  );
});

Deno.test("an image with only a resource fork (no XML plist) reads the same", async () => {
  const disk = sampleDisk();
  const bytes = await encodeDmg(disk);
  const p = parts(bytes);
  const fork = resourceForkBytes([{
    type: "blkx",
    id: 0,
    name: "whole disk",
    attributes: 0x50,
    data: mishTables(bytes)[0],
  }]);
  const out = new Uint8Array(p.xmlOffset + fork.length + 512);
  out.set(bytes.subarray(0, p.xmlOffset));
  out.set(fork, p.xmlOffset);
  const koly = out.subarray(p.xmlOffset + fork.length);
  koly.set(bytes.subarray(p.kolyAt));
  setBe64(koly, 40, p.xmlOffset);
  setBe64(koly, 48, fork.length);
  setBe64(koly, 216, 0);
  setBe64(koly, 224, 0);
  const image = await open(fromBytes(out));
  assertEquals((image.details as { tables: string }).tables, "resource fork");
  assertEquals(sha256Hex(await readAll(image)), sha256Hex(disk));
});

// ---------------------------------------------------------------------------
// Checksums

Deno.test(
  "a poked byte in a raw chunk is a ChecksumError naming the partition",
  { ignore: skip([], true) },
  async () => {
    const bytes = (await referenceBytes("udif/compression-raw.dmg"))!.slice();
    bytes[512 * 5 + 3] ^= 0x40; // inside the first FAT partition's raw chunk
    const e = await failure(bytes);
    assertTrue(e instanceof ChecksumError, e.message);
    assertMatch(e.message, /blkx\[2\] " \(Windows_FAT_16 : 2\)" checksum/);
  },
);

Deno.test("a poked byte in our raw image names the partition; verify=off reads it anyway", async () => {
  const disk = sampleDisk();
  const bytes = await encodeDmg(disk, { compression: "raw" });
  bytes[100] ^= 1;
  const e = await failure(bytes);
  assertTrue(e instanceof ChecksumError, e.message);
  assertMatch(
    e.message,
    /blkx\[0\] "whole disk \(unknown partition : 0\)" checksum/,
  );
  const image = await open(fromBytes(bytes), { options: { verify: "off" } });
  const back = await readAll(image);
  assertEquals(back[100], disk[100] ^ 1);
});

Deno.test("a poked byte in a zlib chunk is an error naming the partition and chunk, or a ChecksumError", async () => {
  const disk = sampleDisk();
  const bytes = await encodeDmg(disk);
  bytes[200] ^= 0xff;
  const e = await failure(bytes);
  assertTrue(e instanceof ImageFormatError, e.message);
  assertMatch(
    e.message,
    /blkx\[0\] "whole disk \(unknown partition : 0\)"( chunk 0|.*checksum)/,
  );
});

Deno.test("a wrong data-fork checksum in the trailer is a ChecksumError naming koly.DataChecksum", async () => {
  const bytes = await encodeDmg(sampleDisk());
  bytes[bytes.length - 512 + 88] ^= 1;
  const e = await failure(bytes);
  assertTrue(e instanceof ChecksumError, e.message);
  assertMatch(e.message, /koly\.DataChecksum/);
});

Deno.test("a wrong master checksum is a ChecksumError at open", async () => {
  const bytes = await encodeDmg(sampleDisk());
  bytes[bytes.length - 512 + 360] ^= 1;
  await rejects(
    () => open(fromBytes(bytes)),
    ChecksumError,
    /koly\.MasterChecksum/,
  );
});

Deno.test("a wrong partition checksum in the block table is a ChecksumError naming it", async () => {
  const bytes = withMish(await encodeDmg(sampleDisk()), 0, (m) => {
    m[72] ^= 1;
    return m;
  });
  // The master checksum covers the table's checksum: open with verify off
  // for it, then check the partition on its own.
  await rejects(() => open(fromBytes(bytes)), ChecksumError, /MasterChecksum/);
  const p = parts(bytes);
  const fixed = bytes.slice();
  const sum = new Uint8Array(4);
  sum.set(mishTables(bytes)[0].subarray(72, 76));
  const { crc32 } = await import("../drivers/codecs/crc32.ts");
  setBe32(fixed, p.kolyAt + 360, crc32(sum));
  const e = await failure(fixed);
  assertTrue(e instanceof ChecksumError, e.message);
  assertMatch(e.message, /blkx\[0\] .* checksum/);
});

// ---------------------------------------------------------------------------
// Broken input

Deno.test("a bad koly magic is not probed as dmg, and forced open names koly.Signature", async () => {
  const bytes = await encodeDmg(sampleDisk());
  bytes[bytes.length - 512] = 0x4b; // "Koly"
  assertEquals((await probe(fromBytes(bytes)))[0].format, "raw");
  await rejects(
    () => open(fromBytes(bytes), { format: "dmg" }),
    ImageFormatError,
    /koly\.Signature/,
  );
});

Deno.test("a bad koly version or header size is refused by name", async () => {
  const bytes = await encodeDmg(sampleDisk());
  setBe32(bytes, bytes.length - 512 + 4, 5);
  await rejects(
    () => open(fromBytes(bytes), { format: "dmg" }),
    ImageFormatError,
    /koly\.Version 5 must be 4/,
  );
  setBe32(bytes, bytes.length - 512 + 4, 4);
  setBe32(bytes, bytes.length - 512 + 8, 511);
  await rejects(
    () => open(fromBytes(bytes), { format: "dmg" }),
    ImageFormatError,
    /koly\.HeaderSize/,
  );
});

Deno.test("a plist offset or length outside the file is refused by name", async () => {
  const bytes = await encodeDmg(sampleDisk());
  const k = bytes.length - 512;
  const poked = bytes.slice();
  setBe64(poked, k + 216, bytes.length + 10);
  await rejects(
    () => open(fromBytes(poked), { format: "dmg" }),
    ImageFormatError,
    /koly\.XMLOffset/,
  );
  const longer = bytes.slice();
  setBe64(longer, k + 224, 2n ** 62n);
  await rejects(
    () => open(fromBytes(longer), { format: "dmg" }),
    ImageFormatError,
    /koly\.XMLLength/,
  );
});

Deno.test("malformed XML and bad base64 are refused with their place", async () => {
  const bytes = await encodeDmg(sampleDisk());
  const { xml } = parts(bytes);
  await rejects(
    () =>
      open(fromBytes(withXml(bytes, xml.replace("</array>", "</arra>"))), {
        format: "dmg",
      }),
    ImageFormatError,
    /XML plist/,
  );
  await rejects(
    () =>
      open(
        fromBytes(
          withXml(
            bytes,
            xml.replace("<data>\n\t\t\t\tbWlz", "<data>\n\t\t\t\tb*lz"),
          ),
        ),
        { format: "dmg" },
      ),
    ImageFormatError,
    /not base64/,
  );
  await rejects(
    () =>
      open(
        fromBytes(
          withXml(bytes, xml.replace("<key>blkx</key>", "<key>blkz</key>")),
        ),
        { format: "dmg" },
      ),
    ImageFormatError,
    /resource-fork\.blkx/,
  );
});

Deno.test("chunks that overlap are refused naming both", async () => {
  const bytes = withMish(await encodeDmg(sampleDisk()), 0, (m) => {
    setBe64(m, chunkAt(1) + 8, 100); // chunk 1 starts inside chunk 0
    return m;
  });
  await rejects(
    () => open(fromBytes(bytes), { format: "dmg" }),
    ImageFormatError,
    /chunk 1 SectorNumber 100 must be at least 2048/,
  );
});

Deno.test("chunks of two partitions that overlap are refused naming both", {
  ignore: skip([], true),
}, async () => {
  const ref = (await referenceBytes("udif/compression-zlib.dmg"))!.slice();
  // Partition 2 (Windows_FAT_16 : 2) made to start one sector into the MBR's.
  const bytes = withMish(ref, 2, (m) => {
    setBe64(m, 8, 0);
    return m;
  });
  await rejects(
    () => open(fromBytes(bytes), { format: "dmg" }),
    ImageFormatError,
    /overlaps blkx\[/,
  );
});

Deno.test("a chunk past the disk or past the file is refused by name", async () => {
  const base = await encodeDmg(sampleDisk());
  const pastDisk = withMish(base, 0, (m) => {
    const sectors = Number(new DataView(m.buffer).getBigUint64(16));
    setBe64(m, 16, sectors + 4096); // the partition grows past koly.SectorCount
    const last = (m.length - 204) / 40 - 2; // the chunk before the terminator
    setBe64(m, chunkAt(last) + 8, sectors + 2048);
    return m;
  });
  await rejects(
    () => open(fromBytes(pastDisk), { format: "dmg" }),
    ImageFormatError,
    /runs past the disk/,
  );
  const pastFile = withMish(base, 0, (m) => {
    setBe64(m, chunkAt(0) + 24, base.length);
    return m;
  });
  await rejects(
    () => open(fromBytes(pastFile), { format: "dmg" }),
    ImageFormatError,
    /chunk 0 CompressedOffset \+ CompressedLength .* past the data/,
  );
});

Deno.test("a chunk that decodes to more or fewer bytes than it declares is refused naming it", async () => {
  const base = await encodeDmg(sampleDisk());
  for (const sectors of [2047, 2049]) {
    const bytes = withMish(base, 0, (m) => {
      setBe64(m, chunkAt(0) + 16, sectors);
      setBe64(m, chunkAt(1) + 8, sectors); // keep chunk 1 after it
      setBe64(m, chunkAt(1) + 16, 4096 - sectors);
      return m;
    });
    const e = await failure(bytes);
    assertTrue(e instanceof ImageFormatError, e.message);
    assertMatch(e.message, /chunk 0 \(.* of zlib .*\) does not decode to its/);
  }
});

Deno.test("an unknown chunk type is refused with its number", async () => {
  const bytes = withMish(await encodeDmg(sampleDisk()), 0, (m) => {
    setBe32(m, chunkAt(0), 0x80000009);
    return m;
  });
  await rejects(
    () => open(fromBytes(bytes), { format: "dmg" }),
    ImageFormatError,
    /chunk 0 type "0x80000009" must be a known chunk type/,
  );
});

Deno.test("huge sector counts are refused quickly, without a big allocation", async () => {
  const base = await encodeDmg(sampleDisk());
  const huge = base.slice();
  setBe64(huge, huge.length - 512 + 492, 2n ** 60n);
  await rejects(
    () => open(fromBytes(huge), { format: "dmg" }),
    ImageFormatError,
    /koly\.SectorCount/,
  );
  const chunk = withMish(base, 0, (m) => {
    setBe64(m, chunkAt(0) + 16, 2n ** 40n);
    return m;
  });
  await rejects(
    () => open(fromBytes(chunk), { format: "dmg" }),
    ImageFormatError,
    /chunk 0 SectorCount|past its partition/,
  );
  // A zero-fill chunk may be huge: no allocation follows its size.
  const zeros = withMish(base, 0, (m) => {
    setBe64(m, 16, 2n ** 40n);
    setBe32(m, chunkAt(0), 0);
    setBe64(m, chunkAt(0) + 16, 2n ** 40n);
    return m.slice(0, chunkAt(1)).map((b, i) =>
      i >= 200 && i < 204 ? [0, 0, 0, 1][i - 200] : b
    );
  });
  const counted = countingSource(zeros);
  await rejects(
    () => open(counted.source, { format: "dmg" }),
    ImageFormatError,
    /runs past the disk/,
  );
  assertBoundedWork(counted, zeros.length, 64);
});

Deno.test("a truncated image is refused with a typed error", async () => {
  const bytes = await encodeDmg(sampleDisk());
  for (const cut of [100, 600, bytes.length - 600, bytes.length - 1]) {
    const e = await failure(bytes.slice(0, cut));
    assertTrue(e instanceof ImageFormatError, `${cut}: ${e.message}`);
  }
});

Deno.test("an image that is only a trailer with no tables is refused", async () => {
  const bytes = await encodeDmg(new Uint8Array(512));
  const k = bytes.slice(bytes.length - 512);
  setBe64(k, 216, 0);
  setBe64(k, 224, 0);
  await rejects(
    () => open(fromBytes(k), { format: "dmg" }),
    ImageFormatError,
    /koly\.XMLLength 0/,
  );
  assertEquals(be32(k, 0), 0x6b6f6c79);
});

Deno.test(
  "open images read through a convert to a file and close their workers",
  { ignore: skip(["7zz"]) },
  async () => {
    await withTemp(async (dir) => {
      const disk = sampleDisk(4 * MIB);
      await Deno.writeFile(
        `${dir}/a.dmg`,
        await encodeDmg(disk, { chunk_sectors: "128" }),
      );
      const source = await fromFile(`${dir}/a.dmg`);
      const image: Image = await open(source);
      const sink = memorySink();
      await convert(image, sink);
      await image.close?.();
      assertEquals(sha256Hex(sink.bytes()), sha256Hex(disk));
    });
  },
);

Deno.test("convert refuses a dmg with a bad checksum, and --no-verify converts it anyway", async () => {
  await withTemp(async (dir) => {
    const disk = sampleDisk();
    const bytes = await encodeDmg(disk, { compression: "raw" });
    bytes[100] ^= 1;
    await Deno.writeFile(`${dir}/bad.dmg`, bytes);
    const refused = await cli(["convert", `${dir}/bad.dmg`, `${dir}/out.raw`]);
    assertEquals(refused.code, 1);
    assertMatch(refused.stderr, /mismatch/);
    assertEquals(
      [...Deno.readDirSync(dir)].map((e) => e.name).includes("out.raw"),
      false,
    );
    const forced = await cli([
      "convert",
      "--no-verify",
      `${dir}/bad.dmg`,
      `${dir}/out.raw`,
    ]);
    assertEquals(forced.code, 0, forced.stderr);
    assertEquals((await Deno.readFile(`${dir}/out.raw`))[100], disk[100] ^ 1);
  });
});

Deno.test("partitions listed out of disk order read the same", {
  ignore: skip([], true),
}, async () => {
  const ref = (await referenceBytes("udif/compression-zlib.dmg"))!.slice();
  const { xml } = parts(ref);
  const entries = [...xml.matchAll(/\t\t\t<dict>[\s\S]*?\t\t\t<\/dict>\n/g)]
    .map((m) => m[0]).filter((e) => e.includes("mish") || e.includes("bWlz"));
  assertEquals(entries.length, 5);
  const swapped = xml.replace(entries[1], "@@1@@").replace(
    entries[3],
    entries[1],
  )
    .replace("@@1@@", entries[3]);
  const bytes = withXml(ref, swapped);
  // The master checksum covers the tables in their listed order.
  await rejects(() => open(fromBytes(bytes)), ChecksumError, /MasterChecksum/);
  const image = await open(fromBytes(bytes), { options: { verify: "off" } });
  const expected = (await open(fromBytes(ref))).read(0, image.size);
  assertEquals(sha256Hex(await readAll(image)), sha256Hex(await expected));
});

Deno.test("on the worker pool, a corrupt chunk is still named and a bad partition checksum still found", async () => {
  const disk = sampleDisk(2 * MIB);
  const good = await encodeDmg(disk, { chunk_sectors: "64" });
  // A byte inside the zlib stream of chunk 3 (chunks are written in order).
  const mish = mishTables(good)[0];
  const view = new DataView(mish.buffer, mish.byteOffset);
  const chunk3 = Number(view.getBigUint64(chunkAt(3) + 24));
  const corrupt = good.slice();
  corrupt[chunk3 + 5] ^= 0xff;
  const image = await open(fromBytes(corrupt));
  try {
    await rejects(
      () => readAll(image),
      ImageFormatError,
      /chunk 3 \(.* of zlib .*\) does not decode/,
    );
  } finally {
    await image.close?.();
  }
  // The table's checksum changed (and the master checksum made to match).
  const wrong = withMish(good, 0, (m) => {
    m[75] ^= 1;
    return m;
  });
  const { crc32 } = await import("../drivers/codecs/crc32.ts");
  const sum = mishTables(wrong)[0].slice(72, 76);
  setBe32(wrong, wrong.length - 512 + 360, crc32(sum));
  const image2 = await open(fromBytes(wrong));
  try {
    await rejects(
      () => readAll(image2),
      ChecksumError,
      /blkx\[0\] .* checksum/,
    );
  } finally {
    await image2.close?.();
  }
});

Deno.test("where memory is not shared (a browser page that is not cross-origin isolated), chunks are moved to the workers and back: the same bytes, a corrupt chunk named, a bad checksum found", async () => {
  await withTemp(async (dir) => {
    // 64 KiB chunks: 22 hold data, enough for the pool, and long enough
    // for the folded WebAssembly CRC-32.
    const disk = sampleDisk(4 * MIB);
    let good = new Uint8Array();
    for (const compression of ["zlib", "bzip2"]) {
      good = await encodeDmg(disk, { compression, chunk_sectors: "128" });
      await Deno.writeFile(`${dir}/good.dmg`, good);
      const got = await unsharedRead(`${dir}/good.dmg`);
      assertEquals(got.shared, "undefined", JSON.stringify(got));
      assertEquals(got.sha256, sha256Hex(disk), compression);
      assertTrue(got.jobs! > 0, `${compression}: decoded on the workers`);
    }
    good = await encodeDmg(disk, { chunk_sectors: "128" });
    const mish = mishTables(good)[0];
    const view = new DataView(mish.buffer, mish.byteOffset);
    const chunk3 = Number(view.getBigUint64(chunkAt(3) + 24));
    const corrupt = good.slice();
    corrupt[chunk3 + 5] ^= 0xff;
    await Deno.writeFile(`${dir}/corrupt.dmg`, corrupt);
    assertMatch(
      (await unsharedRead(`${dir}/corrupt.dmg`)).error ?? "",
      /^ImageFormatError: .*chunk 3 \(.* of zlib .*\) does not decode/,
    );
    // The table's checksum changed (and the master checksum made to match).
    const wrong = withMish(good, 0, (m) => {
      m[75] ^= 1;
      return m;
    });
    const { crc32 } = await import("../drivers/codecs/crc32.ts");
    setBe32(
      wrong,
      wrong.length - 512 + 360,
      crc32(mishTables(wrong)[0].slice(72, 76)),
    );
    await Deno.writeFile(`${dir}/wrong.dmg`, wrong);
    assertMatch(
      (await unsharedRead(`${dir}/wrong.dmg`)).error ?? "",
      /^ChecksumError: .*blkx\[0\] .* checksum/,
    );
    // The data fork's checksum (over the packed chunks, made on the
    // workers here): one byte of it changed.
    const fork = good.slice();
    fork[fork.length - 512 + 91] ^= 1; // koly.DataChecksum's CRC, at 88
    await Deno.writeFile(`${dir}/fork.dmg`, fork);
    assertMatch(
      (await unsharedRead(`${dir}/fork.dmg`)).error ?? "",
      /^ChecksumError: .*data fork/i,
    );
  });
});

// testdata/demo.dmg (the `deno task demo` image) was made with:
//   mkfs.fat -C -n VDISKDEMO -i 12345678 demo.raw 1440
//   mcopy -i demo.raw README.TXT ::README.TXT
//   deno run -A cli.ts convert -O dmg demo.raw testdata/demo.dmg
Deno.test("the bundled demo.dmg is a FAT floppy whose README mtools reads", async () => {
  const bytes = await Deno.readFile(`${ROOT}testdata/demo.dmg`);
  const image = await open(fromBytes(bytes));
  assertEquals(image.format, "dmg");
  assertEquals(image.size, 1440 * 1024);
  const disk = await readAll(image);
  assertEquals(
    sha256Hex(disk),
    "436c15d3af7c286838d9d841ef16571604d37a8305f58b9025d5e8f460636a54",
  );
});

Deno.test(
  "the bundled demo.dmg holds the README mtools reads and 7zz extracts the same disk",
  { ignore: skip(["mtype", "7zz"]) },
  async () => {
    const bytes = await Deno.readFile(`${ROOT}testdata/demo.dmg`);
    const disk = await readAll(await open(fromBytes(bytes)));
    await withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/demo.raw`, disk);
      const text =
        (await run("mtype", ["-i", `${dir}/demo.raw`, "::README.TXT"])).text;
      assertMatch(text, /Hello from vdisk!/);
      assertEquals(sha256Hex(await sevenZip(dir, bytes)), sha256Hex(disk));
    });
  },
);

Deno.test("a segmented image opened without a way to its parts is refused, saying what it needs", async () => {
  const bytes = await encodeDmg(sampleDisk());
  setBe32(bytes, bytes.length - 512 + 60, 3);
  await rejects(
    () => open(fromBytes(bytes)),
    UnsupportedError,
    /segmented dmg \(3 segments\) needs its other files/,
  );
});

/** A 4 MiB disk with an MBR: FAT16 at 2048 (2048 sectors), Linux at 6000 (1000), bytes in the gaps. */
function mbrDisk(): Uint8Array<ArrayBuffer> {
  const disk = new Uint8Array(8192 * 512);
  for (let i = 512; i < disk.length; i += 4096) {
    disk.fill(((i >> 12) & 255) | 1, i, i + 100);
  }
  const entry = (k: number, type: number, first: number, count: number) => {
    const at = 446 + 16 * k;
    disk[at + 4] = type;
    new DataView(disk.buffer).setUint32(at + 8, first, true);
    new DataView(disk.buffer).setUint32(at + 12, count, true);
  };
  entry(0, 0x06, 2048, 2048);
  entry(1, 0x83, 6000, 1000);
  disk[510] = 0x55;
  disk[511] = 0xaa;
  return disk;
}

Deno.test("a disk with a simple MBR is written as hdiutil lays it out: MBR, partitions and free gaps", async () => {
  const disk = mbrDisk();
  const image = await open(fromBytes(await encodeDmg(disk)));
  const details = image.details as {
    partitions: { name: string; first_sector: number; sector_count: number }[];
  };
  assertEquals(
    details.partitions.map((p) => [p.name, p.first_sector, p.sector_count]),
    [
      ["Master Boot Record (MBR : 0)", 0, 1],
      [" (Apple_Free : 1)", 1, 2047],
      [" (DOS_FAT_16 : 2)", 2048, 2048],
      [" (Apple_Free : 3)", 4096, 1904],
      [" (Linux : 4)", 6000, 1000],
      [" (Apple_Free : 5)", 7000, 1192],
    ],
  );
  assertEquals(sha256Hex(await readAll(image)), sha256Hex(disk));
  const whole = await open(
    fromBytes(await encodeDmg(disk, { partitions: "whole" })),
  );
  assertEquals(
    (whole.details as { partitions: unknown[] }).partitions.length,
    1,
  );
  assertEquals(sha256Hex(await readAll(whole)), sha256Hex(disk));
});

Deno.test(
  "an MBR-partitioned dmg of ours is read byte-identical by 7zz, qemu-img and dmg2img",
  { ignore: skip(["7zz", "qemu-img", "dmg2img"]) },
  async () => {
    await withTemp(async (dir) => {
      const disk = mbrDisk();
      const image = await encodeDmg(disk);
      await sevenZipTests(dir, image);
      assertEquals(sha256Hex(await sevenZip(dir, image)), sha256Hex(disk));
      const listing = await run("7zz", ["l", "-tdmg", `${dir}/7z.dmg`]);
      assertMatch(listing.text, /2\.DOS_FAT_16/);
      assertMatch(listing.text, /4\.Linux/);
      await Deno.writeFile(`${dir}/a.dmg`, image);
      await run("qemu-img", [
        "convert",
        "-f",
        "dmg",
        "-O",
        "raw",
        `${dir}/a.dmg`,
        `${dir}/q.raw`,
      ]);
      assertEquals(
        sha256Hex(await Deno.readFile(`${dir}/q.raw`)),
        sha256Hex(disk),
      );
      await run("dmg2img", ["-s", `${dir}/a.dmg`, `${dir}/d.raw`], {
        allowFail: true,
      });
      assertEquals(
        sha256Hex(await Deno.readFile(`${dir}/d.raw`)),
        sha256Hex(disk),
      );
    });
  },
);

Deno.test("an MBR that is not simple (extended, GPT protective, overlapping, past the disk) gives one whole-disk table", async () => {
  const cases: [number, number, number][][] = [
    [[0x05, 2048, 2048]],
    [[0xee, 1, 8191]],
    [[0x06, 2048, 2048], [0x83, 3000, 100]],
    [[0x83, 4000, 9000]],
  ];
  for (const entries of cases) {
    const disk = mbrDisk();
    disk.fill(0, 446, 510);
    entries.forEach(([type, first, count], k) => {
      const at = 446 + 16 * k;
      disk[at + 4] = type;
      new DataView(disk.buffer).setUint32(at + 8, first, true);
      new DataView(disk.buffer).setUint32(at + 12, count, true);
    });
    const image = await open(fromBytes(await encodeDmg(disk)));
    const parts =
      (image.details as { partitions: { name: string }[] }).partitions;
    assertEquals(parts.map((p) => p.name), [
      "whole disk (unknown partition : 0)",
    ], JSON.stringify(entries));
    assertEquals(sha256Hex(await readAll(image)), sha256Hex(disk));
  }
});

Deno.test("broken fields poked into every reference dmg are refused by name", {
  ignore: skip([], true),
}, async () => {
  for (const ref of referenceImages().filter((r) => r.format === "dmg")) {
    const bytes = (await referenceBytes(ref.path))!.slice();
    const k = bytes.length - 512;
    const version = bytes.slice();
    setBe32(version, k + 4, 3);
    await rejects(
      () => open(fromBytes(version), { format: "dmg" }),
      ImageFormatError,
      /koly\.Version 3 must be 4/,
    );
    const xml = bytes.slice();
    setBe64(xml, k + 224, k); // the plist would run into the trailer
    await rejects(
      () => open(fromBytes(xml), { format: "dmg" }),
      ImageFormatError,
      /koly\.XMLLength/,
    );
    // The first table with a chunk gets an unknown chunk type.
    const tables = mishTables(bytes);
    const t = tables.findIndex((m) => m.length > 204 + 40);
    const unknown = withMish(bytes, t, (m) => {
      setBe32(m, chunkAt(0), 0x00000003);
      return m;
    });
    await rejects(
      () =>
        open(fromBytes(unknown), { format: "dmg", options: { verify: "off" } }),
      ImageFormatError,
      /chunk 0 type "0x00000003" must be a known chunk type/,
    );
  }
});

Deno.test("an encrypted dmg (encrcdsa) is the dmg-encrypted driver's; -f dmg refuses it by name", async () => {
  const bytes = new Uint8Array(8192);
  bytes.set(new TextEncoder().encode("encrcdsa"), 0);
  assertEquals((await probe(fromBytes(bytes)))[0].format, "dmg-encrypted");
  await rejects(
    () => open(fromBytes(bytes)),
    UnsupportedError,
    /encrcdsa header version 0/,
  );
  await rejects(
    () => open(fromBytes(bytes), { format: "dmg" }),
    UnsupportedError,
    /encrypted dmg \(encrcdsa\): open it as dmg-encrypted/,
  );
});
