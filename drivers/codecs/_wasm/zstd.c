/*
 * A zstd compressed block (RFC 8878 3.1.1.3) and the frame checksum
 * (XXH64), for drivers/codecs/zstd.ts, which walks frames and block
 * headers, keeps the window and calls zstd_block once per compressed
 * block. Written from RFC 8878; every read of the block stays inside
 * [src, src + size) plus the caller's SLACK, every write inside the
 * block's output limit plus SLACK, and every loop is bounded by the block
 * (at most 128 KiB of output, each sequence writing at least 3 bytes).
 *
 * State kept across the blocks of a frame (zstd_reset at each frame):
 * the Huffman table of the last compressed literals (for treeless
 * literals), the three sequence tables (for repeat mode) and the repeat
 * offsets.
 *
 * Bitstreams read backwards (Huffman streams, FSE-coded weights,
 * sequences) are read by bit position: `pos` counts the bits still
 * unread above the stream's first bit; a read of n bits takes bits
 * [pos - n, pos) with one unaligned 64-bit load. Bits below the stream's
 * start read as zeros, and a stream that does not end exactly on its
 * first bit is corrupt.
 */
#include "common.h"

#define BLOCK_MAX (128 * 1024)
#define HUF_MAX_BITS 12
#define LL_MAX_LOG 9
#define ML_MAX_LOG 9
#define OF_MAX_LOG 8
#define LL_MAX_SYMBOL 35
#define ML_MAX_SYMBOL 52
#define OF_MAX_SYMBOL 31

/* Errors (negated): drivers/codecs/zstd.ts names each. */
enum {
  E_LITERALS_HEADER = 1,
  E_LITERALS_SIZE,
  E_HUF_TREE,
  E_HUF_WEIGHTS,
  E_TREELESS,
  E_HUF_STREAM,
  E_SEQ_HEADER,
  E_SEQ_RESERVED,
  E_FSE_TABLE,
  E_FSE_LOG,
  E_RLE_SYMBOL,
  E_REPEAT_TABLE,
  E_SEQ_STREAM,
  E_LITERAL_OVERRUN,
  E_OUTPUT,
  E_OFFSET,
  E_WEIGHT_COUNT,
  E_TRAILING,
};

/* A sequence table state: the symbol's value base and extra bits, and
 * the next state's base and bits. */
typedef struct {
  u32 base;
  u8 extra;
  u8 bits;
  u16 next;
} SeqEntry;
_Static_assert(sizeof(SeqEntry) == 8, "SeqEntry is read as one u64");

/*
 * t[i] in one 8-byte load (field by field, the compiler made four loads
 * of each entry in WebAssembly: 5% of the decoding time in V8).
 */
static inline SeqEntry entry(const SeqEntry *t, u32 i) {
  u64 v;
  __builtin_memcpy(&v, &t[i], 8);
  SeqEntry e;
  e.base = (u32)v;
  e.extra = (u8)(v >> 32);
  e.bits = (u8)(v >> 40);
  e.next = (u16)(v >> 48);
  return e;
}

/* An FSE state of the Huffman weights. */
typedef struct {
  u16 next;
  u8 symbol;
  u8 bits;
} FseEntry;

typedef struct {
  SeqEntry ll[1 << LL_MAX_LOG];
  SeqEntry ml[1 << ML_MAX_LOG];
  SeqEntry of[1 << OF_MAX_LOG];
  /* Huffman: bits << 8 | symbol, indexed by the next HUF_MAX_BITS bits
   * whatever the code's longest (see read_tree). */
  u16 huf[1 << HUF_MAX_BITS];
  u32 haveHuf;
  u32 llLog, mlLog, ofLog;
  u32 haveLl, haveMl, haveOf;
  u32 rep[3];
  /* XXH64 state. */
  u64 acc[4];
  u64 total;
  u8 pending[32];
  u32 pendingLength;
  u32 digestLow;
  u8 literals[BLOCK_MAX + SLACK];
} Ctx;

EXPORT(zstd_ctx_size)
u32 zstd_ctx_size(void) { return sizeof(Ctx); }

EXPORT(zstd_reset)
void zstd_reset(Ctx *c) {
  c->haveHuf = 0;
  c->haveLl = c->haveMl = c->haveOf = 0;
  c->rep[0] = 1;
  c->rep[1] = 4;
  c->rep[2] = 8;
}

static inline u32 high_bit(u32 v) { return 31 - (u32)__builtin_clz(v); }

static inline u32 le16(const u8 *p) { return p[0] | (u32)p[1] << 8; }

