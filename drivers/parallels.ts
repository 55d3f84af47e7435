/**
 * parallels: Parallels Desktop (and Virtuozzo) expanding and plain disk
 * images, read-only.
 *
 * This module is browser compatible.
 *
 * Described by QEMU's `docs/interop/parallels.rst`. Every field is
 * little-endian.
 *
 * | offset | size | field                                                  |
 * | -----: | ---: | ------------------------------------------------------ |
 * |      0 |   16 | magic `WithoutFreeSpace` (old) or `WithouFreSpacExt`   |
 * |     16 |    4 | version (2)                                            |
 * |     20 |    4 | heads                                                  |
 * |     24 |    4 | cylinders                                              |
 * |     28 |    4 | tracks: sectors per cluster                            |
 * |     32 |    4 | bat_entries                                            |
 * |     36 |    8 | nb_sectors: the disk's size in sectors (old: 32 bits)  |
 * |     44 |    4 | inuse: 0x746F6E59 while an application has it open    |
 * |     48 |    4 | data_off: the first data sector (0: after the BAT)     |
 * |     52 |    4 | flags                                                  |
 * |     56 |    8 | ext_off: the format extension cluster (sectors)        |
 *
 * The BAT (bat_entries 32-bit entries at 64) gives each cluster's place in
 * the file: in 512-byte sectors for `WithoutFreeSpace` images, in clusters
 * for `WithouFreSpacExt` ones; 0 when the cluster is not allocated (zeros).
 *
 * A plain image (the `.hds` of a bundle whose DiskDescriptor.xml says
 * `Plain`) has no header: it is the disk's bytes, read as raw.
 *
 * @module
 */

import { ascii, formatErrors, le32, le64 } from "./_binary.ts";
import { blockReader, wholeBlock } from "./_blocks.ts";
import { check, UnsupportedError } from "../streams/errors.ts";
import type {
  Driver,
  Image,
  OpenOptions,
  ProbeInput,
  Source,
} from "../streams/types.ts";

const FORMAT = "parallels";
const MAGIC_OLD = "WithoutFreeSpace";
const MAGIC_EXT = "WithouFreSpacExt";
const HEADER_BYTES = 64;
const SECTOR = 512;
const INUSE = 0x746f6e59;
/** QEMU's limit: a cluster below 2^31 / 513 sectors (about 1 GiB). */
const MAX_TRACKS = Math.floor(0x7fffffff / 513);
/** QEMU's catalog limit: the BAT below 2^31 bytes. */
const MAX_BAT_ENTRIES = Math.floor(0x7fffffff / 4);

const fail = formatErrors(FORMAT);

