#include "cpu_kernel.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <tuple>
#include <vector>

#include "decode_bf16.h"
#include "decode_f16.h"
#include "dequantize_avx512.h"
#include "numerics.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace jax_wqmm::cpu {
namespace {

WQMM_INLINE float Load(const void* p, Float t, int64_t i) {
  switch (t) {
    case Float::kBF16: return Bf16ToF32(static_cast<const uint16_t*>(p)[i]);
    case Float::kF16: return F16ToF32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

WQMM_INLINE void Store(void* p, Float t, int64_t i, float v) {
  if (t == Float::kBF16) static_cast<uint16_t*>(p)[i] = F32ToBf16(v);
  else if (t == Float::kF16) static_cast<uint16_t*>(p)[i] = F32ToF16(v);
  else static_cast<float*>(p)[i] = v;
}

void ToF32(const void* p, Float t, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = Load(p, t, i);
}

// Scale and offset of one row (k index) of the weight, as float rows over [0, n).
struct QuantParams {
  std::vector<float> scale, offset;  // (groups, n) or (1, n) rows as float
  int64_t group = 0, n = 0;
  const float* scale_row(int64_t kk) const { return scale.data() + (group ? (kk / group) * n : 0); }
  const float* offset_row(int64_t kk) const {
    return offset.empty() ? nullptr : offset.data() + (group ? (kk / group) * n : 0);
  }
};

QuantParams MakeQuantParams(const Problem& p) {
  QuantParams q;
  q.group = p.group_size;
  q.n = p.n;
  int64_t count = p.scale_count;
  q.scale.resize(count);
  ToF32(p.scale, p.act, count, q.scale.data());
  if (p.offset) {
    q.offset.resize(count);
    ToF32(p.offset, p.act, count, q.offset.data());
  }
  if (p.per_tensor()) {  // broadcast to a row so every path is per-channel-shaped
    q.scale.assign(p.n, q.scale[0]);
    if (p.offset) q.offset.assign(p.n, q.offset[0]);
  }
  return q;
}

// Element e of packed int4 storage (two per byte, element 2i in the low nibble).
WQMM_INLINE float Nibble(const uint8_t* w, int64_t e) {
  int v = (w[e >> 1] >> ((e & 1) * 4)) & 0xf;
  return static_cast<float>(v >= 8 ? v - 16 : v);
}

// Quantized value x2[j, kk] of transposed storage (n, k).
WQMM_INLINE float CodeT(const Problem& p, int64_t j, int64_t kk) {
  int64_t e = j * p.k + kk;
  if (!p.int4) return static_cast<float>(reinterpret_cast<const int8_t*>(p.x2)[e]);
  return Nibble(p.x2, e);
}

constexpr int64_t kBlockN = 512;  // columns per block (ND): codes and accumulators in L1/L2
constexpr int64_t kBlockK = 512;  // k chunk (transposed)
constexpr int64_t kPanel = 64;    // rows of codes per panel (ND), kept in L2 across blocks
constexpr int64_t kRows = 8;      // rows of x per register block
constexpr int64_t kLanes = 16;    // columns per register block (one AVX-512 vector of floats)

// Raw integer codes of W[kk, j0:j0+len) as floats into buf (ND storage).
template <bool kInt4>
WQMM_INLINE void CodesRowND(const Problem& p, int64_t kk, int64_t j0, int64_t len,
                            float* __restrict buf) {
  if constexpr (!kInt4) {
    const int8_t* __restrict w = reinterpret_cast<const int8_t*>(p.x2) + kk * p.n + j0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<float>(w[j]);
  } else {
    const int64_t e0 = kk * p.n + j0;
    if ((e0 & 1) == 0) {
      const uint8_t* __restrict w = p.x2 + (e0 >> 1);
      const int64_t pairs = len / 2;
#pragma omp simd
      for (int64_t i = 0; i < pairs; ++i) {
        int8_t b = static_cast<int8_t>(w[i]);
        buf[2 * i] = static_cast<float>(static_cast<int8_t>(static_cast<int8_t>(b << 4) >> 4));
        buf[2 * i + 1] = static_cast<float>(static_cast<int8_t>(b >> 4));
      }
      for (int64_t j = 2 * pairs; j < len; ++j) buf[j] = Nibble(p.x2, e0 + j);
    } else {
      for (int64_t j = 0; j < len; ++j) buf[j] = Nibble(p.x2, e0 + j);
    }
  }
}

// The dequantized weight (numerics.h, the kernel's rounding) of the codes in buf[0:len), with
// scale s and offset o rows, in place.
template <bool kOffset>
WQMM_INLINE void DequantInPlace(bool f16, const float* __restrict s, const float* __restrict o,
                                int64_t len, float* __restrict buf) {
  if (f16) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) buf[j] = DequantF16(buf[j], kOffset ? o[j] : 0.0f, s[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) buf[j] = DequantBf16(buf[j], kOffset ? o[j] : 0.0f, s[j]);
  }
}

// Dequantizes W[kk, j0:j1) (ND storage) into buf[0:j1-j0), rounded as the kernel does.
template <bool kInt4, bool kOffset>
WQMM_INLINE void DequantRowND(const Problem& p, const QuantParams& q, int64_t kk, int64_t j0,
                              int64_t j1, float* __restrict buf) {
  const int64_t len = j1 - j0;
  CodesRowND<kInt4>(p, kk, j0, len, buf);
  DequantInPlace<kOffset>(p.act == Float::kF16, q.scale_row(kk) + j0,
                          kOffset ? q.offset_row(kk) + j0 : nullptr, len, buf);
}

// Partial y (m x n, overwritten) over the k slice [k0, k1) of ND storage: y += x @ W with W
// dequantized row by row as the kernel rounds it (numerics.h), read from memory once.
template <bool kInt4, bool kOffset>
WQMM_INLINE void MatmulRowsND(const Problem& p, const QuantParams& q, const float* x, float* y,
                              int64_t k0, int64_t k1) {
  const int64_t m = p.m, n = p.n;
  // Few rows: whole rows at a time, so each thread streams its codes strictly sequentially.
  const int64_t block = m < kRows ? n : kBlockN;
  std::vector<float> pbuf(m < kRows ? n : kPanel * kBlockN), raw(m * block);
  std::fill(y, y + m * n, 0.0f);
  for (int64_t r0 = k0; r0 < k1; r0 = std::min(k1, r0 + kPanel)) {
    const int64_t r1 = std::min(k1, r0 + kPanel);
    for (int64_t j0 = 0; j0 < n; j0 += block) {
      const int64_t len = std::min(block, n - j0), rows = r1 - r0;
      if (m < kRows) {  // decode: stream each dequantized row into the accumulators
        for (int64_t kk = r0; kk < r1; ++kk) {
          float* __restrict b = pbuf.data();
          DequantRowND<kInt4, kOffset>(p, q, kk, j0, j0 + len, b);
          for (int64_t r = 0; r < m; ++r) {
            const float xv = x[r * p.k + kk];
            float* __restrict a = y + r * n + j0;
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) a[j] += xv * b[j];
          }
        }
        continue;
      }
      // The panel's dequantized rows (rows x len, in L2), then a register-blocked product:
      // kRows rows of x by kLanes columns of accumulators stay in registers across the panel.
      for (int64_t kk = r0; kk < r1; ++kk) DequantRowND<kInt4, kOffset>(p, q, kk, j0, j0 + len, pbuf.data() + (kk - r0) * len);
      const int64_t full = len / kLanes * kLanes;
      for (int64_t r = 0; r < m; r += kRows) {
        const int64_t nr = std::min<int64_t>(kRows, m - r);
        for (int64_t j = 0; j < full; j += kLanes) {
          float acc[kRows][kLanes] = {};
          for (int64_t kk = 0; kk < rows; ++kk) {
            const float* __restrict b = pbuf.data() + kk * len + j;
#pragma GCC unroll 8
            for (int64_t rr = 0; rr < kRows; ++rr) {
              const float xv = rr < nr ? x[(r + rr) * p.k + r0 + kk] : 0.0f;
#pragma omp simd
              for (int64_t l = 0; l < kLanes; ++l) acc[rr][l] += xv * b[l];
            }
          }
          for (int64_t rr = 0; rr < nr; ++rr)
            for (int64_t l = 0; l < kLanes; ++l) raw[(r + rr) * len + j + l] = acc[rr][l];
        }
        for (int64_t rr = 0; rr < nr; ++rr) {  // the ragged tail of columns
          for (int64_t j = full; j < len; ++j) {
            float acc = 0.0f;
            for (int64_t kk = 0; kk < rows; ++kk) acc += x[(r + rr) * p.k + r0 + kk] * pbuf[kk * len + j];
            raw[(r + rr) * len + j] = acc;
          }
        }
      }
      for (int64_t r = 0; r < m; ++r) {
        const float* __restrict a = raw.data() + r * len;
        float* __restrict out = y + r * n + j0;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) out[j] += a[j];
      }
    }
  }
}

