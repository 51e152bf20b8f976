// The q4 product for AVX-512 CPUs with VNNI, compiled with those flags (see kernels_isa.h for
// why it uses no header's inline functions): vpdpwssd (on 256-bit registers, AVX512_VL) multiplies
// the pair sums by the scale, adds pairs and accumulates in one instruction, where AVX2 takes two.
#include <immintrin.h>

#include <cstring>

#include "quant.h"

namespace q3p {

namespace {

inline __m256i add_scaled(__m256i acc, __m256i p, __m256i scale) { return _mm256_dpwssd_epi32(acc, p, scale); }

#include "kernels_q4_tiles.inc"

}  // namespace

void matmul_q4_avx512vnni(const MatmulQ4Args& a, size_t o0, size_t o1) { matmul_q4_rows(a, o0, o1); }

}  // namespace q3p
