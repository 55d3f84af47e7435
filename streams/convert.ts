/**
 * `convert(source, sink, options)`: the pipeline behind `cli.ts convert`.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { isZeroRange, wordsOf } from "../drivers/_binary.ts";
import { loadDriver } from "../drivers/_catalog.ts";
import { checkWriteOptions } from "./options.ts";
import { writeSparse } from "./_sparse.ts";
import { fileMapOf } from "./_file_map.ts";
import type { SalvagedRun } from "./salvage.ts";
import { type Sha256, sha256 } from "./_sha256.ts";
import { BackingFileError } from "./errors.ts";
import {
  type CopyRange,
  dataFileOf,
  type Extent,
  extentsOf,
  type Image,
  type RangeCopySink,
  readInto,
  type Sink,
  type Source,
  type WindowSource,
} from "./types.ts";

/** Options for {@linkcode convert}. */
export interface ConvertOptions {
  /** Output format. @default "raw" */
  format?: string;
  /** Output format options (`-o key=value`). */
  options?: Record<string, string>;
  /** Write compressed where the output format allows (`-c`). */
  compress?: boolean;
  /** Passphrase for output formats that encrypt. */
  key?: string | Uint8Array;
  /** Backing file to record in the output (`-B`), for formats that have one. */
  backingFile?: string;
  /** Format of that backing file. */
  backingFormat?: string;
  /**
   * Creates the files the output names as part of itself (qcow2's
   * `data_file`); see {@linkcode CreateSpec.createFile}.
   */
  createFile?: (name: string) => Promise<Sink>;
  /**
   * The disk `backingFile` holds, opened. With it the output stores only
   * what differs from it (as `qemu-img convert -B` does), zeros included
   * where the backing file has data; without it every data block is
   * written, which reads the same but stores more.
   */
  backing?: Source;
  /** Called as the work advances: bytes of the virtual disk done, and the total. */
  onProgress?: (done: number, total: number) => void;
  /** Compute the SHA-256 of the virtual disk's bytes as written. @default false */
  hash?: boolean;
  /** Stops the conversion (the promise rejects with the signal's reason). */
  signal?: AbortSignal;
  /** Bytes per read. @default 2097152 */
  blockSize?: number;
  /**
   * Reads in flight at most beyond the one awaited. Convert starts with
   * none and adds one each time a read kept it waiting (sources that decode
   * on workers or fetch over the network), up to this. @default 4
   */
  concurrency?: number;
  /**
   * Data blocks that are all zeros are not written (the output stays
   * sparse), checked at this granularity (`-S`); 0 writes every byte,
   * zero runs included, as `qemu-img convert -S 0` does. @default 4096
   */
  sparseSize?: number;
  /**
   * An existing image, opened writable, to write into instead of creating
   * one (`-n`); `sink` is then not used. It must be at least as large as
   * the source; what lies past the source's end is left as it is. Zeros
   * are written wherever the target does not already read as zeros.
   */
  target?: Image;
  /** With `target`: it reads as zeros already, so zeros are not written (`--target-is-zero`). */
  targetIsZero?: boolean;
  /**
   * Unreadable parts of the source become zeros instead of failing the
   * conversion (`--salvage`): each failing read is retried in smaller
   * pieces down to a sector, and the runs given up are listed in
   * `ConvertResult.salvaged` and passed to `onSalvaged`.
   */
  salvage?: boolean;
  /** With `salvage`: called with each run given up as zeros. */
  onSalvaged?: (run: SalvagedRun) => void;
}

/** What {@linkcode convert} did. */
export interface ConvertResult {
  /** The virtual disk's size. */
  size: number;
  /**
   * Bytes of the virtual disk that went to the output as data: the
   * granules (`sparseSize`, 4 KiB by default) that were not all zeros, for
   * every output format. Zero runs and all-zero granules are not counted:
   * they are holes, zero-fill chunks or unallocated clusters. A raw file
   * copied to a raw file in the kernel (Linux, with FFI allowed; no hash,
   * no backing) counts the data ranges the file system reports instead,
   * zero blocks inside them included, as they are copied unread.
   */
  dataBytes: number;
  /** SHA-256 (hex) of the whole virtual disk, when `hash` was set. */
  sha256?: string;
  /** With `salvage`: the runs that could not be read and were written as zeros. */
  salvaged?: SalvagedRun[];
  /**
   * What the output's driver said about the image it made (a fixed VHD
   * rounded up to a whole MiB): the CLI prints these on stderr.
   */
  warnings?: readonly string[];
}

interface Block {
  offset: number;
  length: number;
  bytes?: Promise<Uint8Array>;
  /** The pool buffer `bytes` lies in, to hand back once written. */
  buffer?: Uint8Array;
}

/** What {@linkcode blocks} yields. */
interface ReadBlock {
  offset: number;
  length: number;
  bytes?: Uint8Array;
  buffer?: Uint8Array;
}

/**
 * Blocks of the source in order: data runs split into reads of at most
 * `blockSize` bytes, zero and unallocated runs carried without bytes.
 * Reads run up to `concurrency` ahead of the consumer when the source is
 * slow to answer (see `depth`); memory stays bounded by
 * `blockSize * (concurrency + 1)`, and the writes convert has not waited
 * for yet (at most 2, see WriteChain) hold one block each. With a `pool`
 * (sources that read into a buffer), blocks are read into buffers taken
 * from it and the consumer
 * puts each `buffer` back once done with the bytes: a fresh 2 MiB array
 * per read cost page faults and garbage-collector work, and V8 frees
 * array buffers late, which showed in the peak RSS (`deno task bench`).
 */
