// The kernels (matrix product, attention) for AVX-512 CPUs (F, BW, VL), compiled with those flags (see kernels_isa.h
// for why it uses no header's inline functions). Weights of every dtype are widened to f32 in
// registers and meet the f32 activations in FMAs, so the results match the generic kernel's to
// f32 rounding (vdpbf16ps, for activations rounded to bf16, is kernels_avx512bf16.cpp).
//
// Blocking: a tile of kRows weight rows meets kTokens tokens at once (kRows x kTokens
// accumulators in registers, each widened weight vector used kTokens times); the tile's rows stay
// in L1/L2 while it sweeps a panel of kPanel tokens, so each weight is read from memory once per
// panel. Up to kMemoryBoundTokens tokens (decode) the product is memory-bound instead: tiles of
// one row read W in address order, the one pattern the hardware prefetcher follows at full
// bandwidth (4 interleaved rows' streams got a third of it). Each y value's order of sums is
// fixed by `in` alone, whatever the tile.
#include <immintrin.h>

#include <cmath>

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

// 6 x 4: 24 accumulators, 6 weight vectors and a token's vector in the 32 registers. Against 4 x 4,
// a third fewer loads per FMA: 128 tokens by 3072 x 1024 bf16 rows, 101 against 69 GFLOP/s of CPU
// time on one core (interleaved runs; 5 x 4 and 8 x 3 gave 101, 4 x 6 64).
constexpr size_t kRows = 6, kTokens = 4, kPanel = 128, kLanes = 16;
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

// y[t * ldy + r] = row r of w . token t of x, for r < R, t < T. One chain of FMAs per y value:
// two (even and odd steps, as kernels_avx2.cpp) made one-row tiles of 1-4 tokens 1.1-2x faster
// from cache, but the 6 x 4 tile must then sum in two passes, for a token's bits not to depend on
// its batch, and prefill ran 20% slower (81 against 100 tokens per CPU second, 128 tokens, one
// thread, interleaved processes) and batch 16 18%, with batch 1-4 decode within the noise.
// With `next`, each step also asks for the line of the R rows at `next` that it reads of its own.
template <DType D, int R, int T, class X>
inline void tile(const void* w, size_t in, const X* x, float* y, size_t ldy, const uint8_t* next = nullptr) {
  constexpr size_t esize = D == DType::F32 ? 4 : 2;
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  __m512 acc[R][T];
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  size_t k = 0;
  for (; k + kLanes <= in; k += kLanes) {
    if (next && k * esize % 64 == 0)
      UNROLLED for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + (r * in + k) * esize), _MM_HINT_T1);
    step<D, R, T, X>(acc, wb, in, x, k, __mmask16(0xFFFF));
  }
  if (k < in) step<D, R, T, X>(acc, wb, in, x, k, __mmask16((1u << (in - k)) - 1));
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int t = 0; t < T; ++t) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

#include "kernels_tiles.inc"

// A one-row tile of 2-4 tokens asks for the row kRowsAhead rows on into L2 (prefetch_rows): it
// does 2-4x decode's FMAs per weight byte, and the hardware prefetcher alone fell behind it. 0.6B
// shapes, one thread, medians of 3 interleaved processes on the shared machine, tokens per CPU
// second: batch 2 21.8 -> 34.4, batch 4 37.1 -> 43.0 (4 and 16 rows ahead gave the same). At one
// token it cost more than it brought (batch 1 5-15% slower, 4 and 8 rows ahead), so decode goes
// without.
constexpr size_t kRowsAhead = 8;

// The 6-row tiles of prefill and batches ask for the next tile's rows into L2 while the current
// one computes: a tile's rows are read interleaved, a pattern the hardware prefetcher follows
// poorly (asked for all at once: 8 and 16 tokens by 86016 x 1024 bf16 rows, one thread, +12%).
// They are asked for a line per row with the first tile's reads of its own, as in
// kernels_avx512bf16.cpp (all at once, the step took about its memory reads plus its FMAs): a
// forward of n tokens, 0.6B shapes, bf16 weights, f32 activations, 2 threads, medians of 5 in
// alternating processes, n = 5 59.5 -> 44 ms, 8 69.6 -> 53.6, 16 106 -> 87, 32 173 -> 158, 128
// 603 -> 590.

}  // namespace

