// spiece.model (a SentencePiece protobuf) as the T5 tokenizer loads it, then a prompt through it both ways.
#include "fuzz_util.h"
#include "text/t5_tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static blip2::fuzz::DirWithInput d("spiece.model");
  d.input.set(data, size);
  blip2::fuzz::expect_clean([&] {
    const blip2::T5Tokenizer tok(d.dir.path());
    const auto ids = tok.encode("Question: what is in the picture? Answer: a cat <extra_id_0> é 日本");
    (void)tok.decode(ids);
    (void)tok.decode({-1, 0, 1, 2, tok.vocab_size() - 1, tok.vocab_size(), 1 << 30});
    for (int32_t id = -1; id < 8; ++id) (void)tok.piece(id);
  });
  return 0;
}
