// `deno task bench`: times our convert against the reference tools on the
// same machine in the same run, and prints ratios (ours / theirs; below 1 is
// faster). The 1 GiB source disk and the images made from it are built once
// and cached under $TMPDIR/vdisk-bench-<kind>-<size>.
//
//   deno task bench              every case whose driver and peer tool exist
//   deno task bench cloop dmg    only cases whose name contains one of these
//   deno task bench raw qcow2    a case's short name (before " (") selects it alone
//   deno task bench codecs [xz]  the codec micro-bench (tests/bench_codecs.ts)
//   deno task bench browser [dmg] headless chromium against the CLI (tests/bench_browser.ts)
//   BENCH_SIZE_MIB=256 deno task bench   a smaller disk
//   BENCH_DISK=synthetic deno task bench the old word-pattern disk
//
// The default disk is real data: its first half is a tar of /usr/lib
// (system libraries, binaries, text; files sorted by name), then a quarter
// of zeros (a hole) and a quarter of random bytes. The synthetic disk (a
// repeated word pattern that compresses about a hundredfold, zeros and
// random mebibytes) flatters every codec; it stays as a second case.
import { formats } from "../mod.ts";
import { have, pseudoRandom, ROOT, run } from "./_helpers.ts";
import { buildRealDisk } from "./_bench_disk.ts";

if (Deno.args[0] === "codecs") {
  await import("./bench_codecs.ts");
  Deno.exit(0);
}
if (Deno.args[0] === "browser") {
  await import("./bench_browser.ts");
  Deno.exit(0);
}

const MIB = 1024 * 1024;
const SIZE_MIB = Number(Deno.env.get("BENCH_SIZE_MIB") ?? 1024);
const KIND = Deno.env.get("BENCH_DISK") ?? "real";
if (KIND !== "real" && KIND !== "synthetic") {
  throw new Error(`BENCH_DISK=${KIND}: expected real or synthetic`);
}
const DIR = `${
  Deno.env.get("TMPDIR") ?? "/tmp"
}/vdisk-bench-${KIND}-${SIZE_MIB}`;
const RUNS = Number(Deno.env.get("BENCH_RUNS") ?? 3);
const DISK = `${DIR}/disk.raw`;
const CLI = `${ROOT}cli.ts`;
const deno = Deno.execPath();

/**
 * A disk of real files for the compressed cases: a tar of /usr/lib filling
 * three quarters of it, then free space (zeros). A repeated pattern would
 * flatter the decoders (long matches, few literals).
 */
const FILES_DISK = `${DIR}/disk-files.raw`;
async function buildFilesDisk() {
  try {
    if ((await Deno.stat(FILES_DISK)).size === SIZE_MIB * MIB) return;
  } catch { /* build it */ }
  await Deno.mkdir(DIR, { recursive: true });
  console.error(
    `building ${SIZE_MIB} MiB disk of /usr/lib files at ${FILES_DISK}`,
  );
  await run("sh", [
    "-c",
    `tar cf - -C /usr lib 2>/dev/null | head -c ${
      SIZE_MIB * MIB * 3 / 4
    } > ${FILES_DISK}; truncate -s ${SIZE_MIB * MIB} ${FILES_DISK}`,
  ]);
}

/** Builds the bench disk once (real or synthetic); kept between runs. */
async function buildDisk() {
  try {
    if ((await Deno.stat(DISK)).size === SIZE_MIB * MIB) return;
  } catch { /* build it */ }
  await Deno.mkdir(DIR, { recursive: true });
  console.error(`building ${SIZE_MIB} MiB ${KIND} bench disk at ${DISK}`);
  if (KIND === "real") await buildRealDisk(DISK, SIZE_MIB);
  else await buildSyntheticDisk();
}

/** A disk like a real one: compressible "files", zero runs and random bytes. */
async function buildSyntheticDisk() {
  const file = await Deno.open(DISK, {
    write: true,
    create: true,
    truncate: true,
  });
  await file.truncate(SIZE_MIB * MIB);
  const words =
    "the quick brown fox jumps over a lazy dog disk image sector cluster "
      .split(" ");
  const text = new TextEncoder().encode(
    Array.from({ length: 200_000 }, (_, i) => words[(i * 7919) % words.length])
      .join(" "),
  );
  for (let mib = 0; mib < SIZE_MIB; mib++) {
    const kind = mib % 8; // 0-3 text-like, 4-5 zeros (holes), 6 random, 7 mixed
    if (kind === 4 || kind === 5) continue;
    const block = kind === 6
      ? pseudoRandom(MIB, mib + 1)
      : new Uint8Array(MIB).map((_, i) => text[(i + mib * 131) % text.length]);
    if (kind === 7) block.fill(0, 0, MIB / 2);
    await file.seek(mib * MIB, Deno.SeekMode.Start);
    await file.write(block);
  }
  file.close();
}

