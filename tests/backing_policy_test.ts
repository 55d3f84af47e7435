import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  BackingFileError,
  fileBackingResolver,
  fromFile,
  MAX_BACKING_DEPTH,
  open,
} from "../mod.ts";
import { cli, rejects, run, sha256File, skip, withTemp } from "./_helpers.ts";
import { LAYERED, type LayeredFormat, qemuRaw, qemuWrite } from "./_layers.ts";

const SIZE = 1 << 20;

/** Hashes of every file in a folder tree (symbolic links as their targets' names). */
async function hashes(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const walk = async (at: string) => {
    for await (const e of Deno.readDir(at)) {
      const path = `${at}/${e.name}`;
      if (e.isDirectory) await walk(path);
      else if (e.isSymlink) out[path] = `-> ${await Deno.readLink(path)}`;
      else out[path] = await sha256File(path);
    }
  };
  await walk(dir);
  return out;
}

/** Opens `path` under the policy, as the CLI does. */
async function openChain(path: string, allowDir?: string[]) {
  return await open(await fromFile(path), {
    resolveBacking: fileBackingResolver(path, { allowDir }),
  });
}

/**
 * `dir/vm/top` naming `name` (written as given), with `dir/outside/base`
 * holding data (and `dir/vm/NAME` a symbolic link to it with `link`);
 * returns the paths.
 */
async function outsideChain(
  layered: LayeredFormat,
  dir: string,
  name: (dir: string) => string,
  link = false,
) {
  const { ext, format } = layered;
  await Deno.mkdir(`${dir}/vm`);
  await Deno.mkdir(`${dir}/outside`);
  const base = `${dir}/outside/base.${ext}`;
  await layered.createBase(base, SIZE);
  await qemuWrite(base, format, [[0x5e, 0, 65536]]);
  if (link) await Deno.symlink(base, `${dir}/vm/${name(dir)}`);
  const top = `${dir}/vm/top.${ext}`;
  await layered.createOverlay(top, name(dir), SIZE);
  return { top, base };
}

