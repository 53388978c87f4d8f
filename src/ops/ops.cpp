#include "ops/ops.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "core/error.h"
#include "cuda/cuda.h"
#include "ops/kernels.h"
#include "ops/parallel.h"

namespace blip2::ops {

namespace {

// Weight rows widened per block for the BLAS path (F16/BF16 weights and more than kGemvMaxRows rows),
// so that no float32 copy of the whole matrix is ever made.
int64_t kWidenRows = 1024;
// Below this many multiply-adds per thread a kernel runs on the calling thread alone.
constexpr int64_t kMinWorkPerThread = 1 << 16;

void sgemm_nt(const float* x, int64_t rows, int64_t in, const float* w, int64_t out, float* y, int64_t ldy) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(out),
              static_cast<int>(in), 1.0f, x, static_cast<int>(in), w, static_cast<int>(in), 0.0f, y,
              static_cast<int>(ldy));
}

// Elementwise work over [0, n) on the pool when it is large enough to pay for the hand-off.
void for_elements(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  par::parallel_for(n, fn, kMinWorkPerThread, 16);
}

// Every operand of an op on one device: a mix is a bug in the caller (models never choose devices).
void same_device(const char* op, Device a, Device b) {
  if (a != b)
    fail(ErrorKind::Internal, std::string(op) + ": operands on " + device_name(a) + " and " + device_name(b));
}
void check_weight(const char* op, Device x, const Weight& w) {
  if (!w.empty()) same_device(op, x, w.device);
}
bool on_gpu(Device d) { return d == Device::CUDA; }

}  // namespace

bool cuda_available() { return cuda::device_count() > 0; }

static int64_t g_quant_tile_bytes = kQuantTileBytes;
void set_quant_tile_bytes(int64_t bytes) { g_quant_tile_bytes = bytes > 0 ? bytes : kQuantTileBytes; }

void set_widen_rows(int64_t rows) { kWidenRows = rows > 0 ? std::max<int64_t>(rows, 8) : 1024; }

Weight convert_weight(const Weight& w, WeightFormat format, int int4_group,
                      const std::vector<int32_t>& float_columns) {
  switch (format) {
    case WeightFormat::AsStored: return w;
    case WeightFormat::F32: return kern::convert(w, DType::F32);
    case WeightFormat::F16: return kern::convert(w, DType::F16);
    case WeightFormat::BF16: return kern::convert(w, DType::BF16);
    case WeightFormat::I8: return kern::convert(w, DType::I8, 0, float_columns);
    case WeightFormat::I4: return kern::convert(w, DType::I4, int4_group, float_columns);
  }
  return w;
}

std::vector<float> norm_output_scale(const Weight& gamma, const Weight& beta) {
  std::vector<float> s = gamma.f32();
  const std::vector<float> b = beta.empty() ? std::vector<float>(s.size(), 0.0f) : beta.f32();
  if (b.size() != s.size()) fail(ErrorKind::Internal, "norm_output_scale: gamma and beta differ in size");
  for (size_t j = 0; j < s.size(); ++j) s[j] = std::sqrt(s[j] * s[j] + b[j] * b[j]);
  return s;
}

std::vector<float> product_output_scale(const Weight& w, const std::vector<float>& in_scale, const Weight& b) {
  const int64_t out = w.rows(), in = w.cols();
  if (static_cast<int64_t>(in_scale.size()) != in)
    fail(ErrorKind::Internal, "product_output_scale: " + std::to_string(in_scale.size()) + " input scales for " +
                                  shape_str(w.shape));
  std::vector<float> s(static_cast<size_t>(out));
  par::parallel_for(out, [&](int64_t o0, int64_t o1) {
    std::vector<float> row(static_cast<size_t>(in));
    for (int64_t o = o0; o < o1; ++o) {
      kern::dequant_rows(w, o, 1, row.data(), in);
      double sum = 0.0;
      for (int64_t j = 0; j < in; ++j) sum += static_cast<double>(row[j] * in_scale[j]) * (row[j] * in_scale[j]);
      s[o] = static_cast<float>(std::sqrt(sum));
    }
  }, std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(in, 1)));
  if (!b.empty()) {
    const std::vector<float> bias = b.f32();
    if (static_cast<int64_t>(bias.size()) != out)
      fail(ErrorKind::Internal, "product_output_scale: bias of " + std::to_string(bias.size()) + " for " +
                                    shape_str(w.shape));
    for (int64_t o = 0; o < out; ++o) s[o] += std::fabs(bias[o]);
  }
  return s;
}

