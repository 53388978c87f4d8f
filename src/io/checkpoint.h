// A checkpoint directory's weights: `model.safetensors`, or `model.safetensors.index.json` with its shards,
// all memory-mapped. Models take tensors by name with the shape the config implies; every take is checked
// (present, floating point, right shape), and after loading `check_all_used` rejects tensors nobody took.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace blip2 {

class Checkpoint {
 public:
  // Where loading stands: shards are opened (mapped) first, then the model parts take their tensors, which
  // is where the work is when weights are converted at load (a first touch of the file's pages otherwise).
  struct LoadProgress {
    int shards_opened = 0, shards = 0;
    uint64_t bytes_taken = 0, bytes_total = 0;  // stored bytes of the tensors taken so far / of all tensors
  };
  // Called after each shard is opened and after each tensor is taken.
  using Progress = std::function<void(const LoadProgress&)>;
  explicit Checkpoint(const std::string& model_dir, const Progress& progress = nullptr);

  // A load-time conversion applied by take() to every tensor it hands out: given the tensor's name and the
  // weight as stored (checked), returns the weight to use — itself, or a converted copy in buffers it owns.
  // When the result no longer views the file, the tensor's file pages are dropped from memory right away
  // (SafetensorsFile::release), so that converting a model needs its converted size, not that plus the file.
  using Convert = std::function<Weight(const std::string& name, const Weight& stored)>;
  void set_convert(Convert convert) { convert_ = std::move(convert); }

  bool has(const std::string& name) const;
  // The tensor `name`, which must have exactly `shape`. Throws Error(Model) naming tensor and file.
  Weight take(const std::string& name, const Shape& shape);
  // The first of `names` that exists (tied aliases such as shared / encoder.embed_tokens); the others are
  // marked used too.
  Weight take_any(const std::vector<std::string>& names, const Shape& shape);
  // Marks tensors that are allowed to be present but are not used (e.g. HF's ignored keys).
  void ignore(const std::string& name);
  // Throws Error(Model) listing tensors present in the files that no model part took.
  void check_all_used() const;

  // Bytes of every tensor take() handed out, in its final (converted) format, scales included: what a
  // product over it reads (benchmarks count a decode step's traffic from this).
  const std::map<std::string, size_t>& taken_bytes() const { return taken_bytes_; }

  size_t tensor_count() const { return where_.size(); }
  uint64_t total_bytes() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
  std::set<std::string> used_;
  std::map<std::string, size_t> taken_bytes_;
  Convert convert_;
  Progress progress_;
  LoadProgress state_;
};

}  // namespace blip2
