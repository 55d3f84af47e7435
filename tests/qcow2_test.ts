// qcow2: images made by qemu-img and written by qemu-io read to the bytes of
// `qemu-img convert -O raw`; malformed images end in typed errors.

import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  decryptBlock,
  encryptBlock,
  expandKey,
  xtsSectors,
} from "../streams/_aes.ts";
import { deflateRawSync } from "node:zlib";
import { alignUp } from "../drivers/_binary.ts";
import {
  BackingFileError,
  convert,
  create,
  createOutputFile,
  decrypt,
  fileBackingResolver,
  fileResolver,
  fromBytes,
  fromFile,
  type Image,
  ImageFormatError,
  KeyError,
  memorySink,
  open,
  type OpenOptions,
  OptionError,
  probe,
  UnsupportedError,
} from "../mod.ts";
import {
  assertBoundedWork,
  assertQemuIdentical,
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

const QEMU = ["qemu-img", "qemu-io"];

/**
 * The folder of `path`. qemu-img and qemu-io run there: QEMU opens a
 * relative data_file name from its working folder (not the image's).
 */
const folder = (path: string) => path.slice(0, path.lastIndexOf("/"));

/** Creates a qcow2 at `path` with `-o options`, then runs qemu-io's `commands` on it. */
async function qemuImage(
  path: string,
  size: string,
  options: string[],
  commands: string[] = [],
) {
  // In the image's folder: qemu-img creates a relative data_file there.
  await run("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    ...(options.length ? ["-o", options.join(",")] : []),
    path,
    size,
  ], { cwd: folder(path) });
  if (commands.length) {
    await run("qemu-io", [
      "-f",
      "qcow2",
      ...commands.flatMap((c) => ["-c", c]),
      path,
    ], { cwd: folder(path) });
  }
}

/** SHA-256 of `qemu-img convert -O raw` of the image (with `args` before it). */
async function qemuRawHash(
  dir: string,
  path: string,
  args: string[] = [],
): Promise<string> {
  const out = `${dir}/qemu-out.raw`;
  await run("qemu-img", ["convert", ...args, "-O", "raw", path, out], {
    cwd: folder(path),
  });
  const hash = await sha256File(out);
  await Deno.remove(out);
  return hash;
}

/** Opens a file with its backing chain and data files allowed beside it. */
async function openFile(
  path: string,
  options: OpenOptions = {},
): Promise<Image> {
  return await open(await fromFile(path), {
    resolveBacking: fileBackingResolver(path),
    resolveFile: fileResolver(path),
    ...options,
  });
}

/** SHA-256 of every byte of `image`, read in 1 MiB pieces at odd offsets too. */
async function imageHash(image: Image): Promise<string> {
  const whole = new Uint8Array(image.size);
  const piece = 1 << 20;
  for (let at = 0; at < image.size; at += piece) {
    whole.set(await image.read(at, Math.min(piece, image.size - at)), at);
  }
  // An unaligned read across clusters matches the whole read.
  if (image.size > 70000) {
    const odd = await image.read(1000, 69000);
    assertEquals(sha256Hex(odd), sha256Hex(whole.subarray(1000, 70000)));
  }
  return sha256Hex(whole);
}

/** Asserts that our reading of the image at `path` matches qemu-img's. */
async function assertReadsLikeQemu(
  dir: string,
  path: string,
  options: OpenOptions = {},
  qemuArgs: string[] = [],
) {
  const image = await openFile(path, options);
  try {
    assertEquals(
      await imageHash(image),
      await qemuRawHash(dir, path, qemuArgs),
    );
  } finally {
    await image.close?.();
  }
}

/** Writes of data, zeros and discards scattered over a 64 MiB disk. */
const WRITES = [
  "write -P 0x11 0 64k",
  "write -P 0x22 1000448 3584",
  "write -P 0x33 5M 2M",
  "write -z 6M 64k",
  "discard 5M 64k",
  "write -P 0x44 33M 512",
  "write -P 0x55 63M 1M",
  "write -z 40M 8M",
];

const CASES: { name: string; options: string[]; commands?: string[] }[] = [
  { name: "compat 0.10", options: ["compat=0.10"] },
  { name: "compat 1.1", options: ["compat=1.1"] },
  { name: "512-byte clusters", options: ["cluster_size=512"] },
  { name: "4 KiB clusters", options: ["cluster_size=4096"] },
  { name: "2 MiB clusters", options: ["cluster_size=2M"] },
  { name: "refcount_bits 1", options: ["refcount_bits=1"] },
  { name: "refcount_bits 64", options: ["refcount_bits=64"] },
  { name: "lazy refcounts", options: ["lazy_refcounts=on"] },
  { name: "preallocation metadata", options: ["preallocation=metadata"] },
  { name: "extended L2", options: ["extended_l2=on"] },
  {
    name: "extended L2 with 2 MiB clusters",
    options: ["extended_l2=on", "cluster_size=2M"],
  },
  {
    name: "extended L2 with 16 KiB clusters",
    options: ["extended_l2=on", "cluster_size=16k"],
  },
];

for (const c of CASES) {
  Deno.test(
    `qcow2 ${c.name}: reads as qemu-img convert does after qemu-io writes`,
    { ignore: skip(QEMU) },
    () =>
      withTemp(async (dir) => {
        const path = `${dir}/a.qcow2`;
        await qemuImage(path, "64M", c.options, c.commands ?? WRITES);
        await assertReadsLikeQemu(dir, path);
      }),
  );
}

