// Writers of Apple's sparse and floppy image formats, for the tests: each
// builds a file from a raw disk by the public description of its format
// (libmodi's notes and apfs-fuse for sparseimage and sparsebundle, Apple II
// File Type Note $e0/8005 for DiskCopy 4.2, the MacBinary II standard,
// huven/asif-format for ASIF), written apart from the readers in drivers/
// so that a misreading in one is not repeated in the other.

/** Big-endian field writers over a DataView. */
function dv(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

function ascii(b: Uint8Array, at: number, text: string) {
  for (let i = 0; i < text.length; i++) b[at + i] = text.charCodeAt(i);
}

/** Options for {@linkcode writeSparseimage}. */
export interface SparseimageOptions {
  /** Band size in bytes (a multiple of 512). @default 1 MiB */
  bandSize?: number;
  /**
   * The bands to store, in the order they are stored (the order they were
   * first written). @default every band holding a non-zero byte, in disk order
   */
  order?: number[];
  /** Store the last band cut short at the disk's end instead of whole. @default false */
  shortLastBand?: boolean;
}

/** Bands of `disk` that hold a non-zero byte. */
export function nonZeroBands(disk: Uint8Array, bandSize: number): number[] {
  const out: number[] = [];
  for (let band = 0; band * bandSize < disk.length; band++) {
    if (disk.subarray(band * bandSize, (band + 1) * bandSize).some((x) => x)) {
      out.push(band);
    }
  }
  return out;
}

/**
 * A `.sparseimage` of `disk`: a 4096-byte header node (`sprs`, version 3,
 * sectors per band, total sectors, 1008 band slots at 64), its bands, then
 * as many index nodes (1010 slots at 56) as the bands need, each followed
 * by its bands.
 */
export function writeSparseimage(
  disk: Uint8Array,
  options: SparseimageOptions = {},
): Uint8Array {
  const bandSize = options.bandSize ?? 1 << 20;
  const order = options.order ?? nonZeroBands(disk, bandSize);
  const bands = Math.ceil(disk.length / bandSize);
  const stored = (band: number) =>
    options.shortLastBand && band === bands - 1
      ? disk.length - band * bandSize
      : bandSize;
  const parts: Uint8Array[] = [];
  let fileSize = 0;
  const push = (p: Uint8Array) => {
    parts.push(p);
    fileSize += p.length;
  };
  const header = new Uint8Array(4096);
  ascii(header, 0, "sprs");
  dv(header).setUint32(4, 3);
  dv(header).setUint32(8, bandSize / 512);
  dv(header).setUint32(12, 1);
  const sectors = disk.length / 512;
  dv(header).setUint32(16, sectors % 2 ** 32);
  dv(header).setBigUint64(28, BigInt(sectors));
  push(header);
  let node = header;
  let slotsAt = 64;
  let slots = 1008;
  let used = 0;
  let nodeNumber = 0;
  for (const band of order) {
    if (used === slots) {
      const next = new Uint8Array(4096);
      ascii(next, 0, "sprs");
      dv(next).setUint32(4, nodeNumber++);
      dv(next).setUint32(8, 1);
      dv(node).setBigUint64(node === header ? 20 : 12, BigInt(fileSize));
      push(next);
      node = next;
      slotsAt = 56;
      slots = 1010;
      used = 0;
    }
    dv(node).setUint32(slotsAt + used * 4, band + 1);
    used++;
    const bytes = new Uint8Array(stored(band));
    bytes.set(disk.subarray(band * bandSize, band * bandSize + bytes.length));
    push(bytes);
  }
  const out = new Uint8Array(fileSize);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** The DiskCopy 4.2 checksum: add each big-endian word, rotate right by one. */
function dc42Sum(bytes: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < bytes.length; i += 2) {
    sum = (sum + bytes[i] * 256 + bytes[i + 1]) % 2 ** 32;
    sum = Math.floor(sum / 2) + (sum % 2) * 2 ** 31;
  }
  return sum;
}

/** Options for {@linkcode writeDiskCopy42}. */
export interface DiskCopyOptions {
  /** The disk name (ASCII, at most 63 characters). @default "Test Disk" */
  name?: string;
  /** Tag bytes (a multiple of 12). @default none */
  tags?: Uint8Array;
  /** diskFormat byte. @default 1 (800K GCR) */
  diskFormat?: number;
  /** formatByte. @default 0x22 */
  formatByte?: number;
}

/** A DiskCopy 4.2 image of `data` (a multiple of 512 bytes). */
export function writeDiskCopy42(
  data: Uint8Array,
  options: DiskCopyOptions = {},
): Uint8Array {
  const tags = options.tags ?? new Uint8Array(0);
  const name = options.name ?? "Test Disk";
  const out = new Uint8Array(84 + data.length + tags.length);
  out[0] = name.length;
  ascii(out, 1, name);
  dv(out).setUint32(64, data.length);
  dv(out).setUint32(68, tags.length);
  dv(out).setUint32(72, dc42Sum(data));
  // The first 12 tag bytes are left out of the tag checksum.
  dv(out).setUint32(76, tags.length > 12 ? dc42Sum(tags.subarray(12)) : 0);
  out[80] = options.diskFormat ?? 1;
  out[81] = options.formatByte ?? 0x22;
  dv(out).setUint16(82, 0x0100);
  out.set(data, 84);
  out.set(tags, 84 + data.length);
  return out;
}

/** CRC-16/XMODEM, bit by bit (polynomial 0x1021, initial 0). */
function crc16(bytes: Uint8Array): number {
  let crc = 0;
  for (const byte of bytes) {
    for (let bit = 7; bit >= 0; bit--) {
      const top = ((crc >> 15) & 1) ^ ((byte >> bit) & 1);
      crc = (crc << 1) & 0xffff;
      if (top) crc ^= 0x1021;
    }
  }
  return crc;
}

/** Options for {@linkcode wrapMacBinary}. */
export interface MacBinaryOptions {
  name?: string;
  type?: string;
  creator?: string;
  /** 0 for MacBinary I (no CRC), 129 for MacBinary II. @default 129 */
  version?: number;
  /** A resource fork to append. */
  resourceFork?: Uint8Array;
}

/** A MacBinary file holding `dataFork` (and a resource fork), forks padded to 128 bytes. */
export function wrapMacBinary(
  dataFork: Uint8Array,
  options: MacBinaryOptions = {},
): Uint8Array {
  const name = options.name ?? "Test Disk.image";
  const resource = options.resourceFork ?? new Uint8Array(0);
  const pad = (n: number) => Math.ceil(n / 128) * 128;
  const out = new Uint8Array(128 + pad(dataFork.length) + pad(resource.length));
  out[1] = name.length;
  ascii(out, 2, name);
  ascii(out, 65, options.type ?? "dImg");
  ascii(out, 69, options.creator ?? "dCpy");
  dv(out).setUint32(83, dataFork.length);
  dv(out).setUint32(87, resource.length);
  const version = options.version ?? 129;
  if (version) {
    out[122] = version;
    out[123] = 129;
    dv(out).setUint16(124, crc16(out.subarray(0, 124)));
  }
  out.set(dataFork, 128);
  out.set(resource, 128 + pad(dataFork.length));
  return out;
}

/** A small disk with data, zeros and a pattern, for fuzzing seeds. */
export function seedDisk(size: number): Uint8Array {
  const disk = new Uint8Array(size);
  for (let i = 0; i < size; i += 3) disk[i] = (i * 31) & 0xff;
  disk.fill(0, size >> 2, size >> 1);
  return disk;
}

/**
 * The band files of the fuzzer's sparse bundle: its seed is the bundle's
 * Info.plist (a bundle is a folder, and the fuzzer mutates one file), and
 * the worker opens each mutant with these bands beside it.
 */
export function fuzzBundleFiles(): Record<string, Uint8Array | null> {
  const files = writeSparsebundle(seedDisk(1 << 20), {
    bandSize: 64 << 10,
    trim: true,
  });
  delete files["Info.plist"];
  return files;
}

/** Seeds for the fuzzer: one small image of each variant the writers make. */
export function appleSeeds(): {
  name: string;
  format: string;
  bytes: Uint8Array;
}[] {
  const disk = seedDisk(1 << 20);
  const bands = nonZeroBands(disk, 64 << 10);
  return [
    {
      name: "made:sparseimage",
      format: "sparseimage",
      bytes: writeSparseimage(disk, {
        bandSize: 64 << 10,
        order: bands.reverse(),
      }),
    },
    {
      name: "made:sparseimage-index-nodes",
      format: "sparseimage",
      bytes: writeSparseimage(seedDisk(1200 * 512), { bandSize: 512 }),
    },
    {
      name: "made:diskcopy42",
      format: "diskcopy42",
      bytes: writeDiskCopy42(disk.subarray(0, 400 << 10), {
        tags: seedDisk(800 * 12),
      }),
    },
    {
      name: "made:diskcopy42-macbinary",
      format: "diskcopy42",
      bytes: wrapMacBinary(writeDiskCopy42(disk.subarray(0, 800 << 10))),
    },
    {
      name: "made:sparsebundle-plist",
      format: "sparsebundle",
      bytes: new TextEncoder().encode(bundlePlist(64 << 10, 1 << 20)),
    },
    {
      name: "made:asif",
      format: "asif",
      bytes: writeAsif(disk, {
        chunkSize: 32 << 10,
        order: nonZeroBands(disk, 32 << 10).reverse(),
        partial: [1, 30],
        staleFirst: true,
      }),
    },
  ];
}

/** Options for {@linkcode writeAsif}. */
export interface AsifOptions {
  /** Chunk size in bytes. @default 1 MiB */
  chunkSize?: number;
  /** Block (sector) size in bytes. @default 512 */
  blockSize?: number;
  /** The size the disk may grow to. @default 4 × the disk's size */
  maxSize?: number;
  /** Data chunks to store, in file order. @default the non-zero ones, in disk order */
  order?: number[];
  /**
   * Chunks stored as written in part (status 11): only their non-zero
   * sectors are marked written in the group's bitmap chunk, and the file
   * holds junk (0xee) in the others.
   */
  partial?: number[];
  /**
   * Put the current directory second, and a stale one (lower sequence
   * number, pointing at a table of junk) first. @default false
   */
  staleFirst?: boolean;
}

/**
 * An ASIF image of `disk`, laid out as huven/asif-format describes it:
 * chunk 0 holds the 512-byte header and the two directories; then the
 * tables (C groups of N data-chunk entries and one bitmap-chunk entry,
 * N = 4 × block size, C = ⌊chunk size / (8 × (N + 1))⌋), bitmap chunks
 * and data chunks, each one chunk long.
 */
export function writeAsif(
  disk: Uint8Array,
  options: AsifOptions = {},
): Uint8Array {
  const chunk = options.chunkSize ?? 1 << 20;
  const block = options.blockSize ?? 512;
  const maxSize = options.maxSize ?? disk.length * 4;
  const N = 4 * block;
  const S = 8 * (N + 1);
  const C = Math.floor(chunk / S);
  const D = C * N * chunk;
  const T = Math.ceil(maxSize / D);
  const order = options.order ?? nonZeroBands(disk, chunk);
  const partial = new Set(options.partial ?? []);
  if (16 + 8 * T * 2 + 512 > chunk) {
    throw new Error("directories overflow chunk 0");
  }

  // Chunk numbers: 0 header, then tables as needed, bitmaps, data.
  let nextChunk = 1;
  const tables = new Map<number, { chunk: number; entries: BigUint64Array }>();
  const tableFor = (t: number) => {
    let table = tables.get(t);
    if (!table) {
      table = { chunk: nextChunk++, entries: new BigUint64Array(C * (N + 1)) };
      tables.set(t, table);
    }
    return table;
  };
  const bitmaps = new Map<string, { chunk: number; bytes: Uint8Array }>();
  const pieces: { chunk: number; bytes: Uint8Array }[] = [];
  for (const c of order) {
    const t = Math.floor((c * chunk) / D);
    const k = c - t * C * N;
    const group = Math.floor(k / N);
    const table = tableFor(t);
    const dataChunk = nextChunk++;
    const bytes = new Uint8Array(chunk);
    bytes.set(disk.subarray(c * chunk, (c + 1) * chunk));
    if (partial.has(c)) {
      const key = `${t}/${group}`;
      let bitmap = bitmaps.get(key);
      if (!bitmap) {
        bitmap = { chunk: nextChunk++, bytes: new Uint8Array(chunk) };
        bitmaps.set(key, bitmap);
        table.entries[group * (N + 1) + N] = BigInt(bitmap.chunk);
      }
      const sectorsPerChunk = chunk / block;
      for (let s = 0; s < sectorsPerChunk; s++) {
        const sector = bytes.subarray(s * block, (s + 1) * block);
        const groupSector = (k % N) * sectorsPerChunk + s;
        if (sector.some((x) => x)) {
          bitmap.bytes[groupSector >> 2] |= 1 << ((groupSector % 4) * 2);
        } else {
          sector.fill(0xee);
        }
      }
      table.entries[group * (N + 1) + (k % N)] = (3n << 62n) |
        BigInt(dataChunk);
    } else {
      table.entries[group * (N + 1) + (k % N)] = (1n << 62n) |
        BigInt(dataChunk);
    }
    pieces.push({ chunk: dataChunk, bytes });
  }
  // A stale table full of junk, named only by the stale directory.
  const staleTable = nextChunk++;
  const out = new Uint8Array(nextChunk * chunk);
  const v = dv(out);
  ascii(out, 0, "shdw");
  v.setUint32(4, 1);
  v.setUint32(8, 512);
  const dirBytes = 8 + 8 * T;
  const first = 512;
  const second = 512 + Math.ceil(dirBytes / 512) * 512;
  const [current, stale] = options.staleFirst
    ? [second, first]
    : [first, second];
  v.setBigUint64(16, BigInt(first));
  v.setBigUint64(24, BigInt(second));
  for (let i = 0; i < 16; i++) out[32 + i] = 0xa0 + i;
  v.setBigUint64(48, BigInt(disk.length / block));
  v.setBigUint64(56, BigInt(maxSize / block));
  v.setUint32(64, chunk);
  v.setUint16(68, block);
  v.setBigUint64(current, 7n);
  v.setBigUint64(stale, 6n);
  for (const [t, table] of tables) {
    v.setBigUint64(current + 8 + 8 * t, BigInt(table.chunk));
    for (let i = 0; i < table.entries.length; i++) {
      v.setBigUint64(table.chunk * chunk + 8 * i, table.entries[i]);
    }
  }
  for (let t = 0; t < T; t++) {
    v.setBigUint64(stale + 8 + 8 * t, BigInt(staleTable));
  }
  out.fill(0x41, staleTable * chunk, (staleTable + 1) * chunk);
  for (const b of bitmaps.values()) out.set(b.bytes, b.chunk * chunk);
  for (const p of pieces) out.set(p.bytes, p.chunk * chunk);
  return out;
}

/** Options for {@linkcode writeSparsebundle}. */
export interface SparsebundleOptions {
  /** band-size in bytes. @default 8 MiB */
  bandSize?: number;
  /** Band files to store. @default the bands holding a non-zero byte */
  bands?: number[];
  /** Cut each band file after its last non-zero byte (as a band written only in part is). @default false */
  trim?: boolean;
  /** Extra Info.plist text inside the dict, or replacements of the defaults. */
  plist?: { version?: string; type?: string; extra?: string };
}

/** The Info.plist of a sparse bundle. */
export function bundlePlist(
  bandSize: number,
  size: number,
  o: SparsebundleOptions["plist"] = {},
): string {
  return `<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>CFBundleInfoDictionaryVersion</key>
	<string>6.0</string>
	<key>band-size</key>
	<integer>${bandSize}</integer>
	<key>bundle-backingstore-version</key>
	<integer>${o.version ?? "1"}</integer>
	<key>diskimage-bundle-type</key>
	<string>${o.type ?? "com.apple.diskimage.sparsebundle"}</string>
	<key>size</key>
	<integer>${size}</integer>${o.extra ?? ""}
</dict>
</plist>
`;
}

/**
 * The files of a sparse bundle of `disk`, by path within the bundle:
 * `Info.plist`, `Info.bckup`, an empty `token`, and `bands/N` (N in
 * lower-case hexadecimal) for each band stored.
 */
export function writeSparsebundle(
  disk: Uint8Array,
  options: SparsebundleOptions = {},
): Record<string, Uint8Array | null> {
  const bandSize = options.bandSize ?? 8 << 20;
  const plist = new TextEncoder().encode(
    bundlePlist(bandSize, disk.length, options.plist),
  );
  const files: Record<string, Uint8Array | null> = {
    "Info.plist": plist,
    "Info.bckup": plist,
    "token": new Uint8Array(0),
    "bands/": null,
  };
  for (const band of options.bands ?? nonZeroBands(disk, bandSize)) {
    let bytes = disk.slice(band * bandSize, (band + 1) * bandSize);
    if (options.trim) {
      let end = bytes.length;
      while (end > 0 && bytes[end - 1] === 0) end--;
      bytes = bytes.slice(0, end);
    }
    files[`bands/${band.toString(16)}`] = bytes;
    delete files["bands/"];
  }
  return files;
}

/** Writes `files` (paths within a folder; `null` for an empty folder) under `dir`. */
export async function writeFolder(
  dir: string,
  files: Record<string, Uint8Array | null>,
): Promise<void> {
  for (const [path, bytes] of Object.entries(files)) {
    const at = `${dir}/${path}`;
    await Deno.mkdir(at.slice(0, at.lastIndexOf("/")), { recursive: true });
    if (bytes) await Deno.writeFile(at, bytes);
  }
}
