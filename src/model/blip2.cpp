#include "model/blip2.h"

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file.h"
#include "ops/ops.h"

namespace blip2 {

namespace {

// The longest prompt: the tokenizer's model_max_length (the reference's tokenizer warns beyond it), and for
// OPT also what its learned positions leave after the query slots and one generated token.
int read_max_prompt_tokens(const std::string& dir, const Blip2Config& cfg) {
  int n = 512;  // T5's model_max_length
  if (cfg.family == LanguageFamily::OPT)
    n = std::max(1, cfg.opt.max_position_embeddings - cfg.num_query_tokens - 1);
  if (cfg.family == LanguageFamily::Llama)  // rotary positions have no table, but the model knows this many
    n = std::max(1, cfg.llama.max_position_embeddings - cfg.num_query_tokens - 1);
  const auto path = std::filesystem::path(dir) / "tokenizer_config.json";
  if (!std::filesystem::exists(path)) return n;
  const auto j =
      nlohmann::json::parse(read_file(path.string(), kMaxConfigFileBytes, ErrorKind::Model, "config file"), nullptr, false);
  if (j.is_object() && j.contains("model_max_length") && j["model_max_length"].is_number_integer()) {
    const int64_t m = j["model_max_length"].get<int64_t>();
    if (m > 0 && m <= (1 << 20)) return cfg.family != LanguageFamily::T5 ? std::min<int>(n, static_cast<int>(m))
                                                                          : static_cast<int>(m);
  }
  return n;
}

// The config of a checkpoint that generates text; a retrieval one is refused with what it can do instead.
Blip2Config generation_config(const std::string& dir) {
  Blip2Config c = load_config(dir);
  if (c.task != Blip2Task::Generation) fail(ErrorKind::Model, dir + ": " + task_description(c.task));
  return c;
}

}  // namespace

// Members are built in declaration order, each from the shared checkpoint, which checks every tensor.
Blip2Model::Blip2Model(const std::string& dir, const Progress& progress) : Blip2Model(dir, LoadOptions{}, progress) {}

Blip2Model::Blip2Model(const std::string& dir, const LoadOptions& options, const Progress& progress)
    : cfg_(generation_config(dir)),
      device_(options.device.kind),
      ckpt_(open_checkpoint(dir, options, cfg_.family, progress)),
      vision_(*ckpt_, cfg_.vision),
      qformer_(*ckpt_, cfg_.qformer, cfg_.num_query_tokens,
               cfg_.instruct ? QFormerNames::instructblip() : QFormerNames::blip2()),
      proj_w_(ckpt_->take("language_projection.weight", {cfg_.lm_width(), cfg_.qformer.hidden_size})),
      proj_b_(ckpt_->take("language_projection.bias", {cfg_.lm_width()})),
      tokenizer_(load_tokenizer(dir, cfg_)),
      max_prompt_tokens_(read_max_prompt_tokens(dir, cfg_)) {
  if (cfg_.family == LanguageFamily::T5) {
    t5_ = std::make_unique<T5Model>(*ckpt_, cfg_.text);
  } else if (cfg_.family == LanguageFamily::OPT) {
    opt_ = std::make_unique<OPTModel>(*ckpt_, cfg_.opt);
    causal_ = opt_.get();
  } else {
    llama_ = std::make_unique<LlamaModel>(*ckpt_, cfg_.llama);
    causal_ = llama_.get();
  }
  ckpt_->check_all_used();
  if (cfg_.instruct) {
    const std::string qdir = (std::filesystem::path(dir) / "qformer_tokenizer").string();
    if (!std::filesystem::is_directory(qdir))
      fail(ErrorKind::Model, qdir + ": missing (InstructBLIP's Q-Former tokenizer: vocab.txt and its configs)");
    qformer_tokenizer_ = std::make_unique<BertTokenizer>(BertTokenizer::load(qdir));
    if (qformer_tokenizer_->vocab_size() > cfg_.qformer.vocab_size)
      fail(ErrorKind::Model, qdir + ": tokenizer has " + std::to_string(qformer_tokenizer_->vocab_size()) +
                                 " ids but the Q-Former's vocabulary has only " + std::to_string(cfg_.qformer.vocab_size));
  }
  if (tokenizer_->vocab_size() > cfg_.lm_vocab_size())
    fail(ErrorKind::Model, dir + ": tokenizer has " + std::to_string(tokenizer_->vocab_size()) +
                               " ids but the model's vocabulary has only " + std::to_string(cfg_.lm_vocab_size()));
}

PromptBatch Blip2Model::tokenize(const std::vector<std::string>& prompts) const {
  if (prompts.empty()) fail(ErrorKind::Usage, "no prompts given");
  std::vector<std::vector<int32_t>> all;
  PromptBatch p;
  p.batch = static_cast<int64_t>(prompts.size());
  for (const auto& text : prompts) {
    all.push_back(tokenizer_->encode(text));
    const int64_t n = static_cast<int64_t>(all.back().size());
    if (n > max_prompt_tokens_)
      fail(ErrorKind::Input, "prompt is too long: " + std::to_string(n) + " tokens, the model takes at most " +
                                 std::to_string(max_prompt_tokens_));
    p.length = std::max(p.length, n);
  }
  p.ids.assign(static_cast<size_t>(p.batch * p.length), tokenizer_->prompt_pad_id().value_or(cfg_.pad_token_id()));
  p.mask.assign(p.ids.size(), 0);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t n = static_cast<int64_t>(all[b].size());
    const int64_t first = causal_ ? p.length - n : 0;  // decoder-only models pad on the left
    for (int64_t i = 0; i < n; ++i) {
      p.ids[b * p.length + first + i] = all[b][i];
      p.mask[b * p.length + first + i] = 1;
    }
  }
  // The Q-Former's own tokenization of the same prompts. The processor does not truncate, but the Q-Former
  // has max_position_embeddings positions: a longer prompt loses its start (the tokenizer's truncation side,
  // left on the hub), where the language model still reads it all.
  if (qformer_tokenizer_) p.qformer = qformer_tokenizer_->encode_batch(prompts, qformer_.max_text_tokens());
  return p;
}

