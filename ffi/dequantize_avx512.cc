// The large-m path's dequantize (W[:, c0:c1] in the activation dtype, XLA's dot multiplies)
// on CPUs with AVX-512: sixteen elements at a time along the storage's rows (ND: columns of a
// row of W; transposed: k of a column, written as rows of W's transpose), the codes converted
// and rounded as the Ascend kernel rounds them (numerics.h) by the CPU's own conversions
// (vcvtneps2bf16 for bfloat16, vcvtps2ph for float16, both nearest even).
#include <algorithm>
#include <cmath>
#include <vector>

#include "dequantize_avx512.h"
#include "avx512_common.h"
#include "numerics.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace jax_wqmm::cpu {

bool DequantizeAvx512Covers(const Problem& p) {
  if (p.act != Float::kBF16 && p.act != Float::kF16) return false;
  if (p.transposed) return !p.int4 || p.k % 2 == 0;                // int4: columns on bytes
  return !p.int4 || (p.n % 2 == 0 && p.col_begin % 2 == 0);         // int4: rows and slabs on bytes
}

#if defined(__x86_64__)
namespace {

using namespace avx512;  // NOLINT

#define WQMM_AVX512 __attribute__((target(WQMM_AVX512_TARGET)))
#define WQMM_AVX512_BF16 __attribute__((target(WQMM_AVX512_TARGET ",avx512bf16")))

// Sixteen codes of a row from column j as int32 (int8) or float (int4) lanes; cols < 16 at the
// end of the slab (masked: zero codes past it).
WQMM_AVX512 WQMM_INLINE __m512i Int8Codes(const uint8_t* row, int64_t j, int64_t cols) {
  return _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(LaneMask(cols), row + j));
}

WQMM_AVX512 WQMM_INLINE __m512 Int4Codes(const uint8_t* row, int64_t j, int64_t cols) {
  return Int4Values(Int4Lanes(_mm_maskz_loadu_epi8(LaneMask((cols + 1) / 2), row + j / 2)));
}

// Sixteen dequantized weights in the activation dtype (kF16: float16, else bfloat16) from the
// codes at element e of a storage row (cols < 16: masked), with the lanes' scale s and offset o
// (magic: int8 without an offset, o = -kMagic * s).
template <bool kF16, bool kInt4, bool kOffset>
WQMM_AVX512_BF16 WQMM_INLINE __m256i Sixteen(const uint8_t* row, int64_t e, int64_t cols, __m512 s, __m512 o,
                                            bool magic) {
  __m512 w;
  if (!kInt4 && !kOffset && magic) {
    w = MagicProducts(Int8Codes(row, e, cols), s, o);
  } else {
    __m512 q = kInt4 ? Int4Codes(row, e, cols) : _mm512_cvtepi32_ps(Int8Codes(row, e, cols));
    if constexpr (kOffset) {
      q = _mm512_add_ps(q, o);
      if constexpr (kF16) q = RoundF16(q);  // f16(q + o)
    }
    w = _mm512_mul_ps(q, s);
  }
  if constexpr (kF16) return _mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  else return (__m256i)_mm512_cvtneps_pbh(w);
}

constexpr int64_t kPrefetchRows = 4;

