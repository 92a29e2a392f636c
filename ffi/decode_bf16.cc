#include "decode_bf16.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "avx512_common.h"
#include "numerics.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace jax_wqmm::cpu {

bool DecodeBf16Covers(const Problem& p) {
  return p.act == Float::kBF16 && !p.transposed && (!p.int4 || p.n % 2 == 0);  // int4: rows on bytes
}

ActivationPairs::ActivationPairs(const Problem& p) : data_(static_cast<const PairWord*>(p.x1)) {
  if (p.k % 2 == 0) return;  // rows of whole pairs: x1 is its own pairs
  const int64_t pairs = (p.k + 1) / 2;
  copy_.assign(p.m * pairs, 0);
  for (int64_t r = 0; r < p.m; ++r) {
    std::memcpy(copy_.data() + r * pairs, static_cast<const uint16_t*>(p.x1) + r * p.k, p.k * 2);
  }
  data_ = copy_.data();
}

#if defined(__x86_64__)
namespace {

using namespace avx512;  // NOLINT

#define WQMM_BF16 __attribute__((target(WQMM_AVX512_TARGET ",avx512bf16")))

// A panel is a run of rows of W inside one group; its sums go through memory (raw, m x n)
// once. Two ways to feed the dot products:
// - direct (at most kDirectRows rows of x: memory-bound): each tile converts its codes as it
//   goes, reading the panel's kDirectPanel rows side by side from L2, where the next panel is
//   prefetched meanwhile in memory order (a slice of it per tile: DRAM serves a few sequential
//   streams far better than one line from each of 16 rows);
// - built (more rows: compute-bound): the panel's pairs are converted once, two rows of W at
//   a time, into a buffer that every block of x rows reads. Panels are as long as keep that
//   buffer (2 * rows * n bytes) within 512 KiB of L2, between 16 and 128 rows.
// From kDecodeBf16BlockedRows rows of x on, Blocked runs instead: y stays in cache there.
// Direct up to 4 rows and 16-row panels with sequential prefetch took m = 1 and 4 about 10-20%
// below the 8-row panels (2 rows) with per-tile prefetch they replaced (2-core Zen 4, 4096^2).
constexpr int64_t kDirectRows = 4, kDirectPanel = 16;
// BuildPairs reads this many rows of W side by side, prefetching the next ones per tile.
constexpr int64_t kBuildRows = 8;
int64_t BuiltPanel(int64_t n) { return std::clamp<int64_t>((int64_t{1} << 18) / n / 16 * 16, 16, 128); }
// A tile: 64 columns, the four vectors of 16 lanes that one pair of rows converts to.
constexpr int64_t kTile = 64;
constexpr int kVectors = 4;
// Register blocks of the built path: 4 rows of x by one tile, 16 accumulators fed by 4 loads
// of pairs and 4 broadcasts of x per 16 dot products.
constexpr int64_t kBuiltRows = 4;
// The blocked path (many rows of x): panels of 256 rows of W over chunks of 4 tiles, so that
// one tile's pairs (32 KiB) stay in L1 while every block of x rows runs over them; at most
// 512 rows of x at a time (their sums for one chunk, 512 KiB, stay in L2; W is converted
// once per 512 rows: at m = 2048 this took the kernel from 213-291 ms to 177-199 ms).
constexpr int64_t kBlockedPanel = 256, kChunkTiles = 4, kBlockedRowBlock = 512;

// bf16 bits of the int4 code (i & 15) in two's complement, twice: vpermw reads five bits of
// the index, and the fifth is the next nibble's lowest bit.
alignas(64) constexpr uint16_t kInt4Bf16[32] = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80};

WQMM_INLINE __mmask32 ByteMask(int64_t bytes) {
  return bytes >= 32 ? ~__mmask32{0} : bytes <= 0 ? __mmask32{0} : (__mmask32{1} << bytes) - 1;
}

