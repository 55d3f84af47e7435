// Probing in two steps (issue 11): a file that carries a format's signature
// is that format, its broken header is that format's error, formats only
// recognised are refused by name, and raw is what remains.
import { assertEquals, assertTrue as assert } from "./_asserts.ts";
import {
  assertBoundedWork,
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
import {
  cloop,
  convert,
  cow,
  dmg,
  driver,
  fileResolver,
  formats,
  fromBytes,
  fromFile,
  ImageFormatError,
  KeyError,
  loadDriver,
  memorySink,
  open,
  probe,
  probedRawWarning,
  ProbedRawWriteError,
  qcow,
  UnknownFormatError,
  UnsupportedError,
  vmdk,
  vpc,
} from "../mod.ts";
import { withRecognised } from "../drivers/all.ts";
import { CATALOG } from "../drivers/_catalog.ts";
import { isTypedError } from "./_outcomes.ts";
import { RECOGNISED } from "../drivers/recognised.ts";
import { raw } from "../drivers/raw.ts";
import type { Driver, Image } from "../streams/types.ts";

/** One image qemu-img makes: the arguments after `-f`/`-O`, and the format it is. */
interface Made {
  /** A name for the test and the file. */
  name: string;
  /** The format as qemu-img names it (`-O`). */
  format: string;
  /** Extra qemu-img arguments (`-o ...`, `--object ...`). */
  args?: string[];
  /** The files besides the named one that make up the image (vmdk extents). */
  extents?: boolean;
}

const SECRET = ["--object", "secret,id=sec0,data=probe-test"];

/** Every output format qemu-img 7.2 has, with its subformats. */
const MADE: Made[] = [
  { name: "qcow2-v3", format: "qcow2" },
  { name: "qcow2-v2", format: "qcow2", args: ["-o", "compat=0.10"] },
  {
    name: "qcow2-luks",
    format: "qcow2",
    args: [
      ...SECRET,
      "-o",
      "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
    ],
  },
  { name: "qed", format: "qed" },
  { name: "vdi", format: "vdi" },
  { name: "vdi-static", format: "vdi", args: ["-o", "static=on"] },
  { name: "vhdx", format: "vhdx" },
  { name: "vhdx-fixed", format: "vhdx", args: ["-o", "subformat=fixed"] },
  { name: "parallels", format: "parallels" },
  {
    name: "luks",
    format: "luks",
    args: [...SECRET, "-o", "key-secret=sec0,iter-time=10"],
  },
  { name: "vpc", format: "vpc" },
  { name: "vpc-fixed", format: "vpc", args: ["-o", "subformat=fixed"] },
  { name: "vmdk", format: "vmdk" },
  {
    name: "vmdk-flat",
    format: "vmdk",
    args: ["-o", "subformat=monolithicFlat"],
    extents: true,
  },
  {
    name: "vmdk-2gb-sparse",
    format: "vmdk",
    args: ["-o", "subformat=twoGbMaxExtentSparse"],
    extents: true,
  },
  {
    name: "vmdk-2gb-flat",
    format: "vmdk",
    args: ["-o", "subformat=twoGbMaxExtentFlat"],
    extents: true,
  },
  {
    name: "vmdk-stream",
    format: "vmdk",
    args: ["-o", "subformat=streamOptimized"],
  },
  { name: "qcow", format: "qcow" },
  { name: "raw", format: "raw" },
];

/** qemu-img's block drivers that are protocols or filters, not image formats. */
const NOT_FORMATS = new Set([
  "blkdebug",
  "blklogwrites",
  "blkverify",
  "compress",
  "copy-before-write",
  "copy-on-read",
  "file",
  "ftp",
  "ftps",
  "gluster",
  "host_cdrom",
  "host_device",
  "http",
  "https",
  "iscsi",
  "iser",
  "nbd",
  "nfs",
  "null-aio",
  "null-co",
  "nvme",
  "preallocate",
  "quorum",
  "rbd",
  "replication",
  "snapshot-access",
  "ssh",
  "throttle",
]);

/** A 1 MiB disk with data, zeros and a pattern qemu-img must keep. */
function baseDisk(): Uint8Array {
  const disk = pseudoRandom(1 << 20, 11);
  disk.fill(0, 200_000, 600_000);
  return disk;
}

/** Runs qemu-img (`run` tries a LUKS timing failure again). */
async function qemuImg(args: string[], allowFail = false) {
  return await run("qemu-img", args, { allowFail });
}

/** Opens `path` as a user would: probed, extents beside it. */
async function openProbed(path: string): Promise<Image> {
  return await open(await fromFile(path), { resolveFile: fileResolver(path) });
}

/** sha256 of the image's whole virtual disk, read through the toolkit. */
async function decodedSha(image: Image): Promise<string> {
  const sink = memorySink();
  await convert(image, sink);
  return sha256Hex(sink.bytes());
}

Deno.test(
  "every image format qemu-img 7.2 writes is covered here",
  { ignore: skip(["qemu-img"]) },
  async () => {
    const help = (await run("qemu-img", ["--help"])).text;
    const listed = /Supported formats:(.*)/.exec(help)?.[1].trim().split(/\s+/);
    assert(listed && listed.length > 10, "qemu-img --help lists its formats");
    const names: string[] = listed;
    await withTemp(async (dir) => {
      const creatable: string[] = [];
      for (const name of names) {
        if (NOT_FORMATS.has(name)) continue;
        const r = await qemuImg(
          [
            "create",
            "-q",
            ...(name === "luks" ? [...SECRET] : []),
            "-f",
            name,
            ...(name === "luks" ? ["-o", "key-secret=sec0,iter-time=10"] : []),
            `${dir}/x.${name}`,
            "1M",
          ],
          true,
        );
        if (r.code === 0) creatable.push(name);
      }
      const covered = new Set(MADE.map((m) => m.format));
      assertEquals(creatable.filter((f) => !covered.has(f)), []);
      // And the ones it cannot create are read (bochs, cloop, dmg) or are
      // not image files (vvfat).
      for (const name of names) {
        if (NOT_FORMATS.has(name) || creatable.includes(name)) continue;
        assert(
          formats().some((d) => d.name === name),
          `${name}: qemu-img reads it, the toolkit has no driver`,
        );
      }
    });
  },
);

for (const made of MADE) {
  Deno.test(
    `a ${made.name} image made by qemu-img is decoded or refused as ${made.format}, never read as raw`,
    { ignore: skip(["qemu-img"]) },
    async () => {
      await withTemp(async (dir) => {
        const base = `${dir}/base.raw`;
        await Deno.writeFile(base, baseDisk());
        for (const how of ["create", "convert"]) {
          const path = `${dir}/${how}-${made.name}.img`;
          await qemuImg([
            ...(how === "create"
              ? [
                "create",
                "-q",
                ...(made.args ?? []),
                "-f",
                made.format,
                path,
                "1M",
              ]
              : [
                "convert",
                ...(made.args ?? []),
                "-f",
                "raw",
                "-O",
                made.format,
                base,
                path,
              ]),
          ]);
          const reads = !driver(made.format).recognisedOnly;
          if (!reads) {
            const e = await rejects(() => openProbed(path), UnsupportedError);
            assertEquals(
              (e as ImageFormatError).format,
              made.format,
              e.message,
            );
            assert(e.message.startsWith(`${made.format}: `), e.message);
            const [best] = await probe(await fromFile(path));
            assertEquals(best.format, made.format);
            continue;
          }
          const image = await openProbed(path);
          assertEquals(image.format, made.format, `${how}: ${path}`);
          if (made.format === "qcow2" && image.encrypted) {
            // Without its passphrase it opens locked: reading stored data
            // is a KeyError, never ciphertext (qcow2_test.ts decodes it
            // with the key).
            // (A new image holds no cluster: it reads as zeros, as in qemu.)
            if (how === "create") {
              assertEquals(
                await decodedSha(image),
                sha256Hex(new Uint8Array(image.size)),
              );
            } else await rejects(() => decodedSha(image), KeyError);
            await image.close?.();
            continue;
          }
          // The bytes, as qemu-img decodes them.
          const expected = `${dir}/expected.raw`;
          await qemuImg([
            "convert",
            ...(made.format === "luks" ? SECRET : []),
            // Named: qemu-img probes a fixed VHD as raw (its footer is last).
            "-f",
            made.format,
            "-O",
            "raw",
            path,
            expected,
          ]);
          assertEquals(await decodedSha(image), await sha256File(expected));
          await image.close?.();
        }
      });
    },
  );
}

/** A valid image of each driver we read, and pokes that break its header. */
interface Poke {
  name: string;
  format: string;
  image: () => Promise<Uint8Array>;
  /** Offset (negative: from the end) and the bytes written there. */
  at: number;
  bytes: number[];
  /** Cut the file to this many bytes afterwards. */
  truncate?: number;
  /** The field the error must name. */
  field: RegExp;
  tools?: string[];
  fileName?: string;
}

const be = (
  v: number,
) => [v >>> 24, (v >>> 16) & 255, (v >>> 8) & 255, v & 255];
const le = (v: number) => be(v).reverse();

async function encoded(d: Driver, options: Record<string, string> = {}) {
  const sink = memorySink();
  await d.encode!(fromBytes(baseDisk()), sink, { options });
  return sink.bytes();
}

async function created(d: Driver, options: Record<string, string> = {}) {
  const sink = memorySink();
  const image = await d.create!(sink, {
    size: 1 << 20,
    options,
    backingFile: d === cow ? "base.img" : undefined,
  });
  await image.write!(0, baseDisk().subarray(0, 65536));
  await image.flush!();
  return sink.bytes();
}

async function toolImage(cmd: string[], name: string): Promise<Uint8Array> {
  return await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/base.raw`, baseDisk());
    await run("sh", [
      "-c",
      `cd ${dir} && ${cmd.join(" ")} >/dev/null 2>&1`,
    ], { allowFail: true });
    return await Deno.readFile(`${dir}/${name}`);
  });
}

const POKES: Poke[] = [
  {
    name: "cloop block_size 0",
    format: "cloop",
    image: () => encoded(cloop),
    at: 128,
    bytes: be(0),
    field: /block_size 0/,
  },
  {
    name: "cloop block_size 513",
    format: "cloop",
    image: () => encoded(cloop),
    at: 128,
    bytes: be(513),
    field: /block_size 513 must be a multiple of 512/,
  },
  {
    name: "cloop made by create_compressed_fs, block_size 513",
    format: "cloop",
    image: () =>
      toolImage(["create_compressed_fs", "-B", "16384", "base.raw", "x"], "x"),
    tools: ["create_compressed_fs"],
    at: 128,
    bytes: be(513),
    field: /block_size 513/,
  },
  {
    name: "cloop version 4, header last, block_size 0",
    format: "cloop",
    image: () => encoded(cloop, { version: "4", header: "last" }),
    at: -128 - 8 + 128,
    bytes: be(0),
    field: /block_size 0/,
  },
  {
    name: "cloop cut short inside its 128-byte preamble",
    format: "cloop",
    image: () => encoded(cloop),
    at: 0,
    bytes: [],
    truncate: 121,
    field: /file size 121/,
  },
  ...[
    { format: "qcow", image: () => created(qcow), cut: 6, says: /file size 6/ },
    {
      format: "qcow",
      image: () => created(qcow),
      cut: 19,
      says: /file size 19/,
    },
    { format: "cow", image: () => created(cow), cut: 5, says: /file size 5/ },
    {
      format: "bochs",
      image: () =>
        toolImage(["bximage -func=create -hd=10M -imgmode=growing -q x"], "x"),
      tools: ["bximage"],
      cut: 24,
      says: /file size 24/,
    },
  ].map(({ format, image, cut, says, tools }): Poke => ({
    name: `${format} cut to ${cut} bytes (its magic and no more)`,
    format,
    image,
    tools,
    at: 0,
    bytes: [],
    truncate: cut,
    field: says,
  })),
  {
    name: "qcow version 0",
    format: "qcow",
    image: () => created(qcow),
    at: 4,
    bytes: be(0),
    field: /version 0 must be 1/,
  },
  {
    name: "qcow cluster_bits 40",
    format: "qcow",
    image: () => created(qcow),
    at: 32,
    bytes: [40],
    field: /cluster_bits 40/,
  },
  {
    name: "dmg koly version 5",
    format: "dmg",
    image: () => encoded(dmg),
    at: -512 + 4,
    bytes: be(5),
    field: /koly\.Version 5 must be 4/,
  },
  {
    name: "dmg koly header size 0",
    format: "dmg",
    image: () => encoded(dmg),
    at: -512 + 8,
    bytes: be(0),
    field: /koly\.HeaderSize 0/,
  },
  {
    name: "fixed VHD with a bad footer checksum",
    format: "vpc",
    image: () => created(vpc, { subformat: "fixed" }),
    at: -512 + 64,
    bytes: be(0x12345678),
    field: /checksum mismatch/,
  },
  {
    name: "fixed VHD made by qemu-img with a bad footer checksum",
    format: "vpc",
    image: () =>
      toolImage([
        "qemu-img convert -f raw -O vpc -o subformat=fixed base.raw x",
      ], "x"),
    tools: ["qemu-img"],
    at: -512 + 64,
    bytes: be(0x12345678),
    field: /checksum mismatch/,
  },
  {
    name: "dynamic VHD with a bad footer checksum",
    format: "vpc",
    image: () => created(vpc),
    at: 64,
    bytes: be(0x12345678),
    field: /checksum mismatch/,
  },
  {
    name: "bochs version 3",
    format: "bochs",
    image: () =>
      toolImage([
        "bximage -func=create -hd=10M -imgmode=growing -q x",
      ], "x"),
    tools: ["bximage"],
    at: 64,
    bytes: le(0x30000),
    field: /version 196608/,
  },
  {
    name: "bochs subtype unknown",
    format: "bochs",
    image: () =>
      toolImage([
        "bximage -func=create -hd=10M -imgmode=growing -q x",
      ], "x"),
    tools: ["bximage"],
    at: 48,
    bytes: [...new TextEncoder().encode("Shrinking"), 0],
    field: /subtype "Shrinking"/,
  },
  {
    name: "cow version 7",
    format: "cow",
    image: () => created(cow),
    at: 4,
    bytes: be(7),
    field: /version 7 must be 2 or 3/,
  },
  {
    name: "vmdk with a blank embedded descriptor, cut short",
    format: "vmdk",
    image: () => created(vmdk),
    at: 512,
    bytes: new Array(20 * 512).fill(0),
    truncate: 65535,
    field: /overHead 128|embedded descriptor/,
  },
  {
    name: "vmdk made by qemu-img with a blank embedded descriptor",
    format: "vmdk",
    image: () => toolImage(["qemu-img create -q -f vmdk x 1M"], "x"),
    tools: ["qemu-img"],
    at: 512,
    bytes: new Array(20 * 512).fill(0),
    field: /embedded descriptor "10240 blank bytes"/,
  },
  {
    name: "vmdk made by qemu-img with a blank descriptor, cut short",
    format: "vmdk",
    image: () => toolImage(["qemu-img create -q -f vmdk x 1M"], "x"),
    tools: ["qemu-img"],
    at: 512,
    bytes: new Array(20 * 512).fill(0),
    truncate: 65535,
    field: /overHead 128 must be at most 127 sectors/,
  },
  {
    name: "vmdk version 99",
    format: "vmdk",
    image: () => created(vmdk),
    at: 4,
    bytes: le(99),
    field: /version 99/,
  },
  {
    name: "file named .dmg without a koly trailer",
    format: "dmg",
    image: () => Promise.resolve(new Uint8Array(4096)),
    at: 0,
    bytes: [],
    fileName: "disk.dmg",
    field: /koly/,
  },
];

for (const poke of POKES) {
  Deno.test(
    `probed without -f, a ${poke.name} is a ${poke.format} error, not raw`,
    { ignore: skip(poke.tools ?? []) },
    async () => {
      const bytes = (await poke.image()).slice();
      // The unpoked image is this format.
      const [before] = await probe(fromBytes(bytes, poke.fileName));
      assertEquals(before.format, poke.format);
      bytes.set(poke.bytes, poke.at < 0 ? bytes.length + poke.at : poke.at);
      const mutant = bytes.subarray(0, poke.truncate ?? bytes.length);
      const [best] = await probe(fromBytes(mutant, poke.fileName));
      assertEquals(best.format, poke.format);
      const counted = countingSource(mutant);
      const source = poke.fileName
        ? { ...counted.source, name: poke.fileName }
        : counted.source;
      const e = await rejects(async () => {
        const image = await open(source);
        await convert(image, memorySink());
      }, ImageFormatError);
      assertEquals((e as ImageFormatError).format, poke.format, e.message);
      assert(poke.field.test(e.message), e.message);
      assertBoundedWork(counted, mutant.length);
    },
  );
}

/** A head of `size` bytes with `parts` set at their offsets. */
function head(size: number, parts: [number, number[] | string][]): Uint8Array {
  const b = new Uint8Array(size);
  for (const [at, v] of parts) {
    b.set(typeof v === "string" ? [...v].map((c) => c.charCodeAt(0)) : v, at);
  }
  return b;
}

const SIGNATURES: { format: string; bytes: Uint8Array; name?: string }[] = [
  { format: "qcow2", bytes: head(4096, [[0, "QFI\xfb"], [4, be(3)]]) },
  { format: "qcow2", bytes: head(4096, [[0, "QFI\xfb"], [4, be(4)]]) },
  { format: "qed", bytes: head(4096, [[0, "QED\0"]]) },
  { format: "vdi", bytes: head(4096, [[64, le(0xbeda107f)]]) },
  { format: "vhdx", bytes: head(4096, [[0, "vhdxfile"]]) },
  { format: "parallels", bytes: head(4096, [[0, "WithoutFreeSpace"]]) },
  { format: "parallels", bytes: head(4096, [[0, "WithouFreSpacExt"]]) },
  { format: "luks", bytes: head(4096, [[0, "LUKS\xba\xbe\0\x02"]]) },
  {
    format: "seSparse",
    bytes: head(4096, [[0, le(0xcafebabe)], [8, [1, 0, 0, 0, 2, 0, 0, 0]]]),
  },
  { format: "asif", bytes: head(4096, [[0, "shdw"], [4, be(1)]]) },
  { format: "sparseimage", bytes: head(4096, [[0, "sprs"], [4, be(3)]]) },
  {
    format: "diskcopy42",
    bytes: head(84 + 819200, [
      [0, [
        8,
        ..."Untitled".split("").map((c) => c.charCodeAt(0)),
      ]],
      [64, be(819200)],
      [80, [1, 0x22, 1, 0]],
    ]),
  },
  {
    format: "diskcopy42",
    bytes: head(128 + 84 + 409600, [
      [1, [8]],
      [2, "Untitled"],
      [65, "dImgdCpy"],
      [128 + 64, be(409600)],
      [128 + 80, [0, 0x12, 1, 0]],
    ]),
  },
  {
    format: "sparsebundle",
    bytes: new TextEncoder().encode(
      '<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0"><dict><key>diskimage-bundle-type</key><string>com.apple.diskimage.sparsebundle</string></dict></plist>\n',
    ),
  },
  {
    format: "dmg-segment",
    bytes: new Uint8Array(4096),
    name: "/archive/disk.002.dmgpart",
  },
  { format: "dmg-encrypted", bytes: head(4096, [[0, "encrcdsa"]]) },
  { format: "dmg-encrypted", bytes: head(4096, [[4088, "cdsaencr"]]) },
  { format: "vmdk", bytes: head(4096, [[0, "COWD"], [4, le(1)]]) },
];

for (const { format, bytes, name } of SIGNATURES) {
  const what = String.fromCharCode(...bytes.subarray(0, 8)).replace(
    /[^ -~]/g,
    ".",
  );
  Deno.test(
    `a file with the ${format} signature (${what}) and nothing else is ${format}'s error, never raw`,
    async () => {
      const [best] = await probe(fromBytes(bytes, name));
      assertEquals(best.format, format);
      const counted = countingSource(bytes);
      const source = name ? { ...counted.source, name } : counted.source;
      if (driver(format).recognisedOnly) {
        const e = await rejects(() => open(source), UnsupportedError);
        assertEquals((e as ImageFormatError).format, format, e.message);
      } else {
        // A reader: read as that format (the DiskCopy 4.2 header of an
        // all-zero disk is a valid image), or its own typed error.
        try {
          const image = await open(source);
          assertEquals(image.format, format);
          await convert(image, memorySink());
        } catch (e) {
          assert(isTypedError(e), String(e));
          if (e instanceof ImageFormatError) {
            assertEquals(e.format, format, e.message);
          }
        }
      }
      assertBoundedWork(counted, bytes.length, 50, 4);
    },
  );
}

