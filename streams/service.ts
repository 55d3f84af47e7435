/**
 * A conversion service: a `(Request) => Promise<Response>` handler for
 * `Deno.serve` (or Deno Deploy, or any runtime with `fetch` types).
 *
 * - `GET /convert?url=URL&format=raw` streams the raw disk of a remote image
 *   without storing it; a `Range: bytes=A-B` header on the request is
 *   honoured (206 with `Content-Range`).
 * - `POST /info` takes an image as the request body and answers its `info`
 *   JSON.
 *
 * It refuses URLs whose host is not allowed: by default loopback, private,
 * link-local and unspecified addresses (and `localhost`) are refused, so the
 * service cannot be used to reach internal services; an allow-list narrows
 * it further.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { fromBlob, fromUrl } from "./sources.ts";
import { readable } from "./readable.ts";
import { open } from "../drivers/registry.ts";
import type { Image } from "./types.ts";

/** Options for {@linkcode conversionService}. */
export interface ServiceOptions {
  /**
   * Hosts `/convert` may fetch from (exact names, or `*.example.com`). When
   * set, every other host is refused. @default undefined (any public host)
   */
  allowHosts?: string[];
  /** Allow loopback, private and link-local addresses. @default false */
  allowPrivate?: boolean;
  /** Largest image (its file size) accepted, in bytes. @default 64 GiB */
  maxInputBytes?: number;
  /** Largest upload `/info` accepts, in bytes. @default 256 MiB */
  maxUploadBytes?: number;
  /** The fetch used to read remote images. @default globalThis.fetch */
  fetch?: typeof fetch;
}

/** A request the service refuses, with its HTTP status. */
class Refusal extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

/** True for IPv4/IPv6 literals in loopback, private, link-local or unspecified ranges. */
function isPrivateAddress(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, "").toLowerCase();
  if (h === "localhost" || h.endsWith(".localhost")) return true;
  const v4 = /^(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(h);
  if (v4) {
    const [a, b] = [Number(v4[1]), Number(v4[2])];
    return a === 0 || a === 10 || a === 127 ||
      (a === 169 && b === 254) || (a === 172 && b >= 16 && b <= 31) ||
      (a === 192 && b === 168) || (a === 100 && b >= 64 && b <= 127) ||
      a >= 224;
  }
  if (h.includes(":")) {
    if (h === "::" || h === "::1") return true;
    if (/^f[cd]/.test(h) || /^fe[89ab]/.test(h)) return true; // ULA, link-local
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(h);
    return mapped ? isPrivateAddress(mapped[1]) : false;
  }
  // A bare number or hex form (http://2130706433/) is an IPv4 address too.
  return /^(0x[0-9a-f]+|\d+)$/.test(h);
}

function hostAllowed(host: string, options: ServiceOptions): boolean {
  if (!options.allowPrivate && isPrivateAddress(host)) return false;
  if (!options.allowHosts) return true;
  return options.allowHosts.some((pattern) =>
    pattern.startsWith("*.")
      ? host.endsWith(pattern.slice(1)) || host === pattern.slice(2)
      : host === pattern
  );
}

