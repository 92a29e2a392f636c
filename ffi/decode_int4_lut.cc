// The decode kernel for int4 weights (ND) and few rows of x on CPUs with AVX-512 BF16: no
// conversion per weight. An int4 code has 16 values, so for each column and group the
// contract's rounded weights (numerics.h: bf16(f32(q + offset) * scale) for bf16 activations,
// f16(f16(q + offset) * scale) for float16) form a table of 16, built once per group; a byte
// shuffle (vpshufb) looks sixteen codes up in one 128-bit lane's table, once for the low and
// once for the high bytes. The lookups need sixteen codes of one column in a lane, so 16 rows
// x 64 bytes of codes are transposed in registers first (lane L of vector c: byte column
// 16L + c of the 16 rows). bf16 weights are then pairs along k, as vdpbf16ps multiplies them
// with x; float16 ones are widened to float (exact) for float FMAs with x as float32. Each
// accumulator lane holds a partial sum of one column, added up at the end.
#include <algorithm>
#include <array>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

#include "avx512_common.h"
#include "decode_bf16.h"
#include "numerics.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace jax_wqmm::cpu {

bool DecodeInt4LutCovers(const Problem& p) {
  return (p.act == Float::kBF16 || p.act == Float::kF16) && !p.transposed && p.int4 &&
         p.n % 2 == 0 &&                      // rows start on bytes
         p.m <= kInt4LutRows &&
         // groups of 32 rows build tables for every column once per 32 rows: the conversion
         // kernel measured as fast at m = 1 and 7% faster at m = 4 (one thread, 4096 columns)
         (p.group_size == 0 || p.group_size >= kInt4LutMinGroup) &&
         p.group_size % kInt4LutChunk == 0;  // a chunk of rows never straddles two groups
}

#if defined(__x86_64__)
namespace {

#define WQMM_LUT __attribute__((target(WQMM_AVX512_TARGET ",avx512bf16")))

constexpr int64_t kStrip = 128;                  // columns of a strip: 64 bytes of each row
constexpr int64_t kChunk = kInt4LutChunk;        // rows transposed at a time
constexpr int64_t kPanel = 4 * kChunk;           // at most this many rows of W per panel
// A panel's rows (the next panel is prefetched into L2 meanwhile): 64 while a panel is at most
// 128 KiB of codes, fewer for wider W, down to one chunk. At n = 8192 32-row panels measured
// 8-18% faster than 64 (m = 1..4): the tables of a group (32 bytes per column) and the lane
// sums (8 bytes per column and row of x) share L2 with this panel and the next; at n = 4096
// 64 rows were 7% faster than 32.
int64_t PanelRows(int64_t n) { return std::clamp<int64_t>((int64_t{1} << 18) / n / kChunk * kChunk, kChunk, kPanel); }
constexpr int kTables = 32;                      // per strip: (c, h) = byte column c, nibble h

// A strip's tables: table t = 2c + h, lane L: column 32L + t of the strip (the high nibble
// of byte column 16L + c when h = 1), byte q: the low (lo) / high (hi) byte of code q's
// weight (bf16 or float16).
struct alignas(64) StripTables {
  __m512i lo[kTables], hi[kTables];
};

// 16 rows of 64 bytes at p (rows past `rows` read as zero codes, bytes past `bytes` too) as
// out[c]: lane L = byte column 16L + c, its 16 rows in order. Four rounds of unpacks (bytes,
// words, dwords, qwords), together a 16 x 16 byte transpose in each 128-bit lane.
WQMM_LUT WQMM_INLINE void Transpose(const uint8_t* p, int64_t stride, int64_t rows, int64_t bytes, __m512i out[16]) {
  const __mmask64 mask = bytes >= 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
  __m512i r[16], a[16], b[16], c[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_epi8(mask, p + i * stride) : _mm512_setzero_si512();
  for (int i = 0; i < 8; ++i) {  // a[2i], a[2i+1]: rows 2i, 2i+1 interleaved, byte columns 0-7 / 8-15
    a[2 * i] = _mm512_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
  }
  for (int j = 0; j < 4; ++j) {  // b[4j + q]: rows 4j..4j+3 of byte columns 4q..4q+3
    b[4 * j + 0] = _mm512_unpacklo_epi16(a[4 * j], a[4 * j + 2]);
    b[4 * j + 1] = _mm512_unpackhi_epi16(a[4 * j], a[4 * j + 2]);
    b[4 * j + 2] = _mm512_unpacklo_epi16(a[4 * j + 1], a[4 * j + 3]);
    b[4 * j + 3] = _mm512_unpackhi_epi16(a[4 * j + 1], a[4 * j + 3]);
  }
  for (int h = 0; h < 2; ++h) {  // c[8h + 2q], c[8h + 2q + 1]: rows 8h..8h+7 of columns 4q, 4q+1 / 4q+2, 4q+3
    for (int q = 0; q < 4; ++q) {
      c[8 * h + 2 * q] = _mm512_unpacklo_epi32(b[8 * h + q], b[8 * h + 4 + q]);
      c[8 * h + 2 * q + 1] = _mm512_unpackhi_epi32(b[8 * h + q], b[8 * h + 4 + q]);
    }
  }
  for (int q = 0; q < 8; ++q) {  // rows 0-7 with rows 8-15: columns 2q, 2q + 1
    out[2 * q] = _mm512_unpacklo_epi64(c[q], c[8 + q]);
    out[2 * q + 1] = _mm512_unpackhi_epi64(c[q], c[8 + q]);
  }
}

// The float16 (kF16) or bf16 values of a strip's columns [j, j + 128) (cols of them; the rest
// zero) as floats.
template <bool kF16>
WQMM_LUT WQMM_INLINE void StripFloats(const uint16_t* at, int64_t cols, float* out) {
  for (int v = 0; v < 8; ++v) {
    const __m256i words = _mm256_maskz_loadu_epi16(avx512::LaneMask(cols - 16 * v), at + 16 * v);
    _mm512_store_ps(out + 16 * v, kF16 ? _mm512_cvtph_ps(words)
                                       : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16)));
  }
}

