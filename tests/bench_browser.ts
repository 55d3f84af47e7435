// `deno task bench browser`: the same conversions in headless chromium. A
// module worker (examples/web/worker.js) imports the bundle (dist/mod.js,
// built here, with its decode workers in dist/_worker.js), reads each
// image by URL (HTTP Range requests to a local server) and from a Blob,
// and converts it to raw, output discarded. Against it: the CLI converting
// the same image to a raw file. Best of BENCH_RUNS (3) each, the CLI, URL
// and Blob runs taken in turn (the load of a shared machine changes by
// the minute); ratios are worker / CLI. The first browser run of each
// source is not timed: it hashes the disk and checks it against the
// disk's sha256. CPU time: the CLI's user and system time (GNU time); the
// browser's is that of all its processes (the page's, its workers', the
// browser process's reading the Blob or the network) and, by URL, this
// process's (the file server), during the run.
//
//   deno task bench browser              every case
//   deno task bench browser cloop xz     cases whose name contains one of these
//   BENCH_SIZE_MIB=64 deno task bench browser   a smaller disk
//
// The disk is the bench's real data (tests/_bench_disk.ts): half a tar of
// /usr/lib, a quarter of zeros, a quarter of random bytes, 256 MiB. Images
// and disk are cached under $TMPDIR/vdisk-bench-browser-<size>. The tab's
// memory is the peak resident size (VmHWM) of the renderer process that
// runs the page, its module worker and the decode workers, in a browser
// started for each image.
import { type Browser, bundle, launch, rendererPeaks } from "./_cdp.ts";
import { fileServer, have, ROOT, run, sha256File } from "./_helpers.ts";
import { buildRealDisk } from "./_bench_disk.ts";
import process from "node:process";

const MIB = 1024 * 1024;
const SIZE_MIB = Number(Deno.env.get("BENCH_SIZE_MIB") ?? 256);
const RUNS = Number(Deno.env.get("BENCH_RUNS") ?? 3);
const DIR = `${
  Deno.env.get("TMPDIR") ?? "/tmp"
}/vdisk-bench-browser-${SIZE_MIB}`;
const SITE = `${DIR}/site`;
const DISK = `${DIR}/disk.raw`;
const OUT = `${DIR}/out-${Deno.pid}.raw`; // one per bench process
const CLI = `${ROOT}cli.ts`;
const deno = Deno.execPath();

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

/** A run's wall time and the CPU time (user and system) it cost, in seconds. */
interface Time {
  wall: number;
  cpu: number;
}

/** One run of the CLI converting `path` to raw: wall time, and its CPU time from GNU time. */
async function timeCli(format: string, path: string): Promise<Time> {
  await Deno.remove(OUT).catch(() => {});
  const started = performance.now();
  const r = await run("/usr/bin/time", [
    "-f",
    "%U %S",
    deno,
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
  const wall = (performance.now() - started) / 1000;
  const [user, sys] = r.stderr.trim().split("\n").pop()!.split(" ").map(
    Number,
  );
  await Deno.remove(OUT).catch(() => {});
  return { wall, cpu: user + sys };
}

/** CPU time (user and system, seconds) of process `pid` and its descendants so far. */
function treeCpu(pid: number, byKind?: Map<string, number>): number {
  const parents = new Map<number, number>();
  const ticks = new Map<number, number>();
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      // After the name in parentheses: state (0), parent (1), ... utime (11), stime (12).
      const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      parents.set(Number(entry.name), Number(f[1]));
      ticks.set(Number(entry.name), Number(f[11]) + Number(f[12]));
    } catch { /* gone meanwhile */ }
  }
  let total = 0;
  for (const [p, t] of ticks) {
    let q: number | undefined = p;
    while (q !== undefined && q > 1 && q !== pid) q = parents.get(q);
    if (q !== pid) continue;
    total += t;
    if (byKind) {
      // A chromium process's kind: its --type (renderer, utility: the
      // network service, gpu-process), or the browser process itself.
      let kind = "browser";
      try {
        const line = Deno.readTextFileSync(`/proc/${p}/cmdline`);
        kind = /--type=([\w-]+)/.exec(line)?.[1] ?? kind;
        if (kind === "utility") {
          kind = /--utility-sub-type=([\w.]+)/.exec(line)?.[1] ?? kind;
        }
      } catch { /* gone meanwhile */ }
      byKind.set(kind, (byKind.get(kind) ?? 0) + t / 100);
    }
  }
  return total / 100; // USER_HZ
}

