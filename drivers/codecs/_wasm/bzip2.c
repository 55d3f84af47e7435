/*
 * The bzip2 block decoder, for drivers/codecs/bzip2.ts, which reads the
 * stream framing (the `BZh` header, each block's magic and stored CRC,
 * the end magic and stream CRC) and calls this for each block, in three
 * steps:
 *
 *   bz2_block(in, n, bitpos, level, work)
 *     reads one block from bit `bitpos` of in[0..n) (just after the
 *     block's stored CRC): the randomised bit, origPtr, the bytes in use,
 *     the Huffman tables and selectors, then the symbols, undoing
 *     Huffman, RUNA/RUNB and move-to-front into the block's last column
 *     L. Answers the block's length, or a negative BZ_E_* code (bz2.ts
 *     names each one, with bz2_detail_a/b); bz2_bitpos() is where the
 *     block ended.
 *   bz2_bwt()
 *     undoes the Burrows-Wheeler transform of that block in place.
 *   bz2_output(out, cap)
 *     undoes the first run-length step into out[0..cap), answering the
 *     bytes written; call again (with fresh room) until bz2_done(). The
 *     block CRC of all the bytes written is bz2_crc() then.
 *
 * `work` holds 9 bytes per byte of the largest block (level × 100 000)
 * plus BZ_WORK_SLACK: the forward links tt (u32), the backward links lf
 * (u32) and the bytes ll (u8). bz2_work_size(level) says how much.
 *
 * Bounds on hostile input: every loop runs at most a block's worth of
 * symbols or a table's worth of entries; runs are checked against the
 * block size before they are written; origPtr must be inside the block.
 * The bit reader loads 8 bytes at `p`, which never passes in + n (past it
 * the block is truncated: BZ_E_TRUNCATED), so the loads stay inside the
 * SLACK bytes the caller zeroes after the input.
 *
 * Speed (measured with `deno task bench codecs`; see the README):
 *  - a 64-bit bit buffer refilled branch-free (8 bytes loaded, whole bytes
 *    taken), two Huffman symbols per refill;
 *  - one table lookup for codes up to LOOKUP_BITS long, a canonical
 *    search for the longer (rare) ones;
 *  - move-to-front in aligned 8-byte words (see mtf_move);
 *  - the inverse transform of a block of 64 KiB or more walks LANES
 *    chains at once from flagged rows and joins the pieces (see
 *    walk_lanes): each step is a cache miss in a 3.6 MB array, and
 *    independent chains keep that many misses in flight. Smaller blocks
 *    walk two: forward from origPtr through tt (the text's first half)
 *    and backward through lf (its second half, from the end);
 *  - each link holds its byte in the low 8 bits, so one load gives both.
 *
 * For the 64 MiB codec sample (bzip2 -9, load 5-6, CPU time): symbols
 * 0.50-0.52 s, the inverse transform 0.22-0.25 s (one chain: about
 * 0.6 s; two: 0.5-0.7 s), run-length step and CRC 0.11-0.14 s.
 */
#include "common.h"

#define BZ_E_TRUNCATED -1    /* the input ends inside the block */
#define BZ_E_RANDOMISED -2   /* randomised block (bzip2 0.9.0) */
#define BZ_E_NO_BYTES -3     /* the block uses no byte values */
#define BZ_E_GROUPS -4       /* nGroups (a) not 2..6 */
#define BZ_E_SELECTORS -5    /* nSelectors 0 */
#define BZ_E_SELECTOR -6     /* selector a names a table past nGroups b */
#define BZ_E_CODE_LENGTH -7  /* table a code length b not 1..20 */
#define BZ_E_OVERSUBSCRIBED -8 /* table a's code lengths are oversubscribed */
#define BZ_E_CODE -9         /* a bit pattern that is no code of the table */
#define BZ_E_NO_SELECTOR -10 /* more symbols than selectors */
#define BZ_E_RUN -11         /* a run longer than the block */
#define BZ_E_LONG -12        /* block longer than a bytes */
#define BZ_E_ORIGPTR -13     /* origPtr a past the block's b bytes */
#define BZ_E_LEVEL -14       /* level not 1..9 */

#define GROUP_SIZE 50
#define MAX_GROUPS 6
#define MAX_ALPHA 258
#define MAX_SELECTORS 18002
#define MAX_CODE_LENGTH 20
#define LOOKUP_BITS 10
/* Spare bytes after ll: run fills and move-to-front go 8 bytes a step. */
#define BZ_WORK_SLACK 64

