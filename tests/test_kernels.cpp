// The compute kernels (src/ops/kernels.h, ops.h) against straightforward double-precision references, on
// random data of awkward sizes, for every weight format and for both the AVX2 path and the scalar fallback;
// then every weight format end to end on the fixture model against the float32 reference.
//
// Tolerances. Every product is checked against the exact (double) product of the ORIGINAL float32 weights
// and activations, with a bound derived from the format's definition, element by element:
//   F32    |Δw| = 0
//   F16    |Δw| ≤ 2^-11 |w| (round to nearest; our test weights are in the normal range)
//   BF16   |Δw| ≤ 2^-8 |w|
//   I8     |Δw| ≤ s_w / 2 with s_w = max|w| over the row / 127
//   I4     |Δw| ≤ |d| with |d| = max|w| over the group / 8 (rounding gives |d|/2; the one clamp, +8 → +7,
//          gives |d|; the half-precision scale adds 2^-11 |w|)
//   activations of I8/I4 products: |Δx| ≤ s_x / 2 with s_x = max|x| over the
//          activation block / 127
// so |y − y_exact| ≤ Σ_i (|Δw_i| |x_i| + |w_i| |Δx_i| + |Δw_i| |Δx_i|) + float rounding, the latter taken as
// 2e-5 · Σ_i |w_i x_i| (float32 accumulation). The AVX2 and scalar paths must agree within the rounding term
// alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <fstream>
#include <map>
#include <optional>
#include <nlohmann/json.hpp>
#include <random>
#include <cstring>
#include <set>

#include "core/error.h"
#include "generate/generate.h"
#include "image/image.h"
#include "io/safetensors.h"
#include "model/blip2.h"
#include "support.h"
#include "ops/kernels.h"
#include "ops/ops.h"
#include "ops/parallel.h"

using namespace blip2;

namespace {

// ---- helpers ----------------------------------------------------------------------------------------------

struct Fmt {
  const char* name;
  DType dtype;
  int group;
};
const Fmt kFormats[] = {{"f32", DType::F32, 0},     {"f16", DType::F16, 0},     {"bf16", DType::BF16, 0},
                        {"int8", DType::I8, 0},     {"int4g32", DType::I4, 32}, {"int4g64", DType::I4, 64},
                        {"int4g128", DType::I4, 128}};

std::vector<float> random_vec(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  // A few outliers, as real activations and weights have.
  std::uniform_int_distribution<size_t> pick(0, n - 1);
  for (size_t i = 0; i < n / 50; ++i) v[pick(g)] *= 8.0f;
  return v;
}

// Runs fn once on the AVX2 path (where the CPU has it) and once on the scalar fallback.
template <typename F>
void for_each_isa(F&& fn) {
  if (kern::cpu_has_avx2()) {
    kern::force_scalar(false);
    fn("avx2");
  }
  kern::force_scalar(true);
  fn("scalar");
  kern::force_scalar(false);
}

// Per-element a-priori bound |Δw| of the format (see the file comment).
std::vector<double> weight_error_bound(const std::vector<float>& w, int64_t rows, int64_t cols, const Fmt& f) {
  std::vector<double> b(w.size(), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* wr = w.data() + r * cols;
    double rmax = 0;
    for (int64_t i = 0; i < cols; ++i) rmax = std::max(rmax, std::fabs(static_cast<double>(wr[i])));
    for (int64_t i = 0; i < cols; ++i) {
      double& e = b[r * cols + i];
      const double a = std::fabs(static_cast<double>(wr[i]));
      switch (f.dtype) {
        case DType::F32: e = 0; break;
        case DType::F16: e = a * std::ldexp(1.0, -11); break;
        case DType::BF16: e = a * std::ldexp(1.0, -8); break;
        case DType::I8: e = rmax / 127.0 / 2.0 * (1 + 1e-6); break;
        case DType::I4: {
          const int64_t g0 = i / f.group * f.group;
          double gmax = 0;
          for (int64_t k = g0; k < std::min(cols, g0 + f.group); ++k)
            gmax = std::max(gmax, std::fabs(static_cast<double>(wr[k])));
          e = gmax / 8.0 * (1 + std::ldexp(1.0, -10)) + a * std::ldexp(1.0, -10);
          break;
        }
      }
    }
  }
  return b;
}

// |Δx| bound of the activation quantization (blocks of `block`), or zeros when activations stay float.
std::vector<double> act_error_bound(const std::vector<float>& x, int64_t rows, int64_t cols, int block) {
  std::vector<double> b(x.size(), 0.0);
  if (block == 0) return b;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b0 = 0; b0 < cols; b0 += block) {
      double m = 0;
      for (int64_t i = b0; i < std::min(cols, b0 + block); ++i) m = std::max(m, std::fabs(static_cast<double>(x[r * cols + i])));
      for (int64_t i = b0; i < std::min(cols, b0 + block); ++i) b[r * cols + i] = m / 127.0 / 2.0 * (1 + 1e-6);
    }
  return b;
}

// ---- the thread pool ------------------------------------------------------------------------------------

TEST(ThreadPool, CoversEveryIndexOnceForAnyShape) {
  for (int threads : {1, 2, 3, 5}) {
    par::set_threads(threads);
    EXPECT_EQ(par::threads(), threads);
    for (int64_t n : {1, 2, 7, 64, 1000, 100003})
      for (int64_t min_chunk : {1, 16, 5000})
        for (int64_t align : {1, 4, 16}) {
          std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
          std::atomic<int> calls{0};
          par::parallel_for(n, [&](int64_t b, int64_t e) {
            ++calls;
            EXPECT_LT(b, e);
            EXPECT_EQ(b % align, 0);
            if (e != n && e - b < min_chunk) ADD_FAILURE() << "chunk below min_chunk";
            for (int64_t i = b; i < e; ++i) ++hits[i];
          }, min_chunk, align);
          for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n " << n << " i " << i;
          EXPECT_LE(calls.load(), std::max<int64_t>(1, n / min_chunk));
        }
  }
  par::set_threads(0);
}

// Jobs that take different numbers of threads, back to back, on more threads than cores: a worker left out
// of one job can wake only as the next is set up. It once paired the old job's generation with the new job's
// thread count, ran the new job twice and counted itself done twice, so that a caller returned while its
// task still ran (hits below) or waited forever (this test's timeout); it showed as a rare hang of the test
// above under load.
TEST(ThreadPool, JobsOfDifferentWidthsEachRunOnce) {
  par::set_threads(5);
  for (int rep = 0; rep < 2000; ++rep) {
    const int64_t n = 1 + rep % 5;  // one chunk per thread: 1 to 5 threads take part
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    par::parallel_for(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) ++hits[i];
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "job " << rep << " index " << i;
  }
  par::set_threads(0);
}

TEST(ThreadPool, NestedCallsRunSeriallyAndManyJobsDoNotLoseWakeups) {
  par::set_threads(2);
  std::atomic<int64_t> total{0};
  for (int rep = 0; rep < 20000; ++rep)  // a lost wake-up would hang here
    par::parallel_for(4, [&](int64_t b, int64_t e) {
      par::parallel_for(10, [&](int64_t b2, int64_t e2) { total += (e - b) * (e2 - b2); });
    });
  EXPECT_EQ(total.load(), 20000 * 40);
  par::set_threads(0);
}

// ---- conversion at load -----------------------------------------------------------------------------------

