// Raw file to raw file in the kernel (streams/_file_copy.ts): the same bytes
// and the same holes as `cp --sparse=always`, and a clean fallback where
// FFI is not allowed or the source is not a file.
import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  allocatedBytes,
  BackingFileError,
  bootSectorPatch,
  convert,
  type CopyRange,
  createOutputFile,
  fileBackingResolver,
  fileResolver,
  fromBytes,
  fromFile,
  open,
  type RangeCopySink,
  ReadError,
  type Source,
} from "../mod.ts";
import { qemuRaw } from "./_layers.ts";
import {
  CopyFailure,
  descriptorOf,
  descriptorsOf,
  fileDataRanges,
  kernelCopier,
  type KernelCopierOptions,
} from "../streams/_file_copy.ts";
import {
  pseudoRandom,
  qemuIo,
  ROOT,
  run,
  sha256File,
  skip,
  withTemp,
} from "./_helpers.ts";

const MIB = 1 << 20;
const linux = Deno.build.os === "linux";

/** 24 MiB: holes, 3 MiB of data at 5 MiB, 1 MiB at 17 MiB, 3 bytes at the end. */
async function sparseInput(path: string) {
  const file = await Deno.open(path, { write: true, create: true });
  await file.truncate(24 * MIB);
  for (
    const [at, bytes] of [
      [5 * MIB, pseudoRandom(3 * MIB, 1)],
      [17 * MIB, pseudoRandom(MIB, 2)],
      [24 * MIB - 3, Uint8Array.of(1, 2, 3)],
    ] as const
  ) {
    await file.seek(at, Deno.SeekMode.Start);
    await file.write(bytes);
  }
  file.close();
}

/**
 * A kernel copier from the file `from` to the file `to`, made (or kept)
 * and sized to `size`, both open; `done` closes the copier and the files.
 */
async function copierBetween(
  from: string,
  to: string,
  size: number,
  options: KernelCopierOptions,
) {
  const input = await Deno.open(from);
  const output = await Deno.open(to, { read: true, write: true, create: true });
  await output.truncate(size);
  const copier = kernelCopier(input.statSync(), output.statSync(), options);
  assertTrue(copier !== undefined, "no kernel copier on Linux with FFI");
  const done = async () => {
    await copier.close();
    input.close();
    output.close();
  };
  return { copier, done };
}

function dataMap(path: string): [number, number][] | undefined {
  const file = Deno.openSync(path);
  try {
    return fileDataRanges(file);
  } finally {
    file.close();
  }
}

Deno.test(
  "a raw file converted to raw is copied in the kernel with the holes cp --sparse=always leaves",
  { ignore: !linux || skip(["cp"]) },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      await run("cp", ["--sparse=always", `${dir}/in.raw`, `${dir}/cp.raw`]);
      const input = await fromFile(`${dir}/in.raw`);
      const image = await open(input, { format: "raw" });
      const out = await createOutputFile(`${dir}/out.raw`);
      // The sink copies from the file itself: the kernel path is taken.
      await out.resize!(input.size);
      assertEquals(await out.copyRange(input, 0, MIB, 0), 0); // a hole
      const result = await convert(image, out);
      await out.commit();
      await image.close?.();
      assertEquals(result.dataBytes, 4 * MIB + 4096);
      assertEquals(
        await sha256File(`${dir}/out.raw`),
        await sha256File(`${dir}/in.raw`),
      );
      const map = dataMap(`${dir}/out.raw`);
      assertTrue(map !== undefined, "no data map without FFI");
      assertEquals(map, dataMap(`${dir}/cp.raw`));
      assertEquals(map, dataMap(`${dir}/in.raw`));
      const blocks = async (p: string) => (await Deno.stat(p)).blocks;
      assertEquals(
        await blocks(`${dir}/out.raw`),
        await blocks(`${dir}/cp.raw`),
      );
    }),
);

Deno.test(
  "copies in small pieces, in and across the input's data ranges, give its bytes and holes (the copier remembers the last data range)",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      const input = await fromFile(`${dir}/in.raw`);
      const out = await createOutputFile(`${dir}/out.raw`);
      await out.resize!(input.size);
      // Pieces of 384 KiB: some inside a data range (no lseek after the
      // first), some straddling a data range's start or end, some in holes;
      // backwards, so a remembered range is left and found again.
      const piece = 384 * 1024;
      let copied = 0;
      for (let at = input.size - piece; at > -piece; at -= piece) {
        const from = Math.max(0, at);
        const n = await out.copyRange(input, from, at + piece - from, from);
        assertTrue(n !== undefined, "no kernel copy");
        copied += n!;
      }
      await out.commit();
      await input.close?.();
      assertEquals(copied, 4 * MIB + 4096);
      assertEquals(
        await sha256File(`${dir}/out.raw`),
        await sha256File(`${dir}/in.raw`),
      );
      assertEquals(dataMap(`${dir}/out.raw`), dataMap(`${dir}/in.raw`));
    }),
);

Deno.test(
  "a copy that is not 4 KiB-aligned (as a vdi's or a VHD's blocks are) gives the input's bytes, shifted, and its holes",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      const input = await fromFile(`${dir}/in.raw`);
      const out = await createOutputFile(`${dir}/out.raw`);
      await out.resize!(input.size);
      // 512 bytes later in the output, as a vdi's or a VHD's blocks are
      // copied: three data ranges.
      const n = await out.copyRange(input, 0, input.size - 512, 512);
      // And one more, 512 bytes before it, to see copies follow each other.
      const m = await out.copyRange(input, input.size - 512, 512, 0);
      await out.commit();
      await input.close?.();
      assertEquals(n, 4 * MIB + 4096 - 512);
      assertEquals(m, 512);
      const bytes = await Deno.readFile(`${dir}/in.raw`);
      const expected = new Uint8Array(bytes.length);
      expected.set(bytes.subarray(0, bytes.length - 512), 512);
      expected.set(bytes.subarray(bytes.length - 512), 0);
      assertEquals(await Deno.readFile(`${dir}/out.raw`), expected);
      // Data only where the shifted data ranges fall (and the first block).
      assertEquals(dataMap(`${dir}/out.raw`), [
        [0, 4096],
        [5 * MIB, 8 * MIB + 4096],
        [17 * MIB, 18 * MIB + 4096],
        [24 * MIB - 4096, 24 * MIB],
      ]);
    }),
);

Deno.test(
  "copies into blocks allocated first (fallocate, on ext4) give the same bytes, holes and allocated blocks as copies without, aligned or not, by either way",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      const size = 24 * MIB;
      const results = [];
      for (const way of ["read_write", "splice"] as const) {
        for (const preallocate of [true, false]) {
          const to = `${dir}/out-${way}-${preallocate}.raw`;
          const { copier, done } = await copierBetween(
            `${dir}/in.raw`,
            to,
            size,
            { way, preallocate, helperAfter: Infinity },
          );
          // Aligned, then 512 bytes later in the output (a vdi's blocks),
          // then two ranges that follow each other in the output.
          assertEquals(copier.copyRanges([[0, 12 * MIB, 0]]), 3 * MIB);
          assertEquals(copier.copy(16 * MIB, 4 * MIB, 16 * MIB + 512), MIB);
          assertEquals(
            copier.copyRanges([
              [22 * MIB, MIB, 22 * MIB],
              [23 * MIB, MIB, 23 * MIB],
            ]),
            4096,
          );
          await done();
          results.push({
            bytes: await sha256File(to),
            map: dataMap(to),
            blocks: (await Deno.stat(to)).blocks,
          });
        }
      }
      for (const r of results.slice(1)) assertEquals(r, results[0]);
      assertEquals(results[0].map, [
        [5 * MIB, 8 * MIB],
        [17 * MIB, 18 * MIB + 4096],
        [24 * MIB - 4096, 24 * MIB],
      ]);
    }),
);

