/**
 * The model every driver and combinator shares: sources, sinks, extents,
 * images and drivers.
 *
 * This module is browser compatible.
 *
 * @module
 */

import type { OverlayImage } from "./overlay.ts";

/** What a run of bytes holds, as an allocation map reports it. */
export type ExtentKind =
  /** The layer stores bytes here. */
  | "data"
  /** The layer knows these bytes read as zeros and stores none. */
  | "zero"
  /** The layer has nothing here: reads fall through to a backing image (or read as zeros when there is none). */
  | "unallocated";

/** One run of an allocation map. */
export interface Extent {
  /** Byte offset of the run in the virtual disk. */
  offset: number;
  /** Length of the run in bytes (always > 0). */
  length: number;
  /** What the run holds. */
  kind: ExtentKind;
  /**
   * For a `data` run stored in the image file as it reads (not compressed,
   * not encrypted, in one piece): the byte offset of its first byte in the
   * file, as `qemu-img map` shows it. Absent where there is no such place.
   */
  fileOffset?: number;
}

/**
 * A random-access, read-only view of bytes with a known size.
 *
 * `read(offset, length)` returns exactly `length` bytes; asking for bytes past
 * `size` is a `RangeError`. The returned array may be a view the caller must
 * not keep across the next call only if documented by the source; all
 * sources in this toolkit return fresh arrays the caller owns.
 */
export interface Source {
  /** Size in bytes. */
  readonly size: number;
  /** Reads `length` bytes at `offset`. */
  read(offset: number, length: number): Promise<Uint8Array>;
  /**
   * Reads `into.length` bytes at `offset` into `into` (the read-into-buffer
   * form, for speed): the same bytes as `read`, without a fresh array per
   * call. Optional; {@linkcode readInto} falls back to `read`. A source
   * that fills `into` from its start as bytes arrive (a URL's) may call
   * `arrived` with how many of its first bytes are in place so far, so
   * that a reader can use them before the rest comes.
   */
  readInto?(
    offset: number,
    into: Uint8Array,
    arrived?: (bytes: number) => void,
  ): Promise<void>;
  /**
   * The allocation map of `[offset, offset + length)`: consecutive runs that
   * cover the range exactly, in order. Sources without one are all `data`
   * (see {@linkcode extentsOf}).
   */
  extents?(offset: number, length: number): AsyncIterable<Extent>;
  /** A name for messages (a file path or URL), when there is one. */
  readonly name?: string;
  /** Releases what the source holds (file handles). */
  close?(): Promise<void>;
}

/** Random-access writes. */
export interface Sink {
  /**
   * Writes `bytes` at `offset`. A sink that is not `sequential` must not
   * keep `bytes` once the returned promise settles: `convert` reuses its
   * buffers (sequential sinks get arrays of their own).
   */
  write(offset: number, bytes: Uint8Array): Promise<void>;
  /** Makes the sink exactly `size` bytes long (zero-filled or a hole past the last write). */
  resize?(size: number): Promise<void>;
  /** Pushes buffered writes to the medium. */
  flush(): Promise<void>;
  /** Flushes and releases the sink. */
  close(): Promise<void>;
  /**
   * True when writes must come in increasing offset order without overlap
   * (a stream). Gaps are zero-filled by the sink.
   */
  readonly sequential?: boolean;
  /**
   * True when a sequential sink, like a random-access one, does not keep
   * `bytes` once a write settles (it copies them, sends a copy, or only
   * looks at them): `convert` then reuses its read buffers for it too,
   * instead of a fresh array per read (in chromium a fresh 2 MiB array
   * per read, faulted in page by page, was a fifth of a dmg conversion's
   * time on the thread that reads).
   */
  readonly copiesWrites?: boolean;
  /** A name for messages. */
  readonly name?: string;
}

