/* Shared by the kernel families: a chunked parallel-for, on the OpenMP runtime PyTorch runs on where the
 * library is built with OpenMP (the same worker threads: none of ours competes with a spinning torch
 * worker, and no thread is created per call), else on plain pthreads. Each .c file includes this; the
 * functions are static, so each gets its own copy. */
#ifndef SPARSETRAIN_PARALLEL_H
#define SPARSETRAIN_PARALLEL_H

#include <math.h>
#include <pthread.h>
#include <stdint.h>

#define CHUNK 65536
#define MAX_THREADS 64

typedef void (*chunk_fn)(void *args, int64_t chunk);

struct job { chunk_fn fn; void *args; int64_t nchunks; int stride; int first; };

static void *run_job(void *p) {
    struct job *j = (struct job *)p;
    for (int64_t c = j->first; c < j->nchunks; c += j->stride) j->fn(j->args, c);
    return 0;
}

/* fn(args, c) for every chunk c, on up to nthreads threads (the caller's thread is one of them). */
static void parallel_chunks(chunk_fn fn, void *args, int64_t nchunks, int nthreads) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > nchunks) nthreads = (int)nchunks;
    if (nthreads < 1) nthreads = 1;
    pthread_t tid[MAX_THREADS];
    struct job jobs[MAX_THREADS];
    int started = 0;
    for (int t = 0; t < nthreads; t++) jobs[t] = (struct job){fn, args, nchunks, nthreads, t};
    for (int t = 1; t < nthreads; t++) {
        if (pthread_create(&tid[t], 0, run_job, &jobs[t]) != 0) break;
        started = t;
    }
    /* chunks of threads that failed to start run here */
    for (int t = started + 1; t < nthreads; t++) run_job(&jobs[t]);
    run_job(&jobs[0]);
    for (int t = 1; t <= started; t++) pthread_join(tid[t], 0);
}

/* fn(args, w) for every w in [0, n): in the OpenMP runtime PyTorch itself runs on where the library is built
 * with OpenMP (the same worker threads, so none of ours competes with a torch worker still spinning after its
 * last op), else on plain threads. For kernels called between torch ops, several times a step. */
static void parallel_workers(chunk_fn fn, void *args, int64_t n, int nthreads) {
#ifdef _OPENMP
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int64_t w = 0; w < n; w++) fn(args, w);
#else
    parallel_chunks(fn, args, n, nthreads);
#endif
}

static inline int64_t chunk_end(int64_t c, int64_t n) { int64_t e = (c + 1) * CHUNK; return e < n ? e : n; }

#endif
