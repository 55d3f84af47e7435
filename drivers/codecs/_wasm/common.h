/*
 * Shared pieces of the WebAssembly decoders (built by tools/build_wasm.sh,
 * embedded in drivers/codecs/_wasm_module.ts).
 *
 * No libc: the module owns its linear memory and the TypeScript side
 * (drivers/codecs/_wasm.ts) lays it out. Every decoder checks each input
 * read and each output write against the sizes it is given; the only
 * reads or writes past them are the "wild" 8- and 16-byte copies, which
 * stay inside the SLACK bytes the caller reserves after each region.
 */
#ifndef VDISK_WASM_COMMON_H
#define VDISK_WASM_COMMON_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define EXPORT(name) __attribute__((export_name(#name)))

/* Bytes the caller keeps free after every input and output region. */
#define SLACK 32

static inline u64 load64(const u8 *p) {
  u64 v;
  __builtin_memcpy(&v, p, 8);
  return v;
}

static inline void store64(u8 *p, u64 v) { __builtin_memcpy(p, &v, 8); }

#endif
