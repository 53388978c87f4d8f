// safetensors files: memory-mapped reading with every header field checked, and a small writer.
// Layout: u64 little-endian header length N | N bytes of JSON {name: {dtype, shape, data_offsets}} | data.
#pragma once
#include <functional>
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
  // Drops the resident pages wholly inside [p, p + n) from this mapping (madvise MADV_DONTNEED): after a
  // tensor was converted into a buffer of its own, its file pages no longer count in the process's memory.
  // The mapping is private and never written, so a later read simply faults the file's bytes back in.
  void release(const void* p, size_t n) const;
  // Starts reading the pages covering [p, p + n) into the page cache in the background (MADV_WILLNEED): a
  // tensor used in place is then read while loading and the first image go on, not fault by fault on first use.
  void prefetch(const void* p, size_t n) const;

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
  // The mapping, to keep alive as a Weight's owner while the Weight views it.
  std::shared_ptr<const void> mapping() const { return file_; }
  // The header's "__metadata__" string entries (others are ignored).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // A floating-point tensor as a Weight viewing the mapped bytes (F32, F16 or BF16).
  Weight weight(const std::string& name) const;
  // Drops the tensor's pages from memory (MappedFile::release); the Weight stays valid.
  void release(const std::string& name) const;
  // Starts reading the tensor's pages in the background (MappedFile::prefetch).
  void prefetch(const std::string& name) const;
  // A float32 copy of any F32/F16/BF16 tensor (test and tool convenience).
  Tensor tensor(const std::string& name) const;

 private:
  std::shared_ptr<MappedFile> file_;
  std::map<std::string, TensorEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Writes float32 tensors, in the given order, to a safetensors file.
struct NamedTensor {
  std::string name;
  const Tensor* tensor;
};
void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors);


// A streaming safetensors writer for files larger than memory: declare every tensor first (name, dtype,
// shape), then `write`: it computes the header (offsets in declaration order, no holes, data 8-byte
// aligned), writes it, and then asks `fill` for each tensor's values chunk by chunk as float32, converting
// to the declared dtype on the way. At most one chunk is held in memory, whatever the tensor sizes.
class SafetensorsWriter {
 public:
  // Produce float32 values for elements [begin, begin + n) of the tensor declared `index`-th (0-based).
  // Chunks of one tensor arrive in order, tensors in declaration order.
  using Fill = std::function<void(size_t index, int64_t begin, int64_t n, float* out)>;
  // After each chunk: data bytes written so far and the file's total data bytes.
  using Progress = std::function<void(uint64_t written, uint64_t total)>;

  // Throws Error(Internal) for a duplicate or reserved name or a negative dimension.
  void add(const std::string& name, DType dtype, const Shape& shape);
  // A tensor written verbatim from `bytes` (numel(shape) elements of `dtype`, a safetensors dtype name such as
  // "I8", "U8", "F16" or "F32"), which must stay valid until write() returns; `fill` is not asked for it.
  void add_bytes(const std::string& name, const std::string& dtype, const Shape& shape, const void* bytes);
  // Pads the header so that the data starts a multiple of `bytes` (a power of two, at least 8) into the file:
  // with tensors whose sizes are multiples of it, each then starts so aligned in a mapping of the file.
  void set_data_alignment(size_t bytes) { alignment_ = bytes; }
  // A string entry of the header's "__metadata__" ({"format": "pt"} is always written).
  void set_metadata(const std::string& key, const std::string& value);

  size_t size() const { return tensors_.size(); }
  uint64_t data_bytes() const { return data_bytes_; }
  // The header as written: JSON padded with spaces so that the data starts aligned (8 bytes unless set).
  std::string header() const;
  uint64_t file_bytes() const { return 8 + header().size() + data_bytes_; }

  // Writes `path` through a temporary `path.partial` renamed at the end, so an interrupted run never
  // leaves a truncated file under the final name. Throws Error(Usage) if the file cannot be written.
  void write(const std::string& path, const Fill& fill, const Progress& progress = nullptr,
             int64_t chunk_elements = int64_t(1) << 20) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    Shape shape;
    uint64_t begin, end;
    std::string raw_dtype;        // add_bytes: the header's dtype, and
    const void* raw = nullptr;    // the bytes to write
  };
  void check_new_name(const std::string& name, const Shape& shape) const;
  std::vector<Entry> tensors_;
  std::map<std::string, std::string> metadata_{{"format", "pt"}};
  uint64_t data_bytes_ = 0;
  size_t alignment_ = 8;
};

}  // namespace blip2
