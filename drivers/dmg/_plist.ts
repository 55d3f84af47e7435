/**
 * A small, strict reader and writer of XML property lists (Apple's
 * `PropertyList-1.0.dtd`), enough for a UDIF image's `resource-fork`
 * dictionary, with no DOMParser (Deno has none) and no dependencies.
 *
 * Accepted: an optional `<?xml ...?>` declaration, an optional
 * `<!DOCTYPE ...>`, comments, and one `<plist>` holding one value; values
 * are `dict` (`key` then value, repeated), `array`, `string`, `data`
 * (base64), `integer`, `real`, `date`, `true` and `false`; the five
 * predefined entities, numeric character references and CDATA sections.
 * Anything else (an unknown element, text between elements, a tag that
 * does not close, a dict key without a value, bad base64) is an
 * ImageFormatError naming the character where it was found.
 *
 * This module is browser compatible.
 *
 * @module
 */

import { ImageFormatError } from "../../streams/errors.ts";

/** A property list value: dict as a Map (in file order), data as bytes, integer as bigint. */
export type PlistValue =
  | string
  | bigint
  | number
  | boolean
  | Date
  | Uint8Array
  | PlistValue[]
  | Map<string, PlistValue>;

/** How deep values may nest: no property list UDIF writes comes near. */
const MAX_DEPTH = 64;

const ENTITIES: Record<string, string> = {
  lt: "<",
  gt: ">",
  amp: "&",
  quot: '"',
  apos: "'",
};

/** The base64 alphabet's values (-1: not base64, -2: whitespace). */
const BASE64: Int8Array = (() => {
  const t = new Int8Array(256).fill(-1);
  const alphabet =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (let i = 0; i < 64; i++) t[alphabet.charCodeAt(i)] = i;
  for (const c of " \t\r\n\f") t[c.charCodeAt(0)] = -2;
  return t;
})();

/**
 * Decodes base64 text strictly: whitespace anywhere is skipped, padding
 * only at the end, nothing outside the alphabet. `fail` receives the
 * index of the offending character.
 */
export function decodeBase64(
  text: string,
  fail: (message: string, at: number) => never,
): Uint8Array {
  // Counted first so the output is allocated once, at its exact size.
  let digits = 0;
  let padding = 0;
  let paddingAt = -1;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    const v = c < 256 ? BASE64[c] : -1;
    if (v === -2) continue;
    if (c === 0x3d) { // "="
      if (padding === 0) paddingAt = i;
      padding++;
      continue;
    }
    if (v < 0) fail(`character ${JSON.stringify(text[i])} is not base64`, i);
    if (padding) fail("base64 digits after the padding", i);
    digits++;
  }
  if ((digits + padding) % 4 !== 0 || padding > 2) {
    fail(
      `base64 of ${digits} digits and ${padding} padding characters is not a whole number of 4-character groups`,
      paddingAt >= 0 ? paddingAt : text.length,
    );
  }
  if (padding && digits % 4 !== 4 - padding) {
    fail("base64 padding does not match the digits before it", paddingAt);
  }
  const out = new Uint8Array(Math.floor(digits * 3 / 4));
  let acc = 0;
  let bits = 0;
  let o = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    const v = c < 256 ? BASE64[c] : -1;
    if (v < 0) continue;
    acc = (acc << 6) | v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = (acc >> bits) & 0xff;
    }
  }
  return out;
}

/**
 * Encodes bytes as base64 in lines of `lineLength` characters, each with
 * `indent` before it and a newline after (hdiutil's layout: 44 characters
 * after four tabs).
 */
export function encodeBase64(
  bytes: Uint8Array,
  indent = "",
  lineLength = 44,
): string {
  const alphabet =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  let flat = "";
  const parts: string[] = [];
  for (let i = 0; i < bytes.length; i += 3) {
    const a = bytes[i];
    const b = i + 1 < bytes.length ? bytes[i + 1] : 0;
    const c = i + 2 < bytes.length ? bytes[i + 2] : 0;
    const n = (a << 16) | (b << 8) | c;
    flat += alphabet[n >> 18] + alphabet[(n >> 12) & 63] +
      (i + 1 < bytes.length ? alphabet[(n >> 6) & 63] : "=") +
      (i + 2 < bytes.length ? alphabet[n & 63] : "=");
    // Joining in pieces keeps the string from growing one rope per byte.
    if (flat.length >= 1 << 16) {
      parts.push(flat);
      flat = "";
    }
  }
  parts.push(flat);
  const all = parts.join("");
  const lines: string[] = [];
  for (let i = 0; i < all.length; i += lineLength) {
    lines.push(indent + all.slice(i, i + lineLength) + "\n");
  }
  return lines.join("");
}

