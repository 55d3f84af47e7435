// The roles of @std/assert (JSR is unreachable here), filled by node:assert.
import assert from "node:assert/strict";

/** Deep equality (typed arrays compared byte by byte). */
export function assertEquals<T>(actual: T, expected: T, message?: string) {
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
