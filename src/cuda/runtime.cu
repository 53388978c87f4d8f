// Devices, memory and copies: one context per process (the selected GPU, one stream, one cuBLAS handle with
// its workspace). Memory comes from the stream-ordered pool (cudaMallocAsync), so the many short-lived
// activation tensors cost no synchronisation.
#include <algorithm>
#include <cstdio>

#include "cuda/common.cuh"

namespace blip2::cuda {

namespace {
Context* g_context = nullptr;  // never destroyed: buffers may be freed during static destruction
}

Context& context() {
  if (!g_context) fail(ErrorKind::Internal, "CUDA used before a device was selected");
  return *g_context;
}

bool compiled() { return true; }

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string unavailable_reason() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string("no usable CUDA driver or GPU: ") + cudaGetErrorString(e);
  }
  return n == 0 ? "the driver reports no GPU" : "";
}

void select_device(int index) {
  if (g_context) {
    if (g_context->device == index) return;
    fail(ErrorKind::Usage, "this process already runs on cuda:" + std::to_string(g_context->device) +
                               "; one GPU per process");
  }
  const int n = device_count();
  if (n == 0) fail(ErrorKind::Usage, "cannot run on cuda: " + unavailable_reason());
  if (index < 0 || index >= n)
    fail(ErrorKind::Usage, "no GPU cuda:" + std::to_string(index) + " (the driver reports " + std::to_string(n) + ")");
  auto* c = new Context;
  c->device = index;
  check(cudaSetDevice(index), "cudaSetDevice");
  check(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), "cudaStreamCreate");
  check(cublasCreate(&c->blas), "cublasCreate");
  check(cublasSetStream(c->blas, c->stream), "cublasSetStream");
  c->workspace_bytes = 32u << 20;
  check(cudaMalloc(&c->workspace, c->workspace_bytes), "cudaMalloc (cuBLAS workspace)");
  check(cublasSetWorkspace(c->blas, c->workspace, c->workspace_bytes), "cublasSetWorkspace");
  // Keep freed pool memory for reuse instead of returning it at every synchronisation.
  cudaMemPool_t pool;
  check(cudaDeviceGetDefaultMemPool(&pool, index), "cudaDeviceGetDefaultMemPool");
  uint64_t keep = UINT64_MAX;
  check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute");
  g_context = c;
}

std::string device_description() {
  cudaDeviceProp p{};
  check(cudaGetDeviceProperties(&p, context().device), "cudaGetDeviceProperties");
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s (sm_%d%d, %.1f GiB)", p.name, p.major, p.minor,
                static_cast<double>(p.totalGlobalMem) / (1u << 30));
  return buf;
}

void* alloc(size_t bytes) {
  void* p = nullptr;
  const cudaError_t e = cudaMallocAsync(&p, bytes, stream());
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    fail(ErrorKind::Input, "out of GPU memory allocating " + std::to_string(bytes >> 20) + " MiB");
  }
  check(e, "cudaMallocAsync");
  return p;
}

void release(void* p) {
  if (p && g_context) cudaFreeAsync(p, g_context->stream);  // no throw: called from destructors
}

void copy(void* dst, const void* src, size_t bytes, CopyKind kind) {
  const cudaMemcpyKind k = kind == CopyKind::HostToDevice   ? cudaMemcpyHostToDevice
                           : kind == CopyKind::DeviceToHost ? cudaMemcpyDeviceToHost
                                                            : cudaMemcpyDeviceToDevice;
  check(cudaMemcpyAsync(dst, src, bytes, k, stream()), "cudaMemcpyAsync");
  // The host reads what it copied down, and may free or reuse what it copied up (pageable memory is staged
  // before the call returns, but pinned memory is not): wait for both.
  if (kind != CopyKind::DeviceToDevice) synchronize();
}

void zero(void* dst, size_t bytes) { check(cudaMemsetAsync(dst, 0, bytes, stream()), "cudaMemsetAsync"); }

void synchronize() { check(cudaStreamSynchronize(stream()), "cudaStreamSynchronize (a kernel failed)"); }

namespace {
// Seconds per run of `work` on the stream: one warm-up, then the best of `runs`, timed with events.
template <typename F>
double time_on_stream(F work, int runs) {
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "cudaEventCreate");
  check(cudaEventCreate(&b), "cudaEventCreate");
  work();
  float best = 1e30f;
  for (int i = 0; i < runs; ++i) {
    check(cudaEventRecord(a, stream()), "cudaEventRecord");
    work();
    check(cudaEventRecord(b, stream()), "cudaEventRecord");
    check(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    best = std::min(best, ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return best / 1e3;
}
}  // namespace

double memory_bandwidth(size_t bytes) {
  Scratch src(bytes), dst(bytes);
  zero(src.as<char>(), bytes);
  const double s = time_on_stream(
      [&] { check(cudaMemcpyAsync(dst.as<char>(), src.as<char>(), bytes, cudaMemcpyDeviceToDevice, stream()), "copy"); }, 5);
  return 2.0 * static_cast<double>(bytes) / s;
}

double bf16_gemm_flops(int n) {
  const size_t elems = static_cast<size_t>(n) * n;
  Scratch a(elems * 2), b(elems * 2), c(elems * 4);
  zero(a.as<char>(), elems * 2);
  zero(b.as<char>(), elems * 2);
  const float one = 1.0f, nil = 0.0f;
  const double s = time_on_stream(
      [&] {
        check(cublasGemmEx(context().blas, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, a.as<char>(), CUDA_R_16BF, n,
                           b.as<char>(), CUDA_R_16BF, n, &nil, c.as<char>(), CUDA_R_32F, n, CUBLAS_COMPUTE_32F,
                           CUBLAS_GEMM_DEFAULT),
              "bf16 gemm");
      },
      5);
  return 2.0 * n * static_cast<double>(n) * n / s;
}

}  // namespace blip2::cuda
