#include "core/tensor.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>

#include "core/error.h"

namespace blip2 {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I8: return "I8";
    case DType::I4: return "I4";
  }
  return "?";
}

int64_t quantized_ld(DType t, int64_t cols, int group) {
  const int64_t multiple = t == DType::I4 ? std::max(64, group) : 32;
  return (cols + multiple - 1) / multiple * multiple;
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16:
    case DType::BF16: return 2;
    case DType::I8: return 1;
    case DType::I4: return 0;
  }
  return 0;
}

const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::AsStored: return "stored";
    case WeightFormat::F32: return "f32";
    case WeightFormat::F16: return "f16";
    case WeightFormat::BF16: return "bf16";
    case WeightFormat::I8: return "int8";
    case WeightFormat::I4: return "int4";
  }
  return "?";
}

WeightFormat parse_weight_format(const std::string& text) {
  std::string s = text;
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  if (s == "stored" || s == "as-stored" || s == "asstored") return WeightFormat::AsStored;
  if (s == "f32" || s == "fp32" || s == "float32") return WeightFormat::F32;
  if (s == "f16" || s == "fp16" || s == "float16") return WeightFormat::F16;
  if (s == "bf16" || s == "bfloat16") return WeightFormat::BF16;
  if (s == "int8" || s == "i8" || s == "q8") return WeightFormat::I8;
  if (s == "int4" || s == "i4" || s == "q4") return WeightFormat::I4;
  fail(ErrorKind::Usage, "unknown weight format '" + text + "' (choose stored, f32, f16, bf16, int8 or int4)");
}

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

uint16_t f32_to_f16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;                  // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;                 // >= 65520 rounds to infinity
  if (abs < 0x38800000u) {                                       // below 2^-14: subnormal (or zero)
    if (abs < 0x33000000u) return sign;                          // below 2^-25: rounds to zero
    const uint32_t e = abs >> 23, man = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;                              // 14..24
    uint32_t h = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);                      // rebias exponent 127 -> 15
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

size_t Weight::data_bytes() const {
  switch (dtype) {
    case DType::I8: return static_cast<size_t>(rows() * ld);
    case DType::I4: return static_cast<size_t>(rows() * ld / 2);
    default: return static_cast<size_t>(numel(shape)) * dtype_size(dtype);
  }
}

size_t Weight::scale_bytes() const {
  switch (dtype) {
    case DType::I8: return static_cast<size_t>(rows() * 4);
    case DType::I4: return static_cast<size_t>(rows() * (ld / group) * 2);
    default: return 0;
  }
}

int first_bad_float_column(const int32_t* columns, int64_t n, int64_t cols) {
  for (int64_t k = 0; k < n; ++k)
    if (columns[k] < 0 || columns[k] >= cols || (k > 0 && columns[k] <= columns[k - 1])) return static_cast<int>(k);
  return static_cast<int>(n);
}

size_t Weight::float_column_bytes() const {
  return static_cast<size_t>(n_float_columns) * (4 + static_cast<size_t>(rows()) * 4);
}

size_t Weight::nbytes() const { return data_bytes() + scale_bytes() + float_column_bytes(); }

Weight Weight::without_float_columns() const {
  if (n_float_columns == 0) return *this;
  if (dtype != DType::I8 || !host_memory(device))
    fail(ErrorKind::Internal, "without_float_columns: only host int8 weights fold their float columns back");
  auto buf = std::shared_ptr<int8_t[]>(new int8_t[data_bytes()]);
  std::memcpy(buf.get(), data, data_bytes());
  const auto* s = static_cast<const float*>(scales);
  for (int64_t r = 0; r < rows(); ++r)
    for (int c = 0; c < n_float_columns; ++c) {
      const float q = s[r] > 0.0f ? std::nearbyint(column_weights[r * n_float_columns + c] / s[r]) : 0.0f;
      buf[r * ld + float_columns[c]] = static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f));
    }
  Weight w = *this;
  w.data = buf.get();
  w.float_columns = nullptr;
  w.column_weights = nullptr;
  w.n_float_columns = 0;
  w.owner = std::make_shared<std::pair<std::shared_ptr<int8_t[]>, std::shared_ptr<const void>>>(buf, owner);
  return w;
}

Weight Weight::to(Device d) const {
  if (d == device) return *this;
  if (n_float_columns > 0 && !host_memory(d)) return without_float_columns().to(d);
  // One buffer for data and scales (scales 64-byte aligned after the data).
  const size_t db = data_bytes(), sb = scale_bytes(), scale_at = (db + 63) / 64 * 64;
  Buffer buf(d, sb ? scale_at + sb : db);
  Weight w = *this;
  w.device = d;
  if (db) copy_bytes(buf.data(), d, data, device, db);
  w.data = db ? buf.data() : nullptr;
  if (sb) {
    copy_bytes(static_cast<uint8_t*>(buf.data()) + scale_at, d, scales, device, sb);
    w.scales = static_cast<uint8_t*>(buf.data()) + scale_at;
  }
  // Float columns stay where they are (host memory), so the copy keeps their owner too.
  w.owner = n_float_columns > 0 ? std::make_shared<std::pair<std::shared_ptr<const void>, std::shared_ptr<const void>>>(
                                      buf.keep(), owner)
                                : buf.keep();
  return w;
}