TEST(Convert, EveryFormatStaysWithinItsErrorBoundAndPadsWithZeros) {
  for (int64_t cols : {1, 31, 64, 100, 257}) {
    const int64_t rows = 13;
    const auto v = random_vec(static_cast<size_t>(rows * cols), 3, 0.05f);
    const Weight w32 = f32_weight(v, rows, cols);
    for (const Fmt& f : kFormats) {
      const Weight w = kern::convert(w32, f.dtype, f.group == 0 ? 64 : f.group);
      ASSERT_EQ(w.dtype, f.dtype);
      ASSERT_EQ(w.shape, w32.shape);
      const auto bound = weight_error_bound(v, rows, cols, f);
      const std::vector<float> back = w.f32();
      for (size_t i = 0; i < v.size(); ++i)
        ASSERT_LE(std::fabs(static_cast<double>(back[i]) - v[i]), bound[i] + 1e-30) << f.name << " cols " << cols << " i " << i;
      if (f.dtype == DType::I8) {
        ASSERT_EQ(w.ld % 32, 0);
        const auto* q = static_cast<const int8_t*>(w.data);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t i = 0; i < w.ld; ++i) {
            ASSERT_GE(q[r * w.ld + i], -127);
            if (i >= cols) {
              ASSERT_EQ(q[r * w.ld + i], 0);
            }
          }
      }
      if (f.dtype == DType::I4) {
        ASSERT_EQ(w.ld % std::max(64, f.group), 0);
        const auto* q = static_cast<const uint8_t*>(w.data);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = cols; k < w.ld; ++k) {  // padding is q = 0, stored as nibble 8
            const uint8_t byte = q[r * (w.ld / 2) + (k / 64) * 32 + (k % 32)];
            ASSERT_EQ(((k % 64) < 32 ? (byte & 15) : (byte >> 4)), 8);
          }
      }
    }
  }
}

TEST(Convert, Avx2AndScalarGiveIdenticalBytes) {
  for (int64_t cols : {1, 31, 64, 100, 257, 1000}) {
    const int64_t rows = 5;
    auto v = random_vec(static_cast<size_t>(rows * cols), 17, 0.05f);
    v[0] = -v[1];  // ties in magnitude: the first one sets the int4 scale's sign
    const Weight w32 = f32_weight(v, rows, cols);
    for (const Fmt& f : kFormats) {
      std::map<std::string, Weight> got;
      for_each_isa([&](const char* isa) { got[isa] = kern::convert(w32, f.dtype, f.group == 0 ? 64 : f.group); });
      if (got.size() < 2) continue;
      const Weight &a = got["avx2"], &b = got["scalar"];
      const size_t data_bytes = a.quantized() ? (f.dtype == DType::I8 ? rows * a.ld : rows * a.ld / 2) : a.nbytes();
      EXPECT_EQ(std::memcmp(a.data, b.data, data_bytes), 0) << f.name << " cols " << cols;
      if (a.quantized()) {
        const size_t sb = f.dtype == DType::I8 ? rows * 4 : rows * (a.ld / f.group) * 2;
        EXPECT_EQ(std::memcmp(a.scales, b.scales, sb), 0) << f.name << " cols " << cols;
      }
    }
  }
}

TEST(Convert, WideningHalfToF32IsExact) {
  const auto v = random_vec(40 * 24, 5);
  const Weight w32 = f32_weight(v, 40, 24);
  for (DType half : {DType::F16, DType::BF16}) {
    const Weight h = kern::convert(w32, half);
    const Weight back = kern::convert(h, DType::F32);
    ASSERT_EQ(back.dtype, DType::F32);
    EXPECT_EQ(back.f32(), h.f32());
    EXPECT_NE(back.data, h.data);
  }
}

TEST(Convert, DequantizeRowsAgreesBetweenAvx2AndScalar) {
  const auto v = random_vec(9 * 300, 8, 0.1f);
  const Weight w32 = f32_weight(v, 9, 300);
  for (const Fmt& f : kFormats) {
    const Weight w = kern::convert(w32, f.dtype, f.group == 0 ? 64 : f.group);
    std::map<std::string, std::vector<float>> got;
    for_each_isa([&](const char* isa) {
      std::vector<float> out(7 * 310, -1.0f);
      kern::dequant_rows(w, 2, 7, out.data(), 310);
      got[isa] = out;
    });
    for (const auto& [isa, out] : got) EXPECT_EQ(out, got["scalar"]) << f.name << " " << isa;
    std::vector<float> ref(7 * 300);
    w.to_f32(2 * 300, 7 * 300, ref.data());
    for (int r = 0; r < 7; ++r)
      for (int i = 0; i < 300; ++i) ASSERT_EQ(got["scalar"][r * 310 + i], ref[r * 300 + i]) << f.name;
  }
}

// ---- activation quantization --------------------------------------------------------------------------------

TEST(QuantizeRows, IdenticalOnBothPathsAndWithinHalfAStep) {
  for (int64_t cols : {1, 33, 128, 1000}) {
    for (int block : {32, 64, 128}) {
      const int64_t ld = (cols + 127) / 128 * 128, rows = 3;
      const auto x = random_vec(static_cast<size_t>(rows * cols), 9);
      std::map<std::string, kern::QuantRows> got;
      for_each_isa([&](const char* isa) {
        kern::QuantRows q;
        q.resize(rows, ld, block);
        kern::quantize_rows(x.data(), rows, cols, cols, q);
        got[isa] = q;
      });
      const kern::QuantRows& q = got["scalar"];
      for (const auto& [isa, o] : got) {
        EXPECT_EQ(o.q, q.q) << isa;
        EXPECT_EQ(o.scale, q.scale) << isa;
        EXPECT_EQ(o.sum, q.sum) << isa;
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < ld; ++i) {
          const float s = q.scale[r * (ld / block) + i / block];
          const float want = i < cols ? x[r * cols + i] : 0.0f;
          ASSERT_LE(std::fabs(q.q[r * ld + i] * s - want), s * 0.5f * (1 + 1e-5f) + 1e-30f);
          ASSERT_GE(q.q[r * ld + i], -127);
        }
    }
  }
}

// ---- products ---------------------------------------------------------------------------------------------

struct ProductError {
  double worst = 0;  // max over outputs of |err| / (bound + rounding)
};

// ops::linear for every format, size and path: float weights through the matrix-vector kernels up to 8 rows
// and BLAS beyond, quantized weights through the integer kernels at every row count.
TEST(Linear, EveryFormatWithinItsDerivedBoundOnBothPaths) {
  const int64_t outs[] = {1, 7, 33, 130};
  const int64_t ins[] = {1, 31, 64, 100, 257, 1000};
  const int row_counts[] = {1, 2, 3, 5, 8, 17, 40};
  std::map<std::string, double> worst;  // format → max ratio err / allowed
  for (int64_t out : outs)
    for (int64_t in : ins) {
      const auto wv = random_vec(static_cast<size_t>(out * in), static_cast<uint32_t>(out * 1000 + in), 0.05f);
      const Weight w32 = f32_weight(wv, out, in);
      for (const Fmt& f : kFormats) {
        const Weight w = kern::convert(w32, f.dtype, f.group == 0 ? 64 : f.group);
        const auto dw = weight_error_bound(wv, out, in, f);
        for (int R : row_counts) {
          const auto x = random_vec(static_cast<size_t>(R * in), static_cast<uint32_t>(R + 77 * in));
          const int block = w.quantized() ? kern::act_block(w) : 0;
          const auto dx = act_error_bound(x, R, in, block);
          std::map<std::string, std::vector<float>> ys;
          for_each_isa([&](const char* isa) {
            std::vector<float> y(static_cast<size_t>(R * out), NAN);
            ops::linear(x.data(), R, w, Weight{}, y.data());
            ys[isa] = y;
          });
          for (int r = 0; r < R; ++r)
            for (int64_t o = 0; o < out; ++o) {
              double exact = 0, bound = 0, mag = 0;
              for (int64_t i = 0; i < in; ++i) {
                const double wi = wv[o * in + i], xi = x[r * in + i];
                exact += wi * xi;
                mag += std::fabs(wi * xi);
                bound += dw[o * in + i] * std::fabs(xi) + std::fabs(wi) * dx[r * in + i] + dw[o * in + i] * dx[r * in + i];
              }
              const double round = 2e-5 * (mag + bound) + 1e-30;
              for (const auto& [isa, y] : ys) {
                const double err = std::fabs(y[r * out + o] - exact);
                ASSERT_LE(err, bound + round) << f.name << " " << isa << " out " << out << " in " << in << " rows " << R
                                              << " r " << r << " o " << o;
                worst[f.name] = std::max(worst[f.name], err / (bound + round));
              }
              if (ys.size() == 2) {
                ASSERT_LE(std::fabs(ys["avx2"][r * out + o] - ys["scalar"][r * out + o]), round)
                    << f.name << " avx2 vs scalar, out " << out << " in " << in << " rows " << R;
              }
            }
        }
      }
    }
  for (const auto& [name, v] : worst) std::printf("  %-9s worst error / allowed: %.3f\n", name.c_str(), v);
}

