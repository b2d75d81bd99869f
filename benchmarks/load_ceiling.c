/* What one core sustains for the inner loop of the condensed Linear kernels (native/condensed.c), against its
 * multiply-add peak. Built and run by load_ceiling.py; prints one JSON object.
 *
 * Every kept weight of a row multiplies its input's row of a token block: one 16-float vector load per vector
 * multiply-add, since two rows of an unstructured mask rarely share an input. A dense product reuses each loaded
 * vector across a register tile (MKL: about 0.7 of the register peak); this loop cannot, so its ceiling is what the
 * core does with one load per multiply-add, measured here with every row in the first-level cache:
 *   peak       independent multiply-adds on registers (12 chains): the core's multiply-add rate;
 *   l1_fixed   one aligned load per multiply-add, addresses known (8 chains, two rows at a time);
 *   l1_listed  the kernel's loop: each entry's column and weight read from its list, 4 vectors a row (4 chains);
 *   shared     two rows reading the same input vector (one load per two multiply-adds): what a mask with rows
 *              sharing inputs would allow;
 *   bf16_peak  independent vdpbf16ps on registers (12 chains), each 32 bfloat16 products summed in pairs into 16
 *              floats (-1 where the build has no AVX512-BF16; on the Intel Xeon this loop runs slower than the
 *              next, which interleaves loads and unpacks: read it as a floor of the issue rate, not a peak);
 *   bf16_listed the bfloat16 kernels' loop (condensed.c's pair_block): two kept weights of a row a step, their
 *              inputs' 64 bfloat16 tokens loaded from the list, unpacked into pairs, one vdpbf16ps per 16 tokens
 *              (8 chains), in vdpbf16ps a ns (each 32 products: against `l1_listed`'s 16 a multiply-add). */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define N 4096
#define REPS 20000L
#define FMA(a, w, p) a = _mm512_fmadd_ps(w, _mm512_load_ps(p), a)

#ifdef __AVX512BF16__
/* vdpbf16ps a second on 12 independent chains held in registers (a function of its own: in main the compiler kept
 * some chains in memory) */
static __attribute__((noinline)) double dot_chains(long n) {
    const __m512bh p = (__m512bh)_mm512_set1_epi16(0x3400), q = (__m512bh)_mm512_set1_epi16(0x3400); /* 2^-23 */
    __m512 d0 = _mm512_set1_ps(0.f), d1 = _mm512_set1_ps(1.f), d2 = _mm512_set1_ps(2.f), d3 = _mm512_set1_ps(3.f),
           d4 = _mm512_set1_ps(4.f), d5 = _mm512_set1_ps(5.f), d6 = _mm512_set1_ps(6.f), d7 = _mm512_set1_ps(7.f),
           d8 = _mm512_set1_ps(8.f), d9 = _mm512_set1_ps(9.f), d10 = _mm512_set1_ps(10.f), d11 = _mm512_set1_ps(11.f);
#define DOT(r) r = _mm512_dpbf16_ps(r, p, q)
    const double t = now();
    for (long k = 0; k < n; k++) {
        DOT(d0), DOT(d1), DOT(d2), DOT(d3), DOT(d4), DOT(d5);
        DOT(d6), DOT(d7), DOT(d8), DOT(d9), DOT(d10), DOT(d11);
    }
    const double rate = 12.0 * n / (now() - t);
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(d0, d1), _mm512_add_ps(d2, d3)), _mm512_add_ps(d4, d5));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(d6, d7), _mm512_add_ps(d8, d9)),
                                       _mm512_add_ps(d10, d11)));
    return rate + 0.0 * (double)_mm512_reduce_add_ps(s);
}
#endif

