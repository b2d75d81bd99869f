/* Direct sparse convolution in channels-last (NHWC), float32, groups 1: forward, input gradient, kept-weight
 * gradient.
 *
 * A dense channels-last network keeps BatchNorm, ReLU, pooling and its residual adds in NHWC; the kernels of
 * direct_conv.c and tiled_conv.c read planes (NCHW), so a sparse layer there costs two whole-tensor layout copies
 * (and the memory of the copies). Here each block of B images is transposed, inside the kernel and in a buffer that
 * stays in cache, into planes with the batch innermost, zero-padded and split by stride phase:
 *
 *     xt[ci][py][px][hq][wq][b]    (input row ih = hq * sh + py - ph, column iw = wq * sw + px - pw)
 *
 * so that every kernel tap (kh, kw) of any stride and dilation reads, for output row oh, the contiguous run of
 * Wo * B floats at plane (kh*dh % sh, kw*dw % sw), row oh + kh*dh / sh, column kw*dw / sw. An output row of a
 * channel is then one vector run, and a tile of rows stays in registers while every kept weight of the channel
 * streams past (as in tiled_conv.c). Each output channel's tile is written back to NHWC with a stride of Cout.
 *
 * B (images per block) is chosen by the caller so that a row of Wo * B floats fills whole vectors; rows are padded
 * to whole vectors (the padding lanes compute values that are never written back, and hold zeros in the output
 * gradient, so they add nothing to weight gradients).
 *
 * The input gradient of a stride-1 convolution is the forward convolution of the output gradient (padded by
 * dh*(KH-1) - ph) with the flipped kernel listed by input channel; strided convolutions scatter instead.
 *
 * geom: N, Cin, H, W, Cout, Ho, Wo, stride h/w, padding h/w, dilation h/w (as direct_conv.c). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "parallel.h"
#include "scratch.h"
#include "vectors.h"


struct nhwc_geom {
    int64_t n, cin, h, w, cout, ho, wo;
    int64_t sh, sw, ph, pw, dh, dw;
    int64_t b;        /* images per block */
    int64_t hq, wq;   /* rows and columns of one stride phase of the padded input */
    int64_t row;      /* floats in a row of a phase plane: wq * b */
    int64_t plane;    /* floats in a phase plane: hq * row */
    int64_t lp;       /* an output row, wo * b floats, padded to whole vectors */
    int64_t xt_size;  /* floats of the transposed input block (with slack for the padding lanes) */
    int64_t gstride;  /* floats from one row of the output gradient's rows to the next (lp, or a padded plane's) */
};

static struct nhwc_geom nhwc_read(const int64_t *geom, int64_t block) {
    struct nhwc_geom g = {geom[0], geom[1], geom[2], geom[3], geom[4], geom[5], geom[6],
                          geom[7], geom[8], geom[9], geom[10], geom[11], geom[12], block};
    const int64_t hp = g.h + 2 * g.ph, wp = g.w + 2 * g.pw;
    g.hq = (hp + g.sh - 1) / g.sh;
    g.wq = (wp + g.sw - 1) / g.sw;
    g.row = g.wq * g.b;
    g.plane = g.hq * g.row;
    g.lp = (g.wo * g.b + TL - 1) / TL * TL;
    g.xt_size = g.cin * g.sh * g.sw * g.plane + g.lp + TL;
    g.gstride = g.lp;
    return g;
}

/* where each kept entry's tap starts in xt (entry e: input channel ci[e], tap kh[e], kw[e]) */
static int64_t *tap_offsets(const struct nhwc_geom *g, int64_t nnz, const int32_t *ci, const int16_t *kh,
                            const int16_t *kw) {
    int64_t *off = (int64_t *)malloc((nnz ? nnz : 1) * sizeof(int64_t));
    if (!off) return 0;
    for (int64_t e = 0; e < nnz; e++) {
        const int64_t th = kh[e] * g->dh, tw = kw[e] * g->dw;
        off[e] = ((ci[e] * g->sh + th % g->sh) * g->sw + tw % g->sw) * g->plane + (th / g->sh) * g->row
                 + (tw / g->sw) * g->b;
    }
    return off;
}

/* The layout changes between NHWC and the planes go a vector's width of positions at a time: where the positions lie
 * side by side in the planes (stride 1, one image a block), TL x TL blocks are transposed in registers; elsewhere
 * channel by channel, the positions' channel rows staying in L1. Element by element (every channel of one position,
 * then the next) each access to the planes landed on a line of its own: the layout changes were half of a 32 x 32
 * layer's step. */
enum { SPAN = TL };

/* the TL x TL block r transposed in place (row j, position j's TL channels, becomes row c, channel c's TL
 * positions): for each bit s of the index, the off-diagonal s x s blocks swapped, two rows a shuffle */
static inline void transpose_block(tv r[TL]) {
#pragma GCC unroll 4
    for (int s = 1; s < TL; s *= 2) {
        ti lo, hi;
        for (int k = 0; k < TL; k++) {
            lo[k] = (k & s) ? TL + k - s : k;
            hi[k] = (k & s) ? TL + k : k + s;
        }
#pragma GCC unroll 16
        for (int i = 0; i < TL; i++)
            if (!(i & s)) {
                const tv a = r[i], b = r[i + s];
                r[i] = __builtin_shuffle(a, b, lo);
                r[i + s] = __builtin_shuffle(a, b, hi);
            }
    }
}

