/**
 * File-to-file copies for the file adapter (`file.ts`): the data ranges of
 * a sparse file found with `lseek(SEEK_DATA / SEEK_HOLE)` and copied by
 * `pread` and `pwrite` of 256 KiB through one reused, page-aligned buffer
 * outside the JavaScript heap, through libc by Deno's FFI. Holes are
 * skipped, so they stay holes in an output sized beforehand; no byte
 * passes through JavaScript.
 *
 * Why reads and writes and not `copy_file_range` (which copies without a
 * buffer): on ext4 (kernel 6.18, 2 cores, the bench's 1 GiB disks,
 * interleaved runs of the copy alone) a 256 KiB buffer copied the 768 MiB
 * of the bench's vdi in 178-187 ms of wall and CPU where
 * `copy_file_range` took 281-318 ms (its blocks start 512 bytes into a
 * page of the file; the kernel then splices through its own 64 KiB pipe)
 * and the raw disk's in 174-210 against 200-219 ms (`cp` 194-221 ms):
 * the buffer stays in the core's 2 MiB L2 cache between the read that
 * fills it and the write that empties it, so the second copy is cheap.
 * Bigger buffers lose that, and writes of 1 MiB make the page cache
 * allocate large folios (1 MiB buffer: 558-1070 ms); smaller ones make
 * more calls (64 KiB: 209-241 ms). Reads and writes on Deno's blocking
 * threads (`nonblocking` FFI calls, 2-4 buffers) cost 20-60 % more CPU
 * for no better wall time: a handoff per call, and the buffers out of
 * cache. A second thread (`_file_copy_worker.ts`, a worker that loads
 * nothing but its own module) copies pieces of 1 MiB beside this one for
 * inputs of 128 MiB and more, as `qemu-img convert` copies on two: one
 * reads while the other writes (see the README's Speed section).
 *
 * Neither way wins in every state of the machine: at 4 GiB, with the page
 * cache full, reads and writes swung from 0.94 to 2.9 s of CPU for 3 GiB
 * while `copy_file_range` stayed at 1.27-1.37 s. So on local file
 * systems each 16 MiB segment goes the way that copied faster lately,
 * and after 16 segments one way one tries the other (`kernelCopier`).
 * There the kernel's way moves a range misaligned between input and
 * output through a 256 KiB pipe of the copier's own (`splice` in, `splice`
 * out): the 768 MiB of the bench's raw disk, 512 bytes later in the
 * output, took 330 ms (wall and CPU, 10 runs, load 3) against 427 ms by
 * `copy_file_range` (its 64 KiB pipe) and 338 ms by reads and writes.
 *
 * On ext4 the output's blocks for each copy's data ranges are allocated
 * first (`fallocate`, the size kept), so that the writes skip its delayed
 * allocation, a reservation per 4 KiB block: the bench vhdx's copy took a
 * third less system CPU (see `kernelCopier` and the README).
 *
 * Where the output lies on a file system that copies on the server (NFS,
 * SMB) or shares blocks (btrfs, XFS, bcachefs), `copy_file_range` is kept
 * (for ranges aligned to the page between input and output on the
 * latter): those copy without moving the bytes at all. No second thread is
 * started ahead there: the output's file system is looked up first (in
 * /proc/self/mountinfo, before libc is loaded), and `fstatfs` confirms it.
 *
 * Deno-only, and only on Linux with the FFI permission granted (the
 * permission is queried, never prompted for). Anywhere else, and on any
 * error before a byte is copied (ENOSYS, EXDEV, EINVAL, an fd that cannot
 * be found), {@linkcode kernelCopier} answers `undefined` and the caller
 * copies the ordinary way. Errors after that are thrown as a
 * {@linkcode CopyFailure} that says which side failed, where, and why
 * (the file adapter names the file).
 *
 * `cp --sparse=always` and `qemu-img convert` find holes the same way;
 * `deno task bench raw` measured this path against them.
 *
 * @module
 */

import {
  ACTIVE,
  BUFFER_BYTES,
  claim,
  CONTROL_WORDS,
  CopyFailure,
  copyFailure,
  copySymbols,
  ERRNO,
  errno,
  FD_IN,
  FD_OUT,
  JOB_HEADER,
  JOB_PIECES,
  mapBuffer,
  MAX_PIECES,
  MESSAGE_BYTES,
  NEXT,
  nextWord,
  pieceOf,
  readWrite,
  READY,
  SAID,
  SIDE,
  stalled,
  WORKER_NAME,
} from "./_file_copy_worker.ts";

export { CopyFailure };

const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const EIO = 5;
const ENXIO = 6;
const EOPNOTSUPP = 95;
const F_SETPIPE_SZ = 1031;
const O_CLOEXEC = 0o2000000;
const SPLICE_F_MOVE = 1;
/**
 * Whether input offset `start` and output offset `at` lie at the same
 * place in a 4 KiB page: `copy_file_range` then moves (or, on btrfs and
 * XFS, shares) whole pages; a range misaligned between the files goes
 * through a pipe instead (see the module doc).
 */
const samePlaceInPage = (start: number, at: number) =>
  (start - at) % 4096 === 0;
/** `f_type` (`statfs(2)`) of file systems that copy on the server: NFS, CIFS, SMB2. */
const OFFLOADING = new Set([0x6969, 0xff534d42, 0xfe534d42]);
/** `f_type` of file systems that share blocks for `copy_file_range`: btrfs, XFS, bcachefs. */
const REFLINKING = new Set([0x9123683e, 0x58465342, 0xca451a4e]);
/**
 * The names /proc/self/mountinfo gives the file systems of `OFFLOADING`
 * and `REFLINKING`.
 */
const COPYING_NAMES = new Set([
  "nfs",
  "nfs4",
  "cifs",
  "smb3",
  "btrfs",
  "xfs",
  "bcachefs",
]);
/** `f_type` of ext2/3/4: its `fallocate` reserves blocks without writing them (see `kernelCopier`). */
const EXT4 = 0xef53;
/** `fallocate` mode: allocate, never change the file's size. */
const FALLOC_FL_KEEP_SIZE = 1;
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
  ...copySymbols,
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
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  open: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
} as const;

