/**
 * vdi: VirtualBox disk images (dynamic, static and differencing), as
 * VirtualBox and qemu-img write them; read, created and written.
 *
 * This module is browser compatible.
 *
 * Described by VirtualBox's `VDICore.h` (the header version 1.1, which
 * every VirtualBox since 1.4 and QEMU write). Every field is little-endian.
 *
 * | offset | size | field                                                  |
 * | -----: | ---: | ------------------------------------------------------ |
 * |      0 |   64 | text, e.g. `<<< Oracle VM VirtualBox Disk Image >>>\n` |
 * |     64 |    4 | signature 0xBEDA107F                                   |
 * |     68 |    4 | version 0x00010001 (major 1, minor 1)                  |
 * |     72 |    4 | header_size: bytes of header after this field's start  |
 * |     76 |    4 | image_type: 1 dynamic, 2 static, 3 undo, 4 differencing|
 * |     80 |    4 | image_flags                                            |
 * |     84 |  256 | description                                            |
 * |    340 |    4 | offset_bmap: the block map                             |
 * |    344 |    4 | offset_data: the first block                           |
 * |    348 |   12 | legacy geometry: cylinders, heads, sectors             |
 * |    360 |    4 | sector_size (512)                                      |
 * |    364 |    4 | unused                                                 |
 * |    368 |    8 | disk_size                                              |
 * |    376 |    4 | block_size (1 MiB)                                     |
 * |    380 |    4 | block_extra: bytes before each block's data (0)        |
 * |    384 |    4 | blocks_in_image                                        |
 * |    388 |    4 | blocks_allocated                                       |
 * |    392 |   16 | uuid_image                                             |
 * |    408 |   16 | uuid_last_snap (uuidModify: new each write session)    |
 * |    424 |   16 | uuid_link: the parent image's uuid_image (differencing)|
 * |    440 |   16 | uuid_parent: the parent's uuid_last_snap               |
 *
 * The block map holds one 32-bit entry per block: the index of the block
 * among the stored ones (its data at `offset_data + index * block_size`),
 * 0xFFFFFFFF when the block is free (not stored: zeros, or the parent's
 * bytes in a differencing image) or 0xFFFFFFFE when it was discarded
 * (zeros in every image).
 *
 * A differencing image names its parent by UUID only (VirtualBox finds it
 * in its media registry), so it is followed only when the caller names
 * the parent's file with the open option `parent=FILE` (one file a line
 * down a chain; the CLI's `--parent`), and the registry refuses a parent
 * whose UUID is not uuid_link (`backingId`); otherwise reading a free
 * block fails with a {@linkcode BackingFileError}. As in VirtualBox, the
 * parent may be of another format that stores a UUID: a VHD (its footer's
 * unique id) or a vmdk with `ddb.uuid.image`; parents storing none are
 * refused (VirtualBox links those by its media registry alone). `create`
 * with a backing file writes a differencing image (type 4, the parent's
 * UUID and modification UUID as uuid_link and uuid_parent, nil for a
 * parent without one), reading them from the opened parent
 * (`CreateSpec.backing`). A write session gives the image a new
 * uuid_last_snap before its first write, as VirtualBox does.
 *
 * @module
 */

import { probeVdi, VDI_SIGNATURE as SIGNATURE } from "./_signatures.ts";
import { checkWriteOptions } from "../streams/options.ts";
import {
  formatErrors,
  le32,
  le64,
  safeNumber,
  setLe32,
  setLe64,
  uuidText,
} from "./_binary.ts";
import { blockReader, wholeBlock } from "./_blocks.ts";
import { readBackSource, requireRandomAccess, writeSink } from "./_image.ts";
import {
  BackingFileError,
  check,
  UnsupportedError,
} from "../streams/errors.ts";
import type {
  CreateSpec,
  Driver,
  Image,
  OpenOptions,
  Sink,
  Source,
} from "../streams/types.ts";
import { checkRange, storesDataIn } from "../streams/types.ts";

