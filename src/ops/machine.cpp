#include "ops/machine.h"

#include <cblas.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <random>

#include "ops/kernels.h"
#include "ops/parallel.h"

namespace blip2::machine {

namespace {

using clk = std::chrono::steady_clock;

double seconds(clk::time_point a, clk::time_point b) { return std::chrono::duration<double>(b - a).count(); }

uint64_t sum_scalar(const uint64_t* p, int64_t n) {
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += p[i];
    s1 += p[i + 1];
    s2 += p[i + 2];
    s3 += p[i + 3];
  }
  for (; i < n; ++i) s0 += p[i];
  return s0 + s1 + s2 + s3;
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2"))) uint64_t sum_avx2(const uint64_t* p, int64_t n) {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_add_epi64(s0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    s1 = _mm256_add_epi64(s1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 4)));
    s2 = _mm256_add_epi64(s2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 8)));
    s3 = _mm256_add_epi64(s3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 12)));
  }
  alignas(32) uint64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t),
                     _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
  uint64_t s = t[0] + t[1] + t[2] + t[3];
  for (; i < n; ++i) s += p[i];
  return s;
}
#else
uint64_t sum_avx2(const uint64_t* p, int64_t n) { return sum_scalar(p, n); }
#endif

uint64_t sum_words(const uint64_t* p, int64_t n) {
  return kern::cpu_has_avx2() ? sum_avx2(p, n) : sum_scalar(p, n);
}

}  // namespace

std::vector<float> random_floats(size_t n, uint32_t seed, float scale) {
  std::vector<float> v(n);
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  for (auto& x : v) x = d(g);
  return v;
}

double time_best(const std::function<void(int)>& fn, int trials, double min_s) {
  fn(0);  // warm-up
  int reps = 1;
  {
    const auto t0 = clk::now();
    fn(1);
    const double t = seconds(t0, clk::now());
    reps = std::clamp(static_cast<int>(min_s / std::max(t, 1e-7)), 1, 100000);
  }
  double best = 1e30;
  int k = 2;
  for (int t = 0; t < trials; ++t) {
    const auto t0 = clk::now();
    for (int i = 0; i < reps; ++i) fn(k++);
    best = std::min(best, seconds(t0, clk::now()) / reps);
  }
  return best;
}

double stream_seconds(const std::vector<uint64_t>& buf) {
  const auto t0 = clk::now();
  std::atomic<uint64_t> total{0};
  par::parallel_for(static_cast<int64_t>(buf.size()), [&](int64_t b, int64_t e) {
    total += sum_words(buf.data() + b, e - b);
  }, 1 << 18);
  static volatile uint64_t sink = 0;
  sink = sink + total.load();
  return seconds(t0, clk::now());
}

double read_bandwidth(size_t bytes, int trials) {
  const size_t n = std::max<size_t>(bytes / 8, 1 << 16);
  std::vector<uint64_t> buf(n);
  par::parallel_for(static_cast<int64_t>(n), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) buf[i] = static_cast<uint64_t>(i);  // touched by the threads that read it
  }, 1 << 18);
  double best = 1e30;
  stream_seconds(buf);  // warm-up
  for (int t = 0; t < std::max(trials, 1); ++t) best = std::min(best, stream_seconds(buf));
  return static_cast<double>(n * 8) / best;
}

double sgemm_flops(int64_t m, int64_t n, int64_t k, int trials, double min_s) {
  const auto x = random_floats(static_cast<size_t>(m * k), 1, 1.0f);
  const auto w = random_floats(static_cast<size_t>(n * k), 2, 0.02f);
  std::vector<float> y(static_cast<size_t>(m * n));
  const double t = time_best([&](int) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n),
                static_cast<int>(k), 1.0f, x.data(), static_cast<int>(k), w.data(), static_cast<int>(k), 0.0f,
                y.data(), static_cast<int>(n));
  }, trials, min_s);
  return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) / t;
}

std::vector<SgemmShape> sgemm_survey(int trials, double min_s) {
  const int64_t shapes[][3] = {{257, 4224, 1408}, {257, 1408, 1408}, {257, 6144, 1408}, {257, 1408, 6144},
                               {1024, 1024, 1024}};
  std::vector<SgemmShape> out;
  for (const auto& s : shapes) out.push_back({s[0], s[1], s[2], sgemm_flops(s[0], s[1], s[2], trials, min_s)});
  return out;
}

double best_flops(const std::vector<SgemmShape>& shapes) {
  double best = 0;
  for (const auto& s : shapes) best = std::max(best, s.flops);
  return best;
}

double int8_dot_peak(int trials, double min_s, kern::DotLoop loop) {
  constexpr int64_t kIters = 1 << 16;  // ~0.1–0.5 ms per call and thread: pool hand-offs do not count
  const int n = par::threads();
  std::vector<int32_t> sink(static_cast<size_t>(n));
  int64_t macs = 0;
  const double t = time_best([&](int) {
    std::atomic<int64_t> done{0};
    par::parallel_for(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) done += kern::int8_dot_loop(kIters, &sink[static_cast<size_t>(i)], loop);
    });
    macs = done.load();
  }, trials, min_s);
  return 2.0 * static_cast<double>(macs) / t;
}

std::string cpu_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t p = line.find(':');
      if (p != std::string::npos) return line.substr(line.find_first_not_of(" \t", p + 1));
    }
  return "";
}

}  // namespace blip2::machine
