/* The weight gradient of a convolution straight from its compressed input (SWAT's saved top-K activations).
 *
 * The input x [N, H, W, Cin] (channels-last, or a Linear's [T, in] as N = T, H = W = 1) is given as the bitmask
 * of its kept entries in memory order plus their values, as compress() writes them; the output gradient g is
 * [N, Ho, Wo, G] with G = Cout rounded up to a multiple of 64 (the caller zero-pads). The result is laid out
 * gwt[Cin, KH, KW, Cout]:
 *
 *     gwt[ci, kh, kw, :] = sum over kept x[n, h, w, ci] of x[n, h, w, ci] * g[n, oh, ow, :]
 *
 * with (oh, ow) the output position that (h, w) reaches through (kh, kw). The work is (kept inputs) x KH x KW x
 * Cout multiply-adds and the dense input is never rebuilt. First the kept entries of each image are sorted by
 * channel (a counting sort: per image and channel, the positions and values); then, per block of 64 output
 * channels, per image and per (channel, kh, kw), the 64 sums stay in registers while the channel's kept
 * positions stream past, each one vector load of the image's output gradient (in L2) per multiply-add. */
#include <string.h>

#include "kernels.h"
#include "parallel.h"

#if defined(__AVX512F__)
enum { LANES = 16 };
#else
enum { LANES = 8 };
#endif
typedef float vf __attribute__((vector_size(LANES * 4)));
enum { CO_BLOCK = 64, NVEC = CO_BLOCK / LANES, MAX_KW = 3 };

struct cgrad_geom {
    int64_t n, cin, h, w, cout, ho, wo, kh, kw;
    int sh, sw, ph, pw, dh, dw;
};

/* Kept entries are sorted by channel within blocks of images; an entry's position packs the image within its
 * block and the pixel: (image << 20) | (h << 10) | w. */
enum { POS_BITS = 10, MAX_BLOCK = 2047 };

static inline int64_t pos_image(int32_t p) { return p >> (2 * POS_BITS); }
static inline int64_t pos_h(int32_t p) { return (p >> POS_BITS) & ((1 << POS_BITS) - 1); }
static inline int64_t pos_w(int32_t p) { return p & ((1 << POS_BITS) - 1); }

/* images per block: the block's output gradient for 64 channels fits in about 256 KB of L2 */
static int64_t images_per_block(const struct cgrad_geom *g) {
    int64_t per = (256 * 1024) / (g->ho * g->wo * CO_BLOCK * 4);
    return per < 1 ? 1 : (per > MAX_BLOCK ? MAX_BLOCK : per);
}

/* bits [i, i + len) of a mask of nbytes bytes as the low bits of a word (len <= 64) */
static inline uint64_t read_bits(const uint8_t *bits, int64_t nbytes, int64_t i, int64_t len) {
    const int64_t byte = i >> 3;
    const int shift = (int)(i & 7);
    uint64_t word = 0;
    if (byte + 8 <= nbytes) memcpy(&word, bits + byte, 8);
    else memcpy(&word, bits + byte, (size_t)(nbytes - byte));
    word >>= shift;
    if (shift + len > 64) word |= (uint64_t)bits[byte + 8] << (64 - shift);
    return len == 64 ? word : word & ((1ull << len) - 1);
}

/* ---- per block of images, the kept entries sorted by channel (a counting sort) ---- */
struct sort_args {
    const struct cgrad_geom *g; const uint8_t *bits; const float *values; const int64_t *img_off;
    const int64_t *plane_off; int64_t per_block; int64_t *ch_ptr; int32_t *pos; float *val;
};