// ops::product_counters: each linear() and attention() call adds its operations (2 per multiply-add; attention
// both products over every key) and the time inside it, each to its own counter.
TEST(Linear, ProductCountersCountEachCallsOperationsAndTime) {
  const int64_t out = 40, in = 64, rows = 9;
  const auto wv = random_vec(static_cast<size_t>(out * in), 31);
  const Weight w = f32_weight(wv, out, in);  // a view of wv
  const auto x = random_vec(static_cast<size_t>(rows * in), 32);
  std::vector<float> y(static_cast<size_t>(rows * out));
  const ops::ProductCounters before = ops::product_counters();
  ops::linear(x.data(), rows, w, Weight{}, y.data());
  const ops::ProductCounters after_linear = ops::product_counters(), linear = after_linear - before;
  EXPECT_EQ(linear.linear_ops, 2 * rows * in * out);
  EXPECT_EQ(linear.attention_ops, 0);
  EXPECT_GT(linear.linear_seconds, 0.0);
  EXPECT_EQ(linear.attention_seconds, 0.0);

  const int heads = 2, hd = 8;
  const int64_t tq = 5, tk = 7;
  const auto q = random_vec(static_cast<size_t>(tq * heads * hd), 33), k = random_vec(static_cast<size_t>(tk * heads * hd), 34);
  std::vector<float> o(static_cast<size_t>(tq * heads * hd));
  ops::attention({.q = q.data(), .ldq = heads * hd, .tq = tq, .k = k.data(), .ldk = heads * hd, .v = k.data(),
                  .ldv = heads * hd, .tk = tk, .heads = heads, .head_dim = hd, .scale = 0.5f, .out = o.data(),
                  .ldo = heads * hd});
  const ops::ProductCounters attention = ops::product_counters() - after_linear;
  EXPECT_EQ(attention.attention_ops, 4 * heads * tq * tk * hd);
  EXPECT_EQ(attention.linear_ops, 0);
  EXPECT_GT(attention.attention_seconds, 0.0);
  EXPECT_EQ(attention.ops(), attention.attention_ops);
}

// The integer products take rows in tiles (ops.h): any tiling gives the same bits, since each output is one
// kernel's sum over the whole row either way. 16-row tiles (the smallest) against one tile for all rows.
TEST(Linear, QuantizedRowTilesGiveIdenticalResults) {
  const int64_t out = 45, in = 300, rows = 57;
  const auto wv = random_vec(static_cast<size_t>(out * in), 12, 0.05f);
  const auto x = random_vec(static_cast<size_t>(rows * in), 13);
  for (const Fmt& f : kFormats) {
    if (f.dtype != DType::I8 && f.dtype != DType::I4) continue;
    const Weight w = kern::convert(f32_weight(wv, out, in), f.dtype, f.group == 0 ? 64 : f.group);
    for_each_isa([&](const char* isa) {
      std::vector<float> whole(static_cast<size_t>(rows * out)), tiled(whole.size());
      ops::set_quant_tile_bytes(int64_t{1} << 30);
      ops::linear(x.data(), rows, w, Weight{}, whole.data());
      ops::set_quant_tile_bytes(1);
      ops::linear(x.data(), rows, w, Weight{}, tiled.data());
      ops::set_quant_tile_bytes(0);
      EXPECT_EQ(whole, tiled) << f.name << " " << isa;
    });
  }
}

// A row's integer product is the same bits alone or in a batch of any size, though a batch of more than 5 rows
// goes through other kernels (I8 on AVX2: the packed 16-channel tiles, with the channels that do not fill one
// in the row tiles): every kernel adds each activation block's exact int32 sum into the output with the same
// float operations in the same order (kernels_avx2.cpp). For I8 the AVX2 and scalar paths also agree bit for
// bit. 53 channels: three packed groups and a tail; 384 inputs: three 128-input activation blocks, or one.
// The rows' outlier columns (added inside the products) are part of it.
TEST(Linear, QuantizedRowsGiveTheSameBitsAloneAndInABatch) {
  const int64_t out = 53, in = 384, most = 40;
  const auto wv = random_vec(static_cast<size_t>(out * in), 31, 0.05f);
  const auto x = random_vec(static_cast<size_t>(most * in), 32);
  std::vector<int32_t> found(static_cast<size_t>(most * kern::kMaxOutlierColumns));
  std::vector<int> counts(static_cast<size_t>(most));
  ASSERT_GT(kern::outlier_columns(x.data(), most, in, in, kern::kMaxOutlierColumns, found.data(), counts.data()), most / 2);
  for (const Fmt& f : kFormats) {
    if (f.dtype != DType::I8 && f.dtype != DType::I4) continue;
    const Weight w = kern::convert(f32_weight(wv, out, in), f.dtype, f.group == 0 ? 64 : f.group);
    for (int block : {kern::kI8ActBlock, 0}) {
      kern::set_i8_act_block(block);
      std::vector<std::vector<float>> alone_per_isa;
      for_each_isa([&](const char* isa) {
        std::vector<float> alone(static_cast<size_t>(most * out));
        for (int64_t r = 0; r < most; ++r) ops::linear(x.data() + r * in, 1, w, Weight{}, alone.data() + r * out);
        for (int64_t rows : {int64_t{2}, int64_t{5}, int64_t{6}, int64_t{7}, int64_t{9}, most}) {
          std::vector<float> batch(static_cast<size_t>(rows * out));
          ops::linear(x.data(), rows, w, Weight{}, batch.data());
          for (int64_t i = 0; i < rows * out; ++i)
            ASSERT_EQ(batch[i], alone[i]) << f.name << " " << isa << " block " << block << " rows " << rows
                                          << " row " << i / out << " channel " << i % out;
        }
        alone_per_isa.push_back(std::move(alone));
      });
      if (f.dtype == DType::I8 && alone_per_isa.size() == 2) {
        EXPECT_EQ(alone_per_isa[0], alone_per_isa[1]) << block;
      }
    }
    kern::set_i8_act_block(kern::kI8ActBlock);
  }
}

