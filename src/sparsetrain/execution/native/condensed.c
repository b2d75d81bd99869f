#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels.h"
#include "parallel.h"
#include "scratch.h"

/* ---- condensed sparse Linear (float32, rows of kept inputs) ----
 * A weight W[out, in] with nnz kept entries is given by rows: row_ptr[out + 1] (int64) and col, the
 * input of each entry (int32), in the order of the values. Nothing else is stored (backward lists the
 * entries by input for the length of one call). A constant fan-in mask is the case where every row has the same length; any mask works.
 *
 * Tokens (the rows of x [T, in]) are taken in blocks of TB. A block is transposed into a
 * per-thread buffer [in][TB], tokens innermost, so every kept weight costs one vector
 * multiply-add over TB tokens read from cache: the work is nnz * T multiply-adds, the sparse
 * FLOP count, and nothing but the block is ever re-laid. Threads take whole token blocks. */

#define TB 64
#if defined(__AVX512F__)
#define VL 16  /* a block of 64 tokens is four 16-float vectors with AVX-512 */
#else
#define VL 8
#endif
#define NV (TB / VL)
typedef float v8 __attribute__((vector_size(VL * 4)));

/* A worker's token-block buffers ([rows][TB] each) in one allocation, each starting at a different offset within
 * a 4 KiB page: the backward reads x[c] and writes gx[c] at the same offset of two buffers, and with equal
 * offsets every load would wait on the store before it (4K aliasing), a third slower depending only on where
 * the allocator placed them. The worker thread's scratch (scratch.h), kept between calls: a fresh allocation of
 * this size comes from the kernel page by page. */
static int block_buffers(int n, const int64_t *rows, float **bufs) {
    size_t total = 0, at[4];
    for (int i = 0; i < n; i++) {
        size_t bytes = (size_t)(rows[i] > 0 ? rows[i] : 1) * TB * sizeof(float);
        at[i] = total + (size_t)i * 1088;  /* 17 lines apart */
        total = (at[i] + bytes + 4095) & ~(size_t)4095;
    }
    char *p = (char *)scratch_get(0, total / sizeof(float) + 1024);  /* (64-byte aligned: up to a page more) */
    if (!p) return -1;
    p += (4096 - (uintptr_t)p % 4096) % 4096;
    for (int i = 0; i < n; i++) bufs[i] = (float *)(p + at[i]);
    return 0;
}

/* The transposes go in tiles of VL x VL held in registers: VL rows loaded as vectors, transposed by log2(VL)
 * stages of two-source shuffles (each swaps the off-diagonal blocks of every 2h x 2h sub-tile), stored as VL
 * vectors. Scalar copies of a column per token cost as much as the products themselves; edge tiles (fewer than
 * VL columns or tokens left) still go element by element. */
typedef int32_t vi __attribute__((vector_size(VL * 4)));
#define LO_LANE(l, h) (((l) & (h)) ? (VL + (l) - (h)) : (l))
#define HI_LANE(l, h) (((l) & (h)) ? (VL + (l)) : ((l) + (h)))
#if VL == 16
#define LANES(f, h) {f(0, h), f(1, h), f(2, h), f(3, h), f(4, h), f(5, h), f(6, h), f(7, h), \
                     f(8, h), f(9, h), f(10, h), f(11, h), f(12, h), f(13, h), f(14, h), f(15, h)}
#else
#define LANES(f, h) {f(0, h), f(1, h), f(2, h), f(3, h), f(4, h), f(5, h), f(6, h), f(7, h)}
#endif
#define STAGE(r, h)                                                                         \
    for (int i = 0; i < VL; i++)                                                            \
        if (!(i & (h))) {                                                                   \
            v8 a_ = r[i], b_ = r[i + (h)];                                                  \
            r[i] = __builtin_shuffle(a_, b_, (vi)LANES(LO_LANE, h));                        \
            r[i + (h)] = __builtin_shuffle(a_, b_, (vi)LANES(HI_LANE, h));                  \
        }

static inline __attribute__((always_inline)) void transpose_tile(v8 r[VL]) {
#if VL == 16
    STAGE(r, 8)
#endif
    STAGE(r, 4)
    STAGE(r, 2)
    STAGE(r, 1)
}

/* buf[c][j] = src[(t0 + j) * ld + c] for j < nb, zero for nb <= j < TB */
static void load_block(const float *src, int64_t ld, int64_t cols, int64_t t0, int64_t nb, float *buf) {
    if (nb < TB) memset(buf, 0, (size_t)cols * TB * sizeof(float));
    for (int64_t j0 = 0; j0 < nb; j0 += VL) {
        const int64_t j1 = j0 + VL < nb ? j0 + VL : nb;
        for (int64_t c0 = 0; c0 < cols; c0 += VL) {
            const int64_t c1 = c0 + VL < cols ? c0 + VL : cols;
            if (c1 - c0 == VL && j1 - j0 == VL) {
                v8 r[VL];
                for (int k = 0; k < VL; k++) memcpy(&r[k], src + (t0 + j0 + k) * ld + c0, sizeof(v8));
                transpose_tile(r);
                for (int k = 0; k < VL; k++) *(v8 *)(buf + (c0 + k) * TB + j0) = r[k];
                continue;
            }
            for (int64_t j = j0; j < j1; j++) {
                const float *row = src + (t0 + j) * ld;
                for (int64_t c = c0; c < c1; c++) buf[c * TB + j] = row[c];
            }
        }
    }
}

