// q8 quantization and the portable q8 product: the reference that the SIMD products match bit
// for bit (see quant.h for the order of the sums).
#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace q3p {

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  } else {  // zero or subnormal: mant * 2^-24, exact in f32
    const float value = static_cast<float>(mant) * 0x1p-24f;
    std::memcpy(&bits, &value, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, magnitude = x & 0x7FFFFFFFu;
  if (magnitude >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (magnitude > 0x7F800000u ? 0x200u : 0u));
  if (magnitude < 0x38800000u) {  // under 2^-14: a subnormal f16, a whole number of 2^-24
    float value;
    std::memcpy(&value, &magnitude, 4);
    // value * 2^24 is exact; 1024 (the rounding's largest result) encodes 2^-14 itself
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(value * 0x1p24f)));
  }
  const uint32_t mantissa = magnitude & 0x7FFFFFu, exponent = (magnitude >> 23) - 127 + 15;
  if (exponent >= 31) return static_cast<uint16_t>(sign | 0x7C00u);
  uint32_t h = (exponent << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent, up to infinity
  return static_cast<uint16_t>(sign | h);
}

bool quantize_row_q8_weights(const float* x, size_t n, BlockQ8* out) {
  for (size_t b = 0; b < q8_blocks(n); ++b) {
    const size_t count = std::min(kQ8Block, n - b * kQ8Block);
    float v[kQ8Block] = {};  // the block, padded with zeros: fixed-size loops the compiler vectorises
    std::memcpy(v, x + b * kQ8Block, count * sizeof(float));
    float amax = 0.0f;
    for (size_t i = 0; i < kQ8Block; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float scale = amax / 127.0f;
    if (!(scale <= 65504.0f)) return false;
    out[b].d = f32_to_f16(scale);
    const float d = f16_to_f32(out[b].d);
    const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
    for (size_t i = 0; i < kQ8Block; ++i) {
      // the nearest integer, ties to even, as nearbyint but vectorised: |q| <= 128, so
      // q + 1.5 * 2^23 keeps no fraction bits
      const float q = (v[i] * inverse + 0x1.8p23f) - 0x1.8p23f;
      out[b].q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
    }
  }
  return true;
}

void quantize_row_q8(const float* x, size_t n, BlockQ8Act* out) {
  for (size_t b = 0; b < q8_blocks(n); ++b) {
    const size_t count = std::min(kQ8Block, n - b * kQ8Block);
    const float* v = x + b * kQ8Block;
    float amax = 0.0f;
    for (size_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float d = amax / 127.0f;
    const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
    out[b].d = d;
    for (size_t i = 0; i < kQ8Block; ++i) {
      // nearbyint rounds ties to even (the default rounding mode), as numpy's rint
      const float q = i < count ? std::nearbyint(v[i] * inverse) : 0.0f;
      out[b].q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
    }
  }
}

void dequantize_row_q8(const BlockQ8* blocks, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const BlockQ8& block = blocks[i / kQ8Block];
    dst[i] = static_cast<float>(block.q[i % kQ8Block]) * f16_to_f32(block.d);
  }
}

namespace {

float dot_q8(const BlockQ8* w, const BlockQ8Act* x, size_t blocks) {
  float acc[16] = {};
  for (size_t b = 0; b < blocks; ++b) {
    const float d = f16_to_f32(w[b].d) * x[b].d;
    for (size_t j = 0; j < 8; ++j) {
      int32_t p = 0;
      for (size_t i = 4 * j; i < 4 * j + 4; ++i) p += int32_t(w[b].q[i]) * int32_t(x[b].q[i]);
      float& lane = acc[(b % 2) * 8 + j];
      lane = std::fma(d, static_cast<float>(p), lane);
    }
  }
  for (size_t width = 8; width > 0; width /= 2)
    for (size_t k = 0; k < width; ++k) acc[k] += acc[k + width];
  return acc[0];
}

}  // namespace

void matmul_q8_generic(const MatmulQ8Args& a, size_t o0, size_t o1) {
  const size_t blocks = q8_blocks(a.in);
  for (size_t o = o0; o < o1; ++o)
    for (size_t t = 0; t < a.n; ++t) a.y[t * a.out + o] = dot_q8(a.w + o * blocks, a.x + t * blocks, blocks);
}

Kernels::MatmulQ8 matmul_q8_for(Isa isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (isa == Isa::Avx512 && __builtin_cpu_supports("avx512vnni")) return matmul_q8_avx512vnni;
  if (isa == Isa::Avx512 || isa == Isa::Avx2) return matmul_q8_avx2;
#endif
  (void)isa;
  return matmul_q8_generic;
}

}  // namespace q3p
