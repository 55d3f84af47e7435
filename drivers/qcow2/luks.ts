/**
 * LUKS (version 1) inside qcow2: the key slots and the master key.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { UnsupportedError } from "../../streams/errors.ts";
import type { SectorCipher, Source } from "../../streams/types.ts";

/**
 * The sector cipher of a qcow2's LUKS header, unlocked with `key`.
 *
 * @param source the qcow2 file
 * @param where the LUKS header's offset and length in it
 * @param key the passphrase
 * @returns the cipher of the payload
 */
export function luksCipher(
  _source: Source,
  _where: { offset: number; length: number },
  _key: string | Uint8Array,
): Promise<SectorCipher> {
  return Promise.reject(
    new UnsupportedError(
      { format: "qcow2", field: "crypt_method", value: 2 },
      "LUKS-encrypted qcow2 images cannot be decrypted yet",
    ),
  );
}
