/*
 * LZ4 block and LZO1X decoders (cloop 4 blocks with compressors 3 and 4),
 * the hot loops of drivers/codecs/lz4.ts and lzo.ts. They accept exactly
 * what the TypeScript decoders accept: both formats are documented in
 * those modules' comments, which these follow line by line. Any error is
 * answered with 1, and the caller runs the TypeScript decoder to name it.
 *
 * `in` has n bytes, `out` size bytes; both regions are followed by SLACK
 * spare bytes, which the 8- and 16-byte copies below may read or overwrite
 * (they never reach more than 15 bytes past a checked length). Copying 16
 * bytes a step rather than 8 took lz4 from 960 to about 1,370 MB/s per
 * core and lzo from 685 to 755 (1 MiB chunks of the bench sample).
 */
#include "common.h"

/* Copies len bytes 8 at a time (non-overlapping, or source 8+ bytes back). */
static inline void wild_copy(u8 *to, const u8 *from, u32 len) {
  for (u8 *stop = to + len; to < stop; to += 8, from += 8) {
    store64(to, load64(from));
  }
}

/* Copies len bytes 16 at a time (non-overlapping, or source 16+ bytes back). */
static inline void wild_copy16(u8 *to, const u8 *from, u32 len) {
  u8 *stop = to + len;
  do {
    const u64 a = load64(from), b = load64(from + 8);
    store64(to, a);
    store64(to + 8, b);
    to += 16;
    from += 16;
  } while (to < stop);
}

/* A match of len bytes from dist back at out + o (dist <= o checked). */
static inline void match_copy(u8 *out, u32 o, u32 dist, u32 len) {
  u8 *to = out + o;
  const u8 *from = to - dist;
  if (dist >= 16) {
    wild_copy16(to, from, len);
  } else if (dist >= 8) {
    wild_copy(to, from, len);
  } else {
    /* Closer than 8: the match repeats bytes it has just written. */
    for (u8 *stop = to + len; to < stop;) *to++ = *from++;
  }
}

#define FAIL 1

EXPORT(lz4_decode)
int lz4_decode(const u8 *in, u32 n, u8 *out, u32 size) {
  u32 i = 0, o = 0;
  for (;;) {
    if (i >= n) return FAIL;
    const u32 token = in[i++];
    u32 literals = token >> 4;
    if (literals == 15) {
      for (;;) {
        if (i >= n) return FAIL;
        const u32 b = in[i++];
        literals += b;
        if (b != 255) break;
        /* Past the output already: an error, before the sum can wrap. */
        if (literals > size) return FAIL;
      }
    }
    if (literals > n - i || literals > size - o) return FAIL;
    wild_copy16(out + o, in + i, literals);
    i += literals;
    o += literals;
    if (i == n) break; /* the last sequence: literals only */
    if (n - i < 2) return FAIL;
    const u32 dist = in[i] | ((u32)in[i + 1] << 8);
    i += 2;
    if (dist == 0 || dist > o) return FAIL;
    u32 len = token & 15;
    if (len == 15) {
      for (;;) {
        if (i >= n) return FAIL;
        const u32 b = in[i++];
        len += b;
        if (b != 255) break;
        if (len > size) return FAIL;
      }
    }
    len += 4;
    if (len > size - o) return FAIL;
    match_copy(out, o, dist, len);
    o += len;
  }
  return o == size ? 0 : FAIL;
}

/* The extension of an LZO length whose field was 0: zero bytes count 255 each. */
static inline u32 lzo_extend(const u8 *in, u32 n, u32 *at, u32 base, u32 size) {
  u32 i = *at;
  u32 len = base;
  for (;;) {
    if (i >= n) return 0;
    const u32 b = in[i++];
    if (b != 0) {
      *at = i;
      return len + b;
    }
    len += 255;
    if (len > size + 255) return 0;
  }
}

#define NEED(count) \
  if ((count) > n - i) return FAIL
#define LITERALS(count)                                   \
  do {                                                    \
    const u32 c_ = (count);                               \
    NEED(c_);                                             \
    if (c_ > size - o) return FAIL;                       \
    wild_copy16(out + o, in + i, c_);                     \
    i += c_;                                              \
    o += c_;                                              \
  } while (0)
#define COPY(distance, length)                            \
  do {                                                    \
    const u32 d_ = (distance), l_ = (length);             \
    if (d_ > o || l_ > size - o) return FAIL;             \
    match_copy(out, o, d_, l_);                           \
    o += l_;                                              \
  } while (0)

EXPORT(lzo_decode)
int lzo_decode(const u8 *in, u32 n, u8 *out, u32 size) {
  u32 i = 0, o = 0, state = 0;
  NEED(1);
  if (in[0] > 17) {
    const u32 count = in[i++] - 17;
    LITERALS(count);
    state = count < 4 ? count : 4;
  }
  for (;;) {
    NEED(1);
    const u32 t = in[i++];
    u32 s;
    if (t < 16) {
      if (state == 0) {
        u32 count = t + 3;
        if (t == 0 && !(count = lzo_extend(in, n, &i, 18, size))) return FAIL;
        LITERALS(count);
        state = 4;
        continue;
      }
      NEED(1);
      const u32 h = in[i++];
      if (state == 4) COPY((h << 2) + ((t >> 2) & 3) + 2049, 3);
      else COPY((h << 2) + ((t >> 2) & 3) + 1, 2);
      s = t & 3;
    } else if (t < 32) {
      u32 len = (t & 7) + 2;
      if ((t & 7) == 0 && !(len = lzo_extend(in, n, &i, 9, size))) return FAIL;
      NEED(2);
      const u32 le = in[i] | ((u32)in[i + 1] << 8);
      i += 2;
      const u32 dist = 16384 + ((t & 8) << 11) + (le >> 2);
      if (dist == 16384) {
        /* The end marker: 11 00 00 as every encoder writes it. */
        if (len != 3 || le != 0) return FAIL;
        break;
      }
      COPY(dist, len);
      s = le & 3;
    } else if (t < 64) {
      u32 len = (t & 31) + 2;
      if ((t & 31) == 0 && !(len = lzo_extend(in, n, &i, 33, size))) return FAIL;
      NEED(2);
      const u32 le = in[i] | ((u32)in[i + 1] << 8);
      i += 2;
      COPY((le >> 2) + 1, len);
      s = le & 3;
    } else {
      NEED(1);
      const u32 h = in[i++];
      const u32 len = t < 128 ? 3 + ((t >> 5) & 1) : 5 + ((t >> 5) & 3);
      COPY((h << 3) + ((t >> 2) & 7) + 1, len);
      s = t & 3;
    }
    LITERALS(s);
    state = s;
  }
  if (i != n || o != size) return FAIL;
  return 0;
}