/** The libc functions this module calls. */
type Libc = Deno.DynamicLibrary<typeof symbols>["symbols"];

let libc: Libc | null | undefined;

/** Whether this is Linux with the FFI permission granted (queried, never prompted for). */
function ffiAllowed(): boolean {
  try {
    return Deno.build.os === "linux" &&
      Deno.permissions.querySync({ name: "ffi" }).state === "granted";
  } catch {
    return false;
  }
}

/** libc's functions, or null where they cannot be had (no FFI permission, not Linux). */
function loadLibc(): Libc | null {
  if (libc !== undefined) return libc;
  libc = null;
  try {
    if (!ffiAllowed()) return null;
    libc = Deno.dlopen("libc.so.6", symbols).symbols;
  } catch { /* no libc by that name, or FFI refused */ }
  return libc;
}

/**
 * A thrown errno from a libc call, and the file it was the call of (`read`:
 * the input, `write`: the output). {@linkcode kernelCopier} copies another
 * way on it where nothing was copied yet, else turns it into a
 * {@linkcode CopyFailure} of that side.
 */
class Errno extends Error {
  constructor(
    readonly call: string,
    readonly errno: number,
    readonly side: "read" | "write",
    options?: ErrorOptions,
  ) {
    super(`${call} failed with errno ${errno}`, options);
    this.name = "Errno";
  }
}

/**
 * The descriptor numbers of open files in this process: for each of
 * `wanted`, the entry of /proc/self/fd that is the same file (device and
 * inode) and open for its `access` (read, or read and write), found in
 * one pass over the directory (a stat per entry, the fdinfo only of those
 * that match). Deno does not hand out descriptors.
 */
export function descriptorsOf(
  wanted: { stat: Deno.FileInfo; access: "read" | "write" }[],
): (number | undefined)[] {
  const found: (number | undefined)[] = wanted.map(() => undefined);
  if (wanted.some(({ stat }) => stat.dev === null || stat.ino === null)) {
    return found;
  }
  try {
    for (const entry of Deno.readDirSync("/proc/self/fd")) {
      const fd = Number(entry.name);
      if (!(fd > 2)) continue;
      let s: Deno.FileInfo | undefined;
      let mode: number | undefined;
      for (let i = 0; i < wanted.length; i++) {
        if (found[i] !== undefined) continue;
        try {
          s ??= Deno.statSync(`/proc/self/fd/${fd}`);
        } catch {
          break; // closed meanwhile, or the listing's own descriptor
        }
        const { stat, access } = wanted[i];
        if (s.dev !== stat.dev || s.ino !== stat.ino || !s.isFile) continue;
        if (mode === undefined) {
          const info = Deno.readTextFileSync(`/proc/self/fdinfo/${fd}`);
          const flags = /^flags:\s*([0-7]+)/m.exec(info)?.[1] ?? "";
          mode = parseInt(flags, 8) & 3; // O_ACCMODE: 0 read, 1 write, 2 both
        }
        if (access === "read" ? mode === 0 || mode === 2 : mode === 2) {
          found[i] = fd;
          break;
        }
      }
      if (found.every((fd) => fd !== undefined)) break;
    }
  } catch { /* no /proc, or no permission to read it */ }
  return found;
}

/**
 * The descriptor number of an open file in this process (see
 * {@linkcode descriptorsOf}).
 *
 * @example
 * ```ts ignore
 * const file = Deno.openSync("disk.raw");
 * console.log(descriptorOf(file.statSync(), "read")); // 3, say
 * ```
 */
export function descriptorOf(
  stat: Deno.FileInfo,
  access: "read" | "write",
): number | undefined {
  return descriptorsOf([{ stat, access }])[0];
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
      throw new Errno("lseek(SEEK_DATA)", e, "read");
    }
    if (data >= end) return;
    const hole = Number(c.lseek(fd, BigInt(data), SEEK_HOLE));
    if (hole < 0) throw new Errno("lseek(SEEK_HOLE)", errno(c), "read");
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
   * after part was copied is thrown (a {@linkcode CopyFailure} for a
   * failed read or write).
   */
  copy(from: number, length: number, to: number): number | undefined;
  /**
   * {@linkcode KernelCopier.copy} for each of `ranges` (`from`, `length`,
   * `to`), in one call: pieces of all of them are shared with the second
   * thread at once (a dynamic VHD's 2 MiB blocks, each its own range,
   * were slower shared one by one than copied on one thread). Answers
   * the data bytes copied, or `undefined` when nothing was.
   */
  copyRanges(
    ranges: readonly (readonly [from: number, length: number, to: number])[],
  ): number | undefined;
  /**
   * Bytes copied so far by each way: `copy_file_range`, or `pread` and
   * `pwrite` through the copier's buffer.
   */
  readonly copied: {
    copyFileRange: number;
    /**
     * Of `copyFileRange`: bytes of misaligned ranges moved by `splice`
     * through the copier's own 256 KiB pipe instead.
     */
    splice: number;
    readWrite: number;
    /** Of `readWrite`: bytes of copies shared with the second thread. */
    shared: number;
  };
  /** Closes the copier's descriptors; later copies answer `undefined`. */
  close(): Promise<void>;
}

/** Options for {@linkcode kernelCopier}. */
export interface KernelCopierOptions {
  /**
   * The paths the two files were opened by: the copier opens them again
   * for its own descriptors (and checks they are the same files), which
   * is cheaper than finding Deno's in /proc/self/fd.
   */
  paths?: { input?: string; output?: string };
  /**
   * Which way to copy: `auto` (by the output's file system, see the
   * module doc), or always `copy_file_range`, or always reads and writes,
   * or always the kernel with ranges misaligned between input and output
   * through the copier's pipe (`splice`), as `auto` does when it copies in
   * the kernel on a local file system.
   * @default "auto"
   */
  way?: "auto" | "copy_file_range" | "read_write" | "splice";
  /**
   * Data bytes copied by one thread before a second one is started for
   * reads and writes (`Infinity`: never). By default a second thread
   * joins from the first byte where the input file holds at least
   * {@linkcode HELPER_MIN_INPUT} bytes, and never for a smaller one.
   */
  helperAfter?: number;
  /**
   * Allocate the output's blocks for each copy's data ranges before
   * copying them, where the output is on ext4 (see `kernelCopier`).
   * @default true
   */
  preallocate?: boolean;
  /**
   * Start the second thread even when the machine has no core to spare
   * (tasks waited for a CPU a fifth of the last 10 s): there it adds CPU
   * time for a better share of the busy cores. @default false
   */
  helperWhenBusy?: boolean;
}

