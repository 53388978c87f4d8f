// Flan-T5 (T5 v1.1) encoder-decoder as BLIP-2 uses it: RMS norms, relative position buckets owned by the
// first block of each stack, attention without 1/sqrt(d) scaling, gated (or plain) feed-forward, and an
// lm_head that is separate (Flan-T5) or tied to the embedding with T5's d_model^-0.5 rescale.
#pragma once
#include <memory>
#include <vector>

#include "generate/decoder.h"
#include "io/checkpoint.h"
#include "io/config.h"

namespace blip2 {

class T5Model {
 public:
  T5Model(Checkpoint& ckpt, const T5Config& cfg);
  const T5Config& config() const { return cfg_; }
  bool tied_lm_head() const { return tied_; }

  // Embedding rows for ids (no scaling, as T5 does); out is on the model's device.
  void embed(const int32_t* ids, int64_t n, float* out) const;
  Device device() const { return shared_.device; }
  // Encoder over inputs_embeds x [B, T, d] with mask [B*T] (1 = real token) -> last_hidden_state.
  Tensor encode(Tensor x, const std::vector<uint8_t>& mask) const;
  // A decoder over enc_out [B, T, d]; each batch item decoded on `expand` rows (beams) side by side.
  std::unique_ptr<Decoder> start_decoder(const Tensor& enc_out, const std::vector<uint8_t>& enc_mask,
                                         int expand = 1) const;

 private:
  friend class T5Decoder;
  struct Attention { Weight ln, q, k, v, o; };
  struct FeedForward { Weight ln, wi_0, wi_1, wo; };  // wi_1 empty when not gated (then wi_0 is "wi")
  struct Block { Attention self_attn, cross_attn; FeedForward ffn; };
  struct Stack { std::vector<Block> blocks; Weight rel_bias, final_ln; };

  Stack load_stack(Checkpoint& ck, const std::string& prefix, int layers, bool decoder);
  void feed_forward(const FeedForward& f, Tensor& h) const;  // h += FFN(RMS(h))
  // Relative position bias [H, tq, tk] for query positions q0..q0+tq-1 and keys 0..tk-1, on the weights' device.
  Tensor position_bias(const Stack& s, bool bidirectional, int64_t q0, int64_t tq, int64_t tk) const;

  T5Config cfg_;
  Weight shared_, lm_head_;
  bool tied_ = false;
  Stack encoder_, decoder_;
};

// T5's relative position bucket (Hugging Face's _relative_position_bucket), rel = key - query.
int t5_relative_bucket(int64_t rel, bool bidirectional, int num_buckets, int max_distance);

}  // namespace blip2