/**
 * A source whose bytes are, one for one, a range of another source's: byte
 * `i` here is byte `offset + i` of `source` (a raw image over its file, the
 * data part of a fixed VHD). Lets {@linkcode RangeCopySink}s copy the
 * underlying source directly. An adapter that changes bytes (a patch, a
 * decryption) must not carry this field over (no `{ ...image }`).
 */
export interface WindowSource extends Source {
  /** The source underneath and where this one starts in it. */
  readonly windowOf: { source: Source; offset: number };
}

/** The file each registered image's data-extent `fileOffset`s point into. */
const storage = new WeakMap<object, Source>();

/**
 * Declares, for a driver, that every `data` extent of `image` that carries a
 * `fileOffset` reads exactly as those bytes of `file` (stored plainly: not
 * compressed, not encrypted). `convert` then lets a {@linkcode RangeCopySink}
 * copy such runs from `file` itself (file to file in the kernel). The
 * registration is by identity: an adapter that wraps the image (and may
 * change its bytes) is another object and is never taken for it. Register
 * only read-only images (a writable one may hold bytes not yet in `file`).
 * Returns `image`.
 *
 * @example
 * ```ts
 * import { dataFileOf, fromBytes, storesDataIn } from "../mod.ts";
 * const file = fromBytes(new Uint8Array(1024));
 * const image = storesDataIn(
 *   { ...file, format: "raw", encrypted: false, extents: async function* () {} },
 *   file,
 * );
 * console.log(dataFileOf(image) === file); // true
 * ```
 */
export function storesDataIn<T extends Image>(image: T, file: Source): T {
  storage.set(image, file);
  return image;
}

/**
 * The file whose bytes the `fileOffset`s of `source`'s data extents point
 * into, when its driver declared one ({@linkcode storesDataIn}) and it is
 * not open for writing.
 *
 * @example
 * ```ts
 * import { dataFileOf, fromBytes } from "../mod.ts";
 * console.log(dataFileOf(fromBytes(new Uint8Array(512)))); // undefined
 * ```
 */
export function dataFileOf(source: Source): Source | undefined {
  if ((source as Partial<Image>).write) return undefined;
  return storage.get(source);
}

/** Images whose data runs `map` splits over their file's holes. */
const looksIntoFile = new WeakMap<object, () => Promise<boolean>>();

/**
 * Declares, for a driver, when `qemu-img map` reports the parts of
 * `image`'s stored data runs that lie in holes of its file as zeros
 * (`"zero": true, "data": true`): when `check` answers true. qemu does so
 * for a qcow2 whose metadata was preallocated (its clusters counted in
 * the refcounts far outnumber those the file system stores); for other
 * formats and other qcow2 images a data run stays whole. Returns `image`.
 *
 * @example
 * ```ts
 * import { fromBytes } from "../mod.ts";
 * import { mapLooksIntoFile, mapsFileHoles } from "./types.ts";
 * const file = fromBytes(new Uint8Array(1024));
 * const image = mapLooksIntoFile(
 *   { ...file, format: "raw", encrypted: false, extents: async function* () {} },
 *   () => Promise.resolve(true),
 * );
 * console.log(await mapsFileHoles(image)); // true
 * ```
 */
export function mapLooksIntoFile<T extends Image>(
  image: T,
  check: () => Promise<boolean>,
): T {
  looksIntoFile.set(image, check);
  return image;
}

/**
 * Whether `map` splits `image`'s data runs over its file's holes (see
 * {@linkcode mapLooksIntoFile}); false for images no driver declared.
 *
 * @example
 * ```ts
 * import { fromBytes } from "../mod.ts";
 * import { mapsFileHoles } from "./types.ts";
 * console.log(await mapsFileHoles(fromBytes(new Uint8Array(512)))); // false
 * ```
 */
export function mapsFileHoles(image: Source): Promise<boolean> {
  return looksIntoFile.get(image)?.() ?? Promise.resolve(false);
}