std::vector<int32_t> float_columns_for(const std::vector<float>& channel_scale) {
  if (channel_scale.empty()) return {};
  std::vector<float> sorted = channel_scale;
  for (float& v : sorted) v = std::isnan(v) ? 0.0f : v;  // a strict weak order for nth_element
  std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
  const float median = sorted[sorted.size() / 2];
  if (!(median > 0.0f)) return {};  // no typical magnitude to compare with
  const float threshold = kFloatColumnRatio * median;
  std::vector<int32_t> cols;
  for (size_t j = 0; j < channel_scale.size(); ++j)
    if (channel_scale[j] > threshold) cols.push_back(static_cast<int32_t>(j));  // NaN is never above
  // The largest kMaxFloatColumns (ties: the lower column), then in column order.
  std::stable_sort(cols.begin(), cols.end(), [&](int32_t a, int32_t b) { return channel_scale[a] > channel_scale[b]; });
  if (cols.size() > static_cast<size_t>(kMaxFloatColumns)) cols.resize(kMaxFloatColumns);
  std::sort(cols.begin(), cols.end());
  return cols;
}

namespace {

// x quantized once (rows split between threads), then per tile of rows the output channels split between
// threads, each streaming its share of the weight once per tile.
//
// Outlier columns (issue 14) are taken out of the integer product: zeroed in a copy of x before it is
// quantized, so that they set no block scale, and their contribution added in float right after the integer
// product of each chunk of kOutlierChunk output channels, while those weight rows are still in cache (for
// decoding the extra reads are cache hits, the extra work n · out multiply-adds per row). Two kinds:
//  * the weight's float columns (Weight::float_columns, chosen at load where the model's weights show the
//    input channel is large): their weights are float too, so neither the activation's rounding nor the
//    weight's is amplified by the outlier (kern::add_float_columns);
//  * each row's own outliers (kern::outlier_columns, found in the activations at run time), multiplied with
//    the dequantized weight column inside kern::gemv_q: the activation's rounding goes, the weight's stays.
// Each row's choice is its own, so batching leaves every row's result unchanged.
constexpr int64_t kOutlierChunk = 32;

void linear_quantized(const float* x, int64_t rows, const Weight& w, float* y) {
  const int64_t out = w.rows(), in = w.cols();
  thread_local kern::QuantRows tls;
  thread_local std::vector<float> tls_x;
  thread_local std::vector<int32_t> tls_cols;
  thread_local std::vector<int> tls_counts;
  // The caller's buffers (inside the lambdas the thread_local names would be the worker's own).
  kern::QuantRows& qx = tls;
  std::vector<float>& xz = tls_x;
  std::vector<int32_t>& cols = tls_cols;
  std::vector<int>& counts = tls_counts;
  const int max = kern::max_outlier_columns();
  cols.resize(static_cast<size_t>(rows * std::max(max, 1)));
  counts.resize(static_cast<size_t>(rows));
  int n = kern::outlier_columns(x, rows, in, in, max, cols.data(), counts.data());
  const int nf = w.n_float_columns;
  const int32_t* fc = w.float_columns;
  if (n > 0 && nf > 0) {  // a float column needs no second, dequantized, addition
    n = 0;
    for (int64_t r = 0; r < rows; ++r) {
      int32_t* c = cols.data() + r * max;
      counts[r] = static_cast<int>(std::remove_if(c, c + counts[r], [&](int32_t j) {
                    return std::binary_search(fc, fc + nf, j);
                  }) - c);
      n += counts[r];
    }
  }
  const bool split = n > 0 || nf > 0;
  if (split) xz.resize(static_cast<size_t>(rows * in));
  qx.resize(rows, w.ld, kern::act_block(w));
  par::parallel_for(rows, [&](int64_t r0, int64_t r1) {
    const float* src = x + r0 * in;
    if (split) {  // x without each row's outlier columns
      float* z = xz.data() + r0 * in;
      std::memcpy(z, src, static_cast<size_t>((r1 - r0) * in) * sizeof(float));
      for (int64_t r = r0; r < r1; ++r) {
        float* zr = z + (r - r0) * in;
        for (int c = 0; c < counts[r]; ++c) zr[cols[r * max + c]] = 0.0f;
        for (int k = 0; k < nf; ++k) zr[fc[k]] = 0.0f;
      }
      src = z;
    }
    kern::quantize_rows(src, r1 - r0, in, in, qx, r0);
  }, std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(in, 1)));
  const int64_t tile = std::max(kQuantTileMinRows, g_quant_tile_bytes / w.ld);
  for (int64_t r0 = 0; r0 < rows; r0 += tile) {
    const int64_t r1 = std::min(rows, r0 + tile);
    const int64_t min_out = std::max<int64_t>(16, kMinWorkPerThread / std::max<int64_t>(in * (r1 - r0), 1));
    const kern::RowColumns tile_columns{x + r0 * in, in, cols.data() + r0 * max, counts.data() + r0, max};
    const kern::RowColumns* columns = n > 0 ? &tile_columns : nullptr;
    par::parallel_for(out, [&](int64_t o0, int64_t o1) {
      if (!split) return kern::gemv_q(qx, r0, r1, w, o0, o1, y, out);
      for (int64_t c0 = o0; c0 < o1; c0 += kOutlierChunk) {
        const int64_t c1 = std::min(o1, c0 + kOutlierChunk);
        kern::gemv_q(qx, r0, r1, w, c0, c1, y, out, columns);
        if (nf > 0) kern::add_float_columns(x + r0 * in, in, r1 - r0, w, c0, c1, y + r0 * out, out);
      }
    }, min_out, 16);
  }
}

}  // namespace

