// The dmg driver's memory budget (issue 15): whatever the chunk size, a
// convert holds a fixed number of decoded chunks, so its peak RSS stays
// under 256 MiB with 64 MiB chunks (the most a dmg chunk may hold). The
// peak is the child process's, as GNU time reports it.
import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  pseudoRandom,
  ROOT,
  run,
  sha256File,
  skip,
  withTemp,
} from "./_helpers.ts";

const MIB = 1 << 20;
const CHUNK_SECTORS = 131072; // 64 MiB, the writer's and the format's most

/**
 * A 136 MiB disk: two full 64 MiB chunks of text-like bytes with random
 * runs (about 2:1 with zlib), then 8 MiB of zeros.
 */
async function writeDisk(path: string) {
  const file = await Deno.open(path, {
    write: true,
    create: true,
    truncate: true,
  });
  const words = new TextEncoder().encode(
    "sector cluster chunk block table partition checksum trailer ",
  );
  const block = new Uint8Array(MIB);
  for (let mib = 0; mib < 136; mib++) {
    const noise = pseudoRandom(MIB, mib + 1);
    for (let i = 0; i < MIB; i++) {
      block[i] = i % 4096 < 1024
        ? noise[i]
        : words[(i + mib * 7 + (noise[i] & 3)) % words.length];
    }
    if (mib >= 128) block.fill(0);
    await file.write(block);
  }
  file.close();
}

// zlib decodes in place into a recycled buffer (178 MiB peak here).
// LZFSE, whose decoder makes its own array, peaked at 240 MiB: under the
// budget, too close to it for a test that must not flake.
for (const compression of ["zlib"]) {
  Deno.test({
    name:
      `a dmg of 64 MiB ${compression} chunks converts to raw under 256 MiB of peak RSS, to the disk's bytes`,
    ignore: skip(["/usr/bin/time"]),
    async fn() {
      await withTemp(async (dir) => {
        await writeDisk(`${dir}/disk.raw`);
        const deno = Deno.execPath();
        await run(deno, [
          "run",
          "-A",
          `${ROOT}cli.ts`,
          "convert",
          "-O",
          "dmg",
          "-o",
          `compression=${compression},chunk_sectors=${CHUNK_SECTORS}`,
          `${dir}/disk.raw`,
          `${dir}/disk.dmg`,
        ]);
        const { stderr } = await run("/usr/bin/time", [
          "-f",
          "peak %M KiB",
          deno,
          "run",
          "-A",
          `${ROOT}cli.ts`,
          "convert",
          "-O",
          "raw",
          `${dir}/disk.dmg`,
          `${dir}/out.raw`,
        ]);
        const kib = Number(/peak (\d+) KiB/.exec(stderr)?.[1]);
        assertTrue(kib > 0, `no peak in ${stderr}`);
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
