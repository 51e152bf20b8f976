// The q4 product for AVX-512 CPUs with VNNI, compiled with those flags (see kernels_isa.h for
// why it uses no header's inline functions), on 256-bit registers (AVX512_VL): vpdpbusd sums 4
// products of unsigned values and signed activations per 32-bit lane, so 32 values cost one
// instruction; packing two sub-blocks' sums to 16 bits (each below 4 * 15 * 127) lets one
// vpdpwssd apply both scales and add pairs, which gives quant.h's lanes I_k.
#include <immintrin.h>

#include <cstring>

#include "quant.h"

namespace q3p {

namespace {

#include "kernels_q4_tiles.inc"

constexpr long long repeat4(int word) { return 0x0001000100010001LL * word; }

template <int T>
inline void block_sums(const uint8_t* qs, __m256i sc16, const int8_t* const* xq, __m256i* sums) {
  const __m256i low = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  __m256i part[2][T];  // two chains: the latency of vpdpwssd, not its throughput, bounds one token
  UNROLLED for (int c = 0; c < 4; ++c) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
    const __m256i q_even = _mm256_and_si256(q, low), q_odd = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
    // 16-bit lanes 0-3 of each half sc_2c, lanes 4-7 sc_2c+1, as the packed sums lie
    const long long even = repeat4(0x0100 * (4 * c + 1) + 4 * c), odd = repeat4(0x0100 * (4 * c + 3) + 4 * c + 2);
    const __m256i scale = _mm256_shuffle_epi8(sc16, _mm256_set_epi64x(odd, even, odd, even));
    UNROLLED for (int i = 0; i < T; ++i) {
      const __m256i s_even = _mm256_dpbusd_epi32(zero, q_even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[i] + 64 * c)));
      const __m256i s_odd = _mm256_dpbusd_epi32(zero, q_odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[i] + 64 * c + 32)));
      part[c % 2][i] = _mm256_dpwssd_epi32(c < 2 ? zero : part[c % 2][i], _mm256_packs_epi32(s_even, s_odd), scale);
    }
  }
  UNROLLED for (int i = 0; i < T; ++i) sums[i] = _mm256_add_epi32(part[0][i], part[1][i]);
}

}  // namespace

void matmul_q4_avx512vnni(const MatmulQ4Args& a, size_t o0, size_t o1) { matmul_q4_rows(a, o0, o1); }

}  // namespace q3p
