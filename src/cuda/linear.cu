// y[rows, out] = x[rows, in] · wᵀ (+ b) on the GPU, w stored [out, in] row-major (PyTorch's layout), which
// cuBLAS sees as a column-major [in, out] matrix: y's column-major [out, rows] = wᵀ·x is one "TN" product.
//   few rows (≤ ops::kGemvMaxRows, decoding): one warp per output channel reads its weight row once for all
//     rows, widening any format in registers (int8: weight-only, the activations stay float32);
//   F32 weights: cublasGemmEx in float32, TF32 off (float32 is the checking format);
//   F16 / BF16 weights: the activations cast to the weight's type, then cublasGemmEx with float32
//     accumulation and output. For F16 each row is first scaled by a power of two that keeps its largest
//     value below 2^15 and the result rescaled (exact): T5's feed-forward output and residual stream exceed
//     float16's 65504 (spec §11), and the cast must not turn them into infinities;
//   I8 weights: the activations quantized per row (scale max|x|/127), an int8 × int8 → int32 tensor-core
//     product (cublasGemmEx, CUBLAS_COMPUTE_32I), then y = acc · s_x[r] · s_w[o]. (An output width that is
//     not a multiple of 4, which no real layer has, goes through the GEMV instead.)
#include <algorithm>

#include "cuda/common.cuh"
#include "ops/ops.h"

namespace blip2::cuda {

namespace {

constexpr int kMaxGemvRows = static_cast<int>(ops::kGemvMaxRows);

__global__ void gemv_kernel(const float* x, int64_t in, int rows, WeightView w, int64_t out, float* y) {
  const int64_t o = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (o >= out) return;
  float acc[kMaxGemvRows] = {};
  for (int64_t c = lane; c < in; c += 32) {
    // I8: sum q·x and apply the row's scale once at the end.
    float wv;
    if (static_cast<DType>(w.dtype) == DType::I8) wv = static_cast<float>(static_cast<const int8_t*>(w.data)[o * w.ld + c]);
    else wv = weight_at(w, o, c);
    for (int r = 0; r < rows; ++r) acc[r] += wv * x[r * in + c];
  }
  const float s = static_cast<DType>(w.dtype) == DType::I8 ? static_cast<const float*>(w.scales)[o] : 1.0f;
  for (int r = 0; r < rows; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0) y[r * out + o] = v * s;
  }
}

__global__ void bias_kernel(float* y, int64_t rows, int64_t out, WeightView b) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * out; i += int64_t(gridDim.x) * blockDim.x)
    y[i] += vector_at(b, i % out);
}

// One block per row: the power of two p with max|x|·p < 2^15 (1 when it already is), then x·p as half.
__global__ void to_half_scaled_kernel(const float* x, int64_t in, __half* xh, float* row_scale) {
  const float* p = x + blockIdx.x * in;
  float m = 0.0f;
  for (int64_t i = threadIdx.x; i < in; i += blockDim.x) m = fmaxf(m, fabsf(p[i]));
  m = block_max(m);
  float s = 1.0f;
  if (m < INFINITY)  // an infinity stays one (and NaNs, which fmaxf skips, stay NaN)
    while (m * s >= 32768.0f) s *= 0.5f;  // at most ~113 halvings from FLT_MAX
  for (int64_t i = threadIdx.x; i < in; i += blockDim.x) xh[blockIdx.x * in + i] = __float2half_rn(p[i] * s);
  if (threadIdx.x == 0) row_scale[blockIdx.x] = 1.0f / s;
}

__global__ void to_bf16_kernel(const float* x, int64_t n, __nv_bfloat16* xb) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    xb[i] = __float2bfloat16_rn(x[i]);
}

__global__ void scale_rows_kernel(float* y, int64_t out, const float* row_scale) {
  for (int64_t i = threadIdx.x; i < out; i += blockDim.x) y[blockIdx.x * out + i] *= row_scale[blockIdx.x];
}

// One block per row: q = round(x / s), s = max|x| / 127, zero-padded to ld.
__global__ void quantize_rows_kernel(const float* x, int64_t in, int64_t ld, int8_t* q, float* row_scale) {
  const float* p = x + blockIdx.x * in;
  float m = 0.0f;
  for (int64_t i = threadIdx.x; i < in; i += blockDim.x) m = fmaxf(m, fabsf(p[i]));
  m = block_max(m);
  const float s = m / 127.0f, inv = m > 0.0f ? 127.0f / m : 0.0f;
  for (int64_t i = threadIdx.x; i < ld; i += blockDim.x)
    q[blockIdx.x * ld + i] = i < in ? static_cast<int8_t>(fmaxf(-127.0f, fminf(127.0f, rintf(p[i] * inv)))) : 0;
  if (threadIdx.x == 0) row_scale[blockIdx.x] = s;
}

__global__ void dequant_acc_kernel(const int32_t* acc, int64_t rows, int64_t out, const float* x_scale,
                                   const float* w_scale, float* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * out; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = static_cast<float>(acc[i]) * x_scale[i / out] * w_scale[i % out];
}