// Dequantized W[kk, j] of transposed storage, rounded as the kernel does.
template <bool kOffset>
WQMM_INLINE float DequantT(const Problem& p, const QuantParams& q, int64_t j, int64_t kk) {
  return Dequant(p.act == Float::kF16, CodeT(p, j, kk), kOffset ? q.offset_row(kk)[j] : 0.0f,
                 q.scale_row(kk)[j]);
}

// Columns [c0, c1) of y for transposed storage: a dot product over k per column.
template <bool kOffset>
WQMM_INLINE void MatmulColsT(const Problem& p, const QuantParams& q, const float* x, float* y,
                             int64_t c0, int64_t c1) {
  std::vector<float> buf(kBlockK);
  for (int64_t j = c0; j < c1; ++j) {
    for (int64_t r = 0; r < p.m; ++r) y[r * p.n + j] = 0.0f;
    for (int64_t k0 = 0; k0 < p.k; k0 += kBlockK) {
      const int64_t k1 = std::min(p.k, k0 + kBlockK), len = k1 - k0;
      for (int64_t kk = k0; kk < k1; ++kk) buf[kk - k0] = DequantT<kOffset>(p, q, j, kk);
      for (int64_t r = 0; r < p.m; ++r) {
        const float* __restrict xr = x + r * p.k + k0;
        const float* __restrict b = buf.data();
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < len; ++i) sum += xr[i] * b[i];
        y[r * p.n + j] += sum;
      }
    }
  }
}

