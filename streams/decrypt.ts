/**
 * `decrypt(image, key)`: an encrypted layer read as plaintext and written
 * as ciphertext (QEMU's `bdrv_set_key`).
 *
 * This module is browser compatible.
 *
 * @module
 */

import { sectorCipher } from "./_aes.ts";
import { KeyError } from "./errors.ts";
import type { Image, SectorCipher } from "./types.ts";

/**
 * qcow's key: the passphrase's bytes (UTF-8), cut at 16 or padded with
 * zeros to 16, as QEMU's `qcow_set_key` (and its legacy "qcow" crypto
 * block) derive it. There is no key check in the format: a wrong
 * passphrase decrypts to garbage, exactly as in QEMU.
 *
 * @param key the passphrase, or its bytes
 * @returns the 16-byte AES key
 *
 * @example
 * ```ts
 * import { qcowKey } from "./decrypt.ts";
 * console.log(qcowKey("abc")); // Uint8Array(16) [97, 98, 99, 0, ...]
 * ```
 */
export function qcowKey(key: string | Uint8Array): Uint8Array {
  const bytes = typeof key === "string" ? new TextEncoder().encode(key) : key;
  const out = new Uint8Array(16);
  out.set(bytes.subarray(0, 16));
  return out;
}

/** The ciphers of the schemes this toolkit knows, by `Encryption.scheme`. */
const SCHEMES: Record<string, (key: string | Uint8Array) => SectorCipher> = {
  "qcow-aes": (key) => sectorCipher(qcowKey(key)),
};

/**
 * The sector cipher of an encryption scheme for `key` (what `decrypt`
 * hands to a layer's `encryption.unlock`; encoders use it directly).
 *
 * @param scheme an `Encryption.scheme` (`qcow-aes`)
 * @param key the passphrase (or raw key bytes)
 * @returns the cipher
 *
 * @example
 * ```ts
 * import { cipherFor } from "./decrypt.ts";
 * const cipher = cipherFor("qcow-aes", "secret");
 * const sector = new Uint8Array(512);
 * await cipher.encrypt(0, sector);
 * console.log(sector.some((b) => b !== 0)); // true
 * ```
 */
export function cipherFor(
  scheme: string,
  key: string | Uint8Array,
): SectorCipher {
  const make = SCHEMES[scheme];
  if (!make) {
    throw new KeyError(
      `the encryption scheme '${scheme}' is not one this toolkit can decrypt`,
    );
  }
  return make(key);
}

/**
 * Applies `key` to an encrypted layer: the result reads its data as
 * plaintext and encrypts what is written. An image that is not encrypted
 * (or whose key is already applied) is returned as it is. `decrypt` acts
 * on one layer; `open(source, { key })` applies it to every layer of a
 * backing chain as it opens them.
 *
 * qcow's AES has no key check: a wrong passphrase reads as garbage, as in
 * QEMU.
 *
 * @param image an opened layer (its `encryption` is the hook)
 * @param key the passphrase (or raw key bytes)
 * @returns the layer, readable
 *
 * @example
 * ```ts
 * import { create, decrypt, memorySink, open } from "../mod.ts";
 * const sink = memorySink();
 * const made = await create("qcow", sink, { size: 65536, key: "secret" });
 * await made.write!(0, new Uint8Array(512).fill(1));
 * await made.flush!();
 * const locked = await open(sink.source());
 * console.log(locked.encrypted, locked.encryption !== undefined); // true true
 * const image = decrypt(locked, "secret");
 * console.log((await image.read(0, 1))[0]); // 1
 * ```
 */
export function decrypt(image: Image, key: string | Uint8Array): Image {
  const hook = image.encryption;
  if (!hook) {
    if (image.backing?.encryption) {
      throw new KeyError(
        `${
          image.name ?? "the image"
        }'s backing image is encrypted: decrypt applies to one layer, so open the chain with { key }`,
        `${
          image.name ?? "the image"
        }'s backing image is encrypted: give its passphrase with --key-file FILE`,
      );
    }
    return image;
  }
  if (hook.opensWithKey) {
    throw new KeyError(
      `${
        image.name ?? "the image"
      } (${image.format}) is unlocked as it opens: open it again with { key } (or --key-file)`,
    );
  }
  return hook.unlock(cipherFor(hook.scheme, key));
}
