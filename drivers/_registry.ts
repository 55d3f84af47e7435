/**
 * The registry's work without the drivers: probing by score over the
 * catalog's signature checks (`_catalog.ts`), opening (with the caller's
 * backing-file policy) and creating, each loading only the driver it
 * needs. `registry.ts` adds the lists of loaded drivers (`formats`,
 * `driver`); the CLI imports this module so that a conversion of one
 * format loads one driver.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { CATALOG, loadDriver } from "./_catalog.ts";
import {
  BackingFileError,
  ImageFormatError,
  ProbedRawWriteError,
  UnknownFormatError,
} from "../streams/errors.ts";
import type { OverlayImage } from "../streams/overlay.ts";
import { checkWriteOptions } from "../streams/options.ts";
import { type ImageInput, isSink, toSource } from "../streams/inputs.ts";
import { detectCompression } from "./_magic.ts";
import {
  type CreateSpec,
  type Image,
  type OpenOptions,
  PROBE_BYTES,
  type ProbeInput,
  type Sink,
  type Source,
  type WindowSource,
} from "../streams/types.ts";

/** How deep a backing chain may go before it is refused. */
export const MAX_BACKING_DEPTH = 16;

/** Reads the head and tail a probe looks at. */
export async function probeInput(source: Source): Promise<ProbeInput> {
  const headLength = Math.min(PROBE_BYTES, source.size);
  const head = await source.read(0, headLength);
  const tailLength = Math.min(PROBE_BYTES, source.size);
  const tail = source.size <= PROBE_BYTES
    ? head
    : await source.read(source.size - tailLength, tailLength);
  return { head, tail, size: source.size, name: source.name };
}

/**
 * Whether bytes that start with `head` (the first {@linkcode PROBE_BYTES}
 * of more) may be a raw image, from their head alone: no driver but raw
 * claims them with their tail unknown (zeros here) and their size the
 * least it can be. A guess that decides only where a compressed file is
 * decoded to (see `openCompressed`): the image is still probed whole
 * once decoded.
 */
function headMayBeRaw(head: Uint8Array): boolean {
  const input = { head, tail: new Uint8Array(head.length), size: head.length };
  try {
    return claimant(input) === undefined;
  } catch {
    return false;
  }
}

/** The first format other than raw whose probe claims `input`. */
function claimant(input: ProbeInput): string | undefined {
  return CATALOG.find((d) => d.name !== "raw" && d.probe(input) > 0)?.name;
}

/** One driver's verdict on a source. */
export interface ProbeResult {
  /** The format's name. */
  format: string;
  /** Its score (higher wins). */
  score: number;
}

/**
 * Scores every driver on `source` and returns the verdicts, best first.
 * Raw always scores 1, so it wins only when nothing else claims the bytes.
 *
 * @param source what to look at
 * @returns verdicts with a score above 0, best first
 *
 * @example
 * ```ts
 * import { fromBytes, probe } from "../mod.ts";
 * const [best] = await probe(fromBytes(new Uint8Array(512)));
 * console.log(best.format); // raw
 * ```
 */
export async function probe(source: Source): Promise<ProbeResult[]> {
  return verdicts(await probeInput(source));
}

/**
 * The most a probe scores (a signature found). No probe scores more, so
 * the first driver in the catalog to score it wins (equal scores keep
 * registry order).
 */
const TOP_SCORE = 100;

/**
 * The format {@linkcode verdicts} puts first, without running the probes
 * after the first that scores {@linkcode TOP_SCORE}: none of them could
 * win. Opening a vhdx runs 5 of the 22 probes (each is compiled on its
 * first call: the other 17 were 0.3 ms of every open).
 */
function bestFormat(input: ProbeInput): string | undefined {
  let best: string | undefined;
  let bestScore = 0;
  for (const d of CATALOG) {
    const score = d.probe(input);
    if (score > bestScore) {
      best = d.name;
      bestScore = score;
      if (score >= TOP_SCORE) break;
    }
  }
  return best;
}

/** Every driver's verdict on `input` (see {@linkcode probe}), best first. */
function verdicts(input: ProbeInput): ProbeResult[] {
  const results: ProbeResult[] = [];
  for (const d of CATALOG) {
    const score = d.probe(input);
    if (score > 0) results.push({ format: d.name, score });
  }
  // Array.prototype.sort is stable: equal scores keep registry order.
  return results.sort((a, b) => b.score - a.score);
}