// Values of the activation dtype (rounded by DequantRowND / DequantT) as its bits: exact bit
// selection.
WQMM_INLINE void StoreAct(bool f16, const float* __restrict b, int64_t count, uint16_t* __restrict out) {
  if (!f16) {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) out[j] = static_cast<uint16_t>(Bits(b[j]) >> 16);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) out[j] = F16BitsOfExact(b[j]);
  }
}

// Part of W[:, c0:c1] in the activation dtype: ND storage, its rows [b, e) into the (k, c1 - c0)
// output; transposed storage, its columns [b, e) into the output's transpose ((c1 - c0, k),
// contiguous along k as the storage is).
template <bool kInt4, bool kOffset>
WQMM_INLINE void DequantRows(const Problem& p, const QuantParams& q, int64_t b, int64_t e) {
  const int64_t c0 = p.col_begin, c1 = p.col_end, width = c1 - c0;
  const bool f16 = p.act == Float::kF16;
  auto* out = static_cast<uint16_t*>(p.out);
  if (p.transposed) {
    std::vector<float> buf(p.k);
    for (int64_t j = b; j < e; ++j) {
      for (int64_t kk = 0; kk < p.k; ++kk) buf[kk] = DequantT<kOffset>(p, q, j, kk);
      StoreAct(f16, buf.data(), p.k, out + (j - c0) * p.k);
    }
    return;
  }
  std::vector<float> buf(width);
  for (int64_t kk = b; kk < e; ++kk) {
    DequantRowND<kInt4, kOffset>(p, q, kk, c0, c1, buf.data());
    StoreAct(f16, buf.data(), width, out + kk * width);
  }
}

// Threads worth using for `work` multiply-adds: the workers' (at most $JAX_WQMM_CPU_THREADS),
// one below about a million multiply-adds, where a thread costs more than it saves.
int Threads(const Workers& w, int64_t work) {
  static const int cap = [] {
    const char* env = std::getenv("JAX_WQMM_CPU_THREADS");
    return env ? std::max(1, std::atoi(env)) : 1 << 16;
  }();
  return static_cast<int>(std::clamp<int64_t>(work / (1 << 20), 1, std::min(w.threads, cap)));
}

