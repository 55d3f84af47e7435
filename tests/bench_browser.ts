// `deno task bench browser`: the same conversions in headless chromium. A
// module worker (examples/web/worker.js) imports the bundle (dist/mod.js,
// built here, with its decode workers in dist/_worker.js), reads each
// image by URL (HTTP Range requests to a local server) and from a Blob,
// and converts it to raw, output discarded. Against it: the CLI converting
// the same image to a raw file. Best of BENCH_RUNS (3) each, same run;
// ratios are worker / CLI. The first browser run of each source is not
// timed: it hashes the disk and checks it against the disk's sha256.
//
//   deno task bench browser              every case
//   deno task bench browser cloop xz     cases whose name contains one of these
//   BENCH_SIZE_MIB=64 deno task bench browser   a smaller disk
//
// The disk is the bench's real data (tests/bench.ts): half a tar of
// /usr/lib, a quarter of zeros, a quarter of random bytes, 256 MiB. Images
// and disk are cached under $TMPDIR/vdisk-bench-browser-<size>. The tab's
// memory is the peak resident size (VmHWM) of the renderer process that
// runs the page, its module worker and the decode workers, in a browser
// started for each image.
import { type Browser, bundle, launch, rendererPeaks } from "./_cdp.ts";
import { fileServer, have, ROOT, run, sha256File } from "./_helpers.ts";

const MIB = 1024 * 1024;
const SIZE_MIB = Number(Deno.env.get("BENCH_SIZE_MIB") ?? 256);
const RUNS = Number(Deno.env.get("BENCH_RUNS") ?? 3);
const DIR = `${
  Deno.env.get("TMPDIR") ?? "/tmp"
}/vdisk-bench-browser-${SIZE_MIB}`;
const SITE = `${DIR}/site`;
const DISK = `${DIR}/disk.raw`;
const OUT = `${DIR}/out.raw`;
const CLI = `${ROOT}cli.ts`;
const deno = Deno.execPath();

/** Half a tar of /usr/lib, a quarter of zeros (a hole), a quarter of random bytes. */
async function buildDisk() {
  try {
    if ((await Deno.stat(DISK)).size === SIZE_MIB * MIB) return;
  } catch { /* build it */ }
  await Deno.mkdir(`${SITE}/images`, { recursive: true });
  const half = SIZE_MIB / 2 * MIB, quarter = SIZE_MIB / 4 * MIB;
  const part = `${DISK}.part`;
  console.error(`building ${SIZE_MIB} MiB real-data disk at ${DISK}`);
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
  await Deno.rename(part, DISK);
}

interface Case {
  name: string;
  /** The image's file name under SITE/images. */
  file: string;
  /** Our driver's name (`-f` for the CLI). */
  format: string;
  /** Makes the image from DISK into its path (a shell command). */
  make: (path: string) => string;
  /** Tools the image needs. */
  needs: string[];
}

const ourDmg = (compression: string) => (path: string) =>
  `${deno} run -A ${CLI} convert -O dmg -o compression=${compression} ${DISK} ${path}`;

const cases: Case[] = [
  {
    name: "dmg zlib",
    file: "disk-zlib.dmg",
    format: "dmg",
    make: ourDmg("zlib"),
    needs: [],
  },
  {
    name: "cloop",
    file: "disk.cloop",
    format: "cloop",
    make: (path) => `create_compressed_fs -B 65536 ${DISK} ${path} 2>/dev/null`,
    needs: ["create_compressed_fs"],
  },
  {
    name: "qcow compressed",
    file: "disk-c.qcow",
    format: "qcow",
    // qemu-img 7.2 exits 1 after writing a correct compressed qcow (see
    // tests/bench.ts): accepted with the image in place.
    make: (path) =>
      `qemu-img convert -c -f raw -O qcow ${DISK} ${path}; test -s ${path}`,
    needs: ["qemu-img"],
  },
  {
    name: "vmdk streamOptimized",
    file: "disk-so.vmdk",
    format: "vmdk",
    make: (path) =>
      `qemu-img convert -f raw -O vmdk -o subformat=streamOptimized ${DISK} ${path}`,
    needs: ["qemu-img"],
  },
  {
    name: "dmg LZFSE",
    file: "disk-lzfse.dmg",
    format: "dmg",
    make: ourDmg("lzfse"),
    needs: [],
  },
  {
    name: "dmg bzip2",
    file: "disk-bzip2.dmg",
    format: "dmg",
    make: ourDmg("bzip2"),
    needs: [],
  },
  {
    name: "dmg xz",
    file: "disk-lzma.dmg",
    format: "dmg",
    make: ourDmg("lzma"),
    needs: [],
  },
];

