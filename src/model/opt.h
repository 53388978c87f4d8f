// OPT (Meta's decoder-only transformer) as BLIP-2 uses it: learned positions with OPT's offset of 2, taken
// from the attention mask so that left padding keeps positions right; pre-norm blocks with LayerNorm and
// biases (post-norm for the OPT-350m layout); ReLU feed-forward; an optional projection between a narrower
// embedding and the hidden width; an lm_head tied to the embedding when the checkpoint has none.
#pragma once
#include <memory>
#include <vector>

#include "generate/decoder.h"
#include "io/checkpoint.h"
#include "model/causal_lm.h"
#include "io/config.h"
#include "ops/ops.h"

namespace blip2 {

class OPTModel final : public CausalLM {
 public:
  OPTModel(Checkpoint& ckpt, const OPTConfig& cfg);
  const OPTConfig& config() const { return cfg_; }
  bool tied_lm_head() const { return tied_; }

  // Embedding rows for ids (word_embed_proj_dim wide, not scaled); out is on the model's device.
  void embed(const int32_t* ids, int64_t n, float* out) const override;
  Device device() const override { return embed_tokens_.device; }
  int64_t vocab_size() const override { return cfg_.vocab_size; }
  int64_t embed_width() const override { return cfg_.word_embed_proj_dim; }

 private:
  struct Norm { Weight w, b; };
  struct Layer {
    Norm attn_ln, ffn_ln;
    Weight q, q_b, k, k_b, v, v_b, o, o_b, fc1, fc1_b, fc2, fc2_b;
  };

  // Runs `n` new positions through the stack: x [n, hidden] (embeddings + positions, already projected),
  // where rows seq_start[s] .. seq_start[s+1]-1 extend cache sequence s (its new positions' mask in
  // `mask`). Leaves the final hidden states (after the final norm and project_out) in x.
  void forward(Tensor& x, const std::vector<int64_t>& seq_start, const uint8_t* mask, Cache& cache) const;
  // embed(ids) or inputs_embeds, projected in when narrower, plus position embeddings: [n, hidden].
  Tensor input(const Tensor& embeds, const std::vector<int64_t>& positions) const;
  // lm_head over final hidden states [.., wd] -> logits [.., vocab].
  Tensor head(const Tensor& h) const override;
  // Positions from the mask (cumsum − 1, OPT's offset added in input); hidden states [B*T, wd].
  Tensor prefill(const Tensor& x, const std::vector<uint8_t>& mask, Cache& cache) const override;
  Tensor extend(const Tensor& e, Cache& cache) const override;

  OPTConfig cfg_;
  Weight embed_tokens_, embed_positions_, project_in_, project_out_, lm_head_;
  Norm final_ln_;
  std::vector<Layer> layers_;
  bool tied_ = false;
};

}  // namespace blip2
