/**
 * A conversion service: a `(Request) => Promise<Response>` handler for
 * `Deno.serve` (or Deno Deploy, or any runtime with `fetch` types).
 *
 * - `GET /convert?url=URL&format=raw` streams the raw disk of a remote image
 *   (`&partition=N|NAME`: one partition of it)
 *   without storing it; a `Range: bytes=A-B` header on the request is
 *   honoured (206 with `Content-Range`).
 * - `POST /info` takes an image as the request body and answers its `info`
 *   JSON.
 *
 * It refuses URLs whose host is not allowed: by default every internal
 * address (loopback, private, link-local, unspecified, CGNAT, and IPv6
 * forms carrying one, see `_address.ts`) and `localhost`, at the URL and
 * at every redirect, so the service cannot be used to reach internal
 * services; an allow-list narrows it further. Its memory is bounded by
 * `maxConcurrent` requests at once, each bounded by its buffers, and a
 * remote server that stalls is cut off by the timeouts.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { fromUrl } from "./sources.ts";
import { readable } from "./readable.ts";
import { partition } from "./partitions.ts";
import { open } from "../drivers/_registry.ts";
import { checkRange, type Source } from "./types.ts";
import { imageInfo } from "./inspect.ts";
import { isAddress, privateRange } from "./_address.ts";

/** Options for {@linkcode conversionService}. */
export interface ServiceOptions {
  /**
   * Hosts `/convert` may fetch from (exact names, or `*.example.com`). When
   * set, every other host is refused, at every redirect too.
   * @default undefined (any public host)
   */
  allowHosts?: string[];
  /** Allow loopback, private, link-local and other internal addresses. @default false */
  allowPrivate?: boolean;
  /**
   * Resolves a host name to its addresses (IPv4 and IPv6), so that a name
   * pointing at an internal address is refused like the address itself;
   * a name that resolves to nothing is refused too. `cli.ts serve` passes
   * one built on `Deno.resolveDns`. Not used with `allowPrivate`.
   * @default undefined (names are not resolved: use `allowHosts`)
   */
  resolveHost?: (hostname: string) => Promise<string[]>;
  /** Largest image (its file size) accepted, in bytes. @default 64 GiB */
  maxInputBytes?: number;
  /** Largest virtual disk `/convert` streams, in bytes. @default 1 TiB */
  maxVirtualBytes?: number;
  /** Largest upload `/info` accepts, in bytes (held in memory). @default 64 MiB */
  maxUploadBytes?: number;
  /**
   * Most requests served at once (`/convert` until its body is done,
   * `/info` until it answers); more are answered 503 with `Retry-After`.
   * Each may hold a decoded chunk (64 MiB at most for dmg), the windows
   * `fromUrl` reads ahead of a conversion (64 MiB at most, see
   * `readAhead`) or an upload.
   * @default 4
   */
  maxConcurrent?: number;
  /** Seconds a 503 tells the client to wait. @default 5 */
  retryAfterSeconds?: number;
  /** Milliseconds the remote server may stay silent in one request (0: no limit). @default 30000 */
  idleTimeoutMs?: number;
  /** Milliseconds one request to the remote server may take in all (0: no limit). @default 120000 */
  timeoutMs?: number;
  /**
   * Milliseconds a client may leave its `/convert` body unread, or its
   * upload silent, before the request is ended and its slot freed (0: no
   * limit): otherwise `maxConcurrent` clients reading nothing would hold
   * the service. An upload also has `timeoutMs` in all. @default 30000
   */
  clientIdleTimeoutMs?: number;
  /** The fetch used to read remote images. @default globalThis.fetch */
  fetch?: typeof fetch;
}

/** A request the service refuses, with its HTTP status. */
class Refusal extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers?: HeadersInit,
  ) {
    super(message);
  }
}

function hostListed(host: string, patterns: string[]): boolean {
  return patterns.some((p) => {
    const pattern = p.toLowerCase();
    return pattern.startsWith("*.")
      ? host.endsWith(pattern.slice(1)) || host === pattern.slice(2)
      : host === pattern;
  });
}

/**
 * Checks `url` (the one asked for, or a redirect's target when `from` is
 * set) against the policy: http(s) only, no internal address (in any
 * spelling, or behind a name when `resolveHost` is given), and on the
 * allow-list when there is one.
 */
