import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  assertQemuIdentical,
  cli,
  pseudoRandom,
  ROOT,
  run,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

/** Writes a sparse raw disk with data, holes and an unaligned tail; returns its path. */
async function sparseRaw(dir: string, tail = 700): Promise<string> {
  const path = `${dir}/disk.raw`;
  const file = await Deno.open(path, { write: true, create: true });
  await file.truncate(8 * 1024 * 1024 + tail);
  await file.seek(70_000, Deno.SeekMode.Start);
  await file.write(pseudoRandom(200_000, 11));
  await file.seek(8 * 1024 * 1024, Deno.SeekMode.Start);
  await file.write(pseudoRandom(tail, 12));
  file.close();
  return path;
}

/** The names in a folder. */
function names(dir: string): string[] {
  return [...Deno.readDirSync(dir)].map((e) => e.name).sort();
}

Deno.test("convert round-trips a raw disk byte-identical, sparse, to a file", async () => {
  await withTemp(async (dir) => {
    const input = await sparseRaw(dir);
    const before = await sha256File(input);
    const r = await cli(["convert", "-O", "raw", input, `${dir}/out.raw`]);
    assertEquals(r.code, 0, r.stderr);
    assertEquals(await sha256File(`${dir}/out.raw`), before);
    assertEquals(await sha256File(input), before, "the input was modified");
    const stat = await Deno.stat(`${dir}/out.raw`);
    assertEquals(stat.size, 8 * 1024 * 1024 + 700);
    assertTrue(
      stat.blocks! * 512 < 1024 * 1024,
      `not sparse: ${stat.blocks} blocks`,
    );
    assertEquals(names(dir), ["disk.raw", "out.raw"]);
  });
});

Deno.test("convert writes the raw disk to stdout with -", async () => {
  await withTemp(async (dir) => {
    const input = await sparseRaw(dir);
    const r = await cli(["convert", input, "-"]);
    assertEquals(r.code, 0, r.stderr);
    assertEquals(sha256Hex(r.stdout), await sha256File(input));
  });
});

Deno.test("convert -p draws nothing when stderr is not a terminal, --progress=json prints lines for programs, and --hash prints the sha256", async () => {
  await withTemp(async (dir) => {
    const input = await sparseRaw(dir);
    const r = await cli(["convert", "-p", "--hash", input, `${dir}/o.raw`]);
    assertEquals(r.code, 0, r.stderr);
    assertEquals(r.stderr, `sha256 ${await sha256File(input)}\n`);
    const j = await cli(["convert", "--progress=json", input, `${dir}/j.raw`]);
    assertEquals(j.code, 0, j.stderr);
    const lines = j.stderr.trim().split("\n").map((l) => JSON.parse(l));
    const last = lines.at(-1);
    assertEquals([last.command, last.done, last.total, last.percent], [
      "convert",
      8 * 1024 * 1024 + 700,
      8 * 1024 * 1024 + 700,
      100,
    ]);
    assertTrue(typeof last["bytes-per-second"] === "number");
    assertTrue(typeof last["eta-seconds"] === "number");
  });
});

for (const columns of [40, 80, 132]) {
  Deno.test({
    name:
      `convert -p at a ${columns}-column terminal redraws one line in place that fits`,
    ignore: skip(["script", "stty"]),
    async fn() {
      await withTemp(async (dir) => {
        const input = await sparseRaw(dir);
        // A pseudo-terminal of that width, as a person's would be.
        const command =
          `stty cols ${columns}; ${Deno.execPath()} run -A ${ROOT}cli.ts convert -p ${input} ${dir}/o.raw`;
        const r = await run("script", ["-qec", command, "/dev/null"]);
        const text = r.text.replace(/\r\n$/, "");
        assertMatch(text, /100\.0%/);
        assertTrue(!text.slice(0, -1).includes("\n"), JSON.stringify(text));
        for (const line of text.split("\r").filter(Boolean)) {
          const shown = line.replace("\x1b[K", "");
          assertTrue(shown.length < columns, `${shown.length}: ${shown}`);
          assertTrue(line.endsWith("\x1b[K"), JSON.stringify(line));
        }
      });
    },
  });
}

Deno.test({
  name: "info and map print the same JSON as qemu-img for a raw file",
  ignore: skip(["qemu-img"]),
  async fn() {
    await withTemp(async (dir) => {
      // qemu-img rounds a raw file's size up to whole sectors (we keep the
      // exact size), so compare on a sector-aligned disk with a short tail.
      const input = await sparseRaw(dir, 1536);
      const ours = JSON.parse(
        (await cli(["info", "--output=json", input])).text,
      );
      const theirs = JSON.parse(
        (await run("qemu-img", ["info", "--output=json", input])).text,
      );
      for (const key of Object.keys(theirs)) {
        assertEquals(ours[key], theirs[key], `info key ${key}`);
      }
      const ourMap = (await cli(["map", "--output=json", input])).text;
      const theirMap =
        (await run("qemu-img", ["map", "--output=json", input])).text;
      assertEquals(JSON.parse(ourMap), JSON.parse(theirMap));
    });
  },
});