// body(b, e) over [0, total) in `threads` chunks that are multiples of align.
template <typename F>
void ParallelFor(const Workers& w, int64_t total, int64_t align, int threads, F&& body) {
  if (threads <= 1 || total <= align) {
    body(0, total);
    return;
  }
  int64_t per = (total + threads - 1) / threads;
  per = (per + align - 1) / align * align;
  const int tasks = static_cast<int>((total + per - 1) / per);
  w.run(tasks, [&](int t) { body(t * per, std::min(total, (t + 1) * per)); });
}


// The hot loops, one copy per instruction set: the always-inline templates above are
// inlined into each and vectorized for its target. Nothing is built with -march=native;
// the copy is chosen at run time (Detect).
using MatmulFn = void (*)(const Problem&, const QuantParams&, const float*, float*, int64_t, int64_t);
using RowsFn = void (*)(const Problem&, const QuantParams&, int64_t, int64_t);
struct Kernels {
  MatmulFn cols;     // transposed storage: columns [c0, c1) of y
  MatmulFn rows_nd;  // ND storage: the partial y over the k slice [k0, k1)
  RowsFn dequant;    // rows [r0, r1) of W
};

#define WQMM_WORKERS(suffix, attr)                                                            \
  attr void MatmulCols##suffix(const Problem& p, const QuantParams& q, const float* x,        \
                               float* y, int64_t c0, int64_t c1) {                            \
    if (p.offset) MatmulColsT<true>(p, q, x, y, c0, c1);                                      \
    else MatmulColsT<false>(p, q, x, y, c0, c1);                                              \
  }                                                                                           \
  attr void MatmulRowsND##suffix(const Problem& p, const QuantParams& q, const float* x,      \
                                 float* y, int64_t k0, int64_t k1) {                          \
    WQMM_DISPATCH(MatmulRowsND, p, q, x, y, k0, k1);                                          \
  }                                                                                           \
  attr void DequantRows##suffix(const Problem& p, const QuantParams& q, int64_t r0,           \
                                int64_t r1) {                                                 \
    WQMM_DISPATCH(DequantRows, p, q, r0, r1);                                                 \
  }                                                                                           \
  constexpr Kernels k##suffix{MatmulCols##suffix, MatmulRowsND##suffix, DequantRows##suffix};

#if defined(__x86_64__)
WQMM_WORKERS(Avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))))
WQMM_WORKERS(Avx2, __attribute__((target("avx2,fma,f16c"))))
#endif
WQMM_WORKERS(Portable, )

enum class IsaLevel { kPortable, kAvx2, kAvx512, kAvx512Bf16 };

IsaLevel Detect() {
  static const IsaLevel level = [] {
    const char* force = std::getenv("JAX_WQMM_CPU_ISA");
    IsaLevel best = IsaLevel::kPortable;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = IsaLevel::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      best = IsaLevel::kAvx512;
    if (best == IsaLevel::kAvx512 && __builtin_cpu_supports("avx512bf16")) best = IsaLevel::kAvx512Bf16;
#endif
    if (force) {
      std::string f(force);
      IsaLevel want = f == "avx512bf16" ? IsaLevel::kAvx512Bf16
                      : f == "avx512"   ? IsaLevel::kAvx512
                      : f == "avx2"     ? IsaLevel::kAvx2
                                        : IsaLevel::kPortable;
      if (want < best) best = want;  // only ever downgrade
    }
    return best;
  }();
  return level;
}

// The copy for this machine; AVX-512 BF16 machines take the AVX-512 copies here (bf16
// activations mostly take DecodeBf16 there, decode_bf16.h).
const Kernels& Selected() {
  switch (Detect()) {
#if defined(__x86_64__)
    case IsaLevel::kAvx512Bf16:
    case IsaLevel::kAvx512: return kAvx512;
    case IsaLevel::kAvx2: return kAvx2;
#endif
    default: return kPortable;
  }
}

