// The file promises under attack (issue 12, "Files"): backing and extent
// files are checked and used through one handle, outputs never replace
// their inputs, `write` refuses before writing, outputs keep their
// permissions and leave no temporary file, FIFOs are refused, and weak
// keys are warned about.
import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  BackingFileError,
  create,
  createOutputFile,
  fileBackingResolver,
  type FileHandle,
  fileResolver,
  fromFile,
  type Image,
  open,
} from "../mod.ts";
import { main } from "../cli.ts";
import { cli, rejects, sha256File, skip, withTemp } from "./_helpers.ts";

const INSIDE = 0x41; // "A": the bytes of the file inside the image's folder
const SECRET = 0x53; // "S": the bytes of the file outside it

/** A qcow image at `path` of `size` bytes naming `backing` (raw) as its backing file. */
async function qcowOver(path: string, backing: string, size: number) {
  const out = await createOutputFile(path);
  const image = await create("qcow", out, {
    size,
    backingFile: backing,
    backingFormat: "raw",
  });
  await image.flush?.();
  await out.commit();
}

/** Writes `bytes` at `offset` into the image at `path`, through its format. */
async function writeInto(path: string, offset: number, bytes: Uint8Array) {
  const file = await fromFile(path, { write: true });
  const image = await open(file, { writable: true, sink: file });
  await image.write!(offset, bytes);
  await image.flush?.();
  await image.close?.();
}

/** The names in a folder. */
function names(dir: string): string[] {
  return [...Deno.readDirSync(dir)].map((e) => e.name).sort();
}

/** The CLI as a subprocess, killed (and failing the test) after `seconds`. */
async function cliWithin(seconds: number, args: string[]) {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      new URL("../cli.ts", import.meta.url).pathname,
      ...args,
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), seconds * 1000);
  const out = await child.output();
  clearTimeout(timer);
  return {
    code: out.code,
    signal: out.signal,
    stderr: new TextDecoder().decode(out.stderr),
  };
}

/**
 * `dir/vm/sub/base` (INSIDE bytes) and `dir/outside/base` (SECRET bytes),
 * with `dir/vm/link`, a symbolic link to `dir/outside`, ready to be
 * swapped with `dir/vm/sub`.
 */
async function swappableFolder(dir: string, size = 4096) {
  await Deno.mkdir(`${dir}/vm/sub`, { recursive: true });
  await Deno.mkdir(`${dir}/outside`);
  await Deno.writeFile(`${dir}/vm/sub/base`, new Uint8Array(size).fill(INSIDE));
  await Deno.writeFile(
    `${dir}/outside/base`,
    new Uint8Array(size).fill(SECRET),
  );
  await Deno.symlink("../outside", `${dir}/vm/link`);
}

/**
 * A second process that swaps `vm/sub` between the real folder and the
 * link to `outside`, as fast as it can, until killed.
 */
