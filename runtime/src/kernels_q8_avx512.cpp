// The q8 product for AVX-512 CPUs with VNNI, compiled with those flags (see kernels_isa.h for
// why it uses no header's inline functions): vpdpbusd (on 256-bit registers, AVX512_VL) gives
// the exact lane sums p_j of quant.h in one instruction, where AVX2 takes two. Decode's single
// token (n = 1) takes 512-bit registers holding two blocks of a row (single_token_rows, below), and
// so do prefill and batches of more than kMemoryBoundTokens tokens (paired_rows).
//
// Measured (one thread, decode of a 6144 x 1024 matrix, interleaved, shared 2-core machine): a
// first 512-bit product, which assembled both halves' quants, scales and activations per block
// (and took maddubs, before vpdpbusd), was slower than AVX2 (12 against 14 GB/s): this CPU (AMD
// Zen 4) runs 512-bit operations as two 256-bit ones, so only saved instructions can pay.
#include <immintrin.h>

#include <vector>

#include "quant.h"

// GCC 12's _mm512 intrinsics start from an _mm512_undefined_*() vector: see kernels_avx512.cpp.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace q3p {

namespace {

// vpdpbusd multiplies unsigned bytes by signed ones. The activations are offset to unsigned once
// per block and token (x + 128, an XOR of the sign bit), and each block of weights once carries
// the offset's share, -128 times the sums of its 4-value groups, as the sums' starting value: the
// lane sums are then one vpdpbusd per (row, token), exact as before (|sum| < 2^31).
struct WeightBlock {
  __m256i q, offset;
};

// -128 times the sums of the 4-value groups of a block (quant.h's lanes j): what an offset of 128
// on the other factor adds to the lane sums.
inline __m256i offset_share(__m256i q) {
  const __m256i group_sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1), q);
  return _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(group_sums, 7));
}
inline __m512i offset_share(__m512i q) {  // the same, for a pair of blocks
  const __m512i group_sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), q);
  return _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(group_sums, 7));
}
inline WeightBlock weight_block(__m256i wq) { return {wq, offset_share(wq)}; }
inline __m256i token_block(__m256i xq) { return _mm256_xor_si256(xq, _mm256_set1_epi8(char(0x80))); }
inline __m256i lane_sums(const WeightBlock& w, __m256i x) { return _mm256_dpbusd_epi32(w.offset, x, w.q); }
// A tile of one token (a batch's last, and decode's odd last block) meets each block of weights
// once, so it takes the signs' way instead: |w| (unsigned; -128 stays 0x80, 128) times x with w's
// sign, 3 instructions a block against the offset's 5 (measured when decode took these tiles: a
// 1024 x 1024 and a 3072 x 1024 product from the cache, 36 against 40 us and 103 against 114 us).
inline __m256i single_lane_sums(__m256i wq, __m256i xq) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq));
}

constexpr size_t kRows = 1;  // the tiles serve batches of up to kMemoryBoundTokens here: paired_rows takes more

#include "kernels_q8_tiles.inc"

// Decode's single token takes two blocks of a row per 512-bit register: lanes 0-7 the even block,
// 8-15 the odd one, which is quant.h's acc[16] as it stands, so the bits are those of the tiles.
// The offset goes the other way round from the prefill tiles': each block of weights meets one
// token, so the weights are offset to unsigned (w + 128, an XOR) and the token, copied once per
// call into 64-byte aligned pairs, carries the offset's share as the sums' starting value. A pair
// of blocks costs one vpdpbusd, conversion and FMA, its two scales are converted and multiplied
// together: 108 instructions for 8 pairs, the loop's included, where the tile of one row and one
// token took 29 for each pair. Measured: kernels_q8_tiles.inc. Why 8 pairs an iteration: from the
// model's mapped file one pair an iteration was 0.91-1.01x the tiles, 8 pairs 1.03-1.14x, 16 1.01x.
constexpr size_t kPairsPerStep = 8;

// The two halves of a 512-bit register: a pair of blocks.
inline __m512i halves(__m256i low, __m256i high) { return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1); }
// Two scales (lanes 0 and 1) spread over the halves' lanes: each block's, in its 8 lanes.
inline __m512 spread_over_halves(__m128 two) {
  const __m512i lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(two));
}

