// q8, q4 and q6: quantization and the portable products, the reference that the SIMD products match
// bit for bit (see quant.h for the order of the sums).
#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

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

// Compiled for AVX-512, AVX2 and the baseline, chosen at load (the same IEEE operations, so the same
// bytes): 1.55 ns a weight with AVX-512, 1.8 with AVX2, 2.2 on the baseline (a 2048 x 1024 matrix,
// medians of 5 interleaved runs on one core).
#if defined(__x86_64__) && defined(__ELF__)  // target_clones needs x86 and the ELF loader's ifunc
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
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
    for (size_t k = 0; k < 8; ++k) {  // k = 4h + 2e + p (quant.h)
      const size_t first = 16 * (k / 4) + 8 * (k % 2);
      int32_t sum = 0;
      for (size_t j = (k / 2) % 2; j < 8; j += 2) {
        int32_t p = 0;
        for (size_t i = first; i < first + 8; ++i) p += q4_value(w[b], j, i) * int32_t(x[b].q[j * kQ4Sub + i]);
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

// ---- The converter's q4 quantizer (formats/SPEC.md, "Quantized weights: q4") ----
//
// N sub-blocks are fitted at once, one per lane of a vector of N floats (GCC's vector extension):
// 16 lanes in AVX-512 registers, 8 in AVX2's, 4 in the baseline's (and on other CPUs), each width
// compiled for its instruction set and chosen at run time. Every f32 operation is the SPEC's, in
// its order (this file is compiled without contraction into FMAs), so every width gives the bytes
// of formats.dtypes.quantize_q4. Everything below is inlined into the function of its width.

namespace {

// The helpers take and return vectors but are always inlined: no call crosses an ABI, so GCC's
// note that the wider vectors' calling convention depends on the instruction set does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#define Q3P_INLINE __attribute__((always_inline)) inline

template <size_t N>
struct Lanes {
  typedef float Vec __attribute__((vector_size(N * sizeof(float))));
  typedef int32_t Bits __attribute__((vector_size(N * sizeof(int32_t))));
};

template <class V>
Q3P_INLINE V splat(float v) { return V{} + v; }

// rint, ties to even, for |v| < 2^22: no fraction bits are left in v + 1.5 * 2^23.
Q3P_INLINE float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }
template <class V>
Q3P_INLINE V round_even_lanes(const V& v) { return (v + 12582912.0f) - 12582912.0f; }

// The sum of the 32 rows of v by halving: v[i] + v[i + 16], then + 8, + 4, + 2, + 1.
template <class V>
Q3P_INLINE V sum32(const V* v) {
  V t[16];
  for (size_t i = 0; i < 16; ++i) t[i] = v[i] + v[i + 16];
  for (size_t width = 8; width > 0; width /= 2)
    for (size_t i = 0; i < width; ++i) t[i] = t[i] + t[i + width];
  return t[0];
}

template <class V>
struct FitSums {
  V w, x, xx, q, qq, xq;
};

// sum w (a q + b - x)^2, expanded over the sums of a fit.
template <class V>
Q3P_INLINE V fit_error(const V& a, const V& b, const FitSums<V>& f) {
  return a * (a * f.qq - 2.0f * f.xq) + b * (b * f.w - 2.0f * f.x) + 2.0f * a * b * f.q + f.xx;
}

template <class V>
struct LevelSums {
  V q, qq, xq;  // sums of u = w * q, u * q and u * x
};

// Node `i` of level L of the three halving sums of a fit with levels q = min(rint(shifted * ratio),
// 15): level 0 is row i's terms, level L adds nodes i and i + (32 >> L) of level L - 1, and node 0
// of level 5 is the sum (sum32's order). Evaluated depth first, the tree keeps a few vectors per
// level in registers instead of storing rows of q, w * q and the products for three passes.
// Without Clamp the min is left out: for a level count n <= 15.25, shifted <= span gives
// shifted * f32(n / span) < 15.5, so rint is at most 15 anyway.
template <int L, bool Clamp, class V>
Q3P_INLINE LevelSums<V> fit_node(const V* shifted, const V* w, const V* x, const V& ratio, size_t i) {
  if constexpr (L == 0) {
    V q = round_even_lanes(shifted[i] * ratio);
    if constexpr (Clamp) {
      const V fifteen = splat<V>(15.0f);
      q = q < fifteen ? q : fifteen;  // std::min(q, 15)
    }
    const V u = w[i] * q;
    return {u, u * q, u * x[i]};
  } else {
    const LevelSums<V> a = fit_node<L - 1, Clamp>(shifted, w, x, ratio, i);
    const LevelSums<V> b = fit_node<L - 1, Clamp>(shifted, w, x, ratio, i + (32 >> L));
    return {a.q + b.q, a.qq + b.qq, a.xq + b.xq};
  }
}

// The scale and minimum of N sub-blocks x[32] (row i: value i of each; SPEC step 1). Without
// branches, and with every comparison inside the selection that uses it, which the compiler makes
// a compare and a blend (a comparison kept as a vector of its own was compared lane by lane).
template <size_t N>
Q3P_INLINE void fit_sub_blocks(const typename Lanes<N>::Vec* x, float* scale_out, float* minimum_out) {
  using Vec = typename Lanes<N>::Vec;
  using Bits = typename Lanes<N>::Bits;
  Vec w[32], shifted[32], product[32];
  for (size_t i = 0; i < 32; ++i) product[i] = x[i] * x[i];
  const Vec square_sum = sum32(product);
  Vec lowest = x[0], high = x[0];
  for (size_t i = 1; i < 32; ++i) lowest = x[i] < lowest ? x[i] : lowest, high = high < x[i] ? x[i] : high;
  const Vec zero = splat<Vec>(0.0f), one = splat<Vec>(1.0f), infinity = splat<Vec>(INFINITY);
  lowest = zero < lowest ? zero : lowest;  // std::min(lowest, 0)
  const Vec span = high == lowest ? one : high - lowest;  // high == lowest: a flat sub-block
  Vec rms = zero;
  for (size_t s = 0; s < N; ++s) rms[s] = std::sqrt(square_sum[s] / 32.0f);
  for (size_t i = 0; i < 32; ++i) {
    const Vec magnitude = reinterpret_cast<Vec>(reinterpret_cast<Bits>(x[i]) & 0x7FFFFFFF);  // std::fabs
    w[i] = rms + magnitude;
    shifted[i] = x[i] - lowest;
  }
  FitSums<Vec> f;
  f.w = sum32(w);
  for (size_t i = 0; i < 32; ++i) product[i] = w[i] * x[i];
  f.x = sum32(product);
  for (size_t i = 0; i < 32; ++i) product[i] = product[i] * x[i];
  f.xx = sum32(product);

  auto fit = [&](float count) __attribute__((always_inline)) {
    const Vec ratio = count / span;
    const LevelSums<Vec> sums = count > 15.25f ? fit_node<5, true>(shifted, w, x, ratio, 0)
                                               : fit_node<5, false>(shifted, w, x, ratio, 0);
    f.q = sums.q, f.qq = sums.qq, f.xq = sums.xq;
  };

  fit(15.0f);
  const LevelSums<Vec> fifteen = {f.q, f.qq, f.xq};
  Vec scale = 1.0f / (15.0f / span), low = lowest;
  Vec best = fit_error(scale, low, f);
  for (int k = 0; k <= 20; ++k) {
    if (k == 10)  // f32(14 + 10 / 10) = 15: the levels, so the sums, of the start
      f.q = fifteen.q, f.qq = fifteen.qq, f.xq = fifteen.xq;
    else
      fit(static_cast<float>(14.0 + k / 10.0));
    const Vec det = f.w * f.qq - f.q * f.q;
    const Vec divisor = det > zero ? det : one;
    const Vec a = (f.w * f.xq - f.x * f.q) / divisor;
    const Vec b = (f.qq * f.x - f.q * f.xq) / divisor;
    // the minimum is kept <= 0: where b > 0 the scale alone fits
    const Vec scale_alone = f.xq / (f.qq > zero ? f.qq : one);
    const Vec fit_scale = b > zero ? scale_alone : a, fit_low = b > zero ? zero : b;
    const Vec error = det > zero ? fit_error(fit_scale, fit_low, f) : infinity;  // unsolvable: never better
    scale = error < best ? fit_scale : scale;
    low = error < best ? fit_low : low;
    best = error < best ? error : best;
  }
  const Vec fitted_scale = high == lowest ? zero : scale, fitted_minimum = zero - low;
  std::memcpy(scale_out, &fitted_scale, sizeof fitted_scale);
  std::memcpy(minimum_out, &fitted_minimum, sizeof fitted_minimum);
}

// values in [0, largest] as integers 0..63 of largest / 63 each (SPEC step 2).
Q3P_INLINE uint8_t six_bits(float value, float inverse) {
  return static_cast<uint8_t>(std::min(63.0f, std::max(0.0f, round_even(inverse * value))));
}

template <size_t N>
Q3P_INLINE bool quantize_rows_q4(const float* x, size_t rows, size_t n, BlockQ4* out) {
  const size_t blocks = q4_blocks(n), subs = blocks * (kQ4Block / kQ4Sub);
  std::vector<float> padded(blocks * kQ4Block), scale(subs + N), minimum(subs + N);
  float staged[32][N];  // row i: value i of each sub-block
  typename Lanes<N>::Vec columns[32];
  for (size_t r = 0; r < rows; ++r) {
    std::copy(x + r * n, x + (r + 1) * n, padded.begin());
    std::fill(padded.begin() + static_cast<std::ptrdiff_t>(n), padded.end(), 0.0f);
    for (size_t first = 0; first < subs; first += N) {
      for (size_t s = 0; s < N; ++s)  // past the row's sub-blocks: zeros, fitted and dropped
        for (size_t i = 0; i < 32; ++i) staged[i][s] = first + s < subs ? padded[(first + s) * kQ4Sub + i] : 0.0f;
      std::memcpy(columns, staged, sizeof columns);
      fit_sub_blocks<N>(columns, scale.data() + first, minimum.data() + first);
    }
    for (size_t b = 0; b < blocks; ++b) {
      const float* sub_scale = scale.data() + b * 8;
      const float* sub_min = minimum.data() + b * 8;
      float largest_scale = 0.0f, largest_min = 0.0f;
      for (size_t j = 0; j < 8; ++j) largest_scale = std::max(largest_scale, sub_scale[j]), largest_min = std::max(largest_min, sub_min[j]);
      if (!(std::max(largest_scale, largest_min) / 63.0f <= 65504.0f)) return false;
      const float scale_inverse = largest_scale > 0.0f ? 63.0f / largest_scale : 0.0f;
      const float min_inverse = largest_min > 0.0f ? 63.0f / largest_min : 0.0f;
      uint8_t sc[8], mn[8];
      for (size_t j = 0; j < 8; ++j) sc[j] = six_bits(sub_scale[j], scale_inverse), mn[j] = six_bits(sub_min[j], min_inverse);
      BlockQ4& block = out[r * blocks + b];
      block.d = f32_to_f16(largest_scale / 63.0f);
      block.dmin = f32_to_f16(largest_min / 63.0f);
      for (size_t j = 0; j < 4; ++j) {
        block.scales[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
        block.scales[j + 4] = static_cast<uint8_t>(mn[j] | ((mn[j + 4] >> 4) << 6));
        block.scales[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4));
      }
      uint8_t levels[8][kQ4Sub];
      for (size_t j = 0; j < 8; ++j) {
        const float step = f16_to_f32(block.d) * static_cast<float>(sc[j]);
        const float shift = f16_to_f32(block.dmin) * static_cast<float>(mn[j]);
        const float* v = padded.data() + b * kQ4Block + j * kQ4Sub;
        for (size_t i = 0; i < kQ4Sub; ++i)
          levels[j][i] = step > 0.0f ? static_cast<uint8_t>(std::min(15.0f, std::max(0.0f, round_even((v[i] + shift) / step)))) : 0;
      }
      for (size_t c = 0; c < 4; ++c)
        for (size_t l = 0; l < kQ4Sub; ++l) block.qs[32 * c + l] = static_cast<uint8_t>(levels[2 * c][l] | (levels[2 * c + 1][l] << 4));
    }
  }
  return true;
}

#if defined(__x86_64__)
// A 512 x 3072 matrix on one core of the project's machine (AMD EPYC), medians of 5 interleaved
// runs, in ns a weight, against the same bytes computed with three passes of sums over stored rows
// (one target_clones function of 32 lanes): AVX-512 4.7 (10.1), AVX2 5.7 (17.7), baseline 13.7 (25.7).
__attribute__((target("avx512f"))) bool quantize_rows_q4_avx512(const float* x, size_t rows, size_t n, BlockQ4* out) {
  return quantize_rows_q4<16>(x, rows, n, out);
}
__attribute__((target("avx2"))) bool quantize_rows_q4_avx2(const float* x, size_t rows, size_t n, BlockQ4* out) {
  return quantize_rows_q4<8>(x, rows, n, out);
}
#endif

}  // namespace

bool quantize_rows_q4_weights(const float* x, size_t rows, size_t n, BlockQ4* out) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return quantize_rows_q4_avx512(x, rows, n, out);
  if (__builtin_cpu_supports("avx2")) return quantize_rows_q4_avx2(x, rows, n, out);
#endif
  return quantize_rows_q4<4>(x, rows, n, out);
}

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

