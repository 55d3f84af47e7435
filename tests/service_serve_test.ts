// `cli.ts serve` as a subprocess, under attack (issue 12): its peak
// resident memory (VmHWM in /proc/PID/status) is read after each attack,
// and each stays under 512 MiB (the code before took 1.2-2.2 GiB on the
// same attacks); its flags; what `--web` serves.
import { assertEquals, assertMatch, assertTrue } from "./_asserts.ts";
import { cli, pseudoRandom, ROOT, sha256Hex, withTemp } from "./_helpers.ts";

const LIMIT = 512 << 20;
const canMeasure = (() => {
  try {
    Deno.readTextFileSync("/proc/self/status");
    return true;
  } catch {
    return false;
  }
})();

/** Peak resident memory (VmHWM) of a process, in bytes. */
function peakMemory(pid: number): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  return Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) * 1024;
}

/** `cli.ts serve --port 0 ...args` as a subprocess, once it listens. */
async function startService(args: string[]) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${ROOT}cli.ts`, "serve", "--port", "0", ...args],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const reader = child.stderr.pipeThrough(new TextDecoderStream())
    .getReader();
  let said = "";
  let port: number | undefined;
  while (port === undefined) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`the service did not start: ${said}`);
    said += value;
    const m = /listening on http:\/\/[^/]+:(\d+)\//.exec(said);
    if (m) port = Number(m[1]);
  }
  // Keep reading stderr so the service never waits on a full pipe.
  const drained = (async () => {
    try {
      while (!(await reader.read()).done) { /* discard */ }
    } catch { /* the process ended */ }
  })();
  return {
    base: `http://127.0.0.1:${port}`,
    port,
    peak: () => peakMemory(child.pid),
    async stop() {
      child.kill("SIGTERM");
      await child.status;
      await drained;
    },
  };
}

/** A loopback server on 127.0.0.1 with `handler`. */
function loopback(
  handler: (request: Request) => Response | Promise<Response>,
) {
  const server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    handler,
  );
  return { server, base: `http://127.0.0.1:${server.addr.port}` };
}

const MiB = 1 << 20;
const mib = (bytes: number) => `${(bytes / MiB).toFixed(0)} MiB`;

Deno.test({
  name:
    "a 1 GiB chunked upload to POST /info is refused at the limit, the service under 512 MiB",
  ignore: !canMeasure,
  async fn() {
    const service = await startService([]);
    try {
      // Raw HTTP/1.1 so the client controls the chunking and notices the
      // answer while it is still sending.
      const conn = await Deno.connect({
        hostname: "127.0.0.1",
        port: service.port,
      });
      const answer = (async () => {
        let text = "";
        const buffer = new Uint8Array(4096);
        try {
          while (!text.includes("\r\n\r\n")) {
            const n = await conn.read(buffer);
            if (n === null) break;
            text += new TextDecoder().decode(buffer.subarray(0, n));
          }
        } catch { /* reset after the answer */ }
        return text;
      })();
      const encoder = new TextEncoder();
      let answered = false;
      answer.then(() => answered = true);
      const chunk = new Uint8Array(MiB).fill(0x5a);
      const frame = new Uint8Array([
        ...encoder.encode(`${MiB.toString(16)}\r\n`),
        ...chunk,
        ...encoder.encode("\r\n"),
      ]);
      let sent = 0;
      try {
        await conn.write(encoder.encode(
          "POST /info HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n",
        ));
        while (sent < 1024 * MiB && !answered) {
          let at = 0;
          while (at < frame.length) at += await conn.write(frame.subarray(at));
          sent += MiB;
        }
        if (!answered) await conn.write(encoder.encode("0\r\n\r\n"));
      } catch { /* the service closed the connection: expected */ }
      const head = await answer;
      conn.close();
      // The 413 is read while sending; should the reset that follows an
      // unread body ever beat it, the service must still have cut the
      // upload short, and be alive.
      if (head !== "" || sent >= 1024 * MiB) {
        assertMatch(
          head,
          /^HTTP\/1\.1 413 /,
          `answer after ${mib(sent)}: ${head}`,
        );
      }
      const alive = await fetch(`${service.base}/`);
      assertEquals(alive.status, 200);
      await alive.body?.cancel();
      const peak = service.peak();
      console.error(
        `1 GiB chunked upload: ${mib(sent)} sent, service VmHWM ${mib(peak)}`,
      );
      assertTrue(peak < LIMIT, `peak memory ${mib(peak)}`);
    } finally {
      await service.stop();
    }
  },
});