/* dst[(t0 + j) * ld + c] = buf[c][j] for j < nb */
static void store_block(const float *buf, int64_t cols, int64_t t0, int64_t nb, float *dst, int64_t ld) {
    for (int64_t j0 = 0; j0 < nb; j0 += VL) {
        const int64_t j1 = j0 + VL < nb ? j0 + VL : nb;
        for (int64_t c0 = 0; c0 < cols; c0 += VL) {
            const int64_t c1 = c0 + VL < cols ? c0 + VL : cols;
            if (c1 - c0 == VL && j1 - j0 == VL) {
                v8 r[VL];
                for (int k = 0; k < VL; k++) r[k] = *(const v8 *)(buf + (c0 + k) * TB + j0);
                transpose_tile(r);
                for (int k = 0; k < VL; k++) memcpy(dst + (t0 + j0 + k) * ld + c0, &r[k], sizeof(v8));
                continue;
            }
            for (int64_t j = j0; j < j1; j++) {
                float *row = dst + (t0 + j) * ld;
                for (int64_t c = c0; c < c1; c++) row[c] = buf[c * TB + j];
            }
        }
    }
}

/* ---- the entries in column chunks (float32) ----
 * Each kept weight reads its input's row of the block: TB floats, four lines. A block of 512 inputs is 128 KiB, so
 * those reads come from the second-level cache, whose bandwidth bounds the products (about one vector multiply-add
 * a cycle on an Intel Xeon, half its peak). Taken in chunks of columns whose rows fit the first-level cache, every
 * output row visits each chunk once (its sums kept in the output block between chunks), and the products run at the
 * load ports' rate, a fifth to a third faster. Within a chunk the rows go by their number of entries there, longest
 * first, so the inner loop's length changes seldom and its exit is predicted. A row's entries in a chunk are a run
 * of its list (its columns ascending, as every structure here lists them), so a row's sum is added in its list's
 * order, the bits of an unchunked sum; lists with columns out of order are taken as one chunk. The schedule is a
 * pass over the columns per call, against T / TB passes over the entries for the products. */
struct schedule {
    int64_t nchunks;
    int64_t *first;        /* the items of chunk k: first[k] .. first[k + 1] - 1 */
    int64_t *start;        /* each item's first entry in the lists */
    int32_t *row, *count;  /* its row and how many entries it takes */
    struct entry { int32_t col; float val; } *ent;  /* the entries in the order they are taken, each item's a run */
    int32_t *origin;       /* and their positions in the lists' source (see build_schedule) */
};

/* log2 of the columns per chunk: the most, a power of two (a shift finds an entry's chunk), whose rows of TB floats
 * fill at most two thirds of the first-level data cache; at least VL. */
static int chunk_shift(void) {
    static int shift;
    if (!shift) {
        long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
        const int64_t most = (l1 > 0 ? l1 : 32768) * 2 / 3 / (TB * (int64_t)sizeof(float));
        int k = 0;
        while ((int64_t)2 << k <= most) k++;
        shift = (1 << k) < VL ? (VL == 16 ? 4 : 3) : k;
    }
    return shift;
}

static void free_schedule(struct schedule *s) {
    free(s->first);
    free(s->start);
    free(s->row);
    free(s->count);
}

/* Where each row's entries of each chunk start (at[k * rows + r]) and how many there are (count[k * rows + r]), for
 * chunks of 1 << shift columns; 0, or 1 when some row's columns are not ascending. */
static int chunk_runs(const int64_t *ptr, const int32_t *idx, int64_t rows, int shift, int64_t nk, int64_t *at,
                      int32_t *count) {
    int disorder = 0;
    memset(count, 0, (size_t)(nk * rows) * sizeof(int32_t));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t q = ptr[r]; q < ptr[r + 1]; q++) {
            count[(idx[q] >> shift) * rows + r]++;
            disorder |= q > ptr[r] && idx[q] < idx[q - 1];
        }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k = 0, q = ptr[r]; k < nk; q += count[k * rows + r], k++) at[k * rows + r] = q;
    return disorder;
}

/* The schedule of the lists (ptr, idx, values) over `rows` rows of `cols` columns, its entries and their origins
 * (origin[q] of list entry q, or q where origin is null) in this thread's scratch buffer 1 (not freed with the rest).
 * Chunk 0 takes every row (it starts each row's sums, from the bias); the others only rows with entries in them.
 * Returns 0, or -1 without memory. */
