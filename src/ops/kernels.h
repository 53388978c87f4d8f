// Compute kernels behind ops (ops.h), one set per instruction set: AVX2+FMA+F16C (kernels_avx2.cpp, built
// with those flags and chosen at run time when the CPU has them) and a portable scalar fallback
// (kernels.cpp) that gives the same results within float rounding. Integer parts (the quantized dot
// products) are exact in both, so the two differ only in the order float partial sums are added.
//
// Models never call these; ops does, and so do the kernel tests and the micro-benchmark.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "ops/dot_loop.h"

namespace blip2::kern {

// ---- instruction set ------------------------------------------------------------------------------------
bool cpu_has_avx2();          // __builtin_cpu_supports("avx2") && "fma" && "f16c"
void force_scalar(bool on);   // tests and benchmarks: use the scalar fallback even where AVX2 is present
bool using_avx2();            // what the kernels use now
const char* isa_name();       // "avx2+vnni" (AVX-512 VNNI dot products), "avx2" or "scalar"

// ---- activations quantized for the integer products -----------------------------------------------------
// Each row of x[rows, cols] in blocks of `block` elements (a multiple of 32, zero-padded to `ld`):
// q = round(x / scale), scale = max|x| / 127 over the block, q in [-127, 127]; `sum` is the block's Σq (the
// I4 kernels remove their +8 weight offset with it, exactly, in integers).
struct QuantRows {
  int64_t rows = 0, ld = 0;
  int block = 0;
  std::vector<int8_t> q;      // [rows][ld]
  std::vector<float> scale;   // [rows][ld / block]
  std::vector<int32_t> sum;   // [rows][ld / block]
  void resize(int64_t rows, int64_t ld, int block);
};
// Rows [first, first + rows) of `out` from x (x points at row `first`).
void quantize_rows(const float* x, int64_t rows, int64_t cols, int64_t ldx, QuantRows& out, int64_t first = 0);

// The activation block each quantized format multiplies with: the I4 group; for I8 the setting below
// (default kI8ActBlock; 0 = one scale per row).
int act_block(const Weight& w);
constexpr int kI8ActBlock = 128;
void set_i8_act_block(int block);  // benchmark/tests: a multiple of 32, or 0

// ---- outlier input columns (issue 14) -------------------------------------------------------------------
// LLM activations carry a few channels 20-100x the others (LLM.int8(), SmoothQuant; `make-random --outliers`
// models them). One such channel in an activation block sets the block's scale and rounds its neighbours to
// a few levels: on tiny OPT the int8 logits error went from 2.4e-2 to 0.19. ops::linear therefore takes them
// out of the integer product (zeroed before quantize_rows, so that they set no scale) and adds their
// contribution in float, as LLM.int8() decomposes its products; the columns are chosen per row from the
// activations themselves, so that no calibration or model knowledge is needed and every model gets it.
//
// Per row r of x[rows, cols] (row stride ldx): the columns where |x| > kOutlierRatio × that row's mean |x|
// (relative, so that it holds at any activation scale, unlike LLM.int8()'s absolute 6.0; for Gaussian rows
// 4.8 standard deviations), at most `max` of them (the largest ratios; a row with more keeps the worst and
// quantizes the rest as before), written to out[r·max …] in increasing column order, their number to
// counts[r]; returns the total. Each row's columns depend on that row alone, so that a row's product is the
// same whatever else is in the batch (batch invariance: a batch-mate's outliers change nothing). A column
// taken by chance (heavy-tailed rows, ReLU outputs) costs a little time, never accuracy. One pass over the
// rows (a second only over a row with a candidate): a few microseconds for a decoding row.
// Measured on test_outliers (docs/PERFORMANCE.md): ratio 6 beat 10 (T5 int8 with outliers 1.42e-2 vs
// 1.92e-2), and a cap of 16 columns gained nothing over 8.
constexpr float kOutlierRatio = 6.0f;
constexpr int kMaxOutlierColumns = 8;   // the default cap
constexpr int kOutlierColumnsLimit = 64;  // the most set_max_outlier_columns accepts
int outlier_columns(const float* x, int64_t rows, int64_t cols, int64_t ldx, int max, int32_t* out, int* counts);
// Tests and benchmarks: the cap ops::linear uses, clamped to [0, kOutlierColumnsLimit]; 0 turns the
// decomposition off (the products before issue 14).
void set_max_outlier_columns(int n);
int max_outlier_columns();
// Each row's outlier columns for gemv_q: row r (counted from gemv_q's r0) has counts[r] of them,
// j = cols[r·max + c] for c < counts[r], with its float activations x[r·ldx + j].
struct RowColumns {
  const float* x;
  int64_t ldx;
  const int32_t* cols;
  const int* counts;
  int max;
};
// The weight's own float columns (Weight::float_columns, chosen at load), added in float with their float
// weights: y[r·ldy + o] += Σ_k x[r·ldx + float_columns[k]] · column_weights[o][k], for r < rows, o in [o0, o1).
void add_float_columns(const float* x, int64_t ldx, int64_t rows, const Weight& w, int64_t o0, int64_t o1, float* y,
                       int64_t ldy);

// ---- products that read each weight row once per call ----------------------------------------------------
// y[r * ldy + o] = Σ_i x[r][i] · w[o][i] for the rows r given and output channels o in [o0, o1); each weight
// row is read once for all of them.
//   gemv: F32/F16/BF16 weights and float rows r < R (row stride ldx): decoding, a few rows.
//   gemv_q: I8/I4 weights and quantized rows r in [r0, r1) of x (QuantRows with block == act_block(w)): any
//   number of rows, which ops::linear passes in tiles.
void gemv(const float* x, int64_t ldx, int R, const Weight& w, int64_t o0, int64_t o1, float* y, int64_t ldy);
//   With `columns` (rows r0.., zeroed in x before it was quantized), each output then gets, after its integer
//   sum, y[r·ldy + o] += x[r][j] · w[o][j] for row r's columns in order, the weight dequantized to exactly
//   the value the integer kernels multiply with: the activation's rounding goes, the weight's stays. The
//   same float operations on every path (the I8 AVX2 kernel adds them to each group of packed channels
//   while it is in cache; a scalar loop over strided weight bytes cost the ViT's fc2 a fifth of its time).
void gemv_q(const QuantRows& x, int64_t r0, int64_t r1, const Weight& w, int64_t o0, int64_t o1, float* y,
            int64_t ldy, const RowColumns* columns = nullptr);
// I8 alternative kept for the benchmark: weights widened to float and multiplied with float x (no
// activation quantization).
void gemv_i8_float(const float* x, int64_t ldx, int R, const Weight& w, int64_t o0, int64_t o1, float* y,
                   int64_t ldy);

// ---- widening for the BLAS path -------------------------------------------------------------------------
// out[r][c] (row stride ldo >= cols) = w[r0 + r][c] as float32, for r < n.
void dequant_rows(const Weight& w, int64_t r0, int64_t n, float* out, int64_t ldo);

// ---- element-wise and row operations --------------------------------------------------------------------
void gelu_erf(float* p, int64_t n);
void gelu_tanh(float* p, int64_t n);
// p[i] = exp(p[i] - mx), returns the sum (of the float values written).
float exp_sum(float* p, int64_t n, float mx);
float dot(const float* a, const float* b, int64_t n);
void axpy(float a, const float* x, float* y, int64_t n);  // y += a·x
// `iters` rounds of the integer products' instructions on registers alone (machine::int8_dot_peak); returns
// the multiply-adds done. Sign and Int16 are AVX2 loops (without VNNI); elsewhere they run Peak.
int64_t int8_dot_loop(int64_t iters, int32_t* sink, DotLoop loop = DotLoop::Peak);

// ---- conversion at load ---------------------------------------------------------------------------------
// A [rows, cols] matrix (any stored dtype) as `to` (F32, F16, BF16, I8 or I4 with `group`), in new buffers
// owned by the result. Rows are converted in parallel on the pool. For I8 / I4, `float_columns` (ascending,
// distinct, < cols) are kept in float: zeroed before quantizing, so that they set no scale, and their values
// held in the result's column_weights (Weight::float_columns).
Weight convert(const Weight& w, DType to, int group = 64, const std::vector<int32_t>& float_columns = {});

}  // namespace blip2::kern
