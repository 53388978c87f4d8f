// Dispatch, the portable scalar kernels, activation quantization and the load-time weight conversion.
#include "ops/kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "ops/kernels_impl.h"
#include "ops/parallel.h"

namespace blip2::kern {

namespace detail {
namespace {

// ---- scalar kernels -------------------------------------------------------------------------------------

float load_w(const WView& w, int64_t i) {
  switch (w.dtype) {
    case DType::F32: return static_cast<const float*>(w.data)[i];
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(w.data)[i]);
    case DType::BF16: return bf16_bits_to_f32(static_cast<const uint16_t*>(w.data)[i]);
    default: return 0.0f;
  }
}

void gemv_float_scalar(const float* x, int64_t ldx, int R, const WView& w, int64_t o0, int64_t o1, float* y,
                       int64_t ldy) {
  const int64_t in = w.cols;
  for (int64_t o = o0; o < o1; ++o)
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx;
      float s = 0.0f;
      for (int64_t i = 0; i < in; ++i) s += load_w(w, o * in + i) * xr[i];
      y[r * ldy + o] = s;
    }
}

void gemv_i8_scalar(const QView& x, const WView& w, int64_t o0, int64_t o1, float* y, int64_t ldy, int8_t*,
                    const CView* columns) {
  const int64_t ld = w.ld, B = x.block, nb = ld / B;
  const auto* q = static_cast<const int8_t*>(w.data);
  const auto* sw = static_cast<const float*>(w.scales);
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t r = 0; r < x.rows; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t d = 0;
        const int8_t* wq = q + o * ld + b * B;
        const int8_t* aq = x.q + r * ld + b * B;
        for (int64_t i = 0; i < B; ++i) d += static_cast<int32_t>(wq[i]) * aq[i];
        acc = std::fma(static_cast<float>(d), x.scale[r * nb + b], acc);  // as every I8 kernel (kernels_avx2.cpp)
      }
      y[r * ldy + o] = acc * sw[o];
    }
  if (columns != nullptr) add_i8_columns(*columns, x.rows, w, o0, o1, y, ldy);
}

void gemv_i4_scalar(const QView& x, const WView& w, int64_t o0, int64_t o1, float* y, int64_t ldy) {
  const int64_t ld = w.ld, G = w.group, ng = ld / G;
  const auto* q = static_cast<const uint8_t*>(w.data);
  const auto* sw = static_cast<const uint16_t*>(w.scales);
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = q + o * (ld / 2);
    for (int64_t r = 0; r < x.rows; ++r) {
      float acc = 0.0f;
      for (int64_t g = 0; g < ng; ++g) {
        int32_t d = 0;  // Σ (q + 8) · a, then the offset removed exactly
        for (int64_t k = g * G; k < (g + 1) * G; ++k) {
          const int u = i4_nibble(row, k);
          d += u * x.q[r * ld + k];
        }
        d -= 8 * x.sum[r * ng + g];
        acc += (static_cast<float>(d) * x.scale[r * ng + g]) * f16_to_f32(sw[o * ng + g]);
      }
      y[r * ldy + o] = acc;
    }
  }
}

void gemv_i8_float_scalar(const float* x, int64_t ldx, int R, const WView& w, int64_t o0, int64_t o1, float* y,
                          int64_t ldy) {
  const int64_t in = w.cols, ld = w.ld;
  const auto* q = static_cast<const int8_t*>(w.data);
  const auto* sw = static_cast<const float*>(w.scales);
  for (int64_t o = o0; o < o1; ++o)
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int64_t i = 0; i < in; ++i) s += static_cast<float>(q[o * ld + i]) * x[r * ldx + i];
      y[r * ldy + o] = s * sw[o];
    }
}

void quantize_rows_scalar(const float* x, int64_t rows, int64_t cols, int64_t ldx, const QOut& out) {
  const int64_t ld = out.ld, B = out.block, nb = ld / B;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t lo = b * B, hi = std::min(cols, lo + B);
      float amax = 0.0f;
      for (int64_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(xr[i]));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      int8_t* q = out.q + r * ld + lo;
      for (int64_t i = 0; i < B; ++i) {
        const int v = lo + i < hi ? static_cast<int>(std::nearbyint(xr[lo + i] * inv)) : 0;
        q[i] = static_cast<int8_t>(v);
        sum += v;
      }
      out.scale[r * nb + b] = amax / 127.0f;
      out.sum[r * nb + b] = sum;
    }
  }
}