Deno.test("compressed files are left to the wrappers: no recogniser claims gzip, xz, bzip2 or zstd", async () => {
  const magics: [string, number[]][] = [
    ["gzip", [0x1f, 0x8b, 8, 0]],
    ["xz", [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0]],
    ["bzip2", [0x42, 0x5a, 0x68, 0x39, 0x31, 0x41, 0x59, 0x26, 0x53, 0x59]],
    ["zstd", [0x28, 0xb5, 0x2f, 0xfd]],
    ["zstd skippable frame", [0x50, 0x2a, 0x4d, 0x18]],
  ];
  for (const [what, magic] of magics) {
    const bytes = pseudoRandom(65536, 3);
    bytes.set(magic);
    // Not even when named as a dmg (which QEMU probes by name).
    for (const name of [undefined, "disk.dmg"]) {
      const claimed = (await probe(fromBytes(bytes, name))).filter((r) =>
        r.format !== "raw"
      );
      assertEquals(claimed, [], `${what} ${name}`);
    }
  }
});

Deno.test("raw is chosen only when no signature matches", async () => {
  const [best, ...rest] = await probe(fromBytes(pseudoRandom(65536, 5)));
  assertEquals(best.format, "raw");
  assertEquals(rest, []);
});

Deno.test("a recognised format's entry gives way to a driver of the same name, keeping its signature", async () => {
  const strict: Driver = {
    name: "qcow2",
    description: "a reader that claims only version 3",
    probe: ({ head }) =>
      head.length >= 8 && head[0] === 0x51 && head[7] === 3 ? 100 : 0,
    open: () => Promise.reject(new Error("opened by the reader")),
  };
  const list = withRecognised([strict], RECOGNISED, raw);
  assertEquals(list.filter((d) => d.name === "qcow2").length, 1);
  const reader = list.find((d) => d.name === "qcow2")!;
  assert(reader.recognisedOnly !== true);
  // Version 2: the reader's probe says no, the recogniser's signature yes.
  const v2 = head(4096, [[0, "QFI\xfb"], [4, be(2)]]);
  assertEquals(reader.probe({ head: v2, tail: v2, size: 4096 }), 100);
  await rejects(() => reader.open(fromBytes(v2), {}), Error, /the reader/);
  assertEquals(list.at(-1), raw);
});