int main(void) {
    float *x = aligned_alloc(64, 64 * 64 * sizeof(float)), *wv = aligned_alloc(64, N * sizeof(float));
    int *cols = aligned_alloc(64, N * sizeof(int));
    for (int i = 0; i < 64 * 64; i++) x[i] = (float)i * 1e-4f;
    for (int i = 0; i < N; i++) wv[i] = 1e-3f * (float)(i % 13), cols[i] = (i * 7) % 32;
    __m512 a[12], b[4];
    for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps((float)i);
    for (int i = 0; i < 4; i++) b[i] = _mm512_set1_ps((float)i);
    const __m512 w = _mm512_set1_ps(0.9999f), c = _mm512_set1_ps(1e-4f);  /* (bounded: a -> 1) */
    double t = now(), rate[4];
    const long n = 50000000;
    __m512 r0 = a[0], r1 = a[1], r2 = a[2], r3 = a[3], r4 = a[4], r5 = a[5], r6 = a[6], r7 = a[7], r8 = a[8],
           r9 = a[9], r10 = a[10], r11 = a[11];  /* (named, so that they stay in registers) */
#define STEP(r) r = _mm512_fmadd_ps(r, w, c)
    for (long k = 0; k < n; k++) {
        STEP(r0), STEP(r1), STEP(r2), STEP(r3), STEP(r4), STEP(r5);
        STEP(r6), STEP(r7), STEP(r8), STEP(r9), STEP(r10), STEP(r11);
    }
    rate[0] = 12.0 * n / (now() - t);
    a[0] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(r0, r1), _mm512_add_ps(r2, r3)), _mm512_add_ps(r4, r5));
    a[1] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(r6, r7), _mm512_add_ps(r8, r9)), _mm512_add_ps(r10, r11));
    t = now();
    for (long r = 0; r < REPS; r++)
        for (int q = 0; q < N; q += 2) {
            const __m512 u = _mm512_set1_ps(wv[q]), v = _mm512_set1_ps(wv[q + 1]);
            const float *s = x + (q & 31) * 64, *z = x + ((q + 1) & 31) * 64;
            FMA(a[0], u, s), FMA(a[1], u, s + 16), FMA(a[2], u, s + 32), FMA(a[3], u, s + 48);
            FMA(b[0], v, z), FMA(b[1], v, z + 16), FMA(b[2], v, z + 32), FMA(b[3], v, z + 48);
        }
    rate[1] = 4.0 * REPS * N / (now() - t);
    t = now();
    for (long r = 0; r < REPS; r++)
        for (int q = 0; q < N; q++) {
            const __m512 u = _mm512_set1_ps(wv[q]);
            const float *s = x + cols[q] * 64;
            FMA(a[4], u, s), FMA(a[5], u, s + 16), FMA(a[6], u, s + 32), FMA(a[7], u, s + 48);
        }
    rate[2] = 4.0 * REPS * N / (now() - t);
    t = now();
    for (long r = 0; r < REPS; r++)
        for (int q = 0; q < N; q += 2) {
            const __m512 u = _mm512_set1_ps(wv[q]), v = _mm512_set1_ps(wv[q + 1]);
            const float *s = x + cols[q] * 64;
            const __m512 x0 = _mm512_load_ps(s), x1 = _mm512_load_ps(s + 16), x2 = _mm512_load_ps(s + 32),
                         x3 = _mm512_load_ps(s + 48);
            a[8] = _mm512_fmadd_ps(u, x0, a[8]), a[9] = _mm512_fmadd_ps(u, x1, a[9]);
            a[10] = _mm512_fmadd_ps(u, x2, a[10]), a[11] = _mm512_fmadd_ps(u, x3, a[11]);
            b[0] = _mm512_fmadd_ps(v, x0, b[0]), b[1] = _mm512_fmadd_ps(v, x1, b[1]);
            b[2] = _mm512_fmadd_ps(v, x2, b[2]), b[3] = _mm512_fmadd_ps(v, x3, b[3]);
        }
    rate[3] = 4.0 * REPS * N / (now() - t);
    double bf16_peak = -1e9, bf16_listed = -1e9;
#ifdef __AVX512BF16__
    {
        bf16_peak = dot_chains(n);
        uint16_t *xb = aligned_alloc(64, 64 * 64 * sizeof(uint16_t));
        for (int i = 0; i < 64 * 64; i++) xb[i] = (uint16_t)(0x3c00 + (i % 7));
        __m512 e[8];
        for (int i = 0; i < 8; i++) e[i] = _mm512_setzero_ps();
#define PAIR(acc, wp, s0, s1)                                                                                        \
    for (int h = 0; h < 2; h++) {                                                                                    \
        const __m512i xa = _mm512_load_si512(s0 + 32 * h), xc = _mm512_load_si512(s1 + 32 * h);                     \
        acc[2 * h] = _mm512_dpbf16_ps(acc[2 * h], (__m512bh)_mm512_unpacklo_epi16(xa, xc), (__m512bh)wp);         \
        acc[2 * h + 1] = _mm512_dpbf16_ps(acc[2 * h + 1], (__m512bh)_mm512_unpackhi_epi16(xa, xc), (__m512bh)wp); \
    }
        t = now();
        for (long r = 0; r < REPS; r++)
            for (int q = 0; q < N; q += 4) {
                const __m512i w0 = _mm512_set1_epi32(0x3c003c00 + q), w1 = _mm512_set1_epi32(0x3c003c01 + q);
                PAIR((e), w0, (xb + cols[q] * 64), (xb + cols[q + 1] * 64));
                PAIR((e + 4), w1, (xb + cols[q + 2] * 64), (xb + cols[q + 3] * 64));
            }
        bf16_listed = 4.0 * REPS * N / (now() - t);
        for (int i = 0; i < 8; i++) a[2] = _mm512_add_ps(a[2], e[i]);
        free(xb);
    }
#endif
    __m512 s = _mm512_add_ps(b[0], _mm512_add_ps(b[1], _mm512_add_ps(b[2], b[3])));
    for (int i = 0; i < 12; i++) s = _mm512_add_ps(s, a[i]);
    printf("{\"peak\": %.3f, \"l1_fixed\": %.3f, \"l1_listed\": %.3f, \"shared\": %.3f, \"bf16_peak\": %.3f, "
           "\"bf16_listed\": %.3f, \"checksum\": %g}\n",
           rate[0] / 1e9, rate[1] / 1e9, rate[2] / 1e9, rate[3] / 1e9, bf16_peak / 1e9, bf16_listed / 1e9,
           (double)_mm512_reduce_add_ps(s) * 0.0);
    return 0;
}
