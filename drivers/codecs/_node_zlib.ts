/**
 * node:zlib, where the runtime has it (Deno, Deno Deploy, Node): found by
 * feature detection, never imported, so browsers and the bundle go without
 * it. Looked up on first use only: touching `globalThis.process` makes Deno
 * set up its Node layer, about 14 ms of every command's start-up otherwise.
 *
 * This module is browser compatible (it answers undefined there).
 *
 * @module
 */

let found: unknown | null = null;

/**
 * The native handle under a node:zlib inflate or deflate stream (the same
 * in Node and Deno since Node 10): it works from one buffer straight into
 * another, synchronously, and can be reset and used again.
 */
export interface ZlibHandle {
  reset(): void;
  writeSync(
    flush: number,
    input: Uint8Array,
    inputOffset: number,
    inputLength: number,
    output: Uint8Array,
    outputOffset: number,
    outputLength: number,
  ): void;
  onerror: (message: string, errno: number) => void;
}

/**
 * The node:zlib module, or undefined where there is none.
 *
 * @returns the module (its shape is the caller's to check)
 *
 * @example
 * ```ts
 * import { nodeZlibModule } from "./_node_zlib.ts";
 * console.log(typeof nodeZlibModule()); // "object" in Deno, "undefined" in browsers
 * ```
 */
export function nodeZlibModule(): unknown {
  if (found !== null) return found;
  found = undefined;
  try {
    const process = (globalThis as {
      process?: { getBuiltinModule?: (name: string) => unknown };
    }).process;
    found = process?.getBuiltinModule?.("node:zlib");
  } catch {
    // No Node layer: the callers' own code does the work.
  }
  return found;
}