interface Case {
  name: string;
  /** Our driver that must exist for the case to run. */
  format: string;
  /** Makes the input image (once; cached). */
  make: { path: string; cmd: string[] };
  /** Tools that make the image or compete; missing ones skip the case/peer. */
  needs: string[];
  /** Competing commands converting the input to `OUT` (raw). */
  peers: { name: string; cmd: string[]; tool: string }[];
  /** Our command's extra flags. */
  ours?: string[];
  /** The input's format, when not `format` (a case writing `format`). */
  inputFormat?: string;
  /** Give no `-f`: the input is probed (compressed files are unwrapped so). */
  probe?: boolean;
  /**
   * Compare each peer's output with ours (cmp), and say whether they are
   * the same bytes; by default every case whose outputs are raw (no
   * `sizes`).
   */
  compare?: boolean;
  /** Print the size of each output (the compressing writers' ratio). */
  sizes?: boolean;
  /**
   * A plain copy (the input's data copied as it is stored): each timed
   * run starts from the same page cache (see {@linkcode time}).
   */
  plain?: boolean;
}

// One output per bench process: two benches at once (helpers on one
// machine) must not compare each other's outputs.
const OUT = `${DIR}/out-${Deno.pid}.raw`;
const img = (name: string) => `${DIR}/${name}`;
const ourConvert = (
  fmt: string | undefined,
  input: string,
  out = OUT,
  extra: string[] = [],
) => [
  deno,
  "run",
  "-A",
  CLI,
  "convert",
  ...(fmt ? ["-f", fmt] : []),
  // A case that writes another format says so in `extra` (a second -O is
  // a usage error).
  ...(extra.includes("-O") ? [] : ["-O", "raw"]),
  ...extra,
  input,
  out,
];