Deno.test("formats() lists the readers; formats({ recognised: true }) adds the recognised-only ones", () => {
  const readers = formats().map((d) => d.name);
  const all = formats({ recognised: true }).map((d) => d.name);
  assert(readers.includes("raw"));
  for (const d of formats({ recognised: true })) {
    assertEquals(readers.includes(d.name), d.recognisedOnly !== true, d.name);
  }
  for (const r of RECOGNISED) {
    if (!readers.includes(r.name)) assert(all.includes(r.name), r.name);
  }
  assertEquals(all.at(-1), "raw");
  assert(
    formats({ recognised: true }).filter((d) => d.recognisedOnly).every((d) =>
      !d.create && !d.encode
    ),
  );
});

Deno.test("an unknown format name is the same UnknownFormatError from driver() and loadDriver(), naming every known format", async () => {
  const loaded = await rejects(
    () => loadDriver("floppy"),
    UnknownFormatError,
    /^unknown format 'floppy' \(known: cloop, .*, raw\)$/,
  );
  const found = await rejects(
    () => Promise.resolve().then(() => driver("floppy")),
    UnknownFormatError,
  );
  assertEquals(found.message, loaded.message);
  assertEquals(driver("qcow2").name, "qcow2");
});

Deno.test("the catalog (probing without loading drivers) lists the drivers' names, order and probes, and loads each one", async () => {
  const drivers = formats({ recognised: true });
  assertEquals(CATALOG.map((e) => e.name), drivers.map((d) => d.name));
  // The reading drivers' probes are the catalog's functions themselves,
  // where no recogniser's signature was merged in (then both merge alike).
  const merged = new Set(RECOGNISED.map((r) => r.name));
  for (const [i, entry] of CATALOG.entries()) {
    const d = drivers[i];
    assertEquals(entry.recognisedOnly === true, d.recognisedOnly === true);
    const loaded = await entry.load();
    assertEquals(loaded.name, d.name);
    if (!merged.has(d.name)) assert(entry.probe === d.probe, d.name);
  }
  // Every probe answers alike on heads that carry each signature.
  const heads = [
    head(4096, [[0, "QFI\xfb"], [4, be(2)]]),
    head(4096, [[0, "QFI\xfb"], [4, be(1)]]),
    head(4096, [[0, "vhdxfile"]]),
    head(4096, [[0, "QED\0"]]),
    head(4096, [[0, "shdw"]]),
    head(4096, [[0, "sprs"]]),
    head(4096, [[0, "WithoutFreeSpace"]]),
    head(4096, [[0, "LUKS\xba\xbe"]]),
    head(4096, [[64, "\x7f\x10\xda\xbe"]]),
    head(4096, [[
      0,
      "<?xml version='1.0'?><plist>com.apple.diskimage.sparsebundle",
    ]]),
    pseudoRandom(4096, 9),
  ];
  for (const h of heads) {
    for (const name of ["a.img", "b.dmg", "c.001.dmgpart"]) {
      const input = { head: h, tail: h, size: h.length, name };
      assertEquals(
        CATALOG.map((e) => e.probe(input)),
        drivers.map((d) => d.probe(input)),
      );
    }
  }
});