Deno.test({
  name:
    "an upstream answering a 1 MiB image's reads with 1.5 GiB bodies is cut off, the service under 512 MiB",
  ignore: !canMeasure,
  async fn() {
    const size = MiB;
    const head = pseudoRandom(size, 3);
    let generated = 0;
    const liar = loopback((request) => {
      const range = request.headers.get("range") ?? "";
      const m = /bytes=(\d+)-(\d+)/.exec(range);
      if (!m) return new Response("ranges only", { status: 400 });
      const headers = { "content-range": `bytes ${m[1]}-${m[2]}/${size}` };
      if (range === "bytes=0-0") {
        return new Response(head.slice(0, 1), { status: 206, headers });
      }
      let left = 1536 * MiB;
      const piece = new Uint8Array(MiB).fill(0x77);
      return new Response(
        new ReadableStream<Uint8Array>({
          pull(controller) {
            if (left <= 0) return controller.close();
            left -= piece.length;
            generated += piece.length;
            controller.enqueue(piece.slice());
          },
        }),
        { status: 206, headers },
      );
    });
    const service = await startService(["--allow-private"]);
    try {
      const res = await fetch(
        `${service.base}/convert?url=${liar.base}/disk.img`,
      );
      assertEquals(res.status, 502);
      assertMatch((await res.json()).error, /the server sent more/);
      const peak = service.peak();
      console.error(
        `lying upstream: ${mib(generated)} generated, service VmHWM ${
          mib(peak)
        }`,
      );
      assertTrue(peak < LIMIT, `peak memory ${mib(peak)}`);
    } finally {
      await service.stop();
      await liar.server.shutdown();
    }
  },
});

Deno.test({
  name:
    "20 concurrent reads of a dmg whose zlib chunks decode to 64 MiB each keep the service under 512 MiB",
  ignore: !canMeasure,
  async fn() {
    await withTemp(async (dir) => {
      // Four 64 MiB chunks, each a 16 KiB pattern repeated (about 1 MiB
      // of zlib each).
      const chunks = 4;
      const raw = `${dir}/disk.raw`;
      const pattern = (k: number) => pseudoRandom(16384, 100 + k);
      {
        using file = await Deno.open(raw, { write: true, create: true });
        for (let k = 0; k < chunks; k++) {
          const block = new Uint8Array(4 * MiB);
          for (let at = 0; at < block.length; at += 16384) {
            block.set(pattern(k), at);
          }
          for (let i = 0; i < 16; i++) {
            let at = 0;
            while (at < block.length) {
              at += await file.write(block.subarray(at));
            }
          }
        }
      }
      const made = await cli([
        "convert",
        "-O",
        "dmg",
        "-o",
        "chunk_sectors=131072",
        raw,
        `${dir}/disk.dmg`,
      ]);
      assertEquals(made.code, 0, made.stderr);
      await Deno.remove(raw);
      const dmgSize = (await Deno.stat(`${dir}/disk.dmg`)).size;
      assertTrue(dmgSize < 8 * MiB, `dmg of ${dmgSize} bytes`);
      const bytes = await Deno.readFile(`${dir}/disk.dmg`);
      const host = loopback((request) => {
        const m = /bytes=(\d+)-(\d+)/.exec(request.headers.get("range") ?? "")!;
        const start = Number(m[1]);
        const end = Math.min(Number(m[2]), bytes.length - 1);
        return new Response(bytes.slice(start, end + 1), {
          status: 206,
          headers: { "content-range": `bytes ${start}-${end}/${bytes.length}` },
        });
      });
      const service = await startService(["--allow-private"]);
      let busy = 0;
      try {
        // Client k reads 4 MiB from the middle of chunk k % 4 (the whole
        // chunk is decoded for it), holding it a moment before reading
        // on, as a slow client does; on 503 it waits and asks again.
        const read = async (k: number) => {
          const chunk = k % chunks;
          const start = chunk * 64 * MiB + 30 * MiB + k * 4096;
          const length = 4 * MiB;
          for (let attempt = 0;; attempt++) {
            const res = await fetch(
              `${service.base}/convert?url=${host.base}/disk.dmg`,
              { headers: { range: `bytes=${start}-${start + length - 1}` } },
            );
            if (res.status === 503) {
              assertTrue(Number(res.headers.get("retry-after")) > 0);
              await res.body?.cancel();
              busy++;
              assertTrue(attempt < 2000, "never served");
              await new Promise((r) => setTimeout(r, 50));
              continue;
            }
            assertEquals(res.status, 206);
            const reader = res.body!.getReader();
            const got = new Uint8Array(length);
            let at = 0;
            for (;;) {
              const { value, done } = await reader.read();
              if (done) break;
              got.set(value, at);
              if (at === 0) await new Promise((r) => setTimeout(r, 100));
              at += value.length;
            }
            assertEquals(at, length);
            const expected = new Uint8Array(length);
            const p = pattern(chunk);
            for (let i = 0; i < length; i++) {
              expected[i] = p[(start + i) % 16384];
            }
            assertEquals(sha256Hex(got), sha256Hex(expected), `client ${k}`);
            return;
          }
        };
        await Promise.all(Array.from({ length: 20 }, (_, k) => read(k)));
        const peak = service.peak();
        console.error(
          `20 concurrent dmg reads (${
            mib(dmgSize)
          } dmg, 64 MiB chunks): ${busy} answers 503, service VmHWM ${
            mib(peak)
          }`,
        );
        assertTrue(peak < LIMIT, `peak memory ${mib(peak)}`);
      } finally {
        await service.stop();
        await host.server.shutdown();
      }
    });
  },
});

