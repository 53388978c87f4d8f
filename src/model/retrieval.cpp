#include "model/retrieval.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "ops/ops.h"

namespace blip2 {

namespace {

Blip2Config retrieval_config(const std::string& dir) {
  Blip2Config c = load_config(dir);
  if (c.task != Blip2Task::Retrieval)
    fail(ErrorKind::Model, dir + ": " + task_description(c.task) +
                               "; match and embed need an image-text retrieval checkpoint "
                               "(Blip2ForImageTextRetrieval, e.g. Salesforce/blip2-itm-vit-g)");
  return c;
}

// Each row of [rows, E] scaled to unit length, as torch's F.normalize (norm clamped at 1e-12).
void normalize_rows(Tensor& t) {
  const int64_t E = t.last();
  for (int64_t r = 0; r < t.rows(); ++r) {
    float* x = t.ptr() + r * E;
    double ss = 0;
    for (int64_t i = 0; i < E; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float n = static_cast<float>(std::max(std::sqrt(ss), 1e-12));
    for (int64_t i = 0; i < E; ++i) x[i] /= n;
  }
}

}  // namespace

Tensor gather_items(const Tensor& t, const std::vector<int64_t>& items) {
  const int64_t B = t.shape.empty() ? 0 : t.dim(0), per = B ? t.rows() / B : 0;
  Shape s = t.shape;
  s[0] = static_cast<int64_t>(items.size());
  Tensor out(s, t.device);
  for (size_t i = 0; i < items.size(); ++i) {
    if (items[i] < 0 || items[i] >= B)
      fail(ErrorKind::Internal, "gather_items: item " + std::to_string(items[i]) + " of " + std::to_string(B));
    ops::copy_rows(t, items[i] * per, out, static_cast<int64_t>(i) * per, per);
  }
  return out;
}

RetrievalModel::RetrievalModel(const std::string& dir, const LoadOptions& options, const Checkpoint::Progress& progress)
    : cfg_(retrieval_config(dir)),
      device_(options.device.kind),
      ckpt_(open_checkpoint(dir, options, cfg_.family, progress)),
      vision_(*ckpt_, cfg_.vision),
      qformer_(*ckpt_, cfg_.qformer, cfg_.num_query_tokens, QFormerNames::retrieval()),
      tokenizer_(BertTokenizer::load(dir)) {
  const int64_t E = cfg_.image_text_hidden_size, d = cfg_.qformer.hidden_size;
  vision_proj_w_ = ckpt_->take("vision_projection.weight", {E, d});
  vision_proj_b_ = ckpt_->take("vision_projection.bias", {E});
  text_proj_w_ = ckpt_->take("text_projection.weight", {E, d});
  text_proj_b_ = ckpt_->take("text_projection.bias", {E});
  itm_w_ = ckpt_->take("itm_head.weight", {2, d});
  itm_b_ = ckpt_->take("itm_head.bias", {2});
  ckpt_->check_all_used();
  if (tokenizer_.vocab_size() > cfg_.qformer.vocab_size)
    fail(ErrorKind::Model, dir + ": the tokenizer has " + std::to_string(tokenizer_.vocab_size()) +
                               " ids but the Q-Former's vocabulary has only " + std::to_string(cfg_.qformer.vocab_size));
}

TokenBatch RetrievalModel::tokenize(const std::vector<std::string>& texts) const {
  if (texts.empty()) fail(ErrorKind::Usage, "no texts given");
  TokenBatch b = tokenizer_.encode_batch(texts);
  if (b.length > qformer_.max_text_tokens())
    fail(ErrorKind::Input, "text is too long: " + std::to_string(b.length) + " tokens, the Q-Former takes at most " +
                               std::to_string(qformer_.max_text_tokens()));
  return b;
}

Tensor RetrievalModel::encode_vision(const Tensor& pixels) const {
  Tensor v = vision_.forward(pixels);
  ++image_encodings_;
  return v;
}

MatchScores RetrievalModel::match(const Tensor& vision, const TokenBatch& texts) const {
  MatchScores m;
  m.qformer_itm_hidden_state = qformer_.forward(vision, texts);
  // The head reads the query positions only; its logits are averaged over the queries.
  const int64_t P = texts.batch, Q = cfg_.num_query_tokens, T = m.qformer_itm_hidden_state.dim(1);
  Tensor queries({P, Q, cfg_.qformer.hidden_size}, vision.device);
  for (int64_t p = 0; p < P; ++p) ops::copy_rows(m.qformer_itm_hidden_state, p * T, queries, p * Q, Q);
  const Tensor per_query = on_host(ops::linear(queries, itm_w_, itm_b_));  // [P, Q, 2]
  m.itm_logits = Tensor({P, 2});
  for (int64_t p = 0; p < P; ++p) {
    double s0 = 0, s1 = 0;
    for (int64_t q = 0; q < Q; ++q) {
      s0 += per_query.ptr()[(p * Q + q) * 2];
      s1 += per_query.ptr()[(p * Q + q) * 2 + 1];
    }
    const float l0 = static_cast<float>(s0 / Q), l1 = static_cast<float>(s1 / Q);
    m.itm_logits.ptr()[p * 2] = l0;
    m.itm_logits.ptr()[p * 2 + 1] = l1;
    m.itm_probability.push_back(static_cast<float>(1.0 / (1.0 + std::exp(static_cast<double>(l0) - l1))));
  }
  return m;
}

Tensor RetrievalModel::image_embeds(const Tensor& vision) const {
  Tensor e = on_host(ops::linear(qformer_.forward(vision), vision_proj_w_, vision_proj_b_));
  normalize_rows(e);
  return e;
}

TextEmbeddings RetrievalModel::text_embeds(const TokenBatch& texts) const {
  TextEmbeddings t;
  t.qformer_text_hidden_state = qformer_.forward_text(texts, device_);
  // The [CLS] position of each text.
  const int64_t B = texts.batch, L = texts.length;
  Tensor cls({B, cfg_.qformer.hidden_size}, device_);
  for (int64_t b = 0; b < B; ++b) ops::copy_rows(t.qformer_text_hidden_state, b * L, cls, b, 1);
  t.text_embeds = on_host(ops::linear(cls, text_proj_w_, text_proj_b_));
  normalize_rows(t.text_embeds);
  return t;
}

Tensor RetrievalModel::similarity(const Tensor& image_embeds, const Tensor& text_embeds) {
  const int64_t Bi = image_embeds.dim(0), Q = image_embeds.dim(1), E = image_embeds.dim(2), Bt = text_embeds.dim(0);
  if (text_embeds.shape != Shape{Bt, E})
    fail(ErrorKind::Internal, "similarity: image embeddings " + shape_str(image_embeds.shape) + ", text embeddings " +
                                  shape_str(text_embeds.shape));
  Tensor s({Bi, Bt});
  for (int64_t i = 0; i < Bi; ++i)
    for (int64_t j = 0; j < Bt; ++j) {
      float best = -INFINITY;
      for (int64_t q = 0; q < Q; ++q) {
        double dot = 0;
        for (int64_t k = 0; k < E; ++k)
          dot += static_cast<double>(image_embeds.ptr()[(i * Q + q) * E + k]) * text_embeds.ptr()[j * E + k];
        best = std::max(best, static_cast<float>(dot));
      }
      s.ptr()[i * Bt + j] = best;
    }
  return s;
}

}  // namespace blip2