static int build_schedule(const int64_t *ptr, const int32_t *idx, const float *values, const int32_t *origin,
                          int64_t rows, int64_t cols, struct schedule *s) {
    const int shift = chunk_shift();
    const int64_t width = (int64_t)1 << shift;
    int64_t nk = cols > width ? (cols + width - 1) / width : 1;
    const size_t cells = (size_t)(nk * rows > 0 ? nk * rows : 1);
    int64_t *at = (int64_t *)malloc(cells * sizeof(int64_t)), *slot = (int64_t *)malloc((width + 1) * sizeof(int64_t));
    int32_t *count = (int32_t *)malloc(cells * sizeof(int32_t));
    *s = (struct schedule){nk, (int64_t *)malloc((size_t)(nk + 1) * sizeof(int64_t)),
                           (int64_t *)malloc(cells * sizeof(int64_t)), (int32_t *)malloc(cells * sizeof(int32_t)),
                           (int32_t *)malloc(cells * sizeof(int32_t)),
                           (struct entry *)scratch_get(1, (size_t)(ptr[rows] > 0 ? 3 * ptr[rows] : 3)), 0};
    int failed = !at || !slot || !count || !s->first || !s->start || !s->row || !s->count || !s->ent;
    if (!failed) s->origin = (int32_t *)(s->ent + ptr[rows]);
    if (!failed && chunk_runs(ptr, idx, rows, shift, nk, at, count))
        chunk_runs(ptr, idx, rows, 31, s->nchunks = nk = 1, at, count);  /* one chunk */
    for (int64_t k = 0, item = 0; !failed && k < nk; k++) {
        const int32_t *n = count + k * rows;
#define SLOT(r) (n[r] < width ? width - n[r] : 0)  /* longest first (runs of a whole chunk or more together) */
        memset(slot, 0, (width + 1) * sizeof(int64_t));
        for (int64_t r = 0; r < rows; r++) slot[SLOT(r)]++;
        s->first[k] = item;
        for (int64_t c = 0, sum = item; c <= width; c++) {
            const int64_t m = slot[c];
            slot[c] = sum;
            sum += m;
        }
        for (int64_t r = 0; r < rows; r++) {
            if (k > 0 && n[r] == 0) continue;  /* rows without entries: only in chunk 0 */
            const int64_t it = slot[SLOT(r)]++;
            s->start[it] = at[k * rows + r];
            s->row[it] = (int32_t)r;
            s->count[it] = n[r];
            item++;
        }
        s->first[k + 1] = item;
#undef SLOT
    }
    for (int64_t it = 0, e = 0; !failed && it < s->first[nk]; it++)  /* (runs of a few entries: no memcpy calls) */
        for (int64_t q = s->start[it], q1 = q + s->count[it]; q < q1; q++, e++) {
            s->ent[e] = (struct entry){idx[q], values[q]};
            s->origin[e] = origin ? origin[q] : (int32_t)q;
        }
    free(at), free(slot), free(count);
    if (failed) free_schedule(s);
    return failed ? -1 : 0;
}

/* out[r][:] = bias[r] + sum over row r's entries q of values[q] * src[idx[q]][:], chunk by chunk (the sums kept in
 * out between chunks) */
static void schedule_times_block(const struct schedule *s, const float *bias, const float *src, float *out) {
    const struct entry *ent = s->ent;
    int64_t q = 0;
    for (int64_t k = 0; k < s->nchunks; k++)
        for (int64_t it = s->first[k]; it < s->first[k + 1]; it++) {
            v8 *o = (v8 *)(out + (int64_t)s->row[it] * TB), acc[NV];
            const float b0 = bias ? bias[s->row[it]] : 0.0f;
            for (int i = 0; i < NV; i++) acc[i] = k == 0 ? (v8){} + b0 : o[i];
            for (const int64_t q1 = q + s->count[it]; q < q1; q++) {
                const float w = ent[q].val;
                const v8 *x = (const v8 *)(src + (int64_t)ent[q].col * TB);
                for (int i = 0; i < NV; i++) acc[i] += w * x[i];
            }
            for (int i = 0; i < NV; i++) o[i] = acc[i];
        }
}

/* Row k of r summed over its lanes, into lane k of the result: log2(VL) folds, each adding the two shuffles of
 * a transpose stage, so VL kept weights share one reduction (about three operations a weight, where a
 * reduction per weight costs eight). */
static inline __attribute__((always_inline)) v8 sum_rows(v8 r[VL]) {
#define FOLD(h)                                                                                    \
    for (int i = 0; i < (h); i++) {                                                                \
        v8 a_ = r[i], b_ = r[i + (h)];                                                             \
        r[i] = __builtin_shuffle(a_, b_, (vi)LANES(LO_LANE, h)) + __builtin_shuffle(a_, b_, (vi)LANES(HI_LANE, h)); \
    }
#if VL == 16
    FOLD(8)
#endif
    FOLD(4)
    FOLD(2)
    FOLD(1)
#undef FOLD
    return r[0];
}

/* Both gradients of one token block over the schedule of the entries listed by input (an item: input c and a run
 * of its entries, each an output r and a value w): gx[c][:] = sum of w * gout[r][:], and part[e] += <gout[r][:],
 * x[c][:]> for the schedule's entry e. Each output-gradient row is loaded once for both products (the two computed
 * apart loaded it twice), the chunk's rows from the first-level cache; the dot products are reduced VL at a time
 * (sum_rows), in the schedule's order across items. with_gx 0 (a constant): the weights' gradient alone, the same
 * bits. */
