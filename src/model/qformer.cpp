#include "model/qformer.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "ops/ops.h"

namespace blip2 {

QFormer::Attention QFormer::load_attention(Checkpoint& ck, const std::string& p, int64_t d, int64_t kv_in) {
  Attention a;
  a.q_w = ck.take(p + "attention.query.weight", {d, d});
  a.q_b = ck.take(p + "attention.query.bias", {d});
  a.k_w = ck.take(p + "attention.key.weight", {d, kv_in});
  a.k_b = ck.take(p + "attention.key.bias", {d});
  a.v_w = ck.take(p + "attention.value.weight", {d, kv_in});
  a.v_b = ck.take(p + "attention.value.bias", {d});
  a.out_w = ck.take(p + "output.dense.weight", {d, d});
  a.out_b = ck.take(p + "output.dense.bias", {d});
  a.ln_w = ck.take(p + "output.LayerNorm.weight", {d});
  a.ln_b = ck.take(p + "output.LayerNorm.bias", {d});
  return a;
}

QFormer::FeedForward QFormer::load_ffn(Checkpoint& ck, const std::string& l, const std::string& inter,
                                       const std::string& out, int64_t d, int64_t f) {
  FeedForward F;
  F.fc1_w = ck.take(l + inter + ".dense.weight", {f, d});
  F.fc1_b = ck.take(l + inter + ".dense.bias", {f});
  F.fc2_w = ck.take(l + out + ".dense.weight", {d, f});
  F.fc2_b = ck.take(l + out + ".dense.bias", {d});
  F.ln_w = ck.take(l + out + ".LayerNorm.weight", {d});
  F.ln_b = ck.take(l + out + ".LayerNorm.bias", {d});
  return F;
}

QFormer::QFormer(Checkpoint& ck, const QFormerConfig& cfg, int num_query_tokens, const QFormerNames& names)
    : cfg_(cfg), num_queries_(num_query_tokens) {
  const int64_t d = cfg.hidden_size, f = cfg.intermediate_size;
  query_tokens_ = ck.take("query_tokens", {1, num_query_tokens, d});
  ln_w_ = ck.take(names.layernorm + "weight", {d});
  ln_b_ = ck.take(names.layernorm + "bias", {d});
  const bool text = !names.embeddings.empty();
  if (text) {
    word_emb_ = ck.take(names.embeddings + "word_embeddings.weight", {cfg.vocab_size, d});
    pos_emb_ = ck.take(names.embeddings + "position_embeddings.weight", {cfg.max_position_embeddings, d});
  }
  for (int i = 0; i < cfg.num_layers; ++i) {
    const std::string l = "qformer.encoder.layer." + std::to_string(i) + ".";
    Layer L;
    L.self_attn = load_attention(ck, l + "attention.", d, d);
    L.has_cross = i % cfg.cross_attention_frequency == 0;
    if (L.has_cross) L.cross_attn = load_attention(ck, l + "crossattention.", d, cfg.encoder_hidden_size);
    L.query_ffn = load_ffn(ck, l, "intermediate_query", "output_query", d, f);
    if (text) L.text_ffn = load_ffn(ck, l, "intermediate", "output", d, f);
    layers_.push_back(std::move(L));
  }
}

void QFormer::attend(const Attention& a, Tensor& h, const Tensor& source, int64_t src_len,
                     const uint8_t* key_mask) const {
  const int64_t B = h.dim(0), Q = h.dim(1), d = cfg_.hidden_size;
  const int heads = cfg_.num_heads, hd = static_cast<int>(d / heads);
  const Tensor q = ops::linear(h, a.q_w, a.q_b);
  const Tensor k = ops::linear(source, a.k_w, a.k_b);
  const Tensor v = ops::linear(source, a.v_w, a.v_b);
  Tensor ctx({B, Q, d}, h.device);
  for (int64_t b = 0; b < B; ++b)
    ops::attention({.device = h.device, .q = q.data_ptr() + b * Q * d, .ldq = d, .tq = Q,
                    .k = k.data_ptr() + b * src_len * d, .ldk = d, .v = v.data_ptr() + b * src_len * d, .ldv = d, .tk = src_len, .heads = heads, .head_dim = hd,
                    .scale = 1.0f / std::sqrt(static_cast<float>(hd)),
                    .key_mask = key_mask ? key_mask + b * src_len : nullptr, .out = ctx.data_ptr() + b * Q * d,
                    .ldo = d});
  Tensor out = ops::linear(ctx, a.out_w, a.out_b);
  ops::add(out, h);
  ops::layer_norm(out, a.ln_w, a.ln_b, cfg_.layer_norm_eps);
  h = std::move(out);
}

void QFormer::feed_forward(const FeedForward& F, Tensor& h) const {
  Tensor f = ops::linear(h, F.fc1_w, F.fc1_b);
  ops::activate(f, cfg_.act);
  Tensor out = ops::linear(f, F.fc2_w, F.fc2_b);
  ops::add(out, h);
  ops::layer_norm(out, F.ln_w, F.ln_b, cfg_.layer_norm_eps);
  h = std::move(out);
}

Tensor QFormer::embed_text(const TokenBatch& text, Device device) const {
  if (!has_text_input())
    fail(ErrorKind::Usage, "this checkpoint's Q-Former has no text input (no word/position embeddings)");
  const int64_t B = text.batch, L = text.length, d = cfg_.hidden_size;
  if (B < 1 || L < 1 || text.ids.size() != static_cast<size_t>(B * L) || text.mask.size() != text.ids.size())
    fail(ErrorKind::Internal, "Q-Former text: " + std::to_string(text.ids.size()) + " ids for " + std::to_string(B) +
                                  " texts of " + std::to_string(L) + " tokens");
  if (L > cfg_.max_position_embeddings)
    fail(ErrorKind::Input, "text is too long: " + std::to_string(L) + " tokens, the Q-Former takes at most " +
                               std::to_string(cfg_.max_position_embeddings));
  Tensor x({B, L, d}, device);
  ops::embedding(word_emb_, text.ids.data(), B * L, x.data_ptr());
  std::vector<int32_t> positions(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) positions[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  Tensor pos({L, d}, device);
  ops::embedding(pos_emb_, positions.data(), L, pos.data_ptr());
  ops::add_broadcast(x, pos);
  return x;
}

Tensor QFormer::run(Tensor h, int64_t Q, const std::vector<uint8_t>& mask, const Tensor* image_embeds) const {
  const int64_t B = h.dim(0), T = h.dim(1), L = T - Q, d = cfg_.hidden_size;
  const Buffer mask_d = mask.empty() ? Buffer() : Buffer::copy_of(mask.data(), mask.size(), h.device);
  const auto* m = static_cast<const uint8_t*>(mask_d.data());
  ops::layer_norm(h, ln_w_, ln_b_, cfg_.layer_norm_eps);
  for (const Layer& layer : layers_) {
    attend(layer.self_attn, h, h, T, m);
    if (L == 0) {  // queries only: BLIP-2's path, unchanged
      if (layer.has_cross) attend(layer.cross_attn, h, *image_embeds, image_embeds->dim(1), nullptr);
      feed_forward(layer.query_ffn, h);
    } else if (Q == 0) {  // text only: no cross-attention
      feed_forward(layer.text_ffn, h);
    } else {  // the query rows and the text rows part ways until the next self-attention
      Tensor hq({B, Q, d}, h.device), ht({B, L, d}, h.device);
      for (int64_t b = 0; b < B; ++b) {
        ops::copy_rows(h, b * T, hq, b * Q, Q);
        ops::copy_rows(h, b * T + Q, ht, b * L, L);
      }
      if (layer.has_cross) attend(layer.cross_attn, hq, *image_embeds, image_embeds->dim(1), nullptr);
      feed_forward(layer.query_ffn, hq);
      feed_forward(layer.text_ffn, ht);
      for (int64_t b = 0; b < B; ++b) {
        ops::copy_rows(hq, b * Q, h, b * T, Q);
        ops::copy_rows(ht, b * L, h, b * T + Q, L);
      }
    }
  }
  return h;
}

Tensor QFormer::forward(const Tensor& image_embeds) const {
  const int64_t B = image_embeds.dim(0), d = cfg_.hidden_size;
  Tensor h({B, num_queries_, d}, image_embeds.device);  // zeros, plus the query tokens in each item
  ops::add_broadcast(h, ops::weight_tensor(query_tokens_));
  return run(std::move(h), num_queries_, {}, &image_embeds);
}

Tensor QFormer::forward(const Tensor& image_embeds, const TokenBatch& text) const {
  const int64_t B = image_embeds.dim(0), Q = num_queries_, L = text.length, T = Q + L, d = cfg_.hidden_size;
  if (text.batch != B)
    fail(ErrorKind::Usage, "the Q-Former takes one text per image: " + std::to_string(B) + " images, " +
                               std::to_string(text.batch) + " texts");
  const Tensor xt = embed_text(text, image_embeds.device);
  const Tensor queries = ops::weight_tensor(query_tokens_);
  Tensor h({B, T, d}, image_embeds.device);
  std::vector<uint8_t> mask(static_cast<size_t>(B * T), 1);
  for (int64_t b = 0; b < B; ++b) {
    ops::copy_rows(queries, 0, h, b * T, Q);
    ops::copy_rows(xt, b * L, h, b * T + Q, L);
    std::copy(text.mask.begin() + b * L, text.mask.begin() + (b + 1) * L, mask.begin() + b * T + Q);
  }
  return run(std::move(h), Q, mask, &image_embeds);
}

Tensor QFormer::forward_text(const TokenBatch& text, Device device) const {
  return run(embed_text(text, device), 0, text.mask, nullptr);
}

}  // namespace blip2
