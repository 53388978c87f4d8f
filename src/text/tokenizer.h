// What the pipeline needs of a tokenizer, whichever language model the checkpoint has: prompt text to the
// ids the model takes, generated ids back to text.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "io/config.h"

namespace blip2 {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // The model's input ids for a prompt: Flan-T5 appends </s>; OPT prepends its BOS (</s> too).
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  // The text of generated ids, special tokens skipped.
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  // A prefix of decode(ids) that stays a prefix of decode(ids + more) whatever follows, for streaming (apart
  // from an unfinished UTF-8 character at the end, which TextStream holds back itself).
  virtual std::string decode_stable(const std::vector<int32_t>& ids) const { return decode(ids); }
  virtual int vocab_size() const = 0;
  // The id prompts are padded with when the tokenizer names one that is not the language model's
  // (Vicuna: its [PAD], where text_config has none).
  virtual std::optional<int32_t> prompt_pad_id() const { return std::nullopt; }
};

// The tokenizer of a model directory: SentencePiece (spiece.model) for Flan-T5, GPT-2 byte-level BPE
// (vocab.json + merges.txt, or tokenizer.json) for OPT, LLaMA's SentencePiece (tokenizer.model) for Vicuna. Throws Error(Model) naming a missing or bad file.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& model_dir, const Blip2Config& cfg);

}  // namespace blip2
