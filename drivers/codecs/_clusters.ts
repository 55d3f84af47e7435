/**
 * Compressed clusters of QEMU's qcow (version 1) and qcow2 images: one
 * cluster decoded on the caller's thread, or the many clusters of a big
 * read decoded on the decode workers (`_pool.ts`), a few mebibytes of
 * packed bytes per message.
 *
 * A compressed cluster is raw deflate (qcow, and qcow2's compression_type
 * 0) or one zstd frame (qcow2's compression_type 1), stored in whole
 * 512-byte sectors: the packed bytes given may run past the end of the
 * stream, and the cluster decodes to exactly its cluster size.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { CodecError } from "../../streams/errors.ts";
import { nodeZlibModule } from "./_node_zlib.ts";
import { codecPool } from "./_pool.ts";

/** A raw deflate cluster (qcow; qcow2 compression_type 0, zlib). */
export const CLUSTER_DEFLATE = 0;
/** A zstd cluster (qcow2 compression_type 1). */
export const CLUSTER_ZSTD = 1;

// The decoders (and the WebAssembly module behind them) are imported on
// the first compressed cluster: an image without any loads none of them.
let zlib: typeof import("./zlib.ts") | undefined;
let zstd: typeof import("./zstd.ts") | undefined;

/**
 * A zstd cluster as QEMU writes it: one frame (its content size may be
 * left out), followed by whatever lies after it in the file. Decoded
 * until `out` is full; a frame that ends short is an error.
 */
async function zstdCluster(input: Uint8Array, out: Uint8Array) {
  zstd ??= await import("./zstd.ts");
  await zstd.decodeFrameInto(input, out, true);
}

/**
 * Decodes one compressed cluster, `input` (which may run past the end of
 * its stream), into exactly `out.length` bytes.
 *
 * @param kind {@linkcode CLUSTER_DEFLATE} or {@linkcode CLUSTER_ZSTD}
 * @param input the cluster's packed bytes
 * @param out where the cluster goes; all of it is filled
 * @throws {CodecError} when the bytes do not decode to exactly `out.length`
 *
 * @example
 * ```ts
 * import { CLUSTER_DEFLATE, decodeCluster } from "./_clusters.ts";
 * import { encode } from "./zlib.ts";
 * const packed = await encode(new Uint8Array(4096).fill(1), "deflate-raw");
 * const out = new Uint8Array(4096);
 * await decodeCluster(CLUSTER_DEFLATE, packed, out);
 * console.log(out[4095]); // 1
 * ```
 */
export async function decodeCluster(
  kind: number,
  input: Uint8Array,
  out: Uint8Array,
): Promise<void> {
  if (kind === CLUSTER_DEFLATE) {
    zlib ??= await import("./zlib.ts");
    await zlib.decodeInto(input, out, "deflate-raw");
  } else if (kind === CLUSTER_ZSTD) {
    await zstdCluster(input, out);
  } else {
    throw new CodecError("cluster", `unknown cluster kind ${kind}`);
  }
}

/** Numbers per cluster in a job list: where its packed bytes lie in the input, how many, where it goes in the output. */
export const JOB_FIELDS = 3;

/**
 * Decodes the clusters `jobs` lists (see {@linkcode JOB_FIELDS}) from
 * `input` into `out`, each `clusterSize` bytes: the worker's loop, and
 * the caller's when no worker takes the job.
 *
 * @returns -1, or the index of the first cluster that failed and why
 */
export async function decodeClusterJobs(
  kind: number,
  input: Uint8Array,
  jobs: ArrayLike<number>,
  clusterSize: number,
  out: Uint8Array,
): Promise<{ failed: number; message: string } | undefined> {
  for (let j = 0; j < jobs.length; j += JOB_FIELDS) {
    const at = jobs[j], size = jobs[j + 1], dest = jobs[j + 2];
    try {
      await decodeCluster(
        kind,
        input.subarray(at, at + size),
        out.subarray(dest, dest + clusterSize),
      );
    } catch (e) {
      if (!(e instanceof CodecError)) throw e;
      return { failed: j / JOB_FIELDS, message: e.message };
    }
  }
  return undefined;
}

/** A compressed cluster a read wants: where it lies in the file, how many packed bytes (at most), where it goes. */
export interface PackedCluster {
  /** Where its packed bytes start in the image file. */
  offset: number;
  /** How many packed bytes (to the end of its last sector). */
  size: number;
  /** Where its `clusterSize` decoded bytes go. */
  target: Uint8Array;
}

