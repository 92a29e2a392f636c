// The bf16 decode kernel for transposed storage (x2 as (n, k)): a column's codes are
// contiguous along k, so 32 of them dequantize into one vector of bf16 in k order, which is
// the activations' own order, and one vdpbf16ps does 32 k of one column (sixteen float32
// partial sums, added up once at the end). int4 codes are looked up in a table of the
// column's 16 dequantized values (built once per column and group, vpermw); int8 codes go
// through float32 math. Rounding as numerics.h: float32 math, one round to bf16.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "decode_bf16.h"
#include "avx512_common.h"
#include "numerics.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace jax_wqmm::cpu {

bool DecodeBf16TCovers(const Problem& p) {
  return p.act == Float::kBF16 && p.transposed && (!p.int4 || p.k % 2 == 0)  // int4: columns on bytes
         && p.group_size % 32 == 0;                                           // groups of whole vectors
}

#if defined(__x86_64__)
namespace {

using namespace avx512;  // NOLINT

#define WQMM_BF16 __attribute__((target(WQMM_AVX512_TARGET ",avx512bf16")))

constexpr int64_t kStep = 32;   // k per vector of bf16
constexpr int kCols = 4;        // columns per block
constexpr int kBlockRows = 4;   // rows of x per block: 16 accumulators
constexpr int64_t kChunk = 1024;  // k per chunk of dequantized columns (m > kBlockRows): 8 KiB


// The dequantization of one column in one group: its scale and offset broadcast; int8 without
// an offset uses ms = -kMagic * s (magic: kMagic * s exact); int4 its table.
struct ColumnQuant {
  __m512 s, o;
  bool magic;
  __m512i table;
};

WQMM_INLINE __mmask32 WordMask(int64_t count) {
  return count >= 32 ? ~__mmask32{0} : (__mmask32{1} << count) - 1;
}

// The 16 dequantized bf16 values of the int4 codes 0..7, -8..-1 (a code's nibble indexes
// it), twice: vpermw reads five bits of each index, the fifth a neighbour's.
template <bool kOffset>
WQMM_BF16 WQMM_INLINE __m512i Int4Table(__m512 s, __m512 o) {
  __m512 v = Int4CodeValues();
  if constexpr (kOffset) v = _mm512_add_ps(v, o);
  v = _mm512_mul_ps(v, s);
  return (__m512i)_mm512_cvtne2ps_pbh(v, v);
}

template <bool kInt4, bool kOffset>
WQMM_BF16 WQMM_INLINE ColumnQuant MakeColumnQuant(float s, float o) {
  ColumnQuant c;
  c.s = _mm512_set1_ps(s);
  c.magic = !kInt4 && !kOffset && MagicExact(s);
  c.o = _mm512_set1_ps(kOffset ? o : c.magic ? -kMagic * s : 0.0f);
  if constexpr (kInt4) c.table = Int4Table<kOffset>(c.s, c.o);
  return c;
}

// The dequantized W[k0 : k0 + 32, j] as 32 bf16 in k order from the column's codes at k0
// (w: int8 at k0, or the byte of int4 code k0, k0 even); `count` < 32 at the end of k (the
// words past it are zero).
template <bool kInt4, bool kOffset, bool kFull>
WQMM_BF16 WQMM_INLINE __m512i ColumnWeights(const uint8_t* w, int64_t count, const ColumnQuant& c) {
  __m512i out;
  if constexpr (kInt4) {
    // byte i holds codes 2i (low nibble) and 2i + 1 (high): as the words (b, b >> 4) of
    // dword i, the table's indices for k0 + 2i and k0 + 2i + 1
    const __m128i bytes = kFull ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(w))
                                : _mm_maskz_loadu_epi8(static_cast<__mmask16>(WordMask((count + 1) / 2)), w);
    const __m512i d = _mm512_cvtepu8_epi32(bytes);
    out = _mm512_permutexvar_epi16(_mm512_or_si512(d, _mm512_slli_epi32(d, 12)), c.table);
  } else {
    __m512i ia, ib;
    if constexpr (kFull) {
      ia = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
      ib = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
    } else {
      const __mmask32 m = WordMask(count);
      ia = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>(m), w));
      ib = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>(m >> 16), w + 16));
    }
    __m512 fa, fb;
    if (!kOffset && c.magic) {
      fa = MagicProducts(ia, c.s, c.o);
      fb = MagicProducts(ib, c.s, c.o);
    } else {  // (q + o) * s, o = 0 without an offset
      fa = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(ia), c.o), c.s);
      fb = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(ib), c.o), c.s);
    }
    out = (__m512i)_mm512_cvtne2ps_pbh(fb, fa);  // words 0..15 from fa: k order
  }
  if constexpr (!kFull) out = _mm512_maskz_mov_epi16(WordMask(count), out);
  return out;
}

