// The decode kernel for float16 activations on CPUs with AVX-512 (and F16C): y = x1 @ W over a
// k slice, W in ND storage (int8, or packed int4 with an even n). Without float16 arithmetic
// on the CPU the products run as float32 FMAs (a float16 times a float16 is exact in
// float32); the codes are dequantized as the Ascend kernel rounds them (numerics.h: f16(f16(q
// + o) * s)) by the hardware's own float16 conversions (vcvtps2ph, nearest even), sixteen
// columns at a time, and each dequantized row is used by every row of x before the next
// (m <= 4: four vectors by up to four rows; m = 5..16: one vector by every row; more: rows
// dequantized once into a panel of floats that blocks of four rows read).
#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "decode_f16.h"
#include "avx512_common.h"
#include "numerics.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace jax_wqmm::cpu {

bool DecodeF16Covers(const Problem& p) {
  return p.act == Float::kF16 && !p.transposed && (!p.int4 || p.n % 2 == 0);  // int4: rows on bytes
}

#if defined(__x86_64__)
namespace {

using namespace avx512;  // NOLINT

#define WQMM_F16 __attribute__((target(WQMM_AVX512_TARGET)))
#define WQMM_F16_LAMBDA __attribute__((target(WQMM_AVX512_TARGET), always_inline))

constexpr int64_t kTile = 64;      // columns per tile: four vectors of 16 floats
constexpr int kVectors = 4;
constexpr int kBlockRows = 4;      // rows of x per register block: 16 accumulators
constexpr int64_t kPanel = 8;      // rows of W read side by side (direct), or per build step
constexpr int64_t kBuiltRows = 32; // rows of W dequantized once for every block of x rows (m > 16)
constexpr int kAllRowsMin = kBlockRows + 1, kAllRowsMax = 16;  // m in this range: AllRows
constexpr int64_t kAllRowsPanel = 32;  // rows of W per AllRows call

// The column (within its tile) of lane l of vector v: int8 lanes are in column order; int4
// ones take the low nibbles of 16 bytes, then their high nibbles (VectorWeights).
WQMM_INLINE int64_t LaneColumn(bool int4, int v, int l) { return int4 ? 32 * (v / 2) + 2 * l + (v & 1) : 16 * v + l; }

// Vector v (lanes in LaneColumn's order) of W[k, j : j + 64) dequantized (numerics.h) from
// the row's codes, `row` pointing at the tile's first one; kFull: a whole tile, else cols < 64
// at the ragged end (the lanes past it are zero codes, whose sums are never kept). sv, ov:
// the vector's scale and offset (int8 without an offset: -kMagic * s, MagicProducts).
template <bool kInt4, bool kOffset, bool kFull>
WQMM_F16 WQMM_INLINE __m512 VectorWeights(const uint8_t* row, int v, int64_t cols, __m512 sv, __m512 ov) {
  if constexpr (kInt4) {  // vectors 2h and 2h + 1: the low and high nibbles of bytes [16h, 16h + 16)
    const uint8_t* at = row + 16 * (v / 2);
    const __m512i d = _mm512_cvtepu8_epi32(kFull ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(at))
                                                 : _mm_maskz_loadu_epi8(LaneMask((cols + 1) / 2 - 16 * (v / 2)), at));
    const __m512 q = Int4Values(v & 1 ? _mm512_srli_epi32(d, 4) : d);
    return RoundF16(_mm512_mul_ps(kOffset ? RoundF16(_mm512_add_ps(q, ov)) : q, sv));
  } else {
    const uint8_t* at = row + 16 * v;
    const __m512i qi = _mm512_cvtepi8_epi32(kFull ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(at))
                                                  : _mm_maskz_loadu_epi8(LaneMask(cols - 16 * v), at));
    if constexpr (!kOffset) return RoundF16(MagicProducts(qi, sv, ov));
    return RoundF16(_mm512_mul_ps(RoundF16(_mm512_add_ps(_mm512_cvtepi32_ps(qi), ov)), sv));
  }
}

