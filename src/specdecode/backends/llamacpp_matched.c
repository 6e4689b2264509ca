/*
 * Two of llama.cpp's CPU kernels, rewritten to sum in the order of the kernel llama.cpp uses for
 * the same weights in a batch, so that a row gets the same bits whether it is multiplied alone or
 * among others (the "matched" kernels; see llamacpp_matched.py for how they replace llama.cpp's).
 *
 * 1. ggml_gemv_q4_K_8x8_q8_K: Q4_K weights repacked in groups of 8 columns (block_q4_Kx8) times
 *    one Q8_K row. llama.cpp multiplies a batch's rows in groups of 4 with its matrix-matrix
 *    kernel, the rest with this one. Per output column and 256-value superblock, the integer part
 *    is exact in both: for each pair p of 32-value sub-blocks, the scaled dot product
 *        I_p = scale[2p] * dot(low nibbles, q8[64p .. 64p+31])
 *            + scale[2p+1] * dot(high nibbles, q8[64p+32 .. 64p+63])
 *    and the mins term M_p = min[2p] * sum(q8 of sub-block 2p) + min[2p+1] * sum(sub-block 2p+1).
 *    llama.cpp's matrix-vector kernel adds the four I_p as integers and rounds once per
 *    superblock; its matrix-matrix kernel rounds once per pair, as this one does:
 *        acc      = fma(float(I_p), d * row_d,    acc)       for each superblock, p = 0..3
 *        acc_mins = fma(float(M_p), dmin * row_d, acc_mins)
 *        out      = acc - acc_mins
 *
 * 2. ggml_vec_dot_q6_K_q8_K: one Q6_K weight row times one Q8_K row. llama.cpp takes this per
 *    element below 8 rows and its tiled kernel from 8 rows on (GGML_CPU_TILED_MM). Both compute
 *    the exact integer, per superblock, S = sum over 16-value groups g of
 *    scale[g] * dot(q6[g] - 32, q8[g]); the tiled kernel then does
 *        acc = fma(float(S) * d, row_d, acc)                   for each superblock
 *    (float(S) * d rounded on its own; acc from +0), as this one does, where llama.cpp's own
 *    vector kernel keeps 8 partial sums and adds them at the end. (The tiled kernel's source
 *    multiplies and adds; GCC, which builds llama-cpp-python, fuses them. A llama.cpp built
 *    otherwise would round twice, and the check at load would fall back to the narrow kernels.)
 *
 * The integers are computed with byte dot products (AVX-512 VNNI); any exact method gives the
 * same integers. Compiled with -ffp-contract=off: every float operation is written out.
 *
 * Layouts (llama.cpp's ggml-common.h and ggml-cpu/repack.h):
 * - block_q4_Kx8.qs: for pair p, 256 bytes; in them, for k = 0..3, 64 bytes: column j's 8 bytes
 *   at 8j, byte i holding (low nibble) the weight for q8[64p + 8k + i] and (high nibble) the
 *   weight for q8[64p + 32 + 8k + i].
 * - block_q4_Kx8.scales: 8 groups of 12 bytes, group g holding the 6-bit scales and mins of
 *   sub-block g for the 8 columns: bytes 0-3 scales of columns 0-3 (low 6 bits) with the top 2
 *   bits of the scales of columns 4-7; bytes 4-7 the same for mins; bytes 8-11 the low 4 bits of
 *   the scales (low nibble) and mins (high nibble) of columns 4-7.
 * - block_q6_K: value v of half h (0, 1) of a superblock, v = 32j + l (j = 0..3, l = 0..31), has
 *   its low 4 bits in ql[64h + 32(j & 1) + l] (low nibble for j < 2, high for j >= 2) and its
 *   high 2 bits at bit 2j of qh[32h + l]; group g = v / 16 + 8h has scale scales[g].
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define QK_K 256

typedef struct {
    uint16_t d[8];    /* float16 superblock scales, one per column */
    uint16_t dmin[8]; /* float16 superblock scales of the mins */
    uint8_t scales[96];
    uint8_t qs[1024];
} block_q4_Kx8;

typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16]; /* sums of 16 quants each */
} block_q8_K;

typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d; /* float16 */
} block_q6_K;

