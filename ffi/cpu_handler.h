// FFI handlers of the CPU kernels.
#ifndef JAX_WQMM_CPU_HANDLER_H_
#define JAX_WQMM_CPU_HANDLER_H_

#include "xla/ffi/api/ffi.h"

// x1, x2, scale, [offset, bias, x3] -> the local x1 @ W + bias + x3 (no all-reduce).
XLA_FFI_DECLARE_HANDLER_SYMBOL(WqmmCpuMatmul);
// x2, scale, [offset] -> W = (x2 + offset) * scale, (k, n) in the scale's dtype.
XLA_FFI_DECLARE_HANDLER_SYMBOL(WqmmCpuDequantize);

#endif  // JAX_WQMM_CPU_HANDLER_H_
