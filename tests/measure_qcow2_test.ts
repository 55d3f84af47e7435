// measure -O qcow2 by formula: the numbers qemu-img measure prints, for
// sizes up to 16 TiB (no image written), every option that changes them,
// and input images (holes, zero clusters, compressed clusters, a backing
// file named).
import { assertEquals, assertTrue } from "./_asserts.ts";
import { ImageFormatError, measure, OptionError } from "../mod.ts";
import {
  cli,
  countingSource,
  pseudoRandom,
  rejects,
  run,
  skip,
  withTemp,
} from "./_helpers.ts";
import { qemuWrite } from "./_layers.ts";

const OPTIONS = [
  "",
  "cluster_size=512",
  "cluster_size=4096,refcount_bits=1",
  "cluster_size=2M,refcount_bits=64",
  "compat=0.10",
  "extended_l2=on",
  "extended_l2=on,cluster_size=2M",
  "preallocation=metadata",
  "preallocation=full,cluster_size=16384",
  "preallocation=falloc,refcount_bits=8",
  "refcount_bits=32,lazy_refcounts=on",
];

/** Both tools' output for the same arguments: equal text and exit status. */
async function assertSameOutput(args: string[], secret = false) {
  const ours = await cli(["measure", ...args]);
  const qemu = () =>
    run("qemu-img", [
      "measure",
      ...(secret ? ["--object", "secret,id=s,data=x"] : []),
      ...args.map((a) =>
        secret && a.includes("encrypt.format") ? `${a},encrypt.key-secret=s` : a
      ),
    ], { allowFail: true });
  // (run asks again when qemu-img cannot time its PBKDF2 run for LUKS.)
  const theirs = await qemu();
  assertEquals(
    ours.code,
    theirs.code,
    `${args.join(" ")}: ours: ${ours.stderr}; qemu-img: ${theirs.stderr}`,
  );
  assertEquals(ours.text, theirs.text, args.join(" "));
}

Deno.test(
  "measure -O qcow2 --size prints qemu-img's numbers across options and sizes",
  { ignore: skip(["qemu-img"]) },
  async () => {
    for (const options of OPTIONS) {
      for (const size of [0, 1000, 2 ** 30, 2 ** 40 + 512, 2 ** 44]) {
        const o = options ? ["-o", options] : [];
        const answer = await run("qemu-img", [
          "measure",
          "--output=json",
          "-O",
          "qcow2",
          ...o,
          "--size",
          `${size}`,
        ], { allowFail: true });
        const ours = measure(size, {
          format: "qcow2",
          options: Object.fromEntries(
            options ? options.split(",").map((kv) => kv.split("=")) : [],
          ),
        });
        if (answer.code !== 0) {
          assertTrue(/too large/.test(answer.stderr), answer.stderr);
          await rejects(() => ours, ImageFormatError, /too large/);
          continue;
        }
        const theirs = JSON.parse(answer.text);
        const mine = await ours;
        assertEquals(
          [mine.required, mine.fullyAllocated],
          [theirs.required, theirs["fully-allocated"]],
          `${options} ${size}`,
        );
      }
    }
    for (const size of ["1000", "16T"]) {
      await assertSameOutput(["-O", "qcow2", "--size", size]);
    }
    // Too large for 512-byte clusters: both refuse.
    const r = await cli([
      "measure",
      "-O",
      "qcow2",
      "-o",
      "cluster_size=512",
      "--size",
      "16T",
    ]);
    assertEquals(r.code, 1);
    assertTrue(/image size is too large/.test(r.stderr), r.stderr);
    for (
      const luks of [
        "encrypt.format=luks",
        "encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc",
        "encrypt.format=luks,cluster_size=4k",
      ]
    ) {
      await assertSameOutput(
        ["--output=json", "-O", "qcow2", "-o", luks, "--size", "3G"],
        true,
      );
    }
  },
);

Deno.test(
  "measure -O qcow2 of images prints qemu-img's numbers",
  { ignore: skip(["qemu-img", "qemu-io"]) },
  async () => {
    await withTemp(async (dir) => {
      // A raw file with holes, data not on cluster boundaries.
      const raw = `${dir}/in.raw`;
      const f = await Deno.open(raw, { write: true, create: true });
      await f.truncate(9 * (1 << 20) + 512);
      await f.seek(70000, Deno.SeekMode.Start);
      await f.write(pseudoRandom(5000, 1));
      await f.seek(3 << 20, Deno.SeekMode.Start);
      await f.write(pseudoRandom(200000, 2));
      f.close();
      // A qcow2 with data, zero clusters and unallocated clusters.
      const q = `${dir}/in.qcow2`;
      await run("qemu-img", ["create", "-f", "qcow2", q, "5M"]);
      await qemuWrite(q, "qcow2", [[1, 0, 4096], [2, 1 << 20, 70000]]);
      await run("qemu-io", ["-c", "write -z 2M 1M", q]);
      // Compressed clusters.
      const c = `${dir}/c.qcow2`;
      await run("qemu-img", ["convert", "-c", "-O", "qcow2", raw, c]);
      for (const input of [raw, q, c]) {
        for (
          const options of [
            "",
            "cluster_size=4096",
            "extended_l2=on",
            "compat=0.10",
            "backing_file=x.raw,backing_fmt=raw",
          ]
        ) {
          const o = options ? ["-o", options] : [];
          await assertSameOutput(["-O", "qcow2", ...o, input]);
          await assertSameOutput(["--output=json", "-O", "qcow2", ...o, input]);
        }
      }
    });
  },
);

