/**
 * The second thread of a file copy (`_file_copy.ts`), and the reads and
 * writes both threads copy with. The worker takes pieces of the copier's
 * current job from shared memory, as the copier's own thread does, and
 * copies each by `pread` and `pwrite` through a buffer of its own: with
 * two threads one reads while the other writes, as `qemu-img convert`
 * does (a C copy of the bench's 768 MiB of data: 0.20-0.23 s on one
 * thread, 0.12-0.13 s on two).
 *
 * This module imports nothing, so the worker loads only it (the copier
 * imports it for {@linkcode readWrite} and {@linkcode CopyFailure}): it
 * answers 1-2 ms after `new Worker` returns, where the worker that
 * imported the copier's 1000 lines took 3-6 ms. Its code runs only in a
 * worker started under {@linkcode WORKER_NAME}, never in another worker
 * that imports the toolkit.
 *
 * The worker never returns to its event loop while it serves: it waits
 * on the control words with `Atomics.wait`, and when NEXT says the end,
 * it unmaps its buffer and closes itself. Deno-only.
 *
 * The control words (an Int32Array over shared memory), by index:
 *
 * | index | name   | meaning                                                    |
 * | ----- | ------ | ---------------------------------------------------------- |
 * | 0     | NEXT   | the job's number (high bits) and its next piece (low bits); -1: end |
 * | 1     | ACTIVE | threads between a claim and the end of its piece           |
 * | 2     | READY  | 1 once the worker waits for jobs (0: it cannot copy)       |
 * | 3     | ERRNO  | the errno of a failed piece (0: none, -1: no errno)        |
 * | 4     | SIDE   | 0 read, 1 write: which side of that piece failed           |
 * | 5     | FD_IN  | the job's input descriptor                                 |
 * | 6     | FD_OUT | the job's output descriptor                                |
 * | 7     | SAID   | bytes of the worker's message (UTF-8) after the words      |
 *
 * After the words, `MESSAGE_BYTES` hold the message of the worker's
 * failure (the system's words for its errno, or what went wrong
 * otherwise), so that the copier's error says what the worker's said.
 *
 * The job (a Float64Array over shared memory): its count of pieces; the
 * worker's failed piece's index, the offset of the failure, its length
 * and where the input ended (or -1); from index `JOB_HEADER` on, three numbers a
 * piece: input start, input end, output offset. A job's numbers are
 * written before NEXT names it, so a thread that claims a piece of it by
 * compare-and-swap on NEXT (the job's number checked with the piece)
 * reads that job's numbers.
 *
 * @module
 */

/**
 * Bytes of the copy buffer: what one `pread` and one `pwrite` move at
 * most. 256 KiB measured best (see `_file_copy.ts`).
 */
export const BUFFER_BYTES = 256 << 10;
/** The name the copier starts the worker under (the module serves only there). */
export const WORKER_NAME = "vdisk file copy";
/** Indexes of the control words (see the module doc). */
export const NEXT = 0,
  ACTIVE = 1,
  READY = 2,
  ERRNO = 3,
  SIDE = 4,
  FD_IN = 5,
  FD_OUT = 6,
  SAID = 7;
/** Control words in all. */
export const CONTROL_WORDS = 8;
/** Bytes for the message of the worker's failure, after the control words. */
export const MESSAGE_BYTES = 512;
/** Numbers of the job before its pieces (see the module doc). */
export const JOB_HEADER = 8;
/** Pieces a job holds at most. */
export const JOB_PIECES = 1024;
/** Bits of NEXT that count pieces: a job has fewer than this many. */
const PIECE_BITS = 12;
/** NEXT at this piece stops all claims of its job (> `JOB_PIECES`). */
export const MAX_PIECES = (1 << PIECE_BITS) - 1;
/** Job numbers wrap within the 19 bits above the pieces. */
const JOB_MASK = (1 << (31 - PIECE_BITS)) - 1;

