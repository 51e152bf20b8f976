// The matrix product of bf16 weights and activations rounded to bf16 (load(...,
// activations="bf16")), and attention in that precision on a bf16 cache, with AVX512_BF16's
// vdpbf16ps, compiled with those flags (see kernels_isa.h for why it uses no header's inline
// functions). One vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 f32 sums: twice the
// products of an f32 FMA, with no widening of the weights.
//
// The blocking is that of kernels_avx512.cpp: tiles of kRows rows by kTokens tokens over panels of
// kPanel tokens, and tiles of one row (address order) up to kMemoryBoundTokens tokens. Each lane
// l of an accumulator sums the products of positions 32 i + 2 l and 32 i + 2 l + 1 in order of i,
// the even i and the odd i in two accumulators (see tile), which are added and their 16 lanes then
// in a fixed tree: each y value's order is fixed by `in` alone.
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
//
// Each y sums its even steps of 32 values and its odd ones apart, then adds the two sums: two
// chains of vdpbf16ps. One chain per row bounded a single token's decode by its latency on Zen 5:
// a bf16 Qwen3-0.6B decoded 28.6-28.7 tokens per CPU second at one thread (34 GB/s), and 31.3-32.3
// with two (two sets of 3-4 alternating rounds); at two threads 38.3 and 39.2 tokens/s; a 512-token
// prefill 348.5 and 342.6 (not measured on Zen 4). Tiles of decode (a row against up to 4
// tokens) keep both sets of sums in registers; prefill's, too big for two sets, take the even
// steps, then the odd ones: the same sums, so a token's bits do not depend on its batch.
template <int R, int T>
inline void tile(const uint16_t* w, size_t in, const uint16_t* x, float* y, size_t ldy, const uint16_t* next = nullptr) {
  __m512 even[R][T], odd[R][T];
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int t = 0; t < T; ++t) even[r][t] = odd[r][t] = _mm512_setzero_ps();
  const size_t full = in / kPairs;  // whole steps; a last partial one goes to its parity's sums
  const __mmask32 all = __mmask32(0xFFFFFFFFu);
  if constexpr (2 * R * T <= 8) {
    size_t i = 0;
    for (; i + 2 <= full; i += 2) {
      if (next) UNROLLED for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * in + i * kPairs), _MM_HINT_T1);
      step<R, T>(even, w, in, x, i * kPairs, all);
      if (next) UNROLLED for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * in + (i + 1) * kPairs), _MM_HINT_T1);
      step<R, T>(odd, w, in, x, (i + 1) * kPairs, all);
    }
    if (i < full) step<R, T>(even, w, in, x, i * kPairs, all);
  } else {
    for (size_t i = 0; i < full; i += 2) {
      if (next) UNROLLED for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * in + i * kPairs), _MM_HINT_T1);
      step<R, T>(even, w, in, x, i * kPairs, all);
    }
    for (size_t i = 1; i < full; i += 2) {
      if (next) UNROLLED for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * in + i * kPairs), _MM_HINT_T1);
      step<R, T>(odd, w, in, x, i * kPairs, all);
    }
  }
  if (full * kPairs < in) {
    const __mmask32 tail = __mmask32((1u << (in - full * kPairs)) - 1);
    if (full % 2) step<R, T>(odd, w, in, x, full * kPairs, tail);
    else step<R, T>(even, w, in, x, full * kPairs, tail);
  }
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int t = 0; t < T; ++t) y[t * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(even[r][t], odd[r][t]));
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


