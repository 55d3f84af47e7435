/**
 * `convert --hash` to a format written whole (dmg, cloop, qcow, vmdk
 * streamOptimized) hashes the bytes the encoder reads: the input is
 * decoded once, not twice, and `dataBytes` means what it means for raw
 * output (issue 17).
 */
import { assertEquals, assertTrue } from "./_asserts.ts";
import { convert, memorySink, open } from "../mod.ts";
import { countingSource, pseudoRandom, sha256Hex } from "./_helpers.ts";

const MiB = 1 << 20;

/** A disk with data, a zero run and data again, as a zlib dmg. */
async function dmgOf(disk: Uint8Array): Promise<Uint8Array> {
  const { fromBytes } = await import("../mod.ts");
  const sink = memorySink();
  await convert(fromBytes(disk), sink, { format: "dmg" });
  return sink.bytes();
}

for (
  const [format, options] of [
    ["dmg", {}],
    ["dmg", { compression: "bzip2" }],
    ["cloop", {}],
    ["qcow", {}],
    ["vmdk", { subformat: "streamOptimized" }],
  ] as [string, Record<string, string>][]
) {
  Deno.test(`convert --hash to ${format} ${JSON.stringify(options)} decodes the input once and hashes the whole disk`, async () => {
    const disk = new Uint8Array(9 * MiB);
    disk.set(pseudoRandom(3 * MiB, 1), 0);
    disk.set(pseudoRandom(2 * MiB + 1000, 2), 6 * MiB);
    const file = await dmgOf(disk);
    const counted = countingSource(file);
    const image = await open(counted.source, {});
    const result = await convert(image, memorySink(), {
      format,
      options,
      hash: true,
      compress: format === "qcow",
    });
    assertEquals(result.sha256, sha256Hex(disk));
    // One pass reads the dmg's chunks once (plus its trailer and tables).
    assertTrue(
      counted.bytesRead() < file.length * 1.3 + 64 * 1024,
      `${counted.bytesRead()} bytes read of a ${file.length}-byte dmg`,
    );
    // dataBytes means the same for every output: the non-zero 4 KiB granules.
    assertEquals(result.dataBytes, 5 * MiB + 4096);
    const raw = await convert(image, memorySink(), { hash: true });
    assertEquals(raw.dataBytes, 5 * MiB + 4096);
  });
}
