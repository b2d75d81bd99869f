/* Register-tiled direct sparse convolution, stride 1 and dilation 1.
 *
 * The plain direct kernels (direct_conv.c) add each kept weight's contribution to an output row in memory, so
 * every multiply-add also loads and stores the output: they run at the speed of the stores. Here a tile of the
 * output (16 vectors: several rows of a plane) stays in registers while every kept weight of its output channel
 * streams past, so a multiply-add costs one load of the input and nothing else.
 *
 * Each work item zero-pads one image into a per-thread buffer (scratch.h), then computes its output channels from
 * there, so no position needs a bounds check. A padded copy of the whole batch (F.pad) cost a fresh allocation, a
 * fill and a copy of every layer's input, about 10 ms of VGG-16's forward at batch 64 (65-80 ms), and left the image
 * each item reads in memory instead of cache.
 *
 * The same kernel computes the input gradient: for stride 1 that is the convolution of the padded output
 * gradient with the flipped kernel, listed by input channel (the caller passes kh, kw flipped and the values in
 * that order).
 *
 * Lists are by output channel: ptr[Cout + 1]; per entry the input channel, kh, kw, and its value. */
#include <string.h>

#include "kernels.h"
#include "parallel.h"
#include "scratch.h"
#include "vectors.h"


struct tiled_args {
    int64_t n, cin, h, w, ph, pw, cout, ho, wo;  /* input [N, Cin, H, W], padding, output [N, Cout, Ho, Wo] */
    int64_t hp, wp, parts;                       /* the padded plane; work items per image (threads > images) */
    const float *x; const float *values; const float *bias;
    const int64_t *ptr; const int32_t *ch; const int16_t *kh; const int16_t *kw; float *out;
    int failed;
};

static struct tiled_args tiled_read(const int64_t *dims, const float *x, const float *values, const float *bias,
                                    const int64_t *ptr, const int32_t *ch, const int16_t *kh, const int16_t *kw,
                                    float *out, int64_t parts) {
    struct tiled_args a = {dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], dims[8],
                           dims[2] + 2 * dims[4], dims[3] + 2 * dims[5], parts,
                           x, values, bias, ptr, ch, kh, kw, out, 0};
    return a;
}

/* image n of x, zero-padded, into this thread's buffer [Cin, Hp, Wp]; NULL when memory runs out */
static const float *padded_image(const struct tiled_args *a, int64_t n) {
    /* a row's last vector may read past the plane's end (lanes beyond the output's width): 4 vectors of zeros */
    const int64_t size = a->cin * a->hp * a->wp;
    float *xp = scratch_get(0, size + 4 * TL);
    if (!xp) return 0;
    memset(xp + size, 0, 4 * TL * sizeof(float));
    const float *src = a->x + n * a->cin * a->h * a->w;
    for (int64_t c = 0; c < a->cin; c++) {
        float *plane = xp + c * a->hp * a->wp;
        memset(plane, 0, a->ph * a->wp * sizeof(float));
        for (int64_t r = 0; r < a->h; r++) {
            float *row = plane + (r + a->ph) * a->wp;
            memset(row, 0, a->pw * sizeof(float));
            memcpy(row + a->pw, src + (c * a->h + r) * a->w, a->w * sizeof(float));
            memset(row + a->pw + a->w, 0, a->pw * sizeof(float));
        }
        memset(plane + (a->ph + a->h) * a->wp, 0, a->ph * a->wp * sizeof(float));
    }
    return xp;
}


/* ---- planes: output [N, Cout, Ho, Wo], a tile of R rows x V vectors (Wo = V * TL) ---- */
static inline __attribute__((always_inline)) void plane_tile(const struct tiled_args *a, const float *xn, int64_t n,
                                                             int64_t co, int64_t r0, const int V, const int R) {
    const float b0 = a->bias ? a->bias[co] : 0.0f;
    tv acc[R][V];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < V; j++) acc[r][j] = (tv){} + b0;
    const int64_t wp = a->wp, plane = a->hp * wp;
    for (int64_t e = a->ptr[co]; e < a->ptr[co + 1]; e++) {
        const float w = a->values[e];
        const float *src = xn + a->ch[e] * plane + (r0 + a->kh[e]) * wp + a->kw[e];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < V; j++) acc[r][j] += w * load_tv(src + r * wp + j * TL);
    }
    float *dst = a->out + ((n * a->cout + co) * a->ho + r0) * a->wo;
    const int64_t tail = a->wo - (V - 1) * TL;  /* lanes of the last vector inside the row */
    for (int r = 0; r < R; r++) {
        for (int j = 0; j < V - 1; j++) store_tv(dst + r * a->wo + j * TL, acc[r][j]);
        store_lanes(dst + r * a->wo + (V - 1) * TL, acc[r][V - 1], tail);
    }
}

