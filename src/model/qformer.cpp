#include "model/qformer.h"

#include <cmath>

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

QFormer::QFormer(Checkpoint& ck, const QFormerConfig& cfg, int num_query_tokens)
    : cfg_(cfg), num_queries_(num_query_tokens) {
  const int64_t d = cfg.hidden_size, f = cfg.intermediate_size;
  query_tokens_ = ck.take("query_tokens", {1, num_query_tokens, d});
  ln_w_ = ck.take("qformer.layernorm.weight", {d});
  ln_b_ = ck.take("qformer.layernorm.bias", {d});
  for (int i = 0; i < cfg.num_layers; ++i) {
    const std::string l = "qformer.encoder.layer." + std::to_string(i) + ".";
    Layer L;
    L.self_attn = load_attention(ck, l + "attention.", d, d);
    L.has_cross = i % cfg.cross_attention_frequency == 0;
    if (L.has_cross) L.cross_attn = load_attention(ck, l + "crossattention.", d, cfg.encoder_hidden_size);
    L.fc1_w = ck.take(l + "intermediate_query.dense.weight", {f, d});
    L.fc1_b = ck.take(l + "intermediate_query.dense.bias", {f});
    L.fc2_w = ck.take(l + "output_query.dense.weight", {d, f});
    L.fc2_b = ck.take(l + "output_query.dense.bias", {d});
    L.ln_w = ck.take(l + "output_query.LayerNorm.weight", {d});
    L.ln_b = ck.take(l + "output_query.LayerNorm.bias", {d});
    layers_.push_back(std::move(L));
  }
}

void QFormer::attend(const Attention& a, Tensor& h, const Tensor& source, int64_t src_len) const {
  const int64_t B = h.dim(0), Q = h.dim(1), d = cfg_.hidden_size;
  const int heads = cfg_.num_heads, hd = static_cast<int>(d / heads);
  const Tensor q = ops::linear(h, a.q_w, a.q_b);
  const Tensor k = ops::linear(source, a.k_w, a.k_b);
  const Tensor v = ops::linear(source, a.v_w, a.v_b);
  Tensor ctx({B, Q, d}, h.device);
  for (int64_t b = 0; b < B; ++b)
    ops::attention({.device = h.device, .q = q.data_ptr() + b * Q * d, .ldq = d, .tq = Q,
                    .k = k.data_ptr() + b * src_len * d, .ldk = d, .v = v.data_ptr() + b * src_len * d, .ldv = d, .tk = src_len, .heads = heads, .head_dim = hd,
                    .scale = 1.0f / std::sqrt(static_cast<float>(hd)), .out = ctx.data_ptr() + b * Q * d,
                    .ldo = d});
  Tensor out = ops::linear(ctx, a.out_w, a.out_b);
  ops::add(out, h);
  ops::layer_norm(out, a.ln_w, a.ln_b, cfg_.layer_norm_eps);
  h = std::move(out);
}

Tensor QFormer::forward(const Tensor& image_embeds) const {
  const int64_t B = image_embeds.dim(0), T = image_embeds.dim(1), d = cfg_.hidden_size;
  Tensor h({B, num_queries_, d}, image_embeds.device);  // zeros, plus the query tokens in each item
  ops::add_broadcast(h, ops::weight_tensor(query_tokens_));
  ops::layer_norm(h, ln_w_, ln_b_, cfg_.layer_norm_eps);
  for (const Layer& L : layers_) {
    attend(L.self_attn, h, h, num_queries_);
    if (L.has_cross) attend(L.cross_attn, h, image_embeds, T);
    Tensor f = ops::linear(h, L.fc1_w, L.fc1_b);
    ops::activate(f, cfg_.act);
    Tensor out = ops::linear(f, L.fc2_w, L.fc2_b);
    ops::add(out, h);
    ops::layer_norm(out, L.ln_w, L.ln_b, cfg_.layer_norm_eps);
    h = std::move(out);
  }
  return h;
}

}  // namespace blip2
