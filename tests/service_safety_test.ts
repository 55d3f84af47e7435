// The conversion service under attack (issue 12): one test per promise of
// the README's "The conversion service" section, each against real
// servers on loopback, each failing on the code before the fix.
import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import {
  conversionService,
  fromUrl,
  HttpSourceError,
  HttpTimeoutError,
} from "../mod.ts";
import { pseudoRandom, rejects, sha256Hex } from "./_helpers.ts";

const DISK = pseudoRandom(1 << 20, 7);

/** A server on 127.0.0.1 with `handler`; `hits` counts requests by path. */
function loopback(
  handler: (request: Request) => Response | Promise<Response>,
) {
  const hits = new Map<string, number>();
  const server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    (request) => {
      const path = new URL(request.url).pathname;
      hits.set(path, (hits.get(path) ?? 0) + 1);
      return handler(request);
    },
  );
  return {
    server,
    hits,
    port: server.addr.port,
    base: `http://127.0.0.1:${server.addr.port}`,
  };
}

/** Answers Range requests for `bytes` (one range, as a CDN would). */
function rangeAnswer(
  request: Request,
  bytes: Uint8Array<ArrayBuffer>,
): Response {
  const m = /bytes=(\d+)-(\d+)/.exec(request.headers.get("range") ?? "");
  if (!m) return new Response(bytes);
  const start = Number(m[1]);
  const end = Math.min(Number(m[2]), bytes.length - 1);
  return new Response(bytes.slice(start, end + 1), {
    status: 206,
    headers: { "content-range": `bytes ${start}-${end}/${bytes.length}` },
  });
}

/**
 * A fetch for which the names `*.test` are public hosts that all live on
 * 127.0.0.1:`port` (so the policy sees a public name, as it would on the
 * internet); everything else goes where it says.
 */
function namesOn(port: number): typeof fetch {
  return (input, init) => {
    const url = new URL(String(input instanceof Request ? input.url : input));
    if (url.hostname.endsWith(".test")) {
      url.hostname = "127.0.0.1";
      url.port = String(port);
    }
    return fetch(url, init);
  };
}

const get = (
  handler: (request: Request) => Promise<Response>,
  url: string,
  headers?: HeadersInit,
) =>
  handler(
    new Request(
      `http://svc/convert?url=${encodeURIComponent(url)}&format=raw`,
      { headers },
    ),
  );

Deno.test("IPv4-mapped, compatible, NAT64, 6to4 and site-local spellings of internal hosts are refused, and nothing is fetched", async () => {
  const secret = loopback(() => new Response("secret"));
  try {
    const handler = conversionService();
    const p = secret.port;
    for (
      const url of [
        `http://[::ffff:127.0.0.1]:${p}/secret.img`,
        `http://[::ffff:7f00:1]:${p}/secret.img`,
        `http://[0:0:0:0:0:ffff:7f00:1]:${p}/secret.img`,
        `http://[0:0:0:0:0:ffff:127.0.0.1]:${p}/secret.img`,
        `http://[::ffff:169.254.169.254]/latest/meta-data`,
        `http://[::ffff:10.0.0.1]/x`,
        `http://[::127.0.0.1]:${p}/secret.img`,
        `http://[::ffff:0:127.0.0.1]:${p}/secret.img`,
        `http://[64:ff9b::127.0.0.1]:${p}/secret.img`,
        `http://[64:ff9b::a9fe:a9fe]/x`,
        `http://[2002:7f00:1::]:${p}/secret.img`,
        `http://[fec0::1]/x`,
        `http://[fd00::1]/x`,
        `http://[fe80::1]/x`,
        `http://0x7f.1:${p}/secret.img`,
        `http://017700000001:${p}/secret.img`,
        `http://172.20.0.1/x`,
        `http://100.64.0.1/x`,
        `http://0.0.0.0:${p}/secret.img`,
        `http://localhost.:${p}/secret.img`,
      ]
    ) {
      const res = await get(handler, url);
      assertEquals(res.status, 403, url);
      assertMatch(
        (await res.json()).error,
        /is not allowed by this service \(.+\)/,
        url,
      );
    }
    assertEquals(secret.hits.size, 0);
  } finally {
    await secret.server.shutdown();
  }
});

