// resize of qcow2 against qemu-img resize on a copy of the same image
// (bytes compared through qemu-img convert, qemu-img check clean, virtual
// sizes equal), and of the formats qemu-img 7.2 does not resize (vpc, vdi,
// vhdx, vmdk: "Image format driver does not support resize"), where
// qemu-img reads the result and check finds it clean.
import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  ImageFormatError,
  memorySink,
  qcow2,
  resizeImage,
  UnsupportedError,
} from "../mod.ts";
import { cli, rejects, run, sha256Hex, skip, withTemp } from "./_helpers.ts";
import { qemuRaw, qemuWrite } from "./_layers.ts";

const MiB = 1 << 20;

/** `qemu-img info --output=json` of an image. */
async function info(path: string, format: string) {
  return JSON.parse(
    (await run("qemu-img", ["info", "-f", format, "--output=json", path]))
      .text,
  );
}

/** Asserts that `qemu-img check` finds nothing wrong (no leak either). */
async function assertClean(path: string, format: string) {
  const r = await run("qemu-img", ["check", "-f", format, path], {
    allowFail: true,
  });
  assertEquals(r.code, 0, `${path}: ${r.text}${r.stderr}`);
  assertTrue(/No errors were found/.test(r.text), r.text);
}

/** Resizes copies with both tools and compares what they read as. */
async function resizeBoth(
  dir: string,
  ours: string,
  theirs: string,
  format: string,
  args: string[],
) {
  const a = await cli(["resize", "-f", format, ours, ...args]);
  assertEquals(a.code, 0, `${args.join(" ")}: ${a.stderr}`);
  // qemu-img takes a negative size only after "--".
  const qemuArgs = [...args];
  const dash = qemuArgs.findIndex((x) => /^-\d/.test(x));
  if (dash >= 0) qemuArgs.splice(dash, 0, "--");
  await run("qemu-img", ["resize", "-f", format, theirs, ...qemuArgs]);
  await assertClean(ours, format);
  assertEquals(
    (await info(ours, format))["virtual-size"],
    (await info(theirs, format))["virtual-size"],
    args.join(" "),
  );
  assertEquals(
    sha256Hex(await qemuRaw(ours, dir, format)),
    sha256Hex(await qemuRaw(theirs, dir, format)),
    `${format} ${args.join(" ")}`,
  );
}

const QCOW2_CASES: { name: string; options: string; compress?: boolean }[] = [
  { name: "64k clusters", options: "cluster_size=65536" },
  // 64 L1 entries a cluster, each 32 KiB of disk: growing moves the table.
  { name: "512-byte clusters", options: "cluster_size=512" },
  { name: "compat 0.10", options: "compat=0.10,cluster_size=4096" },
  {
    name: "extended L2",
    options: "extended_l2=on,cluster_size=16384",
  },
  { name: "1-bit refcounts", options: "refcount_bits=1,cluster_size=4096" },
  { name: "compressed", options: "cluster_size=4096", compress: true },
];

for (const c of QCOW2_CASES) {
  Deno.test(
    `resize of a qcow2 (${c.name}) grows and shrinks as qemu-img resize`,
    { ignore: skip(["qemu-img", "qemu-io"]) },
    async () => {
      await withTemp(async (dir) => {
        const src = `${dir}/src.qcow2`;
        await run("qemu-img", [
          "create",
          "-f",
          "qcow2",
          "-o",
          c.options,
          src,
          "3M",
        ]);
        await qemuWrite(src, "qcow2", [
          [1, 0, 65536],
          [2, 700000, 5000],
          [3, MiB + 4096, 300000],
          [4, 3 * MiB - 8192, 8192],
        ]);
        const ours = `${dir}/ours.qcow2`;
        const theirs = `${dir}/theirs.qcow2`;
        if (c.compress) {
          await run("qemu-img", [
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            c.options,
            src,
            ours,
          ]);
        } else {
          await Deno.copyFile(src, ours);
        }
        await Deno.copyFile(ours, theirs);
        for (
          const args of [
            ["+5M"],
            ["--shrink", "2M"],
            ["--shrink", "-1536k"],
            ["20M"],
            ["--shrink", "1000k"],
            ["+64k"],
          ]
        ) {
          await resizeBoth(dir, ours, theirs, "qcow2", args);
        }
        // Unchanged where nothing was dropped: the first 64 KiB.
        const back = await qemuRaw(ours, dir, "qcow2");
        assertTrue(back.subarray(0, 65536).every((b) => b === 1));
      });
    },
  );
}