// Two vectors of float values (a: words 0-15, b: 16-31) rounded to the activation dtype's
// words: float16 by vcvtps2ph, bf16 by vcvtne2ps2bf16 (nearest even both, numerics.h).
template <bool kF16>
WQMM_LUT WQMM_INLINE __m512i ActWords(__m512 a, __m512 b) {
  if constexpr (kF16) {
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtps_ph(a, kRound)), _mm512_cvtps_ph(b, kRound), 1);
  } else {
    return (__m512i)_mm512_cvtne2ps_pbh(b, a);
  }
}

// The tables of one group (scale and offset rows at `row`) for every strip. Table t's four
// columns (32L + t) are computed one per vector of the 16 codes (two's complement) by the
// contract's rule (numerics.h) and rounded to the activation dtype two columns at a time; a
// byte shuffle puts each 128-bit lane's low bytes in its low half and its high bytes in the
// high half, and a 64-bit permute of the two makes the lo table, another the hi table.
template <bool kF16, bool kOffset>
WQMM_LUT void BuildTables(const Problem& p, int64_t row, StripTables* tables) {
  const int64_t n = p.n, strips = (n + kStrip - 1) / kStrip;
  const auto* scale = static_cast<const uint16_t*>(p.scale);
  const auto* offset = static_cast<const uint16_t*>(p.offset);
  alignas(64) float sf[kStrip], of[kStrip];
  const __m512 codes = _mm512_set_ps(-1, -2, -3, -4, -5, -6, -7, -8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i bytes = _mm512_broadcast_i32x4(_mm_set_epi8(15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0));
  const __m512i lo_q = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0), hi_q = _mm512_set_epi64(15, 13, 11, 9, 7, 5, 3, 1);
  for (int64_t s = 0; s < strips; ++s) {
    const int64_t j = s * kStrip, cols = std::min(kStrip, n - j);
    if (p.per_tensor()) {
      std::fill(sf, sf + cols, ActToF32(kF16, scale[0]));
      std::fill(sf + cols, sf + kStrip, 0.0f);  // past n: zero weights
      std::fill(of, of + kStrip, kOffset ? ActToF32(kF16, offset[0]) : 0.0f);
    } else {
      StripFloats<kF16>(scale + row + j, cols, sf);
      if constexpr (kOffset) StripFloats<kF16>(offset + row + j, cols, of);
    }
    StripTables& tab = tables[s];
    for (int t = 0; t < kTables; ++t) {
      __m512 v[4];
      for (int l = 0; l < 4; ++l) {
        __m512 q = kOffset ? _mm512_add_ps(codes, _mm512_set1_ps(of[32 * l + t])) : codes;
        if constexpr (kF16 && kOffset) q = avx512::RoundF16(q);  // f16(q + o)
        v[l] = _mm512_mul_ps(q, _mm512_set1_ps(sf[32 * l + t]));
      }
      // lanes: column 0 codes 0-7, codes 8-15, column 1 codes 0-7, 8-15 (then columns 2, 3)
      const __m512i a = _mm512_shuffle_epi8(ActWords<kF16>(v[0], v[1]), bytes);
      const __m512i b = _mm512_shuffle_epi8(ActWords<kF16>(v[2], v[3]), bytes);
      _mm512_store_si512(tab.lo + t, _mm512_permutex2var_epi64(a, lo_q, b));
      _mm512_store_si512(tab.hi + t, _mm512_permutex2var_epi64(a, hi_q, b));
    }
  }
}

