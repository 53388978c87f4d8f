// Where tensors and weights live, and memory there.
//
//   CPU       host memory; the CPU kernels (src/ops).
//   CUDA      an NVIDIA GPU's memory; the CUDA kernels (src/cuda). The GPU's index is chosen once per process
//             (cuda::select_device), so a tensor carries the kind alone.
//   Emulated  host memory that the models may only reach through ops, exactly as they would a GPU's: ops run
//             the CPU kernels on it, but Tensor::ptr() refuses it. The tests load models on it to run every
//             device code path (uploads, row copies, caches, downloads) on machines without a GPU and check
//             the results equal the CPU's bit for bit.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace blip2 {

enum class Device { CPU, CUDA, Emulated };

// A device as the user names it: "cpu", "cuda", "cuda:N" (GPU N), "emulated". Throws Error(Usage) otherwise.
struct DeviceSpec {
  Device kind = Device::CPU;
  int index = 0;  // CUDA: which GPU
};
DeviceSpec parse_device(const std::string& text);
std::string device_name(const DeviceSpec& d);
const char* device_name(Device d);
// True where host code can read the bytes directly (CPU and Emulated).
inline bool host_memory(Device d) { return d != Device::CUDA; }

// Owned bytes on one device (uninitialised when made). Copies share the bytes; clone() copies them.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Device device, size_t bytes);
  Buffer(const Buffer&) = default;
  Buffer& operator=(const Buffer&) = default;
  Buffer(Buffer&& o) noexcept : ptr_(std::move(o.ptr_)), bytes_(o.bytes_), device_(o.device_) { o.bytes_ = 0; }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this == &o) return *this;
    ptr_ = std::move(o.ptr_);
    bytes_ = o.bytes_;
    device_ = o.device_;
    o.bytes_ = 0;  // a moved-from buffer is empty, size and all
    return *this;
  }
  static Buffer copy_of(const void* host, size_t bytes, Device device);  // host bytes uploaded
  void* data() { return ptr_.get(); }
  const void* data() const { return ptr_.get(); }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }
  bool empty() const { return bytes_ == 0; }
  Buffer clone() const;
  // The shared pointer, so that something viewing the bytes (a Weight) can keep them alive.
  std::shared_ptr<const void> keep() const { return ptr_; }

 private:
  std::shared_ptr<void> ptr_;
  size_t bytes_ = 0;
  Device device_ = Device::CPU;
};

// Copies n bytes between any two devices. A copy to host memory from the GPU waits for the GPU's queued
// work (it is the point where results become visible to the host).
void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t n);
// Fills n bytes with zeros.
void zero_bytes(void* dst, Device device, size_t n);
// Waits until the device has finished the work queued so far (GPU work is asynchronous; CPU work is not): for
// timing a stage.
void synchronize(Device device);

}  // namespace blip2
