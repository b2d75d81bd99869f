/* Fused CPU kernels for compressed activations (SWAT's top-K inputs, the bit-packed ReLU).
 *
 * Each kernel is one pass over memory, split into chunks of CHUNK elements that run on
 * plain pthreads (no OpenMP runtime beside PyTorch's own). Bit order matches
 * numpy.packbits(..., bitorder="little"): element i is bit (i % 8) of byte i / 8.
 * Chunk boundaries are multiples of 8, so no two threads write the same byte.
 */
#include "kernels.h"
#include "parallel.h"


int64_t chunk_count(int64_t n) { return (n + CHUNK - 1) / CHUNK; }

/* 1 where the library runs its threads in the OpenMP runtime (PyTorch's own), 0 on plain threads. */
int uses_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Every kernel walks its chunk in bytes of 8 elements: a full byte runs a fixed-length loop the
 * compiler unrolls and vectorises, the last (partial) byte of the tensor a short one. Pointers are
 * copied to restrict locals so the compiler need not reload them after every store. */

/* ---- keep bits: which entries reach the threshold, and how many per chunk ---- */
struct keep_args { const float *x; int64_t n; float thr; int mode; uint8_t *bits; int64_t *counts; };

/* NONZERO keeps every entry whose bits are not all zero (-0.0 and NaN included): exact, for lossless storage */
enum { AT_LEAST = 0, ABS_AT_LEAST = 1, POSITIVE = 2, NONZERO = 3 };

#if defined(__AVX512F__)
/* 16 lanes per instruction, with a mask register per comparison and compress/expand for the
 * kept values: these paths do one element in a few cycles where the byte loops below branch per bit */
#include <immintrin.h>
static inline unsigned bits16(const uint8_t *bits, int64_t i) { return bits[i >> 3] | ((unsigned)bits[(i >> 3) + 1] << 8); }
static inline void put_bits16(uint8_t *bits, int64_t i, unsigned m) { bits[i >> 3] = (uint8_t)m; bits[(i >> 3) + 1] = (uint8_t)(m >> 8); }
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
/* lane masks for the 16 values of a nibble: lane j all ones where bit j is set */
static const int32_t NIBBLE_LANES[16][4] __attribute__((aligned(16))) = {
    {0,0,0,0},{-1,0,0,0},{0,-1,0,0},{-1,-1,0,0},{0,0,-1,0},{-1,0,-1,0},{0,-1,-1,0},{-1,-1,-1,0},
    {0,0,0,-1},{-1,0,0,-1},{0,-1,0,-1},{-1,-1,0,-1},{0,0,-1,-1},{-1,0,-1,-1},{0,-1,-1,-1},{-1,-1,-1,-1}};
#define LANES(n) _mm_load_ps((const float *)NIBBLE_LANES[(n)])
#endif

/* The bits of one byte: x[j] >= thr, |x[j]| >= thr, x[j] > 0 or x[j]'s bits not all zero, by mode. */
static inline unsigned keep_byte(const float *restrict x, int len, float thr, int mode) {
    unsigned byte = 0;
    if (mode == NONZERO) {
        const uint32_t *restrict u = (const uint32_t *)x;
        for (int j = 0; j < len; j++) byte |= (unsigned)(u[j] != 0u) << j;
        return byte;
    }
#if defined(__SSE2__)
    if (len == 8) {
        __m128 a = _mm_loadu_ps(x), b = _mm_loadu_ps(x + 4), t = _mm_set1_ps(thr);
        if (mode == ABS_AT_LEAST) {
            __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
            a = _mm_and_ps(a, abs_mask);
            b = _mm_and_ps(b, abs_mask);
        }
        if (mode == POSITIVE) return (unsigned)(_mm_movemask_ps(_mm_cmpgt_ps(a, _mm_setzero_ps())) |
                                                (_mm_movemask_ps(_mm_cmpgt_ps(b, _mm_setzero_ps())) << 4));
        return (unsigned)(_mm_movemask_ps(_mm_cmpge_ps(a, t)) | (_mm_movemask_ps(_mm_cmpge_ps(b, t)) << 4));
    }
#endif
    if (len == 8) {
        if (mode == ABS_AT_LEAST) for (int j = 0; j < 8; j++) byte |= (unsigned)(fabsf(x[j]) >= thr) << j;
        else if (mode == AT_LEAST) for (int j = 0; j < 8; j++) byte |= (unsigned)(x[j] >= thr) << j;
        else for (int j = 0; j < 8; j++) byte |= (unsigned)(x[j] > 0.0f) << j;
    } else {
        for (int j = 0; j < len; j++)
            byte |= (unsigned)(mode == POSITIVE ? x[j] > 0.0f : (mode == ABS_AT_LEAST ? fabsf(x[j]) : x[j]) >= thr) << j;
    }
    return byte;
}

