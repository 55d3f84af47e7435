// convert -n, --target-is-zero, -S and --salvage, against qemu-img doing
// the same to copies of the same files.
import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  convert,
  fromBytes,
  memorySink,
  open,
  salvaging,
  type Source,
} from "../mod.ts";
import {
  cli,
  pseudoRandom,
  rejects,
  run,
  sha256File,
  skip,
  withTemp,
} from "./_helpers.ts";

/** 64 data clusters of 4 KiB (every third random), then 1 MiB of zeros. */
function sample(): Uint8Array {
  const bytes = new Uint8Array(64 * 4096 + (1 << 20));
  for (let i = 0; i < 64; i++) {
    if (i % 3 === 0) bytes.set(pseudoRandom(4096, i + 1), i * 4096);
    else bytes.fill(i + 1, i * 4096, (i + 1) * 4096);
  }
  return bytes;
}

/** Allocated KiB of a file, as du reports them. */
async function allocatedKiB(path: string): Promise<number> {
  return (await Deno.stat(path)).blocks! / 2;
}

Deno.test(
  "convert -n into a larger raw file writes the bytes qemu-img writes",
  {
    ignore: skip(["qemu-img"]),
  },
  async () => {
    await withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/src.raw`, sample());
      const junk = pseudoRandom(2 << 20, 99);
      await Deno.writeFile(`${dir}/ours.raw`, junk);
      await Deno.writeFile(`${dir}/theirs.raw`, junk);
      const r = await cli([
        "convert",
        "-n",
        `${dir}/src.raw`,
        `${dir}/ours.raw`,
      ]);
      assertEquals(r.code, 0, r.stderr);
      await run("qemu-img", [
        "convert",
        "-n",
        "-O",
        "raw",
        `${dir}/src.raw`,
        `${dir}/theirs.raw`,
      ]);
      assertEquals(
        await sha256File(`${dir}/ours.raw`),
        await sha256File(`${dir}/theirs.raw`),
      );
    });
  },
);

Deno.test("convert -n into a qcow image reads as qemu-img's, check clean", {
  ignore: skip(["qemu-img"]),
}, async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/src.raw`, sample());
    for (const name of ["ours", "theirs"]) {
      await run("qemu-img", [
        "create",
        "-f",
        "qcow",
        `${dir}/${name}.qcow`,
        "2M",
      ]);
      // Something to overwrite: zeros of the source must replace it.
      await run("qemu-io", [
        "-c",
        "write -P 0x5a 1M 512k",
        `${dir}/${name}.qcow`,
      ]);
    }
    const r = await cli([
      "convert",
      "-n",
      "-O",
      "qcow",
      `${dir}/src.raw`,
      `${dir}/ours.qcow`,
    ]);
    assertEquals(r.code, 0, r.stderr);
    await run("qemu-img", [
      "convert",
      "-n",
      "-O",
      "qcow",
      `${dir}/src.raw`,
      `${dir}/theirs.qcow`,
    ]);
    const cmp = await run("qemu-img", [
      "compare",
      `${dir}/ours.qcow`,
      `${dir}/theirs.qcow`,
    ], { allowFail: true });
    assertEquals(cmp.code, 0, cmp.text);
  });
});

Deno.test("convert -n into a smaller file fails as qemu-img does, untouched", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/src.raw`, sample());
    const small = pseudoRandom(4096, 5);
    await Deno.writeFile(`${dir}/small.raw`, small);
    const r = await cli([
      "convert",
      "-n",
      `${dir}/src.raw`,
      `${dir}/small.raw`,
    ]);
    assertEquals(r.code, 1);
    assertTrue(/smaller than input/.test(r.stderr), r.stderr);
    assertEquals(await Deno.readFile(`${dir}/small.raw`), small);
  });
});

Deno.test("convert --target-is-zero skips zeros, and needs -n", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/src.raw`, sample());
    // A target that does not read as zeros shows which zeros were skipped.
    await Deno.writeFile(`${dir}/t.raw`, new Uint8Array(2 << 20).fill(0xee));
    const r = await cli([
      "convert",
      "-n",
      "--target-is-zero",
      `${dir}/src.raw`,
      `${dir}/t.raw`,
    ]);
    assertEquals(r.code, 0, r.stderr);
    const out = await Deno.readFile(`${dir}/t.raw`);
    const src = sample();
    assertEquals(out.subarray(0, 64 * 4096), src.subarray(0, 64 * 4096));
    assertEquals(out[64 * 4096], 0xee);
    const bad = await cli([
      "convert",
      "--target-is-zero",
      `${dir}/src.raw`,
      `${dir}/u.raw`,
    ]);
    assertEquals(bad.code, 1);
    assertTrue(/requires use of -n/.test(bad.stderr), bad.stderr);
  });
});

