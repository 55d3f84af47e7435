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
 * An encrypted bundle (`hdiutil create -encryption -type SPARSEBUNDLE`)
 * keeps the `encrcdsa` header and its password key records (the layout in
 * `dmg/_encrcdsa.ts`) as the whole `token` file; the bands hold the disk
 * encrypted in chunks of the header's BlockSize, each AES-CBC with the IV
 * HMAC-SHA1(key, chunk number), the chunks numbered over the whole disk
 * (the chunk at byte `at` of band `n` is number `(n × band-size + at) /
 * BlockSize`) and stored from byte 0 of each band file; the header's
 * DataOffset and DataSize describe no bytes of the token and are not used.
 * As described by keramics' `sparsebundle/encrypted_block_reader.rs` (by
 * the author of libyal's libmodi) and hdimount's `EncryptReader` over its
 * `SparsebundleReader`. Missing bands and the part of a band past its
 * file's end read as zeros, as in a plain bundle.
 *
 * The bundle is read through a {@linkcode Tree}: `directoryTree(path)` on
 * the command line and in Deno, `memoryTree({ "Info.plist": file, "bands/0":
 * file, ... })` in browsers and workers (the Files of a dropped folder,
 * with the bundle's own folder name taken off their paths).
 *
 * @module
 */

import { BUNDLE_TYPE, probeSparsebundle } from "./_signatures.ts";
import { formatErrors } from "./_binary.ts";
import { bandReader, nextPresent } from "./_bands.ts";
import { parsePlist, type PlistValue } from "./dmg/_plist.ts";
import {
  type ChunkDecryptor,
  chunkDecryptor,
  describeEncryption,
  type EncryptedLayout,
  encryptedVersion,
  parseEncrypted,
  unlockKeys,
} from "./dmg/_encrcdsa.ts";
import {
  ImageFormatError,
  KeyError,
  UnsupportedError,
} from "../streams/errors.ts";
import type {
  Driver,
  Image,
  Source,
  Tree,
  TreeEntry,
} from "../streams/types.ts";

const FORMAT = "sparsebundle";
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
  /**
   * The password of an encrypted bundle (a string is taken as UTF-8). A
   * wrong one is a `KeyError`; without one an encrypted bundle opens
   * locked (its size, band map and encryption known, reads a `KeyError`).
   * Ignored for a bundle that is not encrypted.
   */
  key?: string | Uint8Array;
}

/** The encryption of a bundle whose token holds an encrcdsa header. */
interface BundleEncryption {
  layout: EncryptedLayout;
  /** What `info` shows (no keys, salts or blobs). */
  description: Record<string, unknown>;
  /** Absent while locked (no password given). */
  chunks?: ChunkDecryptor;
}

/**
 * Reads the token's encrcdsa header and unlocks it with `key`, or returns
 * undefined when the token is empty or not a header (plain bundles have an
 * empty token). The layout is checked against the bundle: band-size must
 * be whole chunks (a chunk never straddles two band files), and the
 * chunks of the disk must be numbered by 32 bits.
 */
