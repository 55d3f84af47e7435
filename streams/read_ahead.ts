/**
 * Read-ahead over a slow source: reads that run in order are served from
 * large windows fetched one ahead of them, so a Blob or a URL is read in a
 * few big pieces instead of one small piece per read.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { checkRange, readInto, type Source } from "./types.ts";

/** Options for {@linkcode readAhead}. */
export interface ReadAheadOptions {
  /**
   * The most bytes fetched at once when reads run in order: a run of
   * windows starts at four times its first read (at least 64 KiB) and
   * doubles up to this (the last window of the source is shorter). Reads
   * this long or longer go to the source as they are. @default 8 MiB
   */
  window?: number;
  /**
   * The most windows held at once per run of reads in order (the ones
   * being read, the one before, and the one fetched ahead of them). Two
   * runs are followed at once, so at most twice this many times `window`
   * bytes are kept. @default 4
   */
  windows?: number;
}

/** A window: `bytes` will hold the source's `[start, end)`. */
interface Window {
  start: number;
  end: number;
  bytes: Promise<Uint8Array>;
  /** The buffer it is read into (sources with `readInto`), reused once dropped if full-size. */
  buffer?: Uint8Array<ArrayBuffer>;
  /**
   * How many of its first bytes are in `buffer` already (sources whose
   * `readInto` tells as the bytes arrive), and the reads waiting for more.
   */
  arrived: number;
  waiting: { need: number; go: () => void }[];
  /** Reads copying out of it now. */
  users: number;
  /** Its read is over (its buffer is written no more). */
  settled: boolean;
  /** No longer held: its buffer is reused once nobody reads it. */
  dropped: boolean;
}

/** Reads in order: its windows, each starting where the one before it ends. */
interface Run {
  windows: Window[];
  /** The size of its next window. */
  next: number;
  /** When it last served a read (for the choice of the run to let go). */
  used: number;
  /**
   * Where its reads in order have got to: the end of the furthest read
   * that started at most {@linkcode GAP} past the one before. Reads
   * further ahead are served from its windows, but fetch none.
   */
  front: number;
}

/** The smallest first window of a run. */
const FIRST_WINDOW = 64 << 10;
/** Runs of reads in order followed at once. */
const RUNS = 2;
/** Reads that went to the source as they were, remembered to find new runs. */
const RECENT = 4;
/**
 * A read starting this far past the end of a run (or of a read it runs
 * on from) still runs on: the gap is fetched with the window (a qcow's
 * compressed clusters with a 4 KiB table between two reads' runs).
 */
const GAP = 64 << 10;

/**
 * Wraps `source` so that reads in increasing order are served from
 * windows fetched ahead of them: each read that starts inside what a run
 * fetched already, or where it ends, is copied out of its windows, and
 * the next window is fetched as soon as the reads in order enter the
 * last one. A run's windows start at four times its first read
 * (at least 64 KiB) and double up to `window` bytes, so that a run of a
 * few small reads (a vmdk's grain tables, one after the other) costs a
 * small request, not a large one. Any other read (a table at the end of
 * the file, a probe) goes to the source as it is and leaves the windows
 * alone; a read that starts inside or at the end of one of the last few
 * such reads and runs on past it begins a new run (reads may overlap: a
 * vmdk's runs of grains end a grain or two past where the next begins).
 * Two runs are followed at once, the one used least recently let go for
 * a new one. A read waits only for the part of a window it needs when
 * the source's `readInto` tells as the bytes arrive (a URL's body: the
 * decode workers start on a window's first bytes while the rest comes).
 * The bytes are those of `source`, copied out of the windows;
 * its errors pass through (a failed window is fetched again by the next
 * read that needs it).
 *
 * In chromium, reading a 117 MiB Blob as 1 MiB slices took 250-460 ms of
 * the reading thread, as 8 MiB slices 140-160 ms and as 16 MiB slices
 * about 100 ms; Range requests to a local server by URL took 650 ms as 1
 * MiB requests, 300-370 ms as 4-16 MiB ones (load 7 on 2 cores). A dmg's
 * or cloop's compressed runs are read in file order, one per 2 MiB of
 * disk that `convert` reads. A streamOptimized vmdk made by qemu-img
 * converted by URL took 52-78 requests with one run followed (its grain
 * tables, read one by one, ended the run of its grains each time), 15
 * with two.
 *
 * @param source what to read (a Blob's or a URL's source, usually)
 * @param options the largest window's size and how many are held
 * @returns a Source with the same bytes, `name` and `close`
 *
 * @example
 * ```ts
 * import { fromBlob, readAhead } from "../mod.ts";
 * const bytes = new Uint8Array(1 << 20).map((_, i) => i % 251);
 * const source = readAhead(fromBlob(new Blob([bytes])), { window: 65536 });
 * const a = await source.read(0, 1000);
 * const b = await source.read(1000, 70000); // runs on into the next window
 * console.log(a[250], b[0] === 1000 % 251); // 250 true
 * ```
 */
