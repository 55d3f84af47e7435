// qcow2 check: our `check` gives the numbers, messages and exit codes of
// `qemu-img check` on images made by qemu-img, on refcounts poked into
// leaks and corruptions, and repairs leaks so that qemu-img finds the image
// clean.

import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  checkExitCode,
  checkImage,
  create,
  fromBytes,
  ImageFormatError,
  memorySink,
  UnsupportedError,
} from "../mod.ts";
import {
  assertBoundedWork,
  cli,
  countingSource,
  pseudoRandom,
  qemuIo,
  rejects,
  run,
  skip,
  withTemp,
} from "./_helpers.ts";

const QEMU = ["qemu-img", "qemu-io"];

/**
 * qemu-img's and our check of `path` (each run on the same bytes, since
 * `-r leaks` writes): exit codes, JSON, stderr and human text.
 */
async function compareWithQemu(path: string, args: string[] = []) {
  const bytes = await Deno.readFile(path);
  const both = async (output: string[]) => {
    await Deno.writeFile(path, bytes);
    const theirs = await run("qemu-img", ["check", ...args, ...output, path], {
      allowFail: true,
    });
    const theirBytes = await Deno.readFile(path);
    await Deno.writeFile(path, bytes);
    const ours = await cli(["check", ...args, ...output, path]);
    assertEquals(await Deno.readFile(path), theirBytes);
    assertEquals(ours.code, theirs.code, ours.stderr);
    assertEquals(ours.stderr, theirs.stderr);
    return { ours, theirs };
  };
  const json = await both(["--output=json"]);
  assertEquals(JSON.parse(json.ours.text), JSON.parse(json.theirs.text));
  const human = await both([]);
  assertEquals(human.ours.text, human.theirs.text);
  return json.ours.code;
}

/** Sets the 16-bit refcount of cluster `index` in the first refcount block. */
async function pokeRefcount(path: string, index: number, value: number) {
  const b = await Deno.readFile(path);
  const v = new DataView(b.buffer);
  const table = Number(v.getBigUint64(48));
  const block = Number(v.getBigUint64(table));
  v.setUint16(block + index * 2, value);
  await Deno.writeFile(path, b);
}

/** A 4 MiB image with 256 KiB written and the second cluster (6) discarded. */
async function withHole(dir: string): Promise<string> {
  const path = `${dir}/hole.qcow2`;
  await run("qemu-img", ["create", "-q", "-f", "qcow2", path, "4M"]);
  await qemuIo("qcow2", path, "write -P 1 0 256k", "discard 64k 64k");
  return path;
}

Deno.test(
  "qcow2 check: images made by qemu-img check as qemu-img check reports them",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const raw = `${dir}/src.raw`;
      const data = new Uint8Array(60 * 65536);
      data.set(pseudoRandom(40 * 65536, 7));
      await Deno.writeFile(raw, data);
      const made: [string, string[], string[]][] = [
        ["plain", ["create", "-f", "qcow2"], [
          "write -P 1 0 1M",
          "write 2M 64k",
        ]],
        ["zlib", ["convert", "-c", "-O", "qcow2", raw], []],
        [
          "zstd",
          [
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd,cluster_size=4k",
            raw,
          ],
          [],
        ],
        [
          "extended",
          ["create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k"],
          ["write -P 5 4k 4k", "write -z 64k 4k", "write -P 6 1M 300k"],
        ],
        [
          "refcount1",
          ["create", "-f", "qcow2", "-o", "refcount_bits=1,cluster_size=512"],
          ["write -P 7 0 100k", "write 500k 3k"],
        ],
        [
          "refcount64",
          ["create", "-f", "qcow2", "-o", "refcount_bits=64"],
          ["write -P 7 0 100k"],
        ],
      ];
      for (const [name, args, writes] of made) {
        const path = `${dir}/${name}.qcow2`;
        const sized = args[0] === "create" ? [path, "8M"] : [path];
        await run("qemu-img", [...args, "-q", ...sized]);
        if (writes.length) await qemuIo("qcow2", path, ...writes);
        assertEquals(await compareWithQemu(path), 0, name);
      }
    }),
);