static void sort_block(void *p, int64_t b) {
    const struct sort_args *a = (const struct sort_args *)p;
    const struct cgrad_geom *g = a->g;
    const int64_t cin = g->cin, plane = g->h * g->w;
    const int64_t n0 = b * a->per_block, n1 = n0 + a->per_block < g->n ? n0 + a->per_block : g->n;
    const int64_t first = n0 * plane * cin, pixels = (n1 - n0) * plane, nbytes = (g->n * plane * cin + 7) / 8;
    const uint8_t *restrict bits = a->bits;
    int64_t *restrict ptr = a->ch_ptr + b * (cin + 1);
    for (int64_t c = 0; c <= cin; c++) ptr[c] = 0;
    for (int64_t q = 0; q < pixels; q++)  /* count per channel, 64 channels a word */
        for (int64_t c0 = 0; c0 < cin; c0 += 64)
            for (uint64_t word = read_bits(bits, nbytes, first + q * cin + c0, cin - c0 < 64 ? cin - c0 : 64); word;
                 word &= word - 1)
                ptr[c0 + __builtin_ctzll(word) + 1]++;
    for (int64_t c = 0; c < cin; c++) ptr[c + 1] += ptr[c];
    int64_t fill[cin > 0 ? cin : 1];
    const int64_t base = a->img_off[n0];
    for (int64_t c = 0; c < cin; c++) fill[c] = base + ptr[c];
    int64_t v = base, q = 0;
    for (int64_t nl = 0; nl < n1 - n0; nl++)
        for (int64_t h = 0; h < g->h; h++)
            for (int64_t w = 0; w < g->w; w++, q++) {
                const int32_t at = (int32_t)((nl << (2 * POS_BITS)) | (h << POS_BITS) | w);
                for (int64_t c0 = 0; c0 < cin; c0 += 64)
                    for (uint64_t word = read_bits(bits, nbytes, first + q * cin + c0, cin - c0 < 64 ? cin - c0 : 64);
                         word; word &= word - 1) {
                        const int64_t e = fill[c0 + __builtin_ctzll(word)]++;
                        a->pos[e] = at;
                        a->val[e] = a->values[v++];
                    }
            }
}

/* The same for an NCHW input, whose kept entries already come plane by plane (plane_off[N * Cin + 1]: kept entries
 * before each plane): only the images of a block are interleaved by channel, and the positions decoded. */
static void sort_block_planes(void *p, int64_t b) {
    const struct sort_args *a = (const struct sort_args *)p;
    const struct cgrad_geom *g = a->g;
    const int64_t cin = g->cin, plane = g->h * g->w, nbytes = (g->n * cin * plane + 7) / 8;
    const int64_t n0 = b * a->per_block, n1 = n0 + a->per_block < g->n ? n0 + a->per_block : g->n;
    int64_t *restrict ptr = a->ch_ptr + b * (cin + 1);
    ptr[0] = 0;
    for (int64_t c = 0; c < cin; c++) {
        int64_t count = 0;
        for (int64_t n = n0; n < n1; n++) count += a->plane_off[n * cin + c + 1] - a->plane_off[n * cin + c];
        ptr[c + 1] = ptr[c] + count;
    }
    int64_t e = a->img_off[n0];
    for (int64_t c = 0; c < cin; c++)
        for (int64_t n = n0; n < n1; n++) {
            int64_t v = a->plane_off[n * cin + c];
            const int64_t first = (n * cin + c) * plane;
            for (int64_t h = 0; h < g->h; h++)
                for (int64_t w0 = 0; w0 < g->w; w0 += 64)
                    for (uint64_t word = read_bits(a->bits, nbytes, first + h * g->w + w0, g->w - w0 < 64 ? g->w - w0 : 64);
                         word; word &= word - 1) {
                        a->pos[e] = (int32_t)(((n - n0) << (2 * POS_BITS)) | (h << POS_BITS) | (w0 + __builtin_ctzll(word)));
                        a->val[e++] = a->values[v++];
                    }
        }
}

/* ---- per block of output channels, the sums over the images ---- */
struct cgrad_args {
    const struct cgrad_geom *g; const int64_t *ch_ptr; const int64_t *img_off; const int32_t *pos; const float *val;
    const float *grad; float *gwt; int64_t per_block, co_blocks, ci_parts, gstride;
};

/* rows[kw, :width] += sum over entries [e0, e1) of val * g[image, oh, ow, :] for one kernel row (stride 1; KW a
 * constant at each call, so the KW x 64 sums live in registers); gimg is the block's first image */