const FORMAT = "vdi";
const VERSION_1_1 = 0x00010001;
const HEADER_BYTES = 512;
/** Bytes of header_size that hold every field up to uuid_parent. */
const MIN_HEADER_SIZE = 456 - 72;
const SECTOR = 512;
const FREE = 0xffffffff;
const DISCARDED = 0xfffffffe;
/** The block size VirtualBox and QEMU write. */
const DEFAULT_BLOCK_SIZE = 1 << 20;
/** The largest block accepted (VirtualBox never writes other than 1 MiB). */
const MAX_BLOCK_SIZE = 256 << 20;
/** VirtualBox's limit: 2^32 - 3 blocks (the two top entries are markers). */
const MAX_BLOCKS = 0xfffffffd;
const TYPE_NAMES: Record<number, string> = {
  1: "dynamic",
  2: "static",
  3: "undo",
  4: "differencing",
};

const fail = formatErrors(FORMAT);

/** The parsed header. */
interface Header {
  text: string;
  headerSize: number;
  imageType: number;
  imageFlags: number;
  description: string;
  offsetBmap: number;
  offsetData: number;
  cylinders: number;
  heads: number;
  sectors: number;
  diskSize: number;
  blockSize: number;
  blocksInImage: number;
  blocksAllocated: number;
  uuidImage: Uint8Array;
  uuidLastSnap: Uint8Array;
  uuidLink: Uint8Array;
  uuidParent: Uint8Array;
}

const isNil = (b: Uint8Array) => b.every((x) => x === 0);

/** Parses and validates the header against the file's size. */
function parseHeader(b: Uint8Array, fileSize: number, file?: string): Header {
  const signature = le32(b, 64);
  if (signature !== SIGNATURE) {
    throw fail("signature", `0x${signature.toString(16)}`, "0xbeda107f", 64);
  }
  const version = le32(b, 68);
  if (version !== VERSION_1_1) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "version",
        value: `0x${version.toString(16).padStart(8, "0")}`,
        limit: "0x00010001 (version 1.1, the only one QEMU reads)",
        offset: 68,
        file,
      },
      `version 0x${
        version.toString(16).padStart(8, "0")
      } is not supported: only 0x00010001 (1.1, what VirtualBox and QEMU write)`,
    );
  }
  const headerSize = le32(b, 72);
  if (headerSize < MIN_HEADER_SIZE || 72 + headerSize > fileSize) {
    throw fail(
      "header_size",
      headerSize,
      `from ${MIN_HEADER_SIZE} to the file's size`,
      72,
      file,
    );
  }
  const imageType = le32(b, 76);
  if (!(imageType in TYPE_NAMES)) {
    throw fail(
      "image_type",
      imageType,
      "1 (dynamic), 2 (static), 3 (undo) or 4 (differencing)",
      76,
      file,
    );
  }
  const sectorSize = le32(b, 360);
  if (sectorSize !== SECTOR) {
    throw fail("sector_size", sectorSize, "512", 360, file);
  }
  const blockSize = le32(b, 376);
  if (
    blockSize < SECTOR || blockSize > MAX_BLOCK_SIZE ||
    (blockSize & (blockSize - 1)) !== 0
  ) {
    throw fail(
      "block_size",
      blockSize,
      `a power of two from ${SECTOR} to ${MAX_BLOCK_SIZE}`,
      376,
      file,
    );
  }
  const blockExtra = le32(b, 380);
  if (blockExtra !== 0) {
    throw new UnsupportedError(
      {
        format: FORMAT,
        field: "block_extra",
        value: blockExtra,
        limit: "0 (as VirtualBox and QEMU write it)",
        offset: 380,
        file,
      },
      `block_extra ${blockExtra} is not supported: only 0 (as VirtualBox and QEMU write it)`,
    );
  }
  const blocksInImage = le32(b, 384);
  if (blocksInImage > MAX_BLOCKS) {
    throw fail("blocks_in_image", blocksInImage, `at most ${MAX_BLOCKS}`, 384);
  }
  const diskSize = safeNumber(le64(b, 368), FORMAT, "disk_size", 368);
  if (diskSize > blocksInImage * blockSize) {
    throw fail(
      "disk_size",
      diskSize,
      `at most blocks_in_image * block_size = ${blocksInImage * blockSize}`,
      368,
      file,
    );
  }
  const offsetBmap = le32(b, 340);
  const offsetData = le32(b, 344);
  if (offsetBmap < 72 + headerSize || offsetBmap > fileSize) {
    throw fail(
      "offset_bmap",
      offsetBmap,
      `past the header (${
        72 + headerSize
      }) and within the file's ${fileSize} bytes`,
      340,
      file,
    );
  }
  if (offsetBmap + blocksInImage * 4 > fileSize) {
    throw fail(
      "blocks_in_image",
      blocksInImage,
      `a block map (${
        blocksInImage * 4
      } bytes at ${offsetBmap}) within the file's ${fileSize} bytes`,
      384,
      file,
    );
  }
  if (offsetData < offsetBmap + blocksInImage * 4 || offsetData > fileSize) {
    throw fail(
      "offset_data",
      offsetData,
      `past the block map (${
        offsetBmap + blocksInImage * 4
      }) and within the file's ${fileSize} bytes`,
      344,
      file,
    );
  }
  const blocksAllocated = le32(b, 388);
  if (blocksAllocated > blocksInImage) {
    throw fail(
      "blocks_allocated",
      blocksAllocated,
      `at most blocks_in_image (${blocksInImage})`,
      388,
      file,
    );
  }
  return {
    text: new TextDecoder().decode(b.subarray(0, 64)).replace(/[\0\n]+$/, ""),
    headerSize,
    imageType,
    imageFlags: le32(b, 80),
    description: new TextDecoder().decode(b.subarray(84, 340)).replace(
      /\0.*$/s,
      "",
    ),
    offsetBmap,
    offsetData,
    cylinders: le32(b, 348),
    heads: le32(b, 352),
    sectors: le32(b, 356),
    diskSize,
    blockSize,
    blocksInImage,
    blocksAllocated,
    uuidImage: b.slice(392, 408),
    uuidLastSnap: b.slice(408, 424),
    uuidLink: b.slice(424, 440),
    uuidParent: b.slice(440, 456),
  };
}

