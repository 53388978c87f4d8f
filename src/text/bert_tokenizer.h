// BERT's WordPiece tokenizer, as transformers' slow BertTokenizer: the Q-Former's text tokenizer for
// image–text retrieval (blip2-itm-vit-g, files at the top of the model directory) and for InstructBLIP
// (its qformer_tokenizer/ folder).
//
// encode(text):
//   1. added/special tokens written in the text ([CLS], [SEP], [DEC], ...) are cut out first, matched
//      case-sensitively (the earliest, then the longest match);
//   2. every other stretch: lower-cased one character at a time (do_lower_case), control characters removed
//      and whitespace made spaces, spaces put around CJK ideographs, NFC, split at whitespace; each word
//      has its accents stripped (NFD, marks dropped: with lower-casing unless strip_accents is false) and
//      is split at punctuation;
//   3. each piece: greedy longest-match WordPiece ("##" continuations); a piece with no cover or over 100
//      characters becomes [UNK];
//   4. [CLS] … [SEP] around it.
// Unicode properties (categories, case mapping, normalisation) come from ICU.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "text/token_batch.h"
#include "text/tokenizer.h"

namespace blip2 {

class BertTokenizer final : public Tokenizer {
 public:
  enum class Side { Left, Right };

  // Reads <dir>/vocab.txt and, where present, tokenizer_config.json (do_lower_case, strip_accents,
  // tokenize_chinese_chars, truncation_side, model_max_length, clean_up_tokenization_spaces, the special
  // tokens, added_tokens_decoder), special_tokens_map.json and added_tokens.json. Throws Error(Model)
  // naming the file for a missing or malformed one.
  static BertTokenizer load(const std::string& dir);

  // The word pieces of `text`, without [CLS]/[SEP]. Throws Error(Input) for text that is not UTF-8.
  std::vector<std::string> tokenize(const std::string& text) const;
  // [CLS] ids [SEP], untruncated.
  std::vector<int32_t> encode(const std::string& text) const override;
  // The same, at most max_length ids (special ones included; max_length >= 2): pieces are dropped from the
  // configured truncation side, as the reference's truncation=True, max_length=N.
  std::vector<int32_t> encode(const std::string& text, int max_length) const;
  // Several texts right-padded with the pad id (max_length as above; 0: no truncation).
  TokenBatch encode_batch(const std::vector<std::string>& texts, int max_length = 0) const;
  // The reference's decode(ids, skip_special_tokens=True): special ids dropped, "##" joined, then the
  // tokenization-space clean-up when the config asks for it (it does by default).
  std::string decode(const std::vector<int32_t>& ids) const override;
  // A token's text ([UNK]'s for an id outside the vocabulary); the id of a token (unk_id() if unknown).
  std::string id_to_token(int32_t id) const;
  int32_t token_to_id(const std::string& token) const;
  int vocab_size() const override { return vocab_size_; }  // largest id + 1, added tokens included

  int32_t cls_id() const { return cls_; }
  int32_t sep_id() const { return sep_; }
  int32_t pad_id() const { return pad_; }
  int32_t unk_id() const { return unk_; }
  Side truncation_side() const { return truncation_side_; }
  // tokenizer_config.json's model_max_length (0 when absent or the "no limit" placeholder).
  int model_max_length() const { return model_max_length_; }

 private:
  BertTokenizer() = default;
  void wordpiece(const std::u32string& word, std::vector<std::string>& out) const;
  void basic_and_wordpiece(const std::string& text, std::vector<std::string>& out) const;

  std::vector<std::string> id_to_token_;                  // vocab.txt, then added tokens by id
  std::unordered_map<std::string, int32_t> vocab_;        // vocab.txt only (WordPiece's lookups)
  std::unordered_map<std::string, int32_t> added_;        // added tokens (special ones included)
  std::vector<std::string> added_by_length_;              // added tokens, longest first (text matching)
  std::unordered_set<int32_t> special_ids_;               // skipped by decode
  int32_t cls_ = -1, sep_ = -1, pad_ = -1, unk_ = -1;
  int vocab_size_ = 0;
  bool lower_ = true, strip_accents_ = true, chinese_chars_ = true, clean_up_spaces_ = true;
  Side truncation_side_ = Side::Right;
  int model_max_length_ = 0;
};

}  // namespace blip2
