// resize and rebase, against qemu-img doing the same to copies of the same
// images (qemu-img 7.2 resizes raw only, and rebases no qcow: for qcow the
// result is read back with qemu-img, which must read what it read before).
import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  create,
  fromBytes,
  ImageFormatError,
  memorySink,
  qcow,
  rebase,
  resizeImage,
  ShrinkError,
  UnsupportedError,
} from "../mod.ts";
import {
  cli,
  pseudoRandom,
  rejects,
  run,
  sha256File,
  skip,
  withTemp,
} from "./_helpers.ts";

const MiB = 1 << 20;

Deno.test(
  "resize of a raw file matches qemu-img: grow, refused shrink, --shrink",
  {
    ignore: skip(["qemu-img"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const bytes = pseudoRandom(3 * MiB, 3);
      for (const n of ["ours", "theirs"]) {
        await Deno.writeFile(`${dir}/${n}.raw`, bytes);
      }
      const steps: [string[], string[]][] = [
        [["+1M"], ["+1M"]],
        [["--shrink", "-1536k"], ["--shrink", "--", "-1536k"]],
        [["--shrink", "1000"], ["--shrink", "1000"]],
        [["64M"], ["64M"]],
      ];
      for (const [ours, theirs] of steps) {
        const r = await cli([
          "resize",
          "-f",
          "raw",
          `${dir}/ours.raw`,
          ...ours,
        ]);
        assertEquals(r.code, 0, r.stderr);
        assertEquals(r.text, "Image resized.\n");
        await run("qemu-img", [
          "resize",
          "-f",
          "raw",
          `${dir}/theirs.raw`,
          ...theirs,
        ]);
        assertEquals(
          await sha256File(`${dir}/ours.raw`),
          await sha256File(`${dir}/theirs.raw`),
          ours.join(" "),
        );
      }
      const refused = await cli(["resize", `${dir}/ours.raw`, "1M"]);
      assertEquals(refused.code, 1);
      assertTrue(/--shrink/.test(refused.stderr), refused.stderr);
      assertEquals((await Deno.stat(`${dir}/ours.raw`)).size, 64 * MiB);
    });
  },
);

Deno.test(
  "resize of a qcow grows (moving its L1 table) and shrinks; qemu-img reads it",
  {
    ignore: skip(["qemu-img"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const bytes = pseudoRandom(3 * MiB, 4);
      await Deno.writeFile(`${dir}/d.raw`, bytes);
      await run("qemu-img", [
        "convert",
        "-O",
        "qcow",
        `${dir}/d.raw`,
        `${dir}/q.qcow`,
      ]);
      // 3000 MiB needs 1500 L1 entries: more than the sector the table had.
      let r = await cli(["resize", `${dir}/q.qcow`, "3000M"]);
      assertEquals(r.code, 0, r.stderr);
      const info = JSON.parse(
        (await run("qemu-img", ["info", "--output=json", `${dir}/q.qcow`]))
          .text,
      );
      assertEquals(info["virtual-size"], 3000 * MiB);
      await run("qemu-img", ["resize", "-f", "raw", `${dir}/d.raw`, "3000M"]);
      await run("qemu-img", ["compare", `${dir}/d.raw`, `${dir}/q.qcow`]);
      // Shrink to 1 MiB and grow back: the dropped part reads as zeros.
      r = await cli(["resize", `${dir}/q.qcow`, "1M"]);
      assertEquals(r.code, 1);
      r = await cli(["resize", "--shrink", `${dir}/q.qcow`, "1M"]);
      assertEquals(r.code, 0, r.stderr);
      assertTrue(/Shrinking an image will delete/.test(r.stderr));
      r = await cli(["resize", `${dir}/q.qcow`, "+2M"]);
      assertEquals(r.code, 0, r.stderr);
      await run("qemu-img", [
        "convert",
        "-O",
        "raw",
        `${dir}/q.qcow`,
        `${dir}/back.raw`,
      ]);
      const back = await Deno.readFile(`${dir}/back.raw`);
      assertEquals(back.length, 3 * MiB);
      assertEquals(back.subarray(0, MiB), bytes.subarray(0, MiB));
      assertTrue(back.subarray(MiB).every((b) => b === 0));
    });
  },
);

Deno.test("resize refuses formats it cannot resize, by name", async () => {
  const sink = memorySink();
  const image = await qcow.create!(sink, { size: MiB });
  await image.flush!();
  await rejects(
    () => resizeImage(sink, MiB / 2),
    ShrinkError,
    /--shrink/,
  );
  const vmdk = memorySink();
  await (await create("vmdk", vmdk, { size: MiB })).flush?.();
  await rejects(() => resizeImage(vmdk, 2 * MiB), UnsupportedError, /vmdk/);
});

