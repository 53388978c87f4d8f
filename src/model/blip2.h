// BLIP-2 with a Flan-T5 language model, wired from its parts:
//   pixels ─ VisionModel ─ QFormer ─ language projection ─┐
//   prompt ─ tokenizer ─ embedding ───────────────────────┴─ [queries ; prompt] ─ T5 encoder ─ decoder
#pragma once
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "generate/decoder.h"
#include "io/checkpoint.h"
#include "io/config.h"
#include "model/load_options.h"
#include "model/qformer.h"
#include "model/t5.h"
#include "model/vision.h"
#include "text/t5_tokenizer.h"

namespace blip2 {

// Prompts of a batch, tokenized and right-padded with pad id (T5's convention).
struct PromptBatch {
  int64_t batch = 0, length = 0;
  std::vector<int32_t> ids;   // [batch, length]
  std::vector<uint8_t> mask;  // [batch, length], 1 = token
};

// Everything the pipeline computes before decoding, by the reference's stage names.
struct Encoded {
  Tensor vision_last_hidden_state;   // [B, T_img, vision hidden]
  Tensor qformer_last_hidden_state;  // [B, Q, qformer hidden]
  Tensor language_projection;        // [B, Q, d_model]
  Tensor encoder_last_hidden_state;  // [B, Q + L, d_model]
  std::vector<uint8_t> encoder_mask; // [B, Q + L]
};

class Blip2Model {
 public:
  using Progress = Checkpoint::Progress;
  // Loads and checks a Hugging Face BLIP-2 directory. Throws Error(Model) naming what is wrong.
  explicit Blip2Model(const std::string& model_dir, const Progress& progress = nullptr);
  // The same with load options: the format linear weights are converted to as they load, and the thread
  // count of the kernels (and OpenBLAS) for the whole process.
  Blip2Model(const std::string& model_dir, const LoadOptions& options, const Progress& progress = nullptr);

  const Blip2Config& config() const { return cfg_; }
  const T5Tokenizer& tokenizer() const { return tokenizer_; }
  const T5Model& language_model() const { return t5_; }
  int max_prompt_tokens() const { return max_prompt_tokens_; }

  PromptBatch tokenize(const std::vector<std::string>& prompts) const;
  // pixels [B,3,S,S] with one prompt per image -> every stage up to the encoder output. The same as
  // encode_prompts(encode_image(pixels), prompts).
  Encoded encode(const Tensor& pixels, const PromptBatch& prompts) const;
  // The image stages alone (vision, Q-Former, language projection), to reuse with several prompts (chat):
  // the encoder fields of the result are empty.
  Encoded encode_image(const Tensor& pixels) const;
  // The prompt stage over an image encoding: the T5 encoder over [projected queries ; prompt embeddings],
  // one prompt per image. The image fields are copied from `image`.
  Encoded encode_prompts(const Encoded& image, const PromptBatch& prompts) const;
  // How many times the image stages have run (encode_image, encode) on this model.
  int64_t image_encodings() const { return image_encodings_.n.load(); }
  // A decoder ready to take the start token, `expand` rows per batch item.
  std::unique_ptr<Decoder> start_decoder(const Encoded& enc, int expand = 1) const;

 private:
  Blip2Config cfg_;
  std::unique_ptr<Checkpoint> ckpt_;  // owns the mappings the weights view
  VisionModel vision_;
  QFormer qformer_;
  Weight proj_w_, proj_b_;
  T5Model t5_;
  T5Tokenizer tokenizer_;
  int max_prompt_tokens_ = 512;
  struct Counter {  // copyable, so the model stays copyable and movable
    mutable std::atomic<int64_t> n{0};
    Counter() = default;
    Counter(const Counter& o) : n(o.n.load()) {}
    Counter& operator=(const Counter& o) { n = o.n.load(); return *this; }
  } image_encodings_;
};

}  // namespace blip2