async function checkTarget(
  url: URL,
  options: ServiceOptions,
  from?: URL,
): Promise<void> {
  const what = from ? `redirect from ${from.host} to ${url.href}: ` : "";
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new Refusal(
      from ? 403 : 400,
      `${what}only http and https URLs are fetched, not ${url.protocol}`,
    );
  }
  const host = url.hostname;
  const refuse = (why: string) =>
    new Refusal(
      403,
      `${what}host ${host} is not allowed by this service (${why})`,
    );
  if (!options.allowPrivate) {
    const why = privateRange(host);
    if (why) throw refuse(why);
  }
  if (options.allowHosts && !hostListed(host, options.allowHosts)) {
    throw refuse("not in the allowed hosts");
  }
  if (!options.allowPrivate && options.resolveHost && !isAddress(host)) {
    let addresses: string[] = [];
    try {
      addresses = await options.resolveHost(host.replace(/\.$/, ""));
    } catch { /* refused below */ }
    if (addresses.length === 0) {
      throw refuse("it does not resolve, so its addresses cannot be checked");
    }
    for (const address of addresses) {
      const why = privateRange(address);
      if (why) throw refuse(`it resolves to ${address}, ${why}`);
    }
  }
}

/** Parses the `url` parameter and checks it against the policy. */
async function checkUrl(
  text: string | null,
  options: ServiceOptions,
): Promise<URL> {
  if (!text) throw new Refusal(400, "missing url parameter");
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new Refusal(400, `not a URL: ${text}`);
  }
  await checkTarget(url, options);
  return url;
}

/**
 * Reads a request body, counting as it goes: past `max` bytes it stops
 * and refuses (a chunked body has no length to check first). The chunks
 * are kept as they came, not joined (joining would hold the upload twice).
 */
async function readUpload(
  request: Request,
  max: number,
  idleMs: number,
  totalMs: number,
): Promise<Source> {
  const tooBig = (size: string) =>
    new Refusal(
      413,
      `upload of ${size} bytes is over this service's limit of ${max} (maxUploadBytes)`,
    );
  const declared = request.headers.get("content-length");
  if (declared !== null && Number(declared) > max) {
    await request.body?.cancel().catch(() => {});
    throw tooBig(declared);
  }
  const chunks: Uint8Array[] = [];
  let size = 0;
  const reader = request.body?.getReader();
  const started = Date.now();
  while (reader) {
    // The wait for each chunk is bounded by what is left of both timeouts.
    const left = totalMs ? totalMs - (Date.now() - started) : Infinity;
    const wait = Math.min(idleMs || Infinity, left);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = wait === Infinity
      ? undefined
      : new Promise<never>((_, no) =>
        timer = setTimeout(
          () =>
            no(
              new Refusal(
                408,
                wait === left
                  ? `upload took over ${totalMs} ms (timeoutMs)`
                  : `upload sent nothing for ${idleMs} ms (clientIdleTimeoutMs)`,
              ),
            ),
          Math.max(0, wait),
        )
      );
    let next: ReadableStreamReadResult<Uint8Array>;
    try {
      next = await (late ? Promise.race([reader.read(), late]) : reader.read());
    } catch (e) {
      await reader.cancel().catch(() => {});
      throw e;
    } finally {
      clearTimeout(timer);
    }
    if (next.done) break;
    size += next.value.length;
    if (size > max) {
      await reader.cancel().catch(() => {});
      throw tooBig(`more than ${max}`);
    }
    chunks.push(next.value);
  }
  return chunkSource(chunks, size);
}

/** A source over chunks laid end to end. */
function chunkSource(chunks: Uint8Array[], size: number): Source {
  const starts: number[] = [];
  let at = 0;
  for (const chunk of chunks) {
    starts.push(at);
    at += chunk.length;
  }
  const readInto = (offset: number, into: Uint8Array) => {
    checkRange(size, offset, into.length);
    // The last chunk starting at or before `offset`.
    let lo = 0;
    let hi = chunks.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (starts[mid] <= offset) lo = mid;
      else hi = mid - 1;
    }
    for (let i = lo, done = 0; done < into.length; i++) {
      const from = offset + done - starts[i];
      const part = chunks[i].subarray(from, from + into.length - done);
      into.set(part, done);
      done += part.length;
    }
    return Promise.resolve();
  };
  return {
    size,
    readInto,
    async read(offset, length) {
      const out = new Uint8Array(length);
      await readInto(offset, out);
      return out;
    },
  };
}