static inline __attribute__((always_inline)) void both_grads(const struct schedule *s, const float *gout,
                                                             const float *x, float *gx, float *part, int with_gx) {
    const struct entry *ent = s->ent;
    v8 dots[VL];
    int fill = 0;
    int64_t e = 0;
    for (int64_t k = 0; k < s->nchunks; k++)
        for (int64_t it = s->first[k]; it < s->first[k + 1]; it++) {
            const int64_t c = s->row[it];
            v8 *o = (v8 *)(gx + c * TB), acc[NV], xc[NV];
            for (int i = 0; i < NV; i++) {
                xc[i] = ((const v8 *)(x + c * TB))[i];
                if (with_gx) acc[i] = k == 0 ? (v8){} : o[i];
            }
            for (const int64_t e1 = e + s->count[it]; e < e1; e++) {
                const v8 *g = (const v8 *)(gout + (int64_t)ent[e].col * TB);
                v8 d = g[0] * xc[0];
                if (with_gx) acc[0] += ent[e].val * g[0];
                for (int i = 1; i < NV; i++) {
                    d += g[i] * xc[i];
                    if (with_gx) acc[i] += ent[e].val * g[i];
                }
                dots[fill++] = d;
                if (fill == VL) {
                    v8 sums = sum_rows(dots), old;
                    memcpy(&old, part + e + 1 - VL, sizeof old);
                    old += sums;
                    memcpy(part + e + 1 - VL, &old, sizeof old);
                    fill = 0;
                }
            }
            if (with_gx)
                for (int i = 0; i < NV; i++) o[i] = acc[i];
        }
    if (fill) {
        for (int i = fill; i < VL; i++) dots[i] = (v8){};
        v8 sums = sum_rows(dots);
        for (int i = 0; i < fill; i++) part[e - fill + i] += sums[i];
    }
}

static void both_grads_block(const struct schedule *s, const float *gout, const float *x, float *gx, float *part) {
    both_grads(s, gout, x, gx, part, 1);
}

static void weight_grads_block(const struct schedule *s, const float *gout, const float *x, float *part) {
    both_grads(s, gout, x, 0, part, 0);
}

/* ---- bfloat16 (under CPU autocast): the same products, half the bytes ----
 * x, the output gradient, the outputs and the input gradient are bfloat16 [T, *]; the kept weights are given in
 * float32 (the master copy) and rounded to bfloat16 once a call, as autocast rounds a dense Linear's weight; every
 * sum is float32, and so is the kept weights' gradient. The token blocks hold bfloat16 [rows][TB], so each
 * kept weight reads 128 bytes a block instead of 256. With AVX512-BF16 one instruction (vdpbf16ps) takes 32
 * products into 16 float32 sums: the forward and the input gradient pair two kept weights of a row (their two
 * inputs' rows interleaved by unpack, which leaves the tokens in a fixed permuted order, undone once per row);
 * the weight gradient pairs neighbouring tokens, its reduction's own order. Without AVX512-BF16 the same pairs
 * go through two float32 multiply-adds. AVX-512 builds only (condensed_bf16() says); others compute in float32. */
#if VL == 16
#include "bf16.h"

int condensed_bf16(void) { return 1; }

/* buf[c][j] = src[(t0 + j) * ld + c] for j < nb, zero for nb <= j < TB (bfloat16 both; tiles widened to float32,
 * transposed as in load_block, narrowed back exactly) */
static void load_block16(const bf16 *src, int64_t ld, int64_t cols, int64_t t0, int64_t nb, bf16 *buf) {
    if (nb < TB) memset(buf, 0, (size_t)cols * TB * sizeof(bf16));
    for (int64_t c0 = 0; c0 < cols; c0 += VL) {
        const int64_t c1 = c0 + VL < cols ? c0 + VL : cols;
        for (int64_t j0 = 0; j0 < nb; j0 += VL) {
            const int64_t j1 = j0 + VL < nb ? j0 + VL : nb;
            if (c1 - c0 == VL && j1 - j0 == VL) {
                v8 r[VL];
                for (int k = 0; k < VL; k++)
                    r[k] = (v8)widen16(_mm256_loadu_si256((const __m256i *)(src + (t0 + j0 + k) * ld + c0)));
                transpose_tile(r);
                for (int k = 0; k < VL; k++)
                    _mm256_storeu_si256((__m256i *)(buf + (c0 + k) * TB + j0),
                                        narrow_exact16((__m512)r[k]));
                continue;
            }
            for (int64_t j = j0; j < j1; j++)
                for (int64_t c = c0; c < c1; c++) buf[c * TB + j] = src[(t0 + j) * ld + c];
        }
    }
}

