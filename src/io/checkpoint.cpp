#include "io/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/file.h"

namespace blip2 {

namespace fs = std::filesystem;

namespace {

constexpr const char* kInt8Suffix = ".int8";
constexpr const char* kInt4Suffix = ".int4_g";

// NAME for NAME.int8 or NAME.int4_g32/64/128 (a quantized tensor's data), "" for any other file name.
std::string quantized_base(const std::string& file_name) {
  if (file_name.ends_with(kInt8Suffix)) return file_name.substr(0, file_name.size() - std::strlen(kInt8Suffix));
  for (const char* g : {"32", "64", "128"})
    if (file_name.ends_with(std::string(kInt4Suffix) + g))
      return file_name.substr(0, file_name.size() - std::strlen(kInt4Suffix) - std::strlen(g));
  return "";
}

}  // namespace

std::string quantized_tensor_name(const std::string& name, const Weight& w) {
  if (w.dtype == DType::I8) return name + kInt8Suffix;
  if (w.dtype == DType::I4) return name + kInt4Suffix + std::to_string(w.group);
  fail(ErrorKind::Internal, "quantized_tensor_name: tensor '" + name + "' is " + dtype_name(w.dtype) + ", not quantized");
}

QuantizedStorage quantized_storage(const Weight& w) {
  if (w.dtype == DType::I8) return {"I8", "F32", {w.rows(), w.ld}, {w.rows()}};
  return {"U8", "F16", {w.rows(), w.ld / 2}, {w.rows(), w.ld / w.group}};
}

Checkpoint::Checkpoint(const std::string& model_dir, const Progress& progress) : progress_(progress) {
  const fs::path dir(model_dir);
  const fs::path index = dir / "model.safetensors.index.json";
  const fs::path single = dir / "model.safetensors";
  if (fs::exists(index)) {
    const auto j = nlohmann::json::parse(read_file(index.string(), kMaxConfigFileBytes, ErrorKind::Model, "index file"),
                                         nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail(ErrorKind::Model, index.string() + ": malformed index (no \"weight_map\" object)");
    std::map<std::string, std::vector<std::string>> by_shard;  // shard file -> tensor names
    for (auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) fail(ErrorKind::Model, index.string() + ": weight_map['" + name + "'] is not a file name");
      const std::string f = file.get<std::string>();
      if (f.empty() || f.find('/') != std::string::npos || f == "..")
        fail(ErrorKind::Model, index.string() + ": bad shard file name '" + f + "'");
      by_shard[f].push_back(name);
    }
    state_.shards = static_cast<int>(by_shard.size());
    for (auto& [file, names] : by_shard) {
      const std::string path = (dir / file).string();
      if (!fs::exists(path)) fail(ErrorKind::Model, index.string() + " names shard " + file + ", which is missing");
      files_.push_back(std::make_unique<SafetensorsFile>(path));
      ++state_.shards_opened;
      if (progress_) progress_(state_);
      const SafetensorsFile* sf = files_.back().get();
      for (const auto& name : names) {
        if (!sf->find(name))
          fail(ErrorKind::Model, path + ": the index places tensor '" + name + "' here, but the file lacks it");
        where_[name] = sf;
      }
    }
  } else if (fs::exists(single)) {
    files_.push_back(std::make_unique<SafetensorsFile>(single.string()));
    for (const auto& [name, e] : files_.back()->entries()) where_[name] = files_.back().get();
    state_.shards = state_.shards_opened = 1;
    if (progress_) progress_(state_);
  } else {
    fail(ErrorKind::Model, model_dir + ": no model.safetensors or model.safetensors.index.json");
  }
  for (const auto& [name, file] : where_) {
    const std::string base = quantized_base(name);
    if (base.empty()) continue;
    if (where_.count(base))
      fail(ErrorKind::Model, file->path() + ": tensor '" + base + "' is stored twice, as is and as '" + name + "'");
    if (!quantized_.emplace(base, name).second)
      fail(ErrorKind::Model, file->path() + ": tensor '" + base + "' is stored quantized twice ('" +
                                 quantized_[base] + "' and '" + name + "')");
  }
}

Weight Checkpoint::quantized_weight(const std::string& name, const std::string& data_name, const Shape& shape) const {
  const SafetensorsFile* file = where_.at(data_name);
  const auto bad = [&](const std::string& why) {
    fail(ErrorKind::Model, file->path() + ": tensor '" + data_name + "' " + why);
  };
  const auto layout = file->metadata().find("blip2.quantized_layout");
  if (layout == file->metadata().end() || layout->second != kQuantizedLayout)
    bad(std::string("is pre-quantized, but the file's metadata does not name blip2's quantized layout ") +
        kQuantizedLayout + " (written by another version?); quantize the original checkpoint again");
  const std::string scales_name = data_name + kScalesSuffix;
  const auto scales_file = where_.find(scales_name);
  if (scales_file == where_.end()) bad("has no scales tensor '" + scales_name + "' beside it");
  const int64_t rows = shape.empty() ? 0 : shape[0], cols = rows ? numel(shape) / rows : 0;
  if (rows <= 0 || cols <= 0) bad("quantizes " + name + ", whose shape " + shape_str(shape) + " is not a matrix");

  Weight w;
  w.shape = shape;
  const bool int8 = data_name.ends_with(kInt8Suffix);
  w.dtype = int8 ? DType::I8 : DType::I4;
  w.group = int8 ? 0 : std::stoi(data_name.substr(data_name.rfind('g') + 1));
  w.ld = quantized_ld(w.dtype, cols, w.group);
  const QuantizedStorage want = quantized_storage(w);
  const TensorEntry& data = *file->find(data_name);
  const TensorEntry& scales = *scales_file->second->find(scales_name);
  const std::string what = std::string(dtype_name(w.dtype)) + " " + name + " " + shape_str(shape);
  if (data.dtype != want.data_dtype || data.shape != want.data_shape)
    bad("is " + data.dtype + " " + shape_str(data.shape) + ", but " + what + " needs " + want.data_dtype + " " +
        shape_str(want.data_shape) + " (mismatched config or checkpoint?)");
  if (scales.dtype != want.scales_dtype || scales.shape != want.scales_shape)
    fail(ErrorKind::Model, scales_file->second->path() + ": tensor '" + scales_name + "' is " + scales.dtype + " " +
                               shape_str(scales.shape) + ", but " + what + " needs " + want.scales_dtype + " " +
                               shape_str(want.scales_shape));
  if (reinterpret_cast<uintptr_t>(scales.data) % (int8 ? 4 : 2) != 0)
    fail(ErrorKind::Model, scales_file->second->path() + ": tensor '" + scales_name + "' is not aligned to its element size");
  w.data = data.data;
  w.scales = scales.data;
  // Data, scales and float columns may lie in different shards: the weight keeps every mapping.
  auto mappings = std::make_shared<std::vector<std::shared_ptr<const void>>>();
  mappings->push_back(file->mapping());
  mappings->push_back(scales_file->second->mapping());
  const std::string columns_name = data_name + kColumnsSuffix, weights_name = data_name + kColumnWeightsSuffix;
  const auto columns_file = where_.find(columns_name), weights_file = where_.find(weights_name);
  if ((columns_file == where_.end()) != (weights_file == where_.end()))
    bad("has only one of '" + columns_name + "' and '" + weights_name + "' beside it");
  if (columns_file != where_.end()) {
    const TensorEntry& c = *columns_file->second->find(columns_name);
    const TensorEntry& cw = *weights_file->second->find(weights_name);
    const int64_t n = c.shape.size() == 1 ? c.shape[0] : -1;
    if (c.dtype != "I32" || n < 1 || n > kFloatColumnsLimit)
      fail(ErrorKind::Model, columns_file->second->path() + ": tensor '" + columns_name + "' is " + c.dtype + " " +
                                 shape_str(c.shape) + ", but float columns are I32 [n] with 1 <= n <= " +
                                 std::to_string(kFloatColumnsLimit));
    if (cw.dtype != "F32" || cw.shape != Shape{rows, n})
      fail(ErrorKind::Model, weights_file->second->path() + ": tensor '" + weights_name + "' is " + cw.dtype + " " +
                                 shape_str(cw.shape) + ", but " + what + " with " + std::to_string(n) +
                                 " float columns needs F32 " + shape_str({rows, n}));
    if (reinterpret_cast<uintptr_t>(c.data) % 4 != 0 || reinterpret_cast<uintptr_t>(cw.data) % 4 != 0)
      fail(ErrorKind::Model, columns_file->second->path() + ": tensor '" + columns_name + "' or '" + weights_name +
                                 "' is not aligned to its element size");
    const auto* idx = reinterpret_cast<const int32_t*>(c.data);
    if (const int k = first_bad_float_column(idx, n, cols); k != n)
      fail(ErrorKind::Model, columns_file->second->path() + ": tensor '" + columns_name + "' holds column " +
                                 std::to_string(idx[k]) + " at " + std::to_string(k) +
                                 ": columns must ascend within [0, " + std::to_string(cols) + ")");
    w.float_columns = idx;
    w.column_weights = reinterpret_cast<const float*>(cw.data);
    w.n_float_columns = static_cast<int>(n);
    mappings->push_back(columns_file->second->mapping());
    mappings->push_back(weights_file->second->mapping());
  }
  w.owner = mappings;
  return w;
}

Checkpoint::TiedEmbedding Checkpoint::take_tied_embedding(const std::string& name, const std::string& head_name,
                                                          const Shape& shape) {
  const Weight head = take(name, shape);
  const Weight table = stored(name);
  if (!head.quantized() || !host_memory(head.device) || table.empty()) return {head, head};
  taken_bytes_[head_name] = taken_bytes_[name];
  taken_dtypes_[head_name] = head.dtype;
  taken_bytes_[name] = table.nbytes();
  taken_dtypes_[name] = table.dtype;
  return {table, head};
}

void Checkpoint::release_pages(const std::string& name) const {
  const auto it = where_.find(name);
  if (it != where_.end()) it->second->release(name);
}

Weight Checkpoint::stored(const std::string& name) const {
  const auto it = where_.find(name);
  if (it == where_.end()) return {};
  return it->second->weight(name);
}

std::map<std::string, Shape> Checkpoint::stored_shapes() const {
  // A quantized tensor's data NAME.int8 / NAME.int4_gG, or that name + one of the suffixes of its parts.
  const auto quantized_part = [](const std::string& name) {
    for (const char* part : {kScalesSuffix, kColumnsSuffix, kColumnWeightsSuffix})
      if (name.ends_with(part) && !quantized_base(name.substr(0, name.size() - std::strlen(part))).empty())
        return true;
    return !quantized_base(name).empty();
  };
  std::map<std::string, Shape> out;
  for (const auto& [name, file] : where_)
    if (!quantized_part(name)) out[name] = file->find(name)->shape;
  return out;
}

bool Checkpoint::has(const std::string& name) const { return where_.count(name) != 0 || quantized_.count(name) != 0; }

Weight Checkpoint::take(const std::string& name, const Shape& shape) {
  const auto quantized = quantized_.find(name);
  const std::string& stored = quantized != quantized_.end() ? quantized->second : name;
  const auto it = where_.find(stored);
  if (it == where_.end()) fail(ErrorKind::Model, "checkpoint is missing tensor '" + name + "'");
  Weight w;
  if (quantized != quantized_.end()) {
    w = quantized_weight(name, stored, shape);
    for (const char* part : {kScalesSuffix, kColumnsSuffix, kColumnWeightsSuffix})
      if (where_.count(stored + part)) used_.insert(stored + part);
  } else {
    w = it->second->weight(name);
    if (w.shape != shape)
      fail(ErrorKind::Model, it->second->path() + ": tensor '" + name + "' has shape " + shape_str(w.shape) +
                                 " but the config implies " + shape_str(shape));
  }
  used_.insert(stored);
  Weight c = convert_ ? convert_(name, w) : w;
  if (c.data != w.data) {
    it->second->release(stored);
  } else {  // used in place
    it->second->prefetch(stored);
    if (w.scales) where_.at(stored + kScalesSuffix)->prefetch(stored + kScalesSuffix);
  }
  taken_bytes_[name] = c.nbytes();
  taken_dtypes_[name] = c.dtype;
  if (progress_) {
    if (state_.bytes_total == 0) state_.bytes_total = total_bytes();
    state_.bytes_taken += w.nbytes();
    progress_(state_);
  }
  return c;
}

Weight Checkpoint::take_any(const std::vector<std::string>& names, const Shape& shape) {
  const std::string* found = nullptr;
  for (const auto& n : names)
    if (has(n)) {
      if (!found) found = &n;
      else take(n, shape);  // an alias that is present must still be well-formed
    }
  if (!found) {
    std::string all;
    for (const auto& n : names) all += (all.empty() ? "'" : ", '") + n + "'";
    fail(ErrorKind::Model, "checkpoint is missing tensor " + all);
  }
  return take(*found, shape);
}

void Checkpoint::ignore(const std::string& name) {
  if (has(name)) used_.insert(name);
}

void Checkpoint::check_all_used() const {
  std::vector<std::string> extra;
  for (const auto& [name, f] : where_)
    if (!used_.count(name)) extra.push_back(name);
  if (extra.empty()) return;
  std::string msg = "checkpoint has " + std::to_string(extra.size()) +
                    " tensor(s) the config does not account for (wrong config?): ";
  for (size_t i = 0; i < extra.size() && i < 5; ++i) msg += (i ? ", " : "") + extra[i];
  if (extra.size() > 5) msg += ", ...";
  fail(ErrorKind::Model, msg);
}

uint64_t Checkpoint::total_bytes() const {
  uint64_t n = 0;
  for (const auto& f : files_)
    for (const auto& [name, e] : f->entries()) n += e.nbytes;
  return n;
}

}  // namespace blip2
