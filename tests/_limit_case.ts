// One case of tests/limits_test.ts, in its own process so that its peak
// resident memory (VmHWM) is its own: opens the image file given as the
// first argument (as the format in the second, or probed), describes it and
// converts it to a null sink, then prints one JSON line with the outcome,
// the error and the peak memory.
import { convert, fromFile, imageInfo, open } from "../mod.ts";
import { isTypedError, nullSink } from "./_outcomes.ts";

const [path, format] = Deno.args;
let outcome = "ok";
let error = "";
const started = performance.now();
try {
  const image = await open(await fromFile(path), {
    format: format || undefined,
  });
  JSON.stringify(imageInfo(image));
  await convert(image, nullSink());
} catch (e) {
  outcome = isTypedError(e) ? "typed" : "defect";
  error = `${(e as Error).name}: ${(e as Error).message}`;
}
const status = Deno.readTextFileSync("/proc/self/status");
const hwm = Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1] ?? 0) * 1024;
console.log(
  JSON.stringify({ outcome, error, hwm, ms: performance.now() - started }),
);
