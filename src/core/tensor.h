// Tensors of the engine.
//
// Two kinds, kept apart on purpose:
//  * Tensor: an activation. Float32, contiguous, row-major, owned. Models create and consume these.
//  * Weight: a read-only parameter in its storage format: as the checkpoint stores it (F32, F16, BF16; the
//    bytes then usually live in a memory-mapped safetensors file and are used in place), or converted once
//    at load (any of those, or the quantized I8 / I4 below), in which case `owner` keeps the buffers alive.
// Models never look at a Weight's dtype or device: they call ops (ops/ops.h), and the op picks the kernel.
// Adding a storage format or a device is a change to ops and to this file, not to the models.
// Both live on a Device (core/device.h): host tensors keep their elements in `data`, the others in a Buffer.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/device.h"

namespace blip2 {

// I8: symmetric int8 per output row (row r of a [rows, cols] matrix): w ≈ q · scale[r], q in [-127, 127].
// I4: symmetric 4-bit in groups of `group` (32, 64 or 128) consecutive elements along the input dimension:
//     w ≈ q · scale[r][g], q in [-8, 7], scale as IEEE half. Stored as unsigned nibbles q + 8, in blocks of
//     64 elements (32 bytes): byte j of a block holds element j in its low nibble and element 32 + j in its
//     high nibble, so one AND (and one shift) yields 32 consecutive elements.
// Quantized rows are zero-padded to `ld` elements (a multiple of 32 for I8, of max(64, group) for I4).
// ld for a row of `cols` elements: cols rounded up to that multiple (`group` only for I4).
enum class DType { F32, F16, BF16, I8, I4 };

const char* dtype_name(DType t);
size_t dtype_size(DType t);  // bytes per element of the unquantized formats (1 for I8, 0 for I4)
int64_t quantized_ld(DType t, int64_t cols, int group);  // I8, I4: the padded row length (above)
// I4: the stored nibble u = q + 8 of element k of a row starting at `row` (the layout above).
inline int i4_nibble(const uint8_t* row, int64_t k) {
  const uint8_t byte = row[(k / 64) * 32 + (k % 32)];
  return (k % 64) < 32 ? (byte & 15) : (byte >> 4);
}

// The format weights of linear layers are kept in after loading (see LoadOptions in model/blip2.h).
enum class WeightFormat { AsStored, F32, F16, BF16, I8, I4 };
const char* weight_format_name(WeightFormat f);
// "stored"/"as-stored", "f32", "f16", "bf16", "int8"/"i8"/"q8", "int4"/"i4"/"q4" (any case). Throws
// Error(Usage) naming the choices otherwise.
WeightFormat parse_weight_format(const std::string& s);

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t numel(const Shape& s);

constexpr int kFloatColumnsLimit = 64;  // the most float columns a quantized Weight may have (below)
// Float column indices must ascend within [0, cols): the first position k where columns[k] does not, or n.
int first_bad_float_column(const int32_t* columns, int64_t n, int64_t cols);

struct Weight {
  DType dtype = DType::F32;
  Shape shape;
  const void* data = nullptr;
  std::shared_ptr<const void> owner;  // the mapped file, or the buffers a conversion made
  // Quantized formats only (see DType): I8 scales are float [rows]; I4 scales are IEEE half [rows][ld/group].
  const void* scales = nullptr;
  int group = 0;    // I4: elements per scale
  int64_t ld = 0;   // I8 / I4: elements per stored row, padding included
  // I8 / I4 only, optional: input columns kept in float (issue 14: a linear's outlier input channels, chosen
  // at load, ops::float_columns_for). Their elements in `data` are zero; column_weights is float
  // [rows][n_float_columns]; float_columns ascending. In host memory (CPU, Emulated) only: a copy to a GPU
  // quantizes them back into `data` (to()).
  const int32_t* float_columns = nullptr;
  const float* column_weights = nullptr;
  int n_float_columns = 0;  // at most kFloatColumnsLimit
  Device device = Device::CPU;  // where data and scales are