/** NEXT for piece `piece` of job `job`. */
export function nextWord(job: number, piece: number): number {
  return ((job & JOB_MASK) << PIECE_BITS) | piece;
}

/**
 * Claims the next piece of job `job` of `count` pieces: its index, or -1
 * when none is left (or another job began, or the copy stopped).
 */
export function claim(ctl: Int32Array, job: number, count: number): number {
  const mine = job & JOB_MASK;
  for (;;) {
    const word = Atomics.load(ctl, NEXT);
    const piece = word & MAX_PIECES;
    if (word < 0 || word >>> PIECE_BITS !== mine || piece >= count) return -1;
    if (Atomics.compareExchange(ctl, NEXT, word, word + 1) === word) {
      return piece;
    }
  }
}

/** The libc functions a copy by reads and writes calls. */
export const copySymbols = {
  pread: { parameters: ["i32", "pointer", "usize", "i64"], result: "isize" },
  pwrite: { parameters: ["i32", "pointer", "usize", "i64"], result: "isize" },
  mmap: {
    parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"],
    result: "pointer",
  },
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  strerror: { parameters: ["i32"], result: "pointer" },
  __errno_location: { parameters: [], result: "pointer" },
} as const;

/** Those functions, as `Deno.dlopen` gives them. */
export type CopyLibc = Deno.DynamicLibrary<typeof copySymbols>["symbols"];

const EINTR = 4;
const EAGAIN = 11;
const PROT_READ_WRITE = 3;
const MAP_PRIVATE_ANONYMOUS = 0x22;

/**
 * A copy that failed after it began: which side (`read`: the input,
 * `write`: the output), at which offset of that file, for how many bytes,
 * and why (the system's words for `errno`, or that the input ended early).
 * The file adapter turns it into a `ReadError` or `WriteError` naming the file.
 */
export class CopyFailure extends Error {
  /**
   * @param side which file failed
   * @param offset where in that file
   * @param length bytes the failed call moved at most
   * @param message why
   * @param errno the system's error number, when there is one
   * @param endedAt where the input ended, for a short read
   */
  constructor(
    readonly side: "read" | "write",
    readonly offset: number,
    readonly length: number,
    message: string,
    readonly errno?: number,
    readonly endedAt?: number,
  ) {
    super(message);
    this.name = "CopyFailure";
  }
}

/** The errno of the last failed call of this thread. */
export function errno(c: CopyLibc): number {
  const p = c.__errno_location();
  return p ? new Deno.UnsafePointerView(p).getInt32() : 0;
}

/** The system's message for `e` and its number: "No space left on device (errno 28)". */
function describe(c: CopyLibc, e: number): string {
  const p = c.strerror(e);
  const text = p ? new Deno.UnsafePointerView(p).getCString() : "";
  return `${text || "error"} (errno ${e})`;
}

/** Calls answered EINTR or EAGAIN that are made again at once (see {@linkcode stalled}). */
const RETRIES_AT_ONCE = 16;
/** The longest wait, in ms, before a call that answered EAGAIN again is made again. */
const RETRY_WAIT_MAX_MS = 64;
/**
 * Calls of one copy loop in a row that answered EINTR or EAGAIN, after
 * which the loop fails: 16 at once, then waits of 1, 2, 4 ... 64 ms, about
 * 5 s of waiting in all.
 */
export const RETRIES = 100;
/** What `Atomics.wait` sleeps on between retries (never notified). */
const pause = new Int32Array(new SharedArrayBuffer(4));