void dequant_rows_scalar(const WView& w, int64_t r0, int64_t n, float* out, int64_t ldo) {
  const int64_t c = w.cols;
  for (int64_t r = 0; r < n; ++r) {
    float* d = out + r * ldo;
    const int64_t row = r0 + r;
    switch (w.dtype) {
      case DType::F32:
      case DType::F16:
      case DType::BF16:
        for (int64_t i = 0; i < c; ++i) d[i] = load_w(w, row * c + i);
        break;
      case DType::I8: {
        const auto* q = static_cast<const int8_t*>(w.data) + row * w.ld;
        const float s = static_cast<const float*>(w.scales)[row];
        for (int64_t i = 0; i < c; ++i) d[i] = static_cast<float>(q[i]) * s;
        break;
      }
      case DType::I4: {
        const auto* q = static_cast<const uint8_t*>(w.data) + row * (w.ld / 2);
        const auto* s = static_cast<const uint16_t*>(w.scales) + row * (w.ld / w.group);
        for (int64_t k = 0; k < c; ++k) {
          const int v = i4_nibble(q, k) - 8;
          d[k] = static_cast<float>(v) * f16_to_f32(s[k / w.group]);
        }
        break;
      }
    }
  }
}

void quantize_weight_i8_scalar(const float* x, int64_t cols, int64_t ld, int8_t* q, float* scale) {
  float amax = 0.0f;
  for (int64_t i = 0; i < cols; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int64_t i = 0; i < cols; ++i)
    q[i] = static_cast<int8_t>(std::clamp(static_cast<int>(nearbyintf(x[i] * inv)), -127, 127));
  std::memset(q + cols, 0, static_cast<size_t>(ld - cols));
  *scale = amax / 127.0f;
}

// Groups of G: the element of largest magnitude maps to -8 exactly (llama.cpp's Q4_0 rule), so the
// 16 levels span [-8d, 7d] with d = -m/8; the scale is rounded to half first and the levels computed from
// the rounded scale.
void quantize_weight_i4_scalar(const float* x, int64_t cols, int64_t ld, int G, uint8_t* out, uint16_t* scales) {
  std::vector<uint8_t> u(static_cast<size_t>(ld), 8);
  for (int64_t g = 0; g < ld / G; ++g) {
    float m = 0.0f, amax = 0.0f;
    for (int64_t i = g * G; i < std::min(cols, (g + 1) * G); ++i)
      if (std::fabs(x[i]) > amax) {
        amax = std::fabs(x[i]);
        m = x[i];
      }
    const float d = std::clamp(m / -8.0f, -65504.0f, 65504.0f);
    const uint16_t h = f32_to_f16(d);
    const float dr = f16_to_f32(h);
    const float inv = dr != 0.0f ? 1.0f / dr : 0.0f;
    scales[g] = h;
    for (int64_t i = g * G; i < std::min(cols, (g + 1) * G); ++i)
      u[i] = static_cast<uint8_t>(std::clamp(static_cast<int>(nearbyintf(x[i] * inv)), -8, 7) + 8);
  }
  for (int64_t s = 0; s < ld / 64; ++s)
    for (int j = 0; j < 32; ++j)
      out[s * 32 + j] = static_cast<uint8_t>(u[s * 64 + j] | (u[s * 64 + 32 + j] << 4));
}

void round_half_scalar(const float* x, int64_t n, uint16_t* out, bool f16) {
  for (int64_t i = 0; i < n; ++i) out[i] = f16 ? f32_to_f16(x[i]) : f32_to_bf16(x[i]);
}

void gelu_erf_scalar(float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = 0.5f * p[i] * (1.0f + std::erf(p[i] * 0.70710678118654752f));
}

void gelu_tanh_scalar(float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = p[i];
    p[i] = 0.5f * v * (1.0f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  }
}

float exp_sum_scalar(float* p, int64_t n, float mx) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = std::exp(p[i] - mx);
    s += p[i];
  }
  return s;
}

