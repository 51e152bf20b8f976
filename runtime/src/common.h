// Shared small definitions of the runtime: dtypes, errors, overflow-safe arithmetic.
#pragma once
#include <cstddef>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

namespace q3p {

// A vector whose storage starts on a 64-byte boundary, for the activations the matrix kernels
// load 64 bytes at a time: each load then reads one cache line instead of two. std::vector's
// storage is 16-byte aligned (its large buffers start 16 bytes into a page, the others anywhere),
// and 16 bytes off a line, decode at batch 2 and 4 ran 1.35x slower (0.6B shapes, one thread,
// interleaved processes, medians of 3: batch 4 23.7 against 32.0 tokens/s, batch 2 17.6 against
// 23.6; a product from cache at 4 tokens 50-60 against 82-88 GFLOP/s). Batch 1 and prefill
// showed no difference.
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <class T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// A rank file or its tensor table is malformed, hostile or does not match the model.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A request the engine cannot serve (bad token id, empty input, ...).
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A sequence would grow beyond the engine's max_context.
struct ContextLengthError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The model was loaded before this process forked: it belongs to the parent.
struct ForkedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The forward pass produced NaN or Inf logits.
struct NumericalError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The model was closed: its files are unmapped.
struct ClosedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Q8: blocks of 32 values along a row, each an f16 scale and 32 int8 values; Q4: blocks of 256
// values, 8 sub-blocks of 32 with 6-bit scales and minimums and 4-bit values; Q6: blocks of 256
// values, 16 sub-blocks of 16 with 8-bit scales and 6-bit values (quant.h).
enum class DType : uint8_t { F32 = 0, F16 = 1, BF16 = 2, Q8 = 3, Q4 = 4, Q6 = 5 };

// The element size of a plain dtype (not of Q8, Q4 or Q6: see row_bytes).
inline size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::Q8: return "q8";
    case DType::Q4: return "q4";
    default: return "q6";
  }
}
// Returns false for an unknown name.
inline bool parse_dtype(const std::string& s, DType* out) {
  if (s == "f32") *out = DType::F32;
  else if (s == "f16") *out = DType::F16;
  else if (s == "bf16") *out = DType::BF16;
  else if (s == "q8") *out = DType::Q8;
  else if (s == "q4") *out = DType::Q4;
  else if (s == "q6") *out = DType::Q6;
  else return false;
  return true;
}

// Bytes of one stored row of `cols` values: Q8 rows are whole blocks of 32 (34 bytes each), Q4
// and Q6 rows whole blocks of 256 (144 and 210 bytes each), the last one padded with zeros.
// cols <= 2^32, as the loader checks, so nothing overflows.
inline uint64_t row_bytes(DType t, uint64_t cols) {
  if (t == DType::Q8) return (cols + 31) / 32 * 34;
  if (t == DType::Q4) return (cols + 255) / 256 * 144;
  if (t == DType::Q6) return (cols + 255) / 256 * 210;
  return cols * dtype_size(t);
}

// Overflow-checked unsigned arithmetic: false when the result does not fit.
inline bool checked_add(uint64_t a, uint64_t b, uint64_t* out) {
  return !__builtin_add_overflow(a, b, out);
}
inline bool checked_mul(uint64_t a, uint64_t b, uint64_t* out) {
  return !__builtin_mul_overflow(a, b, out);
}

}  // namespace q3p
