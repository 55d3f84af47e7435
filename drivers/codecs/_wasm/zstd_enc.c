/*
 * zstd frame encoder (RFC 8878), the hot path of qcow2's `-c -o
 * compression_type=zstd` (drivers/codecs/zstd_encode.ts holds the
 * TypeScript twin, the frame layout and the fallback where WebAssembly
 * cannot run).
 *
 * One frame per call: single segment, content size declared, no
 * checksum. Blocks of at most 128 KiB: RLE where the block is one byte
 * repeated, compressed where that is smaller, raw otherwise.
 *
 * Two match finders (the `level` argument). Level 3 follows the "double
 * fast" idea of libzstd's level 3 (which QEMU uses: ZSTD_CLEVEL_DEFAULT):
 * two hash tables, one of 8-byte prefixes and one of 5-byte prefixes, a
 * repeat-offset probe one byte on, and a step that grows by one every
 * 256 bytes without a match (random data is passed over in a few hundred
 * probes a cluster). Level 1 ("fast", libzstd's levels 1-2) keeps the
 * table of 5-byte prefixes only and probes two positions a round. Natively
 * (clang -O3, 64 KiB frames of the bench disk's /usr/lib tar) level 3 ran
 * at 0.87-0.91 of libzstd level 3's speed for the same sizes, level 1 at
 * 1.15 of it for frames 2-3 % larger on binaries. The tables are
 * kept between calls: a position is stored as gen_base + position and an
 * entry below this frame's gen_base is stale, so no frame clears them.
 *
 * Entropy coding is written as the TypeScript encoder writes it
 * (_huffman_literals.ts, _fse.ts): Huffman literals (up to 11-bit codes,
 * weights direct or FSE-compressed, 1 or 4 streams), and per block, for
 * each of the literal length, match length and offset codes, the cheapest
 * of the predefined table, RLE and a table of its own.
 *
 * Memory: the caller (zstd_encode.ts) lays out input, output and work
 * (zstd_enc_work_size) in linear memory, each followed by SLACK bytes;
 * reads of 8 bytes may pass the input's end into its SLACK, but every
 * value they give is bounded by the real end before it is used.
 */
#include "common.h"

typedef int i32;
typedef short i16;

#define BLOCK_MAX (128 << 10)
#define MAX_HASH_LOG 17
#define MIN_HASH_LOG 10
#define HUF_MAX_BITS 11
#define MIN_HUFFMAN 64
#define WEIGHT_LOG 6
#define SEARCH_STRENGTH 8

static u32 long_table[1 << MAX_HASH_LOG];
static u32 short_table[1 << (MAX_HASH_LOG - 1)];
/*
 * Frames of 64 KiB or less (qcow2's default cluster) with level 1: a
 * table of 16-bit positions, cleared each frame (no stale entries: an
 * empty slot names position 0, and every candidate is compared anyway).
 * 2^SMALL_LOG entries, 32 KiB, stay in the first-level cache, where
 * the 32-bit table's 128 KiB missed it on most probes.
 */
#define SMALL_LOG 14
#define SMALL_MAX 65536
static u16 small_table[1 << SMALL_LOG];
/* Positions of this frame are stored as gen_base + position (see above). */
static u32 gen_base = 1;