/**
 * A sink that can copy bytes from some sources itself, faster than reads
 * and writes through JavaScript (the file adapter: file to file in the
 * kernel, holes left as holes). Optional: convert uses it when the sink
 * has it and falls back to reading and writing when it answers `undefined`.
 */
export interface RangeCopySink extends Sink {
  /**
   * Copies `[fromOffset, fromOffset + length)` of `from` to `toOffset`
   * here, leaving the parts that `from` has as holes unwritten (the sink
   * was sized beforehand, so they read as zeros). Returns the bytes
   * copied (the data parts), or `undefined`, with nothing written, when
   * it cannot copy from this source.
   */
  copyRange(
    from: Source,
    fromOffset: number,
    length: number,
    toOffset: number,
  ): Promise<number | undefined>;
  /**
   * {@linkcode RangeCopySink.copyRange} for each of `ranges` in one call,
   * for a sink that copies many short ranges faster together (the file
   * adapter shares their pieces with a second thread at once). Returns
   * the bytes copied, or `undefined`, with nothing written, when it
   * cannot copy from this source. Optional: without it, `copyRange` is
   * called for each.
   */
  copyRanges?(
    from: Source,
    ranges: readonly CopyRange[],
  ): Promise<number | undefined>;
}

/**
 * One range of a {@linkcode RangeCopySink.copyRanges} call: where it
 * starts in the source, its length, and where it goes in the sink.
 */
export type CopyRange = readonly [
  fromOffset: number,
  length: number,
  toOffset: number,
];

/** Geometry hints (cylinders, heads, sectors per track) some formats store. */
export interface Geometry {
  cylinders: number;
  heads: number;
  sectors: number;
}

/**
 * An opened disk image: a Source of the virtual disk plus what the format
 * knows about it. `size` is the virtual size.
 */
export interface Image extends Source {
  /** The driver's name (`raw`, `qcow`, `dmg`, ...). */
  readonly format: string;
  /** The allocation map of this layer alone (never of its backing image). */
  extents(offset: number, length: number): AsyncIterable<Extent>;
  /** The backing file named in the header, as written there. */
  readonly backingFile?: string;
  /** The backing file's format named in the header, when the format stores one. */
  readonly backingFormat?: string;
  /** The image the backing file was opened as, when the caller allowed following it. */
  readonly backing?: Image;
  /**
   * True when the image stores its data encrypted, whether or not a key has
   * been applied (QEMU's `bdrv_is_encrypted`; an overlay reports its base's
   * encryption too).
   */
  readonly encrypted: boolean;
  /**
   * Set on an encrypted layer while no key has been applied: the hook
   * `decrypt(image, key)` uses. Reading or writing such a layer's encrypted
   * data fails with a `KeyError`; its allocation map and metadata work.
   */
  readonly encryption?: Encryption;
  /** Geometry stored in the image, if any. */
  readonly geometry?: Geometry;
  /** Format-specific facts for `info` (JSON-serialisable). */
  readonly details?: Record<string, unknown>;
  /**
   * True when the caller did not name the format and probing chose it
   * (set by `open` on raw images, whose writes to the first block are then
   * checked as QEMU checks them).
   */
  readonly probed?: boolean;
  /**
   * Things the caller should be told about how the image was opened (a
   * raw format guessed by probing and opened writable, QEMU's warning).
   * The library never prints: the CLI writes these to stderr.
   */
  readonly warnings?: readonly string[];
  /**
   * The identity the backing image must carry (its `id`), for formats that
   * link a parent by identity rather than by name (vdi's uuid_link): `open`
   * refuses a backing image whose `id` is another, or that has none.
   */
  readonly backingId?: string;
  /** This image's identity, as images layered on it name it (vdi's uuid_image). */
  readonly id?: string;
  /**
   * The driver options to open the backing image with, when they are not
   * this image's own (a vdi passes down what is left of its `parent` list).
   */
  readonly backingOptions?: Record<string, string>;
  /** Writes through the format (allocating as needed); present when opened writable. */
  write?(offset: number, bytes: Uint8Array): Promise<void>;
  /** Flushes metadata and data of a writable image. */
  flush?(): Promise<void>;
}

