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

import { nodeZlibModule } from "../codecs/_node_zlib.ts";
import { encodeClusters } from "../codecs/zstd_encode.ts";

/** A batch: `count` clusters of `clusterSize` bytes back to back. */
interface Job {
  id: number;
  input: Uint8Array;
  clusterSize: number;
  /** The compression type (zlib when absent). */
  codec?: "zlib" | "zstd";
  /**
   * zstd: where the frames go (a shared buffer, room for frameBound of
   * each cluster); the answer then holds their lengths only.
   */
  output?: Uint8Array;
}

const scope = globalThis as unknown as {
  onmessage: ((e: MessageEvent<Job>) => void) | null;
  postMessage(message: unknown, transfer?: Transferable[]): void;
};

scope.onmessage = (e) => {
  const { id, input, clusterSize, codec, output } = e.data;
  const zlib = nodeZlibModule() as
    | {
      deflateRawSync(b: Uint8Array, o: { windowBits: number }): Uint8Array;
    }
    | undefined;
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
  const compress = zlib && ((b: Uint8Array) =>
    zlib.deflateRawSync(b, {
      windowBits: 12,
    }));
  if (!compress) {
    scope.postMessage({ id, unavailable: true });
    return;
  }
  try {
    const parts: Uint8Array[] = [];
    let total = 0;
    for (let at = 0; at < input.length; at += clusterSize) {
      const out = compress(input.subarray(at, at + clusterSize));
      parts.push(out);
      total += out.length;
    }
    const packed = new Uint8Array(total);
    const lengths = new Uint32Array(parts.length);
    let o = 0;
    parts.forEach((p, i) => {
      packed.set(p, o);
      lengths[i] = p.length;
      o += p.length;
    });
    scope.postMessage({ id, packed, lengths }, [
      packed.buffer,
      lengths.buffer,
    ]);
  } catch (error) {
    scope.postMessage({ id, error: String(error) });
  }
};
