/* 2x2 max-pooling with stride 2 that saves, for backward, one byte per output: where in its window the maximum
 * was (0..3, row-major), instead of the input and int64 indices PyTorch's max-pool keeps (1/24 of their bytes).
 *
 * Tensors are addressed through element strides (N, C, H, W): NCHW inputs run plane by plane, channels-last ones
 * position by position with the channels innermost (both need unit stride innermost: the caller makes them so). Ties and NaNs follow
 * PyTorch's CPU kernel: the first maximum in window order wins, and a NaN wins over anything before it (so the last NaN wins). */
#include <string.h>

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

static void pool_image(void *p, int64_t n) {
    const struct pool_args *a = (const struct pool_args *)p;
    const int64_t *xs = a->xs, *os = a->os, C = a->c, WO = a->wo;
    if (a->channels_inner) {  /* [H, W, C] rows: every channel of a window position is one contiguous run */
        for (int64_t oh = 0; oh < a->ho; oh++)
            for (int64_t ow = 0; ow < a->wo; ow++) {
                const float *restrict p0 = a->x + n * xs[0] + 2 * oh * xs[2] + 2 * ow * xs[3];
                const float *restrict p1 = p0 + xs[3], *restrict p2 = p0 + xs[2], *restrict p3 = p2 + xs[3];
                float *restrict out = a->out + n * os[0] + oh * os[2] + ow * os[3];
                uint8_t *restrict where = a->where + n * os[0] + oh * os[2] + ow * os[3];
                int64_t c = 0;
                for (; c + 16 <= C; c += 16) {
                    pm w;
                    store_pv(out + c, argmax4_pv(load_pv(p0 + c), load_pv(p1 + c), load_pv(p2 + c), load_pv(p3 + c), &w));
                    const pb wb = __builtin_convertvector(w, pb);
                    memcpy(where + c, &wb, sizeof wb);
                }
                for (; c < C; c++) {
                    const float v0 = p0[c], v1 = p1[c], v2 = p2[c], v3 = p3[c];
                    const int w = argmax4(v0, v1, v2, v3);
                    where[c] = (uint8_t)w;
                    out[c] = w == 3 ? v3 : w == 2 ? v2 : w == 1 ? v1 : v0;
                }
            }
    } else {  /* planes: two input rows per output row */
        for (int64_t c = 0; c < a->c; c++)
            for (int64_t oh = 0; oh < a->ho; oh++) {
                const float *restrict r0 = a->x + n * xs[0] + c * xs[1] + 2 * oh * xs[2], *restrict r1 = r0 + xs[2];
                float *restrict out = a->out + n * os[0] + c * os[1] + oh * os[2];
                uint8_t *restrict where = a->where + n * os[0] + c * os[1] + oh * os[2];
                for (int64_t ow = 0; ow < WO; ow++) {
                    const float v0 = r0[2 * ow], v1 = r0[2 * ow + 1], v2 = r1[2 * ow], v3 = r1[2 * ow + 1];
                    const int w = argmax4(v0, v1, v2, v3);
                    where[ow] = (uint8_t)w;
                    out[ow] = w == 0 ? v0 : w == 1 ? v1 : w == 2 ? v2 : v3;
                }
            }
    }
}

/* dims: N, C, Ho, Wo; strides: the input's four then the output's four (positions share the output's). */
void max_pool2_forward(const int64_t *dims, const int64_t *strides, const float *x, float *out, uint8_t *where,
                       int channels_inner, int nthreads) {
    struct pool_args a = {dims[0], dims[1], dims[2], dims[3], {strides[0], strides[1], strides[2], strides[3]},
                          {strides[4], strides[5], strides[6], strides[7]}, x, out, where, 0, 0, channels_inner};
    parallel_workers(pool_image, &a, a.n, nthreads);
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
                float *restrict r0 = a->gx + n * xs[0] + c * xs[1] + 2 * oh * xs[2], *restrict r1 = r0 + xs[2];
                const float *restrict g = a->grad + n * os[0] + c * os[1] + oh * os[2];
                const uint8_t *restrict where = a->where + n * os[0] + c * os[1] + oh * os[2];
                for (int64_t ow = 0; ow < WO; ow++) {
                    const int w = where[ow];
                    const float gv = g[ow];
                    r0[2 * ow] = w == 0 ? gv : 0.0f;
                    r0[2 * ow + 1] = w == 1 ? gv : 0.0f;
                    r1[2 * ow] = w == 2 ? gv : 0.0f;
                    r1[2 * ow + 1] = w == 3 ? gv : 0.0f;
                }
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
    parallel_workers(unpool_image, &a, a.n, nthreads);
}
