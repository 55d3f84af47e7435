/**
 * An NBD server for any {@linkcode Image}: the protocol of the Network
 * Block Device (NetworkBlockDevice/nbd, `doc/proto.md`), so that QEMU
 * (`qemu-img convert nbd://HOST:PORT out.raw`, `qemu-io`, a VM's disk) and
 * the Linux `nbd-client` read an archived dmg, cloop, sparse bundle or
 * backing chain without converting it first.
 *
 * This module is browser compatible: it speaks the protocol over any pair
 * of byte streams ({@linkcode NbdConnection}); listening on a TCP port is
 * the caller's part (`cli.ts serve --nbd` uses `Deno.listen`, and with
 * `--tls-creds` node:net and node:tls, which can take the TLS handshake on
 * a socket already accepted: the connection's `startTls`).
 *
 * What is spoken (all numbers big-endian):
 *
 * | Phase | Message | Layout |
 * |---|---|---|
 * | greeting | S: `NBDMAGIC` `IHAVEOPT` u16 handshake flags | FIXED_NEWSTYLE, NO_ZEROES |
 * | | C: u32 client flags | only bits 0 and 1 allowed |
 * | options | C: `IHAVEOPT` u32 option, u32 length, data | data at most 64 KiB |
 * | | S: u64 `0x3e889045565a9`, u32 option, u32 reply type, u32 length, data | |
 * | | EXPORT_NAME (1), ABORT (2), LIST (3), STARTTLS (5, when the connection has `startTls`), INFO (6), GO (7), STRUCTURED_REPLY (8), LIST_META_CONTEXT (9), SET_META_CONTEXT (10) | others: ERR_UNSUP; with `requireTls`, ERR_TLS_REQD before STARTTLS |
 * | transmission | C: u32 `0x25609513`, u16 flags, u16 type, u64 handle, u64 offset, u32 length, (data of a WRITE) | 28 bytes |
 * | | S simple: u32 `0x67446698`, u32 error, u64 handle, (data of a READ) | 16 bytes |
 * | | S chunk: u32 `0x668e33ef`, u16 flags, u16 type, u64 handle, u32 length, payload | 20 bytes |
 * | | READ (0), WRITE (1), DISC (2), FLUSH (3), TRIM (4), WRITE_ZEROES (6), BLOCK_STATUS (7) | others: EINVAL |
 *
 * Reads with structured replies send zero runs of the image's allocation
 * map as OFFSET_HOLE chunks (nothing read, nothing sent but 12 bytes), and
 * `base:allocation` block status reports them as holes reading as zeros.
 * The export is read-only (writes get EPERM) unless the server is made
 * `writable` over an image that writes (a `snapshot(image)`: QEMU's
 * `-snapshot`).
 *
 * Limits keep memory bounded whatever clients send: a READ or WRITE moves
 * at most `maxRequestBytes` (32 MiB, QEMU's limit; larger reads get
 * EINVAL, a larger WRITE payload ends the connection), one client has at
 * most `maxInFlight` requests and `maxRequestBytes` of request data in
 * flight, at most `maxClients` are served at once, and option data beyond
 * 64 KiB gets ERR_TOO_BIG and the connection closed.
 *
 * @module
 */

import { checkRange, extentsOf, type Image } from "./types.ts";

/** Two byte streams carrying one client's connection (a `Deno.Conn` is one). */
export interface NbdConnection {
  /** What the client sends. */
  readonly readable: ReadableStream<Uint8Array>;
  /** What the client receives. */
  readonly writable: WritableStream<Uint8Array>;
  /** Ends the connection (a `Deno.Conn`'s close). */
  close?(): void;
  /**
   * Upgrades the connection to TLS as its server (NBD_OPT_STARTTLS),
   * once the plain streams are released: resolves with the encrypted
   * connection after the handshake, rejects when it fails. Without it
   * STARTTLS gets ERR_UNSUP.
   */
  startTls?(): Promise<NbdConnection>;
}

