/**
 * `deno install` puts a `vdisk` command on the PATH, and `deno compile`
 * makes one binary (issue 17): both run the CLI to the same bytes.
 */
import { assertEquals } from "./_asserts.ts";
import { ROOT, run, sha256File, withTemp } from "./_helpers.ts";

const { version } = JSON.parse(await Deno.readTextFile(`${ROOT}deno.json`));

/** Runs `vdisk --version` and a convert of the demo dmg through `command`. */
async function check(command: string, dir: string) {
  const v = await run(command, ["--version"]);
  assertEquals(v.text, `vdisk ${version}\n`);
  await run(command, ["convert", `${ROOT}testdata/demo.dmg`, `${dir}/a.raw`]);
  await run(Deno.execPath(), [
    "run",
    "-A",
    `${ROOT}cli.ts`,
    "convert",
    `${ROOT}testdata/demo.dmg`,
    `${dir}/b.raw`,
  ]);
  assertEquals(
    await sha256File(`${dir}/a.raw`),
    await sha256File(`${dir}/b.raw`),
  );
}

Deno.test("deno install --global -A -n vdisk cli.ts gives a vdisk command that runs the CLI", async () => {
  await withTemp(async (dir) => {
    await run(Deno.execPath(), [
      "install",
      "--global",
      "--root",
      `${dir}/root`,
      "-A",
      "-n",
      "vdisk",
      `${ROOT}cli.ts`,
    ]);
    await check(`${dir}/root/bin/vdisk`, dir);
  });
});

// deno compile fetches the `denort` runtime from dl.deno.land unless
// DENORT_BIN names one: where neither is possible the test is ignored, and
// says so in the summary.
Deno.test({
  name:
    "deno compile -A --output vdisk cli.ts gives one binary that runs the CLI (needs denort: network or DENORT_BIN)",
  ignore: Deno.env.get("DENORT_BIN") === undefined &&
    Deno.env.get("VDISK_COMPILE") === undefined,
  async fn() {
    await withTemp(async (dir) => {
      await run(Deno.execPath(), [
        "compile",
        "-A",
        "--output",
        `${dir}/vdisk`,
        `${ROOT}cli.ts`,
      ]);
      await check(`${dir}/vdisk`, dir);
    });
  },
});
