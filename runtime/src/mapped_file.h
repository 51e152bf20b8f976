// A rank file mapped read-only, and the check of its 64-byte prefix (formats/SPEC.md).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace q3p {

constexpr size_t kPrefixSize = 64;
constexpr uint16_t kMajorVersion = 1;

// The numbers of the 64-byte prefix.
struct RankPrefix {
  uint16_t major = 0, minor = 0;
  uint32_t rank = 0, world_size = 0, header_crc32c = 0;
  uint64_t header_length = 0, data_offset = 0, file_size = 0;
  std::array<uint8_t, 16> conversion_id{};
};

// Owns one read-only, shared mapping of a whole file. Move-only; unmaps on destruction or unmap().
class MappedFile {
 public:
  MappedFile() = default;
  // Maps `path` read-only; throws FormatError naming the file when it cannot.
  explicit MappedFile(const std::string& path);
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  void unmap();
  bool mapped() const { return data_ != nullptr; }
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // True once the file was truncated under the mapping and a read hit a lost page, which then
  // read as zeros (see mapping_guard.h).
  bool damaged() const;

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  int guard_slot_ = -1;
};

// What the caller (the manifest) says the file must be.
struct ExpectedPrefix {
  uint32_t rank = 0, world_size = 0;
  std::array<uint8_t, 16> conversion_id{};
  uint64_t file_size = 0, data_offset = 0;
};

// Parses and checks the prefix of a mapped rank file against its real size and `expected`
// (magic, major version, rank, world size, conversion id, sizes, header bounds and CRC).
// Throws FormatError with the file's path on any mismatch.
RankPrefix check_prefix(const MappedFile& file, const ExpectedPrefix& expected);

}  // namespace q3p
