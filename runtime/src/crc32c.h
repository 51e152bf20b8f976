// CRC32C (Castagnoli), the checksum of the qwen3pack format: see formats/SPEC.md.
#pragma once
#include <cstddef>
#include <cstdint>

namespace q3p {

// Extends `crc` (the value returned for the bytes before `data`; 0 to start) over `size` bytes.
// crc32c(crc32c(0, a), b) == crc32c(0, a + b), so large tensors can be checked in chunks.
uint32_t crc32c(uint32_t crc, const void* data, size_t size);

}  // namespace q3p
