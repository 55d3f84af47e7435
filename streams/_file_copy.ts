/**
 * File-to-file copies in the kernel, for the file adapter (`file.ts`): the
 * data ranges of a sparse file found with `lseek(SEEK_DATA / SEEK_HOLE)`
 * and copied with `copy_file_range`, through libc by Deno's FFI; a copy
 * that is not 4 KiB-aligned (a vdi's or a VHD's blocks) goes through
 * `pread`/`pwrite` on several of Deno's blocking threads at once, as
 * qemu-img copies ({@linkcode LANES}). Holes are skipped, so they stay
 * holes in an output sized beforehand; no byte is handled by JavaScript.
 *
 * Deno-only, and only on Linux with the FFI permission granted (the
 * permission is queried, never prompted for). Anywhere else, and on any
 * error before a byte is copied (ENOSYS, EXDEV, EINVAL, an fd that cannot
 * be found), {@linkcode kernelCopier} answers `undefined` and the caller
 * copies the ordinary way.
 *
 * `cp --sparse=always` and `qemu-img convert` find holes the same way;
 * `deno task bench raw` measured this path against them.
 *
 * @module
 */

const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const ENXIO = 6;
const F_DUPFD_CLOEXEC = 1030;
/** errno values after which the kernel copy is given up for the ordinary path. */
const UNSUPPORTED = new Set([
  1, // EPERM
  9, // EBADF
  18, // EXDEV
  22, // EINVAL
  38, // ENOSYS
  95, // EOPNOTSUPP
]);

const symbols = {
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  copy_file_range: {
    parameters: ["i32", "buffer", "i32", "buffer", "usize", "u32"],
    result: "isize",
  },
  __errno_location: { parameters: [], result: "pointer" },
  // The lanes' reads and writes, on Deno's blocking-task threads; the same
  // calls on this thread to learn the errno of one that failed there.
  preadOnThread: {
    name: "pread64",
    parameters: ["i32", "buffer", "usize", "i64"],
    result: "isize",
    nonblocking: true,
  },
  pwriteOnThread: {
    name: "pwrite64",
    parameters: ["i32", "buffer", "usize", "i64"],
    result: "isize",
    nonblocking: true,
  },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  pread64: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  pwrite64: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
} as const;

type Libc = Deno.DynamicLibrary<typeof symbols>["symbols"];

let libc: Libc | null | undefined;

/** libc's functions, or null where they cannot be had (no FFI permission, not Linux). */
function loadLibc(): Libc | null {
  if (libc !== undefined) return libc;
  libc = null;
  try {
    if (Deno.build.os !== "linux") return null;
    if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") {
      return null;
    }
    libc = Deno.dlopen("libc.so.6", symbols).symbols;
  } catch { /* no libc by that name, or FFI refused */ }
  return libc;
}

/**
 * Copies whose input and output offsets are not both on a 4 KiB boundary
 * (a vdi's or a dynamic VHD's blocks start 512 bytes past one) go through
 * {@linkcode LANES} buffers of {@linkcode LANE_BYTES}: each lane reads a
 * piece and writes it, on Deno's blocking threads, so that one lane's read
 * runs while another's write holds the output (the kernel writes a file
 * one writer at a time). `copy_file_range` does the whole copy under the
 * output's lock, on one thread: measured on the 1 GiB bench vdi (768 MiB of
 * blocks, load 12-15 on the 2 cores, 7 runs each, alternating), best wall
 * 0.80 s for one thread of copy_file_range, 0.51 s for 4 lanes of 512 KiB,
 * 0.45 s for qemu-img, which reads and writes the same way on its own
 * threads; CPU 0.41, 0.48 and 0.40 s. Lanes of 1 or 2 MiB spent up to
 * 2.2 s of system CPU in some runs (large page-cache folios for large
 * writes, we think), 256 and 512 KiB never did. An aligned copy keeps
 * copy_file_range: file systems that share blocks (btrfs, XFS) then copy
 * nothing.
 */
const LANES = 4;
/** Bytes each lane reads and writes at a time: see {@linkcode LANES}. */
const LANE_BYTES = 512 * 1024;

/** A thrown errno from a libc call. */
class Errno extends Error {
  /** Bytes copied before it, where lanes copied (see `inLanes`). */
  copied = 0;
  constructor(readonly call: string, readonly errno: number) {
    super(`${call} failed with errno ${errno}`);
    this.name = "Errno";
  }
}

function errno(c: Libc): number {
  const p = c.__errno_location();
  return p ? new Deno.UnsafePointerView(p).getInt32() : 0;
}

/**
 * The descriptor number of an open file in this process: the entry of
 * /proc/self/fd that is the same file (device and inode) and open for
 * `access` (read, or read and write). Deno does not hand out descriptors.
 */
