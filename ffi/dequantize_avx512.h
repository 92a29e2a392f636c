// The large-m path's dequantize on CPUs with AVX-512: dequantize_avx512.cc.
#ifndef JAX_WQMM_DEQUANTIZE_AVX512_H_
#define JAX_WQMM_DEQUANTIZE_AVX512_H_

#include <cstdint>

#include "cpu_kernel.h"

namespace jax_wqmm::cpu {

// Whether DequantizeAvx512 takes p (ND storage; bfloat16 needs AVX-512 BF16, float16 AVX-512:
// the caller checks the ISA).
bool DequantizeAvx512Covers(const Problem& p);

// Part of W[:, col_begin:col_end] into p.out, in the activation dtype: ND storage, its rows
// [b, e) ((k, c1 - c0) output); transposed, its columns [b, e) (output its transpose, (c1 - c0, k)).
void DequantizeAvx512(const Problem& p, int64_t b, int64_t e);

}  // namespace jax_wqmm::cpu

#endif  // JAX_WQMM_DEQUANTIZE_AVX512_H_
