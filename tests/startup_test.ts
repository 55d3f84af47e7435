// Start-up (issues 13, 15, 16): the CLI loads only what a command needs. A
// conversion of one format loads that format's driver, not the other
// drivers, the codecs or the WebAssembly module. Checked by running the
// CLI with an import map that replaces every module it must not load by
// one that throws when evaluated (and exports nothing, so that a static
// import of it fails to link): the command then succeeds only if none of
// them is loaded.
import { assertEquals, assertTrue as assert } from "./_asserts.ts";
import { pseudoRandom, ROOT, run, skip, withTemp } from "./_helpers.ts";

/** The modules under `folder` (relative to the root), as file URLs. */
async function modulesIn(folder: string): Promise<string[]> {
  const out: string[] = [];
  for await (const entry of Deno.readDir(`${ROOT}${folder}`)) {
    if (entry.isFile && entry.name.endsWith(".ts")) {
      out.push(`file://${ROOT}${folder}/${entry.name}`);
    }
  }
  return out.sort();
}

/** Every driver module (a format's own file or folder) and every codec. */
async function heavyModules(): Promise<string[]> {
  const shared = /\/drivers\/(_[a-z_]+|all|registry|recognised)\.ts$/;
  const drivers = (await modulesIn("drivers")).filter((m) => !shared.test(m));
  return [
    ...drivers,
    ...await modulesIn("drivers/qcow2"),
    ...await modulesIn("drivers/dmg"),
    ...await modulesIn("drivers/codecs"),
    `file://${ROOT}drivers/all.ts`,
    `file://${ROOT}drivers/registry.ts`,
    `file://${ROOT}mod.ts`,
    `file://${ROOT}streams/compressed.ts`,
    `file://${ROOT}streams/decrypt.ts`,
    `file://${ROOT}streams/partitions.ts`,
    `file://${ROOT}streams/nbd.ts`,
    `file://${ROOT}streams/service.ts`,
  ];
}

/**
 * Runs the CLI with every module of `heavyModules` but `allowed` replaced
 * by a tripwire; answers the exit code and stderr.
 */
async function cliWithout(
  dir: string,
  allowed: string[],
  args: string[],
): Promise<{ code: number; stderr: string; text: string }> {
  const tripwire = `${dir}/tripwire.ts`;
  await Deno.writeTextFile(
    tripwire,
    'throw new Error("a module the command must not load was loaded");\n',
  );
  const keep = new Set(allowed.map((m) => `file://${ROOT}${m}`));
  const imports: Record<string, string> = {};
  for (const m of await heavyModules()) {
    if (!keep.has(m)) imports[m] = `file://${tripwire}`;
  }
  const map = `${dir}/import_map.json`;
  await Deno.writeTextFile(map, JSON.stringify({ imports }));
  const r = await run(Deno.execPath(), [
    "run",
    "-A",
    `--import-map=${map}`,
    `${ROOT}cli.ts`,
    ...args,
  ], { allowFail: true });
  return { code: r.code, stderr: r.stderr, text: r.text };
}

const RAW_BYTES = pseudoRandom(1 << 20, 16);

Deno.test("cli convert -f raw loads no driver but raw, no codec and no WebAssembly", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/in.raw`, RAW_BYTES);
    const r = await cliWithout(dir, ["drivers/raw.ts"], [
      "convert",
      "-f",
      "raw",
      "-O",
      "raw",
      `${dir}/in.raw`,
      `${dir}/out.raw`,
    ]);
    assertEquals(r.code, 0, r.stderr);
    assertEquals(await Deno.readFile(`${dir}/out.raw`), RAW_BYTES);
  });
});

Deno.test({
  name:
    "cli convert and info of a probed qcow2 load the qcow2 reader and raw only: no other driver, no qcow2 writer, no codec, no WebAssembly",
  ignore: skip(["qemu-img"]),
  fn: async () => {
    await withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/in.raw`, RAW_BYTES);
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        `${dir}/in.raw`,
        `${dir}/in.qcow2`,
      ]);
      const reader = [
        "drivers/qcow2.ts",
        "drivers/qcow2/_options.ts",
        "drivers/codecs/_clusters.ts",
        "drivers/codecs/_pool.ts",
        "drivers/codecs/_node_zlib.ts",
        "drivers/raw.ts",
      ];
      const r = await cliWithout(dir, reader, [
        "convert",
        "-O",
        "raw",
        `${dir}/in.qcow2`,
        `${dir}/out.raw`,
      ]);
      assertEquals(r.code, 0, r.stderr);
      assertEquals(await Deno.readFile(`${dir}/out.raw`), RAW_BYTES);
      // info reads the partition table too (not its CRC-32: no GPT here).
      const info = await cliWithout(dir, [
        ...reader,
        "streams/partitions.ts",
      ], ["info", `${dir}/in.qcow2`]);
      assertEquals(info.code, 0, info.stderr);
      assert(/partition table: none/.test(info.text), info.text);
    });
  },
});

Deno.test({
  name:
    "the start-up check is not vacuous: a vhd convert with the vpc driver replaced fails",
  ignore: skip(["qemu-img"]),
  fn: async () => {
    await withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/in.raw`, RAW_BYTES);
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        `${dir}/in.raw`,
        `${dir}/in.vhd`,
      ]);
      const r = await cliWithout(dir, ["drivers/raw.ts"], [
        "convert",
        "-O",
        "raw",
        `${dir}/in.vhd`,
        `${dir}/out.raw`,
      ]);
      assertEquals(r.code, 1);
      assert(/must not load/.test(r.stderr), r.stderr);
      // With it allowed, the same command converts.
      const ok = await cliWithout(dir, ["drivers/raw.ts", "drivers/vpc.ts"], [
        "convert",
        "-O",
        "raw",
        `${dir}/in.vhd`,
        `${dir}/out.raw`,
      ]);
      assertEquals(ok.code, 0, ok.stderr);
    });
  },
});
