#include "io/config.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file.h"

namespace blip2 {

using nlohmann::json;

const char* activation_name(Activation a) {
  switch (a) {
    case Activation::GeluErf: return "gelu";
    case Activation::GeluTanh: return "gelu_new";
    case Activation::Relu: return "relu";
    case Activation::Silu: return "silu";
  }
  return "?";
}

std::string task_description(Blip2Task task) {
  if (task == Blip2Task::Retrieval)
    return "this is an image-text retrieval checkpoint (Blip2ForImageTextRetrieval, no language model): it "
           "computes match scores and embeddings (blip2 match, blip2 embed, /v1/embeddings), not text";
  return "this is a captioning checkpoint (Blip2ForConditionalGeneration): it generates text (blip2 caption, "
         "generate, ask, chat, serve), it has no image-text matching head or embedding projections";
}

namespace {

// Reads fields of one JSON object, with the object's path for messages ("config.json: text_config.d_model").
class Fields {
 public:
  // `prefix` comes before each key in messages: "config.json: " at the top, "config.json: text_config." below.
  Fields(const json& obj, std::string prefix) : obj_(obj), prefix_(std::move(prefix)) {}

  [[noreturn]] void bad(const std::string& key, const std::string& why) const {
    fail(ErrorKind::Model, prefix_ + key + " " + why);
  }
  bool has(const std::string& key) const { return obj_.contains(key) && !obj_[key].is_null(); }

  // A positive integer no larger than `max` (sizes: anything larger is surely a corrupt config).
  void count(const std::string& key, int& out, int max = 1 << 20, int min = 1) const {
    if (!has(key)) return;
    const json& v = obj_[key];
    if (!v.is_number_integer()) bad(key, "must be an integer, got " + v.dump());
    // (an unsigned value past INT64_MAX must not wrap around into range or print as negative)
    const bool huge = v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(max);
    const int64_t n = huge ? int64_t(max) + 1 : v.get<int64_t>();
    if (n < min || n > max)
      bad(key, "= " + v.dump() + " is out of range [" + std::to_string(min) + ", " + std::to_string(max) + "]");
    out = static_cast<int>(n);
  }
  void epsilon(const std::string& key, float& out) const {
    if (!has(key)) return;
    const json& v = obj_[key];
    if (!v.is_number()) bad(key, "must be a number, got " + v.dump());
    const double e = v.get<double>();
    if (!(e > 0.0 && e < 1.0)) bad(key, "= " + v.dump() + " must lie in (0, 1)");
    out = static_cast<float>(e);
  }
  // A positive finite number (rotary base, …).
  void positive(const std::string& key, float& out) const {
    if (!has(key)) return;
    const json& v = obj_[key];
    if (!v.is_number()) bad(key, "must be a number, got " + v.dump());
    const double x = v.get<double>();
    if (!(x > 0.0 && x < 1e30)) bad(key, "= " + v.dump() + " must be positive");
    out = static_cast<float>(x);
  }
  void flag(const std::string& key, bool& out) const {
    if (!has(key)) return;
    if (!obj_[key].is_boolean()) bad(key, "must be true or false, got " + obj_[key].dump());
    out = obj_[key].get<bool>();
  }
  // The first string of a list of strings (architectures).
  std::optional<std::string> array_text(const std::string& key) const {
    if (!has(key)) return std::nullopt;
    const json& v = obj_[key];
    if (!v.is_array() || v.empty() || !v[0].is_string()) bad(key, "must be a list of strings, got " + v.dump());
    return v[0].get<std::string>();
  }
  std::optional<std::string> text(const std::string& key) const {
    if (!has(key)) return std::nullopt;
    if (!obj_[key].is_string()) bad(key, "must be a string, got " + obj_[key].dump());
    return obj_[key].get<std::string>();
  }
  void activation(const std::string& key, Activation& out) const {
    if (auto s = text(key)) out = parse_activation(key, *s);
  }
  Activation parse_activation(const std::string& key, const std::string& s) const {
    if (s == "gelu") return Activation::GeluErf;
    if (s == "gelu_new" || s == "gelu_pytorch_tanh" || s == "gelu_fast") return Activation::GeluTanh;
    if (s == "relu") return Activation::Relu;
    bad(key, "= \"" + s + "\" is not a supported activation (gelu, gelu_new, gelu_pytorch_tanh, relu)");
  }
  void token_id(const std::string& key, int& out) const { count(key, out, 1 << 30, 0); }
  void token_id(const std::string& key, std::optional<int>& out) const {
    if (!has(key)) return;
    int v = 0;
    const json& j = obj_[key];
    // generation_config may hold a list of end ids; the first is the one the model emits
    if (j.is_array()) {
      if (j.empty() || !j[0].is_number_integer()) bad(key, "must be an integer or a list of integers");
      const int64_t first = j[0].get<int64_t>();
      if (first < 0 || first > (1 << 30)) bad(key, "= " + j.dump() + " holds an id out of range [0, 1073741824]");
      v = static_cast<int>(first);
    } else {
      count(key, v, 1 << 30, 0);
    }
    out = v;
  }
  Fields sub(const std::string& key) const {
    static const json empty = json::object();
    if (!has(key)) return Fields(empty, prefix_ + key + ".");
    if (!obj_[key].is_object()) bad(key, "must be an object");
    return Fields(obj_[key], prefix_ + key + ".");
  }

