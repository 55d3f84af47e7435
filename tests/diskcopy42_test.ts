import { assertEquals } from "./_asserts.ts";
import {
  ChecksumError,
  convert,
  fromBytes,
  ImageFormatError,
  memorySink,
  open,
  probe,
  UnsupportedError,
} from "../mod.ts";
import {
  assertBoundedWork,
  cli,
  countingSource,
  pseudoRandom,
  rejects,
  sha256Hex,
  withTemp,
} from "./_helpers.ts";
import { wrapMacBinary, writeDiskCopy42 } from "./_apple_writers.ts";

/** An 800K floppy's worth of bytes, with an empty stretch. */
function floppy(): Uint8Array {
  const data = pseudoRandom(800 * 1024, 11);
  data.fill(0, 100_000, 300_000);
  return data;
}

async function decode(file: Uint8Array) {
  const image = await open(fromBytes(file, "disk.image"));
  const sink = memorySink();
  await convert(image, sink);
  return { image, bytes: sink.bytes() };
}

Deno.test("a DiskCopy 4.2 image decodes to its disk data; info shows the name, format byte and checksums", async () => {
  const data = floppy();
  const file = writeDiskCopy42(data, {
    name: "System Tools",
    formatByte: 0x22,
  });
  const { image, bytes } = await decode(file);
  assertEquals(image.format, "diskcopy42");
  assertEquals(sha256Hex(bytes), sha256Hex(data));
  assertEquals(image.details?.diskName, "System Tools");
  assertEquals(image.details?.formatByte, "0x22");
  assertEquals(image.details?.diskFormat, 1);
  assertEquals(image.details?.diskFormatName, "800K GCR");
  assertEquals(image.details?.checksums, "verified");
});

Deno.test("the disk name is Mac OS Roman text", async () => {
  const file = writeDiskCopy42(floppy(), { name: "Syst\x8fme" }); // 0x8f: è
  assertEquals((await decode(file)).image.details?.diskName, "Système");
});

Deno.test("tag data is checked (its first 12 bytes left out) and not part of the disk", async () => {
  const data = pseudoRandom(400 * 1024, 5);
  const tags = pseudoRandom(800 * 12, 6);
  const file = writeDiskCopy42(data, { tags, diskFormat: 0, formatByte: 0x02 });
  const { image, bytes } = await decode(file);
  assertEquals(sha256Hex(bytes), sha256Hex(data));
  assertEquals(image.details?.tagSize, tags.length);
  // The first 12 tag bytes are outside the checksum: changing them is fine.
  file[84 + data.length] ^= 0xff;
  assertEquals(sha256Hex((await decode(file)).bytes), sha256Hex(data));
});

Deno.test("a DiskCopy image inside a MacBinary II wrapper (with a resource fork) reads the same", async () => {
  const data = floppy();
  const file = wrapMacBinary(writeDiskCopy42(data, { name: "Wrapped" }), {
    resourceFork: pseudoRandom(300, 2),
  });
  const { image, bytes } = await decode(file);
  assertEquals(sha256Hex(bytes), sha256Hex(data));
  assertEquals(image.details?.diskName, "Wrapped");
  assertEquals(
    (image.details?.macBinary as { type: string }).type,
    "dImg",
  );
  assertEquals((await probe(fromBytes(file)))[0].format, "diskcopy42");
});

Deno.test("a MacBinary I wrapper (no CRC) reads too", async () => {
  const data = pseudoRandom(1440 * 1024, 9);
  const file = wrapMacBinary(
    writeDiskCopy42(data, { diskFormat: 3, formatByte: 0x22 }),
    {
      version: 0,
    },
  );
  assertEquals(sha256Hex((await decode(file)).bytes), sha256Hex(data));
});