const cases: Case[] = [
  {
    name: "raw",
    format: "raw",
    make: { path: DISK, cmd: [] },
    needs: [],
    plain: true,
    peers: [
      {
        name: "qemu-img",
        tool: "qemu-img",
        cmd: ["qemu-img", "convert", "-f", "raw", "-O", "raw", DISK, OUT],
      },
      {
        name: "cp --sparse=always",
        tool: "cp",
        cmd: ["cp", "--sparse=always", DISK, OUT],
      },
    ],
  },
  {
    name: "cloop (create_compressed_fs -B 65536)",
    format: "cloop",
    make: {
      path: img("disk.cloop"),
      cmd: [
        "sh",
        "-c",
        `create_compressed_fs -B 65536 ${DISK} ${
          img("disk.cloop")
        } 2>/dev/null`,
      ],
    },
    needs: ["create_compressed_fs"],
    peers: [
      {
        name: "qemu-img",
        tool: "qemu-img",
        cmd: [
          "qemu-img",
          "convert",
          "-f",
          "cloop",
          "-O",
          "raw",
          img("disk.cloop"),
          OUT,
        ],
      },
      {
        name: "extract_compressed_fs",
        tool: "extract_compressed_fs",
        cmd: ["extract_compressed_fs", img("disk.cloop"), OUT],
      },
    ],
  },
  ...["zlib", "bzip2", "lzfse", "lzma"].map((codec): Case => ({
    name: `dmg ${codec} (our writer, checked by 7zz in the tests)`,
    format: "dmg",
    make: {
      path: img(`disk-${codec}.dmg`),
      cmd: [
        deno,
        "run",
        "-A",
        CLI,
        "convert",
        "-O",
        "dmg",
        "-o",
        `compression=${codec}`,
        DISK,
        img(`disk-${codec}.dmg`),
      ],
    },
    needs: [],
    peers: [
      ...(codec === "zlib"
        ? [{
          name: "qemu-img",
          tool: "qemu-img",
          cmd: [
            "qemu-img",
            "convert",
            "-f",
            "dmg",
            "-O",
            "raw",
            img(`disk-${codec}.dmg`),
            OUT,
          ],
        }]
        : []),
      {
        name: "dmg2img",
        tool: "dmg2img",
        cmd: ["dmg2img", "-s", img(`disk-${codec}.dmg`), OUT],
      },
      {
        name: "7zz",
        tool: "7zz",
        cmd: [
          "sh",
          "-c",
          `7zz x -tdmg -so ${img(`disk-${codec}.dmg`)} > ${OUT}`,
        ],
      },
    ],
  })),
  // Encrypted dmgs around the zlib dmg above (made by the tests' writer):
  // against our convert of the same dmg unencrypted, decryption's cost
  // shows (issue 14: it must not cost more than the decoding). AES-256 is
  // what hdiutil offers by default and no peer reads it; AES-128 in
  // vfdecrypt's layout is decrypted by vfdecrypt (its -k keys) and then
  // extracted by 7zz. Every output is compared with ours.
  ...([["256", "hdiutil", 512], ["128", "vfdecrypt", 4096]] as const).map((
    [bits, layout, chunk],
  ): Case => {
    const input = img(`disk-aes${bits}.dmg`);
    return {
      name: `dmg-encrypted AES-${bits} (${chunk}-byte chunks, zlib inside)`,
      format: "dmg-encrypted",
      make: {
        path: input,
        cmd: [
          "sh",
          "-c",
          `test -e ${
            img("disk-zlib.dmg")
          } || ${deno} run -A ${CLI} convert -O dmg ${DISK} ${
            img("disk-zlib.dmg")
          }; printf bench > ${DIR}/password; ${deno} run -A ${ROOT}tests/_encrypted_dmg_writer.ts ${
            img("disk-zlib.dmg")
          } ${input} bench ${bits} ${layout}`,
        ],
      },
      needs: [],
      ours: ["--key-file", `${DIR}/password`],
      compare: true,
      peers: [
        {
          name: "ours, not encrypted",
          tool: "sh",
          cmd: ourConvert("dmg", img("disk-zlib.dmg")),
        },
        ...(layout === "vfdecrypt"
          ? [{
            name: "vfdecrypt + 7zz",
            tool: "vfdecrypt",
            cmd: [
              "sh",
              "-c",
              `vfdecrypt -i ${input} -o ${DIR}/plain.dmg -k $(cat ${input}.keys) 2>/dev/null && 7zz x -tdmg -so ${DIR}/plain.dmg > ${OUT}; rm -f ${DIR}/plain.dmg`,
            ],
          }]
          : []),
      ],
    };
  }),
  {
    name: "qcow (qemu-img convert -O qcow)",
    format: "qcow",
    make: {
      path: img("disk.qcow"),
      cmd: [
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow",
        DISK,
        img("disk.qcow"),
      ],
    },
    needs: ["qemu-img"],
    peers: [{
      name: "qemu-img",
      tool: "qemu-img",
      cmd: [
        "qemu-img",
        "convert",
        "-f",
        "qcow",
        "-O",
        "raw",
        img("disk.qcow"),
        OUT,
      ],
    }],
  },
  {
    name: "qcow compressed (qemu-img convert -c -O qcow)",
    format: "qcow",
    make: {
      path: img("disk-c.qcow"),
      // qemu-img 7.2 writes a correct compressed qcow, then exits 1 without
      // a message (its closing zero-length compressed write, which the qcow
      // driver refuses): accept that, but only with the image in place.
      cmd: [
        "sh",
        "-c",
        `qemu-img convert -c -f raw -O qcow ${DISK} ${
          img("disk-c.qcow")
        }; test -s ${img("disk-c.qcow")}`,
      ],
    },
    needs: ["qemu-img"],
    peers: [{
      name: "qemu-img",
      tool: "qemu-img",
      cmd: [
        "qemu-img",
        "convert",
        "-f",
        "qcow",
        "-O",
        "raw",
        img("disk-c.qcow"),
        OUT,
      ],
    }],
  },
  ...([false, true].map((compressed) => {
    const path = img(compressed ? "disk-c.qcow2" : "disk.qcow2");
    return {
      name: `qcow2${compressed ? " compressed" : ""} (qemu-img convert${
        compressed ? " -c" : ""
      } -O qcow2)`,
      format: "qcow2",
      make: {
        path,
        cmd: [
          "qemu-img",
          "convert",
          ...(compressed ? ["-c"] : []),
          "-f",
          "raw",
          "-O",
          "qcow2",
          DISK,
          path,
        ],
      },
      needs: ["qemu-img"],
      plain: !compressed,
      peers: [{
        name: "qemu-img",
        tool: "qemu-img",
        cmd: ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, OUT],
      }],
    };
  })),
  {
    // The other way: raw to compressed qcow2 (ours: -O qcow2 -c after -O raw).
    name: "raw to qcow2 -c (qcow2 writer)",
    format: "qcow2",
    make: { path: DISK, cmd: [] },
    needs: ["qemu-img"],
    inputFormat: "raw",
    ours: ["-O", "qcow2", "-c"],
    sizes: true,
    peers: [{
      name: "qemu-img -c",
      tool: "qemu-img",
      cmd: ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", DISK, OUT],
    }],
  },
  {
    name:
      "qcow2 compressed zstd (qemu-img convert -c -o compression_type=zstd)",
    format: "qcow2",
    make: {
      path: img("disk-zstd.qcow2"),
      cmd: [
        "qemu-img",
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        DISK,
        img("disk-zstd.qcow2"),
      ],
    },
    needs: ["qemu-img"],
    peers: [{
      name: "qemu-img",
      tool: "qemu-img",
      cmd: [
        "qemu-img",
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        img("disk-zstd.qcow2"),
        OUT,
      ],
    }],
  },
  {
    // Our zstd encoder against libzstd's, through both writers.
    name: "raw to qcow2 -c zstd (qcow2 writer)",
    format: "qcow2",
    make: { path: DISK, cmd: [] },
    needs: ["qemu-img"],
    inputFormat: "raw",
    ours: ["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
    sizes: true,
    peers: [{
      name: "qemu-img -c zstd",
      tool: "qemu-img",
      cmd: [
        "qemu-img",
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        DISK,
        OUT,
      ],
    }],
  },
  {
    name: "vmdk streamOptimized (qemu-img)",
    format: "vmdk",
    make: {
      path: img("disk-so.vmdk"),
      cmd: [
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        DISK,
        img("disk-so.vmdk"),
      ],
    },
    needs: ["qemu-img"],
    peers: [{
      name: "qemu-img",
      tool: "qemu-img",
      cmd: [
        "qemu-img",
        "convert",
        "-f",
        "vmdk",
        "-O",
        "raw",
        img("disk-so.vmdk"),
        OUT,
      ],
    }],
  },
  {
    name: "vpc dynamic (qemu-img)",
    format: "vpc",
    plain: true,
    make: {
      path: img("disk.vhd"),
      cmd: [
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        DISK,
        img("disk.vhd"),
      ],
    },
    needs: ["qemu-img"],
    peers: [{
      name: "qemu-img",
      tool: "qemu-img",
      cmd: [
        "qemu-img",
        "convert",
        "-f",
        "vpc",
        "-O",
        "raw",
        img("disk.vhd"),
        OUT,
      ],
    }],
  },
  ...[
    { tool: "xz", suffix: "xz", pack: "xz -T0 -6 -c" },
    { tool: "zstd", suffix: "zst", pack: "zstd -q -3 -c" },
    // Read front to back, decoded straight into the output: one xz block
    // (xz -T1), gzip, bzip2 (the .zst above is one frame too).
    { tool: "xz", suffix: "1.xz", pack: "xz -T1 -6 -c" },
    { tool: "gzip", suffix: "gz", pack: "gzip -6 -c" },
    { tool: "bzip2", suffix: "bz2", pack: "bzip2 -9 -c" },
  ].map(({ tool, suffix, pack }): Case => ({
    name: `disk.img.${suffix} (${pack.replace(" -c", "")}, files of /usr/lib)`,
    format: "raw",
    probe: true,
    make: {
      path: img(`disk-files.img.${suffix}`),
      cmd: [
        "sh",
        "-c",
        `${pack} ${FILES_DISK} > ${img(`disk-files.img.${suffix}`)}`,
      ],
    },
    needs: [tool],
    // xz -T0 decodes the blocks on every core, as ours do on the workers;
    // 7-Zip, the peer the issue names where qemu-img does not read the
    // format, reads all four.
    peers: [
      ...(tool === "xz" ? ["-dc", "-T0 -dc"] : ["-dc"]).map((flags) => ({
        name: `${tool} ${flags}`,
        tool,
        cmd: [
          "sh",
          "-c",
          `${tool} ${flags} ${img(`disk-files.img.${suffix}`)} > ${OUT}`,
        ],
      })),
      {
        name: "7zz",
        tool: "7zz",
        cmd: [
          "sh",
          "-c",
          `7zz x -t${tool} -so ${img(`disk-files.img.${suffix}`)} > ${OUT}`,
        ],
      },
    ],
  })),
  ...[["vhdx", "vhdx"], ["vdi", "vdi"], ["qed", "qed"]].map((
    [format, ext],
  ): Case => ({
    name: `${format} (qemu-img convert -O ${format})`,
    format,
    plain: true,
    make: {
      path: img(`disk.${ext}`),
      cmd: [
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        format,
        DISK,
        img(`disk.${ext}`),
      ],
    },
    needs: ["qemu-img"],
    peers: [{
      name: "qemu-img",
      tool: "qemu-img",
      cmd: [
        "qemu-img",
        "convert",
        "-f",
        format,
        "-O",
        "raw",
        img(`disk.${ext}`),
        OUT,
      ],
    }],
  })),
];