namespace {

// ProductCounters, kept as atomics (nanoseconds for the times) since any thread may issue products.
struct AtomicCounters {
  std::atomic<int64_t> ops{0}, ns{0};
};
AtomicCounters g_linear, g_attention;

// Adds `ops` and the wall time from construction to destruction (every return path) to one counter.
class Counted {
 public:
  Counted(AtomicCounters& c, int64_t ops) : c_(c), t0_(std::chrono::steady_clock::now()) {
    c_.ops.fetch_add(ops, std::memory_order_relaxed);
  }
  ~Counted() {
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0_);
    c_.ns.fetch_add(ns.count(), std::memory_order_relaxed);
  }
  Counted(const Counted&) = delete;
  Counted& operator=(const Counted&) = delete;

 private:
  AtomicCounters& c_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace

ProductCounters ProductCounters::operator-(const ProductCounters& o) const {
  return {linear_ops - o.linear_ops, attention_ops - o.attention_ops, linear_seconds - o.linear_seconds,
          attention_seconds - o.attention_seconds};
}

ProductCounters product_counters() {
  const auto load = [](const std::atomic<int64_t>& v) { return v.load(std::memory_order_relaxed); };
  return {load(g_linear.ops), load(g_attention.ops), 1e-9 * static_cast<double>(load(g_linear.ns)),
          1e-9 * static_cast<double>(load(g_attention.ns))};
}

void linear(const float* x, int64_t rows, const Weight& w, const Weight& b, float* y) {
  const int64_t out = w.rows(), in = w.cols();
  if (rows == 0 || out == 0) return;
  const Counted counted(g_linear, 2 * rows * in * out);
  check_weight("linear", w.device, b);
  if (on_gpu(w.device)) return cuda::linear(x, rows, w, b, y);
  if (w.quantized()) {
    linear_quantized(x, rows, w, y);
  } else if (rows <= kGemvMaxRows) {
    // Output channels split between threads; each thread streams its share of the weight once.
    const int64_t min_rows = std::max<int64_t>(16, kMinWorkPerThread / std::max<int64_t>(in * rows, 1));
    par::parallel_for(
        out, [&](int64_t o0, int64_t o1) { kern::gemv(x, in, static_cast<int>(rows), w, o0, o1, y, out); },
        min_rows, 16);
  } else if (w.dtype == DType::F32) {
    sgemm_nt(x, rows, in, static_cast<const float*>(w.data), out, y, out);
  } else {
    const int64_t nb = std::min(out, kWidenRows);
    std::vector<float> block(static_cast<size_t>(nb * in));
    for (int64_t r0 = 0; r0 < out; r0 += kWidenRows) {
      const int64_t n = std::min(kWidenRows, out - r0);
      par::parallel_for(n, [&](int64_t a, int64_t e) { kern::dequant_rows(w, r0 + a, e - a, block.data() + a * in, in); },
                        std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(in, 1)));
      sgemm_nt(x, rows, in, block.data(), n, y + r0, out);  // writes columns [r0, r0+n) of y
    }
  }
  if (!b.empty()) {
    const std::vector<float> bias = b.f32();
    par::parallel_for(rows, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* yr = y + r * out;
        for (int64_t o = 0; o < out; ++o) yr[o] += bias[o];
      }
    }, std::max<int64_t>(1, kMinWorkPerThread / out));
  }
}

