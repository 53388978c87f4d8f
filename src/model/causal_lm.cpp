#include "model/causal_lm.h"

#include <iterator>

#include "core/error.h"

namespace blip2 {

void CausalLM::Cache::reset(int64_t B, size_t layers, int64_t width, Device device) {
  seqs.assign(static_cast<size_t>(B), {});
  for (auto& seq : seqs) {
    seq.k.assign(layers, ops::RowCache(width, device));
    seq.v = seq.k;
  }
}

std::vector<Buffer> CausalLM::Cache::append_mask(const std::vector<int64_t>& seq_start, const uint8_t* mask,
                                                 Device device) {
  std::vector<Buffer> out(seqs.size());
  for (size_t s = 0; s < seqs.size(); ++s) {
    auto& seq = seqs[s];
    for (int64_t r = seq_start[s]; r < seq_start[s + 1]; ++r) {
      seq.mask.push_back(mask[r]);
      seq.tokens += mask[r];
    }
    out[s] = Buffer::copy_of(seq.mask.data(), seq.mask.size(), device);
  }
  return out;
}

CausalLM::RowPositions CausalLM::prefill_positions(const std::vector<uint8_t>& mask, int64_t B, int64_t T,
                                                   int64_t pad_position) {
  RowPositions r{std::vector<int64_t>(static_cast<size_t>(B * T)), std::vector<int64_t>(static_cast<size_t>(B + 1))};
  for (int64_t b = 0; b < B; ++b) {
    int64_t seen = 0;
    for (int64_t t = 0; t < T; ++t) {
      seen += mask[b * T + t];
      r.pos[b * T + t] = mask[b * T + t] ? seen - 1 : pad_position;
    }
    r.seq_start[b + 1] = (b + 1) * T;
  }
  return r;
}

CausalLM::RowPositions CausalLM::step_positions(const Cache& cache) {
  const int64_t S = static_cast<int64_t>(cache.seqs.size());
  RowPositions r{std::vector<int64_t>(static_cast<size_t>(S)), std::vector<int64_t>(static_cast<size_t>(S + 1))};
  for (int64_t s = 0; s < S; ++s) {
    r.pos[s] = cache.seqs[s].tokens;
    r.seq_start[s + 1] = s + 1;
  }
  return r;
}

namespace {

// The decoder's state: one cache sequence per row, seeded by the prefill of its batch item.
class CausalDecoder final : public Decoder {
 public:
  CausalDecoder(const CausalLM& m, const Tensor& x, const std::vector<uint8_t>& mask,
                std::vector<std::vector<int32_t>> prefix, int expand)
      : m_(m), x_(x), mask_(mask), expand_(expand) {
    if (static_cast<int64_t>(prefix.size()) != x.dim(0))
      fail(ErrorKind::Internal, "decoder: one prefix per batch item expected");
    for (auto& p : prefix)
      for (int e = 0; e < expand; ++e) prefix_.push_back(p);
  }

  int rows() const override { return static_cast<int>(prefix_.size()); }
  int64_t vocab_size() const override { return m_.vocab_size(); }
  std::vector<int32_t> prefix(int row) const override { return prefix_[row]; }

  Tensor start() override {
    CausalLM::Cache items;
    const Tensor h = m_.prefill(x_, mask_, items);
    const int64_t B = x_.dim(0), T = x_.dim(1), w = h.last();
    // Each item's last position predicts its first token; its beams (or samples) share that prefill.
    Tensor last({B * expand_, w}, h.device);
    cache_.seqs.clear();
    for (int64_t b = 0; b < B; ++b)
      for (int e = 0; e < expand_; ++e) {
        ops::copy_rows(h, b * T + T - 1, last, b * expand_ + e, 1);
        if (e + 1 < expand_) cache_.seqs.push_back(items.seqs[b]);
        else cache_.seqs.push_back(std::move(items.seqs[b]));
      }
    x_ = Tensor();  // the input is in the cache now
    return m_.head(last);
  }

  Tensor step(const std::vector<int32_t>& tokens) override {
    const int R = rows();
    if (static_cast<int>(tokens.size()) != R || static_cast<int>(cache_.seqs.size()) != R)
      fail(ErrorKind::Internal, "decoder step: wrong token count, or step before start");
    Tensor e({R, m_.embed_width()}, m_.device());
    m_.embed(tokens.data(), R, e.data_ptr());
    return m_.head(m_.extend(e, cache_));
  }

  void reorder(const std::vector<int>& src) override {
    // A parent taken by one child moves without a copy; only extra children copy; rows no one takes go.
    if (cache_.seqs.size() != prefix_.size()) fail(ErrorKind::Internal, "decoder: reorder before start");
    std::vector<CausalLM::Cache::Seq> next(src.size());
    std::vector<std::vector<int32_t>> next_prefix(src.size());
    std::vector<int> uses(cache_.seqs.size(), 0);
    for (int s : src) {
      if (s < 0 || s >= rows()) fail(ErrorKind::Internal, "decoder reorder: no row " + std::to_string(s));
      ++uses[s];
    }
    for (size_t r = 0; r < src.size(); ++r) {
      next_prefix[r] = prefix_[src[r]];
      next[r] = (--uses[src[r]] == 0) ? std::move(cache_.seqs[src[r]]) : cache_.seqs[src[r]];
    }
    cache_.seqs = std::move(next);
    prefix_ = std::move(next_prefix);
  }

  // Rows are independent sequences with their own positions, so another started decoder's rows join as
  // they are (continuous batching).
  void append(Decoder&& other) override {
    auto* o = dynamic_cast<CausalDecoder*>(&other);
    if (!o || &o->m_ != &m_) fail(ErrorKind::Internal, "decoder append: not a decoder of the same model");
    if (o->cache_.seqs.size() != o->prefix_.size() || cache_.seqs.size() != prefix_.size())
      fail(ErrorKind::Internal, "decoder append: both decoders must have started");
    std::move(o->cache_.seqs.begin(), o->cache_.seqs.end(), std::back_inserter(cache_.seqs));
    std::move(o->prefix_.begin(), o->prefix_.end(), std::back_inserter(prefix_));
    o->cache_.seqs.clear();
    o->prefix_.clear();
  }

 private:
  const CausalLM& m_;
  Tensor x_;
  std::vector<uint8_t> mask_;
  std::vector<std::vector<int32_t>> prefix_;  // per row
  int expand_;
  CausalLM::Cache cache_;
};

}  // namespace

Tensor CausalLM::logits(const Tensor& x, const std::vector<uint8_t>& mask) const {
  Cache cache;
  Tensor out = on_host(head(prefill(x, mask, cache)));
  out.shape = {x.dim(0), x.dim(1), vocab_size()};
  return out;
}

std::unique_ptr<Decoder> start_causal_decoder(const CausalLM& m, const Tensor& x, const std::vector<uint8_t>& mask,
                                              std::vector<std::vector<int32_t>> prefix, int expand) {
  return std::make_unique<CausalDecoder>(m, x, mask, std::move(prefix), expand);
}

}  // namespace blip2
