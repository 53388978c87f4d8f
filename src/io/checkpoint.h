// A checkpoint directory's weights: `model.safetensors`, or `model.safetensors.index.json` with its shards,
// all memory-mapped. Models take tensors by name with the shape the config implies; every take is checked
// (present, floating point, right shape), and after loading `check_all_used` rejects tensors nobody took.
//
// Pre-quantized checkpoints (`blip2 quantize`, model/quantize.h) hold a linear layer's matrix NAME in the
// engine's own int8 or int4 layout (DType::I8 / DType::I4 in core/tensor.h), used in place from the mapping:
//   NAME.int8      I8 [rows, ld]       and  NAME.int8_scales      F32 [rows]
//   NAME.int4_gG   U8 [rows, ld / 2]   and  NAME.int4_gG_scales   F16 [rows, ld / G]     (G = 32, 64, 128)
// and, for a weight with float columns (Weight::float_columns), beside either (Q = NAME.int8 or NAME.int4_gG):
//   Q_columns      I32 [n]  ascending input columns   and  Q_column_weights  F32 [rows, n]
// in files whose metadata has blip2.quantized_layout = kQuantizedLayout. take(NAME) finds either form.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace blip2 {

// The version of the quantized layouts a pre-quantized file holds; a file with another is refused.
// 2: float columns (a file of layout 1 has none where converting at load now keeps them).
constexpr const char* kQuantizedLayout = "2";
// A quantized tensor's scales, float column indices and float column weights are its data's name + these.
constexpr const char* kScalesSuffix = "_scales";
constexpr const char* kColumnsSuffix = "_columns";
constexpr const char* kColumnWeightsSuffix = "_column_weights";
// The file's name for a quantized weight `w` (I8 or I4) of tensor `name`: NAME.int8 or NAME.int4_gG; its
// scales are that name + "_scales".
std::string quantized_tensor_name(const std::string& name, const Weight& w);
// How a quantized weight (I8 or I4, its shape, ld and group set) is stored: the safetensors dtype and shape of
// its data and of its scales, as in the table above.
struct QuantizedStorage {
  std::string data_dtype, scales_dtype;
  Shape data_shape, scales_shape;
};
QuantizedStorage quantized_storage(const Weight& w);

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

  bool has(const std::string& name) const;  // stored as is, or pre-quantized
  // The tensors stored as is, with their shapes (pre-quantized ones are not among them).
  std::map<std::string, Shape> stored_shapes() const;
  bool prequantized() const { return !quantized_.empty(); }
  // The tensor `name` as stored, viewing the mapping, without taking it (a conversion reads other tensors
  // through this: the norms in front of a linear layer); empty when absent or pre-quantized.
  Weight stored(const std::string& name) const;
  // Drops the pages of tensor `name` from this process's memory (they stay in the page cache and are read
  // again on the next access): after reading a tensor through stored() that the model does not use in place.
  void release_pages(const std::string& name) const;
  // The tensor `name`, which must have exactly `shape`. Throws Error(Model) naming tensor and file.
  Weight take(const std::string& name, const Shape& shape);
  // The first of `names` that exists (tied aliases such as shared / encoder.embed_tokens); the others are
  // marked used too.
  Weight take_any(const std::vector<std::string>& names, const Shape& shape);
  // An embedding `name` that is also the LM head (OPT stores no lm_head; `head_name` is what it would be
  // called): the head, converted like any linear layer, and the lookup table. The table is the stored tensor,
  // used in place (a lookup reads only the rows it needs), when the head was quantized on the host and the
  // stored tensor is float, so that input embeddings stay exact as in transformers, which never quantizes
  // embeddings; otherwise it is the head itself. taken_bytes / taken_dtypes then list the head as
  // `head_name` and the table as `name`, as a pre-quantized copy stores them (model/quantize.h).
  struct TiedEmbedding {
    Weight table, head;
  };
  TiedEmbedding take_tied_embedding(const std::string& name, const std::string& head_name, const Shape& shape);
  // Marks tensors that are allowed to be present but are not used (e.g. HF's ignored keys).
  void ignore(const std::string& name);
  // Throws Error(Model) listing tensors present in the files that no model part took.
  void check_all_used() const;

  // Bytes of every tensor take() handed out, in its final (converted) format, scales included: what a
  // product over it reads (benchmarks count a decode step's traffic from this).
  const std::map<std::string, size_t>& taken_bytes() const { return taken_bytes_; }
  // The format each tensor take() handed out is held in (pre-quantized or converted ones: I8 / I4).
  const std::map<std::string, DType>& taken_dtypes() const { return taken_dtypes_; }

  size_t tensor_count() const { return where_.size(); }
  uint64_t total_bytes() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
  // Pre-quantized tensors: NAME -> the file's name of its data (NAME.int8 / NAME.int4_gG).
  std::map<std::string, std::string> quantized_;
  // A pre-quantized tensor as a Weight viewing the mapping, every part of it checked against `shape`.
  Weight quantized_weight(const std::string& name, const std::string& data_name, const Shape& shape) const;
  std::set<std::string> used_;
  std::map<std::string, size_t> taken_bytes_;
  std::map<std::string, DType> taken_dtypes_;
  Convert convert_;
  Progress progress_;
  LoadProgress state_;
};

}  // namespace blip2
