// The matrix product of bf16 weights and activations rounded to bf16 (load(...,
// activations="bf16")) with AVX512_BF16's vdpbf16ps, compiled with those flags (see kernels_isa.h
// for why it uses no header's inline functions). One vdpbf16ps multiplies 32 bf16 pairs and adds
// them into 16 f32 sums: twice the products of an f32 FMA, with no widening of the weights.
//
// The blocking is that of kernels_avx512.cpp: tiles of kRows rows by kTokens tokens over panels of
// kPanel tokens, and tiles of one row (address order) up to kMemoryBoundTokens tokens. Each lane
// l of an accumulator sums the products of positions 32 i + 2 l and 32 i + 2 l + 1 in order of i,
// and the 16 lanes are then added in a fixed tree: each y value's order is fixed by `in` alone.
#include <immintrin.h>

#include "kernels_isa.h"

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() vectors (bug 105593, see
// kernels_avx512.cpp).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace q3p {

namespace {

#define UNROLLED _Pragma("GCC unroll 16")

// 6 x 4 tiles (24 accumulators, 6 weight vectors and one of x: 31 of the 32 registers) gave 187
// GFLOP/s against 178 for 4 x 4, 163 for 3 x 8 and 143 for 8 x 3 (0.6B layer shapes, 128
// tokens, one thread, CPU time: stable on a shared machine).
constexpr size_t kRows = 6, kTokens = 4, kPanel = 128, kPairs = 32;  // kPairs: bf16 values per vdpbf16ps
constexpr size_t kMemoryBoundTokens = 4;

inline size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

// One step of 32 values of `in` for every accumulator of a tile (`mask`: the values in the row).
template <int R, int T>
__attribute__((always_inline)) inline void step(__m512 (&acc)[R][T], const uint16_t* w, size_t in, const uint16_t* x,
                                                size_t k, __mmask32 mask) {
  __m512bh wv[R];
  UNROLLED for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * in + k);
  UNROLLED for (int t = 0; t < T; ++t) {
    const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + t * in + k);
    UNROLLED for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
  }
}

// y[t * ldy + r] = row r of w . token t of x, for r < R, t < T. With `next`, each step also asks
// for the same 64 bytes of the R rows at `next` into L2 (see matmul_avx512bf16).
template <int R, int T>
inline void tile(const uint16_t* w, size_t in, const uint16_t* x, float* y, size_t ldy, const uint16_t* next = nullptr) {
  __m512 acc[R][T];
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  size_t k = 0;
  for (; k + kPairs <= in; k += kPairs) {
    if (next) UNROLLED for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * in + k), _MM_HINT_T1);
    step<R, T>(acc, w, in, x, k, __mmask32(0xFFFFFFFFu));
  }
  if (k < in) step<R, T>(acc, w, in, x, k, __mmask32((1u << (in - k)) - 1));
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int t = 0; t < T; ++t) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

template <int R, int T>
inline void tile_at(const MatmulArgs& a, size_t o, size_t t, size_t next_row = 0) {
  const uint16_t* w = static_cast<const uint16_t*>(a.w);
  tile<R, T>(w + o * a.in, a.in, a.x_bf16 + t * a.in, a.y + t * a.out + o, a.out, next_row ? w + next_row * a.in : nullptr);
}

template <int R, int T>
inline void partial_tile(const MatmulArgs& a, size_t o, size_t t, size_t count) {
  if constexpr (T > 1) {
    if (count == T - 1) tile_at<R, T - 1>(a, o, t);
    else partial_tile<R, T - 1>(a, o, t, count);
  }
}

// Rows [o, o + R) against tokens [t0, t1); the first tile asks for the R rows from next_row (if
// not 0) into L2.
template <int R>
void row_block(const MatmulArgs& a, size_t o, size_t t0, size_t t1, size_t next_row = 0) {
  size_t t = t0;
  if (next_row && t + kTokens <= t1) tile_at<R, kTokens>(a, o, t, next_row), t += kTokens;
  for (; t + kTokens <= t1; t += kTokens) tile_at<R, kTokens>(a, o, t);
  partial_tile<R, kTokens>(a, o, t, t1 - t);
}

// A one-row tile of 3 or 4 tokens asks for the row kRowsAhead rows on into L2, as in
// kernels_avx512.cpp: batch 3 43.0 -> 50.0 and batch 4 46.7 -> 63.4 tokens per CPU second (0.6B
// shapes, one thread, medians of 3 interleaved processes). vdpbf16ps takes 2 tokens at the speed
// of memory already, and there the prefetches slowed batch 2 down (43.9 -> 35.5).
constexpr size_t kRowsAhead = 8;

// The one-row tiles' prefetch.
inline void prefetch_rows(const MatmulArgs& a, size_t o, size_t rows) {
  const char* first = static_cast<const char*>(a.w) + o * a.in * 2;
  for (size_t b = 0; b < rows * a.in * 2; b += 64) _mm_prefetch(first + b, _MM_HINT_T1);
}

}  // namespace

void matmul_avx512bf16(const MatmulArgs& a, size_t o0, size_t o1) {
  if (!a.x_bf16) return matmul_avx512(a, o0, o1);
  for (size_t t0 = 0; t0 < a.n; t0 += kPanel) {
    const size_t t1 = min_size(a.n, t0 + kPanel);
    size_t o = o0;
    // The next block's rows are asked for a line per row with each step of the first tile, paced
    // with the reading of this block's. Asked for all at once (12 KB) before the block, as they
    // were, a forward took about as long as its memory reads and its products added together.
    // 0.6B shapes, bf16 model and activations, a forward of n tokens in one session, medians of 5
    // in alternating processes: 2 threads, n = 5 50 -> 39-42 ms, 8 57 -> 46-48, 16 77 -> 66, 32
    // 112-122 -> 103-105, 128 355-384 -> 349-368; one thread, n = 5 90 -> 71, 16 139 -> 122; a
    // batch of 16 sessions' one token each, 2 threads, 101 -> 85 ms. Two blocks ahead: the same;
    // _MM_HINT_T0: about half the gain. Fewer than 5 tokens keep the one-row tiles: 6 x 4 tiles
    // were 5% faster at 4 tokens but 15-25% slower at 2 and 3.
    if (a.n > kMemoryBoundTokens)
      for (; o + kRows <= o1; o += kRows) row_block<kRows>(a, o, t0, t1, o + 2 * kRows <= o1 ? o + kRows : 0);
    for (; o < o1; ++o) {
      if (a.n > 2 && o + kRowsAhead < o1) prefetch_rows(a, o + kRowsAhead, 1);
      row_block<1>(a, o, t0, t1);
    }
  }
}

float dpbf16_loop_avx512(size_t steps, float seed) {
  constexpr int kChains = 12;  // enough independent vdpbf16ps in flight to fill the pipes
  __m512 acc[kChains];
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3F7F), b = (__m512bh)_mm512_set1_epi16(0x3A83);  // 0.996, 1e-3
  UNROLLED for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(seed * static_cast<float>(c));
  for (size_t s = 0; s < steps; ++s)
    UNROLLED for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  UNROLLED for (int c = 1; c < kChains; ++c) acc[0] = _mm512_add_ps(acc[0], acc[c]);
  return _mm512_reduce_add_ps(acc[0]);
}

}  // namespace q3p