async function* blocks(
  source: Source,
  blockSize: number,
  concurrency: number,
  signal?: AbortSignal,
  pool?: Uint8Array[],
): AsyncIterable<ReadBlock> {
  const ahead: Block[] = [];
  let reading = 0; // data blocks in `ahead`
  // Reads issued beyond the one awaited. None at first; one more (up to
  // `concurrency`) each time awaiting a read took a while, as with a source
  // that decodes on workers or fetches over HTTP, where reads in parallel
  // hide each other's wait. A source whose reads are done when issued (a
  // file read synchronously) gains nothing from more, and each buffer more
  // is 2 MiB of fresh memory to fault in: 10-15 ms of a 250 ms vpc
  // convert in `deno task bench` for the four it used to take.
  let depth = 0;
  const take = async (): Promise<ReadBlock> => {
    const b = ahead.shift()!;
    let bytes: Uint8Array | undefined;
    if (b.bytes) {
      reading--;
      const waitFrom = performance.now();
      bytes = await b.bytes;
      if (depth < concurrency && performance.now() - waitFrom > SLOW_WAIT_MS) {
        depth++;
      }
    }
    return { offset: b.offset, length: b.length, bytes, buffer: b.buffer };
  };
  // The allocation map is asked for a window at a time. A window that
  // held no data doubles the next one, so a vast empty stretch (a 128 TiB
  // dmg whose tables cover a few MiB) takes a few dozen map queries, not
  // millions; the first data run brings the window back down.
  const baseWindow = Math.max(blockSize * 16, 64 << 20);
  let window = baseWindow;
  // A raw local file is mapped by its file system's data ranges and holes:
  // raw's own map reads every byte for zero blocks (holes too), and the
  // data was then read again here. Its data runs may hold zero blocks,
  // which every consumer checks for (writeSparse, writeDifferences).
  const fileMap = fileMapOf(source);
  for (let start = 0, length = 0; start < source.size; start += length) {
    length = Math.min(window, source.size - start);
    let sawData = false;
    const runs = await fileMap?.(start, length) ??
      extentsOf(source, start, length);
    for await (const run of runs) {
      signal?.throwIfAborted();
      if (run.kind === "data") sawData = true;
      if (run.kind !== "data") {
        ahead.push({ offset: run.offset, length: run.length });
        // Zero runs need no waiting; pass them on once nothing is before them.
        while (ahead.length && !ahead[0].bytes) yield await take();
        continue;
      }
      for (let at = run.offset; at < run.offset + run.length;) {
        // Align reads to blockSize in disk terms so that drivers see whole
        // chunks where their chunk size divides it.
        const next = Math.min(
          run.offset + run.length,
          (Math.floor(at / blockSize) + 1) * blockSize,
        );
        let buffer: Uint8Array | undefined;
        let bytes: Promise<Uint8Array>;
        if (pool) {
          buffer = pool.pop() ?? pageAligned(blockSize);
          const into = buffer.subarray(0, next - at);
          bytes = readInto(source, at, into).then(() => into);
        } else {
          bytes = source.read(at, next - at);
        }
        bytes.catch(() => {}); // observed when its turn comes
        ahead.push({ offset: at, length: next - at, bytes, buffer });
        reading++;
        at = next;
        while (reading > depth) yield await take();
      }
    }
    window = sawData ? baseWindow : Math.min(window * 2, 2 ** 50);
  }
  while (ahead.length) yield await take();
}

/**
 * Refuses a chain whose bottom layer cannot be read without a parent that
 * was not opened (a differencing vdi, vhdx or VHD, `requiresBacking`):
 * convert skips unallocated runs, which would then be zeros in the output
 * instead of the parent's bytes.
 */
function refuseMissingParent(input: Source): void {
  type Layer = Partial<Image> & { requiresBacking?: boolean };
  let bottom = input as Layer;
  while (bottom.backing) bottom = bottom.backing as Layer;
  if (bottom.requiresBacking) {
    const what = `${bottom.format}: ${
      bottom.name ?? "the image"
    } is a differencing image whose parent was not opened: its unallocated runs are the parent's bytes, so it cannot be converted alone`;
    throw new BackingFileError(
      what,
      bottom.backingFile ?? "",
      `${what} (follow backing files: no --no-backing; a differencing vdi's parent is named with --parent FILE)`,
    );
  }
}

/**
 * Converts `source` (an image) into `sink` as `options.format`. Zero and
 * unallocated runs are never read or written (the output stays sparse), data
 * runs are read in large blocks with several reads in flight and written in
 * order, so a sequential sink (stdout) works too.
 *
 * @param source what to convert (usually an opened Image)
 * @param sink where the output goes
 * @param options output format, progress, hashing, cancellation
 * @returns sizes and the optional SHA-256
 *
 * @example
 * ```ts
 * import { convert, fromBytes, memorySink, open } from "../mod.ts";
 * const image = await open(fromBytes(new Uint8Array(8192).fill(1, 0, 100)));
 * const sink = memorySink();
 * const result = await convert(image, sink, { hash: true });
 * console.log(result.size, sink.bytes().length); // 8192 8192
 * ```
 */
