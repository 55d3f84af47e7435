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
import { withRecognised } from "./_catalog.ts";

// The merge of readers and recognisers is the catalog's (the lazy list of
// the same formats), so both lists come out the same.
export { withRecognised };

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
export const DRIVERS: readonly Driver[] = withRecognised<Driver, Driver>(
  READERS,
  RECOGNISED,
  raw,
);