/**
 * Encrypts or decrypts whole 512-byte sectors of a virtual disk in place;
 * `sector` is the number of the first one (the IV comes from it).
 */
export interface SectorCipher {
  /** Decrypts `bytes` (a multiple of 512) holding sectors `sector`, `sector + 1`, ... */
  decrypt(sector: number, bytes: Uint8Array): Promise<void>;
  /** Encrypts `bytes` (a multiple of 512) holding sectors `sector`, `sector + 1`, ... */
  encrypt(sector: number, bytes: Uint8Array): Promise<void>;
}

/**
 * The hook between an encrypted layer and `decrypt(image, key)`: the
 * driver says which scheme it uses (so `decrypt` can derive the key and
 * build the cipher) and, given the cipher, returns the layer reading
 * plaintext and writing ciphertext. The driver alone knows which stored
 * runs are encrypted (qcow's compressed clusters are not).
 */
export interface Encryption {
  /** The scheme: `qcow-aes` (AES-128-CBC per sector, QEMU's key from the passphrase). */
  readonly scheme: string;
  /**
   * True when the key must be given as the image opens (`open(source,
   * { key })`), because the layout itself is encrypted (an encrypted dmg):
   * `decrypt` then refuses the layer with a `KeyError` saying so.
   */
  readonly opensWithKey?: boolean;
  /** The same layer, reading and writing through `cipher`. */
  unlock(cipher: SectorCipher): Image;
  /**
   * The cipher of `key`, for schemes whose key depends on the image (LUKS
   * derives its master key from key slots): `decrypt` uses it instead of
   * its table of schemes. A wrong key fails at the first read or write.
   */
  cipher?(key: string | Uint8Array): SectorCipher;
}

/** What a driver's `probe` sees: the first and last bytes of the source. */
export interface ProbeInput {
  /** The first bytes of the source (up to {@linkcode PROBE_BYTES}). */
  head: Uint8Array;
  /** The last bytes of the source (up to {@linkcode PROBE_BYTES}); the same bytes as `head` for small sources. */
  tail: Uint8Array;
  /** The source's total size. */
  size: number;
  /** The file name or URL, when known (a hint only: content decides). */
  name?: string;
}

/** How many bytes of head and tail probing reads. */
export const PROBE_BYTES = 8192;

/** Decides what to do with a backing file an image names. */
export type BackingResolver = (
  backingFile: string,
  image: Image,
) => Promise<Source>;

/** One entry of a {@linkcode Tree} folder. */
export interface TreeEntry {
  /** The name within its folder (never contains `/`). */
  name: string;
  /** A file or a folder. */
  kind: "file" | "dir";
  /** Size in bytes (0 for folders). */
  size: number;
  /** Last modification time, in milliseconds since 1970-01-01 UTC. */
  mtime: number;
}

/**
 * A read-only tree of folders and files, as the vvfat driver presents it as
 * a disk. Paths are names joined by `/`, relative to the root (`""`).
 */
export interface Tree {
  /** The entries of the folder at `path`. */
  list(path: string): Promise<TreeEntry[]>;
  /** Reads `length` bytes at `offset` of the file at `path` (exactly that many). */
  read(path: string, offset: number, length: number): Promise<Uint8Array>;
  /** A name for messages (the folder's path). */
  readonly name?: string;
}

