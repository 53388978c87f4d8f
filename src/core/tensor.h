// Tensors of the engine.
//
// Two kinds, kept apart on purpose:
//  * Tensor: an activation. Float32, contiguous, row-major, owned. Models create and consume these.
//  * Weight: a read-only parameter as the checkpoint stores it (F32, F16 or BF16 today). Its bytes usually
//    live in a memory-mapped safetensors file and are used in place; `owner` keeps alive any buffer the
//    loader had to make (a future int8/int4 conversion, a device upload).
// Models never look at a Weight's dtype: they call ops (ops/ops.h), and the op picks the kernel. Adding a
// storage format or a device is a change to ops and to this file, not to the models.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace blip2 {

enum class DType { F32, F16, BF16 };

const char* dtype_name(DType t);
size_t dtype_size(DType t);

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t numel(const Shape& s);

struct Weight {
  DType dtype = DType::F32;
  Shape shape;
  const void* data = nullptr;
  std::shared_ptr<const void> owner;  // null when the bytes belong to a mapped file

  bool empty() const { return data == nullptr; }
  int64_t rows() const { return shape.empty() ? 0 : shape[0]; }
  int64_t cols() const { return shape.empty() ? 0 : numel(shape) / shape[0]; }
  // Widen elements [begin, begin+n) to float32.
  void to_f32(int64_t begin, int64_t n, float* out) const;
  // The whole weight as float32 (a copy; for small tensors such as norms and biases).
  std::vector<float> f32() const;
};

struct Tensor {
  Shape shape;
  std::vector<float> data;

  Tensor() = default;
  explicit Tensor(Shape s) : shape(std::move(s)), data(static_cast<size_t>(numel(shape)), 0.0f) {}
  float* ptr() { return data.data(); }
  const float* ptr() const { return data.data(); }
  int64_t size() const { return static_cast<int64_t>(data.size()); }
  int64_t dim(int i) const { return shape[i < 0 ? shape.size() + i : i]; }
  int64_t last() const { return shape.back(); }
  int64_t rows() const { return last() == 0 ? 0 : size() / last(); }  // all leading dims flattened
};

float f16_to_f32(uint16_t h);
float bf16_to_f32(uint16_t h);

}  // namespace blip2
