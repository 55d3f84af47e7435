/**
 * The WebAssembly decoders' hot loops (LZMA, LZ4, LZO1X, LZFSE, LZVN, CRC-64,
 * bzip2 blocks, and the whole of inflate where there is no native one), written in C in
 * `drivers/codecs/_wasm/` and built by `tools/build_wasm.sh` into
 * `_wasm_module.ts` (base64, so the module loads by URL, in the browser
 * bundle and on Deno Deploy without a fetch or a permission).
 *
 * Each decode takes an instance (its own linear memory) from a small free
 * list and gives it back: the memory grows to what the largest chunk
 * needed and is reused for the next. Where WebAssembly is missing or
 * cannot compile synchronously (Chrome refuses modules over 4 KiB on a
 * page's main thread), {@linkcode acquireWasm} answers `undefined` and the
 * codec runs its TypeScript decoder; the module then compiles in the
 * background for later calls.
 *
 * Measured with `deno task bench codecs` (see the README's Codecs
 * section): the TypeScript LZMA decoder ran at 0.44 of `xz -d`'s speed per
 * core, LZ4 at 0.28 of `lz4 -d`, LZO1X at 0.46 of `lzop -d`.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { WASM_BASE64, WASM_ZSTD_SIMD_BASE64 } from "./_wasm_module.ts";

/** Spare bytes kept after every region (the C code's SLACK). */
export const WASM_SLACK = 32;

/** The largest linear memory an instance grows to; past it the TypeScript decoders run. */
export const MAX_WASM_MEMORY = 1 << 30;

/**
 * The largest output decoded through linear memory and then copied out
 * (LZ4, LZO1X, LZFSE, whole-buffer xz windows). Past it the TypeScript
 * decoder writes straight into the output (LZ4, LZO1X), or only a window
 * of it is in linear memory (LZFSE, xz with a smaller dictionary): a copy
 * would hold the output twice (a 64 MiB dmg chunk on two workers would
 * pass 256 MiB of RSS).
 */
export const WASM_COPY_LIMIT = 32 << 20;

/** An instance whose memory grew past this is not kept for reuse (the next large chunk grows a fresh one). */
const MAX_IDLE_MEMORY = WASM_COPY_LIMIT + (16 << 20);

/** The module's exports (see drivers/codecs/_wasm/*.c). */
export interface WasmExports {
  memory: WebAssembly.Memory;
  __heap_base: WebAssembly.Global;
  lzma_state_size(): number;
  lzma_set_props(state: number, lc: number, lp: number, pb: number): void;
  lzma_reset(state: number): void;
  lzma_chunk(
    state: number,
    input: number,
    packed: number,
    out: number,
    op: number,
    unpacked: number,
    lower: number,
    posDelta: number,
    dictSize: number,
  ): number;
  lz4_decode(input: number, n: number, out: number, size: number): number;
  lzo_decode(input: number, n: number, out: number, size: number): number;
  crc64_update(low: number, high: number, at: number, n: number): number;
  crc64_high(): number;
  lzfse_literals(
    table: number,
    input: number,
    start: number,
    end: number,
    bits: number,
    s0: number,
    s1: number,
    s2: number,
    s3: number,
    count: number,
    literals: number,
  ): number;
  lzfse_lmd(
    tables: number,
    input: number,
    start: number,
    end: number,
    bits: number,
    lState: number,
    mState: number,
    dState: number,
    matches: number,
    literals: number,
    literalsAt: number,
    out: number,
    dst: number,
    blockEnd: number,
  ): number;
  zstd_ctx_size(): number;
  zstd_reset(ctx: number): void;
  zstd_block(
    ctx: number,
    src: number,
    size: number,
    out: number,
    cap: number,
    history: number,
  ): number;
  zstd_hash_reset(ctx: number): void;
  zstd_hash_update(ctx: number, at: number, n: number): void;
  zstd_hash_low32(ctx: number): number;
  lzvn_decode(
    input: number,
    src: number,
    srcEnd: number,
    out: number,
    dst: number,
    dstEnd: number,
  ): number;
  inflate_decode(
    input: number,
    n: number,
    out: number,
    cap: number,
    format: number,
  ): number;
  crc32_update(previous: number, at: number, n: number): number;
  bz2_work_size(level: number): number;
  bz2_block(
    input: number,
    n: number,
    bitpos: number,
    level: number,
    work: number,
  ): number;
  bz2_bitpos(): number;
  bz2_detail_a(): number;
  bz2_detail_b(): number;
  bz2_bwt(): void;
  bz2_output(out: number, cap: number): number;
  bz2_done(): number;
  bz2_crc(): number;
  zstd_enc_work_size(n: number): number;
  zstd_enc_frame(
    input: number,
    n: number,
    out: number,
    work: number,
    level: number,
  ): number;
}