async function bundleEncryption(
  tree: Tree,
  token: TreeEntry | undefined,
  info: BundleInfo,
  key: string | Uint8Array | undefined,
  name?: string,
): Promise<BundleEncryption | undefined> {
  if (token?.kind !== "file" || token.size < 8) return undefined;
  const head = await tree.read("token", 0, 8);
  const tail = await tree.read("token", token.size - 8, 8);
  if (!encryptedVersion(head, tail)) return undefined;
  const source: Source = {
    size: token.size,
    name: `${name ?? "the bundle"}/token`,
    read: (offset, length) => tree.read("token", offset, length),
  };
  const layout = await parseEncrypted(source, { token: true });
  const { blockSize } = layout;
  if (info.bandSize % blockSize !== 0) {
    throw fail(
      "band-size",
      info.bandSize,
      `a multiple of the token's BlockSize ${blockSize} (an encrypted chunk within one band file)`,
      undefined,
      name,
    );
  }
  if (Math.ceil(info.size / blockSize) > 2 ** 32) {
    throw fail(
      "size",
      info.size,
      `at most 2^32 chunks of the token's BlockSize ${blockSize} (chunk numbers are 32-bit)`,
      undefined,
      name,
    );
  }
  const description = describeEncryption(layout);
  delete description.data_offset; // the token's DataOffset and DataSize
  delete description.data_bytes; // describe no bytes here
  description.chunk_numbers =
    "over the whole disk: (band × band-size + offset in band) / chunk size";
  if (key === undefined) return { layout, description };
  const keys = await unlockKeys(layout, key, name);
  return { layout, description, chunks: chunkDecryptor(blockSize, keys) };
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
 * @throws {KeyError} for an encrypted bundle and a wrong password
 * @throws {UnsupportedError} for a backing store version other than 1, or
 *   an encrypted bundle unlocked only by a certificate
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
  const encryption = await bundleEncryption(
    tree,
    entry("token"),
    info,
    options.key,
    name,
  );
  const blockSize = encryption?.layout.blockSize ?? 1;
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
    if (e.size % blockSize !== 0) {
      throw fail(
        `bands/${e.name} size`,
        e.size,
        `whole encrypted chunks of ${blockSize} bytes (the token's BlockSize): a band file ending inside a chunk cannot be decrypted`,
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

  const chunks = encryption?.chunks;
  const locked = () =>
    new KeyError(
      `${FORMAT}: ${name ?? "the bundle"} is encrypted (AES-${
        encryption!.layout.keyBits
      }): give its password (--key-file FILE, or openSparsebundle(tree, { key }))`,
    );
  const reader = bandReader({
    size,
    bandSize,
    hole: "zero",
    place(band) {
      const file = bands.get(band);
      if (!file) return { holeUntil: nextPresent(present, band, bandCount) };
      const path = `bands/${file.name}`;
      if (encryption && !chunks) {
        return { read: () => Promise.reject(locked()) };
      }
      if (chunks) {
        return {
          async read(at, into) {
            // Whole chunks around the range, as far as the file holds them
            // (its size is whole chunks); past its end the band is zeros.
            const start = at - at % blockSize;
            const end = Math.min(
              file.size,
              Math.ceil((at + into.length) / blockSize) * blockSize,
            );
            const stored = Math.max(0, Math.min(into.length, end - at));
            if (stored > 0) {
              const bytes = await tree.read(path, start, end - start);
              await chunks.decrypt(
                (band * bandSize + start) / blockSize,
                bytes,
              );
              into.set(bytes.subarray(at - start, at - start + stored));
            }
            into.fill(0, stored);
          },
        };
      }
      return {
        async read(at, into) {
          const stored = Math.max(0, Math.min(into.length, file.size - at));
          if (stored > 0) into.set(await tree.read(path, at, stored));
          into.fill(0, stored);
        },
      };
    },
  });

  return {
    format: FORMAT,
    size,
    name,
    encrypted: encryption !== undefined,
    ...(encryption && !chunks
      ? {
        encryption: {
          scheme: "sparsebundle-encrcdsa",
          opensWithKey: true,
          unlock() {
            throw locked();
          },
        },
      }
      : {}),
    details: {
      ...(encryption
        ? {
          encryption: encryption.description,
          ...(chunks ? {} : { locked: "reading needs the password" }),
        }
        : {}),
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
  probe: probeSparsebundle,
  open(source: Source): Promise<Image> {
    return Promise.reject(
      new UnsupportedError(
        { format: FORMAT, file: source.name },
        "this is a sparse bundle's Info.plist: a bundle is a folder; open the .sparsebundle folder itself (the CLI takes the folder; the API has openSparsebundle(tree))",
      ),
    );
  },
};
