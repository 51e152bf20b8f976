// The q8 product for AVX-512 CPUs with VNNI, compiled with those flags (see kernels_isa.h for
// why it uses no header's inline functions): vpdpbusd (on 256-bit registers, AVX512_VL) gives
// the exact lane sums p_j of quant.h in one instruction, where AVX2 takes two.
//
// Measured (one thread, decode of a 6144 x 1024 matrix, interleaved, shared 2-core machine):
// 512-bit registers holding two blocks were slower than AVX2 (12 against 14 GB/s): assembling
// the halves' scales and quants costs more than the wider products save, and this CPU (AMD Zen 4)
// runs 512-bit operations as two 256-bit ones.
#include <immintrin.h>

#include "quant.h"

namespace q3p {

namespace {

// vpdpbusd multiplies unsigned bytes by signed ones. The activations are offset to unsigned once
// per block and token (x + 128, an XOR of the sign bit), and each block of weights once carries
// the offset's share, -128 times the sums of its 4-value groups, as the sums' starting value: the
// lane sums are then one vpdpbusd per (row, token), exact as before (|sum| < 2^31).
struct WeightBlock {
  __m256i q, offset;
};

inline WeightBlock weight_block(__m256i wq) {
  const __m256i group_sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1), wq);
  return {wq, _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(group_sums, 7))};
}
inline __m256i token_block(__m256i xq) { return _mm256_xor_si256(xq, _mm256_set1_epi8(char(0x80))); }
inline __m256i lane_sums(const WeightBlock& w, __m256i x) { return _mm256_dpbusd_epi32(w.offset, x, w.q); }
// Decode's single token meets each block of weights once, so it takes the signs' way instead:
// |w| (unsigned; -128 stays 0x80, 128) times x with w's sign, 3 instructions a block against the
// offset's 5 (measured: a 1024 x 1024 and a 3072 x 1024 product from the cache, 36 against 40 us
// and 103 against 114 us).
inline __m256i single_lane_sums(__m256i wq, __m256i xq) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq));
}

constexpr size_t kRows = 2;  // 2 rows x 4 tokens x 2 parities: 16 of the 32 registers

#include "kernels_q8_tiles.inc"

}  // namespace

void matmul_q8_avx512vnni(const MatmulQ8Args& a, size_t o0, size_t o1) { matmul_q8_rows(a, o0, o1); }

}  // namespace q3p
