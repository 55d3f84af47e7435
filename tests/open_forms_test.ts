/**
 * `open` takes what a script has at hand (issue 17): a Source, a Promise of
 * one (`open(fromUrl(url))` without an inner await), a URL, a path, a Blob,
 * bytes; anything else is a TypeError saying what it got. A writable open
 * needs one handle, given once.
 */
import { assertEquals, assertMatch } from "./_asserts.ts";
import {
  convert,
  fromBytes,
  fromFile,
  fromUrl,
  type ImageInput,
  memorySink,
  open,
} from "../mod.ts";
import { fileServer, rejects, ROOT, sha256Hex, withTemp } from "./_helpers.ts";

const DEMO = `${ROOT}testdata/demo.dmg`;

async function diskHash(input: ImageInput): Promise<string> {
  const image = await open(input);
  try {
    const sink = memorySink();
    await convert(image, sink);
    return sha256Hex(sink.bytes());
  } finally {
    await image.close?.();
  }
}

Deno.test("open takes a Source, a Promise of one, a URL (object or string), a path, a Blob, bytes and an ArrayBuffer, to the same disk", async () => {
  const bytes = await Deno.readFile(DEMO);
  const expected = await diskHash(fromBytes(bytes));
  const { server, base } = fileServer(`${ROOT}testdata`);
  try {
    const url = `${base}/demo.dmg`;
    const inputs: [string, () => ImageInput][] = [
      ["a Promise of a Source", () => fromUrl(url)],
      ["a URL", () => new URL(url)],
      ["a URL string", () => url],
      ["a path", () => DEMO],
      ["a Blob", () => new Blob([bytes])],
      ["bytes", () => bytes],
      ["an ArrayBuffer", () => bytes.slice().buffer],
    ];
    for (const [what, input] of inputs) {
      assertEquals(await diskHash(input()), expected, what);
    }
  } finally {
    await server.shutdown();
  }
});

Deno.test("open refuses anything else with a TypeError naming what it got", async () => {
  for (
    const [input, got] of [
      [42, "number"],
      [{ size: 3 }, "an Object"],
      [null, "null"],
      [new Map(), "a Map"],
    ] as [unknown, string][]
  ) {
    await rejects(
      () => open(input as ImageInput),
      TypeError,
      new RegExp(
        `expected a Source, a Promise of one, a URL, a path, a Blob or bytes, but got ${got}$`,
      ),
    );
  }
  await rejects(
    () => open(new URL("file:///etc/passwd")),
    TypeError,
    /a URL must be http: or https:/,
  );
});

Deno.test("a writable open of a path, or of a file opened for writing, writes through it: no second handle", async () => {
  await withTemp(async (dir) => {
    const path = `${dir}/disk.raw`;
    await Deno.writeFile(path, new Uint8Array(1 << 20));
    const image = await open(path, { writable: true, format: "raw" });
    await image.write!(4096, new Uint8Array([1, 2, 3]));
    await image.flush?.();
    await image.close?.();
    assertEquals(
      (await Deno.readFile(path)).subarray(4096, 4099),
      new Uint8Array([1, 2, 3]),
    );
    const file = await fromFile(path, { write: true });
    const again = await open(file, { writable: true, format: "raw" });
    await again.write!(0, new Uint8Array([9]));
    await again.flush?.();
    await file.close();
    assertEquals((await Deno.readFile(path))[0], 9);
    // A read-only source cannot be written: said plainly.
    const e = await rejects(
      () => open(fromBytes(new Uint8Array(512)), { writable: true }),
      Error,
    );
    assertMatch(e.message, /writ/);
  });
});