Tensor linear(const Tensor& x, const Weight& w, const Weight& b) {
  if (x.last() != w.cols())
    fail(ErrorKind::Internal, "linear: input width " + std::to_string(x.last()) + " does not match weight " +
                                  shape_str(w.shape));
  same_device("linear", x.device, w.device);
  Shape s = x.shape;
  s.back() = w.rows();
  Tensor y(s, x.device);
  linear(x.data_ptr(), x.rows(), w, b, y.data_ptr());
  return y;
}

void layer_norm(Tensor& x, const Weight& gamma, const Weight& beta, float eps) {
  const int64_t d = x.last();
  check_weight("layer_norm", x.device, gamma);
  check_weight("layer_norm", x.device, beta);
  if (on_gpu(x.device)) return cuda::layer_norm(x.data_ptr(), x.rows(), d, gamma, beta, eps);
  const std::vector<float> g = gamma.f32(), bt = beta.f32();
  par::parallel_for(x.rows(), [&](int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* p = x.data_ptr() + r * d;
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < d; ++i) mean += p[i];
    mean /= d;
    for (int64_t i = 0; i < d; ++i) var += (p[i] - mean) * (p[i] - mean);
    var /= d;
    const float inv = static_cast<float>(1.0 / std::sqrt(var + eps));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < d; ++i) p[i] = (p[i] - m) * inv * g[i] + bt[i];
  }
  }, std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(d, 1)));
}

void rms_norm(Tensor& x, const Weight& gamma, float eps) {
  const int64_t d = x.last();
  check_weight("rms_norm", x.device, gamma);
  if (on_gpu(x.device)) return cuda::rms_norm(x.data_ptr(), x.rows(), d, gamma, eps);
  const std::vector<float> g = gamma.f32();
  par::parallel_for(x.rows(), [&](int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* p = x.data_ptr() + r * d;
    double ss = 0.0;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(p[i]) * p[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / d + eps));
    for (int64_t i = 0; i < d; ++i) p[i] = g[i] * (p[i] * inv);
  }
  }, std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(d, 1)));
}

