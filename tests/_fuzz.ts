// A seeded mutation fuzzer over valid images of every format we read. Each
// mutant is opened, described and converted to a null sink in a worker, under
// a time limit and a memory ceiling; the outcome is success, a typed format
// error, or a defect (any other exception, a timeout, memory over the ceiling).
import { driver, formats, fromBytes, probe, probeInput } from "../mod.ts";
import { have, referenceBytes, referenceImages, run } from "./_helpers.ts";
import { appleSeeds, seedDisk } from "./_apple_writers.ts";
import {
  encryptDmg,
  encryptDmgV1,
  encryptSparsebundle,
} from "./_encrypted_dmg_writer.ts";
import { segmentDmg } from "./_segmented_dmg_writer.ts";

/** A valid image to mutate. */
export interface Seed {
  name: string;
  format: string;
  bytes: Uint8Array;
  /** The password an encrypted seed opens with. */
  key?: string;
  /** The file name the mutant is opened as (segmented dmgs find their parts by it). */
  fileName?: string;
  /** Files beside it (the other segments of a segmented dmg), unmutated. */
  parts?: Record<string, Uint8Array>;
}

/** One defect: enough to reproduce it. */
export interface Defect {
  seed: string;
  mutation: string;
  /**
   * `signature-as-raw`: the mutant still carries its seed's signature
   * (the seed's driver still claims it) and was opened as raw.
   */
  kind: "exception" | "timeout" | "memory" | "signature-as-raw";
  error: string;
  bytes: Uint8Array;
}

/** What a run found. */
export interface FuzzReport {
  mutants: number;
  ok: number;
  typed: number;
  /** Mutants that still carried their seed's signature (all checked never to open as raw). */
  signed: number;
  defects: Defect[];
  byFormat: Record<
    string,
    { mutants: number; ok: number; typed: number; defects: number }
  >;
}

/**
 * Where each format keeps its signature, written down here rather than
 * taken from the drivers' probes, so that the fuzzer's invariant does not
 * trust the code it checks: `at` is a byte offset (negative: from the
 * end of the file).
 */
const SIGNATURES: Record<string, { at: number; magic: string }[]> = {
  qcow: [{ at: 0, magic: "QFI\xfb" }],
  qcow2: [{ at: 0, magic: "QFI\xfb" }],
  qed: [{ at: 0, magic: "QED\0" }],
  vdi: [{ at: 64, magic: "\x7f\x10\xda\xbe" }],
  vhdx: [{ at: 0, magic: "vhdxfile" }],
  parallels: [
    { at: 0, magic: "WithoutFreeSpace" },
    { at: 0, magic: "WithouFreSpacExt" },
  ],
  luks: [{ at: 0, magic: "LUKS\xba\xbe" }],
  vmdk: [
    { at: 0, magic: "KDMV" },
    { at: 0, magic: "COWD" },
    { at: 0, magic: "# Disk DescriptorFile" },
  ],
  vpc: [{ at: 0, magic: "conectix" }, { at: -512, magic: "conectix" }],
  cloop: [
    { at: 11, magic: "V2.0" },
    { at: 11, magic: "V4.0" },
    { at: -136 + 11, magic: "V4.0" },
  ],
  cow: [{ at: 0, magic: "OOOM" }],
  bochs: [{ at: 0, magic: "Bochs Virtual HD Image\0" }],
  dmg: [{ at: -512, magic: "koly" }, { at: 0, magic: "encrcdsa" }],
};

/**
 * True when `bytes` carry one of `format`'s signatures (see
 * {@linkcode SIGNATURES}); formats not listed there are asked through
 * their driver's probe.
 */
export async function carriesSignature(
  format: string,
  bytes: Uint8Array,
): Promise<boolean> {
  const known = SIGNATURES[format];
  if (!known) {
    if (format === "raw") return false;
    return driver(format).probe(await probeInput(fromBytes(bytes))) > 0;
  }
  return known.some(({ at, magic }) => {
    const start = at < 0 ? bytes.length + at : at;
    if (start < 0 || start + magic.length > bytes.length) return false;
    for (let i = 0; i < magic.length; i++) {
      if (bytes[start + i] !== magic.charCodeAt(i)) return false;
    }
    return true;
  });
}

/** xorshift32: the same seed gives the same mutants. */
export function rng(seed: number) {
  let x = seed >>> 0 || 1;
  const next = () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
  return { next, below: (n: number) => next() % Math.max(1, n) };
}

