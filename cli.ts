/**
 * The command line, with qemu-img's conventions:
 *
 * ```sh
 * deno run -A cli.ts info [-f FMT] [--output=json] IMAGE   # IMAGE may be fat:[12:|16:|32:]DIR or a .sparsebundle folder
 * deno run -A cli.ts convert [-f FMT] [-O FMT] [-o OPTS] [-B BACKING] [-c] [-p] IN OUT
 * deno run -A cli.ts map [--output=json] IMAGE
 * deno run -A cli.ts create -f FMT [-b BACKING -F FMT] [-o OPTS] OUT SIZE
 * deno run -A cli.ts compare A B
 * deno run -A cli.ts commit [-p] IMAGE
 * deno run -A cli.ts write IMAGE OFFSET FILE
 * deno run -A cli.ts resize [--shrink] [-f FMT] IMAGE [+|-]SIZE
 * deno run -A cli.ts rebase [-u] -b BACKING [-F FMT] IMAGE
 * deno run -A cli.ts measure [-O FMT] [-o OPTS] (--size SIZE | IMAGE)
 * deno run -A cli.ts snapshot (-l | -c TAG | -a TAG | -d TAG) IMAGE
 * deno run -A cli.ts amend -o OPTS IMAGE
 * deno run -A cli.ts dd [bs=N] [count=N] [skip=N] if=IN of=OUT
 * deno run -A cli.ts formats
 * ```
 *
 * Backing files are followed (by convert, compare, map, commit, write, and
 * by info with --backing-chain) only inside the image's folder and the
 * folders given with --allow-backing-dir.
 *
 * This is the only module that parses argv and prints. Every failure is one
 * line on stderr: exit 1 for errors, 2 for usage errors (and for `compare`,
 * whose 1 means "different").
 *
 * @module
 */

// The modules a conversion or `info` needs, imported one by one (not
// mod.ts, which imports every driver and codec): the driver of the chosen
// format loads when the registry picks it (drivers/_catalog.ts), and the
// commands that need more import it where they run (README: "Start-up:
// one driver per command"; tests/startup_test.ts checks what loads).
import {
  BackingFileError,
  KeyError,
  UnsupportedError,
} from "./streams/errors.ts";
import { create, open, probe } from "./drivers/_registry.ts";
import { CATALOG, loadDriver } from "./drivers/_catalog.ts";
import {
  createOutputFile,
  directoryTree,
  fileBackingResolver,
  type FileHandle,
  fileResolver,
  fromFile,
  openInFolder,
  type OutputFile,
  scratchFiles,
} from "./streams/file.ts";
import type { ConvertOptions } from "./streams/convert.ts";
import { checkWriteOptions, writeOptionsHelp } from "./streams/options.ts";
import type { OverlayImage } from "./streams/overlay.ts";
import type { PartitionTable } from "./streams/partitions.ts";
import type { NbdConnection, NbdServer } from "./streams/nbd.ts";
import {
  dataFileOf,
  type DataRangeSource,
  type Extent,
  type Image,
  layers,
  mapsFileHoles,
  type OpenOptions,
  piecesOf,
  type Sink,
  type Source,
  type UnpackTarget,
} from "./streams/types.ts";
import config from "./deno.json" with { type: "json" };

/** The partition tables (and their CRC-32), loaded by the commands that read them. */
const partitions = () => import("./streams/partitions.ts");

/** What info, map, compare and the progress bar print, loaded where they print it. */
const inspecting = () => import("./streams/inspect.ts");

/** The convert pipeline, loaded by the commands that write an image (not info). */
const converting = () => import("./streams/convert.ts");