/**
 * Why a call of a copy loop that answered `n` (no bytes moved: `n <= 0`)
 * did so: its errno, 0 for an answer of 0 (the input's end, or an output
 * that took nothing), or `undefined` when the call is to be made again
 * (EINTR, EAGAIN). `tries` counts the calls of the loop before this one
 * that answered `undefined` since the last that moved bytes: the first
 * `RETRIES_AT_ONCE` are made again at once, later ones after a wait that
 * doubles up to `RETRY_WAIT_MAX_MS`, and after `RETRIES` the errno is
 * answered (a file system that answers EAGAIN forever, a FUSE or network
 * one, fails the copy in about 5 s rather than spin). Every copy loop
 * (reads and writes on either thread, copy_file_range, splice) asks this
 * one function, so all retry alike.
 */
export function stalled(
  c: CopyLibc,
  n: number,
  tries: number,
): number | undefined {
  if (n === 0) return 0;
  const e = errno(c);
  if ((e !== EINTR && e !== EAGAIN) || tries >= RETRIES) return e;
  if (tries >= RETRIES_AT_ONCE) {
    const ms = Math.min(2 ** (tries - RETRIES_AT_ONCE), RETRY_WAIT_MAX_MS);
    Atomics.wait(pause, 0, 0, ms);
  }
  return undefined;
}

/**
 * The {@linkcode CopyFailure} of `side` for a call that moved no bytes
 * for `e` (see {@linkcode stalled}): the system's words for an errno; for
 * 0, that the input ended at `position` (read) or that the output took no
 * bytes (write).
 */
export function copyFailure(
  c: CopyLibc,
  side: "read" | "write",
  e: number,
  offset: number,
  length: number,
  position = offset,
): CopyFailure {
  if (e !== 0) {
    // Only given up on after `RETRIES` in a row (see stalled).
    const retried = e === EINTR || e === EAGAIN
      ? `, ${RETRIES} times in a row in about 5 s`
      : "";
    return new CopyFailure(side, offset, length, describe(c, e) + retried, e);
  }
  return side === "read"
    ? new CopyFailure(
      "read",
      offset,
      length,
      `the file ended at ${position}`,
      undefined,
      position,
    )
    : new CopyFailure("write", offset, length, "the file took no bytes");
}

/**
 * Copies `[start, end)` of `fdIn` to `at` in `fdOut` by `pread` and
 * `pwrite` through `buffer` (`BUFFER_BYTES` of memory outside the heap);
 * answers the bytes copied. Throws a {@linkcode CopyFailure} for an
 * error or an input that ends early.
 */
export function readWrite(
  c: CopyLibc,
  fdIn: number,
  fdOut: number,
  buffer: Deno.PointerObject,
  start: number,
  end: number,
  at: number,
): number {
  for (let pos = start; pos < end;) {
    const piece = Math.min(BUFFER_BYTES, end - pos);
    const to = at + pos - start;
    for (let got = 0, tries = 0; got < piece;) {
      const n = Number(c.pread(
        fdIn,
        Deno.UnsafePointer.offset(buffer, got),
        BigInt(piece - got),
        BigInt(pos + got),
      ));
      if (n > 0) {
        got += n;
        tries = 0;
        continue;
      }
      const e = stalled(c, n, tries++);
      if (e !== undefined) {
        throw copyFailure(c, "read", e, pos, piece, pos + got);
      }
    }
    for (let put = 0, tries = 0; put < piece;) {
      const n = Number(c.pwrite(
        fdOut,
        Deno.UnsafePointer.offset(buffer, put),
        BigInt(piece - put),
        BigInt(to + put),
      ));
      if (n > 0) {
        put += n;
        tries = 0;
        continue;
      }
      const e = stalled(c, n, tries++);
      if (e !== undefined) throw copyFailure(c, "write", e, to, piece);
    }
    pos += piece;
  }
  return end - start;
}

/** `size` bytes of page-aligned memory outside the heap, or null. */
export function mapBuffer(
  c: CopyLibc,
  size: number,
): Deno.PointerObject | null {
  const p = c.mmap(
    null,
    BigInt(size),
    PROT_READ_WRITE,
    MAP_PRIVATE_ANONYMOUS,
    -1,
    0n,
  );
  // MAP_FAILED is (void *)-1.
  return p && Deno.UnsafePointer.value(p) !== 0xffffffffffffffffn ? p : null;
}

