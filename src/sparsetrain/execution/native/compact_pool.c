/* 2x2 max-pooling with stride 2 that saves, for backward, one byte per output: where in its window the maximum
 * was (0..3, row-major), instead of the input and int64 indices PyTorch's max-pool keeps (1/24 of their bytes).
 *
 * Tensors are addressed through element strides (N, C, H, W): NCHW inputs run plane by plane, channels-last ones
 * position by position with the channels innermost (both need unit stride innermost: the caller makes them so).
 * A contiguous NCHW input of even height and width is one run of row pairs (output row r of all N * C * Ho reads
 * input rows 2r and 2r + 1), 16 windows a vector: lanes split into even and odd columns (wide rows), or, for rows
 * of 2 to 16 inputs, top and bottom rows picked out of 64 inputs first. Ties and NaNs follow
 * PyTorch's CPU kernel: the first maximum in window order wins, and a NaN wins over anything before it (so the last NaN wins). */
#include <string.h>

#include "kernels.h"
#include "parallel.h"

typedef float pv __attribute__((vector_size(64)));
typedef int32_t pm __attribute__((vector_size(64)));
typedef uint8_t pb __attribute__((vector_size(16)));

static inline pv load_pv(const float *p) { pv v; memcpy(&v, p, sizeof v); return v; }
static inline void store_pv(float *p, pv v) { memcpy(p, &v, sizeof v); }
static inline pv pick(pm m, pv a, pv b) { return (pv)((m & (pm)a) | (~m & (pm)b)); }  /* m ? a : b, per lane */

/* 16 channels of four window positions: the maxima, and (into w) their positions */
static inline pv argmax4_pv(pv a, pv b, pv c, pv d, pm *w) {
    const pm tb = (b > a) | (b != b);
    const pv m1 = pick(tb, b, a);
    const pm tc = (c > m1) | (c != c);
    const pv m2 = pick(tc, c, m1);
    const pm td = (d > m2) | (d != d);
    *w = (td & 3) | (~td & ((tc & 2) | (~tc & (tb & 1))));
    return pick(td, d, m2);
}

struct pool_args {
    int64_t n, c, ho, wo;
    int64_t xs[4], os[4];  /* element strides of the input and of the output/positions (N, C, H, W) */
    const float *x; float *out; uint8_t *where; const float *grad; float *gx;
    int channels_inner;
};

/* the window position of the maximum of (a, b, c, d), row-major, PyTorch's way (first wins, NaN wins) */
static inline int argmax4(float a, float b, float c, float d) {
    /* branch-free, so the loops over channels or columns vectorise */
    const int tb = (b > a) | (b != b);
    const float m1 = tb ? b : a;
    const int tc = (c > m1) | (c != c);
    const float m2 = tc ? c : m1;
    const int td = (d > m2) | (d != d);
    return td ? 3 : tc ? 2 : tb;
}

/* even and odd lanes of the 32 values a, b (16 windows' left and right columns) */
static const pm EVEN = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
static const pm ODD = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};

static inline void store_where(uint8_t *p, pm w) {
    const pb wb = __builtin_convertvector(w, pb);
    memcpy(p, &wb, sizeof wb);
}

/* 16 windows from the 32 inputs of their top row (t0, t1) and of their bottom row (b0, b1): even lanes are the
 * left columns, odd the right; the maxima into out, their positions into where (unless NULL) */
static inline void pool16(pv t0, pv t1, pv b0, pv b1, float *out, uint8_t *where) {
    pm w;
    store_pv(out, argmax4_pv(__builtin_shuffle(t0, t1, EVEN), __builtin_shuffle(t0, t1, ODD),
                             __builtin_shuffle(b0, b1, EVEN), __builtin_shuffle(b0, b1, ODD), &w));
    if (where) store_where(where, w);
}

/* one output row of a plane from input rows r0, r1: 16 windows a vector (their columns split into even and odd
 * lanes), the rest one by one; where == NULL: the positions are not wanted (inference) */
static void pool_plane_row(const float *restrict r0, const float *restrict r1, float *restrict out,
                           uint8_t *restrict where, int64_t wo) {
    int64_t ow = 0;
    for (; ow + 16 <= wo; ow += 16)
        pool16(load_pv(r0 + 2 * ow), load_pv(r0 + 2 * ow + 16), load_pv(r1 + 2 * ow), load_pv(r1 + 2 * ow + 16),
               out + ow, where ? where + ow : 0);
    for (; ow < wo; ow++) {
        const float v0 = r0[2 * ow], v1 = r0[2 * ow + 1], v2 = r1[2 * ow], v3 = r1[2 * ow + 1];
        const int w = argmax4(v0, v1, v2, v3);
        if (where) where[ow] = (uint8_t)w;
        out[ow] = w == 0 ? v0 : w == 1 ? v1 : w == 2 ? v2 : v3;
    }
}

