/**
 * raw: the disk's bytes as they are. Probes lowest (score 1) so that any
 * other format wins, as QEMU's `find_image_format` does.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { probeRaw } from "./_signatures.ts";
import { isZero } from "./_binary.ts";
import { writeSink } from "./_image.ts";
import type {
  CreateSpec,
  Driver,
  Extent,
  Image,
  OpenOptions,
  Sink,
  Source,
  WindowSource,
} from "../streams/types.ts";
import { checkRange, readInto } from "../streams/types.ts";

/** Granularity at which raw images report zero runs (a file-system block). */
const ZERO_GRANULE = 4096;
/** How much raw scans at a time for its allocation map. */
const SCAN_CHUNK = 4 << 20;

function rawImage(source: Source, sink?: Sink): Image {
  let size = source.size;
  // The last chunk the allocation map scanned: convert reads the data runs
  // of a window right after asking for its map, so keeping it saves a second
  // read of the same bytes. (`deno task bench`, raw, 1 GiB: every data byte
  // was read from the file twice before data runs were cut at chunk ends.)
  let cached: { offset: number; bytes: Uint8Array } | undefined;
  /** The scan buffer no walk is using. */
  let spare: Uint8Array | undefined;
  /** The cached bytes of `[offset, offset + length)`, when all are there. */
  const hit = (offset: number, length: number) => {
    if (
      !cached || offset < cached.offset ||
      offset + length > cached.offset + cached.bytes.length
    ) {
      return undefined;
    }
    const at = offset - cached.offset;
    return cached.bytes.subarray(at, at + length);
  };
  const image: Image & WindowSource = {
    format: "raw",
    // Its bytes are the file's: convert may let a file sink copy them in
    // the kernel (see RangeCopySink).
    windowOf: { source, offset: 0 },
    get size() {
      return size;
    },
    name: source.name,
    encrypted: false,
    details: {},
    async read(offset, length) {
      checkRange(size, offset, length);
      // A copy: the cached chunk is reused by the next scan.
      return hit(offset, length)?.slice() ?? await source.read(offset, length);
    },
    async readInto(offset, into) {
      checkRange(size, offset, into.length);
      const bytes = hit(offset, into.length);
      if (bytes) into.set(bytes);
      else await readInto(source, offset, into);
    },
    // Raw has no allocation metadata of its own: like QEMU asking the file
    // system for holes, it reports 4 KiB-aligned zero blocks as `zero`.
    async *extents(offset, length): AsyncIterable<Extent> {
      checkRange(size, offset, length);
      const end = offset + length;
      // One scan buffer, reused chunk after chunk and walk after walk (a
      // fresh 4 MiB array per chunk cost page faults and GC time in the
      // bench); small walks, and one started while another runs, get
      // their own.
      const small = length < SCAN_CHUNK;
      const buffer = small
        ? new Uint8Array(length)
        : spare ?? new Uint8Array(SCAN_CHUNK);
      if (buffer === spare) spare = undefined;
      let run: Extent | undefined;
      try {
        for (let at = offset; at < end; at += SCAN_CHUNK) {
          const n = Math.min(SCAN_CHUNK, end - at);
          const bytes = buffer.subarray(0, n);
          // Not cached while it is being overwritten.
          if (cached?.bytes.buffer === buffer.buffer) cached = undefined;
          await readInto(source, at, bytes);
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
          // A data run is handed out at the end of each chunk, while its
          // bytes are still cached for the reads that follow.
          if (run?.kind === "data" && at + n < end) {
            yield run;
            run = undefined;
          }
        }
        if (run) yield run;
      } finally {
        if (!small) spare = buffer;
      }
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
  writeOptions: [],
  description: "raw disk bytes, no header",
  probe: probeRaw,
  open(source: Source, options: OpenOptions) {
    return Promise.resolve(rawImage(source, writeSink(options, "raw")));
  },
  async create(sink: Sink, spec: CreateSpec) {
    if (spec.backingFile) {
      throw new Error("raw: the raw format cannot record a backing file");
    }
    await sink.resize?.(spec.size);
    return rawImage(asSource(sink, spec.size), sink);
  },
};
