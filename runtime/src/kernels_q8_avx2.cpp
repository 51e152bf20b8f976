// The q8 product for AVX2 CPUs, compiled with those flags (see kernels_isa.h for why it uses no
// header's inline functions): maddubs multiplies |w| (unsigned) by x carrying w's sign into
// pairs of 16 bits (at most 2 * 128 * 127: no saturation), madd adds the pairs into the exact
// lane sums p_j of quant.h.
#include <immintrin.h>

#include "quant.h"

namespace q3p {

namespace {

inline __m256i lane_sums(__m256i wabs, __m256i xs) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), _mm256_set1_epi16(1));
}

#include "kernels_q8_tiles.inc"

}  // namespace

void matmul_q8_avx2(const MatmulQ8Args& a, size_t o0, size_t o1) { matmul_q8_rows(a, o0, o1); }

}  // namespace q3p