namespace {

// ---- Attention in bf16 activations' precision (AttentionTile::bf16_products) on a bf16 cache ----
//
// The queries are bf16 values already and the softmax step rounds the weights to bf16, so
// vdpbf16ps takes both products whole. The scores: a key's row as it lies in the cache, 32 values
// an instruction (where the f32 kernel widens them by a shift and an AND and takes 2 FMAs). The
// values: two keys at a time, their rows interleaved by 16-bit unpacks so that each 32-bit lane
// holds one value of both, against the broadcast pair of their weights; the accumulators hold the
// values in the unpacks' order, permuted back when stored. Measured (0.6B shapes, bf16 model,
// activations and cache, one thread, tokens per CPU second, alternating processes, before the
// grouped sums of kernels_scores_avx512.inc): a prompt of 2048 tokens 124.1 -> 141.3 (the scores
// alone: 137), of 4000 88.8 -> 106.2, of 512 unchanged; decode from positions 2000 and 3984
// within noise (its attention waits on memory). Where head_dim is not a multiple of 32 (or above
// 256), kernels_avx512.cpp's attention computes the same rounded products in f32 FMAs.
constexpr size_t kLanes = 16;
constexpr size_t kHeads = 8, kScoreHeads = 4, kValueVecs = 8;  // as kernels_avx512.cpp's
constexpr size_t kMaxDim = 256;        // head_dim up to which the queries are held for a tile

inline __mmask16 lanes_below(size_t count) {
  return count >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

#include "kernels_scores_avx512.inc"

// s[h][j] = scale * (q_h . k_j) for the H heads from g0 (head_dim a multiple of 32): lane l sums
// the products of values 32c + 2l and 32c + 2l + 1 for c in order, then the lanes' tree.
template <DType KV, int H>
void tile_scores(const AttentionTile& a, size_t g0, float (*s)[kAttentionTile]) {
  static_assert(KV == DType::BF16, "bf16 products on a bf16 cache only");
  const size_t chunks = a.D / kPairs;
  __m512bh q[H][kMaxDim / kPairs];
  UNROLLED for (int h = 0; h < H; ++h)
    for (size_t c = 0; c < chunks; ++c) {
      const float* from = a.q + (g0 + h) * a.D + c * kPairs;  // bf16 values: converted exactly
      q[h][c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(from + kLanes), _mm512_loadu_ps(from));
    }
  auto products = [&](__m512 (&acc)[H][kKeys], const uint8_t* const (&key)[kKeys]) __attribute__((always_inline)) {
    UNROLLED for (size_t i = 0; i < kKeys; ++i)
      for (size_t c = 0; c < chunks; ++c) {
        const __m512bh pairs = (__m512bh)_mm512_loadu_si512(key[i] + c * 2 * kPairs);
        UNROLLED for (int h = 0; h < H; ++h) acc[h][i] = _mm512_dpbf16_ps(acc[h][i], q[h][c], pairs);
      }
  };
  scores_by_keys<H>(a, 2, s, products);
}

inline float softmax_step(const AttentionTile& a, size_t g, float* s) { return softmax_step_avx512(a, g, s); }

// out[g] = out[g] * correction[g] + sum_j p[g][j] v_j for the H heads from g0, over C chunks of 32
// values from d0. Accumulator 2i (2i + 1) of a head holds chunk i's values 8b + e (8b + 4 + e),
// e < 4, in lane 4b + e: the order of _mm512_unpacklo_epi16 (unpackhi) on 128-bit lanes b.
template <int H, int C>
void values_in_pairs(const AttentionTile& a, size_t g0, size_t d0, const float (*p)[kAttentionTile],
                     const float* correction) {
  const __m512i low_order = _mm512_set_epi32(27, 26, 25, 24, 19, 18, 17, 16, 11, 10, 9, 8, 3, 2, 1, 0);
  const __m512i high_order = _mm512_set_epi32(31, 30, 29, 28, 23, 22, 21, 20, 15, 14, 13, 12, 7, 6, 5, 4);
  __m512 acc[H][2 * C];
  UNROLLED for (int h = 0; h < H; ++h) {
    const __m512 c = _mm512_set1_ps(correction[h]);
    UNROLLED for (int i = 0; i < C; ++i) {
      const float* from = a.out + (g0 + h) * a.D + d0 + i * kPairs;
      const __m512 low = _mm512_loadu_ps(from), high = _mm512_loadu_ps(from + kLanes);
      acc[h][2 * i] = _mm512_mul_ps(c, _mm512_permutex2var_ps(low, low_order, high));
      acc[h][2 * i + 1] = _mm512_mul_ps(c, _mm512_permutex2var_ps(low, high_order, high));
    }
  }
  // The weights as bf16 pairs (exact: the softmax step rounded them), zero past the tile's end.
  alignas(64) uint32_t weights[H][kAttentionTile / 2];
  UNROLLED for (int h = 0; h < H; ++h)
    for (size_t j = 0; j < kAttentionTile; j += kLanes) {
      const __m512 w = _mm512_maskz_loadu_ps(j < a.nk ? lanes_below(a.nk - j) : 0, p[h] + j);
      _mm256_store_si256(reinterpret_cast<__m256i*>(&weights[h][j / 2]), (__m256i)_mm512_cvtneps_pbh(w));
    }
  const uint16_t* v = static_cast<const uint16_t*>(a.v) + d0;
  for (size_t j = 0; j < a.nk; j += 2) {
    __m512bh value[2 * C];
    UNROLLED for (int i = 0; i < C; ++i) {
      const __m512i first = _mm512_loadu_si512(v + j * a.ld + i * kPairs);
      const __m512i second = j + 1 < a.nk ? _mm512_loadu_si512(v + (j + 1) * a.ld + i * kPairs) : _mm512_setzero_si512();
      value[2 * i] = (__m512bh)_mm512_unpacklo_epi16(first, second);
      value[2 * i + 1] = (__m512bh)_mm512_unpackhi_epi16(first, second);
    }
    UNROLLED for (int h = 0; h < H; ++h) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(weights[h][j / 2]));
      UNROLLED for (int i = 0; i < 2 * C; ++i) acc[h][i] = _mm512_dpbf16_ps(acc[h][i], w, value[i]);
    }
  }
  const __m512i first_half = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second_half = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  UNROLLED for (int h = 0; h < H; ++h)
    UNROLLED for (int i = 0; i < C; ++i) {
      float* to = a.out + (g0 + h) * a.D + d0 + i * kPairs;
      _mm512_storeu_ps(to, _mm512_permutex2var_ps(acc[h][2 * i], first_half, acc[h][2 * i + 1]));
      _mm512_storeu_ps(to + kLanes, _mm512_permutex2var_ps(acc[h][2 * i], second_half, acc[h][2 * i + 1]));
    }
}

// The values [d0, d0 + 128), fewer at the end of a head: whole chunks of 32.
template <DType KV, int H>
void tile_values(const AttentionTile& a, size_t g0, size_t d0, const float (*p)[kAttentionTile],
                 const float* correction) {
  static_assert(KV == DType::BF16, "bf16 products on a bf16 cache only");
  switch (min_size(kValueVecs / 2, (a.D - d0) / kPairs)) {
    case 4: return values_in_pairs<H, 4>(a, g0, d0, p, correction);
    case 3: return values_in_pairs<H, 3>(a, g0, d0, p, correction);
    case 2: return values_in_pairs<H, 2>(a, g0, d0, p, correction);
    default: return values_in_pairs<H, 1>(a, g0, d0, p, correction);
  }
}

#include "kernels_attention.inc"

}  // namespace

void attention_tile_avx512bf16(const AttentionTile& a) {
  if (a.bf16_products && a.kv == DType::BF16 && a.D % kPairs == 0 && a.D <= kMaxDim) return attention_tile<DType::BF16>(a);
  attention_tile_avx512(a);
}

}  // namespace q3p
