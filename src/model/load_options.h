// How a model is loaded: the storage format of its linear layers' weights and the thread count. The one
// place that decides which tensors a format applies to is weight_converter() (load_options.cpp).
#pragma once
#include <optional>
#include <string>

#include "core/tensor.h"
#include "io/checkpoint.h"

namespace blip2 {

// Group size of int4 weights when none is given (see docs/ARCHITECTURE.md, "Weight formats", for the
// measured speed/accuracy trade-off of 32, 64 and 128).
constexpr int kDefaultInt4Group = 64;

struct LoadOptions {
  // Format of the linear layers' matrices after loading. AsStored uses the file's bytes in place (no copy);
  // anything else converts each matrix once, as it is taken, from whatever the file holds (F32/F16/BF16).
  WeightFormat weights = WeightFormat::AsStored;
  int int4_group = kDefaultInt4Group;  // 32, 64 or 128 elements per scale along the input dimension
  // Format of the vision encoder's matrices; unset: vision_format() below.
  std::optional<WeightFormat> vision_weights;
  int threads = 0;                     // worker threads for the kernels and OpenBLAS; 0 = all cores
  // Where the model runs: every weight is placed there as it loads, and every stage computes there.
  DeviceSpec device;
};

// True for the tensors a weight format converts: the matrices of linear layers — ViT qkv / projection /
// fc1 / fc2, every Q-Former dense layer, the language projection, T5 q/k/v/o and wi/wi_0/wi_1/wo, OPT
// q/k/v/out_proj, fc1/fc2 and project_in/out, lm_head — and the T5 or OPT embedding when it doubles as the
// (tied) lm_head. Everything else stays as stored: norms, biases, the patch embedding, class / position
// embeddings, query tokens, relative attention bias and an untied embedding (a lookup touches only the
// rows it needs, so the file's pages serve it best).
bool converts_tensor(const std::string& name, const Shape& shape, bool tied_lm_head);

// The vision encoder's format: `vision_weights` when set, else `weights`, except that int4 becomes int8.
// The ViT multiplies all 257 patch rows by each weight, so it is bound by arithmetic, not by weight bytes:
// there the int8 products run faster than int4's (docs/PERFORMANCE.md) and are more accurate, for 0.5 GB
// more on ViT-g (1.0 GB in int8, 0.53 GB in int4).
WeightFormat vision_format(const LoadOptions& options);

// The Checkpoint::Convert hook for `options` (null for AsStored on the CPU: every tensor is used in place).
// With a conversion, the tensors that are not converted are copied as stored (all but an untied embedding),
// so that no file page is needed after loading. On another device every tensor is copied there after its
// conversion. Validates int4_group, and the formats the device has kernels for.
Checkpoint::Convert weight_converter(const LoadOptions& options, bool tied_lm_head);

}  // namespace blip2