/** `options` with `parent` set to the rest of a chain's files, or removed. */
function withParents(
  options: Record<string, string>,
  rest: string[],
): Record<string, string> {
  const { parent: _parent, ...others } = options;
  return rest.length ? { ...others, parent: rest.join("\n") } : others;
}

async function openVdi(source: Source, options: OpenOptions): Promise<Image> {
  const sink = writeSink(options, FORMAT);
  check(source.size >= HEADER_BYTES, {
    format: FORMAT,
    field: "file size",
    value: source.size,
    limit: `at least ${HEADER_BYTES} bytes (the header)`,
    file: source.name,
  });
  const headerBytes = await source.read(0, HEADER_BYTES);
  const header = parseHeader(headerBytes, source.size, source.name);
  const { blockSize, blocksInImage, offsetData } = header;
  const size = header.diskSize;
  const bmapBytes = await source.read(header.offsetBmap, blocksInImage * 4);
  const bmap = new Uint32Array(blocksInImage);
  // Stored blocks counted while checking: an entry must name a block
  // inside the file, and no two entries the same one.
  const owner = new Map<number, number>();
  let stored = 0;
  for (let i = 0; i < blocksInImage; i++) {
    const entry = le32(bmapBytes, i * 4);
    bmap[i] = entry;
    if (entry === FREE || entry === DISCARDED) continue;
    const at = offsetData + entry * blockSize;
    if (entry >= blocksInImage || at + blockSize > source.size) {
      throw fail(
        `block map[${i}]`,
        entry,
        `a block index below blocks_in_image (${blocksInImage}) whose ${blockSize} bytes at ${at} lie within the file's ${source.size} bytes`,
        header.offsetBmap + i * 4,
        source.name,
      );
    }
    const seen = owner.get(entry);
    if (seen !== undefined) {
      throw fail(
        `block map[${i}]`,
        entry,
        `a block no other entry uses (block map[${seen}] does)`,
        header.offsetBmap + i * 4,
        source.name,
      );
    }
    owner.set(entry, i);
    stored++;
  }
  const differencing = !isNil(header.uuidLink) || header.imageType === 4;
  // parent= names this image's parent, then (one per line) the parent's
  // parent and so on down a chain of differencing images. It is ignored by
  // images that have none: the options of an open reach every layer.
  const [parent, ...grandparents] = options.options?.parent?.split("\n") ??
    [];
  const backingFile = differencing && parent ? parent : undefined;
  const backingOptions = backingFile === undefined
    ? undefined
    : withParents(options.options ?? {}, grandparents);
  const details: Record<string, unknown> = {
    imageType: TYPE_NAMES[header.imageType],
    text: header.text,
    description: header.description,
    blockSize,
    blocksInImage,
    blocksAllocated: header.blocksAllocated,
    blocksStored: stored,
    uuid: uuidText(header.uuidImage),
    uuidLastSnap: uuidText(header.uuidLastSnap),
  };
  if (differencing) {
    Object.assign(details, {
      differencing: true,
      parentUuid: uuidText(header.uuidLink),
      parentModificationUuid: uuidText(header.uuidParent),
      parent: backingFile ??
        "not named: VirtualBox links a parent by UUID only, so its file must be named (open option parent, CLI --parent FILE)",
    });
  }
  const state = {
    source,
    header,
    headerBytes,
    bmap,
    stored,
    // (Blocks up to 4 MiB: the overlay's copy-on-write window.)
    inOverlay: backingFile !== undefined &&
      options.resolveBacking !== undefined && blockSize <= 4 << 20,
  };

  const reader = blockReader({
    source,
    size,
    blockSize,
    lookup(block) {
      const length = Math.min(blockSize, size - block * blockSize);
      const entry = state.bmap[block];
      if (entry === FREE) return wholeBlock(length, "unallocated");
      if (entry === DISCARDED) return wholeBlock(length, "zero");
      return wholeBlock(length, "data", offsetData + entry * blockSize);
    },
    unallocated(offset, length) {
      if (!differencing) return;
      const where = `vdi: bytes ${offset}..${offset + length} of ${
        source.name ?? "this image"
      }, a differencing image, are in its parent (uuid ${
        uuidText(header.uuidLink)
      }), which was not opened`;
      throw new BackingFileError(
        `${where}: name its file with the open option parent and allow backing files`,
        backingFile ?? "",
        `${where}: name its file with --parent FILE`,
      );
    },
  });

  const image: Image & { readonly requiresBacking: boolean } = {
    format: FORMAT,
    size,
    name: source.name,
    encrypted: false,
    geometry: header.cylinders && header.heads && header.sectors
      ? {
        cylinders: header.cylinders,
        heads: header.heads,
        sectors: header.sectors,
      }
      : undefined,
    backingFile,
    // Probed: VirtualBox's parents may be of other formats, and the UUID
    // check below refuses any image that is not the one linked.
    // A parent of another format carries the UUID VirtualBox reads from
    // it (a VHD's unique id); one that keeps none (raw, qcow, vmdk without
    // ddb.uuid.image, vhdx: VirtualBox links those through its media
    // registry alone) cannot be checked, and is refused.
    backingId: backingFile === undefined
      ? undefined
      : `uuid ${uuidText(header.uuidLink)}`,
    backingOptions,
    id: `uuid ${uuidText(header.uuidImage)}`,
    requiresBacking: differencing,
    details,
    ...reader,
    close: () => source.close?.() ?? Promise.resolve(),
  };
  // Read-only, stored blocks read as their bytes in the file: convert
  // copies them file to file (in the kernel) to a raw output.
  if (!sink) return storesDataIn(image, source);
  return writable(image, state, sink);
}

