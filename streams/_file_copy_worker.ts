/**
 * The second thread of a file copy (`_file_copy.ts`): a worker that takes
 * pieces of the copier's current job from shared memory, as the copier's
 * own thread does, and copies each by `pread` and `pwrite` through a
 * buffer of its own. With two threads one reads while the other writes:
 * the bench vdi's 768 MiB in 137-152 ms of wall against 178-187 ms for one
 * thread (copy alone, load 2-3; 40-80 ms more CPU: the worker's start and
 * the two threads' turns at the output's lock). Whole converts were
 * slower with it (0.32-0.345 against 0.26-0.31 s on a quiet machine), so
 * the copier starts it only when asked (`helperAfter`).
 *
 * It never returns to its event loop: it waits on the control words with
 * `Atomics.wait` and is ended by `terminate()`. Deno-only, like the copier.
 *
 * The control words (an Int32Array over shared memory), by index:
 *
 * | index | name  | meaning                                                   |
 * | ----- | ----- | --------------------------------------------------------- |
 * | 0     | JOB   | bumped by the copier for each job; -1: end                |
 * | 1     | NEXT  | the next piece to claim (`Atomics.add`)                   |
 * | 2     | COUNT | pieces in the job                                         |
 * | 3     | BUSY  | 1 from the job's start until the worker is done with it   |
 * | 4     | READY | 1 once the worker waits for jobs (0: it cannot copy)      |
 * | 5     | ERRNO | the errno of a failed piece (0: none, -1: ended early)    |
 * | 6     | SIDE  | 0 read, 1 write: which side of that piece failed          |
 *
 * The pieces (a Float64Array over shared memory): input offset, length,
 * output offset, three numbers a piece; the failed piece's offset, its
 * length and where the input ended (or -1) go into the last three.
 *
 * @module
 */

import {
  BUFFER_BYTES,
  BUSY,
  CopyFailure,
  COUNT,
  ERRNO,
  JOB,
  loadLibc,
  mapBuffer,
  NEXT,
  readWrite,
  READY,
  SIDE,
} from "./_file_copy.ts";

interface Start {
  control: SharedArrayBuffer;
  pieces: SharedArrayBuffer;
  fdIn: number;
  fdOut: number;
}

/** Copies the pieces of each job it claims until the copier ends it. */
function serve({ control, pieces, fdIn, fdOut }: Start) {
  const ctl = new Int32Array(control);
  const list = new Float64Array(pieces);
  const c = loadLibc();
  const buffer = c && mapBuffer(c, BUFFER_BYTES);
  if (!c || !buffer) return; // READY stays 0: the copier copies alone
  Atomics.store(ctl, READY, 1);
  Atomics.notify(ctl, READY);
  let seen = 0;
  for (;;) {
    Atomics.wait(ctl, JOB, seen);
    seen = Atomics.load(ctl, JOB);
    if (seen < 0) {
      c.munmap(buffer, BigInt(BUFFER_BYTES));
      return;
    }
    try {
      const count = Atomics.load(ctl, COUNT);
      for (
        let i = Atomics.add(ctl, NEXT, 1);
        i < count;
        i = Atomics.add(ctl, NEXT, 1)
      ) {
        const start = list[3 * i];
        readWrite(
          c,
          fdIn,
          fdOut,
          buffer,
          start,
          start + list[3 * i + 1],
          list[3 * i + 2],
        );
      }
    } catch (e) {
      // The first failure of the job wins; the copier stops claiming.
      const failure = e instanceof CopyFailure
        ? e
        : new CopyFailure("write", 0, 0, String(e));
      if (Atomics.compareExchange(ctl, ERRNO, 0, failure.errno || -1) === 0) {
        Atomics.store(ctl, SIDE, failure.side === "read" ? 0 : 1);
        const at = list.length - 3;
        list[at] = failure.offset;
        list[at + 1] = failure.length;
        list[at + 2] = failure.endedAt ?? -1;
      }
      Atomics.store(ctl, NEXT, 1 << 30);
    } finally {
      Atomics.store(ctl, BUSY, 0);
      Atomics.notify(ctl, BUSY);
    }
  }
}

// deno-lint-ignore no-explicit-any
const scope = globalThis as any;
if (typeof scope.WorkerGlobalScope === "function") {
  scope.onmessage = (event: MessageEvent<Start>) => {
    scope.onmessage = null;
    serve(event.data);
  };
}
