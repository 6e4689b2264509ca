// Attention for the few query rows of a decoding or verification forward, in which every row's
// arithmetic depends only on the keys it may see, never on the other rows or on where its keys sit
// in the cache.
//
// Why: a tree's nodes share one forward, so a node's visible keys (the prefix, then its ancestors)
// are interleaved with keys it must not see. Library kernels sum attention scores and values in
// vector lanes by key slot; masked keys weigh exactly zero, but they shift which lane each visible
// key lands in, and the rounding of the sums changes. Then a node's logits differ in the last bits
// from those of decoding its path one token at a time, and greedy verification is no longer
// exact. Here each row first gathers its visible keys, in slot order, into a dense list: that list
// is the same whether the row is decoded alone, verified in a chain, or sits deep in a tree, and
// all the arithmetic (scores, softmax, weighted sum of values) runs over it in a fixed order.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kLanes = 16;

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << remaining) - 1);
}

inline __m512 load(const c10::BFloat16* p, __mmask16 mask) {
  __m256i half = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

inline __m512 load(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

// e^x for x <= 0, elementwise: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial
// to degree 7 (relative error below 2e-8), times 2^n. Arguments under -87 give 0.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 floor = _mm512_set1_ps(-87.0f);
  __mmask16 tiny = _mm512_cmp_ps_mask(x, floor, _CMP_LT_OQ);
  x = _mm512_max_ps(x, floor);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
}

// out = inverse * sum over j of weights[j] * values[visible[j]], for heads of Slices x 16 values:
// all of a key's value lanes at once, so that the Slices sums advance side by side instead of one
// after another, each waiting on its own previous step (the fallback's loop, 8x slower at d = 128).
// Every lane is summed over the keys in the same order either way: the bits do not change.
template <int Slices, typename KV>
inline void weigh_values(const float* weights, const KV* values, int64_t kv_row_stride,
                         const int32_t* visible, int64_t count, float inverse, float* out) {
  __m512 acc[Slices];
#pragma GCC unroll 16
  for (int s = 0; s < Slices; ++s) acc[s] = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    const __m512 weight = _mm512_set1_ps(weights[j]);
    const KV* value = values + visible[j] * kv_row_stride;
#pragma GCC unroll 16
    for (int s = 0; s < Slices; ++s)
      acc[s] = _mm512_fmadd_ps(weight, load(value + s * kLanes, __mmask16(0xFFFF)), acc[s]);
  }
  const __m512 scale = _mm512_set1_ps(inverse);
#pragma GCC unroll 16
  for (int s = 0; s < Slices; ++s) _mm512_storeu_ps(out + s * kLanes, _mm512_mul_ps(acc[s], scale));
}

// One key's score: its dot product with q, 16 lanes of d at a time, then summed across lanes.
// With d = 16 x Slices, q stays in registers and four keys are scored side by side, each with the
// same sums in the same order as alone (the fallback's keys wait on their own steps one by one).
template <int Slices, typename KV>
inline float score_keys(const float* q, const KV* keys, int64_t kv_row_stride,
                        const int32_t* visible, int64_t count, float scale, float* scores) {
  constexpr int kSide = 4;  // keys scored side by side
  __m512 query[Slices];
#pragma GCC unroll 16
  for (int s = 0; s < Slices; ++s) query[s] = _mm512_loadu_ps(q + s * kLanes);
  float top = -INFINITY;
  int64_t j = 0;
  for (; j + kSide <= count; j += kSide) {
    const KV* key[kSide];
    __m512 acc[kSide];
#pragma GCC unroll 4
    for (int t = 0; t < kSide; ++t) {
      key[t] = keys + visible[j + t] * kv_row_stride;
      acc[t] = _mm512_setzero_ps();
    }
#pragma GCC unroll 16
    for (int s = 0; s < Slices; ++s)
#pragma GCC unroll 4
      for (int t = 0; t < kSide; ++t)
        acc[t] = _mm512_fmadd_ps(query[s], load(key[t] + s * kLanes, __mmask16(0xFFFF)), acc[t]);
#pragma GCC unroll 4
    for (int t = 0; t < kSide; ++t) {
      float score = _mm512_reduce_add_ps(acc[t]) * scale;
      scores[j + t] = score;
      top = score > top ? score : top;
    }
  }
  for (; j < count; ++j) {
    const KV* key = keys + visible[j] * kv_row_stride;
    __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int s = 0; s < Slices; ++s)
      acc = _mm512_fmadd_ps(query[s], load(key + s * kLanes, __mmask16(0xFFFF)), acc);
    float score = _mm512_reduce_add_ps(acc) * scale;
    scores[j] = score;
    top = score > top ? score : top;
  }
  return top;
}