Deno.test(
  "without --allow-ffi convert reads and writes, with the same bytes and holes",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      const r = await run(Deno.execPath(), [
        "run",
        "--allow-read",
        "--allow-write",
        "--allow-env",
        `${ROOT}cli.ts`,
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        `${dir}/in.raw`,
        `${dir}/out.raw`,
      ], { allowFail: true });
      assertEquals(r.code, 0, r.stderr);
      assertEquals(
        await sha256File(`${dir}/out.raw`),
        await sha256File(`${dir}/in.raw`),
      );
      assertEquals(dataMap(`${dir}/out.raw`), dataMap(`${dir}/in.raw`));
      // The file adapter's copy answers "cannot" there, nothing written.
      const probe = `${dir}/probe.ts`;
      await Deno.writeTextFile(
        probe,
        `import { createOutputFile, fromFile } from "${ROOT}mod.ts";
const input = await fromFile("${dir}/in.raw");
const out = await createOutputFile("${dir}/probe.raw");
await out.resize(input.size);
console.log(String(await out.copyRange(input, 0, input.size, 0)));
await out.abort();`,
      );
      const p = await run(Deno.execPath(), [
        "run",
        "--allow-read",
        "--allow-write",
        "--allow-env",
        probe,
      ], { allowFail: true });
      assertEquals(p.code, 0, p.stderr);
      assertEquals(p.text.trim(), "undefined");
    }),
);

Deno.test(
  "a sink file cannot copy from a source that is not a file, or past its size",
  () =>
    withTemp(async (dir) => {
      const out = await createOutputFile(`${dir}/out.raw`);
      await out.resize!(8192);
      assertEquals(
        await out.copyRange(fromBytes(new Uint8Array(8192)), 0, 8192, 0),
        undefined,
      );
      await Deno.writeFile(`${dir}/in.raw`, new Uint8Array(16384).fill(1));
      const input = await fromFile(`${dir}/in.raw`);
      assertEquals(await out.copyRange(input, 0, 16384, 0), undefined);
      await input.close();
      await out.abort();
    }),
);

Deno.test(
  "a fixed VHD's data is copied in the kernel: qemu-img's bytes, the VHD's holes",
  { ignore: !linux || skip(["qemu-img"]) },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      const vhd = `${dir}/fixed.vhd`;
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed",
        `${dir}/in.raw`,
        vhd,
      ]);
      await run("qemu-img", [
        "convert",
        "-f",
        "vpc",
        "-O",
        "raw",
        vhd,
        `${dir}/qemu.raw`,
      ]);
      const image = await open(await fromFile(vhd));
      assertEquals(image.format, "vpc");
      const out = await createOutputFile(`${dir}/out.raw`);
      const result = await convert(image, out);
      await out.commit();
      await image.close?.();
      // The file's data ranges (qemu-img pads the disk to its CHS size).
      assertTrue(result.dataBytes >= 4 * MIB + 4096, `${result.dataBytes}`);
      assertTrue(result.dataBytes < 5 * MIB, `${result.dataBytes}`);
      assertEquals(
        await sha256File(`${dir}/out.raw`),
        await sha256File(`${dir}/qemu.raw`),
      );
      // The VHD's holes stay holes (its allocated zeros are copied, where
      // qemu-img leaves holes: the map is the input's, not qemu-img's).
      const size = image.size;
      const clipped = dataMap(vhd)!.filter(([start]) => start < size)
        .map(([start, end]) => [start, Math.min(end, size)]);
      assertEquals(dataMap(`${dir}/out.raw`), clipped);
    }),
);

for (const way of ["read_write", "copy_file_range", "splice"] as const) {
  Deno.test(
    `copies by ${way}, page-aligned and not, across holes and ending in them: the input's bytes, and its holes`,
    { ignore: !linux },
    () =>
      withTemp(async (dir) => {
        await sparseInput(`${dir}/in.raw`);
        const input = await Deno.open(`${dir}/in.raw`);
        const output = await Deno.open(`${dir}/out.raw`, {
          read: true,
          write: true,
          create: true,
        });
        await output.truncate(24 * MIB);
        const copier = kernelCopier(input.statSync(), output.statSync(), {
          way,
        });
        assertTrue(copier !== undefined, "no kernel copier on Linux with FFI");
        const counted = () =>
          way === "read_write"
            ? copier.copied.readWrite
            : copier.copied.copyFileRange;
        try {
          // 512 bytes into the data at 5 MiB (a vdi's or VHD's blocks sit
          // so in their files) to the output's 1 MiB: more than a buffer
          // holds, an odd length, ending inside the hole after the data.
          const from = 5 * MIB + 512;
          const length = 3 * MIB + 12345;
          assertEquals(copier.copy(from, length, MIB), 3 * MIB - 512);
          assertEquals(counted(), 3 * MIB - 512);
          // Aligned, across a hole, and the file's last bytes (3 of them).
          assertEquals(copier.copy(16 * MIB, 8 * MIB, 16 * MIB), MIB + 4096);
          assertEquals(counted(), 4 * MIB + 4096 - 512);
          // Misaligned by one byte, many times, within one data range.
          for (let at = 0; at < MIB; at += 64 << 10) {
            copier.copy(17 * MIB + at + 1, 64 << 10, 8 * MIB + at);
          }
          // Odd pieces that straddle a buffer's end: 256 KiB + 7 at 3 bytes in.
          assertEquals(
            copier.copy(6 * MIB + 3, (256 << 10) + 7, 12 * MIB + 5),
            (256 << 10) + 7,
          );
          assertEquals(
            way === "read_write"
              ? copier.copied.copyFileRange
              : copier.copied.readWrite,
            0,
          );
          // Misaligned ranges through the copier's pipe (all but the
          // aligned copy at 16 MiB), or none.
          assertEquals(
            copier.copied.splice,
            way === "splice" ? 3 * MIB - 512 + MIB - 1 + (256 << 10) + 7 : 0,
          );
        } finally {
          await copier.close();
        }
        const bytes = await Deno.readFile(`${dir}/in.raw`);
        const out = await Deno.readFile(`${dir}/out.raw`);
        const expected = new Uint8Array(24 * MIB);
        expected.set(bytes.subarray(5 * MIB + 512, 8 * MIB), MIB);
        expected.set(bytes.subarray(16 * MIB), 16 * MIB);
        expected.set(bytes.subarray(17 * MIB + 1, 18 * MIB + 1), 8 * MIB);
        expected.set(
          bytes.subarray(6 * MIB + 3, 6 * MIB + 3 + (256 << 10) + 7),
          12 * MIB + 5,
        );
        assertTrue(
          out.every((b, i) => b === expected[i]),
          "the output holds other bytes",
        );
        // Holes stay holes: only the copied ranges (4 KiB granules) hold data.
        const map = fileDataRanges(output)!;
        const held = map.reduce((n, [start, end]) => n + end - start, 0);
        assertTrue(
          held <= 6 * MIB + (256 << 10) + 5 * 4096,
          `${held} bytes allocated`,
        );
        input.close();
        output.close();
      }),
  );
}

Deno.test(
  "a closed input is not copied from, even by a descriptor number reused since",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      await Deno.writeFile(
        `${dir}/other.raw`,
        new Uint8Array(24 * MIB).fill(9),
      );
      const input = await fromFile(`${dir}/in.raw`);
      const out = await createOutputFile(`${dir}/out.raw`);
      await out.resize!(input.size);
      assertEquals(await out.copyRange(input, 0, MIB, 0), 0);
      await input.close();
      // Likely handed the closed file's descriptor number.
      const other = await fromFile(`${dir}/other.raw`);
      assertEquals(await out.copyRange(input, 5 * MIB, MIB, 0), undefined);
      await other.close();
      await out.abort();
    }),
);

for (const format of ["vdi", "vhdx", "qed", "parallels"]) {
  Deno.test(
    `a ${format} image's stored blocks are copied in the kernel: qemu-img's bytes, and holes for the blocks it does not store`,
    { ignore: !linux || skip(["qemu-img", "qemu-io"]) },
    () =>
      withTemp(async (dir) => {
        await sparseInput(`${dir}/in.raw`);
        const path = `${dir}/d.${format}`;
        await run("qemu-img", [
          "convert",
          "-f",
          "raw",
          "-O",
          format,
          `${dir}/in.raw`,
          path,
        ]);
        // Blocks written out of order, zeros over data, a rewrite.
        await run("qemu-io", [
          "-f",
          format,
          "-c",
          "write -P 0x5a 20971520 65536",
          "-c",
          "write -z 5242880 1048576",
          "-c",
          "write -P 0x33 9437184 4096",
          path,
        ]);
        await run("qemu-img", [
          "convert",
          "-f",
          format,
          "-O",
          "raw",
          path,
          `${dir}/qemu.raw`,
        ]);
        const image = await open(await fromFile(path));
        assertEquals(image.format, format);
        const out = await createOutputFile(`${dir}/out.raw`);
        // Counts the kernel copies (convert uses the sink's copyRange
        // for the first, copyRanges for the rest).
        let copies = 0;
        const copyRange = out.copyRange.bind(out);
        out.copyRange = (...args) => {
          copies++;
          return copyRange(...args);
        };
        const copyRanges = out.copyRanges.bind(out);
        out.copyRanges = (...args) => {
          copies++;
          return copyRanges(...args);
        };
        const result = await convert(image, out);
        await out.commit();
        await image.close?.();
        assertTrue(copies > 0, "no kernel copy");
        assertTrue(result.dataBytes >= 4 * MIB, `${result.dataBytes}`);
        assertEquals(
          await sha256File(`${dir}/out.raw`),
          await sha256File(`${dir}/qemu.raw`),
        );
        // Nothing is written where the image stores no block.
        const map = dataMap(`${dir}/out.raw`)!;
        const held = map.reduce((n, [s, e]) => n + e - s, 0);
        assertTrue(held < 8 * MIB, JSON.stringify(map));
      }),
  );
}

