// The q4 product for AVX2 CPUs, compiled with those flags (see kernels_isa.h for why it uses no
// header's inline functions): madd multiplies the pair sums by the scale and adds pairs, one more
// add accumulates.
#include <immintrin.h>

#include <cstring>

#include "quant.h"

namespace q3p {

namespace {

inline __m256i add_scaled(__m256i acc, __m256i p, __m256i scale) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, scale));
}

#include "kernels_q4_tiles.inc"

}  // namespace

void matmul_q4_avx2(const MatmulQ4Args& a, size_t o0, size_t o1) { matmul_q4_rows(a, o0, o1); }

}  // namespace q3p