/* a whole plane of `count` outputs whose input rows are narrow (input width w = 2, 4, 8 or 16, contiguous): every
 * 64 inputs are 16 windows, their top rows picked out of the first two vectors and the last two, then split into
 * even and odd columns as in pool_plane_row */
static void pool_plane_flat(const float *restrict x, float *restrict out, uint8_t *restrict where, int64_t w,
                            int64_t count) {
    pm top, bottom;  /* lanes of two vectors (32 inputs) holding the windows' top and bottom rows */
    for (int j = 0; j < 16; j++) {
        top[j] = (int32_t)((j / w) * 2 * w + j % w);
        bottom[j] = top[j] + (int32_t)w;
    }
    int64_t j = 0;
    for (; j + 16 <= count; j += 16) {
        const float *src = x + 4 * j;
        const pv v0 = load_pv(src), v1 = load_pv(src + 16), v2 = load_pv(src + 32), v3 = load_pv(src + 48);
        const pv t0 = __builtin_shuffle(v0, v1, top), t1 = __builtin_shuffle(v2, v3, top);
        const pv b0 = __builtin_shuffle(v0, v1, bottom), b1 = __builtin_shuffle(v2, v3, bottom);
        pool16(t0, t1, b0, b1, out + j, where ? where + j : 0);
    }
    const int64_t wo = w / 2;
    for (; j < count; j++) {
        const float *r0 = x + (j / wo) * 2 * w + (j % wo) * 2;
        pool_plane_row(r0, r0 + w, out + j, where ? where + j : 0, 1);
    }
}

/* 16 windows' gradients into their four positions: top-left, top-right, bottom-left, bottom-right */
static inline void unpool4_pv(pv g, pm w, pv *tl, pv *tr, pv *bl, pv *br) {
    const pv zero = {};
    *tl = pick(w == 0, g, zero);
    *tr = pick(w == 1, g, zero);
    *bl = pick(w == 2, g, zero);
    *br = pick(w == 3, g, zero);
}

static inline pm load_where(const uint8_t *p) {
    pb wb;
    memcpy(&wb, p, sizeof wb);
    return __builtin_convertvector(wb, pm);
}

static const pm INTERLEAVE_LO = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
static const pm INTERLEAVE_HI = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

/* the input gradient of one output row (pool_plane_row's inverse): every input of rows r0, r1 written */
static void unpool_plane_row(float *restrict r0, float *restrict r1, const float *restrict g,
                             const uint8_t *restrict where, int64_t wo) {
    int64_t ow = 0;
    for (; ow + 16 <= wo; ow += 16) {
        pv tl, tr, bl, br;
        unpool4_pv(load_pv(g + ow), load_where(where + ow), &tl, &tr, &bl, &br);
        store_pv(r0 + 2 * ow, __builtin_shuffle(tl, tr, INTERLEAVE_LO));
        store_pv(r0 + 2 * ow + 16, __builtin_shuffle(tl, tr, INTERLEAVE_HI));
        store_pv(r1 + 2 * ow, __builtin_shuffle(bl, br, INTERLEAVE_LO));
        store_pv(r1 + 2 * ow + 16, __builtin_shuffle(bl, br, INTERLEAVE_HI));
    }
    for (; ow < wo; ow++) {
        const int w = where[ow];
        const float gv = g[ow];
        r0[2 * ow] = w == 0 ? gv : 0.0f;
        r0[2 * ow + 1] = w == 1 ? gv : 0.0f;
        r1[2 * ow] = w == 2 ? gv : 0.0f;
        r1[2 * ow + 1] = w == 3 ? gv : 0.0f;
    }
}