/**
 * The `some avg10` of `/proc/pressure/cpu` under which the machine counts
 * as having a core to spare whatever runs this instant. On 2 cores,
 * converts run back to back on an otherwise idle machine (the bench:
 * qemu-img's threads, Deno's start-up threads, our two) keep it at 15-38
 * %; 5-8 other runnable tasks (load 6-8) give 38-50 %, and at load 7-12
 * two threads bought no wall time for 20-35 ms more CPU.
 */
const BUSY_PRESSURE = 35;

/** The text of the file at `path` where reading it is allowed (never prompted for), else `undefined`. */
function readIfAllowed(path: string): string | undefined {
  try {
    return Deno.permissions.querySync({ name: "read", path }).state ===
        "granted"
      ? Deno.readTextFileSync(path)
      : undefined;
  } catch {
    return undefined; // no such file
  }
}

/**
 * Whether the machine has a core to spare for a second copy thread: tasks
 * waited for a CPU less than `BUSY_PRESSURE` % of the last 10 seconds
 * (the `some avg10` of `/proc/pressure/cpu`), or at most `cores - 1`
 * tasks are runnable this instant, this one included (the fourth field
 * of `/proc/loadavg`). Either alone misjudged: the pressure counts our
 * own runs of the seconds before (the bench's back-to-back converts
 * turned the second thread off for themselves), and one instant can
 * catch a passing task. Read only where reading is allowed; unknown
 * counts as spare.
 */
function coreToSpare(): boolean {
  const cores = navigator.hardwareConcurrency ?? 1;
  if (cores < 2) return false;
  const pressure = readIfAllowed("/proc/pressure/cpu"); // none: no PSI
  const load = readIfAllowed("/proc/loadavg");
  const waited = pressure && /^some avg10=([\d.]+)/m.exec(pressure)?.[1];
  if (waited && Number(waited) < BUSY_PRESSURE) return true;
  const running = load === undefined ? NaN : parseInt(load.split(" ")[3]);
  // Unknown (no file, no permission, no number): spare, unless the
  // pressure said busy.
  if (!(running > 0)) return !waited;
  return running <= cores - 1;
}

/**
 * Whether the file `stat` describes lies, by /proc/self/mountinfo, on a
 * file system where the kernel copies (`OFFLOADING`, `REFLINKING`): its
 * line whose device (major:minor) is the file's. False where that cannot
 * be told (no permission to read the file, no line of that device: a
 * btrfs subvolume not mounted by itself); `fstatfs` decides the way
 * later in any case. Read before libc is loaded: 0.1 ms.
 */
function kernelCopiesOn(stat: Deno.FileInfo): boolean {
  const dev = stat.dev;
  if (dev === null) return false;
  // glibc's major() and minor() of a dev_t.
  const high = Math.floor(dev / 2 ** 32);
  const major = ((dev >>> 8) & 0xfff) | ((high & 0xfffff000) >>> 0);
  const minor = (dev & 0xff) | ((Math.floor(dev / 4096) & 0xffffff00) >>> 0);
  const lines = readIfAllowed("/proc/self/mountinfo")?.split("\n") ?? [];
  // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw": the
  // third field is the device; the file system's name follows " - ".
  const line = lines.find((line) => line.split(" ")[2] === `${major}:${minor}`);
  const name = line?.split(" - ")[1]?.split(" ")[0];
  return name !== undefined && COPYING_NAMES.has(name);
}

/**
 * The least size of an input file for which a copier takes a second
 * thread by default: starting one holds this thread 7-10 ms (`new
 * Worker` waits for the worker's isolate), about the time 32 MiB take to
 * copy on one thread, and two threads halve the rest. (Started ahead, at
 * the CLI's start, it would hold the thread as long: the isolate is made
 * while `new Worker` waits, wherever it is called.)
 */
const HELPER_MIN_INPUT = 128 << 20;
/**
 * Bytes of a piece: what a thread claims at a time of a job shared with
 * the second thread.
 */
const PIECE_BYTES = 1 << 20;
/** Bytes a measured copy decides its way for at a time (see `kernelCopier`). */
const SEGMENT = 16 << 20;
/**
 * Bytes a measured copy tries the other way with: a quarter of a
 * segment, as the way that copied slower lately costs for what it copies
 * (three trials of 16 MiB in the bench's 768 MiB, the kernel's way on one
 * thread against reads and writes on two, were 10 ms of 0.18 s).
 */
const TRIAL = 4 << 20;
/** How much faster (ms per MiB) the other way must have copied to take over. */
const SWITCH_GAIN = 1.25;
/** Timed segments copied one way before one tries the other again. */
const EXPLORE_AFTER = 16;
/**
 * A kernel copier from the file `input` to the file `output` (both open,
 * identified by their fstat), or `undefined` where there is none (no FFI
 * permission, not Linux, no descriptor found).
 */