/** Options for {@linkcode nbdServer}. */
export interface NbdOptions {
  /**
   * The export's name, as NBD_OPT_LIST shows it. The empty name (the
   * default export, `nbd://HOST:PORT`) is accepted too. @default ""
   */
  name?: string;
  /** A line describing the export (NBD_INFO_DESCRIPTION). */
  description?: string;
  /**
   * Accept WRITE, WRITE_ZEROES and TRIM, writing through `image.write`
   * (which must exist). Without it the export is read-only and writes get
   * EPERM. @default false
   */
  writable?: boolean;
  /**
   * The largest READ or WRITE one request may carry, in bytes
   * (NBD_INFO_BLOCK_SIZE's maximum). Also what one client may have in
   * flight at once. @default 33554432 (32 MiB, as QEMU's server)
   */
  maxRequestBytes?: number;
  /** Requests one client may have in flight at once. @default 16 */
  maxInFlight?: number;
  /** Clients served at once; more are disconnected as they come. @default 8 */
  maxClients?: number;
  /**
   * Milliseconds a client may take from connecting to the end of option
   * negotiation before it is disconnected. @default 30000
   */
  handshakeTimeout?: number;
  /**
   * Serve only over TLS: before STARTTLS every option but ABORT gets
   * ERR_TLS_REQD (and EXPORT_NAME ends the connection), as qemu-nbd with
   * `--tls-creds`. Needs connections with `startTls`. @default false
   */
  requireTls?: boolean;
  /** Told one line per event worth a log (a client came, left or broke the protocol). */
  onEvent?: (message: string) => void;
}

/** What {@linkcode nbdServer} returns: serves connections, and stops. */
export interface NbdServer {
  /**
   * Speaks NBD with one client until it disconnects, breaks the protocol
   * or the server closes; never rejects. Closes the connection at the end.
   */
  serve(connection: NbdConnection): Promise<void>;
  /** Clients being served now. */
  readonly clients: number;
  /**
   * Stops: new connections are closed at once, options still being
   * negotiated get ERR_SHUTDOWN, requests in flight are answered, then
   * every connection is closed.
   */
  close(): Promise<void>;
}

// The protocol's numbers (doc/proto.md, "Values").
const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

const FLAG_FIXED_NEWSTYLE = 1 << 0;
const FLAG_NO_ZEROES = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
const FLAG_C_NO_ZEROES = 1 << 1;

const FLAG_HAS_FLAGS = 1 << 0;
const FLAG_READ_ONLY = 1 << 1;
const FLAG_SEND_FLUSH = 1 << 2;
const FLAG_SEND_FUA = 1 << 3;
const FLAG_SEND_TRIM = 1 << 5;
const FLAG_SEND_WRITE_ZEROES = 1 << 6;
const FLAG_CAN_MULTI_CONN = 1 << 8;

const OPT_EXPORT_NAME = 1;
const OPT_ABORT = 2;
const OPT_LIST = 3;
const OPT_STARTTLS = 5;
const OPT_INFO = 6;
const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const OPT_LIST_META_CONTEXT = 9;
const OPT_SET_META_CONTEXT = 10;

const REP_ACK = 1;
const REP_SERVER = 2;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const REP_ERR_UNSUP = 0x80000001;
const REP_ERR_INVALID = 0x80000003;
const REP_ERR_TLS_REQD = 0x80000005;
const REP_ERR_UNKNOWN = 0x80000006;
const REP_ERR_SHUTDOWN = 0x80000007;
const REP_ERR_TOO_BIG = 0x80000009;

const INFO_EXPORT = 0;
const INFO_NAME = 1;
const INFO_DESCRIPTION = 2;
const INFO_BLOCK_SIZE = 3;

const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_FLUSH = 3;
const CMD_TRIM = 4;
const CMD_WRITE_ZEROES = 6;
const CMD_BLOCK_STATUS = 7;

const CMD_FLAG_FUA = 1 << 0;
const CMD_FLAG_NO_HOLE = 1 << 1;
const CMD_FLAG_REQ_ONE = 1 << 3;

const REPLY_FLAG_DONE = 1 << 0;
const REPLY_TYPE_NONE = 0;
const REPLY_TYPE_OFFSET_DATA = 1;
const REPLY_TYPE_OFFSET_HOLE = 2;
const REPLY_TYPE_BLOCK_STATUS = 5;
const REPLY_TYPE_ERROR = 0x8001;

const EPERM = 1;
const EIO = 5;
const EINVAL = 22;
const ENOSPC = 28;
const ESHUTDOWN = 108;

const STATE_HOLE = 1 << 0;
const STATE_ZERO = 1 << 1;

/** The one metadata context served, and the id it gets. */
const BASE_ALLOCATION = "base:allocation";
const BASE_ALLOCATION_ID = 1;

/** Option data larger than this is refused (a GO names at most 4096 bytes). */
const MAX_OPTION_BYTES = 64 << 10;
/** Options one client may send before it is disconnected. */
const MAX_OPTIONS = 256;
/** Block status descriptors in one reply (without REQ_ONE). */
const MAX_DESCRIPTORS = 256;
/** Longest string (export name, query, message) the protocol allows. */
const MAX_STRING = 4096;

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