void activate(Tensor& x, Activation act) {
  if (on_gpu(x.device)) return cuda::activate(x.data_ptr(), x.size(), act);
  float* p = x.data_ptr();
  for_elements(x.size(), [&](int64_t b, int64_t e) {
    switch (act) {
      case Activation::GeluErf: kern::gelu_erf(p + b, e - b); return;
      case Activation::GeluTanh: kern::gelu_tanh(p + b, e - b); return;
      case Activation::Relu:
        for (int64_t i = b; i < e; ++i) p[i] = std::max(p[i], 0.0f);
        return;
      case Activation::Silu:  // x·sigmoid(x), as torch computes it: x / (1 + e^-x)
        for (int64_t i = b; i < e; ++i) p[i] = p[i] / (1.0f + std::exp(-p[i]));
        return;
    }
  });
}

void add(Tensor& x, const Tensor& y) {
  same_device("add", x.device, y.device);
  if (x.size() != y.size())
    fail(ErrorKind::Internal, "add: shapes " + shape_str(x.shape) + " and " + shape_str(y.shape));
  if (on_gpu(x.device)) return cuda::add(x.data_ptr(), y.data_ptr(), x.size());
  float* p = x.data_ptr();
  const float* q = y.data_ptr();
  for_elements(x.size(), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) p[i] += q[i];
  });
}

void mul(Tensor& x, const Tensor& y) {
  same_device("mul", x.device, y.device);
  if (x.size() != y.size())
    fail(ErrorKind::Internal, "mul: shapes " + shape_str(x.shape) + " and " + shape_str(y.shape));
  if (on_gpu(x.device)) return cuda::mul(x.data_ptr(), y.data_ptr(), x.size());
  float* p = x.data_ptr();
  const float* q = y.data_ptr();
  for_elements(x.size(), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) p[i] *= q[i];
  });
}

void scale(Tensor& x, float s) {
  if (on_gpu(x.device)) return cuda::scale(x.data_ptr(), x.size(), s);
  float* p = x.data_ptr();
  for_elements(x.size(), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) p[i] *= s;
  });
}

void rotary(Tensor& x, int64_t heads, int64_t head_dim, const std::vector<int64_t>& positions, float theta) {
  const int64_t rows = x.rows(), half = head_dim / 2, w = heads * head_dim;
  if (x.last() != w || head_dim % 2 != 0 || static_cast<int64_t>(positions.size()) != rows)
    fail(ErrorKind::Internal, "rotary: " + shape_str(x.shape) + " for " + std::to_string(heads) + " heads of " +
                                  std::to_string(head_dim) + " at " + std::to_string(positions.size()) + " positions");
  // cos/sin [rows, half] on the host, in float32 like LlamaRotaryEmbedding: inv_freq = 1 / theta^(2i/d),
  // angle = float(position) · inv_freq.
  std::vector<float> inv(static_cast<size_t>(half)), cs(static_cast<size_t>(rows * half * 2));
  for (int64_t i = 0; i < half; ++i)
    inv[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < half; ++i) {
      const float a = static_cast<float>(positions[r]) * inv[i];
      cs[(r * half + i) * 2] = std::cos(a);
      cs[(r * half + i) * 2 + 1] = std::sin(a);
    }
  if (on_gpu(x.device)) {
    const Buffer table = Buffer::copy_of(cs.data(), cs.size(), x.device);
    return cuda::rotary(x.data_ptr(), rows, heads, head_dim, static_cast<const float*>(table.data()));
  }
  float* p = x.data_ptr();
  par::parallel_for(rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t h = 0; h < heads; ++h) {
        float* v = p + r * w + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float c = cs[(r * half + i) * 2], s = cs[(r * half + i) * 2 + 1], a = v[i], b = v[i + half];
          v[i] = a * c - b * s;     // x·cos + rotate_half(x)·sin, rotate_half(x) = [−x2 ; x1]
          v[i + half] = b * c + a * s;
        }
      }
  }, std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(w, 1)));
}

void embedding(const Weight& table, const int32_t* ids, int64_t n, float* out) {
  const int64_t d = table.cols();
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= table.rows())
      fail(ErrorKind::Input, "token id " + std::to_string(ids[i]) + " is outside the embedding table (" +
                                 std::to_string(table.rows()) + " rows)");
  if (on_gpu(table.device)) return cuda::embedding(table, ids, n, out);
  for (int64_t i = 0; i < n; ++i) table.to_f32(static_cast<int64_t>(ids[i]) * d, d, out + i * d);
}

