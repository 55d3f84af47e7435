/**
 * `convert -O qcow2`: a whole image written in one pass. The header
 * cluster first (written last), the LUKS header when encrypting, then for
 * each L2 table's span of the disk its data clusters (compressed with
 * `-c` where that saves space, packed byte by byte as qemu-img packs
 * them) followed by the L2 table, then the L1 table, the refcount blocks
 * and the refcount table. All-zero clusters stay unallocated.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { alignUp, isZero, setBe32, setBe64 } from "../_binary.ts";
import { nodeZlibModule } from "../codecs/_node_zlib.ts";
import { encode as deflate } from "../codecs/zlib.ts";
import { encodeFrame as zstdFrame, frameBound } from "../codecs/zstd_encode.ts";
import { UnsupportedError } from "../../streams/errors.ts";
import { cipherFor } from "../../streams/decrypt.ts";
import type {
  EncodeOptions,
  SectorCipher,
  Sink,
  Source,
} from "../../streams/types.ts";
import { extentsOf, readInto } from "../../streams/types.ts";
import { fileMapOf } from "../../streams/_file_map.ts";
import {
  headerCluster,
  l1SizeFor,
  newLuks,
  qcow2Settings,
  RefcountCounter,
  refcountStructures,
} from "./layout.ts";

const FORMAT = "qcow2";
const SECTOR = 512;
const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;
/** Bytes gathered before one write to the sink. */
const WRITE_BATCH = 4 << 20;
/** Bytes of the source read at a time. */
const READ_CHUNK = 4 << 20;

/**
 * Raw deflate with a 4 KiB window, as QEMU inflates compressed clusters
 * (`inflateInit2(-12)`): a wider window would make references QEMU cannot
 * follow. Uses node:zlib where the runtime has it; elsewhere only clusters
 * of 4 KiB or less (where the window does not matter) are compressed.
 */
export function clusterDeflater():
  | ((cluster: Uint8Array) => Promise<Uint8Array | undefined>)
  | undefined {
  const zlib = nodeZlibModule() as
    | {
      deflateRawSync(b: Uint8Array, o: { windowBits: number }): Uint8Array;
    }
    | undefined;
  if (zlib) {
    return (cluster) => {
      const out = zlib.deflateRawSync(cluster, { windowBits: 12 });
      return Promise.resolve(
        new Uint8Array(out.buffer, out.byteOffset, out.length),
      );
    };
  }
  return async (cluster) =>
    cluster.length <= 4096 ? await deflate(cluster, "deflate-raw") : undefined;
}

/**
 * The compressor of clusters of `compressionType` (0 zlib, 1 zstd): a
 * zstd cluster is one frame without checksum, as QEMU writes them
 * (`codecs/zstd_encode.ts`).
 */
export function clusterCompressor(
  compressionType: number,
):
  | ((cluster: Uint8Array) => Promise<Uint8Array | undefined>)
  | undefined {
  if (compressionType === 1) {
    return (cluster) => Promise.resolve(zstdFrame(cluster));
  }
  return clusterDeflater();
}

/** The most compressing workers, whatever the core count. */
const MAX_WORKERS = 4;

/**
 * Workers compressing clusters (`_deflate_worker.ts`): node:zlib's deflate
 * and our zstd encoder are synchronous, so on one thread `-c` used one
 * core. Where workers cannot start, or have no node:zlib for deflate,
 * `deflate` answers undefined and the caller compresses on its own thread.
 * In browsers (the bundle's `dist/_deflate_worker.js`) zstd clusters are
 * compressed on the workers; zlib ones are not (no node:zlib there, and
 * CompressionStream cannot keep QEMU's 4 KiB window: only clusters of
 * 4 KiB or less are deflated, on the page's thread).
 */
class DeflatePool {
  constructor(readonly codec: "zlib" | "zstd" = "zlib") {}
  #workers: Worker[] = [];
  #pending = new Map<
    number,
    {
      resolve(out: (Uint8Array | undefined)[] | undefined): void;
      reject(e: Error): void;
      /** Where a zstd worker writes its frames (shared memory). */
      output?: Uint8Array;
    }
  >();
  #next = 1;
  #broken = typeof Worker === "undefined";
  /** Per slot (two batches in flight): the clusters, shared. */
  #shared: Uint8Array[] = [0, 1, 2].map(() => new Uint8Array(0));
  /** Per slot: zstd frames, written by the workers (no buffer per batch). */
  #sharedOut: Uint8Array[] = [0, 1, 2].map(() => new Uint8Array(0));

