// What the tests that only read images through share: a sink that keeps
// nothing, and the errors a malformed image may end in. Light on purpose
// (no node: imports): the fuzz worker and the limits cases, whose peak
// memory is measured, import it.
import {
  BackingFileError,
  CodecError,
  ImageFormatError,
  KeyError,
  type Sink,
  UnknownFormatError,
} from "../mod.ts";

/** A sink that keeps nothing (for converting or hashing big images). */
export function nullSink(): Sink {
  return {
    write: () => Promise.resolve(),
    resize: () => Promise.resolve(),
    flush: () => Promise.resolve(),
    close: () => Promise.resolve(),
  };
}

/** True for the errors a malformed image may end in; anything else is a defect. */
export function isTypedError(e: unknown): boolean {
  return e instanceof ImageFormatError || e instanceof UnknownFormatError ||
    e instanceof KeyError || e instanceof BackingFileError ||
    e instanceof CodecError;
}
