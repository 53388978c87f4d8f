// The operations every model is written in. Activations are float32 Tensors; weights are Weights in
// whatever storage format the checkpoint (or a later conversion) gives, and each op picks the kernel for it.
// This is the one place a new weight format, a SIMD kernel or a device backend plugs in.
//
// Devices: every operand of an op is on one device (Error(Internal) otherwise), and the op runs there: the
// CUDA kernels (src/cuda) for Device::CUDA, the CPU kernels below for CPU and Emulated. Ops taking raw
// pointers take the device from their weight (linear, embedding) or their arguments (attention).
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "io/config.h"

namespace blip2::ops {

// True when this build has CUDA and the driver reports at least one GPU.
bool cuda_available();

// y[rows, out] = x[rows, in] · wᵀ (+ b), w stored [out, in] as in PyTorch. `b` may be empty.
//   I8/I4 weights, any number of rows: the rows are quantized to int8 per block and multiplied with the
//     integer kernels, which read each weight row once per tile of rows. For decoding they are the point
//     (bandwidth); on the ViT's 257 rows they run 1.2–2× sgemm's rate with AVX-512 VNNI and 0.9–1.5× with
//     AVX2 alone (docs/PERFORMANCE.md, `bench_kernels --only sgemm`), where widening to float + sgemm ran
//     at 0.8–0.95× sgemm.
//   F32/F16/BF16 weights, at most kGemvMaxRows rows (decoding: one row per beam): the matrix-vector kernels,
//     which read each weight once for all rows.
//   F32/F16/BF16 weights, more rows: OpenBLAS's sgemm, F16/BF16 weights widened block by block into a
//     scratch buffer first.
void linear(const float* x, int64_t rows, const Weight& w, const Weight& b, float* y);
// The products issued so far by linear() and attention(), on any device and from any thread: their
// operations (2 per multiply-add; attention counts both of its products over all tk keys, a causal one too)
// and the wall time of the calls (linear's includes quantizing its activations and adding the bias; on a GPU
// it is the time to queue the work). `bench` reads them around each stage to set the stage's work against
// the ceiling of the format it ran in, and to split its time into products, attention and the rest.
struct ProductCounters {
  int64_t linear_ops = 0, attention_ops = 0;
  double linear_seconds = 0, attention_seconds = 0;
  int64_t ops() const { return linear_ops + attention_ops; }
  ProductCounters operator-(const ProductCounters& o) const;
};
ProductCounters product_counters();
Tensor linear(const Tensor& x, const Weight& w, const Weight& b = {});

constexpr int64_t kGemvMaxRows = 8;
// Rows per tile of the integer products: as many as keep a tile's quantized activations within this many
// bytes (in L2 while each thread streams its share of the weight), at least kQuantTileMinRows.
constexpr int64_t kQuantTileBytes = 256 << 10;
constexpr int64_t kQuantTileMinRows = 16;
// Benchmark hooks: bytes per tile of the integer products, weight rows widened per block on the BLAS path
// (default 1024). 0 restores the default.
void set_quant_tile_bytes(int64_t bytes);
void set_widen_rows(int64_t rows);

// `w` in `format` (a load-time conversion; see LoadOptions in model/blip2.h), or `w` itself when that is
// its format already. int4_group: 32, 64 or 128. For int8 / int4, float_columns (from float_columns_for) are
// kept in float (Weight::float_columns); the float formats ignore them.
Weight convert_weight(const Weight& w, WeightFormat format, int int4_group,
                      const std::vector<int32_t>& float_columns = {});

// ---- outlier input channels known at load (issue 14) ----------------------------------------------------
// A quantized product rounds each weight w[o][j] by a few percent of its row's (or group's) largest value;
// an input channel j that is always 20-100x the others (LLMs' outlier features) multiplies that rounding
// error by as much, and the run-time decomposition in linear() removes only the activation's rounding. The
// weights that produce a linear's input tell which channels those are, without data, so the loader keeps
// their weight columns in float. Estimates of each input channel's typical magnitude:
//  * after a norm (unit-variance channels scaled by gamma, shifted by beta): sqrt(gamma_j^2 + beta_j^2);
//    beta may be empty (RMS norm);
//  * after a product y = x · w^T (+ b) of inputs with magnitudes in_scale: ||w[j, :] ⊙ in_scale||_2 + |b_j|.
std::vector<float> norm_output_scale(const Weight& gamma, const Weight& beta);
std::vector<float> product_output_scale(const Weight& w, const std::vector<float>& in_scale, const Weight& b = {});
// The channels worth keeping in float: those above kFloatColumnRatio × the median estimate, at most
// kMaxFloatColumns (the largest), in ascending order. Measured on test_outliers (docs/PERFORMANCE.md).
constexpr float kFloatColumnRatio = 6.0f;
constexpr int kMaxFloatColumns = 16;
std::vector<int32_t> float_columns_for(const std::vector<float>& channel_scale);

// In-place normalisations over the last dimension.
void layer_norm(Tensor& x, const Weight& gamma, const Weight& beta, float eps);
void rms_norm(Tensor& x, const Weight& gamma, float eps);  // T5LayerNorm: no mean, no bias

void activate(Tensor& x, Activation act);
void add(Tensor& x, const Tensor& y);  // x += y, same shape
void mul(Tensor& x, const Tensor& y);  // x *= y, same shape
void scale(Tensor& x, float s);

// out[i, :] = table[ids[i], :] (widened to float32). ids are host memory; out is on the table's device.
void embedding(const Weight& table, const int32_t* ids, int64_t n, float* out);

// Rotary positions (LLaMA's rotate_half form), in place: x [rows, heads·head_dim], row r at positions[r]
// (host memory). In each head, element i < head_dim/2 and its partner i + head_dim/2 turn by the angle
// positions[r]·theta^(−2i/head_dim), computed in float32 as transformers does (its inv_freq, then cos/sin).
void rotary(Tensor& x, int64_t heads, int64_t head_dim, const std::vector<int64_t>& positions, float theta);

// Moving rows. A tensor's rows are its elements in runs of last(): rows [src_row, src_row + n) of src go to
// rows [dst_row, dst_row + n) of dst (same width, same device).
void copy_rows(const Tensor& src, int64_t src_row, Tensor& dst, int64_t dst_row, int64_t n);
// x += y repeated over x (x's size a multiple of y's): position embeddings over a batch, say.
void add_broadcast(Tensor& x, const Tensor& y);
// A weight (any format) widened to a float32 tensor of its shape, on its device.
Tensor weight_tensor(const Weight& w);
// The ViT's patches as rows: pixels [B, 3, S, S] -> [B, (S/P)², 3·P·P], each patch unrolled in the patch
// convolution weight's (channel, ky, kx) order, so the convolution is a product.
Tensor patchify(const Tensor& pixels, int64_t patch);
// T5's relative position bias [H, tq, tk]: element (h, i, j) = table[buckets[i·tk + j], h], table
// [num_buckets, H]; buckets are host memory (from t5_relative_bucket).
Tensor relative_bias(const Weight& table, const std::vector<int32_t>& buckets, int64_t tq, int64_t tk);
// Greedy decoding's pick for each row of logits [rows, V], made where the logits are: the index of the
// largest logit (ties: the lowest index) and its log-probability (log_softmax at that index, the sum of
// exponentials in double; NaN when the row holds a NaN or an infinity, which generation refuses). Only these
// rows × 2 numbers reach the host.
struct Pick {
  int32_t id;
  float log_prob;
};
std::vector<Pick> greedy_pick(const Tensor& logits);
// log_softmax(x[0..n))[i] on the host, the sum of exponentials in double: the score of a chosen token.
float log_softmax_at(const float* x, int64_t n, int64_t i);

// A stack of rows that grows at the end (a key/value cache), on one device; capacity doubles as it grows.
// Copies are deep.
class RowCache {
 public:
  RowCache() = default;
  RowCache(int64_t width, Device device) : width_(width), device_(device) {}
  // Appends rows [row, row + n) of src.
  void append(const Tensor& src, int64_t row, int64_t n);
  int64_t rows() const { return rows_; }
  const float* data() const { return buf_.data_ptr(); }