// Outlier input columns (issue 14, kern::outlier_columns): a few columns 50x the rest are found, taken out of
// the integer product and added in float, so the product's error against the dequantized weights comes
// back to what the same rows without outliers give, on both paths, for decoding and prefill row counts; with
// the decomposition off (the products before issue 14) it is many times larger.
// ‖ops::linear(x, w) − x · exact^T‖ / ‖x · exact^T‖ over rows × out, the exact product in double.
double linear_rel_error(const std::vector<float>& x, int64_t rows, const Weight& w, const std::vector<float>& exact) {
  const int64_t out = w.rows(), in = w.cols();
  std::vector<float> y(static_cast<size_t>(rows * out));
  ops::linear(x.data(), rows, w, Weight{}, y.data());
  double num = 0, den = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double e = 0;
      for (int64_t i = 0; i < in; ++i) e += static_cast<double>(x[r * in + i]) * exact[o * in + i];
      num += (y[r * out + o] - e) * (y[r * out + o] - e);
      den += e * e;
    }
  return std::sqrt(num / den);
}

// x [rows, in] with the planted columns set to ±50 (keeping each value's sign).
std::vector<float> with_planted(std::vector<float> x, int64_t rows, int64_t in, const std::vector<int32_t>& planted) {
  for (int64_t r = 0; r < rows; ++r)
    for (int32_t c : planted) x[r * in + c] = x[r * in + c] < 0 ? -50.0f : 50.0f;
  return x;
}

TEST(Linear, OutlierColumnsAreAddedInFloat) {
  const int64_t out = 70, in = 512;
  const std::vector<int32_t> planted = {5, 130, 131, 400};
  std::mt19937 g(21);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> wv(static_cast<size_t>(out * in));
  for (auto& v : wv) v = 0.05f * nd(g);
  for (int64_t rows : {1, 3, 40}) {
    std::vector<float> clean(static_cast<size_t>(rows * in));
    for (auto& v : clean) v = nd(g);
    const std::vector<float> x = with_planted(clean, rows, in, planted);
    std::vector<int32_t> found(static_cast<size_t>(rows * 8));
    std::vector<int> counts(static_cast<size_t>(rows));
    ASSERT_EQ(kern::outlier_columns(x.data(), rows, in, in, 8, found.data(), counts.data()), 4 * rows) << rows;
    for (int64_t r = 0; r < rows; ++r) {
      ASSERT_EQ(counts[r], 4) << rows;
      EXPECT_EQ(std::vector<int32_t>(found.begin() + r * 8, found.begin() + r * 8 + 4), planted) << rows;
    }
    EXPECT_EQ(kern::outlier_columns(clean.data(), rows, in, in, 8, found.data(), counts.data()), 0) << rows;
    EXPECT_EQ(kern::outlier_columns(x.data(), rows, in, in, 2, found.data(), counts.data()), 2 * rows) << rows;  // the cap
    for (const Fmt& f : kFormats) {
      if (f.dtype != DType::I8 && f.dtype != DType::I4) continue;
      const Weight w = kern::convert(f32_weight(wv, out, in), f.dtype, f.group);
      std::vector<float> wd(wv.size());
      kern::dequant_rows(w, 0, out, wd.data(), in);
      // Relative error against the exact product with the dequantized weights (only activations rounded).
      const auto rel = [&](const std::vector<float>& xs) { return linear_rel_error(xs, rows, w, wd); };
      for_each_isa([&](const char* isa) {
        const double e_clean = rel(clean), e_on = rel(x);
        kern::set_max_outlier_columns(0);
        const double e_off = rel(x);
        kern::set_max_outlier_columns(kern::kMaxOutlierColumns);
        std::printf("  %-8s %-6s rows %2lld: rel error clean %.2e, outliers %.2e (decomposition off: %.2e)\n", f.name,
                    isa, static_cast<long long>(rows), e_clean, e_on, e_off);
        // The outlier columns dominate |y| with their exact float part, so the relative error drops below
        // the clean rows'; without the decomposition it is several times above it.
        EXPECT_LE(e_on, 1.2 * e_clean) << f.name << " " << isa << " rows " << rows;
        EXPECT_GE(e_off, 3.0 * e_on) << f.name << " " << isa << " rows " << rows;
      });
    }
  }
}

// Each row's outlier columns are its own: a row's product is bit for bit the same whether its batch-mates
// have outliers in other columns or none (batch invariance, which continuous batching and the server rely
// on; the same rows go through the same kernels either way).
TEST(Linear, OutlierColumnsDoNotCrossRows) {
  const int64_t out = 64, in = 256;
  std::mt19937 g(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> wv(static_cast<size_t>(out * in));
  for (auto& v : wv) v = 0.05f * nd(g);
  for (int64_t rows : {2, 9}) {  // the decoding kernels (up to 5 rows) and the many-row ones
    std::vector<float> clean(static_cast<size_t>(rows * in));
    for (auto& v : clean) v = nd(g);
    std::vector<float> x = clean;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 3 + 11 * r; c < in; c += 37) x[r * in + c] = 45.0f;  // each row: its own columns
    for (const Fmt& f : kFormats) {
      if (f.dtype != DType::I8 && f.dtype != DType::I4) continue;
      const Weight w = kern::convert(f32_weight(wv, out, in), f.dtype, f.group);
      for_each_isa([&](const char* isa) {
        std::vector<float> all(static_cast<size_t>(rows * out)), alone(all.size());
        ops::linear(x.data(), rows, w, Weight{}, all.data());
        for (int64_t r : {int64_t{0}, rows - 1}) {
          std::vector<float> x1 = clean;  // row r as in x, the others without their outliers
          std::copy(x.begin() + r * in, x.begin() + (r + 1) * in, x1.begin() + r * in);
          ops::linear(x1.data(), rows, w, Weight{}, alone.data());
          for (int64_t o = 0; o < out; ++o)
            ASSERT_EQ(alone[r * out + o], all[r * out + o]) << f.name << " " << isa << " rows " << rows << " row " << r;
        }
      });
    }
  }
}

