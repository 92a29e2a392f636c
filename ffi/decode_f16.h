// The decode kernel for float16 activations on CPUs with AVX-512: decode_f16.cc.
#ifndef JAX_WQMM_DECODE_F16_H_
#define JAX_WQMM_DECODE_F16_H_

#include <cstdint>
#include <vector>

#include "cpu_kernel.h"

namespace jax_wqmm::cpu {

// Whether DecodeF16 takes p (on a CPU with AVX-512: the caller checks the ISA).
bool DecodeF16Covers(const Problem& p);

// y (m, n), overwritten = x1[:, k0:k1] @ ((x2 + offset) * scale)[k0:k1, :], in float32; x is
// x1 as float32 (m, k). k0 is a multiple of the group size (per-group) or of 8.
void DecodeF16(const Problem& p, const float* x, float* y, int64_t k0, int64_t k1);

}  // namespace jax_wqmm::cpu

#endif  // JAX_WQMM_DECODE_F16_H_
