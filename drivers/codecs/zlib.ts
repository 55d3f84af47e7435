/**
 * zlib (RFC 1950), raw deflate and gzip: node:zlib where the runtime has
 * it (Deno, Node); elsewhere (browsers, Deno Deploy's isolates without a
 * Node layer) our inflater in WebAssembly (`_wasm/inflate.c`), and the
 * platform's `DecompressionStream` only where WebAssembly cannot run.
 * Compressing uses node:zlib or `CompressionStream`.
 *
 * Every codec module in this folder has the same two functions:
 * `decode(input, expectedSize)` returns exactly `expectedSize` bytes or throws
 * a `CodecError` (and never produces more than `expectedSize + 1` bytes, so a
 * decompression bomb stops early), and `encode(input)` compresses.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { CodecError } from "../../streams/errors.ts";
import { nodeZlibModule, type ZlibHandle } from "./_node_zlib.ts";
import {
  acquireWasm,
  releaseWasm,
  WASM_COPY_LIMIT,
  WASM_SLACK,
} from "./_wasm.ts";

/** The node:zlib inflate options used. */
interface InflateOptions {
  maxOutputLength: number;
  chunkSize?: number;
}

/** The subset of node:zlib used when the runtime has it. */
interface NodeZlib {
  createInflate(): unknown;
  createInflateRaw(): unknown;
  createGunzip(): unknown;
  inflateSync(b: Uint8Array, o: InflateOptions): Uint8Array;
  inflateRawSync(b: Uint8Array, o: InflateOptions): Uint8Array;
  gunzipSync(b: Uint8Array, o: InflateOptions): Uint8Array;
  deflateSync(b: Uint8Array): Uint8Array;
  deflateRawSync(b: Uint8Array): Uint8Array;
  gzipSync(b: Uint8Array): Uint8Array;
}

// Deno (and Deno Deploy, and Node) carry a native zlib that inflates the
// 64 KiB blocks of cloop and dmg three times faster than
// DecompressionStream (1540 against 491 MB/s, measured here), because a
// stream costs a setup per block. It is found by feature detection, never
// imported, so browsers and the bundle fall back to the platform streams;
// and only on first use: loading it cost every command about 14 ms of
// start-up, a tenth of converting a 1 GiB vpc image.
function nodeZlib(): NodeZlib | undefined {
  return nodeZlibModule() as NodeZlib | undefined;
}

/**
 * Whether inflating runs natively here (node:zlib), fast enough that
 * callers need not spread zlib blocks over workers.
 *
 * @returns true in Deno and Node, false in browsers
 *
 * @example
 * ```ts
 * import { hasNativeInflate } from "./zlib.ts";
 * console.log(typeof hasNativeInflate()); // boolean
 * ```
 */
export function hasNativeInflate(): boolean {
  return nodeZlib() !== undefined;
}

/**
 * Which deflate wrapper: `deflate` is zlib (RFC 1950, Adler-32), `gzip`
 * is RFC 1952 (CRC-32; several members are read one after another),
 * `deflate-raw` has none.
 */
export type DeflateFormat = "deflate" | "deflate-raw" | "gzip";

/** The format numbers of `inflate_decode` (`_wasm/inflate.c`). */
const WASM_FORMAT: Record<DeflateFormat, number> = {
  "deflate-raw": 0,
  "deflate": 1,
  "gzip": 2,
};

/** What each error of `inflate_decode` means (by its negated code). */
const WASM_ERRORS = [
  "",
  "the input ends inside the stream",
  "", // -2: more output than declared, said by the caller
  "invalid block type 3",
  "stored block length does not match its complement",
  "invalid code-length code",
  "over-subscribed or incomplete literal/length or distance code",
  "more than 286 length or 30 distance symbols",
  "a code-length repeat with no previous length, or past the end",
  "no code for end-of-block",
  "invalid literal/length symbol",
  "invalid distance symbol",
  "distance too far back",
  "bad zlib header",
  "zlib stream needs a preset dictionary",
  "Adler-32 does not match",
  "bad gzip header",
  "CRC-32 does not match",
  "gzip ISIZE does not match",
];

