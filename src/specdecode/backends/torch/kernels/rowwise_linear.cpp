// A CPU matrix product for the few rows of a decoding or verification forward, in which every
// output is summed in one fixed order whatever the number of rows: y[r, n] = x[r, :] . w[n, :].
//
// Why: library GEMMs pick their blocking of the reduction from the row count, so a token's logits
// get other bits when it is verified among drafts than when it is decoded alone (see
// invariance.py). Here each output is the same sequence of fused multiply-adds over k, 16 lanes at
// a time, then the same horizontal sum; the row count only decides how rows are grouped, never
// the arithmetic of a row. Threads split the outputs, not the reduction.
//
// It is also what makes small-batch forwards cheap on a CPU without native bfloat16 arithmetic:
// weights stay bfloat16 in memory (half the bytes of float32) and are widened in registers, and
// all rows of a forward share one pass over the weights, which decoding is bound by.
//
// On a CPU with AVX-512 BF16, bfloat16 rows times bfloat16 weights take its dot-product
// instruction instead: 32 products per instruction and no widening, which halves the arithmetic
// of a verification forward's many rows. Its own fixed order (pairs of products, then 16 lanes)
// is again the same for every row count.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int kLanes = 16;     // floats per AVX-512 register
constexpr int kOutputs = 4;    // weight rows (outputs) per tile
constexpr int kMaxGroup = 6;   // input rows per tile: 6 x 4 accumulators + 4 weights + 1 input

inline __m512 load_weight(const c10::BFloat16* w, __mmask16 mask) {
  // bfloat16 is the top half of a float32: widen to 32 bits and shift into place.
  __m256i half = _mm256_maskz_loadu_epi16(mask, w);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

inline __m512 load_weight(const float* w, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, w); }

inline __m512 load_weight(const int8_t* w, __mmask16 mask) {
  // int8 weights (of a quantized draft model): a quarter of float32's bytes; the caller scales.
  __m128i bytes = _mm_maskz_loadu_epi8(mask, w);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}

// Outputs [n0, n0 + Outputs) of rows [0, Rows) of x (float32, row stride k).
template <int Rows, int Outputs, typename W>
inline void tile(const float* x, const W* w, int64_t k, int64_t n0, float* out,
                 int64_t out_stride) {
  __m512 acc[Rows][Outputs];
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < Outputs; ++j) acc[r][j] = _mm512_setzero_ps();
  const W* wt = w + n0 * k;
  for (int64_t i = 0; i < k; i += kLanes) {
    // Full registers but for a ragged end (k not a multiple of 16), where lanes read as zero.
    __mmask16 mask = k - i >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1);
    __m512 wv[Outputs];
#pragma GCC unroll 8
    for (int j = 0; j < Outputs; ++j) wv[j] = load_weight(wt + j * k + i, mask);
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * k + i);
#pragma GCC unroll 8
      for (int j = 0; j < Outputs; ++j) acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < Outputs; ++j) out[r * out_stride + n0 + j] = _mm512_reduce_add_ps(acc[r][j]);
}

#ifdef __AVX512BF16__
// The same tile for bfloat16 rows and weights: 32 products per step, summed in pairs into 16
// float32 lanes by the dot-product instruction.
template <int Rows, int Outputs>
inline void tile(const c10::BFloat16* x, const c10::BFloat16* w, int64_t k, int64_t n0,
                 float* out, int64_t out_stride) {
  constexpr int kPairLanes = 2 * kLanes;
  __m512 acc[Rows][Outputs];
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < Outputs; ++j) acc[r][j] = _mm512_setzero_ps();
  const c10::BFloat16* wt = w + n0 * k;
  for (int64_t i = 0; i < k; i += kPairLanes) {
    __mmask32 mask = k - i >= kPairLanes ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (k - i)) - 1);
    __m512bh wv[Outputs];
#pragma GCC unroll 8
    for (int j = 0; j < Outputs; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, wt + j * k + i);
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * k + i);
#pragma GCC unroll 8
      for (int j = 0; j < Outputs; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, wv[j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < Outputs; ++j) out[r * out_stride + n0 + j] = _mm512_reduce_add_ps(acc[r][j]);
}
#endif

