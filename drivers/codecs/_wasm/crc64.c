/*
 * CRC-64 (ECMA-182, reflected: the check of xz blocks, type 4), eight
 * bytes a step with eight tables ("slicing by 8"). In TypeScript, with the
 * 64-bit register split in two 32-bit halves, it took 14% of the time of
 * an xz decode (0.17 s of CPU for 64 MiB); native 64-bit integers here.
 *
 * The register is passed in and out as two halves (no BigInt at the
 * boundary): crc64_update returns the low half, crc64_high the high one.
 * The caller keeps the xz convention (start at all ones, invert at the end).
 */
#include "common.h"

#define POLY 0xc96c5795d7870f42ull

static u64 table[8][256];
static u32 ready;
static u32 high;

static void init(void) {
  for (u32 n = 0; n < 256; n++) {
    u64 c = n;
    for (u32 k = 0; k < 8; k++) c = (c >> 1) ^ (POLY & (0ull - (c & 1)));
    table[0][n] = c;
  }
  for (u32 n = 0; n < 256; n++) {
    for (u32 t = 1; t < 8; t++) {
      const u64 prev = table[t - 1][n];
      table[t][n] = (prev >> 8) ^ table[0][prev & 0xff];
    }
  }
  ready = 1;
}

EXPORT(crc64_update)
u32 crc64_update(u32 low, u32 hi, const u8 *p, u32 n) {
  if (!ready) init();
  u64 crc = ((u64)hi << 32) | low;
  for (; n >= 8; n -= 8, p += 8) {
    crc ^= load64(p);
    crc = table[7][crc & 0xff] ^ table[6][(crc >> 8) & 0xff] ^
          table[5][(crc >> 16) & 0xff] ^ table[4][(crc >> 24) & 0xff] ^
          table[3][(crc >> 32) & 0xff] ^ table[2][(crc >> 40) & 0xff] ^
          table[1][(crc >> 48) & 0xff] ^ table[0][crc >> 56];
  }
  for (; n; n--, p++) crc = (crc >> 8) ^ table[0][(crc ^ *p) & 0xff];
  high = (u32)(crc >> 32);
  return (u32)crc;
}

EXPORT(crc64_high) u32 crc64_high(void) { return high; }