/**
 * A file sink that counts what it copied itself (`copyRange`,
 * `copyRanges`: `calls` ranges in `batches` calls) apart from what
 * convert read and wrote.
 */
async function countingOutput(path: string) {
  const out = await createOutputFile(path);
  const counts = { copied: 0, calls: 0, batches: 0, written: 0 };
  const sink = Object.assign(Object.create(out), {
    async copyRange(...args: Parameters<RangeCopySink["copyRange"]>) {
      counts.calls++;
      counts.batches++;
      const n = await out.copyRange(...args);
      if (n !== undefined) counts.copied += n;
      return n;
    },
    async copyRanges(from: Source, ranges: readonly CopyRange[]) {
      counts.calls += ranges.length;
      counts.batches++;
      const n = await out.copyRanges(from, ranges);
      if (n !== undefined) counts.copied += n;
      return n;
    },
    write(offset: number, bytes: Uint8Array) {
      counts.written += bytes.length;
      return out.write(offset, bytes);
    },
  }) as typeof out;
  return { out, sink, counts };
}

Deno.test(
  "a sink with copyRange alone (no copyRanges) is asked for a dynamic VHD's blocks one by one: the same bytes",
  { ignore: !linux || skip(["qemu-img"]) },
  () =>
    withTemp(async (dir) => {
      const disk = new Uint8Array(16 * MIB);
      disk.set(pseudoRandom(6 * MIB, 3), 2 * MIB);
      disk.set(pseudoRandom(2 * MIB, 4), 12 * MIB);
      await Deno.writeFile(`${dir}/data.raw`, disk);
      const path = `${dir}/d.vhd`;
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "force_size=on",
        `${dir}/data.raw`,
        path,
      ]);
      const image = await open(await fromFile(path));
      const { out, sink, counts } = await countingOutput(`${dir}/out.raw`);
      (sink as Partial<typeof sink>).copyRanges = undefined;
      const result = await convert(image, sink);
      await out.commit();
      await image.close?.();
      assertEquals(await Deno.readFile(`${dir}/out.raw`), disk);
      assertEquals([counts.calls, counts.batches], [4, 4]);
      assertEquals(counts.copied, 8 * MIB);
      assertEquals(counts.written, 0);
      assertEquals(result.dataBytes, 8 * MIB);
    }),
);

Deno.test(
  "vdi blocks that follow each other on the disk and in the file are one kernel copy; a dynamic VHD is one range per block (its sector bitmap lies between blocks), all but the first in one call; nothing is read, holes stay holes",
  { ignore: !linux || skip(["qemu-img"]) },
  () =>
    withTemp(async (dir) => {
      // 16 MiB: 6 MiB of data at 2 MiB, 2 MiB at 12 MiB, zeros elsewhere.
      const disk = new Uint8Array(16 * MIB);
      disk.set(pseudoRandom(6 * MIB, 3), 2 * MIB);
      disk.set(pseudoRandom(2 * MIB, 4), 12 * MIB);
      await Deno.writeFile(`${dir}/data.raw`, disk);
      // vdi: 1 MiB blocks, stored in disk order, so the file holds the eight
      // data blocks back to back: two runs (a hole on the disk between them).
      // vpc: 2 MiB blocks, each after its 512-byte bitmap: four runs.
      for (const [format, calls] of [["vdi", 2], ["vpc", 4]] as const) {
        const path = `${dir}/d.${format}`;
        await run("qemu-img", [
          "convert",
          "-f",
          "raw",
          "-O",
          format,
          ...(format === "vpc" ? ["-o", "force_size=on"] : []),
          `${dir}/data.raw`,
          path,
        ]);
        const image = await open(await fromFile(path));
        assertEquals(image.format, format);
        const output = `${dir}/${format}.raw`;
        const { out, sink, counts } = await countingOutput(output);
        const result = await convert(image, sink);
        await out.commit();
        await image.close?.();
        assertEquals(await Deno.readFile(output), disk);
        assertEquals(
          await Deno.readFile(output),
          await qemuRaw(path, dir, format),
        );
        assertEquals(counts.calls, calls, format);
        // The first run alone (a sink that cannot copy from the file
        // refuses before anything is written), the rest in one call.
        assertEquals(counts.batches, 2, format);
        assertEquals(counts.copied, 8 * MIB, format);
        assertEquals(counts.written, 0, format);
        assertEquals(result.dataBytes, 8 * MIB);
        // The output holds the data and nothing else (du).
        const allocated = (await Deno.stat(output)).blocks! * 512;
        assertTrue(
          allocated >= 8 * MIB && allocated <= 8 * MIB + 65536,
          `${format}: ${allocated} bytes allocated`,
        );
        assertEquals(dataMap(output), [[2 * MIB, 8 * MIB], [
          12 * MIB,
          14 * MIB,
        ]]);
      }
    }),
);

/**
 * An image of 8 MiB by qemu-img: random data clusters, zero clusters,
 * compressed clusters (qemu-io -c), an unwritten tail.
 */
async function mixedImage(dir: string, format: "qcow2" | "vpc") {
  const path = `${dir}/mixed.${format}`;
  const disk = new Uint8Array(8 * MIB);
  disk.set(pseudoRandom(3 * MIB, 7));
  await Deno.writeFile(`${dir}/data.raw`, disk);
  await run("qemu-img", [
    "convert",
    "-f",
    "raw",
    "-O",
    format,
    `${dir}/data.raw`,
    path,
  ]);
  await qemuIo(
    format,
    path,
    "write -z 1M 256k",
    "write -P 0x5c 4M 64k",
    ...(format === "qcow2" ? ["write -c -P 0x77 5M 128k"] : []),
  );
  return path;
}

for (const format of ["qcow2", "vpc"] as const) {
  Deno.test(
    `${format}: plain data clusters are copied in the kernel, the rest read; qemu-img's bytes`,
    { ignore: !linux || skip(["qemu-img", "qemu-io"]) },
    () =>
      withTemp(async (dir) => {
        const path = await mixedImage(dir, format);
        const image = await open(await fromFile(path));
        assertEquals(image.format, format);
        const { out, sink, counts } = await countingOutput(`${dir}/out.raw`);
        const result = await convert(image, sink);
        await out.commit();
        await image.close?.();
        assertEquals(
          await Deno.readFile(`${dir}/out.raw`),
          await qemuRaw(path, dir, format),
        );
        // Most data went file to file; the compressed clusters were read.
        assertTrue(counts.copied >= 3 * MIB - 256 * 1024, `${counts.copied}`);
        if (format === "qcow2") {
          assertEquals(counts.written, 128 * 1024);
        }
        assertEquals(result.dataBytes, counts.copied + counts.written);
      }),
  );
}

Deno.test(
  "a qed cluster past the file's end fails the kernel copy with the driver's error",
  { ignore: !linux || skip(["qemu-img"]) },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      const path = `${dir}/d.qed`;
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "qed",
        `${dir}/in.raw`,
        path,
      ]);
      // Its last clusters cut off: the tables still name them.
      await Deno.truncate(path, (await Deno.stat(path)).size - 65536);
      const image = await open(await fromFile(path));
      const out = await createOutputFile(`${dir}/out.raw`);
      const failed = await convert(image, out).then(
        () => undefined,
        (e: Error) => e,
      );
      await out.abort();
      await image.close?.();
      assertEquals(failed?.name, "ImageFormatError", failed?.message);
      assertTrue(/within the file's/.test(failed!.message), failed!.message);
    }),
);

