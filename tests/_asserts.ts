// The roles of @std/assert (JSR is unreachable here), filled by node:assert.
import assert from "node:assert/strict";

/**
 * Deep equality (typed arrays compared byte by byte). Two byte arrays are
 * compared here, and a failure names the first differing byte: node's diff
 * of two multi-MiB arrays takes gigabytes.
 */
export function assertEquals<T>(actual: T, expected: T, message?: string) {
  if (actual instanceof Uint8Array && expected instanceof Uint8Array) {
    const n = Math.min(actual.length, expected.length);
    let i = 0;
    while (i < n && actual[i] === expected[i]) i++;
    if (i === n && actual.length === expected.length) return;
    throw new assert.AssertionError({
      message:
        `${message ? `${message}: ` : ""}byte arrays differ at byte ${i} ` +
        `(lengths ${actual.length} and ${expected.length}; ` +
        `${actual[i]} !== ${expected[i]})`,
      actual: actual.length,
      expected: expected.length,
      operator: "assertEquals",
    });
  }
  assert.deepStrictEqual(actual, expected, message);
}

/** Truthiness. */
export function assertTrue(value: unknown, message?: string): asserts value {
  assert.ok(value, message);
}

/** String or regexp match. */
export function assertMatch(actual: string, pattern: RegExp, message?: string) {
  assert.match(actual, pattern, message);
}