async function startSwapping(dir: string) {
  const script = `${dir}/swap.ts`;
  await Deno.writeTextFile(
    script,
    `const vm = Deno.args[0];
Deno.writeTextFileSync(vm + "/../started", "");
for (;;) {
  try {
    Deno.renameSync(vm + "/sub", vm + "/real");
    Deno.renameSync(vm + "/link", vm + "/sub");
    Deno.renameSync(vm + "/sub", vm + "/link");
    Deno.renameSync(vm + "/real", vm + "/sub");
  } catch { /* keep going */ }
}
`,
  );
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-read", "--allow-write", script, `${dir}/vm`],
    stdout: "null",
    stderr: "null",
  }).spawn();
  for (let i = 0; i < 200; i++) {
    try {
      await Deno.stat(`${dir}/started`);
      break;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return async () => {
    child.kill("SIGKILL");
    await child.status;
  };
}

/**
 * Opens `sub/base` through `resolve` again and again while the folder is
 * swapped; counts the opens that read the inside bytes, those refused,
 * and those that read anything from outside.
 */
async function raceOpens(
  resolve: () => Promise<FileHandle>,
  attempts: number,
  seconds: number,
) {
  const counts = { inside: 0, refused: 0, leaked: 0 };
  const stop = performance.now() + seconds * 1000;
  for (let i = 0; i < attempts && performance.now() < stop; i++) {
    let file: FileHandle;
    try {
      file = await resolve();
    } catch (e) {
      if (
        !(e instanceof BackingFileError) &&
        !(e instanceof Deno.errors.NotFound)
      ) throw e;
      counts.refused++;
      continue;
    }
    try {
      const bytes = await file.read(0, file.size);
      if (bytes.includes(SECRET)) counts.leaked++;
      else counts.inside++;
    } finally {
      await file.close();
    }
  }
  return counts;
}

Deno.test("backing and extent files are checked through the handle opened: a folder swapped for a symbolic link in a loop never leaks a byte from outside", async () => {
  await withTemp(async (dir) => {
    await swappableFolder(dir);
    const top = `${dir}/vm/top.qcow`;
    const image = { name: top } as Image;
    const backing = fileBackingResolver(top);
    const extents = fileResolver(`${dir}/vm/disk.vmdk`);
    const stopSwapping = await startSwapping(dir);
    try {
      const viaBacking = await raceOpens(
        async () => (await backing("sub/base", image)) as FileHandle,
        4000,
        8,
      );
      const viaExtents = await raceOpens(() => extents("sub/base"), 4000, 8);
      for (const counts of [viaBacking, viaExtents]) {
        assertEquals(counts.leaked, 0, JSON.stringify(counts));
        // Both sides of the swap were seen: the test raced.
        assertTrue(
          counts.inside > 0 && counts.refused > 0,
          JSON.stringify(counts),
        );
      }
    } finally {
      await stopSwapping();
    }
  });
});

Deno.test("the same race, in a program without --allow-all (no /proc/self/fd: the walk down from the folder), leaks nothing either", async () => {
  await withTemp(async (dir) => {
    await swappableFolder(dir);
    const script = `${dir}/race.ts`;
    await Deno.writeTextFile(
      script,
      `import { BackingFileError, fileBackingResolver, fileResolver } from "${
        new URL("../mod.ts", import.meta.url).href
      }";
const top = ${JSON.stringify(`${dir}/vm/top.qcow`)};
const backing = fileBackingResolver(top);
const extents = fileResolver(${JSON.stringify(`${dir}/vm/disk.vmdk`)});
const counts = { inside: 0, refused: 0, leaked: 0 };
const stop = performance.now() + 8000;
for (let i = 0; i < 8000 && performance.now() < stop; i++) {
  let file;
  try {
    file = i % 2
      ? await extents("sub/base")
      : await backing("sub/base", { name: top });
  } catch (e) {
    if (!(e instanceof BackingFileError || e instanceof Deno.errors.NotFound)) throw e;
    counts.refused++;
    continue;
  }
  const bytes = await file.read(0, file.size);
  await file.close();
  if (bytes.includes(${SECRET})) counts.leaked++;
  else counts.inside++;
}
console.log(JSON.stringify(counts));
`,
    );
    const stopSwapping = await startSwapping(dir);
    let out;
    try {
      out = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "--no-config",
          "--allow-read",
          "--allow-write",
          script,
        ],
        stdout: "piped",
        stderr: "piped",
      }).output();
    } finally {
      await stopSwapping();
    }
    const text = new TextDecoder().decode(out.stdout);
    assertTrue(out.success, new TextDecoder().decode(out.stderr));
    const counts = JSON.parse(text);
    assertEquals(counts.leaked, 0, text);
    assertTrue(counts.inside > 0 && counts.refused > 0, text);
  });
});

Deno.test("a folder beside the image's, with its name as prefix (vm-evil beside vm), is not inside it", async () => {
  await withTemp(async (dir) => {
    await Deno.mkdir(`${dir}/vm`);
    await Deno.mkdir(`${dir}/vm-evil`);
    await Deno.writeFile(`${dir}/vm-evil/base`, new Uint8Array(512));
    const image = { name: `${dir}/vm/top.qcow` } as Image;
    await rejects(
      () => fileBackingResolver(`${dir}/vm/top.qcow`)("../vm-evil/base", image),
      BackingFileError,
      /outside .*\/vm: refused/,
    );
  });
});

