/**
 * Sources over bytes in memory, Blobs/Files and HTTP(S) URLs.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { HttpSourceError, HttpTimeoutError } from "./errors.ts";
import { checkRange, type Source } from "./types.ts";
import { readAhead, type ReadAheadOptions } from "./read_ahead.ts";

/**
 * A source over bytes in memory.
 *
 * @param bytes the bytes (not copied: later changes show through)
 * @param name a name for messages
 * @returns a Source whose `read` returns copies
 *
 * @example
 * ```ts
 * import { fromBytes } from "../mod.ts";
 * const src = fromBytes(new Uint8Array([1, 2, 3, 4]));
 * console.log(await src.read(1, 2)); // Uint8Array [2, 3]
 * ```
 */
export function fromBytes(bytes: Uint8Array, name?: string): Source {
  return {
    size: bytes.length,
    name,
    read(offset: number, length: number) {
      checkRange(bytes.length, offset, length);
      return Promise.resolve(bytes.slice(offset, offset + length));
    },
  };
}

/**
 * A source over a `Blob` or `File` (a dropped file in a browser, or an
 * upload).
 *
 * @param blob the blob
 * @returns a Source reading slices of the blob
 *
 * @example
 * ```ts
 * import { fromBlob } from "../mod.ts";
 * const src = fromBlob(new Blob([new Uint8Array(512)]));
 * console.log(src.size); // 512
 * ```
 */
export function fromBlob(blob: Blob): Source {
  return {
    size: blob.size,
    name: (blob as File).name,
    async read(offset: number, length: number) {
      checkRange(blob.size, offset, length);
      return new Uint8Array(
        await blob.slice(offset, offset + length).arrayBuffer(),
      );
    },
  };
}

/** The most bytes a URL's body is read at once into a buffer of its source's. */
const SCRATCH = 1 << 20;

/** Options for {@linkcode fromUrl}. */
export interface UrlSourceOptions {
  /** Extra request headers (authorisation); not sent on after a redirect to another origin. */
  headers?: HeadersInit;
  /** The fetch to use. @default globalThis.fetch */
  fetch?: typeof fetch;
  /** Cancels requests. */
  signal?: AbortSignal;
  /**
   * Called with every URL before it is fetched: the one given and each
   * redirect's target. Throwing refuses it (the error is passed on as it
   * is). When set, redirects are followed here, one hop at a time, so that
   * every hop is checked (this needs a runtime whose `fetch` shows
   * redirects, `redirect: "manual"`: Deno and Node, not browsers).
   * @default undefined (redirects are followed by `fetch`)
   */
  checkUrl?: (url: URL) => void | Promise<void>;
  /** Most redirects followed when opening. @default 10 */
  maxRedirects?: number;
  /**
   * Milliseconds without a byte (or the headers) from the server before a
   * request fails with an {@linkcode HttpTimeoutError}; 0 for none.
   * @default 30000
   */
  idleTimeout?: number;
  /**
   * Milliseconds one request (headers and body) may take at most before it
   * fails with an {@linkcode HttpTimeoutError}; 0 for none. @default 0
   */
  timeout?: number;
  /**
   * Reads in file order (a conversion's) are served from windows fetched
   * ahead of them ({@linkcode readAhead}: up to 8 MiB per request, two
   * runs of four windows held at most), so that they cost a few large
   * requests instead of one per read; `false` sends every read as it is.
   * A run of windows starts at 64 KiB, so reads that only look like a run
   * (a probe, `info`) fetch little more than they asked for.
   * @default {} (read ahead, with readAhead's defaults)
   */
  readAhead?: ReadAheadOptions | false;
}

const REDIRECTS = new Set([301, 302, 303, 307, 308]);

/**
 * A source over an HTTP(S) URL, reading with `Range` requests.
 *
 * - The URL is resolved once, when opening: redirects are followed on the
 *   first request (each hop passed to `checkUrl` when given), and every
 *   later read goes to the URL they led to; a later answer that redirects
 *   again is an error, not followed.
 * - The size comes from the first request's `Content-Range`. A server
 *   that answers a range request with the whole body (status 200) is
 *   refused before any of the body is read.
 * - Each read takes exactly the bytes asked for: an answer for another
 *   range (`Content-Range`), announcing another length, or sending more
 *   bytes than asked is refused as soon as it shows, so a lying server
 *   costs no more memory than the read's own buffer.
 * - `idleTimeout` and `timeout` bound a stalled or dribbling server.
 * - Reads in file order are read ahead in large windows (`readAhead`).
 *
 * Every failure is an {@linkcode HttpSourceError} (an
 * {@linkcode HttpTimeoutError} for the timeouts) naming the URL.
 *
 * @param url the image's URL
 * @param options headers, fetch, signal, the redirect check and timeouts
 * @returns a Source (with `readInto`)
 *
 * @example
 * ```ts ignore
 * import { fromUrl, open } from "../mod.ts";
 * const image = await open(await fromUrl("https://example.com/disk.dmg"));
 * console.log(image.format, image.size);
 * ```
 */
