/**
 * Every reading driver's probe: the signature checks alone, with no driver
 * code behind them, so that the registry can score a file without loading
 * any driver and then load only the one that won (`drivers/_catalog.ts`).
 * Each driver's `probe` is the function here, so both ways of probing give
 * the same answers.
 *
 * This module is browser compatible.
 *
 * | format        | signature                                                  |
 * | ------------- | ---------------------------------------------------------- |
 * | cloop         | `V2.0`/`V4.0` at byte 11 (or `#V2.0 Format` in a script), or a V4 header at the end |
 * | vpc           | `conectix` at byte 0, or in the 512-byte footer at the end |
 * | bochs         | `Bochs Virtual HD Image` at byte 0                          |
 * | vdi           | 0xbeda107f (LE) at byte 64                                  |
 * | vhdx          | `vhdxfile` at byte 0                                        |
 * | qed           | `QED\0` at byte 0                                           |
 * | parallels     | `WithoutFreeSpace`/`WithouFreSpacExt`, or a `<Parallels_disk_image>` descriptor |
 * | seSparse      | 0xcafebabe (LE 64) at byte 0                                |
 * | vmdk          | `KDMV`/`COWD`, or a text descriptor                         |
 * | dmg           | `koly` 512 bytes from the end (or a `.dmg` name: score 2)   |
 * | dmg-encrypted | `encrcdsa` at byte 0 or `cdsaencr` at the end               |
 * | qcow / qcow2  | `QFI\xfb`, version below 2 / 2 and up                       |
 * | cow           | 0x4f4f4f4d at byte 0                                        |
 * | sparseimage   | `sprs` at byte 0                                            |
 * | diskcopy42    | a plausible header (no magic: score 50), bare or in MacBinary |
 * | asif          | `shdw` at byte 0                                            |
 * | sparsebundle  | a plist with the sparse bundle's type                       |
 *
 * @module
 */

import { ascii, be16, be32, cString, le32, le64 } from "./_binary.ts";
import { compressorMagic } from "./_magic.ts";
import type { ProbeInput } from "../streams/types.ts";

/**
 * True when `bytes[at..]` starts with the ASCII `text`: a signature checked
 * on the bytes, without building a string of them (a probe runs once per
 * open, before the JIT: each string built there is garbage the first
 * scavenge has to walk).
 */
