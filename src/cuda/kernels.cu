// Every op but the matrix products, as plain kernels that mirror the CPU code line for line (ops/ops.cpp):
// norms with double sums, GELU in both forms, element-wise ops, lookups, the ViT's patch unrolling, T5's
// bias gather, attention and the greedy pick. Simple first: correctness against the CPU is the point.
#include <vector>

#include "cuda/common.cuh"
#include "ops/ops.h"

namespace blip2::cuda {

namespace {

__global__ void layer_norm_kernel(float* x, int64_t d, WeightView g, WeightView b, float eps) {
  float* p = x + blockIdx.x * d;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) s += p[i];
  const double mean = block_sum(s) / d;
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) v += (p[i] - mean) * (p[i] - mean);
  const double var = block_sum(v) / d;
  const float inv = static_cast<float>(1.0 / sqrt(var + eps)), m = static_cast<float>(mean);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) p[i] = (p[i] - m) * inv * vector_at(g, i) + vector_at(b, i);
}

__global__ void rms_norm_kernel(float* x, int64_t d, WeightView g, float eps) {
  float* p = x + blockIdx.x * d;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) s += static_cast<double>(p[i]) * p[i];
  const float inv = static_cast<float>(1.0 / sqrt(block_sum(s) / d + eps));
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) p[i] = vector_at(g, i) * (p[i] * inv);
}

#define GRID_STRIDE(i, n) for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

__global__ void activate_kernel(float* x, int64_t n, int act) {
  GRID_STRIDE(i, n) {
    const float v = x[i];
    switch (static_cast<Activation>(act)) {
      case Activation::GeluErf: x[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); break;
      case Activation::GeluTanh:
        x[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
        break;
      case Activation::Relu: x[i] = fmaxf(v, 0.0f); break;
      case Activation::Silu: x[i] = v / (1.0f + expf(-v)); break;
    }
  }
}

__global__ void add_kernel(float* x, const float* y, int64_t n) { GRID_STRIDE(i, n) x[i] += y[i]; }
__global__ void mul_kernel(float* x, const float* y, int64_t n) { GRID_STRIDE(i, n) x[i] *= y[i]; }
__global__ void scale_kernel(float* x, int64_t n, float s) { GRID_STRIDE(i, n) x[i] *= s; }
__global__ void add_broadcast_kernel(float* x, int64_t n, const float* y, int64_t m) { GRID_STRIDE(i, n) x[i] += y[i % m]; }

// Each thread turns one (row, head, i) pair: elements i and i + half of that head (the CPU's loop, ops.cpp).
__global__ void rotary_kernel(float* x, int64_t rows, int64_t heads, int64_t half, const float* cs) {
  GRID_STRIDE(j, rows * heads * half) {
    const int64_t i = j % half, h = (j / half) % heads, r = j / (half * heads);
    float* v = x + (r * heads + h) * 2 * half;
    const float c = cs[(r * half + i) * 2], s = cs[(r * half + i) * 2 + 1], a = v[i], b = v[i + half];
    v[i] = a * c - b * s;
    v[i + half] = b * c + a * s;
  }
}

__global__ void gather_rows_kernel(WeightView t, const int32_t* ids, int64_t n, float* out) {
  GRID_STRIDE(i, n * t.cols) out[i] = weight_at(t, ids[i / t.cols], i % t.cols);
}

__global__ void widen_kernel(WeightView w, int64_t n, float* out) { GRID_STRIDE(i, n) out[i] = weight_at(w, i / w.cols, i % w.cols); }

__global__ void patchify_kernel(const float* px, int64_t B, int64_t S, int64_t P, float* out) {
  const int64_t G = S / P, K = 3 * P * P;
  GRID_STRIDE(i, B * G * G * K) {
    const int64_t k = i % K, patch = i / K, b = patch / (G * G), gy = (patch / G) % G, gx = patch % G;
    const int64_t c = k / (P * P), ky = (k / P) % P, kx = k % P;
    out[i] = px[((b * 3 + c) * S + gy * P + ky) * S + gx * P + kx];
  }
}

__global__ void relative_bias_kernel(WeightView t, const int32_t* buckets, int64_t n, int64_t H, float* out) {
  GRID_STRIDE(i, H * n) out[i] = weight_at(t, buckets[i % n], i / n);  // out [H, tq·tk]
}

// One block per (query row, head): scores into shared memory, softmax, then the weighted sum of values, each
// thread owning output dimensions. Masked keys (and, when causal, later ones) get probability 0; a row with
// none visible is zeros, as on the CPU.
__global__ void attention_kernel(ops::AttentionArgs a) {
  extern __shared__ float smem[];
  float* qs = smem;              // [head_dim]
  float* s = smem + a.head_dim;  // [tk]
  const int64_t i = blockIdx.x, h = blockIdx.y, off = h * a.head_dim, hd = a.head_dim;
  const int64_t visible = a.causal ? min(a.tk, i + (a.tk - a.tq) + 1) : a.tk;
  for (int64_t c = threadIdx.x; c < hd; c += blockDim.x) qs[c] = a.q[i * a.ldq + off + c];
  __syncthreads();
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < a.tk; j += blockDim.x) {
    float v = -INFINITY;
    if ((!a.key_mask || a.key_mask[j]) && j < visible) {
      const float* kj = a.k + j * a.ldk + off;
      float dot = 0.0f;
      for (int64_t c = 0; c < hd; ++c) dot += qs[c] * kj[c];
      v = dot * a.scale;
      if (a.bias) v += a.bias[(h * a.tq + i) * a.tk + j];
    }
    s[j] = v;
    mx = fmaxf(mx, v);
  }
  mx = block_max(mx);
  float* out = a.out + i * a.ldo + off;
  if (mx == -INFINITY) {
    for (int64_t c = threadIdx.x; c < hd; c += blockDim.x) out[c] = 0.0f;
    return;
  }
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < a.tk; j += blockDim.x) {
    s[j] = expf(s[j] - mx);
    sum += s[j];
  }
  const float inv = 1.0f / block_sum(sum);  // block_sum synchronises: every s[j] is written
  for (int64_t c = threadIdx.x; c < hd; c += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j < a.tk; ++j) acc += s[j] * a.v[j * a.ldv + off + c];
    out[c] = acc * inv;
  }
}

