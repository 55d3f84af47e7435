/**
 * The start of every `check`: a {@linkcode CheckResult} with nothing
 * found yet, shared by the qcow2, qed and vdi checks.
 *
 * This module is browser compatible.
 *
 * @module
 */

import type { CheckResult } from "./qcow2/check.ts";

/**
 * A check result with every count zero and no messages.
 *
 * @param format the format checked (qemu-img's `format`)
 * @param totalClusters clusters (or blocks) of the virtual disk
 * @returns a fresh result to count into
 *
 * @example
 * ```ts
 * import { emptyCheckResult } from "./_check.ts";
 * const r = emptyCheckResult("vdi");
 * console.log(r.corruptions, r.messages.length); // 0 0
 * ```
 */
export function emptyCheckResult(
  format: string,
  totalClusters = 0,
): CheckResult {
  return {
    format,
    checkErrors: 0,
    corruptions: 0,
    leaks: 0,
    leaksFixed: 0,
    corruptionsFixed: 0,
    imageEndOffset: 0,
    totalClusters,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    messages: [],
  };
}