struct alignas(64) TokenPair {  // blocks 2i and 2i + 1 of the token, in the register's halves
  int8_t q[2 * kQ8Block];
  int32_t start[16];  // offset_share of each block
  float d[16];        // each block's scale, in its 8 lanes
};

inline __m512 pair_step(__m512 acc, const BlockQ8* w, const TokenPair& x) {
  const __m512i wq = halves(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[0].q)),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[1].q)));
  const __m512i p = _mm512_dpbusd_epi32(_mm512_load_si512(x.start), _mm512_xor_si512(wq, _mm512_set1_epi8(char(0x80))),
                                        _mm512_load_si512(x.q));
  const __m128 dw = _mm_cvtph_ps(_mm_insert_epi16(_mm_cvtsi32_si128(w[0].d), w[1].d, 1));
  const __m512 d = _mm512_mul_ps(spread_over_halves(dw), _mm512_load_ps(x.d));
  return _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc);
}

void single_token_rows(const MatmulQ8Args& a, size_t o0, size_t o1) {
  const size_t blocks = (a.in + kQ8Block - 1) / kQ8Block, pairs = blocks / 2;
  thread_local std::vector<TokenPair> x;  // each thread copies the token for its own rows (a few KB)
  x.resize(pairs);
  for (size_t b = 0; b < 2 * pairs; ++b) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.x[b].q));
    const size_t half = b % 2;
    _mm256_store_si256(reinterpret_cast<__m256i*>(x[b / 2].q + half * kQ8Block), q);
    _mm256_store_si256(reinterpret_cast<__m256i*>(x[b / 2].start + half * 8), offset_share(q));
    _mm256_store_ps(x[b / 2].d + half * 8, _mm256_set1_ps(a.x[b].d));
  }
  for (size_t o = o0; o < o1; ++o) {
    const BlockQ8* w = a.w + o * blocks;
    __m512 acc = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + kPairsPerStep <= pairs; i += kPairsPerStep)
      UNROLLED for (size_t k = 0; k < kPairsPerStep; ++k) acc = pair_step(acc, w + 2 * (i + k), x[i + k]);
    for (; i < pairs; ++i) acc = pair_step(acc, w + 2 * i, x[i]);
    __m256 even[1][1] = {{_mm512_castps512_ps256(acc)}};
    const __m256 odd = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
    if (blocks % 2) {  // the last block is even
      const BlockQ8* const wl[1] = {w};
      const BlockQ8Act* const xl[1] = {a.x};
      step<1, 1>(even, wl, xl, blocks - 1);
    }
    a.y[o] = sum8(_mm256_add_ps(even[0][0], odd));
  }
}

// Prefill and batches of more than kMemoryBoundTokens tokens: tiles of kPairRows rows and up to
// kPairTokens tokens on 512-bit registers, each holding a pair of blocks as the single token's
// do (lanes 0-7 the even block, 8-15 the odd one: quant.h's acc[16] as it stands). Here the
// activations are offset to unsigned, and each row's pair of blocks carries the offset's share
// (prepared once for the tile's tokens), as in kernels_q8_tiles.inc. The tokens are copied once
// per panel into 64-byte aligned pairs (PanelPair) with their scales spread over the lanes, so that
// a (row, token) pair of blocks costs one vpdpbusd, conversion, multiplication of the scales and
// FMA, for 64 products, where the 256-bit tiles took twice that and a scalar multiply-and-broadcast
// each block. Each step prefetches the same pair of the next tile's rows.
//
// Measured (one thread, CPU time, medians, a 2-core AMD Zen 4 shared with other work; old and new
// alternating in one process, random weights, Qwen3-0.6B shapes): a 3072 x 1024 product of 512
// tokens 97-98 GOP/s with the 2 x 4 256-bit tiles, 119-121 with these pairs, 126-128 with the
// prefetch; the 151936-row output head of 16 tokens (165 MB from memory) 83 with the old tiles and
// with the pairs alone, 118-128 with the prefetch (the loads were waiting: the hardware's
// prefetcher did not keep ahead of a loop that does this much work a line). Panels of 128 tokens
// (a copy of 256 KB, in the second-level cache) against these of 8 (16 KB, as
// kernels_q4_avx512.cpp found for q4): 127 against 130-131 GOP/s, and 132-133 against 137-139 for
// a 1024 x 3072 product. A model's 512-token prefill 93.7 -> 114.6 tokens per CPU second, then
// 115.4 with these panels; decode at batch 16 58.6 -> 87.3 (paired fresh processes).
// A loop of independent 512-bit instructions (same machine, at 3.6 GHz) ran a vpdpbusd, FMA,
// multiplication, conversion or broadcast a cycle each; vpdpbusd with an FMA or a multiplication
// two cycles, with a conversion or a broadcast one: vpdpbusd, multiplication and FMA share two
// pipes, so a (row, token) pair takes at least 3 cycles for its 64 products.
// Not kept: the scales as a table of (d_even, d_odd), each row's multiplied by 8 tokens' in one
// instruction and read by a 64-bit broadcast, with the two blocks' lanes interleaved (1.17-1.20x
// the old tiles, against 1.23x); the scales from that table by GCC's own register shuffles (1.16x);
// 256-bit registers with that table read by the FMA's embedded broadcast and the weights offset
// instead (0.82-1.10x); the pair's two halves by 256-bit FMAs with embedded broadcasts
// (1.03-1.07x); the offset's share carried by the tokens (1.11x) or reloaded from memory rather
// than copied (1.06x); float(p) by a magic number instead of the conversion (unchanged); tiles of
// 3 x 6, 4 x 4, 2 x 6, 3 x 8 and 1 x 8 (within 2% of 2 x 8); prefetching two tiles ahead
// (unchanged).
constexpr size_t kPairRows = 2, kPairTokens = 8;  // 16 accumulators of the 32 registers