export function kernelCopier(
  input: Deno.FileInfo,
  output: Deno.FileInfo,
  options: KernelCopierOptions = {},
): KernelCopier | undefined {
  if (!input.isFile || !output.isFile) return undefined;
  const helperAfter = options.helperAfter ??
    (input.size >= HELPER_MIN_INPUT ? 0 : Infinity);
  /** Whether a second thread may start: the machine has a core to spare. */
  const spare = () => options.helperWhenBusy || coreToSpare();
  // A second thread wanted from the first byte is started first: its
  // module loads while this thread opens libc and the files (1-3 ms).
  // Not where the kernel will copy every range (the output on NFS, SMB,
  // btrfs, XFS): there it would be closed unused. A machine found busy
  // here keeps this copier on one thread, as it would at the first copy
  // (`helperFor`), which does not ask again.
  let early: Helper | null = null;
  let busy = false;
  if (
    helperAfter === 0 && options.way !== "copy_file_range" &&
    options.way !== "splice" && ffiAllowed() && !kernelCopiesOn(output)
  ) {
    if (spare()) early = startHelper();
    else busy = true;
  }
  const c = loadLibc();
  if (!c) {
    early?.close();
    return undefined;
  }
  // Our own descriptors for the two files: opened again by their paths
  // and checked to be the same files (device and inode), else opened
  // through /proc/self/fd/N of the ones Deno holds, found by number (a
  // pass over /proc/self/fd: 0.7-1 ms, the open 0.1 ms). Each has its own
  // file position, which the data-range queries' lseek moves: a
  // duplicate (F_DUPFD) would share Deno's, and a read or write of that
  // handle that seeks and then reads or writes would go elsewhere. Nobody
  // else closes them, so no later copy can reach another file that took a
  // closed handle's number (that was a statx of both numbers before each
  // copy, 874 calls for the VHD).
  const found = ownDescriptors(c, [
    { path: options.paths?.input, stat: input, access: "read" },
    { path: options.paths?.output, stat: output, access: "write" },
  ]);
  const [fdIn, fdOut] = found;
  if (fdIn < 0 || fdOut < 0) {
    for (const fd of found) if (fd >= 0) c.close(fd);
    early?.close();
    return undefined;
  }
  const offIn = new BigInt64Array(1);
  const offOut = new BigInt64Array(1);
  let working = true;
  let closed = false;
  const copied = { copyFileRange: 0, splice: 0, readWrite: 0, shared: 0 };
  // The last data range the file system reported, whole ([data, hole)): a
  // copy inside it needs no lseek. A dynamic VHD asks for one copy per
  // 2 MiB block, each within the same data range of its file; two lseeks
  // per block were half the system calls of its convert. (The input is
  // open read-only; if someone else changes it meanwhile, no copy of it is
  // right anyway.)
  const known: [number, number] = [0, 0];
  // Which ranges copy_file_range takes: all of them where the output's
  // file system copies on the server, the page-aligned ones where it
  // shares blocks, else those it copies faster ("measured": module doc).
  const type = fileSystemOf(c, fdOut);
  const way = options.way ?? "auto";
  let kernelFor: "all" | "aligned" | "none" | "measured" | "splice" =
    way === "copy_file_range"
      ? "all"
      : way === "splice"
      ? "splice"
      : way === "read_write"
      ? "none"
      : OFFLOADING.has(type)
      ? "all"
      : REFLINKING.has(type)
      ? "aligned"
      : "measured";
  // On ext4 each copy's data ranges are allocated in the output first
  // (`fallocate`, size kept: unwritten extents, which read as zeros). A
  // write into unwritten blocks skips ext4's delayed allocation, which
  // for every 4 KiB block written reserves space, charges quota and
  // records a delayed extent: 30 % of the system CPU of the bench vhdx's
  // copy (see the README's Speed section). The same blocks are allocated
  // either way, and a hole of the input stays a hole. (Where a copy
  // finds the files take none after all, before a byte, and the caller
  // writes the ranges itself, skipping zero blocks, those stay allocated
  // but unwritten: zeros to a read, holes to SEEK_DATA.)
  let preallocate = type === EXT4 && options.preallocate !== false;
  // "measured": each segment goes the way that has copied fastest lately
  // (ms per MiB, the mean of the last sample and the ones before; see
  // `current`), and
  // after EXPLORE_AFTER timed segments one way one tries the other (a
  // dynamic VHD's blocks are taken together into segments of 16 MiB), so
  // a sample slowed by a preemption is not believed for long. Reads and
  // writes start; copy_file_range is tried at the fifth segment.
  const msPerMiB = { readWrite: NaN, kernel: NaN };
  const since = { readWrite: 0, kernel: EXPLORE_AFTER - 4 };
  // The way segments take: the other takes over only when it copied a
  // quarter faster (fewer ms per MiB by that much): a 4 MiB trial is a
  // short sample, and a long segment of the two threads slowed by another
  // process's turn made single trials of the kernel look faster.
  let current: "readWrite" | "kernel" = "readWrite";
  /**
   * The way for the next segment and its bytes: `TRIAL` to try the way
   * that copied slower lately, else the segments until the next trial
   * (one job for the second thread, whose end both threads wait for).
   */
  const pick = (): ["readWrite" | "kernel", number] => {
    if (kernelFor === "none") return ["readWrite", Infinity];
    const best = current;
    const other = best === "readWrite" ? "kernel" : "readWrite";
    return since[other] >= EXPLORE_AFTER
      ? [other, TRIAL]
      : [best, SEGMENT * (EXPLORE_AFTER - since[other])];
  };
  const record = (
    way: "readWrite" | "kernel",
    bytes: number,
    ms: number,
  ) => {
    if (bytes < 1 << 20) return; // too short to time
    const was = current;
    // A long segment counts as the 16 MiB segments it holds.
    since[way === "readWrite" ? "kernel" : "readWrite"] += Math.max(
      1,
      Math.round(bytes / SEGMENT),
    );
    since[way] = 0;
    const rate = ms / (bytes / (1 << 20));
    msPerMiB[way] = isNaN(msPerMiB[way]) ? rate : (msPerMiB[way] + rate) / 2;
    const other = was === "readWrite" ? "kernel" : "readWrite";
    if (msPerMiB[other] * SWITCH_GAIN < msPerMiB[was]) current = other;
    // A trial that took over is checked again after 4 segments, not 16: a
    // wrong switch to one thread of the kernel's copy cost 200 MiB of the
    // bench's vhdx at that speed.
    if (current !== was) since[was] = EXPLORE_AFTER - 4;
  };
  // The copy buffer: mapped at the first read and write; null where none
  // can be had (copy_file_range then copies everything).
  let buffer: Deno.PointerObject | null | undefined;
  // The second thread, started once `helperAfter` bytes were copied
  // (null: none for this copier). Where the kernel copies every range
  // (a file system that copies on the server or shares blocks), none.
  if (kernelFor === "all" || kernelFor === "aligned") {
    early?.close();
    early = null;
  }
  let helper: Helper | null | undefined = early ?? (busy ? null : undefined);

  /** `[start, end)` of the input to `at` in the output by copy_file_range. */
  const copyFileRange = (start: number, end: number, at: number) => {
    offIn[0] = BigInt(start);
    offOut[0] = BigInt(at);
    for (let left = end - start, tries = 0; left > 0;) {
      const n = Number(
        c.copy_file_range(fdIn, offIn, fdOut, offOut, BigInt(left), 0),
      );
      if (n > 0) {
        left -= n;
        copied.copyFileRange += n;
        tries = 0;
        continue;
      }
      const e = stalled(c, n, tries++);
      if (e === undefined) continue;
      // The first call of a range: the kernel will not copy these files.
      if (left === end - start && UNSUPPORTED.has(e)) {
        throw new Errno("copy_file_range", e, "write");
      }
      // Which side failed is not said: the input's end and EIO are
      // counted as the input's, the rest (ENOSPC, EFBIG) as the output's,
      // as most failures of a copy are.
      const read = e === 0 || e === EIO;
      throw copyFailure(
        c,
        read ? "read" : "write",
        e,
        Number(read ? offIn[0] : offOut[0]),
        left,
      );
    }
  };
  // The pipe for misaligned kernel copies: made at the first; null where
  // none can be had or the kernel will not splice these files.
  let pipe: Int32Array | null | undefined;
  const dropPipe = () => {
    if (pipe) { for (const fd of pipe) c.close(fd); }
    pipe = null;
  };
  /**
   * `[start, end)` of the input to `at` in the output through our pipe,
   * 256 KiB at a time: the input's pages go into it by reference, and the
   * second `splice` copies them into the output's. `copy_file_range`
   * splices through the kernel's own 64 KiB pipe where the range is
   * misaligned between input and output (see the README). False when no
   * pipe can be had or these files take no splice (nothing was copied:
   * the caller uses copy_file_range).
   */
  const spliceRange = (start: number, end: number, at: number): boolean => {
    pipe ??= makePipe(c);
    if (!pipe) return false;
    offIn[0] = BigInt(start);
    offOut[0] = BigInt(at);
    for (let left = end - start, tries = 0; left > 0;) {
      const n = Number(c.splice(
        fdIn,
        offIn,
        pipe[1],
        null,
        BigInt(Math.min(left, BUFFER_BYTES)),
        SPLICE_F_MOVE,
      ));
      if (n <= 0) {
        const e = stalled(c, n, tries++);
        if (e === undefined) continue;
        if (left === end - start && UNSUPPORTED.has(e)) {
          dropPipe();
          return false;
        }
        throw copyFailure(c, "read", e, Number(offIn[0]), left);
      }
      tries = 0;
      for (let inPipe = n, stalls = 0; inPipe > 0;) {
        const m = Number(
          c.splice(pipe[0], null, fdOut, offOut, BigInt(inPipe), SPLICE_F_MOVE),
        );
        if (m > 0) {
          inPipe -= m;
          copied.copyFileRange += m;
          copied.splice += m;
          stalls = 0;
          continue;
        }
        const e = stalled(c, m, stalls++);
        if (e === undefined) continue;
        // Bytes left in the pipe would go to the next copy's output: a
        // fresh pipe for that one.
        dropPipe();
        pipe = undefined;
        throw copyFailure(c, "write", e, Number(offOut[0]), inPipe);
      }
      left -= n;
    }
    return true;
  };
  /** The kernel's copy: misaligned ranges through our pipe, the rest by copy_file_range. */
  const copyInKernel = (start: number, end: number, at: number) => {
    if (samePlaceInPage(start, at) || !spliceRange(start, end, at)) {
      copyFileRange(start, end, at);
    }
  };
  /**
   * The second thread for a copy of `length` bytes by reads and writes,
   * started at the first that wants one; null for a copy it would not help (a piece or less) or
   * when there is none. A segment that only tries this way (the kernel's
   * copied faster lately) starts one too, else the trial would time one
   * thread against what two would do.
   */
  const helperFor = (length: number): Helper | null => {
    if (length <= PIECE_BYTES) return null;
    if (helper?.ended) helper = undefined; // idle too long: see startHelper
    if (helper === undefined && copied.readWrite >= helperAfter) {
      // On a busy machine (the bench disk at load 7-12: the same wall
      // time, 20-35 ms more CPU) a copy stays on one thread.
      helper = spare() ? startHelper() : null;
    }
    return helper ?? null;
  };
  /**
   * `ranges` by reads and writes, shared with the second thread where
   * there is one; false when no buffer could be had (nothing copied).
   */
  const copyByBuffer = (ranges: readonly Range[]): boolean => {
    if (buffer === undefined) buffer = mapBuffer(c, BUFFER_BYTES);
    if (!buffer) return false;
    const mine = buffer;
    const bytes = ranges.reduce((n, [start, end]) => n + end - start, 0);
    try {
      const second = helperFor(bytes);
      if (second) {
        const shared = second.copy(fdIn, fdOut, ranges, (s, e, a) => {
          readWrite(c, fdIn, fdOut, mine, s, e, a);
        });
        copied.readWrite += bytes;
        if (shared) copied.shared += bytes;
      } else {
        for (const [start, end, at] of ranges) {
          copied.readWrite += readWrite(c, fdIn, fdOut, mine, start, end, at);
        }
      }
    } catch (e) {
      // Unsupported by these files (the input refuses pread: EINVAL for
      // a file open with O_DIRECT): the caller falls back.
      if (e instanceof CopyFailure && UNSUPPORTED.has(e.errno ?? 0)) {
        throw new Errno(
          e.side === "read" ? "pread" : "pwrite",
          e.errno!,
          e.side,
          // Where no fallback is left, the failure itself is reported.
          { cause: e },
        );
      }
      throw e;
    }
    return true;
  };
  /**
   * `ranges` by `kernel` (one of the kernel's ways), or, where these
   * files take no copy in the kernel (EXDEV: two file systems; it said so
   * before a byte of the range was copied), the rest by reads and writes,
   * as is every later copy. Without a buffer (copyByBuffer false) the
   * fallback has none either: the kernel's failure is thrown.
   */
  const copyInKernelElseByBuffer = (
    kernel: (start: number, end: number, at: number) => void,
    ranges: readonly Range[],
  ) => {
    for (const [i, [start, end, at]] of ranges.entries()) {
      try {
        kernel(start, end, at);
      } catch (error) {
        if (!(error instanceof Errno) || !copyByBuffer(ranges.slice(i))) {
          throw error;
        }
        kernelFor = "none";
        return;
      }
    }
  };
  /**
   * `ranges` in segments (a big range split, the small ones of a dynamic
   * VHD's blocks taken together), each the way and size {@linkcode pick}
   * says.
   */
  const copyMeasured = (ranges: readonly Range[]) => {
    let segment: Range[] = [];
    let bytes = 0;
    let [way, target] = pick();
    const copySegment = () => {
      // Its start (new Worker holds this thread 7-10 ms) is not timed:
      // the segment would look slow, and the kernel's way take over.
      if (way === "readWrite") helperFor(bytes);
      const began = performance.now();
      if (way === "readWrite" && !copyByBuffer(segment)) {
        way = "kernel";
      }
      if (way === "kernel") copyInKernelElseByBuffer(copyInKernel, segment);
      record(way, bytes, performance.now() - began);
      segment = [];
      bytes = 0;
      [way, target] = pick();
    };
    for (const [start, end, at] of ranges) {
      for (let s = start; s < end;) {
        const e = Math.min(end, s + target - bytes);
        segment.push([s, e, at + s - start]);
        bytes += e - s;
        if (bytes >= target) copySegment();
        s = e;
      }
    }
    if (bytes > 0) copySegment();
  };
  /**
   * Allocates the output's blocks for `ranges` before they are copied (see
   * `preallocate`). A failure leaves the rest to the copy: where the file
   * system takes no `fallocate` (EOPNOTSUPP: an ext3 file without
   * extents), none is tried again; where it has no room (ENOSPC), the
   * copy's write fails as it would have.
   */
  const allocate = (ranges: readonly Range[]) => {
    for (let i = 0; i < ranges.length;) {
      // Ranges that follow each other in the output (a dynamic VHD's
      // blocks) are allocated in one call.
      const at = ranges[i][2];
      let end = at;
      for (; i < ranges.length && ranges[i][2] === end; i++) {
        end += ranges[i][1] - ranges[i][0];
      }
      // Empty ranges (the loop above took at least one): nothing to allocate.
      if (end === at) continue;
      const size = BigInt(end - at);
      if (c.fallocate(fdOut, FALLOC_FL_KEEP_SIZE, BigInt(at), size) !== 0) {
        if (errno(c) === EOPNOTSUPP) preallocate = false;
        return;
      }
    }
  };
  /** The data ranges of `[from, from + length)`, with where they go from `to`. */
  const dataOf = (from: number, length: number, to: number): Range[] => {
    if (from >= known[0] && from + length <= known[1]) {
      return [[from, from + length, to]];
    }
    return [...dataRanges(c, fdIn, from, length, known)].map((
      [start, end],
    ) => [start, end, to + start - from]);
  };
  const copyRanges = (
    list: readonly (readonly [from: number, length: number, to: number])[],
  ) => {
    if (!working) return undefined;
    const before = copied.copyFileRange + copied.readWrite;
    try {
      const ranges = list.flatMap(([from, length, to]) =>
        dataOf(from, length, to)
      );
      if (preallocate) allocate(ranges);
      if (kernelFor === "measured") copyMeasured(ranges);
      else if (kernelFor === "none" && copyByBuffer(ranges)) { /* copied */ }
      else {
        // A range misaligned between the files goes through the pipe
        // ("splice": copyInKernel) or by reads and writes ("aligned");
        // the rest, and every range for "all", by copy_file_range.
        for (const range of ranges) {
          const [start, , at] = range;
          if (kernelFor === "splice") copyInKernel(...range);
          else if (
            kernelFor === "all" ||
            (kernelFor === "aligned" && samePlaceInPage(start, at)) ||
            !copyByBuffer([range])
          ) {
            copyInKernelElseByBuffer(copyFileRange, [range]);
          }
        }
      }
    } catch (e) {
      const done = copied.copyFileRange + copied.readWrite - before;
      if (done === 0 && e instanceof Errno && UNSUPPORTED.has(e.errno)) {
        working = false;
        return undefined;
      }
      // A piece's failure, turned into an Errno for the fallback above:
      // its own offset, length and the system's message.
      if (e instanceof Errno && e.cause instanceof CopyFailure) throw e.cause;
      if (e instanceof Errno) {
        // lseek and pread run on the input: a failure of theirs is the
        // input's, named as such.
        const [from, length, to] = list[0];
        throw new CopyFailure(
          e.side,
          e.side === "read" ? from : to,
          length,
          e.message,
          e.errno,
        );
      }
      throw e;
    }
    return copied.copyFileRange + copied.readWrite - before;
  };
  return {
    copied,
    copy: (from, length, to) => copyRanges([[from, length, to]]),
    copyRanges,
    close() {
      if (!closed) {
        closed = true;
        working = false;
        helper?.close();
        helper = null;
        if (buffer) c.munmap(buffer, BigInt(BUFFER_BYTES));
        buffer = null;
        dropPipe();
        c.close(fdIn);
        c.close(fdOut);
      }
      return Promise.resolve();
    },
  };
}

