/*
 * The LZMA decoder of one LZMA2 chunk, for xz blocks (drivers/codecs/xz.ts
 * parses the container and the LZMA2 chunk headers and calls lzma_chunk
 * once per LZMA chunk). Written from the LZMA description in the xz file
 * format documentation and LZMA SDK's lzma-specification.txt; it decodes
 * exactly what the TypeScript LzmaDecoder in xz.ts decodes and refuses
 * what it refuses, with the same error (see the ERR_ codes).
 *
 * The output is a window in linear memory: positions below `lower` (the
 * last dictionary reset, or what has slid out of the window) are never
 * read, and no distance reaches `dict_size` or more back. The caller keeps
 * SLACK bytes after the window for the 8-byte match copies.
 */
#include "common.h"

#define STATES 12
#define POS_STATES_MAX 16
#define DIST_MODEL_END 14
#define FULL_DISTANCES 128

/* Where each probability group starts in `probs` (as in xz.ts). */
#define IS_MATCH 0
#define IS_REP (IS_MATCH + STATES * POS_STATES_MAX)
#define IS_REP_G0 (IS_REP + STATES)
#define IS_REP_G1 (IS_REP_G0 + STATES)
#define IS_REP_G2 (IS_REP_G1 + STATES)
#define IS_REP0_LONG (IS_REP_G2 + STATES)
#define POS_SLOT (IS_REP0_LONG + STATES * POS_STATES_MAX)
#define SPEC_POS (POS_SLOT + 4 * 64)
#define ALIGN (SPEC_POS + FULL_DISTANCES - DIST_MODEL_END)
#define LEN_CODER (ALIGN + 16)
#define LEN_CHOICE 0
#define LEN_CHOICE2 1
#define LEN_LOW 2
#define LEN_MID (LEN_LOW + POS_STATES_MAX * 8)
#define LEN_HIGH (LEN_MID + POS_STATES_MAX * 8)
#define LEN_SIZE (LEN_HIGH + 256)
#define REP_LEN_CODER (LEN_CODER + LEN_SIZE)
#define LITERAL (REP_LEN_CODER + LEN_SIZE)
#define PROBS (LITERAL + 0x300 * 16)

/* What lzma_chunk returns (xz.ts turns each into its CodecError). */
#define OK 0
#define ERR_ENDS_EARLY 1  /* LZMA chunk data ends early */
#define ERR_DISTANCE 2    /* distance reaches before the dictionary */
#define ERR_PAST_CHUNK 3  /* a match runs past the chunk's unpacked size */
#define ERR_END_MARKER 4  /* end marker inside an LZMA2 chunk */
#define ERR_BAD_END 5     /* does not end where its packed size says */
#define ERR_BAD_START 6   /* does not start a range coder */

/* The decoder's state across the chunks of one block. */
struct lzma {
  u32 state, rep0, rep1, rep2, rep3;
  u32 lc, lp, pb;
  u16 probs[PROBS];
};

EXPORT(lzma_state_size) u32 lzma_state_size(void) { return sizeof(struct lzma); }

/* Sets lc, lp and pb (checked by the caller: lc + lp <= 4, pb <= 4). */
EXPORT(lzma_set_props)
void lzma_set_props(struct lzma *s, u32 lc, u32 lp, u32 pb) {
  s->lc = lc;
  s->lp = lp;
  s->pb = pb;
}

/* Resets the probabilities (those the literal coder uses with lc + lp), the state and the distances. */
EXPORT(lzma_reset) void lzma_reset(struct lzma *s) {
  u32 n = LITERAL + (0x300u << (s->lc + s->lp));
  for (u32 i = 0; i < n; i++) s->probs[i] = 1024;
  s->state = s->rep0 = s->rep1 = s->rep2 = s->rep3 = 0;
}

/*
 * The range decoder lives in locals (range, code, ip) of lzma_chunk; these
 * macros are its steps. Each input byte read is checked against iend.
 */
#define NORMALIZE                            \
  if (range < (1u << 24)) {                  \
    if (ip >= iend) return ERR_ENDS_EARLY;   \
    range <<= 8;                             \
    code = (code << 8) | *ip++;              \
  }

