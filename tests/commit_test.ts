import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  commitTo,
  convert,
  type Extent,
  fileBackingResolver,
  fromBytes,
  fromFile,
  type Image,
  memorySink,
  open,
  type Sink,
  snapshot,
} from "../mod.ts";
import {
  assertQemuIdentical,
  cli,
  pseudoRandom,
  rejects,
  ROOT,
  run,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";
import { LAYERED, qemuRaw, qemuWrite } from "./_layers.ts";
import { nullSink } from "./_outcomes.ts";

const MiB = 1 << 20;
/** The vmdk recipes of the chain tests (qemu-img's base and overlay). */
const VMDK = LAYERED.find((l) => l.format === "vmdk")!;

/** The sha256 of an image file's virtual disk, its backing chain followed (or not). */
async function diskHash(path: string, follow = true): Promise<string> {
  const image = await open(await fromFile(path), {
    resolveBacking: follow ? fileBackingResolver(path) : undefined,
  });
  try {
    return (await convert(image, nullSink(), { hash: true })).sha256!;
  } finally {
    await image.close?.();
  }
}

/** The embedded descriptor of a monolithic sparse vmdk (its text, NULs dropped). */
function descriptorText(bytes: Uint8Array): string {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const sector = Number(view.getBigUint64(28, true));
  const sectors = Number(view.getBigUint64(36, true));
  const text = bytes.subarray(sector * 512, (sector + sectors) * 512);
  return new TextDecoder("latin1").decode(text).replace(/\0+$/, "")
    .replace(/^CID=[0-9a-f]+$/m, "CID=(random)");
}

/** qemu-img map's ranges of an image (start, length, data, zero), file offsets left out. */
async function mapShape(path: string): Promise<unknown[]> {
  const entries = JSON.parse(
    (await run("qemu-img", ["map", "--output=json", path])).text,
  ) as { start: number; length: number; data: boolean; zero: boolean }[];
  return entries.map(({ start, length, data, zero }) => ({
    start,
    length,
    data,
    zero,
  }));
}

Deno.test({
  name:
    "commit of a vmdk overlay made by qemu-img and written by qemu-io leaves the base as qemu-img commit does (CID aside)",
  ignore: skip(["qemu-img", "qemu-io"]),
  async fn() {
    await withTemp(async (dir) => {
      for (const side of ["ours", "qemu"]) {
        await Deno.mkdir(`${dir}/${side}`);
      }
      const base = `${dir}/ours/base.vmdk`;
      const top = `${dir}/ours/top.vmdk`;
      await VMDK.createBase(base, 8 * MiB);
      await qemuWrite(base, "vmdk", [[0x11, 0, 3 * MiB], [
        0x12,
        5 * MiB,
        4096,
      ]]);
      await VMDK.createOverlay(top, "base.vmdk", 8 * MiB);
      // Whole grains, part of a grain over the base's data and over a hole.
      await qemuWrite(top, "vmdk", [
        [0x22, 65536, 131072],
        [0x23, 1 * MiB + 1000, 70_000],
        [0x24, 6 * MiB + 512, 512],
        [0x25, 8 * MiB - 65536, 65536],
      ]);
      for (const name of ["base.vmdk", "top.vmdk"]) {
        await Deno.copyFile(`${dir}/ours/${name}`, `${dir}/qemu/${name}`);
      }
      const topBefore = await sha256File(top);
      const chainBefore = await diskHash(top);

      const r = await cli(["commit", top]);
      assertEquals(r.code, 0, r.stderr);
      assertEquals(r.text, "Image committed.\n");
      await run("qemu-img", ["commit", "-q", `${dir}/qemu/top.vmdk`]);

      assertEquals(await sha256File(top), topBefore, "commit wrote the top");
      // qemu-img commit copies with several requests in flight, so the order
      // in which new grains land in the base (and the base's bytes) varies
      // from run to run (4 of 30 runs differ). What must match is the
      // layout: the same file size, the same descriptor (CID aside) and the
      // same allocated and zero ranges, offsets aside.
      const ours = await Deno.readFile(base);
      const theirs = await Deno.readFile(`${dir}/qemu/base.vmdk`);
      assertEquals(ours.length, theirs.length, "base file sizes differ");
      assertEquals(descriptorText(ours), descriptorText(theirs));
      assertEquals(
        await mapShape(base),
        await mapShape(`${dir}/qemu/base.vmdk`),
      );
      assertEquals(await diskHash(base, false), chainBefore);
      assertEquals(await diskHash(top), chainBefore);
      await run("qemu-img", ["check", "-q", base]);
    });
  },
});

for (const layered of LAYERED) {
  Deno.test({
    name:
      `write then commit through the CLI: the ${layered.format} chain reads the file's bytes, then its base alone does`,
    ignore: skip(layered.tools),
    async fn() {
      await withTemp(async (dir) => {
        const size = 4 * MiB;
        const base = `${dir}/base.${layered.ext}`;
        const top = `${dir}/top.${layered.ext}`;
        await layered.createBase(base, size);
        await qemuWrite(base, layered.format, [[0x11, 0, 1 * MiB]]);
        await layered.createOverlay(top, `base.${layered.ext}`, size);
        const expected = await qemuRaw(base, dir);
        const data = pseudoRandom(100_000, 7);
        await Deno.writeFile(`${dir}/data.bin`, data);
        const dataBefore = await sha256File(`${dir}/data.bin`);
        const baseBefore = await sha256File(base);
        // An offset in no sector, grain or block boundary.
        const offset = 512 * 1024 + 100;
        expected.set(data, offset);

        const w = await cli(["write", top, String(offset), `${dir}/data.bin`]);
        assertEquals(w.code, 0, w.stderr);
        assertEquals(w.text, `wrote 100000 bytes at ${offset}\n`);
        assertEquals(
          await sha256File(base),
          baseBefore,
          "write wrote the base",
        );
        assertEquals(await sha256File(`${dir}/data.bin`), dataBefore);
        assertEquals(await diskHash(top), sha256Hex(expected));
        if (layered.qemuOverlays) {
          assertEquals(sha256Hex(await qemuRaw(top, dir)), sha256Hex(expected));
          await run("qemu-img", ["check", "-q", top]);
        }

        const topBefore = await sha256File(top);
        const c = await cli(["commit", top]);
        assertEquals(c.code, 0, c.stderr);
        assertEquals(await sha256File(top), topBefore, "commit wrote the top");
        assertEquals(sha256Hex(await qemuRaw(base, dir)), sha256Hex(expected));
        assertEquals(await diskHash(top), sha256Hex(expected));
        await run("qemu-img", ["check", "-q", base], { allowFail: true });
      });
    },
  });
}

Deno.test({
  name:
    "a commit killed midway leaves the overlay intact, and running it again completes it",
  ignore: skip(["qemu-img", "qemu-io"]),
  async fn() {
    await withTemp(async (dir) => {
      const base = `${dir}/base.vmdk`;
      const top = `${dir}/top.vmdk`;
      await VMDK.createBase(base, 256 * MiB);
      await qemuWrite(base, "vmdk", [[0x11, 0, 64 * MiB]]);
      await VMDK.createOverlay(top, "base.vmdk", 256 * MiB);
      await qemuWrite(top, "vmdk", [
        [0x21, 32 * MiB, 48 * MiB],
        [0x22, 96 * MiB, 48 * MiB],
        [0x23, 200 * MiB, 32 * MiB],
      ]);
      const topBefore = await sha256File(top);
      const chainBefore = await diskHash(top);
      const baseSize = (await Deno.stat(base)).size;

      const child = new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", `${ROOT}cli.ts`, "commit", top],
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      let exited = false;
      const status = child.status.then((s) => {
        exited = true;
        return s;
      });
      // Killed once the base has taken 8 MiB of the 128 MiB to commit.
      while (!exited && (await Deno.stat(base)).size < baseSize + 8 * MiB) {
        await new Promise((resolve) => setTimeout(resolve, 2));
      }
      assertTrue(!exited, "commit finished before it could be killed");
      child.kill("SIGKILL");
      const killed = await status;
      await child.stdout.cancel();
      await child.stderr.cancel();
      assertEquals(killed.signal, "SIGKILL");
      assertTrue(
        await diskHash(base, false) !== chainBefore,
        "the commit had finished before the kill",
      );

      assertEquals(await sha256File(top), topBefore, "the overlay changed");
      assertEquals(
        await diskHash(top),
        chainBefore,
        "the chain reads otherwise",
      );

      const again = await cli(["commit", top]);
      assertEquals(again.code, 0, again.stderr);
      assertEquals(await sha256File(top), topBefore);
      assertEquals(await diskHash(base, false), chainBefore);
      await run("qemu-img", ["check", "-q", base]);
      const compared = await run("qemu-img", ["compare", "-q", top, base], {
        allowFail: true,
      });
      assertEquals(compared.code, 0, compared.stderr);
    });
  },
});

/** A layer with the given runs: data runs read as `fill`. */
function fakeLayer(size: number, runs: Extent[], fill = 0x5a): Image {
  return {
    format: "fake",
    size,
    encrypted: false,
    read: (_offset, length) =>
      Promise.resolve(new Uint8Array(length).fill(fill)),
    async *extents(offset, length) {
      for (const run of runs) {
        const start = Math.max(offset, run.offset);
        const end = Math.min(offset + length, run.offset + run.length);
        if (start < end) yield { ...run, offset: start, length: end - start };
      }
    },
  };
}

Deno.test("commitTo copies data runs, writes zero runs only where the base is not zero, leaves unallocated runs", async () => {
  const baseBytes = new Uint8Array(16384).fill(1, 8192, 12288);
  const base = memorySink(baseBytes);
  const top = fakeLayer(16384, [
    { offset: 0, length: 4096, kind: "data" },
    { offset: 4096, length: 4096, kind: "zero" },
    { offset: 8192, length: 4096, kind: "zero" },
    { offset: 12288, length: 4096, kind: "unallocated" },
  ]);
  const writes: number[] = [];
  const watched: Sink & { read: typeof base.read; size: number } = {
    size: base.size,
    read: base.read.bind(base),
    write(offset, bytes) {
      writes.push(offset);
      return base.write(offset, bytes);
    },
    flush: () => base.flush(),
    close: () => base.close(),
  };
  const result = await commitTo(top, watched);
  assertEquals(result, { dataBytes: 4096, zeroBytes: 4096 });
  assertEquals(writes, [0, 8192]);
  const expected = new Uint8Array(16384).fill(0x5a, 0, 4096);
  assertEquals(base.bytes(), expected);
});

Deno.test("commitTo reports progress up to the top's size and stops on an aborted signal", async () => {
  const size = 8 * MiB;
  const top = fakeLayer(size, [{ offset: 0, length: size, kind: "data" }]);
  const seen: [number, number][] = [];
  await commitTo(top, memorySink(new Uint8Array(size)), {
    blockSize: MiB,
    onProgress: (done, total) => seen.push([done, total]),
  });
  assertEquals(seen[0], [0, size]);
  assertEquals(seen.at(-1), [size, size]);
  assertTrue(seen.every(([d], i) => i === 0 || d >= seen[i - 1][0]));

  const controller = new AbortController();
  const base = memorySink(new Uint8Array(size));
  await rejects(
    () =>
      commitTo(top, base, {
        blockSize: MiB,
        signal: controller.signal,
        onProgress: (done) => done >= 2 * MiB && controller.abort(),
      }),
    Error,
    /abort/i,
  );
  assertTrue(base.bytes()[3 * MiB] === 0, "the abort did not stop it");
});

Deno.test("commitTo refuses a base that cannot be written or is shorter than the top's data", async () => {
  const top = fakeLayer(8192, [{ offset: 4096, length: 4096, kind: "data" }]);
  const readOnly = await open(fromBytes(new Uint8Array(8192)));
  await rejects(() => commitTo(top, readOnly), TypeError, /not writable/);
  await rejects(
    () => commitTo(top, memorySink(new Uint8Array(6000))),
    RangeError,
    /past the end of the base/,
  );
});

Deno.test("commitTo of a snapshot view copies only what was written to it", async () => {
  const original = pseudoRandom(65536, 3);
  const view = snapshot(await open(fromBytes(original)), { clusterSize: 4096 });
  await view.write(10_000, new Uint8Array(10).fill(9));
  const target = memorySink(original);
  const result = await commitTo(view, target);
  assertEquals(result.dataBytes, 4096);
  const expected = original.slice();
  expected.fill(9, 10_000, 10_010);
  assertEquals(target.bytes(), expected);
});

Deno.test("write refuses a file that does not fit before writing anything, and commit an image with no backing file", async () => {
  await withTemp(async (dir) => {
    const disk = `${dir}/disk.raw`;
    await Deno.writeFile(disk, new Uint8Array(8192));
    await Deno.writeFile(`${dir}/data.bin`, new Uint8Array(5000).fill(1));
    const before = await sha256File(disk);
    const w = await cli(["write", disk, "4096", `${dir}/data.bin`]);
    assertEquals(w.code, 1);
    assertEquals(
      w.stderr,
      `vdisk write: ${dir}/data.bin does not fit: 5000 bytes at 4096 pass the end of the 8192-byte disk\n`,
    );
    const c = await cli(["commit", disk]);
    assertEquals(c.code, 1);
    assertEquals(
      c.stderr,
      `vdisk commit: ${disk} has no backing file to commit into\n`,
    );
    assertEquals(await sha256File(disk), before);
    const ok = await cli(["write", disk, "3k", `${dir}/data.bin`]);
    assertEquals(ok.code, 0, ok.stderr);
    const expected = new Uint8Array(8192).fill(1, 3072, 8072);
    assertEquals(await Deno.readFile(disk), expected);
  });
});

// A base in a format written at random (vdi, vhdx): created, written and
// committed into through the CLI.
for (const format of ["vdi", "vhdx"]) {
  Deno.test({
    name:
      `the CLI creates a ${format}, writes into it and commits a qcow overlay into it; qemu-img checks and compares it`,
    ignore: skip(["qemu-img"]),
    fn: () =>
      withTemp(async (dir) => {
        const cli = (...args: string[]) =>
          run(Deno.execPath(), [
            "run",
            "-A",
            new URL("../cli.ts", import.meta.url).pathname,
            ...args,
          ]);
        const expected = new Uint8Array(10 << 20);
        const first = pseudoRandom(3_000_000, 31);
        const second = pseudoRandom(100_000, 32);
        expected.set(first, 1_234_567);
        expected.set(second, 8_000_000);
        await Deno.writeFile(`${dir}/expected.raw`, expected);
        await Deno.writeFile(`${dir}/first`, first);
        await Deno.writeFile(`${dir}/second`, second);
        await cli("create", "-f", format, `${dir}/base.${format}`, "10M");
        await cli("write", `${dir}/base.${format}`, "1234567", `${dir}/first`);
        await cli(
          "create",
          "-f",
          "qcow",
          "-b",
          `base.${format}`,
          "-F",
          format,
          `${dir}/top.qcow`,
          "10M",
        );
        await cli("write", `${dir}/top.qcow`, "8000000", `${dir}/second`);
        await cli("commit", `${dir}/top.qcow`);
        await run("qemu-img", ["check", "-f", format, `${dir}/base.${format}`]);
        await assertQemuIdentical(
          `${dir}/expected.raw`,
          `${dir}/base.${format}`,
          format,
        );
      }),
  });
}
