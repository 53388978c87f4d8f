#include "text/tokenizer.h"

#include "text/bpe_tokenizer.h"
#include "text/llama_tokenizer.h"
#include "text/t5_tokenizer.h"

namespace blip2 {

namespace {

// OPT's prompts start with the BOS id (2, "</s>"), as its tokenizer adds it (add_bos_token).
class OPTTokenizer final : public Tokenizer {
 public:
  OPTTokenizer(BpeTokenizer bpe, int32_t bos) : bpe_(std::move(bpe)), bos_(bos) {}
  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int32_t> ids{bos_};
    const std::vector<int32_t> rest = bpe_.encode(text);
    ids.insert(ids.end(), rest.begin(), rest.end());
    return ids;
  }
  std::string decode(const std::vector<int32_t>& ids) const override { return bpe_.decode(ids, true); }
  std::string decode_stable(const std::vector<int32_t>& ids) const override { return bpe_.decode_stable(ids, true); }
  int vocab_size() const override { return bpe_.vocab_size(); }

 private:
  BpeTokenizer bpe_;
  int32_t bos_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir, const Blip2Config& cfg) {
  if (cfg.family == LanguageFamily::Llama) return std::make_unique<LlamaTokenizer>(dir);
  if (cfg.family == LanguageFamily::OPT) return std::make_unique<OPTTokenizer>(BpeTokenizer::load(dir), cfg.opt.bos_token_id);
  return std::make_unique<T5Tokenizer>(dir, cfg.text.eos_token_id);
}

}  // namespace blip2
