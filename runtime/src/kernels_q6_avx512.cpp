// The q6 product for AVX-512 CPUs with VNNI, compiled with those flags (see kernels_isa.h for why
// it uses no header's inline functions), on 512-bit registers: a half of a block is two
// registers, quarters 0-1 and 2-3, against 64 consecutive activations each. vpdpbusd sums 4
// products of unsigned 6-bit values and signed activations per 32-bit lane; packing the two
// registers' sums to 16 bits (each below 4 * 63 * 127) lays them out as the AVX2 file's two
// registers of lanes side by side, so one vpdpwssd applies their scales and gives quant.h's 16
// lanes I_k in order.
//
// Measured against the AVX2 file's sequence on 256-bit registers with VNNI (one thread, CPU time,
// fresh processes alternating, 4 rounds, Qwen3-0.6B shapes, on a Zen 5 EPYC, whose AVX-512 units
// are 512 bits wide): decode of an all-q6 model 62.5 against 58.9 tokens/s, of a q4 model with its
// q6 output head 72.9 against 72.3. (q4's product was slower on 512-bit registers on Zen 4, which
// runs them as two halves, and there a register's two sub-blocks' activations lie 64 bytes apart; a
// q6 register's 64 values are consecutive. Not measured on Zen 4.)
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "quant.h"

namespace q3p {

namespace {

#include "kernels_q6_tiles.inc"

// 16-bit lanes of a vpdpwssd's scales for half h, from sc_0..15 in 16-bit lanes 0-15: lanes 0-3 of
// each 128 bits sc_8h+i, lanes 4-7 sc_8h+4+i, with i = 0, 1, 2, 3 in the four 128-bit parts.
inline __m512i half_scales(__m512i sc16, int h) {
  alignas(64) static constexpr int16_t kIndex[2][32] = {
      {0, 0, 0, 0, 4, 4, 4, 4, 1, 1, 1, 1, 5, 5, 5, 5, 2, 2, 2, 2, 6, 6, 6, 6, 3, 3, 3, 3, 7, 7, 7, 7},
      {8, 8, 8, 8, 12, 12, 12, 12, 9, 9, 9, 9, 13, 13, 13, 13, 10, 10, 10, 10, 14, 14, 14, 14, 11, 11, 11, 11, 15, 15, 15, 15}};
  return _mm512_permutexvar_epi16(_mm512_load_si512(kIndex[h]), sc16);
}

template <int T>
inline void block_sums_512(const BlockQ6& w, __m256i sc16, const int8_t* const* xq, __m512i* sums) {
  const __m512i low = _mm512_set1_epi8(0x0F), kept = _mm512_set1_epi8(0x33), zero = _mm512_setzero_si512();
  const __m512i scales16 = _mm512_castsi256_si512(sc16);
  UNROLLED for (int h = 0; h < 2; ++h) {
    const __m512i ql = _mm512_loadu_si512(w.ql + 64 * h);
    // qh in both halves, the upper one shifted by 2: bits 0-1 and 4-5 of each byte (& 0x33) are
    // the top bits of quarters 0 and 2 below, 1 and 3 above
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qh + 32 * h)));
    const __m512i high = _mm512_and_si512(_mm512_srlv_epi64(qh, _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0)), kept);
    // bits 0-3 from the nibbles, 4-7 from high: low ? nibbles : high, bit by bit (0xCA)
    const __m512i q01 = _mm512_ternarylogic_epi64(low, ql, _mm512_slli_epi16(high, 4), 0xCA);
    const __m512i q23 = _mm512_ternarylogic_epi64(low, _mm512_srli_epi16(ql, 4), high, 0xCA);
    const __m512i scale = half_scales(scales16, h);
    UNROLLED for (int i = 0; i < T; ++i) {
      const __m512i p01 = _mm512_dpbusd_epi32(zero, q01, _mm512_loadu_si512(xq[i] + 128 * h));
      const __m512i p23 = _mm512_dpbusd_epi32(zero, q23, _mm512_loadu_si512(xq[i] + 128 * h + 64));
      sums[i] = _mm512_dpwssd_epi32(h == 0 ? zero : sums[i], _mm512_packs_epi32(p01, p23), scale);
    }
  }
}

template <int T>
inline void block_sums(const BlockQ6& w, __m256i sc16, const int8_t* const* xq, __m256i* lo, __m256i* hi) {
  __m512i sums[T];
  block_sums_512<T>(w, sc16, xq, sums);
  UNROLLED for (int i = 0; i < T; ++i) lo[i] = _mm512_castsi512_si256(sums[i]), hi[i] = _mm512_extracti64x4_epi64(sums[i], 1);
}

// Prefill and batches in q4's panels (kernels_vnni_panels.inc). A 512-token prefill of an all-q6
// Qwen3-0.6B took 212.6 tokens per CPU second against 171.3 with decode's tiles of 4 tokens in
// panels of 128 (one thread, medians of 4 alternating rounds, Zen 5); decode is unchanged (it
// keeps those tiles).
#include "kernels_vnni_panels.inc"

}  // namespace

void matmul_q6_avx512vnni(const MatmulQ6Args& a, size_t o0, size_t o1) {
  if (a.n > kMemoryBoundTokens) return prefill_rows(a, o0, o1);
  matmul_q6_rows(a, o0, o1);
}

}  // namespace q3p
