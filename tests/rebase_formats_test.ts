// rebase of UML cow and differencing vpc files. qemu-img 7.2 rebases
// neither (it has no cow driver, and reads a differencing VHD as a
// dynamic one, without its parent), so what they read as is checked with
// our own reader, with uml_moo (UML's merge tool) for cow, and with
// qemu-img reading the flattened VHD.
import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  cli,
  pseudoRandom,
  run,
  sha256File,
  skip,
  withTemp,
} from "./_helpers.ts";

const MiB = 1 << 20;

/** Our convert of `image` (its chain followed) to a raw file; its sha256. */
async function readsAs(image: string, out: string): Promise<string> {
  const r = await cli(["convert", "-O", "raw", image, out]);
  assertEquals(r.code, 0, r.stderr);
  return await sha256File(out);
}

Deno.test(
  "rebase of a UML cow keeps what it reads as (uml_moo agrees); -u only renames; -b '' is refused",
  { ignore: skip(["uml_moo"]) },
  async () => {
    await withTemp(async (dir) => {
      const base = pseudoRandom(MiB, 1);
      await Deno.writeFile(`${dir}/b1.img`, base);
      const other = base.slice();
      other.fill(0, 4096, 9000); // differs inside a 64 KiB granule
      other.fill(7, 300000, 300100);
      await Deno.writeFile(`${dir}/b2.img`, other);
      const made = await cli([
        "create",
        "-f",
        "cow",
        "-b",
        "b1.img",
        `${dir}/c.cow`,
        "1M",
      ]);
      assertEquals(made.code, 0, made.stderr);
      // Own sectors right next to sectors that differ between the bases.
      await Deno.writeFile(`${dir}/patch`, new Uint8Array(1024).fill(9));
      const w = await cli([
        "write",
        "-f",
        "cow",
        `${dir}/c.cow`,
        "8192",
        `${dir}/patch`,
      ]);
      assertEquals(w.code, 0, w.stderr);
      const before = await readsAs(`${dir}/c.cow`, `${dir}/before.raw`);
      await Deno.copyFile(`${dir}/c.cow`, `${dir}/u.cow`);
      const r = await cli([
        "rebase",
        "-b",
        "b2.img",
        "-F",
        "raw",
        `${dir}/c.cow`,
      ]);
      assertEquals(r.code, 0, r.stderr);
      const info = JSON.parse(
        (await cli(["info", "--output=json", `${dir}/c.cow`])).text,
      );
      assertEquals(info["backing-filename"], "b2.img");
      assertEquals(await readsAs(`${dir}/c.cow`, `${dir}/after.raw`), before);
      await run("uml_moo", [`${dir}/c.cow`, `${dir}/moo.raw`], { cwd: dir });
      assertEquals(await sha256File(`${dir}/moo.raw`), before);
      // -u: the name alone; the image now reads through b2 as it is.
      const u = await cli(["rebase", "-u", "-b", "b2.img", `${dir}/u.cow`]);
      assertEquals(u.code, 0, u.stderr);
      await run("uml_moo", [`${dir}/u.cow`, `${dir}/moo2.raw`], { cwd: dir });
      const merged = await Deno.readFile(`${dir}/moo2.raw`);
      assertEquals(
        merged.subarray(300000, 300100),
        new Uint8Array(100).fill(7),
      );
      assertEquals(merged.subarray(8192, 9216), new Uint8Array(1024).fill(9));
      const flat = await cli(["rebase", "-b", "", `${dir}/c.cow`]);
      assertEquals(flat.code, 1);
      assertTrue(/always has a backing file/.test(flat.stderr), flat.stderr);
    });
  },
);