Deno.test(
  "the kernel copy never bypasses an adapter or a parent: a patched boot sector, a qcow2 over its backing file",
  { ignore: !linux || skip(["qemu-img", "qemu-io"]) },
  () =>
    withTemp(async (dir) => {
      const path = await mixedImage(dir, "qcow2");
      // An adapter over a registered image: its bytes, not the file's.
      const image = await open(await fromFile(path));
      const sector = new Uint8Array(512).fill(0xee);
      const patched = bootSectorPatch(image, sector);
      const first = await countingOutput(`${dir}/patched.raw`);
      await convert(patched, first.sink);
      await first.out.commit();
      const expected = await qemuRaw(path, dir, "qcow2");
      expected.set(sector);
      assertEquals(await Deno.readFile(`${dir}/patched.raw`), expected);
      assertEquals(first.counts.copied, 0);
      await image.close?.();
      // An overlay: its unallocated runs are the base's bytes.
      const top = `${dir}/top.qcow2`;
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        path,
        "-F",
        "qcow2",
        top,
      ]);
      await qemuIo("qcow2", top, "write -P 0x3a 2M 64k");
      const chain = await open(await fromFile(top), {
        resolveBacking: fileBackingResolver(top),
      });
      const second = await countingOutput(`${dir}/chain.raw`);
      await convert(chain, second.sink);
      await second.out.commit();
      await chain.close?.();
      assertEquals(
        await Deno.readFile(`${dir}/chain.raw`),
        await qemuRaw(top, dir, "qcow2"),
      );
      // The top layer alone, its parent not opened: an error, never zeros.
      const alone = await open(await fromFile(top));
      const third = await countingOutput(`${dir}/alone.raw`);
      let failed: unknown;
      try {
        await convert(alone, third.sink);
      } catch (e) {
        failed = e;
      }
      await alone.close?.();
      await third.out.abort?.();
      assertTrue(failed instanceof BackingFileError, String(failed));
    }),
);

Deno.test(
  "an input that ends early fails the copy with a ReadError naming it and where it ended",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      const input = await fromFile(`${dir}/in.raw`);
      const out = await createOutputFile(`${dir}/out.raw`);
      await out.resize!(input.size);
      // The copier learns the data range [5 MiB, 8 MiB) ...
      assertEquals(await out.copyRange(input, 5 * MIB, MIB, 0), MIB);
      // ... and the file is cut inside it behind the handle's back.
      await Deno.truncate(`${dir}/in.raw`, 6 * MIB + 1000);
      const failed = await out.copyRange(input, 6 * MIB, MIB, MIB).then(
        () => undefined,
        (e: Error) => e,
      );
      await input.close();
      await out.abort();
      assertTrue(failed instanceof ReadError, String(failed));
      assertEquals(failed.path, `${dir}/in.raw`);
      assertTrue(
        failed.message.includes(`the file ended at ${6 * MIB + 1000}`),
        failed.message,
      );
    }),
);

Deno.test(
  "a write the system refuses (EFBIG past RLIMIT_FSIZE) fails the copy with a WriteError naming the output and the system's reason",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      // In a child: the file size limit and SIGXFSZ ignored are per process.
      const script = `${dir}/limit.ts`;
      await Deno.writeTextFile(
        script,
        `import { createOutputFile, fromFile } from "${ROOT}mod.ts";
const libc = Deno.dlopen("libc.so.6", {
  setrlimit: { parameters: ["i32", "buffer"], result: "i32" },
  signal: { parameters: ["i32", "usize"], result: "usize" },
} as const).symbols;
const input = await fromFile("${dir}/in.raw");
const out = await createOutputFile("${dir}/out.raw");
await out.resize(input.size);
libc.signal(25, 1n); // SIGXFSZ: SIG_IGN, so writes past the limit fail with EFBIG
libc.setrlimit(1, new BigUint64Array([${6 * MIB}n, ${
          6 * MIB
        }n])); // RLIMIT_FSIZE
try {
  await out.copyRange(input, 5 * MIB, 3 * MIB, 5 * MIB);
  console.log("copied");
} catch (e) {
  console.log(JSON.stringify({ name: e.name, path: e.path, offset: e.offset, message: e.message }));
}
await out.abort();`.replaceAll("5 * MIB", String(5 * MIB)).replaceAll(
          "3 * MIB",
          String(3 * MIB),
        ),
      );
      const r = await run(Deno.execPath(), ["run", "-A", script], {
        allowFail: true,
      });
      assertEquals(r.code, 0, r.stderr);
      const failed = JSON.parse(r.text.trim());
      assertEquals(failed.name, "WriteError", r.text);
      assertTrue(failed.path.includes("out.raw"), r.text); // its temporary name
      assertEquals(failed.offset, 6 * MIB);
      assertTrue(/errno 27/.test(failed.message), failed.message);
    }),
);

Deno.test(
  "copies shared with the second thread (the copy worker) give the input's bytes and holes, and its failures are typed",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      const input = await Deno.open(`${dir}/in.raw`);
      const output = await Deno.open(`${dir}/out.raw`, {
        read: true,
        write: true,
        create: true,
      });
      await output.truncate(24 * MIB);
      const copier = kernelCopier(input.statSync(), output.statSync(), {
        way: "read_write",
        helperAfter: 0,
        helperWhenBusy: true,
      });
      assertTrue(copier !== undefined, "no kernel copier on Linux with FFI");
      try {
        // The first copy starts the worker and copies alone meanwhile.
        assertEquals(copier.copy(17 * MIB, MIB, 17 * MIB), MIB);
        for (let i = 0; i < 750 && copier.copied.shared === 0; i++) {
          await new Promise((r) => setTimeout(r, 20));
          // Odd offsets: 3 MiB + 5 bytes of data, 4 KiB + 1 later, and a hole.
          copier.copy(5 * MIB + 7, 3 * MIB + 4096, MIB + 4096 + 8);
        }
        assertTrue(copier.copied.shared > 0, "the worker never helped");
        // Across holes to the file's last 3 bytes, shared.
        assertEquals(copier.copy(9 * MIB, 15 * MIB, 9 * MIB), MIB + 4096);
        // The input cut inside a data range the copier knows: a short read
        // by either thread, reported once both have stopped.
        assertEquals(copier.copy(5 * MIB, 4096, 5 * MIB), 4096);
        await Deno.truncate(`${dir}/in.raw`, 6 * MIB + 1000);
        let failed: unknown;
        try {
          copier.copy(5 * MIB, 3 * MIB, 5 * MIB);
        } catch (e) {
          failed = e;
        }
        assertTrue(failed instanceof CopyFailure, String(failed));
        assertEquals(failed.side, "read");
        assertEquals(failed.endedAt, 6 * MIB + 1000);
      } finally {
        await copier.close();
      }
      input.close();
      output.close();
      await sparseInput(`${dir}/again.raw`);
      const bytes = await Deno.readFile(`${dir}/again.raw`);
      const out = await Deno.readFile(`${dir}/out.raw`);
      const expected = new Uint8Array(24 * MIB);
      expected.set(bytes.subarray(5 * MIB + 7, 8 * MIB), MIB + 4096 + 8);
      expected.set(bytes.subarray(9 * MIB), 9 * MIB);
      // The failed copy wrote some of [5 MiB, 6 MiB + 1000) before it stopped.
      const check = (from: number, to: number) => {
        for (let i = from; i < to; i++) {
          if (out[i] !== expected[i]) return i;
        }
        return -1;
      };
      assertEquals(check(0, 5 * MIB), -1);
      assertEquals(check(7 * MIB, 24 * MIB), -1);
      const map = fileDataRanges(await Deno.open(`${dir}/out.raw`))!;
      const held = map.reduce((n, [start, end]) => n + end - start, 0);
      assertTrue(held <= 8 * MIB, `${held} bytes allocated`);
    }),
);

Deno.test(
  "a copier never closed does not keep the program alive: its worker ends when idle",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      const script = `${dir}/unclosed.ts`;
      await Deno.writeTextFile(
        script,
        `import { kernelCopier } from "${ROOT}streams/_file_copy.ts";
const input = Deno.openSync("${dir}/in.raw");
const output = Deno.openSync("${dir}/out.raw", { read: true, write: true, create: true });
output.truncateSync(input.statSync().size);
const copier = kernelCopier(input.statSync(), output.statSync(), { way: "read_write", helperAfter: 0, helperWhenBusy: true })!;
copier.copy(0, 1 << 20, 0);
for (let i = 0; i < 750 && copier.copied.shared === 0; i++) {
  await new Promise((r) => setTimeout(r, 20));
  copier.copy(0, input.statSync().size, 0);
}
console.log(copier.copied.shared > 0);`,
      );
      const started = performance.now();
      const r = await run(Deno.execPath(), ["run", "-A", script], {
        allowFail: true,
      });
      assertEquals(r.code, 0, r.stderr);
      assertEquals(r.text.trim(), "true");
      assertTrue(performance.now() - started < 30_000, "it hung");
      assertEquals(
        await sha256File(`${dir}/out.raw`),
        await sha256File(`${dir}/in.raw`),
      );
    }),
);