/* dst[(t0 + j) * ld + c] = buf[c][j] rounded to bfloat16, for j < nb (buf float32) */
static void store_block16(const float *buf, int64_t cols, int64_t t0, int64_t nb, bf16 *dst, int64_t ld) {
    for (int64_t c0 = 0; c0 < cols; c0 += VL) {
        const int64_t c1 = c0 + VL < cols ? c0 + VL : cols;
        for (int64_t j0 = 0; j0 < nb; j0 += VL) {
            const int64_t j1 = j0 + VL < nb ? j0 + VL : nb;
            if (c1 - c0 == VL && j1 - j0 == VL) {
                v8 r[VL];
                for (int k = 0; k < VL; k++) r[k] = *(const v8 *)(buf + (c0 + k) * TB + j0);
                transpose_tile(r);
                for (int k = 0; k < VL; k++)
                    _mm256_storeu_si256((__m256i *)(dst + (t0 + j0 + k) * ld + c0), narrow16((__m512)r[k]));
                continue;
            }
            for (int64_t j = j0; j < j1; j++)
                for (int64_t c = c0; c < c1; c++) dst[(t0 + j) * ld + c] = round_bf16(buf[c * TB + j]);
        }
    }
}

/* Two kept weights (w: their bfloat16 pair) of inputs s0 and s1 over 64 tokens, into acc[0..3]: unpacking the two
 * rows' 32-token halves puts tokens 8L + j (j < 4) of 128-bit lane L in the low unpack and 8L + 4 + j in the high */
static inline __attribute__((always_inline)) void pair_block(__m512 acc[4], __m512i w, const bf16 *s0, const bf16 *s1) {
    for (int h = 0; h < 2; h++) {  /* (s1 null: zeros) */
        const __m512i a = _mm512_load_si512(s0 + 32 * h), b = s1 ? _mm512_load_si512(s1 + 32 * h) : _mm512_setzero_si512();
        acc[2 * h] = dot2(acc[2 * h], _mm512_unpacklo_epi16(a, b), w);
        acc[2 * h + 1] = dot2(acc[2 * h + 1], _mm512_unpackhi_epi16(a, b), w);
    }
}

/* out[r][:] = bias[r] + sum over the entries q of row r of w16[q] * src[idx[q]][:] (src bfloat16 [*][TB], out
 * float32 [rows][TB]); two pairs of entries an iteration into two sets of sums, so eight chains hide the latency */
static void rows_times_block16(const int64_t *ptr, const int32_t *idx, const bf16 *w16, const float *bias,
                               int64_t rows, const bf16 *src, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        __m512 acc[4], more[4];
        for (int i = 0; i < 4; i++) acc[i] = more[i] = _mm512_setzero_ps();
        int64_t q = ptr[r];
        const int64_t q1 = ptr[r + 1];
#define PAIR(q) weight_pair(w16[q], w16[(q) + 1])
        for (; q + 4 <= q1; q += 4) {
            pair_block(acc, PAIR(q), src + (int64_t)idx[q] * TB, src + (int64_t)idx[q + 1] * TB);
            pair_block(more, PAIR(q + 2), src + (int64_t)idx[q + 2] * TB, src + (int64_t)idx[q + 3] * TB);
        }
        if (q + 2 <= q1) {
            pair_block(acc, PAIR(q), src + (int64_t)idx[q] * TB, src + (int64_t)idx[q + 1] * TB);
            q += 2;
        }
#undef PAIR
        if (q < q1)  /* an odd last entry: paired with zeros */
            pair_block(more, _mm512_set1_epi32((int)w16[q]), src + (int64_t)idx[q] * TB, 0);
        const __m512 b = _mm512_set1_ps(bias ? bias[r] : 0.0f);
        for (int h = 0; h < 2; h++) {
            __m512 first, second;
            unpermute_pairs(_mm512_add_ps(acc[2 * h], more[2 * h]), _mm512_add_ps(acc[2 * h + 1], more[2 * h + 1]),
                            &first, &second);
            _mm512_store_ps(out + r * TB + 32 * h, _mm512_add_ps(b, first));
            _mm512_store_ps(out + r * TB + 32 * h + 16, _mm512_add_ps(b, second));
        }
    }
}

/* part[q] += <gout[r][:], x[col[q]][:]> over the block's 64 tokens, VL kept weights reduced together (sum_rows) */
static void weight_grad_block16(const int64_t *row_ptr, const int32_t *col, int64_t rows, const bf16 *gout,
                                const bf16 *x, float *part) {
    for (int64_t r = 0; r < rows; r++) {
        const __m512i g0 = _mm512_load_si512(gout + r * TB), g1 = _mm512_load_si512(gout + r * TB + 32);
        int64_t q = row_ptr[r];
        const int64_t q1 = row_ptr[r + 1];
        for (; q + VL <= q1; q += VL) {
            v8 acc[VL];
            for (int k = 0; k < VL; k++) {
                const bf16 *s = x + (int64_t)col[q + k] * TB;
                acc[k] = (v8)dot2(dot2(_mm512_setzero_ps(), g0, _mm512_load_si512(s)), g1, _mm512_load_si512(s + 32));
            }
            v8 sums = sum_rows(acc), old;
            memcpy(&old, part + q, sizeof old);
            old += sums;
            memcpy(part + q, &old, sizeof old);
        }
        for (; q < q1; q++) {
            const bf16 *s = x + (int64_t)col[q] * TB;
            part[q] += _mm512_reduce_add_ps(dot2(dot2(_mm512_setzero_ps(), g0, _mm512_load_si512(s)), g1, _mm512_load_si512(s + 32)));
        }
    }
}
#else
int condensed_bf16(void) { return 0; }
#endif