Deno.test("a name that resolves to an internal address is refused, as is one that does not resolve", async () => {
  const host = loopback((r) => rangeAnswer(r, DISK));
  try {
    const answers: Record<string, string[]> = {
      "inside.test": ["10.1.2.3"],
      "mixed.test": ["93.184.216.34", "::ffff:127.0.0.1"],
      "nowhere.test": [],
      "public.test": ["93.184.216.34", "2606:2800:220:1::1"],
    };
    const handler = conversionService({
      fetch: namesOn(host.port),
      resolveHost: (name) => Promise.resolve(answers[name] ?? []),
    });
    for (const name of ["inside", "mixed", "nowhere"]) {
      const res = await get(handler, `http://${name}.test/disk.img`);
      assertEquals(res.status, 403, name);
      assertMatch(
        (await res.json()).error,
        name === "nowhere"
          ? /does not resolve/
          : /resolves to (10\.1\.2\.3|::ffff:127\.0\.0\.1), (private|loopback)/,
      );
    }
    const res = await get(handler, `http://public.test/disk.img`);
    assertEquals(res.status, 200);
    assertEquals(
      sha256Hex(new Uint8Array(await res.arrayBuffer())),
      sha256Hex(DISK),
    );
  } finally {
    await host.server.shutdown();
  }
});

Deno.test("every redirect hop is checked: a public host redirecting to an internal one is refused before it is fetched", async () => {
  const internal = loopback(() => new Response("secret"));
  const p = internal.port;
  const targets = [
    `http://127.0.0.2:${p}/secret.img`,
    `http://localhost:${p}/secret.img`,
    `http://[::1]:${p}/secret.img`,
    `http://[::ffff:127.0.0.1]:${p}/secret.img`,
    `http://169.254.169.254/latest/meta-data`,
    `file:///etc/passwd`,
  ];
  const redirector = loopback((request) => {
    const i = Number(new URL(request.url).searchParams.get("to"));
    return new Response(null, {
      status: 302,
      headers: { location: targets[i] },
    });
  });
  try {
    const handler = conversionService({ fetch: namesOn(redirector.port) });
    for (const [i, target] of targets.entries()) {
      const res = await get(handler, `http://images.test/r?to=${i}`);
      assertEquals(res.status, 403, target);
      assertMatch(
        (await res.json()).error,
        /^redirect from images\.test to .*(is not allowed by this service|only http and https)/,
      );
    }
    assertEquals(internal.hits.size, 0);
    // With an allow-list, a hop to a host not on it is refused too.
    const listed = conversionService({
      allowHosts: ["images.test"],
      fetch: namesOn(redirector.port),
    });
    targets.push("http://elsewhere.test/x");
    const res = await get(
      listed,
      `http://images.test/r?to=${targets.length - 1}`,
    );
    assertEquals(res.status, 403);
    assertMatch(
      (await res.json()).error,
      /elsewhere\.test is not allowed .*not in the allowed hosts/,
    );
  } finally {
    await internal.server.shutdown();
    await redirector.server.shutdown();
  }
});

Deno.test("a redirect is followed once, when opening: every read goes to where it led", async () => {
  const host = loopback((request) =>
    new URL(request.url).pathname === "/latest.img"
      ? new Response(null, { status: 302, headers: { location: "/disk.img" } })
      : rangeAnswer(request, DISK)
  );
  try {
    const handler = conversionService({ fetch: namesOn(host.port) });
    const res = await get(handler, `http://images.test/latest.img`);
    assertEquals(res.status, 200);
    assertEquals(
      sha256Hex(new Uint8Array(await res.arrayBuffer())),
      sha256Hex(DISK),
    );
    assertEquals(host.hits.get("/latest.img"), 1);
    assertTrue(host.hits.get("/disk.img")! > 1);
  } finally {
    await host.server.shutdown();
  }
});

