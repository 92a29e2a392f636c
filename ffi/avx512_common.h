// Small AVX-512 pieces the CPU kernels share: lane masks, int4 codes as floats, q * s in one
// fma, float16 rounding by the CPU's own conversions, and the next panel's prefetch. Every
// AVX-512 CPU has F16C.
#ifndef JAX_WQMM_AVX512_COMMON_H_
#define JAX_WQMM_AVX512_COMMON_H_

#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "numerics.h"

#define WQMM_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"
#define WQMM_AVX512_INLINE __attribute__((target(WQMM_AVX512_TARGET), always_inline)) inline

namespace jax_wqmm::cpu::avx512 {

// The first `count` of 16 lanes (none for count <= 0).
WQMM_INLINE __mmask16 LaneMask(int64_t count) {
  return count >= 16 ? __mmask16{0xFFFF} : count <= 0 ? __mmask16{0} : static_cast<__mmask16>((1u << count) - 1);
}

// q * s for int8 codes q (int32 lanes) exactly, in one fma and no int-to-float conversion: the
// float with the bits of kMagicBits + q is kMagic + q (kMagic = 1.5 * 2^23, whose unit in the
// last place is 1), and fma(kMagic + q, s, -kMagic * s) rounds the exact q * s once, which a
// float holds (8 bits times at most 11). ms = -kMagic * s, which MagicExact(s) says is exact.
constexpr int32_t kMagicBits = 0x4B400000;
constexpr float kMagic = 12582912.0f;
inline bool MagicExact(float s) { return std::fabs(s) < 0x1p100f; }  // kMagic * s finite and exact
WQMM_AVX512_INLINE __m512 MagicProducts(__m512i q, __m512 s, __m512 ms) {
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_add_epi32(q, _mm512_set1_epi32(kMagicBits))), s, ms);
}

// The values of the 16 int4 codes (two's complement): lane c holds float(code c).
WQMM_AVX512_INLINE __m512 Int4CodeValues() {
  return _mm512_set_ps(-1, -2, -3, -4, -5, -6, -7, -8, 7, 6, 5, 4, 3, 2, 1, 0);
}

// float(q) of the int4 codes in the low four bits of each lane: vpermps reads only those.
WQMM_AVX512_INLINE __m512 Int4Values(__m512i nibbles) { return _mm512_permutexvar_ps(nibbles, Int4CodeValues()); }

// Lane l = the code of element l of 8 packed bytes (element 2i in the low nibble of byte i),
// in its low four bits.
WQMM_AVX512_INLINE __m512i Int4Lanes(__m128i bytes) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));  // lane l: byte l / 2
  return _mm512_srlv_epi32(d, _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0));
}

// v rounded to float16 (nearest even; subnormals, overflow to inf) and back to float.
WQMM_AVX512_INLINE __m512 RoundF16(__m512 v) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// y[l] += v[l] for the lanes in mask (a row of float sums, the rest untouched).
WQMM_AVX512_INLINE void AddTo(float* y, __mmask16 mask, __m512 v) {
  _mm512_mask_storeu_ps(y, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, y), v));
}

// The next panel of W (`bytes` from `next`) prefetched into L2 in memory order, one slice of
// `slices` per tile or strip of the current panel, whose rows the kernels read side by side:
// DRAM serves a few sequential streams far better than one line from each of many rows.
class NextPanel {
 public:
  NextPanel(const uint8_t* next, int64_t bytes, int64_t slices)
      : next_(reinterpret_cast<const char*>(next)), bytes_(bytes), slice_((bytes + slices - 1) / slices) {}
  WQMM_INLINE void Prefetch(int64_t i) const {  // slice i
    for (int64_t b = i * slice_; b < std::min(bytes_, (i + 1) * slice_); b += 64) _mm_prefetch(next_ + b, _MM_HINT_T1);
  }

 private:
  const char* next_;
  int64_t bytes_, slice_;
};

}  // namespace jax_wqmm::cpu::avx512

#endif  // __x86_64__
#endif  // JAX_WQMM_AVX512_COMMON_H_
