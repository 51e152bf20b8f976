#include "thread_pool.h"

#include <algorithm>

namespace q3p {

ThreadPool::ThreadPool(int n_threads) : n_(n_threads < 1 ? 1 : n_threads) {
  threads_.reserve(static_cast<size_t>(n_ - 1));
  try {
    for (int i = 1; i < n_; ++i) threads_.emplace_back(&ThreadPool::worker, this, i);
  } catch (...) {  // could not start a thread: stop the ones that did, then report
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    start_cv_.notify_all();
    for (auto& t : threads_) t.join();
    throw;
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  start_cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::run_share(int thread_index) {
  for (int i = thread_index; i < n_tasks_; i += n_) (*job_)(i);
}

void ThreadPool::worker(int index) {
  unsigned long seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      start_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    run_share(index);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }
}

void ThreadPool::run(int n_tasks, const std::function<void(int)>& fn) {
  if (n_tasks <= 0) return;
  if (n_ == 1 || n_tasks == 1) {
    for (int i = 0; i < n_tasks; ++i) fn(i);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    n_tasks_ = n_tasks;
    pending_ = n_ - 1;
    ++generation_;
  }
  start_cv_.notify_all();
  run_share(0);
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return pending_ == 0; });
  job_ = nullptr;
}

void parallel_for(ThreadPool& pool, size_t n, const std::function<void(int, size_t, size_t)>& fn) {
  if (n == 0) return;
  const size_t parts = std::min(static_cast<size_t>(pool.size()), n);
  if (parts == 1) {
    fn(0, 0, n);
    return;
  }
  pool.run(static_cast<int>(parts), [&](int i) {
    const size_t b = n * static_cast<size_t>(i) / parts, e = n * static_cast<size_t>(i + 1) / parts;
    fn(i, b, e);
  });
}

void Barrier::wait() {
  std::unique_lock<std::mutex> lock(mu_);
  const unsigned long gen = generation_;
  if (++count_ == n_) {
    count_ = 0;
    ++generation_;
    cv_.notify_all();
    return;
  }
  cv_.wait(lock, [&] { return generation_ != gen; });
}

}  // namespace q3p
