// A fixed set of threads that run tasks with a static assignment: task i runs on thread
// i % size(), thread 0 being the caller. The static assignment makes results independent of
// timing, and lets each task of run(size(), ...) block on the others (the rank threads do).
#pragma once
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace q3p {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // n_threads >= 1, the caller included
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_; }
  // Runs fn(i) for i in [0, n_tasks) and returns when all are done. Not reentrant.
  void run(int n_tasks, const std::function<void(int)>& fn);

 private:
  void worker(int index);
  void run_share(int thread_index);

  int n_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  const std::function<void(int)>* job_ = nullptr;
  int n_tasks_ = 0;
  unsigned long generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
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
  int n_, count_ = 0;
  unsigned long generation_ = 0;
};

}  // namespace q3p
