// Shared by the CUDA sources: error checks, the process's context (stream, cuBLAS handle, workspace), launch
// sizes and reading any weight format element by element.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "core/error.h"
#include "core/tensor.h"
#include "cuda/cuda.h"

namespace blip2::cuda {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail(ErrorKind::Internal, std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}
inline void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    fail(ErrorKind::Internal, std::string("cuBLAS error in ") + what + ": " + cublasGetStatusString(s));
}
// After a kernel launch: a bad configuration shows up here, a fault at the next synchronisation.
#define BLIP2_LAUNCHED(what) ::blip2::cuda::check(cudaGetLastError(), what)

struct Context {
  int device = -1;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  void* workspace = nullptr;  // cuBLAS's (32 MiB: what it wants on Hopper)
  size_t workspace_bytes = 0;
};
// The selected device's context (Error(Internal) before select_device).
Context& context();
inline cudaStream_t stream() { return context().stream; }

inline unsigned blocks_for(int64_t n, int threads = 256) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 65535 * 16 ? (b < 1 ? 1 : b) : 65535 * 16);  // grid-stride loops cover the rest
}

// A weight as kernels read it: element (r, c) widened to float, whatever the format (I4 is CPU-only).
struct WeightView {
  const void* data;
  const void* scales;
  int dtype;  // DType
  int64_t cols, ld;
};
inline WeightView view(const Weight& w) {
  if (w.dtype == DType::I4) fail(ErrorKind::Usage, "int4 weights run on the CPU only");
  return {w.data, w.scales, static_cast<int>(w.dtype), w.cols(), w.ld};
}
__device__ inline float weight_at(const WeightView& w, int64_t r, int64_t c) {
  switch (static_cast<DType>(w.dtype)) {
    case DType::F32: return static_cast<const float*>(w.data)[r * w.cols + c];
    case DType::F16: return __half2float(static_cast<const __half*>(w.data)[r * w.cols + c]);
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(w.data)[r * w.cols + c]);
    case DType::I8:
      return static_cast<float>(static_cast<const int8_t*>(w.data)[r * w.ld + c]) * static_cast<const float*>(w.scales)[r];
    default: return 0.0f;
  }
}
// A 1-D weight (norm gains, biases) element i.
__device__ inline float vector_at(const WeightView& w, int64_t i) { return weight_at(w, 0, i); }

// Block-wide sum / max over blockDim.x threads (a multiple of 32, at most 1024).
template <typename T>
__device__ inline T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename T>
__device__ inline T block_sum(T v) {
  __shared__ T part[32];
  v = warp_sum(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();  // part[] may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  T s = 0;
  for (int i = 0; i < warps; ++i) s += part[i];
  return s;
}
__device__ inline float block_max(float v) {
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int i = 0; i < warps; ++i) m = fmaxf(m, part[i]);
  return m;
}

// Device scratch memory for one call (stream-ordered: freed when the stream reaches the free).
class Scratch {
 public:
  explicit Scratch(size_t bytes) : buf_(Device::CUDA, bytes) {}
  template <typename T>
  T* as() { return static_cast<T*>(buf_.data()); }

 private:
  Buffer buf_;
};

}  // namespace blip2::cuda