/* One Huffman table: the lookup for short codes, the canonical search
 * for long ones. */
struct table {
  /* LOOKUP_BITS-bit prefix -> symbol << 5 | length; 0 for longer codes */
  u16 lookup[1 << LOOKUP_BITS];
  /* per length: the first code, how many codes, where their symbols start */
  u32 first[MAX_CODE_LENGTH + 1];
  u32 count[MAX_CODE_LENGTH + 1];
  u32 offset[MAX_CODE_LENGTH + 1];
  u16 symbols[MAX_ALPHA];
  u32 max_length;
};

static struct table tables[MAX_GROUPS];
static u8 selectors[MAX_SELECTORS];

/* The block being decoded. */
static u32 *tt, *lf;
static u8 *ll;
static u32 nblock, orig_ptr, end_bitpos;
static u32 counts[256];
static u32 detail_a, detail_b;

/* The run-length step's progress through ll (bz2_output). */
static u32 out_k, out_last, out_same, out_pending, out_crc;
static u8 out_byte;

/* bzip2's CRC-32 (MSB first, polynomial 0x04c11db7), sliced by 8: table k
 * holds the CRC of a byte followed by k zero bytes. */
static u32 crc_tables[8][256];
static int crc_ready = 0;

static void crc_init(void) {
  for (u32 i = 0; i < 256; i++) {
    u32 c = i << 24;
    for (int k = 0; k < 8; k++) c = c & 0x80000000u ? (c << 1) ^ 0x04c11db7u : c << 1;
    crc_tables[0][i] = c;
  }
  for (int k = 1; k < 8; k++) {
    for (u32 i = 0; i < 256; i++) {
      const u32 c = crc_tables[k - 1][i];
      crc_tables[k][i] = (c << 8) ^ crc_tables[0][c >> 24];
    }
  }
  crc_ready = 1;
}

/* The CRC register `c` (not inverted) carried over bytes[0..n). */
static u32 crc_update(u32 c, const u8 *bytes, u32 n) {
  u32 i = 0;
  for (; i + 8 <= n; i += 8) {
    const u8 *b = bytes + i;
    const u32 a = c ^ ((u32)b[0] << 24 | (u32)b[1] << 16 | (u32)b[2] << 8 | b[3]);
    c = crc_tables[7][a >> 24] ^ crc_tables[6][(a >> 16) & 0xff] ^
        crc_tables[5][(a >> 8) & 0xff] ^ crc_tables[4][a & 0xff] ^
        crc_tables[3][b[4]] ^ crc_tables[2][b[5]] ^ crc_tables[1][b[6]] ^
        crc_tables[0][b[7]];
  }
  for (; i < n; i++) c = (c << 8) ^ crc_tables[0][(c >> 24) ^ bytes[i]];
  return c;
}

static inline u64 load64be(const u8 *p) { return __builtin_bswap64(load64(p)); }

/* The bit reader: the top `count` bits of `buf` are the next bits of the
 * stream, and p * 8 == (bits consumed) + count. */
struct bits {
  u64 buf;
  u32 count;
  const u8 *p;
  const u8 *end;
};

/* Tops the buffer up to 56..63 bits; 0 when that would read past `end`. */
static inline int refill(struct bits *r) {
  r->buf |= load64be(r->p) >> r->count;
  r->p += (63 - r->count) >> 3;
  r->count |= 56;
  return r->p <= r->end;
}

/* The next `n` (1..24) bits, after a refill. */
static inline u32 take(struct bits *r, u32 n) {
  const u32 v = (u32)(r->buf >> (64 - n));
  r->buf <<= n;
  r->count -= n;
  return v;
}