Deno.test("fromUrl refuses a redirect on a later read instead of following it", async () => {
  let reads = 0;
  const host = loopback((request) => {
    if (request.headers.get("range") === "bytes=0-0" || reads++ === 0) {
      return rangeAnswer(request, DISK);
    }
    return new Response(null, {
      status: 302,
      headers: { location: "http://127.0.0.2/" },
    });
  });
  try {
    const source = await fromUrl(`${host.base}/disk.img`);
    assertEquals((await source.read(0, 10)).length, 10);
    await rejects(
      () => source.read(10, 10),
      HttpSourceError,
      // (bytes 10-19, or the window read ahead from there)
      /redirected \(status 302\) on a read of bytes 10-\d+; the URL was resolved once/,
    );
  } finally {
    await host.server.shutdown();
  }
});

/** A fetch that counts the body bytes the service actually pulls. */
function countingFetch(counter: { bytes: number }): typeof fetch {
  return async (input, init) => {
    const response = await fetch(input, init);
    if (!response.body) return response;
    const counted = response.body.pipeThrough(
      new TransformStream<Uint8Array, Uint8Array>({
        transform(chunk, controller) {
          counter.bytes += chunk.length;
          controller.enqueue(chunk);
        },
      }),
    );
    return new Response(counted, {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
  };
}

/** A body of `total` bytes made as it is read, in 64 KiB chunks. */
function endless(total: number, sent = { bytes: 0 }) {
  const chunk = new Uint8Array(65536).fill(0x41);
  return new ReadableStream<Uint8Array>({
    pull(controller) {
      if (sent.bytes >= total) return controller.close();
      sent.bytes += chunk.length;
      controller.enqueue(chunk.slice());
    },
  });
}

Deno.test("an upstream answering a small range with a huge body is read no further than asked, then refused", async () => {
  // Honest about the size (1 MiB), then 256 MiB for any read.
  const liar = loopback((request) => {
    const range = request.headers.get("range") ?? "";
    if (range === "bytes=0-0") return rangeAnswer(request, DISK);
    const m = /bytes=(\d+)-(\d+)/.exec(range)!;
    return new Response(endless(256 << 20), {
      status: 206,
      headers: { "content-range": `bytes ${m[1]}-${m[2]}/${DISK.length}` },
    });
  });
  try {
    const counter = { bytes: 0 };
    const handler = conversionService({
      allowPrivate: true,
      fetch: countingFetch(counter),
    });
    const res = await get(handler, `${liar.base}/disk.img`);
    assertEquals(res.status, 502);
    assertMatch(
      (await res.json()).error,
      /asked for \d+ bytes at \d+, the server sent more/,
    );
    // What the probe asked for, and one chunk past it.
    assertTrue(counter.bytes < 2 << 20, `read ${counter.bytes} bytes`);
  } finally {
    await liar.server.shutdown();
  }
});

Deno.test("fromUrl refuses an answer for another range or announcing another length, before reading it", async () => {
  const host = loopback((request) => {
    const range = request.headers.get("range") ?? "";
    if (range === "bytes=0-0") return rangeAnswer(request, DISK);
    const path = new URL(request.url).pathname;
    if (path === "/shifted") {
      return new Response(DISK.slice(0, 100), {
        status: 206,
        headers: { "content-range": `bytes 0-99/${DISK.length}` },
      });
    }
    return new Response(endless(1 << 30), {
      status: 206,
      headers: {
        "content-range": range.replace("=", " ") + `/${DISK.length}`,
        "content-length": String(1 << 30),
      },
    });
  });
  try {
    const shifted = await fromUrl(`${host.base}/shifted`);
    await rejects(
      () => shifted.read(100, 100),
      HttpSourceError,
      /asked for bytes 100-199 of 1048576, the server answered Content-Range "bytes 0-99\/1048576"/,
    );
    const long = await fromUrl(`${host.base}/long`);
    await rejects(
      () => long.read(100, 100),
      HttpSourceError,
      /asked for 100 bytes at 100, the server announces 1073741824/,
    );
  } finally {
    await host.server.shutdown();
  }
});

Deno.test("POST /info counts a chunked upload as it streams and stops at the limit", async () => {
  const sent = { bytes: 0 };
  const handler = conversionService({ maxUploadBytes: 1 << 20 });
  const res = await handler(
    new Request("http://svc/info", {
      method: "POST",
      body: endless(64 << 20, sent),
    }),
  );
  assertEquals(res.status, 413);
  assertMatch(
    (await res.json()).error,
    /over this service's limit of 1048576 \(maxUploadBytes\)/,
  );
  assertTrue(sent.bytes <= (1 << 20) + 3 * 65536, `read ${sent.bytes} bytes`);
  // Under the limit, the chunks make the image.
  const ok = await handler(
    new Request("http://svc/info", {
      method: "POST",
      body: new Blob([DISK]).stream(),
    }),
  );
  assertEquals(ok.status, 200);
  assertEquals((await ok.json())["virtual-size"], DISK.length);
});

const HUGE_VMDK = new TextEncoder().encode(
  '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n# Extent description\nRW 17592186044415 ZERO\n',
);

Deno.test("a virtual size over maxVirtualBytes is refused with a 413 naming the limit", async () => {
  const host = loopback((r) => rangeAnswer(r, HUGE_VMDK));
  try {
    const handler = conversionService({ allowPrivate: true });
    const res = await get(handler, `${host.base}/huge.vmdk`);
    assertEquals(res.status, 413);
    assertMatch(
      (await res.json()).error,
      /virtual size 9007199254740480 bytes is over this service's limit of 1099511627776 \(maxVirtualBytes\)/,
    );
    const small = conversionService({
      allowPrivate: true,
      maxVirtualBytes: 1 << 20,
    });
    const host2 = await get(small, `${host.base}/huge.vmdk`);
    assertEquals(host2.status, 413);
    await host2.body?.cancel();
  } finally {
    await host.server.shutdown();
  }
});

Deno.test("past maxConcurrent requests the service answers 503 with Retry-After, and a finished stream gives its slot back", async () => {
  const host = loopback((r) => rangeAnswer(r, DISK));
  try {
    const handler = conversionService({
      allowPrivate: true,
      maxConcurrent: 1,
      retryAfterSeconds: 2,
    });
    const first = await get(handler, `${host.base}/disk.img`);
    assertEquals(first.status, 200);
    const busy = await get(handler, `${host.base}/disk.img`);
    assertEquals(busy.status, 503);
    assertEquals(busy.headers.get("retry-after"), "2");
    assertMatch((await busy.json()).error, /maxConcurrent/);
    const upload = await handler(
      new Request("http://svc/info", { method: "POST", body: DISK }),
    );
    assertEquals(upload.status, 503);
    await upload.body?.cancel();
    await first.body!.cancel();
    const second = await get(handler, `${host.base}/disk.img`);
    assertEquals(second.status, 200);
    assertEquals(
      sha256Hex(new Uint8Array(await second.arrayBuffer())),
      sha256Hex(DISK),
    );
    // Read to its end, the body gave the slot back too.
    const third = await get(handler, `${host.base}/disk.img`);
    assertEquals(third.status, 200);
    await third.body!.cancel();
  } finally {
    await host.server.shutdown();
  }
});

Deno.test("a stalled upstream is cut off by the idle timeout, a dribbling one by the total timeout, both 504", async () => {
  const stop = new AbortController();
  const host = loopback((request) => {
    const range = request.headers.get("range") ?? "";
    if (range === "bytes=0-0") return rangeAnswer(request, DISK);
    const path = new URL(request.url).pathname;
    if (path === "/stalled") {
      // Headers come, then nothing.
      return new Response(
        new ReadableStream({
          start(controller) {
            stop.signal.addEventListener("abort", () => {
              try {
                controller.close();
              } catch { /* cancelled by the client already */ }
            });
          },
        }),
        {
          status: 206,
          headers: {
            "content-range": `bytes ${range.slice(6)}/${DISK.length}`,
          },
        },
      );
    }
    // One byte every 50 ms, never silent for long.
    let timer: ReturnType<typeof setInterval>;
    return new Response(
      new ReadableStream({
        start(controller) {
          timer = setInterval(() => controller.enqueue(new Uint8Array(1)), 50);
          stop.signal.addEventListener("abort", () => clearInterval(timer));
        },
        cancel() {
          clearInterval(timer);
        },
      }),
      {
        status: 206,
        headers: { "content-range": `bytes ${range.slice(6)}/${DISK.length}` },
      },
    );
  });
  try {
    // Each case with the other timeout out of reach, so a loaded machine
    // delaying timers cannot make the other one fire first.
    const idle = conversionService({
      allowPrivate: true,
      idleTimeoutMs: 300,
      timeoutMs: 0,
    });
    const stalled = await get(idle, `${host.base}/stalled`);
    assertEquals(stalled.status, 504);
    assertMatch(
      (await stalled.json()).error,
      /no byte from the server for 300 ms \(idle timeout\)/,
    );
    const total = conversionService({
      allowPrivate: true,
      idleTimeoutMs: 10_000,
      timeoutMs: 1000,
    });
    const dribbling = await get(total, `${host.base}/dribbling`);
    assertEquals(dribbling.status, 504);
    assertMatch(
      (await dribbling.json()).error,
      /one request took over 1000 ms \(total timeout\)/,
    );
    await rejects(
      async () =>
        await (await fromUrl(`${host.base}/stalled`, { idleTimeout: 200 }))
          .read(0, 100),
      HttpTimeoutError,
      /idle timeout/,
    );
  } finally {
    stop.abort();
    await host.server.shutdown();
  }
});

Deno.test("a client that leaves its body unread, or its upload silent or dribbling, loses its slot", async () => {
  const host = loopback((r) => rangeAnswer(r, DISK));
  let timer: ReturnType<typeof setInterval> | undefined;
  try {
    const handler = conversionService({
      allowPrivate: true,
      maxConcurrent: 1,
      clientIdleTimeoutMs: 200,
    });
    const idle = await get(handler, `${host.base}/disk.img`);
    assertEquals(idle.status, 200);
    await new Promise((r) => setTimeout(r, 500));
    const next = await get(handler, `${host.base}/disk.img`);
    assertEquals(next.status, 200);
    await next.body!.cancel();
    await rejects(
      () => idle.arrayBuffer(),
      Error,
      /the client read nothing for 200 ms \(clientIdleTimeoutMs\)/,
    );
    // An upload that sends a little, then nothing.
    const silent = await handler(
      new Request("http://svc/info", {
        method: "POST",
        body: new ReadableStream<Uint8Array>({
          start(controller) {
            controller.enqueue(new Uint8Array(512));
          },
        }),
      }),
    );
    assertEquals(silent.status, 408);
    assertMatch(
      (await silent.json()).error,
      /upload sent nothing for 200 ms \(clientIdleTimeoutMs\)/,
    );
    // One that never stops for long, but takes too long in all.
    const slow = conversionService({
      clientIdleTimeoutMs: 10_000,
      timeoutMs: 500,
    });
    const dribbling = await slow(
      new Request("http://svc/info", {
        method: "POST",
        body: new ReadableStream<Uint8Array>({
          start(controller) {
            timer = setInterval(() => {
              try {
                controller.enqueue(new Uint8Array(1));
              } catch { /* cancelled */ }
            }, 50);
          },
          cancel() {
            clearInterval(timer);
          },
        }),
      }),
    );
    assertEquals(dribbling.status, 408);
    assertMatch(
      (await dribbling.json()).error,
      /upload took over 500 ms \(timeoutMs\)/,
    );
  } finally {
    clearInterval(timer);
    await host.server.shutdown();
  }
});

Deno.test("fromUrl follows at most 10 redirects, and passes no headers of its caller to another origin", async () => {
  const seen: (string | null)[] = [];
  const other = loopback((request) => {
    seen.push(request.headers.get("authorization"));
    return rangeAnswer(request, DISK);
  });
  const host = loopback((request) => {
    const path = new URL(request.url).pathname;
    const location = path === "/away" ? `${other.base}/disk.img` : "/loop";
    return new Response(null, { status: 302, headers: { location } });
  });
  try {
    const hops: string[] = [];
    await rejects(
      () =>
        fromUrl(`${host.base}/loop`, {
          checkUrl: (u) => void hops.push(u.href),
        }),
      HttpSourceError,
      /more than 10 redirects/,
    );
    assertEquals(hops.length, 11);
    const source = await fromUrl(`${host.base}/away`, {
      headers: { authorization: "Bearer secret" },
      checkUrl: () => {},
    });
    assertEquals(await source.read(0, 4), DISK.slice(0, 4));
    assertEquals(seen, [null, null]);
    assertEquals(source.name, `${other.base}/disk.img`);
  } finally {
    await host.server.shutdown();
    await other.server.shutdown();
  }
});