/**
 * Whether each timed run of a plain copy starts from a page cache holding
 * the input, the tools and nothing else (BENCH_DROP_CACHES=1, as root:
 * /proc/sys/vm/drop_caches writable).
 */
const DROP_CACHES = Deno.env.get("BENCH_DROP_CACHES") === "1" &&
  await Deno.open("/proc/sys/vm/drop_caches", { write: true }).then(
    (f) => (f.close(), true),
    () => false,
  );

/**
 * Before each timed run of `cmd`: the output removed and every dirty page
 * written (`sync`), so no run pays for the writeback of the one before
 * (at 4 GiB the copies slowed case after case, qemu-img from 0.70 to
 * 2.00 s, while earlier outputs were written back). For a plain copy
 * (`input` given) with {@linkcode DROP_CACHES}, the clean page cache is
 * dropped, the input read again and `cmd` run once untimed, so that each
 * timed run starts with the input and the tool's own files cached (a
 * drop alone left Deno's executable and module cache to be read from the
 * disk: 264-273 ms of wall for 211 ms of CPU) and no earlier output.
 */
async function freshState(cmd: string[], input?: string) {
  await Deno.remove(OUT).catch(() => {});
  await run("sync", []);
  if (input === undefined || !DROP_CACHES) return;
  await Deno.writeTextFile("/proc/sys/vm/drop_caches", "1");
  {
    using file = await Deno.open(input);
    const buffer = new Uint8Array(8 * MIB);
    while (await file.read(buffer) !== null) { /* into the page cache */ }
  }
  await run(cmd[0], cmd.slice(1), { allowFail: true });
  await Deno.remove(OUT).catch(() => {});
  await run("sync", []);
}