Deno.test(
  "rebase keeps what a qcow reads as; -b '' flattens; -u only renames",
  {
    ignore: skip(["qemu-img", "qemu-io"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const base = pseudoRandom(2 * MiB, 5);
      await Deno.writeFile(`${dir}/b1.raw`, base);
      const other = base.slice(0, MiB);
      other.fill(0, 4096, 8192);
      other.fill(9, 100000, 100100);
      await Deno.writeFile(`${dir}/b2.raw`, other);
      await run("qemu-img", [
        "create",
        "-f",
        "qcow",
        "-b",
        "b1.raw",
        "-F",
        "raw",
        `${dir}/o.qcow`,
      ]);
      await run("qemu-io", ["-c", "write -P 7 0 64k", `${dir}/o.qcow`]);
      await run("qemu-img", [
        "convert",
        "-O",
        "raw",
        `${dir}/o.qcow`,
        `${dir}/before.raw`,
      ]);
      await Deno.copyFile(`${dir}/o.qcow`, `${dir}/flat.qcow`);
      await Deno.copyFile(`${dir}/o.qcow`, `${dir}/unsafe.qcow`);
      let r = await cli([
        "rebase",
        "-b",
        "b2.raw",
        "-F",
        "raw",
        `${dir}/o.qcow`,
      ]);
      assertEquals(r.code, 0, r.stderr);
      const info = JSON.parse(
        (await run("qemu-img", ["info", "--output=json", `${dir}/o.qcow`]))
          .text,
      );
      assertEquals(info["backing-filename"], "b2.raw");
      await run("qemu-img", [
        "convert",
        "-O",
        "raw",
        `${dir}/o.qcow`,
        `${dir}/after.raw`,
      ]);
      assertEquals(
        await sha256File(`${dir}/after.raw`),
        await sha256File(`${dir}/before.raw`),
      );
      r = await cli(["rebase", "-b", "", `${dir}/flat.qcow`]);
      assertEquals(r.code, 0, r.stderr);
      const flat = JSON.parse(
        (await run("qemu-img", ["info", "--output=json", `${dir}/flat.qcow`]))
          .text,
      );
      assertEquals(flat["backing-filename"], undefined);
      await run("qemu-img", [
        "convert",
        "-O",
        "raw",
        `${dir}/flat.qcow`,
        `${dir}/flat.raw`,
      ]);
      assertEquals(
        await sha256File(`${dir}/flat.raw`),
        await sha256File(`${dir}/before.raw`),
      );
      // -u with a name longer than the room before the L1 table: it moves.
      const long = `${"d".repeat(200)}/../b2.raw`;
      await Deno.mkdir(`${dir}/${"d".repeat(200)}`);
      r = await cli(["rebase", "-u", "-b", long, `${dir}/unsafe.qcow`]);
      assertEquals(r.code, 0, r.stderr);
      const renamed = JSON.parse(
        (await run("qemu-img", ["info", "--output=json", `${dir}/unsafe.qcow`]))
          .text,
      );
      assertEquals(renamed["backing-filename"], long);
      // Only the name changed: its own clusters are as they were.
      const mine = await run("qemu-io", [
        "-c",
        "read -P 7 0 64k",
        `${dir}/unsafe.qcow`,
      ]);
      assertTrue(!/Pattern verification failed/.test(mine.text), mine.text);
    });
  },
);

Deno.test("rebase refuses formats whose backing field it does not write", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/b.raw`, new Uint8Array(MiB));
    const r0 = await cli(["create", "-f", "vdi", `${dir}/v.vhd`, "1M"]);
    assertEquals(r0.code, 0, r0.stderr);
    const r = await cli(["rebase", "-u", "-b", "b.raw", `${dir}/v.vhd`]);
    assertEquals(r.code, 1);
    assertTrue(/rebase refused/.test(r.stderr), r.stderr);
  });
});

Deno.test("rebase copies only granules that differ", async () => {
  const top = await qcow.create!(memorySink(), {
    size: 8192,
    backingFile: "old",
  });
  const old = fromBytes(new Uint8Array(8192).fill(1, 0, 512));
  const fresh = fromBytes(new Uint8Array(8192));
  const result = await rebase(top, old, fresh);
  assertEquals(result.copiedBytes, 512);
  assertEquals((await top.read(0, 1))[0], 1);
});

Deno.test("resize and rebase of a malformed qcow fail with the format's error, unchanged", async () => {
  const sink = memorySink();
  await (await qcow.create!(sink, { size: MiB })).flush!();
  const good = sink.bytes().slice();
  // l1_table_offset past the end of the file.
  const poked = good.slice();
  new DataView(poked.buffer).setBigUint64(40, 1n << 40n);
  const file = memorySink(poked);
  await rejects(
    () => resizeImage(file, 2 * MiB),
    ImageFormatError,
    /l1_table_offset/,
  );
  await rejects(
    () => qcow.setBackingFile!(file, "x"),
    ImageFormatError,
    /l1_table_offset/,
  );
  assertEquals(file.bytes(), poked);
  // Truncated to part of its header.
  const short = memorySink(good.slice(0, 30));
  await rejects(() => qcow.resize!(short, 2 * MiB), ImageFormatError);
  // A size the format cannot hold.
  await rejects(
    () => qcow.resize!(memorySink(good.slice()), 1000),
    ImageFormatError,
    /512-byte sectors/,
  );
});