void copy_rows(const Tensor& src, int64_t src_row, Tensor& dst, int64_t dst_row, int64_t n) {
  same_device("copy_rows", src.device, dst.device);
  const int64_t w = dst.last();
  if (src.last() != w || src_row < 0 || dst_row < 0 || n < 0 || src_row + n > src.rows() || dst_row + n > dst.rows())
    fail(ErrorKind::Internal, "copy_rows: " + std::to_string(n) + " rows from row " + std::to_string(src_row) + " of " +
                                  shape_str(src.shape) + " to row " + std::to_string(dst_row) + " of " +
                                  shape_str(dst.shape));
  copy_bytes(dst.data_ptr() + dst_row * w, dst.device, src.data_ptr() + src_row * w, src.device,
             static_cast<size_t>(n * w) * 4);
}

void add_broadcast(Tensor& x, const Tensor& y) {
  same_device("add_broadcast", x.device, y.device);
  const int64_t n = x.size(), m = y.size();
  if (m == 0 || n % m != 0)
    fail(ErrorKind::Internal, "add_broadcast: " + shape_str(y.shape) + " does not tile " + shape_str(x.shape));
  if (on_gpu(x.device)) return cuda::add_broadcast(x.data_ptr(), n, y.data_ptr(), m);
  float* p = x.data_ptr();
  const float* q = y.data_ptr();
  for_elements(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) p[i] += q[i % m];
  });
}

Tensor weight_tensor(const Weight& w) {
  Tensor t(w.shape, w.device);
  if (on_gpu(w.device)) cuda::weight_f32(w, t.data_ptr());
  else w.to_f32(0, t.size(), t.data_ptr());
  return t;
}

Tensor patchify(const Tensor& pixels, int64_t P) {
  const int64_t B = pixels.dim(0), S = pixels.dim(-1), G = S / P, K = 3 * P * P;
  if (pixels.shape != Shape{B, 3, S, S} || P <= 0 || S % P != 0)
    fail(ErrorKind::Internal, "patchify: pixels " + shape_str(pixels.shape) + ", patch " + std::to_string(P));
  Tensor patches({B, G * G, K}, pixels.device);
  if (on_gpu(pixels.device)) {
    cuda::patchify(pixels.data_ptr(), B, S, P, patches.data_ptr());
    return patches;
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t gy = 0; gy < G; ++gy)
      for (int64_t gx = 0; gx < G; ++gx) {
        float* dst = patches.data_ptr() + ((b * G + gy) * G + gx) * K;
        for (int64_t c = 0; c < 3; ++c)
          for (int64_t ky = 0; ky < P; ++ky) {
            const float* src = pixels.data_ptr() + ((b * 3 + c) * S + gy * P + ky) * S + gx * P;
            std::memcpy(dst + (c * P + ky) * P, src, static_cast<size_t>(P) * 4);
          }
      }
  return patches;
}

Tensor relative_bias(const Weight& table, const std::vector<int32_t>& buckets, int64_t tq, int64_t tk) {
  const int64_t H = table.cols(), nb = table.rows();
  if (static_cast<int64_t>(buckets.size()) != tq * tk)
    fail(ErrorKind::Internal, "relative_bias: " + std::to_string(buckets.size()) + " buckets for " +
                                  std::to_string(tq) + "x" + std::to_string(tk));
  for (int32_t k : buckets)
    if (k < 0 || k >= nb) fail(ErrorKind::Internal, "relative_bias: bucket " + std::to_string(k) + " of " + std::to_string(nb));
  Tensor bias({H, tq, tk}, table.device);
  if (on_gpu(table.device)) {
    cuda::relative_bias(table, buckets.data(), tq, tk, bias.data_ptr());
    return bias;
  }
  const std::vector<float> t = table.f32();  // [buckets, H]
  float* out = bias.data_ptr();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < tq * tk; ++i) out[h * tq * tk + i] = t[buckets[i] * H + h];
  return bias;
}

