/**
 * Which hosts the conversion service may reach: IP addresses parsed in
 * every form a URL or a resolver can give them, then classified.
 *
 * An address is normalised before it is checked: IPv4 written as one
 * number, in hex or octal parts, or short (`127.1`); IPv6 with `::`
 * anywhere, with a dotted IPv4 tail, in brackets, with a zone (`%eth0`).
 * IPv6 addresses that carry an IPv4 address (IPv4-mapped `::ffff:0:0/96`,
 * IPv4-translated `::ffff:0:0:0/96`, IPv4-compatible `::/96`, NAT64
 * `64:ff9b::/96`, 6to4 `2002::/16`) are judged by that IPv4 address.
 *
 * This module is browser compatible.
 *
 * @module
 */

/** A special-purpose range: its prefix and what it is. */
interface Range {
  bytes: number[];
  bits: number;
  name: string;
}

const range = (bytes: number[], bits: number, name: string): Range => ({
  bytes,
  bits,
  name,
});

/** IPv4 ranges that are not the public internet (RFC 6890 and others). */
const V4_RANGES: Range[] = [
  range([0], 8, "this network 0.0.0.0/8"),
  range([10], 8, "private 10.0.0.0/8"),
  range([100, 64], 10, "shared (CGNAT) 100.64.0.0/10"),
  range([127], 8, "loopback 127.0.0.0/8"),
  range([169, 254], 16, "link-local 169.254.0.0/16"),
  range([172, 16], 12, "private 172.16.0.0/12"),
  range([192, 0, 0], 24, "IETF protocol assignments 192.0.0.0/24"),
  range([192, 0, 2], 24, "documentation 192.0.2.0/24"),
  range([192, 88, 99], 24, "6to4 relay anycast 192.88.99.0/24"),
  range([192, 168], 16, "private 192.168.0.0/16"),
  range([198, 18], 15, "benchmarking 198.18.0.0/15"),
  range([198, 51, 100], 24, "documentation 198.51.100.0/24"),
  range([203, 0, 113], 24, "documentation 203.0.113.0/24"),
  range([224], 4, "multicast 224.0.0.0/4"),
  range([240], 4, "reserved 240.0.0.0/4 (and broadcast)"),
];

/** IPv6 ranges that are neither public nor carry an IPv4 address checked on its own. */
const V6_RANGES: Range[] = [
  range([0x01, 0x00, 0, 0, 0, 0, 0, 0], 64, "discard-only 100::/64"),
  range([0x00, 0x64, 0xff, 0x9b, 0x00, 0x01], 48, "local NAT64 64:ff9b:1::/48"),
  range([0x20, 0x01, 0x00, 0x00], 32, "Teredo 2001::/32"),
  range([0x20, 0x01, 0x00, 0x02, 0, 0], 48, "benchmarking 2001:2::/48"),
  range([0x20, 0x01, 0x0d, 0xb8], 32, "documentation 2001:db8::/32"),
  range([0x20, 0x01, 0x00, 0x10], 28, "ORCHID 2001:10::/28"),
  range([0x3f, 0xff], 20, "documentation 3fff::/20"),
  range([0x5f, 0x00], 8, "segment routing 5f00::/8"),
  range([0xfc], 7, "unique local fc00::/7"),
  range([0xfe, 0x80], 10, "link-local fe80::/10"),
  range([0xfe, 0xc0], 10, "site-local fec0::/10"),
  range([0xff], 8, "multicast ff00::/8"),
];

function inRange(address: Uint8Array, r: Range): boolean {
  let bits = r.bits;
  for (let i = 0; bits > 0; i++, bits -= 8) {
    const mask = bits >= 8 ? 0xff : (0xff << (8 - bits)) & 0xff;
    if ((address[i] & mask) !== ((r.bytes[i] ?? 0) & mask)) return false;
  }
  return true;
}

