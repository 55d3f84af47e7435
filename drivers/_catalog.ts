/**
 * The registry's list of formats without the drivers: each entry is a name,
 * the driver's probe (from `_signatures.ts`, no driver code behind it) and
 * a `load` that imports the driver's module when the format is chosen. A
 * `convert` of one format so loads one driver, not all of them
 * (`drivers/all.ts`, which `mod.ts` imports, still has every driver).
 *
 * The order, the names and the probes are those of `DRIVERS` in
 * `drivers/all.ts` (tests/probe_test.ts checks it): probing by either list
 * gives the same answers.
 *
 * This module is browser compatible. The bundle (`dist/mod.js`) imports
 * every driver statically through `mod.ts`, so each `load` there resolves
 * to code already in the bundle.
 *
 * @module
 */

import type { Driver, ProbeInput } from "../streams/types.ts";
import { UnknownFormatError } from "../streams/errors.ts";
import {
  probeAsif,
  probeBochs,
  probeCloop,
  probeCow,
  probeDiskcopy42,
  probeDmg,
  probeDmgEncrypted,
  probeParallels,
  probeQcow,
  probeQcow2,
  probeQed,
  probeRaw,
  probeSeSparse,
  probeSparsebundle,
  probeSparseimage,
  probeVdi,
  probeVhdx,
  probeVmdk,
  probeVpc,
  probeVvfat,
} from "./_signatures.ts";
import { RECOGNISED } from "./recognised.ts";

/** One format as the registry knows it before its driver is loaded. */
export interface FormatEntry {
  /** The driver's name, as `-f`/`-O` take it. */
  readonly name: string;
  /** The driver's probe (the same function as `Driver.probe`, or with a recogniser's signature added). */
  probe(input: ProbeInput): number;
  /** True for a format only recognised by its signature (its `load` is free). */
  readonly recognisedOnly?: boolean;
  /** Imports the driver's module (once: later calls answer the same driver). */
  load(): Promise<Driver>;
}

/** Anything with a name and a probe: a driver or a catalog entry. */
interface Probed {
  readonly name: string;
  probe(input: ProbeInput): number;
}

/**
 * The readers, then the recognisers of formats none of them reads, then
 * `last` (raw). A recogniser whose name a reader also has is dropped, and
 * its signature is added to that reader's probe (the larger score wins),
 * so that adding a driver for a recognised format is one entry, and no
 * file the recogniser claimed ever falls through to raw because the new
 * driver's probe is stricter.
 *
 * @param readers the reading drivers (or their entries), in probing order
 * @param recognised the recognisers
 * @param last what scores lowest (raw)
 * @returns the merged list
 *
 * @example
 * ```ts
 * import { withRecognised } from "./_catalog.ts";
 * import { raw } from "./raw.ts";
 * import { RECOGNISED } from "./recognised.ts";
 * const names = withRecognised([], RECOGNISED, raw).map((d) => d.name);
 * console.log(names.includes("qcow2"), names.at(-1)); // true raw
 * ```
 */
export function withRecognised<R extends Probed, S extends Probed>(
  readers: readonly R[],
  recognised: readonly S[],
  last: R | S,
): (R | S)[] {
  const merged = readers.map((reader) => {
    const signature = recognised.find((r) => r.name === reader.name);
    if (!signature) return reader;
    return {
      ...reader,
      probe: (input: ProbeInput) =>
        Math.max(reader.probe(input), signature.probe(input)),
    };
  });
  const rest = recognised.filter((r) =>
    !readers.some((reader) => reader.name === r.name)
  );
  return [...merged, ...rest, last];
}

/** An entry whose driver is imported on first `load`. */
function lazy(
  name: string,
  probe: (input: ProbeInput) => number,
  importer: () => Promise<Driver>,
): FormatEntry {
  let loading: Promise<Driver> | undefined;
  return {
    name,
    probe,
    load: () => loading ??= importer(),
  };
}