Deno.test(
  "qcow2 check: the L1 tables of internal snapshots are counted",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/snap.qcow2`;
      await run("qemu-img", ["create", "-q", "-f", "qcow2", path, "8M"]);
      await qemuIo("qcow2", path, "write -P 2 0 2M");
      await run("qemu-img", ["snapshot", "-c", "one", path]);
      await qemuIo("qcow2", path, "write -P 3 1M 2M");
      await run("qemu-img", ["snapshot", "-c", "two", path]);
      await qemuIo("qcow2", path, "write -P 4 64k 4k");
      assertEquals(await compareWithQemu(path), 0);
    }),
);

Deno.test(
  "qcow2 check: the clusters of persistent bitmaps are counted",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/bitmaps.qcow2`;
      await run("qemu-img", ["create", "-q", "-f", "qcow2", path, "64M"]);
      await run("qemu-img", ["bitmap", "--add", path, "b0"]);
      await run("qemu-img", ["bitmap", "--add", "-g", "512", path, "b1"]);
      await qemuIo("qcow2", path, "write 0 1M", "write 30M 5M");
      assertEquals(await compareWithQemu(path), 0);
    }),
);

Deno.test(
  "qcow2 check: a refcount poked up is a leak (exit 3), one poked to 0 a corruption (exit 2)",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const path = await withHole(dir);
      assertEquals(await compareWithQemu(path), 0);
      const clean = await Deno.readFile(path);
      await pokeRefcount(path, 6, 1);
      assertEquals(await compareWithQemu(path), 3);
      await Deno.writeFile(path, clean);
      await pokeRefcount(path, 5, 0);
      assertEquals(await compareWithQemu(path), 2);
      // -r leaks leaves corruptions alone: the file is unchanged. A
      // refcount of 0 needs a rebuild, which -r leaks refuses (exit 1).
      const corrupt = await Deno.readFile(path);
      const refused = await cli(["check", "-r", "leaks", path]);
      assertEquals(refused.code, 1);
      assertTrue(
        refused.stderr.includes("ERROR need to rebuild refcount structures"),
      );
      assertEquals(await Deno.readFile(path), corrupt);
    }),
);

Deno.test(
  "qcow2 check: -r leaks repairs a leak as qemu-img does, and qemu-img then finds the image clean",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const path = await withHole(dir);
      await pokeRefcount(path, 6, 1);
      const theirs = `${dir}/theirs.qcow2`;
      await Deno.copyFile(path, theirs);
      const q = await run("qemu-img", ["check", "-r", "leaks", theirs]);
      const ours = await cli(["check", "-r", "leaks", path]);
      assertEquals(ours.code, 0, ours.stderr);
      assertEquals(ours.text, q.text);
      assertEquals(ours.stderr, q.stderr);
      assertEquals(await Deno.readFile(path), await Deno.readFile(theirs));
      const after = await run("qemu-img", ["check", path]);
      assertEquals(after.code, 0);
      // JSON after a repair carries leaks-fixed.
      await pokeRefcount(path, 6, 1);
      assertEquals(await compareWithQemu(path, ["-r", "leaks"]), 0);
    }),
);

