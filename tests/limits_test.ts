// Hard limits: a header that declares a 1 TiB (or 4G-entry) table or chunk
// is refused before anything of that size is allocated. Each case runs in
// its own process and reports its peak resident memory, which must stay
// far below what the declared size would need.
import { assertEquals, assertTrue } from "./_asserts.ts";
import { ROOT, run, withTemp } from "./_helpers.ts";
import { convert, create, fromBytes, memorySink, open } from "../mod.ts";

/** Peak memory a refused image may cost the whole process (Deno itself is ~60 MiB). */
const CEILING = 256 << 20;
const TiB = 2 ** 40;

interface Case {
  name: string;
  format: string;
  bytes: () => Promise<Uint8Array>;
  /** What the error message must name. */
  field: RegExp;
}

/** A small disk with data, zeros and a tail. */
function disk(size = 4 << 20): Uint8Array {
  const b = new Uint8Array(size);
  for (let i = 0; i < size; i += 7) b[i] = (i * 13) & 0xff;
  b.fill(0, size / 4, size / 2);
  return b;
}

/** The disk written as `format` by our own writer. */
async function written(
  format: string,
  options: Record<string, string> = {},
): Promise<Uint8Array> {
  const sink = memorySink();
  await convert(await open(fromBytes(disk())), sink, { format, options });
  return sink.bytes().slice();
}

/** An empty image of `format` made by `create`. */
async function created(
  format: string,
  size = 64 << 20,
  backingFile?: string,
): Promise<Uint8Array> {
  const sink = memorySink();
  const image = await create(format, sink, { size, backingFile });
  await image.flush?.();
  await sink.flush();
  return sink.bytes().slice();
}

const dv = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.length);

/** The VHD checksum: ones' complement of the byte sum, the field read as 0. */
function vhdChecksum(b: Uint8Array, start: number, length: number, at: number) {
  dv(b).setUint32(at, 0);
  let sum = 0;
  for (let i = start; i < start + length; i++) sum += b[i];
  dv(b).setUint32(at, ~sum >>> 0);
}

/**
 * Rewrites the first `mish` table of a dmg's XML plist in place: decodes
 * its base64, lets `poke` change it, and writes it back padded with
 * whitespace to the same length, so every offset stays valid.
 */
function pokeMish(
  dmg: Uint8Array,
  poke: (mish: Uint8Array) => void,
): Promise<Uint8Array> {
  const text = new TextDecoder("latin1").decode(dmg);
  const start = text.indexOf("<data>", text.indexOf("<key>blkx</key>")) + 6;
  const end = text.indexOf("</data>", start);
  const mish = Uint8Array.from(
    atob(text.slice(start, end).replace(/\s+/g, "")),
    (c) => c.charCodeAt(0),
  );
  poke(mish);
  const encoded = btoa(String.fromCharCode(...mish));
  if (encoded.length > end - start) throw new Error("no room for the table");
  const out = dmg.slice();
  out.set(
    new TextEncoder().encode(encoded.padEnd(end - start, "\n")),
    start,
  );
  return Promise.resolve(out);
}

