// Shared helpers for the tests: hashing, reference tools, reference images.
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { type Extent, fromBytes, type Image, type Source } from "../mod.ts";

/** SHA-256 hex of bytes. */
export function sha256Hex(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/** SHA-256 hex of a file, streamed. */
export async function sha256File(path: string): Promise<string> {
  const h = createHash("sha256");
  using f = await Deno.open(path);
  for await (const chunk of f.readable) h.update(chunk);
  return h.digest("hex");
}

const toolCache = new Map<string, boolean>();
/** True when a command is on PATH. */
export function have(tool: string): boolean {
  if (!toolCache.has(tool)) {
    const r = new Deno.Command("sh", {
      args: ["-c", `command -v ${tool}`],
      stdout: "null",
      stderr: "null",
    }).outputSync();
    toolCache.set(tool, r.success);
  }
  return toolCache.get(tool)!;
}

/** Runs a command; throws with its stderr when it fails (unless `allowFail`). */
export async function run(
  cmd: string,
  args: string[],
  opts: { allowFail?: boolean; stdin?: Uint8Array; cwd?: string } = {},
): Promise<{ code: number; stdout: Uint8Array; stderr: string; text: string }> {
  // qemu-img and qemu-io time a PBKDF2 run for LUKS (create, measure,
  // amend) on the thread's CPU clock, and on a busy machine they can
  // measure nothing and give up ("Unable to get accurate CPU usage"):
  // that failure alone is tried again, up to 30 times.
  for (let attempt = 1;; attempt++) {
    const r = await runOnce(cmd, args, { ...opts, allowFail: true });
    if (
      r.code !== 0 && attempt < 30 && cmd.startsWith("qemu-") &&
      /Unable to get accurate CPU usage/.test(r.stderr)
    ) continue;
    if (r.code !== 0 && !opts.allowFail) {
      throw new Error(
        `${cmd} ${args.join(" ")} failed (${r.code}): ${r.stderr}`,
      );
    }
    return r;
  }
}

async function runOnce(
  cmd: string,
  args: string[],
  opts: { allowFail?: boolean; stdin?: Uint8Array; cwd?: string },
): Promise<{ code: number; stdout: Uint8Array; stderr: string; text: string }> {
  const child = new Deno.Command(cmd, {
    args,
    cwd: opts.cwd,
    stdin: opts.stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  // Output is read while stdin is written: a tool that answers as it reads
  // would otherwise fill its stdout pipe and wait for us forever.
  const output = child.output();
  if (opts.stdin) {
    const w = child.stdin.getWriter();
    await w.write(opts.stdin);
    await w.close();
  }
  const out = await output;
  const stderr = new TextDecoder().decode(out.stderr);
  const text = new TextDecoder().decode(out.stdout);
  if (!out.success && !opts.allowFail) {
    throw new Error(`${cmd} ${args.join(" ")} failed (${out.code}): ${stderr}`);
  }
  return { code: out.code, stdout: out.stdout, stderr, text };
}

/** The project's root folder. */
export const ROOT = new URL("../", import.meta.url).pathname;
/** The shared reference images folder, or undefined when absent. */
export const REFERENCE = existsSync(`${ROOT}../shared/reference-images`)
  ? `${ROOT}../shared/reference-images`
  : undefined;

/** One entry of the reference manifest. */
export interface ReferenceImage {
  path: string;
  format: string;
  virtual_size?: number;
  raw_sha256?: string | null;
  allocated_bytes?: number;
  corrupt?: boolean;
  note?: string;
}

/** The manifest's images (empty when ../shared is absent). */
export function referenceImages(): ReferenceImage[] {
  if (!REFERENCE) return [];
  return JSON.parse(Deno.readTextFileSync(`${REFERENCE}/manifest.json`))
    .images;
}

/**
 * The bytes of a reference image, decompressed when stored as .bz2 (with
 * the bzip2 tool). Undefined when ../shared is absent.
 */
export async function referenceBytes(
  path: string,
): Promise<Uint8Array | undefined> {
  if (!REFERENCE) return undefined;
  const full = `${REFERENCE}/${path}`;
  if (!path.endsWith(".bz2")) return await Deno.readFile(full);
  return (await run("bzip2", ["-dc", full])).stdout;
}

/** A reference image decompressed to a temporary file; its path. */
export async function referenceFile(
  path: string,
  dir: string,
): Promise<string | undefined> {
  const bytes = await referenceBytes(path);
  if (!bytes) return undefined;
  const name = path.split("/").pop()!.replace(/\.bz2$/, "");
  const out = `${dir}/${name}`;
  await Deno.writeFile(out, bytes);
  return out;
}

/** Set by CI: a missing tool or reference folder fails the run instead of ignoring tests. */
const REQUIRE_TOOLS = Deno.env.get("VDISK_REQUIRE_TOOLS") === "1";

/** Why a test is skipped, printed once per reason. */
const said = new Set<string>();
/**
 * True when the test must be skipped because `tools` are missing or
 * ../shared is absent (with `needShared`); says why on stderr.
 */
export function skip(tools: string[], needShared = false): boolean {
  const missing = tools.filter((t) => !have(t));
  if (needShared && !REFERENCE) missing.push("../shared/reference-images");
  if (missing.length === 0) return false;
  if (REQUIRE_TOOLS) {
    // CI sets VDISK_REQUIRE_TOOLS=1 after installing the tools: a test
    // that would be ignored there means an install step went missing.
    throw new Error(
      `VDISK_REQUIRE_TOOLS is set, but ${missing.join(", ")} is missing`,
    );
  }
  const why = `skipping: ${missing.join(", ")} not available`;
  if (!said.has(why)) {
    said.add(why);
    console.error(why);
  }
  return true;
}

/** A temporary folder removed after `fn`. */
export async function withTemp<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "vdisk-test-" });
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Deterministic pseudo-random bytes (xorshift32) for test data. */
export function pseudoRandom(
  length: number,
  seed = 1,
): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(length);
  let x = seed || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** Runs the CLI (`cli.ts`) as a subprocess. */
export function cli(
  args: string[],
  opts: { stdin?: Uint8Array; cwd?: string } = {},
) {
  return run(Deno.execPath(), ["run", "-A", `${ROOT}cli.ts`, ...args], {
    ...opts,
    allowFail: true,
  });
}

/** Asserts that `fn` rejects with an error of class `type` whose message matches. */
export async function rejects(
  fn: () => Promise<unknown>,
  type: abstract new (...args: never[]) => Error,
  pattern?: RegExp,
): Promise<Error> {
  try {
    await fn();
  } catch (e) {
    if (!(e instanceof type)) {
      throw new Error(
        `expected ${type.name}, got ${(e as Error)?.name}: ${
          (e as Error)?.message
        }`,
      );
    }
    if (pattern && !pattern.test(e.message)) {
      throw new Error(`message ${JSON.stringify(e.message)} !~ ${pattern}`);
    }
    return e;
  }
  throw new Error(`expected ${type.name}, but nothing was thrown`);
}

/**
 * A static file server with Range support on 127.0.0.1, as a CDN would
 * be; `rangeRequests()` counts the Range requests answered so far.
 */
export function fileServer(root: string) {
  let ranges = 0;
  const server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    async (req) => {
      const path = `${root}${new URL(req.url).pathname}`;
      let file: Deno.FsFile;
      try {
        file = await Deno.open(path);
      } catch {
        return new Response("not found", { status: 404 });
      }
      const size = (await file.stat()).size;
      const m = /bytes=(\d+)-(\d+)/.exec(req.headers.get("range") ?? "");
      // Module scripts load only with a JavaScript MIME type.
      const type = path.endsWith(".js")
        ? "text/javascript"
        : path.endsWith(".html")
        ? "text/html"
        : "application/octet-stream";
      if (!m) {
        return new Response(file.readable, {
          headers: { "content-length": String(size), "content-type": type },
        });
      }
      ranges++;
      const start = Number(m[1]);
      const end = Math.min(Number(m[2]), size - 1);
      // Streamed from the file as it is read, as a web server does (nginx
      // with sendfile), not read whole before the answer starts: the
      // browser gets a window's first bytes as soon as they are read.
      await file.seek(start, Deno.SeekMode.Start);
      let left = end - start + 1;
      const body = new ReadableStream<Uint8Array>({
        type: "bytes",
        async pull(controller) {
          const chunk = new Uint8Array(Math.min(left, 256 << 10));
          const n = await file.read(chunk);
          if (n === null) {
            file.close();
            controller.error(new Error(`${path}: ended early`));
            return;
          }
          left -= n;
          controller.enqueue(chunk.subarray(0, n));
          if (left === 0) {
            file.close();
            controller.close();
          }
        },
        cancel() {
          file.close();
        },
      });
      return new Response(body, {
        status: 206,
        headers: {
          "content-range": `bytes ${start}-${end}/${size}`,
          "content-length": String(end - start + 1),
        },
      });
    },
  );
  return {
    server,
    base: `http://127.0.0.1:${server.addr.port}`,
    rangeRequests: () => ranges,
  };
}