void matmul_avx512(const MatmulArgs& a, size_t o0, size_t o1) {
  for (size_t t0 = 0; t0 < a.n; t0 += kPanel) {
    const size_t t1 = min_size(a.n, t0 + kPanel);
    size_t o = o0;
    if (a.n > kMemoryBoundTokens)
      for (; o + kRows <= o1; o += kRows) row_block<kRows>(a, o, t0, t1, o + 2 * kRows <= o1 ? o + kRows : 0);
    for (; o < o1; ++o) {
      if (a.n > 1 && o + kRowsAhead < o1) prefetch_rows(a, o + kRowsAhead, 1);
      row_block<1>(a, o, t0, t1);
    }
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

namespace {

// kernels_generic.cpp's exp_nonpositive, 16 lanes at a time (with FMAs: within an ulp of it).
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
  const __m512 n = _mm512_sub_ps(t, magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512i two_n = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(magic)), _mm512_set1_epi32(127)),
      23);
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_NLT_UQ);  // NaN stays NaN
  return _mm512_maskz_mul_ps(live, y, _mm512_castsi512_ps(two_n));
}

inline __mmask16 lanes_below(size_t count) {
  return count >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

// v rounded to bf16 values, to nearest even, NaN kept (to_bf16's rounding, for bf16_products).
inline __m512 round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  const __m512 rounded = _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(int(0xFFFF0000u))));
  return _mm512_mask_mov_ps(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}

#include "kernels_scores_avx512.inc"

constexpr size_t kHeads = 8;     // query heads whose scores are held at once
constexpr size_t kValueVecs = 8; // output vectors of a head held in registers (128 values)
constexpr size_t kScoreHeads = 4;  // heads per pass of tile_scores: 4 heads x kKeys sums fill 16 of the 32 registers

// A bf16 cache's rows as 64-byte vectors of 32 values: lane l holds values 2l (its low half) and
// 2l + 1 (its high half), so that two instructions widen the vector (a shift, an AND) where a
// 16-value load took a widening conversion and a shift, and a key's scores need no masks. The
// queries are split alike, once per call. Measured (0.6B shapes, bf16 model and cache, one thread,
// CPU time per decode step, 5 rounds alternating processes): position 3984 82.4 -> 78.5 ms,
// 2000 68.1 -> 64.2, 100 53.9 -> 54.9 (4 of 5 rounds slower there, by 0.7-4 ms, though what this
// adds runs once per tile: within this machine's noise, or the code's layout).
constexpr size_t kPairLanes = 32;       // bf16 values per 64-byte vector
constexpr size_t kMaxSplitDim = 256;    // head_dim up to which the scores take the split queries
inline __m512 even_values(__m512i pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }
inline __m512 odd_values(__m512i pairs) {
  return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(int(0xFFFF0000u))));
}
inline __m512i even_lanes() { return _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0); }
inline __m512i odd_lanes() { return _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1); }

// tile_scores for a bf16 cache and head_dim a multiple of 32 (up to kMaxSplitDim): lane l sums
// d = 32c + 2l and 32c + 2l + 1 for c in order, then the lanes' tree.
template <int H>
void tile_scores_bf16(const AttentionTile& a, size_t g0, float (*s)[kAttentionTile]) {
  const size_t chunks = a.D / kPairLanes;
  alignas(64) float q[H][kMaxSplitDim / kPairLanes][2][kLanes];  // [head][chunk][even, odd]
  UNROLLED for (int h = 0; h < H; ++h)
    for (size_t c = 0; c < chunks; ++c) {
      const float* from = a.q + (g0 + h) * a.D + c * kPairLanes;
      const __m512 low = _mm512_loadu_ps(from), high = _mm512_loadu_ps(from + kLanes);
      _mm512_store_ps(q[h][c][0], _mm512_permutex2var_ps(low, even_lanes(), high));
      _mm512_store_ps(q[h][c][1], _mm512_permutex2var_ps(low, odd_lanes(), high));
    }
  auto products = [&](__m512 (&acc)[H][kKeys], const uint8_t* const (&key)[kKeys]) __attribute__((always_inline)) {
    UNROLLED for (size_t i = 0; i < kKeys; ++i)
      for (size_t c = 0; c < chunks; ++c) {
        const __m512i pairs = _mm512_loadu_si512(key[i] + c * 2 * kPairLanes);
        const __m512 even = even_values(pairs), odd = odd_values(pairs);
        UNROLLED for (int h = 0; h < H; ++h) {
          acc[h][i] = _mm512_fmadd_ps(_mm512_load_ps(q[h][c][0]), even, acc[h][i]);
          acc[h][i] = _mm512_fmadd_ps(_mm512_load_ps(q[h][c][1]), odd, acc[h][i]);
        }
      }
  };
  scores_by_keys<H>(a, 2, s, products);
}

