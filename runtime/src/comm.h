// Communication between the tensor-parallel ranks, behind a small interface: the model code
// only calls these collectives, so the backends (ranks as threads of one process here, ranks as
// MPI processes in comm_mpi.h) replace each other without touching it.
//
// A process holds a contiguous group of ranks [first_rank, first_rank + local_ranks), computed by
// as many threads; the collectives take the caller's index in that group (`local`).
#pragma once
#include <cstddef>
#include <memory>
#include <vector>

#include "thread_pool.h"

namespace q3p {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int world_size() const = 0;   // ranks in all processes
  virtual int first_rank() const = 0;
  virtual int local_ranks() const = 0;  // ranks of this process
  // Before a forward pass, from one thread: the largest element count any collective will see.
  virtual void reserve(size_t max_elements) = 0;
  // data <- sum over ranks of data, summed in rank order 0, 1, ..., W-1 (every rank gets the
  // same bits). Called by every rank with the same n.
  virtual void all_reduce_sum(int local, float* data, size_t n) = 0;
  // In the process that holds rank 0: recv[r * n, (r + 1) * n) <- rank r's send, for every r
  // (recv is ignored in the other processes). Called by every rank with the same n.
  virtual void gather(int local, const float* send, size_t n, float* recv) = 0;
};

// Ranks as threads of one process, exchanging through shared memory.
class SharedMemoryCommunicator final : public Communicator {
 public:
  explicit SharedMemoryCommunicator(int world_size);
  int world_size() const override { return world_; }
  int first_rank() const override { return 0; }
  int local_ranks() const override { return world_; }
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
