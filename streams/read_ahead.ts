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
   * Bytes fetched at once when reads run in order (the last window of
   * the source is shorter). Reads this long or longer go to the source
   * as they are. @default 8 MiB
   */
  window?: number;
  /**
   * The most windows held at once (the ones being read and the one fetched
   * ahead of them); at most this many times `window` bytes are kept.
   * @default 3
   */
  windows?: number;
}

/** A window: `bytes` will hold the source's `[start, end)`. */
interface Window {
  start: number;
  end: number;
  bytes: Promise<Uint8Array>;
  /** The reused buffer it is read into (sources with `readInto`). */
  buffer?: Uint8Array<ArrayBuffer>;
  /** Reads copying out of it now. */
  users: number;
  /** Its read is over (its buffer is written no more). */
  settled: boolean;
  /** No longer held: its buffer is reused once nobody reads it. */
  dropped: boolean;
}

/**
 * Wraps `source` so that reads in increasing order, each starting where
 * the one before it ended or inside what was fetched already, are served
 * from windows of `window` bytes, the next one fetched as soon as a read
 * reaches the second half of the last one. Any other read (a table at the
 * end of the file, a probe) goes to the source as it is, and a read that
 * starts where it ended begins a new run of windows. The bytes are those
 * of `source`, copied out of the windows; its errors pass through (a
 * failed window is fetched again by the next read that needs it).
 *
 * In chromium, reading a 117 MiB Blob as 1 MiB slices took 250-460 ms of
 * the reading thread, as 8 MiB slices 140-160 ms and as 16 MiB slices
 * about 100 ms; Range requests to a local server by URL took 650 ms as 1
 * MiB requests, 300-370 ms as 4-16 MiB ones (load 7 on 2 cores). A dmg's
 * or cloop's compressed runs are read in file order, one per 2 MiB of
 * disk that `convert` reads.
 *
 * @param source what to read (a Blob's or a URL's source, usually)
 * @param options the window's size and how many are held
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
  const most = Math.max(2, options.windows ?? 3);
  /** Windows held, in order, each starting where the one before it ends. */
  let windows: Window[] = [];
  /** Where the last read ended (a read starting here runs on in order). */
  let expected = -1;
  /**
   * Buffers of dropped windows, for the next ones: a fresh 8 MiB array per
   * window, faulted in page by page as the body was copied in, was most
   * of chromium's time reading by URL.
   */
  const spares: Uint8Array<ArrayBuffer>[] = [];

  /** Reuses `w`'s buffer once it is dropped, read and copied out of. */
  const release = (w: Window) => {
    if (!w.dropped || w.users || !w.settled || !w.buffer) return;
    if (spares.length < 2) spares.push(w.buffer);
    w.buffer = undefined;
  };
  /** Holds `next` (a part of the windows held) and lets go of the others. */
  const hold = (next: Window[]) => {
    for (const w of windows) {
      if (next.includes(w)) continue;
      w.dropped = true;
      release(w);
    }
    windows = next;
  };

  const fetchWindow = (start: number): Window => {
    const end = Math.min(size, start + windowBytes);
    const window: Window = {
      start,
      end,
      bytes: Promise.resolve(new Uint8Array()),
      users: 0,
      settled: false,
      dropped: false,
    };
    if (source.readInto) {
      const buffer = spares.pop() ?? new Uint8Array(windowBytes);
      const view = buffer.subarray(0, end - start);
      window.buffer = buffer;
      window.bytes = source.readInto(start, view).then(() => view);
    } else {
      window.bytes = source.read(start, end - start);
    }
    window.bytes.then(
      () => {
        window.settled = true;
        release(window);
      },
      () => {
        window.settled = true;
        // Fetched again by the next read that needs it (with the ones
        // after it: the windows held stay one run without gaps).
        hold(windows.filter((w) => w.start < start));
        release(window);
      },
    );
    windows.push(window);
    if (windows.length > most) hold(windows.slice(1));
    return window;
  };

  /**
   * The windows covering `[offset, end)`, fetched if need be, or
   * undefined when the read does not run in order.
   */
  const cover = (offset: number, end: number): Window[] | undefined => {
    const first = windows[0];
    const last = windows[windows.length - 1];
    const inside = first !== undefined && offset >= first.start &&
      offset <= last.end;
    if (!inside) {
      if (offset !== expected) return undefined;
      hold([]);
      fetchWindow(offset);
    }
    // Windows wholly before this read are read by no later one.
    let before = 0;
    while (before < windows.length - 1 && windows[before].end <= offset) {
      before++;
    }
    if (before) hold(windows.slice(before));
    while (windows[windows.length - 1].end < end) {
      fetchWindow(windows[windows.length - 1].end);
    }
    const covering = windows.filter((w) => w.end > offset && w.start < end);
    // Reading the second half of the last window: fetch the next one.
    const tail = windows[windows.length - 1];
    if (end > tail.start + (tail.end - tail.start) / 2 && tail.end < size) {
      fetchWindow(tail.end);
    }
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

  async function readIntoAhead(offset: number, into: Uint8Array) {
    checkRange(size, offset, into.length);
    const end = offset + into.length;
    const covering = into.length && into.length < windowBytes
      ? cover(offset, end)
      : undefined;
    expected = end;
    if (!covering || !tiles(covering, offset, end)) {
      return await readInto(source, offset, into);
    }
    for (const w of covering) w.users++;
    try {
      for (const w of covering) {
        const bytes = await w.bytes;
        const from = Math.max(offset, w.start);
        const to = Math.min(end, w.end);
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
      hold([]);
      spares.length = 0;
      return source.close?.() ?? Promise.resolve();
    },
  };
}
