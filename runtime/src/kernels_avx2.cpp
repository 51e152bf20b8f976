// The kernels (matrix product, attention) for AVX2 + FMA + F16C CPUs, compiled with those flags (see kernels_isa.h
// for why it uses no header's inline functions). Weights of every dtype are widened to f32 and meet
// f32 activations in FMAs; the blocking is that of kernels_avx512.cpp with 8 lanes and
// 16 registers: a tile of kRows weight rows meets kTokens tokens at once.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels_isa.h"

namespace q3p {

namespace {

// Loops over a tile's rows and tokens are unrolled before GCC's scalar replacement runs, so the
// accumulator arrays live in registers (rolled, they stay in memory: a store per step each).
#define UNROLLED _Pragma("GCC unroll 16")

// 6 x 2: 12 accumulators, 6 weight vectors and a token's vector in the 16 registers; with the two
// passes of tile() (128 tokens by 3072 x 1024 bf16 rows, one core) 69 GFLOP/s against 67 for 3 x 4,
// 64 for 4 x 3 and 50 for 2 x 6 (one pass, one chain: 76 for 3 x 4).
constexpr size_t kRows = 6, kTokens = 2, kPanel = 128, kLanes = 8;
constexpr size_t kMemoryBoundTokens = 4;  // up to this many tokens, tiles of one row (as AVX-512)

inline size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

// 8 values of dtype D from p widened to f32; `count` < 8 reads only that many (a row's end).
template <DType D>
inline __m256 load8(const void* p, size_t count) {
  constexpr size_t esize = D == DType::F32 ? 4 : 2;
  alignas(32) uint8_t tail[kLanes * esize] = {};
  if (count < kLanes) {
    std::memcpy(tail, p, count * esize);
    p = tail;
  }
  if (D == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(p));
  const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
  if (D == DType::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The sum of the 8 lanes, in a fixed order.
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One step of `count` values from k for every accumulator of a tile.
template <DType D, int R, int T, class X>
__attribute__((always_inline)) inline void step(__m256 (&acc)[R][T], const uint8_t* w, size_t in, const X* x, size_t k,
                                                size_t count) {
  constexpr DType XD = sizeof(X) == 4 ? DType::F32 : DType::BF16;
  constexpr size_t esize = D == DType::F32 ? 4 : 2;
  __m256 wv[R];
  UNROLLED for (int r = 0; r < R; ++r) wv[r] = load8<D>(w + (r * in + k) * esize, count);
  UNROLLED for (int t = 0; t < T; ++t) {
    const __m256 xv = load8<XD>(x + t * in + k, count);
    UNROLLED for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
  }
}

// y[t * ldy + r] = row r of w . token t of x (X: float, or uint16_t for activations rounded to
// bf16). Steps of 8 values alternate between two sums, even and odd steps, added lane by lane at
// the end: two chains of FMAs per y value, where one chain's latency (128 dependent FMAs per
// 1024-value row) held a one-row decode tile to 16 GB/s (28-30 with two). A tile whose two sets
// of accumulators would not fit the 16 registers (prefill's 3 x 4) sums the even steps, then the
// odd ones, over its rows (in L1 by then): the same sums.
// With `next`, the first pass over the rows also asks for the lines of the R rows at `next` that it
// reads of its own (as kernels_avx512.cpp; without it, nothing asked for the next tile's rows): a
// forward of n tokens, 0.6B shapes, bf16 weights and activations (widened here), 2 threads, this
// kernel on the AVX-512 machine, medians of 5 in alternating processes, n = 5 85 -> 68 ms, 8 115
// -> 97, 16 191 -> 175, 32 348 -> 330, 128 1294 -> 1273.
template <DType D, int R, int T, class X>
inline void tile(const void* w, size_t in, const X* x, float* y, size_t ldy, const uint8_t* next = nullptr) {
  constexpr size_t esize = D == DType::F32 ? 4 : 2;
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  if constexpr (R * T <= 4) {
    __m256 even[R][T], odd[R][T];
    UNROLLED for (int r = 0; r < R; ++r)
      UNROLLED for (int t = 0; t < T; ++t) even[r][t] = odd[r][t] = _mm256_setzero_ps();
    size_t k = 0;
    for (; k + 2 * kLanes <= in; k += 2 * kLanes) {
      step<D, R, T, X>(even, wb, in, x, k, kLanes);
      step<D, R, T, X>(odd, wb, in, x, k + kLanes, kLanes);
    }
    if (k < in) step<D, R, T, X>(even, wb, in, x, k, min_size(kLanes, in - k));
    if (k + kLanes < in) step<D, R, T, X>(odd, wb, in, x, k + kLanes, in - k - kLanes);
    UNROLLED for (int r = 0; r < R; ++r)
      UNROLLED for (int t = 0; t < T; ++t) y[t * ldy + r] = sum8(_mm256_add_ps(even[r][t], odd[r][t]));
  } else {
    __m256 acc[R][T];
    UNROLLED for (int r = 0; r < R; ++r)
      UNROLLED for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    for (size_t k = 0; k < in; k += 2 * kLanes) {
      if (next && k * esize % 64 == 0)
        UNROLLED for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + (r * in + k) * esize), _MM_HINT_T1);
      step<D, R, T, X>(acc, wb, in, x, k, min_size(kLanes, in - k));
    }
    alignas(32) float even[R][T][kLanes];  // in memory while the odd steps take the registers
    UNROLLED for (int r = 0; r < R; ++r)
      UNROLLED for (int t = 0; t < T; ++t) {
        _mm256_store_ps(even[r][t], acc[r][t]);
        acc[r][t] = _mm256_setzero_ps();
      }
    for (size_t k = kLanes; k < in; k += 2 * kLanes) step<D, R, T, X>(acc, wb, in, x, k, min_size(kLanes, in - k));
    UNROLLED for (int r = 0; r < R; ++r)
      UNROLLED for (int t = 0; t < T; ++t) y[t * ldy + r] = sum8(_mm256_add_ps(_mm256_load_ps(even[r][t]), acc[r][t]));
  }
}

#include "kernels_tiles.inc"

// A one-row tile of 2-4 tokens asks for the row kRowsAhead rows on into L2, as in
// kernels_avx512.cpp: batch 2 23.8 -> 31.9 and batch 4 28.6 -> 35.9 tokens per CPU second (0.6B
// shapes, one thread, this AVX2 kernel on the AVX-512 machine, medians of 2 interleaved processes).
constexpr size_t kRowsAhead = 8;

}  // namespace

void matmul_avx2(const MatmulArgs& a, size_t o0, size_t o1) {
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

float fma_loop_avx2(size_t steps, float seed) {
  constexpr int kChains = 12;  // enough independent FMAs in flight to fill both pipes
  __m256 acc[kChains];
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(seed);
  UNROLLED for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_ps(static_cast<float>(c));
  for (size_t s = 0; s < steps; ++s)
    UNROLLED for (int c = 0; c < kChains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
  UNROLLED for (int c = 1; c < kChains; ++c) acc[0] = _mm256_add_ps(acc[0], acc[c]);
  return sum8(acc[0]);
}

namespace {

// kernels_generic.cpp's exp_nonpositive, 8 lanes at a time (with FMAs: within an ulp of it).
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(magic)), _mm256_set1_epi32(127)),
      23);
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_NLT_UQ);  // NaN stays NaN
  return _mm256_and_ps(live, _mm256_mul_ps(y, _mm256_castsi256_ps(two_n)));
}