/**
 * Parses an IPv4 address as the WHATWG URL parser and `inet_aton` read
 * it: one to four parts, each decimal, `0x` hex or `0` octal, the last
 * filling the remaining bytes (`127.1`, `2130706433`, `0x7f.0.0.1`).
 *
 * @param text the address (a trailing dot is allowed)
 * @returns its four bytes, or undefined when it is not an IPv4 address
 *
 * @example
 * ```ts
 * import { parseIPv4 } from "./_address.ts";
 * console.log(parseIPv4("0x7f.1")); // Uint8Array(4) [ 127, 0, 0, 1 ]
 * ```
 */
export function parseIPv4(text: string): Uint8Array | undefined {
  const parts = text.replace(/\.$/, "").split(".");
  if (parts.length === 0 || parts.length > 4) return undefined;
  const numbers: number[] = [];
  for (const part of parts) {
    let value: number;
    if (/^0x[0-9a-f]*$/i.test(part)) {
      value = part.length === 2 ? 0 : parseInt(part.slice(2), 16);
    } else if (/^0[0-7]+$/.test(part)) value = parseInt(part.slice(1), 8);
    else if (/^(0|[1-9][0-9]*)$/.test(part)) value = Number(part);
    else return undefined;
    if (!Number.isSafeInteger(value)) return undefined;
    numbers.push(value);
  }
  const last = numbers.pop()!;
  if (numbers.some((n) => n > 255)) return undefined;
  if (last >= 256 ** (4 - numbers.length)) return undefined;
  const out = new Uint8Array(4);
  numbers.forEach((n, i) => out[i] = n);
  for (let i = 3, rest = last; i >= numbers.length; i--) {
    out[i] = rest % 256;
    rest = Math.floor(rest / 256);
  }
  return out;
}

/**
 * Parses an IPv6 address: `::` anywhere, a dotted IPv4 tail, brackets and a
 * zone (`fe80::1%eth0`) allowed.
 *
 * @param text the address
 * @returns its sixteen bytes, or undefined when it is not an IPv6 address
 *
 * @example
 * ```ts
 * import { parseIPv6 } from "./_address.ts";
 * console.log(parseIPv6("[::ffff:127.0.0.1]")?.subarray(10)); // ff ff 7f 00 00 01
 * ```
 */