static void keep_chunk(void *p, int64_t c) {
    const struct keep_args *a = (const struct keep_args *)p;
    const float *restrict x = a->x;
    uint8_t *restrict bits = a->bits;
    const float thr = a->thr;
    const int mode = a->mode;
    int64_t b = c * CHUNK, hi = chunk_end(c, a->n), count = 0;
#if defined(__AVX512F__)
    const __m512 t = _mm512_set1_ps(thr);
    for (; b + 16 <= hi; b += 16) {
        __m512 v = _mm512_loadu_ps(x + b);
        __m512i vi = _mm512_castps_si512(v);
        unsigned m = mode == NONZERO ? _mm512_test_epi32_mask(vi, vi)
                                     : _mm512_cmp_ps_mask(mode == ABS_AT_LEAST ? _mm512_abs_ps(v) : v, t, _CMP_GE_OQ);
        put_bits16(bits, b, m);
        count += __builtin_popcount(m);
    }
#endif
    for (; b < hi; b += 8) {
        unsigned byte = keep_byte(x + b, hi - b >= 8 ? 8 : (int)(hi - b), thr, mode);
        bits[b >> 3] = (uint8_t)byte;
        count += __builtin_popcount(byte);
    }
    a->counts[c] = count;
}

/* bits[i/8] bit i%8 = x[i] kept under mode (AT_LEAST, ABS_AT_LEAST or NONZERO: see keep_byte); counts[c] = kept
 * entries of chunk c. */
void keep_bits_f32(const float *x, int64_t n, float thr, int mode, uint8_t *bits, int64_t *counts, int nthreads) {
    struct keep_args a = {x, n, thr, mode, bits, counts};
    parallel_workers(keep_chunk, &a, chunk_count(n), nthreads);
}

/* ---- gather: the kept values in memory order ---- */
struct gather_args { const float *x; int64_t n; const uint8_t *bits; const int64_t *offsets; float *values; };

static void gather_chunk(void *p, int64_t c) {
    const struct gather_args *a = (const struct gather_args *)p;
    const float *restrict x = a->x;
    const uint8_t *restrict bits = a->bits;
    float *restrict out = a->values + a->offsets[c];
    int64_t b = c * CHUNK, hi = chunk_end(c, a->n);
#if defined(__AVX512F__)
    for (; b + 16 <= hi; b += 16) {  /* masked store: never past this chunk's share of values */
        unsigned m = bits16(bits, b), kept = __builtin_popcount(m);
        _mm512_mask_storeu_ps(out, (__mmask16)((1u << kept) - 1), _mm512_maskz_compress_ps((__mmask16)m, _mm512_loadu_ps(x + b)));
        out += kept;
    }
#endif
    for (; b < hi; b += 8) {
        unsigned byte = bits[b >> 3];
        while (byte) {
            *out++ = x[b + __builtin_ctz(byte)];
            byte &= byte - 1;
        }
    }
}

/* values[offsets[c] ...] = the entries of chunk c whose bit is set; offsets = exclusive prefix sum of counts. */
void gather_f32(const float *x, int64_t n, const uint8_t *bits, const int64_t *offsets, float *values, int nthreads) {
    struct gather_args a = {x, n, bits, offsets, values};
    parallel_workers(gather_chunk, &a, chunk_count(n), nthreads);
}

/* ---- popcount per chunk (for scatter's offsets) ---- */
struct count_args { const uint8_t *bits; int64_t n; int64_t *counts; };

static void count_chunk(void *p, int64_t c) {
    const struct count_args *a = (const struct count_args *)p;
    const uint8_t *restrict bits = a->bits;
    int64_t lo = c * CHUNK, hi = chunk_end(c, a->n), count = 0;
    for (int64_t b = lo; b < hi; b += 8) count += __builtin_popcount(bits[b >> 3]);
    a->counts[c] = count;
}

void count_bits(const uint8_t *bits, int64_t n, int64_t *counts, int nthreads) {
    struct count_args a = {bits, n, counts};
    parallel_workers(count_chunk, &a, chunk_count(n), nthreads);
}

/* ---- scatter: the dense tensor back, zeros where the bit is clear ---- */
struct scatter_args { const uint8_t *bits; const float *values; const int64_t *offsets; int64_t n; float *out; };