/**
 * Inflates `input` into `out` (which it must fill exactly) with our
 * WebAssembly inflater (`_wasm/inflate.c`), whatever the runtime has:
 * what {@linkcode decodeInto} runs where there is no native inflater
 * (tests and `deno task bench codecs` call it in Deno). Input and output
 * are copied through its linear memory. Answers false, doing nothing,
 * where WebAssembly cannot run it (none here, turned off, or `out` over
 * `WASM_COPY_LIMIT`, 32 MiB); bytes after the stream's end are left
 * alone, as node:zlib leaves them.
 *
 * Against a `DecompressionStream` per 64 KiB block this is a call and
 * two copies: no stream set up, no promise per piece (see the README's
 * browser section for what it saved).
 *
 * @param input the compressed bytes
 * @param out where the bytes go; all of it is filled
 * @param format zlib (`deflate`), raw deflate or gzip
 * @param crcs when given, receives the CRC-32 of `out` (index 0) and of
 *   `input` (index 1), computed while both are in linear memory (browsers'
 *   decode workers check dmg chunks this way, without copying them in again)
 * @returns true when it inflated, false when WebAssembly could not run
 * @throws {CodecError} when the stream does not inflate to exactly `out.length` bytes
 *
 * @example
 * ```ts
 * import { encode, inflateWasmInto } from "./zlib.ts";
 * const out = new Uint8Array(1000);
 * const done = inflateWasmInto(await encode(new Uint8Array(1000).fill(7)), out);
 * console.log(!done || out[999] === 7); // true
 * ```
 */
export function inflateWasmInto(
  input: Uint8Array,
  out: Uint8Array,
  format: DeflateFormat = "deflate",
  crcs?: Uint32Array,
): boolean {
  return wasmInto(input, out, format, crcs);
}

/** {@linkcode inflateWasmInto}'s body. */
function wasmInto(
  input: Uint8Array,
  out: Uint8Array,
  format: DeflateFormat,
  crcs?: Uint32Array,
): boolean {
  if (out.length > WASM_COPY_LIMIT) return false;
  const wasm = acquireWasm();
  if (!wasm) return false;
  let produced;
  try {
    const inAt = wasm.heapBase;
    const outAt = inAt + input.length + WASM_SLACK;
    if (!wasm.ensure(outAt + out.length + WASM_SLACK)) return false;
    const bytes = wasm.bytes;
    bytes.set(input, inAt);
    produced = wasm.exports.inflate_decode(
      inAt,
      input.length,
      outAt,
      out.length,
      WASM_FORMAT[format],
    );
    if (produced === out.length) {
      out.set(bytes.subarray(outAt, outAt + out.length));
      if (crcs) {
        // Both are still in linear memory: no copy in for the CRCs.
        crcs[0] = wasm.exports.crc32_update(0, outAt, out.length);
        crcs[1] = wasm.exports.crc32_update(0, inAt, input.length);
      }
      return true;
    }
  } finally {
    releaseWasm(wasm);
  }
  if (produced === -2) {
    throw new CodecError(
      "zlib",
      `inflates to more than the declared ${out.length} bytes`,
    );
  }
  if (produced < 0) {
    throw new CodecError(
      "zlib",
      `corrupt stream: ${WASM_ERRORS[-produced] ?? `error ${produced}`}`,
    );
  }
  throw new CodecError(
    "zlib",
    `inflates to ${produced} bytes, ${out.length} declared`,
  );
}

/**
 * Runs `input` through a (de)compression stream, collecting at most `limit`
 * bytes of output; stops reading as soon as more arrive.
 */
async function pump(
  stream: {
    readable: ReadableStream<Uint8Array>;
    writable: WritableStream<BufferSource>;
  },
  input: Uint8Array,
  limit: number,
): Promise<{ out: Uint8Array; length: number; overflow: boolean }> {
  const writer = stream.writable.getWriter();
  // Errors surface on the reading side; the writer's promises are ignored.
  writer.write(input as Uint8Array<ArrayBuffer>).catch(() => {});
  writer.close().catch(() => {});
  const reader = stream.readable.getReader();
  let out = new Uint8Array(Math.min(limit, Math.max(input.length * 4, 4096)));
  let length = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    if (length + value.length > limit) {
      await reader.cancel().catch(() => {});
      return { out, length, overflow: true };
    }
    if (length + value.length > out.length) {
      const next = new Uint8Array(
        Math.min(limit, Math.max(out.length * 2, length + value.length)),
      );
      next.set(out.subarray(0, length));
      out = next;
    }
    out.set(value, length);
    length += value.length;
  }
  return { out, length, overflow: false };
}

