#include "model/llama.h"

#include <cmath>

#include "core/error.h"
#include "ops/ops.h"

namespace blip2 {

namespace {
const std::string kPrefix = "language_model.model.";
}  // namespace

LlamaModel::LlamaModel(Checkpoint& ck, const LlamaConfig& cfg) : cfg_(cfg) {
  const int64_t V = cfg.vocab_size, d = cfg.hidden_size, F = cfg.intermediate_size,
                kv = static_cast<int64_t>(cfg.num_kv_heads) * cfg.head_dim();
  embed_tokens_ = ck.take(kPrefix + "embed_tokens.weight", {V, d});
  final_norm_ = ck.take(kPrefix + "norm.weight", {d});
  tied_ = !ck.has("language_model.lm_head.weight");
  lm_head_ = tied_ ? embed_tokens_ : ck.take("language_model.lm_head.weight", {V, d});
  for (int i = 0; i < cfg.num_layers; ++i) {
    const std::string p = kPrefix + "layers." + std::to_string(i) + ".";
    Layer L;
    L.attn_norm = ck.take(p + "input_layernorm.weight", {d});
    L.ffn_norm = ck.take(p + "post_attention_layernorm.weight", {d});
    L.q = ck.take(p + "self_attn.q_proj.weight", {d, d});
    L.k = ck.take(p + "self_attn.k_proj.weight", {kv, d});
    L.v = ck.take(p + "self_attn.v_proj.weight", {kv, d});
    L.o = ck.take(p + "self_attn.o_proj.weight", {d, d});
    L.gate = ck.take(p + "mlp.gate_proj.weight", {F, d});
    L.up = ck.take(p + "mlp.up_proj.weight", {F, d});
    L.down = ck.take(p + "mlp.down_proj.weight", {d, F});
    layers_.push_back(std::move(L));
  }
}

void LlamaModel::embed(const int32_t* ids, int64_t n, float* out) const { ops::embedding(embed_tokens_, ids, n, out); }

Tensor LlamaModel::head(const Tensor& h) const { return ops::linear(h, lm_head_); }

void LlamaModel::forward(Tensor& x, const std::vector<int64_t>& positions, const std::vector<int64_t>& seq_start,
                         const uint8_t* mask, Cache& cache) const {
  const int64_t d = cfg_.hidden_size, hd = cfg_.head_dim(), H = cfg_.num_heads, KH = cfg_.num_kv_heads,
                kv = KH * hd, group = H / KH;
  const size_t S = seq_start.size() - 1;
  const float eps = cfg_.rms_norm_eps, scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const Device dev = x.device;
  // each sequence's mask on the device, new positions included
  const std::vector<Buffer> seq_mask = cache.append_mask(seq_start, mask, dev);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& L = layers_[l];
    // self-attention: causal over each sequence's cache, padding excluded; keys cached after rotation
    Tensor n = x;
    ops::rms_norm(n, L.attn_norm, eps);
    Tensor q = ops::linear(n, L.q), k = ops::linear(n, L.k);
    const Tensor v = ops::linear(n, L.v);
    ops::rotary(q, H, hd, positions, cfg_.rope_theta);
    ops::rotary(k, KH, hd, positions, cfg_.rope_theta);
    Tensor ctx({x.rows(), d}, dev);
    std::vector<ops::AttentionArgs> problems;  // one per sequence (per query head with grouped keys), one call
    for (size_t s = 0; s < S; ++s) {
      auto& seq = cache.seqs[s];
      const int64_t r0 = seq_start[s], tq = seq_start[s + 1] - r0;
      seq.k[l].append(k, r0, tq);
      seq.v[l].append(v, r0, tq);
      const int64_t tk = static_cast<int64_t>(seq.mask.size());
      ops::AttentionArgs a{.device = dev, .q = q.data_ptr() + r0 * d, .ldq = d, .tq = tq, .k = seq.k[l].data(),
                           .ldk = kv, .v = seq.v[l].data(), .ldv = kv, .tk = tk, .heads = static_cast<int>(H),
                           .head_dim = static_cast<int>(hd), .scale = scale,
                           .key_mask = static_cast<const uint8_t*>(seq_mask[s].data()),
                           .out = ctx.data_ptr() + r0 * d, .ldo = d, .causal = true};
      if (group == 1) {
        problems.push_back(a);
        continue;
      }
      // Grouped-query attention: query heads h·group … h·group + group − 1 read key/value head h. The routine
      // pairs query head i with key head i, and a group's key/value "heads" would be its one head repeated
      // (head stride 0 is not expressible): one problem per query head, all in the layer's one call.
      for (int64_t h = 0; h < H; ++h) {
        ops::AttentionArgs g = a;
        g.heads = 1;
        g.q += h * hd;
        g.k += (h / group) * hd;
        g.v += (h / group) * hd;
        g.out += h * hd;
        problems.push_back(g);
      }
    }
    ops::attention(problems);
    ops::add(x, ops::linear(ctx, L.o));

    // SwiGLU feed-forward: down(silu(gate(x)) · up(x))
    n = x;
    ops::rms_norm(n, L.ffn_norm, eps);
    Tensor g = ops::linear(n, L.gate);
    ops::activate(g, Activation::Silu);
    ops::mul(g, ops::linear(n, L.up));
    ops::add(x, ops::linear(g, L.down));
  }
  ops::rms_norm(x, final_norm_, eps);
}

Tensor LlamaModel::prefill(const Tensor& x, const std::vector<uint8_t>& mask, Cache& cache) const {
  const int64_t B = x.dim(0), T = x.dim(1), d = cfg_.hidden_size;
  if (x.shape != Shape{B, T, d} || static_cast<int64_t>(mask.size()) != B * T)
    fail(ErrorKind::Internal, "LLaMA input has shape " + shape_str(x.shape) + " with " + std::to_string(mask.size()) +
                                  " mask entries");
  // Positions from the mask as LlamaForCausalLM.prepare_inputs_for_generation makes them: cumsum − 1, and 1
  // at padding.
  const RowPositions rp = prefill_positions(mask, B, T, 1);
  Tensor h = x;
  h.shape = {B * T, d};
  const int64_t kv = static_cast<int64_t>(cfg_.num_kv_heads) * cfg_.head_dim();
  cache.reset(B, layers_.size(), kv, x.device);
  forward(h, rp.pos, rp.seq_start, mask.data(), cache);
  return h;
}

Tensor LlamaModel::extend(const Tensor& e, Cache& cache) const {
  const RowPositions rp = step_positions(cache);
  Tensor h = e;
  const std::vector<uint8_t> ones(cache.seqs.size(), 1);
  forward(h, rp.pos, rp.seq_start, ones.data(), cache);
  return h;
}

}  // namespace blip2
