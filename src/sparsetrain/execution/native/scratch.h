/* Per-thread scratch buffers, kept between calls: a fresh buffer per block or image would fault its pages in every
 * time (a large fresh allocation comes zeroed from the kernel, page by page). Each .c file that includes this gets
 * buffers of its own. */
#ifndef SPARSETRAIN_SCRATCH_H
#define SPARSETRAIN_SCRATCH_H

#include <pthread.h>
#include <stdlib.h>

enum { NSCRATCH = 3 };
struct scratch { float *buf[NSCRATCH]; size_t cap[NSCRATCH]; };
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *p) {
    struct scratch *s = (struct scratch *)p;
    for (int i = 0; i < NSCRATCH; i++) free(s->buf[i]);
    free(s);
}
static void scratch_init(void) { pthread_key_create(&scratch_key, scratch_free); }

/* buffer i of this thread, at least n floats (64-byte aligned); NULL when memory runs out */
static float *scratch_get(int i, size_t n) {
    pthread_once(&scratch_once, scratch_init);
    struct scratch *s = (struct scratch *)pthread_getspecific(scratch_key);
    if (!s) {
        s = (struct scratch *)calloc(1, sizeof *s);
        if (!s) return 0;
        pthread_setspecific(scratch_key, s);
    }
    if (s->cap[i] < n) {
        free(s->buf[i]);
        s->buf[i] = 0;
        s->cap[i] = 0;
        if (posix_memalign((void **)&s->buf[i], 64, n * sizeof(float)) != 0) return 0;
        s->cap[i] = n;
    }
    return s->buf[i];
}

#endif
