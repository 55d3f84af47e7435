import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import { conversionService, formats } from "../mod.ts";
import {
  fileServer,
  have,
  pseudoRandom,
  run,
  sha256Hex,
  skip,
  startServe,
  withTemp,
} from "./_helpers.ts";
import { createHash } from "node:crypto";

const DISK = (() => {
  const d = new Uint8Array(3 << 20);
  d.set(pseudoRandom(500_000, 21), 1_000_000);
  return d;
})();

async function withImageHost(fn: (base: string, dir: string) => Promise<void>) {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/disk.img`, DISK);
    const { server, base } = fileServer(dir);
    try {
      await fn(base, dir);
    } finally {
      await server.shutdown();
    }
  });
}

Deno.test("/convert streams the raw disk of a remote image", async () => {
  await withImageHost(async (base) => {
    const handler = conversionService({ allowPrivate: true });
    const res = await handler(
      new Request(`http://svc/convert?url=${base}/disk.img&format=raw`),
    );
    assertEquals(res.status, 200);
    assertEquals(res.headers.get("content-length"), String(DISK.length));
    assertEquals(
      sha256Hex(new Uint8Array(await res.arrayBuffer())),
      sha256Hex(DISK),
    );
  });
});

Deno.test("/convert honours Range on its output", async () => {
  await withImageHost(async (base) => {
    const handler = conversionService({ allowPrivate: true });
    const res = await handler(
      new Request(`http://svc/convert?url=${base}/disk.img`, {
        headers: { range: "bytes=999990-1000009" },
      }),
    );
    assertEquals(res.status, 206);
    assertEquals(
      res.headers.get("content-range"),
      `bytes 999990-1000009/${DISK.length}`,
    );
    assertEquals(
      new Uint8Array(await res.arrayBuffer()),
      DISK.slice(999_990, 1_000_010),
    );
    const bad = await handler(
      new Request(`http://svc/convert?url=${base}/disk.img`, {
        headers: { range: `bytes=${DISK.length}-` },
      }),
    );
    assertEquals(bad.status, 416);
  });
});

Deno.test("/convert refuses loopback and private hosts by default with a clear 403", async () => {
  const handler = conversionService();
  for (
    const url of [
      "http://127.0.0.1/x.dmg",
      "http://localhost:8000/x.dmg",
      "http://10.1.2.3/x",
      "http://192.168.0.1/x",
      "http://[::1]/x",
      "http://169.254.169.254/latest/meta-data",
      "http://2130706433/x",
    ]
  ) {
    const res = await handler(
      new Request(`http://svc/convert?url=${encodeURIComponent(url)}`),
    );
    assertEquals(res.status, 403, url);
    assertMatch((await res.json()).error, /is not allowed by this service/);
  }
});

Deno.test("/convert with an allow-list refuses every other host", async () => {
  const handler = conversionService({
    allowHosts: ["images.example.com", "*.cdn.example.org"],
  });
  const res = await handler(
    new Request(`http://svc/convert?url=https://evil.example.net/x.dmg`),
  );
  assertEquals(res.status, 403);
  const bad = await handler(
    new Request(`http://svc/convert?url=file:///etc/passwd`),
  );
  assertEquals(bad.status, 400);
  assertMatch((await bad.json()).error, /only http and https/);
});

Deno.test("/convert refuses images over the size limit with 413", async () => {
  await withImageHost(async (base) => {
    const handler = conversionService({
      allowPrivate: true,
      maxInputBytes: 1000,
    });
    const res = await handler(
      new Request(`http://svc/convert?url=${base}/disk.img`),
    );
    assertEquals(res.status, 413);
  });
});

Deno.test("POST /info answers info JSON for an uploaded image", async () => {
  const handler = conversionService();
  const res = await handler(
    new Request("http://svc/info?name=up.img", { method: "POST", body: DISK }),
  );
  assertEquals(res.status, 200);
  const info = await res.json();
  assertEquals(info["virtual-size"], DISK.length);
  assertEquals(info.format, "raw");
  assertEquals(info.filename, "up.img");
});

/** Peak resident memory (VmHWM) of a process, in bytes. */
function peakMemory(pid: number): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  return Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) * 1024;
}

Deno.test({
  name:
    "the service streams a 1 GiB cloop through /convert in under 256 MiB of memory",
  ignore: skip(["create_compressed_fs"]) ||
    !formats().some((d) => d.name === "cloop"),
  async fn() {
    await withTemp(async (dir) => {
      // A 1 GiB disk: 64 MiB of data spread over it, the rest zeros.
      const raw = `${dir}/disk.raw`;
      const f = await Deno.open(raw, { write: true, create: true });
      await f.truncate(1 << 30);
      const block = pseudoRandom(1 << 20, 5);
      for (let i = 0; i < 64; i++) {
        block[0] = i;
        await f.seek(i * 16 * (1 << 20), Deno.SeekMode.Start);
        await f.write(block);
      }
      f.close();
      const expected = createHash("sha256");
      for await (const c of (await Deno.open(raw)).readable) expected.update(c);
      await run("sh", [
        "-c",
        `create_compressed_fs -B 65536 ${raw} ${dir}/disk.cloop 2>/dev/null`,
      ]);
      await Deno.remove(raw);
      const { server, base } = fileServer(dir);
      const { child, port } = await startServe(["--allow-private"]);
      try {
        const res = await fetch(
          `http://127.0.0.1:${port}/convert?url=${base}/disk.cloop`,
        );
        assertEquals(res.status, 200);
        const h = createHash("sha256");
        let total = 0;
        for await (const chunk of res.body!) {
          h.update(chunk);
          total += chunk.length;
        }
        assertEquals(total, 1 << 30);
        assertEquals(h.digest("hex"), expected.digest("hex"));
        const peak = peakMemory(child.pid);
        assertTrue(peak < 256 * 1024 * 1024, `peak memory ${peak} bytes`);
      } finally {
        child.kill("SIGTERM");
        await child.status;
        await server.shutdown();
      }
    });
  },
});

Deno.test({
  name: "cli serve answers the forbidden host with a 4xx message",
  ignore: !have("sh"),
  async fn() {
    const { child, port } = await startServe([]);
    try {
      const res = await fetch(
        `http://127.0.0.1:${port}/convert?url=http://127.0.0.1:1/x`,
      );
      assertEquals(res.status, 403);
      assertMatch((await res.json()).error, /127\.0\.0\.1 is not allowed/);
    } finally {
      child.kill("SIGTERM");
      await child.status;
    }
  },
});