/** Checks a URL against the policy; returns it parsed. */
function checkUrl(text: string | null, options: ServiceOptions): URL {
  if (!text) throw new Refusal(400, "missing url parameter");
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new Refusal(400, `not a URL: ${text}`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new Refusal(
      400,
      `only http and https URLs are fetched, not ${url.protocol}`,
    );
  }
  if (!hostAllowed(url.hostname, options)) {
    throw new Refusal(
      403,
      `host ${url.hostname} is not allowed by this service`,
    );
  }
  return url;
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

/** The `info` facts of an opened image (the same keys as `cli.ts info --output=json`). */
export function imageInfo(
  image: Image,
  filename?: string,
): Record<string, unknown> {
  const info: Record<string, unknown> = {
    "virtual-size": image.size,
    filename: filename ?? image.name,
    format: image.format,
  };
  if (image.backingFile !== undefined) {
    info["backing-filename"] = image.backingFile;
    if (image.backingFormat) {
      info["backing-filename-format"] = image.backingFormat;
    }
  }
  info.encrypted = image.encrypted;
  if (image.geometry) info.geometry = image.geometry;
  if (image.details && Object.keys(image.details).length) {
    info["format-specific"] = {
      type: image.format,
      data: qemuStyle(image.details),
    };
  }
  return info;
}

/**
 * Format details in qemu-img's style, whichever a driver used: keys in
 * kebab-case (`first_sector` and `extentSize` become `first-sector` and
 * `extent-size`), and strings with trailing NULs dropped and other
 * control bytes written as `\xNN` (a header's `d2v\0` shows as `d2v`).
 */
function qemuStyle(value: unknown): unknown {
  if (typeof value === "string") {
    return value.replace(/\0+$/, "").replace(
      // deno-lint-ignore no-control-regex
      /[\x00-\x08\x0b-\x1f\x7f]/g,
      (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`,
    );
  }
  if (Array.isArray(value)) return value.map(qemuStyle);
  if (
    value === null || typeof value !== "object" || ArrayBuffer.isView(value)
  ) {
    return value;
  }
  return Object.fromEntries(
    Object.entries(value as Record<string, unknown>).map(([k, v]) => [
      k.replace(/_/g, "-").replace(/([a-z0-9])([A-Z])/g, "$1-$2").toLowerCase(),
      qemuStyle(v),
    ]),
  );
}

const json = (status: number, body: unknown) =>
  new Response(JSON.stringify(body, null, 2) + "\n", {
    status,
    headers: { "content-type": "application/json" },
  });

/**
 * Builds the conversion service's request handler.
 *
 * @param options host policy and size limits
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
  const maxUpload = options.maxUploadBytes ?? 256 * 1024 ** 2;
  return async (request) => {
    const url = new URL(request.url);
    try {
      if (
        url.pathname === "/convert" &&
        (request.method === "GET" || request.method === "HEAD")
      ) {
        const target = checkUrl(url.searchParams.get("url"), options);
        const format = url.searchParams.get("format") ?? "raw";
        if (format !== "raw") {
          throw new Refusal(400, `only format=raw is streamed, not ${format}`);
        }
        const source = await fromUrl(target, {
          fetch: options.fetch,
          signal: request.signal,
        });
        if (source.size > maxInput) {
          throw new Refusal(
            413,
            `image is ${source.size} bytes, over this service's limit of ${maxInput}`,
          );
        }
        const image = await open(source, {
          format: url.searchParams.get("from") ?? undefined,
        });
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
          headers.set(
            "content-range",
            `bytes ${start}-${end - 1}/${image.size}`,
          );
        }
        const body = request.method === "HEAD"
          ? null
          : readable(image, { start, end, signal: request.signal });
        return new Response(body, { status: range ? 206 : 200, headers });
      }
      if (url.pathname === "/info" && request.method === "POST") {
        const declared = Number(request.headers.get("content-length") ?? "0");
        if (declared > maxUpload) {
          throw new Refusal(
            413,
            `upload of ${declared} bytes is over this service's limit of ${maxUpload}`,
          );
        }
        const blob = await request.blob();
        if (blob.size > maxUpload) {
          throw new Refusal(
            413,
            `upload of ${blob.size} bytes is over this service's limit of ${maxUpload}`,
          );
        }
        const image = await open(fromBlob(blob), {
          format: url.searchParams.get("format") ?? undefined,
        });
        return json(
          200,
          imageInfo(image, url.searchParams.get("name") ?? undefined),
        );
      }
      if (url.pathname === "/" && request.method === "GET") {
        return json(200, {
          endpoints: ["GET /convert?url=URL&format=raw", "POST /info"],
        });
      }
      return json(404, {
        error: `no such endpoint: ${request.method} ${url.pathname}`,
      });
    } catch (e) {
      if (e instanceof Refusal) return json(e.status, { error: e.message });
      // Malformed images and unreachable sources are the caller's problem (4xx/502).
      const error = e as Error;
      const status = error.name === "HttpSourceError" ? 502 : 422;
      return json(status, { error: error.message });
    }
  };
}