  #start(): boolean {
    if (this.#broken) return false;
    if (this.#workers.length) return true;
    try {
      const cores = (globalThis.navigator as { hardwareConcurrency?: number })
        ?.hardwareConcurrency ?? 2;
      // From source this module is a .ts file; bundled (deno task bundle),
      // it is inside dist/mod.js and the worker is dist/_deflate_worker.js.
      const url = new URL(
        import.meta.url.endsWith(".ts")
          ? "./_deflate_worker.ts"
          : "./_deflate_worker.js",
        import.meta.url,
      );
      for (let i = 0; i < Math.max(1, Math.min(MAX_WORKERS, cores)); i++) {
        const worker = new Worker(url, { type: "module" });
        worker.onmessage = (e: MessageEvent) => {
          const { id, lengths, error, unavailable, stride } = e.data;
          const job = this.#pending.get(id);
          this.#pending.delete(id);
          if (!job) return;
          if (error !== undefined) job.reject(new Error(String(error)));
          else if (unavailable) job.resolve(undefined);
          else {
            // The frames: in the message, or in the worker's share of the
            // shared output buffer.
            // zstd's back to back, deflate's `stride` bytes apart (a
            // length of 0: not compressed).
            const packed = (e.data.packed ?? job.output) as Uint8Array;
            const out: (Uint8Array | undefined)[] = [];
            let o = 0;
            for (const n of lengths as Uint32Array) {
              out.push(
                stride && n === 0 ? undefined : packed.subarray(o, o + n),
              );
              o += stride ?? n;
            }
            job.resolve(out);
          }
        };
        worker.onerror = (e: Event) => {
          e.preventDefault();
          this.#broken = true;
          for (const job of this.#pending.values()) job.resolve(undefined);
          this.#pending.clear();
        };
        this.#workers.push(worker);
      }
      return true;
    } catch {
      this.#broken = true;
      this.close();
      return false;
    }
  }

  /**
   * Deflates `clusters` (undefined entries are skipped) on the workers, a
   * share each; undefined when the workers cannot. The clusters are
   * copied before the call returns its promise; the frames stay valid
   * until the next call with the same `slot` (0, 1 or 2: the encoder's read buffers; two batches may be
   * in flight).
   */
  async deflate(
    clusters: (Uint8Array | undefined)[],
    clusterSize: number,
    slot = 0,
  ): Promise<(Uint8Array | undefined)[] | undefined> {
    if (!this.#start()) return undefined;
    const wanted = clusters.flatMap((c, i) => c ? [i] : []);
    const share = Math.ceil(wanted.length / this.#workers.length);
    // One shared buffer for every batch where the platform has them (the
    // clusters copied in once, no buffer per batch for V8 to free late:
    // peak RSS of -c on 256 MiB went from 233 to 188 MiB; 125 on one thread).
    const bytes = wanted.length * clusterSize;
    if (
      typeof SharedArrayBuffer !== "undefined" &&
      this.#shared[slot].length < bytes
    ) {
      this.#shared[slot] = new Uint8Array(new SharedArrayBuffer(bytes));
    }
    // zstd frames go to a shared buffer too, each worker a region of
    // frameBound per cluster (the frames are copied out, by the Appender,
    // before the next batch): 30 000 fewer page faults for 256 MiB.
    // Deflate streams likewise, each in a region of clusterSize (QEMU
    // stores a cluster whose stream does not fit in clusterSize - 1 bytes
    // uncompressed).
    const bound = this.codec === "zstd" ? frameBound(clusterSize) : clusterSize;
    if (
      typeof SharedArrayBuffer !== "undefined" &&
      this.#sharedOut[slot].length < wanted.length * bound
    ) {
      this.#sharedOut[slot] = new Uint8Array(
        new SharedArrayBuffer(wanted.length * bound),
      );
    }
    const jobs = this.#workers.map((worker, w) => {
      const mine = wanted.slice(w * share, (w + 1) * share);
      if (!mine.length) return Promise.resolve({ mine, out: [] });
      const start = w * share * clusterSize;
      const shared = this.#shared[slot].length >= bytes;
      const input = shared
        ? this.#shared[slot].subarray(start, start + mine.length * clusterSize)
        : new Uint8Array(mine.length * clusterSize);
      mine.forEach((i, k) => input.set(clusters[i]!, k * clusterSize));
      const id = this.#next++;
      const output = this.#sharedOut[slot].length >= wanted.length * bound
        ? this.#sharedOut[slot].subarray(
          w * share * bound,
          (w * share + mine.length) * bound,
        )
        : undefined;
      return new Promise<
        { mine: number[]; out: (Uint8Array | undefined)[] | undefined }
      >(
        (resolve, reject) => {
          this.#pending.set(id, {
            resolve: (out) => resolve({ mine, out }),
            reject,
            output,
          });
          worker.postMessage(
            { id, input, clusterSize, codec: this.codec, output },
            shared ? [] : [input.buffer as ArrayBuffer],
          );
        },
      );
    });
    const results = await Promise.all(jobs);
    if (results.some((r) => r.mine.length && !r.out)) {
      this.#broken = true;
      return undefined;
    }
    const out: (Uint8Array | undefined)[] = new Array(clusters.length);
    for (const { mine, out: packed } of results) {
      mine.forEach((i, k) => out[i] = packed![k]);
    }
    return out;
  }

  /** Ends the workers. */
  close() {
    for (const w of this.#workers) w.terminate();
    this.#workers = [];
  }
}