static inline u32 load32(const u8 *p) {
  u32 v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

static inline u32 highbit(u32 v) { return 31 - __builtin_clz(v); }

static inline u32 hash8(const u8 *p, u32 log) {
  return (u32)((load64(p) * 0xcf1bbcdcb7a56463ULL) >> (64 - log));
}

static inline u32 hash5(const u8 *p, u32 log) {
  return (u32)(((load64(p) << 24) * 0x9fb21c651e98df25ULL) >> (64 - log));
}

/* Bytes equal at ip and m, up to end (m < ip). */
static inline u32 count(const u8 *ip, const u8 *m, const u8 *end) {
  const u8 *start = ip;
  while (ip + 8 <= end) {
    u64 d = load64(ip) ^ load64(m);
    if (d) return (u32)(ip - start) + (u32)(__builtin_ctzll(d) >> 3);
    ip += 8;
    m += 8;
  }
  while (ip < end && *ip == *m) {
    ip++;
    m++;
  }
  return (u32)(ip - start);
}

/* ---- Bit writer: low to high, 64-bit accumulator, at most 56 bits
 * pending between flushes; writes 8 bytes at a time (SLACK). ---- */

typedef struct {
  u8 *p;
  u64 acc;
  u32 n;
} Bits;

static inline void bits_add(Bits *w, u32 value, u32 count) {
  w->acc |= (u64)value << w->n;
  w->n += count;
}

static inline void bits_flush(Bits *w) {
  store64(w->p, w->acc);
  u32 bytes = w->n >> 3;
  w->p += bytes;
  w->acc = bytes ? w->acc >> (bytes * 8) : w->acc;
  w->n &= 7;
}

/* Forward streams: the last partial byte. */
static inline u8 *bits_end(Bits *w) {
  bits_flush(w);
  if (w->n) *w->p++ = (u8)w->acc;
  return w->p;
}

/* Backward streams: the end mark, then the last byte. */
static inline u8 *bits_finish(Bits *w) {
  bits_add(w, 1, 1);
  return bits_end(w);
}

/* ---- FSE (RFC 8878 4.1) ---- */

#define FSE_MAX_LOG 9
#define FSE_MAX_SYMBOLS 64

typedef struct {
  u32 log;
  u32 size;
  u16 state_table[1 << FSE_MAX_LOG];
  i32 delta_nb_bits[FSE_MAX_SYMBOLS];
  i32 delta_find_state[FSE_MAX_SYMBOLS];
  u16 first[FSE_MAX_SYMBOLS];
} Fse;

/*
 * The encoding table of `norm` (count symbols, -1 for "less than 1"),
 * spread as the decoder spreads it; 0 when the distribution is not
 * consistent (never for the ones built here).
 */
static int fse_build(Fse *t, const i16 *norm, u32 symbols, u32 log) {
  u32 size = 1u << log;
  u8 spread[1 << FSE_MAX_LOG];
  u32 next[FSE_MAX_SYMBOLS];
  u32 cumulative[FSE_MAX_SYMBOLS + 1];
  u32 high = size - 1;
  for (u32 s = 0; s < symbols; s++) {
    if (norm[s] == -1) {
      spread[high--] = (u8)s;
      next[s] = 1;
    } else next[s] = (u32)norm[s];
  }
  u32 step = (size >> 1) + (size >> 3) + 3;
  u32 position = 0;
  for (u32 s = 0; s < symbols; s++) {
    for (i32 i = 0; i < norm[s]; i++) {
      spread[position] = (u8)s;
      do position = (position + step) & (size - 1);
      while (position > high);
    }
  }
  if (position != 0) return 0;
  cumulative[0] = 0;
  for (u32 s = 0; s < symbols; s++) {
    cumulative[s + 1] = cumulative[s] + (norm[s] == -1 ? 1 : (u32)norm[s]);
    t->first[s] = 0xffff;
  }
  u32 at[FSE_MAX_SYMBOLS];
  for (u32 s = 0; s < symbols; s++) at[s] = cumulative[s];
  for (u32 state = 0; state < size; state++) {
    u32 s = spread[state];
    t->state_table[at[s]++] = (u16)state;
    if (t->first[s] == 0xffff) t->first[s] = (u16)state;
  }
  for (u32 s = 0; s < symbols; s++) {
    i32 c = norm[s] == -1 ? 1 : norm[s];
    if (c == 0) {
      t->delta_nb_bits[s] = 0;
      t->delta_find_state[s] = 0;
      continue;
    }
    u32 most = c == 1 ? log : log - highbit((u32)c - 1);
    t->delta_nb_bits[s] = (i32)((most << 16) - ((u32)c << most));
    t->delta_find_state[s] = (i32)cumulative[s] - c;
  }
  t->log = log;
  t->size = size;
  return 1;
}

/* RLE mode: one state, no bits. */
static void fse_rle(Fse *t, u32 symbol) {
  t->log = 0;
  t->size = 1;
  t->state_table[0] = 0;
  t->delta_nb_bits[symbol] = -1;
  t->delta_find_state[symbol] = -1;
  t->first[symbol] = 0;
}

/* The state before `state` when `symbol` is encoded; writes its bits. */
static inline u32 fse_step(const Fse *t, Bits *w, u32 state, u32 symbol) {
  u32 v = state + t->size;
  u32 nb = (u32)((i32)v + t->delta_nb_bits[symbol]) >> 16;
  bits_add(w, v & ((1u << nb) - 1), nb);
  return t->state_table[(i32)(v >> nb) + t->delta_find_state[symbol]];
}

/*
 * A normalized distribution of counts[0, symbols) summing to 2^log, every
 * present symbol at least 1; 0 when they cannot all fit.
 */
static int normalize(const u32 *counts, u32 symbols, u32 log, i16 *norm) {
  u64 total = 0;
  for (u32 s = 0; s < symbols; s++) total += counts[s];
  if (total == 0) return 0;
  i32 size = 1 << log;
  i32 sum = 0;
  for (u32 s = 0; s < symbols; s++) {
    if (!counts[s]) {
      norm[s] = 0;
      continue;
    }
    i32 v = (i32)(((u64)counts[s] * (u64)size * 2 + total) / (total * 2));
    norm[s] = (i16)(v < 1 ? 1 : v);
    sum += norm[s];
  }
  while (sum != size) {
    /* Take from (or give to) the largest: the relative change is least. */
    u32 big = 0;
    for (u32 s = 1; s < symbols; s++) if (norm[s] > norm[big]) big = s;
    if (sum > size) {
      i32 give = sum - size;
      if (give > norm[big] - 1) give = norm[big] - 1;
      if (give <= 0) return 0;
      norm[big] = (i16)(norm[big] - give);
      sum -= give;
    } else {
      norm[big] = (i16)(norm[big] + size - sum);
      sum = size;
    }
  }
  return 1;
}

/* The table description (RFC 8878 4.1.1) of norm[0, symbols). */
static u8 *write_distribution(const i16 *norm, u32 symbols, u32 log, u8 *out) {
  Bits w = {out, 0, 0};
  bits_add(&w, log - 5, 4);
  i32 remaining = (1 << log) + 1;
  i32 threshold = 1 << log;
  u32 nb = log + 1;
  i32 last = (i32)symbols - 1;
  while (last > 0 && norm[last] == 0) last--;
  for (i32 s = 0; s <= last;) {
    i32 value = norm[s] + 1;
    i32 max = 2 * threshold - 1 - remaining;
    if (value < max) bits_add(&w, (u32)value, nb - 1);
    else if (value < threshold) bits_add(&w, (u32)value, nb);
    else bits_add(&w, (u32)(value + max), nb);
    bits_flush(&w);
    remaining -= norm[s] < 0 ? -norm[s] : norm[s];
    while (remaining < threshold) {
      nb--;
      threshold >>= 1;
    }
    s++;
    if (value == 1) {
      i32 zeros = 0;
      while (s + zeros <= last && norm[s + zeros] == 0) zeros++;
      s += zeros;
      while (zeros >= 3) {
        bits_add(&w, 3, 2);
        bits_flush(&w);
        zeros -= 3;
      }
      bits_add(&w, (u32)zeros, 2);
      bits_flush(&w);
    }
  }
  return bits_end(&w);
}

/* log2(x) in 1/256 bits (x >= 1), close enough for choosing tables. */
static u32 log2_fixed(u32 x) {
  u32 hb = highbit(x);
  u32 frac = hb >= 8 ? (x >> (hb - 8)) & 0xff : (x << (8 - hb)) & 0xff;
  return (hb << 8) + frac;
}

/* ---- Huffman literals (RFC 8878 3.1.1.3.1, 4.2) ---- */

/* Sorts keys (count << 8 | symbol) ascending: a heap sort of <= 256. */
static void sort_keys(u32 *a, u32 n) {
  for (u32 start = n / 2; start-- > 0;) {
    u32 root = start;
    for (;;) {
      u32 child = 2 * root + 1;
      if (child >= n) break;
      if (child + 1 < n && a[child + 1] > a[child]) child++;
      if (a[root] >= a[child]) break;
      u32 t = a[root];
      a[root] = a[child];
      a[child] = t;
      root = child;
    }
  }
  for (u32 end = n; end-- > 1;) {
    u32 t = a[0];
    a[0] = a[end];
    a[end] = t;
    u32 root = 0;
    for (;;) {
      u32 child = 2 * root + 1;
      if (child >= end) break;
      if (child + 1 < end && a[child + 1] > a[child]) child++;
      if (a[root] >= a[child]) break;
      t = a[root];
      a[root] = a[child];
      a[child] = t;
      root = child;
    }
  }
}

/*
 * Code lengths (at most 11) of a Huffman tree over the n symbols of
 * keys (sorted, count << 8 | symbol), with a Kraft sum of exactly 2^11.
 */
static void code_lengths(const u32 *keys, u32 n, const u32 *counts,
                         u8 *lengths) {
  u32 weight[512];
  i32 parent[512];
  u8 depth[512];
  for (u32 i = 0; i < n; i++) weight[i] = keys[i] >> 8;
  /* Leaves 0..n-1 in weight order, internal nodes n.. in creation order
   * (their weights grow): two queues, the lighter head taken each time. */
  u32 qi = 0, ii = n;
  for (u32 k = n; k < 2 * n - 1; k++) {
    u32 pick[2];
    for (int j = 0; j < 2; j++) {
      if (ii >= k || (qi < n && weight[qi] <= weight[ii])) pick[j] = qi++;
      else pick[j] = ii++;
    }
    weight[k] = weight[pick[0]] + weight[pick[1]];
    parent[pick[0]] = (i32)k;
    parent[pick[1]] = (i32)k;
  }
  depth[2 * n - 2] = 0;
  for (i32 k = (i32)(2 * n) - 3; k >= 0; k--) depth[k] = depth[parent[k]] + 1;
  u32 longest = 0;
  for (u32 i = 0; i < n; i++) {
    u32 s = keys[i] & 0xff;
    lengths[s] = depth[i] > HUF_MAX_BITS ? HUF_MAX_BITS : depth[i];
    if (depth[i] > longest) longest = depth[i];
  }
  if (longest <= HUF_MAX_BITS) return;
  /* Clamped, the Kraft sum is over 2^11: lengthen codes, rarest first,
   * until it fits, then shorten the longest (most frequent first) while
   * there is room. */
  const u32 full = 1u << HUF_MAX_BITS;
  u32 kraft = 0;
  for (u32 i = 0; i < n; i++) {
    kraft += 1u << (HUF_MAX_BITS - lengths[keys[i] & 0xff]);
  }
  while (kraft > full) {
    for (u32 i = 0; i < n && kraft > full; i++) {
      u32 s = keys[i] & 0xff;
      if (lengths[s] < HUF_MAX_BITS) {
        kraft -= 1u << (HUF_MAX_BITS - lengths[s] - 1);
        lengths[s]++;
      }
    }
  }
  while (kraft < full) {
    i32 best = -1;
    for (u32 i = 0; i < n; i++) {
      u32 s = keys[i] & 0xff;
      if (lengths[s] > 1 && (1u << (HUF_MAX_BITS - lengths[s])) <= full - kraft &&
          (best < 0 || lengths[s] > lengths[best] ||
           (lengths[s] == lengths[best] && counts[s] > counts[best]))) {
        best = (i32)s;
      }
    }
    if (best < 0) break;
    kraft += 1u << (HUF_MAX_BITS - lengths[best]);
    lengths[best]--;
  }
}

/*
 * The weights of symbols 0..count-1 FSE-compressed (accuracy log 6, two
 * interleaved states) at out; the end, or 0 past 127 bytes.
 */
static u8 *compress_weights(const u8 *weights, u32 count, u8 *out) {
  if (count < 2) return 0;
  u32 histogram[HUF_MAX_BITS + 1];
  for (u32 i = 0; i <= HUF_MAX_BITS; i++) histogram[i] = 0;
  for (u32 i = 0; i < count; i++) histogram[weights[i]]++;
  u32 last = HUF_MAX_BITS;
  while (histogram[last] == 0) last--;
  i16 norm[HUF_MAX_BITS + 1];
  if (!normalize(histogram, last + 1, WEIGHT_LOG, norm)) return 0;
  for (u32 s = 0; s <= last; s++) if (norm[s] == 1 << WEIGHT_LOG) return 0;
  static Fse t;
  u8 *start = out;
  out = write_distribution(norm, last + 1, WEIGHT_LOG, out);
  if (!fse_build(&t, norm, last + 1, WEIGHT_LOG)) return 0;
  Bits w = {out, 0, 0};
  /* Even weights from state 1, odd from state 2, each chain from its
   * last weight back (the decoder reads forwards). */
  i32 s1 = -1, s2 = -1;
  for (i32 i = (i32)count - 1; i >= 0; i--) {
    u32 symbol = weights[i];
    if (i & 1) {
      s2 = s2 < 0 ? t.first[symbol] : (i32)fse_step(&t, &w, (u32)s2, symbol);
    } else {
      s1 = s1 < 0 ? t.first[symbol] : (i32)fse_step(&t, &w, (u32)s1, symbol);
    }
    bits_flush(&w);
    if (w.p - start > 127) return 0;
  }
  bits_add(&w, (u32)s2, WEIGHT_LOG);
  bits_add(&w, (u32)s1, WEIGHT_LOG);
  u8 *end = bits_finish(&w);
  return end - start > 127 ? 0 : end;
}

/* One Huffman stream of lits[from, to), last literal first. */
static u8 *huffman_stream(const u8 *lits, u32 from, u32 to, const u16 *codes,
                          const u8 *lengths, u8 *out) {
  Bits w = {out, 0, 0};
  u32 i = to;
  /* Four codes of at most 11 bits between flushes. */
  while (i >= from + 4) {
    u8 a = lits[i - 1], b = lits[i - 2], c = lits[i - 3], d = lits[i - 4];
    bits_add(&w, codes[a], lengths[a]);
    bits_add(&w, codes[b], lengths[b]);
    bits_add(&w, codes[c], lengths[c]);
    bits_add(&w, codes[d], lengths[d]);
    bits_flush(&w);
    i -= 4;
  }
  while (i > from) {
    u8 a = lits[--i];
    bits_add(&w, codes[a], lengths[a]);
  }
  return bits_finish(&w);
}

/* The 1, 2 or 3-byte header of a raw or RLE literals section. */
static u8 *size_header(u32 type, u32 n, u8 *out) {
  if (n < 32) *out++ = (u8)(type | (n << 3));
  else if (n < 4096) {
    *out++ = (u8)(type | (1 << 2) | ((n & 0xf) << 4));
    *out++ = (u8)(n >> 4);
  } else {
    *out++ = (u8)(type | (3 << 2) | ((n & 0xf) << 4));
    *out++ = (u8)(n >> 4);
    *out++ = (u8)(n >> 12);
  }
  return out;
}

/* Huffman-coded literals at out; 0 when not smaller than raw. */
static u8 *huffman(const u8 *lits, u32 n, const u32 *counts, u8 *out) {
  u32 keys[256];
  u32 symbols = 0;
  u32 last = 0;
  for (u32 s = 0; s < 256; s++) {
    if (counts[s]) {
      keys[symbols++] = (counts[s] << 8) | s;
      last = s;
    }
  }
  sort_keys(keys, symbols);
  u8 lengths[256];
  for (u32 s = 0; s < 256; s++) lengths[s] = 0;
  code_lengths(keys, symbols, counts, lengths);
  u32 max_bits = 0;
  u64 bits = 0;
  for (u32 s = 0; s <= last; s++) {
    if (lengths[s] > max_bits) max_bits = lengths[s];
    bits += (u64)counts[s] * lengths[s];
  }
  u32 raw_size = n + (n < 32 ? 1 : n < 4096 ? 2 : 3);
  if (bits / 8 + 16 >= raw_size) return 0;
  /* Weights, and canonical codes from the lowest weight (longest code)
   * up, in symbol order within a weight. */
  u8 weights[256];
  u32 per_weight[HUF_MAX_BITS + 2];
  for (u32 k = 0; k < HUF_MAX_BITS + 2; k++) per_weight[k] = 0;
  for (u32 s = 0; s <= last; s++) {
    weights[s] = lengths[s] ? (u8)(max_bits + 1 - lengths[s]) : 0;
    per_weight[weights[s]]++;
  }
  /* The first code of each weight: codes of weight w follow those of
   * weight w - 1, halved (one bit shorter). */
  u32 next_code[HUF_MAX_BITS + 2];
  u32 code = 0;
  for (u32 weight = 1; weight <= max_bits; weight++) {
    next_code[weight] = code;
    code = (code + per_weight[weight]) >> 1;
  }
  u16 codes[256];
  for (u32 s = 0; s <= last; s++) {
    if (weights[s]) codes[s] = (u16)next_code[weights[s]]++;
  }
  u32 single = n < 1024;
  u32 header_size = single ? 3 : n < 16384 ? 4 : 5;
  u8 *start = out + header_size;
  u8 *p = start;
  if (last <= 128) {
    *p++ = (u8)(127 + last);
    for (u32 i = 0; i < last; i += 2) {
      *p++ = (u8)((weights[i] << 4) | (i + 1 < last ? weights[i + 1] : 0));
    }
  } else {
    u8 *end = compress_weights(weights, last, p + 1);
    if (!end) return 0;
    *p = (u8)(end - p - 1);
    p = end;
  }
  if (single) {
    p = huffman_stream(lits, 0, n, codes, lengths, p);
  } else {
    u32 segment = (n + 3) / 4;
    u8 *jump = p;
    p += 6;
    for (u32 k = 0; k < 4; k++) {
      u32 from = k * segment;
      u8 *stream_start = p;
      p = huffman_stream(lits, from, k == 3 ? n : from + segment, codes,
                         lengths, p);
      if (k < 3) {
        u32 size = (u32)(p - stream_start);
        jump[2 * k] = (u8)size;
        jump[2 * k + 1] = (u8)(size >> 8);
      }
    }
  }
  u32 compressed = (u32)(p - start);
  if ((u32)(p - out) >= raw_size) return 0;
  u32 limit = header_size == 3 ? 1023 : header_size == 4 ? 16383 : 262143;
  if (compressed > limit) return 0;
  if (header_size == 3) {
    u32 v = 2 | ((single ? 0 : 1) << 2) | (n << 4) | (compressed << 14);
    out[0] = (u8)v;
    out[1] = (u8)(v >> 8);
    out[2] = (u8)(v >> 16);
  } else if (header_size == 4) {
    u32 v = 2 | (2 << 2) | (n << 4) | (compressed << 18);
    out[0] = (u8)v;
    out[1] = (u8)(v >> 8);
    out[2] = (u8)(v >> 16);
    out[3] = (u8)(v >> 24);
  } else {
    u64 v = 2 | (3 << 2) | ((u64)n << 4) | ((u64)compressed << 22);
    for (u32 k = 0; k < 5; k++) out[k] = (u8)(v >> (8 * k));
  }
  return p;
}

/* The literals section of lits[0, n) in its smallest form. */
static u8 *write_literals(const u8 *lits, u32 n, u8 *out) {
  u32 counts[256];
  for (u32 s = 0; s < 256; s++) counts[s] = 0;
  for (u32 i = 0; i < n; i++) counts[lits[i]]++;
  u32 largest = 0, distinct = 0, only = 0;
  for (u32 s = 0; s < 256; s++) {
    if (counts[s]) {
      distinct++;
      only = s;
      if (counts[s] > largest) largest = counts[s];
    }
  }
  if (distinct == 1 && n >= 4) {
    out = size_header(1, n, out);
    *out++ = (u8)only;
    return out;
  }
  /* Flat histograms (random bytes) cannot pay for a tree: libzstd's test. */
  if (n >= MIN_HUFFMAN && distinct > 1 && largest > (n >> 7) + 4) {
    u8 *end = huffman(lits, n, counts, out);
    if (end) return end;
  }
  out = size_header(0, n, out);
  __builtin_memcpy(out, lits, n);
  return out + n;
}

/* ---- Sequences (RFC 8878 3.1.1.3.2) ---- */

/* LL_BASE, LL_BITS, ML_BASE, ML_BITS and the predefined distributions. */
#include "zstd_tables.h"

static u8 LL_CODE[64];
static u8 ML_CODE[128];
static Fse LL_PREDEFINED, ML_PREDEFINED, OF_PREDEFINED;
static int ready;

static void init(void) {
  for (u32 v = 0; v < 64; v++) {
    u32 code = v;
    if (v >= 16) {
      code = 16;
      while (code + 1 < 36 && LL_BASE[code + 1] <= v) code++;
    }
    LL_CODE[v] = (u8)code;
  }
  for (u32 v = 0; v < 128; v++) {
    u32 code = v;
    if (v >= 32) {
      code = 32;
      while (code + 1 < 53 && ML_BASE[code + 1] <= v + 3) code++;
    }
    ML_CODE[v] = (u8)code;
  }
  fse_build(&LL_PREDEFINED, LL_DEFAULT, 36, 6);
  fse_build(&ML_PREDEFINED, ML_DEFAULT, 53, 6);
  fse_build(&OF_PREDEFINED, OF_DEFAULT, 29, 5);
  ready = 1;
}

/*
 * The cheapest table for a histogram of `count` codes: predefined (mode
 * 0), RLE (1) or described here (2, its description written at *out).
 * Costs in 1/256 bits: -log2 of each code's probability, plus the
 * description. Returns the table to use.
 */
static const Fse *choose_table(const u32 *histogram, u32 symbols, u32 count,
                               const Fse *predefined, const i16 *default_norm,
                               u32 default_symbols, u32 max_log, Fse *own,
                               u32 *mode, u8 **out) {
  u32 distinct = 0, only = 0, last = 0;
  for (u32 s = 0; s < symbols; s++) {
    if (histogram[s]) {
      distinct++;
      only = s;
      last = s;
    }
  }
  if (distinct == 1 && count > 1) {
    *mode = 1;
    *(*out)++ = (u8)only;
    fse_rle(own, only);
    return own;
  }
  u64 predefined_cost = ~0ULL;
  if (last < default_symbols) {
    predefined_cost = 0;
    for (u32 s = 0; s <= last; s++) {
      if (histogram[s]) {
        i32 p = default_norm[s] < 0 ? 1 : default_norm[s];
        predefined_cost += (u64)histogram[s] *
                           ((predefined->log << 8) - log2_fixed((u32)p));
      }
    }
  }
  *mode = 0;
  if (count < 16 && predefined_cost != ~0ULL) return predefined;
  u32 log = highbit(distinct) + 2;
  if (log < 5) log = 5;
  if (count > 1 && highbit(count - 1) >= 2 && highbit(count - 1) - 2 > log) {
    log = highbit(count - 1) - 2;
  }
  if (log > max_log) log = max_log;
  i16 norm[FSE_MAX_SYMBOLS];
  if (!normalize(histogram, last + 1, log, norm)) return predefined;
  u8 description[128];
  u8 *end = write_distribution(norm, last + 1, log, description);
  u32 length = (u32)(end - description);
  u64 cost = (u64)length * 8 * 256;
  for (u32 s = 0; s <= last; s++) {
    if (histogram[s]) {
      cost += (u64)histogram[s] * ((log << 8) - log2_fixed((u32)norm[s]));
    }
  }
  if (cost >= predefined_cost) return predefined;
  if (!fse_build(own, norm, last + 1, log)) return predefined;
  *mode = 2;
  __builtin_memcpy(*out, description, length);
  *out += length;
  return own;
}

/* Work areas of one block (see zstd_enc_work_size). */
typedef struct {
  u8 *lits;
  u32 *lit_lengths;
  u32 *match_lengths;
  u32 *offsets; /* Offset_Value: 1-3 a repeat, past 3 a new offset + 3 */
  u8 *ll_codes;
  u8 *ml_codes;
  u8 *of_codes;
  u8 *body;
} Work;

static u32 most_sequences(u32 block) { return block / 3 + 1; }

static Work layout(u8 *work, u32 block) {
  Work w;
  u32 most = most_sequences(block);
  w.lits = work;
  work += (block + SLACK + 3) & ~3u;
  w.lit_lengths = (u32 *)work;
  work += most * 4;
  w.match_lengths = (u32 *)work;
  work += most * 4;
  w.offsets = (u32 *)work;
  work += most * 4;
  w.ll_codes = work;
  work += most;
  w.ml_codes = work;
  work += most;
  w.of_codes = work;
  work += most + 3;
  w.body = work;
  return w;
}

/* Body of a block: bounded by the checks in compress_block. */
static u32 body_size(u32 block) { return 2 * block + 4096; }

/*
 * Bytes of work memory zstd_enc_frame needs for n bytes of input.
 */
EXPORT(zstd_enc_work_size)
u32 zstd_enc_work_size(u32 n) {
  u32 block = n < BLOCK_MAX ? n : BLOCK_MAX;
  u32 most = most_sequences(block);
  return block + SLACK + 3 + most * 15 + 3 + body_size(block) + SLACK;
}

static u32 reps[3];
static u32 block_reps[3];

/*
 * The sequences of input[start, end) into w (their count; the literals'
 * count at *literal_count), the repeat offsets after them in block_reps.
 * Inlined into one function per finder (find_fast, find_double): V8
 * compiles a small loop with its constant finder better than one loop
 * testing which it is.
 */
/* The 5-byte table: 16-bit positions (small) or gen_base + position. */
#define SHORT_PUT(h, position)                                                 \
  do {                                                                         \
    if (small) small_table[h] = (u16)(position);                               \
    else short_table[h] = gb + (position);                                     \
  } while (0)
/* A candidate before position `before` into p: whether there is one. */
#define SHORT_GET(h, before, p)                                                \
  (small ? ((p) = small_table[h], (p) < (before))                              \
         : ((p) = short_table[h] - gb, short_table[h] >= gb && (p) < (before)))

static inline __attribute__((always_inline)) u32
find_sequences(const u8 *base, u32 start, u32 end, u32 long_log, u32 short_log,
               const int fast, const int small, Work *w, u32 *literal_count) {
  const u8 *ip = base + start;
  const u8 *anchor = ip;
  const u8 *iend = base + end;
  const u8 *ilimit = end - start > 8 ? iend - 8 : ip;
  u32 gb = gen_base;
  u32 rep0 = reps[0], rep1 = reps[1], rep2 = reps[2];
  u32 nseq = 0;
  u8 *lits = w->lits;

  /* Hot loop: see the notes at the top. */
  while (ip < ilimit) {
    u32 cur = (u32)(ip - base);
    u32 length, offset;
    if (fast) {
      /* One table of 5-byte prefixes (libzstd's "fast", levels 1-2), two
       * positions a round: their table loads overlap (the loop waits on
       * memory more than it computes). */
      u32 h0 = hash5(ip, short_log), h1 = hash5(ip + 1, short_log);
      u32 p0, p1;
      int has0 = SHORT_GET(h0, cur, p0);
      SHORT_PUT(h0, cur);
      int has1 = SHORT_GET(h1, cur + 1, p1);
      SHORT_PUT(h1, cur + 1);
      if (rep0 <= cur + 1 && load32(ip + 1 - rep0) == load32(ip + 1)) {
        length = count(ip + 5, ip + 5 - rep0, iend) + 4;
        ip++;
        offset = rep0;
        goto store;
      }
      if (has0 && load32(base + p0) == load32(ip)) {
        length = count(ip + 4, base + p0 + 4, iend) + 4;
        offset = cur - p0;
        goto extend;
      }
      if (has1 && load32(base + p1) == load32(ip + 1)) {
        ip++;
        length = count(ip + 4, base + p1 + 4, iend) + 4;
        offset = cur + 1 - p1;
        goto extend;
      }
      ip += ((u32)(ip - anchor) >> (SEARCH_STRENGTH - 1)) + 2;
      continue;
    }
    u32 hl = hash8(ip, long_log), hs = hash5(ip, short_log);
    u32 cand_long = long_table[hl], cand_short = short_table[hs];
    long_table[hl] = gb + cur;
    short_table[hs] = gb + cur;
    if (rep0 <= cur + 1 && load32(ip + 1 - rep0) == load32(ip + 1)) {
      length = count(ip + 5, ip + 5 - rep0, iend) + 4;
      ip++;
      offset = rep0;
      goto store;
    }
    if (cand_long >= gb && cand_long - gb < cur &&
        load64(base + (cand_long - gb)) == load64(ip)) {
      u32 p = cand_long - gb;
      length = count(ip + 8, base + p + 8, iend) + 8;
      offset = cur - p;
      goto extend;
    }
    if (cand_short >= gb && cand_short - gb < cur &&
        load32(base + (cand_short - gb)) == load32(ip)) {
      u32 p = cand_short - gb;
      /* An 8-byte match one on beats this 4-byte one. */
      u32 h1 = hash8(ip + 1, long_log);
      u32 c1 = long_table[h1];
      long_table[h1] = gb + cur + 1;
      if (c1 >= gb && c1 - gb < cur + 1 &&
          load64(base + (c1 - gb)) == load64(ip + 1)) {
        u32 p1 = c1 - gb;
        ip++;
        cur++;
        length = count(ip + 8, base + p1 + 8, iend) + 8;
        offset = cur - p1;
      } else {
        length = count(ip + 4, base + p + 4, iend) + 4;
        offset = cur - p;
      }
      goto extend;
    }
    ip += ((u32)(ip - anchor) >> SEARCH_STRENGTH) + 1;
    continue;
  extend:
    /* Backwards into the literals. */
    while (ip > anchor && (u32)(ip - base) > offset && ip[-1] == (ip - offset)[-1]) {
      ip--;
      length++;
    }
  store:
    for (;;) {
      u32 literal_length = (u32)(ip - anchor);
      /* Wild copy: 8 bytes a step, into the SLACK after lits. */
      for (u32 k = 0; k < literal_length; k += 8) {
        store64(lits + k, load64(anchor + k));
      }
      lits += literal_length;
      w->lit_lengths[nseq] = literal_length;
      w->match_lengths[nseq] = length;
      /* Offset_Value and the repeat offsets as the decoder keeps them
       * (RFC 8878 3.1.1.5). */
      i32 used = -1;
      if (literal_length > 0) {
        if (offset == rep0) used = 0;
        else if (offset == rep1) used = 1;
        else if (offset == rep2) used = 2;
        w->offsets[nseq] = used >= 0 ? (u32)used + 1 : offset + 3;
      } else {
        if (offset == rep1) used = 1;
        else if (offset == rep2) used = 2;
        else if (offset == rep0 - 1) used = 3;
        w->offsets[nseq] = used >= 0 ? (u32)used : offset + 3;
      }
      if (used < 0 || used == 3) {
        rep2 = rep1;
        rep1 = rep0;
        rep0 = offset;
      } else if (used == 1) {
        rep1 = rep0;
        rep0 = offset;
      } else if (used == 2) {
        rep2 = rep1;
        rep1 = rep0;
        rep0 = offset;
      }
      nseq++;
      u32 match_start = (u32)(ip - base);
      ip += length;
      anchor = ip;
      if (ip >= ilimit) break;
      /* Positions inside the match, for later matches. */
      u32 c2 = match_start + 2;
      SHORT_PUT(hash5(base + c2, short_log), c2);
      if (fast) {
        SHORT_PUT(hash5(ip - 2, short_log), (u32)(ip - 2 - base));
      } else {
        long_table[hash8(base + c2, long_log)] = gb + c2;
        long_table[hash8(ip - 2, long_log)] = gb + (u32)(ip - 2 - base);
        short_table[hash5(ip - 1, short_log)] = gb + (u32)(ip - 1 - base);
      }
      /* The match right after at the second repeat offset (no literals). */
      u32 now = (u32)(ip - base);
      if (rep1 <= now && rep1 > 0 && load32(ip) == load32(ip - rep1)) {
        length = count(ip + 4, ip + 4 - rep1, iend) + 4;
        offset = rep1;
        SHORT_PUT(hash5(ip, short_log), now);
        if (!fast) long_table[hash8(ip, long_log)] = gb + now;
        continue;
      }
      break;
    }
  }
  block_reps[0] = rep0;
  block_reps[1] = rep1;
  block_reps[2] = rep2;
  u32 tail = (u32)(iend - anchor);
  __builtin_memcpy(lits, anchor, tail);
  lits += tail;
  *literal_count = (u32)(lits - w->lits);
  return nseq;
}

static __attribute__((noinline)) u32 find_fast(const u8 *base, u32 start,
                                               u32 end, u32 short_log, Work *w,
                                               u32 *literal_count) {
  return find_sequences(base, start, end, 0, short_log, 1, 0, w,
                        literal_count);
}

static __attribute__((noinline)) u32 find_small(const u8 *base, u32 start,
                                                u32 end, Work *w,
                                                u32 *literal_count) {
  return find_sequences(base, start, end, 0, SMALL_LOG, 1, 1, w,
                        literal_count);
}

static __attribute__((noinline)) u32 find_double(const u8 *base, u32 start,
                                                 u32 end, u32 long_log,
                                                 u32 short_log, Work *w,
                                                 u32 *literal_count) {
  return find_sequences(base, start, end, long_log, short_log, 0, 0, w,
                        literal_count);
}

/*
 * Compresses input[start, end) (matches reach back to the frame's start)
 * into w->body; the body's size, or 0 when not smaller than the block.
 */
static u32 compress_block(const u8 *base, u32 start, u32 end, u32 long_log,
                          u32 short_log, int fast, Work *w) {
  u32 literal_count;
  u32 nseq = fast == 2   ? find_small(base, start, end, w, &literal_count)
             : fast == 1 ? find_fast(base, start, end, short_log, w,
                                     &literal_count)
                         : find_double(base, start, end, long_log, short_log,
                                       w, &literal_count);
  u32 size = end - start;

  u8 *out = w->body;
  u8 *at = write_literals(w->lits, literal_count, out);
  if (nseq == 0) {
    *at++ = 0;
    return (u32)(at - out) < size ? (u32)(at - out) : 0;
  }
  if ((u32)(at - out) + 4 >= size) return 0;
  if (nseq < 128) *at++ = (u8)nseq;
  else if (nseq < 0x7f00) {
    *at++ = (u8)((nseq >> 8) + 128);
    *at++ = (u8)nseq;
  } else {
    *at++ = 0xff;
    *at++ = (u8)(nseq - 0x7f00);
    *at++ = (u8)((nseq - 0x7f00) >> 8);
  }
  u32 ll_histogram[36], ml_histogram[53], of_histogram[32];
  for (u32 s = 0; s < 36; s++) ll_histogram[s] = 0;
  for (u32 s = 0; s < 53; s++) ml_histogram[s] = 0;
  for (u32 s = 0; s < 32; s++) of_histogram[s] = 0;
  for (u32 k = 0; k < nseq; k++) {
    u32 ll = w->lit_lengths[k];
    u32 ml = w->match_lengths[k] - 3;
    u32 ll_code = ll < 64 ? LL_CODE[ll] : highbit(ll) + 19;
    u32 ml_code = ml < 128 ? ML_CODE[ml] : highbit(ml) + 36;
    u32 of_code = highbit(w->offsets[k]);
    w->ll_codes[k] = (u8)ll_code;
    w->ml_codes[k] = (u8)ml_code;
    w->of_codes[k] = (u8)of_code;
    ll_histogram[ll_code]++;
    ml_histogram[ml_code]++;
    of_histogram[of_code]++;
  }
  static Fse ll_own, of_own, ml_own;
  u8 *modes = at++;
  u32 ll_mode, of_mode, ml_mode;
  const Fse *ll_table =
      choose_table(ll_histogram, 36, nseq, &LL_PREDEFINED, LL_DEFAULT, 36, 9,
                   &ll_own, &ll_mode, &at);
  const Fse *of_table =
      choose_table(of_histogram, 32, nseq, &OF_PREDEFINED, OF_DEFAULT, 29, 8,
                   &of_own, &of_mode, &at);
  const Fse *ml_table =
      choose_table(ml_histogram, 53, nseq, &ML_PREDEFINED, ML_DEFAULT, 53, 9,
                   &ml_own, &ml_mode, &at);
  *modes = (u8)((ll_mode << 6) | (of_mode << 4) | (ml_mode << 2));
  if ((u32)(at - out) + 4 >= size) return 0;

  Bits b = {at, 0, 0};
  u32 k = nseq - 1;
  u32 ll_state = ll_table->first[w->ll_codes[k]];
  u32 ml_state = ml_table->first[w->ml_codes[k]];
  u32 of_state = of_table->first[w->of_codes[k]];
  u8 *limit = out + size;
  for (;;) {
    u32 ll_code = w->ll_codes[k], ml_code = w->ml_codes[k],
        of_code = w->of_codes[k];
    /* Extra bits, the reverse of the decoder's order. */
    bits_add(&b, w->lit_lengths[k] - LL_BASE[ll_code], LL_BITS[ll_code]);
    bits_add(&b, w->match_lengths[k] - ML_BASE[ml_code], ML_BITS[ml_code]);
    bits_flush(&b);
    bits_add(&b, w->offsets[k] - (1u << of_code), of_code);
    bits_flush(&b);
    if (b.p >= limit) return 0;
    if (k == 0) break;
    k--;
    /* Transitions into sequence k + 1 (offsets, match, literal lengths). */
    of_state = fse_step(of_table, &b, of_state, w->of_codes[k]);
    ml_state = fse_step(ml_table, &b, ml_state, w->ml_codes[k]);
    ll_state = fse_step(ll_table, &b, ll_state, w->ll_codes[k]);
    bits_flush(&b);
  }
  bits_add(&b, ml_state, ml_table->log);
  bits_add(&b, of_state, of_table->log);
  bits_add(&b, ll_state, ll_table->log);
  at = bits_finish(&b);
  return (u32)(at - out) < size ? (u32)(at - out) : 0;
}

static void block_header(u8 *out, u32 value) {
  out[0] = (u8)value;
  out[1] = (u8)(value >> 8);
  out[2] = (u8)(value >> 16);
}

/* Whether input[start, end) is one byte repeated. */
static int is_run(const u8 *in, u32 start, u32 end) {
  u8 first = in[start];
  u64 pattern = 0x0101010101010101ULL * first;
  u32 i = start;
  for (; i + 8 <= end; i += 8) if (load64(in + i) != pattern) return 0;
  for (; i < end; i++) if (in[i] != first) return 0;
  return 1;
}

/*
 * Compresses in[0, n) into one zstd frame at out (room for
 * 9 + 3 * blocks + n bytes and SLACK); answers the frame's size. work
 * holds zstd_enc_work_size(n) bytes.
 */
EXPORT(zstd_enc_frame)
u32 zstd_enc_frame(const u8 *in, u32 n, u8 *out, u8 *work, u32 level) {
  int fast = level < 3;
  if (!ready) init();
  u8 *at = out;
  at[0] = 0x28;
  at[1] = 0xb5;
  at[2] = 0x2f;
  at[3] = 0xfd;
  at += 5;
  if (n < 256) {
    out[4] = 0x20; /* single segment, 1-byte content size */
    *at++ = (u8)n;
  } else if (n < 65536 + 256) {
    out[4] = 0x60; /* 2-byte content size, minus 256 */
    *at++ = (u8)(n - 256);
    *at++ = (u8)((n - 256) >> 8);
  } else {
    out[4] = 0xa0; /* 4-byte content size */
    for (u32 i = 0; i < 4; i++) *at++ = (u8)(n >> (8 * i));
  }
  if (n == 0) {
    block_header(at, 1); /* last, raw, empty */
    return (u32)(at + 3 - out);
  }
  /* Stale positions: below gen_base. Before the counter wraps, clear. */
  if (gen_base > 0xf0000000u - n) {
    for (u32 i = 0; i < (1u << MAX_HASH_LOG); i++) long_table[i] = 0;
    for (u32 i = 0; i < (1u << (MAX_HASH_LOG - 1)); i++) short_table[i] = 0;
    gen_base = 1;
  }
  u32 log = n > 1 ? highbit(n - 1) + 1 : 1;
  u32 long_log = log < MIN_HASH_LOG ? MIN_HASH_LOG
                 : log > MAX_HASH_LOG ? MAX_HASH_LOG
                                      : log;
  u32 short_log = long_log - 1;
  if (fast && n <= SMALL_MAX) {
    fast = 2;
    __builtin_memset(small_table, 0, sizeof small_table);
  }
  u32 block = n < BLOCK_MAX ? n : BLOCK_MAX;
  Work w = layout(work, block);
  reps[0] = 1;
  reps[1] = 4;
  reps[2] = 8;
  for (u32 start = 0; start < n; start += BLOCK_MAX) {
    u32 end = n - start > BLOCK_MAX ? start + BLOCK_MAX : n;
    u32 last = end == n ? 1 : 0;
    u32 size = end - start;
    if (is_run(in, start, end)) {
      block_header(at, last | (1 << 1) | (size << 3));
      at[3] = in[start];
      at += 4;
      continue;
    }
    u32 packed = compress_block(in, start, end, long_log, short_log, fast, &w);
    if (packed > 0 && packed < size) {
      /* The decoder's repeat offsets move only through compressed blocks. */
      reps[0] = block_reps[0];
      reps[1] = block_reps[1];
      reps[2] = block_reps[2];
      block_header(at, last | (2 << 1) | (packed << 3));
      __builtin_memcpy(at + 3, w.body, packed);
      at += 3 + packed;
    } else {
      block_header(at, last | (size << 3));
      __builtin_memcpy(at + 3, in + start, size);
      at += 3 + size;
    }
  }
  gen_base += n + 1;
  return (u32)(at - out);
}