export function readAhead(
  source: Source,
  options: ReadAheadOptions = {},
): Source {
  const size = source.size;
  const windowBytes = Math.max(1, options.window ?? 8 << 20);
  const most = Math.max(3, options.windows ?? 4);
  let runs: Run[] = [];
  let tick = 0;
  const recent: { start: number; end: number }[] = [];
  /**
   * Buffers of dropped full-size windows, for the next ones: a fresh 8
   * MiB array per window, faulted in page by page as the body was copied
   * in, was most of chromium's time reading by URL.
   */
  const spares: Uint8Array<ArrayBuffer>[] = [];

  /** Reuses `w`'s buffer once it is dropped, read and copied out of. */
  const release = (w: Window) => {
    if (!w.dropped || w.users || !w.settled || !w.buffer) return;
    if (spares.length < 2 && w.buffer.length === windowBytes) {
      spares.push(w.buffer);
    }
    w.buffer = undefined;
  };
  /** Holds `next` (a part of `run`'s windows) and lets go of the others. */
  const hold = (run: Run, next: Window[]) => {
    for (const w of run.windows) {
      if (next.includes(w)) continue;
      w.dropped = true;
      release(w);
    }
    run.windows = next;
  };

  /** Fetches `run`'s next window, from `start` to `until` at least. */
  const fetchWindow = (run: Run, start: number, until = start): Window => {
    const end = Math.min(size, Math.max(start + run.next, until));
    run.next = Math.min(windowBytes, run.next * 2);
    const window: Window = {
      start,
      end,
      bytes: Promise.resolve(new Uint8Array()),
      arrived: 0,
      waiting: [],
      users: 0,
      settled: false,
      dropped: false,
    };
    if (source.readInto) {
      const length = end - start;
      const buffer = length <= windowBytes && spares.length
        ? spares.pop()!
        : new Uint8Array(length);
      const view = buffer.subarray(0, length);
      window.buffer = buffer;
      // Reads wait only for the bytes they need, not for the whole
      // window: its first reads start while the rest is on its way.
      const arrived = (n: number) => {
        window.arrived = n;
        if (!window.waiting.length) return;
        window.waiting = window.waiting.filter((w) => {
          if (w.need > n) return true;
          w.go();
          return false;
        });
      };
      window.bytes = source.readInto(start, view, arrived).then(() => {
        window.arrived = length;
        return view;
      });
    } else {
      window.bytes = source.read(start, end - start);
    }
    window.bytes.then(
      () => {
        window.settled = true;
        window.waiting = [];
        release(window);
      },
      () => {
        window.settled = true;
        window.waiting = [];
        // Fetched again by the next read that needs it (with the ones
        // after it: the windows held stay one run without gaps).
        hold(run, run.windows.filter((w) => w.start < start));
        // A run left without windows is never found again (runAt): it
        // goes, rather than count against RUNS and push out a live one.
        if (!run.windows.length) runs = runs.filter((r) => r !== run);
        release(window);
      },
    );
    run.windows.push(window);
    if (run.windows.length > most) hold(run, run.windows.slice(1));
    return window;
  };

  /** The run whose windows `offset` lies in or at the end of. */
  const runAt = (offset: number) =>
    runs.find((r) =>
      r.windows.length && offset >= r.windows[0].start &&
      offset <= r.windows[r.windows.length - 1].end + GAP
    );

  /**
   * The windows covering `[offset, end)`, fetched if need be, or
   * undefined when the read does not run in order.
   */
  const cover = (offset: number, end: number): Window[] | undefined => {
    let run = runAt(offset);
    if (!run) {
      const runsOn = recent.some((r) =>
        offset >= r.start && offset <= r.end + GAP && end > r.end
      );
      if (!runsOn) return undefined;
      if (runs.length >= RUNS) {
        const oldest = runs.reduce((a, b) => a.used <= b.used ? a : b);
        hold(oldest, []);
        runs = runs.filter((r) => r !== oldest);
      }
      run = { windows: [], next: FIRST_WINDOW, used: 0, front: offset };
      runs.push(run);
    }
    run.used = ++tick;
    const last = run.windows[run.windows.length - 1];
    if (offset > run.front + GAP) {
      // Far ahead of the reads in order (a qcow's tables, read by the
      // allocation map as convert goes): served if fetched already, else
      // sent as it is. Such reads fetching windows fetched window after
      // window, each let go before the clusters' reads came to it: 207 MB
      // fetched for the browser bench's 135 MiB qcow by URL.
      return end <= last.end
        ? run.windows.filter((w) => w.end > offset && w.start < end)
        : undefined;
    }
    run.front = Math.max(run.front, end);
    // Windows of four reads at least: reads longer than the run's first
    // (a vmdk's header, then its runs of grains) must not need more
    // windows than are held.
    run.next = Math.max(run.next, Math.min(windowBytes, 4 * (end - offset)));
    // Windows before this read stay until `most` newer ones are held: a
    // read a little behind (another read in flight) is still served.
    if (!last) fetchWindow(run, offset, end);
    else if (last.end < end) fetchWindow(run, last.end, end);
    const covering = run.windows.filter((w) => w.end > offset && w.start < end);
    // The reads in order have entered the last window: fetch the next one.
    // (From its second half, the decode workers converting the bench's
    // streamOptimized vmdk by URL in chromium waited for the windows,
    // idle 57-69% of the time against 24% from a Blob; 0.87-0.97 s ->
    // 0.74-0.85 s, load 9.)
    const tail = run.windows[run.windows.length - 1];
    if (run.front > tail.start && tail.end < size) fetchWindow(run, tail.end);
    return covering;
  };

  /** Whether `covering` holds every byte of `[offset, end)` (it always does; a gap would leave bytes unread). */
  const tiles = (covering: Window[], offset: number, end: number) => {
    let at = offset;
    for (const w of covering) {
      if (w.start > at) return false;
      at = w.end;
    }
    return at >= end;
  };

  /**
   * `w`'s bytes once its first `need` have arrived (all of them, from a
   * source that does not tell as they arrive); its error if it fails.
   */
  const arrival = (w: Window, need: number): Promise<Uint8Array> => {
    if (!w.buffer || w.settled) return w.bytes;
    const view = w.buffer.subarray(0, w.end - w.start);
    if (w.arrived >= need) return Promise.resolve(view);
    return Promise.race([
      w.bytes,
      new Promise<Uint8Array>((resolve) =>
        w.waiting.push({ need, go: () => resolve(view) })
      ),
    ]);
  };

  async function readIntoAhead(offset: number, into: Uint8Array) {
    checkRange(size, offset, into.length);
    const end = offset + into.length;
    const covering = into.length && into.length < windowBytes
      ? cover(offset, end)
      : undefined;
    if (!covering || !tiles(covering, offset, end)) {
      recent.push({ start: offset, end });
      if (recent.length > RECENT) recent.shift();
      return await readInto(source, offset, into);
    }
    for (const w of covering) w.users++;
    try {
      for (const w of covering) {
        const from = Math.max(offset, w.start);
        const to = Math.min(end, w.end);
        const bytes = await arrival(w, to - w.start);
        into.set(bytes.subarray(from - w.start, to - w.start), from - offset);
      }
    } finally {
      for (const w of covering) {
        w.users--;
        release(w);
      }
    }
  }

  return {
    size,
    name: source.name,
    readInto: readIntoAhead,
    async read(offset: number, length: number) {
      checkRange(size, offset, length);
      const bytes = new Uint8Array(length);
      await readIntoAhead(offset, bytes);
      return bytes;
    },
    close() {
      for (const run of runs) hold(run, []);
      runs = [];
      spares.length = 0;
      return source.close?.() ?? Promise.resolve();
    },
  };
}