// The 128-bit blocks of u and v: (u0 + u1, u2 + u3, v0 + v1, v2 + v3).
WQMM_LUT WQMM_INLINE __m512 AddBlocks(__m512 u, __m512 v) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(u, v, 0x88), _mm512_shuffle_f32x4(u, v, 0xDD));
}

// MR rows of x by one strip over `rows` rows of W (a panel, inside a group) from w: the
// partial sums added into sums (per row, sums_stride apart: 16 vectors, lane 4L + e of vector
// c holding partial sums of column 32L + 2c + e % 2). x: bf16 (kF16 false) or float32 rows,
// xstride apart, from the panel's first row. kChunks: the panel's chunks when whole, else 0.
template <bool kF16, int MR, int kChunks>
WQMM_LUT WQMM_INLINE void StripOf(const uint8_t* w, int64_t stride, int64_t rows, int64_t bytes, const StripTables& tab,
                                  const void* x, int64_t xstride, float* sums, int64_t sums_stride) {
  alignas(64) __m512i tr[kPanel / kChunk][16];
  const int64_t chunks = kChunks ? kChunks : (rows + kChunk - 1) / kChunk;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    Transpose(w + ch * kChunk * stride, stride, std::min(kChunk, rows - ch * kChunk), bytes, tr[ch]);
  }
  // x's rows of each chunk, rows 0-7 then 8-15, in every 128-bit lane (bf16) or 256-bit half
  // (float32); zeros past `rows`
  __m512 xv[MR][kPanel / kChunk][2];
  for (int r = 0; r < MR; ++r) {
    for (int64_t ch = 0; ch < chunks; ++ch) {
      for (int half = 0; half < 2; ++half) {
        const int64_t at = r * xstride + ch * kChunk + 8 * half;
        const auto mask = static_cast<__mmask8>(avx512::LaneMask(rows - ch * kChunk - 8 * half));  // 8 lanes
        if constexpr (kF16) {
          xv[r][ch][half] = _mm512_broadcast_f32x8(_mm256_maskz_loadu_ps(mask, static_cast<const float*>(x) + at));
        } else {
          const __m128i v = _mm_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + at);
          xv[r][ch][half] = _mm512_castsi512_ps(_mm512_broadcast_i32x4(v));
        }
      }
    }
  }
  __mmask32 valid[2];  // the last chunk's words of rows within the panel
  const int64_t tail = rows - (chunks - 1) * kChunk;
  for (int half = 0; half < 2; ++half) {
    uint32_t lane = 0;
    for (int t = 0; t < 8; ++t) lane |= (8 * half + t < tail ? 1u : 0u) << t;
    valid[half] = lane * 0x01010101u;
  }
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int c = 0; c < 16; ++c) {
    // bf16: acc[r][h][0], lanes 4L + d: column 32L + 2c + h, pairs of rows 2d, 2d + 1 and 8 + 2d, 9 + 2d.
    // float16: acc[r][h][i], lanes 8l + t: column 32(2i + l) + 2c + h, rows t and 8 + t.
    __m512 acc[MR][2][kF16 ? 2 : 1];
    for (auto& a : acc) for (auto& b : a) for (auto& v : b) v = _mm512_setzero_ps();
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const __m512i z = tr[ch][c];
      const __m512i idx[2] = {_mm512_and_si512(z, nibble), _mm512_and_si512(_mm512_srli_epi16(z, 4), nibble)};
      for (int h = 0; h < 2; ++h) {
        const __m512i lo = _mm512_shuffle_epi8(tab.lo[2 * c + h], idx[h]);
        const __m512i hi = _mm512_shuffle_epi8(tab.hi[2 * c + h], idx[h]);
        __m512i w0 = _mm512_unpacklo_epi8(lo, hi), w1 = _mm512_unpackhi_epi8(lo, hi);  // rows 0-7 / 8-15
        if (!kChunks && ch == chunks - 1 && tail < kChunk) {  // rows past the panel: zero weights (never inf * 0)
          w0 = _mm512_maskz_mov_epi16(valid[0], w0);
          w1 = _mm512_maskz_mov_epi16(valid[1], w1);
        }
        if constexpr (kF16) {  // each 256-bit half: two columns' 8 rows, widened (exactly) to floats
          const __m512 f[2][2] = {
              {_mm512_cvtph_ps(_mm512_castsi512_si256(w0)), _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w0, 1))},
              {_mm512_cvtph_ps(_mm512_castsi512_si256(w1)), _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w1, 1))}};
          for (int r = 0; r < MR; ++r) {
            for (int i = 0; i < 2; ++i) {
              acc[r][h][i] = _mm512_fmadd_ps(xv[r][ch][0], f[0][i], acc[r][h][i]);
              acc[r][h][i] = _mm512_fmadd_ps(xv[r][ch][1], f[1][i], acc[r][h][i]);
            }
          }
        } else {
          for (int r = 0; r < MR; ++r) {
            acc[r][h][0] = _mm512_dpbf16_ps(acc[r][h][0], (__m512bh)xv[r][ch][0], (__m512bh)w0);
            acc[r][h][0] = _mm512_dpbf16_ps(acc[r][h][0], (__m512bh)xv[r][ch][1], (__m512bh)w1);
          }
        }
      }
    }
    for (int r = 0; r < MR; ++r) {
      __m512 a = acc[r][0][0], b = acc[r][1][0];  // columns 2c / 2c + 1 of lane L: four partial sums in lane L
      if constexpr (kF16) {  // 128-bit blocks (column, rows 0-3 / 4-7) to lane L of the column, added
        a = AddBlocks(acc[r][0][0], acc[r][0][1]);
        b = AddBlocks(acc[r][1][0], acc[r][1][1]);
      }
      float* at = sums + r * sums_stride + 16 * c;
      _mm512_store_ps(at, _mm512_add_ps(_mm512_load_ps(at),
                                        _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))));
    }
  }
}