 private:
  const json& obj_;
  std::string prefix_;
};

void check_divisible(const std::string& where, int a, const char* an, int b, const char* bn) {
  if (a % b != 0)
    fail(ErrorKind::Model, where + ": " + an + " (" + std::to_string(a) + ") must be divisible by " + bn +
                               " (" + std::to_string(b) + ")");
}

void check_special_ids(std::initializer_list<int> ids, int vocab_size, const std::string& where) {
  for (int id : ids)
    if (id >= vocab_size)
      fail(ErrorKind::Model, where + " special token id " + std::to_string(id) + " is outside the vocabulary (" +
                                 std::to_string(vocab_size) + ")");
}

json parse_json(const std::string& text, const std::string& source) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded()) fail(ErrorKind::Model, source + ": not valid JSON");
  if (!j.is_object()) fail(ErrorKind::Model, source + ": expected a JSON object");
  return j;
}

std::string read_text(const std::string& path) {
  if (!std::filesystem::exists(path)) fail(ErrorKind::Model, path + ": cannot open (is this a BLIP-2 model directory?)");
  return read_file(path, kMaxConfigFileBytes, ErrorKind::Model, "config file");
}

void parse_t5(const Fields& t, T5Config& tc, const std::string& where) {
  t.count("vocab_size", tc.vocab_size, 1 << 24);
  t.count("d_model", tc.d_model);
  t.count("d_kv", tc.d_kv, 1 << 16);
  t.count("d_ff", tc.d_ff);
  t.count("num_layers", tc.num_layers, 1024);
  tc.num_decoder_layers = tc.num_layers;  // T5Config: defaults to num_layers
  t.count("num_decoder_layers", tc.num_decoder_layers, 1024);
  t.count("num_heads", tc.num_heads, 4096);
  // t5_relative_bucket gives each direction num_buckets / 2 buckets, half of them exact: the encoder needs
  // num_buckets >= 4 for an exact bucket, and the logarithmic buckets index the table in range only when
  // max_distance exceeds the exact ones (num_buckets / 2 for the decoder, which counts one direction);
  // otherwise the log is zero or negative and the bucket index lands before the table.
  t.count("relative_attention_num_buckets", tc.relative_attention_num_buckets, 1 << 16, 4);
  t.count("relative_attention_max_distance", tc.relative_attention_max_distance, 1 << 24);
  if (tc.relative_attention_max_distance <= tc.relative_attention_num_buckets / 2)
    t.bad("relative_attention_max_distance", "= " + std::to_string(tc.relative_attention_max_distance) +
                                                 " must be greater than half of relative_attention_num_buckets (" +
                                                 std::to_string(tc.relative_attention_num_buckets) + ")");
  t.epsilon("layer_norm_epsilon", tc.layer_norm_epsilon);
  // T5Config: feed_forward_proj "gated-ACT" or "ACT"; "gated-gelu" means gelu_new for backward
  // compatibility, but an explicit dense_act_fn (BLIP-2 stores "gelu") wins.
  const std::string ffp = t.text("feed_forward_proj").value_or("relu");
  const bool gated = ffp.rfind("gated-", 0) == 0;
  const std::string act = gated ? ffp.substr(6) : ffp;
  tc.is_gated_act = gated;
  tc.act = (ffp == "gated-gelu") ? Activation::GeluTanh : t.parse_activation("feed_forward_proj", act);
  t.activation("dense_act_fn", tc.act);
  t.flag("is_gated_act", tc.is_gated_act);
  t.token_id("pad_token_id", tc.pad_token_id);
  t.token_id("eos_token_id", tc.eos_token_id);
  t.token_id("decoder_start_token_id", tc.decoder_start_token_id);
  check_special_ids({tc.pad_token_id, tc.eos_token_id, tc.decoder_start_token_id}, tc.vocab_size, where);
}