std::vector<Pick> greedy_pick(const Tensor& x) {
  const int64_t rows = x.rows(), V = x.last();
  std::vector<Pick> picks(static_cast<size_t>(rows));
  if (on_gpu(x.device)) {
    cuda::greedy_pick(x.data_ptr(), rows, V, picks.data());
    return picks;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = x.data_ptr() + r * V;
    const int64_t id = std::max_element(p, p + V) - p;  // the first of equal maxima
    const bool finite = std::all_of(p, p + V, [](float v) { return std::isfinite(v); });
    picks[r] = {static_cast<int32_t>(id), finite ? log_softmax_at(p, V, id) : NAN};
  }
  return picks;
}

float log_softmax_at(const float* x, int64_t n, int64_t i) {
  const float mx = *std::max_element(x, x + n);
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += std::exp(static_cast<double>(x[j] - mx));
  return static_cast<float>(x[i] - mx - std::log(sum));
}

void RowCache::append(const Tensor& src, int64_t row, int64_t n) {
  if (rows_ + n > (buf_.shape.empty() ? 0 : buf_.rows())) {
    const int64_t cap = std::max<int64_t>({16, 2 * rows_, rows_ + n});
    Tensor grown({cap, width_}, device_);
    if (rows_) copy_rows(buf_, 0, grown, 0, rows_);
    buf_ = std::move(grown);
  }
  copy_rows(src, row, buf_, rows_, n);
  rows_ += n;
}

namespace {

// Softmax of one score row in place: bias added, masked keys (key_mask[j] == 0, or j >= visible) given
// probability 0, the rest normalised. A row whose keys are all masked becomes all zeros (HF would average
// uniformly; it never happens here).
void softmax_row(float* p, int64_t tk, const float* bias, const uint8_t* key_mask, int64_t visible) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < tk; ++j) {
    if ((key_mask && !key_mask[j]) || j >= visible) {
      p[j] = -INFINITY;
      continue;
    }
    if (bias) p[j] += bias[j];
    mx = std::max(mx, p[j]);
  }
  if (mx == -INFINITY) {
    std::fill(p, p + tk, 0.0f);
    return;
  }
  const float inv = 1.0f / kern::exp_sum(p, tk, mx);  // exp(-inf) = 0 for masked keys
  for (int64_t j = 0; j < tk; ++j) p[j] *= inv;
}

int64_t attention_ops(const AttentionArgs& a) { return 4 * a.heads * a.tq * a.tk * a.head_dim; }  // q·kᵀ, scores·v

int64_t visible_keys(const AttentionArgs& a, int64_t i) {
  return a.causal ? std::min(a.tk, i + (a.tk - a.tq) + 1) : a.tk;
}

// Few queries (decoding) are dot products and axpys per head; many (ViT, Q-Former, T5 encoder, a prefill)
// are two sgemm per head.
bool few_queries(const AttentionArgs& a) { return a.tq < 8 || a.tk < 8; }

// Head h of a problem with few queries. p: tk floats of scratch.
void few_query_head(const AttentionArgs& a, int64_t h, float* p) {
  const int64_t tk = a.tk, hd = a.head_dim, off = h * hd;
  for (int64_t i = 0; i < a.tq; ++i) {
    const float* qi = a.q + i * a.ldq + off;
    for (int64_t j = 0; j < tk; ++j)
      p[j] = (a.key_mask && !a.key_mask[j]) ? 0.0f : kern::dot(qi, a.k + j * a.ldk + off, hd) * a.scale;
    softmax_row(p, tk, a.bias ? a.bias + (h * a.tq + i) * tk : nullptr, a.key_mask, visible_keys(a, i));
    float* oi = a.out + i * a.ldo + off;
    std::fill(oi, oi + hd, 0.0f);
    for (int64_t j = 0; j < tk; ++j)
      if (p[j] != 0.0f) kern::axpy(p[j], a.v + j * a.ldv + off, oi, hd);
  }
}