for (const layered of LAYERED) {
  const { ext, format } = layered;
  const ignore = skip(layered.tools);

  const cases: [string, (dir: string) => string][] = [
    ["an absolute path", (dir) => `${dir}/outside/base.${ext}`],
    ["a ../ path", () => `../outside/base.${ext}`],
  ];
  for (const [what, name] of cases) {
    Deno.test({
      name:
        `a ${format} backing file named by ${what} outside the image's folder is refused, and --allow-backing-dir allows it`,
      ignore,
      async fn() {
        await withTemp(async (dir) => {
          const { top, base } = await outsideChain(layered, dir, name);
          const before = await hashes(dir);
          const e = await rejects(
            () => openChain(top),
            BackingFileError,
            /outside .*: refused: add \S+ to allowDir to allow it$/,
          );
          // The API's words in the API, the command line's on the command line.
          assertMatch(e.message, new RegExp(`add ${dir}/outside to allowDir`));
          assertMatch(
            (e as BackingFileError).cliMessage!,
            new RegExp(`--allow-backing-dir ${dir}/outside to allow it$`),
          );
          for (const command of ["convert", "map", "compare"]) {
            const args = command === "convert"
              ? [top, `${dir}/vm/out.raw`]
              : command === "compare"
              ? [top, base]
              : [top];
            const r = await cli([command, ...args]);
            assertEquals(r.code, command === "compare" ? 2 : 1, r.stderr);
            assertMatch(
              r.stderr,
              /^vdisk \w+: .*refused: pass --allow-backing-dir \S+ to allow it\n$/,
            );
          }
          const allowed = await cli([
            "convert",
            "--allow-backing-dir",
            `${dir}/outside`,
            top,
            `${dir}/vm/out.raw`,
          ]);
          assertEquals(allowed.code, 0, allowed.stderr);
          assertEquals(
            await Deno.readFile(`${dir}/vm/out.raw`),
            await qemuRaw(base, dir),
          );
          await Deno.remove(`${dir}/vm/out.raw`);
          // --no-backing reads the layer alone; info never follows.
          assertEquals((await cli(["map", "--no-backing", top])).code, 0);
          const info = await cli(["info", top]);
          assertEquals(info.code, 0, info.stderr);
          assertMatch(info.text, /backing file: /);
          assertEquals(await hashes(dir), before, "an input was modified");
        });
      },
    });
  }

  Deno.test({
    name:
      `a ${format} backing file that is a symbolic link leading outside the image's folder is refused`,
    ignore,
    async fn() {
      await withTemp(async (dir) => {
        const { top } = await outsideChain(
          layered,
          dir,
          () => `link.${ext}`,
          true,
        );
        const before = await hashes(dir);
        await rejects(
          () => openChain(top),
          BackingFileError,
          new RegExp(
            `"link.${ext}", which leads to ${dir}/outside/base.${ext}, outside`,
          ),
        );
        const r = await cli(["convert", top, `${dir}/vm/out.raw`]);
        assertEquals(r.code, 1);
        assertMatch(r.stderr, /refused: pass --allow-backing-dir/);
        const ok = await cli([
          "compare",
          "--allow-backing-dir",
          `${dir}/outside`,
          top,
          `${dir}/outside/base.${ext}`,
        ]);
        assertEquals(ok.code, 0, ok.stderr);
        assertEquals(await hashes(dir), before, "an input was modified");
      });
    },
  });

  Deno.test({
    name:
      `a ${format} backing file inside the image's folder (or a subfolder) is followed, read-only`,
    ignore,
    async fn() {
      await withTemp(async (dir) => {
        await Deno.mkdir(`${dir}/bases`);
        const base = `${dir}/bases/base.${ext}`;
        await layered.createBase(base, SIZE);
        await qemuWrite(base, format, [[0x5e, 4096, 8192]]);
        const top = `${dir}/top.${ext}`;
        await layered.createOverlay(top, `bases/base.${ext}`, SIZE);
        const before = await hashes(dir);
        const image = await openChain(top);
        assertEquals(image.backing?.name, base);
        assertEquals((await image.read(4096, 1))[0], 0x5e);
        await image.close?.();
        const r = await cli(["compare", top, base]);
        assertEquals(r.code, 0, r.stderr);
        assertEquals(await hashes(dir), before, "an input was modified");
      });
    },
  });

  Deno.test({
    name: `two ${format} images naming each other are a loop, refused`,
    ignore,
    async fn() {
      await withTemp(async (dir) => {
        // b names a; then a new image naming b replaces a.
        await layered.createBase(`${dir}/a.${ext}`, SIZE);
        await layered.createOverlay(`${dir}/b.${ext}`, `a.${ext}`, SIZE);
        await layered.createOverlay(`${dir}/a2.${ext}`, `b.${ext}`, SIZE);
        await Deno.rename(`${dir}/a2.${ext}`, `${dir}/a.${ext}`);
        const before = await hashes(dir);
        await rejects(
          () => openChain(`${dir}/a.${ext}`),
          BackingFileError,
          /backing file loop: /,
        );
        const r = await cli(["convert", `${dir}/a.${ext}`, `${dir}/out.raw`]);
        assertEquals(r.code, 1);
        assertMatch(
          r.stderr,
          /^vdisk convert: backing file loop: .*a\.\w+ -> .*b\.\w+/,
        );
        // Allowing folders does not allow loops.
        const again = await cli([
          "info",
          "--backing-chain",
          "--allow-backing-dir",
          dir,
          `${dir}/a.${ext}`,
        ]);
        assertEquals(again.code, 1);
        assertMatch(again.stderr, /backing file loop/);
        assertEquals(await hashes(dir), before, "an input was modified");
      });
    },
  });

  Deno.test({
    name:
      `a ${format} chain deeper than MAX_BACKING_DEPTH is refused, and one within it is followed`,
    ignore,
    async fn() {
      await withTemp(async (dir) => {
        const count = MAX_BACKING_DEPTH + 3;
        await layered.createBase(`${dir}/c0.${ext}`, SIZE);
        await qemuWrite(`${dir}/c0.${ext}`, format, [[0x33, 0, 512]]);
        for (let i = 1; i < count; i++) {
          await layered.createOverlay(
            `${dir}/c${i}.${ext}`,
            `c${i - 1}.${ext}`,
            SIZE,
          );
        }
        const before = await hashes(dir);
        const deep = `${dir}/c${count - 1}.${ext}`;
        await rejects(
          () => openChain(deep),
          BackingFileError,
          new RegExp(`backing chain deeper than ${MAX_BACKING_DEPTH}: `),
        );
        const r = await cli(["convert", deep, `${dir}/out.raw`]);
        assertEquals(r.code, 1);
        assertMatch(r.stderr, /backing chain deeper than/);
        const shallow = await openChain(`${dir}/c5.${ext}`);
        assertEquals((await shallow.read(0, 1))[0], 0x33);
        await shallow.close?.();
        assertEquals(await hashes(dir), before, "an input was modified");
      });
    },
  });

  Deno.test({
    name:
      `info --backing-chain lists every ${format} layer, in JSON as an array; map gives each run's depth`,
    ignore,
    async fn() {
      await withTemp(async (dir) => {
        await layered.createBase(`${dir}/a.${ext}`, SIZE);
        await qemuWrite(`${dir}/a.${ext}`, format, [[0x11, 0, 262144]]);
        await layered.createOverlay(`${dir}/b.${ext}`, `a.${ext}`, SIZE);
        await layered.createOverlay(`${dir}/c.${ext}`, `b.${ext}`, SIZE);
        const w = await cli(["write", `${dir}/b.${ext}`, "65536", "-"], {
          stdin: new Uint8Array(65536).fill(0x22),
        });
        assertEquals(w.code, 0, w.stderr);
        const before = await hashes(dir);
        const info = await cli([
          "info",
          "--backing-chain",
          "--output=json",
          `${dir}/c.${ext}`,
        ]);
        assertEquals(info.code, 0, info.stderr);
        const layers = JSON.parse(info.text) as Record<string, unknown>[];
        assertEquals(
          layers.map((l) => [l.filename, l.format, l["backing-filename"]]),
          [
            [`${dir}/c.${ext}`, format, `b.${ext}`],
            [`${dir}/b.${ext}`, format, `a.${ext}`],
            [`${dir}/a.${ext}`, format, undefined],
          ],
        );
        const human = await cli(["info", "--backing-chain", `${dir}/c.${ext}`]);
        assertEquals(human.text.match(/^image: /gm)?.length, 3);
        const plain = await cli(["info", "--output=json", `${dir}/c.${ext}`]);
        assertTrue(!Array.isArray(JSON.parse(plain.text)));

        const map = await cli(["map", "--output=json", `${dir}/c.${ext}`]);
        assertEquals(map.code, 0, map.stderr);
        const runs = (JSON.parse(map.text) as Record<string, unknown>[])
          .map((r) => [r.start, r.length, r.depth, r.data]);
        // (How far the base's data run goes is the format's business: a
        // VHD block is data as a whole.)
        assertEquals(runs.slice(0, 2), [
          [0, 65536, 2, true],
          [65536, 65536, 1, true],
        ]);
        assertEquals([runs[2][0], runs[2][2], runs[2][3]], [131072, 2, true]);
        if (layered.qemuOverlays) {
          const reference = await run("qemu-img", [
            "map",
            "--output=json",
            `${dir}/c.${ext}`,
          ]);
          const theirs = (JSON.parse(reference.text) as Record<
            string,
            unknown
          >[]).map((r) => [r.start, r.length, r.depth, r.data]);
          assertEquals(runs, theirs);
        }
        assertEquals(await hashes(dir), before, "an input was modified");
      });
    },
  });
}