export async function convert(
  input: Source,
  sink: Sink,
  options: ConvertOptions = {},
): Promise<ConvertResult> {
  const format = options.format ?? "raw";
  const into = options.target;
  const out = into ? undefined : await loadDriver(format);
  if (out) checkWriteOptions(out, options.options, options.compress);
  if (options.targetIsZero && !into) {
    throw new TypeError(
      "targetIsZero (--target-is-zero) requires a target (-n)",
    );
  }
  refuseMissingParent(input);
  // (The salvaging reader loads only for --salvage.)
  const rescue = options.salvage
    ? (await import("./salvage.ts")).salvaging(input, {
      onSalvaged: options.onSalvaged,
      signal: options.signal,
    })
    : undefined;
  const source: Source = rescue ?? input;
  const total = source.size;
  if (into && into.size < total) {
    throw new RangeError(
      `the target (${into.size} bytes) is smaller than the input (${total} bytes): output file is smaller than input file`,
    );
  }
  if (into && !into.write) {
    throw new Error(`${into.format}: the target is not open for writing`);
  }
  const blockSize = options.blockSize ?? 2 << 20;
  const concurrency = options.concurrency ?? 4;
  const sparse = options.sparseSize ?? 4096;
  const hasher = options.hash ? await sha256() : undefined;
  const zeros = hasher ? new Uint8Array(blockSize) : undefined;
  options.signal?.throwIfAborted();
  options.onProgress?.(0, total);

  // The whole-image encoders (dmg, cloop, streamOptimized vmdk) read the
  // source themselves, in their own order; the hash is then a second pass.
  if (out?.encode && format !== "raw" && !options.backing) {
    const view = passView(source, hasher, sparse);
    await out.encode(view.source, sink, {
      options: options.options,
      compress: options.compress,
      key: options.key,
      signal: options.signal,
      onProgress: (done) => options.onProgress?.(done, total),
      createFile: options.createFile,
    });
    await sink.flush();
    return { size: total, ...await view.finish(), salvaged: rescue?.salvaged };
  }

  if (out && !out.create) {
    throw new Error(`format '${format}' cannot be written`);
  }
  const direct = !into && out!.name === "raw" && !options.key;
  const target = into ??
    (direct
      ? { write: (o: number, b: Uint8Array) => sink.write(o, b) }
      : await out!.create!(sink, {
        size: total,
        key: options.key,
        options: {
          ...options.options,
          ...(options.compress ? { compress: "on" } : {}),
        },
        backingFile: options.backingFile,
        backingFormat: options.backingFormat,
        backing: options.backing && "format" in options.backing
          ? options.backing as Image
          : undefined,
        createFile: options.createFile,
      }));
  if (!target.write) throw new Error(`${format}: created image is read-only`);
  const write = target.write.bind(target);
  // Reused read buffers only where nothing keeps the bytes after a write:
  // straight into a random-access sink (see `Sink.write`) or a sequential
  // one that copies what it is given (`Sink.copiesWrites`), from a source
  // that reads into a buffer (for the others a copy would cost more).
  // So do the writers of RELEASES_WRITES: their writes are done with the
  // bytes when they answer.
  const pool: Uint8Array[] | undefined = source.readInto &&
      (direct && (!sink.sequential || sink.copiesWrites) ||
        !into && RELEASES_WRITES.has(out!.name) && !options.key &&
          (!sink.sequential || sink.copiesWrites))
    ? []
    : undefined;
  // A random-access raw output is sized first, as qemu-img does: ext4 takes
  // writes inside a file's size with less work than writes that extend it
  // (a plain 768 MiB copy after `sync`: 200 ms against 370-1060 ms). A
  // stream is padded at the end instead.
  const sizedFirst = direct && !sink.sequential;
  if (sizedFirst) await sink.resize?.(total);
  // Zeros the output must be given as writes: every byte with -S 0, and
  // with -n what the target holds (unless it reads as zeros already).
  const zeroFill = sparse === 0
    ? (offset: number, length: number) =>
      writeZeros(write, offset, length, blockSize)
    : into && !options.targetIsZero
    ? (offset: number, length: number) =>
      zeroTarget(into, write, offset, length, blockSize)
    : undefined;
  // The kernel's copy: a plain raw copy only (no -n target, no -S, no
  // salvage, no hash, no backing file to compare with). It copies the
  // ranges the file system holds as they are, so zero blocks an input has
  // allocated stay allocated: an explicit -S (a promise about holes) takes
  // the read path, which finds them.
  if (
    sizedFirst && !hasher && !options.backing && sink.resize && !into &&
    options.sparseSize === undefined && !rescue
  ) {
    const copied = await copyInKernel(
      source,
      sink,
      total,
      blockSize,
      concurrency,
      options,
    );
    if (copied !== undefined) {
      await sink.flush();
      return { size: total, dataBytes: copied };
    }
  }
  let dataBytes = 0;
  let lastYield = performance.now();
  /** Writes one block (and hashes it, reports it) in disk order. */
  const writeBlock = async (block: ReadBlock) => {
    if (options.backing) {
      dataBytes += await writeDifferences(
        write,
        block.offset,
        block.length,
        block.bytes,
        options.backing,
        Math.max(sparse, 512),
      );
    } else if (block.bytes) {
      dataBytes += await writeSparse(
        write,
        block.offset,
        block.bytes,
        sparse,
        zeroFill,
      );
    } else if (zeroFill) {
      await zeroFill(block.offset, block.length);
    }
    if (hasher) hashBlock(hasher, block, zeros!);
    if (block.buffer) pool!.push(block.buffer);
    options.onProgress?.(block.offset + block.length, total);
  };
  // A block's write (into the file, or through the output's driver) is
  // not waited for before the next block is taken (see WriteChain): the
  // writes still run one at a time, in disk order.
  const writes = new WriteChain();
  try {
    for await (
      const block of blocks(
        source,
        blockSize,
        concurrency,
        options.signal,
        pool,
      )
    ) {
      // Reads and writes may all complete as microtasks (sync file ops,
      // memory sources), which would starve timers, signal handlers and
      // abort controllers until the end; give them a turn every 20 ms.
      // (Counting bytes instead cost 4 s of timer waits on a 127 GiB empty
      // VHD, whose zero runs pass 64 MiB at a time.)
      if (performance.now() - lastYield >= 20) {
        await nextTurn();
        lastYield = performance.now();
      }
      options.signal?.throwIfAborted();
      await writes.add(() => writeBlock(block));
    }
    await writes.done();
  } finally {
    // No write from a read buffer runs after convert answers.
    await writes.settled();
  }
  if ("flush" in target && target.flush) {
    await target.flush();
  } else if (!sizedFirst && !into) {
    // Raw: holes left at the end still count towards the disk's size.
    await sink.resize?.(total);
  }
  if (!into) await sink.flush();
  return {
    size: total,
    dataBytes,
    sha256: hasher?.digest(),
    salvaged: rescue?.salvaged,
    warnings: into ? undefined : (target as Partial<Image>).warnings,
  };
}

