// Flat compute kernels on f32 activations; weights are read in their stored dtype (bf16/f16/f32).
// No kernel allocates or throws; each result is computed in a fixed order (independent of threads).
#pragma once
#include <cstddef>
#include <cstdint>

#include "common.h"

namespace q3p {

// dst[i] = src[i] as f32, for n elements of dtype `dt`.
void to_f32(const void* src, DType dt, float* dst, size_t n);

// dst[i] = the bf16 bits of src[i] rounded to nearest even (NaN stays NaN), for n elements.
void to_bf16(const float* src, uint16_t* dst, size_t n);

// sum_i a[i] * b[i], with 16 partial sums in a fixed order.
float dot_f32(const float* a, const float* b, size_t n);

// y = x W^T: y[t * out + o] = sum_i x[t * in + i] * W[o, i] for t in [0, n), o in [0, out).
// W is [out, in] row-major with dtype `dt`; the sums are in f32. When x_bf16 is set (bf16 W only:
// load(..., activations="bf16")), x is read from there, rounded to bf16 by to_bf16, and x is unused.
struct MatmulArgs {
  const float* x = nullptr;
  const uint16_t* x_bf16 = nullptr;
  size_t n = 0, in = 0, out = 0;
  const void* w = nullptr;
  DType dt = DType::F32;
  float* y = nullptr;
};

// The instruction sets with matrix kernels, from the most portable.
enum class Isa { Generic, Avx2, Avx512 };
const char* isa_name(Isa isa);
bool isa_supported(Isa isa);  // by this build and this CPU

// One instruction set's kernels. Every value they compute is summed in an order fixed by the
// sizes of its own sum (not by n, the row range or the thread).
struct Kernels {
  Isa isa;
  // The rows [o0, o1) of y = x W^T.
  void (*matmul)(const MatmulArgs& a, size_t o0, size_t o1);
  // Attention of G query heads q[g * D, (g + 1) * D) sharing one KV head, over nk keys and values
  // at rows j * ld of k and v (one contiguous run of cache slots, read once for the G heads):
  // scores[g * lds + j] = scale * (q_g . k_j), and out[g * D + d] += sum_j p[g * lds + j] v_j[d].
  void (*attention_scores)(const float* q, size_t G, size_t D, const float* k, size_t ld, size_t nk, float scale,
                           float* scores, size_t lds);
  void (*attention_values)(const float* p, size_t lds, size_t G, const float* v, size_t ld, size_t nk, size_t D,
                           float* out);
};

// The kernels named by `forced` (QWEN3PACK_ISA: "avx512", "avx2" or "generic") or, when
// `forced` is null or empty, the fastest this CPU runs. Throws UsageError for an unknown name
// or one this CPU or build lacks.
Kernels select_kernels(const char* forced);

// Floating-point operations per second of one thread running independent f32 FMAs of `isa`
// from registers only (the FMA peak the matrix kernels approach), timed over about `seconds`.
// bf16_activations: the peak of the instruction the kernels use for activations rounded to bf16
// instead (vdpbf16ps where the AVX-512 CPU has it: 2 products per f32 lane).
double fma_peak_flops(Isa isa, bool bf16_activations, double seconds);

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
