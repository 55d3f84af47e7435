// The NBD export (issue 18): streams/nbd.ts spoken to in-process by a
// small client written here from the spec (NetworkBlockDevice/nbd
// doc/proto.md), and `cli.ts serve --nbd` as a subprocess read by QEMU's
// own NBD client (qemu-img convert / map, qemu-io), whose bytes are
// compared with our own convert.
import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  cli,
  countingSource,
  pseudoRandom,
  ROOT,
  run,
  sha256File,
  skip,
  withTemp,
} from "./_helpers.ts";
import { encryptDmg } from "./_encrypted_dmg_writer.ts";
import { writeFolder, writeSparsebundle } from "./_apple_writers.ts";
import {
  type Extent,
  extentsOf,
  fromBytes,
  fromFile,
  type Image,
  type NbdServer,
  nbdServer,
  open,
  snapshot,
} from "../mod.ts";

// ---------------------------------------------------------------------------
// A client of the protocol, over any pair of byte streams (a Deno.Conn too)

const IHAVEOPT = 0x49484156454f5054n;
const REP_ACK = 1;
const REP_SERVER = 2;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const REP_ERR_UNSUP = 0x80000001;
const REP_ERR_INVALID = 0x80000003;
const REP_ERR_UNKNOWN = 0x80000006;
const REP_ERR_TOO_BIG = 0x80000009;
const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
};
const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
};
const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const WAIT = 20000;

/** Rejects when `promise` takes over `ms`: no test waits forever. */
function within<T>(promise: Promise<T>, ms = WAIT, what = "reply") {
  const where = new Error().stack;
  let timer: ReturnType<typeof setTimeout> | undefined;
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            new Error(
              `no ${what} within ${ms} ms ${
                Deno.env.get("NBD_DEBUG") ? where : ""
              }`,
            ),
          ),
        ms,
      );
    }),
  ]).finally(() => clearTimeout(timer));
}

function be(fields: [1 | 2 | 4 | 8, number | bigint][]): Uint8Array {
  const out = new Uint8Array(fields.reduce((s, [w]) => s + w, 0));
  const v = new DataView(out.buffer);
  let at = 0;
  for (const [w, x] of fields) {
    if (w === 8) v.setBigUint64(at, BigInt(x));
    else if (w === 4) v.setUint32(at, Number(x));
    else if (w === 2) v.setUint16(at, Number(x));
    else v.setUint8(at, Number(x));
    at += w;
  }
  return out;
}

const cat = (...parts: Uint8Array[]) => {
  const out = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let at = 0;
  for (const p of parts) (out.set(p, at), at += p.length);
  return out;
};
const utf8 = (s: string) => new TextEncoder().encode(s);
const dv = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.length);

class Client {
  #reader: ReadableStreamDefaultReader<Uint8Array>;
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  #chunk: Uint8Array = new Uint8Array(0);
  #at = 0;
  handle = 0;

  constructor(
    conn: {
      readable: ReadableStream<Uint8Array>;
      writable: WritableStream<Uint8Array>;
    },
    readonly done?: () => void,
  ) {
    this.#reader = conn.readable.getReader();
    this.#writer = conn.writable.getWriter();
  }

  static async tcp(port: number): Promise<Client> {
    const conn = await within(
      Deno.connect({ hostname: "127.0.0.1", port }),
      WAIT,
      "connection",
    );
    return new Client(conn, () => {
      try {
        conn.close();
      } catch { /* closed */ }
    });
  }