Deno.test(
  "convert -S leaves the holes qemu-img leaves; -S 0 writes every byte",
  {
    ignore: skip(["qemu-img"]),
  },
  async () => {
    await withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/src.raw`, sample());
      for (const size of ["0", "4k", "64k"]) {
        const ours = `${dir}/ours-${size}.raw`,
          theirs = `${dir}/theirs-${size}.raw`;
        const r = await cli(["convert", "-S", size, `${dir}/src.raw`, ours]);
        assertEquals(r.code, 0, r.stderr);
        await run("qemu-img", [
          "convert",
          "-S",
          size,
          `${dir}/src.raw`,
          theirs,
        ]);
        assertEquals(await sha256File(ours), await sha256File(theirs));
        assertEquals(
          await allocatedKiB(ours),
          await allocatedKiB(theirs),
          size,
        );
      }
      const bad = await cli([
        "convert",
        "-S",
        "1000",
        `${dir}/src.raw`,
        `${dir}/x.raw`,
      ]);
      assertEquals(bad.code, 1);
      assertTrue(/multiples of 512/.test(bad.stderr), bad.stderr);
    });
  },
);

Deno.test("convert with sparseSize 0 writes zero runs too", async () => {
  const image = await open(fromBytes(new Uint8Array(8192)));
  const writes: number[] = [];
  const sink = memorySink();
  const counting = {
    ...sink,
    write: (o: number, b: Uint8Array) => {
      writes.push(b.length);
      return sink.write(o, b);
    },
  };
  await convert(image, counting, { sparseSize: 0 });
  assertEquals(writes.reduce((a, b) => a + b, 0), 8192);
});

Deno.test(
  "convert --salvage zeroes the damaged qcow clusters qemu-img zeroes, exit 3",
  {
    ignore: skip(["qemu-img"]),
  },
  async () => {
    await withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/src.raw`, sample());
      // qemu-img 7.2 exits 1 after writing a compressed qcow (v1) image,
      // saying nothing; the image is whole, which compare checks.
      await run("qemu-img", [
        "convert",
        "-c",
        "-O",
        "qcow",
        `${dir}/src.raw`,
        `${dir}/c.qcow`,
      ], { allowFail: true });
      await run("qemu-img", ["compare", `${dir}/src.raw`, `${dir}/c.qcow`]);
      // Break the deflate streams of two compressed clusters (the L2 table
      // says where they are: cluster 1 and cluster 31).
      const file = await Deno.readFile(`${dir}/c.qcow`);
      const view = new DataView(file.buffer);
      const l1 = Number(view.getBigUint64(40));
      const l2 = Number(view.getBigUint64(l1));
      for (const cluster of [1, 31]) {
        const entry = view.getBigUint64(l2 + 8 * cluster);
        assertTrue((entry >> 63n) === 1n, `cluster ${cluster} is compressed`);
        const at = Number(entry & ((1n << 51n) - 1n));
        file.set(new Uint8Array(16).fill(0xff), at);
      }
      await Deno.writeFile(`${dir}/bad.qcow`, file);
      const plain = await cli([
        "convert",
        `${dir}/bad.qcow`,
        `${dir}/fail.raw`,
      ]);
      assertEquals(plain.code, 1, "never hidden without --salvage");
      const r = await cli([
        "convert",
        "--salvage",
        `${dir}/bad.qcow`,
        `${dir}/ours.raw`,
      ]);
      assertEquals(r.code, 3, r.stderr);
      const lines = r.stderr.trim().split("\n");
      assertEquals(lines.length, 2, r.stderr);
      assertTrue(
        /bytes 4096\.\.8192 \(4096 bytes\).*qcow: compressed cluster/.test(
          lines[0],
        ),
        lines[0],
      );
      assertTrue(/bytes 126976\.\.131072/.test(lines[1]), lines[1]);
      await run("qemu-img", [
        "convert",
        "--salvage",
        "-O",
        "raw",
        `${dir}/bad.qcow`,
        `${dir}/theirs.raw`,
      ]);
      assertEquals(
        await sha256File(`${dir}/ours.raw`),
        await sha256File(`${dir}/theirs.raw`),
      );
    });
  },
);

