// LLaMA (Vicuna, as InstructBLIP uses it): pre-norm blocks with RMSNorm and no biases, rotary positions taken
// from the attention mask (so left padding keeps them right), grouped-query attention where the config has
// fewer key/value heads, SwiGLU feed-forward, an lm_head tied to the embedding when the checkpoint has none.
#pragma once
#include <memory>
#include <vector>

#include "io/checkpoint.h"
#include "io/config.h"
#include "model/causal_lm.h"

namespace blip2 {

class LlamaModel final : public CausalLM {
 public:
  LlamaModel(Checkpoint& ckpt, const LlamaConfig& cfg);
  const LlamaConfig& config() const { return cfg_; }
  bool tied_lm_head() const { return tied_; }

  int64_t vocab_size() const override { return cfg_.vocab_size; }
  int64_t embed_width() const override { return cfg_.hidden_size; }
  Device device() const override { return embed_tokens_.device; }
  void embed(const int32_t* ids, int64_t n, float* out) const override;
  Tensor prefill(const Tensor& x, const std::vector<uint8_t>& mask, Cache& cache) const override;
  Tensor extend(const Tensor& e, Cache& cache) const override;
  Tensor head(const Tensor& h) const override;

 private:
  struct Layer {
    Weight attn_norm, ffn_norm, q, k, v, o, gate, up, down;
  };
  // Runs new positions x [n, hidden] at `positions` through the stack, rows seq_start[s] .. seq_start[s+1]-1
  // extending cache sequence s (their mask in `mask`); leaves the final (normed) hidden states in x.
  void forward(Tensor& x, const std::vector<int64_t>& positions, const std::vector<int64_t>& seq_start,
               const uint8_t* mask, Cache& cache) const;

  LlamaConfig cfg_;
  Weight embed_tokens_, final_norm_, lm_head_;
  std::vector<Layer> layers_;
  bool tied_ = false;
};

}  // namespace blip2
