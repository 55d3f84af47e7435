import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  fromBlob,
  fromBytes,
  fromFile,
  fromUrl,
  HttpSourceError,
  HttpTimeoutError,
  memorySink,
  streamSink,
} from "../mod.ts";
import { pseudoRandom, rejects, withTemp } from "./_helpers.ts";

const DATA = pseudoRandom(100_000, 7);

Deno.test("fromBytes reads exact ranges and refuses reads past the end", async () => {
  const src = fromBytes(DATA);
  assertEquals(await src.read(10, 5), DATA.slice(10, 15));
  assertEquals((await src.read(DATA.length, 0)).length, 0);
  await rejects(() => src.read(DATA.length - 1, 2), RangeError);
});

Deno.test("fromBlob reads slices of a Blob", async () => {
  const src = fromBlob(new Blob([DATA]));
  assertEquals(src.size, DATA.length);
  assertEquals(await src.read(99_990, 10), DATA.slice(99_990));
});

Deno.test("fromFile reads concurrently without mixing up positions", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/f`, DATA);
    const src = await fromFile(`${dir}/f`);
    const parts = await Promise.all(
      [0, 5000, 40_000, 99_000].map((o) => src.read(o, 1000)),
    );
    assertEquals(parts[2], DATA.slice(40_000, 41_000));
    assertEquals(parts[3], DATA.slice(99_000, 100_000));
    await src.close();
  });
});

Deno.test("a read-only file source refuses writes", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/f`, DATA);
    const src = await fromFile(`${dir}/f`);
    await rejects(() => src.write(0, new Uint8Array(1)), Error, /read-only/);
    await src.close();
  });
});

function rangeServer(honourRanges: boolean) {
  const server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    (req) => {
      const range = req.headers.get("Range");
      const m = range && /bytes=(\d+)-(\d+)/.exec(range);
      if (!honourRanges || !m) return new Response(DATA);
      const start = Number(m[1]);
      const end = Math.min(Number(m[2]), DATA.length - 1);
      return new Response(DATA.slice(start, end + 1), {
        status: 206,
        headers: { "Content-Range": `bytes ${start}-${end}/${DATA.length}` },
      });
    },
  );
  return { server, url: `http://127.0.0.1:${server.addr.port}/disk.img` };
}

Deno.test("fromUrl reads with Range requests from a local server", async () => {
  const { server, url } = rangeServer(true);
  try {
    const src = await fromUrl(url);
    assertEquals(src.size, DATA.length);
    assertEquals(await src.read(12_345, 777), DATA.slice(12_345, 13_122));
  } finally {
    await server.shutdown();
  }
});

Deno.test("fromUrl fails clearly when the server ignores ranges", async () => {
  const { server, url } = rangeServer(false);
  try {
    await rejects(
      () => fromUrl(url),
      HttpSourceError,
      /ignored the Range request/,
    );
  } finally {
    await server.shutdown();
  }
});

Deno.test("fromUrl reports HTTP errors with the status", async () => {
  const server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    () => new Response("no", { status: 404 }),
  );
  try {
    const e = await rejects(
      () => fromUrl(`http://127.0.0.1:${server.addr.port}/x`),
      HttpSourceError,
      /404/,
    );
    assertEquals((e as HttpSourceError).status, 404);
  } finally {
    await server.shutdown();
  }
});

Deno.test("memorySink grows, resizes and reads back", async () => {
  const sink = memorySink();
  await sink.write(10_000, new Uint8Array([1, 2]));
  assertEquals(sink.bytes().length, 10_002);
  await sink.resize!(20_000);
  assertEquals(sink.bytes().length, 20_000);
  assertEquals(await sink.source().read(10_000, 2), new Uint8Array([1, 2]));
});

Deno.test("streamSink fills gaps with zeros and refuses going backwards", async () => {
  const chunks: Uint8Array[] = [];
  const sink = streamSink(
    new WritableStream({ write: (c) => void chunks.push(c) }),
  );
  await sink.write(3, new Uint8Array([9]));
  await sink.resize!(6);
  await rejects(() => sink.write(0, new Uint8Array(1)), RangeError);
  await sink.close();
  const all = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) all.set(c, (at += c.length) - c.length);
  assertEquals(all, new Uint8Array([0, 0, 0, 9, 0, 0]));
});