/*
 * n (at most 56) bits [pos, pos + n) of s. Below s (pos < 0) they are
 * whatever precedes the stream in memory: the input region comes after
 * the context (over 128 KiB), and callers stop within a few hundred
 * bytes of the stream's start (each checks pos as it goes, or bounds the
 * symbols a stream may hold by its bits). A valid stream never reads
 * below s except in the Huffman peek, where those bits lie past the code
 * and do not change the symbol; an invalid one is refused because it
 * does not end exactly at bit 0.
 */
static inline u64 bits_at(const u8 *s, long pos, u32 n) {
  return (load64(s + (pos >> 3)) >> (pos & 7)) & ((1ull << n) - 1);
}

/* bits_at, with the bits below s read as zeros (as the reference
 * decoder's do: the FSE-coded weights' last states may come from them). */
static inline u64 bits_at_zeroed(const u8 *s, long pos, u32 n) {
  if (pos >= 0) return bits_at(s, pos, n);
  if (pos <= -(long)n) return 0;
  return (load64(s) << (-pos)) & ((1ull << n) - 1);
}

/* ---- FSE table descriptions (RFC 8878 4.1.1) ---- */

/*
 * Reads the table description at in[0, len) into norm[0..maxSymbol] (-1
 * for "less than 1"); answers the bytes it used, or a negative error.
 */
static int read_counts(const u8 *in, u32 len, short *norm, u32 maxSymbol,
                       u32 maxLog, u32 *log) {
  if (len < 1) return -E_FSE_TABLE;
  const u32 accuracy = (in[0] & 15) + 5;
  if (accuracy > maxLog) return -E_FSE_LOG;
  const u64 limit = (u64)len * 8;
  u32 pos = 4;
  int remaining = (1 << accuracy) + 1;
  int threshold = 1 << accuracy;
  u32 nbBits = accuracy + 1;
  u32 symbol = 0;
  while (remaining > 1 && symbol <= maxSymbol) {
    const u32 v = (u32)(load64(in + (pos >> 3)) >> (pos & 7));
    const int max = (2 * threshold - 1) - remaining;
    int count;
    if ((int)(v & (threshold - 1)) < max) {
      count = (int)(v & (threshold - 1));
      pos += nbBits - 1;
    } else {
      count = (int)(v & (2 * threshold - 1));
      if (count >= threshold) count -= max;
      pos += nbBits;
    }
    count--;
    remaining -= count < 0 ? -count : count;
    norm[symbol++] = (short)count;
    if (count == 0) {
      for (;;) {
        if (pos > limit) return -E_FSE_TABLE;
        const u32 repeat = (u32)(load64(in + (pos >> 3)) >> (pos & 7)) & 3;
        pos += 2;
        if (symbol + repeat > maxSymbol) return -E_FSE_TABLE;
        for (u32 i = 0; i < repeat; i++) norm[symbol++] = 0;
        if (repeat != 3) break;
      }
    }
    while (nbBits > 1 && remaining < threshold) {
      nbBits--;
      threshold >>= 1;
    }
    if (pos > limit) return -E_FSE_TABLE;
  }
  if (remaining != 1) return -E_FSE_TABLE;
  while (symbol <= maxSymbol) norm[symbol++] = 0;
  *log = accuracy;
  return (int)((pos + 7) >> 3);
}

/*
 * Spreads the symbols of `norm` over the 1 << log states (RFC 8878
 * 4.1.1): symbol[state], and next[state] the state's "Number_of_Bits"
 * base before reduction (the caller derives bits and baseline).
 */
static int spread(const short *norm, u32 symbols, u32 log, u8 *symbolAt,
                  u16 *nextCount) {
  const u32 size = 1u << log;
  const u32 mask = size - 1;
  u32 high = size - 1;
  for (u32 s = 0; s < symbols; s++) {
    if (norm[s] == -1) {
      symbolAt[high--] = (u8)s;
      nextCount[s] = 1;
    } else {
      nextCount[s] = (u16)norm[s];
    }
  }
  const u32 step = (size >> 1) + (size >> 3) + 3;
  u32 pos = 0;
  for (u32 s = 0; s < symbols; s++) {
    for (int i = 0; i < norm[s]; i++) {
      symbolAt[pos] = (u8)s;
      do pos = (pos + step) & mask;
      while (pos > high);
    }
  }
  return pos == 0 ? 0 : -E_FSE_TABLE;
}

#include "zstd_tables.h"

/* kind: 0 literal lengths, 1 offsets, 2 match lengths. */
static inline void symbol_value(u32 kind, u32 s, u32 *base, u8 *extra) {
  if (kind == 0) {
    *base = LL_BASE[s];
    *extra = LL_BITS[s];
  } else if (kind == 2) {
    *base = ML_BASE[s];
    *extra = ML_BITS[s];
  } else {
    /* Offset_Value = (1 << code) + code extra bits. */
    *base = 1u << s;
    *extra = (u8)s;
  }
}

