// Finding NaN and infinities among stored floats, which the converter refuses (a NaN weight
// converts, loads and computes, into logits that are all NaN).
#pragma once
#include <cstddef>
#include <cstdint>

namespace q3p {

// The index of the first of `n` values whose exponent bits (`exponent_mask`: 0x7F80 for bf16,
// 0x7C00 for f16, 0x7F800000 for f32) are all ones, or -1 when every value is finite.
int64_t first_nonfinite(const uint16_t* bits, size_t n, uint16_t exponent_mask);
int64_t first_nonfinite(const uint32_t* bits, size_t n, uint32_t exponent_mask);

}  // namespace q3p
