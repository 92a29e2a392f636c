// The numeric contract of the operator, as the Atlas A2 kernel rounds (cann ops-nn
// matmul/weight_quant_batch_matmul_v2/op_kernel/weight_quant_batch_matmul_v2_common.h and
// anti_quant.h, which MC2 uses through its "custom" kernels; hicann/ops-transformer
// mc2/matmul_all_reduce/op_kernel/matmul_all_reduce_add_x3.h). One definition, shared by the
// CPU kernels and the emulator of CANN; reference.py writes the same rule in jnp.
//
//   dequantize, float16 x1:  w = f16(f16(q + offset) * scale)        two half roundings
//   dequantize, bfloat16 x1: w = bf16(f32(f32(q + offset) * scale))  float32 math, one rounding
//     q is the code's exact value (int8, int4, float8_e4m3fn and HiFloat8 values are all
//     exact in float16 and bfloat16); FP8 / HiFloat8 take no offset. Rounding: to nearest even.
//   matmul:  y = out(f32(bias) + sum_k f32(x1) * f32(w))   float32 accumulation, one rounding
//   x3:      y = out(y + x3)                               after the matmul's rounding
//   then the all-reduce sums the ranks' y in the output dtype.
#ifndef JAX_WQMM_NUMERICS_H_
#define JAX_WQMM_NUMERICS_H_

#include <cstdint>
#include <cstring>

#define WQMM_INLINE inline __attribute__((always_inline))

namespace jax_wqmm {

WQMM_INLINE uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

WQMM_INLINE float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- bfloat16

WQMM_INLINE float Bf16ToF32(uint16_t b) { return FromBits(static_cast<uint32_t>(b) << 16); }

// Round to nearest even (NaN stays NaN). Branch-free: vectorizes in simd loops.
WQMM_INLINE uint16_t F32ToBf16(float f) {
  const uint32_t u = Bits(f);
  const uint16_t nan = static_cast<uint16_t>((u >> 16) | 0x40);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7fffffffu) > 0x7f800000u ? nan : rounded;
}

// f rounded to bfloat16 (nearest even), as a float. Branch-free: vectorizes in simd loops.
WQMM_INLINE float RoundBf16(float f) {
  const uint32_t u = Bits(f);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  return (u & 0x7fffffffu) > 0x7f800000u ? f : FromBits(r);
}

// ---- float16

WQMM_INLINE float F16ToF32(uint16_t h) {
  uint32_t s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
  if (e == 0) {
    if (m == 0) {
      u = s;
    } else {  // subnormal: normalize
      e = 127 - 15 + 1;
      while ((m & 0x400u) == 0) {
        m <<= 1;
        --e;
      }
      u = s | (e << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (e == 31) {
    u = s | 0x7f800000u | (m << 13);
  } else {
    u = s | ((e + 127 - 15) << 23) | (m << 13);
  }
  return FromBits(u);
}

// f rounded to float16 (nearest even; subnormals, overflow to inf), as a float. Branch-free:
// vectorizes in simd loops.
WQMM_INLINE float RoundF16(float f) {
  const uint32_t u = Bits(f), sign = u & 0x80000000u, a = u & 0x7fffffffu;
  // normal float16 range: keep 10 of the 23 mantissa bits
  const float normal = FromBits((a + 0xfffu + ((a >> 13) & 1u)) & 0xffffe000u);
  // below 2^-14 the quantum is 2^-24: adding 2^-1 makes the hardware round there (|f| < 2^-14)
  const float tiny = (FromBits(a) + 0.5f) - 0.5f;
  float r = a < 0x38800000u ? tiny : normal;
  r = a >= 0x477ff000u ? FromBits(0x7f800000u) : r;  // >= 65520 rounds to inf
  r = a > 0x7f800000u ? FromBits(a) : r;             // NaN stays NaN
  return FromBits(Bits(r) | sign);
}

// The float16 bits of f, a value float16 represents exactly (what the rounding functions
// return). Branch-free: vectorizes in simd loops.
WQMM_INLINE uint16_t F16BitsOfExact(float f) {
  const uint32_t u = Bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  const uint32_t normal = ((a >> 13) - ((127u - 15u) << 10)) & 0x7fffu;
  // multiples of 2^-24 below 2^-14: exact, and within int32 (a signed conversion vectorizes)
  const uint32_t tiny = static_cast<uint32_t>(static_cast<int32_t>(FromBits(a) * 16777216.0f));
  uint32_t h = a < 0x38800000u ? tiny : normal;
  h = a >= 0x7f800000u ? (a > 0x7f800000u ? 0x7e00u : 0x7c00u) : h;  // NaN, inf
  return static_cast<uint16_t>(sign | h);
}

WQMM_INLINE uint16_t F32ToF16(float f) { return F16BitsOfExact(RoundF16(f)); }  // nearest even

// ---- the contract

// The dequantized weight of code value q (exact), with offset o (0 when absent) and scale s,
// for activations in float16 (f16 = true) or bfloat16; returned as a float holding a value of
// the activation dtype.
WQMM_INLINE float DequantF16(float q, float o, float s) { return RoundF16(RoundF16(q + o) * s); }
WQMM_INLINE float DequantBf16(float q, float o, float s) { return RoundBf16((q + o) * s); }
WQMM_INLINE float Dequant(bool f16, float q, float o, float s) {
  return f16 ? DequantF16(q, o, s) : DequantBf16(q, o, s);
}

// A value of the activation dtype (f16, else bfloat16) from its bits, as a float.
WQMM_INLINE float ActToF32(bool f16, uint16_t h) { return f16 ? F16ToF32(h) : Bf16ToF32(h); }

// The output dtype's rounding of a float32 value (f16, else bfloat16).
WQMM_INLINE float RoundOut(bool f16, float v) { return f16 ? RoundF16(v) : RoundBf16(v); }

// One output element: the matmul's float32 sum plus bias, rounded; then x3 added and rounded
// again (the kernel adds x3 after the matmul's output was written). Absent: has_* false
// (their values unused). Branch-free once inlined with constant flags: vectorizes in simd loops.
WQMM_INLINE float OutputElement(bool f16, float acc, bool has_bias, float bias, bool has_x3, float x3) {
  if (has_bias) acc += bias;
  const float y = RoundOut(f16, acc);
  return has_x3 ? RoundOut(f16, y + x3) : y;
}

}  // namespace jax_wqmm

#endif  // JAX_WQMM_NUMERICS_H_