/* pool_plane_flat's inverse: 16 windows' gradients into 64 inputs */
static void unpool_plane_flat(float *restrict gx, const float *restrict g, const uint8_t *restrict where, int64_t w,
                              int64_t count) {
    pm lo, hi;  /* inputs 0..15 and 16..31 of 32 from the top rows (lanes 0..15) and the bottom rows (16..31) */
    for (int i = 0; i < 32; i++) {
        const int q = i / (2 * (int)w), within = i % (2 * (int)w);
        const int32_t lane = within < w ? q * (int)w + within : 16 + q * (int)w + within - (int)w;
        if (i < 16) lo[i] = lane; else hi[i - 16] = lane;
    }
    int64_t j = 0;
    for (; j + 16 <= count; j += 16) {
        pv tl, tr, bl, br;
        unpool4_pv(load_pv(g + j), load_where(where + j), &tl, &tr, &bl, &br);
        const pv t0 = __builtin_shuffle(tl, tr, INTERLEAVE_LO), t1 = __builtin_shuffle(tl, tr, INTERLEAVE_HI);
        const pv b0 = __builtin_shuffle(bl, br, INTERLEAVE_LO), b1 = __builtin_shuffle(bl, br, INTERLEAVE_HI);
        float *dst = gx + 4 * j;
        store_pv(dst, __builtin_shuffle(t0, b0, lo));
        store_pv(dst + 16, __builtin_shuffle(t0, b0, hi));
        store_pv(dst + 32, __builtin_shuffle(t1, b1, lo));
        store_pv(dst + 48, __builtin_shuffle(t1, b1, hi));
    }
    const int64_t wo = w / 2;
    for (; j < count; j++) {
        float *r0 = gx + (j / wo) * 2 * w + (j % wo) * 2;
        unpool_plane_row(r0, r0 + w, g + j, where + j, 1);
    }
}

/* a contiguous NCHW input of even height and width with a contiguous output: one run of row pairs */
static int runs_flat(const struct pool_args *a) {
    const int64_t *xs = a->xs, *os = a->os;
    return xs[3] == 1 && xs[2] == 2 * a->wo && xs[1] == 2 * a->ho * xs[2] && xs[0] == a->c * xs[1] && os[3] == 1 &&
           os[2] == a->wo && os[1] == a->ho * os[2] && os[0] == a->c * os[1];
}

/* rows of 2 to 16 inputs: the narrow vector form (else 16 windows of one row a vector) */
static int narrow(int64_t wo) { return wo < 16 && 16 % wo == 0; }

enum { FLAT_BLOCK = 4096 };  /* outputs a work item of a flat run (a multiple of every narrow row's width) */

static int64_t flat_items(const struct pool_args *a) {
    const int64_t outputs = a->n * a->c * a->ho * a->wo;
    return (outputs + FLAT_BLOCK - 1) / FLAT_BLOCK;
}

/* work item `item` of a flat run, forward (backward: the input gradient) */
static void flat_item(void *p, int64_t item) {
    const struct pool_args *a = (const struct pool_args *)p;
    const int64_t outputs = a->n * a->c * a->ho * a->wo, wo = a->wo;
    const int64_t j0 = item * FLAT_BLOCK, j1 = j0 + FLAT_BLOCK < outputs ? j0 + FLAT_BLOCK : outputs;
    if (narrow(wo)) {  /* FLAT_BLOCK is a multiple of wo: the block starts at a row pair, input 4 * j0 */
        if (a->grad) unpool_plane_flat(a->gx + 4 * j0, a->grad + j0, a->where + j0, 2 * wo, j1 - j0);
        else pool_plane_flat(a->x + 4 * j0, a->out + j0, a->where ? a->where + j0 : 0, 2 * wo, j1 - j0);
        return;
    }
    for (int64_t j = j0; j < j1;) {  /* whole or partial output rows */
        const int64_t r = j / wo, ow = j % wo, len = (j1 - j < wo - ow) ? j1 - j : wo - ow;
        const int64_t in = r * 4 * wo + 2 * ow;
        if (a->grad) unpool_plane_row(a->gx + in, a->gx + in + 2 * wo, a->grad + j, a->where + j, len);
        else pool_plane_row(a->x + in, a->x + in + 2 * wo, a->out + j, a->where ? a->where + j : 0, len);
        j += len;
    }
}

/* channels-last: image `item`; planes: plane `item` (image item / C, channel item % C), two input rows an output row */
static void pool_item(void *p, int64_t item) {
    const struct pool_args *a = (const struct pool_args *)p;
    const int64_t *xs = a->xs, *os = a->os, C = a->c;
    if (a->channels_inner) {  /* [H, W, C] rows: every channel of a window position is one contiguous run */
        const int64_t n = item;
        for (int64_t oh = 0; oh < a->ho; oh++)
            for (int64_t ow = 0; ow < a->wo; ow++) {
                const float *restrict p0 = a->x + n * xs[0] + 2 * oh * xs[2] + 2 * ow * xs[3];
                const float *restrict p1 = p0 + xs[3], *restrict p2 = p0 + xs[2], *restrict p3 = p2 + xs[3];
                float *restrict out = a->out + n * os[0] + oh * os[2] + ow * os[3];
                uint8_t *restrict where = a->where ? a->where + n * os[0] + oh * os[2] + ow * os[3] : 0;
                int64_t c = 0;
                for (; c + 16 <= C; c += 16) {
                    pm w;
                    store_pv(out + c, argmax4_pv(load_pv(p0 + c), load_pv(p1 + c), load_pv(p2 + c), load_pv(p3 + c), &w));
                    if (where) store_where(where + c, w);
                }
                for (; c < C; c++) {
                    const float v0 = p0[c], v1 = p1[c], v2 = p2[c], v3 = p3[c];
                    const int w = argmax4(v0, v1, v2, v3);
                    if (where) where[c] = (uint8_t)w;
                    out[c] = w == 3 ? v3 : w == 2 ? v2 : w == 1 ? v1 : v0;
                }
            }
    } else {
        const int64_t n = item / C, c = item % C;
        for (int64_t oh = 0; oh < a->ho; oh++) {
            const float *restrict r0 = a->x + n * xs[0] + c * xs[1] + 2 * oh * xs[2];
            const int64_t o = n * os[0] + c * os[1] + oh * os[2];
            pool_plane_row(r0, r0 + xs[2], a->out + o, a->where ? a->where + o : 0, a->wo);
        }
    }
}

