#include "text/t5_tokenizer.h"

#include <sentencepiece_processor.h>

#include <filesystem>

#include "core/error.h"
#include "text/sentencepiece_model.h"

namespace blip2 {

T5Tokenizer::T5Tokenizer(const std::string& model_dir, int eos_id, int extra_ids)
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()), eos_id_(eos_id), extra_ids_(extra_ids) {
  load_sentencepiece(*sp_, (std::filesystem::path(model_dir) / "spiece.model").string(),
                    "the T5 tokenizer needs spiece.model");
  pieces_ = sp_->GetPieceSize();
}

T5Tokenizer::~T5Tokenizer() = default;

std::vector<int32_t> T5Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  const auto status = sp_->Encode(text, &ids);
  if (!status.ok()) fail(ErrorKind::Input, "cannot tokenize prompt: " + status.ToString());
  std::vector<int32_t> out(ids.begin(), ids.end());
  out.push_back(eos_id_);
  return out;
}

bool T5Tokenizer::is_special(int32_t id) const {
  return id < 0 || id >= pieces_ || sp_->IsControl(id) || sp_->IsUnknown(id);
}

std::string T5Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<int> kept;
  for (int32_t id : ids)
    if (!is_special(id)) kept.push_back(id);
  std::string text;
  const auto status = sp_->Decode(kept, &text);
  if (!status.ok()) fail(ErrorKind::Internal, "cannot decode ids: " + status.ToString());
  return text;
}

std::string T5Tokenizer::piece(int32_t id) const {
  if (id >= pieces_ && id < pieces_ + extra_ids_) return "<extra_id_" + std::to_string(pieces_ + extra_ids_ - 1 - id) + ">";
  if (id < 0 || id >= pieces_) return "";
  return sp_->IdToPiece(id);
}

}  // namespace blip2
