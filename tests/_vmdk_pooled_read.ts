// Run by tests/vmdk_test.ts as a subprocess, as a browser would run it (no
// native inflater): reads IMAGE (a streamOptimized vmdk) in READ-byte
// reads through a counting source and prints, as JSON, per read: the
// source reads and decode-worker calls it cost and whether its bytes equal
// those of RAW (qemu-img's conversion of IMAGE). With BAD set, prints the
// error the whole read of the image gives instead. With INTO set, reads
// with readInto (convert's path) into one reused buffer, filled with 0xee
// before each read.
//
//   deno run -A tests/_vmdk_pooled_read.ts IMAGE RAW READ
import "./_no_native_inflate.ts";
import { decodeWorkerStats, open } from "../mod.ts";
import { countingSource } from "./_helpers.ts";

const [imagePath, rawPath, readSize] = Deno.args;
const counted = countingSource(await Deno.readFile(imagePath));
const raw = await Deno.readFile(rawPath);
const image = await open(counted.source, { format: "vmdk" });
const step = Number(readSize);
const into = Deno.env.get("INTO") ? new Uint8Array(step) : undefined;
/** The bytes at `at`, read as a conversion (INTO) or a caller reads them. */
async function readAt(at: number, length: number): Promise<Uint8Array> {
  if (!into) return await image.read(at, length);
  const view = into.subarray(0, length).fill(0xee);
  await image.readInto!(at, view);
  return view;
}
if (Deno.env.get("BAD")) {
  try {
    for (let at = 0; at < image.size; at += step) {
      await readAt(at, Math.min(step, image.size - at));
    }
    console.log(JSON.stringify({ error: null }));
  } catch (e) {
    console.log(
      JSON.stringify({
        error: `${(e as Error).name}: ${(e as Error).message}`,
      }),
    );
  }
} else {
  const reads = [];
  for (let at = 0; at < image.size; at += step) {
    const length = Math.min(step, image.size - at);
    const before = counted.reads();
    const jobs = decodeWorkerStats().jobs;
    const bytes = await readAt(at, length);
    const same = bytes.length === length &&
      bytes.every((b, i) => b === raw[at + i]);
    reads.push({
      at,
      sourceReads: counted.reads() - before,
      workerCalls: decodeWorkerStats().jobs - jobs,
      same,
    });
  }
  console.log(
    JSON.stringify({ reads, nativeInflate: typeof globalThis.process }),
  );
}
await image.close?.();
