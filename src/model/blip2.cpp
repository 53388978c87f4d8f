#include "model/blip2.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "ops/ops.h"
#include "ops/parallel.h"

namespace blip2 {

namespace {

// The tokenizer's model_max_length bounds the prompt, as the reference's tokenizer warns beyond it.
int read_max_prompt_tokens(const std::string& dir) {
  const auto path = std::filesystem::path(dir) / "tokenizer_config.json";
  std::ifstream in(path);
  if (!in) return 512;
  const auto j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_object() && j.contains("model_max_length") && j["model_max_length"].is_number_integer()) {
    const int64_t n = j["model_max_length"].get<int64_t>();
    if (n > 0 && n <= (1 << 20)) return static_cast<int>(n);
  }
  return 512;
}

// Sets the thread count, then opens the checkpoint with the options' weight conversion, so that every
// tensor the parts take arrives in its final format.
std::unique_ptr<Checkpoint> open_checkpoint(const std::string& dir, const LoadOptions& options,
                                            const Checkpoint::Progress& progress) {
  par::set_threads(options.threads);
  auto ck = std::make_unique<Checkpoint>(dir, progress);
  ck->set_convert(weight_converter(options, !ck->has("language_model.lm_head.weight")));
  return ck;
}

}  // namespace

// Members are built in declaration order, each from the shared checkpoint, which checks every tensor.
Blip2Model::Blip2Model(const std::string& dir, const Progress& progress) : Blip2Model(dir, LoadOptions{}, progress) {}

Blip2Model::Blip2Model(const std::string& dir, const LoadOptions& options, const Progress& progress)
    : cfg_(load_config(dir)),
      ckpt_(open_checkpoint(dir, options, progress)),
      vision_(*ckpt_, cfg_.vision),
      qformer_(*ckpt_, cfg_.qformer, cfg_.num_query_tokens),
      proj_w_(ckpt_->take("language_projection.weight", {cfg_.text.d_model, cfg_.qformer.hidden_size})),
      proj_b_(ckpt_->take("language_projection.bias", {cfg_.text.d_model})),
      t5_(*ckpt_, cfg_.text),
      tokenizer_(dir, cfg_.text.eos_token_id),
      max_prompt_tokens_(read_max_prompt_tokens(dir)) {
  ckpt_->check_all_used();
  if (tokenizer_.vocab_size() > cfg_.text.vocab_size)
    fail(ErrorKind::Model, dir + ": tokenizer has " + std::to_string(tokenizer_.vocab_size()) +
                               " ids but the model's vocabulary has only " + std::to_string(cfg_.text.vocab_size));
}

PromptBatch Blip2Model::tokenize(const std::vector<std::string>& prompts) const {
  if (prompts.empty()) fail(ErrorKind::Usage, "no prompts given");
  std::vector<std::vector<int32_t>> all;
  PromptBatch p;
  p.batch = static_cast<int64_t>(prompts.size());
  for (const auto& text : prompts) {
    all.push_back(tokenizer_.encode(text));
    const int64_t n = static_cast<int64_t>(all.back().size());
    if (n > max_prompt_tokens_)
      fail(ErrorKind::Input, "prompt is too long: " + std::to_string(n) + " tokens, the model takes at most " +
                                 std::to_string(max_prompt_tokens_));
    p.length = std::max(p.length, n);
  }
  p.ids.assign(static_cast<size_t>(p.batch * p.length), cfg_.text.pad_token_id);
  p.mask.assign(p.ids.size(), 0);
  for (int64_t b = 0; b < p.batch; ++b)
    for (size_t i = 0; i < all[b].size(); ++i) {
      p.ids[b * p.length + i] = all[b][i];
      p.mask[b * p.length + i] = 1;
    }
  return p;
}

Encoded Blip2Model::encode(const Tensor& pixels, const PromptBatch& prompts) const {
  if (!pixels.shape.empty() && prompts.batch != pixels.dim(0))
    fail(ErrorKind::Usage, "each image needs exactly one prompt");
  return encode_prompts(encode_image(pixels), prompts);
}

Encoded Blip2Model::encode_image(const Tensor& pixels) const {
  const int S = cfg_.vision.image_size;
  const int64_t B = pixels.shape.empty() ? 0 : pixels.dim(0);
  if (pixels.shape != Shape{B, 3, S, S} || B < 1)
    fail(ErrorKind::Input, "pixel tensor has shape " + shape_str(pixels.shape) + ", the model takes " +
                               shape_str({std::max<int64_t>(B, 1), 3, S, S}));
  ++image_encodings_.n;
  Encoded e;
  e.vision_last_hidden_state = vision_.forward(pixels);
  e.qformer_last_hidden_state = qformer_.forward(e.vision_last_hidden_state);
  e.language_projection = ops::linear(e.qformer_last_hidden_state, proj_w_, proj_b_);
  return e;
}

Encoded Blip2Model::encode_prompts(const Encoded& image, const PromptBatch& prompts) const {
  const Tensor& proj = image.language_projection;
  const int64_t Q = cfg_.num_query_tokens, L = prompts.length, d = cfg_.text.d_model;
  const int64_t B = proj.shape.empty() ? 0 : proj.dim(0);
  if (proj.shape != Shape{B, Q, d} || B < 1)
    fail(ErrorKind::Internal, "encode_prompts: language projection has shape " + shape_str(proj.shape));
  if (prompts.batch != B) fail(ErrorKind::Usage, "each image needs exactly one prompt");
  Encoded e;
  e.vision_last_hidden_state = image.vision_last_hidden_state;
  e.qformer_last_hidden_state = image.qformer_last_hidden_state;
  e.language_projection = proj;

  // Encoder input: [projected queries ; prompt embeddings], mask [ones ; prompt mask].
  Tensor x({B, Q + L, d});
  e.encoder_mask.assign(static_cast<size_t>(B * (Q + L)), 1);
  for (int64_t b = 0; b < B; ++b) {
    float* xb = x.ptr() + b * (Q + L) * d;
    std::memcpy(xb, proj.ptr() + b * Q * d, static_cast<size_t>(Q * d) * 4);
    t5_.embed(prompts.ids.data() + b * L, L, xb + Q * d);
    std::memcpy(e.encoder_mask.data() + b * (Q + L) + Q, prompts.mask.data() + b * L, static_cast<size_t>(L));
  }
  e.encoder_last_hidden_state = t5_.encode(std::move(x), e.encoder_mask);
  return e;
}

std::unique_ptr<Decoder> Blip2Model::start_decoder(const Encoded& enc, int expand) const {
  return t5_.start_decoder(enc.encoder_last_hidden_state, enc.encoder_mask, expand);
}

}  // namespace blip2
