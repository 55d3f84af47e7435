/*
 * Inflate: raw deflate (RFC 1951), with the zlib (RFC 1950) or gzip
 * (RFC 1952) wrapper checked around it, one whole stream into one output
 * span, for drivers/codecs/zlib.ts where the runtime has no native
 * inflater (browsers, Deno Deploy). Written from the RFCs.
 *
 *   inflate_decode(in, n, out, cap, format)
 *     format 0 raw deflate, 1 zlib, 2 gzip (one member or several)
 *     answers the bytes written (at most cap), or a negative error code
 *     (INF_E_* below; zlib.ts names each one)
 *
 * The stream must end: the final block's end-of-block code, then the
 * wrapper's trailer (Adler-32; CRC-32 and ISIZE). Bytes after it are left
 * alone, as zlib leaves them (qcow's clusters are whole sectors). Output
 * past cap is an error at once (INF_E_OVERRUN): no bomb.
 *
 * Speed (a browser decodes every dmg/cloop/qcow/vmdk block through here):
 *  - a 64-bit bit buffer refilled 8 bytes at a time: after a refill it
 *    holds at least 56 bits, enough for one length/distance pair
 *    (15 + 5 + 15 + 13 bits), so the loop refills once per symbol;
 *  - table-driven Huffman decoding: a root table indexed by the next 10
 *    (literal/length) or 8 (distance) bits gives the symbol and its
 *    length in one load; longer codes go through one sub table;
 *  - matches copied 8 or 16 bytes a step, writing up to 15 bytes past
 *    their end into the SLACK after the output (short distances are
 *    widened to a multiple of the period first);
 *  - stored blocks are one memory.copy.
 *
 * Input reads: the refill loads 8 bytes at `in`, which never passes the
 * input's end by more than 8 bytes (further means the stream needed
 * bytes that are not there: INF_E_TRUNCATED), so the loads stay inside
 * the SLACK bytes after the input, which are zeroed first.
 */
#include "common.h"

#define INF_E_TRUNCATED -1     /* the input ends inside the stream */
#define INF_E_OVERRUN -2       /* more output than cap */
#define INF_E_BLOCK_TYPE -3    /* block type 3 */
#define INF_E_STORED_LEN -4    /* stored block LEN != ~NLEN */
#define INF_E_CODE_LENGTHS -5  /* bad code-length code */
#define INF_E_CODES -6         /* over-subscribed or incomplete lit/len or distance code */
#define INF_E_COUNTS -7        /* HLIT > 286 or HDIST > 30 */
#define INF_E_REPEAT -8        /* a repeat with no previous length, or past the end */
#define INF_E_NO_EOB -9        /* no code for end-of-block */
#define INF_E_LITLEN -10       /* literal/length symbol 286 or 287 */
#define INF_E_DIST -11         /* distance symbol 30 or 31 */
#define INF_E_FAR -12          /* distance past the start of the output */
#define INF_E_ZLIB_HEADER -13  /* bad zlib CMF/FLG */
#define INF_E_DICTIONARY -14   /* zlib stream needs a preset dictionary */
#define INF_E_ADLER -15        /* Adler-32 mismatch */
#define INF_E_GZIP_HEADER -16  /* bad gzip header (magic, method, flags, header CRC) */
#define INF_E_CRC -17          /* CRC-32 mismatch */
#define INF_E_ISIZE -18        /* gzip ISIZE mismatch */

/*
 * A table entry (u32):
 *   bits 0-7   code length to consume (for a sub table link: unused)
 *   bits 8-11  extra bits of a length or distance; a link's sub table bits
 *   bit 12     invalid symbol     bit 13  end of block
 *   bit 14     sub table link     bit 15  literal
 *   bits 16-31 the literal, the length or distance base, or the sub table's offset
 */
#define E_INVALID 0x1000u
#define E_EOB 0x2000u
#define E_SUB 0x4000u
#define E_LIT 0x8000u

#define LIT_ROOT 10
#define DIST_ROOT 8
/* Room for the largest tables a complete code can need (zlib's `enough`
 * program gives 1334 for 286 symbols at root 10, 400 for 30 at root 8);
 * the builder checks it anyway. */
#define LIT_TABLE 2048
#define DIST_TABLE 1024
#define CL_TABLE 128

