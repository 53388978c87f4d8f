// `blip2 quantize`: a checkpoint directory whose weights are already in the formats they run in, so that
// loading it maps them (no reading and converting the float checkpoint at every start).
//
// The weights go through the very conversion a load with the same options applies (weight_converter), and
// are written byte for byte as the engine holds them (io/checkpoint.h names the layout): a model loaded from
// the result computes exactly what the original loaded with those options computes.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

#include "model/load_options.h"

namespace blip2 {

struct QuantizeProgress {
  bool writing = false;              // false: converting the tensors; true: writing the file
  uint64_t done = 0, total = 0;      // bytes of the source taken / of the output written so far, and of all
};

struct QuantizeSummary {
  size_t tensors = 0, quantized = 0;  // tensors written, and those in int8 or int4
  uint64_t source_bytes = 0, file_bytes = 0;
  std::string formats;                // the towers' formats, e.g. "vision int8, qformer int4, language int4"
};

// Writes `out_dir` (created; it must be empty unless `overwrite`): model.safetensors with every tensor of
// `model_dir` in the format `options` gives it, and a copy of every other file there (config, tokenizer
// files, the InstructBLIP qformer_tokenizer/ folder). Throws Error(Usage) for CPU-less options, a source
// that is pre-quantized already, or an unwritable `out_dir`; Error(Model) for a bad source checkpoint.
QuantizeSummary quantize_checkpoint(const std::string& model_dir, const std::string& out_dir,
                                    const LoadOptions& options, bool overwrite,
                                    const std::function<void(const QuantizeProgress&)>& progress = nullptr);

}  // namespace blip2
