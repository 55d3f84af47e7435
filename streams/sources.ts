/**
 * Sources over bytes in memory, Blobs/Files and HTTP(S) URLs.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { HttpSourceError } from "./errors.ts";
import { checkRange, type Source } from "./types.ts";

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

/** Options for {@linkcode fromUrl}. */
export interface UrlSourceOptions {
  /** Extra request headers (authorisation). */
  headers?: HeadersInit;
  /** The fetch to use. @default globalThis.fetch */
  fetch?: typeof fetch;
  /** Cancels requests. */
  signal?: AbortSignal;
}

/**
 * A source over an HTTP(S) URL, reading with `Range` requests. The size
 * comes from a first range request's `Content-Range`. A server that answers
 * a range request with the whole body (status 200) is refused with an
 * {@linkcode HttpSourceError}, before any large body is read.
 *
 * @param url the image's URL
 * @param options headers, fetch, signal
 * @returns a Source
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
  const href = String(url);
  const doFetch = options.fetch ?? globalThis.fetch;
  const get = async (start: number, end: number) => {
    const headers = new Headers(options.headers);
    headers.set("Range", `bytes=${start}-${end}`);
    let response: Response;
    try {
      response = await doFetch(href, { headers, signal: options.signal });
    } catch (e) {
      throw new HttpSourceError(
        `${href}: request failed: ${(e as Error).message}`,
        href,
      );
    }
    if (response.status === 200) {
      await response.body?.cancel();
      throw new HttpSourceError(
        `${href}: the server ignored the Range request (status 200, whole body); random access needs a server that supports byte ranges`,
        href,
        200,
      );
    }
    if (response.status !== 206) {
      await response.body?.cancel();
      throw new HttpSourceError(
        `${href}: HTTP ${response.status} ${response.statusText}`,
        href,
        response.status,
      );
    }
    return response;
  };
  // Learn the size from the first byte's Content-Range: "bytes 0-0/12345".
  const first = await get(0, 0);
  const range = first.headers.get("Content-Range") ?? "";
  await first.body?.cancel();
  const match = /\/(\d+)\s*$/.exec(range);
  if (!match) {
    throw new HttpSourceError(
      `${href}: the server sent no usable Content-Range (${
        JSON.stringify(range)
      }), so the size is unknown`,
      href,
      206,
    );
  }
  const size = Number(match[1]);
  return {
    size,
    name: href,
    async read(offset: number, length: number) {
      checkRange(size, offset, length);
      if (length === 0) return new Uint8Array(0);
      const response = await get(offset, offset + length - 1);
      const bytes = new Uint8Array(await response.arrayBuffer());
      if (bytes.length !== length) {
        throw new HttpSourceError(
          `${href}: asked for ${length} bytes at ${offset}, got ${bytes.length}`,
          href,
          206,
        );
      }
      return bytes;
    },
  };
}
