// q8, q4 and q6 blocks (formats/SPEC.md, "Quantized weights") and the products on them.
//
// A weight row of `in` values is ceil(in / 32) blocks {f16 d; int8 q[32]}, value = q * d, the
// last block padded with zeros. Activations are quantized the same way once per matmul (scale in
// f32: they are never stored), so a product is integer dot products of 32 pairs, each scaled once.
//
// Every kernel computes y = x W^T in this order, so that all instruction sets give the same bits
// (the integer sums are exact; only the f32 steps round):
//   acc[16] = 0
//   for each block b in order, with d = f32(w.d) * x.d (rounded once) and, for j < 8,
//     p_j = sum of the 4 products of values [4j, 4j + 4) (an exact integer):
//       acc[(b % 2) * 8 + j] = fma(d, float(p_j), acc[(b % 2) * 8 + j])
//   y = acc reduced pairwise: acc[k] += acc[k + w] for w = 8, 4, 2, 1, then acc[0].
// (The SIMD products keep one 8-lane accumulator per block parity: kernels_q8_tiles.inc.)
#pragma once
#include <cstddef>
#include <cstdint>

#include "common.h"
#include "kernels.h"

namespace q3p {

constexpr size_t kQ8Block = 32;

struct BlockQ8 {  // a stored block of weights: 34 bytes, as llama.cpp's block_q8_0
  uint16_t d;     // f16 scale
  int8_t q[kQ8Block];
};
static_assert(sizeof(BlockQ8) == 34, "q8 blocks are 34 bytes in the file");

struct BlockQ8Act {  // a block of activations, quantized for one matmul
  float d;
  int8_t q[kQ8Block];
};

inline size_t q8_blocks(size_t n) { return (n + kQ8Block - 1) / kQ8Block; }

float f16_to_f32(uint16_t h);
// f32 to the nearest f16 (ties to even), infinities beyond f16's range.
uint16_t f32_to_f16(float f);

// Quantizes n values into q8_blocks(n) blocks (the last one padded with zeros) as the converter
// quantizes weights: d = max|x| / 127, q = nearest integer (ties to even) of x * (1 / d).
void quantize_row_q8(const float* x, size_t n, BlockQ8Act* out);
// Quantizes n weights into q8_blocks(n) stored blocks by the converter's rule (formats/SPEC.md):
// d = f16(max|x| / 127), q = nearest integer (ties to even) of x * (1 / f32(d)), clamped to
// [-127, 127]. Returns false, writing nothing more, when a block's scale exceeds f16's range.
bool quantize_row_q8_weights(const float* x, size_t n, BlockQ8* out);
// The first n values of q8 blocks, as f32 (q * d, exact).
void dequantize_row_q8(const BlockQ8* blocks, float* dst, size_t n);

// y[t * out + o] = x_t . W_o for t < n, o in the kernel's row range; x holds n rows of
// q8_blocks(in) activation blocks, W out rows of as many weight blocks.
struct MatmulQ8Args {
  const BlockQ8Act* x = nullptr;
  size_t n = 0, in = 0, out = 0;
  const BlockQ8* w = nullptr;
  float* y = nullptr;
};

void matmul_q8_generic(const MatmulQ8Args& a, size_t o0, size_t o1);
#if defined(__x86_64__)
void matmul_q8_avx2(const MatmulQ8Args& a, size_t o0, size_t o1);
void matmul_q8_avx512vnni(const MatmulQ8Args& a, size_t o0, size_t o1);
#endif

// The q8 product of an instruction set of kernels.h: AVX-512 uses VNNI where the CPU has it
// (else the AVX2 product).
Kernels::MatmulQ8 matmul_q8_for(Isa isa);

// ---- q4: llama.cpp's block_q4_K ----
//
// A weight row of `in` values is ceil(in / 256) blocks of 8 sub-blocks of 32 values, the last
// block padded with zeros. Value i of sub-block j is D * sc_j * q_i - M * m_j, with D, M the
// block's f16 scales, sc_j, m_j its 6-bit sub-block scales and minimums, q_i 4 bits unsigned.
// Activations are quantized per block of 256 (BlockQ8K: one scale, as llama.cpp's q8_K, with each
// sub-block's sum of values), so that a block's products add up in integers:
//   x . w = (D x.d) sum_j sc_j (sum_i q_i x.q_i) - (M x.d) sum_j m_j x.sum_j.
// Every kernel computes it in this order (the integer sums are exact, and below 2^24 so that their
// conversions to f32 are too; only the steps below round):
//   acc[8] = 0, mins[8] = 0
//   for each block in order, with s = D * x.d and m = M * x.d (each rounded once), for k < 8:
//       I_k = sum over the sub-blocks j of parity e of sc_j * (the 8 products q_i x.q_i of values
//             [16h + 8p, 16h + 8p + 8) of sub-block j), for k = 4h + 2e + p (h, e, p < 2)
//       acc[k] = fma(s, float(I_k), acc[k])
//     and for j < 8: mins[j] = fma(m, float(m_j * x.sum_j), mins[j])
//   y = A - B, A and B = acc and mins reduced pairwise: v[k] += v[k + w] for w = 4, 2, 1, then v[0].
// (I_k's grouping is what the cheapest sequence gives: vpdpbusd's sums of 4 products, two
// sub-blocks' packed to 16 bits, then one vpdpwssd with their scales; kernels_q4_avx512.cpp.)
//
// Why activations in blocks of 256 and not of 32 as for q8: a scale per 32 costs a conversion and
// an FMA per 32 products, which made the q4 product as slow as q8's on half the bytes (measured,
// kernels_q4_tiles.inc); the coarser activation steps add an error far below the 4-bit weights'.

constexpr size_t kQ4Block = 256, kQ4Sub = 32;

struct BlockQ4 {        // a stored block of weights: 144 bytes, as llama.cpp's block_q4_K
  uint16_t d, dmin;     // f16: the scale of the sub-block scales, and of the sub-block minimums
  uint8_t scales[12];   // 8 scales and 8 minimums of 6 bits (q4_scales_generic unpacks them)
  uint8_t qs[kQ4Block / 2];  // byte 32c + l: value l of sub-block 2c (low nibble) and of 2c + 1 (high)
};
static_assert(sizeof(BlockQ4) == 144, "q4 blocks are 144 bytes in the file");

struct BlockQ8K {    // 256 activations, quantized for one matmul on q4 weights
  float d;            // max |x| / 127
  int32_t sum[8];     // each sub-block's sum of q
  int8_t q[kQ4Block];
};

inline size_t q4_blocks(size_t n) { return (n + kQ4Block - 1) / kQ4Block; }

// Quantizes n values into q4_blocks(n) activation blocks (zeros beyond n), each block of 256 as
// quantize_row_q8 quantizes a block of 32.
void quantize_row_q8k(const float* x, size_t n, BlockQ8K* out);
// The first n values of q4 blocks, as f32: (D * sc) * q - M * m, rounded once.
void dequantize_row_q4(const BlockQ4* blocks, float* dst, size_t n);
// Quantizes `rows` rows of n weights into q4_blocks(n) stored blocks each, by the converter's rule
// (formats/SPEC.md: the same bytes as formats.dtypes.quantize_q4). Returns false, leaving `out`
// unfinished, when a block's scale or minimum exceeds f16's range.
bool quantize_rows_q4_weights(const float* x, size_t rows, size_t n, BlockQ4* out);

struct MatmulQ4Args {
  const BlockQ8K* x = nullptr;
  size_t n = 0, in = 0, out = 0;
  const BlockQ4* w = nullptr;
  float* y = nullptr;
};

void matmul_q4_generic(const MatmulQ4Args& a, size_t o0, size_t o1);
#if defined(__x86_64__)
void matmul_q4_avx2(const MatmulQ4Args& a, size_t o0, size_t o1);
void matmul_q4_avx512vnni(const MatmulQ4Args& a, size_t o0, size_t o1);
#endif

// The q4 product of an instruction set, chosen as matmul_q8_for chooses.
Kernels::MatmulQ4 matmul_q4_for(Isa isa);

// ---- q6: llama.cpp's block_q6_K ----
//
// A weight row of `in` values is ceil(in / 256) blocks of 16 sub-blocks of 16 values, the last
// block padded with zeros. Value i of sub-block j is (d * sc_j) * (q_i - 32), with d the block's
// f16 scale, sc_j its signed 8-bit sub-block scales, q_i 6 bits unsigned. Activations are
// quantized per block of 256 as for q4, with each 16 values' sum (BlockQ8K16), so that a block's
// products add up in integers:
//   x . w = (d x.d) (sum_j sc_j (sum_i q_i x.q_i) - 32 sum_j sc_j x.sum_j).
// Every kernel computes it in this order (the integer sums are exact, and below 2^24 so that their
// conversions to f32 are too; only the steps below round):
//   acc[16] = 0, mins[8] = 0
//   for each block in order, with s = d * x.d (rounded once):
//     for k = 4i + m (i, m < 4), e = m / 2, p = m % 2:
//       I_k = sum over h < 2 of sc_j * (the 8 products q_i x.q_i of values
//             [128h + 64e + 16i + 8p, ... + 8)), j = 8h + 4e + i (that range's sub-block)
//       acc[k] = fma(s, float(I_k), acc[k])
//     for k < 8: mins[k] = fma(s, float(32 * (sc_2k x.sum_2k + sc_2k+1 x.sum_2k+1)), mins[k])
//   y = A - B, A and B = acc and mins reduced pairwise: v[k] += v[k + w] for w = 8 (acc only), 4,
//   2, 1, then v[0].
// (I_k's grouping is what vpdpbusd's sums of 4 products give, packed to 16 bits two quarters of a
// block at a time, then one vpdpwssd with their scales: kernels_q6_tiles.inc.)

constexpr size_t kQ6Sub = 16;

struct BlockQ6 {              // a stored block of weights: 210 bytes, as llama.cpp's block_q6_K
  uint8_t ql[kQ4Block / 2];   // low 4 bits: byte 64h + 32c' + l holds value 128h + 32c' + l (low
                              // nibble) and value 128h + 32c' + 64 + l (high nibble), c' < 2
  uint8_t qh[kQ4Block / 4];   // high 2 bits: bits 2c of byte 32h + l belong to value 128h + 32c + l
  int8_t scales[kQ4Block / kQ6Sub];
  uint16_t d;                 // f16
};
static_assert(sizeof(BlockQ6) == 210, "q6 blocks are 210 bytes in the file");

struct BlockQ8K16 {  // 256 activations, quantized for one matmul on q6 weights
  float d;            // max |x| / 127
  int16_t sum[16];    // each 16 values' sum of q
  int8_t q[kQ4Block];
};

// Quantizes n values into q4_blocks(n) activation blocks (zeros beyond n) as quantize_row_q8k does.
void quantize_row_q8k16(const float* x, size_t n, BlockQ8K16* out);
// The first n values of q6 blocks, as f32: (d * sc) * (q - 32), rounded once.
void dequantize_row_q6(const BlockQ6* blocks, float* dst, size_t n);
// Quantizes `rows` rows of n weights into q4_blocks(n) stored q6 blocks each, by the converter's
// rule (formats/SPEC.md: the same bytes as formats.dtypes.quantize_q6). Returns false, leaving
// `out` unfinished, when a block's scale exceeds f16's range.
bool quantize_rows_q6_weights(const float* x, size_t rows, size_t n, BlockQ6* out);

struct MatmulQ6Args {
  const BlockQ8K16* x = nullptr;
  size_t n = 0, in = 0, out = 0;
  const BlockQ6* w = nullptr;
  float* y = nullptr;
};

void matmul_q6_generic(const MatmulQ6Args& a, size_t o0, size_t o1);
#if defined(__x86_64__)
void matmul_q6_avx2(const MatmulQ6Args& a, size_t o0, size_t o1);
void matmul_q6_avx512vnni(const MatmulQ6Args& a, size_t o0, size_t o1);
#endif

// The q6 product of an instruction set, chosen as matmul_q8_for chooses.
Kernels::MatmulQ6 matmul_q6_for(Isa isa);

}  // namespace q3p