 private:
  int64_t width_ = 0, rows_ = 0;
  Device device_ = Device::CPU;
  Tensor buf_;
};

// Multi-head scaled dot-product attention for one sequence, the single routine behind ViT, Q-Former and
// T5 (encoder self-, decoder self- with a cache, and cross-attention).
//   q: Tq rows, row stride ldq; head h uses columns [h*head_dim, (h+1)*head_dim). Likewise k, v (Tk rows).
//   scores = scale · q·kᵀ (+ bias[h][i][j] when `bias` is given, laid out [heads][Tq][Tk])
//   keys with key_mask[j] == 0 are excluded (the reference adds the dtype's minimum: same result).
//   causal: query i sees only keys j <= i + (tk - tq) (the queries are the last tq of the tk positions).
//   out: Tq rows, stride ldo, heads concatenated in head order.
struct AttentionArgs {
  Device device = Device::CPU;  // where every pointer below points
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
// Several independent problems (decoding: one per row over that row's cache, or one per query head), with
// the results of one call each. Problems with few queries run as one job on the pool for all of them, where
// one call each would issue one job per problem (a T5-XL decoding step over 8 rows issues 384).
void attention(const std::vector<AttentionArgs>& problems);  // (a vector: the CUDA files are C++17, no span)

}  // namespace blip2::ops
