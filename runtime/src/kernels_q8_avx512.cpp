// The q8 product for AVX-512 CPUs with VNNI, compiled with those flags (see kernels_isa.h for
// why it uses no header's inline functions): vpdpbusd (on 256-bit registers, AVX512_VL) gives
// the exact lane sums p_j of quant.h in one instruction, where AVX2 takes two. Decode's single
// token (n = 1) takes 512-bit registers holding two blocks of a row (single_token_rows, below).
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

constexpr size_t kRows = 2;  // 2 rows x 4 tokens x 2 parities: 16 of the 32 registers

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

struct alignas(64) TokenPair {  // blocks 2i and 2i + 1 of the token, in the register's halves
  int8_t q[2 * kQ8Block];
  int32_t start[16];  // offset_share of each block
  float d[16];        // each block's scale, in its 8 lanes
};

inline __m512 pair_step(__m512 acc, const BlockQ8* w, const TokenPair& x) {
  const __m512i wq = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[0].q))),
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[1].q)), 1);
  const __m512i p = _mm512_dpbusd_epi32(_mm512_load_si512(x.start), _mm512_xor_si512(wq, _mm512_set1_epi8(char(0x80))),
                                        _mm512_load_si512(x.q));
  const __m128 dw = _mm_cvtph_ps(_mm_insert_epi16(_mm_cvtsi32_si128(w[0].d), w[1].d, 1));
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512 d = _mm512_mul_ps(_mm512_permutexvar_ps(halves, _mm512_castps128_ps512(dw)), _mm512_load_ps(x.d));
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

}  // namespace

void matmul_q8_avx512vnni(const MatmulQ8Args& a, size_t o0, size_t o1) {
  if (a.n == 1) return single_token_rows(a, o0, o1);
  matmul_q8_rows(a, o0, o1);
}

}  // namespace q3p
