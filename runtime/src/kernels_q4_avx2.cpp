// The q4 product for AVX2 CPUs, compiled with those flags (see kernels_isa.h for why it uses no
// header's inline functions): maddubs sums pairs of products, madd multiplies them by a sub-block's
// scale and adds pairs (4 values a lane); even and odd sub-blocks add up apart, and one hadd per
// block adds pairs of their lanes into quant.h's lanes I_k. That hadd is what the lanes' grouping
// (the VNNI sequence's) costs here: on the Zen 4 machine, tiles of 4 tokens took 5.2-5.4 ns a block
// and token against 5.0 with the grouping before it, one token 7.7-7.8 as before; one hadd per
// chunk instead, with a single accumulator per token, was no faster (5.2, and 8.0 for one token).
#include <immintrin.h>

#include <cstring>

#include "quant.h"

namespace q3p {

namespace {

#include "kernels_q4_tiles.inc"

template <int T>
inline void block_sums(const uint8_t* qs, __m256i sc16, const int8_t* const* xq, __m256i* sums) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256i even[T], odd[T];
  UNROLLED for (int i = 0; i < T; ++i) even[i] = odd[i] = _mm256_setzero_si256();
  UNROLLED for (int c = 0; c < 4; ++c) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
    const __m256i q_even = _mm256_and_si256(q, low), q_odd = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
    const __m256i sc_even = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16(static_cast<short>(0x0100 * (4 * c + 1) + 4 * c)));
    const __m256i sc_odd = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16(static_cast<short>(0x0100 * (4 * c + 3) + 4 * c + 2)));
    UNROLLED for (int i = 0; i < T; ++i) {
      const __m256i x_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[i] + 64 * c));
      const __m256i x_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[i] + 64 * c + 32));
      even[i] = _mm256_add_epi32(even[i], _mm256_madd_epi16(_mm256_maddubs_epi16(q_even, x_even), sc_even));
      odd[i] = _mm256_add_epi32(odd[i], _mm256_madd_epi16(_mm256_maddubs_epi16(q_odd, x_odd), sc_odd));
    }
  }
  UNROLLED for (int i = 0; i < T; ++i) sums[i] = _mm256_hadd_epi32(even[i], odd[i]);
}

}  // namespace

void matmul_q4_avx2(const MatmulQ4Args& a, size_t o0, size_t o1) { matmul_q4_rows(a, o0, o1); }

}  // namespace q3p