// W[k, j : j + 64) dequantized as four vectors (VectorWeights); s, o: the tile's scale and
// offset in lane order; without an offset int8 takes -kMagic * s in o (MagicProducts: exact
// for every float16 scale).
template <bool kInt4, bool kOffset, bool kFull>
WQMM_F16 WQMM_INLINE void TileWeights(const uint8_t* row, int64_t cols, const float* s, const float* o,
                                      __m512 out[kVectors]) {
  for (int v = 0; v < kVectors; ++v) {
    out[v] = VectorWeights<kInt4, kOffset, kFull>(row, v, cols, _mm512_load_ps(s + 16 * v), _mm512_load_ps(o + 16 * v));
  }
}

// Every row of x (MR = m) by vector v of the tile at `codes` (its first row; rows `stride`
// apart) over `rows` rows of W: each weight vector is dequantized once and used MR times from
// registers. It is dequantized four rows ahead of its products: the MR products all wait on
// it, and without the lead they fill the scheduler before the next conversion can start
// (in-register probe on a Zen 4, 16 products per conversion, x broadcast from memory: 1.41x
// the products' own time without the lead, 1.02x with it). xt: x transposed, (rows, MR), one
// line per k (rows of x k floats apart can share an L1 set). y: the vector's sums, rows
// `width` apart (padded off a power of two by the caller for the same reason); s, o: its
// scale and offset lanes.
template <int MR, bool kInt4, bool kOffset, bool kFull>
WQMM_F16 void AllRows(const float* xt, const uint8_t* codes, int64_t stride, int64_t rows, int v, int64_t cols,
                      const float* s, const float* o, float* y, int64_t width) {
  __m512 acc[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  const __m512 sv = _mm512_load_ps(s), ov = _mm512_load_ps(o);
  auto weights = [&](int64_t kk) WQMM_F16_LAMBDA {  // rows past the end repeat the last one
    return VectorWeights<kInt4, kOffset, kFull>(codes + std::min(kk, rows - 1) * stride, v, cols, sv, ov);
  };
  __m512 w0 = weights(0), w1 = weights(1), w2 = weights(2), w3 = weights(3);
  for (int64_t kk = 0; kk < rows; ++kk) {
    const __m512 w = w0;
    w0 = w1;
    w1 = w2;
    w2 = w3;
    w3 = weights(kk + 4);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xt[kk * MR + r]), w, acc[r]);
  }
  const __mmask16 mk = kInt4 ? __mmask16(0xFFFF) : LaneMask(cols - 16 * v);  // int4: whole tiles of sums
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    AddTo(y + r * width, mk, acc[r]);
  }
}

template <bool kInt4, bool kOffset, bool kFull, std::size_t... I>
constexpr auto AllRowsFor(std::index_sequence<I...>) {  // [i]: AllRows for m = kAllRowsMin + i
  return std::array{&AllRows<kAllRowsMin + static_cast<int>(I), kInt4, kOffset, kFull>...};
}

struct Rows {
  const float* x;    // (m, k) float32 (float16 values)
  int64_t k;
  float* y;          // (m, n) partial sums, added to
  int64_t n;
};

// MR rows of x (from r) by the tile at column j: sums over W's rows [k0, k0 + rows) in
// registers, then added to y. w(kk, b) puts the tile's four vectors of row k0 + kk in b.
template <int MR, typename W>
WQMM_F16 WQMM_INLINE void Block(const Rows& o, int64_t r, int64_t j, int64_t cols, int64_t k0, int64_t rows, W&& w) {
  __m512 acc[MR][kVectors];
  for (int rr = 0; rr < MR; ++rr) {
    for (int v = 0; v < kVectors; ++v) acc[rr][v] = _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < rows; ++kk) {
    __m512 b[kVectors];
    w(kk, b);
    for (int rr = 0; rr < MR; ++rr) {
      const __m512 xv = _mm512_set1_ps(o.x[(r + rr) * o.k + k0 + kk]);
      for (int v = 0; v < kVectors; ++v) acc[rr][v] = _mm512_fmadd_ps(xv, b[v], acc[rr][v]);
    }
  }
  for (int rr = 0; rr < MR; ++rr) {
    float* yr = o.y + (r + rr) * o.n + j;
    for (int v = 0; v < kVectors; ++v) {
      const __mmask16 mk = LaneMask(cols - 16 * v);
      AddTo(yr + 16 * v, mk, acc[rr][v]);
    }
  }
}

