#include "model/load_options.h"

#include <array>
#include <cstring>
#include <optional>

#include "core/error.h"
#include "cuda/cuda.h"
#include "ops/ops.h"
#include "ops/parallel.h"

namespace blip2 {

namespace {

// A copy of a tensor kept in its stored format, in memory of its own (so that its file pages can be dropped).
Weight copy_weight(const Weight& w) {
  const size_t n = w.nbytes();
  std::shared_ptr<uint8_t[]> buf(new uint8_t[n == 0 ? 1 : n]);
  if (n) std::memcpy(buf.get(), w.data, n);
  Weight c = w;
  c.data = buf.get();
  c.owner = std::shared_ptr<const void>(buf, buf.get());
  return c;
}

bool is_lookup_embedding(const std::string& name) {
  return name == "language_model.shared.weight" || name == "language_model.encoder.embed_tokens.weight" ||
         name == "language_model.decoder.embed_tokens.weight" ||
         name == "language_model.model.decoder.embed_tokens.weight" ||  // OPT
         name == "language_model.model.embed_tokens.weight";            // LLaMA
}

// A tensor a pre-quantized checkpoint stores quantized: used as it is (moved to the device), never converted
// again, since requantizing would not give the bytes quantizing the original gives. So the requested format
// must be the stored one, or "as stored".
Weight prequantized_weight(const std::string& name, const Weight& w, WeightFormat want, int int4_group,
                           bool convertible, Device device) {
  const std::string stored = w.dtype == DType::I8 ? "int8" : "int4 (group " + std::to_string(w.group) + ")";
  if (!convertible)
    fail(ErrorKind::Model, "tensor '" + name + "' is stored as " + stored +
                               ", but only the matrices of linear layers can be quantized");
  const bool same = (w.dtype == DType::I8 && want == WeightFormat::I8) ||
                    (w.dtype == DType::I4 && want == WeightFormat::I4 && w.group == int4_group);
  if (want != WeightFormat::AsStored && !same)
    fail(ErrorKind::Usage, "tensor '" + name + "' is pre-quantized as " + stored + ", and cannot be loaded as " +
                               weight_format_name(want) + (want == WeightFormat::I4 ? " (group " + std::to_string(int4_group) + ")" : "") +
                               ": load this checkpoint with --weights stored (the default), or the original with "
                               "the format you want");
  if (w.dtype == DType::I4 && device == Device::CUDA)
    fail(ErrorKind::Usage, "tensor '" + name + "' is pre-quantized as int4, which runs on the CPU only");
  return w.to(device);
}

// Where the input of a language model's linear layer comes from (issue 14, ops::float_columns_for): the norm
// in front of it, and for the feed-forward's second product the first product(s) in between (those the
// checkpoint has; their outputs multiply: T5's gated wi_0 · wi_1, LLaMA's gate · up). Empty `norm` for every
// other tensor: attention outputs, which mix heads, and the vision and Q-Former towers, whose outliers
// `make-random --outliers` does not model.
struct InputSource {
  std::string norm, norm_bias;        // the norm's weight (and bias, LayerNorm)
  std::vector<std::string> products;  // the first feed-forward products, after that norm
  std::string product_bias;           // OPT's fc1.bias
};

InputSource input_source(const std::string& name, LanguageFamily family, bool tied_lm_head) {
  // The name with `tail` replaced by `with`, when it ends in `tail`.
  const auto swap = [&](const std::string& tail, const std::string& with) -> std::optional<std::string> {
    if (!name.ends_with(tail)) return std::nullopt;
    return name.substr(0, name.size() - tail.size()) + with;
  };
  InputSource src;
  if (family == LanguageFamily::T5) {
    if (name.rfind("language_model.encoder.block.", 0) != 0 && name.rfind("language_model.decoder.block.", 0) != 0) {
      if (name == "language_model.lm_head.weight" || (tied_lm_head && name == "language_model.shared.weight"))
        src.norm = "language_model.decoder.final_layer_norm.weight";
      return src;
    }
    const size_t at = name.find(".layer.");  // ….layer.N.<module>: the norm is ….layer.N.layer_norm.weight
    const size_t end = at == std::string::npos ? at : name.find('.', at + 7);
    if (end == std::string::npos) return src;
    const std::string layer = name.substr(0, end + 1);
    const std::string module = name.substr(end + 1);
    if (module == "EncDecAttention.k.weight" || module == "EncDecAttention.v.weight") {
      src.norm = "language_model.encoder.final_layer_norm.weight";  // they read the encoder's output
    } else if (module == "SelfAttention.q.weight" || module == "SelfAttention.k.weight" ||
               module == "SelfAttention.v.weight" || module == "EncDecAttention.q.weight" ||
               module.rfind("DenseReluDense.wi", 0) == 0) {
      src.norm = layer + "layer_norm.weight";
    } else if (module == "DenseReluDense.wo.weight") {
      src.norm = layer + "layer_norm.weight";
      src.products = {layer + "DenseReluDense.wi_0.weight", layer + "DenseReluDense.wi_1.weight",
                      layer + "DenseReluDense.wi.weight"};
    }
  } else if (family == LanguageFamily::OPT) {
    const std::string p = "language_model.model.decoder.";
    if (name == "language_model.lm_head.weight" || (tied_lm_head && name == p + "embed_tokens.weight")) {
      src.norm = p + "final_layer_norm.weight";
      src.norm_bias = p + "final_layer_norm.bias";
    } else if (name.rfind(p + "layers.", 0) == 0) {
      for (const char* proj : {".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight"})
        if (auto n = swap(proj, ".self_attn_layer_norm.weight")) {
          src.norm = *n;
          src.norm_bias = *swap(proj, ".self_attn_layer_norm.bias");
        }
      if (auto n = swap(".fc1.weight", ".final_layer_norm.weight")) {
        src.norm = *n;
        src.norm_bias = *swap(".fc1.weight", ".final_layer_norm.bias");
      }
      if (auto n = swap(".fc2.weight", ".final_layer_norm.weight")) {
        src.norm = *n;
        src.norm_bias = *swap(".fc2.weight", ".final_layer_norm.bias");
        src.products = {*swap(".fc2.weight", ".fc1.weight")};
        src.product_bias = *swap(".fc2.weight", ".fc1.bias");
      }
    }
  } else {  // LLaMA (Vicuna)
    const std::string p = "language_model.model.";
    if (name == "language_model.lm_head.weight" || (tied_lm_head && name == p + "embed_tokens.weight")) {
      src.norm = p + "norm.weight";
    } else if (name.rfind(p + "layers.", 0) == 0) {
      for (const char* proj : {".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight"})
        if (auto n = swap(proj, ".input_layernorm.weight")) src.norm = *n;
      for (const char* proj : {".mlp.gate_proj.weight", ".mlp.up_proj.weight"})
        if (auto n = swap(proj, ".post_attention_layernorm.weight")) src.norm = *n;
      if (auto n = swap(".mlp.down_proj.weight", ".post_attention_layernorm.weight")) {
        src.norm = *n;
        src.products = {*swap(".mlp.down_proj.weight", ".mlp.gate_proj.weight"),
                        *swap(".mlp.down_proj.weight", ".mlp.up_proj.weight")};
      }
    }
  }
  return src;
}

// The input columns of linear `name` ([rows, cols] w) to keep in float when it is quantized:
// ops::float_columns_for over the estimate its input source gives, from the tensors as the checkpoint stores
// them. None when a source tensor is absent, pre-quantized (its file holds the columns) or of a size that does
// not fit (the model's own take() then names the problem).
std::vector<int32_t> float_columns_of(const std::string& name, const Weight& w, LanguageFamily family,
                                      bool tied_lm_head, const Checkpoint& ck) {
  const InputSource src = input_source(name, family, tied_lm_head);
  if (src.norm.empty()) return {};
  const auto sized = [](const Weight& t, int64_t n) { return !t.empty() && numel(t.shape) == n; };
  const Weight gamma = ck.stored(src.norm);
  const int64_t d = numel(gamma.shape);
  const Weight beta = src.norm_bias.empty() ? Weight{} : ck.stored(src.norm_bias);
  if (gamma.empty() || (!src.norm_bias.empty() && !sized(beta, d))) return {};
  std::vector<float> scale = ops::norm_output_scale(gamma, beta);
  if (!src.products.empty()) {  // the second feed-forward product reads the first ones' outputs
    std::vector<float> product;
    for (const std::string& p : src.products) {
      if (!ck.has(p)) continue;  // T5 has wi_0 and wi_1, or (v1.0) wi alone
      const Weight first = ck.stored(p);
      if (first.empty() || first.shape.size() != 2 || first.cols() != d || first.rows() != w.cols()) return {};
      const Weight b = src.product_bias.empty() ? Weight{} : ck.stored(src.product_bias);
      if (!src.product_bias.empty() && !sized(b, first.rows())) return {};
      std::vector<float> s = ops::product_output_scale(first, scale, b);
      ck.release_pages(p);  // converted already (or soon, from the page cache): not kept in this process
      if (product.empty()) product = std::move(s);
      else for (size_t j = 0; j < s.size(); ++j) product[j] *= s[j];
    }
    if (product.empty()) return {};
    scale = std::move(product);
  }
  if (static_cast<int64_t>(scale.size()) != w.cols()) return {};
  return ops::float_columns_for(scale);
}

}  // namespace

bool converts_tensor(const std::string& name, const Shape& shape, bool tied_lm_head) {
  if (shape.size() != 2) return false;  // patch embedding (4-D), class/position embeddings, query tokens (3-D)
  static const char* const kLinear[] = {
      // ViT
      ".self_attn.qkv.weight", ".self_attn.projection.weight", ".mlp.fc1.weight", ".mlp.fc2.weight",
      // Q-Former (attention q/k/v and output dense, query FFN, text FFN: its output is ".output.dense")
      ".attention.query.weight", ".attention.key.weight", ".attention.value.weight", ".output.dense.weight",
      ".intermediate_query.dense.weight", ".output_query.dense.weight", ".intermediate.dense.weight",
      // T5 attention and feed-forward
      "Attention.q.weight", "Attention.k.weight", "Attention.v.weight", "Attention.o.weight",
      ".DenseReluDense.wi.weight", ".DenseReluDense.wi_0.weight", ".DenseReluDense.wi_1.weight",
      ".DenseReluDense.wo.weight",
      // OPT attention, feed-forward and the projections around a narrower embedding
      ".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight",
      ".self_attn.out_proj.weight", ".fc1.weight", ".fc2.weight", ".project_in.weight", ".project_out.weight",
      // LLaMA attention output and SwiGLU feed-forward (q/k/v_proj as OPT's)
      ".self_attn.o_proj.weight", ".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight"};
  if (name == "language_projection.weight" || name == "language_model.lm_head.weight") return true;
  // Retrieval's heads over the Q-Former outputs
  if (name == "vision_projection.weight" || name == "text_projection.weight" || name == "itm_head.weight") return true;
  if (name.rfind("vision_model.", 0) == 0 || name.rfind("qformer.", 0) == 0 || name.rfind("language_model.", 0) == 0)
    for (const char* s : kLinear)
      if (name.ends_with(s)) return true;
  if (tied_lm_head && is_lookup_embedding(name)) return true;
  return false;
}

const char* tower_name(Tower t) {
  switch (t) {
    case Tower::Vision: return "vision";
    case Tower::QFormer: return "qformer";
    case Tower::Language: return "lm";
  }
  return "?";
}

Tower tower_of(const std::string& name) {
  if (name.rfind("vision_model.", 0) == 0) return Tower::Vision;
  if (name.rfind("language_model.", 0) == 0) return Tower::Language;
  return Tower::QFormer;
}

WeightFormat tower_format(const LoadOptions& o, Tower t, LanguageFamily family) {
  const std::optional<WeightFormat>& own =
      t == Tower::Vision ? o.vision_weights : t == Tower::QFormer ? o.qformer_weights : o.lm_weights;
  if (own) return *own;
  if (o.precision == "lavis") {
    if (t == Tower::Vision) return WeightFormat::F16;
    if (t == Tower::QFormer) return WeightFormat::F32;
    return family == LanguageFamily::T5 ? WeightFormat::BF16 : WeightFormat::F16;
  }
  if (!o.precision.empty()) fail(ErrorKind::Usage, "unknown precision '" + o.precision + "' (choose lavis)");
  return t == Tower::Vision && o.weights == WeightFormat::I4 ? WeightFormat::I8 : o.weights;
}

Checkpoint::Convert weight_converter(const LoadOptions& o, LanguageFamily family, bool tied_lm_head,
                                     const Checkpoint* checkpoint) {
  const Device device = o.device.kind;
  std::array<WeightFormat, 3> formats{};
  bool all_stored = true;
  for (Tower t : {Tower::Vision, Tower::QFormer, Tower::Language}) {
    const WeightFormat f = formats[static_cast<int>(t)] = tower_format(o, t, family);
    all_stored = all_stored && f == WeightFormat::AsStored;
    if (f == WeightFormat::I4 && o.int4_group != 32 && o.int4_group != 64 && o.int4_group != 128)
      fail(ErrorKind::Usage, "int4 group size must be 32, 64 or 128 (got " + std::to_string(o.int4_group) + ")");
    // The CUDA kernels cover float and int8 weights; int4 (a layout made for the AVX2 kernels) is CPU-only.
    if (f == WeightFormat::I4 && device == Device::CUDA)
      fail(ErrorKind::Usage, std::string("int4 weights run on the CPU only (") + tower_name(t) +
                                 "); on cuda choose f32, f16, bf16 or int8");
  }
  if (all_stored && device == Device::CPU) return nullptr;
  return [o, formats, tied_lm_head, device, family, checkpoint](const std::string& name, const Weight& w) -> Weight {
    if (w.quantized()) return prequantized_weight(name, w, formats[static_cast<int>(tower_of(name))], o.int4_group,
                                                  converts_tensor(name, w.shape, tied_lm_head), device);
    if (converts_tensor(name, w.shape, tied_lm_head)) {
      const WeightFormat f = formats[static_cast<int>(tower_of(name))];
      // Float columns only where the product runs on the host (a GPU copy would quantize them back).
      const bool quantized = f == WeightFormat::I8 || f == WeightFormat::I4;
      const std::vector<int32_t> columns = quantized && checkpoint && host_memory(device)
                                               ? float_columns_of(name, w, family, tied_lm_head, *checkpoint)
                                               : std::vector<int32_t>{};
      return ops::convert_weight(w, f, o.int4_group, columns).to(device);
    }
    if (device != Device::CPU) return w.to(device);
    // The small tensors that stay as stored (norms, biases, position tables: a few MB in all) are copied too,
    // so that once loading is done no page of the file is needed in memory. An untied embedding stays in the
    // file: a lookup reads only the rows it needs.
    if (is_lookup_embedding(name)) return w;
    return copy_weight(w);
  };
}

std::unique_ptr<Checkpoint> open_checkpoint(const std::string& dir, const LoadOptions& options, LanguageFamily family,
                                            const Checkpoint::Progress& progress) {
  par::set_threads(options.threads);
  if (options.device.kind == Device::CUDA) cuda::select_device(options.device.index);
  auto ck = std::make_unique<Checkpoint>(dir, progress);
  ck->set_convert(weight_converter(options, family, !ck->has("language_model.lm_head.weight"),
                                   options.float_columns ? ck.get() : nullptr));
  return ck;
}

}  // namespace blip2