Deno.test("commit writes through the handle it checked: a folder swapped for a link after the check does not redirect the write", async () => {
  await withTemp(async (dir) => {
    await swappableFolder(dir, 65536);
    const top = `${dir}/vm/top.qcow`;
    await qcowOver(top, "sub/base", 65536);
    await writeInto(top, 0, new Uint8Array(512).fill(0x77));
    const secretBefore = await sha256File(`${dir}/outside/base`);
    // The attacker's move, made right after the base is first opened:
    // `sub` becomes a link to `outside` (the real folder moves to `real`).
    const realOpen = Deno.open;
    let swapped = false;
    Deno.open = async (path, options) => {
      const file = await realOpen(path, options);
      if (!swapped && String(path).endsWith("/sub/base")) {
        swapped = true;
        await Deno.rename(`${dir}/vm/sub`, `${dir}/vm/real`);
        await Deno.rename(`${dir}/vm/link`, `${dir}/vm/sub`);
      }
      return file;
    };
    let code: number;
    try {
      code = await main(["commit", top]);
    } finally {
      Deno.open = realOpen;
    }
    assertTrue(swapped);
    assertEquals(code, 0);
    assertEquals(
      await sha256File(`${dir}/outside/base`),
      secretBefore,
      "commit wrote into the file outside",
    );
    const base = await Deno.readFile(`${dir}/vm/real/base`);
    assertEquals(base.subarray(0, 512), new Uint8Array(512).fill(0x77));
  });
});

Deno.test("write refuses a stream larger than the room left on the disk before writing anything (stdin, small and spooled)", async () => {
  await withTemp(async (dir) => {
    const disk = `${dir}/disk.raw`;
    const MiB = 1 << 20;
    await Deno.writeFile(disk, new Uint8Array(8 * MiB));
    const before = await sha256File(disk);
    // A few bytes over, and more than the 4 MiB read before spooling.
    for (
      const [offset, length] of [[0, 9 * MiB], [8 * MiB - 4096, 5000]]
    ) {
      // -f raw: a probed raw disk would also get QEMU's warning on stderr.
      const r = await cli(["write", "-f", "raw", disk, String(offset), "-"], {
        stdin: new Uint8Array(length).fill(1),
      });
      assertEquals(await sha256File(disk), before, "the image was changed");
      assertEquals(r.code, 1, r.stderr);
      assertMatch(
        r.stderr,
        new RegExp(
          `^vdisk write: - does not fit: more than ${
            8 * MiB - offset
          } bytes at ${offset} pass the end of the ${8 * MiB}-byte disk\n$`,
        ),
      );
    }
    // What fits is written, from memory and from the spool file.
    for (const [offset, length] of [[8 * MiB - 4096, 4096], [MiB, 6 * MiB]]) {
      const data = new Uint8Array(length).map((_, i) => i % 251);
      const r = await cli(["write", disk, String(offset), "-"], {
        stdin: data,
      });
      assertEquals(r.code, 0, r.stderr);
      assertEquals(r.text, `wrote ${length} bytes at ${offset}\n`);
      const file = await Deno.open(disk);
      await file.seek(offset, Deno.SeekMode.Start);
      const back = new Uint8Array(length);
      let at = 0;
      while (at < length) at += (await file.read(back.subarray(at)))!;
      file.close();
      assertEquals(back, data);
    }
    const left = [...Deno.readDirSync(Deno.env.get("TMPDIR") ?? "/tmp")]
      .filter((e) => e.name.startsWith("vdisk-write-"));
    assertEquals(left, [], "a spool file was left behind");
  });
});