// Float columns (issue 14): the loader's chosen input columns keep their weights in float. The weight holds
// them exactly (to_f32, dequant_rows), its other elements are what converting without those columns gives,
// and the product's error against the exact float product drops below the run-time decomposition's (which
// leaves each outlier column's weight rounding, ×50) to the clean rows' level. A copy to emulated device
// memory keeps the columns, and folding them back (for a GPU) rounds them like the other int8 elements.
TEST(Linear, FloatColumnsKeepTheirWeightsExact) {
  const int64_t out = 70, in = 512;
  const std::vector<int32_t> planted = {5, 130, 131, 400};
  std::mt19937 g(23);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> wv(static_cast<size_t>(out * in));
  for (auto& v : wv) v = 0.05f * nd(g);
  std::vector<float> wz = wv;  // the planted columns zeroed
  for (int64_t o = 0; o < out; ++o)
    for (int32_t c : planted) wz[o * in + c] = 0.0f;
  for (const Fmt& f : kFormats) {
    if (f.dtype != DType::I8 && f.dtype != DType::I4) continue;
    const Weight w = kern::convert(f32_weight(wv, out, in), f.dtype, f.group, planted);
    const Weight plain = kern::convert(f32_weight(wv, out, in), f.dtype, f.group);
    ASSERT_EQ(w.n_float_columns, 4) << f.name;
    EXPECT_EQ(w.nbytes(), plain.nbytes() + 4 * (4 + out * 4)) << f.name;
    const std::vector<float> deq = w.f32(), deq_z = kern::convert(f32_weight(wz, out, in), f.dtype, f.group).f32();
    std::vector<float> rows_deq(wv.size());
    kern::dequant_rows(w, 0, out, rows_deq.data(), in);
    EXPECT_EQ(rows_deq, deq) << f.name;
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) {
        const bool fl = std::binary_search(planted.begin(), planted.end(), static_cast<int32_t>(i));
        ASSERT_EQ(deq[o * in + i], fl ? wv[o * in + i] : deq_z[o * in + i]) << f.name << " " << o << "," << i;
      }
    for (int64_t rows : {1, 3, 40}) {
      std::vector<float> clean(static_cast<size_t>(rows * in));
      for (auto& v : clean) v = nd(g);
      const std::vector<float> x = with_planted(clean, rows, in, planted);
      const auto rel = [&](const Weight& wt, const std::vector<float>& xs) {  // against the float weights
        return linear_rel_error(xs, rows, wt, wv);
      };
      for_each_isa([&](const char* isa) {
        const double e_float = rel(w, x), e_clean = rel(w, clean), e_runtime = rel(plain, x);
        std::printf("  %-8s %-6s rows %2lld: rel error float columns %.2e, clean rows %.2e, run-time columns only %.2e\n",
                    f.name, isa, static_cast<long long>(rows), e_float, e_clean, e_runtime);
        EXPECT_LE(e_float, 1.2 * e_clean) << f.name << " " << isa << " rows " << rows;
        EXPECT_LE(2.0 * e_float, e_runtime) << f.name << " " << isa << " rows " << rows;
      });
    }
    const Weight emulated = w.to(Device::Emulated);
    EXPECT_EQ(emulated.n_float_columns, 4) << f.name;
    EXPECT_EQ(emulated.f32(), deq) << f.name;
  }
  const Weight w8 = kern::convert(f32_weight(wv, out, in), DType::I8, 0, planted);
  const Weight folded = w8.without_float_columns();
  EXPECT_EQ(folded.n_float_columns, 0);
  const std::vector<float> fd = folded.f32(), pd = kern::convert(f32_weight(wz, out, in), DType::I8).f32();
  const auto* scale = static_cast<const float*>(w8.scales);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      const bool fl = std::binary_search(planted.begin(), planted.end(), static_cast<int32_t>(i));
      if (fl) ASSERT_NEAR(fd[o * in + i], wv[o * in + i], 0.5f * scale[o] * 1.0001f) << o << "," << i;
      else ASSERT_EQ(fd[o * in + i], pd[o * in + i]) << o << "," << i;
    }
}

TEST(Linear, FloatColumnsForPicksTheChannelsFarAboveTheMedian) {
  std::vector<float> s(100, 1.0f);
  s[3] = 10.0f;
  s[50] = 7.0f;
  s[60] = 5.9f;  // below 6× the median
  s[70] = std::nanf("");
  EXPECT_EQ(ops::float_columns_for(s), (std::vector<int32_t>{3, 50}));
  EXPECT_EQ(ops::float_columns_for(std::vector<float>(10, 0.0f)), std::vector<int32_t>{});  // no typical size
  EXPECT_EQ(ops::float_columns_for({}), std::vector<int32_t>{});
  for (int j = 0; j < 30; ++j) s[j] = 100.0f + static_cast<float>(j);  // more than the cap: the largest
  std::vector<int32_t> want;
  for (int j = 30 - ops::kMaxFloatColumns; j < 30; ++j) want.push_back(j);
  EXPECT_EQ(ops::float_columns_for(s), want);
  // The estimates: sqrt(gamma^2 + beta^2) after a norm; a product's row norms over its input scales, + |b|.
  const std::vector<float> gamma = {3.0f, 1.0f}, beta = {4.0f, 0.0f}, wv = {1.0f, 2.0f, 0.0f, 1.0f}, b = {0.5f, -1.0f};
  EXPECT_EQ(ops::norm_output_scale(f32_weight(gamma, 1, 2), f32_weight(beta, 1, 2)), (std::vector<float>{5.0f, 1.0f}));
  EXPECT_EQ(ops::product_output_scale(f32_weight(wv, 2, 2), {3.0f, 4.0f}, f32_weight(b, 1, 2)),
            (std::vector<float>{std::sqrt(73.0f) + 0.5f, 4.0f + 1.0f}));
}

// The weight-only int8 alternative kept for the benchmark.
TEST(Linear, Int8WeightOnlyVariantMatchesDequantizedWeights) {
  const int64_t out = 19, in = 77;
  const auto wv = random_vec(static_cast<size_t>(out * in), 4, 0.05f);
  const Weight w = kern::convert(f32_weight(wv, out, in), DType::I8);
  const std::vector<float> deq = w.f32();
  const auto x = random_vec(static_cast<size_t>(5 * in), 6);
  for_each_isa([&](const char* isa) {
    std::vector<float> y(static_cast<size_t>(5 * out));
    kern::gemv_i8_float(x.data(), in, 5, w, 0, out, y.data(), out);
    for (int r = 0; r < 5; ++r)
      for (int64_t o = 0; o < out; ++o) {
        double exact = 0, mag = 0;
        for (int64_t i = 0; i < in; ++i) {
          exact += static_cast<double>(deq[o * in + i]) * x[r * in + i];
          mag += std::fabs(static_cast<double>(deq[o * in + i]) * x[r * in + i]);
        }
        ASSERT_NEAR(y[r * out + o], exact, 2e-5 * mag) << isa;
      }
  });
}

// ---- element-wise -----------------------------------------------------------------------------------------