Deno.test(
  "qcow2 extended L2: subcluster writes, zero writes and discards keep their kinds",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/a.qcow2`;
      // 64 KiB clusters: 2 KiB subclusters.
      await qemuImage(path, "1M", ["extended_l2=on"], [
        "write -P 1 0 2k",
        "write -P 2 6k 2k",
        "write -z 2k 2k",
        "write -P 3 64k 64k",
        "discard 66k 2k",
        "write -z 128k 64k",
      ]);
      await assertReadsLikeQemu(dir, path);
      const image = await openFile(path);
      const kinds: string[] = [];
      for await (const e of image.extents(0, 12288)) {
        kinds.push(`${e.kind}:${e.offset}+${e.length}`);
      }
      assertEquals(kinds, [
        "data:0+2048",
        "zero:2048+2048",
        "unallocated:4096+2048",
        "data:6144+2048",
        "unallocated:8192+4096",
      ]);
      assertEquals((await image.read(6144, 1))[0], 2);
      await image.close?.();
    }),
);

Deno.test(
  "qcow2 -c: zlib-compressed clusters read as qemu-img's bytes",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const raw = `${dir}/disk.raw`;
      const disk = new Uint8Array(6 << 20);
      disk.set(pseudoRandom(1 << 20, 7), 0);
      const text = new TextEncoder().encode("compressible qcow2 text; ");
      for (let at = 2 << 20; at < (4 << 20); at += text.length) {
        disk.set(text.subarray(0, Math.min(text.length, (4 << 20) - at)), at);
      }
      disk.fill(9, (5 << 20) + 100, (5 << 20) + 5000);
      await Deno.writeFile(raw, disk);
      for (const cluster of ["512", "64k", "2M"]) {
        const path = `${dir}/c-${cluster}.qcow2`;
        await run("qemu-img", [
          "convert",
          "-c",
          "-O",
          "qcow2",
          "-o",
          `cluster_size=${cluster}`,
          raw,
          path,
        ]);
        const image = await openFile(path);
        assertEquals(await imageHash(image), sha256Hex(disk));
        await image.close?.();
      }
    }),
);

Deno.test(
  "qcow2 zstd: compressed clusters of compression_type zstd decode to qemu-img's bytes; a corrupt one is an error",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const raw = `${dir}/disk.raw`;
      // Compressible text, random bytes (stored uncompressed by qemu) and zeros.
      const disk = new Uint8Array(3 << 20);
      const words = new TextEncoder().encode("zstd clusters in a qcow2 ");
      for (let i = 0; i < 1 << 20; i++) disk[i] = words[i % words.length];
      disk.set(pseudoRandom(512 << 10, 9), 1 << 20);
      await Deno.writeFile(raw, disk);
      const path = `${dir}/z.qcow2`;
      await run("qemu-img", [
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd,cluster_size=65536",
        raw,
        path,
      ]);
      const expected = await qemuRawHash(dir, path);
      assertEquals(expected, sha256Hex(disk));
      const image = await openFile(path);
      assertEquals(image.details?.["compression-type"], "zstd");
      assertEquals(sha256Hex(await image.read(0, image.size)), expected);
      await image.close?.();
      // A compressed cluster's bytes poked: an error naming zstd, never bytes.
      const bytes = await Deno.readFile(path);
      const map = JSON.parse(
        (await run("qemu-img", ["map", "--output=json", path])).text,
      ) as { start: number; data: boolean; offset?: number }[];
      assertTrue(map.some((e) => e.data && e.offset === undefined));
      // The first compressed cluster's L2 entry gives its host offset.
      const broken = bytes.slice();
      const l1 = Number(new DataView(broken.buffer).getBigUint64(40));
      const l2 = Number(
        new DataView(broken.buffer).getBigUint64(l1) & 0x00fffffffffffe00n,
      );
      const entry = new DataView(broken.buffer).getBigUint64(l2);
      const hostBits = 62 - (16 - 8);
      const host = Number(entry & ((1n << BigInt(hostBits)) - 1n));
      broken.fill(0x55, host, host + 64);
      const bad = await open(fromBytes(broken));
      await rejects(() => bad.read(0, 65536), Error, /zstd/);
    }),
);

Deno.test(
  "qcow2 chain: a qcow2 over a qcow2 over a raw file, zero clusters in the top",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const base = `${dir}/base.raw`;
      await Deno.writeFile(base, pseudoRandom(4 << 20, 3));
      const mid = `${dir}/mid.qcow2`;
      await qemuImage(mid, "4M", ["backing_file=base.raw", "backing_fmt=raw"], [
        "write -P 0x66 1M 100k",
      ]);
      const top = `${dir}/top.qcow2`;
      await qemuImage(
        top,
        "6M",
        ["backing_file=mid.qcow2", "backing_fmt=qcow2", "cluster_size=4k"],
        ["write -z 0 8k", "write -P 0x77 1040k 4k", "write -z 3M 1M"],
      );
      await assertReadsLikeQemu(dir, top);
      const image = await openFile(top);
      assertEquals(image.backingFormat, "qcow2");
      assertEquals(image.backingFile, "mid.qcow2");
      await image.close?.();
      // Without the backing file, the unallocated bytes are refused.
      const alone = await open(await fromFile(top));
      assertEquals((await alone.read(0, 8192)).every((b) => b === 0), true);
      await rejects(() => alone.read(1 << 20, 512), BackingFileError);
      await alone.close?.();
    }),
);

Deno.test(
  "qcow2 external data file: data_file and data_file_raw read through the resolver",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      for (const rawData of ["off", "on"]) {
        const path = `${dir}/d-${rawData}.qcow2`;
        await qemuImage(
          path,
          "8M",
          [`data_file=d-${rawData}.data`, `data_file_raw=${rawData}`],
          ["write -P 0x12 0 64k", "write -P 0x34 3M 1M", "write -z 5M 64k"],
        );
        await assertReadsLikeQemu(dir, path);
        const image = await openFile(path);
        assertEquals(image.details?.["data-file"], `d-${rawData}.data`);
        assertEquals(image.details?.["data-file-raw"], rawData === "on");
        await image.close?.();
        await rejects(
          async () => await open(await fromFile(path)),
          ImageFormatError,
          /resolveFile/,
        );
      }
    }),
);

Deno.test(
  "qcow2 snapshots: listed in info; the active layer and a snapshot read as qemu-img's",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/s.qcow2`;
      await qemuImage(path, "4M", [], ["write -P 1 0 1M"]);
      await run("qemu-img", ["snapshot", "-c", "first", path]);
      await run("qemu-io", ["-f", "qcow2", "-c", "write -P 2 512k 1M", path]);
      await run("qemu-img", ["snapshot", "-c", "second", path]);
      await run("qemu-io", ["-f", "qcow2", "-c", "write -z 0 64k", path]);
      await assertReadsLikeQemu(dir, path);
      await assertReadsLikeQemu(dir, path, { options: { snapshot: "first" } }, [
        "-l",
        "first",
      ]);
      await assertReadsLikeQemu(dir, path, { options: { snapshot: "2" } }, [
        "-l",
        "second",
      ]);
      const image = await openFile(path);
      const snapshots = image.details?.snapshots as { name: string }[];
      assertEquals(snapshots.map((s) => s.name), ["first", "second"]);
      await image.close?.();
      await rejects(
        () => openFile(path, { options: { snapshot: "third" } }),
        ImageFormatError,
        /snapshot/,
      );
    }),
);