/* Decodes one bit with probability *p, running on0 or on1. */
#define BIT(p, on0, on1)                     \
  do {                                       \
    u16 *bp_ = (p);                          \
    u32 pv_ = *bp_;                          \
    NORMALIZE                                \
    u32 bound_ = (range >> 11) * pv_;        \
    if (code < bound_) {                     \
      range = bound_;                        \
      *bp_ = (u16)(pv_ + ((2048 - pv_) >> 5)); \
      on0;                                   \
    } else {                                 \
      range -= bound_;                       \
      code -= bound_;                        \
      *bp_ = (u16)(pv_ - (pv_ >> 5));        \
      on1;                                   \
    }                                        \
  } while (0)

/* A bit-tree symbol of `bits` bits at probs[base]. */
#define TREE(base, bits, result)                                   \
  do {                                                             \
    u16 *tp_ = probs + (base);                                     \
    u32 m_ = 1;                                                    \
    for (u32 k_ = 0; k_ < (bits); k_++)                            \
      BIT(tp_ + m_, m_ <<= 1, m_ = (m_ << 1) | 1);                 \
    (result) = m_ - (1u << (bits));                                \
  } while (0)

/* A reverse bit-tree symbol (least significant bit first). */
#define REVERSE_TREE(base, bits, result)                           \
  do {                                                             \
    u16 *tp_ = probs + (base);                                     \
    u32 m_ = 1, r_ = 0;                                            \
    for (u32 k_ = 0; k_ < (bits); k_++)                            \
      BIT(tp_ + m_, m_ <<= 1, (m_ = (m_ << 1) | 1, r_ |= 1u << k_)); \
    (result) = r_;                                                 \
  } while (0)

/* A match length (0-based) from the length coder at probs[base]. */
#define LENGTH(base, result)                                                 \
  do {                                                                       \
    u32 b_;                                                                  \
    BIT(probs + (base) + LEN_CHOICE, b_ = 0, b_ = 1);                        \
    if (!b_) {                                                               \
      TREE((base) + LEN_LOW + pos_state * 8, 3, result);                     \
    } else {                                                                 \
      BIT(probs + (base) + LEN_CHOICE2, b_ = 0, b_ = 1);                     \
      if (!b_) {                                                             \
        TREE((base) + LEN_MID + pos_state * 8, 3, result);                   \
        (result) += 8;                                                       \
      } else {                                                               \
        TREE((base) + LEN_HIGH, 8, result);                                  \
        (result) += 16;                                                      \
      }                                                                      \
    }                                                                        \
  } while (0)

/*
 * Decodes one LZMA chunk: `packed` bytes at `in` to `unpacked` bytes at
 * out[op]. Positions below `lower` are outside the dictionary; `pos_delta`
 * added to a window position gives its position since the dictionary
 * reset (for lp and pb); distances must stay below `dict_size`.
 */
