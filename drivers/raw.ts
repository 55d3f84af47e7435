/**
 * raw: the disk's bytes as they are. Probes lowest (score 1) so that any
 * other format wins, as QEMU's `find_image_format` does.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { isZero } from "./_binary.ts";
import type {
  CreateSpec,
  Driver,
  Extent,
  Image,
  OpenOptions,
  Sink,
  Source,
} from "../streams/types.ts";
import { checkRange } from "../streams/types.ts";

/** Granularity at which raw images report zero runs (a file-system block). */
const ZERO_GRANULE = 4096;
/** How much raw scans at a time for its allocation map. */
const SCAN_CHUNK = 4 << 20;

function rawImage(source: Source, sink?: Sink): Image {
  let size = source.size;
  // The last chunk the allocation map scanned: convert reads the data runs
  // of a window right after asking for its map, so keeping it saves a second
  // read of the same bytes.
  let cached: { offset: number; bytes: Uint8Array } | undefined;
  const image: Image = {
    format: "raw",
    get size() {
      return size;
    },
    name: source.name,
    encrypted: false,
    details: {},
    async read(offset, length) {
      checkRange(size, offset, length);
      if (
        cached && offset >= cached.offset &&
        offset + length <= cached.offset + cached.bytes.length
      ) {
        const at = offset - cached.offset;
        return cached.bytes.slice(at, at + length);
      }
      return await source.read(offset, length);
    },
    // Raw has no allocation metadata of its own: like QEMU asking the file
    // system for holes, it reports 4 KiB-aligned zero blocks as `zero`.
    async *extents(offset, length): AsyncIterable<Extent> {
      checkRange(size, offset, length);
      const end = offset + length;
      let run: Extent | undefined;
      for (let at = offset; at < end; at += SCAN_CHUNK) {
        const n = Math.min(SCAN_CHUNK, end - at);
        const bytes = await source.read(at, n);
        cached = { offset: at, bytes };
        for (let i = 0; i < n;) {
          // Blocks are aligned to the disk, not to the request.
          const blockEnd = Math.min(
            n,
            (Math.floor((at + i) / ZERO_GRANULE) + 1) * ZERO_GRANULE - at,
          );
          const kind = isZero(bytes.subarray(i, blockEnd)) ? "zero" : "data";
          if (run && run.kind === kind) {
            run.length += blockEnd - i;
          } else {
            if (run) yield run;
            run = { offset: at + i, length: blockEnd - i, kind };
          }
          i = blockEnd;
        }
      }
      if (run) yield run;
    },
    close: () => source.close?.() ?? Promise.resolve(),
  };
  if (sink) {
    image.write = async (offset, bytes) => {
      cached = undefined;
      await sink.write(offset, bytes);
      size = Math.max(size, offset + bytes.length);
    };
    image.flush = () => sink.flush();
  }
  return image;
}

function asSource(sink: Sink, size: number): Source {
  const readable = sink as Partial<Source>;
  return {
    size,
    name: sink.name,
    read: (offset, length) => {
      if (typeof readable.read !== "function") {
        throw new Error("raw: this sink cannot be read back");
      }
      return readable.read(offset, length);
    },
  };
}

/**
 * The raw driver.
 *
 * @example
 * ```ts
 * import { fromBytes, raw } from "../mod.ts";
 * const image = await raw.open(fromBytes(new Uint8Array(8192)), {});
 * for await (const run of image.extents(0, 8192)) console.log(run.kind); // zero
 * ```
 */
export const raw: Driver = {
  name: "raw",
  description: "raw disk bytes, no header",
  probe: () => 1,
  open(source: Source, options: OpenOptions) {
    if (options.writable && !options.sink) {
      throw new Error("raw: a writable open needs a sink");
    }
    return Promise.resolve(
      rawImage(source, options.writable ? options.sink : undefined),
    );
  },
  async create(sink: Sink, spec: CreateSpec) {
    if (spec.backingFile) {
      throw new Error("raw: the raw format cannot record a backing file");
    }
    await sink.resize?.(spec.size);
    return rawImage(asSource(sink, spec.size), sink);
  },
};