static u32 lit_table[LIT_TABLE];
static u32 dist_table[DIST_TABLE];
static u32 cl_table[CL_TABLE];
static u32 fixed_lit[LIT_TABLE];
static u32 fixed_dist[DIST_TABLE];
static int fixed_built = 0;

static const u16 len_base[29] = {3,  4,  5,  6,  7,  8,  9,  10,  11,  13,
                                 15, 17, 19, 23, 27, 31, 35, 43,  51,  59,
                                 67, 83, 99, 115, 131, 163, 195, 227, 258};
static const u8 len_extra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const u16 dist_base[30] = {
    1,   2,   3,   4,   5,   7,    9,    13,   17,   25,   33,   49,   65,    97,    129,
    193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
static const u8 dist_extra[30] = {0, 0, 0, 0, 1, 1, 2, 2,  3,  3,  4,  4,  5,  5,  6,
                                  6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};
/* The order code-length code lengths are sent in (RFC 1951 3.2.7). */
static const u8 cl_order[19] = {16, 17, 18, 0, 8,  7, 9,  6, 10, 5,
                                11, 4,  12, 3, 13, 2, 14, 1, 15};

enum { KIND_CL, KIND_LIT, KIND_DIST };

/* The entry of symbol `sym` (code length `len`) in a table of `kind`. */
static u32 entry_for(int kind, u32 sym, u32 len) {
  if (kind == KIND_CL) return (sym << 16) | len;
  if (kind == KIND_LIT) {
    if (sym < 256) return (sym << 16) | E_LIT | len;
    if (sym == 256) return E_EOB | len;
    if (sym >= 286) return E_INVALID | len;
    sym -= 257;
    return ((u32)len_base[sym] << 16) | ((u32)len_extra[sym] << 8) | len;
  }
  if (sym >= 30) return E_INVALID | len;
  return ((u32)dist_base[sym] << 16) | ((u32)dist_extra[sym] << 8) | len;
}

static u32 reverse_bits(u32 code, u32 len) {
  u32 r = 0;
  for (u32 i = 0; i < len; i++) {
    r = (r << 1) | (code & 1);
    code >>= 1;
  }
  return r;
}

/*
 * Builds the decoding table of the canonical code with lengths
 * `lens[0..n)` into `table` (`size` entries, root `root` bits). Answers 0,
 * or 1 for a code that is over-subscribed, or incomplete where RFC 1951
 * does not allow it: zlib (the reference) takes an incomplete code only
 * when it is one code of length 1, and a code with no symbols at all
 * (distances of a block with only literals); their unused entries are
 * invalid symbols. The code-length code must be complete.
 */
static int build_table(int kind, const u8 *lens, u32 n, u32 *table, u32 size,
                       u32 root) {
  u32 count[16] = {0};
  u32 offs[16];
  u16 sorted[320];
  u32 codes[320];
  for (u32 s = 0; s < n; s++) count[lens[s]]++;
  count[0] = 0;
  u32 max = 0;
  for (u32 l = 1; l < 16; l++)
    if (count[l]) max = l;
  int left = 1;
  for (u32 l = 1; l < 16; l++) {
    left = (left << 1) - (int)count[l];
    if (left < 0) return 1; /* over-subscribed */
  }
  if (left > 0 && (kind == KIND_CL || max > 1)) return 1; /* incomplete */
  u32 fill = 1u << root;
  /* Only an incomplete code leaves entries unused: they are invalid. */
  if (left > 0)
    for (u32 i = 0; i < fill; i++) table[i] = E_INVALID | 1;
  if (max == 0) return 0;
  /* Canonical codes, in order of (length, symbol). */
  offs[1] = 0;
  for (u32 l = 1; l < 15; l++) offs[l + 1] = offs[l] + count[l];
  u32 total = offs[15] + count[15];
  for (u32 s = 0; s < n; s++)
    if (lens[s]) sorted[offs[lens[s]]++] = (u16)s;
  u32 code = 0, i = 0;
  for (u32 l = 1; l < 16; l++) {
    for (u32 k = 0; k < count[l]; k++) codes[i++] = code++;
    code <<= 1;
  }
  u32 next = fill; /* the next free entry for a sub table */
  for (i = 0; i < total;) {
    u32 sym = sorted[i], len = lens[sym], c = codes[i];
    if (len <= root) {
      u32 e = entry_for(kind, sym, len);
      for (u32 j = reverse_bits(c, len); j < fill; j += 1u << len) table[j] = e;
      i++;
      continue;
    }
    /* Codes longer than root sharing this root prefix: they are
     * consecutive, longest last; one sub table of the last one's length. */
    u32 prefix = c >> (len - root);
    u32 last = i;
    while (last + 1 < total) {
      u32 nl = lens[sorted[last + 1]];
      if (codes[last + 1] >> (nl - root) != prefix) break;
      last++;
    }
    u32 bits = lens[sorted[last]] - root;
    if (next + (1u << bits) > size) return 1;
    table[reverse_bits(prefix, root)] = (next << 16) | E_SUB | (bits << 8) | root;
    for (; i <= last; i++) {
      u32 s2 = sorted[i], l2 = lens[s2], sub = l2 - root;
      u32 e = entry_for(kind, s2, l2);
      u32 low = codes[i] & ((1u << sub) - 1);
      for (u32 j = reverse_bits(low, sub); j < (1u << bits); j += 1u << sub)
        table[next + j] = e;
    }
    next += 1u << bits;
  }
  return 0;
}

static void build_fixed(void) {
  u8 lens[288];
  u32 s = 0;
  for (; s < 144; s++) lens[s] = 8;
  for (; s < 256; s++) lens[s] = 9;
  for (; s < 280; s++) lens[s] = 7;
  for (; s < 288; s++) lens[s] = 8;
  build_table(KIND_LIT, lens, 288, fixed_lit, LIT_TABLE, LIT_ROOT);
  for (s = 0; s < 30; s++) lens[s] = 5;
  lens[30] = lens[31] = 5;
  build_table(KIND_DIST, lens, 32, fixed_dist, DIST_TABLE, DIST_ROOT);
  fixed_built = 1;
}

/* The bit reader: `bitbuf` holds `bitsleft` valid bits (bits above them
 * are the next input bits again, or zero; never relied on). */
typedef struct {
  const u8 *in, *end;
  u64 bitbuf;
  u32 bitsleft;
} bits_t;

/* Refills to at least 56 bits; false when the stream has run more than 8
 * bytes past the input's end (it is truncated). */
static inline int refill(bits_t *b) {
  if (b->in > b->end + 8) return 0;
  b->bitbuf |= load64(b->in) << b->bitsleft;
  b->in += (63 - b->bitsleft) >> 3;
  b->bitsleft |= 56;
  return 1;
}

/* Where the next whole byte is, after dropping the bits of a partial one. */
static inline const u8 *byte_position(bits_t *b) {
  return b->in - (b->bitsleft >> 3);
}

/* Decodes one Huffman-coded block's symbols (tables `lt`, `dt`). */
static int decode_block(bits_t *b, const u32 *lt, const u32 *dt, u8 *start,
                        u8 **outp, u8 *oend) {
  u8 *out = *outp;
  const u8 *in = b->in, *iend = b->end;
  u64 bitbuf = b->bitbuf;
  u32 bitsleft = b->bitsleft;
  int status = 0;
  for (;;) {
    if (in > iend + 8) {
      status = INF_E_TRUNCATED;
      break;
    }
    bitbuf |= load64(in) << bitsleft;
    in += (63 - bitsleft) >> 3;
    bitsleft |= 56;
    u32 e = lt[bitbuf & ((1u << LIT_ROOT) - 1)];
    if (e & E_SUB)
      e = lt[(e >> 16) + ((bitbuf >> LIT_ROOT) & ((1u << ((e >> 8) & 15)) - 1))];
    bitbuf >>= e & 0xff;
    bitsleft -= e & 0xff;
    if (e & E_LIT) {
      if (out >= oend) {
        status = INF_E_OVERRUN;
        break;
      }
      *out++ = (u8)(e >> 16);
      /* Up to two more literals from the same refill (56 - 15 bits left). */
      e = lt[bitbuf & ((1u << LIT_ROOT) - 1)];
      if (e & E_LIT) {
        bitbuf >>= e & 0xff;
        bitsleft -= e & 0xff;
        if (out >= oend) {
          status = INF_E_OVERRUN;
          break;
        }
        *out++ = (u8)(e >> 16);
        e = lt[bitbuf & ((1u << LIT_ROOT) - 1)];
        if (e & E_LIT) {
          bitbuf >>= e & 0xff;
          bitsleft -= e & 0xff;
          if (out >= oend) {
            status = INF_E_OVERRUN;
            break;
          }
          *out++ = (u8)(e >> 16);
        }
      }
      continue;
    }
    if (e & (E_EOB | E_INVALID)) {
      if (e & E_INVALID) status = INF_E_LITLEN;
      break;
    }
    u32 extra = (e >> 8) & 15;
    u32 len = (e >> 16) + (u32)(bitbuf & ((1u << extra) - 1));
    bitbuf >>= extra;
    bitsleft -= extra;
    e = dt[bitbuf & ((1u << DIST_ROOT) - 1)];
    if (e & E_SUB)
      e = dt[(e >> 16) + ((bitbuf >> DIST_ROOT) & ((1u << ((e >> 8) & 15)) - 1))];
    if (e & E_INVALID) {
      status = INF_E_DIST;
      break;
    }
    bitbuf >>= e & 0xff;
    bitsleft -= e & 0xff;
    extra = (e >> 8) & 15;
    u32 dist = (e >> 16) + (u32)(bitbuf & ((1u << extra) - 1));
    bitbuf >>= extra;
    bitsleft -= extra;
    if (dist > (u32)(out - start)) {
      status = INF_E_FAR;
      break;
    }
    if (len > (u32)(oend - out)) {
      status = INF_E_OVERRUN;
      break;
    }
    u8 *to = out + len;
    const u8 *from = out - dist;
    if (dist >= 16) {
      do {
        store64(out, load64(from));
        store64(out + 8, load64(from + 8));
        out += 16;
        from += 16;
      } while (out < to);
    } else if (dist >= 8) {
      do {
        store64(out, load64(from));
        out += 8;
        from += 8;
      } while (out < to);
    } else if (dist == 1) {
      u64 v = (u64)*from * 0x0101010101010101ull;
      do {
        store64(out, v);
        out += 8;
      } while (out < to);
    } else {
      /* A period under 8: write bytes until the pattern reaches back a
       * whole multiple of the period that is at least 8, then 8 at a time. */
      u32 wide = dist * ((8 + dist - 1) / dist);
      u8 *stop = out + (wide - dist);
      while (out < to && out < stop) {
        *out = *from;
        out++;
        from++;
      }
      from = out - wide;
      while (out < to) {
        store64(out, load64(from));
        out += 8;
        from += 8;
      }
    }
    out = to;
  }
  b->in = in;
  b->bitbuf = bitbuf;
  b->bitsleft = bitsleft;
  *outp = out;
  return status;
}

/* Reads the code lengths of a dynamic block and builds its tables. */
static int read_dynamic(bits_t *b) {
  u8 lens[320];
  if (!refill(b)) return INF_E_TRUNCATED;
  u32 nlen = (u32)(b->bitbuf & 31) + 257;
  u32 ndist = (u32)((b->bitbuf >> 5) & 31) + 1;
  u32 ncode = (u32)((b->bitbuf >> 10) & 15) + 4;
  b->bitbuf >>= 14;
  b->bitsleft -= 14;
  if (nlen > 286 || ndist > 30) return INF_E_COUNTS;
  u8 cl_lens[19] = {0};
  for (u32 i = 0; i < ncode; i++) {
    if (b->bitsleft < 3 && !refill(b)) return INF_E_TRUNCATED;
    cl_lens[cl_order[i]] = (u8)(b->bitbuf & 7);
    b->bitbuf >>= 3;
    b->bitsleft -= 3;
  }
  if (build_table(KIND_CL, cl_lens, 19, cl_table, CL_TABLE, 7))
    return INF_E_CODE_LENGTHS;
  u32 total = nlen + ndist;
  for (u32 i = 0; i < total;) {
    if (b->bitsleft < 14 && !refill(b)) return INF_E_TRUNCATED;
    u32 e = cl_table[b->bitbuf & 127];
    if (e & E_INVALID) return INF_E_CODE_LENGTHS;
    b->bitbuf >>= e & 0xff;
    b->bitsleft -= e & 0xff;
    u32 sym = e >> 16;
    if (sym < 16) {
      lens[i++] = (u8)sym;
      continue;
    }
    u32 repeat;
    u8 value = 0;
    if (sym == 16) {
      if (i == 0) return INF_E_REPEAT;
      value = lens[i - 1];
      repeat = 3 + (u32)(b->bitbuf & 3);
      b->bitbuf >>= 2;
      b->bitsleft -= 2;
    } else if (sym == 17) {
      repeat = 3 + (u32)(b->bitbuf & 7);
      b->bitbuf >>= 3;
      b->bitsleft -= 3;
    } else {
      repeat = 11 + (u32)(b->bitbuf & 127);
      b->bitbuf >>= 7;
      b->bitsleft -= 7;
    }
    if (i + repeat > total) return INF_E_REPEAT;
    while (repeat--) lens[i++] = value;
  }
  if (lens[256] == 0) return INF_E_NO_EOB;
  if (build_table(KIND_LIT, lens, nlen, lit_table, LIT_TABLE, LIT_ROOT))
    return INF_E_CODES;
  if (build_table(KIND_DIST, lens + nlen, ndist, dist_table, DIST_TABLE, DIST_ROOT))
    return INF_E_CODES;
  return 0;
}

/* Inflates one raw deflate stream from b into [*outp, oend); `start` is
 * where the output (the reach of distances) begins. On success b is left
 * at the byte after the stream. */
static int inflate_raw(bits_t *b, u8 *start, u8 **outp, u8 *oend) {
  if (!fixed_built) build_fixed();
  for (;;) {
    if (b->bitsleft < 3 && !refill(b)) return INF_E_TRUNCATED;
    u32 header = (u32)(b->bitbuf & 7);
    b->bitbuf >>= 3;
    b->bitsleft -= 3;
    u32 type = header >> 1;
    int status;
    if (type == 0) {
      /* Stored: to the byte boundary, then LEN, NLEN and the bytes. */
      const u8 *p = byte_position(b);
      if (p + 4 > b->end) return INF_E_TRUNCATED;
      u32 len = p[0] | ((u32)p[1] << 8);
      u32 nlen = p[2] | ((u32)p[3] << 8);
      if (len != (~nlen & 0xffff)) return INF_E_STORED_LEN;
      p += 4;
      if (len > (u32)(b->end - p)) return INF_E_TRUNCATED;
      if (len > (u32)(oend - *outp)) return INF_E_OVERRUN;
      __builtin_memcpy(*outp, p, len);
      *outp += len;
      b->in = p + len;
      b->bitbuf = 0;
      b->bitsleft = 0;
      status = 0;
    } else if (type == 1) {
      status = decode_block(b, fixed_lit, fixed_dist, start, outp, oend);
    } else if (type == 2) {
      status = read_dynamic(b);
      if (status == 0)
        status = decode_block(b, lit_table, dist_table, start, outp, oend);
    } else {
      return INF_E_BLOCK_TYPE;
    }
    if (status) return status;
    /* The block may have been decoded from zeros past the input. */
    if (byte_position(b) > b->end) return INF_E_TRUNCATED;
    if (header & 1) break;
  }
  /* To the byte after the stream (the partial byte's bits are padding). */
  const u8 *p = byte_position(b);
  if (p > b->end) return INF_E_TRUNCATED;
  b->in = p;
  b->bitbuf = 0;
  b->bitsleft = 0;
  return 0;
}

/*
 * Eight bytes at a time: over bytes b0..b7 (b0 first), a grows by their
 * sum and c by 8a (a before them) + 8 b0 + 7 b1 + ... + 1 b7. Both sums
 * come from one 64-bit load: the even and the odd bytes spread into
 * 16-bit lanes, and a multiplication by lane weights gathers a weighted
 * sum of the lanes in the top lane (no lane carries: 255 * 20 < 2^16).
 * A byte at a time, a and c were one long chain of dependent additions
 * (about 1.2 GB/s in chromium, a sixth of inflating a dmg's chunks).
 */
#define LANES 0x00ff00ff00ff00ffull
static u32 adler32(const u8 *p, u32 n) {
  u32 a = 1, c = 0;
  while (n) {
    /* 5552 bytes at most between reductions keep c below 2^32. */
    u32 k = n < 5552 ? n : 5552;
    n -= k;
    while (k >= 8) {
      u64 v = load64(p);
      u64 even = v & LANES, odd = (v >> 8) & LANES;
      u32 sum = (u32)(((even + odd) * 0x0001000100010001ull) >> 48);
      u32 weighted = (u32)((even * 0x0008000600040002ull) >> 48) +
                     (u32)((odd * 0x0007000500030001ull) >> 48);
      c += 8 * a + weighted;
      a += sum;
      p += 8;
      k -= 8;
    }
    while (k--) {
      a += *p++;
      c += a;
    }
    a %= 65521;
    c %= 65521;
  }
  return (c << 16) | a;
}

/* CRC-32 (gzip's and UDIF's: reflected 0xEDB88320), slicing by 8: table
 * k holds the CRC of a byte followed by k zero bytes, so eight input bytes
 * cost eight lookups. Also exported (crc32_update) for drivers/codecs/
 * crc32.ts where there is no native CRC-32 (browsers). */
static u32 crc_tables[8][256];
static int crc_built = 0;

static void build_crc(void) {
  for (u32 i = 0; i < 256; i++) {
    u32 c = i;
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1)));
    crc_tables[0][i] = c;
  }
  for (u32 i = 0; i < 256; i++) {
    u32 c = crc_tables[0][i];
    for (int t = 1; t < 8; t++) {
      c = (c >> 8) ^ crc_tables[0][c & 0xff];
      crc_tables[t][i] = c;
    }
  }
  crc_built = 1;
}