// StripOf with the chunk loop unrolled for whole panels (of 1, 2 or 4 chunks).
template <bool kF16, int MR>
WQMM_LUT void Strip(const uint8_t* w, int64_t stride, int64_t rows, int64_t bytes, const StripTables& tab,
                    const void* x, int64_t xstride, float* sums, int64_t sums_stride) {
  switch (rows) {
    case 4 * kChunk: return StripOf<kF16, MR, 4>(w, stride, rows, bytes, tab, x, xstride, sums, sums_stride);
    case 2 * kChunk: return StripOf<kF16, MR, 2>(w, stride, rows, bytes, tab, x, xstride, sums, sums_stride);
    case kChunk: return StripOf<kF16, MR, 1>(w, stride, rows, bytes, tab, x, xstride, sums, sums_stride);
    default: return StripOf<kF16, MR, 0>(w, stride, rows, bytes, tab, x, xstride, sums, sums_stride);
  }
}

// Strip for m rows of x (1 to kInt4LutRows).
using StripFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, const StripTables&, const void*, int64_t, float*,
                         int64_t);
template <bool kF16, size_t... I>
constexpr std::array<StripFn, sizeof...(I)> Strips(std::index_sequence<I...>) { return {Strip<kF16, I + 1>...}; }
template <bool kF16>
StripFn StripFor(int64_t m) {
  static constexpr auto kStrips = Strips<kF16>(std::make_index_sequence<kInt4LutRows>());
  return kStrips[m - 1];
}

