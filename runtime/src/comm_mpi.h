// Ranks as MPI processes (each holding a contiguous group of ranks as threads), for a model
// larger than one machine. The MPI library is not linked: the caller (Python, through mpi4py)
// has loaded and initialized it, and names its file; the functions used here are looked up in it
// at run time, so the default build and the threads backend need no MPI at all.
//
// The handles are those of the MPICH ABI (libmpi.so.12: MPICH, Intel MPI, MVAPICH, Cray MPICH),
// whose values are fixed; the caller checks that the loaded library uses it.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm.h"
#include "thread_pool.h"

namespace q3p {

struct MpiFunctions;

class MpiCommunicator final : public Communicator {
 public:
  // library: the path of the loaded, initialized libmpi; comm: an MPI_Comm handle (an int of the
  // MPICH ABI, in the low 32 bits: mpi4py gives it sign-extended to 64)
  // whose every process holds ranks_per_process ranks, in process order. Throws UsageError.
  MpiCommunicator(const std::string& library, uint64_t comm, int ranks_per_process);
  ~MpiCommunicator() override;
  int world_size() const override { return processes_ * local_; }
  int first_rank() const override { return process_ * local_; }
  int local_ranks() const override { return local_; }
  void reserve(size_t max_elements) override;
  void all_reduce_sum(int local, float* data, size_t n) override;
  void gather(int local, const float* send, size_t n, float* recv) override;

 private:
  const float* pack(size_t n);  // the local ranks' slots, one after the other (rank order)
  void check(int code, const char* what);

  std::unique_ptr<const MpiFunctions> mpi_;
  int comm_;
  int process_ = 0, processes_ = 0, local_;
  Barrier barrier_;
  std::vector<const float*> slots_;
  std::vector<float> packed_;    // [local rank][n]
  std::vector<float> everyone_;  // [rank][n], every rank's data
  std::vector<float> reduced_;
};

}  // namespace q3p
