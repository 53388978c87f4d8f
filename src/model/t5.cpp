#include "model/t5.h"

#include <cmath>
#include <cstring>
#include <iterator>
#include <map>

#include "core/error.h"
#include "ops/ops.h"

namespace blip2 {

int t5_relative_bucket(int64_t rel, bool bidirectional, int num_buckets, int max_distance) {
  int bucket = 0;
  int64_t r;
  if (bidirectional) {
    num_buckets /= 2;
    if (rel > 0) bucket += num_buckets;
    r = rel < 0 ? -rel : rel;
  } else {
    r = rel < 0 ? -rel : 0;
  }
  const int max_exact = num_buckets / 2;
  if (r < max_exact) return bucket + static_cast<int>(r);
  // The reference computes this in float32 and truncates toward zero.
  const float large = std::log(static_cast<float>(r) / max_exact) /
                      static_cast<float>(std::log(static_cast<double>(max_distance) / max_exact)) *
                      static_cast<float>(num_buckets - max_exact);
  const int64_t v = max_exact + static_cast<int64_t>(large);
  return bucket + static_cast<int>(std::min<int64_t>(v, num_buckets - 1));
}

T5Model::Stack T5Model::load_stack(Checkpoint& ck, const std::string& prefix, int layers, bool decoder) {
  const int64_t d = cfg_.d_model, I = cfg_.inner_dim(), F = cfg_.d_ff;
  Stack s;
  for (int i = 0; i < layers; ++i) {
    const std::string b = prefix + "block." + std::to_string(i) + ".layer.";
    Block B;
    const auto attn = [&](const std::string& p, const char* kind) {
      Attention a;
      a.ln = ck.take(p + "layer_norm.weight", {d});
      for (auto [w, n] : {std::pair{&a.q, "q"}, {&a.k, "k"}, {&a.v, "v"}})
        *w = ck.take(p + kind + "." + n + ".weight", {I, d});
      a.o = ck.take(p + kind + ".o.weight", {d, I});
      return a;
    };
    B.self_attn = attn(b + "0.", "SelfAttention");
    if (i == 0)
      s.rel_bias = ck.take(b + "0.SelfAttention.relative_attention_bias.weight",
                           {cfg_.relative_attention_num_buckets, cfg_.num_heads});
    if (decoder) {
      B.cross_attn = attn(b + "1.", "EncDecAttention");
      // Hugging Face ignores this tensor if a checkpoint carries it; so do we.
      ck.ignore(b + "1.EncDecAttention.relative_attention_bias.weight");
    }
    const std::string f = b + (decoder ? "2." : "1.");
    B.ffn.ln = ck.take(f + "layer_norm.weight", {d});
    if (cfg_.is_gated_act) {
      B.ffn.wi_0 = ck.take(f + "DenseReluDense.wi_0.weight", {F, d});
      B.ffn.wi_1 = ck.take(f + "DenseReluDense.wi_1.weight", {F, d});
    } else {
      B.ffn.wi_0 = ck.take(f + "DenseReluDense.wi.weight", {F, d});
    }
    B.ffn.wo = ck.take(f + "DenseReluDense.wo.weight", {d, F});
    s.blocks.push_back(std::move(B));
  }
  s.final_ln = ck.take(prefix + "final_layer_norm.weight", {d});
  return s;
}

T5Model::T5Model(Checkpoint& ck, const T5Config& cfg) : cfg_(cfg) {
  const int64_t V = cfg.vocab_size, d = cfg.d_model;
  shared_ = ck.take_any({"language_model.shared.weight", "language_model.encoder.embed_tokens.weight",
                         "language_model.decoder.embed_tokens.weight"},
                        {V, d});
  // An absent lm_head means the head is tied to the embedding (T5 v1.0 style), with the d^-0.5 rescale.
  tied_ = !ck.has("language_model.lm_head.weight");
  lm_head_ = tied_ ? shared_ : ck.take("language_model.lm_head.weight", {V, d});
  encoder_ = load_stack(ck, "language_model.encoder.", cfg.num_layers, false);
  decoder_ = load_stack(ck, "language_model.decoder.", cfg.num_decoder_layers, true);
}

void T5Model::embed(const int32_t* ids, int64_t n, float* out) const { ops::embedding(shared_, ids, n, out); }

Tensor T5Model::position_bias(const Stack& s, bool bidirectional, int64_t q0, int64_t tq, int64_t tk) const {
  std::vector<int32_t> buckets(static_cast<size_t>(tq * tk));
  for (int64_t i = 0; i < tq; ++i)
    for (int64_t j = 0; j < tk; ++j)
      buckets[i * tk + j] = t5_relative_bucket(j - (q0 + i), bidirectional, cfg_.relative_attention_num_buckets,
                                               cfg_.relative_attention_max_distance);
  return ops::relative_bias(s.rel_bias, buckets, tq, tk);
}

void T5Model::feed_forward(const FeedForward& f, Tensor& h) const {
  Tensor n = h;
  ops::rms_norm(n, f.ln, cfg_.layer_norm_epsilon);
  Tensor a = ops::linear(n, f.wi_0);
  ops::activate(a, cfg_.act);
  if (!f.wi_1.empty()) ops::mul(a, ops::linear(n, f.wi_1));
  ops::add(h, ops::linear(a, f.wo));
}

Tensor T5Model::encode(Tensor x, const std::vector<uint8_t>& mask) const {
  const int64_t B = x.dim(0), T = x.dim(1), I = cfg_.inner_dim();
  const Device dev = x.device;
  const Tensor bias = position_bias(encoder_, true, 0, T, T);
  const Buffer mask_d = Buffer::copy_of(mask.data(), mask.size(), dev);
  const auto* m = static_cast<const uint8_t*>(mask_d.data());
  for (const Block& blk : encoder_.blocks) {
    const Attention& a = blk.self_attn;
    Tensor n = x;
    ops::rms_norm(n, a.ln, cfg_.layer_norm_epsilon);
    const Tensor q = ops::linear(n, a.q), k = ops::linear(n, a.k), v = ops::linear(n, a.v);
    Tensor ctx({B, T, I}, dev);
    for (int64_t b = 0; b < B; ++b)
      ops::attention({.device = dev, .q = q.data_ptr() + b * T * I, .ldq = I, .tq = T, .k = k.data_ptr() + b * T * I,
                      .ldk = I, .v = v.data_ptr() + b * T * I, .ldv = I, .tk = T, .heads = cfg_.num_heads,
                      .head_dim = cfg_.d_kv, .scale = 1.0f, .bias = bias.data_ptr(), .key_mask = m + b * T,
                      .out = ctx.data_ptr() + b * T * I, .ldo = I});
    ops::add(x, ops::linear(ctx, a.o));
    feed_forward(blk.ffn, x);
  }
  ops::rms_norm(x, encoder_.final_ln, cfg_.layer_norm_epsilon);
  return x;
}

// The decoder's state, per row: a self-attention key/value cache per layer that grows by one position per
// step, the row's position, and the batch item whose cross-attention keys/values it reads (computed once, in
// one product for all the items the decoder starts with; each item reads its slice, shared by its beams).
// Rows are independent, so a decoder can take rows from another (append) and drop or duplicate rows
// (reorder): the server's continuous batching runs requests at different positions in one step.
class T5Decoder final : public Decoder {
 public:
  T5Decoder(const T5Model& m, const Tensor& enc_out, const std::vector<uint8_t>& enc_mask, int expand)
      : m_(m), dev_(enc_out.device) {
    const auto& blocks = m.decoder_.blocks;
    const int64_t B = enc_out.dim(0), T = enc_out.dim(1), I = m.cfg_.inner_dim();
    auto kv = std::make_shared<CrossKV>();
    for (const auto& blk : blocks) {
      kv->k.push_back(ops::linear(enc_out, blk.cross_attn.k));
      kv->v.push_back(ops::linear(enc_out, blk.cross_attn.v));
    }
    for (int64_t b = 0; b < B; ++b) {
      auto item = std::make_shared<Item>();
      item->kv = kv;
      item->first = b * T;
      item->len = T;
      item->mask = Buffer::copy_of(enc_mask.data() + b * T, static_cast<size_t>(T), dev_);
      for (int e = 0; e < expand; ++e) rows_.push_back({item, 0});
    }
    self_k_.assign(blocks.size(), std::vector<ops::RowCache>(rows_.size(), ops::RowCache(I, dev_)));
    self_v_ = self_k_;
  }