/**
 * Inflates `input` to exactly `expectedSize` bytes.
 *
 * @param input the compressed bytes
 * @param expectedSize how many bytes it must inflate to
 * @param format zlib (`deflate`) or raw deflate
 * @returns the bytes
 *
 * @example
 * ```ts
 * import { decode, encode } from "./zlib.ts";
 * const packed = await encode(new Uint8Array(1000));
 * console.log((await decode(packed, 1000)).length); // 1000
 * ```
 */
export async function decode(
  input: Uint8Array,
  expectedSize: number,
  format: DeflateFormat = "deflate",
): Promise<Uint8Array> {
  const native = nodeZlib();
  if (native) {
    let out: Uint8Array;
    try {
      // One byte of room past the declared size tells "too long" apart.
      // Output in one chunk of that size (up to 4 MiB) instead of 16 KiB
      // chunks joined at the end: 64 KiB cloop blocks inflate 2.8 times
      // faster (73 against 202 ms for 8192), with a quarter the garbage.
      const options = {
        maxOutputLength: expectedSize + 1,
        chunkSize: Math.max(64, Math.min(expectedSize + 1, 4 << 20)),
      };
      out = format === "deflate"
        ? native.inflateSync(input, options)
        : format === "gzip"
        ? native.gunzipSync(input, options)
        : native.inflateRawSync(input, options);
    } catch (e) {
      const message = (e as Error).message;
      throw new CodecError(
        "zlib",
        /maxOutputLength|buffer length|Buffer larger than/i.test(message)
          ? `inflates to more than the declared ${expectedSize} bytes`
          : `corrupt stream: ${message}`,
      );
    }
    if (out.length !== expectedSize) {
      throw new CodecError(
        "zlib",
        out.length > expectedSize
          ? `inflates to more than the declared ${expectedSize} bytes`
          : `inflates to ${out.length} bytes, ${expectedSize} declared`,
      );
    }
    return new Uint8Array(out.buffer, out.byteOffset, out.length);
  }
  if (expectedSize <= WASM_COPY_LIMIT) {
    const out = new Uint8Array(expectedSize);
    if (wasmInto(input, out, format)) return out;
  }
  // No WebAssembly: a first block that is stored (its header byte's BTYPE bits 00):
  // perhaps all are, and the stream is copied.
  if (format !== "gzip" && (input[format === "deflate" ? 2 : 0] & 0x06) === 0) {
    const stored = new Uint8Array(expectedSize);
    if (storedInto(input, stored, format)) return stored;
  }
  let result;
  try {
    result = await pump(
      new DecompressionStream(format),
      input,
      expectedSize,
    );
  } catch (e) {
    throw new CodecError("zlib", `corrupt stream: ${(e as Error).message}`);
  }
  if (result.overflow) {
    throw new CodecError(
      "zlib",
      `inflates to more than the declared ${expectedSize} bytes`,
    );
  }
  if (result.length !== expectedSize) {
    throw new CodecError(
      "zlib",
      `inflates to ${result.length} bytes, ${expectedSize} declared`,
    );
  }
  return result.out.length === result.length
    ? result.out
    : result.out.subarray(0, result.length);
}

/**
 * Inflates `input` through a `DecompressionStream` straight into `out`,
 * which it must fill exactly: each piece the stream gives is copied to its
 * place, with no array grown and joined per call (browsers' decode
 * workers inflate a vmdk's 64 KiB grains this way, thousands per disk).
 */