Deno.test(
  "on a local file system a big copy times both ways and takes each for some segments: the input's bytes either way",
  { ignore: !linux || skip(["stat"]) },
  () =>
    withTemp(async (dir) => {
      // 96 MiB of data (a pattern shifted per MiB) after a 1 MiB hole.
      const file = await Deno.open(`${dir}/in.raw`, {
        write: true,
        create: true,
      });
      await file.truncate(98 * MIB);
      const block = pseudoRandom(MIB, 5);
      for (let i = 0; i < 96; i++) {
        block[i] = i;
        await file.seek((i + 1) * MIB, Deno.SeekMode.Start);
        await file.write(block);
      }
      file.close();
      const input = await Deno.open(`${dir}/in.raw`);
      const output = await Deno.open(`${dir}/out.raw`, {
        read: true,
        write: true,
        create: true,
      });
      await output.truncate(98 * MIB + 512);
      const copier = kernelCopier(input.statSync(), output.statSync(), {
        helperAfter: Infinity,
      });
      assertTrue(copier !== undefined, "no kernel copier on Linux with FFI");
      try {
        // 512 bytes later in the output, in pieces of 8 MiB.
        for (let at = 0; at < 98 * MIB; at += 8 * MIB) {
          const length = Math.min(8 * MIB, 98 * MIB - at);
          copier.copy(at, length, at + 512);
        }
      } finally {
        await copier.close();
      }
      const { copyFileRange, readWrite } = copier.copied;
      assertEquals(copyFileRange + readWrite, 96 * MIB);
      const type = (await run("stat", ["-f", "-c", "%T", dir])).text.trim();
      if (type === "ext2/ext3" || type === "tmpfs") {
        assertTrue(copyFileRange > 0 && readWrite > 0, `${type}: one way`);
      }
      const bytes = await Deno.readFile(`${dir}/in.raw`);
      const out = await Deno.readFile(`${dir}/out.raw`);
      assertEquals(out.length, bytes.length + 512);
      assertTrue(
        bytes.every((b, i) => out[i + 512] === b),
        "the output holds other bytes",
      );
      input.close();
      output.close();
    }),
);

Deno.test(
  "an input under 2 MiB is read and written, without loading libc; a bigger one is copied in the kernel, libc opened once",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/small.raw`, pseudoRandom(MIB, 11));
      await sparseInput(`${dir}/big.raw`);
      // In a child: libc is opened once per process. Deno.dlopen counted.
      const probe = `${dir}/probe.ts`;
      await Deno.writeTextFile(
        probe,
        `import { convert, createOutputFile, fromFile, open } from "${ROOT}mod.ts";
let opened = 0;
const dlopen = Deno.dlopen;
Object.defineProperty(Deno, "dlopen", {
  value: (...args) => (opened++, dlopen(...args)),
});
const counts = [];
for (const name of ["small", "big", "big"]) {
  const input = await fromFile(\`${dir}/\${name}.raw\`);
  const image = await open(input, { format: "raw" });
  const out = await createOutputFile(\`${dir}/\${name}-out.raw\`);
  let copied = 0;
  const sink = Object.assign(Object.create(out), {
    async copyRange(...args) {
      const n = await out.copyRange(...args);
      copied += n ?? 0;
      return n;
    },
    async copyRanges(...args) {
      const n = await out.copyRanges(...args);
      copied += n ?? 0;
      return n;
    },
  });
  await convert(image, sink);
  await out.commit();
  await image.close();
  counts.push(copied, opened);
}
console.log(JSON.stringify(counts));`,
      );
      const p = await run(Deno.execPath(), ["run", "--allow-all", probe], {
        allowFail: true,
      });
      assertEquals(p.code, 0, p.stderr);
      const data = 4 * MIB + 4096;
      assertEquals(JSON.parse(p.text), [0, 0, data, 1, data, 1]);
      for (const name of ["small", "big"]) {
        assertEquals(
          await sha256File(`${dir}/${name}-out.raw`),
          await sha256File(`${dir}/${name}.raw`),
        );
      }
    }),
);

Deno.test(
  "the descriptors of two open files are found in one pass over /proc/self/fd",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/a`, new Uint8Array(10));
      const a = await Deno.open(`${dir}/a`);
      const b = await Deno.open(`${dir}/b`, {
        read: true,
        write: true,
        create: true,
      });
      const c = await Deno.open(`${dir}/b`, { write: true });
      try {
        const [ra, wb] = descriptorsOf([
          { stat: a.statSync(), access: "read" },
          { stat: b.statSync(), access: "write" },
        ]);
        assertTrue(ra !== undefined && wb !== undefined && ra !== wb);
        assertEquals(ra, descriptorOf(a.statSync(), "read"));
        assertEquals(wb, descriptorOf(b.statSync(), "write"));
        // Open for writing only, `c` is never taken: reads fail on it.
        const info = Deno.readTextFileSync(`/proc/self/fdinfo/${wb}`);
        assertEquals(parseInt(/^flags:\s*([0-7]+)/m.exec(info)![1], 8) & 3, 2);
        // A file not open here: none.
        const stat = { ...a.statSync(), ino: -1 };
        assertEquals(
          descriptorsOf([{ stat, access: "read" }, {
            stat: a.statSync(),
            access: "read",
          }]),
          [undefined, ra],
        );
      } finally {
        for (const f of [a, b, c]) f.close();
      }
    }),
);

Deno.test(
  "vmdk monolithicFlat: its extent file is copied in the kernel, with qemu-img's bytes and holes",
  { ignore: !linux || skip(["qemu-img", "qemu-io"]) },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/flat.vmdk`;
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        path,
        "24M",
      ]);
      await qemuIo("vmdk", path, "write -P 7 1M 3M", "write -P 9 17M 1M");
      const image = await open(await fromFile(path), {
        resolveFile: fileResolver(path),
      });
      const { out, sink, counts } = await countingOutput(`${dir}/out.raw`);
      const result = await convert(image, sink);
      await out.commit();
      await image.close?.();
      assertEquals(
        await Deno.readFile(`${dir}/out.raw`),
        await qemuRaw(path, dir, "vmdk"),
      );
      // The data ranges of the extent file went file to file; none read.
      assertEquals(counts.written, 0);
      assertEquals(counts.copied, result.dataBytes);
      assertTrue(counts.copied >= 4 * MIB, `${counts.copied}`);
      assertEquals(dataMap(`${dir}/out.raw`), dataMap(`${dir}/flat-flat.vmdk`));
    }),
);

Deno.test(
  "a kernel copy whose input ends early fails with a CopyFailure on the read side that says where it ended: through the pipe (misaligned) and by copy_file_range",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      // The input 512 bytes later than the output for the pipe.
      for (
        const [way, shift] of [["splice", 512], ["copy_file_range", 0]] as const
      ) {
        await sparseInput(`${dir}/in.raw`);
        const { copier, done } = await copierBetween(
          `${dir}/in.raw`,
          `${dir}/${way}.raw`,
          24 * MIB,
          { way },
        );
        try {
          // The data range [5 MiB, 8 MiB) is now known to the copier.
          assertEquals(copier.copy(5 * MIB + shift, MIB, 5 * MIB), MIB);
          await Deno.truncate(`${dir}/in.raw`, 6 * MIB + 1000);
          let failure: unknown;
          try {
            copier.copy(5 * MIB + shift, 2 * MIB, 5 * MIB);
          } catch (e) {
            failure = e;
          }
          assertTrue(failure instanceof CopyFailure, `${way}: ${failure}`);
          assertEquals(failure.side, "read");
          assertEquals(failure.endedAt, 6 * MIB + 1000, way);
          assertTrue(
            failure.message.includes(`the file ended at ${6 * MIB + 1000}`),
            failure.message,
          );
          const { splice, copyFileRange } = copier.copied;
          assertTrue((way === "splice" ? splice : copyFileRange) > MIB, way);
        } finally {
          await done();
        }
      }
    }),
);

