/**
 * File-to-file copies in the kernel, for the file adapter (`file.ts`): the
 * data ranges of a sparse file found with `lseek(SEEK_DATA / SEEK_HOLE)`
 * and copied with `copy_file_range`, through libc by Deno's FFI. Holes are
 * skipped, so they stay holes in an output sized beforehand; no byte
 * passes through JavaScript.
 *
 * A range whose input and output offsets differ modulo 4 KiB (a vdi's
 * blocks start 512 bytes into a page of its file, a dynamic VHD's after
 * each block's 512-byte bitmap) goes through a pipe of our own instead,
 * sized to 256 KiB, by two `splice` calls per 256 KiB: `copy_file_range`
 * splices through the kernel's own 64 KiB pipe there, and page-misaligned
 * input cost it 40 % more system CPU than aligned input (0.34 against
 * 0.28 s for the bench's 1 GiB vdi at load 6; 1.2-1.8 against 1.6-3.5 s
 * for a 4 GiB vdi, qemu-img 1.3-2.4 s). Aligned ranges keep
 * `copy_file_range`, which shares blocks on btrfs and XFS and copies on
 * the server over NFS and SMB (where misaligned ranges keep it too);
 * through our pipe they measured the same on ext4 at 1 GiB and up to
 * twice the CPU at 4 GiB once the VM's freed memory had gone back to its
 * host. Reading and writing through a buffer (`pread`/`pwrite`, as
 * qemu-img does) costs 2-5 times the CPU in that state.
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
const F_SETPIPE_SZ = 1031;
const O_CLOEXEC = 0o2000000;
const SPLICE_F_MOVE = 1;
/** Bytes our pipe holds: what one pair of `splice` calls moves at most. */
const PIPE_BYTES = 256 << 10;
/** `f_type` (`statfs(2)`) of file systems that copy on the server: NFS, CIFS, SMB2. */
const OFFLOADING = new Set([0x6969, 0xff534d42, 0xfe534d42]);
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
  splice: {
    parameters: ["i32", "buffer", "i32", "buffer", "usize", "u32"],
    result: "isize",
  },
  pipe2: { parameters: ["buffer", "i32"], result: "i32" },
  fstatfs: { parameters: ["i32", "buffer"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
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

/** A thrown errno from a libc call. */
class Errno extends Error {
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
  copy(from: number, length: number, to: number): number | undefined;
  /**
   * Bytes copied so far by each way: `copy_file_range`, or `splice`
   * through the copier's pipe (ranges misaligned between input and output).
   */
  readonly copied: { copyFileRange: number; splice: number };
  /** Closes the copier's descriptors; later copies answer `undefined`. */
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
  // copy can reach another file that took a closed handle's number (that
  // was a statx of both numbers before each copy, 874 calls for the VHD).
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
  let closed = false;
  const copied = { copyFileRange: 0, splice: 0 };
  // The last data range the file system reported, whole ([data, hole)): a
  // copy inside it needs no lseek. A dynamic VHD asks for one copy per
  // 2 MiB block, each within the same data range of its file; two lseeks
  // per block were half the system calls of its convert. (The input is
  // open read-only; if someone else changes it meanwhile, no copy of it is
  // right anyway.)
  const known: [number, number] = [0, 0];
  // Our pipe for misaligned ranges: made at the first one; null where
  // none can be had or the output's file system copies on the server.
  let pipe: Int32Array | null | undefined = offloads(c, fdOut)
    ? null
    : undefined;
  const dropPipe = () => {
    if (pipe) { for (const fd of pipe) c.close(fd); }
    pipe = null;
  };

  /** `[start, end)` of the input to `at` in the output by copy_file_range. */
  const copyFileRange = (start: number, end: number, at: number) => {
    offIn[0] = BigInt(start);
    offOut[0] = BigInt(at);
    for (let left = end - start; left > 0;) {
      const n = Number(
        c.copy_file_range(fdIn, offIn, fdOut, offOut, BigInt(left), 0),
      );
      if (n < 0) throw new Errno("copy_file_range", errno(c));
      if (n === 0) {
        throw new Error(`copy_file_range: input ended ${left} bytes early`);
      }
      left -= n;
      copied.copyFileRange += n;
    }
  };
  /**
   * `[start, end)` of the input to `at` in the output through our pipe:
   * the input's pages go into it by reference, and the second `splice`
   * copies them into the output's. Answers the bytes it did not copy
   * (all of them where the kernel will not splice these files: the caller
   * copies those by copy_file_range).
   */
  const splice = (start: number, end: number, at: number): number => {
    pipe ??= makePipe(c);
    if (!pipe) return end - start;
    offIn[0] = BigInt(start);
    offOut[0] = BigInt(at);
    let left = end - start;
    while (left > 0) {
      const n = Number(c.splice(
        fdIn,
        offIn,
        pipe[1],
        null,
        BigInt(Math.min(left, PIPE_BYTES)),
        SPLICE_F_MOVE,
      ));
      if (n < 0) {
        const e = errno(c);
        if (left === end - start && UNSUPPORTED.has(e)) {
          dropPipe(); // this file system does not splice: copy_file_range
          return left;
        }
        throw new Errno("splice", e);
      }
      if (n === 0) {
        throw new Error(`splice: input ended ${left} bytes early`);
      }
      for (let inPipe = n; inPipe > 0;) {
        const m = Number(
          c.splice(pipe[0], null, fdOut, offOut, BigInt(inPipe), SPLICE_F_MOVE),
        );
        if (m <= 0) {
          // Bytes stuck in the pipe would go to the next copy's output.
          const e = m < 0 ? errno(c) : 0;
          dropPipe();
          pipe = undefined; // a fresh one for a later copy
          throw m < 0
            ? new Errno("splice", e)
            : new Error("splice: the output took no bytes");
        }
        inPipe -= m;
        copied.splice += m;
      }
      left -= n;
    }
    return 0;
  };
  return {
    copied,
    copy(from, length, to) {
      if (!working) return undefined;
      const before = copied.copyFileRange + copied.splice;
      try {
        const ranges: Iterable<[number, number]> =
          from >= known[0] && from + length <= known[1]
            ? [[from, from + length]]
            : dataRanges(c, fdIn, from, length, known);
        for (const [start, end] of ranges) {
          const at = to + start - from;
          const rest = pipe !== null && (start - at) % 4096 !== 0
            ? splice(start, end, at)
            : end - start;
          if (rest > 0) copyFileRange(end - rest, end, at + end - rest - start);
        }
      } catch (e) {
        const done = copied.copyFileRange + copied.splice - before;
        if (done === 0 && e instanceof Errno && UNSUPPORTED.has(e.errno)) {
          working = false;
          return undefined;
        }
        throw e;
      }
      return copied.copyFileRange + copied.splice - before;
    },
    close() {
      if (!closed) {
        closed = true;
        working = false;
        dropPipe();
        c.close(fdIn);
        c.close(fdOut);
      }
      return Promise.resolve();
    },
  };
}

/** A pipe of PIPE_BYTES (or the system's most) for `splice`, or null when none can be made. */
function makePipe(c: Libc): Int32Array | null {
  const fds = new Int32Array(2);
  if (c.pipe2(fds, O_CLOEXEC) !== 0) return null;
  // Refused past /proc/sys/fs/pipe-max-size (1 MiB by default): the
  // pipe then keeps its 64 KiB, which still copies, as copy_file_range would.
  c.fcntl(fds[1], F_SETPIPE_SZ, PIPE_BYTES);
  return fds;
}

/** Whether the file system of `fd` copies on the server (NFS, SMB): copy_file_range there. */
function offloads(c: Libc, fd: number): boolean {
  // struct statfs begins with f_type, a long (8 bytes on 64-bit Linux);
  // 256 bytes hold the whole struct (120 on x86-64 and arm64).
  const buffer = new BigInt64Array(32);
  if (c.fstatfs(fd, buffer) !== 0) return false;
  return OFFLOADING.has(Number(buffer[0] & 0xffffffffn));
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
 * The data ranges `[start, end)` within `[offset, offset + length)` of the
 * open file `stat` describes, as the file system reports them (the rest
 * are holes), or `undefined` where they cannot be had (no FFI, not Linux,
 * no descriptor found).
 */
export function dataRangesIn(
  stat: Deno.FileInfo,
  offset: number,
  length: number,
): [number, number][] | undefined {
  const c = loadLibc();
  const fd = c && stat.isFile ? descriptorOf(stat, "read") : undefined;
  if (!c || fd === undefined) return undefined;
  return [...dataRanges(c, fd, offset, length)];
}
