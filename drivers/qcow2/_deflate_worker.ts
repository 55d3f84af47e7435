/**
 * The worker behind `convert -O qcow2 -c`'s parallel compression
 * (`DeflatePool` in `encode.ts`): deflates whole clusters with QEMU's
 * 4 KiB window, or makes a zstd frame of each (`codec: "zstd"`), one
 * message a batch. Answers `unavailable` for deflate where the runtime has
 * no node:zlib (the caller then compresses on its own thread).
 *
 * This module is browser compatible.
 *
 * @module
 */

import { nodeZlibModule, type ZlibHandle } from "../codecs/_node_zlib.ts";
import { encodeClusters } from "../codecs/zstd_encode.ts";

/**
 * A batch: `count` clusters of `clusterSize` bytes back to back. The
 * answer: each cluster's length (`lengths`), the zstd frames back to back
 * or the deflate streams each at the start of its cluster's region
 * (`stride`: clusterSize bytes apart, 0 for a cluster not compressed), in
 * `output` or in `packed`.
 */
interface Job {
  id: number;
  input: Uint8Array;
  clusterSize: number;
  /** The compression type (zlib when absent). */
  codec?: "zlib" | "zstd";
  /**
   * Where the frames go (a shared buffer, room for frameBound of each
   * cluster for zstd, clusterSize for deflate); the answer then holds
   * their lengths only.
   */
  output?: Uint8Array;
}

const scope = globalThis as unknown as {
  onmessage: ((e: MessageEvent<Job>) => void) | null;
  postMessage(message: unknown, transfer?: Transferable[]): void;
};

/** The subset of node:zlib used. */
interface NodeZlib {
  deflateRawSync(
    b: Uint8Array,
    o: { windowBits: number; memLevel: number },
  ): Uint8Array;
  createDeflateRaw(o: { windowBits: number; memLevel: number }): {
    _handle?: ZlibHandle;
    _writeState?: Uint32Array;
  };
}

/** QEMU's deflate settings: a 4 KiB window, memLevel 9 (`qcow2_compress`). */
const SETTINGS = { windowBits: 12, memLevel: 9 };
const Z_FINISH = 4;

/**
 * One deflater for every cluster this worker compresses: the native
 * handle of a node:zlib stream, reset per cluster, writing straight into
 * the shared output (`deflateRawSync` made a stream and a buffer per
 * cluster: garbage V8 collected late, the bench's `-c` at 253-307 MiB of
 * peak RSS). Undefined where node:zlib's internals are not there.
 */
interface Deflater {
  handle: ZlibHandle;
  state: Uint32Array;
  error?: string;
}
let deflater: Deflater | undefined | null = null;

function reusedDeflater(zlib: NodeZlib): Deflater | undefined {
  if (deflater !== null) return deflater;
  deflater = undefined;
  try {
    const stream = zlib.createDeflateRaw(SETTINGS);
    const handle = stream._handle, state = stream._writeState;
    if (
      typeof handle?.writeSync === "function" &&
      typeof handle.reset === "function" &&
      state instanceof Uint32Array && state.length >= 2
    ) {
      const found: Deflater = { handle, state };
      handle.onerror = (message) => found.error = message;
      deflater = found;
    }
  } catch {
    // No usable internals: deflateRawSync per cluster.
  }
  return deflater;
}

/**
 * Deflates the clusters of `input` into `output` (a region of
 * `clusterSize` bytes per cluster) and answers their lengths: 0 for a
 * cluster whose stream would take `clusterSize` bytes or more (QEMU
 * writes those uncompressed: `qcow2_co_compress` into cluster_size - 1).
 */
function deflateInto(
  zlib: NodeZlib,
  input: Uint8Array,
  clusterSize: number,
  output: Uint8Array,
): Uint32Array<ArrayBuffer> {
  const count = Math.ceil(input.length / clusterSize);
  const lengths = new Uint32Array(new ArrayBuffer(count * 4));
  const reused = reusedDeflater(zlib);
  for (let i = 0; i < count; i++) {
    const cluster = input.subarray(i * clusterSize, (i + 1) * clusterSize);
    const room = clusterSize - 1;
    if (reused) {
      reused.error = undefined;
      reused.handle.reset();
      reused.handle.writeSync(
        Z_FINISH,
        cluster,
        0,
        cluster.length,
        output,
        i * clusterSize,
        room,
      );
      if (reused.error !== undefined) {
        throw new Error(`deflate: ${reused.error}`);
      }
      // Room left and no input left: the stream ended (Z_FINISH goes on
      // until one of them runs out).
      const left = reused.state[0];
      lengths[i] = left > 0 && reused.state[1] === 0 ? room - left : 0;
    } else {
      const packed = zlib.deflateRawSync(cluster, SETTINGS);
      if (packed.length <= room) output.set(packed, i * clusterSize);
      lengths[i] = packed.length <= room ? packed.length : 0;
    }
  }
  return lengths;
}

scope.onmessage = (e) => {
  const { id, input, clusterSize, codec, output } = e.data;
  if (codec === "zstd") {
    try {
      // One buffer a batch (see encodeClusters).
      const { packed, lengths } = encodeClusters(input, clusterSize, {
        into: output,
      });
      if (output) scope.postMessage({ id, lengths }, [lengths.buffer]);
      else {
        scope.postMessage({ id, packed, lengths }, [
          packed.buffer as ArrayBuffer,
          lengths.buffer,
        ]);
      }
    } catch (error) {
      scope.postMessage({ id, error: String(error) });
    }
    return;
  }
  const zlib = nodeZlibModule() as NodeZlib | undefined;
  if (!zlib) {
    scope.postMessage({ id, unavailable: true });
    return;
  }
  try {
    // Into the shared output where the caller gave one, else into a
    // buffer of ours moved back (lengths of 0: not compressed).
    const into = output ??
      new Uint8Array(Math.ceil(input.length / clusterSize) * clusterSize);
    const lengths = deflateInto(zlib, input, clusterSize, into);
    if (output) {
      scope.postMessage({ id, lengths, stride: clusterSize }, [lengths.buffer]);
    } else {
      scope.postMessage({ id, packed: into, lengths, stride: clusterSize }, [
        into.buffer as ArrayBuffer,
        lengths.buffer,
      ]);
    }
  } catch (error) {
    scope.postMessage({ id, error: String(error) });
  }
};