// s[h][j] = scale * (q_h . k_j) for the H heads from g0: lane l sums d = l, l + 16, ... of D, then
// a tree of the lanes.
template <DType KV, int H>
void tile_scores(const AttentionTile& a, size_t g0, float (*s)[kAttentionTile]) {
  if constexpr (KV == DType::BF16)
    if (a.D % kPairLanes == 0 && a.D <= kMaxSplitDim) return tile_scores_bf16<H>(a, g0, s);
  constexpr size_t esize = KV == DType::F32 ? 4 : 2;
  auto products = [&](__m512 (&acc)[H][kKeys], const uint8_t* const (&key)[kKeys]) __attribute__((always_inline)) {
    UNROLLED for (size_t i = 0; i < kKeys; ++i)
      for (size_t d = 0; d < a.D; d += kLanes) {
        const __mmask16 mask = lanes_below(a.D - d);
        const __m512 kv = load16<KV>(key[i] + d * esize, mask);
        UNROLLED for (int h = 0; h < H; ++h)
          acc[h][i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a.q + (g0 + h) * a.D + d), kv, acc[h][i]);
      }
  };
  scores_by_keys<H>(a, esize, s, products);
}

// The online softmax step of head g: s becomes exp(s - max), max and sum move on; returns the
// factor that rescales the head's earlier output.
inline float softmax_step(const AttentionTile& a, size_t g, float* s) {
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
  __m512 top = minus_inf;
  for (size_t j = 0; j < a.nk; j += kLanes)
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(minus_inf, lanes_below(a.nk - j), s + j));
  const float tile_max = _mm512_reduce_max_ps(top);
  const float m = a.max[g] > tile_max ? a.max[g] : tile_max;
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (size_t j = 0; j < a.nk; j += kLanes) {
    const __mmask16 mask = lanes_below(a.nk - j);
    __m512 p = _mm512_maskz_mov_ps(mask, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + j), mv)));
    if (a.bf16_products) p = round_bf16(p);
    _mm512_mask_storeu_ps(s + j, mask, p);
    sum = _mm512_add_ps(sum, p);
  }
  const float correction = _mm512_cvtss_f32(exp_nonpositive(_mm512_set1_ps(a.max[g] - m)));  // 0 at first (-inf)
  a.max[g] = m;
  a.sum[g] = a.sum[g] * correction + _mm512_reduce_add_ps(sum);
  return correction;
}