template <typename W>
WQMM_F16 WQMM_INLINE void Blocks(const Rows& o, int64_t m, int64_t j, int64_t cols, int64_t k0, int64_t rows, W&& w) {
  int64_t r = 0;
  for (; r + kBlockRows <= m; r += kBlockRows) Block<kBlockRows>(o, r, j, cols, k0, rows, w);
  switch (m - r) {
    case 3: Block<3>(o, r, j, cols, k0, rows, w); break;
    case 2: Block<2>(o, r, j, cols, k0, rows, w); break;
    case 1: Block<1>(o, r, j, cols, k0, rows, w); break;
    default: break;
  }
}

template <bool kInt4, bool kOffset>
WQMM_F16 void Decode(const Problem& p, const float* x, float* y, int64_t k0, int64_t k1) {
  const int64_t m = p.m, n = p.n, tiles = (n + kTile - 1) / kTile;
  const int64_t stride = kInt4 ? n / 2 : n;
  const bool all_rows = m >= kAllRowsMin && m <= kAllRowsMax;
  // int4 sums are in lane order: into whole tiles of their own, put in column order at the
  // end. AllRows adds to every row of them at once: those rows are a line more than a multiple
  // of the tile apart (n = 4096 floats apart, 16 rows of sums share an L1 set: 1.2x the time)
  const bool own = kInt4 || all_rows;
  const int64_t width = (kInt4 ? tiles * kTile : n) + (all_rows ? 16 : 0);
  std::vector<float> own_sums(own ? m * width : 0);
  float* sums = own ? own_sums.data() : y;
  std::fill(sums, sums + m * width, 0.0f);
  const Rows out{x, p.k, sums, width};
  std::vector<float> xt(all_rows ? (k1 - k0) * m : 0);  // AllRows: x[:, k0:k1] transposed
  for (int64_t kk = k0; all_rows && kk < k1; ++kk) {
    for (int64_t r = 0; r < m; ++r) xt[(kk - k0) * m + r] = x[r * p.k + kk];
  }
  static constexpr auto kAllRowsFull = AllRowsFor<kInt4, kOffset, true>(std::make_index_sequence<kAllRowsMax - kAllRowsMin + 1>());
  static constexpr auto kAllRowsTail = AllRowsFor<kInt4, kOffset, false>(std::make_index_sequence<kAllRowsMax - kAllRowsMin + 1>());
  const int64_t span = p.group_size ? p.group_size : k1 - k0;
  const bool direct = m <= kBlockRows;
  const int64_t panel = all_rows ? kAllRowsPanel : direct ? kPanel : kBuiltRows;
  struct alignas(64) Vector { float lanes[16]; };  // over-aligned new (C++17)
  std::vector<Vector> built(direct || all_rows ? 0 : kBuiltRows * tiles * kVectors);  // (rows, n) floats
  std::vector<Vector> quant(2 * tiles * kVectors);  // the group's scale, then offset (or -kMagic * s)
  float* sl = quant[0].lanes;
  float* ol = sl + tiles * kTile;
  const auto* scale = static_cast<const uint16_t*>(p.scale);
  const auto* offset = static_cast<const uint16_t*>(p.offset);
  for (int64_t g0 = k0; g0 < k1; g0 += span) {
    const int64_t g1 = std::min(k1, g0 + span), first = p.group_size ? g0 / p.group_size * n : 0;
    for (int64_t c = 0; c < tiles * kTile; ++c) {  // lane c: the tile's vector (c % 64) / 16
      const int64_t col = c / kTile * kTile + LaneColumn(kInt4, static_cast<int>(c % kTile / 16), static_cast<int>(c % 16));
      const int64_t i = p.per_tensor() ? 0 : first + std::min(col, n - 1);
      sl[c] = F16ToF32(scale[i]);
      ol[c] = kOffset ? F16ToF32(offset[i]) : -kMagic * sl[c];
    }
    for (int64_t r0 = g0; r0 < g1; r0 += panel) {
      const int64_t rows = std::min(panel, g1 - r0);
      const uint8_t* w0 = p.x2 + r0 * stride;
      auto weights = [&](const uint8_t* row, int64_t j, __m512 b[kVectors]) WQMM_F16_LAMBDA {
        const uint8_t* at = row + (kInt4 ? j / 2 : j);
        if (j + kTile <= n) TileWeights<kInt4, kOffset, true>(at, kTile, sl + j, ol + j, b);
        else TileWeights<kInt4, kOffset, false>(at, n - j, sl + j, ol + j, b);
      };
      // all-rows and direct panels read a tile's rows side by side: the next panel is
      // prefetched meanwhile, a slice per tile (direct: 5-8% faster at m = 1, 2 than
      // prefetching the next rows at the tile's columns)
      const NextPanel next(w0 + rows * stride, std::min(panel, p.k - r0 - rows) * stride, tiles);
      if (all_rows) {
        // each row of a tile is read four times (once per vector; from L2 when the rows share
        // L1 sets, which measured faster than copying the panel tile-major first)
        for (int64_t jt = 0; jt < tiles; ++jt) {
          const int64_t j = jt * kTile, cols = std::min(kTile, n - j);
          next.Prefetch(jt);
          const auto& fns = cols == kTile ? kAllRowsFull : kAllRowsTail;
          for (int v = 0; v < kVectors && (kInt4 || 16 * v < cols); ++v) {
            fns[m - kAllRowsMin](xt.data() + (r0 - k0) * m, w0 + (kInt4 ? j / 2 : j), stride, rows, v, cols,
                                 sl + j + 16 * v, ol + j + 16 * v, sums + j + 16 * v, width);
          }
        }
        continue;
      }
      if (direct) {
        for (int64_t jt = 0; jt < tiles; ++jt) {
          const int64_t j = jt * kTile;
          next.Prefetch(jt);
          Blocks(out, m, j, kInt4 ? kTile : std::min(kTile, n - j), r0, rows,
                 [&](int64_t kk, __m512 b[kVectors]) WQMM_F16_LAMBDA { weights(w0 + kk * stride, j, b); });
        }
        continue;
      }
      // built: the panel's rows dequantized once, kPanel rows side by side at a time (the next
      // ones prefetched), into floats tile by tile ((tiles, kBuiltRows, 64): a block reads
      // its tile contiguously; rows of n floats would put a tile's rows in the same L1 sets)
      float* wb = built[0].lanes;
      for (int64_t q0 = 0; q0 < rows; q0 += kPanel) {
        const int64_t q1 = std::min(rows, q0 + kPanel), ahead = std::min(kPanel, p.k - r0 - q1);
        for (int64_t jt = 0; jt < tiles; ++jt) {
          const int64_t j = jt * kTile;
          for (int64_t r = 0; r < ahead; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(w0 + (q1 + r) * stride + (kInt4 ? j / 2 : j)), _MM_HINT_T0);
          }
          for (int64_t kk = q0; kk < q1; ++kk) {
            __m512 b[kVectors];
            weights(w0 + kk * stride, j, b);
            for (int v = 0; v < kVectors; ++v) _mm512_store_ps(wb + (jt * kBuiltRows + kk) * kTile + 16 * v, b[v]);
          }
        }
      }
      for (int64_t jt = 0; jt < tiles; ++jt) {
        const int64_t j = jt * kTile;
        Blocks(out, m, j, kInt4 ? kTile : std::min(kTile, n - j), r0, rows,
               [&](int64_t kk, __m512 b[kVectors]) WQMM_F16_LAMBDA {
                 for (int v = 0; v < kVectors; ++v) b[v] = _mm512_load_ps(wb + (jt * kBuiltRows + kk) * kTile + 16 * v);
               });
      }
    }
  }
  if (!kInt4 && own) {
    for (int64_t r = 0; r < m; ++r) std::memcpy(y + r * n, sums + r * width, n * sizeof(float));
  }
  if constexpr (kInt4) {  // the lane-ordered sums into y's columns
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t c = 0; c < n; ++c) {
        const int64_t cc = c % kTile, v = 2 * (cc / 32) + (cc & 1);
        y[r * n + c] = sums[r * width + c - cc + 16 * v + cc % 32 / 2];
      }
    }
  }
}

}  // namespace

void DecodeF16(const Problem& p, const float* x, float* y, int64_t k0, int64_t k1) {
  WQMM_DISPATCH(Decode, p, x, y, k0, k1);
}

#else

void DecodeF16(const Problem&, const float*, float*, int64_t, int64_t) {}

#endif

}  // namespace jax_wqmm::cpu
