// Every CUDA op against the CPU op (the reference, as ggml's test-backend-ops checks each backend against its
// CPU one), on uniform [-1, 1] inputs from fixed seeds and the real models' shapes. Error measure: NMSE =
// Σ(gpu − cpu)² / Σcpu², printed for every case so the bounds can be tightened from measurements. Integer
// results (argmax) must match exactly. Without a GPU every test skips, saying why.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/error.h"
#include "cuda/cuda.h"
#include "ops/ops.h"

using namespace blip2;

namespace {

class OpsOnGpu : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (ops::cuda_available()) cuda::select_device(0);
  }
  void SetUp() override {
    if (!ops::cuda_available()) GTEST_SKIP() << "no GPU to test on (" << cuda::unavailable_reason() << ")";
  }
};

std::vector<float> uniform(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = u(rng);
  return v;
}
Tensor uniform_tensor(const Shape& s, uint32_t seed) {
  const auto v = uniform(numel(s), seed);
  return Tensor::from_host(s, v.data(), Device::CPU);
}

double nmse(const Tensor& gpu, const Tensor& cpu) {
  const Tensor g = on_host(gpu);
  EXPECT_EQ(g.shape, cpu.shape);
  double num = 0, den = 0;
  for (int64_t i = 0; i < cpu.size(); ++i) {
    const double d = static_cast<double>(g.data[i]) - cpu.data[i];
    num += d * d;
    den += static_cast<double>(cpu.data[i]) * cpu.data[i];
  }
  return num / std::max(den, 1e-300);
}

void expect_nmse(const std::string& what, const Tensor& gpu, const Tensor& cpu, double bound) {
  const double e = nmse(gpu, cpu);
  std::printf("  %-48s NMSE %.3g (bound %.0e)\n", what.c_str(), e, bound);
  EXPECT_LE(e, bound) << what;
}

// A [rows, cols] weight in `format`, on the CPU and its copy on the GPU, made by the loader's converter.
struct WeightPair {
  std::vector<float> values;
  Weight cpu, gpu;
};
WeightPair weight(int64_t rows, int64_t cols, WeightFormat format, uint32_t seed) {
  WeightPair p;
  p.values = uniform(rows * cols, seed);
  for (float& v : p.values) v *= 1.0f / std::sqrt(static_cast<float>(cols));  // outputs of order 1
  p.cpu = ops::convert_weight(f32_weight(p.values, rows, cols), format, 64);
  p.cpu = p.cpu.to(Device::CPU);
  p.gpu = p.cpu.to(Device::CUDA);
  return p;
}
WeightPair vec(int64_t n, uint32_t seed) {
  WeightPair p = weight(1, n, WeightFormat::F32, seed);
  p.cpu.shape = p.gpu.shape = {n};
  return p;
}

// ---- linear ---------------------------------------------------------------------------------------------

struct LinearCase {
  const char* model;
  int64_t in, out;
};
// ViT-g, Q-Former, T5-XL, T5-XXL, OPT-2.7b/6.7b widths; an odd width for padding; two vocabularies.
const LinearCase kLinear[] = {{"vit qkv", 1408, 4224}, {"vit fc1", 1408, 6144},  {"vit fc2", 6144, 1408},
                              {"qformer", 768, 768},   {"xl wi", 2048, 5120},    {"xl wo", 5120, 2048},
                              {"xxl wo", 10240, 4096}, {"opt-6.7b", 4096, 4096}, {"odd", 1000, 77},
                              {"t5 vocab", 2048, 32128}, {"opt vocab", 2560, 50272}};

TEST_F(OpsOnGpu, LinearEveryFormatAndRowCount) {
  // Bounds: f32 is the same arithmetic in another order; f16/bf16 round the activations to the weight's
  // type on the GPU (the CPU keeps them float32); int8 compared with the float product of the dequantized
  // weights, since the CPU quantizes activations in blocks of 128 and the GPU per row.
  const std::pair<WeightFormat, double> formats[] = {
      {WeightFormat::F32, 1e-9}, {WeightFormat::F16, 1e-5}, {WeightFormat::BF16, 1e-4}, {WeightFormat::I8, 1e-3}};
  for (const auto& c : kLinear)
    for (const auto& [format, bound] : formats)
      for (int64_t rows : {1, 2, 8, 9, 257}) {
        if ((c.out > 30000) && rows > 9) continue;  // the vocabulary products run at decode sizes
        const WeightPair w = weight(c.out, c.in, format, 7);
        const WeightPair b = vec(c.out, 8);
        const Tensor x = uniform_tensor({rows, c.in}, 9);
        Tensor want;
        if (format == WeightFormat::I8) {
          const std::vector<float> deq = w.cpu.f32();
          want = ops::linear(x, f32_weight(deq, c.out, c.in), b.cpu);
        } else {
          want = ops::linear(x, w.cpu, b.cpu);
        }
        const Tensor got = ops::linear(x.to(Device::CUDA), w.gpu, b.gpu);
        expect_nmse(std::string("linear ") + c.model + " " + weight_format_name(format) + " rows " + std::to_string(rows),
                    got, want, bound);
      }
}

