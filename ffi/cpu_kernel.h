// CPU kernels for the operator's local part: y = x1 @ ((x2 + offset) * scale) + bias + x3,
// reading the quantized weight once (codes converted in cache, scale and offset applied once
// per panel or group), and a dequantize-only kernel for large m (XLA's dot then multiplies).
#ifndef JAX_WQMM_CPU_KERNEL_H_
#define JAX_WQMM_CPU_KERNEL_H_

#include <cstdint>
#include <functional>
#include <string>

// Impl<int4, offset>(p, ...) for a Problem p: the kernels are templates on both.
#define WQMM_DISPATCH(Impl, p, ...)                                              \
  do {                                                                           \
    if ((p).int4) {                                                              \
      if ((p).offset) Impl<true, true>(p, __VA_ARGS__);                          \
      else Impl<true, false>(p, __VA_ARGS__);                                    \
    } else {                                                                     \
      if ((p).offset) Impl<false, true>(p, __VA_ARGS__);                         \
      else Impl<false, false>(p, __VA_ARGS__);                                   \
    }                                                                            \
  } while (0)

namespace jax_wqmm::cpu {

enum class Float : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

struct Problem {
  int64_t m = 0, k = 0, n = 0;
  const void* x1 = nullptr;        // (m, k), act
  Float act = Float::kBF16;
  const uint8_t* x2 = nullptr;     // (k, n), or (n, k) if transposed; int8 or packed int4
  bool int4 = false;
  bool transposed = false;
  const void* scale = nullptr;     // act dtype: (1,), (n,) or (ceil(k/g), n)
  const void* offset = nullptr;    // same shape, or null
  int64_t group_size = 0;          // 0: per-tensor / per-channel from scale_count
  int64_t scale_count = 1;         // elements of scale
  bool per_tensor() const { return group_size == 0 && scale_count == 1; }
  const void* bias = nullptr;      // (n,), bias_dtype
  Float bias_dtype = Float::kBF16;
  const void* x3 = nullptr;        // (m, n), x3_dtype
  Float x3_dtype = Float::kBF16;
  void* out = nullptr;             // (m, n) act, or the weight for Dequantize
  int64_t col_begin = 0, col_end = 0;  // Dequantize: the columns [col_begin, col_end) of W
};

// Where the kernels run their parallel parts: run(tasks, body) calls body(i) once for each i in
// [0, tasks), concurrently where it can, and returns when all calls have returned.
struct Workers {
  int threads = 1;
  std::function<void(int tasks, const std::function<void(int)>& body)> run;
};
// Workers of its own: a thread per task (the XLA handlers use XLA's FFI thread pool instead).
Workers OwnThreads();

// y = x1 @ W + bias + x3 into out (act dtype).
void Matmul(const Problem& p, const Workers& workers);
// Whether Matmul runs a problem of this kind with the blocked bf16 kernel at large m (on this
// CPU): the rule that decides, at trace time, whether a large-m call is one fused custom call.
bool MatmulBlocked(Float act, bool transposed, bool int4, int64_t n);
// W[:, c0:c1] = (x2 + offset) * scale in act dtype, into out: (k, c1 - c0), or for transposed
// storage its transpose, (c1 - c0, k).
void Dequantize(const Problem& p, const Workers& workers);
// Multiply-adds per second of every core running the kernels' widest multiply-add instruction
// (bf16 dot products on AVX-512 BF16, else float FMAs; float_fma: float FMAs, which the float16
// kernels use): the compute ceiling the benchmarks compare against; measured for about
// `seconds`. 0 on the portable path.
double PeakMacRate(double seconds, bool float_fma = false);
// Weights per second that the bf16 decode kernel converts from codes (int8 without an offset,
// or int4) to the rounded bf16 it multiplies, on every core, codes in L1: the floor of its
// per-weight conversion (the numeric contract rounds each weight). 0 where that kernel does
// not run (no AVX-512 BF16). rows > 0: each converted pair also feeds that many rows of x's dot
// products in registers (1, 2, 4, 8 or 16; std::invalid_argument otherwise), the kernel's inner
// loop without its memory traffic: the floor of converting and multiplying at m = rows. int4
// at rows <= kInt4LutRows: the inner loop of the lookup kernel that runs there instead
// (transposes, lookups and dot products on a strip of codes in L1).
double ConvertRate(bool int4, int rows, double seconds);
// For the rate probes: units per second of `loop(iters)` running on every core at once (each
// core doing units_per_iter * iters), iters doubled until a round takes a quarter of
// `seconds`, then the best of three rounds.
double AllCoresRate(const std::function<void(int64_t)>& loop, double units_per_iter, int64_t iters, double seconds);
// The instruction set the kernels dispatched to: "avx512", "avx2" or "portable".
std::string Isa();

}  // namespace jax_wqmm::cpu

#endif  // JAX_WQMM_CPU_KERNEL_H_
