/**
 * `measure(image | size, options)`: the file sizes an output format needs
 * (`qemu-img measure`), found by writing the image.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { loadDriver } from "../drivers/_catalog.ts";
import { convert } from "./convert.ts";
import { checkWriteOptions } from "./options.ts";
import { checkRange, type Extent, type Sink, type Source } from "./types.ts";

/** Options for {@linkcode measure}. */
export interface MeasureOptions {
  /** The output format (`-O`). @default "raw" */
  format?: string;
  /** Its options (`-o`). */
  options?: Record<string, string>;
  /**
   * The most bytes of non-zero pages held in memory while writing (the
   * fully allocated image of a large size): past it measure fails with a
   * RangeError instead of taking the memory. @default 268435456
   */
  memoryLimit?: number;
  /** Stops the work. */
  signal?: AbortSignal;
}

/** What {@linkcode measure} finds (qemu-img's `required` and `fully-allocated`). */
export interface Measurement {
  /** Bytes of the output file for this image (for a size: an empty image). */
  required: number;
  /** Bytes of the output file when every byte of the disk holds data. */
  fullyAllocated: number;
  /**
   * Bytes of the input's persistent bitmaps, where qemu-img reports them
   * (a qcow2 input measured for qcow2 compat 1.1).
   */
  bitmaps?: number;
}

const PAGE = 65536;

/**
 * A sink that keeps non-zero 64 KiB pages in memory and reads back what
 * was written (drivers read their tables back), up to `limit` bytes.
 */
function pageSink(limit: number): Sink & Source {
  const pages = new Map<number, Uint8Array>();
  let size = 0;
  return {
    get size() {
      return size;
    },
    read(offset, length) {
      checkRange(size, offset, length);
      const out = new Uint8Array(length);
      for (let at = offset; at < offset + length;) {
        const page = Math.floor(at / PAGE);
        const within = at - page * PAGE;
        const n = Math.min(PAGE - within, offset + length - at);
        const bytes = pages.get(page);
        if (bytes) {
          out.set(bytes.subarray(within, within + n), at - offset);
        }
        at += n;
      }
      return Promise.resolve(out);
    },
    write(offset, bytes) {
      for (let at = offset; at < offset + bytes.length;) {
        const page = Math.floor(at / PAGE);
        const within = at - page * PAGE;
        const n = Math.min(PAGE - within, offset + bytes.length - at);
        const piece = bytes.subarray(at - offset, at - offset + n);
        let stored = pages.get(page);
        if (!stored && piece.some((b) => b !== 0)) {
          if ((pages.size + 1) * PAGE > limit) {
            return Promise.reject(
              new RangeError(
                `measure holds the image it writes in memory: more than ${limit} bytes of it are not zeros (memoryLimit)`,
              ),
            );
          }
          stored = new Uint8Array(PAGE);
          pages.set(page, stored);
        }
        stored?.set(piece, within);
        at += n;
      }
      size = Math.max(size, offset + bytes.length);
      return Promise.resolve();
    },
    resize(newSize) {
      for (const page of pages.keys()) {
        if (page * PAGE >= newSize) pages.delete(page);
      }
      const last = pages.get(Math.floor(newSize / PAGE));
      last?.fill(0, newSize % PAGE);
      size = newSize;
      return Promise.resolve();
    },
    flush: () => Promise.resolve(),
    close: () => Promise.resolve(),
  };
}

/**
 * A disk of `size` bytes that all hold data: a fixed 1 MiB of
 * pseudo-random bytes, repeated (they do not deflate, so compressing
 * formats store them whole, as qemu-img counts fully allocated images).
 */
function fullDisk(size: number): Source {
  const cycle = new Uint8Array(1 << 20);
  let x = 0x9e3779b9;
  for (let i = 0; i < cycle.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    cycle[i] = x & 0xff;
  }
  const fill = (offset: number, into: Uint8Array) => {
    for (let done = 0; done < into.length;) {
      const at = (offset + done) % cycle.length;
      const n = Math.min(cycle.length - at, into.length - done);
      into.set(cycle.subarray(at, at + n), done);
      done += n;
    }
  };
  return {
    size,
    read(offset, length) {
      checkRange(size, offset, length);
      const out = new Uint8Array(length);
      fill(offset, out);
      return Promise.resolve(out);
    },
    readInto(offset, into) {
      checkRange(size, offset, into.length);
      fill(offset, into);
      return Promise.resolve();
    },
  };
}

/** A disk of `size` bytes that reads as zeros and says so. */
function emptyDisk(size: number): Source {
  return {
    size,
    read(offset, length) {
      checkRange(size, offset, length);
      return Promise.resolve(new Uint8Array(length));
    },
    async *extents(offset: number, length: number): AsyncIterable<Extent> {
      checkRange(size, offset, length);
      if (length > 0) yield { offset, length, kind: "zero" };
    },
  };
}

/**
 * The bytes an image file of `options.format` takes: `required` for
 * `source` converted to it (for a size: an empty image of that size), and
 * `fullyAllocated` for a disk of that size whose every byte holds data.
 * Formats with a formula of their own (`Driver.measure`: qcow2 as
 * qemu-img computes it; vdi, vpc and qcow their exact layouts) answer at
 * once whatever the size; otherwise both are measured by writing the
 * image (into memory, zero pages not kept), so they are exactly what
 * `convert` and `create` write, the work growing with the size. An
 * image's `required` size is always found by writing it, but for qcow2. A raw image takes its size rounded up to a sector,
 * as qemu-img says.
 *
 * @param source the image to convert, or a virtual size in bytes (`--size`)
 * @param options output format and options
 * @returns the two sizes
 *
 * @example
 * ```ts
 * import { measure } from "../mod.ts";
 * const sizes = await measure(1 << 20, { format: "qcow" });
 * console.log(sizes.required < sizes.fullyAllocated); // true
 * ```
 */
export async function measure(
  source: Source | number,
  options: MeasureOptions = {},
): Promise<Measurement> {
  const format = options.format ?? "raw";
  const out = await loadDriver(format);
  // A formula of the driver's own (it checks its options itself).
  const formula = await out.measure?.(source, options.options);
  if (formula?.required !== undefined) {
    return { ...formula, required: formula.required };
  }
  checkWriteOptions(out, options.options);
  if (!out.create && !out.encode) {
    throw new Error(`format '${format}' cannot be written`);
  }
  const size = typeof source === "number" ? source : source.size;
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new RangeError(`invalid size ${size}: a whole number of bytes`);
  }
  if (format === "raw") {
    const rounded = Math.ceil(size / 512) * 512;
    return { required: rounded, fullyAllocated: rounded };
  }
  const limit = options.memoryLimit ?? 256 << 20;
  const written = async (disk: Source) => {
    const sink = pageSink(limit);
    await convert(disk, sink, {
      format,
      options: options.options,
      signal: options.signal,
    });
    return sink.size;
  };
  // An image's required size by writing it: what convert leaves out (zero
  // runs, and clusters of zeros inside data runs) only writing shows.
  return {
    required: await written(
      typeof source === "number" ? emptyDisk(size) : source,
    ),
    fullyAllocated: formula?.fullyAllocated ?? await written(fullDisk(size)),
  };
}