/** Best wall time of RUNS runs of the CLI converting `path` to raw. */
async function timeCli(format: string, path: string): Promise<number> {
  let best = Infinity;
  for (let i = 0; i < RUNS; i++) {
    await Deno.remove(OUT).catch(() => {});
    const started = performance.now();
    await run(deno, [
      "run",
      "-A",
      CLI,
      "convert",
      "-f",
      format,
      "-O",
      "raw",
      path,
      OUT,
    ]);
    best = Math.min(best, (performance.now() - started) / 1000);
  }
  await Deno.remove(OUT).catch(() => {});
  return best;
}

/** What the page's module worker answers, timed in the page. */
interface Timed {
  seconds: number;
  sha256?: string;
  workers?: { during: { started: number; jobs: number; running: number } };
}

/**
 * Best wall time of RUNS conversions in the page's module worker of
 * `input` (a JavaScript expression: a URL string or `globalThis.blob`),
 * after one untimed run that hashes and must give `expected`.
 */
async function timeBrowser(
  page: Browser,
  input: string,
  expected: string,
  what: string,
): Promise<{ seconds: number; workers: string }> {
  const once = (hash: boolean) =>
    page.evaluate<Timed>(
      `(async () => {
        const started = performance.now();
        const r = await vdisk.convertInWorker(${input}, { hash: ${hash} });
        return { seconds: (performance.now() - started) / 1000, sha256: r.sha256, workers: r.workers };
      })()`,
    );
  const checked = await once(true);
  if (checked.sha256 !== expected) {
    throw new Error(
      `${what}: the browser's disk has sha256 ${checked.sha256}, expected ${expected}`,
    );
  }
  let best = Infinity;
  let workers = "";
  for (let i = 0; i < RUNS; i++) {
    const r = await once(false);
    best = Math.min(best, r.seconds);
    const w = r.workers?.during;
    workers = w ? `${w.running} workers, ${w.jobs} jobs so far` : "";
  }
  return { seconds: best, workers };
}

const filters = Deno.args.slice(1);
const wanted = cases.filter((c) =>
  (!filters.length || filters.some((f) => c.name.includes(f))) &&
  c.needs.every(have)
);
if (!have("chromium")) {
  throw new Error("deno task bench browser needs chromium");
}
await buildDisk();
const expected = await sha256File(DISK);
await Deno.mkdir(`${SITE}/images`, { recursive: true });
await bundle(`${SITE}/dist`);
for (const f of ["index.html", "worker.js", "sw.js"]) {
  await Deno.copyFile(`${ROOT}examples/web/${f}`, `${SITE}/${f}`);
}
const { server, base, rangeRequests } = fileServer(SITE);

const f2 = (n: number) => n.toFixed(2);
const rows: string[] = [];
console.log(
  `${SIZE_MIB} MiB real-data disk, best of ${RUNS}, ${navigator.hardwareConcurrency} cores\n`,
);
console.log(
  "| image | CLI | worker, URL source | worker, Blob source | tab peak RSS |",
);
console.log("| --- | --- | --- | --- | --- |");
try {
  for (const c of wanted) {
    const path = `${SITE}/images/${c.file}`;
    try {
      await Deno.stat(path);
    } catch {
      console.error(`making ${c.file}`);
      await run("sh", [
        "-c",
        `${c.make(`${path}.part`)} && mv ${path}.part ${path}`,
      ]);
    }
    const cli = await timeCli(c.format, path);
    const page = await launch(`${base}/index.html`);
    try {
      const requestsBefore = rangeRequests();
      const url = await timeBrowser(
        page,
        JSON.stringify(`/images/${c.file}`),
        expected,
        `${c.name} by URL`,
      );
      // The checked run and RUNS timed ones.
      const requests = Math.round(
        (rangeRequests() - requestsBefore) / (RUNS + 1),
      );
      await page.evaluate(
        `fetch("/images/${c.file}").then((r) => r.blob()).then((b) => { globalThis.blob = b; })`,
      );
      const blob = await timeBrowser(
        page,
        "globalThis.blob",
        expected,
        `${c.name} from a Blob`,
      );
      await page.evaluate(`delete globalThis.blob`);
      const peak = Math.max(...rendererPeaks(page.pid).values());
      const row = `| ${c.name} | ${f2(cli)} s | ${f2(url.seconds)} s (${
        f2(url.seconds / cli)
      }x) | ${f2(blob.seconds)} s (${f2(blob.seconds / cli)}x) | ${
        Math.round(peak / MIB)
      } MiB |`;
      rows.push(row);
      console.log(
        row +
          `  <!-- ${requests} range requests per conversion${
            url.workers ? `, ${url.workers}` : ""
          } -->`,
      );
    } catch (e) {
      throw new Error(
        `${(e as Error).message}\npage log:\n${page.logs.join("\n")}`,
      );
    } finally {
      await page.close();
    }
  }
} finally {
  await server.shutdown();
}
