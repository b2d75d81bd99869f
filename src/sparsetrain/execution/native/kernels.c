/* Fused CPU kernels for compressed activations (SWAT's top-K inputs, the bit-packed ReLU).
 *
 * Each kernel is one pass over memory, split into chunks of CHUNK elements that run on
 * plain pthreads (no OpenMP runtime beside PyTorch's own). Bit order matches
 * numpy.packbits(..., bitorder="little"): element i is bit (i % 8) of byte i / 8.
 * Chunk boundaries are multiples of 8, so no two threads write the same byte.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>

#define CHUNK 65536
#define MAX_THREADS 64

typedef void (*chunk_fn)(void *args, int64_t chunk);

struct job { chunk_fn fn; void *args; int64_t nchunks; int stride; int first; };

static void *run_job(void *p) {
    struct job *j = (struct job *)p;
    for (int64_t c = j->first; c < j->nchunks; c += j->stride) j->fn(j->args, c);
    return 0;
}

/* fn(args, c) for every chunk c, on up to nthreads threads (the caller's thread is one of them). */
static void parallel_chunks(chunk_fn fn, void *args, int64_t nchunks, int nthreads) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > nchunks) nthreads = (int)nchunks;
    if (nthreads < 1) nthreads = 1;
    pthread_t tid[MAX_THREADS];
    struct job jobs[MAX_THREADS];
    int started = 0;
    for (int t = 0; t < nthreads; t++) jobs[t] = (struct job){fn, args, nchunks, nthreads, t};
    for (int t = 1; t < nthreads; t++) {
        if (pthread_create(&tid[t], 0, run_job, &jobs[t]) != 0) break;
        started = t;
    }
    /* chunks of threads that failed to start run here */
    for (int t = started + 1; t < nthreads; t++) run_job(&jobs[t]);
    run_job(&jobs[0]);
    for (int t = 1; t <= started; t++) pthread_join(tid[t], 0);
}

static inline int64_t chunk_end(int64_t c, int64_t n) { int64_t e = (c + 1) * CHUNK; return e < n ? e : n; }

int64_t chunk_count(int64_t n) { return (n + CHUNK - 1) / CHUNK; }

/* Every kernel walks its chunk in bytes of 8 elements: a full byte runs a fixed-length loop the
 * compiler unrolls and vectorises, the last (partial) byte of the tensor a short one. Pointers are
 * copied to restrict locals so the compiler need not reload them after every store. */

/* ---- keep bits: which entries reach the threshold, and how many per chunk ---- */
struct keep_args { const float *x; int64_t n; float thr; int absolute; uint8_t *bits; int64_t *counts; };

enum { AT_LEAST = 0, ABS_AT_LEAST = 1, POSITIVE = 2 };

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

