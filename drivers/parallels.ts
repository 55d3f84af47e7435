/**
 * parallels: Parallels Desktop (and Virtuozzo) expanding and plain disk
 * images, read-only.
 *
 * This module is browser compatible.
 *
 * Described by QEMU's `docs/interop/parallels.rst`. Every field is
 * little-endian.
 *
 * | offset | size | field                                                  |
 * | -----: | ---: | ------------------------------------------------------ |
 * |      0 |   16 | magic `WithoutFreeSpace` (old) or `WithouFreSpacExt`   |
 * |     16 |    4 | version (2)                                            |
 * |     20 |    4 | heads                                                  |
 * |     24 |    4 | cylinders                                              |
 * |     28 |    4 | tracks: sectors per cluster                            |
 * |     32 |    4 | bat_entries                                            |
 * |     36 |    8 | nb_sectors: the disk's size in sectors (old: 32 bits)  |
 * |     44 |    4 | inuse: 0x746F6E59 while an application has it open    |
 * |     48 |    4 | data_off: the first data sector (0: after the BAT)     |
 * |     52 |    4 | flags                                                  |
 * |     56 |    8 | ext_off: the format extension cluster (sectors)        |
 *
 * The BAT (bat_entries 32-bit entries at 64) gives each cluster's place in
 * the file: in 512-byte sectors for `WithoutFreeSpace` images, in clusters
 * for `WithouFreSpacExt` ones; 0 when the cluster is not allocated (zeros).
 *
 * A Parallels Desktop disk is a bundle: a folder `NAME.hdd/` holding
 * `DiskDescriptor.xml` and the `.hds` files it names. The descriptor's
 * `<StorageData>` lists storages (`<Start>` and `<End>` in sectors, each
 * one file per snapshot: `<Image>` with `<GUID>`, `<Type>` `Compressed`
 * (an expanding image as above) or `Plain` (the bytes as they are) and
 * `<File>`); `<Snapshots>` lists the snapshots (`<Shot>` with `<GUID>` and
 * `<ParentGUID>`, `{00000000-...}` for the root) and may name the current
 * state in `<TopGUID>` (else it is `{5fbaabe3-6958-40ff-92a7-860e329aab41}`),
 * as QEMU's `docs/interop/prl-xml.rst` describes. Each snapshot's image is
 * a delta over its parent's: the disk is read through the chain from the
 * top image (or the snapshot named by the open option `snapshot`, the
 * CLI's `-l`) down to the root, each storage's images stacked as an
 * overlay (clusters an image does not hold are its parent's; the root's
 * are zeros). The files are opened with `OpenOptions.resolveFile`.
 *
 * @module
 */

import {
  isParallelsDescriptor,
  PARALLELS_MAGIC_EXT as MAGIC_EXT,
  PARALLELS_MAGIC_OLD as MAGIC_OLD,
  probeParallels,
} from "./_signatures.ts";
import { ascii, formatErrors, le32, le64 } from "./_binary.ts";
import { blockReader, wholeBlock } from "./_blocks.ts";
import { check, UnsupportedError } from "../streams/errors.ts";
import {
  checkRange,
  type Extent,
  extentsOf,
  storesDataIn,
} from "../streams/types.ts";
import { overlay } from "../streams/overlay.ts";
import type { Driver, Image, OpenOptions, Source } from "../streams/types.ts";

const FORMAT = "parallels";
const HEADER_BYTES = 64;
const SECTOR = 512;
const INUSE = 0x746f6e59;
/** QEMU's limit: a cluster below 2^31 / 513 sectors (about 1 GiB). */
const MAX_TRACKS = Math.floor(0x7fffffff / 513);
/** QEMU's catalog limit: the BAT below 2^31 bytes. */
const MAX_BAT_ENTRIES = Math.floor(0x7fffffff / 4);

const fail = formatErrors(FORMAT);