// OPTConfig's fields. Variants no BLIP-2 checkpoint uses (no biases, LayerNorms without weights) are
// refused by name rather than run wrongly.
void parse_opt(const Fields& t, OPTConfig& oc, const std::string& where) {
  t.count("vocab_size", oc.vocab_size, 1 << 24);
  t.count("hidden_size", oc.hidden_size);
  t.count("num_hidden_layers", oc.num_layers, 1024);
  t.count("num_attention_heads", oc.num_heads, 4096);
  t.count("ffn_dim", oc.ffn_dim);
  t.count("max_position_embeddings", oc.max_position_embeddings, 1 << 20);
  oc.word_embed_proj_dim = oc.hidden_size;  // OPTConfig: None means hidden_size
  t.count("word_embed_proj_dim", oc.word_embed_proj_dim);
  t.flag("do_layer_norm_before", oc.do_layer_norm_before);
  t.flag("_remove_final_layer_norm", oc.remove_final_layer_norm);
  t.activation("activation_function", oc.act);
  for (const char* key : {"enable_bias", "layer_norm_elementwise_affine"}) {
    bool on = true;
    t.flag(key, on);
    if (!on) t.bad(key, "= false is not supported (no BLIP-2 checkpoint uses it)");
  }
  t.token_id("pad_token_id", oc.pad_token_id);
  t.token_id("bos_token_id", oc.bos_token_id);
  t.token_id("eos_token_id", oc.eos_token_id);
  check_divisible(where, oc.hidden_size, "hidden_size", oc.num_heads, "num_attention_heads");
  check_special_ids({oc.pad_token_id, oc.bos_token_id, oc.eos_token_id}, oc.vocab_size, where);
}

// LlamaConfig's fields (InstructBLIP's Vicuna). Variants the engine does not implement (biases, rope
// scaling, another activation) are refused by name rather than run wrongly.
void parse_llama(const Fields& t, LlamaConfig& lc, const std::string& where) {
  t.count("vocab_size", lc.vocab_size, 1 << 24);
  t.count("hidden_size", lc.hidden_size);
  t.count("intermediate_size", lc.intermediate_size);
  t.count("num_hidden_layers", lc.num_layers, 1024);
  t.count("num_attention_heads", lc.num_heads, 4096);
  lc.num_kv_heads = lc.num_heads;  // LlamaConfig: None means num_attention_heads
  t.count("num_key_value_heads", lc.num_kv_heads, 4096);
  t.count("max_position_embeddings", lc.max_position_embeddings, 1 << 24);
  t.epsilon("rms_norm_eps", lc.rms_norm_eps);
  t.positive("rope_theta", lc.rope_theta);
  if (auto act = t.text("hidden_act"); act && *act != "silu")
    t.bad("hidden_act", "= \"" + *act + "\" is not supported (LLaMA's feed-forward is SwiGLU: \"silu\")");
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    bool on = false;
    t.flag(key, on);
    if (on) t.bad(key, "= true is not supported (no InstructBLIP checkpoint uses it)");
  }
  if (t.has("rope_scaling")) t.bad("rope_scaling", "is not supported (only plain rotary positions)");
  t.token_id("bos_token_id", lc.bos_token_id);
  t.token_id("eos_token_id", lc.eos_token_id);
  // The hub's Vicuna config says pad -1: no pad token.
  if (t.has("pad_token_id")) {
    int pad = -1;
    t.count("pad_token_id", pad, 1 << 30, -1);
    if (pad >= 0) lc.pad_token_id = pad;
  }
  if (auto arch = t.array_text("architectures")) lc.architecture = *arch;
  check_divisible(where, lc.hidden_size, "hidden_size", lc.num_heads, "num_attention_heads");
  check_divisible(where, lc.num_heads, "num_attention_heads", lc.num_kv_heads, "num_key_value_heads");
  if (lc.head_dim() % 2 != 0)
    fail(ErrorKind::Model, where + ": the head width hidden_size / num_attention_heads (" +
                               std::to_string(lc.head_dim()) + ") must be even for rotary positions");
  check_special_ids({lc.bos_token_id, lc.eos_token_id, lc.pad_token_id.value_or(0)}, lc.vocab_size, where);
}

}  // namespace

