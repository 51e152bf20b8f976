#include "comm_mpi.h"

#include <dlfcn.h>

#include <climits>
#include <cstdio>
#include <cstring>

#include "common.h"

namespace q3p {

// The few MPI functions used, as the MPICH ABI declares them (handles are ints).
struct MpiFunctions {
  int (*comm_rank)(int comm, int* rank);
  int (*comm_size)(int comm, int* size);
  int (*comm_set_errhandler)(int comm, int errhandler);
  int (*allgather)(const void* send, int send_count, int send_type, void* recv, int recv_count, int recv_type,
                   int comm);
  int (*gather)(const void* send, int send_count, int send_type, void* recv, int recv_count, int recv_type, int root,
                int comm);
  int (*error_string)(int code, char* text, int* length);
  int (*abort)(int comm, int code);
};

namespace {
// Values fixed by the MPICH ABI (its mpi.h).
constexpr int kMpiSuccess = 0;
constexpr int kMpiFloat = 0x4c00040a;
constexpr int kMpiErrorsReturn = 0x54000001;
constexpr int kMpiMaxErrorString = 512;

template <class F>
void resolve(void* library, const std::string& path, const char* name, F*& fn) {
  fn = reinterpret_cast<F*>(dlsym(library, name));
  if (!fn) throw UsageError(path + ": has no function " + name + " (not an MPI library?)");
}
}  // namespace

MpiCommunicator::MpiCommunicator(const std::string& library, uint64_t comm, int ranks_per_process)
    : comm_(static_cast<int>(static_cast<uint32_t>(comm))), local_(ranks_per_process), barrier_(ranks_per_process),
      slots_(static_cast<size_t>(ranks_per_process), nullptr) {
  if (ranks_per_process < 1) throw UsageError("ranks_per_process must be >= 1");
  // The library is the one the caller loaded and initialized: never a second copy of it.
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  if (!handle) throw UsageError(library + ": is not loaded in this process (MPI must be initialized first)");
  auto fns = std::make_unique<MpiFunctions>();
  resolve(handle, library, "MPI_Comm_rank", fns->comm_rank);
  resolve(handle, library, "MPI_Comm_size", fns->comm_size);
  resolve(handle, library, "MPI_Comm_set_errhandler", fns->comm_set_errhandler);
  resolve(handle, library, "MPI_Allgather", fns->allgather);
  resolve(handle, library, "MPI_Gather", fns->gather);
  resolve(handle, library, "MPI_Error_string", fns->error_string);
  resolve(handle, library, "MPI_Abort", fns->abort);
  mpi_ = std::move(fns);
  // Errors come back to check(), which names this process's ranks before it stops them all.
  check(mpi_->comm_set_errhandler(comm_, kMpiErrorsReturn), "MPI_Comm_set_errhandler");
  check(mpi_->comm_rank(comm_, &process_), "MPI_Comm_rank");
  check(mpi_->comm_size(comm_, &processes_), "MPI_Comm_size");
}

MpiCommunicator::~MpiCommunicator() = default;

// A failed collective leaves the processes out of step, and some of them may be waiting in one
// forever: every process is stopped, with this one's ranks and the cause on stderr.
void MpiCommunicator::check(int code, const char* what) {
  if (code == kMpiSuccess) return;
  char text[kMpiMaxErrorString] = {};
  int length = 0;
  if (mpi_->error_string(code, text, &length) != kMpiSuccess) std::snprintf(text, sizeof text, "error %d", code);
  std::fprintf(stderr, "qwen3pack: MPI process %d (ranks %d to %d): %s failed: %s; stopping every process\n",
               process_, first_rank(), first_rank() + local_ - 1, what, text);
  std::fflush(stderr);
  mpi_->abort(comm_, 1);
}

void MpiCommunicator::reserve(size_t max_elements) {
  const size_t everyone = max_elements * static_cast<size_t>(world_size());
  if (everyone > static_cast<size_t>(INT_MAX))
    throw UsageError("a collective of " + std::to_string(max_elements) + " floats per rank over " +
                     std::to_string(world_size()) + " ranks is beyond MPI's int counts: feed fewer tokens per step");
  if (packed_.size() < max_elements * static_cast<size_t>(local_)) packed_.resize(max_elements * static_cast<size_t>(local_));
  if (everyone_.size() < everyone) everyone_.resize(everyone);
  if (reduced_.size() < max_elements) reduced_.resize(max_elements);
}

const float* MpiCommunicator::pack(size_t n) {
  if (local_ == 1) return slots_[0];
  for (size_t r = 0; r < static_cast<size_t>(local_); ++r) std::memcpy(packed_.data() + r * n, slots_[r], n * sizeof(float));
  return packed_.data();
}

// Every process receives every rank's data (one MPI_Allgather), then sums it in rank order as
// SharedMemoryCommunicator does, so both give the same bits. For the small vectors of decoding
// one collective is the shortest wait; its traffic grows with the world size (a reduce-scatter
// then all-gather would move less for long prefills over many processes).
void MpiCommunicator::all_reduce_sum(int local, float* data, size_t n) {
  slots_[static_cast<size_t>(local)] = data;
  barrier_.wait();
  const int count = static_cast<int>(n) * local_;
  if (local == 0) check(mpi_->allgather(pack(n), count, kMpiFloat, everyone_.data(), count, kMpiFloat, comm_), "all-reduce (MPI_Allgather)");
  barrier_.wait();
  // Each local rank sums its slice of the vector, like the shared-memory communicator.
  const size_t W = static_cast<size_t>(world_size()), L = static_cast<size_t>(local_);
  const size_t b = n * static_cast<size_t>(local) / L, e = n * static_cast<size_t>(local + 1) / L;
  float* out = reduced_.data();
  std::memcpy(out + b, everyone_.data() + b, (e - b) * sizeof(float));
  for (size_t r = 1; r < W; ++r) {
    const float* src = everyone_.data() + r * n;
    for (size_t i = b; i < e; ++i) out[i] += src[i];
  }
  barrier_.wait();
  std::memcpy(data, out, n * sizeof(float));
}

void MpiCommunicator::gather(int local, const float* send, size_t n, float* recv) {
  slots_[static_cast<size_t>(local)] = send;
  barrier_.wait();
  const int count = static_cast<int>(n) * local_;
  if (local == 0) check(mpi_->gather(pack(n), count, kMpiFloat, recv, count, kMpiFloat, 0, comm_), "gather (MPI_Gather)");
  barrier_.wait();  // senders keep their buffers until they are sent
}

}  // namespace q3p