// Float sums for the kernels to fill, uninitialized: every kernel writes all of what it is
// given (a serial memset of m x n floats was a visible cost at large m). Under
// $JAX_WQMM_CPU_POISON (the tests) they start as NaN, so a kernel that leaves part unwritten
// fails instead of passing on fresh zero pages.
std::unique_ptr<float[]> Sums(int64_t count) {
  static const bool poison = std::getenv("JAX_WQMM_CPU_POISON") != nullptr;
  std::unique_ptr<float[]> sums(new float[count]);
  if (poison) std::fill(sums.get(), sums.get() + count, std::numeric_limits<float>::quiet_NaN());
  return sums;
}

// Rows of ND storage are contiguous: split k, each thread streams its rows once into a partial
// y of its own (rows(out, k0, k1) overwrites out), then the partials are summed into y, the
// elements split between the threads.
template <typename F>
void SplitK(const Workers& w, const Problem& p, int threads, float* y, F&& rows) {
  const int64_t align = p.group_size ? std::max<int64_t>(p.group_size, kPanel) : kPanel;
  const int64_t per = ((p.k + threads - 1) / threads + align - 1) / align * align;
  const int parts = static_cast<int>((p.k + per - 1) / per);
  std::vector<std::unique_ptr<float[]>> partial;
  for (int t = 1; t < parts; ++t) partial.push_back(Sums(p.m * p.n));
  ParallelFor(w, parts, 1, parts, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) rows(t == 0 ? y : partial[t - 1].get(), t * per, std::min(p.k, (t + 1) * per));
  });
  if (partial.empty()) return;
  ParallelFor(w, p.m * p.n, 16, threads, [&](int64_t b, int64_t e) {
    for (const auto& part : partial) {
      const float* __restrict src = part.get();
      float* __restrict dst = y;
      for (int64_t i = b; i < e; ++i) dst[i] += src[i];
    }
  });
}

// Peak-rate probes: `iters` rounds of 12 independent multiply-adds on the widest instruction
// of an instruction set (the dot products of DecodeBf16, else float FMAs). Returns a sum
// so the work is not optimized away.
#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bf16"))) float ProbeBf16(int64_t iters) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x3f803f81);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
    asm volatile("" : "+v"(a));
  }
  float s = 0;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_ps(acc[i]);
  return s;
}
#define WQMM_PROBE_FMA(name, isa, V, set1, fmadd, add)                              \
  __attribute__((target(isa))) float name(int64_t iters) {                        \
    V acc[12]; /* distinct starts: identical chains would be merged into one */  \
    for (int i = 0; i < 12; ++i) acc[i] = set1(static_cast<float>(i));             \
    V a = set1(1.0f), b = set1(0.999f);                                            \
    for (int64_t i = 0; i < iters; ++i) {                                          \
      _Pragma("GCC unroll 12") for (int j = 0; j < 12; ++j) acc[j] = fmadd(a, b, acc[j]); \
      asm volatile("" : "+v"(a), "+v"(b)); /* opaque: no multiply by a constant */ \
    }                                                                              \
    V sum = acc[0];                                                                \
    for (int i = 1; i < 12; ++i) sum = add(sum, acc[i]);                           \
    float lanes[sizeof(V) / 4], t = 0;                                             \
    std::memcpy(lanes, &sum, sizeof(V));                                           \
    for (float v : lanes) t += v;                                                  \
    return t;                                                                      \
  }
WQMM_PROBE_FMA(ProbeAvx512, "avx512f", __m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps)
WQMM_PROBE_FMA(ProbeAvx2, "avx2,fma", __m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps)
#endif

// The kernel's epilogue (numerics.h) over the float32 sums y into out: bias, round, x3,
// round. Rows at a time, branch-free inside (it vectorizes: at small m this is no longer
// negligible next to the matmul).
template <bool kF16, bool kBias, bool kX3>
void EpilogueOf(const Problem& p, const float* y, const float* bias, int64_t r0, int64_t r1) {
  auto* out = static_cast<uint16_t*>(p.out);
  const int64_t x3_bytes = p.x3_dtype == Float::kF32 ? 4 : 2;
  std::vector<float> x3row(kX3 ? p.n : 0);
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict yr = y + r * p.n;
    const float* __restrict b = bias;
    const float* __restrict x3 = x3row.data();
    uint16_t* __restrict o = out + r * p.n;
    if (kX3) ToF32(static_cast<const char*>(p.x3) + r * p.n * x3_bytes, p.x3_dtype, p.n, x3row.data());
#pragma omp simd
    for (int64_t j = 0; j < p.n; ++j) {
      const float v = OutputElement(kF16, yr[j], kBias, kBias ? b[j] : 0.0f, kX3, kX3 ? x3[j] : 0.0f);
      o[j] = kF16 ? F16BitsOfExact(v) : F32ToBf16(v);  // v holds a value of the dtype already
    }
  }
}

