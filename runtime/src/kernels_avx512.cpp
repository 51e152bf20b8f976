// The kernels (matrix product, attention) for AVX-512 CPUs (F, BW, VL), compiled with those flags (see kernels_isa.h
// for why it uses no header's inline functions). Weights of every dtype are widened to f32 in
// registers and meet the f32 activations in FMAs, so the results match the generic kernel's to
// f32 rounding (why not vdpbf16ps: see the README's performance section).
//
// Blocking: a tile of kRows weight rows meets kTokens tokens at once (kRows x kTokens
// accumulators in registers, each widened weight vector used kTokens times); the tile's rows stay
// in L1/L2 while it sweeps a panel of kPanel tokens, so each weight is read from memory once per
// panel. Up to kMemoryBoundTokens tokens (decode) the product is memory-bound instead: tiles of
// one row read W in address order, the one pattern the hardware prefetcher follows at full
// bandwidth (4 interleaved rows' streams got a third of it). Each y value's order of sums is
// fixed by `in` alone, whatever the tile.
#include <immintrin.h>

#include "kernels_isa.h"

// Several of GCC 12's AVX-512 intrinsics start from an _mm512_undefined_*() vector, which
// -Wuninitialized and -Wmaybe-uninitialized report at every inlined use (GCC bug 105593, fixed
// in GCC 13).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace q3p {

namespace {

// Loops over a tile's rows and tokens are unrolled before GCC's scalar replacement runs, so the
// accumulator arrays live in registers (rolled, they stay in memory: a store per step each).
#define UNROLLED _Pragma("GCC unroll 16")

constexpr size_t kRows = 4, kTokens = 4, kPanel = 128, kLanes = 16;
constexpr size_t kMemoryBoundTokens = 4;  // up to this many tokens, tiles of one row

inline size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

// 16 values of dtype D from p (the lanes of `mask`, zeros elsewhere), widened to f32.
template <DType D>
inline __m512 load16(const void* p, __mmask16 mask) {
  if (D == DType::F32) return _mm512_maskz_loadu_ps(mask, p);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  if (D == DType::F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One step of 16 values of `in` for every accumulator of a tile (X: float, or uint16_t for
// activations rounded to bf16, widened here: CPUs without AVX512_BF16, see kernels.cpp).
template <DType D, int R, int T, class X>
__attribute__((always_inline)) inline void step(__m512 (&acc)[R][T], const uint8_t* w, size_t in, const X* x,
                                                size_t k, __mmask16 mask) {
  constexpr size_t esize = D == DType::F32 ? 4 : 2;
  constexpr DType XD = sizeof(X) == 4 ? DType::F32 : DType::BF16;
  __m512 wv[R];
  UNROLLED for (int r = 0; r < R; ++r) wv[r] = load16<D>(w + (r * in + k) * esize, mask);
  UNROLLED for (int t = 0; t < T; ++t) {
    const __m512 xv = load16<XD>(x + t * in + k, mask);
    UNROLLED for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
  }
}

// y[t * ldy + r] = row r of w . token t of x, for r < R, t < T.
template <DType D, int R, int T, class X>
inline void tile(const void* w, size_t in, const X* x, float* y, size_t ldy) {
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  __m512 acc[R][T];
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  size_t k = 0;
  for (; k + kLanes <= in; k += kLanes) step<D, R, T, X>(acc, wb, in, x, k, __mmask16(0xFFFF));
  if (k < in) step<D, R, T, X>(acc, wb, in, x, k, __mmask16((1u << (in - k)) - 1));
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int t = 0; t < T; ++t) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

#include "kernels_tiles.inc"

// Asks for the `rows` weight rows from row o into L2, while the current tile computes: a tile's
// rows are read interleaved, a pattern the hardware prefetcher follows poorly (8 and 16 tokens by
// 86016 x 1024 bf16 rows, one thread: +12%; 128 tokens and more: no change).
inline void prefetch_rows(const MatmulArgs& a, size_t o, size_t rows) {
  const size_t esize = a.dt == DType::F32 ? 4 : 2;
  const char* first = static_cast<const char*>(a.w) + o * a.in * esize;
  for (size_t b = 0; b < rows * a.in * esize; b += 64) _mm_prefetch(first + b, _MM_HINT_T1);
}

}  // namespace

void matmul_avx512(const MatmulArgs& a, size_t o0, size_t o1) {
  for (size_t t0 = 0; t0 < a.n; t0 += kPanel) {
    const size_t t1 = min_size(a.n, t0 + kPanel);
    size_t o = o0;
    if (a.n > kMemoryBoundTokens)
      for (; o + kRows <= o1; o += kRows) {
        if (o + 2 * kRows <= o1) prefetch_rows(a, o + kRows, kRows);
        row_block<kRows>(a, o, t0, t1);
      }
    for (; o < o1; ++o) row_block<1>(a, o, t0, t1);
  }
}

float fma_loop_avx512(size_t steps, float seed) {
  constexpr int kChains = 12;  // enough independent FMAs in flight to fill both pipes
  __m512 acc[kChains];
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(seed);
  UNROLLED for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(static_cast<float>(c));
  for (size_t s = 0; s < steps; ++s)
    UNROLLED for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
  UNROLLED for (int c = 1; c < kChains; ++c) acc[0] = _mm512_add_ps(acc[0], acc[c]);
  return _mm512_reduce_add_ps(acc[0]);
}

void attention_scores_avx512(const float* q, size_t G, size_t D, const float* k, size_t ld, size_t nk, float scale,
                             float* scores, size_t lds) {
  for (size_t j = 0; j < nk; ++j) {
    const float* key = k + j * ld;
    for (size_t g = 0; g < G; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (size_t d = 0; d < D; d += kLanes) {
        const __mmask16 mask = D - d >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, q + g * D + d), _mm512_maskz_loadu_ps(mask, key + d), acc);
      }
      scores[g * lds + j] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
}

void attention_values_avx512(const float* p, size_t lds, size_t G, const float* v, size_t ld, size_t nk, size_t D,
                             float* out) {
  for (size_t j = 0; j < nk; ++j) {
    const float* value = v + j * ld;
    for (size_t g = 0; g < G; ++g) {
      const __m512 weight = _mm512_set1_ps(p[g * lds + j]);
      float* o = out + g * D;
      for (size_t d = 0; d < D; d += kLanes) {
        const __mmask16 mask = D - d >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1);
        _mm512_mask_storeu_ps(o + d, mask, _mm512_fmadd_ps(weight, _mm512_maskz_loadu_ps(mask, value + d),
                                                           _mm512_maskz_loadu_ps(mask, o + d)));
      }
    }
  }
}

}  // namespace q3p
