// A seeded 1,000-mutant slice of the fuzzer runs with every `deno task test`:
// each mutant must end in success or a typed error, within the time limit
// and the memory ceiling.
import { assertEquals } from "./_asserts.ts";
import { fuzz, seeds } from "./_fuzz.ts";

Deno.test("1,000 seeded mutants of every format end in success or a typed error", async () => {
  const dir = `${Deno.env.get("TMPDIR") ?? "/tmp"}/vdisk-fuzz-test`;
  const all = await seeds(`${dir}/seeds`);
  const report = await fuzz(all, {
    seed: 2026,
    mutants: 1000,
    timeoutMs: 15_000,
  });
  const lines = report.defects.slice(0, 10).map((d) =>
    `${d.kind} ${d.seed} ${d.mutation}: ${d.error.split("\n")[0]}`
  );
  assertEquals(lines, [], `${report.defects.length} defects`);
  assertEquals(report.mutants, 1000);
});
