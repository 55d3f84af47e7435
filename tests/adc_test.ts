import { assertEquals, assertTrue as assert } from "./_asserts.ts";
import { decode, decodeInto, encode } from "../drivers/codecs/adc.ts";
import { CodecError } from "../streams/errors.ts";
import { pseudoRandom, rejects } from "./_helpers.ts";

Deno.test("adc decodes literal runs and both match forms", async () => {
  // "abcd" literal; short match len 3 dist 4 ("abc"); long match len 5 dist 7.
  const input = new Uint8Array([
    0x83,
    0x61,
    0x62,
    0x63,
    0x64, // literal abcd
    0x00,
    0x03, // 00 0000 00, dist 3+1: "abc"
    0x41,
    0x00,
    0x06, // len 1+4=5, dist 6+1: "bcdab"
  ]);
  const out = await decode(input, 12);
  assertEquals(new TextDecoder().decode(out), "abcdabcabcda");
});

Deno.test("adc decodes overlapping matches as repeated bytes", async () => {
  const out = await decode(new Uint8Array([0x80, 0x78, 0x3c, 0x00]), 19);
  assertEquals(new TextDecoder().decode(out), "x".repeat(19));
});

Deno.test("adc round-trips text, zeros, random bytes and a mixture", async () => {
  const random = pseudoRandom(70000, 9);
  const text = new TextEncoder().encode(
    "UDIF chunk, Apple Data Compression. ".repeat(3000),
  );
  const mixed = new Uint8Array(300000);
  mixed.set(random.subarray(0, 50000), 1000);
  mixed.set(text.subarray(0, 90000), 120000);
  for (
    const data of [
      new Uint8Array(0),
      new Uint8Array(1),
      random,
      text,
      new Uint8Array(1 << 20),
      mixed,
    ]
  ) {
    const packed = await encode(data);
    assertEquals(await decode(packed, data.length), data);
  }
  assert((await encode(text)).length < text.length / 10);
  assert(
    (await encode(random)).length <= random.length + random.length / 128 + 1,
  );
});

Deno.test("adc refuses streams that decode to more or fewer bytes than declared", async () => {
  const packed = await encode(new TextEncoder().encode("hello hello hello"));
  await rejects(
    () => decode(packed, 16),
    CodecError,
    /more than the declared 16/,
  );
  await rejects(
    () => decode(packed, 18),
    CodecError,
    /input ends after 17 of 18/,
  );
  const extra = new Uint8Array(packed.length + 1);
  extra.set(packed);
  await rejects(() => decode(extra, 17), CodecError, /1 bytes of input left/);
});

Deno.test("adc refuses a match reaching before the start and truncated tokens", async () => {
  await rejects(
    () => decode(new Uint8Array([0x00, 0x00]), 3),
    CodecError,
    /before the start/,
  );
  await rejects(
    () => decode(new Uint8Array([0x85, 1, 2]), 6),
    CodecError,
    /runs past the input/,
  );
  await rejects(
    () => decode(new Uint8Array([0x80, 1, 0x40, 0]), 10),
    CodecError,
    /inside a match/,
  );
  await rejects(
    () => decode(new Uint8Array([0x80, 1, 0x04]), 10),
    CodecError,
    /inside a match/,
  );
});

Deno.test("adc decodeInto never writes past the buffer it is given", () => {
  const backing = new Uint8Array(20).fill(0xee);
  const out = backing.subarray(0, 10);
  try {
    decodeInto(new Uint8Array([0x80, 1, 0x3c, 0x00]), out);
  } catch (e) {
    assert(e instanceof CodecError);
  }
  assertEquals(Array.from(backing.subarray(10)), new Array(10).fill(0xee));
});
