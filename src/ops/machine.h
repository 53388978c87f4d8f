// The machine's ceilings, measured in-process with the engine's own thread pool: the read bandwidth that
// bounds decoding (weights streamed once per step) and the single-precision matrix-product rate (OpenBLAS
// sgemm, the many-row path) that bounds the vision encoder. `blip2 bench` and `bench_kernels` measure them
// in the same run as what they compare with them.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ops/dot_loop.h"

namespace blip2::machine {

// Best over `trials` of the mean time of fn(k) over enough calls to take at least `min_s` seconds (k counts
// the calls, so that fn can rotate through copies of its data). One untimed warm-up call first.
double time_best(const std::function<void(int)>& fn, int trials = 5, double min_s = 0.15);

// Seconds for one read of every word of `buf`, summed by all pool threads (AVX2 where the CPU has it, so that
// the loop is never the limit).
double stream_seconds(const std::vector<uint64_t>& buf);

// Read bandwidth in bytes/s: a buffer of `bytes` (much larger than the last-level cache) summed by all pool
// threads, best of `trials`. The buffer is freed before returning.
double read_bandwidth(size_t bytes = size_t(1) << 30, int trials = 5);

// OpenBLAS sgemm rate in FLOP/s for y[M,N] = x[M,K]·w[N,K]ᵀ (the layout ops::linear uses), best of `trials`.
double sgemm_flops(int64_t m, int64_t n, int64_t k, int trials = 3, double min_s = 0.3);

struct SgemmShape {
  int64_t m, n, k;
  double flops;  // measured FLOP/s
};
// sgemm on the ViT-g's product shapes (257 tokens × 1408 wide: qkv, projection, fc1, fc2) and 1024³; the
// matrix-multiply peak is the best of them.
std::vector<SgemmShape> sgemm_survey(int trials = 3, double min_s = 0.3);
double best_flops(const std::vector<SgemmShape>& shapes);

// The int8 dot-product peak in operations/s (2 per multiply-add, like FLOP/s): the integer kernels' own
// instructions (vpdpbusd where the CPU has AVX-512 VNNI, else vpmaddubsw + vpmaddwd) in a register-only
// loop on every pool thread, best of `trials`. What products on int8/int4 weights with many rows can reach.
// loop: Sign and Int16 are AVX2's two routes to exact int8 × int8 without VNNI (ops/dot_loop.h;
// bench_kernels reports them beside the peak); elsewhere the same as Peak.
double int8_dot_peak(int trials = 5, double min_s = 0.15, kern::DotLoop loop = kern::DotLoop::Peak);

// n values drawn from N(0, scale²), the same for the same seed: the data of the measured products.
std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f);

// The CPU's model name from /proc/cpuinfo ("" when unknown).
std::string cpu_name();

}  // namespace blip2::machine
