/**
 * The toolkit's error classes. Every malformed image becomes one
 * {@linkcode ImageFormatError} naming the field, the value found and the
 * limit it broke.
 *
 * This module is browser compatible.
 *
 * @module
 */

/** Facts carried by an {@linkcode ImageFormatError}. */
export interface ImageFormatErrorInit {
  /** The driver (`dmg`, `cloop`, ...). */
  format: string;
  /** The field, as the specification names it (`block_size`, `koly.version`). */
  field?: string;
  /** The value found. */
  value?: unknown;
  /** The limit or expectation it broke, in words (`a multiple of 512`). */
  limit?: string;
  /** Byte offset in the image file where the field lives. */
  offset?: number;
  /** The file name, when known. */
  file?: string;
}

function describe(value: unknown): string {
  if (typeof value === "bigint") return value.toString();
  if (typeof value === "string") return JSON.stringify(value);
  if (value instanceof Uint8Array) {
    return Array.from(
      value.subarray(0, 16),
      (b) => b.toString(16).padStart(2, "0"),
    ).join("");
  }
  return String(value);
}

/**
 * A malformed or unsupported image: the message names the format, the field,
 * the value found and the limit.
 *
 * @example
 * ```ts
 * import { ImageFormatError } from "./errors.ts";
 * const e = new ImageFormatError({
 *   format: "cloop", field: "block_size", value: 513, limit: "a multiple of 512",
 * });
 * console.log(e.message); // cloop: block_size 513 must be a multiple of 512
 * ```
 */
export class ImageFormatError extends Error {
  /** The driver. */
  readonly format: string;
  /** The field, when one is to blame. */
  readonly field?: string;
  /** The value found. */
  readonly value?: unknown;
  /** The limit broken. */
  readonly limit?: string;
  /** File offset of the field. */
  readonly offset?: number;
  /** File name, when known. */
  file?: string;

  /**
   * @param init the facts
   * @param message a message to use instead of the one built from the facts
   */
  constructor(init: ImageFormatErrorInit, message?: string) {
    const where = init.offset === undefined ? "" : ` (at byte ${init.offset})`;
    const text = message ??
      (init.field === undefined
        ? "malformed image"
        : `${init.field} ${describe(init.value)}${
          init.limit === undefined ? " is invalid" : ` must be ${init.limit}`
        }`);
    super(`${init.format}: ${text}${where}`);
    this.name = "ImageFormatError";
    this.format = init.format;
    this.field = init.field;
    this.value = init.value;
    this.limit = init.limit;
    this.offset = init.offset;
    this.file = init.file;
  }
}

/**
 * A write refused because it would turn a raw image whose format was
 * guessed by probing into another format: its first block would then
 * carry `signature`'s signature (QEMU refuses these writes with EPERM).
 * Naming the format (`-f raw`) lifts the restriction.
 *
 * @example
 * ```ts
 * import { ProbedRawWriteError } from "./errors.ts";
 * const e = new ProbedRawWriteError("qcow2", "disk.img");
 * console.log(e.format, e.signature); // raw qcow2
 * ```
 */
export class ProbedRawWriteError extends ImageFormatError {
  /**
   * @param signature the format the first block would probe as
   * @param file the image's name, when known
   */
  constructor(readonly signature: string, file?: string) {
    super(
      { format: "raw", field: "block 0", value: signature, offset: 0, file },
      `refusing to write a ${signature} signature into block 0 of an image whose format was guessed as raw by probing: name the format (-f raw) to allow it`,
    );
    this.name = "ProbedRawWriteError";
  }
}

/** A checksum stored in the image does not match the data. */
export class ChecksumError extends ImageFormatError {
  /**
   * @param init the facts; `field` names what was checked
   * @param expected the stored checksum
   * @param actual the computed checksum
   */
  constructor(
    init: ImageFormatErrorInit,
    readonly expected: number | string,
    readonly actual: number | string,
  ) {
    super(
      init,
      `${
        init.field ?? "checksum"
      } mismatch: stored ${expected}, computed ${actual}`,
    );
    this.name = "ChecksumError";
  }
}