/** Options for opening an image. */
export interface OpenOptions {
  /** Skip probing and open as this format. */
  format?: string;
  /** Open for writing (the source must also be a Sink). Default: read-only. */
  writable?: boolean;
  /** Passphrase or key for encrypted images. */
  key?: string | Uint8Array;
  /**
   * Opens backing files. When absent, backing files are named but not
   * followed (`image.backing` stays undefined).
   */
  resolveBacking?: BackingResolver;
  /**
   * Opens a file an image names as part of itself (the extent files of a
   * vmdk descriptor), relative to the folder of `namedBy` (the naming
   * image's `Source.name`, so that a backing image's extents are found
   * beside it) or of the image opened. Without it such images cannot be
   * opened.
   */
  resolveFile?: (name: string, namedBy?: string) => Promise<Source>;
  /** Driver-specific options (`key=value` from `-o`). */
  options?: Record<string, string>;
  /** The sink to write through for writable opens (often the same file as the source). */
  sink?: Sink;
  /**
   * Where a compressed file (`.gz`, `.xz`, `.bz2`, `.zst`) is decoded to
   * when its contents must be read at random: a factory of temporary
   * files (`scratchFiles(dir)` in Deno). Without it they are decoded into
   * memory, up to 512 MiB of data.
   */
  scratch?: () => Promise<ScratchFile>;
  /**
   * Called as a compressed file is decoded front to back into scratch
   * (when opening it): compressed bytes read so far, and their total.
   */
  onDecodeProgress?: (done: number, total: number) => void;
  /**
   * A raw output that a compressed file read front to back (one that
   * would otherwise be decoded into `scratch`: a single zstd frame, gzip,
   * bzip2, a single-block xz) is decoded straight into, in one pass, when
   * the image inside may be raw (see {@linkcode UnpackTarget}).
   */
  unpackTo?: UnpackTarget;
}

/**
 * Where `open` may decode a compressed file whose image inside is raw
 * (`disk.img.zst`), for a convert to a raw file: the decoded bytes go
 * straight into the output, with no scratch store and no second pass.
 * `open` fills in `outcome`, and the caller goes on by it:
 *
 * - undefined: the output was never opened (the file was not compressed,
 *   is read through its index, or its first bytes are another format's,
 *   decoded into scratch as usual): convert the image as usual.
 * - `raw`: the image is raw, and the output holds it whole (zero runs
 *   left as holes, sized): nothing is left to write. The image returned
 *   reads its bytes back from the output.
 * - `scratch`: the image inside was found not to be raw only at its end
 *   (a signature in its last bytes: a dmg, a fixed VHD). The output holds
 *   its decoded bytes and the image returned reads from it: convert it
 *   into another output, then discard this one.
 *
 * An error while decoding (a checksum that does not match, a truncated
 * file) rejects `open` after bytes were written: the caller removes the
 * output (the command line writes it under a temporary name).
 */
export interface UnpackTarget {
  /** Opens the output (a random-access file that can be read back), once decoding into it starts. */
  open(): Promise<Sink & Source>;
  /** What became of the output: set by `open` (see above). */
  outcome?: "raw" | "scratch";
  /**
   * Zero runs of this many bytes (aligned) are left as holes, as convert's
   * `sparseSize`. @default 4096
   */
  sparseSize?: number;
}

/**
 * A temporary store: written once, then read at random; whatever it holds
 * is gone once it is closed (a temporary file removed, memory released).
 * Reads of bytes never written are zeros.
 */
export interface ScratchFile {
  /** Writes `bytes` at `offset` (the store keeps no reference to them). */
  write(offset: number, bytes: Uint8Array): Promise<void>;
  /** Reads `into.length` bytes at `offset` into `into`. */
  readInto(offset: number, into: Uint8Array): Promise<void>;
  /** Removes the store. */
  close(): Promise<void>;
}

