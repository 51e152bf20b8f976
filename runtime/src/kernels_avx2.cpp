// The matrix product for AVX2 + FMA + F16C CPUs, compiled with those flags (see kernels_isa.h
// for why it uses no header's inline functions). Weights of every dtype are widened to f32 and meet
// f32 activations in FMAs; the blocking is that of kernels_avx512.cpp with 8 lanes and
// 16 registers: a tile of kRows weight rows meets kTokens tokens at once.
#include <immintrin.h>

#include <cstring>

#include "kernels_isa.h"

namespace q3p {

namespace {

// Loops over a tile's rows and tokens are unrolled before GCC's scalar replacement runs, so the
// accumulator arrays live in registers (rolled, they stay in memory: a store per step each).
#define UNROLLED _Pragma("GCC unroll 16")

constexpr size_t kRows = 4, kTokens = 2, kPanel = 128, kLanes = 8;
constexpr size_t kMemoryBoundTokens = 4;  // up to this many tokens, tiles of one row (as AVX-512)

inline size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

// 8 values of dtype D from p widened to f32; `count` < 8 reads only that many (a row's end).
template <DType D>
inline __m256 load8(const void* p, size_t count) {
  constexpr size_t esize = D == DType::F32 ? 4 : 2;
  alignas(32) uint8_t tail[kLanes * esize] = {};
  if (count < kLanes) {
    std::memcpy(tail, p, count * esize);
    p = tail;
  }
  if (D == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(p));
  const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
  if (D == DType::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The sum of the 8 lanes, in a fixed order.
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// X: float, or uint16_t for activations rounded to bf16.
template <DType D, int R, int T, class X>
inline void tile(const void* w, size_t in, const X* x, float* y, size_t ldy) {
  constexpr DType XD = sizeof(X) == 4 ? DType::F32 : DType::BF16;
  constexpr size_t esize = D == DType::F32 ? 4 : 2;
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  __m256 acc[R][T];
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (size_t k = 0; k < in; k += kLanes) {
    const size_t count = min_size(kLanes, in - k);
    __m256 wv[R];
    UNROLLED for (int r = 0; r < R; ++r) wv[r] = load8<D>(wb + (r * in + k) * esize, count);
    UNROLLED for (int t = 0; t < T; ++t) {
      const __m256 xv = load8<XD>(x + t * in + k, count);
      UNROLLED for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int t = 0; t < T; ++t) y[t * ldy + r] = sum8(acc[r][t]);
}

#include "kernels_tiles.inc"

}  // namespace

void matmul_avx2(const MatmulArgs& a, size_t o0, size_t o1) {
  for (size_t t0 = 0; t0 < a.n; t0 += kPanel) {
    const size_t t1 = min_size(a.n, t0 + kPanel);
    size_t o = o0;
    if (a.n > kMemoryBoundTokens)
      for (; o + kRows <= o1; o += kRows) row_block<kRows>(a, o, t0, t1);
    for (; o < o1; ++o) row_block<1>(a, o, t0, t1);
  }
}

float fma_loop_avx2(size_t steps, float seed) {
  constexpr int kChains = 12;  // enough independent FMAs in flight to fill both pipes
  __m256 acc[kChains];
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(seed);
  UNROLLED for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_ps(static_cast<float>(c));
  for (size_t s = 0; s < steps; ++s)
    UNROLLED for (int c = 0; c < kChains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
  UNROLLED for (int c = 1; c < kChains; ++c) acc[0] = _mm256_add_ps(acc[0], acc[c]);
  return sum8(acc[0]);
}

}  // namespace q3p