export async function fromUrl(
  url: string | URL,
  options: UrlSourceOptions = {},
): Promise<Source> {
  const doFetch = options.fetch ?? globalThis.fetch;
  const idle = options.idleTimeout ?? 30_000;
  const total = options.timeout ?? 0;
  const maxRedirects = options.maxRedirects ?? 10;
  let target = new URL(String(url));
  let headers = new Headers(options.headers);

  /**
   * One GET of `range` at `where` under the timeouts; `use` reads the
   * answer (calling `touch` as bytes arrive) and its result is returned.
   * The body is cancelled when `use` throws.
   */
  async function request<T>(
    where: URL,
    range: string,
    redirect: RequestRedirect,
    use: (response: Response, touch: () => void) => Promise<T>,
  ): Promise<T> {
    const href = String(where);
    const controller = new AbortController();
    let timedOut: HttpTimeoutError | undefined;
    const stop = (kind: "idle" | "total", ms: number) => () => {
      timedOut = new HttpTimeoutError(href, kind, ms);
      controller.abort(timedOut);
    };
    // One idle timer per request, not one per piece of the body: `touch`
    // notes the time, and the timer, when it fires, waits again for what
    // is left of `idle` since then. (A clearTimeout and a setTimeout per
    // piece were 5% of a browser's module worker converting by URL.)
    let idleTimer: ReturnType<typeof setTimeout> | undefined;
    let lastByte = 0;
    const idleCheck = () => {
      const quiet = performance.now() - lastByte;
      if (quiet >= idle) stop("idle", idle)();
      else idleTimer = setTimeout(idleCheck, idle - quiet);
    };
    const touch = () => {
      if (!idle) return;
      lastByte = performance.now();
      idleTimer ??= setTimeout(idleCheck, idle);
    };
    const totalTimer = total ? setTimeout(stop("total", total), total) : 0;
    const outer = options.signal;
    const onAbort = () => controller.abort(outer!.reason);
    outer?.addEventListener("abort", onAbort);
    if (outer?.aborted) controller.abort(outer.reason);
    touch();
    try {
      const requestHeaders = new Headers(headers);
      requestHeaders.set("Range", range);
      let response: Response;
      try {
        response = await doFetch(href, {
          headers: requestHeaders,
          signal: controller.signal,
          redirect,
        });
      } catch (e) {
        if (timedOut) throw timedOut;
        if (outer?.aborted) throw outer.reason;
        throw new HttpSourceError(
          `${href}: request failed: ${(e as Error).message}`,
          href,
        );
      }
      touch();
      try {
        return await use(response, touch);
      } catch (e) {
        await response.body?.cancel().catch(() => {});
        if (timedOut) throw timedOut;
        if (outer?.aborted) throw outer.reason;
        throw e;
      }
    } finally {
      clearTimeout(idleTimer);
      clearTimeout(totalTimer);
      outer?.removeEventListener("abort", onAbort);
    }
  }

  /** Throws unless `response` is a 206; `asked` names the range for messages. */
  function expectPartial(response: Response, href: string, asked: string) {
    if (response.status === 206) return;
    const message = response.status === 200
      ? "the server ignored the Range request (status 200, whole body); random access needs a server that supports byte ranges"
      : REDIRECTS.has(response.status) || response.type === "opaqueredirect"
      ? `redirected (status ${response.status}) on a read of ${asked}; the URL was resolved once, when opening, and later redirects are not followed`
      : `HTTP ${response.status} ${response.statusText}`;
    throw new HttpSourceError(`${href}: ${message}`, href, response.status);
  }

  // Open: learn the size from the first byte's "Content-Range: bytes 0-0/N",
  // following redirects (each hop checked) to the URL every read then uses.
  let size = -1;
  for (let hops = 0; size < 0; hops++) {
    await options.checkUrl?.(target);
    const href = String(target);
    const answer = await request(
      target,
      "bytes=0-0",
      options.checkUrl ? "manual" : "follow",
      async (response) => {
        const location = response.headers.get("Location");
        if (options.checkUrl && REDIRECTS.has(response.status) && location) {
          await response.body?.cancel();
          return { location };
        }
        if (response.type === "opaqueredirect") {
          throw new HttpSourceError(
            `${href}: redirects, and this runtime's fetch cannot show where to, so the hop cannot be checked`,
            href,
          );
        }
        expectPartial(response, href, "bytes 0-0");
        const range = response.headers.get("Content-Range") ?? "";
        await response.body?.cancel();
        const match = /^bytes\s+0-0\/(\d+)\s*$/.exec(range);
        if (!match || !Number.isSafeInteger(Number(match[1]))) {
          throw new HttpSourceError(
            `${href}: the server sent no usable Content-Range (${
              JSON.stringify(range)
            }) for bytes 0-0, so the size is unknown`,
            href,
            206,
          );
        }
        return { size: Number(match[1]), final: response.url };
      },
    );
    if (answer.location !== undefined) {
      if (hops >= maxRedirects) {
        throw new HttpSourceError(
          `${href}: more than ${maxRedirects} redirects`,
          href,
          303,
        );
      }
      let next: URL;
      try {
        next = new URL(answer.location, target);
      } catch {
        throw new HttpSourceError(
          `${href}: redirects to ${
            JSON.stringify(answer.location)
          }, which is not a URL`,
          href,
        );
      }
      // As fetch does: credentials are not passed on to another origin.
      if (next.origin !== target.origin) headers = new Headers();
      target = next;
      continue;
    }
    // Where fetch followed redirects itself, read from where they led.
    if (answer.final) target = new URL(answer.final);
    size = answer.size!;
  }
  const href = String(target);
  /** Buffers the bodies are read into, for the next requests. */
  const scratches: Uint8Array<ArrayBuffer>[] = [];
  /** A buffer of `length` bytes (a spare one when it is full-size). */
  const spare = (length: number) =>
    length === SCRATCH && scratches.length
      ? scratches.pop()!
      : new Uint8Array(length);

  async function readInto(
    offset: number,
    into: Uint8Array,
    arrived?: (bytes: number) => void,
  ): Promise<void> {
    checkRange(size, offset, into.length);
    if (into.length === 0) return;
    const last = offset + into.length - 1;
    const asked = `bytes ${offset}-${last}`;
    await request(target, `bytes=${offset}-${last}`, "manual", async (
      response,
      touch,
    ) => {
      expectPartial(response, href, asked);
      const fail = (what: string) =>
        new HttpSourceError(`${href}: ${what}`, href, 206);
      const range = (response.headers.get("Content-Range") ?? "")
        .replace(/\s+/g, " ").trim();
      if (range !== `${asked}/${size}`) {
        throw fail(
          `asked for ${asked} of ${size}, the server answered Content-Range ${
            JSON.stringify(range)
          }`,
        );
      }
      const declared = response.headers.get("Content-Length");
      if (declared !== null && Number(declared) !== into.length) {
        throw fail(
          `asked for ${into.length} bytes at ${offset}, the server announces ${declared}`,
        );
      }
      let at = 0;
      /** Copies `value` (the body's next bytes) into `into`. */
      const take = (value: Uint8Array) => {
        touch();
        if (at + value.length > into.length) {
          throw fail(
            `asked for ${into.length} bytes at ${offset}, the server sent more`,
          );
        }
        into.set(value, at);
        at += value.length;
        arrived?.(at);
      };
      const body = response.body;
      // A byte stream (chromium's and Deno's fetch) is read into a buffer
      // of ours, reused: in chromium, 112 MiB as 8 MiB ranges took 140 ms
      // so against 180 ms as chunks the stream allocates (load 3).
      let byob: ReadableStreamBYOBReader | undefined;
      try {
        byob = body?.getReader({ mode: "byob" });
      } catch { /* not a byte stream */ }
      if (byob) {
        let scratch = spare(Math.min(into.length, SCRATCH));
        try {
          for (;;) {
            const { value, done } = await byob.read(scratch);
            if (value) scratch = new Uint8Array(value.buffer);
            if (done) break;
            take(value);
          }
        } catch (e) {
          await byob.cancel().catch(() => {});
          throw e;
        } finally {
          // (A buffer still in a read that failed is detached: length 0.)
          if (scratch.length === SCRATCH && scratches.length < 4) {
            scratches.push(scratch);
          }
        }
      } else {
        const reader = body?.getReader();
        while (reader) {
          const { value, done } = await reader.read();
          if (done) break;
          try {
            take(value);
          } catch (e) {
            await reader.cancel().catch(() => {});
            throw e;
          }
        }
      }
      if (at !== into.length) {
        throw fail(`asked for ${into.length} bytes at ${offset}, got ${at}`);
      }
    });
  }

  const source: Source = {
    size,
    name: href,
    readInto,
    async read(offset: number, length: number) {
      checkRange(size, offset, length);
      const bytes = new Uint8Array(length);
      await readInto(offset, bytes);
      return bytes;
    },
  };
  // A conversion by URL with a request per read: 135 range requests for
  // the browser bench's zlib dmg, 52-78 for its streamOptimized vmdk,
  // where read ahead they are 22; each costs the server, the browser's
  // network process and a round trip.
  return options.readAhead === false
    ? source
    : readAhead(source, options.readAhead);
}
