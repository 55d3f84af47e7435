/**
 * The worker behind `convert -O qcow2 -c`'s parallel compression
 * (`DeflatePool` in `encode.ts`): deflates whole clusters with QEMU's
 * 4 KiB window, one message a batch. Answers `unavailable` where the
 * runtime has no node:zlib (the caller then compresses on its own thread).
 *
 * This module is browser compatible.
 *
 * @module
 */

import { nodeZlibModule } from "../codecs/_node_zlib.ts";

/** A batch: `count` clusters of `clusterSize` bytes back to back. */
interface Job {
  id: number;
  input: Uint8Array;
  clusterSize: number;
}

const scope = globalThis as unknown as {
  onmessage: ((e: MessageEvent<Job>) => void) | null;
  postMessage(message: unknown, transfer?: Transferable[]): void;
};

scope.onmessage = (e) => {
  const { id, input, clusterSize } = e.data;
  const zlib = nodeZlibModule() as
    | {
      deflateRawSync(b: Uint8Array, o: { windowBits: number }): Uint8Array;
    }
    | undefined;
  if (!zlib) {
    scope.postMessage({ id, unavailable: true });
    return;
  }
  try {
    const parts: Uint8Array[] = [];
    let total = 0;
    for (let at = 0; at < input.length; at += clusterSize) {
      const out = zlib.deflateRawSync(input.subarray(at, at + clusterSize), {
        windowBits: 12,
      });
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
