/**
 * What {@linkcode open} accepts besides a {@linkcode Source}: a Promise of
 * one, a URL, a path (Deno), a Blob or File, bytes.
 *
 * This module is browser compatible: a path is opened through the file
 * adapter, loaded only when a path is given.
 *
 * @module
 */

import type { Sink, Source } from "./types.ts";

/**
 * Anything {@linkcode open} turns into a source: a Source (or a Promise of
 * one, so `open(fromUrl(url))` works without an inner `await`), an `http:`
 * or `https:` URL (a `URL` or a string), a file path (a string, in Deno),
 * a Blob or File, or bytes.
 */
export type ImageInput =
  | Source
  | Promise<Source>
  | URL
  | string
  | Blob
  | Uint8Array
  | ArrayBuffer;

/** The byte, Blob and URL sources, imported on first use. */
const sources = () => import("./sources.ts");

/** Whether `value` has what a Source has. */
function isSource(value: unknown): value is Source {
  return typeof value === "object" && value !== null &&
    typeof (value as Source).read === "function" &&
    typeof (value as Source).size === "number";
}

/** Whether `value` can also be written (a file opened for writing, a memory sink). */
export function isSink(value: unknown): value is Sink {
  return typeof value === "object" && value !== null &&
    typeof (value as Sink).write === "function" &&
    typeof (value as Sink).flush === "function";
}

/** What a value is, for a TypeError. */
function kindOf(value: unknown): string {
  if (value === null) return "null";
  if (typeof value !== "object") return typeof value;
  const name = (value as object).constructor?.name;
  if (!name) return "an object";
  return `${/^[AEIOU]/.test(name) ? "an" : "a"} ${name}`;
}

/**
 * The Source for any {@linkcode ImageInput}. A path is opened with the file
 * adapter (writable when `writable`), which only Deno has; anything that is
 * none of the accepted kinds is a TypeError saying what it got.
 *
 * @param input what to read
 * @param writable open a path for writing too
 * @returns the source
 *
 * @example
 * ```ts
 * import { toSource } from "../mod.ts";
 * const source = await toSource(new Uint8Array(1024));
 * console.log(source.size); // 1024
 * ```
 */
export async function toSource(
  input: ImageInput,
  writable = false,
): Promise<Source> {
  const value = await input;
  if (isSource(value)) return value;
  // The other sources (and the read-ahead a URL's uses) load only for
  // such inputs: opening a file's handle, as the CLI does, needs none.
  if (value instanceof Uint8Array) return (await sources()).fromBytes(value);
  if (value instanceof ArrayBuffer) {
    return (await sources()).fromBytes(new Uint8Array(value));
  }
  if (typeof Blob !== "undefined" && value instanceof Blob) {
    return (await sources()).fromBlob(value);
  }
  const url = value instanceof URL
    ? value
    : typeof value === "string" && /^https?:\/\//i.test(value)
    ? new URL(value)
    : undefined;
  if (url) {
    if (url.protocol !== "http:" && url.protocol !== "https:") {
      throw new TypeError(
        `open: a URL must be http: or https:, not ${url.protocol}`,
      );
    }
    if (writable) throw new TypeError("open: a URL cannot be opened writable");
    return await (await sources()).fromUrl(url);
  }
  if (typeof value === "string") {
    if (typeof Deno === "undefined") {
      throw new TypeError(
        `open: a path ("${value}") can be opened only in Deno; here give a Blob, bytes or a URL`,
      );
    }
    const { fromFile } = await import("./file.ts");
    return await fromFile(value, { write: writable });
  }
  throw new TypeError(
    `open: expected a Source, a Promise of one, a URL, a path, a Blob or bytes, but got ${
      kindOf(value)
    }`,
  );
}