// ---- q6 ----

void quantize_row_q8k16(const float* x, size_t n, BlockQ8K16* out) {
  for (size_t b = 0; b < q4_blocks(n); ++b) {
    out[b].d = quantize_block(x + b * kQ4Block, std::min(kQ4Block, n - b * kQ4Block), kQ4Block, out[b].q);
    for (size_t j = 0; j < kQ4Block / kQ6Sub; ++j) {
      int sum = 0;
      for (size_t i = 0; i < kQ6Sub; ++i) sum += out[b].q[j * kQ6Sub + i];
      out[b].sum[j] = static_cast<int16_t>(sum);  // |sum| <= 16 * 127
    }
  }
}

namespace {

// The 6-bit level of value v < 256 of a block (BlockQ6's layout).
inline int q6_value(const BlockQ6& block, size_t v) {
  const size_t h = v / 128, c = (v % 128) / 32, l = v % 32;
  const int low = (block.ql[64 * h + 32 * (c % 2) + l] >> (4 * (c / 2))) & 0xF;
  const int high = (block.qh[32 * h + l] >> (2 * c)) & 3;
  return low | (high << 4);
}

float dot_q6(const BlockQ6* w, const BlockQ8K16* x, size_t blocks) {
  float acc[16] = {}, mins[8] = {};
  for (size_t b = 0; b < blocks; ++b) {
    const float s = f16_to_f32(w[b].d) * x[b].d;
    for (size_t k = 0; k < 16; ++k) {  // k = 4i + m, m = 2e + p (quant.h)
      const size_t i = k / 4, e = (k % 4) / 2, p = k % 2;
      int32_t sum = 0;
      for (size_t h = 0; h < 2; ++h) {
        const size_t first = 128 * h + 64 * e + 16 * i + 8 * p;
        int32_t products = 0;
        for (size_t v = first; v < first + 8; ++v) products += q6_value(w[b], v) * int32_t(x[b].q[v]);
        sum += int32_t(w[b].scales[8 * h + 4 * e + i]) * products;
      }
      acc[k] = std::fma(s, static_cast<float>(sum), acc[k]);
    }
    for (size_t k = 0; k < 8; ++k) {
      const int32_t m = int32_t(w[b].scales[2 * k]) * x[b].sum[2 * k] + int32_t(w[b].scales[2 * k + 1]) * x[b].sum[2 * k + 1];
      mins[k] = std::fma(s, static_cast<float>(32 * m), mins[k]);
    }
  }
  for (size_t k = 0; k < 8; ++k) acc[k] += acc[k + 8];
  for (size_t width = 4; width > 0; width /= 2)
    for (size_t k = 0; k < width; ++k) acc[k] += acc[k + width], mins[k] += mins[k + width];
  return acc[0] - mins[0];
}

}  // namespace