const HUGE = [0xffffffff, 0x80000000, 0x7fffffff, 0, 1, 0x40000000, 0xfffffe00];

/** Applies one random mutation; returns the mutant and a description. */
export function mutate(
  bytes: Uint8Array,
  random: ReturnType<typeof rng>,
): { bytes: Uint8Array; what: string } {
  const out = bytes.slice();
  const n = out.length;
  // Headers and trailers hold what drivers validate: aim most mutations there.
  const region = () => {
    const r = random.below(3);
    if (r === 0) return random.below(Math.min(n, 4096));
    if (r === 1) return Math.max(0, n - 1 - random.below(Math.min(n, 4096)));
    return random.below(n);
  };
  switch (random.below(7)) {
    case 0: {
      const flips = 1 + random.below(8);
      for (let i = 0; i < flips; i++) out[region()] ^= 1 << random.below(8);
      return { bytes: out, what: `${flips} bit flips` };
    }
    case 1: {
      const length = random.below(2)
        ? random.below(Math.min(n, 8192))
        : random.below(n);
      return { bytes: out.slice(0, length), what: `truncated to ${length}` };
    }
    case 2:
    case 3: {
      const at = region() & ~3;
      const value = HUGE[random.below(HUGE.length)];
      const big = random.below(2) === 0;
      const view = new DataView(out.buffer);
      if (at + 4 <= n) view.setUint32(at, value, big === false);
      return { bytes: out, what: `u32 ${value.toString(16)} at ${at}` };
    }
    case 4: {
      const at = region() & ~7;
      const view = new DataView(out.buffer);
      const value = [
        0xffffffffffffffffn,
        0x7fffffffffffffffn,
        1n << 40n,
        0n,
      ][random.below(4)];
      if (at + 8 <= n) view.setBigUint64(at, value, random.below(2) === 0);
      return { bytes: out, what: `u64 ${value.toString(16)} at ${at}` };
    }
    case 5: {
      // Self-reference: copy a field over another, so tables point at tables.
      const from = region() & ~3;
      const to = region() & ~3;
      if (from + 8 <= n && to + 8 <= n) out.copyWithin(to, from, from + 8);
      return { bytes: out, what: `copied 8 bytes ${from} -> ${to}` };
    }
    default: {
      const at = region();
      const length = 1 + random.below(512);
      out.fill(random.below(2) ? 0 : 0xff, at, Math.min(n, at + length));
      return { bytes: out, what: `filled ${length} at ${at}` };
    }
  }
}