float dot_scalar(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_scalar(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

int64_t int8_dot_loop_scalar(int64_t iters, int32_t* sink, DotLoop /*loop*/) {
  int32_t acc[8] = {};
  int32_t s = 3;
  for (int64_t i = 0; i < iters; ++i) {
    for (int k = 0; k < 8; ++k) acc[k] += static_cast<int8_t>(k + s) * static_cast<int8_t>(s - k);
    __asm__ volatile("" : "+r"(s));
  }
  *sink = acc[0] + acc[7];
  return iters * 8;
}

}  // namespace

const Impl kScalar = {"scalar",
                      gemv_float_scalar,
                      gemv_i8_scalar,
                      gemv_i4_scalar,
                      gemv_i8_float_scalar,
                      quantize_rows_scalar,
                      dequant_rows_scalar,
                      quantize_weight_i8_scalar,
                      quantize_weight_i4_scalar,
                      round_half_scalar,
                      gelu_erf_scalar,
                      gelu_tanh_scalar,
                      exp_sum_scalar,
                      dot_scalar,
                      axpy_scalar,
                      int8_dot_loop_scalar};

#ifndef BLIP2_HAVE_AVX2_KERNELS
const Impl* avx2_impl() { return nullptr; }
#endif
#ifndef BLIP2_HAVE_VNNI_KERNELS
const Impl* vnni_impl() { return nullptr; }
#endif

}  // namespace detail

namespace {

using detail::Impl;
using detail::QOut;
using detail::QView;
using detail::WView;

WView view(const Weight& w) {
  return {w.dtype, w.data, w.scales, w.rows(), w.cols(), w.ld, w.group};
}
// Rows [r0, r1) of x.
QView view(const QuantRows& x, int64_t r0, int64_t r1) {
  const int64_t nb = x.ld / x.block;
  return {x.q.data() + r0 * x.ld, x.scale.data() + r0 * nb, x.sum.data() + r0 * nb, r1 - r0, x.ld, x.block};
}

std::atomic<bool> g_force_scalar{false};

// The best vector set this CPU runs: AVX2 with VNNI dot products where it has AVX-512 VNNI (and VL), else
// AVX2; null without AVX2. BLIP2_ISA=avx2 in the environment keeps to AVX2 (to compare the two).
const Impl* avx2_or_null() {
  static const Impl* p = [] {
    if (!cpu_has_avx2()) return static_cast<const Impl*>(nullptr);
    const char* want = std::getenv("BLIP2_ISA");
    const Impl* v = (want && std::string(want) == "avx2") ? nullptr : detail::vnni_impl();
#if defined(__x86_64__) || defined(__i386__)
    if (v && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) return v;
#endif
    return detail::avx2_impl();
  }();
  return p;
}

const Impl& impl() {
  const Impl* a = avx2_or_null();
  return (a && !g_force_scalar.load(std::memory_order_relaxed)) ? *a : detail::kScalar;
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

}  // namespace

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

void force_scalar(bool on) { g_force_scalar.store(on); }
bool using_avx2() { return &impl() != &detail::kScalar; }
const char* isa_name() { return impl().name; }

void QuantRows::resize(int64_t r, int64_t l, int b) {
  rows = r;
  ld = l;
  block = b;
  q.resize(static_cast<size_t>(r * l));
  scale.resize(static_cast<size_t>(r * (l / b)));
  sum.resize(scale.size());
}

namespace {
std::atomic<int> g_i8_block{kI8ActBlock};
}  // namespace

void set_i8_act_block(int block) { g_i8_block.store(block); }

int act_block(const Weight& w) {
  if (w.dtype == DType::I4) return w.group;
  const int b = g_i8_block.load(std::memory_order_relaxed);
  // The block must divide the padded row (a multiple of 32); otherwise fall back to 32.
  if (b == 0) return static_cast<int>(w.ld);
  return w.ld % b == 0 ? b : 32;
}

namespace {
std::atomic<int> g_max_outliers{kMaxOutlierColumns};
}  // namespace

void set_max_outlier_columns(int n) { g_max_outliers.store(std::clamp(n, 0, kOutlierColumnsLimit)); }
int max_outlier_columns() { return g_max_outliers.load(std::memory_order_relaxed); }

int outlier_columns(const float* x, int64_t rows, int64_t cols, int64_t ldx, int max, int32_t* out, int* counts) {
  max = std::min(max, kOutlierColumnsLimit);
  if (max <= 0 || cols <= 0) {
    for (int64_t r = 0; r < rows; ++r) counts[r] = 0;
    return 0;
  }
  std::atomic<int> total{0};
  const auto scan = [&](int64_t r0, int64_t r1) {
    struct Cand {
      int32_t col;
      float ratio;
    };
    std::vector<Cand> cand;  // empty (no allocation) unless a row has a candidate
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * ldx;
      float s[8] = {}, m[8] = {};  // 8 partial sums and maxima, so that the compiler can vectorise the pass
      int64_t i = 0;
      for (; i + 8 <= cols; i += 8)
        for (int k = 0; k < 8; ++k) {
          const float a = std::fabs(xr[i + k]);
          s[k] += a;
          m[k] = std::max(m[k], a);
        }
      for (; i < cols; ++i) {
        const float a = std::fabs(xr[i]);
        s[0] += a;
        m[0] = std::max(m[0], a);
      }
      float sum = 0.0f, mx = 0.0f;
      for (int k = 0; k < 8; ++k) {
        sum += s[k];
        mx = std::max(mx, m[k]);
      }
      const float mean = sum / static_cast<float>(cols), thr = kOutlierRatio * mean;
      counts[r] = 0;
      if (!(mx > thr)) continue;  // the usual row (also all-zero and non-finite ones)
      cand.clear();
      for (int64_t j = 0; j < cols; ++j)
        if (std::fabs(xr[j]) > thr) cand.push_back({static_cast<int32_t>(j), std::fabs(xr[j]) / mean});
      // The `max` largest ratios (ties: the lower column), then in column order.
      const size_t n = std::min(cand.size(), static_cast<size_t>(max));
      std::partial_sort(cand.begin(), cand.begin() + static_cast<std::ptrdiff_t>(n), cand.end(),
                        [](const Cand& a, const Cand& b) { return a.ratio != b.ratio ? a.ratio > b.ratio : a.col < b.col; });
      std::sort(cand.begin(), cand.begin() + static_cast<std::ptrdiff_t>(n),
                [](const Cand& a, const Cand& b) { return a.col < b.col; });
      for (size_t k = 0; k < n; ++k) out[r * max + static_cast<int64_t>(k)] = cand[k].col;
      counts[r] = static_cast<int>(n);
      total += static_cast<int>(n);
    }
  };
  // Prefill (the ViT's 257 rows per image) on the pool: each row's result is its own, whatever the split.
  if (rows * cols >= (int64_t{1} << 16)) par::parallel_for(rows, scan, std::max<int64_t>(1, (int64_t{1} << 15) / cols));
  else scan(0, rows);
  return total.load();
}