/* plane[c * cs + at[j]] = rows[j * rs + c] for c < nc, j < nj (nj <= SPAN); whole blocks of TL channels go through
 * registers when the positions lie side by side in the planes (at[j] = at[0] + j) */
static inline void rows_to_planes(const float *restrict rows, int64_t rs, int64_t nc, int64_t nj, const int64_t *at,
                                  float *restrict plane, int64_t cs) {
    int64_t c = 0;
    if (nj == TL && at[TL - 1] == at[0] + TL - 1)
        for (; c + TL <= nc; c += TL) {
            tv r[TL];
            for (int j = 0; j < TL; j++) r[j] = load_tv(rows + j * rs + c);
            transpose_block(r);
            for (int k = 0; k < TL; k++) store_tv(plane + (c + k) * cs + at[0], r[k]);
        }
    for (; c < nc; c++) {
        float *restrict d = plane + c * cs;
        for (int64_t j = 0; j < nj; j++) d[at[j]] = rows[j * rs + c];
    }
}

/* rows[j * rs + c] = plane[c * cs + at[j]] for c < nc, j < nj (nj <= SPAN); rows_to_planes' inverse */
static inline void planes_to_rows(const float *restrict plane, int64_t cs, int64_t nc, int64_t nj, const int64_t *at,
                                  float *restrict rows, int64_t rs) {
    int64_t c = 0;
    if (nj == TL && at[TL - 1] == at[0] + TL - 1)
        for (; c + TL <= nc; c += TL) {
            tv r[TL];
            for (int k = 0; k < TL; k++) r[k] = load_tv(plane + (c + k) * cs + at[0]);
            transpose_block(r);
            for (int j = 0; j < TL; j++) store_tv(rows + j * rs + c, r[j]);
        }
    for (; c < nc; c++) {
        const float *restrict s = plane + c * cs;
        for (int64_t j = 0; j < nj; j++) rows[j * rs + c] = s[at[j]];
    }
}

/* block k of the NHWC input x into xt: zero-padded, split by stride phase, batch innermost (missing images zero) */
static void transpose_in(const struct nhwc_geom *g, const float *x, int64_t k, float *xt) {
    memset(xt, 0, g->xt_size * sizeof(float));
    const int64_t n0 = k * g->b, nb = g->n - n0 < g->b ? g->n - n0 : g->b;
    const int64_t cstride = g->sh * g->sw * g->plane;
    int64_t at[SPAN];
    for (int64_t b = 0; b < nb; b++)
        for (int64_t ih = 0; ih < g->h; ih++) {
            const int64_t hp = ih + g->ph;
            for (int64_t iw0 = 0; iw0 < g->w; iw0 += SPAN) {
                const int64_t nj = g->w - iw0 < SPAN ? g->w - iw0 : SPAN;
                for (int64_t j = 0; j < nj; j++) {
                    const int64_t wp = iw0 + j + g->pw;
                    at[j] = ((hp % g->sh) * g->sw + wp % g->sw) * g->plane + (hp / g->sh) * g->row + (wp / g->sw) * g->b + b;
                }
                rows_to_planes(x + (((n0 + b) * g->h + ih) * g->w + iw0) * g->cin, g->cin, g->cin, nj, at, xt, cstride);
            }
        }
}

/* between block k of an NHWC tensor [N, Ho, Wo, Cout] and rows [Cout][Ho][Lp] (lane ow * B + b): the forward's
 * output back to NHWC (to_nhwc), or the output gradient into rows (its padding lanes left as they are) */
static void output_rows(const struct nhwc_geom *g, int64_t k, const float *from, float *to, int to_nhwc) {
    const int64_t n0 = k * g->b, nb = g->n - n0 < g->b ? g->n - n0 : g->b, cs = g->ho * g->lp;
    int64_t at[SPAN];
    for (int64_t b = 0; b < nb; b++)
        for (int64_t oh = 0; oh < g->ho; oh++)
            for (int64_t ow0 = 0; ow0 < g->wo; ow0 += SPAN) {
                const int64_t nj = g->wo - ow0 < SPAN ? g->wo - ow0 : SPAN, pos = ((n0 + b) * g->ho + oh) * g->wo + ow0;
                for (int64_t j = 0; j < nj; j++) at[j] = oh * g->lp + (ow0 + j) * g->b + b;
                if (to_nhwc) planes_to_rows(from, cs, g->cout, nj, at, to + pos * g->cout, g->cout);
                else rows_to_planes(from + pos * g->cout, g->cout, g->cout, nj, at, to, cs);
            }
}

/* ---- forward: a tile of R rows x C vectors of output channel co in registers ---- */
static inline __attribute__((always_inline)) void fwd_tile(const struct nhwc_geom *g, const float *xt,
                                                           const float *values, const int64_t *off, int64_t e0,
                                                           int64_t e1, float b0, float *obuf, int64_t c0, int64_t r0,
                                                           const int C, const int R) {
    tv acc[R][C];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < C; j++) acc[r][j] = (tv){} + b0;
    const int64_t row = g->row;
    const float *base = xt + r0 * row + c0 * TL;
    for (int64_t e = e0; e < e1; e++) {
        const float w = values[e];
        const float *src = base + off[e];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < C; j++) acc[r][j] += w * load_tv(src + r * row + j * TL);
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < C; j++) store_tv(obuf + (r0 + r) * g->lp + (c0 + j) * TL, acc[r][j]);
}