static inline __attribute__((always_inline)) void kernel_row(
        const struct cgrad_args *a, int64_t e0, int64_t e1, int64_t offh, const float *gimg, float *rows,
        int64_t width, const int KW) {
    const struct cgrad_geom *g = a->g;
    const int32_t *restrict pos = a->pos;
    const float *restrict val = a->val;
    const int64_t cout = g->cout, ho = g->ho, wo = g->wo, pw = g->pw, dw = g->dw, gs = a->gstride;
    vf acc[MAX_KW][NVEC];
    memset(acc, 0, sizeof acc);
    for (int kw = 0; kw < KW; kw++) memcpy(acc[kw], rows + kw * cout, width * sizeof(float));
    for (int64_t e = e0; e < e1; e++) {
        const int64_t oh = pos_h(pos[e]) + offh, w = pos_w(pos[e]);
        if (oh < 0 || oh >= ho) continue;
        const float *grow = gimg + (pos_image(pos[e]) * ho + oh) * wo * gs;
        const float xv = val[e];
        for (int kw = 0; kw < KW; kw++) {
            const int64_t ow = w + pw - kw * dw;
            if (ow < 0 || ow >= wo) continue;
            const float *gr = grow + ow * gs;
            for (int j = 0; j < NVEC; j++) {
                vf gv;
                memcpy(&gv, gr + j * LANES, sizeof gv);
                acc[kw][j] += xv * gv;
            }
        }
    }
    for (int kw = 0; kw < KW; kw++) memcpy(rows + kw * cout, acc[kw], width * sizeof(float));
}

/* the same sums for any stride and kernel width, one output channel at a time */
static void kernel_row_any(const struct cgrad_args *a, int64_t e0, int64_t e1, int64_t offh, const float *gimg,
                           float *rows, int64_t width) {
    const struct cgrad_geom *g = a->g;
    for (int64_t e = e0; e < e1; e++) {
        const int64_t th = pos_h(a->pos[e]) + offh;  /* oh * stride */
        if (th < 0 || th % g->sh || th / g->sh >= g->ho) continue;
        const float *grow = gimg + (pos_image(a->pos[e]) * g->ho + th / g->sh) * g->wo * a->gstride;
        const float xv = a->val[e];
        for (int64_t kw = 0; kw < g->kw; kw++) {
            const int64_t tw = pos_w(a->pos[e]) + g->pw - kw * g->dw;
            if (tw < 0 || tw % g->sw || tw / g->sw >= g->wo) continue;
            const float *restrict gr = grow + (tw / g->sw) * a->gstride;
            float *restrict row = rows + kw * g->cout;
            for (int64_t j = 0; j < width; j++) row[j] += xv * gr[j];
        }
    }
}

static void cgrad_item(void *p, int64_t item) {
    const struct cgrad_args *a = (const struct cgrad_args *)p;
    const struct cgrad_geom *g = a->g;
    const int64_t cb = item % a->co_blocks, part = item / a->co_blocks;
    const int64_t ci0 = g->cin * part / a->ci_parts, ci1 = g->cin * (part + 1) / a->ci_parts;
    const int64_t co0 = cb * CO_BLOCK, width = co0 + CO_BLOCK <= g->cout ? CO_BLOCK : g->cout - co0;
    const int64_t ksz = g->kh * g->kw, cout = g->cout;
    const float *gblock = a->grad + co0;  /* this block's 64 columns of the output gradient */
    const int fast = g->sh == 1 && g->sw == 1 && g->kw <= MAX_KW;
    for (int64_t ci = ci0; ci < ci1; ci++)
        for (int64_t k = 0; k < ksz; k++) memset(a->gwt + (ci * ksz + k) * cout + co0, 0, width * sizeof(float));
    for (int64_t b = 0, n0 = 0; n0 < g->n; b++, n0 += a->per_block) {
        const int64_t *ptr = a->ch_ptr + b * (g->cin + 1), base = a->img_off[n0];
        const float *gimg = gblock + n0 * g->ho * g->wo * a->gstride;
        for (int64_t ci = ci0; ci < ci1; ci++) {
            const int64_t e0 = base + ptr[ci], e1 = base + ptr[ci + 1];
            if (e0 == e1) continue;
            for (int64_t kh = 0; kh < g->kh; kh++) {
                const int64_t offh = g->ph - kh * g->dh;
                float *rows = a->gwt + (ci * g->kh + kh) * g->kw * cout + co0;
                if (fast && g->kw == 3) kernel_row(a, e0, e1, offh, gimg, rows, width, 3);
                else if (fast && g->kw == 2) kernel_row(a, e0, e1, offh, gimg, rows, width, 2);
                else if (fast) kernel_row(a, e0, e1, offh, gimg, rows, width, 1);
                else kernel_row_any(a, e0, e1, offh, gimg, rows, width);
            }
        }
    }
}