// Two rows' dequantized float32 values of 16 lanes (pa, pb) rounded to bf16 (nearest even,
// vcvtne2ps2bf16: the kernel's single rounding for bf16 activations, numerics.h) as pairs
// (pa[l], pb[l]) per 32-bit lane.
WQMM_BF16 WQMM_INLINE __m512i RoundPairs(__m512 pa, __m512 pb) {
  // words 0..15 from pa, 16..31 from pb; interleave
  const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(pb, pa);
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(pairs, ab);
}

// Dequantizes two rows' codes of 16 lanes (float32 values fa, fb) with the lanes' scale and
// offset: float32 math, one rounding (numerics.h), as bf16 pairs.
template <bool kOffset>
WQMM_BF16 WQMM_INLINE __m512i DequantPairs(__m512 fa, __m512 fb, __m512 s, __m512 o) {
  if constexpr (kOffset) {
    fa = _mm512_add_ps(fa, o);
    fb = _mm512_add_ps(fb, o);
  }
  return RoundPairs(_mm512_mul_ps(fa, s), _mm512_mul_ps(fb, s));
}


// The bf16 pairs (W[k][c], W[k + 1][c]) of one tile's columns, dequantized, from rows a (k)
// and b (k + 1) at the tile's first column j, as four vectors of 16 lanes. int8 lanes are in
// column order (vector v: columns j + 16v ...); int4 lanes are not (ColumnOrder restores the
// sums' order). sl / ol: the tile's scale and offset in the same lane order (LaneOrder); int8
// without an offset takes -kMagic * scale in ol instead (MagicProducts). kFull: a whole tile
// (plain loads, which fold into the conversions); else cols < 64 at the ragged end (masked
// loads: zero codes, whose sums are never stored).
template <bool kInt4, bool kOffset, bool kFull>
WQMM_BF16 WQMM_INLINE void PairCodes(const uint8_t* a, const uint8_t* b, int64_t cols, const float* sl,
                                     const float* ol, __m512i out[kVectors]) {
  if constexpr (!kInt4) {
    for (int v = 0; v < kVectors; ++v) {
      __m512i ia, ib;
      if constexpr (kFull) {
        ia = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + 16 * v)));
        ib = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * v)));
      } else {
        const __mmask16 mask = LaneMask(cols - 16 * v);
        ia = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, a + 16 * v));
        ib = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, b + 16 * v));
      }
      const __m512 s = _mm512_load_ps(sl + 16 * v), o = _mm512_load_ps(ol + 16 * v);
      if constexpr (kOffset) {
        out[v] = DequantPairs<true>(_mm512_cvtepi32_ps(ia), _mm512_cvtepi32_ps(ib), s, o);
      } else {
        out[v] = RoundPairs(MagicProducts(ia, s, o), MagicProducts(ib, s, o));
      }
    }
  } else {
    __m256i va, vb;
    if constexpr (kFull) {
      va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
      vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    } else {
      const __mmask32 mask = ByteMask(cols / 2);
      va = _mm256_maskz_loadu_epi8(mask, a);
      vb = _mm256_maskz_loadu_epi8(mask, b);
    }
    // Byte a_i holds columns 2i (low nibble) and 2i + 1 (high). Interleaved within 128-bit
    // lanes, lo = a0 b0 .. a7 b7 | a16 b16 .. a23 b23 and hi = bytes 8..15 | 24..31: as words,
    // the pairs (a_i, b_i), whose nibbles the table turns into bf16.
    const __m512i lo = _mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(va, vb));
    const __m512i hi = _mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(va, vb));
    const __m512i lut = _mm512_load_si512(kInt4Bf16);
    __m512i codes[kVectors];
    codes[0] = _mm512_permutexvar_epi16(lo, lut);                         // columns 2i, i in lo
    codes[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(lo, 4), lut);  // columns 2i + 1
    codes[2] = _mm512_permutexvar_epi16(hi, lut);
    codes[3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(hi, 4), lut);
    const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int v = 0; v < kVectors; ++v) {  // each lane: (row a's bf16, row b's bf16) -> floats
      const __m512 fa = _mm512_castsi512_ps(_mm512_slli_epi32(codes[v], 16));
      const __m512 fb = _mm512_castsi512_ps(_mm512_and_si512(codes[v], top));
      out[v] = DequantPairs<kOffset>(fa, fb, _mm512_load_ps(sl + 16 * v),
                                     kOffset ? _mm512_load_ps(ol + 16 * v) : _mm512_setzero_ps());
    }
  }
}

