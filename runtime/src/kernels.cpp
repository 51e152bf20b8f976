#include "kernels.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <string>

#include "kernels_isa.h"
#include "quant.h"

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
  } else if (dt == DType::Q8) {
    dequantize_row_q8(static_cast<const BlockQ8*>(src), dst, n);
  } else if (dt == DType::Q4) {
    dequantize_row_q4(static_cast<const BlockQ4*>(src), dst, n);
  } else if (dt == DType::Q6) {
    dequantize_row_q6(static_cast<const BlockQ6*>(src), dst, n);
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

void to_bf16(const float* src, uint16_t* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &src[i], 4);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u)
      dst[i] = static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN: keep it one (quiet)
    else
      dst[i] = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
}

void round_to_bf16(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    uint16_t half;
    to_bf16(x + i, &half, 1);
    const uint32_t bits = static_cast<uint32_t>(half) << 16;
    std::memcpy(x + i, &bits, 4);
  }
}

void rmsnorm(const float* x, const float* w, float eps, float* y, size_t n) {
  // Eight partial sums, which the compiler vectorizes: one sum's chain of additions waited 4 cycles
  // an element (2.3% of a 512-token prefill).
  double part[8] = {};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (size_t j = 0; j < 8; ++j) part[j] += static_cast<double>(x[i + j]) * x[i + j];
  double ss = 0.0;
  for (double s : part) ss += s;
  for (; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float mean = static_cast<float>(ss / static_cast<double>(n));
  const float r = 1.0f / std::sqrt(mean + eps);
  for (i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

void rope_neox(float* x, const float* cos, const float* sin, size_t dim) {
  const size_t half = dim / 2;
  for (size_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
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

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

bool isa_supported(Isa isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == Isa::Avx2) return avx2;
  if (isa == Isa::Avx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
#endif
  return isa == Isa::Generic;
}

namespace {
Kernels matrix_kernels_for(Isa isa) {
#if defined(__x86_64__)
  if (isa == Isa::Avx512) {
    // vdpbf16ps where the CPU has it, for activations rounded to bf16; else they are widened.
    if (__builtin_cpu_supports("avx512bf16")) return {isa, matmul_avx512bf16, attention_tile_avx512bf16};
    return {isa, matmul_avx512, attention_tile_avx512};
  }
  if (isa == Isa::Avx2) return {isa, matmul_avx2, attention_tile_avx2};
#endif
  return {Isa::Generic, matmul_generic, attention_tile_generic};
}

Kernels kernel_for(Isa isa) {
  Kernels k = matrix_kernels_for(isa);
  k.matmul_q8 = matmul_q8_for(k.isa);
  k.matmul_q4 = matmul_q4_for(k.isa);
  k.matmul_q6 = matmul_q6_for(k.isa);
  return k;
}
}  // namespace

double fma_peak_flops(Isa isa, bool bf16_activations, double seconds) {
  float (*loop)(size_t, float) = fma_loop_generic;
  double flops_per_step = 16 * 2;
#if defined(__x86_64__)
  if (isa == Isa::Avx512) loop = fma_loop_avx512, flops_per_step = 12 * 16 * 2;
  if (isa == Isa::Avx512 && bf16_activations && __builtin_cpu_supports("avx512bf16"))
    loop = dpbf16_loop_avx512, flops_per_step = 12 * 32 * 2;
  if (isa == Isa::Avx2) loop = fma_loop_avx2, flops_per_step = 12 * 8 * 2;
#else
  (void)bf16_activations;
#endif
  using Clock = std::chrono::steady_clock;
  volatile float sink = 0.0f;  // the loop's result is used: it cannot be optimized away
  size_t steps = 1 << 16;
  for (;;) {
    const Clock::time_point start = Clock::now();
    sink = sink + loop(steps, 1e-3f);
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    if (elapsed >= seconds || steps >= (size_t(1) << 40)) return static_cast<double>(steps) * flops_per_step / elapsed;
    steps *= 2;
  }
}

Kernels select_kernels(const char* forced) {
  const Isa all[] = {Isa::Avx512, Isa::Avx2, Isa::Generic};
  if (!forced || !*forced) {
    for (Isa isa : all)
      if (isa_supported(isa)) return kernel_for(isa);
  }
  std::string supported;
  for (Isa isa : all) {
    if (!isa_supported(isa)) continue;
    if (std::string(forced) == isa_name(isa)) return kernel_for(isa);
    supported += std::string(supported.empty() ? "" : ", ") + isa_name(isa);
  }
  throw UsageError("QWEN3PACK_ISA=" + std::string(forced) + " is not an instruction set this machine runs (" +
                   supported + ")");
}

}  // namespace q3p
