// A seeded 1,000-mutant slice of the fuzzer runs with every `deno task test`:
// each mutant must end in success or a typed error, within the time limit
// and the memory ceiling.
//
// It runs as its own process (`tests/fuzz.ts`): the memory ceiling is
// checked against the resident size of the process, and under
// `deno test --parallel` that process also holds every other test file.
import { assertEquals } from "./_asserts.ts";
import { ROOT, withTemp } from "./_helpers.ts";

Deno.test("1,000 seeded mutants of every format end in success or a typed error", async () => {
  await withTemp(async (dir) => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        // The seeds' garbage is collected before the memory ceiling counts.
        "--v8-flags=--expose-gc",
        `${ROOT}tests/fuzz.ts`,
        "--seed",
        "2026",
        "--mutants",
        "1000",
        "--timeout",
        "15000",
        "--out",
        dir,
        "--seeds",
        `${Deno.env.get("TMPDIR") ?? "/tmp"}/vdisk-fuzz-test-seeds`,
      ],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout) +
      new TextDecoder().decode(out.stderr);
    const defects = text.split("\n").filter((l) =>
      l.startsWith("DEFECT") || l.startsWith("error")
    );
    assertEquals(defects.slice(0, 10), [], text.slice(-4000));
    assertEquals(out.code, 0, text.slice(-4000));
    assertEquals(/^1000 mutants: /m.test(text), true, text.slice(-4000));
  });
});