Deno.test(
  "qcow2 check: -r all repairs refcounts poked up, down and to 0 as qemu-img -r all does",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const path = await withHole(dir);
      const clean = await Deno.readFile(path);
      const snapped = `${dir}/snapped.qcow2`;
      await Deno.writeFile(snapped, clean);
      await run("qemu-img", ["snapshot", "-c", "s", snapped]);
      /** Flips the copied flag of the first L1 entry, or of its L2 entry `j`. */
      const flipCopied = async (p: string, j?: number) => {
        const b = await Deno.readFile(p);
        const v = new DataView(b.buffer);
        const l1 = Number(v.getBigUint64(40));
        const l2 = Number(v.getBigUint64(l1) & 0x00fffffffffffe00n);
        const at = j === undefined ? l1 : l2 + j * 8;
        v.setBigUint64(at, v.getBigUint64(at) ^ (1n << 63n));
        await Deno.writeFile(p, b);
      };
      const cases: [string, string, (p: string) => Promise<void>][] = [
        ["leak", path, (p) => pokeRefcount(p, 6, 1)],
        ["refcount 2 for one use", path, (p) => pokeRefcount(p, 5, 2)],
        ["refcount 1 for two uses", snapped, (p) => pokeRefcount(p, 5, 1)],
        ["refcount 0: rebuilt", path, (p) => pokeRefcount(p, 5, 0)],
        [
          "copied flag of a data cluster cleared",
          path,
          (p) => flipCopied(p, 0),
        ],
        [
          "copied flag of a shared cluster set",
          snapped,
          (p) => flipCopied(p, 2),
        ],
        ["copied flag of an L2 table cleared", path, (p) => flipCopied(p)],
      ];
      for (const [name, base, poke] of cases) {
        const start = await Deno.readFile(base);
        const ours = `${dir}/ours.qcow2`;
        const theirs = `${dir}/theirs.qcow2`;
        for (const p of [ours, theirs]) {
          await Deno.writeFile(p, start);
          await poke(p);
        }
        const q = await run("qemu-img", ["check", "-r", "all", theirs]);
        const o = await cli(["check", "-r", "all", ours]);
        assertEquals(o.code, q.code, name);
        assertEquals(o.stderr, q.stderr, name);
        // The summary, less the end offset (a rebuild places the new
        // refcount structures elsewhere than qemu).
        const summary = (t: string) => t.replace(/Image end offset: \d+\n/, "");
        assertEquals(summary(o.text), summary(q.text), name);
        const json = await run("qemu-img", [
          "check",
          "--output=json",
          ours,
        ]);
        assertEquals(JSON.parse(json.text).corruptions, undefined, name);
        assertEquals(JSON.parse(json.text).leaks, undefined, name);
        const snapshots = base === snapped ? ["", "s"] : [""];
        for (const snapshot of snapshots) {
          const l = snapshot ? ["-l", snapshot] : [];
          const a = await run("qemu-img", [
            "convert",
            ...l,
            "-O",
            "raw",
            ours,
            `${dir}/a.raw`,
          ]);
          const b = await run("qemu-img", [
            "convert",
            ...l,
            "-O",
            "raw",
            theirs,
            `${dir}/b.raw`,
          ]);
          assertEquals(a.code + b.code, 0);
          assertEquals(
            await Deno.readFile(`${dir}/a.raw`),
            await Deno.readFile(`${dir}/b.raw`),
            name,
          );
        }
      }
    }),
);

Deno.test(
  "vdi check: block maps poked with duplicates, indexes too large and a wrong count are reported as qemu-img does; -r is refused (exit 63)",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/x.vdi`;
      await run("qemu-img", ["create", "-q", "-f", "vdi", path, "4M"]);
      await qemuIo("vdi", path, "write -P 1 0 1M");
      assertEquals(await compareWithQemu(path), 0);
      const clean = await Deno.readFile(path);
      const v = new DataView(clean.buffer);
      const bmap = v.getUint32(340, true);
      const pokes: [string, number, number][] = [
        ["a block used twice", bmap + 4, 0],
        ["a block index too large", bmap + 4, 77],
        ["blocks_allocated wrong", 388, 3],
      ];
      for (const [name, at, value] of pokes) {
        const bytes = clean.slice();
        new DataView(bytes.buffer).setUint32(at, value, true);
        await Deno.writeFile(path, bytes);
        assertEquals(await compareWithQemu(path), 2, name);
        const theirs = await run("qemu-img", ["check", "-r", "leaks", path], {
          allowFail: true,
        });
        const ours = await cli(["check", "-r", "leaks", path]);
        assertEquals(ours.code, theirs.code, name);
        assertEquals(await Deno.readFile(path), bytes, name);
      }
    }),
);

Deno.test(
  "qed check: invalid, duplicate and leaked clusters counted as qemu-img counts them; -r clears invalid offsets and the need-check bit as qemu-img",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/x.qed`;
      await run("qemu-img", ["create", "-q", "-f", "qed", path, "4M"]);
      await qemuIo("qed", path, "write -P 1 0 1M", "write -P 2 3M 64k");
      assertEquals(await compareWithQemu(path), 0);
      const clean = await Deno.readFile(path);
      const v = new DataView(clean.buffer);
      const l1 = Number(v.getBigUint64(40, true));
      const l2 = Number(v.getBigUint64(l1, true));
      const first = v.getBigUint64(l2, true);
      const pokes: [string, number, bigint][] = [
        ["an unaligned data cluster", l2 + 8, first + 512n],
        ["a data cluster past the end", l2 + 8, 1n << 40n],
        ["a data cluster used twice", l2 + 8, first],
        ["an L2 table past the end", l1 + 8, 1n << 40n],
        ["the need-check bit", 16, 3n],
      ];
      for (const [name, at, value] of pokes) {
        const bytes = clean.slice();
        new DataView(bytes.buffer).setBigUint64(at, value, true);
        for (const args of [[], ["-r", "leaks"], ["-r", "all"]]) {
          await Deno.writeFile(path, bytes);
          await compareWithQemu(path, args).catch((e) => {
            throw new Error(`${name} ${args.join(" ")}: ${e.message}`);
          });
        }
      }
      // A leak: a cluster past the last one used.
      await Deno.writeFile(path, clean);
      await Deno.truncate(path, clean.length + 65536);
      assertEquals(await compareWithQemu(path), 3);
    }),
);