Deno.test({
  name: "qemu-img compare agrees that our raw output equals the input",
  ignore: skip(["qemu-img"]),
  async fn() {
    await withTemp(async (dir) => {
      const input = await sparseRaw(dir);
      assertEquals((await cli(["convert", input, `${dir}/o.raw`])).code, 0);
      await assertQemuIdentical(input, `${dir}/o.raw`, "raw");
    });
  },
});

Deno.test("compare exits 0 for equal images, 1 for different ones", async () => {
  await withTemp(async (dir) => {
    const a = await sparseRaw(dir);
    await Deno.copyFile(a, `${dir}/b.raw`);
    assertEquals((await cli(["compare", a, `${dir}/b.raw`])).code, 0);
    const f = await Deno.open(`${dir}/b.raw`, { write: true });
    await f.seek(5_000_000, Deno.SeekMode.Start);
    await f.write(new Uint8Array([1]));
    f.close();
    const r = await cli(["compare", a, `${dir}/b.raw`]);
    assertEquals(r.code, 1);
    assertMatch(r.text, /mismatch at offset 5000000/);
    assertEquals((await cli(["compare", a, `${dir}/missing`])).code, 2);
  });
});

Deno.test("create makes a sparse raw image of the given size", async () => {
  await withTemp(async (dir) => {
    const r = await cli(["create", "-f", "raw", `${dir}/new.raw`, "3M"]);
    assertEquals(r.code, 0, r.stderr);
    const stat = await Deno.stat(`${dir}/new.raw`);
    assertEquals(stat.size, 3 * 1024 * 1024);
    // A hole, not 3 MiB of written zeros.
    assertEquals(stat.blocks, 0);
  });
});

Deno.test("a missing input is one line on stderr, exit 1, and no output file", async () => {
  await withTemp(async (dir) => {
    const r = await cli(["convert", `${dir}/nope.dmg`, `${dir}/out.raw`]);
    assertEquals(r.code, 1);
    assertEquals(r.stderr.trim().split("\n").length, 1);
    assertMatch(r.stderr, /no such file.*nope\.dmg/);
    assertEquals(names(dir), []);
  });
});

Deno.test("an unknown output format fails before any file is made", async () => {
  await withTemp(async (dir) => {
    const input = await sparseRaw(dir);
    const r = await cli(["convert", "-O", "floppy", input, `${dir}/out`]);
    assertEquals(r.code, 1);
    assertMatch(r.stderr, /unknown format 'floppy'/);
    assertEquals(names(dir), ["disk.raw"]);
  });
});

Deno.test("an unknown input format is one clear line, exit 1", async () => {
  await withTemp(async (dir) => {
    const input = await sparseRaw(dir);
    const r = await cli(["info", "-f", "floppy", input]);
    assertEquals(r.code, 1);
    assertEquals(r.stderr.trim().split("\n").length, 1);
  });
});

Deno.test("unknown subcommands and bad flags are usage errors, exit 2", async () => {
  const r = await cli(["frobnicate"]);
  assertEquals(r.code, 2);
  assertMatch(r.stderr, /unknown command 'frobnicate'/);
  const f = await cli(["info", "--bogus", "x"]);
  assertEquals(f.code, 2);
  assertMatch(f.stderr, /usage:/);
  assertEquals((await cli(["convert", "only-one"])).code, 2);
});