/** A second thread that copies pieces beside the copier's: see `_file_copy_worker.ts`. */
interface Helper {
  /**
   * Copies `ranges` (`[start, end)` of `fdIn` to `at` in `fdOut`) in
   * pieces of at most `PIECE_BYTES`, claimed in order by the helper and
   * by `mine` (this thread's reads and writes) alike; a helper not ready
   * yet (its module still loading) joins when it is. Answers whether the
   * helper was ready. Throws the failure of the first piece that failed,
   * once neither thread copies any more.
   */
  copy(
    fdIn: number,
    fdOut: number,
    ranges: readonly Range[],
    mine: (start: number, end: number, at: number) => void,
  ): boolean;
  /** Ends the worker (a ready one returns its buffer and closes itself). */
  close(): void;
  /** Whether the worker was ended (closed, idle too long, or it failed to start). */
  readonly ended: boolean;
}

/** `[start, end)` of the input, and where it goes in the output. */
type Range = readonly [start: number, end: number, at: number];

/**
 * A helper idle this long is ended: a worker keeps the process alive, and
 * a copier whose file is never closed must not. Long enough to outlast a
 * stretch of kernel copies (64 MiB segments, 20 ms each): ended after
 * 100 ms there, the helper was not back for the trial of reads and
 * writes, which then timed one thread and left the kernel's way on.
 */