/** A feature the image uses that this toolkit does not handle (yet). */
export class UnsupportedError extends ImageFormatError {
  /**
   * @param init the facts
   * @param message what is unsupported
   */
  constructor(init: ImageFormatErrorInit, message: string) {
    super(init, message);
    this.name = "UnsupportedError";
  }
}

/** No driver recognised the source, or the named format does not exist. */
export class UnknownFormatError extends Error {
  /**
   * @param message what was looked for
   * @param format the format asked for, if any
   */
  constructor(message: string, readonly format?: string) {
    super(message);
    this.name = "UnknownFormatError";
  }
}

/** Facts carried by an {@linkcode OptionError}. */
export interface OptionErrorInit {
  /** The format whose options these are. */
  format: string;
  /** The option's name, as given. */
  option: string;
  /** The value given; absent when the option itself is unknown. */
  value?: string;
  /** What is accepted: the valid values, or for an unknown option the valid names. */
  expected: string;
}

/**
 * A `-o` option (or an `options` entry of `convert`/`create`) that the
 * format does not have, or a value it does not take. Not an image problem:
 * no image was read, so it is not an {@linkcode ImageFormatError}.
 *
 * @example
 * ```ts
 * import { OptionError } from "./errors.ts";
 * const e = new OptionError({
 *   format: "vmdk", option: "subformt", expected: "subformat, adapter_type",
 * });
 * console.log(e.message);
 * // vmdk: unknown option 'subformt' (valid: subformat, adapter_type)
 * ```
 */
export class OptionError extends Error {
  /** The format. */
  readonly format: string;
  /** The option's name. */
  readonly option: string;
  /** The value given (absent for an unknown option). */
  readonly value?: string;
  /** What is accepted. */
  readonly expected: string;

  /**
   * @param init the facts
   * @param message a message to use instead of the one built from the facts
   */
  constructor(init: OptionErrorInit, message?: string) {
    super(
      message ??
        (init.value === undefined
          ? `${init.format}: unknown option '${init.option}' (valid: ${init.expected})`
          : `${init.format}: option ${init.option}=${init.value} is invalid: must be ${init.expected}`),
    );
    this.name = "OptionError";
    this.format = init.format;
    this.option = init.option;
    this.value = init.value;
    this.expected = init.expected;
  }
}

/** An encrypted image needs a key, or the key given is wrong. */
export class KeyError extends Error {
  /**
   * @param message what is missing or wrong, in the API's words
   * @param cliMessage the same in the command line's words (`--key-file`),
   *   when they differ
   */
  constructor(message: string, readonly cliMessage?: string) {
    super(message);
    this.name = "KeyError";
  }
}

/** A backing file was refused by the backing-file policy (outside the allowed folder, a loop, too deep). */
export class BackingFileError extends Error {
  /**
   * @param message why it was refused and how to allow it, in the API's
   *   words (`allowDir`)
   * @param backingFile the name as the image wrote it
   * @param cliMessage the same in the command line's words
   *   (`--allow-backing-dir`), when they differ
   */
  constructor(
    message: string,
    readonly backingFile: string,
    readonly cliMessage?: string,
  ) {
    super(message);
    this.name = "BackingFileError";
  }
}

/** An HTTP source failed: bad status, or the server ignores Range requests. */
export class HttpSourceError extends Error {
  /**
   * @param message what went wrong
   * @param url the URL
   * @param status the HTTP status, when there was a response
   */
  constructor(message: string, readonly url: string, readonly status?: number) {
    super(message);
    this.name = "HttpSourceError";
  }
}

/**
 * An HTTP source's server went silent longer than the idle timeout, or one
 * request took longer than the total timeout.
 *
 * @example
 * ```ts
 * import { HttpTimeoutError } from "./errors.ts";
 * const e = new HttpTimeoutError("http://x/disk.img", "idle", 30000);
 * console.log(e.message);
 * // http://x/disk.img: no byte from the server for 30000 ms (idle timeout)
 * ```
 */
export class HttpTimeoutError extends HttpSourceError {
  /**
   * @param url the URL
   * @param kind `idle` (nothing arrived for `ms`) or `total` (one request took over `ms`)
   * @param ms the timeout, in milliseconds
   */
  constructor(
    url: string,
    readonly kind: "idle" | "total",
    readonly ms: number,
  ) {
    super(
      kind === "idle"
        ? `${url}: no byte from the server for ${ms} ms (idle timeout)`
        : `${url}: one request took over ${ms} ms (total timeout)`,
      url,
    );
    this.name = "HttpTimeoutError";
  }
}