const CASES: Case[] = [
  {
    name: "dmg chunk with a 1 TiB compressed length",
    format: "dmg",
    field: /chunk|CompressedLength|length|file/i,
    async bytes() {
      // The first chunk entry of the first mish table: 204 + 32 is its
      // CompressedLength.
      return await pokeMish(await written("dmg"), (mish) => {
        dv(mish).setBigUint64(204 + 32, BigInt(TiB));
      });
    },
  },
  {
    name: "dmg chunk of 2^31 sectors (1 TiB decoded)",
    format: "dmg",
    field: /chunk|sector|SectorCount/i,
    async bytes() {
      return await pokeMish(await written("dmg"), (mish) => {
        dv(mish).setBigUint64(204 + 16, 1n << 31n);
      });
    },
  },
  {
    name: "qcow size of 2^60 bytes (an L1 table of 2^45 entries)",
    format: "qcow",
    field: /size|l1/i,
    async bytes() {
      const b = await created("qcow");
      dv(b).setBigUint64(24, 1n << 60n);
      return b;
    },
  },
  {
    name: "qcow size of 1 TiB with an L1 table the file cannot hold",
    format: "qcow",
    field: /l1|table|size|outside|file/i,
    async bytes() {
      const b = await created("qcow");
      dv(b).setBigUint64(24, BigInt(TiB));
      return b;
    },
  },
  {
    name: "cow size of 1 TiB (a 256 MiB bitmap) in a file of a few KiB",
    format: "cow",
    field: /size|bitmap/i,
    async bytes() {
      const b = await created("cow", 64 << 20, "base.raw");
      dv(b).setBigUint64(12, BigInt(TiB));
      return b;
    },
  },
  {
    name: "cloop n_blocks of 2^31 (a 16 GiB offsets table)",
    format: "cloop",
    field: /n_blocks/,
    async bytes() {
      const b = await written("cloop");
      dv(b).setUint32(132, 0x7fffffff);
      return b;
    },
  },
  {
    name: "cloop block_size of 4 GiB - 512",
    format: "cloop",
    field: /block_size/,
    async bytes() {
      const b = await written("cloop");
      dv(b).setUint32(128, 0xfffffe00);
      return b;
    },
  },
  {
    name: "vpc max_table_entries of 4G (a 16 GiB block table)",
    format: "vpc",
    field: /max_table_entries|table/,
    async bytes() {
      const b = await created("vpc");
      // The dynamic header follows the footer copy at 0.
      dv(b).setUint32(512 + 28, 0xffffffff);
      vhdChecksum(b, 512, 1024, 512 + 36);
      return b;
    },
  },
  {
    name: "vpc current_size of 1 TiB in a file of a few KiB",
    format: "vpc",
    field: /size|max_table_entries/,
    async bytes() {
      const b = await created("vpc");
      for (const at of [0, b.length - 512]) {
        // A Hyper-V creator: the size comes from current_size, not CHS.
        b.set(new TextEncoder().encode("win "), at + 28);
        dv(b).setBigUint64(at + 48, BigInt(TiB));
        dv(b).setBigUint64(at + 40, BigInt(TiB));
        vhdChecksum(b, at, 512, at + 64);
      }
      return b;
    },
  },
  {
    name: "vmdk capacity of 1 TiB sectors (a grain directory of 2^32 tables)",
    format: "vmdk",
    field: /capacity|grain directory|L1|size/i,
    async bytes() {
      const b = await created("vmdk");
      dv(b).setBigUint64(12, BigInt(TiB), true);
      return b;
    },
  },
  {
    name: "vmdk numGTEsPerGT of 2^31",
    format: "vmdk",
    field: /numGTEsPerGT|grain table/i,
    async bytes() {
      const b = await created("vmdk");
      dv(b).setUint32(44, 0x80000000, true);
      return b;
    },
  },
  {
    name: "bochs catalog of 2^31 entries",
    format: "bochs",
    field: /catalog/,
    bytes() {
      const b = new Uint8Array(512 + 4 * 16);
      b.set(new TextEncoder().encode("Bochs Virtual HD Image"), 0);
      b.set(new TextEncoder().encode("Redolog"), 32);
      b.set(new TextEncoder().encode("Growing"), 48);
      const v = dv(b);
      v.setUint32(64, 0x00020000, true);
      v.setUint32(68, 512, true);
      v.setUint32(72, 0x80000000, true);
      v.setUint32(76, 512, true);
      v.setUint32(80, 0x8000, true);
      v.setBigUint64(88, BigInt(TiB), true);
      return Promise.resolve(b);
    },
  },
  {
    name: "bochs extent of 4 GiB - 512",
    format: "bochs",
    field: /extent/,
    bytes() {
      const b = new Uint8Array(512 + 4 * 16);
      b.set(new TextEncoder().encode("Bochs Virtual HD Image"), 0);
      b.set(new TextEncoder().encode("Redolog"), 32);
      b.set(new TextEncoder().encode("Growing"), 48);
      const v = dv(b);
      v.setUint32(64, 0x00020000, true);
      v.setUint32(68, 512, true);
      v.setUint32(72, 16, true);
      v.setUint32(76, 512, true);
      v.setUint32(80, 0xfffffe00, true);
      v.setBigUint64(88, BigInt(16 * 0x8000), true);
      return Promise.resolve(b);
    },
  },
];

for (const c of CASES) {
  Deno.test(`a ${c.format} image declaring ${c.name} is refused before allocating`, async () => {
    await withTemp(async (dir) => {
      const path = `${dir}/case.img`;
      await Deno.writeFile(path, await c.bytes());
      const r = await run(Deno.execPath(), [
        "run",
        "-A",
        `${ROOT}tests/_limit_case.ts`,
        path,
        c.format,
      ]);
      const result = JSON.parse(r.text.trim().split("\n").pop()!) as {
        outcome: string;
        error: string;
        hwm: number;
      };
      assertEquals(result.outcome, "typed", result.error);
      assertTrue(c.field.test(result.error), result.error);
      assertTrue(
        result.hwm < CEILING,
        `peak memory ${result.hwm} over ${CEILING}: ${result.error}`,
      );
    });
  });
}