/**
 * The reading drivers, in the order of `drivers/all.ts` (which is the
 * probing order for equal scores). Each specifier is a literal, so that
 * `deno bundle` and `deno compile` see every driver.
 */
const READERS: readonly FormatEntry[] = [
  lazy("cloop", probeCloop, () => import("./cloop.ts").then((m) => m.cloop)),
  lazy("vpc", probeVpc, () => import("./vpc.ts").then((m) => m.vpc)),
  lazy("bochs", probeBochs, () => import("./bochs.ts").then((m) => m.bochs)),
  lazy("vdi", probeVdi, () => import("./vdi.ts").then((m) => m.vdi)),
  lazy("vhdx", probeVhdx, () => import("./vhdx.ts").then((m) => m.vhdx)),
  lazy("qed", probeQed, () => import("./qed.ts").then((m) => m.qed)),
  lazy(
    "parallels",
    probeParallels,
    () => import("./parallels.ts").then((m) => m.parallels),
  ),
  lazy(
    "seSparse",
    probeSeSparse,
    () => import("./sesparse.ts").then((m) => m.seSparse),
  ),
  lazy("vmdk", probeVmdk, () => import("./vmdk.ts").then((m) => m.vmdk)),
  lazy("dmg", probeDmg, () => import("./dmg.ts").then((m) => m.dmg)),
  lazy(
    "dmg-encrypted",
    probeDmgEncrypted,
    () => import("./dmg_encrypted.ts").then((m) => m.dmgEncrypted),
  ),
  lazy("qcow", probeQcow, () => import("./qcow.ts").then((m) => m.qcow)),
  lazy("qcow2", probeQcow2, () => import("./qcow2.ts").then((m) => m.qcow2)),
  lazy("cow", probeCow, () => import("./cow.ts").then((m) => m.cow)),
  lazy("vvfat", probeVvfat, () => import("./vvfat.ts").then((m) => m.vvfat)),
  lazy(
    "sparseimage",
    probeSparseimage,
    () => import("./sparseimage.ts").then((m) => m.sparseimage),
  ),
  lazy(
    "diskcopy42",
    probeDiskcopy42,
    () => import("./diskcopy42.ts").then((m) => m.diskcopy42),
  ),
  lazy("asif", probeAsif, () => import("./asif.ts").then((m) => m.asif)),
  lazy(
    "sparsebundle",
    probeSparsebundle,
    () => import("./sparsebundle.ts").then((m) => m.sparsebundle),
  ),
];

/** Every format: the readers, the recognisers of other formats, raw last. */
export const CATALOG: readonly FormatEntry[] = withRecognised<
  FormatEntry,
  FormatEntry
>(
  READERS,
  RECOGNISED.map((d) => ({
    name: d.name,
    probe: d.probe,
    recognisedOnly: d.recognisedOnly,
    load: () => Promise.resolve(d),
  })),
  lazy("raw", probeRaw, () => import("./raw.ts").then((m) => m.raw)),
);

/**
 * The catalog entry named `name`, or an {@linkcode UnknownFormatError}
 * listing the known names.
 *
 * @param name a format name as `-f` takes it
 * @returns the entry
 *
 * @example
 * ```ts
 * import { formatEntry } from "./_catalog.ts";
 * console.log(formatEntry("qcow2").name); // qcow2
 * ```
 */
export function formatEntry(name: string): FormatEntry {
  const found = CATALOG.find((d) => d.name === name);
  if (!found) {
    throw new UnknownFormatError(
      `unknown format '${name}' (known: ${
        CATALOG.map((d) => d.name).join(", ")
      })`,
      name,
    );
  }
  return found;
}

/**
 * The driver named `name`, its module imported on first use, or an
 * {@linkcode UnknownFormatError}.
 *
 * @param name a format name as `-f` takes it
 * @returns the driver
 *
 * @example
 * ```ts
 * import { loadDriver } from "../mod.ts";
 * console.log((await loadDriver("qcow2")).compresses); // true
 * ```
 */
export async function loadDriver(name: string): Promise<Driver> {
  return await formatEntry(name).load();
}