Deno.test("serve --web serves only regular files inside its folder, no dotfiles, no links out", async () => {
  await withTemp(async (dir) => {
    const web = `${dir}/web`;
    await Deno.mkdir(`${web}/sub`, { recursive: true });
    await Deno.mkdir(`${web}/.git`);
    await Deno.writeTextFile(`${web}/index.html`, "<p>home</p>");
    await Deno.writeTextFile(`${web}/sub/page.html`, "<p>sub</p>");
    await Deno.writeTextFile(`${web}/.secret`, "SECRET-TOKEN");
    await Deno.writeTextFile(`${web}/.git/config`, "CORE-CONFIG");
    await Deno.writeTextFile(`${dir}/outside.txt`, "OUTSIDE-BYTES");
    await Deno.symlink(`${dir}/outside.txt`, `${web}/out.txt`);
    await Deno.symlink("/etc/passwd", `${web}/passwd`);
    await Deno.symlink(dir, `${web}/up`);
    await Deno.symlink(`${web}/sub/page.html`, `${web}/inside.html`);
    const service = await startService(["--web", web]);
    try {
      const get = async (path: string) => {
        const res = await fetch(`${service.base}${path}`);
        return { status: res.status, text: await res.text() };
      };
      assertEquals(await get("/"), { status: 200, text: "<p>home</p>" });
      assertEquals(await get("/sub/page.html"), {
        status: 200,
        text: "<p>sub</p>",
      });
      // A link that stays inside is followed.
      assertEquals((await get("/inside.html")).text, "<p>sub</p>");
      for (
        const path of [
          "/.secret",
          "/.git/config",
          "/%2egit/config",
          "/out.txt",
          "/passwd",
          "/up/outside.txt",
          "/sub",
          "/sub/%2e%2e/%2e%2e/outside.txt",
          "/..%2foutside.txt",
        ]
      ) {
        const { status, text } = await get(path);
        assertEquals(status, 404, path);
        assertTrue(
          !/SECRET|CORE-CONFIG|OUTSIDE-BYTES|root:/.test(text),
          `${path}: ${text}`,
        );
      }
    } finally {
      await service.stop();
    }
  });
});

Deno.test("serve takes --max-virtual, --max-concurrent and --max-upload, and refuses names it cannot resolve", async () => {
  const descriptor = (sectors: number) =>
    new TextEncoder().encode(
      `# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n# Extent description\nRW ${sectors} ZERO\n`,
    );
  const host = loopback((request) => {
    const vmdk = descriptor(
      request.url.endsWith("big.vmdk") ? 409600 : 131072,
    );
    const m = /bytes=(\d+)-(\d+)/.exec(request.headers.get("range") ?? "")!;
    const start = Number(m[1]);
    const end = Math.min(Number(m[2]), vmdk.length - 1);
    return new Response(vmdk.slice(start, end + 1), {
      status: 206,
      headers: { "content-range": `bytes ${start}-${end}/${vmdk.length}` },
    });
  });
  const service = await startService([
    "--allow-private",
    "--max-virtual",
    "100M",
    "--max-concurrent",
    "1",
    "--max-upload",
    "1k",
  ]);
  const other = await startService([]);
  try {
    const ok = await fetch(`${service.base}/convert?url=${host.base}/a.vmdk`);
    assertEquals(ok.status, 200);
    // The first body (64 MiB, more than the sockets buffer) is not read
    // yet: its slot is held.
    const busy = await fetch(`${service.base}/convert?url=${host.base}/a.vmdk`);
    assertEquals(busy.status, 503);
    assertEquals(busy.headers.get("retry-after"), "5");
    await busy.body?.cancel();
    assertEquals((await ok.arrayBuffer()).byteLength, 64 << 20);
    const upload = await fetch(`${service.base}/info`, {
      method: "POST",
      body: new Uint8Array(2048),
    });
    assertEquals(upload.status, 413);
    assertMatch(
      (await upload.json()).error,
      /limit of 1024 \(maxUploadBytes\)/,
    );
    const big = await fetch(
      `${service.base}/convert?url=${host.base}/big.vmdk`,
    );
    assertEquals(big.status, 413);
    assertMatch(
      (await big.json()).error,
      /virtual size 209715200 bytes is over this service's limit of 104857600 \(maxVirtualBytes\)/,
    );
    // Without --allow-private names are resolved first; here there is no
    // DNS to ask (or the name does not exist), so it is refused.
    const nowhere = await fetch(
      `${other.base}/convert?url=http://no-such-host.invalid/x.img`,
    );
    assertEquals(nowhere.status, 403);
    assertMatch(
      (await nowhere.json()).error,
      /no-such-host\.invalid is not allowed by this service \(it does not resolve/,
    );
  } finally {
    await service.stop();
    await other.stop();
    await host.server.shutdown();
  }
  const bad = await cli(["serve", "--max-concurrent", "0"]);
  assertEquals(bad.code, 2);
  assertMatch(bad.stderr, /--max-concurrent must be a whole number from 1/);
});
