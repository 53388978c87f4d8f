#include "model/opt.h"

#include <cmath>

#include "core/error.h"
#include "ops/ops.h"

namespace blip2 {

namespace {

constexpr int64_t kPositionOffset = 2;  // OPTLearnedPositionalEmbedding: rows 0 and 1 are never positions
const std::string kPrefix = "language_model.model.decoder.";

}  // namespace

OPTModel::OPTModel(Checkpoint& ck, const OPTConfig& cfg) : cfg_(cfg) {
  const int64_t V = cfg.vocab_size, d = cfg.hidden_size, wd = cfg.word_embed_proj_dim, F = cfg.ffn_dim;
  // OPT ties lm_head to the embedding; checkpoints may store it anyway. Absent means tied.
  tied_ = !ck.has("language_model.lm_head.weight");
  if (tied_) {
    const auto tied = ck.take_tied_embedding(kPrefix + "embed_tokens.weight", "language_model.lm_head.weight", {V, wd});
    embed_tokens_ = tied.table;
    lm_head_ = tied.head;
  } else {
    embed_tokens_ = ck.take(kPrefix + "embed_tokens.weight", {V, wd});
    lm_head_ = ck.take("language_model.lm_head.weight", {V, wd});
  }
  embed_positions_ = ck.take(kPrefix + "embed_positions.weight", {cfg.max_position_embeddings + kPositionOffset, d});
  if (wd != d) {
    project_in_ = ck.take(kPrefix + "project_in.weight", {d, wd});
    project_out_ = ck.take(kPrefix + "project_out.weight", {wd, d});
  }
  if (cfg.has_final_layer_norm())
    final_ln_ = {ck.take(kPrefix + "final_layer_norm.weight", {d}), ck.take(kPrefix + "final_layer_norm.bias", {d})};
  for (int i = 0; i < cfg.num_layers; ++i) {
    const std::string p = kPrefix + "layers." + std::to_string(i) + ".";
    const auto norm = [&](const std::string& n) { return Norm{ck.take(p + n + ".weight", {d}), ck.take(p + n + ".bias", {d})}; };
    Layer L;
    L.attn_ln = norm("self_attn_layer_norm");
    L.ffn_ln = norm("final_layer_norm");
    for (auto [w, b, n] : {std::tuple{&L.q, &L.q_b, "q_proj"}, {&L.k, &L.k_b, "k_proj"}, {&L.v, &L.v_b, "v_proj"},
                           {&L.o, &L.o_b, "out_proj"}}) {
      *w = ck.take(p + "self_attn." + n + ".weight", {d, d});
      *b = ck.take(p + "self_attn." + n + ".bias", {d});
    }
    L.fc1 = ck.take(p + "fc1.weight", {F, d});
    L.fc1_b = ck.take(p + "fc1.bias", {F});
    L.fc2 = ck.take(p + "fc2.weight", {d, F});
    L.fc2_b = ck.take(p + "fc2.bias", {d});
    layers_.push_back(std::move(L));
  }
}

void OPTModel::embed(const int32_t* ids, int64_t n, float* out) const { ops::embedding(embed_tokens_, ids, n, out); }

Tensor OPTModel::input(const Tensor& embeds, const std::vector<int64_t>& positions) const {
  Tensor x = project_in_.empty() ? embeds : ops::linear(embeds, project_in_);
  const int64_t d = cfg_.hidden_size, rows = x.rows();
  std::vector<int32_t> table_rows(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = positions[r] + kPositionOffset;  // padding has position -1: row 1
    if (row < 0 || row >= embed_positions_.rows())
      fail(ErrorKind::Input, "sequence is too long for the language model: position " + std::to_string(positions[r]) +
                                 " is past its " + std::to_string(cfg_.max_position_embeddings) + " positions");
    table_rows[r] = static_cast<int32_t>(row);
  }
  Tensor pe({rows, d}, x.device);
  ops::embedding(embed_positions_, table_rows.data(), rows, pe.data_ptr());
  ops::add(x, pe);
  return x;
}

void OPTModel::forward(Tensor& x, const std::vector<int64_t>& seq_start, const uint8_t* mask, Cache& cache) const {
  const int64_t d = cfg_.hidden_size, hd = cfg_.head_dim();
  const size_t S = seq_start.size() - 1;
  const float eps = cfg_.layer_norm_eps;
  const bool pre = cfg_.do_layer_norm_before;
  const Device dev = x.device;
  // each sequence's mask on the device, new positions included
  const std::vector<Buffer> seq_mask = cache.append_mask(seq_start, mask, dev);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& L = layers_[l];
    // self-attention: causal over each sequence's cache, padding excluded
    Tensor n = x;
    if (pre) ops::layer_norm(n, L.attn_ln.w, L.attn_ln.b, eps);
    const Tensor q = ops::linear(n, L.q, L.q_b), k = ops::linear(n, L.k, L.k_b), v = ops::linear(n, L.v, L.v_b);
    Tensor ctx({x.rows(), d}, dev);
    std::vector<ops::AttentionArgs> seqs(S);  // one problem per sequence, one call for all
    for (size_t s = 0; s < S; ++s) {
      auto& seq = cache.seqs[s];
      const int64_t r0 = seq_start[s], tq = seq_start[s + 1] - r0;
      seq.k[l].append(k, r0, tq);
      seq.v[l].append(v, r0, tq);
      const int64_t tk = static_cast<int64_t>(seq.mask.size());
      seqs[s] = {.device = dev, .q = q.data_ptr() + r0 * d, .ldq = d, .tq = tq, .k = seq.k[l].data(), .ldk = d,
                 .v = seq.v[l].data(), .ldv = d, .tk = tk, .heads = cfg_.num_heads,
                 .head_dim = static_cast<int>(hd), .scale = 1.0f / std::sqrt(static_cast<float>(hd)),
                 .key_mask = static_cast<const uint8_t*>(seq_mask[s].data()), .out = ctx.data_ptr() + r0 * d,
                 .ldo = d, .causal = true};
    }
    ops::attention(seqs);
    ops::add(x, ops::linear(ctx, L.o, L.o_b));
    if (!pre) ops::layer_norm(x, L.attn_ln.w, L.attn_ln.b, eps);

    // feed-forward
    n = x;
    if (pre) ops::layer_norm(n, L.ffn_ln.w, L.ffn_ln.b, eps);
    Tensor a = ops::linear(n, L.fc1, L.fc1_b);
    ops::activate(a, cfg_.act);
    ops::add(x, ops::linear(a, L.fc2, L.fc2_b));
    if (!pre) ops::layer_norm(x, L.ffn_ln.w, L.ffn_ln.b, eps);
  }
  if (cfg_.has_final_layer_norm()) ops::layer_norm(x, final_ln_.w, final_ln_.b, eps);
  if (!project_out_.empty()) x = ops::linear(x, project_out_);
}