inline void store8(float* p, __m256 v, size_t count) {
  if (count >= kLanes) return _mm256_storeu_ps(p, v);
  alignas(32) float tail[kLanes];
  _mm256_store_ps(tail, v);
  std::memcpy(p, tail, count * sizeof(float));
}

inline float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// v rounded to bf16 values, to nearest even, NaN kept (to_bf16's rounding, for bf16_products).
inline __m256 round_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
  const __m256 rounded = _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32(int(0xFFFF0000u))));
  return _mm256_blendv_ps(rounded, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

constexpr size_t kHeads = 8;      // query heads whose scores are held at once
constexpr size_t kValueVecs = 4;  // output vectors of a head held in registers (32 values)

// s[h][j] = scale * (q_h . k_j) for the H heads from g0: lane l sums d = l, l + 8, ... of D, then
// a tree of the lanes. kKeys keys at a time, so that H x kKeys independent sums are in flight
// (one key's sum alone waits on its FMAs' latency), each key vector serving the H heads. The keys
// are read one after the other, each whole, in address order (as in kernels_avx512.cpp: a vector
// of each key in turn made decode from position 1500, f32 cache, one thread, 1.09x slower here).
constexpr size_t kKeys = 4;
constexpr size_t kScoreHeads = 2;  // heads per pass of tile_scores: 2 heads x kKeys sums already take 8 of the 16 registers

template <DType KV, int H>
void tile_scores(const AttentionTile& a, size_t g0, float (*s)[kAttentionTile]) {
  constexpr size_t esize = KV == DType::F32 ? 4 : 2;
  const uint8_t* k = static_cast<const uint8_t*>(a.k);
  for (size_t j = 0; j < a.nk; j += kKeys) {
    const uint8_t* key[kKeys];  // past the tile's end, its last key again (not stored)
    UNROLLED for (size_t i = 0; i < kKeys; ++i) key[i] = k + min_size(j + i, a.nk - 1) * a.ld * esize;
    __m256 acc[H][kKeys];
    UNROLLED for (int h = 0; h < H; ++h)
      UNROLLED for (size_t i = 0; i < kKeys; ++i) acc[h][i] = _mm256_setzero_ps();
    UNROLLED for (size_t i = 0; i < kKeys; ++i)
      for (size_t d = 0; d < a.D; d += kLanes) {
        const size_t count = min_size(kLanes, a.D - d);
        const __m256 kv = load8<KV>(key[i] + d * esize, count);
        UNROLLED for (int h = 0; h < H; ++h)
          acc[h][i] = _mm256_fmadd_ps(load8<DType::F32>(a.q + (g0 + h) * a.D + d, count), kv, acc[h][i]);
      }
    UNROLLED for (int h = 0; h < H; ++h)
      UNROLLED for (size_t i = 0; i < kKeys; ++i)
        if (j + i < a.nk) s[h][j + i] = sum8(acc[h][i]) * a.scale;
  }
}

// The online softmax step of head g: s becomes exp(s - max), max and sum move on; returns the
// factor that rescales the head's earlier output.
inline float softmax_step(const AttentionTile& a, size_t g, float* s) {
  const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
  __m256 top = minus_inf;
  size_t j = 0;
  for (; j + kLanes <= a.nk; j += kLanes) top = _mm256_max_ps(top, _mm256_loadu_ps(s + j));
  float m = max8(top);
  for (; j < a.nk; ++j) m = s[j] > m ? s[j] : m;
  m = a.max[g] > m ? a.max[g] : m;
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  for (j = 0; j < a.nk; j += kLanes) {
    const size_t count = min_size(kLanes, a.nk - j);
    alignas(32) float part[kLanes];
    _mm256_store_ps(part, minus_inf);  // exp(-inf) = 0 past the tile's end
    std::memcpy(part, s + j, count * sizeof(float));
    __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(part), mv));
    if (a.bf16_products) p = round_bf16(p);
    store8(s + j, p, count);
    sum = _mm256_add_ps(sum, p);
  }
  const float correction = _mm256_cvtss_f32(exp_nonpositive(_mm256_set1_ps(a.max[g] - m)));  // 0 at first (-inf)
  a.max[g] = m;
  a.sum[g] = a.sum[g] * correction + sum8(sum);
  return correction;
}

