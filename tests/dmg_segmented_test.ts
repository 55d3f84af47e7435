// Segmented UDIF images (drivers/dmg/_segments.ts): sets made by
// tests/_segmented_dmg_writer.ts from our flat UDIF files, cut inside
// chunks, decode to the exact disk through the first file; missing,
// foreign and misplaced parts are errors naming the file.
import {
  BackingFileError,
  dmg,
  fileResolver,
  fromBytes,
  fromFile,
  ImageFormatError,
  memorySink,
  open,
  type Source,
  UnsupportedError,
} from "../mod.ts";
import { segmentDmg } from "./_segmented_dmg_writer.ts";
import { assertEquals, assertMatch } from "./_asserts.ts";
import {
  assertBoundedWork,
  cli,
  countingSource,
  pseudoRandom,
  rejects,
  withTemp,
} from "./_helpers.ts";

/** A 1 MiB disk of text, zeros and noise. */
function testDisk(): Uint8Array<ArrayBuffer> {
  const disk = new Uint8Array(1 << 20);
  const text = new TextEncoder().encode("segments of a disk image; ".repeat(9));
  for (let at = 0; at + text.length <= 300 << 10; at += text.length) {
    disk.set(text, at);
  }
  disk.set(pseudoRandom(256 << 10, 5), 700 << 10);
  return disk;
}

const DISK = testDisk();

async function udif(compression: string): Promise<Uint8Array<ArrayBuffer>> {
  const sink = memorySink();
  await dmg.encode!(fromBytes(DISK), sink, {
    options: { chunk_sectors: "64", compression },
  });
  return sink.bytes() as Uint8Array<ArrayBuffer>;
}

const ZLIB = await udif("zlib");
const RAW = await udif("raw");

/** The data fork's length of a flat UDIF. */
function forkLength(image: Uint8Array): number {
  const view = new DataView(image.buffer, image.byteOffset);
  return Number(view.getBigUint64(image.length - 512 + 32));
}

/** Writes the set to `dir`, returns the first file's path. */
async function writeSet(
  dir: string,
  files: { name: string; bytes: Uint8Array }[],
): Promise<string> {
  for (const f of files) await Deno.writeFile(`${dir}/${f.name}`, f.bytes);
  return `${dir}/${files[0].name}`;
}

async function openSet(path: string) {
  return await open(await fromFile(path), { resolveFile: fileResolver(path) });
}

Deno.test("a zlib dmg cut into 3 segments inside chunks decodes to the disk", async () => {
  const n = forkLength(ZLIB);
  const files = segmentDmg(ZLIB, [
    Math.floor(n / 3) + 123,
    Math.floor(2 * n / 3) + 7,
  ]);
  await withTemp(async (dir) => {
    const image = await openSet(await writeSet(dir, files));
    try {
      assertEquals(image.format, "dmg");
      assertEquals(await image.read(0, image.size), DISK);
      const details = image.details as Record<string, unknown>;
      assertEquals(details.segment, "1 of 3");
      assertEquals(
        (details.segments as { file: string }[]).map((s) => s.file),
        [`${dir}/disk.dmg`, "disk.002.dmgpart", "disk.003.dmgpart"],
      );
      // The partitions' CRC-32s are checked as chunks are read (the data
      // fork's is not: each part has its own).
      assertEquals(
        String(
          (details.checksums as Record<string, unknown>).checked_as_decoded,
        ),
        "the CRC-32s of 1 of 1 partitions, when their chunks are read",
      );
    } finally {
      await image.close?.();
    }
  });
});

Deno.test("raw chunks straddling segments, many small segments, and NAME.001.dmg naming", async () => {
  const n = forkLength(RAW);
  const cuts = Array.from(
    { length: 9 },
    (_, i) => Math.floor((n * (i + 1)) / 10) + 100 * i + 1,
  );
  const files = segmentDmg(RAW, cuts, "set", true);
  assertEquals(files[0].name, "set.001.dmg");
  assertEquals(files[9].name, "set.010.dmgpart");
  await withTemp(async (dir) => {
    const image = await openSet(await writeSet(dir, files));
    try {
      assertEquals(await image.read(0, image.size), DISK);
      // A read across a segment boundary, alone.
      const at = cuts[3] - 50;
      assertEquals(await image.read(at, 100), DISK.slice(at, at + 100));
    } finally {
      await image.close?.();
    }
  });
});

Deno.test("parts given by a resolver over memory (as a browser's dropped Files) work too", async () => {
  const n = forkLength(ZLIB);
  const files = segmentDmg(ZLIB, [Math.floor(n / 2) + 3]);
  const byName = new Map(files.map((f) => [f.name, f.bytes]));
  const image = await open(fromBytes(files[0].bytes, "disk.dmg"), {
    resolveFile: (name) => {
      const bytes = byName.get(name);
      return bytes
        ? Promise.resolve(fromBytes(bytes, name) as Source)
        : Promise.reject(new Error(`no file ${name}`));
    },
  });
  assertEquals(await image.read(0, image.size), DISK);
});

