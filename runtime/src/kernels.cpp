#include "kernels.h"

#include <cmath>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace q3p {

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float f16_to_f32_soft(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

void to_f32(const void* src, DType dt, float* dst, size_t n) {
  if (dt == DType::F32) {
    std::memcpy(dst, src, n * 4);
  } else if (dt == DType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    size_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
    for (; i < n; ++i) dst[i] = f16_to_f32_soft(s[i]);
  }
}

float dot_f32(const float* a, const float* b, size_t n) {
  constexpr size_t K = 16;
  float acc[K] = {};
  size_t i = 0;
  for (; i + K <= n; i += K)
    for (size_t k = 0; k < K; ++k) acc[k] += a[i + k] * b[i + k];
  for (size_t k = 0; i < n; ++i, ++k) acc[k] += a[i] * b[i];
  for (size_t w = K / 2; w > 0; w /= 2)
    for (size_t k = 0; k < w; ++k) acc[k] += acc[k + w];
  return acc[0];
}

void matmul_rows(const float* x, size_t ldx, size_t n, const void* w, DType dt, size_t in, size_t o0,
                 size_t o1, float* y, size_t ldy, float* scratch) {
  const size_t esize = dtype_size(dt);
  for (size_t o = o0; o < o1; ++o) {
    const void* row_raw = static_cast<const uint8_t*>(w) + o * in * esize;
    const float* row;
    if (dt == DType::F32) {
      row = static_cast<const float*>(row_raw);
    } else {
      to_f32(row_raw, dt, scratch, in);
      row = scratch;
    }
    for (size_t t = 0; t < n; ++t) y[t * ldy + o] = dot_f32(x + t * ldx, row, in);
  }
}

void rmsnorm(const float* x, const float* w, float eps, float* y, size_t n) {
  double ss = 0.0;
  for (size_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float mean = static_cast<float>(ss / static_cast<double>(n));
  const float r = 1.0f / std::sqrt(mean + eps);
  for (size_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

void rope_neox(float* x, const float* cos, const float* sin, size_t dim) {
  const size_t half = dim / 2;
  for (size_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
  }
}

void softmax(float* x, size_t n) {
  float m = -INFINITY;
  for (size_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  float sum = 0.0f;
  for (size_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (size_t i = 0; i < n; ++i) x[i] *= inv;
}

void silu_mul(const float* gate, const float* up, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = (g / (1.0f + std::exp(-g))) * up[i];
  }
}

void scale(float* y, float s, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] *= s;
}
void axpy(float* y, float s, const float* a, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] += s * a[i];
}
void add(float* y, const float* a, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] += a[i];
}

}  // namespace q3p