/** The mutable state of an open image. */
interface State {
  source: Source;
  header: Header;
  headerBytes: Uint8Array;
  bmap: Uint32Array;
  stored: number;
  /**
   * True when the registry stacks this image on its named parent: the
   * overlay then fills the rest of a block a write allocates.
   */
  inOverlay: boolean;
}

/**
 * The image opened for writing: a write to a free or discarded block
 * stores the whole block at the end of the data (zeros around the bytes
 * written), then its block map entry and blocks_allocated are updated.
 */
function writable(
  image: Image & { readonly requiresBacking: boolean },
  state: State,
  sink: Sink,
): Image {
  const { blockSize, offsetData, offsetBmap } = state.header;
  let writing: Promise<unknown> = Promise.resolve();
  /** The buffer a new block is put together in (see writeBlockPart). */
  let scratch: Uint8Array | undefined;

  async function writeBlockPart(
    block: number,
    within: number,
    bytes: Uint8Array,
  ) {
    const entry = state.bmap[block];
    if (entry !== FREE && entry !== DISCARDED) {
      await sink.write(offsetData + entry * blockSize + within, bytes);
      return;
    }
    const index = state.stored;
    if (bytes.length === blockSize) {
      // A whole block: written as it is (no copy).
      await sink.write(offsetData + index * blockSize, bytes);
      await recordBlock(block, index);
      return;
    }
    // One block buffer for every new block (writes run one at a time, each
    // done with it when it answers): a fresh 1 MiB array per block cost
    // page faults, 768 of them in a 768 MiB convert.
    if (!scratch) scratch = new Uint8Array(blockSize);
    else scratch.fill(0);
    const full = scratch;
    if (entry === FREE && image.requiresBacking) {
      // The rest of the block is the parent's (checked before the write:
      // at hand, or the overlay's to copy).
      const parent = fillFrom.get(result);
      const at = block * blockSize;
      const inside = parent ? Math.min(blockSize, parent.size - at) : 0;
      if (inside > 0) full.set(await parent!.read(at, inside));
    }
    full.set(bytes, within);
    await sink.write(offsetData + index * blockSize, full);
    await recordBlock(block, index);
  }

  /** Block `block` is stored at `index`: the block map and blocks_allocated. */
  async function recordBlock(block: number, index: number) {
    state.stored++;
    state.bmap[block] = index;
    const entryBytes = new Uint8Array(4);
    setLe32(entryBytes, 0, index);
    await sink.write(offsetBmap + block * 4, entryBytes);
    setLe32(state.headerBytes, 388, state.stored);
    await sink.write(388, state.headerBytes.subarray(388, 392));
  }

  // The first write of a session gives the image a new modification UUID
  // (uuid_last_snap, VirtualBox's uuidModify), written and flushed before
  // the data, as VirtualBox's vdSetModifiedFlag does. uuid_image,
  // uuid_link and uuid_parent stay: children still link to uuid_image,
  // and a child's uuid_parent keeps naming the parent's state it was made
  // over (VirtualBox does not refuse a child for it).
  let modified = false;
  async function markModified() {
    if (modified) return;
    modified = true;
    const uuid = randomUuid();
    state.headerBytes.set(uuid, 408);
    await sink.write(408, uuid);
    await sink.flush();
    if (image.details) image.details.uuidLastSnap = uuidText(uuid);
  }

  /**
   * Refuses, before anything is written, a write that would store part of
   * a free block of a differencing image whose parent is not at hand.
   */
  function checkParentAtHand(offset: number, length: number) {
    if (!image.requiresBacking || state.inOverlay || fillFrom.has(result)) {
      return;
    }
    for (let at = offset; at < offset + length;) {
      const block = Math.floor(at / blockSize);
      const start = block * blockSize;
      const end = Math.min(image.size, start + blockSize);
      const stop = Math.min(offset + length, end);
      if (state.bmap[block] === FREE && (at > start || stop < end)) {
        throw new UnsupportedError(
          { format: FORMAT, field: `block ${block}`, value: "free" },
          `writing part of block ${block} (${blockSize} bytes), which this differencing image does not hold, needs its parent's bytes for the rest: name the parent (open option parent, CLI --parent FILE)`,
        );
      }
      at = stop;
    }
  }

  async function write(offset: number, bytes: Uint8Array): Promise<void> {
    checkRange(image.size, offset, bytes.length);
    if (bytes.length === 0) return;
    checkParentAtHand(offset, bytes.length);
    await markModified();
    for (let at = offset; at < offset + bytes.length;) {
      const block = Math.floor(at / blockSize);
      const stop = Math.min(offset + bytes.length, (block + 1) * blockSize);
      await writeBlockPart(
        block,
        at - block * blockSize,
        bytes.subarray(at - offset, stop - offset),
      );
      at = stop;
    }
  }

  // The file grows as blocks are stored: reads of the new blocks go to the
  // sink read back, so the source must see the sink's size.
  const result: Image = {
    ...image,
    write(offset, bytes) {
      const next = writing.then(() => write(offset, bytes));
      writing = next.catch(() => {});
      return next;
    },
    async flush() {
      await writing;
      await sink.flush();
    },
  };
  return result;
}