// tile_values for a bf16 cache over 128 values [d0, d0 + 128): the accumulators hold them split
// as the rows' lanes do (even, odd values of each 32), each value's sum the same as below.
template <int H>
void tile_values_bf16(const AttentionTile& a, size_t g0, size_t d0, const float (*p)[kAttentionTile],
                      const float* correction) {
  constexpr size_t kChunks = kValueVecs / 2;
  __m512 acc[H][kValueVecs];  // [head][2 c + (0: even, 1: odd)]
  UNROLLED for (int h = 0; h < H; ++h) {
    const __m512 c = _mm512_set1_ps(correction[h]);
    UNROLLED for (size_t i = 0; i < kChunks; ++i) {
      const float* from = a.out + (g0 + h) * a.D + d0 + i * kPairLanes;
      const __m512 low = _mm512_loadu_ps(from), high = _mm512_loadu_ps(from + kLanes);
      acc[h][2 * i] = _mm512_mul_ps(c, _mm512_permutex2var_ps(low, even_lanes(), high));
      acc[h][2 * i + 1] = _mm512_mul_ps(c, _mm512_permutex2var_ps(low, odd_lanes(), high));
    }
  }
  const uint16_t* v = static_cast<const uint16_t*>(a.v) + d0;
  for (size_t j = 0; j < a.nk; ++j) {
    __m512 value[kValueVecs];
    UNROLLED for (size_t i = 0; i < kChunks; ++i) {
      const __m512i pairs = _mm512_loadu_si512(v + j * a.ld + i * kPairLanes);
      value[2 * i] = even_values(pairs);
      value[2 * i + 1] = odd_values(pairs);
    }
    UNROLLED for (int h = 0; h < H; ++h) {
      const __m512 w = _mm512_set1_ps(p[h][j]);
      UNROLLED for (size_t i = 0; i < kValueVecs; ++i) acc[h][i] = _mm512_fmadd_ps(w, value[i], acc[h][i]);
    }
  }
  const __m512i first_half = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second_half = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  UNROLLED for (int h = 0; h < H; ++h)
    UNROLLED for (size_t i = 0; i < kChunks; ++i) {
      float* to = a.out + (g0 + h) * a.D + d0 + i * kPairLanes;
      _mm512_storeu_ps(to, _mm512_permutex2var_ps(acc[h][2 * i], first_half, acc[h][2 * i + 1]));
      _mm512_storeu_ps(to + kLanes, _mm512_permutex2var_ps(acc[h][2 * i], second_half, acc[h][2 * i + 1]));
    }
}

// out[g] = out[g] * correction[g] + sum_j p[g][j] v_j for the H heads from g0, over the values
// [d0, d0 + 128): the accumulators stay in registers and each value vector serves the H heads.
template <DType KV, int H>
void tile_values(const AttentionTile& a, size_t g0, size_t d0, const float (*p)[kAttentionTile],
                 const float* correction) {
  if constexpr (KV == DType::BF16)
    if (d0 + kValueVecs * kLanes <= a.D) return tile_values_bf16<H>(a, g0, d0, p, correction);
  constexpr size_t esize = KV == DType::F32 ? 4 : 2;
  __mmask16 mask[kValueVecs];
  UNROLLED for (size_t i = 0; i < kValueVecs; ++i) mask[i] = d0 + i * kLanes < a.D ? lanes_below(a.D - d0 - i * kLanes) : 0;
  __m512 acc[H][kValueVecs];
  UNROLLED for (int h = 0; h < H; ++h) {
    const __m512 c = _mm512_set1_ps(correction[h]);
    UNROLLED for (size_t i = 0; i < kValueVecs; ++i)
      acc[h][i] = _mm512_mul_ps(c, _mm512_maskz_loadu_ps(mask[i], a.out + (g0 + h) * a.D + d0 + i * kLanes));
  }
  const uint8_t* v = static_cast<const uint8_t*>(a.v) + d0 * esize;
  for (size_t j = 0; j < a.nk; ++j) {
    __m512 value[kValueVecs];
    UNROLLED for (size_t i = 0; i < kValueVecs; ++i)
      value[i] = load16<KV>(v + (j * a.ld + i * kLanes) * esize, mask[i]);
    UNROLLED for (int h = 0; h < H; ++h) {
      const __m512 w = _mm512_set1_ps(p[h][j]);
      UNROLLED for (size_t i = 0; i < kValueVecs; ++i) acc[h][i] = _mm512_fmadd_ps(w, value[i], acc[h][i]);
    }
  }
  UNROLLED for (int h = 0; h < H; ++h)
    UNROLLED for (size_t i = 0; i < kValueVecs; ++i)
      _mm512_mask_storeu_ps(a.out + (g0 + h) * a.D + d0 + i * kLanes, mask[i], acc[h][i]);
}

#include "kernels_attention.inc"

}  // namespace

float softmax_step_avx512(const AttentionTile& a, size_t g, float* s) { return softmax_step(a, g, s); }

void attention_tile_avx512(const AttentionTile& a) {
  if (a.kv == DType::BF16) attention_tile<DType::BF16>(a);
  else attention_tile<DType::F32>(a);
}

}  // namespace q3p