// out[g] = out[g] * correction[g] + sum_j p[g][j] v_j for the H heads from g0, over the values
// [d0, d0 + 32): the accumulators stay in registers and each value vector serves the H heads.
template <DType KV, int H>
void tile_values(const AttentionTile& a, size_t g0, size_t d0, const float (*p)[kAttentionTile],
                 const float* correction) {
  constexpr size_t esize = KV == DType::F32 ? 4 : 2;
  size_t count[kValueVecs];
  UNROLLED for (size_t i = 0; i < kValueVecs; ++i)
    count[i] = d0 + i * kLanes < a.D ? min_size(kLanes, a.D - d0 - i * kLanes) : 0;
  __m256 acc[H][kValueVecs];
  UNROLLED for (int h = 0; h < H; ++h) {
    const __m256 c = _mm256_set1_ps(correction[h]);
    UNROLLED for (size_t i = 0; i < kValueVecs; ++i)
      acc[h][i] = _mm256_mul_ps(c, load8<DType::F32>(a.out + (g0 + h) * a.D + d0 + i * kLanes, count[i]));
  }
  const uint8_t* v = static_cast<const uint8_t*>(a.v) + d0 * esize;
  for (size_t j = 0; j < a.nk; ++j) {
    __m256 value[kValueVecs];
    UNROLLED for (size_t i = 0; i < kValueVecs; ++i)
      value[i] = load8<KV>(v + (j * a.ld + i * kLanes) * esize, count[i]);
    UNROLLED for (int h = 0; h < H; ++h) {
      const __m256 w = _mm256_set1_ps(p[h][j]);
      UNROLLED for (size_t i = 0; i < kValueVecs; ++i) acc[h][i] = _mm256_fmadd_ps(w, value[i], acc[h][i]);
    }
  }
  UNROLLED for (int h = 0; h < H; ++h)
    UNROLLED for (size_t i = 0; i < kValueVecs; ++i)
      store8(a.out + (g0 + h) * a.D + d0 + i * kLanes, acc[h][i], count[i]);
}

#include "kernels_attention.inc"

}  // namespace

void attention_tile_avx2(const AttentionTile& a) {
  if (a.kv == DType::BF16) attention_tile<DType::BF16>(a);
  else attention_tile<DType::F32>(a);
}

}  // namespace q3p