Deno.test(
  "qcow2 AES (encrypt.format=aes): reads with the passphrase, locked without",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/aes.qcow2`;
      const secret = ["--object", "secret,id=sec0,data=hunter2"];
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        ...secret,
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        path,
        "2M",
      ]);
      const opts = `driver=qcow2,file.filename=${path},encrypt.key-secret=sec0`;
      await run("qemu-io", [
        ...secret,
        "--image-opts",
        opts,
        "-c",
        "write -P 0x5a 4096 70000",
        "-c",
        "write -P 0x6b 1M 64k",
      ]);
      await run("qemu-img", [
        "convert",
        ...secret,
        "--image-opts",
        opts,
        "-O",
        "raw",
        `${dir}/aes.raw`,
      ]);
      const expected = await sha256File(`${dir}/aes.raw`);
      const image = await openFile(path, { key: "hunter2" });
      assertEquals(await imageHash(image), expected);
      await image.close?.();
      const locked = await openFile(path);
      assertTrue(locked.encrypted);
      await rejects(() => locked.read(4096, 512), KeyError);
      await locked.close?.();
    }),
);

/** A LUKS qcow2 made by qemu-img with `encrypt.*` options, written by qemu-io; its raw bytes' hash. */
async function qemuLuksImage(
  dir: string,
  path: string,
  encrypt: string[],
): Promise<string> {
  const secret = ["--object", "secret,id=sec0,data=hunter2"];
  const args = [
    "create",
    "-q",
    "-f",
    "qcow2",
    ...secret,
    "-o",
    [
      "encrypt.format=luks",
      "encrypt.key-secret=sec0",
      "encrypt.iter-time=10",
      ...encrypt,
    ].join(","),
    path,
    "3M",
  ];
  await run("qemu-img", args); // tried again on "accurate CPU usage"
  const opts = `driver=qcow2,file.filename=${path},encrypt.key-secret=sec0`;
  await run("qemu-io", [
    ...secret,
    "--image-opts",
    opts,
    "-c",
    "write -P 0x5a 4096 70000",
    "-c",
    "write -P 0x6b 2M 64k",
    "-c",
    "write -z 1M 64k",
  ]);
  await run("qemu-img", [
    "convert",
    ...secret,
    "--image-opts",
    opts,
    "-O",
    "raw",
    `${dir}/luks.raw`,
  ]);
  return await sha256File(`${dir}/luks.raw`);
}

const LUKS_CASES: [string, string[]][] = [
  ["aes-256-xts-plain64 (qemu-img's default)", []],
  ["aes-128-xts-plain64", ["encrypt.cipher-alg=aes-128"]],
  [
    "aes-256-cbc-plain64 with sha1",
    ["encrypt.cipher-mode=cbc", "encrypt.hash-alg=sha1"],
  ],
  [
    "aes-128-cbc-plain with sha512",
    [
      "encrypt.cipher-alg=aes-128",
      "encrypt.cipher-mode=cbc",
      "encrypt.ivgen-alg=plain",
      "encrypt.hash-alg=sha512",
    ],
  ],
];

for (const [name, encrypt] of LUKS_CASES) {
  Deno.test(
    `qcow2 LUKS ${name}: reads with the passphrase, a wrong one is a KeyError`,
    { ignore: skip(QEMU) },
    () =>
      withTemp(async (dir) => {
        const path = `${dir}/luks.qcow2`;
        const expected = await qemuLuksImage(dir, path, encrypt);
        const image = await openFile(path, { key: "hunter2" });
        assertEquals(await imageHash(image), expected);
        assertEquals(
          (image.details?.encrypt as { format: string }).format,
          "luks",
        );
        await image.close?.();
        await rejects(
          () => openFile(path, { key: "hunter3" }),
          KeyError,
          /wrong passphrase/,
        );
        // Opened locked, then decrypted: the key is checked at the first read.
        const locked = await openFile(path);
        assertTrue(locked.encrypted);
        await rejects(() => locked.read(4096, 512), KeyError);
        assertEquals(await imageHash(decrypt(locked, "hunter2")), expected);
        await rejects(
          () => decrypt(locked, "wrong").read(4096, 512),
          KeyError,
        );
        await locked.close?.();
      }),
  );
}

Deno.test("AES-192 and AES-256 blocks match FIPS-197 appendix C; XTS matches IEEE 1619 vector 4", () => {
  const hex = (s: string) =>
    new Uint8Array(s.match(/../g)!.map((h) => parseInt(h, 16)));
  const plain = "00112233445566778899aabbccddeeff";
  for (
    const [key, cipher] of [
      [
        "000102030405060708090a0b0c0d0e0f1011121314151617",
        "dda97ca4864cdfe06eaf70a0ec0d7191",
      ],
      [
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        "8ea2b7ca516745bfeafc49904b496089",
      ],
    ]
  ) {
    const expanded = expandKey(hex(key));
    const block = hex(plain);
    encryptBlock(expanded, block);
    assertEquals(block, hex(cipher));
    decryptBlock(expanded, block);
    assertEquals(block, hex(plain));
  }
  const sector = new Uint8Array(512).map((_, i) => i & 255);
  const k1 = expandKey(hex("27182818284590452353602874713526"));
  const k2 = expandKey(hex("31415926535897932384626433832795"));
  xtsSectors(k1, k2, 0, sector, true);
  assertEquals(
    sector.subarray(0, 32),
    hex("27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c"),
  );
  xtsSectors(k1, k2, 0, sector, false);
  assertEquals(sector[300], 300 & 255);
});

Deno.test(
  "qcow2 dirty bit: an image left dirty still reads, and info says so",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/dirty.qcow2`;
      await qemuImage(path, "2M", ["lazy_refcounts=on"], ["write -P 9 0 1M"]);
      const bytes = await Deno.readFile(path);
      bytes[79] |= 1;
      const image = await open(fromBytes(bytes));
      assertEquals(image.details?.dirty, true);
      assertEquals(image.details?.["lazy-refcounts"], true);
      assertEquals((await image.read(1000, 1))[0], 9);
    }),
);

