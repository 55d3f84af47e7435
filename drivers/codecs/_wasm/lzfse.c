/*
 * The two hot loops of an LZFSE (bvx1/bvx2) block, for drivers/codecs/
 * lzfse.ts, which parses the block header, builds the FSE decoding tables
 * (in this module's memory) and calls these. They decode exactly what the
 * TypeScript loops in decodeLzfseBlock decode, which follow Apple's LZFSE
 * format description, and answer 1 where those fail (lzfse.ts then runs
 * the TypeScript decoder to name the error).
 *
 * Both streams are read backwards from their end, a byte at a time into
 * `acc` while it holds 23 bits or fewer (at most 31 then: every code, the
 * longest being D's 8 state bits and 15 extra bits, fits).
 *
 * Tables, as lzfse.ts packs them, one u32 per state:
 *  - literal: delta << 16 | symbol << 8 | bits
 *  - L, M, D: delta << 16 | extra bits << 8 | total bits, and a base value
 */
#include "common.h"

#define LITERAL_STATES 1024
#define L_STATES 64
#define M_STATES 64
#define D_STATES 256

#define REFILL(floor)                             \
  while (n <= 23 && pos > (floor)) {              \
    acc = (acc << 8) | in[--pos];                 \
    n += 8;                                       \
  }

/* One FSE symbol: e's bits from acc, the next state into s. */
#define SYMBOL(table, s, mask, value)             \
  do {                                            \
    const u32 e_ = (table)[s];                    \
    const u32 k_ = e_ & 0xff;                     \
    if (k_ > n) return 1;                         \
    n -= k_;                                      \
    (s) = (((e_ >> 16) + ((acc >> n) & ((1u << k_) - 1))) & (mask)); \
    (value) = (u8)(e_ >> 8);                      \
  } while (0)

/*
 * Decodes `count` literals (a multiple of 4) from in[start..end) into
 * `literals`, with four interleaved states; `bits` (-8..0) is the
 * literal_bits field.
 */
EXPORT(lzfse_literals)
int lzfse_literals(const u32 *table, const u8 *in, u32 start, u32 end,
                   int bits, u32 s0, u32 s1, u32 s2, u32 s3, u32 count,
                   u8 *literals) {
  const u32 mask = LITERAL_STATES - 1;
  u32 pos = end, acc = 0, n = 0;
  if (bits < 0) {
    if (pos <= start) return 1;
    acc = in[--pos];
    n = (u32)(8 + bits);
    if (acc >> n) return 1;
  }
  s0 &= mask;
  s1 &= mask;
  s2 &= mask;
  s3 &= mask;
  for (u32 i = 0; i < count; i += 4) {
    REFILL(start);
    SYMBOL(table, s0, mask, literals[i]);
    SYMBOL(table, s1, mask, literals[i + 1]);
    REFILL(start);
    SYMBOL(table, s2, mask, literals[i + 2]);
    SYMBOL(table, s3, mask, literals[i + 3]);
  }
  return 0;
}

/* One L, M or D value: the state's base plus its extra bits. */
#define VALUE(entry, base, s, mask, value)                          \
  do {                                                              \
    const u32 e_ = (entry)[s];                                      \
    const u32 total_ = e_ & 0xff;                                   \
    if (total_ > n) return 1;                                       \
    n -= total_;                                                    \
    const u32 b_ = (acc >> n) & ((1u << total_) - 1);               \
    const u32 extra_ = (e_ >> 8) & 0xff;                            \
    (value) = (base)[s] + (b_ & ((1u << extra_) - 1));              \
    (s) = ((e_ >> 16) + (b_ >> extra_)) & (mask);                   \
  } while (0)

static inline void wild_copy(u8 *to, const u8 *from, u32 len) {
  for (u8 *stop = to + len; to < stop; to += 8, from += 8) {
    store64(to, load64(from));
  }
}

/*
 * Runs the block's `matches` L, M, D triples from in[start..end): L
 * literals from `literals` (of which n_literals are valid), then M bytes
 * from D back, into out from `dst` up to exactly `block_end`. `tables`
 * holds the L, M and D entry and base tables, one after another; `bits`
 * is the lmd_bits field.
 */
EXPORT(lzfse_lmd)
int lzfse_lmd(const u32 *tables, const u8 *in, u32 start, u32 end, int bits,
              u32 l_state, u32 m_state, u32 d_state, u32 matches,
              u32 n_literals, const u8 *literals, u8 *out, u32 dst,
              u32 block_end) {
  const u32 *l_entry = tables, *l_base = l_entry + L_STATES;
  const u32 *m_entry = l_base + L_STATES, *m_base = m_entry + M_STATES;
  const u32 *d_entry = m_base + M_STATES, *d_base = d_entry + D_STATES;
  u32 pos = end, acc = 0, n = 0;
  if (matches > 0 && bits < 0) {
    if (pos <= start) return 1;
    acc = in[--pos];
    n = (u32)(8 + bits);
    if (acc >> n) return 1;
  }
  l_state &= L_STATES - 1;
  m_state &= M_STATES - 1;
  d_state &= D_STATES - 1;
  u32 lit = 0;
  u32 d = 0; /* none yet: a first match must bring one */
  for (u32 i = 0; i < matches; i++) {
    u32 l, m, new_d;
    REFILL(start);
    VALUE(l_entry, l_base, l_state, L_STATES - 1, l);
    REFILL(start);
    VALUE(m_entry, m_base, m_state, M_STATES - 1, m);
    REFILL(start);
    VALUE(d_entry, d_base, d_state, D_STATES - 1, new_d);
    if (new_d != 0) d = new_d;
    if (l > n_literals - lit) return 1;
    if (l > block_end - dst || m > block_end - dst - l) return 1;
    wild_copy(out + dst, literals + lit, l);
    dst += l;
    lit += l;
    if (d < 1 || d > dst) return 1;
    u8 *to = out + dst;
    const u8 *from = to - d;
    if (d >= 8) {
      wild_copy(to, from, m);
    } else {
      for (u8 *stop = to + m; to < stop;) *to++ = *from++;
    }
    dst += m;
  }
  return dst == block_end ? 0 : 1;
}
