/**
 * Plumbing the writable drivers share: writes serialised through a queue,
 * and a sink read back as the source of the image it was created as.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { UnsupportedError } from "../streams/errors.ts";
import type { Image, OpenOptions, Sink, Source } from "../streams/types.ts";

/**
 * The sink an open writes through: `options.sink` when the open is
 * writable, else undefined.
 *
 * @param options the open's options
 * @param format the driver's name, for the error
 * @returns the sink, or undefined for a read-only open
 * @throws {Error} when a writable open has no sink
 *
 * @example
 * ```ts
 * import { writeSink } from "./_image.ts";
 * import { memorySink } from "../mod.ts";
 * console.log(writeSink({}, "qcow")); // undefined
 * console.log(writeSink({ writable: true, sink: memorySink() }, "qcow") !== undefined); // true
 * ```
 */
export function writeSink(
  options: OpenOptions,
  format: string,
): Sink | undefined {
  if (!options.writable) return undefined;
  if (!options.sink) throw new Error(`${format}: a writable open needs a sink`);
  return options.sink;
}

/** Where an open image keeps its queue of writes (shared by its views). */
export interface WriteQueue {
  /** Settles when the last queued write has. */
  writing: Promise<unknown>;
}

/**
 * An image's `write` and `flush` over `write`, run one at a time in the
 * order they were called (allocation must not interleave); a failed write
 * rejects its own call and does not stop the ones after it. `flush` waits
 * for the queued writes, then flushes `sink`.
 *
 * @param queue holds the queue (views of one image share it)
 * @param sink flushed by `flush`
 * @param write one write, run when the ones before it have settled
 * @returns `write` and `flush`, to set on the image
 *
 * @example
 * ```ts
 * import { serializedWrites } from "./_image.ts";
 * import { memorySink } from "../mod.ts";
 * const order: number[] = [];
 * const { write, flush } = serializedWrites(
 *   { writing: Promise.resolve() },
 *   memorySink(),
 *   async (offset) => {
 *     await new Promise((r) => setTimeout(r, offset === 0 ? 5 : 0));
 *     order.push(offset);
 *   },
 * );
 * write(0, new Uint8Array(1));
 * write(1, new Uint8Array(1));
 * await flush();
 * console.log(order); // [0, 1]
 * ```
 */
export function serializedWrites(
  queue: WriteQueue,
  sink: Sink,
  write: (offset: number, bytes: Uint8Array) => Promise<void>,
): Required<Pick<Image, "write" | "flush">> {
  return {
    write(offset, bytes) {
      const next = queue.writing.then(() => write(offset, bytes));
      queue.writing = next.catch(() => {});
      return next;
    },
    async flush() {
      await queue.writing;
      await sink.flush();
    },
  };
}

/**
 * Refuses a sequential sink (a stream) for a format whose files are
 * written at random offsets.
 *
 * @param sink the sink to create on
 * @param format the driver's name, for the error
 * @param what the format's files in the plural ("qcow images")
 * @throws {UnsupportedError} when `sink` is sequential
 *
 * @example
 * ```ts
 * import { requireRandomAccess } from "./_image.ts";
 * import { memorySink } from "../mod.ts";
 * requireRandomAccess(memorySink(), "qcow", "qcow images"); // no error
 * ```
 */
export function requireRandomAccess(
  sink: Sink,
  format: string,
  what: string,
): void {
  if (sink.sequential) {
    throw new UnsupportedError(
      { format },
      `${what} are written at random offsets; a sequential sink (a stream) cannot hold one`,
    );
  }
}

/**
 * `sink` read back as a Source, to open the image just created on it. Its
 * size is the sink's own where the sink knows it, else `fallbackSize()`.
 *
 * @param sink a sink that can read (a file or memory sink)
 * @param format the driver's name, for the error
 * @param fallbackSize the size when the sink has none
 * @returns a Source over what the sink holds
 * @throws {UnsupportedError} when the sink cannot read
 *
 * @example
 * ```ts
 * import { readBackSource } from "./_image.ts";
 * import { memorySink } from "../mod.ts";
 * const sink = memorySink();
 * await sink.write(0, new Uint8Array([1, 2, 3]));
 * const source = readBackSource(sink, "qcow", () => 0);
 * console.log(source.size, await source.read(1, 2)); // 3 Uint8Array(2) [ 2, 3 ]
 * ```
 */
export function readBackSource(
  sink: Sink,
  format: string,
  fallbackSize: () => number,
): Source {
  const readable = sink as Partial<Source>;
  if (typeof readable.read !== "function") {
    throw new UnsupportedError(
      { format },
      `${format} needs a sink it can read back (a file or memory sink)`,
    );
  }
  return {
    get size() {
      const s = (sink as { size?: number }).size;
      return typeof s === "number" ? s : fallbackSize();
    },
    name: sink.name,
    read: (offset, length) => readable.read!(offset, length),
  };
}
