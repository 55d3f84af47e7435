// A writer of segmented UDIF images (as `hdiutil segment` makes them), for
// the tests only: it cuts the data fork of a flat UDIF file at the given
// places and gives every piece its own koly trailer, from the UDIF trailer
// description (libyal's libmodi notes: RunningDataForkOffset at 16,
// DataForkOffset/Length at 24/32, SegmentNumber/Count at 56/60, SegmentID
// at 64, the data checksum at 80, XMLOffset/Length at 216/224). The first
// segment keeps the XML plist. Cuts need not fall between chunks.

const KOLY = 512;

/** One file of the set. */
export interface SegmentFile {
  /** `NAME.dmg` (or `NAME.001.dmg`), then `NAME.002.dmgpart`, ... */
  name: string;
  bytes: Uint8Array<ArrayBuffer>;
}

/** CRC-32 (IEEE), for each segment's data checksum. */
function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of bytes) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = (c >>> 1) ^ (0xedb88320 & -(c & 1));
  }
  return (c ^ 0xffffffff) >>> 0;
}

/**
 * Splits the flat UDIF `udif` into segments: `cuts` are offsets in its
 * data fork where a new segment begins. `stem` names the files;
 * `numberedFirst` names the first `STEM.001.dmg` instead of `STEM.dmg`.
 */
export function segmentDmg(
  udif: Uint8Array,
  cuts: number[],
  stem = "disk",
  numberedFirst = false,
  segmentId = crypto.getRandomValues(new Uint8Array(16)),
): SegmentFile[] {
  const view = new DataView(udif.buffer, udif.byteOffset, udif.byteLength);
  const at = udif.length - KOLY;
  const forkOffset = Number(view.getBigUint64(at + 24));
  const forkLength = Number(view.getBigUint64(at + 32));
  const xmlOffset = Number(view.getBigUint64(at + 216));
  const xmlLength = Number(view.getBigUint64(at + 224));
  const xml = udif.subarray(xmlOffset, xmlOffset + xmlLength);
  const fork = udif.subarray(forkOffset, forkOffset + forkLength);
  const bounds = [0, ...cuts, forkLength];
  const count = bounds.length - 1;
  return Array.from({ length: count }, (_, i) => {
    const piece = fork.subarray(bounds[i], bounds[i + 1]);
    const withXml = i === 0;
    const bytes = new Uint8Array(
      piece.length + (withXml ? xml.length : 0) + KOLY,
    );
    bytes.set(piece, 0);
    if (withXml) bytes.set(xml, piece.length);
    const koly = bytes.subarray(bytes.length - KOLY);
    koly.set(udif.subarray(at, at + KOLY)); // magic, version, checksums, SectorCount
    const k = new DataView(koly.buffer, koly.byteOffset, KOLY);
    k.setBigUint64(16, BigInt(bounds[i])); // RunningDataForkOffset
    k.setBigUint64(24, 0n); // DataForkOffset
    k.setBigUint64(32, BigInt(piece.length)); // DataForkLength
    k.setBigUint64(40, 0n); // RsrcForkOffset
    k.setBigUint64(48, 0n); // RsrcForkLength
    k.setUint32(56, i + 1); // SegmentNumber
    k.setUint32(60, count); // SegmentCount
    koly.set(segmentId, 64);
    k.setUint32(80, 2); // CRC-32 of this segment's data fork
    k.setUint32(84, 32);
    koly.fill(0, 88, 216);
    k.setUint32(88, crc32(piece));
    k.setBigUint64(216, withXml ? BigInt(piece.length) : 0n); // XMLOffset
    k.setBigUint64(224, withXml ? BigInt(xml.length) : 0n); // XMLLength
    const name = i === 0
      ? `${stem}${numberedFirst ? ".001" : ""}.dmg`
      : `${stem}.${String(i + 1).padStart(3, "0")}.dmgpart`;
    return { name, bytes };
  });
}