struct by_input;

struct condensed_args {
    int64_t t, in, out, nblocks, nthreads;
    const float *x, *gout, *values, *bias;
    const int64_t *row_ptr;
    const int32_t *col;
    float *y, *gx, *partial;
    const struct by_input *by_in;  /* backward: the entries listed by input, for the input gradient */
    const struct schedule *plan;   /* float32: the forward's entries (forward), or by_in's (backward), in chunks */
    int failed;
    /* bfloat16 calls: x, gout, y, gx in bfloat16 (the float32 pointers above unused), the kept weights rounded to
     * bfloat16 row by row (w16) and by input (tval16) */
    const void *x16, *gout16, *w16, *tval16;
    void *y16, *gx16;
};

static void forward_worker(void *p, int64_t worker) {
    struct condensed_args *a = (struct condensed_args *)p;
    float *bufs[2];
    const int64_t rows[2] = {a->in, a->out};
    int failed = block_buffers(2, rows, bufs);
    float *xb = bufs[0], *yb = bufs[1];
    if (failed) {
        a->failed = 1;
    } else {
        for (int64_t blk = worker; blk < a->nblocks; blk += a->nthreads) {
            int64_t t0 = blk * TB, nb = a->t - t0 < TB ? a->t - t0 : TB;
#if VL == 16
            if (a->x16) {
                load_block16((const bf16 *)a->x16, a->in, a->in, t0, nb, (bf16 *)xb);
                rows_times_block16(a->row_ptr, a->col, (const bf16 *)a->w16, a->bias, a->out, (const bf16 *)xb, yb);
                store_block16(yb, a->out, t0, nb, (bf16 *)a->y16, a->out);
                continue;
            }
#endif
            load_block(a->x, a->in, a->in, t0, nb, xb);
            schedule_times_block(a->plan, a->bias, xb, yb);
            store_block(yb, a->out, t0, nb, a->y, a->out);
        }
    }
}

static int run_forward(struct condensed_args *a, int nthreads) {
    a->nthreads = nthreads < 1 ? 1 : (nthreads > a->nblocks ? a->nblocks : nthreads);
    if (a->nthreads > MAX_THREADS) a->nthreads = MAX_THREADS;
    parallel_workers(forward_worker, a, a->nthreads, (int)a->nthreads);
    return a->failed ? -1 : 0;
}

/* y[T, out] = x[T, in] W_s^T + bias (bias may be null). Returns 0, or -1 when out of memory. */
int condensed_forward(const int64_t *dims, const float *x, const float *values, const float *bias, const int64_t *row_ptr,
                      const int32_t *col, float *y, int nthreads) {
    struct schedule plan;
    if (build_schedule(row_ptr, col, values, 0, dims[2], dims[1], &plan)) return -1;
    struct condensed_args a = {dims[0], dims[1], dims[2], (dims[0] + TB - 1) / TB, 0, x, 0, values, bias,
                               row_ptr, col, y, 0, 0, 0, &plan, 0};
    int rc = run_forward(&a, nthreads);
    free_schedule(&plan);
    return rc;
}


/* condensed_forward with x [T, in] and y [T, out] in bfloat16 (values and bias float32). Returns 0, -1 when out of
 * memory, -2 on a build without the bfloat16 kernels (condensed_bf16() is 0). */
int condensed_forward_bf16(const int64_t *dims, const void *x, const float *values, const float *bias,
                           const int64_t *row_ptr, const int32_t *col, void *y, int nthreads) {
#if VL == 16
    bf16 *w16 = rounded_bf16(values, row_ptr[dims[2]]);
    if (!w16) return -1;
    struct condensed_args a = {dims[0], dims[1], dims[2], (dims[0] + TB - 1) / TB, 0, 0, 0, values, bias,
                               row_ptr, col, 0, 0, 0, 0, 0, 0, x, 0, w16, 0, y, 0};
    int rc = run_forward(&a, nthreads);
    free(w16);
    return rc;
#else
    (void)dims, (void)x, (void)values, (void)bias, (void)row_ptr, (void)col, (void)y, (void)nthreads;
    return -2;
#endif
}

/* ---- forward only, tokens innermost (inference): rows split among threads ----
 * The token-block forward above transposes x into [in][TB] blocks and gives each thread whole blocks: with few
 * tokens (a one-image batch) that is one block on one thread, each kept weight reading a line of a buffer far
 * larger than its tokens. Here x comes as xt[in][tp] (tokens innermost, tp a multiple of VL, zeros past the
 * last token: a one-image batch's unfolded patches, or an NCHW 1 x 1 input, are laid so already); the work is
 * cut into (chunk of at most TB tokens) x (FEW_ROWS rows), every kept weight costing up to TB / VL vector
 * multiply-adds on its input's row of the chunk, rows of one chunk taken together so the chunk's x stays in
 * cache. y[out][tp]. */
#define FEW_ROWS 32
struct few_args {
    int64_t tp, out, nrb;
    const float *xt, *values, *bias;
    const int64_t *row_ptr;
    const int32_t *col;
    float *y;
};

