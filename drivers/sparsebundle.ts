/**
 * sparsebundle: Apple's sparse bundle disk images (UDSB, `.sparsebundle`
 * folders; Time Machine's network backups), read-only.
 *
 * This module is browser compatible.
 *
 * A bundle is a folder, as libyal's libmodi documentation describes it:
 *
 * | entry        | what it holds                                             |
 * | ------------ | --------------------------------------------------------- |
 * | `Info.plist` | an XML property list: `diskimage-bundle-type` `com.apple.diskimage.sparsebundle`, `bundle-backingstore-version` 1, `band-size` (bytes per band file), `size` (the disk's bytes) |
 * | `Info.bckup` | a copy of `Info.plist`                                    |
 * | `token`      | empty (an encrypted bundle keeps its `encrcdsa` header here) |
 * | `bands/`     | band `n` of the disk in the file named `n` in hexadecimal (`0`, `9`, `a`, `10`, ...) |
 *
 * A band file missing, or shorter than `band-size`, reads as zeros past
 * its end: bands never written are not stored, and the last band is only
 * as long as the disk. Missing bands are `zero` runs in the allocation map.
 *
 * The bundle is read through a {@linkcode Tree}: `directoryTree(path)` on
 * the command line and in Deno, `memoryTree({ "Info.plist": file, "bands/0":
 * file, ... })` in browsers and workers (the Files of a dropped folder,
 * with the bundle's own folder name taken off their paths).
 *
 * @module
 */

import { formatErrors } from "./_binary.ts";
import { bandReader, nextPresent } from "./_bands.ts";
import { parsePlist, type PlistValue } from "./dmg/_plist.ts";
import { ImageFormatError, UnsupportedError } from "../streams/errors.ts";
import type {
  Driver,
  Image,
  ProbeInput,
  Source,
  Tree,
  TreeEntry,
} from "../streams/types.ts";

const FORMAT = "sparsebundle";
const BUNDLE_TYPE = "com.apple.diskimage.sparsebundle";
/** Info.plist files are a few hundred bytes; more is not a bundle's. */
const MAX_PLIST = 64 << 10;
/**
 * The largest band accepted: 4 GiB (Time Machine's bundles of macOS 26 use
 * bands near 1 GiB). Bands are read in slices; this bounds no buffer.
 */
const MAX_BAND = 2 ** 32;
/** The most band files a bundle may list (a 16 TiB disk in 8 MiB bands is 2M). */
const MAX_BANDS_LISTED = 1 << 24;

const fail = formatErrors(FORMAT);

/** What Info.plist says. */
interface BundleInfo {
  bandSize: number;
  size: number;
  version: number;
}

/** Reads Info.plist's fields, each checked. */
function parseInfo(bytes: Uint8Array, file: string): BundleInfo {
  let plist: PlistValue;
  try {
    plist = parsePlist(new TextDecoder().decode(bytes), 0, file);
  } catch (e) {
    if (!(e instanceof ImageFormatError)) throw e;
    throw new ImageFormatError(
      { format: FORMAT, field: "Info.plist", file },
      e.message.replace(/^dmg: /, "Info.plist: "),
    );
  }
  if (!(plist instanceof Map)) {
    throw fail("Info.plist", typeof plist, "a dictionary", undefined, file);
  }
  const type = plist.get("diskimage-bundle-type");
  if (type !== BUNDLE_TYPE) {
    throw fail(
      "diskimage-bundle-type",
      typeof type === "string" ? type : String(type),
      JSON.stringify(BUNDLE_TYPE),
      undefined,
      file,
    );
  }
  const integer = (key: string, min: number, max: number): number => {
    const value = plist.get(key);
    // Integers are <integer>; some writers store them as <string>.
    const n = typeof value === "bigint"
      ? value
      : typeof value === "string" && /^\d{1,20}$/.test(value.trim())
      ? BigInt(value.trim())
      : undefined;
    if (n === undefined || n < BigInt(min) || n > BigInt(max)) {
      throw fail(
        key,
        typeof value === "bigint" ? value : String(value),
        `an integer from ${min} to ${max}`,
        undefined,
        file,
      );
    }
    return Number(n);
  };
  const version = integer("bundle-backingstore-version", 0, 2 ** 31);
  if (version !== 1) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "bundle-backingstore-version",
        value: version,
        file,
      },
      `bundle-backingstore-version ${version} is not the one described (1)${
        version === 2
          ? ": version 2 bundles (with a mapped/ folder) have no public description"
          : ""
      }`,
    );
  }
  return {
    version,
    bandSize: integer("band-size", 512, MAX_BAND),
    size: integer("size", 0, Number.MAX_SAFE_INTEGER),
  };
}

