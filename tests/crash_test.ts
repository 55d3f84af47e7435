// Crash safety: a convert that is killed or interrupted never leaves a file
// under the final name, and never touches its input.
import { assertEquals, assertTrue } from "./_asserts.ts";
import { pseudoRandom, ROOT, sha256File, withTemp } from "./_helpers.ts";

/** A raw disk big enough that converting it takes a while. */
async function bigInput(dir: string): Promise<string> {
  const path = `${dir}/big.raw`;
  const f = await Deno.open(path, { write: true, create: true });
  const block = pseudoRandom(4 << 20, 9);
  for (let i = 0; i < 96; i++) {
    block[0] = i; // no two blocks alike
    await f.write(block);
  }
  f.close();
  return path;
}

/** Starts a convert and waits until its temporary output exists. */
async function startConvert(dir: string, input: string, out: string) {
  const child = new Deno.Command(Deno.execPath(), {
    // qcow2 -c: deflating 384 MiB of random bytes takes seconds, where a
    // raw copy goes through the kernel (copy_file_range) in a blink.
    args: [
      "run",
      "-A",
      `${ROOT}cli.ts`,
      "convert",
      "-c",
      "-O",
      "qcow2",
      input,
      out,
    ],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const deadline = Date.now() + 30_000;
  for (;;) {
    const partial = [...Deno.readDirSync(dir)].find((e) =>
      e.name.includes(".partial-")
    );
    if (partial && (await Deno.stat(`${dir}/${partial.name}`)).size > 0) break;
    if (Date.now() > deadline) throw new Error("convert never started writing");
    await new Promise((r) => setTimeout(r, 5));
  }
  return child;
}

for (const signal of ["SIGKILL", "SIGINT", "SIGTERM"] as const) {
  Deno.test(`convert killed by ${signal} leaves no file under the final name`, async () => {
    await withTemp(async (dir) => {
      const input = await bigInput(dir);
      const before = await sha256File(input);
      // On a loaded machine the poll may see the temporary file only just
      // before convert renames it, so the signal lands after the end (the
      // output is under its name, and the status is the signal's or
      // success): such a run tests nothing, and is run again (at most 5
      // times).
      // The output appears under its name only when convert is done.
      const complete = async () => {
        try {
          await Deno.stat(`${dir}/out.qcow2`);
          return true;
        } catch {
          return false;
        }
      };
      let child = await startConvert(dir, input, `${dir}/out.qcow2`);
      child.kill(signal);
      let status = await child.status;
      for (
        let tries = 1;
        (status.success || await complete()) && tries < 5;
        tries++
      ) {
        await child.stderr.cancel();
        await Deno.remove(`${dir}/out.qcow2`);
        child = await startConvert(dir, input, `${dir}/out.qcow2`);
        child.kill(signal);
        status = await child.status;
      }
      assertTrue(
        !status.success && !await complete(),
        "convert finished before the signal, 5 times",
      );
      const names = [...Deno.readDirSync(dir)].map((e) => e.name);
      assertTrue(!names.includes("out.qcow2"), `found ${names}`);
      if (signal !== "SIGKILL") {
        // A signal it can catch: the temporary file is removed too.
        assertEquals(names, ["big.raw"]);
      }
      assertEquals(await sha256File(input), before, "the input changed");
      await child.stderr.cancel();
    });
  });
}