Blip2Config parse_config(const std::string& json_text, const std::string& source) {
  const json j = parse_json(json_text, source);
  Fields top(j, source + ": ");
  Blip2Config c;
  // InstructBLIP is BLIP-2 whose Q-Former also reads the prompt; its config has the same sections, each
  // with the same defaults (InstructBlipVisionConfig, InstructBlipQFormerConfig).
  const auto model_type = top.text("model_type");
  if (model_type && *model_type != "blip-2" && *model_type != "instructblip")
    top.bad("model_type", "= \"" + *model_type + "\": this is not a BLIP-2 checkpoint (nor an InstructBLIP one)");
  c.instruct = model_type == "instructblip";
  top.count("num_query_tokens", c.num_query_tokens, 4096);
  if (top.has("architectures")) {
    if (!j["architectures"].is_array()) top.bad("architectures", "must be a list of class names");
    for (const json& a : j["architectures"])
      if (a == "Blip2ForImageTextRetrieval") c.task = Blip2Task::Retrieval;
  }
  top.count("image_text_hidden_size", c.image_text_hidden_size);
  if (top.has("image_token_index")) {
    int v = 0;
    top.token_id("image_token_index", v);
    c.image_token_index = v;
  }

  Fields v = top.sub("vision_config");
  VisionConfig& vc = c.vision;
  v.count("hidden_size", vc.hidden_size);
  v.count("intermediate_size", vc.intermediate_size);
  v.count("num_hidden_layers", vc.num_layers, 1024);
  v.count("num_attention_heads", vc.num_heads, 4096);
  v.count("image_size", vc.image_size, 8192);
  v.count("patch_size", vc.patch_size, 8192);
  v.epsilon("layer_norm_eps", vc.layer_norm_eps);
  v.activation("hidden_act", vc.act);
  v.flag("qkv_bias", vc.qkv_bias);
  const std::string vwhere = source + ": vision_config";
  check_divisible(vwhere, vc.hidden_size, "hidden_size", vc.num_heads, "num_attention_heads");
  check_divisible(vwhere, vc.image_size, "image_size", vc.patch_size, "patch_size");

  Fields q = top.sub("qformer_config");
  QFormerConfig& qc = c.qformer;
  q.count("hidden_size", qc.hidden_size);
  q.count("intermediate_size", qc.intermediate_size);
  q.count("num_hidden_layers", qc.num_layers, 1024);
  q.count("num_attention_heads", qc.num_heads, 4096);
  q.count("cross_attention_frequency", qc.cross_attention_frequency, 1024);
  q.epsilon("layer_norm_eps", qc.layer_norm_eps);
  q.activation("hidden_act", qc.act);
  q.count("vocab_size", qc.vocab_size, 1 << 24);
  q.count("max_position_embeddings", qc.max_position_embeddings, 1 << 20);
  // Blip2Config forces the Q-Former's cross-attention width to the vision width.
  qc.encoder_hidden_size = vc.hidden_size;
  check_divisible(source + ": qformer_config", qc.hidden_size, "hidden_size", qc.num_heads,
                  "num_attention_heads");

  // The retrieval model has no language model: a text_config it carries (the hub's has one) is not used.
  if (c.task == Blip2Task::Retrieval) return c;
  if (!j.contains("text_config") || !j["text_config"].is_object())
    fail(ErrorKind::Model, source + ": text_config is missing");
  Fields t = top.sub("text_config");
  const auto text_type = t.text("model_type");
  if (text_type == "t5") {
    c.family = LanguageFamily::T5;
    parse_t5(t, c.text, source + ": text_config");
  } else if (text_type == "opt") {
    c.family = LanguageFamily::OPT;
    parse_opt(t, c.opt, source + ": text_config");
  } else if (text_type == "llama" && c.instruct) {
    c.family = LanguageFamily::Llama;
    parse_llama(t, c.llama, source + ": text_config");
  } else {
    t.bad("model_type", "= \"" + text_type.value_or("") + "\": the language model must be Flan-T5 (\"t5\") or OPT (\"opt\")" +
                            (c.instruct ? ", or Vicuna (\"llama\") for InstructBLIP" : ""));
  }
  // OPT's learned positions must hold the query slots, the BOS token and one generated token.
  if (c.family == LanguageFamily::OPT && c.opt.max_position_embeddings < c.num_query_tokens + 2)
    t.bad("max_position_embeddings", "= " + std::to_string(c.opt.max_position_embeddings) +
                                         " leaves no room for a prompt: it must be at least num_query_tokens (" +
                                         std::to_string(c.num_query_tokens) + ") + 2");
  if (c.image_token_index && *c.image_token_index >= c.lm_vocab_size())
    top.bad("image_token_index", "= " + std::to_string(*c.image_token_index) + " is outside the vocabulary (" +
                                     std::to_string(c.lm_vocab_size()) + ")");
  return c;
}