/** The error, or one of its causes, that says which status to answer. */
function statusOf(error: unknown): number {
  for (let e = error; e instanceof Error; e = e.cause) {
    if (e.name === "HttpTimeoutError") return 504;
    if (e.name === "HttpSourceError") return 502;
  }
  return 422;
}

/** Parses a single `bytes=A-B` range against `size`; undefined for no/other range. */
function parseRange(header: string | null, size: number) {
  if (!header) return undefined;
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === "" && m[2] === "")) return undefined;
  let start: number;
  let end: number;
  if (m[1] === "") {
    start = Math.max(0, size - Number(m[2]));
    end = size - 1;
  } else {
    start = Number(m[1]);
    end = m[2] === "" ? size - 1 : Math.min(Number(m[2]), size - 1);
  }
  if (start > end || start >= size) return "unsatisfiable" as const;
  return { start, end };
}

const json = (status: number, body: unknown) =>
  new Response(JSON.stringify(body, null, 2) + "\n", {
    status,
    headers: { "content-type": "application/json" },
  });

/**
 * Builds the conversion service's request handler.
 *
 * @param options host policy, limits and timeouts
 * @returns a handler for `Deno.serve`
 *
 * @example
 * ```ts
 * import { conversionService } from "../mod.ts";
 * const handler = conversionService({ allowHosts: ["images.example.com"] });
 * const response = await handler(
 *   new Request("http://localhost/convert?url=http://127.0.0.1/x.dmg"),
 * );
 * console.log(response.status); // 403
 * ```
 */