Encoded Blip2Model::encode(const Tensor& pixels, const PromptBatch& prompts) const {
  if (!pixels.shape.empty() && prompts.batch != pixels.dim(0))
    fail(ErrorKind::Usage, "each image needs exactly one prompt");
  return encode_prompts(encode_image(pixels), prompts);
}

Encoded Blip2Model::encode_image(const Tensor& pixels) const {
  Encoded e;
  e.vision_last_hidden_state = vision_.forward(pixels);
  ++image_encodings_.n;
  if (cfg_.instruct) return e;  // the Q-Former needs the prompt: encode_prompts runs it
  e.qformer_last_hidden_state = qformer_.forward(e.vision_last_hidden_state);
  e.language_projection = ops::linear(e.qformer_last_hidden_state, proj_w_, proj_b_);
  return e;
}

Encoded Blip2Model::encode_prompts(const Encoded& image, const PromptBatch& prompts) const {
  const int64_t Q = cfg_.num_query_tokens, L = prompts.length, d = cfg_.lm_width(), T = Q + L;
  const int64_t B = image.batch();
  if (prompts.batch != B) fail(ErrorKind::Usage, "each image needs exactly one prompt");
  Encoded e;
  e.vision_last_hidden_state = image.vision_last_hidden_state;
  if (cfg_.instruct) {
    // The Q-Former over [queries ; the prompt's BERT ids]; only the query positions go on.
    const Tensor& v = image.vision_last_hidden_state;
    if (v.shape.size() != 3 || B < 1 || prompts.qformer.batch != B)
      fail(ErrorKind::Internal, "encode_prompts: vision output " + shape_str(v.shape) + " with " +
                                    std::to_string(prompts.qformer.batch) + " Q-Former prompts");
    e.qformer_input = prompts.qformer;
    const Tensor all = qformer_.forward(v, prompts.qformer);  // [B, Q + Lq, dq]
    const int64_t per = all.dim(1);
    e.qformer_last_hidden_state = Tensor({B, Q, all.dim(2)}, all.device);
    for (int64_t b = 0; b < B; ++b) ops::copy_rows(all, b * per, e.qformer_last_hidden_state, b * Q, Q);
    e.language_projection = ops::linear(e.qformer_last_hidden_state, proj_w_, proj_b_);
  } else {
    e.qformer_last_hidden_state = image.qformer_last_hidden_state;
    e.language_projection = image.language_projection;
  }
  const Tensor& proj = e.language_projection;
  if (proj.shape != Shape{B, Q, d} || B < 1)
    fail(ErrorKind::Internal, "encode_prompts: language projection has shape " + shape_str(proj.shape));

  // Input: [projected queries ; prompt embeddings], mask [ones ; prompt mask]. The query slots' ids are the
  // image token where the config has one: Hugging Face's newer processors put them in input_ids, and the
  // model swaps their embeddings for the queries (the same numbers as this legacy layout).
  const int32_t image_id = cfg_.image_token_index.value_or(-1);
  Tensor x({B, T, d}, device_);
  e.input_mask.assign(static_cast<size_t>(B * T), 1);
  e.input_ids.assign(static_cast<size_t>(B * T), image_id);
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* ids = prompts.ids.data() + b * L;
    if (image_id >= 0 && std::find(ids, ids + L, image_id) != ids + L)
      fail(ErrorKind::Input, "the prompt contains the image token (id " + std::to_string(image_id) +
                                 "): the image's place is set by the model, not by the prompt");
    ops::copy_rows(proj, b * Q, x, b * T, Q);
    float* prompt_rows = x.data_ptr() + (b * T + Q) * d;
    if (t5_) t5_->embed(ids, L, prompt_rows);
    else causal_->embed(ids, L, prompt_rows);
    std::memcpy(e.input_mask.data() + b * T + Q, prompts.mask.data() + b * L, static_cast<size_t>(L));
    std::copy(ids, ids + L, e.input_ids.begin() + b * T + Q);
  }
  if (t5_) e.encoder_last_hidden_state = t5_->encode(std::move(x), e.input_mask);
  else e.inputs_embeds = std::move(x);
  return e;
}

