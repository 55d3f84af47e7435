/**
 * A few module workers running codec calls (`_worker.ts`) so that the
 * chunks of one read decode on every core: node:zlib's inflate and the
 * bzip2, ADC, LZFSE and xz decoders written here all run synchronously,
 * so on one thread concurrent decodes would take turns.
 *
 * Workers start on first use. While an image holds the pool
 * ({@linkcode CodecPool.hold}, from open to close) they stay alive
 * between reads, however slow the source (a URL in a browser); they end
 * when the last holder lets go with nothing in flight, or after
 * {@linkcode HELD_IDLE_MS} without work (an image never closed must not
 * keep a process alive for ever), or {@linkcode IDLE_MS} when nobody holds
 * the pool. Where workers cannot be made (no `Worker`, a content policy, a
 * bundle without the worker file) every call answers `null` and the
 * caller runs the codec itself.
 *
 * The worker file: `_worker.ts` beside this module when it runs from
 * source, `_worker.js` beside the bundle when it runs bundled
 * (`deno task bundle` writes `dist/mod.js` and `dist/_worker.js`, the
 * worker with its codecs bundled on its own).
 *
 * This module is browser compatible.
 *
 * @module
 */

import { CodecError } from "../../streams/errors.ts";

/** How long idle workers live, when no image holds the pool, before they are ended. */
const IDLE_MS = 50;
/**
 * How long idle workers live while an image holds the pool. In a browser
 * reading a URL, 50 ms between two reads' decodes was common: the workers
 * were ended and restarted 154 times in one conversion.
 */
const HELD_IDLE_MS = 5000;
/** The most workers, whatever the core count. */
const MAX_WORKERS = 4;
/**
 * Bytes of buffers kept for reuse by {@linkcode CodecPool.buffer}: enough
 * for the jobs of a few reads in flight (with eight buffers kept, 641 of
 * 790 jobs reading the bench's compressed qcow made fresh ones, which V8
 * frees late: 260 MiB of peak RSS).
 */
const MAX_SPARE_BYTES = 24 << 20;
/** Buffers are made in whole mebibytes, so that spares fit the next job. */
const SPARE_UNIT = 256 << 10;

/**
 * Chunk types of {@linkcode CodecPool.batchInto} and
 * {@linkcode CodecPool.spread} jobs are UDIF's (dmg) chunk types; these
 * name the ones compressed files use: a whole xz stream (UDIF's own
 * type), and a zstd frame (no UDIF type: "zstd" in ASCII).
 */
export const XZ_CHUNK = 0x80000008;
/** See {@linkcode XZ_CHUNK}. */
export const ZSTD_FRAME_CHUNK = 0x7a737464;

/** What {@linkcode CodecPool.clusters} answers. */
export type ClustersAnswer =
  | { out: Uint8Array }
  | { failed: number; message: string };

interface Pending {
  resolve(out: Uint8Array | null): void;
  reject(error: Error): void;
  codec: string;
  /** Resolve with the worker's whole answer (for {@linkcode CodecPool.spread}). */
  whole?: boolean;
}

/** Runs codec calls on worker threads; see the module doc. */
export class CodecPool {
  #workers: { worker: Worker; jobs: number }[] = [];
  #pending = new Map<number, Pending>();
  #next = 1;
  #idle?: ReturnType<typeof setTimeout>;
  #broken = typeof Worker === "undefined";
  #holders = 0;
  #started = 0;
  #done = 0;
  #spares: ArrayBuffer[] = [];
  #spareBytes = 0;

  /** How many workers the pool runs when busy: one per core, at most {@linkcode MAX_WORKERS}. */
  get size(): number {
    const cores = (globalThis.navigator as { hardwareConcurrency?: number })
      ?.hardwareConcurrency ?? 2;
    return Math.max(1, Math.min(MAX_WORKERS, cores));
  }

  /** False once workers are known not to work here. */
  get usable(): boolean {
    return !this.#broken;
  }

  /**
   * What the pool did so far: workers running now, workers ever started,
   * jobs the workers answered, and whether workers failed to load here.
   */
  get stats(): DecodeWorkerStats {
    return {
      running: this.#workers.length,
      started: this.#started,
      jobs: this.#done,
      broken: this.#broken,
    };
  }