static int build_seq_table(SeqEntry *t, const short *norm, u32 symbols,
                           u32 log, u32 kind) {
  u8 symbolAt[1 << 9];
  u16 nextCount[64];
  const int e = spread(norm, symbols, log, symbolAt, nextCount);
  if (e) return e;
  /* Each symbol's base and extra bits once, then one 8-byte store a
   * state (every qcow2 cluster builds three tables: 5% of its time). */
  u64 value[64];
  for (u32 s = 0; s < symbols; s++) {
    u32 base;
    u8 extra;
    symbol_value(kind, s, &base, &extra);
    value[s] = base | (u64)extra << 32;
  }
  const u32 size = 1u << log;
  for (u32 u = 0; u < size; u++) {
    const u32 s = symbolAt[u];
    const u32 n = nextCount[s]++;
    const u32 bits = log - high_bit(n);
    const u64 v =
        value[s] | (u64)bits << 40 | (u64)((n << bits) - size) << 48;
    __builtin_memcpy(&t[u], &v, 8);
  }
  return 0;
}

/*
 * One sequence table from its mode (0 predefined, 1 RLE, 2 FSE, 3
 * repeat) at in[0, len); answers the bytes used or a negative error.
 */
static int seq_table(Ctx *c, u32 kind, u32 mode, const u8 *in, u32 len) {
  SeqEntry *t = kind == 0 ? c->ll : kind == 1 ? c->of : c->ml;
  u32 *log = kind == 0 ? &c->llLog : kind == 1 ? &c->ofLog : &c->mlLog;
  u32 *have = kind == 0 ? &c->haveLl : kind == 1 ? &c->haveOf : &c->haveMl;
  const u32 maxSymbol =
      kind == 0 ? LL_MAX_SYMBOL : kind == 1 ? OF_MAX_SYMBOL : ML_MAX_SYMBOL;
  const u32 maxLog = kind == 0 ? LL_MAX_LOG : kind == 1 ? OF_MAX_LOG : ML_MAX_LOG;
  if (mode == 0) {
    const short *norm = kind == 0 ? LL_DEFAULT : kind == 1 ? OF_DEFAULT : ML_DEFAULT;
    const u32 symbols = kind == 0 ? 36 : kind == 1 ? 29 : 53;
    *log = kind == 1 ? 5 : 6;
    const int e = build_seq_table(t, norm, symbols, *log, kind);
    if (e) return e;
    *have = 1;
    return 0;
  }
  if (mode == 1) {
    if (len < 1) return -E_SEQ_HEADER;
    if (in[0] > maxSymbol) return -E_RLE_SYMBOL;
    *log = 0;
    t[0].bits = 0;
    t[0].next = 0;
    symbol_value(kind, in[0], &t[0].base, &t[0].extra);
    *have = 1;
    return 1;
  }
  if (mode == 3) return *have ? 0 : -E_REPEAT_TABLE;
  short norm[64];
  const int used = read_counts(in, len, norm, maxSymbol, maxLog, log);
  if (used < 0) return used;
  if ((u32)used > len) return -E_FSE_TABLE;
  const int e = build_seq_table(t, norm, maxSymbol + 1, *log, kind);
  if (e) return e;
  *have = 1;
  return used;
}

/* ---- Huffman literals (RFC 8878 4.2) ---- */

/* Weights coded with FSE: in[0, len), at most 255 of them. */
static int fse_weights(const u8 *in, u32 len, u8 *weights) {
  short norm[256];
  u32 log;
  const int used = read_counts(in, len, norm, 255, 6, &log);
  if (used < 0) return used;
  if ((u32)used >= len) return -E_HUF_TREE;
  u8 symbolAt[64];
  u16 nextCount[256];
  FseEntry t[64];
  const int e = spread(norm, 256, log, symbolAt, nextCount);
  if (e) return e;
  const u32 size = 1u << log;
  for (u32 u = 0; u < size; u++) {
    const u32 s = symbolAt[u];
    const u32 n = nextCount[s]++;
    t[u].symbol = (u8)s;
    t[u].bits = (u8)(log - high_bit(n));
    t[u].next = (u16)((n << t[u].bits) - size);
  }
  const u8 *s = in + used;
  const u32 n = len - (u32)used;
  if (s[n - 1] == 0) return -E_HUF_TREE;
  long pos = (long)(n - 1) * 8 + high_bit(s[n - 1]);
  pos -= log;
  u32 s1 = (u32)bits_at_zeroed(s, pos, log);
  pos -= log;
  u32 s2 = (u32)bits_at_zeroed(s, pos, log);
  /* Two states in turn until the stream is overrun; then the other
   * state's symbol is the last weight. At most 255 weights. */
  u32 count = 0;
  for (;;) {
    if (count > 253) return -E_WEIGHT_COUNT;
    weights[count++] = t[s1].symbol;
    pos -= t[s1].bits;
    s1 = t[s1].next + (u32)bits_at_zeroed(s, pos, t[s1].bits);
    if (pos < 0) {
      weights[count++] = t[s2].symbol;
      break;
    }
    if (count > 253) return -E_WEIGHT_COUNT;
    weights[count++] = t[s2].symbol;
    pos -= t[s2].bits;
    s2 = t[s2].next + (u32)bits_at_zeroed(s, pos, t[s2].bits);
    if (pos < 0) {
      weights[count++] = t[s1].symbol;
      break;
    }
  }
  return (int)count;
}