/**
 * Where piece `piece` of a job lies: `[start, end)` of the input, and
 * where it goes in the output.
 */
export function pieceOf(
  job: Float64Array,
  piece: number,
): [number, number, number] {
  const at = JOB_HEADER + 3 * piece;
  return [job[at], job[at + 1], job[at + 2]];
}

/** Copies the pieces it claims, job after job, until the copier ends it. */
function serve(control: SharedArrayBuffer, numbers: SharedArrayBuffer) {
  const ctl = new Int32Array(control);
  const job = new Float64Array(numbers);
  let c: CopyLibc;
  try {
    c = Deno.dlopen("libc.so.6", copySymbols).symbols;
  } catch {
    return; // READY stays 0: the copier copies alone
  }
  const buffer = mapBuffer(c, BUFFER_BYTES);
  if (!buffer) return;
  Atomics.store(ctl, READY, 1);
  for (;;) {
    const word = Atomics.load(ctl, NEXT);
    if (word < 0) break; // ended
    // Counted active before the claim: the copier, once out of pieces,
    // waits for ACTIVE to be 0, and so for this piece.
    Atomics.add(ctl, ACTIVE, 1);
    const number = word >>> PIECE_BITS;
    const count = job[0];
    const fdIn = Atomics.load(ctl, FD_IN);
    const fdOut = Atomics.load(ctl, FD_OUT);
    let claimed = -1;
    try {
      for (let i = claim(ctl, number, count); i >= 0;) {
        claimed = i;
        const [start, end, at] = pieceOf(job, i);
        readWrite(c, fdIn, fdOut, buffer, start, end, at);
        i = claim(ctl, number, count);
      }
    } catch (e) {
      // Nobody claims more of the job; the copier reports the failure.
      // An error of another kind (a bug, a libc call that threw) is the
      // piece's output range's, with what it said.
      let failure: CopyFailure;
      if (e instanceof CopyFailure) failure = e;
      else {
        const [start, end, at] = claimed >= 0
          ? pieceOf(job, claimed)
          : [0, 0, 0];
        failure = new CopyFailure(
          "write",
          at,
          end - start,
          `the copy worker failed: ${e instanceof Error ? e.message : e}`,
        );
      }
      const { written } = new TextEncoder().encodeInto(
        failure.message,
        new Uint8Array(control, CONTROL_WORDS * 4, MESSAGE_BYTES),
      );
      Atomics.store(ctl, SAID, written);
      job[1] = claimed;
      job[2] = failure.offset;
      job[3] = failure.length;
      job[4] = failure.endedAt ?? -1;
      Atomics.store(ctl, SIDE, failure.side === "read" ? 0 : 1);
      Atomics.store(ctl, ERRNO, failure.errno || -1);
      Atomics.store(ctl, NEXT, nextWord(number, MAX_PIECES));
    }
    Atomics.sub(ctl, ACTIVE, 1);
    Atomics.notify(ctl, ACTIVE);
    // Nothing claimed: this job is done (or its words were read while
    // the next was being written): wait for NEXT to change.
    if (claimed < 0) Atomics.wait(ctl, NEXT, word);
  }
  c.munmap(buffer, BigInt(BUFFER_BYTES));
  // deno-lint-ignore no-explicit-any
  (globalThis as any).close();
}

// Only in the worker the copier starts: a worker of someone else's that
// imports the toolkit keeps its own message handler.
// deno-lint-ignore no-explicit-any
const scope = globalThis as any;
if (
  typeof scope.WorkerGlobalScope === "function" && scope.name === WORKER_NAME
) {
  scope.onmessage = (
    event: MessageEvent<[SharedArrayBuffer, SharedArrayBuffer]>,
  ) => {
    scope.onmessage = null;
    serve(...event.data);
  };
}
