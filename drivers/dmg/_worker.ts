/**
 * The worker behind {@linkcode CodecPool} (`_pool.ts`): runs one codec
 * call per message, `decode(input, size)` or `encode(input)`, and answers
 * with the bytes (transferred), the codec's error message, or
 * `unavailable` when the codec module cannot be loaded here (the caller
 * then runs it on its own thread, where the error is reported properly).
 *
 * It only imports codec modules, which use web-platform APIs; it is
 * started with `new Worker(url, { type: "module" })`.
 *
 * This module is browser compatible.
 *
 * @module
 */

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

const loaded = new Map<string, Promise<Codec>>();
function load(name: string): Promise<Codec> {
  let found = loaded.get(name);
  if (!found) {
    // A computed specifier: lzfse may not exist in this build.
    const path = `../codecs/${name}.ts`;
    found = import(path) as Promise<Codec>;
    loaded.set(name, found);
  }
  return found;
}

scope.onmessage = async (e: MessageEvent<Job>) => {
  const { id, op, codec, input, size } = e.data;
  let module: Codec;
  try {
    module = await load(codec);
  } catch {
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
