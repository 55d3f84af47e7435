// qcow2 writing with compression_type=zstd (our zstd encoder, one frame a
// cluster as QEMU writes them) and with an external data file (data_file,
// data_file_raw): qemu-img check is clean, compare finds the source's
// bytes, and qemu-img and our reader read them back.

import { assertEquals, assertTrue } from "./_asserts.ts";
import {
  convert,
  create,
  createOutputFile,
  fileResolver,
  fromBytes,
  fromFile,
  open,
  type OutputFile,
  UnsupportedError,
} from "../mod.ts";
import {
  cli,
  have,
  pseudoRandom,
  rejects,
  run,
  sha256File,
  sha256Hex,
  skip,
  withTemp,
} from "./_helpers.ts";

const QEMU = ["qemu-img", "qemu-io"];

/**
 * A disk of real data, not a repeated pattern: the head of a tar of
 * /usr/lib files, text, zeros and random bytes, ending off a cluster.
 */
async function realDisk(size = 6 << 20): Promise<Uint8Array<ArrayBuffer>> {
  const disk = new Uint8Array(size + 1536);
  if (have("tar")) {
    const tar = (await run("sh", [
      "-c",
      "tar cf - /usr/lib/x86_64-linux-gnu/libc.so* /usr/lib/os-release /usr/bin/ls 2>/dev/null | head -c 3000000",
    ], { allowFail: true })).stdout;
    disk.set(tar.subarray(0, Math.min(tar.length, size >> 1)), 0);
  }
  const text = new TextEncoder().encode(
    Array.from(
      { length: 20000 },
      (_, i) => `${i}: qcow2 zstd cluster number ${i * 7919 % 10007}\n`,
    ).join(""),
  );
  disk.set(text.subarray(0, size >> 3), size >> 1);
  disk.set(pseudoRandom(300_000, 5), (size >> 1) + (size >> 2));
  disk.fill(0xab, disk.length - 900);
  return disk;
}

/** Asserts qemu-img check finds no error and no leak (run in `cwd`). */
async function assertCheckClean(path: string, cwd?: string) {
  const r = await run("qemu-img", ["check", "-f", "qcow2", path], {
    allowFail: true,
    cwd,
  });
  assertTrue(
    r.code === 0 && /No errors were found/.test(r.text),
    `qemu-img check ${path}: exit ${r.code}: ${r.text}${r.stderr}`,
  );
}

/** Asserts qemu-img compare finds `raw` and the qcow2 at `path` identical. */
async function assertSame(raw: string, path: string, cwd?: string) {
  const r = await run(
    "qemu-img",
    ["compare", "-f", "raw", "-F", "qcow2", raw, path],
    { allowFail: true, cwd },
  );
  assertEquals(r.code, 0, `qemu-img compare: ${r.text}${r.stderr}`);
}

/** qemu-img info as JSON. */
async function info(path: string, cwd?: string) {
  return JSON.parse(
    (await run("qemu-img", ["info", "--output=json", path], { cwd })).text,
  );
}

const ZSTD_CASES: Record<string, string>[] = [
  {},
  { cluster_size: "512" },
  { cluster_size: "4k", refcount_bits: "1" },
  { cluster_size: "2M", refcount_bits: "64" },
  { extended_l2: "on", lazy_refcounts: "on" },
];

for (const extra of ZSTD_CASES) {
  const options = { compression_type: "zstd", ...extra };
  Deno.test(
    `qcow2 convert -c ${
      JSON.stringify(options)
    }: qemu-img check is clean, compare identical, both readers agree`,
    { ignore: skip(QEMU) },
    () =>
      withTemp(async (dir) => {
        const disk = await realDisk();
        const raw = `${dir}/disk.raw`;
        await Deno.writeFile(raw, disk);
        const path = `${dir}/z.qcow2`;
        const sink = await createOutputFile(path);
        await convert(await open(fromBytes(disk)), sink, {
          format: "qcow2",
          options,
          compress: true,
        });
        await sink.commit();
        await assertCheckClean(path);
        await assertSame(raw, path);
        const i = await info(path);
        assertEquals(i["format-specific"].data["compression-type"], "zstd");
        // Compressed: smaller than the data it holds (past its metadata:
        // header, L1, L2 and refcount clusters).
        const cluster = { "512": 512, "4k": 4096, "2M": 2 << 20 }[
          extra.cluster_size as "512"
        ] ?? 65536;
        assertTrue(
          (await Deno.stat(path)).size < disk.length * 0.8 + 4 * cluster,
        );
        const out = `${dir}/back.raw`;
        await run("qemu-img", ["convert", "-O", "raw", path, out]);
        const expected = sha256Hex(
          (() => {
            const padded = new Uint8Array(Math.ceil(disk.length / 512) * 512);
            padded.set(disk);
            return padded;
          })(),
        );
        assertEquals(await sha256File(out), expected);
        const image = await open(await fromFile(path));
        assertEquals(image.details?.["compression-type"], "zstd");
        assertEquals(sha256Hex(await image.read(0, image.size)), expected);
        await image.close?.();
        // Our writes over our zstd clusters: inflated into new clusters,
        // the old ones released; check stays clean.
        const model = new Uint8Array(Math.ceil(disk.length / 512) * 512);
        model.set(disk);
        const file = await fromFile(path, { write: true });
        const writable = await open(file, { writable: true, sink: file });
        let seed = 21;
        for (const [at, length] of [[100, 3000], [(1 << 20) + 7, 70000]]) {
          const bytes = pseudoRandom(length, seed++);
          await writable.write!(at, bytes);
          model.set(bytes, at);
        }
        await writable.flush!();
        await file.close();
        await Deno.writeFile(`${dir}/model.raw`, model);
        await assertCheckClean(path);
        await assertSame(`${dir}/model.raw`, path);
      }),
  );
}