  bool empty() const { return data == nullptr; }
  int64_t rows() const { return shape.empty() ? 0 : shape[0]; }
  int64_t cols() const { return shape.empty() ? 0 : numel(shape) / shape[0]; }
  bool quantized() const { return dtype == DType::I8 || dtype == DType::I4; }
  // Bytes of the stored data and scales, float columns included (what a product streams).
  size_t nbytes() const;
  size_t data_bytes() const;   // of `data` alone
  size_t scale_bytes() const;  // of `scales` alone
  size_t float_column_bytes() const;  // of float_columns and column_weights
  // Widen (or dequantize) elements [begin, begin+n) to float32. Host memory only (CPU, Emulated).
  void to_f32(int64_t begin, int64_t n, float* out) const;
  // The whole weight as float32 on the host (a copy, downloaded first from a GPU; for small tensors such as
  // norms and biases).
  std::vector<float> f32() const;
  // A copy on `d` (data and scales), owned by the result; *this when it is there already. Float columns
  // stay on the host (they are shared with *this); on a GPU they are quantized into the copy's `data`.
  Weight to(Device d) const;
  // A copy whose float columns are quantized into `data` like its other elements (I8 only: the GPU's
  // formats), so that it no longer has any.
  Weight without_float_columns() const;
};

// A float32 [rows, cols] Weight viewing v's elements (not owned: v must outlive it). For tests and
// benchmarks that make weights in memory.
Weight f32_weight(const std::vector<float>& v, int64_t rows, int64_t cols);
Weight f32_weight(std::vector<float>&& v, int64_t rows, int64_t cols) = delete;  // the view would dangle

struct Tensor {
  Shape shape;
  std::vector<float> data;      // the elements, when device is CPU
  Device device = Device::CPU;
  Buffer on_device;             // the elements, on any other device

  Tensor() = default;
  explicit Tensor(Shape s, Device d = Device::CPU);  // zeros
  // Copies are deep, on the same device (models rely on `Tensor n = h;`).
  Tensor(const Tensor& o);
  Tensor& operator=(const Tensor& o);
  Tensor(Tensor&&) = default;
  Tensor& operator=(Tensor&&) = default;
  // A host tensor with these elements, uploaded to d.
  static Tensor from_host(Shape s, const float* values, Device d);

  // The elements for host code: CPU tensors only (Error(Internal) otherwise, which catches model code that
  // would read a GPU tensor on the host).
  float* ptr();
  const float* ptr() const;
  // The elements on whatever device they are: for ops, which dispatch on `device`.
  float* data_ptr() { return device == Device::CPU ? data.data() : static_cast<float*>(on_device.data()); }
  const float* data_ptr() const {
    return device == Device::CPU ? data.data() : static_cast<const float*>(on_device.data());
  }
  // A copy on d (to(CPU) is where GPU results reach the host); a copy even when on d already.
  Tensor to(Device d) const;
  int64_t size() const {
    return device == Device::CPU ? static_cast<int64_t>(data.size()) : static_cast<int64_t>(on_device.bytes() / 4);
  }
  int64_t dim(int i) const { return shape[i < 0 ? shape.size() + i : i]; }
  int64_t last() const { return shape.back(); }
  int64_t rows() const { return last() == 0 ? 0 : size() / last(); }  // all leading dims flattened
};

// t itself when it is in CPU memory, else its copy there: where results leave the device.
inline Tensor on_host(Tensor t) {
  if (t.device == Device::CPU) return t;  // moved, not copied
  return t.to(Device::CPU);
}

float f16_to_f32(uint16_t h);
float bf16_to_f32(uint16_t h);
// Round to nearest even; f16 overflows to infinity from 65520 up, NaN stays NaN.
uint16_t f32_to_f16(float f);
uint16_t f32_to_bf16(float f);

}  // namespace blip2