/* Reads a tree description at in[0, len) into c->huf; answers its size. */
static int read_tree(Ctx *c, const u8 *in, u32 len) {
  u8 weights[256];
  if (len < 1) return -E_HUF_TREE;
  const u32 header = in[0];
  u32 count, used;
  if (header < 128) {
    if (header + 1 > len || header == 0) return -E_HUF_TREE;
    const int n = fse_weights(in + 1, header, weights);
    if (n < 0) return n;
    count = (u32)n;
    used = header + 1;
  } else {
    count = header - 127;
    used = 1 + (count + 1) / 2;
    if (used > len) return -E_HUF_TREE;
    for (u32 i = 0; i < count; i++) {
      const u8 b = in[1 + i / 2];
      weights[i] = (i & 1) ? (b & 15) : (b >> 4);
    }
  }
  u32 total = 0;
  u32 rank[HUF_MAX_BITS + 2] = {0};
  for (u32 i = 0; i < count; i++) {
    if (weights[i] > HUF_MAX_BITS) return -E_HUF_WEIGHTS;
    rank[weights[i]]++;
    if (weights[i]) total += 1u << (weights[i] - 1);
  }
  if (total == 0) return -E_HUF_WEIGHTS;
  const u32 maxBits = high_bit(total) + 1;
  if (maxBits > HUF_MAX_BITS) return -E_HUF_WEIGHTS;
  const u32 rest = (1u << maxBits) - total;
  if (rest & (rest - 1)) return -E_HUF_WEIGHTS;
  const u32 last = high_bit(rest) + 1;
  weights[count] = (u8)last;
  rank[last]++;
  /* Complete codes have an even number (at least 2) of the longest. */
  if (rank[1] < 2 || (rank[1] & 1)) return -E_HUF_WEIGHTS;
  u32 start[HUF_MAX_BITS + 2];
  u32 at = 0;
  for (u32 w = 1; w <= maxBits; w++) {
    start[w] = at;
    at += rank[w] << (w - 1);
  }
  /* The table has 1 << HUF_MAX_BITS entries whatever maxBits (each
   * code's entries repeated): the decoding loops then index it by the
   * window's top 12 bits, a shift by a constant (V8 moves every shift
   * by a variable through cl). */
  const u32 scale = HUF_MAX_BITS - maxBits;
  for (u32 s = 0; s <= count; s++) {
    const u32 w = weights[s];
    if (!w) continue;
    const u16 entry = (u16)((maxBits + 1 - w) << 8 | s);
    const u32 from = start[w] << scale, to = from + (1u << (w - 1 + scale));
    if (w - 1 + scale >= 2) {
      /* Runs of 4 entries and more: four at a time. */
      const u64 four = entry * 0x0001000100010001ull;
      for (u32 i = from; i < to; i += 4) {
        __builtin_memcpy(&c->huf[i], &four, 8);
      }
    } else {
      for (u32 i = from; i < to; i++) c->huf[i] = entry;
    }
    start[w] += 1u << (w - 1);
  }
  c->haveHuf = 1;
  return (int)used;
}

/* Where a Huffman stream's bits start (its end mark), or -1. */
static inline long huf_start(const u8 *s, u32 len) {
  if (len == 0 || s[len - 1] == 0) return -1;
  return (long)(len - 1) * 8 + high_bit(s[len - 1]);
}

/* One symbol of a Huffman stream (table in scope). */
#define HUF_SYMBOL(s, pos, out)                                    \
  do {                                                             \
    const u32 e_ = table[bits_at(s, (pos) - HUF_MAX_BITS, HUF_MAX_BITS)]; \
    (out) = (u8)e_;                                                \
    (pos) -= e_ >> 8;                                              \
  } while (0)

/* One symbol from the top of w_: stored, and its bits shifted out. */
#define HUF_TOP(w_, out)                                           \
  do {                                                             \
    const u32 e_ = table[(w_) >> (64 - HUF_MAX_BITS)];             \
    (out) = (u8)e_;                                                \
    (w_) <<= e_ >> 8;                                              \
  } while (0)

/*
 * Four symbols (at most 48 bits) from one window holding bit pos - 1 at
 * bit 63 and at least 56 bits below it (pos at least 64). A marker bit
 * just below the window's bits counts what the four took (its trailing
 * zeros), rather than a sum of the four lengths kept across them (V8
 * spilled those).
 */
