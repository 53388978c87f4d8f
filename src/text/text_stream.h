// Text of a sequence as its tokens arrive: each call returns what the decoded text gained since the last
// one, holding back a trailing replacement character or an unfinished UTF-8 character until it completes
// (a byte-fallback piece can end mid-character), and text the tokenizer may still change (decode_stable:
// OPT's clean-up of spaces). The pieces joined equal decode(all ids). The CLI's stream, the server's SSE and
// blip2_generate_stream all stream through this class.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "text/tokenizer.h"

namespace blip2 {

class TextStream {
 public:
  explicit TextStream(const Tokenizer& tok) : tok_(tok) {}
  // Appends a token; returns the new text that is final.
  std::string put(int32_t id) {
    ids_.push_back(id);
    return emit(tok_.decode_stable(ids_), false);
  }
  // The rest of the text once the sequence is complete (`ids`: the whole sequence).
  std::string end(const std::vector<int32_t>& ids) { return emit(tok_.decode(ids), true); }

 private:
  std::string emit(const std::string& text, bool final) {
    if (text.compare(0, printed_.size(), printed_) != 0) return "";  // not an extension: wait
    std::string add = text.substr(printed_.size());
    if (!final) {
      static const std::string kReplacement = "\xEF\xBF\xBD";
      while (add.size() >= 3 && add.compare(add.size() - 3, 3, kReplacement) == 0) add.resize(add.size() - 3);
      size_t start = add.size();  // an incomplete last character stays back
      while (start > 0 && (static_cast<unsigned char>(add[start - 1]) & 0xC0) == 0x80) --start;
      if (start > 0) {
        const unsigned char lead = static_cast<unsigned char>(add[start - 1]);
        const size_t len = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
        if (add.size() - (start - 1) < len) add.resize(start - 1);
      }
    }
    printed_ += add;
    return add;
  }
  const Tokenizer& tok_;
  std::vector<int32_t> ids_;
  std::string printed_;
};

}  // namespace blip2