/** The `-o` options of a vdi to write, checked. */
function vdiSettings(
  options: Record<string, string>,
): { isStatic: boolean; blockSize: number } {
  checkWriteOptions(vdi, options);
  const isStatic = options.static ?? "off";
  if (isStatic !== "on" && isStatic !== "off") {
    throw fail("static", isStatic, '"on" or "off"');
  }
  const blockSize = options.block_size === undefined
    ? DEFAULT_BLOCK_SIZE
    : Number(options.block_size);
  if (
    !Number.isSafeInteger(blockSize) || blockSize < SECTOR ||
    blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0
  ) {
    throw fail(
      "block_size",
      options.block_size,
      `a power of two from ${SECTOR} to ${MAX_BLOCK_SIZE}`,
    );
  }
  return { isStatic: isStatic === "on", blockSize };
}

/** Where a new vdi of `requested` bytes puts things (the size in whole sectors, as QEMU). */
function vdiLayout(requested: number, blockSize: number) {
  const size = Math.ceil(requested / SECTOR) * SECTOR;
  const blocks = Math.ceil(size / blockSize);
  if (blocks > MAX_BLOCKS) {
    throw fail("size", requested, `at most ${MAX_BLOCKS} blocks`);
  }
  const offsetData = HEADER_BYTES + Math.ceil(blocks * 4 / SECTOR) * SECTOR;
  return { size, blocks, offsetData };
}