#define FEW_ROW(NVEC)                                                                            \
    for (int64_t r = r0; r < r1; r++) {                                                         \
        float b = a->bias ? a->bias[r] : 0.0f;                                                  \
        v8 acc[NVEC];                                                                           \
        for (int k = 0; k < NVEC; k++) acc[k] = (v8){0} + b;                                    \
        for (int64_t e = a->row_ptr[r]; e < a->row_ptr[r + 1]; e++) {                           \
            const float *xr = a->xt + (int64_t)a->col[e] * a->tp + t0;                          \
            v8 v = (v8){0} + a->values[e];                                                      \
            for (int k = 0; k < NVEC; k++) {                                                    \
                v8 xv;                                                                          \
                memcpy(&xv, xr + k * VL, sizeof xv);                                            \
                acc[k] += v * xv;                                                               \
            }                                                                                   \
        }                                                                                       \
        memcpy(a->y + r * a->tp + t0, acc, sizeof acc);                                         \
    }

static void few_rows(void *p, int64_t item) {
    const struct few_args *a = (const struct few_args *)p;
    int64_t t0 = (item / a->nrb) * TB, r0 = (item % a->nrb) * FEW_ROWS;
    int64_t r1 = r0 + FEW_ROWS < a->out ? r0 + FEW_ROWS : a->out;
    switch ((a->tp - t0 < TB ? a->tp - t0 : TB) / VL) {  /* a fixed vector count a case: accumulators in registers */
        case 1: FEW_ROW(1) break;
        case 2: FEW_ROW(2) break;
        case 3: FEW_ROW(3) break;
        case 4: FEW_ROW(4) break;
#if VL == 8
        case 5: FEW_ROW(5) break;
        case 6: FEW_ROW(6) break;
        case 7: FEW_ROW(7) break;
        case 8: FEW_ROW(8) break;
#endif
    }
}

int condensed_lanes(void) { return VL; }

/* dims: tp (a multiple of VL), in, out. Returns -1 for any other tp. */
int condensed_forward_few(const int64_t *dims, const float *xt, const float *values, const float *bias,
                          const int64_t *row_ptr, const int32_t *col, float *y, int nthreads) {
    if (dims[0] < VL || dims[0] % VL) return -1;
    struct few_args a = {dims[0], dims[2], (dims[2] + FEW_ROWS - 1) / FEW_ROWS, xt, values, bias, row_ptr, col, y};
    parallel_workers(few_rows, &a, ((a.tp + TB - 1) / TB) * a.nrb, nthreads);
    return 0;
}

/* The kept entries listed by input (column): for input c, entries tptr[c] .. tptr[c + 1] - 1 with their rows
 * trow[] and values tval[]. Built per backward call by a counting sort (a few passes over nnz, against nnz * T
 * multiply-adds of the products), so the input gradient is a product of the same form as the forward: the
 * gradient of input c summed in registers over its entries, gx read and written once per token block. */
struct by_input {
    int64_t *tptr;
    int32_t *trow, *torig;  /* each entry's row and its position in the row lists */
    float *tval;
};

static int list_by_input(const int64_t *row_ptr, const int32_t *col, const float *values, int64_t rows, int64_t cols,
                         struct by_input *t) {
    const int64_t nnz = row_ptr[rows];
    int64_t *next = (int64_t *)malloc((size_t)(cols + 1) * sizeof(int64_t));
    t->tptr = (int64_t *)calloc((size_t)cols + 1, sizeof(int64_t));
    t->trow = (int32_t *)malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof(int32_t));
    t->tval = (float *)malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof(float));
    t->torig = (int32_t *)malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof(int32_t));
    if (!next || !t->tptr || !t->trow || !t->tval || !t->torig) {
        free(next);
        return -1;
    }
    for (int64_t q = 0; q < nnz; q++) t->tptr[col[q] + 1]++;
    for (int64_t c = 0; c < cols; c++) t->tptr[c + 1] += t->tptr[c];
    memcpy(next, t->tptr, (size_t)(cols + 1) * sizeof(int64_t));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t q = row_ptr[r]; q < row_ptr[r + 1]; q++) {
            const int64_t d = next[col[q]]++;
            t->trow[d] = (int32_t)r;
            t->tval[d] = values[q];
            t->torig[d] = (int32_t)q;
        }
    free(next);
    return 0;
}

static void free_by_input(struct by_input *t) {
    free(t->tptr);
    free(t->trow);
    free(t->tval);
    free(t->torig);
}

/* One float32 token block of the backward: the kept weights' gradient added into part_e (the schedule's order), the
 * input gradient into gx. */
static void backward_block(const struct condensed_args *a, int64_t t0, int64_t nb, float *gb, float *xb, float *gxb,
                           float *part_e) {
    load_block(a->gout, a->out, a->out, t0, nb, gb);
    if (part_e) load_block(a->x, a->in, a->in, t0, nb, xb);
    if (part_e && gxb)
        both_grads_block(a->plan, gb, xb, gxb, part_e);
    else if (part_e)
        weight_grads_block(a->plan, gb, xb, part_e);
    else
        schedule_times_block(a->plan, 0, gb, gxb);
    if (gxb) store_block(gxb, a->in, t0, nb, a->gx, a->in);
}

