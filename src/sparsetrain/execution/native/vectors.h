/* The float vector the register-tiled kernels (tiled_conv.c, nhwc_conv.c) compute with: 16 lanes with AVX-512,
 * else 8, with how many accumulators a tile may hold in registers; loads, stores and the sum of a vector's lanes. */
#ifndef SPARSETRAIN_VECTORS_H
#define SPARSETRAIN_VECTORS_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
enum { TL = 16, ACC = 16 };
#else
enum { TL = 8, ACC = 12 };
#endif
typedef float tv __attribute__((vector_size(TL * 4)));
typedef float v4f __attribute__((vector_size(16)));

static inline tv load_tv(const float *p) { tv v; memcpy(&v, p, sizeof v); return v; }
static inline void store_tv(float *p, tv v) { memcpy(p, &v, sizeof v); }

typedef int32_t ti __attribute__((vector_size(TL * 4)));  /* a lane mask */

/* the first n lanes of p (n <= TL); the rest zero */
static inline tv load_lanes(const float *p, int64_t n) {
    tv v = {};
    memcpy(&v, p, n * sizeof(float));
    return v;
}

/* the first n lanes of v into p (n <= TL) */
static inline void store_lanes(float *p, tv v, int64_t n) { memcpy(p, &v, n * sizeof(float)); }

/* all ones in lanes below n, zeros above */
static inline ti lanes_below(int64_t n) {
    ti m;
    for (int i = 0; i < TL; i++) m[i] = i < n ? -1 : 0;
    return m;
}

/* the sum of a vector's lanes as a tree of halvings (a short dependency chain, unlike a lane-by-lane sum) */
static inline float lane_sum(tv v) {
    v4f q[TL / 4];
    memcpy(q, &v, sizeof q);
    for (int w = TL / 4; w > 1; w /= 2)
        for (int i = 0; i < w / 2; i++) q[i] += q[i + w / 2];
    return (q[0][0] + q[0][1]) + (q[0][2] + q[0][3]);
}

#endif