template <int Outputs, typename X, typename W>
inline void tile_rows(const X* x, const W* w, int64_t rows, int64_t k, int64_t n0,
                      float* out, int64_t n) {
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxGroup) {
    const X* xr = x + r0 * k;
    float* o = out + r0 * n;
    switch (rows - r0 < kMaxGroup ? rows - r0 : kMaxGroup) {
      case 1: tile<1, Outputs>(xr, w, k, n0, o, n); break;
      case 2: tile<2, Outputs>(xr, w, k, n0, o, n); break;
      case 3: tile<3, Outputs>(xr, w, k, n0, o, n); break;
      case 4: tile<4, Outputs>(xr, w, k, n0, o, n); break;
      case 5: tile<5, Outputs>(xr, w, k, n0, o, n); break;
      default: tile<kMaxGroup, Outputs>(xr, w, k, n0, o, n); break;
    }
  }
}

template <typename X, typename W>
void rows_times_weights(const X* x, const W* w, int64_t rows, int64_t k, int64_t n,
                        float* out) {
  // Few rows: wider tiles, so that enough independent sums are in flight to hide the latency of
  // a fused multiply-add. The tile shape never changes an output's arithmetic.
  if (rows <= 3) {
    constexpr int kWide = 8;
    int64_t tiles = n / kWide;
    at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) tile_rows<kWide>(x, w, rows, k, t * kWide, out, n);
    });
    for (int64_t n0 = tiles * kWide; n0 < n; ++n0) tile_rows<1>(x, w, rows, k, n0, out, n);
    return;
  }
  int64_t tiles = n / kOutputs;
  // Each thread owns whole outputs; a tile's weights are read from memory once and reused, from
  // L1, by every group of rows.
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tile_rows<kOutputs>(x, w, rows, k, t * kOutputs, out, n);
  });
  // Outputs left over when n is not a multiple of the tile: one at a time, same arithmetic.
  for (int64_t n0 = tiles * kOutputs; n0 < n; ++n0) tile_rows<1>(x, w, rows, k, n0, out, n);
}

// x: [rows, k] float32 (or bfloat16 with bfloat16 weights, where the CPU has AVX-512 BF16),
// contiguous; weight: [n, k] bfloat16, float32 or int8, contiguous.
// Returns [rows, n] float32 (bias, and an int8 weight's scales, applied by the caller).
at::Tensor rowwise_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "rowwise_linear: 2-D inputs expected");
  TORCH_CHECK(x.size(1) == weight.size(1), "rowwise_linear: inner dimensions differ");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rowwise_linear: contiguous inputs");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rowwise_linear: CPU tensors");
  int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  at::Tensor out = at::empty({rows, n}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kBFloat16) {
#ifdef __AVX512BF16__
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16,
                "rowwise_linear: bfloat16 rows need bfloat16 weights");
    rows_times_weights(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), rows, k,
                       n, out.data_ptr<float>());
    return out;
#else
    TORCH_CHECK(false, "rowwise_linear: bfloat16 rows need a build with AVX-512 BF16");
#endif
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat, "rowwise_linear: x must be float32 or bfloat16");
  if (weight.scalar_type() == at::kBFloat16) {
    rows_times_weights(x.data_ptr<float>(), weight.data_ptr<c10::BFloat16>(), rows, k, n,
                       out.data_ptr<float>());
  } else if (weight.scalar_type() == at::kChar) {
    rows_times_weights(x.data_ptr<float>(), weight.data_ptr<int8_t>(), rows, k, n,
                       out.data_ptr<float>());
  } else {
    TORCH_CHECK(weight.scalar_type() == at::kFloat,
                "rowwise_linear: bfloat16, float32 or int8 weights");
    rows_times_weights(x.data_ptr<float>(), weight.data_ptr<float>(), rows, k, n,
                       out.data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(specdecode_kernels, m) { m.def("rowwise_linear(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(specdecode_kernels, CPU, m) { m.impl("rowwise_linear", &rowwise_linear); }