// Attention of one query row over its visible keys. Slices > 0: heads of d = 16 x Slices, on the
// paths above; 0: any d, one 16-lane step at a time (the same arithmetic, slower).
template <int Slices, typename KV>
void attend_one_row(const float* q, const KV* keys, const KV* values, int64_t kv_row_stride,
                    const int32_t* visible, int64_t count, int64_t d, float scale, float* scores,
                    float* out) {
  // Scores of the visible keys, in slot order: one dot product each, over d in 16-lane steps.
  float top = -INFINITY;
  if constexpr (Slices > 0) {
    top = score_keys<Slices>(q, keys, kv_row_stride, visible, count, scale, scores);
  } else {
    for (int64_t j = 0; j < count; ++j) {
      const KV* key = keys + visible[j] * kv_row_stride;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < d; i += kLanes) {
        __mmask16 mask = tail_mask(d - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, q + i), load(key + i, mask), acc);
      }
      float score = _mm512_reduce_add_ps(acc) * scale;
      scores[j] = score;
      top = score > top ? score : top;
    }
  }
  // Softmax weights; the sum runs over the dense list, so its lanes are fixed by the count alone.
  __m512 total = _mm512_setzero_ps();
  __m512 shift = _mm512_set1_ps(top);
  for (int64_t j = 0; j < count; j += kLanes) {
    __mmask16 mask = tail_mask(count - j);
    __m512 weight = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + j), shift));
    weight = _mm512_maskz_mov_ps(mask, weight);
    _mm512_mask_storeu_ps(scores + j, mask, weight);
    total = _mm512_add_ps(total, weight);
  }
  float inverse = 1.0f / _mm512_reduce_add_ps(total);
  // Weighted sum of values: key by key in slot order, each lane of d its own sum.
  if constexpr (Slices > 0) {
    weigh_values<Slices>(scores, values, kv_row_stride, visible, count, inverse, out);
  } else {
    for (int64_t i = 0; i < d; i += kLanes) {
      __mmask16 mask = tail_mask(d - i);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < count; ++j) {
        acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[j]),
                              load(values + visible[j] * kv_row_stride + i, mask), acc);
      }
      _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(acc, _mm512_set1_ps(inverse)));
    }
  }
}

template <typename KV>
void attend(const float* q, const KV* keys, const KV* values, int64_t kv_heads,
            int64_t kv_head_stride, int64_t kv_row_stride, int64_t queries, int64_t rows,
            int64_t d, const std::vector<std::vector<int32_t>>& visible, float scale, float* out) {
  size_t longest = 0;
  for (const auto& keys_of_row : visible) {
    longest = keys_of_row.size() > longest ? keys_of_row.size() : longest;
  }
  at::parallel_for(0, kv_heads * queries, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest + kLanes);
    for (int64_t item = begin; item < end; ++item) {
      int64_t head = item / queries, query = item % queries;
      const auto& keys_of_row = visible[query % rows];  // queries are [group, row]
      const KV* head_keys = keys + head * kv_head_stride;
      const KV* head_values = values + head * kv_head_stride;
      const int64_t count = int64_t(keys_of_row.size());
      // The head sizes of the registry's models (64, 128, 256) get the register paths.
      switch (d) {
        case 4 * kLanes:
          attend_one_row<4>(q + item * d, head_keys, head_values, kv_row_stride,
                            keys_of_row.data(), count, d, scale, scores.data(), out + item * d);
          break;
        case 8 * kLanes:
          attend_one_row<8>(q + item * d, head_keys, head_values, kv_row_stride,
                            keys_of_row.data(), count, d, scale, scores.data(), out + item * d);
          break;
        case 16 * kLanes:
          attend_one_row<16>(q + item * d, head_keys, head_values, kv_row_stride,
                             keys_of_row.data(), count, d, scale, scores.data(), out + item * d);
          break;
        default:
          attend_one_row<0>(q + item * d, head_keys, head_values, kv_row_stride,
                            keys_of_row.data(), count, d, scale, scores.data(), out + item * d);
      }
    }
  });
}