const HELPER_IDLE_MS = 1000;
/** Whether a copy worker failed to load in this process (none is started again). */
let workerFails = false;

/**
 * Starts the copy worker, or answers null where no worker can be had.
 * Until it is ready, `copy` copies alone; idle `HELPER_IDLE_MS`, it ends.
 */
function startHelper(): Helper | null {
  if (workerFails) return null;
  const control = new SharedArrayBuffer(CONTROL_WORDS * 4 + MESSAGE_BYTES);
  const numbers = new SharedArrayBuffer((JOB_HEADER + 3 * JOB_PIECES) * 8);
  const ctl = new Int32Array(control);
  const job = new Float64Array(numbers);
  let jobs = 0;
  let worker: Worker;
  let ended = false;
  let idle: ReturnType<typeof setTimeout> | undefined;
  const stop = () => {
    if (ended) return;
    ended = true;
    clearTimeout(idle);
    Atomics.store(ctl, NEXT, -1);
    Atomics.notify(ctl, NEXT);
    // A worker that waits for jobs returns its buffer and closes itself
    // when it sees the end (terminated, it would keep the 256 KiB mapped
    // for the life of the process: one per copier in a long-running one).
    if (Atomics.load(ctl, READY) !== 1) worker.terminate();
  };
  try {
    worker = new Worker(
      new URL("./_file_copy_worker.ts", import.meta.url).href,
      { type: "module", name: WORKER_NAME },
    );
    // A worker that cannot load (a build without its module, a read
    // permission denied) leaves the copier to copy alone, and no other
    // is started in this process; its error must not end the program.
    worker.onerror = (event) => {
      event.preventDefault();
      workerFails = true;
      stop();
    };
    worker.postMessage([control, numbers]);
  } catch {
    return null;
  }
  idle = setTimeout(stop, HELPER_IDLE_MS);
  /** Copies the job's `count` pieces with the helper; see `copy`. */
  const run = (
    count: number,
    mine: (start: number, end: number, at: number) => void,
  ) => {
    job[0] = count;
    Atomics.store(ctl, ERRNO, 0);
    const number = ++jobs;
    Atomics.store(ctl, NEXT, nextWord(number, 0));
    Atomics.notify(ctl, NEXT);
    let failure: unknown;
    let failed = -1;
    try {
      for (let i = claim(ctl, number, count); i >= 0;) {
        failed = i;
        mine(...pieceOf(job, i));
        i = claim(ctl, number, count);
      }
    } catch (e) {
      failure = e;
      // Neither thread claims more of this job.
      Atomics.store(ctl, NEXT, nextWord(number, MAX_PIECES));
    }
    // The helper's piece ends before this answers (it writes into the
    // output; the caller may read it or close it next).
    for (let a; (a = Atomics.load(ctl, ACTIVE)) !== 0;) {
      Atomics.wait(ctl, ACTIVE, a, 100);
    }
    const e = Atomics.load(ctl, ERRNO);
    // Both failed: the piece claimed first failed first (a short read
    // there says where the input ended, where a later piece's found only
    // its own start).
    if (e !== 0 && (failure === undefined || job[1] < failed)) {
      // The worker's failure as it made it: its side, offset, length,
      // errno, where the input ended, and its message (the system's
      // words, or what went wrong in the worker).
      const said = new Uint8Array(control, CONTROL_WORDS * 4, MESSAGE_BYTES)
        .slice(0, Atomics.load(ctl, SAID));
      failure = new CopyFailure(
        Atomics.load(ctl, SIDE) === 0 ? "read" : "write",
        job[2],
        job[3],
        new TextDecoder().decode(said) || "the copy worker failed",
        e > 0 ? e : undefined,
        job[4] >= 0 ? job[4] : undefined,
      );
    }
    if (failure !== undefined) throw failure;
  };
  return {
    get ended() {
      return ended;
    },
    copy(fdIn, fdOut, ranges, mine) {
      clearTimeout(idle);
      idle = setTimeout(stop, HELPER_IDLE_MS);
      // The job's numbers are written while NEXT stops all claims of the
      // last job (a thread that read its number cannot claim a piece of
      // it with this job's numbers); naming this job opens its pieces.
      Atomics.store(ctl, NEXT, nextWord(jobs, MAX_PIECES));
      Atomics.store(ctl, FD_IN, fdIn);
      Atomics.store(ctl, FD_OUT, fdOut);
      let count = 0;
      for (const [start, end, at] of ranges) {
        for (let from = start; from < end; from += PIECE_BYTES) {
          if (count === JOB_PIECES) {
            run(count, mine);
            Atomics.store(ctl, NEXT, nextWord(jobs, MAX_PIECES));
            count = 0;
          }
          job.set(
            [from, Math.min(end, from + PIECE_BYTES), at + from - start],
            JOB_HEADER + 3 * count++,
          );
        }
      }
      if (count > 0) run(count, mine);
      return Atomics.load(ctl, READY) === 1;
    },
    close: stop,
  };
}