static u32 crc32(u32 crc, const u8 *p, u32 n) {
  if (!crc_built) build_crc();
  crc = ~crc;
  while (n >= 8) {
    u64 v = load64(p) ^ crc;
    crc = crc_tables[7][v & 0xff] ^ crc_tables[6][(v >> 8) & 0xff] ^
          crc_tables[5][(v >> 16) & 0xff] ^ crc_tables[4][(v >> 24) & 0xff] ^
          crc_tables[3][(v >> 32) & 0xff] ^ crc_tables[2][(v >> 40) & 0xff] ^
          crc_tables[1][(v >> 48) & 0xff] ^ crc_tables[0][v >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ crc_tables[0][(crc ^ *p++) & 0xff];
  return ~crc;
}

/*
 * Long inputs: the CRC of a message is its remainder modulo the CRC
 * polynomial P, and so it is unchanged when a piece of the message is
 * replaced by anything congruent to it modulo P. The smallest multiple
 * of P with four terms is x^3006 + x^2866 + x^2215 + 1 (CRC-32 detects
 * every 3-bit error up to 2974 data bits, so nothing smaller has four
 * terms; found by a search of the remainders x^k mod P). Squaring is
 * linear modulo 2, so with y = x^64 the same holds for
 * y^3006 + y^2866 + y^2215 + 1: a 64-bit word may be taken out of the
 * message and XORed into the words 140, 791 and 3006 words after it
 * (lower powers of x: later in the message, in the reflected order the
 * CRC reads bytes in) without changing the CRC. Folding every word but
 * the last FOLD_C that way leaves those FOLD_C words to the table loop.
 * Per 8 bytes that is four loads, three stores and three XORs, against
 * eight table lookups: 1.9 GB/s for the tables, see crc32_fold's note.
 * The pending XORs for the next FOLD_C words wait in a ring of FOLD_C
 * words (24 KiB, in the first-level cache); word i's slot receives word
 * i + FOLD_C, so one store serves both.
 */
#define FOLD_NEAR 140  /* 3006 - 2866 */
#define FOLD_MID 791   /* 3006 - 2215 */
#define FOLD_C 3006
static u64 fold_ring[FOLD_C];
static u64 fold_tail[FOLD_C];

static u32 crc32_fold(u32 previous, const u8 *p, u32 n) {
  u32 words = n / 8;
  if (words < 2 * FOLD_C) return crc32(previous, p, n);
  u32 folded = words - FOLD_C;
  /* The register's starting value acts as an XOR into the first four
   * bytes; the register then starts at zero (crc32 with ~0). */
  u64 first = (u64)(~previous);
  u32 near = FOLD_NEAR, mid = FOLD_MID, at = 0;
  for (u32 i = 0; i < folded; i++) {
    u64 v = load64(p + 8 * (u64)i) ^ fold_ring[at] ^ first;
    first = 0;
    fold_ring[at] = v; /* word i + FOLD_C */
    fold_ring[near] ^= v;
    fold_ring[mid] ^= v;
    if (++at == FOLD_C) at = 0;
    if (++near == FOLD_C) near = 0;
    if (++mid == FOLD_C) mid = 0;
  }
  /* The last FOLD_C words with what was folded into them; the ring ends
   * zeroed for the next call. */
  for (u32 i = folded, k = 0; i < words; i++, k++) {
    fold_tail[k] = load64(p + 8 * (u64)i) ^ fold_ring[at];
    fold_ring[at] = 0;
    if (++at == FOLD_C) at = 0;
  }
  u32 crc = crc32(0xffffffffu, (const u8 *)fold_tail, FOLD_C * 8);
  return crc32(crc, p + 8 * (u64)words, n - 8 * words);
}

/* The CRC-32 of `previous`'s bytes followed by the n bytes at p. */
EXPORT(crc32_update)
u32 crc32_update(u32 previous, const u8 *p, u32 n) {
  return crc32_fold(previous, p, n);
}

/* Reads a gzip member header at *pp (RFC 1952 2.3). */
static int gzip_header(const u8 **pp, const u8 *end) {
  const u8 *p = *pp, *h = p;
  if (end - p < 10) return INF_E_TRUNCATED;
  if (p[0] != 0x1f || p[1] != 0x8b || p[2] != 8 || (p[3] & 0xe0))
    return INF_E_GZIP_HEADER;
  u32 flags = p[3];
  p += 10;
  if (flags & 4) { /* FEXTRA */
    if (end - p < 2) return INF_E_TRUNCATED;
    u32 xlen = p[0] | ((u32)p[1] << 8);
    p += 2;
    if ((u32)(end - p) < xlen) return INF_E_TRUNCATED;
    p += xlen;
  }
  for (u32 f = 8; f <= 16; f += 8) { /* FNAME, FCOMMENT: zero-terminated */
    if (!(flags & f)) continue;
    while (p < end && *p) p++;
    if (p >= end) return INF_E_TRUNCATED;
    p++;
  }
  if (flags & 2) { /* FHCRC: the low 16 bits of the header's CRC-32 */
    if (end - p < 2) return INF_E_TRUNCATED;
    u32 want = p[0] | ((u32)p[1] << 8);
    if ((crc32(0, h, (u32)(p - h)) & 0xffff) != want) return INF_E_GZIP_HEADER;
    p += 2;
  }
  *pp = p;
  return 0;
}

static inline u32 le32(const u8 *p) {
  return p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

EXPORT(inflate_decode)
int inflate_decode(const u8 *in, u32 n, u8 *out, u32 cap, u32 format) {
  const u8 *end = in + n;
  for (u32 i = 0; i < SLACK; i++) ((u8 *)end)[i] = 0;
  u8 *o = out, *oend = out + cap;
  bits_t b;
  b.end = end;
  b.bitbuf = 0;
  b.bitsleft = 0;
  int status;
  if (format == 1) {
    if (n < 2) return INF_E_TRUNCATED;
    u32 cmf = in[0], flg = in[1];
    if ((cmf & 15) != 8 || (cmf >> 4) > 7 || ((cmf << 8) | flg) % 31)
      return INF_E_ZLIB_HEADER;
    if (flg & 0x20) return INF_E_DICTIONARY;
    b.in = in + 2;
    status = inflate_raw(&b, out, &o, oend);
    if (status) return status;
    if (end - b.in < 4) return INF_E_TRUNCATED;
    const u8 *t = b.in;
    u32 want = ((u32)t[0] << 24) | ((u32)t[1] << 16) | ((u32)t[2] << 8) | t[3];
    if (adler32(out, (u32)(o - out)) != want) return INF_E_ADLER;
    return (int)(o - out);
  }
  if (format == 2) {
    const u8 *p = in;
    /* Members one after another, as node:zlib's gunzip reads them: a
     * byte 0x1f after a member starts another; anything else after the
     * last is left alone. */
    do {
      status = gzip_header(&p, end);
      if (status) return status;
      u8 *member = o;
      b.in = p;
      b.bitbuf = 0;
      b.bitsleft = 0;
      /* Each member starts afresh: its distances reach only its own
       * output (zlib resets its window between members). */
      status = inflate_raw(&b, member, &o, oend);
      if (status) return status;
      if (end - b.in < 8) return INF_E_TRUNCATED;
      if (crc32(0, member, (u32)(o - member)) != le32(b.in)) return INF_E_CRC;
      if ((u32)(o - member) != le32(b.in + 4)) return INF_E_ISIZE;
      p = b.in + 8;
    } while (p < end && p[0] == 0x1f);
    return (int)(o - out);
  }
  b.in = in;
  status = inflate_raw(&b, out, &o, oend);
  if (status) return status;
  return (int)(o - out);
}