/** Options for {@linkcode openSparsebundle}. */
export interface SparsebundleOptions {
  /** A name for messages. @default the tree's name */
  name?: string;
}

/**
 * Opens a sparse bundle held in `tree` (its root is the bundle's folder)
 * as a read-only image.
 *
 * @param tree the bundle's folder: `Info.plist`, `token`, `bands/`
 * @param options a name for messages
 * @returns the disk image
 * @throws {ImageFormatError} for a missing or malformed `Info.plist`, a
 *   missing `bands` folder, a band file longer than `band-size` or named
 *   twice
 * @throws {UnsupportedError} for an encrypted bundle or a backing store
 *   version other than 1
 *
 * @example
 * ```ts
 * import { memoryTree, openSparsebundle } from "../mod.ts";
 * const info = `<?xml version="1.0" encoding="UTF-8"?>
 * <plist version="1.0"><dict>
 * <key>CFBundleInfoDictionaryVersion</key><string>6.0</string>
 * <key>band-size</key><integer>4096</integer>
 * <key>bundle-backingstore-version</key><integer>1</integer>
 * <key>diskimage-bundle-type</key><string>com.apple.diskimage.sparsebundle</string>
 * <key>size</key><integer>8192</integer>
 * </dict></plist>`;
 * const disk = await openSparsebundle(memoryTree({
 *   "Info.plist": new TextEncoder().encode(info),
 *   "token": new Uint8Array(0),
 *   "bands/1": new Uint8Array([1, 2, 3]),
 * }));
 * console.log(disk.size, await disk.read(4096, 4)); // 8192 Uint8Array(4) [ 1, 2, 3, 0 ]
 * ```
 */
