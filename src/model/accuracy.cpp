#include "model/accuracy.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace blip2 {

namespace {

// Σ(got − want)² and Σ want², accumulated over tensors of the same shape.
struct RelError {
  double num = 0.0, den = 0.0;
  void add(const Tensor& got_any, const Tensor& want_any) {
    const Tensor got = got_any.to(Device::CPU), want = want_any.to(Device::CPU);
    if (got.shape != want.shape)
      fail(ErrorKind::Internal, "accuracy: shapes " + shape_str(got.shape) + " and " + shape_str(want.shape));
    for (size_t i = 0; i < want.data.size(); ++i) {
      const double d = static_cast<double>(got.data[i]) - want.data[i];
      num += d * d;
      den += static_cast<double>(want.data[i]) * want.data[i];
    }
  }
  double rel() const { return std::sqrt(num / std::max(den, 1e-30)); }
};

}  // namespace

AccuracyReport compare_with_reference(const Blip2Model& reference, const Blip2Model& model, const Tensor& pixels,
                                      const std::vector<std::string>& prompts, int steps) {
  const Encoded want = reference.encode(pixels, reference.tokenize(prompts));
  const Encoded got = model.encode(pixels, model.tokenize(prompts));
  AccuracyReport r;
  for (const auto& [name, w, g] : {std::tuple{"vision", &want.vision_last_hidden_state, &got.vision_last_hidden_state},
                                   {"qformer", &want.qformer_last_hidden_state, &got.qformer_last_hidden_state},
                                   {"projection", &want.language_projection, &got.language_projection},
                                   {"encoder", &want.encoder_last_hidden_state, &got.encoder_last_hidden_state}}) {
    if (w->shape.empty()) continue;  // a stage this model does not have (T5's encoder)
    RelError e;
    e.add(*g, *w);
    r.stage_rel.emplace_back(name, e.rel());
  }
  auto ref_dec = reference.start_decoder(want), dec = model.start_decoder(got);
  Tensor ref_logits = ref_dec->start().to(Device::CPU), logits = dec->start().to(Device::CPU);
  RelError e;
  for (int s = 0;; ++s) {
    e.add(logits, ref_logits);
    const int64_t rows = ref_logits.dim(0), V = ref_logits.dim(1);
    std::vector<int32_t> pick;  // the reference's greedy tokens, fed to both
    for (int64_t b = 0; b < rows; ++b) {
      const float *w = ref_logits.ptr() + b * V, *g = logits.ptr() + b * V;
      const int64_t top = std::max_element(w, w + V) - w;
      r.top1_agree += top == std::max_element(g, g + V) - g;
      ++r.positions;
      pick.push_back(static_cast<int32_t>(top));
    }
    if (s == steps) break;
    ref_logits = ref_dec->step(pick).to(Device::CPU);
    logits = dec->step(pick).to(Device::CPU);
  }
  r.logits_rel = e.rel();
  return r;
}

}  // namespace blip2