TEST(Elementwise, GeluExpDotAxpyAgainstDouble) {
  std::vector<float> x(2001);
  for (size_t i = 0; i < x.size(); ++i) x[i] = -10.0f + 20.0f * static_cast<float>(i) / 2000.0f;
  const auto r = random_vec(999, 12, 3.0f);
  x.insert(x.end(), r.begin(), r.end());
  for_each_isa([&](const char* isa) {
    std::vector<float> a = x, b = x;
    kern::gelu_erf(a.data(), static_cast<int64_t>(a.size()));
    kern::gelu_tanh(b.data(), static_cast<int64_t>(b.size()));
    for (size_t i = 0; i < x.size(); ++i) {
      const double v = x[i];
      const double ge = 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
      const double gt = 0.5 * v * (1 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
      // erf by Abramowitz–Stegun 7.1.26 on AVX2: |Δerf| < 1.5e-7, so |Δgelu| < 1e-7·|x| + rounding.
      ASSERT_NEAR(a[i], ge, 3e-7 * std::max(1.0, std::fabs(v))) << isa << " x " << v;
      ASSERT_NEAR(b[i], gt, 1e-6 * std::max(1.0, std::fabs(v))) << isa << " x " << v;
    }
    std::vector<float> e(300);
    for (size_t i = 0; i < e.size(); ++i) e[i] = -100.0f + static_cast<float>(i) / 3.0f;
    e.push_back(-INFINITY);
    const std::vector<float> e0 = e;
    const float sum = kern::exp_sum(e.data(), static_cast<int64_t>(e.size()), 0.5f);
    double want_sum = 0;
    for (size_t i = 0; i < e.size(); ++i) {
      // exp of the float difference the kernel forms (its rounding is not the kernel's error)
      const double want = std::exp(static_cast<double>(e0[i] - 0.5f));
      want_sum += want;
      ASSERT_NEAR(e[i], want, 1e-6 * want + 1e-37) << isa << " x " << e0[i];
    }
    EXPECT_NEAR(sum, want_sum, 1e-6 * want_sum) << isa;
    const auto p = random_vec(1003, 13), q = random_vec(1003, 14);
    for (int64_t n : {0, 1, 7, 8, 17, 1003}) {
      double d = 0, mag = 0;
      for (int64_t i = 0; i < n; ++i) {
        d += static_cast<double>(p[i]) * q[i];
        mag += std::fabs(static_cast<double>(p[i]) * q[i]);
      }
      EXPECT_NEAR(kern::dot(p.data(), q.data(), n), d, 1e-6 * mag + 1e-30) << isa;
      std::vector<float> y(q.begin(), q.begin() + n);
      kern::axpy(0.75f, p.data(), y.data(), n);
      for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(y[i], q[i] + 0.75 * p[i], 1e-6 * (std::fabs(q[i]) + std::fabs(p[i])));
    }
  });
}

// ---- attention and the row operations ----------------------------------------------------------------------

TEST(Attention, BothPathsMatchDoubleWithBiasMaskAndStrides) {
  const int heads = 3, hd = 20;
  for (int64_t tq : {1, 5, 9, 40})
    for (int64_t tk : {1, 7, 9, 50})
      for (bool with_bias : {false, true})
        for (bool with_mask : {false, true}) {
          const int64_t ld = heads * hd + 7;  // strided views, as the ViT's fused qkv
          const auto q = random_vec(static_cast<size_t>(tq * ld), 21), k = random_vec(static_cast<size_t>(tk * ld), 22),
                     v = random_vec(static_cast<size_t>(tk * ld), 23), bias = random_vec(static_cast<size_t>(heads * tq * tk), 24);
          std::vector<uint8_t> mask(static_cast<size_t>(tk), 1);
          if (with_mask)
            for (int64_t j = 0; j < tk; j += 3) mask[j] = 0;
          for_each_isa([&](const char* isa) {
            std::vector<float> out(static_cast<size_t>(tq * (ld + 1)), 7.0f);
            ops::attention({.q = q.data(), .ldq = ld, .tq = tq, .k = k.data(), .ldk = ld, .v = v.data(), .ldv = ld,
                            .tk = tk, .heads = heads, .head_dim = hd, .scale = 0.3f,
                            .bias = with_bias ? bias.data() : nullptr, .key_mask = with_mask ? mask.data() : nullptr,
                            .out = out.data(), .ldo = ld + 1});
            for (int h = 0; h < heads; ++h)
              for (int64_t i = 0; i < tq; ++i) {
                std::vector<double> s(static_cast<size_t>(tk));
                double mx = -INFINITY;
                for (int64_t j = 0; j < tk; ++j) {
                  if (!mask[j]) continue;
                  double d = 0;
                  for (int c = 0; c < hd; ++c) d += static_cast<double>(q[i * ld + h * hd + c]) * k[j * ld + h * hd + c];
                  s[j] = 0.3 * d + (with_bias ? bias[(h * tq + i) * tk + j] : 0.0);
                  mx = std::max(mx, s[j]);
                }
                double z = 0;
                for (int64_t j = 0; j < tk; ++j) z += mask[j] ? std::exp(s[j] - mx) : 0.0;
                for (int c = 0; c < hd; ++c) {
                  double want = 0;
                  if (mx != -INFINITY)
                    for (int64_t j = 0; j < tk; ++j)
                      if (mask[j]) want += std::exp(s[j] - mx) / z * v[j * ld + h * hd + c];
                  ASSERT_NEAR(out[i * (ld + 1) + h * hd + c], want, 2e-5 * 8) << isa << " tq " << tq << " tk " << tk;
                }
              }
            for (int64_t i = 0; i < tq; ++i) ASSERT_EQ(out[i * (ld + 1) + ld], 7.0f);  // untouched padding
          });
        }
}

// Decoding passes every row's problem (its own cache length, mask, bias) in one call; a problem with many
// queries (a prefill) may sit among them. Each problem's output must be the bits of its own call.
TEST(Attention, SeveralProblemsInOneCallGiveEachTheBitsOfItsOwnCall) {
  struct Case {
    int64_t tq, tk;
    int heads, hd;
    bool bias, mask, causal;
  };
  const std::vector<Case> cases = {{1, 1, 4, 16, true, false, false},  {1, 33, 4, 16, false, true, false},
                                   {1, 7, 3, 20, true, false, false},  {3, 12, 2, 8, false, true, true},
                                   {0, 5, 4, 16, false, false, false}, {12, 30, 5, 16, true, true, true},
                                   {1, 64, 1, 16, false, false, true}};
  std::vector<std::vector<float>> q, k, v, bias, alone, together;
  std::vector<std::vector<uint8_t>> mask;
  std::vector<ops::AttentionArgs> problems;
  for (size_t p = 0; p < cases.size(); ++p) {
    const Case& c = cases[p];
    const int64_t ld = c.heads * c.hd + 3;
    const auto seed = static_cast<uint32_t>(40 + 4 * p);
    q.push_back(random_vec(static_cast<size_t>(std::max<int64_t>(c.tq, 1) * ld), seed));
    k.push_back(random_vec(static_cast<size_t>(c.tk * ld), seed + 1));
    v.push_back(random_vec(static_cast<size_t>(c.tk * ld), seed + 2));
    bias.push_back(random_vec(static_cast<size_t>(c.heads * std::max<int64_t>(c.tq, 1) * c.tk), seed + 3));
    mask.emplace_back(static_cast<size_t>(c.tk), 1);
    for (int64_t j = 1; j < c.tk; j += 4) mask.back()[j] = 0;
    alone.emplace_back(static_cast<size_t>(std::max<int64_t>(c.tq, 1) * ld), 5.0f);
    together.push_back(alone.back());
  }
  const auto args = [&](size_t p, std::vector<float>& out) {
    const Case& c = cases[p];
    const int64_t ld = c.heads * c.hd + 3;
    return ops::AttentionArgs{.q = q[p].data(), .ldq = ld, .tq = c.tq, .k = k[p].data(), .ldk = ld, .v = v[p].data(),
                              .ldv = ld, .tk = c.tk, .heads = c.heads, .head_dim = c.hd, .scale = 0.25f,
                              .bias = c.bias ? bias[p].data() : nullptr, .key_mask = c.mask ? mask[p].data() : nullptr,
                              .out = out.data(), .ldo = ld, .causal = c.causal};
  };
  par::set_threads(3);  // heads split between threads inside problems
  for_each_isa([&](const char* isa) {
    problems.clear();
    for (size_t p = 0; p < cases.size(); ++p) {
      ops::attention(args(p, alone[p]));
      problems.push_back(args(p, together[p]));
    }
    ops::attention(problems);
    for (size_t p = 0; p < cases.size(); ++p) {
      ASSERT_EQ(0, std::memcmp(alone[p].data(), together[p].data(), alone[p].size() * sizeof(float)))
          << isa << " problem " << p;
      if (cases[p].tq == 0) EXPECT_EQ(together[p][0], 5.0f) << "no queries: nothing written";
    }
  });
  par::set_threads(0);
}

TEST(RowOps, LargeNormsAndActivationsOnThePoolMatchSerial) {
  // Big enough to be split between threads.
  const int64_t rows = 300, d = 1408;
  const auto x = random_vec(static_cast<size_t>(rows * d), 31, 2.0f);
  const auto gv = random_vec(static_cast<size_t>(d), 32), bv = random_vec(static_cast<size_t>(d), 33);
  Weight g = f32_weight(gv, d, 1), b = f32_weight(bv, d, 1);
  g.shape = {d};
  b.shape = {d};
  Tensor t({rows, d});
  t.data = x;
  Tensor ln = t, rms = t, act = t;
  ops::layer_norm(ln, g, b, 1e-6f);
  ops::rms_norm(rms, g, 1e-6f);
  ops::activate(act, Activation::GeluErf);
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0, var = 0, ss = 0;
    for (int64_t i = 0; i < d; ++i) mean += x[r * d + i];
    mean /= d;
    for (int64_t i = 0; i < d; ++i) {
      var += (x[r * d + i] - mean) * (x[r * d + i] - mean);
      ss += static_cast<double>(x[r * d + i]) * x[r * d + i];
    }
    var /= d;
    for (int64_t i = 0; i < d; ++i) {
      const double l = (x[r * d + i] - mean) / std::sqrt(var + 1e-6) * gv[i] + bv[i];
      const double m = gv[i] * x[r * d + i] / std::sqrt(ss / d + 1e-6);
      ASSERT_NEAR(ln.data[r * d + i], l, 1e-5 * (1 + std::fabs(l)));
      ASSERT_NEAR(rms.data[r * d + i], m, 1e-5 * (1 + std::fabs(m)));
      const double v = x[r * d + i];
      ASSERT_NEAR(act.data[r * d + i], 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))), 3e-7 * std::max(1.0, std::fabs(v)));
    }
  }
}

