/// <reference lib="deno.worker" />
// Runs one mutant per message: open (forced format or probed), info, and
// convert to a null sink. Answers how it ended. The parent kills this worker
// on a timeout or when memory goes over the ceiling.
import {
  BackingFileError,
  convert,
  fromBytes,
  imageInfo,
  memoryTree,
  open,
  openSparsebundle,
} from "../mod.ts";
import { isTypedError as typed, nullSink } from "./_outcomes.ts";
import { fuzzBundleFiles } from "./_apple_writers.ts";

let bundleFiles: ReturnType<typeof fuzzBundleFiles> | undefined;

self.onmessage = async (
  { data }: MessageEvent<
    {
      id: number;
      bytes: Uint8Array;
      format?: string;
      key?: string;
      name?: string;
      parts?: Record<string, Uint8Array>;
    }
  >,
) => {
  try {
    // A sparse bundle's seed is its Info.plist: the mutant opens as the
    // bundle's plist, with the seed's band files beside it; an encrypted
    // bundle's seed is its token, the rest of the bundle in `parts`.
    const image = data.format === "sparsebundle"
      ? await openSparsebundle(
        memoryTree(
          data.parts?.["Info.plist"]
            ? { ...data.parts, "token": data.bytes }
            : {
              ...(bundleFiles ??= fuzzBundleFiles()),
              "Info.plist": data.bytes,
            },
        ),
        { key: data.key },
      )
      : await open(fromBytes(data.bytes, data.name ?? "mutant"), {
        format: data.format,
        key: data.key,
        // The files beside it (a segmented dmg's parts), by name.
        resolveFile: (name) =>
          data.parts?.[name]
            ? Promise.resolve(fromBytes(data.parts[name], name))
            // Typed, as a resolver's refusal is: a mutant of a vmdk can
            // become a descriptor naming extent files that are not there.
            : Promise.reject(
              new BackingFileError(`no file ${name} beside the mutant`, name),
            ),
        // Any backing file a mutant names reads as a small zero disk, so that
        // overlays (cow, qcow, vmdk, vpc) are read through, not refused.
        resolveBacking: () =>
          Promise.resolve(fromBytes(new Uint8Array(1 << 20), "backing")),
      });
    JSON.stringify(imageInfo(image));
    await convert(image, nullSink());
    self.postMessage({ id: data.id, outcome: "ok", format: image.format });
  } catch (e) {
    const error = e as Error;
    self.postMessage({
      id: data.id,
      outcome: typed(e) ? "typed" : "defect",
      error: `${error?.name}: ${error?.message}`,
      stack: typed(e) ? undefined : error?.stack,
    });
  }
};