/**
 * `measure` by the layout `create` writes: the header, the block map, and
 * every block when fully allocated (or static); an image's own required
 * size is left to writing it (convert stores only blocks holding data).
 */
function measureVdi(
  subject: Source | number,
  options: Record<string, string> = {},
): Promise<{ required?: number; fullyAllocated: number }> {
  const { isStatic, blockSize } = vdiSettings(options);
  const size = typeof subject === "number" ? subject : subject.size;
  const { blocks, offsetData } = vdiLayout(size, blockSize);
  const full = offsetData + blocks * blockSize;
  const required = isStatic
    ? full
    : typeof subject === "number"
    ? offsetData
    : undefined;
  return Promise.resolve({ required, fullyAllocated: full });
}

/**
 * `create` options: `static=on|off`, `block_size` (bytes, a power of two;
 * 1 MiB by default, the only size VirtualBox and QEMU read).
 */
async function createVdi(sink: Sink, spec: CreateSpec): Promise<Image> {
  requireRandomAccess(sink, FORMAT, "vdi images");
  const options = spec.options ?? {};
  const { isStatic, blockSize } = vdiSettings(options);
  const parent = spec.backingFile === undefined ? undefined : parentLink(spec);
  if (parent && isStatic) {
    throw fail("static", "on", "off for a differencing image");
  }
  const { size, blocks, offsetData } = vdiLayout(spec.size, blockSize);
  const offsetBmap = HEADER_BYTES;
  const header = new Uint8Array(HEADER_BYTES);
  header.set(
    new TextEncoder().encode("<<< QEMU VM Virtual Disk Image >>>\n"),
    0,
  );
  setLe32(header, 64, SIGNATURE);
  setLe32(header, 68, VERSION_1_1);
  setLe32(header, 72, MIN_HEADER_SIZE);
  setLe32(header, 76, parent ? 4 : isStatic ? 2 : 1);
  setLe32(header, 340, offsetBmap);
  setLe32(header, 344, offsetData);
  setLe32(header, 360, SECTOR);
  setLe64(header, 368, size);
  setLe32(header, 376, blockSize);
  setLe32(header, 384, blocks);
  setLe32(header, 388, isStatic ? blocks : 0);
  header.set(randomUuid(), 392);
  header.set(randomUuid(), 408);
  if (parent) {
    header.set(parent.uuid, 424);
    header.set(parent.modification, 440);
  }
  const bmap = new Uint8Array(offsetData - offsetBmap);
  for (let i = 0; i < blocks; i++) {
    setLe32(bmap, i * 4, isStatic ? i : FREE);
  }
  await sink.write(0, header);
  await sink.write(offsetBmap, bmap);
  const end = offsetData + (isStatic ? blocks * blockSize : 0);
  if (sink.resize) await sink.resize(end);
  else if (end > offsetData) await sink.write(end - 1, new Uint8Array(1));
  await sink.flush();
  // Blocks added later are read back through the sink; only the open
  // itself looks at the size.
  const source = readBackSource(sink, FORMAT, () => end);
  const image = await openVdi(source, { writable: true, sink });
  if (parent) fillFrom.set(image, spec.backing!);
  return image;
}

