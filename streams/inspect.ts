/**
 * What `cli.ts info`, `map` and `compare` compute, for scripts, workers and
 * the service alike: the facts of an image, its layers, the allocation map
 * of a chain with depths, the first difference of two images, and the
 * text `info` prints.
 *
 * This module is browser compatible.
 *
 * @module
 */

import type { OverlayImage } from "./overlay.ts";
import { KeyError } from "./errors.ts";
import type { PartitionTable } from "./partitions.ts";
import { type Extent, type Image, mappedExtents, readInto } from "./types.ts";

/** The `info` facts of an opened image (the same keys as `cli.ts info --output=json`). */
export function imageInfo(
  image: Image,
  filename?: string,
): Record<string, unknown> {
  const info: Record<string, unknown> = {
    "virtual-size": image.size,
    filename: filename ?? image.name,
    format: image.format,
  };
  if (image.backingFile !== undefined) {
    info["backing-filename"] = image.backingFile;
    if (image.backingFormat) {
      info["backing-filename-format"] = image.backingFormat;
    }
  }
  info.encrypted = image.encrypted;
  if (image.geometry) info.geometry = image.geometry;
  if (image.details && Object.keys(image.details).length) {
    info["format-specific"] = {
      type: image.format,
      data: qemuStyle(image.details),
    };
  }
  return info;
}

/**
 * Format details in qemu-img's style, whichever a driver used: keys in
 * kebab-case (`first_sector` and `extentSize` become `first-sector` and
 * `extent-size`), and strings with trailing NULs dropped and other
 * control bytes written as `\xNN` (a header's `d2v\0` shows as `d2v`).
 */