/** A mistake in how the command was called (exit 2). */
class UsageError extends Error {
  constructor(message: string, readonly command?: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** What a subcommand gets: its parsed flags and positionals. */
interface Invocation {
  values: Record<string, string | boolean | string[] | undefined>;
  positionals: string[];
}

/** One flag of a subcommand (the shape of `node:util` parseArgs' options). */
interface Flag {
  type: "string" | "boolean";
  /** One-letter alias (`-f`). */
  short?: string;
  default?: string | boolean;
  /** May be given more than once; the values come as an array. */
  multiple?: boolean;
}

/** One subcommand: how to call it, its flags, and what it does (returns the exit code). */
interface Command {
  usage: string;
  summary: string;
  options: Record<string, Flag>;
  run(call: Invocation): Promise<number>;
}

/**
 * Splits `args` into flags and positionals as `node:util` parseArgs does in
 * strict mode with positionals allowed: `--name value`, `--name=value`,
 * `-f value`, `-fvalue`, grouped booleans (`-cp`), `--` ending the flags,
 * and a lone `-` as a positional (stdout). Written here because importing
 * `node:util` loaded Node's compatibility layer first: 4 ms and 6.6 MB of
 * every command's start-up.
 */
function parseFlags(
  args: string[],
  flags: Record<string, Flag>,
): Invocation {
  const values: Invocation["values"] = {};
  const positionals: string[] = [];
  const set = (name: string, value: string | boolean) => {
    const was = values[name];
    if (flags[name].multiple) {
      ((values[name] ??= []) as (string | boolean)[]).push(value);
    } else if (name === "options" && typeof was === "string") {
      // `-o a=1 -o b=2` is `-o a=1,b=2`, as qemu-img accumulates them.
      values[name] = `${was},${value}`;
    } else if (was !== undefined && was !== value) {
      // Keeping only the last value would silently drop the first.
      throw new UsageError(
        `option '--${name}' given twice (${JSON.stringify(was)} and ${
          JSON.stringify(value)
        }): give it once`,
      );
    } else values[name] = value;
  };
  const shortName = (letter: string) =>
    Object.keys(flags).find((name) => flags[name].short === letter);
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (arg === "--") {
      positionals.push(...args.slice(i + 1));
      break;
    }
    if (arg.startsWith("--")) {
      const eq = arg.indexOf("=");
      const name = arg.slice(2, eq < 0 ? undefined : eq);
      const flag = Object.hasOwn(flags, name) ? flags[name] : undefined;
      if (!flag) throw new UsageError(`unknown option '--${name}'`);
      if (flag.type === "boolean") {
        if (eq >= 0) {
          throw new UsageError(`option '--${name}' does not take a value`);
        }
        set(name, true);
      } else if (eq >= 0) {
        set(name, arg.slice(eq + 1));
      } else if (i + 1 < args.length) {
        set(name, args[++i]);
      } else {
        throw new UsageError(`option '--${name}' needs a value`);
      }
      continue;
    }
    // A negative number is a positional (`resize IMAGE -1G`), as qemu-img takes it.
    if (arg.length < 2 || arg[0] !== "-" || /^-\d/.test(arg)) {
      positionals.push(arg);
      continue;
    }
    // One or more one-letter flags; a string flag takes the rest (or the next argument).
    for (let k = 1; k < arg.length; k++) {
      const name = shortName(arg[k]);
      if (!name) throw new UsageError(`unknown option '-${arg[k]}'`);
      if (flags[name].type === "boolean") {
        set(name, true);
      } else if (k + 1 < arg.length) {
        set(name, arg.slice(k + 1));
        break;
      } else if (i + 1 < args.length) {
        set(name, args[++i]);
      } else {
        throw new UsageError(`option '-${arg[k]}, --${name}' needs a value`);
      }
    }
  }
  for (const [name, flag] of Object.entries(flags)) {
    if (values[name] === undefined && flag.default !== undefined) {
      values[name] = flag.default;
    }
  }
  return { values, positionals };
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

/**
 * `-o help` (or `-o ?`): prints the options `format` takes when written,
 * as qemu-img does, and says so; nothing is created.
 */
async function optionsHelp(format: string, text: unknown): Promise<boolean> {
  if (text !== "help" && text !== "?") return false;
  print(writeOptionsHelp(await loadDriver(format)));
  return true;
}

/**
 * Parses a size as qemu-img does: bytes, or a number with a k, M, G, T, P
 * or E suffix (powers of 1024); `what` names it in errors. An offset
 * (`what` = "offset") may also be hexadecimal with 0x, as qemu-io takes it.
 */
function parseSize(text: string, what = "size"): number {
  const accepted = what === "offset"
    ? "a number of bytes (decimal, or hexadecimal with 0x), optionally with a suffix k, M, G, T, P or E (powers of 1024)"
    : "a number of bytes, optionally with a suffix k, M, G, T, P or E (powers of 1024), as in 512, 64k, 10G";
  const hex = what === "offset" ? /^0[xX]([0-9a-fA-F]+)$/.exec(text) : null;
  const match = hex ? null : /^(\d+(?:\.\d+)?)([bkKmMgGtTpPeE]?)$/.exec(text);
  if (!hex && !match) {
    throw new UsageError(`invalid ${what} '${text}': ${accepted}`);
  }
  const size = hex ? parseInt(hex[1], 16) : Number(match![1]) *
    1024 ** Math.max(0, " kmgtpe".indexOf(match![2].toLowerCase()));
  if (!Number.isSafeInteger(size)) {
    throw new UsageError(
      `invalid ${what} '${text}': ${
        size > Number.MAX_SAFE_INTEGER
          ? "at most 2^53 - 1 bytes (8 PiB)"
          : "a whole number of bytes"
      }`,
    );
  }
  return size;
}

/**
 * The addresses (A and AAAA) of a host name, for the service's check that
 * names do not lead to internal addresses. Asks the DNS servers directly
 * (`/etc/hosts` is not read); nothing found is an empty list, which the
 * service refuses.
 */
async function resolveHost(name: string): Promise<string[]> {
  const signal = AbortSignal.timeout(5000);
  const found = await Promise.allSettled([
    Deno.resolveDns(name, "A", { signal }),
    Deno.resolveDns(name, "AAAA", { signal }),
  ]);
  return found.flatMap((r) => r.status === "fulfilled" ? r.value : []);
}

/**
 * `serve --web DIR`: the file at URL path `path`, when it is a regular file
 * inside DIR (links followed only while they stay inside) and no name on
 * the way starts with a dot; `/` is `index.html`, `/dist/mod.js` the
 * bundle. Undefined otherwise (the service answers, 404 for unknown paths).
 */
async function webFile(
  web: string,
  path: string,
): Promise<Response | undefined> {
  let names: string[];
  try {
    names = decodeURIComponent(path).split("/").filter((n) => n !== "");
  } catch {
    return undefined;
  }
  if (names.some((n) => n.startsWith(".") || /[\\\0]/.test(n))) {
    return undefined;
  }
  const bundle = path === "/dist/mod.js";
  const folder = bundle ? new URL(".", import.meta.url).pathname : web;
  const file = bundle
    ? new URL("dist/mod.js", import.meta.url).pathname
    : `${web}/${names.length ? names.join("/") : "index.html"}`;
  let handle: FileHandle;
  try {
    handle = await openInFolder(file, folder);
  } catch {
    return undefined;
  }
  try {
    if (handle.size > 64 << 20) return undefined;
    const body = new Uint8Array(handle.size);
    body.set(await handle.read(0, handle.size));
    const type = file.endsWith(".html")
      ? "text/html"
      : file.endsWith(".js")
      ? "text/javascript"
      : "application/octet-stream";
    return new Response(body, { headers: { "content-type": type } });
  } finally {
    await handle.close?.();
  }
}

/**
 * The passphrase in `--key-file FILE` (one trailing newline stripped), or
 * undefined. Keys are never taken on the command line, where `ps` shows them.
 * A key file that group or others may read gets a warning on stderr.
 */
async function keyFrom(
  values: Invocation["values"],
): Promise<string | undefined> {
  const path = values["key-file"] as string | undefined;
  if (path === undefined) return undefined;
  const text = await Deno.readTextFile(path);
  const mode = (await Deno.stat(path)).mode;
  if (mode !== null && (mode & 0o077) !== 0) {
    printErr(
      `vdisk: warning: the key file ${path} can be read by others (mode ${
        (mode & 0o777).toString(8)
      }): chmod 600 ${path}\n`,
    );
  }
  return text.replace(/\r?\n$/, "");
}

/**
 * Warns on stderr when `key` is longer than qcow's AES uses: QEMU (and
 * this toolkit, to read the same images) keeps the passphrase's first 16
 * bytes and ignores the rest, so a longer one is weaker than it looks.
 */
function warnLongQcowKey(key: string | undefined, what: string): void {
  if (key === undefined) return;
  const length = encoder.encode(key).length;
  if (length <= 16) return;
  printErr(
    `vdisk: warning: the passphrase is ${length} bytes, and qcow's AES (${what}) uses only its first 16, as QEMU does: the rest adds no secrecy\n`,
  );
}

/** Writes what `open` warned about (a raw format guessed for writing) to stderr. */
function warnAbout(image: Image): void {
  for (const warning of image.warnings ?? []) {
    printErr(`vdisk: warning: ${warning}\n`);
  }
}

/** Options for {@linkcode openImage}. */
interface InputOptions {
  format?: string;
  writable?: boolean;
  /** Follow backing files (convert, compare); info does not unless asked. */
  followBacking?: boolean;
  /** Folders backing files may lie in besides the image's own (`--allow-backing-dir`). */
  allowDirs?: string[];
  /** Extra OpenOptions from subcommand flags (keys, resolvers). */
  extra?: OpenOptions;
  /** Open the first backing file for writing too (commit writes into it). */
  writeBacking?: boolean;
  /**
   * The parents of a differencing vdi (which names them by UUID only),
   * top first (`--parent`); each is checked against the UUID it must have.
   */
  parents?: string[];
  /** Do not refuse `parents` that no layer of this image uses (compare's B). */
  parentsOptional?: boolean;
}

/** The flags of the backing-file policy, for commands that follow backing files. */
const backingFlags = {
  "allow-backing-dir": { type: "string", multiple: true },
  "no-backing": { type: "boolean" },
  parent: { type: "string", multiple: true },
} as const;

/** `followBacking`, `allowDirs` and `parents` from the backing-file flags. */
function backingPolicy(values: Invocation["values"], follow = true) {
  return {
    followBacking: follow && values["no-backing"] !== true,
    allowDirs: values["allow-backing-dir"] as string[] | undefined,
    parents: values.parent as string[] | undefined,
  };
}

/**
 * `--parent FILE`s as the open option `parent` (absolute paths, one per
 * line), and their folders, which the backing-file policy then allows: the
 * user named these files.
 */
async function parentFiles(
  given: string[],
): Promise<{ option: string; folders: string[] }> {
  const paths: string[] = [];
  for (const name of given) {
    const path = await Deno.realPath(name).catch(() => {
      throw new UsageError(`--parent ${name}: no such file`);
    });
    if (path.includes("\n")) {
      throw new UsageError(`--parent ${name}: a name with a line break`);
    }
    paths.push(path);
  }
  return { option: paths.join("\n"), folders: paths.map(folderOf) };
}

/**
 * True when `path` names a sparse bundle: a folder holding an
 * `Info.plist` (whatever its name: Time Machine's are `.backupbundle`),
 * or any folder with `-f sparsebundle`.
 */
async function isSparsebundle(path: string, format?: string) {
  if (format !== undefined && format !== "sparsebundle") return false;
  try {
    if (!(await Deno.stat(path)).isDirectory) return false;
    return format === "sparsebundle" ||
      (await Deno.stat(`${path}/Info.plist`)).isFile;
  } catch {
    return false;
  }
}

/**
 * Opens an image file named on the command line, a sparse bundle folder,
 * a Parallels bundle folder (`NAME.hdd/`) through its DiskDescriptor.xml,
 * or a folder as a vvfat disk when spelled as QEMU does (`fat:DIR`,
 * `fat:16:DIR`) or with `-f vvfat DIR`.
 */
async function openImage(
  given: string,
  options: InputOptions = {},
): Promise<{
  file?: FileHandle;
  image: Image;
  /** The backing files opened, in the order resolved (the handles checked). */
  backing: FileHandle[];
  /** Every host file the image was read from: itself, extents, backing files. */
  files: FileHandle[];
}> {
  // The vvfat driver loads only for a fat: name.
  const fat = given.startsWith("fat:")
    ? (await import("./drivers/vvfat.ts")).parseFatSpelling(given)
    : undefined;
  // A Parallels bundle (NAME.hdd/) is opened through its descriptor.
  const path = !fat && options.format !== "vvfat" &&
      (await Deno.stat(given).catch(() => undefined))?.isDirectory &&
      (await Deno.stat(`${given}/DiskDescriptor.xml`).catch(() => undefined))
        ?.isFile
    ? `${given}/DiskDescriptor.xml`
    : given;
  if (fat || options.format === "vvfat") {
    if (options.writable) throw new Error("vvfat disks are read-only");
    const { openTree } = await import("./drivers/vvfat.ts");
    const image = await openTree(await directoryTree(fat?.dir ?? path), {
      fatType: fat?.fatType,
    });
    opened.push(image);
    return { image, backing: [], files: [] };
  }
  if (await isSparsebundle(path, options.format)) {
    if (options.writable) throw new Error("sparse bundles are read-only here");
    const { openSparsebundle } = await import("./drivers/sparsebundle.ts");
    const image = await openSparsebundle(await directoryTree(path), {
      key: options.extra?.key as string | undefined,
    });
    opened.push(image);
    return { image, backing: [], files: [] };
  }
  const file = await fromFile(path, { write: options.writable === true })
    .catch((e) => {
      if (e instanceof Deno.errors.IsADirectory) {
        throw new Error(
          `${path} is a folder, not an image: to read a folder as a FAT disk, name it fat:${path} (a sparse bundle is a folder holding Info.plist)`,
        );
      }
      throw e;
    });
  opened.push(file);
  const files = [file];
  const backing: FileHandle[] = [];
  const parents = options.parents?.length
    ? await parentFiles(options.parents)
    : undefined;
  const policy = options.followBacking
    ? fileBackingResolver(path, {
      allowDir: [...options.allowDirs ?? [], ...parents?.folders ?? []],
      writeFirst: options.writeBacking,
    })
    : undefined;
  const extents = fileResolver(path);
  const image = await open(file, {
    ...options.extra,
    ...(parents
      ? { options: { ...options.extra?.options, parent: parents.option } }
      : {}),
    format: options.format,
    writable: options.writable,
    sink: options.writable ? file : undefined,
    // Compressed inputs decode to a temporary file ($TMPDIR), not memory.
    scratch: scratchFiles(),
    resolveBacking: policy &&
      (async (name, layer) => {
        const found = await policy(name, layer) as FileHandle;
        opened.push(found);
        files.push(found);
        backing.push(found);
        return found;
      }),
    // The extent files of a vmdk descriptor, beside whichever image names them.
    resolveFile: async (name, namedBy) => {
      const found = await extents(name, namedBy);
      opened.push(found);
      files.push(found);
      return found;
    },
  });
  opened.push(image);
  warnAbout(image);
  if (
    parents && !options.parentsOptional &&
    !layers(image).some((l) => l.backingFile === parents.option.split("\n")[0])
  ) {
    throw new Error(
      `--parent: ${path} is not a differencing vdi (no layer of it links a parent by UUID alone), so it takes no --parent`,
    );
  }
  if (layers(image).some((l) => l.encrypted && l.format === "qcow")) {
    warnLongQcowKey(options.extra?.key as string | undefined, "of the input");
  }
  return { file, image, backing, files };
}

/**
 * Refuses an output path that is one of the input's files (`files`): the
 * input itself under any name (the same path, a hard link, a symbolic
 * link to it), one of its backing files or vmdk extent files. Converting
 * there would replace what is being read.
 */
async function refuseInputAsOutput(
  output: string,
  input: string,
  files: FileHandle[],
): Promise<void> {
  let target: Deno.FileInfo;
  try {
    target = await Deno.stat(output);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return;
    throw e;
  }
  for (const [i, file] of files.entries()) {
    const stat = await file.stat();
    if (stat.dev === target.dev && stat.ino === target.ino) {
      throw new Error(
        i === 0
          ? `the output ${output} is the input ${input} (the same file): refused`
          : `the output ${output} is ${file.path}, a file the input ${input} reads (a backing or extent file): refused`,
      );
    }
  }
}

/** A sink for an output path: `-` is stdout, anything else a temporary file renamed on success. */
async function openOutput(
  path: string,
): Promise<Sink & { commit?(): Promise<void>; abort?(): Promise<void> }> {
  if (path === "-") {
    // The stream sink loads only for stdout (with the sources it imports).
    const { streamSink } = await import("./streams/sinks.ts");
    return streamSink(Deno.stdout.writable, "stdout");
  }
  const out = await createOutputFile(path);
  pendingOutputs.add(out);
  return out;
}

/**
 * The files an output at `path` names as part of itself (qcow2's
 * `data_file`): made beside it (a relative name is taken from the
 * output's folder, as the reader opens it), committed after it.
 */
function companionFiles(path: string) {
  const made: (Sink & { commit?(): Promise<void> })[] = [];
  return {
    createFile: async (name: string): Promise<Sink> => {
      const slash = path.lastIndexOf("/");
      const full = name.startsWith("/") || slash < 0
        ? name
        : `${path.slice(0, slash)}/${name}`;
      const out = await openOutput(full);
      made.push(out);
      return out;
    },
    finish: async () => {
      for (const out of made) await finishOutput(out);
    },
  };
}

/** What `write` copies from: a length known up front, read in order. */
interface FittingInput {
  readonly length: number;
  /** Fills `into` from the start (short only at the end); returns the count. */
  read(into: Uint8Array): Promise<number>;
  close(): Promise<void>;
}

/**
 * Opens `write`'s FILE (`-` is stdin) and makes sure all of it fits in
 * `room` bytes before anything is written. A regular file's size is
 * known; a pipe, FIFO or device is read to its end first (into memory up
 * to 4 MiB, then into a temporary file, removed after), and more than
 * `room` bytes are refused without writing any.
 */
async function fittingInput(
  input: string,
  room: number,
  tooBig: (length: string) => Error,
): Promise<FittingInput> {
  type Reader = { read(into: Uint8Array): Promise<number | null> };
  const fill = async (from: Reader, into: Uint8Array) => {
    let filled = 0;
    while (filled < into.length) {
      const n = await from.read(into.subarray(filled));
      if (n === null) break;
      filled += n;
    }
    return filled;
  };
  let file: Deno.FsFile | undefined;
  let from: Reader = Deno.stdin;
  if (input !== "-") {
    file = await Deno.open(input);
    from = file;
    const stat = await file.stat();
    if (stat.isFile) {
      if (stat.size > room) {
        file.close();
        throw tooBig(String(stat.size));
      }
      const opened = file;
      return {
        length: stat.size,
        read: (into) => fill(opened, into),
        close: () => Promise.resolve(opened.close()),
      };
    }
  }
  // A pipe, FIFO or device: read to its end before writing anything.
  let spool: string | undefined;
  let out: Deno.FsFile | undefined;
  try {
    // One byte more than fits tells that it does not.
    const head = new Uint8Array(Math.min(room + 1, 4 << 20));
    const length = await fill(from, head);
    if (length < head.length) {
      let at = 0;
      return {
        length,
        read(into) {
          const n = Math.min(into.length, length - at);
          into.set(head.subarray(at, at + n));
          at += n;
          return Promise.resolve(n);
        },
        close: () => Promise.resolve(),
      };
    }
    if (length > room) throw tooBig(`more than ${room}`);
    spool = await Deno.makeTempFile({ prefix: "vdisk-write-" });
    out = await Deno.open(spool, { read: true, write: true });
    let total = 0;
    for (let n = length; n > 0; n = await fill(from, head)) {
      total += n;
      if (total > room) throw tooBig(`more than ${room}`);
      let written = 0;
      while (written < n) written += await out.write(head.subarray(written, n));
    }
    await out.seek(0, Deno.SeekMode.Start);
    const spooled = out, name = spool;
    out = spool = undefined;
    return {
      length: total,
      read: (into) => fill(spooled, into),
      close: async () => {
        spooled.close();
        await Deno.remove(name).catch(() => {});
      },
    };
  } finally {
    file?.close();
    out?.close();
    if (spool !== undefined) await Deno.remove(spool).catch(() => {});
  }
}

/** A sink nothing is written to (convert -n writes through its target). */
const nullSink: Sink = {
  write: () => Promise.reject(new Error("nothing is written here")),
  flush: () => Promise.resolve(),
  close: () => Promise.resolve(),
};

/**
 * The raw output at `path` a compressed input may be decoded straight
 * into (see UnpackTarget), made only once that starts; `file` is it.
 */
function unpackTarget(
  path: string,
  sparseSize: number | undefined,
): UnpackTarget & { file?: OutputFile } {
  const target: UnpackTarget & { file?: OutputFile } = {
    sparseSize,
    async open() {
      const out = await createOutputFile(path);
      pendingOutputs.add(out);
      target.file = out;
      return out;
    },
  };
  return target;
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

/** A progress bar on stderr: bytes, percent, rate, ETA. */
async function progressBar(label: string, json = false) {
  const started = performance.now();
  let last = 0;
  let shown = false;
  const tty = Deno.stderr.isTerminal();
  // A bar is for a person at a terminal: piped or redirected stderr gets
  // nothing (a log would fill with redraws); --progress=json is for programs.
  if (!json && !tty) return { update() {}, end() {} };
  const { humanSize } = await inspecting();
  const columns = () => {
    try {
      return Deno.consoleSize().columns || 80;
    } catch {
      return 80;
    }
  };
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
      if (json) {
        printErr(
          JSON.stringify({
            command: label,
            done,
            total,
            percent: Math.round(fraction * 1000) / 10,
            "bytes-per-second": Math.round(rate),
            "eta-seconds": Math.round(eta),
          }) + "\n",
        );
        return;
      }
      const clock = (s: number) =>
        `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`;
      const percent = `${(fraction * 100).toFixed(1).padStart(5)}%`;
      // The most that fits in one line less a column (a full line wraps on
      // some terminals): the bar shrinks first, then rate and ETA go.
      const room = columns() - 1;
      const parts = [
        ` ${humanSize(done)} / ${humanSize(total)}`,
        `  ${humanSize(rate)}/s`,
        `  ETA ${clock(eta)}`,
      ];
      let text = "";
      for (let keep = parts.length; keep >= 0; keep--) {
        const tail = ` ${percent}${parts.slice(0, keep).join("")}`;
        const width = Math.min(30, room - label.length - 3 - tail.length);
        if (width >= 10 || keep === 0) {
          const w = Math.max(0, width);
          const filled = Math.round(fraction * w);
          text = `${label} [${"#".repeat(filled)}${
            " ".repeat(w - filled)
          }]${tail}`
            .slice(0, room);
          break;
        }
      }
      // Back to the line's start, the line, then clear what a longer one left.
      printErr(`\r${text}\x1b[K`);
    },
    end() {
      if (shown && !json) printErr("\n");
    },
  };
}

/**
 * `-p` and `--progress=json` as one flag: the JSON spelling becomes the
 * hidden boolean `--progress-json` before parsing.
 */
function progressSpelling(args: string[]): string[] {
  return args.map((a) => a === "--progress=json" ? "--progress-json" : a);
}

// ---------------------------------------------------------------------------
// serve --nbd: the listening part of the NBD export (the protocol is
// streams/nbd.ts)

/** `--port`, or `fallback`; 0 asks the system for a free port. */
function portOf(values: Invocation["values"], fallback: number): number {
  const text = values.port as string | undefined;
  if (text === undefined) return fallback;
  if (!/^\d{1,5}$/.test(text) || Number(text) > 65535) {
    throw new UsageError(`--port must be 0 to 65535, not '${text}'`, "serve");
  }
  return Number(text);
}

/** Set while a command stops by itself on SIGINT/SIGTERM (serve --nbd). */
let onInterrupt: (() => void) | undefined;

/**
 * `serve --nbd IMAGE`: opens IMAGE as `convert` does (backing chain, key
 * file), exports it read-only, or through an in-memory snapshot with
 * `--snapshot`, and serves NBD clients until SIGINT or SIGTERM.
 */
async function serveNbd(
  values: Invocation["values"],
  positionals: string[],
): Promise<number> {
  const [path] = need(positionals, 1, "serve");
  if (values.web !== undefined) {
    throw new UsageError("--web is for the HTTP service, not --nbd", "serve");
  }
  const concurrent = values["max-concurrent"] as string | undefined;
  if (concurrent !== undefined && !/^[1-9]\d{0,3}$/.test(concurrent)) {
    throw new UsageError(
      `--max-concurrent must be a whole number from 1 to 9999, not '${concurrent}'`,
      "serve",
    );
  }
  const wantedPort = portOf(values, 10809);
  const { image } = await openImage(path, {
    format: values.format as string | undefined,
    ...backingPolicy(values),
    extra: { key: await keyFrom(values) },
  });
  const writable = values.snapshot === true;
  const exported = writable
    ? (await import("./streams/snapshot.ts")).snapshot(image)
    : image;
  const { nbdServer } = await import("./streams/nbd.ts");
  const server = nbdServer(exported, {
    requireTls: values["tls-creds"] !== undefined,
    name: path.split("/").filter(Boolean).pop() ?? "",
    description: `${path} (${image.format})`,
    writable,
    maxClients: concurrent === undefined ? undefined : Number(concurrent),
    onEvent: (line) => printErr(`vdisk serve: ${line}\n`),
  });
  const hostname = values.hostname as string;
  const tlsDir = values["tls-creds"] as string | undefined;
  if (tlsDir !== undefined) {
    const what = `${path} (${image.format}, ${image.size} bytes, ${
      writable ? "writes kept in memory" : "read-only"
    })`;
    return await serveNbdTls(server, tlsDir, hostname, wantedPort, what);
  }
  const listener = Deno.listen({ hostname, port: wantedPort });
  const { port } = listener.addr as Deno.NetAddr;
  printErr(
    `serving ${path} (${image.format}, ${image.size} bytes, ${
      writable ? "writes kept in memory" : "read-only"
    }) over NBD on nbd://${hostname}:${port}/\n`,
  );
  let interrupted = false;
  onInterrupt = () => {
    if (interrupted) Deno.exit(130);
    interrupted = true;
    listener.close();
  };
  try {
    for await (const conn of listener) {
      conn.setNoDelay(true);
      server.serve(conn);
    }
  } catch (e) {
    if (!interrupted) throw e;
  } finally {
    onInterrupt = undefined;
    await server.close();
  }
  printErr("vdisk serve: stopped\n");
  return 0;
}

/** What serveNbdTls needs of node:net and node:tls sockets. */
interface NodeSocket {
  on(event: string, listener: (...args: never[]) => void): unknown;
  removeListener(event: string, listener: (...args: never[]) => void): unknown;
  write(bytes: Uint8Array, done: (error?: Error | null) => void): boolean;
  end(done: () => void): unknown;
  destroy(): unknown;
  pause(): unknown;
  resume(): unknown;
}

/**
 * A node socket as the two byte streams nbdServer speaks over. `upgrade`
 * (for the plain socket) hands it to TLS: its listeners come off first so
 * that the TLS layer alone reads it.
 */
function socketConnection(
  socket: NodeSocket,
  upgrade?: () => Promise<NodeSocket>,
): NbdConnection {
  const listeners: [string, (...args: never[]) => void][] = [];
  const readable = new ReadableStream<Uint8Array>({
    start(controller) {
      const onData = (chunk: Uint8Array) => {
        controller.enqueue(new Uint8Array(chunk));
        // Backpressure: stop reading the socket while the queue is full.
        if ((controller.desiredSize ?? 1) <= 0) socket.pause();
      };
      const onEnd = () => {
        try {
          controller.close();
        } catch { /* already closed */ }
      };
      const onError = (e: Error) => {
        try {
          controller.error(e);
        } catch { /* already closed */ }
      };
      listeners.push(["data", onData], ["end", onEnd], ["error", onError]);
      for (const [event, fn] of listeners) socket.on(event, fn);
    },
    pull() {
      socket.resume();
    },
    cancel() {
      socket.destroy();
    },
  }, { highWaterMark: 8 });
  const writable = new WritableStream<Uint8Array>({
    write: (chunk) =>
      new Promise((resolve, reject) => {
        socket.write(chunk, (e) => e ? reject(e) : resolve());
      }),
    close: () => new Promise((resolve) => socket.end(resolve)),
    abort: () => {
      socket.destroy();
    },
  });
  return {
    readable,
    writable,
    close: () => socket.destroy(),
    startTls: upgrade &&
      (async () => {
        for (const [event, fn] of listeners) socket.removeListener(event, fn);
        return socketConnection(await upgrade());
      }),
  };
}

/**
 * `serve --nbd --tls-creds DIR`: NBD over TLS (STARTTLS, required), with
 * DIR laid out as QEMU's tls-creds-x509 (`server-cert.pem`,
 * `server-key.pem`). Deno's own API has no server-side STARTTLS, so the
 * listener is node:net and each upgrade hands the accepted socket to a
 * node:tls server ("connection" event), which takes the handshake.
 */
async function serveNbdTls(
  server: NbdServer,
  dir: string,
  hostname: string,
  wantedPort: number,
  what: string,
): Promise<number> {
  const net = await import("node:net");
  const tls = await import("node:tls");
  let cert: string;
  let key: string;
  try {
    cert = await Deno.readTextFile(`${dir}/server-cert.pem`);
    key = await Deno.readTextFile(`${dir}/server-key.pem`);
  } catch (e) {
    throw new Error(
      `--tls-creds ${dir}: needs server-cert.pem and server-key.pem there (${
        (e as Error).message
      })`,
    );
  }
  // Fails here on a bad certificate or key, before listening. (Deno's
  // createServer takes key and cert: a secureContext option is ignored.)
  tls.createSecureContext({ cert, key });
  const upgrade = (socket: NodeSocket) =>
    new Promise<NodeSocket>((resolve, reject) => {
      const one = tls.createServer({ cert, key });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error("no TLS handshake within 30 s"));
      }, 30000);
      one.once("secureConnection", (secured) => {
        clearTimeout(timer);
        resolve(secured as unknown as NodeSocket);
      });
      one.once("tlsClientError", (e) => {
        clearTimeout(timer);
        reject(e);
      });
      one.emit("connection", socket);
    });
  const listener = net.createServer((socket) => {
    socket.setNoDelay(true);
    const plain = socket as unknown as NodeSocket;
    server.serve(socketConnection(plain, () => upgrade(plain)));
  });
  const port = await new Promise<number>((resolve, reject) => {
    listener.once("error", reject);
    listener.listen(wantedPort, hostname, () => {
      resolve((listener.address() as { port: number }).port);
    });
  });
  printErr(
    `serving ${what} over NBD on nbd://${hostname}:${port}/ with TLS (STARTTLS required)\n`,
  );
  const stopped = new Promise<void>((resolve) => {
    let interrupted = false;
    onInterrupt = () => {
      if (interrupted) Deno.exit(130);
      interrupted = true;
      listener.close();
      resolve();
    };
  });
  try {
    await stopped;
  } finally {
    onInterrupt = undefined;
    await server.close();
  }
  printErr("vdisk serve: stopped\n");
  return 0;
}