export function parseIPv6(text: string): Uint8Array | undefined {
  let h = text.replace(/^\[(.*)\]$/, "$1").replace(/%.*$/, "").toLowerCase();
  if (!h.includes(":")) return undefined;
  // A dotted IPv4 tail is the last two words, written another way.
  const tail = /(^|:)(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(h);
  if (tail) {
    const v4 = tail.slice(2).map(Number);
    if (v4.some((n, i) => n > 255 || String(n) !== tail[i + 2])) {
      return undefined;
    }
    const hex = (hi: number, lo: number) => ((hi << 8) | lo).toString(16);
    h = h.slice(0, tail.index + tail[1].length) + hex(v4[0], v4[1]) + ":" +
      hex(v4[2], v4[3]);
  }
  const halves = h.split("::");
  if (halves.length > 2) return undefined;
  const parse = (s: string) =>
    s === ""
      ? []
      : s.split(":").map((w) =>
        /^[0-9a-f]{1,4}$/.test(w) ? parseInt(w, 16) : NaN
      );
  const head = parse(halves[0]);
  const rest = halves.length === 2 ? parse(halves[1]) : [];
  if ([...head, ...rest].some(Number.isNaN)) return undefined;
  const given = head.length + rest.length;
  let words: number[];
  if (halves.length === 2) {
    if (given > 7) return undefined;
    words = [...head, ...new Array(8 - given).fill(0), ...rest];
  } else {
    if (given !== 8) return undefined;
    words = head;
  }
  const out = new Uint8Array(16);
  words.forEach((w, i) => {
    out[2 * i] = w >> 8;
    out[2 * i + 1] = w & 0xff;
  });
  return out;
}

const dotted = (b: Uint8Array) => Array.from(b).join(".");

/** Why an IPv4 address is not public, or undefined when it is. */
function v4Range(address: Uint8Array): string | undefined {
  return V4_RANGES.find((r) => inRange(address, r))?.name;
}

/** The IPv4 address an IPv6 address carries, and how. */
function embeddedV4(
  a: Uint8Array,
): { v4: Uint8Array; how: string } | undefined {
  const zeros = (from: number, to: number) =>
    a.subarray(from, to).every((b) => b === 0);
  if (zeros(0, 10) && a[10] === 0xff && a[11] === 0xff) {
    return { v4: a.subarray(12), how: "IPv4-mapped ::ffff:0:0/96" };
  }
  if (zeros(0, 8) && a[8] === 0xff && a[9] === 0xff && zeros(10, 12)) {
    return { v4: a.subarray(12), how: "IPv4-translated ::ffff:0:0:0/96" };
  }
  if (zeros(0, 12)) {
    return { v4: a.subarray(12), how: "IPv4-compatible ::/96" };
  }
  if (
    a[0] === 0x00 && a[1] === 0x64 && a[2] === 0xff && a[3] === 0x9b &&
    zeros(4, 12)
  ) {
    return { v4: a.subarray(12), how: "NAT64 64:ff9b::/96" };
  }
  if (a[0] === 0x20 && a[1] === 0x02) {
    return { v4: a.subarray(2, 6), how: "6to4 2002::/16" };
  }
  return undefined;
}

/**
 * Why `host` must not be reached by a service that refuses internal
 * addresses: the special range it lies in, named (`loopback 127.0.0.0/8`,
 * `loopback 127.0.0.0/8, as 127.0.0.1 in IPv4-mapped ::ffff:0:0/96`), or undefined for a
 * public address or a name. `localhost` and names under `.localhost` are
 * loopback by definition (RFC 6761) whatever a resolver says.
 *
 * @param host a URL's hostname (brackets allowed) or a resolver's answer
 * @returns the reason, or undefined
 *
 * @example
 * ```ts
 * import { privateRange } from "./_address.ts";
 * console.log(privateRange("[::ffff:7f00:1]"));
 * // loopback 127.0.0.0/8, as 127.0.0.1 in IPv4-mapped ::ffff:0:0/96
 * console.log(privateRange("93.184.216.34")); // undefined
 * ```
 */
export function privateRange(host: string): string | undefined {
  const h = host.toLowerCase().replace(/\.+$/, "");
  if (h === "localhost" || h.endsWith(".localhost")) {
    return "loopback name localhost (RFC 6761)";
  }
  const v4 = parseIPv4(h);
  if (v4) return v4Range(v4);
  const v6 = parseIPv6(h);
  if (!v6) {
    // Not a name either: something only an address parser could mean.
    if (h.includes(":") || /^[0-9.]+$|^0x[0-9a-fx.]*$/.test(h)) {
      return "not a well-formed address";
    }
    return undefined;
  }
  if (v6.every((b) => b === 0)) return "unspecified ::";
  if (v6.subarray(0, 15).every((b) => b === 0) && v6[15] === 1) {
    return "loopback ::1";
  }
  const embedded = embeddedV4(v6);
  if (embedded) {
    const why = v4Range(embedded.v4);
    return why && `${why}, as ${dotted(embedded.v4)} in ${embedded.how}`;
  }
  return V6_RANGES.find((r) => inRange(v6, r))?.name;
}

/**
 * Whether `host` is an IP address (in any form {@linkcode parseIPv4} or
 * {@linkcode parseIPv6} reads), as opposed to a name to resolve.
 *
 * @param host a hostname
 * @returns true for an address literal
 *
 * @example
 * ```ts
 * import { isAddress } from "./_address.ts";
 * console.log(isAddress("[::1]"), isAddress("example.com")); // true false
 * ```
 */
export function isAddress(host: string): boolean {
  return parseIPv4(host) !== undefined || parseIPv6(host) !== undefined;
}