// The columns [j0, j0 + kCols) (the last ones repeated past n) over all k, for the rows of x.
template <bool kInt4, bool kOffset>
struct ColumnBlock {
  const Problem& p;
  const uint16_t* x;   // (m, kpad) bf16, zero past k
  int64_t kpad;
  int64_t j[kCols];
  const uint8_t* col[kCols];  // the columns' codes
  int64_t next;               // bytes from a column to the next block's (0 in the last block)
  ColumnQuant q[kCols];

  WQMM_BF16 WQMM_INLINE void Quant(int64_t kk) {  // at a group's first k
    const auto* scale = static_cast<const uint16_t*>(p.scale);
    const auto* offset = static_cast<const uint16_t*>(p.offset);
    for (int c = 0; c < kCols; ++c) {
      const int64_t i = p.per_tensor() ? 0 : (p.group_size ? kk / p.group_size * p.n : 0) + j[c];
      q[c] = MakeColumnQuant<kInt4, kOffset>(Bf16ToF32(scale[i]), kOffset ? Bf16ToF32(offset[i]) : 0.0f);
    }
  }

  // The next block's columns are read a block ahead, at the same k: the blocks' short
  // streams (a column is k bytes) end before hardware prefetchers ramp up.
  template <bool kFull>
  WQMM_BF16 WQMM_INLINE void Weights(int64_t kk, __m512i w[kCols]) {
    const int64_t at = kInt4 ? kk / 2 : kk;
    for (int c = 0; c < kCols; ++c) {
      if (kFull && at % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(col[c] + next + at), _MM_HINT_T0);
      w[c] = ColumnWeights<kInt4, kOffset, kFull>(col[c] + at, p.k - kk, q[c]);
    }
  }

  // acc[r][c] += x[r0 + r, kk : kk + 32] . w[c] for MR rows.
  template <int MR>
  WQMM_BF16 WQMM_INLINE void Dot(int64_t r0, int64_t kk, const __m512i w[kCols], __m512 acc[][kCols]) {
    #pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (r0 + r) * kpad + kk);
      #pragma GCC unroll 4
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, (__m512bh)w[c]);
    }
  }

  template <int MR>
  WQMM_BF16 WQMM_INLINE void Store(int64_t r0, __m512 acc[][kCols], float* y, int64_t ncols) {
    for (int r = 0; r < MR; ++r) {
      for (int c = 0; c < ncols; ++c) y[(r0 + r) * p.n + j[c]] = _mm512_reduce_add_ps(acc[r][c]);
    }
  }

  // m <= kBlockRows: every row's sums in registers, the weights dequantized as they are used.
  template <int MR>
  WQMM_BF16 void Direct(float* y, int64_t ncols) {
    __m512 acc[MR][kCols];
    for (int r = 0; r < MR; ++r) {
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_setzero_ps();
    }
    const int64_t span = p.group_size ? p.group_size : p.k;
    for (int64_t g0 = 0; g0 < p.k; g0 += span) {
      Quant(g0);
      const int64_t g1 = std::min(p.k, g0 + span), full = g0 + (g1 - g0) / kStep * kStep;
      __m512i w[kCols];
      for (int64_t kk = g0; kk < full; kk += kStep) {
        Weights<true>(kk, w);
        Dot<MR>(0, kk, w, acc);
      }
      if (full < g1) {
        Weights<false>(full, w);
        Dot<MR>(0, full, w, acc);
      }
    }
    Store<MR>(0, acc, y, ncols);
  }

  // More rows: a chunk of k of the columns is dequantized into buf once, and every block of
  // rows reads it; the sums live in sums (m x kCols vectors) between chunks.
  template <int MR>
  WQMM_BF16 WQMM_INLINE void Rows(int64_t r0, int64_t k0, int64_t k1, const __m512i* buf, __m512* sums) {
    __m512 acc[MR][kCols];
    for (int r = 0; r < MR; ++r) {
      for (int c = 0; c < kCols; ++c) acc[r][c] = sums[(r0 + r) * kCols + c];
    }
    for (int64_t kk = k0; kk < k1; kk += kStep) Dot<MR>(r0, kk, buf + (kk - k0) / kStep * kCols, acc);
    for (int r = 0; r < MR; ++r) {
      for (int c = 0; c < kCols; ++c) sums[(r0 + r) * kCols + c] = acc[r][c];
    }
  }

  WQMM_BF16 void Chunked(float* y, int64_t ncols, __m512i* buf, __m512* sums) {
    std::fill(sums, sums + p.m * kCols, _mm512_setzero_ps());
    for (int64_t k0 = 0; k0 < p.k; k0 += kChunk) {
      const int64_t k1 = std::min(p.k, k0 + kChunk);
      for (int64_t kk = k0; kk < k1; kk += kStep) {
        if (kk == 0 || (p.group_size && kk % p.group_size == 0)) Quant(kk);  // a group starts
        __m512i* w = buf + (kk - k0) / kStep * kCols;
        if (kk + kStep <= p.k) Weights<true>(kk, w);
        else Weights<false>(kk, w);
      }
      int64_t r0 = 0;
      for (; r0 + kBlockRows <= p.m; r0 += kBlockRows) Rows<kBlockRows>(r0, k0, k1, buf, sums);
      switch (p.m - r0) {
        case 3: Rows<3>(r0, k0, k1, buf, sums); break;
        case 2: Rows<2>(r0, k0, k1, buf, sums); break;
        case 1: Rows<1>(r0, k0, k1, buf, sums); break;
        default: break;
      }
    }
    for (int64_t r = 0; r < p.m; ++r) {
      for (int c = 0; c < ncols; ++c) y[r * p.n + j[c]] = _mm512_reduce_add_ps(sums[r * kCols + c]);
    }
  }
};

