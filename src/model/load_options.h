// How a model is loaded: the storage format of its linear layers' weights (for the whole model or per tower),
// the device and the thread count. The one place that decides which tensors a format applies to is
// weight_converter() (load_options.cpp).
#pragma once
#include <memory>
#include <optional>
#include <string>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "io/config.h"

namespace blip2 {

// Group size of int4 weights when none is given (see docs/ARCHITECTURE.md, "Weight formats", for the
// measured speed/accuracy trade-off of 32, 64 and 128).
constexpr int kDefaultInt4Group = 64;

struct LoadOptions {
  // Format of the linear layers' matrices after loading. AsStored uses the file's bytes in place (no copy);
  // anything else converts each matrix once, as it is taken, from whatever the file holds (F32/F16/BF16).
  WeightFormat weights = WeightFormat::AsStored;
  int int4_group = kDefaultInt4Group;  // 32, 64 or 128 elements per scale along the input dimension
  // Per tower (tower_format() below says what an unset one means): the vision encoder; the Q-Former with the
  // language projection; the language model.
  std::optional<WeightFormat> vision_weights, qformer_weights, lm_weights;
  // A named mix of tower formats, which the per-tower options override: "lavis", the one LAVIS runs the
  // paper's numbers with (ViT in f16, Q-Former in f32, language model in bf16 for T5 and f16 for OPT).
  // Empty: none.
  std::string precision;
  int threads = 0;                     // worker threads for the kernels and OpenBLAS; 0 = all cores
  // Where the model runs: every weight is placed there as it loads, and every stage computes there.
  DeviceSpec device;
  // int8 / int4 language-model products keep the input channels their weights show to be outliers in float
  // (issue 14; weight_converter). false quantizes them like the rest: how tests show what the float columns
  // are for.
  bool float_columns = true;
};

// True for the tensors a weight format converts: the matrices of linear layers — ViT qkv / projection /
// fc1 / fc2, every Q-Former dense layer, the language projection, T5 q/k/v/o and wi/wi_0/wi_1/wo, OPT
// q/k/v/out_proj, fc1/fc2 and project_in/out, lm_head — and the T5 or OPT embedding when it doubles as the
// (tied) lm_head. Everything else stays as stored: norms, biases, the patch embedding, class / position
// embeddings, query tokens, relative attention bias and an untied embedding (a lookup touches only the
// rows it needs, so the file's pages serve it best).
bool converts_tensor(const std::string& name, const Shape& shape, bool tied_lm_head);

// The parts of the model a format can be chosen for, and the part a tensor belongs to: vision_model.* the
// vision encoder, language_model.* the language model, the rest (qformer.*, query_tokens,
// language_projection.*) the Q-Former.
enum class Tower { Vision, QFormer, Language };
const char* tower_name(Tower t);
Tower tower_of(const std::string& tensor_name);

// A tower's format: its own option when set, else the precision preset's, else `weights` — except that the
// vision encoder keeps int8 when `weights` is int4. The ViT multiplies all 257 patch rows by each weight,
// so it is bound by arithmetic, not by weight bytes: there the int8 products run faster than int4's
// (docs/PERFORMANCE.md) and are more accurate, for 0.5 GB more on ViT-g (1.0 GB in int8, 0.53 GB in int4).
// Throws Error(Usage) for an unknown precision.
WeightFormat tower_format(const LoadOptions& options, Tower tower, LanguageFamily family);

// The Checkpoint::Convert hook for `options` (null for AsStored on the CPU: every tensor is used in place).
// With a conversion, the tensors that are not converted are copied as stored (all but an untied embedding),
// so that no file page is needed after loading. On another device every tensor is copied there after its
// conversion. Validates int4_group, and the formats the device has kernels for.
// With `checkpoint` (the one the converter is set on), a language model's int8 / int4 linear layers keep
// the input columns its norms and feed-forward weights show to be outliers in float (issue 14,
// ops::float_columns_for); without, none.
Checkpoint::Convert weight_converter(const LoadOptions& options, LanguageFamily family, bool tied_lm_head,
                                     const Checkpoint* checkpoint = nullptr);

// Sets the thread count (and selects the GPU), then opens the checkpoint with the options' weight
// conversion, so that every tensor the model's parts take arrives in its final format.
std::unique_ptr<Checkpoint> open_checkpoint(const std::string& dir, const LoadOptions& options, LanguageFamily family,
                                            const Checkpoint::Progress& progress);

}  // namespace blip2