/**
 * Opens an image: probes for its format unless `options.format` names one,
 * and follows its backing file only through `options.resolveBacking`.
 *
 * @param input the image: a Source, a Promise of one, a URL, a path (Deno),
 *   a Blob or bytes (see {@linkcode ImageInput})
 * @param options format, writability, key, backing-file policy; a writable
 *   open of a path or of a source that can be written writes through it
 * @returns the image (an overlay over its backing chain when followed)
 *
 * @example
 * ```ts
 * import { fromBytes, open } from "../mod.ts";
 * const image = await open(fromBytes(new Uint8Array(4096)));
 * console.log(image.format, image.size); // raw 4096
 * ```
 */
export async function open(
  input: ImageInput,
  options: OpenOptions = {},
): Promise<Image> {
  const source = await toSource(input, options.writable === true);
  // A writable open writes through the source itself when it can be
  // written (a file opened for writing, a memory sink): one handle, given once.
  const sink = options.sink ??
    (options.writable && isSink(source) ? source : undefined);
  return await openChain(source, sink ? { ...options, sink } : options, []);
}

/**
 * The image file as its driver sees it: a read past the end (a truncated
 * file, or a table entry pointing outside it) becomes one
 * {@linkcode ImageFormatError} naming the offset and the file's size, for
 * every driver alike.
 */
function guarded(source: Source, format: string): Source {
  const guard: Source & WindowSource = {
    ...source,
    // The same bytes, only checked: kernel copies see through it.
    windowOf: { source, offset: 0 },
    get size() {
      return source.size;
    },
    read(offset, length) {
      if (
        Number.isSafeInteger(offset) && Number.isSafeInteger(length) &&
        offset >= 0 && length >= 0 && offset + length > source.size
      ) {
        return Promise.reject(
          new ImageFormatError({
            format,
            field: "read offset",
            value: offset,
            limit:
              `within the file's ${source.size} bytes (${length} bytes wanted): ` +
              "the image is truncated or a table points outside it",
            offset,
            file: source.name,
          }),
        );
      }
      return source.read(offset, length);
    },
  };
  // The read-into-buffer form is guarded the same way (the spread copied
  // the source's own, unguarded).
  const readInto = source.readInto?.bind(source);
  if (readInto) {
    guard.readInto = (offset, into) =>
      offset + into.length > source.size
        ? guard.read(offset, into.length).then(() => {})
        : readInto(offset, into);
  }
  return guard;
}

/**
 * What QEMU says when it opens for writing a raw image whose format it
 * guessed by probing; `open` puts it in `Image.warnings`.
 *
 * @param name the image's name
 * @returns the warning's text
 *
 * @example
 * ```ts
 * import { memorySink, open, probedRawWarning } from "../mod.ts";
 * const sink = memorySink();
 * await sink.write(0, new Uint8Array(4096));
 * const image = await open(sink.source(), { writable: true, sink });
 * console.log(image.warnings?.[0] === probedRawWarning("(image)")); // true
 * ```
 */
export function probedRawWarning(name: string): string {
  return `Image format was not specified for '${name}' and probing guessed raw. ` +
    "Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted. " +
    "Specify the 'raw' format explicitly to remove the restrictions.";
}

/** The first block, the bytes QEMU probes again before a write there. */
const BLOCK_0 = 512;

/**
 * A raw image whose format was guessed: marked `probed`, warned about
 * when writable, and its writes to block 0 checked as QEMU's
 * `raw_co_pwritev` checks them: a write that would make the first block
 * carry another format's signature is refused with a
 * {@linkcode ProbedRawWriteError} (reopened, the image would no longer be
 * raw, and its bytes would be read as that format).
 */
function markProbedRaw(
  image: Image,
  name: string,
  options: OpenOptions,
): void {
  const mark = image as { probed?: boolean; warnings?: readonly string[] };
  mark.probed = true;
  const write = image.write?.bind(image);
  if (!options.writable || !write) return;
  mark.warnings = [probedRawWarning(name)];
  (image as { write?: Image["write"] }).write = async (offset, bytes) => {
    if (offset < BLOCK_0 && bytes.length > 0) {
      const length = Math.min(
        BLOCK_0,
        Math.max(image.size, offset + bytes.length),
      );
      const block = new Uint8Array(length);
      const kept = Math.min(length, image.size);
      if (kept > 0) block.set(await image.read(0, kept));
      block.set(bytes.subarray(0, length - offset), offset);
      const input = { head: block, tail: block, size: block.length };
      const claimed = claimant(input);
      if (claimed) throw new ProbedRawWriteError(claimed, image.name);
    }
    await write(offset, bytes);
  };
}

/**
 * Refuses a backing image that is not the one `image` links to by
 * identity (a vdi's parent UUID): its bytes would be another disk's.
 */
