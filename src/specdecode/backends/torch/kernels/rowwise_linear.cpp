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
//
// On a CPU with AMX (tile matrix instructions, Intel Sapphire Rapids and later), bfloat16 rows
// can take those instead (rowwise_linear_tiles, at the end of this file): there the dot-product
// instruction makes a verification forward's arithmetic cost more than its memory, and one tile
// instruction does 16 rows' work.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define SPECDECODE_TILES 1
#endif

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

#ifdef SPECDECODE_TILES
// Tile matrix instructions (AMX). One instruction multiplies a tile of up to 16 rows of 32
// bfloat16 inputs by a tile of those 32 inputs' weights for 16 outputs, adding into 16 x 16
// float32 sums. Its rounding is its own, not the dot-product instruction's, so a process either
// puts every product of bfloat16 rows on this path, whatever the row count, or none. Within the
// instruction the rows of a tile never meet: a row's sums are the same sequence of operations
// whether the tile holds it alone or with 15 others (tested in tests/test_torch_backend.py).
// On 2 cores of a 2.0 GHz Xeon a 16-token forward of the 1.5B costs 1.1-1.6 one-token forwards
// this way, against 3.7-3.8 on the dot-product tile above. One or two rows (plain decoding)
// take the vector unit instead, in the same arithmetic (multiply_few_rows), since the tile loads
// stream the weights more slowly. It is asked for, with SPECDECODE_TILES=1, since the packed
// copy doubles the memory of the weights (README, "What limits these numbers").
//
// The weights are repacked once (invariance.py) into the layout the instruction reads: for each
// group of 64 outputs, for each of its 4 tiles of 16 outputs, for each step of 32 inputs, a tile
// [16 input pairs][16 outputs][2]: each tile of outputs reads its weights in order.
namespace tiles {

constexpr int kMaxRows = 16;      // rows a tile holds
constexpr int kStepInputs = 32;   // inputs per step: 64 bytes of bfloat16 per row
constexpr int kGroupOutputs = 64;  // 4 sum tiles of 16 float32 outputs
constexpr int64_t kTileValues = 16 * kStepInputs;       // bfloat16 values of one weight tile
// Each weight tile's successor 8 tiles ahead in its stream is fetched into L2 (also fetching
// one tile ahead into L1 made no difference measured here; fetching nothing was slower).
constexpr int64_t kFetchAheadBytes = 8 * 1024;

// The tile `kFetchAheadBytes` after this one in its stream, into L2 (not past `last`).
inline void fetch(const c10::BFloat16* tile, const char* last) {
  const char* ahead = reinterpret_cast<const char*>(tile) + kFetchAheadBytes;
  for (int line = 0; line < 1024; line += 64)
    if (ahead + line < last) _mm_prefetch(ahead + line, _MM_HINT_T1);
}

// The tile configuration's memory layout, as the instruction set defines it (palette 1).
struct Config {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// Tiles 0-3: sums [rows][16] float32; 4: inputs [rows][32] bfloat16; 5-7: weights [16][32].
void configure(int rows) {
  Config config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = t < 5 ? rows : 16;
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);
}

// Linux lends a process the tile registers' 8 KB of state only when asked, once.
bool enabled() {
  static const bool granted = [] {
    constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted;
}

// x: [rows, depth] bfloat16 (depth a multiple of 32); packed: [groups, 4, depth / 32, 16, 32];
// out: [rows, groups * 64] float32.
void multiply(const c10::BFloat16* x, int64_t rows, int64_t depth, const c10::BFloat16* packed,
              int64_t groups, float* out) {
  const int64_t steps = depth / kStepInputs;
  const int64_t out_stride = groups * kGroupOutputs;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    // The fetch runs ahead of this thread's share of the weights, not past it.
    const char* last = reinterpret_cast<const char*>(packed + end * 4 * steps * kTileValues);
    int configured = 0;
    // Group by group, so that with more than 16 rows a group's weights (at most about a MB)
    // are read from memory once and from L2 for the later rows.
    for (int64_t g = begin; g < end; ++g) {
      const c10::BFloat16* group_weights = packed + g * 4 * steps * kTileValues;
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
        const int count = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r0));
        if (count != configured) {
          configure(count);
          configured = count;
        }
        const c10::BFloat16* xr = x + r0 * depth;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        // The 4 output tiles' weights are 4 streams from memory: a core keeps several streams
        // in flight where one would wait (4 read 1.2-1.5 times as fast as 1 in a test here).
        const c10::BFloat16* w0 = group_weights;
        const c10::BFloat16* w1 = w0 + steps * kTileValues;
        const c10::BFloat16* w2 = w1 + steps * kTileValues;
        const c10::BFloat16* w3 = w2 + steps * kTileValues;
        for (int64_t s = 0; s < steps; ++s) {
          const int64_t at = s * kTileValues;
          fetch(w0 + at, last);
          fetch(w1 + at, last);
          fetch(w2 + at, last);
          fetch(w3 + at, last);
          _tile_loadd(4, xr + s * kStepInputs, depth * 2);
          _tile_loadd(5, w0 + at, 64);
          _tile_dpbf16ps(0, 4, 5);
          _tile_loadd(6, w1 + at, 64);
          _tile_dpbf16ps(1, 4, 6);
          _tile_loadd(7, w2 + at, 64);
          _tile_dpbf16ps(2, 4, 7);
          _tile_loadd(5, w3 + at, 64);
          _tile_dpbf16ps(3, 4, 5);
        }
        float* o = out + r0 * out_stride + g * kGroupOutputs;
        _tile_stored(0, o, out_stride * 4);
        _tile_stored(1, o + 16, out_stride * 4);
        _tile_stored(2, o + 32, out_stride * 4);
        _tile_stored(3, o + 48, out_stride * 4);
      }
    }
    _tile_release();
  });
}

