// The memory budget of compressed files (issue 15). Read through their
// index: an `.xz` of many blocks (`xz -T0` cuts 24 MiB blocks at -6) and a
// `.zst` of many frames decode into a fixed number of reused buffers,
// shared with the workers, so a convert stays under 256 MiB of peak RSS.
// Read front to back (one zstd frame, gzip), they decode straight into
// the output through their window and a few buffers.
// Before, each block or frame was a fresh array (a few cached, more
// decoding ahead, some on this thread beside the workers): these converts
// peaked at 435 MiB (xz) and 317 MiB (zstd). The peak is the child
// process's, as GNU time reports it.
import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  convertPeakKiB,
  run,
  sha256File,
  skip,
  withTemp,
  writeTextLikeDisk,
} from "./_helpers.ts";

const MIB = 1 << 20;
const DISK_MIB = 200;
const SEGMENT_MIB = 24;

/** Packs `disk` as a `.zst` of one frame per 24 MiB (as pzstd does, in other sizes). */
async function packFrames(dir: string, disk: string, out: string) {
  const bytes = await Deno.readFile(disk);
  const file = await Deno.open(out, { write: true, create: true });
  try {
    for (let at = 0; at < bytes.length; at += SEGMENT_MIB * MIB) {
      await Deno.writeFile(
        `${dir}/piece`,
        bytes.subarray(at, at + SEGMENT_MIB * MIB),
      );
      await run("zstd", [
        "-q",
        "-f",
        "-3",
        `${dir}/piece`,
        "-o",
        `${dir}/piece.zst`,
      ]);
      await file.write(await Deno.readFile(`${dir}/piece.zst`));
    }
  } finally {
    file.close();
  }
}

for (
  const [name, tool, pack] of [
    [
      `an .xz of ${SEGMENT_MIB} MiB blocks (xz -T0 --block-size)`,
      "xz",
      (dir: string, disk: string, out: string) =>
        run("sh", [
          "-c",
          `xz -T0 -1 --block-size=${SEGMENT_MIB}MiB -c ${disk} > ${out}`,
        ]).then(() => dir),
    ],
    [
      `a .zst of ${SEGMENT_MIB} MiB frames`,
      "zstd",
      packFrames,
    ],
    // Read front to back, decoded straight into the output (its window,
    // 16 MiB of buffers waiting for their writes, no scratch file).
    [
      "a .zst of one frame (zstd -T0 -3)",
      "zstd",
      (dir: string, disk: string, out: string) =>
        run("sh", ["-c", `zstd -q -T0 -3 -c ${disk} > ${out}`]).then(() => dir),
    ],
    [
      "a .gz",
      "gzip",
      (dir: string, disk: string, out: string) =>
        run("sh", ["-c", `gzip -1 -c ${disk} > ${out}`]).then(() => dir),
    ],
  ] as const
) {
  Deno.test({
    name:
      `${name} converts to raw under 256 MiB of peak RSS, to the disk's bytes`,
    ignore: skip(["/usr/bin/time", tool]),
    async fn() {
      await withTemp(async (dir) => {
        await writeTextLikeDisk(`${dir}/disk.raw`, DISK_MIB);
        await pack(dir, `${dir}/disk.raw`, `${dir}/disk.img.${tool}`);
        const kib = await convertPeakKiB(
          `${dir}/disk.img.${tool}`,
          `${dir}/out.raw`,
        );
        assertEquals(
          await sha256File(`${dir}/out.raw`),
          await sha256File(`${dir}/disk.raw`),
        );
        console.log(`peak RSS ${Math.round(kib / 1024)} MiB`);
        assertTrue(
          kib < 256 * 1024,
          `peak RSS ${Math.round(kib / 1024)} MiB, over 256 MiB`,
        );
      });
    },
  });
}