async function openParallels(
  source: Source,
  options: OpenOptions,
): Promise<Image> {
  if (options.writable) {
    throw new UnsupportedError(
      { format: FORMAT },
      "parallels images are read-only here",
    );
  }
  const start = await source.read(0, Math.min(source.size, 4096));
  if (isParallelsDescriptor(start)) return await openBundle(source, options);
  check(source.size >= HEADER_BYTES, {
    format: FORMAT,
    field: "file size",
    value: source.size,
    limit: `at least ${HEADER_BYTES} bytes (the header)`,
    file: source.name,
  });
  const h = start.subarray(0, HEADER_BYTES);
  const magic = ascii(h, 0, 16);
  if (magic !== MAGIC_OLD && magic !== MAGIC_EXT) {
    throw fail("magic", magic, `"${MAGIC_OLD}" or "${MAGIC_EXT}"`, 0);
  }
  const version = le32(h, 16);
  if (version !== 2) {
    throw new UnsupportedError(
      { format: FORMAT, field: "version", value: version, offset: 16 },
      `version ${version} is not supported: only 2`,
    );
  }
  const tracks = le32(h, 28);
  if (tracks === 0 || tracks > MAX_TRACKS) {
    throw fail(
      "tracks",
      tracks,
      `from 1 to ${MAX_TRACKS} sectors per cluster (QEMU's limit)`,
      28,
      source.name,
    );
  }
  const clusterSize = tracks * SECTOR;
  const batEntries = le32(h, 32);
  if (
    batEntries > MAX_BAT_ENTRIES || HEADER_BYTES + batEntries * 4 > source.size
  ) {
    throw fail(
      "bat_entries",
      batEntries,
      `a catalog (${batEntries} x 4 bytes at 64) within the file's ${source.size} bytes`,
      32,
      source.name,
    );
  }
  const old = magic === MAGIC_OLD;
  const sectors = old ? le64(h, 36) & 0xffffffffn : le64(h, 36);
  const maxSectors = batEntries * tracks;
  if (sectors > BigInt(maxSectors)) {
    throw fail(
      "nb_sectors",
      sectors,
      `at most bat_entries x tracks = ${maxSectors}`,
      36,
      source.name,
    );
  }
  const size = Number(sectors) * SECTOR;
  const dataOffset = le32(h, 48);
  const batEnd = HEADER_BYTES + batEntries * 4;
  if (
    dataOffset !== 0 &&
    (dataOffset * SECTOR < batEnd || dataOffset * SECTOR > source.size)
  ) {
    throw fail(
      "data_off",
      dataOffset,
      `0, or a sector past the catalog's end (${batEnd} bytes) within the file's ${source.size} bytes`,
      48,
      source.name,
    );
  }
  // Clusters live in the data area: from data_off, or past the catalog.
  const dataStart = dataOffset !== 0 ? dataOffset * SECTOR : batEnd;
  const unit = old ? SECTOR : clusterSize;
  const clusters = Math.ceil(size / clusterSize);
  const batBytes = await source.read(HEADER_BYTES, clusters * 4);
  const bat = new Float64Array(clusters);
  let allocated = 0;
  for (let i = 0; i < clusters; i++) {
    const entry = le32(batBytes, i * 4);
    if (entry === 0) continue;
    const at = entry * unit;
    const length = Math.min(clusterSize, size - i * clusterSize);
    if (at < dataStart || at + length > source.size) {
      throw fail(
        `bat[${i}]`,
        entry,
        `a cluster (${length} bytes at ${at}) in the data area, from ${dataStart} to the file's end at ${source.size}`,
        HEADER_BYTES + i * 4,
        source.name,
      );
    }
    bat[i] = at;
    allocated++;
  }
  const reader = blockReader({
    source,
    size,
    blockSize: clusterSize,
    lookup(cluster) {
      const length = Math.min(clusterSize, size - cluster * clusterSize);
      return bat[cluster] === 0
        ? wholeBlock(length, "unallocated")
        : wholeBlock(length, "data", bat[cluster]);
    },
  });
  const inUse = le32(h, 44) === INUSE;
  // Clusters read as their bytes in the file: convert copies them file to
  // file (in the kernel) to a raw output.
  return storesDataIn({
    format: FORMAT,
    size,
    name: source.name,
    encrypted: false,
    geometry: {
      cylinders: le32(h, 24),
      heads: le32(h, 20),
      sectors: tracks,
    },
    details: {
      subformat: old ? MAGIC_OLD : MAGIC_EXT,
      clusterSize,
      batEntries,
      allocatedClusters: allocated,
      batUnit: old ? "sectors" : "clusters",
      ...(inUse
        ? { note: "the in-use flag is set (not closed cleanly); read as it is" }
        : {}),
      ...(le64(h, 56) !== 0n ? { extensionSector: Number(le64(h, 56)) } : {}),
    },
    ...reader,
    close: () => source.close?.() ?? Promise.resolve(),
  }, source);
}

