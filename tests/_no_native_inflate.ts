// Imported first by scripts that must run as a browser does: hides
// node:zlib (drivers/codecs/_node_zlib.ts finds it through
// `globalThis.process`), so zlib inflates through DecompressionStream and
// the drivers take their browser paths (grains and blocks inflate on the
// decode workers). The decode workers themselves keep node:zlib.
Object.defineProperty(globalThis, "process", {
  value: undefined,
  configurable: true,
});