async function openParallels(
  source: Source,
  options: OpenOptions,
): Promise<Image> {
  if (options.writable) {
    throw new UnsupportedError(
      { format: FORMAT },
      "parallels images are read-only here",
    );
  }
  const unknown = Object.keys(options.options ?? {})[0];
  if (unknown !== undefined) {
    throw new UnsupportedError(
      { format: FORMAT },
      `unknown option '${unknown}' (parallels takes none)`,
    );
  }
  check(source.size >= HEADER_BYTES, {
    format: FORMAT,
    field: "file size",
    value: source.size,
    limit: `at least ${HEADER_BYTES} bytes (the header)`,
    file: source.name,
  });
  const h = await source.read(0, HEADER_BYTES);
  const magic = ascii(h, 0, 16);
  if (magic !== MAGIC_OLD && magic !== MAGIC_EXT) {
    throw fail("magic", magic, `"${MAGIC_OLD}" or "${MAGIC_EXT}"`, 0);
  }
  const version = le32(h, 16);
  if (version !== 2) {
    throw new UnsupportedError(
      { format: FORMAT, field: "version", value: version, offset: 16 },
      `version ${version} is not supported: only 2`,
    );
  }
  const tracks = le32(h, 28);
  if (tracks === 0 || tracks > MAX_TRACKS) {
    throw fail(
      "tracks",
      tracks,
      `from 1 to ${MAX_TRACKS} sectors per cluster (QEMU's limit)`,
      28,
      source.name,
    );
  }
  const clusterSize = tracks * SECTOR;
  const batEntries = le32(h, 32);
  if (
    batEntries > MAX_BAT_ENTRIES || HEADER_BYTES + batEntries * 4 > source.size
  ) {
    throw fail(
      "bat_entries",
      batEntries,
      `a catalog (${batEntries} x 4 bytes at 64) within the file's ${source.size} bytes`,
      32,
      source.name,
    );
  }
  const old = magic === MAGIC_OLD;
  const sectors = old ? le64(h, 36) & 0xffffffffn : le64(h, 36);
  const maxSectors = batEntries * tracks;
  if (sectors > BigInt(maxSectors)) {
    throw fail(
      "nb_sectors",
      sectors,
      `at most bat_entries x tracks = ${maxSectors}`,
      36,
      source.name,
    );
  }
  const size = Number(sectors) * SECTOR;
  const dataOffset = le32(h, 48);
  const batEnd = HEADER_BYTES + batEntries * 4;
  if (
    dataOffset !== 0 &&
    (dataOffset * SECTOR < batEnd || dataOffset * SECTOR > source.size)
  ) {
    throw fail(
      "data_off",
      dataOffset,
      `0, or a sector past the catalog's end (${batEnd} bytes) within the file's ${source.size} bytes`,
      48,
      source.name,
    );
  }
  // Clusters live in the data area: from data_off, or past the catalog.
  const dataStart = dataOffset !== 0 ? dataOffset * SECTOR : batEnd;
  const unit = old ? SECTOR : clusterSize;
  const clusters = Math.ceil(size / clusterSize);
  const batBytes = await source.read(HEADER_BYTES, clusters * 4);
  const bat = new Float64Array(clusters);
  let allocated = 0;
  for (let i = 0; i < clusters; i++) {
    const entry = le32(batBytes, i * 4);
    if (entry === 0) continue;
    const at = entry * unit;
    const length = Math.min(clusterSize, size - i * clusterSize);
    if (at < dataStart || at + length > source.size) {
      throw fail(
        `bat[${i}]`,
        entry,
        `a cluster (${length} bytes at ${at}) in the data area, from ${dataStart} to the file's end at ${source.size}`,
        HEADER_BYTES + i * 4,
        source.name,
      );
    }
    bat[i] = at;
    allocated++;
  }
  const reader = blockReader({
    source,
    size,
    blockSize: clusterSize,
    lookup(cluster) {
      const length = Math.min(clusterSize, size - cluster * clusterSize);
      return bat[cluster] === 0
        ? wholeBlock(length, "unallocated")
        : wholeBlock(length, "data", bat[cluster]);
    },
  });
  const inUse = le32(h, 44) === INUSE;
  return {
    format: FORMAT,
    size,
    name: source.name,
    encrypted: false,
    geometry: {
      cylinders: le32(h, 24),
      heads: le32(h, 20),
      sectors: tracks,
    },
    details: {
      subformat: old ? "WithoutFreeSpace" : "WithouFreSpacExt",
      clusterSize,
      batEntries,
      allocatedClusters: allocated,
      batUnit: old ? "sectors" : "clusters",
      ...(inUse
        ? { note: "the in-use flag is set (not closed cleanly); read as it is" }
        : {}),
      ...(le64(h, 56) !== 0n ? { extensionSector: Number(le64(h, 56)) } : {}),
    },
    ...reader,
    close: () => source.close?.() ?? Promise.resolve(),
  };
}

/**
 * The parallels driver: expanding images of Parallels Desktop and
 * Virtuozzo (both signatures), read-only.
 *
 * @example
 * ```ts
 * import { parallels } from "../mod.ts";
 * const head = new TextEncoder().encode("WithouFreSpacExt");
 * console.log(parallels.probe({ head, tail: head, size: 16 })); // 100
 * ```
 */
export const parallels: Driver = {
  name: FORMAT,
  description: "Parallels expanding disk image (read-only)",
  probe(input: ProbeInput): number {
    if (input.head.length < 16) return 0;
    const magic = ascii(input.head, 0, 16);
    return magic === MAGIC_OLD || magic === MAGIC_EXT ? 100 : 0;
  },
  open: openParallels,
};
