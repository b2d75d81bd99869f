/* bfloat16 helpers of the kernels' bfloat16 paths (condensed.c, nhwc_conv.c), AVX-512 builds only: rounding,
 * widening, and products of bfloat16 pairs summed in float32 (vdpbf16ps with AVX512-BF16, two float32
 * multiply-adds without it).
 *
 * Two rows a and b of 32 bfloat16 lanes (two kept weights' inputs) are paired by unpacking: the low unpack holds
 * lanes 8L + j (j < 4) of each 128-bit lane L, the high one lanes 8L + 4 + j, each beside its partner. A sum over
 * such pairs lands in that permuted order, undone once per output row by unpermute_pairs. */
#ifndef SPARSETRAIN_BF16_H
#define SPARSETRAIN_BF16_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

static inline bf16 round_bf16(float f) {  /* to nearest even, as vcvtneps2bf16; a NaN stays a (quiet) NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* a malloc'd bfloat16 copy of v[n] (null when out of memory) */
static inline bf16 *rounded_bf16(const float *v, int64_t n) {
    bf16 *h = (bf16 *)malloc((size_t)(n > 0 ? n : 1) * sizeof(bf16));
    if (h)
        for (int64_t i = 0; i < n; i++) h[i] = round_bf16(v[i]);
    return h;
}

static inline __m512 widen16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

/* float32 lanes that hold bfloat16 values already, back to bfloat16 (exact) */
static inline __m256i narrow_exact16(__m512 v) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)); }

static inline __m256i narrow16(__m512 v) {  /* rounded to nearest even */
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
}

/* acc[i] += a[2i] * b[2i] + a[2i + 1] * b[2i + 1] (bfloat16 pairs, float32 sums) */
static inline __m512 dot2(__m512 acc, __m512i a, __m512i b) {
#if defined(__AVX512BF16__)
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, hi)), _mm512_castsi512_ps(_mm512_and_si512(b, hi)), acc);
#endif
}

/* two kept weights w0, w1 as the pair every lane multiplies */
static inline __m512i weight_pair(bf16 w0, bf16 w1) { return _mm512_set1_epi32((int)((uint32_t)w0 | (uint32_t)w1 << 16)); }

/* the sums over the low and the high unpacks of 32 lanes, back in lane order: lanes 0-15 and 16-31 */
static inline void unpermute_pairs(__m512 lo, __m512 hi, __m512 *first, __m512 *second) {
    const __m512i a = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i b = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    *first = _mm512_permutex2var_ps(lo, a, hi);
    *second = _mm512_permutex2var_ps(lo, b, hi);
}

#endif