// ---------------------------------------------------------------------------
// The subcommands

const commands: Record<string, Command> = {
  info: {
    usage:
      "info [-f FMT] [--output=human|json] [--backing-chain [--allow-backing-dir DIR]...] [--parent FILE]... IMAGE",
    summary:
      "show what an image is: format, sizes, backing file, details (--backing-chain: every layer)",
    options: {
      format: { type: "string", short: "f" },
      output: { type: "string", default: "human" },
      "backing-chain": { type: "boolean" },
      "allow-backing-dir": backingFlags["allow-backing-dir"],
      parent: backingFlags.parent,
      "key-file": { type: "string" },
    },
    async run({ values, positionals }) {
      const [path] = need(positionals, 1, "info");
      const chain = values["backing-chain"] === true;
      const { file, image } = await openImage(path, {
        format: values.format as string | undefined,
        // A named parent is opened, to check it is the one linked.
        ...backingPolicy(values, chain || values.parent !== undefined),
        extra: { key: await keyFrom(values) },
      }).catch(async (e) => {
        // A format only recognised: say what the file is, then fail.
        const known = e instanceof UnsupportedError &&
          CATALOG.find((d) => d.name === e.format);
        if (known && known.recognisedOnly) {
          const { description } = await known.load();
          const info = {
            filename: path,
            format: known.name,
            "recognised-only": true,
            error: e.message,
          };
          print(
            values.output === "json"
              ? JSON.stringify(info, null, 4) + "\n"
              : `image: ${path}\nfile format: ${known.name} (recognised only: ${description}, not read by this toolkit)\n`,
          );
        }
        throw e;
      });
      if (chain) {
        const infos = [];
        for (const [i, layer] of layers(image).entries()) {
          infos.push(await describeLayer(i === 0 ? path : layer.name, layer));
        }
        if (values.output === "json") {
          print(JSON.stringify(infos, null, 4) + "\n");
        } else {
          print(infos.map((await inspecting()).formatInfo).join("\n"));
        }
        return 0;
      }
      const info = await describe(path, file, image, true);
      if (values.output === "json") {
        print(JSON.stringify(info, null, 4) + "\n");
      } else {
        print((await inspecting()).formatInfo(info));
      }
      return 0;
    },
  },

  convert: {
    usage:
      "convert [-f FMT] [-O FMT] [-o OPTS] [-B BACKING [-F FMT]] [-c] [-n [--target-is-zero]] [-S SIZE] [--salvage] [-p | --progress=json] [-l SNAPSHOT] [--hash] [--boot-sector FILE] [--partition N|NAME] [--key-file F] [--no-verify] [--allow-backing-dir DIR]... [--no-backing] [--parent FILE]... IN OUT   (OUT '-' is stdout)",
    summary:
      "convert an image (with its backing chain) to another format (raw by default)",
    options: {
      format: { type: "string", short: "f" },
      "output-format": { type: "string", short: "O", default: "raw" },
      options: { type: "string", short: "o" },
      backing: { type: "string", short: "B" },
      "backing-format": { type: "string", short: "F" },
      compress: { type: "boolean", short: "c" },
      progress: { type: "boolean", short: "p" },
      "progress-json": { type: "boolean" },
      hash: { type: "boolean" },
      "boot-sector": { type: "string" },
      partition: { type: "string" },
      ...backingFlags,
      "key-file": { type: "string" },
      // Skips the input's checksum checks (dmg verifies its CRC-32s by default).
      "no-verify": { type: "boolean" },
      // An internal snapshot of the input (qcow2), by ID or name.
      snapshot: { type: "string", short: "l" },
      "skip-create": { type: "boolean", short: "n" },
      "target-is-zero": { type: "boolean" },
      "sparse-size": { type: "string", short: "S" },
      salvage: { type: "boolean" },
    },
    async run({ values, positionals }) {
      const outFormat = values["output-format"] as string;
      // An unknown format or option fails before any file is made.
      if (await optionsHelp(outFormat, values.options)) return 0;
      const [input, output] = need(positionals, 2, "convert");
      const skipCreate = values["skip-create"] === true;
      if (values["target-is-zero"] && !skipCreate) {
        throw new Error("--target-is-zero requires use of -n flag");
      }
      if (skipCreate && output === "-") {
        throw new UsageError(
          "-n needs an existing image, not stdout",
          "convert",
        );
      }
      const sparseText = values["sparse-size"] as string | undefined;
      const sparseSize = sparseText === undefined
        ? undefined
        : parseSize(sparseText, "buffer size for sparse output");
      if (
        sparseSize !== undefined &&
        (sparseSize % 512 !== 0 || sparseSize > 16 << 20)
      ) {
        throw new Error(
          `Invalid buffer size for sparse output specified (${sparseText}). Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).`,
        );
      }
      const key = await keyFrom(values);
      const outOptions = parseOptions(values.options as string | undefined);
      checkWriteOptions(
        await loadDriver(outFormat),
        outOptions,
        values.compress === true,
      );
      const bootSector = values["boot-sector"] === undefined
        ? undefined
        : await Deno.readFile(values["boot-sector"] as string);
      if (bootSector && bootSector.length > 512) {
        throw new UsageError(
          `--boot-sector ${
            values["boot-sector"]
          } is ${bootSector.length} bytes: at most 512 fit in sector 0`,
          "convert",
        );
      }
      // A compressed input decoded into scratch first gets a bar of its own.
      const unpacking = values.progress
        ? await progressBar("decompress")
        : undefined;
      // A compressed file (a single zstd frame, gzip, bzip2, a single-block
      // xz) whose image inside is raw, converted to a raw file as it is: it
      // is decoded straight into the output, in one pass, when opened.
      const unpackTo = output !== "-" && outFormat === "raw" && !skipCreate &&
          values.format === undefined && !Object.keys(outOptions).length &&
          !values.compress && values.backing === undefined &&
          values.partition === undefined && !bootSector &&
          values.snapshot === undefined && !values.salvage && !values.hash &&
          !values["progress-json"] &&
          (sparseSize === undefined || sparseSize === 0 ||
            (1 << 16) % sparseSize === 0)
        ? unpackTarget(output, sparseSize)
        : undefined;
      const { image: source, files } = await openImage(input, {
        format: values.format as string | undefined,
        ...backingPolicy(values),
        // With -B, --parent may name the parents of -B's file instead.
        parentsOptional: values.backing !== undefined,
        extra: {
          key,
          options: {
            ...(values["no-verify"] ? { verify: "off" } : {}),
            ...(values.snapshot === undefined
              ? {}
              : { snapshot: values.snapshot as string }),
          },
          onDecodeProgress: unpacking &&
            ((done, total) => unpacking.update(done, total)),
          unpackTo,
        },
      });
      unpacking?.end();
      if (unpackTo?.outcome === "raw") {
        // The output holds the disk whole: put it in place.
        await refuseInputAsOutput(output, input, files);
        await finishOutput(unpackTo.file!);
        return 0;
      }
      if (values.snapshot !== undefined && !source.details?.snapshot) {
        throw new UsageError(
          `-l ${values.snapshot}: ${source.format} images have no internal snapshots to read`,
          "convert",
        );
      }
      // -B: the output records BACKING (named as from the output's folder)
      // and stores only what differs from it.
      const backingName = values.backing as string | undefined;
      let backingImage: Image | undefined;
      if (backingName !== undefined) {
        const slash = output.lastIndexOf("/");
        const backingPath = backingName.startsWith("/") || slash < 0
          ? backingName
          : `${output.slice(0, slash)}/${backingName}`;
        const opened = await openImage(backingPath, {
          format: values["backing-format"] as string | undefined,
          ...backingPolicy(values),
          parentsOptional: true,
          extra: { key },
        });
        backingImage = opened.image;
        files.push(...opened.files);
      } else if (values["backing-format"] !== undefined) {
        throw new UsageError("-F names the format of -B's file", "convert");
      }
      if (output !== "-") await refuseInputAsOutput(output, input, files);
      const which = values.partition as string | undefined;
      const part = which === undefined
        ? source
        : await (await partitions()).partition(source, which);
      const image = bootSector
        ? (await import("./streams/boot_sector.ts")).bootSectorPatch(
          part,
          bootSector,
        )
        : part;
      const encryptOutput = outOptions.encryption === "on" ||
        outOptions["encrypt.format"] !== undefined;
      if (encryptOutput && outFormat === "qcow") {
        warnLongQcowKey(key, "of the output");
      }
      // -n: the output exists and is written in place, through -O's format.
      const target = skipCreate
        ? (await openImage(output, { format: outFormat, writable: true }))
          .image
        : undefined;
      const sink = target ? undefined : await openOutput(output);
      const companions = companionFiles(output);
      const bar = values.progress || values["progress-json"]
        ? await progressBar("convert", values["progress-json"] === true)
        : undefined;
      const options: ConvertOptions = {
        target,
        targetIsZero: values["target-is-zero"] === true,
        sparseSize,
        salvage: values.salvage === true,
        format: outFormat,
        options: outOptions,
        compress: values.compress === true,
        // The passphrase encrypts the output only when -o asks for it.
        key: encryptOutput ? key : undefined,
        backingFile: backingName,
        backingFormat: backingImage && (values["backing-format"] as string ??
          backingImage.format),
        backing: backingImage,
        hash: values.hash === true,
        onProgress: bar ? (done, total) => bar.update(done, total) : undefined,
        createFile: companions.createFile,
      };
      const { convert } = await converting();
      const result = await convert(image, sink ?? nullSink, options);
      bar?.end();
      if (sink) await finishOutput(sink);
      await companions.finish();
      if (unpackTo?.file) {
        // The image was found not to be raw only at its end: the first
        // output held its decoded bytes, read for the convert just done.
        pendingOutputs.delete(unpackTo.file);
        await unpackTo.file.abort();
      }
      for (const warning of result.warnings ?? []) {
        printErr(`vdisk: warning: ${warning}\n`);
      }
      if (result.sha256) printErr(`sha256 ${result.sha256}\n`);
      // --salvage: what could not be read, and exit 3 when anything was.
      for (const run of result.salvaged ?? []) {
        printErr(
          `vdisk convert: salvaged: bytes ${run.offset}..${
            run.offset + run.length
          } (${run.length} bytes) could not be read and were written as zeros: ${run.cause}\n`,
        );
      }
      return result.salvaged?.length ? 3 : 0;
    },
  },

  map: {
    usage:
      "map [-f FMT] [--output=human|json] [--partitions] [--allow-backing-dir DIR]... [--no-backing] [--parent FILE]... [--key-file F] IMAGE",
    summary:
      "show the allocation map of the backing chain: which layer holds each run, which read as zeros",
    options: {
      format: { type: "string", short: "f" },
      output: { type: "string", default: "human" },
      partitions: { type: "boolean" },
      ...backingFlags,
      "key-file": { type: "string" },
    },
    async run({ values, positionals }) {
      const [path] = need(positionals, 1, "map");
      const { image } = await openImage(path, {
        format: values.format as string | undefined,
        ...backingPolicy(values),
        extra: { key: await keyFrom(values) },
      });
      const json = values.output === "json";
      const table = values.partitions
        ? await (await partitions()).readPartitionTable(image)
        : undefined;
      const labels = values.partitions ? partitionLabeller(table) : undefined;
      const lines: string[] = [];
      if (!json) {
        print(
          `${"Offset".padEnd(16)}${"Length".padEnd(16)}${
            "Mapped to".padEnd(16)
          }${labels ? "Partition".padEnd(11) : ""}File\n`,
        );
      }
      const walk = (await inspecting()).mapChain(image);
      for await (
        const { run, inHole } of overFileHoles(
          labels ? labels.split(walk) : walk,
        )
      ) {
        const label = labels?.at(run.offset);
        const data = run.kind === "data";
        // Where the run's bytes lie in its file: the driver says, for a raw
        // file it is the offset itself (none for a raw disk decoded from a
        // compressed file).
        const at = run.fileOffset ??
          (run.layer.format === "raw" && run.kind !== "unallocated" &&
              run.layer.details?.file_compression === undefined
            ? run.offset
            : undefined);
        if (json) {
          // Keys and order as qemu-img's; `offset` (the host file offset)
          // where the bytes lie in the file as they read.
          const entry: Record<string, unknown> = {
            start: run.offset,
            length: run.length,
            depth: run.depth,
            present: run.kind !== "unallocated",
            zero: !data || inHole,
            data,
          };
          if (at !== undefined) entry.offset = at;
          if (label !== undefined) entry.partition = label;
          lines.push(
            "{ " + Object.entries(entry).map(([k, v]) =>
              `"${k}": ${v}`
            ).join(", ") + "}",
          );
        } else if (data) {
          const hex = (n: number) => `0x${n.toString(16)}`.padEnd(16);
          print(
            `${hex(run.offset)}${hex(run.length)}${
              at !== undefined ? hex(at) : "-".padEnd(16)
            }${labels ? String(label ?? "-").padEnd(11) : ""}${
              // A flat vmdk's bytes lie in its extent file, not in the
              // descriptor: that file's name, as qemu-img says.
              (run.layer.format === "vmdk" && at !== undefined
                ? dataFileOf(run.layer)?.name
                : undefined) ?? (run.depth === 0 ? path : run.layer.name)}\n`,
          );
        }
      }
      if (json) print(`[${lines.join(",\n")}]\n`);
      return 0;
    },
  },

  create: {
    usage:
      "create -f FMT [-b BACKING -F FMT] [-o OPTS] [--key-file F] OUT SIZE",
    summary: "create an empty image",
    options: {
      format: { type: "string", short: "f" },
      backing: { type: "string", short: "b" },
      "backing-format": { type: "string", short: "F" },
      options: { type: "string", short: "o" },
      "key-file": { type: "string" },
    },
    async run({ values, positionals }) {
      const format = values.format as string | undefined;
      if (!format) throw new UsageError("create needs -f FORMAT", "create");
      if (await optionsHelp(format, values.options)) return 0;
      const [path, sizeText] = need(positionals, 2, "create");
      const size = parseSize(sizeText);
      const options = parseOptions(values.options as string | undefined);
      const formatDriver = await loadDriver(format);
      checkWriteOptions(formatDriver, options);
      const backingFile = values.backing as string | undefined;
      if (format === "cow" && backingFile !== undefined && !options.mtime) {
        // UML refuses a COW file whose mtime is not its backing file's.
        const slash = path.lastIndexOf("/");
        const where = backingFile.startsWith("/") || slash < 0
          ? backingFile
          : `${path.slice(0, slash)}/${backingFile}`;
        const mtime = (await Deno.stat(where)).mtime;
        if (mtime) options.mtime = String(Math.floor(mtime.getTime() / 1000));
      }
      const key = await keyFrom(values);
      if (format === "qcow") warnLongQcowKey(key, "of the new image");
      // A format that links its parent by identity reads it from the
      // parent itself (named, as qemu-img does, from the new image's folder).
      const backing = backingFile !== undefined &&
          formatDriver.createNeedsBacking
        ? (await openImage(
          backingFile.startsWith("/")
            ? backingFile
            : `${folderOf(path)}/${backingFile}`,
          {
            format: values["backing-format"] as string | undefined,
            followBacking: true,
            extra: { key },
          },
        )).image
        : undefined;
      const sink = await openOutput(path);
      const companions = companionFiles(path);
      const image = await create(format, sink, {
        size,
        backing,
        backingFile,
        backingFormat: values["backing-format"] as string | undefined,
        key,
        options,
        createFile: companions.createFile,
      });
      await image.flush?.();
      await finishOutput(sink);
      warnAbout(image);
      await companions.finish();
      print(`Formatting '${path}', fmt=${format} size=${size}\n`);
      return 0;
    },
  },

  compare: {
    usage:
      "compare [-f FMT] [-F FMT] [-s] [--partition N|NAME] [--partition-b N|NAME] [--allow-backing-dir DIR]... [--no-backing] [--parent FILE]... [--key-file F] A B",
    summary:
      "compare two images' contents, backing chains included (exit 0 same, 1 different, 2 error)",
    options: {
      "a-format": { type: "string", short: "f" },
      "b-format": { type: "string", short: "F" },
      strict: { type: "boolean", short: "s" },
      partition: { type: "string" },
      "partition-b": { type: "string" },
      ...backingFlags,
      "key-file": { type: "string" },
    },
    async run({ values, positionals }) {
      const [pathA, pathB] = need(positionals, 2, "compare");
      const key = await keyFrom(values);
      // --parent: the parents of whichever of A and B is a differencing vdi.
      const wholeA = (await openImage(pathA, {
        format: values["a-format"] as string | undefined,
        ...backingPolicy(values),
        parentsOptional: true,
        extra: { key },
      })).image;
      const wholeB = (await openImage(pathB, {
        format: values["b-format"] as string | undefined,
        ...backingPolicy(values),
        parentsOptional: true,
        extra: { key },
      })).image;
      // --partition: one partition of A (--partition-b: of B) is compared.
      const a = values.partition === undefined
        ? wholeA
        : await (await partitions()).partition(
          wholeA,
          values.partition as string,
        );
      const b = values["partition-b"] === undefined
        ? wholeB
        : await (await partitions()).partition(
          wholeB,
          values["partition-b"] as string,
        );
      if (values.strict && a.size !== b.size) {
        print(`Strict mode: Image size mismatch!\n`);
        return 1;
      }
      const mismatch = await (await inspecting()).firstDifference(a, b);
      if (mismatch === undefined) {
        if (a.size !== b.size) print("Warning: Image size mismatch!\n");
        print("Images are identical.\n");
        return 0;
      }
      print(`Content mismatch at offset ${mismatch}!\n`);
      return 1;
    },
  },

  commit: {
    usage:
      "commit [-f FMT] [-p | --progress=json] [--allow-backing-dir DIR]... [--parent FILE]... IMAGE",
    summary:
      "copy what IMAGE holds into its backing file (IMAGE is only read and is kept as it is)",
    options: {
      format: { type: "string", short: "f" },
      progress: { type: "boolean", short: "p" },
      "progress-json": { type: "boolean" },
      "allow-backing-dir": backingFlags["allow-backing-dir"],
      parent: backingFlags.parent,
    },
    async run({ values, positionals }) {
      const [path] = need(positionals, 1, "commit");
      const policy = backingPolicy(values);
      // The whole chain first, read-only through the formats: the policy,
      // loops and depth are checked before anything is written. The base's
      // file is opened writable by the policy, which checked that very
      // handle: it is written through, never reopened by its name (which
      // may lead elsewhere by now).
      const { image: chain, backing } = await openImage(path, {
        format: values.format as string | undefined,
        ...policy,
        writeBacking: true,
      });
      const top = (chain as Partial<OverlayImage>).top;
      const below = (chain as Partial<OverlayImage>).backing;
      const baseFile = backing[0];
      if (!top || !below?.name || !baseFile) {
        throw new Error(`${path} has no backing file to commit into`);
      }
      // The base again, writable through its format, with its own chain
      // under the same policy (a write of part of one of its clusters
      // reads the rest from below it).
      // A base whose format was guessed is probed again, so that it gets
      // QEMU's warning and its first block stays guarded.
      const base = await open(baseFile, {
        format: below.probed ? undefined : below.format,
        writable: true,
        sink: baseFile,
        resolveBacking: fileBackingResolver(below.name, {
          allowDir: [folderOf(path), ...(policy.allowDirs ?? [])],
        }),
      });
      opened.push(base);
      warnAbout(base);
      const bar = values.progress || values["progress-json"]
        ? await progressBar("commit", values["progress-json"] === true)
        : undefined;
      const { commitTo } = await import("./streams/commit.ts");
      await commitTo(top, base, {
        onProgress: bar ? (done, total) => bar.update(done, total) : undefined,
      });
      bar?.end();
      print("Image committed.\n");
      return 0;
    },
  },

  write: {
    usage:
      "write [-f FMT] [--allow-backing-dir DIR]... [--parent FILE]... IMAGE OFFSET FILE   (FILE '-' is stdin)",
    summary:
      "write a file's bytes into an image at OFFSET, through its format (allocating as needed)",
    options: {
      format: { type: "string", short: "f" },
      "allow-backing-dir": backingFlags["allow-backing-dir"],
      parent: backingFlags.parent,
    },
    async run({ values, positionals }) {
      const [path, offsetText, input] = need(positionals, 3, "write");
      const offset = parseSize(offsetText, "offset");
      // The backing chain is followed so that a write of part of a cluster
      // of an overlay keeps the rest of it as the backing file has it.
      const { image } = await openImage(path, {
        format: values.format as string | undefined,
        writable: true,
        ...backingPolicy(values),
      });
      if (!image.write) {
        throw new Error(`${image.format} images cannot be written`);
      }
      const room = Math.max(0, image.size - offset);
      const tooBig = (length: string) =>
        new RangeError(
          `${input} does not fit: ${length} bytes at ${offset} pass the end of the ${image.size}-byte disk`,
        );
      // Everything is known to fit before the first byte is written.
      const data = await fittingInput(input, room, tooBig);
      let at = offset;
      try {
        const buffer = new Uint8Array(4 << 20);
        while (at - offset < data.length) {
          const want = Math.min(buffer.length, data.length - (at - offset));
          const filled = await data.read(buffer.subarray(0, want));
          if (filled === 0) break;
          await image.write(at, buffer.slice(0, filled));
          at += filled;
        }
      } finally {
        await data.close();
      }
      await image.flush?.();
      print(`wrote ${at - offset} bytes at ${offset}\n`);
      return 0;
    },
  },

  check: {
    usage: "check [-f FMT] [--output=human|json] [-r leaks|all] IMAGE",
    summary:
      "check a qcow2 image's refcounts and tables as qemu-img check does (exit 0 clean, 2 corruptions, 3 leaks); -r leaks repairs leaks, -r all refcounts and flags too",
    options: {
      format: { type: "string", short: "f" },
      output: { type: "string", default: "human" },
      repair: { type: "string", short: "r" },
    },
    async run({ values, positionals }) {
      const [path] = need(positionals, 1, "check");
      const repair = values.repair as string | undefined;
      if (repair !== undefined && repair !== "leaks" && repair !== "all") {
        throw new UsageError(
          `-r ${repair}: -r leaks or -r all`,
          "check",
        );
      }
      const file = await fromFile(path, { write: repair !== undefined });
      opened.push(file);
      const check = await import("./drivers/qcow2/check.ts");
      let result;
      try {
        result = await check.checkImage(file, {
          format: values.format as string | undefined,
          repairLeaks: repair !== undefined,
          repairAll: repair === "all",
          sink: file,
        });
      } catch (e) {
        if (!(e instanceof UnsupportedError && e.field === "check")) throw e;
        printErr("vdisk check: This image format does not support checks\n");
        return 63;
      }
      for (const line of result.messages) printErr(line + "\n");
      if (result.checkErrors) {
        printErr("vdisk check: Check failed\n");
        return 1;
      }
      print(
        values.output === "json"
          ? JSON.stringify(check.checkJson(result, path), null, 4) + "\n"
          : check.checkHuman(result),
      );
      return check.checkExitCode(result);
    },
  },

  snapshot: {
    usage: "snapshot [-q] (-l | -c TAG | -a TAG | -d TAG) IMAGE",
    summary:
      "list (-l), create (-c), apply (-a) or delete (-d) the internal snapshots of a qcow2 image, as qemu-img snapshot",
    options: {
      list: { type: "boolean", short: "l" },
      create: { type: "string", short: "c" },
      apply: { type: "string", short: "a" },
      delete: { type: "string", short: "d" },
      quiet: { type: "boolean", short: "q" },
    },
    async run({ values, positionals }) {
      const [path] = need(positionals, 1, "snapshot");
      const actions = (["list", "create", "apply", "delete"] as const).filter(
        (k) => values[k] !== undefined && values[k] !== false,
      );
      if (actions.length > 1) {
        printErr("vdisk snapshot: Cannot mix '-l', '-a', '-c', '-d'\n");
        return 1;
      }
      const action = actions[0];
      if (action === undefined) return 0; // as qemu-img: nothing asked
      const file = await fromFile(path, { write: action !== "list" });
      opened.push(file);
      // Probed, as qemu-img snapshot (it takes no -f).
      const format = (await probe(file))[0]?.format;
      if (action === "list") {
        if (format !== "qcow2") return 0; // no snapshots to list
        const image = await open(file, { format: "qcow2" });
        const snapshots = image.details?.snapshots as
          | Record<string, number | string>[]
          | undefined;
        if (snapshots?.length) {
          print(
            (await inspecting()).snapshotTable(snapshots).join("\n") + "\n",
          );
        }
        return 0;
      }
      const tag = values[action] as string;
      const verb = action === "apply" ? "apply" : action;
      try {
        if (format !== "qcow2") {
          throw new UnsupportedError(
            { format: format ?? "unknown", field: "snapshot" },
            "Operation not supported",
          );
        }
        const snapshots = await import("./drivers/qcow2/snapshots.ts");
        if (action === "create") await snapshots.createSnapshot(file, tag);
        else if (action === "apply") await snapshots.applySnapshot(file, tag);
        else await snapshots.deleteSnapshot(file, tag);
      } catch (e) {
        printErr(
          `vdisk snapshot: Could not ${verb} snapshot '${tag}': ${
            errorLine(e)
          }\n`,
        );
        return 1;
      }
      return 0;
    },
  },

  amend: {
    usage:
      "amend [-f FMT] [-q] -o OPTS IMAGE   (qcow2: compat, lazy_refcounts, refcount_bits)",
    summary:
      "change a qcow2 image's compat level, lazy refcounts or refcount width in place, as qemu-img amend",
    options: {
      format: { type: "string", short: "f" },
      options: { type: "string", short: "o", multiple: true },
      quiet: { type: "boolean", short: "q" },
    },
    async run({ values, positionals }) {
      const texts = (values.options as string[] | undefined) ?? [];
      if (texts.length === 0) {
        throw new UsageError("amend needs -o OPTS", "amend");
      }
      const options = parseOptions(texts.join(","));
      if (
        await optionsHelp(values.format as string ?? "qcow2", texts.join(","))
      ) {
        return 0;
      }
      const [path] = need(positionals, 1, "amend");
      const file = await fromFile(path, { write: true });
      opened.push(file);
      const format = (values.format as string | undefined) ??
        (await probe(file))[0]?.format;
      if (format !== "qcow2") {
        printErr(
          `vdisk amend: Format driver '${format}' does not support option amendment\n`,
        );
        return 1;
      }
      try {
        const { amendQcow2 } = await import("./drivers/qcow2/amend.ts");
        await amendQcow2(file, options);
      } catch (e) {
        if (!(e instanceof Error) || e instanceof Deno.errors.NotFound) throw e;
        // qemu-img's messages may take two lines.
        printErr(`vdisk amend: ${e.message.replace(/^qcow2: /, "")}\n`);
        return 1;
      }
      return 0;
    },
  },

  resize: {
    usage: "resize [--shrink] [-f FMT] IMAGE [+|-]SIZE",
    summary:
      "change an image's virtual size in place (raw, qcow); a smaller size needs --shrink",
    options: {
      format: { type: "string", short: "f" },
      shrink: { type: "boolean" },
    },
    async run({ values, positionals }) {
      const [path, sizeText] = need(positionals, 2, "resize");
      const sign = sizeText[0] === "+" ? 1 : sizeText[0] === "-" ? -1 : 0;
      const magnitude = parseSize(sign ? sizeText.slice(1) : sizeText);
      const size = sign ? sign * magnitude : magnitude;
      const file = await fromFile(path, { write: true });
      opened.push(file);
      const { resizeImage } = await import("./streams/resize.ts");
      const result = await resizeImage(file, size, {
        format: values.format as string | undefined,
        shrink: values.shrink === true,
        relative: sign !== 0,
      });
      if (result.newSize < result.oldSize) {
        printErr(
          "vdisk resize: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.\n",
        );
      }
      print("Image resized.\n");
      return 0;
    },
  },

  rebase: {
    usage:
      "rebase [-u] [-f FMT] -b BACKING [-F FMT] [-p] [--allow-backing-dir DIR]... IMAGE   (-b '' removes the backing file)",
    summary:
      "change an image's backing file; keeps what it reads as (copying what differs), -u only rewrites the name",
    options: {
      format: { type: "string", short: "f" },
      backing: { type: "string", short: "b" },
      "backing-format": { type: "string", short: "F" },
      unsafe: { type: "boolean", short: "u" },
      progress: { type: "boolean", short: "p" },
      "progress-json": { type: "boolean" },
      "allow-backing-dir": backingFlags["allow-backing-dir"],
    },
    async run({ values, positionals }) {
      const [path] = need(positionals, 1, "rebase");
      const name = values.backing as string | undefined;
      if (name === undefined) {
        throw new UsageError("rebase needs -b BACKING ('' for none)", "rebase");
      }
      const unsafe = values.unsafe === true;
      const allowDirs = values["allow-backing-dir"] as string[] | undefined;
      const { file, image } = await openImage(path, {
        format: values.format as string | undefined,
        writable: true,
        followBacking: !unsafe,
        allowDirs,
      });
      const top = (image as Partial<OverlayImage>).top ?? image;
      const setBacking = (await loadDriver(top.format)).setBackingFile;
      if (!file || !setBacking) {
        throw new Error(
          `${top.format}: rebase refused: this toolkit rewrites the backing file of qcow, qcow2, cow and differencing vpc images only`,
        );
      }
      const format = values["backing-format"] as string | undefined;
      // The new backing file is named as from the image's folder.
      const slash = path.lastIndexOf("/");
      const newPath = name === "" || name.startsWith("/") || slash < 0
        ? name
        : `${path.slice(0, slash)}/${name}`;
      let backingFile: Source | undefined;
      if (!unsafe) {
        const old = (image as Partial<OverlayImage>).backing;
        const opened = name === "" ? undefined : await openImage(newPath, {
          format,
          followBacking: true,
          allowDirs,
        });
        backingFile = opened?.file;
        const fresh = opened?.image;
        const bar = values.progress || values["progress-json"]
          ? await progressBar("rebase", values["progress-json"] === true)
          : undefined;
        const { rebase } = await import("./streams/rebase.ts");
        await rebase(top, old, fresh, {
          onProgress: bar
            ? (done, total) => bar.update(done, total)
            : undefined,
        });
        bar?.end();
      } else if (name !== "") {
        // Only read for what a format records of its parent (a VHD's id).
        backingFile = await openImage(newPath, { format: "raw" })
          .then((o) => o.file, () => undefined);
      }
      await setBacking(
        file,
        name === "" ? undefined : name,
        format,
        backingFile,
      );
      return 0;
    },
  },

  dd: {
    usage:
      "dd [-f FMT] [-O FMT] [bs=BYTES] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT",
    summary:
      "copy part of an image as qemu-img dd does: count blocks of bs from the start, less skip blocks",
    options: {
      format: { type: "string", short: "f" },
      "output-format": { type: "string", short: "O", default: "raw" },
      ...backingFlags,
    },
    async run({ values, positionals }) {
      const operands: Record<string, string> = {};
      for (const arg of positionals) {
        const eq = arg.indexOf("=");
        const key = eq < 0 ? arg : arg.slice(0, eq);
        if (eq < 0 || !["bs", "count", "if", "of", "skip"].includes(key)) {
          throw new Error(`unrecognized operand ${arg}`);
        }
        operands[key] = arg.slice(eq + 1);
      }
      if (operands.if === undefined || operands.of === undefined) {
        throw new Error("Must specify both input and output files");
      }
      const number = (key: string) => {
        if (operands[key] === undefined) return undefined;
        try {
          return parseSize(operands[key], key);
        } catch {
          throw new Error(
            key === "bs"
              ? "Invalid bs specified. Must be between 1 and 2147483647."
              : `invalid ${key}: '${operands[key]}'`,
          );
        }
      };
      const outFormat = values["output-format"] as string;
      const { image, files } = await openImage(operands.if, {
        format: values.format as string | undefined,
        ...backingPolicy(values),
      });
      const { ddSource } = await import("./streams/dd.ts");
      const part = ddSource(image, {
        blockSize: number("bs"),
        count: number("count"),
        skip: number("skip"),
      });
      await refuseInputAsOutput(operands.of, operands.if, files);
      const sink = await openOutput(operands.of);
      await (await converting()).convert(part, sink, { format: outFormat });
      await finishOutput(sink);
      return 0;
    },
  },

  measure: {
    usage:
      "measure [--output=human|json] [-O FMT] [-o OPTS] (--size SIZE | [-f FMT] IMAGE)",
    summary:
      "the file sizes an output format needs for IMAGE or for a disk of SIZE: required and fully allocated",
    options: {
      format: { type: "string", short: "f" },
      "output-format": { type: "string", short: "O", default: "raw" },
      options: { type: "string", short: "o" },
      size: { type: "string" },
      output: { type: "string", default: "human" },
      ...backingFlags,
      "key-file": { type: "string" },
    },
    async run({ values, positionals }) {
      const outFormat = values["output-format"] as string;
      if (await optionsHelp(outFormat, values.options)) return 0;
      const sizeText = values.size as string | undefined;
      if (sizeText !== undefined && positionals.length > 0) {
        throw new Error("--size N cannot be used together with a filename.");
      }
      if (sizeText === undefined && positionals.length !== 1) {
        throw new Error("Either --size N or one filename must be specified.");
      }
      const subject = sizeText !== undefined
        ? parseSize(sizeText)
        : (await openImage(positionals[0], {
          format: values.format as string | undefined,
          ...backingPolicy(values),
          extra: { key: await keyFrom(values) },
        })).image;
      const { measure } = await import("./streams/measure.ts");
      const sizes = await measure(subject, {
        format: outFormat,
        options: parseOptions(values.options as string | undefined),
      });
      if (values.output === "json") {
        print(
          JSON.stringify(
            {
              ...(sizes.bitmaps === undefined
                ? {}
                : { bitmaps: sizes.bitmaps }),
              required: sizes.required,
              "fully-allocated": sizes.fullyAllocated,
            },
            null,
            4,
          ) + "\n",
        );
      } else {
        print(
          `required size: ${sizes.required}\nfully allocated size: ${sizes.fullyAllocated}\n` +
            (sizes.bitmaps === undefined
              ? ""
              : `bitmaps size: ${sizes.bitmaps}\n`),
        );
      }
      return 0;
    },
  },

  serve: {
    usage:
      "serve [--port N] [--hostname H] [--allow-host HOST]... [--allow-private] [--max-input BYTES] [--max-virtual BYTES] [--max-upload BYTES] [--max-concurrent N] [--web DIR]\n  serve --nbd [--port N] [--hostname H] [--tls-creds DIR] [--snapshot] [--max-concurrent N] [-f FMT] [--key-file F] [--allow-backing-dir DIR]... [--no-backing] [--parent FILE]... IMAGE",
    summary:
      "run the conversion service (GET /convert?url=..., POST /info); --web also serves a folder and dist/mod.js; --nbd exports IMAGE over NBD (port 10809), read-only, or taking writes in memory with --snapshot",
    options: {
      port: { type: "string" },
      hostname: { type: "string", default: "127.0.0.1" },
      "allow-host": { type: "string", multiple: true },
      "allow-private": { type: "boolean" },
      "max-input": { type: "string" },
      "max-virtual": { type: "string" },
      "max-upload": { type: "string" },
      "max-concurrent": { type: "string" },
      web: { type: "string" },
      nbd: { type: "boolean" },
      "tls-creds": { type: "string" },
      snapshot: { type: "boolean" },
      format: { type: "string", short: "f" },
      "key-file": { type: "string" },
      ...backingFlags,
    },
    async run({ values, positionals }) {
      if (values.nbd === true) return await serveNbd(values, positionals);
      const nbdOnly = [
        "snapshot",
        "format",
        "key-file",
        "no-backing",
        "parent",
        "tls-creds",
      ]
        .find((flag) => values[flag] !== undefined) ??
        (values["allow-backing-dir"] ? "allow-backing-dir" : undefined);
      if (nbdOnly) throw new UsageError(`--${nbdOnly} needs --nbd`, "serve");
      need(positionals, 0, "serve");
      const size = (name: string) =>
        values[name] ? parseSize(values[name] as string) : undefined;
      const concurrent = values["max-concurrent"] as string | undefined;
      if (concurrent !== undefined && !/^[1-9]\d{0,5}$/.test(concurrent)) {
        throw new UsageError(
          `--max-concurrent must be a whole number from 1, not '${concurrent}'`,
        );
      }
      const { conversionService } = await import("./streams/service.ts");
      const service = conversionService({
        allowHosts: values["allow-host"] as string[] | undefined,
        allowPrivate: values["allow-private"] === true,
        resolveHost,
        maxInputBytes: size("max-input"),
        maxVirtualBytes: size("max-virtual"),
        maxUploadBytes: size("max-upload"),
        maxConcurrent: concurrent === undefined
          ? undefined
          : Number(concurrent),
      });
      const web = values.web as string | undefined;
      const server = Deno.serve({
        port: portOf(values, 8000),
        hostname: values.hostname as string,
        onListen: ({ hostname, port }) =>
          printErr(`listening on http://${hostname}:${port}/\n`),
      }, async (request) => {
        const path = new URL(request.url).pathname;
        if (web && request.method === "GET" && !path.startsWith("/convert")) {
          const page = await webFile(web, path);
          if (page) return page;
        }
        return service(request);
      });
      await server.finished;
      return 0;
    },
  },

  formats: {
    usage: "formats [--output=human|json]",
    summary:
      "list the formats this toolkit reads and writes, and those it only recognises (and refuses by name)",
    options: {
      output: { type: "string", default: "human" },
    },
    async run({ values }) {
      // Every driver, for what each can do.
      const { formats } = await import("./drivers/registry.ts");
      const list = formats({ recognised: true }).map((d) => ({
        name: d.name,
        description: d.description,
        read: !d.recognisedOnly,
        create: d.create !== undefined,
        convert: d.create !== undefined || d.encode !== undefined,
        recognisedOnly: d.recognisedOnly === true,
      }));
      if (values.output === "json") {
        print(JSON.stringify(list, null, 4) + "\n");
        return Promise.resolve(0);
      }
      for (const f of list) {
        const can = f.recognisedOnly ? "recognised only" : [
          "read",
          f.create ? "create" : "",
          f.convert ? "convert -O" : "",
        ].filter(Boolean).join(", ");
        print(`${f.name.padEnd(12)} ${f.description} (${can})\n`);
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

/**
 * `map --partitions`: cuts runs at partition boundaries and names the
 * partition each run lies in (a logical partition before its extended one).
 */
function partitionLabeller(table: PartitionTable | undefined) {
  const parts = (table?.partitions ?? []).filter((p) => p.size > 0)
    // Innermost first: an extended partition holds its logicals.
    .sort((a, b) =>
      (a.role === "extended" ? 1 : 0) - (b.role === "extended" ? 1 : 0)
    );
  const cuts = [...new Set(parts.flatMap((p) => [p.offset, p.offset + p.size]))]
    .sort((a, b) => a - b);
  return {
    at(offset: number): number | undefined {
      return parts.find((p) => offset >= p.offset && offset < p.offset + p.size)
        ?.index;
    },
    async *split<T extends Extent>(runs: AsyncIterable<T>): AsyncIterable<T> {
      for await (const run of runs) {
        let start = run.offset;
        const end = run.offset + run.length;
        for (const cut of cuts) {
          if (cut <= start || cut >= end) continue;
          yield piece(run, start, cut);
          start = cut;
        }
        yield piece(run, start, end);
      }
    },
  };
}

function piece<T extends Extent>(run: T, start: number, end: number): T {
  return {
    ...run,
    offset: start,
    length: end - start,
    ...(run.fileOffset === undefined
      ? {}
      : { fileOffset: run.fileOffset + start - run.offset }),
  };
}

/** The `info` facts of the image named on the command line. */
async function describe(
  path: string,
  file: FileHandle | undefined,
  image: Image,
  partitions = false,
) {
  return await (await inspecting()).describeImage(image, {
    filename: path,
    actualSize: await file?.allocatedBytes(),
    partitions,
  });
}

/** The folder of a path (`.` for a bare name). */
function folderOf(path: string): string {
  const slash = path.lastIndexOf("/");
  return slash >= 0 ? path.slice(0, slash) || "/" : ".";
}

/** The `info` facts of one layer of a chain, found by its path. */
async function describeLayer(path: string | undefined, layer: Image) {
  const stat = path === undefined ? undefined : await Deno.stat(path);
  return await (await inspecting()).describeImage(layer, {
    filename: path,
    actualSize: stat?.blocks == null ? undefined : stat.blocks * 512,
  });
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
  return `vdisk ${config.version}\nusage: deno run -A cli.ts COMMAND [OPTIONS]\n\ncommands:\n${
    rows.join("\n")
  }\n\n` +
    "COMMAND --help shows one command's usage.\n";
}

/** Turns any error into one line a person can act on. */
function errorLine(e: unknown): string {
  // The command line's words (--key-file, --allow-backing-dir), not the API's.
  if (
    (e instanceof KeyError || e instanceof BackingFileError) && e.cliMessage
  ) {
    return e.cliMessage;
  }
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
  if (name === "--version" || name === "-V" || name === "version") {
    print(`vdisk ${config.version}\n`);
    return 0;
  }
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
    if (onInterrupt) return onInterrupt();
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
      call = parseFlags(progressSpelling(rest), command.options);
    } catch (e) {
      throw new UsageError((e as Error).message, name);
    }
    const output = call.values.output;
    if (output !== undefined && output !== "human" && output !== "json") {
      throw new UsageError(
        `--output=${output}: the output is human or json`,
        name,
      );
    }
    return await command.run(call);
  } catch (e) {
    for (const out of pendingOutputs) await out.abort();
    pendingOutputs.clear();
    if (e instanceof Deno.errors.BrokenPipe) {
      // The reader went away (`... - | head -c 1000`): end quietly with the
      // status a process killed by SIGPIPE has, as cat and dd do.
      return 141;
    }
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
  // Not `Deno.exit(await main(...))`: a process that exits while its main
  // module is still evaluating (a top-level await) never writes the V8 code
  // cache, so every run compiled every module again, 5-7 ms of each
  // command's start-up (`deno run --log-level=debug` shows the cache hits).
  main(Deno.args).then((code) => Deno.exit(code));
}

/**
 * The runs of a map walk, the data runs stored in their image file split
 * where that file has holes: `inHole` parts (a qcow2 cluster allocated by
 * preallocation=metadata and never written) read as zeros, and qemu-img
 * map reports them `"zero": true, "data": true`, but only for images
 * whose driver says qemu looks into the file ({@linkcode mapsFileHoles}:
 * a metadata-preallocated qcow2). Where the file system cannot say (no
 * FFI), runs stay whole.
 */
async function* overFileHoles<T extends Extent & { layer: Image }>(
  walk: AsyncIterable<T>,
): AsyncIterable<{ run: T; inHole: boolean }> {
  for await (const run of walk) {
    const at = run.fileOffset;
    const file = run.kind === "data" && at !== undefined &&
        await mapsFileHoles(run.layer)
      ? dataFileOf(run.layer) as DataRangeSource | undefined
      : undefined;
    const ranges = at !== undefined && at + run.length <= (file?.size ?? 0)
      ? await file?.dataRanges?.(at, run.length)
      : undefined;
    if (!ranges || at === undefined) {
      yield { run, inHole: false };
      continue;
    }
    for (const [from, to, data] of piecesOf(at, run.length, ranges)) {
      yield {
        run: {
          ...run,
          offset: run.offset + from - at,
          length: to - from,
          fileOffset: from,
        },
        inHole: !data,
      };
    }
  }
}
