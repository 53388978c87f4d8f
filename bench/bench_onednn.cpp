// bench_onednn: oneDNN's matmul against ops::linear on the ViT-g's product shapes (issue 16: "measure
// oneDNN's matmul against your kernels and keep the faster"). Built only where Debian's libdnnl-dev is
// installed (CMakeLists.txt); not part of the engine.
//
//   rate        GOP/s (2 per multiply-add) of each format on each shape, best of 3 × ≥ 0.3 s, both libraries
//               on the same number of threads, against the sgemm and int8 dot-product peaks of the same run
//   exactness   oneDNN's s8 × s8 product into int32 on int8 data quantized by the engine's own functions
//               (activations per block of 128, weights per row, both to ±127), against the exact integer
//               sums: how many outputs differ, and by how much. The engine's integer kernels compute exact
//               sums (test_kernels checks every vector kernel against the scalar one bit for bit).
//
// Usage: bench_onednn [--threads N] [--quick]
#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "ops/kernels.h"
#include "ops/machine.h"
#include "ops/ops.h"
#include "ops/parallel.h"

using namespace blip2;
using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

namespace {

int g_trials = 3;
double g_min_s = 0.3;

// y[M,N] = x[M,K] · w[N,K]ᵀ through oneDNN with src/weights in `src` / `wei` and dst float32 (int8: one output
// scale, the most its 2.6 matmul takes: no per-block activation scales). Operations/s, or 0 with the reason
// printed when oneDNN has no implementation for this machine.
double onednn_rate(dnnl::engine& eng, dnnl::stream& s, int64_t M, int64_t N, int64_t K, dt src, dt wei,
                   std::string& impl) {
  const dnnl::memory::desc a_md({M, K}, src, tag::ab), b_md({K, N}, wei, tag::any), c_md({M, N}, dt::f32, tag::ab);
  dnnl::primitive_attr attr;
  if (src == dt::s8 || src == dt::u8) attr.set_output_scales(0, {1e-4f});
  dnnl::matmul::primitive_desc pd;
  try {
    pd = dnnl::matmul::primitive_desc(dnnl::matmul::desc(a_md, b_md, c_md), attr, eng);
  } catch (const dnnl::error& e) {
    impl = std::string("none (") + e.what() + ")";
    return 0;
  }
  impl = pd.impl_info_str();
  dnnl::memory A(pd.src_desc(), eng), B(pd.weights_desc(), eng), C(pd.dst_desc(), eng);
  std::memset(A.get_data_handle(), 1, pd.src_desc().get_size());
  std::memset(B.get_data_handle(), 1, pd.weights_desc().get_size());
  const dnnl::matmul mm(pd);
  const double t = machine::time_best([&](int) {
    mm.execute(s, {{DNNL_ARG_SRC, A}, {DNNL_ARG_WEIGHTS, B}, {DNNL_ARG_DST, C}});
    s.wait();
  }, g_trials, g_min_s);
  return 2.0 * M * N * K / t;
}

double engine_rate(int64_t M, int64_t N, int64_t K, DType d) {
  const auto x = machine::random_floats(static_cast<size_t>(M * K), 1);
  const auto wv = machine::random_floats(static_cast<size_t>(N * K), 2, 0.02f);
  const Weight w32 = f32_weight(wv, N, K);  // a view of wv
  const Weight w = d == DType::F32 ? w32 : kern::convert(w32, d, 64);
  std::vector<float> y(static_cast<size_t>(M * N));
  const double t = machine::time_best([&](int) { ops::linear(x.data(), M, w, Weight{}, y.data()); }, g_trials, g_min_s);
  return 2.0 * M * N * K / t;
}

// The int8 data is the engine's own: activations through kern::quantize_rows (per block of kI8ActBlock),
// weights through kern::convert (per row). K must need no padding (a multiple of 32).
void exactness(dnnl::engine& eng, dnnl::stream& s, int64_t M, int64_t N, int64_t K) {
  const auto x = machine::random_floats(static_cast<size_t>(M * K), 11);
  kern::QuantRows qx;
  qx.resize(M, K, kern::kI8ActBlock);
  kern::quantize_rows(x.data(), M, K, K, qx);
  const auto wv = machine::random_floats(static_cast<size_t>(N * K), 12, 0.02f);
  const Weight wq = kern::convert(f32_weight(wv, N, K), DType::I8, 0);
  const int8_t* a = qx.q.data();
  const auto* w = static_cast<const int8_t*>(wq.data);  // [N, K]: oneDNN reads it as [K, N] "ba"
  const dnnl::memory::desc a_md({M, K}, dt::s8, tag::ab), b_md({K, N}, dt::s8, tag::ba), c_md({M, N}, dt::s32, tag::ab);
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), eng);
  dnnl::memory A(a_md, eng, const_cast<int8_t*>(a)), B(b_md, eng, const_cast<int8_t*>(w)), C(c_md, eng);
  dnnl::matmul(pd).execute(s, {{DNNL_ARG_SRC, A}, {DNNL_ARG_WEIGHTS, B}, {DNNL_ARG_DST, C}});
  s.wait();
  const auto* c = static_cast<const int32_t*>(C.get_data_handle());
  int64_t differ = 0;
  double worst = 0, sum_sq = 0;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t o = 0; o < N; ++o) {
      int64_t e = 0;
      for (int64_t i = 0; i < K; ++i) e += static_cast<int64_t>(a[r * K + i]) * w[o * K + i];
      sum_sq += static_cast<double>(e) * e;
      const double diff = std::fabs(static_cast<double>(c[r * N + o] - e));
      if (diff > 0) ++differ, worst = std::max(worst, diff);
    }
  const double rms = std::sqrt(sum_sq / static_cast<double>(M * N));
  std::printf("%5ldx%5ldx%5ld  s8 x s8 -> s32 (%s): %ld of %ld outputs differ from the exact sums (%.1f %%); "
              "worst difference %.2f x the outputs' rms\n",
              static_cast<long>(M), static_cast<long>(N), static_cast<long>(K), pd.impl_info_str(),
              static_cast<long>(differ), static_cast<long>(M * N), 100.0 * differ / (M * N), worst / rms);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) threads = std::max(1, std::atoi(argv[++i]));
    else if (a == "--quick") g_trials = 1, g_min_s = 0.02;
    else {
      std::fprintf(stderr, "usage: bench_onednn [--threads N] [--quick]\n");
      return 2;
    }
  }
  par::set_threads(threads);
  omp_set_num_threads(threads);  // oneDNN's threads (Debian builds it with OpenMP)
  const dnnl_version_t* v = dnnl_version();
  std::printf("bench_onednn: %d threads, engine kernels %s, oneDNN %d.%d.%d (cpu runtime %s, isa %s)\n", threads,
              kern::isa_name(), v->major, v->minor, v->patch, v->cpu_runtime == DNNL_RUNTIME_OMP ? "OpenMP" : "other",
              [] {
                switch (dnnl::get_effective_cpu_isa()) {
                  case dnnl::cpu_isa::avx2: return "avx2";
                  case dnnl::cpu_isa::avx2_vnni: return "avx2_vnni";
                  case dnnl::cpu_isa::avx512_core: return "avx512_core";
                  case dnnl::cpu_isa::avx512_core_vnni: return "avx512_core_vnni";
                  case dnnl::cpu_isa::avx512_core_bf16: return "avx512_core_bf16";
                  case dnnl::cpu_isa::avx512_core_amx: return "avx512_core_amx";
                  default: return "other";
                }
              }());
  const auto sgemm = machine::sgemm_survey(g_trials, g_min_s);
  const double peak = machine::best_flops(sgemm), int8_peak = machine::int8_dot_peak(g_trials + 2, g_min_s / 2);
  std::printf("ceilings (same run): sgemm peak %.1f GFLOP/s, int8 dot-product peak %.1f GOP/s\n\n", peak / 1e9,
              int8_peak / 1e9);

  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream s(eng);
  const int64_t shapes[][3] = {{257, 1408, 1408}, {257, 4224, 1408}, {257, 6144, 1408}, {257, 1408, 6144}};
  std::printf("== rate, GOP/s (%% of the sgemm peak for float, of the int8 peak for int8)\n");
  std::printf("%-18s %-14s %-14s %-14s %-14s %-14s %-14s %-14s\n", "M x N x K", "engine f32", "oneDNN f32",
              "engine bf16", "oneDNN bf16", "engine int8", "oneDNN s8s8", "oneDNN u8s8");
  std::vector<std::string> impls;
  for (const auto& sh : shapes) {
    const int64_t M = sh[0], N = sh[1], K = sh[2];
    std::printf("%5ldx%5ldx%5ld ", static_cast<long>(M), static_cast<long>(N), static_cast<long>(K));
    const auto cell = [](double rate, double ceiling) {
      if (rate <= 0) return std::printf(" %-14s", "unsupported");
      return std::printf(" %6.1f (%3.0f%%)", rate / 1e9, 100.0 * rate / ceiling);
    };
    std::string impl;
    cell(engine_rate(M, N, K, DType::F32), peak);
    cell(onednn_rate(eng, s, M, N, K, dt::f32, dt::f32, impl), peak);
    impls.push_back("f32: " + impl);
    cell(engine_rate(M, N, K, DType::BF16), peak);
    cell(onednn_rate(eng, s, M, N, K, dt::bf16, dt::bf16, impl), peak);
    impls.push_back("bf16: " + impl);
    cell(engine_rate(M, N, K, DType::I8), int8_peak);
    cell(onednn_rate(eng, s, M, N, K, dt::s8, dt::s8, impl), int8_peak);
    impls.push_back("s8s8: " + impl);
    cell(onednn_rate(eng, s, M, N, K, dt::u8, dt::s8, impl), int8_peak);
    impls.push_back("u8s8: " + impl);
    std::printf("\n");
  }
  std::sort(impls.begin(), impls.end());
  impls.erase(std::unique(impls.begin(), impls.end()), impls.end());
  std::printf("oneDNN implementations:");
  for (const auto& i : impls) std::printf(" [%s]", i.c_str());
  std::printf("\n\n== exactness of oneDNN's int8 product (the engine's integer sums are exact)\n");
  exactness(eng, s, 257, 1408, 1408);
  return 0;
}