// ---------------------------------------------------------------------------
// DiskDescriptor.xml bundles.

/** The largest descriptor read (real ones are a few kilobytes). */
const MAX_DESCRIPTOR = 1 << 20;
const MAX_STORAGES = 4096;
/** The most image files a bundle opens (storages x snapshots in the chain). */
const MAX_FILES = 4096;
/** The current state when `<TopGUID>` is absent (prl-xml.rst). */
const DEFAULT_TOP = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";
const ROOT_PARENT = "{00000000-0000-0000-0000-000000000000}";

/**
 * The chain of image GUIDs to read, top first: from `wanted` (the named
 * snapshot, or the top) through `<ParentGUID>` to the root.
 */
function snapshotChain(
  xml: string,
  wanted: string | undefined,
  bad: (field: string, value: unknown, limit: string) => Error,
): {
  chain: string[];
  top?: string;
  shots: { guid: string; parent: string }[];
} {
  const shots = elements(xml, "Shot").map((shot, i) => {
    const guid = text(shot, "GUID")?.toLowerCase();
    const parent = text(shot, "ParentGUID")?.toLowerCase() ?? ROOT_PARENT;
    if (!guid) throw bad(`Snapshots Shot[${i}] GUID`, guid, "a GUID");
    return { guid, parent };
  });
  const byGuid = new Map<string, string>();
  for (const [i, shot] of shots.entries()) {
    if (byGuid.has(shot.guid)) {
      throw bad(
        `Snapshots Shot[${i}] GUID`,
        shot.guid,
        "a GUID no other snapshot has (the snapshots form a tree)",
      );
    }
    byGuid.set(shot.guid, shot.parent);
  }
  if (shots.length === 0) return { chain: [], shots };
  const topGuid = text(xml, "TopGUID")?.toLowerCase();
  const top = topGuid ??
    (byGuid.has(DEFAULT_TOP) || shots.length > 1 ? DEFAULT_TOP : shots[0].guid);
  const start = wanted === undefined
    ? top
    : wanted.startsWith("{")
    ? wanted.toLowerCase()
    : `{${wanted.toLowerCase()}}`;
  if (!byGuid.has(start)) {
    throw bad(
      wanted === undefined ? "Snapshots TopGUID" : "snapshot",
      wanted ?? start,
      `one of the snapshots' GUIDs (${[...byGuid.keys()].join(", ")})`,
    );
  }
  const chain: string[] = [];
  for (let at = start; at !== ROOT_PARENT;) {
    if (chain.includes(at)) {
      throw bad(
        "Snapshots ParentGUID",
        at,
        `a chain that ends at the root, not a loop (${chain.join(" -> ")})`,
      );
    }
    chain.push(at);
    const parent = byGuid.get(at);
    if (parent === undefined) {
      throw bad(
        "Snapshots ParentGUID",
        at,
        `a snapshot listed in <Snapshots>, or ${ROOT_PARENT} for the root`,
      );
    }
    at = parent;
  }
  return { chain, top, shots };
}

/**
 * The text of every `<tag>...</tag>` in `xml`, in order (the same tag never
 * nests in a descriptor). One forward scan: no regular expression that a
 * crafted descriptor could make slow.
 */