/** What {@linkcode ClusterReader.decodeMany} needs from the image. */
export interface ClusterReader {
  /** {@linkcode CLUSTER_DEFLATE} or {@linkcode CLUSTER_ZSTD}. */
  kind: number;
  clusterSize: number;
  /** Reads the file's bytes `[offset, offset + into.length)` into `into`. */
  readInto(offset: number, into: Uint8Array): Promise<void>;
  /**
   * The file's bytes `[offset, offset + length)` where they were read
   * already (a {@linkcode Span}), or undefined: in a `SharedArrayBuffer`
   * they go to the workers as they are, not copied.
   */
  bytes?(offset: number, length: number): Uint8Array | undefined;
  /** The typed error naming `cluster` (a CodecError's message given). */
  error(cluster: PackedCluster, message: string): Error;
}

/**
 * Packed bytes per worker message, at most and at least: a read's
 * clusters are spread over every worker, but a 64 KiB cluster is tens of
 * microseconds of inflating, about what a message costs, so they travel
 * by the hundreds of kibibytes at least.
 */
const JOB_MAX_BYTES = 4 << 20, JOB_MIN_BYTES = 256 << 10;
/** Packed clusters further apart than this in the file start a new job (the gap is read with them). */
const JOB_GAP = 64 << 10;
/**
 * The fewest whole compressed clusters in one read for the workers: a
 * small read (a few clusters) decodes faster here than a message takes.
 */
export const POOL_MIN_CLUSTERS = 8;

/**
 * The smallest deflate clusters sent to the workers where this thread
 * inflates natively (node:zlib): smaller ones cost more in messages and
 * copies than the workers save. Reading the bench's compressed qcow (4 KiB
 * clusters) on the workers took 2.9 s of CPU and 195 MiB of peak RSS,
 * here 2.1 s and 107 MiB. In browsers (no native inflater: our
 * WebAssembly one) and for zstd (no native decoder) every size goes.
 */
let nativeMinCluster = 32 << 10;

/**
 * Sets the smallest deflate cluster sent to the workers where inflating
 * is native (for tests: 0 sends every size), and answers the old value.
 *
 * @param bytes the new minimum
 * @returns the minimum before
 *
 * @example
 * ```ts
 * import { setNativeMinCluster } from "./_clusters.ts";
 * const before = setNativeMinCluster(0);
 * setNativeMinCluster(before);
 * console.log(before); // 32768
 * ```
 */
export function setNativeMinCluster(bytes: number): number {
  const before = nativeMinCluster;
  nativeMinCluster = bytes;
  return before;
}

/**
 * Whether a read of `count` whole compressed clusters of `kind` and
 * `clusterSize` bytes goes to the decode workers.
 *
 * @param count compressed clusters in the read
 * @param kind {@linkcode CLUSTER_DEFLATE} or {@linkcode CLUSTER_ZSTD}
 * @param clusterSize the image's cluster size
 * @returns true when the workers are there and it is worth a message
 *
 * @example
 * ```ts
 * import { CLUSTER_ZSTD, poolWorthIt } from "./_clusters.ts";
 * console.log(poolWorthIt(1, CLUSTER_ZSTD, 65536)); // false
 * ```
 */
export function poolWorthIt(
  count: number,
  kind: number,
  clusterSize: number,
): boolean {
  if (count < POOL_MIN_CLUSTERS || !codecPool.usable) return false;
  return kind !== CLUSTER_DEFLATE || clusterSize >= nativeMinCluster ||
    // (zlib.ts's hasNativeInflate, without loading the decoder.)
    nodeZlibModule() === undefined;
}

/** The images decoding clusters on the workers hold the pool until closed; see `_pool.ts`. */
export function holdPool(): () => void {
  return codecPool.hold();
}

/**
 * Decodes `clusters` (in file order or not) on the decode workers, jobs
 * of about {@linkcode JOB_BYTES} packed bytes each, all in flight at
 * once; each cluster's bytes land in its `target`. Where no worker takes
 * a job, its clusters decode on this thread. A cluster that does not
 * decode is `reader.error`'s typed error, through either path.
 *
 * @param reader the image's file and cluster facts
 * @param clusters whole compressed clusters of one read
 *
 * @example
 * ```ts
 * import { CLUSTER_DEFLATE, decodeMany } from "./_clusters.ts";
 * import { encode } from "./zlib.ts";
 * const file = await encode(new Uint8Array(512).fill(3), "deflate-raw");
 * const target = new Uint8Array(512);
 * await decodeMany({
 *   kind: CLUSTER_DEFLATE,
 *   clusterSize: 512,
 *   readInto: async (at, into) => into.set(file.subarray(at, at + into.length)),
 *   error: (_c, message) => new Error(message),
 * }, [{ offset: 0, size: file.length, target }]);
 * console.log(target[511]); // 3
 * ```
 */