Encoded select_items(const Encoded& e, int64_t begin, int64_t end) {
  const int64_t B = e.batch();
  if (begin < 0 || end > B || begin >= end)
    fail(ErrorKind::Internal, "select_items: [" + std::to_string(begin) + ", " + std::to_string(end) + ") of " +
                                  std::to_string(B) + " items");
  const auto rows = [&](const Tensor& t) {
    if (t.shape.empty()) return Tensor();
    Shape s = t.shape;
    const int64_t per = t.rows() / s[0];  // rows per item
    s[0] = end - begin;
    Tensor out(s, t.device);
    ops::copy_rows(t, begin * per, out, 0, (end - begin) * per);
    return out;
  };
  const auto part = [&](const auto& v) {
    using V = std::decay_t<decltype(v)>;
    if (v.empty()) return V();
    const int64_t per = static_cast<int64_t>(v.size()) / B;
    return V(v.begin() + begin * per, v.begin() + end * per);
  };
  Encoded out;
  out.vision_last_hidden_state = rows(e.vision_last_hidden_state);
  if (e.qformer_input.batch > 0) {
    const int64_t L = e.qformer_input.length;
    out.qformer_input = {end - begin, L,
                         std::vector<int32_t>(e.qformer_input.ids.begin() + begin * L, e.qformer_input.ids.begin() + end * L),
                         std::vector<uint8_t>(e.qformer_input.mask.begin() + begin * L, e.qformer_input.mask.begin() + end * L)};
  }
  out.qformer_last_hidden_state = rows(e.qformer_last_hidden_state);
  out.language_projection = rows(e.language_projection);
  out.input_mask = part(e.input_mask);
  out.input_ids = part(e.input_ids);
  out.encoder_last_hidden_state = rows(e.encoder_last_hidden_state);
  out.inputs_embeds = rows(e.inputs_embeds);
  return out;
}

std::unique_ptr<Decoder> Blip2Model::start_decoder(const Encoded& enc, int expand) const {
  if (t5_) return t5_->start_decoder(enc.encoder_last_hidden_state, enc.input_mask, expand);
  // OPT's logits processors see the ids it was given: the prompt with its padding, and the image tokens
  // when the config has them (Hugging Face passes input_ids to generate for decoder-only models).
  // InstructBLIP (4.44) passes only inputs_embeds to the language model's generate(), whose input_ids are
  // then empty: the processors see the generated tokens alone.
  const int64_t B = enc.inputs_embeds.dim(0), T = enc.inputs_embeds.dim(1), Q = cfg_.num_query_tokens;
  const int64_t from = cfg_.image_token_index ? 0 : Q;
  std::vector<std::vector<int32_t>> prefix(static_cast<size_t>(B));
  if (!cfg_.instruct)
    for (int64_t b = 0; b < B; ++b)
      prefix[b].assign(enc.input_ids.begin() + b * T + from, enc.input_ids.begin() + (b + 1) * T);
  return start_causal_decoder(*causal_, enc.inputs_embeds, enc.input_mask, std::move(prefix), expand);
}

Tensor Blip2Model::prompt_logits(const Encoded& enc) const {
  if (!causal_)
    fail(ErrorKind::Usage, "prompt logits are for decoder-only language models (OPT, LLaMA); T5's come from its decoder");
  return causal_->logits(enc.inputs_embeds, enc.input_mask);
}

}  // namespace blip2