// The column (within its tile) of lane l of pair vector v: int8 lanes are in column order;
// int4 lanes as PairCodes makes them (see ColumnOrder).
WQMM_INLINE int64_t LaneColumn(bool int4, int v, int l) {
  if (!int4) return 16 * v + l;
  return (l < 8 ? 2 * l : 2 * l + 16) + (v >= 2 ? 16 : 0) + (v & 1);
}

// int4 sums in PairCodes' lane order back to column order: columns 0..15 are bytes 0..7
// (lanes 0..7 of vectors 0 and 1, alternating), 16..31 bytes 8..15 (vectors 2, 3), 32..47
// bytes 16..23 (lanes 8..15 of vectors 0, 1), 48..63 bytes 24..31 (vectors 2, 3).
WQMM_BF16 WQMM_INLINE void ColumnOrder(__m512 v[kVectors]) {
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const __m512 e0 = v[0], o0 = v[1], e1 = v[2], o1 = v[3];
  v[0] = _mm512_permutex2var_ps(e0, lo, o0);
  v[1] = _mm512_permutex2var_ps(e1, lo, o1);
  v[2] = _mm512_permutex2var_ps(e0, hi, o0);
  v[3] = _mm512_permutex2var_ps(e1, hi, o1);
}

WQMM_BF16 WQMM_INLINE __m512 LoadBf16(const uint16_t* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// The scale and offset of one group's columns, as floats in the lane order of PairCodes,
// tile by tile (kTile floats per tile). ol is null without an offset.
// ol holds the offset, or for int8 without one -kMagic * scale (MagicProducts).
struct Group {
  const float* sl = nullptr;
  const float* ol = nullptr;
};

struct Tile {
  const uint8_t* w;        // W at (first row of the panel, first column of the tile)
  int64_t stride;          // bytes per row of W
  int64_t rows, cols;      // rows of the panel, columns of the tile (<= 64)
  const __m512i* pairs;    // the tile's first pair in the panel's built pairs, or null
  int64_t pair_stride;     // vectors from one pair to the next in pairs
  const PairWord* xp;      // x pairs of the block's first row at the panel's first pair
  int64_t kpairs;          // x pairs per row
  const float *sl, *ol;    // the tile's scale / offset in lane order (direct blocks)
};

struct Out {
  float* y;                // (m, n): the sums are added to it
  int64_t n, r, j;         // first row of the block, first column of the tile
};

// MR rows of x by one tile: the sums over the panel's pairs in registers, then added to y.
// Direct blocks dequantize their codes as they go; built ones read the panel's pairs.
template <bool kInt4, bool kOffset, int MR, bool kBuilt, bool kFull>
WQMM_BF16 WQMM_INLINE void Block(const Tile& t, const Out& o) {
  constexpr int NV = kVectors;
  __m512 acc[MR][NV];
  #pragma GCC unroll 8
  for (int rr = 0; rr < MR; ++rr) {
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[rr][v] = _mm512_setzero_ps();
  }
  const int64_t pairs = (t.rows + 1) / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __m512i b[NV];
    if constexpr (kBuilt) {
      #pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) b[v] = t.pairs[kp * t.pair_stride + v];
    } else {  // an odd last row pairs with itself; its x partner is the zero padding
      const uint8_t* a = t.w + 2 * kp * t.stride;
      PairCodes<kInt4, kOffset, kFull>(a, 2 * kp + 1 < t.rows ? a + t.stride : a, t.cols, t.sl, t.ol, b);
    }
#pragma GCC unroll 8
    for (int rr = 0; rr < MR; ++rr) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(t.xp[rr * t.kpairs + kp]));
      #pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[rr][v] = _mm512_dpbf16_ps(acc[rr][v], x, (__m512bh)b[v]);
    }
  }
  __mmask16 mk[NV];
  #pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) mk[v] = LaneMask(t.cols - 16 * v);
  #pragma GCC unroll 8
  for (int rr = 0; rr < MR; ++rr) {
    __m512 sums[NV];
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) sums[v] = acc[rr][v];
    if constexpr (kInt4) ColumnOrder(sums);
    float* y = o.y + (o.r + rr) * o.n + o.j;
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      AddTo(y + 16 * v, mk[v], sums[v]);
    }
  }
}