#define HUF_FOUR(s, pos, out)                                      \
  do {                                                             \
    const long b_ = (pos) - 56;                                    \
    const u32 sh_ = 8 - (u32)(b_ & 7);                             \
    u64 w_ = load64((s) + (b_ >> 3)) << sh_ | 1ull << (sh_ - 1);   \
    HUF_TOP(w_, (out)[0]);                                         \
    HUF_TOP(w_, (out)[1]);                                         \
    HUF_TOP(w_, (out)[2]);                                         \
    HUF_TOP(w_, (out)[3]);                                         \
    (pos) -= (long)__builtin_ctzll(w_) - (long)(sh_ - 1);          \
  } while (0)

/*
 * Decodes n literals from the Huffman stream s[0, len) into out, starting
 * at symbol i with the stream at bit pos (after the fast loops).
 */
static int huf_finish(const Ctx *c, const u8 *s, long pos, u8 *out, u32 i,
                      u32 n) {
  const u16 *table = c->huf;
  /* Every symbol takes at least one bit. */
  if (pos < (long)(n - i)) return -E_HUF_STREAM;
  for (; i < n; i++) HUF_SYMBOL(s, pos, out[i]);
  return pos == 0 ? 0 : -E_HUF_STREAM;
}

static int huf_stream(const Ctx *c, const u8 *s, u32 len, u8 *out, u32 n) {
  long pos = huf_start(s, len);
  if (pos < 0) return -E_HUF_STREAM;
  const u16 *table = c->huf;
  u32 i = 0;
  while (pos >= 64 && i + 4 <= n) {
    HUF_FOUR(s, pos, out + i);
    i += 4;
  }
  return huf_finish(c, s, pos, out, i, n);
}

/*
 * Four streams in turn, for instruction-level parallelism: each symbol
 * of one stream waits on the previous one's length, the four do not wait
 * on each other. `seg` symbols in streams 1-3, `last` in stream 4.
 */
static int huf_four_streams(const Ctx *c, const u8 *s1, u32 l1, const u8 *s2,
                            u32 l2, const u8 *s3, u32 l3, const u8 *s4,
                            u32 l4, u8 *out, u32 seg, u32 last) {
  long p1 = huf_start(s1, l1), p2 = huf_start(s2, l2), p3 = huf_start(s3, l3),
       p4 = huf_start(s4, l4);
  if (p1 < 0 || p2 < 0 || p3 < 0 || p4 < 0) return -E_HUF_STREAM;
  const u16 *table = c->huf;
  u8 *o1 = out, *o2 = out + seg, *o3 = out + 2 * seg, *o4 = out + 3 * seg;
  u32 i = 0;
  while (p1 >= 64 && p2 >= 64 && p3 >= 64 && p4 >= 64 && i + 4 <= last) {
    HUF_FOUR(s1, p1, o1 + i);
    HUF_FOUR(s2, p2, o2 + i);
    HUF_FOUR(s3, p3, o3 + i);
    HUF_FOUR(s4, p4, o4 + i);
    i += 4;
  }
  int e = huf_finish(c, s1, p1, o1, i, seg);
  if (!e) e = huf_finish(c, s2, p2, o2, i, seg);
  if (!e) e = huf_finish(c, s3, p3, o3, i, seg);
  if (!e) e = huf_finish(c, s4, p4, o4, i, last);
  return e;
}

/*
 * The literals section at in[0, len): answers its size, and sets *lit to
 * the literals (c->literals, or in place for raw ones) and *litLength.
 */