/** Seeds: the reference images (when ../shared is there) and images the installed tools make. */
export async function seeds(cacheDir: string): Promise<Seed[]> {
  // Formats only recognised are seeds too: their mutants must be refused
  // by name, or read as raw only once their signature is gone.
  const known = new Set(formats({ recognised: true }).map((d) => d.name));
  const out: Seed[] = [];
  for (const image of referenceImages()) {
    if (!known.has(image.format)) continue;
    const bytes = await referenceBytes(image.path);
    if (bytes && bytes.length <= 4 << 20) {
      out.push({ name: image.path, format: image.format, bytes });
    }
  }
  // Apple's sparse and floppy formats, made by the tests' own writers.
  for (const seed of appleSeeds()) {
    if (known.has(seed.format)) out.push(seed);
  }
  await Deno.mkdir(cacheDir, { recursive: true });
  const base = `${cacheDir}/base.raw`;
  const made: { name: string; format: string; tools: string[]; cmd: string }[] =
    [
      {
        name: "qcow",
        format: "qcow",
        tools: ["qemu-img"],
        cmd: `qemu-img convert -f raw -O qcow ${base} OUT`,
      },
      {
        name: "qcow-c",
        format: "qcow",
        tools: ["qemu-img"],
        // qemu-img 7.2 exits 1 after writing a correct compressed qcow.
        cmd: `qemu-img convert -c -f raw -O qcow ${base} OUT; test -s OUT`,
      },
      {
        name: "qcow2",
        format: "qcow2",
        tools: ["qemu-img"],
        cmd: `qemu-img convert -f raw -O qcow2 -o cluster_size=4k ${base} OUT`,
      },
      {
        name: "qcow2-c",
        format: "qcow2",
        tools: ["qemu-img"],
        cmd:
          `qemu-img convert -c -f raw -O qcow2 -o cluster_size=4k ${base} OUT`,
      },
      {
        name: "qcow2-v2-512",
        format: "qcow2",
        tools: ["qemu-img"],
        cmd:
          `qemu-img convert -f raw -O qcow2 -o compat=0.10,cluster_size=512 ${base} OUT`,
      },
      {
        name: "qcow2-extended-l2",
        format: "qcow2",
        tools: ["qemu-img", "qemu-io"],
        cmd:
          `qemu-img convert -f raw -O qcow2 -o extended_l2=on,cluster_size=16k ${base} OUT && qemu-io -f qcow2 -c 'write -z 8k 4k' -c 'discard 64k 1k' OUT`,
      },
      {
        name: "qcow2-snapshot",
        format: "qcow2",
        tools: ["qemu-img", "qemu-io"],
        cmd:
          `qemu-img convert -f raw -O qcow2 -o cluster_size=4k ${base} OUT && qemu-img snapshot -c s1 OUT && qemu-io -f qcow2 -c 'write -P 7 0 8k' OUT`,
      },
      {
        name: "qcow2-ours-c",
        format: "qcow2",
        tools: [],
        cmd: `${Deno.execPath()} run -A ${
          new URL("../cli.ts", import.meta.url).pathname
        } convert -c -O qcow2 -o cluster_size=4k,refcount_bits=1 ${base} OUT`,
      },
      {
        name: "qcow2-zstd",
        format: "qcow2",
        tools: ["qemu-img"],
        cmd:
          `qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd,cluster_size=4k ${base} OUT`,
      },
      {
        name: "qcow2-ours-zstd",
        format: "qcow2",
        tools: [],
        cmd: `${Deno.execPath()} run -A ${
          new URL("../cli.ts", import.meta.url).pathname
        } convert -c -O qcow2 -o compression_type=zstd,cluster_size=4k ${base} OUT`,
      },
      {
        name: "vmdk",
        format: "vmdk",
        tools: ["qemu-img"],
        cmd: `qemu-img convert -f raw -O vmdk ${base} OUT`,
      },
      {
        name: "vmdk-so",
        format: "vmdk",
        tools: ["qemu-img"],
        cmd:
          `qemu-img convert -f raw -O vmdk -o subformat=streamOptimized ${base} OUT`,
      },
      {
        name: "vpc",
        format: "vpc",
        tools: ["qemu-img"],
        cmd: `qemu-img convert -f raw -O vpc ${base} OUT`,
      },
      {
        name: "vpc-fixed",
        format: "vpc",
        tools: ["qemu-img"],
        cmd: `qemu-img convert -f raw -O vpc -o subformat=fixed ${base} OUT`,
      },
      {
        name: "vdi",
        format: "vdi",
        tools: ["qemu-img"],
        cmd: `qemu-img convert -f raw -O vdi ${base} OUT`,
      },
      {
        name: "vdi-static",
        format: "vdi",
        tools: ["qemu-img"],
        cmd: `qemu-img convert -f raw -O vdi -o static=on ${base} OUT`,
      },
      {
        // qemu-img's smallest vhdx is 9 MiB; ours is 5 MiB.
        name: "vhdx",
        format: "vhdx",
        tools: [],
        cmd: `${Deno.execPath()} run -A ${
          new URL("../cli.ts", import.meta.url).pathname
        } convert -O vhdx -o block_size=1M ${base} OUT`,
      },
      {
        name: "qed",
        format: "qed",
        tools: ["qemu-img"],
        cmd:
          `qemu-img convert -f raw -O qed -o cluster_size=4K,table_size=2 ${base} OUT`,
      },
      {
        name: "parallels",
        format: "parallels",
        tools: ["qemu-img"],
        cmd:
          `qemu-img convert -f raw -O parallels -o cluster_size=64K ${base} OUT`,
      },
      {
        name: "cloop",
        format: "cloop",
        tools: ["create_compressed_fs"],
        cmd: `create_compressed_fs -B 16384 ${base} OUT`,
      },
      {
        name: "cow",
        format: "cow",
        tools: ["uml_mkcow"],
        cmd: `uml_mkcow -f OUT ${base}`,
      },
      {
        name: "bochs",
        format: "bochs",
        tools: ["bximage"],
        cmd: `bximage -func=create -hd=10M -imgmode=growing -q OUT`,
      },
      ...["qcow2", "qed", "vdi", "parallels"].map((format) => ({
        name: format,
        format,
        tools: ["qemu-img"],
        cmd: `qemu-img convert -f raw -O ${format} ${base} OUT`,
      })),
      {
        name: "dmg",
        format: "dmg",
        tools: [],
        cmd: `${Deno.execPath()} run -A ${
          new URL("../cli.ts", import.meta.url).pathname
        } convert -O dmg ${base} OUT`,
      },
    ];
  const disk = new Uint8Array(1 << 20);
  for (let i = 0; i < disk.length; i += 3) disk[i] = (i * 31) & 0xff;
  disk.fill(0, 300_000, 700_000);
  await Deno.writeFile(base, disk);
  for (const m of made) {
    if (!known.has(m.format) || !m.tools.every(have)) continue;
    const path = `${cacheDir}/${m.name}.img`;
    try {
      await Deno.stat(path);
    } catch {
      const r = await run("sh", [
        "-c",
        `${m.cmd.replaceAll("OUT", path)} >/dev/null 2>&1`,
      ], { allowFail: true });
      if (r.code !== 0) continue;
    }
    const bytes = await Deno.readFile(path);
    // A vhdx holds at least 4 MiB of structure (headers, log, metadata,
    // BAT, each a whole MiB) before its first block.
    if (bytes.length <= (m.format === "vhdx" ? 6 << 20 : 4 << 20)) {
      out.push({ name: `made:${m.name}`, format: m.format, bytes });
    }
  }
  // Encrypted dmgs around the dmg seed, made by the tests' writer (fresh
  // keys each run: the mutations, not the bytes, are what is seeded).
  const inner = out.find((s) => s.name === "made:dmg");
  if (inner && known.has("dmg-encrypted")) {
    const key = "fuzz";
    out.push({
      name: "made:dmg-encrypted",
      format: "dmg-encrypted",
      key,
      bytes: (await encryptDmg(inner.bytes, {
        password: key,
        keyBits: 256,
        iterations: 1000,
      })).bytes,
    });
    out.push({
      name: "made:dmg-encrypted-v1",
      format: "dmg-encrypted",
      key,
      bytes: encryptDmgV1(inner.bytes, { password: key }).bytes,
    });
  }
  if (known.has("sparsebundle")) {
    // An encrypted sparse bundle: its token (the encrcdsa header and key
    // records) is mutated, the bundle's other files are beside it.
    const key = "fuzz";
    const { files } = await encryptSparsebundle(seedDisk(1 << 20), {
      password: key,
      keyBits: 256,
      bandSize: 64 << 10,
      trim: true,
    });
    const parts: Record<string, Uint8Array> = {};
    for (const [path, bytes] of Object.entries(files)) {
      if (bytes && path !== "token") parts[path] = bytes;
    }
    out.push({
      name: "made:sparsebundle-encrypted-token",
      format: "sparsebundle",
      key,
      bytes: files.token!,
      parts,
    });
  }
  if (inner) {
    // A segmented dmg: the first file is mutated, its parts are beside it.
    const view = new DataView(inner.bytes.buffer, inner.bytes.byteOffset);
    const fork = Number(view.getBigUint64(inner.bytes.length - 512 + 32));
    const [first, ...rest] = segmentDmg(
      inner.bytes,
      [Math.floor(fork / 3) + 5, Math.floor((2 * fork) / 3) + 9],
      "fuzz",
    );
    out.push({
      name: "made:dmg-segmented",
      format: "dmg",
      bytes: first.bytes,
      fileName: first.name,
      parts: Object.fromEntries(rest.map((p) => [p.name, p.bytes])),
    });
  }
  return out;
}

