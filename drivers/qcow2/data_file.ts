/**
 * `create -f qcow2 -o data_file=NAME[,data_file_raw=on]`: a new image
 * whose guest data lives in an external file, at guest offsets. The
 * tables are written as `convert` writes them (over a disk of zeros), so
 * `data_file_raw=on` maps every cluster (the data file reads as the disk,
 * as qemu-img makes it) and without it nothing is mapped.
 *
 * The image returned reads, but refuses writes by name: writes through
 * an external data file (allocations at guest offsets in a second file)
 * are not written by this driver.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { alignUp } from "../_binary.ts";
import { readBackSource } from "../_image.ts";
import { UnsupportedError } from "../../streams/errors.ts";
import type { CreateSpec, Image, Sink, Source } from "../../streams/types.ts";
import { encodeQcow2 } from "./encode.ts";
import { openState, qcow2Image } from "../qcow2.ts";

const FORMAT = "qcow2";

/**
 * Creates an empty qcow2 with an external data file (see the module notes).
 *
 * @param sink the qcow2 file (random access, readable back)
 * @param spec the size and `-o` options (`data_file` among them) and `createFile`
 * @returns the new image, read-only
 * @throws {UnsupportedError} without `spec.createFile`, with a backing file, or with encryption
 *
 * @example
 * ```ts
 * import { memorySink } from "../../mod.ts";
 * import { createWithDataFile } from "./data_file.ts";
 * const files = new Map<string, ReturnType<typeof memorySink>>();
 * const image = await createWithDataFile(memorySink(), {
 *   size: 1 << 20,
 *   options: { data_file: "disk.data", data_file_raw: "on" },
 *   createFile: (name) => {
 *     files.set(name, memorySink());
 *     return Promise.resolve(files.get(name)!);
 *   },
 * });
 * console.log(image.size, files.has("disk.data")); // 1048576 true
 * ```
 */
export async function createWithDataFile(
  sink: Sink,
  spec: CreateSpec,
): Promise<Image> {
  if (spec.backingFile !== undefined || spec.options?.backing_file) {
    throw new UnsupportedError(
      { format: FORMAT, field: "data_file", value: spec.options?.data_file },
      "a backing file with an external data file is not written",
    );
  }
  if (!spec.createFile) {
    throw new UnsupportedError(
      { format: FORMAT, field: "data_file", value: spec.options?.data_file },
      "an external data file needs a way to create it (the createFile option)",
    );
  }
  const createFile = spec.createFile;
  const size = alignUp(spec.size, 512);
  const zeros: Source = {
    size,
    read: (_offset, length) => Promise.resolve(new Uint8Array(length)),
    async *extents(offset, length) {
      yield { offset, length, kind: "zero" };
    },
  };
  let dataSink: Sink | undefined;
  await encodeQcow2(zeros, sink, {
    options: spec.options,
    key: spec.key,
    createFile: async (name) => {
      dataSink = await createFile(name);
      return dataSink;
    },
  });
  const source = readBackSource(sink, FORMAT, () => 0);
  const state = await openState(source, {
    resolveFile: () => {
      const readable = dataSink as Partial<Source> | undefined;
      if (typeof readable?.read === "function") {
        return Promise.resolve(readBackSource(dataSink!, FORMAT, () => size));
      }
      // Fresh: every byte of it is a zero.
      return Promise.resolve(zeros);
    },
  });
  const image = qcow2Image(state);
  image.write = () =>
    Promise.reject(
      new UnsupportedError(
        { format: FORMAT, field: "data_file", value: spec.options?.data_file },
        "cannot write: writes through an external data file are not supported (create made the image; qemu-io or qemu can write it)",
      ),
    );
  return image;
}
