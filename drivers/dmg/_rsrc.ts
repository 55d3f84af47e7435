/**
 * Classic Mac OS resource forks, as old UDIF images (before the XML plist)
 * carry their `blkx` block tables: at koly RsrcForkOffset/RsrcForkLength.
 * All numbers big-endian.
 *
 * | offset         | size | field                                            |
 * | -------------- | ---- | ------------------------------------------------ |
 * | 0              | 4    | data offset (256 as hdiutil writes it)           |
 * | 4              | 4    | map offset                                       |
 * | 8              | 4    | data length                                      |
 * | 12             | 4    | map length                                       |
 * | data + o       | 4+n  | one resource: its length n, then its bytes       |
 * | map + 0        | 16   | a copy of the header                             |
 * | map + 16       | 8    | next map handle, file reference (unused)         |
 * | map + 22       | 2    | attributes                                       |
 * | map + 24       | 2    | type list offset, from the map                   |
 * | map + 26       | 2    | name list offset, from the map                   |
 * | types + 0      | 2    | number of types − 1                              |
 * | types + 2 + 8k | 8    | type (4 chars), resources − 1, reference list offset from the type list |
 * | refs + 12j     | 12   | ID, name offset (0xFFFF: none), attributes (1), data offset (3), handle (4) |
 * | names + o      | 1+n  | a Pascal string                                  |
 *
 * This module is browser compatible.
 *
 * @module
 */

import { be16, be32, setBe16, setBe32 } from "../_binary.ts";
import { ImageFormatError } from "../../streams/errors.ts";

/** One resource. */
export interface Resource {
  /** Four-character type (`blkx`, `plst`). */
  type: string;
  id: number;
  /** Its name (Mac Roman read as Latin-1), or "" when it has none. */
  name: string;
  attributes: number;
  /** The resource's bytes (a view into the fork). */
  data: Uint8Array;
}

/**
 * Parses a resource fork, checking every offset against the fork's bytes.
 * `base` is its file offset (for messages).
 */
export function parseResourceFork(
  fork: Uint8Array,
  base: number,
  file?: string,
): Resource[] {
  const fail = (
    field: string,
    value: unknown,
    limit: string,
    at: number,
  ): never => {
    throw new ImageFormatError({
      format: "dmg",
      field: `resource fork ${field}`,
      value,
      limit,
      offset: base + at,
      file,
    });
  };
  const size = fork.length;
  if (size < 16) fail("length", size, "at least 16 bytes (its header)", 0);
  const dataOffset = be32(fork, 0);
  const mapOffset = be32(fork, 4);
  const dataLength = be32(fork, 8);
  const mapLength = be32(fork, 12);
  if (dataOffset < 16 || dataOffset > size || dataLength > size - dataOffset) {
    fail(
      "data offset/length",
      `${dataOffset}+${dataLength}`,
      `within the fork's ${size} bytes, after its 16-byte header`,
      0,
    );
  }
  if (mapOffset > size || mapLength > size - mapOffset || mapLength < 30) {
    fail(
      "map offset/length",
      `${mapOffset}+${mapLength}`,
      `within the fork's ${size} bytes, at least 30 bytes long`,
      4,
    );
  }
  const map = fork.subarray(mapOffset, mapOffset + mapLength);
  const typeList = be16(map, 24);
  const nameList = be16(map, 26);
  if (typeList + 2 > mapLength) {
    fail(
      "type list offset",
      typeList,
      `within the map's ${mapLength} bytes`,
      mapOffset + 24,
    );
  }
  const typeCount = (be16(map, typeList) + 1) & 0xffff;
  if (typeList + 2 + typeCount * 8 > mapLength) {
    fail(
      "type count",
      typeCount,
      `at most ${
        Math.floor((mapLength - typeList - 2) / 8)
      } (the map's ${mapLength} bytes)`,
      mapOffset + typeList,
    );
  }
  const out: Resource[] = [];
  const latin1 = new TextDecoder("latin1");
  for (let t = 0; t < typeCount; t++) {
    const at = typeList + 2 + t * 8;
    const type = String.fromCharCode(...map.subarray(at, at + 4));
    const count = be16(map, at + 4) + 1;
    const refs = typeList + be16(map, at + 6);
    if (refs + count * 12 > mapLength) {
      fail(
        `type ${JSON.stringify(type)} reference list`,
        `${count} entries at ${refs}`,
        `within the map's ${mapLength} bytes`,
        mapOffset + at + 4,
      );
    }
    for (let r = 0; r < count; r++) {
      const ref = refs + r * 12;
      const id = (be16(map, ref) << 16) >> 16;
      const nameAt = be16(map, ref + 2);
      const attributes = map[ref + 4];
      const offset = be32(map, ref + 4) & 0xffffff;
      if (offset + 4 > dataLength) {
        fail(
          `${type} ${id} data offset`,
          offset,
          `within the data's ${dataLength} bytes`,
          mapOffset + ref + 5,
        );
      }
      const length = be32(fork, dataOffset + offset);
      if (length > dataLength - offset - 4) {
        fail(
          `${type} ${id} length`,
          length,
          `at most ${dataLength - offset - 4} (the rest of the resource data)`,
          dataOffset + offset,
        );
      }
      let name = "";
      if (nameAt !== 0xffff) {
        const p = nameList + nameAt;
        if (p >= mapLength || p + 1 + map[p] > mapLength) {
          fail(
            `${type} ${id} name offset`,
            nameAt,
            `within the map's ${mapLength} bytes`,
            mapOffset + ref + 2,
          );
        }
        name = latin1.decode(map.subarray(p + 1, p + 1 + map[p]));
      }
      const start = dataOffset + offset + 4;
      out.push({
        type,
        id,
        name,
        attributes,
        data: fork.subarray(start, start + length),
      });
    }
  }
  return out;
}