template <bool kInt4, bool kOffset, bool kFull>
WQMM_BF16 WQMM_INLINE void DirectRowsOf(int64_t mr, const Tile& t, const Out& o) {
  static_assert(kDirectRows == 4);
  switch (mr) {
    case 1: return Block<kInt4, kOffset, 1, false, kFull>(t, o);
    case 2: return Block<kInt4, kOffset, 2, false, kFull>(t, o);
    case 3: return Block<kInt4, kOffset, 3, false, kFull>(t, o);
    default: return Block<kInt4, kOffset, 4, false, kFull>(t, o);
  }
}

template <bool kInt4, bool kOffset>
WQMM_BF16 WQMM_INLINE void DirectRows(int64_t mr, const Tile& t, const Out& o) {
  if (t.cols == kTile) return DirectRowsOf<kInt4, kOffset, true>(mr, t, o);
  return DirectRowsOf<kInt4, kOffset, false>(mr, t, o);
}

template <bool kInt4>
WQMM_BF16 WQMM_INLINE void BuiltRows(int64_t mr, const Tile& t, const Out& o) {
  static_assert(kBuiltRows == 4);
  switch (mr) {  // built pairs are dequantized already: the offset flag does not matter
    case 1: return Block<kInt4, false, 1, true, true>(t, o);
    case 2: return Block<kInt4, false, 2, true, true>(t, o);
    case 3: return Block<kInt4, false, 3, true, true>(t, o);
    default: return Block<kInt4, false, 4, true, true>(t, o);
  }
}

// Converts the pairs of rows [r0, r0 + rows) of W (one panel, inside one group) in the tiles
// [jt0, jt1) into buf, tile by tile (the blocks read them in that order). The rows are read
// kBuildRows side by side, the next ones prefetched, a tile at a time: two rows at a time over
// all columns streams too slowly.
template <bool kInt4, bool kOffset>
WQMM_BF16 void BuildPairs(const Problem& p, int64_t r0, int64_t rows, const Group& g, int64_t jt0, int64_t jt1,
                          __m512i* buf) {
  const int64_t stride = kInt4 ? p.n / 2 : p.n, pairs = (rows + 1) / 2;
  const uint8_t* w0 = p.x2 + r0 * stride;
  constexpr int64_t kGroupPairs = kBuildRows / 2;
  for (int64_t kp0 = 0; kp0 < pairs; kp0 += kGroupPairs) {
    const int64_t kp1 = std::min(pairs, kp0 + kGroupPairs);
    const int64_t next = 2 * kp1, ahead = std::min(kBuildRows, p.k - r0 - next);
    for (int64_t jt = jt0; jt < jt1; ++jt) {
      const int64_t j = jt * kTile, at = kInt4 ? j / 2 : j;
      for (int64_t r = 0; r < ahead; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w0 + (next + r) * stride + at), _MM_HINT_T0);
      }
      for (int64_t kp = kp0; kp < kp1; ++kp) {
        const uint8_t* a = w0 + 2 * kp * stride;
        const uint8_t* b = 2 * kp + 1 < rows ? a + stride : a;  // an odd last row pairs with itself
        __m512i* out = buf + kVectors * ((jt - jt0) * pairs + kp);
        if (j + kTile <= p.n) PairCodes<kInt4, kOffset, true>(a + at, b + at, kTile, g.sl + kTile * jt, g.ol + kTile * jt, out);
        else PairCodes<kInt4, kOffset, false>(a + at, b + at, p.n - j, g.sl + kTile * jt, g.ol + kTile * jt, out);
      }
    }
  }
}

