// The decode kernels for bf16 activations on CPUs with AVX-512 BF16. DecodeBf16: y = x1 @ W
// over a k slice, W in ND storage (int8, or packed int4 with an even n). The integer codes are
// dequantized as the Ascend kernel rounds them (numerics.h: float32 math, one round to bf16,
// vcvtne2ps2bf16) straight into bf16 pairs along k, and so are the bf16 activations, so one
// vdpbf16ps does two k of sixteen columns with float32 accumulation.
#ifndef JAX_WQMM_DECODE_BF16_H_
#define JAX_WQMM_DECODE_BF16_H_

#include <cstdint>
#include <vector>

#include "cpu_kernel.h"

namespace jax_wqmm::cpu {

// Whether DecodeBf16 takes p, and is the faster kernel for it (on a CPU with AVX-512 BF16:
// the caller checks the ISA).
bool DecodeBf16Covers(const Problem& p);

// Two bf16 of x1 side by side, read as one 32-bit word (may alias x1's 16-bit elements).
using PairWord = uint32_t __attribute__((may_alias));

// x1 (m, k) bf16 as pairs along k, (m, ceil(k / 2)) words: x1 itself for an even k (no copy),
// else a copy with each row padded with a zero.
class ActivationPairs {
 public:
  explicit ActivationPairs(const Problem& p);
  ActivationPairs(const ActivationPairs&) = delete;  // data_ may point into copy_
  ActivationPairs& operator=(const ActivationPairs&) = delete;
  const PairWord* data() const { return data_; }

 private:
  std::vector<uint32_t> copy_;
  const PairWord* data_;
};

// y (m, n), overwritten = x1[:, k0:k1] @ ((x2 + offset) * scale)[k0:k1, :], in float32.
// k0 is a multiple of the group size (per-group) or of 16; xp comes from ActivationPairs.
void DecodeBf16(const Problem& p, const PairWord* xp, float* y, int64_t k0, int64_t k1);

// From this many rows of x on, DecodeBf16Blocked is the faster (measured on a 2-core Zen 4 at
// k = n = 4096: 5-10% at m = 64 and 128, the same at 32).
constexpr int64_t kDecodeBf16BlockedRows = 64;

// y[:, c0:c1] = x1 @ ((x2 + offset) * scale)[:, c0:c1] over all of k, in float32 (the rest of
// y untouched; c0 a multiple of 64), blocked as a GEMM: for many rows of x.
void DecodeBf16Blocked(const Problem& p, const PairWord* xp, float* y, int64_t c0, int64_t c1);

// Codes (int8 without an offset, or int4) converted to the rounded bf16 pairs per second, on
// every core, by DecodeBf16's own conversion loop on codes in L1 (no memory traffic): the floor
// of that conversion, measured for about `seconds`; 0 off x86. With rows (1, 2, 4, 8 or 16)
// each converted pair also feeds that many rows of x's dot products in registers: the floor of
// converting and multiplying (where the two compete for the vector units, as on Zen 4, about
// the sum of the two alone). std::invalid_argument for other rows.
double DecodeBf16ConvertRate(bool int4, int rows, double seconds);

// int4 ND with at most kInt4LutRows rows of bf16 or float16 x: the weights are looked up in
// per-group tables of each column's 16 rounded values instead of converted one by one
// (decode_int4_lut.cc; on a CPU with AVX-512 BF16: the caller checks the ISA). Groups must be
// multiples of kInt4LutChunk rows (the operator asks for multiples of 32) and at least
// kInt4LutMinGroup rows (a table per column and group is then worth its build). Up to 7 rows
// (from memory, both cores of a Zen 4: 3-17% faster than the built pairs at m = 5..7; at
// m = 8, where the dot products dominate, 0-7% slower).
constexpr int64_t kInt4LutRows = 7, kInt4LutChunk = 16, kInt4LutMinGroup = 64;
bool DecodeInt4LutCovers(const Problem& p);
// As DecodeBf16 (the same y, k0, xp) for bf16 x.
void DecodeInt4Lut(const Problem& p, const PairWord* xp, float* y, int64_t k0, int64_t k1);
// As DecodeF16 (the same y, k0; x as float32 (m, k)) for float16 x.
void DecodeInt4LutF16(const Problem& p, const float* x, float* y, int64_t k0, int64_t k1);
// Weights per second of DecodeInt4Lut's inner loop with `rows` rows of x (1 to kInt4LutRows;
// std::invalid_argument otherwise) on every core: whole panels of one strip, codes, tables
// and sums in L1 (no memory traffic, no tables built). 0 off x86.
double DecodeInt4LutRate(int rows, double seconds);

// Transposed storage (x2 as (n, k); int4 with an even k; groups of a multiple of 32):
// decode_bf16_t.cc.
bool DecodeBf16TCovers(const Problem& p);

// x1 (m, k) bf16 with each row padded with zeros to a multiple of 32.
std::vector<uint16_t> PadActivations(const Problem& p);

// y[:, c0:c1] = x1 @ ((x2 + offset) * scale)[:, c0:c1], in float32 (the rest of y untouched);
// x comes from PadActivations.
void DecodeBf16T(const Problem& p, const uint16_t* x, float* y, int64_t c0, int64_t c1);

}  // namespace jax_wqmm::cpu

#endif  // JAX_WQMM_DECODE_BF16_H_