// ND: the rows [r0, r1) of W[:, c0:c1] into out (rows of c1 - c0). (The float16 copies use no
// BF16 instruction: they run on AVX-512 without it.)
template <bool kF16, bool kInt4, bool kOffset>
WQMM_AVX512_BF16 WQMM_INLINE void Rows(const Problem& p, int64_t r0, int64_t r1) {
  const int64_t c0 = p.col_begin, c1 = p.col_end, width = c1 - c0, stride = kInt4 ? p.n / 2 : p.n;
  const auto* scale = static_cast<const uint16_t*>(p.scale);
  const auto* offset = static_cast<const uint16_t*>(p.offset);
  std::vector<float> s(width + 16), o(width + 16);  // the current group's, as floats
  bool magic = false;
  for (int64_t kk = r0; kk < r1; ++kk) {
    if (kk == r0 || (p.group_size && kk % p.group_size == 0)) {
      const int64_t first = p.group_size ? kk / p.group_size * p.n : 0;
      magic = !kInt4 && !kOffset;
      for (int64_t j = 0; j < width; ++j) {
        const int64_t i = p.per_tensor() ? 0 : first + c0 + j;
        s[j] = ActToF32(kF16, scale[i]);
        o[j] = kOffset ? ActToF32(kF16, offset[i]) : 0.0f;
        magic = magic && MagicExact(s[j]);
      }
      if (magic) {
        for (int64_t j = 0; j < width; ++j) o[j] = -kMagic * s[j];
      }
    }
    const uint8_t* row = p.x2 + kk * stride;
    uint16_t* out = static_cast<uint16_t*>(p.out) + kk * width;
    // a slab reads a short strip of each row (width codes of stride): the strip kPrefetchRows
    // rows ahead is prefetched, as hardware prefetchers do not follow strips
    if (kk + kPrefetchRows < r1) {
      const uint8_t* ahead = row + kPrefetchRows * stride + (kInt4 ? c0 / 2 : c0);
      for (int64_t b = 0; b < (kInt4 ? width / 2 : width); b += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + b), _MM_HINT_T0);
      }
    }
    for (int64_t j = 0; j < width; j += 16) {
      const int64_t cols = std::min<int64_t>(16, width - j);
      const __m256i h = Sixteen<kF16, kInt4, kOffset>(row, c0 + j, cols, _mm512_loadu_ps(s.data() + j),
                                                      _mm512_loadu_ps(o.data() + j), magic);
      _mm256_mask_storeu_epi16(out + j, LaneMask(cols), h);
    }
  }
}

// Transposed: the columns [j0, j1) of W (rows of x2) over all k into out as rows of W[:, c0:c1]'s
// transpose ((c1 - c0, k)).
template <bool kF16, bool kInt4, bool kOffset>
WQMM_AVX512_BF16 WQMM_INLINE void Cols(const Problem& p, int64_t j0, int64_t j1) {
  const int64_t stride = kInt4 ? p.k / 2 : p.k, span = p.group_size ? p.group_size : p.k;
  const auto* scale = static_cast<const uint16_t*>(p.scale);
  const auto* offset = static_cast<const uint16_t*>(p.offset);
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = p.x2 + j * stride;
    uint16_t* out = static_cast<uint16_t*>(p.out) + (j - p.col_begin) * p.k;
    for (int64_t g0 = 0; g0 < p.k; g0 += span) {
      const int64_t i = p.per_tensor() ? 0 : (p.group_size ? g0 / p.group_size * p.n : 0) + j;
      const float sf = ActToF32(kF16, scale[i]);
      const bool magic = !kInt4 && !kOffset && MagicExact(sf);
      const __m512 s = _mm512_set1_ps(sf);
      const __m512 o = _mm512_set1_ps(kOffset ? ActToF32(kF16, offset[i]) : magic ? -kMagic * sf : 0.0f);
      for (int64_t kk = g0; kk < std::min(p.k, g0 + span); kk += 16) {  // groups: multiples of 32
        const int64_t count = std::min<int64_t>(16, p.k - kk);
        _mm256_mask_storeu_epi16(out + kk, LaneMask(count), Sixteen<kF16, kInt4, kOffset>(row, kk, count, s, o, magic));
      }
    }
  }
}

template <bool kF16>
WQMM_AVX512_BF16 void Part(const Problem& p, int64_t b, int64_t e) {
#define WQMM_PART(I4, OFF) (p.transposed ? Cols<kF16, I4, OFF>(p, b, e) : Rows<kF16, I4, OFF>(p, b, e))
  if (p.int4) {
    if (p.offset) WQMM_PART(true, true);
    else WQMM_PART(true, false);
  } else {
    if (p.offset) WQMM_PART(false, true);
    else WQMM_PART(false, false);
  }
#undef WQMM_PART
}

}  // namespace

void DequantizeAvx512(const Problem& p, int64_t b, int64_t e) {
  if (p.act == Float::kF16) Part<true>(p, b, e);
  else Part<false>(p, b, e);
}

#else

void DequantizeAvx512(const Problem&, int64_t, int64_t) {}

#endif

}  // namespace jax_wqmm::cpu
