#include "model/vision.h"

#include <cmath>
#include <cstring>
#include <memory>

#include "ops/ops.h"

namespace blip2 {

namespace {

// Older checkpoints store the qkv bias as separate q_bias / v_bias (the key bias is zero by design).
Weight qkv_bias(Checkpoint& ck, const std::string& p, int64_t d) {
  if (ck.has(p + "qkv.bias") || !ck.has(p + "q_bias")) return ck.take(p + "qkv.bias", {3 * d});
  const Weight q = ck.take(p + "q_bias", {d}), v = ck.take(p + "v_bias", {d});
  auto buf = std::shared_ptr<float[]>(new float[3 * d]());
  q.to_f32(0, d, buf.get());
  v.to_f32(0, d, buf.get() + 2 * d);
  Weight w;
  w.shape = {3 * d};
  w.data = buf.get();
  w.owner = buf;
  return w;
}

}  // namespace

VisionModel::VisionModel(Checkpoint& ck, const VisionConfig& cfg) : cfg_(cfg) {
  const int64_t d = cfg.hidden_size, f = cfg.intermediate_size, p = cfg.patch_size;
  const std::string e = "vision_model.embeddings.";
  patch_w_ = ck.take(e + "patch_embedding.weight", {d, 3, p, p});
  patch_b_ = ck.take(e + "patch_embedding.bias", {d});
  class_emb_ = ck.take(e + "class_embedding", {1, 1, d});
  pos_emb_ = ck.take(e + "position_embedding", {1, cfg.num_positions(), d});
  for (int i = 0; i < cfg.num_layers; ++i) {
    const std::string l = "vision_model.encoder.layers." + std::to_string(i) + ".";
    Layer L;
    L.ln1_w = ck.take(l + "layer_norm1.weight", {d});
    L.ln1_b = ck.take(l + "layer_norm1.bias", {d});
    L.qkv_w = ck.take(l + "self_attn.qkv.weight", {3 * d, d});
    if (cfg.qkv_bias) L.qkv_b = qkv_bias(ck, l + "self_attn.", d);
    L.proj_w = ck.take(l + "self_attn.projection.weight", {d, d});
    L.proj_b = ck.take(l + "self_attn.projection.bias", {d});
    L.ln2_w = ck.take(l + "layer_norm2.weight", {d});
    L.ln2_b = ck.take(l + "layer_norm2.bias", {d});
    L.fc1_w = ck.take(l + "mlp.fc1.weight", {f, d});
    L.fc1_b = ck.take(l + "mlp.fc1.bias", {f});
    L.fc2_w = ck.take(l + "mlp.fc2.weight", {d, f});
    L.fc2_b = ck.take(l + "mlp.fc2.bias", {d});
    layers_.push_back(std::move(L));
  }
  post_w_ = ck.take("vision_model.post_layernorm.weight", {d});
  post_b_ = ck.take("vision_model.post_layernorm.bias", {d});
}

Tensor VisionModel::forward(const Tensor& pixels) const {
  const int64_t B = pixels.dim(0), S = cfg_.image_size, P = cfg_.patch_size, G = S / P;
  const int64_t d = cfg_.hidden_size, T = G * G + 1, K = 3 * P * P;

  // Patch embedding as a product: each patch unrolled in the conv weight's (channel, ky, kx) order.
  Tensor patches({B, G * G, K});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t gy = 0; gy < G; ++gy)
      for (int64_t gx = 0; gx < G; ++gx) {
        float* dst = patches.ptr() + ((b * G + gy) * G + gx) * K;
        for (int64_t c = 0; c < 3; ++c)
          for (int64_t ky = 0; ky < P; ++ky) {
            const float* src = pixels.ptr() + ((b * 3 + c) * S + gy * P + ky) * S + gx * P;
            std::memcpy(dst + (c * P + ky) * P, src, static_cast<size_t>(P) * 4);
          }
      }
  const Tensor emb = ops::linear(patches, patch_w_, patch_b_);

  // [CLS ; patches] + positions
  Tensor h({B, T, d});
  const std::vector<float> cls = class_emb_.f32(), pos = pos_emb_.f32();
  for (int64_t b = 0; b < B; ++b) {
    float* hb = h.ptr() + b * T * d;
    std::memcpy(hb, cls.data(), static_cast<size_t>(d) * 4);
    std::memcpy(hb + d, emb.ptr() + b * (T - 1) * d, static_cast<size_t>((T - 1) * d) * 4);
    for (int64_t i = 0; i < T * d; ++i) hb[i] += pos[i];
  }

  const int heads = cfg_.num_heads, hd = static_cast<int>(d / heads);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (const Layer& L : layers_) {
    Tensor x = h;
    ops::layer_norm(x, L.ln1_w, L.ln1_b, cfg_.layer_norm_eps);
    const Tensor qkv = ops::linear(x, L.qkv_w, L.qkv_b);  // [B, T, 3d]: Q | K | V
    Tensor ctx({B, T, d});
    for (int64_t b = 0; b < B; ++b) {
      const float* base = qkv.ptr() + b * T * 3 * d;
      ops::attention({.q = base, .ldq = 3 * d, .tq = T, .k = base + d, .ldk = 3 * d, .v = base + 2 * d,
                      .ldv = 3 * d, .tk = T, .heads = heads, .head_dim = hd, .scale = scale,
                      .out = ctx.ptr() + b * T * d, .ldo = d});
    }
    ops::add(h, ops::linear(ctx, L.proj_w, L.proj_b));

    x = h;
    ops::layer_norm(x, L.ln2_w, L.ln2_b, cfg_.layer_norm_eps);
    Tensor m = ops::linear(x, L.fc1_w, L.fc1_b);
    ops::activate(m, cfg_.act);
    ops::add(h, ops::linear(m, L.fc2_w, L.fc2_b));
  }
  ops::layer_norm(h, post_w_, post_b_, cfg_.layer_norm_eps);
  return h;
}

}  // namespace blip2
