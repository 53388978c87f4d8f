// Vicuna's tokenizer as InstructBLIP ships it: transformers' slow LlamaTokenizer in legacy mode over a
// LLaMA-style BPE SentencePiece model (tokenizer.model: byte fallback, digits split, dummy prefix). The text
// is split at the special tokens written in it (matched exactly), each other piece encoded by SentencePiece
// on its own (so a `▁` follows a special token: legacy mode), and the BOS token put first. The real
// checkpoint's BOS, EOS and UNK are all `</s>` and `[PAD]` is an added token after the pieces: all read from
// tokenizer_config.json / special_tokens_map.json / added_tokens.json, none assumed.
#pragma once
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "text/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace blip2 {

class LlamaTokenizer final : public Tokenizer {
 public:
  // Loads <model_dir>/tokenizer.model and the special-token files. Throws Error(Model) naming a bad file.
  explicit LlamaTokenizer(const std::string& model_dir);
  ~LlamaTokenizer() override;

  std::vector<int32_t> encode(const std::string& text) const override;  // starts with the BOS id
  std::string decode(const std::vector<int32_t>& ids) const override;    // special tokens skipped
  int vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> prompt_pad_id() const override { return pad_; }

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::map<std::string, int32_t> specials_;  // special token text -> id (split out of the text, skipped in decode)
  int32_t bos_ = -1;
  std::optional<int32_t> pad_;
  int vocab_size_ = 0;
};

}  // namespace blip2