/** Options for {@linkcode fuzz}. */
export interface FuzzOptions {
  seed: number;
  mutants: number;
  /** Per-mutant time limit. @default 10000 */
  timeoutMs?: number;
  /** Resident memory the process may reach. @default 1 GiB */
  memoryCeiling?: number;
  onProgress?: (done: number) => void;
}

/** Runs `mutants` mutants spread over the seeds. */
export async function fuzz(
  all: Seed[],
  options: FuzzOptions,
): Promise<FuzzReport> {
  const random = rng(options.seed);
  const timeoutMs = options.timeoutMs ?? 10_000;
  const ceiling = options.memoryCeiling ?? 1 << 30;
  const report: FuzzReport = {
    mutants: 0,
    ok: 0,
    typed: 0,
    signed: 0,
    defects: [],
    byFormat: {},
  };
  let worker: Worker | undefined;
  let nextId = 1;
  const spawn = () =>
    new Worker(new URL("./_fuzz_worker.ts", import.meta.url), {
      type: "module",
    });
  for (let i = 0; i < options.mutants; i++) {
    const seed = all[i % all.length];
    const { bytes, what } = mutate(seed.bytes, random);
    // One in four mutants is probed rather than opened as its format.
    const format = random.below(4) === 0 ? undefined : seed.format;
    // Does the mutant still carry its seed's signature? Then probing must
    // never choose raw for it, and opening it probed must not read it as raw.
    const signed = await carriesSignature(seed.format, bytes);
    const probedAs = signed
      ? (await probe(fromBytes(bytes, "mutant")))[0]?.format
      : undefined;
    if (signed) report.signed++;
    type Outcome = { outcome: string; error?: string; stack?: string };
    const attempt = () => {
      worker ??= spawn();
      const id = nextId++;
      const w = worker;
      return new Promise<Outcome>((resolve) => {
        if (probedAs === "raw") {
          resolve({
            outcome: "signature-as-raw",
            error:
              `the ${seed.format} signature is there, and probing chose raw`,
          });
          return;
        }
        const timer = setTimeout(
          () =>
            resolve({
              outcome: "timeout",
              error: `no answer in ${timeoutMs} ms`,
            }),
          timeoutMs,
        );
        const memory = setInterval(() => {
          const rss = Deno.memoryUsage().rss;
          if (rss > ceiling) {
            resolve({
              outcome: "memory",
              error: `resident memory ${rss} over ${ceiling}`,
            });
          }
        }, 20);
        w.onmessage = ({ data }) => {
          if (data.id !== id) return;
          clearTimeout(timer);
          clearInterval(memory);
          resolve(data);
        };
        w.onerror = (e) => {
          e.preventDefault();
          clearTimeout(timer);
          clearInterval(memory);
          resolve({ outcome: "defect", error: `worker error: ${e.message}` });
        };
        w.postMessage({
          id,
          bytes,
          format,
          key: seed.key,
          name: seed.fileName,
          parts: seed.parts,
        });
      });
    };
    /** Kills the worker and lets its memory go before the next measure. */
    const replaceWorker = async () => {
      worker?.terminate();
      worker = undefined;
      (globalThis as { gc?: () => void }).gc?.();
      for (let t = 0; t < 50 && Deno.memoryUsage().rss > ceiling / 2; t++) {
        await new Promise((r) => setTimeout(r, 100));
      }
    };
    let outcome = await attempt();
    if (outcome.outcome === "memory") {
      // The ceiling is the process's resident size, which also holds what
      // earlier mutants left for the collector: the mutant is run again in
      // a fresh worker, and only a second excess is its own.
      await replaceWorker();
      outcome = await attempt();
    }
    if (
      signed && format === undefined && outcome.outcome === "ok" &&
      (outcome as { format?: string }).format === "raw"
    ) {
      outcome.outcome = "signature-as-raw";
      outcome.error =
        `the ${seed.format} signature is there, and open read it as raw`;
    }
    const stats = report.byFormat[seed.format] ??= {
      mutants: 0,
      ok: 0,
      typed: 0,
      defects: 0,
    };
    report.mutants++;
    stats.mutants++;
    if (outcome.outcome === "ok") {
      report.ok++;
      stats.ok++;
    } else if (outcome.outcome === "typed") {
      report.typed++;
      stats.typed++;
    } else {
      stats.defects++;
      report.defects.push({
        seed: seed.name,
        mutation: `${what}${format ? ` (opened as ${format})` : " (probed)"}`,
        kind: outcome.outcome === "timeout"
          ? "timeout"
          : outcome.outcome === "memory"
          ? "memory"
          : outcome.outcome === "signature-as-raw"
          ? "signature-as-raw"
          : "exception",
        error: `${outcome.error}${outcome.stack ? `\n${outcome.stack}` : ""}`,
        bytes,
      });
      if (outcome.outcome === "timeout" || outcome.outcome === "memory") {
        // A hung or bloated worker is killed and replaced, and its memory
        // let go, so one bloated mutant is not blamed on the next ones.
        await replaceWorker();
      }
    }
    options.onProgress?.(i + 1);
  }
  worker?.terminate();
  return report;
}