// Rows split between the threads: at large m the epilogue streams m x n floats.
void Epilogue(const Problem& p, const float* y, const Workers& workers, int threads) {
  std::vector<float> bias(p.bias ? p.n : 0);
  if (p.bias) ToF32(p.bias, p.bias_dtype, p.n, bias.data());
  const int which = (p.act == Float::kF16) * 4 + (p.bias != nullptr) * 2 + (p.x3 != nullptr);
  auto* f = std::array{EpilogueOf<false, false, false>, EpilogueOf<false, false, true>,
                       EpilogueOf<false, true, false>, EpilogueOf<false, true, true>,
                       EpilogueOf<true, false, false>, EpilogueOf<true, false, true>,
                       EpilogueOf<true, true, false>, EpilogueOf<true, true, true>}[which];
  ParallelFor(workers, p.m, 1, threads, [&](int64_t r0, int64_t r1) { f(p, y, bias.data(), r0, r1); });
}

}  // namespace

Workers OwnThreads() {
  Workers w;
  w.threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  w.run = [](int tasks, const std::function<void(int)>& body) {
    std::vector<std::thread> pool;
    for (int t = 1; t < tasks; ++t) pool.emplace_back(body, t);
    body(0);
    for (auto& th : pool) th.join();
  };
  return w;
}

namespace {
bool DecodeBf16Runs(const Problem& p) { return Detect() == IsaLevel::kAvx512Bf16 && DecodeBf16Covers(p); }
bool DecodeInt4LutRuns(const Problem& p) { return Detect() == IsaLevel::kAvx512Bf16 && DecodeInt4LutCovers(p); }
}  // namespace

bool MatmulBlocked(Float act, bool transposed, bool int4, int64_t n) {
  Problem p;
  p.act = act, p.transposed = transposed, p.int4 = int4, p.n = n;
  return DecodeBf16Runs(p);  // from kDecodeBf16BlockedRows rows on, Matmul runs it blocked
}

void Matmul(const Problem& p, const Workers& workers) {
  // The float32 sums: every kernel below initializes the part it owns.
  const std::unique_ptr<float[]> y_buf = Sums(p.m * p.n);
  float* y = y_buf.get();
  const int threads = Threads(workers, p.m * p.k * p.n);
  if (DecodeBf16Runs(p)) {
    const ActivationPairs xp(p);
    if (p.m >= kDecodeBf16BlockedRows) {  // compute-bound: columns split, no partial sums to add
      ParallelFor(workers, p.n, 64, threads,
                  [&](int64_t c0, int64_t c1) { DecodeBf16Blocked(p, xp.data(), y, c0, c1); });
    } else {
      const bool lut = DecodeInt4LutRuns(p);
      SplitK(workers, p, threads, y, [&](float* out, int64_t k0, int64_t k1) {
        if (lut) DecodeInt4Lut(p, xp.data(), out, k0, k1);
        else DecodeBf16(p, xp.data(), out, k0, k1);
      });
    }
  } else if (Detect() == IsaLevel::kAvx512Bf16 && DecodeBf16TCovers(p)) {  // columns along k: split them
    const std::vector<uint16_t> x = PadActivations(p);
    ParallelFor(workers, p.n, 64, threads,
                [&](int64_t c0, int64_t c1) { DecodeBf16T(p, x.data(), y, c0, c1); });
  } else if (Detect() >= IsaLevel::kAvx512 && DecodeF16Covers(p)) {
    std::vector<float> x(p.m * p.k);
    ToF32(p.x1, p.act, p.m * p.k, x.data());
    const bool lut = DecodeInt4LutRuns(p);
    SplitK(workers, p, threads, y, [&](float* out, int64_t k0, int64_t k1) {
      if (lut) DecodeInt4LutF16(p, x.data(), out, k0, k1);
      else DecodeF16(p, x.data(), out, k0, k1);
    });
  } else {
    QuantParams q = MakeQuantParams(p);
    std::vector<float> x(p.m * p.k);
    ToF32(p.x1, p.act, p.m * p.k, x.data());
    std::fill(y, y + p.m * p.n, 0.0f);  // the portable kernels add into y
    if (p.transposed) {  // columns are contiguous along k: split the columns
      const MatmulFn cols = Selected().cols;
      ParallelFor(workers, p.n, 64, threads,
                  [&](int64_t c0, int64_t c1) { cols(p, q, x.data(), y, c0, c1); });
    } else {
      const MatmulFn rows = Selected().rows_nd;
      SplitK(workers, p, threads, y,
             [&](float* out, int64_t k0, int64_t k1) { rows(p, q, x.data(), out, k0, k1); });
    }
  }
  Epilogue(p, y, workers, threads);
}