async function checkBackingId(
  image: Image,
  base: Image,
  file: string,
): Promise<void> {
  const parent = (base as Partial<OverlayImage>).top ?? base;
  if (parent.id === image.backingId) return;
  await base.close?.();
  throw new BackingFileError(
    `${image.format}: ${
      image.name ?? "the image"
    } links its parent by identity ${image.backingId}, but ${file} (${parent.format}) ${
      parent.id === undefined
        ? "carries no identity this toolkit reads"
        : `is ${parent.id}`
    }: refused, it is not this image's parent`,
    image.backingFile ?? file,
  );
}

async function openChain(
  source: Source,
  options: OpenOptions,
  seen: string[],
): Promise<Image> {
  // The probe's head also says whether the file is compressed.
  const input = options.format === undefined
    ? await probeInput(source)
    : undefined;
  const name = options.format ?? (input && bestFormat(input)) ?? "raw";
  // A compressed file no driver claims is a wrapper: decode it, then
  // probe what is inside (a dmg, whose chunks may start with bzip2 or xz
  // magic, is claimed by its trailer first).
  const compression = input && name === "raw"
    ? detectCompression(input.head)
    : undefined;
  if (compression) {
    // The decoders load only for a compressed file.
    const { openCompressed } = await import("../streams/compressed.ts");
    return await openCompressed(
      source,
      compression,
      options,
      (decoded, o) => openChain(decoded, o, seen),
      headMayBeRaw,
    );
  }
  const opened = await (await loadDriver(name)).open(
    name === "raw" ? source : guarded(source, name),
    options,
  );
  // With a key, every encrypted layer of the chain is unlocked as it opens.
  // (The ciphers load only then.)
  const image = options.key !== undefined && opened.encryption
    ? (await import("../streams/decrypt.ts")).decrypt(opened, options.key)
    : opened;
  if (name === "raw" && options.format === undefined) {
    markProbedRaw(opened, source.name ?? "(image)", options);
  }
  if (image.backingFile === undefined || !options.resolveBacking) {
    return image;
  }
  const chain = [...seen, source.name ?? `(${name} image)`];
  if (chain.length > MAX_BACKING_DEPTH) {
    throw new BackingFileError(
      `backing chain deeper than ${MAX_BACKING_DEPTH}: ${chain.join(" -> ")}`,
      image.backingFile,
    );
  }
  const backingSource = await options.resolveBacking(image.backingFile, image);
  if (backingSource.name !== undefined && chain.includes(backingSource.name)) {
    await backingSource.close?.();
    throw new BackingFileError(
      `backing file loop: ${chain.join(" -> ")} -> ${backingSource.name}`,
      image.backingFile,
    );
  }
  // An internal snapshot named for the top layer is not the backing file's.
  const { snapshot: _snapshot, ...inherited } = image.backingOptions ??
    options.options ?? {};
  const base = await openChain(backingSource, {
    ...options,
    options: inherited,
    format: image.backingFormat,
    writable: false,
    sink: undefined,
  }, chain);
  if (image.backingId !== undefined) {
    await checkBackingId(image, base, backingSource.name ?? image.backingFile);
  }
  // The overlay loads only for an image with a backing file followed.
  const { overlay } = await import("../streams/overlay.ts");
  return overlay(image, base);
}

/**
 * Creates an empty image of `format` in `sink`.
 *
 * @param format the format name
 * @param sink where the image goes
 * @param spec size, backing file, options
 * @returns the new image, open for writing
 *
 * @example
 * ```ts
 * import { create, memorySink } from "../mod.ts";
 * const sink = memorySink();
 * const image = await create("raw", sink, { size: 1 << 20 });
 * console.log(image.size, sink.bytes().length); // 1048576 1048576
 * ```
 */
export async function create(
  format: string,
  sink: Sink,
  spec: CreateSpec,
): Promise<Image> {
  const d = await loadDriver(format);
  if (!d.create) {
    throw new UnknownFormatError(
      d.recognisedOnly
        ? `format '${format}' is only recognised (refused by name), not read or written`
        : `format '${format}' cannot be created empty${
          d.encode ? ` (it is written whole: use convert -O ${format})` : ""
        }`,
      format,
    );
  }
  checkWriteOptions(d, spec.options);
  if (!Number.isSafeInteger(spec.size) || spec.size < 0) {
    throw new ImageFormatError({
      format,
      field: "size",
      value: spec.size,
      limit: "a whole number of bytes, 0 or more",
    });
  }
  return await d.create(sink, spec);
}