/** A writable raw image of `size` bytes in memory, as `open` gives it. */
async function writableRaw(size: number, format?: string) {
  const sink = memorySink();
  await sink.write(0, new Uint8Array(size));
  const image = await open(sink.source(), { writable: true, sink, format });
  return { sink, image };
}

Deno.test("a raw image chosen by probing and opened writable carries QEMU's warning; -f raw or a read-only open does not", async () => {
  const { image } = await writableRaw(8192);
  assertEquals(image.format, "raw");
  assertEquals(image.probed, true);
  assertEquals(image.warnings, [probedRawWarning("(image)")]);
  const named = await writableRaw(8192, "raw");
  assertEquals(named.image.warnings, undefined);
  assertEquals(named.image.probed, undefined);
  const readOnly = await open(fromBytes(new Uint8Array(8192)));
  assertEquals(readOnly.probed, true);
  assertEquals(readOnly.warnings, undefined);
});

Deno.test("a write that would give block 0 of a probed raw image another format's signature is refused; -f raw allows it", async () => {
  const qcow2Head = head(16, [[0, "QFI\xfb"], [4, be(3)]]);
  const { sink, image } = await writableRaw(8192);
  const e = await rejects(
    () => image.write!(0, qcow2Head),
    ProbedRawWriteError,
  );
  assertEquals((e as ProbedRawWriteError).signature, "qcow2");
  assertEquals(sha256Hex(sink.bytes()), sha256Hex(new Uint8Array(8192)));
  // A write completing a signature with bytes already there is refused too.
  await image.write!(0, qcow2Head.subarray(0, 2));
  await rejects(
    () => image.write!(2, qcow2Head.subarray(2)),
    ProbedRawWriteError,
  );
  // The same bytes elsewhere, and harmless bytes in block 0, are written.
  await image.write!(4096, qcow2Head);
  await image.write!(0, new Uint8Array(512).fill(0x33));
  assertEquals(sink.bytes()[511], 0x33);
  // Named raw: written as asked.
  const named = await writableRaw(8192, "raw");
  await named.image.write!(0, qcow2Head);
  assertEquals(named.sink.bytes().subarray(0, 4), qcow2Head.subarray(0, 4));
});

