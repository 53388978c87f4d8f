// The Q-Former's BERT WordPiece tokenizer (retrieval and InstructBLIP) on the retrieval fixture's files: the
// input as text, encoded whole and truncated (from the configured side) to a length taken from its first
// byte; every id in the vocabulary, [CLS] first and [SEP] last, and the decoded ids never throw.
#include <string>

#include "fuzz_util.h"
#include "text/bert_tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const auto tok = blip2::BertTokenizer::load(BLIP2_BUNDLED_ITM_DIR);
  const std::string text(reinterpret_cast<const char*>(data), size);
  const int max_length = size > 0 ? 2 + data[0] % 16 : 2;
  blip2::fuzz::expect_clean([&] {
    for (const auto& ids : {tok.encode(text), tok.encode(text, max_length)}) {
      if (ids.size() < 2 || ids.front() != tok.cls_id() || ids.back() != tok.sep_id()) std::abort();
      for (int32_t id : ids)
        if (id < 0 || id >= tok.vocab_size()) std::abort();
      (void)tok.decode(ids);
    }
    if (static_cast<int>(tok.encode(text, max_length).size()) > max_length) std::abort();
  });
  return 0;
}