// ---------------------------------------------------------------------------
// Malformed images

/** A small qemu-img image with data, compressed clusters and a snapshot. */
async function sampleImage(dir: string): Promise<Uint8Array> {
  const raw = `${dir}/s.raw`;
  const disk = new Uint8Array(1 << 20);
  disk.set(pseudoRandom(100000, 5), 4096);
  disk.fill(7, 600000, 700000);
  await Deno.writeFile(raw, disk);
  const path = `${dir}/s.qcow2`;
  await run("qemu-img", [
    "convert",
    "-c",
    "-O",
    "qcow2",
    "-o",
    "cluster_size=4k",
    raw,
    path,
  ]);
  await run("qemu-io", ["-f", "qcow2", "-c", "write -P 1 200k 8k", path]);
  return await Deno.readFile(path);
}

/** Opens `bytes` and reads all of it; the error, if any. */
async function readAll(bytes: Uint8Array): Promise<unknown> {
  const counted = countingSource(bytes);
  try {
    const image = await open(counted.source, { format: "qcow2" });
    for (let at = 0; at < image.size; at += 1 << 18) {
      await image.read(at, Math.min(1 << 18, image.size - at));
    }
    for await (const _ of image.extents(0, image.size)) { /* walk */ }
    return undefined;
  } catch (e) {
    return e;
  } finally {
    assertBoundedWork(counted, bytes.length, 2000, 8);
  }
}

/**
 * `bytes` with a deflate stream of twice a 4 KiB cluster of zeros appended
 * (sector aligned) and the compressed entry at `entryAt` pointing at it.
 */
function withBomb(bytes: Uint8Array, entryAt: number): Uint8Array {
  const bomb = deflateRawSync(new Uint8Array(8192), { windowBits: 12 });
  const at = alignUp(bytes.length, 512);
  const out = new Uint8Array(at + 512);
  out.set(bytes);
  out.set(bomb, at);
  new DataView(out.buffer).setBigUint64(entryAt, (1n << 62n) | BigInt(at));
  return out;
}

const poke = (bytes: Uint8Array, at: number, value: bigint, width: 4 | 8) => {
  const copy = bytes.slice();
  const v = new DataView(copy.buffer);
  if (width === 4) v.setUint32(at, Number(value));
  else v.setBigUint64(at, value);
  return copy;
};

Deno.test(
  "qcow2 malformed: poked header fields are refused with typed errors naming them",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const good = await sampleImage(dir);
      assertEquals(await readAll(good), undefined);
      const cases: [string, Uint8Array, RegExp][] = [
        ["version 4", poke(good, 4, 4n, 4), /version 4/],
        ["cluster_bits 8", poke(good, 20, 8n, 4), /cluster_bits 8/],
        ["cluster_bits 22", poke(good, 20, 22n, 4), /cluster_bits 22/],
        ["size 2^60", poke(good, 24, 1n << 60n, 8), /size/],
        ["size 2^52", poke(good, 24, 1n << 52n, 8), /l1_size/],
        ["crypt_method 3", poke(good, 32, 3n, 4), /crypt_method 3/],
        ["l1_size huge", poke(good, 36, 0xffffffffn, 4), /l1_size/],
        [
          "l1 outside",
          poke(good, 40, BigInt(good.length + 4096), 8),
          /l1_table_offset/,
        ],
        ["l1 unaligned", poke(good, 40, 4100n, 8), /l1_table_offset/],
        [
          "refcount table outside",
          poke(good, 48, 1n << 40n, 8),
          /refcount_table_offset/,
        ],
        [
          "refcount table huge",
          poke(good, 56, 1n << 20n, 4),
          /refcount_table_clusters/,
        ],
        ["snapshots huge", poke(good, 60, 1n << 20n, 4), /nb_snapshots/],
        ["unknown feature", poke(good, 72, 1n << 40n, 8), /bit 40/],
        ["refcount_order 7", poke(good, 96, 7n, 4), /refcount_order 7/],
        ["header_length 7", poke(good, 100, 7n, 4), /header_length 7/],
        [
          "backing name outside",
          poke(poke(good, 8, 4000n, 8), 16, 1000n, 4),
          /backing_file_offset/,
        ],
        [
          "backing name long",
          poke(poke(good, 8, 512n, 8), 16, 2000n, 4),
          /backing_file_size/,
        ],
      ];
      for (const [name, bytes, pattern] of cases) {
        const error = await readAll(bytes);
        assertTrue(
          error instanceof ImageFormatError,
          `${name}: ${error}`,
        );
        assertTrue(pattern.test((error as Error).message), `${name}: ${error}`);
      }
    }),
);

