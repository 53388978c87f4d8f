#include "ops/ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace blip2::ops {

namespace {

// Weight rows widened per block, so that F16/BF16 weights go through the same BLAS product as F32 ones
// without a float32 copy of the whole matrix.
constexpr int64_t kWidenRows = 256;

void gemm_f32(const float* x, int64_t rows, int64_t in, const float* w, int64_t out, float* y, int64_t ldy) {
  if (rows == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(out), static_cast<int>(in), 1.0f, w,
                static_cast<int>(in), x, 1, 0.0f, y, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(out),
              static_cast<int>(in), 1.0f, x, static_cast<int>(in), w, static_cast<int>(in), 0.0f, y,
              static_cast<int>(ldy));
}

}  // namespace

void linear(const float* x, int64_t rows, const Weight& w, const Weight& b, float* y) {
  const int64_t out = w.rows(), in = w.cols();
  if (rows == 0 || out == 0) return;
  if (w.dtype == DType::F32) {
    gemm_f32(x, rows, in, static_cast<const float*>(w.data), out, y, out);
  } else {
    std::vector<float> block(static_cast<size_t>(std::min(out, kWidenRows) * in));
    std::vector<float> tmp(rows == 1 ? 0 : static_cast<size_t>(rows * std::min(out, kWidenRows)));
    for (int64_t r0 = 0; r0 < out; r0 += kWidenRows) {
      const int64_t n = std::min(kWidenRows, out - r0);
      w.to_f32(r0 * in, n * in, block.data());
      if (rows == 1) {
        gemm_f32(x, 1, in, block.data(), n, y + r0, n);
      } else {
        gemm_f32(x, rows, in, block.data(), n, y + r0, out);  // writes columns [r0, r0+n) of y
      }
    }
  }
  if (!b.empty()) {
    const std::vector<float> bias = b.f32();
    for (int64_t r = 0; r < rows; ++r) {
      float* yr = y + r * out;
      for (int64_t o = 0; o < out; ++o) yr[o] += bias[o];
    }
  }
}

Tensor linear(const Tensor& x, const Weight& w, const Weight& b) {
  if (x.last() != w.cols())
    fail(ErrorKind::Internal, "linear: input width " + std::to_string(x.last()) + " does not match weight " +
                                  shape_str(w.shape));
  Shape s = x.shape;
  s.back() = w.rows();
  Tensor y(s);
  linear(x.ptr(), x.rows(), w, b, y.ptr());
  return y;
}

void layer_norm(Tensor& x, const Weight& gamma, const Weight& beta, float eps) {
  const int64_t d = x.last();
  const std::vector<float> g = gamma.f32(), bt = beta.f32();
  for (int64_t r = 0; r < x.rows(); ++r) {
    float* p = x.ptr() + r * d;
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < d; ++i) mean += p[i];
    mean /= d;
    for (int64_t i = 0; i < d; ++i) var += (p[i] - mean) * (p[i] - mean);
    var /= d;
    const float inv = static_cast<float>(1.0 / std::sqrt(var + eps));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < d; ++i) p[i] = (p[i] - m) * inv * g[i] + bt[i];
  }
}

void rms_norm(Tensor& x, const Weight& gamma, float eps) {
  const int64_t d = x.last();
  const std::vector<float> g = gamma.f32();
  for (int64_t r = 0; r < x.rows(); ++r) {
    float* p = x.ptr() + r * d;
    double ss = 0.0;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(p[i]) * p[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / d + eps));
    for (int64_t i = 0; i < d; ++i) p[i] = g[i] * (p[i] * inv);
  }
}

void activate(Tensor& x, Activation act) {
  float* p = x.ptr();
  const int64_t n = x.size();
  switch (act) {
    case Activation::GeluErf:
      for (int64_t i = 0; i < n; ++i) p[i] = 0.5f * p[i] * (1.0f + std::erf(p[i] * 0.70710678118654752f));
      return;
    case Activation::GeluTanh:
      for (int64_t i = 0; i < n; ++i) {
        const float v = p[i];
        p[i] = 0.5f * v * (1.0f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
      }
      return;
    case Activation::Relu:
      for (int64_t i = 0; i < n; ++i) p[i] = std::max(p[i], 0.0f);
      return;
  }
}

void add(Tensor& x, const Tensor& y) {
  for (int64_t i = 0; i < x.size(); ++i) x.data[i] += y.data[i];
}

void mul(Tensor& x, const Tensor& y) {
  for (int64_t i = 0; i < x.size(); ++i) x.data[i] *= y.data[i];
}

void scale(Tensor& x, float s) {
  for (float& v : x.data) v *= s;
}

void embedding(const Weight& table, const int32_t* ids, int64_t n, float* out) {
  const int64_t d = table.cols();
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= table.rows())
      fail(ErrorKind::Input, "token id " + std::to_string(ids[i]) + " is outside the embedding table (" +
                                 std::to_string(table.rows()) + " rows)");
    table.to_f32(static_cast<int64_t>(ids[i]) * d, d, out + i * d);
  }
}

void attention(const AttentionArgs& a) {
  std::vector<float> p(static_cast<size_t>(a.tk));
  for (int h = 0; h < a.heads; ++h) {
    const int64_t off = static_cast<int64_t>(h) * a.head_dim;
    for (int64_t i = 0; i < a.tq; ++i) {
      const float* qi = a.q + i * a.ldq + off;
      const float* bias = a.bias ? a.bias + (static_cast<int64_t>(h) * a.tq + i) * a.tk : nullptr;
      float mx = -INFINITY;
      for (int64_t j = 0; j < a.tk; ++j) {
        if (a.key_mask && !a.key_mask[j]) {
          p[j] = -INFINITY;
          continue;
        }
        const float* kj = a.k + j * a.ldk + off;
        float s = 0.0f;
        for (int d = 0; d < a.head_dim; ++d) s += qi[d] * kj[d];
        s *= a.scale;
        if (bias) s += bias[j];
        p[j] = s;
        mx = std::max(mx, s);
      }
      float* oi = a.out + i * a.ldo + off;
      std::fill(oi, oi + a.head_dim, 0.0f);
      if (mx == -INFINITY) continue;  // every key masked: HF would give a uniform average; never happens here
      float sum = 0.0f;
      for (int64_t j = 0; j < a.tk; ++j) {
        p[j] = (p[j] == -INFINITY) ? 0.0f : std::exp(p[j] - mx);
        sum += p[j];
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < a.tk; ++j) {
        if (p[j] == 0.0f) continue;
        const float w = p[j] * inv;
        const float* vj = a.v + j * a.ldv + off;
        for (int d = 0; d < a.head_dim; ++d) oi[d] += w * vj[d];
      }
    }
  }
}

}  // namespace blip2::ops