  /**
   * Keeps the workers alive between calls until the returned function is
   * called (an image holds the pool from open to close); the last holder
   * to let go ends them when nothing is in flight.
   */
  hold(): () => void {
    this.#holders++;
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      this.#holders--;
      this.release();
    };
  }

  #start(): boolean {
    if (this.#workers.length) return true;
    try {
      // From source this module is a .ts file; bundled, it is inside
      // the bundle, and the worker is the bundled _worker.js beside it.
      const url = new URL(
        import.meta.url.endsWith(".ts") ? "./_worker.ts" : "./_worker.js",
        import.meta.url,
      );
      for (let i = 0; i < this.size; i++) {
        const worker = new Worker(url, { type: "module" });
        const slot = { worker, jobs: 0 };
        this.#started++;
        worker.onmessage = (e: MessageEvent) => {
          slot.jobs--;
          this.#done++;
          const { id, out, error, unavailable } = e.data;
          const job = this.#pending.get(id);
          this.#pending.delete(id);
          if (e.data.op === "clusters") {
            // Both buffers come back: the input to reuse, the output to
            // the caller (or reuse, when a cluster failed).
            this.giveBack(e.data.input);
            if (e.data.failed !== undefined || !job) this.giveBack(out);
            job?.resolve(
              (e.data.failed !== undefined
                ? { failed: e.data.failed, message: e.data.message }
                : { out }) as never,
            );
          } else if (job?.whole) {
            job.resolve(unavailable ? null : e.data);
          } else if (job) {
            if (error !== undefined) {
              const prefix = `${job.codec}: `;
              job.reject(
                new CodecError(
                  job.codec,
                  String(error).startsWith(prefix)
                    ? String(error).slice(prefix.length)
                    : String(error),
                ),
              );
            } else if (unavailable) {
              job.resolve(null);
            } else {
              job.resolve(e.data.filled ?? e.data.crcs ?? out);
            }
          }
          this.#scheduleIdle();
        };
        worker.onerror = (e: Event) => {
          // The worker could not load (a bundle, a browser without the
          // .ts file): everything in flight is redone by the caller.
          e.preventDefault();
          this.#broken = true;
          this.end();
        };
        this.#workers.push(slot);
      }
      return true;
    } catch {
      this.#broken = true;
      this.end();
      return false;
    }
  }

  /**
   * Runs `codec`'s `decode(input, size)` or `encode(input)` on a worker.
   * Resolves `null` when no worker can take it; rejects with the codec's
   * {@linkcode CodecError} when the codec fails. `input` is copied.
   */
  run(
    op: "decode" | "encode",
    codec: string,
    input: Uint8Array,
    size = 0,
  ): Promise<Uint8Array | null> {
    const claimed = this.#claim();
    if (!claimed) return Promise.resolve(null);
    const { slot, id } = claimed;
    const copy = input.slice();
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, codec });
      slot.worker.postMessage({ id, op, codec, input: copy, size }, [
        copy.buffer,
      ]);
    });
  }

  /**
   * Decodes several chunks of one read on one worker: `jobs` holds five
   * numbers per chunk (chunk type, packed offset in `input`, packed
   * length, decoded size, where it goes in `out`). The worker decodes
   * each chunk straight into `out` at its place, so `out` must
   * lie in a `SharedArrayBuffer`. Answers the chunks' CRC-32s, or `null`
   * on any failure (the caller then decodes chunk by chunk). `input` is
   * copied, unless `shareInput` and it lies in a `SharedArrayBuffer` too
   * (the caller then leaves it alone until the answer). Without `crc` the
   * CRCs are not computed (zeros): a caller whose codec checks its own
   * output (xz, zstd) saves the worker a pass over every byte.
   */
  batchInto(
    input: Uint8Array,
    jobs: number[],
    out: Uint8Array,
    shareInput = false,
    crc = true,
  ): Promise<Uint32Array | null> {
    const claimed = this.#claim();
    if (!claimed) return Promise.resolve(null);
    const { slot, id } = claimed;
    const shared = shareInput && typeof SharedArrayBuffer === "function" &&
      input.buffer instanceof SharedArrayBuffer;
    const copy = shared ? input : input.slice();
    return new Promise((resolve) => {
      this.#pending.set(id, {
        resolve: (crcs) => resolve(crcs as never),
        reject: () => resolve(null),
        codec: "batch",
      });
      try {
        slot.worker.postMessage(
          { id, op: "batchInto", input: copy, jobs, size: 0, out, noCrc: !crc },
          shared ? [] : [copy.buffer as ArrayBuffer],
        );
      } catch {
        // Shared memory cannot be posted here (a page that is not
        // cross-origin isolated): the caller decodes itself.
        slot.jobs--;
        this.#pending.delete(id);
        resolve(null);
      }
    });
  }

  /**
   * Like {@linkcode batchInto} where memory is not shared (browser pages
   * that are not cross-origin isolated): `out`, which must own its whole
   * buffer, is moved to the worker, which decodes each chunk into it at
   * its place and moves it back; answers it filled, or `null` on any
   * failure (`out` is then gone: the caller decodes into a new array).
   * `input` is moved too when it owns its buffer (the caller leaves it
   * alone), copied otherwise. No CRCs are computed. One 2 MiB array each
   * way instead of a piece per chunk moved back and copied into place.
   */
  batchMoved(
    input: Uint8Array,
    jobs: number[],
    out: Uint8Array,
  ): Promise<Uint8Array | null> {
    const claimed = this.#claim();
    if (!claimed) return Promise.resolve(null);
    const { slot, id } = claimed;
    const owns = (a: Uint8Array) =>
      a.byteOffset === 0 && a.byteLength === a.buffer.byteLength &&
      a.buffer instanceof ArrayBuffer;
    const copy = owns(input) ? input : input.slice();
    return new Promise((resolve) => {
      this.#pending.set(id, {
        resolve: (filled) => resolve(filled as never),
        reject: () => resolve(null),
        codec: "batch",
      });
      slot.worker.postMessage(
        { id, op: "batchInto", input: copy, jobs, size: 0, out, moved: true },
        [copy.buffer as ArrayBuffer, out.buffer as ArrayBuffer],
      );
    });
  }

  /**
   * Decodes chunks on every worker at once where memory is not shared
   * (browser pages that are not cross-origin isolated), each straight
   * into its place in `into`. `jobs` holds five numbers per chunk as for
   * {@linkcode batchInto} (type, packed offset in `input`, packed length,
   * decoded size, offset in `into`). The chunks are cut into one run per
   * worker, balanced by decoded bytes; each run's packed bytes are copied
   * into a reused buffer and moved, with a reused output buffer, to a
   * worker, which decodes every chunk of the run into it and moves both
   * back; the chunks are then copied into `into`. One message each way
   * per worker, no array made per chunk, and no buffer that is not
   * reused: a dmg's chunks came back as an array each, and cloop's 64
   * KiB blocks all went to one worker.
   *
   * Answers two CRC-32s per chunk (its decoded bytes', then its packed
   * bytes'), computed on the workers (zlib's in WebAssembly while the
   * bytes are in linear memory), none without `crc` (callers that check
   * none, cloop), or `null` when a worker did not decode
   * its run (a failure, or no worker can run here): the caller then
   * decodes the chunks itself, which also names a bad one. Parts of
   * `into` may have been written by then.
   */
  async spread(
    input: Uint8Array,
    jobs: number[],
    into: Uint8Array,
    crc = true,
  ): Promise<Uint32Array | null> {
    const chunks = jobs.length / 5;
    if (!chunks || !this.usable) return null;
    let total = 0;
    for (let j = 3; j < jobs.length; j += 5) total += jobs[j];
    const parts = Math.min(this.size, chunks);
    // A run ends where the decoded bytes so far pass its share of all
    // (or where each chunk left must be a run of its own).
    const runs: [number, number][] = [];
    let first = 0, sum = 0;
    for (let k = 0; k < chunks; k++) {
      sum += jobs[k * 5 + 3];
      const left = chunks - k - 1;
      const more = parts - runs.length - 1; // runs still to start after this one
      if (
        left === 0 ||
        more > 0 &&
          (sum * parts >= total * (runs.length + 1) || left === more)
      ) {
        runs.push([first, k + 1]);
        first = k + 1;
      }
    }
    const answers = await Promise.all(
      runs.map(([from, to]) =>
        this.#spreadRun(input, jobs, from, to, into, crc)
      ),
    );
    if (answers.some((a) => !a)) return null;
    const crcs = new Uint32Array(crc ? chunks * 2 : 0);
    if (crc) runs.forEach(([from], r) => crcs.set(answers[r]!, from * 2));
    return crcs;
  }

  /** One worker's part of {@linkcode spread}: chunks `from` to `to` - 1. */
  async #spreadRun(
    input: Uint8Array,
    jobs: number[],
    from: number,
    to: number,
    into: Uint8Array,
    crc: boolean,
  ): Promise<Uint32Array | null> {
    const start = jobs[from * 5 + 1];
    const end = jobs[(to - 1) * 5 + 1] + jobs[(to - 1) * 5 + 2];
    const mine: number[] = [];
    let bytes = 0;
    for (let k = from; k < to; k++) {
      const j = k * 5;
      if (jobs[j + 1] < start || jobs[j + 1] + jobs[j + 2] > end) return null;
      mine.push(jobs[j], jobs[j + 1] - start, jobs[j + 2], jobs[j + 3], bytes);
      bytes += jobs[j + 3];
    }
    const claimed = this.#claim();
    if (!claimed) return null;
    const { slot, id } = claimed;
    const packed = this.buffer(end - start);
    packed.set(input.subarray(start, end));
    const out = this.buffer(bytes);
    const answer = await new Promise<
      { filled: Uint8Array; input: Uint8Array; crcs: Uint32Array } | null
    >((resolve) => {
      this.#pending.set(id, {
        resolve: (data) => resolve(data as never),
        reject: () => resolve(null),
        codec: "spread",
        whole: true,
      });
      slot.worker.postMessage(
        {
          id,
          op: "spread",
          input: packed,
          jobs: mine,
          size: 0,
          out,
          noCrc: !crc,
        },
        [packed.buffer, out.buffer],
      );
    });
    if (!answer) return null;
    for (let k = from, m = 0; k < to; k++, m += 5) {
      into.set(
        answer.filled.subarray(mine[m + 4], mine[m + 4] + mine[m + 3]),
        jobs[k * 5 + 4],
      );
    }
    this.giveBack(answer.filled);
    this.giveBack(answer.input);
    return answer.crcs;
  }

  /**
   * A buffer of `length` bytes for {@linkcode clusters}' input, reused
   * from earlier jobs when one is big enough (a fresh mebibyte array per
   * job is page faults and garbage for V8 to collect late).
   */
  buffer(length: number): Uint8Array<ArrayBuffer> {
    // The smallest spare that fits (they are kept smallest first).
    const k = this.#spares.findIndex((b) => b.byteLength >= length);
    let buffer: ArrayBuffer;
    if (k >= 0) {
      buffer = this.#spares.splice(k, 1)[0];
      this.#spareBytes -= buffer.byteLength;
    } else {
      buffer = new ArrayBuffer(
        Math.ceil(Math.max(1, length) / SPARE_UNIT) * SPARE_UNIT,
      );
    }
    return new Uint8Array(buffer, 0, length);
  }

  /** Takes back a buffer from {@linkcode buffer} or {@linkcode clusters} for reuse. */
  giveBack(bytes: Uint8Array | undefined) {
    const buffer = bytes?.buffer;
    if (
      !(buffer instanceof ArrayBuffer) || buffer.byteLength < SPARE_UNIT ||
      this.#spareBytes + buffer.byteLength > MAX_SPARE_BYTES ||
      this.#spares.includes(buffer)
    ) return;
    let k = 0;
    while (
      k < this.#spares.length && this.#spares[k].byteLength < buffer.byteLength
    ) k++;
    this.#spares.splice(k, 0, buffer);
    this.#spareBytes += buffer.byteLength;
  }

  /**
   * Decodes compressed qcow or qcow2 clusters on a worker (see
   * `_clusters.ts`): `jobs` holds three numbers per cluster (where its
   * packed bytes start in `input`, how many, where its `clusterSize`
   * bytes go in the output). `input` (from {@linkcode buffer}) is
   * transferred and comes back for reuse; in a `SharedArrayBuffer` it is
   * shared instead (the caller leaves it alone until the answer). Without
   * `into`, the output is a buffer of `outLength` bytes, transferred back
   * (give it back with {@linkcode giveBack} once copied); with `into`, a
   * view over a whole `SharedArrayBuffer`, the clusters land there (the
   * third numbers are offsets in it) and the answer's `out` is `into`.
   * Answers the index and codec message of the first cluster that did
   * not decode, or `null` when no worker took the job (the caller
   * decodes it).
   */
  clusters(
    kind: number,
    input: Uint8Array,
    jobs: number[],
    clusterSize: number,
    outLength: number,
    into?: Uint8Array,
  ): Promise<ClustersAnswer | null> {
    const claimed = this.#claim();
    if (!claimed) return Promise.resolve(null);
    const { slot, id } = claimed;
    const shared = (b: ArrayBufferLike) =>
      typeof SharedArrayBuffer === "function" &&
      b instanceof SharedArrayBuffer;
    const sent = input.buffer instanceof ArrayBuffer || shared(input.buffer)
      ? input
      : input.slice();
    const out = into && shared(into.buffer) ? into : this.buffer(outLength);
    const transfer = [sent.buffer, out.buffer].filter((b) =>
      b instanceof ArrayBuffer
    ) as ArrayBuffer[];
    return new Promise((resolve) => {
      this.#pending.set(id, {
        resolve: (answer) => resolve(answer as never),
        reject: () => resolve(null),
        codec: "clusters",
      });
      try {
        slot.worker.postMessage(
          {
            id,
            op: "clusters",
            input: sent,
            jobs,
            size: clusterSize,
            kind,
            out,
          },
          transfer,
        );
      } catch {
        // Shared memory cannot be posted here (a page that is not
        // cross-origin isolated): the caller decodes itself.
        slot.jobs--;
        this.#pending.delete(id);
        resolve(null);
      }
    });
  }

  /**
   * The least busy worker (started if need be) with one more job counted,
   * and an id for the job; undefined where workers cannot run.
   */
  #claim(): { slot: { worker: Worker; jobs: number }; id: number } | undefined {
    if (this.#broken || !this.#start()) return undefined;
    clearTimeout(this.#idle);
    this.#idle = undefined;
    const slot = this.#workers.reduce((a, b) => (b.jobs < a.jobs ? b : a));
    slot.jobs++;
    return { slot, id: this.#next++ };
  }

  #scheduleIdle() {
    if (this.#pending.size || this.#idle !== undefined) return;
    this.#idle = setTimeout(() => {
      this.#idle = undefined;
      if (!this.#pending.size) this.end();
    }, this.#holders ? HELD_IDLE_MS : IDLE_MS);
  }

  /** Ends the workers now; calls in flight resolve `null` (the caller redoes them). */
  end() {
    clearTimeout(this.#idle);
    this.#idle = undefined;
    for (const { worker } of this.#workers) worker.terminate();
    this.#workers = [];
    for (const job of this.#pending.values()) job.resolve(null);
    this.#pending.clear();
    this.#spares = [];
    this.#spareBytes = 0;
  }

  /** Ends the workers when nothing is in flight and no image holds the pool (an image was closed). */
  release() {
    if (!this.#pending.size && !this.#holders) this.end();
  }
}

/** What {@linkcode decodeWorkerStats} answers. */
export interface DecodeWorkerStats {
  /** Decode workers running now. */
  running: number;
  /** Decode workers started since the module loaded. */
  started: number;
  /** Calls the workers answered (a batch of chunks is one). */
  jobs: number;
  /** Workers could not be made or loaded here: codecs run on the caller's thread. */
  broken: boolean;
}

/** The pool every image decoding on workers shares. */
export const codecPool: CodecPool = new CodecPool();

/**
 * How the decode workers fared: whether they loaded (in a browser, from
 * the bundle's `_worker.js`), how many ran and how many calls they
 * answered. For tests and benches; nothing else depends on it.
 *
 * @returns the pool's counts
 *
 * @example
 * ```ts
 * import { decodeWorkerStats } from "../../mod.ts";
 * const { running, started } = decodeWorkerStats();
 * console.log(running <= started); // true
 * ```
 */
export function decodeWorkerStats(): DecodeWorkerStats {
  return codecPool.stats;
}
