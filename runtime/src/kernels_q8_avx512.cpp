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

inline __m256i lane_sums(__m256i wabs, __m256i xs) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), wabs, xs);
}

#include "kernels_q8_tiles.inc"

}  // namespace

void matmul_q8_avx512vnni(const MatmulQ8Args& a, size_t o0, size_t o1) { matmul_q8_rows(a, o0, o1); }

}  // namespace q3p