async function streamInto(
  input: Uint8Array,
  out: Uint8Array,
  format: DeflateFormat,
): Promise<void> {
  if (wasmInto(input, out, format)) return;
  if (storedInto(input, out, format)) return;
  const stream = new DecompressionStream(format);
  const writer = stream.writable.getWriter();
  // Errors surface on the reading side; the writer's promises are ignored.
  writer.write(input as Uint8Array<ArrayBuffer>).catch(() => {});
  writer.close().catch(() => {});
  const reader = stream.readable.getReader();
  let length = 0;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      if (length + value.length > out.length) {
        await reader.cancel().catch(() => {});
        throw new CodecError(
          "zlib",
          `inflates to more than the declared ${out.length} bytes`,
        );
      }
      out.set(value, length);
      length += value.length;
    }
  } catch (e) {
    if (e instanceof CodecError) throw e;
    throw new CodecError("zlib", `corrupt stream: ${(e as Error).message}`);
  }
  if (length !== out.length) {
    throw new CodecError(
      "zlib",
      `inflates to ${length} bytes, ${out.length} declared`,
    );
  }
}

/**
 * Copies a deflate stream made only of stored blocks (incompressible data:
 * zlib writes random bytes, already compressed files, as such) into `out`,
 * when it fills `out` exactly, its Adler-32 (zlib format) matches and
 * nothing follows; answers false, deciding nothing, for anything else (a
 * compressed block, a short or long stream, a bad checksum), which the
 * caller then inflates as usual, errors included. A `DecompressionStream`
 * took 75 ms of a browser's time for 16 MiB of such 64 KiB grains (a
 * quarter of the bench's vmdk), as long as for text; this is a copy.
 */
function storedInto(
  input: Uint8Array,
  out: Uint8Array,
  format: DeflateFormat,
): boolean {
  if (format === "gzip") return false;
  let p = 0;
  if (format === "deflate") {
    // CMF, FLG (RFC 1950): deflate, a window of at most 32 KiB, no dictionary.
    const cmf = input[0], flg = input[1];
    if (
      input.length < 2 || (cmf & 0x0f) !== 8 || cmf >> 4 > 7 ||
      ((cmf << 8) | flg) % 31 !== 0 || (flg & 0x20) !== 0
    ) return false;
    p = 2;
  }
  // Every block starts on a byte: the stream's first does, and a stored
  // block ends on one. Its header byte: BFINAL, BTYPE (00), padding.
  let o = 0;
  for (let last = 0; !last;) {
    if (p + 5 > input.length || (input[p] & 0x06) !== 0) return false;
    last = input[p] & 1;
    const length = input[p + 1] | (input[p + 2] << 8);
    if ((input[p + 3] | (input[p + 4] << 8)) !== (length ^ 0xffff)) {
      return false;
    }
    p += 5;
    if (p + length > input.length || o + length > out.length) return false;
    out.set(input.subarray(p, p + length), o);
    o += length;
    p += length;
  }
  if (o !== out.length) return false;
  if (format === "deflate") {
    if (p + 4 !== input.length) return false;
    const stored = ((input[p] << 24) | (input[p + 1] << 16) |
      (input[p + 2] << 8) | input[p + 3]) >>> 0;
    return adler32(out) === stored;
  }
  return p === input.length;
}

/** Adler-32 (RFC 1950) of `bytes`. */
function adler32(bytes: Uint8Array): number {
  let a = 1, b = 0;
  // 3800 bytes at most between reductions: b stays below 2^31, a small
  // integer for V8 (zlib's NMAX, 5552, keeps it below 2^32).
  for (let i = 0; i < bytes.length;) {
    const end = Math.min(bytes.length, i + 3800);
    for (; i < end; i++) {
      a += bytes[i];
      b += a;
    }
    a %= 65521;
    b %= 65521;
  }
  return ((b << 16) | a) >>> 0;
}

/** One reused inflater per format: a native handle and its two counters. */
interface Inflater {
  handle: ZlibHandle;
  /** After each `writeSync`: output bytes left, input bytes left. */
  state: Uint32Array;
  error?: string;
}

const inflaters = new Map<DeflateFormat, Inflater | undefined>();
const Z_FINISH = 4;
const probeByte = new Uint8Array(1);