// Rows [r0, r0 + rows) of W (one panel, inside one group) against all columns. With many rows
// of x the panel's pairs are built first, two rows of W at a time (two sequential read
// streams), into buf, and every block of x rows reads them from there (L2); with few, each
// tile converts its codes as it goes.
template <bool kInt4, bool kOffset>
WQMM_BF16 void Panel(const Problem& p, const PairWord* xp, int64_t r0, int64_t rows, const Group& g,
                     float* y, __m512i* buf /* null: direct */) {
  const int64_t stride = kInt4 ? p.n / 2 : p.n, kpairs = (p.k + 1) / 2;
  const int64_t tiles = (p.n + kTile - 1) / kTile, pairs = (rows + 1) / 2;
  const uint8_t* w0 = p.x2 + r0 * stride;
  const bool build = buf != nullptr;
  if (build) BuildPairs<kInt4, kOffset>(p, r0, rows, g, 0, tiles, buf);
  // Direct panels read their rows side by side: the next panel (up to kDirectPanel rows) is
  // prefetched meanwhile, a slice per tile.
  const NextPanel next(w0 + rows * stride, build ? 0 : std::min(kDirectPanel, p.k - r0 - rows) * stride, tiles);
  for (int64_t jt = 0; jt < tiles; ++jt) {
    const int64_t j = jt * kTile;
    next.Prefetch(jt);
    const Tile t{w0 + (kInt4 ? j / 2 : j), stride, rows, std::min(kTile, p.n - j),
                 build ? buf + kVectors * pairs * jt : nullptr, kVectors, xp + r0 / 2, kpairs,
                 g.sl + kTile * jt, g.ol + kTile * jt};
    const int64_t block = build ? kBuiltRows : kDirectRows;
    for (int64_t r = 0; r < p.m; r += block) {
      Tile tr = t;
      tr.xp = t.xp + r * kpairs;
      const Out o{y, p.n, r, j};
      const int64_t mr = std::min<int64_t>(block, p.m - r);
      if (build) BuiltRows<kInt4>(mr, tr, o);
      else DirectRows<kInt4, kOffset>(mr, tr, o);
    }
  }
}

// The 64 bf16 values at p (one whole tile's columns) as floats in the lane order of PairCodes
// (int4: vector 0 takes the even columns of 0..15 and 32..47, vector 1 their odd ones, vectors
// 2 and 3 the same of 16..31 and 48..63; see LaneColumn).
template <bool kInt4>
WQMM_BF16 WQMM_INLINE void TileLanes(const uint16_t* p, float* out) {
  __m512 f[kVectors];
  for (int v = 0; v < kVectors; ++v) f[v] = LoadBf16(p + 16 * v, 0xFFFF);
  if constexpr (kInt4) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512 a = f[0], b = f[1], c = f[2], d = f[3];
    f[0] = _mm512_permutex2var_ps(a, even, c);
    f[1] = _mm512_permutex2var_ps(a, odd, c);
    f[2] = _mm512_permutex2var_ps(b, even, d);
    f[3] = _mm512_permutex2var_ps(b, odd, d);
  }
  for (int v = 0; v < kVectors; ++v) _mm512_storeu_ps(out + 16 * v, f[v]);
}

