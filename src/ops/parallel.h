// The engine's thread pool: a fixed set of persistent workers and a static parallel_for over index ranges.
// One pool per process, sized by set_threads (LoadOptions::threads, the CLI's --threads); OpenBLAS is told
// the same count, so the two never run more threads than cores.
//
// Workers spin briefly after each job (decoding issues hundreds of small jobs per token) and then sleep, so
// that an idle pool leaves the cores to OpenBLAS. A parallel_for issued from inside a job runs serially.
#pragma once
#include <cstdint>
#include <functional>

namespace blip2::par {

// n <= 0: all cores (std::thread::hardware_concurrency). Also sets OpenBLAS's thread count.
void set_threads(int n);
int threads();

// Calls fn(begin, end) on disjoint contiguous ranges covering [0, n), a few per thread, taken in turn by the
// threads (the calling thread among them). Ranges start at multiples of `align`; no range but the last is
// smaller than `min_chunk` (fewer ranges and threads are used instead). Returns when every range is done. fn must not
// throw.
void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t min_chunk = 1,
                  int64_t align = 1);

// While alive, OpenBLAS runs every call on the calling thread alone, so that pool workers can make small
// BLAS calls side by side (one attention head each) instead of splitting each small call between threads;
// the destructor gives OpenBLAS the pool's thread count again. Not for concurrent use from several threads.
class SerialBlas {
 public:
  SerialBlas();
  ~SerialBlas();
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;
};

}  // namespace blip2::par
