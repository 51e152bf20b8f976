// The keys and values of one sequence, for every rank and layer. A full-attention layer keeps
// every position (growing on demand up to max_context); a sliding layer keeps a ring of
// min(window, max_context) slots: position p lives in slot p % ring.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace q3p {

struct KVGeometry {
  int world_size = 1;
  int64_t layers = 0;
  std::vector<bool> sliding;  // per layer
  int64_t window = 0;         // sliding window (0 when none)
  int64_t max_context = 0;
  int64_t row = 0;            // floats per position of one rank and layer: Nkv * head_dim
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
  float* keys(int rank, int64_t layer, int64_t slot) { return buf(rank, layer).k.data() + slot * g_->row; }
  float* values(int rank, int64_t layer, int64_t slot) { return buf(rank, layer).v.data() + slot * g_->row; }

 private:
  struct Buffer {
    std::vector<float> k, v;
    int64_t slots = 0;
  };
  Buffer& buf(int rank, int64_t layer) {
    return buffers_[static_cast<size_t>(rank) * static_cast<size_t>(g_->layers) + static_cast<size_t>(layer)];
  }

  const KVGeometry* g_;
  uint64_t owner_;
  int64_t position_ = 0;
  std::vector<int64_t> rings_;
  std::vector<Buffer> buffers_;  // [rank][layer]
};

}  // namespace q3p
