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
// all rows of a forward share one pass over the weights, which decoding is bound by. That pass
// runs ahead of the arithmetic (software prefetch into L2), so that a verification forward's
// rows cost their arithmetic, not arithmetic plus a wait for memory.
//
// On a CPU with AVX-512 BF16, bfloat16 rows times bfloat16 weights take its dot-product
// instruction instead: 32 products per instruction and no widening, which halves the arithmetic
// of a verification forward's many rows. Its own fixed order (pairs of products, then 16 lanes)
// is again the same for every row count.
//
// A quantized draft model's int8 weights, on a CPU with AVX-512 VNNI, meet int8 rows instead
// (rowwise_linear_int8): each row is quantized with its own scale, and the integer dot-product
// instruction sums 64 byte products per step with no widening at all. Drafts are rounded twice
// then, which only changes which tokens are proposed, never what the target accepts.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kLanes = 16;     // floats per AVX-512 register
// A tile: up to 5 input rows by 5 weight rows (outputs), 25 accumulators + 5 weights + 1 input of
// the 32 AVX-512 registers. Against 6 rows by 4 outputs, the 1.5B's products for the 16-17 rows
// of a verification forward take about a quarter less time and 32 rows the same
// (benchmarks/kernel_ab.py; README, "What limits these numbers"). The shape never changes what
// an output sums, or in which order.
constexpr int kOutputs = 5;
constexpr int kMaxGroup = 5;
static_assert(kMaxGroup == 5, "tile_rows dispatches groups of 1 to 5 rows");

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

// This group's share of the next tile's weights (null: none) at column i, fetched into L2: one
// fetch per weight row, the groups taking them in turn (`owner` carries the turn from step to
// step; see tile_rows).
template <int Outputs, typename W>
inline void fetch_share(const W* ahead, int64_t k, int64_t i, int group, int groups, int& owner) {
  if (ahead == nullptr) return;
#pragma GCC unroll 8
  for (int j = 0; j < Outputs; ++j) {
    if (owner == group) _mm_prefetch(reinterpret_cast<const char*>(ahead + j * k + i), _MM_HINT_T1);
    owner = owner + 1 == groups ? 0 : owner + 1;
  }
}

// Outputs [n0, n0 + Outputs) of rows [0, Rows) of x (float32, row stride k).
template <int Rows, int Outputs, typename W>
inline void tile(const float* x, const W* w, int64_t k, int64_t n0, float* out,
                 int64_t out_stride, const W* ahead, int group, int groups) {
  __m512 acc[Rows][Outputs];
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < Outputs; ++j) acc[r][j] = _mm512_setzero_ps();
  const W* wt = w + n0 * k;
  int owner = 0;  // which group of rows issues the next fetch (see tile_rows)
  for (int64_t i = 0; i < k; i += kLanes) {
    // Full registers but for a ragged end (k not a multiple of 16), where lanes read as zero.
    __mmask16 mask = k - i >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1);
    __m512 wv[Outputs];
#pragma GCC unroll 8
    for (int j = 0; j < Outputs; ++j) wv[j] = load_weight(wt + j * k + i, mask);
    fetch_share<Outputs>(ahead, k, i, group, groups, owner);
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
                 float* out, int64_t out_stride, const c10::BFloat16* ahead, int group,
                 int groups) {
  constexpr int kPairLanes = 2 * kLanes;
  __m512 acc[Rows][Outputs];
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < Outputs; ++j) acc[r][j] = _mm512_setzero_ps();
  const c10::BFloat16* wt = w + n0 * k;
  int owner = 0;  // which group of rows issues the next fetch (see tile_rows)
  for (int64_t i = 0; i < k; i += kPairLanes) {
    __mmask32 mask = k - i >= kPairLanes ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (k - i)) - 1);
    __m512bh wv[Outputs];
#pragma GCC unroll 8
    for (int j = 0; j < Outputs; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, wt + j * k + i);
    fetch_share<Outputs>(ahead, k, i, group, groups, owner);
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

#ifdef __AVX512VNNI__
// The tile for unsigned byte rows and int8 weights: 64 byte products per step, summed in fours
// into 16 int32 lanes (exact: no rounding, so any order gives the same sum).
template <int Rows, int Outputs>
inline void tile(const uint8_t* x, const int8_t* w, int64_t k, int64_t n0, int32_t* out,
                 int64_t out_stride, const int8_t* ahead, int group, int groups) {
  constexpr int kByteLanes = 4 * kLanes;
  __m512i acc[Rows][Outputs];
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < Outputs; ++j) acc[r][j] = _mm512_setzero_si512();
  const int8_t* wt = w + n0 * k;
  int owner = 0;  // which group of rows issues the next fetch (see tile_rows)
  for (int64_t i = 0; i < k; i += kByteLanes) {
    // Masked-off bytes read as zero in the weights, so they add nothing.
    __mmask64 mask = k - i >= kByteLanes ? ~__mmask64(0) : (__mmask64(1) << (k - i)) - 1;
    __m512i wv[Outputs];
#pragma GCC unroll 8
    for (int j = 0; j < Outputs; ++j) wv[j] = _mm512_maskz_loadu_epi8(mask, wt + j * k + i);
    fetch_share<Outputs>(ahead, k, i, group, groups, owner);
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      __m512i xv = _mm512_maskz_loadu_epi8(mask, x + r * k + i);
#pragma GCC unroll 8
      for (int j = 0; j < Outputs; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], xv, wv[j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < Outputs; ++j) out[r * out_stride + n0 + j] = _mm512_reduce_add_epi32(acc[r][j]);
}
#endif