  int rows() const override { return static_cast<int>(rows_.size()); }
  int64_t vocab_size() const override { return m_.cfg_.vocab_size; }
  std::vector<int32_t> prefix(int) const override { return {m_.cfg_.decoder_start_token_id}; }
  Tensor start() override {
    return step(std::vector<int32_t>(static_cast<size_t>(rows()), m_.cfg_.decoder_start_token_id));
  }

  Tensor step(const std::vector<int32_t>& tokens) override {
    const T5Config& c = m_.cfg_;
    const int R = rows();
    const int64_t d = c.d_model, I = c.inner_dim();
    if (static_cast<int>(tokens.size()) != R) fail(ErrorKind::Internal, "decoder step: wrong token count");
    Tensor x({R, d}, dev_);
    m_.embed(tokens.data(), R, x.data_ptr());
    // Relative position bias [H, 1, t+1] for each position t among the rows.
    std::map<int64_t, Tensor> bias;
    for (const Row& row : rows_)
      if (!bias.count(row.pos)) bias[row.pos] = m_.position_bias(m_.decoder_, false, row.pos, 1, row.pos + 1);
    for (size_t l = 0; l < m_.decoder_.blocks.size(); ++l) {
      const auto& blk = m_.decoder_.blocks[l];
      // causal self-attention over the cache (positions 0..t)
      Tensor n = x;
      ops::rms_norm(n, blk.self_attn.ln, c.layer_norm_epsilon);
      const Tensor q = ops::linear(n, blk.self_attn.q), k = ops::linear(n, blk.self_attn.k),
                   v = ops::linear(n, blk.self_attn.v);
      Tensor ctx({R, I}, dev_);
      std::vector<ops::AttentionArgs> rows(static_cast<size_t>(R));  // one problem per row, one call for all
      for (int r = 0; r < R; ++r) {
        auto& kc = self_k_[l][r];
        auto& vc = self_v_[l][r];
        kc.append(k, r, 1);
        vc.append(v, r, 1);
        const int64_t t = rows_[r].pos;
        rows[r] = {.device = dev_, .q = q.data_ptr() + r * I, .ldq = I, .tq = 1, .k = kc.data(), .ldk = I,
                   .v = vc.data(), .ldv = I, .tk = t + 1, .heads = c.num_heads, .head_dim = c.d_kv,
                   .scale = 1.0f, .bias = bias[t].data_ptr(), .out = ctx.data_ptr() + r * I, .ldo = I};
      }
      ops::attention(rows);
      ops::add(x, ops::linear(ctx, blk.self_attn.o));

      // cross-attention to the encoder output of this row's batch item
      n = x;
      ops::rms_norm(n, blk.cross_attn.ln, c.layer_norm_epsilon);
      const Tensor cq = ops::linear(n, blk.cross_attn.q);
      for (int r = 0; r < R; ++r) {
        const Item& item = *rows_[r].item;
        rows[r] = {.device = dev_, .q = cq.data_ptr() + r * I, .ldq = I, .tq = 1,
                   .k = item.kv->k[l].data_ptr() + item.first * I, .ldk = I,
                   .v = item.kv->v[l].data_ptr() + item.first * I, .ldv = I, .tk = item.len, .heads = c.num_heads,
                   .head_dim = c.d_kv, .scale = 1.0f, .key_mask = static_cast<const uint8_t*>(item.mask.data()),
                   .out = ctx.data_ptr() + r * I, .ldo = I};
      }
      ops::attention(rows);
      ops::add(x, ops::linear(ctx, blk.cross_attn.o));
      m_.feed_forward(blk.ffn, x);
    }
    ops::rms_norm(x, m_.decoder_.final_ln, c.layer_norm_epsilon);
    if (m_.tied_) ops::scale(x, 1.0f / std::sqrt(static_cast<float>(d)));
    for (Row& row : rows_) ++row.pos;
    return ops::linear(x, m_.lm_head_);
  }

