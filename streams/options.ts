/**
 * The one check of a format's write options (`-o NAME=VALUE`), and the
 * listing `-o help` prints, both from the driver's
 * {@linkcode Driver.writeOptions}.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { OptionError } from "./errors.ts";
import type { Driver, OptionSpec } from "./types.ts";

/**
 * Refuses options `format` does not have, values outside an option's fixed
 * set, and `compress` for a format that cannot compress, with an
 * {@linkcode OptionError} naming the option and what is accepted. Values
 * with no fixed set are the driver's to check.
 *
 * @param format the driver the options are for
 * @param options the options as given (`-o` parsed)
 * @param compress whether compression was asked for (`convert -c`)
 *
 * @example
 * ```ts
 * import { checkWriteOptions, driver } from "../mod.ts";
 * checkWriteOptions(driver("vpc"), { subformat: "fixed" }); // fine
 * try {
 *   checkWriteOptions(driver("vpc"), { subformt: "fixed" });
 * } catch (e) {
 *   console.log((e as Error).message);
 *   // vpc: unknown option 'subformt' (valid: subformat, force_size)
 * }
 * ```
 */
export function checkWriteOptions(
  format: Driver,
  options: Record<string, string> | undefined,
  compress = false,
): void {
  const specs = format.writeOptions ?? [];
  for (const [name, value] of Object.entries(options ?? {})) {
    const spec = specs.find((s) => s.name === name);
    if (!spec) {
      throw new OptionError({
        format: format.name,
        option: name,
        expected: specs.length
          ? specs.map((s) => s.name).join(", ")
          : `none: ${format.name} takes no -o options`,
      });
    }
    if (spec.values && !spec.values.includes(value)) {
      throw new OptionError({
        format: format.name,
        option: name,
        value,
        expected: `one of ${spec.values.join(", ")}`,
      });
    }
  }
  if (compress && !format.compresses) {
    throw new OptionError(
      { format: format.name, option: "compress", value: "on", expected: "" },
      `${format.name}: this format does not support compression (-c)`,
    );
  }
}

/**
 * The text `-o help` prints for `format`: each write option with its
 * values and default, as qemu-img lists its options.
 *
 * @param format the driver
 * @returns lines of text, ending with a newline
 *
 * @example
 * ```ts
 * import { driver, writeOptionsHelp } from "../mod.ts";
 * console.log(writeOptionsHelp(driver("vpc")));
 * ```
 */
export function writeOptionsHelp(format: Driver): string {
  const specs: readonly OptionSpec[] = format.writeOptions ?? [];
  const head = `Supported options for ${format.name}:\n`;
  if (!specs.length) return head + "  (none)\n";
  const width = Math.max(...specs.map((s) => s.name.length));
  const rows = specs.map((s) => {
    const takes = s.values ? s.values.join("|") : s.accepts;
    const extras = [
      takes ? `values: ${takes}` : "",
      s.default !== undefined ? `default: ${s.default}` : "",
    ].filter(Boolean).join("; ");
    return `  ${s.name.padEnd(width)}  ${s.help}${
      extras ? ` (${extras})` : ""
    }`;
  });
  return head + rows.join("\n") + "\n";
}

/**
 * A maker of {@linkcode OptionError}s for one format's option values that
 * no fixed set describes (sizes, counts), so a driver spells each check in
 * one line.
 *
 * @param format the format's name
 * @returns `(option, value, expected) => OptionError`
 *
 * @example
 * ```ts
 * import { optionErrors } from "../mod.ts";
 * const optionFail = optionErrors("cloop");
 * console.log(optionFail("block_size", "1000", "a multiple of 512").message);
 * // cloop: option block_size=1000 is invalid: must be a multiple of 512
 * ```
 */
export function optionErrors(
  format: string,
): (option: string, value: unknown, expected: string) => OptionError {
  return (option, value, expected) =>
    new OptionError({
      format,
      option,
      value: value === undefined ? "" : String(value),
      expected,
    });
}