static int literals(Ctx *c, const u8 *in, u32 len, const u8 **lit,
                    u32 *litLength) {
  if (len < 1) return -E_LITERALS_HEADER;
  const u32 type = in[0] & 3;
  const u32 format = (in[0] >> 2) & 3;
  if (type < 2) {
    u32 header, size;
    if (format == 0 || format == 2) {
      header = 1;
      size = in[0] >> 3;
    } else if (format == 1) {
      header = 2;
      if (len < 2) return -E_LITERALS_HEADER;
      size = (in[0] >> 4) + ((u32)in[1] << 4);
    } else {
      header = 3;
      if (len < 3) return -E_LITERALS_HEADER;
      size = (in[0] >> 4) + ((u32)in[1] << 4) + ((u32)in[2] << 12);
    }
    if (size > BLOCK_MAX) return -E_LITERALS_SIZE;
    *litLength = size;
    if (type == 0) {
      if (header + size > len) return -E_LITERALS_HEADER;
      *lit = in + header;
      return (int)(header + size);
    }
    if (header + 1 > len) return -E_LITERALS_HEADER;
    __builtin_memset(c->literals, in[header], size);
    *lit = c->literals;
    return (int)(header + 1);
  }
  u32 header, regenerated, compressed, streams = format == 0 ? 1 : 4;
  if (format < 2) {
    header = 3;
    if (len < 3) return -E_LITERALS_HEADER;
    const u32 v = in[0] | (u32)in[1] << 8 | (u32)in[2] << 16;
    regenerated = (v >> 4) & 1023;
    compressed = v >> 14;
  } else if (format == 2) {
    header = 4;
    if (len < 4) return -E_LITERALS_HEADER;
    const u32 v = in[0] | (u32)in[1] << 8 | (u32)in[2] << 16 | (u32)in[3] << 24;
    regenerated = (v >> 4) & 16383;
    compressed = v >> 18;
  } else {
    header = 5;
    if (len < 5) return -E_LITERALS_HEADER;
    const u32 v = in[0] | (u32)in[1] << 8 | (u32)in[2] << 16 | (u32)in[3] << 24;
    regenerated = (v >> 4) & 262143;
    compressed = (v >> 22) | (u32)in[4] << 10;
  }
  if (regenerated > BLOCK_MAX) return -E_LITERALS_SIZE;
  if (header + compressed > len) return -E_LITERALS_HEADER;
  const u8 *p = in + header;
  u32 left = compressed;
  if (type == 2) {
    const int used = read_tree(c, p, left);
    if (used < 0) return used;
    p += used;
    left -= (u32)used;
  } else if (!c->haveHuf) {
    return -E_TREELESS;
  }
  u8 *out = c->literals;
  if (streams == 1) {
    const int e = huf_stream(c, p, left, out, regenerated);
    if (e) return e;
  } else {
    if (left < 10) return -E_HUF_STREAM;
    const u32 l1 = le16(p), l2 = le16(p + 2), l3 = le16(p + 4);
    if (6 + l1 + l2 + l3 >= left) return -E_HUF_STREAM;
    const u32 l4 = left - 6 - l1 - l2 - l3;
    const u32 segment = (regenerated + 3) / 4;
    if (3 * segment > regenerated) return -E_HUF_STREAM;
    const u8 *s = p + 6;
    const int e = huf_four_streams(c, s, l1, s + l1, l2, s + l1 + l2, l3,
                                   s + l1 + l2 + l3, l4, out, segment,
                                   regenerated - 3 * segment);
    if (e) return e;
  }
  *lit = out;
  *litLength = regenerated;
  return (int)(header + compressed);
}

/* ---- Sequences (RFC 8878 3.1.1.3.2, 4.1) ---- */

/* Copies 16 bytes (two 8-byte loads and stores in WebAssembly). */
static inline __attribute__((always_inline)) void copy16(u8 *dst,
                                                         const u8 *src) {
  __builtin_memcpy(dst, src, 16);
}

/* Copies n bytes 16 at a time (may write up to 15 past dst + n). */
static inline __attribute__((always_inline)) void wild_copy(u8 *dst, const u8 *src, u32 n) {
  u8 *end = dst + n;
  do {
    __builtin_memcpy(dst, src, 16);
    dst += 16;
    src += 16;
  } while (dst < end);
}

/*
 * A match of length n at distance offset (may write up to 15 past).
 * Inlined, and without memory.fill (a call out of the module in V8):
 * the bench found a third of the sequence time here.
 */
static inline __attribute__((always_inline)) void match_copy(u8 *op,
                                                             u32 offset,
                                                             u32 n) {
  const u8 *from = op - offset;
  if (offset >= 16) {
    copy16(op, from);
    if (n > 16) wild_copy(op + 16, from + 16, n - 16);
    return;
  }
  if (offset >= 8) {
    for (u32 i = 0; i < n; i += 8) __builtin_memcpy(op + i, from + i, 8);
    return;
  }
  if (offset == 1) {
    const u64 v = from[0] * 0x0101010101010101ull;
    for (u32 i = 0; i < n; i += 8) store64(op + i, v);
    return;
  }
  /* Short distances: the first bytes one at a time, then 8 at a time
   * from a multiple of the distance of at least 8. */
  const u32 wide = offset * ((8 + offset - 1) / offset);
  u32 i = 0;
  const u32 head = wide - offset < n ? wide - offset : n;
  for (; i < head; i++) op[i] = from[i];
  for (; i < n; i += 8) __builtin_memcpy(op + i, op + i - wide, 8);
}

/*
 * Decodes the compressed block at src[0, size) to out[0, ...): at most
 * `cap` bytes, matches reaching at most `history` bytes before out.
 * Answers the bytes written, or a negative error.
 */