_Static_assert(sizeof(block_q4_Kx8) == 1152, "block_q4_Kx8 layout");
_Static_assert(sizeof(block_q6_K) == 210, "block_q6_K layout");
_Static_assert(sizeof(block_q8_K) == 292, "block_q8_K layout");

/* Set at the first call: let the tests see that llama.cpp runs these kernels rather than its own.
 * (Read before written, so that the threads' calls do not contend for the cache line.) */
int specdecode_gemv_used = 0;
int specdecode_vec_dot_used = 0;

static inline void mark_used(int *flag) {
    if (!__atomic_load_n(flag, __ATOMIC_RELAXED)) {
        __atomic_store_n(flag, 1, __ATOMIC_RELAXED);
    }
}

/* The 6-bit scales and mins of the 8 sub-blocks for the 8 columns: byte 8g + j of `scales` is
 * sub-block g's scale for column j, and likewise for `mins`. */
static inline void unpack_scales(const uint8_t *packed, uint8_t scales[64], uint8_t mins[64]) {
    const __m512i first = _mm512_loadu_si512((const void *)packed);                 /* words 0-15 */
    const __m512i rest = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(packed + 64)));
    /* word w of group g is word 3g + w of the 96 bytes */
    const __m512i word0 = _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i word1 = _mm512_setr_epi32(1, 4, 7, 10, 13, 16, 19, 22, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i word2 = _mm512_setr_epi32(2, 5, 8, 11, 14, 17, 20, 23, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256i w0 = _mm512_castsi512_si256(_mm512_permutex2var_epi32(first, word0, rest));
    const __m256i w1 = _mm512_castsi512_si256(_mm512_permutex2var_epi32(first, word1, rest));
    const __m256i w2 = _mm512_castsi512_si256(_mm512_permutex2var_epi32(first, word2, rest));
    const __m256i six_bits = _mm256_set1_epi32(0x3f3f3f3f);
    const __m256i four_bits = _mm256_set1_epi32(0x0f0f0f0f);
    const __m256i two_bits = _mm256_set1_epi32(0x03030303);
    /* lane g: 4 bytes, one per column */
    const __m256i scales_0123 = _mm256_and_si256(w0, six_bits);
    const __m256i scales_4567 = _mm256_or_si256(
        _mm256_and_si256(w2, four_bits),
        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w0, 6), two_bits), 4));
    const __m256i mins_0123 = _mm256_and_si256(w1, six_bits);
    const __m256i mins_4567 = _mm256_or_si256(
        _mm256_and_si256(_mm256_srli_epi32(w2, 4), four_bits),
        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w1, 6), two_bits), 4));
    /* interleaved, each group's columns 0-3 then 4-7: groups 0,1 | 4,5 and 2,3 | 6,7 */
    const __m256i scales_a = _mm256_unpacklo_epi32(scales_0123, scales_4567);
    const __m256i scales_b = _mm256_unpackhi_epi32(scales_0123, scales_4567);
    const __m256i mins_a = _mm256_unpacklo_epi32(mins_0123, mins_4567);
    const __m256i mins_b = _mm256_unpackhi_epi32(mins_0123, mins_4567);
    _mm256_storeu_si256((__m256i *)scales, _mm256_permute2x128_si256(scales_a, scales_b, 0x20));
    _mm256_storeu_si256((__m256i *)(scales + 32), _mm256_permute2x128_si256(scales_a, scales_b, 0x31));
    _mm256_storeu_si256((__m256i *)mins, _mm256_permute2x128_si256(mins_a, mins_b, 0x20));
    _mm256_storeu_si256((__m256i *)(mins + 32), _mm256_permute2x128_si256(mins_a, mins_b, 0x31));
}

static inline __m512i broadcast_8_bytes(const int8_t *bytes) {
    int64_t value;
    memcpy(&value, bytes, sizeof value);
    return _mm512_set1_epi64(value);
}

/* The sum of a 512-bit vector's two halves, as 8 32-bit integers. */
static inline __m256i add_halves(__m512i vector) {
    return _mm256_add_epi32(_mm512_castsi512_si256(vector), _mm512_extracti64x4_epi64(vector, 1));
}

static void gemv_row(int n, float *restrict s, const void *restrict vx, const void *restrict vy,
                     int nc);

/* llama.cpp's signature: n values per row, s the nc outputs (columns) of each of nr rows, bs
 * apart, vx the weights of those columns, vy the rows of n / 256 Q8_K blocks each (llama.cpp
 * passes one row at a time). */
