#include "io/make_random.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"

namespace blip2 {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

namespace {

// The numbers that set every shape. The language model's: T5 (d_model, d_kv, d_ff, heads, encoder and
// decoder layers, vocab) or OPT (hidden, -, ffn, heads, layers, -, vocab, max positions).
struct Dims {
  std::string name;
  int v_hidden, v_inter, v_layers, v_heads;
  int q_hidden, q_inter, q_layers, q_heads, q_cross_freq;
  int num_query_tokens;
  int d_model, d_kv, d_ff, t_heads, t_layers, t_dec_layers, vocab;
  bool opt = false;
  int max_positions = 0;  // OPT, LLaMA
  int eos = 1;            // OPT: "\n" (50118) for the real models, as their configs have it
  bool retrieval = false; // Blip2ForImageTextRetrieval: no language model (the fields above it unused)
  bool instruct = false;  // InstructBLIP: the Q-Former reads the prompt (text embeddings, text feed-forward)
  bool llama = false;     // Vicuna: d_model = hidden, d_ff = intermediate, t_heads, t_layers, vocab, max_positions
};

// InstructBLIP's members: BLIP-2's image side with the text-reading Q-Former (its BERT vocabulary 30522 +
// [DEC]), and Flan-T5 as in BLIP-2 or Vicuna (LLaMA: 32000 pieces + [PAD], 2048 positions; the hub's
// text_config is decapoda's llama config: bos 0, eos 1, pad -1).
Dims instruct_t5(Dims d, const std::string& name) {
  d.name = name;
  d.instruct = true;
  return d;
}
Dims instruct_vicuna(const std::string& name, int hidden, int inter, int heads, int layers) {
  Dims d{name, 1408, 6144, 39, 16, 768, 3072, 12, 12, 2, 32, hidden, 0, inter, heads, layers, 0, 32001};
  d.max_positions = 2048;
  d.instruct = d.llama = true;
  return d;
}

// Spec §1.2: ViT-g 1408/6144/39/16, Q-Former 768/3072/12/12 every 2nd layer cross, 32 queries;
// Flan-T5 XXL d 4096, F 10240, 64 heads of 64; XL d 2048, F 5120, 32 heads of 64; 24 + 24 layers,
// vocab 32128. Spec §7: OPT-2.7b 2560 wide, 32 layers, 32 heads, ffn 10240, vocab 50304 (the re-saved hub
// checkpoint); OPT-6.7b 4096 wide, 32 layers, 32 heads, ffn 16384, vocab 50272; 2048 positions.
// tiny: models/tiny-blip2-t5/config.json and models/tiny-blip2-opt/config.json.
Dims dims_for(const std::string& canonical) {
  if (canonical == "blip2-flan-t5-xxl")
    return {canonical, 1408, 6144, 39, 16, 768, 3072, 12, 12, 2, 32, 4096, 64, 10240, 64, 24, 24, 32128};
  if (canonical == "blip2-flan-t5-xl")
    return {canonical, 1408, 6144, 39, 16, 768, 3072, 12, 12, 2, 32, 2048, 64, 5120, 32, 24, 24, 32128};
  if (canonical == "blip2-opt-2.7b")
    return {canonical, 1408, 6144, 39, 16, 768, 3072, 12, 12, 2, 32, 2560, 0, 10240, 32, 32, 0, 50304, true, 2048, 50118};
  if (canonical == "blip2-opt-6.7b")
    return {canonical, 1408, 6144, 39, 16, 768, 3072, 12, 12, 2, 32, 4096, 0, 16384, 32, 32, 0, 50272, true, 2048, 50118};
  // Salesforce/blip2-itm-vit-g: the same ViT-g and Q-Former, a BERT vocabulary of 30522 + [DEC].
  if (canonical == "blip2-itm-vit-g")
    return {canonical, 1408, 6144, 39, 16, 768, 3072, 12, 12, 2, 32, 0, 0, 0, 0, 0, 0, 30523, false, 0, 0, true};
  // Salesforce/instructblip-*: flan-t5-xl/xxl as BLIP-2's; vicuna-7b 4096 wide, 32 layers, 32 heads, FFN
  // 11008; vicuna-13b 5120 wide, 40 layers, 40 heads, FFN 13824 (no grouped-query attention in either).
  if (canonical == "instructblip-flan-t5-xl" || canonical == "instructblip-flan-t5-xxl")
    return instruct_t5(dims_for(canonical == "instructblip-flan-t5-xl" ? "blip2-flan-t5-xl" : "blip2-flan-t5-xxl"),
                       canonical);
  if (canonical == "instructblip-vicuna-7b") return instruct_vicuna(canonical, 4096, 11008, 32, 32);
  if (canonical == "instructblip-vicuna-13b") return instruct_vicuna(canonical, 5120, 13824, 40, 40);
  if (canonical == "tiny-blip2-opt")
    return {canonical, 64, 128, 3, 4, 64, 128, 4, 4, 2, 8, 64, 0, 128, 4, 3, 0, 1024, true, 128, 2};
  return {"tiny-blip2-t5", 64, 128, 3, 4, 64, 128, 4, 4, 2, 8, 64, 16, 128, 4, 3, 2, 1152};
}

const char* torch_dtype(DType t) {
  if (t == DType::F16) return "float16";
  if (t == DType::BF16) return "bfloat16";
  return "float32";
}

// config.json as the hub has it (the Nov-2024 re-save of blip2-flan-t5-xl, spec §1.2), except
// image_token_index: null, i.e. the legacy input convention (§5.4), because the stand-in tokenizer has no
// `<image>` token.
std::string make_config_json(const Dims& D, DType dtype) {
  ordered_json vision = {
      {"attention_dropout", 0.0},     {"dropout", 0.0},
      {"hidden_act", "gelu"},          {"hidden_size", D.v_hidden},
      {"image_size", 224},             {"initializer_factor", 1.0},
      {"initializer_range", 1e-10},    {"intermediate_size", D.v_inter},
      {"layer_norm_eps", 1e-6},        {"model_type", D.instruct ? "instructblip_vision_model" : "blip_2_vision_model"},
      {"num_attention_heads", D.v_heads}, {"num_channels", 3},
      {"num_hidden_layers", D.v_layers},  {"patch_size", 14},
      {"qkv_bias", true}};
  ordered_json qformer = {
      {"attention_probs_dropout_prob", 0.1}, {"classifier_dropout", nullptr},
      {"cross_attention_frequency", D.q_cross_freq}, {"encoder_hidden_size", D.v_hidden},
      {"hidden_act", "gelu"},            {"hidden_dropout_prob", 0.1},
      {"hidden_size", D.q_hidden},       {"initializer_range", 0.02},
      {"intermediate_size", D.q_inter},  {"layer_norm_eps", 1e-12},
      {"max_position_embeddings", 512},  {"model_type", D.instruct ? "instructblip_qformer" : "blip_2_qformer"},
      {"num_attention_heads", D.q_heads}, {"num_hidden_layers", D.q_layers},
      {"pad_token_id", 0},               {"position_embedding_type", "absolute"},
      {"use_qformer_text_input", D.instruct}, {"vocab_size", D.instruct ? 30523 : 30522}};
  if (D.retrieval) {  // the hub's config (text_config is there, unused)
    qformer["use_qformer_text_input"] = true;
    qformer["vocab_size"] = D.vocab;
    ordered_json c = {{"_name_or_path", "random/" + D.name},
                      {"architectures", {"Blip2ForImageTextRetrieval"}},
                      {"image_text_hidden_size", 256},
                      {"initializer_factor", 1.0},
                      {"initializer_range", 0.02},
                      {"model_type", "blip-2"},
                      {"num_query_tokens", D.num_query_tokens},
                      {"qformer_config", qformer},
                      {"text_config", {{"model_type", "opt"}}},
                      {"torch_dtype", torch_dtype(dtype)},
                      {"use_decoder_only_language_model", true},
                      {"vision_config", vision}};
    return c.dump(2) + "\n";
  }
  ordered_json text;
  if (D.llama) {
    text = {{"architectures", {"LLaMAForCausalLM"}},  // the hub's spelling (InstructBLIP's generate reads it)
            {"bos_token_id", 0},
            {"eos_token_id", 1},
            {"hidden_act", "silu"},
            {"hidden_size", D.d_model},
            {"initializer_range", 0.02},
            {"intermediate_size", D.d_ff},
            {"max_position_embeddings", D.max_positions},
            {"model_type", "llama"},
            {"num_attention_heads", D.t_heads},
            {"num_hidden_layers", D.t_layers},
            {"pad_token_id", -1},
            {"rms_norm_eps", 1e-6},
            {"tie_word_embeddings", false},
            {"vocab_size", D.vocab}};
  } else if (D.opt) {
    text = {{"activation_dropout", 0.0},
            {"activation_function", "relu"},
            {"architectures", {"OPTForCausalLM"}},
            {"attention_dropout", 0.0},
            {"bos_token_id", 2},
            {"do_layer_norm_before", true},
            {"dropout", 0.1},
            {"enable_bias", true},
            {"eos_token_id", D.eos},
            {"ffn_dim", D.d_ff},
            {"hidden_size", D.d_model},
            {"init_std", 0.02},
            {"layer_norm_elementwise_affine", true},
            {"layerdrop", 0.0},
            {"max_position_embeddings", D.max_positions},
            {"model_type", "opt"},
            {"num_attention_heads", D.t_heads},
            {"num_hidden_layers", D.t_layers},
            {"pad_token_id", 1},
            {"prefix", "</s>"},
            {"vocab_size", D.vocab},
            {"word_embed_proj_dim", D.d_model}};
  } else {
    text = {
        {"architectures", {"T5ForConditionalGeneration"}},
        {"bos_token_id", 1},
        {"classifier_dropout", 0.0},
        {"d_ff", D.d_ff},
        {"d_kv", D.d_kv},
        {"d_model", D.d_model},
        {"decoder_start_token_id", 0},
        {"dense_act_fn", "gelu"},
        {"dropout_rate", 0.1},
        {"eos_token_id", 1},
        {"feed_forward_proj", "gated-gelu"},
        {"initializer_factor", 1.0},
        {"is_encoder_decoder", true},
        {"is_gated_act", true},
        {"layer_norm_epsilon", 1e-6},
        {"model_type", "t5"},
        {"n_positions", 512},
        {"num_decoder_layers", D.t_dec_layers},
        {"num_heads", D.t_heads},
        {"num_layers", D.t_layers},
        {"output_past", true},
        {"pad_token_id", 0},
        {"relative_attention_max_distance", 128},
        {"relative_attention_num_buckets", 32},
        {"tie_word_embeddings", false},
        {"vocab_size", D.vocab}};
  }
  const bool decoder_only = D.opt || D.llama;
  ordered_json c = {
      {"_name_or_path", "random/" + D.name},
      {"architectures", {D.instruct ? "InstructBlipForConditionalGeneration" : "Blip2ForConditionalGeneration"}},
      {"image_text_hidden_size", 256},
      {"image_token_index", nullptr},
      {"initializer_factor", 1.0},
      {"initializer_range", 0.02},
      {"is_encoder_decoder", !decoder_only},
      {"model_type", D.instruct ? "instructblip" : "blip-2"},
      {"num_query_tokens", D.num_query_tokens},
      {"qformer_config", qformer},
      {"text_config", text},
      {"tie_word_embeddings", false},
      {"torch_dtype", torch_dtype(dtype)},
      {"use_decoder_only_language_model", decoder_only},
      {"vision_config", vision}};
  if (D.instruct) c.erase("image_text_hidden_size");  // BLIP-2's retrieval head; InstructBlipConfig has none
  return c.dump(2) + "\n";
}

// OPT (spec §7), as the hub stores it: no lm_head (it is tied to embed_tokens, and save_pretrained drops
// the duplicate). Pre-norm residual stack: out_proj and fc2 scaled by 1/sqrt(2 * layers). The embedding
// has std d^-0.5, so the tied head gives logits ~ 1; positions 0.02 z.
template <class Add, class Lin>
void plan_opt(const OPTConfig& o, const Add& add, const Lin& lin, RandomInit bias, RandomInit norm_w, RandomInit norm_b) {
  const int64_t d = o.hidden_size, F = o.ffn_dim, V = o.vocab_size;
  const double res = 1.0 / std::sqrt(2.0 * o.num_layers);
  const std::string p = "language_model.model.decoder.";
  add(p + "embed_tokens.weight", {V, d}, lin(d));
  add(p + "embed_positions.weight", {o.max_position_embeddings + 2, d}, RandomInit{0.0f, 0.02f});
  for (int i = 0; i < o.num_layers; ++i) {
    const std::string l = p + "layers." + std::to_string(i) + ".";
    for (const char* n : {"k_proj", "v_proj", "q_proj"}) {
      add(l + "self_attn." + n + ".weight", {d, d}, lin(d));
      add(l + "self_attn." + n + ".bias", {d}, bias);
    }
    add(l + "self_attn.out_proj.weight", {d, d}, lin(d, res));
    add(l + "self_attn.out_proj.bias", {d}, bias);
    add(l + "self_attn_layer_norm.weight", {d}, norm_w);
    add(l + "self_attn_layer_norm.bias", {d}, norm_b);
    add(l + "fc1.weight", {F, d}, lin(d));
    add(l + "fc1.bias", {F}, bias);
    add(l + "fc2.weight", {d, F}, lin(F, res));
    add(l + "fc2.bias", {d}, bias);
    add(l + "final_layer_norm.weight", {d}, norm_w);
    add(l + "final_layer_norm.bias", {d}, norm_b);
  }
  add(p + "final_layer_norm.weight", {d}, norm_w);
  add(p + "final_layer_norm.bias", {d}, norm_b);
}

// LLaMA (Vicuna) as the hub stores it: untied lm_head; pre-norm residual stack, so o_proj and down_proj are
// scaled by 1/sqrt(2 * layers); the embedding feeds an RMSNorm, so its scale is free: d^-0.5 as OPT's.
template <class Add, class Lin>
void plan_llama(const LlamaConfig& m, const Add& add, const Lin& lin, RandomInit norm_w) {
  const int64_t d = m.hidden_size, F = m.intermediate_size, V = m.vocab_size,
                kv = static_cast<int64_t>(m.num_kv_heads) * m.head_dim();
  const double res = 1.0 / std::sqrt(2.0 * m.num_layers);
  const std::string p = "language_model.model.";
  add(p + "embed_tokens.weight", {V, d}, lin(d));
  for (int i = 0; i < m.num_layers; ++i) {
    const std::string l = p + "layers." + std::to_string(i) + ".";
    add(l + "self_attn.q_proj.weight", {d, d}, lin(d));
    add(l + "self_attn.k_proj.weight", {kv, d}, lin(d));
    add(l + "self_attn.v_proj.weight", {kv, d}, lin(d));
    add(l + "self_attn.o_proj.weight", {d, d}, lin(d, res));
    add(l + "mlp.gate_proj.weight", {F, d}, lin(d));
    add(l + "mlp.up_proj.weight", {F, d}, lin(d));
    add(l + "mlp.down_proj.weight", {d, F}, lin(F, res));
    add(l + "input_layernorm.weight", {d}, norm_w);
    add(l + "post_attention_layernorm.weight", {d}, norm_w);
  }
  add(p + "norm.weight", {d}, norm_w);
  add("language_model.lm_head.weight", {V, d}, lin(d));
}

// Tensors in the order of the model, with their initialisation. Scales keep activations O(1):
//  * a linear weight of fan-in n has std 1/sqrt(n), so unit-scale inputs give unit-scale outputs;
//  * in pre-norm residual stacks (ViT, T5) the projections back into the residual stream (ViT proj / fc2,
//    T5 o / wo) are further scaled by 1/sqrt(branches), so the stream stays O(1) whatever the depth;
//  * T5 attention has no 1/sqrt(d_kv) score scale, so q gets std 1/sqrt(d_model * d_kv) (as Hugging Face's
//    T5 initialisation does): scores then have unit variance;
//  * T5 embeddings have std 1 (T5 does not scale them); the untied lm_head 1/sqrt(d_model), so logits ~ 1;
//  * norm weights 1 + 0.05 z, biases (norm biases too) 0.02 z, relative attention bias d_model^-0.5 z,
//    ViT class/position embeddings 0.02 z, Q-Former query tokens z (layer-normed before use).
std::vector<PlannedTensor> plan_tensors(const Blip2Config& c) {
  std::vector<PlannedTensor> out;
  const auto add = [&](const std::string& name, Shape shape, RandomInit init) {
    out.push_back({name, std::move(shape), init});
  };
  const auto lin = [](int64_t fan_in, double extra = 1.0) {
    return RandomInit{0.0f, static_cast<float>(extra / std::sqrt(static_cast<double>(fan_in)))};
  };
  const RandomInit bias{0.0f, 0.02f}, norm_w{1.0f, 0.05f}, norm_b{0.0f, 0.02f};

  // Vision (spec A.1)
  const VisionConfig& v = c.vision;
  const int64_t dv = v.hidden_size, fv = v.intermediate_size, p = v.patch_size;
  const double v_res = 1.0 / std::sqrt(2.0 * v.num_layers);
  const std::string e = "vision_model.embeddings.";
  add(e + "class_embedding", {1, 1, dv}, {0.0f, 0.02f});
  add(e + "patch_embedding.weight", {dv, 3, p, p}, lin(3 * p * p));
  add(e + "patch_embedding.bias", {dv}, bias);
  add(e + "position_embedding", {1, v.num_positions(), dv}, {0.0f, 0.02f});
  for (int i = 0; i < v.num_layers; ++i) {
    const std::string l = "vision_model.encoder.layers." + std::to_string(i) + ".";
    add(l + "layer_norm1.weight", {dv}, norm_w);
    add(l + "layer_norm1.bias", {dv}, norm_b);
    add(l + "self_attn.qkv.weight", {3 * dv, dv}, lin(dv));
    if (v.qkv_bias) add(l + "self_attn.qkv.bias", {3 * dv}, {0.0f, 0.02f, dv, 2 * dv});  // q | 0 | v
    add(l + "self_attn.projection.weight", {dv, dv}, lin(dv, v_res));
    add(l + "self_attn.projection.bias", {dv}, bias);
    add(l + "layer_norm2.weight", {dv}, norm_w);
    add(l + "layer_norm2.bias", {dv}, norm_b);
    add(l + "mlp.fc1.weight", {fv, dv}, lin(dv));
    add(l + "mlp.fc1.bias", {fv}, bias);
    add(l + "mlp.fc2.weight", {dv, fv}, lin(fv, v_res));
    add(l + "mlp.fc2.bias", {dv}, bias);
  }
  add("vision_model.post_layernorm.weight", {dv}, norm_w);
  add("vision_model.post_layernorm.bias", {dv}, norm_b);

  // Q-Former and projection (spec A.2); post-norm, so no residual scaling.
  const QFormerConfig& q = c.qformer;
  const int64_t dq = q.hidden_size, fq = q.intermediate_size;
  add("query_tokens", {1, c.num_query_tokens, dq}, {0.0f, 1.0f});
  if (c.instruct) {  // the text input: word and position embeddings, under the one LayerNorm the queries share
    add("qformer.embeddings.word_embeddings.weight", {q.vocab_size, dq}, {0.0f, 0.02f});
    add("qformer.embeddings.position_embeddings.weight", {q.max_position_embeddings, dq}, {0.0f, 0.02f});
    add("qformer.embeddings.layernorm.weight", {dq}, norm_w);
    add("qformer.embeddings.layernorm.bias", {dq}, norm_b);
  } else {
    add("qformer.layernorm.weight", {dq}, norm_w);
    add("qformer.layernorm.bias", {dq}, norm_b);
  }
  const auto attention = [&](const std::string& pre, int64_t kv_in) {
    add(pre + "attention.query.weight", {dq, dq}, lin(dq));
    add(pre + "attention.query.bias", {dq}, bias);
    add(pre + "attention.key.weight", {dq, kv_in}, lin(kv_in));
    add(pre + "attention.key.bias", {dq}, bias);
    add(pre + "attention.value.weight", {dq, kv_in}, lin(kv_in));
    add(pre + "attention.value.bias", {dq}, bias);
    add(pre + "output.dense.weight", {dq, dq}, lin(dq));
    add(pre + "output.dense.bias", {dq}, bias);
    add(pre + "output.LayerNorm.weight", {dq}, norm_w);
    add(pre + "output.LayerNorm.bias", {dq}, norm_b);
  };
  for (int i = 0; i < q.num_layers; ++i) {
    const std::string l = "qformer.encoder.layer." + std::to_string(i) + ".";
    attention(l + "attention.", dq);
    if (i % q.cross_attention_frequency == 0) attention(l + "crossattention.", q.encoder_hidden_size);
    add(l + "intermediate_query.dense.weight", {fq, dq}, lin(dq));
    add(l + "intermediate_query.dense.bias", {fq}, bias);
    add(l + "output_query.dense.weight", {dq, fq}, lin(fq));
    add(l + "output_query.dense.bias", {dq}, bias);
    add(l + "output_query.LayerNorm.weight", {dq}, norm_w);
    add(l + "output_query.LayerNorm.bias", {dq}, norm_b);
    if (c.task == Blip2Task::Retrieval || c.instruct) {  // the text tokens' feed-forward
      add(l + "intermediate.dense.weight", {fq, dq}, lin(dq));
      add(l + "intermediate.dense.bias", {fq}, bias);
      add(l + "output.dense.weight", {dq, fq}, lin(fq));
      add(l + "output.dense.bias", {dq}, bias);
      add(l + "output.LayerNorm.weight", {dq}, norm_w);
      add(l + "output.LayerNorm.bias", {dq}, norm_b);
    }
  }
  if (c.task == Blip2Task::Retrieval) {
    // Word embeddings of std 1 and positions 0.02 z (layer-normed with the queries); the heads over the
    // Q-Former outputs.
    const int64_t E = c.image_text_hidden_size;
    add("embeddings.word_embeddings.weight", {q.vocab_size, dq}, {0.0f, 1.0f});
    add("embeddings.position_embeddings.weight", {q.max_position_embeddings, dq}, {0.0f, 0.02f});
    add("vision_projection.weight", {E, dq}, lin(dq));
    add("vision_projection.bias", {E}, bias);
    add("text_projection.weight", {E, dq}, lin(dq));
    add("text_projection.bias", {E}, bias);
    add("itm_head.weight", {2, dq}, lin(dq));
    add("itm_head.bias", {2}, bias);
    return out;
  }
  add("language_projection.weight", {c.lm_width(), dq}, lin(dq));
  add("language_projection.bias", {c.lm_width()}, bias);
  if (c.family == LanguageFamily::OPT) {
    plan_opt(c.opt, add, lin, bias, norm_w, norm_b);
    return out;
  }
  if (c.family == LanguageFamily::Llama) {
    plan_llama(c.llama, add, lin, norm_w);
    return out;
  }

  const T5Config& t = c.text;
  const int64_t d = t.d_model, I = t.inner_dim(), F = t.d_ff, V = t.vocab_size;
  // Flan-T5 (spec A.3)
  add("language_model.shared.weight", {V, d}, {0.0f, 1.0f});
  const RandomInit rel_bias{0.0f, static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)))};
  const auto stack = [&](const std::string& prefix, int layers, bool decoder) {
    const double res = 1.0 / std::sqrt((decoder ? 3.0 : 2.0) * layers);
    for (int i = 0; i < layers; ++i) {
      const std::string b = prefix + "block." + std::to_string(i) + ".layer.";
      const auto attn = [&](const std::string& pre, const std::string& kind) {
        add(pre + kind + ".q.weight", {I, d}, lin(d * int64_t(t.d_kv)));
        add(pre + kind + ".k.weight", {I, d}, lin(d));
        add(pre + kind + ".v.weight", {I, d}, lin(d));
        add(pre + kind + ".o.weight", {d, I}, lin(I, res));
        if (kind == "SelfAttention" && i == 0)
          add(pre + kind + ".relative_attention_bias.weight", {t.relative_attention_num_buckets, t.num_heads},
              rel_bias);
        add(pre + "layer_norm.weight", {d}, norm_w);
      };
      attn(b + "0.", "SelfAttention");
      if (decoder) attn(b + "1.", "EncDecAttention");
      const std::string f = b + (decoder ? "2." : "1.");
      if (t.is_gated_act) {
        add(f + "DenseReluDense.wi_0.weight", {F, d}, lin(d));
        add(f + "DenseReluDense.wi_1.weight", {F, d}, lin(d));
      } else {
        add(f + "DenseReluDense.wi.weight", {F, d}, lin(d));
      }
      add(f + "DenseReluDense.wo.weight", {d, F}, lin(F, res));
      add(f + "layer_norm.weight", {d}, norm_w);
    }
    add(prefix + "final_layer_norm.weight", {d}, norm_w);
  };
  stack("language_model.encoder.", t.num_layers, false);
  stack("language_model.decoder.", t.num_decoder_layers, true);
  add("language_model.lm_head.weight", {V, d}, lin(d));
  return out;
}

