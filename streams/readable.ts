/**
 * `readable(image)`: the whole virtual disk as a `ReadableStream`.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { extentsOf, type Source } from "./types.ts";

/** Options for {@linkcode readable}. */
export interface ReadableOptions {
  /** Bytes per chunk. @default 1048576 */
  chunkSize?: number;
  /** First byte. @default 0 */
  start?: number;
  /** One past the last byte. @default source.size */
  end?: number;
  /** Cancels the stream. */
  signal?: AbortSignal;
  /**
   * Chunks read ahead of the one the consumer waits for, so a source that
   * decodes on workers or fetches over the network is never idle between
   * two pulls (one read at a time left a browser's decode workers idle a
   * third of the time). Memory: `chunkSize * (readAhead + 1)`.
   * @default 3
   */
  readAhead?: number;
}

/**
 * Streams `[start, end)` of a source (an image: the virtual disk) in order.
 * Zero and unallocated runs are produced as zero chunks without reading.
 *
 * @param source the image or source
 * @param options chunk size, range, signal
 * @returns a byte stream
 *
 * @example
 * ```ts
 * import { fromBytes, open, readable } from "../mod.ts";
 * const image = await open(fromBytes(new Uint8Array(10000)));
 * let total = 0;
 * for await (const chunk of readable(image)) total += chunk.length;
 * console.log(total); // 10000
 * ```
 */
export function readable(
  source: Source,
  options: ReadableOptions = {},
): ReadableStream<Uint8Array> {
  const chunkSize = options.chunkSize ?? 1 << 20;
  const ahead = Math.max(0, options.readAhead ?? 3);
  const end = options.end ?? source.size;
  /** The first byte not yet asked for. */
  let next = options.start ?? 0;
  let runs:
    | AsyncIterator<{ offset: number; length: number; kind: string }>
    | undefined;
  let run: { offset: number; length: number; kind: string } | undefined;
  /** Chunks asked for, in order, not yet handed to the consumer. */
  const queue: Promise<Uint8Array>[] = [];
  /** Asks for the next chunk; false at the end. */
  const request = async (): Promise<boolean> => {
    if (next >= end) return false;
    runs ??= extentsOf(source, next, end - next)[Symbol.asyncIterator]();
    while (!run || run.offset + run.length <= next) {
      const step = await runs.next();
      if (step.done) throw new Error("allocation map ended early");
      run = step.value;
    }
    const n = Math.min(chunkSize, run.offset + run.length - next, end - next);
    // Unallocated runs left at the top of a chain have nothing below them.
    const chunk = run.kind === "data"
      ? source.read(next, n)
      : Promise.resolve(new Uint8Array(n));
    chunk.catch(() => {}); // awaited in order by pull, which reports it
    queue.push(chunk);
    next += n;
    return true;
  };
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      options.signal?.throwIfAborted();
      while (queue.length <= ahead && await request()) { /* ask ahead */ }
      const chunk = queue.shift();
      if (!chunk) {
        controller.close();
        return;
      }
      controller.enqueue(await chunk);
    },
  }, { highWaterMark: 2 });
}
