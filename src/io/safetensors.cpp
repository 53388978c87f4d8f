#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace blip2 {

std::shared_ptr<MappedFile> MappedFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(ErrorKind::Model, path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(ErrorKind::Model, path + ": not a regular file");
  }
  std::shared_ptr<MappedFile> f(new MappedFile());
  f->path_ = path;
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ > 0) {
    void* p = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      fail(ErrorKind::Model, path + ": mmap failed: " + std::strerror(errno));
    }
    f->data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
  return f;
}

MappedFile::~MappedFile() {
  if (data_) munmap(const_cast<uint8_t*>(data_), size_);
}

namespace {

size_t element_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4},
      {"I16", 2}, {"I8", 1},  {"U8", 1},  {"BOOL", 1}, {"U16", 2}, {"U32", 4}, {"U64", 8}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

constexpr uint64_t kMaxHeader = 100u << 20;  // the format's own limit

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(MappedFile::open(path)) {
  const auto bad = [&](const std::string& why) { fail(ErrorKind::Model, path + ": " + why); };
  const size_t size = file_->size();
  if (size < 8) bad("truncated safetensors file (" + std::to_string(size) + " bytes, no header)");
  uint64_t header_len = 0;
  std::memcpy(&header_len, file_->data(), 8);  // little-endian on every platform we build for
  if (header_len > kMaxHeader || header_len > size - 8)
    bad("bad safetensors header length " + std::to_string(header_len) + " for a file of " +
        std::to_string(size) + " bytes (truncated or not a safetensors file)");
  const char* hdr = reinterpret_cast<const char*>(file_->data() + 8);
  nlohmann::json j = nlohmann::json::parse(hdr, hdr + header_len, nullptr, false);
  if (j.is_discarded() || !j.is_object()) bad("safetensors header is not a JSON object");
  const uint8_t* base = file_->data() + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  for (auto& [name, v] : j.items()) {
    if (name == "__metadata__") continue;
    const std::string where = "tensor '" + name + "': ";
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets") ||
        !v["dtype"].is_string() || !v["shape"].is_array() || !v["data_offsets"].is_array() ||
        v["data_offsets"].size() != 2)
      bad(where + "malformed header entry");
    TensorEntry e;
    e.dtype = v["dtype"].get<std::string>();
    const size_t esize = element_size(e.dtype);
    if (esize == 0) bad(where + "unknown dtype " + e.dtype);
    uint64_t count = 1;
    for (auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) bad(where + "shape must hold non-negative integers");
      const uint64_t n = d.get<uint64_t>();
      if (n != 0 && count > (uint64_t(1) << 50) / n) bad(where + "shape too large");
      count *= n;
      e.shape.push_back(static_cast<int64_t>(n));
    }
    const auto& off = v["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      bad(where + "data_offsets must be non-negative integers");
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > data_size)
      bad(where + "data offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
          ") lie outside the file's " + std::to_string(data_size) + " data bytes (truncated file?)");
    if (end - begin != count * esize)
      bad(where + "holds " + std::to_string(end - begin) + " bytes but " + e.dtype + " " +
          shape_str(e.shape) + " needs " + std::to_string(count * esize));
    e.data = base + begin;
    e.nbytes = end - begin;
    entries_.emplace(name, std::move(e));
  }
}

const TensorEntry* SafetensorsFile::find(const std::string& name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

Weight SafetensorsFile::weight(const std::string& name) const {
  const TensorEntry* e = find(name);
  if (!e) fail(ErrorKind::Model, path() + ": no tensor named '" + name + "'");
  Weight w;
  if (e->dtype == "F32") w.dtype = DType::F32;
  else if (e->dtype == "F16") w.dtype = DType::F16;
  else if (e->dtype == "BF16") w.dtype = DType::BF16;
  else fail(ErrorKind::Model, path() + ": tensor '" + name + "' has dtype " + e->dtype +
                                  "; expected F32, F16 or BF16");
  if (reinterpret_cast<uintptr_t>(e->data) % dtype_size(w.dtype) != 0)
    fail(ErrorKind::Model, path() + ": tensor '" + name + "' is not aligned to its element size");
  w.shape = e->shape;
  w.data = e->data;
  w.owner = file_;  // keeps the mapping alive as long as the weight
  return w;
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  Weight w = weight(name);
  Tensor t(w.shape);
  w.to_f32(0, t.size(), t.ptr());
  return t;
}

void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    const uint64_t n = static_cast<uint64_t>(t.tensor->size()) * 4;
    header[t.name] = {{"dtype", "F32"}, {"shape", t.tensor->shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h.push_back(' ');  // keep the data 8-byte aligned
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail(ErrorKind::Usage, path + ": cannot open for writing");
  const uint64_t len = h.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  for (const auto& t : tensors)
    out.write(reinterpret_cast<const char*>(t.tensor->ptr()), static_cast<std::streamsize>(t.tensor->size() * 4));
  if (!out) fail(ErrorKind::Usage, path + ": write failed");
}

}  // namespace blip2