/** The client went away or broke the protocol: the connection ends. */
class Disconnect extends Error {
  constructor(message: string) {
    super(message);
    this.name = "Disconnect";
  }
}

/** Exact reads from a byte stream, keeping what a chunk had beyond. */
class ByteReader {
  #reader: ReadableStreamDefaultReader<Uint8Array>;
  #chunk: Uint8Array = new Uint8Array(0);
  #at = 0;

  constructor(stream: ReadableStream<Uint8Array>) {
    this.#reader = stream.getReader();
  }

  /** The next `length` bytes, in a fresh array; Disconnect at the end of the stream. */
  async exact(length: number): Promise<Uint8Array> {
    const out = new Uint8Array(length);
    let filled = 0;
    while (filled < length) {
      if (this.#at === this.#chunk.length) await this.#pull();
      const n = Math.min(length - filled, this.#chunk.length - this.#at);
      out.set(this.#chunk.subarray(this.#at, this.#at + n), filled);
      this.#at += n;
      filled += n;
    }
    return out;
  }

  /** Drops the next `length` bytes without holding them. */
  async skip(length: number): Promise<void> {
    while (length > 0) {
      if (this.#at === this.#chunk.length) await this.#pull();
      const n = Math.min(length, this.#chunk.length - this.#at);
      this.#at += n;
      length -= n;
    }
  }

  async #pull(): Promise<void> {
    let result: ReadableStreamReadResult<Uint8Array>;
    try {
      result = await this.#reader.read();
    } catch (e) {
      throw new Disconnect(`the connection failed: ${(e as Error).message}`);
    }
    if (result.done) throw new Disconnect("the client closed the connection");
    this.#chunk = result.value;
    this.#at = 0;
  }

  /** Bytes received and not yet taken. */
  buffered(): number {
    return this.#chunk.length - this.#at;
  }

  /** Lets go of the stream (to hand the connection to TLS). */
  release(): void {
    this.#reader.releaseLock();
  }

  /** Ends reading (a pending `exact` fails with Disconnect). */
  cancel(): void {
    this.#reader.cancel().catch(() => {});
  }
}

/** One client's streams: those of the connection, or of its TLS once upgraded. */
interface Io {
  connection: NbdConnection;
  reader: ByteReader;
  writer: WritableStreamDefaultWriter<Uint8Array>;
}

/** Big-endian fields into a fresh array. */
function pack(
  fields: [width: 1 | 2 | 4 | 8, value: number | bigint][],
): Uint8Array<ArrayBuffer> {
  const size = fields.reduce((sum, [w]) => sum + w, 0);
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  let at = 0;
  for (const [width, value] of fields) {
    if (width === 8) view.setBigUint64(at, BigInt(value));
    else if (width === 4) view.setUint32(at, Number(value));
    else if (width === 2) view.setUint16(at, Number(value));
    else view.setUint8(at, Number(value));
    at += width;
  }
  return out;
}

function joined(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((sum, p) => sum + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** A string the protocol carries: UTF-8, at most 4096 bytes (longer ones are cut). */
function text(value: string): Uint8Array {
  const bytes = encoder.encode(value);
  return bytes.length <= MAX_STRING ? bytes : bytes.subarray(0, MAX_STRING);
}

/** Parses option data field by field; any overrun is an invalid option. */
class OptionData {
  #view: DataView;
  at = 0;
  constructor(readonly bytes: Uint8Array) {
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  }
  #need(n: number) {
    if (this.at + n > this.bytes.length) {
      throw new RangeError(
        `option data of ${this.bytes.length} bytes ends inside a field at byte ${this.at}`,
      );
    }
  }
  u16(): number {
    this.#need(2);
    this.at += 2;
    return this.#view.getUint16(this.at - 2);
  }
  u32(): number {
    this.#need(4);
    this.at += 4;
    return this.#view.getUint32(this.at - 4);
  }
  string(length: number): string {
    if (length > MAX_STRING) {
      throw new RangeError(`a string of ${length} bytes is over 4096`);
    }
    this.#need(length);
    this.at += length;
    return decoder.decode(this.bytes.subarray(this.at - length, this.at));
  }
  end(): void {
    if (this.at !== this.bytes.length) {
      throw new RangeError(
        `option data has ${this.bytes.length - this.at} bytes past its fields`,
      );
    }
  }
}

/**
 * An NBD server exporting `image`: call `serve(connection)` for each
 * client that connects (any number in turn, up to `maxClients` at once).
 * The image is only read unless `writable` is set; `close()` stops the
 * server but leaves `image` open.
 *
 * @param image what to export (any Image: a chain, a decrypted dmg, a
 *   `snapshot(image)` to take writes in memory)
 * @param options the export's name, writability and limits
 * @returns the server
 *
 * @example
 * ```ts
 * import { fromBytes, nbdServer, open } from "../mod.ts";
 * const image = await open(fromBytes(new Uint8Array(4096)));
 * const server = nbdServer(image, { name: "disk" });
 * // For each accepted Deno.Conn (Deno.listen): server.serve(conn);
 * await server.close();
 * console.log(server.clients); // 0
 * ```
 */
export function nbdServer(image: Image, options: NbdOptions = {}): NbdServer {
  const name = options.name ?? "";
  const writable = options.writable === true;
  if (writable && !image.write) {
    throw new TypeError(
      "nbdServer: writable needs an image that writes (snapshot(image))",
    );
  }
  const maxRequest = options.maxRequestBytes ?? 32 << 20;
  const maxInFlight = options.maxInFlight ?? 16;
  const maxClients = options.maxClients ?? 8;
  const handshakeTimeout = options.handshakeTimeout ?? 30000;
  for (
    const [field, value, least] of [
      ["maxRequestBytes", maxRequest, 512],
      ["maxInFlight", maxInFlight, 1],
      ["maxClients", maxClients, 1],
      ["handshakeTimeout", handshakeTimeout, 1],
    ] as const
  ) {
    if (!Number.isSafeInteger(value) || value < least) {
      throw new RangeError(
        `nbdServer: ${field} ${value} must be a whole number from ${least}`,
      );
    }
  }
  if (maxRequest > 0xffffffff) {
    throw new RangeError(
      `nbdServer: maxRequestBytes ${maxRequest} must be at most 2^32 - 1`,
    );
  }
  const log = options.onEvent ?? (() => {});
  const size = image.size;
  const transmissionFlags = FLAG_HAS_FLAGS | FLAG_CAN_MULTI_CONN |
    (writable
      ? FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM |
        FLAG_SEND_WRITE_ZEROES
      : FLAG_READ_ONLY);

  let closing = false;
  let clientCount = 0;
  let nextClient = 1;
  const sessions = new Set<{ stop(): void; done: Promise<void> }>();
  /** Writes go one at a time (a snapshot's cluster fill is not atomic). */
  let writeLock: Promise<unknown> = Promise.resolve();
  const exclusively = <T>(fn: () => Promise<T>): Promise<T> => {
    const run = writeLock.then(fn);
    writeLock = run.catch(() => {});
    return run;
  };

  async function serve(connection: NbdConnection): Promise<void> {
    const id = nextClient++;
    if (closing || clientCount >= maxClients) {
      log(
        closing
          ? `client ${id} refused: the server is stopping`
          : `client ${id} refused: ${maxClients} clients are being served (the limit)`,
      );
      try {
        await connection.writable.abort();
      } catch { /* already gone */ }
      try {
        connection.close?.();
      } catch { /* already closed */ }
      return;
    }
    clientCount++;
    // Replaced as a whole when STARTTLS upgrades the connection.
    const io: Io = {
      connection,
      reader: new ByteReader(connection.readable),
      writer: connection.writable.getWriter(),
    };
    let stopped = false;
    let hardClose: ReturnType<typeof setTimeout> | undefined;
    const session = {
      stop() {
        stopped = true;
        io.reader.cancel();
        // Replies still unsent after a grace period (a client that stopped
        // reading) are dropped with the connection.
        hardClose = setTimeout(() => {
          io.writer.abort().catch(() => {});
          try {
            io.connection.close?.();
          } catch { /* already closed */ }
        }, 2000);
      },
      done: Promise.resolve(),
    };
    session.done = (async () => {
      try {
        await talk(id, io, () => stopped);
        log(`client ${id} done`);
      } catch (e) {
        log(`client ${id} dropped: ${(e as Error).message}`);
      } finally {
        io.reader.cancel();
        try {
          await io.writer.close();
        } catch { /* the client is gone */ }
        try {
          io.connection.close?.();
        } catch { /* already closed */ }
        clearTimeout(hardClose);
        clientCount--;
      }
    })();
    sessions.add(session);
    try {
      await session.done;
    } finally {
      sessions.delete(session);
    }
  }

  /** One client's whole conversation; throws Disconnect when it ends badly. */
  async function talk(
    id: number,
    io: Io,
    isStopped: () => boolean,
  ): Promise<void> {
    const send = (bytes: Uint8Array) =>
      io.writer.write(bytes).catch((e) => {
        throw new Disconnect(
          `the connection failed while sending: ${(e as Error).message}`,
        );
      });

    // --- Handshake -------------------------------------------------------
    const timer = setTimeout(() => {
      log(`client ${id}: negotiation took over ${handshakeTimeout} ms`);
      io.reader.cancel();
    }, handshakeTimeout);
    let state: { structured: boolean; metaContext: boolean };
    try {
      const result = await negotiate(id, io, send, isStopped);
      if (!result) return;
      state = result;
    } finally {
      clearTimeout(timer);
    }
    log(`client ${id} connected`);

    // --- Transmission ----------------------------------------------------
    const inFlight = new Set<Promise<void>>();
    let bytesInFlight = 0;
    try {
      while (!isStopped()) {
        let header: Uint8Array;
        try {
          header = await io.reader.exact(28);
        } catch (e) {
          if (isStopped()) break;
          throw e;
        }
        const view = new DataView(header.buffer);
        const magic = view.getUint32(0);
        if (magic !== REQUEST_MAGIC) {
          throw new Disconnect(
            `request magic 0x${magic.toString(16)} is not 0x25609513`,
          );
        }
        const request: Request = {
          flags: view.getUint16(4),
          type: view.getUint16(6),
          handle: header.slice(8, 16),
          offset: view.getBigUint64(16),
          length: view.getUint32(24),
        };
        if (request.type === CMD_DISC) break;
        const carries = request.type === CMD_READ ||
            request.type === CMD_WRITE
          ? request.length
          : 0;
        if (request.type === CMD_WRITE && request.length > maxRequest) {
          // Its payload would have to be read to answer: a denial of
          // service by the spec's words, so the connection ends.
          throw new Disconnect(
            `a WRITE of ${request.length} bytes is over the ${maxRequest}-byte limit`,
          );
        }
        const cost = Math.min(carries, maxRequest);
        // Backpressure: wait for room before reading more from the client.
        while (
          inFlight.size >= maxInFlight ||
          (bytesInFlight > 0 && bytesInFlight + cost > maxRequest)
        ) {
          await Promise.race(inFlight);
        }
        let payload: Uint8Array | undefined;
        if (request.type === CMD_WRITE) {
          if (writable) payload = await io.reader.exact(request.length);
          else await io.reader.skip(request.length);
        }
        bytesInFlight += cost;
        const task: Promise<void> = answer(request, payload, state, send)
          .catch((e) => {
            // A reply that could not be sent (or anything unforeseen) ends
            // this client's connection, never the server.
            log(`client ${id}: ${(e as Error)?.message ?? e}`);
            io.reader.cancel();
          })
          .finally(() => {
            bytesInFlight -= cost;
            inFlight.delete(task);
          });
        inFlight.add(task);
      }
    } finally {
      await Promise.allSettled(inFlight);
    }
  }

  /**
   * Option haggling: returns what was agreed once the client enters
   * transmission, or undefined when it aborted.
   */
  async function negotiate(
    id: number,
    io: Io,
    send: (bytes: Uint8Array) => Promise<void>,
    isStopped: () => boolean,
  ): Promise<{ structured: boolean; metaContext: boolean } | undefined> {
    await send(pack([
      [8, NBDMAGIC],
      [8, IHAVEOPT],
      [2, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES],
    ]));
    const clientFlags = new DataView((await io.reader.exact(4)).buffer)
      .getUint32(0);
    if ((clientFlags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)) !== 0) {
      throw new Disconnect(
        `client flags 0x${
          clientFlags.toString(16)
        } has bits other than 0 and 1`,
      );
    }
    const noZeroes = (clientFlags & FLAG_C_NO_ZEROES) !== 0;
    let secure = false;
    let structured = false;
    let metaContext = false;
    const reply = (
      option: number,
      type: number,
      data: Uint8Array = new Uint8Array(0),
    ) =>
      send(joined(
        pack([
          [8, OPTION_REPLY_MAGIC],
          [4, option],
          [4, type],
          [4, data.length],
        ]),
        data,
      ));
    const known = (exportName: string) =>
      exportName === "" || exportName === name;

    for (let count = 0;; count++) {
      const header = await io.reader.exact(16);
      const view = new DataView(header.buffer);
      const magic = view.getBigUint64(0);
      if (magic !== IHAVEOPT) {
        throw new Disconnect(
          `option magic 0x${magic.toString(16)} is not IHAVEOPT`,
        );
      }
      const option = view.getUint32(8);
      const length = view.getUint32(12);
      if (length > MAX_OPTION_BYTES) {
        await reply(
          option,
          REP_ERR_TOO_BIG,
          text(
            `option data of ${length} bytes is over the ${MAX_OPTION_BYTES}-byte limit`,
          ),
        );
        throw new Disconnect(
          `option ${option} has ${length} bytes of data, over the ${MAX_OPTION_BYTES}-byte limit`,
        );
      }
      if (count >= MAX_OPTIONS) {
        throw new Disconnect(`more than ${MAX_OPTIONS} options`);
      }
      const data = new OptionData(await io.reader.exact(length));
      if (option === OPT_ABORT) {
        await reply(option, REP_ACK).catch(() => {});
        return undefined;
      }
      if (closing || isStopped()) {
        if (option === OPT_EXPORT_NAME) {
          throw new Disconnect("the server is stopping");
        }
        await reply(option, REP_ERR_SHUTDOWN, text("the server is stopping"));
        continue;
      }
      if (option === OPT_STARTTLS) {
        const refusal = !io.connection.startTls
          ? [REP_ERR_UNSUP, "TLS is not offered"] as const
          : secure
          ? [REP_ERR_INVALID, "TLS is already on"] as const
          : length !== 0
          ? [REP_ERR_INVALID, "STARTTLS carries no data"] as const
          : undefined;
        if (refusal) {
          await reply(option, refusal[0], text(refusal[1]));
          continue;
        }
        await reply(option, REP_ACK);
        if (io.reader.buffered() > 0) {
          throw new Disconnect("data came before the TLS handshake");
        }
        io.reader.release();
        io.writer.releaseLock();
        let upgraded: NbdConnection;
        try {
          upgraded = await io.connection.startTls!();
        } catch (e) {
          throw new Disconnect(
            `the TLS handshake failed: ${(e as Error).message}`,
          );
        }
        io.connection = upgraded;
        io.reader = new ByteReader(upgraded.readable);
        io.writer = upgraded.writable.getWriter();
        secure = true;
        // What was agreed in the clear does not carry over (doc/proto.md).
        structured = false;
        metaContext = false;
        log(`client ${id} switched to TLS`);
        continue;
      }
      if (options.requireTls && !secure) {
        if (option === OPT_EXPORT_NAME) {
          throw new Disconnect("EXPORT_NAME before STARTTLS: TLS is required");
        }
        await reply(
          option,
          REP_ERR_TLS_REQD,
          text("TLS is required: send STARTTLS first"),
        );
        continue;
      }
      try {
        switch (option) {
          case OPT_EXPORT_NAME: {
            const exportName = data.string(length);
            if (!known(exportName)) {
              throw new Disconnect(`no export named '${exportName}'`);
            }
            await send(joined(
              pack([[8, size], [2, transmissionFlags]]),
              new Uint8Array(noZeroes ? 0 : 124),
            ));
            return { structured, metaContext };
          }
          case OPT_LIST: {
            data.end();
            const bytes = text(name);
            await reply(
              option,
              REP_SERVER,
              joined(pack([[4, bytes.length]]), bytes),
            );
            await reply(option, REP_ACK);
            break;
          }
          case OPT_INFO:
          case OPT_GO: {
            const exportName = data.string(data.u32());
            const wanted = new Set<number>();
            for (let n = data.u16(); n > 0; n--) wanted.add(data.u16());
            data.end();
            if (!known(exportName)) {
              await reply(
                option,
                REP_ERR_UNKNOWN,
                text(`no export named '${exportName}'`),
              );
              break;
            }
            await reply(
              option,
              REP_INFO,
              pack([[2, INFO_EXPORT], [8, size], [2, transmissionFlags]]),
            );
            if (wanted.has(INFO_NAME)) {
              await reply(
                option,
                REP_INFO,
                joined(pack([[2, INFO_NAME]]), text(name)),
              );
            }
            if (wanted.has(INFO_DESCRIPTION) && options.description) {
              await reply(
                option,
                REP_INFO,
                joined(
                  pack([[2, INFO_DESCRIPTION]]),
                  text(options.description),
                ),
              );
            }
            // Sent whether asked or not: the maximum is not the default.
            await reply(
              option,
              REP_INFO,
              pack([[2, INFO_BLOCK_SIZE], [4, 1], [4, 4096], [4, maxRequest]]),
            );
            await reply(option, REP_ACK);
            if (option === OPT_GO) return { structured, metaContext };
            break;
          }
          case OPT_STRUCTURED_REPLY: {
            data.end();
            if (structured) {
              await reply(
                option,
                REP_ERR_INVALID,
                text("structured replies are already on"),
              );
              break;
            }
            structured = true;
            await reply(option, REP_ACK);
            break;
          }
          case OPT_LIST_META_CONTEXT:
          case OPT_SET_META_CONTEXT: {
            const setting = option === OPT_SET_META_CONTEXT;
            if (setting) metaContext = false;
            const exportName = data.string(data.u32());
            const queries: string[] = [];
            for (let n = data.u32(); n > 0; n--) {
              queries.push(data.string(data.u32()));
            }
            data.end();
            if (!structured) {
              await reply(
                option,
                REP_ERR_INVALID,
                text("metadata contexts need structured replies first"),
              );
              break;
            }
            if (!known(exportName)) {
              await reply(
                option,
                REP_ERR_UNKNOWN,
                text(`no export named '${exportName}'`),
              );
              break;
            }
            const matches = setting
              ? queries.includes(BASE_ALLOCATION)
              : queries.length === 0 ||
                queries.some((q) => q === "base:" || q === BASE_ALLOCATION);
            if (matches) {
              await reply(
                option,
                REP_META_CONTEXT,
                joined(
                  pack([[4, setting ? BASE_ALLOCATION_ID : 0]]),
                  text(BASE_ALLOCATION),
                ),
              );
              if (setting) metaContext = true;
            }
            await reply(option, REP_ACK);
            break;
          }
          default:
            await reply(
              option,
              REP_ERR_UNSUP,
              text(`option ${option} is not supported`),
            );
        }
      } catch (e) {
        if (!(e instanceof RangeError || e instanceof TypeError)) throw e;
        // A field overran the data, a string was too long or not UTF-8.
        if (option === OPT_EXPORT_NAME) {
          throw new Disconnect(`EXPORT_NAME: ${e.message}`);
        }
        await reply(option, REP_ERR_INVALID, text(e.message));
      }
    }
  }

  /** Answers one request (its WRITE payload already read). */
  async function answer(
    request: Request,
    payload: Uint8Array | undefined,
    state: { structured: boolean; metaContext: boolean },
    send: (bytes: Uint8Array) => Promise<void>,
  ): Promise<void> {
    const { handle, type, flags, length } = request;
    const simple = (error: number, data?: Uint8Array) => {
      const head = pack([[4, SIMPLE_REPLY_MAGIC], [4, error], [8, 0]]);
      head.set(handle, 8);
      // An empty write would wait, on some streams, for a read of nothing.
      if (!data || data.length === 0) return send(head);
      // Header and data queued together: no other reply can come between
      // (a failure shows in the second write's promise too).
      send(head).catch(() => {});
      return send(data);
    };
    const chunk = (flags: number, kind: number, payload: Uint8Array) => {
      const head = pack([
        [4, STRUCTURED_REPLY_MAGIC],
        [2, flags],
        [2, kind],
        [8, 0],
        [4, payload.length],
      ]);
      head.set(handle, 8);
      if (payload.length === 0) return send(head);
      send(head).catch(() => {});
      return send(payload);
    };
    const fail = (error: number, message: string) => {
      if (!state.structured) return simple(error);
      const words = text(message);
      return chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        joined(pack([[4, error], [2, words.length]]), words),
      );
    };
    const ok = () => simple(0);

    if (closing) return await fail(ESHUTDOWN, "the server is stopping");
    const allowed = CMD_FLAG_FUA |
      (type === CMD_WRITE_ZEROES ? CMD_FLAG_NO_HOLE : 0) |
      (type === CMD_BLOCK_STATUS ? CMD_FLAG_REQ_ONE : 0);
    if ((flags & ~allowed) !== 0) {
      return await fail(
        EINVAL,
        `command flags 0x${
          flags.toString(16)
        } are not valid for command ${type}`,
      );
    }
    const known = [
      CMD_READ,
      CMD_WRITE,
      CMD_FLUSH,
      CMD_TRIM,
      CMD_WRITE_ZEROES,
      CMD_BLOCK_STATUS,
    ];
    if (!known.includes(type)) {
      return await fail(EINVAL, `command ${type} is not supported`);
    }
    const writes = type === CMD_WRITE || type === CMD_WRITE_ZEROES ||
      type === CMD_TRIM;
    if (writes && !writable) {
      return await fail(EPERM, "the export is read-only");
    }
    if (type === CMD_FLUSH) {
      await exclusively(() => image.flush?.() ?? Promise.resolve());
      return await ok();
    }
    const end = request.offset + BigInt(length);
    if (end > BigInt(size)) {
      return await fail(
        writes ? ENOSPC : EINVAL,
        `${length} bytes at ${request.offset} pass the end of the ${size}-byte export`,
      );
    }
    const offset = Number(request.offset);
    if (
      (type === CMD_READ || type === CMD_WRITE_ZEROES) && length > maxRequest
    ) {
      return await fail(
        EINVAL,
        `a request of ${length} bytes is over the ${maxRequest}-byte limit`,
      );
    }
    try {
      switch (type) {
        case CMD_READ:
          return await read(offset, length);
        case CMD_WRITE:
          await exclusively(() => image.write!(offset, payload!));
          if (flags & CMD_FLAG_FUA) await image.flush?.();
          return await ok();
        case CMD_WRITE_ZEROES: {
          const zeros = new Uint8Array(Math.min(length, 1 << 20));
          await exclusively(async () => {
            for (let at = 0; at < length; at += zeros.length) {
              const n = Math.min(zeros.length, length - at);
              await image.write!(offset + at, zeros.subarray(0, n));
            }
          });
          if (flags & CMD_FLAG_FUA) await image.flush?.();
          return await ok();
        }
        case CMD_TRIM:
          // A hint the spec lets a server ignore: the bytes stay as they are.
          return await ok();
        case CMD_BLOCK_STATUS:
          return await blockStatus(offset, length, flags);
      }
    } catch (e) {
      if (e instanceof Disconnect) throw e;
      return await fail(EIO, (e as Error).message ?? String(e));
    }

    async function read(offset: number, length: number) {
      if (!state.structured) {
        const data = length > 0 ? await image.read(offset, length) : undefined;
        return await simple(0, data);
      }
      // Runs of the allocation map, adjacent ones of a kind merged: data
      // is read and sent as OFFSET_DATA, zeros as OFFSET_HOLE (12 bytes).
      let run: { offset: number; length: number; data: boolean } | undefined;
      const flush = async () => {
        if (!run) return;
        const { offset, length, data } = run;
        run = undefined;
        if (!data) {
          await chunk(
            0,
            REPLY_TYPE_OFFSET_HOLE,
            pack([[8, offset], [4, length]]),
          );
          return;
        }
        const bytes = await image.read(offset, length);
        await chunk(
          0,
          REPLY_TYPE_OFFSET_DATA,
          joined(pack([[8, offset]]), bytes),
        );
      };
      if (length > 0) {
        checkRange(size, offset, length);
        for await (const extent of extentsOf(image, offset, length)) {
          const data = extent.kind === "data";
          if (run && run.data === data) {
            run.length += extent.length;
            continue;
          }
          await flush();
          run = { offset: extent.offset, length: extent.length, data };
        }
        await flush();
      }
      return await chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, new Uint8Array(0));
    }

    async function blockStatus(offset: number, length: number, flags: number) {
      if (!state.structured || !state.metaContext) {
        return await fail(
          EINVAL,
          "block status needs the base:allocation context (NBD_OPT_SET_META_CONTEXT)",
        );
      }
      if (length === 0) {
        return await fail(EINVAL, "block status of 0 bytes");
      }
      const most = flags & CMD_FLAG_REQ_ONE ? 1 : MAX_DESCRIPTORS;
      const descriptors: [number, number][] = [];
      for await (const extent of extentsOf(image, offset, length)) {
        const state = extent.kind === "data" ? 0 : STATE_HOLE | STATE_ZERO;
        const last = descriptors[descriptors.length - 1];
        if (last && last[1] === state) {
          last[0] += extent.length;
          continue;
        }
        if (descriptors.length === most) break;
        descriptors.push([extent.length, state]);
      }
      const body = new Uint8Array(4 + 8 * descriptors.length);
      const view = new DataView(body.buffer);
      view.setUint32(0, BASE_ALLOCATION_ID);
      descriptors.forEach(([length, state], i) => {
        view.setUint32(4 + 8 * i, length);
        view.setUint32(8 + 8 * i, state);
      });
      return await chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, body);
    }
  }

  return {
    serve,
    get clients() {
      return clientCount;
    },
    async close() {
      closing = true;
      for (const session of sessions) session.stop();
      await Promise.allSettled([...sessions].map((s) => s.done));
    },
  };
}

/** One transmission request, as read from the wire. */
interface Request {
  flags: number;
  type: number;
  /** The client's 8 bytes, echoed in the reply. */
  handle: Uint8Array;
  offset: bigint;
  length: number;
}