void dequantize_row_q6(const BlockQ6* blocks, float* dst, size_t n) {
  for (size_t v = 0; v < n; ++v) {
    const BlockQ6& block = blocks[v / kQ4Block];
    const float step = f16_to_f32(block.d) * static_cast<float>(block.scales[(v % kQ4Block) / kQ6Sub]);  // exact
    dst[v] = step * static_cast<float>(q6_value(block, v % kQ4Block) - 32);
  }
}

void matmul_q6_generic(const MatmulQ6Args& a, size_t o0, size_t o1) {
  const size_t blocks = q4_blocks(a.in);
  for (size_t o = o0; o < o1; ++o)
    for (size_t t = 0; t < a.n; ++t) a.y[t * a.out + o] = dot_q6(a.w + o * blocks, a.x + t * blocks, blocks);
}

Kernels::MatmulQ6 matmul_q6_for(Isa isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (isa == Isa::Avx512 && __builtin_cpu_supports("avx512vnni")) return matmul_q6_avx512vnni;
  if (isa == Isa::Avx512 || isa == Isa::Avx2) return matmul_q6_avx2;
#endif
  (void)isa;
  return matmul_q6_generic;
}

// ---- The converter's q6 quantizer (formats/SPEC.md, "Quantized weights: q6") ----
//
// As the q4 quantizer: N sub-blocks are fitted at once, one per lane, each width compiled for its
// instruction set, every f32 operation the SPEC's in its order.