static void scatter_chunk(void *p, int64_t c) {
    const struct scatter_args *a = (const struct scatter_args *)p;
    const uint8_t *restrict bits = a->bits;
    const float *restrict v = a->values + a->offsets[c];
    float *restrict out = a->out;
    int64_t b = c * CHUNK, hi = chunk_end(c, a->n);
#if defined(__AVX512F__)
    for (; b + 16 <= hi; b += 16) {  /* masked load: never past the end of values */
        unsigned m = bits16(bits, b), kept = __builtin_popcount(m);
        __m512 vals = _mm512_maskz_loadu_ps((__mmask16)((1u << kept) - 1), v);
        _mm512_storeu_ps(out + b, _mm512_maskz_expand_ps((__mmask16)m, vals));
        v += kept;
    }
#endif
    for (; b < hi; b += 8) {
        unsigned byte = bits[b >> 3];
        int len = hi - b >= 8 ? 8 : (int)(hi - b);
        if (len == 8) {  /* zeros, then the set bits patched in: work in proportion to what was kept */
            for (int j = 0; j < 8; j++) out[b + j] = 0.0f;
            while (byte) {
                out[b + __builtin_ctz(byte)] = *v++;
                byte &= byte - 1;
            }
        } else {
            for (int j = 0; j < len; j++) {
                unsigned bit = (byte >> j) & 1u;
                out[b + j] = bit ? *v : 0.0f;
                v += bit;
            }
        }
    }
}

void scatter_f32(const uint8_t *bits, const float *values, const int64_t *offsets, int64_t n, float *out, int nthreads) {
    struct scatter_args a = {bits, values, offsets, n, out};
    parallel_workers(scatter_chunk, &a, chunk_count(n), nthreads);
}

/* ---- ReLU that keeps one bit per element for its backward ---- */
struct relu_args { const float *x; const uint8_t *bits_in; int64_t n; float *out; uint8_t *bits; };

static void relu_chunk(void *p, int64_t c) {
    const struct relu_args *a = (const struct relu_args *)p;
    const float *x = a->x;  /* may alias out (in place): every element is read before it is written */
    float *out = a->out;
    uint8_t *restrict bits = a->bits;
    int64_t lo = c * CHUNK, hi = chunk_end(c, a->n);
#if defined(__AVX512F__)
    for (; lo + 16 <= hi; lo += 16) {  /* out = x where not (x <= 0), so NaN passes */
        __m512 v = _mm512_loadu_ps(x + lo);
        __mmask16 not_positive = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LE_OQ);
        put_bits16(bits, lo, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ));
        _mm512_storeu_ps(out + lo, _mm512_maskz_mov_ps((__mmask16)~not_positive, v));
    }
#endif
#if defined(__SSE2__)
    const __m128 zero = _mm_setzero_ps();
    for (; lo + 8 <= hi; lo += 8) {  /* whole bytes: out = x where not (x <= 0), so NaN passes */
        __m128 p = _mm_loadu_ps(x + lo), q = _mm_loadu_ps(x + lo + 4);
        _mm_storeu_ps(out + lo, _mm_andnot_ps(_mm_cmple_ps(p, zero), p));
        _mm_storeu_ps(out + lo + 4, _mm_andnot_ps(_mm_cmple_ps(q, zero), q));
        bits[lo >> 3] = (uint8_t)(_mm_movemask_ps(_mm_cmpgt_ps(p, zero)) | (_mm_movemask_ps(_mm_cmpgt_ps(q, zero)) << 4));
    }
#endif
    for (int64_t b = lo; b < hi; b += 8) bits[b >> 3] = (uint8_t)keep_byte(x + b, hi - b >= 8 ? 8 : (int)(hi - b), 0.0f, POSITIVE);
    for (int64_t i = lo; i < hi; i++) {  /* after the bits: in place, out overwrites x */
        float v = x[i];
        out[i] = (v > 0.0f || v != v) ? v : 0.0f; /* NaN passes, as in torch.relu */
    }
}

/* out = relu(x); bits = (x > 0). */
void relu_bits_f32(const float *x, int64_t n, float *out, uint8_t *bits, int nthreads) {
    struct relu_args a = {x, 0, n, out, bits};
    parallel_workers(relu_chunk, &a, chunk_count(n), nthreads);
}

static void relu_grad_chunk(void *p, int64_t c) {
    const struct relu_args *a = (const struct relu_args *)p;
    const float *restrict g = a->x;
    const uint8_t *restrict bits = a->bits_in;
    float *restrict out = a->out;
    int64_t b = c * CHUNK, hi = chunk_end(c, a->n);
#if defined(__AVX512F__)
    for (; b + 16 <= hi; b += 16) _mm512_storeu_ps(out + b, _mm512_maskz_mov_ps((__mmask16)bits16(bits, b), _mm512_loadu_ps(g + b)));
#endif
    for (; b < hi; b += 8) {
        unsigned byte = bits[b >> 3];
        int len = hi - b >= 8 ? 8 : (int)(hi - b);
#if defined(__SSE2__)
        if (len == 8) {
            _mm_storeu_ps(out + b, _mm_and_ps(_mm_loadu_ps(g + b), LANES(byte & 15u)));
            _mm_storeu_ps(out + b + 4, _mm_and_ps(_mm_loadu_ps(g + b + 4), LANES(byte >> 4)));
            continue;
        }
#endif
        if (len == 8) for (int j = 0; j < 8; j++) out[b + j] = ((byte >> j) & 1u) ? g[b + j] : 0.0f;
        else for (int j = 0; j < len; j++) out[b + j] = ((byte >> j) & 1u) ? g[b + j] : 0.0f;
    }
}