static int build_table(struct table *t, const u8 *lengths, u32 alpha_size, u32 which) {
  u32 count[MAX_CODE_LENGTH + 2];
  for (u32 i = 0; i <= MAX_CODE_LENGTH + 1; i++) count[i] = 0;
  u32 max_length = 0;
  for (u32 s = 0; s < alpha_size; s++) {
    count[lengths[s]]++;
    if (lengths[s] > max_length) max_length = lengths[s];
  }
  u32 code = 0, at = 0;
  for (u32 len = 1; len <= MAX_CODE_LENGTH; len++) {
    t->first[len] = code;
    t->offset[len] = at;
    t->count[len] = count[len];
    code += count[len];
    at += count[len];
    if (code > (1u << len)) {
      detail_a = which;
      return BZ_E_OVERSUBSCRIBED;
    }
    code <<= 1;
  }
  u32 next[MAX_CODE_LENGTH + 1];
  for (u32 len = 1; len <= MAX_CODE_LENGTH; len++) next[len] = t->offset[len];
  for (u32 s = 0; s < alpha_size; s++) t->symbols[next[lengths[s]]++] = (u16)s;
  for (u32 i = 0; i < (1u << LOOKUP_BITS); i++) t->lookup[i] = 0;
  for (u32 len = 1; len <= LOOKUP_BITS && len <= max_length; len++) {
    for (u32 k = 0; k < t->count[len]; k++) {
      const u16 entry = (u16)(t->symbols[t->offset[len] + k] << 5 | len);
      const u32 start = (t->first[len] + k) << (LOOKUP_BITS - len);
      const u32 stop = start + (1u << (LOOKUP_BITS - len));
      for (u32 i = start; i < stop; i++) t->lookup[i] = entry;
    }
  }
  t->max_length = max_length;
  return 0;
}

/* Decodes one symbol with table t; needs 20 bits in the buffer. Answers
 * the symbol, or -1 for a bit pattern that is no code. */
static inline int decode_symbol(struct bits *r, const struct table *t) {
  const u32 entry = t->lookup[r->buf >> (64 - LOOKUP_BITS)];
  if (__builtin_expect(entry != 0, 1)) {
    const u32 len = entry & 31;
    r->buf <<= len;
    r->count -= len;
    return (int)(entry >> 5);
  }
  for (u32 len = LOOKUP_BITS + 1; len <= t->max_length; len++) {
    const u32 index = (u32)(r->buf >> (64 - len)) - t->first[len];
    if (index < t->count[len]) {
      r->buf <<= len;
      r->count -= len;
      return t->symbols[t->offset[len] + index];
    }
  }
  return -1;
}

/*
 * Moves byte j of the move-to-front list (32 little-endian words, byte
 * 0 in front) to the front and answers it: the word holding it shifts
 * its lower bytes up in a register, each word below takes one byte from
 * the word before. Whole aligned words only, so the next symbol's load
 * is forwarded from these stores (byte stores or unaligned word moves
 * made each load after a far move wait for the stores to drain).
 */
static inline u32 mtf_move(u64 *list, u32 j) {
  const u32 k = j >> 3, r = j & 7;
  const u64 w = list[k];
  const u32 v = (u32)(w >> (8 * r)) & 0xff;
  const u64 low = ~0ull >> (56 - 8 * r); /* bytes 0..r */
  const u64 kept = w & ~low, moved = (w << 8) & low;
  if (k == 0) {
    list[0] = kept | moved | v;
    return v;
  }
  u64 below = list[k - 1];
  list[k] = kept | moved | (below >> 56);
  for (u32 i = k - 1; i > 0; i--) {
    const u64 next = list[i - 1];
    list[i] = (below << 8) | (next >> 56);
    below = next;
  }
  list[0] = (below << 8) | v;
  return v;
}

EXPORT(bz2_work_size) u32 bz2_work_size(u32 level) {
  return level * 100000 * 9 + BZ_WORK_SLACK;
}

EXPORT(bz2_bitpos) u32 bz2_bitpos(void) { return end_bitpos; }
EXPORT(bz2_detail_a) u32 bz2_detail_a(void) { return detail_a; }
EXPORT(bz2_detail_b) u32 bz2_detail_b(void) { return detail_b; }