Deno.test("flags take the spellings of node:util parseArgs", async () => {
  await withTemp(async (dir) => {
    // Whole sectors: -c needs a format that compresses, and qcow rounds a
    // disk's size up to a sector.
    const input = await sparseRaw(dir, 1024);
    const sum = await sha256File(input);
    // -Ofmt glued, grouped booleans (-pc), --name=value, `--` before names.
    const a = await cli([
      "convert",
      "-Oqcow",
      "-pc",
      "--format=raw",
      "--",
      input,
      `${dir}/a.qcow`,
    ]);
    assertEquals(a.code, 0, a.stderr);
    assertEquals(a.stderr, ""); // -p draws nothing where stderr is not a terminal
    const back = await cli(["convert", `${dir}/a.qcow`, `${dir}/a.raw`]);
    assertEquals(back.code, 0, back.stderr);
    assertEquals(await sha256File(`${dir}/a.raw`), sum);
    // Values as separate arguments: `-f raw`, `--output-format raw`.
    const b = await cli([
      "convert",
      "-f",
      "raw",
      "--output-format",
      "raw",
      input,
      `${dir}/b.raw`,
    ]);
    assertEquals(b.code, 0, b.stderr);
    assertEquals(await sha256File(`${dir}/b.raw`), sum);
    // A repeatable flag gathers every value: the backing file lies in the
    // second of two allowed folders, then in the first.
    await Deno.mkdir(`${dir}/one`);
    await Deno.mkdir(`${dir}/two`);
    await Deno.mkdir(`${dir}/img`);
    await Deno.writeFile(`${dir}/two/base.raw`, new Uint8Array(1 << 20));
    const made = await cli([
      "create",
      "-f",
      "qcow",
      "-b",
      `${dir}/two/base.raw`,
      `${dir}/img/top.qcow`,
      "1M",
    ]);
    assertEquals(made.code, 0, made.stderr);
    for (const order of [["one", "two"], ["two", "one"]]) {
      const c = await cli([
        "convert",
        "-O",
        "raw",
        "--allow-backing-dir",
        `${dir}/${order[0]}`,
        "--allow-backing-dir",
        `${dir}/${order[1]}`,
        `${dir}/img/top.qcow`,
        `${dir}/c-${order[0]}.raw`,
      ]);
      assertEquals(c.code, 0, `${order}: ${c.stderr}`);
    }
    const refused = await cli([
      "convert",
      "-O",
      "raw",
      "--allow-backing-dir",
      `${dir}/one`,
      `${dir}/img/top.qcow`,
      `${dir}/c-refused.raw`,
    ]);
    assertEquals(refused.code, 1, "the backing file's folder was not allowed");
    for (
      const [args, message] of [
        [
          ["convert", "--hash=yes", input, `${dir}/c.raw`],
          /'--hash' does not take a value/,
        ],
        [
          ["convert", input, `${dir}/c.raw`, "-f"],
          /'-f, --format' needs a value/,
        ],
        [["convert", "--format"], /'--format' needs a value/],
        [["convert", "-px", input, `${dir}/c.raw`], /unknown option '-x'/],
        [
          ["convert", "--no-such", input, `${dir}/c.raw`],
          /unknown option '--no-such'/,
        ],
      ] as const
    ) {
      const r = await cli([...args]);
      assertEquals(r.code, 2, args.join(" "));
      assertMatch(r.stderr, message);
      assertMatch(r.stderr, /usage: /);
    }
    assertEquals(names(dir).includes("c.raw"), false);
  });
});

Deno.test("an unreadable input (a folder) is one clear line, exit 1", async () => {
  await withTemp(async (dir) => {
    const r = await cli(["info", dir]);
    assertEquals(r.code, 1);
    assertEquals(r.stderr.trim().split("\n").length, 1);
    assertTrue(!r.stderr.includes("    at "), "no stack trace");
  });
});

Deno.test("--help prints usage for every command", async () => {
  const r = await cli(["--help"]);
  assertEquals(r.code, 0);
  for (
    const name of ["info", "convert", "map", "create", "compare", "formats"]
  ) {
    assertMatch(r.text, new RegExp(`\\b${name}\\b`));
    const one = await cli([name, "--help"]);
    assertEquals(one.code, 0);
    assertMatch(one.text, /usage:/);
  }
});

Deno.test("formats lists raw", async () => {
  const r = await cli(["formats"]);
  assertMatch(r.text, /^raw /m);
});

Deno.test("a script outside the repo imports mod.ts by file:// URL with --no-config", async () => {
  await withTemp(async (dir) => {
    await Deno.writeTextFile(
      `${dir}/use.ts`,
      `import { convert, fromBytes, memorySink, open } from "${
        new URL("mod.ts", `file://${ROOT}`).href
      }";
const image = await open(fromBytes(new Uint8Array(8192).fill(3)));
const sink = memorySink();
const r = await convert(image, sink, { hash: true });
console.log(image.format, sink.bytes().length, r.sha256);
`,
    );
    const r = await run(Deno.execPath(), [
      "run",
      "--no-config",
      "--allow-read",
      `${dir}/use.ts`,
    ], {
      cwd: dir,
    });
    assertEquals(
      r.text.trim(),
      `raw 8192 ${sha256Hex(new Uint8Array(8192).fill(3))}`,
    );
  });
});

Deno.test({
  name:
    "repeated flags: -o values accumulate as qemu-img's do, a one-value flag given twice with two values is a usage error",
  ignore: skip(["qemu-img"]),
  async fn() {
    await withTemp(async (dir) => {
      const input = await sparseRaw(dir);
      const out = `${dir}/out.qcow2`;
      const r = await cli([
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-o",
        "compat=0.10",
        input,
        out,
      ]);
      assertEquals(r.code, 0, r.stderr);
      const info = JSON.parse(
        (await run("qemu-img", ["info", "--output=json", out])).text,
      );
      assertEquals(info["cluster-size"], 4096);
      assertEquals(info["format-specific"].data.compat, "0.10");
      const twice = await cli([
        "convert",
        "-f",
        "raw",
        "--format=qcow2",
        input,
        `${dir}/x.raw`,
      ]);
      assertEquals(twice.code, 2);
      assertMatch(twice.stderr, /'--format' given twice \("raw" and "qcow2"\)/);
      // The same value twice says the same thing once: accepted.
      const same = await cli(["info", "-f", "raw", "-f", "raw", input]);
      assertEquals(same.code, 0, same.stderr);
    });
  },
});