/**
 * The parents of differencing images made by `create`, by image: a write
 * into a free block fills the rest of the block from there. (An image
 * opened later is written through an overlay, which does that.)
 */
const fillFrom = new WeakMap<Image, Source>();

/** The parent's UUIDs a differencing image records, from the opened parent. */
function parentLink(
  spec: CreateSpec,
): { uuid: Uint8Array; modification: Uint8Array } {
  const opened = spec.backing;
  if (!opened) {
    throw new UnsupportedError(
      { format: FORMAT },
      `a differencing vdi links its parent ${spec.backingFile} by UUID: the parent must be opened to read it`,
    );
  }
  // The parent's UUID as VirtualBox reads it (a vdi's uuid_image, a
  // VHD's unique id: its `id`), and its modification UUID where it has
  // one (a vdi's; VirtualBox leaves uuid_parent nil for a VHD parent).
  const parent = (opened as { top?: Image }).top ?? opened;
  const uuid = parent.id?.startsWith("uuid ") ? parent.id.slice(5) : undefined;
  if (uuid === undefined) {
    throw new UnsupportedError(
      { format: FORMAT, field: "parent format", value: parent.format },
      `the parent ${spec.backingFile} is a ${parent.format} image, which keeps no UUID a differencing vdi can link to: here a vdi's parent is a vdi or a VHD (vpc). VirtualBox links parents of other formats through its media registry alone, which a file cannot carry`,
    );
  }
  const modification = parent.format === FORMAT
    ? parent.details?.uuidLastSnap as string
    : undefined;
  if (opened.size !== spec.size) {
    throw fail(
      "size",
      spec.size,
      `the parent's size (${opened.size} bytes): a differencing vdi has its parent's size`,
    );
  }
  return {
    uuid: uuidBytes(uuid),
    modification: modification === undefined
      ? new Uint8Array(16)
      : uuidBytes(modification),
  };
}

/** A random (version 4) UUID, stored as VirtualBox stores one. */
function randomUuid(): Uint8Array {
  const uuid = crypto.getRandomValues(new Uint8Array(16));
  uuid[7] = (uuid[7] & 0x0f) | 0x40; // version 4 (little-endian field)
  uuid[8] = (uuid[8] & 0x3f) | 0x80;
  return uuid;
}

