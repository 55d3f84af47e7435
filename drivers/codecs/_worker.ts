/**
 * The worker behind {@linkcode CodecPool} (`_pool.ts`): runs one codec
 * call per message, `decode(input, size)` or `encode(input)`, and answers
 * with the bytes (transferred), the codec's error message, or
 * `unavailable` for a codec it does not know (the caller then runs it on
 * its own thread).
 *
 * It only imports codec modules, which use web-platform APIs; it is
 * started with `new Worker(url, { type: "module" })`.
 *
 * This module is browser compatible.
 *
 * @module
 */

import * as adc from "./adc.ts";
import * as bzip2 from "./bzip2.ts";
import * as lzfse from "./lzfse.ts";
import * as xz from "./xz.ts";
import * as zlib from "./zlib.ts";
import * as zstd from "./zstd.ts";
import { crc32 } from "./crc32.ts";
import { decodeClusterJobs } from "./_clusters.ts";
import { XZ_CHUNK, ZSTD_FRAME_CHUNK } from "./_pool.ts";

/** The contract every module in drivers/codecs/ keeps. */
interface Codec {
  decode(input: Uint8Array, expectedSize: number): Promise<Uint8Array>;
  encode(input: Uint8Array): Promise<Uint8Array>;
  /** Decodes into `out`, filling it exactly (adc's answers `out`, synchronously). */
  decodeInto?(input: Uint8Array, out: Uint8Array): Promise<void> | Uint8Array;
}

/** What the pool sends. */
interface Job {
  id: number;
  op: "decode" | "encode" | "batchInto" | "spread" | "clusters";
  codec: string;
  input: Uint8Array;
  size: number;
  /** For a batch or a spread: five numbers per chunk (see `CodecPool.batchInto`). */
  jobs?: number[];
  /** For `batchInto`: where the chunks go (shared with the caller). */
  out?: Uint8Array;
  /** For a batch: answer zeros for the CRCs (the caller checks none); for a spread, none. */
  noCrc?: boolean;
  /** For `batchInto`: `out` was moved here, not shared; move it back filled, no CRCs. */
  moved?: boolean;
  /** For `clusters`: the compression (see `_clusters.ts`). */
  kind?: number;
}

/** The worker's global scope, typed without the Deno worker lib. */
const scope = globalThis as unknown as {
  onmessage: ((e: MessageEvent<Job>) => void) | null;
  postMessage(message: unknown, transfer?: Transferable[]): void;
};

/**
 * One whole zstd frame (a frame of a `.zst` file that declares its
 * content size), decoded with its checksum and size checked.
 */
const zstdFrame: Codec = {
  async decodeInto(input, out) {
    const used = await zstd.decodeFrameInto(input, out);
    if (used !== input.length) {
      throw new Error(`frame ends ${input.length - used} bytes early`);
    }
  },
  async decode(input, size) {
    const out = new Uint8Array(size);
    await this.decodeInto!(input, out);
    return out;
  },
  encode() {
    return Promise.reject(new Error("zstd frames are not encoded here"));
  },
};

const CODECS: ReadonlyMap<string, Codec> = new Map<string, Codec>([
  ["adc", adc],
  ["zlib", zlib],
  ["bzip2", bzip2],
  ["lzfse", lzfse],
  ["xz", xz],
  ["zstd frame", zstdFrame],
]);

/** Codec names by UDIF chunk type, for batches (raw is 1). */
const BY_TYPE = new Map<number, string>([
  [0x80000004, "adc"],
  [0x80000005, "zlib"],
  [0x80000006, "bzip2"],
  [0x80000007, "lzfse"],
  [XZ_CHUNK, "xz"],
  [ZSTD_FRAME_CHUNK, "zstd frame"],
]);

/**
 * Decodes one chunk of a batch (its dmg chunk type: 1 stored, else a
 * codec's) into `target`, which is exactly its decoded size.
 */
async function decodeChunkInto(
  type: number,
  packed: Uint8Array,
  target: Uint8Array,
): Promise<void> {
  if (type === 1) {
    if (packed.length !== target.length) throw new Error("raw chunk size");
    target.set(packed);
    return;
  }
  const module = CODECS.get(BY_TYPE.get(type) ?? "");
  if (!module) throw new Error("unknown chunk type");
  if (module.decodeInto) await module.decodeInto(packed, target);
  else target.set(await module.decode(packed, target.length));
}

/**
 * Decodes a batch (see `CodecPool.batchInto`) straight into `out`, shared
 * memory the caller copies from: nothing is allocated per chunk here and
 * nothing is transferred back but the CRCs. (Chunks transferred back as
 * fresh arrays, 1 MiB each, kept the main thread's V8 heap and the peak
 * RSS of `deno task bench`'s dmg bzip2 case over 200 MiB.) Where memory
 * is not shared, `out` was moved here (`CodecPool.batchMoved`) and goes
 * back the same way, without CRCs.
 */
