// The module worker behind index.html: opens an image (a File, several Files
// such as a segmented dmg's parts, a URL read with Range requests, or a
// sparse bundle folder given as its Files by path), with a password for
// encrypted ones, converts it to a raw disk, reports progress, and answers
// with the format, size, sha256 and (when asked) the raw bytes.
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

/**
 * The image among several files: the first segment of a segmented dmg
 * (`NAME.dmg` or `NAME.001.dmg`, not a `.dmgpart`), else the first file.
 */
function mainFile(files) {
  return files.find((f) => /\.dmg$/i.test(f.name)) ?? files[0];
}

self.onmessage = async ({ data: { id, input, keep, key } }) => {
  try {
    // Several Files: one image and the files it names (a segmented dmg's
    // parts), found by name among them. An object of Files by path within a
    // folder ("Info.plist", "bands/0", ...): a sparse bundle.
    const files = Array.isArray(input) ? input : undefined;
    const folder = typeof input === "object" && !(input instanceof Blob) &&
      !files;
    const image = folder
      ? await openSparsebundle(memoryTree(input))
      : await open(
        typeof input === "string"
          ? await fromUrl(new URL(input, self.location.href))
          : fromBlob(files ? mainFile(files) : input),
        {
          key: key || undefined,
          resolveFile: (name) => {
            const found = files?.find((f) => f.name === name);
            return found
              ? Promise.resolve(fromBlob(found))
              : Promise.reject(new Error(`drop ${name} too, with the image`));
          },
        },
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