// T5's feed-forward output exceeds float16's range; the f16 product must not overflow (spec §11).
TEST_F(OpsOnGpu, LinearF16SurvivesActivationsPastHalfRange) {
  const WeightPair w = weight(512, 1024, WeightFormat::F16, 3);
  Tensor x = uniform_tensor({16, 1024}, 4);
  for (int64_t r = 0; r < 16; ++r) x.data[r * 1024 + 7] = 3e5f;  // one huge channel per row, as in T5
  const Tensor want = ops::linear(x, w.cpu);
  const Tensor got = on_host(ops::linear(x.to(Device::CUDA), w.gpu));
  for (float v : got.data) ASSERT_TRUE(std::isfinite(v));
  expect_nmse("linear f16 with 3e5 activations", got, want, 1e-5);
}

// ---- element-wise, norms, lookups ----------------------------------------------------------------------

TEST_F(OpsOnGpu, NormsActivationsAndElementwise) {
  for (int64_t d : {64, 768, 1408, 2048, 4096}) {
    const Tensor x = uniform_tensor({33, d}, 1);
    const WeightPair g = vec(d, 2), b = vec(d, 3);
    Tensor cpu = x, gpu = x.to(Device::CUDA);
    ops::layer_norm(cpu, g.cpu, b.cpu, 1e-6f);
    ops::layer_norm(gpu, g.gpu, b.gpu, 1e-6f);
    expect_nmse("layer_norm d " + std::to_string(d), gpu, cpu, 1e-12);
    cpu = x;
    gpu = x.to(Device::CUDA);
    ops::rms_norm(cpu, g.cpu, 1e-6f);
    ops::rms_norm(gpu, g.gpu, 1e-6f);
    expect_nmse("rms_norm d " + std::to_string(d), gpu, cpu, 1e-12);
  }
  const Tensor x = uniform_tensor({257, 6144}, 5), y = uniform_tensor({257, 6144}, 6);
  for (Activation act : {Activation::GeluErf, Activation::GeluTanh, Activation::Relu}) {
    Tensor cpu = x, gpu = x.to(Device::CUDA);
    ops::activate(cpu, act);
    ops::activate(gpu, act);
    expect_nmse(std::string("activate ") + activation_name(act), gpu, cpu, 1e-12);
  }
  Tensor cpu = x, gpu = x.to(Device::CUDA);
  ops::add(cpu, y);
  ops::add(gpu, y.to(Device::CUDA));
  ops::mul(cpu, y);
  ops::mul(gpu, y.to(Device::CUDA));
  ops::scale(cpu, 0.125f);
  ops::scale(gpu, 0.125f);
  const Tensor pos = uniform_tensor({6144}, 7);
  ops::add_broadcast(cpu, pos);
  ops::add_broadcast(gpu, pos.to(Device::CUDA));
  EXPECT_EQ(on_host(gpu).data, cpu.data) << "add, mul, scale, add_broadcast are exact";
}

TEST_F(OpsOnGpu, LookupsCopiesAndLayouts) {
  for (WeightFormat f : {WeightFormat::F32, WeightFormat::F16, WeightFormat::BF16, WeightFormat::I8}) {
    const WeightPair t = weight(1152, 64, f, 1);
    const std::vector<int32_t> ids = {0, 5, 1151, 5, 700};
    Tensor cpu({5, 64}), gpu({5, 64}, Device::CUDA);
    ops::embedding(t.cpu, ids.data(), 5, cpu.data_ptr());
    ops::embedding(t.gpu, ids.data(), 5, gpu.data_ptr());
    EXPECT_EQ(on_host(gpu).data, cpu.data) << weight_format_name(f);
    EXPECT_EQ(on_host(ops::weight_tensor(t.gpu)).data, ops::weight_tensor(t.cpu).data) << weight_format_name(f);
  }
  const Tensor px = uniform_tensor({2, 3, 224, 224}, 3);
  EXPECT_EQ(on_host(ops::patchify(px.to(Device::CUDA), 14)).data, ops::patchify(px, 14).data);
  const WeightPair table = weight(32, 64, WeightFormat::F32, 4);
  std::vector<int32_t> buckets(37 * 41);
  for (size_t i = 0; i < buckets.size(); ++i) buckets[i] = static_cast<int32_t>((i * 7) % 32);
  EXPECT_EQ(on_host(ops::relative_bias(table.gpu, buckets, 37, 41)).data, ops::relative_bias(table.cpu, buckets, 37, 41).data);
  const Tensor src = uniform_tensor({10, 6}, 5);
  Tensor cpu({7, 6}), gpu({7, 6}, Device::CUDA);
  ops::copy_rows(src, 2, cpu, 3, 4);
  ops::copy_rows(src.to(Device::CUDA), 2, gpu, 3, 4);
  EXPECT_EQ(on_host(gpu).data, cpu.data);
}

