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

import * as adc from "../codecs/adc.ts";
import * as bzip2 from "../codecs/bzip2.ts";
import * as lzfse from "../codecs/lzfse.ts";
import * as xz from "../codecs/xz.ts";
import * as zlib from "../codecs/zlib.ts";

/** The contract every module in drivers/codecs/ keeps. */
interface Codec {
  decode(input: Uint8Array, expectedSize: number): Promise<Uint8Array>;
  encode(input: Uint8Array): Promise<Uint8Array>;
}

/** What the pool sends. */
interface Job {
  id: number;
  op: "decode" | "encode";
  codec: string;
  input: Uint8Array;
  size: number;
}

/** The worker's global scope, typed without the Deno worker lib. */
const scope = globalThis as unknown as {
  onmessage: ((e: MessageEvent<Job>) => void) | null;
  postMessage(message: unknown, transfer?: Transferable[]): void;
};

const CODECS: ReadonlyMap<string, Codec> = new Map<string, Codec>([
  ["adc", adc],
  ["zlib", zlib],
  ["bzip2", bzip2],
  ["lzfse", lzfse],
  ["xz", xz],
]);

scope.onmessage = async (e: MessageEvent<Job>) => {
  const { id, op, codec, input, size } = e.data;
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
