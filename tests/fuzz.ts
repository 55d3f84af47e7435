// `deno task fuzz [--seed N] [--mutants N] [--timeout MS] [--out DIR]
// [--seeds DIR]`: the long fuzzing run. Defects are written to DIR (default
// $TMPDIR/vdisk-fuzz) as the mutant bytes and a line saying how to reproduce
// them; the seed images made by the reference tools are cached in --seeds
// (default DIR/seeds).
import { parseArgs } from "node:util";
import { fuzz, seeds } from "./_fuzz.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    seed: { type: "string", default: "1" },
    mutants: { type: "string", default: "20000" },
    timeout: { type: "string", default: "10000" },
    out: {
      type: "string",
      default: `${Deno.env.get("TMPDIR") ?? "/tmp"}/vdisk-fuzz`,
    },
    seeds: { type: "string" },
  },
});
const all = await seeds(values.seeds ?? `${values.out}/seeds`);
// Making the seeds (our writers, their codec workers) leaves garbage that
// the memory ceiling, checked on this process's resident size, would count
// against the first mutants: collected here when the run allows it
// (`deno run --v8-flags=--expose-gc`, as fuzz_test.ts and the task do).
(globalThis as { gc?: () => void }).gc?.();
console.log(
  `resident after the seeds: ${
    (Deno.memoryUsage().rss / 2 ** 20).toFixed(0)
  } MiB`,
);
console.log(`seeds: ${all.map((s) => `${s.name} (${s.format})`).join(", ")}`);
const started = performance.now();
const report = await fuzz(all, {
  seed: Number(values.seed),
  mutants: Number(values.mutants),
  timeoutMs: Number(values.timeout),
  onProgress: (n) => {
    if (n % 500 === 0) {
      console.log(
        `${n} mutants, ${((performance.now() - started) / 1000).toFixed(0)} s`,
      );
    }
  },
});
for (const [i, d] of report.defects.entries()) {
  const path = `${values.out}/defect-${i}.img`;
  await Deno.writeFile(path, d.bytes);
  console.log(
    `DEFECT ${d.kind}: ${d.seed} ${d.mutation}\n  ${
      d.error.split("\n").slice(0, 4).join("\n  ")
    }\n  saved as ${path}`,
  );
}
console.log(JSON.stringify(report.byFormat, null, 1));
console.log(
  `${report.mutants} mutants: ${report.ok} ok, ${report.typed} typed errors, ${report.defects.length} defects; ${report.signed} still carried their seed's signature, none opened as raw unless listed as a defect (seed ${values.seed}, ${
    ((performance.now() - started) / 1000).toFixed(0)
  } s)`,
);
Deno.exit(report.defects.length ? 1 : 0);