const O_RDONLY = 0;
const O_RDWR = 2;
/** Never waits: a FIFO put at the path meanwhile must not block the open. */
const O_NONBLOCK = 0o4000;

/**
 * Descriptors of our own (each with its own file position) for open
 * files: each opened again by its path (see `reopen`), else through
 * /proc/self/fd/N of the descriptor Deno holds, found by number (one pass
 * over /proc/self/fd for all that need it: {@linkcode descriptorsOf});
 * -1 for a file neither reaches. Never a duplicate of Deno's descriptor,
 * whose position an `lseek` of ours would move.
 */
function ownDescriptors(
  c: Libc,
  files: {
    path: string | undefined;
    stat: Deno.FileInfo;
    access: "read" | "write";
  }[],
): number[] {
  const flags = (access: "read" | "write") =>
    access === "read" ? O_RDONLY : O_RDWR;
  const reopened = files.map(({ path, stat, access }) =>
    reopen(c, path, stat, flags(access))
  );
  if (reopened.every((fd) => fd >= 0)) return reopened;
  const held = descriptorsOf(files);
  return reopened.map((fd, i) =>
    fd >= 0 || held[i] === undefined ? fd : reopen(
      c,
      `/proc/self/fd/${held[i]}`,
      files[i].stat,
      flags(files[i].access),
    )
  );
}