Deno.test(
  "qcow2 malformed: L1 and L2 entries pointing outside the file, truncation, inflation past the cluster",
  { ignore: skip(QEMU) },
  async () => {
    await withTemp(async (dir) => {
      const good = await sampleImage(dir);
      const v = new DataView(good.buffer);
      const l1At = Number(v.getBigUint64(40));
      const l2At = Number(v.getBigUint64(l1At) & 0x00fffffffffffe00n);
      // Find a compressed and a standard entry of the first L2 table.
      let compressed = -1;
      let standard = -1;
      for (let i = 0; i < 512; i++) {
        const e = v.getBigUint64(l2At + i * 8);
        if (e & (1n << 62n)) compressed = compressed < 0 ? i : compressed;
        else if (e !== 0n) standard = standard < 0 ? i : standard;
      }
      assertTrue(compressed >= 0 && standard >= 0);
      const cases: [string, Uint8Array][] = [
        ["l1 outside", poke(good, l1At, 1n << 50n, 8)],
        ["l1 reserved bits", poke(good, l1At, BigInt(l2At) | 1n, 8)],
        [
          "l2 outside",
          poke(good, l2At + standard * 8, (1n << 63n) | (1n << 50n), 8),
        ],
        [
          "l2 unaligned",
          poke(good, l2At + standard * 8, (1n << 63n) | 4608n, 8),
        ],
        [
          "l2 reserved",
          poke(good, l2At + standard * 8, (1n << 63n) | 4096n | 2n, 8),
        ],
        [
          "compressed outside",
          poke(good, l2At + compressed * 8, (1n << 62n) | (1n << 40n), 8),
        ],
        [
          "compressed garbage",
          // Points the compressed cluster at the (uncompressed) header.
          poke(
            good,
            l2At + compressed * 8,
            (1n << 62n) | (3n << 54n) | 600n,
            8,
          ),
        ],
        [
          "l1 onto the l1 table",
          poke(good, l1At, (1n << 63n) | BigInt(l1At), 8),
        ],
        ["l1 onto the header", poke(good, l1At, (1n << 63n) | 0n | 512n, 8)],
        [
          "l2 onto the refcount table",
          poke(
            good,
            l2At + standard * 8,
            (1n << 63n) | v.getBigUint64(48),
            8,
          ),
        ],
        ["compressed bomb", withBomb(good, l2At + compressed * 8)],
        ["truncated", good.slice(0, good.length - 5000)],
        ["truncated to the header", good.slice(0, 200)],
        ["truncated to 50 bytes", good.slice(0, 50)],
      ];
      for (const [name, bytes] of cases) {
        const error = await readAll(bytes);
        assertTrue(error instanceof ImageFormatError, `${name}: ${error}`);
      }
    });
  },
);

Deno.test("qcow2 probe: the magic with version 2 or 3 (or later) is qcow2, version 1 is qcow", async () => {
  const head = new Uint8Array(512);
  head.set([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);
  assertEquals((await probe(fromBytes(head)))[0].format, "qcow2");
  head[7] = 1;
  assertEquals((await probe(fromBytes(head)))[0].format, "qcow");
  head[7] = 9;
  assertEquals((await probe(fromBytes(head)))[0].format, "qcow2");
  await rejects(() => open(fromBytes(head)), UnsupportedError, /version 9/);
});

// ---------------------------------------------------------------------------
// Writing

/** A disk of random, text-like and zero runs, 6 MiB and a bit (not whole clusters). */
function sampleDisk(): Uint8Array<ArrayBuffer> {
  const disk = new Uint8Array((6 << 20) + 3000);
  disk.set(pseudoRandom(700000, 11), 4096);
  const text = new TextEncoder().encode("a line of a qcow2 text file; ");
  for (let at = 2 << 20; at < (4 << 20); at += text.length) {
    disk.set(text.subarray(0, Math.min(text.length, (4 << 20) - at)), at);
  }
  disk.fill(0x5c, (5 << 20) + 77, (5 << 20) + 9000);
  disk.fill(0xee, disk.length - 100);
  return disk;
}

/**
 * Asserts `qemu-img check` finds no error and no leak in the qcow2 at
 * `path`, or in the image `args` name (`--image-opts` with a secret).
 */
async function assertQemuCheckClean(path: string, args?: string[]) {
  const r = await run(
    "qemu-img",
    ["check", ...(args ?? ["-f", "qcow2", path])],
    { allowFail: true },
  );
  if (r.code !== 0 || !/No errors were found/.test(r.text)) {
    throw new Error(
      `qemu-img check ${path}: exit ${r.code}: ${r.text}${r.stderr}`,
    );
  }
}

const WRITE_CASES: Record<string, string>[] = [
  {},
  { compat: "0.10" },
  { cluster_size: "512" },
  { cluster_size: "4k", refcount_bits: "1" },
  { cluster_size: "2M", refcount_bits: "64" },
  { lazy_refcounts: "on", refcount_bits: "2" },
  { extended_l2: "on" },
  { preallocation: "metadata", cluster_size: "16k" },
];

Deno.test(
  "qcow2 convert -O qcow2 of a disk of many read chunks (every read buffer in turn), plain, zlib and zstd: qemu-img check is clean and compare identical",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      // 13 MiB: four 4 MiB chunks, so the three read buffers (and the
      // compressing workers' three slots) are each used, one twice.
      const disk = new Uint8Array(13 << 20);
      for (let at = 0; at < disk.length; at += 3 << 20) {
        disk.set(pseudoRandom(1 << 20, at), at);
        disk.fill(0x41, at + (2 << 20), at + (2 << 20) + 70000);
      }
      const raw = `${dir}/disk.raw`;
      await Deno.writeFile(raw, disk);
      const cases: [Record<string, string>, boolean][] = [
        [{}, false],
        [{}, true],
        [{ compression_type: "zstd" }, true],
      ];
      for (const [options, compress] of cases) {
        const path = `${dir}/out.qcow2`;
        const sink = await createOutputFile(path);
        await convert(await open(fromBytes(disk)), sink, {
          format: "qcow2",
          options,
          compress,
        });
        await sink.commit();
        await assertQemuCheckClean(path);
        await assertQemuIdentical(raw, path, "qcow2");
        await Deno.remove(path);
      }
    }),
);

for (const options of WRITE_CASES) {
  for (const compress of [false, true]) {
    Deno.test(
      `qcow2 convert -O qcow2 ${JSON.stringify(options)}${
        compress ? " -c" : ""
      }: qemu-img check is clean, compare identical, and it reads back`,
      { ignore: skip(QEMU) },
      () =>
        withTemp(async (dir) => {
          const disk = sampleDisk();
          const raw = `${dir}/disk.raw`;
          await Deno.writeFile(raw, disk);
          const path = `${dir}/out.qcow2`;
          const sink = await createOutputFile(path);
          await convert(await open(fromBytes(disk)), sink, {
            format: "qcow2",
            options,
            compress,
          });
          await sink.commit();
          await assertQemuCheckClean(path);
          await assertQemuIdentical(raw, path, "qcow2");
          const image = await openFile(path);
          assertEquals(image.size, alignUp(disk.length, 512));
          const back = await image.read(0, disk.length);
          assertEquals(sha256Hex(back), sha256Hex(disk));
          await image.close?.();
        }),
    );
  }
}