/* every row of the output, tiles of R rows then 8, 4, 2, 1 (constant tile sizes keep each tile in registers) */
#define NHWC_EACH_ROW(TILE, C, R, ...)                                                  \
    do {                                                                                \
        int64_t r0 = 0;                                                                 \
        for (; r0 + (R) <= g->ho; r0 += (R)) TILE(__VA_ARGS__, r0, C, R);               \
        if ((R) > 8 && g->ho - r0 >= 8) { TILE(__VA_ARGS__, r0, C, 8); r0 += 8; }       \
        if ((R) > 4 && g->ho - r0 >= 4) { TILE(__VA_ARGS__, r0, C, 4); r0 += 4; }       \
        if ((R) > 2 && g->ho - r0 >= 2) { TILE(__VA_ARGS__, r0, C, 2); r0 += 2; }       \
        if ((R) > 1 && g->ho - r0 >= 1) { TILE(__VA_ARGS__, r0, C, 1); r0 += 1; }       \
    } while (0)

/* every column chunk (of up to 4 vectors) of every row */
#define NHWC_EACH_TILE(TILE, ...)                                                        \
    do {                                                                                 \
        const int64_t nvec = g->lp / TL;                                                 \
        int64_t c0 = 0;                                                                  \
        for (; c0 + 4 <= nvec; c0 += 4) NHWC_EACH_ROW(TILE, 4, ACC / 4, __VA_ARGS__, c0); \
        if (nvec - c0 == 3) NHWC_EACH_ROW(TILE, 3, ACC / 4, __VA_ARGS__, c0);           \
        else if (nvec - c0 == 2) NHWC_EACH_ROW(TILE, 2, ACC / 2, __VA_ARGS__, c0);      \
        else if (nvec - c0 == 1) NHWC_EACH_ROW(TILE, 1, ACC, __VA_ARGS__, c0);          \
    } while (0)

struct nhwc_fwd_args {
    const struct nhwc_geom *g; const float *x; const float *values; const float *bias; const int64_t *ptr;
    const int64_t *off; float *out; int failed;
};

/* the output rows [Cout][Ho][Lp] of a block from its input planes xt */
static void fwd_planes(const struct nhwc_geom *g, const float *xt, const float *values, const float *bias,
                       const int64_t *ptr, const int64_t *off, float *obuf) {
    for (int64_t co = 0; co < g->cout; co++) {
        const float b0 = bias ? bias[co] : 0.0f;
        const int64_t e0 = ptr[co], e1 = ptr[co + 1];
        float *oco = obuf + co * g->ho * g->lp;
        NHWC_EACH_TILE(fwd_tile, g, xt, values, off, e0, e1, b0, oco);
    }
}

static void fwd_block(void *p, int64_t k) {
    struct nhwc_fwd_args *a = (struct nhwc_fwd_args *)p;
    const struct nhwc_geom *g = a->g;
    float *xt = scratch_get(0, g->xt_size), *obuf = scratch_get(1, g->cout * g->ho * g->lp);
    if (!xt || !obuf) { a->failed = 1; return; }
    transpose_in(g, a->x, k, xt);
    fwd_planes(g, xt, a->values, a->bias, a->ptr, a->off, obuf);
    output_rows(g, k, obuf, a->out, 1);  /* back to NHWC: position (oh, ow) of image b is lane ow * B + b of row oh */
}

/* out[N, Ho, Wo, Cout] (NHWC) <- the convolution of x[N, H, W, Cin] with the kept entries listed by output channel
 * (ptr[Cout + 1]; ci, kh, kw; values). Returns 0, or -1 when memory ran out. */
int nhwc_conv_forward(const int64_t *geom, const float *x, const float *values, const float *bias,
                      const int64_t *ptr, const int32_t *ci, const int16_t *kh, const int16_t *kw, float *out,
                      int64_t block, int nthreads) {
    const struct nhwc_geom g = nhwc_read(geom, block);
    int64_t *off = tap_offsets(&g, ptr[g.cout], ci, kh, kw);
    if (!off) return -1;
    struct nhwc_fwd_args a = {&g, x, values, bias, ptr, off, out, 0};
    parallel_workers(fwd_block, &a, (g.n + g.b - 1) / g.b, nthreads);
    free(off);
    return a.failed ? -1 : 0;
}

/* ---- weight gradient: a tile of the transposed output gradient in registers, a dot product per kept entry ---- */
static inline __attribute__((always_inline)) void wgrad_tile(const struct nhwc_geom *g, const float *xt,
                                                             const float *gt, const int64_t *off, int64_t e0,
                                                             int64_t e1, float *gw, int64_t c0, int64_t r0,
                                                             const int C, const int R) {
    tv gv[R][C];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < C; j++) gv[r][j] = load_tv(gt + (r0 + r) * g->gstride + (c0 + j) * TL);
    const int64_t row = g->row;
    const float *base = xt + r0 * row + c0 * TL;
    for (int64_t e = e0; e < e1; e++) {
        const float *src = base + off[e];
        tv s[4] = {};
        for (int r = 0; r < R; r++)
            for (int j = 0; j < C; j++) s[(r * C + j) & 3] += gv[r][j] * load_tv(src + r * row + j * TL);
        gw[e] += lane_sum((s[0] + s[1]) + (s[2] + s[3]));
    }
}