/** What `create` makes. */
export interface CreateSpec {
  /** Virtual size in bytes. */
  size: number;
  /** Backing file name to record in the header. */
  backingFile?: string;
  /** Backing file format to record, when the format stores one. */
  backingFormat?: string;
  /**
   * The backing file, opened: formats that link a parent by identity (a
   * differencing vdi records its parent's UUID) read it from there, and
   * fill the rest of a block they allocate with its bytes.
   */
  backing?: Image;
  /** Passphrase for formats that encrypt. */
  key?: string | Uint8Array;
  /** Driver-specific options (`-o key=value`). */
  options?: Record<string, string>;
  /**
   * Creates a new file the image names as part of itself (qcow2's
   * external `data_file`), from the name the image records (relative to
   * the image's folder). The caller keeps the file: the driver only writes
   * and flushes it; committing or closing it is the caller's. Without it,
   * options that need such a file are refused.
   */
  createFile?: (name: string) => Promise<Sink>;
}

/** Options a driver's encoder receives from `convert`. */
export interface EncodeOptions {
  /** Driver-specific options (`-o key=value`). */
  options?: Record<string, string>;
  /** Write compressed where the format allows (`convert -c`). */
  compress?: boolean;
  /** Passphrase for formats that encrypt. */
  key?: string | Uint8Array;
  /** Called with the number of virtual-disk bytes consumed so far. */
  onProgress?: (done: number) => void;
  /** Stops the work. */
  signal?: AbortSignal;
  /**
   * Creates a new file the image names as part of itself (qcow2's
   * external `data_file`), from the name the image records (relative to
   * the image's folder). The caller keeps the file: the driver only writes
   * and flushes it; committing or closing it is the caller's. Without it,
   * options that need such a file are refused.
   */
  createFile?: (name: string) => Promise<Sink>;
}

/**
 * One option a format takes when it is written (`-o NAME=VALUE` of `create`
 * and `convert`), as `-o help` lists it.
 */
export interface OptionSpec {
  /** The name, as `-o` takes it. */
  readonly name: string;
  /** One line saying what it does. */
  readonly help: string;
  /** The values it takes, when it takes a fixed set. */
  readonly values?: readonly string[];
  /** What it takes in words, when not a fixed set (`a multiple of 512`). */
  readonly accepts?: string;
  /** The value used when it is not given. */
  readonly default?: string;
}

/**
 * One image format: a plain object with what it can do. Drivers know
 * nothing about each other; the registry and combinators do the rest.
 */
export interface Driver {
  /** Short name, as `-f`/`-O` take it (`raw`, `qcow`, `dmg`). */
  readonly name: string;
  /** One line for `formats`. */
  readonly description: string;
  /**
   * 0: not this format; higher: more certain. Raw scores 1. A driver
   * scores its signature alone (a magic, a trailer, a descriptor's text),
   * not the validity of its header: a file that carries the signature is
   * this format, and `open` names what is wrong with it.
   */
  probe(input: ProbeInput): number;
  /**
   * True for a format only recognised by its signature: `open` always
   * refuses it with an `UnsupportedError` naming the format.
   */
  readonly recognisedOnly?: boolean;
  /** Opens the image. */
  open(source: Source, options: OpenOptions): Promise<Image>;
  /**
   * Creates an empty image of `spec.size` in `sink`, returning it opened
   * writable (for formats written at random).
   */
  create?(sink: Sink, spec: CreateSpec): Promise<Image>;
  /**
   * Writes the whole of `source` as this format in one pass (for formats
   * written sequentially: dmg, cloop, streamOptimized vmdk). `convert`
   * prefers this over `create` when present.
   */
  encode?(source: Source, sink: Sink, options: EncodeOptions): Promise<void>;
  /**
   * The `-o` options `create` and `encode` take. Any other name is refused
   * with an {@linkcode OptionError} before anything is written; a format
   * that writes and leaves this out takes none.
   */
  readonly writeOptions?: readonly OptionSpec[];
  /**
   * True when `create` with a backing file needs it opened
   * (`CreateSpec.backing`): the format links its parent by identity.
   */
  readonly createNeedsBacking?: boolean;
  /** Whether `convert -c` means something for this format. */
  readonly compresses?: boolean;
  /**
   * Changes the virtual size of the image in `file` in place (`resize`),
   * where the format's layout allows. Shrinking drops what lies past the
   * new end: callers decide whether that is wanted.
   */
  resize?(file: Source & Sink, size: number): Promise<void>;
  /**
   * The file sizes an image of this format takes (`measure`), by formula
   * instead of by writing: `required` for `subject` converted to it (for a
   * size: an empty image; left out for an image that only writing can
   * measure), `fullyAllocated` when every byte holds data; `bitmaps`
   * where qemu-img reports it. It checks its options itself.
   */
  measure?(
    subject: Source | number,
    options?: Record<string, string>,
  ): Promise<{ required?: number; fullyAllocated: number; bitmaps?: number }>;
  /**
   * Records `name` as the backing file in the header of the image in
   * `file`, or removes it (`undefined`); nothing else changes (`rebase -u`).
   * `backing`, when given, is the new backing file itself, for formats
   * that record who their parent is (a VHD's parent unique id).
   */
  setBackingFile?(
    file: Source & Sink,
    name: string | undefined,
    format?: string,
    backing?: Source,
  ): Promise<void>;
}

