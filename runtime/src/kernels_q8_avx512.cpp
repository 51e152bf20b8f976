// The q8 product for AVX-512 CPUs with VNNI, compiled with those flags (see kernels_isa.h for
// why it uses no header's inline functions). One 512-bit register holds two blocks: vpdpbusd
// multiplies unsigned by signed bytes, so the activations are offset to unsigned (q + 128) and
// the offset's share, 128 * (sum of 4 weights), is subtracted from the start value of each lane:
// the lane sums are the exact integer products p_j of quant.h, in one instruction per 64 pairs.
//
// Blocking as kernels_avx512.cpp: a tile of R rows meets T tokens; decode (up to
// kMemoryBoundTokens) reads one row at a time, in address order.
#include <immintrin.h>

#include "quant.h"

#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's own AVX-512 intrinsics (see kernels_avx512.cpp)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace q3p {

namespace {

#define UNROLLED _Pragma("GCC unroll 16")

constexpr size_t kRows = 4, kTokens = 4, kPanel = 128;
constexpr size_t kMemoryBoundTokens = 4;

// The quants of blocks b and b + 1 (or of b alone, the upper half zero).
template <bool Pair, class Block>
inline __m512i load_quants(const Block* blocks) {
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blocks[0].q));
  if (!Pair) return _mm512_zextsi256_si512(lo);
  return _mm512_inserti64x4(_mm512_zextsi256_si512(lo), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blocks[1].q)), 1);
}

// Lanes 0-7 hold a, lanes 8-15 b.
inline __m512 halves(float a, float b) { return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b)); }

// acc[k] += acc[k + w] for w = 8, 4, 2, 1 (quant.h's order), then lane 0.
inline float reduce16(__m512 acc) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(acc),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
}

// Blocks [b, b + 2) (or b alone) of R rows against T tokens.
template <bool Pair, int R, int T>
__attribute__((always_inline)) inline void step(__m512 (&acc)[R][T], const BlockQ8* const (&w)[R],
                                                const BlockQ8Act* const (&x)[T], size_t b) {
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i wq[R], start[R];
  __m512 dw[R];
  UNROLLED for (int r = 0; r < R; ++r) {
    wq[r] = load_quants<Pair>(w[r] + b);
    // -(128 * the sum of each lane's 4 weights)
    start[r] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, wq[r]));
    dw[r] = halves(_cvtsh_ss(w[r][b].d), Pair ? _cvtsh_ss(w[r][b + 1].d) : 0.0f);
  }
  UNROLLED for (int t = 0; t < T; ++t) {
    const __m512i xu = _mm512_xor_si512(load_quants<Pair>(x[t] + b), offset);  // q + 128, unsigned
    const __m512 dx = halves(x[t][b].d, Pair ? x[t][b + 1].d : 0.0f);
    UNROLLED for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start[r], xu, wq[r]));
      const __m512 d = _mm512_mul_ps(dw[r], dx);
      acc[r][t] = Pair ? _mm512_fmadd_ps(d, p, acc[r][t]) : _mm512_mask3_fmadd_ps(d, p, acc[r][t], 0x00FF);
    }
  }
}

// y of rows [o, o + R) for tokens [t, t + T).
template <int R, int T>
inline void tile(const MatmulQ8Args& a, size_t o, size_t t) {
  const size_t blocks = (a.in + kQ8Block - 1) / kQ8Block;
  const BlockQ8* w[R];
  const BlockQ8Act* x[T];
  UNROLLED for (int r = 0; r < R; ++r) w[r] = a.w + (o + r) * blocks;
  UNROLLED for (int i = 0; i < T; ++i) x[i] = a.x + (t + i) * blocks;
  __m512 acc[R][T];
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int i = 0; i < T; ++i) acc[r][i] = _mm512_setzero_ps();
  size_t b = 0;
  for (; b + 2 <= blocks; b += 2) step<true, R, T>(acc, w, x, b);
  if (b < blocks) step<false, R, T>(acc, w, x, b);
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int i = 0; i < T; ++i) a.y[(t + i) * a.out + o + r] = reduce16(acc[r][i]);
}

// Rows [o, o + R) against tokens [t0, t1): tiles of kTokens, then one of the rest.
template <int R>
void row_block(const MatmulQ8Args& a, size_t o, size_t t0, size_t t1) {
  size_t t = t0;
  for (; t + kTokens <= t1; t += kTokens) tile<R, kTokens>(a, o, t);
  switch (t1 - t) {
    case 3: tile<R, 3>(a, o, t); break;
    case 2: tile<R, 2>(a, o, t); break;
    case 1: tile<R, 1>(a, o, t); break;
    default: break;
  }
}

}  // namespace

void matmul_q8_avx512vnni(const MatmulQ8Args& a, size_t o0, size_t o1) {
  for (size_t t0 = 0; t0 < a.n; t0 += kPanel) {
    const size_t t1 = t0 + kPanel < a.n ? t0 + kPanel : a.n;
    size_t o = o0;
    if (a.n > kMemoryBoundTokens)
      for (; o + kRows <= o1; o += kRows) row_block<kRows>(a, o, t0, t1);
    for (; o < o1; ++o) row_block<1>(a, o, t0, t1);
  }
}

}  // namespace q3p