/* block k of the NHWC output gradient as rows [Cout][Ho][Lp] (lane ow * B + b), padding lanes zero */
static void transpose_grad(const struct nhwc_geom *g, const float *grad, int64_t k, float *gt) {
    memset(gt, 0, g->cout * g->ho * g->lp * sizeof(float));
    output_rows(g, k, grad, gt, 0);
}

/* gw[e] += the block's part of kept entry e's gradient, from the input planes xt and the output gradient's rows
 * (channel co's at gt + co * cs, a row every g->gstride floats) */
static void wgrad_planes(const struct nhwc_geom *g, const float *xt, const float *gt, int64_t cs, const int64_t *ptr,
                         const int64_t *off, float *gw) {
    for (int64_t co = 0; co < g->cout; co++) {
        const int64_t e0 = ptr[co], e1 = ptr[co + 1];
        const float *gco = gt + co * cs;
        NHWC_EACH_TILE(wgrad_tile, g, xt, gco, off, e0, e1, gw);
    }
}

struct nhwc_wgrad_args {
    const struct nhwc_geom *g; const float *x; const float *grad; const int64_t *ptr; const int64_t *off;
    float *partial; int64_t parts; int failed;
};

static void wgrad_part(void *p, int64_t t) {
    struct nhwc_wgrad_args *a = (struct nhwc_wgrad_args *)p;
    const struct nhwc_geom *g = a->g;
    const int64_t nnz = a->ptr[g->cout], blocks = (g->n + g->b - 1) / g->b;
    float *gw = a->partial + t * nnz;
    memset(gw, 0, nnz * sizeof(float));
    float *xt = scratch_get(0, g->xt_size), *gt = scratch_get(2, g->cout * g->ho * g->lp);
    if (!xt || !gt) { a->failed = 1; return; }
    for (int64_t k = blocks * t / a->parts; k < blocks * (t + 1) / a->parts; k++) {
        transpose_in(g, a->x, k, xt);
        transpose_grad(g, a->grad, k, gt);
        wgrad_planes(g, xt, gt, g->ho * g->lp, a->ptr, a->off, gw);
    }
}

/* partial[parts, nnz] <- the gradient of the kept entries (in list order), one row per part of the batch (sum them),
 * from x[N, H, W, Cin] and grad[N, Ho, Wo, Cout]. Returns 0, or -1 when memory ran out. */
int nhwc_conv_weight_grad(const int64_t *geom, const float *x, const float *grad, const int64_t *ptr,
                          const int32_t *ci, const int16_t *kh, const int16_t *kw, float *partial, int64_t parts,
                          int64_t block, int nthreads) {
    const struct nhwc_geom g = nhwc_read(geom, block);
    int64_t *off = tap_offsets(&g, ptr[g.cout], ci, kh, kw);
    if (!off) return -1;
    struct nhwc_wgrad_args a = {&g, x, grad, ptr, off, partial, parts, 0};
    parallel_workers(wgrad_part, &a, parts, nthreads);
    free(off);
    return a.failed ? -1 : 0;
}

/* ---- input gradient of a strided convolution: each kept entry scatters the output gradient into the padded input
 * positions it read, one input channel at a time (stride-1 convolutions take the forward kernel instead) ---- */
struct nhwc_scatter_args {
    const struct nhwc_geom *g; const float *grad; const float *values; const int64_t *ptr; const int32_t *co;
    const int16_t *kh; const int16_t *kw; const int32_t *vidx; float *gx; int failed;
};

static void scatter_block(void *p, int64_t k) {
    struct nhwc_scatter_args *a = (struct nhwc_scatter_args *)p;
    const struct nhwc_geom *g = a->g;
    const int64_t hp = g->h + 2 * g->ph, wp = g->w + 2 * g->pw, B = g->b;
    float *gt = scratch_get(2, g->cout * g->ho * g->lp), *acc = scratch_get(1, hp * wp * B);
    if (!gt || !acc) { a->failed = 1; return; }
    transpose_grad(g, a->grad, k, gt);
    const int64_t n0 = k * B, nb = g->n - n0 < B ? g->n - n0 : B;
    for (int64_t c = 0; c < g->cin; c++) {
        memset(acc, 0, hp * wp * B * sizeof(float));
        for (int64_t e = a->ptr[c]; e < a->ptr[c + 1]; e++) {
            const float w = a->values[a->vidx[e]];
            const float *gco = gt + a->co[e] * g->ho * g->lp;
            const int64_t th = a->kh[e] * g->dh, tw = a->kw[e] * g->dw;
            for (int64_t oh = 0; oh < g->ho; oh++) {
                float *restrict dst = acc + ((oh * g->sh + th) * wp + tw) * B;
                const float *restrict src = gco + oh * g->lp;
                for (int64_t ow = 0; ow < g->wo; ow++)
                    for (int64_t b = 0; b < B; b++) dst[ow * g->sw * B + b] += w * src[ow * B + b];
            }
        }
        for (int64_t b = 0; b < nb; b++)
            for (int64_t ih = 0; ih < g->h; ih++) {
                const float *restrict src = acc + ((ih + g->ph) * wp + g->pw) * B + b;
                float *restrict dst = a->gx + (((n0 + b) * g->h + ih) * g->w) * g->cin + c;
                for (int64_t iw = 0; iw < g->w; iw++) dst[iw * g->cin] = src[iw * B];
            }
    }
}

/* gx[N, H, W, Cin] <- the input gradient from grad[N, Ho, Wo, Cout], the kept entries listed by input channel
 * (ptr[Cin + 1]; co, kh, kw, value index). Any stride. Returns 0, or -1 when memory ran out. */