EXPORT(bz2_block)
int bz2_block(const u8 *in, u32 n, u32 bitpos, u32 level, u8 *work) {
  if (level < 1 || level > 9) return BZ_E_LEVEL;
  const u32 max_block = level * 100000;
  tt = (u32 *)work;
  lf = tt + max_block;
  ll = (u8 *)(lf + max_block);
  nblock = 0;
  out_k = 0;
  out_last = 256;
  out_same = 0;
  out_pending = 0;
  out_crc = 0xffffffffu;

  struct bits r = {0, 0, in + (bitpos >> 3), in + n};
  if (!refill(&r)) return BZ_E_TRUNCATED;
  if (bitpos & 7) take(&r, bitpos & 7);

  if (take(&r, 1)) return BZ_E_RANDOMISED;
  orig_ptr = take(&r, 24);

  /* The bytes in use, as the front-to-back list move-to-front starts
   * with (the bytes themselves, not their ranks). */
  u64 list[32];
  u8 *const mtf = (u8 *)list;
  u32 n_in_use = 0;
  if (!refill(&r)) return BZ_E_TRUNCATED;
  const u32 ranges = take(&r, 16);
  for (u32 i = 0; i < 16; i++) {
    if (!(ranges & (0x8000u >> i))) continue;
    if (!refill(&r)) return BZ_E_TRUNCATED;
    const u32 used = take(&r, 16);
    for (u32 j = 0; j < 16; j++) {
      if (used & (0x8000u >> j)) mtf[n_in_use++] = (u8)(i * 16 + j);
    }
  }
  if (n_in_use == 0) return BZ_E_NO_BYTES;
  for (u32 i = n_in_use; i < 256; i++) mtf[i] = 0;
  const u32 alpha_size = n_in_use + 2;

  if (!refill(&r)) return BZ_E_TRUNCATED;
  const u32 n_groups = take(&r, 3);
  if (n_groups < 2 || n_groups > MAX_GROUPS) {
    detail_a = n_groups;
    return BZ_E_GROUPS;
  }
  const u32 declared = take(&r, 15);
  if (declared < 1) return BZ_E_SELECTORS;
  const u32 n_selectors = declared < MAX_SELECTORS ? declared : MAX_SELECTORS;
  u8 group_mtf[MAX_GROUPS] = {0, 1, 2, 3, 4, 5};
  for (u32 i = 0; i < declared; i++) {
    if (!refill(&r)) return BZ_E_TRUNCATED;
    u32 j = 0;
    while (take(&r, 1)) {
      if (++j >= n_groups) {
        detail_a = i;
        detail_b = n_groups;
        return BZ_E_SELECTOR;
      }
    }
    if (i >= n_selectors) continue;
    const u8 g = group_mtf[j];
    for (; j > 0; j--) group_mtf[j] = group_mtf[j - 1];
    group_mtf[0] = g;
    selectors[i] = g;
  }

  u8 lengths[MAX_ALPHA];
  for (u32 t = 0; t < n_groups; t++) {
    if (!refill(&r)) return BZ_E_TRUNCATED;
    u32 len = take(&r, 5);
    for (u32 s = 0; s < alpha_size; s++) {
      for (;;) {
        if (len < 1 || len > MAX_CODE_LENGTH) {
          detail_a = t;
          detail_b = len;
          return BZ_E_CODE_LENGTH;
        }
        if (!refill(&r)) return BZ_E_TRUNCATED;
        if (!take(&r, 1)) break;
        len += take(&r, 1) ? -1u : 1u;
      }
      lengths[s] = (u8)len;
    }
    const int status = build_table(&tables[t], lengths, alpha_size, t);
    if (status) return status;
  }

  /* The symbols. Two per refill: 56 bits hold two codes of up to 20. */
  for (u32 i = 0; i < 256; i++) counts[i] = 0;
  const u32 end_of_block = n_in_use + 1;
  u32 nb = 0, run = 0, weight = 1;
  u8 *const out = ll;
  for (u32 group = 0;; group++) {
    if (group >= n_selectors) return BZ_E_NO_SELECTOR;
    const struct table *t = &tables[selectors[group]];
    for (u32 k = 0; k < GROUP_SIZE; k++) {
      if ((k & 1) == 0 && !refill(&r)) return BZ_E_TRUNCATED;
      const int symbol = decode_symbol(&r, t);
      if (symbol < 0) return BZ_E_CODE;
      if (symbol <= 1) {
        /* RUNA adds the weight, RUNB twice it: bijective base 2. */
        run += weight << symbol;
        weight <<= 1;
        if (run > max_block) return BZ_E_RUN;
        continue;
      }
      if (run > 0) {
        if (nb + run > max_block) {
          detail_a = max_block;
          return BZ_E_LONG;
        }
        const u8 b = mtf[0];
        counts[b] += run;
        const u64 eight = 0x0101010101010101ull * b;
        u8 *to = out + nb;
        for (u8 *stop = to + run; to < stop; to += 8) store64(to, eight);
        nb += run;
        run = 0;
        weight = 1;
      }
      if ((u32)symbol == end_of_block) goto done;
      if (nb >= max_block) {
        detail_a = max_block;
        return BZ_E_LONG;
      }
      const u8 b = (u8)mtf_move(list, (u32)symbol - 1);
      counts[b]++;
      out[nb++] = b;
    }
  }
done:
  end_bitpos = (u32)(r.p - in) * 8 - r.count;
  if (orig_ptr >= nb) {
    detail_a = orig_ptr;
    detail_b = nb;
    return BZ_E_ORIGPTR;
  }
  nblock = nb;
  return (int)nb;
}

