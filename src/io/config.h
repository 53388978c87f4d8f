// Typed model configuration read from a Hugging Face BLIP-2 `config.json` (and `generation_config.json`).
// Absent fields take Hugging Face's defaults (Blip2VisionConfig, Blip2QFormerConfig, T5Config, OPTConfig);
// present fields are range-checked, and every error names the file and the field.
#pragma once
#include <optional>
#include <string>

namespace blip2 {

enum class Activation { GeluErf, GeluTanh, Relu, Silu };  // Silu: LLaMA's SwiGLU gate
const char* activation_name(Activation a);

struct VisionConfig {
  int hidden_size = 1408;
  int intermediate_size = 6144;
  int num_layers = 39;
  int num_heads = 16;
  int image_size = 224;
  int patch_size = 14;
  float layer_norm_eps = 1e-6f;
  Activation act = Activation::GeluErf;
  bool qkv_bias = true;
  int num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
  int num_positions() const { return num_patches() + 1; }
};

struct QFormerConfig {
  int hidden_size = 768;
  int intermediate_size = 3072;
  int num_layers = 12;
  int num_heads = 12;
  int cross_attention_frequency = 2;
  int encoder_hidden_size = 1408;
  float layer_norm_eps = 1e-12f;
  Activation act = Activation::GeluErf;
  // The text input (InstructBLIP, image–text retrieval): the BERT vocabulary and the learned positions.
  int vocab_size = 30522;
  int max_position_embeddings = 512;
};

struct T5Config {
  int vocab_size = 32128;
  int d_model = 512;
  int d_kv = 64;
  int d_ff = 2048;
  int num_layers = 6;
  int num_decoder_layers = 6;
  int num_heads = 8;
  int relative_attention_num_buckets = 32;
  int relative_attention_max_distance = 128;
  float layer_norm_epsilon = 1e-6f;
  bool is_gated_act = false;
  Activation act = Activation::Relu;
  int pad_token_id = 0;
  int eos_token_id = 1;
  int decoder_start_token_id = 0;
  int inner_dim() const { return num_heads * d_kv; }
};

struct OPTConfig {
  int vocab_size = 50272;
  int hidden_size = 768;
  int num_layers = 12;
  int num_heads = 12;
  int ffn_dim = 3072;
  int max_position_embeddings = 2048;  // the table has 2 more rows: OPT's position offset
  int word_embed_proj_dim = 768;       // = hidden_size unless the embedding is narrower (project_in/out)
  bool do_layer_norm_before = true;    // pre-norm blocks (every BLIP-2 OPT); false: post-norm (OPT-350m)
  bool remove_final_layer_norm = false;
  Activation act = Activation::Relu;
  float layer_norm_eps = 1e-5f;        // PyTorch's nn.LayerNorm default; OPT does not configure it
  int pad_token_id = 1;
  int bos_token_id = 2;
  int eos_token_id = 2;
  int head_dim() const { return hidden_size / num_heads; }
  bool has_final_layer_norm() const { return do_layer_norm_before && !remove_final_layer_norm; }
};

// LlamaConfig's fields (Vicuna behind InstructBLIP). Only the plain architecture: SiLU, no biases, no rope
// scaling; anything else is refused by name at parse time.
struct LlamaConfig {
  int vocab_size = 32000;
  int hidden_size = 4096;
  int intermediate_size = 11008;
  int num_layers = 32;
  int num_heads = 32;
  int num_kv_heads = 32;  // LlamaConfig: None means num_attention_heads (no grouping)
  int max_position_embeddings = 2048;
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.0f;
  int bos_token_id = 1;
  int eos_token_id = 2;
  // The hub's Vicuna configs say pad -1 (none); then nothing is padded with it (see Blip2Config::pad_token_id).
  std::optional<int> pad_token_id;
  // text_config.architectures[0]: InstructBLIP's generate() prepends 2 when it is "LLaMAForCausalLM" (the
  // hub's spelling), else bos_token_id. Kept for that documented behaviour.
  std::string architecture;
  int head_dim() const { return hidden_size / num_heads; }
};

// Defaults for generation, from generation_config.json where present (Hugging Face names).
struct GenerationDefaults {
  std::optional<int> max_new_tokens;
  std::optional<int> max_length;
  std::optional<int> eos_token_id;
  std::optional<int> pad_token_id;
  std::optional<int> decoder_start_token_id;
};

// The language model behind the Q-Former: text_config.model_type "t5", "opt" or (InstructBLIP) "llama".
enum class LanguageFamily { T5, OPT, Llama };

// What a checkpoint computes, from config.json's `architectures`: text for an image (captions, answers:
// Blip2ForConditionalGeneration, the default) or image–text retrieval scores and embeddings
// (Blip2ForImageTextRetrieval: no language model).
enum class Blip2Task { Generation, Retrieval };
// "a captioning checkpoint (...): it ...", for errors that tell a user what the checkpoint can do.
std::string task_description(Blip2Task task);

struct Blip2Config {
  Blip2Task task = Blip2Task::Generation;
  VisionConfig vision;
  QFormerConfig qformer;
  // Retrieval: the width of the image and text embeddings (vision_projection, text_projection).
  int image_text_hidden_size = 256;
  LanguageFamily family = LanguageFamily::T5;
  T5Config text;  // when family is T5
  OPTConfig opt;  // when family is OPT
  LlamaConfig llama;  // when family is Llama
  // model_type "instructblip": the Q-Former also reads the prompt (its BERT ids), so its output depends on it.
  bool instruct = false;
  int num_query_tokens = 32;
  // Newer hub configs: prompts carry num_query_tokens copies of this id, whose embeddings the projected
  // queries replace.
  std::optional<int> image_token_index;
  GenerationDefaults generation;

