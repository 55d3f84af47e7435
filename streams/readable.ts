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
  const end = options.end ?? source.size;
  let position = options.start ?? 0;
  let runs:
    | AsyncIterator<{ offset: number; length: number; kind: string }>
    | undefined;
  let run: { offset: number; length: number; kind: string } | undefined;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      options.signal?.throwIfAborted();
      if (position >= end) {
        controller.close();
        return;
      }
      runs ??= extentsOf(source, position, end - position)[
        Symbol.asyncIterator
      ]();
      while (!run || run.offset + run.length <= position) {
        const next = await runs.next();
        if (next.done) throw new Error("allocation map ended early");
        run = next.value;
      }
      const n = Math.min(chunkSize, run.offset + run.length - position);
      // Unallocated runs left at the top of a chain have nothing below them.
      const chunk = run.kind === "data"
        ? await source.read(position, n)
        : new Uint8Array(n);
      position += n;
      controller.enqueue(chunk);
    },
  }, { highWaterMark: 2 });
}
