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
import { vpc } from "./vpc.ts";
import { vmdk } from "./vmdk.ts";
import { dmg } from "./dmg.ts";
import { qcow } from "./qcow.ts";
import { qcow2 } from "./qcow2.ts";
import { cow } from "./cow.ts";
import { vvfat } from "./vvfat.ts";
import { raw } from "./raw.ts";

/** Every driver, raw last. */
export const DRIVERS: readonly Driver[] = [
  cloop,
  vpc,
  bochs,
  vmdk,
  dmg,
  qcow,
  qcow2,
  cow,
  vvfat,
  raw,
];
