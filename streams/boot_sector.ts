/**
 * `bootSectorPatch(image, bytes)`: sector 0 replaced, as QEMU's
 * `bdrv_set_boot_sector` does for `-boot` with a given boot sector.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { checkRange, type Extent, extentsOf, type Image } from "./types.ts";

/** Bytes in the sector that is replaced. */
export const BOOT_SECTOR_SIZE = 512;

/**
 * A view of `image` whose first 512 bytes read as `bytes`, zero-padded to
 * 512; every other byte reads as in `image`, and `image` is never written
 * by the patch (writes to the view, when `image` is writable, go to `image`
 * and, where they touch sector 0, to the patch too, as in QEMU). The
 * allocation map reports sector 0 as `data`. On an image shorter than
 * 512 bytes, the patch is cut to the image's size.
 *
 * @param image the disk
 * @param bytes the boot sector (at most 512 bytes)
 * @returns the patched view
 * @throws {RangeError} when `bytes` is longer than 512
 *
 * @example
 * ```ts
 * import { bootSectorPatch, fromBytes, open } from "../mod.ts";
 * const disk = await open(fromBytes(new Uint8Array(4096).fill(1)));
 * const view = bootSectorPatch(disk, new Uint8Array([0xeb, 0x3c, 0x90]));
 * const head = await view.read(0, 4);
 * console.log(head.join(","), (await view.read(511, 2)).join(",")); // 235,60,144,0 0,1
 * ```
 */
export function bootSectorPatch(image: Image, bytes: Uint8Array): Image {
  if (bytes.length > BOOT_SECTOR_SIZE) {
    throw new RangeError(
      `boot sector of ${bytes.length} bytes: at most ${BOOT_SECTOR_SIZE} bytes fit in sector 0`,
    );
  }
  const size = image.size;
  const patched = Math.min(BOOT_SECTOR_SIZE, size);
  const sector = new Uint8Array(BOOT_SECTOR_SIZE);
  sector.set(bytes);

  async function read(offset: number, length: number) {
    checkRange(size, offset, length);
    if (offset >= patched) return await image.read(offset, length);
    const out = new Uint8Array(length);
    const head = Math.min(length, patched - offset);
    out.set(sector.subarray(offset, offset + head));
    if (head < length) {
      out.set(await image.read(offset + head, length - head), head);
    }
    return out;
  }

  async function* extents(
    offset: number,
    length: number,
  ): AsyncIterable<Extent> {
    checkRange(size, offset, length);
    if (length === 0) return;
    const head = Math.max(0, Math.min(offset + length, patched) - offset);
    if (head > 0) yield { offset, length: head, kind: "data" };
    if (head < length) {
      yield* extentsOf(image, offset + head, length - head);
    }
  }

  const view: Image = {
    format: image.format,
    size,
    name: image.name,
    backingFile: image.backingFile,
    backingFormat: image.backingFormat,
    backing: image.backing,
    get encrypted() {
      return image.encrypted;
    },
    geometry: image.geometry,
    details: image.details,
    read,
    extents,
    close: () => image.close?.() ?? Promise.resolve(),
  };
  if (image.write) {
    const write = image.write.bind(image);
    view.write = async (offset, data) => {
      checkRange(size, offset, data.length);
      await write(offset, data);
      if (offset < patched) {
        const n = Math.min(data.length, patched - offset);
        sector.set(data.subarray(0, n), offset);
      }
    };
    view.flush = image.flush?.bind(image);
  }
  return view;
}
