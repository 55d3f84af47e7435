// The module worker behind index.html. It opens an image (a File, several
// Files such as a segmented dmg's parts, a URL read with Range requests, or
// a sparse bundle folder given as its Files by path), with a password for
// encrypted ones, and
// - `inspect`: answers what `info` shows (formatInfo's text and the facts);
// - `convert`: converts it to the chosen format and sends the bytes, in
//   order and with backpressure, to where they go: a MessagePort read by
//   the service worker (sw.js, a streamed download), a file chosen with
//   the File System Access API, or nowhere (hashing only). Memory stays
//   bounded by a few blocks whatever the disk's size: zero runs travel as
//   counts, not bytes. Formats written at random offsets (qcow, vpc, vdi,
//   vhdx...) cannot go to a stream: they are built in memory, up to
//   MEMORY_LIMIT bytes, and then sent.
import {
  convert,
  decodeWorkerStats,
  describeImage,
  formatInfo,
  fromBlob,
  fromUrl,
  humanSize,
  memorySink,
  memoryTree,
  open,
  openSparsebundle,
  readAhead,
} from "/dist/mod.js";

/** The most a format written at random offsets may take in memory. */
const MEMORY_LIMIT = 256 << 20;
/** The longest zero run sent as one message: progress stays close to the bytes delivered. */
const ZERO_PIECE = 64 << 20;
/** Messages sent to the service worker and not yet taken by it. */
const WINDOW = 4;

/**
 * The image among several files: the first segment of a segmented dmg
 * (`NAME.dmg` or `NAME.001.dmg`, not a `.dmgpart`), else the first file.
 */
function mainFile(files) {
  return files.find((f) => /\.dmg$/i.test(f.name)) ?? files[0];
}

