// The zlib codec: decodeInto fills a caller's buffer with exactly what
// decode returns, and refuses what decode refuses, with CodecErrors.
import { assertEquals } from "./_asserts.ts";
import { pseudoRandom, rejects } from "./_helpers.ts";
import {
  decode,
  decodeInto,
  type DeflateFormat,
  encode,
} from "../drivers/codecs/zlib.ts";
import { CodecError } from "../mod.ts";

const text = new TextEncoder().encode(
  "a lazy dog sector cluster ".repeat(3000),
);
const formats: DeflateFormat[] = ["deflate", "deflate-raw"];

Deno.test("zlib decodeInto gives the bytes decode gives, stream after stream", async () => {
  for (const format of formats) {
    for (const input of [text, pseudoRandom(70_000, 1), new Uint8Array(1)]) {
      const packed = await encode(input, format);
      const out = new Uint8Array(input.length).fill(0xee);
      await decodeInto(packed, out, format);
      assertEquals(out, input);
      assertEquals(await decode(packed, input.length, format), input);
    }
  }
});

Deno.test("zlib decodeInto refuses streams too short, too long, cut or corrupt, and works on after", async () => {
  for (const format of formats) {
    const packed = await encode(text, format);
    const into = (n: number) => new Uint8Array(n);
    await rejects(
      () => decodeInto(packed, into(text.length + 1), format),
      CodecError,
      /inflates to 78000 bytes, 78001 declared/,
    );
    await rejects(
      () => decodeInto(packed, into(text.length - 1), format),
      CodecError,
      /more than the declared 77999 bytes/,
    );
    // Cut in the middle, and (zlib) short of its Adler-32 trailer.
    await rejects(
      () =>
        decodeInto(packed.subarray(0, packed.length >> 1), into(78000), format),
      CodecError,
      /corrupt stream/,
    );
    if (format === "deflate") {
      await rejects(
        () => decodeInto(packed.subarray(0, packed.length - 2), into(78000)),
        CodecError,
        /corrupt stream/,
      );
    }
    const bad = packed.slice();
    bad.fill(0xff, 2, 40);
    await rejects(
      () => decodeInto(bad, into(text.length), format),
      CodecError,
      /corrupt stream/,
    );
    const out = into(text.length);
    await decodeInto(packed, out, format);
    assertEquals(out, text);
  }
});

Deno.test("without a native inflater (browsers) streams inflate in WebAssembly, or (no WebAssembly) stored streams are copied and the rest go through DecompressionStream; every bad stream is a CodecError", async () => {
  for (const mode of ["wasm", "stream"]) {
    const o = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        new URL("./_zlib_no_native.ts", import.meta.url).pathname,
        mode,
      ],
      stdout: "piped",
      stderr: "piped",
    }).output();
    if (!o.success) throw new Error(new TextDecoder().decode(o.stderr));
    const { native, results } = JSON.parse(new TextDecoder().decode(o.stdout));
    assertEquals(native, false);
    type Result = {
      name: string;
      decode: true | string;
      decodeInto: true | string;
      streams: number;
    };
    for (const r of results as Result[]) {
      // Bytes after the stream's end: node:zlib and our inflater leave
      // them alone (qcow's clusters are whole sectors); a browser's
      // DecompressionStream refuses them.
      const good = !/poked|cut|declared/.test(r.name) &&
        (mode === "wasm" || !/after/.test(r.name));
      if (good) {
        assertEquals([r.name, r.decode, r.decodeInto], [r.name, true, true]);
      } else {
        for (const got of [r.decode, r.decodeInto]) {
          assertEquals(typeof got, "string", r.name);
          assertEquals(
            (got as string).startsWith("CodecError: zlib: "),
            true,
            `${r.name}: ${got}`,
          );
        }
      }
      // WebAssembly makes no DecompressionStream; without it stored
      // streams are copied and the others (decode, then decodeInto) go
      // through one each.
      assertEquals(
        r.streams,
        mode === "wasm" || (r.name.startsWith("stored") && good) ? 0 : 2,
        `${mode}: ${r.name}`,
      );
    }
  }
});