/**
 * Formats whose created image's `write` keeps no reference to the bytes it
 * was given once it answers (read buffers can be reused, see `pool`): vdi
 * writes a whole new block straight to the sink and copies part of one
 * into its own buffer, awaited; vpc writes the sectors to the sink,
 * awaited.
 */
const RELEASES_WRITES = new Set(["vdi", "vpc"]);

/** Bytes handed to a sink's `copyRanges` (or `copyRange`) at a time (progress and abort between). */
const COPY_CHUNK = 64 << 20;
/** Bytes the kernel copies at a time while a block is decoded (the block is written between). */
const COPY_PIECE = 4 << 20;
/** Runs of the allocation map taken ahead of the reads, and copies waiting, at most. */
const MAX_AHEAD = 1024;

/**
 * What a sink may copy itself from under `source`: the file that holds the
 * bytes and the runs of the disk, `data` runs with a `fileOffset` being
 * stored there as they read. A raw image over its file (a
 * {@linkcode WindowSource}: a bounds-checked view, a fixed VHD's data) is
 * one such run; an image whose driver declared where its plain data lies
 * ({@linkcode dataFileOf}: qcow2, VHD, vdi, vhdx, qed, Parallels) gives
 * its allocation map.
 */
function kernelCopyPlan(
  source: Source,
  total: number,
): { file: Source; runs: AsyncIterable<Extent> | Extent[] } | undefined {
  if ("windowOf" in source) {
    const window = (source as WindowSource).windowOf;
    if (window.offset < 0 || window.offset + total > window.source.size) {
      return undefined;
    }
    return {
      file: window.source,
      runs: total > 0
        ? [{
          offset: 0,
          length: total,
          kind: "data",
          fileOffset: window.offset,
        }]
        : [],
    };
  }
  const file = dataFileOf(source);
  return file && { file, runs: (source as Image).extents(0, total) };
}

/**
 * A raw copy done by the sink itself ({@linkcode RangeCopySink}) from the
 * file under `source` ({@linkcode kernelCopyPlan}): the file adapter copies
 * its data ranges in the kernel and leaves its holes. Zero runs and
 * unallocated runs of an image without a parent are left as holes of the
 * sized output; everything else (compressed clusters, a parent's runs, a
 * range the sink refuses after others were copied) is read through
 * `source` and written. The copies wait in a queue (the map is read up
 * to 1024 runs ahead) and are done while the oldest block read is still
 * being decoded, then at the end. Returns the data bytes written, or
 * `undefined` (nothing written) when the sink cannot copy from that
 * file.
 *
 * `deno task bench raw qcow2 vpc vdi vhdx qed`: see the README's Speed table.
 */
