// The keys and values of one sequence, for every rank and layer. A full-attention layer keeps
// every position (growing on demand up to max_context); a sliding layer keeps a ring of
// min(window, max_context) slots: position p lives in slot p % ring. Each KV head has its own
// buffers, its positions consecutive: attention streams one head's keys and values in address
// order (rows of all the heads of a position put each head's rows a page apart, one TLB miss and
// one cold start of the prefetcher per position). Keys and values are stored as f32 or, to halve
// the memory, as bf16 (rounded to nearest even when written).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common.h"

namespace q3p {

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

class KVCache {
 public:
  KVCache(const KVGeometry* geometry, uint64_t owner);

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
  // The head_dim values (of dtype()) of KV head `head` at `slot`; the next slot's follow them.
  void* keys(int rank, int64_t layer, int64_t head, int64_t slot) {
    return buf(rank, layer, head).k.data() + static_cast<size_t>(slot) * row_bytes();
  }
  void* values(int rank, int64_t layer, int64_t head, int64_t slot) {
    return buf(rank, layer, head).v.data() + static_cast<size_t>(slot) * row_bytes();
  }
  DType dtype() const { return g_->dtype; }
  // The memory held for keys and values, in bytes.
  size_t bytes() const;

 private:
  struct Buffer {
    std::vector<uint8_t> k, v;
    int64_t slots = 0;
  };
  Buffer& buf(int rank, int64_t layer, int64_t head) {
    return buffers_[(static_cast<size_t>(rank) * static_cast<size_t>(g_->layers) + static_cast<size_t>(layer)) *
                        static_cast<size_t>(g_->heads) +
                    static_cast<size_t>(head)];
  }

  size_t row_bytes() const { return static_cast<size_t>(g_->head_dim) * dtype_size(g_->dtype); }

  const KVGeometry* g_;
  uint64_t owner_;
  int64_t position_ = 0;
  std::vector<int64_t> rings_;
  std::vector<Buffer> buffers_;  // [rank][layer][KV head]
};

}  // namespace q3p