  // What the rest of the pipeline needs to know of the language model, whichever it is. lm_width is the
  // width of its input embeddings, which the projected queries join (OPT: word_embed_proj_dim; Hugging
  // Face sizes the projection by hidden_size, the same number in every BLIP-2 checkpoint).
  int lm_width() const {
    return family == LanguageFamily::T5 ? text.d_model : family == LanguageFamily::OPT ? opt.word_embed_proj_dim
                                                                                         : llama.hidden_size;
  }
  // The width of its residual stream (d_model / hidden_size) and of its feed-forward's hidden layer.
  int lm_hidden_size() const {
    return family == LanguageFamily::T5 ? text.d_model : family == LanguageFamily::OPT ? opt.hidden_size
                                                                                         : llama.hidden_size;
  }
  int lm_ffn_size() const {
    return family == LanguageFamily::T5 ? text.d_ff : family == LanguageFamily::OPT ? opt.ffn_dim
                                                                                      : llama.intermediate_size;
  }
  int lm_vocab_size() const {
    return family == LanguageFamily::T5 ? text.vocab_size : family == LanguageFamily::OPT ? opt.vocab_size
                                                                                            : llama.vocab_size;
  }
  // Generation stops at this id: for Vicuna text_config's (1, `<s>`), not the tokenizer's `</s>`, as
  // transformers does (the fixture README's quirks).
  int eos_token_id() const {
    return family == LanguageFamily::T5 ? text.eos_token_id : family == LanguageFamily::OPT ? opt.eos_token_id
                                                                                              : llama.eos_token_id;
  }
  // The id finished rows are fed. LLaMA configs without one (pad -1) feed the eos id instead: those rows'
  // logits are never used, and -1 is no row of the embedding (transformers #25426 crashes on it).
  int pad_token_id() const {
    return family == LanguageFamily::T5 ? text.pad_token_id : family == LanguageFamily::OPT ? opt.pad_token_id
                                                        : llama.pad_token_id.value_or(llama.eos_token_id);
  }
};

// Reads <dir>/config.json and, if present, <dir>/generation_config.json. Throws Error(Model).
Blip2Config load_config(const std::string& model_dir);
// Parses config.json text (used by load_config and by tests); `source` names it in errors.
Blip2Config parse_config(const std::string& json_text, const std::string& source);

}  // namespace blip2