async function copyInKernel(
  source: Source,
  sink: Sink,
  total: number,
  blockSize: number,
  concurrency: number,
  options: ConvertOptions,
): Promise<number | undefined> {
  const plan = "copyRange" in sink ? kernelCopyPlan(source, total) : undefined;
  if (!plan) return undefined;
  const { file, runs } = plan;
  const copier = sink as RangeCopySink;
  const write = (o: number, b: Uint8Array) => sink.write(o, b);
  const image = source as Partial<Image>;
  // Unallocated runs are holes only in an image with no parent at all.
  const inBacking = image.backing !== undefined ||
    image.backingFile !== undefined ||
    (image as { requiresBacking?: boolean }).requiresBacking === true;
  let started = false;
  let dataBytes = 0;
  let lastYield = performance.now();
  // Progress counts the bytes done (copied, written, or left as holes):
  // the kernel's copies run ahead of the reads they overlap (see below),
  // so an offset reached would jump to the end early.
  let done = 0;
  const progress = (bytes: number) => {
    done += bytes;
    options.onProgress?.(Math.min(done, total), total);
  };
  /** A turn for timers and signal handlers every 20 ms (see convert's read loop). */
  const turn = async () => {
    options.signal?.throwIfAborted();
    if (performance.now() - lastYield >= 20) {
      await nextTurn();
      lastYield = performance.now();
    }
  };
  // Runs read through `source` (compressed clusters, a parent's runs) are
  // read a block at a time with up to `concurrency` blocks in flight,
  // written in order. One block at a time left the decode workers idle
  // while this thread wrote each block and read the next one: the bench's
  // zlib qcow2 (one 2 MiB read, two jobs of about 0.5 MiB packed) kept two
  // cores 60 % busy.
  const inFlight: {
    offset: number;
    bytes: Promise<Uint8Array>;
    buffer: Uint8Array;
    ready: boolean;
  }[] = [];
  const spares: Uint8Array[] = [];
  const writes = new WriteChain();
  // The kernel's copies wait in `copies` (runs the allocation map gave,
  // up to MAX_AHEAD runs ahead of the reads) and are done while this
  // thread would wait for a block the workers decode: a compressed qcow2
  // whose plain clusters (incompressible data) come after its compressed
  // ones otherwise copied them alone at the end, the workers idle (the
  // bench's zstd qcow2: 256 MiB, 0.1 s of one core, after the decoding).
  const copies: { from: number; length: number; to: number }[] = [];
  /** Read runs (and holes) taken from the map, not yet started. */
  const ahead: Extent[] = [];
  const iterator = (async function* () {
    yield* runs;
  })();
  let mapDone = false;
  /**
   * Copies up to `most` bytes of the oldest copies waiting, in one call
   * where the sink takes several ranges (a dynamic VHD's 2 MiB blocks,
   * each its own run: the file adapter shares a call's pieces with its
   * second thread, and shared one block at a time they were slower than
   * one thread); reads them where the sink refuses.
   */
  const copyNext = async (most = COPY_CHUNK) => {
    const ranges: CopyRange[] = [];
    let bytes = 0;
    while (copies.length && bytes < most) {
      const c = copies[0];
      const length = Math.min(most - bytes, c.length);
      ranges.push([c.from, length, c.to]);
      bytes += length;
      c.from += length, c.to += length, c.length -= length;
      if (c.length === 0) copies.shift();
    }
    const copied = copier.copyRanges
      ? await copier.copyRanges(file, ranges)
      : await eachRange(ranges);
    if (copied === undefined) {
      for (const [, length, to] of ranges) await readAndWrite(to, length);
    } else {
      dataBytes += copied;
    }
    progress(bytes);
    await turn();
  };
  /**
   * `copyRange` for each of `ranges`, for a sink without `copyRanges`: a
   * range it refuses is read and written.
   */
  const eachRange = async (ranges: CopyRange[]) => {
    let copied = 0;
    for (const [from, length, to] of ranges) {
      const n = await copier.copyRange(file, from, length, to);
      if (n === undefined) await readAndWrite(to, length);
      else copied += n;
    }
    return copied;
  };
  /**
   * A range the sink refused to copy, after others were copied: read
   * through `source` and written, a block at a time (no block of the
   * pipeline is taken, so it can run while blocks wait).
   */
  const readAndWrite = async (offset: number, length: number) => {
    const buffer = new Uint8Array(Math.min(blockSize, length));
    for (let at = offset; at < offset + length; at += buffer.length) {
      const into = buffer.subarray(
        0,
        Math.min(buffer.length, offset + length - at),
      );
      await readInto(source, at, into);
      await writes.add(async () => {
        dataBytes += await writeSparse(write, at, into, 4096);
      });
      await writes.done();
    }
  };
  /** Writes the oldest block read once it is there, copying meanwhile (see {@linkcode WriteChain}). */
  const writeOldest = async () => {
    const block = inFlight[0];
    while (!block.ready && copies.length) await copyNext(COPY_PIECE);
    inFlight.shift();
    const bytes = await block.bytes;
    await writes.add(async () => {
      dataBytes += await writeSparse(write, block.offset, bytes, 4096);
      spares.push(block.buffer);
      progress(bytes.length);
    });
  };
  /** Reads `[offset, offset + length)` through `source`, blocks aligned to `blockSize` on the disk. */
  const copyByReading = async (offset: number, length: number) => {
    for (let at = offset; at < offset + length;) {
      options.signal?.throwIfAborted();
      const next = Math.min(
        offset + length,
        (Math.floor(at / blockSize) + 1) * blockSize,
      );
      if (inFlight.length >= concurrency) await writeOldest();
      const buffer = spares.pop() ?? sharedBlock(blockSize);
      const into = buffer.subarray(0, next - at);
      const block = {
        offset: at,
        bytes: readInto(source, at, into).then(() => into),
        buffer,
        ready: false,
      };
      block.bytes.then(() => block.ready = true, () => block.ready = true);
      inFlight.push(block);
      at = next;
    }
  };
  try {
    // The sink refused the first copy: nothing was written.
    if (!await copyRuns()) return undefined;
    while (inFlight.length) await writeOldest();
    while (copies.length) await copyNext();
    await writes.done();
  } finally {
    // A failure leaves no read running into a buffer, nor a write from
    // one, after it is reported.
    await Promise.allSettled(inFlight.map((b) => b.bytes));
    await writes.settled();
    // The allocation map is let go of where the copy ended early (as the
    // `for await` over it did before it was read ahead).
    await iterator.return(undefined);
  }
  return dataBytes;

  /**
   * Takes runs from the map until MAX_AHEAD read runs wait: copies are
   * queued (the first one is tried at once: false when the sink refused
   * it), holes counted. False when the sink refused the first copy.
   */
  async function fill(): Promise<boolean> {
    while (!mapDone && ahead.length < MAX_AHEAD) {
      const next = await iterator.next();
      if (next.done) {
        mapDone = true;
        break;
      }
      const run = next.value;
      if (run.kind === "data" && run.fileOffset !== undefined) {
        if (!started) {
          // Tried at once: a sink that cannot copy from this file
          // refuses before anything was written.
          const length = Math.min(COPY_CHUNK, run.length);
          const copied = await copier.copyRange(
            file,
            run.fileOffset,
            length,
            run.offset,
          );
          if (copied === undefined) return false;
          started = true;
          dataBytes += copied;
          progress(length);
          if (length < run.length) {
            copies.push({
              from: run.fileOffset + length,
              length: run.length - length,
              to: run.offset + length,
            });
          }
        } else {
          copies.push({
            from: run.fileOffset,
            length: run.length,
            to: run.offset,
          });
        }
        // Bounded: past MAX_AHEAD queued copies, the oldest is done now.
        while (copies.length > MAX_AHEAD) await copyNext();
      } else if (
        run.kind === "data" || (run.kind === "unallocated" && inBacking)
      ) {
        // A copy refused after this is read instead (see copyNext).
        started = true;
        ahead.push(run);
      } else {
        progress(run.length);
      }
      await turn();
    }
    return true;
  }

  /** Reads every read run in disk order, copying while blocks are decoded; false when the sink refused the first copy. */
  async function copyRuns(): Promise<boolean> {
    if (!await fill()) return false;
    while (ahead.length) {
      const run = ahead.shift()!;
      await copyByReading(run.offset, run.length);
      if (!await fill()) return false;
    }
    return true;
  }
}

