/*
 * The LZVN block decoder (LZFSE's `bvxn` blocks), for drivers/codecs/
 * lzfse.ts, which reads the block header and calls this with the payload
 * and the output span. It accepts exactly what decodeLzvnBlock in lzfse.ts
 * accepts (the opcode table is in that function's comment, from Apple's
 * LZFSE reference library) and answers 1 where that fails; lzfse.ts then
 * decodes the stream again in TypeScript to name the error.
 *
 * Every opcode is classed by a 256-byte table so that the dispatch is one
 * jump table. The checks are the TypeScript decoder's, in its order:
 *  - an opcode with its operand bytes and literals must leave at least one
 *    payload byte after it (the payload ends with the 8-byte end-of-stream
 *    opcode), else the payload is truncated;
 *  - literals must fit before `dst_end`;
 *  - a match needs a distance of 1 to `dst` (which counts from the start
 *    of the whole output: matches reach into earlier blocks) and must fit
 *    before `dst_end`;
 *  - end-of-stream must end the payload exactly, at `dst_end` exactly.
 *
 * Copies go 8 or 16 bytes a step: they read at most 15 bytes past a
 * checked input length and write at most 15 past a checked output length,
 * inside the SLACK bytes lzfse.ts keeps after the input and the output.
 */
#include "common.h"

enum {
  UDEF, /* undefined opcode */
  SML_D, /* LLMMMDDD DDDDDDDD */
  MED_D, /* 101LLMMM DDDDDDMM DDDDDDDD */
  LRG_D, /* LLMMM111 DDDDDDDD DDDDDDDD */
  PRE_D, /* LLMMM110 */
  SML_L, /* 1110LLLL */
  LRG_L, /* 11100000 LLLLLLLL */
  SML_M, /* 1111MMMM */
  LRG_M, /* 11110000 MMMMMMMM */
  EOS,   /* 0x06 and 7 more bytes */
  NOP,   /* 0x0e, 0x16 */
};

/* The class of every opcode, filled by lzvn_classes on first use. */
static u8 classes[256];
static int classed = 0;

static void lzvn_classes(void) {
  for (u32 op = 0; op < 256; op++) {
    u8 c;
    if (op >= 0xf0) c = op == 0xf0 ? LRG_M : SML_M;
    else if (op >= 0xe0) c = op == 0xe0 ? LRG_L : SML_L;
    else if (op >= 0xa0 && op < 0xc0) c = MED_D;
    else if ((op & 0xf0) == 0x70 || (op & 0xf0) == 0xd0) c = UDEF;
    else if ((op & 7) == 6) {
      if (op >> 6) c = PRE_D;
      else if (op == 0x06) c = EOS;
      else if (op == 0x0e || op == 0x16) c = NOP;
      else c = UDEF;
    } else if ((op & 7) == 7) c = LRG_D;
    else c = SML_D;
    classes[op] = c;
  }
  classed = 1;
}

static inline void copy8(u8 *to, const u8 *from, u32 len) {
  for (u8 *stop = to + len; to < stop; to += 8, from += 8) {
    store64(to, load64(from));
  }
}

static inline void copy16(u8 *to, const u8 *from, u32 len) {
  for (u8 *stop = to + len; to < stop; to += 16, from += 16) {
    const u64 a = load64(from), b = load64(from + 8);
    store64(to, a);
    store64(to + 8, b);
  }
}

/*
 * Decodes the LZVN opcodes in in[src..src_end) into out[dst..dst_end);
 * 0 when the payload ended with end-of-stream exactly at src_end, having
 * written exactly up to dst_end, else 1.
 */
EXPORT(lzvn_decode)
int lzvn_decode(const u8 *in, u32 src, u32 src_end, u8 *out, u32 dst,
                u32 dst_end) {
  if (!classed) lzvn_classes();
  if (src > src_end || dst > dst_end) return 1;
  u32 d = 0; /* the previous distance: none yet */
  for (;;) {
    if (src >= src_end) return 1;
    const u32 op = in[src];
    u32 l, m;
    switch (classes[op]) {
      case SML_D:
        l = op >> 6;
        if (l + 2 >= src_end - src) return 1;
        m = ((op >> 3) & 7) + 3;
        d = ((op & 7) << 8) | in[src + 1];
        src += 2;
        break;
      case MED_D: {
        l = (op >> 3) & 3;
        if (l + 3 >= src_end - src) return 1;
        const u32 b1 = in[src + 1];
        m = (((op & 7) << 2) | (b1 & 3)) + 3;
        d = (b1 >> 2) | ((u32)in[src + 2] << 6);
        src += 3;
        break;
      }
      case LRG_D:
        l = op >> 6;
        if (l + 3 >= src_end - src) return 1;
        m = ((op >> 3) & 7) + 3;
        d = in[src + 1] | ((u32)in[src + 2] << 8);
        src += 3;
        break;
      case PRE_D:
        l = op >> 6;
        if (l + 1 >= src_end - src) return 1;
        m = ((op >> 3) & 7) + 3;
        src += 1;
        break;
      case SML_L:
        l = op & 0xf;
        m = 0;
        src += 1;
        break;
      case LRG_L:
        if (2 >= src_end - src) return 1;
        l = in[src + 1] + 16;
        m = 0;
        src += 2;
        break;
      case SML_M:
        l = 0;
        m = op & 0xf;
        src += 1;
        break;
      case LRG_M:
        if (2 >= src_end - src) return 1;
        l = 0;
        m = in[src + 1] + 16;
        src += 2;
        break;
      case NOP:
        src += 1;
        continue;
      case EOS:
        return src_end - src == 8 && dst == dst_end ? 0 : 1;
      default:
        return 1;
    }
    if (l > 0) {
      if (l >= src_end - src || l > dst_end - dst) return 1;
      copy16(out + dst, in + src, l);
      src += l;
      dst += l;
    }
    if (m > 0) {
      if (d < 1 || d > dst || m > dst_end - dst) return 1;
      u8 *to = out + dst;
      const u8 *from = to - d;
      if (d >= 16) {
        copy16(to, from, m);
      } else if (d >= 8) {
        copy8(to, from, m);
      } else {
        /* Closer than 8: the match repeats bytes it has just written. */
        for (u8 *stop = to + m; to < stop;) *to++ = *from++;
      }
      dst += m;
    }
  }
}
