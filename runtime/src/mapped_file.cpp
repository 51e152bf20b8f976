#include "mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common.h"
#include "crc32c.h"
#include "mapping_guard.h"

namespace q3p {

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FormatError(path + ": cannot open: " + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    throw FormatError(path + ": cannot stat: " + std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FormatError(path + ": not a regular file");
  }
  if (st.st_size < static_cast<off_t>(kPrefixSize)) {
    ::close(fd);
    throw FormatError(path + ": truncated: " + std::to_string(st.st_size) +
                      " bytes, shorter than the 64-byte prefix");
  }
  size_ = static_cast<uint64_t>(st.st_size);
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
  int e = errno;
  ::close(fd);
  if (p == MAP_FAILED) {
    size_ = 0;
    throw FormatError(path + ": cannot map: " + std::strerror(e));
  }
  data_ = static_cast<const uint8_t*>(p);
  // Where the file is read from disk through this mapping, the kernel's fault readahead then
  // reads it in 2 MB folios, which it maps with one TLB entry each (after the page cache was
  // dropped, 98% of a 0.6B rank file was mapped so against 73% without the advice; README,
  // "Performance"). Advice only: kernels without transparent huge pages refuse or ignore it.
#ifdef MADV_HUGEPAGE
  ::madvise(p, size_, MADV_HUGEPAGE);
#endif
  guard_slot_ = guard_mapping(data_, size_);
}

bool MappedFile::damaged() const { return mapping_damaged(guard_slot_); }

MappedFile::MappedFile(MappedFile&& o) noexcept
    : path_(std::move(o.path_)), data_(o.data_), size_(o.size_), guard_slot_(o.guard_slot_) {
  o.data_ = nullptr;
  o.size_ = 0;
  o.guard_slot_ = -1;
}

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    unmap();
    path_ = std::move(o.path_);
    data_ = o.data_;
    size_ = o.size_;
    guard_slot_ = o.guard_slot_;
    o.data_ = nullptr;
    o.size_ = 0;
    o.guard_slot_ = -1;
  }
  return *this;
}

MappedFile::~MappedFile() { unmap(); }

void MappedFile::unmap() {
  unguard_mapping(guard_slot_);  // before the range can be mapped again by someone else
  guard_slot_ = -1;
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
  data_ = nullptr;
  size_ = 0;
}

namespace {
template <typename T>
T read_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // the format is little-endian, as is every supported host
  return v;
}

std::string hex(const std::array<uint8_t, 16>& id) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (uint8_t b : id) {
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}
}  // namespace

RankPrefix check_prefix(const MappedFile& file, const ExpectedPrefix& want) {
  const std::string& path = file.path();
  if (!file.mapped()) throw FormatError(path + ": not mapped");
  const uint8_t* p = file.data();
  const uint64_t real = file.size();
  if (real < kPrefixSize) throw FormatError(path + ": truncated: shorter than the 64-byte prefix");
  if (std::memcmp(p, "Q3PACK\r\n", 8) != 0) throw FormatError(path + ": bad magic, not a qwen3pack rank file");
  RankPrefix h;
  h.major = read_le<uint16_t>(p + 8);
  h.minor = read_le<uint16_t>(p + 10);
  h.rank = read_le<uint32_t>(p + 12);
  h.world_size = read_le<uint32_t>(p + 16);
  h.header_crc32c = read_le<uint32_t>(p + 20);
  h.header_length = read_le<uint64_t>(p + 24);
  h.data_offset = read_le<uint64_t>(p + 32);
  h.file_size = read_le<uint64_t>(p + 40);
  std::memcpy(h.conversion_id.data(), p + 48, 16);

  if (h.major != kMajorVersion)
    throw FormatError(path + ": format major version " + std::to_string(h.major) +
                      ", this runtime reads major version " + std::to_string(kMajorVersion));
  if (h.world_size == 0 || h.rank >= h.world_size)
    throw FormatError(path + ": rank " + std::to_string(h.rank) + " of world size " +
                      std::to_string(h.world_size) + " is impossible");
  if (h.rank != want.rank || h.world_size != want.world_size)
    throw FormatError(path + ": holds rank " + std::to_string(h.rank) + " of " +
                      std::to_string(h.world_size) + ", expected rank " + std::to_string(want.rank) +
                      " of " + std::to_string(want.world_size));
  if (h.conversion_id != want.conversion_id)
    throw FormatError(path + ": conversion id " + hex(h.conversion_id) +
                      " differs from the manifest's " + hex(want.conversion_id) +
                      " (file from another conversion)");
  if (h.file_size != real)
    throw FormatError(path + ": prefix says " + std::to_string(h.file_size) +
                      " bytes but the file has " + std::to_string(real) + " (truncated or extended)");
  if (h.file_size != want.file_size)
    throw FormatError(path + ": file size " + std::to_string(h.file_size) +
                      " differs from the expected " + std::to_string(want.file_size));
  if (h.data_offset != want.data_offset)
    throw FormatError(path + ": data offset " + std::to_string(h.data_offset) +
                      " differs from the expected " + std::to_string(want.data_offset));
  uint64_t header_end;
  if (!checked_add(kPrefixSize, h.header_length, &header_end) || header_end > h.data_offset)
    throw FormatError(path + ": header length " + std::to_string(h.header_length) +
                      " runs past the data offset " + std::to_string(h.data_offset));
  if (h.data_offset > h.file_size)
    throw FormatError(path + ": data offset " + std::to_string(h.data_offset) + " past the file size " +
                      std::to_string(h.file_size));
  if (h.data_offset % 4096 != 0 || h.file_size % 4096 != 0)
    throw FormatError(path + ": data offset and file size must be multiples of 4096");
  uint32_t crc = crc32c(0, p + kPrefixSize, static_cast<size_t>(h.header_length));
  if (crc != h.header_crc32c) throw FormatError(path + ": header checksum mismatch");
  return h;
}

}  // namespace q3p