export async function decodeMany(
  reader: ClusterReader,
  clusters: PackedCluster[],
): Promise<void> {
  const sorted = clusters.slice().sort((a, b) => a.offset - b.offset);
  const packed = sorted.reduce((n, c) => n + c.size, 0);
  // Targets in one SharedArrayBuffer (convert's read buffers): the
  // workers decode straight into them, and nothing is copied back.
  const buffer = clusters[0]?.target.buffer;
  const into = isShared(buffer) &&
      clusters.every((c) =>
        c.target.buffer === buffer && c.target.length === reader.clusterSize
      )
    ? new Uint8Array(buffer)
    : undefined;
  const jobBytes = Math.min(
    JOB_MAX_BYTES,
    Math.max(JOB_MIN_BYTES, Math.ceil(packed / codecPool.size)),
  );
  const pending: Promise<void>[] = [];
  for (let i = 0; i < sorted.length;) {
    const from = sorted[i].offset;
    let to = from + sorted[i].size;
    let j = i + 1;
    while (
      j < sorted.length && sorted[j].offset >= from &&
      sorted[j].offset - to <= JOB_GAP &&
      Math.max(to, sorted[j].offset + sorted[j].size) - from <= jobBytes
    ) {
      to = Math.max(to, sorted[j].offset + sorted[j].size);
      j++;
    }
    pending.push(decodeJob(reader, sorted.slice(i, j), from, to, into));
    i = j;
  }
  // Every job settles before the first failure is reported: a job still
  // in flight would otherwise write into a buffer its caller reuses.
  const settled = await Promise.allSettled(pending);
  for (const s of settled) if (s.status === "rejected") throw s.reason;
}

/** One worker message: clusters packed in the file's bytes `[from, to)`. */
/**
 * Jobs in flight on the workers, and the jobs waiting for a turn: two
 * per worker (one decoding, one queued behind it), so that the buffers of
 * jobs no worker would start yet are not made (convert keeps up to four
 * reads in flight, two or more jobs each). With one per worker and one
 * more, the pool's least-busy choice left the extra job always on the
 * same worker, and the other one idle from each answer until this thread
 * sent its next job: for the bench's zstd qcow2 the workers' CPU was
 * 0.38-0.44 s against 0.29-0.34 s (load 5), and 0.35-0.41 s against
 * 0.35-0.37 s with two each.
 */
let running = 0;
const waiting: (() => void)[] = [];

async function decodeJob(
  reader: ClusterReader,
  clusters: PackedCluster[],
  from: number,
  to: number,
  into?: Uint8Array,
): Promise<void> {
  if (running >= 2 * codecPool.size) {
    await new Promise<void>((resolve) => waiting.push(resolve));
  }
  running++;
  try {
    await decodeJobNow(reader, clusters, from, to, into);
  } finally {
    running--;
    waiting.shift()?.();
  }
}

/** Whether `buffer` is shared memory (workers can write it in place). */
function isShared(
  buffer: ArrayBufferLike | undefined,
): buffer is ArrayBufferLike {
  return typeof SharedArrayBuffer === "function" &&
    buffer instanceof SharedArrayBuffer;
}

async function decodeJobNow(
  reader: ClusterReader,
  clusters: PackedCluster[],
  from: number,
  to: number,
  into?: Uint8Array,
): Promise<void> {
  const { clusterSize } = reader;
  // The packed bytes: where a span holds them in shared memory, as they
  // are; otherwise copied into a buffer that travels to the worker.
  const view = reader.bytes?.(from, to - from);
  const input = view && isShared(view.buffer)
    ? view
    : codecPool.buffer(to - from);
  if (input !== view) await reader.readInto(from, input);
  const jobs: number[] = [];
  clusters.forEach((c, k) =>
    jobs.push(
      c.offset - from,
      Math.min(c.size, to - c.offset),
      into ? c.target.byteOffset : k * clusterSize,
    )
  );
  const answer = await codecPool.clusters(
    reader.kind,
    input,
    jobs,
    clusterSize,
    clusters.length * clusterSize,
    into,
  );
  if (answer && "out" in answer) {
    // With `into` the clusters are in place (the answer's `out` is a new
    // view of the same memory).
    if (!into) {
      clusters.forEach((c, k) =>
        c.target.set(
          answer.out.subarray(k * clusterSize, (k + 1) * clusterSize),
        )
      );
      codecPool.giveBack(answer.out);
    }
    return;
  }
  if (answer) {
    throw reader.error(clusters[answer.failed], answer.message);
  }
  // No worker took it (none here, or they were ended meanwhile, taking
  // the transferred input with them): decoded here, into the targets.
  let packed = input;
  if (packed.buffer.byteLength === 0) {
    packed = new Uint8Array(to - from);
    await reader.readInto(from, packed);
  }
  for (const c of clusters) {
    try {
      await decodeCluster(
        reader.kind,
        packed.subarray(
          c.offset - from,
          Math.min(to, c.offset + c.size) - from,
        ),
        c.target,
      );
    } catch (e) {
      if (!(e instanceof CodecError)) throw e;
      throw reader.error(c, e.message);
    }
  }
  if (packed === input) codecPool.giveBack(input);
}

