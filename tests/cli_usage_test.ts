/**
 * The first-hour surprises of the command line (issue 17): options checked
 * by one mechanism for every format, `-o help`, `--output`, `-c`,
 * `--version`, and a reader that goes away.
 */
import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  cli,
  pseudoRandom,
  ROOT,
  run,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";
import { checkWriteOptions, driver, formats, OptionError } from "../mod.ts";
import { rejects } from "./_helpers.ts";

/** The names in a folder. */
function names(dir: string): string[] {
  return [...Deno.readDirSync(dir)].map((e) => e.name).sort();
}

Deno.test("an unknown -o key is refused for every writable format, naming it and the valid ones, and nothing is made", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/in.raw`, pseudoRandom(1 << 20, 3));
    const writable = formats().filter((d) => d.create || d.encode);
    assertTrue(writable.length >= 7, writable.map((d) => d.name).join());
    for (const d of writable) {
      const valid = (d.writeOptions ?? []).map((o) => o.name).join(", ");
      const expected = new RegExp(
        `${d.name}: unknown option 'subformt' \\(valid: ${
          valid ? valid.replace(/\./g, "\\.") : "none"
        }`,
      );
      const converted = await cli([
        "convert",
        "-O",
        d.name,
        "-o",
        "subformt=streamOptimized",
        `${dir}/in.raw`,
        `${dir}/out.${d.name}`,
      ]);
      assertEquals(converted.code, 1, converted.stderr);
      assertMatch(converted.stderr, expected);
      if (d.create) {
        const created = await cli([
          "create",
          "-f",
          d.name,
          "-o",
          "subformt=streamOptimized",
          `${dir}/new.${d.name}`,
          "1M",
        ]);
        assertEquals(created.code, 1, created.stderr);
        assertMatch(created.stderr, expected);
      }
      assertEquals(names(dir), ["in.raw"], `${d.name} left a file`);
    }
  });
});

Deno.test("a value outside an option's set is an OptionError naming the values", async () => {
  await rejects(
    () =>
      Promise.resolve(checkWriteOptions(driver("vmdk"), { subformat: "x" })),
    OptionError,
    /vmdk: option subformat=x is invalid: must be one of monolithicSparse, streamOptimized/,
  );
  await rejects(
    () => Promise.resolve(checkWriteOptions(driver("vpc"), {}, true)),
    OptionError,
    /vpc: this format does not support compression/,
  );
});

Deno.test("-o help and -o ? list each option with its values and default, exit 0, and make nothing", async () => {
  await withTemp(async (dir) => {
    for (const spelling of ["help", "?"]) {
      const r = await cli(["convert", "-O", "dmg", "-o", spelling]);
      assertEquals(r.code, 0, r.stderr);
      assertMatch(r.text, /^Supported options for dmg:\n/);
      assertMatch(
        r.text,
        /compression +chunk codec \(values: raw\|zlib\|bzip2\|lzfse\|lzma\|xz\|adc; default: zlib\)/,
      );
      const c = await cli([
        "create",
        "-f",
        "vpc",
        "-o",
        spelling,
        `${dir}/x.vhd`,
        "1M",
      ]);
      assertEquals(c.code, 0, c.stderr);
      assertMatch(c.text, /force_size .*default: off/);
      const raw = await cli(["create", "-f", "raw", "-o", spelling]);
      assertEquals(raw.text, "Supported options for raw:\n  (none)\n");
    }
    assertEquals(names(dir), []);
  });
});

Deno.test("--output takes human or json only (a usage error, exit 2)", async () => {
  for (const command of ["info", "map"]) {
    const r = await cli([
      command,
      "--output=xml",
      `${ROOT}testdata/demo.dmg`,
    ]);
    assertEquals(r.code, 2, r.stderr);
    assertMatch(r.stderr, /--output=xml: the output is human or json/);
  }
});

Deno.test("-c with a format that cannot compress is an error, as in qemu-img", async () => {
  await withTemp(async (dir) => {
    for (const format of ["raw", "vpc", "cow"]) {
      const r = await cli([
        "convert",
        "-c",
        "-O",
        format,
        `${ROOT}testdata/demo.dmg`,
        `${dir}/out`,
      ]);
      assertEquals(r.code, 1, r.stderr);
      assertMatch(r.stderr, /does not support compression \(-c\)/);
    }
    assertEquals(names(dir), []);
  });
});

Deno.test("--version prints the version deno.json gives, and --help names it", async () => {
  const { version } = JSON.parse(await Deno.readTextFile(`${ROOT}deno.json`));
  for (const flag of ["--version", "-V", "version"]) {
    const r = await cli([flag]);
    assertEquals(r.code, 0);
    assertEquals(r.text, `vdisk ${version}\n`);
  }
  assertMatch((await cli(["--help"])).text, new RegExp(`^vdisk ${version}\n`));
});

Deno.test("a reader that goes away ends convert quietly (141, as SIGPIPE), with no message", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/big.raw`, pseudoRandom(32 << 20, 5));
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        `${ROOT}cli.ts`,
        "convert",
        "-f",
        "raw",
        `${dir}/big.raw`,
        "-",
      ],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const reader = child.stdout.getReader();
    let got = 0;
    while (got < 1000) {
      const { value, done } = await reader.read();
      if (done) break;
      got += value.length;
    }
    await reader.cancel();
    const [status, stderr] = await Promise.all([
      child.status,
      new Response(child.stderr).text(),
    ]);
    assertEquals(stderr, "");
    assertEquals(status.code, 141);
  });
});

