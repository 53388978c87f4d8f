// The operations every model is written in. Activations are float32 Tensors; weights are Weights in
// whatever storage format the checkpoint (or a later conversion) gives, and each op picks the kernel for it.
// This is the one place a new weight format, a SIMD kernel or a device backend plugs in.
#pragma once
#include <cstdint>

#include "core/tensor.h"
#include "io/config.h"

namespace blip2::ops {

// y[rows, out] = x[rows, in] · wᵀ (+ b), w stored [out, in] as in PyTorch. `b` may be empty.
// Few rows (decoding: one row per beam) take the matrix-vector kernels, which read each weight once for all
// rows (I8/I4: with the rows quantized to int8 per block); more rows take OpenBLAS's sgemm, non-F32 weights
// widened block by block into a scratch buffer first. "Few" is gemv_max_rows(w): kGemvMaxRows for float
// weights, kGemvMaxRowsQuant for I8/I4, whose integer kernels beat widening + sgemm up to ~100-200 rows
// (measured on 4096×4096: 2.4–2.8× faster at 16–48 rows, 1.3–1.7× at 96, even at 257); 64 covers the T5
// encoder over typical prompts and batched beams, and keeps the ViT on float activations.
void linear(const float* x, int64_t rows, const Weight& w, const Weight& b, float* y);
Tensor linear(const Tensor& x, const Weight& w, const Weight& b = {});

constexpr int64_t kGemvMaxRows = 8;
constexpr int64_t kGemvMaxRowsQuant = 64;
int64_t gemv_max_rows(const Weight& w);
// Benchmark hook: overrides kGemvMaxRowsQuant (0 restores it).
void set_gemv_max_rows_quant(int64_t rows);
// Benchmark hook: weight rows widened per block on the BLAS path (default 1024).
void set_widen_rows(int64_t rows);

// `w` in `format` (a load-time conversion; see LoadOptions in model/blip2.h), or `w` itself when that is
// its format already. int4_group: 32, 64 or 128.
Weight convert_weight(const Weight& w, WeightFormat format, int int4_group);

// In-place normalisations over the last dimension.
void layer_norm(Tensor& x, const Weight& gamma, const Weight& beta, float eps);
void rms_norm(Tensor& x, const Weight& gamma, float eps);  // T5LayerNorm: no mean, no bias

void activate(Tensor& x, Activation act);
void add(Tensor& x, const Tensor& y);  // x += y, same shape
void mul(Tensor& x, const Tensor& y);  // x *= y, same shape
void scale(Tensor& x, float s);

// out[i, :] = table[ids[i], :] (widened to float32).
void embedding(const Weight& table, const int32_t* ids, int64_t n, float* out);

// Multi-head scaled dot-product attention for one sequence, the single routine behind ViT, Q-Former and
// T5 (encoder self-, decoder self- with a cache, and cross-attention).
//   q: Tq rows, row stride ldq; head h uses columns [h*head_dim, (h+1)*head_dim). Likewise k, v (Tk rows).
//   scores = scale · q·kᵀ (+ bias[h][i][j] when `bias` is given, laid out [heads][Tq][Tk])
//   keys with key_mask[j] == 0 are excluded (the reference adds the dtype's minimum: same result).
//   causal: query i sees only keys j <= i + (tk - tq) (the queries are the last tq of the tk positions).
//   out: Tq rows, stride ldo, heads concatenated in head order.
struct AttentionArgs {
  const float* q; int64_t ldq; int64_t tq;
  const float* k; int64_t ldk;
  const float* v; int64_t ldv; int64_t tk;
  int heads; int head_dim; float scale;
  const float* bias = nullptr;
  const uint8_t* key_mask = nullptr;
  float* out; int64_t ldo;
  bool causal = false;
};
void attention(const AttentionArgs& a);

}  // namespace blip2::ops
