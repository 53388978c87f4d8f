// EVA ViT-g as Blip2VisionModel: patch conv + CLS + learned positions, pre-norm blocks with a fused qkv
// projection, post-layernorm. All sizes come from VisionConfig.
#pragma once
#include <vector>

#include "io/checkpoint.h"
#include "io/config.h"

namespace blip2 {

class VisionModel {
 public:
  VisionModel(Checkpoint& ckpt, const VisionConfig& cfg);
  // pixels [B, 3, S, S] (on any device; copied to the weights' if elsewhere) -> last_hidden_state
  // [B, 1 + (S/P)², hidden] (after post_layernorm), on the weights' device
  Tensor forward(const Tensor& pixels) const;

 private:
  // forward for pixels already on the weights' device.
  Tensor encode(const Tensor& px) const;

  struct Layer {
    Weight ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b;
  };
  VisionConfig cfg_;
  Weight patch_w_, patch_b_, class_emb_, pos_emb_, post_w_, post_b_;
  std::vector<Layer> layers_;
};

}  // namespace blip2