Deno.test("cli write and commit print QEMU's warning for a probed raw image, not with -f raw, and refuse a signature in block 0", async () => {
  await withTemp(async (dir) => {
    const disk = `${dir}/disk.img`;
    await Deno.writeFile(disk, new Uint8Array(65536));
    await Deno.writeFile(`${dir}/hello`, new TextEncoder().encode("hello"));
    await Deno.writeFile(`${dir}/qcow2`, head(8, [[0, "QFI\xfb"], [4, be(3)]]));
    const warned = await cli(["write", disk, "4096", `${dir}/hello`]);
    assertEquals(warned.code, 0, warned.stderr);
    assert(/probing guessed raw/.test(warned.stderr), warned.stderr);
    const quiet = await cli([
      "write",
      "-f",
      "raw",
      disk,
      "4096",
      `${dir}/hello`,
    ]);
    assertEquals(quiet.code, 0, quiet.stderr);
    assertEquals(quiet.stderr, "");
    const refused = await cli(["write", disk, "0", `${dir}/qcow2`]);
    assertEquals(refused.code, 1);
    assert(/qcow2 signature into block 0/.test(refused.stderr), refused.stderr);
    assertEquals((await Deno.readFile(disk))[0], 0);
    const forced = await cli(["write", "-f", "raw", disk, "0", `${dir}/qcow2`]);
    assertEquals(forced.code, 0, forced.stderr);
    assertEquals((await Deno.readFile(disk))[0], 0x51);
    // commit into a raw base named by a qcow (which stores no backing format).
    const base = `${dir}/base.img`;
    await Deno.writeFile(base, new Uint8Array(65536));
    const top = `${dir}/top.qcow`;
    const made = await cli([
      "create",
      "-f",
      "qcow",
      "-b",
      "base.img",
      "-F",
      "raw",
      top,
      "64K",
    ]);
    assertEquals(made.code, 0, made.stderr);
    const w = await cli(["write", top, "8192", `${dir}/hello`]);
    assertEquals(w.code, 0, w.stderr);
    assertEquals(w.stderr, "");
    const committed = await cli(["commit", top]);
    assertEquals(committed.code, 0, committed.stderr);
    assert(/probing guessed raw/.test(committed.stderr), committed.stderr);
    assertEquals(
      new TextDecoder().decode(
        (await Deno.readFile(base)).subarray(8192, 8197),
      ),
      "hello",
    );
  });
});