template <bool kInt4, bool kOffset>
WQMM_BF16 void DecodeT(const Problem& p, const uint16_t* x, int64_t kpad, float* y, int64_t c0, int64_t c1) {
  struct alignas(64) Vector { float lanes[16]; };  // over-aligned new (C++17)
  const bool direct = p.m <= kBlockRows;
  std::vector<Vector> buf(direct ? 0 : kChunk / kStep * kCols), sums(direct ? 0 : p.m * kCols);
  const int64_t stride = kInt4 ? p.k / 2 : p.k;
  for (int64_t j0 = c0; j0 < c1; j0 += kCols) {
    ColumnBlock<kInt4, kOffset> b{p, x, kpad, {}, {}, j0 + 2 * kCols <= c1 ? kCols * stride : 0, {}};
    for (int c = 0; c < kCols; ++c) {
      b.j[c] = std::min(j0 + c, c1 - 1);
      b.col[c] = p.x2 + b.j[c] * stride;
    }
    const int64_t ncols = std::min<int64_t>(kCols, c1 - j0);
    if (!direct) {
      b.Chunked(y, ncols, reinterpret_cast<__m512i*>(buf.data()), reinterpret_cast<__m512*>(sums.data()));
      continue;
    }
    switch (p.m) {
      case 1: b.template Direct<1>(y, ncols); break;
      case 2: b.template Direct<2>(y, ncols); break;
      case 3: b.template Direct<3>(y, ncols); break;
      default: b.template Direct<4>(y, ncols); break;
    }
  }
}

}  // namespace

std::vector<uint16_t> PadActivations(const Problem& p) {
  const int64_t kpad = (p.k + kStep - 1) / kStep * kStep;
  std::vector<uint16_t> x(p.m * kpad, 0);
  for (int64_t r = 0; r < p.m; ++r) {
    std::memcpy(x.data() + r * kpad, static_cast<const uint16_t*>(p.x1) + r * p.k, p.k * 2);
  }
  return x;
}

void DecodeBf16T(const Problem& p, const uint16_t* x, float* y, int64_t c0, int64_t c1) {
  const int64_t kpad = (p.k + kStep - 1) / kStep * kStep;
  WQMM_DISPATCH(DecodeT, p, x, kpad, y, c0, c1);
}

#else

std::vector<uint16_t> PadActivations(const Problem&) { return {}; }
void DecodeBf16T(const Problem&, const uint16_t*, float*, int64_t, int64_t) {}

#endif

}  // namespace jax_wqmm::cpu