/** The reused inflater for `format`, when node:zlib's internals are there. */
function inflater(format: DeflateFormat): Inflater | undefined {
  if (inflaters.has(format)) return inflaters.get(format);
  let found: Inflater | undefined;
  try {
    const stream = (format === "deflate"
      ? nodeZlib()?.createInflate()
      : format === "gzip"
      ? nodeZlib()?.createGunzip()
      : nodeZlib()?.createInflateRaw()) as
        | { _handle?: ZlibHandle; _writeState?: Uint32Array }
        | undefined;
    const handle = stream?._handle;
    const state = stream?._writeState;
    if (
      typeof handle?.writeSync === "function" &&
      typeof handle.reset === "function" &&
      state instanceof Uint32Array && state.length >= 2
    ) {
      const inflater: Inflater = { handle, state };
      handle.onerror = (message) =>
        inflater.error = message;
      found = inflater;
    }
  } catch {
    // No usable internals: decodeInto goes through decode.
  }
  inflaters.set(format, found);
  return found;
}

/**
 * Inflates `input` into `out`, which it must fill exactly (the same checks
 * as {@linkcode decode}, whose `expectedSize` is `out.length`).
 *
 * Where node:zlib is there this reuses one native inflater and writes
 * straight into `out`: no array per call. A 64 KiB array per cloop block
 * (16384 per GiB), freed late by V8 and kept by the C allocator, held the
 * peak RSS of `deno task bench`'s cloop case near 300 MiB; 16384 blocks
 * also inflate in 78 ms against 202 ms through `inflateSync`.
 *
 * @param input the compressed bytes
 * @param out where the bytes go; all of it is filled
 * @param format zlib (`deflate`) or raw deflate
 *
 * @example
 * ```ts
 * import { decodeInto, encode } from "./zlib.ts";
 * const out = new Uint8Array(1000);
 * await decodeInto(await encode(new Uint8Array(1000).fill(7)), out);
 * console.log(out[999]); // 7
 * ```
 */
export async function decodeInto(
  input: Uint8Array,
  out: Uint8Array,
  format: DeflateFormat = "deflate",
): Promise<void> {
  const z = inflater(format);
  if (!z) {
    if (nodeZlib()) out.set(await decode(input, out.length, format));
    else await streamInto(input, out, format);
    return;
  }
  z.error = undefined;
  z.handle.reset();
  z.handle.writeSync(Z_FINISH, input, 0, input.length, out, 0, out.length);
  const produced = out.length - z.state[0];
  // One more call with one byte of room: output there means too long, an
  // error means the stream's end (or its checksum) is missing.
  const left = z.state[1];
  if (z.error === undefined) {
    z.handle.writeSync(
      Z_FINISH,
      input,
      input.length - left,
      left,
      probeByte,
      0,
      1,
    );
  }
  if (z.error !== undefined) {
    throw new CodecError("zlib", `corrupt stream: ${z.error}`);
  }
  if (produced < out.length) {
    throw new CodecError(
      "zlib",
      `inflates to ${produced} bytes, ${out.length} declared`,
    );
  }
  if (z.state[0] === 0) {
    throw new CodecError(
      "zlib",
      `inflates to more than the declared ${out.length} bytes`,
    );
  }
}

/**
 * Deflates `input` (zlib wrapper by default).
 *
 * @param input the bytes
 * @param format zlib (`deflate`) or raw deflate
 * @returns the compressed bytes
 *
 * @example
 * ```ts
 * import { encode } from "./zlib.ts";
 * console.log((await encode(new Uint8Array(65536))).length < 1000); // true
 * ```
 */
export async function encode(
  input: Uint8Array,
  format: DeflateFormat = "deflate",
): Promise<Uint8Array> {
  const native = nodeZlib();
  if (native) {
    const out = format === "deflate"
      ? native.deflateSync(input)
      : format === "gzip"
      ? native.gzipSync(input)
      : native.deflateRawSync(input);
    return new Uint8Array(out.buffer, out.byteOffset, out.length);
  }
  const { out, length } = await pump(
    new CompressionStream(format),
    input,
    Number.MAX_SAFE_INTEGER,
  );
  return out.subarray(0, length);
}
