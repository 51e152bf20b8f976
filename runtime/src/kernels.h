// Flat compute kernels on f32 activations; weights are read in their stored dtype (bf16/f16/f32).
// No kernel allocates or throws; each result is computed in a fixed order (independent of threads).
#pragma once
#include <cstddef>
#include <cstdint>

#include "common.h"

namespace q3p {

// dst[i] = src[i] as f32, for n elements of dtype `dt` (Q8, Q4, Q6: the first n values of a row of blocks).
void to_f32(const void* src, DType dt, float* dst, size_t n);

// dst[i] = the bf16 bits of src[i] rounded to nearest even (NaN stays NaN), for n elements: the
// KV cache's bf16 and the bf16 activations.
void to_bf16(const float* src, uint16_t* dst, size_t n);

// x[i] rounded to bf16 as to_bf16 rounds it, kept as f32 (exact), in place.
void round_to_bf16(float* x, size_t n);

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

struct MatmulQ8Args;  // quant.h
struct MatmulQ4Args;
struct MatmulQ6Args;

// Attention keys are visited in tiles of at most this many consecutive keys, cut at multiples of
// it (and of a sliding layer's ring) in absolute positions: a query's tiles, and so the order of
// its sums, depend on its own position alone, never on the other queries of a batch.
constexpr size_t kAttentionTile = 64;

// One tile of attention for the G query heads that share a KV head, with an online softmax: the
// tile's keys and values are read once for all G heads, and the running state of each head g is
// updated in place:
//   max[g]: the largest scaled score so far (-inf before the first tile),
//   sum[g]: the sum of exp(score - max[g]) so far,
//   out[g * D, (g + 1) * D): the sum of exp(score - max[g]) v so far;
// the attention output is out / sum after the last tile. The values of each head's state are
// summed in an order fixed by nk and D alone.
struct AttentionTile {
  const float* q = nullptr;  // G heads of D values
  size_t G = 0, D = 0;
  const void* k = nullptr;   // nk <= kAttentionTile keys and values at rows j * ld (elements) of k, v
  const void* v = nullptr;
  size_t ld = 0, nk = 0;
  DType kv = DType::F32;     // of k and v: F32 or BF16
  float scale = 1.0f;        // scores are scale * (q_g . k_j)
  // Attention in bf16 activations' precision (a bf16 cache with load(..., activations="bf16")):
  // the caller rounded q to bf16 values, each exp(score - max) is rounded to bf16 before it is
  // summed and weights the values, and the products may take the CPU's bf16 dot product.
  bool bf16_products = false;
  float* max = nullptr;
  float* sum = nullptr;
  float* out = nullptr;
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
  // One tile of attention with an online softmax (see AttentionTile).
  void (*attention_tile)(const AttentionTile& a);
  // The rows [o0, o1) of a product on q8 weights (quant.h).
  using MatmulQ8 = void (*)(const MatmulQ8Args& a, size_t o0, size_t o1);
  MatmulQ8 matmul_q8 = nullptr;
  // The rows [o0, o1) of a product on q4 weights (quant.h).
  using MatmulQ4 = void (*)(const MatmulQ4Args& a, size_t o0, size_t o1);
  MatmulQ4 matmul_q4 = nullptr;
  // The rows [o0, o1) of a product on q6 weights (quant.h).
  using MatmulQ6 = void (*)(const MatmulQ6Args& a, size_t o0, size_t o1);
  MatmulQ6 matmul_q6 = nullptr;
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

// out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)), within 4 ulp (-0 below -87.3,
// where its value is under 1e-35).
void silu_mul(const float* gate, const float* up, float* out, size_t n);

// y[i] = a[i] * s (a and y may alias) and y[i] += s * a[i].
void scale(float* y, float s, size_t n);
void axpy(float* y, float s, const float* a, size_t n);
void add(float* y, const float* a, size_t n);

}  // namespace q3p