function startsWithText(bytes: Uint8Array, at: number, text: string): boolean {
  if (bytes.length < at + text.length) return false;
  for (let i = 0; i < text.length; i++) {
    if (bytes[at + i] !== text.charCodeAt(i)) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------
// cloop

/** cloop: bytes of the preamble before block_size (`CLOOP_HEADROOM`). */
export const CLOOP_HEADROOM = 128;
/** cloop: bytes of the fixed header: preamble, block_size, n_blocks. */
export const CLOOP_HEADER_SIZE = CLOOP_HEADROOM + 8;
/** cloop: where the `V2.0`/`V4.0` signature sits (`CLOOP4_SIGNATURE_OFFSET`). */
export const CLOOP_SIGNATURE_OFFSET = 0x0b;

/**
 * The cloop version whose signature starts at `at` of `bytes`, if any.
 *
 * @param bytes the bytes to look at
 * @param at where a cloop header would start
 * @returns 2, 4 or undefined
 *
 * @example
 * ```ts
 * import { cloopSignature } from "./_signatures.ts";
 * const head = new TextEncoder().encode("#!/bin/sh\n#V4.0 Format");
 * console.log(cloopSignature(head, 0)); // 4
 * ```
 */
export function cloopSignature(
  bytes: Uint8Array,
  at: number,
): 2 | 4 | undefined {
  // The signature alone, even in a file cut short of the preamble's 128
  // bytes: such a file is a truncated cloop, not a raw disk.
  if (bytes.length < at + CLOOP_SIGNATURE_OFFSET + 4) return undefined;
  if (startsWithText(bytes, at + CLOOP_SIGNATURE_OFFSET, "V4.0")) return 4;
  if (startsWithText(bytes, at + CLOOP_SIGNATURE_OFFSET, "V2.0")) return 2;
  // create_compressed_fs and QEMU agree on byte 11, but the issue's
  // description of version 2 only promises "#V2.0 Format" somewhere in the
  // preamble of a script.
  if (!startsWithText(bytes, at, "#!/bin/sh")) return undefined;
  const text = String.fromCharCode(...bytes.subarray(at, at + CLOOP_HEADROOM));
  return text.includes("#V2.0 Format") ? 2 : undefined;
}

/** cloop's probe: a signature at the start, or a V4 header at the end (90). */
export function probeCloop(input: ProbeInput): number {
  if (cloopSignature(input.head, 0)) return 100;
  if (
    input.size >= CLOOP_HEADER_SIZE && input.tail.length >= CLOOP_HEADER_SIZE
  ) {
    if (
      cloopSignature(input.tail, input.tail.length - CLOOP_HEADER_SIZE) === 4
    ) {
      return 90;
    }
  }
  return 0;
}

// ---------------------------------------------------------------------------
// vpc

/** vpc: bytes of the footer (and of the copy at the start of dynamic images). */
export const VPC_FOOTER_SIZE = 512;

/** vpc's probe: the `conectix` cookie at the start or in the footer. */
export function probeVpc(input: ProbeInput): number {
  if (input.head.length >= 8 && ascii(input.head, 0, 8) === "conectix") {
    return 100;
  }
  // A fixed VHD keeps its footer only at the end (QEMU misses these and
  // takes them for raw disks 512 bytes too long).
  if (input.size < VPC_FOOTER_SIZE || input.tail.length < VPC_FOOTER_SIZE) {
    return 0;
  }
  const footer = input.tail.subarray(input.tail.length - VPC_FOOTER_SIZE);
  // The cookie alone: a footer with a bad checksum is a broken VHD, and
  // `open` says so.
  return ascii(footer, 0, 8) === "conectix" ? 100 : 0;
}

// ---------------------------------------------------------------------------
// bochs, vdi, vhdx, qed, seSparse, cow, qcow, qcow2, sparseimage, asif

/** bochs: the magic at byte 0. */
export const BOCHS_MAGIC = "Bochs Virtual HD Image";

/** bochs's probe: the magic alone. */
export function probeBochs(input: ProbeInput): number {
  // A bad type, subtype or version, or a file cut short of its header, is
  // the driver's error, not a raw disk.
  const h = input.head;
  // Its first letter (or a byte order mark, which the decoder drops)
  // before the text: a TextDecoder's first use is slow.
  return (h[0] === BOCHS_MAGIC.charCodeAt(0) || h[0] === 0xef) &&
      cString(h, 0, Math.min(32, h.length)) === BOCHS_MAGIC
    ? 100
    : 0;
}

/** vdi: the signature at byte 64. */
export const VDI_SIGNATURE = 0xbeda107f;

/** vdi's probe: the signature at byte 64. */
export function probeVdi(input: ProbeInput): number {
  return input.head.length >= 72 && le32(input.head, 64) === VDI_SIGNATURE
    ? 100
    : 0;
}

/** vhdx's probe: `vhdxfile` at byte 0. */
export function probeVhdx(input: ProbeInput): number {
  return input.head.length >= 8 && ascii(input.head, 0, 8) === "vhdxfile"
    ? 100
    : 0;
}

/** qed: `QED\0`, little-endian. */
export const QED_MAGIC = 0x00444551;

/** qed's probe: the magic at byte 0. */
export function probeQed(input: ProbeInput): number {
  return input.head.length >= 4 && le32(input.head, 0) === QED_MAGIC ? 100 : 0;
}

/** seSparse: the constant header's magic. */
export const SESPARSE_MAGIC = 0xcafebaben;

/** seSparse's probe: the magic at byte 0. */
export function probeSeSparse(input: ProbeInput): number {
  return input.head.length >= 8 && le64(input.head, 0) === SESPARSE_MAGIC
    ? 100
    : 0;
}

/** cow: the magic at byte 0. */
export const COW_MAGIC = 0x4f4f4f4d;

/** cow's probe: the magic alone. */
export function probeCow(input: ProbeInput): number {
  const h = input.head;
  if (h.length < 4) return 0;
  // The magic alone: another version, or a file cut short, is refused by
  // `open`, by name.
  return be32(h, 0) === COW_MAGIC ? 100 : 0;
}

/** qcow and qcow2: `QFI\xfb`. */
export const QCOW_MAGIC = 0x514649fb;

/** qcow's probe: the magic with a version below 2 (or none). */
export function probeQcow(input: ProbeInput): number {
  const h = input.head;
  if (h.length < 4 || be32(h, 0) !== QCOW_MAGIC) return 0;
  // The magic with a version below 2 (QEMU gives 2 and up to qcow2):
  // version 0 is this driver's error, not a raw disk; so is a file cut
  // short before its version.
  return h.length < 8 || be32(h, 4) < 2 ? 100 : 0;
}

/**
 * qcow2's probe: the magic with version 2 or more.
 *
 * @param input the head of the file
 * @returns 100 or 0
 *
 * @example
 * ```ts
 * import { probeQcow2 } from "./_signatures.ts";
 * const head = new Uint8Array([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);
 * console.log(probeQcow2({ head, tail: head, size: 8 })); // 100
 * ```
 */
export function probeQcow2(input: ProbeInput): number {
  const h = input.head;
  if (h.length < 8) return 0;
  return be32(h, 0) === QCOW_MAGIC && be32(h, 4) >= 2 ? 100 : 0;
}

/** sparseimage: the signature at byte 0. */
export const SPARSEIMAGE_SIGNATURE = "sprs";

/** sparseimage's probe: `sprs` at byte 0. */
export function probeSparseimage(input: ProbeInput): number {
  return ascii(input.head, 0, Math.min(4, input.head.length)) ===
      SPARSEIMAGE_SIGNATURE
    ? 100
    : 0;
}

/** asif: the signature at byte 0. */
export const ASIF_SIGNATURE = "shdw";

/** asif's probe: `shdw` at byte 0. */
export function probeAsif(input: ProbeInput): number {
  return ascii(input.head, 0, Math.min(4, input.head.length)) ===
      ASIF_SIGNATURE
    ? 100
    : 0;
}

// ---------------------------------------------------------------------------
// parallels

/** parallels: the magic of images up to 2 TiB. */
export const PARALLELS_MAGIC_OLD = "WithoutFreeSpace";
/** parallels: the magic of larger images. */
export const PARALLELS_MAGIC_EXT = "WithouFreSpacExt";

/**
 * True when `head` is a Parallels `DiskDescriptor.xml`.
 *
 * @param head the first bytes of the file
 * @returns whether it starts with a `<Parallels_disk_image>` element
 *
 * @example
 * ```ts
 * import { isParallelsDescriptor } from "./_signatures.ts";
 * const head = new TextEncoder().encode("<?xml version='1.0'?>\n<Parallels_disk_image>");
 * console.log(isParallelsDescriptor(head)); // true
 * ```
 */
export function isParallelsDescriptor(head: Uint8Array): boolean {
  // What the expression below needs first, on the bytes: past a byte
  // order mark and white space (as Latin-1: tab to CR, space, NBSP), a
  // "<". A binary image fails here without its head made into text.
  let at = startsWithText(head, 0, "\xEF\xBB\xBF") ? 3 : 0;
  while (
    at < head.length && at < 1024 &&
    (head[at] === 0x20 || head[at] === 0xa0 ||
      (head[at] >= 0x09 && head[at] <= 0x0d))
  ) at++;
  if (at >= Math.min(head.length, 1024) || head[at] !== 0x3c) return false;
  const text = ascii(head, 0, Math.min(head.length, 1024));
  // The bytes as Latin-1: a UTF-8 byte order mark is these three.
  return /^(\xEF\xBB\xBF)?\s*(<\?xml[^>]*>\s*)?<Parallels_disk_image[\s>]/
    .test(text);
}

/** parallels's probe: a magic, or a descriptor. */
export function probeParallels(input: ProbeInput): number {
  if (input.head.length < 16) return 0;
  const magic = ascii(input.head, 0, 16);
  if (magic === PARALLELS_MAGIC_OLD || magic === PARALLELS_MAGIC_EXT) {
    return 100;
  }
  return isParallelsDescriptor(input.head) ? 100 : 0;
}

// ---------------------------------------------------------------------------
// vmdk

/** vmdk: the hosted sparse extent's magic. */
export const VMDK_MAGIC = "KDMV";
/** vmdk: the largest text descriptor read (QEMU reads at most 1 MiB). */
export const VMDK_MAX_DESCRIPTOR_BYTES = 1 << 20;
/** vmdk: how a descriptor written by VMware tools starts. */
const VMDK_DESCRIPTOR_START = "# Disk DescriptorFile";

/** vmdk's probe: a sparse extent's magic, or a text descriptor (90 when written by hand). */
export function probeVmdk(input: ProbeInput): number {
  const h = input.head;
  // VMFS sparse (COWD) extents are claimed so that `open` names them.
  if (startsWithText(h, 0, VMDK_MAGIC) || startsWithText(h, 0, "COWD")) {
    return 100;
  }
  if (startsWithText(h, 0, VMDK_DESCRIPTOR_START)) return 100;
  // Descriptors written by hand may start with other comments or blank
  // lines (only a small file is made into text for that).
  if (input.size > VMDK_MAX_DESCRIPTOR_BYTES) return 0;
  const text = String.fromCharCode(...h.subarray(0, Math.min(h.length, 512)));
  if (
    /^\s*(#[^\n]*\n\s*)*version\s*=/.test(text) &&
    /createType\s*=/.test(text)
  ) {
    return 90;
  }
  return 0;
}

// ---------------------------------------------------------------------------
// dmg, dmg-encrypted

/** dmg: bytes of the `koly` trailer. */
export const KOLY_SIZE = 512;
/** dmg: `koly`. */
export const KOLY_MAGIC = 0x6b6f6c79;

/** dmg's probe: the `koly` trailer, or (score 2) a `.dmg` name. */
export function probeDmg(input: ProbeInput): number {
  // Encrypted images (encrcdsa, cdsaencr) are the dmg-encrypted
  // driver's. The koly magic alone: a wrong version or header size is
  // this driver's error.
  const t = input.tail;
  if (input.size >= KOLY_SIZE && t.length >= KOLY_SIZE) {
    if (be32(t, t.length - KOLY_SIZE) === KOLY_MAGIC) return 100;
  }
  // QEMU's dmg_probe goes by the name alone (score 2): a file called
  // .dmg without a koly trailer is refused as a dmg, not read as raw.
  // (A compressed file so named is left to the decompressing wrappers.)
  return input.name !== undefined && /\.dmg$/i.test(input.name) &&
      !compressorMagic(input.head)
    ? 2
    : 0;
}

/** dmg-encrypted: the version 2 signature, at offset 0. */
export const ENCRYPTED_V2_MAGIC = "encrcdsa";
/** dmg-encrypted: the version 1 signature, the file's last 8 bytes. */
export const ENCRYPTED_V1_MAGIC = "cdsaencr";

/**
 * True when `head` starts with `encrcdsa` or `tail` ends with `cdsaencr`.
 *
 * @param head the first bytes of the file
 * @param tail the last bytes of the file
 * @returns the version found, or 0
 *
 * @example
 * ```ts
 * import { encryptedVersion } from "./_signatures.ts";
 * const head = new TextEncoder().encode("encrcdsa");
 * console.log(encryptedVersion(head, head)); // 2
 * ```
 */
export function encryptedVersion(
  head: Uint8Array,
  tail: Uint8Array,
): 0 | 1 | 2 {
  if (head.length >= 8 && ascii(head, 0, 8) === ENCRYPTED_V2_MAGIC) return 2;
  if (tail.length >= 8 && ascii(tail, tail.length - 8) === ENCRYPTED_V1_MAGIC) {
    return 1;
  }
  return 0;
}

/** dmg-encrypted's probe: either signature. */
export function probeDmgEncrypted(input: ProbeInput): number {
  return encryptedVersion(input.head, input.tail) ? 100 : 0;
}

// ---------------------------------------------------------------------------
// diskcopy42

/** diskcopy42: bytes of the header. */
export const DISKCOPY_HEADER_SIZE = 84;
/** diskcopy42: the private word, 0x0100. */
export const DISKCOPY_PRIVATE = 0x0100;
/** diskcopy42: bytes of a MacBinary header before the data fork. */
export const MACBINARY_HEADER = 128;

/**
 * True when `b[at..]` looks like a DiskCopy 4.2 header (no magic: every
 * field that can be checked is).
 *
 * @param b the bytes
 * @param at where the header would start
 * @returns whether every checkable field is plausible
 *
 * @example
 * ```ts
 * import { looksLikeDiskCopyHeader } from "./_signatures.ts";
 * console.log(looksLikeDiskCopyHeader(new Uint8Array(84), 0)); // false
 * ```
 */
export function looksLikeDiskCopyHeader(b: Uint8Array, at: number): boolean {
  if (b.length < at + DISKCOPY_HEADER_SIZE) return false;
  const dataSize = be32(b, at + 64);
  return b[at] <= 63 && be16(b, at + 82) === DISKCOPY_PRIVATE &&
    b[at + 80] <= 3 && dataSize > 0 && dataSize % 512 === 0 &&
    be32(b, at + 68) % 12 === 0;
}

/**
 * True when the first 128 bytes look like a MacBinary header.
 *
 * @param b the first bytes of the file
 * @returns whether the header's fixed bytes are plausible
 *
 * @example
 * ```ts
 * import { looksLikeMacBinary } from "./_signatures.ts";
 * console.log(looksLikeMacBinary(new Uint8Array(128))); // false
 * ```
 */
export function looksLikeMacBinary(b: Uint8Array): boolean {
  return b.length >= MACBINARY_HEADER && b[0] === 0 && b[1] >= 1 &&
    b[1] <= 63 && b[74] === 0 && b[82] === 0;
}

/** diskcopy42's probe: a plausible header (50: no magic), bare or in a MacBinary file of its type. */
export function probeDiskcopy42({ head }: ProbeInput): number {
  // No magic: a plausible header scores below the formats that have one.
  if (looksLikeDiskCopyHeader(head, 0)) return 50;
  if (!looksLikeMacBinary(head)) return 0;
  const type = ascii(head, 65, 69);
  const creator = ascii(head, 69, 73);
  if (
    type === "dImg" || creator === "dCpy" || creator === "ddsk" ||
    type === "rohd" || looksLikeDiskCopyHeader(head, MACBINARY_HEADER)
  ) {
    return 50;
  }
  return 0;
}

// ---------------------------------------------------------------------------
// sparsebundle, vvfat

/** sparsebundle: the bundle type its `Info.plist` names. */
export const BUNDLE_TYPE = "com.apple.diskimage.sparsebundle";

/**
 * True when `head` is a sparse bundle's `Info.plist`.
 *
 * @param head the first bytes of the file
 * @returns whether it is a plist naming the sparse bundle type
 *
 * @example
 * ```ts
 * import { isBundlePlist } from "./_signatures.ts";
 * console.log(isBundlePlist(new TextEncoder().encode("<plist>"))); // false
 * ```
 */
export function isBundlePlist(head: Uint8Array): boolean {
  // "<plist" is ASCII, which UTF-8 decoding keeps as it is: without those
  // bytes the text cannot hold it (and a binary image is not decoded).
  const start = head.subarray(0, 4096);
  let found = false;
  for (
    let at = start.indexOf(0x3c);
    at >= 0;
    at = start.indexOf(0x3c, at + 1)
  ) {
    if (startsWithText(start, at, "<plist")) {
      found = true;
      break;
    }
  }
  if (!found) return false;
  const text = new TextDecoder().decode(start);
  return text.includes("<plist") && text.includes(BUNDLE_TYPE);
}

/** sparsebundle's probe: its `Info.plist`. */
export function probeSparsebundle(input: ProbeInput): number {
  return isBundlePlist(input.head) ? 100 : 0;
}

/** vvfat's probe: never (a folder is not a file). */
export function probeVvfat(_input: ProbeInput): number {
  return 0;
}

/** raw's probe: always 1, the lowest score. */
export function probeRaw(_input: ProbeInput): number {
  return 1;
}