int nhwc_conv_input_grad_scatter(const int64_t *geom, const float *grad, const float *values, const int64_t *ptr,
                                 const int32_t *co, const int16_t *kh, const int16_t *kw, const int32_t *vidx,
                                 float *gx, int64_t block, int nthreads) {
    const struct nhwc_geom g = nhwc_read(geom, block);
    struct nhwc_scatter_args a = {&g, grad, values, ptr, co, kh, kw, vidx, gx, 0};
    parallel_workers(scatter_block, &a, (g.n + g.b - 1) / g.b, nthreads);
    return a.failed ? -1 : 0;
}

/* ---- both gradients of a stride-1 convolution in one pass over the blocks ----
 * Separately, the input gradient (the flipped kernel's forward) lays the output gradient into padded planes and the
 * weight gradient lays it into rows again: on VGG-16's layers that second layout change was a tenth of the two
 * gradients' time. Here each block's output gradient is laid out once, into the padded planes of the flipped
 * forward (geometry gb: the output gradient as its input), and the weight gradient reads its interior: row oh of
 * channel co at plane co, row oh + pad_h, lane pad_w * B (the rows' padding lanes past Wo * B read the zeros of
 * the right-hand padding, so they must fit in it: Lp - Wo * B <= pad_w * B, checked below). */
struct nhwc_both_args {
    const struct nhwc_geom *g, *gb; const float *x, *grad, *fvalues; const int64_t *ptr, *off, *fptr, *foff;
    float *gx, *partial; int64_t parts; int failed;
};

static void both_part(void *p, int64_t t) {
    struct nhwc_both_args *a = (struct nhwc_both_args *)p;
    const struct nhwc_geom *g = a->g, *gb = a->gb;
    const int64_t nnz = a->ptr[g->cout], blocks = (g->n + g->b - 1) / g->b;
    float *gw = a->partial + t * nnz;
    memset(gw, 0, nnz * sizeof(float));
    float *xt = scratch_get(0, g->xt_size), *gp = scratch_get(2, gb->xt_size);
    float *obuf = scratch_get(1, gb->cout * gb->ho * gb->lp);
    if (!xt || !gp || !obuf) { a->failed = 1; return; }
    const float *interior = gp + gb->ph * gb->row + gb->pw * g->b;
    for (int64_t k = blocks * t / a->parts; k < blocks * (t + 1) / a->parts; k++) {
        transpose_in(gb, a->grad, k, gp);
        fwd_planes(gb, gp, a->fvalues, 0, a->fptr, a->foff, obuf);
        output_rows(gb, k, obuf, a->gx, 1);
        transpose_in(g, a->x, k, xt);
        wgrad_planes(g, xt, interior, gb->plane, a->ptr, a->off, gw);
    }
}

/* gx[N, H, W, Cin] and partial[parts, nnz] (the kept entries' gradient in by-output order, a row per part of the
 * batch: sum them) from x[N, H, W, Cin] and grad[N, Ho, Wo, Cout] of a stride-1 convolution (geom); back is the
 * flipped forward's geometry (N, Cout, Ho, Wo, Cin, H, W, 1, 1, pad_h, pad_w, dilation), its lists by input channel
 * (fptr, co, flipped taps) with their values fvalues. Returns 0, -1 when memory ran out, -2 when the output
 * gradient's row padding does not fit (use the two kernels). */
int nhwc_conv_backward(const int64_t *geom, const int64_t *back, const float *x, const float *grad,
                       const int64_t *ptr, const int32_t *ci, const int16_t *kh, const int16_t *kw,
                       const float *fvalues, const int64_t *fptr, const int32_t *co, const int16_t *fkh,
                       const int16_t *fkw, float *gx, float *partial, int64_t parts, int64_t block, int nthreads) {
    struct nhwc_geom g = nhwc_read(geom, block);
    const struct nhwc_geom gb = nhwc_read(back, block);
    if (g.sh != 1 || g.sw != 1 || g.lp - g.wo * g.b > gb.pw * g.b) return -2;
    g.gstride = gb.row;
    int64_t *off = tap_offsets(&g, ptr[g.cout], ci, kh, kw), *foff = tap_offsets(&gb, fptr[gb.cout], co, fkh, fkw);
    int rc = -1;
    if (off && foff) {
        struct nhwc_both_args a = {&g, &gb, x, grad, fvalues, ptr, off, fptr, foff, gx, partial, parts, 0};
        parallel_workers(both_part, &a, parts, nthreads);
        rc = a.failed ? -1 : 0;
    }
    free(off);
    free(foff);
    return rc;
}

/* the vector width in floats (the caller picks blocks of images whose output rows fill whole vectors) */
int nhwc_lanes(void) { return TL; }

/* the vectors a tile of the float32 kernels holds in registers (the caller fills it where blocks allow) */
int nhwc_accumulators(void) { return ACC; }

/* ---- bfloat16 (under CPU autocast) ----
 * x, the output and the output gradient are bfloat16 NHWC; the planes hold bfloat16, so every kept entry reads half
 * the bytes; the kept weights are rounded to bfloat16 once a call (as autocast rounds a dense convolution's weight),
 * every sum is float32, and so is the kept weights' gradient. Output rows are padded to 2 x TL lanes
 * (nhwc_lanes_bf16), so a tile holds an even count of vectors: two entries of a channel are paired, their inputs'
 * 32 lanes unpacked into the pairs one vdpbf16ps multiplies (bf16.h), and the lanes' order is restored when the tile
 * is stored. The weight gradient pairs neighbouring lanes, its reduction's own order. The input gradient of a
 * stride-1 convolution is this forward over the output gradient; strided ones compute in float32. */