/** The 16 bytes of a UUID printed by {@linkcode uuidText}. */
function uuidBytes(text: string): Uint8Array {
  const hex = text.replace(/-/g, "");
  const b = new Uint8Array(16);
  for (let i = 0; i < 16; i++) b[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  // The first three fields are stored little-endian.
  b.subarray(0, 4).reverse();
  b.subarray(4, 6).reverse();
  b.subarray(6, 8).reverse();
  return b;
}

/**
 * `resize` of a dynamic or static vdi: the block map grows or shrinks
 * with the disk. A block map that outgrows the room before the first
 * block takes the room of as many blocks as it needs (they move to the
 * end of the data); shrinking drops the blocks past the new end and moves
 * the last stored blocks into their places, so that the stored blocks stay
 * numbered from 0 without holes (what `qemu-img check` counts). A static
 * image stores the new blocks (zeros) as it grows. Not crash-safe: a copy
 * first for images that matter.
 */
async function resizeVdi(file: Source & Sink, size: number): Promise<void> {
  await openVdi(file, {}); // every field and block map entry checked
  const headerBytes = (await file.read(0, HEADER_BYTES)).slice();
  const h = parseHeader(headerBytes, file.size, file.name);
  if (h.imageType !== 1 && h.imageType !== 2) {
    throw new UnsupportedError(
      { format: FORMAT, field: "image_type", value: h.imageType, offset: 76 },
      `a ${
        TYPE_NAMES[h.imageType]
      } image is not resized here (only dynamic and static ones)`,
    );
  }
  if (size % SECTOR !== 0) {
    throw fail("size", size, "a multiple of 512");
  }
  const isStatic = h.imageType === 2;
  const { blockSize, offsetBmap } = h;
  const newBlocks = Math.ceil(size / blockSize);
  if (newBlocks > MAX_BLOCKS) {
    throw fail("size", size, `at most ${MAX_BLOCKS} blocks of ${blockSize}`);
  }
  const old = await file.read(offsetBmap, h.blocksInImage * 4);
  const bmap = new Uint32Array(newBlocks).fill(FREE);
  for (let i = 0; i < Math.min(newBlocks, h.blocksInImage); i++) {
    bmap[i] = le32(old, i * 4);
  }
  // Room for the block map: blocks of data it takes over.
  const room = h.offsetData - offsetBmap;
  const needed = Math.ceil(newBlocks * 4 / SECTOR) * SECTOR;
  const shift = Math.max(0, Math.ceil((needed - room) / blockSize));
  const offsetData = h.offsetData + shift * blockSize;
  if (offsetData > 0xffffffff) {
    throw fail("offset_data", offsetData, "at most 2^32 - 1");
  }
  // Stored blocks kept, and the slots [0, count) they end up in: a block
  // stays where it is when its slot is in range, others move to a free one.
  const kept: number[] = [];
  for (let i = 0; i < newBlocks; i++) {
    if (bmap[i] !== FREE && bmap[i] !== DISCARDED) kept.push(i);
  }
  const count = kept.length;
  const taken = new Uint8Array(count);
  const moving: number[] = [];
  for (const i of kept) {
    const slot = bmap[i] - shift;
    if (slot >= 0 && slot < count) {
      taken[slot] = 1;
      bmap[i] = slot;
    } else {
      moving.push(i);
    }
  }
  let free = 0;
  for (const i of moving) {
    while (taken[free]) free++;
    taken[free] = 1;
    // Read from the old place, written to one no kept block uses.
    const from = h.offsetData + bmap[i] * blockSize;
    await file.write(
      offsetData + free * blockSize,
      await file.read(from, blockSize),
    );
    bmap[i] = free;
  }
  // The last block's bytes past a smaller end become zeros: growing again
  // reads zeros there, not what was dropped.
  const tail = size % blockSize;
  const last = bmap[newBlocks - 1];
  if (size < h.diskSize && tail !== 0 && last !== FREE && last !== DISCARDED) {
    await file.write(
      offsetData + last * blockSize + tail,
      new Uint8Array(blockSize - tail),
    );
  }
  let stored = count;
  if (isStatic) {
    for (let i = h.blocksInImage; i < newBlocks; i++) bmap[i] = stored++;
  }
  await file.flush();
  const table = new Uint8Array(offsetData - offsetBmap);
  for (let i = 0; i < newBlocks; i++) setLe32(table, i * 4, bmap[i]);
  await file.write(offsetBmap, table);
  setLe32(headerBytes, 344, offsetData);
  setLe64(headerBytes, 368, size);
  setLe32(headerBytes, 384, newBlocks);
  setLe32(headerBytes, 388, stored);
  await file.write(0, headerBytes);
  const end = offsetData + stored * blockSize;
  if (file.resize) await file.resize(end);
  else if (end > file.size) await file.write(end - 1, new Uint8Array(1));
  await file.flush();
}

/**
 * The vdi driver: VirtualBox disk images. Reads dynamic, static and
 * differencing images (the parent followed only when named with the open
 * option `parent=FILE`, and checked by UUID); creates dynamic and static
 * ones (`static=on`), and differencing ones over an opened parent
 * (`backingFile` with `backing`).
 *
 * @example
 * ```ts
 * import { memorySink, vdi } from "../mod.ts";
 * const sink = memorySink();
 * const image = await vdi.create!(sink, { size: 4 << 20 });
 * await image.write!(1 << 20, new Uint8Array(512).fill(7));
 * await image.flush!();
 * console.log((await image.read(1 << 20, 1))[0]); // 7
 * ```
 */
export const vdi: Driver = {
  name: FORMAT,
  description: "VirtualBox VDI (dynamic, static, differencing)",
  writeOptions: [
    {
      name: "static",
      help: "preallocate every block (a static image)",
      values: ["on", "off"],
      default: "off",
    },
    {
      name: "block_size",
      help: "bytes per block; VirtualBox and QEMU read only 1 MiB (1048576)",
      accepts: "a power of two from 512 to 268435456",
      default: "1048576",
    },
  ],
  probe: probeVdi,
  open: openVdi,
  create: createVdi,
  createNeedsBacking: true,
  resize: resizeVdi,
  measure: measureVdi,
};