// The scale and offset of the group from row g0, tiles [jt0, jt1), as floats in the lane order
// of PairCodes into sl / ol (kTile floats per tile, at the tile's own place); without an offset,
// int8 takes -kMagic * scale in ol (MagicProducts). Returns whether the pairs take ol as an
// offset (PairCodes<.., true, ..>): with an offset, and for int8 whose scales are beyond
// MagicExact, which takes the plain multiply with a zero ol instead. Whole tiles are vectors
// (per group, this ran at ~3 us per group of 4096 columns, ~7% of an int4/g128 decode at m = 1).
template <bool kInt4, bool kOffset>
WQMM_BF16 bool GroupLanes(const Problem& p, int64_t g0, int64_t jt0, int64_t jt1, float* sl, float* ol) {
  const int64_t n = p.n, row = p.group_size ? g0 / p.group_size * n : 0;
  const auto* scale = static_cast<const uint16_t*>(p.scale);
  const auto* offset = static_cast<const uint16_t*>(p.offset);
  bool magic = !kInt4 && !kOffset;
  for (int64_t jt = jt0; jt < jt1; ++jt) {
    float* s_out = sl + jt * kTile;
    float* o_out = ol + jt * kTile;
    if (!p.per_tensor() && (jt + 1) * kTile <= n) {
      TileLanes<kInt4>(scale + row + jt * kTile, s_out);
      if constexpr (kOffset) {
        TileLanes<kInt4>(offset + row + jt * kTile, o_out);
      } else {
        for (int v = 0; v < kVectors; ++v) {
          const __m512 s = _mm512_loadu_ps(s_out + 16 * v);
          _mm512_storeu_ps(o_out + 16 * v, kInt4 ? _mm512_setzero_ps() : _mm512_mul_ps(s, _mm512_set1_ps(-kMagic)));
          // MagicExact on every lane (NaN compares false)
          magic = magic && _mm512_cmp_ps_mask(_mm512_abs_ps(s), _mm512_set1_ps(0x1p100f), _CMP_LT_OQ) == 0xFFFF;
        }
      }
      continue;
    }
    for (int i = 0; i < kTile; ++i) {  // per-tensor, or the ragged last tile (its lanes past n repeat column n - 1)
      const int64_t c = std::min(n - 1, jt * kTile + LaneColumn(kInt4, i / 16, i % 16));
      const int64_t idx = p.per_tensor() ? 0 : row + c;
      const float s = Bf16ToF32(scale[idx]);
      s_out[i] = s;
      o_out[i] = kOffset ? Bf16ToF32(offset[idx]) : kInt4 ? 0.0f : -kMagic * s;
      magic = magic && MagicExact(s);
    }
  }
  if (!kOffset && !kInt4 && !magic) {
    std::fill(ol + jt0 * kTile, ol + jt1 * kTile, 0.0f);
    return true;
  }
  return kOffset;
}

template <bool kInt4, bool kOffset>
WQMM_BF16 void Decode(const Problem& p, const PairWord* xp, float* y, int64_t k0, int64_t k1) {
  const int64_t m = p.m, n = p.n, tiles = (n + kTile - 1) / kTile;
  std::fill(y, y + m * n, 0.0f);
  const int64_t span = p.group_size ? p.group_size : k1 - k0;
  const bool direct = m <= kDirectRows;
  const int64_t panel = direct ? kDirectPanel : BuiltPanel(n);
  struct alignas(64) Vector { uint32_t lanes[16]; };  // one __m512i, over-aligned new (C++17)
  std::vector<Vector> built(direct ? 0 : (panel + 1) / 2 * kVectors * tiles);
  auto* buf = direct ? nullptr : reinterpret_cast<__m512i*>(built.data());
  std::vector<Vector> lanes(2 * tiles * kTile / 16);  // the group's scale, then offset, in lane order
  float* sl = reinterpret_cast<float*>(lanes.data());
  float* ol = sl + tiles * kTile;
  for (int64_t g0 = k0; g0 < k1; g0 += span) {
    const int64_t g1 = std::min(k1, g0 + span);
    const bool with_offset = GroupLanes<kInt4, kOffset>(p, g0, 0, tiles, sl, ol);
    const Group g{sl, ol};
    for (int64_t r0 = g0; r0 < g1; r0 += panel) {
      const int64_t rows = std::min(panel, g1 - r0);
      if (with_offset) Panel<kInt4, true>(p, xp, r0, rows, g, y, buf);
      else Panel<kInt4, false>(p, xp, r0, rows, g, y, buf);
    }
  }
}