struct alignas(64) PanelPair {  // blocks 2i and 2i + 1 of a token
  int8_t q[2 * kQ8Block];       // offset to unsigned (+ 128, an XOR)
  float d[16];                  // each block's scale, in its 8 lanes
};

// Pair i of R rows against T tokens; with kLone the even block alone (a row's odd last block).
template <int R, int T, bool kLone>
__attribute__((always_inline)) inline void pair_tile_step(__m512 (&acc)[R][T], const BlockQ8* const (&w)[R],
                                                          const PanelPair* const (&x)[T], size_t i, size_t blocks) {
  __m512i wq[R], start[R];
  __m512 dw[R];
  UNROLLED for (int r = 0; r < R; ++r) {
    const BlockQ8* b = w[r] + 2 * i;
    // the same pair of the next tile's rows (past the last row, a prefetch does not fault)
    const char* next = reinterpret_cast<const char*>(b + R * blocks);
    _mm_prefetch(next, _MM_HINT_T0);
    _mm_prefetch(next + 64, _MM_HINT_T0);
    const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[0].q));
    wq[r] = kLone ? _mm512_zextsi256_si512(even) : halves(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[1].q)));
    start[r] = offset_share(wq[r]);
    dw[r] = spread_over_halves(_mm_cvtph_ps(_mm_cvtsi32_si128(b[0].d | (kLone ? 0 : b[1].d << 16))));
  }
  UNROLLED for (int k = 0; k < T; ++k) {
    const __m512i xk = _mm512_load_si512(x[k][i].q);
    UNROLLED for (int r = 0; r < R; ++r) {
      const __m512i p = _mm512_dpbusd_epi32(start[r], xk, wq[r]);
      acc[r][k] = _mm512_fmadd_ps(_mm512_mul_ps(dw[r], _mm512_load_ps(x[k][i].d)), _mm512_cvtepi32_ps(p), acc[r][k]);
    }
  }
}

// y of rows [o, o + R) for tokens [t, t + T), x: the tokens' copied pairs.
template <int R, int T>
inline void pair_tile(const MatmulQ8Args& a, size_t o, size_t t, const PanelPair* const (&x)[T]) {
  const size_t blocks = (a.in + kQ8Block - 1) / kQ8Block, full = blocks / 2;
  const BlockQ8* w[R];
  UNROLLED for (int r = 0; r < R; ++r) w[r] = a.w + (o + r) * blocks;
  __m512 acc[R][T];
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int k = 0; k < T; ++k) acc[r][k] = _mm512_setzero_ps();
  for (size_t i = 0; i < full; ++i) pair_tile_step<R, T, false>(acc, w, x, i, blocks);
  if (blocks % 2) pair_tile_step<R, T, true>(acc, w, x, full, blocks);
  UNROLLED for (int r = 0; r < R; ++r)
    UNROLLED for (int k = 0; k < T; ++k) {
      const __m256 odd = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][k]), 1));
      a.y[(t + k) * a.out + o + r] = sum8(_mm256_add_ps(_mm512_castps512_ps256(acc[r][k]), odd));
    }
}