namespace {

// gemv_q's outlier columns for I4 weights (I8 kernels add their own), after the integer product.
void add_i4_columns(const RowColumns& c, int64_t rows, const Weight& w, int64_t o0, int64_t o1, float* y,
                    int64_t ldy) {
  const int64_t rb = w.ld / 2, ng = w.ld / w.group;
  const auto* q = static_cast<const uint8_t*>(w.data);
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * ldy;
    for (int k = 0; k < c.counts[r]; ++k) {
      const int64_t j = c.cols[r * c.max + k];
      const float a = c.x[r * c.ldx + j];
      const auto* sw = static_cast<const uint16_t*>(w.scales) + j / w.group;
      for (int64_t o = o0; o < o1; ++o)
        yr[o] += a * (static_cast<float>(i4_nibble(q + o * rb, j) - 8) * f16_to_f32(sw[o * ng]));
    }
  }
}

}  // namespace

void add_float_columns(const float* x, int64_t ldx, int64_t rows, const Weight& w, int64_t o0, int64_t o1, float* y,
                       int64_t ldy) {
  const int n = w.n_float_columns;
  float a[kFloatColumnsLimit];
  for (int64_t r = 0; r < rows; ++r) {
    for (int k = 0; k < n; ++k) a[k] = x[r * ldx + w.float_columns[k]];
    float* yr = y + r * ldy;
    for (int64_t o = o0; o < o1; ++o) {
      const float* wo = w.column_weights + o * n;
      float acc = 0.0f;
      for (int k = 0; k < n; ++k) acc += a[k] * wo[k];
      yr[o] += acc;
    }
  }
}