/**
 * Wall time of the best of RUNS runs, and, when GNU time is there, the
 * peak RSS (KiB) and the least CPU time (user + system, all threads): on a
 * shared machine the wall clock waits for other people's work, CPU time
 * much less. `input`: a plain copy's, read again before each run (see
 * {@linkcode freshState}).
 */
async function time(
  cmd: string[],
  input?: string,
): Promise<{ seconds: number; rssKiB?: number; cpu?: number }> {
  let best = Infinity;
  let rss: number | undefined;
  let cpu: number | undefined;
  for (let i = 0; i < RUNS; i++) {
    await freshState(cmd, input);
    const timed = have("/usr/bin/time")
      ? ["/usr/bin/time", "-f", "%M %U %S", ...cmd]
      : cmd;
    const start = performance.now();
    const r = await run(timed[0], timed.slice(1), { allowFail: true });
    const seconds = (performance.now() - start) / 1000;
    if (r.code !== 0) {
      throw new Error(`${cmd.join(" ")} failed: ${r.stderr.slice(-400)}`);
    }
    best = Math.min(best, seconds);
    const last = r.stderr.trim().split("\n").pop() ?? "";
    const m = /^(\d+) ([\d.]+) ([\d.]+)$/.exec(last);
    if (m) {
      rss = Math.max(rss ?? 0, Number(m[1]));
      cpu = Math.min(cpu ?? Infinity, Number(m[2]) + Number(m[3]));
    }
  }
  return { seconds: best, rssKiB: rss, cpu };
}

const filters = Deno.args;
const load = (await Deno.readTextFile("/proc/loadavg").catch(() => ""))
  .split(" ").slice(0, 3).join(" ");
const known = new Set(formats().map((d) => d.name));
await buildDisk();
// A filter that is a case's short name (its name before " (": "raw",
// "qcow2", "vpc dynamic") selects that case alone; any other filter selects
// every case whose name contains it ("dmg", "zstd").
const shortName = (c: Case) => c.name.split(" (")[0];
const exact = new Set(
  filters.filter((f) => cases.some((c) => shortName(c) === f)),
);
const selected = (c: Case) =>
  !filters.length ||
  filters.some((f) => exact.has(f) ? shortName(c) === f : c.name.includes(f));
