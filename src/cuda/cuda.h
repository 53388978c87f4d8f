// The CUDA backend's entry points, callable from any C++ file: no CUDA header is needed to include this.
// With -DBLIP2_CUDA=ON they are implemented in src/cuda/*.cu (runtime.cu: devices and memory; linear.cu:
// the matrix products; kernels.cu: everything else). Without it, stub.cpp implements them: compiled() is
// false, device_count() is 0 and everything else throws Error(Usage) saying the build has no CUDA.
//
// Pointers are device pointers unless a parameter says `host`. Work is queued on one stream per process and
// runs in order; copy_bytes to the host waits for it. ops/ops.cpp is the only caller of the kernels: it
// checks shapes and devices, then calls here.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/tensor.h"
#include "io/config.h"

namespace blip2::ops {
struct AttentionArgs;
struct Pick;
}

namespace blip2::cuda {

bool compiled();
// GPUs the driver reports; 0 without a driver or a GPU (never throws).
int device_count();
// Why device_count() is 0, in words (the CUDA error, or "built without CUDA").
std::string unavailable_reason();
// Makes GPU `index` this process's device and creates its stream and cuBLAS handles. Throws Error(Usage)
// naming the reason when it does not exist. Idempotent for the same index; another index is an error once
// memory has been allocated.
void select_device(int index);
// "NVIDIA H200 (sm_90, 139.8 GiB)" for the selected device.
std::string device_description();

void* alloc(size_t bytes);
void release(void* p);
enum class CopyKind { HostToDevice, DeviceToHost, DeviceToDevice };
void copy(void* dst, const void* src, size_t bytes, CopyKind kind);
void zero(void* dst, size_t bytes);
void synchronize();

// Ceilings for bench, measured on the selected GPU: device-memory bandwidth in bytes/s (a copy of `bytes`,
// counting its read and its write), and the bf16 tensor-core product rate in FLOP/s (n×n×n, f32 accumulation).
double memory_bandwidth(size_t bytes);
double bf16_gemm_flops(int n);

// ---- kernels (see ops.h for the semantics of each; the same names) ----
void linear(const float* x, int64_t rows, const Weight& w, const Weight& b, float* y);
void layer_norm(float* x, int64_t rows, int64_t d, const Weight& gamma, const Weight& beta, float eps);
void rms_norm(float* x, int64_t rows, int64_t d, const Weight& gamma, float eps);
void activate(float* x, int64_t n, Activation act);
void add(float* x, const float* y, int64_t n);
void mul(float* x, const float* y, int64_t n);
void scale(float* x, int64_t n, float s);
void add_broadcast(float* x, int64_t n, const float* y, int64_t period);
// cos_sin: device memory [rows, head_dim/2, 2]
void rotary(float* x, int64_t rows, int64_t heads, int64_t head_dim, const float* cos_sin);
void embedding(const Weight& table, const int32_t* host_ids, int64_t n, float* out);
void weight_f32(const Weight& w, float* out);
void patchify(const float* pixels, int64_t batch, int64_t image_size, int64_t patch, float* out);
void relative_bias(const Weight& table, const int32_t* host_buckets, int64_t tq, int64_t tk, float* out);
void attention(const ops::AttentionArgs& a);
// ops::greedy_pick: per row of [rows, cols], the first largest element and its log-softmax, to host memory.
void greedy_pick(const float* x, int64_t rows, int64_t cols, ops::Pick* host_out);

}  // namespace blip2::cuda