static void backward_worker(void *p, int64_t worker) {
    struct condensed_args *a = (struct condensed_args *)p;
    float *bufs[3];
    const int64_t nnz = a->row_ptr[a->out], rows[3] = {a->out, a->partial ? a->in : 0, a->gx || a->gx16 ? a->in : 0};
    float *part = a->partial ? a->partial + worker * nnz : 0;
    float *part_e = part && a->plan ? scratch_get(2, (size_t)(nnz > 0 ? nnz : 1)) : 0;  /* float32: schedule order */
    if (block_buffers(3, rows, bufs) || (part && a->plan && !part_e)) {
        a->failed = 1;
        return;
    }
    float *gb = bufs[0], *xb = a->partial ? bufs[1] : 0, *gxb = a->gx || a->gx16 ? bufs[2] : 0;
    if (part) memset(part_e ? part_e : part, 0, (size_t)nnz * sizeof(float));
    for (int64_t blk = worker; blk < a->nblocks; blk += a->nthreads) {
        int64_t t0 = blk * TB, nb = a->t - t0 < TB ? a->t - t0 : TB;
#if VL == 16
        if (a->gout16) {
            load_block16((const bf16 *)a->gout16, a->out, a->out, t0, nb, (bf16 *)gb);
            if (part) {
                load_block16((const bf16 *)a->x16, a->in, a->in, t0, nb, (bf16 *)xb);
                weight_grad_block16(a->row_ptr, a->col, a->out, (const bf16 *)gb, (const bf16 *)xb, part);
            }
            if (gxb) {
                rows_times_block16(a->by_in->tptr, a->by_in->trow, (const bf16 *)a->tval16, 0, a->in,
                                   (const bf16 *)gb, gxb);
                store_block16(gxb, a->in, t0, nb, (bf16 *)a->gx16, a->in);
            }
            continue;
        }
#endif
        backward_block(a, t0, nb, gb, xb, gxb, part_e);
    }
    for (int64_t e = 0; part_e && e < nnz; e++) part[a->plan->origin[e]] = part_e[e];  /* back to the rows' order */
}

static int run_backward(struct condensed_args *a, int workers, int nthreads) {
    struct by_input by_in = {0, 0, 0, 0};
    struct schedule plan = {0};
    void *tval16 = 0;
    int64_t n = workers < 1 ? 1 : workers;
    if (n > a->nblocks) n = a->nblocks;
    if (n > MAX_THREADS) n = MAX_THREADS;
    a->nthreads = n;
    a->by_in = &by_in;
    int failed = 0;
    if (a->gx || a->gx16 || a->gout) {  /* (float32: both gradients go over the entries listed by input) */
        failed = list_by_input(a->row_ptr, a->col, a->values, a->out, a->in, &by_in) != 0;
#if VL == 16
        if (!failed && a->gx16) failed = !(a->tval16 = tval16 = rounded_bf16(by_in.tval, a->row_ptr[a->out]));
#endif
        if (!failed && a->gout) {
            failed = build_schedule(by_in.tptr, by_in.trow, by_in.tval, by_in.torig, a->in, a->out, &plan) != 0;
            a->plan = &plan;
        }
    }
    if (!failed) parallel_workers(backward_worker, a, n, nthreads);
    free(tval16);
    free_schedule(&plan);
    free_by_input(&by_in);
    return failed || a->failed ? -1 : (int)n;
}

/* The gradients of condensed_forward: gx[T, in] (if gx is not null) and, if partial is not null, the
 * gradient of each kept weight summed over each worker's tokens into partial[workers][nnz] (the caller
 * adds the rows). Returns the number of workers used, or -1 when out of memory. */
int condensed_backward(const int64_t *dims, const float *x, const float *gout, const float *values, const int64_t *row_ptr,
                       const int32_t *col, float *gx, float *partial, int workers, int nthreads) {
    struct condensed_args a = {dims[0], dims[1], dims[2], (dims[0] + TB - 1) / TB, 0, x, gout, values, 0,
                               row_ptr, col, 0, gx, partial, 0, 0, 0};
    return run_backward(&a, workers, nthreads);
}

/* condensed_backward with x, gout and gx in bfloat16 (values and partial float32); -2 on a build without the
 * bfloat16 kernels. */
int condensed_backward_bf16(const int64_t *dims, const void *x, const void *gout, const float *values,
                            const int64_t *row_ptr, const int32_t *col, void *gx, float *partial, int workers,
                            int nthreads) {
#if VL == 16
    struct condensed_args a = {dims[0], dims[1], dims[2], (dims[0] + TB - 1) / TB, 0, 0, 0, values, 0,
                               row_ptr, col, 0, 0, partial, 0, 0, 0, x, gout, 0, 0, 0, gx};
    return run_backward(&a, workers, nthreads);
#else
    (void)dims, (void)x, (void)gout, (void)values, (void)row_ptr, (void)col, (void)gx, (void)partial;
    (void)workers, (void)nthreads;
    return -2;
#endif
}
