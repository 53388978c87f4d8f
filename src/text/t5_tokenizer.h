// Flan-T5's tokenizer: SentencePiece on spiece.model, `</s>` appended, 100 `<extra_id_N>` sentinels after
// the pieces; decoding drops special ids (pad, eos, unk, sentinels and the padding rows beyond them).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "text/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace blip2 {

class T5Tokenizer final : public Tokenizer {
 public:
  // Loads <model_dir>/spiece.model. Throws Error(Model) if it is missing or unreadable.
  explicit T5Tokenizer(const std::string& model_dir, int eos_id = 1, int extra_ids = 100);
  ~T5Tokenizer() override;

  std::vector<int32_t> encode(const std::string& text) const override;  // ends with eos
  std::string decode(const std::vector<int32_t>& ids) const override;    // skips special tokens
  // One token's text (special tokens as their names); for streaming.
  std::string piece(int32_t id) const;
  bool is_special(int32_t id) const;
  int piece_count() const { return pieces_; }
  int vocab_size() const override { return pieces_ + extra_ids_; }

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  int eos_id_, extra_ids_, pieces_;
};

}  // namespace blip2