/** One instance of the module: its exports and its memory as bytes. */
export class WasmInstance {
  /** The C functions. */
  readonly exports: WasmExports;
  /** The first free byte of linear memory (after the C stack). */
  readonly heapBase: number;
  #bytes: Uint8Array;

  /** True for an instance of the zstd-only SIMD module (see {@linkcode acquireZstdWasm}). */
  readonly simd: boolean;

  constructor(module: WebAssembly.Module, simd = false) {
    this.simd = simd;
    const instance = new WebAssembly.Instance(module, {});
    this.exports = instance.exports as unknown as WasmExports;
    this.heapBase = (this.exports.__heap_base.value as number) >>> 0;
    this.#bytes = new Uint8Array(this.exports.memory.buffer);
  }

  /** Linear memory as bytes (a new view after the memory grew). */
  get bytes(): Uint8Array {
    if (this.#bytes.buffer !== this.exports.memory.buffer) {
      this.#bytes = new Uint8Array(this.exports.memory.buffer);
    }
    return this.#bytes;
  }

  /**
   * Grows linear memory to at least `size` bytes; false when that is
   * over {@linkcode MAX_WASM_MEMORY}.
   */
  ensure(size: number): boolean {
    if (size > MAX_WASM_MEMORY) return false;
    const memory = this.exports.memory;
    const have = memory.buffer.byteLength;
    if (size > have) memory.grow(Math.ceil((size - have) / 65536));
    return true;
  }
}

let compiled: WebAssembly.Module | null | undefined;
/**
 * The compile started in the background where the engine would not
 * compile synchronously (a page's main thread); it sets `compiled`.
 */
let compiling: Promise<WebAssembly.Module | null> | undefined;
let enabled = true;
/** Idle instances, at most {@linkcode MAX_IDLE}. */
const idle: WasmInstance[] = [];
const MAX_IDLE = 2;

