import { assertEquals } from "./_asserts.ts";
import {
  convert,
  directoryTree,
  fromBytes,
  ImageFormatError,
  memorySink,
  memoryTree,
  open,
  openSparsebundle,
  probe,
  type Tree,
  UnsupportedError,
} from "../mod.ts";
import {
  assertBoundedWork,
  cli,
  pseudoRandom,
  rejects,
  runs,
  sha256Hex,
  withTemp,
} from "./_helpers.ts";
import {
  bundlePlist,
  writeFolder,
  writeSparsebundle,
} from "./_apple_writers.ts";
import { mutate, rng } from "./_fuzz.ts";
import { isTypedError } from "./_outcomes.ts";

const KiB = 1024;

/** A disk of `bands` bands of `bandSize`, the bands in `empty` all zeros. */
function diskOf(bandSize: number, bands: number, empty: number[]): Uint8Array {
  const disk = pseudoRandom(bandSize * bands, 17);
  for (const b of empty) disk.fill(0, b * bandSize, (b + 1) * bandSize);
  return disk;
}

async function decode(tree: Tree): Promise<Uint8Array> {
  const image = await openSparsebundle(tree);
  assertEquals(image.format, "sparsebundle");
  const sink = memorySink();
  await convert(image, sink);
  return sink.bytes();
}

Deno.test("a sparse bundle decodes to the exact disk; missing band files are zero runs", async () => {
  const band = 64 * KiB;
  const disk = diskOf(band, 20, [1, 2, 7, 19]);
  const files = writeSparsebundle(disk, { bandSize: band });
  assertEquals(files["bands/1"], undefined);
  assertEquals(files["bands/10"]?.length, band); // band 16, named in hex
  assertEquals(sha256Hex(await decode(memoryTree(files))), sha256Hex(disk));
  const image = await openSparsebundle(memoryTree(files));
  assertEquals(
    (await runs(image)).map((r) => [r.kind, r.offset / band, r.length / band]),
    [["data", 0, 1], ["zero", 1, 2], ["data", 3, 4], ["zero", 7, 1], [
      "data",
      8,
      11,
    ], ["zero", 19, 1]],
  );
  assertEquals(image.details?.bandSize, band);
  assertEquals(image.details?.bandsPresent, 16);
});

Deno.test("band files shorter than band-size (written in part, or the disk's last) read as zeros past their end", async () => {
  const band = 64 * KiB;
  const disk = pseudoRandom(5 * band + 3000, 4);
  disk.fill(0, 2 * band + 100, 3 * band); // band 2 written only at its start
  const files = writeSparsebundle(disk, { bandSize: band, trim: true });
  assertEquals(files["bands/2"]?.length, 100);
  assertEquals(files["bands/5"]?.length, 3000);
  assertEquals(sha256Hex(await decode(memoryTree(files))), sha256Hex(disk));
});

Deno.test("Files and Blobs (a dropped folder, in a browser) read the same as bytes", async () => {
  const band = 64 * KiB;
  const disk = diskOf(band, 6, [3]);
  const files = writeSparsebundle(disk, { bandSize: band });
  const blobs = Object.fromEntries(
    Object.entries(files).map((
      [k, v],
    ) => [k, v === null ? null : new File([v.slice()], k.split("/").pop()!)]),
  );
  assertEquals(sha256Hex(await decode(memoryTree(blobs))), sha256Hex(disk));
});

Deno.test("8 MiB bands (hdiutil's default) and a disk not a whole number of bands", async () => {
  const band = 8 << 20;
  const disk = new Uint8Array(2 * band + 512 * 7);
  disk.set(pseudoRandom(1000, 1), 10);
  disk.set(pseudoRandom(7 * 512, 2), 2 * band);
  const files = writeSparsebundle(disk, { bandSize: band, trim: true });
  assertEquals(Object.keys(files).filter((k) => k.startsWith("bands/")), [
    "bands/0",
    "bands/2",
  ]);
  assertEquals(sha256Hex(await decode(memoryTree(files))), sha256Hex(disk));
});

Deno.test("the CLI converts a .sparsebundle folder to the raw disk (and a Time Machine .backupbundle)", async () => {
  const band = 64 * KiB;
  const disk = diskOf(band, 10, [0, 4]);
  await withTemp(async (dir) => {
    for (const name of ["disk.sparsebundle", "Mac.backupbundle"]) {
      await writeFolder(
        `${dir}/${name}`,
        writeSparsebundle(disk, { bandSize: band, trim: true }),
      );
      const r = await cli([
        "convert",
        "-O",
        "raw",
        `${dir}/${name}`,
        `${dir}/disk.raw`,
      ]);
      assertEquals(r.code, 0, r.stderr);
      assertEquals(
        sha256Hex(await Deno.readFile(`${dir}/disk.raw`)),
        sha256Hex(disk),
      );
    }
    const info = await cli([
      "info",
      "--output=json",
      `${dir}/disk.sparsebundle`,
    ]);
    const parsed = JSON.parse(info.text);
    assertEquals(parsed.format, "sparsebundle", info.stderr);
    assertEquals(parsed["virtual-size"], disk.length);
    // directoryTree works the same from the API.
    assertEquals(
      sha256Hex(await decode(await directoryTree(`${dir}/disk.sparsebundle`))),
      sha256Hex(disk),
    );
  });
});

Deno.test("an Info.plist opened alone is recognised and refused with what to open instead", async () => {
  const plist = new TextEncoder().encode(bundlePlist(8 << 20, 1 << 30));
  assertEquals((await probe(fromBytes(plist)))[0].format, "sparsebundle");
  await rejects(
    () => open(fromBytes(plist)),
    UnsupportedError,
    /open the \.sparsebundle folder/,
  );
});