function elements(xml: string, tag: string): string[] {
  const out: string[] = [];
  for (let at = 0;;) {
    const open = xml.indexOf(`<${tag}`, at);
    if (open < 0) break;
    const next = xml[open + tag.length + 1];
    if (next !== ">" && next !== " " && next !== "\t" && next !== "\n") {
      at = open + 1;
      continue;
    }
    const body = xml.indexOf(">", open);
    const close = body < 0 ? -1 : xml.indexOf(`</${tag}>`, body);
    if (close < 0) break;
    out.push(xml.slice(body + 1, close));
    at = close + tag.length + 3;
  }
  return out;
}

/** The trimmed text of the first `<tag>` in `xml`, or undefined. */
function text(xml: string, tag: string): string | undefined {
  return elements(xml, tag)[0]?.trim();
}

/** One storage of a bundle: sectors [start, end) read from `image`. */
interface Storage {
  start: number;
  end: number;
  /** Its images along the snapshot chain, stacked. */
  image: Source & { extents?: Image["extents"] };
  /** The files of the chain, top first (each closed once). */
  layers: (Source & { extents?: Image["extents"] })[];
}

async function closeAll(storages: Storage[]): Promise<void> {
  await Promise.all(
    storages.flatMap((s) => s.layers.map((l) => l.close?.())),
  );
}