for (
  const options of [
    { "encrypt.format": "luks", "encrypt.iter-time": "10" },
    {
      "encrypt.format": "luks",
      "encrypt.iter-time": "10",
      "encrypt.cipher-alg": "aes-128",
      "encrypt.cipher-mode": "cbc",
      "encrypt.hash-alg": "sha1",
    },
    { "encrypt.format": "aes" },
  ] as Record<string, string>[]
) {
  Deno.test(
    `qcow2 convert -O qcow2 ${
      JSON.stringify(options)
    }: qemu-img reads it with the passphrase`,
    { ignore: skip(QEMU) },
    () =>
      withTemp(async (dir) => {
        const disk = sampleDisk().subarray(0, 3 << 20);
        const raw = `${dir}/disk.raw`;
        await Deno.writeFile(raw, disk);
        const path = `${dir}/out.qcow2`;
        const sink = await createOutputFile(path);
        await convert(await open(fromBytes(disk)), sink, {
          format: "qcow2",
          options,
          key: "hunter2",
        });
        await sink.commit();
        const secret = ["--object", "secret,id=sec0,data=hunter2"];
        const opts =
          `driver=qcow2,file.filename=${path},encrypt.key-secret=sec0`;
        await assertQemuCheckClean(path, [...secret, "--image-opts", opts]);
        const r = await run("qemu-img", [
          "compare",
          ...secret,
          "--image-opts",
          `driver=raw,file.filename=${raw}`,
          opts,
        ], { allowFail: true });
        assertEquals(r.code, 0, r.text + r.stderr);
        const image = await openFile(path, { key: "hunter2" });
        assertEquals(
          sha256Hex(await image.read(0, disk.length)),
          sha256Hex(disk),
        );
        await image.close?.();
      }),
  );
}

Deno.test("qcow2 write options: unknown keys and bad values are refused by name", async () => {
  const disk = await open(fromBytes(new Uint8Array(65536)));
  for (
    const [options, pattern] of [
      [{ colour: "blue" }, /unknown option 'colour'/],
      [{ cluster_size: "1000" }, /cluster_size/],
      [{ cluster_size: "4M" }, /cluster_size/],
      [{ refcount_bits: "3" }, /refcount_bits/],
      [{ compat: "0.10", lazy_refcounts: "on" }, /compat/],
      [{ extended_l2: "on", cluster_size: "4k" }, /cluster_size/],
      [{ compat: "2.0" }, /compat/],
      [{ data_file_raw: "on" }, /data_file_raw/],
      [{ compat: "0.10", data_file: "x.data" }, /compat/],
      [{ compat: "0.10", compression_type: "zstd" }, /compat/],
      [{ compression_type: "lz4" }, /compression_type/],
      [{ "encrypt.iter-time": "soon" }, /iter-time/],
    ] as [Record<string, string>, RegExp][]
  ) {
    await rejects(
      () => convert(disk, memorySink(), { format: "qcow2", options }),
      OptionError,
      pattern,
    );
  }
  // An external data file needs a way to make it, and takes no -c.
  await rejects(
    () =>
      convert(disk, memorySink(), {
        format: "qcow2",
        options: { data_file: "x.data" },
      }),
    UnsupportedError,
    /createFile/,
  );
  await rejects(
    () =>
      convert(disk, memorySink(), {
        format: "qcow2",
        options: { data_file: "x.data" },
        compress: true,
        createFile: () => Promise.resolve(memorySink()),
      }),
    UnsupportedError,
    /compressed/,
  );
  await rejects(
    () =>
      convert(disk, memorySink(), {
        format: "qcow2",
        options: { "encrypt.format": "luks" },
      }),
    KeyError,
  );
});

/** Writes of every shape: inside clusters, across them, unaligned, big. */
const SCATTERED: [number, number][] = [
  [0, 512],
  [1000, 70000],
  [65536 * 3 - 100, 300],
  [1 << 20, 1 << 20],
  [(3 << 20) + 17, 5000],
  [(8 << 20) - 4096, 4096],
];

/**
 * Creates a qcow2 with `options` (or opens `path` made by qemu-img),
 * applies `SCATTERED` writes through our writable open, and checks it
 * with qemu-img against a model of the bytes.
 */
async function writeAndCheck(
  dir: string,
  options: Record<string, string>,
  made?: { path: string; model: Uint8Array },
  key?: string,
) {
  const path = made?.path ?? `${dir}/w.qcow2`;
  const model = made?.model ?? new Uint8Array(8 << 20);
  if (!made) {
    const sink = await createOutputFile(path);
    const image = await create("qcow2", sink, {
      size: model.length,
      options,
      key,
    });
    await image.flush?.();
    await sink.commit();
  }
  const file = await fromFile(path, { write: true });
  const image = await open(file, { writable: true, sink: file, key });
  let seed = 3;
  for (const [at, length] of SCATTERED) {
    const bytes = pseudoRandom(length, seed++);
    await image.write!(at, bytes);
    model.set(bytes, at);
  }
  await image.flush!();
  await file.close();
  const raw = `${dir}/model.raw`;
  await Deno.writeFile(raw, model);
  if (key === undefined) {
    await assertQemuCheckClean(path);
    await assertQemuIdentical(raw, path, "qcow2");
  } else {
    const secret = ["--object", `secret,id=sec0,data=${key}`];
    const opts = `driver=qcow2,file.filename=${path},encrypt.key-secret=sec0`;
    await assertQemuCheckClean(path, [...secret, "--image-opts", opts]);
    const r = await run("qemu-img", [
      "compare",
      ...secret,
      "--image-opts",
      `driver=raw,file.filename=${raw}`,
      opts,
    ], { allowFail: true });
    assertEquals(r.code, 0, r.text + r.stderr);
  }
  const back = await openFile(path, { key });
  assertEquals(sha256Hex(await back.read(0, model.length)), sha256Hex(model));
  await back.close?.();
}

