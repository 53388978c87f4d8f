// bench_kernels: the machine's ceilings and every product kernel against them.
//   read bandwidth   a 1 GiB sum with all threads (the floor for streaming weights)
//   sgemm            OpenBLAS at 1024³ and the ViT-g shapes (the ceiling for the many-row path), and
//                    ops::linear on those shapes with bf16 / f16 weights (widen + sgemm) and int8 / int4
//                    weights (integer products)
//   gemv             ops::linear with 1 and 5 rows on decode-sized matrices, every weight format: time per
//                    product, weight bytes/s and the ratio to the measured bandwidth
// Matrices are cycled through enough copies (≥ 256 MiB) that every product streams from DRAM, not the L3.
//
//   widen / tile     the two block sizes of ops::linear (float weights widened per block for sgemm; quantized
//                    activations per row tile of the integer products) swept over the shapes they matter for
//
// Usage: bench_kernels [--threads N] [--scalar] [--quick] [--rows 1,5] [--only gemv|sgemm|bw|widen|tile]
//                      [--i8-block B] [--widen R1,R2,...] [--tile KiB1,KiB2,...] [--rounds N] [--outliers]
//   --outliers: gemv's activations get 4 columns ×40 (make-random --outliers' residual channels), so that
//   ops::linear's outlier-column decomposition (issue 14) runs in every int8/int4 product.
#include <cblas.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "ops/kernels.h"
#include "ops/machine.h"
#include "ops/ops.h"
#include "ops/parallel.h"

using namespace blip2;
using clk = std::chrono::steady_clock;