// The disk of files is built when a case that packs it runs (`bench zstd`
// selects the .zst case by its name, "zstd -q -3", too).
if (cases.some((c) => c.name.startsWith("disk.img.") && selected(c))) {
  await buildFilesDisk();
}
console.log(
  `bench: ${SIZE_MIB} MiB ${KIND} disk, best of ${RUNS} runs, output ${OUT}, load average ${load}; sync before each run${
    DROP_CACHES
      ? ", and for plain copies the page cache dropped, the input read again and the command run once untimed"
      : ""
  }`,
);
for (const c of cases) {
  if (!selected(c)) continue;
  if (!known.has(c.format)) {
    console.log(`\n${c.name}: skipped (no ${c.format} driver yet)`);
    continue;
  }
  const missing = c.needs.filter((t) => !have(t));
  if (missing.length) {
    console.log(`\n${c.name}: skipped (${missing.join(", ")} not installed)`);
    continue;
  }
  try {
    await Deno.stat(c.make.path);
  } catch {
    await run(c.make.cmd[0], c.make.cmd.slice(1));
  }
  const size = (await Deno.stat(c.make.path)).size;
  console.log(`\n${c.name}: input ${(size / MIB).toFixed(1)} MiB`);
  const ours = await time(
    ourConvert(
      c.probe ? undefined : c.inputFormat ?? c.format,
      c.make.path,
      OUT,
      c.ours,
    ),
    c.plain ? c.make.path : undefined,
  );
  const rss = (r: { rssKiB?: number; cpu?: number }) =>
    (r.cpu !== undefined ? `, CPU ${r.cpu.toFixed(2)} s` : "") +
    (r.rssKiB ? `, peak RSS ${(r.rssKiB / 1024).toFixed(0)} MiB` : "");
  const cpuRatio = (theirs: { cpu?: number }) =>
    ours.cpu !== undefined && theirs.cpu
      ? `, CPU ours/theirs = ${(ours.cpu / theirs.cpu).toFixed(2)}`
      : "";
  /** The output's size, for cases that print it. */
  const outSize = async () =>
    c.sizes
      ? `, output ${((await Deno.stat(OUT)).size / MIB).toFixed(1)} MiB`
      : "";
  console.log(
    `  ours                   ${ours.seconds.toFixed(2)} s${
      rss(ours)
    }${await outSize()}`,
  );
  const ourOutput = `${OUT}.ours`;
  // Every raw output is compared with ours: a peer that exits 0 with
  // other bytes (dmg2img on LZFSE and LZMA chunks) is no peer.
  const compare = c.compare ?? !c.sizes;
  if (compare) await Deno.rename(OUT, ourOutput);
  /** Whether the peer's output (OUT) holds our bytes. */
  const same = async () => {
    if (!compare) return "";
    const r = await run("cmp", ["-s", ourOutput, OUT], { allowFail: true });
    return r.code === 0
      ? ", same bytes as ours"
      : ", NOT THE SAME BYTES (its time means nothing)";
  };
  for (const p of c.peers) {
    if (!have(p.tool)) {
      console.log(`  ${p.name.padEnd(22)} skipped (not installed)`);
      continue;
    }
    try {
      const theirs = await time(p.cmd, c.plain ? c.make.path : undefined);
      console.log(
        `  ${p.name.padEnd(22)} ${theirs.seconds.toFixed(2)} s${
          rss(theirs)
        }   ours/theirs = ${(ours.seconds / theirs.seconds).toFixed(2)}${
          cpuRatio(theirs)
        }${await outSize()}${await same()}`,
      );
      if (p.name === "ours, not encrypted" && ours.cpu && theirs.cpu) {
        // Issue 14: decryption must not cost more than the decoding does.
        console.log(
          `  decryption: ${(ours.cpu - theirs.cpu).toFixed(2)} s CPU, ${
            (ours.seconds - theirs.seconds).toFixed(2)
          } s wall, beside the ${
            theirs.cpu.toFixed(2)
          } s CPU of converting the dmg inside`,
        );
      }
    } catch (e) {
      console.log(
        `  ${p.name.padEnd(22)} failed: ${(e as Error).message.split("\n")[0]}`,
      );
    }
  }
  await Deno.remove(ourOutput).catch(() => {});
}
await Deno.remove(OUT).catch(() => {});
console.log(
  `\nload average at the end: ${
    (await Deno.readTextFile("/proc/loadavg").catch(() => "")).split(" ")
      .slice(0, 3).join(" ")
  }`,
);
