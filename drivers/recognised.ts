/**
 * Formats the toolkit recognises by their signature but does not read
 * (yet): each is a {@linkcode Driver} whose `probe` finds the signature and
 * whose `open` refuses with an {@linkcode UnsupportedError} naming the
 * format, so that such a file is never taken for a raw disk.
 *
 * This module is browser compatible.
 *
 * The signatures (offsets in bytes). Each scores 100 but diskcopy (50: it
 * has no magic, only fields that must agree) and dmg-segment (2: a name,
 * as QEMU's dmg probe goes by a name):
 *
 * | format        | where     | signature                                                   | source |
 * | ------------- | --------- | ----------------------------------------------------------- | ------ |
 * | qcow2         | 0         | `QFI\xfb`, version (be32 at 4) 2 or more                    | QEMU `qcow2_probe` |
 * | qed           | 0         | `QED\0`                                                     | QEMU `qed_probe` |
 * | vdi           | 64        | le32 0xbeda107f                                             | QEMU `vdi_probe` |
 * | vhdx          | 0         | `vhdxfile`                                                  | QEMU `vhdx_probe` |
 * | parallels     | 0         | `WithoutFreeSpace` or `WithouFreSpacExt`                    | QEMU `parallels_probe` |
 * | luks          | 0         | `LUKS\xba\xbe` (version be16 at 6: 1 or 2)                  | QEMU `qcrypto_block_luks_has_format`, LUKS2 spec |
 * | seSparse      | 0         | le64 0xcafebabe (version, le64 0x200000001, at 8)           | QEMU `vmdk_open_se_sparse` |
 * | asif          | 0         | `shdw`                                                      | reverse-engineered ASIF header (huven/asif-format) |
 * | sparseimage   | 0         | `sprs`                                                      | libmodi's sparse image description |
 * | diskcopy42    | 0 / 128   | DiskCopy 4.2 header (name length ≤ 63, private word 0x0100 at 82, disk format ≤ 3, data size a multiple of 512), or a MacBinary header with type `dImg` and creator `dCpy` | Apple's DiskCopy 4.2 format note |
 * | sparsebundle  | 0         | an XML plist naming `com.apple.diskimage.sparsebundle` (a bundle's Info.plist) | hdiutil's bundle layout |
 * | dmg-segment   | name      | a file called `*.NNN.dmgpart` (a later segment of a segmented UDIF; no signature of its own) | hdiutil segment |
 *
 * QEMU 7.2 probes bochs, cloop, dmg, luks, parallels, qcow, qcow2, qed,
 * vdi, vhdx, vmdk and vpc; the rest are formats found in archives. Most of
 * them now have a reader (vdi, vhdx, qed, parallels, seSparse, asif,
 * sparseimage, diskcopy42, sparsebundle): for those the entry here only
 * adds its signature to the reader's probe (see below), so that a file
 * with a broken header is still that reader's error. Encrypted dmg images
 * (`encrcdsa`, `cdsaencr`) are the dmg-encrypted driver's.
 * None of these signatures is a compressor's magic (gzip, xz, bzip2,
 * zstd): compressed files are left to the wrappers.
 *
 * When a driver that reads one of these formats is added to
 * `drivers/all.ts` under the same name, the recogniser's entry is dropped
 * and its signature becomes the driver's (see `withRecognised`).
 *
 * @module
 */

import { ascii, be16, be32, le32, le64 } from "./_binary.ts";
import { compressorMagic } from "./_magic.ts";
import {
  ASIF_SIGNATURE,
  SESPARSE_MAGIC,
  SPARSEIMAGE_SIGNATURE,
  VDI_SIGNATURE,
} from "./_signatures.ts";
import { UnsupportedError } from "../streams/errors.ts";
import {
  type Driver,
  PROBE_BYTES,
  type ProbeInput,
  type Source,
} from "../streams/types.ts";

/** What a recogniser found: the signature and what it tells. */
interface Found {
  /** The signature's text or value, for the error. */
  signature: string;
  /** Its byte offset in the file. */
  offset: number;
  /** More to say in the message (`version 3`), if anything. */
  note?: string;
}

/** Builds a recognise-only driver from a signature test. */
function recogniser(
  name: string,
  description: string,
  find: (input: ProbeInput) => Found | undefined,
  score = 100,
): Driver {
  return {
    name,
    description,
    recognisedOnly: true,
    // A compressed file is the wrappers' to open, whatever else it holds.
    probe: (input) => !compressorMagic(input.head) && find(input) ? score : 0,
    async open(source: Source): Promise<never> {
      const input = await headAndTail(source);
      const found = find(input);
      throw new UnsupportedError(
        {
          format: name,
          field: "signature",
          value: found?.signature,
          offset: found?.offset,
          file: source.name,
        },
        found
          ? `this is ${description}${
            found.note ? ` (${found.note})` : ""
          }: the toolkit recognises the format but cannot read it yet`
          : `${name} images are only recognised by their signature, not read (and this file does not carry it)`,
      );
    },
  };
}

/** The bytes a recogniser looks at, read from a source as the registry reads them. */
async function headAndTail(source: Source): Promise<ProbeInput> {
  const length = Math.min(PROBE_BYTES, source.size);
  const head = await source.read(0, length);
  const tail = source.size <= length
    ? head
    : await source.read(source.size - length, length);
  return { head, tail, size: source.size, name: source.name };
}