namespace {

double seconds(clk::time_point a, clk::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// The ceilings and the timing loop are shared with `blip2 bench` (ops/machine.h).
using machine::time_best;
using machine::read_bandwidth;
using machine::random_floats;

struct Format {
  const char* name;
  DType dtype;
  int group;
  bool i8_float;  // the weight-only int8 alternative
};

void bench_sgemm(double bw) {
  (void)bw;
  std::printf("\n== sgemm, %d threads (GFLOP/s; OpenBLAS %s)\n", par::threads(), openblas_get_config());
  // The integer products' ceiling (blip2 bench sets int8/int4 stages against it): the kernels' own dot-product
  // instructions in a register-only loop, in operations/s like the GFLOP/s columns.
  const double int8_peak = machine::int8_dot_peak(),
               with_sign = machine::int8_dot_peak(5, 0.15, kern::DotLoop::Sign),
               int16 = machine::int8_dot_peak(5, 0.15, kern::DotLoop::Int16);
  std::printf("int8 dot-product peak (%s kernels): %.1f GOP/s; the int8 and int4 columns are GOP/s of the same count\n",
              kern::isa_name(), int8_peak / 1e9);
  std::printf("  the same loop with the vpsignb per product of exact int8 x int8 (the I8 tile's sign trick; AVX2 "
              "without VNNI only): %.1f GOP/s, %.0f%% of the peak\n", with_sign / 1e9, 100.0 * with_sign / int8_peak);
  std::printf("  exact int8 x int8 widened to int16 instead (vpmaddwd + vpaddd, 16 per vector; AVX2 without VNNI "
              "only): %.1f GOP/s, %.0f%% of the peak\n", int16 / 1e9, 100.0 * int16 / int8_peak);
  const int shapes[][3] = {{1024, 1024, 1024}, {257, 1408, 1408}, {257, 6144, 1408}, {257, 1408, 6144},
                           {257, 4224, 1408}, {45, 4096, 4096},   {45, 10240, 4096}};
  std::printf("%-18s %9s %9s %9s %9s %9s\n", "M x N x K", "f32", "bf16", "f16", "int8", "int4g64");
  for (const auto& s : shapes) {
    const int64_t M = s[0], N = s[1], K = s[2];
    const auto x = random_floats(static_cast<size_t>(M * K), 1);
    const auto wv = random_floats(static_cast<size_t>(N * K), 2, 0.02f);
    std::vector<float> y(static_cast<size_t>(M * N));
    const Weight w32 = f32_weight(wv, N, K);
    const double flop = 2.0 * M * N * K;
    std::printf("%5ldx%5ldx%5ld  ", static_cast<long>(M), static_cast<long>(N), static_cast<long>(K));
    for (const auto& f : {Format{"f32", DType::F32, 0, false}, Format{"bf16", DType::BF16, 0, false},
                          Format{"f16", DType::F16, 0, false}, Format{"int8", DType::I8, 0, false},
                          Format{"int4", DType::I4, 64, false}}) {
      const Weight w = f.dtype == DType::F32 ? w32 : kern::convert(w32, f.dtype, f.group);
      const double t = time_best([&](int) { ops::linear(x.data(), M, w, Weight{}, y.data()); }, 3, 0.3);
      std::printf(" %9.1f", flop / t / 1e9);
    }
    std::printf("\n");
  }
}

// One setting of ops::linear swept over the shapes it matters for (GFLOP/s per value), then reset to its
// default (`set(0)`).
void bench_setting(const char* title, const std::vector<DType>& dtypes, const std::vector<std::array<int64_t, 3>>& shapes,
                   const std::vector<int64_t>& values, void (*set)(int64_t)) {
  std::printf("\n== %s (GFLOP/s)\n", title);
  for (const auto& [M, N, K] : shapes) {
    const auto x = random_floats(static_cast<size_t>(M * K), 1);
    const auto wv = random_floats(static_cast<size_t>(N * K), 2, 0.02f);
    std::vector<float> y(static_cast<size_t>(M * N));
    const Weight w32 = f32_weight(wv, N, K);
    for (DType d : dtypes) {
      const Weight w = kern::convert(w32, d, 64);
      std::printf("%5ldx%5ldx%5ld %-4s", static_cast<long>(M), static_cast<long>(N), static_cast<long>(K),
                  dtype_name(d));
      for (int64_t v : values) {
        set(v);
        const double t = time_best([&](int) { ops::linear(x.data(), M, w, Weight{}, y.data()); }, 3, 0.3);
        std::printf("  %5ld: %6.1f", static_cast<long>(v), 2.0 * M * N * K / t / 1e9);
      }
      std::printf("\n");
    }
  }
  set(0);
}

bool g_outlier_x = false;  // --outliers

// Every format of one shape and row count, interleaved: each round times every format once (a batch of
// products on rotating copies) and a 512 MiB streaming sum; the best round of each is kept. Other processes
// on the machine then slow all of them alike, and the best rounds are the undisturbed ones.
void bench_gemv(double bw, const std::vector<int>& row_counts, bool quick, int rounds) {
  std::printf("\n== gemv through ops::linear, %d threads, %s kernels, best of %d interleaved rounds\n", par::threads(),
              kern::isa_name(), rounds);
  std::printf("   'of bw': weight bytes/s over the best streaming sum of the same rounds (1 GiB sum alone: %.1f GB/s)\n",
              bw / 1e9);
  std::printf("%-12s %4s %-9s %10s %10s %8s %9s\n", "out x in", "rows", "format", "us/product", "GB/s", "of bw",
              "vs int8");
  const int64_t shapes[][2] = {{4096, 4096}, {10240, 4096}, {4096, 10240}, {32128, 4096}};
  const std::vector<Format> formats = {{"f32", DType::F32, 0, false},     {"bf16", DType::BF16, 0, false},
                                       {"f16", DType::F16, 0, false},     {"int8", DType::I8, 0, false},
                                       {"int8-wf", DType::I8, 0, true},   {"int4g32", DType::I4, 32, false},
                                       {"int4g64", DType::I4, 64, false}, {"int4g128", DType::I4, 128, false}};
  std::vector<uint64_t> stream((size_t(512) << 20) / 8, 1);
  for (const auto& s : shapes) {
    const int64_t out = s[0], in = s[1];
    if (quick && out == 32128) continue;
    const auto master = random_floats(static_cast<size_t>(out * in), 7, 0.02f);
    const Weight w32 = f32_weight(master, out, in);
    // Copies so that each format's set exceeds any cache; the f32 master itself serves as one f32 copy.
    std::vector<std::vector<Weight>> copies(formats.size());
    std::vector<std::vector<float>> f32_store;
    f32_store.reserve(16);
    for (size_t fi = 0; fi < formats.size(); ++fi) {
      const Format& f = formats[fi];
      if (f.i8_float) {
        copies[fi] = copies[fi - 1];
        continue;
      }
      copies[fi].push_back(f.dtype == DType::F32 ? w32 : kern::convert(w32, f.dtype, f.group));
      const size_t bytes = copies[fi][0].nbytes();
      const int n = static_cast<int>(std::clamp<size_t>((size_t(256) << 20) / bytes + 1, 1, 16));
      for (int i = 1; i < n; ++i) {
        if (f.dtype == DType::F32) {
          f32_store.push_back(master);
          copies[fi].push_back(f32_weight(f32_store.back(), out, in));
        } else {
          copies[fi].push_back(kern::convert(w32, f.dtype, f.group));
        }
      }
    }
    for (int R : row_counts) {
      auto x = random_floats(static_cast<size_t>(R * in), 11);
      if (g_outlier_x)
        for (int r = 0; r < R; ++r)
          for (int64_t c : {7, 1000, 1001, 3000}) x[static_cast<size_t>(r * in + c)] *= 40.0f;
      std::vector<float> y(static_cast<size_t>(R * out));
      std::vector<double> best(formats.size(), 1e30);
      double best_stream = 1e30;
      std::vector<int> reps(formats.size(), 0);
      int k = 0;
      for (int round = 0; round < rounds; ++round) {
        best_stream = std::min(best_stream, machine::stream_seconds(stream));
        for (size_t fi = 0; fi < formats.size(); ++fi) {
          const Format& f = formats[fi];
          const auto run = [&] {
            const Weight& w = copies[fi][static_cast<size_t>(k++) % copies[fi].size()];
            if (f.i8_float) {
              par::parallel_for(out, [&](int64_t o0, int64_t o1) { kern::gemv_i8_float(x.data(), in, R, w, o0, o1, y.data(), out); }, 16, 16);
            } else {
              ops::linear(x.data(), R, w, Weight{}, y.data());
            }
          };
          if (reps[fi] == 0) {  // first round: warm up and size the batch to ~30 ms
            run();
            const auto t0 = clk::now();
            run();
            reps[fi] = std::clamp(static_cast<int>(0.03 / std::max(seconds(t0, clk::now()), 1e-7)), 1, 10000);
          }
          const auto t0 = clk::now();
          for (int i = 0; i < reps[fi]; ++i) run();
          best[fi] = std::min(best[fi], seconds(t0, clk::now()) / reps[fi]);
        }
      }
      const double floor_bw = static_cast<double>(stream.size() * 8) / best_stream;
      double t_i8 = 0;
      for (size_t fi = 0; fi < formats.size(); ++fi) {
        const Format& f = formats[fi];
        const double t = best[fi];
        const size_t bytes = copies[fi][0].nbytes();
        if (f.dtype == DType::I8 && !f.i8_float) t_i8 = t;
        std::printf("%5ldx%-6ld %4d %-9s %10.1f %10.2f %7.0f%% %8.2fx\n", static_cast<long>(out), static_cast<long>(in),
                    R, f.name, t * 1e6, bytes / t / 1e9, 100.0 * bytes / t / floor_bw, t_i8 > 0 ? t_i8 / t : 0.0);
      }
      std::printf("%5ldx%-6ld %4d %-9s %10s %10.2f\n", static_cast<long>(out), static_cast<long>(in), R, "(stream)", "",
                  floor_bw / 1e9);
    }
  }
}

std::vector<int> parse_ints(const std::string& s) {
  std::vector<int> v;
  size_t p = 0;
  while (p < s.size()) {
    const size_t q = s.find(',', p);
    v.push_back(std::stoi(s.substr(p, q == std::string::npos ? std::string::npos : q - p)));
    if (q == std::string::npos) break;
    p = q + 1;
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0;
  bool quick = false;
  std::string only;
  std::vector<int> rows = {1, 5};
  std::vector<int64_t> widen, tile;
  int rounds = 9;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--threads") threads = std::stoi(next());
    else if (a == "--scalar") kern::force_scalar(true);
    else if (a == "--quick") quick = true;
    else if (a == "--rows") rows = parse_ints(next());
    else if (a == "--only") only = next();
    else if (a == "--i8-block") kern::set_i8_act_block(std::stoi(next()));
    else if (a == "--widen") { const auto v = parse_ints(next()); widen.assign(v.begin(), v.end()); }
    else if (a == "--rounds") rounds = std::max(1, std::stoi(next()));
    else if (a == "--tile") { const auto v = parse_ints(next()); tile.assign(v.begin(), v.end()); }
    else if (a == "--outliers") g_outlier_x = true;
    else {
      std::fprintf(stderr, "usage: bench_kernels [--threads N] [--scalar] [--quick] [--rows 1,5] "
                           "[--only gemv|sgemm|bw|widen|tile] [--i8-block B] [--widen 128,256,...] [--tile KiB,...] [--rounds N] "
                           "[--outliers]\n");
      return 2;
    }
  }
  par::set_threads(threads);
  std::printf("threads %d, kernels %s (cpu avx2+fma+f16c: %s)\n", par::threads(), kern::isa_name(),
              kern::cpu_has_avx2() ? "yes" : "no");
  const double bw = read_bandwidth();
  std::printf("read bandwidth (1 GiB sum, %d threads): %.2f GB/s\n", par::threads(), bw / 1e9);
  if (only.empty() || only == "sgemm") bench_sgemm(bw);
  if (!widen.empty() || only == "widen")
    bench_setting("float weights: rows widened per block for sgemm", {DType::BF16, DType::F16},
                  {{257, 6144, 1408}, {45, 10240, 4096}},
                  widen.empty() ? std::vector<int64_t>{64, 128, 256, 512, 1024} : widen, ops::set_widen_rows);
  if (!tile.empty() || only == "tile")
    bench_setting("integer products: KiB of quantized activations per row tile", {DType::I8, DType::I4},
                  {{257, 6144, 1408}, {257, 1408, 6144}, {1028, 1408, 1408}},
                  tile.empty() ? std::vector<int64_t>{32, 128, 256, 512, 1 << 20} : tile,
                  [](int64_t kib) { ops::set_quant_tile_bytes(kib << 10); });
  if (only.empty() || only == "gemv") bench_gemv(bw, rows, quick, rounds);
  return 0;
}