// One block per row: the first largest element (a (value, index) reduction: the larger value wins, equal
// values the lower index), then log Σ exp(x − max) in double, as the CPU computes a greedy step's score.
__global__ void greedy_pick_kernel(const float* x, int64_t cols, ops::Pick* out) {
  const float* p = x + blockIdx.x * cols;
  float best = -INFINITY;
  int64_t at = cols;  // none yet
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)  // j rises: the first of equal maxima stays
    if (at == cols || p[j] > best) {
      best = p[j];
      at = j;
    }
  __shared__ float vals[1024];
  __shared__ int64_t idx[1024];
  vals[threadIdx.x] = best;
  idx[threadIdx.x] = at;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      const float v = vals[threadIdx.x + stride];
      const int64_t k = idx[threadIdx.x + stride];
      if (k != cols && (idx[threadIdx.x] == cols || v > vals[threadIdx.x] ||
                        (v == vals[threadIdx.x] && k < idx[threadIdx.x]))) {
        vals[threadIdx.x] = v;
        idx[threadIdx.x] = k;
      }
    }
    __syncthreads();
  }
  const float mx = vals[0];
  double sum = 0.0;
  int bad = 0;  // NaNs and infinities: the pick's log-probability is then NaN, as on the CPU
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    sum += exp(static_cast<double>(p[j] - mx));
    bad += !isfinite(p[j]);
  }
  sum = block_sum(sum);
  bad = block_sum(bad);
  if (threadIdx.x == 0)
    out[blockIdx.x] = {static_cast<int32_t>(idx[0] == cols ? 0 : idx[0]), bad ? NAN : static_cast<float>(-log(sum))};
}

// Host ids uploaded for one call.
const int32_t* upload_ids(Scratch& s, const int32_t* host, int64_t n) {
  copy(s.as<int32_t>(), host, static_cast<size_t>(n) * 4, CopyKind::HostToDevice);
  return s.as<int32_t>();
}

}  // namespace

void layer_norm(float* x, int64_t rows, int64_t d, const Weight& g, const Weight& b, float eps) {
  if (rows == 0) return;
  layer_norm_kernel<<<static_cast<unsigned>(rows), 256, 0, stream()>>>(x, d, view(g), view(b), eps);
  BLIP2_LAUNCHED("layer_norm");
}

void rms_norm(float* x, int64_t rows, int64_t d, const Weight& g, float eps) {
  if (rows == 0) return;
  rms_norm_kernel<<<static_cast<unsigned>(rows), 256, 0, stream()>>>(x, d, view(g), eps);
  BLIP2_LAUNCHED("rms_norm");
}