EXPORT(zstd_block)
int zstd_block(Ctx *c, const u8 *src, u32 size, u8 *out, u32 cap,
               u32 history) {
  const u8 *lit;
  u32 litLength;
  const int used = literals(c, src, size, &lit, &litLength);
  if (used < 0) return used;
  const u8 *p = src + used;
  const u8 *end = src + size;
  if (p >= end) return -E_SEQ_HEADER;
  u32 sequences = *p++;
  if (sequences >= 128) {
    if (sequences < 255) {
      if (p >= end) return -E_SEQ_HEADER;
      sequences = ((sequences - 128) << 8) + *p++;
    } else {
      if (end - p < 2) return -E_SEQ_HEADER;
      sequences = le16(p) + 0x7f00;
      p += 2;
    }
  }
  const u8 *litEnd = lit + litLength;
  u8 *op = out;
  u8 *const oend = out + cap;
  if (sequences == 0) {
    if (p != end) return -E_TRAILING;
    if (litLength > cap) return -E_OUTPUT;
    if (litLength) wild_copy(op, lit, litLength);
    return (int)litLength;
  }
  if (p >= end) return -E_SEQ_HEADER;
  const u32 modes = *p++;
  if (modes & 3) return -E_SEQ_RESERVED;
  int n = seq_table(c, 0, modes >> 6, p, (u32)(end - p));
  if (n < 0) return n;
  p += n;
  n = seq_table(c, 1, (modes >> 4) & 3, p, (u32)(end - p));
  if (n < 0) return n;
  p += n;
  n = seq_table(c, 2, (modes >> 2) & 3, p, (u32)(end - p));
  if (n < 0) return n;
  p += n;
  if (p >= end || end[-1] == 0) return -E_SEQ_STREAM;
  const u8 *s = p;
  long pos = (long)(end - p - 1) * 8 + high_bit(end[-1]);
  const SeqEntry *ll = c->ll, *ml = c->ml, *of = c->of;
  pos -= c->llLog;
  u32 llState = (u32)bits_at(s, pos, c->llLog);
  pos -= c->ofLog;
  u32 ofState = (u32)bits_at(s, pos, c->ofLog);
  pos -= c->mlLog;
  u32 mlState = (u32)bits_at(s, pos, c->mlLog);
  u32 rep0 = c->rep[0], rep1 = c->rep[1], rep2 = c->rep[2];
  const u8 *const lowest = out - history;
  for (u32 i = 0; i < sequences; i++) {
    const SeqEntry o = entry(of, ofState), m = entry(ml, mlState),
                   l = entry(ll, llState);
    /* The offset's extra bits come first (highest), then the match
     * length's, then the literal length's: one load for all three
     * unless they pass 56 bits (offset codes over 24). */
    const u32 extra = (u32)o.extra + m.extra + l.extra;
    u32 offset, matchLength, literalLength;
    if (extra <= 56) {
      pos -= extra;
      u64 w = load64(s + (pos >> 3)) >> (pos & 7);
      literalLength = l.base + (u32)(w & ((1ull << l.extra) - 1));
      w >>= l.extra;
      matchLength = m.base + (u32)(w & ((1ull << m.extra) - 1));
      w >>= m.extra;
      offset = o.base + (u32)(w & ((1ull << o.extra) - 1));
    } else {
      pos -= o.extra;
      offset = o.base + (u32)bits_at(s, pos, o.extra);
      pos -= m.extra;
      matchLength = m.base + (u32)bits_at(s, pos, m.extra);
      pos -= l.extra;
      literalLength = l.base + (u32)bits_at(s, pos, l.extra);
    }
    /* Repeat offsets (RFC 8878 3.1.2.5): values 1 to 3 name one. The
     * four cases are selects rather than nested branches. */
    if (offset > 3) {
      offset -= 3;
      rep2 = rep1;
      rep1 = rep0;
      rep0 = offset;
    } else {
      const u32 index = offset - 1 + (literalLength == 0);
      offset = index == 0   ? rep0
               : index == 1 ? rep1
               : index == 2 ? rep2
                            : rep0 - 1;
      if (offset == 0) return -E_OFFSET;
      rep2 = index >= 2 ? rep1 : rep2;
      rep1 = index >= 1 ? rep0 : rep1;
      rep0 = offset;
    }
    if (i + 1 < sequences) {
      /* The states' bits, literal length's first (highest): at most 26. */
      pos -= (u32)l.bits + m.bits + o.bits;
      u32 w = (u32)(load64(s + (pos >> 3)) >> (pos & 7));
      ofState = o.next + (w & ((1u << o.bits) - 1));
      w >>= o.bits;
      mlState = m.next + (w & ((1u << m.bits) - 1));
      w >>= m.bits;
      llState = l.next + (w & ((1u << l.bits) - 1));
    }
    if (pos < 0) return -E_SEQ_STREAM;
    if ((u32)(litEnd - lit) < literalLength) return -E_LITERAL_OVERRUN;
    if ((u64)literalLength + matchLength > (u64)(oend - op)) return -E_OUTPUT;
    /* 16 literals whatever their number (both regions have SLACK after
     * them; the match overwrites what is past the literals). */
    copy16(op, lit);
    if (literalLength > 16) wild_copy(op + 16, lit + 16, literalLength - 16);
    op += literalLength;
    lit += literalLength;
    if (offset > (u32)(op - lowest)) return -E_OFFSET;
    match_copy(op, offset, matchLength);
    op += matchLength;
  }
  if (pos != 0) return -E_SEQ_STREAM;
  c->rep[0] = rep0;
  c->rep[1] = rep1;
  c->rep[2] = rep2;
  const u32 rest = (u32)(litEnd - lit);
  if (rest > (u32)(oend - op)) return -E_OUTPUT;
  if (rest) wild_copy(op, lit, rest);
  op += rest;
  return (int)(op - out);
}