Deno.test("measure -O qcow2 of a size does no work that grows with it", async () => {
  const small = await measure(1 << 20, { format: "qcow2" });
  const huge = await measure(2 ** 44, { format: "qcow2" });
  assertTrue(huge.fullyAllocated > 2 ** 44 && small.required < huge.required);
  // An input image: its allocation map is read, not its bytes.
  const counted = countingSource(new Uint8Array(1 << 20));
  const sizes = await measure(counted.source, { format: "qcow2" });
  assertEquals(counted.reads(), 0);
  // One data run over the whole disk: every cluster counts.
  assertEquals(sizes.required, sizes.fullyAllocated);
});

Deno.test("measure -O qcow2 refuses bad options and sizes by name", async () => {
  await rejects(
    () =>
      measure(1 << 20, { format: "qcow2", options: { cluster_size: "3k" } }),
    OptionError,
    /cluster_size/,
  );
  await rejects(
    () => measure(1 << 20, { format: "qcow2", options: { nonsense: "1" } }),
    Error,
    /nonsense/,
  );
  await rejects(
    () => measure(2 ** 52, { format: "qcow2" }),
    ImageFormatError,
    /too large/,
  );
  let failed = false;
  try {
    await measure(-1, { format: "qcow2" });
  } catch (e) {
    failed = e instanceof RangeError;
  }
  assertEquals(failed, true);
});

Deno.test("measure by formula (vdi, vpc, qcow, vhdx) gives the sizes of the files create and convert write", async () => {
  const { convert, memorySink } = await import("../mod.ts");
  const cases: [string, Record<string, string>][] = [
    ["vdi", {}],
    ["vdi", { static: "on" }],
    ["vdi", { block_size: "65536" }],
    ["vpc", {}],
    ["vpc", { force_size: "on" }],
    ["vpc", { subformat: "fixed" }],
    ["qcow", {}],
    ["vhdx", {}],
    ["vhdx", { subformat: "fixed", block_size: "1M" }],
    ["vhdx", { logical_sector_size: "4096", log_size: "2M" }],
  ];
  for (const [format, options] of cases) {
    for (const size of [512, 1 << 20, 3 * (1 << 20) + 512, 5000000, 9 << 20]) {
      const sizes = await measure(size, { format, options });
      const what = `${format} ${JSON.stringify(options)} ${size}`;
      // Written: an empty disk, then one whose every byte holds data.
      for (
        const [full, expected] of [[false, sizes.required], [
          true,
          sizes.fullyAllocated,
        ]] as const
      ) {
        const disk = full
          ? {
            size,
            read: (o: number, l: number) =>
              Promise.resolve(pseudoRandom(l, o + 1)),
          }
          : {
            size,
            read: (_o: number, l: number) => Promise.resolve(new Uint8Array(l)),
            async *extents(offset: number, length: number) {
              yield { offset, length, kind: "zero" as const };
            },
          };
        const sink = memorySink();
        await convert(disk, sink, { format, options });
        assertEquals(sink.bytes().length, expected, `${what} full=${full}`);
      }
    }
  }
  // Huge sizes answer at once (no image written).
  const huge = await measure(2 ** 40, { format: "vdi" });
  assertEquals(huge.fullyAllocated, 512 + 4 * 2 ** 20 + 2 ** 40);
  const vhd = await measure(2000 * 2 ** 30, { format: "vpc" });
  assertTrue(vhd.fullyAllocated > 2000 * 2 ** 30);
});

Deno.test(
  "measure -O qcow2 of a raw file counts the clusters its file system holds, a written zero cluster too, as qemu-img does, without reading the disk",
  { ignore: skip(["qemu-img"]) },
  async () => {
    await withTemp(async (dir) => {
      const path = `${dir}/disk.raw`;
      const out = await Deno.open(path, { create: true, write: true });
      await out.truncate(8 << 20);
      // A zero cluster written out at 1 MiB, data at 4 MiB and 6 MiB + 1.
      for (
        const [at, bytes] of [
          [1 << 20, new Uint8Array(64 << 10)],
          [4 << 20, pseudoRandom(64 << 10, 13)],
          [(6 << 20) + 1, pseudoRandom(100, 14)],
        ] as const
      ) {
        await out.seek(at, Deno.SeekMode.Start);
        for (let n = 0; n < bytes.length;) {
          n += await out.write(bytes.subarray(n));
        }
      }
      out.close();
      await assertSameOutput(["-O", "qcow2", "-f", "raw", path]);
      await assertSameOutput(["-O", "qcow2", path]);
      await assertSameOutput([
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-f",
        "raw",
        path,
      ]);
    });
  },
);