TEST_F(OpsOnGpu, GreedyPickTakesTheFirstOfEqualMaxima) {
  Tensor x = uniform_tensor({8, 32128}, 6);
  x.data[3 * 32128 + 100] = 5.0f;  // ties: the lower index wins
  x.data[3 * 32128 + 9000] = 5.0f;
  x.data[5 * 32128 + 32127] = 7.0f;  // the last column
  const auto gpu = ops::greedy_pick(x.to(Device::CUDA)), cpu = ops::greedy_pick(x);
  ASSERT_EQ(gpu.size(), cpu.size());
  for (size_t r = 0; r < cpu.size(); ++r) {
    EXPECT_EQ(gpu[r].id, cpu[r].id) << "row " << r;
    EXPECT_NEAR(gpu[r].log_prob, cpu[r].log_prob, 1e-5 * std::abs(cpu[r].log_prob)) << "row " << r;
  }
  EXPECT_EQ(cpu[3].id, 100);
  EXPECT_EQ(cpu[5].id, 32127);
}

// ---- attention ------------------------------------------------------------------------------------------

struct AttnCase {
  const char* what;
  int64_t tq, tk;
  int heads, head_dim;
  bool bias, mask, causal, fused;  // fused: q/k/v strided views into one [T, 3d] buffer (the ViT's qkv)
};
const AttnCase kAttn[] = {
    {"vit 257x257 16x88 fused", 257, 257, 16, 88, false, false, false, true},
    {"qformer cross 32x257 12x64", 32, 257, 12, 64, false, false, false, false},
    {"t5 encoder 40x40 bias+mask", 40, 40, 32, 64, true, true, false, false},
    {"t5 decode 1x1 bias", 1, 1, 64, 64, true, false, false, false},
    {"t5 decode 1x64 bias", 1, 64, 64, 64, true, false, false, false},
    {"t5 cross 1x40 mask", 1, 40, 32, 64, false, true, false, false},
    {"opt prefill 45x45 causal+mask", 45, 45, 32, 80, false, true, true, false},
    {"opt decode 1x46 causal+mask", 1, 46, 32, 80, false, true, true, false},
};

TEST_F(OpsOnGpu, AttentionEveryCase) {
  for (const AttnCase& c : kAttn) {
    const int64_t d = int64_t(c.heads) * c.head_dim, ld = c.fused ? 3 * d : d;
    const Tensor q = uniform_tensor({c.tq, ld}, 1), kv = uniform_tensor({c.tk, ld}, 2), vv = uniform_tensor({c.tk, ld}, 3);
    const Tensor bias = uniform_tensor({c.heads, c.tq, c.tk}, 4);
    std::vector<uint8_t> mask(static_cast<size_t>(c.tk), 1);
    for (int64_t j = 0; j < c.tk; j += 3) mask[j] = 0;
    const Buffer mask_gpu = Buffer::copy_of(mask.data(), mask.size(), Device::CUDA);
    const Tensor qg = q.to(Device::CUDA), kg = kv.to(Device::CUDA), vg = vv.to(Device::CUDA), bg = bias.to(Device::CUDA);
    Tensor out_cpu({c.tq, d}), out_gpu({c.tq, d}, Device::CUDA);
    const int64_t k_off = c.fused ? d : 0, v_off = c.fused ? 2 * d : 0;
    const auto args = [&](Device dev, const Tensor& Q, const Tensor& K, const Tensor& V, const Tensor& B, const uint8_t* m,
                          Tensor& out) {
      return ops::AttentionArgs{.device = dev, .q = Q.data_ptr(), .ldq = ld, .tq = c.tq, .k = K.data_ptr() + k_off,
                                .ldk = ld, .v = V.data_ptr() + v_off, .ldv = ld, .tk = c.tk, .heads = c.heads,
                                .head_dim = c.head_dim, .scale = 1.0f / std::sqrt(float(c.head_dim)),
                                .bias = c.bias ? B.data_ptr() : nullptr, .key_mask = c.mask ? m : nullptr,
                                .out = out.data_ptr(), .ldo = d, .causal = c.causal};
    };
    ops::attention(args(Device::CPU, q, kv, vv, bias, mask.data(), out_cpu));
    ops::attention(args(Device::CUDA, qg, kg, vg, bg, static_cast<const uint8_t*>(mask_gpu.data()), out_gpu));
    expect_nmse(std::string("attention ") + c.what, out_gpu, out_cpu, 1e-10);
  }
}

}  // namespace
