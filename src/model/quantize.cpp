#include "model/quantize.h"

#include <filesystem>
#include <vector>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/config.h"
#include "io/safetensors.h"

namespace blip2 {

namespace fs = std::filesystem;

namespace {

const std::string kLmHead = "language_model.lm_head.weight";
const std::string kOptEmbedding = "language_model.model.decoder.embed_tokens.weight";

bool is_weights_file(const fs::path& p) {
  return p.extension() == ".safetensors" || p.filename() == "model.safetensors.index.json";
}

// Every file of `from` but its weights, folders included (InstructBLIP's qformer_tokenizer/), following
// symbolic links (a hub cache's snapshot links its files to blobs); never `out`, the folder being written,
// should it lie inside `from`.
void copy_other_files(const fs::path& from, const fs::path& to, const fs::path& out, bool top) {
  for (const auto& entry : fs::directory_iterator(from)) {
    const fs::path target = to / entry.path().filename();
    if (entry.is_directory()) {
      if (fs::equivalent(entry.path(), out)) continue;
      fs::create_directories(target);
      copy_other_files(entry.path(), target, out, false);
    } else if (entry.is_regular_file() && !(top && is_weights_file(entry.path()))) {
      fs::copy_file(entry.path(), target, fs::copy_options::overwrite_existing);
    }
  }
}

}  // namespace

QuantizeSummary quantize_checkpoint(const std::string& model_dir, const std::string& out_dir,
                                    const LoadOptions& options, bool overwrite,
                                    const std::function<void(const QuantizeProgress&)>& progress) {
  if (options.device.kind != Device::CPU)
    fail(ErrorKind::Usage, "quantize runs on the CPU (its files are the same for every device)");
  const Blip2Config cfg = load_config(model_dir);
  QuantizeSummary summary;
  bool all_stored = true;
  for (Tower t : {Tower::Vision, Tower::QFormer, Tower::Language}) {
    const WeightFormat f = tower_format(options, t, cfg.family);
    summary.formats += std::string(summary.formats.empty() ? "" : ", ") + tower_name(t) + " " + weight_format_name(f);
    all_stored = all_stored && f == WeightFormat::AsStored;
  }
  if (all_stored)
    fail(ErrorKind::Usage, "quantize: choose the format with --weights int8 or int4 (or per tower: --vision-weights, "
                           "--qformer-weights, --lm-weights)");
  if (fs::exists(out_dir) && !fs::is_directory(out_dir))
    fail(ErrorKind::Usage, out_dir + ": exists and is not a directory");
  if (fs::exists(out_dir) && !fs::is_empty(out_dir) && !overwrite)
    fail(ErrorKind::Usage, out_dir + ": not empty (use --force to write into it)");
  if (fs::exists(out_dir) && fs::equivalent(out_dir, model_dir))
    fail(ErrorKind::Usage, out_dir + ": is the source directory");

  // The load path itself: open_checkpoint sets the threads and the conversion every take() applies.
  const auto ck = open_checkpoint(model_dir, options, cfg.family, [&](const Checkpoint::LoadProgress& p) {
    if (progress) progress({false, p.bytes_taken, p.bytes_total});
  });
  if (ck->prequantized())
    fail(ErrorKind::Usage, model_dir + ": is pre-quantized already; quantize the float checkpoint it came from");
  summary.source_bytes = ck->total_bytes();

  std::vector<std::pair<std::string, Weight>> weights;
  for (const auto& [name, shape] : ck->stored_shapes()) {
    const Weight w = ck->take(name, shape);
    // OPT's tied embedding, quantized as the head: written as the head (lm_head) and, for the lookups, the
    // stored float table, which is what a load that converts uses (Checkpoint::take_tied_embedding).
    if (w.quantized() && cfg.family == LanguageFamily::OPT && name == kOptEmbedding) {
      weights.emplace_back(kLmHead, w);
      weights.emplace_back(name, ck->stored(name));
    } else {
      weights.emplace_back(name, w);
    }
  }

  SafetensorsWriter writer;
  // The quantized data first, with 64-byte aligned sizes mostly, then the scales, float columns and the
  // float tensors.
  writer.set_data_alignment(64);
  for (const auto& [name, w] : weights)
    if (w.quantized()) {
      const QuantizedStorage q = quantized_storage(w);
      writer.add_bytes(quantized_tensor_name(name, w), q.data_dtype, q.data_shape, w.data);
    }
  for (const auto& [name, w] : weights) {
    if (w.quantized()) {
      const QuantizedStorage q = quantized_storage(w);
      const std::string stored = quantized_tensor_name(name, w);
      writer.add_bytes(stored + kScalesSuffix, q.scales_dtype, q.scales_shape, w.scales);
      if (w.n_float_columns > 0) {
        writer.add_bytes(stored + kColumnsSuffix, "I32", {w.n_float_columns}, w.float_columns);
        writer.add_bytes(stored + kColumnWeightsSuffix, "F32", {w.rows(), w.n_float_columns}, w.column_weights);
      }
      ++summary.quantized;
    } else {
      writer.add_bytes(name, dtype_name(w.dtype), w.shape, w.data);
    }
  }
  summary.tensors = weights.size();
  writer.set_metadata("blip2.quantized_layout", kQuantizedLayout);
  writer.set_metadata("blip2.formats", summary.formats);
  writer.set_metadata("blip2.int4_group", std::to_string(options.int4_group));

  fs::create_directories(out_dir);
  copy_other_files(model_dir, out_dir, out_dir, true);
  // A sharded source's index would point the loader at shards that are not there.
  fs::remove(fs::path(out_dir) / "model.safetensors.index.json");
  writer.write((fs::path(out_dir) / "model.safetensors").string(), nullptr, [&](uint64_t written, uint64_t total) {
    if (progress) progress({true, written, total});
  });
  summary.file_bytes = writer.file_bytes();
  return summary;
}

}  // namespace blip2