inline uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

std::string lower(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

std::string human_bytes(uint64_t n) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GB", static_cast<double>(n) / 1e9);
  return buf;
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) fail(ErrorKind::Usage, path.string() + ": cannot write");
}

// Files a checkpoint directory holds, which --force may replace.
bool is_checkpoint_file(const std::string& f) {
  static const char* fixed[] = {"config.json", "generation_config.json", "tokenizer_config.json",
                                "special_tokens_map.json", "tokenizer.json", "spiece.model", "vocab.json",
                                "merges.txt", "README.txt", "vocab.txt", "tokenizer.model", "added_tokens.json",
                                "model.safetensors", "model.safetensors.index.json"};
  for (const char* x : fixed)
    if (f == x) return true;
  const auto ends = [&](const std::string& s) { return f.size() >= s.size() && f.compare(f.size() - s.size(), s.size(), s) == 0; };
  return f.rfind("model-", 0) == 0 && (ends(".safetensors") || ends(".safetensors.partial"));
}

// `k` distinct channels of [0, n), drawn from the seed and a label (the same seed gives the same channels),
// sorted.
std::vector<int64_t> draw_channels(uint64_t seed, const std::string& label, int k, int64_t n) {
  std::vector<int64_t> out;
  const uint64_t key = random_tensor_key(seed, label);
  k = static_cast<int>(std::min<int64_t>(k, n));
  for (uint64_t i = 1; static_cast<int>(out.size()) < k; ++i) {
    const int64_t c = static_cast<int64_t>(mix64(key + i * kGolden) % static_cast<uint64_t>(n));
    if (std::find(out.begin(), out.end(), c) == out.end()) out.push_back(c);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// --outliers (OutlierOptions): a pass over the language model's planned tensors, by name. Norm weights that
// feed attention or the feed-forward, in every layer (not the stacks' final norms, which feed the head or
// the decoder's cross-attention keys only): residual channels x residual_scale, so the input of q/k/v and of
// the first feed-forward product has them that large. The feed-forward's linear branch (the one that is
// not activated, so the scale passes through exactly): rows of the chosen hidden channels x ffn_scale.
void apply_outliers(RandomCheckpointPlan& plan, const OutlierOptions& o, uint64_t seed) {
  const Blip2Config& c = plan.config;
  if (!o.enabled || c.task == Blip2Task::Retrieval) return;
  const bool t5 = c.family == LanguageFamily::T5, opt = c.family == LanguageFamily::OPT;
  const int64_t d = c.lm_hidden_size(), F = c.lm_ffn_size();
  plan.outlier_residual_channels = draw_channels(seed, "outliers/residual", o.residual_channels, d);
  plan.outlier_ffn_channels = draw_channels(seed, "outliers/ffn", o.ffn_channels, F);
  const auto ends = [](const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
  };
  const auto boost = [&](RandomInit& init, bool residual, int64_t stride) {
    init.boost_channels = residual ? plan.outlier_residual_channels : plan.outlier_ffn_channels;
    init.boost_stride = stride;
    init.boost = residual ? o.residual_scale : o.ffn_scale;
  };
  // With `compensate`: the columns that read the boosted channels, divided by the boost (t.shape[1] columns).
  const auto shrink = [&](PlannedTensor& t, bool residual) {
    if (!o.compensate) return;
    t.init.shrink_columns = residual ? plan.outlier_residual_channels : plan.outlier_ffn_channels;
    t.init.cols = t.shape.at(1);
    t.init.shrink = 1.0f / (residual ? o.residual_scale : o.ffn_scale);
  };
  std::string norms, ffn;
  if (t5) {
    norms = "language_model.{encoder,decoder}.block.*.layer.*.layer_norm.weight";
    ffn = std::string("language_model.{encoder,decoder}.block.*.layer.*.DenseReluDense.") +
          (c.text.is_gated_act ? "wi_1" : "wi") + ".weight rows";
  } else if (opt) {
    norms = "language_model.model.decoder.layers.*.{self_attn_layer_norm,final_layer_norm}.weight";
    ffn = "language_model.model.decoder.layers.*.fc1.weight rows and fc1.bias";
  } else {
    norms = "language_model.model.layers.*.{input_layernorm,post_attention_layernorm}.weight";
    ffn = "language_model.model.layers.*.mlp.up_proj.weight rows";
  }
  for (PlannedTensor& t : plan.tensors) {
    const std::string& n = t.name;
    if (t5) {
      if (n.rfind("language_model.encoder.block.", 0) != 0 && n.rfind("language_model.decoder.block.", 0) != 0) continue;
      if (ends(n, ".layer_norm.weight")) boost(t.init, true, 1);
      if (ends(n, c.text.is_gated_act ? ".DenseReluDense.wi_1.weight" : ".DenseReluDense.wi.weight")) boost(t.init, false, d);
      // Readers of a boosted norm: self-attention q/k/v, cross-attention q (its k/v read the encoder), wi*.
      if (ends(n, ".SelfAttention.q.weight") || ends(n, ".SelfAttention.k.weight") ||
          ends(n, ".SelfAttention.v.weight") || ends(n, ".EncDecAttention.q.weight") ||
          n.find(".DenseReluDense.wi") != std::string::npos)
        shrink(t, true);
      if (ends(n, ".DenseReluDense.wo.weight")) shrink(t, false);
    } else if (opt) {
      if (n.rfind("language_model.model.decoder.layers.", 0) != 0) continue;
      if (ends(n, ".self_attn_layer_norm.weight") || ends(n, ".final_layer_norm.weight")) boost(t.init, true, 1);
      // LayerNorm's output is γ·x̂ + β: with β scaled too the channel is exactly residual_scale larger.
      if (o.compensate && (ends(n, ".self_attn_layer_norm.bias") || ends(n, ".final_layer_norm.bias")))
        boost(t.init, true, 1);
      if (ends(n, ".fc1.weight")) boost(t.init, false, d);
      if (ends(n, ".fc1.bias")) boost(t.init, false, 1);  // relu(x W^T + b): both scaled, so the channel is exactly
      if (ends(n, ".q_proj.weight") || ends(n, ".k_proj.weight") || ends(n, ".v_proj.weight") || ends(n, ".fc1.weight"))
        shrink(t, true);
      if (ends(n, ".fc2.weight")) shrink(t, false);
    } else {
      if (n.rfind("language_model.model.layers.", 0) != 0) continue;
      if (ends(n, ".input_layernorm.weight") || ends(n, ".post_attention_layernorm.weight")) boost(t.init, true, 1);
      if (ends(n, ".mlp.up_proj.weight")) boost(t.init, false, d);
      if (ends(n, ".q_proj.weight") || ends(n, ".k_proj.weight") || ends(n, ".v_proj.weight") ||
          ends(n, ".mlp.gate_proj.weight") || ends(n, ".mlp.up_proj.weight"))
        shrink(t, true);
      if (ends(n, ".mlp.down_proj.weight")) shrink(t, false);
    }
  }
  const auto list = [](const std::vector<int64_t>& v) {
    std::string s;
    for (int64_t x : v) s += (s.empty() ? "" : ", ") + std::to_string(x);
    return s;
  };
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(o.residual_scale));
  plan.outlier_notes.push_back(norms + ": channels " + list(plan.outlier_residual_channels) + " of " +
                               std::to_string(d) + " x" + buf);
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(o.ffn_scale));
  plan.outlier_notes.push_back(ffn + ": hidden channels " + list(plan.outlier_ffn_channels) + " of " +
                               std::to_string(F) + " x" + buf);
  plan.outlier_notes.push_back(o.compensate
                                   ? "compensated: the weights reading those channels (q/k/v, the first feed-forward "
                                     "products, wo/fc2/down_proj) have those columns divided by as much" +
                                         std::string(opt ? ", and the LayerNorm biases are scaled with their weights"
                                                         : "") +
                                         ", so the model computes what the clean model of this seed does"
                                   : "uncompensated: the weights reading those channels are as drawn");
}

}  // namespace

