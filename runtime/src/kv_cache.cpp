#include "kv_cache.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <new>

namespace q3p {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
}

// A region of 2 MB or more starts on a 2 MB boundary and asks for 2 MB pages. Decode reads every
// key and value of a sequence each step; in 4 KB pages that was one TLB miss a page, and the old
// cache (a buffer per head, grown by doubling) read at 13.4-15.0 GB/s where 2 MB pages give
// 16.6-19.3. Measured against it (0.6B shapes, f32 cache, CPU time, paired fresh processes,
// medians of 8-10 rounds): decode from position 1000 1.14x (q4, one thread), 1.11x (q4, two;
// bf16, one); over 128 tokens after a 16-token prompt 1.01x, 1.07x, 1.01x. A 2 MB page costs more
// at its first touch on a VM whose host takes back free memory (30 ms for a 0.6B block of 14 MB
// against 8 ms in 4 KB pages, 1.5 ms once the host has backed it): hence the pool.
PageRegion::PageRegion(size_t bytes) : bytes_(bytes) {
  if (bytes == 0) return;
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t mapped = (bytes + page - 1) / page * page;
  const bool huge = bytes >= kHugePage;
  const size_t slack = huge ? kHugePage : 0;  // room to start on a 2 MB boundary
  void* p = ::mmap(nullptr, mapped + slack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = reinterpret_cast<uintptr_t>(p);
  const uintptr_t aligned = huge ? (start + kHugePage - 1) & ~(kHugePage - 1) : start;
  // The slack is unmapped, so that a block is one mapping of the process's 65530 (vm.max_map_count;
  // a 40960-token sequence of Qwen3-0.6B is 640 blocks).
  if (aligned > start) ::munmap(p, aligned - start);
  if (start + slack > aligned) ::munmap(reinterpret_cast<void*>(aligned + mapped), start + slack - aligned);
  data_ = reinterpret_cast<uint8_t*>(aligned);
  mapped_ = mapped;
#ifdef MADV_HUGEPAGE
  if (huge) ::madvise(data_, mapped, MADV_HUGEPAGE);  // advice only: without transparent huge pages, 4 KB pages
#endif
}

PageRegion::~PageRegion() {
  if (data_) ::munmap(data_, mapped_);
}

PageRegion KVBlockPool::take(size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = free_.size(); i-- > 0;) {
      if (free_[i].bytes() != bytes) continue;
      PageRegion block = std::move(free_[i]);
      free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
      return block;
    }
  }
  return PageRegion(bytes);
}

void KVBlockPool::give(PageRegion&& block) noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_ || !block.bytes()) return;
  try {
    free_.push_back(std::move(block));
  } catch (const std::bad_alloc&) {  // no room to keep it: the block is freed
  }
}

void KVBlockPool::close() {
  std::lock_guard<std::mutex> lock(mu_);
  closed_ = true;
  free_.clear();
}

KVCache::KVCache(const KVGeometry* g, KVBlockPool* pool, uint64_t owner) : g_(g), pool_(pool), owner_(owner) {
  rings_.resize(static_cast<size_t>(g->layers), 0);
  index_in_kind_.resize(static_cast<size_t>(g->layers));
  for (int64_t l = 0; l < g->layers; ++l) {
    const size_t i = static_cast<size_t>(l);
    if (g->sliding[i]) {
      rings_[i] = ring_slots();
      index_in_kind_[i] = sliding_layers_++;
    } else {
      index_in_kind_[i] = full_layers_++;
    }
  }
}

KVCache::KVCache(const KVCache& o)
    : g_(o.g_),
      pool_(o.pool_),
      owner_(o.owner_),
      position_(o.position_),
      rings_(o.rings_),
      index_in_kind_(o.index_in_kind_),
      full_layers_(o.full_layers_),
      sliding_layers_(o.sliding_layers_) {
  blocks_.reserve(o.blocks_.size());
  for (const PageRegion& block : o.blocks_) {
    blocks_.push_back(pool_->take(block.bytes()));
    std::memcpy(blocks_.back().data(), block.data(), block.bytes());
  }
  rings_region_ = pool_->take(o.rings_region_.bytes());
  if (o.rings_region_.bytes()) std::memcpy(rings_region_.data(), o.rings_region_.data(), o.rings_region_.bytes());
}

void KVCache::reserve(int64_t end) {
  // The keys and values of one slot of a layer: every rank, every KV head.
  const size_t slot_bytes = 2 * static_cast<size_t>(g_->world_size) * static_cast<size_t>(g_->heads) * row_bytes();
  if (sliding_layers_ && !rings_region_.bytes())
    rings_region_ = pool_->take(sliding_layers_ * static_cast<size_t>(ring_slots()) * slot_bytes);
  if (!full_layers_) return;
  const size_t blocks = static_cast<size_t>((std::min(end, g_->max_context) + kKVBlock - 1) / kKVBlock);
  while (blocks_.size() < blocks)
    blocks_.push_back(pool_->take(full_layers_ * static_cast<size_t>(block_slots(blocks_.size())) * slot_bytes));
}

KVCache::~KVCache() {
  for (PageRegion& block : blocks_) pool_->give(std::move(block));
  pool_->give(std::move(rings_region_));
}

size_t KVCache::bytes() const {
  size_t total = rings_region_.bytes();
  for (const PageRegion& block : blocks_) total += block.bytes();
  return total;
}

}  // namespace q3p