/**
 * A read buffer in shared memory where there is some: drivers that decode
 * on workers (compressed qcow2 and qcow clusters) have them write the
 * bytes in place, where a buffer of the worker's own was copied in here
 * (512 MiB copied for the bench's compressed qcow2).
 */
function sharedBlock(size: number): Uint8Array {
  return typeof SharedArrayBuffer === "function"
    ? new Uint8Array(new SharedArrayBuffer(size))
    : new Uint8Array(size);
}

/**
 * A zero-filled buffer that starts on a memory page: the memory of a
 * WebAssembly instance, which engines map whole pages for. The kernel copies
 * file bytes to and from such a buffer faster than to and from an
 * ArrayBuffer off the heap (which starts 16 bytes into a page): 211 against
 * 222 ms best, 224 against 242 ms median, for a loop of 2 MiB reads and
 * writes converting the bench's 768 MiB VHD.
 */
function pageAligned(size: number): Uint8Array {
  const page = 65536; // WebAssembly's page size
  if (typeof WebAssembly === "object") {
    try {
      // Shared where the platform allows it: drivers that decode on
      // workers have them write the bytes in place (see sharedBlock).
      const pages = Math.ceil(size / page);
      let memory: WebAssembly.Memory;
      try {
        memory = new WebAssembly.Memory({
          initial: pages,
          maximum: pages,
          shared: true,
        });
      } catch {
        memory = new WebAssembly.Memory({ initial: pages });
      }
      return new Uint8Array(memory.buffer, 0, size);
    } catch { /* no room for one: an ordinary buffer does */ }
  }
  return new Uint8Array(size);
}

/**
 * Writes of blocks, one after another in the order added, that convert
 * does not wait for one by one: with the file sink's big writes on Deno's
 * I/O thread (`file.ts`), convert's loop meanwhile takes the next block
 * that arrived and issues the next read, instead of waiting for the kernel
 * to copy each block into the page cache (most of its main thread for a
 * compressed qcow2). At most `ahead` writes wait; `add` waits for the
 * oldest beyond that, so memory stays bounded (each holds a read buffer).
 * A failed write skips the ones after it and is thrown by the next `add`
 * or by `done`.
 */
class WriteChain {
  #last: Promise<void> = Promise.resolve();
  #waiting: Promise<void>[] = [];
  constructor(readonly ahead = 2) {}