/** Runs qemu-io once on the `format` image at `path`, one `-c` per command. */
export async function qemuIo(
  format: string,
  path: string,
  ...commands: string[]
): Promise<void> {
  await run("qemu-io", [
    "-f",
    format,
    ...commands.flatMap((c) => ["-c", c]),
    path,
  ]);
}

/**
 * Asserts that `qemu-img compare` finds the raw disk `raw` and the `format`
 * image `image` identical (exit 0 and "Images are identical.").
 */
export async function assertQemuIdentical(
  raw: string,
  image: string,
  format: string,
): Promise<void> {
  const r = await run("qemu-img", [
    "compare",
    "-f",
    "raw",
    "-F",
    format,
    raw,
    image,
  ], { allowFail: true });
  if (r.code !== 0 || !/identical/.test(r.text)) {
    throw new Error(
      `qemu-img compare ${raw} ${image} (${format}): exit ${r.code}: ${r.text}${r.stderr}`,
    );
  }
}

/** Every run of an image's allocation map. */
export async function runs(image: Image): Promise<Extent[]> {
  const out: Extent[] = [];
  for await (const e of image.extents(0, image.size)) out.push(e);
  return out;
}

/**
 * A source over `bytes` that counts the work done on it: how many reads
 * and how many bytes. Tests of malformed images bound these counts instead
 * of the wall time (which this machine makes noisy): a refusal that loops
 * or reads the image over and over shows as a count, on any machine.
 */
