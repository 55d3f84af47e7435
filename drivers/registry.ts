/**
 * The registry: which formats exist, probing by score, opening (with the
 * caller's backing-file policy) and creating.
 *
 * Probing, opening and creating live in `_registry.ts` and load each
 * driver when it is chosen; the lists here (`formats`, `driver`) hold
 * every driver, loaded.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { DRIVERS } from "./all.ts";
import { formatEntry } from "./_catalog.ts";
import type { Driver } from "../streams/types.ts";

export * from "./_registry.ts";
export { loadDriver } from "./_catalog.ts";

/** Options for {@linkcode formats}. */
export interface FormatsOptions {
  /**
   * Include the formats only recognised by their signature (refused by
   * name when opened; `Driver.recognisedOnly`).
   * @default false
   */
  recognised?: boolean;
}

/**
 * The formats the toolkit reads (and, with `recognised`, those it only
 * recognises and refuses by name).
 *
 * @param options whether to include the recognised-only formats
 * @returns the drivers, in probing order
 *
 * @example
 * ```ts
 * import { formats } from "../mod.ts";
 * console.log(formats().map((d) => d.name).includes("raw")); // true
 * console.log(formats({ recognised: true }).some((d) => d.name === "vhdx")); // true
 * ```
 */
export function formats(options: FormatsOptions = {}): readonly Driver[] {
  return options.recognised
    ? DRIVERS
    : DRIVERS.filter((d) => !d.recognisedOnly);
}

/**
 * The driver named `name`, or an {@linkcode UnknownFormatError}.
 *
 * @param name a format name as `-f` takes it
 * @returns the driver
 *
 * @example
 * ```ts
 * import { driver } from "../mod.ts";
 * console.log(driver("raw").description);
 * ```
 */
export function driver(name: string): Driver {
  // The catalog names the same formats as DRIVERS, in the same order
  // (tests/probe_test.ts checks): its entry, or its unknown-format error.
  const { name: known } = formatEntry(name);
  return DRIVERS.find((d) => d.name === known)!;
}
