// Communication between the tensor-parallel ranks, behind a small interface: the model code
// only calls these collectives, so another backend (MPI, one process per rank) can replace
// the shared-memory one without touching it.
#pragma once
#include <cstddef>
#include <memory>
#include <vector>

#include "thread_pool.h"

namespace q3p {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int world_size() const = 0;
  // Before a forward pass, from one thread: the largest element count any collective will see.
  virtual void reserve(size_t max_elements) = 0;
  // data <- sum over ranks of data, summed in rank order 0, 1, ..., W-1 (every rank gets the
  // same bits). Called by every rank with the same n.
  virtual void all_reduce_sum(int rank, float* data, size_t n) = 0;
  // On rank 0: recv[r * n, (r + 1) * n) <- rank r's send, for every r (recv is ignored on the
  // other ranks). Called by every rank with the same n.
  virtual void gather(int rank, const float* send, size_t n, float* recv) = 0;
};

// Ranks as threads of one process, exchanging through shared memory.
class SharedMemoryCommunicator final : public Communicator {
 public:
  explicit SharedMemoryCommunicator(int world_size);
  int world_size() const override { return world_; }
  void reserve(size_t max_elements) override;
  void all_reduce_sum(int rank, float* data, size_t n) override;
  void gather(int rank, const float* send, size_t n, float* recv) override;

 private:
  int world_;
  Barrier barrier_;
  std::vector<const float*> slots_;
  std::vector<float> reduced_;
};

}  // namespace q3p
