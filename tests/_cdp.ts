// A minimal Chrome DevTools Protocol client: starts Debian's headless
// chromium and talks to one page over a WebSocket. No downloaded browsers.

import { ROOT, run } from "./_helpers.ts";

/** A page in a running headless chromium. */
export interface Browser {
  /** Evaluates an expression in the page (awaiting promises) and returns its value. */
  evaluate<T>(expression: string): Promise<T>;
  /** Sends a raw CDP command to the page's session. */
  send(
    method: string,
    params?: Record<string, unknown>,
  ): Promise<Record<string, unknown>>;
  /** Sends a command to the browser itself (no session). */
  sendBrowser(
    method: string,
    params?: Record<string, unknown>,
  ): Promise<Record<string, unknown>>;
  /** Sends a command to another session (a worker attached with `Target.setAutoAttach`). */
  sendTo(
    sessionId: string,
    method: string,
    params?: Record<string, unknown>,
  ): Promise<Record<string, unknown>>;
  /** Calls `listener` with every event (method, params, session) the browser sends. */
  onEvent(
    listener: (
      method: string,
      params: Record<string, unknown>,
      sessionId?: string,
    ) => void,
  ): void;
  /** Messages the page logged (console and errors), for failure reports. */
  logs: string[];
  /** The browser process's id (its renderers are among its descendants). */
  pid: number;
  close(): Promise<void>;
}

/** Starts chromium headless and opens `url` in a new page. */
export async function launch(url: string): Promise<Browser> {
  const profile = await Deno.makeTempDir({ prefix: "vdisk-chromium-" });
  const child = new Deno.Command("chromium", {
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-dev-shm-usage",
      `--user-data-dir=${profile}`,
      "--remote-debugging-port=0",
      "about:blank",
    ],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const reader = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let said = "";
  let wsUrl: string | undefined;
  const deadline = Date.now() + 30_000;
  while (!wsUrl) {
    const { value, done } = await reader.read();
    if (done || Date.now() > deadline) {
      throw new Error(`chromium did not start: ${said.slice(-500)}`);
    }
    said += value;
    wsUrl = /DevTools listening on (ws:\/\/\S+)/.exec(said)?.[1];
  }
  // Keep draining stderr so chromium never blocks on a full pipe.
  (async () => {
    try {
      while (!(await reader.read()).done) { /* drain */ }
    } catch { /* closed */ }
  })();

  const socket = new WebSocket(wsUrl);
  await new Promise((resolve, reject) => {
    socket.onopen = resolve;
    socket.onerror = reject;
  });
  let nextId = 1;
  const waiting = new Map<
    number,
    {
      resolve: (v: Record<string, unknown>) => void;
      reject: (e: Error) => void;
    }
  >();
  const logs: string[] = [];
  const listeners: ((
    method: string,
    params: Record<string, unknown>,
    sessionId?: string,
  ) => void)[] = [];
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.method) {
      for (const l of listeners) {
        l(message.method, message.params, message.sessionId);
      }
    }
    if (message.id && waiting.has(message.id)) {
      const w = waiting.get(message.id)!;
      waiting.delete(message.id);
      if (message.error) w.reject(new Error(`CDP: ${message.error.message}`));
      else w.resolve(message.result);
    } else if (message.method === "Runtime.consoleAPICalled") {
      logs.push(
        message.params.args.map((
          a: { value?: unknown; description?: string },
        ) => a.value ?? a.description).join(" "),
      );
    } else if (message.method === "Runtime.exceptionThrown") {
      logs.push(JSON.stringify(message.params.exceptionDetails).slice(0, 500));
    }
  };
  const raw = (
    method: string,
    params: Record<string, unknown> = {},
    sessionId?: string,
  ) => {
    const id = nextId++;
    socket.send(JSON.stringify({ id, method, params, sessionId }));
    return new Promise<Record<string, unknown>>((resolve, reject) =>
      waiting.set(id, { resolve, reject })
    );
  };
  const { targetId } = await raw("Target.createTarget", { url: "about:blank" });
  const { sessionId } = await raw("Target.attachToTarget", {
    targetId,
    flatten: true,
  });
  const send = (method: string, params: Record<string, unknown> = {}) =>
    raw(method, params, sessionId as string);
  await send("Runtime.enable");
  await send("Page.enable");
  await send("Page.navigate", { url });
  // Wait for the page's script to define its API.
  for (let i = 0; i < 200; i++) {
    const r = await send("Runtime.evaluate", {
      expression: "typeof globalThis.vdisk",
      returnByValue: true,
    });
    if ((r.result as { value: string }).value === "object") break;
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    logs,
    pid: child.pid,
    send,
    sendBrowser: (method, params) => raw(method, params),
    sendTo: (session, method, params) => raw(method, params, session),
    onEvent: (listener) => listeners.push(listener),
    async evaluate<T>(expression: string) {
      const r = await send("Runtime.evaluate", {
        expression,
        awaitPromise: true,
        returnByValue: true,
      });
      if (r.exceptionDetails) {
        const details = r.exceptionDetails as {
          exception?: { description?: string };
          text?: string;
        };
        throw new Error(
          details.exception?.description ?? details.text ?? "evaluation failed",
        );
      }
      return (r.result as { value: T }).value;
    },
    async close() {
      socket.close();
      child.kill("SIGKILL");
      await child.status;
      await Deno.remove(profile, { recursive: true }).catch(() => {});
    },
  };
}

/**
 * Peak resident memory (VmHWM, in bytes) of each renderer process of the
 * browser whose process id is `pid` (the page, its workers and the service
 * worker run in them), by process id.
 */
export function rendererPeaks(pid: number): Map<number, number> {
  const parents = new Map<number, number>();
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      // After the name in parentheses: state, then the parent's id.
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      parents.set(Number(entry.name), ppid);
    } catch { /* gone meanwhile */ }
  }
  const peaks = new Map<number, number>();
  for (const p of parents.keys()) {
    let q = parents.get(p);
    while (q !== undefined && q > 1 && q !== pid) q = parents.get(q);
    if (q !== pid) continue;
    try {
      const cmdline = Deno.readTextFileSync(`/proc/${p}/cmdline`);
      if (!cmdline.includes("--type=renderer")) continue;
      const status = Deno.readTextFileSync(`/proc/${p}/status`);
      const kib = /VmHWM:\s+(\d+) kB/.exec(status)?.[1];
      if (kib) peaks.set(p, Number(kib) * 1024);
    } catch { /* gone meanwhile */ }
  }
  return peaks;
}

/**
 * Builds the bundle as `deno task bundle` does into `dist`: `mod.js` and
 * the decode workers' `_worker.js` beside it.
 */
export async function bundle(dist: string) {
  await Deno.mkdir(dist, { recursive: true });
  for (
    const [out, entry] of [["mod.js", "mod.ts"], [
      "_worker.js",
      "drivers/codecs/_worker.ts",
    ]]
  ) {
    await run(Deno.execPath(), [
      "bundle",
      "--platform=browser",
      "-o",
      `${dist}/${out}`,
      `${ROOT}${entry}`,
    ]);
  }
}
