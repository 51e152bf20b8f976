#include "thread_pool.h"

#include <algorithm>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace q3p {

namespace {
// About 35 microseconds of spinning (a pause is ~65 cycles on Zen, ~140 on recent Intel cores):
// longer than most gaps between a forward's parallel steps. On a 2-core machine that others were
// using too, 2 threads decoded Qwen3-0.6B shapes 15% faster than sleeping at once (medians of 5
// interleaved runs: 25.8 against 22.4 tokens/s at tp 1, 23.9 against 20.8 at tp 2), though
// slower in the runs where the machine was busiest; 20000 spins were no better, and erratic.
constexpr int kSpins = 2000;

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}
}  // namespace

void wake_all(std::mutex& mu, std::condition_variable& cv) {
  // A waiter checks its condition under `mu` before it sleeps: taking `mu` here orders this
  // wake-up after that check, so none is lost.
  { std::lock_guard<std::mutex> lock(mu); }
  cv.notify_all();
}

template <class Ready>
void spin_then_wait(std::mutex& mu, std::condition_variable& cv, Ready ready) {
  for (int i = 0; i < kSpins; ++i) {
    if (ready()) return;
    cpu_relax();
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, ready);
}

ThreadPool::ThreadPool(int n_threads) : n_(n_threads < 1 ? 1 : n_threads), shares_(static_cast<size_t>(n_)) {
  threads_.reserve(static_cast<size_t>(n_ - 1));
  try {
    for (int i = 1; i < n_; ++i) threads_.emplace_back(&ThreadPool::worker, this, i);
  } catch (...) {  // could not start a thread: stop the ones that did, then report
    stop_threads();
    throw;
  }
}

ThreadPool::~ThreadPool() { stop_threads(); }

void ThreadPool::stop_threads() {
  stop_ = true;
  wake_all(mu_, start_cv_);
  for (auto& t : threads_) t.join();
}

void ThreadPool::run_share(int thread_index) {
  for (int i = thread_index; i < n_tasks_; i += n_) (*job_)(i);
}

void ThreadPool::worker(int index) {
  unsigned long seen = 0;
  for (;;) {
    spin_then_wait(mu_, start_cv_, [&] { return stop_.load() || generation_.load() != seen; });
    if (stop_) return;
    seen = generation_;
    run_share(index);
    if (pending_.fetch_sub(1) == 1) wake_all(mu_, done_cv_);
  }
}

void ThreadPool::run(int n_tasks, const std::function<void(int)>& fn) {
  if (n_tasks <= 0) return;
  if (n_ == 1 || n_tasks == 1) {
    for (int i = 0; i < n_tasks; ++i) fn(i);
    return;
  }
  job_ = &fn;
  n_tasks_ = n_tasks;
  pending_ = n_ - 1;
  generation_.fetch_add(1);  // publishes job_ and n_tasks_ to the workers (sequentially consistent)
  wake_all(mu_, start_cv_);
  run_share(0);
  spin_then_wait(mu_, done_cv_, [&] { return pending_.load() == 0; });
  job_ = nullptr;
}

// Chunks taken in turn from one counter gave each thread every other chunk: each chunk started a
// new stream, and a 0.6B layer's products (chunks of 288-768 KB at 2 threads) streamed 1-4% slower
// per chunk (medians over 960 tokens, in one process alternating the two orders: qkv 1.031x,
// o_proj/down 1.044x, gate_up 1.013x, the lm_head's 19 MB chunks 1.00x). Alone on one core, reading
// every other chunk of 288 KB cost 10%, of 72 KB 20%: more threads make smaller chunks.
void ThreadPool::run_chunks(size_t n, size_t chunk, const std::function<void(size_t, size_t)>& fn) {
  const size_t chunks = (n + chunk - 1) / chunk, threads = static_cast<size_t>(n_);
  for (size_t i = 0; i < threads; ++i) {  // share i: chunks [chunks * i / threads, chunks * (i + 1) / threads)
    shares_[i].next = chunks * i / threads * chunk;
    shares_[i].end = std::min(n, chunks * (i + 1) / threads * chunk);
  }
  run(n_, [&](int thread) {
    for (size_t k = 0; k < threads; ++k) {  // its own share first, then the others' in turn
      Share& share = shares_[(static_cast<size_t>(thread) + k) % threads];
      for (size_t b = share.next.fetch_add(chunk); b < share.end; b = share.next.fetch_add(chunk))
        fn(b, std::min(share.end, b + chunk));
    }
  });
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
  const unsigned long gen = generation_.load();
  if (count_.fetch_add(1) + 1 == n_) {
    count_ = 0;
    generation_.fetch_add(1);
    wake_all(mu_, cv_);
    return;
  }
  spin_then_wait(mu_, cv_, [&] { return generation_.load() != gen; });
}

}  // namespace q3p
