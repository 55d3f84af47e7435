// Backing chains for the combinator, commit and backing-policy tests, made
// by the real tools. Each format that can name a backing file is one line of
// LAYERED (qcow and cow join with a line each).
import { cli, run } from "./_helpers.ts";

/** A format whose images can name a backing file, and how to make them. */
export interface LayeredFormat {
  /** The driver's name. */
  format: string;
  /** File extension. */
  ext: string;
  /** Tools the recipes need. */
  tools: string[];
  /** Makes an empty image of `size` bytes at `path`. */
  createBase(path: string, size: number): Promise<void>;
  /**
   * Makes an empty overlay at `path` naming `backing` (as written in the
   * header, relative to the overlay's folder), which must exist.
   */
  createOverlay(path: string, backing: string, size: number): Promise<void>;
  /** True when qemu-io and qemu-img open this format's overlays (for reference results). */
  qemuOverlays: boolean;
}

/** The folder part of a path. */
function dirOf(path: string) {
  return path.slice(0, path.lastIndexOf("/")) || "/";
}

async function ours(args: string[], cwd?: string) {
  const r = await cli(args, { cwd });
  if (r.code !== 0) throw new Error(`cli ${args.join(" ")}: ${r.stderr}`);
}

/** Every format the chain tests run over. */
export const LAYERED: LayeredFormat[] = [
  {
    format: "vmdk",
    ext: "vmdk",
    tools: ["qemu-img", "qemu-io"],
    qemuOverlays: true,
    async createBase(path, size) {
      await run("qemu-img", ["create", "-q", "-f", "vmdk", path, String(size)]);
    },
    async createOverlay(path, backing, size) {
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        backing,
        "-F",
        "vmdk",
        path.slice(path.lastIndexOf("/") + 1),
        String(size),
      ], { cwd: dirOf(path) });
    },
  },
  {
    format: "vpc",
    ext: "vhd",
    // qemu-img makes the base; QEMU cannot make or open differencing VHDs,
    // so our create makes the overlay.
    tools: ["qemu-img", "qemu-io"],
    qemuOverlays: false,
    async createBase(path, size) {
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "force_size=on",
        path,
        String(size),
      ]);
    },
    async createOverlay(path, backing, size) {
      await ours([
        "create",
        "-f",
        "vpc",
        "-b",
        backing,
        "-F",
        "vpc",
        "-o",
        "force_size=on",
        path.slice(path.lastIndexOf("/") + 1),
        String(size),
      ], dirOf(path));
    },
  },
];

/** Writes `pattern` bytes over `[offset, offset + length)` of an image with qemu-io. */
export async function qemuWrite(
  path: string,
  format: string,
  writes: [pattern: number, offset: number, length: number][],
) {
  const args = ["-f", format];
  for (const [p, o, l] of writes) args.push("-c", `write -q -P ${p} ${o} ${l}`);
  await run("qemu-io", [...args, path]);
}

/**
 * The bytes of an image's chain as qemu-img reads it; `format` names the
 * image's format (`-f`) instead of letting qemu-img probe it.
 */
export async function qemuRaw(
  path: string,
  dir: string,
  format?: string,
): Promise<Uint8Array> {
  const out = `${dir}/.qemu-raw-${crypto.randomUUID()}`;
  await run("qemu-img", [
    "convert",
    ...(format ? ["-f", format] : []),
    "-O",
    "raw",
    path,
    out,
  ]);
  try {
    return await Deno.readFile(out);
  } finally {
    await Deno.remove(out);
  }
}

/** A format tests can make images of and write with qemu-io. */
export interface PlainFormat {
  format: string;
  ext: string;
  tools: string[];
  /** Makes an empty image of `size` bytes at `path`. */
  createBase(path: string, size: number): Promise<void>;
}

/** Every writable format: raw and the layered ones (their images without a backing file). */
export const PLAIN: PlainFormat[] = [
  {
    format: "raw",
    ext: "raw",
    tools: ["qemu-img", "qemu-io"],
    async createBase(path, size) {
      await run("qemu-img", ["create", "-q", "-f", "raw", path, String(size)]);
    },
  },
  ...LAYERED,
];