// A row's lane sums of one whole strip (16 vectors, Strip's lane order) into its 128 columns
// of y: lanes 4L + e and 4L + e + 2 of vector c add up to column 32L + 2c + e. The two lanes
// of each column pair are added in place, the pairs (as doubles) of vectors c and c + 1
// interleaved, then 128-bit blocks moved to their column order.
WQMM_LUT WQMM_INLINE void StripColumns(const float* sums, float* y) {
  __m512d pairs[8];  // pairs[c / 2] lane L: columns 32L + 2c .. 32L + 2c + 3
  for (int c = 0; c < 16; c += 2) {
    const __m512 a = _mm512_load_ps(sums + 16 * c), b = _mm512_load_ps(sums + 16 * c + 16);
    const __m512d ap = _mm512_castps_pd(_mm512_add_ps(a, _mm512_permute_ps(a, 0x4E)));
    const __m512d bp = _mm512_castps_pd(_mm512_add_ps(b, _mm512_permute_ps(b, 0x4E)));
    pairs[c / 2] = _mm512_unpacklo_pd(ap, bp);
  }
  for (int half = 0; half < 2; ++half) {  // columns 32L + 16 * half .. + 16: pairs[4 * half ..] lane L
    const __m512d* q = pairs + 4 * half;
    const __m512d t0 = _mm512_shuffle_f64x2(q[0], q[1], 0x44), t1 = _mm512_shuffle_f64x2(q[0], q[1], 0xEE);
    const __m512d t2 = _mm512_shuffle_f64x2(q[2], q[3], 0x44), t3 = _mm512_shuffle_f64x2(q[2], q[3], 0xEE);
    // t0 = (q0 L0, q0 L1, q1 L0, q1 L1), t1 = the same of L2, L3; t2, t3 those of q2, q3
    const __m512d l0 = _mm512_shuffle_f64x2(t0, t2, 0x88), l1 = _mm512_shuffle_f64x2(t0, t2, 0xDD);
    const __m512d l2 = _mm512_shuffle_f64x2(t1, t3, 0x88), l3 = _mm512_shuffle_f64x2(t1, t3, 0xDD);
    const __m512d lanes[4] = {l0, l1, l2, l3};
    for (int l = 0; l < 4; ++l) _mm512_storeu_pd(reinterpret_cast<double*>(y + 32 * l + 16 * half), lanes[l]);
  }
}

// `rows` rows of W from w (whole strips: stride a multiple of 64 bytes) in strip-major order:
// strip s at copy + s * copy_stride, its rows 64 bytes apart; each row read in memory order.
// Rows read side by side from a power-of-two stride ran 20% (n = 4096) to 70% (n = 8192)
// slower than from a stride a line longer (one thread, m = 1, weights in L3); the copy took
// that back at n = 4096 and 8192 but cost 5-10% at other strides, which therefore read W itself.
WQMM_LUT WQMM_INLINE void CopyRows(const uint8_t* w, int64_t stride, int64_t rows, uint8_t* copy, int64_t copy_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t s = 0; s < stride / 64; ++s) {
      _mm512_store_si512(copy + s * copy_stride + 64 * r, _mm512_loadu_si512(w + r * stride + 64 * s));
    }
  }
}

// x: bf16 rows of xstride elements, or float32 (kF16).
template <bool kF16, bool kOffset>
WQMM_LUT void Decode(const Problem& p, const void* x, int64_t xstride, float* y, int64_t k0, int64_t k1) {
  const int64_t m = p.m, n = p.n, stride = n / 2, strips = (n + kStrip - 1) / kStrip;
  struct alignas(64) Vector { float lanes[16]; };
  const std::unique_ptr<Vector[]> sum_buf(new Vector[m * strips * 16]);  // per row and strip: 16 vectors (Strip)
  float* sums = sum_buf[0].lanes;
  std::fill(sums, sums + m * strips * 256, 0.0f);
  const std::unique_ptr<StripTables[]> tables(new StripTables[strips]);  // each group writes them all
  const int64_t span = p.group_size ? p.group_size : k1 - k0, panel = PanelRows(n);
  // Rows of W a multiple of 2 KiB apart share at most two of L1's 64 sets: there each panel is
  // first copied strip-major (from L2, where the previous panel prefetched it), its strips a
  // line apart more than their rows take, so that the copy's stores spread over the sets too.
  const bool copied = stride % 2048 == 0;
  const int64_t copy_stride = 64 * (panel + 1);
  struct alignas(64) Line { uint8_t bytes[64]; };
  const std::unique_ptr<Line[]> copy(copied ? new Line[strips * (panel + 1)] : nullptr);
  const int64_t row_stride = copied ? 64 : stride, strip_stride = copied ? copy_stride : 64;  // where the rows are
  const StripFn strip = StripFor<kF16>(m);
  for (int64_t g0 = k0; g0 < k1; g0 += span) {
    const int64_t g1 = std::min(k1, g0 + span);
    BuildTables<kF16, kOffset>(p, p.group_size ? g0 / p.group_size * n : 0, tables.get());
    for (int64_t r0 = g0; r0 < g1; r0 += panel) {
      const int64_t rows = std::min(panel, g1 - r0);
      if (copied) CopyRows(p.x2 + r0 * stride, stride, rows, copy[0].bytes, copy_stride);
      const uint8_t* w0 = copied ? copy[0].bytes : p.x2 + r0 * stride;
      const avx512::NextPanel next(p.x2 + (r0 + rows) * stride, std::min(panel, p.k - r0 - rows) * stride, strips);
      const void* xr = static_cast<const char*>(x) + r0 * (kF16 ? 4 : 2);  // the panel's first row
      for (int64_t s = 0; s < strips; ++s) {
        next.Prefetch(s);
        const uint8_t* w = w0 + s * strip_stride;
        const int64_t bytes = std::min<int64_t>(64, stride - 64 * s);
        strip(w, row_stride, rows, bytes, tables[s], xr, xstride, sums + 256 * s, strips * 256);
      }
    }
  }
  for (int64_t r = 0; r < m; ++r) {
    const float* row = sums + r * strips * 256;
    for (int64_t s = 0; s < n / kStrip; ++s) StripColumns(row + 256 * s, y + r * n + kStrip * s);
    for (int64_t col = n / kStrip * kStrip; col < n; ++col) {  // the ragged last strip
      const int64_t cc = col % kStrip, l = cc / 32, c = cc % 32 / 2, h = cc % 2;
      const float* v = row + 256 * (col / kStrip) + 16 * c + 4 * l;
      y[r * n + col] = v[h] + v[2 + h];
    }
  }
}

