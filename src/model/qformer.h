// The Q-Former (Blip2QFormerModel): BERT-style post-norm layers over learned queries and, where the
// checkpoint has the text embeddings, text tokens.
//   queries only (BLIP-2): LayerNorm(queries), then per layer self-attention, cross-attention to the image
//     tokens every `cross_attention_frequency` layers, the query feed-forward;
//   queries and text (InstructBLIP, image–text matching): [queries ; word + position embeddings of the text]
//     (positions 0..L-1, the queries get none) under ONE LayerNorm; self-attention over all Q + L positions
//     with the text's padding keys masked; cross-attention for the Q query positions only; the feed-forward
//     split by position (queries: intermediate_query/output_query, text: intermediate/output);
//   text alone (retrieval's text side, query_length 0): the text through the same LayerNorm, self-attention
//     with the mask, no cross-attention, every position through the text feed-forward.
// The reference adds −10000 to masked keys' scores; ops::attention skips them instead: the same result in
// float32 (exp(−10000) underflows to 0), as at least the query and [CLS] keys are never masked.
// Followed in BLIP-2 by the language projection, which Blip2Model owns.
#pragma once
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "io/config.h"
#include "text/token_batch.h"

namespace blip2 {

// Where a checkpoint keeps the tensors that differ between the variants (the layers are named alike).
struct QFormerNames {
  std::string embeddings;  // prefix of word_embeddings / position_embeddings; "" when there is no text input
  std::string layernorm;   // prefix of the LayerNorm over the input
  // BLIP-2 captioning: queries only, `qformer.layernorm`.
  static QFormerNames blip2() { return {"", "qformer.layernorm."}; }
  // Blip2ForImageTextRetrieval: top-level `embeddings.*`, and it keeps `qformer.layernorm`.
  static QFormerNames retrieval() { return {"embeddings.", "qformer.layernorm."}; }
  // InstructBLIP: `qformer.embeddings.*`, its LayerNorm `qformer.embeddings.layernorm` (no qformer.layernorm).
  static QFormerNames instructblip() { return {"qformer.embeddings.", "qformer.embeddings.layernorm."}; }
};

class QFormer {
 public:
  // Takes the query tokens, the input LayerNorm and every layer; with names.embeddings also the word and
  // position embeddings ([qformer vocab_size, d], [max_position_embeddings, d]) and each layer's text
  // feed-forward (intermediate.dense, output.dense, output.LayerNorm).
  QFormer(Checkpoint& ckpt, const QFormerConfig& cfg, int num_query_tokens,
          const QFormerNames& names = QFormerNames::blip2());

  // image_embeds [B, T_img, encoder_hidden] -> query outputs [B, num_query_tokens, hidden]
  Tensor forward(const Tensor& image_embeds) const;
  // Queries and text together, item b of the image with text item b -> [B, Q + L, hidden] (the queries'
  // outputs first; rows past a text's length are padding). Throws Error(Usage) without text embeddings,
  // Error(Input) for ids outside the vocabulary or texts longer than max_text_tokens().
  Tensor forward(const Tensor& image_embeds, const TokenBatch& text) const;
  // The text alone -> [B, L, hidden] (the same errors).
  Tensor forward_text(const TokenBatch& text, Device device) const;

  bool has_text_input() const { return !word_emb_.empty(); }
  int max_text_tokens() const { return cfg_.max_position_embeddings; }
  int num_queries() const { return num_queries_; }

 private:
  // One multi-head attention with its output dense + residual LayerNorm (BERT's "attention" module).
  struct Attention {
    Weight q_w, q_b, k_w, k_b, v_w, v_b, out_w, out_b, ln_w, ln_b;
  };
  struct FeedForward {
    Weight fc1_w, fc1_b, fc2_w, fc2_b, ln_w, ln_b;
  };
  struct Layer {
    Attention self_attn;
    bool has_cross = false;
    Attention cross_attn;
    FeedForward query_ffn;  // intermediate_query / output_query
    FeedForward text_ffn;   // intermediate / output (checkpoints with text input)
  };
  static Attention load_attention(Checkpoint& ck, const std::string& prefix, int64_t d, int64_t kv_in);
  static FeedForward load_ffn(Checkpoint& ck, const std::string& l, const std::string& inter, const std::string& out,
                              int64_t d, int64_t f);
  // h <- LayerNorm(dense(MHA(h, source)) + h) for each batch item; source rows per item: src_len;
  // key_mask: [B, src_len] on h's device, or null.
  void attend(const Attention& a, Tensor& h, const Tensor& source, int64_t src_len, const uint8_t* key_mask) const;
  // h <- LayerNorm(fc2(act(fc1(h))) + h).
  void feed_forward(const FeedForward& f, Tensor& h) const;
  // [B, L, d] word + position embeddings of the text, after checking it.
  Tensor embed_text(const TokenBatch& text, Device device) const;
  // The layers over h [B, Q + L, d] (Q of num_queries_ or 0): LayerNorm, then each layer as above. mask:
  // [B, Q + L] host bytes, or empty for no padding.
  Tensor run(Tensor h, int64_t Q, const std::vector<uint8_t>& mask, const Tensor* image_embeds) const;

  QFormerConfig cfg_;
  int num_queries_;
  Weight query_tokens_, ln_w_, ln_b_, word_emb_, pos_emb_;
  std::vector<Layer> layers_;
};

}  // namespace blip2
