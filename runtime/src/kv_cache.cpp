#include "kv_cache.h"

#include <algorithm>

namespace q3p {

KVCache::KVCache(const KVGeometry* g, uint64_t owner) : g_(g), owner_(owner) {
  rings_.resize(static_cast<size_t>(g->layers), 0);
  for (int64_t l = 0; l < g->layers; ++l)
    if (g->sliding[static_cast<size_t>(l)]) rings_[static_cast<size_t>(l)] = std::min(g->window, g->max_context);
  buffers_.resize(static_cast<size_t>(g->world_size) * static_cast<size_t>(g->layers) * static_cast<size_t>(g->heads));
}

void KVCache::reserve(int64_t end) {
  for (int r = 0; r < g_->world_size; ++r) {
    for (int64_t l = 0; l < g_->layers; ++l) {
      for (int64_t h = 0; h < g_->heads; ++h) {
        Buffer& b = buf(r, l, h);
        int64_t want;
        if (rings_[static_cast<size_t>(l)]) {
          want = rings_[static_cast<size_t>(l)];  // the whole ring at once: slots wrap
        } else {
          if (end <= b.slots) continue;
          want = std::min(g_->max_context, std::max(end, 2 * b.slots));  // geometric growth
        }
        if (want <= b.slots) continue;
        b.k.resize(static_cast<size_t>(want) * row_bytes());
        b.v.resize(static_cast<size_t>(want) * row_bytes());
        b.slots = want;
      }
    }
  }
}

size_t KVCache::bytes() const {
  size_t total = 0;
  for (const Buffer& b : buffers_) total += b.k.size() + b.v.size();
  return total;
}

}  // namespace q3p