#if defined(__AVX512F__)  /* (TL == 16) */
#include "bf16.h"

int nhwc_lanes_bf16(void) { return 2 * TL; }

/* the bfloat16 kernels take stride 1 and blocks of B images with TL a multiple of B */
static int nhwc16_takes(const struct nhwc_geom *g) { return g->sh == 1 && g->sw == 1 && g->b > 0 && TL % g->b == 0; }

static struct nhwc_geom nhwc_read16(const int64_t *geom, int64_t block) {
    struct nhwc_geom g = nhwc_read(geom, block);
    g.lp = (g.wo * g.b + 2 * TL - 1) / (2 * TL) * (2 * TL);
    g.xt_size = g.cin * g.sh * g.sw * g.plane + g.lp + 2 * TL;
    return g;
}

/* The layout changes in bfloat16 go TL positions at a time, taken from several images: position p's channels at
 * src[p], its lane in the planes at0 + p (contiguous); with a block of B > 1 images the positions of one image lie B
 * lanes apart, so these gather TL lanes of B images where rows_to_planes would go element by element. Blocks are
 * widened, transposed as float32 and narrowed back (exactly) */
static inline void gather_to_planes16(const bf16 *const src[TL], int64_t nc, bf16 *restrict plane, int64_t cs) {
    int64_t c = 0;
    for (; c + TL <= nc; c += TL) {
        tv r[TL];
        for (int p = 0; p < TL; p++) r[p] = (tv)widen16(_mm256_loadu_si256((const __m256i *)(src[p] + c)));
        transpose_block(r);
        for (int k = 0; k < TL; k++) _mm256_storeu_si256((__m256i *)(plane + (c + k) * cs), narrow_exact16((__m512)r[k]));
    }
    for (; c < nc; c++)
        for (int p = 0; p < TL; p++) plane[c * cs + p] = src[p][c];
}

/* float32 planes (TL contiguous lanes) to the bfloat16 channels of TL positions at dst[p], rounded */
static inline void planes_to_scatter16(const float *restrict plane, int64_t cs, int64_t nc, bf16 *const dst[TL]) {
    int64_t c = 0;
    for (; c + TL <= nc; c += TL) {
        tv r[TL];
        for (int k = 0; k < TL; k++) r[k] = load_tv(plane + (c + k) * cs);
        transpose_block(r);
        for (int p = 0; p < TL; p++) _mm256_storeu_si256((__m256i *)(dst[p] + c), narrow16((__m512)r[p]));
    }
    for (; c < nc; c++)
        for (int p = 0; p < TL; p++) dst[p][c] = round_bf16(plane[c * cs + p]);
}

/* transpose_in in bfloat16, stride 1 (the only stride the bfloat16 kernels take) and TL a multiple of B: the planes'
 * rows lane by lane (lane l: column l / B, image l % B), TL lanes at a time where all are real positions, through
 * gather_to_planes16; the rest element by element */
static void transpose_in16(const struct nhwc_geom *g, const bf16 *x, int64_t k, bf16 *xt) {
    memset(xt, 0, g->xt_size * sizeof(bf16));
    const int64_t n0 = k * g->b, nb = g->n - n0 < g->b ? g->n - n0 : g->b;
    const int64_t B = g->b, first = g->pw * B, end = (g->pw + g->w) * B;
    const bf16 *src[TL];
    for (int64_t ih = 0; ih < g->h; ih++) {
        bf16 *prow = xt + (ih + g->ph) * g->row;
        for (int64_t l0 = first; l0 < end; l0 += TL) {
            const int64_t nl = end - l0 < TL ? end - l0 : TL;
            int whole = nl == TL;
            for (int64_t p = 0; p < nl; p++) {
                const int64_t l = l0 + p, b = l % B;
                whole &= b < nb;
                src[p] = b < nb ? x + (((n0 + b) * g->h + ih) * g->w + l / B - g->pw) * g->cin : 0;
            }
            if (whole) {
                gather_to_planes16(src, g->cin, prow + l0, g->plane);
                continue;
            }
            for (int64_t p = 0; p < nl; p++)
                if (src[p])
                    for (int64_t c = 0; c < g->cin; c++) prow[c * g->plane + l0 + p] = src[p][c];
        }
    }
}

/* output_rows in bfloat16: float32 rows to the bfloat16 NHWC output (to_nhwc), or the bfloat16 NHWC output
 * gradient into bfloat16 rows; lane l of a row is column l / B of image l % B, TL lanes at a time where all are real
 * positions (the rows' lanes are contiguous: no element-by-element copies for blocks of several images) */
