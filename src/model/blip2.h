// BLIP-2, wired from its parts, with either language model the checkpoint's config names:
//   pixels ─ VisionModel ─ QFormer ─ language projection ─┐
//   prompt ─ tokenizer ─ embedding ───────────────────────┴─ [queries ; prompt] ─┬─ T5 encoder ─ T5 decoder
//                                                                                └─ OPT (prefill, then decode)
#pragma once
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "generate/decoder.h"
#include "generate/generate.h"
#include "io/checkpoint.h"
#include "io/config.h"
#include "model/load_options.h"
#include "model/llama.h"
#include "model/opt.h"
#include "model/qformer.h"
#include "model/t5.h"
#include "model/vision.h"
#include "text/bert_tokenizer.h"
#include "text/token_batch.h"
#include "text/tokenizer.h"

namespace blip2 {

// Prompts of a batch, tokenized and padded with the pad id: on the right for T5, on the left for OPT and
// LLaMA (whose positions come from the mask, so that every prompt ends where generation starts).
struct PromptBatch : TokenBatch {
  // InstructBLIP: the same prompts' BERT ids for the Q-Former, [CLS] … [SEP], right-padded.
  TokenBatch qformer;
};

// Everything the pipeline computes before decoding, by the reference's stage names.
struct Encoded {
  Tensor vision_last_hidden_state;   // [B, T_img, vision hidden]
  TokenBatch qformer_input;          // InstructBLIP: the Q-Former's text ids (qformer_input_ids) and mask
  Tensor qformer_last_hidden_state;  // [B, Q, qformer hidden] (InstructBLIP: the query positions' outputs)
  Tensor language_projection;        // [B, Q, d_lm]
  // The language model's input is [projected queries ; prompt embeddings] under input_mask [B, Q + L];
  // input_ids [B, Q + L] are its ids, the query slots holding image_token_index (or -1 without one).
  std::vector<uint8_t> input_mask;
  std::vector<int32_t> input_ids;
  Tensor encoder_last_hidden_state;  // T5: the encoder over that input [B, Q + L, d_model]
  Tensor inputs_embeds;              // OPT, LLaMA: the input itself [B, Q + L, d_lm], which the decoder runs first
  int64_t batch() const {
    const Tensor& t = language_projection.shape.empty() ? vision_last_hidden_state : language_projection;
    return t.shape.empty() ? 0 : t.dim(0);
  }
};

// Items [begin, end) of a batch's stages (every batch-major field that is set), e.g. to start a decoder for
// some of the prompts encoded together.
Encoded select_items(const Encoded& e, int64_t begin, int64_t end);

class Blip2Model {
 public:
  using Progress = Checkpoint::Progress;
  // Loads and checks a Hugging Face BLIP-2 directory. Throws Error(Model) naming what is wrong.
  explicit Blip2Model(const std::string& model_dir, const Progress& progress = nullptr);
  // The same with load options: the format linear weights are converted to as they load, and the thread
  // count of the kernels (and OpenBLAS) for the whole process.
  Blip2Model(const std::string& model_dir, const LoadOptions& options, const Progress& progress = nullptr);

  const Blip2Config& config() const { return cfg_; }
  // Where the weights are and the stages compute (LoadOptions::device). Encoded's tensors are there too;
  // logits come back to the host.
  Device device() const { return device_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  bool tied_lm_head() const {
    return t5_ ? t5_->tied_lm_head() : opt_ ? opt_->tied_lm_head() : llama_->tied_lm_head();
  }
  int max_prompt_tokens() const { return max_prompt_tokens_; }
  SpecialTokens special_tokens() const { return {cfg_.eos_token_id(), cfg_.pad_token_id()}; }

  PromptBatch tokenize(const std::vector<std::string>& prompts) const;
  // pixels [B,3,S,S] with one prompt per image -> every stage up to the encoder output. The same as
  // encode_prompts(encode_image(pixels), prompts).
  Encoded encode(const Tensor& pixels, const PromptBatch& prompts) const;
  // The image stages that no prompt changes, to reuse with several prompts (chat, the server's cache):
  // vision, Q-Former and language projection for BLIP-2; the vision encoder alone for InstructBLIP, whose
  // Q-Former reads the prompt. The later fields of the result are empty.
  Encoded encode_image(const Tensor& pixels) const;
  // The prompt stage over an image encoding, one prompt per image: (InstructBLIP: the Q-Former over the
  // vision output and the prompt's BERT ids, then the projection) [projected queries ; prompt embeddings],
  // through the T5 encoder (T5) or kept for the decoder's prefill (OPT, LLaMA). The image fields are copied.
  Encoded encode_prompts(const Encoded& image, const PromptBatch& prompts) const;
  // The tensor of encode_image's result that the rest depends on, which image caches keep per image
  // ([1, rows, width]): language_projection, or vision_last_hidden_state for InstructBLIP.
  Tensor& image_state(Encoded& e) const { return cfg_.instruct ? e.vision_last_hidden_state : e.language_projection; }
  const Tensor& image_state(const Encoded& e) const {
    return cfg_.instruct ? e.vision_last_hidden_state : e.language_projection;
  }
  // How many times the image stages have run (encode_image, encode) on this model.
  int64_t image_encodings() const { return image_encodings_.n.load(); }
  // A decoder over the prompt stage's result, `expand` rows per batch item.
  std::unique_ptr<Decoder> start_decoder(const Encoded& enc, int expand = 1) const;
  // OPT, LLaMA: the logits at every input position [B, Q + L, vocab] (Hugging Face's forward pass). Throws
  // Error(Usage) for T5, whose logits come from the decoder.
  Tensor prompt_logits(const Encoded& enc) const;

  // The image stages one by one, for tools that time them separately (blip2 bench): encode_image is
  // ops::linear(qformer_model().forward(vision_model().forward(pixels)), projection_weight(), projection_bias()).
  const VisionModel& vision_model() const { return vision_; }
  const QFormer& qformer_model() const { return qformer_; }
  const Weight& projection_weight() const { return proj_w_; }
  const Weight& projection_bias() const { return proj_b_; }
  // The checkpoint the weights were taken from (Checkpoint::taken_bytes: each tensor's size as loaded).
  const Checkpoint& checkpoint() const { return *ckpt_; }

 private:
  Blip2Config cfg_;
  Device device_ = Device::CPU;
  std::unique_ptr<Checkpoint> ckpt_;  // owns the mappings the weights view
  VisionModel vision_;
  QFormer qformer_;
  Weight proj_w_, proj_b_;
  std::unique_ptr<T5Model> t5_;    // one of these three, as config.json says
  std::unique_ptr<OPTModel> opt_;
  std::unique_ptr<LlamaModel> llama_;
  const CausalLM* causal_ = nullptr;  // opt_ or llama_: the decoder-only language model
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<BertTokenizer> qformer_tokenizer_;  // InstructBLIP: qformer_tokenizer/
  int max_prompt_tokens_ = 512;
  struct Counter {  // copyable, so the model stays copyable and movable
    mutable std::atomic<int64_t> n{0};
    Counter() = default;
    Counter(const Counter& o) : n(o.n.load()) {}
    Counter& operator=(const Counter& o) { n = o.n.load(); return *this; }
  } image_encodings_;
};

}  // namespace blip2