/** `text` at `offset` of `bytes` (byte for byte, Latin-1). */
function at(bytes: Uint8Array, offset: number, text: string): boolean {
  if (bytes.length < offset + text.length) return false;
  for (let i = 0; i < text.length; i++) {
    if (bytes[offset + i] !== text.charCodeAt(i)) return false;
  }
  return true;
}

/** A magic string at the head of the file. */
function headMagic(
  text: string,
  note?: (head: Uint8Array) => string | undefined,
) {
  return ({ head }: ProbeInput): Found | undefined =>
    at(head, 0, text)
      ? { signature: text, offset: 0, note: note?.(head) }
      : undefined;
}

const QCOW_MAGIC = "QFI\xfb";
const SESPARSE_VERSION = 0x200000001n;

/** qcow2: the qcow magic with a version of 2 or more (QEMU's rule). */
export const qcow2Recogniser: Driver = recogniser(
  "qcow2",
  "a QEMU qcow2 image",
  ({ head }) => {
    if (!at(head, 0, QCOW_MAGIC) || head.length < 8) return undefined;
    const version = be32(head, 4);
    return version >= 2
      ? { signature: "QFI\\xfb", offset: 0, note: `version ${version}` }
      : undefined;
  },
);

/** The recognisers, in probing order. */
export const RECOGNISED: readonly Driver[] = [
  qcow2Recogniser,
  recogniser("qed", "a QEMU enhanced disk (qed) image", headMagic("QED\0")),
  recogniser(
    "vdi",
    "a VirtualBox disk image (vdi)",
    ({ head }) =>
      head.length >= 68 && le32(head, 64) === VDI_SIGNATURE
        ? { signature: "0xbeda107f", offset: 64 }
        : undefined,
  ),
  recogniser("vhdx", "a Hyper-V VHDX image", headMagic("vhdxfile")),
  recogniser(
    "parallels",
    "a Parallels disk image",
    (input) =>
      headMagic("WithoutFreeSpace")(input) ??
        headMagic("WithouFreSpacExt")(input),
  ),
  recogniser(
    "luks",
    "a LUKS encrypted volume",
    headMagic(
      "LUKS\xba\xbe",
      (head) => head.length >= 8 ? `version ${be16(head, 6)}` : undefined,
    ),
  ),
  recogniser(
    "seSparse",
    "a VMware seSparse extent (open the .vmdk descriptor that names it)",
    // The magic alone (the version, le64 0x200000001 at 8, is only noted).
    ({ head }) =>
      head.length >= 8 && le64(head, 0) === SESPARSE_MAGIC
        ? {
          signature: "0xcafebabe",
          offset: 0,
          note: head.length >= 16 && le64(head, 8) !== SESPARSE_VERSION
            ? `version 0x${le64(head, 8).toString(16)}`
            : undefined,
        }
        : undefined,
  ),
  recogniser(
    "asif",
    "an Apple sparse image format (ASIF) image",
    headMagic(ASIF_SIGNATURE),
  ),
  recogniser(
    "sparseimage",
    "an Apple sparse disk image (sparseimage)",
    headMagic(SPARSEIMAGE_SIGNATURE),
  ),
  recogniser(
    "diskcopy42",
    "an Apple DiskCopy 4.2 image",
    findDiskCopy,
    50,
  ),
  recogniser(
    "sparsebundle",
    "the Info.plist of an Apple sparse bundle (open the bands of the .sparsebundle folder)",
    ({ head }) => {
      if (!at(head, 0, "<?xml")) return undefined;
      const text = ascii(head, 0, Math.min(head.length, 4096));
      const offset = text.indexOf("com.apple.diskimage.sparsebundle");
      return offset >= 0
        ? { signature: "com.apple.diskimage.sparsebundle", offset }
        : undefined;
    },
  ),
  recogniser(
    "dmg-segment",
    "a later segment of a segmented Apple disk image (dmg)",
    ({ name }) =>
      name !== undefined && /\.\d{3}\.dmgpart$/i.test(name)
        ? { signature: name.replace(/^.*[/\\]/, ""), offset: 0 }
        : undefined,
    2,
  ),
];

/**
 * A DiskCopy 4.2 header at `offset`: it has no magic, so every field that
 * can be checked without the data is (QEMU does not probe it at all).
 */
function diskCopyHeader(b: Uint8Array, offset: number): boolean {
  if (b.length < offset + 84) return false;
  const nameLength = b[offset];
  const dataSize = be32(b, offset + 64);
  return nameLength <= 63 && be16(b, offset + 82) === 0x0100 &&
    b[offset + 80] <= 3 && dataSize > 0 && dataSize % 512 === 0;
}

function findDiskCopy({ head }: ProbeInput): Found | undefined {
  if (diskCopyHeader(head, 0)) {
    return { signature: "private 0x0100", offset: 82 };
  }
  // MacBinary (I, II or III): a 128-byte header before the data fork.
  if (
    head.length >= 128 && head[0] === 0 && head[1] >= 1 && head[1] <= 63 &&
    ascii(head, 65, 69) === "dImg" && ascii(head, 69, 73) === "dCpy"
  ) {
    return {
      signature: "dImg/dCpy",
      offset: 65,
      note: "in a MacBinary wrapper",
    };
  }
  return undefined;
}