// Many rows of x (compute-bound): columns [c0, c1) of y = x1 @ W over all of k, overwritten,
// blocked as a GEMM is. For up to kBlockedRowBlock rows of x and a chunk of kChunkTiles
// tiles, each panel of kBlockedPanel rows is converted once into pairs (one tile's pairs fill
// L1) and every block of kBuiltRows rows of x runs over them; the chunk's sums stay in cache
// from panel to panel, where Decode would stream all of y through memory once per panel.
template <bool kInt4, bool kOffset>
WQMM_BF16 void Blocked(const Problem& p, const PairWord* xp, float* y, int64_t c0, int64_t c1) {
  const int64_t n = p.n, kpairs = (p.k + 1) / 2, tiles = (n + kTile - 1) / kTile;
  const int64_t span = p.group_size ? p.group_size : p.k;
  struct alignas(64) Vector { uint32_t lanes[16]; };  // one __m512i, over-aligned new (C++17)
  std::vector<Vector> built((kBlockedPanel + 1) / 2 * kVectors * kChunkTiles);
  auto* buf = reinterpret_cast<__m512i*>(built.data());
  std::vector<Vector> lanes(2 * tiles * kTile / 16);  // scale, then offset, in lane order (the chunk's tiles)
  float* sl = reinterpret_cast<float*>(lanes.data());
  float* ol = sl + tiles * kTile;
  const Group g{sl, ol};
  const int64_t jend = (c1 + kTile - 1) / kTile;
  for (int64_t i0 = 0; i0 < p.m; i0 += kBlockedRowBlock) {
    const int64_t i1 = std::min(p.m, i0 + kBlockedRowBlock);
    for (int64_t jc0 = c0 / kTile; jc0 < jend; jc0 += kChunkTiles) {
      const int64_t jc1 = std::min(jend, jc0 + kChunkTiles), j0 = jc0 * kTile, j1 = std::min(c1, jc1 * kTile);
      for (int64_t r = i0; r < i1; ++r) std::fill(y + r * n + j0, y + r * n + j1, 0.0f);
      for (int64_t g0 = 0; g0 < p.k; g0 += span) {
        const int64_t g1 = std::min(p.k, g0 + span);
        const bool with_offset = GroupLanes<kInt4, kOffset>(p, g0, jc0, jc1, sl, ol);
        for (int64_t r0 = g0; r0 < g1; r0 += kBlockedPanel) {
          const int64_t rows = std::min(kBlockedPanel, g1 - r0), pairs = (rows + 1) / 2;
          if (with_offset) BuildPairs<kInt4, true>(p, r0, rows, g, jc0, jc1, buf);
          else BuildPairs<kInt4, false>(p, r0, rows, g, jc0, jc1, buf);
          for (int64_t jt = jc0; jt < jc1; ++jt) {
            const Tile t{nullptr, 0, rows, std::min(kTile, n - jt * kTile), buf + kVectors * pairs * (jt - jc0),
                         kVectors, xp + r0 / 2, kpairs, nullptr, nullptr};
            for (int64_t r = i0; r < i1; r += kBuiltRows) {
              Tile tr = t;
              tr.xp = t.xp + r * kpairs;
              BuiltRows<kInt4>(std::min<int64_t>(kBuiltRows, i1 - r), tr, Out{y, n, r, jt * kTile});
            }
          }
        }
      }
    }
  }
}