static void output_rows16(const struct nhwc_geom *g, int64_t k, const void *from, void *to, int to_nhwc) {
    const int64_t n0 = k * g->b, nb = g->n - n0 < g->b ? g->n - n0 : g->b, cs = g->ho * g->lp, B = g->b;
    bf16 *pos[TL];
    for (int64_t oh = 0; oh < g->ho; oh++)
        for (int64_t l0 = 0; l0 < g->wo * B; l0 += TL) {
            const int64_t nl = g->wo * B - l0 < TL ? g->wo * B - l0 : TL;
            int whole = nl == TL;
            for (int64_t p = 0; p < nl; p++) {
                const int64_t l = l0 + p, b = l % B;
                whole &= b < nb;
                bf16 *nhwc = (bf16 *)(to_nhwc ? to : from);
                pos[p] = b < nb ? nhwc + (((n0 + b) * g->ho + oh) * g->wo + l / B) * g->cout : 0;
            }
            const int64_t at = oh * g->lp + l0;
            if (whole && to_nhwc) planes_to_scatter16((const float *)from + at, cs, g->cout, pos);
            else if (whole) gather_to_planes16((const bf16 *const *)pos, g->cout, (bf16 *)to + at, cs);
            else
                for (int64_t p = 0; p < nl; p++)
                    for (int64_t c = 0; pos[p] && c < g->cout; c++) {
                        if (to_nhwc) pos[p][c] = round_bf16(((const float *)from)[c * cs + at + p]);
                        else ((bf16 *)to)[c * cs + at + p] = pos[p][c];
                    }
        }
}

/* every column chunk (4 or 2 vectors: rows are whole pairs of vectors) of every row */
#define NHWC_EACH_TILE16(TILE, ...)                                                        \
    do {                                                                                   \
        const int64_t nvec = g->lp / TL;                                                   \
        int64_t c0 = 0;                                                                    \
        for (; c0 + 4 <= nvec; c0 += 4) NHWC_EACH_ROW(TILE, 4, ACC / 4, __VA_ARGS__, c0);   \
        if (nvec - c0 == 2) NHWC_EACH_ROW(TILE, 2, ACC / 2, __VA_ARGS__, c0);              \
    } while (0)

/* fwd_tile in bfloat16: vectors 2h and 2h + 1 of a row sum the low and the high unpacks of its lanes 32h .. 32h + 31
 * (s1 null: the odd last entry, paired with zeros) */
static inline __attribute__((always_inline)) void pair_tile(__m512 *acc, __m512i w, const bf16 *s0, const bf16 *s1,
                                                            int64_t row, const int C, const int R) {
    for (int r = 0; r < R; r++)
        for (int h = 0; h < C / 2; h++) {
            const __m512i a = _mm512_loadu_si512(s0 + r * row + h * 2 * TL);
            const __m512i b = s1 ? _mm512_loadu_si512(s1 + r * row + h * 2 * TL) : _mm512_setzero_si512();
            acc[r * C + 2 * h] = dot2(acc[r * C + 2 * h], _mm512_unpacklo_epi16(a, b), w);
            acc[r * C + 2 * h + 1] = dot2(acc[r * C + 2 * h + 1], _mm512_unpackhi_epi16(a, b), w);
        }
}

static inline __attribute__((always_inline)) void fwd_tile16(const struct nhwc_geom *g, const bf16 *xt,
                                                             const bf16 *w16, const int64_t *off, int64_t e0,
                                                             int64_t e1, float b0, float *obuf, int64_t c0, int64_t r0,
                                                             const int C, const int R) {
    __m512 acc[R * C];
    for (int i = 0; i < R * C; i++) acc[i] = _mm512_setzero_ps();
    const bf16 *base = xt + r0 * g->row + c0 * TL;
    int64_t e = e0;
    for (; e + 2 <= e1; e += 2) pair_tile(acc, weight_pair(w16[e], w16[e + 1]), base + off[e], base + off[e + 1], g->row, C, R);
    if (e < e1) pair_tile(acc, weight_pair(w16[e], 0), base + off[e], 0, g->row, C, R);
    const __m512 b = _mm512_set1_ps(b0);
    for (int r = 0; r < R; r++)
        for (int h = 0; h < C / 2; h++) {
            __m512 first, second;
            unpermute_pairs(acc[r * C + 2 * h], acc[r * C + 2 * h + 1], &first, &second);
            float *o = obuf + (r0 + r) * g->lp + (c0 + 2 * h) * TL;
            store_tv(o, (tv)_mm512_add_ps(first, b));
            store_tv(o + TL, (tv)_mm512_add_ps(second, b));
        }
}

struct nhwc16_args {
    const struct nhwc_geom *g; const bf16 *x, *grad, *w16; const float *bias; const int64_t *ptr, *off;
    bf16 *out; float *partial; int64_t parts; int failed;
};

static void fwd_block16(void *p, int64_t k) {
    struct nhwc16_args *a = (struct nhwc16_args *)p;
    const struct nhwc_geom *g = a->g;
    bf16 *xt = (bf16 *)scratch_get(0, g->xt_size);  /* (float-sized buffers: half of each used) */
    float *obuf = scratch_get(1, g->cout * g->ho * g->lp);
    if (!xt || !obuf) { a->failed = 1; return; }
    transpose_in16(g, a->x, k, xt);
    for (int64_t co = 0; co < g->cout; co++) {
        const float b0 = a->bias ? a->bias[co] : 0.0f;
        float *oco = obuf + co * g->ho * g->lp;
        NHWC_EACH_TILE16(fwd_tile16, g, xt, a->w16, a->off, a->ptr[co], a->ptr[co + 1], b0, oco);
    }
    output_rows16(g, k, obuf, a->out, 1);
}

/* nhwc_conv_forward with x and out bfloat16 (values, bias float32), stride 1. Returns 0, -1 when memory ran out, or
 * -2 for a geometry these kernels do not take. */
