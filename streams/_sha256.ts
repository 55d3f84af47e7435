// Incremental SHA-256 for convert's --hash. WebCrypto's digest() is one-shot
// only, so a streaming hash comes from hash-wasm (WebAssembly, runs in
// browsers and workers; ~270 MB/s here against ~125 MB/s for @noble/hashes).
// It is imported on first use: loading it cost every command about 17 ms of
// start-up (a third of `cli.ts convert` on a small image) hashing or not.

/** An incremental SHA-256. */
export interface Sha256 {
  update(bytes: Uint8Array): void;
  /** Hex digest. */
  digest(): string;
}

/** A fresh incremental SHA-256. */
export async function sha256(): Promise<Sha256> {
  const { createSHA256 } = await import("npm:hash-wasm@4.13.0");
  const h = await createSHA256();
  h.init();
  return {
    update: (bytes) => void h.update(bytes),
    digest: () => h.digest("hex"),
  };
}
