/* Every entry point of the kernels' library, declared once.
 *
 * Each source includes this header, so the compiler checks every definition against its declaration, and the
 * Python side reads the same declarations (cffi parses this file: plain declarations only, no macros, between the
 * guard lines) to call them; nothing else restates a signature. Tensors are passed by address, NULL for an
 * absent one. A returning int is a status (0 done, -1 no memory for the buffers, -2 a geometry the path does not
 * take) unless said otherwise. */
#ifndef SPARSETRAIN_KERNELS_H
#define SPARSETRAIN_KERNELS_H
#include <stdint.h>

/* compressed.c: compressed activations (a bitmask and the kept values), ReLU's bits, top-K thresholds */
int64_t chunk_count(int64_t n);
int uses_openmp(void);
void keep_bits_f32(const float *x, int64_t n, float thr, int mode, uint8_t *bits, int64_t *counts, int nthreads);
void gather_f32(const float *x, int64_t n, const uint8_t *bits, const int64_t *offsets, float *values, int nthreads);
void count_bits(const uint8_t *bits, int64_t n, int64_t *counts, int nthreads);
void scatter_f32(const uint8_t *bits, const float *values, const int64_t *offsets, int64_t n, float *out,
                 int nthreads);
void relu_bits_f32(const float *x, int64_t n, float *out, uint8_t *bits, int nthreads);
void relu_grad_f32(const float *grad, const uint8_t *bits, int64_t n, float *out, int nthreads);
void select_f32(const float *x, int64_t n, float thr, float *out, int nthreads);
void kth_largest_abs_f32(const float *x, int64_t n, int64_t k, float *thr, int64_t *count, uint32_t *hist,
                         int nthreads);

/* compressed_grad.c: a convolution's weight gradient from its compressed input */
void compressed_conv_weight_grad(const int64_t *geom, const uint8_t *bits, const float *values, const int64_t *img_off,
                                 const int64_t *plane_off, const float *grad, float *gwt, int64_t *ch_ptr,
                                 int32_t *pos, float *val, int64_t gstride, int nthreads);
void compressed_image_offsets(const uint8_t *bits, int64_t images, int64_t per_image, int64_t *img_off, int nthreads);

/* direct_conv.c: direct sparse convolution, NCHW, and with the batch innermost (_bi) */
void sparse_conv_forward(const int64_t *geom, const float *x, const float *values, const float *bias,
                         const int64_t *co_ptr, const int32_t *ci, const int16_t *kh, const int16_t *kw, float *out,
                         int nthreads);
void sparse_conv_backward_input(const int64_t *geom, const float *grad, const float *values, const int64_t *ci_ptr,
                                const int32_t *co, const int16_t *kh, const int16_t *kw, const int32_t *vidx,
                                float *gx, int nthreads);
void sparse_conv_backward_weight(const int64_t *geom, const float *x, const float *grad, const int64_t *co_ptr,
                                 const int32_t *ci, const int16_t *kh, const int16_t *kw, float *partial, int parts,
                                 int nthreads);
void sparse_conv_forward_bi(const int64_t *geom, const float *x, const float *values, const float *bias,
                            const int64_t *co_ptr, const int32_t *ci, const int16_t *kh, const int16_t *kw,
                            float *out, int nthreads);
void sparse_conv_backward_input_bi(const int64_t *geom, const float *grad, const float *values,
                                   const int64_t *ci_ptr, const int32_t *co, const int16_t *kh, const int16_t *kw,
                                   const int32_t *vidx, float *gx, int nthreads);
void sparse_conv_backward_weight_bi(const int64_t *geom, const float *x, const float *grad, const int64_t *co_ptr,
                                    const int32_t *ci, const int16_t *kh, const int16_t *kw, float *gw, int nthreads);

/* tiled_conv.c: register-tiled stride-1 planes; a weight's entries at or above a threshold, listed */
int tiled_conv_weight_grad(const int64_t *dims, const float *x, const float *grad, const int64_t *ptr,
                           const int32_t *ch, const int16_t *kh, const int16_t *kw, float *partial, int64_t parts,
                           int nthreads);
int tiled_conv_forward(const int64_t *dims, const float *x, const float *values, const float *bias,
                       const int64_t *ptr, const int32_t *ch, const int16_t *kh, const int16_t *kw, float *out,
                       int nthreads);
