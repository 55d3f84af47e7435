// The same pipeline in a browser: Debian's headless chromium loads the web
// page, whose module worker imports the bundle (dist/mod.js built here),
// opens images over HTTP Range requests and from Files, and hashes the raw
// disk. The hashes must match the manifest's.
import { assertEquals, assertTrue } from "./_asserts.ts";
import { launch } from "./_cdp.ts";
import {
  fileServer,
  referenceFile,
  referenceImages,
  ROOT,
  run,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";
import {
  convert,
  dmg,
  formats,
  fromBytes,
  fromFile,
  memorySink,
  open,
} from "../mod.ts";
import { writeFolder, writeSparsebundle } from "./_apple_writers.ts";
import { encryptDmg } from "./_encrypted_dmg_writer.ts";
import { segmentDmg } from "./_segmented_dmg_writer.ts";

const known = new Set(formats().map((d) => d.name));
/** Reference images the browser must decode: dmg (each codec) and cloop, as far as the drivers exist. */
const WANTED = [
  "udif/compression-zlib.dmg",
  "udif/compression-bz2.dmg",
  "udif/compression-lzfse.dmg",
  "udif/compression-adc.dmg",
  "qemu-iotests/simple-pattern.cloop.bz2",
];

async function withPage(
  fn: (page: Awaited<ReturnType<typeof launch>>, dir: string) => Promise<void>,
) {
  await withTemp(async (dir) => {
    // Build the bundle and lay out the site: the page, its worker, the bundle, the images.
    await Deno.mkdir(`${dir}/dist`);
    await run(Deno.execPath(), [
      "bundle",
      "--platform=browser",
      "-o",
      `${dir}/dist/mod.js`,
      `${ROOT}mod.ts`,
    ]);
    for (const f of ["index.html", "worker.js", "sw.js"]) {
      await Deno.copyFile(`${ROOT}examples/web/${f}`, `${dir}/${f}`);
    }
    await Deno.mkdir(`${dir}/images`);
    await Deno.mkdir(`${dir}/downloads`);
    const { server, base } = fileServer(dir);
    const page = await launch(`${base}/index.html`);
    try {
      await page.sendBrowser("Browser.setDownloadBehavior", {
        behavior: "allow",
        downloadPath: `${dir}/downloads`,
      });
      // Downloads stream through the service worker: wait until it runs.
      await page.evaluate(`vdisk.serviceWorker`);
      await fn(page, dir);
    } catch (e) {
      throw new Error(
        `${(e as Error).message}\npage log:\n${page.logs.join("\n")}`,
      );
    } finally {
      await page.close();
      await server.shutdown();
    }
  });
}

type Page = Awaited<ReturnType<typeof launch>>;

/** Chooses `files` in the page's file input `selector`, as a person would. */
async function chooseFiles(page: Page, selector: string, files: string[]) {
  const doc = await page.send("DOM.getDocument");
  const input = await page.send("DOM.querySelector", {
    nodeId: (doc.root as { nodeId: number }).nodeId,
    selector,
  });
  await page.send("DOM.setFileInputFiles", { files, nodeId: input.nodeId });
}

/**
 * Waits until the page's state (`data-state` of its body) is one of
 * `wanted` and returns the status line; the error state, when not wanted,
 * fails with the page's message.
 */
function waitForState(
  page: Page,
  wanted: string[],
  seconds = 120,
): Promise<string> {
  return page.evaluate<string>(
    `new Promise((resolve, reject) => {
      const started = Date.now();
      const wanted = ${JSON.stringify(wanted)};
      const poll = () => {
        const state = document.body.dataset.state;
        const text = document.getElementById("status").textContent;
        if (wanted.includes(state)) resolve(text);
        else if (state === "error") reject(new Error(text));
        else if (Date.now() - started > ${
      seconds * 1000
    }) reject(new Error("timed out: " + text));
        else setTimeout(poll, 50);
      };
      poll();
    })`,
  );
}

/**
 * The path of the download `name` once the browser has finished it (it
 * writes NAME.crdownload and renames it at the end).
 */
async function downloadedFile(
  dir: string,
  name: string,
  seconds = 60,
): Promise<string> {
  for (let i = 0; i < seconds * 20; i++) {
    const names = [...Deno.readDirSync(`${dir}/downloads`)].map((e) => e.name);
    if (names.includes(name) && !names.some((n) => n.endsWith(".crdownload"))) {
      return `${dir}/downloads/${name}`;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(
    `${name} was not downloaded: ${
      [...Deno.readDirSync(`${dir}/downloads`)].map((e) => e.name).join(", ")
    }`,
  );
}

Deno.test({
  name:
    "a browser worker decodes dmg and cloop images over HTTP ranges and from Files to the manifest's sha256",
  ignore: skip(["chromium", "bzip2"], true),
  async fn() {
    await withPage(async (page, dir) => {
      const images: { path: string; format: string; raw_sha256: string }[] =
        referenceImages().filter((i) => WANTED.includes(i.path)).map((i) => ({
          path: i.path,
          format: i.format,
          raw_sha256: i.raw_sha256!,
        }));
      assertEquals(images.length, WANTED.length, "a wanted image is missing");
      // Images of our own writers whose codecs the references lack: dmg
      // LZMA chunks and cloop 4 blocks of xz, lz4 and lzo (each a module
      // the bundle must hold).
      const disk = new Uint8Array(3 << 20);
      const words = new TextEncoder().encode("sector cluster chunk block ");
      for (let i = 0; i < 2 << 20; i++) disk[i] = words[i % words.length];
      const made = [
        {
          name: "made-lzma.dmg",
          format: "dmg",
          options: { compression: "lzma" },
        },
        ...["xz", "lz4", "lzo"].map((c) => ({
          name: `made-${c}.cloop`,
          format: "cloop",
          options: { version: "4", compression: c },
        })),
      ];
      for (const m of made) {
        const sink = memorySink();
        await convert(fromBytes(disk), sink, {
          format: m.format,
          options: m.options,
        });
        await Deno.writeFile(`${dir}/images/${m.name}`, sink.bytes());
        images.push({
          path: `images/${m.name}`,
          format: m.format,
          raw_sha256: sha256Hex(disk),
        });
      }
      for (const image of images) {
        const file = image.path.startsWith("images/")
          ? `${dir}/${image.path}`
          : await referenceFile(image.path, `${dir}/images`);
        const name = file!.split("/").pop();
        const byUrl = await page.evaluate<
          { sha256: string; size: number; format: string }
        >(
          `vdisk.convertInWorker("/images/${name}")`,
        );
        assertEquals(byUrl.format, image.format, image.path);
        assertEquals(byUrl.sha256, image.raw_sha256, `${image.path} over HTTP`);
        const byFile = await page.evaluate<{ sha256: string }>(
          `fetch("/images/${name}").then((r) => r.blob())
             .then((b) => vdisk.convertInWorker(new File([b], "${name}")))`,
        );
        assertEquals(
          byFile.sha256,
          image.raw_sha256,
          `${image.path} from a File`,
        );
      }
    });
  },
});

Deno.test({
  name:
    "a person drops an image on the web page, sees what info shows, and downloads the raw disk streamed",
  ignore: skip(["chromium", "bzip2"], true),
  async fn() {
    await withPage(async (page, dir) => {
      const image = referenceImages().find((i) =>
        known.has(i.format) && i.format !== "raw" && WANTED.includes(i.path)
      ) ??
        referenceImages().find((i) =>
          i.path === "qemu-iotests/grub_mbr.raw.bz2"
        )!;
      const file = (await referenceFile(image.path, `${dir}/images`))!;
      await chooseFiles(page, "#file", [file]);
      await waitForState(page, ["ready"]);
      const info = await page.evaluate<string>(
        `document.getElementById("info").textContent`,
      );
      assertTrue(info.includes(`file format: ${image.format}`), info);
      if (image.format === "dmg") {
        // The partitions and codecs, as `info` lists them.
        assertTrue(/partitions:\n\s+\[0\]:/.test(info), info);
        assertTrue(/codecs:\n\s+\w+: \d+/.test(info), info);
      }
      await page.evaluate(`document.getElementById("save").click()`);
      const text = await waitForState(page, ["done"]);
      assertTrue(text.includes(image.raw_sha256!), text);
      assertEquals(
        await page.evaluate<number>(
          `document.getElementById("progress").value`,
        ),
        1,
      );
      const rate = await page.evaluate<string>(
        `document.getElementById("rate").textContent`,
      );
      assertTrue(/^100\.0% .* \/ .*\/s {2}ETA 0:00$/.test(rate), rate);
      const name = file.split("/").pop()!.replace(/\.[^.]*$/, "") + ".raw";
      const downloaded = await downloadedFile(dir, name);
      assertEquals(await sha256File(downloaded), image.raw_sha256);
    });
  },
});

Deno.test({
  name:
    "a browser worker decodes a sparse bundle folder, given as Files by path and chosen in the page's folder input",
  ignore: skip(["chromium"]) || !known.has("sparsebundle"),
  async fn() {
    await withPage(async (page, dir) => {
      const band = 64 << 10;
      const disk = new Uint8Array(10 * band + 4096);
      const words = new TextEncoder().encode("band bundle token plist ");
      for (let i = 0; i < disk.length; i++) {
        if (i % (3 * band) < band) disk[i] = words[i % words.length];
      }
      const files = writeSparsebundle(disk, { bandSize: band, trim: true });
      await writeFolder(`${dir}/images/disk.sparsebundle`, files);
      const paths = Object.keys(files).filter((p) => files[p] !== null);
      const result = await page.evaluate<{ sha256: string; format: string }>(
        `Promise.all(${JSON.stringify(paths)}.map((p) =>
           fetch("/images/disk.sparsebundle/" + p).then((r) => r.blob())
             .then((b) => [p, new File([b], p.split("/").pop())])))
           .then((entries) => vdisk.convertInWorker(Object.fromEntries(entries)))`,
      );
      assertEquals(result.format, "sparsebundle");
      assertEquals(result.sha256, sha256Hex(disk));
      // And as a person does it: the folder chosen in the page's folder input.
      await chooseFiles(page, "#folder", [`${dir}/images/disk.sparsebundle`]);
      await waitForState(page, ["ready"]);
      const info = await page.evaluate<string>(
        `document.getElementById("info").textContent`,
      );
      assertTrue(info.includes("file format: sparsebundle"), info);
      await page.evaluate(`document.getElementById("save").click()`);
      const text = await waitForState(page, ["done"]);
      assertTrue(text.includes(sha256Hex(disk)), text);
      assertTrue(text.startsWith("disk.sparsebundle: sparsebundle"), text);
      const downloaded = await downloadedFile(dir, "disk.raw");
      assertEquals(await sha256File(downloaded), sha256Hex(disk));
    });
  },
});

Deno.test({
  name:
    "a browser worker decodes encrypted dmgs with their password, and a segmented dmg from its Files",
  ignore: skip(["chromium"]),
  async fn() {
    await withPage(async (page, dir) => {
      const disk = new Uint8Array(1 << 20);
      const words = new TextEncoder().encode("encrypted and segmented ");
      for (let i = 0; i < 600 << 10; i++) disk[i] = words[i % words.length];
      const sink = memorySink();
      await dmg.encode!(fromBytes(disk), sink, {
        options: { chunk_sectors: "64" },
      });
      const udif = sink.bytes();
      // Current hdiutil wraps the key with AES-192, which Chrome's
      // WebCrypto lacks (our table AES unwraps it); older images with 3DES.
      for (const wrap of ["aes", "3des"] as const) {
        const made = await encryptDmg(udif, {
          password: "pass word",
          keyBits: 256,
          wrap,
          iterations: 1000,
        });
        await Deno.writeFile(`${dir}/images/secret-${wrap}.dmg`, made.bytes);
        const result = await page.evaluate<{ sha256: string; format: string }>(
          `vdisk.convertInWorker("/images/secret-${wrap}.dmg", { key: "pass word" })`,
        );
        assertEquals(result.format, "dmg-encrypted");
        assertEquals(result.sha256, sha256Hex(disk), wrap);
      }
      const wrong = await page.evaluate<string>(
        `vdisk.convertInWorker("/images/secret-aes.dmg", { key: "nope" })
           .then(() => "opened", (e) => e.message)`,
      );
      assertTrue(/^KeyError: .*wrong password/.test(wrong), wrong);
      const view = new DataView(udif.buffer, udif.byteOffset);
      const fork = Number(view.getBigUint64(udif.length - 512 + 32));
      const parts = segmentDmg(udif, [Math.floor(fork / 2) + 77], "set");
      for (const p of parts) {
        await Deno.writeFile(`${dir}/images/${p.name}`, p.bytes);
      }
      const names = JSON.stringify(parts.map((p) => p.name).reverse());
      const segmented = await page.evaluate<{ sha256: string }>(
        `Promise.all(${names}.map((n) => fetch("/images/" + n)
           .then((r) => r.blob()).then((b) => new File([b], n))))
           .then((files) => vdisk.convertInWorker(files))`,
      );
      assertEquals(segmented.sha256, sha256Hex(disk));
    });
  },
});