const CREATE_CASES: Record<string, string>[] = [
  {},
  { compat: "0.10" },
  { cluster_size: "512", refcount_bits: "64" },
  { cluster_size: "2M", refcount_bits: "1" },
  { extended_l2: "on", lazy_refcounts: "on" },
  { preallocation: "metadata" },
];

for (const options of CREATE_CASES) {
  Deno.test(
    `qcow2 create ${
      JSON.stringify(options)
    } and write: qemu-img check is clean and reads our bytes`,
    { ignore: skip(QEMU) },
    () => withTemp((dir) => writeAndCheck(dir, options)),
  );
}

Deno.test(
  "qcow2 write into qemu-img images: compressed, zero, discarded and extended-L2 clusters are rewritten cleanly",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      for (
        const [name, createOptions, compress] of [
          ["compressed", "cluster_size=64k", true],
          ["extended", "extended_l2=on", false],
          ["small clusters", "cluster_size=1k,refcount_bits=8", true],
        ] as [string, string, boolean][]
      ) {
        const disk = new Uint8Array(8 << 20);
        disk.set(sampleDisk());
        const raw = `${dir}/${name}.raw`;
        await Deno.writeFile(raw, disk);
        const path = `${dir}/${name}.qcow2`;
        await run("qemu-img", [
          "convert",
          ...(compress ? ["-c"] : []),
          "-O",
          "qcow2",
          "-o",
          createOptions,
          raw,
          path,
        ]);
        await run("qemu-io", [
          "-f",
          "qcow2",
          "-c",
          "write -z 3M 64k",
          "-c",
          "discard 4M 128k",
          "-c",
          "write -P 0x21 6M 2k",
          path,
        ]);
        disk.fill(0, 3 << 20, (3 << 20) + 65536);
        disk.fill(0, 4 << 20, (4 << 20) + 131072);
        disk.fill(0x21, 6 << 20, (6 << 20) + 2048);
        await writeAndCheck(dir, {}, { path, model: disk });
      }
    }),
);

Deno.test(
  "qcow2 create with LUKS and with AES, then write: qemu-img reads the bytes with the passphrase",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      await writeAndCheck(
        dir,
        { "encrypt.format": "luks", "encrypt.iter-time": "10" },
        undefined,
        "hunter2",
      );
      await writeAndCheck(dir, { "encrypt.format": "aes" }, undefined, "pw");
    }),
);

Deno.test(
  "qcow2 overlay: create -b over a qcow2 base, write through the chain, commit into the base",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const base = `${dir}/base.qcow2`;
      await qemuImage(base, "8M", ["cluster_size=4k"], [
        "write -P 0x33 0 8M",
        "write -z 1M 64k",
      ]);
      const top = `${dir}/top.qcow2`;
      const sink = await createOutputFile(top);
      const made = await create("qcow2", sink, {
        size: 8 << 20,
        backingFile: "base.qcow2",
        backingFormat: "qcow2",
      });
      await made.flush?.();
      await sink.commit();
      const expected = new Uint8Array(8 << 20).fill(0x33);
      expected.fill(0, 1 << 20, (1 << 20) + 65536);
      const file = await fromFile(top, { write: true });
      const chain = await open(file, {
        writable: true,
        sink: file,
        resolveBacking: fileBackingResolver(top),
      });
      let seed = 40;
      for (const [at, length] of SCATTERED) {
        const bytes = pseudoRandom(length, seed++);
        await chain.write!(at, bytes);
        expected.set(bytes, at);
      }
      await chain.flush!();
      await chain.close?.();
      await assertQemuCheckClean(top);
      const raw = `${dir}/expected.raw`;
      await Deno.writeFile(raw, expected);
      await assertQemuIdentical(raw, top, "qcow2");
      const info = JSON.parse(
        (await run("qemu-img", ["info", "--output=json", top])).text,
      );
      assertEquals(info["backing-filename-format"], "qcow2");
      // Commit into the qcow2 base (the CLI's commit).
      const r = await cli(["commit", top]);
      assertEquals(r.code, 0, r.stderr);
      await assertQemuCheckClean(base);
      await assertQemuIdentical(raw, base, "qcow2");
    }),
);