Deno.test(
  "qcow2 cli: convert -c -o compression_type=zstd is smaller than without -c, and create -o compression_type=zstd takes qemu-io's compressed writes and ours",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      const disk = await realDisk();
      const raw = `${dir}/disk.raw`;
      await Deno.writeFile(raw, disk);
      const packed = `${dir}/c.qcow2`;
      let r = await cli([
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        raw,
        packed,
      ]);
      assertEquals(r.code, 0, r.stderr);
      const plain = `${dir}/p.qcow2`;
      r = await cli(["convert", "-O", "qcow2", raw, plain]);
      assertEquals(r.code, 0, r.stderr);
      assertTrue(
        (await Deno.stat(packed)).size < (await Deno.stat(plain)).size * 0.8,
      );
      await assertCheckClean(packed);
      await assertSame(raw, packed);

      // create, then qemu-io writes compressed (zstd) clusters, then our
      // writable open rewrites some of them.
      const made = `${dir}/m.qcow2`;
      r = await cli([
        "create",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd,cluster_size=64k",
        made,
        "4M",
      ]);
      assertEquals(r.code, 0, r.stderr);
      const i = await info(made);
      assertEquals(i["format-specific"].data["compression-type"], "zstd");
      const model = new Uint8Array(4 << 20);
      model.set(disk.subarray(0, 1 << 20), 0);
      await Deno.writeFile(`${dir}/part.raw`, disk.subarray(0, 1 << 20));
      await run("qemu-io", [
        "-f",
        "qcow2",
        "-c",
        "write -c -P 0x61 1M 128k",
        made,
      ]);
      model.fill(0x61, 1 << 20, (1 << 20) + (128 << 10));
      const file = await fromFile(made, { write: true });
      const image = await open(file, { writable: true, sink: file });
      const bytes = pseudoRandom(70000, 3);
      await image.write!((1 << 20) + 1000, bytes);
      model.set(bytes, (1 << 20) + 1000);
      await image.write!(0, disk.subarray(0, 1 << 20));
      await image.flush!();
      await file.close();
      await Deno.writeFile(`${dir}/model.raw`, model);
      await assertCheckClean(made);
      await assertSame(`${dir}/model.raw`, made);

      // compat 0.10 has no compression type: refused as qemu-img does.
      r = await cli([
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,compression_type=zstd",
        `${dir}/old.qcow2`,
        "1M",
      ]);
      assertTrue(r.code !== 0, r.text);
      assertTrue(/compat/.test(r.stderr), r.stderr);
    }),
);

/** createFile for images at `dir`: files made there, kept to commit. */
function filesIn(dir: string) {
  const made: OutputFile[] = [];
  return {
    createFile: async (name: string) => {
      const out = await createOutputFile(`${dir}/${name}`);
      made.push(out);
      return out;
    },
    commit: async () => {
      for (const out of made) await out.commit();
    },
  };
}

const DATA_FILE_CASES: Record<string, string>[] = [
  {},
  { data_file_raw: "on" },
  { cluster_size: "512", refcount_bits: "1" },
  { extended_l2: "on", data_file_raw: "on" },
  { preallocation: "metadata", cluster_size: "4k" },
];