void activate(float* x, int64_t n, Activation act) {
  if (n == 0) return;
  activate_kernel<<<blocks_for(n), 256, 0, stream()>>>(x, n, static_cast<int>(act));
  BLIP2_LAUNCHED("activate");
}

void add(float* x, const float* y, int64_t n) {
  if (n == 0) return;
  add_kernel<<<blocks_for(n), 256, 0, stream()>>>(x, y, n);
  BLIP2_LAUNCHED("add");
}

void mul(float* x, const float* y, int64_t n) {
  if (n == 0) return;
  mul_kernel<<<blocks_for(n), 256, 0, stream()>>>(x, y, n);
  BLIP2_LAUNCHED("mul");
}

void rotary(float* x, int64_t rows, int64_t heads, int64_t head_dim, const float* cos_sin) {
  const int64_t n = rows * heads * (head_dim / 2);
  if (n == 0) return;
  rotary_kernel<<<blocks_for(n), 256, 0, stream()>>>(x, rows, heads, head_dim / 2, cos_sin);
  BLIP2_LAUNCHED("rotary");
}

void scale(float* x, int64_t n, float s) {
  if (n == 0) return;
  scale_kernel<<<blocks_for(n), 256, 0, stream()>>>(x, n, s);
  BLIP2_LAUNCHED("scale");
}

void add_broadcast(float* x, int64_t n, const float* y, int64_t period) {
  if (n == 0) return;
  add_broadcast_kernel<<<blocks_for(n), 256, 0, stream()>>>(x, n, y, period);
  BLIP2_LAUNCHED("add_broadcast");
}

void embedding(const Weight& table, const int32_t* host_ids, int64_t n, float* out) {
  if (n == 0) return;
  Scratch ids(static_cast<size_t>(n) * 4);
  gather_rows_kernel<<<blocks_for(n * table.cols()), 256, 0, stream()>>>(view(table), upload_ids(ids, host_ids, n), n, out);
  BLIP2_LAUNCHED("embedding");
}

void weight_f32(const Weight& w, float* out) {
  const int64_t n = numel(w.shape);
  if (n == 0) return;
  widen_kernel<<<blocks_for(n), 256, 0, stream()>>>(view(w), n, out);
  BLIP2_LAUNCHED("weight_f32");
}

void patchify(const float* pixels, int64_t batch, int64_t image_size, int64_t patch, float* out) {
  const int64_t n = batch * image_size * image_size * 3;
  patchify_kernel<<<blocks_for(n), 256, 0, stream()>>>(pixels, batch, image_size, patch, out);
  BLIP2_LAUNCHED("patchify");
}

void relative_bias(const Weight& table, const int32_t* host_buckets, int64_t tq, int64_t tk, float* out) {
  const int64_t n = tq * tk, H = table.cols();
  if (n == 0) return;
  Scratch b(static_cast<size_t>(n) * 4);
  relative_bias_kernel<<<blocks_for(n * H), 256, 0, stream()>>>(view(table), upload_ids(b, host_buckets, n), n, H, out);
  BLIP2_LAUNCHED("relative_bias");
}

void attention(const ops::AttentionArgs& a) {
  const size_t smem = static_cast<size_t>(a.head_dim + a.tk) * 4;
  if (smem > 48 * 1024)
    fail(ErrorKind::Input, "attention over " + std::to_string(a.tk) + " positions: the CUDA kernel takes at most " +
                               std::to_string(48 * 1024 / 4 - a.head_dim));
  const dim3 grid(static_cast<unsigned>(a.tq), static_cast<unsigned>(a.heads));
  attention_kernel<<<grid, 128, smem, stream()>>>(a);
  BLIP2_LAUNCHED("attention");
}

void greedy_pick(const float* x, int64_t rows, int64_t cols, ops::Pick* host_out) {
  if (rows == 0) return;
  Scratch out(static_cast<size_t>(rows) * sizeof(ops::Pick));
  greedy_pick_kernel<<<static_cast<unsigned>(rows), 1024, 0, stream()>>>(x, cols, out.as<ops::Pick>());
  BLIP2_LAUNCHED("greedy_pick");
  copy(host_out, out.as<ops::Pick>(), static_cast<size_t>(rows) * sizeof(ops::Pick), CopyKind::DeviceToHost);
}

}  // namespace blip2::cuda
