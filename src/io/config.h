// Typed model configuration read from a Hugging Face BLIP-2 `config.json` (and `generation_config.json`).
// Absent fields take Hugging Face's defaults (Blip2VisionConfig, Blip2QFormerConfig, T5Config); present
// fields are range-checked, and every error names the file and the field.
#pragma once
#include <optional>
#include <string>

namespace blip2 {

enum class Activation { GeluErf, GeluTanh, Relu };
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

// Defaults for generation, from generation_config.json where present (Hugging Face names).
struct GenerationDefaults {
  std::optional<int> max_new_tokens;
  std::optional<int> max_length;
  std::optional<int> eos_token_id;
  std::optional<int> pad_token_id;
  std::optional<int> decoder_start_token_id;
};

struct Blip2Config {
  VisionConfig vision;
  QFormerConfig qformer;
  T5Config text;
  int num_query_tokens = 32;
  std::optional<int> image_token_index;
  GenerationDefaults generation;
};

// Reads <dir>/config.json and, if present, <dir>/generation_config.json. Throws Error(Model).
Blip2Config load_config(const std::string& model_dir);
// Parses config.json text (used by load_config and by tests); `source` names it in errors.
Blip2Config parse_config(const std::string& json_text, const std::string& source);

}  // namespace blip2