/* out = grad where the bit is set, else 0. */
void relu_grad_f32(const float *grad, const uint8_t *bits, int64_t n, float *out, int nthreads) {
    struct relu_args a = {grad, bits, n, out, 0};
    parallel_workers(relu_grad_chunk, &a, chunk_count(n), nthreads);
}

/* ---- the entries at or above a magnitude threshold, zeros elsewhere (SWAT's W_s) ---- */
struct select_args { const float *x; int64_t n; float thr; float *out; };

static void select_chunk(void *p, int64_t c) {
    const struct select_args *a = (const struct select_args *)p;
    const float *restrict x = a->x;
    float *restrict out = a->out;
    const float thr = a->thr;
    int64_t i = c * CHUNK, hi = chunk_end(c, a->n);
#if defined(__SSE2__)
    const __m128 t = _mm_set1_ps(thr), abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    for (; i + 4 <= hi; i += 4) {
        __m128 v = _mm_loadu_ps(x + i);
        _mm_storeu_ps(out + i, _mm_and_ps(v, _mm_cmpge_ps(_mm_and_ps(v, abs_mask), t)));
    }
#endif
    for (; i < hi; i++) out[i] = fabsf(x[i]) >= thr ? x[i] : 0.0f;
}

/* out = x where |x| >= thr, else 0. */
void select_f32(const float *x, int64_t n, float thr, float *out, int nthreads) {
    struct select_args a = {x, n, thr, out};
    parallel_workers(select_chunk, &a, chunk_count(n), nthreads);
}

/* ---- exact top-K threshold: radix select over the bits of |x| ----
 * For non-negative floats the IEEE bit pattern orders like the value, so the k-th largest |x|
 * is found digit by digit (11, 11 and 10 bits): each pass histograms the next digit of the
 * entries that share the digits found so far, per chunk, and walks the bins from the top. */
#define RADIX_BINS 2048
struct radix_args { const uint32_t *x; int64_t n; uint32_t prefix, prefix_mask; int shift; uint32_t digit_mask; uint32_t *hist; };

static void radix_chunk(void *p, int64_t c) {
    const struct radix_args *a = (const struct radix_args *)p;
    const uint32_t *restrict x = a->x;
    uint32_t *restrict hist = a->hist + c * RADIX_BINS;
    const uint32_t prefix = a->prefix, prefix_mask = a->prefix_mask, digit_mask = a->digit_mask;
    const int shift = a->shift;
    for (int b = 0; b < RADIX_BINS; b++) hist[b] = 0;
    int64_t lo = c * CHUNK, hi = chunk_end(c, a->n);
    for (int64_t i = lo; i < hi; i++) {
        uint32_t u = x[i] & 0x7fffffffu;
        if ((u & prefix_mask) == prefix) hist[(u >> shift) & digit_mask]++;
    }
}

/* thr = the k-th largest |x| (1 <= k <= n); count = how many entries have |x| >= thr (k plus ties). */
void kth_largest_abs_f32(const float *x, int64_t n, int64_t k, float *thr, int64_t *count, uint32_t *hist, int nthreads) {
    static const int shifts[3] = {21, 10, 0};
    static const uint32_t digit_masks[3] = {0x7ffu, 0x7ffu, 0x3ffu};
    int64_t nchunks = chunk_count(n), above = 0;
    uint32_t prefix = 0, prefix_mask = 0, last_bin_count = 0;
    for (int pass = 0; pass < 3; pass++) {
        struct radix_args a = {(const uint32_t *)x, n, prefix, prefix_mask, shifts[pass], digit_masks[pass], hist};
        parallel_workers(radix_chunk, &a, nchunks, nthreads);
        int64_t total[RADIX_BINS] = {0};
        for (int64_t c = 0; c < nchunks; c++)
            for (int b = 0; b < RADIX_BINS; b++) total[b] += hist[c * RADIX_BINS + b];
        int b = (int)digit_masks[pass];
        for (; b > 0 && above + total[b] < k; b--) above += total[b];
        last_bin_count = (uint32_t)total[b];
        prefix |= (uint32_t)b << shifts[pass];
        prefix_mask |= digit_masks[pass] << shifts[pass];
    }
    union { uint32_t u; float f; } v = {prefix};
    *thr = v.f;
    *count = above + last_bin_count;
}


