#include "crc32c.h"

#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define Q3P_HAVE_SSE42_PATH 1
#endif

namespace q3p {
namespace {

constexpr uint32_t kPolyReflected = 0x82F63B78u;

struct SoftwareTable {
  uint32_t t[8][256];
  SoftwareTable() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ ((c & 1) ? kPolyReflected : 0);
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};

// Slicing-by-8: the portable path, for CPUs without the crc32 instruction.
uint32_t crc32c_software(uint32_t state, const uint8_t* p, size_t n) {
  static const SoftwareTable table;
  const auto& t = table.t;
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    word ^= state;
    state = t[7][word & 0xFF] ^ t[6][(word >> 8) & 0xFF] ^ t[5][(word >> 16) & 0xFF] ^
            t[4][(word >> 24) & 0xFF] ^ t[3][(word >> 32) & 0xFF] ^ t[2][(word >> 40) & 0xFF] ^
            t[1][(word >> 48) & 0xFF] ^ t[0][word >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) state = (state >> 8) ^ t[0][(state ^ *p++) & 0xFF];
  return state;
}

#ifdef Q3P_HAVE_SSE42_PATH
// The crc32 instruction takes 3 cycles and can start every cycle, so one running CRC uses a third
// of it. Long inputs are taken kLane bytes at a time in three lanes of one loop, CRCs started from
// 0 for the second and third, then joined: the CRC of A || B is that of A moved over len(B) zero
// bytes, xor that of B (CRC arithmetic is linear). Moving over kLane bytes is a lookup per byte
// of the CRC in ShiftOverLane's tables. 16 GB/s on a 1 GB buffer, against 8-9.5 with one lane; the
// converter's checksums of 1.19 GB took 0.07 s, against 0.125.
constexpr size_t kLane = 8192;

__attribute__((target("sse4.2"))) uint32_t crc32c_one_lane(uint32_t state, const uint8_t* p, size_t n) {
  uint64_t c = state;
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    c = _mm_crc32_u64(c, word);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}

// t[k][v]: the state `v << 8k` moved over kLane zero bytes; a state moves byte by byte (linearity).
struct ShiftOverLane {
  uint32_t t[4][256];
  ShiftOverLane() {
    static const uint8_t zeros[kLane] = {};
    uint32_t bit[32];
    for (int b = 0; b < 32; ++b) bit[b] = crc32c_one_lane(1u << b, zeros, kLane);
    for (int k = 0; k < 4; ++k)
      for (uint32_t v = 0; v < 256; ++v) {
        uint32_t moved = 0;
        for (int b = 0; b < 8; ++b)
          if (v >> b & 1) moved ^= bit[8 * k + b];
        t[k][v] = moved;
      }
  }
  uint32_t operator()(uint32_t state) const {
    return t[0][state & 0xFF] ^ t[1][state >> 8 & 0xFF] ^ t[2][state >> 16 & 0xFF] ^ t[3][state >> 24];
  }
};

__attribute__((target("sse4.2"))) uint32_t crc32c_hardware(uint32_t state, const uint8_t* p, size_t n) {
  static const ShiftOverLane shift;
  while (n >= 3 * kLane) {
    uint64_t a = state, b = 0, c = 0;
    for (size_t i = 0; i < kLane; i += 8) {
      uint64_t wa, wb, wc;
      std::memcpy(&wa, p + i, 8);
      std::memcpy(&wb, p + kLane + i, 8);
      std::memcpy(&wc, p + 2 * kLane + i, 8);
      a = _mm_crc32_u64(a, wa);
      b = _mm_crc32_u64(b, wb);
      c = _mm_crc32_u64(c, wc);
    }
    state = shift(shift(static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b)) ^ static_cast<uint32_t>(c);
    p += 3 * kLane;
    n -= 3 * kLane;
  }
  return crc32c_one_lane(state, p, n);
}

bool cpu_has_sse42() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2");
}
#endif

}  // namespace

uint32_t crc32c(uint32_t crc, const void* data, size_t size) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t state = ~crc;
#ifdef Q3P_HAVE_SSE42_PATH
  static const bool hardware = cpu_has_sse42();
  state = hardware ? crc32c_hardware(state, p, size) : crc32c_software(state, p, size);
#else
  state = crc32c_software(state, p, size);
#endif
  return ~state;
}

}  // namespace q3p
