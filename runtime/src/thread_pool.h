// A fixed set of threads that run tasks with a static assignment: task i runs on thread
// i % size(), thread 0 being the caller. The static assignment makes results independent of
// timing, and lets each task of run(size(), ...) block on the others (the rank threads do).
//
// Waits spin for a bounded time before they sleep: a forward pass hands work to the threads a few
// hundred times per token, and a sleeping thread takes tens of microseconds to wake, while a
// spinning one sees the work at once. The bound keeps an idle pool off the CPU.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace q3p {

// Wakes the threads waiting in spin_then_wait() on `mu` and `cv`, after their condition changed.
void wake_all(std::mutex& mu, std::condition_variable& cv);

// Returns when ready() is true: spins on it for a while, then sleeps on `cv` (woken by wake_all).
template <class Ready>
void spin_then_wait(std::mutex& mu, std::condition_variable& cv, Ready ready);

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // n_threads >= 1, the caller included
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_; }
  // Runs fn(i) for i in [0, n_tasks) and returns when all are done. Not reentrant.
  void run(int n_tasks, const std::function<void(int)>& fn);
  // Runs fn(begin, end) over [0, n) in chunks of `chunk` (the last one shorter), in parallel. Each
  // thread takes the chunks of its own contiguous share in order, then those left in the others'
  // shares: a thread reads on from where its last chunk ended, and one that was descheduled, or
  // streams slower, leaves its last chunks to the others instead of holding them at the join.
  void run_chunks(size_t n, size_t chunk, const std::function<void(size_t begin, size_t end)>& fn);

 private:
  void worker(int index);
  void run_share(int thread_index);
  void stop_threads();

  struct alignas(64) Share {  // one thread's chunks: the next one's start, and the share's end
    std::atomic<size_t> next{0};
    size_t end = 0;
  };

  int n_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  const std::function<void(int)>* job_ = nullptr;
  int n_tasks_ = 0;
  std::atomic<unsigned long> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::vector<Share> shares_;  // run_chunks's, one per thread
};

// Splits [0, n) into pool.size() contiguous ranges (fewer when n is small) and runs
// fn(part, begin, end) on them in parallel; part < pool.size() indexes per-thread scratch.
void parallel_for(ThreadPool& pool, size_t n, const std::function<void(int part, size_t begin, size_t end)>& fn);

// A reusable barrier for a fixed number of threads.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<unsigned long> generation_{0};
};

}  // namespace q3p