export function countingSource(
  bytes: Uint8Array,
): { source: Source; reads: () => number; bytesRead: () => number } {
  const inner = fromBytes(bytes);
  let reads = 0;
  let total = 0;
  const source: Source = {
    size: inner.size,
    read(offset, length) {
      reads++;
      total += length;
      return inner.read(offset, length);
    },
  };
  return { source, reads: () => reads, bytesRead: () => total };
}

/**
 * Asserts that work on an image of `size` bytes stayed small: at most
 * `maxReads` reads and at most `factor` times the image's bytes read.
 */
export function assertBoundedWork(
  counted: { reads: () => number; bytesRead: () => number },
  size: number,
  maxReads = 1000,
  factor = 4,
) {
  if (counted.reads() > maxReads || counted.bytesRead() > factor * size) {
    throw new Error(
      `too much work: ${counted.reads()} reads, ${counted.bytesRead()} bytes of a ${size}-byte image`,
    );
  }
}

/**
 * Starts `cli.ts serve` with `args` on a port the system picks (`--port 0`)
 * and waits for its "listening" line: a server that dies first is an error
 * with what it said, and one that never listens fails after `timeoutMs`,
 * instead of a test waiting forever. Returns the child and its port; the
 * caller kills it.
 */
export async function startServe(
  args: string[],
  timeoutMs = 30_000,
): Promise<{ child: Deno.ChildProcess; port: number }> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${ROOT}cli.ts`, "serve", "--port", "0", ...args],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const reader = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let said = "";
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    const port = await Promise.race([
      (async () => {
        for (;;) {
          const match = /listening on http:\/\/[^\s]*:(\d+)\//.exec(said);
          if (match) return Number(match[1]);
          const { value, done } = await reader.read();
          if (done) throw new Error(`serve ended before listening: ${said}`);
          said += value;
        }
      })(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new Error(`serve did not listen: ${said}`)),
          timeoutMs,
        );
      }),
    ]);
    return { child, port };
  } catch (e) {
    child.kill("SIGKILL");
    await child.status;
    throw e;
  } finally {
    clearTimeout(timer);
    await reader.cancel().catch(() => {});
  }
}

/** The whole of a source, read 1 MiB at a time (as a reader going forward would). */
export async function readAll(image: Source): Promise<Uint8Array> {
  const out = new Uint8Array(image.size);
  for (let at = 0; at < image.size; at += 1 << 20) {
    out.set(await image.read(at, Math.min(1 << 20, image.size - at)), at);
  }
  return out;
}

/**
 * What reading the image file `path` whole gives where memory is not
 * shared and there is no native inflater, as in a browser page that is not
 * cross-origin isolated (tests/_unshared_read.ts, in a subprocess): the
 * SHA-256 of its bytes and the decode workers' jobs, or the error.
 */
export async function unsharedRead(
  path: string,
): Promise<
  { sha256?: string; jobs?: number; shared?: string; error?: string }
> {
  const o = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${ROOT}tests/_unshared_read.ts`, path],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!o.success) throw new Error(new TextDecoder().decode(o.stderr));
  return JSON.parse(new TextDecoder().decode(o.stdout));
}