/* geom: N, Cin, H, W, Cout, Ho, Wo, KH, KW, stride h/w, padding h/w, dilation h/w (H, W < 1024); img_off[N + 1]:
 * kept entries before each image; plane_off: NULL for an input [N, H, W, Cin], else (an NCHW input) the kept
 * entries before each of its N * Cin planes; grad: [ceil(Cout / 64), N, Ho, Wo, 64]. Scratch: ch_ptr[N * (Cin + 1)],
 * pos[kept], val[kept]. Writes gwt[Cin, KH, KW, Cout]. */
void compressed_conv_weight_grad(const int64_t *geom, const uint8_t *bits, const float *values, const int64_t *img_off,
                                 const int64_t *plane_off, const float *grad, float *gwt, int64_t *ch_ptr, int32_t *pos,
                                 float *val, int64_t gstride, int nthreads) {
    struct cgrad_geom g = {geom[0], geom[1], geom[2], geom[3], geom[4], geom[5], geom[6], geom[7], geom[8],
                           (int)geom[9], (int)geom[10], (int)geom[11], (int)geom[12], (int)geom[13], (int)geom[14]};
    const int64_t per_block = images_per_block(&g), blocks = (g.n + per_block - 1) / per_block;
    struct sort_args s = {&g, bits, values, img_off, plane_off, per_block, ch_ptr, pos, val};
    parallel_workers(plane_off ? sort_block_planes : sort_block, &s, blocks, nthreads);
    int64_t co_blocks = (g.cout + CO_BLOCK - 1) / CO_BLOCK;
    if (co_blocks == 0) return;
    /* enough items for the threads to share: split the input channels where output blocks are few */
    int64_t ci_parts = (4 * (int64_t)nthreads + co_blocks - 1) / co_blocks;
    if (ci_parts > g.cin) ci_parts = g.cin;
    if (ci_parts < 1) ci_parts = 1;
    struct cgrad_args a = {&g, ch_ptr, img_off, pos, val, grad, gwt, per_block, co_blocks, ci_parts, gstride};
    parallel_workers(cgrad_item, &a, co_blocks * ci_parts, nthreads);
}

/* ---- kept entries per image (the offsets of each image's values) ---- */
struct count_img_args { const uint8_t *bits; int64_t per_image; int64_t *img_off; };

static void count_image(void *p, int64_t n) {
    const struct count_img_args *a = (const struct count_img_args *)p;
    int64_t lo = n * a->per_image, hi = lo + a->per_image, c = 0;
    while (lo < hi && (lo & 7)) { c += (a->bits[lo >> 3] >> (lo & 7)) & 1; lo++; }
    while (lo + 64 <= hi) {
        uint64_t word;
        memcpy(&word, a->bits + (lo >> 3), 8);
        c += __builtin_popcountll(word);
        lo += 64;
    }
    while (lo < hi) { c += (a->bits[lo >> 3] >> (lo & 7)) & 1; lo++; }
    a->img_off[n + 1] = c;
}

/* img_off[n] = kept entries before image n (img_off[N] = all of them); an image is per_image entries. */
void compressed_image_offsets(const uint8_t *bits, int64_t images, int64_t per_image, int64_t *img_off, int nthreads) {
    struct count_img_args a = {bits, per_image, img_off};
    img_off[0] = 0;
    parallel_workers(count_image, &a, images, nthreads);
    for (int64_t n = 0; n < images; n++) img_off[n + 1] += img_off[n];
}
