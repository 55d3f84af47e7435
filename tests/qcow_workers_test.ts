// Compressed clusters of qcow2 (zlib and zstd) and qcow v1 decoded on the
// decode workers: a read over many of them goes to the workers, a small
// one stays on the caller's thread, both give qemu-img's bytes, and a
// broken cluster is the same typed error through the workers.

import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  convert,
  createOutputFile,
  decodeWorkerStats,
  fromBytes,
  fromFile,
  ImageFormatError,
  open,
} from "../mod.ts";
import {
  countingSource,
  pseudoRandom,
  rejects,
  run,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";
import { setNativeMinCluster } from "../drivers/codecs/_clusters.ts";
import { hasNativeInflate } from "../drivers/codecs/zlib.ts";

const QEMU = ["qemu-img"];

/** Text (compressible), random bytes (stored plain by qemu-img) and zeros: 4 MiB. */
function disk(): Uint8Array<ArrayBuffer> {
  const bytes = new Uint8Array(4 << 20);
  const text = new TextEncoder().encode(
    Array.from(
      { length: 60000 },
      (_, i) => `${i}: cluster ${i * 7919 % 10007} of a compressed qcow\n`,
    ).join(""),
  );
  bytes.set(text.subarray(0, 2 << 20), 0);
  bytes.set(pseudoRandom(512 << 10, 11), 2 << 20);
  bytes.set(text.subarray(0, 512 << 10), 3 << 20);
  return bytes;
}

/** The cases: qemu-img's output format and options, and the error's codec. */
const CASES: {
  name: string;
  args: string[];
  format: string;
  /** Small deflate clusters, which go to the workers only without a native inflater (see _clusters.ts). */
  small?: boolean;
}[] = [
  { name: "qcow2 zlib", args: ["-O", "qcow2"], format: "qcow2" },
  {
    name: "qcow2 zstd",
    args: ["-O", "qcow2", "-o", "compression_type=zstd"],
    format: "qcow2",
  },
  {
    name: "qcow2 zlib, 4 KiB clusters",
    args: ["-O", "qcow2", "-o", "cluster_size=4k"],
    format: "qcow2",
    small: true,
  },
  { name: "qcow v1", args: ["-O", "qcow"], format: "qcow", small: true },
];

/** Runs `fn` with every cluster size sent to the workers (as in a browser). */
async function allToWorkers<T>(fn: () => Promise<T>): Promise<T> {
  const before = setNativeMinCluster(0);
  try {
    return await fn();
  } finally {
    setNativeMinCluster(before);
  }
}

/**
 * qemu-img convert -c of `raw` with `args`; the image's bytes. (For qcow,
 * qemu-img 7.2 writes a correct image and then exits 1 without a word:
 * see qcow_test.ts; the bytes are checked against `raw` here anyway.)
 */
async function compressed(dir: string, raw: string, args: string[]) {
  const path = `${dir}/c.img`;
  const r = await run(
    "qemu-img",
    ["convert", "-c", "-f", "raw", ...args, raw, path],
    { allowFail: true },
  );
  assertTrue(
    r.code === 0 || (args.includes("qcow") && r.code === 1 && !r.stderr),
    `qemu-img convert: ${r.stderr}`,
  );
  return await Deno.readFile(path);
}

/** The file offset of the first compressed cluster, from qemu-img map. */
async function firstCompressed(dir: string, format: string): Promise<number> {
  // map gives no offset for compressed clusters; the L2 entry does.
  const bytes = await Deno.readFile(`${dir}/c.img`);
  const v = new DataView(bytes.buffer);
  if (format === "qcow2") {
    const clusterBits = v.getUint32(20);
    const l1 = Number(v.getBigUint64(40));
    const l2 = Number(v.getBigUint64(l1) & 0x00fffffffffffe00n);
    for (let i = 0; i < 1 << (clusterBits - 3); i++) {
      const entry = v.getBigUint64(l2 + i * 8);
      if (entry & (1n << 62n)) {
        return Number(entry & ((1n << BigInt(62 - (clusterBits - 8))) - 1n));
      }
    }
  } else {
    const clusterBits = bytes[32];
    const l2Bits = bytes[33];
    const l1 = Number(v.getBigUint64(40));
    const l2 = Number(v.getBigUint64(l1));
    for (let i = 0; i < 1 << l2Bits; i++) {
      const entry = v.getBigUint64(l2 + i * 8);
      if (entry & (1n << 63n)) {
        return Number(entry & ((1n << BigInt(63 - clusterBits)) - 1n));
      }
    }
  }
  throw new Error("no compressed cluster");
}

for (const c of CASES) {
  Deno.test(
    `${c.name} -c: a whole-disk read decodes on the workers, a one-cluster read here, both qemu-img's bytes`,
    { ignore: skip(QEMU) },
    () =>
      allToWorkers(() =>
        withTemp(async (dir) => {
          const raw = `${dir}/disk.raw`;
          const bytes = disk();
          await Deno.writeFile(raw, bytes);
          const image = await open(
            fromBytes(await compressed(dir, raw, c.args)),
            { format: c.format },
          );
          try {
            const before = decodeWorkerStats().jobs;
            // Two clusters' worth at most: this thread's path.
            assertEquals(
              sha256Hex(await image.read(100, 4000)),
              sha256Hex(bytes.subarray(100, 4100)),
            );
            assertEquals(decodeWorkerStats().jobs, before);
            const all = await image.read(0, image.size);
            assertEquals(sha256Hex(all), sha256Hex(bytes));
            if (!decodeWorkerStats().broken) {
              assertTrue(
                decodeWorkerStats().jobs > before,
                `no worker job: ${JSON.stringify(decodeWorkerStats())}`,
              );
            }
            // Reused buffers (readInto), read after read.
            const into = new Uint8Array(1 << 20).fill(0xee);
            for (let at = 0; at < image.size; at += into.length) {
              await image.readInto!(at, into);
              assertEquals(
                sha256Hex(into),
                sha256Hex(bytes.subarray(at, at + into.length)),
              );
            }
            // Shared memory (convert's buffers): the workers decode in
            // place, at the view's offset in its buffer.
            const shared = new Uint8Array(
              new SharedArrayBuffer((1 << 20) + 8192),
            ).fill(0xee).subarray(4096, 4096 + (1 << 20));
            for (let at = 0; at < image.size; at += shared.length) {
              await image.readInto!(at, shared);
              assertEquals(
                sha256Hex(shared.slice()),
                sha256Hex(bytes.subarray(at, at + shared.length)),
              );
            }
          } finally {
            await image.close?.();
          }
        })
      ),
  );

  Deno.test(
    `${c.name} -c: a broken compressed cluster in a whole-disk read is a typed error through the workers`,
    { ignore: skip(QEMU) },
    () =>
      allToWorkers(() =>
        withTemp(async (dir) => {
          const raw = `${dir}/disk.raw`;
          await Deno.writeFile(raw, disk());
          const good = await compressed(dir, raw, c.args);
          const host = await firstCompressed(dir, c.format);
          const broken = good.slice();
          broken.fill(0x55, host, host + 64);
          const image = await open(fromBytes(broken), { format: c.format });
          try {
            const before = decodeWorkerStats().jobs;
            const error = await rejects(
              () => image.read(0, image.size),
              ImageFormatError,
              /compressed cluster/,
            );
            assertTrue(
              String(error.message).includes(String(host)),
              `the error names the cluster at ${host}: ${error.message}`,
            );
            if (!decodeWorkerStats().broken) {
              assertTrue(decodeWorkerStats().jobs > before);
            }
            // The same cluster alone, on this thread: the same error.
            await rejects(
              () => image.read(0, 512),
              ImageFormatError,
              /compressed cluster/,
            );
          } finally {
            await image.close?.();
          }
        })
      ),
  );
}

for (const c of CASES) {
  Deno.test(
    `${c.name} -c: convert to a raw file (blocks read in flight, plain runs copied by the kernel between them) writes qemu-img's bytes`,
    { ignore: skip(QEMU) },
    () =>
      allToWorkers(() =>
        withTemp(async (dir) => {
          const raw = `${dir}/disk.raw`;
          const bytes = disk();
          await Deno.writeFile(raw, bytes);
          await compressed(dir, raw, c.args);
          const image = await open(await fromFile(`${dir}/c.img`), {
            format: c.format,
          });
          try {
            const sink = await createOutputFile(`${dir}/out.raw`);
            // 256 KiB blocks: many of them in flight over the 4 MiB disk.
            await convert(image, sink, { blockSize: 256 << 10 });
            await sink.commit();
          } finally {
            await image.close?.();
          }
          assertEquals(
            sha256Hex(await Deno.readFile(`${dir}/out.raw`)),
            sha256Hex(bytes),
          );
        })
      ),
  );
}

for (const c of CASES) {
  Deno.test(
    `${c.name} -c: a 2 MiB read of compressed and plain clusters reads the file once, not once per run (range requests over HTTP)`,
    { ignore: skip(QEMU) },
    () =>
      withTemp(async (dir) => {
        const raw = `${dir}/disk.raw`;
        const bytes = disk();
        await Deno.writeFile(raw, bytes);
        const counted = countingSource(await compressed(dir, raw, c.args));
        const image = await open(counted.source, { format: c.format });
        try {
          // Each read's tables first, so that what is counted is the data.
          for (let at = 0; at < image.size; at += 2 << 20) {
            await image.read(at, 512);
          }
          const before = counted.reads();
          for (let at = 0; at < image.size; at += 2 << 20) {
            const got = await image.read(at, 2 << 20);
            assertEquals(
              sha256Hex(got),
              sha256Hex(bytes.subarray(at, at + (2 << 20))),
            );
          }
          const reads = counted.reads() - before;
          // Two 2 MiB reads, their tables already cached: one read each
          // (before: 3 here for qcow v1, 6.6 per 2 MiB of the bench's disk).
          assertTrue(reads <= 2, `${reads} reads for two 2 MiB reads`);
        } finally {
          await image.close?.();
        }
      }),
  );
}

Deno.test(
  "qcow v1 and qcow2 -c with 4 KiB deflate clusters: with a native inflater the clusters inflate on this thread, however big the read",
  { ignore: skip(QEMU) || !hasNativeInflate() },
  () =>
    withTemp(async (dir) => {
      const raw = `${dir}/disk.raw`;
      const bytes = disk();
      await Deno.writeFile(raw, bytes);
      for (const c of CASES.filter((c) => c.small)) {
        const image = await open(
          fromBytes(await compressed(dir, raw, c.args)),
          { format: c.format },
        );
        const before = decodeWorkerStats().jobs;
        assertEquals(
          sha256Hex(await image.read(0, image.size)),
          sha256Hex(bytes),
        );
        assertEquals(decodeWorkerStats().jobs, before, c.name);
        await image.close?.();
      }
    }),
);

/**
 * 24 MiB where plain clusters (random bytes, which qemu-img stores
 * uncompressed) come before, between and after compressed ones (text),
 * with zeros between: the kernel copies the plain runs while the
 * workers decode the others. Its qcow2 is past the file adapter's 2 MiB
 * minimum for the kernel's copies.
 */
function mixedDisk(): Uint8Array<ArrayBuffer> {
  const MIB = 1 << 20;
  const bytes = new Uint8Array(24 * MIB);
  const text = new TextEncoder().encode(
    Array.from(
      { length: 200000 },
      (_, i) => `${i}: plain after compressed ${i * 7919 % 10007}\n`,
    ).join(""),
  );
  bytes.set(pseudoRandom(3 * MIB, 31), 0);
  bytes.set(text.subarray(0, 6 * MIB), 3 * MIB);
  bytes.set(pseudoRandom(MIB + 4096, 32), 9 * MIB);
  bytes.set(text.subarray(MIB, 6 * MIB), 11 * MIB);
  bytes.set(pseudoRandom(4 * MIB, 33), 20 * MIB);
  return bytes;
}

for (const c of CASES.filter((c) => c.format === "qcow2" && !c.small)) {
  Deno.test(
    `${c.name} -c: convert to a raw file copies the plain runs (before, between and after the compressed ones) while the workers decode, and writes qemu-img's bytes`,
    { ignore: skip(QEMU) },
    () =>
      withTemp(async (dir) => {
        const raw = `${dir}/disk.raw`;
        const bytes = mixedDisk();
        await Deno.writeFile(raw, bytes);
        await compressed(dir, raw, c.args);
        await run("qemu-img", [
          "convert",
          "-f",
          "qcow2",
          "-O",
          "raw",
          `${dir}/c.img`,
          `${dir}/qemu.raw`,
        ]);
        const image = await open(await fromFile(`${dir}/c.img`), {
          format: c.format,
        });
        const seen: number[] = [];
        try {
          const sink = await createOutputFile(`${dir}/out.raw`);
          // The kernel's copies: counted through the sink.
          let copies = 0;
          const copyRange = sink.copyRange.bind(sink);
          sink.copyRange = (...args) => {
            copies++;
            return copyRange(...args);
          };
          await convert(image, sink, {
            blockSize: 512 << 10,
            onProgress: (done) => seen.push(done),
          });
          await sink.commit();
          assertTrue(copies > 0, "no kernel copy");
        } finally {
          await image.close?.();
        }
        assertEquals(
          sha256Hex(await Deno.readFile(`${dir}/out.raw`)),
          sha256Hex(await Deno.readFile(`${dir}/qemu.raw`)),
        );
        assertEquals(
          sha256Hex(await Deno.readFile(`${dir}/out.raw`)),
          sha256Hex(bytes),
        );
        // Progress only grows, and ends at the disk's size.
        assertTrue(seen.every((n, i) => i === 0 || n >= seen[i - 1]));
        assertEquals(seen.at(-1), bytes.length);
      }),
  );

  Deno.test(
    `${c.name} -c: a broken compressed cluster while plain runs wait for the kernel's copies is a typed error, and no output is left`,
    { ignore: skip(QEMU) },
    () =>
      withTemp(async (dir) => {
        const raw = `${dir}/disk.raw`;
        await Deno.writeFile(raw, mixedDisk());
        const good = await compressed(dir, raw, c.args);
        const host = await firstCompressed(dir, c.format);
        const broken = good.slice();
        broken.fill(0x55, host, host + 64);
        await Deno.writeFile(`${dir}/broken.img`, broken);
        const image = await open(await fromFile(`${dir}/broken.img`), {
          format: c.format,
        });
        try {
          const sink = await createOutputFile(`${dir}/out.raw`);
          try {
            await rejects(
              () => convert(image, sink),
              ImageFormatError,
              /compressed cluster/,
            );
          } finally {
            await sink.abort();
          }
        } finally {
          await image.close?.();
        }
        await rejects(() => Deno.stat(`${dir}/out.raw`), Deno.errors.NotFound);
      }),
  );
}