/** This process's CPU time (the file server answering the page's range requests). */
function ownCpu(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

/** What the page's module worker answers, timed in the page. */
interface Timed {
  seconds: number;
  sha256?: string;
  workers?: { during: { started: number; jobs: number; running: number } };
}

/**
 * One conversion in the page's module worker of `input` (a JavaScript
 * expression: a URL string or `globalThis.blob`): the page's wall time and
 * the CPU time of the whole browser (every process) and of this process
 * (the file server) meanwhile. With `expected`, hashes and must give it.
 */
async function timeBrowser(
  page: Browser,
  input: string,
  what: string,
  expected?: string,
): Promise<Time & { workers: string }> {
  const kinds0 = new Map<string, number>(), kinds = new Map<string, number>();
  const server0 = ownCpu();
  const cpu0 = treeCpu(page.pid, kinds0) + server0;
  const r = await page.evaluate<Timed>(
    `(async () => {
        const started = performance.now();
        const r = await vdisk.convertInWorker(${input}, { hash: ${!!expected} });
        return { seconds: (performance.now() - started) / 1000, sha256: r.sha256, workers: r.workers };
      })()`,
  );
  const server = ownCpu();
  const cpu = treeCpu(page.pid, kinds) + server - cpu0;
  if (Deno.env.get("BENCH_CPU_DETAIL")) {
    const parts = [...kinds].map(([k, t]) =>
      `${k} ${f2(t - (kinds0.get(k) ?? 0))}`
    );
    console.error(
      `  ${what}: ${f2(r.seconds)} s, CPU ${f2(cpu)} s: ${
        parts.join(", ")
      }, file server ${f2(server - server0)}`,
    );
  }
  if (expected && r.sha256 !== expected) {
    throw new Error(
      `${what}: the browser's disk has sha256 ${r.sha256}, expected ${expected}`,
    );
  }
  const w = r.workers?.during;
  return {
    wall: r.seconds,
    cpu,
    workers: w ? `${w.running} workers, ${w.jobs} jobs so far` : "",
  };
}

/** The best wall time and the least CPU time of `times`. */
function best(times: Time[]): Time {
  return {
    wall: Math.min(...times.map((t) => t.wall)),
    cpu: Math.min(...times.map((t) => t.cpu)),
  };
}

const filters = Deno.args.slice(1);
const wanted = cases.filter((c) =>
  (!filters.length || filters.some((f) => c.name.includes(f))) &&
  c.needs.every(have)
);
if (!have("chromium")) {
  throw new Error("deno task bench browser needs chromium");
}
await Deno.mkdir(`${SITE}/images`, { recursive: true });
await buildRealDisk(DISK, SIZE_MIB);
const expected = await sha256File(DISK);
await Deno.mkdir(`${SITE}/images`, { recursive: true });
await bundle(`${SITE}/dist`);
for (const f of ["index.html", "worker.js", "sw.js"]) {
  await Deno.copyFile(`${ROOT}examples/web/${f}`, `${SITE}/${f}`);
}
const { server, base, rangeRequests } = fileServer(SITE);

const f2 = (n: number) => n.toFixed(2);
const load = () =>
  Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3).join(" ");
const rows: string[] = [];
console.log(
  `${SIZE_MIB} MiB real-data disk, best of ${RUNS} (CLI, URL and Blob runs interleaved), ${navigator.hardwareConcurrency} cores, load average ${load()}\n`,
);
console.log(
  "| image | CLI | worker, URL source | worker, Blob source | CPU: CLI, URL, Blob | tab peak RSS |",
);
console.log("| --- | --- | --- | --- | --- | --- |");
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
    const page = await launch(`${base}/index.html`);
    try {
      const url = JSON.stringify(`/images/${c.file}`);
      await page.evaluate(
        `fetch("/images/${c.file}").then((r) => r.blob()).then((b) => { globalThis.blob = b; })`,
      );
      // Checked once each, untimed: the disk's sha256.
      await timeBrowser(page, url, `${c.name} by URL`, expected);
      await timeBrowser(
        page,
        "globalThis.blob",
        `${c.name} from a Blob`,
        expected,
      );
      // The machine's load changes by the minute: the three are timed
      // in turn, so that each row's ratios compare runs minutes apart.
      const cli: Time[] = [], byUrl: Time[] = [], byBlob: Time[] = [];
      let workers = "";
      let requests = 0;
      for (let i = 0; i < RUNS; i++) {
        cli.push(await timeCli(c.format, path));
        const before = rangeRequests();
        const u = await timeBrowser(page, url, c.name);
        requests += (rangeRequests() - before) / RUNS;
        byUrl.push(u);
        workers = u.workers;
        byBlob.push(await timeBrowser(page, "globalThis.blob", c.name));
      }
      await page.evaluate(`delete globalThis.blob`);
      const peak = Math.max(...rendererPeaks(page.pid).values());
      const [k, u, b] = [best(cli), best(byUrl), best(byBlob)];
      const row = `| ${c.name} | ${f2(k.wall)} s | ${f2(u.wall)} s (${
        f2(u.wall / k.wall)
      }x) | ${f2(b.wall)} s (${f2(b.wall / k.wall)}x) | ${f2(k.cpu)}, ${
        f2(u.cpu)
      } (${f2(u.cpu / k.cpu)}x), ${f2(b.cpu)} s (${f2(b.cpu / k.cpu)}x) | ${
        Math.round(peak / MIB)
      } MiB |`;
      rows.push(row);
      console.log(
        row +
          `  <!-- ${Math.round(requests)} range requests per conversion by URL${
            workers ? `, ${workers}` : ""
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
console.log(`\nload average at the end: ${load()}`);