export function descriptorOf(
  stat: Deno.FileInfo,
  access: "read" | "write",
): number | undefined {
  if (stat.dev === null || stat.ino === null) return undefined;
  try {
    for (const entry of Deno.readDirSync("/proc/self/fd")) {
      const fd = Number(entry.name);
      if (!(fd > 2)) continue;
      let s: Deno.FileInfo;
      try {
        s = Deno.statSync(`/proc/self/fd/${fd}`);
      } catch {
        continue; // closed meanwhile, or the listing's own descriptor
      }
      if (s.dev !== stat.dev || s.ino !== stat.ino || !s.isFile) continue;
      const info = Deno.readTextFileSync(`/proc/self/fdinfo/${fd}`);
      const flags = parseInt(/^flags:\s*([0-7]+)/m.exec(info)?.[1] ?? "", 8);
      const mode = flags & 3; // O_ACCMODE: 0 read, 1 write, 2 both
      if (access === "read" ? mode === 0 || mode === 2 : mode === 2) return fd;
    }
  } catch { /* no /proc, or no permission to read it */ }
  return undefined;
}

/**
 * The data ranges `[start, end)` of the file `fd` within
 * `[offset, offset + length)`, as the file system reports them
 * (`SEEK_DATA` / `SEEK_HOLE`); everything else is a hole.
 */
export function* dataRanges(
  c: Libc,
  fd: number,
  offset: number,
  length: number,
  found?: [number, number],
): Generator<[number, number]> {
  const end = offset + length;
  let at = offset;
  while (at < end) {
    const data = Number(c.lseek(fd, BigInt(at), SEEK_DATA));
    if (data < 0) {
      const e = errno(c);
      if (e === ENXIO) return; // no data past `at`: a hole to the end
      throw new Errno("lseek(SEEK_DATA)", e);
    }
    if (data >= end) return;
    const hole = Number(c.lseek(fd, BigInt(data), SEEK_HOLE));
    if (hole < 0) throw new Errno("lseek(SEEK_HOLE)", errno(c));
    if (found) [found[0], found[1]] = [data, hole];
    const stop = Math.min(hole, end);
    yield [data, stop];
    at = stop;
  }
}

/** Copies by the kernel: what {@linkcode kernelCopier} returns. */
export interface KernelCopier {
  /**
   * Copies the data ranges of `[from, from + length)` of the input to the
   * same-sized range at `to` in the output and leaves its holes alone.
   * Returns the data bytes copied, or `undefined` when the kernel would
   * not copy before any byte was (the caller copies instead); an error
   * after part was copied is thrown.
   */
  copy(
    from: number,
    length: number,
    to: number,
  ): number | undefined | Promise<number | undefined>;
  /** Closes the copier's descriptors once its copies are done; later copies answer `undefined`. */
  close(): Promise<void>;
}

/**
 * A kernel copier from the file `input` to the file `output` (both open,
 * identified by their fstat), or `undefined` where there is none (no FFI
 * permission, not Linux, no descriptor found).
 */