Deno.test(
  "cli convert of a recognised-only image (LUKS) exits 1 naming the format and leaves no output; info says what it is",
  // Ignored once a driver reads LUKS volumes (the qemu-img tests above
  // then check its bytes).
  { ignore: skip(["qemu-img"]) || !driver("luks").recognisedOnly },
  async () => {
    await withTemp(async (dir) => {
      const image = `${dir}/disk.img`;
      await qemuImg([
        "create",
        "-q",
        ...SECRET,
        "-f",
        "luks",
        "-o",
        "key-secret=sec0,iter-time=10",
        image,
        "1M",
      ]);
      const r = await cli(["convert", image, `${dir}/out.raw`]);
      assertEquals(r.code, 1);
      assert(
        /^vdisk convert: luks: this is a LUKS encrypted volume/.test(r.stderr),
        r.stderr,
      );
      assertEquals([...Deno.readDirSync(dir)].map((e) => e.name), ["disk.img"]);
      const info = await cli(["info", "--output=json", image]);
      assertEquals(info.code, 1);
      const json = JSON.parse(info.text);
      assertEquals([json.format, json["recognised-only"]], ["luks", true]);
      const human = await cli(["info", image]);
      assert(
        /^file format: luks \(recognised only/m.test(human.text),
        human.text,
      );
      const list = JSON.parse((await cli(["formats", "--output=json"])).text);
      const luks = list.find((f: { name: string }) => f.name === "luks");
      assertEquals([luks.read, luks.recognisedOnly], [false, true]);
    });
  },
);