/* dims: N, C, Ho, Wo; strides: the input's four then the output's four (positions share the output's); where may be
 * NULL (the positions are not wanted). */
void max_pool2_forward(const int64_t *dims, const int64_t *strides, const float *x, float *out, uint8_t *where,
                       int channels_inner, int nthreads) {
    struct pool_args a = {dims[0], dims[1], dims[2], dims[3], {strides[0], strides[1], strides[2], strides[3]},
                          {strides[4], strides[5], strides[6], strides[7]}, x, out, where, 0, 0, channels_inner};
    if (!channels_inner && runs_flat(&a)) parallel_workers(flat_item, &a, flat_items(&a), nthreads);
    else parallel_workers(pool_item, &a, channels_inner ? a.n : a.n * a.c, nthreads);
}

static void unpool_image(void *p, int64_t n) {
    const struct pool_args *a = (const struct pool_args *)p;
    const int64_t *xs = a->xs, *os = a->os, C = a->c, WO = a->wo;
    if (a->channels_inner) {
        for (int64_t oh = 0; oh < a->ho; oh++)
            for (int64_t ow = 0; ow < a->wo; ow++) {
                float *restrict q0 = a->gx + n * xs[0] + 2 * oh * xs[2] + 2 * ow * xs[3];
                float *restrict q1 = q0 + xs[3], *restrict q2 = q0 + xs[2], *restrict q3 = q2 + xs[3];
                const float *restrict g = a->grad + n * os[0] + oh * os[2] + ow * os[3];
                const uint8_t *restrict where = a->where + n * os[0] + oh * os[2] + ow * os[3];
                int64_t c = 0;
                for (; c + 16 <= C; c += 16) {
                    pb wb;
                    memcpy(&wb, where + c, sizeof wb);
                    const pm w = __builtin_convertvector(wb, pm);
                    const pv gv = load_pv(g + c), zero = {};
                    store_pv(q0 + c, pick(w == 0, gv, zero));
                    store_pv(q1 + c, pick(w == 1, gv, zero));
                    store_pv(q2 + c, pick(w == 2, gv, zero));
                    store_pv(q3 + c, pick(w == 3, gv, zero));
                }
                for (; c < C; c++) {
                    const int w = where[c];
                    const float gv = g[c];
                    q0[c] = w == 0 ? gv : 0.0f;
                    q1[c] = w == 1 ? gv : 0.0f;
                    q2[c] = w == 2 ? gv : 0.0f;
                    q3[c] = w == 3 ? gv : 0.0f;
                }
            }
    } else {
        for (int64_t c = 0; c < a->c; c++)
            for (int64_t oh = 0; oh < a->ho; oh++) {
                float *r0 = a->gx + n * xs[0] + c * xs[1] + 2 * oh * xs[2];
                const int64_t o = n * os[0] + c * os[1] + oh * os[2];
                unpool_plane_row(r0, r0 + xs[2], a->grad + o, a->where + o, WO);
            }
    }
}

/* gx (strides: the first four) <- the output gradient at each window's maximum, zero elsewhere; every input
 * position of an even-sized input is written (odd trailing rows/columns are the caller's to zero). */
void max_pool2_backward(const int64_t *dims, const int64_t *strides, const float *grad, const uint8_t *where, float *gx,
                        int channels_inner, int nthreads) {
    struct pool_args a = {dims[0], dims[1], dims[2], dims[3], {strides[0], strides[1], strides[2], strides[3]},
                          {strides[4], strides[5], strides[6], strides[7]}, 0, 0, (uint8_t *)where, grad, gx,
                          channels_inner};
    if (!channels_inner && runs_flat(&a)) parallel_workers(flat_item, &a, flat_items(&a), nthreads);
    else parallel_workers(unpool_image, &a, a.n, nthreads);
}