/*
 * The inverse transform of a large block walks LANES chains at once: rows
 * 0, 512, 1024, ... and origPtr are flagged (bit 31 of their tt entry);
 * each lane walks forward from one flagged row until it reaches another,
 * writing the bytes into 1 KiB chunks of an arena (the lf area, unused by
 * this path), then takes the next flagged row. The segments are then
 * joined in text order, from origPtr's, each ending at the row where the
 * next begins. A walk is one cache miss per byte; LANES independent ones
 * keep that many misses in flight (a single chain waits for each).
 */
#define LANES 8
#define SEG_SHIFT 9
#define CHUNK 1024
#define FLAG 0x80000000u
#define NO_ROW 0xffffffffu
#define MAX_SEGS ((900000 >> SEG_SHIFT) + 2)
#define MAX_CHUNKS (900000 / CHUNK + MAX_SEGS + LANES + 2)
/* Blocks smaller than this walk two chains (forward and backward). */
#define LANES_FROM 65536

static u32 seg_chunk[MAX_SEGS], seg_len[MAX_SEGS], seg_end[MAX_SEGS];
static u32 chunk_next[MAX_CHUNKS];
static u32 lane_seg[LANES], lane_chunk[LANES], lane_chunks[LANES];
static u8 *arena;
static u8 *lane_p;
static u32 chunks_used, n_segs, next_seg, aligned_segs;

static inline u32 seg_row(u32 s) { return s < aligned_segs ? s << SEG_SHIFT : orig_ptr; }

static inline u32 seg_of(u32 row) {
  return (row & ((1u << SEG_SHIFT) - 1)) == 0 ? row >> SEG_SHIFT : aligned_segs;
}

/* Starts lane l on the next segment, one step in: answers its row and
 * leaves its write pointer in lane_p; NO_ROW when none are left. */
static u32 start_segment(u32 l) {
  if (next_seg >= n_segs) return NO_ROW;
  const u32 s = next_seg++;
  const u32 c = chunks_used++;
  seg_chunk[s] = c;
  lane_seg[l] = s;
  lane_chunk[l] = c;
  lane_chunks[l] = 1;
  u8 *p = arena + c * CHUNK;
  const u32 v = tt[seg_row(s)];
  *p++ = (u8)v;
  lane_p = p;
  return (v >> 8) & 0xfffff;
}

/* Lane l reached flagged row `row` with its pointer at p: ends its
 * segment there and starts the next (as start_segment). */
__attribute__((noinline)) static u32 end_segment(u32 l, u32 row, u8 *p) {
  const u32 s = lane_seg[l];
  seg_end[s] = row;
  seg_len[s] = (lane_chunks[l] - 1) * CHUNK + (u32)((unsigned long)p & (CHUNK - 1));
  return start_segment(l);
}

/* Lane l filled its chunk: answers the next one. */
__attribute__((noinline)) static u8 *chunk_full(u32 l) {
  const u32 c = chunks_used++;
  chunk_next[lane_chunk[l]] = c;
  lane_chunk[l] = c;
  lane_chunks[l]++;
  return arena + c * CHUNK;
}

