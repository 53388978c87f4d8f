// safetensors files: memory-mapped reading with every header field checked, and a small writer.
// Layout: u64 little-endian header length N | N bytes of JSON {name: {dtype, shape, data_offsets}} | data.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace blip2 {

// A read-only memory mapping of a whole file; unmapped when the last reference goes.
class MappedFile {
 public:
  static std::shared_ptr<MappedFile> open(const std::string& path);
  ~MappedFile();
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

struct TensorEntry {
  std::string dtype;  // as written in the header: F32, F16, BF16, U8, I64, ...
  Shape shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
};

class SafetensorsFile {
 public:
  // Maps and validates the file; throws Error(Model) naming the file and the problem.
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return file_->path(); }
  const std::map<std::string, TensorEntry>& entries() const { return entries_; }
  const TensorEntry* find(const std::string& name) const;
  // A floating-point tensor as a Weight viewing the mapped bytes (F32, F16 or BF16).
  Weight weight(const std::string& name) const;
  // A float32 copy of any F32/F16/BF16 tensor (test and tool convenience).
  Tensor tensor(const std::string& name) const;

 private:
  std::shared_ptr<MappedFile> file_;
  std::map<std::string, TensorEntry> entries_;
};

// Writes float32 tensors, in the given order, to a safetensors file.
struct NamedTensor {
  std::string name;
  const Tensor* tensor;
};
void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors);

}  // namespace blip2