Deno.test(
  "the copier opens its files again by their paths, and where a path names another file now it finds Deno's descriptors instead",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      await Deno.writeFile(`${dir}/decoy.raw`, new Uint8Array(24 * MIB));
      const bytes = await Deno.readFile(`${dir}/in.raw`);
      for (const input of [`${dir}/in.raw`, `${dir}/decoy.raw`]) {
        const file = await Deno.open(`${dir}/in.raw`);
        const output = await Deno.open(`${dir}/out.raw`, {
          read: true,
          write: true,
          create: true,
          truncate: true,
        });
        await output.truncate(24 * MIB);
        const copier = kernelCopier(file.statSync(), output.statSync(), {
          paths: { input, output: `${dir}/out.raw` },
        })!;
        try {
          assertEquals(copier.copy(5 * MIB, 3 * MIB, 5 * MIB), 3 * MIB);
        } finally {
          await copier.close();
          file.close();
          output.close();
        }
        const out = await Deno.readFile(`${dir}/out.raw`);
        assertTrue(
          out.subarray(5 * MIB, 8 * MIB).every((b, i) =>
            b === bytes[5 * MIB + i]
          ),
          `${input}: other bytes`,
        );
      }
    }),
);

/** A sparse file of `size` bytes holding `pieces` ([offset, bytes]). */
async function sparseFile(
  path: string,
  size: number,
  pieces: [number, Uint8Array][],
) {
  const file = await Deno.open(path, { write: true, create: true });
  await file.truncate(size);
  for (const [at, bytes] of pieces) {
    await file.seek(at, Deno.SeekMode.Start);
    await file.write(bytes);
  }
  file.close();
}

Deno.test(
  "an input of 128 MiB or more shares its copies with the second thread by default, several ranges in one call; a smaller one never starts it",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      // 130 MiB, sparse: 9 MiB of data at 100 MiB and a few bytes at the end.
      const data = pseudoRandom(9 * MIB, 21);
      await sparseFile(`${dir}/big.raw`, 130 * MIB, [
        [100 * MIB, data],
        [130 * MIB - 5, Uint8Array.of(1, 2, 3, 4, 5)],
      ]);
      await sparseInput(`${dir}/small.raw`);
      for (const name of ["big", "small"]) {
        const input = await Deno.open(`${dir}/${name}.raw`);
        const output = await Deno.open(`${dir}/${name}-out.raw`, {
          read: true,
          write: true,
          create: true,
        });
        const size = input.statSync().size;
        await output.truncate(size);
        const base = name === "big" ? 96 * MIB : 2 * MIB;
        // The machine's load does not decide here.
        const copier = kernelCopier(input.statSync(), output.statSync(), {
          way: "read_write",
          helperWhenBusy: true,
        });
        assertTrue(copier !== undefined, "no kernel copier on Linux with FFI");
        try {
          // Three ranges of a dynamic VHD's kind, 512 bytes apart in the
          // input, back to back in the output: one call.
          const ranges = [0, 1, 2].map((i) =>
            [
              base + i * (2 * MIB + 512),
              2 * MIB,
              base + i * 2 * MIB,
            ] as const
          );
          for (let i = 0; i < 50 && copier.copied.shared === 0; i++) {
            await new Promise((r) => setTimeout(r, 10));
            copier.copyRanges(ranges);
          }
          copier.copy(size - 14 * MIB, 14 * MIB, size - 14 * MIB);
          if (name === "big") {
            assertTrue(copier.copied.shared > 0, "the worker never helped");
          } else {
            assertEquals(copier.copied.shared, 0);
          }
        } finally {
          await copier.close();
        }
        input.close();
        output.close();
        const bytes = await Deno.readFile(`${dir}/${name}.raw`);
        const out = await Deno.readFile(`${dir}/${name}-out.raw`);
        const expected = new Uint8Array(size);
        for (let i = 0; i < 3; i++) {
          const from = base + i * (2 * MIB + 512);
          expected.set(
            bytes.subarray(from, from + 2 * MIB),
            base + i * 2 * MIB,
          );
        }
        expected.set(bytes.subarray(size - 14 * MIB), size - 14 * MIB);
        assertTrue(
          out.every((b, i) => b === expected[i]),
          `${name}: other bytes`,
        );
      }
    }),
);

Deno.test(
  "a copy worker that cannot be made, cannot load its module, or never answers leaves the copier to copy alone: the input's bytes, and no second try",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await sparseInput(`${dir}/in.raw`);
      const script = `${dir}/alone.ts`;
      await Deno.writeTextFile(
        script,
        `const kind = Deno.args[0];
let made = 0;
const Real = Worker;
// deno-lint-ignore no-explicit-any
(globalThis as any).Worker = kind === "throws"
  ? class { constructor() { made++; throw new Error("no workers here"); } }
  : kind === "missing"
  ? class extends Real { constructor(_url: string, options: WorkerOptions) { made++; super("file://${dir}/missing.ts", options); } }
  : class { constructor() { made++; } postMessage() {} terminate() {} onerror = null; };
const { kernelCopier } = await import("${ROOT}streams/_file_copy.ts");
const input = Deno.openSync("${dir}/in.raw");
const output = Deno.openSync("${dir}/out-" + kind + ".raw", { read: true, write: true, create: true });
output.truncateSync(input.statSync().size);
const copier = kernelCopier(input.statSync(), output.statSync(), { way: "read_write", helperAfter: 0, helperWhenBusy: true })!;
for (let i = 0; i < 3; i++) {
  copier.copy(0, input.statSync().size, 0);
  await new Promise((r) => setTimeout(r, 150));
}
console.log(JSON.stringify({ ...copier.copied, made }));
await copier.close();`,
      );
      for (const kind of ["throws", "missing", "silent"]) {
        const r = await run(Deno.execPath(), ["run", "-A", script, kind], {
          allowFail: true,
        });
        assertEquals(r.code, 0, r.stderr);
        const copied = JSON.parse(r.text.trim());
        assertEquals(copied.readWrite, 3 * (4 * MIB + 4096), kind);
        assertEquals(copied.shared, 0, kind);
        // A worker that failed to load is not started again (one that
        // never answers is ended when idle for 1 s, and started again).
        if (kind === "missing") assertEquals(copied.made, 1, r.stderr);
        assertEquals(
          await sha256File(`${dir}/out-${kind}.raw`),
          await sha256File(`${dir}/in.raw`),
          kind,
        );
      }
    }),
);

Deno.test(
  "a write the system refuses in pieces shared with the copy worker fails with the first failed piece's offset and errno",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await sparseFile(`${dir}/in.raw`, 24 * MIB, [
        [0, pseudoRandom(24 * MIB, 22)],
      ]);
      // In a child: the file size limit and SIGXFSZ ignored are per process.
      const script = `${dir}/limit.ts`;
      await Deno.writeTextFile(
        script,
        `import { kernelCopier } from "${ROOT}streams/_file_copy.ts";
const libc = Deno.dlopen("libc.so.6", {
  setrlimit: { parameters: ["i32", "buffer"], result: "i32" },
  signal: { parameters: ["i32", "usize"], result: "usize" },
} as const).symbols;
const input = Deno.openSync("${dir}/in.raw");
const output = Deno.openSync("${dir}/out.raw", { read: true, write: true, create: true });
const copier = kernelCopier(input.statSync(), output.statSync(), { way: "read_write", helperAfter: 0, helperWhenBusy: true })!;
for (let i = 0; i < 500 && copier.copied.shared === 0; i++) {
  await new Promise((r) => setTimeout(r, 10));
  copier.copy(0, ${8 * MIB}, 0);
}
libc.signal(25, 1n); // SIGXFSZ: SIG_IGN, so writes past the limit fail with EFBIG
libc.setrlimit(1, new BigUint64Array([${12 * MIB + 4096}n, ${
          12 * MIB + 4096
        }n])); // RLIMIT_FSIZE
try {
  copier.copy(${8 * MIB}, ${16 * MIB}, ${8 * MIB});
  console.log("copied");
} catch (e) {
  console.log(JSON.stringify({ shared: copier.copied.shared, name: e.name, side: e.side, offset: e.offset, errno: e.errno, message: e.message }));
}
await copier.close();`,
      );
      const r = await run(Deno.execPath(), ["run", "-A", script], {
        allowFail: true,
      });
      assertEquals(r.code, 0, r.stderr);
      const failed = JSON.parse(r.text.trim());
      assertTrue(failed.shared > 0, "the worker never helped");
      assertEquals(failed.name, "CopyFailure", r.text);
      assertEquals(failed.side, "write", r.text);
      // The 1 MiB piece at 12 MiB failed at its second page; every piece
      // after it failed at its start, on whichever thread.
      assertEquals(failed.offset, 12 * MIB, r.text);
      assertEquals(failed.errno, 27, r.text);
      assertTrue(/errno 27/.test(failed.message), failed.message);
    }),
);