int tiled_conv_supported(int64_t ho, int64_t wo); /* 1 or 0 */
void threshold_counts(const float *w, int64_t cout, int64_t per_out, float thr, int64_t *co_ptr, int nthreads);
void threshold_lists(const float *w, int64_t cout, int64_t cin, int64_t khn, int64_t kwn, float thr,
                     const int64_t *co_ptr, int32_t *ci, int16_t *kh, int16_t *kw, float *values, int64_t *ci_ptr,
                     int32_t *co_t, int16_t *kh_t, int16_t *kw_t, int32_t *vidx, int nthreads);

/* compact_pool.c: 2 x 2 max-pooling with one byte per output */
void max_pool2_forward(const int64_t *dims, const int64_t *strides, const float *x, float *out, uint8_t *where,
                       int channels_inner, int nthreads);
void max_pool2_backward(const int64_t *dims, const int64_t *strides, const float *grad, const uint8_t *where,
                        float *gx, int channels_inner, int nthreads);

/* condensed.c: Linear layers over kept weights listed row by row (the bf16 paths take and give bfloat16) */
int condensed_bf16(void); /* 1 where this build has the bfloat16 paths */
int condensed_lanes(void);
int condensed_forward(const int64_t *dims, const float *x, const float *values, const float *bias,
                      const int64_t *row_ptr, const int32_t *col, float *y, int nthreads);
int condensed_forward_bf16(const int64_t *dims, const void *x, const float *values, const float *bias,
                           const int64_t *row_ptr, const int32_t *col, void *y, int nthreads);
int condensed_forward_few(const int64_t *dims, const float *xt, const float *values, const float *bias,
                          const int64_t *row_ptr, const int32_t *col, float *y, int nthreads);
/* the backward pair returns how many partial sums of the weight gradient it wrote, -1 without memory */
int condensed_backward(const int64_t *dims, const float *x, const float *gout, const float *values,
                       const int64_t *row_ptr, const int32_t *col, float *gx, float *partial, int workers,
                       int nthreads);
int condensed_backward_bf16(const int64_t *dims, const void *x, const void *gout, const float *values,
                            const int64_t *row_ptr, const int32_t *col, void *gx, float *partial, int workers,
                            int nthreads);

/* nhwc_conv.c: channels-last direct sparse convolution */
int nhwc_lanes(void);
int nhwc_accumulators(void);
int nhwc_lanes_bf16(void); /* 0 where this build has no bfloat16 paths */
int nhwc_conv_forward(const int64_t *geom, const float *x, const float *values, const float *bias, const int64_t *ptr,
                      const int32_t *ci, const int16_t *kh, const int16_t *kw, float *out, int64_t block,
                      int nthreads);
int nhwc_conv_weight_grad(const int64_t *geom, const float *x, const float *grad, const int64_t *ptr,
                          const int32_t *ci, const int16_t *kh, const int16_t *kw, float *partial, int64_t parts,
                          int64_t block, int nthreads);
int nhwc_conv_input_grad_scatter(const int64_t *geom, const float *grad, const float *values, const int64_t *ptr,
                                 const int32_t *co, const int16_t *kh, const int16_t *kw, const int32_t *vidx,
                                 float *gx, int64_t block, int nthreads);
int nhwc_conv_backward(const int64_t *geom, const int64_t *back, const float *x, const float *grad,
                       const int64_t *ptr, const int32_t *ci, const int16_t *kh, const int16_t *kw,
                       const float *fvalues, const int64_t *fptr, const int32_t *co, const int16_t *fkh,
                       const int16_t *fkw, float *gx, float *partial, int64_t parts, int64_t block, int nthreads);
int nhwc_conv_forward_bf16(const int64_t *geom, const void *x, const float *values, const float *bias,
                           const int64_t *ptr, const int32_t *ci, const int16_t *kh, const int16_t *kw, void *out,
                           int64_t block, int nthreads);
int nhwc_conv_weight_grad_bf16(const int64_t *geom, const void *x, const void *grad, const int64_t *ptr,
                               const int32_t *ci, const int16_t *kh, const int16_t *kw, float *partial, int64_t parts,
                               int64_t block, int nthreads);

#endif
