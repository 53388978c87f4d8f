#include "ops/parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BLIP2_PAUSE() _mm_pause()
#else
#define BLIP2_PAUSE() ((void)0)
#endif

// OpenBLAS's own setter; weak, so that linking against another BLAS still works (it is then not called).
extern "C" void openblas_set_num_threads(int) __attribute__((weak));

namespace blip2::par {

namespace {

constexpr auto kSpin = std::chrono::microseconds(200);  // how long an idle worker polls before sleeping
constexpr int64_t kChunksPerThread = 4;

thread_local bool t_in_job = false;

class Pool {
 public:
  ~Pool() { resize(1); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int n) {
    std::lock_guard<std::mutex> lock(run_mu_);
    if (!workers_.empty()) {
      stop_.store(true);
      publish(0);
      wake_workers();
      for (auto& t : workers_) t.join();
      workers_.clear();
      stop_.store(false);
    }
    // The generation is read here, not in the new thread: a job issued before the thread first runs must
    // still count as new to it.
    const uint32_t g0 = generation(job_.load());
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i, g0] { work(i, g0); });
  }

  // task(t) for t in [0, nt), nt <= size(); the caller runs t = 0.
  void run(int nt, const std::function<void(int)>& task) {
    std::unique_lock<std::mutex> lock(run_mu_, std::try_to_lock);
    if (nt <= 1 || t_in_job || !lock.owns_lock()) {  // nested or concurrent use: serial
      for (int t = 0; t < nt; ++t) task(t);
      return;
    }
    task_ = &task;
    pending_.store(nt - 1);
    publish(nt);
    wake_workers();
    t_in_job = true;
    task(0);
    t_in_job = false;
    // Wait for the others: poll (they usually finish about when we do), then sleep.
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0;; ++i) {
      if (pending_.load() == 0) break;
      if ((i & 63) == 63 && std::chrono::steady_clock::now() - start > kSpin) {
        std::unique_lock<std::mutex> lk(mu_);
        ++sleepers_;
        done_cv_.wait(lk, [&] { return pending_.load() == 0; });
        --sleepers_;
        break;
      }
      BLIP2_PAUSE();
    }
    task_ = nullptr;
  }

 private:
  // A job is its generation (high 32 bits) and the number of threads taking part (low 32 bits), published
  // in one atomic: a worker that sleeps through a job it has no part in, and wakes as the next is being set
  // up, must not pair one job's generation with another's thread count (it would run the new job twice and
  // count itself done twice: the caller then returned while a thread still ran its task, or waited forever).
  static uint32_t generation(uint64_t job) { return static_cast<uint32_t>(job >> 32); }
  static int threads_of(uint64_t job) { return static_cast<int>(job & 0xffffffffu); }
  void publish(int threads) {  // under run_mu_: the only writer
    const uint64_t next_gen = static_cast<uint64_t>(generation(job_.load()) + 1);
    job_.store(next_gen << 32 | static_cast<uint32_t>(threads));
  }

  void work(int index, uint32_t seen) {
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      uint64_t job;
      for (int i = 0;; ++i) {
        job = job_.load();
        if (generation(job) != seen) break;
        if ((i & 63) == 63 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lk(mu_);
          ++sleepers_;
          work_cv_.wait(lk, [&] { return generation(job_.load()) != seen; });
          --sleepers_;
          job = job_.load();
          break;
        }
        BLIP2_PAUSE();
      }
      seen = generation(job);
      if (stop_.load()) return;
      // task_ is this job's: the caller waits for every thread taking part before it sets up another.
      if (index < threads_of(job)) {
        t_in_job = true;
        (*task_)(index);
        t_in_job = false;
        if (pending_.fetch_sub(1) == 1 && sleepers_.load() > 0) {
          std::lock_guard<std::mutex> lk(mu_);
          done_cv_.notify_all();
        }
      }
    }
  }

  // Sleeping (after the spin) is on condition variables; `sleepers_` lets the hot path skip the mutex. Both
  // sides use sequentially consistent atomics: either the waker sees a sleeper, or the sleeper's predicate
  // sees the new job.
  void wake_workers() {
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      work_cv_.notify_all();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::atomic<int> sleepers_{0};
  std::atomic<uint64_t> job_{0};
  std::atomic<uint32_t> pending_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int)>* task_ = nullptr;
};

int default_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(std::min(n, 256u));
}

Pool& pool() {
  static Pool* p = [] {
    auto* q = new Pool();  // never destroyed: workers may outlive static destruction order otherwise
    const int n = default_threads();
    q->resize(n);
    if (openblas_set_num_threads) openblas_set_num_threads(n);
    return q;
  }();
  return *p;
}

}  // namespace

void set_threads(int n) {
  if (n <= 0) n = default_threads();
  n = std::min(n, 256);
  Pool& p = pool();
  if (p.size() != n) p.resize(n);
  if (openblas_set_num_threads) openblas_set_num_threads(n);
}

int threads() { return pool().size(); }

SerialBlas::SerialBlas() {
  if (openblas_set_num_threads) openblas_set_num_threads(1);
}
SerialBlas::~SerialBlas() {
  if (openblas_set_num_threads) openblas_set_num_threads(threads());
}

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t min_chunk, int64_t align) {
  if (n <= 0) return;
  min_chunk = std::max<int64_t>(min_chunk, 1);
  align = std::max<int64_t>(align, 1);
  Pool& p = pool();
  const int64_t units = (n + align - 1) / align;
  // At most this many chunks: then every chunk but the last (cut by n) spans at least min_chunk.
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(n / (min_chunk + align - 1), units));
  const int nt = static_cast<int>(std::clamp<int64_t>(most, 1, p.size()));
  if (nt == 1 || t_in_job) {
    fn(0, n);
    return;
  }
  // A few chunks per thread, taken in turn: a thread the OS delays (other processes, OpenBLAS's spinning
  // workers) leaves its remaining chunks to the others instead of holding everyone up.
  const int64_t chunks = std::min<int64_t>(most, static_cast<int64_t>(nt) * kChunksPerThread);
  std::atomic<int64_t> next{0};
  p.run(nt, [&](int) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t b = std::min(n, units * c / chunks * align), e = std::min(n, units * (c + 1) / chunks * align);
      if (b < e) fn(b, e);
    }
  });
}

}  // namespace blip2::par