void Dequantize(const Problem& p, const Workers& workers) {
  // ND: split W's rows; transposed: its columns (each a row of the storage and of the output)
  const int64_t work = p.k * (p.col_end - p.col_begin) * 8;
  const int64_t begin = p.transposed ? p.col_begin : 0, total = p.transposed ? p.col_end - p.col_begin : p.k;
  const int threads = Threads(workers, work);
  if (DequantizeAvx512Covers(p) && (p.act == Float::kF16 ? Detect() >= IsaLevel::kAvx512
                                                         : Detect() == IsaLevel::kAvx512Bf16)) {
    ParallelFor(workers, total, 16, threads,
                [&](int64_t b, int64_t e) { DequantizeAvx512(p, begin + b, begin + e); });
    return;
  }
  QuantParams q = MakeQuantParams(p);
  const RowsFn rows = Selected().dequant;
  ParallelFor(workers, total, 16, threads, [&](int64_t b, int64_t e) { rows(p, q, begin + b, begin + e); });
}

double AllCoresRate(const std::function<void(int64_t)>& loop, double units_per_iter, int64_t iters, double seconds) {
  const Workers w = OwnThreads();
  auto rate = [&](int64_t n) {
    const auto t0 = std::chrono::steady_clock::now();
    w.run(w.threads, [&](int) { loop(n); });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return std::pair{s, units_per_iter * static_cast<double>(n) * w.threads / s};
  };
  for (auto [s, r] = rate(iters); s < seconds / 4; std::tie(s, r) = rate(iters)) iters *= 2;
  double best = 0;
  for (int i = 0; i < 3; ++i) best = std::max(best, rate(iters).second);
  return best;
}

double PeakMacRate(double seconds, bool float_fma) {
#if defined(__x86_64__)
  float (*probe)(int64_t) = nullptr;
  double macs_per_instruction = 0;
  switch (Detect()) {
    case IsaLevel::kAvx512Bf16:
      if (!float_fma) {
        probe = ProbeBf16, macs_per_instruction = 32;
        break;
      }
      [[fallthrough]];
    case IsaLevel::kAvx512: probe = ProbeAvx512, macs_per_instruction = 16; break;
    case IsaLevel::kAvx2: probe = ProbeAvx2, macs_per_instruction = 8; break;
    default: return 0.0;
  }
  return AllCoresRate([&](int64_t iters) { volatile float keep = probe(iters); (void)keep; },
                      12.0 * macs_per_instruction, int64_t{1} << 16, seconds);
#else
  (void)seconds, (void)float_fma;
  return 0.0;
#endif
}

double ConvertRate(bool int4, int rows, double seconds) {
  if (Detect() != IsaLevel::kAvx512Bf16) return 0.0;
  // the kernel that runs at m = rows: int4 with few rows looks its weights up
  if (int4 && rows >= 1 && rows <= kInt4LutRows) return DecodeInt4LutRate(rows, seconds);
  return DecodeBf16ConvertRate(int4, rows, seconds);
}

std::string Isa() {
  switch (Detect()) {
    case IsaLevel::kAvx512Bf16: return "avx512bf16";
    case IsaLevel::kAvx512: return "avx512";
    case IsaLevel::kAvx2: return "avx2";
    default: return "portable";
  }
}

}  // namespace jax_wqmm::cpu