Deno.test({
  name:
    "convert -B BACKING stores only what differs from BACKING (zeros over its data included); the chain reads as the input",
  ignore: skip(["qemu-img"]),
  async fn() {
    await withTemp(async (dir) => {
      const MiB = 1 << 20;
      const base = pseudoRandom(4 * MiB, 21);
      const input = base.slice();
      input.set(pseudoRandom(5000, 22), 100_000); // data over data
      input.fill(0, 20 * 65536, 24 * 65536); // zeros over data
      await Deno.writeFile(`${dir}/base.raw`, base);
      await Deno.writeFile(`${dir}/in.raw`, input);
      const r = await cli([
        "convert",
        "-O",
        "qcow",
        "-B",
        "base.raw",
        "-F",
        "raw",
        `${dir}/in.raw`,
        `${dir}/out.qcow`,
      ]);
      assertEquals(r.code, 0, r.stderr);
      const info = JSON.parse(
        (await run("qemu-img", ["info", "--output=json", `${dir}/out.qcow`]))
          .text,
      );
      assertEquals(info["backing-filename"], "base.raw");
      await run("qemu-img", [
        "convert",
        "-O",
        "raw",
        `${dir}/out.qcow`,
        `${dir}/chain.raw`,
      ]);
      assertEquals(
        sha256Hex(await Deno.readFile(`${dir}/chain.raw`)),
        sha256Hex(input),
      );
      // What the overlay holds: the changed bytes' clusters, the zeros' range.
      const map = JSON.parse(
        (await run("qemu-img", [
          "map",
          "--output=json",
          `${dir}/out.qcow`,
        ])).text,
      ) as { start: number; length: number; depth: number }[];
      const own = map.filter((e) => e.depth === 0);
      const held = own.reduce((n, e) => n + e.length, 0);
      assertTrue(held >= 5000 + 4 * 65536 && held <= 8 * 65536, `${held}`);
      for (const e of own) {
        assertTrue(
          e.start + e.length > 100_000 - 8192 && e.start < 24 * 65536,
          JSON.stringify(e),
        );
      }
      // cow: no qemu-img driver since 2.x; our reader follows the chain.
      const c = await cli([
        "convert",
        "-O",
        "cow",
        "-B",
        "base.raw",
        `${dir}/in.raw`,
        `${dir}/out.cow`,
      ]);
      assertEquals(c.code, 0, c.stderr);
      const back = await cli(["convert", `${dir}/out.cow`, `${dir}/cow.raw`]);
      assertEquals(back.code, 0, back.stderr);
      assertEquals(
        sha256Hex(await Deno.readFile(`${dir}/cow.raw`)),
        sha256Hex(input),
      );
      // A sparse file: what it stores, not its length.
      assertTrue(((await Deno.stat(`${dir}/out.cow`)).blocks ?? 0) * 512 < MiB);
      const bare = await cli([
        "convert",
        "-O",
        "cow",
        `${dir}/in.raw`,
        `${dir}/x.cow`,
      ]);
      assertEquals(bare.code, 1);
      assertMatch(bare.stderr, /convert -B BACKING/);
    });
  },
});

