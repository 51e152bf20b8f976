// The portable matrix product: plain C++ that any compiler vectorizes as far as the baseline
// target allows. It is also the reference the SIMD kernels are tested against.
#include <algorithm>

#include "kernels_isa.h"

namespace q3p {

namespace {
constexpr size_t kLanes = 16;   // partial sums per dot product, as dot_f32
constexpr size_t kTokens = 8;   // tokens sharing one converted chunk of a weight row
constexpr size_t kChunk = 256;  // weight values converted at a time (a multiple of kLanes)
}  // namespace

// Each y value is dot_f32's order: partial sum k % 16 takes every 16th product, then a tree.
void matmul_generic(const MatmulArgs& a, size_t o0, size_t o1) {
  const size_t esize = dtype_size(a.dt);
  float chunk[kChunk], x_chunk[kChunk];
  float acc[kTokens][kLanes];
  for (size_t o = o0; o < o1; ++o) {
    const uint8_t* row = static_cast<const uint8_t*>(a.w) + o * a.in * esize;
    for (size_t t0 = 0; t0 < a.n; t0 += kTokens) {
      const size_t nt = std::min(kTokens, a.n - t0);
      for (size_t t = 0; t < nt; ++t) std::fill_n(acc[t], kLanes, 0.0f);
      for (size_t k0 = 0; k0 < a.in; k0 += kChunk) {
        const size_t nk = std::min(kChunk, a.in - k0);
        to_f32(row + k0 * esize, a.dt, chunk, nk);
        for (size_t t = 0; t < nt; ++t) {
          const float* x = a.x + (t0 + t) * a.in + k0;
          if (a.x_bf16) {
            to_f32(a.x_bf16 + (t0 + t) * a.in + k0, DType::BF16, x_chunk, nk);
            x = x_chunk;
          }
          for (size_t k = 0; k < nk; ++k) acc[t][k % kLanes] += x[k] * chunk[k];
        }
      }
      for (size_t t = 0; t < nt; ++t) {
        for (size_t w = kLanes / 2; w > 0; w /= 2)
          for (size_t k = 0; k < w; ++k) acc[t][k] += acc[t][k + w];
        a.y[(t0 + t) * a.out + o] = acc[t][0];
      }
    }
  }
}

float fma_loop_generic(size_t steps, float seed) {
  float acc[kLanes];
  for (size_t c = 0; c < kLanes; ++c) acc[c] = static_cast<float>(c);
  for (size_t s = 0; s < steps; ++s)
    for (size_t c = 0; c < kLanes; ++c) acc[c] = acc[c] * 0.999f + seed;
  float sum = 0.0f;
  for (size_t c = 0; c < kLanes; ++c) sum += acc[c];
  return sum;
}

void attention_scores_generic(const float* q, size_t G, size_t D, const float* k, size_t ld, size_t nk, float scale,
                              float* scores, size_t lds) {
  for (size_t j = 0; j < nk; ++j)
    for (size_t g = 0; g < G; ++g) scores[g * lds + j] = dot_f32(q + g * D, k + j * ld, D) * scale;
}

void attention_values_generic(const float* p, size_t lds, size_t G, const float* v, size_t ld, size_t nk, size_t D,
                              float* out) {
  for (size_t j = 0; j < nk; ++j)
    for (size_t g = 0; g < G; ++g) axpy(out + g * D, p[g * lds + j], v + j * ld, D);
}

}  // namespace q3p