Deno.test(
  "qcow2 check: broken refcount tables, L1 and L2 entries are corruptions reported as qemu-img reports them",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const path = await withHole(dir);
      const clean = await Deno.readFile(path);
      const v = new DataView(clean.buffer);
      const refcountTable = Number(v.getBigUint64(48));
      const l1 = Number(v.getBigUint64(40));
      const l2 = Number(v.getBigUint64(l1) & 0x00fffffffffffe00n);
      const pokes: [string, number, (old: bigint) => bigint][] = [
        [
          "refcount block outside the image",
          refcountTable + 8,
          () => 1n << 40n,
        ],
        ["unaligned refcount block", refcountTable + 8, () => 0x10200n],
        ["unaligned data cluster", l2, (old) => old | 0x200n],
        ["reserved bit of a data cluster", l2, (old) => old | 2n],
        ["reserved bit of an unallocated entry", l2 + 800, () => 2n],
        ["unaligned L2 table", l1, (old) => old | 0x200n],
      ];
      for (const [name, at, poke] of pokes) {
        const bytes = clean.slice();
        const w = new DataView(bytes.buffer);
        w.setBigUint64(at, poke(w.getBigUint64(at)));
        await Deno.writeFile(path, bytes);
        assertEquals(await compareWithQemu(path), 2, name);
      }
    }),
);

Deno.test(
  "check: formats without checks are refused as qemu-img does (exit 63)",
  { ignore: skip(["qemu-img"]) },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/disk.raw`;
      await Deno.writeFile(path, new Uint8Array(65536));
      const theirs = await run("qemu-img", ["check", "-f", "raw", path], {
        allowFail: true,
      });
      const ours = await cli(["check", "-f", "raw", path]);
      assertEquals(ours.code, theirs.code);
      assertEquals(ours.code, 63);
      assertEquals(
        ours.stderr,
        "vdisk check: This image format does not support checks\n",
      );
      await rejects(
        () => checkImage(fromBytes(new Uint8Array(512))),
        UnsupportedError,
        /does not support checks/,
      );
    }),
);

Deno.test("qcow2 check: a truncated header is a typed error", async () => {
  const sink = memorySink();
  await create("qcow2", sink, { size: 1 << 20 });
  await rejects(
    () => checkImage(fromBytes(sink.bytes().slice(0, 40)), { format: "qcow2" }),
    ImageFormatError,
    /qcow2/,
  );
});

Deno.test(
  "qcow2 check: an L1 table pointing every entry at one L2 table is a corruption found with bounded work",
  async () => {
    const sink = memorySink();
    // 64 GiB of 64 KiB clusters: an L1 table of 128 entries.
    await create("qcow2", sink, { size: 2 ** 36 });
    const bytes = new Uint8Array(sink.bytes().length + 65536);
    bytes.set(sink.bytes());
    const v = new DataView(bytes.buffer);
    const l1 = Number(v.getBigUint64(40));
    const l1Size = v.getUint32(36);
    assertEquals(l1Size, 128);
    const l2 = bytes.length - 65536;
    for (let i = 0; i < l1Size; i++) {
      v.setBigUint64(l1 + i * 8, (1n << 63n) | BigInt(l2));
    }
    for (let j = 0; j < 8192; j++) {
      v.setBigUint64(l2 + j * 8, (1n << 63n) | BigInt(l2));
    }
    const counted = countingSource(bytes);
    const result = await checkImage(counted.source);
    assertEquals(checkExitCode(result), 2);
    assertBoundedWork(counted, bytes.length);
  },
);

Deno.test("qcow2 check: an image we create checks clean through the API", async () => {
  const sink = memorySink();
  await create("qcow2", sink, { size: 1 << 20 });
  const result = await checkImage(fromBytes(sink.bytes()));
  assertEquals(
    [
      result.corruptions,
      result.leaks,
      result.checkErrors,
      result.totalClusters,
    ],
    [0, 0, 0, 16],
  );
});
