// Encode and decode through the language models' tokenizers (T5's SentencePiece, OPT's byte-level BPE and
// Vicuna's legacy LLaMA SentencePiece; built three times, BLIP2_FUZZ_OPT / BLIP2_FUZZ_LLAMA selecting the model): the input as prompt text, and its bytes as token ids, which
// must stream (TextStream, as the CLI, SSE and the C API do) to exactly their decoded text.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "io/config.h"
#include "text/text_stream.h"
#include "text/tokenizer.h"

#if defined(BLIP2_FUZZ_OPT)
static const char* const kModelDir = BLIP2_BUNDLED_OPT_DIR;
#elif defined(BLIP2_FUZZ_LLAMA)
static const char* const kModelDir = BLIP2_BUNDLED_INSTRUCT_VICUNA_DIR;
#else
static const char* const kModelDir = BLIP2_BUNDLED_MODEL_DIR;
#endif

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const auto tok = blip2::load_tokenizer(kModelDir, blip2::load_config(kModelDir));
  const std::string text(reinterpret_cast<const char*>(data), size);
  blip2::fuzz::expect_clean([&] {
    const auto ids = tok->encode(text);
    for (int32_t id : ids)
      if (id < 0 || id >= tok->vocab_size()) std::abort();
    (void)tok->decode(ids);
  });
  // The bytes as ids, most of them within the vocabulary (a few out of it: decoding must skip those).
  std::vector<int32_t> ids(std::min<size_t>(size / 2, 256));  // streaming decodes every prefix: bounded
  for (size_t i = 0; i < ids.size(); ++i) {
    uint16_t v;
    std::memcpy(&v, data + 2 * i, 2);
    ids[i] = v == 0xffff ? -1 : static_cast<int32_t>(v % (tok->vocab_size() + 8));
  }
  blip2::TextStream stream(*tok);
  std::string streamed;
  for (int32_t id : ids) streamed += stream.put(id);
  streamed += stream.end(ids);
  if (streamed != tok->decode(ids)) std::abort();
  return 0;
}
