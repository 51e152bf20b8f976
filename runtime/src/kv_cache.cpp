#include "kv_cache.h"

#include <algorithm>

namespace q3p {

KVCache::KVCache(const KVGeometry* g, uint64_t owner) : g_(g), owner_(owner) {
  rings_.resize(static_cast<size_t>(g->layers), 0);
  for (int64_t l = 0; l < g->layers; ++l)
    if (g->sliding[static_cast<size_t>(l)]) rings_[static_cast<size_t>(l)] = std::min(g->window, g->max_context);
  buffers_.resize(static_cast<size_t>(g->world_size) * static_cast<size_t>(g->layers));
}

void KVCache::reserve(int64_t end) {
  for (int r = 0; r < g_->world_size; ++r) {
    for (int64_t l = 0; l < g_->layers; ++l) {
      Buffer& b = buf(r, l);
      int64_t want;
      if (rings_[static_cast<size_t>(l)]) {
        want = rings_[static_cast<size_t>(l)];  // the whole ring at once: slots wrap
      } else {
        if (end <= b.slots) continue;
        want = std::min(g_->max_context, std::max(end, 2 * b.slots));  // geometric growth
      }
      if (want <= b.slots) continue;
      b.k.resize(static_cast<size_t>(want * g_->row));
      b.v.resize(static_cast<size_t>(want * g_->row));
      b.slots = want;
    }
  }
}

}  // namespace q3p
