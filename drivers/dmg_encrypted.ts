/**
 * dmg-encrypted: Apple's encrypted disk images (`hdiutil create
 * -encryption`, FileVault), read with their password.
 *
 * The encryption is a layer under the image: the `encrcdsa` header (or
 * the `cdsaencr` trailer of version 1) holds password key records, and
 * the rest of the file is a whole image (a UDIF `.dmg` with its own koly
 * trailer, or a raw disk) encrypted in chunks. The layout of both
 * versions is in `dmg/_encrcdsa.ts`. Opening with the password
 * (`open(source, { key })`, `--key-file`) unwraps the keys (a wrong
 * password is a `KeyError`: the key blob's padding and `CKIE` marker tell),
 * then opens what is inside through the registry as any image is, its
 * checksums verified as usual. Without a password the image opens locked:
 * `info` shows the cipher and the key records, reading is a `KeyError`.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { probeDmgEncrypted } from "./_signatures.ts";
import { KeyError, UnsupportedError } from "../streams/errors.ts";
import type {
  Driver,
  Extent,
  Image,
  OpenOptions,
  Source,
} from "../streams/types.ts";
import { checkRange } from "../streams/types.ts";
import {
  decryptedSource,
  describeEncryption,
  type EncryptedLayout,
  FORMAT,
  parseEncrypted,
  unlockKeys,
} from "./dmg/_encrcdsa.ts";

/** The image while no password has been given: metadata only. */
function lockedImage(
  source: Source,
  layout: EncryptedLayout,
  encryption: Record<string, unknown>,
): Image {
  const size = layout.dataSize;
  const locked = () =>
    new KeyError(
      `${FORMAT}: ${
        source.name ?? "the image"
      } is encrypted (AES-${layout.keyBits}): give its password (--key-file FILE, or open(source, { key }))`,
    );
  return {
    format: FORMAT,
    size,
    name: source.name,
    encrypted: true,
    encryption: {
      scheme: "dmg-encrcdsa",
      opensWithKey: true,
      unlock() {
        throw locked();
      },
    },
    details: {
      encryption,
      locked:
        "the size is that of the encrypted image inside; its disk, partitions and map need the password",
    },
    read(offset, length) {
      checkRange(size, offset, length);
      return Promise.reject(locked());
    },
    readInto(offset, into) {
      checkRange(size, offset, into.length);
      return Promise.reject(locked());
    },
    async *extents(offset, length): AsyncIterable<Extent> {
      checkRange(size, offset, length);
      if (length > 0) yield { offset, length, kind: "data" };
    },
    close: () => source.close?.() ?? Promise.resolve(),
  };
}

/**
 * The dmg-encrypted driver: probed by the `encrcdsa` signature at the
 * start or `cdsaencr` at the end; AES-128 and AES-256, password key
 * records wrapped with 3DES-EDE or AES (PBKDF2-HMAC-SHA1), chunks of the
 * header's size (512 bytes in current images, 4096 in old ones). The
 * image inside is opened as the registry opens any image (a UDIF dmg
 * normally, its checksums verified); `format` stays `dmg-encrypted` and
 * `details` gives the encryption and the inner image's details.
 *
 * @example
 * ```ts ignore
 * import { fromFile, open } from "../mod.ts";
 * const image = await open(await fromFile("secret.dmg"), { key: "password" });
 * console.log(image.format, image.details?.inner); // dmg-encrypted dmg
 * ```
 */
export const dmgEncrypted: Driver = {
  name: FORMAT,
  description:
    "Apple encrypted disk image (encrcdsa v2 header or cdsaencr v1 trailer; AES-128/256, password key records); the image inside is read as usual",
  probe: probeDmgEncrypted,
  async open(source: Source, options: OpenOptions = {}): Promise<Image> {
    if (options.writable) {
      throw new UnsupportedError(
        { format: FORMAT, file: source.name },
        "encrypted dmg images are read-only here",
      );
    }
    const layout = await parseEncrypted(source);
    const encryption = describeEncryption(layout);
    if (options.key === undefined) {
      return lockedImage(source, layout, encryption);
    }
    const keys = await unlockKeys(layout, options.key, source.name);
    const plain = decryptedSource(source, layout, keys);
    // The registry is imported when first needed: it imports this driver
    // (through drivers/all.ts), so a static import would be a cycle.
    const { open } = await import("./_registry.ts");
    const inner = await open(plain, { options: options.options });
    return {
      format: FORMAT,
      size: inner.size,
      name: source.name,
      encrypted: true,
      geometry: inner.geometry,
      details: { encryption, inner: inner.format, ...inner.details },
      read: (offset, length) => inner.read(offset, length),
      readInto: inner.readInto &&
        ((offset, into) => inner.readInto!(offset, into)),
      extents: (offset, length) => inner.extents(offset, length),
      close: () => inner.close?.() ?? Promise.resolve(),
    };
  },
};