async function batchInto(
  input: Uint8Array,
  jobs: number[],
  out: Uint8Array,
  noCrc = false,
): Promise<Uint32Array<ArrayBuffer>> {
  const crcs = new Uint32Array(new ArrayBuffer(jobs.length / 5 * 4));
  for (let j = 0; j < jobs.length; j += 5) {
    const [type, at, size, decodedSize, dest] = jobs.slice(j, j + 5);
    const packed = input.subarray(at, at + size);
    const target = out.subarray(dest, dest + decodedSize);
    if (target.length !== decodedSize) throw new Error("output too small");
    await decodeChunkInto(type, packed, target);
    if (!noCrc) crcs[j / 5] = crc32(target);
  }
  return crcs;
}

/**
 * Decodes a batch for `CodecPool.spread` into `out` (moved here), with
 * each chunk's CRC-32 and its packed bytes' CRC-32. zlib chunks inflate
 * in WebAssembly and are checked there, while both are still in linear
 * memory (a copy in for each CRC cost about a third of the time in
 * chromium: 1.9 GB/s for the table CRC, copies included).
 */
async function spread(
  input: Uint8Array,
  jobs: number[],
  out: Uint8Array,
  noCrc = false,
): Promise<Uint32Array<ArrayBuffer>> {
  const crcs = new Uint32Array(
    new ArrayBuffer(noCrc ? 0 : jobs.length / 5 * 8),
  );
  for (let j = 0, k = 0; j < jobs.length; j += 5, k += 2) {
    const [type, at, size, decodedSize, dest] = jobs.slice(j, j + 5);
    const packed = input.subarray(at, at + size);
    const target = out.subarray(dest, dest + decodedSize);
    if (target.length !== decodedSize) throw new Error("output too small");
    if (type === 1) {
      if (size !== decodedSize) throw new Error("raw chunk size");
      target.set(packed);
      if (!noCrc) crcs[k] = crcs[k + 1] = crc32(target);
      continue;
    }
    if (
      type === 0x80000005 &&
      zlib.inflateWasmInto(
        packed,
        target,
        "deflate",
        noCrc ? undefined : crcs.subarray(k, k + 2),
      )
    ) continue;
    await decodeChunkInto(type, packed, target);
    if (noCrc) continue;
    crcs[k] = crc32(target);
    crcs[k + 1] = crc32(packed);
  }
  return crcs;
}

scope.onmessage = async (e: MessageEvent<Job>) => {
  const { id, op, codec, input, size } = e.data;
  if (op === "spread") {
    // `out` was moved here: it goes back filled, with two CRC-32s per
    // chunk (of its decoded and of its packed bytes), and the input too
    // (the pool reuses both).
    const out = e.data.out!;
    try {
      const crcs = await spread(input, e.data.jobs ?? [], out, e.data.noCrc);
      scope.postMessage({ id, filled: out, input, crcs }, [
        out.buffer as ArrayBuffer,
        input.buffer as ArrayBuffer,
        crcs.buffer,
      ]);
    } catch {
      // Reported as a failure: the caller decodes chunk by chunk and names it.
      scope.postMessage({ id, unavailable: true });
    }
    return;
  }
  if (op === "clusters") {
    // qcow and qcow2 clusters into `out` (`size` bytes each); both
    // buffers go back, the input for the pool to reuse (shared memory
    // stays where it is).
    const out = e.data.out!;
    try {
      const failed = await decodeClusterJobs(
        e.data.kind ?? -1,
        input,
        e.data.jobs ?? [],
        size,
        out,
      );
      scope.postMessage(
        { id, op, input, out, ...failed },
        [input.buffer, out.buffer].filter((b) =>
          b instanceof ArrayBuffer
        ) as ArrayBuffer[],
      );
    } catch {
      scope.postMessage({ id, unavailable: true });
    }
    return;
  }
  if (op === "batchInto") {
    try {
      const out = e.data.out!;
      const crcs = await batchInto(
        input,
        e.data.jobs ?? [],
        out,
        e.data.moved || e.data.noCrc,
      );
      if (e.data.moved) {
        scope.postMessage({ id, filled: out }, [out.buffer as ArrayBuffer]);
      } else scope.postMessage({ id, crcs }, [crcs.buffer]);
    } catch {
      // Reported as a failure: the caller decodes chunk by chunk and names it.
      scope.postMessage({ id, unavailable: true });
    }
    return;
  }
  const module = CODECS.get(codec);
  if (!module) {
    scope.postMessage({ id, unavailable: true });
    return;
  }
  try {
    const out = op === "decode"
      ? await module.decode(input, size)
      : await module.encode(input);
    // Transferred when it owns its buffer, copied otherwise.
    const owned = out.byteOffset === 0 &&
      out.byteLength === out.buffer.byteLength;
    const bytes = owned ? out : out.slice();
    scope.postMessage({ id, out: bytes }, [bytes.buffer as ArrayBuffer]);
  } catch (error) {
    scope.postMessage({
      id,
      error: error instanceof Error ? error.message : String(error),
      codecError: (error as Error)?.name === "CodecError",
    });
  }
};