Deno.test("fromUrl's idle timeout waits for the next byte, however many come: a body that dribbles within it is read, one that stops fails", async () => {
  const size = 12;
  /** A server (as a fetch) whose body sends a byte every 40 ms, stopping after `stopAfter`. */
  const dribbling = (stopAfter: number): typeof fetch => (_url, init) => {
    const range = new Headers(init?.headers).get("Range")!;
    if (range === "bytes=0-0") {
      return Promise.resolve(
        new Response(new Uint8Array([7]), {
          status: 206,
          headers: { "Content-Range": `bytes 0-0/${size}` },
        }),
      );
    }
    let sent = 0;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        // As fetch's bodies do: an aborted request errors its body.
        init?.signal?.addEventListener("abort", () => {
          clearTimeout(timer);
          controller.error(init.signal!.reason);
        });
      },
      pull(controller) {
        if (sent === size) return controller.close();
        if (sent === stopAfter) return new Promise(() => {}); // silent
        return new Promise((resolve) => {
          timer = setTimeout(() => {
            controller.enqueue(new Uint8Array([sent++]));
            resolve();
          }, 40);
        });
      },
      cancel() {
        clearTimeout(timer);
      },
    });
    return Promise.resolve(
      new Response(body, {
        status: 206,
        headers: { "Content-Range": `bytes 0-${size - 1}/${size}` },
      }),
    );
  };
  // 12 bytes over about 480 ms, never 150 ms apart: read.
  const steady = await fromUrl("http://disk.test/a", {
    fetch: dribbling(size),
    idleTimeout: 150,
  });
  assertEquals(
    [...await steady.read(0, size)],
    [...Array(size).keys()],
  );
  // Silent after 3 bytes: the idle timeout.
  const stalled = await fromUrl("http://disk.test/b", {
    fetch: dribbling(3),
    idleTimeout: 150,
  });
  await rejects(() => stalled.read(0, size), HttpTimeoutError, /idle timeout/);
});

Deno.test("fromUrl reads a byte-stream body into its own reused buffers: the bytes, and a body longer than announced refused", async () => {
  const bytes = pseudoRandom(5 << 20, 3);
  let extra = 0, intoOurs = 0;
  const fake: typeof fetch = (_input, init) => {
    const range = new Headers(init?.headers).get("range")!;
    const [a, b] = /bytes=(\d+)-(\d+)/.exec(range)!.slice(1).map(Number);
    const body = bytes.slice(a, b + 1 + extra);
    let at = 0;
    // A byte stream (as fetch's bodies are) answering in pieces of at
    // most 300000 bytes, into the reader's buffer when it gives one.
    const stream = new ReadableStream({
      type: "bytes",
      pull(controller) {
        const n = Math.min(300000, body.length - at);
        const view = controller.byobRequest?.view;
        if (view && view.byteLength >= 1) {
          const k = Math.min(n, view.byteLength);
          new Uint8Array(view.buffer, view.byteOffset, k).set(
            body.subarray(at, at + k),
          );
          at += k;
          intoOurs++;
          controller.byobRequest!.respond(k);
        } else {
          controller.enqueue(body.slice(at, at + n));
          at += n;
        }
        if (at === body.length) {
          controller.close();
          controller.byobRequest?.respond(0);
        }
      },
    });
    return Promise.resolve(
      new Response(stream, {
        status: 206,
        headers: { "content-range": `bytes ${a}-${b}/${bytes.length}` },
      }),
    );
  };
  const source = await fromUrl("http://example.invalid/disk", {
    fetch: fake,
    readAhead: false,
  });
  // Longer than one buffer (1 MiB), several times, and short ones.
  for (const [at, n] of [[0, 3 << 20], [1000, 10], [3 << 20, 2 << 20]]) {
    assertEquals(await source.read(at, n), bytes.subarray(at, at + n));
  }
  assertTrue(intoOurs >= 18, `${intoOurs} pieces read into fromUrl's buffers`);
  extra = 5;
  await rejects(
    () => source.read(0, 100),
    HttpSourceError,
    /server sent more/,
  );
});