// y (column-major [out, rows]) = wᵀ · x, with A = w, B = x in `type`, C in `ctype`.
void gemm_tn(const void* w, int64_t lda, const void* x, int64_t ldb, void* y, int64_t out, int64_t rows, int64_t k,
             cudaDataType_t type, cudaDataType_t ctype, cublasComputeType_t compute, const void* alpha,
             const void* beta, const char* what) {
  check(cublasGemmEx(context().blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(rows),
                     static_cast<int>(k), alpha, w, type, static_cast<int>(lda), x, type, static_cast<int>(ldb), beta,
                     y, ctype, static_cast<int>(out), compute, CUBLAS_GEMM_DEFAULT),
        what);
}

}  // namespace

void linear(const float* x, int64_t rows, const Weight& w, const Weight& b, float* y) {
  const int64_t out = w.rows(), in = w.cols();
  const float one = 1.0f, zero = 0.0f;
  const WeightView wv = view(w);
  const auto gemv = [&](const float* xr, int64_t n, float* yr) {
    const int warps = 8;
    gemv_kernel<<<static_cast<unsigned>((out + warps - 1) / warps), warps * 32, 0, stream()>>>(xr, in, static_cast<int>(n),
                                                                                             wv, out, yr);
    BLIP2_LAUNCHED("linear (gemv)");
  };
  if (rows <= kMaxGemvRows) {
    gemv(x, rows, y);
  } else if (w.dtype == DType::I8 && out % 4 != 0) {
    // cuBLAS's int8 products want the output's leading dimension a multiple of 4 (every real shape's is):
    // others go through the GEMV, eight rows at a time.
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxGemvRows) gemv(x + r0 * in, std::min<int64_t>(kMaxGemvRows, rows - r0), y + r0 * out);
  } else if (w.dtype == DType::F32) {
    gemm_tn(w.data, in, x, in, y, out, rows, in, CUDA_R_32F, CUDA_R_32F,
            CUBLAS_COMPUTE_32F, &one, &zero, "linear (f32)");
  } else if (w.dtype == DType::F16) {
    Scratch xh(static_cast<size_t>(rows * in) * 2), scale(static_cast<size_t>(rows) * 4);
    to_half_scaled_kernel<<<static_cast<unsigned>(rows), 256, 0, stream()>>>(x, in, xh.as<__half>(), scale.as<float>());
    BLIP2_LAUNCHED("linear (f16 cast)");
    gemm_tn(w.data, in, xh.as<__half>(), in, y, out, rows, in, CUDA_R_16F, CUDA_R_32F, CUBLAS_COMPUTE_32F, &one, &zero,
            "linear (f16)");
    scale_rows_kernel<<<static_cast<unsigned>(rows), 256, 0, stream()>>>(y, out, scale.as<float>());
    BLIP2_LAUNCHED("linear (f16 rescale)");
  } else if (w.dtype == DType::BF16) {
    Scratch xb(static_cast<size_t>(rows * in) * 2);
    to_bf16_kernel<<<blocks_for(rows * in), 256, 0, stream()>>>(x, rows * in, xb.as<__nv_bfloat16>());
    BLIP2_LAUNCHED("linear (bf16 cast)");
    gemm_tn(w.data, in, xb.as<__nv_bfloat16>(), in, y, out, rows, in, CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F, &one,
            &zero, "linear (bf16)");
  } else if (w.dtype == DType::I8) {
    const int64_t ld = w.ld;  // a multiple of 32: the int8 product's alignment
    Scratch q(static_cast<size_t>(rows * ld)), xs(static_cast<size_t>(rows) * 4), acc(static_cast<size_t>(rows * out) * 4);
    quantize_rows_kernel<<<static_cast<unsigned>(rows), 256, 0, stream()>>>(x, in, ld, q.as<int8_t>(), xs.as<float>());
    BLIP2_LAUNCHED("linear (int8 quantize)");
    const int32_t ione = 1, izero = 0;
    gemm_tn(w.data, ld, q.as<int8_t>(), ld, acc.as<int32_t>(), out, rows, ld, CUDA_R_8I, CUDA_R_32I, CUBLAS_COMPUTE_32I,
            &ione, &izero, "linear (int8)");
    dequant_acc_kernel<<<blocks_for(rows * out), 256, 0, stream()>>>(acc.as<int32_t>(), rows, out, xs.as<float>(),
                                                                    static_cast<const float*>(w.scales), y);
    BLIP2_LAUNCHED("linear (int8 scale)");
  } else {
    fail(ErrorKind::Usage, std::string("no CUDA product for ") + dtype_name(w.dtype) + " weights");
  }
  if (!b.empty()) {
    bias_kernel<<<blocks_for(rows * out), 256, 0, stream()>>>(y, rows, out, view(b));
    BLIP2_LAUNCHED("linear (bias)");
  }
}

}  // namespace blip2::cuda
