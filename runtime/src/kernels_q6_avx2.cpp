// The q6 product for AVX2 CPUs, compiled with those flags (see kernels_isa.h for why it uses no
// header's inline functions): maddubs sums pairs of products, madd multiplies them by a
// sub-block's scale and adds pairs (4 values a lane), and one hadd per two quarters adds pairs of
// lanes into quant.h's lanes I_k.
#include <immintrin.h>

#include <cstring>

#include "quant.h"

namespace q3p {

namespace {

#include "kernels_q6_tiles.inc"

template <int T>
inline void block_sums(const BlockQ6& w, __m256i sc16, const int8_t* const* xq, __m256i* lo, __m256i* hi) {
  UNROLLED for (int h = 0; h < 2; ++h) {
    __m256i quarter[4], scale[4];
    unpack_half(w, h, quarter);
    // quarter c's 16-bit lanes: sc_8h+2c in the low 128 bits, sc_8h+2c+1 in the high ones
    const __m256i scales = _mm256_broadcastsi128_si256(h == 0 ? _mm256_castsi256_si128(sc16) : _mm256_extracti128_si256(sc16, 1));
    UNROLLED for (int c = 0; c < 4; ++c) {
      const char lo_byte = static_cast<char>(4 * c), hi_byte = static_cast<char>(4 * c + 2);
      scale[c] = _mm256_shuffle_epi8(scales, _mm256_setr_epi8(
          lo_byte, lo_byte + 1, lo_byte, lo_byte + 1, lo_byte, lo_byte + 1, lo_byte, lo_byte + 1,
          lo_byte, lo_byte + 1, lo_byte, lo_byte + 1, lo_byte, lo_byte + 1, lo_byte, lo_byte + 1,
          hi_byte, hi_byte + 1, hi_byte, hi_byte + 1, hi_byte, hi_byte + 1, hi_byte, hi_byte + 1,
          hi_byte, hi_byte + 1, hi_byte, hi_byte + 1, hi_byte, hi_byte + 1, hi_byte, hi_byte + 1));
    }
    UNROLLED for (int i = 0; i < T; ++i) {
      __m256i p[4];
      UNROLLED for (int c = 0; c < 4; ++c) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[i] + 128 * h + 32 * c));
        p[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(quarter[c], x), scale[c]);
      }
      const __m256i lanes_lo = _mm256_hadd_epi32(p[0], p[2]), lanes_hi = _mm256_hadd_epi32(p[1], p[3]);
      lo[i] = h == 0 ? lanes_lo : _mm256_add_epi32(lo[i], lanes_lo);
      hi[i] = h == 0 ? lanes_hi : _mm256_add_epi32(hi[i], lanes_hi);
    }
  }
}

}  // namespace

void matmul_q6_avx2(const MatmulQ6Args& a, size_t o0, size_t o1) { matmul_q6_rows(a, o0, o1); }

}  // namespace q3p