/**
 * The allocation map as `map`, `info`, `compare` and `measure` walk it:
 * {@linkcode extentsOf}, but a raw image over a local file is mapped from
 * its file system's data ranges (`SEEK_DATA`; the holes are `zero`), as
 * qemu's file driver reports a raw file: a zero block written out is
 * data, and no byte is read (a raw image's own walk reads every byte to
 * find zero blocks, 0.2-0.9 s for the bench's 1 GiB disk).
 *
 * @param source an image or any source
 * @param offset where to start in its disk
 * @param length how far
 * @returns its runs, in order
 *
 * @example
 * ```ts
 * import { fromBytes, mappedExtents, open } from "../mod.ts";
 * const image = await open(fromBytes(new Uint8Array(4096)));
 * for await (const e of mappedExtents(image, 0, 4096)) {
 *   console.log(e.kind, e.length); // zero 4096 (bytes in memory are read)
 * }
 * ```
 */
export async function* mappedExtents(
  source: Source,
  offset: number,
  length: number,
): AsyncIterable<Extent> {
  const base = (source as Partial<Image>).format === "raw"
    ? windowBase(source)
    : undefined;
  checkRange(source.size, offset, length);
  const ranges = base && length > 0
    ? await (base.source as DataRangeSource).dataRanges?.(
      base.shift + offset,
      length,
    )
    : undefined;
  if (!ranges) {
    yield* extentsOf(source, offset, length);
    return;
  }
  const shift = base!.shift;
  for (const [start, end, data] of piecesOf(offset + shift, length, ranges)) {
    yield {
      offset: start - shift,
      length: end - start,
      kind: data ? "data" : "zero",
    };
  }
}

/**
 * What `source` is a window of, through nested windows
 * ({@linkcode WindowSource}: a bounds-checked view, a raw image over its
 * file), at most 8 deep: the source underneath and where `source` starts
 * in it; `undefined` for a source that is no window.
 *
 * @param source any source
 * @returns the source underneath and the offset of `source` in it
 *
 * @example
 * ```ts
 * import { fromBytes, open, windowBase } from "../mod.ts";
 * const bytes = fromBytes(new Uint8Array(512));
 * const image = await open(bytes, { format: "raw" });
 * console.log(windowBase(image)?.source === bytes); // true
 * ```
 */
export function windowBase(
  source: Source,
): { source: Source; shift: number } | undefined {
  let shift = 0;
  let at = source;
  for (let depth = 0; depth < 8; depth++) {
    const window = (at as Partial<WindowSource>).windowOf;
    if (!window) break;
    shift += window.offset;
    at = window.source;
  }
  return at === source ? undefined : { source: at, shift };
}

/**
 * A source that can say which of its byte ranges hold data (a local file,
 * through `SEEK_DATA`: see `FileHandle.dataRanges`).
 */
