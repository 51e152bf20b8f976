// The q8 product for AVX2 CPUs, compiled with those flags (see kernels_isa.h for why it uses no
// header's inline functions): maddubs multiplies |w| (unsigned) by x carrying w's sign into
// pairs of 16 bits (at most 2 * 128 * 127: no saturation), madd adds the pairs into the exact
// lane sums p_j of quant.h.
#include <immintrin.h>

#include "quant.h"

namespace q3p {

namespace {

// A block of weights: its values and their magnitudes. The activations take the weights' signs
// per row, so each (row, token) pair costs a sign, a maddubs and a madd.
struct WeightBlock {
  __m256i q, magnitude;
};

inline WeightBlock weight_block(__m256i wq) { return {wq, _mm256_sign_epi8(wq, wq)}; }  // -128 stays 0x80: 128 unsigned
inline __m256i token_block(__m256i xq) { return xq; }
inline __m256i lane_sums(const WeightBlock& w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w.magnitude, _mm256_sign_epi8(x, w.q)), _mm256_set1_epi16(1));
}

inline __m256i single_lane_sums(__m256i wq, __m256i xq) { return lane_sums(weight_block(wq), xq); }  // as any tile

constexpr size_t kRows = 1;  // 16 registers: 8 accumulators of 4 tokens' two parities already

#include "kernels_q8_tiles.inc"

}  // namespace

void matmul_q8_avx2(const MatmulQ8Args& a, size_t o0, size_t o1) { matmul_q8_rows(a, o0, o1); }

}  // namespace q3p