/* ---- XXH64 (seed 0) of the frame's content ---- */

#define P1 0x9E3779B185EBCA87ull
#define P2 0xC2B2AE3D27D4EB4Full
#define P3 0x165667B19E3779F9ull
#define P4 0x85EBCA77C2B2AE63ull
#define P5 0x27D4EB2F165667C5ull

static inline u64 rotl(u64 v, u32 r) { return (v << r) | (v >> (64 - r)); }

static inline u64 xxh_round(u64 acc, u64 input) {
  acc += input * P2;
  acc = rotl(acc, 31);
  return acc * P1;
}

static inline u64 xxh_merge(u64 acc, u64 v) {
  acc ^= xxh_round(0, v);
  return acc * P1 + P4;
}

EXPORT(zstd_hash_reset)
void zstd_hash_reset(Ctx *c) {
  c->acc[0] = P1 + P2;
  c->acc[1] = P2;
  c->acc[2] = 0;
  c->acc[3] = (u64)0 - P1;
  c->total = 0;
  c->pendingLength = 0;
}

static inline void xxh_stripe(Ctx *c, const u8 *p) {
  c->acc[0] = xxh_round(c->acc[0], load64(p));
  c->acc[1] = xxh_round(c->acc[1], load64(p + 8));
  c->acc[2] = xxh_round(c->acc[2], load64(p + 16));
  c->acc[3] = xxh_round(c->acc[3], load64(p + 24));
}

EXPORT(zstd_hash_update)
void zstd_hash_update(Ctx *c, const u8 *p, u32 n) {
  c->total += n;
  if (c->pendingLength) {
    const u32 take = 32 - c->pendingLength < n ? 32 - c->pendingLength : n;
    for (u32 i = 0; i < take; i++) c->pending[c->pendingLength + i] = p[i];
    c->pendingLength += take;
    p += take;
    n -= take;
    if (c->pendingLength < 32) return;
    xxh_stripe(c, c->pending);
    c->pendingLength = 0;
  }
  u64 a0 = c->acc[0], a1 = c->acc[1], a2 = c->acc[2], a3 = c->acc[3];
  while (n >= 32) {
    a0 = xxh_round(a0, load64(p));
    a1 = xxh_round(a1, load64(p + 8));
    a2 = xxh_round(a2, load64(p + 16));
    a3 = xxh_round(a3, load64(p + 24));
    p += 32;
    n -= 32;
  }
  c->acc[0] = a0;
  c->acc[1] = a1;
  c->acc[2] = a2;
  c->acc[3] = a3;
  for (u32 i = 0; i < n; i++) c->pending[i] = p[i];
  c->pendingLength = n;
}

/* The low 32 bits of the digest (what a zstd frame stores). */
EXPORT(zstd_hash_low32)
u32 zstd_hash_low32(Ctx *c) {
  u64 h;
  if (c->total >= 32) {
    h = rotl(c->acc[0], 1) + rotl(c->acc[1], 7) + rotl(c->acc[2], 12) +
        rotl(c->acc[3], 18);
    h = xxh_merge(h, c->acc[0]);
    h = xxh_merge(h, c->acc[1]);
    h = xxh_merge(h, c->acc[2]);
    h = xxh_merge(h, c->acc[3]);
  } else {
    h = P5;
  }
  h += c->total;
  const u8 *p = c->pending;
  u32 n = c->pendingLength;
  while (n >= 8) {
    h ^= xxh_round(0, load64(p));
    h = rotl(h, 27) * P1 + P4;
    p += 8;
    n -= 8;
  }
  if (n >= 4) {
    const u32 v = p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24;
    h ^= (u64)v * P1;
    h = rotl(h, 23) * P2 + P3;
    p += 4;
    n -= 4;
  }
  while (n--) {
    h ^= (*p++) * P5;
    h = rotl(h, 11) * P1;
  }
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return (u32)h;
}
