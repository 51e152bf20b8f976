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
void attention_scores_generic(const float* q, size_t G, size_t D, const float* k, size_t ld, size_t nk, float scale,
                              float* scores, size_t lds);
void attention_values_generic(const float* p, size_t lds, size_t G, const float* v, size_t ld, size_t nk, size_t D,
                              float* out);
float fma_loop_generic(size_t steps, float seed);

#if defined(__x86_64__)
void matmul_avx2(const MatmulArgs& a, size_t o0, size_t o1);
void matmul_avx512(const MatmulArgs& a, size_t o0, size_t o1);
// matmul_avx512, but vdpbf16ps for activations rounded to bf16 (CPUs with AVX512_BF16).
void matmul_avx512bf16(const MatmulArgs& a, size_t o0, size_t o1);
void attention_scores_avx512(const float* q, size_t G, size_t D, const float* k, size_t ld, size_t nk, float scale,
                             float* scores, size_t lds);
void attention_values_avx512(const float* p, size_t lds, size_t G, const float* v, size_t ld, size_t nk, size_t D,
                             float* out);
float fma_loop_avx2(size_t steps, float seed);
float fma_loop_avx512(size_t steps, float seed);
float dpbf16_loop_avx512(size_t steps, float seed);
#endif

}  // namespace q3p
