// dd against qemu-img dd on the same input.
import { assertEquals, assertTrue } from "./_asserts.ts";
import { ddSource, fromBytes, slice } from "../mod.ts";
import {
  cli,
  pseudoRandom,
  run,
  sha256File,
  skip,
  withTemp,
} from "./_helpers.ts";

Deno.test("dd writes the bytes qemu-img dd writes, for each bs/count/skip", {
  ignore: skip(["qemu-img"]),
}, async () => {
  await withTemp(async (dir) => {
    // Not a whole number of sectors, and a hole in the middle.
    const input = pseudoRandom(100000, 8);
    input.fill(0, 30000, 70000);
    await Deno.writeFile(`${dir}/in.raw`, input);
    const cases = [
      ["bs=1000", "count=10", "skip=3"],
      ["bs=4k", "skip=3"],
      ["bs=512", "count=5"],
      ["bs=1000", "count=0"],
      ["bs=1M"],
      ["bs=7", "skip=1001", "count=10000"],
      [],
    ];
    for (const [i, args] of cases.entries()) {
      const ours = `${dir}/ours${i}`, theirs = `${dir}/theirs${i}`;
      const r = await cli(["dd", `if=${dir}/in.raw`, `of=${ours}`, ...args]);
      assertEquals(r.code, 0, r.stderr);
      assertEquals(r.text, "");
      await run("qemu-img", [
        "dd",
        `if=${dir}/in.raw`,
        `of=${theirs}`,
        ...args,
      ]);
      assertEquals(
        await sha256File(ours),
        await sha256File(theirs),
        args.join(" "),
      );
    }
    // Into a qcow: the same disk.
    const args = ["bs=4k", "count=7", "skip=2"];
    await cli([
      "dd",
      "-O",
      "qcow",
      `if=${dir}/in.raw`,
      `of=${dir}/o.qcow`,
      ...args,
    ]);
    await run("qemu-img", [
      "dd",
      "-O",
      "qcow",
      `if=${dir}/in.raw`,
      `of=${dir}/t.qcow`,
      ...args,
    ]);
    await run("qemu-img", ["compare", "-s", `${dir}/o.qcow`, `${dir}/t.qcow`]);
  });
});

Deno.test("dd refuses what qemu-img dd refuses, exit 1", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/in.raw`, new Uint8Array(4096));
    for (
      const [args, pattern] of [
        [["bs=1000", "skip=300"], /cannot skip to specified offset/],
        [["bs=0"], /Invalid bs specified/],
        [["foo=1"], /unrecognized operand foo=1/],
      ] as [string[], RegExp][]
    ) {
      const r = await cli(["dd", `if=${dir}/in.raw`, `of=${dir}/x`, ...args]);
      assertEquals(r.code, 1, args.join(" "));
      assertTrue(pattern.test(r.stderr), r.stderr);
    }
    const r = await cli(["dd", `of=${dir}/x`]);
    assertEquals(r.code, 1);
    assertTrue(/both input and output/.test(r.stderr), r.stderr);
  });
});

Deno.test("slice maps extents and pads with a zero run", async () => {
  const disk = fromBytes(new Uint8Array(4096).fill(1));
  const part = slice(disk, 1000, 1000, 1536);
  const runs = [];
  for await (const e of part.extents!(0, 1536)) runs.push(e);
  assertEquals(runs, [
    { offset: 0, length: 1000, kind: "data" },
    { offset: 1000, length: 536, kind: "zero" },
  ]);
  assertEquals(ddSource(disk, { blockSize: 4096, skip: 1 }).size, 0);
});