async function openBundle(
  source: Source,
  options: OpenOptions,
): Promise<Image> {
  const bad = (field: string, value: unknown, limit: string) =>
    fail(`DiskDescriptor.xml ${field}`, value, limit, undefined, source.name);
  if (source.size > MAX_DESCRIPTOR) {
    throw bad("size", source.size, `at most ${MAX_DESCRIPTOR} bytes`);
  }
  const xml = new TextDecoder().decode(await source.read(0, source.size));
  const diskSectors = Number(text(xml, "Disk_size"));
  if (!Number.isSafeInteger(diskSectors) || diskSectors < 0) {
    throw bad("Disk_size", text(xml, "Disk_size"), "a number of sectors");
  }
  const named = options.options?.snapshot;
  const { chain, top, shots } = snapshotChain(xml, named, bad);
  if (named !== undefined && chain.length === 0) {
    throw bad("snapshot", named, "a snapshot of the bundle (it lists none)");
  }
  const storages = elements(xml, "Storage");
  if (storages.length === 0 || storages.length > MAX_STORAGES) {
    throw bad("Storage", storages.length, `from 1 to ${MAX_STORAGES} storages`);
  }
  if (storages.length * Math.max(1, chain.length) > MAX_FILES) {
    throw bad(
      "Snapshots",
      `${chain.length} images in the chain, ${storages.length} storages`,
      `at most ${MAX_FILES} image files in all`,
    );
  }
  if (!options.resolveFile) {
    throw new UnsupportedError(
      { format: FORMAT },
      "a DiskDescriptor.xml names its .hds files: open it with a file resolver (OpenOptions.resolveFile)",
    );
  }
  const opened: Storage[] = [];
  let expected = 0;
  try {
    for (const [i, storage] of storages.entries()) {
      const start = Number(text(storage, "Start"));
      const end = Number(text(storage, "End"));
      if (
        start !== expected || !Number.isSafeInteger(end) || end <= start ||
        end > diskSectors
      ) {
        throw bad(
          `Storage[${i}] Start..End`,
          `${text(storage, "Start")}..${text(storage, "End")}`,
          `${expected}..(at most Disk_size ${diskSectors}), following the storage before`,
        );
      }
      expected = end;
      const images = elements(storage, "Image").map((image) => ({
        guid: text(image, "GUID")?.toLowerCase(),
        type: text(image, "Type"),
        file: text(image, "File"),
      }));
      const length = (end - start) * SECTOR;
      // This storage's images along the chain, top first (a bundle without
      // snapshots has one image).
      const wanted = chain.length ? chain : [undefined];
      const layers: Storage["image"][] = [];
      const stored: Storage = {
        start: start * SECTOR,
        end: end * SECTOR,
        image: undefined as unknown as Storage["image"],
        layers,
      };
      opened.push(stored);
      for (const [depth, guid] of wanted.entries()) {
        const image = guid === undefined && images.length === 1
          ? images[0]
          : images.find((im) => im.guid === guid);
        if (!image?.file) {
          throw bad(
            `Storage[${i}] Image`,
            images.length,
            `an image of snapshot ${guid ?? "(none named)"} with a <File>`,
          );
        }
        if (image.file.includes("/") || image.file.includes("\\")) {
          throw bad(
            `Storage[${i}] File`,
            image.file,
            "a file name beside the descriptor",
          );
        }
        const root = depth === wanted.length - 1;
        if (image.type !== "Compressed" && !(root && image.type === "Plain")) {
          throw bad(
            `Storage[${i}] Type`,
            image.type,
            root
              ? '"Compressed" or "Plain"'
              : '"Compressed" (a snapshot over a parent is an expanding image)',
          );
        }
        const file = await options.resolveFile(image.file, source.name);
        const inner = image.type === "Plain"
          ? file
          : await openParallels(file, { format: FORMAT }).catch(
            async (e) => {
              await file.close?.();
              throw e;
            },
          );
        layers.push(inner);
        if (inner.size < length) {
          throw bad(
            `Storage[${i}] File`,
            `${image.file}: ${inner.size} bytes`,
            `at least the storage's ${length} bytes`,
          );
        }
      }
      // Stacked: each image's unallocated clusters read its parent's.
      let below: Storage["image"] = layers[layers.length - 1];
      for (let d = layers.length - 2; d >= 0; d--) {
        below = overlay(layers[d] as Image, below);
      }
      stored.image = below;
    }
    if (expected !== diskSectors) {
      throw bad(
        "Storage",
        `storages end at sector ${expected}`,
        `to cover Disk_size (${diskSectors} sectors)`,
      );
    }
  } catch (e) {
    await closeAll(opened);
    throw e;
  }
  const size = diskSectors * SECTOR;

  /** The storages overlapping [offset, offset + length), with the part of each. */
  function* parts(offset: number, length: number) {
    for (const s of opened) {
      const from = Math.max(offset, s.start);
      const to = Math.min(offset + length, s.end);
      if (from < to) yield { s, from, to };
    }
  }

  return {
    format: FORMAT,
    size,
    name: source.name,
    encrypted: false,
    details: {
      subformat: "bundle",
      storages: opened.length,
      ...(chain.length ? { snapshot: chain[0], chain } : {}),
      ...(top && chain[0] !== top ? { top } : {}),
      ...(shots.length > 1
        ? {
          snapshots: shots.map((s) => ({ guid: s.guid, parent: s.parent })),
        }
        : {}),
    },
    async read(offset, length) {
      checkRange(size, offset, length);
      const out = new Uint8Array(length);
      for (const { s, from, to } of parts(offset, length)) {
        out.set(await s.image.read(from - s.start, to - from), from - offset);
      }
      return out;
    },
    async *extents(offset, length): AsyncIterable<Extent> {
      checkRange(size, offset, length);
      for (const { s, from, to } of parts(offset, length)) {
        for await (const e of extentsOf(s.image, from - s.start, to - from)) {
          yield { ...e, offset: e.offset + s.start };
        }
      }
    },
    async close() {
      await closeAll(opened);
      await source.close?.();
    },
  };
}

/**
 * The parallels driver: expanding images of Parallels Desktop and
 * Virtuozzo (both signatures), and DiskDescriptor.xml bundles, read-only.
 *
 * @example
 * ```ts
 * import { parallels } from "../mod.ts";
 * const head = new TextEncoder().encode("WithouFreSpacExt");
 * console.log(parallels.probe({ head, tail: head, size: 16 })); // 100
 * ```
 */
export const parallels: Driver = {
  name: FORMAT,
  description:
    "Parallels expanding disk image or DiskDescriptor.xml bundle (read-only)",
  probe: probeParallels,
  open: openParallels,
};