void ggml_gemv_q4_K_8x8_q8_K(int n, float *restrict s, size_t bs, const void *restrict vx,
                             const void *restrict vy, int nr, int nc) {
    mark_used(&specdecode_gemv_used);
    const block_q8_K *rows = (const block_q8_K *)vy;
    for (int r = 0; r < nr; r++) {
        gemv_row(n, s + (size_t)r * bs, vx, rows + (size_t)r * (n / QK_K), nc);
    }
}

static void gemv_row(int n, float *restrict s, const void *restrict vx, const void *restrict vy,
                     int nc) {
    const int blocks = n / QK_K;
    const block_q8_K *row = (const block_q8_K *)vy;
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    /* the two 32-bit partial sums of column j sit in lanes 2j and 2j + 1 */
    const __m512i even_lanes =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd_lanes =
        _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    uint8_t scales[64], mins[64];

    for (int group = 0; group < nc / 8; group++) {
        const block_q4_Kx8 *weights = (const block_q4_Kx8 *)vx + (size_t)group * blocks;
        __m256 acc = _mm256_setzero_ps();
        __m256 acc_mins = _mm256_setzero_ps();
        for (int b = 0; b < blocks; b++) {
            const block_q4_Kx8 *w = weights + b;
            const block_q8_K *a = row + b;
            unpack_scales(w->scales, scales, mins);
            const __m256 row_d = _mm256_set1_ps(a->d);
            const __m256 d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w->d)), row_d);
            const __m256 dmin =
                _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w->dmin)), row_d);
            for (int pair = 0; pair < 4; pair++) {
                const uint8_t *quants = w->qs + pair * 256;
                const int8_t *low_q8 = a->qs + pair * 64;
                __m512i low_sums = _mm512_setzero_si512();  /* [16] partial sums, sub-block 2p */
                __m512i high_sums = _mm512_setzero_si512(); /* [16] sub-block 2p + 1 */
                for (int k = 0; k < 4; k++) {
                    const __m512i packed = _mm512_loadu_si512((const void *)(quants + k * 64));
                    const __m512i low = _mm512_and_si512(packed, nibble);
                    const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
                    low_sums = _mm512_dpbusd_epi32(low_sums, low, broadcast_8_bytes(low_q8 + 8 * k));
                    high_sums =
                        _mm512_dpbusd_epi32(high_sums, high, broadcast_8_bytes(low_q8 + 32 + 8 * k));
                }
                /* [16]: lanes 0-7 the 8 columns' dot products for sub-block 2p, 8-15 for 2p + 1 */
                const __m512i dots =
                    _mm512_add_epi32(_mm512_permutex2var_epi32(low_sums, even_lanes, high_sums),
                                     _mm512_permutex2var_epi32(low_sums, odd_lanes, high_sums));
                const __m512i sub_scales =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(scales + pair * 16)));
                const __m256i scaled = add_halves(_mm512_mullo_epi32(dots, sub_scales));
                const int q8_sum_low = a->bsums[4 * pair] + a->bsums[4 * pair + 1];
                const int q8_sum_high = a->bsums[4 * pair + 2] + a->bsums[4 * pair + 3];
                const __m512i q8_sums = _mm512_inserti64x4(
                    _mm512_set1_epi32(q8_sum_low), _mm256_set1_epi32(q8_sum_high), 1);
                const __m512i sub_mins =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(mins + pair * 16)));
                const __m256i min_terms = add_halves(_mm512_mullo_epi32(sub_mins, q8_sums));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(scaled), d, acc);
                acc_mins = _mm256_fmadd_ps(_mm256_cvtepi32_ps(min_terms), dmin, acc_mins);
            }
        }
        _mm256_storeu_ps(s + group * 8, _mm256_sub_ps(acc, acc_mins));
    }
}

/* Quarter j of half h of a Q6_K superblock holds groups 8h + 2j (its values 0-15) and 8h + 2j + 1
 * (values 16-31): byte shuffles that spread their scales over bytes 0-7 and 8-15, for 4h + j. */
static const uint8_t q6_scale_shuffle[8][16] __attribute__((aligned(16))) = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
    {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},
    {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},
    {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13},
    {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15},
};

