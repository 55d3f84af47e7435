// A dmg of this LZFSE encoder's chunks (FSE or LZVN blocks as asked), for
// the lzfse tests and the codec bench (our dmg writer always picks FSE
// blocks for 1 MiB chunks; 7-Zip reads LZFSE only inside a dmg).
import { encode, type EncodeOptions } from "../drivers/codecs/lzfse.ts";
import { crc32 } from "../drivers/codecs/crc32.ts";
import { KOLY_SIZE, kolyBytes } from "../drivers/dmg/_koly.ts";
import { mishBytes, TYPE } from "../drivers/dmg/_mish.ts";
import { encodeBase64 } from "../drivers/dmg/_plist.ts";
import { pseudoRandom } from "./_helpers.ts";

/**
 * A one-partition UDIF whose chunks are this encoder's ULFO chunks (1 MiB
 * each, a zero chunk for an all-zero MiB), built with the dmg helpers and
 * an XML plist written here.
 */
export async function ulfoImage(
  disk: Uint8Array,
  options: EncodeOptions,
): Promise<Uint8Array> {
  const chunkSectors = 2048;
  const chunks = [];
  const parts: Uint8Array[] = [];
  let offset = 0;
  for (let sector = 0; sector * 512 < disk.length; sector += chunkSectors) {
    const bytes = disk.subarray(sector * 512, (sector + chunkSectors) * 512);
    const sectors = bytes.length / 512;
    if (bytes.every((b) => b === 0)) {
      chunks.push({ type: TYPE.zero, sector, sectors, offset, length: 0 });
      continue;
    }
    const packed = await encode(bytes, options);
    chunks.push({
      type: TYPE.lzfse,
      sector,
      sectors,
      offset,
      length: packed.length,
    });
    parts.push(packed);
    offset += packed.length;
  }
  const dataFork = new Uint8Array(offset);
  let at = 0;
  for (const p of parts) {
    dataFork.set(p, at);
    at += p.length;
  }
  const partitionCrc = crc32(disk);
  const mish = mishBytes({
    firstSector: 0,
    sectorCount: disk.length / 512,
    descriptor: 0,
    crc: partitionCrc,
    chunks,
    largestChunk: chunkSectors,
  });
  const xml = `<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>resource-fork</key>
	<dict>
		<key>blkx</key>
		<array>
			<dict>
				<key>Attributes</key>
				<string>0x0050</string>
				<key>CFName</key>
				<string>disk image (Apple_HFS : 0)</string>
				<key>Data</key>
				<data>
${encodeBase64(mish, "\t\t\t\t")}				</data>
				<key>ID</key>
				<string>0</string>
				<key>Name</key>
				<string>disk image (Apple_HFS : 0)</string>
			</dict>
		</array>
	</dict>
</dict>
</plist>
`;
  const plist = new TextEncoder().encode(xml);
  const crcBytes = new Uint8Array(4);
  new DataView(crcBytes.buffer).setUint32(0, partitionCrc);
  const koly = kolyBytes({
    dataForkLength: dataFork.length,
    xmlOffset: dataFork.length,
    xmlLength: plist.length,
    dataForkCrc: crc32(dataFork),
    masterCrc: crc32(crcBytes),
    sectorCount: disk.length / 512,
    segmentId: pseudoRandom(16, 77),
  });
  const image = new Uint8Array(dataFork.length + plist.length + KOLY_SIZE);
  image.set(dataFork, 0);
  image.set(plist, dataFork.length);
  image.set(koly, dataFork.length + plist.length);
  return image;
}
