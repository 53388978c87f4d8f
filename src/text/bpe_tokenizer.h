// OPT's tokenizer: GPT-2 byte-level BPE (spec §8.2). Text is split at added/special tokens (kept whole, as
// HF does), each remaining stretch is cut by GPT-2's pre-tokenization regex, every piece's bytes become
// printable characters (bytes_to_unicode) and are merged by rank. Decoding maps the characters back to
// bytes and reads them as UTF-8, invalid sequences becoming U+FFFD (HF's errors="replace").
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace blip2 {

class BpeTokenizer {
 public:
  // Reads <model_dir>/vocab.json + merges.txt, or tokenizer.json (model.vocab, model.merges) when those are
  // absent. Added and special tokens come from every file present: tokenizer.json's added_tokens,
  // added_tokens.json, tokenizer_config.json's added_tokens_decoder, and the roles (bos/eos/unk/pad/...,
  // additional_special_tokens) of tokenizer_config.json / special_tokens_map.json. tokenizer_config.json's
  // clean_up_tokenization_spaces (default false, as in transformers >= 4.45) applies to decode.
  // Throws Error(Model) naming the file and the problem for missing or malformed files.
  static BpeTokenizer load(const std::string& model_dir);

  BpeTokenizer(BpeTokenizer&&) noexcept;
  BpeTokenizer& operator=(BpeTokenizer&&) noexcept;
  ~BpeTokenizer();

  // Ids without BOS (the caller prepends bos_id(), 2 for OPT). Any bytes are accepted: a run of bytes that
  // is not valid UTF-8 is a pre-token of its own and still maps through bytes_to_unicode, so no byte is lost.
  std::vector<int32_t> encode(const std::string& text) const;
  // HF's decode: special tokens dropped when skip_special, ids with no token skipped, the bytes read as
  // UTF-8 with U+FFFD for invalid sequences, then clean_up_tokenization_spaces if the config asks for it.
  // No strip(): callers that want LAVIS's output strip it themselves.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = true) const;
  // The part of decode(ids) that no later ids can change: with clean_up_tokenization_spaces, text at the end
  // that a following token could still clean up (" you " before "?") is left out. For streaming.
  std::string decode_stable(const std::vector<int32_t>& ids, bool skip_special = true) const;
  // One token's bytes ("" for an id with no token). For streaming: a token may hold part of a UTF-8
  // character, so concatenate the bytes of several tokens before showing them.
  std::string token_bytes(int32_t id) const;

  std::optional<int32_t> token_id(const std::string& token) const;  // vocabulary token or added token
  bool is_special(int32_t id) const;
  int32_t vocab_size() const;  // largest id + 1 (added tokens included)
  // Ids of the roles named by tokenizer_config.json / special_tokens_map.json; -1 when not named or not in
  // the vocabulary. OPT: bos = eos = 2 ("</s>"), pad = 1.
  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t pad_id() const;
  int32_t unk_id() const;

 private:
  struct Impl;
  explicit BpeTokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace blip2