void quantize_rows(const float* x, int64_t rows, int64_t cols, int64_t ldx, QuantRows& out, int64_t first) {
  if (first < 0 || first + rows > out.rows || out.ld < cols || out.ld % out.block != 0 || out.block % 32 != 0)
    fail(ErrorKind::Internal, "quantize_rows: output not sized for the input");
  const int64_t nb = out.ld / out.block;
  impl().quantize_rows(x, rows, cols, ldx,
                       QOut{out.q.data() + first * out.ld, out.scale.data() + first * nb, out.sum.data() + first * nb,
                            rows, out.ld, out.block});
}

void gemv(const float* x, int64_t ldx, int R, const Weight& w, int64_t o0, int64_t o1, float* y, int64_t ldy) {
  impl().gemv_float(x, ldx, R, view(w), o0, o1, y, ldy);
}

void gemv_q(const QuantRows& x, int64_t r0, int64_t r1, const Weight& w, int64_t o0, int64_t o1, float* y,
            int64_t ldy, const RowColumns* columns) {
  if (r0 < 0 || r1 > x.rows || r0 > r1) fail(ErrorKind::Internal, "gemv_q: rows out of range");
  if (x.ld != w.ld || x.block != act_block(w))
    fail(ErrorKind::Internal, "gemv_q: activations not quantized for this weight (ld " + std::to_string(x.ld) + " vs " + std::to_string(w.ld) + ", block " + std::to_string(x.block) + " vs " + std::to_string(act_block(w)) + ")");
  if (w.dtype == DType::I8) {
    thread_local std::vector<int8_t> scratch;
    scratch.resize(static_cast<size_t>(detail::kI8PackedOutputs * w.ld));
    const detail::CView c =
        columns ? detail::CView{columns->x, columns->ldx, columns->cols, columns->counts, columns->max} : detail::CView{};
    impl().gemv_i8(view(x, r0, r1), view(w), o0, o1, y + r0 * ldy, ldy, scratch.data(), columns ? &c : nullptr);
  } else {
    impl().gemv_i4(view(x, r0, r1), view(w), o0, o1, y + r0 * ldy, ldy);
    if (columns != nullptr) add_i4_columns(*columns, r1 - r0, w, o0, o1, y + r0 * ldy, ldy);
  }
}

void gemv_i8_float(const float* x, int64_t ldx, int R, const Weight& w, int64_t o0, int64_t o1, float* y,
                   int64_t ldy) {
  impl().gemv_i8_float(x, ldx, R, view(w), o0, o1, y, ldy);
}

void dequant_rows(const Weight& w, int64_t r0, int64_t n, float* out, int64_t ldo) {
  impl().dequant_rows(view(w), r0, n, out, ldo);
  for (int64_t r = 0; r < n; ++r)  // the float columns over their zeros
    for (int k = 0; k < w.n_float_columns; ++k)
      out[r * ldo + w.float_columns[k]] = w.column_weights[(r0 + r) * w.n_float_columns + k];
}

void gelu_erf(float* p, int64_t n) { impl().gelu_erf(p, n); }
void gelu_tanh(float* p, int64_t n) { impl().gelu_tanh(p, n); }
float exp_sum(float* p, int64_t n, float mx) { return impl().exp_sum(p, n, mx); }
float dot(const float* a, const float* b, int64_t n) { return impl().dot(a, b, n); }
void axpy(float a, const float* x, float* y, int64_t n) { impl().axpy(a, x, y, n); }
int64_t int8_dot_loop(int64_t iters, int32_t* sink, DotLoop loop) {
  return impl().int8_dot_loop(iters, sink, loop);
}

// ---- conversion at load ---------------------------------------------------------------------------------

namespace {

// One 64-byte aligned allocation, freed with the last Weight sharing it.
std::shared_ptr<uint8_t> alloc_aligned(size_t bytes) {
  bytes = static_cast<size_t>(round_up(static_cast<int64_t>(std::max<size_t>(bytes, 1)), 64));
  void* p = std::aligned_alloc(64, bytes);
  if (!p) fail(ErrorKind::Model, "out of memory converting weights (" + std::to_string(bytes) + " bytes)");
  return std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p), [](uint8_t* q) { std::free(q); });
}

}  // namespace

