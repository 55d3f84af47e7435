// Profiles one browser conversion of the browser bench (tests/bench_browser.ts)
// in headless chromium: the CDP Profiler runs on the page's module worker and
// on every decode worker it starts, and each thread's self time is printed by
// function (idle, GC and program time included), with the thread's busy share.
//
//   deno run -A tests/_profile_browser.ts IMAGE [url|blob]
//
// IMAGE is a file under $TMPDIR/vdisk-bench-browser-256/site/images (run
// `deno task bench browser` once to make them). The bundle is rebuilt first.
import { bundle, launch } from "./_cdp.ts";
import { fileServer, ROOT } from "./_helpers.ts";

const SIZE_MIB = Number(Deno.env.get("BENCH_SIZE_MIB") ?? 256);
const SITE = `${
  Deno.env.get("TMPDIR") ?? "/tmp"
}/vdisk-bench-browser-${SIZE_MIB}/site`;
const [image, how = "url"] = Deno.args;
if (!image) throw new Error("usage: _profile_browser.ts IMAGE [url|blob]");

await bundle(`${SITE}/dist`);
for (const f of ["index.html", "worker.js", "sw.js"]) {
  await Deno.copyFile(`${ROOT}examples/web/${f}`, `${SITE}/${f}`);
}
const { server, base } = fileServer(SITE);
const page = await launch(`${base}/index.html`);

interface Node {
  id: number;
  callFrame: {
    functionName: string;
    url: string;
    lineNumber: number;
  };
  hitCount?: number;
}
interface Profile {
  nodes: Node[];
  samples?: number[];
  timeDeltas?: number[];
  startTime: number;
  endTime: number;
}

const sessions = new Map<string, string>(); // session id -> target title
try {
  const attach = (session?: string) => {
    const params = {
      autoAttach: true,
      waitForDebuggerOnStart: true,
      flatten: true,
    };
    return session
      ? page.sendTo(session, "Target.setAutoAttach", params)
      : page.send("Target.setAutoAttach", params);
  };
  page.onEvent((method, params) => {
    if (Deno.env.get("CDP_DEBUG")) {
      console.error(method, JSON.stringify(params).slice(0, 200));
    }
    if (method !== "Target.attachedToTarget") return;
    const session = params.sessionId as string;
    const info = params.targetInfo as { type: string; url: string };
    if (info.type !== "worker") {
      page.sendTo(session, "Runtime.runIfWaitingForDebugger").catch(() => {});
      return;
    }
    sessions.set(session, info.url.replace(base, ""));
    (async () => {
      await page.sendTo(session, "Profiler.enable");
      await page.sendTo(session, "Profiler.setSamplingInterval", {
        interval: 200,
      });
      await page.sendTo(session, "Profiler.start");
      await attach(session);
      await page.sendTo(session, "Runtime.runIfWaitingForDebugger");
    })().catch((e) => console.error(`attach ${info.url}: ${e.message}`));
  });
  await attach();
  const input = how === "blob" ? "globalThis.blob" : `"/images/${image}"`;
  if (how === "blob") {
    await page.evaluate(
      `fetch("/images/${image}").then((r) => r.blob()).then((b) => { globalThis.blob = b; })`,
    );
  }
  // The image stays open in the module worker a second time while the
  // conversion runs, so its decode workers live (the pool is held) until
  // their profiles are taken.
  await page.evaluate(
    `vdisk.convertInWorker("/images/${image}", { hash: false, format: "raw" }).catch(() => {})`,
  );
  const moduleWorker = [...sessions].find(([, t]) => t === "/worker.js")?.[0];
  if (moduleWorker) {
    await page.sendTo(moduleWorker, "Runtime.evaluate", {
      expression: `import("/dist/mod.js").then(async (m) => {
        globalThis.keep = await m.open(await m.fromUrl(new URL("/images/${image}", location.href)));
      })`,
      awaitPromise: true,
    });
    // Only the timed conversion is profiled.
    await page.sendTo(moduleWorker, "Profiler.stop");
    await page.sendTo(moduleWorker, "Profiler.start");
  }
  const seconds = await page.evaluate<number>(`(async () => {
    const started = performance.now();
    await vdisk.convertInWorker(${input}, { hash: false });
    return (performance.now() - started) / 1000;
  })()`);
  console.log(`${image} by ${how}: ${seconds.toFixed(2)} s in the page\n`);
  for (const [session, title] of sessions) {
    let profile: Profile;
    try {
      profile = (await page.sendTo(session, "Profiler.stop"))
        .profile as Profile;
    } catch {
      continue; // ended meanwhile
    }
    report(title, profile);
  }
} finally {
  await page.close();
  await server.shutdown();
}

/** Prints a thread's self time by function. */
function report(title: string, profile: Profile) {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const self = new Map<string, number>();
  const samples = profile.samples ?? [];
  const deltas = profile.timeDeltas ?? [];
  let total = 0;
  for (let i = 0; i < samples.length; i++) {
    const node = byId.get(samples[i])!;
    const dt = (deltas[i + 1] ?? 0) / 1000; // ms spent at this sample
    const f = node.callFrame;
    const key = `${f.functionName || "(anonymous)"} ${
      f.url.replace(/^.*\//, "")
    }:${f.lineNumber + 1}`;
    self.set(key, (self.get(key) ?? 0) + dt);
    total += dt;
  }
  const idle = [...self].filter(([k]) => k.startsWith("(idle)"))
    .reduce((n, [, v]) => n + v, 0);
  console.log(
    `== ${title}: ${total.toFixed(0)} ms sampled, busy ${
      (total - idle).toFixed(0)
    } ms (${((total - idle) / total * 100).toFixed(0)}%)`,
  );
  for (const [k, v] of [...self].sort((a, b) => b[1] - a[1]).slice(0, 22)) {
    console.log(`  ${v.toFixed(0).padStart(6)} ms  ${k}`);
  }
  console.log();
}
