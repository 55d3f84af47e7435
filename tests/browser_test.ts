// The same pipeline in a browser: Debian's headless chromium loads the web
// page, whose module worker imports the bundle (dist/mod.js built here),
// opens images over HTTP Range requests and from Files, and hashes the raw
// disk. The hashes must match the manifest's.
import { assertEquals, assertTrue } from "./_asserts.ts";
import { bundle, launch, rendererPeaks } from "./_cdp.ts";
import {
  fileServer,
  pseudoRandom,
  qemuIo,
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
import { encryptDmg, encryptSparsebundle } from "./_encrypted_dmg_writer.ts";
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
    await bundle(`${dir}/dist`);
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
    "the bundle's decode workers load in a browser, stay alive through a conversion, end with it, and decode dmg, cloop, vmdk, qcow and qcow2 (zstd) images to 7zz's and qemu-img's bytes",
  ignore: skip(["chromium", "7zz", "qemu-img", "create_compressed_fs"]),
  async fn() {
    await withPage(async (page, dir) => {
      // 6 MiB of text, random and zero mebibytes in 128 KiB chunks: 48
      // chunks, enough for the dmg driver to use its workers.
      const disk = new Uint8Array(6 << 20);
      const words = new TextEncoder().encode("sector cluster chunk block ");
      for (let i = 0; i < 2 << 20; i++) disk[i] = words[(i * 7) % 27 % 26];
      disk.set(pseudoRandom(2 << 20, 15), 3 << 20);
      await Deno.writeFile(`${dir}/disk.raw`, disk);
      const images: { name: string; make: string; reference: string }[] = [
        ...["zlib", "bzip2", "lzfse"].map((compression) => ({
          name: `workers-${compression}.dmg`,
          // Our writer, in 128 KiB chunks: 48 of them.
          make:
            `${Deno.execPath()} run -A ${ROOT}cli.ts convert -O dmg -o compression=${compression},chunk_sectors=256 ${dir}/disk.raw`,
          // The reference: 7-Zip's extraction of the same file.
          reference: `7zz x -tdmg -so`,
        })),
        {
          // 96 blocks of 64 KiB, inflated on the workers in a browser.
          name: "workers.cloop",
          make: `create_compressed_fs -B 65536 ${dir}/disk.raw`,
          reference: `qemu-img convert -f cloop -O raw`,
        },
        {
          // 64 KiB grains, inflated on the workers in a browser, a read's
          // grains per call.
          name: "workers.vmdk",
          make:
            `qemu-img convert -f raw -O vmdk -o subformat=streamOptimized ${dir}/disk.raw`,
          reference: `qemu-img convert -f vmdk -O raw`,
        },
        {
          // 4 KiB compressed clusters (raw deflate), a read's clusters
          // spread over the workers. qemu-img 7.2 exits 1 after writing a
          // correct compressed qcow (see qcow_test.ts).
          name: "workers.qcow",
          make:
            `sh -c 'qemu-img convert -c -f raw -O qcow "$0" "$1"; test -s "$1"' ${dir}/disk.raw`,
          reference: `qemu-img convert -f qcow -O raw`,
        },
        {
          // 64 KiB zstd clusters.
          name: "workers-zstd.qcow2",
          make:
            `qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd ${dir}/disk.raw`,
          reference: `qemu-img convert -f qcow2 -O raw`,
        },
      ];
      for (const { name, make, reference } of images) {
        await run("sh", ["-c", `${make} ${dir}/images/${name} 2>/dev/null`]);
        const extracted = `${dir}/${name}.raw`;
        await run("sh", [
          "-c",
          reference.startsWith("7zz")
            ? `${reference} ${dir}/images/${name} > ${extracted}`
            : `${reference} ${dir}/images/${name} ${extracted}`,
        ]);
        const expected = await sha256File(extracted);
        assertEquals(expected, sha256Hex(disk), `${reference} reads ${name}`);
        for (const how of ["url", "blob"]) {
          const result = await page.evaluate<{
            sha256: string;
            workers: Record<
              "before" | "during" | "after",
              {
                running: number;
                started: number;
                jobs: number;
                broken: boolean;
              }
            >;
          }>(
            how === "url"
              ? `vdisk.convertInWorker("/images/${name}")`
              : `fetch("/images/${name}").then((r) => r.blob())
                   .then((b) => vdisk.convertInWorker(b))`,
          );
          const { before, during, after } = result.workers;
          const what = `${name} from a ${how}: ${
            JSON.stringify(result.workers)
          }`;
          assertEquals(result.sha256, expected, what);
          // The workers loaded (from dist/_worker.js) and decoded...
          assertEquals(during.broken, false, what);
          assertTrue(during.running >= 1, what);
          assertTrue(during.jobs > before.jobs, what);
          // ...were started once for the whole conversion (no idle
          // restarts), and ended with the image's close.
          assertEquals(during.started - before.started, during.running, what);
          assertEquals(after.running, 0, what);
        }
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
    "a browser worker decodes a sparse bundle folder, given as Files by path and chosen in the page's folder input, and an encrypted one with its password",
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
      // An encrypted bundle (AES-256, its token an encrcdsa header): with
      // its password it decodes in the worker; a wrong one is a KeyError.
      const secret = await encryptSparsebundle(disk, {
        password: "pass word",
        keyBits: 256,
        bandSize: band,
        trim: true,
      });
      await writeFolder(`${dir}/images/secret.sparsebundle`, secret.files);
      const secretPaths = Object.keys(secret.files).filter((p) =>
        secret.files[p] !== null
      );
      const dropped = (key: string) =>
        `Promise.all(${JSON.stringify(secretPaths)}.map((p) =>
           fetch("/images/secret.sparsebundle/" + p).then((r) => r.blob())
             .then((b) => [p, new File([b], p.split("/").pop())])))
           .then((entries) => vdisk.convertInWorker(Object.fromEntries(entries), { key: "${key}" }))`;
      const decoded = await page.evaluate<{ sha256: string; format: string }>(
        dropped("pass word"),
      );
      assertEquals(decoded.format, "sparsebundle");
      assertEquals(decoded.sha256, sha256Hex(disk));
      const refused = await page.evaluate<string>(
        `${dropped("nope")}.then(() => "opened", (e) => e.message)`,
      );
      assertTrue(/^KeyError: .*wrong password/.test(refused), refused);
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

/**
 * SHA-256 of a big file, streamed in 16 MiB reads (a quarter of the time
 * `sha256File`'s 64 KiB chunks take on gigabytes of zeros).
 */
async function sha256Big(path: string): Promise<string> {
  // OpenSSL's SHA-256 uses the CPU's SHA instructions: about 1.6 GB/s here
  // against 0.6 GB/s for node:crypto, which matters for 2 x 16 GiB.
  const { text } = await run("openssl", ["dgst", "-sha256", "-r", path]);
  return text.split(" ")[0];
}

/**
 * The disk of the big download test: 16 GiB, as the issue asks (a 276 KiB
 * vmdk of a 16 GiB disk once failed with "Array buffer allocation
 * failed"). `VDISK_WEB_DISK_GIB=4` runs a smaller one.
 */
const BIG_GIB = Number(Deno.env.get("VDISK_WEB_DISK_GIB") ?? 16);
const BIG = BIG_GIB * 2 ** 30;

Deno.test({
  name:
    `the web page converts a ${BIG_GIB} GiB sparse vmdk to a streamed download, the tab under 512 MiB, with the bytes of qemu-img convert`,
  ignore: skip(["chromium", "qemu-img", "qemu-io", "openssl"]),
  async fn() {
    await withPage(async (page, dir) => {
      const image = `${dir}/images/big.vmdk`;
      await run("qemu-img", ["create", "-q", "-f", "vmdk", image, `${BIG}`]);
      await qemuIo(
        "vmdk",
        image,
        "write -P 0x5a 0 64k",
        `write -P 0xa5 ${BIG / 2 - 65536} 128k`, // across the middle
        `write -P 0x3c ${BIG / 4 * 3} 64k`,
        `write -P 0xc3 ${BIG - 65536} 64k`, // the last 64 KiB
      );
      const imageSize = (await Deno.stat(image)).size;
      assertTrue(imageSize < 4 << 20, `the vmdk takes ${imageSize} bytes`);
      // qemu-img's raw disk (a sparse file), hashed streaming while the
      // browser works.
      const expected = run("qemu-img", [
        "convert",
        "-O",
        "raw",
        image,
        `${dir}/qemu.raw`,
      ]).then(() => sha256Big(`${dir}/qemu.raw`));
      expected.catch(() => {});
      await chooseFiles(page, "#file", [image]);
      await waitForState(page, ["ready"]);
      const info = await page.evaluate<string>(
        `document.getElementById("info").textContent`,
      );
      assertTrue(info.includes(`virtual size: ${BIG_GIB} GiB`), info);
      await page.evaluate(`
        document.getElementById("hash").checked = false;
        document.getElementById("format").value = "raw";
        document.getElementById("save").click();`);
      await page.send("Performance.enable");
      let heapPeak = 0;
      let rates = new Set<string>();
      const deadline = Date.now() + 600_000;
      for (;;) {
        const { metrics } = await page.send("Performance.getMetrics") as {
          metrics: { name: string; value: number }[];
        };
        const heap = metrics.find((m) => m.name === "JSHeapUsedSize")!.value;
        heapPeak = Math.max(heapPeak, heap);
        const [state, status, rate] = await page.evaluate<string[]>(
          `[document.body.dataset.state,
            document.getElementById("status").textContent,
            document.getElementById("rate").textContent]`,
        );
        rates.add(rate);
        if (state === "done") break;
        if (state === "error") throw new Error(status);
        if (Date.now() > deadline) throw new Error(`timed out: ${status}`);
        await new Promise((r) => setTimeout(r, 500));
      }
      // The bar moved through the conversion, with a rate and an ETA.
      rates = new Set([...rates].filter((r) => /ETA \d+:\d\d$/.test(r)));
      assertTrue(rates.size >= 2, [...rates].join(" | "));
      const downloaded = await downloadedFile(dir, "big.raw", 600);
      assertEquals((await Deno.stat(downloaded)).size, BIG);
      const peaks = rendererPeaks(page.pid);
      assertTrue(peaks.size > 0, "no renderer process found");
      const limit = 512 << 20;
      for (const [pid, peak] of peaks) {
        assertTrue(
          peak < limit,
          `renderer ${pid} peaked at ${peak >> 20} MiB resident`,
        );
      }
      assertTrue(heapPeak < limit, `JS heap peaked at ${heapPeak >> 20} MiB`);
      assertEquals(await sha256Big(downloaded), await expected);
      console.log(
        `renderer peaks: ${
          [...peaks.values()].map((p) => `${p >> 20} MiB`).join(", ")
        }; page heap peak ${heapPeak >> 20} MiB`,
      );
    });
  },
});

/** A 3 MiB disk of words (2 MiB) and zeros, as a raw image in `dir`/images. */
async function wordsDisk(dir: string): Promise<Uint8Array> {
  const disk = new Uint8Array(3 << 20);
  const words = new TextEncoder().encode("format choice in the page ");
  for (let i = 0; i < 2 << 20; i++) disk[i] = words[i % words.length];
  await Deno.writeFile(`${dir}/images/words.img`, disk);
  return disk;
}

Deno.test({
  name:
    "the web page offers every format that can be written and downloads dmg, vmdk, vhdx, vpc (and qcow2 when there is one) that our readers read back",
  ignore: skip(["chromium"]),
  async fn() {
    await withPage(async (page, dir) => {
      const disk = await wordsDisk(dir);
      const offered = await page.evaluate<string[]>(
        `[...document.getElementById("format").options].map((o) => o.value)`,
      );
      assertEquals(
        offered,
        formats().filter((d) => d.create || d.encode).map((d) => d.name),
      );
      const wanted = ["dmg", "vmdk", "vhdx", "vpc", "qcow2"].filter((f) =>
        known.has(f)
      );
      await chooseFiles(page, "#file", [`${dir}/images/words.img`]);
      await waitForState(page, ["ready"]);
      for (const format of wanted) {
        await page.evaluate(`
          document.getElementById("format").value = "${format}";
          document.getElementById("save").click();`);
        const text = await waitForState(page, ["done"]);
        assertTrue(text.includes(`(${format}, `), text);
        const name = `words.${format === "vpc" ? "vhd" : format}`;
        const path = await downloadedFile(dir, name);
        const image = await open(await fromFile(path));
        assertEquals(image.format, format);
        const result = await convert(image, memorySink(), { hash: true });
        await image.close?.();
        // A VHD's disk is rounded up to whole cylinders: zeros at the end.
        assertTrue(image.size >= disk.length, `${format}: ${image.size}`);
        const padded = new Uint8Array(image.size);
        padded.set(disk);
        assertEquals(result.sha256, sha256Hex(padded), format);
      }
    });
  },
});

Deno.test({
  name:
    "the web page refuses a format built in memory past its limit, resets the bar, and then converts the same image streamed",
  ignore: skip(["chromium"]),
  async fn() {
    await withPage(async (page, dir) => {
      // 300 MiB of data: more than the 256 MiB a vpc may take in memory.
      const disk = new Uint8Array(300 << 20);
      const words = new TextEncoder().encode("no room for this one ");
      for (let i = 0; i < disk.length; i += words.length) {
        disk.set(words.subarray(0, Math.min(words.length, disk.length - i)), i);
      }
      await Deno.writeFile(`${dir}/images/large.img`, disk);
      await chooseFiles(page, "#file", [`${dir}/images/large.img`]);
      await waitForState(page, ["ready"]);
      await page.evaluate(`
        document.getElementById("format").value = "vpc";
        document.getElementById("save").click();`);
      const message = await waitForState(page, ["error"]);
      assertTrue(
        /vpc images are written at random offsets/.test(message),
        message,
      );
      assertTrue(message.includes("up to 256 MiB"), message);
      const [value, rate, className, disabled] = await page.evaluate<
        [number, string, string, boolean]
      >(
        `[document.getElementById("progress").value,
          document.getElementById("rate").textContent,
          document.getElementById("status").className,
          document.getElementById("save").disabled]`,
      );
      assertEquals([value, rate, className, disabled], [0, "", "error", false]);
      // The same image again, as raw: streamed, any size.
      await page.evaluate(`
        document.getElementById("format").value = "raw";
        document.getElementById("save").click();`);
      const text = await waitForState(page, ["done"]);
      assertTrue(text.includes(sha256Hex(disk)), text);
      assertEquals(
        await page.evaluate<string>(
          `document.getElementById("status").className`,
        ),
        "",
      );
      const downloaded = await downloadedFile(dir, "large.raw");
      assertEquals(await sha256File(downloaded), sha256Hex(disk));
    });
  },
});

Deno.test({
  name:
    "the worker writes to a file handle as the File System Access API gives one (here the origin's private file system), zero runs included",
  ignore: skip(["chromium"]),
  async fn() {
    await withPage(async (page, dir) => {
      const disk = await wordsDisk(dir);
      const answers = await page.evaluate<
        { format: string; sha256: string; size: number; output: number }[]
      >(
        `(async () => {
          const root = await navigator.storage.getDirectory();
          const answers = [];
          for (const format of ["raw", "dmg"]) {
            const handle = await root.getFileHandle("words." + format, { create: true });
            const made = await vdisk.convertInWorker("/images/words.img", { format, to: handle });
            const file = await handle.getFile();
            const back = await vdisk.convertInWorker(file);
            answers.push({ format: back.format, sha256: back.sha256, size: file.size, output: made.outputSize });
          }
          return answers;
        })()`,
      );
      assertEquals(answers[0].format, "raw");
      assertEquals(answers[0].size, disk.length);
      assertEquals(answers[1].format, "dmg");
      for (const a of answers) {
        assertEquals(a.sha256, sha256Hex(disk), a.format);
        assertEquals(a.output, a.size, a.format);
      }
    });
  },
});

Deno.test({
  name:
    "the web page's Save as writes through the File System Access API (zero runs as file growth) and a closed dialog leaves the page as it was",
  ignore: skip(["chromium"]),
  async fn() {
    await withPage(async (page, dir) => {
      const disk = await wordsDisk(dir);
      // Chromium has the API, so the page offers the button.
      assertEquals(
        await page.evaluate(`typeof globalThis.showSaveFilePicker`),
        "function",
      );
      assertEquals(
        await page.evaluate(`document.getElementById("saveAs").hidden`),
        false,
      );
      await chooseFiles(page, "#file", [`${dir}/images/words.img`]);
      await waitForState(page, ["ready"]);
      // The person closes the dialog: nothing starts, nothing fails.
      await page.evaluate(`
        globalThis.showSaveFilePicker = () =>
          Promise.reject(new DOMException("closed", "AbortError"));
        document.getElementById("saveAs").click();
        new Promise((r) => setTimeout(r, 300));`);
      assertEquals(
        await page.evaluate(`document.body.dataset.state`),
        "ready",
      );
      // The dialog cannot be driven headless: a picker that answers with a
      // file of the origin's private file system stands in for it, so the
      // page's own path (the handle sent to the worker, createWritable,
      // truncate for zero runs) is what runs.
      for (const format of ["raw", "dmg"]) {
        const name = `chosen-${format}`;
        await page.evaluate(`
          globalThis.showSaveFilePicker = async (options) => {
            globalThis.suggestedName = options.suggestedName;
            const root = await navigator.storage.getDirectory();
            return root.getFileHandle("${name}", { create: true });
          };
          document.getElementById("format").value = "${format}";
          document.body.dataset.state = "ready";
          document.getElementById("saveAs").click();`);
        const text = await waitForState(page, ["done"]);
        assertTrue(text.includes(`saved ${name} (${format}, `), text);
        assertEquals(
          await page.evaluate(`globalThis.suggestedName`),
          `words.${format}`,
        );
        const base64 = await page.evaluate<string>(`(async () => {
          const root = await navigator.storage.getDirectory();
          const file = await (await root.getFileHandle("${name}")).getFile();
          const bytes = new Uint8Array(await file.arrayBuffer());
          let text = "";
          for (let i = 0; i < bytes.length; i += 0x8000) {
            text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
          }
          return btoa(text);
        })()`);
        const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
        if (format === "raw") {
          assertEquals(bytes.length, disk.length);
          assertEquals(sha256Hex(bytes), sha256Hex(disk));
        } else {
          const image = await open(fromBytes(bytes));
          assertEquals(image.format, "dmg");
          const result = await convert(image, memorySink(), { hash: true });
          assertEquals(result.sha256, sha256Hex(disk));
        }
      }
    });
  },
});

Deno.test({
  name:
    "the bundle writes qcow2 -c zstd in a browser page, compressing on its _deflate_worker.js workers; qemu-img check and compare accept the image",
  ignore: skip(["chromium", "qemu-img"]),
  async fn() {
    await withPage(async (page, dir) => {
      // Real data: a piece of a tar of /usr/lib, text, random bytes, zeros.
      const disk = new Uint8Array(3 << 20);
      const tar = (await run("sh", [
        "-c",
        "tar cf - /usr/lib/x86_64-linux-gnu/libc.so.6 2>/dev/null | head -c 1500000",
      ], { allowFail: true })).stdout;
      disk.set(tar);
      const text = new TextEncoder().encode("qcow2 zstd cluster in a page ");
      for (let i = 0; i < 600_000; i++) {
        disk[1_600_000 + i] = text[i % text.length];
      }
      disk.set(pseudoRandom(300_000, 9), 2_300_000);
      await Deno.writeFile(`${dir}/images/disk.raw`, disk);
      // Counts the workers the page starts and the answers they send.
      const result = await page.evaluate<
        { base64: string; workers: string[]; answers: number }
      >(`(async () => {
        const workers = [];
        let answers = 0;
        const Base = globalThis.Worker;
        globalThis.Worker = class extends Base {
          constructor(url, options) {
            super(url, options);
            workers.push(String(url));
            this.addEventListener("message", () => answers++);
          }
        };
        try {
          const m = await import("/dist/mod.js");
          const bytes = new Uint8Array(
            await (await fetch("/images/disk.raw")).arrayBuffer(),
          );
          const sink = m.memorySink();
          await m.convert(await m.open(m.fromBytes(bytes)), sink, {
            format: "qcow2",
            compress: true,
            options: { compression_type: "zstd" },
          });
          const out = sink.bytes();
          let text = "";
          for (let i = 0; i < out.length; i += 32768) {
            text += String.fromCharCode(...out.subarray(i, i + 32768));
          }
          return { base64: btoa(text), workers, answers };
        } finally {
          globalThis.Worker = Base;
        }
      })()`);
      assertTrue(
        result.workers.some((u) => u.endsWith("/dist/_deflate_worker.js")),
        JSON.stringify(result.workers),
      );
      assertTrue(result.answers > 0, "no worker answered");
      const image = Uint8Array.from(
        atob(result.base64),
        (c) => c.charCodeAt(0),
      );
      const path = `${dir}/page.qcow2`;
      await Deno.writeFile(path, image);
      assertTrue(image.length < disk.length * 0.8, `${image.length}`);
      const check = await run("qemu-img", ["check", "-f", "qcow2", path], {
        allowFail: true,
      });
      assertTrue(
        check.code === 0 && /No errors were found/.test(check.text),
        check.text,
      );
      const info = JSON.parse(
        (await run("qemu-img", ["info", "--output=json", path])).text,
      );
      assertEquals(info["format-specific"].data["compression-type"], "zstd");
      const compare = await run("qemu-img", [
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        `${dir}/images/disk.raw`,
        path,
      ], { allowFail: true });
      assertEquals(compare.code, 0, compare.text + compare.stderr);
    });
  },
});