Deno.test("convert refuses an output that is its input, under any name, or a backing or extent file of it", async () => {
  await withTemp(async (dir) => {
    await Deno.mkdir(`${dir}/vm`);
    await Deno.writeFile(`${dir}/vm/base.raw`, new Uint8Array(65536).fill(3));
    const top = `${dir}/vm/top.qcow`;
    await qcowOver(top, "base.raw", 65536);
    await writeInto(top, 512, new Uint8Array(512).fill(9));
    await Deno.link(top, `${dir}/hard.qcow`);
    await Deno.symlink(top, `${dir}/soft.qcow`);
    await Deno.symlink(`${dir}/vm/base.raw`, `${dir}/soft-base.raw`);
    await Deno.writeFile(`${dir}/vm/ext.raw`, new Uint8Array(1 << 20).fill(5));
    await Deno.writeTextFile(
      `${dir}/vm/disk.vmdk`,
      `# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\nRW 2048 FLAT "ext.raw" 0\n`,
    );
    const hashes = async () =>
      await Promise.all(
        ["base.raw", "top.qcow", "ext.raw", "disk.vmdk"].map((n) =>
          sha256File(`${dir}/vm/${n}`)
        ),
      );
    const before = await hashes();
    const cases: [string, string, RegExp][] = [
      [top, top, /is the input .* \(the same file\): refused/],
      [top, `${dir}/vm/../vm/top.qcow`, /is the input/],
      [top, `${dir}/hard.qcow`, /is the input/],
      [top, `${dir}/soft.qcow`, /is the input/],
      [`${dir}/vm/base.raw`, `${dir}/soft-base.raw`, /is the input/],
      [top, `${dir}/vm/base.raw`, /a file the input .* reads .*: refused/],
      [`${dir}/vm/disk.vmdk`, `${dir}/vm/ext.raw`, /a file the input/],
      [`${dir}/vm/disk.vmdk`, `${dir}/vm/disk.vmdk`, /is the input/],
    ];
    for (const [input, output, message] of cases) {
      const r = await cli(["convert", input, output]);
      assertEquals(r.code, 1, `${input} -> ${output}: ${r.stderr}`);
      assertMatch(r.stderr, message);
      assertEquals(await hashes(), before, `${input} -> ${output}`);
    }
    assertEquals(names(`${dir}/vm`), [
      "base.raw",
      "disk.vmdk",
      "ext.raw",
      "top.qcow",
    ]);
    // Another name is fine.
    const ok = await cli(["convert", top, `${dir}/out.raw`]);
    assertEquals(ok.code, 0, ok.stderr);
  });
});

Deno.test("an output replacing an existing file keeps its permissions (and, as root, its owner)", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/in.raw`, new Uint8Array(65536).fill(7));
    for (const mode of [0o600, 0o640, 0o664]) {
      const out = `${dir}/out-${mode.toString(8)}.raw`;
      await Deno.writeFile(out, new Uint8Array(10));
      await Deno.chmod(out, mode);
      const root = Deno.uid() === 0;
      if (root) await Deno.chown(out, 4321, 8765);
      const r = await cli(["convert", `${dir}/in.raw`, out]);
      assertEquals(r.code, 0, r.stderr);
      const stat = await Deno.stat(out);
      assertEquals(stat.size, 65536);
      assertEquals((stat.mode! & 0o777).toString(8), mode.toString(8));
      if (root) assertEquals([stat.uid, stat.gid], [4321, 8765]);
    }
  });
});

Deno.test("a failed output leaves no temporary file, and its errors name the user's path", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/in.raw`, new Uint8Array(65536).fill(7));
    // The output is a folder.
    await Deno.mkdir(`${dir}/out`);
    const r = await cli(["convert", `${dir}/in.raw`, `${dir}/out`]);
    assertEquals(r.code, 1);
    assertMatch(r.stderr, new RegExp(`${dir}/out`));
    assertEquals(names(dir), ["in.raw", "out"]);
    // The output's folder does not exist.
    const m = await cli(["convert", `${dir}/in.raw`, `${dir}/no/out.raw`]);
    assertEquals(m.code, 1);
    assertEquals(
      m.stderr,
      `vdisk convert: ${dir}/no/out.raw: its folder ${dir}/no/ does not exist\n`,
    );
    // The rename itself fails (a folder appeared at the path meanwhile).
    const out = await createOutputFile(`${dir}/late`);
    await out.write(0, new Uint8Array(512));
    await Deno.mkdir(`${dir}/late`);
    await Deno.writeFile(`${dir}/late/x`, new Uint8Array(1));
    await rejects(
      () => out.commit(),
      Error,
      new RegExp(
        `^${dir}/late: the finished output could not be put in place: `,
      ),
    );
    assertEquals(names(dir), ["in.raw", "late", "out"]);
  });
});