Deno.test("salvaging narrows a failing read to the failing sectors", async () => {
  let reads = 0;
  const broken: Source = {
    size: 1 << 20,
    read(offset, length) {
      reads++;
      // Sectors 10 and 11 fail; everything else reads as 1s.
      return offset < 6144 && offset + length > 5120
        ? Promise.reject(new Error("bad sectors"))
        : Promise.resolve(new Uint8Array(length).fill(1));
    },
  };
  const safe = salvaging(broken);
  const bytes = await safe.read(0, 1 << 20);
  assertEquals(safe.salvaged, [{
    offset: 5120,
    length: 1024,
    cause: "bad sectors",
  }]);
  assertEquals(bytes[5119], 1);
  assertEquals(bytes[5120], 0);
  assertEquals(bytes[6143], 0);
  assertEquals(bytes[6144], 1);
  // Halving: about two reads per level of a 2048-sector read.
  assertTrue(reads < 64, `${reads} reads`);
});

Deno.test("salvaging lets an abort through", async () => {
  const controller = new AbortController();
  const broken: Source = {
    size: 4096,
    read: () => {
      controller.abort();
      return Promise.reject(new DOMException("stop", "AbortError"));
    },
  };
  await rejects(
    () => salvaging(broken, { signal: controller.signal }).read(0, 4096),
    DOMException,
  );
});

Deno.test("salvaging reads past an allocation map that fails part way", async () => {
  const disk: Source = {
    size: 8192,
    read: (_offset, length) => Promise.resolve(new Uint8Array(length).fill(2)),
    async *extents(offset) {
      yield { offset, length: 1024, kind: "zero" as const };
      throw new Error("broken table");
    },
  };
  const sink = memorySink();
  const result = await convert(disk, sink, { salvage: true });
  assertEquals(result.salvaged, []);
  assertEquals(sink.bytes()[0], 0);
  assertEquals(sink.bytes()[1024], 2);
  // Without salvage the same map error fails the conversion.
  await rejects(() => convert(disk, memorySink()), Error, /broken table/);
});

Deno.test(
  "convert -n into vdi, vhdx, vpc and vmdk images qemu-img made: same disk, check clean",
  {
    ignore: skip(["qemu-img", "qemu-io"]),
  },
  async () => {
    await withTemp(async (dir) => {
      const src = sample();
      await Deno.writeFile(`${dir}/src.raw`, src);
      for (const format of ["vdi", "vhdx", "vpc", "vmdk"]) {
        const target = `${dir}/t.${format}`;
        await run("qemu-img", ["create", "-f", format, target, "2M"]);
        await run("qemu-io", [
          "-f",
          format,
          "-c",
          "write -P 0x5a 1M 512k",
          target,
        ]);
        const r = await cli([
          "convert",
          "-n",
          "-O",
          format,
          `${dir}/src.raw`,
          target,
        ]);
        assertEquals(r.code, 0, `${format}: ${r.stderr}`);
        if (format !== "vpc") {
          // qemu-img 7.2 checks no vpc.
          const check = await run("qemu-img", ["check", "-f", format, target]);
          assertTrue(/No errors were found/.test(check.text), check.text);
        }
        await run("qemu-img", [
          "convert",
          "-f",
          format,
          "-O",
          "raw",
          target,
          `${dir}/out.raw`,
        ]);
        const out = await Deno.readFile(`${dir}/out.raw`);
        assertEquals(out.subarray(0, src.length), src, format);
      }
    });
  },
);
