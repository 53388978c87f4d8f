#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
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

void MappedFile::release(const void* p, size_t n) const {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;  // whole pages only
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + n) / page * page;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);  // advisory: errors ignored
}

void MappedFile::prefetch(const void* p, size_t n) const {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p) / page * page;  // every page it touches
  const uintptr_t hi = reinterpret_cast<uintptr_t>(p) + n;
  if (n > 0) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_WILLNEED);  // advisory: errors ignored
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
    if (name == "__metadata__") {
      if (v.is_object())
        for (auto& [key, value] : v.items())
          if (value.is_string()) metadata_[key] = value.get<std::string>();
      continue;
    }
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
    if (begin > end)
      bad(where + "data offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
          ") are reversed (begin after end)");
    if (end > data_size)
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

void SafetensorsFile::prefetch(const std::string& name) const {
  if (const TensorEntry* e = find(name)) file_->prefetch(e->data, e->nbytes);
}

void SafetensorsFile::release(const std::string& name) const {
  if (const TensorEntry* e = find(name)) file_->release(e->data, e->nbytes);
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  Weight w = weight(name);
  Tensor t(w.shape);
  if (t.size() > 0) w.to_f32(0, t.size(), t.ptr());  // an empty tensor has no buffer to copy into
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


void SafetensorsWriter::check_new_name(const std::string& name, const Shape& shape) const {
  if (name.empty() || name == "__metadata__")
    fail(ErrorKind::Internal, "safetensors writer: reserved tensor name '" + name + "'");
  for (const auto& t : tensors_)
    if (t.name == name) fail(ErrorKind::Internal, "safetensors writer: duplicate tensor '" + name + "'");
  for (int64_t d : shape)
    if (d < 0) fail(ErrorKind::Internal, "safetensors writer: tensor '" + name + "' has a negative dimension");
}

void SafetensorsWriter::add(const std::string& name, DType dtype, const Shape& shape) {
  check_new_name(name, shape);
  if (dtype != DType::F32 && dtype != DType::F16 && dtype != DType::BF16)
    fail(ErrorKind::Internal, "safetensors writer: tensor '" + name + "': only F32, F16 and BF16 can be written");
  const uint64_t n = static_cast<uint64_t>(numel(shape)) * dtype_size(dtype);
  tensors_.push_back({name, dtype, shape, data_bytes_, data_bytes_ + n, "", nullptr});
  data_bytes_ += n;
}

void SafetensorsWriter::add_bytes(const std::string& name, const std::string& dtype, const Shape& shape,
                                  const void* bytes) {
  check_new_name(name, shape);
  const size_t esize = element_size(dtype);
  if (esize == 0) fail(ErrorKind::Internal, "safetensors writer: tensor '" + name + "': unknown dtype " + dtype);
  const uint64_t n = static_cast<uint64_t>(numel(shape)) * esize;
  tensors_.push_back({name, DType::F32, shape, data_bytes_, data_bytes_ + n, dtype, bytes});
  data_bytes_ += n;
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

std::string SafetensorsWriter::header() const {
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  h["__metadata__"] = metadata_;
  for (const auto& t : tensors_)
    h[t.name] = {{"dtype", t.raw ? t.raw_dtype : std::string(dtype_name(t.dtype))},
                 {"shape", t.shape},
                 {"data_offsets", {t.begin, t.end}}};
  std::string s = h.dump();
  while ((8 + s.size()) % alignment_ != 0) s.push_back(' ');  // the data starts aligned
  return s;
}

void SafetensorsWriter::write(const std::string& path, const Fill& fill, const Progress& progress,
                              int64_t chunk_elements) const {
  if (chunk_elements <= 0) chunk_elements = int64_t(1) << 20;
  const std::string tmp = path + ".partial";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(ErrorKind::Usage, tmp + ": cannot open for writing: " + std::strerror(errno));
  // On any exception (a failed write, or one from `fill`) the partial file is closed and removed.
  struct Guard {
    int fd;
    const std::string& tmp;
    bool done = false;
    ~Guard() {
      if (!done) {
        ::close(fd);
        ::unlink(tmp.c_str());
      }
    }
  } guard{fd, tmp};
  const auto put = [&](const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    while (n > 0) {
      const ssize_t w = ::write(fd, c, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) fail(ErrorKind::Usage, tmp + ": write failed: " + std::strerror(w < 0 ? errno : ENOSPC));
      c += w;
      n -= static_cast<size_t>(w);
    }
  };
  const std::string h = header();
  const uint64_t len = h.size();
  put(&len, 8);  // little-endian on every platform we build for
  put(h.data(), h.size());

  std::vector<float> values;
  std::vector<uint16_t> half;
  uint64_t written = 0;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const Entry& t = tensors_[i];
    if (t.raw) {
      put(t.raw, t.end - t.begin);
      written += t.end - t.begin;
      if (progress) progress(written, data_bytes_);
      continue;
    }
    const int64_t total = numel(t.shape);
    for (int64_t begin = 0; begin < total; begin += chunk_elements) {
      const int64_t n = std::min(chunk_elements, total - begin);
      values.resize(static_cast<size_t>(n));
      fill(i, begin, n, values.data());
      if (t.dtype == DType::F32) {
        put(values.data(), static_cast<size_t>(n) * 4);
      } else {
        half.resize(static_cast<size_t>(n));
        if (t.dtype == DType::F16)
          for (int64_t j = 0; j < n; ++j) half[j] = f32_to_f16(values[j]);
        else
          for (int64_t j = 0; j < n; ++j) half[j] = f32_to_bf16(values[j]);
        put(half.data(), static_cast<size_t>(n) * 2);
      }
      written += static_cast<uint64_t>(n) * dtype_size(t.dtype);
      if (progress) progress(written, data_bytes_);
    }
  }
  guard.done = true;
  if (::close(fd) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(tmp.c_str());
    fail(ErrorKind::Usage, tmp + ": close failed: " + why);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(tmp.c_str());
    fail(ErrorKind::Usage, path + ": cannot rename " + tmp + " into place: " + why);
  }
}

}  // namespace blip2
