#include "comm.h"

#include <cstring>

namespace q3p {

SharedMemoryCommunicator::SharedMemoryCommunicator(int world_size)
    : world_(world_size), barrier_(world_size), slots_(static_cast<size_t>(world_size), nullptr) {}

void SharedMemoryCommunicator::reserve(size_t max_elements) {
  if (reduced_.size() < max_elements) reduced_.resize(max_elements);
}

// Reduce-scatter then all-gather through one shared buffer: rank r sums its slice of every rank's
// data, in rank order, into `reduced_`; after a barrier every rank copies the whole of it.
// The next collective's first barrier keeps `reduced_` and the inputs alive until all have copied.
void SharedMemoryCommunicator::all_reduce_sum(int rank, float* data, size_t n) {
  if (world_ == 1) return;
  slots_[static_cast<size_t>(rank)] = data;
  barrier_.wait();
  const size_t W = static_cast<size_t>(world_);
  const size_t b = n * static_cast<size_t>(rank) / W, e = n * static_cast<size_t>(rank + 1) / W;
  float* out = reduced_.data();
  std::memcpy(out + b, slots_[0] + b, (e - b) * sizeof(float));
  for (size_t r = 1; r < W; ++r) {
    const float* src = slots_[r];
    for (size_t i = b; i < e; ++i) out[i] += src[i];
  }
  barrier_.wait();
  std::memcpy(data, out, n * sizeof(float));
}

void SharedMemoryCommunicator::gather(int rank, const float* send, size_t n, float* recv) {
  if (world_ == 1) {
    if (recv != send) std::memcpy(recv, send, n * sizeof(float));
    return;
  }
  slots_[static_cast<size_t>(rank)] = send;
  barrier_.wait();
  if (rank == 0)
    for (size_t r = 0; r < static_cast<size_t>(world_); ++r)
      std::memcpy(recv + r * n, slots_[r], n * sizeof(float));
  barrier_.wait();  // senders keep their buffers until rank 0 has copied
}

}  // namespace q3p
