/**
 * qcow2 `rebase`: the backing file's name and format rewritten in the
 * first cluster, as QEMU's `qcow2_change_backing_file` does. The header
 * fields stay, the header extensions are kept as they are (every type,
 * known or not) but the backing format one, which is replaced or dropped;
 * the name follows the end-of-extensions marker.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { setBe32, setBe64 } from "../_binary.ts";
import { ImageFormatError, UnsupportedError } from "../../streams/errors.ts";
import type { Sink, Source } from "../../streams/types.ts";
import { EXT, INCOMPAT, openState } from "../qcow2.ts";

const FORMAT = "qcow2";
const MAX_BACKING_NAME = 1023;

/**
 * Records `name` (with its `format`) as the backing file of the qcow2 in
 * `file`, or removes both (`undefined`). Nothing but the first cluster's
 * header area changes. As qemu-img 7.2, a name needs its format.
 *
 * @param file the image file, readable and writable
 * @param name the new backing file, or undefined for none
 * @param format the backing file's format (`-F`)
 * @throws {UnsupportedError} without a format, or for a corrupt image
 * @throws {ImageFormatError} when the name does not fit the first cluster
 *
 * @example
 * ```ts
 * import { memorySink, qcow2 } from "../../mod.ts";
 * import { setQcow2BackingFile } from "./backing.ts";
 * const sink = memorySink();
 * await (await qcow2.create!(sink, { size: 1 << 20 })).flush!();
 * await setQcow2BackingFile(sink, "base.raw", "raw");
 * console.log((await qcow2.open(sink.source(), {})).backingFile); // base.raw
 * ```
 */
export async function setQcow2BackingFile(
  file: Source & Sink,
  name: string | undefined,
  format?: string,
): Promise<void> {
  const state = await openState(file, {});
  const h = state.header;
  if (h.incompatible & INCOMPAT.corrupt) {
    throw new UnsupportedError(
      { format: FORMAT },
      "cannot rebase: the image is marked corrupt (run qemu-img check -r all)",
    );
  }
  const cluster = Math.min(state.clusterSize, file.size);
  const head = await file.read(0, cluster);
  const v = new DataView(head.buffer, head.byteOffset, head.length);
  const end = h.backingFileOffset !== 0 ? h.backingFileOffset : cluster;
  // The extensions as they are, the backing format one left out.
  const kept: Uint8Array[] = [];
  let oldEnd = h.headerLength;
  for (let at = h.headerLength; at + 8 <= end;) {
    const type = v.getUint32(at);
    const length = v.getUint32(at + 4);
    oldEnd = Math.min(end, at + 8);
    if (type === EXT.end) break;
    const whole = 8 + Math.ceil(length / 8) * 8;
    if (type !== EXT.backingFormat) {
      kept.push(head.slice(at, Math.min(at + whole, end)));
    }
    at += whole;
    oldEnd = Math.min(end, at);
  }
  const bytes = name === undefined || name === ""
    ? undefined
    : new TextEncoder().encode(name);
  if (bytes) {
    if (format === undefined) {
      throw new UnsupportedError(
        { format: FORMAT, field: "backing_format" },
        `Could not change the backing file to '${name}': backing format must be specified (-F)`,
      );
    }
    if (bytes.length > MAX_BACKING_NAME) {
      throw new ImageFormatError(
        {
          format: FORMAT,
          field: "backing_file",
          value: bytes.length,
          limit: `at most ${MAX_BACKING_NAME} bytes`,
        },
        `a backing file name of ${bytes.length} bytes is over ${MAX_BACKING_NAME}`,
      );
    }
    const text = new TextEncoder().encode(format);
    const ext = new Uint8Array(8 + Math.ceil(text.length / 8) * 8);
    setBe32(ext, 0, EXT.backingFormat);
    setBe32(ext, 4, text.length);
    ext.set(text, 8);
    kept.unshift(ext);
  }
  let at = h.headerLength;
  const area = new Uint8Array(cluster);
  area.set(head.subarray(0, h.headerLength));
  for (const ext of kept) {
    area.set(ext.subarray(0, Math.min(ext.length, cluster - at)), at);
    at += ext.length;
  }
  at += 8; // the end marker (zeros)
  const nameAt = at;
  if (bytes && nameAt + bytes.length > cluster) {
    throw new ImageFormatError(
      {
        format: FORMAT,
        field: "backing_file",
        value: bytes.length,
        limit: `${
          Math.max(0, cluster - nameAt)
        } bytes left in the first cluster`,
      },
      `the backing file name (${bytes.length} bytes) and the header extensions do not fit in the first cluster (${cluster} bytes)`,
    );
  }
  if (at > cluster) {
    throw new ImageFormatError(
      { format: FORMAT, field: "header extensions", value: at },
      `the header extensions do not fit in the first cluster (${cluster} bytes)`,
    );
  }
  if (bytes) area.set(bytes, nameAt);
  setBe64(area, 8, bytes ? nameAt : 0);
  setBe32(area, 16, bytes ? bytes.length : 0);
  // Up to the end of what was there before (the old name cleared too).
  if (h.backingFileOffset !== 0) {
    oldEnd = h.backingFileOffset + h.backingFileSize;
  }
  const stop = Math.max(nameAt + (bytes?.length ?? 0), oldEnd, at);
  await file.write(0, area.subarray(0, Math.min(stop, cluster)));
  await file.flush();
}