Deno.test("error wording: offsets take hex, sizes list their suffixes, a folder suggests fat:, and no API words on the command line", async () => {
  await withTemp(async (dir) => {
    const img = `${dir}/w.raw`;
    assertEquals((await cli(["create", "-f", "raw", img, "64k"])).code, 0);
    await Deno.writeTextFile(`${dir}/hi.txt`, "hi\n");
    const w = await cli(["write", img, "0x1000", `${dir}/hi.txt`]);
    assertEquals(w.code, 0, w.stderr);
    assertEquals(
      (await Deno.readFile(img)).subarray(0x1000, 0x1003),
      new TextEncoder().encode("hi\n"),
    );
    const bad = await cli(["write", img, "12 bytes", `${dir}/hi.txt`]);
    assertEquals(bad.code, 2);
    assertMatch(bad.stderr, /invalid offset '12 bytes': .*hexadecimal with 0x/);
    for (const size of ["12MB", "10E", "1.5.2G"]) {
      const r = await cli(["create", "-f", "raw", `${dir}/x.raw`, size]);
      assertEquals(r.code, 2, size);
      assertMatch(
        r.stderr,
        new RegExp(
          `invalid size '${
            size.replace(/\./g, "\\.")
          }': (a number of bytes, optionally with a suffix k, M, G, T, P or E|at most 2\\^53)`,
        ),
      );
    }
    await Deno.mkdir(`${dir}/folder`);
    const folder = await cli(["info", `${dir}/folder`]);
    assertEquals(folder.code, 1);
    assertMatch(folder.stderr, new RegExp(`name it fat:${dir}/folder[ \\n]`));
    // An encrypted image without a passphrase: the CLI's flag, not { key }.
    const enc = await cli([
      "convert",
      "-O",
      "qcow",
      "-o",
      "encryption=on",
      img,
      `${dir}/e.qcow`,
    ]);
    assertEquals(enc.code, 1);
    assertMatch(enc.stderr, /--key-file FILE/);
    assertTrue(!/\{ key \}|allowDir/.test(enc.stderr), enc.stderr);
    await Deno.writeTextFile(`${dir}/key`, "secret");
    const made = await cli([
      "convert",
      "-O",
      "qcow",
      "-o",
      "encryption=on",
      "--key-file",
      `${dir}/key`,
      img,
      `${dir}/e.qcow`,
    ]);
    assertEquals(made.code, 0, made.stderr);
    const read = await cli(["convert", `${dir}/e.qcow`, `${dir}/out.raw`]);
    assertEquals(read.code, 1);
    assertMatch(
      read.stderr,
      /is encrypted: give its passphrase with --key-file FILE\n$/,
    );
  });
});

