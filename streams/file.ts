/**
 * The file adapter: sources and sinks over host files. This is the one module
 * of `streams/` that uses `Deno.*`; it is not browser compatible and is not
 * part of the bundle for browsers.
 *
 * @module
 */

import { checkRange, type Sink, type Source } from "./types.ts";

/** A file opened for reading and, when asked, writing at random offsets. */
export interface FileHandle extends Source, Sink {
  /** Closes the file. */
  close(): Promise<void>;
  /** The path it was opened from. */
  readonly path: string;
  /** Size on disk in bytes of allocated blocks (`actual-size`), when the OS says. */
  allocatedBytes(): Promise<number | undefined>;
}

/** Options for {@linkcode fromFile}. */
export interface FileOptions {
  /** Open for writing too. @default false */
  write?: boolean;
}

/**
 * Opens a host file as a Source (and a Sink when `write` is set). Reads and
 * writes are serialised on the handle, since Deno files have one position.
 *
 * @param path the file's path
 * @param options open for writing
 * @returns a FileHandle; close it when done
 *
 * @example
 * ```ts ignore
 * import { fromFile, open } from "./mod.ts";
 * const image = await open(await fromFile("disk.qcow"));
 * console.log(image.format, image.size);
 * ```
 */
export async function fromFile(
  path: string,
  options: FileOptions = {},
): Promise<FileHandle> {
  const file = await Deno.open(path, {
    read: true,
    write: options.write === true,
  });
  let size: number;
  try {
    const stat = await file.stat();
    if (stat.isDirectory) throw new Deno.errors.IsADirectory(path);
    size = stat.size;
  } catch (e) {
    file.close();
    throw e;
  }
  return handle(file, path, size, options.write === true);
}

function handle(
  file: Deno.FsFile,
  path: string,
  initialSize: number,
  writable: boolean,
): FileHandle {
  let size = initialSize;
  // One position per Deno file: seek+read must not interleave.
  let queue: Promise<unknown> = Promise.resolve();
  const serial = <T>(task: () => Promise<T>): Promise<T> => {
    const next = queue.then(task, task);
    queue = next.catch(() => {});
    return next;
  };
  let closed = false;
  const self: FileHandle = {
    path,
    name: path,
    get size() {
      return size;
    },
    read(offset, length) {
      checkRange(size, offset, length);
      return serial(async () => {
        const out = new Uint8Array(length);
        await file.seek(offset, Deno.SeekMode.Start);
        let at = 0;
        while (at < length) {
          const n = await file.read(out.subarray(at));
          if (n === null) {
            throw new RangeError(`${path}: file ended at ${offset + at}`);
          }
          at += n;
        }
        return out;
      });
    },
    write(offset, bytes) {
      if (!writable) {
        return Promise.reject(new Error(`${path} is open read-only`));
      }
      return serial(async () => {
        await file.seek(offset, Deno.SeekMode.Start);
        let at = 0;
        while (at < bytes.length) at += await file.write(bytes.subarray(at));
        size = Math.max(size, offset + bytes.length);
      });
    },
    resize(newSize) {
      return serial(async () => {
        await file.truncate(newSize);
        size = newSize;
      });
    },
    flush() {
      return writable ? serial(() => file.syncData()) : Promise.resolve();
    },
    async close() {
      if (closed) return;
      closed = true;
      await serial(() => Promise.resolve());
      file.close();
    },
    async allocatedBytes() {
      const stat = await file.stat();
      return stat.blocks === null ? undefined : stat.blocks * 512;
    },
  };
  return self;
}

/** A file being written under a temporary name, renamed when complete. */
export interface OutputFile extends FileHandle {
  /** The final path. */
  readonly finalPath: string;
  /** Flushes, closes and renames the file to its final path. */
  commit(): Promise<void>;
  /** Closes and removes the temporary file. */
  abort(): Promise<void>;
}

/**
 * Creates an output file that lives under a temporary name in the same
 * folder (`.NAME.partial-XXXXXX`) until `commit()` renames it, so that an
 * interrupted run never leaves a finished-looking file. Zero runs that are
 * never written stay holes (the file is sparse).
 *
 * @param path the final path
 * @returns an OutputFile; call `commit()` or `abort()`
 *
 * @example
 * ```ts ignore
 * import { createOutputFile } from "./mod.ts";
 * const out = await createOutputFile("disk.raw");
 * await out.write(0, new Uint8Array(512));
 * await out.commit();
 * ```
 */
export async function createOutputFile(path: string): Promise<OutputFile> {
  const slash = path.lastIndexOf("/");
  const dir = slash >= 0 ? path.slice(0, slash + 1) : "";
  const base = path.slice(slash + 1);
  const suffix = crypto.getRandomValues(new Uint32Array(1))[0].toString(36);
  const temp = `${dir}.${base}.partial-${suffix}`;
  const file = await Deno.open(temp, {
    read: true,
    write: true,
    createNew: true,
  });
  const inner = handle(file, temp, 0, true);
  let done = false;
  return {
    ...inner,
    get size() {
      return inner.size;
    },
    finalPath: path,
    async commit() {
      if (done) return;
      done = true;
      await inner.flush();
      await inner.close();
      await Deno.rename(temp, path);
    },
    async abort() {
      if (done) return;
      done = true;
      await inner.close().catch(() => {});
      await Deno.remove(temp).catch(() => {});
    },
  };
}