EXPORT(lzma_chunk)
int lzma_chunk(struct lzma *s, const u8 *in, u32 packed, u8 *out, u32 op,
               u32 unpacked, u32 lower, u32 pos_delta, u32 dict_size) {
  if (packed < 5 || in[0] != 0) return ERR_BAD_START;
  const u8 *ip = in + 5;
  const u8 *iend = in + packed;
  u32 range = 0xffffffffu;
  u32 code = ((u32)in[1] << 24) | ((u32)in[2] << 16) | ((u32)in[3] << 8) | in[4];
  u16 *probs = s->probs;
  u32 state = s->state;
  u32 rep0 = s->rep0, rep1 = s->rep1, rep2 = s->rep2, rep3 = s->rep3;
  const u32 lc = s->lc;
  const u32 lp_mask = (1u << s->lp) - 1;
  const u32 pb_mask = (1u << s->pb) - 1;
  const u32 end = op + unpacked;
  while (op < end) {
    const u32 pos = op + pos_delta;
    const u32 pos_state = pos & pb_mask;
    u32 bit;
    BIT(probs + IS_MATCH + (state << 4) + pos_state, bit = 0, bit = 1);
    if (!bit) {
      /* A literal, coded against the byte at rep0 after a match. */
      const u32 prev = op > lower ? out[op - 1] : 0;
      u16 *lit = probs + LITERAL +
                 0x300 * (((pos & lp_mask) << lc) + (prev >> (8 - lc)));
      u32 sym = 1;
      if (state < 7) {
        /* Eight bits, a count the compiler unrolls (sym reaches 0x100
         * after exactly eight). */
        for (u32 k = 0; k < 8; k++) {
          BIT(lit + sym, sym <<= 1, sym = (sym << 1) | 1);
        }
      } else {
        if (rep0 >= op - lower) return ERR_DISTANCE;
        u32 match_byte = out[op - rep0 - 1];
        u32 offset = 0x100;
        for (u32 k = 0; k < 8; k++) {
          match_byte <<= 1;
          const u32 match_bit = match_byte & offset;
          BIT(lit + offset + match_bit + sym,
              (sym <<= 1, offset &= ~match_bit),
              (sym = (sym << 1) | 1, offset = match_bit));
        }
      }
      out[op++] = (u8)sym;
      state = state < 4 ? 0 : state < 10 ? state - 3 : state - 6;
      continue;
    }
    u32 len;
    BIT(probs + IS_REP + state, bit = 0, bit = 1);
    if (!bit) {
      /* A match with a new distance. */
      LENGTH(LEN_CODER, len);
      const u32 len_state = len < 4 ? len : 3;
      u32 slot;
      TREE(POS_SLOT + len_state * 64, 6, slot);
      u32 dist;
      if (slot < 4) {
        dist = slot;
      } else {
        const u32 footer = (slot >> 1) - 1;
        dist = (2 | (slot & 1)) << footer;
        u32 extra;
        if (slot < DIST_MODEL_END) {
          REVERSE_TREE(SPEC_POS + dist - slot - 1, footer, extra);
          dist += extra;
        } else {
          extra = 0;
          for (u32 k = footer - 4; k; k--) {
            NORMALIZE
            range >>= 1;
            if (code >= range) {
              code -= range;
              extra = (extra << 1) | 1;
            } else {
              extra <<= 1;
            }
          }
          dist += extra << 4;
          REVERSE_TREE(ALIGN, 4, extra);
          dist += extra;
        }
      }
      if (dist == 0xffffffffu) return ERR_END_MARKER;
      rep3 = rep2;
      rep2 = rep1;
      rep1 = rep0;
      rep0 = dist;
      state = state < 7 ? 7 : 10;
    } else {
      BIT(probs + IS_REP_G0 + state, bit = 0, bit = 1);
      if (!bit) {
        BIT(probs + IS_REP0_LONG + (state << 4) + pos_state, bit = 0, bit = 1);
        if (!bit) {
          /* Short repeat: one byte from rep0. */
          if (rep0 >= op - lower || rep0 >= dict_size) return ERR_DISTANCE;
          out[op] = out[op - rep0 - 1];
          op++;
          state = state < 7 ? 9 : 11;
          continue;
        }
      } else {
        u32 dist;
        BIT(probs + IS_REP_G1 + state, bit = 0, bit = 1);
        if (!bit) {
          dist = rep1;
        } else {
          BIT(probs + IS_REP_G2 + state, bit = 0, bit = 1);
          if (!bit) {
            dist = rep2;
          } else {
            dist = rep3;
            rep3 = rep2;
          }
          rep2 = rep1;
        }
        rep1 = rep0;
        rep0 = dist;
      }
      LENGTH(REP_LEN_CODER, len);
      state = state < 7 ? 8 : 11;
    }
    len += 2;
    if (rep0 >= op - lower || rep0 >= dict_size) return ERR_DISTANCE;
    if (len > end - op) return ERR_PAST_CHUNK;
    u8 *to = out + op;
    const u8 *from = to - rep0 - 1;
    op += len;
    if (rep0 >= 7) {
      /* 8 bytes a step: the source is at least 8 back, so every load
         reads bytes already in place; up to 7 bytes land past the match,
         in output not yet decoded or in the window's slack. */
      u8 *stop = to + len;
      do {
        store64(to, load64(from));
        to += 8;
        from += 8;
      } while (to < stop);
    } else {
      /* Closer than 8: the match repeats bytes it has just written. */
      for (u8 *stop = to + len; to < stop;) *to++ = *from++;
    }
  }
  /* The range coder must end exactly at the packed size, with code 0. */
  if (range < (1u << 24) && ip < iend) {
    range <<= 8;
    code = (code << 8) | *ip++;
  }
  if (ip != iend || code != 0) return ERR_BAD_END;
  s->state = state;
  s->rep0 = rep0;
  s->rep1 = rep1;
  s->rep2 = rep2;
  s->rep3 = rep3;
  return OK;
}