// One problem with many queries: scores and context as two sgemm per head, softmax between. One head = two
// small products (ViT-g: 257×257×88): with at least as many heads as threads, each pool thread takes whole
// heads with OpenBLAS single-threaded (2–3× faster than threading each small product); otherwise OpenBLAS
// threads the products and the pool the softmax rows.
void many_query_attention(const AttentionArgs& a) {
  const int64_t tq = a.tq, tk = a.tk, hd = a.head_dim;
  const auto one_head = [&](int64_t h, float* s, bool rows_on_pool) {
    const int64_t off = h * hd;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(tq), static_cast<int>(tk),
                static_cast<int>(hd), a.scale, a.q + off, static_cast<int>(a.ldq), a.k + off,
                static_cast<int>(a.ldk), 0.0f, s, static_cast<int>(tk));
    const float* bias = a.bias ? a.bias + h * tq * tk : nullptr;
    const auto rows = [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        softmax_row(s + i * tk, tk, bias ? bias + i * tk : nullptr, a.key_mask, visible_keys(a, i));
    };
    if (rows_on_pool) par::parallel_for(tq, rows, std::max<int64_t>(1, kMinWorkPerThread / 16 / tk));
    else rows(0, tq);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(tq), static_cast<int>(hd),
                static_cast<int>(tk), 1.0f, s, static_cast<int>(tk), a.v + off, static_cast<int>(a.ldv),
                0.0f, a.out + off, static_cast<int>(a.ldo));
  };
  if (par::threads() > 1 && a.heads >= par::threads()) {
    par::SerialBlas serial;
    par::parallel_for(a.heads, [&](int64_t h0, int64_t h1) {
      std::vector<float> s(static_cast<size_t>(tq * tk));
      for (int64_t h = h0; h < h1; ++h) one_head(h, s.data(), false);
    });
  } else {
    std::vector<float> s(static_cast<size_t>(tq * tk));
    for (int64_t h = 0; h < a.heads; ++h) one_head(h, s.data(), true);
  }
}

// The n problems from `problems` (both attention() overloads).
void attention_problems(const AttentionArgs* problems, size_t n) {
  int64_t ops = 0;
  for (size_t i = 0; i < n; ++i) ops += attention_ops(problems[i]);
  const Counted counted(g_attention, ops);
  // The few-query problems' heads, numbered through all of them: problem p owns [first[p], first[p + 1]).
  std::vector<const AttentionArgs*> few;
  std::vector<int64_t> first{0};
  int64_t work = 0, max_tk = 0;
  for (size_t i = 0; i < n; ++i) {
    const AttentionArgs& a = problems[i];
    if (a.tq == 0) continue;
    if (on_gpu(a.device)) {
      cuda::attention(a);
    } else if (!few_queries(a)) {
      many_query_attention(a);
    } else {
      few.push_back(&a);
      first.push_back(first.back() + a.heads);
      work += a.heads * a.tq * a.tk * a.head_dim;
      max_tk = std::max(max_tk, a.tk);
    }
  }
  if (few.empty()) return;
  const int64_t heads = first.back();
  par::parallel_for(heads, [&](int64_t h0, int64_t h1) {
    std::vector<float> p(static_cast<size_t>(max_tk));
    size_t k = static_cast<size_t>(std::upper_bound(first.begin(), first.end(), h0) - first.begin()) - 1;
    for (int64_t h = h0; h < h1; ++h) {
      while (h >= first[k + 1]) ++k;
      few_query_head(*few[k], h - first[k], p.data());
    }
  }, std::max<int64_t>(1, kMinWorkPerThread * heads / std::max<int64_t>(work, 1)));
}

}  // namespace

void attention(const AttentionArgs& a) { attention_problems(&a, 1); }
void attention(const std::vector<AttentionArgs>& problems) { attention_problems(problems.data(), problems.size()); }

}  // namespace blip2::ops
