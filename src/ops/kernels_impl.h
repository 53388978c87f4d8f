// Private to kernels.cpp / kernels_avx2.cpp: the table of functions one instruction set provides.
//
// The table takes plain views (pointers and sizes), not Weight or std::vector: kernels_avx2.cpp is compiled
// with AVX2 code generation, and any inline library function it instantiated (vector::resize, ...) could be
// picked by the linker for the whole program and run on a CPU without AVX2. That file uses no C++ library
// templates at all.
#pragma once
#include <cstdint>

#include "core/tensor.h"
#include "ops/dot_loop.h"

namespace blip2::kern::detail {

struct WView {  // a [rows, cols] weight
  DType dtype;
  const void* data;
  const void* scales;  // I8 / I4
  int64_t rows, cols, ld;
  int group;
};

struct QView {  // quantized activation rows (see QuantRows)
  const int8_t* q;
  const float* scale;
  const int32_t* sum;
  int64_t rows, ld;
  int block;
};

// Each activation row's outlier columns (kern::RowColumns), rows counted from the product's first row.
struct CView {
  const float* x;
  int64_t ldx;
  const int32_t* cols;
  const int* counts;
  int max;
};

struct QOut {
  int8_t* q;
  float* scale;
  int32_t* sum;
  int64_t rows, ld;
  int block;
};

struct Impl {
  const char* name;
  // F32 / F16 / BF16 weights
  void (*gemv_float)(const float* x, int64_t ldx, int R, const WView& w, int64_t o0, int64_t o1, float* y,
                     int64_t ldy);
  // scratch: kI8PackedOutputs · w.ld bytes the many-row AVX2 kernel repacks weight rows into (the kernels
  // file may not allocate: see above), or null. columns: null, or each row's outlier columns, added to each
  // output after its integer sum as add_i8_columns does.
  void (*gemv_i8)(const QView& x, const WView& w, int64_t o0, int64_t o1, float* y, int64_t ldy, int8_t* scratch,
                  const CView* columns);
  void (*gemv_i4)(const QView& x, const WView& w, int64_t o0, int64_t o1, float* y, int64_t ldy);
  void (*gemv_i8_float)(const float* x, int64_t ldx, int R, const WView& w, int64_t o0, int64_t o1, float* y,
                        int64_t ldy);
  void (*quantize_rows)(const float* x, int64_t rows, int64_t cols, int64_t ldx, const QOut& out);
  void (*dequant_rows)(const WView& w, int64_t r0, int64_t n, float* out, int64_t ldo);
  // Load-time conversion of one float row (see kern::convert; both paths give identical bytes).
  void (*quantize_weight_i8)(const float* x, int64_t cols, int64_t ld, int8_t* q, float* scale);
  void (*quantize_weight_i4)(const float* x, int64_t cols, int64_t ld, int group, uint8_t* out, uint16_t* scales);
  void (*round_half)(const float* x, int64_t n, uint16_t* out, bool f16);  // f16 or bf16, nearest even
  void (*gelu_erf)(float* p, int64_t n);
  void (*gelu_tanh)(float* p, int64_t n);
  float (*exp_sum)(float* p, int64_t n, float mx);
  float (*dot)(const float* a, const float* b, int64_t n);
  void (*axpy)(float a, const float* x, float* y, int64_t n);
  // The int8 dot-product ceiling: `iters` rounds of the integer products' instructions on registers only
  // (no loads); returns the multiply-adds done. Its result is only there to keep the work from being removed.
  // loop: which instructions (ops/dot_loop.h; see kernels_avx2.cpp).
  int64_t (*int8_dot_loop)(int64_t iters, int32_t* sink, DotLoop loop);
};

// Output channels the many-row I8 kernel packs together (kernels_avx2.cpp).
constexpr int kI8PackedOutputs = 16;

extern const Impl kScalar;
// Null when the library was built without the AVX2 file (non-x86 targets).
const Impl* avx2_impl();
// The AVX2 kernels with AVX-512 VNNI dot products (kernels_vnni.cpp); null when not built.
const Impl* vnni_impl();

// Scalar helpers for both files; static, so that each file keeps its own copy.
static inline float bits_to_f32(uint32_t b) {
  float f;
  __builtin_memcpy(&f, &b, 4);
  return f;
}
static inline float bf16_bits_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// One outlier column's float contribution to an I8 product, the one definition every I8 kernel follows (the
// AVX2 one in vector form: the same two multiplies and the add, unfused; these files are built with
// -ffp-contract=off): y + a · (q · s_w), with q · s_w the weight as the integer kernels multiply it.
static inline float add_i8_column(float y, float a, int8_t q, float sw) {
  const float wq = static_cast<float>(q) * sw;
  return y + a * wq;
}

// Every row's outlier columns added to outputs [o0, o1) of an I8 product, each row's in order (the scalar
// kernel's, and the AVX2 kernel's for the channels it does not pack).
static inline void add_i8_columns(const CView& c, int64_t rows, const WView& w, int64_t o0, int64_t o1, float* y,
                                  int64_t ldy) {
  const auto* q = static_cast<const int8_t*>(w.data);
  const auto* sw = static_cast<const float*>(w.scales);
  for (int64_t r = 0; r < rows; ++r)
    for (int k = 0; k < c.counts[r]; ++k) {
      const int64_t j = c.cols[r * c.max + k];
      const float a = c.x[r * c.ldx + j];
      for (int64_t o = o0; o < o1; ++o) y[r * ldy + o] = add_i8_column(y[r * ldy + o], a, q[o * w.ld + j], sw[o]);
    }
}

}  // namespace blip2::kern::detail
