/**
 * The list of drivers the registry knows, in probing order for equal
 * scores. Adding a format is one import and one entry here.
 *
 * This module is browser compatible.
 *
 * @module
 */

import type { Driver } from "../streams/types.ts";
import { cloop } from "./cloop.ts";
import { bochs } from "./bochs.ts";
import { vdi } from "./vdi.ts";
import { vhdx } from "./vhdx.ts";
import { qed } from "./qed.ts";
import { parallels } from "./parallels.ts";
import { seSparse } from "./sesparse.ts";
import { vpc } from "./vpc.ts";
import { vmdk } from "./vmdk.ts";
import { dmg } from "./dmg.ts";
import { dmgEncrypted } from "./dmg_encrypted.ts";
import { qcow } from "./qcow.ts";
import { qcow2 } from "./qcow2.ts";
import { cow } from "./cow.ts";
import { vvfat } from "./vvfat.ts";
import { sparseimage } from "./sparseimage.ts";
import { diskcopy42 } from "./diskcopy42.ts";
import { asif } from "./asif.ts";
import { sparsebundle } from "./sparsebundle.ts";
import { raw } from "./raw.ts";
import { RECOGNISED } from "./recognised.ts";

/**
 * The drivers that read, then the recognisers of formats none of them
 * reads, then `raw`. A recogniser whose name a reading driver also has is
 * dropped, and its signature is added to that driver's probe (the larger
 * score wins), so that adding a driver for a recognised format is one
 * import and one entry here, and no file the recogniser claimed ever
 * falls through to raw because the new driver's probe is stricter.
 *
 * @example
 * ```ts
 * import { withRecognised } from "./all.ts";
 * import { raw } from "./raw.ts";
 * import { RECOGNISED } from "./recognised.ts";
 * const names = withRecognised([], RECOGNISED, raw).map((d) => d.name);
 * console.log(names.includes("qcow2"), names.at(-1)); // true raw
 * ```
 */
export function withRecognised(
  readers: readonly Driver[],
  recognised: readonly Driver[],
  last: Driver,
): Driver[] {
  const merged = readers.map((reader) => {
    const signature = recognised.find((r) => r.name === reader.name);
    if (!signature) return reader;
    return {
      ...reader,
      probe: (input) => Math.max(reader.probe(input), signature.probe(input)),
    } satisfies Driver;
  });
  const rest = recognised.filter((r) =>
    !readers.some((reader) => reader.name === r.name)
  );
  return [...merged, ...rest, last];
}

/** The drivers that read, in probing order for equal scores. */
const READERS: readonly Driver[] = [
  cloop,
  vpc,
  bochs,
  vdi,
  vhdx,
  qed,
  parallels,
  seSparse,
  vmdk,
  dmg,
  dmgEncrypted,
  qcow,
  qcow2,
  cow,
  vvfat,
  sparseimage,
  diskcopy42,
  asif,
  sparsebundle,
];

/** Every driver: the readers, the recognisers of other formats, raw last. */
export const DRIVERS: readonly Driver[] = withRecognised(
  READERS,
  RECOGNISED,
  raw,
);