export async function openSparsebundle(
  tree: Tree,
  options: SparsebundleOptions = {},
): Promise<Image> {
  const name = options.name ?? tree.name;
  const top = await tree.list("");
  const entry = (n: string) => top.find((e) => e.name === n);
  const infoEntry = entry("Info.plist");
  if (!infoEntry || infoEntry.kind !== "file") {
    throw new ImageFormatError(
      { format: FORMAT, field: "Info.plist", file: name },
      `${name ?? "the bundle"} has no Info.plist: not a sparse bundle`,
    );
  }
  if (infoEntry.size > MAX_PLIST) {
    throw fail(
      "Info.plist size",
      infoEntry.size,
      `at most ${MAX_PLIST} bytes`,
      undefined,
      name,
    );
  }
  const info = parseInfo(
    await tree.read("Info.plist", 0, infoEntry.size),
    `${name}/Info.plist`,
  );
  const token = entry("token");
  if (token?.kind === "file" && token.size >= 8) {
    const head = new TextDecoder().decode(await tree.read("token", 0, 8));
    if (head === "encrcdsa") {
      throw new UnsupportedError(
        { format: FORMAT, field: "token", value: head, file: name },
        "this sparse bundle is encrypted (its token holds an encrcdsa header): encrypted bundles are not read yet",
      );
    }
  }
  const bandsFolder = entry("bands");
  if (!bandsFolder || bandsFolder.kind !== "dir") {
    throw new ImageFormatError(
      { format: FORMAT, field: "bands", file: name },
      `${name ?? "the bundle"} has no bands folder`,
    );
  }
  const { bandSize, size } = info;
  const bandCount = Math.ceil(size / bandSize);
  const listed = await tree.list("bands");
  if (listed.length > MAX_BANDS_LISTED) {
    throw fail(
      "bands",
      listed.length,
      `at most ${MAX_BANDS_LISTED} files`,
      undefined,
      name,
    );
  }
  /** Each band's file, by band number. */
  const bands = new Map<number, TreeEntry>();
  let beyond = 0;
  let ignored = 0;
  for (const e of listed) {
    if (e.kind !== "file" || !/^[0-9a-fA-F]{1,13}$/.test(e.name)) {
      ignored++; // .DS_Store and the like
      continue;
    }
    const band = parseInt(e.name, 16);
    if (band >= bandCount) {
      beyond++; // past the disk's end (left by a shrink): not part of it
      continue;
    }
    if (e.size > bandSize) {
      throw fail(
        `bands/${e.name} size`,
        e.size,
        `at most band-size ${bandSize}`,
        undefined,
        name,
      );
    }
    const twin = bands.get(band);
    if (twin) {
      throw fail(
        `bands/${e.name}`,
        e.name,
        `the only file of band ${band} (bands/${twin.name} is too)`,
        undefined,
        name,
      );
    }
    if (e.size > 0) bands.set(band, e);
  }
  const present = [...bands.keys()].sort((a, b) => a - b);

  const reader = bandReader({
    size,
    bandSize,
    hole: "zero",
    place(band) {
      const file = bands.get(band);
      if (!file) return { holeUntil: nextPresent(present, band, bandCount) };
      return {
        async read(at, into) {
          const stored = Math.max(0, Math.min(into.length, file.size - at));
          if (stored > 0) {
            into.set(await tree.read(`bands/${file.name}`, at, stored));
          }
          into.fill(0, stored);
        },
      };
    },
  });

  return {
    format: FORMAT,
    size,
    name,
    encrypted: false,
    details: {
      bandSize,
      bands: bandCount,
      bandsPresent: bands.size,
      backingStoreVersion: info.version,
      ...(beyond ? { bandsPastTheEnd: beyond } : {}),
      ...(ignored ? { otherFiles: ignored } : {}),
    },
    ...reader,
  };
}

/** True when `head` looks like a sparse bundle's Info.plist. */
function isBundlePlist(head: Uint8Array): boolean {
  const text = new TextDecoder().decode(head.subarray(0, 4096));
  return text.includes("<plist") && text.includes(BUNDLE_TYPE);
}

/**
 * The sparsebundle driver: it recognises a bundle's `Info.plist` by its
 * bundle type. A bundle is a folder, not one file: open it with
 * {@linkcode openSparsebundle} (the CLI does, given the `.sparsebundle`
 * folder); opening the plist alone says so.
 *
 * @example
 * ```ts
 * import { sparsebundle } from "../mod.ts";
 * const head = new TextEncoder().encode(
 *   "<plist><dict><key>diskimage-bundle-type</key><string>com.apple.diskimage.sparsebundle</string></dict></plist>",
 * );
 * console.log(sparsebundle.probe({ head, tail: head, size: head.length })); // 100
 * ```
 */
export const sparsebundle: Driver = {
  name: FORMAT,
  description: "Apple sparse bundle (.sparsebundle folder; read-only)",
  probe(input: ProbeInput): number {
    return isBundlePlist(input.head) ? 100 : 0;
  },
  open(source: Source): Promise<Image> {
    return Promise.reject(
      new UnsupportedError(
        { format: FORMAT, file: source.name },
        "this is a sparse bundle's Info.plist: a bundle is a folder; open the .sparsebundle folder itself (the CLI takes the folder; the API has openSparsebundle(tree))",
      ),
    );
  },
};
