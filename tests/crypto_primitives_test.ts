// The block ciphers and hashes written here for encrypted Apple disk
// images: 3DES-EDE-CBC (streams/_des.ts), SHA-1 and HMAC-SHA1
// (streams/_sha1.ts), AES-192/256 of the table AES (streams/_aes.ts),
// each against published vectors and an independent implementation
// (node:crypto, WebCrypto, the openssl command).
import crypto from "node:crypto";
import {
  SBOXES,
  tripleDesCbcDecrypt,
  tripleDesDecryptBlock,
  tripleDesEncryptBlock,
  tripleDesKey,
} from "../streams/_des.ts";
import { hmacSha1, sha1 } from "../streams/_sha1.ts";
import { decryptBlock, encryptBlock, expandKey } from "../streams/_aes.ts";
import { assertEquals, assertTrue } from "./_asserts.ts";
import { pseudoRandom, run, skip } from "./_helpers.ts";

const hex = (b: Uint8Array) =>
  Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
const fromHex = (s: string) =>
  Uint8Array.from(s.match(/../g)!, (h) => parseInt(h, 16));

Deno.test("each DES S-box row is a permutation of 0..15", () => {
  for (const box of SBOXES) {
    for (let row = 0; row < 4; row++) {
      const values = box.slice(row * 16, row * 16 + 16);
      assertEquals([...values].sort((a, b) => a - b), [
        ...Array(16).keys(),
      ]);
    }
  }
});

Deno.test("3DES with K1 = K2 = K3 is single DES: the textbook vector", () => {
  // Key 133457799BBCDFF1, plaintext 0123456789ABCDEF -> 85E813540F0AB405.
  const k = fromHex("133457799bbcdff1");
  const key = tripleDesKey(Uint8Array.from([...k, ...k, ...k]));
  const out = tripleDesEncryptBlock(key, fromHex("0123456789abcdef"));
  assertEquals(hex(out), "85e813540f0ab405");
  assertEquals(hex(tripleDesDecryptBlock(key, out)), "0123456789abcdef");
});

Deno.test("3DES-EDE-CBC decrypts what node:crypto's des-ede3-cbc encrypts", () => {
  for (let t = 0; t < 12; t++) {
    const key = pseudoRandom(24, 100 + t);
    const iv = pseudoRandom(8, 200 + t);
    const plain = pseudoRandom(8 * (1 + t), 300 + t);
    const c = crypto.createCipheriv("des-ede3-cbc", key, iv);
    c.setAutoPadding(false);
    const sealed = new Uint8Array(Buffer.concat([c.update(plain), c.final()]));
    assertEquals(tripleDesCbcDecrypt(key, iv, sealed), plain);
  }
});

Deno.test(
  "3DES-EDE-CBC decrypts what the openssl command encrypts",
  { ignore: skip(["openssl"]) },
  async () => {
    const key = pseudoRandom(24, 7);
    const iv = pseudoRandom(8, 8);
    const plain = pseudoRandom(64, 9);
    const r = await run("openssl", [
      "enc",
      "-des-ede3-cbc",
      "-nopad",
      "-K",
      hex(key),
      "-iv",
      hex(iv),
    ], { stdin: plain });
    assertEquals(tripleDesCbcDecrypt(key, iv, r.stdout), plain);
  },
);

Deno.test("SHA-1 and HMAC-SHA1 agree with WebCrypto at every padding edge", async () => {
  assertEquals(
    hex(sha1(new TextEncoder().encode("abc"))),
    "a9993e364706816aba3e25717850c26c9cd0d89d",
  );
  for (const n of [0, 1, 4, 55, 56, 63, 64, 65, 119, 120, 1000]) {
    const message = pseudoRandom(n, n + 1);
    assertEquals(
      sha1(message),
      new Uint8Array(await crypto.subtle.digest("SHA-1", message)),
    );
    for (const keyLength of [1, 20, 64, 65, 100]) {
      const key = pseudoRandom(keyLength, keyLength);
      const web = await crypto.subtle.importKey(
        "raw",
        key,
        { name: "HMAC", hash: "SHA-1" },
        false,
        ["sign"],
      );
      assertEquals(
        hmacSha1(key).mac(message),
        new Uint8Array(await crypto.subtle.sign("HMAC", web, message)),
      );
    }
  }
});

Deno.test("HMAC-SHA1 of a chunk number is the MAC of its 4 big-endian bytes", () => {
  const key = pseudoRandom(20, 5);
  const mac = hmacSha1(key);
  const out = new Uint8Array(20);
  for (const n of [0, 1, 255, 256, 65537, 0x7fffffff, 0xffffffff]) {
    mac.macNumberInto(n, out, 2);
    const bytes = new Uint8Array(4);
    new DataView(bytes.buffer).setUint32(0, n);
    const expected = crypto.createHmac("sha1", key).update(bytes).digest();
    assertEquals(out.subarray(2, 18), new Uint8Array(expected.subarray(0, 16)));
  }
});

Deno.test("AES-128, -192 and -256 give FIPS-197 appendix C's ciphertexts", () => {
  const plain = fromHex("00112233445566778899aabbccddeeff");
  const expected: Record<number, string> = {
    16: "69c4e0d86a7b0430d8cdb78070b4c55a",
    24: "dda97ca4864cdfe06eaf70a0ec0d7191",
    32: "8ea2b7ca516745bfeafc49904b496089",
  };
  for (const length of [16, 24, 32]) {
    const key = expandKey(Uint8Array.from({ length }, (_, i) => i));
    const block = plain.slice();
    encryptBlock(key, block);
    assertEquals(hex(block), expected[length]);
    decryptBlock(key, block);
    assertEquals(block, plain);
  }
  let threw = false;
  try {
    expandKey(new Uint8Array(20));
  } catch (e) {
    threw = e instanceof RangeError;
  }
  assertTrue(threw, "a 20-byte AES key is refused");
});
