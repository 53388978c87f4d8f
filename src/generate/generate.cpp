#include "generate/generate.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace blip2 {

void validate(const GenerationOptions& o) {
  if (o.max_new_tokens < 1) fail(ErrorKind::Usage, "--max-new-tokens must be at least 1");
  if (o.max_new_tokens > 4096) fail(ErrorKind::Usage, "--max-new-tokens must be at most 4096");
}

namespace {

// log_softmax(logits)[index]
float log_prob(const float* logits, int64_t vocab, int64_t index) {
  const float mx = *std::max_element(logits, logits + vocab);
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i] - mx));
  return static_cast<float>(logits[index] - mx - std::log(sum));
}

std::vector<std::vector<GeneratedSequence>> greedy(Decoder& dec, int batch, const GenerationOptions& o,
                                                   const SpecialTokens& sp, const TokenCallback& on_token) {
  std::vector<std::vector<GeneratedSequence>> out(static_cast<size_t>(batch), std::vector<GeneratedSequence>(1));
  std::vector<bool> done(static_cast<size_t>(batch), false);
  std::vector<int32_t> tokens(static_cast<size_t>(batch), sp.decoder_start);
  const int64_t V = dec.vocab_size();
  for (int step = 0; step < o.max_new_tokens; ++step) {
    const Tensor logits = dec.step(tokens);
    bool all_done = true;
    for (int b = 0; b < batch; ++b) {
      if (done[b]) {
        tokens[b] = sp.pad;  // finished rows keep feeding padding, as the reference does
        continue;
      }
      const float* row = logits.ptr() + b * V;
      const int32_t next = static_cast<int32_t>(std::max_element(row, row + V) - row);  // first maximum
      GeneratedSequence& s = out[b][0];
      s.ids.push_back(next);
      s.score += log_prob(row, V, next);
      tokens[b] = next;
      if (next == sp.eos) done[b] = true;
      if (on_token) on_token(b, next);
      all_done = all_done && done[b];
    }
    if (all_done) break;
  }
  return out;
}

}  // namespace

std::vector<std::vector<GeneratedSequence>> generate(
    const std::function<std::unique_ptr<Decoder>(int expand)>& start, int batch, const GenerationOptions& o,
    const SpecialTokens& sp, const TokenCallback& on_token) {
  validate(o);
  auto dec = start(1);
  return greedy(*dec, batch, o, sp, on_token);
}

}  // namespace blip2
