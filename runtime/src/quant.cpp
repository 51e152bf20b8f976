// q8 and q4: quantization and the portable products, the reference that the SIMD products match
// bit for bit (see quant.h for the order of the sums).
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

namespace {

// One block of `count` <= size values (zeros beyond), into q[size]: d = max|x| / 127, q = nearest
// integer (ties to even) of x * (1 / d). Returns d.
float quantize_block(const float* v, size_t count, size_t size, int8_t* q_out) {
  float amax = 0.0f;
  for (size_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float d = amax / 127.0f;
  const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer, ties to even (the default
  // rounding mode), as numpy's rint and the converter do: |x * inverse| <= 128 leaves no fraction
  // bits in the sum. A libm nearbyint call per value cost more than the products of a decode step's
  // small matrices; this loop vectorizes. (quant.cpp is compiled without contraction into FMAs,
  // which would skip the rounding of the product.)
  constexpr float kMagic = 12582912.0f;
  for (size_t i = 0; i < count; ++i) {
    const float q = (v[i] * inverse + kMagic) - kMagic;
    q_out[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
  }
  std::fill(q_out + count, q_out + size, int8_t(0));
  return d;
}

}  // namespace

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
  for (size_t b = 0; b < q8_blocks(n); ++b)
    out[b].d = quantize_block(x + b * kQ8Block, std::min(kQ8Block, n - b * kQ8Block), kQ8Block, out[b].q);
}

void quantize_row_q8k(const float* x, size_t n, BlockQ8K* out) {
  for (size_t b = 0; b < q4_blocks(n); ++b) {
    out[b].d = quantize_block(x + b * kQ4Block, std::min(kQ4Block, n - b * kQ4Block), kQ4Block, out[b].q);
    for (size_t j = 0; j < kQ4Block / kQ4Sub; ++j) {
      int32_t sum = 0;
      for (size_t i = 0; i < kQ4Sub; ++i) sum += out[b].q[j * kQ4Sub + i];
      out[b].sum[j] = sum;
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

// ---- q4 ----

namespace {

// The 8 scales (out[0, 8)) and 8 minimums (out[8, 16)) of a block: j < 4 in the low 6 bits of
// bytes j and j + 4; j >= 4 in the nibbles of byte j + 4 with their top 2 bits in bytes j - 4
// and j (bits 6-7).
void q4_scales_generic(const uint8_t* s, uint8_t* out) {
  for (size_t j = 0; j < 4; ++j) {
    out[j] = s[j] & 63;
    out[8 + j] = s[j + 4] & 63;
    out[4 + j] = static_cast<uint8_t>((s[j + 8] & 0xF) | ((s[j] >> 6) << 4));
    out[12 + j] = static_cast<uint8_t>((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
  }
}

inline int q4_value(const BlockQ4& block, size_t j, size_t i) {
  return (block.qs[32 * (j / 2) + i] >> (4 * (j % 2))) & 0xF;
}

float dot_q4(const BlockQ4* w, const BlockQ8K* x, size_t blocks) {
  float acc[8] = {}, mins[8] = {};
  for (size_t b = 0; b < blocks; ++b) {
    uint8_t sm[16];
    q4_scales_generic(w[b].scales, sm);
    const float s = f16_to_f32(w[b].d) * x[b].d, m = f16_to_f32(w[b].dmin) * x[b].d;
    for (size_t k = 0; k < 8; ++k) {
      int32_t sum = 0;
      for (size_t j = 0; j < 8; ++j) {
        int32_t p = 0;
        for (size_t i = 4 * k; i < 4 * k + 4; ++i) p += q4_value(w[b], j, i) * int32_t(x[b].q[j * kQ4Sub + i]);
        sum += int32_t(sm[j]) * p;
      }
      acc[k] = std::fma(s, static_cast<float>(sum), acc[k]);
    }
    for (size_t j = 0; j < 8; ++j) mins[j] = std::fma(m, static_cast<float>(int32_t(sm[8 + j]) * x[b].sum[j]), mins[j]);
  }
  for (size_t width = 4; width > 0; width /= 2)
    for (size_t k = 0; k < width; ++k) acc[k] += acc[k + width], mins[k] += mins[k + width];
  return acc[0] - mins[0];
}

}  // namespace

void dequantize_row_q4(const BlockQ4* blocks, float* dst, size_t n) {
  for (size_t b = 0; b * kQ4Block < n; ++b) {
    uint8_t sm[16];
    q4_scales_generic(blocks[b].scales, sm);
    const float D = f16_to_f32(blocks[b].d), M = f16_to_f32(blocks[b].dmin);
    for (size_t j = 0; j < 8; ++j) {
      const float scale = D * static_cast<float>(sm[j]), min = M * static_cast<float>(sm[8 + j]);  // exact
      for (size_t i = 0; i < kQ4Sub && b * kQ4Block + j * kQ4Sub + i < n; ++i)
        dst[b * kQ4Block + j * kQ4Sub + i] = scale * static_cast<float>(q4_value(blocks[b], j, i)) - min;
    }
  }
}

void matmul_q4_generic(const MatmulQ4Args& a, size_t o0, size_t o1) {
  const size_t blocks = q4_blocks(a.in);
  for (size_t o = o0; o < o1; ++o)
    for (size_t t = 0; t < a.n; ++t) a.y[t * a.out + o] = dot_q4(a.w + o * blocks, a.x + t * blocks, blocks);
}

Kernels::MatmulQ4 matmul_q4_for(Isa isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (isa == Isa::Avx512 && __builtin_cpu_supports("avx512vnni")) return matmul_q4_avx512vnni;
  if (isa == Isa::Avx512 || isa == Isa::Avx2) return matmul_q4_avx2;
#endif
  (void)isa;
  return matmul_q4_generic;
}

}  // namespace q3p