Deno.test("info's format details use one key style (qemu-img's kebab-case in JSON, words for people) and no raw NUL bytes", async () => {
  await withTemp(async (dir) => {
    const disk = pseudoRandom(1 << 20, 9);
    await Deno.writeFile(`${dir}/d.raw`, disk);
    const images = [
      `${ROOT}testdata/demo.dmg`,
      `${ROOT}testdata/cloop-7zip-b4096.cloop`,
    ];
    for (const format of ["vpc", "vmdk", "qcow", "cloop", "dmg"]) {
      const out = `${dir}/d.${format}`;
      const r = await cli(["convert", "-O", format, `${dir}/d.raw`, out]);
      assertEquals(r.code, 0, r.stderr);
      images.push(out);
    }
    const keys = (value: unknown, found: string[] = []): string[] => {
      if (Array.isArray(value)) value.forEach((v) => keys(v, found));
      else if (value && typeof value === "object") {
        for (const [k, v] of Object.entries(value)) {
          found.push(k);
          keys(v, found);
        }
      }
      return found;
    };
    for (const image of images) {
      const r = await cli(["info", "--output=json", image]);
      assertEquals(r.code, 0, r.stderr);
      assertTrue(!r.text.includes("\\u0000"), `${image}: a NUL in ${r.text}`);
      const json = JSON.parse(r.text);
      const data = json["format-specific"]?.data ?? {};
      for (const key of keys(data)) {
        assertMatch(key, /^[a-z0-9]+(-[a-z0-9]+)*$/, `${image}: key ${key}`);
      }
      const human = await cli(["info", image]);
      assertTrue(!/^\s+\w+[_-]\w+:/m.test(human.text), human.text);
    }
  });
});

Deno.test({
  name:
    "map of a dynamic vpc gives qemu-img's JSON, file offsets included; a fixed one maps its bytes where they lie",
  ignore: skip(["qemu-img", "qemu-io"]),
  async fn() {
    await withTemp(async (dir) => {
      const vhd = `${dir}/v.vhd`;
      await run("qemu-img", ["create", "-q", "-f", "vpc", vhd, "12M"]);
      await run("qemu-io", [
        "-f",
        "vpc",
        "-c",
        "write -P 1 0 1M",
        "-c",
        "write -P 2 5M 4096",
        "-c",
        "write -P 3 9M 70000",
        vhd,
      ]);
      const theirs = (await run("qemu-img", ["map", "--output=json", vhd]))
        .text;
      const ours = await cli(["map", "--output=json", vhd]);
      assertEquals(ours.code, 0, ours.stderr);
      assertEquals(JSON.parse(ours.text), JSON.parse(theirs));
      assertMatch(ours.text, /"offset": \d+/);
      const human = await cli(["map", vhd]);
      assertMatch(human.text, /^0x0 +0x200000 +0xa00 +/m);

      const fixed = `${dir}/f.vhd`;
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        fixed,
        "4M",
      ]);
      const map = JSON.parse((await cli(["map", "--output=json", fixed])).text);
      for (const e of map) if (e.data) assertEquals(e.offset, e.start);
    });
  },
});

Deno.test({
  name:
    "convert --no-verify (an option for the formats with checksums) opens every format, not only those that take it",
  ignore: skip(["qemu-img", "qemu-io"]),
  async fn() {
    await withTemp(async (dir) => {
      for (
        const format of ["qed", "parallels", "vdi", "vhdx", "vpc", "qcow2"]
      ) {
        const path = `${dir}/d.${format}`;
        await run("qemu-img", ["create", "-q", "-f", format, path, "4M"]);
        await run("qemu-io", ["-f", format, "-c", "write -P 7 4096 64k", path]);
        const r = await cli(["convert", "--no-verify", path, `${dir}/o.raw`]);
        assertEquals(r.code, 0, `${format}: ${r.stderr}`);
        await run("qemu-img", [
          "convert",
          "-f",
          format,
          "-O",
          "raw",
          path,
          `${dir}/q.raw`,
        ]);
        assertEquals(
          sha256Hex(await Deno.readFile(`${dir}/o.raw`)),
          sha256Hex(await Deno.readFile(`${dir}/q.raw`)),
          format,
        );
      }
    });
  },
});