Deno.test("the CLI converts a DiskCopy 4.2 image to the raw disk", async () => {
  const data = floppy();
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/disk.image`, writeDiskCopy42(data));
    const r = await cli([
      "convert",
      "-O",
      "raw",
      `${dir}/disk.image`,
      `${dir}/disk.raw`,
    ]);
    assertEquals(r.code, 0, r.stderr);
    assertEquals(
      sha256Hex(await Deno.readFile(`${dir}/disk.raw`)),
      sha256Hex(data),
    );
    const info = await cli(["info", `${dir}/disk.image`]);
    assertEquals(/Test Disk/.test(info.text), true, info.text + info.stderr);
  });
});

Deno.test("a bad data checksum is a ChecksumError naming both sums", async () => {
  const file = writeDiskCopy42(floppy());
  file[84 + 5000] ^= 1;
  await rejects(
    () => open(fromBytes(file)),
    ChecksumError,
    /dataChecksum mismatch: stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}/,
  );
});

Deno.test("verify=off (convert --no-verify) reads an image whose checksums are stale", async () => {
  const data = floppy();
  const file = writeDiskCopy42(data);
  file[84 + 5000] ^= 1;
  data[5000] ^= 1;
  const image = await open(fromBytes(file), { options: { verify: "off" } });
  assertEquals(image.details?.checksums, "not checked (verify=off)");
  const sink = memorySink();
  await convert(image, sink);
  assertEquals(sha256Hex(sink.bytes()), sha256Hex(data));
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/stale.image`, file);
    const refused = await cli([
      "convert",
      `${dir}/stale.image`,
      `${dir}/a.raw`,
    ]);
    assertEquals(refused.code, 1);
    assertEquals(
      /dataChecksum mismatch/.test(refused.stderr),
      true,
      refused.stderr,
    );
    const r = await cli([
      "convert",
      "--no-verify",
      `${dir}/stale.image`,
      `${dir}/b.raw`,
    ]);
    assertEquals(r.code, 0, r.stderr);
    assertEquals(
      sha256Hex(await Deno.readFile(`${dir}/b.raw`)),
      sha256Hex(data),
    );
  });
});

Deno.test("a bad tag checksum is a ChecksumError", async () => {
  const data = pseudoRandom(400 * 1024, 5);
  const file = writeDiskCopy42(data, { tags: pseudoRandom(800 * 12, 6) });
  file[84 + data.length + 100] ^= 1;
  await rejects(() => open(fromBytes(file)), ChecksumError, /tagChecksum/);
});

Deno.test("a bad MacBinary CRC is a ChecksumError", async () => {
  const file = wrapMacBinary(writeDiskCopy42(floppy()));
  file[30] ^= 1; // inside the name field, covered by the CRC
  await rejects(
    () => open(fromBytes(file), { format: "diskcopy42" }),
    ChecksumError,
    /MacBinary header CRC/,
  );
});

Deno.test("an NDIF image (DiskCopy 6) in a MacBinary wrapper is recognised and refused by name", async () => {
  const file = wrapMacBinary(pseudoRandom(4096, 1), {
    type: "rohd",
    creator: "ddsk",
  });
  assertEquals((await probe(fromBytes(file)))[0].format, "diskcopy42");
  await rejects(() => open(fromBytes(file)), UnsupportedError, /NDIF/);
});

const view = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset);
const broken: [string, (b: Uint8Array) => Uint8Array, RegExp][] = [
  ["a truncated header", (b) => b.slice(0, 60), /./],
  ["data cut short", (b) => b.slice(0, 84 + 1000), /dataSize 819200/],
  [
    "a huge dataSize",
    (b) => (view(b).setUint32(64, 0xfffffe00), b),
    /dataSize 4294966784/,
  ],
  [
    "a dataSize not a multiple of 512",
    (b) => (view(b).setUint32(64, 1000), b),
    /multiple of 512/,
  ],
  [
    "a tagSize not a multiple of 12",
    (b) => (view(b).setUint32(68, 13), b),
    /multiple of 12/,
  ],
  ["a name longer than 63", (b) => ((b[0] = 64), b), /diskName length 64/],
  [
    "a wrong private word",
    (b) => (view(b).setUint16(82, 0x0200), b),
    /private/,
  ],
];
for (const [what, poke, message] of broken) {
  Deno.test(`a DiskCopy image with ${what} is a typed error, with bounded work`, async () => {
    const file = poke(writeDiskCopy42(floppy()));
    const counted = countingSource(file);
    await rejects(
      () => open(counted.source, { format: "diskcopy42" }),
      ImageFormatError,
      message,
    );
    assertBoundedWork(counted, file.length, 100, 2);
  });
}

Deno.test("a MacBinary data fork longer than the file is a typed error", async () => {
  const file = wrapMacBinary(writeDiskCopy42(floppy()), { version: 0 });
  view(file).setUint32(83, 0x7fffffff);
  await rejects(
    () => open(fromBytes(file), { format: "diskcopy42" }),
    ImageFormatError,
    /data fork length/,
  );
});