namespace {

constexpr float kGroupMaxEps = 1e-15f;  // llama.cpp's: a sub-block or block this small is zero

// The sum of the 16 rows of v by halving: v[i] + v[i + 8], then + 4, + 2, + 1.
template <class V>
Q3P_INLINE V sum16(const V* v) {
  V t[8];
  for (size_t i = 0; i < 8; ++i) t[i] = v[i] + v[i + 8];
  for (size_t width = 4; width > 0; width /= 2)
    for (size_t i = 0; i < width; ++i) t[i] = t[i] + t[i + width];
  return t[0];
}

// The scale of N sub-blocks x[16] (row i: value i of each; SPEC step 1).
template <size_t N>
Q3P_INLINE void fit_q6_sub_blocks(const typename Lanes<N>::Vec* x, float* scale_out) {
  using Vec = typename Lanes<N>::Vec;
  using Bits = typename Lanes<N>::Bits;
  const Vec zero = splat<Vec>(0.0f), one = splat<Vec>(1.0f);
  Vec largest_magnitude = zero, largest = zero;
  Vec w[16], wx[16];
  for (size_t i = 0; i < 16; ++i) {
    const Vec magnitude = reinterpret_cast<Vec>(reinterpret_cast<Bits>(x[i]) & 0x7FFFFFFF);  // std::fabs
    largest = magnitude > largest_magnitude ? x[i] : largest;  // the first of the largest |x|
    largest_magnitude = magnitude > largest_magnitude ? magnitude : largest_magnitude;
    w[i] = x[i] * x[i];
    wx[i] = w[i] * x[i];
  }
  const Vec divisor = largest_magnitude < kGroupMaxEps ? one : largest;
  Vec lx[16], ll[16];
  auto fit = [&](float count, Vec& sum_lx, Vec& sum_ll) __attribute__((always_inline)) {
    const Vec iscale = -count / divisor;
    for (size_t i = 0; i < 16; ++i) {
      Vec l = round_even_lanes(iscale * x[i]);
      l = l < -32.0f ? splat<Vec>(-32.0f) : l;
      l = l > 31.0f ? splat<Vec>(31.0f) : l;
      lx[i] = wx[i] * l;
      ll[i] = (w[i] * l) * l;
    }
    sum_lx = sum16(lx), sum_ll = sum16(ll);
  };
  Vec sum_lx, sum_ll;
  fit(32.0f, sum_lx, sum_ll);
  Vec scale = sum_ll > zero ? sum_lx / (sum_ll > zero ? sum_ll : one) : zero;
  Vec best = scale * sum_lx;
  for (int k = -9; k <= 9; ++k) {
    if (k == 0) continue;
    fit(32.0f + 0.1f * static_cast<float>(k), sum_lx, sum_ll);
    const Vec fitted = sum_lx / (sum_ll > zero ? sum_ll : one);
    const auto better = (sum_ll > zero) & (sum_lx * sum_lx > best * sum_ll);
    scale = better ? fitted : scale;
    best = better ? fitted * sum_lx : best;
  }
  const Vec fitted_scale = largest_magnitude < kGroupMaxEps ? zero : scale;
  std::memcpy(scale_out, &fitted_scale, sizeof fitted_scale);
}

template <size_t N>
Q3P_INLINE bool quantize_rows_q6(const float* x, size_t rows, size_t n, BlockQ6* out) {
  const size_t blocks = q4_blocks(n), subs = blocks * (kQ4Block / kQ6Sub);
  std::vector<float> padded(blocks * kQ4Block), scale(subs + N);
  float staged[16][N];  // row i: value i of each sub-block
  typename Lanes<N>::Vec columns[16];
  for (size_t r = 0; r < rows; ++r) {
    std::copy(x + r * n, x + (r + 1) * n, padded.begin());
    std::fill(padded.begin() + static_cast<std::ptrdiff_t>(n), padded.end(), 0.0f);
    for (size_t first = 0; first < subs; first += N) {
      for (size_t s = 0; s < N; ++s)  // past the row's sub-blocks: zeros, fitted and dropped
        for (size_t i = 0; i < 16; ++i) staged[i][s] = first + s < subs ? padded[(first + s) * kQ6Sub + i] : 0.0f;
      std::memcpy(columns, staged, sizeof columns);
      fit_q6_sub_blocks<N>(columns, scale.data() + first);
    }
    for (size_t b = 0; b < blocks; ++b) {
      const float* sub_scale = scale.data() + b * 16;
      float largest = 0.0f, largest_magnitude = 0.0f;
      for (size_t j = 0; j < 16; ++j)
        if (std::fabs(sub_scale[j]) > largest_magnitude) largest_magnitude = std::fabs(sub_scale[j]), largest = sub_scale[j];
      BlockQ6& block = out[r * blocks + b];
      std::memset(&block, 0, sizeof block);
      if (largest_magnitude < kGroupMaxEps) continue;  // a zero block: zero bytes
      const float iscale = -128.0f / largest;
      block.d = f32_to_f16(1.0f / iscale);
      if ((block.d & 0x7FFFu) == 0x7C00u) return false;
      const float d = f16_to_f32(block.d);
      const float* v = padded.data() + b * kQ4Block;
      uint8_t levels[kQ4Block];
      for (size_t j = 0; j < 16; ++j) {
        const float code = std::min(127.0f, std::max(-128.0f, round_even(iscale * sub_scale[j])));
        block.scales[j] = static_cast<int8_t>(code);
        const float step = d * code;
        for (size_t i = 0; i < kQ6Sub; ++i) {
          const float level = std::min(31.0f, std::max(-32.0f, round_even(v[j * kQ6Sub + i] / step)));
          levels[j * kQ6Sub + i] = step != 0.0f ? static_cast<uint8_t>(level + 32.0f) : 0;
        }
      }
      for (size_t h = 0; h < 2; ++h)
        for (size_t l = 0; l < 32; ++l) {
          const uint8_t* q = levels + 128 * h + l;  // quarters c = 0..3 at q[32c]
          block.ql[64 * h + l] = static_cast<uint8_t>((q[0] & 0xF) | ((q[64] & 0xF) << 4));
          block.ql[64 * h + 32 + l] = static_cast<uint8_t>((q[32] & 0xF) | ((q[96] & 0xF) << 4));
          block.qh[32 * h + l] = static_cast<uint8_t>((q[0] >> 4) | ((q[32] >> 4) << 2) | ((q[64] >> 4) << 4) | ((q[96] >> 4) << 6));
        }
    }
  }
  return true;
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) bool quantize_rows_q6_avx512(const float* x, size_t rows, size_t n, BlockQ6* out) {
  return quantize_rows_q6<16>(x, rows, n, out);
}
__attribute__((target("avx2"))) bool quantize_rows_q6_avx2(const float* x, size_t rows, size_t n, BlockQ6* out) {
  return quantize_rows_q6<8>(x, rows, n, out);
}
#endif

}  // namespace

bool quantize_rows_q6_weights(const float* x, size_t rows, size_t n, BlockQ6* out) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return quantize_rows_q6_avx512(x, rows, n, out);
  if (__builtin_cpu_supports("avx2")) return quantize_rows_q6_avx2(x, rows, n, out);
#endif
  return quantize_rows_q6<4>(x, rows, n, out);
}

}  // namespace q3p