/**
 * Throws an {@linkcode ImageFormatError} unless `ok`. A short form for
 * header validation.
 *
 * @example
 * ```ts
 * import { check } from "./errors.ts";
 * check(512 % 512 === 0, { format: "cloop", field: "block_size", value: 512, limit: "a multiple of 512" });
 * ```
 */
export function check(ok: boolean, init: ImageFormatErrorInit): asserts ok {
  if (!ok) throw new ImageFormatError(init);
}

/**
 * A compressed stream is corrupt, or decodes to more or fewer bytes than
 * declared. Drivers catch it and rethrow an {@linkcode ImageFormatError}
 * naming the chunk or block.
 */
export class CodecError extends Error {
  /**
   * @param codec the codec (`zlib`, `bzip2`, `lzfse`, ...)
   * @param message what is wrong
   */
  constructor(readonly codec: string, message: string) {
    super(`${codec}: ${message}`);
    this.name = "CodecError";
  }
}

/**
 * A tree of files cannot be presented as a disk, or changed under it: a
 * symbolic link leaving the tree, a file that is neither a regular file nor a
 * folder, a file whose size or time changed since the tree was listed.
 *
 * @example
 * ```ts
 * import { TreeError } from "./errors.ts";
 * const e = new TreeError("changed since the tree was listed", "docs/a.txt");
 * console.log(e.message); // docs/a.txt: changed since the tree was listed
 * ```
 */
export class TreeError extends Error {
  /**
   * @param message what is wrong
   * @param path the path within the tree
   */
  constructor(message: string, readonly path: string) {
    super(`${path || "(root)"}: ${message}`);
    this.name = "TreeError";
  }
}

/**
 * A write to an output file failed (the disk is full, the file system
 * refused the offset, the file was closed). Writes that run on Deno's I/O
 * thread report it to their own caller and to every later write and
 * flush of the same file, so that a caller that did not wait for one
 * still learns of it; `cause` is the operating system's error.
 *
 * @example
 * ```ts
 * import { WriteError } from "./errors.ts";
 * const e = new WriteError("out.raw", 4096, 512, new Error("No space left on device"));
 * console.log(e.message);
 * // out.raw: writing 512 bytes at offset 4096 failed: No space left on device
 * ```
 */
export class WriteError extends Error {
  /**
   * @param path the file
   * @param offset where the write began
   * @param length how many bytes it had to write
   * @param cause the underlying error
   */
  constructor(
    readonly path: string,
    readonly offset: number,
    readonly length: number,
    cause: unknown,
  ) {
    super(ioFailure(path, "writing", offset, length, cause), { cause });
    this.name = "WriteError";
  }
}

/** The message of a failed read or write of `length` bytes at `offset`. */
function ioFailure(
  path: string,
  doing: string,
  offset: number,
  length: number,
  cause: unknown,
): string {
  return `${path}: ${doing} ${length} bytes at offset ${offset} failed: ${
    cause instanceof Error ? cause.message : String(cause)
  }`;
}

/**
 * A read of an input file failed or came up short: the file ended before
 * the range an image's tables point at (it was cut off, or shrank while it
 * was copied), or the operating system answered an error (EIO from a
 * failing disk). `cause` is the operating system's error, when there is one.
 *
 * @example
 * ```ts
 * import { ReadError } from "./errors.ts";
 * const e = new ReadError("disk.vdi", 1048576, 262144, new Error("the file ended at 1114112"));
 * console.log(e.message);
 * // disk.vdi: reading 262144 bytes at offset 1048576 failed: the file ended at 1114112
 * ```
 */
export class ReadError extends Error {
  /**
   * @param path the file
   * @param offset where the read began
   * @param length how many bytes it had to read
   * @param cause the underlying error
   */
  constructor(
    readonly path: string,
    readonly offset: number,
    readonly length: number,
    cause: unknown,
  ) {
    super(ioFailure(path, "reading", offset, length, cause), { cause });
    this.name = "ReadError";
  }
}