Weight convert(const Weight& w, DType to, int group, const std::vector<int32_t>& float_columns) {
  if (w.shape.size() != 2) fail(ErrorKind::Internal, "convert: only matrices are converted");
  if (w.quantized()) fail(ErrorKind::Internal, "convert: the source is already quantized");
  const int nf = static_cast<int>(float_columns.size());
  if (nf > 0) {
    if (to != DType::I8 && to != DType::I4) fail(ErrorKind::Internal, "convert: float columns need int8 or int4");
    if (nf > kFloatColumnsLimit) fail(ErrorKind::Internal, "convert: too many float columns");
    if (first_bad_float_column(float_columns.data(), nf, w.cols()) != nf)
      fail(ErrorKind::Internal, "convert: float columns must be ascending column indices");
  }
  if (to == w.dtype) return w;
  if (to == DType::I4 && group != 32 && group != 64 && group != 128)
    fail(ErrorKind::Usage, "int4 group size must be 32, 64 or 128 (got " + std::to_string(group) + ")");
  const int64_t rows = w.rows(), cols = w.cols();
  Weight out;
  out.dtype = to;
  out.shape = w.shape;
  std::shared_ptr<uint8_t> buf;
  constexpr int64_t kChunk = 16;  // rows per task
  // The float columns' values, taken out of each row before it is converted.
  std::shared_ptr<float[]> column_weights(nf > 0 ? new float[static_cast<size_t>(rows * nf)] : nullptr);
  const auto for_rows = [&](const std::function<void(int64_t, const float*)>& each) {
    par::parallel_for(rows, [&](int64_t r0, int64_t r1) {
      std::vector<float> tmp(static_cast<size_t>(kChunk * cols));
      for (int64_t r = r0; r < r1; r += kChunk) {
        const int64_t n = std::min(kChunk, r1 - r);
        dequant_rows(w, r, n, tmp.data(), cols);
        for (int64_t i = 0; i < n; ++i)
          for (int k = 0; k < nf; ++k) {
            float& v = tmp[static_cast<size_t>(i * cols + float_columns[k])];
            column_weights[(r + i) * nf + k] = v;
            v = 0.0f;
          }
        for (int64_t i = 0; i < n; ++i) each(r + i, tmp.data() + i * cols);
      }
    }, kChunk, kChunk);
  };
  switch (to) {
    case DType::F32:
    case DType::F16:
    case DType::BF16: {
      buf = alloc_aligned(static_cast<size_t>(rows * cols) * dtype_size(to));
      uint8_t* base = buf.get();
      for_rows([&](int64_t r, const float* x) {
        if (to == DType::F32) {
          std::memcpy(reinterpret_cast<float*>(base) + r * cols, x, static_cast<size_t>(cols) * 4);
        } else {
          impl().round_half(x, cols, reinterpret_cast<uint16_t*>(base) + r * cols, to == DType::F16);
        }
      });
      out.data = base;
      break;
    }
    case DType::I8: {
      const int64_t ld = quantized_ld(DType::I8, cols, 0), data_bytes = round_up(rows * ld, 64);
      buf = alloc_aligned(static_cast<size_t>(data_bytes + rows * 4));
      auto* q = reinterpret_cast<int8_t*>(buf.get());
      auto* s = reinterpret_cast<float*>(buf.get() + data_bytes);
      for_rows([&](int64_t r, const float* x) { impl().quantize_weight_i8(x, cols, ld, q + r * ld, s + r); });
      out.data = q;
      out.scales = s;
      out.ld = ld;
      break;
    }
    case DType::I4: {
      const int64_t ld = quantized_ld(DType::I4, cols, group), ng = ld / group;
      const int64_t data_bytes = round_up(rows * ld / 2, 64);
      buf = alloc_aligned(static_cast<size_t>(data_bytes + rows * ng * 2));
      auto* q = buf.get();
      auto* s = reinterpret_cast<uint16_t*>(buf.get() + data_bytes);
      for_rows([&](int64_t r, const float* x) { impl().quantize_weight_i4(x, cols, ld, group, q + r * (ld / 2), s + r * ng); });
      out.data = q;
      out.scales = s;
      out.ld = ld;
      out.group = group;
      break;
    }
  }
  out.owner = buf;
  if (nf > 0) {
    auto columns = std::make_shared<std::vector<int32_t>>(float_columns);
    out.float_columns = columns->data();
    out.column_weights = column_weights.get();
    out.n_float_columns = nf;
    out.owner = std::make_shared<std::tuple<std::shared_ptr<uint8_t>, std::shared_ptr<std::vector<int32_t>>,
                                            std::shared_ptr<float[]>>>(buf, columns, column_weights);
  }
  return out;
}

}  // namespace blip2::kern