/* The bits of one byte: x[j] >= thr, |x[j]| >= thr or x[j] > 0, by mode. */
static inline unsigned keep_byte(const float *restrict x, int len, float thr, int mode) {
    unsigned byte = 0;
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
    const int mode = a->absolute ? ABS_AT_LEAST : AT_LEAST;
    int64_t b = c * CHUNK, hi = chunk_end(c, a->n), count = 0;
#if defined(__AVX512F__)
    const __m512 t = _mm512_set1_ps(thr);
    for (; b + 16 <= hi; b += 16) {
        __m512 v = _mm512_loadu_ps(x + b);
        unsigned m = _mm512_cmp_ps_mask(a->absolute ? _mm512_abs_ps(v) : v, t, _CMP_GE_OQ);
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

/* bits[i/8] bit i%8 = (|x[i]| >= thr) (x[i] >= thr when absolute == 0); counts[c] = kept entries of chunk c. */
void keep_bits_f32(const float *x, int64_t n, float thr, int absolute, uint8_t *bits, int64_t *counts, int nthreads) {
    struct keep_args a = {x, n, thr, absolute, bits, counts};
    parallel_chunks(keep_chunk, &a, chunk_count(n), nthreads);
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
    parallel_chunks(gather_chunk, &a, chunk_count(n), nthreads);
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
    parallel_chunks(count_chunk, &a, chunk_count(n), nthreads);
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
    parallel_chunks(scatter_chunk, &a, chunk_count(n), nthreads);
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
    parallel_chunks(relu_chunk, &a, chunk_count(n), nthreads);
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
    parallel_chunks(relu_grad_chunk, &a, chunk_count(n), nthreads);
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
    parallel_chunks(select_chunk, &a, chunk_count(n), nthreads);
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
        parallel_chunks(radix_chunk, &a, nchunks, nthreads);
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


/* ---- direct sparse convolution (NCHW, float32, groups 1) ----
 * A weight W[Cout, Cin, KH, KW] with nnz kept entries is given as lists in output-channel order
 * (co_ptr[Cout + 1]; ci, kh, kw, value per entry) and, for the input gradient, the same entries
 * in input-channel order (ci_ptr[Cin + 1]; co_t, kh_t, kw_t, vidx_t indexing the values). Every
 * kept weight costs one shifted multiply-add over an output plane, so the work is nnz * N * Ho * Wo
 * multiply-adds: the sparse FLOP count, with no unfolded copy of the input. */
struct conv_geom {
    int64_t n, cin, h, w, cout, ho, wo;
    int sh, sw, ph, pw, dh, dw;
};

/* output positions o in [lo, hi) whose input position o * s + k * d - p lies in [0, size) */
static inline void valid_range(int64_t out_size, int64_t in_size, int s, int k, int d, int p, int64_t *lo, int64_t *hi) {
    int64_t off = (int64_t)k * d - p;  /* input = o * s + off */
    int64_t a = off >= 0 ? 0 : (-off + s - 1) / s;
    int64_t b = in_size - off <= 0 ? 0 : (in_size - off + s - 1) / s;
    if (b > out_size) b = out_size;
    *lo = a;
    *hi = b > a ? b : a;
}

/* geom: N, Cin, H, W, Cout, Ho, Wo, stride h/w, padding h/w, dilation h/w */
static struct conv_geom read_geom(const int64_t *geom) {
    struct conv_geom g = {geom[0], geom[1], geom[2], geom[3], geom[4], geom[5], geom[6],
                          (int)geom[7], (int)geom[8], (int)geom[9], (int)geom[10], (int)geom[11], (int)geom[12]};
    return g;
}

/* Where kept weight (kh, kw) acts: output rows [oh0, oh1) and columns [ow0, ow1) whose input lies inside
 * the image, and the input offset (input = output * stride + off) along each axis. */
struct window { int64_t oh0, oh1, ow0, ow1, offh, offw; };

static inline struct window entry_window(const struct conv_geom *g, int kh, int kw) {
    struct window w;
    valid_range(g->ho, g->h, g->sh, kh, g->dh, g->ph, &w.oh0, &w.oh1);
    valid_range(g->wo, g->w, g->sw, kw, g->dw, g->pw, &w.ow0, &w.ow1);
    w.offh = (int64_t)kh * g->dh - g->ph;
    w.offw = (int64_t)kw * g->dw - g->pw;
    return w;
}

struct conv_fwd_args {
    const struct conv_geom *g; const float *x; const float *values; const float *bias;
    const int64_t *co_ptr; const int32_t *ci; const int16_t *kh; const int16_t *kw; float *out;
};

static void conv_fwd_item(void *p, int64_t item) {
    const struct conv_fwd_args *a = (const struct conv_fwd_args *)p;
    const struct conv_geom *g = a->g;
    int64_t n = item / g->cout, co = item % g->cout;
    float *restrict out = a->out + item * g->ho * g->wo;
    float b0 = a->bias ? a->bias[co] : 0.0f;
    for (int64_t i = 0; i < g->ho * g->wo; i++) out[i] = b0;
    for (int64_t e = a->co_ptr[co]; e < a->co_ptr[co + 1]; e++) {
        const float w = a->values[e];
        const float *restrict src = a->x + (n * g->cin + a->ci[e]) * g->h * g->w;
        const struct window wd = entry_window(g, a->kh[e], a->kw[e]);
        const int64_t oh0 = wd.oh0, oh1 = wd.oh1, ow0 = wd.ow0, ow1 = wd.ow1, offh = wd.offh, offw = wd.offw;
        for (int64_t oh = oh0; oh < oh1; oh++) {
            float *restrict orow = out + oh * g->wo;
            const float *restrict irow = src + (oh * g->sh + offh) * g->w + offw;
            if (g->sw == 1) for (int64_t ow = ow0; ow < ow1; ow++) orow[ow] += w * irow[ow];
            else for (int64_t ow = ow0; ow < ow1; ow++) orow[ow] += w * irow[ow * g->sw];
        }
    }
}

void sparse_conv_forward(const int64_t *geom, const float *x, const float *values, const float *bias,
                         const int64_t *co_ptr, const int32_t *ci, const int16_t *kh, const int16_t *kw,
                         float *out, int nthreads) {
    struct conv_geom g = read_geom(geom);
    struct conv_fwd_args a = {&g, x, values, bias, co_ptr, ci, kh, kw, out};
    parallel_chunks(conv_fwd_item, &a, g.n * g.cout, nthreads);
}

struct conv_bwd_in_args {
    const struct conv_geom *g; const float *grad; const float *values;
    const int64_t *ci_ptr; const int32_t *co; const int16_t *kh; const int16_t *kw; const int64_t *vidx; float *gx;
};

static void conv_bwd_in_item(void *p, int64_t item) {
    const struct conv_bwd_in_args *a = (const struct conv_bwd_in_args *)p;
    const struct conv_geom *g = a->g;
    int64_t n = item / g->cin, ci = item % g->cin;
    float *restrict gx = a->gx + item * g->h * g->w;
    for (int64_t i = 0; i < g->h * g->w; i++) gx[i] = 0.0f;
    for (int64_t e = a->ci_ptr[ci]; e < a->ci_ptr[ci + 1]; e++) {
        const float w = a->values[a->vidx[e]];
        const float *restrict gsrc = a->grad + (n * g->cout + a->co[e]) * g->ho * g->wo;
        const struct window wd = entry_window(g, a->kh[e], a->kw[e]);
        const int64_t oh0 = wd.oh0, oh1 = wd.oh1, ow0 = wd.ow0, ow1 = wd.ow1, offh = wd.offh, offw = wd.offw;
        for (int64_t oh = oh0; oh < oh1; oh++) {
            const float *restrict grow = gsrc + oh * g->wo;
            float *restrict xrow = gx + (oh * g->sh + offh) * g->w + offw;
            if (g->sw == 1) for (int64_t ow = ow0; ow < ow1; ow++) xrow[ow] += w * grow[ow];
            else for (int64_t ow = ow0; ow < ow1; ow++) xrow[ow * g->sw] += w * grow[ow];
        }
    }
}

void sparse_conv_backward_input(const int64_t *geom, const float *grad, const float *values,
                                const int64_t *ci_ptr, const int32_t *co, const int16_t *kh, const int16_t *kw,
                                const int64_t *vidx, float *gx, int nthreads) {
    struct conv_geom g = read_geom(geom);
    struct conv_bwd_in_args a = {&g, grad, values, ci_ptr, co, kh, kw, vidx, gx};
    parallel_chunks(conv_bwd_in_item, &a, g.n * g.cin, nthreads);
}

/* sum of a[i] * b[i * stride]; reassociated (eight running sums) so that it vectorises */
__attribute__((optimize("associative-math", "no-signed-zeros", "no-trapping-math")))
static float dot_f32(const float *restrict a, const float *restrict b, int64_t len, int stride) {
    float acc = 0.0f;
    if (stride == 1) for (int64_t i = 0; i < len; i++) acc += a[i] * b[i];
    else for (int64_t i = 0; i < len; i++) acc += a[i] * b[i * stride];
    return acc;
}

struct conv_bwd_w_args {
    const struct conv_geom *g; const float *x; const float *grad;
    const int64_t *co_ptr; const int32_t *ci; const int16_t *kh; const int16_t *kw; float *partial; int parts;
};

/* Part t of the batch (whole images, so an image's planes stay in cache): for every kept entry,
 * the sum over the part's images of (output-gradient plane) . (shifted input plane), into partial[t]. */
static void conv_bwd_w_part(void *p, int64_t t) {
    const struct conv_bwd_w_args *a = (const struct conv_bwd_w_args *)p;
    const struct conv_geom *g = a->g;
    int64_t nnz = a->co_ptr[g->cout];
    float *restrict gw = a->partial + t * nnz;
    for (int64_t e = 0; e < nnz; e++) gw[e] = 0.0f;
    int64_t n0 = g->n * t / a->parts, n1 = g->n * (t + 1) / a->parts;
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t co = 0; co < g->cout; co++) {
            const float *restrict gplane = a->grad + (n * g->cout + co) * g->ho * g->wo;
            for (int64_t e = a->co_ptr[co]; e < a->co_ptr[co + 1]; e++) {
                const float *restrict src = a->x + (n * g->cin + a->ci[e]) * g->h * g->w;
                const struct window wd = entry_window(g, a->kh[e], a->kw[e]);
                const int64_t oh0 = wd.oh0, oh1 = wd.oh1, ow0 = wd.ow0, ow1 = wd.ow1, offh = wd.offh, offw = wd.offw;
                float acc = 0.0f;
                for (int64_t oh = oh0; oh < oh1; oh++)
                    acc += dot_f32(gplane + oh * g->wo + ow0, src + (oh * g->sh + offh) * g->w + offw + ow0 * g->sw,
                                   ow1 - ow0, g->sw);
                gw[e] += acc;
            }
        }
    }
}

/* partial[parts, nnz]: the weight gradient at the kept entries, one row per part of the batch (sum them) */
void sparse_conv_backward_weight(const int64_t *geom, const float *x, const float *grad,
                                 const int64_t *co_ptr, const int32_t *ci, const int16_t *kh, const int16_t *kw,
                                 float *partial, int parts, int nthreads) {
    struct conv_geom g = read_geom(geom);
    struct conv_bwd_w_args a = {&g, x, grad, co_ptr, ci, kh, kw, partial, parts};
    parallel_chunks(conv_bwd_w_part, &a, parts, nthreads);
}

/* ---- the same three products with the batch innermost: tensors laid out [C, H, W, N] ----
 * For small feature maps a plane row is too short to vectorise; with the batch innermost every
 * kept weight and output position is one multiply-add over N contiguous values. */
static inline void axpy_f32(float *restrict y, float a, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* output rows per block: about 16 KB of one output plane ([rows, Wo, N] floats) */
static inline int64_t row_block(const struct conv_geom *g) {
    int64_t rows = 4096 / (g->wo * g->n);
    return rows > 0 ? rows : 1;
}

static void conv_fwd_bi_item(void *p, int64_t co) {
    const struct conv_fwd_args *a = (const struct conv_fwd_args *)p;
    const struct conv_geom *g = a->g;
    const int64_t N = g->n, plane = g->ho * g->wo * N;
    float *restrict out = a->out + co * plane;
    float b0 = a->bias ? a->bias[co] : 0.0f;
    for (int64_t i = 0; i < plane; i++) out[i] = b0;
    const int64_t rows = row_block(g);
    for (int64_t r0 = 0; r0 < g->ho; r0 += rows)  /* a block of output rows stays in L1 through every kept weight */
        for (int64_t e = a->co_ptr[co]; e < a->co_ptr[co + 1]; e++) {
            const float w = a->values[e];
            const float *restrict src = a->x + (int64_t)a->ci[e] * g->h * g->w * N;
            const struct window wd = entry_window(g, a->kh[e], a->kw[e]);
            const int64_t oh1 = wd.oh1 < r0 + rows ? wd.oh1 : r0 + rows;
            for (int64_t oh = wd.oh0 > r0 ? wd.oh0 : r0; oh < oh1; oh++)
                for (int64_t ow = wd.ow0; ow < wd.ow1; ow++)
                    axpy_f32(out + (oh * g->wo + ow) * N, w,
                             src + ((oh * g->sh + wd.offh) * g->w + ow * g->sw + wd.offw) * N, N);
        }
}

void sparse_conv_forward_bi(const int64_t *geom, const float *x, const float *values, const float *bias,
                            const int64_t *co_ptr, const int32_t *ci, const int16_t *kh, const int16_t *kw,
                            float *out, int nthreads) {
    struct conv_geom g = read_geom(geom);
    struct conv_fwd_args a = {&g, x, values, bias, co_ptr, ci, kh, kw, out};
    parallel_chunks(conv_fwd_bi_item, &a, g.cout, nthreads);
}

static void conv_bwd_in_bi_item(void *p, int64_t ci) {
    const struct conv_bwd_in_args *a = (const struct conv_bwd_in_args *)p;
    const struct conv_geom *g = a->g;
    const int64_t N = g->n, plane = g->h * g->w * N;
    float *restrict gx = a->gx + ci * plane;
    for (int64_t i = 0; i < plane; i++) gx[i] = 0.0f;
    const int64_t rows = row_block(g);
    for (int64_t r0 = 0; r0 < g->ho; r0 += rows)  /* the gradient rows written stay in cache through every kept weight */
        for (int64_t e = a->ci_ptr[ci]; e < a->ci_ptr[ci + 1]; e++) {
            const float w = a->values[a->vidx[e]];
            const float *restrict gsrc = a->grad + (int64_t)a->co[e] * g->ho * g->wo * N;
            const struct window wd = entry_window(g, a->kh[e], a->kw[e]);
            const int64_t oh1 = wd.oh1 < r0 + rows ? wd.oh1 : r0 + rows;
            for (int64_t oh = wd.oh0 > r0 ? wd.oh0 : r0; oh < oh1; oh++)
                for (int64_t ow = wd.ow0; ow < wd.ow1; ow++)
                    axpy_f32(gx + ((oh * g->sh + wd.offh) * g->w + ow * g->sw + wd.offw) * N, w,
                             gsrc + (oh * g->wo + ow) * N, N);
        }
}

void sparse_conv_backward_input_bi(const int64_t *geom, const float *grad, const float *values,
                                   const int64_t *ci_ptr, const int32_t *co, const int16_t *kh, const int16_t *kw,
                                   const int64_t *vidx, float *gx, int nthreads) {
    struct conv_geom g = read_geom(geom);
    struct conv_bwd_in_args a = {&g, grad, values, ci_ptr, co, kh, kw, vidx, gx};
    parallel_chunks(conv_bwd_in_bi_item, &a, g.cin, nthreads);
}

static void conv_bwd_w_bi_item(void *p, int64_t co) {
    const struct conv_bwd_w_args *a = (const struct conv_bwd_w_args *)p;
    const struct conv_geom *g = a->g;
    const int64_t N = g->n;
    const float *restrict gplane = a->grad + co * g->ho * g->wo * N;
    for (int64_t e = a->co_ptr[co]; e < a->co_ptr[co + 1]; e++) a->partial[e] = 0.0f;
    const int64_t rows = row_block(g);
    for (int64_t r0 = 0; r0 < g->ho; r0 += rows)  /* a block of gradient rows stays in L1 through every kept weight */
        for (int64_t e = a->co_ptr[co]; e < a->co_ptr[co + 1]; e++) {
            const float *restrict src = a->x + (int64_t)a->ci[e] * g->h * g->w * N;
            const struct window wd = entry_window(g, a->kh[e], a->kw[e]);
            const int64_t oh1 = wd.oh1 < r0 + rows ? wd.oh1 : r0 + rows;
            float acc = 0.0f;
            for (int64_t oh = wd.oh0 > r0 ? wd.oh0 : r0; oh < oh1; oh++)
                for (int64_t ow = wd.ow0; ow < wd.ow1; ow++)
                    acc += dot_f32(gplane + (oh * g->wo + ow) * N,
                                   src + ((oh * g->sh + wd.offh) * g->w + ow * g->sw + wd.offw) * N, N, 1);
            a->partial[e] += acc;
        }
}

/* gw[nnz]: the weight gradient at the kept entries (in output-channel order) */
void sparse_conv_backward_weight_bi(const int64_t *geom, const float *x, const float *grad,
                                    const int64_t *co_ptr, const int32_t *ci, const int16_t *kh, const int16_t *kw,
                                    float *gw, int nthreads) {
    struct conv_geom g = read_geom(geom);
    struct conv_bwd_w_args a = {&g, x, grad, co_ptr, ci, kh, kw, gw, 1};
    parallel_chunks(conv_bwd_w_bi_item, &a, g.cout, nthreads);
}
