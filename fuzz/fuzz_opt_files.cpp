// OPT's tokenizer files: the input is vocab.json, merges.txt and tokenizer_config.json joined by a marker line
// (a missing part is an empty file), loaded as the BPE tokenizer loads a model directory, then used.
#include <string>
#include <string_view>

#include "fuzz_util.h"
#include "text/bpe_tokenizer.h"

namespace {
struct Dir {
  blip2::fuzz::ScratchDir dir;
  blip2::fuzz::MemFile vocab, merges, config;
  Dir() {
    dir.link("vocab.json", vocab);
    dir.link("merges.txt", merges);
    dir.link("tokenizer_config.json", config);
  }
};
constexpr std::string_view kSplit = "\n#FUZZ-SPLIT#\n";  // fuzz/seeds.sh joins the seed files with it
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Dir d;
  std::string_view in(reinterpret_cast<const char*>(data), size), parts[3];
  for (auto& p : parts) {
    const size_t at = in.find(kSplit);
    p = in.substr(0, at);
    in = at == std::string_view::npos ? std::string_view() : in.substr(at + kSplit.size());
  }
  d.vocab.set(parts[0]);
  d.merges.set(parts[1]);
  d.config.set(parts[2]);
  blip2::fuzz::expect_clean([&] {
    const auto tok = blip2::BpeTokenizer::load(d.dir.path());
    const auto ids = tok.encode("Question: what's in the picture? Answer: a cat</s> é 日本");
    (void)tok.decode(ids);
    (void)tok.decode({-1, 0, 1, 2, tok.vocab_size() - 1, tok.vocab_size(), 1 << 30}, false);
    (void)tok.decode_stable(ids);
  });
  return 0;
}