// One or two rows on the vector unit, in the tile instruction's arithmetic, which Intel's manual
// states and which matches the instruction bit for bit here (tests/test_torch_backend.py): within
// a step of 32 inputs the products of the even inputs and those of the odd ones are summed apart,
// each from zero in input order by fused multiply-adds, then their sum is added to the output's.
// A product of two bfloat16 values is exact in float32, so each multiply-add rounds only its sum,
// as the instruction's does; its flush-to-zero and denormals-are-zero modes are set meanwhile.
// Why: the tile loads stream the weights from memory at about two thirds of the rate of plain
// vector loads (benchmarks/kernel_ab.py --tiles), which only many rows per tile make up for.
template <int Rows>
void multiply_few_rows(const c10::BFloat16* x, int64_t depth, const c10::BFloat16* packed,
                       int64_t groups, float* out) {
  const int64_t steps = depth / kStepInputs;
  const int64_t out_stride = groups * kGroupOutputs;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    const unsigned int saved_modes = _mm_getcsr();
    _mm_setcsr(saved_modes | 0x8040);  // flush to zero (bit 15), denormals are zero (bit 6)
    const __m512i odd_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t g = begin; g < end; ++g) {
      // A weight tile's row p holds, for each of its 16 outputs, inputs 2p and 2p + 1: as 32-bit
      // lanes, the even input's bfloat16 in the low half, the odd one's in the high half.
      const c10::BFloat16* w[4];
      w[0] = packed + g * 4 * steps * kTileValues;
      for (int j = 1; j < 4; ++j) w[j] = w[j - 1] + steps * kTileValues;
      __m512 sums[Rows][4];
      for (int r = 0; r < Rows; ++r)
        for (int j = 0; j < 4; ++j) sums[r][j] = _mm512_setzero_ps();
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t at = s * kTileValues;
        // No software fetch ahead: the hardware prefetcher keeps up with these 4 streams, and
        // fetching into L2 or L1 ahead measured slower here (benchmarks/kernel_ab.py --tiles).
        __m512 even[Rows][4], odd[Rows][4];
        for (int r = 0; r < Rows; ++r)
          for (int j = 0; j < 4; ++j) even[r][j] = odd[r][j] = _mm512_setzero_ps();
        for (int p = 0; p < 16; ++p) {
          __m512 x_even[Rows], x_odd[Rows];
          for (int r = 0; r < Rows; ++r) {
            uint32_t pair;  // inputs 2p and 2p + 1 of this step, the even one in the low half
            std::memcpy(&pair, x + r * depth + s * kStepInputs + 2 * p, sizeof pair);
            x_even[r] = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(pair << 16)));
            x_odd[r] =
                _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(pair & 0xFFFF0000u)));
          }
          for (int j = 0; j < 4; ++j) {
            const __m512i line = _mm512_loadu_si512(w[j] + at + p * 32);
            const __m512 w_even = _mm512_castsi512_ps(_mm512_slli_epi32(line, 16));
            const __m512 w_odd = _mm512_castsi512_ps(_mm512_and_si512(line, odd_half));
            for (int r = 0; r < Rows; ++r) {
              even[r][j] = _mm512_fmadd_ps(x_even[r], w_even, even[r][j]);
              odd[r][j] = _mm512_fmadd_ps(x_odd[r], w_odd, odd[r][j]);
            }
          }
        }
        for (int r = 0; r < Rows; ++r)
          for (int j = 0; j < 4; ++j)
            sums[r][j] = _mm512_add_ps(sums[r][j], _mm512_add_ps(even[r][j], odd[r][j]));
      }
      for (int r = 0; r < Rows; ++r)
        for (int j = 0; j < 4; ++j)
          _mm512_storeu_ps(out + r * out_stride + g * kGroupOutputs + 16 * j, sums[r][j]);
    }
    _mm_setcsr(saved_modes);
  });
}

}  // namespace tiles
#endif