Deno.test(
  "resize of a qcow2 overlay keeps its longer backing file out of the new area",
  { ignore: skip(["qemu-img", "qemu-io"]) },
  async () => {
    await withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/base.raw`, new Uint8Array(8 * MiB).fill(5));
      for (const options of ["cluster_size=65536", "extended_l2=on"]) {
        for (const n of ["ours", "theirs"]) {
          await run("qemu-img", [
            "create",
            "-f",
            "qcow2",
            "-o",
            options,
            "-b",
            "base.raw",
            "-F",
            "raw",
            `${dir}/${n}.qcow2`,
            "1M",
          ]);
        }
        await qemuWrite(`${dir}/ours.qcow2`, "qcow2", [[6, 0, 4096]]);
        await qemuWrite(`${dir}/theirs.qcow2`, "qcow2", [[6, 0, 4096]]);
        await resizeBoth(
          dir,
          `${dir}/ours.qcow2`,
          `${dir}/theirs.qcow2`,
          "qcow2",
          ["6M"],
        );
      }
      // compat=0.10 cannot mark zeros: refused by both, nothing changed.
      await run("qemu-img", [
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.raw",
        "-F",
        "raw",
        `${dir}/v2.qcow2`,
        "1M",
      ]);
      const before = await Deno.readFile(`${dir}/v2.qcow2`);
      const r = await cli(["resize", `${dir}/v2.qcow2`, "2M"]);
      assertEquals(r.code, 1);
      assertTrue(/compat=0.10/.test(r.stderr), r.stderr);
      assertEquals(await Deno.readFile(`${dir}/v2.qcow2`), before);
    });
  },
);

Deno.test("resize of a qcow2 refuses sizes and images it cannot handle", async () => {
  const sink = memorySink();
  await (await qcow2.create!(sink, { size: MiB })).flush!();
  const good = sink.bytes().slice();
  await rejects(
    () => resizeImage(memorySink(good.slice()), MiB + 100),
    ImageFormatError,
    /multiple of 512/,
  );
  await rejects(
    () => resizeImage(memorySink(good.slice()), 2 ** 52),
    ImageFormatError,
    /L1 entries/,
  );
  // Dirty: refcounts not to be trusted.
  const dirty = good.slice();
  dirty[79] |= 1;
  await rejects(
    () => resizeImage(memorySink(dirty), 2 * MiB),
    UnsupportedError,
    /dirty/,
  );
  // An L2 entry pointing past the end of the file: refused, not freed.
  const image = await qcow2.create!(sink, { size: MiB });
  await image.write!(0, new Uint8Array(512).fill(1));
  await image.flush!();
  const bytes = sink.bytes().slice();
  const view = new DataView(bytes.buffer);
  const l1At = Number(view.getBigUint64(40));
  const l2At = Number(view.getBigUint64(l1At) & 0x00fffffffffffe00n);
  view.setBigUint64(l2At, (1n << 63n) | (1n << 40n));
  const poked = memorySink(bytes);
  await rejects(
    () => resizeImage(poked, 0, { shrink: true }),
    ImageFormatError,
    /past the end of the file/,
  );
});

/** Formats qemu-img 7.2 does not resize, with the create options tried. */
const OTHERS: { format: string; options: string; steps: string[][] }[] = [
  {
    format: "vdi",
    options: "static=off",
    // 3 MiB has a 512-byte block map: 200 MiB needs blocks of its room.
    steps: [["+2M"], ["200M"], ["--shrink", "2M"], ["--shrink", "-1536k"], [
      "6M",
    ]],
  },
  {
    format: "vdi",
    options: "static=on",
    steps: [["+2M"], ["200M"], ["--shrink", "2M"], ["4M"]],
  },
  {
    format: "vpc",
    options: "subformat=dynamic",
    // 2 MiB blocks, 2 BAT entries in a 512-byte sector: 300 MiB moves it.
    steps: [["+2M"], ["300M"], ["--shrink", "3M"], ["--shrink", "-1M"], [
      "9M",
    ]],
  },
  {
    format: "vpc",
    options: "subformat=dynamic,force_size=on",
    steps: [["+2M"], ["300M"], ["--shrink", "3M"], ["9M"]],
  },
  {
    format: "vhdx",
    options: "subformat=dynamic,block_size=1M",
    steps: [["+2M"], ["40M"], ["--shrink", "2M"], ["--shrink", "-1536k"], [
      "9M",
    ]],
  },
  {
    format: "vhdx",
    options: "subformat=fixed,block_size=1M",
    steps: [["+2M"], ["--shrink", "2500k"], ["9M"]],
  },
  {
    format: "vpc",
    options: "subformat=fixed",
    steps: [["+2M"], ["--shrink", "3M"], ["9M"]],
  },
];

/** Bytes of a size argument: `2M`, `+2M`, `-1536k` against `current`. */
function sizeOf(text: string, current: number): number {
  const m = /^([+-]?)(\d+)([kMG]?)$/.exec(text)!;
  const n = Number(m[2]) * { "": 1, k: 1024, M: MiB, G: 1 << 30 }[
    m[3] as "" | "k" | "M" | "G"
  ];
  return m[1] === "+" ? current + n : m[1] === "-" ? current - n : n;
}

for (const c of OTHERS) {
  Deno.test(
    `resize of a ${c.format} (${c.options}) reads, for qemu-img, as the raw disk resized; its size as qemu-img creates it`,
    { ignore: skip(["qemu-img", "qemu-io"]) },
    async () => {
      await withTemp(async (dir) => {
        const image = `${dir}/d.${c.format}`;
        const raw = `${dir}/d.raw`;
        await run("qemu-img", [
          "create",
          "-f",
          c.format,
          "-o",
          c.options,
          image,
          "3M",
        ]);
        await qemuWrite(image, c.format, [
          [1, 0, 65536],
          [2, 1100000, 5000],
          [3, 2 * MiB + 4096, 300000],
        ]);
        await run("qemu-img", [
          "convert",
          "-f",
          c.format,
          "-O",
          "raw",
          image,
          raw,
        ]);
        for (const args of c.steps) {
          const before = (await info(image, c.format))["virtual-size"];
          const r = await cli(["resize", "-f", c.format, image, ...args]);
          assertEquals(r.code, 0, `${args.join(" ")}: ${r.stderr}`);
          const size = (await info(image, c.format))["virtual-size"];
          // The size a new image of the size asked for gets from qemu-img.
          const requested = sizeOf(args[args.length - 1], before);
          await run("qemu-img", [
            "create",
            "-f",
            c.format,
            "-o",
            c.options,
            `${dir}/fresh`,
            `${requested}`,
          ]);
          assertEquals(
            size,
            (await info(`${dir}/fresh`, c.format))["virtual-size"],
            args.join(" "),
          );
          await run("qemu-img", [
            "resize",
            "-f",
            "raw",
            ...(size < before ? ["--shrink"] : []),
            raw,
            `${size}`,
          ]);
          const got = await qemuRaw(image, dir, c.format);
          const want = await Deno.readFile(raw);
          assertEquals(got.length, want.length, args.join(" "));
          assertEquals(sha256Hex(got), sha256Hex(want), args.join(" "));
          if (c.format !== "vpc") await assertClean(image, c.format);
        }
      });
    },
  );
}

Deno.test(
  "resize of a vhdx whose BAT outgrows its region moves the BAT; qemu-io reads what was written, before and past the old BAT's reach",
  { ignore: skip(["qemu-img", "qemu-io"]) },
  async () => {
    await withTemp(async (dir) => {
      const image = `${dir}/d.vhdx`;
      await run("qemu-img", [
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        image,
        "3M",
      ]);
      await qemuWrite(image, "vhdx", [[1, 0, 65536], [2, 2 * MiB, 4096]]);
      // 1 MiB of BAT holds 131072 entries: 200 GiB of 1 MiB blocks needs more.
      const r = await cli(["resize", image, "200G"]);
      assertEquals(r.code, 0, r.stderr);
      await qemuWrite(image, "vhdx", [[3, 150 * (1 << 30), 4096]]);
      // Read where the data is and around it (a compare would read 200 GiB).
      const io = await run("qemu-io", [
        "-f",
        "vhdx",
        "-r",
        "-c",
        "read -P 1 0 64k",
        "-c",
        "read -P 2 2M 4k",
        "-c",
        `read -P 3 ${150 * (1 << 30)} 4k`,
        "-c",
        `read -P 0 ${3 * MiB} 1M`,
        "-c",
        `read -P 0 ${199 * (1 << 30)} 1M`,
        image,
      ]);
      assertTrue(!/fail|error/i.test(io.text + io.stderr), io.text);
      assertEquals(
        (await info(image, "vhdx"))["virtual-size"],
        200 * (1 << 30),
      );
      await assertClean(image, "vhdx");
    });
  },
);

Deno.test("resize refuses what it cannot do safely, by name, leaving the file as it was", async () => {
  await withTemp(async (dir) => {
    const cases: [string, string[], RegExp][] = [
      ["vmdk", [], /vmdk/],
      ["vdi", ["-o", "static=off"], /multiple of 512/],
    ];
    for (const [format, options, message] of cases) {
      const path = `${dir}/x.${format}`;
      const made = await cli(["create", "-f", format, ...options, path, "1M"]);
      assertEquals(made.code, 0, made.stderr);
      const before = await Deno.readFile(path);
      const size = format === "vdi" ? "1049000" : "2M";
      const r = await cli(["resize", path, size]);
      assertEquals(r.code, 1, format);
      assertTrue(message.test(r.stderr), r.stderr);
      assertEquals(await Deno.readFile(path), before, format);
    }
    // A vdi whose block map names a block past the end of the file.
    const path = `${dir}/b.vdi`;
    await cli(["create", "-f", "vdi", path, "2M"]);
    await run("qemu-io", ["-f", "vdi", "-c", "write -P 1 0 4096", path]);
    const bytes = await Deno.readFile(path);
    const view = new DataView(bytes.buffer);
    view.setUint32(view.getUint32(340, true), 5000, true);
    await Deno.writeFile(path, bytes);
    const r = await cli(["resize", path, "4M"]);
    assertEquals(r.code, 1);
    assertTrue(/block map\[0\]/.test(r.stderr), r.stderr);
    assertEquals(await Deno.readFile(path), bytes);
  });
});
