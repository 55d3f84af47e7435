/**
 * A toolkit for virtual-disk images: open dmg, cloop, qcow, vmdk, vhd, bochs
 * and UML cow images as random-access sources, stack overlays on them, and
 * convert them to raw disks and back, in Deno, browser web workers and on
 * Deno Deploy.
 *
 * Everything here is browser compatible except the file adapter
 * (`fromFile`, `createOutputFile`, `fileBackingResolver`), which needs
 * `Deno.*` and is only called, never run at load.
 *
 * @example
 * ```ts
 * import { convert, fromBytes, memorySink, open } from "./mod.ts";
 * const image = await open(fromBytes(new Uint8Array(4096)));
 * const sink = memorySink();
 * await convert(image, sink);
 * console.log(image.format, sink.bytes().length); // raw 4096
 * ```
 *
 * @module
 */

export * from "./streams/types.ts";
export * from "./streams/errors.ts";
export * from "./streams/sources.ts";
export * from "./streams/read_ahead.ts";
export * from "./streams/sinks.ts";
export * from "./streams/file.ts";
export * from "./streams/readable.ts";
export * from "./streams/convert.ts";
export * from "./streams/salvage.ts";
export * from "./streams/resize.ts";
export * from "./streams/rebase.ts";
export * from "./streams/dd.ts";
export * from "./streams/measure.ts";
export * from "./streams/overlay.ts";
export * from "./streams/snapshot.ts";
export * from "./streams/boot_sector.ts";
export * from "./streams/partitions.ts";
export * from "./streams/commit.ts";
export { cipherFor, decrypt, qcowKey } from "./streams/decrypt.ts";
export * from "./streams/service.ts";
export * from "./streams/nbd.ts";
export * from "./streams/tree.ts";
export * from "./streams/options.ts";
export * from "./streams/inputs.ts";
export * from "./streams/inspect.ts";
export {
  decodeToScratch,
  decompress,
  detectCompression,
  type FileCompression,
  MEMORY_SCRATCH_LIMIT,
} from "./streams/compressed.ts";
export * from "./drivers/registry.ts";
export { cloop } from "./drivers/cloop.ts";
export { bochs } from "./drivers/bochs.ts";
export { vdi } from "./drivers/vdi.ts";
export { vhdx } from "./drivers/vhdx.ts";
export { qed } from "./drivers/qed.ts";
export { parallels } from "./drivers/parallels.ts";
export { seSparse } from "./drivers/sesparse.ts";
export { vpc } from "./drivers/vpc.ts";
export { vmdk } from "./drivers/vmdk.ts";
export { qcow } from "./drivers/qcow.ts";
export { qcow2 } from "./drivers/qcow2.ts";
export * from "./drivers/qcow2/check.ts";
export * from "./drivers/qcow2/snapshots.ts";
export { amendQcow2 } from "./drivers/qcow2/amend.ts";
export { setQcow2BackingFile } from "./drivers/qcow2/backing.ts";
export type { Snapshot as Qcow2Snapshot } from "./drivers/qcow2.ts";
export { cow } from "./drivers/cow.ts";
export {
  type FatSpelling,
  type FatType,
  openTree,
  parseFatSpelling,
  vvfat,
  type VvfatOptions,
} from "./drivers/vvfat.ts";
export { dmg } from "./drivers/dmg.ts";
export {
  type DecodeWorkerStats,
  decodeWorkerStats,
} from "./drivers/codecs/_pool.ts";
export { dmgEncrypted } from "./drivers/dmg_encrypted.ts";
export { raw } from "./drivers/raw.ts";
export { sparseimage } from "./drivers/sparseimage.ts";
export { diskcopy42 } from "./drivers/diskcopy42.ts";
export { asif } from "./drivers/asif.ts";
export {
  openSparsebundle,
  sparsebundle,
  type SparsebundleOptions,
} from "./drivers/sparsebundle.ts";
