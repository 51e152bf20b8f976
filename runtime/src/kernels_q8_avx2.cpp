// The q8 product for AVX2 CPUs, compiled with those flags (see kernels_isa.h for why it uses no
// header's inline functions). One block per 256-bit register: maddubs multiplies |w| (unsigned)
// by x carrying w's sign into pairs of 16 bits (at most 2 * 128 * 127, no saturation), madd adds
// the pairs into the exact lane sums p_j of quant.h; one accumulator per block parity.
#include <immintrin.h>

#include "quant.h"

namespace q3p {

namespace {

#define UNROLLED _Pragma("GCC unroll 16")

constexpr size_t kTokens = 4, kPanel = 128;

// The sum of the 8 lanes in quant.h's order (as sum8 of kernels_avx2.cpp).
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Block b of one row against T tokens, into the accumulators of b's parity.
template <int T>
__attribute__((always_inline)) inline void step(__m256 (&acc)[T], const BlockQ8& w, const BlockQ8Act* const (&x)[T],
                                                size_t b) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.q));
  const __m256i wabs = _mm256_sign_epi8(wq, wq);
  const float dw = _cvtsh_ss(w.d);
  UNROLLED for (int i = 0; i < T; ++i) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i][b].q));
    const __m256i pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xq, wq));
    const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
    acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[i][b].d), p, acc[i]);
  }
}

// y of row o for tokens [t, t + T).
template <int T>
inline void tile(const MatmulQ8Args& a, size_t o, size_t t) {
  const size_t blocks = (a.in + kQ8Block - 1) / kQ8Block;
  const BlockQ8* w = a.w + o * blocks;
  const BlockQ8Act* x[T];
  UNROLLED for (int i = 0; i < T; ++i) x[i] = a.x + (t + i) * blocks;
  __m256 even[T], odd[T];
  UNROLLED for (int i = 0; i < T; ++i) even[i] = odd[i] = _mm256_setzero_ps();
  size_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    step<T>(even, w[b], x, b);
    step<T>(odd, w[b + 1], x, b + 1);
  }
  if (b < blocks) step<T>(even, w[b], x, b);
  UNROLLED for (int i = 0; i < T; ++i) a.y[(t + i) * a.out + o] = sum8(_mm256_add_ps(even[i], odd[i]));
}

}  // namespace

void matmul_q8_avx2(const MatmulQ8Args& a, size_t o0, size_t o1) {
  for (size_t t0 = 0; t0 < a.n; t0 += kPanel) {
    const size_t t1 = t0 + kPanel < a.n ? t0 + kPanel : a.n;
    for (size_t o = o0; o < o1; ++o) {
      size_t t = t0;
      for (; t + kTokens <= t1; t += kTokens) tile<kTokens>(a, o, t);
      switch (t1 - t) {
        case 3: tile<3>(a, o, t); break;
        case 2: tile<2>(a, o, t); break;
        case 1: tile<1>(a, o, t); break;
        default: break;
      }
    }
  }
}

}  // namespace q3p