// ---- which tensors a format converts ------------------------------------------------------------------------

TEST(LoadOptions, ConvertsExactlyTheLinearMatrices) {
  std::ifstream in(std::string(BLIP2_FIXTURES_DIR) + "/tiny-blip2-t5/KEYS.txt");
  std::string name;
  int converted = 0, kept = 0;
  while (std::getline(in, name)) {
    if (name.empty()) continue;
    const bool two_d = name.find("bias") == std::string::npos && name.find("norm") == std::string::npos &&
                       name.find("Norm") == std::string::npos && name != "query_tokens" &&
                       name.find("embeddings.") == std::string::npos;
    const Shape shape = two_d ? Shape{64, 64} : Shape{64};
    const bool c = converts_tensor(name, shape, false);
    const bool want = two_d && name.find("relative_attention_bias") == std::string::npos &&
                      name.find("shared") == std::string::npos && name.find("embed_tokens") == std::string::npos;
    EXPECT_EQ(c, want) << name;
    (c ? converted : kept)++;
  }
  EXPECT_GT(converted, 50);
  EXPECT_TRUE(converts_tensor("language_model.shared.weight", {1152, 64}, true));  // tied head: it is the head
  EXPECT_FALSE(converts_tensor("language_model.shared.weight", {1152, 64}, false));
  EXPECT_FALSE(converts_tensor("vision_model.embeddings.patch_embedding.weight", {64, 3, 14, 14}, false));
}

// The vision encoder's format follows --weights except that int4 means int8 there, unless set on its own.
TEST(LoadOptions, VisionEncoderFormat) {
  const auto wv = random_vec(64 * 64, 21, 0.05f);
  const Weight w = f32_weight(wv, 64, 64);
  const std::string vit = "vision_model.encoder.layers.0.mlp.fc1.weight";
  const std::string lm = "language_model.encoder.block.0.layer.1.DenseReluDense.wo.weight";
  const auto formats = [&](WeightFormat weights, std::optional<WeightFormat> vision) {
    LoadOptions o;
    o.weights = weights;
    o.vision_weights = vision;
    const Checkpoint::Convert convert = weight_converter(o, LanguageFamily::T5, false);
    if (!convert) return std::pair<DType, DType>{w.dtype, w.dtype};
    return std::pair<DType, DType>{convert(vit, w).dtype, convert(lm, w).dtype};
  };
  EXPECT_EQ(formats(WeightFormat::I4, std::nullopt), std::make_pair(DType::I8, DType::I4));
  EXPECT_EQ(formats(WeightFormat::I4, WeightFormat::I4), std::make_pair(DType::I4, DType::I4));
  EXPECT_EQ(formats(WeightFormat::I8, std::nullopt), std::make_pair(DType::I8, DType::I8));
  EXPECT_EQ(formats(WeightFormat::BF16, std::nullopt), std::make_pair(DType::BF16, DType::BF16));
  EXPECT_EQ(formats(WeightFormat::I4, WeightFormat::F16), std::make_pair(DType::F16, DType::I4));
  EXPECT_EQ(formats(WeightFormat::AsStored, WeightFormat::I8), std::make_pair(DType::I8, DType::F32));
  EXPECT_EQ(formats(WeightFormat::AsStored, std::nullopt), std::make_pair(DType::F32, DType::F32));
  LoadOptions bad;
  bad.weights = WeightFormat::I8;
  bad.vision_weights = WeightFormat::I4;
  bad.int4_group = 48;
  EXPECT_THROW(weight_converter(bad, LanguageFamily::T5, false), blip2::Error);
}

// Each tower takes its own format, the precision preset's, or --weights; tensors go by their name's tower.
TEST(LoadOptions, PerTowerFormatsAndTheLavisMix) {
  const auto wv = random_vec(64 * 64, 22, 0.05f);
  const Weight w = f32_weight(wv, 64, 64);
  const std::string vit = "vision_model.encoder.layers.0.mlp.fc1.weight",
                    qformer = "qformer.encoder.layer.0.attention.attention.query.weight",
                    projection = "language_projection.weight",
                    lm = "language_model.encoder.block.0.layer.1.DenseReluDense.wo.weight";
  EXPECT_EQ(tower_of(vit), Tower::Vision);
  EXPECT_EQ(tower_of(qformer), Tower::QFormer);
  EXPECT_EQ(tower_of(projection), Tower::QFormer);
  EXPECT_EQ(tower_of("query_tokens"), Tower::QFormer);
  EXPECT_EQ(tower_of(lm), Tower::Language);
  const auto dtypes = [&](const LoadOptions& o, LanguageFamily family) {
    const Checkpoint::Convert convert = weight_converter(o, family, false);
    if (!convert) return std::vector<DType>(4, w.dtype);
    return std::vector<DType>{convert(vit, w).dtype, convert(qformer, w).dtype, convert(projection, w).dtype,
                              convert(lm, w).dtype};
  };
  LoadOptions o;
  o.weights = WeightFormat::I8;
  o.qformer_weights = WeightFormat::F16;
  o.lm_weights = WeightFormat::I4;
  EXPECT_EQ(dtypes(o, LanguageFamily::T5), (std::vector<DType>{DType::I8, DType::F16, DType::F16, DType::I4}));
  LoadOptions lavis;
  lavis.precision = "lavis";
  EXPECT_EQ(dtypes(lavis, LanguageFamily::T5), (std::vector<DType>{DType::F16, DType::F32, DType::F32, DType::BF16}));
  EXPECT_EQ(dtypes(lavis, LanguageFamily::OPT), (std::vector<DType>{DType::F16, DType::F32, DType::F32, DType::F16}));
  lavis.lm_weights = WeightFormat::I8;  // a tower's own option overrides the mix
  EXPECT_EQ(dtypes(lavis, LanguageFamily::T5), (std::vector<DType>{DType::F16, DType::F32, DType::F32, DType::I8}));
  LoadOptions unknown;
  unknown.precision = "paper";
  EXPECT_THROW(weight_converter(unknown, LanguageFamily::T5, false), blip2::Error);
}

// ---- every weight format on the fixture model ---------------------------------------------------------------

const std::string kFixtures = BLIP2_FIXTURES_DIR;

struct FormatCase {
  const char* name;
  WeightFormat format;
  int group;
  // Relative errors against the float32 reference, worst over the four cases, are printed. The bounds are
  // about twice what was measured (see the table in docs/ARCHITECTURE.md): the fixture is a random, untrained
  // model whose errors grow through every layer, so these are far from what a trained model shows.
  double max_rel_image;   // vision, Q-Former, projection
  double max_rel_text;    // encoder output and logits
  bool greedy_exact;      // every greedy sequence identical to the reference
  std::optional<WeightFormat> vision = std::nullopt;  // LoadOptions::vision_weights
};