template <int Outputs, typename X, typename W, typename O>
inline void tile_rows(const X* x, const W* w, int64_t rows, int64_t k, int64_t n0, O* out,
                      int64_t n) {
  const int groups = static_cast<int>((rows + kMaxGroup - 1) / kMaxGroup);
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxGroup) {
    const X* xr = x + r0 * k;
    O* o = out + r0 * n;
    // While a tile computes, the next tile's weights are fetched into L2. There is one fetch per
    // weight row per step of k, and the groups of rows take them in turn, so that memory stays
    // busy through all the groups. Without it, the weights' stream from memory and the
    // arithmetic take turns; with only the first group fetching, memory idles while the later
    // groups compute. L2, not L1: in L1 the lines would evict the tile in use, which later
    // groups read again. (A step of 64 bytes fetches each line once; the float-row tiles step
    // 16 values, so with bfloat16 or int8 weights a line is asked for two or four times, and
    // the earliest group to ask fetches it: harmless, if less even.) GCC 12 at -O3 drops a
    // helper whose only effect is a prefetch; fetch_share also advances `owner`, which keeps it
    // (tests/test_torch_backend.py checks the built library still prefetches).
    const W* ahead = n0 + 2 * Outputs <= n ? w + (n0 + Outputs) * k : nullptr;
    const int group = static_cast<int>(r0 / kMaxGroup);
    switch (rows - r0 < kMaxGroup ? rows - r0 : kMaxGroup) {
      case 1: tile<1, Outputs>(xr, w, k, n0, o, n, ahead, group, groups); break;
      case 2: tile<2, Outputs>(xr, w, k, n0, o, n, ahead, group, groups); break;
      case 3: tile<3, Outputs>(xr, w, k, n0, o, n, ahead, group, groups); break;
      case 4: tile<4, Outputs>(xr, w, k, n0, o, n, ahead, group, groups); break;
      default: tile<kMaxGroup, Outputs>(xr, w, k, n0, o, n, ahead, group, groups); break;
    }
  }
}

template <typename X, typename W, typename O>
void rows_times_weights(const X* x, const W* w, int64_t rows, int64_t k, int64_t n, O* out) {
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
  // L1 or (for long rows) L2, by every group of rows.
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

// x: [rows, k] float32, contiguous; weight: [n, k] int8 with weight_sums [n] int32 (each row's
// sum) and weight_scales [n] float32. Returns [rows, n] float32: x @ (weight * scales).T, with
// each row of x rounded to int8 on its own scale (max |x| / 127) first.
at::Tensor rowwise_linear_int8(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& weight_sums, const at::Tensor& weight_scales) {
#ifdef __AVX512VNNI__
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "rowwise_linear_int8: 2-D inputs expected");
  TORCH_CHECK(x.size(1) == weight.size(1), "rowwise_linear_int8: inner dimensions differ");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kChar,
              "rowwise_linear_int8: float32 rows and int8 weights");
  TORCH_CHECK(weight_sums.scalar_type() == at::kInt && weight_scales.scalar_type() == at::kFloat,
              "rowwise_linear_int8: int32 weight sums and float32 weight scales");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight_sums.is_contiguous() &&
                  weight_scales.is_contiguous(),
              "rowwise_linear_int8: contiguous inputs");
  int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(weight_sums.numel() == n && weight_scales.numel() == n,
              "rowwise_linear_int8: one sum and one scale per weight row");
  // The instruction multiplies unsigned bytes by signed ones: rows are stored as q + 128, and
  // 128 times each weight row's sum is taken off afterwards.
  std::vector<uint8_t> shifted(rows * k);
  std::vector<float> row_scales(rows);
  const float* xs = x.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xs + r * k;
    float largest = 0.0f;
    for (int64_t i = 0; i < k; ++i) largest = std::max(largest, std::fabs(xr[i]));
    float scale = largest > 0.0f ? largest / 127.0f : 1.0f;
    row_scales[r] = scale;
    float inverse = 1.0f / scale;
    uint8_t* q = shifted.data() + r * k;
    for (int64_t i = 0; i < k; ++i) {
      float level = std::nearbyint(xr[i] * inverse);
      level = std::min(127.0f, std::max(-127.0f, level));
      q[i] = static_cast<uint8_t>(static_cast<int32_t>(level) + 128);
    }
  }
  at::Tensor sums = at::empty({rows, n}, x.options().dtype(at::kInt));
  rows_times_weights(shifted.data(), weight.data_ptr<int8_t>(), rows, k, n,
                     sums.data_ptr<int32_t>());
  at::Tensor out = at::empty({rows, n}, x.options());
  const int32_t* dot = sums.data_ptr<int32_t>();
  const int32_t* weight_sum = weight_sums.data_ptr<int32_t>();
  const float* weight_scale = weight_scales.data_ptr<float>();
  float* y = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j)
      y[r * n + j] = static_cast<float>(dot[r * n + j] - 128 * weight_sum[j]) * row_scales[r] *
                     weight_scale[j];
  return out;
#else
  TORCH_CHECK(false, "rowwise_linear_int8: needs a build with AVX-512 VNNI");
  return x;
#endif
}

}  // namespace

TORCH_LIBRARY(specdecode_kernels, m) {
  m.def("rowwise_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("rowwise_linear_int8(Tensor x, Tensor weight, Tensor weight_sums, "
        "Tensor weight_scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(specdecode_kernels, CPU, m) {
  m.impl("rowwise_linear", &rowwise_linear);
  m.impl("rowwise_linear_int8", &rowwise_linear_int8);
}