/**
 * Appends bytes at increasing offsets, written in batches. Each push is
 * copied into one batch buffer reused for the whole image (a sink keeps
 * no reference after its write settles), so callers may reuse theirs:
 * a fresh batch and a fresh read a chunk page-faulted 256 MiB of new
 * memory per 256 MiB converted (70 000 minor faults against qemu-img's
 * 2 000, a fifth of `convert -c`'s CPU beside the compression).
 */
class Appender {
  #batch = new Uint8Array(0);
  #pending = 0;
  #start: number;
  constructor(readonly sink: Sink, public at: number) {
    this.#start = at;
  }
  /** Appends `bytes` at `this.at` (copied: the caller may reuse them). */
  async push(bytes: Uint8Array) {
    if (this.#pending + bytes.length > WRITE_BATCH) await this.flush();
    if (bytes.length >= WRITE_BATCH) {
      // Past a batch (a big L1 table): written as it is.
      await this.sink.write(this.at, bytes);
      this.at += bytes.length;
      this.#start = this.at;
      return;
    }
    if (this.#batch.length === 0) this.#batch = new Uint8Array(WRITE_BATCH);
    this.#batch.set(bytes, this.#pending);
    this.#pending += bytes.length;
    this.at += bytes.length;
  }
  /**
   * Writes `bytes` at `this.at` from the caller's buffer (nothing may be
   * batched: `flush` first): not copied, so the caller keeps the buffer untouched until
   * the answer settles.
   */
  direct(bytes: Uint8Array): Promise<void> {
    if (this.#pending > 0) throw new Error("Appender: flush before direct");
    const at = this.at;
    this.at += bytes.length;
    this.#start = this.at;
    return this.sink.write(at, bytes);
  }
  /** Moves to `to` (forward): a hole, left sparse. */
  async skipTo(to: number) {
    if (to === this.at) return;
    await this.flush();
    this.at = to;
    this.#start = to;
  }
  async flush() {
    if (this.#pending > 0) {
      await this.sink.write(
        this.#start,
        this.#batch.subarray(0, this.#pending),
      );
    }
    this.#pending = 0;
    this.#start = this.at;
  }
}

/**
 * Writes `source` as a qcow2 image on `sink` (see the module notes).
 *
 * @param source the disk to write
 * @param sink a random-access sink
 * @param options `-o` options, `compress`, `key`, progress and abort
 */
export async function encodeQcow2(
  source: Source,
  sink: Sink,
  options: EncodeOptions,
): Promise<void> {
  if (sink.sequential) {
    throw new UnsupportedError(
      { format: FORMAT },
      "qcow2's header and tables are written last, at the start of the file: a sequential sink (a stream) cannot hold one",
    );
  }
  const s = qcow2Settings(options.options, options.key);
  if (s.backingFile !== undefined) {
    throw new UnsupportedError(
      { format: FORMAT, field: "backing_file", value: s.backingFile },
      "convert writes a whole image: use create -b for an overlay",
    );
  }
  if (s.encrypt && options.compress) {
    throw new UnsupportedError(
      { format: FORMAT },
      "qcow2 stores compressed clusters unencrypted: choose compression or encryption",
    );
  }
  const clusterSize = 2 ** s.clusterBits;
  const entryBytes = s.extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / entryBytes;
  const span = clusterSize * l2Entries;
  const size = alignUp(source.size, SECTOR);
  const l1Size = l1SizeFor(s, size);
  const counter = new RefcountCounter(s.refcountOrder);
  counter.add(0); // the header
  let next = clusterSize;
  let cipher: SectorCipher | undefined;
  let crypto: { offset: number; length: number } | undefined;
  if (s.encrypt === "luks") {
    const luks = await newLuks(s, options.key!);
    crypto = { offset: next, length: luks.bytes.length };
    await sink.write(next, luks.bytes);
    const clusters = Math.ceil(luks.bytes.length / clusterSize);
    counter.add(next / clusterSize, next / clusterSize + clusters);
    next += clusters * clusterSize;
    cipher = luks.cipher;
  } else if (s.encrypt === "aes") {
    cipher = cipherFor("qcow-aes", options.key!);
  }
  if (s.dataFile !== undefined && options.compress) {
    throw new UnsupportedError(
      { format: FORMAT, field: "data_file", value: s.dataFile },
      "compressed clusters cannot be written with an external data file (qemu-img refuses them too)",
    );
  }
  // data_file: the guest's clusters go to the external file at their guest
  // offsets (qemu's rule, raw or not); this file keeps the tables only.
  let dataOut: Appender | undefined;
  if (s.dataFile !== undefined) {
    if (s.encrypt) {
      throw new UnsupportedError(
        { format: FORMAT, field: "data_file", value: s.dataFile },
        "encryption with an external data file is not written",
      );
    }
    if (!options.createFile) {
      throw new UnsupportedError(
        { format: FORMAT, field: "data_file", value: s.dataFile },
        "an external data file needs a way to create it (the createFile option)",
      );
    }
    dataOut = new Appender(await options.createFile(s.dataFile), 0);
  }
  const deflater = options.compress
    ? clusterCompressor(s.compressionType)
    : undefined;
  const pool = deflater
    ? new DeflatePool(s.compressionType === 1 ? "zstd" : "zlib")
    : undefined;
  try {
    await encodeBody();
  } finally {
    pool?.close();
  }
  async function encodeBody() {
    const offsetBits = BigInt(62 - (s.clusterBits - 8));
    const out = new Appender(sink, next);
    const l1 = new Uint8Array(l1Size * 8);
    // data_file_raw implies metadata preallocation, as in qemu-img: every
    // cluster mapped, so that the data file reads as the disk.
    const metadata = s.preallocation === "metadata" || s.dataFileRaw;
    // Three read buffers in turn: one read, one compressed or written,
    // one whose bytes the file may still be taking (see `writing`).
    const readBuffers = [0, 1, 2].map(() => new Uint8Array(0));
    /**
     * Per read buffer, the writes straight from it that may still run: a
     * plain image's runs of data clusters go to the file from the read
     * buffer (no copy into the Appender's batch: 768 MiB of memcpy in the
     * bench's disk), not waited for until the buffer is read into again,
     * so the file takes them (on Deno's I/O thread) while the next chunk
     * is read.
     */
    const writing: Promise<void>[] = [0, 1, 2].map(() => Promise.resolve());
    const direct = !deflater && !cipher && !dataOut;
    /** A raw file's data ranges, where the file system can say (see `fileMapOf`). */
    const fileMap = fileMapOf(source);
    /** Whether the map holds any data in the range (zero runs are never read). */
    const holdsData = async (offset: number, length: number) => {
      const runs = await fileMap?.(offset, length);
      if (runs) return runs.some((e) => e.kind === "data");
      for await (const e of extentsOf(source, offset, length)) {
        if (e.kind === "data") return true;
      }
      return false;
    };

    for (let group = 0; group < l1Size; group++) {
      options.signal?.throwIfAborted();
      const start = group * span;
      const length = Math.min(span, source.size - start);
      const hasData = metadata ||
        (length > 0 && await holdsData(start, length));
      if (!hasData) {
        options.onProgress?.(Math.min(source.size, start + span));
        continue;
      }
      const table = new Uint8Array(clusterSize);
      const clusters = Math.ceil(Math.min(span, size - start) / clusterSize);
      /**
       * Reads the chunk of clusters from `c0` into the buffer of `slot` and
       * hands it to the workers: the next chunk is read and compressed
       * while this one is written (one chunk at a time, each hand-over
       * waited for the scheduler: wall time 2.4 times qemu-img's at load
       * 14 for 0.95 of its CPU).
       */
      const prepare = async (c0: number, slot: number) => {
        // A chunk of whole clusters, read only where the source has data.
        const chunkClusters = Math.min(
          clusters - c0,
          Math.max(1, Math.floor(READ_CHUNK / clusterSize)),
        );
        const chunkStart = start + c0 * clusterSize;
        const chunkLength = Math.max(
          0,
          Math.min(chunkClusters * clusterSize, source.size - chunkStart),
        );
        // Read into three buffers used in turn: the direct path writes
        // from them (awaited before one is read into again); what else
        // outlives the chunk is copied (the Appender, the workers' shared
        // buffer, the cipher's copy).
        let data: Uint8Array | undefined;
        if (chunkLength > 0 && await holdsData(chunkStart, chunkLength)) {
          // The slot's bytes may still be on their way to the file.
          await writing[slot];
          if (readBuffers[slot].length < chunkLength) {
            readBuffers[slot] = new Uint8Array(chunkLength);
          }
          data = readBuffers[slot].subarray(0, chunkLength);
          await readInto(source, chunkStart, data);
        }
        // The chunk's clusters, padded to whole ones; undefined for zeros.
        const chunk: (Uint8Array | undefined)[] = [];
        for (let i = 0; i < chunkClusters; i++) {
          const cluster = data?.subarray(
            i * clusterSize,
            (i + 1) * clusterSize,
          );
          if (!cluster || isZero(cluster)) chunk.push(undefined);
          else if (cluster.length === clusterSize) chunk.push(cluster);
          else {
            const padded = new Uint8Array(clusterSize);
            padded.set(cluster);
            chunk.push(padded);
          }
        }
        const packing = deflater && pool
          ? pool.deflate(chunk, clusterSize, slot)
          : undefined;
        // Awaited after the next chunk is read; a failure meanwhile is not
        // an unhandled rejection.
        packing?.catch(() => {});
        return { c0, chunkClusters, chunkStart, chunkLength, chunk, packing };
      };
      let slot = 0;
      let next = clusters > 0 ? await prepare(0, slot) : undefined;
      while (next) {
        const { c0, chunkClusters, chunkStart, chunkLength, chunk, packing } =
          next;
        const mine = slot;
        slot = (slot + 1) % 3;
        next = c0 + chunkClusters < clusters
          ? await prepare(c0 + chunkClusters, slot)
          : undefined;
        const packedAll = packing ? await packing : undefined;
        for (let i = 0; i < chunkClusters; i++) {
          const index = c0 + i;
          let cluster = chunk[i];
          const guest = start + index * clusterSize;
          if (dataOut) {
            // Data clusters at their guest offsets in the data file (zeros
            // are its holes); not counted here: they are not in this file.
            if (!cluster && !metadata) continue;
            if (cluster) {
              await dataOut.skipTo(guest);
              await dataOut.push(
                cluster.subarray(0, Math.min(clusterSize, size - guest)),
              );
            }
            setBe64(table, index * entryBytes, COPIED | BigInt(guest));
            if (s.extendedL2) {
              setBe32(table, index * entryBytes + 12, 0xffffffff);
            }
            continue;
          }
          if (!cluster) {
            if (metadata) {
              // Allocated, its bytes a hole in the file (zeros).
              const at = alignUp(out.at, clusterSize);
              await out.skipTo(at + clusterSize);
              counter.add(at / clusterSize);
              setBe64(table, index * entryBytes, COPIED | BigInt(at));
              if (s.extendedL2) {
                setBe32(table, index * entryBytes + 12, 0xffffffff);
              }
            }
            continue;
          }
          if (deflater) {
            const packed = packedAll ? packedAll[i] : await deflater(cluster);
            if (packed && packed.length < clusterSize) {
              const last = (a: number) =>
                Math.floor((a + packed.length - 1) / clusterSize);
              // A host cluster holds as many compressed clusters as its
              // refcount can count (qemu-img's rule too): past a full one.
              let at = out.at;
              for (;;) {
                let full = -1;
                for (let k = Math.floor(at / clusterSize); k <= last(at); k++) {
                  if (counter.get(k) >= counter.max) full = k;
                }
                if (full < 0) break;
                at = (full + 1) * clusterSize;
              }
              if (at !== out.at) await out.skipTo(at);
              const sectors = Math.floor((at + packed.length - 1) / SECTOR) -
                Math.floor(at / SECTOR);
              setBe64(
                table,
                index * entryBytes,
                COMPRESSED | (BigInt(sectors) << offsetBits) | BigInt(at),
              );
              counter.add(Math.floor(at / clusterSize), last(at) + 1);
              await out.push(packed);
              continue;
            }
          }
          const at = alignUp(out.at, clusterSize);
          await out.skipTo(at);
          if (direct && cluster.length === clusterSize) {
            // The run of whole data clusters from here: one write from
            // the read buffer, at consecutive clusters of the file.
            let n = 1;
            for (; i + n < chunkClusters; n++) {
              // (Not a padded copy: the next bytes of the same buffer.)
              const c = chunk[i + n];
              if (
                c?.buffer !== cluster.buffer ||
                c.byteOffset !== cluster.byteOffset + n * clusterSize ||
                c.length !== clusterSize
              ) break;
            }
            for (let k = 0; k < n; k++) {
              setBe64(
                table,
                (index + k) * entryBytes,
                COPIED | BigInt(at + k * clusterSize),
              );
              if (s.extendedL2) {
                setBe32(table, (index + k) * entryBytes + 12, 0xffffffff);
              }
            }
            counter.add(at / clusterSize, at / clusterSize + n);
            // The clusters lie one after the other in the read buffer.
            const bytes = new Uint8Array(
              cluster.buffer,
              cluster.byteOffset,
              n * clusterSize,
            );
            await out.flush();
            const done = Promise.all([writing[mine], out.direct(bytes)]);
            writing[mine] = done.then(() => {});
            // Awaited before the buffer is read into again (and at the end).
            writing[mine].catch(() => {});
            i += n - 1;
            continue;
          }
          if (cipher) {
            cluster = cluster.slice();
            const sector = s.encrypt === "luks"
              ? at
              : start + index * clusterSize;
            await cipher.encrypt(sector / SECTOR, cluster);
          }
          setBe64(table, index * entryBytes, COPIED | BigInt(at));
          if (s.extendedL2) setBe32(table, index * entryBytes + 12, 0xffffffff);
          counter.add(at / clusterSize);
          await out.push(cluster);
        }
        options.onProgress?.(Math.min(source.size, chunkStart + chunkLength));
      }
      // A group whose clusters all came out zero (a file's data range of
      // written zeros: the file-system map says data) gets no table, as
      // with qemu-img; an entry set is never all zero bits (COPIED).
      if (!metadata && isZero(table)) continue;
      const tableAt = alignUp(out.at, clusterSize);
      await out.skipTo(tableAt);
      await out.push(table);
      counter.add(tableAt / clusterSize);
      setBe64(l1, group * 8, COPIED | BigInt(tableAt));
    }
    await Promise.all(writing);
    const l1At = alignUp(out.at, clusterSize);
    await out.skipTo(l1At);
    const l1Bytes = new Uint8Array(
      Math.max(1, Math.ceil(l1.length / clusterSize)) * clusterSize,
    );
    l1Bytes.set(l1);
    await out.push(l1Bytes);
    counter.add(
      l1At / clusterSize,
      l1At / clusterSize + l1Bytes.length / clusterSize,
    );
    await out.flush();
    if (dataOut) {
      await dataOut.flush();
      await dataOut.sink.resize?.(size);
      await dataOut.sink.flush();
    }
    const refcounts = refcountStructures(
      counter,
      s.clusterBits,
      (l1At + l1Bytes.length) / clusterSize,
    );
    await sink.write(l1At + l1Bytes.length, refcounts.bytes);
    const header = headerCluster(s, {
      size,
      l1TableOffset: l1At,
      l1Size,
      refcountTableOffset: refcounts.tableOffset,
      refcountTableClusters: refcounts.tableClusters,
      crypto,
    });
    await sink.write(0, header);
    await sink.flush();
  }
}
