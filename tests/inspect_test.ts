/**
 * What the CLI prints for info, map and compare comes from the library
 * (issue 17): scripts, workers and the service get the same answers.
 */
import { assertEquals } from "./_asserts.ts";
import {
  describeImage,
  fileBackingResolver,
  firstDifference,
  formatInfo,
  fromBytes,
  fromFile,
  layers,
  mapChain,
  open,
} from "../mod.ts";
import { cli, pseudoRandom, run, skip, withTemp } from "./_helpers.ts";

Deno.test("formatInfo(describeImage(...)) is what info prints, for one image and for each layer of a chain", async () => {
  await withTemp(async (dir) => {
    await Deno.writeFile(`${dir}/base.raw`, pseudoRandom(1 << 20, 4));
    assertEquals(
      (await cli([
        "create",
        "-f",
        "qcow",
        "-b",
        "base.raw",
        `${dir}/top.qcow`,
        "1M",
      ])).code,
      0,
    );
    await Deno.writeFile(`${dir}/data.bin`, pseudoRandom(70_000, 5));
    const wrote = await cli([
      "write",
      `${dir}/top.qcow`,
      "4096",
      `${dir}/data.bin`,
    ]);
    assertEquals(wrote.code, 0, wrote.stderr);
    const path = `${dir}/top.qcow`;
    const file = await fromFile(path);
    const image = await open(file);
    const text = formatInfo(
      await describeImage(image, {
        filename: path,
        actualSize: await file.allocatedBytes(),
      }),
    );
    assertEquals((await cli(["info", path])).text, text);
    await image.close?.();
    const chain = await open(await fromFile(path), {
      resolveBacking: fileBackingResolver(path),
    });
    assertEquals(layers(chain).map((l) => l.format), ["qcow", "raw"]);
    await chain.close?.();
  });
});

Deno.test({
  name:
    "mapChain gives qemu-img map's depths for a chain, and firstDifference what compare reports",
  ignore: skip(["qemu-img", "qemu-io"]),
  async fn() {
    await withTemp(async (dir) => {
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "raw",
        `${dir}/base.raw`,
        "4M",
      ]);
      await run("qemu-io", [
        "-f",
        "raw",
        "-c",
        "write -P 1 0 1M",
        `${dir}/base.raw`,
      ]);
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        "base.raw",
        "-F",
        "raw",
        `${dir}/top.qcow`,
        "4M",
      ]);
      await run("qemu-io", [
        "-f",
        "qcow",
        "-c",
        "write -P 2 2M 64k",
        `${dir}/top.qcow`,
      ]);
      const path = `${dir}/top.qcow`;
      const chain = await open(await fromFile(path), {
        resolveBacking: fileBackingResolver(path),
      });
      const ours = [];
      for await (const run of mapChain(chain)) {
        if (run.kind === "data") ours.push([run.offset, run.length, run.depth]);
      }
      const theirs = (JSON.parse(
        (await run("qemu-img", ["map", "--output=json", path])).text,
      ) as { start: number; length: number; depth: number; data: boolean }[])
        .filter((e) => e.data).map((e) => [e.start, e.length, e.depth]);
      assertEquals(ours, theirs);
      const plain = await open(
        fromBytes(await Deno.readFile(`${dir}/base.raw`)),
      );
      assertEquals(await firstDifference(chain, plain), 2 << 20);
      assertEquals(await firstDifference(plain, plain), undefined);
      await chain.close?.();
    });
  },
});