Deno.test(
  "qcow2 cli: convert -l reads a snapshot as qemu-img does, info lists snapshots, -l on a raw input is refused",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/s.qcow2`;
      await qemuImage(path, "2M", [], ["write -P 1 0 1M"]);
      await run("qemu-img", ["snapshot", "-c", "before", path]);
      await run("qemu-io", ["-f", "qcow2", "-c", "write -P 2 0 64k", path]);
      const ours = `${dir}/ours.raw`;
      const r = await cli(["convert", "-l", "before", path, ours]);
      assertEquals(r.code, 0, r.stderr);
      assertEquals(
        await sha256File(ours),
        await qemuRawHash(dir, path, ["-l", "before"]),
      );
      const info = await cli(["info", path]);
      assertTrue(/Snapshot list:\nID +TAG/.test(info.text), info.text);
      assertTrue(/^1 +before +0 B /m.test(info.text), info.text);
      const refused = await cli(["convert", "-l", "x", ours, `${dir}/x.raw`]);
      assertEquals(refused.code, 2);
    }),
);

Deno.test("qcow2 create and convert refuse sizes whose L1 table passes 32 MiB, before allocating", async () => {
  await rejects(
    () => create("qcow2", memorySink(), { size: 2 ** 60 }),
    ImageFormatError,
    /size/,
  );
  await rejects(
    () =>
      create("qcow2", memorySink(), {
        size: 2 ** 40,
        options: { cluster_size: "512" },
      }),
    ImageFormatError,
    /cluster_size/,
  );
  const huge = {
    size: 2 ** 52,
    read: () => Promise.reject(new Error("not read")),
  };
  await rejects(
    () =>
      convert(huge, memorySink(), {
        format: "qcow2",
        options: { cluster_size: "4k" },
      }),
    ImageFormatError,
    /size/,
  );
});

Deno.test(
  "qcow2 chains mixing formats: qcow2 over vmdk, qcow over qcow2, vpc under qcow2 with zero clusters",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const run1 = (args: string[]) => run("qemu-img", args, { cwd: dir });
      const io = (fmt: string, path: string, ...commands: string[]) =>
        run("qemu-io", [
          "-f",
          fmt,
          ...commands.flatMap((c) => ["-c", c]),
          path,
        ], { cwd: dir });
      await run1(["create", "-q", "-f", "vmdk", "base.vmdk", "4M"]);
      await io("vmdk", "base.vmdk", "write -P 0x41 0 4M");
      await run1([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        "mid.qcow2",
        "4M",
      ]);
      await io("qcow2", "mid.qcow2", "write -P 0x42 1M 64k", "write -z 2M 64k");
      await run1([
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow",
        "4M",
      ]);
      await io("qcow", "top.qcow", "write -P 0x43 3M 4k");
      await assertReadsLikeQemu(dir, `${dir}/top.qcow`);
      await run1(["create", "-q", "-f", "vpc", "base.vhd", "4M"]);
      await io("vpc", "base.vhd", "write -P 0x51 0 4M");
      await run1([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.vhd",
        "-F",
        "vpc",
        "over.qcow2",
        "4M",
      ]);
      await io("qcow2", "over.qcow2", "write -z 0 1M", "write -P 0x52 2M 512");
      await assertReadsLikeQemu(dir, `${dir}/over.qcow2`);
    }),
);

Deno.test(
  "qcow2 map --output=json equals qemu-img's (data with file offsets, zero and unallocated runs, compressed clusters)",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const plain = `${dir}/plain.qcow2`;
      await qemuImage(plain, "64M", ["cluster_size=4k"], WRITES);
      const raw = `${dir}/disk.raw`;
      await Deno.writeFile(raw, sampleDisk());
      const packed = `${dir}/packed.qcow2`;
      await run("qemu-img", ["convert", "-c", "-O", "qcow2", raw, packed]);
      for (const path of [plain, packed]) {
        const ours = await cli(["map", "--output=json", path]);
        assertEquals(ours.code, 0, ours.stderr);
        const theirs = await run("qemu-img", ["map", "--output=json", path]);
        assertEquals(ours.text, theirs.text);
      }
    }),
);

Deno.test(
  "qcow2 clusters stored past 2 GiB in the file: read, mapped and written (host offsets are not 32-bit signed numbers)",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      // Metadata preallocation maps every cluster of a 4 GiB disk in a
      // sparse file: guest 3 GiB lies past 2^31 in the file.
      const path = `${dir}/big.qcow2`;
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        path,
        "4G",
      ]);
      const at = 3 * 2 ** 30 + 65536;
      await run("qemu-io", [
        "-f",
        "qcow2",
        "-c",
        `write -P 0x6b ${at} 64k`,
        path,
      ]);
      const qemuMap = (await run("qemu-img", ["map", "--output=json", path]))
        .text;
      const map = JSON.parse(qemuMap) as {
        start: number;
        length: number;
        offset?: number;
      }[];
      const theirs = map.find((e) => e.start <= at && at < e.start + e.length)!;
      assertTrue(theirs.offset! > 2 ** 31, `${theirs.offset}`);
      const image = await open(await fromFile(path));
      assertEquals(
        await image.read(at, 65536),
        new Uint8Array(65536).fill(0x6b),
      );
      // The same file offsets; and qemu-img's map exactly, its runs split
      // where the file has a hole under data clusters ("zero": true there),
      // where the file system says (SEEK_DATA, through FFI).
      const oursText = (await cli(["map", "--output=json", path])).text;
      const ours = JSON.parse(oursText) as typeof map;
      assertEquals(oursText, qemuMap);
      const hostOf = (m: typeof map, guest: number) => {
        const e = m.find((e) => e.start <= guest && guest < e.start + e.length);
        return e?.offset === undefined ? undefined : e.offset + guest - e.start;
      };
      for (const guest of [0, 2 ** 31, at, at + 8192, 2 ** 32 - 512]) {
        assertEquals(hostOf(ours, guest), hostOf(map, guest), `${guest}`);
      }
      await image.close?.();
      // Written by us past 2 GiB: qemu-io reads it back, check is clean.
      await Deno.writeFile(`${dir}/data`, new Uint8Array(4096).fill(0x5e));
      const w = await cli(["write", path, `${at + 8192}`, `${dir}/data`]);
      assertEquals(w.code, 0, w.stderr);
      const read = await run("qemu-io", [
        "-f",
        "qcow2",
        "-c",
        `read -P 0x5e ${at + 8192} 4k`,
        "-c",
        `read -P 0x6b ${at} 8k`,
        path,
      ]);
      assertTrue(!/Pattern verification failed/.test(read.text), read.text);
      const check = await run("qemu-img", ["check", path], { allowFail: true });
      assertEquals(check.code, 0, check.text + check.stderr);
    }),
);

Deno.test(
  "map of a qcow2 with a hole punched in a data cluster's bytes: split where qemu deems the metadata preallocated, whole where not, as qemu-img map",
  { ignore: skip([...QEMU, "fallocate"]) },
  () =>
    withTemp(async (dir) => {
      // qemu looks into the file's holes only for a qcow2 whose refcounted
      // clusters outnumber the stored ones by more than a ninth (and 2):
      // 1 MiB of data less 128 KiB is such a qcow2, 64 MiB less 128 KiB
      // is not.
      for (const [data, split] of [["1M", true], ["64M", false]] as const) {
        const path = `${dir}/holed-${data}.qcow2`;
        await run("qemu-img", ["create", "-q", "-f", "qcow2", path, "128M"]);
        await run("qemu-io", [
          "-f",
          "qcow2",
          "-c",
          `write -P 0x33 0 ${data}`,
          path,
        ]);
        const map = JSON.parse(
          (await run("qemu-img", ["map", "--output=json", path])).text,
        ) as { offset?: number }[];
        await run("fallocate", [
          "--punch-hole",
          "--offset",
          `${map[0].offset! + 65536}`,
          "--length",
          "131072",
          path,
        ]);
        const qemuMap =
          (await run("qemu-img", ["map", "--output=json", path])).text;
        assertEquals(
          (await cli(["map", "--output=json", path])).text,
          qemuMap,
          data,
        );
        assertEquals(
          qemuMap.includes('"zero": true, "data": true'),
          split,
          qemuMap,
        );
      }
    }),
);