/**
 * A descriptor of our own for the file at `path` that is the file `stat`
 * describes (device and inode), opened with `access`; -1 where there is
 * no path, it cannot be opened, or it is another file now (renamed or
 * replaced since it was opened).
 */
function reopen(
  c: Libc,
  path: string | undefined,
  stat: Deno.FileInfo,
  access: number,
): number {
  if (path === undefined || path.includes("\0") || stat.ino === null) {
    return -1;
  }
  const name = new TextEncoder().encode(path + "\0");
  const fd = c.open(name, access | O_CLOEXEC | O_NONBLOCK, 0);
  if (fd < 0) return -1;
  try {
    const s = Deno.statSync(`/proc/self/fd/${fd}`);
    if (s.isFile && s.dev === stat.dev && s.ino === stat.ino) return fd;
  } catch { /* no /proc: the scan cannot work either */ }
  c.close(fd);
  return -1;
}

/** A pipe of `BUFFER_BYTES` (or the system's most) for `splice`, or null when none can be made. */
function makePipe(c: Libc): Int32Array | null {
  const fds = new Int32Array(2);
  if (c.pipe2(fds, O_CLOEXEC) !== 0) return null;
  // Refused past /proc/sys/fs/pipe-max-size (1 MiB by default): the pipe
  // then keeps its 64 KiB, which still copies, as copy_file_range would.
  c.fcntl(fds[1], F_SETPIPE_SZ, BUFFER_BYTES);
  return fds;
}

/** The `f_type` of the file system of `fd` (`fstatfs`), or 0 when it cannot be had. */
function fileSystemOf(c: Libc, fd: number): number {
  // struct statfs begins with f_type, a long (8 bytes on 64-bit Linux);
  // 256 bytes hold the whole struct (120 on x86-64 and arm64).
  const buffer = new BigInt64Array(32);
  if (c.fstatfs(fd, buffer) !== 0) return 0;
  return Number(buffer[0] & 0xffffffffn);
}

/**
 * Data-range queries on an open file through a descriptor of our own.
 */
export interface RangeFinder {
  /**
   * The data ranges `[start, end)` within `[offset, offset + length)`, as
   * the file system reports them (the rest are holes), or `undefined`
   * where it cannot say: the file no longer reaches `offset + length`
   * (cut short since it was opened: its reads fail and say so, where the
   * holes past its end would read as zeros), an `lseek` failed, or the
   * finder was closed.
   */
  ranges(offset: number, length: number): [number, number][] | undefined;
  /** Closes the descriptor. */
  close(): void;
}

/**
 * A {@linkcode RangeFinder} for the open file `stat` describes (`path`:
 * the name it was opened by, tried first), or `undefined` where there is
 * none (no FFI, not Linux, not a regular file, no descriptor found). Its
 * descriptor is its own, with its own file position: `SEEK_DATA` and
 * `SEEK_HOLE` move the position of the descriptor they are asked on, and
 * on one Deno holds they moved the position that handle's next read or
 * write went to (a query during a write put the write's pieces
 * elsewhere, with success).
 *
 * @example
 * ```ts ignore
 * const file = Deno.openSync("disk.raw");
 * const finder = rangeFinder(file.statSync(), "disk.raw");
 * console.log(finder?.ranges(0, file.statSync().size)); // [[0, 1048576]], say
 * finder?.close();
 * ```
 */
export function rangeFinder(
  stat: Deno.FileInfo,
  path?: string,
): RangeFinder | undefined {
  const c = loadLibc();
  if (!c || !stat.isFile) return undefined;
  const [fd] = ownDescriptors(c, [{ path, stat, access: "read" }]);
  if (fd < 0) return undefined;
  let open = true;
  return {
    ranges(offset, length) {
      if (!open) return undefined;
      try {
        if (Deno.statSync(`/proc/self/fd/${fd}`).size < offset + length) {
          return undefined;
        }
        return [...dataRanges(c, fd, offset, length)];
      } catch {
        return undefined; // the caller reads instead
      }
    },
    close() {
      if (open) c.close(fd);
      open = false;
    },
  };
}

/**
 * The data ranges `[start, end)` of the whole open file `file`, or
 * `undefined` where they cannot be had (see {@linkcode rangeFinder}).
 *
 * @example
 * ```ts ignore
 * console.log(fileDataRanges(Deno.openSync("disk.raw"))); // [[0, 4096]], say
 * ```
 */
export function fileDataRanges(
  file: Deno.FsFile,
): [number, number][] | undefined {
  const stat = file.statSync();
  const finder = rangeFinder(stat);
  try {
    return finder?.ranges(0, stat.size);
  } finally {
    finder?.close();
  }
}