int64_t RandomCheckpointPlan::total_elements() const {
  int64_t n = 0;
  for (const auto& t : tensors) n += numel(t.shape);
  return n;
}

std::string canonical_model_like(const std::string& like) {
  std::string s = lower(like);
  if (s.rfind("salesforce/", 0) == 0) s = s.substr(11);
  while (!s.empty() && s.back() == '/') s.pop_back();
  if (s == "xxl" || s == "flan-t5-xxl" || s == "blip2-flan-t5-xxl") return "blip2-flan-t5-xxl";
  if (s == "xl" || s == "flan-t5-xl" || s == "blip2-flan-t5-xl") return "blip2-flan-t5-xl";
  if (s == "opt-2.7b" || s == "blip2-opt-2.7b") return "blip2-opt-2.7b";
  if (s == "opt-6.7b" || s == "blip2-opt-6.7b") return "blip2-opt-6.7b";
  for (const char* name : {"instructblip-flan-t5-xl", "instructblip-flan-t5-xxl", "instructblip-vicuna-7b",
                           "instructblip-vicuna-13b"})
    if (s == name) return name;
  if (s == "tiny" || s == "tiny-blip2-t5") return "tiny-blip2-t5";
  if (s == "tiny-opt" || s == "tiny-blip2-opt") return "tiny-blip2-opt";
  if (s == "itm" || s == "itm-vit-g" || s == "blip2-itm-vit-g") return "blip2-itm-vit-g";
  fail(ErrorKind::Usage, "--like '" + like +
                             "': unknown model shape; choose xxl (Salesforce/blip2-flan-t5-xxl), xl "
                             "(Salesforce/blip2-flan-t5-xl), opt-2.7b (Salesforce/blip2-opt-2.7b), opt-6.7b "
                             "(Salesforce/blip2-opt-6.7b), instructblip-flan-t5-xl, instructblip-flan-t5-xxl, "
                             "instructblip-vicuna-7b, instructblip-vicuna-13b (Salesforce/instructblip-*), "
                             "blip2-itm-vit-g (Salesforce/blip2-itm-vit-g, retrieval), tiny "
                             "(models/tiny-blip2-t5) or tiny-opt (models/tiny-blip2-opt)");
}

