// The q4 product for AVX-512 CPUs with VNNI, compiled with those flags (see kernels_isa.h for
// why it uses no header's inline functions), on 256-bit registers (AVX512_VL): vpdpbusd sums 4
// products of unsigned values and signed activations per 32-bit lane, so 32 values cost one
// instruction; packing two sub-blocks' sums to 16 bits (each below 4 * 15 * 127) lets one
// vpdpwssd apply both scales and add pairs, which gives quant.h's lanes I_k.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "quant.h"

namespace q3p {

namespace {

#include "kernels_q4_tiles.inc"

constexpr long long repeat4(int word) { return 0x0001000100010001LL * word; }

template <int T>
inline void block_sums(const uint8_t* qs, __m256i sc16, const int8_t* const* xq, __m256i* sums) {
  const __m256i low = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  // Two chains below 4 tokens: the latency of vpdpwssd, not its throughput, bounds one token.
  constexpr int kChains = T < 4 ? 2 : 1;
  __m256i part[kChains][T];
  UNROLLED for (int c = 0; c < 4; ++c) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
    const __m256i q_even = _mm256_and_si256(q, low), q_odd = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
    // 16-bit lanes 0-3 of each half sc_2c, lanes 4-7 sc_2c+1, as the packed sums lie
    const long long even = repeat4(0x0100 * (4 * c + 1) + 4 * c), odd = repeat4(0x0100 * (4 * c + 3) + 4 * c + 2);
    const __m256i scale = _mm256_shuffle_epi8(sc16, _mm256_set_epi64x(odd, even, odd, even));
    UNROLLED for (int i = 0; i < T; ++i) {
      const __m256i s_even = _mm256_dpbusd_epi32(zero, q_even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[i] + 64 * c)));
      const __m256i s_odd = _mm256_dpbusd_epi32(zero, q_odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[i] + 64 * c + 32)));
      __m256i& chain = part[c % kChains][i];
      chain = _mm256_dpwssd_epi32(c < kChains ? zero : chain, _mm256_packs_epi32(s_even, s_odd), scale);
    }
  }
  UNROLLED for (int i = 0; i < T; ++i) {
    if constexpr (kChains == 2) sums[i] = _mm256_add_epi32(part[0][i], part[1][i]);
    else sums[i] = part[0][i];
  }
}

// Prefill and batches: kernels_vnni_panels.inc.
//
// Measured (one thread, CPU time, medians, a 2-core AMD Zen 4 shared with other work; old and new
// alternating in one process, random weights): a 3072 x 1024 product of 512 tokens 131 GOP/s with
// kernels_q4_tiles.inc's 4 tokens a row in panels of 128 tokens (150 KB of activations, re-read
// from the second-level cache by every row), 154-155 with 8 tokens in these panels; 1024 x 3072
// 150 -> 168; a model's 512-token prefill 116.9 -> 131.6 tokens per CPU second, decode at batch
// 16 79.1 -> 92.6 (paired fresh processes; README.md, "q4 prefill and batches", has a later run).
// One vpdpwssd chain per token suffices from 4 tokens on (8 tokens of two chains would take 16
// registers more). Not kept: 2 or 3 rows a tile sharing the activations (1.10x and 1.07-1.09x the
// old tiles in panels of 16 tokens, where 1 row was 1.10x; 1 row of 8 tokens 1.17x, 2 x 8
// 1.11-1.13x), 6 or 7 tokens (1.15-1.17x), panels of a fixed 8, 16, 24 or 32 tokens (the
// 1024-input product best at 16, 3072 at 8: hence the bytes), prefetching the next row's block
// (within 3%), the panel's activations copied to 64-byte aligned blocks (1-2%), each block's s and
// m of the 8 tokens by two 8-lane multiplications into a table read by the FMAs' embedded
// broadcasts, the tokens' scales gathered per block (0.88-0.99x the kept tiles), and 512-bit
// registers holding two chunks with the activations copied in the order that takes (0.91-0.99x
// the old tiles).
#include "kernels_vnni_panels.inc"

}  // namespace

void matmul_q4_avx512vnni(const MatmulQ4Args& a, size_t o0, size_t o1) {
  if (a.n > kMemoryBoundTokens) return prefill_rows(a, o0, o1);
  matmul_q4_rows(a, o0, o1);
}

}  // namespace q3p