// Rows [o, o + R) against tokens [t, t + T) of the panel copied in xq (pairs per token) from t0.
template <int R, int T>
inline void pair_tile_of_panel(const MatmulQ8Args& a, size_t o, size_t t, size_t t0, const PanelPair* xq) {
  const size_t pairs = (a.in + 2 * kQ8Block - 1) / (2 * kQ8Block);
  const PanelPair* x[T];
  UNROLLED for (int k = 0; k < T; ++k) x[k] = xq + (t - t0 + k) * pairs;
  pair_tile<R, T>(a, o, t, x);
}

// Rows [o, o + R) against the panel's tokens [t0, t1), in tiles of kPairTokens and a last partial tile.
template <int R>
inline void pair_row_tiles(const MatmulQ8Args& a, size_t o, size_t t0, size_t t1, const PanelPair* xq) {
  size_t t = t0;
  for (; t + kPairTokens <= t1; t += kPairTokens) pair_tile_of_panel<R, kPairTokens>(a, o, t, t0, xq);
  switch (t1 - t) {
    case 7: pair_tile_of_panel<R, 7>(a, o, t, t0, xq); break;
    case 6: pair_tile_of_panel<R, 6>(a, o, t, t0, xq); break;
    case 5: pair_tile_of_panel<R, 5>(a, o, t, t0, xq); break;
    case 4: pair_tile_of_panel<R, 4>(a, o, t, t0, xq); break;
    case 3: pair_tile_of_panel<R, 3>(a, o, t, t0, xq); break;
    case 2: pair_tile_of_panel<R, 2>(a, o, t, t0, xq); break;
    case 1: pair_tile_of_panel<R, 1>(a, o, t, t0, xq); break;
    default: break;
  }
}

// Rows [o0, o1) against every token, in panels of tokens whose copy fits in kPairPanelBytes (the
// first-level cache, 32 KB here, keeps it while the rows stream past: 8 tokens of 1024-3072 inputs).
constexpr size_t kPairPanelBytes = 24 * 1024;

void paired_rows(const MatmulQ8Args& a, size_t o0, size_t o1) {
  const size_t blocks = (a.in + kQ8Block - 1) / kQ8Block, pairs = (blocks + 1) / 2;
  const size_t fit = kPairPanelBytes / (pairs * sizeof(PanelPair)) / kPairTokens * kPairTokens;
  const size_t panel = fit > kPairTokens ? fit : kPairTokens;
  thread_local std::vector<PanelPair> xq;  // each thread copies the panel for its own rows
  for (size_t t0 = 0; t0 < a.n; t0 += panel) {
    const size_t t1 = t0 + panel < a.n ? t0 + panel : a.n;
    xq.resize((t1 - t0) * pairs);
    for (size_t t = t0; t < t1; ++t)
      for (size_t i = 0; i < pairs; ++i) {
        const BlockQ8Act* x = a.x + t * blocks + 2 * i;
        const bool lone = 2 * i + 1 == blocks;  // zeros as the odd block: no products, a scale of 0
        const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[0].q));
        const __m256i odd = lone ? _mm256_setzero_si256() : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[1].q));
        PanelPair& pair = xq[(t - t0) * pairs + i];
        _mm512_store_si512(pair.q, _mm512_xor_si512(halves(even, odd), _mm512_set1_epi8(char(0x80))));
        _mm256_store_ps(pair.d, _mm256_set1_ps(x[0].d));
        _mm256_store_ps(pair.d + 8, _mm256_set1_ps(lone ? 0.0f : x[1].d));
      }
    size_t o = o0;
    for (; o + kPairRows <= o1; o += kPairRows) pair_row_tiles<kPairRows>(a, o, t0, t1, xq.data());
    for (; o < o1; ++o) pair_row_tiles<1>(a, o, t0, t1, xq.data());
  }
}

}  // namespace

void matmul_q8_avx512vnni(const MatmulQ8Args& a, size_t o0, size_t o1) {
  if (a.n == 1) return single_token_rows(a, o0, o1);
  if (a.n > kMemoryBoundTokens) return paired_rows(a, o0, o1);
  matmul_q8_rows(a, o0, o1);
}

}  // namespace q3p