int nhwc_conv_forward_bf16(const int64_t *geom, const void *x, const float *values, const float *bias,
                           const int64_t *ptr, const int32_t *ci, const int16_t *kh, const int16_t *kw, void *out,
                           int64_t block, int nthreads) {
    const struct nhwc_geom g = nhwc_read16(geom, block);
    if (!nhwc16_takes(&g)) return -2;
    int64_t *off = tap_offsets(&g, ptr[g.cout], ci, kh, kw);
    bf16 *w16 = rounded_bf16(values, ptr[g.cout]);
    struct nhwc16_args a = {&g, (const bf16 *)x, 0, w16, bias, ptr, off, (bf16 *)out, 0, 0, 0};
    if (off && w16) parallel_workers(fwd_block16, &a, (g.n + g.b - 1) / g.b, nthreads);
    free(off);
    free(w16);
    return !off || !w16 || a.failed ? -1 : 0;
}

/* wgrad_tile in bfloat16: the output gradient's pairs of neighbouring lanes against the input's */
static inline __attribute__((always_inline)) void wgrad_tile16(const struct nhwc_geom *g, const bf16 *xt,
                                                               const bf16 *gt, const int64_t *off, int64_t e0,
                                                               int64_t e1, float *gw, int64_t c0, int64_t r0,
                                                               const int C, const int R) {
    __m512i gv[R * C / 2];
    for (int r = 0; r < R; r++)
        for (int h = 0; h < C / 2; h++) gv[r * C / 2 + h] = _mm512_loadu_si512(gt + (r0 + r) * g->lp + (c0 + 2 * h) * TL);
    const bf16 *base = xt + r0 * g->row + c0 * TL;
    for (int64_t e = e0; e < e1; e++) {
        const bf16 *src = base + off[e];
        __m512 s[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int r = 0; r < R; r++)
            for (int h = 0; h < C / 2; h++)
                s[h & 1] = dot2(s[h & 1], gv[r * C / 2 + h], _mm512_loadu_si512(src + r * g->row + h * 2 * TL));
        gw[e] += _mm512_reduce_add_ps(_mm512_add_ps(s[0], s[1]));
    }
}

static void wgrad_part16(void *p, int64_t t) {
    struct nhwc16_args *a = (struct nhwc16_args *)p;
    const struct nhwc_geom *g = a->g;
    const int64_t nnz = a->ptr[g->cout], blocks = (g->n + g->b - 1) / g->b;
    float *gw = a->partial + t * nnz;
    memset(gw, 0, nnz * sizeof(float));
    bf16 *xt = (bf16 *)scratch_get(0, g->xt_size), *gt = (bf16 *)scratch_get(2, g->cout * g->ho * g->lp);
    if (!xt || !gt) { a->failed = 1; return; }
    for (int64_t k = blocks * t / a->parts; k < blocks * (t + 1) / a->parts; k++) {
        transpose_in16(g, a->x, k, xt);
        memset(gt, 0, g->cout * g->ho * g->lp * sizeof(bf16));
        output_rows16(g, k, a->grad, gt, 0);
        for (int64_t co = 0; co < g->cout; co++) {
            const bf16 *gco = gt + co * g->ho * g->lp;
            NHWC_EACH_TILE16(wgrad_tile16, g, xt, gco, a->off, a->ptr[co], a->ptr[co + 1], gw);
        }
    }
}

/* nhwc_conv_weight_grad with x and grad bfloat16 (partial float32), stride 1. Returns 0, -1 when memory ran out, or
 * -2 for a geometry these kernels do not take. */
int nhwc_conv_weight_grad_bf16(const int64_t *geom, const void *x, const void *grad, const int64_t *ptr,
                               const int32_t *ci, const int16_t *kh, const int16_t *kw, float *partial, int64_t parts,
                               int64_t block, int nthreads) {
    const struct nhwc_geom g = nhwc_read16(geom, block);
    if (!nhwc16_takes(&g)) return -2;
    int64_t *off = tap_offsets(&g, ptr[g.cout], ci, kh, kw);
    if (!off) return -1;
    struct nhwc16_args a = {&g, (const bf16 *)x, (const bf16 *)grad, 0, 0, ptr, off, 0, partial, parts, 0};
    parallel_workers(wgrad_part16, &a, parts, nthreads);
    free(off);
    return a.failed ? -1 : 0;
}
#else
int nhwc_lanes_bf16(void) { return 0; }  /* no bfloat16 kernels in this build */

int nhwc_conv_forward_bf16(const int64_t *geom, const void *x, const float *values, const float *bias,
                           const int64_t *ptr, const int32_t *ci, const int16_t *kh, const int16_t *kw, void *out,
                           int64_t block, int nthreads) {
    (void)geom, (void)x, (void)values, (void)bias, (void)ptr, (void)ci, (void)kh, (void)kw, (void)out, (void)block;
    (void)nthreads;
    return -2;
}

int nhwc_conv_weight_grad_bf16(const int64_t *geom, const void *x, const void *grad, const int64_t *ptr,
                               const int32_t *ci, const int16_t *kh, const int16_t *kw, float *partial, int64_t parts,
                               int64_t block, int nthreads) {
    (void)geom, (void)x, (void)grad, (void)ptr, (void)ci, (void)kh, (void)kw, (void)partial, (void)parts, (void)block;
    (void)nthreads;
    return -2;
}
#endif