function moduleBytes(base64 = WASM_BASE64): Uint8Array<ArrayBuffer> {
  const text = atob(base64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes;
}

/**
 * The compiled module, or undefined while it cannot be had synchronously
 * (compiling in the background) or at all (no WebAssembly, or the engine
 * refuses it). Compiled once per process, refused or not.
 */
function wasmModule(): WebAssembly.Module | undefined {
  if (compiled !== undefined || compiling) return compiled ?? undefined;
  if (typeof WebAssembly !== "object") {
    compiled = null;
    return undefined;
  }
  const bytes = moduleBytes();
  try {
    compiled = new WebAssembly.Module(bytes);
  } catch {
    // A page's main thread may only compile small modules synchronously:
    // compile in the background, and use it once it is there.
    compiling = WebAssembly.compile(bytes).then(
      (m) => compiled = m,
      () => compiled = null,
    );
  }
  return compiled ?? undefined;
}

/**
 * An instance of the decoders for one decode, or undefined where
 * WebAssembly cannot run (the caller uses its TypeScript decoder). Give
 * it back with {@linkcode releaseWasm} when done.
 *
 * @returns an instance, or undefined
 *
 * @example
 * ```ts
 * import { acquireWasm, releaseWasm } from "./_wasm.ts";
 * const wasm = acquireWasm();
 * if (wasm) releaseWasm(wasm);
 * ```
 */
export function acquireWasm(): WasmInstance | undefined {
  if (!enabled) return undefined;
  const reused = idle.pop();
  if (reused) return reused;
  const module = wasmModule();
  return module ? new WasmInstance(module) : undefined;
}

/**
 * An instance for a codec that has no TypeScript decoder (zstd): waits
 * for the module to compile where it cannot compile synchronously (a
 * page's main thread), and runs whatever {@linkcode useWasm} says.
 * Answers undefined only where there is no WebAssembly at all (or the
 * engine refuses the module). Give it back with {@linkcode releaseWasm}.
 *
 * @returns an instance, or undefined
 *
 * @example
 * ```ts
 * import { acquireWasmAlways, releaseWasm } from "./_wasm.ts";
 * const wasm = await acquireWasmAlways();
 * if (wasm) releaseWasm(wasm);
 * ```
 */
export function acquireWasmAlways(): Promise<WasmInstance | undefined> {
  return acquireFrom(
    idle,
    async () => wasmModule() ?? await compiling ?? null,
    false,
  );
}

/**
 * What both awaiting acquires do ({@linkcode acquireWasmAlways},
 * {@linkcode acquireZstdWasm}): an instance from `spare` (idle ones of
 * the build), else a new one of the module `module` answers (compiled
 * now where need be), or undefined where there is no WebAssembly or no
 * module.
 */
async function acquireFrom(
  spare: WasmInstance[],
  module: () => Promise<WebAssembly.Module | null | undefined>,
  simd: boolean,
): Promise<WasmInstance | undefined> {
  const reused = spare.pop();
  if (reused) return reused;
  if (typeof WebAssembly !== "object") return undefined;
  const compiled = await module();
  return compiled ? new WasmInstance(compiled, simd) : undefined;
}

/**
 * The zstd SIMD module, compiled once (synchronously where the engine
 * allows it): null where the engine does not validate or refuses it;
 * undefined before the first acquire.
 */
let simdCompiled: Promise<WebAssembly.Module | null> | undefined;
/** Whether `simdCompiled` gave a module. */
let simdRuns = false;

async function compileSimd(): Promise<WebAssembly.Module | null> {
  const bytes = moduleBytes(WASM_ZSTD_SIMD_BASE64);
  if (!WebAssembly.validate(bytes)) return null;
  let module: WebAssembly.Module | null;
  try {
    module = new WebAssembly.Module(bytes);
  } catch {
    module = await WebAssembly.compile(bytes).catch(() => null);
  }
  simdRuns = module !== null;
  return module;
}
let simdEnabled = true;
/** Idle instances of it, at most {@linkcode MAX_IDLE}. */
const simdIdle: WasmInstance[] = [];

/**
 * An instance for zstd's decoder (`zstd_*` exports only): of the module
 * built with SIMD128 where the engine validates it (every engine since
 * 2021: Chrome 91, Firefox 89, Safari 16.4, Deno), else the one
 * {@linkcode acquireWasmAlways} gives. 3-4 % less CPU for the bench's
 * zstd qcow2 clusters, decoded one after another on one thread
 * (581-601 ms against 601-625 ms at load 5-8). Give it back with
 * {@linkcode releaseWasm}.
 *
 * @returns an instance, or undefined where there is no WebAssembly
 *
 * @example
 * ```ts
 * import { acquireZstdWasm, releaseWasm } from "./_wasm.ts";
 * const wasm = await acquireZstdWasm();
 * if (wasm) releaseWasm(wasm);
 * ```
 */
export async function acquireZstdWasm(): Promise<WasmInstance | undefined> {
  const simd = simdEnabled &&
    await acquireFrom(simdIdle, () => simdCompiled ??= compileSimd(), true);
  return simd || await acquireWasmAlways();
}

/**
 * Turns the zstd SIMD module off or on (tests decode with both);
 * answers the previous setting.
 *
 * @param on whether {@linkcode acquireZstdWasm} may use it
 * @returns whether it was on
 *
 * @example
 * ```ts
 * import { useZstdSimd } from "./_wasm.ts";
 * const before = useZstdSimd(false); // the scalar build only
 * useZstdSimd(before);
 * ```
 */
export function useZstdSimd(on: boolean): boolean {
  const before = simdEnabled;
  simdEnabled = on;
  if (!on) simdIdle.length = 0;
  return before;
}

/**
 * Whether the zstd SIMD module runs here (after a first
 * {@linkcode acquireZstdWasm}).
 *
 * @returns true when it compiled
 *
 * @example
 * ```ts
 * import { acquireZstdWasm, releaseWasm, zstdSimdAvailable } from "./_wasm.ts";
 * const wasm = await acquireZstdWasm();
 * if (wasm) releaseWasm(wasm);
 * console.log(typeof zstdSimdAvailable()); // boolean
 * ```
 */
export function zstdSimdAvailable(): boolean {
  return simdEnabled && simdRuns;
}

/**
 * Gives an instance back for the next decode (its memory, grown to what
 * this one needed, is reused).
 *
 * @param instance from {@linkcode acquireWasm}
 *
 * @example
 * ```ts
 * import { acquireWasm, releaseWasm } from "./_wasm.ts";
 * const wasm = acquireWasm();
 * if (wasm) releaseWasm(wasm);
 * ```
 */
export function releaseWasm(instance: WasmInstance): void {
  if (instance.simd) {
    if (
      simdIdle.length < MAX_IDLE &&
      instance.exports.memory.buffer.byteLength <= MAX_IDLE_MEMORY
    ) simdIdle.push(instance);
    return;
  }
  if (
    enabled && idle.length < MAX_IDLE &&
    instance.exports.memory.buffer.byteLength <= MAX_IDLE_MEMORY
  ) idle.push(instance);
}

/**
 * Turns the WebAssembly decoders off or on (tests run every codec both
 * ways); answers the previous setting.
 *
 * @param on whether to use WebAssembly where it runs
 * @returns whether it was on
 *
 * @example
 * ```ts
 * import { useWasm } from "./_wasm.ts";
 * const before = useWasm(false); // TypeScript decoders only
 * useWasm(before);
 * ```
 */
export function useWasm(on: boolean): boolean {
  const before = enabled;
  enabled = on;
  if (!on) idle.length = 0;
  return before;
}

/**
 * Whether the WebAssembly decoders run here (now, synchronously).
 *
 * @returns true when {@linkcode acquireWasm} gives instances
 *
 * @example
 * ```ts
 * import { wasmAvailable } from "./_wasm.ts";
 * console.log(typeof wasmAvailable()); // boolean
 * ```
 */
export function wasmAvailable(): boolean {
  return enabled && wasmModule() !== undefined;
}

/**
 * Runs one of the LZ decoders (`lz4_decode`, `lzo_decode`) on `input`
 * into `out`: both are copied through linear memory. Answers true when it
 * decoded, false when it failed (the caller's TypeScript decoder then
 * names the error), undefined when WebAssembly cannot run it here.
 *
 * @param name the C function
 * @param input the compressed bytes
 * @param out where the decoded bytes go (its length is the declared size)
 * @returns true, false or undefined as above
 *
 * @example
 * ```ts
 * import { decodeLz } from "./_wasm.ts";
 * // LZ4: token 0x30, three literals
 * const out = new Uint8Array(3);
 * const ok = decodeLz("lz4_decode", Uint8Array.of(0x30, 1, 2, 3), out);
 * console.log(ok === undefined || out.join(",") === "1,2,3"); // true
 * ```
 */
export function decodeLz(
  name: "lz4_decode" | "lzo_decode",
  input: Uint8Array,
  out: Uint8Array,
): boolean | undefined {
  if (out.length > WASM_COPY_LIMIT) return undefined;
  const wasm = acquireWasm();
  if (!wasm) return undefined;
  try {
    const inAt = wasm.heapBase;
    const outAt = inAt + input.length + WASM_SLACK;
    if (!wasm.ensure(outAt + out.length + WASM_SLACK)) return undefined;
    const bytes = wasm.bytes;
    bytes.set(input, inAt);
    const status = wasm.exports[name](inAt, input.length, outAt, out.length);
    if (status !== 0) return false;
    out.set(bytes.subarray(outAt, outAt + out.length));
    return true;
  } finally {
    releaseWasm(wasm);
  }
}
