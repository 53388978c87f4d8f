// Text generation over any Decoder: one loop for every decoding strategy.
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "generate/decoder.h"

namespace blip2 {

// Decoding options, with Hugging Face's names and defaults.
struct GenerationOptions {
  int max_new_tokens = 20;  // tokens generated after the start token, end-of-sequence included
};

struct SpecialTokens {
  int32_t decoder_start = 0;
  int32_t eos = 1;
  int32_t pad = 0;
};

struct GeneratedSequence {
  std::vector<int32_t> ids;  // generated ids, without the start token, up to and including the first eos
  float score = 0.0f;        // sum of the chosen tokens' log-probabilities
};

// Called after each step with the token chosen for each batch item (greedy) so text can stream.
using TokenCallback = std::function<void(int item, int32_t token)>;

// Generates for `batch` items. `start(expand)` returns a fresh decoder over the batch with `expand` rows
// per item. Returns one list of sequences per item.
std::vector<std::vector<GeneratedSequence>> generate(
    const std::function<std::unique_ptr<Decoder>(int expand)>& start, int batch,
    const GenerationOptions& options, const SpecialTokens& special, const TokenCallback& on_token = nullptr);

// Checks options for contradictions and ranges; throws Error(Usage) with the option's name.
void validate(const GenerationOptions& options);

}  // namespace blip2