/**
 * Builds a resource fork holding `resources` (all of one or more types),
 * as hdiutil laid them out: data at 256, then the map.
 */
export function resourceForkBytes(resources: Resource[]): Uint8Array {
  const types = [...new Set(resources.map((r) => r.type))];
  const dataOffset = 256;
  let dataLength = 0;
  for (const r of resources) dataLength += 4 + r.data.length;
  const names = resources.map((r) =>
    r.name
      ? Uint8Array.from(r.name.slice(0, 255), (c) => c.charCodeAt(0) & 0xff)
      : undefined
  );
  let namesLength = 0;
  for (const n of names) if (n) namesLength += 1 + n.length;
  const typeListAt = 28;
  const refsAt = typeListAt + 2 + types.length * 8;
  const nameListAt = refsAt + resources.length * 12;
  const mapLength = nameListAt + namesLength;
  const mapOffset = dataOffset + dataLength;
  const fork = new Uint8Array(mapOffset + mapLength);
  const header = (b: Uint8Array, at: number) => {
    setBe32(b, at, dataOffset);
    setBe32(b, at + 4, mapOffset);
    setBe32(b, at + 8, dataLength);
    setBe32(b, at + 12, mapLength);
  };
  header(fork, 0);
  const map = fork.subarray(mapOffset);
  header(map, 0);
  setBe16(map, 24, typeListAt);
  setBe16(map, 26, nameListAt);
  setBe16(map, typeListAt, (types.length - 1) & 0xffff);
  let data = 0;
  let name = 0;
  let ref = refsAt;
  types.forEach((type, t) => {
    const ofType = resources.map((r, i) => [r, i] as const).filter(([r]) =>
      r.type === type
    );
    const at = typeListAt + 2 + t * 8;
    for (let c = 0; c < 4; c++) map[at + c] = type.charCodeAt(c) & 0xff;
    setBe16(map, at + 4, ofType.length - 1);
    setBe16(map, at + 6, ref - typeListAt);
    for (const [r, i] of ofType) {
      setBe16(map, ref, r.id & 0xffff);
      const n = names[i];
      if (n) {
        setBe16(map, ref + 2, name);
        map[nameListAt + name] = n.length;
        map.set(n, nameListAt + name + 1);
        name += 1 + n.length;
      } else {
        setBe16(map, ref + 2, 0xffff);
      }
      setBe32(map, ref + 4, data);
      map[ref + 4] = r.attributes;
      setBe32(fork, dataOffset + data, r.data.length);
      fork.set(r.data, dataOffset + data + 4);
      data += 4 + r.data.length;
      ref += 12;
    }
  });
  return fork;
}