  void reorder(const std::vector<int>& src) override {
    // Rows whose parent is taken by one child move without a copy; only extra children copy; rows no one
    // takes are dropped.
    std::vector<int> uses(rows_.size(), 0);
    for (int s : src) {
      if (s < 0 || s >= rows()) fail(ErrorKind::Internal, "decoder reorder: no row " + std::to_string(s));
      ++uses[s];
    }
    for (size_t l = 0; l < self_k_.size(); ++l)
      for (auto* cache : {&self_k_[l], &self_v_[l]}) {
        std::vector<int> left = uses;
        std::vector<ops::RowCache> next(src.size());
        for (size_t r = 0; r < src.size(); ++r)
          next[r] = (--left[src[r]] == 0) ? std::move((*cache)[src[r]]) : (*cache)[src[r]];
        *cache = std::move(next);
      }
    std::vector<Row> rows(src.size());
    for (size_t r = 0; r < src.size(); ++r) rows[r] = rows_[src[r]];
    rows_ = std::move(rows);
  }

  void append(Decoder&& other) override {
    auto* o = dynamic_cast<T5Decoder*>(&other);
    if (!o || &o->m_ != &m_) fail(ErrorKind::Internal, "decoder append: not a decoder of the same model");
    for (size_t l = 0; l < self_k_.size(); ++l)
      for (auto [mine, theirs] : {std::pair{&self_k_[l], &o->self_k_[l]}, std::pair{&self_v_[l], &o->self_v_[l]}}) {
        std::move(theirs->begin(), theirs->end(), std::back_inserter(*mine));
        theirs->clear();
      }
    rows_.insert(rows_.end(), o->rows_.begin(), o->rows_.end());
    o->rows_.clear();
  }

 private:
  struct CrossKV {  // the cross-attention keys/values of the items started together, made in one product
    std::vector<Tensor> k, v;  // [layer] -> [items · len, I]
  };
  struct Item {  // one batch item's encoder side: rows [first, first + len) of its start's keys/values
    std::shared_ptr<const CrossKV> kv;  // kept while any row of any item started with it decodes
    int64_t first = 0, len = 0;
    Buffer mask;  // [len] bytes, on the decoder's device
  };
  struct Row {
    std::shared_ptr<const Item> item;
    int64_t pos = 0;  // the position the next token takes
  };
  const T5Model& m_;
  Device dev_;
  std::vector<Row> rows_;
  std::vector<std::vector<ops::RowCache>> self_k_, self_v_;  // [layer][row] -> [t, I]
};

std::unique_ptr<Decoder> T5Model::start_decoder(const Tensor& enc_out, const std::vector<uint8_t>& enc_mask,
                                                int expand) const {
  return std::make_unique<T5Decoder>(*this, enc_out, enc_mask, expand);
}

}  // namespace blip2