Deno.test(
  "files on two file systems (tmpfs to ext4: EXDEV) that take no copy_file_range are copied by reads and writes instead, by every way that tries the kernel",
  { ignore: !linux },
  async () => {
    let shm: string;
    try {
      shm = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "vdisk-test-" });
    } catch {
      return; // no /dev/shm here
    }
    try {
      await withTemp(async (dir) => {
        // 12 MiB of data after a 1 MiB hole, in /dev/shm.
        const bytes = new Uint8Array(13 * MIB);
        bytes.set(pseudoRandom(12 * MIB, 21), MIB);
        const file = await Deno.open(`${shm}/in.raw`, {
          write: true,
          create: true,
        });
        await file.truncate(13 * MIB);
        await file.seek(MIB, Deno.SeekMode.Start);
        for (let at = MIB; at < bytes.length;) {
          at += await file.write(bytes.subarray(at));
        }
        file.close();
        for (const way of ["copy_file_range", "auto"] as const) {
          const { copier, done } = await copierBetween(
            `${shm}/in.raw`,
            `${dir}/${way}.raw`,
            13 * MIB,
            { way },
          );
          try {
            // "auto" (ext4: measured) tries the kernel at the fifth
            // segment of a MiB or more: pieces of 2 MiB.
            for (let at = 0; at < 13 * MIB; at += 2 * MIB) {
              const length = Math.min(2 * MIB, 13 * MIB - at);
              copier.copy(at, length, at);
            }
          } finally {
            await done();
          }
          assertEquals(copier.copied.copyFileRange, 0, way);
          assertEquals(copier.copied.readWrite, 12 * MIB, way);
          assertEquals(await Deno.readFile(`${dir}/${way}.raw`), bytes, way);
        }
      });
    } finally {
      await Deno.remove(shm, { recursive: true });
    }
  },
);

/**
 * A child's script that puts stand-ins for libc functions of the main
 * thread (`main`) and of the copy worker (`worker`, in a module that loads
 * the worker's after them): each a function of the real symbols that
 * answers the stand-in, and counts its calls.
 */
function standIns(
  dir: string,
  main: Record<string, string>,
  worker: Record<string, string>,
) {
  const patch = (standIns: Record<string, string>) =>
    `const dlopen = Deno.dlopen;
// deno-lint-ignore no-explicit-any
(globalThis as any).calls = 0;
Object.defineProperty(Deno, "dlopen", {
  // deno-lint-ignore no-explicit-any
  value: (path: string, symbols: any) => {
    const lib = dlopen(path, symbols);
    const real = lib.symbols;
    /** Sets this thread's errno (the real one) to \`e\`. */
    const setErrno = (e: number) => {
      new Int32Array(Deno.UnsafePointerView.getArrayBuffer(real.__errno_location()!, 4))[0] = e;
    };
    // deno-lint-ignore no-explicit-any
    const count = (f: any) => (...args: unknown[]) => ((globalThis as any).calls++, f(...args));
    void setErrno;
    return {
      close: () => lib.close(),
      symbols: { ...real, ${
      Object.entries(standIns).map(([name, f]) => `${name}: count(${f})`).join(
        ", ",
      )
    } },
    };
  },
});`;
  return {
    worker: `${patch(worker)}
await import("${ROOT}streams/_file_copy_worker.ts");`,
    main: `${patch(main)}
let made = 0;
const Real = Worker;
// deno-lint-ignore no-explicit-any
(globalThis as any).Worker = class extends Real {
  constructor(url: string, options: WorkerOptions) {
    made++;
    super(${
      Object.keys(worker).length > 0
    } ? "file://${dir}/worker.ts" : url, options);
  }
};
const { kernelCopier } = await import("${ROOT}streams/_file_copy.ts");`,
  };
}

Deno.test(
  "a file that answers EAGAIN forever fails the copy in about 5 s, after backing off, on either thread and by every way: a CopyFailure with errno 11",
  { ignore: !linux || skip(["timeout"]) },
  () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/in.raw`, pseudoRandom(16 * MIB, 31));
      const eagain = `() => (setErrno(11), -1)`;
      const cases = {
        pread: [{ pread: eagain }, {}, "read_write", Infinity, 0, "read"],
        copy_file_range: [
          { copy_file_range: eagain },
          {},
          "copy_file_range",
          Infinity,
          0,
          "write",
        ],
        splice: [{ splice: eagain }, {}, "splice", Infinity, 512, "read"],
        worker: [{}, { pread: eagain }, "read_write", 0, 0, "read"],
      } as const;
      await Promise.all(
        Object.entries(cases).map(async (
          [kind, [main, worker, way, helperAfter, shift, side]],
        ) => {
          await Deno.mkdir(`${dir}/${kind}`);
          const script = standIns(`${dir}/${kind}`, main, worker);
          await Deno.writeTextFile(`${dir}/${kind}/worker.ts`, script.worker);
          await Deno.writeTextFile(
            `${dir}/${kind}/main.ts`,
            `${script.main}
const input = Deno.openSync("${dir}/in.raw");
const output = Deno.openSync("${dir}/${kind}/out.raw", { read: true, write: true, create: true });
output.truncateSync(${17 * MIB});
const copier = kernelCopier(input.statSync(), output.statSync(), { way: "${way}", helperAfter: ${helperAfter}, helperWhenBusy: true })!;
const started = performance.now();
// The worker's stand-in fails a copy once the worker claims a piece.
for (let i = 0; i < 500; i++) {
  try {
    copier.copy(0, ${16 * MIB}, ${shift});
  } catch (e) {
    // deno-lint-ignore no-explicit-any
    const calls = (globalThis as any).calls;
    console.log(JSON.stringify({ ms: performance.now() - started, calls, name: e.name, side: e.side, errno: e.errno, message: e.message }));
    break;
  }
  await new Promise((r) => setTimeout(r, 10));
}
await copier.close();`,
          );
          // The old copier retried forever: killed after 60 s.
          const r = await run(
            "timeout",
            ["60", Deno.execPath(), "run", "-A", `${dir}/${kind}/main.ts`],
            { allowFail: true },
          );
          assertEquals(r.code, 0, `${kind}: ${r.stderr}`);
          const failed = JSON.parse(r.text.trim());
          assertEquals(failed.name, "CopyFailure", r.text);
          assertEquals(failed.side, side, r.text);
          assertEquals(failed.errno, 11, r.text);
          assertTrue(/errno 11\), 100 times/.test(failed.message), r.text);
          // It waited between tries (100 at once take well under 1 s).
          assertTrue(failed.ms > 4000, r.text);
          if (kind !== "worker") assertEquals(failed.calls, 101, r.text);
        }),
      );
    }),
);

Deno.test(
  "an unexpected error in the copy worker fails the copy with the worker's message and the offset and length of its piece",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/in.raw`, pseudoRandom(16 * MIB, 32));
      const script = standIns(dir, {}, {
        pwrite: `() => { throw new Error("the stand-in pwrite threw"); }`,
      });
      await Deno.writeTextFile(`${dir}/worker.ts`, script.worker);
      await Deno.writeTextFile(
        `${dir}/main.ts`,
        `${script.main}
const input = Deno.openSync("${dir}/in.raw");
const output = Deno.openSync("${dir}/out.raw", { read: true, write: true, create: true });
output.truncateSync(${48 * MIB});
const copier = kernelCopier(input.statSync(), output.statSync(), { way: "read_write", helperAfter: 0, helperWhenBusy: true })!;
for (let i = 0; i < 500; i++) {
  try {
    copier.copy(0, ${16 * MIB}, ${32 * MIB});
  } catch (e) {
    console.log(JSON.stringify({ name: e.name, side: e.side, offset: e.offset, length: e.length, errno: e.errno, message: e.message }));
    break;
  }
  await new Promise((r) => setTimeout(r, 10));
}
await copier.close();`,
      );
      const r = await run(Deno.execPath(), ["run", "-A", `${dir}/main.ts`], {
        allowFail: true,
      });
      assertEquals(r.code, 0, r.stderr);
      const failed = JSON.parse(r.text.trim());
      assertEquals(failed.name, "CopyFailure", r.text);
      assertEquals(
        failed.message,
        "the copy worker failed: the stand-in pwrite threw",
      );
      // The piece of 1 MiB it failed in, where it goes in the output.
      assertEquals(failed.side, "write", r.text);
      assertEquals(failed.length, MIB, r.text);
      assertTrue(
        failed.offset >= 32 * MIB && failed.offset % MIB === 0,
        r.text,
      );
      assertEquals(failed.errno, undefined, r.text);
    }),
);