// The kernel's inner loop on codes in L1, without its memory traffic: each step converts the
// pairs of one tile (two rows of W, whole tile) and, for kRows > 0, multiplies them with
// kRows rows of x in registers (blocks of up to four rows sharing sixteen accumulators, as a
// register block does). Returns a sink so the work stays.
template <bool kInt4, int kRows>
WQMM_BF16 uint32_t ConvertLoop(int64_t iters) {
  alignas(64) static const uint8_t codes[2][64] = {};
  alignas(64) static const uint32_t xs[16] = {};
  alignas(64) float sl[kTile], ol[kTile];
  for (int64_t i = 0; i < kTile; ++i) sl[i] = 0.01f * static_cast<float>(i + 1), ol[i] = -kMagic * sl[i];
  __m512i sink = _mm512_setzero_si512();
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t i = 0; i < iters; ++i) {
    const uint8_t* a = codes[0];
    const uint32_t* x = xs;
    asm volatile("" : "+r"(a), "+r"(x));  // opaque: converted and read anew each time
    __m512i out[kVectors];
    PairCodes<kInt4, false, true>(a, a + 64, kTile, sl, ol, out);
    if constexpr (kRows == 0) {
      for (int v = 0; v < kVectors; ++v) sink = _mm512_xor_si512(sink, out[v]);
    }
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const __m512bh xr = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r]));
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) acc[4 * (r % 4) + v] = _mm512_dpbf16_ps(acc[4 * (r % 4) + v], xr, (__m512bh)out[v]);
    }
  }
  for (const auto& v : acc) sink = _mm512_xor_si512(sink, _mm512_castps_si512(v));
  return static_cast<uint32_t>(_mm512_reduce_add_epi32(sink));
}

// ConvertLoop<kInt4, rows> for the rows it is built for, else null.
using ConvertLoopFn = uint32_t (*)(int64_t);
template <bool kInt4>
ConvertLoopFn ConvertLoopFor(int rows) {
  switch (rows) {
    case 0: return ConvertLoop<kInt4, 0>;
    case 1: return ConvertLoop<kInt4, 1>;
    case 2: return ConvertLoop<kInt4, 2>;
    case 4: return ConvertLoop<kInt4, 4>;
    case 8: return ConvertLoop<kInt4, 8>;
    case 16: return ConvertLoop<kInt4, 16>;
    default: return nullptr;
  }
}

}  // namespace

double DecodeBf16ConvertRate(bool int4, int rows, double seconds) {
  const ConvertLoopFn loop = int4 ? ConvertLoopFor<true>(rows) : ConvertLoopFor<false>(rows);
  if (!loop) throw std::invalid_argument("rows=" + std::to_string(rows) + ": must be 0, 1, 2, 4, 8 or 16");
  return AllCoresRate([&](int64_t iters) { volatile uint32_t keep = loop(iters); (void)keep; }, 2.0 * kTile,
                      int64_t{1} << 14, seconds);
}

void DecodeBf16Blocked(const Problem& p, const PairWord* xp, float* y, int64_t c0, int64_t c1) {
  WQMM_DISPATCH(Blocked, p, xp, y, c0, c1);
}

void DecodeBf16(const Problem& p, const PairWord* xp, float* y, int64_t k0, int64_t k1) {
  WQMM_DISPATCH(Decode, p, xp, y, k0, k1);
}

#else

void DecodeBf16(const Problem&, const PairWord*, float*, int64_t, int64_t) {}
void DecodeBf16Blocked(const Problem&, const PairWord*, float*, int64_t, int64_t) {}
double DecodeBf16ConvertRate(bool, int, double) { return 0.0; }

#endif

}  // namespace jax_wqmm::cpu