DType parse_dtype_option(const std::string& dtype) {
  const std::string s = lower(dtype);
  if (s == "f32" || s == "fp32" || s == "float32") return DType::F32;
  if (s == "bf16" || s == "bfloat16") return DType::BF16;
  if (s == "f16" || s == "fp16" || s == "float16") return DType::F16;
  fail(ErrorKind::Usage, "--dtype '" + dtype + "': choose f32, bf16 or f16");
}

RandomCheckpointPlan plan_random_checkpoint(const std::string& like, DType dtype, const OutlierOptions& outliers,
                                            uint64_t seed) {
  const Dims D = dims_for(canonical_model_like(like));
  RandomCheckpointPlan plan;
  plan.name = D.name;
  plan.config_json = make_config_json(D, dtype);
  // The shapes come from the config as the loader parses it, so config and weights cannot disagree.
  plan.config = parse_config(plan.config_json, D.name + "/config.json");
  plan.tensors = plan_tensors(plan.config);
  apply_outliers(plan, outliers, seed);
  return plan;
}

uint64_t random_tensor_key(uint64_t seed, const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a of the name
  for (unsigned char ch : name) h = (h ^ ch) * 0x100000001b3ull;
  return mix64(mix64(seed + kGolden) ^ h);
}

void fill_random(const RandomInit& init, uint64_t key, int64_t begin, int64_t n, float* out) {
  // z = (sum of four 16-bit uniforms - mean) / std: Irwin-Hall(4), variance 1, |z| <= 3.46.
  constexpr float kMean = 4 * 65535 / 2.0f;
  const float scale = init.std / 37837.2273f;  // sqrt((65536^2 - 1) / 3)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t idx = begin + i;
    if (idx >= init.zero_begin && idx < init.zero_end) {
      out[i] = 0.0f;
      continue;
    }
    const uint64_t u = mix64(key + static_cast<uint64_t>(idx + 1) * kGolden);
    const uint32_t sum = static_cast<uint32_t>((u & 0xffff) + ((u >> 16) & 0xffff) + ((u >> 32) & 0xffff) + (u >> 48));
    out[i] = init.mean + (static_cast<float>(sum) - kMean) * scale;
    if (!init.boost_channels.empty() &&
        std::binary_search(init.boost_channels.begin(), init.boost_channels.end(), idx / init.boost_stride))
      out[i] *= init.boost;
    if (!init.shrink_columns.empty() &&
        std::binary_search(init.shrink_columns.begin(), init.shrink_columns.end(), idx % init.cols))
      out[i] *= init.shrink;
  }
}