void Weight::to_f32(int64_t begin, int64_t n, float* out) const {
  if (n <= 0) return;  // empty tensors: no bytes to read (and memcpy with null pointers is undefined)
  if (!host_memory(device)) fail(ErrorKind::Internal, "Weight::to_f32 on a GPU weight (use f32())");
  if (n_float_columns > 0) {  // the quantized elements, then the float columns over their zeros
    Weight q = *this;
    q.n_float_columns = 0;
    q.to_f32(begin, n, out);
    const int64_t c = cols();
    for (int64_t r = begin / c; r <= (begin + n - 1) / c; ++r)
      for (int k = 0; k < n_float_columns; ++k) {
        const int64_t at = r * c + float_columns[k];
        if (at >= begin && at < begin + n) out[at - begin] = column_weights[r * n_float_columns + k];
      }
    return;
  }
  switch (dtype) {
    case DType::I8: {
      const int64_t c = cols();
      const auto* q = static_cast<const int8_t*>(data);
      const auto* s = static_cast<const float*>(scales);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = (begin + i) / c, k = (begin + i) % c;
        out[i] = static_cast<float>(q[r * ld + k]) * s[r];
      }
      return;
    }
    case DType::I4: {
      const int64_t c = cols(), ng = ld / group;
      const auto* q = static_cast<const uint8_t*>(data);
      const auto* s = static_cast<const uint16_t*>(scales);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = (begin + i) / c, k = (begin + i) % c;
        const int v = i4_nibble(q + r * (ld / 2), k) - 8;
        out[i] = static_cast<float>(v) * f16_to_f32(s[r * ng + k / group]);
      }
      return;
    }
    case DType::F32:
      std::memcpy(out, static_cast<const float*>(data) + begin, static_cast<size_t>(n) * 4);
      return;
    case DType::F16: {
      const auto* p = static_cast<const uint16_t*>(data) + begin;
      for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(p[i]);
      return;
    }
    case DType::BF16: {
      const auto* p = static_cast<const uint16_t*>(data) + begin;
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(p[i]);
      return;
    }
  }
}

std::vector<float> Weight::f32() const {
  if (!host_memory(device)) return to(Device::CPU).f32();
  std::vector<float> out(static_cast<size_t>(numel(shape)));
  to_f32(0, static_cast<int64_t>(out.size()), out.data());
  return out;
}

Tensor::Tensor(Shape s, Device d) : shape(std::move(s)), device(d) {
  const size_t n = static_cast<size_t>(numel(shape));
  if (d == Device::CPU) {
    data.assign(n, 0.0f);
  } else {
    on_device = Buffer(d, n * 4);
    zero_bytes(on_device.data(), d, n * 4);
  }
}

Tensor::Tensor(const Tensor& o) : shape(o.shape), data(o.data), device(o.device), on_device(o.on_device.clone()) {}

Tensor& Tensor::operator=(const Tensor& o) {
  if (this != &o) *this = Tensor(o);
  return *this;
}

Tensor Tensor::from_host(Shape s, const float* values, Device d) {
  Tensor t;
  t.shape = std::move(s);
  t.device = d;
  const size_t n = static_cast<size_t>(numel(t.shape));
  if (d == Device::CPU) t.data.assign(values, values + n);
  else t.on_device = Buffer::copy_of(values, n * 4, d);
  return t;
}

float* Tensor::ptr() {
  if (device != Device::CPU)
    fail(ErrorKind::Internal, std::string("host code read a tensor on device ") + device_name(device));
  return data.data();
}

const float* Tensor::ptr() const { return const_cast<Tensor*>(this)->ptr(); }

Tensor Tensor::to(Device d) const {
  Tensor t;
  t.shape = shape;
  t.device = d;
  const size_t n = static_cast<size_t>(size());
  if (d == Device::CPU) t.data.resize(n);
  else t.on_device = Buffer(d, n * 4);
  copy_bytes(t.data_ptr(), d, data_ptr(), device, n * 4);
  return t;
}

Weight f32_weight(const std::vector<float>& v, int64_t rows, int64_t cols) {
  if (static_cast<int64_t>(v.size()) != rows * cols)
    fail(ErrorKind::Internal, "f32_weight: " + std::to_string(v.size()) + " values for " + std::to_string(rows) + "x" +
                                  std::to_string(cols));
  Weight w;
  w.dtype = DType::F32;
  w.shape = {rows, cols};
  w.data = v.data();
  return w;
}

}  // namespace blip2