for (const extra of DATA_FILE_CASES) {
  const dataRaw = extra.data_file_raw === "on";
  Deno.test(
    `qcow2 convert -o data_file ${
      JSON.stringify(extra)
    }: the data file holds the guest data at guest offsets; qemu-img and our reader read it`,
    { ignore: skip(QEMU) },
    () =>
      withTemp(async (dir) => {
        const disk = await realDisk(3 << 20);
        disk.fill(0, 1 << 20, 2 << 20); // a zero run: unallocated, or mapped
        const raw = `${dir}/disk.raw`;
        await Deno.writeFile(raw, disk);
        const path = `${dir}/d.qcow2`;
        const sink = await createOutputFile(path);
        const files = filesIn(dir);
        await convert(await open(fromBytes(disk)), sink, {
          format: "qcow2",
          options: { data_file: "d.data", ...extra },
          createFile: files.createFile,
        });
        await sink.commit();
        await files.commit();
        // qemu opens a relative data file from its working folder.
        await assertCheckClean(path, dir);
        await assertSame(raw, path, dir);
        const i = await info(path, dir);
        assertEquals(i["format-specific"].data["data-file"], "d.data");
        assertEquals(i["format-specific"].data["data-file-raw"], dataRaw);
        const map = JSON.parse(
          (await run("qemu-img", ["map", "--output=json", path], { cwd: dir }))
            .text,
        ) as { start: number; length: number; offset?: number }[];
        for (const e of map) {
          if (e.offset !== undefined) assertEquals(e.offset, e.start);
        }
        // The data file is the disk (raw: every byte; else where mapped).
        const data = await Deno.readFile(`${dir}/d.data`);
        assertEquals(data.length, Math.ceil(disk.length / 512) * 512);
        if (dataRaw) {
          assertEquals(
            sha256Hex(data.subarray(0, disk.length)),
            sha256Hex(disk),
          );
        }
        // The qcow2 file holds only metadata.
        assertTrue((await Deno.stat(path)).size < 1 << 20);
        const image = await open(await fromFile(path), {
          resolveFile: fileResolver(path),
        });
        assertEquals(
          sha256Hex(await image.read(0, disk.length)),
          sha256Hex(disk),
        );
        await image.close?.();
        // Writable opens of such an image are refused by name.
        const file = await fromFile(path, { write: true });
        await rejects(
          () =>
            open(file, {
              writable: true,
              sink: file,
              resolveFile: fileResolver(path),
            }),
          UnsupportedError,
          /external data file/,
        );
        await file.close();
      }),
  );
}

Deno.test(
  "qcow2 cli: create -o data_file[,data_file_raw=on] makes both files as qemu-img does; qemu-io writes go to the data file",
  { ignore: skip(QEMU) },
  () =>
    withTemp(async (dir) => {
      for (const dataRaw of [false, true]) {
        const name = `c-${dataRaw}`;
        const path = `${dir}/${name}.qcow2`;
        const r = await cli([
          "create",
          "-f",
          "qcow2",
          "-o",
          `data_file=${name}.data${dataRaw ? ",data_file_raw=on" : ""}`,
          path,
          "3M",
        ]);
        assertEquals(r.code, 0, r.stderr);
        assertEquals((await Deno.stat(`${dir}/${name}.data`)).size, 3 << 20);
        await assertCheckClean(path, dir);
        const map = JSON.parse(
          (await run("qemu-img", ["map", "--output=json", path], { cwd: dir }))
            .text,
        ) as { present: boolean }[];
        assertEquals(map.every((e) => e.present), dataRaw);
        await run("qemu-io", [
          "-f",
          "qcow2",
          "-c",
          "write -P 0x5a 64k 100k",
          path,
        ], { cwd: dir });
        await assertCheckClean(path, dir);
        const model = new Uint8Array(3 << 20);
        model.fill(0x5a, 64 << 10, (64 + 100) << 10);
        await Deno.writeFile(`${dir}/model.raw`, model);
        await assertSame(`${dir}/model.raw`, path, dir);
        assertEquals(
          sha256Hex(await Deno.readFile(`${dir}/${name}.data`)),
          sha256Hex(model),
        );
        const image = await open(await fromFile(path), {
          resolveFile: fileResolver(path),
        });
        assertEquals(
          sha256Hex(await image.read(0, image.size)),
          sha256Hex(model),
        );
        await image.close?.();
        // Our write command refuses it clearly, leaving it as it was.
        await Deno.writeFile(`${dir}/in.bin`, new Uint8Array(512).fill(1));
        const w = await cli(["write", path, "0", `${dir}/in.bin`]);
        assertTrue(w.code !== 0, w.text);
        assertTrue(/external data file/.test(w.stderr), w.stderr);
        await assertSame(`${dir}/model.raw`, path, dir);
      }
      // Through the API, create with a data file and no way to make it.
      const sink = await createOutputFile(`${dir}/x.qcow2`);
      await rejects(
        () =>
          create("qcow2", sink, {
            size: 1 << 20,
            options: { data_file: "x.data" },
          }),
        UnsupportedError,
        /createFile/,
      );
      await sink.abort();
    }),
);