  /** Queues `write` after the writes before it; waits while too many are queued. */
  async add(write: () => Promise<void>): Promise<void> {
    const next = this.#last.then(write);
    next.catch(() => {}); // observed by `add` or `done`
    this.#last = next;
    this.#waiting.push(next);
    while (this.#waiting.length > this.ahead) await this.#waiting.shift();
  }

  /** Waits for every write; throws the first failure. */
  async done(): Promise<void> {
    this.#waiting = [];
    await this.#last;
  }

  /** Waits until no write runs, whether they succeeded or not. */
  async settled(): Promise<void> {
    await this.#last.catch(() => {});
  }
}

/** Awaiting a read longer than this (ms) lets convert keep one more in flight. */
const SLOW_WAIT_MS = 0.5;

const nothing = new Uint8Array(0);

/**
 * Resolves on a later turn of the event loop, where timers and signal
 * handlers run. The hash of nothing, because WebCrypto answers through the
 * event loop, in Deno as in browsers, in about 33 µs; `setTimeout(0)`
 * waits about 2 ms in Deno 2.9 (a tenth of a 0.25 s convert at one turn
 * per 20 ms), and a MessageChannel message lets no signal handler run.
 */
async function nextTurn(): Promise<void> {
  if (globalThis.crypto?.subtle) {
    await crypto.subtle.digest("SHA-256", nothing);
  } else {
    await new Promise((resolve) => setTimeout(resolve, 0));
  }
}

/**
 * `source` as an encoder reads it, followed in disk order: the bytes that
 * arrive are hashed (with `hasher`), so `--hash` costs no second decode,
 * and their non-zero granules counted as `dataBytes`, the meaning convert
 * gives it for every format. Reads may come out of order and several at
 * once: a piece ahead of the prefix done waits as a copy (at most `limit`
 * bytes of them; past that they are dropped and read again at the end),
 * and a gap that the map says is zero (runs encoders skip without
 * reading) is taken as zeros. `finish()` reads whatever the encoder did
 * not (with no hash asked for, it counts the map's data runs instead).
 */
function passView(
  source: Source,
  hasher: Sha256 | undefined,
  granule: number,
  limit = 64 << 20,
): {
  source: Source;
  finish(): Promise<{ dataBytes: number; sha256?: string }>;
} {
  let next = 0;
  let dataBytes = 0;
  let waiting: { offset: number; bytes: Uint8Array }[] = [];
  let waitingBytes = 0;
  let tracking = true;
  let chain = Promise.resolve();
  const fileMap = fileMapOf(source);
  const zeros = new Uint8Array(1 << 20);
  const hashZeros = (length: number) => {
    for (let left = hasher ? length : 0; left > 0; left -= zeros.length) {
      hasher!.update(zeros.subarray(0, Math.min(left, zeros.length)));
    }
    next += length;
  };
  const take = (offset: number, bytes: Uint8Array) => {
    const end = offset + bytes.length;
    if (end <= next) return;
    const fresh = bytes.subarray(next - offset);
    hasher?.update(fresh);
    dataBytes += nonZeroBytes(fresh, next, granule);
    next = end;
  };
  const advance = async () => {
    while (tracking && waiting.length) {
      const at = waiting.findIndex((w) =>
        w.offset <= next && w.offset + w.bytes.length > next
      );
      if (at >= 0) {
        const [w] = waiting.splice(at, 1);
        waitingBytes -= w.bytes.length;
        take(w.offset, w.bytes);
        continue;
      }
      waiting = waiting.filter((w) => w.offset + w.bytes.length > next);
      waitingBytes = waiting.reduce((n, w) => n + w.bytes.length, 0);
      if (!waiting.length) break;
      // A gap before the nearest waiting piece: hashed here only if the
      // map says it is all zeros (the encoder will not read it).
      const gapEnd = Math.min(...waiting.map((w) => w.offset));
      let zeroUntil = next;
      // A raw file's holes from the file system (its own map would read
      // the gap, a 256 MiB hole in the bench's disk, for zero blocks).
      const runs = await fileMap?.(next, gapEnd - next) ??
        extentsOf(source, next, gapEnd - next);
      for await (const e of runs) {
        if (e.kind === "data" || e.offset !== zeroUntil) break;
        zeroUntil = e.offset + e.length;
      }
      if (zeroUntil === next) break;
      hashZeros(zeroUntil - next);
    }
  };
  const arrived = (offset: number, bytes: Uint8Array) => {
    if (!tracking || offset + bytes.length <= next) return;
    if (offset <= next) {
      take(offset, bytes);
    } else {
      waiting.push({ offset, bytes: bytes.slice() });
      waitingBytes += bytes.length;
      if (waitingBytes > limit) {
        tracking = false;
        waiting = [];
        waitingBytes = 0;
        return;
      }
    }
    chain = chain.then(advance);
  };
  const view: Source = {
    size: source.size,
    name: source.name,
    async read(offset, length) {
      const bytes = await source.read(offset, length);
      arrived(offset, bytes);
      return bytes;
    },
    readInto: source.readInto &&
      (async (offset, into) => {
        await source.readInto!(offset, into);
        arrived(offset, into);
      }),
    extents: source.extents?.bind(source),
    close: () => source.close?.() ?? Promise.resolve(),
  };
  // The encoders may map a raw file's holes as the file system does.
  if (fileMap) Object.assign(view, { fileMap });
  return {
    source: view,
    async finish() {
      await chain;
      tracking = false;
      waiting = [];
      const rest = source.size - next;
      if (rest > 0) {
        // (A raw file's data ranges may hold zeros: read and counted.)
        const runs = await fileMap?.(next, rest);
        for await (const e of runs ?? extentsOf(source, next, rest)) {
          if (e.kind !== "data") {
            hashZeros(e.length);
          } else if (!hasher && !runs) {
            dataBytes += e.length;
            next += e.length;
          } else {
            for (let at = e.offset; at < e.offset + e.length; at += 2 << 20) {
              const n = Math.min(2 << 20, e.offset + e.length - at);
              take(at, await source.read(at, n));
            }
          }
        }
      }
      return { dataBytes, sha256: hasher?.digest() };
    },
  };
}

/** The bytes of `bytes` (at disk offset `offset`) in granules that are not all zero. */
function nonZeroBytes(bytes: Uint8Array, offset: number, granule: number) {
  if (granule <= 0) return bytes.length;
  let count = 0;
  const words = wordsOf(bytes);
  for (let i = 0; i < bytes.length;) {
    const end = Math.min(
      bytes.length,
      (Math.floor((offset + i) / granule) + 1) * granule - offset,
    );
    if (!isZeroRange(bytes, words, i, end)) count += end - i;
    i = end;
  }
  return count;
}

function hashBlock(
  hasher: Sha256,
  block: { length: number; bytes?: Uint8Array },
  zeros: Uint8Array,
) {
  if (block.bytes) {
    hasher.update(block.bytes);
    return;
  }
  for (let left = block.length; left > 0; left -= zeros.length) {
    hasher.update(zeros.subarray(0, Math.min(left, zeros.length)));
  }
}

/**
 * Writes the granules of `[offset, offset + length)` whose bytes (`bytes`,
 * or zeros for a zero run) differ from `backing`'s, for an output that
 * reads the rest from `backing`. Past the backing disk's end it reads
 * zeros. Zero runs read only the backing file's data extents. Returns the
 * bytes written.
 */
async function writeDifferences(
  write: (offset: number, bytes: Uint8Array) => Promise<void>,
  offset: number,
  length: number,
  bytes: Uint8Array | undefined,
  backing: Source,
  granule: number,
): Promise<number> {
  const end = offset + length;
  const inBacking = Math.max(0, Math.min(end, backing.size) - offset);
  if (bytes) {
    // Past the backing disk's end it reads as zeros: a sparse write.
    let written = inBacking < length
      ? await writeSparse(
        write,
        offset + inBacking,
        bytes.subarray(inBacking),
        granule,
      )
      : 0;
    if (inBacking === 0) return written;
    const base = await backing.read(offset, inBacking);
    written += await writeRuns(write, offset, base, granule, (i, e) => {
      for (let k = i; k < e; k++) if (bytes[k] !== base[k]) return true;
      return false;
    }, (i, e) => bytes.subarray(i, e));
    return written;
  }
  // A zero run: zeros go where the backing disk has non-zero bytes.
  let written = 0;
  for await (const e of extentsOf(backing, offset, inBacking)) {
    if (e.kind !== "data") continue;
    for (let at = e.offset; at < e.offset + e.length; at += 2 << 20) {
      const n = Math.min(2 << 20, e.offset + e.length - at);
      const base = await backing.read(at, n);
      const words = wordsOf(base);
      written += await writeRuns(
        write,
        at,
        base,
        granule,
        (i, e) => !isZeroRange(base, words, i, e),
        (i, e) => new Uint8Array(e - i),
      );
    }
  }
  return written;
}

/**
 * Writes the runs of granules (aligned to the disk) of `[offset, offset +
 * within.length)` for which `differs` holds, each as `bytesOf` gives it.
 */
async function writeRuns(
  write: (offset: number, bytes: Uint8Array) => Promise<void>,
  offset: number,
  within: Uint8Array,
  granule: number,
  differs: (start: number, end: number) => boolean,
  bytesOf: (start: number, end: number) => Uint8Array,
): Promise<number> {
  let written = 0;
  let runStart = -1;
  const flush = async (to: number) => {
    await write(offset + runStart, bytesOf(runStart, to));
    written += to - runStart;
    runStart = -1;
  };
  for (let i = 0; i < within.length;) {
    const end = Math.min(
      within.length,
      (Math.floor((offset + i) / granule) + 1) * granule - offset,
    );
    if (differs(i, end)) {
      if (runStart < 0) runStart = i;
    } else if (runStart >= 0) await flush(i);
    i = end;
  }
  if (runStart >= 0) await flush(within.length);
  return written;
}

/** Writes `length` zero bytes at `offset`, at most `chunk` at a time. */
async function writeZeros(
  write: (offset: number, bytes: Uint8Array) => Promise<void>,
  offset: number,
  length: number,
  chunk: number,
): Promise<void> {
  const zeros = new Uint8Array(Math.min(chunk, length));
  for (let at = offset; at < offset + length; at += zeros.length) {
    const n = Math.min(zeros.length, offset + length - at);
    await write(at, n === zeros.length ? zeros : zeros.subarray(0, n));
  }
}

/**
 * Makes `[offset, offset + length)` of the existing `target` read as
 * zeros: zeros are written over its data runs, and over its unallocated
 * runs when it names a backing file (they would read from there).
 */
async function zeroTarget(
  target: Image,
  write: (offset: number, bytes: Uint8Array) => Promise<void>,
  offset: number,
  length: number,
  chunk: number,
): Promise<void> {
  const throughBacking = target.backingFile !== undefined ||
    target.backing !== undefined;
  for await (const e of target.extents(offset, length)) {
    if (e.kind === "data" || (e.kind === "unallocated" && throughBacking)) {
      await writeZeros(write, e.offset, e.length, chunk);
    }
  }
}
