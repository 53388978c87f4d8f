#include "core/device.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "cuda/cuda.h"

namespace blip2 {

DeviceSpec parse_device(const std::string& text) {
  std::string s = text;
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  if (s == "cpu") return {Device::CPU, 0};
  if (s == "emulated") return {Device::Emulated, 0};
  if (s == "cuda" || s == "gpu") return {Device::CUDA, 0};
  if (s.rfind("cuda:", 0) == 0 && s.size() > 5 && s.size() <= 8 &&
      std::all_of(s.begin() + 5, s.end(), [](unsigned char c) { return std::isdigit(c); }))
    return {Device::CUDA, std::atoi(s.c_str() + 5)};
  fail(ErrorKind::Usage, "unknown device '" + text + "' (choose cpu, cuda, cuda:N or emulated)");
}

const char* device_name(Device d) {
  switch (d) {
    case Device::CPU: return "cpu";
    case Device::CUDA: return "cuda";
    case Device::Emulated: return "emulated";
  }
  return "?";
}

std::string device_name(const DeviceSpec& d) {
  return d.kind == Device::CUDA ? "cuda:" + std::to_string(d.index) : device_name(d.kind);
}

Buffer::Buffer(Device device, size_t bytes) : bytes_(bytes), device_(device) {
  if (bytes == 0) return;
  if (device == Device::CUDA) {
    ptr_ = std::shared_ptr<void>(cuda::alloc(bytes), [](void* p) { cuda::release(p); });
  } else {
    // 64-byte aligned, as the vector kernels like it.
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) fail(ErrorKind::Internal, "out of memory allocating " + std::to_string(bytes) + " bytes");
    ptr_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  }
}

Buffer Buffer::copy_of(const void* host, size_t bytes, Device device) {
  Buffer b(device, bytes);
  if (bytes) copy_bytes(b.data(), device, host, Device::CPU, bytes);
  return b;
}

Buffer Buffer::clone() const {
  Buffer b(device_, bytes_);
  if (bytes_) copy_bytes(b.data(), device_, data(), device_, bytes_);
  return b;
}

void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t n) {
  if (n == 0) return;
  const bool dst_gpu = dst_device == Device::CUDA, src_gpu = src_device == Device::CUDA;
  if (!dst_gpu && !src_gpu) std::memcpy(dst, src, n);
  else if (dst_gpu && src_gpu) cuda::copy(dst, src, n, cuda::CopyKind::DeviceToDevice);
  else if (dst_gpu) cuda::copy(dst, src, n, cuda::CopyKind::HostToDevice);
  else cuda::copy(dst, src, n, cuda::CopyKind::DeviceToHost);
}

void zero_bytes(void* dst, Device device, size_t n) {
  if (n == 0) return;
  if (device == Device::CUDA) cuda::zero(dst, n);
  else std::memset(dst, 0, n);
}

void synchronize(Device device) {
  if (device == Device::CUDA) cuda::synchronize();
}

}  // namespace blip2