Blip2Config load_config(const std::string& model_dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(model_dir))
    fail(ErrorKind::Model, model_dir + ": model directory not found");
  const std::string path = (fs::path(model_dir) / "config.json").string();
  Blip2Config c = parse_config(read_text(path), path);
  const std::string gpath = (fs::path(model_dir) / "generation_config.json").string();
  if (fs::exists(gpath)) {
    const json g = parse_json(read_text(gpath), gpath);
    Fields f(g, gpath + ": ");
    GenerationDefaults& d = c.generation;
    if (f.has("max_new_tokens")) { int v = 0; f.count("max_new_tokens", v, 1 << 20, 0); d.max_new_tokens = v; }
    if (f.has("max_length")) { int v = 0; f.count("max_length", v, 1 << 20, 0); d.max_length = v; }
    f.token_id("eos_token_id", d.eos_token_id);
    // pad -1 (the hub's Vicuna) means none: finished rows are then fed another id (Blip2Config::pad_token_id)
    if (!(g.contains("pad_token_id") && g["pad_token_id"] == -1)) f.token_id("pad_token_id", d.pad_token_id);
    f.token_id("decoder_start_token_id", d.decoder_start_token_id);
    if (c.family == LanguageFamily::T5) {
      T5Config& tc = c.text;
      if (d.eos_token_id) tc.eos_token_id = *d.eos_token_id;
      if (d.pad_token_id) tc.pad_token_id = *d.pad_token_id;
      if (d.decoder_start_token_id) tc.decoder_start_token_id = *d.decoder_start_token_id;
      // the overrides must fit the embedding table too
      check_special_ids({tc.pad_token_id, tc.eos_token_id, tc.decoder_start_token_id}, tc.vocab_size, gpath + ":");
    } else if (c.family == LanguageFamily::Llama) {
      // generation_config.json's pad -1 (none) is read like text_config's
      LlamaConfig& lc = c.llama;
      if (d.eos_token_id) lc.eos_token_id = *d.eos_token_id;
      if (d.pad_token_id) lc.pad_token_id = *d.pad_token_id;
      check_special_ids({lc.eos_token_id, lc.pad_token_id.value_or(0)}, lc.vocab_size, gpath + ":");
    } else {
      OPTConfig& oc = c.opt;
      if (d.eos_token_id) oc.eos_token_id = *d.eos_token_id;
      if (d.pad_token_id) oc.pad_token_id = *d.pad_token_id;
      check_special_ids({oc.pad_token_id, oc.eos_token_id}, oc.vocab_size, gpath + ":");
    }
  }
  return c;
}

}  // namespace blip2
