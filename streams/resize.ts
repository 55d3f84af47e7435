/**
 * `resizeImage(file, size)`: changes an image's virtual size in place
 * (`cli.ts resize`), through its driver.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { loadDriver } from "../drivers/_catalog.ts";
import { open } from "../drivers/_registry.ts";
import { UnsupportedError } from "./errors.ts";
import type { Sink, Source } from "./types.ts";

/** Options for {@linkcode resizeImage}. */
export interface ResizeOptions {
  /** The image's format; probed when not given. */
  format?: string;
  /**
   * Allows a smaller size (`--shrink`): what lies past the new end is
   * dropped. Without it a smaller size is refused. @default false
   */
  shrink?: boolean;
  /** `size` is added to the current size (`+SIZE`, or `-SIZE` as negative). @default false */
  relative?: boolean;
}

/** A shrink that was not asked for with `shrink` (`--shrink`). */
export class ShrinkError extends Error {
  /**
   * @param size the image's virtual size
   * @param requested the smaller size asked for
   */
  constructor(readonly size: number, readonly requested: number) {
    super(
      `Use the --shrink option to perform a shrink operation (from ${size} to ${requested} bytes).`,
    );
    this.name = "ShrinkError";
  }
}

/** What {@linkcode resizeImage} did. */
export interface ResizeResult {
  /** The image's format. */
  format: string;
  /** The virtual size before. */
  oldSize: number;
  /** The virtual size after. */
  newSize: number;
}

/**
 * Sets the virtual size of the image in `file` to `size` bytes. A raw
 * file is truncated or extended (a hole); other formats change through
 * their driver's `resize`, and formats without one are refused by name
 * (an `UnsupportedError`), as are sizes the format cannot hold.
 *
 * @param file the image file, readable and writable
 * @param size the new virtual size in bytes (a change of it, with `relative`)
 * @param options the format, and whether shrinking is allowed
 * @returns the format and the sizes before and after
 *
 * @example
 * ```ts
 * import { memorySink, resizeImage } from "../mod.ts";
 * const file = memorySink(new Uint8Array(4096));
 * const result = await resizeImage(file, 8192, { format: "raw" });
 * console.log(result.oldSize, result.newSize); // 4096 8192
 * ```
 */
export async function resizeImage(
  file: Source & Sink,
  size: number,
  options: ResizeOptions = {},
): Promise<ResizeResult> {
  const image = await open(file, { format: options.format });
  const format = image.format;
  const oldSize = image.size;
  if (options.relative) size += oldSize;
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new RangeError(
      `invalid size ${size}: a whole number of bytes from 0 (the image has ${oldSize})`,
    );
  }
  if (size < oldSize && !options.shrink) throw new ShrinkError(oldSize, size);
  if (size === oldSize) return { format, oldSize, newSize: size };
  if (format === "raw") {
    if (!file.resize) {
      throw new UnsupportedError(
        { format },
        "this file cannot change size (it has no resize)",
      );
    }
    await file.resize(size);
    await file.flush();
    return { format, oldSize, newSize: size };
  }
  const resize = (await loadDriver(format)).resize;
  if (!resize) {
    throw new UnsupportedError(
      { format },
      `${format} images cannot be resized here (qemu-img 7.2 cannot resize them either); convert to a new image of the size wanted instead`,
    );
  }
  await resize(file, size);
  return { format, oldSize, newSize: size };
}
