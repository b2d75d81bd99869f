/* Register-tiled direct sparse convolution, stride 1 and dilation 1, over a zero-padded input.
 *
 * The plain direct kernels (direct_conv.c) add each kept weight's contribution to an output row in memory, so
 * every multiply-add also loads and stores the output: they run at the speed of the stores. Here a tile of the
 * output (16 vectors: several rows of a plane, or several positions with the batch innermost) stays in registers
 * while every kept weight of its output channel streams past, so a multiply-add costs one load of the input and
 * nothing else. The input is zero-padded by the caller, so no position needs a bounds check.
 *
 * The same kernel computes the input gradient: for stride 1 that is the convolution of the padded output
 * gradient with the flipped kernel, listed by input channel (the caller passes kh, kw flipped and the values in
 * that order).
 *
 * Lists are by output channel: ptr[Cout + 1]; per entry the input channel, kh, kw, and its value. */
#include <string.h>

#include "parallel.h"
#include "vectors.h"


struct tiled_args {
    int64_t n, cin, hp, wp, cout, ho, wo;  /* padded input [N, Cin, Hp, Wp] (or [Cin, Hp, Wp, N]), output size */
    const float *x; const float *values; const float *bias;
    const int64_t *ptr; const int32_t *ch; const int16_t *kh; const int16_t *kw; float *out;
};


/* ---- planes: output [N, Cout, Ho, Wo], a tile of R rows x V vectors (Wo = V * TL) ---- */
static inline __attribute__((always_inline)) void plane_tile(const struct tiled_args *a, int64_t n, int64_t co,
                                                             int64_t r0, const int V, const int R) {
    const float b0 = a->bias ? a->bias[co] : 0.0f;
    tv acc[R][V];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < V; j++) acc[r][j] = (tv){} + b0;
    const int64_t wp = a->wp, plane = a->hp * wp;
    const float *xn = a->x + n * a->cin * plane;
    for (int64_t e = a->ptr[co]; e < a->ptr[co + 1]; e++) {
        const float w = a->values[e];
        const float *src = xn + a->ch[e] * plane + (r0 + a->kh[e]) * wp + a->kw[e];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < V; j++) acc[r][j] += w * load_tv(src + r * wp + j * TL);
    }
    float *dst = a->out + ((n * a->cout + co) * a->ho + r0) * a->wo;
    for (int r = 0; r < R; r++)
        for (int j = 0; j < V; j++) store_tv(dst + r * a->wo + j * TL, acc[r][j]);
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

static void plane_item(void *p, int64_t item) {
    const struct tiled_args *a = (const struct tiled_args *)p;
    const int64_t n = item / a->cout, co = item % a->cout;
    const int V = (int)(a->wo / TL);
    if (V == 1) EACH_ROW_TILE(plane_tile, 1, ACC, a, n, co);
    else if (V == 2) EACH_ROW_TILE(plane_tile, 2, ACC / 2, a, n, co);
    else EACH_ROW_TILE(plane_tile, 4, ACC / 4, a, n, co);
}

/* ---- the weight gradient over planes: a tile of the output gradient in registers, one dot product per kept
 * weight with the shifted input tile; part t of the batch sums into partial[t] ---- */
struct tiled_grad_args { struct tiled_args a; const float *grad; float *partial; int64_t parts; };

static inline __attribute__((always_inline)) void grad_tile(const struct tiled_args *a, const float *grad,
                                                            float *gw, int64_t n, int64_t co, int64_t r0,
                                                            const int V, const int R) {
    tv g[R][V];
    const float *gsrc = grad + ((n * a->cout + co) * a->ho + r0) * a->wo;
    for (int r = 0; r < R; r++)
        for (int j = 0; j < V; j++) g[r][j] = load_tv(gsrc + r * a->wo + j * TL);
    const int64_t wp = a->wp, plane = a->hp * wp;
    const float *xn = a->x + n * a->cin * plane;
    for (int64_t e = a->ptr[co]; e < a->ptr[co + 1]; e++) {
        const float *src = xn + a->ch[e] * plane + (r0 + a->kh[e]) * wp + a->kw[e];
        tv s[4] = {};  /* four running sums: short chains of dependent multiply-adds */
        for (int r = 0; r < R; r++)
            for (int j = 0; j < V; j++) s[(r * V + j) & 3] += g[r][j] * load_tv(src + r * wp + j * TL);
        gw[e] += lane_sum((s[0] + s[1]) + (s[2] + s[3]));
    }
}

static void grad_part(void *p, int64_t t) {
    const struct tiled_grad_args *ga = (const struct tiled_grad_args *)p;
    const struct tiled_args *a = &ga->a;
    const int64_t nnz = a->ptr[a->cout];
    float *gw = ga->partial + t * nnz;
    memset(gw, 0, nnz * sizeof(float));
    const int64_t n0 = a->n * t / ga->parts, n1 = a->n * (t + 1) / ga->parts;
    const int V = (int)(a->wo / TL);
    for (int64_t n = n0; n < n1; n++)
        for (int64_t co = 0; co < a->cout; co++) {
            if (V == 1) EACH_ROW_TILE(grad_tile, 1, ACC, a, ga->grad, gw, n, co);
            else if (V == 2) EACH_ROW_TILE(grad_tile, 2, ACC / 2, a, ga->grad, gw, n, co);
            else EACH_ROW_TILE(grad_tile, 4, ACC / 4, a, ga->grad, gw, n, co);
        }
}

/* partial[parts, nnz]: the gradient of the kept weights (in list order) from the padded input xp [N, Cin, Hp, Wp]
 * and the output gradient grad [N, Cout, Ho, Wo], one row per part of the batch (sum them). Planes only. */
void tiled_conv_weight_grad(const int64_t *dims, const float *xp, const float *grad, const int64_t *ptr,
                            const int32_t *ch, const int16_t *kh, const int16_t *kw, float *partial, int64_t parts,
                            int nthreads) {
    struct tiled_grad_args ga = {{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6],
                                  xp, 0, 0, ptr, ch, kh, kw, 0}, grad, partial, parts};
    parallel_workers(grad_part, &ga, parts, nthreads);
}

/* dims: N, Cin, Hp, Wp (the padded input), Cout, Ho, Wo; Ho and Wo as tiled_conv_supported allows. */
void tiled_conv_forward(const int64_t *dims, const float *x, const float *values, const float *bias,
                        const int64_t *ptr, const int32_t *ch, const int16_t *kh, const int16_t *kw, float *out,
                        int nthreads) {
    struct tiled_args a = {dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6],
                           x, values, bias, ptr, ch, kh, kw, out};
    parallel_workers(plane_item, &a, a.n * a.cout, nthreads);
}

/* 1 where the kernels cover an output plane of Ho x Wo: TL, 2 TL or 4 TL columns (TL = 8 floats with AVX2, 16 with
 * AVX-512), any number of rows. */
int tiled_conv_supported(int64_t ho, int64_t wo) {
    return ho >= 1 && (wo == TL || wo == 2 * TL || wo == 4 * TL);
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