/** Opens what the page sent: a URL, a File, Files, or a folder's Files by path. */
async function openInput(input, key) {
  // Several Files: one image and the files it names (a segmented dmg's
  // parts), found by name among them. An object of Files by path within a
  // folder ("Info.plist", "bands/0", ...): a sparse bundle.
  const files = Array.isArray(input) ? input : undefined;
  const folder = typeof input === "object" && !(input instanceof Blob) &&
    !files;
  if (folder) {
    return await openSparsebundle(memoryTree(input), {
      key: key || undefined,
    });
  }
  // Reads in file order (a conversion's) become a few large Range
  // requests (fromUrl reads ahead) or Blob slices (readAhead here).
  return await open(
    typeof input === "string"
      ? await fromUrl(new URL(input, self.location.href))
      : readAhead(fromBlob(files ? mainFile(files) : input)),
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
}

/** The name and on-disk size of what the page sent, for `info`. */
function describeInput(input) {
  if (typeof input === "string") return { filename: input };
  if (input instanceof Blob) {
    return { filename: input.name ?? "image", actualSize: input.size };
  }
  if (Array.isArray(input)) {
    const main = mainFile(input);
    return {
      filename: main.name,
      actualSize: input.reduce((n, f) => n + f.size, 0),
    };
  }
  const files = Object.values(input);
  return { actualSize: files.reduce((n, f) => n + f.size, 0) };
}

/**
 * Output to the service worker through `port`: data and zero runs as
 * messages, at most WINDOW of them not yet taken (it answers `ack` for
 * each it takes), so a slow disk slows the conversion instead of filling
 * memory. `cancel` (the download was cancelled) fails the next write.
 */
function portOutput(port) {
  let inFlight = 0;
  let failure;
  let wake;
  port.onmessage = ({ data }) => {
    if (data.ack) inFlight--;
    if (data.cancel) failure = new Error("the download was cancelled");
    wake?.();
  };
  const room = async (limit) => {
    while (inFlight > limit && !failure) {
      await new Promise((resolve) => wake = resolve);
    }
    if (failure) throw failure;
  };
  const send = async (message, transfer) => {
    await room(WINDOW - 1);
    inFlight++;
    port.postMessage(message, transfer);
  };
  return {
    data(bytes) {
      // A copy of its own (the caller's array may be a view into a block
      // still in use), moved rather than copied again.
      const copy = bytes.slice();
      return send({ data: copy }, [copy.buffer]);
    },
    zeros: (length) => send({ zeros: length }),
    async close() {
      await send({ end: true });
      await room(0); // everything taken: the download has all the bytes
    },
    fail(message) {
      port.postMessage({ error: message });
    },
  };
}

/**
 * Output to a file chosen with the File System Access API: zero runs
 * become a longer file (the API fills it with zeros) instead of bytes.
 */
async function fileOutput(handle) {
  const writable = await handle.createWritable();
  let position = 0;
  return {
    async data(bytes) {
      await writable.write({ type: "write", position, data: bytes.slice() });
      position += bytes.length;
    },
    async zeros(length) {
      position += length;
      await writable.write({ type: "truncate", size: position });
    },
    close: () => writable.close(),
    fail: () => writable.abort().catch(() => {}),
  };
}

/** Output that keeps nothing: for hashing only. */
function nullOutput() {
  return {
    data: () => Promise.resolve(),
    zeros: () => Promise.resolve(),
    close: () => Promise.resolve(),
    fail() {},
  };
}

/**
 * A sequential sink over an output: gaps and padding go as zero runs
 * (pieces of at most ZERO_PIECE bytes), data as it comes. `position` is
 * how far the output has got.
 */
function orderedSink(output) {
  let position = 0;
  const zeros = async (to) => {
    while (position < to) {
      const n = Math.min(ZERO_PIECE, to - position);
      await output.zeros(n);
      position += n;
    }
  };
  return {
    sequential: true,
    // Every output copies what it is given (or drops it): convert may
    // reuse its read buffers.
    copiesWrites: true,
    get position() {
      return position;
    },
    async write(offset, bytes) {
      if (offset < position) {
        throw new RangeError(
          `write at ${offset} is behind the stream position ${position}`,
        );
      }
      await zeros(offset);
      if (bytes.length) await output.data(bytes);
      position += bytes.length;
    },
    async resize(size) {
      if (size < position) {
        throw new RangeError(`cannot shrink a stream to ${size}`);
      }
      await zeros(size);
    },
    flush: () => Promise.resolve(),
    close: () => output.close(),
  };
}

/**
 * A memory sink for formats written at random offsets, refusing to grow
 * past `limit` with a message that says what to do instead.
 */
function cappedMemorySink(limit, format) {
  const sink = memorySink();
  const check = (end) => {
    if (end > limit) {
      throw new Error(
        `${format} images are written at random offsets, so this page builds them in memory, up to ${
          humanSize(limit)
        }; this one needs more. Choose raw, dmg, vmdk or cloop (streamed, any size), or use the command line: deno run -A cli.ts convert -O ${format} IMAGE OUTPUT`,
      );
    }
  };
  return {
    get size() {
      return sink.size;
    },
    read: (offset, length) => sink.read(offset, length),
    write(offset, bytes) {
      check(offset + bytes.length);
      return sink.write(offset, bytes);
    },
    resize(size) {
      check(size);
      return sink.resize(size);
    },
    flush: () => sink.flush(),
    close: () => sink.close(),
    bytes: () => sink.bytes(),
  };
}

/** Output options per format: vmdk as streamOptimized, the subformat a stream holds. */
function outputOptions(format) {
  return format === "vmdk" ? { subformat: "streamOptimized" } : undefined;
}

/** A refusal of a sequential sink, raised before anything was written. */
function needsRandomAccess(e) {
  return e?.name === "UnsupportedError" && /sequential/.test(e.message);
}

async function runConvert(data, reply) {
  const { input, key, to } = data;
  const format = data.format ?? "raw";
  const workersBefore = decodeWorkerStats();
  const image = await openInput(input, key);
  const output = to?.port
    ? portOutput(to.port)
    : to?.handle
    ? await fileOutput(to.handle)
    : nullOutput();
  const stream = orderedSink(output);
  let inMemory;
  let last = 0;
  let convertDone = 0;
  const progress = (final) => {
    const now = performance.now();
    if (!final && now - last < 100) return;
    last = now;
    // Raw output: how far the bytes got (zero runs wait for the reader).
    // Other formats: how much of the disk the encoder has taken.
    const done = format === "raw" && !inMemory
      ? Math.min(stream.position, image.size)
      : convertDone;
    reply({ progress: { done, total: image.size } });
  };
  const ticker = setInterval(() => progress(false), 250);
  try {
    const options = {
      format,
      options: outputOptions(format),
      hash: Boolean(data.hash),
      onProgress: (done) => {
        convertDone = done;
        progress(false);
      },
    };
    let result;
    try {
      result = await convert(image, stream, options);
    } catch (e) {
      if (!needsRandomAccess(e) || stream.position > 0) throw e;
      // Random offsets: build it in memory, then send it in order.
      inMemory = cappedMemorySink(MEMORY_LIMIT, format);
      result = await convert(image, inMemory, options);
    }
    if (inMemory) {
      const bytes = inMemory.bytes();
      for (let at = 0; at < bytes.length; at += 1 << 20) {
        await stream.write(at, bytes.subarray(at, at + (1 << 20)));
      }
    }
    const outputSize = stream.position;
    await stream.close();
    convertDone = image.size;
    progress(true);
    return {
      format: image.format,
      size: image.size,
      sha256: result.sha256,
      outputFormat: format,
      outputSize,
      // The decode workers (dmg, compressed files): loaded from the
      // bundle's _worker.js, alive for the whole conversion, ended by
      // the image's close.
      workers: { before: workersBefore, during: decodeWorkerStats() },
    };
  } catch (e) {
    output.fail(`${e.name}: ${e.message}`);
    throw e;
  } finally {
    clearInterval(ticker);
    await image.close?.();
  }
}

async function runInspect({ input, key }) {
  const image = await openInput(input, key);
  try {
    const facts = await describeImage(image, describeInput(input));
    return {
      format: image.format,
      size: image.size,
      facts,
      text: formatInfo(facts),
    };
  } finally {
    await image.close?.();
  }
}

self.onmessage = async ({ data }) => {
  const reply = (message) => self.postMessage({ id: data.id, ...message });
  try {
    const result = data.inspect
      ? await runInspect(data)
      : await runConvert(data, reply);
    if (result.workers) result.workers.after = decodeWorkerStats();
    reply({ done: result });
  } catch (e) {
    reply({ error: `${e.name}: ${e.message}` });
  }
};