Tensor OPTModel::head(const Tensor& h) const { return ops::linear(h, lm_head_); }

Tensor OPTModel::prefill(const Tensor& x, const std::vector<uint8_t>& mask, Cache& cache) const {
  const int64_t B = x.dim(0), T = x.dim(1), wd = cfg_.word_embed_proj_dim;
  if (x.shape != Shape{B, T, wd} || static_cast<int64_t>(mask.size()) != B * T)
    fail(ErrorKind::Internal, "OPT input has shape " + shape_str(x.shape) + " with " + std::to_string(mask.size()) +
                                  " mask entries");
  // Positions from the mask, as OPT computes them: cumsum(mask) * mask - 1.
  const RowPositions rp = prefill_positions(mask, B, T, -1);
  Tensor flat = x;
  flat.shape = {B * T, wd};
  Tensor h = input(flat, rp.pos);
  cache.reset(B, layers_.size(), cfg_.hidden_size, x.device);
  forward(h, rp.seq_start, mask.data(), cache);
  return h;
}

Tensor OPTModel::extend(const Tensor& e, Cache& cache) const {
  const RowPositions rp = step_positions(cache);
  Tensor h = input(e, rp.pos);
  const std::vector<uint8_t> ones(cache.seqs.size(), 1);
  forward(h, rp.seq_start, ones.data(), cache);
  return h;
}

}  // namespace blip2