/* Sum of a vector's 8 32-bit integers. */
static inline int32_t sum_lanes(__m256i vector) {
    const __m128i halves = _mm_add_epi32(_mm256_castsi256_si128(vector),
                                         _mm256_extracti128_si256(vector, 1));
    const __m128i pairs = _mm_add_epi32(halves, _mm_unpackhi_epi64(halves, halves));
    return _mm_cvtsi128_si32(_mm_add_epi32(pairs, _mm_shuffle_epi32(pairs, 1)));
}

/* llama.cpp's signature; nrc (rows at once) is 1 on x86, bs, bx, by are strides for nrc > 1.
 * 256-bit vectors: AMD's AVX-512 units run a 512-bit operation as two 256-bit halves, so wider
 * vectors would save nothing here, where the work is in unpacking the values. */
void ggml_vec_dot_q6_K_q8_K(int n, float *restrict s, size_t bs, const void *restrict vx,
                            size_t bx, const void *restrict vy, size_t by, int nrc) {
    (void)bs;
    (void)bx;
    (void)by;
    (void)nrc;
    mark_used(&specdecode_vec_dot_used);
    const int blocks = n / QK_K;
    const block_q6_K *weights = (const block_q6_K *)vx;
    const block_q8_K *row = (const block_q8_K *)vy;
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    const __m256i bits_4_5 = _mm256_set1_epi8(0x30);
    float acc = 0.0f;
    for (int b = 0; b < blocks; b++) {
        const block_q6_K *w = weights + b;
        const block_q8_K *a = row + b;
        const __m128i scale_bytes = _mm_loadu_si128((const __m128i *)w->scales);
        __m256i products[8]; /* [8] per quarter: sums of 4 products, times their group's scale */
        for (int half = 0; half < 2; half++) {
            const __m256i low_a = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * half));
            const __m256i low_b = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * half + 32));
            const __m256i high = _mm256_loadu_si256((const __m256i *)(w->qh + 32 * half));
            /* quarter j: low 4 bits from low_a (j even) or low_b (j odd), low nibble for j < 2;
             * high 2 bits at bit 2j of `high`, moved to bits 4-5 */
            const __m256i values[4] = {
                _mm256_or_si256(_mm256_and_si256(low_a, nibble),
                                _mm256_and_si256(_mm256_slli_epi16(high, 4), bits_4_5)),
                _mm256_or_si256(_mm256_and_si256(low_b, nibble),
                                _mm256_and_si256(_mm256_slli_epi16(high, 2), bits_4_5)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low_a, 4), nibble),
                                _mm256_and_si256(high, bits_4_5)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low_b, 4), nibble),
                                _mm256_and_si256(_mm256_srli_epi16(high, 2), bits_4_5)),
            };
            for (int j = 0; j < 4; j++) {
                const __m256i q8 =
                    _mm256_loadu_si256((const __m256i *)(a->qs + 128 * half + 32 * j));
                /* [16] sums of 2 products: at most 2 * 63 * 127, no saturation */
                const __m256i pairs = _mm256_maddubs_epi16(values[j], q8);
                const __m128i spread = _mm_load_si128((const __m128i *)q6_scale_shuffle[4 * half + j]);
                const __m256i scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scale_bytes, spread));
                products[4 * half + j] = _mm256_madd_epi16(pairs, scale);
            }
        }
        /* added as a tree: one accumulator would chain the additions' latencies */
        const __m256i sums = _mm256_add_epi32(
            _mm256_add_epi32(_mm256_add_epi32(products[0], products[1]),
                             _mm256_add_epi32(products[2], products[3])),
            _mm256_add_epi32(_mm256_add_epi32(products[4], products[5]),
                             _mm256_add_epi32(products[6], products[7])));
        /* the values' offset of 32: 32 * sum over groups of scale * sum(q8 of the group) */
        const __m256i offsets = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)a->bsums),
                                                  _mm256_cvtepi8_epi16(scale_bytes));
        const __m256i total = _mm256_sub_epi32(sums, _mm256_slli_epi32(offsets, 5));
        const float weight_scaled = (float)sum_lanes(total) * _cvtsh_ss(w->d);
        acc = _mm_cvtss_f32(
            _mm_fmadd_ss(_mm_set_ss(weight_scaled), _mm_set_ss(a->d), _mm_set_ss(acc)));
    }
    *s = acc;
}