/* Every row of a plane: whole tiles of R rows, then the rows left (fewer than R) as tiles of 8, 4, 2 and 1 rows,
 * so any height is covered with a constant tile size per call (the compiler keeps each tile in registers). */
#define EACH_ROW_TILE(TILE, V, R, ...)                                                  \
    do {                                                                                \
        int64_t r0 = 0;                                                                 \
        for (; r0 + (R) <= a->ho; r0 += (R)) TILE(__VA_ARGS__, r0, V, R);               \
        if ((R) > 8 && a->ho - r0 >= 8) { TILE(__VA_ARGS__, r0, V, 8); r0 += 8; }       \
        if ((R) > 4 && a->ho - r0 >= 4) { TILE(__VA_ARGS__, r0, V, 4); r0 += 4; }       \
        if ((R) > 2 && a->ho - r0 >= 2) { TILE(__VA_ARGS__, r0, V, 2); r0 += 2; }       \
        if ((R) > 1 && a->ho - r0 >= 1) { TILE(__VA_ARGS__, r0, V, 1); r0 += 1; }       \
    } while (0)

/* item: image item / parts, its output channels of part item % parts */
static void plane_item(void *p, int64_t item) {
    struct tiled_args *a = (struct tiled_args *)p;
    const int64_t n = item / a->parts, part = item % a->parts;
    const float *xn = padded_image(a, n);
    if (!xn) { a->failed = 1; return; }
    const int V = (int)((a->wo + TL - 1) / TL);
    for (int64_t co = a->cout * part / a->parts; co < a->cout * (part + 1) / a->parts; co++) {
        if (V == 1) EACH_ROW_TILE(plane_tile, 1, ACC, a, xn, n, co);
        else if (V == 2) EACH_ROW_TILE(plane_tile, 2, ACC / 2, a, xn, n, co);
        else if (V == 3) EACH_ROW_TILE(plane_tile, 3, ACC / 3, a, xn, n, co);
        else EACH_ROW_TILE(plane_tile, 4, ACC / 4, a, xn, n, co);
    }
}

/* ---- the weight gradient over planes: a tile of the output gradient in registers, one dot product per kept
 * weight with the shifted input tile; part t of the batch sums into partial[t] ---- */
struct tiled_grad_args { struct tiled_args a; const float *grad; float *partial; };

static inline __attribute__((always_inline)) void grad_tile(const struct tiled_args *a, const float *xn,
                                                            const float *grad, float *gw, int64_t n, int64_t co,
                                                            int64_t r0, const int V, const int R) {
    tv g[R][V];
    const float *gsrc = grad + ((n * a->cout + co) * a->ho + r0) * a->wo;
    const int64_t tail = a->wo - (V - 1) * TL;  /* lanes of the last vector inside the row; the rest count zero */
    const ti inside = lanes_below(tail);
    for (int r = 0; r < R; r++) {
        for (int j = 0; j < V - 1; j++) g[r][j] = load_tv(gsrc + r * a->wo + j * TL);
        g[r][V - 1] = load_lanes(gsrc + r * a->wo + (V - 1) * TL, tail);
    }
    const int64_t wp = a->wp, plane = a->hp * wp;
    for (int64_t e = a->ptr[co]; e < a->ptr[co + 1]; e++) {
        const float *src = xn + a->ch[e] * plane + (r0 + a->kh[e]) * wp + a->kw[e];
        tv s[4] = {};  /* four running sums: short chains of dependent multiply-adds */
        for (int r = 0; r < R; r++) {
            for (int j = 0; j < V - 1; j++) s[(r * V + j) & 3] += g[r][j] * load_tv(src + r * wp + j * TL);
            /* the input's lanes past the row masked too: an infinity there times a zero would be a NaN */
            const tv last = (tv)((ti)load_tv(src + r * wp + (V - 1) * TL) & inside);
            s[(r * V + V - 1) & 3] += g[r][V - 1] * last;
        }
        gw[e] += lane_sum((s[0] + s[1]) + (s[2] + s[3]));
    }
}