void make_random_checkpoint(const std::string& like, const std::string& out_dir, const MakeRandomOptions& opt) {
  if (opt.dtype != DType::F32 && opt.dtype != DType::F16 && opt.dtype != DType::BF16)
    fail(ErrorKind::Usage, std::string("make-random writes f32, bf16 or f16 weights, not ") + dtype_name(opt.dtype));
  const RandomCheckpointPlan plan = plan_random_checkpoint(like, opt.dtype, opt.outliers, opt.seed);
  const fs::path dir(out_dir);
  const bool retrieval = plan.config.task == Blip2Task::Retrieval;
  const bool is_opt = !retrieval && plan.config.family == LanguageFamily::OPT;
  const bool is_llama = !retrieval && plan.config.family == LanguageFamily::Llama, instruct = plan.config.instruct;
  // The stand-in tokenizers are the bundled tiny models' (InstructBLIP's: the fixtures', with the Q-Former's
  // BERT tokenizer in qformer_tokenizer/; retrieval: the fixture's BERT files, 375 pieces + [DEC], within the
  // 30523-row embedding, copied whole).
  const fs::path tok_dir = !opt.tokenizer_dir.empty() ? fs::path(opt.tokenizer_dir)
                           : retrieval               ? fs::path(BLIP2_BUNDLED_ITM_DIR)
                           : is_llama                ? fs::path(BLIP2_BUNDLED_INSTRUCT_VICUNA_DIR)
                           : instruct                ? fs::path(BLIP2_BUNDLED_INSTRUCT_T5_DIR)
                           : is_opt                  ? fs::path(BLIP2_BUNDLED_OPT_DIR)
                                                     : fs::path(BLIP2_BUNDLED_MODEL_DIR);
  const std::vector<std::string> bert_files = {"vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                                               "added_tokens.json"};
  std::vector<std::string> tok_files = retrieval  ? bert_files
                                       : is_opt   ? std::vector<std::string>{"vocab.json", "merges.txt"}
                                       : is_llama ? std::vector<std::string>{"tokenizer.model"}
                                                  : std::vector<std::string>{"spiece.model"};
  if (instruct)
    for (const auto& f : bert_files) tok_files.push_back("qformer_tokenizer/" + f);
  for (const auto& f : tok_files)
    if (!fs::is_regular_file(tok_dir / f))
      fail(ErrorKind::Model, (tok_dir / f).string() + ": tokenizer to copy is missing (the bundled tiny model's)");

  // Where the weights go: shards of at most max_shard_bytes in model order (a tensor larger than that
  // gets a shard of its own), as Hugging Face's save_pretrained does.
  const size_t esize = dtype_size(opt.dtype);
  std::vector<std::vector<size_t>> shards;
  uint64_t in_shard = 0, total_bytes = 0;
  for (size_t i = 0; i < plan.tensors.size(); ++i) {
    const uint64_t b = static_cast<uint64_t>(numel(plan.tensors[i].shape)) * esize;
    if (shards.empty() || (in_shard > 0 && in_shard + b > opt.max_shard_bytes)) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(i);
    in_shard += b;
    total_bytes += b;
  }
  const int S = static_cast<int>(shards.size());
  const auto shard_name = [&](int s) {
    if (S == 1) return std::string("model.safetensors");
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05d-of-%05d.safetensors", s + 1, S);
    return std::string(buf);
  };

  // The directory: new or empty, or --force (then only checkpoint files are removed).
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    fail(ErrorKind::Usage, out_dir + ": exists and is not a directory");
  if (fs::is_directory(dir, ec) && !fs::is_empty(dir, ec)) {
    if (!opt.overwrite)
      fail(ErrorKind::Usage, out_dir + ": directory is not empty (pass --force to replace a checkpoint there)");
    for (const auto& entry : fs::directory_iterator(dir, ec))
      if (entry.is_regular_file() && is_checkpoint_file(entry.path().filename().string()))
        fs::remove(entry.path(), ec);
  }
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir)) fail(ErrorKind::Usage, out_dir + ": cannot create directory: " + ec.message());
  const fs::space_info space = fs::space(dir, ec);
  const uint64_t needed = total_bytes + (uint64_t(64) << 20);
  if (!ec && space.available < needed)
    fail(ErrorKind::Usage, out_dir + ": needs " + human_bytes(needed) + " of free space, " +
                               human_bytes(space.available) + " available");

  MakeRandomProgress prog;
  prog.shards = S;
  prog.tensors_total = plan.tensors.size();
  prog.bytes_total = total_bytes;
  uint64_t bytes_before = 0;
  std::map<std::string, std::string> weight_map;  // sorted by name, as Hugging Face writes it
  for (int s = 0; s < S; ++s) {
    SafetensorsWriter w;
    for (size_t i : shards[s]) w.add(plan.tensors[i].name, opt.dtype, plan.tensors[i].shape);
    std::vector<uint64_t> keys;
    for (size_t i : shards[s]) keys.push_back(random_tensor_key(opt.seed, plan.tensors[i].name));
    prog.shard = s + 1;
    prog.file = shard_name(s);
    prog.shard_finished = false;
    const auto fill = [&](size_t k, int64_t begin, int64_t n, float* out) {
      const PlannedTensor& t = plan.tensors[shards[s][k]];
      fill_random(t.init, keys[k], begin, n, out);
      if (begin + n == numel(t.shape)) ++prog.tensors_done;  // written before the progress call
    };
    const auto progress = [&](uint64_t written, uint64_t) {
      prog.bytes_done = bytes_before + written;
      if (opt.progress) opt.progress(prog);
    };
    w.write((dir / prog.file).string(), fill, progress);
    bytes_before += w.data_bytes();
    prog.bytes_done = bytes_before;
    prog.shard_finished = true;
    if (opt.progress) opt.progress(prog);
    for (size_t i : shards[s]) weight_map[plan.tensors[i].name] = prog.file;
  }
  if (S > 1) {
    ordered_json index;
    index["metadata"] = {{"total_parameters", plan.total_elements()}, {"total_size", total_bytes}};
    index["weight_map"] = weight_map;
    write_text(dir / "model.safetensors.index.json", index.dump(2) + "\n");
  }

  if (instruct) fs::create_directories(dir / "qformer_tokenizer", ec);
  for (const auto& f : tok_files) {
    fs::copy_file(tok_dir / f, dir / f, fs::copy_options::overwrite_existing, ec);
    if (ec) fail(ErrorKind::Usage, (dir / f).string() + ": cannot copy the tokenizer: " + ec.message());
  }
  const OPTConfig& oc = plan.config.opt;
  if (retrieval) {
    // nothing more: the tokenizer files are the ones copied, and there is nothing to generate
  } else if (is_llama) {
    // The hub's Vicuna tokenizer files: BOS, EOS and UNK all </s>, [PAD] added after the pieces (here after
    // the whole vocabulary but one row, as the real 32000 + 1), legacy mode, left padding and truncation.
    const int pad = plan.config.llama.vocab_size - 1;
    write_text(dir / "tokenizer_config.json", ordered_json({{"tokenizer_class", "LlamaTokenizer"},
                                                             {"add_bos_token", true},
                                                             {"add_eos_token", false},
                                                             {"bos_token", "</s>"},
                                                             {"eos_token", "</s>"},
                                                             {"unk_token", "</s>"},
                                                             {"pad_token", "[PAD]"},
                                                             {"legacy", true},
                                                             {"padding_side", "left"},
                                                             {"truncation_side", "left"}})
                                                    .dump(2) + "\n");
    write_text(dir / "added_tokens.json", ordered_json({{"[PAD]", pad}}).dump(2) + "\n");
    write_text(dir / "generation_config.json", ordered_json({{"_from_model_config", true},
                                                              {"bos_token_id", 0},
                                                              {"eos_token_id", 1},
                                                              {"pad_token_id", -1}})
                                                     .dump(2) + "\n");
  } else if (is_opt) {
    write_text(dir / "tokenizer_config.json", ordered_json({{"tokenizer_class", "GPT2Tokenizer"},
                                                             {"add_bos_token", true},
                                                             {"bos_token", "</s>"},
                                                             {"eos_token", "</s>"},
                                                             {"unk_token", "<unk>"},
                                                             {"pad_token", "<pad>"}})
                                                    .dump(2) + "\n");
    write_text(dir / "generation_config.json", ordered_json({{"_from_model_config", true},
                                                              {"bos_token_id", oc.bos_token_id},
                                                              {"eos_token_id", oc.eos_token_id},
                                                              {"pad_token_id", oc.pad_token_id}})
                                                     .dump(2) + "\n");
  } else {
    write_text(dir / "tokenizer_config.json", ordered_json({{"tokenizer_class", "T5Tokenizer"},
                                                             {"eos_token", "</s>"},
                                                             {"unk_token", "<unk>"},
                                                             {"pad_token", "<pad>"},
                                                             {"extra_ids", 100},
                                                             {"model_max_length", 512}})
                                                    .dump(2) + "\n");
    write_text(dir / "generation_config.json", ordered_json({{"_from_model_config", true},
                                                              {"bos_token_id", 1},
                                                              {"decoder_start_token_id", 0},
                                                              {"eos_token_id", 1},
                                                              {"pad_token_id", 0}})
                                                     .dump(2) + "\n");
  }
  const char* dt = torch_dtype(opt.dtype);
  std::string outlier_text;  // what --outliers scaled, so a reader of the numbers knows the model's shape
  if (!plan.outlier_notes.empty()) {
    outlier_text = "\nOUTLIERS (--outliers): activation outliers as in real LLMs, made by scaling these tensors'\n"
                   "random values (the same channels in every layer; the last line says whether the weights reading\n"
                   "them are compensated):\n";
    for (const auto& n : plan.outlier_notes) outlier_text += "  " + n + "\n";
  }
  write_text(dir / "README.txt",
             "RANDOM WEIGHTS - not a trained model. Made by `blip2 make-random --like " + plan.name + " --dtype " +
                 dt + " --seed " + std::to_string(opt.seed) + (opt.outliers.enabled ? " --outliers" : "") + "`.\n\n" +
                 "Shapes, tensor names, config and file layout are those of " +
                 (plan.name.rfind("tiny-", 0) == 0 ? "the bundled models/" + plan.name : "Salesforce/" + plan.name) +
                 " on the Hugging Face hub (" + std::to_string(plan.tensors.size()) + " tensors, " +
                 std::to_string(plan.total_elements()) + " parameters, " + dt + ", " + std::to_string(S) +
                 (S == 1 ? " file" : " shards") + ").\n" +
                 "The values are random, scaled so that activations stay finite and O(1) through the whole model,\n"
                 "so it is good for load, memory, speed and numerical-stability tests, and its output is nonsense.\n\n" +
                 std::string(retrieval ? "vocab.txt is a STAND-IN: the retrieval fixture's 375-piece BERT vocabulary + [DEC], not\n"
                                         "BERT's 30522 pieces; the other rows of the word embedding are never looked up. "
                           : is_opt ? "vocab.json + merges.txt are a STAND-IN: the bundled tiny model's 1024-token byte-level BPE,\n"
                           "not OPT's 50265-token one. Ids beyond them never come out of the tokenizer; the model still\n"
                           "generates them, and they decode to nothing. "
                         : is_llama ? "tokenizer.model is a STAND-IN: the tiny InstructBLIP fixture's 1000-piece LLaMA-style model,\n"
                           "not Vicuna's 32000-piece one. Ids beyond its pieces never come out of the tokenizer; the model\n"
                           "still generates them, and they decode to nothing. "
                         : "spiece.model is a STAND-IN: the bundled tiny model's 1000-piece SentencePiece model, not\n"
                           "Flan-T5's 32000-piece one. Ids beyond its 1000 pieces and 100 sentinels never come out of the\n"
                           "tokenizer; the model still generates them, and they decode to nothing. ") +
                 (instruct ? "qformer_tokenizer/ is a STAND-IN too: the fixture's 375-entry WordPiece vocabulary, not BERT's.\n"
                           : "") +
                 "config.json has image_token_index null\n(the legacy input convention: no <image> tokens in the prompt).\n" +
                 outlier_text);
  write_text(dir / "config.json", plan.config_json);  // last: until now the directory does not load
}

void make_random_checkpoint(const std::string& like, const std::string& out_dir, const std::string& dtype,
                            uint64_t seed, const MakeRandomProgressFn& progress) {
  MakeRandomOptions opt;
  opt.dtype = parse_dtype_option(dtype);
  opt.seed = seed;
  opt.progress = progress;
  make_random_checkpoint(like, out_dir, opt);
}

}  // namespace blip2
