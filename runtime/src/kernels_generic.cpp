// The portable matrix product: plain C++ that any compiler vectorizes as far as the baseline
// target allows. It is also the reference the SIMD kernels are tested against.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels_isa.h"

namespace q3p {

namespace {
constexpr size_t kLanes = 16;   // partial sums per dot product
constexpr size_t kTokens = 8;   // tokens sharing one converted chunk of a weight row
constexpr size_t kChunk = 256;  // weight values converted at a time (a multiple of kLanes)
}  // namespace

// Each y value is summed in 16 partial sums (sum k % 16 takes every 16th product), then a tree.
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

namespace {

// exp(x) for x <= 0 (exactly 0 below -87.3, where f32 would turn subnormal), within about 2 ulp:
// x = n ln2 + r with |r| <= ln2 / 2, exp(r) from Cephes' expf polynomial, times 2^n. Branch-free
// plain code that the compiler vectorizes; the SIMD kernels compute the same steps.
inline float exp_nonpositive(float x) {
  const float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (ties to even)
  const float t = x * 1.44269504088896341f + kMagic;
  const float n = t - kMagic;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  uint32_t ti, mi;
  std::memcpy(&ti, &t, 4);
  std::memcpy(&mi, &kMagic, 4);
  const uint32_t bits = (ti - mi + 127u) << 23;  // 2^n, n >= -126 where it is used
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return x < -87.3f ? 0.0f : y * two_n;
}

inline float kv_at(const void* p, DType dt, size_t i) {
  if (dt == DType::F32) return static_cast<const float*>(p)[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

// Each score is summed as a y value of the matrix product; each head's sum and out key by key.
void attention_tile_generic(const AttentionTile& a) {
  float p[kAttentionTile];
  for (size_t g = 0; g < a.G; ++g) {
    const float* q = a.q + g * a.D;
    for (size_t j = 0; j < a.nk; ++j) {
      float acc[kLanes] = {};
      for (size_t d = 0; d < a.D; ++d) acc[d % kLanes] += q[d] * kv_at(a.k, a.kv, j * a.ld + d);
      for (size_t w = kLanes / 2; w > 0; w /= 2)
        for (size_t l = 0; l < w; ++l) acc[l] += acc[l + w];
      p[j] = acc[0] * a.scale;
    }
    float m = a.max[g];
    for (size_t j = 0; j < a.nk; ++j) m = p[j] > m ? p[j] : m;
    const float correction = exp_nonpositive(a.max[g] - m);  // 0 on the first tile (-inf)
    for (size_t j = 0; j < a.nk; ++j) p[j] = exp_nonpositive(p[j] - m);
    if (a.bf16_products) round_to_bf16(p, a.nk);
    float sum = 0.0f;
    for (size_t j = 0; j < a.nk; ++j) sum += p[j];
    a.max[g] = m;
    a.sum[g] = a.sum[g] * correction + sum;
    float* out = a.out + g * a.D;
    for (size_t d = 0; d < a.D; ++d) out[d] *= correction;
    for (size_t j = 0; j < a.nk; ++j)
      for (size_t d = 0; d < a.D; ++d) out[d] += p[j] * kv_at(a.v, a.kv, j * a.ld + d);
  }
}

// g sigmoid(g) from e = exp(-|g|), in (0, 1] (no overflow): sigmoid(g) = 1 / (1 + e) for g >= 0,
// e / (1 + e) below. Branch-free, so that the compiler vectorizes it, where libm's expf took a call
// an element (3.9% of a 512-token prefill). With rmsnorm's partial sums, measured against the
// scalar code (0.6B shapes, paired fresh processes, medians of 5-6): 512-token prefill with bf16
// activations at two threads 1.04x, f32 at one 1.01x; q4 decode at one thread 1.05x.
void silu_mul(const float* gate, const float* up, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float e = exp_nonpositive(-std::fabs(g));
    out[i] = g * ((g >= 0.0f ? 1.0f : e) / (1.0f + e)) * up[i];
  }
}

}  // namespace q3p
