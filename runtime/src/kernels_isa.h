// The kernels of each instruction set, behind the dispatch of kernels.cpp. The AVX2 and AVX-512
// files are compiled with their own target flags, so they use no inline function or template of
// a header with external linkage (only intrinsics, memcpy, their own code, and kernels_tiles.inc
// included inside their anonymous namespace): the linker could otherwise keep their copy,
// compiled for a wider ISA, for the whole program.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels.h"

namespace q3p {

void matmul_generic(const MatmulArgs& a, size_t o0, size_t o1);
void attention_tile_generic(const AttentionTile& a);
float fma_loop_generic(size_t steps, float seed);

#if defined(__x86_64__)
void matmul_avx2(const MatmulArgs& a, size_t o0, size_t o1);
void matmul_avx512(const MatmulArgs& a, size_t o0, size_t o1);
void attention_tile_avx2(const AttentionTile& a);
void attention_tile_avx512(const AttentionTile& a);
// matmul_avx512, but vdpbf16ps for activations rounded to bf16 (CPUs with AVX512_BF16).
void matmul_avx512bf16(const MatmulArgs& a, size_t o0, size_t o1);
// attention_tile_avx512, but vdpbf16ps for the products of a.bf16_products on a bf16 cache.
void attention_tile_avx512bf16(const AttentionTile& a);
// The online softmax step of head g of a tile whose scores are s (kernels_avx512.cpp): s becomes
// the weights exp(s - max), max and sum move on; returns the factor that rescales the head's
// earlier output.
float softmax_step_avx512(const AttentionTile& a, size_t g, float* s);
float fma_loop_avx2(size_t steps, float seed);
float fma_loop_avx512(size_t steps, float seed);
float dpbf16_loop_avx512(size_t steps, float seed);
#endif

}  // namespace q3p
