// The benches' real-data disk (tests/bench.ts, tests/bench_browser.ts):
// half a tar of /usr/lib (system libraries, binaries, text; files sorted by
// name), then a quarter of zeros (a hole) and a quarter of random bytes.
import { run } from "./_helpers.ts";

const MIB = 1024 * 1024;

/**
 * Builds the real-data disk of `sizeMiB` MiB at `path`, unless a file of
 * that size is there already (kept between runs). The tar is cut at half
 * the disk; the zeros are left as a hole; the random bytes come from
 * /dev/urandom.
 */
export async function buildRealDisk(path: string, sizeMiB: number) {
  try {
    if ((await Deno.stat(path)).size === sizeMiB * MIB) return;
  } catch { /* build it */ }
  const half = sizeMiB / 2 * MIB, quarter = sizeMiB / 4 * MIB;
  const part = `${path}.part`;
  console.error(`building ${sizeMiB} MiB real-data disk at ${path}`);
  // tar is cut by head (SIGPIPE): its exit status is not checked, the size is.
  await run("sh", [
    "-c",
    `(tar --sort=name -cf - -C / usr/lib 2>/dev/null || true) | head -c ${half} > ${part}`,
  ]);
  if ((await Deno.stat(part)).size !== half) {
    throw new Error(`the tar of /usr/lib is smaller than ${half} bytes`);
  }
  await run("sh", [
    "-c",
    `truncate -s ${
      half + quarter
    } ${part} && head -c ${quarter} /dev/urandom >> ${part}`,
  ]);
  await Deno.rename(part, path);
}