bool tiles_enabled() {
#ifdef SPECDECODE_TILES
  return tiles::enabled();
#else
  return false;
#endif
}

// x: [rows, k] bfloat16, contiguous; packed: a weight [n, k] in the tile layout
// [ceil(n / 64), 4, ceil(k / 32), 16, 32] (zeros past n and k). Returns [rows, n] float32.
at::Tensor rowwise_linear_tiles(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
#ifdef SPECDECODE_TILES
  TORCH_CHECK(tiles::enabled(), "rowwise_linear_tiles: the OS did not grant the tile registers");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "rowwise_linear_tiles: contiguous bfloat16 rows expected");
  TORCH_CHECK(packed.dim() == 5 && packed.size(1) == 4 && packed.size(3) == 16 &&
                  packed.size(4) == tiles::kStepInputs &&
                  packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "rowwise_linear_tiles: weights packed as [groups, 4, steps, 16, 32] bfloat16");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "rowwise_linear_tiles: CPU");
  const int64_t rows = x.size(0), k = x.size(1), groups = packed.size(0);
  const int64_t depth = packed.size(2) * tiles::kStepInputs;
  const int64_t outputs = groups * tiles::kGroupOutputs;
  TORCH_CHECK(k <= depth && depth - k < tiles::kStepInputs && n <= outputs &&
                  outputs - n < tiles::kGroupOutputs,
              "rowwise_linear_tiles: packed weights of another shape");
  // Padded inputs read as zeros, whose products add nothing, the same for every row count.
  at::Tensor rows_in = k == depth ? x : at::constant_pad_nd(x, {0, depth - k});
  at::Tensor out = at::empty({rows, outputs}, x.options().dtype(at::kFloat));
  // One or two rows (plain decoding, a draft of one token) on the vector unit; more on tiles.
  if (rows == 1 || rows == 2)
    (rows == 1 ? tiles::multiply_few_rows<1> : tiles::multiply_few_rows<2>)(
        rows_in.data_ptr<c10::BFloat16>(), depth, packed.data_ptr<c10::BFloat16>(), groups,
        out.data_ptr<float>());
  else if (rows > 2)
    tiles::multiply(rows_in.data_ptr<c10::BFloat16>(), rows, depth,
                    packed.data_ptr<c10::BFloat16>(), groups, out.data_ptr<float>());
  return n == outputs ? out : out.narrow(1, 0, n).contiguous();
#else
  TORCH_CHECK(false, "rowwise_linear_tiles: needs a build with AMX");
  return x;
#endif
}

}  // namespace

TORCH_LIBRARY(specdecode_kernels, m) {
  m.def("rowwise_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("rowwise_linear_int8(Tensor x, Tensor weight, Tensor weight_sums, "
        "Tensor weight_scales) -> Tensor");
  m.def("rowwise_linear_tiles(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("tiles_enabled() -> bool", &tiles_enabled);
}

TORCH_LIBRARY_IMPL(specdecode_kernels, CPU, m) {
  m.impl("rowwise_linear", &rowwise_linear);
  m.impl("rowwise_linear_int8", &rowwise_linear_int8);
  m.impl("rowwise_linear_tiles", &rowwise_linear_tiles);
}