export function kernelCopier(
  input: Deno.FileInfo,
  output: Deno.FileInfo,
): KernelCopier | undefined {
  const c = loadLibc();
  if (!c || !input.isFile || !output.isFile) return undefined;
  // Our own descriptors for the two files (F_DUPFD_CLOEXEC of the ones
  // Deno holds, found by number): nobody else closes them, so no later
  // copy can reach another file that took a closed handle's number, even
  // while the lanes' reads and writes are in flight.
  const found = [
    descriptorOf(input, "read"),
    descriptorOf(output, "write"),
  ].map((fd) => fd === undefined ? -1 : c.fcntl(fd, F_DUPFD_CLOEXEC, 3));
  const [fdIn, fdOut] = found;
  if (fdIn < 0 || fdOut < 0) {
    for (const fd of found) if (fd >= 0) c.close(fd);
    return undefined;
  }
  const offIn = new BigInt64Array(1);
  const offOut = new BigInt64Array(1);
  let working = true;
  // The last data range the file system reported, whole ([data, hole)): a
  // copy inside it needs no lseek. A dynamic VHD asks for one copy per
  // 2 MiB block, each within the same data range of its file; two lseeks
  // per block were half the system calls of its convert. (The input is
  // open read-only; if someone else changes it meanwhile, no copy of it is
  // right anyway.)
  const known: [number, number] = [0, 0];
  let buffers: Uint8Array[] | undefined;
  let lanesFree: Promise<unknown> = Promise.resolve();
  /**
   * Copies `ranges` of the input to `shift` bytes further on in the output
   * through the lanes ({@linkcode LANES}); resolves to the bytes copied
   * once every lane has stopped. An error is an {@linkcode Errno} that
   * says how much was copied before it, or an Error.
   */
  const inLanes = async (
    ranges: [number, number][],
    shift: number,
  ): Promise<number> => {
    buffers ??= Array.from({ length: LANES }, () => pageAligned(LANE_BYTES));
    let copied = 0;
    let failed = false;
    let range = 0;
    let written: Promise<unknown> = Promise.resolve();
    let next = ranges[0]?.[0] ?? 0;
    /** One lane: takes the next piece, reads it, writes it, until none is left. */
    const lane = async (buffer: Uint8Array) => {
      while (!failed && range < ranges.length) {
        const at = next;
        const bytes = buffer.subarray(
          0,
          Math.min(buffer.length, ranges[range][1] - at),
        );
        next += bytes.length;
        if (next === ranges[range][1]) next = ranges[++range]?.[0] ?? 0;
        await onThread("pread", fdIn, bytes, at);
        // One write at a time: writers of one file wait for each other in
        // the kernel, spinning on its lock while the holder runs.
        const write = written.then(() =>
          onThread("pwrite", fdOut, bytes, at + shift)
        );
        written = write.catch(() => {});
        await write;
        copied += bytes.length;
      }
    };
    const done = await Promise.allSettled(
      buffers.map((b) =>
        lane(b).catch((e) => {
          failed = true;
          throw e;
        })
      ),
    );
    for (const r of done) {
      if (r.status === "rejected") {
        if (r.reason instanceof Errno) r.reason.copied = copied;
        throw r.reason;
      }
    }
    return copied;
  };
  /** All of `bytes` read from or written to `fd` at `offset`, off this thread. */
  const onThread = async (
    call: "pread" | "pwrite",
    fd: number,
    bytes: Uint8Array,
    offset: number,
  ) => {
    for (let done = 0; done < bytes.length;) {
      const part = bytes.subarray(done);
      const size = BigInt(part.length);
      const at = BigInt(offset + done);
      let n = Number(
        call === "pread"
          ? await c.preadOnThread(fd, part, size, at)
          : await c.pwriteOnThread(fd, part, size, at),
      );
      if (n < 0) {
        // errno lives on the thread that failed: ask again from this one.
        n = Number(
          call === "pread"
            ? c.pread64(fd, part, size, at)
            : c.pwrite64(fd, part, size, at),
        );
        if (n < 0) throw new Errno(call, errno(c));
      }
      if (n === 0) {
        throw new Error(`${call}: ended ${bytes.length - done} bytes early`);
      }
      done += n;
    }
  };
  return {
    copy(from, length, to) {
      if (!working) return undefined;
      let copied = 0;
      try {
        const ranges: Iterable<[number, number]> =
          from >= known[0] && from + length <= known[1]
            ? [[from, from + length]]
            : dataRanges(c, fdIn, from, length, known);
        if (from % 4096 !== 0 || to % 4096 !== 0) {
          // One copy in the lanes at a time (they share the buffers).
          const copy = lanesFree.then(() => inLanes([...ranges], to - from));
          lanesFree = copy.catch(() => {});
          return copy.catch((e) => {
            if (
              e instanceof Errno && e.copied === 0 && UNSUPPORTED.has(e.errno)
            ) {
              working = false;
              return undefined;
            }
            throw e;
          });
        }
        for (const [start, end] of ranges) {
          offIn[0] = BigInt(start);
          offOut[0] = BigInt(to + start - from);
          let left = end - start;
          while (left > 0) {
            const n = Number(
              c.copy_file_range(fdIn, offIn, fdOut, offOut, BigInt(left), 0),
            );
            if (n < 0) throw new Errno("copy_file_range", errno(c));
            if (n === 0) {
              throw new Error(
                `copy_file_range: input ended ${left} bytes early`,
              );
            }
            left -= n;
            copied += n;
          }
        }
      } catch (e) {
        if (copied === 0 && e instanceof Errno && UNSUPPORTED.has(e.errno)) {
          working = false;
          return undefined;
        }
        throw e;
      }
      return copied;
    },
    async close() {
      working = false;
      await lanesFree;
      c.close(fdIn);
      c.close(fdOut);
    },
  };
}

/**
 * The data ranges of a whole open file as the file system reports them, or
 * `undefined` without FFI (for tests and tools comparing sparse files).
 */
export function fileDataRanges(
  file: Deno.FsFile,
): [number, number][] | undefined {
  const c = loadLibc();
  const stat = file.statSync();
  const fd = c ? descriptorOf(stat, "read") : undefined;
  if (!c || fd === undefined) return undefined;
  return [...dataRanges(c, fd, 0, stat.size)];
}

/**
 * A zero-filled buffer that starts on a memory page (a WebAssembly memory,
 * which engines map in whole pages), for the lanes' reads and writes.
 */
function pageAligned(size: number): Uint8Array {
  const memory = new WebAssembly.Memory({ initial: Math.ceil(size / 65536) });
  return new Uint8Array(memory.buffer, 0, size);
}