const bundle = () =>
  writeSparsebundle(diskOf(4 * KiB, 8, [2]), { bandSize: 4 * KiB });
const enc = (s: string) => new TextEncoder().encode(s);
const broken: [string, () => Record<string, Uint8Array | null>, RegExp][] = [
  ["no Info.plist", () => {
    const f = bundle();
    delete f["Info.plist"];
    return f;
  }, /no Info.plist/],
  [
    "an Info.plist that is not XML",
    () => ({ ...bundle(), "Info.plist": enc("{}") }),
    /Info.plist/,
  ],
  ["another bundle type", () => ({
    ...bundle(),
    "Info.plist": enc(bundlePlist(4096, 8192, { type: "com.example.other" })),
  }), /diskimage-bundle-type "com.example.other"/],
  ["band-size 0", () => ({
    ...bundle(),
    "Info.plist": enc(bundlePlist(0, 8192)),
  }), /band-size 0/],
  ["a huge band-size", () => ({
    ...bundle(),
    "Info.plist": enc(bundlePlist(2 ** 40, 8192)),
  }), /band-size/],
  ["a huge size", () => ({
    ...bundle(),
    "Info.plist": enc(bundlePlist(4096, 2 ** 60)),
  }), /size \d{19} must be an integer/],
  ["no bands folder", () => {
    const f = bundle();
    for (const k of Object.keys(f)) if (k.startsWith("bands")) delete f[k];
    return f;
  }, /no bands folder/],
  ["a band file longer than band-size", () => ({
    ...bundle(),
    "bands/3": new Uint8Array(4097),
  }), /bands\/3 size 4097/],
  ["a band named twice", () => ({
    ...bundle(),
    "bands/03": new Uint8Array(10),
  }), /band 3/],
];
/** A tree that counts the bytes read from it. */
function counting(tree: Tree) {
  let bytes = 0;
  let reads = 0;
  const counted: Tree = {
    list: (path) => tree.list(path),
    read(path, offset, length) {
      reads++;
      bytes += length;
      return tree.read(path, offset, length);
    },
  };
  return { tree: counted, reads: () => reads, bytesRead: () => bytes };
}

for (const [what, make, message] of broken) {
  Deno.test(`a sparse bundle with ${what} is a typed error, with bounded work`, async () => {
    const files = make();
    const total = Object.values(files).reduce(
      (n, f) => n + (f?.length ?? 0),
      0,
    );
    const counted = counting(memoryTree(files));
    await rejects(
      () =>
        openSparsebundle(counted.tree).then((i) => convert(i, memorySink())),
      ImageFormatError,
      message,
    );
    assertBoundedWork(counted, total, 10, 1);
  });
}

Deno.test("band-size and size written as strings (as some writers do) read the same", async () => {
  const band = 4 * KiB;
  const disk = diskOf(band, 5, [1]);
  const files = writeSparsebundle(disk, { bandSize: band });
  files["Info.plist"] = enc(
    new TextDecoder().decode(files["Info.plist"]!)
      .replace(`<integer>${band}</integer>`, `<string>${band}</string>`)
      .replace(
        `<integer>${disk.length}</integer>`,
        `<string>${disk.length}</string>`,
      ),
  );
  assertEquals(sha256Hex(await decode(memoryTree(files))), sha256Hex(disk));
});

Deno.test("a token cut inside its encrcdsa header is a typed error; backing store version 2 is refused by name", async () => {
  // Encrypted bundles are read (tests/sparsebundle_encrypted_test.ts).
  await rejects(
    () =>
      openSparsebundle(memoryTree({
        ...bundle(),
        "token": enc("encrcdsa\0\0\0\x02"),
      })),
    ImageFormatError,
    /file size 12 must be at least 76 bytes \(the encrcdsa header\)/,
  );
  await rejects(
    () =>
      openSparsebundle(memoryTree({
        ...bundle(),
        "Info.plist": enc(bundlePlist(4096, 8192, { version: "2" })),
      })),
    UnsupportedError,
    /version 2/,
  );
});

Deno.test("band files past the disk's end and other files are not part of the disk", async () => {
  const band = 4 * KiB;
  const disk = diskOf(band, 4, []);
  const image = await openSparsebundle(memoryTree({
    ...writeSparsebundle(disk, { bandSize: band }),
    "bands/9": pseudoRandom(band, 3),
    "bands/.DS_Store": new Uint8Array(5),
  }));
  assertEquals(image.details?.bandsPastTheEnd, 1);
  assertEquals(image.details?.otherFiles, 1);
  const sink = memorySink();
  await convert(image, sink);
  assertEquals(sha256Hex(sink.bytes()), sha256Hex(disk));
});

Deno.test("500 seeded mutants of a bundle's Info.plist and band files end in success or a typed error", async () => {
  const random = rng(14);
  const base = writeSparsebundle(diskOf(4 * KiB, 8, [2]), {
    bandSize: 4 * KiB,
  });
  for (let i = 0; i < 500; i++) {
    const files = { ...base };
    const target = i % 3 === 0 ? "Info.plist" : `bands/${(i % 8).toString(16)}`;
    if (files[target]) files[target] = mutate(files[target]!, random).bytes;
    try {
      const image = await openSparsebundle(memoryTree(files));
      await convert(image, memorySink());
    } catch (e) {
      if (!isTypedError(e)) {
        throw new Error(`mutant ${i} of ${target}: ${(e as Error).stack}`);
      }
    }
  }
});