Deno.test(
  "rebase of a differencing vpc keeps what it reads as, records the new parent's id; -b '' makes it dynamic, as qemu-img reads it",
  { ignore: skip(["qemu-img"]) },
  async () => {
    await withTemp(async (dir) => {
      const base = pseudoRandom(4 * MiB, 2);
      const other = base.slice();
      other.fill(0, 2 * MiB + 4096, 2 * MiB + 9000);
      other.fill(5, 3 * MiB, 3 * MiB + 100);
      for (const [n, bytes] of [["b1", base], ["b2", other]] as const) {
        await Deno.writeFile(`${dir}/${n}.raw`, bytes);
        const c = await cli([
          "convert",
          "-O",
          "vpc",
          "-o",
          "force_size=on",
          `${dir}/${n}.raw`,
          `${dir}/${n}.vhd`,
        ]);
        assertEquals(c.code, 0, c.stderr);
      }
      const made = await cli([
        "create",
        "-f",
        "vpc",
        "-o",
        "force_size=on",
        "-b",
        "b1.vhd",
        `${dir}/d.vhd`,
        "4M",
      ]);
      assertEquals(made.code, 0, made.stderr);
      await Deno.writeFile(`${dir}/patch`, new Uint8Array(1024).fill(9));
      const w = await cli([
        "write",
        "-f",
        "vpc",
        `${dir}/d.vhd`,
        `${2 * MiB + 8192}`,
        `${dir}/patch`,
      ]);
      assertEquals(w.code, 0, w.stderr);
      const before = await readsAs(`${dir}/d.vhd`, `${dir}/before.raw`);
      // A long name: its locators no longer fit their old space.
      const deep = `${"x".repeat(140)}/${"y".repeat(140)}`;
      const long = `${deep}/../../b2.vhd`;
      await Deno.mkdir(`${dir}/${deep}`, { recursive: true });
      const r = await cli(["rebase", "-b", long, "-F", "vpc", `${dir}/d.vhd`]);
      assertEquals(r.code, 0, r.stderr);
      const info = JSON.parse(
        (await cli(["info", "--output=json", `${dir}/d.vhd`])).text,
      );
      const parent = JSON.parse(
        (await cli(["info", "--output=json", `${dir}/b2.vhd`])).text,
      );
      assertEquals(info["backing-filename"], long);
      const data = info["format-specific"].data;
      assertEquals(
        data["parent-unique-id"],
        parent["format-specific"].data["unique-id"],
      );
      assertEquals(
        data["parent-timestamp"],
        parent["format-specific"].data.timestamp,
      );
      assertEquals(await readsAs(`${dir}/d.vhd`, `${dir}/after.raw`), before);
      // qemu-img still opens it (as a dynamic disk, without the parent).
      await run("qemu-img", ["info", "-f", "vpc", `${dir}/d.vhd`]);
      // Flattened: a dynamic disk reading as before, for qemu-img too.
      const flat = await cli(["rebase", "-b", "", `${dir}/d.vhd`]);
      assertEquals(flat.code, 0, flat.stderr);
      await run("qemu-img", [
        "convert",
        "-f",
        "vpc",
        "-O",
        "raw",
        `${dir}/d.vhd`,
        `${dir}/qemu.raw`,
      ]);
      assertEquals(await sha256File(`${dir}/qemu.raw`), before);
      // A VHD without a parent does not take one.
      const refused = await cli([
        "rebase",
        "-u",
        "-b",
        "b1.vhd",
        `${dir}/d.vhd`,
      ]);
      assertEquals(refused.code, 1);
      assertTrue(/does not take a parent/.test(refused.stderr), refused.stderr);
    });
  },
);

Deno.test(
  "rebase of a qcow2 matches qemu-img rebase on a copy: safe, -u and -b ''",
  { ignore: skip(["qemu-img", "qemu-io"]) },
  async () => {
    await withTemp(async (dir) => {
      const base = pseudoRandom(4 * MiB, 3);
      await Deno.writeFile(`${dir}/b1.raw`, base);
      const other = base.slice();
      other.fill(0, MiB + 4096, MiB + 9000);
      other.fill(5, 3 * MiB, 3 * MiB + 100);
      await Deno.writeFile(`${dir}/b2.raw`, other);
      await run("qemu-img", [
        "convert",
        "-O",
        "qcow2",
        `${dir}/b2.raw`,
        `${dir}/b2.qcow2`,
      ]);
      const info = async (path: string) =>
        JSON.parse(
          (await run("qemu-img", ["info", "--output=json", path])).text,
        );
      for (const options of ["compat=1.1", "compat=0.10", "extended_l2=on"]) {
        const steps: [string, string[]][] = [
          ["safe", ["-b", "b2.raw", "-F", "raw"]],
          ["safe-qcow2", ["-b", "b2.qcow2", "-F", "qcow2"]],
          ["unsafe", ["-u", "-b", "b2.raw", "-F", "raw"]],
          ["flat", ["-b", ""]],
        ];
        for (const [what, args] of steps) {
          for (const n of ["ours", "theirs"]) {
            await run("qemu-img", [
              "create",
              "-f",
              "qcow2",
              "-o",
              options,
              "-b",
              "b1.raw",
              "-F",
              "raw",
              `${dir}/${n}.qcow2`,
            ]);
            await run("qemu-io", [
              "-c",
              "write -P 7 0 64k",
              "-c",
              `write -P 8 ${MiB + 8192} 4k`,
              `${dir}/${n}.qcow2`,
            ]);
          }
          const r = await cli(["rebase", ...args, `${dir}/ours.qcow2`]);
          assertEquals(r.code, 0, `${options} ${what}: ${r.stderr}`);
          await run("qemu-img", ["rebase", ...args, `${dir}/theirs.qcow2`]);
          const a = await info(`${dir}/ours.qcow2`);
          const b = await info(`${dir}/theirs.qcow2`);
          assertEquals(a["backing-filename"], b["backing-filename"], what);
          assertEquals(
            a["backing-filename-format"],
            b["backing-filename-format"],
            what,
          );
          const check = await run("qemu-img", ["check", `${dir}/ours.qcow2`]);
          assertTrue(/No errors/.test(check.text), check.text);
          for (const n of ["ours", "theirs"]) {
            await run("qemu-img", [
              "convert",
              "-O",
              "raw",
              `${dir}/${n}.qcow2`,
              `${dir}/${n}.raw`,
            ], { cwd: dir });
          }
          assertEquals(
            await sha256File(`${dir}/ours.raw`),
            await sha256File(`${dir}/theirs.raw`),
            `${options} ${what}`,
          );
        }
      }
      // Without -F, refused as by qemu-img 7.2, the file unchanged.
      const before = await Deno.readFile(`${dir}/ours.qcow2`);
      const r = await cli([
        "rebase",
        "-u",
        "-b",
        "b1.raw",
        `${dir}/ours.qcow2`,
      ]);
      assertEquals(r.code, 1);
      assertTrue(/backing format must be specified/.test(r.stderr), r.stderr);
      assertEquals(await Deno.readFile(`${dir}/ours.qcow2`), before);
    });
  },
);
