#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "parallel.h"
#include "vectors.h"

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
    parallel_workers(conv_fwd_item, &a, g.n * g.cout, nthreads);
}

struct conv_bwd_in_args {
    const struct conv_geom *g; const float *grad; const float *values;
    const int64_t *ci_ptr; const int32_t *co; const int16_t *kh; const int16_t *kw; const int32_t *vidx; float *gx;
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
                                const int32_t *vidx, float *gx, int nthreads) {
    struct conv_geom g = read_geom(geom);
    struct conv_bwd_in_args a = {&g, grad, values, ci_ptr, co, kh, kw, vidx, gx};
    parallel_workers(conv_bwd_in_item, &a, g.n * g.cin, nthreads);
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
    parallel_workers(conv_bwd_w_part, &a, parts, nthreads);
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

/* ---- batch innermost, register-tiled: a tile of P output positions x V vectors of the batch stays in registers
 * while every kept weight of its channel streams past, so a multiply-add costs one (aligned) load and nothing else;
 * the axpy form above loads and stores the output for every one. A position whose input falls in the padding reads
 * a vector of zeros instead (a pointer chosen without a branch). Needs N a multiple of the vector width.
 *
 * One gather serves the forward (out[c][o] = sum over c's entries of w * src[ch][o * stride + k * d - p]) and, for
 * stride 1, the input gradient (gx[c][i] = sum of w * grad[ch][i + p - k * d], entries listed by input channel). */
struct gather {
    const float *src; int64_t n, src_h, src_w, out_h, out_w, step_h, step_w;  /* position o reads src at o * step */
    int64_t mul_h, mul_w, add_h, add_w;  /* ... shifted by kh * mul_h + add_h rows and kw * mul_w + add_w columns */
    const int64_t *ptr; const int32_t *ch; const int16_t *kh; const int16_t *kw;
    const float *values; const int32_t *vidx;  /* entry e's value: values[vidx ? vidx[e] : e] */
    const float *bias; float *out;
};

/* Tiles: up to GATHER_VECS vectors of the batch (at batch 128, eight: half the per-position work of four, 25%
 * faster) by as many positions as ACC accumulators allow. (With more accumulators, 24 for a weight-gradient tile
 * of AVX-512, the positions' offsets no longer fit the general registers: batch 32 ran 1.7x slower.) */
enum { GATHER_VECS = 8 };
static const float ZEROS[GATHER_VECS * TL];  /* what a position in the padding reads */

/* entry e's shift: rows and columns, and its offset in src (position 0, images from nb) */
struct shift { int64_t h, w, off; };

static inline struct shift entry_shift(const struct gather *a, int64_t e, int64_t nb) {
    struct shift s = {a->kh[e] * a->mul_h + a->add_h, a->kw[e] * a->mul_w + a->add_w, 0};
    s.off = (((int64_t)a->ch[e] * a->src_h + s.h) * a->src_w + s.w) * a->n + nb;
    return s;
}

/* where src position (ih, iw) shifted by s lies (at offset `at` of that position), or ZEROS when that falls in the
 * padding: chosen without a branch (which of an entry's positions are inside does not follow a pattern a branch
 * predictor learns) */
static inline const float *shifted(const float *src, const struct shift *s, int64_t ih, int64_t iw, int64_t at,
                                   int64_t h, int64_t w) {
    const intptr_t inside = -(intptr_t)(((uint64_t)(ih + s->h) < (uint64_t)h) & ((uint64_t)(iw + s->w) < (uint64_t)w));
    return (const float *)(((intptr_t)(src + s->off + at) & inside) | ((intptr_t)ZEROS & ~inside));
}

static inline __attribute__((always_inline)) void gather_tile(const struct gather *a, int64_t c, int64_t nb,
                                                              int64_t p0, const int V, const int P) {
    const int64_t positions = a->out_h * a->out_w, h = a->src_h, w = a->src_w;
    int64_t ih[P], iw[P], at[P];
    for (int q = 0; q < P; q++) {  /* (tiles lie inside the plane: GATHER_SPAN) */
        const int64_t pos = p0 + q;
        ih[q] = pos / a->out_w * a->step_h;
        iw[q] = pos % a->out_w * a->step_w;
        at[q] = (ih[q] * w + iw[q]) * a->n;
    }
    const float b0 = a->bias ? a->bias[c] : 0.0f;
    const float *src = a->src;
    tv acc[P][V];
    for (int q = 0; q < P; q++)
        for (int j = 0; j < V; j++) acc[q][j] = (tv){} + b0;
    for (int64_t e = a->ptr[c]; e < a->ptr[c + 1]; e++) {
        const float wt = a->values[a->vidx ? a->vidx[e] : e];
        const struct shift s = entry_shift(a, e, nb);
        for (int q = 0; q < P; q++) {
            const float *x = shifted(src, &s, ih[q], iw[q], at[q], h, w);
            for (int j = 0; j < V; j++) acc[q][j] += wt * load_tv(x + j * TL);
        }
    }
    for (int q = 0; q < P; q++)
        for (int j = 0; j < V; j++) store_tv(a->out + ((c * positions + p0 + q) * a->n) + nb + j * TL, acc[q][j]);
}

#define TILE_POSITIONS(A, V) ((A) / (V) > 0 ? (A) / (V) : 1)
/* a plane's positions p0.. for V vectors: whole tiles of as many positions as A accumulators hold, then what is
 * left in tiles of 16, 8, 4, 2 and 1 (no tile reaches past the plane: a small plane wastes no work) */
#define GATHER_SPAN(TILE, A, V, ...)                                                                     \
    case V: {                                                                                            \
        const int full = TILE_POSITIONS(A, V);                                                           \
        for (; p0 + full <= positions; p0 += full) TILE(__VA_ARGS__, V, full);                           \
        if (full > 16 && positions - p0 >= 16) { TILE(__VA_ARGS__, V, 16); p0 += 16; }                   \
        if (full > 8 && positions - p0 >= 8) { TILE(__VA_ARGS__, V, 8); p0 += 8; }                       \
        if (full > 4 && positions - p0 >= 4) { TILE(__VA_ARGS__, V, 4); p0 += 4; }                       \
        if (full > 2 && positions - p0 >= 2) { TILE(__VA_ARGS__, V, 2); p0 += 2; }                       \
        if (full > 1 && positions - p0 >= 1) { TILE(__VA_ARGS__, V, 1); p0 += 1; }                       \
        break;                                                                                           \
    }
#define GATHER_CASES(TILE, A, ...)                                                                       \
    GATHER_SPAN(TILE, A, 1, __VA_ARGS__) GATHER_SPAN(TILE, A, 2, __VA_ARGS__)                            \
    GATHER_SPAN(TILE, A, 3, __VA_ARGS__) GATHER_SPAN(TILE, A, 4, __VA_ARGS__)                            \
    GATHER_SPAN(TILE, A, 5, __VA_ARGS__) GATHER_SPAN(TILE, A, 6, __VA_ARGS__)                            \
    GATHER_SPAN(TILE, A, 7, __VA_ARGS__) GATHER_SPAN(TILE, A, 8, __VA_ARGS__)

/* vectors of the batch in the tile starting at image nb */
static inline int64_t tile_vectors(int64_t n, int64_t nb) {
    return (n - nb) / TL < GATHER_VECS ? (n - nb) / TL : GATHER_VECS;
}

/* every position and image of channel c */
static void gather_item(void *p, int64_t c) {
    const struct gather *a = (const struct gather *)p;
    const int64_t positions = a->out_h * a->out_w;
    for (int64_t nb = 0; nb < a->n; nb += GATHER_VECS * TL) {
        int64_t p0 = 0;
        switch (tile_vectors(a->n, nb)) { GATHER_CASES(gather_tile, ACC, a, c, nb, p0) }
    }
}

/* the weight gradient of channel c's entries over a tile: the output gradient's tile in registers, one dot
 * product per kept weight with the input it met (four running sums, one lane sum per entry and tile) */
static inline __attribute__((always_inline)) void gather_grad_tile(const struct gather *a, const float *grad,
                                                                   float *gw, int64_t c, int64_t nb, int64_t p0,
                                                                   const int V, const int P) {
    const int64_t positions = a->out_h * a->out_w, h = a->src_h, w = a->src_w;
    int64_t ih[P], iw[P], at[P];
    tv g[P][V];
    for (int q = 0; q < P; q++) {
        const int64_t pos = p0 + q;
        ih[q] = pos / a->out_w * a->step_h;
        iw[q] = pos % a->out_w * a->step_w;
        at[q] = (ih[q] * w + iw[q]) * a->n;
        for (int j = 0; j < V; j++)
            g[q][j] = load_tv(grad + (c * positions + pos) * a->n + nb + j * TL);
    }
    for (int64_t e = a->ptr[c]; e < a->ptr[c + 1]; e++) {
        const struct shift s = entry_shift(a, e, nb);
        tv sum[4] = {};
        for (int q = 0; q < P; q++) {
            const float *x = shifted(a->src, &s, ih[q], iw[q], at[q], h, w);
            for (int j = 0; j < V; j++) sum[(q * V + j) & 3] += g[q][j] * load_tv(x + j * TL);
        }
        gw[e] += lane_sum((sum[0] + sum[1]) + (sum[2] + sum[3]));
    }
}

struct gather_grad { struct gather a; const float *grad; float *gw; };

static void gather_grad_item(void *p, int64_t c) {
    const struct gather_grad *ga = (const struct gather_grad *)p;
    const struct gather *a = &ga->a;
    const int64_t positions = a->out_h * a->out_w;
    for (int64_t e = a->ptr[c]; e < a->ptr[c + 1]; e++) ga->gw[e] = 0.0f;
    for (int64_t nb = 0; nb < a->n; nb += GATHER_VECS * TL) {
        int64_t p0 = 0;
        switch (tile_vectors(a->n, nb)) { GATHER_CASES(gather_grad_tile, ACC, a, ga->grad, ga->gw, c, nb, p0) }
    }
}

/* the forward's gather: output channels' entries (lists by output channel) over the input x */
static struct gather forward_gather(const struct conv_geom *g, const float *x, const float *values, const float *bias,
                                    const int64_t *co_ptr, const int32_t *ci, const int16_t *kh, const int16_t *kw,
                                    float *out) {
    struct gather a = {x, g->n, g->h, g->w, g->ho, g->wo, g->sh, g->sw, g->dh, g->dw, -g->ph, -g->pw,
                       co_ptr, ci, kh, kw, values, 0, bias, out};
    return a;
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
    if (g.n % TL == 0) {
        struct gather a = forward_gather(&g, x, values, bias, co_ptr, ci, kh, kw, out);
        parallel_workers(gather_item, &a, g.cout, nthreads);
        return;
    }
    struct conv_fwd_args a = {&g, x, values, bias, co_ptr, ci, kh, kw, out};
    parallel_workers(conv_fwd_bi_item, &a, g.cout, nthreads);
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
                                   const int32_t *vidx, float *gx, int nthreads) {
    struct conv_geom g = read_geom(geom);
    if (g.n % TL == 0 && g.sh == 1 && g.sw == 1) {  /* a gather over the output gradient, entries by input channel */
        struct gather a = {grad, g.n, g.ho, g.wo, g.h, g.w, 1, 1, -g.dh, -g.dw, g.ph, g.pw,
                           ci_ptr, co, kh, kw, values, vidx, 0, gx};
        parallel_workers(gather_item, &a, g.cin, nthreads);
        return;
    }
    struct conv_bwd_in_args a = {&g, grad, values, ci_ptr, co, kh, kw, vidx, gx};
    parallel_workers(conv_bwd_in_bi_item, &a, g.cin, nthreads);
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
    if (g.n % TL == 0) {
        struct gather_grad ga = {forward_gather(&g, x, 0, 0, co_ptr, ci, kh, kw, 0), grad, gw};
        parallel_workers(gather_grad_item, &ga, g.cout, nthreads);
        return;
    }
    struct conv_bwd_w_args a = {&g, x, grad, co_ptr, ci, kh, kw, gw, 1};
    parallel_workers(conv_bwd_w_bi_item, &a, g.cout, nthreads);
}