class FixtureFormats : public ::testing::TestWithParam<FormatCase> {};

TEST_P(FixtureFormats, StagesAndLogitsStayWithinTheFormatsBound) {
  const FormatCase& fc = GetParam();
  LoadOptions opt;
  opt.weights = fc.format;
  opt.int4_group = fc.group;
  opt.vision_weights = fc.vision;
  const Blip2Model model(BLIP2_TINY_T5_DIR, opt);
  const SafetensorsFile ref(kFixtures + "/tiny-blip2-t5/reference.safetensors");
  std::ifstream jin(kFixtures + "/tiny-blip2-t5/reference.json");
  const auto cases = nlohmann::json::parse(jin)["cases"];
  int tokens = 0, agree = 0, sequences = 0, exact = 0;
  std::map<std::string, double> worst;
  for (const auto& [cname, c] : cases.items()) {
    std::vector<RgbImage> imgs;
    for (const auto& n : c["images"]) imgs.push_back(load_image(kFixtures + "/images/" + n.get<std::string>()));
    const PromptBatch p = model.tokenize(c["prompts"].get<std::vector<std::string>>());
    const Encoded e = model.encode(preprocess_images(imgs, 224), p);
    const auto check = [&](const std::string& stage, const Tensor& got, double bound) {
      const double rel = test::compare(got, ref.tensor(cname + "/" + stage)).rel;
      worst[stage] = std::max(worst[stage], rel);
      EXPECT_LE(rel, bound) << fc.name << " " << cname << " " << stage;
    };
    check("vision_last_hidden_state", e.vision_last_hidden_state, fc.max_rel_image);
    check("qformer_last_hidden_state", e.qformer_last_hidden_state, fc.max_rel_image);
    check("language_projection", e.language_projection, fc.max_rel_image);
    check("encoder_last_hidden_state", e.encoder_last_hidden_state, fc.max_rel_text);
    // Teacher-forced logits through the decoder's step, as tests/test_model.cpp does.
    const auto ids = c["forced_decoder_input_ids"].get<std::vector<std::vector<int32_t>>>();
    const int64_t B = static_cast<int64_t>(ids.size());
    check("forced_logits", test::forced_logits(model, e, ids), fc.max_rel_text);
    // Greedy sequences: token agreement with the reference up to the first difference.
    const auto& g = c["generate"]["greedy"];
    GenerationOptions o;
    o.max_new_tokens = g["kwargs"]["max_new_tokens"].get<int>();
    const auto results = generate([&](int expand) { return model.start_decoder(e, expand); }, static_cast<int>(B), o,
                                  SpecialTokens{});
    const auto want = g["sequences"].get<std::vector<std::vector<int32_t>>>();
    for (size_t b = 0; b < want.size(); ++b) {
      std::vector<int32_t> w;
      for (size_t i = 1; i < want[b].size(); ++i) {
        w.push_back(want[b][i]);
        if (want[b][i] == 1) break;
      }
      const auto& got = results[b][0].ids;
      size_t same = 0;
      while (same < w.size() && same < got.size() && got[same] == w[same]) ++same;
      tokens += static_cast<int>(w.size());
      agree += static_cast<int>(same);
      ++sequences;
      exact += got == w;
    }
  }
  std::printf("  %-9s", fc.name);
  for (const char* s : {"vision_last_hidden_state", "qformer_last_hidden_state", "language_projection",
                        "encoder_last_hidden_state", "forced_logits"})
    std::printf(" %s %.2e", std::string(s).substr(0, std::string(s).find('_')).c_str(), worst[s]);
  std::printf("  greedy: %d/%d sequences exact, %d/%d tokens before the first difference\n", exact, sequences, agree,
              tokens);
  if (fc.greedy_exact) {
    EXPECT_EQ(exact, sequences) << fc.name;
  }
}

// The scalar fallback runs the whole model to the same numbers as the AVX2 kernels. Weights are identical and
// the products differ only in float rounding (1e-6 here for the float formats); with quantized formats a
// rounding difference occasionally moves one activation to the neighbouring int8 level, which this random
// model amplifies to ~1e-2 at the output (measured 1.7e-2 at most), so those get 5e-2.
TEST(FixtureFormatsScalar, WholeModelMatchesTheAvx2Path) {
  if (!kern::cpu_has_avx2()) GTEST_SKIP() << "no AVX2 here: the scalar path is the only one";
  std::ifstream jin(kFixtures + "/tiny-blip2-t5/reference.json");
  const auto c = nlohmann::json::parse(jin)["cases"]["vqa"];
  const auto ids = c["forced_decoder_input_ids"].get<std::vector<std::vector<int32_t>>>();
  for (const Fmt& f : kFormats) {
    LoadOptions opt;
    opt.weights = f.dtype == DType::F32 ? WeightFormat::AsStored
                  : f.dtype == DType::F16 ? WeightFormat::F16
                  : f.dtype == DType::BF16 ? WeightFormat::BF16
                  : f.dtype == DType::I8 ? WeightFormat::I8 : WeightFormat::I4;
    opt.int4_group = f.group == 0 ? 64 : f.group;
    const Blip2Model model(BLIP2_TINY_T5_DIR, opt);
    std::map<std::string, std::pair<Tensor, Tensor>> out;  // isa -> (encoder output, last logits)
    for_each_isa([&](const char* isa) {
      std::vector<RgbImage> imgs;
      for (const auto& n : c["images"]) imgs.push_back(load_image(kFixtures + "/images/" + n.get<std::string>()));
      const Encoded e = model.encode(preprocess_images(imgs, 224), model.tokenize(c["prompts"].get<std::vector<std::string>>()));
      auto dec = model.start_decoder(e);
      Tensor l;
      for (size_t t = 0; t < ids[0].size(); ++t) l = dec->step({ids[0][t]});
      out[isa] = {e.encoder_last_hidden_state, l};
    });
    const double re = test::compare(out["scalar"].first, out["avx2"].first).rel;
    const double rl = test::compare(out["scalar"].second, out["avx2"].second).rel;
    std::printf("  %-9s scalar vs avx2: encoder %.2e  logits %.2e\n", f.name, re, rl);
    const double bound = f.dtype == DType::I8 || f.dtype == DType::I4 ? 5e-2 : 1e-5;
    EXPECT_LE(re, bound) << f.name;
    EXPECT_LE(rl, bound) << f.name;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Formats, FixtureFormats,
    ::testing::Values(FormatCase{"stored", WeightFormat::AsStored, 64, 1e-5, 1e-5, true},
                      FormatCase{"f32", WeightFormat::F32, 64, 1e-5, 1e-5, true},
                      FormatCase{"bf16", WeightFormat::BF16, 64, 1e-2, 4e-2, false},
                      FormatCase{"f16", WeightFormat::F16, 64, 1.5e-3, 5e-3, false},
                      FormatCase{"int8", WeightFormat::I8, 64, 4e-2, 0.15, false},
                      FormatCase{"int4g32", WeightFormat::I4, 32, 0.5, 1.0, false, WeightFormat::I4},
                      FormatCase{"int4g64", WeightFormat::I4, 64, 0.5, 1.0, false, WeightFormat::I4},
                      FormatCase{"int4g128", WeightFormat::I4, 128, 0.5, 1.0, false, WeightFormat::I4},
                      FormatCase{"int4default", WeightFormat::I4, 64, 0.5, 1.0, false}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