// q: [kv_heads, queries, d] float32, where query g * rows + r is row r of the g-th query head
// sharing the kv head. keys, values: [kv_heads, slots, d] bfloat16 or float32 (rows contiguous,
// heads strided, e.g. a slice of a cache). visible: [rows, slots] bool. Returns [kv_heads,
// queries, d] float32: softmax(q . k * scale) over each row's visible keys, times the values.
at::Tensor rowwise_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                             const at::Tensor& visible, double scale) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && values.dim() == 3 && visible.dim() == 2,
              "rowwise_attention: q, keys, values 3-D and visible 2-D expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(),
              "rowwise_attention: q must be contiguous float32");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type(), "rowwise_attention: keys/values dtype");
  TORCH_CHECK(keys.sizes() == values.sizes() && keys.strides() == values.strides(),
              "rowwise_attention: keys and values must have the same shape and layout");
  TORCH_CHECK(keys.stride(2) == 1 && keys.stride(1) == keys.size(2),
              "rowwise_attention: each key must be a contiguous row");
  TORCH_CHECK(visible.scalar_type() == at::kBool, "rowwise_attention: visible must be bool");
  int64_t kv_heads = q.size(0), queries = q.size(1), d = q.size(2);
  int64_t rows = visible.size(0), slots = keys.size(1);
  TORCH_CHECK(keys.size(0) == kv_heads && keys.size(2) == d, "rowwise_attention: key shape");
  TORCH_CHECK(visible.size(1) == slots && queries % rows == 0,
              "rowwise_attention: visible must be [rows, slots] with queries a multiple of rows");
  at::Tensor mask = visible.contiguous();
  const bool* flags = mask.data_ptr<bool>();
  std::vector<std::vector<int32_t>> keys_of_row(rows);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t s = 0; s < slots; ++s) {
      if (flags[r * slots + s]) keys_of_row[r].push_back(int32_t(s));
    }
    TORCH_CHECK(!keys_of_row[r].empty(), "rowwise_attention: a row sees no key");
  }
  at::Tensor out = at::empty({kv_heads, queries, d}, q.options());
  if (keys.scalar_type() == at::kBFloat16) {
    attend(q.data_ptr<float>(), keys.data_ptr<c10::BFloat16>(), values.data_ptr<c10::BFloat16>(),
           kv_heads, keys.stride(0), keys.stride(1), queries, rows, d, keys_of_row, float(scale),
           out.data_ptr<float>());
  } else {
    TORCH_CHECK(keys.scalar_type() == at::kFloat, "rowwise_attention: bfloat16 or float32 keys");
    attend(q.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), kv_heads,
           keys.stride(0), keys.stride(1), queries, rows, d, keys_of_row, float(scale),
           out.data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(specdecode_kernels, m) {
  m.def("rowwise_attention(Tensor q, Tensor keys, Tensor values, Tensor visible, float scale) -> "
        "Tensor");
}

TORCH_LIBRARY_IMPL(specdecode_kernels, CPU, m) {
  m.impl("rowwise_attention", &rowwise_attention);
}
