// The keys and values of one sequence, for every rank and layer. Each KV head has its own rows,
// positions consecutive: attention streams one head's keys and values in address order (rows of
// all the heads of a position put each head's rows a page apart, one TLB miss and one cold start
// of the prefetcher per position). Keys and values are stored as f32 or, to halve the memory, as
// bf16 (rounded to nearest even when written).
//
// Full-attention layers keep every position, in blocks of kKVBlock positions: one allocation per
// block holds those positions of every rank, full layer and KV head, so a sequence grows a block
// at a time and nothing is ever copied. A block of 2 MB or more is mapped in 2 MB pages (one TLB
// entry where 4 KB pages take 512); see kv_cache.cpp for what that measured. A sliding layer keeps
// a ring of min(window, max_context) slots, allocated whole (position p lives in slot p % ring).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "common.h"

namespace q3p {

// Positions per block of the full layers: the attention tile (kernels.h), so that a tile, which
// ends at a multiple of it, never spans two blocks (engine.cpp checks the two agree).
constexpr int64_t kKVBlock = 64;

struct KVGeometry {
  int world_size = 1;
  int64_t layers = 0;
  std::vector<bool> sliding;  // per layer
  int64_t window = 0;         // sliding window (0 when none)
  int64_t max_context = 0;
  int64_t heads = 0;          // KV heads per rank
  int64_t head_dim = 0;
  DType dtype = DType::F32;   // of the stored keys and values: F32 or BF16
};

// Zeroed anonymous memory (none for 0 bytes), mapped in 2 MB pages where it spans one (see kv_cache.cpp).
class PageRegion {
 public:
  explicit PageRegion(size_t bytes);
  ~PageRegion();
  PageRegion(PageRegion&& o) noexcept { swap(o); }
  PageRegion& operator=(PageRegion&& o) noexcept {
    swap(o);
    return *this;
  }
  PageRegion(const PageRegion&) = delete;
  PageRegion& operator=(const PageRegion&) = delete;

  uint8_t* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  void swap(PageRegion& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(bytes_, o.bytes_);
    std::swap(mapped_, o.mapped_);
  }

  uint8_t* data_ = nullptr;
  size_t bytes_ = 0;
  size_t mapped_ = 0;  // bytes_ rounded up to whole pages
};

// The blocks of dropped caches, kept for a model's next caches. A block's first use costs its
// page faults (see kv_cache.cpp), which a program calling generate() in a loop, or a server,
// would otherwise pay for every sequence. The engine empties it when the model is closed.
class KVBlockPool {
 public:
  // A kept block of `bytes` (its old contents: a cache reads only the slots it wrote), or a new one.
  PageRegion take(size_t bytes);
  void give(PageRegion&& block) noexcept;  // after close() (or without memory to keep it), frees it
  void close();

 private:
  std::mutex mu_;
  std::vector<PageRegion> free_;
  bool closed_ = false;
};

class KVCache {
 public:
  KVCache(const KVGeometry* geometry, KVBlockPool* pool, uint64_t owner);
  KVCache(const KVCache& other);  // a copy of every allocated block
  KVCache& operator=(const KVCache&) = delete;
  ~KVCache();

  uint64_t owner() const { return owner_; }
  int64_t position() const { return position_; }
  void set_position(int64_t p) { position_ = p; }
  // Empties the sequence (keeps the memory).
  void reset() { position_ = 0; }

  // Makes room for positions [0, end) (end <= max_context). Allocates; call outside compute.
  void reserve(int64_t end);
  // 0 for a full layer, else the ring size.
  int64_t ring(int64_t layer) const { return rings_[static_cast<size_t>(layer)]; }
  int64_t slot(int64_t layer, int64_t pos) const {
    const int64_t r = ring(layer);
    return r ? pos % r : pos;
  }
  // The head_dim values (of dtype()) of KV head `head` at `slot`; the next slot's follow them
  // up to the end of the ring, or of the block (a multiple of kKVBlock) in a full layer.
  void* keys(int rank, int64_t layer, int64_t head, int64_t slot) { return row(rank, layer, head, slot, false); }
  void* values(int rank, int64_t layer, int64_t head, int64_t slot) { return row(rank, layer, head, slot, true); }
  DType dtype() const { return g_->dtype; }
  // The memory held for keys and values, in bytes.
  size_t bytes() const;

 private:
  size_t row_bytes() const { return static_cast<size_t>(g_->head_dim) * dtype_size(g_->dtype); }
  // Slots in a sliding layer's ring.
  int64_t ring_slots() const { return std::min(g_->window, g_->max_context); }
  // Slots in full-layer block b: kKVBlock, fewer in a last block cut at max_context.
  int64_t block_slots(size_t b) const {
    return std::min<int64_t>(kKVBlock, g_->max_context - static_cast<int64_t>(b) * kKVBlock);
  }
  // A block (or the rings) holds, for each rank, layer of its kind and KV head in turn, `slots`
  // rows of keys and then `slots` rows of values.
  uint8_t* row(int rank, int64_t layer, int64_t head, int64_t slot, bool value) {
    const size_t l = static_cast<size_t>(layer);
    const bool sliding = rings_[l] != 0;
    const size_t kind_layers = sliding ? sliding_layers_ : full_layers_;
    const size_t b = sliding ? 0 : static_cast<size_t>(slot / kKVBlock);
    const int64_t slots = sliding ? rings_[l] : block_slots(b);
    const size_t head_index = (static_cast<size_t>(rank) * kind_layers + index_in_kind_[l]) * static_cast<size_t>(g_->heads) +
                              static_cast<size_t>(head);
    const size_t r = (2 * head_index + value) * static_cast<size_t>(slots) + static_cast<size_t>(sliding ? slot : slot % kKVBlock);
    return (sliding ? rings_region_ : blocks_[b]).data() + r * row_bytes();
  }

  const KVGeometry* g_;
  KVBlockPool* pool_;
  uint64_t owner_;
  int64_t position_ = 0;
  std::vector<int64_t> rings_;         // per layer: 0 for a full layer
  std::vector<size_t> index_in_kind_;  // per layer: its index among the full or the sliding layers
  size_t full_layers_ = 0, sliding_layers_ = 0;
  std::vector<PageRegion> blocks_;     // of the full layers, positions [kKVBlock b, kKVBlock (b + 1))
  PageRegion rings_region_{0};         // of the sliding layers
};

}  // namespace q3p