export interface DataRangeSource extends Source {
  /**
   * The data ranges `[start, end)` of `[offset, offset + length)`, in
   * order (the rest are holes), or `undefined` where it cannot say.
   */
  dataRanges?(
    offset: number,
    length: number,
  ): Promise<[number, number][] | undefined>;
}

/**
 * `[offset, offset + length)` cut at `ranges` (in order, inside it):
 * pieces `[start, end, inRange]` that cover it whole, each in a range or
 * between ranges.
 *
 * @param offset where the span starts
 * @param length its length
 * @param ranges `[start, end)` ranges within it, in order
 * @returns the pieces, in order
 *
 * @example
 * ```ts
 * import { piecesOf } from "../mod.ts";
 * console.log([...piecesOf(0, 10, [[2, 4]])]);
 * // [[0, 2, false], [2, 4, true], [4, 10, false]]
 * ```
 */
export function* piecesOf(
  offset: number,
  length: number,
  ranges: readonly (readonly [number, number])[],
): Generator<[start: number, end: number, inRange: boolean]> {
  let done = offset;
  for (const [start, end] of ranges) {
    if (start > done) yield [done, start, false];
    yield [start, end, true];
    done = end;
  }
  if (done < offset + length) yield [done, offset + length, false];
}

/**
 * The allocation map of any source: its own `extents` when it has one, or a
 * single `data` run.
 *
 * @example
 * ```ts
 * import { extentsOf, fromBytes } from "../mod.ts";
 * for await (const e of extentsOf(fromBytes(new Uint8Array(1024)), 0, 1024)) {
 *   console.log(e.kind, e.offset, e.length); // data 0 1024
 * }
 * ```
 */
export async function* extentsOf(
  source: Source,
  offset: number,
  length: number,
): AsyncIterable<Extent> {
  checkRange(source.size, offset, length);
  if (length === 0) return;
  if (source.extents) {
    yield* source.extents(offset, length);
  } else {
    yield { offset, length, kind: "data" };
  }
}

/**
 * Reads `into.length` bytes of `source` at `offset` into `into`: through the
 * source's own `readInto` when it has one, else `read` and a copy.
 *
 * @param source what to read
 * @param offset where in the source
 * @param into where the bytes go (all of it is filled)
 *
 * @example
 * ```ts
 * import { fromBytes, readInto } from "../mod.ts";
 * const into = new Uint8Array(2);
 * await readInto(fromBytes(new Uint8Array([1, 2, 3])), 1, into);
 * console.log(into); // Uint8Array(2) [ 2, 3 ]
 * ```
 */
export async function readInto(
  source: Source,
  offset: number,
  into: Uint8Array,
): Promise<void> {
  if (source.readInto) return await source.readInto(offset, into);
  into.set(await source.read(offset, into.length));
}

/**
 * Throws a `RangeError` unless `[offset, offset + length)` lies within
 * `[0, size]`.
 *
 * @example
 * ```ts
 * import { checkRange } from "./types.ts";
 * checkRange(100, 10, 90); // fine
 * ```
 */
export function checkRange(size: number, offset: number, length: number) {
  if (
    !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) ||
    offset < 0 || length < 0 || offset + length > size
  ) {
    throw new RangeError(
      `read of ${length} bytes at ${offset} is outside 0..${size}`,
    );
  }
}

/**
 * The layers of a chain, top first, each one alone (an overlay's `top`).
 *
 * @param image an image, or the overlay of a chain
 * @returns its layers
 *
 * @example
 * ```ts
 * import { fromBytes, layers, open } from "../mod.ts";
 * console.log(layers(await open(fromBytes(new Uint8Array(512)))).length); // 1
 * ```
 */
export function layers(image: Image): Image[] {
  const out: Image[] = [];
  for (let at: Image | undefined = image; at; at = at.backing) {
    out.push((at as Partial<OverlayImage>).top ?? at);
  }
  return out;
}
