// The CUDA backend of a build without CUDA (-DBLIP2_CUDA=OFF, the default): no GPU is ever reported, and
// anything that would run on one says how to get a build that can.
#include "core/error.h"
#include "cuda/cuda.h"

namespace blip2::cuda {

namespace {
[[noreturn]] void no_cuda() {
  fail(ErrorKind::Usage, "this build has no CUDA support: configure with -DBLIP2_CUDA=ON to run on a GPU");
}
}  // namespace

bool compiled() { return false; }
int device_count() { return 0; }
std::string unavailable_reason() { return "built without CUDA (-DBLIP2_CUDA=OFF)"; }
void select_device(int) { no_cuda(); }
std::string device_description() { no_cuda(); }
void* alloc(size_t) { no_cuda(); }
void release(void*) {}
void copy(void*, const void*, size_t, CopyKind) { no_cuda(); }
void zero(void*, size_t) { no_cuda(); }
void synchronize() {}
double memory_bandwidth(size_t) { no_cuda(); }
double bf16_gemm_flops(int) { no_cuda(); }
void linear(const float*, int64_t, const Weight&, const Weight&, float*) { no_cuda(); }
void layer_norm(float*, int64_t, int64_t, const Weight&, const Weight&, float) { no_cuda(); }
void rms_norm(float*, int64_t, int64_t, const Weight&, float) { no_cuda(); }
void activate(float*, int64_t, Activation) { no_cuda(); }
void add(float*, const float*, int64_t) { no_cuda(); }
void mul(float*, const float*, int64_t) { no_cuda(); }
void scale(float*, int64_t, float) { no_cuda(); }
void add_broadcast(float*, int64_t, const float*, int64_t) { no_cuda(); }
void rotary(float*, int64_t, int64_t, int64_t, const float*) { no_cuda(); }
void embedding(const Weight&, const int32_t*, int64_t, float*) { no_cuda(); }
void weight_f32(const Weight&, float*) { no_cuda(); }
void patchify(const float*, int64_t, int64_t, int64_t, float*) { no_cuda(); }
void relative_bias(const Weight&, const int32_t*, int64_t, int64_t, float*) { no_cuda(); }
void attention(const ops::AttentionArgs&) { no_cuda(); }
void greedy_pick(const float*, int64_t, int64_t, ops::Pick*) { no_cuda(); }

}  // namespace blip2::cuda
