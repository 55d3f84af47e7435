/**
 * A {@linkcode Tree} held in memory: names mapped to bytes or Blobs (the
 * files of a dropped folder, in a browser). It is what the vvfat driver
 * presents as a disk where there is no host folder to read.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { TreeError } from "./errors.ts";
import { checkRange, type Tree, type TreeEntry } from "./types.ts";

/** What a path of a {@linkcode memoryTree} holds: bytes, a Blob (or File), or `null` for an empty folder. */
export type MemoryTreeValue = Uint8Array | Blob | null;

/** Options for {@linkcode memoryTree}. */
export interface MemoryTreeOptions {
  /**
   * Modification time of every file and folder, in milliseconds since 1970
   * (a `File`'s own `lastModified` wins for that file).
   * @default Date.UTC(1980, 0, 1), the FAT epoch
   */
  mtime?: number;
  /** A name for messages. @default "(memory)" */
  name?: string;
}

interface MemoryFolder {
  entries: Map<string, MemoryFolder | MemoryFile>;
}

interface MemoryFile {
  data: Uint8Array | Blob;
  mtime: number;
}

function isFolder(item: MemoryFolder | MemoryFile): item is MemoryFolder {
  return "entries" in item;
}

/**
 * A tree of folders and files in memory. Keys are paths with `/` between
 * names (`"docs/guide.txt"`); folders are made as paths need them, and a key
 * ending in `/` with the value `null` is an empty folder (`"empty/"`).
 * Contents are not copied: a Blob is read (sliced) only when the bytes are
 * asked for.
 *
 * @param files paths and their contents
 * @param options the modification time to report
 * @returns the tree
 * @throws {TreeError} for an empty name, `.` or `..` in a path, or a path
 *   that is both a file and a folder
 *
 * @example
 * ```ts
 * import { memoryTree } from "../mod.ts";
 * const tree = memoryTree({
 *   "readme.txt": new TextEncoder().encode("hello"),
 *   "docs/guide.txt": new Blob(["a guide"]),
 *   "empty/": null,
 * });
 * console.log((await tree.list("")).map((e) => `${e.kind} ${e.name}`));
 * // [ "file readme.txt", "dir docs", "dir empty" ]
 * console.log(new TextDecoder().decode(await tree.read("docs/guide.txt", 2, 5))); // guide
 * ```
 */
export function memoryTree(
  files: Record<string, MemoryTreeValue>,
  options: MemoryTreeOptions = {},
): Tree {
  const mtime = options.mtime ?? Date.UTC(1980, 0, 1);
  const root: MemoryFolder = { entries: new Map() };
  for (const [path, value] of Object.entries(files)) {
    const names = path.split("/");
    const folderOnly = names[names.length - 1] === "";
    if (folderOnly) names.pop();
    if (folderOnly && value !== null) {
      throw new TreeError(
        "a path ending in / names a folder: its value must be null",
        path,
      );
    }
    if (!folderOnly && value === null) {
      throw new TreeError(
        "null names an empty folder: end the path with /",
        path,
      );
    }
    let folder = root;
    names.forEach((name, i) => {
      if (name === "" || name === "." || name === "..") {
        throw new TreeError(
          `the name "${name}" is not allowed in a path`,
          path,
        );
      }
      const last = i === names.length - 1;
      const existing = folder.entries.get(name);
      if (last && !folderOnly) {
        if (existing) {
          throw new TreeError("given twice, or both a file and a folder", path);
        }
        folder.entries.set(name, {
          data: value!,
          mtime: value instanceof File ? value.lastModified : mtime,
        });
        return;
      }
      if (existing && !isFolder(existing)) {
        throw new TreeError(
          `${names.slice(0, i + 1).join("/")} is a file, not a folder`,
          path,
        );
      }
      const next = existing ?? { entries: new Map() };
      folder.entries.set(name, next);
      folder = next;
    });
  }

  const find = (path: string) => {
    let item: MemoryFolder | MemoryFile = root;
    for (const name of path === "" ? [] : path.split("/")) {
      const next: MemoryFolder | MemoryFile | undefined = isFolder(item)
        ? item.entries.get(name)
        : undefined;
      if (!next) throw new TreeError("not in the tree", path);
      item = next;
    }
    return item;
  };

  return {
    name: options.name ?? "(memory)",
    list(path) {
      try {
        const folder = find(path);
        if (!isFolder(folder)) throw new TreeError("not a folder", path);
        const out: TreeEntry[] = [];
        for (const [name, item] of folder.entries) {
          out.push(
            isFolder(item) ? { name, kind: "dir", size: 0, mtime } : {
              name,
              kind: "file",
              size: item.data instanceof Blob
                ? item.data.size
                : item.data.length,
              mtime: item.mtime,
            },
          );
        }
        return Promise.resolve(out);
      } catch (e) {
        return Promise.reject(e);
      }
    },
    async read(path, offset, length) {
      const file = find(path);
      if (isFolder(file)) throw new TreeError("a folder, not a file", path);
      const { data } = file;
      if (data instanceof Blob) {
        checkRange(data.size, offset, length);
        return new Uint8Array(
          await data.slice(offset, offset + length).arrayBuffer(),
        );
      }
      checkRange(data.length, offset, length);
      return data.slice(offset, offset + length);
    },
  };
}
