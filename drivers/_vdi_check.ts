/**
 * `check` for VirtualBox VDI images, as QEMU's `vdi_co_check` does it:
 * every allocated block map entry must name a block below
 * blocks_in_image that no other entry names, and the entries allocated
 * must number the header's blocks_allocated. Each failure is one
 * corruption, with qemu-img's message. Repairs are not offered (qemu-img
 * has none for vdi either).
 *
 * Fields read (little-endian): signature 0xbeda107f at 64, offset_bmap at
 * 340, blocks_in_image at 384, blocks_allocated at 388; the block map
 * holds blocks_in_image 32-bit entries, 0xffffffff (and 0xfffffffe, a
 * zero block) unallocated.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { emptyCheckResult } from "./_check.ts";
import { formatErrors } from "./_binary.ts";
import { VDI_SIGNATURE as SIGNATURE } from "./_signatures.ts";
import type { Source } from "../streams/types.ts";
import { UnsupportedError } from "../streams/errors.ts";
import type { CheckResult } from "./qcow2/check.ts";

const FORMAT = "vdi";
/**
 * Blocks checked at most (a 64 TiB disk of 1 MiB blocks): the check keeps
 * 4 bytes a block.
 */
const MAX_BLOCKS = 2 ** 26;
const fail = formatErrors(FORMAT);

/**
 * Checks the block map of the VDI image in `source` as `qemu-img check`
 * does.
 *
 * @param source the image file
 * @returns what was found
 * @throws {ImageFormatError} for a header the check cannot start from
 *
 * @example
 * ```ts
 * import { checkImage, create, memorySink } from "../mod.ts";
 * const sink = memorySink();
 * await create("vdi", sink, { size: 1 << 20 });
 * console.log((await checkImage(sink.source())).corruptions); // 0
 * ```
 */
export async function checkVdi(source: Source): Promise<CheckResult> {
  if (source.size < 392) {
    throw fail("file size", source.size, "at least 392 bytes (the header)");
  }
  const head = await source.read(0, 392);
  const v = new DataView(head.buffer, head.byteOffset, head.length);
  if (v.getUint32(64, true) !== SIGNATURE) {
    throw fail("signature", v.getUint32(64, true), "0xbeda107f", 64);
  }
  const offsetBmap = v.getUint32(340, true);
  const blocks = v.getUint32(384, true);
  const allocatedInHeader = v.getUint32(388, true);
  if (blocks > MAX_BLOCKS) {
    throw new UnsupportedError(
      { format: FORMAT, field: "blocks_in_image", value: blocks, offset: 384 },
      `checking more than ${MAX_BLOCKS} blocks is not supported`,
    );
  }
  if (offsetBmap + blocks * 4 > source.size) {
    throw fail(
      "offset_bmap",
      offsetBmap,
      `with its ${
        blocks * 4
      }-byte block map within the file's ${source.size} bytes`,
      340,
    );
  }
  const r = emptyCheckResult(FORMAT);
  // Which entry claimed each block: 0xffffffff for none yet.
  const owner = new Uint32Array(blocks).fill(0xffffffff);
  let allocated = 0;
  // The map in pieces of 1 MiB: memory bounded by the owner array.
  const piece = 1 << 18;
  for (let first = 0; first < blocks; first += piece) {
    const count = Math.min(piece, blocks - first);
    const bytes = await source.read(offsetBmap + first * 4, count * 4);
    const map = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
    for (let k = 0; k < count; k++) {
      const entry = map.getUint32(k * 4, true);
      if (entry >= 0xfffffffe) continue;
      if (entry < blocks) {
        allocated++;
        if (owner[entry] === 0xffffffff) owner[entry] = entry;
        else {
          r.messages.push(
            `ERROR: block index ${owner[entry]} also used by ${entry}`,
          );
          r.corruptions++;
        }
      } else {
        r.messages.push(
          `ERROR: block index ${first + k} too large, is ${entry}`,
        );
        r.corruptions++;
      }
    }
  }
  if (allocated !== allocatedInHeader) {
    r.messages.push(
      `ERROR: allocated blocks mismatch, is ${allocated}, should be ${allocatedInHeader}`,
    );
    r.corruptions++;
  }
  return r;
}
