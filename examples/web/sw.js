// The service worker behind index.html's downloads. A browser can only save
// a stream as a file when it arrives as a response: the page hands this
// worker a MessagePort (whose other end the converting worker writes to)
// under a download id, then navigates a hidden frame to
// `vdisk-download/ID/NAME`; the answer is a response whose body is read
// from the port, with `Content-Disposition: attachment`. The body pulls one
// message at a time and acknowledges each, so the converter never runs
// more than a few blocks ahead of the disk the file is written to; zero
// runs come as counts and go out as views of one zero buffer.

const ZEROS = new Uint8Array(1 << 20);
const PREFIX = "vdisk-download/";
/** Downloads handed over and not yet asked for, by id. */
const waiting = new Map();

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener(
  "activate",
  (event) => event.waitUntil(self.clients.claim()),
);

/** The response body: the port's messages in order, with backpressure. */
function portStream(port, finished) {
  const queue = [];
  let arrived;
  let zerosLeft = 0;
  port.onmessage = ({ data }) => {
    queue.push(data);
    arrived?.();
  };
  const next = async () => {
    while (!queue.length) await new Promise((resolve) => arrived = resolve);
    port.postMessage({ ack: true });
    return queue.shift();
  };
  return new ReadableStream({
    async pull(controller) {
      for (;;) {
        if (zerosLeft > 0) {
          const n = Math.min(zerosLeft, ZEROS.length);
          zerosLeft -= n;
          controller.enqueue(ZEROS.subarray(0, n));
          return;
        }
        const message = await next();
        if (message.data) {
          controller.enqueue(message.data);
          return;
        }
        if (message.zeros) {
          zerosLeft = message.zeros;
        } else if (message.end) {
          controller.close();
          finished();
          return;
        } else if (message.error) {
          controller.error(new Error(message.error));
          finished();
          return;
        }
      }
    },
    cancel() {
      port.postMessage({ cancel: true });
      finished();
    },
  }, { highWaterMark: 4 });
}

self.addEventListener("message", (event) => {
  const { download, name, size } = event.data ?? {};
  // Other messages are the page's pings, which keep this worker alive
  // while a long download runs.
  if (typeof download !== "string") return;
  const [port, reply] = event.ports;
  let finished;
  const done = new Promise((resolve) => finished = resolve);
  waiting.set(download, { body: portStream(port, finished), name, size });
  event.waitUntil(done);
  reply.postMessage({ ready: true });
});

/** A Content-Disposition for `name`, ASCII fallback plus the UTF-8 form. */
function disposition(name) {
  const ascii = name.replace(/[^\x20-\x7e]|["\\]/g, "_");
  return `attachment; filename="${ascii}"; filename*=UTF-8''${
    encodeURIComponent(name)
  }`;
}

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  const base = new URL(PREFIX, self.registration.scope).pathname;
  if (!url.pathname.startsWith(base)) return;
  const id = url.pathname.slice(base.length).split("/")[0];
  const entry = waiting.get(id);
  waiting.delete(id);
  if (!entry) {
    event.respondWith(
      new Response("This download is over or unknown: convert again.", {
        status: 404,
        headers: { "content-type": "text/plain; charset=utf-8" },
      }),
    );
    return;
  }
  const headers = {
    "content-type": "application/octet-stream",
    "content-disposition": disposition(entry.name),
    "x-content-type-options": "nosniff",
  };
  if (entry.size !== undefined) headers["content-length"] = String(entry.size);
  event.respondWith(new Response(entry.body, { headers }));
});