/** Shared buffers of spans, kept for the next ones (largest last). */
const sharedSpares: SharedArrayBuffer[] = [];
/** At most this many bytes of them: a few reads in flight. */
const MAX_SHARED_SPARE_BYTES = 32 << 20;

/**
 * A buffer of `length` bytes in shared memory for a span, reused where
 * one is spare, or undefined where there is no shared memory (a page
 * that is not cross-origin isolated).
 */
function sharedBuffer(length: number): Uint8Array | undefined {
  if (typeof SharedArrayBuffer !== "function") return undefined;
  const k = sharedSpares.findIndex((b) => b.byteLength >= length);
  const buffer = k >= 0
    ? sharedSpares.splice(k, 1)[0]
    : new SharedArrayBuffer(Math.ceil(length / SPAN_UNIT) * SPAN_UNIT);
  return new Uint8Array(buffer, 0, length);
}

/** Keeps a span's shared buffer for reuse; false when it is not one. */
function giveBackShared(bytes: Uint8Array): boolean {
  if (!isShared(bytes.buffer)) return false;
  const buffer = bytes.buffer as SharedArrayBuffer;
  const kept = sharedSpares.reduce((n, b) => n + b.byteLength, 0);
  if (kept + buffer.byteLength <= MAX_SHARED_SPARE_BYTES) {
    let k = 0;
    while (
      k < sharedSpares.length &&
      sharedSpares[k].byteLength < buffer.byteLength
    ) k++;
    sharedSpares.splice(k, 0, buffer);
  }
  return true;
}

/** Span buffers are made in whole units, so that spares fit the next span. */
const SPAN_UNIT = 1 << 20;

/** The most bytes {@linkcode readSpan} reads at once. */
const MAX_SPAN = 8 << 20;

/** What {@linkcode readSpan} answers: the span's bytes and a reader that serves from them. */
export interface Span {
  /** Reads the file's bytes at `at` into `into`: from the span when inside it, from the file otherwise. */
  readInto(at: number, into: Uint8Array): Promise<void>;
  /** The span's bytes `[at, at + length)`, when inside it. */
  bytes(at: number, length: number): Uint8Array | undefined;
  /** Gives the span's buffer back for reuse; nothing may use it after. */
  done(): void;
}

/**
 * Reads at once the file span holding the byte ranges `ranges` (the
 * clusters of one read), when they lie close together: at most
 * {@linkcode MAX_SPAN} bytes, no more than twice what they hold plus a
 * cluster's worth. Over HTTP that is one range request instead of one
 * per run of clusters (a 2 MiB read of a compressed qcow was eight).
 * Answers undefined for one range or none, or ranges far apart: the
 * caller reads them one by one.
 *
 * @param readInto reads the file's bytes at `at` into `into`
 * @param ranges start and end of each wanted range, in the file
 * @param slack bytes of gaps allowed beyond twice the wanted ones
 *
 * @example
 * ```ts
 * import { readSpan } from "./_clusters.ts";
 * const file = new Uint8Array(100).map((_, i) => i);
 * const span = await readSpan(
 *   async (at, into) => into.set(file.subarray(at, at + into.length)),
 *   [[10, 20], [30, 40]],
 *   0,
 * );
 * console.log(span?.bytes(30, 2)); // Uint8Array(2) [ 30, 31 ]
 * span?.done();
 * ```
 */
export async function readSpan(
  readInto: (at: number, into: Uint8Array) => Promise<void>,
  ranges: [number, number][],
  slack: number,
): Promise<Span | undefined> {
  const sorted = ranges.slice().sort((a, b) => a[0] - b[0]);
  let wanted = 0, runEnd = -1;
  for (const [start, end] of sorted) {
    wanted += Math.max(0, end - Math.max(start, runEnd));
    runEnd = Math.max(runEnd, end);
  }
  // One range is one read anyway; one run of several clusters is read
  // once here rather than once per worker job.
  if (sorted.length < 2) return undefined;
  const from = sorted[0][0], to = runEnd;
  if (to - from > MAX_SPAN || to - from > 2 * wanted + slack) return undefined;
  const buffer = sharedBuffer(to - from) ?? codecPool.buffer(to - from);
  await readInto(from, buffer);
  let alive = true;
  const bytes = (at: number, length: number) =>
    alive && at >= from && at + length <= to
      ? buffer.subarray(at - from, at - from + length)
      : undefined;
  return {
    bytes,
    readInto: async (at, into) => {
      const inside = bytes(at, into.length);
      if (inside) into.set(inside);
      else await readInto(at, into);
    },
    done() {
      if (alive) giveBackShared(buffer) || codecPool.giveBack(buffer);
      alive = false;
    },
  };
}