Deno.test(
  "no copy worker starts for an output on a file system where the kernel copies (NFS, XFS: by /proc/self/mountinfo and fstatfs), one does on ext4; the input's bytes each time",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/in.raw`, pseudoRandom(8 * MIB, 33));
      // f_type of each, as fstatfs gives it.
      const magic = { nfs4: 0x6969, xfs: 0x58465342, ext4: 0xef53 };
      for (const [kind, type] of Object.entries(magic)) {
        const script = standIns(dir, {
          fstatfs:
            `(fd: number, out: BigInt64Array) => (real.fstatfs(fd, out), out[0] = ${type}n, 0)`,
        }, {});
        await Deno.writeTextFile(
          `${dir}/${kind}.ts`,
          `${script.main}
// Every mount of the machine said to be of this kind.
const readText = Deno.readTextFileSync;
Object.defineProperty(Deno, "readTextFileSync", {
  value: (path: string) => {
    const text = readText(path);
    return path === "/proc/self/mountinfo" ? text.replace(/ - \\S+ /g, " - ${kind} ") : text;
  },
});
const input = Deno.openSync("${dir}/in.raw");
const output = Deno.openSync("${dir}/${kind}.raw", { read: true, write: true, create: true });
output.truncateSync(${8 * MIB});
const copier = kernelCopier(input.statSync(), output.statSync(), { helperAfter: 0, helperWhenBusy: true })!;
copier.copy(0, ${8 * MIB}, 0);
await copier.close();
console.log(JSON.stringify({ made, copied: copier.copied }));`,
        );
        const r = await run(
          Deno.execPath(),
          ["run", "-A", `${dir}/${kind}.ts`],
          {
            allowFail: true,
          },
        );
        assertEquals(r.code, 0, r.stderr);
        const { made, copied } = JSON.parse(r.text.trim());
        assertEquals(made, kind === "ext4" ? 1 : 0, `${kind}: ${r.text}`);
        if (kind !== "ext4") {
          assertEquals(copied.copyFileRange, 8 * MIB, `${kind}: ${r.text}`);
        }
        assertEquals(
          await sha256File(`${dir}/${kind}.raw`),
          await sha256File(`${dir}/in.raw`),
          kind,
        );
      }
    }),
);

Deno.test(
  "a machine found busy when the copier starts keeps it on one thread, asked once: no copy worker, the input's bytes",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/in.raw`, pseudoRandom(8 * MIB, 34));
      const script = standIns(dir, {}, {});
      await Deno.writeTextFile(
        `${dir}/busy.ts`,
        `${script.main}
// Tasks waited for a CPU 90 % of the last 10 s, and 9 run this instant.
const said: Record<string, string> = {
  "/proc/pressure/cpu": "some avg10=90.00 avg60=90.00 avg300=90.00 total=1\\n",
  "/proc/loadavg": "9.00 9.00 9.00 9/300 1\\n",
};
let asked = 0;
const readText = Deno.readTextFileSync;
Object.defineProperty(Deno, "readTextFileSync", {
  value: (path: string) => path in said ? (asked++, said[path]) : readText(path),
});
const input = Deno.openSync("${dir}/in.raw");
const output = Deno.openSync("${dir}/out.raw", { read: true, write: true, create: true });
output.truncateSync(${8 * MIB});
const copier = kernelCopier(input.statSync(), output.statSync(), { way: "read_write", helperAfter: 0 })!;
for (let at = 0; at < ${8 * MIB}; at += ${2 * MIB}) copier.copy(at, ${
          2 * MIB
        }, at);
await copier.close();
console.log(JSON.stringify({ made, asked, copied: copier.copied }));`,
      );
      const r = await run(Deno.execPath(), ["run", "-A", `${dir}/busy.ts`], {
        allowFail: true,
      });
      assertEquals(r.code, 0, r.stderr);
      const { made, asked, copied } = JSON.parse(r.text.trim());
      assertEquals(made, 0, r.text);
      // The pressure and the run queue, read once each.
      assertEquals(asked, 2, r.text);
      assertEquals(copied.readWrite, 8 * MIB, r.text);
      assertEquals(
        await sha256File(`${dir}/out.raw`),
        await sha256File(`${dir}/in.raw`),
      );
    }),
);

Deno.test(
  "data-range queries move no handle's file position: a write in flight on another handle of the same file lands whole",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/disk.raw`;
      for (let round = 0; round < 3; round++) {
        const f = await Deno.open(path, {
          write: true,
          create: true,
          truncate: true,
        });
        await f.truncate(16 << 20);
        await f.seek(14 << 20, Deno.SeekMode.Start);
        await f.write(new Uint8Array(1 << 20).fill(7));
        f.close();
        const writer = await fromFile(path, { write: true });
        const reader = await fromFile(path);
        assertTrue((await reader.dataRanges!(0, 16 << 20)) !== undefined);
        // 8 MiB at 4 MiB go in several pieces, a seek and writes each;
        // the other handle asks for data ranges between them.
        let pending = true;
        const written = writer.write(
          4 << 20,
          new Uint8Array(8 << 20).fill(0xab),
        )
          .then(() => pending = false);
        for (let i = 0; i < 2000 && pending; i++) {
          await new Promise((r) => setTimeout(r, 0));
          await reader.dataRanges!(0, 16 << 20);
        }
        await written;
        await writer.close();
        await reader.close();
        const back = await Deno.readFile(path);
        assertEquals(back.length, 16 << 20);
        const expected = new Uint8Array(16 << 20);
        expected.fill(0xab, 4 << 20, 12 << 20);
        expected.fill(7, 14 << 20, 15 << 20);
        assertTrue(
          back.every((v, i) => v === expected[i]),
          `round ${round}: the write landed elsewhere`,
        );
      }
    }),
);

Deno.test(
  "a kernel copier's own descriptors leave the positions of the handles it was given where they were",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      const data = pseudoRandom(3 << 20, 21);
      const from = `${dir}/in.raw`;
      const out = await Deno.open(from, { write: true, create: true });
      await out.truncate(8 << 20);
      await out.seek(4 << 20, Deno.SeekMode.Start);
      for (let n = 0; n < data.length;) n += await out.write(data.subarray(n));
      out.close();
      // No paths: the copier finds Deno's descriptors and opens its own
      // through /proc/self/fd.
      const input = await Deno.open(from);
      const output = await Deno.open(`${dir}/out.raw`, {
        read: true,
        write: true,
        create: true,
      });
      await output.truncate(8 << 20);
      const copier = kernelCopier(input.statSync(), output.statSync(), {
        way: "copy_file_range",
      })!;
      try {
        await input.seek(123, Deno.SeekMode.Start);
        await output.seek(456, Deno.SeekMode.Start);
        // The data ranges are found by lseek (SEEK_DATA, SEEK_HOLE).
        assertEquals(copier.copy(0, 8 << 20, 0), 3 << 20);
        assertEquals(await input.seek(0, Deno.SeekMode.Current), 123);
        assertEquals(await output.seek(0, Deno.SeekMode.Current), 456);
      } finally {
        await copier.close();
        input.close();
        output.close();
      }
      const back = await Deno.readFile(`${dir}/out.raw`);
      assertTrue(
        back.subarray(4 << 20, 7 << 20).every((v, i) => v === data[i]),
      );
    }),
);

Deno.test(
  "a raw file cut short after it was opened: its map is read, not taken as holes, and the read says where it ended",
  { ignore: !linux },
  () =>
    withTemp(async (dir) => {
      const path = `${dir}/disk.raw`;
      await Deno.writeFile(path, pseudoRandom(2 << 20, 22));
      const file = await fromFile(path);
      const image = await open(file, { format: "raw" });
      assertEquals(await file.dataRanges!(0, 2 << 20), [[0, 2 << 20]]);
      await Deno.truncate(path, 1 << 20);
      assertEquals(await file.dataRanges!(0, 2 << 20), undefined);
      let failed: unknown;
      try {
        await allocatedBytes(image);
      } catch (e) {
        failed = e;
      }
      assertTrue(failed instanceof Error, "a cut-short raw was counted");
      await image.close?.();
    }),
);
