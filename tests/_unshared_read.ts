// Run by tests/dmg_test.ts and tests/cloop_test.ts as a subprocess, as a
// browser page that is not cross-origin isolated runs the drivers: no
// native inflater (node:zlib hidden) and no SharedArrayBuffer, so chunks
// and blocks go to the decode workers moved, not shared
// (`CodecPool.spread`). Reads IMAGE whole in 2 MiB reads with `readInto`
// and prints, as JSON, the SHA-256 of what it read and the decode
// workers' job count, or the error the reads gave.
//
//   deno run -A tests/_unshared_read.ts IMAGE
import "./_no_native_inflate.ts";

// Before the drivers load (./_helpers.ts loads them too): dmg looks for
// shared memory once.
Reflect.deleteProperty(globalThis, "SharedArrayBuffer");
const { decodeWorkerStats, fromBytes, open } = await import("../mod.ts");
const { sha256Hex } = await import("./_helpers.ts");

const image = await open(fromBytes(await Deno.readFile(Deno.args[0])));
const whole = new Uint8Array(image.size);
try {
  const step = 2 << 20;
  for (let at = 0; at < image.size; at += step) {
    await image.readInto!(
      at,
      whole.subarray(at, Math.min(at + step, image.size)),
    );
  }
  console.log(JSON.stringify({
    sha256: sha256Hex(whole),
    jobs: decodeWorkerStats().jobs,
    shared: typeof SharedArrayBuffer,
  }));
} catch (e) {
  console.log(
    JSON.stringify({ error: `${(e as Error).name}: ${(e as Error).message}` }),
  );
} finally {
  await image.close?.();
}