/** Escapes text for an XML element. */
export function escapeXml(text: string): string {
  return text.replace(
    /[<>&]/g,
    (c) => `&${{ "<": "lt", ">": "gt", "&": "amp" }[c]};`,
  );
}

/**
 * Parses an XML property list. `base` is the file offset of the text (for
 * messages: positions are given as characters after it).
 */
export function parsePlist(
  text: string,
  base = 0,
  file?: string,
): PlistValue {
  let i = 0;
  const n = text.length;
  const fail = (message: string, at = i): never => {
    throw new ImageFormatError(
      { format: "dmg", field: "XML plist", offset: base, file },
      `XML plist: ${message} (at character ${at} of the plist at byte ${base})`,
    );
  };
  const skipSpace = () => {
    while (i < n) {
      const c = text.charCodeAt(i);
      if (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) i++;
      else break;
    }
  };
  /** Skips whitespace, comments and processing instructions. */
  const skipMisc = () => {
    for (;;) {
      skipSpace();
      if (text.startsWith("<!--", i)) {
        const end = text.indexOf("-->", i + 4);
        if (end < 0) fail("comment never ends");
        i = end + 3;
      } else if (text.startsWith("<?", i)) {
        const end = text.indexOf("?>", i + 2);
        if (end < 0) fail("processing instruction never ends");
        i = end + 2;
      } else {
        return;
      }
    }
  };

  interface Tag {
    name: string;
    /** `<name/>` */
    empty: boolean;
    /** `</name>` */
    closing: boolean;
    at: number;
  }
  const readTag = (): Tag => {
    const at = i;
    if (text[i] !== "<") {
      fail(`expected a tag, found ${JSON.stringify(text.slice(i, i + 20))}`);
    }
    const end = text.indexOf(">", i);
    if (end < 0) fail("tag never ends");
    let inner = text.slice(i + 1, end);
    i = end + 1;
    const closing = inner.startsWith("/");
    if (closing) inner = inner.slice(1);
    const empty = !closing && inner.endsWith("/");
    if (empty) inner = inner.slice(0, -1);
    const m = /^([A-Za-z][A-Za-z0-9_.-]*)(\s[^<>]*)?$/.exec(inner);
    if (!m) return fail(`malformed tag <${inner.slice(0, 40)}>`, at);
    if (closing && m[2]?.trim()) {
      fail(`closing tag </${m[1]}> has attributes`, at);
    }
    return { name: m[1], empty, closing, at };
  };

  /** Character data up to the closing tag of `name`, with entities resolved. */
  const readText = (name: string): string => {
    let out = "";
    for (;;) {
      const lt = text.indexOf("<", i);
      if (lt < 0) fail(`<${name}> never closes`);
      out += resolveEntities(text.slice(i, lt), i);
      i = lt;
      if (text.startsWith("<![CDATA[", i)) {
        const end = text.indexOf("]]>", i + 9);
        if (end < 0) fail("CDATA section never ends");
        out += text.slice(i + 9, end);
        i = end + 3;
        continue;
      }
      if (text.startsWith("<!--", i)) {
        const end = text.indexOf("-->", i + 4);
        if (end < 0) fail("comment never ends");
        i = end + 3;
        continue;
      }
      const tag = readTag();
      if (!tag.closing || tag.name !== name) {
        fail(
          `<${name}> holds an element <${tag.name}>; it takes text only`,
          tag.at,
        );
      }
      return out;
    }
  };
  const resolveEntities = (raw: string, at: number): string => {
    if (!raw.includes("&")) return raw;
    return raw.replace(
      /&([^;&\s]*);?/g,
      (whole, name: string, offset: number) => {
        if (!whole.endsWith(";")) fail("'&' outside an entity", at + offset);
        if (name in ENTITIES) return ENTITIES[name];
        const m = /^#(?:x([0-9A-Fa-f]{1,6})|([0-9]{1,7}))$/.exec(name);
        if (m) {
          const code = m[1] !== undefined ? parseInt(m[1], 16) : Number(m[2]);
          if (code <= 0x10ffff && !(code >= 0xd800 && code < 0xe000) && code) {
            return String.fromCodePoint(code);
          }
        }
        return fail(`unknown entity &${name};`, at + offset);
      },
    );
  };

  const readValue = (tag: Tag, depth: number): PlistValue => {
    if (tag.closing) fail(`unexpected </${tag.name}>`, tag.at);
    if (depth > MAX_DEPTH) fail(`values nest deeper than ${MAX_DEPTH}`, tag.at);
    switch (tag.name) {
      case "dict": {
        const dict = new Map<string, PlistValue>();
        if (tag.empty) return dict;
        for (;;) {
          skipMisc();
          const key = readTag();
          if (key.closing && key.name === "dict") return dict;
          if (key.name !== "key" || key.closing) {
            fail(
              `a dict holds <key> then a value; found <${
                key.closing ? "/" : ""
              }${key.name}>`,
              key.at,
            );
          }
          const name = key.empty ? "" : readText("key");
          skipMisc();
          if (text.startsWith("</", i)) {
            fail(`key ${JSON.stringify(name)} has no value`);
          }
          const value = readValue(readTag(), depth + 1);
          if (dict.has(name)) {
            fail(`key ${JSON.stringify(name)} appears twice in a dict`, key.at);
          }
          dict.set(name, value);
        }
      }
      case "array": {
        const array: PlistValue[] = [];
        if (tag.empty) return array;
        for (;;) {
          skipMisc();
          const item = readTag();
          if (item.closing && item.name === "array") return array;
          array.push(readValue(item, depth + 1));
        }
      }
      case "string":
        return tag.empty ? "" : readText("string");
      case "data": {
        const start = i;
        const body = tag.empty ? "" : readText("data");
        return decodeBase64(body, (message, at) => fail(message, start + at));
      }
      case "integer": {
        const body = tag.empty ? "" : readText("integer").trim();
        if (!/^[+-]?(?:[0-9]+|0x[0-9A-Fa-f]+)$/.test(body)) {
          fail(
            `integer ${JSON.stringify(body.slice(0, 40))} is not a number`,
            tag.at,
          );
        }
        const negative = body.startsWith("-");
        const digits = body.replace(/^[+-]/, "");
        const value = BigInt(digits);
        return negative ? -value : value;
      }
      case "real": {
        const body = tag.empty ? "" : readText("real").trim();
        const value = Number(body);
        if (body === "" || Number.isNaN(value) && body !== "nan") {
          fail(
            `real ${JSON.stringify(body.slice(0, 40))} is not a number`,
            tag.at,
          );
        }
        return value;
      }
      case "date": {
        const body = tag.empty ? "" : readText("date").trim();
        const value = new Date(body);
        if (Number.isNaN(value.getTime())) {
          fail(
            `date ${JSON.stringify(body.slice(0, 40))} is not a date`,
            tag.at,
          );
        }
        return value;
      }
      case "true":
      case "false":
        if (!tag.empty) {
          skipSpace();
          const close = readTag();
          if (!close.closing || close.name !== tag.name) {
            fail(`<${tag.name}> must be empty`, tag.at);
          }
        }
        return tag.name === "true";
      default:
        return fail(`unknown element <${tag.name}>`, tag.at);
    }
  };

  if (text.charCodeAt(0) === 0xfeff) i = 1; // a byte-order mark
  skipMisc();
  if (text.startsWith("<!DOCTYPE", i)) {
    const end = text.indexOf(">", i);
    if (end < 0) fail("DOCTYPE never ends");
    if (text.slice(i, end).includes("[")) {
      fail("DOCTYPE with an internal subset");
    }
    i = end + 1;
  }
  skipMisc();
  const root = readTag();
  if (root.name !== "plist" || root.closing || root.empty) {
    fail(`the document must be one <plist>; found <${root.name}>`, root.at);
  }
  skipMisc();
  const value = readValue(readTag(), 1);
  skipMisc();
  const close = readTag();
  if (!close.closing || close.name !== "plist") {
    fail(
      `<plist> holds one value; found <${
        close.closing ? "/" : ""
      }${close.name}>`,
      close.at,
    );
  }
  skipMisc();
  // hdiutil pads nothing after the plist, but NULs are harmless.
  while (i < n && text.charCodeAt(i) === 0) i++;
  if (i < n) fail("text after </plist>");
  return value;
}