static void grad_part(void *p, int64_t t) {
    struct tiled_grad_args *ga = (struct tiled_grad_args *)p;
    struct tiled_args *a = &ga->a;
    const int64_t nnz = a->ptr[a->cout];
    float *gw = ga->partial + t * nnz;
    memset(gw, 0, nnz * sizeof(float));
    const int64_t n0 = a->n * t / a->parts, n1 = a->n * (t + 1) / a->parts;
    const int V = (int)((a->wo + TL - 1) / TL);
    for (int64_t n = n0; n < n1; n++) {
        const float *xn = padded_image(a, n);
        if (!xn) { a->failed = 1; return; }
        for (int64_t co = 0; co < a->cout; co++) {
            if (V == 1) EACH_ROW_TILE(grad_tile, 1, ACC, a, xn, ga->grad, gw, n, co);
            else if (V == 2) EACH_ROW_TILE(grad_tile, 2, ACC / 2, a, xn, ga->grad, gw, n, co);
            else if (V == 3) EACH_ROW_TILE(grad_tile, 3, ACC / 3, a, xn, ga->grad, gw, n, co);
            else EACH_ROW_TILE(grad_tile, 4, ACC / 4, a, xn, ga->grad, gw, n, co);
        }
    }
}

/* partial[parts, nnz]: the gradient of the kept weights (in list order) from the input x [N, Cin, H, W] (padded
 * here) and the output gradient grad [N, Cout, Ho, Wo], one row per part of the batch (sum them). Planes only.
 * dims as tiled_conv_forward's. Returns 0, or -1 when memory ran out. */
int tiled_conv_weight_grad(const int64_t *dims, const float *x, const float *grad, const int64_t *ptr,
                           const int32_t *ch, const int16_t *kh, const int16_t *kw, float *partial, int64_t parts,
                           int nthreads) {
    struct tiled_grad_args ga = {tiled_read(dims, x, 0, 0, ptr, ch, kh, kw, 0, parts), grad, partial};
    parallel_workers(grad_part, &ga, parts, nthreads);
    return ga.a.failed ? -1 : 0;
}

/* dims: N, Cin, H, W (the input, unpadded), padding h, w, Cout, Ho, Wo (as tiled_conv_supported allows; Ho = H +
 * 2 ph - KH + 1). Returns 0, or -1 when memory ran out. */
int tiled_conv_forward(const int64_t *dims, const float *x, const float *values, const float *bias,
                       const int64_t *ptr, const int32_t *ch, const int16_t *kh, const int16_t *kw, float *out,
                       int nthreads) {
    const int64_t n = dims[0], cout = dims[6];
    /* whole images per item where there are enough of them; else each image's channels shared out */
    int64_t parts = n >= nthreads ? 1 : (nthreads + n - 1) / n;
    if (parts > cout) parts = cout;
    struct tiled_args a = tiled_read(dims, x, values, bias, ptr, ch, kh, kw, out, parts);
    parallel_workers(plane_item, &a, n * parts, nthreads);
    return a.failed ? -1 : 0;
}

/* 1 where the kernels cover an output plane of Ho x Wo: rows of 1 to 4 vectors (TL = 8 floats with AVX2, 16 with
 * AVX-512) of which at least three quarters of the lanes are used (ResNet's 56, 28 and 14 columns with AVX-512, not
 * 7; rows of 8 run faster with the batch innermost), any number of rows. */
int tiled_conv_supported(int64_t ho, int64_t wo) {
    const int64_t v = (wo + TL - 1) / TL;
    return ho >= 1 && v >= 1 && v <= 4 && 4 * wo >= 3 * v * TL;
}