export function conversionService(
  options: ServiceOptions = {},
): (request: Request) => Promise<Response> {
  const maxInput = options.maxInputBytes ?? 64 * 1024 ** 3;
  const maxVirtual = options.maxVirtualBytes ?? 1024 ** 4;
  const maxUpload = options.maxUploadBytes ?? 64 * 1024 ** 2;
  const maxConcurrent = options.maxConcurrent ?? 4;
  const retryAfter = options.retryAfterSeconds ?? 5;
  const clientIdle = options.clientIdleTimeoutMs ?? 30_000;
  let active = 0;

  /** Takes a slot, or refuses with 503; the returned function gives it back (once). */
  function enter(): () => void {
    if (active >= maxConcurrent) {
      throw new Refusal(
        503,
        `busy: ${active} requests in progress, this service's limit (maxConcurrent); retry after ${retryAfter} s`,
        { "retry-after": String(retryAfter) },
      );
    }
    active++;
    let held = true;
    return () => {
      if (held) active--;
      held = false;
    };
  }

  /**
   * `body` that calls `release` once it ends, fails or is cancelled, or
   * when the client leaves it unread for `clientIdleTimeoutMs` (then the
   * stream fails and the connection is dropped).
   */
  function releasing(
    body: ReadableStream<Uint8Array>,
    release: () => void,
  ): ReadableStream<Uint8Array> {
    const reader = body.getReader();
    let timer: ReturnType<typeof setTimeout> | undefined;
    let stalled: Error | undefined;
    const end = () => {
      clearTimeout(timer);
      release();
    };
    /** Starts waiting for the client's next read. */
    const arm = (controller: ReadableStreamDefaultController<Uint8Array>) => {
      if (!clientIdle) return;
      timer = setTimeout(() => {
        stalled = new Error(
          `the client read nothing for ${clientIdle} ms (clientIdleTimeoutMs)`,
        );
        end();
        reader.cancel(stalled).catch(() => {});
        controller.error(stalled);
      }, clientIdle);
    };
    return new ReadableStream<Uint8Array>({
      start: arm,
      async pull(controller) {
        clearTimeout(timer);
        try {
          const { value, done } = await reader.read();
          if (stalled) return;
          if (done) {
            end();
            controller.close();
          } else {
            controller.enqueue(value);
            arm(controller);
          }
        } catch (e) {
          end();
          throw e;
        }
      },
      async cancel(reason) {
        end();
        await reader.cancel(reason);
      },
    }, { highWaterMark: 0 });
  }

  async function convertRoute(
    request: Request,
    url: URL,
    release: () => void,
  ): Promise<Response> {
    const target = await checkUrl(url.searchParams.get("url"), options);
    const format = url.searchParams.get("format") ?? "raw";
    if (format !== "raw") {
      throw new Refusal(400, `only format=raw is streamed, not ${format}`);
    }
    const source = await fromUrl(target, {
      fetch: options.fetch,
      signal: request.signal,
      checkUrl: (hop) =>
        hop.href === target.href
          ? undefined
          : checkTarget(hop, options, target),
      idleTimeout: options.idleTimeoutMs ?? 30_000,
      timeout: options.timeoutMs ?? 120_000,
    });
    if (source.size > maxInput) {
      throw new Refusal(
        413,
        `image is ${source.size} bytes, over this service's limit of ${maxInput} (maxInputBytes)`,
      );
    }
    const whole = await open(source, {
      format: url.searchParams.get("from") ?? undefined,
    });
    // `partition=N|NAME`: one partition of the disk, as a raw image.
    const which = url.searchParams.get("partition");
    let image = whole;
    if (which !== null) {
      try {
        image = await partition(whole, which);
      } catch (e) {
        if (e instanceof RangeError) throw new Refusal(404, e.message);
        throw e;
      }
    }
    if (image.size > maxVirtual) {
      throw new Refusal(
        413,
        `virtual size ${image.size} bytes is over this service's limit of ${maxVirtual} (maxVirtualBytes)`,
      );
    }
    const range = parseRange(request.headers.get("range"), image.size);
    if (range === "unsatisfiable") {
      return new Response(null, {
        status: 416,
        headers: { "content-range": `bytes */${image.size}` },
      });
    }
    const start = range?.start ?? 0;
    const end = range ? range.end + 1 : image.size;
    const headers = new Headers({
      "content-type": "application/octet-stream",
      "content-length": String(end - start),
      "accept-ranges": "bytes",
      "x-image-format": image.format,
    });
    if (range) {
      headers.set("content-range", `bytes ${start}-${end - 1}/${image.size}`);
    }
    if (request.method === "HEAD" || end === start) {
      release();
      return new Response(null, { status: range ? 206 : 200, headers });
    }
    const body = releasing(
      readable(image, { start, end, signal: request.signal }),
      release,
    );
    return new Response(body, { status: range ? 206 : 200, headers });
  }

  return async (request) => {
    const url = new URL(request.url);
    let release = () => {};
    try {
      if (
        url.pathname === "/convert" &&
        (request.method === "GET" || request.method === "HEAD")
      ) {
        release = enter();
        // A client that goes away gives its slot back even if the body
        // is never pulled or cancelled.
        request.signal.addEventListener("abort", release, { once: true });
        return await convertRoute(request, url, release);
      }
      if (url.pathname === "/info" && request.method === "POST") {
        release = enter();
        const upload = await readUpload(
          request,
          maxUpload,
          clientIdle,
          options.timeoutMs ?? 120_000,
        );
        const image = await open(upload, {
          format: url.searchParams.get("format") ?? undefined,
        });
        release();
        return json(
          200,
          imageInfo(image, url.searchParams.get("name") ?? undefined),
        );
      }
      if (url.pathname === "/" && request.method === "GET") {
        return json(200, {
          endpoints: [
            "GET /convert?url=URL&format=raw[&partition=N|NAME]",
            "POST /info",
          ],
        });
      }
      return json(404, {
        error: `no such endpoint: ${request.method} ${url.pathname}`,
      });
    } catch (e) {
      release();
      if (e instanceof Refusal) {
        const response = json(e.status, { error: e.message });
        new Headers(e.headers).forEach((v, k) => response.headers.set(k, v));
        return response;
      }
      // Malformed images are the caller's problem (422); an unreachable,
      // misbehaving or silent remote server is a gateway's (502, 504).
      return json(statusOf(e), { error: (e as Error).message });
    }
  };
}