// The inner loop on one panel of one strip in L1 (rows of 64 bytes side by side), for
// DecodeInt4LutRate. Returns a sink so the work stays.
template <int MR>
WQMM_LUT uint32_t StripLoop(int64_t iters) {
  alignas(64) static const uint8_t codes[kPanel * 64] = {};
  alignas(64) static const uint16_t x[MR * kPanel] = {};
  static const StripTables tables{};
  alignas(64) float sums[MR * 256] = {};
  for (int64_t i = 0; i < iters; ++i) {
    const uint8_t* w = codes;
    asm volatile("" : "+r"(w));  // opaque: read and transposed anew each time
    StripOf<false, MR, kPanel / kChunk>(w, 64, kPanel, 64, tables, x, kPanel, sums, 256);
  }
  uint32_t sink = 0;
  for (float v : sums) sink ^= Bits(v);
  return sink;
}

using StripLoopFn = uint32_t (*)(int64_t);
template <size_t... I>
constexpr std::array<StripLoopFn, sizeof...(I)> StripLoops(std::index_sequence<I...>) { return {StripLoop<I + 1>...}; }

}  // namespace

double DecodeInt4LutRate(int rows, double seconds) {
  static constexpr auto kLoops = StripLoops(std::make_index_sequence<kInt4LutRows>());
  if (rows < 1 || rows > kInt4LutRows) {
    throw std::invalid_argument("rows=" + std::to_string(rows) + ": must be 1 to " + std::to_string(kInt4LutRows));
  }
  uint32_t (*loop)(int64_t) = kLoops[rows - 1];
  return AllCoresRate([&](int64_t iters) { volatile uint32_t keep = loop(iters); (void)keep; },
                      static_cast<double>(kPanel * kStrip), int64_t{1} << 10, seconds);
}

void DecodeInt4Lut(const Problem& p, const PairWord* xp, float* y, int64_t k0, int64_t k1) {
  const int64_t xstride = 2 * ((p.k + 1) / 2);  // bf16 per row of x's pairs
  if (p.offset) Decode<false, true>(p, xp, xstride, y, k0, k1);
  else Decode<false, false>(p, xp, xstride, y, k0, k1);
}

void DecodeInt4LutF16(const Problem& p, const float* x, float* y, int64_t k0, int64_t k1) {
  if (p.offset) Decode<true, true>(p, x, p.k, y, k0, k1);
  else Decode<true, false>(p, x, p.k, y, k0, k1);
}

#else

void DecodeInt4Lut(const Problem&, const PairWord*, float*, int64_t, int64_t) {}
void DecodeInt4LutF16(const Problem&, const float*, float*, int64_t, int64_t) {}
double DecodeInt4LutRate(int, double) { return 0.0; }

#endif

}  // namespace jax_wqmm::cpu