function qemuStyle(value: unknown): unknown {
  if (typeof value === "string") {
    return value.replace(/\0+$/, "").replace(
      // deno-lint-ignore no-control-regex
      /[\x00-\x08\x0b-\x1f\x7f]/g,
      (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`,
    );
  }
  if (Array.isArray(value)) return value.map(qemuStyle);
  if (
    value === null || typeof value !== "object" || ArrayBuffer.isView(value)
  ) {
    return value;
  }
  return Object.fromEntries(
    Object.entries(value as Record<string, unknown>).map(([k, v]) => [
      k.replace(/_/g, "-").replace(/([a-z0-9])([A-Z])/g, "$1-$2").toLowerCase(),
      qemuStyle(v),
    ]),
  );
}

/** Where the facts of {@linkcode describeImage} come from besides the image. */
export interface DescribeOptions {
  /** The name to show (the path on the command line). */
  filename?: string;
  /** The bytes the image file takes on disk (qemu-img's `actual-size`), when known. */
  actualSize?: number;
  /**
   * Read the disk's partition table too (`partition-table`: the table,
   * null for none, or `{ error }`), as `info` shows it. @default false
   */
  partitions?: boolean;
}

/**
 * The facts `info` shows of an image (opened alone, or one of
 * {@linkcode layers}),
 * with qemu-img's JSON keys in its order: `virtual-size`, `filename`,
 * `format`, `actual-size`, `allocated-bytes`, backing file, encryption,
 * `format-specific` and `dirty-flag`.
 *
 * @param image the image
 * @param options its name and size on disk
 * @returns the facts
 *
 * @example
 * ```ts
 * import { describeImage, fromBytes, open } from "../mod.ts";
 * const image = await open(fromBytes(new Uint8Array(4096)));
 * const info = await describeImage(image, { filename: "x.img" });
 * console.log(info.format, info["virtual-size"]); // raw 4096
 * ```
 */
export async function describeImage(
  image: Image,
  options: DescribeOptions = {},
): Promise<Record<string, unknown>> {
  const info = imageInfo(image, options.filename);
  const ordered: Record<string, unknown> = {
    "virtual-size": info["virtual-size"],
    filename: info.filename,
    format: info.format,
  };
  if (options.actualSize !== undefined) {
    ordered["actual-size"] = options.actualSize;
  }
  ordered["allocated-bytes"] = await allocatedBytes(image);
  // qcow2 keeps a dirty bit (its details say so); the other formats none.
  const described: Record<string, unknown> = {
    ...ordered,
    ...info,
    "dirty-flag": image.details?.dirty === true,
  };
  if (options.partitions) {
    described["partition-table"] = await partitionTableInfo(image);
  }
  return described;
}

/**
 * Bytes of the virtual disk this layer stores itself (its `data` runs; not
 * its backing file's), walked from the allocation map. A raw layer has no
 * map of its own (its walk reads every byte to find zero blocks): where
 * its file can say which ranges hold data (`SEEK_DATA`, a local file with
 * FFI) those are counted instead, as qemu's file driver reports a raw
 * file, so `info` on a 1 GiB raw takes milliseconds, not a read of the
 * whole disk (0.2-0.9 s).
 *
 * @param image the layer
 * @returns the bytes of its `data` runs
 *
 * @example
 * ```ts
 * import { allocatedBytes, fromBytes, open } from "../mod.ts";
 * const image = await open(fromBytes(new Uint8Array(8192).fill(1, 0, 10)));
 * console.log(await allocatedBytes(image)); // 4096
 * ```
 */
export async function allocatedBytes(image: Image): Promise<number> {
  let total = 0;
  for await (const run of mappedExtents(image, 0, image.size)) {
    if (run.kind === "data") total += run.length;
  }
  return total;
}

/** A run of a chain's map, with the depth of the layer that holds it (qemu-img map's `depth`). */
export interface LayeredExtent extends Extent {
  /** The depth of the layer holding the run: 0 for the top. */
  depth: number;
  /** That layer. */
  layer: Image;
}

/**
 * The allocation map of a chain, layer by layer: runs a layer holds carry
 * its depth (0 for the top); runs no layer holds carry the bottom's depth.
 * A raw layer over a local file is mapped as its file system reports it
 * (data ranges and holes), as qemu-img map does.
 * Adjacent runs of the same kind and depth merge, as in qemu-img map
 * (and, for data, only where they lie one after the other in the file).
 *
 * @param image an image or a chain
 * @param offset where to start in the virtual disk
 * @param length how far
 * @returns the runs, each with its depth and layer
 *
 * @example
 * ```ts
 * import { fromBytes, mapChain, open } from "../mod.ts";
 * const image = await open(fromBytes(new Uint8Array(4096)));
 * for await (const run of mapChain(image)) {
 *   console.log(run.kind, run.depth, run.length); // zero 0 4096
 * }
 * ```
 */
export async function* mapChain(
  image: Image,
  offset = 0,
  length: number = image.size - offset,
): AsyncIterable<LayeredExtent> {
  let pending: LayeredExtent | undefined;
  for await (const run of walkLayers(image, offset, length, 0)) {
    if (
      pending && pending.kind === run.kind && pending.depth === run.depth &&
      pending.layer === run.layer &&
      pending.offset + pending.length === run.offset &&
      (pending.fileOffset === undefined
        ? run.fileOffset === undefined
        : pending.fileOffset + pending.length === run.fileOffset)
    ) {
      pending.length += run.length;
      continue;
    }
    if (pending) yield pending;
    pending = { ...run };
  }
  if (pending) yield pending;
}

async function* walkLayers(
  image: Image,
  offset: number,
  length: number,
  depth: number,
): AsyncIterable<LayeredExtent> {
  const layer = (image as Partial<OverlayImage>).top ?? image;
  const below = image.backing;
  for await (const run of mappedExtents(layer, offset, length)) {
    if (run.kind !== "unallocated" || !below) {
      yield { ...run, depth, layer };
      continue;
    }
    const inside = Math.max(0, Math.min(run.length, below.size - run.offset));
    if (inside > 0) yield* walkLayers(below, run.offset, inside, depth + 1);
    if (inside < run.length) {
      // Past the end of a shorter backing image: zeros, held by no layer.
      yield {
        offset: run.offset + inside,
        length: run.length - inside,
        kind: "unallocated",
        depth: depth + 1,
        layer: below,
      };
    }
  }
}

/**
 * The first byte offset where two images' disks differ (the shorter one
 * reads as zeros past its end), or undefined when they read the same:
 * what `compare` reports. Zero runs are compared from the map, unread.
 *
 * @param a one image
 * @param b the other
 * @returns the offset of the first difference, or undefined
 *
 * @example
 * ```ts
 * import { firstDifference, fromBytes, open } from "../mod.ts";
 * const a = await open(fromBytes(new Uint8Array(1024)));
 * const b = await open(fromBytes(new Uint8Array(1024).fill(1, 700)));
 * console.log(await firstDifference(a, b)); // 700
 * ```
 */
export async function firstDifference(
  a: Image,
  b: Image,
): Promise<number | undefined> {
  const size = Math.max(a.size, b.size);
  const sides = [blocksOf(a), blocksOf(b)];
  const fetch = (offset: number) =>
    offset < size
      ? Promise.all(
        sides.map((side) =>
          side(offset, Math.min(COMPARE_BLOCK, size - offset))
        ),
      )
      : undefined;
  let next = fetch(0);
  try {
    for (let offset = 0; next; offset += COMPARE_BLOCK) {
      const [x, y] = await next;
      // The next block is read while this one is compared.
      next = fetch(offset + COMPARE_BLOCK);
      const at = x ? firstUnequal(x, y) : y ? firstUnequal(y, null) : undefined;
      if (at !== undefined) return offset + at;
    }
    return undefined;
  } finally {
    // A block read ahead and not compared: its failure is nobody's.
    await next?.catch(() => {});
  }
}

/** Bytes compared at a time by {@linkcode firstDifference}. */
const COMPARE_BLOCK = 4 << 20;

/**
 * Reads blocks of `image` for a comparison, two buffers in turn (one
 * compared while the next is read): a block is `null` where the map says
 * it is all zeros (nothing read; past the image's end too), else its
 * bytes, zeros past the end. A raw layer over a file is mapped from the
 * file system (its own walk would read the bytes to find zero blocks,
 * and they would be read again).
 */
function blocksOf(
  image: Image,
): (offset: number, length: number) => Promise<Uint8Array | null> {
  const buffers: Uint8Array[] = [];
  let turn = 0;
  return async (offset, length) => {
    const inside = Math.max(0, Math.min(length, image.size - offset));
    if (inside === 0) return null;
    let data = false;
    for await (const run of mappedExtents(image, offset, inside)) {
      if (run.kind === "data") {
        data = true;
        break;
      }
    }
    if (!data) return null;
    const buffer = buffers[turn] ??= new Uint8Array(COMPARE_BLOCK);
    turn ^= 1;
    const view = buffer.subarray(0, length);
    await readInto(image, offset, view.subarray(0, inside));
    view.fill(0, inside);
    return view;
  };
}

/**
 * The first index where `x` and `y` (zeros where null) differ, or
 * undefined: eight 32-bit words at a time, then byte by byte from the
 * group that differs (byte by byte alone compared 768 MiB in 0.6 s).
 * `x` and `y` start on a 4-byte boundary and have the same length.
 */
function firstUnequal(x: Uint8Array, y: Uint8Array | null): number | undefined {
  const n = x.length;
  const whole = (n >>> 2) & ~7;
  const wx = new Int32Array(x.buffer, x.byteOffset, whole);
  let w = 0;
  if (y) {
    const wy = new Int32Array(y.buffer, y.byteOffset, whole);
    for (; w < whole; w += 8) {
      if (
        ((wx[w] ^ wy[w]) | (wx[w + 1] ^ wy[w + 1]) | (wx[w + 2] ^ wy[w + 2]) |
          (wx[w + 3] ^ wy[w + 3]) | (wx[w + 4] ^ wy[w + 4]) |
          (wx[w + 5] ^ wy[w + 5]) | (wx[w + 6] ^ wy[w + 6]) |
          (wx[w + 7] ^ wy[w + 7])) !== 0
      ) break;
    }
  } else {
    for (; w < whole; w += 8) {
      if (
        (wx[w] | wx[w + 1] | wx[w + 2] | wx[w + 3] | wx[w + 4] | wx[w + 5] |
          wx[w + 6] | wx[w + 7]) !== 0
      ) break;
    }
  }
  for (let i = w << 2; i < n; i++) {
    if (x[i] !== (y ? y[i] : 0)) return i;
  }
  return undefined;
}

/**
 * A byte count as qemu-img prints it: `512 bytes`, `1.5 MiB`, `4 GiB`.
 *
 * @param bytes the count
 * @returns the text
 *
 * @example
 * ```ts
 * import { humanSize } from "../mod.ts";
 * console.log(humanSize(1536 * 1024)); // 1.5 MiB
 * ```
 */
export function humanSize(bytes: number): string {
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

/**
 * Nested format details as qemu-img prints them: `key: value` lines, with
 * objects and lists indented below their key (list items as `[0]:`).
 */
function humanValue(value: unknown, indent: string, lines: string[]) {
  const entries = Array.isArray(value)
    ? value.map((v, i) => [`[${i}]`, v] as const)
    : Object.entries(value as Record<string, unknown>);
  for (const [name, v] of entries) {
    // qemu-img's human keys are words: `lazy refcounts`, `first sector`.
    const key = name.replace(/-/g, " ");
    if (v !== null && typeof v === "object" && !(v instanceof Date)) {
      lines.push(`${indent}${key}:`);
      humanValue(v, indent + "    ", lines);
    } else {
      lines.push(`${indent}${key}: ${String(v)}`);
    }
  }
}

/**
 * The text `info` prints for a person, from the facts {@linkcode describeImage}
 * (or `imageInfo`) gives: qemu-img's lines, then the format's details.
 *
 * @param info the facts
 * @returns the lines, ending with a newline
 *
 * @example
 * ```ts
 * import { describeImage, formatInfo, fromBytes, open } from "../mod.ts";
 * const image = await open(fromBytes(new Uint8Array(4096)));
 * console.log(formatInfo(await describeImage(image, { filename: "x.img" })));
 * ```
 */
export function formatInfo(info: Record<string, unknown>): string {
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
  if (info["allocated-bytes"] !== undefined) {
    lines.push(
      `allocated: ${humanSize(info["allocated-bytes"] as number)} (${
        info["allocated-bytes"]
      } bytes of the virtual disk held in this layer; a compressed format stores them in less disk size)`,
    );
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
  const snapshots = specific?.data.snapshots as
    | Record<string, number | string>[]
    | undefined;
  if (snapshots) lines.push(...snapshotTable(snapshots));
  if (specific) {
    lines.push("Format specific information:");
    humanValue(specific.data, "    ", lines);
  }
  if ("partition-table" in info) {
    humanPartitions(info["partition-table"] as Record<string, unknown>, lines);
  }
  return lines.join("\n") + "\n";
}

/**
 * Whether `image` carries a signature `readPartitionTable` (partitions.ts)
 * starts from: an Apple partition map's "ER" at 0, the MBR's 55 AA at 510
 * (a protective MBR too), or "EFI PART" at 512 or 4096. Without one it
 * answers no table; the same sectors are read, in the same order, so a
 * read that fails here fails there as well.
 */
async function mayHoldPartitionTable(image: Image): Promise<boolean> {
  const SECTOR = 512;
  if (image.size < SECTOR) return false;
  const sector0 = await image.read(0, SECTOR);
  if (sector0[0] === 0x45 && sector0[1] === 0x52) return true; // "ER"
  for (const at of [SECTOR, 4096]) {
    if (at + 8 > image.size) continue;
    const b = await image.read(at, 8);
    if (String.fromCharCode(...b) === "EFI PART") return true;
  }
  return sector0[510] === 0x55 && sector0[511] === 0xaa;
}

/**
 * The partition table for `info` (kebab-case keys): null when the disk has
 * none; `{ error }` when it is malformed or cannot be read (an encrypted
 * disk without its key), so that the rest of `info` still shows.
 *
 * @param image the disk
 * @returns the table's facts, null, or `{ error }`
 *
 * @example
 * ```ts
 * import { fromBytes, open, partitionTableInfo } from "../mod.ts";
 * const image = await open(fromBytes(new Uint8Array(4096)));
 * console.log(await partitionTableInfo(image)); // null
 * ```
 */
export async function partitionTableInfo(
  image: Image,
): Promise<Record<string, unknown> | null> {
  let table: PartitionTable | undefined;
  try {
    // A disk with none of the signatures the parsers start from has no
    // table: they are not loaded for it (1 ms of a small image's info).
    if (!(await mayHoldPartitionTable(image))) return null;
    // The partition parsers (and the CRC-32 GPT needs) load only here: a
    // conversion that imports this module for `layers` does not need them.
    const { readPartitionTable } = await import("./partitions.ts");
    table = await readPartitionTable(image);
  } catch (e) {
    if (e instanceof KeyError) {
      return { error: "the disk is encrypted: give its key to read the table" };
    }
    return { error: e instanceof Error ? e.message : String(e) };
  }
  if (!table) return null;
  const out: Record<string, unknown> = {
    scheme: table.scheme,
    "sector-size": table.sectorSize,
  };
  if (table.diskGuid) out["disk-guid"] = table.diskGuid;
  if (table.header) out.header = table.header;
  if (table.primaryError) out["primary-error"] = table.primaryError;
  out.partitions = table.partitions.map((p) => {
    const entry: Record<string, unknown> = { index: p.index };
    if (p.name !== undefined) entry.name = p.name;
    entry.type = p.type;
    if (p.typeName) entry["type-name"] = p.typeName;
    if (p.role) entry.role = p.role;
    if (p.bootable) entry.bootable = true;
    entry.offset = p.offset;
    entry.size = p.size;
    entry["first-sector"] = p.firstSector;
    entry["sector-count"] = p.sectorCount;
    if (p.guid) entry.guid = p.guid;
    return entry;
  });
  return out;
}

/** The `info` partition table as a table of columns. */
function humanPartitions(
  table: Record<string, unknown> | null,
  lines: string[],
) {
  if (table === null) {
    lines.push("partition table: none");
    return;
  }
  if (table.error !== undefined) {
    lines.push(`partition table: unreadable: ${table.error}`);
    return;
  }
  const header = table.header === "backup"
    ? `, backup header (the primary: ${table["primary-error"]})`
    : "";
  const guid = table["disk-guid"] ? `, disk GUID ${table["disk-guid"]}` : "";
  lines.push(
    `partition table: ${table.scheme} (${
      table["sector-size"]
    }-byte sectors${guid}${header})`,
  );
  const rows = [[
    "Index",
    "First sector",
    "Sectors",
    "Offset",
    "Size",
    "Type",
    "Name",
  ]];
  for (const p of table.partitions as Record<string, unknown>[]) {
    const kind = [
      p.type,
      p["type-name"],
      p.role === "extended" ? "(extended)" : "",
    ]
      .filter(Boolean).join(" ");
    rows.push([
      String(p.index) + (p.bootable ? "*" : ""),
      String(p["first-sector"]),
      String(p["sector-count"]),
      String(p.offset),
      humanSize(p.size as number),
      kind,
      (p.name as string | undefined) ?? "",
    ]);
  }
  const widths = rows[0].map((_, c) =>
    Math.max(...rows.map((r) => r[c].length))
  );
  for (const row of rows) {
    lines.push(
      "    " +
        row.map((cell, c) => cell.padEnd(widths[c])).join("  ").trimEnd(),
    );
  }
}

/**
 * qemu-img's "Snapshot list:" table (ID, tag, VM size, date, VM clock,
 * icount), from the `snapshots` of a qcow2 image's details.
 *
 * @param snapshots the details' snapshot records
 * @returns the lines, without newlines
 *
 * @example
 * ```ts
 * import { snapshotTable } from "./inspect.ts";
 * console.log(snapshotTable([])[0]); // Snapshot list:
 * ```
 */
export function snapshotTable(
  snapshots: Record<string, number | string>[],
): string[] {
  const pad = (n: number, w = 2) => String(n).padStart(w, "0");
  const rows = snapshots.map((s) => {
    const date = new Date(Number(s["date-sec"]) * 1000);
    const day = `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${
      pad(date.getDate())
    } ${pad(date.getHours())}:${pad(date.getMinutes())}:${
      pad(date.getSeconds())
    }`;
    const clock = Number(s["vm-clock-sec"]);
    const vmClock = `${pad(Math.floor(clock / 3600))}:${
      pad(Math.floor(clock / 60) % 60)
    }:${pad(clock % 60)}.${
      pad(Math.floor(Number(s["vm-clock-nsec"]) / 1e6), 3)
    }`;
    const vmSize = Number(s["vm-state-size"]);
    // qemu-img's widths: a tag of 17 bytes or more still gets a space.
    return `${String(s.id).padEnd(10)}${String(s.name).padEnd(16)} ${
      (vmSize === 0 ? "0 B" : humanSize(vmSize)).padStart(8)
    } ${day} ${vmClock} ${String(s.icount ?? "").padStart(10)}`;
  });
  return [
    "Snapshot list:",
    "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT",
    ...rows,
  ];
}
