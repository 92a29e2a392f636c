// bfloat16 <-> float32 by bits, shared by the CPU kernels.
#ifndef JAX_WQMM_FLOAT_BITS_H_
#define JAX_WQMM_FLOAT_BITS_H_

#include <cstdint>
#include <cstring>

#define WQMM_INLINE inline __attribute__((always_inline))

namespace jax_wqmm::cpu {

WQMM_INLINE float Bf16ToF32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

WQMM_INLINE uint16_t F32ToBf16(float f) {  // round to nearest even (NaN stays NaN)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace jax_wqmm::cpu

#endif  // JAX_WQMM_FLOAT_BITS_H_
