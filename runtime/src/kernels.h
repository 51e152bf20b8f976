// Flat compute kernels on f32 activations; weights are read in their stored dtype (bf16/f16/f32).
// No kernel allocates or throws; each result is computed in a fixed order (independent of threads).
#pragma once
#include <cstddef>
#include <cstdint>

#include "common.h"

namespace q3p {

// dst[i] = src[i] as f32, for n elements of dtype `dt`.
void to_f32(const void* src, DType dt, float* dst, size_t n);

// sum_i a[i] * b[i], with 16 partial sums in a fixed order.
float dot_f32(const float* a, const float* b, size_t n);

// Rows [o0, o1) of y = x W^T: y[t * ldy + o] = sum_i x[t * ldx + i] * W[o, i] for t in [0, n).
// W is [out, in] row-major with dtype `dt`. `scratch` holds `in` floats (for bf16/f16 rows).
void matmul_rows(const float* x, size_t ldx, size_t n, const void* w, DType dt, size_t in, size_t o0,
                 size_t o1, float* y, size_t ldy, float* scratch);

// y = x * rsqrt(mean(x^2) + eps) * w, over n elements (x and y may alias).
void rmsnorm(const float* x, const float* w, float eps, float* y, size_t n);

// NeoX half-split rotary embedding of one head of `dim` values, in place:
// x[i] = x[i] cos[i] - x[i + dim/2] sin[i], x[i + dim/2] = x[i + dim/2] cos[i] + x[i] sin[i].
void rope_neox(float* x, const float* cos, const float* sin, size_t dim);

// In-place softmax in f32 over n values.
void softmax(float* x, size_t n);

// out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)).
void silu_mul(const float* gate, const float* up, float* out, size_t n);

// y[i] = a[i] * s (a and y may alias) and y[i] += s * a[i].
void scale(float* y, float s, size_t n);
void axpy(float* y, float s, const float* a, size_t n);
void add(float* y, const float* a, size_t n);

}  // namespace q3p
