/**
 * The command line, with qemu-img's conventions:
 *
 * ```sh
 * deno run -A cli.ts info [-f FMT] [--output=json] IMAGE
 * deno run -A cli.ts convert [-f FMT] [-O FMT] [-o OPTS] [-p] IN OUT
 * deno run -A cli.ts map [--output=json] IMAGE
 * deno run -A cli.ts create -f FMT [-b BACKING -F FMT] [-o OPTS] OUT SIZE
 * deno run -A cli.ts compare A B
 * deno run -A cli.ts formats
 * ```
 *
 * This is the only module that parses argv and prints. Every failure is one
 * line on stderr: exit 1 for errors, 2 for usage errors (and for `compare`,
 * whose 1 means "different").
 *
 * @module
 */

import { parseArgs, type ParseArgsConfig } from "node:util";
import {
  conversionService,
  convert,
  type ConvertOptions,
  create,
  createOutputFile,
  driver,
  extentsOf,
  type FileHandle,
  formats,
  fromFile,
  type Image,
  imageInfo,
  open,
  type OpenOptions,
  type OutputFile,
  type Sink,
  streamSink,
} from "./mod.ts";

/** A mistake in how the command was called (exit 2). */
class UsageError extends Error {
  constructor(message: string, readonly command?: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** What a subcommand gets: its parsed flags and positionals. */
interface Invocation {
  values: Record<string, string | boolean | (string | boolean)[] | undefined>;
  positionals: string[];
}

/** One subcommand: how to call it, its flags, and what it does (returns the exit code). */
interface Command {
  usage: string;
  summary: string;
  options: NonNullable<ParseArgsConfig["options"]>;
  run(call: Invocation): Promise<number>;
}

const encoder = new TextEncoder();
const print = (text: string) => Deno.stdout.writeSync(encoder.encode(text));
const printErr = (text: string) => Deno.stderr.writeSync(encoder.encode(text));

/** Files opened by this run, closed at exit. */
const opened: { close?(): Promise<void> }[] = [];

// ---------------------------------------------------------------------------
// Shared pieces of the subcommands

/** Parses `-o key=value,key=value` (qemu-img's option syntax). */
function parseOptions(text: string | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  if (!text) return out;
  for (const part of text.split(",")) {
    if (!part) continue;
    const eq = part.indexOf("=");
    if (eq < 0) out[part] = "on";
    else out[part.slice(0, eq)] = part.slice(eq + 1);
  }
  return out;
}

/** Parses a size as qemu-img does: bytes, or a number with k/M/G/T (powers of 1024). */
function parseSize(text: string): number {
  const match = /^(\d+(?:\.\d+)?)([bkKmMgGtTpP]?)$/.exec(text);
  if (!match) throw new UsageError(`invalid size '${text}'`);
  const power = " kmgtp".indexOf(match[2].toLowerCase());
  const size = Number(match[1]) * 1024 ** Math.max(0, power);
  if (!Number.isSafeInteger(size)) {
    throw new UsageError(`invalid size '${text}'`);
  }
  return size;
}

/** Options for {@linkcode openImage}. */
interface InputOptions {
  format?: string;
  writable?: boolean;
  /** Follow backing files (convert, compare); info does not unless asked. */
  followBacking?: boolean;
  /** Extra OpenOptions from subcommand flags (keys, resolvers). */
  extra?: OpenOptions;
}

/** Opens an image file named on the command line. */
async function openImage(path: string, options: InputOptions = {}) {
  const file = await fromFile(path, { write: options.writable === true });
  opened.push(file);
  const image = await open(file, {
    ...options.extra,
    format: options.format,
    writable: options.writable,
    sink: options.writable ? file : undefined,
  });
  opened.push(image);
  return { file, image };
}

/** A sink for an output path: `-` is stdout, anything else a temporary file renamed on success. */
async function openOutput(
  path: string,
): Promise<Sink & { commit?(): Promise<void>; abort?(): Promise<void> }> {
  if (path === "-") return streamSink(Deno.stdout.writable, "stdout");
  const out = await createOutputFile(path);
  pendingOutputs.add(out);
  return out;
}

/** Outputs not yet committed: removed on failure or interruption. */
const pendingOutputs = new Set<OutputFile>();

async function finishOutput(
  sink: Sink & { commit?(): Promise<void> },
): Promise<void> {
  if (sink.commit) {
    await sink.commit();
    pendingOutputs.delete(sink as OutputFile);
  } else {
    await sink.close();
  }
}

function humanSize(bytes: number): string {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let value = bytes;
  while (value >= 1024 && i < units.length - 1) {
    value /= 1024;
    i++;
  }
  if (i === 0) return `${bytes} bytes`;
  const text = Number.isInteger(value)
    ? String(value)
    : value.toFixed(2).replace(/\.?0+$/, "");
  return `${text} ${units[i]}`;
}

/** A progress bar on stderr: bytes, percent, rate, ETA. */
function progressBar(label: string) {
  const started = performance.now();
  let last = 0;
  let shown = false;
  return {
    update(done: number, total: number) {
      const now = performance.now();
      if (now - last < 200 && done < total) return;
      last = now;
      shown = true;
      const fraction = total ? done / total : 1;
      const seconds = (now - started) / 1000;
      const rate = seconds > 0 ? done / seconds : 0;
      const eta = rate > 0 ? (total - done) / rate : 0;
      const width = 30;
      const filled = Math.round(fraction * width);
      const bar = "#".repeat(filled) + " ".repeat(width - filled);
      const clock = (s: number) =>
        `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`;
      printErr(
        `\r${label} [${bar}] ${(fraction * 100).toFixed(1).padStart(5)}% ${
          humanSize(done)
        } / ${humanSize(total)}  ${humanSize(rate)}/s  ETA ${clock(eta)}   `,
      );
    },
    end() {
      if (shown) printErr("\n");
    },
  };
}

// ---------------------------------------------------------------------------
// The subcommands

const commands: Record<string, Command> = {
  info: {
    usage: "info [-f FMT] [--output=human|json] IMAGE",
    summary: "show what an image is: format, sizes, backing file, details",
    options: {
      format: { type: "string", short: "f" },
      output: { type: "string", default: "human" },
    },
    async run({ values, positionals }) {
      const [path] = need(positionals, 1, "info");
      const { file, image } = await openImage(path, {
        format: values.format as string | undefined,
      });
      const info = await describe(path, file, image);
      if (values.output === "json") {
        print(JSON.stringify(info, null, 4) + "\n");
      } else {
        print(humanInfo(info));
      }
      return 0;
    },
  },

  convert: {
    usage:
      "convert [-f FMT] [-O FMT] [-o OPTS] [-c] [-p] [--hash] [--no-verify] IN OUT   (OUT '-' is stdout)",
    summary: "convert an image to another format (raw by default)",
    options: {
      format: { type: "string", short: "f" },
      "output-format": { type: "string", short: "O", default: "raw" },
      options: { type: "string", short: "o" },
      compress: { type: "boolean", short: "c" },
      progress: { type: "boolean", short: "p" },
      hash: { type: "boolean" },
      // Skips the input's checksum checks (dmg verifies its CRC-32s by default).
      "no-verify": { type: "boolean" },
    },
    async run({ values, positionals }) {
      const [input, output] = need(positionals, 2, "convert");
      const outFormat = values["output-format"] as string;
      driver(outFormat); // an unknown format fails before any file is made
      const { image } = await openImage(input, {
        format: values.format as string | undefined,
        followBacking: true,
        extra: values["no-verify"] ? { options: { verify: "off" } } : undefined,
      });
      const sink = await openOutput(output);
      const bar = values.progress ? progressBar("convert") : undefined;
      const options: ConvertOptions = {
        format: outFormat,
        options: parseOptions(values.options as string | undefined),
        compress: values.compress === true,
        hash: values.hash === true,
        onProgress: bar ? (done, total) => bar.update(done, total) : undefined,
      };
      const result = await convert(image, sink, options);
      bar?.end();
      await finishOutput(sink);
      if (result.sha256) printErr(`sha256 ${result.sha256}\n`);
      return 0;
    },
  },

  map: {
    usage: "map [-f FMT] [--output=human|json] IMAGE",
    summary:
      "show the allocation map: which runs hold data, which read as zeros",
    options: {
      format: { type: "string", short: "f" },
      output: { type: "string", default: "human" },
    },
    async run({ values, positionals }) {
      const [path] = need(positionals, 1, "map");
      const { image } = await openImage(path, {
        format: values.format as string | undefined,
      });
      const json = values.output === "json";
      const lines: string[] = [];
      if (!json) {
        print(
          `${"Offset".padEnd(16)}${"Length".padEnd(16)}${
            "Mapped to".padEnd(16)
          }File\n`,
        );
      }
      for await (const run of extentsOf(image, 0, image.size)) {
        const data = run.kind === "data";
        if (json) {
          // Keys and order as qemu-img's; `offset` (the host file offset) is
          // known only for raw images.
          const entry: Record<string, unknown> = {
            start: run.offset,
            length: run.length,
            depth: 0,
            present: run.kind !== "unallocated",
            zero: !data,
            data,
          };
          if (image.format === "raw") entry.offset = run.offset;
          lines.push(
            "{ " + Object.entries(entry).map(([k, v]) =>
              `"${k}": ${v}`
            ).join(", ") + "}",
          );
        } else if (data) {
          const hex = (n: number) => `0x${n.toString(16)}`.padEnd(16);
          print(
            `${hex(run.offset)}${hex(run.length)}${
              image.format === "raw" ? hex(run.offset) : "-".padEnd(16)
            }${path}\n`,
          );
        }
      }
      if (json) print(`[${lines.join(",\n")}]\n`);
      return 0;
    },
  },

  create: {
    usage: "create -f FMT [-b BACKING -F FMT] [-o OPTS] OUT SIZE",
    summary: "create an empty image",
    options: {
      format: { type: "string", short: "f" },
      backing: { type: "string", short: "b" },
      "backing-format": { type: "string", short: "F" },
      options: { type: "string", short: "o" },
    },
    async run({ values, positionals }) {
      const format = values.format as string | undefined;
      if (!format) throw new UsageError("create needs -f FORMAT", "create");
      const [path, sizeText] = need(positionals, 2, "create");
      driver(format);
      const size = parseSize(sizeText);
      const sink = await openOutput(path);
      const image = await create(format, sink, {
        size,
        backingFile: values.backing as string | undefined,
        backingFormat: values["backing-format"] as string | undefined,
        options: parseOptions(values.options as string | undefined),
      });
      await image.flush?.();
      await finishOutput(sink);
      print(`Formatting '${path}', fmt=${format} size=${size}\n`);
      return 0;
    },
  },

  compare: {
    usage: "compare [-f FMT] [-F FMT] [-s] A B",
    summary: "compare two images' contents (exit 0 same, 1 different, 2 error)",
    options: {
      "a-format": { type: "string", short: "f" },
      "b-format": { type: "string", short: "F" },
      strict: { type: "boolean", short: "s" },
    },
    async run({ values, positionals }) {
      const [pathA, pathB] = need(positionals, 2, "compare");
      const a = (await openImage(pathA, {
        format: values["a-format"] as string | undefined,
        followBacking: true,
      })).image;
      const b = (await openImage(pathB, {
        format: values["b-format"] as string | undefined,
        followBacking: true,
      })).image;
      if (values.strict && a.size !== b.size) {
        print(`Strict mode: Image size mismatch!\n`);
        return 1;
      }
      const mismatch = await firstDifference(a, b);
      if (mismatch === undefined) {
        if (a.size !== b.size) print("Warning: Image size mismatch!\n");
        print("Images are identical.\n");
        return 0;
      }
      print(`Content mismatch at offset ${mismatch}!\n`);
      return 1;
    },
  },

  serve: {
    usage:
      "serve [--port N] [--hostname H] [--allow-host HOST]... [--allow-private] [--max-input BYTES] [--web DIR]",
    summary:
      "run the conversion service (GET /convert?url=..., POST /info); --web also serves a folder and dist/mod.js",
    options: {
      port: { type: "string", default: "8000" },
      hostname: { type: "string", default: "127.0.0.1" },
      "allow-host": { type: "string", multiple: true },
      "allow-private": { type: "boolean" },
      "max-input": { type: "string" },
      web: { type: "string" },
    },
    async run({ values }) {
      const service = conversionService({
        allowHosts: values["allow-host"] as string[] | undefined,
        allowPrivate: values["allow-private"] === true,
        maxInputBytes: values["max-input"]
          ? parseSize(values["max-input"] as string)
          : undefined,
      });
      const web = values.web as string | undefined;
      const server = Deno.serve({
        port: Number(values.port),
        hostname: values.hostname as string,
        onListen: ({ hostname, port }) =>
          printErr(`listening on http://${hostname}:${port}/\n`),
      }, async (request) => {
        const path = new URL(request.url).pathname;
        if (web && request.method === "GET" && !path.startsWith("/convert")) {
          const file = path === "/dist/mod.js"
            ? new URL("dist/mod.js", import.meta.url).pathname
            : `${web}/${path === "/" ? "index.html" : path.slice(1)}`;
          if (!path.includes("..")) {
            try {
              const body = await Deno.readFile(file);
              const type = file.endsWith(".html")
                ? "text/html"
                : file.endsWith(".js")
                ? "text/javascript"
                : "application/octet-stream";
              return new Response(body, { headers: { "content-type": type } });
            } catch { /* fall through to the service */ }
          }
        }
        return service(request);
      });
      await server.finished;
      return 0;
    },
  },

  formats: {
    usage: "formats",
    summary: "list the formats this toolkit reads and writes",
    options: {},
    run() {
      for (const d of formats()) {
        const can = [
          "read",
          d.create ? "create" : "",
          d.create || d.encode ? "convert -O" : "",
        ]
          .filter(Boolean).join(", ");
        print(`${d.name.padEnd(10)} ${d.description} (${can})\n`);
      }
      return Promise.resolve(0);
    },
  },
};

function need(positionals: string[], count: number, command: string): string[] {
  if (positionals.length !== count) {
    throw new UsageError(
      `${command} takes ${count} argument${
        count > 1 ? "s" : ""
      }, got ${positionals.length}`,
      command,
    );
  }
  return positionals;
}

/** The `info` facts, with qemu-img's JSON keys first. */
async function describe(path: string, file: FileHandle, image: Image) {
  const info = imageInfo(image, path);
  const actual = await file.allocatedBytes();
  // qemu-img's key order: virtual-size, filename, format, actual-size, ...
  const ordered: Record<string, unknown> = {
    "virtual-size": info["virtual-size"],
    filename: info.filename,
    format: info.format,
  };
  if (actual !== undefined) ordered["actual-size"] = actual;
  return { ...ordered, ...info, "dirty-flag": false };
}

function humanInfo(info: Record<string, unknown>): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${humanSize(info["virtual-size"] as number)} (${
      info["virtual-size"]
    } bytes)`,
  ];
  if (info["actual-size"] !== undefined) {
    lines.push(`disk size: ${humanSize(info["actual-size"] as number)}`);
  }
  if (info.encrypted) lines.push("encrypted: yes");
  if (info["backing-filename"] !== undefined) {
    lines.push(`backing file: ${info["backing-filename"]}`);
    if (info["backing-filename-format"]) {
      lines.push(`backing file format: ${info["backing-filename-format"]}`);
    }
  }
  const specific = info["format-specific"] as
    | { data: Record<string, unknown> }
    | undefined;
  if (specific) {
    lines.push("Format specific information:");
    for (const [key, value] of Object.entries(specific.data)) {
      const text = typeof value === "object"
        ? JSON.stringify(value)
        : String(value);
      lines.push(`    ${key}: ${text}`);
    }
  }
  return lines.join("\n") + "\n";
}

/** The first byte offset where two images differ (the shorter one reads as zeros past its end), or undefined. */
async function firstDifference(
  a: Image,
  b: Image,
): Promise<number | undefined> {
  const size = Math.max(a.size, b.size);
  const block = 4 << 20;
  const slice = async (image: Image, offset: number, length: number) => {
    const inside = Math.max(0, Math.min(length, image.size - offset));
    const out = new Uint8Array(length);
    if (inside > 0) {
      let zero = true;
      for await (const run of extentsOf(image, offset, inside)) {
        if (run.kind === "data") zero = false;
      }
      if (!zero) out.set(await image.read(offset, inside));
    }
    return out;
  };
  for (let offset = 0; offset < size; offset += block) {
    const length = Math.min(block, size - offset);
    const [x, y] = await Promise.all([
      slice(a, offset, length),
      slice(b, offset, length),
    ]);
    for (let i = 0; i < length; i++) {
      if (x[i] !== y[i]) return offset + i;
    }
  }
  return undefined;
}

// ---------------------------------------------------------------------------
// Entry point

function help(name?: string): string {
  if (name && commands[name]) {
    return `usage: deno run -A cli.ts ${commands[name].usage}\n\n${
      commands[name].summary
    }\n`;
  }
  const rows = Object.entries(commands).map(([, c]) =>
    `  ${c.usage}\n      ${c.summary}`
  );
  return `usage: deno run -A cli.ts COMMAND [OPTIONS]\n\ncommands:\n${
    rows.join("\n")
  }\n\n` +
    "COMMAND --help shows one command's usage.\n";
}

/** Turns any error into one line a person can act on. */
function errorLine(e: unknown): string {
  if (e instanceof Deno.errors.NotFound) {
    return e.message.replace(
      /^No such file or directory \(os error 2\):? ?/,
      "no such file: ",
    );
  }
  if (e instanceof Deno.errors.PermissionDenied) {
    return `permission denied: ${e.message}`;
  }
  if (e instanceof Deno.errors.IsADirectory) {
    return `is a directory: ${e.message}`;
  }
  if (e instanceof Error) return e.message.split("\n")[0];
  return String(e);
}

/**
 * Runs the CLI with `args` and returns the exit code.
 *
 * @param args the command line after the script name
 * @returns the exit code
 *
 * @example
 * ```ts ignore
 * import { main } from "./cli.ts";
 * Deno.exit(await main(["formats"]));
 * ```
 */
export async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  if (!name || name === "--help" || name === "-h" || name === "help") {
    (name ? print : printErr)(help(rest[0]));
    return name ? 0 : 2;
  }
  const command = commands[name];
  if (!command) {
    printErr(`vdisk: unknown command '${name}' (try --help)\n`);
    return 2;
  }
  if (rest.includes("--help") || rest.includes("-h")) {
    print(help(name));
    return 0;
  }
  const onSignal = () => {
    // Synchronously: Deno.exit does not wait for promises.
    for (const out of pendingOutputs) {
      try {
        Deno.removeSync(out.path);
      } catch { /* already gone */ }
    }
    printErr(`\nvdisk ${name}: interrupted\n`);
    Deno.exit(130);
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  try {
    let call: Invocation;
    try {
      call = parseArgs({
        args: rest,
        options: command.options,
        allowPositionals: true,
        strict: true,
      });
    } catch (e) {
      throw new UsageError((e as Error).message, name);
    }
    return await command.run(call);
  } catch (e) {
    for (const out of pendingOutputs) await out.abort();
    pendingOutputs.clear();
    if (e instanceof UsageError) {
      printErr(
        `vdisk ${name}: ${e.message}\nusage: deno run -A cli.ts ${command.usage}\n`,
      );
      return 2;
    }
    printErr(`vdisk ${name}: ${errorLine(e)}\n`);
    return name === "compare" ? 2 : 1;
  } finally {
    for (const item of opened.reverse()) await item.close?.().catch(() => {});
    opened.length = 0;
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