/**
 * Writes a disk of `mib` MiB for the memory tests: text-like bytes with
 * random runs (about 2:1 with zlib, 1:2 with xz -1, quick to pack), its
 * last 8 MiB zeros.
 *
 * @example
 * ```ts ignore
 * await writeTextLikeDisk(`${dir}/disk.raw`, 136);
 * ```
 */
export async function writeTextLikeDisk(path: string, mib: number) {
  const file = await Deno.open(path, {
    write: true,
    create: true,
    truncate: true,
  });
  const words = new TextEncoder().encode(
    "sector cluster chunk block table partition checksum trailer ",
  );
  const block = new Uint8Array(1 << 20);
  try {
    for (let at = 0; at < mib; at++) {
      const noise = pseudoRandom(block.length, at + 1);
      for (let i = 0; i < block.length; i++) {
        block[i] = i % 4096 < 1024
          ? noise[i]
          : words[(i + at * 7 + (noise[i] & 3)) % words.length];
      }
      if (at >= mib - 8) block.fill(0);
      await file.write(block);
    }
  } finally {
    file.close();
  }
}

/**
 * Converts `input` to a raw `output` with our CLI in a child process, run
 * under GNU time; answers the child's peak RSS in KiB.
 *
 * @example
 * ```ts ignore
 * const kib = await convertPeakKiB(`${dir}/disk.dmg`, `${dir}/out.raw`);
 * ```
 */
export async function convertPeakKiB(
  input: string,
  output: string,
): Promise<number> {
  const { stderr } = await run("/usr/bin/time", [
    "-f",
    "peak %M KiB",
    Deno.execPath(),
    "run",
    "-A",
    `${ROOT}cli.ts`,
    "convert",
    "-O",
    "raw",
    input,
    output,
  ]);
  const kib = Number(/peak (\d+) KiB/.exec(stderr)?.[1]);
  if (!(kib > 0)) throw new Error(`no peak in ${stderr}`);
  return kib;
}
