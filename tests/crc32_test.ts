import { assertEquals } from "./_asserts.ts";
import {
  crc32,
  crc32Combine,
  crc32Table,
  crc32Wasm,
  crc32Zeros,
} from "../drivers/codecs/crc32.ts";
import { pseudoRandom } from "./_helpers.ts";
import { crc32 as nodeCrc32 } from "node:zlib";

const text = (s: string) => new TextEncoder().encode(s);

Deno.test("crc32 gives the standard check values", () => {
  assertEquals(crc32(new Uint8Array(0)), 0);
  assertEquals(crc32(text("123456789")), 0xcbf43926);
  assertEquals(crc32(text("a")), 0xe8b7be43);
  assertEquals(
    crc32(text("The quick brown fox jumps over the lazy dog")),
    0x414fa339,
  );
  assertEquals(crc32(new Uint8Array(32)), 0x190a55ad);
  assertEquals(crc32(new Uint8Array(32).fill(0xff)), 0xff6cab0b);
});

Deno.test("the table code agrees with node:zlib on every length up to 300 and on 1 MiB", () => {
  const data = pseudoRandom(1 << 20, 7);
  for (let n = 0; n <= 300; n++) {
    const piece = data.subarray(n, n + n);
    assertEquals(crc32Table(piece), nodeCrc32(piece) >>> 0, `length ${n}`);
  }
  assertEquals(crc32Table(data), nodeCrc32(data) >>> 0);
  assertEquals(crc32(data), crc32Table(data));
});

Deno.test("the WebAssembly code (browsers) agrees with node:zlib on lengths around its 8-byte steps, its folding threshold and 1 MiB pieces, from any previous value", () => {
  const data = pseudoRandom(3 << 20, 11);
  const lengths = [0, 1, 7, 8, 9, 15, 16, 17, 1023, 1024, 65537];
  // Inputs of 2 * 3006 words and more are folded (crc32_fold in
  // _wasm/inflate.c); the last 3006 words and the odd bytes are not.
  const fold = 2 * 3006 * 8;
  lengths.push(fold - 1, fold, fold + 1, fold + 7, fold + 8, fold + 8 * 3006);
  lengths.push((1 << 20) - 1, 1 << 20, (1 << 20) + 1, (3 << 20) - 3);
  for (const n of lengths) {
    const piece = data.subarray(3, 3 + n);
    for (const previous of [0, 0xcbf43926, 0xffffffff]) {
      assertEquals(
        crc32Wasm(piece, previous),
        nodeCrc32(piece, previous) >>> 0,
        `length ${n}, previous ${previous}`,
      );
    }
  }
});

Deno.test("crc32 continues from a previous value across any split", () => {
  const data = pseudoRandom(5000, 3);
  const whole = crc32(data);
  for (const split of [0, 1, 7, 8, 63, 64, 65, 4999, 5000]) {
    assertEquals(
      crc32(data.subarray(split), crc32(data.subarray(0, split))),
      whole,
    );
    assertEquals(
      crc32Table(data.subarray(split), crc32Table(data.subarray(0, split))),
      whole,
    );
  }
});

Deno.test("crc32Combine joins the CRCs of two pieces", () => {
  const data = pseudoRandom(100000, 11);
  const whole = crc32(data);
  for (const split of [0, 1, 3, 1000, 65536, 99999, 100000]) {
    const a = data.subarray(0, split);
    const b = data.subarray(split);
    assertEquals(crc32Combine(crc32(a), crc32(b), b.length), whole);
  }
});

Deno.test("crc32Zeros equals the CRC of that many zero bytes after the previous ones", () => {
  const head = pseudoRandom(100, 5);
  for (const n of [0, 1, 2, 511, 512, 1 << 20]) {
    const joined = new Uint8Array(100 + n);
    joined.set(head);
    assertEquals(crc32Zeros(crc32(head), n), crc32(joined), `zeros ${n}`);
    assertEquals(crc32Zeros(0, n), crc32(new Uint8Array(n)));
  }
  // Sizes past 4 GiB stay exact: 2^33 zero bytes in two halves.
  const half = crc32Zeros(0, 2 ** 32);
  assertEquals(crc32Zeros(half, 2 ** 32), crc32Zeros(0, 2 ** 33));
});
