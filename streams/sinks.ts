/**
 * Sinks in memory and over a `WritableStream`.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { checkRange, type Sink, type Source } from "./types.ts";
import { fromBytes } from "./sources.ts";

/** A sink that keeps what is written in memory; it reads back as a Source too. */
export interface MemorySink extends Sink, Source {
  /** Bytes written so far (the high-water mark, or the last `resize`). */
  readonly size: number;
  /** Releases nothing: memory sinks hold no handles. */
  close(): Promise<void>;
  /** The bytes written so far (a view: valid until the next write). */
  bytes(): Uint8Array;
  /** A Source over the bytes written so far. */
  source(): Source;
}

/**
 * A growable in-memory sink, for tests, browsers and small images.
 *
 * @param initial bytes to start from (copied)
 * @returns a MemorySink
 *
 * @example
 * ```ts
 * import { memorySink } from "../mod.ts";
 * const sink = memorySink();
 * await sink.write(4, new Uint8Array([9]));
 * console.log(sink.bytes()); // Uint8Array [0, 0, 0, 0, 9]
 * ```
 */
export function memorySink(initial?: Uint8Array): MemorySink {
  let buffer = new Uint8Array(Math.max(4096, initial?.length ?? 0));
  let length = 0;
  if (initial) {
    buffer.set(initial);
    length = initial.length;
  }
  const grow = (size: number) => {
    if (size > buffer.length) {
      const next = new Uint8Array(Math.max(size, buffer.length * 2));
      next.set(buffer.subarray(0, length));
      buffer = next;
    }
  };
  return {
    get size() {
      return length;
    },
    read(offset, n) {
      checkRange(length, offset, n);
      return Promise.resolve(buffer.slice(offset, offset + n));
    },
    write(offset, bytes) {
      grow(offset + bytes.length);
      buffer.set(bytes, offset);
      length = Math.max(length, offset + bytes.length);
      return Promise.resolve();
    },
    resize(size) {
      grow(size);
      if (size < length) buffer.fill(0, size, length);
      length = size;
      return Promise.resolve();
    },
    flush: () => Promise.resolve(),
    close: () => Promise.resolve(),
    bytes: () => buffer.subarray(0, length),
    source: () => fromBytes(buffer.subarray(0, length)),
  };
}

/**
 * A sequential sink over a `WritableStream` (stdout, an upload, a
 * `TransformStream`). Writes must come in increasing order; gaps are filled
 * with zeros, and `resize` pads the end.
 *
 * @param stream where the bytes go
 * @param name a name for messages
 * @returns a sequential Sink
 *
 * @example
 * ```ts
 * import { streamSink } from "../mod.ts";
 * const chunks: Uint8Array[] = [];
 * const sink = streamSink(new WritableStream({ write(c) { chunks.push(c); } }));
 * await sink.write(2, new Uint8Array([7]));
 * await sink.close();
 * console.log(chunks.length > 0); // true
 * ```
 */
export function streamSink(
  stream: WritableStream<Uint8Array>,
  name?: string,
): Sink {
  const writer = stream.getWriter();
  let position = 0;
  const zeros = new Uint8Array(1 << 20);
  const pad = async (to: number) => {
    while (position < to) {
      const n = Math.min(zeros.length, to - position);
      // A fresh copy per chunk: a consumer may transfer or keep what it gets.
      await writer.write(zeros.slice(0, n));
      position += n;
    }
  };
  return {
    sequential: true,
    name,
    async write(offset, bytes) {
      if (offset < position) {
        throw new RangeError(
          `stream sink: write at ${offset} is behind the stream position ${position}`,
        );
      }
      await pad(offset);
      if (bytes.length) await writer.write(bytes);
      position += bytes.length;
    },
    async resize(size) {
      if (size < position) {
        throw new RangeError(
          `stream sink: cannot shrink to ${size}, ${position} bytes already written`,
        );
      }
      await pad(size);
    },
    flush: () => Promise.resolve(),
    async close() {
      await writer.close();
    },
  };
}