  /** `n` bytes, or undefined when the server closed the connection first. */
  async exactOrEnd(n: number): Promise<Uint8Array | undefined> {
    const out = new Uint8Array(n);
    let filled = 0;
    while (filled < n) {
      if (this.#at === this.#chunk.length) {
        let r: ReadableStreamReadResult<Uint8Array>;
        try {
          r = await within(this.#reader.read());
        } catch (e) {
          if ((e as Error).message.startsWith("no reply")) throw e;
          return undefined; // reset by the server
        }
        if (r.done) return undefined;
        this.#chunk = r.value;
        this.#at = 0;
      }
      const k = Math.min(n - filled, this.#chunk.length - this.#at);
      out.set(this.#chunk.subarray(this.#at, this.#at + k), filled);
      this.#at += k;
      filled += k;
    }
    return out;
  }

  async exact(n: number): Promise<Uint8Array> {
    const got = await this.exactOrEnd(n);
    if (!got) throw new Error("the server closed the connection");
    return got;
  }

  /** True when the server ends the connection (nothing more comes). */
  async closed(): Promise<boolean> {
    return (await this.exactOrEnd(1)) === undefined;
  }

  async send(bytes: Uint8Array) {
    await within(this.#writer.write(bytes), WAIT, "write");
  }

  /** Reads the greeting and answers with `flags` (FIXED_NEWSTYLE | NO_ZEROES by default). */
  async hello(flags = 3): Promise<number> {
    const g = await this.exact(18);
    assertEquals(dv(g).getBigUint64(0), 0x4e42444d41474943n);
    assertEquals(dv(g).getBigUint64(8), IHAVEOPT);
    await this.send(be([[4, flags]]));
    return dv(g).getUint16(16);
  }

  async option(option: number, data: Uint8Array = new Uint8Array(0)) {
    await this.send(
      cat(be([[8, IHAVEOPT], [4, option], [4, data.length]]), data),
    );
  }

  async reply(): Promise<{ option: number; type: number; data: Uint8Array }> {
    const h = await this.exact(20);
    assertEquals(dv(h).getBigUint64(0), 0x3e889045565a9n);
    const length = dv(h).getUint32(16);
    assertTrue(length < 1 << 20, `option reply of ${length} bytes`);
    return {
      option: dv(h).getUint32(8),
      type: dv(h).getUint32(12),
      data: await this.exact(length),
    };
  }

  /** Replies up to and including the final one (an ACK or an error). */
  async replies(option: number, data?: Uint8Array) {
    await this.option(option, data);
    const out = [];
    for (;;) {
      const r = await this.reply();
      assertEquals(r.option, option);
      out.push(r);
      if (r.type === REP_ACK || r.type >= 0x80000000) return out;
    }
  }

  /** STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, GO: into transmission. */
  async go(
    { structured = true, meta = true, name = "" } = {},
  ): Promise<{ size: number; flags: number }> {
    if (structured) {
      const [ack] = await this.replies(OPT.STRUCTURED_REPLY);
      assertEquals(ack.type, REP_ACK);
    }
    if (meta) {
      const q = utf8("base:allocation");
      const got = await this.replies(
        OPT.SET_META_CONTEXT,
        cat(be([[4, 0], [4, 1], [4, q.length]]), q),
      );
      assertEquals(got.map((r) => r.type), [REP_META_CONTEXT, REP_ACK]);
    }
    const n = utf8(name);
    const got = await this.replies(
      OPT.GO,
      cat(be([[4, n.length]]), n, be([[2, 1], [2, 3]])),
    );
    assertEquals(got[got.length - 1].type, REP_ACK);
    const info = got.find((r) => dv(r.data).getUint16(0) === 0)!;
    return {
      size: Number(dv(info.data).getBigUint64(2)),
      flags: dv(info.data).getUint16(10),
    };
  }

  async request(
    type: number,
    offset: number,
    length: number,
    { flags = 0, payload }: { flags?: number; payload?: Uint8Array } = {},
  ): Promise<bigint> {
    const handle = BigInt(++this.handle);
    await this.send(cat(
      be([[4, 0x25609513], [2, flags], [2, type], [8, handle], [8, offset], [
        4,
        length,
      ]]),
      payload ?? new Uint8Array(0),
    ));
    return handle;
  }

  /** A simple reply: its error, and `length` bytes of data when it has none. */
  async simple(handle: bigint, length = 0) {
    const h = await this.exact(16);
    assertEquals(dv(h).getUint32(0), 0x67446698);
    assertEquals(dv(h).getBigUint64(8), handle);
    const error = dv(h).getUint32(4);
    return { error, data: error === 0 ? await this.exact(length) : undefined };
  }

  /** Structured chunks of one reply, until the DONE one. */
  async chunks(handle: bigint) {
    const out = [];
    for (;;) {
      const first = await this.exact(16);
      const magic = dv(first).getUint32(0);
      if (magic === 0x67446698) {
        // A simple reply (allowed for errors and commands without data).
        assertEquals(dv(first).getBigUint64(8), handle);
        return [{ flags: 1, type: -1, payload: first.subarray(4, 8) }];
      }
      const h = cat(first, await this.exact(4));
      assertEquals(magic, 0x668e33ef);
      assertEquals(dv(h).getBigUint64(8), handle);
      const chunk = {
        flags: dv(h).getUint16(4),
        type: dv(h).getUint16(6),
        payload: await this.exact(dv(h).getUint32(16)),
      };
      out.push(chunk);
      if (chunk.flags & 1) return out;
    }
  }

  /** A structured READ put together; throws with the error chunk's errno. */
  async read(offset: number, length: number) {
    const handle = await this.request(CMD.READ, offset, length);
    const out = new Uint8Array(length);
    let holes = 0;
    for (const c of await this.chunks(handle)) {
      const v = dv(c.payload);
      if (c.type === 1) {
        out.set(c.payload.subarray(8), Number(v.getBigUint64(0)) - offset);
      } else if (c.type === 2) holes += v.getUint32(8);
      else if (c.type >= 0x8000) {
        throw new Error(`errno ${v.getUint32(0)}`);
      }
    }
    return { bytes: out, holes };
  }

  /** The error number of a structured error reply (0 when it succeeded). */
  async errorOf(handle: bigint): Promise<number> {
    const chunks = await this.chunks(handle);
    const last = chunks[chunks.length - 1];
    if (last.type === -1) return dv(last.payload).getUint32(0);
    return last.type >= 0x8000 ? dv(last.payload).getUint32(0) : 0;
  }

  close() {
    this.#writer.close().catch(() => {});
    this.#reader.cancel().catch(() => {});
    this.done?.();
  }
}

/** A client connected in-process to `server`; `served` settles when the server is done with it. */
function connect(server: NbdServer) {
  const up = new TransformStream<Uint8Array, Uint8Array>();
  const down = new TransformStream<Uint8Array, Uint8Array>();
  const served = server.serve({
    readable: up.readable,
    writable: down.writable,
  });
  return {
    client: new Client({ readable: down.readable, writable: up.writable }),
    served,
  };
}

/** 1 MiB of data, 2 MiB of zeros, 512 KiB of data, 512 KiB of zeros. */
const DISK = cat(
  pseudoRandom(1 << 20, 3),
  new Uint8Array(2 << 20),
  pseudoRandom(512 << 10, 4),
  new Uint8Array(512 << 10),
);

/** An image over DISK whose map says where its zero runs are. */
function mappedImage(bytes = DISK): Image & { reads: () => number } {
  const counted = countingSource(bytes);
  const runs: Extent[] = [
    { offset: 0, length: 1 << 20, kind: "data" },
    { offset: 1 << 20, length: 2 << 20, kind: "zero" },
    { offset: 3 << 20, length: 512 << 10, kind: "data" },
    { offset: 3.5 * (1 << 20), length: 512 << 10, kind: "unallocated" },
  ];
  return {
    format: "test",
    size: bytes.length,
    encrypted: false,
    read: (o, l) => counted.source.read(o, l),
    async *extents(offset, length) {
      for (const r of runs) {
        const start = Math.max(offset, r.offset);
        const end = Math.min(offset + length, r.offset + r.length);
        if (start < end) yield { ...r, offset: start, length: end - start };
      }
    },
    reads: counted.reads,
  };
}

// ---------------------------------------------------------------------------
// The protocol, in-process

Deno.test("GO with structured replies: reads come as data and hole chunks, block status marks the holes", async () => {
  const image = mappedImage();
  const server = nbdServer(image, { name: "disk" });
  const { client, served } = connect(server);
  assertEquals(await client.hello(), 3);
  const { size, flags } = await client.go({ name: "disk" });
  assertEquals(size, DISK.length);
  assertEquals(flags & 0b11, 0b11, "HAS_FLAGS and READ_ONLY");
  const whole = await client.read(0, DISK.length);
  assertEquals(whole.bytes, DISK);
  assertEquals(whole.holes, 2.5 * (1 << 20));
  const part = await client.read(1000, 1 << 20);
  assertEquals(part.bytes, DISK.subarray(1000, 1000 + (1 << 20)));
  // Block status: every run, then REQ_ONE's single descriptor.
  const all = await client.chunks(
    await client.request(CMD.BLOCK_STATUS, 0, DISK.length),
  );
  const d = dv(all[0].payload);
  assertEquals(d.getUint32(0), 1);
  const descriptors = [];
  for (let at = 4; at < all[0].payload.length; at += 8) {
    descriptors.push([d.getUint32(at), d.getUint32(at + 4)]);
  }
  assertEquals(descriptors, [
    [1 << 20, 0],
    [2 << 20, 3],
    [512 << 10, 0],
    [512 << 10, 3],
  ]);
  const one = await client.chunks(
    await client.request(CMD.BLOCK_STATUS, 1 << 20, 3 << 20, { flags: 8 }),
  );
  assertEquals(one[0].payload.length, 12);
  assertEquals(dv(one[0].payload).getUint32(4), 2 << 20);
  assertEquals(dv(one[0].payload).getUint32(8), 3);
  await client.request(CMD.DISC, 0, 0);
  await within(served);
  assertEquals(server.clients, 0);
  client.close();
});

Deno.test("without structured replies reads are simple replies; EXPORT_NAME sends the 124 zero bytes unless NO_ZEROES", async () => {
  for (const noZeroes of [false, true]) {
    const server = nbdServer(mappedImage());
    const { client, served } = connect(server);
    await client.hello(noZeroes ? 3 : 1);
    await client.option(OPT.EXPORT_NAME);
    const answer = await client.exact(10 + (noZeroes ? 0 : 124));
    assertEquals(Number(dv(answer).getBigUint64(0)), DISK.length);
    const handle = await client.request(CMD.READ, 4096, 65536);
    const { error, data } = await client.simple(handle, 65536);
    assertEquals(error, 0);
    assertEquals(data, DISK.subarray(4096, 4096 + 65536));
    // Block status without a context: EINVAL.
    const bs = await client.request(CMD.BLOCK_STATUS, 0, 4096);
    assertEquals((await client.simple(bs)).error, EINVAL);
    await client.request(CMD.DISC, 0, 0);
    await within(served);
    client.close();
  }
});

Deno.test("LIST, INFO, LIST_META_CONTEXT and the options refused by name", async () => {
  const server = nbdServer(mappedImage(), {
    name: "disk.dmg",
    description: "a test disk",
  });
  const { client, served } = connect(server);
  await client.hello();
  const list = await client.replies(OPT.LIST);
  assertEquals(list.map((r) => r.type), [REP_SERVER, REP_ACK]);
  assertEquals(new TextDecoder().decode(list[0].data.subarray(4)), "disk.dmg");
  assertEquals(
    (await client.replies(OPT.LIST, utf8("x")))[0].type,
    REP_ERR_INVALID,
  );
  const name = utf8("disk.dmg");
  const info = await client.replies(
    OPT.INFO,
    cat(be([[4, name.length]]), name, be([[2, 3], [2, 1], [2, 2], [2, 3]])),
  );
  assertEquals(info[info.length - 1].type, REP_ACK);
  const kinds = info.filter((r) => r.type === REP_INFO).map((r) =>
    dv(r.data).getUint16(0)
  ).sort();
  assertEquals(kinds, [0, 1, 2, 3]);
  const blockSize = info.find((r) =>
    r.type === REP_INFO && dv(r.data).getUint16(0) === 3
  )!;
  assertEquals(dv(blockSize.data).getUint32(10), 32 << 20);
  const other = utf8("nope");
  const unknown = await client.replies(
    OPT.GO,
    cat(be([[4, other.length]]), other, be([[2, 0]])),
  );
  assertEquals(unknown.map((r) => r.type), [REP_ERR_UNKNOWN]);
  // A name length past the data: invalid, and the session goes on.
  const overrun = await client.replies(OPT.GO, be([[4, 100], [2, 0]]));
  assertEquals(overrun.map((r) => r.type), [REP_ERR_INVALID]);
  assertEquals((await client.replies(OPT.STARTTLS))[0].type, REP_ERR_UNSUP);
  assertEquals((await client.replies(99, utf8("junk")))[0].type, REP_ERR_UNSUP);
  // Metadata contexts need structured replies first.
  const q = utf8("base:allocation");
  const early = await client.replies(
    OPT.SET_META_CONTEXT,
    cat(be([[4, 0], [4, 1], [4, q.length]]), q),
  );
  assertEquals(early.map((r) => r.type), [REP_ERR_INVALID]);
  await client.replies(OPT.STRUCTURED_REPLY);
  const listed = await client.replies(
    OPT.LIST_META_CONTEXT,
    cat(be([[4, 0], [4, 1], [4, 5]]), utf8("base:")),
  );
  assertEquals(listed.map((r) => r.type), [REP_META_CONTEXT, REP_ACK]);
  assertEquals(
    new TextDecoder().decode(listed[0].data.subarray(4)),
    "base:allocation",
  );
  const abort = await client.replies(OPT.ABORT);
  assertEquals(abort.map((r) => r.type), [REP_ACK]);
  await within(served);
  assertTrue(await client.closed());
  client.close();
});

Deno.test("a read-only export refuses writes with EPERM, reads past the end and over 32 MiB with EINVAL, reading nothing", async () => {
  const image = mappedImage();
  const server = nbdServer(image);
  const { client, served } = connect(server);
  await client.hello();
  await client.go();
  const w = await client.request(CMD.WRITE, 0, 4096, {
    payload: new Uint8Array(4096).fill(9),
  });
  assertEquals(await client.errorOf(w), EPERM);
  for (const type of [CMD.TRIM, CMD.WRITE_ZEROES]) {
    assertEquals(
      await client.errorOf(await client.request(type, 0, 4096)),
      EPERM,
    );
  }
  const before = image.reads();
  const past = await client.request(CMD.READ, DISK.length - 512, 1024);
  assertEquals(await client.errorOf(past), EINVAL);
  const huge = await client.request(CMD.READ, 0, 0x7fffffff);
  assertEquals(await client.errorOf(huge), EINVAL);
  const far = await client.request(CMD.READ, 2 ** 62, 512);
  assertEquals(await client.errorOf(far), EINVAL);
  const bsPast = await client.request(CMD.BLOCK_STATUS, DISK.length, 512);
  assertEquals(await client.errorOf(bsPast), EINVAL);
  assertEquals(await client.errorOf(await client.request(42, 0, 0)), EINVAL);
  assertEquals(
    await client.errorOf(await client.request(CMD.READ, 0, 512, { flags: 4 })),
    EINVAL,
    "DF is not offered",
  );
  assertEquals(image.reads(), before, "refused requests read nothing");
  // The session still works, and the image was never written.
  assertEquals((await client.read(0, 4096)).bytes, DISK.subarray(0, 4096));
  await client.request(CMD.DISC, 0, 0);
  await within(served);
  client.close();
});

Deno.test("a writable export over a snapshot takes WRITE, WRITE_ZEROES, TRIM and FLUSH; the image underneath stays as it was", async () => {
  const bytes = DISK.slice();
  const view = snapshot(await open(fromBytes(bytes)));
  const server = nbdServer(view, { writable: true });
  const { client, served } = connect(server);
  await client.hello();
  const { flags } = await client.go();
  assertEquals(flags & 2, 0, "not READ_ONLY");
  assertEquals(flags & (4 | 8 | 32 | 64), 4 | 8 | 32 | 64);
  const w = await client.request(CMD.WRITE, 1000, 5000, {
    flags: 1,
    payload: new Uint8Array(5000).fill(7),
  });
  assertEquals(await client.errorOf(w), 0);
  const z = await client.request(CMD.WRITE_ZEROES, 0, 512);
  assertEquals(await client.errorOf(z), 0);
  assertEquals(await client.errorOf(await client.request(CMD.TRIM, 0, 512)), 0);
  assertEquals(await client.errorOf(await client.request(CMD.FLUSH, 0, 0)), 0);
  const expected = DISK.slice(0, 8192);
  expected.fill(7, 1000, 6000);
  expected.fill(0, 0, 512);
  assertEquals((await client.read(0, 8192)).bytes, expected);
  const past = await client.request(CMD.WRITE, DISK.length - 512, 1024, {
    payload: new Uint8Array(1024),
  });
  assertEquals(await client.errorOf(past), ENOSPC);
  await client.request(CMD.DISC, 0, 0);
  await within(served);
  assertEquals(bytes, DISK, "the image underneath is untouched");
  client.close();
});

Deno.test("malformed clients are disconnected, never answered with big allocations, and the next client is served", async () => {
  const image = mappedImage();
  const server = nbdServer(image);
  const attacks: [string, (c: Client) => Promise<void>][] = [
    ["bad client flags", async (c) => {
      await c.exact(18);
      await c.send(be([[4, 0xff]]));
    }],
    ["bad option magic", async (c) => {
      await c.hello();
      await c.send(be([[8, 0x1234n], [4, OPT.LIST], [4, 0]]));
    }],
    ["an option claiming 4 GiB of data", async (c) => {
      await c.hello();
      await c.send(be([[8, IHAVEOPT], [4, OPT.GO], [4, 0xffffffff]]));
      assertEquals((await c.reply()).type, REP_ERR_TOO_BIG);
    }],
    ["bad request magic", async (c) => {
      await c.hello();
      await c.go();
      await c.send(new Uint8Array(28).fill(0xee));
    }],
    ["a WRITE of 0x7fffffff bytes", async (c) => {
      await c.hello();
      await c.go();
      await c.request(CMD.WRITE, 0, 0x7fffffff);
    }],
  ];
  for (const [what, attack] of attacks) {
    const { client, served } = connect(server);
    await attack(client);
    assertTrue(await client.closed(), `${what}: the connection ends`);
    await within(served, WAIT, `the end of the session (${what})`);
    client.close();
  }
  assertEquals(image.reads(), 0);
  const { client, served } = connect(server);
  await client.hello();
  await client.go();
  assertEquals((await client.read(0, 4096)).bytes, DISK.subarray(0, 4096));
  await client.request(CMD.DISC, 0, 0);
  await within(served);
  client.close();
});

Deno.test("a read the image fails (a bad checksum) is an EIO error with its message, never bytes; the session goes on", async () => {
  const image = mappedImage();
  const failing: Image = {
    ...image,
    read: (offset, length) =>
      offset < (3 << 20) + (512 << 10) && offset + length > 3 << 20
        ? Promise.reject(new Error("dmg: chunk 7 CRC-32 mismatch"))
        : image.read(offset, length),
  };
  const server = nbdServer(failing);
  const { client, served } = connect(server);
  await client.hello();
  await client.go();
  const handle = await client.request(CMD.READ, 0, 4 << 20);
  const chunks = await client.chunks(handle);
  const last = chunks[chunks.length - 1];
  assertEquals(last.type, 0x8001);
  assertEquals(dv(last.payload).getUint32(0), 5);
  assertMatch(new TextDecoder().decode(last.payload.subarray(6)), /CRC-32/);
  // Without structured replies: an error, and no data after it.
  const plain = nbdServer(failing);
  const second = connect(plain);
  await second.client.hello();
  await second.client.go({ structured: false, meta: false });
  const h2 = await second.client.request(CMD.READ, 3 << 20, 4096);
  assertEquals((await second.client.simple(h2)).error, 5);
  const h3 = await second.client.request(CMD.READ, 0, 4096);
  assertEquals(
    (await second.client.simple(h3, 4096)).data,
    DISK.subarray(0, 4096),
  );
  for (const c of [client, second.client]) await c.request(CMD.DISC, 0, 0);
  await within(Promise.all([served, second.served]));
  client.close();
  second.client.close();
});

Deno.test("clients over maxClients are turned away; close() ends the sessions being negotiated", async () => {
  const server = nbdServer(mappedImage(), { maxClients: 2 });
  const a = connect(server);
  const b = connect(server);
  await a.client.exact(18);
  await b.client.exact(18);
  const c = connect(server);
  await within(c.served);
  assertEquals(server.clients, 2);
  await within(server.close(), WAIT, "close");
  await within(Promise.all([a.served, b.served]));
  assertEquals(server.clients, 0);
  for (const x of [a, b, c]) x.client.close();
});

// ---------------------------------------------------------------------------
// serve --nbd as a subprocess, read by QEMU

/** `cli.ts serve --nbd --port 0 ...args` once it listens (port 0: no clash to retry). */
async function startNbd(args: string[]) {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      `${ROOT}cli.ts`,
      "serve",
      "--nbd",
      "--port",
      "0",
      ...args,
    ],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const reader = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let said = "";
  let port: number | undefined;
  try {
    await within(
      (async () => {
        while (port === undefined) {
          const { value, done } = await reader.read();
          if (done) throw new Error(`the server did not start: ${said}`);
          said += value;
          const m = /over NBD on nbd:\/\/127\.0\.0\.1:(\d+)\//.exec(said);
          if (m) port = Number(m[1]);
        }
      })(),
      WAIT,
      "listening line",
    );
  } catch (e) {
    child.kill("SIGKILL");
    await child.status;
    throw e;
  }
  // Keep reading stderr so the server never waits on a full pipe.
  const drained = (async () => {
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        said += value;
      }
    } catch { /* ended */ }
  })();
  let stopped: Deno.CommandStatus | undefined;
  return {
    port: port!,
    url: `nbd://127.0.0.1:${port}`,
    log: () => said,
    pid: child.pid,
    /** SIGINT, then the exit status (SIGKILL after a bounded wait). */
    async stop(): Promise<Deno.CommandStatus> {
      if (stopped) return stopped;
      try {
        child.kill("SIGINT");
      } catch { /* already ended */ }
      try {
        stopped = await within(child.status, WAIT, "exit after SIGINT");
      } catch (e) {
        child.kill("SIGKILL");
        await child.status;
        throw e;
      } finally {
        await drained;
      }
      return stopped;
    },
  };
}

/** A raw disk with data and zero runs: 3 MiB data, 3 MiB zeros, 1 MiB data, 1 MiB zeros. */
function diskWithHoles(): Uint8Array {
  return cat(
    pseudoRandom(3 << 20, 11),
    new Uint8Array(3 << 20),
    pseudoRandom(1 << 20, 12),
    new Uint8Array(1 << 20),
  );
}

/** The zero runs of an image's map (zero or unallocated), adjacent ones merged. */
async function zeroRuns(path: string, key?: string) {
  const file = await fromFile(path);
  const image = await open(file, { key });
  const runs: [number, number][] = [];
  for await (const e of extentsOf(image, 0, image.size)) {
    if (e.kind === "data") continue;
    const last = runs[runs.length - 1];
    if (last && last[0] + last[1] === e.offset) last[1] += e.length;
    else runs.push([e.offset, e.length]);
  }
  await image.close?.();
  await file.close();
  return runs;
}

const QEMU = ["qemu-img", "qemu-io"];

for (
  const [label, outputFormat, options] of [
    ["a bzip2 dmg", "dmg", "compression=bzip2"],
    ["an LZFSE dmg", "dmg", "compression=lzfse"],
    ["a cloop", "cloop", ""],
  ] as const
) {
  Deno.test({
    name:
      `qemu-img convert from our NBD export of ${label} gives our convert's bytes; qemu-img map sees the holes`,
    ignore: skip(QEMU),
    async fn() {
      await withTemp(async (dir) => {
        await Deno.writeFile(`${dir}/disk.raw`, diskWithHoles());
        const made = await cli([
          "convert",
          "-O",
          outputFormat,
          ...(options ? ["-o", options] : []),
          `${dir}/disk.raw`,
          `${dir}/disk.img`,
        ]);
        assertEquals(made.code, 0, made.stderr);
        const ours = await cli([
          "convert",
          `${dir}/disk.img`,
          `${dir}/ours.raw`,
        ]);
        assertEquals(ours.code, 0, ours.stderr);
        const before = await sha256File(`${dir}/disk.img`);
        const server = await startNbd([`${dir}/disk.img`]);
        try {
          await run("timeout", [
            "60",
            "qemu-img",
            "convert",
            "-f",
            "raw",
            server.url,
            `${dir}/theirs.raw`,
          ]);
          assertEquals(
            await sha256File(`${dir}/theirs.raw`),
            await sha256File(`${dir}/ours.raw`),
          );
          const map = JSON.parse(
            (await run("timeout", [
              "60",
              "qemu-img",
              "map",
              "--output=json",
              "-f",
              "raw",
              server.url,
            ])).text,
          ) as {
            start: number;
            length: number;
            data: boolean;
            zero: boolean;
          }[];
          const holes = map.filter((m) => !m.data).map((m) => {
            assertTrue(m.zero, `hole at ${m.start} reads as zeros`);
            return [m.start, m.length];
          });
          assertEquals(holes, await zeroRuns(`${dir}/disk.img`));
          if (outputFormat === "dmg") {
            assertEquals(holes, [[3 << 20, 3 << 20], [7 << 20, 1 << 20]]);
          }
          const read = await run("timeout", [
            "60",
            "qemu-io",
            "-r",
            "-f",
            "raw",
            "-c",
            `read -P 0 ${3 << 20} ${3 << 20}`,
            "-c",
            "read 0 65536",
            server.url,
          ]);
          assertMatch(
            read.text,
            /read 3145728\/3145728 bytes at offset 3145728/,
          );
          assertMatch(read.text, /read 65536\/65536 bytes at offset 0/);
        } finally {
          const status = await server.stop();
          assertEquals(status.code, 0, server.log());
        }
        assertMatch(server.log(), /vdisk serve: stopped/);
        assertEquals(await sha256File(`${dir}/disk.img`), before);
      });
    },
  });
}

Deno.test({
  name:
    "serve --nbd --snapshot: qemu-io writes and reads back, the next client sees the write, the image file is unchanged",
  ignore: skip(QEMU),
  async fn() {
    await withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/disk.raw`, diskWithHoles());
      const made = await cli([
        "convert",
        "-O",
        "dmg",
        "-o",
        "compression=bzip2",
        `${dir}/disk.raw`,
        `${dir}/disk.dmg`,
      ]);
      assertEquals(made.code, 0, made.stderr);
      const before = await sha256File(`${dir}/disk.dmg`);
      // Read-only without --snapshot: qemu-io's write fails.
      const readOnly = await startNbd([`${dir}/disk.dmg`]);
      try {
        const refused = await run("timeout", [
          "60",
          "qemu-io",
          "-f",
          "raw",
          "-c",
          "write -P 7 0 4096",
          readOnly.url,
        ], { allowFail: true });
        assertTrue(
          refused.code !== 0 ||
            /failed|denied|read-only/i.test(refused.text + refused.stderr),
          `a write to a read-only export fails: ${refused.text}${refused.stderr}`,
        );
      } finally {
        assertEquals((await readOnly.stop()).code, 0);
      }
      const server = await startNbd(["--snapshot", `${dir}/disk.dmg`]);
      try {
        const io = await run("timeout", [
          "60",
          "qemu-io",
          "-f",
          "raw",
          "-c",
          "write -P 7 0 4096",
          "-c",
          "read -P 7 0 4096",
          "-c",
          `write -z ${4 << 20} 65536`,
          "-c",
          `read -P 0 ${4 << 20} 65536`,
          server.url,
        ]);
        assertTrue(
          !/fail|error|mismatch/i.test(io.text + io.stderr),
          io.text + io.stderr,
        );
        const again = await run("timeout", [
          "60",
          "qemu-io",
          "-r",
          "-f",
          "raw",
          "-c",
          "read -P 7 0 4096",
          server.url,
        ]);
        assertTrue(
          !/fail|error|mismatch/i.test(again.text + again.stderr),
          again.text,
        );
      } finally {
        assertEquals((await server.stop()).code, 0, server.log());
      }
      assertEquals(await sha256File(`${dir}/disk.dmg`), before);
    });
  },
});

Deno.test({
  name:
    "serve --nbd exports an encrypted dmg with --key-file, a qcow backing chain and a sparse bundle, byte for byte",
  ignore: skip(QEMU),
  async fn() {
    await withTemp(async (dir) => {
      const disk = diskWithHoles();
      await Deno.writeFile(`${dir}/disk.raw`, disk);
      const made = await cli([
        "convert",
        "-O",
        "dmg",
        "-o",
        "compression=zlib",
        `${dir}/disk.raw`,
        `${dir}/disk.dmg`,
      ]);
      assertEquals(made.code, 0, made.stderr);
      const secret = await encryptDmg(await Deno.readFile(`${dir}/disk.dmg`), {
        password: "correct horse",
        iterations: 1000,
      });
      await Deno.writeFile(`${dir}/secret.dmg`, secret.bytes);
      await Deno.writeTextFile(`${dir}/pw`, "correct horse\n");
      await Deno.chmod(`${dir}/pw`, 0o600);
      // A chain: a qcow over the raw disk with one cluster rewritten.
      const top = await cli([
        "create",
        "-f",
        "qcow",
        "-b",
        "disk.raw",
        "-F",
        "raw",
        `${dir}/top.qcow`,
        String(disk.length),
      ]);
      assertEquals(top.code, 0, top.stderr);
      await Deno.writeFile(`${dir}/patch`, new Uint8Array(8192).fill(0x5a));
      const wrote = await cli([
        "write",
        `${dir}/top.qcow`,
        "1048576",
        `${dir}/patch`,
      ]);
      assertEquals(wrote.code, 0, wrote.stderr);
      await writeFolder(
        `${dir}/disk.sparsebundle`,
        writeSparsebundle(disk, { bandSize: 1 << 20, trim: true }),
      );
      const expectedChain = disk.slice();
      expectedChain.fill(0x5a, 1 << 20, (1 << 20) + 8192);
      for (
        const [args, expected] of [
          [["--key-file", `${dir}/pw`, `${dir}/secret.dmg`], disk],
          [[`${dir}/top.qcow`], expectedChain],
          [[`${dir}/disk.sparsebundle`], disk],
        ] as const
      ) {
        const server = await startNbd([...args]);
        try {
          await run("timeout", [
            "60",
            "qemu-img",
            "convert",
            "-f",
            "raw",
            server.url,
            `${dir}/out.raw`,
          ]);
          const got = await Deno.readFile(`${dir}/out.raw`);
          assertTrue(
            got.length === expected.length &&
              got.every((b, i) => b === expected[i]),
            `the bytes of ${args[args.length - 1]}`,
          );
        } finally {
          assertEquals((await server.stop()).code, 0, server.log());
        }
      }
    });
  },
});

/** Peak resident memory (VmHWM) of a process, in bytes, or undefined off Linux. */
function peakMemory(pid: number): number | undefined {
  try {
    const status = Deno.readTextFileSync(`/proc/${pid}/status`);
    return Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) * 1024;
  } catch {
    return undefined;
  }
}

Deno.test({
  name:
    "clients that drop mid-negotiation or mid-read, or send garbage, leave the server serving the next one, in bounded memory",
  ignore: skip(QEMU),
  async fn() {
    await withTemp(async (dir) => {
      await Deno.writeFile(`${dir}/disk.raw`, diskWithHoles());
      const made = await cli([
        "convert",
        "-O",
        "dmg",
        "-o",
        "compression=bzip2",
        `${dir}/disk.raw`,
        `${dir}/disk.dmg`,
      ]);
      assertEquals(made.code, 0, made.stderr);
      const server = await startNbd([`${dir}/disk.dmg`]);
      try {
        // Gone after the greeting.
        let c = await Client.tcp(server.port);
        await c.exact(18);
        c.close();
        // Gone in the middle of an option.
        c = await Client.tcp(server.port);
        await c.exact(18);
        await c.send(be([[4, 3], [8, IHAVEOPT], [4, OPT.GO], [4, 100]]));
        c.close();
        // Gone in the middle of reads it never takes.
        c = await Client.tcp(server.port);
        await c.hello();
        await c.go();
        for (let i = 0; i < 8; i++) await c.request(CMD.READ, 0, 8 << 20);
        c.close();
        // Garbage: a huge option, a 2 GiB read, a 2 GiB write, bad magic.
        c = await Client.tcp(server.port);
        await c.hello();
        await c.send(be([[8, IHAVEOPT], [4, OPT.GO], [4, 0xfffffff0]]));
        assertEquals((await c.reply()).type, REP_ERR_TOO_BIG);
        assertTrue(await c.closed());
        c.close();
        c = await Client.tcp(server.port);
        await c.hello();
        await c.go();
        assertEquals(
          await c.errorOf(await c.request(CMD.READ, 0, 0x7fffffff)),
          EINVAL,
        );
        assertEquals(
          await c.errorOf(await c.request(CMD.READ, 8 << 20, 512)),
          EINVAL,
          "a read past the end",
        );
        await c.request(CMD.WRITE, 0, 0x7fffffff);
        assertTrue(await c.closed());
        c.close();
        c = await Client.tcp(server.port);
        await c.hello();
        await c.go();
        await c.send(new Uint8Array(28).fill(0x41));
        assertTrue(await c.closed());
        c.close();
        // The next client gets every byte.
        await run("timeout", [
          "60",
          "qemu-img",
          "convert",
          "-f",
          "raw",
          server.url,
          `${dir}/out.raw`,
        ]);
        assertEquals(
          await sha256File(`${dir}/out.raw`),
          await sha256File(`${dir}/disk.raw`),
        );
        const peak = peakMemory(server.pid);
        if (peak !== undefined) {
          assertTrue(peak < 400 << 20, `peak memory ${peak} bytes`);
        }
      } finally {
        assertEquals((await server.stop()).code, 0, server.log());
      }
      assertMatch(server.log(), /client \d+ dropped/);
    });
  },
});

Deno.test("serve: --nbd flags without --nbd and a missing IMAGE are usage errors", async () => {
  const noNbd = await cli(["serve", "--snapshot"]);
  assertEquals(noNbd.code, 2);
  assertMatch(noNbd.stderr, /--snapshot needs --nbd/);
  const noImage = await cli(["serve", "--nbd"]);
  assertEquals(noImage.code, 2);
  assertMatch(noImage.stderr, /takes 1 argument/);
  const badPort = await cli(["serve", "--nbd", "--port", "70000", "x.dmg"]);
  assertEquals(badPort.code, 2);
  assertMatch(badPort.stderr, /--port must be 0 to 65535/);
});

// ---------------------------------------------------------------------------
// TLS (STARTTLS)

Deno.test("requireTls: options before STARTTLS get ERR_TLS_REQD; STARTTLS without a TLS layer is ERR_UNSUP", async () => {
  const server = nbdServer(mappedImage(), { requireTls: true });
  const { client, served } = connect(server);
  await client.hello();
  const [list] = await client.replies(OPT.LIST);
  assertEquals(list.type, 0x80000005);
  const [go] = await client.replies(OPT.GO, cat(be([[4, 0], [2, 0]])));
  assertEquals(go.type, 0x80000005);
  // This in-process connection has no startTls: STARTTLS is not offered.
  const [tls] = await client.replies(OPT.STARTTLS);
  assertEquals(tls.type, REP_ERR_UNSUP);
  // EXPORT_NAME in the clear ends the connection.
  await client.option(OPT.EXPORT_NAME);
  assertTrue(await client.closed());
  client.close();
  await served;
  await server.close();
});

/** A CA, and a server certificate it signed for 127.0.0.1, in `dir` (QEMU's x509 layout). */
async function makeCerts(dir: string, ca = "test CA") {
  await Deno.mkdir(dir, { recursive: true });
  const ssl = (...args: string[]) => run("openssl", args, { cwd: dir });
  await ssl(
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-keyout",
    "ca-key.pem",
    "-out",
    "ca-cert.pem",
    "-days",
    "2",
    "-subj",
    `/CN=${ca}`,
  );
  await ssl(
    "req",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-keyout",
    "server-key.pem",
    "-out",
    "server.csr",
    "-subj",
    "/CN=localhost",
  );
  await Deno.writeTextFile(
    `${dir}/ext.cnf`,
    "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
  );
  await ssl(
    "x509",
    "-req",
    "-in",
    "server.csr",
    "-CA",
    "ca-cert.pem",
    "-CAkey",
    "ca-key.pem",
    "-CAcreateserial",
    "-out",
    "server-cert.pem",
    "-days",
    "2",
    "-extfile",
    "ext.cnf",
  );
}

Deno.test({
  name:
    "serve --nbd --tls-creds: qemu-img reads a dmg over TLS to the bytes of our convert; plain and wrongly trusting clients are refused, the next is served",
  ignore: skip([...QEMU, "openssl"]),
  async fn() {
    await withTemp(async (dir) => {
      await makeCerts(`${dir}/pki`);
      await makeCerts(`${dir}/other`, "another CA");
      await Deno.writeFile(`${dir}/disk.raw`, diskWithHoles());
      const made = await cli([
        "convert",
        "-O",
        "dmg",
        "-o",
        "compression=bzip2",
        `${dir}/disk.raw`,
        `${dir}/disk.dmg`,
      ]);
      assertEquals(made.code, 0, made.stderr);
      const ours = await cli([
        "convert",
        "-O",
        "raw",
        `${dir}/disk.dmg`,
        `${dir}/ours.raw`,
      ]);
      assertEquals(ours.code, 0, ours.stderr);
      const server = await startNbd([
        "--tls-creds",
        `${dir}/pki`,
        `${dir}/disk.dmg`,
      ]);
      const tlsArgs = (pki: string) => [
        "--object",
        `tls-creds-x509,id=tls0,dir=${dir}/${pki},endpoint=client`,
        "--image-opts",
        `driver=nbd,host=127.0.0.1,port=${server.port},tls-creds=tls0`,
      ];
      try {
        // In the clear: refused, TLS required.
        const plain = await run("timeout", [
          "60",
          "qemu-img",
          "info",
          server.url,
        ], {
          allowFail: true,
        });
        assertTrue(plain.code !== 0, plain.text);
        assertMatch(plain.stderr, /TLS/);
        // A client that trusts another CA: the handshake fails.
        const wrong = await run("timeout", [
          "60",
          "qemu-img",
          "info",
          ...tlsArgs("other"),
        ], { allowFail: true });
        assertTrue(wrong.code !== 0, wrong.text);
        // Over TLS: the same bytes as our own convert, and the holes.
        await run("timeout", [
          "120",
          "qemu-img",
          "convert",
          "-O",
          "raw",
          ...tlsArgs("pki"),
          `${dir}/theirs.raw`,
        ]);
        assertEquals(
          await sha256File(`${dir}/theirs.raw`),
          await sha256File(`${dir}/ours.raw`),
        );
        const map = JSON.parse(
          (await run("timeout", [
            "60",
            "qemu-img",
            "map",
            "--output=json",
            ...tlsArgs("pki"),
          ])).text,
        );
        assertTrue(
          map.some((r: { zero: boolean; start: number }) =>
            r.zero && r.start === 3 << 20
          ),
          JSON.stringify(map),
        );
      } finally {
        assertEquals((await server.stop()).code, 0, server.log());
      }
      assertMatch(server.log(), /switched to TLS/);
    });
  },
});

Deno.test("serve --nbd --tls-creds without the certificate files is an error naming them", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/d.raw`, new Uint8Array(4096));
    const r = await cli([
      "serve",
      "--nbd",
      "--port",
      "0",
      "--tls-creds",
      dir,
      `${dir}/d.raw`,
    ]);
    assertEquals(r.code, 1);
    assertMatch(r.stderr, /server-cert\.pem/);
  });
});
