#include "io/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/file.h"

namespace blip2 {

namespace fs = std::filesystem;

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
}

bool Checkpoint::has(const std::string& name) const { return where_.count(name) != 0; }

Weight Checkpoint::take(const std::string& name, const Shape& shape) {
  auto it = where_.find(name);
  if (it == where_.end()) fail(ErrorKind::Model, "checkpoint is missing tensor '" + name + "'");
  Weight w = it->second->weight(name);
  if (w.shape != shape)
    fail(ErrorKind::Model, it->second->path() + ": tensor '" + name + "' has shape " + shape_str(w.shape) +
                               " but the config implies " + shape_str(shape));
  used_.insert(name);
  Weight c = convert_ ? convert_(name, w) : w;
  if (c.data != w.data) it->second->release(name);
  taken_bytes_[name] = c.nbytes();
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