Deno.test({
  name:
    "a FIFO as input image, backing file or extent file is refused at once, never waited on",
  ignore: skip(["mkfifo"]),
  async fn() {
    await withTemp(async (dir) => {
      const mkfifo = async (path: string) => {
        const r = await new Deno.Command("mkfifo", { args: [path] }).output();
        assertTrue(r.success);
      };
      await mkfifo(`${dir}/pipe`);
      const input = await cliWithin(20, ["convert", `${dir}/pipe`, `${dir}/o`]);
      assertEquals([input.code, input.signal], [1, null], input.stderr);
      assertMatch(
        input.stderr,
        /pipe is a FIFO \(named pipe\), not a regular file: .*cat .*pipe > disk\.img/,
      );

      await mkfifo(`${dir}/base.raw`);
      await qcowOver(`${dir}/top.qcow`, "base.raw", 65536);
      const backing = await cliWithin(20, [
        "convert",
        `${dir}/top.qcow`,
        `${dir}/o`,
      ]);
      assertEquals([backing.code, backing.signal], [1, null], backing.stderr);
      assertMatch(
        backing.stderr,
        /names the backing file "base.raw", which is a FIFO \(named pipe\), not a regular file: refused/,
      );

      await mkfifo(`${dir}/ext.raw`);
      await Deno.writeTextFile(
        `${dir}/disk.vmdk`,
        `# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\nRW 2048 FLAT "ext.raw" 0\n`,
      );
      const extent = await cliWithin(20, ["info", `${dir}/disk.vmdk`]);
      assertEquals([extent.code, extent.signal], [1, null], extent.stderr);
      assertMatch(
        extent.stderr,
        /names the file "ext.raw", which is a FIFO \(named pipe\), not a regular file: refused/,
      );
      // A FIFO as output is refused too, not replaced by a file.
      const output = await cliWithin(20, [
        "convert",
        `${dir}/top.qcow`,
        `${dir}/pipe`,
        "--no-backing",
      ]);
      assertEquals([output.code, output.signal], [1, null], output.stderr);
      assertMatch(
        output.stderr,
        /pipe is a FIFO \(named pipe\): outputs are files/,
      );
      assertTrue((await Deno.lstat(`${dir}/pipe`)).isFifo);
      assertEquals(names(dir).filter((n) => n.includes("partial")), []);
    });
  },
});

Deno.test({
  name: "a block device opens as an input (sized by seeking to its end)",
  ignore: (() => {
    try {
      return !Deno.statSync("/dev/loop0").isBlockDevice;
    } catch {
      return true;
    }
  })(),
  async fn() {
    const device = await fromFile("/dev/loop0");
    assertTrue(Number.isSafeInteger(device.size));
    await device.close();
  },
});

Deno.test({
  name:
    "a qcow passphrase longer than the 16 bytes AES uses is warned about, and so is a key file others can read",
  async fn() {
    await withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/in.raw`, new Uint8Array(65536).fill(7));
      const key = `${dir}/key`;
      const long = "twenty-byte-passphr!";
      await Deno.writeTextFile(key, `${long}\n`);
      await Deno.chmod(key, 0o600);
      const made = await cli([
        "convert",
        "-O",
        "qcow",
        "-o",
        "encryption=on",
        "--key-file",
        key,
        `${dir}/in.raw`,
        `${dir}/e.qcow`,
      ]);
      assertEquals(made.code, 0, made.stderr);
      const warning =
        /^vdisk: warning: the passphrase is 20 bytes, and qcow's AES \(of the output\) uses only its first 16, as QEMU does/;
      assertMatch(made.stderr, warning);
      assertEquals(made.stderr.split("\n").length, 2, made.stderr);
      const read = await cli([
        "convert",
        "--key-file",
        key,
        `${dir}/e.qcow`,
        `${dir}/back.raw`,
      ]);
      assertEquals(read.code, 0, read.stderr);
      assertMatch(read.stderr, /passphrase is 20 bytes.*\(of the input\)/);
      assertEquals(
        await sha256File(`${dir}/back.raw`),
        await sha256File(`${dir}/in.raw`),
      );
      // 16 bytes or fewer: no warning; a key file of mode 644: a warning.
      await Deno.writeTextFile(key, "sixteen-bytes-ok\n");
      const quiet = await cli([
        "convert",
        "-O",
        "qcow",
        "-o",
        "encryption=on",
        "--key-file",
        key,
        `${dir}/in.raw`,
        `${dir}/q.qcow`,
      ]);
      assertEquals([quiet.code, quiet.stderr], [0, ""]);
      await Deno.chmod(key, 0o644);
      const open = await cli([
        "convert",
        "--key-file",
        key,
        `${dir}/q.qcow`,
        `${dir}/q.raw`,
      ]);
      assertEquals(open.code, 0, open.stderr);
      assertEquals(
        open.stderr,
        `vdisk: warning: the key file ${key} can be read by others (mode 644): chmod 600 ${key}\n`,
      );
    });
  },
});