/* ---- the kept-entry lists of a weight [Cout, Cin, KH, KW] (contiguous) whose |w| reaches a threshold ----
 * SWAT's W_s moves every step (the threshold is kept for a period, the weights change), so its lists are rebuilt
 * every step: one pass counts per output channel, one fills the lists by output channel (channel, kh, kw, value),
 * and a counting sort over those gives the lists by input channel (value index into the first). */
struct count_args { const float *w; int64_t per_out; float thr; int64_t *counts; };

static void count_out(void *p, int64_t co) {
    const struct count_args *a = (const struct count_args *)p;
    const float *restrict row = a->w + co * a->per_out;
    int64_t c = 0;
    for (int64_t i = 0; i < a->per_out; i++) c += fabsf(row[i]) >= a->thr;
    a->counts[co + 1] = c;
}

/* co_ptr[Cout + 1] <- kept entries before each output channel (co_ptr[Cout] = all of them). */
void threshold_counts(const float *w, int64_t cout, int64_t per_out, float thr, int64_t *co_ptr, int nthreads) {
    struct count_args a = {w, per_out, thr, co_ptr};
    co_ptr[0] = 0;
    parallel_workers(count_out, &a, cout, nthreads);
    for (int64_t co = 0; co < cout; co++) co_ptr[co + 1] += co_ptr[co];
}

struct fill_args { const float *w; int64_t cin, khn, kwn; float thr; const int64_t *co_ptr;
                   int32_t *ci; int16_t *kh; int16_t *kw; float *values; };

static void fill_out(void *p, int64_t co) {
    const struct fill_args *a = (const struct fill_args *)p;
    const float *restrict w = a->w + co * a->cin * a->khn * a->kwn;
    int64_t e = a->co_ptr[co];
    const int64_t last = a->co_ptr[co + 1];
    /* branch-free: every weight is written at the next free slot, which only a kept one advances (the slot past
     * the channel's last entry is never written: the row's last weight stops there) */
    for (int64_t c = 0; c < a->cin; c++)
        for (int64_t h = 0; h < a->khn; h++)
            for (int64_t x = 0; x < a->kwn; x++, w++) {
                const int keep = fabsf(*w) >= a->thr;
                if (e < last) {
                    a->values[e] = *w;
                    a->ci[e] = (int32_t)c;
                    a->kh[e] = (int16_t)h;
                    a->kw[e] = (int16_t)x;
                }
                e += keep;
            }
}

/* Fill the lists of threshold_counts' entries: by output channel (ci, kh, kw, values, in weight order), then by
 * input channel (ci_ptr[Cin + 1]; co_t, kh_t, kw_t and vidx, each entry's index in the first lists). */
void threshold_lists(const float *w, int64_t cout, int64_t cin, int64_t khn, int64_t kwn, float thr,
                     const int64_t *co_ptr, int32_t *ci, int16_t *kh, int16_t *kw, float *values,
                     int64_t *ci_ptr, int32_t *co_t, int16_t *kh_t, int16_t *kw_t, int32_t *vidx, int nthreads) {
    struct fill_args a = {w, cin, khn, kwn, thr, co_ptr, ci, kh, kw, values};
    parallel_workers(fill_out, &a, cout, nthreads);
    const int64_t nnz = co_ptr[cout];
    for (int64_t c = 0; c <= cin; c++) ci_ptr[c] = 0;
    for (int64_t e = 0; e < nnz; e++) ci_ptr[ci[e] + 1]++;
    for (int64_t c = 0; c < cin; c++) ci_ptr[c + 1] += ci_ptr[c];
    int64_t *fill = ci_ptr + cin + 1;  /* scratch: the caller gives ci_ptr 2 Cin + 1 entries */
    for (int64_t c = 0; c < cin; c++) fill[c] = ci_ptr[c];
    for (int64_t co = 0; co < cout; co++)
        for (int64_t e = co_ptr[co]; e < co_ptr[co + 1]; e++) {
            const int64_t t = fill[ci[e]]++;
            co_t[t] = (int32_t)co;
            kh_t[t] = kh[e];
            kw_t[t] = kw[e];
            vidx[t] = (int32_t)e;
        }
}
