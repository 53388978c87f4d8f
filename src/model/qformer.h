// The Q-Former (Blip2QFormerModel), query-only path: learned queries, BERT-style post-norm layers with
// self-attention, cross-attention to the image tokens every `cross_attention_frequency` layers, and the
// query feed-forward. Followed in BLIP-2 by the language projection, which Blip2Model owns.
#pragma once
#include <vector>

#include "io/checkpoint.h"
#include "io/config.h"

namespace blip2 {

class QFormer {
 public:
  QFormer(Checkpoint& ckpt, const QFormerConfig& cfg, int num_query_tokens);
  // image_embeds [B, T_img, encoder_hidden] -> query outputs [B, num_query_tokens, hidden]
  Tensor forward(const Tensor& image_embeds) const;

 private:
  // One multi-head attention with its output dense + residual LayerNorm (BERT's "attention" module).
  struct Attention {
    Weight q_w, q_b, k_w, k_b, v_w, v_b, out_w, out_b, ln_w, ln_b;
  };
  struct Layer {
    Attention self_attn;
    bool has_cross = false;
    Attention cross_attn;
    Weight fc1_w, fc1_b, fc2_w, fc2_b, ln_w, ln_b;
  };
  static Attention load_attention(Checkpoint& ck, const std::string& prefix, int64_t d, int64_t kv_in);
  // h <- LayerNorm(dense(MHA(h, source)) + h) for each batch item; source rows per item: src_len.
  void attend(const Attention& a, Tensor& h, const Tensor& source, int64_t src_len) const;

  QFormerConfig cfg_;
  int num_queries_;
  Weight query_tokens_, ln_w_, ln_b_;
  std::vector<Layer> layers_;
};

}  // namespace blip2