Deno.test("the CLI converts a segmented dmg and info lists its segments", async () => {
  const n = forkLength(ZLIB);
  const files = segmentDmg(ZLIB, [Math.floor(n / 2) + 11]);
  await withTemp(async (dir) => {
    const first = await writeSet(dir, files);
    const r = await cli(["convert", "-O", "raw", first, `${dir}/out.raw`]);
    assertEquals(r.code, 0, r.stderr);
    assertEquals(await Deno.readFile(`${dir}/out.raw`), DISK);
    const info = await cli(["info", "--output=json", first]);
    assertEquals(info.code, 0, info.stderr);
    const segments = JSON.parse(info.text)["format-specific"].data.segments;
    assertEquals(segments.length, 2);
    assertEquals(segments[1].file, "disk.002.dmgpart");
    // Converting onto a part is converting onto an input: refused.
    const onto = await cli([
      "convert",
      "-O",
      "raw",
      first,
      `${dir}/disk.002.dmgpart`,
    ]);
    assertEquals(onto.code, 1, onto.stderr);
  });
});

Deno.test("a missing part is an error naming it", async () => {
  const n = forkLength(ZLIB);
  const files = segmentDmg(ZLIB, [Math.floor(n / 3), Math.floor(2 * n / 3)]);
  await withTemp(async (dir) => {
    const first = await writeSet(dir, files.slice(0, 2));
    await rejects(
      () => openSet(first),
      ImageFormatError,
      /segment 3 of 3, disk\.003\.dmgpart, cannot be opened beside/,
    );
    const r = await cli(["info", first]);
    assertEquals(r.code, 1);
    assertMatch(r.stderr, /disk\.003\.dmgpart/);
  });
});

Deno.test("a part of another image, or in the wrong place, is an error naming it", async () => {
  const n = forkLength(ZLIB);
  const cuts = [Math.floor(n / 3), Math.floor(2 * n / 3)];
  const files = segmentDmg(ZLIB, cuts);
  const other = segmentDmg(ZLIB, cuts); // another SegmentID
  await withTemp(async (dir) => {
    const first = await writeSet(dir, [files[0], files[1], other[2]]);
    await rejects(
      () => openSet(first),
      ImageFormatError,
      /dmg: koly\.SegmentID .*disk\.003\.dmgpart is not segment 3 of 3/,
    );
  });
  await withTemp(async (dir) => {
    const first = await writeSet(dir, [
      files[0],
      { name: files[1].name, bytes: files[2].bytes },
      { name: files[2].name, bytes: files[1].bytes },
    ]);
    await rejects(
      () => openSet(first),
      ImageFormatError,
      /koly\.SegmentNumber 3 must be 2: disk\.002\.dmgpart is not segment 2/,
    );
  });
  await withTemp(async (dir) => {
    // A later part opened on its own.
    const first = await writeSet(dir, files);
    await rejects(
      () => openSet(`${dir}/disk.002.dmgpart`),
      UnsupportedError,
      /segment 2 of 3 of a segmented dmg: open the first segment/,
    );
    assertEquals(first.endsWith("disk.dmg"), true);
  });
});

Deno.test("a part leading outside the folder is refused by the file policy", async () => {
  const n = forkLength(ZLIB);
  const files = segmentDmg(ZLIB, [Math.floor(n / 2)]);
  await withTemp(async (outside) => {
    await Deno.writeFile(`${outside}/disk.002.dmgpart`, files[1].bytes);
    await withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/disk.dmg`, files[0].bytes);
      await Deno.symlink(
        `${outside}/disk.002.dmgpart`,
        `${dir}/disk.002.dmgpart`,
      );
      await rejects(
        () => openSet(`${dir}/disk.dmg`),
        BackingFileError,
        /disk\.002\.dmgpart/,
      );
    });
  });
});

Deno.test("without a way to find its parts, or with a huge SegmentCount, a segmented dmg is refused at once", async () => {
  const n = forkLength(ZLIB);
  const files = segmentDmg(ZLIB, [Math.floor(n / 2)]);
  await rejects(
    () => open(fromBytes(files[0].bytes, "disk.dmg")),
    UnsupportedError,
    /segmented dmg \(2 segments\) needs its other files/,
  );
  await rejects(
    () =>
      open(fromBytes(files[0].bytes, "disk.img"), {
        resolveFile: () => Promise.reject(new Error("no")),
      }),
    UnsupportedError,
    /named NAME\.dmg or NAME\.001\.dmg/,
  );
  const huge = files[0].bytes.slice();
  new DataView(huge.buffer).setUint32(huge.length - 512 + 60, 0xffffffff);
  const counted = countingSource(huge);
  await rejects(
    () =>
      open({ ...counted.source, name: "disk.dmg" }, {
        resolveFile: () => Promise.reject(new Error("never asked")),
      }),
    ImageFormatError,
    /koly\.SegmentCount 4294967295 must be at most 999/,
  );
  assertBoundedWork(counted, huge.length, 20, 2);
  // A part whose data fork runs past its trailer.
  const bad = files[1].bytes.slice();
  new DataView(bad.buffer).setBigUint64(bad.length - 512 + 32, 1n << 40n);
  await rejects(
    () =>
      open(fromBytes(files[0].bytes, "disk.dmg"), {
        resolveFile: () => Promise.resolve(fromBytes(bad, "disk.002.dmgpart")),
      }),
    ImageFormatError,
    /koly\.DataForkLength 1099511627776/,
  );
});
