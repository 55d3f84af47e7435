// measure: qemu-img's numbers for raw (the only format qemu-img 7.2
// measures among ours), and for every format we write, the sizes of the
// files convert and create actually write.
import { assertEquals, assertTrue } from "./_asserts.ts";
import { formats, measure } from "../mod.ts";
import { cli, pseudoRandom, run, skip, withTemp } from "./_helpers.ts";

/** Formats convert writes that need nothing more (cow needs a backing file). */
const WRITTEN = formats().filter((d) =>
  (d.create || d.encode) && d.name !== "cow"
).map((d) => d.name);

Deno.test("measure -O raw prints what qemu-img measure prints", {
  ignore: skip(["qemu-img"]),
}, async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/in.raw`, pseudoRandom(100000, 2));
    for (
      const args of [
        ["--size", "10M"],
        ["--size", "1000"],
        [`${dir}/in.raw`],
        ["--output=json", "--size", "1G"],
        ["--output=json", `${dir}/in.raw`],
      ]
    ) {
      const ours = await cli(["measure", ...args]);
      assertEquals(ours.code, 0, ours.stderr);
      const theirs = await run("qemu-img", ["measure", "-O", "raw", ...args]);
      assertEquals(ours.text, theirs.text, args.join(" "));
    }
    for (const args of [[], ["--size", "1M", `${dir}/in.raw`]]) {
      const r = await cli(["measure", ...args]);
      assertEquals(r.code, 1);
      assertTrue(/--size N/.test(r.stderr), r.stderr);
    }
  });
});

Deno.test("measure gives the sizes of the files convert writes, for every format we write", async () => {
  await withTemp(async (dir) => {
    // Data, a hole, more data: not a whole number of clusters either.
    const bytes = pseudoRandom(3 << 20, 6);
    bytes.fill(0, 1 << 20, 2 << 20);
    await Deno.writeFile(`${dir}/in.raw`, bytes);
    await Deno.writeFile(`${dir}/full.raw`, pseudoRandom(3 << 20, 7));
    await Deno.writeFile(`${dir}/empty.raw`, new Uint8Array(3 << 20));
    for (const format of WRITTEN) {
      const r = await cli([
        "measure",
        "--output=json",
        "-O",
        format,
        `${dir}/in.raw`,
      ]);
      assertEquals(r.code, 0, `${format}: ${r.stderr}`);
      const sizes = JSON.parse(r.text);
      if (format === "qcow2") {
        // qemu-img's formula: never less than what is written.
        const required = await (async () => {
          const out = `${dir}/out.${format}`;
          await cli(["convert", "-O", format, `${dir}/in.raw`, out]);
          return (await Deno.stat(out)).size;
        })();
        assertTrue(sizes.required >= required, format);
        continue;
      }
      const written = async (input: string) => {
        const out = `${dir}/out.${format}`;
        const c = await cli(["convert", "-O", format, input, out]);
        assertEquals(c.code, 0, `${format}: ${c.stderr}`);
        return (await Deno.stat(out)).size;
      };
      assertEquals(sizes.required, await written(`${dir}/in.raw`), format);
      assertEquals(
        sizes["fully-allocated"],
        await written(`${dir}/full.raw`),
        format,
      );
      const bySize = await measure(3 << 20, { format });
      assertEquals(bySize.required, await written(`${dir}/empty.raw`), format);
      assertEquals(bySize.fullyAllocated, sizes["fully-allocated"], format);
    }
  });
});

Deno.test("measure refuses more memory than its limit", async () => {
  let failed = false;
  try {
    // vmdk has no formula: its fully allocated image is written.
    await measure(64 << 20, { format: "vmdk", memoryLimit: 1 << 20 });
  } catch (e) {
    failed = e instanceof RangeError && /memoryLimit/.test(e.message);
  }
  assertTrue(failed);
});