static void walk_lanes(u32 n, u8 *text) {
  arena = (u8 *)(((unsigned long)lf + CHUNK - 1) & ~(unsigned long)(CHUNK - 1));
  aligned_segs = ((n - 1) >> SEG_SHIFT) + 1;
  n_segs = aligned_segs + ((orig_ptr & ((1u << SEG_SHIFT) - 1)) != 0);
  next_seg = 0;
  chunks_used = 0;
  for (u32 s = 0; s < n_segs; s++) tt[seg_row(s)] |= FLAG;

  u32 row[LANES];
  u8 *p[LANES];
  for (u32 l = 0; l < LANES; l++) {
    row[l] = start_segment(l);
    p[l] = lane_p;
  }
  u32 last = LANES;
  for (;;) {
#pragma clang loop unroll(full)
    for (u32 l = 0; l < LANES; l++) {
      const u32 v = tt[row[l]];
      if (__builtin_expect(v >> 31, 0)) {
        const u32 next = end_segment(l, row[l], p[l]);
        if (next == NO_ROW) {
          last = l;
          goto tail;
        }
        row[l] = next;
        p[l] = lane_p;
        continue;
      }
      *p[l]++ = (u8)v;
      row[l] = (v >> 8) & 0xfffff;
      if (__builtin_expect(((unsigned long)p[l] & (CHUNK - 1)) == 0, 0)) p[l] = chunk_full(l);
    }
  }
tail:
  /* No segments are left: the other lanes finish theirs one by one. */
  for (u32 l = 0; l < LANES; l++) {
    if (l == last) continue;
    u32 r = row[l];
    u8 *q = p[l];
    for (;;) {
      const u32 v = tt[r];
      if (v >> 31) {
        end_segment(l, r, q);
        break;
      }
      *q++ = (u8)v;
      r = (v >> 8) & 0xfffff;
      if (((unsigned long)q & (CHUNK - 1)) == 0) q = chunk_full(l);
    }
  }

  /* Join the segments from origPtr's until the walk is back there; a
   * shorter cycle than the block (a periodic block) repeats. */
  u32 total = 0;
  u32 s = seg_of(orig_ptr);
  for (u32 guard = 0; guard < n_segs && total < n; guard++) {
    u32 len = seg_len[s];
    if (len > n - total) len = n - total;
    for (u32 c = seg_chunk[s]; len > 0; c = chunk_next[c]) {
      const u32 m = len < CHUNK ? len : CHUNK;
      __builtin_memcpy(text + total, arena + c * CHUNK, m);
      total += m;
      len -= m;
    }
    const u32 end = seg_end[s];
    if (end == orig_ptr) break;
    s = seg_of(end);
  }
  for (u32 k = total; k < n; k++) text[k] = text[k - total];
}

EXPORT(bz2_bwt) void bz2_bwt(void) {
  const u32 n = nblock;
  if (n == 0) return;
  /* Where each byte's rows start in the sorted order. */
  u32 next[256];
  for (u32 b = 0, sum = 0; b < 256; b++) {
    next[b] = sum;
    sum += counts[b];
  }
  /* Row d = LF(i) starts with ll[i] followed by row i: forward, row d
   * gives its first byte and links to i; backward, row i gives the byte
   * before it (ll[i]) and links to d. ll is free after this: the text
   * goes there. */
  u8 *const text = ll;
  if (n >= LANES_FROM) {
    for (u32 i = 0; i < n; i++) {
      const u32 b = ll[i];
      tt[next[b]++] = i << 8 | b;
    }
    walk_lanes(n, text);
    return;
  }
  for (u32 i = 0; i < n; i++) {
    const u32 b = ll[i];
    const u32 d = next[b]++;
    tt[d] = i << 8 | b;
    lf[i] = d << 8 | b;
  }
  /* Both chains start at origPtr: forward it yields the text from its
   * first byte, backward from its last. */
  const u32 half = n >> 1;
  u32 a = orig_ptr, z = orig_ptr;
  for (u32 k = 0; k < half; k++) {
    const u32 va = tt[a], vz = lf[z];
    text[k] = (u8)va;
    text[n - 1 - k] = (u8)vz;
    a = va >> 8;
    z = vz >> 8;
  }
  if (n & 1) text[half] = (u8)tt[a];
}

EXPORT(bz2_output) u32 bz2_output(u8 *out, u32 cap) {
  if (!crc_ready) crc_init();
  const u8 *const text = ll;
  const u32 n = nblock;
  u32 k = out_k, last = out_last, same = out_same, op = 0;
  if (out_pending) {
    const u32 m = out_pending < cap ? out_pending : cap;
    __builtin_memset(out, out_byte, m);
    op = m;
    out_pending -= m;
  }
  /* One test per byte on the common path (a byte unlike the one before). */
  while (k < n && op < cap) {
    const u32 ch = text[k++];
    out[op++] = (u8)ch;
    if (ch != last) {
      last = ch;
      same = 1;
    } else if (++same == 4) {
      if (k < n) {
        const u32 count = text[k++];
        const u32 room = cap - op;
        const u32 m = count < room ? count : room;
        __builtin_memset(out + op, (int)ch, m);
        op += m;
        out_pending = count - m;
        out_byte = (u8)ch;
      }
      same = 0;
      last = 256;
    }
  }
  out_k = k;
  out_last = last;
  out_same = same;
  out_crc = crc_update(out_crc, out, op);
  return op;
}

EXPORT(bz2_done) u32 bz2_done(void) { return out_k >= nblock && out_pending == 0; }
EXPORT(bz2_crc) u32 bz2_crc(void) { return ~out_crc; }
