// The module worker behind index.html: opens an image (a File, a URL read
// with Range requests, or a sparse bundle folder given as its Files by path),
// converts it to a raw disk, reports progress, and answers with the format,
// size, sha256 and (when asked) the raw bytes.
import {
  convert,
  fromBlob,
  fromUrl,
  memorySink,
  memoryTree,
  open,
  openSparsebundle,
} from "/dist/mod.js";

/** A sink that only counts (for hashing without keeping the disk). */
function nullSink() {
  return {
    write: () => Promise.resolve(),
    resize: () => Promise.resolve(),
    flush: () => Promise.resolve(),
    close: () => Promise.resolve(),
  };
}

self.onmessage = async ({ data: { id, input, keep } }) => {
  try {
    // A folder comes as an object of Files by path within it ("Info.plist",
    // "bands/0", ...): a sparse bundle.
    const folder = typeof input !== "string" && !(input instanceof Blob);
    const image = folder
      ? await openSparsebundle(memoryTree(input))
      : await open(
        typeof input === "string"
          ? await fromUrl(new URL(input, self.location.href))
          : fromBlob(input),
      );
    const sink = keep ? memorySink() : nullSink();
    const result = await convert(image, sink, {
      hash: true,
      onProgress: (done, total) =>
        self.postMessage({ progress: total ? done / total : 1 }),
    });
    const blob = keep ? new Blob([sink.bytes()]) : undefined;
    self.postMessage({
      id,
      format: image.format,
      size: image.size,
      sha256: result.sha256,
      blob,
    });
  } catch (e) {
    self.postMessage({ id, error: `${e.name}: ${e.message}` });
  }
};
