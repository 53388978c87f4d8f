#include "model/vision.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "core/error.h"
#include "ops/ops.h"

namespace blip2 {

namespace {

// Older checkpoints store the qkv bias as separate q_bias / v_bias (the key bias is zero by design). Built on
// the host, then placed where the loaded weights are.
Weight qkv_bias(Checkpoint& ck, const std::string& p, int64_t d) {
  if (ck.has(p + "qkv.bias") || !ck.has(p + "q_bias")) return ck.take(p + "qkv.bias", {3 * d});
  const Weight q = ck.take(p + "q_bias", {d}), v = ck.take(p + "v_bias", {d});
  auto buf = std::make_shared<std::vector<float>>(static_cast<size_t>(3 * d), 0.0f);
  const std::vector<float> qf = q.f32(), vf = v.f32();
  std::copy(qf.begin(), qf.end(), buf->begin());
  std::copy(vf.begin(), vf.end(), buf->begin() + 2 * d);
  Weight w;
  w.shape = {3 * d};
  w.data = buf->data();
  w.owner = buf;
  return w.to(q.device);
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
  const int S = cfg_.image_size;
  const int64_t B = pixels.shape.empty() ? 0 : pixels.dim(0);
  if (pixels.shape != Shape{B, 3, S, S} || B < 1)
    fail(ErrorKind::Input, "pixel tensor has shape " + shape_str(pixels.shape) + ", the model takes " +
                               shape_str({std::max<int64_t>(B, 1), 3, S, S}));
  // The pixels come from the host (preprocessing); they go where the weights are, copied only if elsewhere.
  const Device dev = patch_w_.device;
  const Tensor uploaded = pixels.device == dev ? Tensor() : pixels.to(dev);
  const Tensor& px = pixels.device == dev ? pixels : uploaded;
  if (!host_memory(dev) || B == 1) return encode(px);
  // On the CPU one image's 257 rows already keep every product bound by arithmetic, while a batch's
  // activations (B × 257 × 6144 floats after fc1) outgrow the last-level cache: XL int8 measured 2.55 s per
  // image alone against 3.0–3.4 s per image in a batch of 8. So the images go through one at a time, and each
  // gets exactly the bits it gets alone (the integer kernels would give them in a batch too, sgemm would not).
  // The emulated device does the same, so that it keeps giving the CPU's bits; a GPU takes the batch at once.
  const int64_t T = (S / cfg_.patch_size) * (S / cfg_.patch_size) + 1;
  Tensor h({B, T, cfg_.hidden_size}, dev);
  Tensor one({1, 3, S, S}, dev);
  for (int64_t b = 0; b < B; ++b) {
    ops::copy_rows(px, b * 3 * S, one, 0, 3 * S);
    ops::copy_rows(encode(one), 0, h, b * T, T);
  }
  return h;
}

Tensor VisionModel::encode(const Tensor& px) const {
  const int64_t B = px.dim(0);
  const int64_t G = cfg_.image_size / cfg_.patch_size;
  const int64_t d = cfg_.hidden_size, T = G * G + 1;
  const Device dev = px.device;

  // Patch embedding as a product over the unrolled patches.
  const Tensor emb = ops::linear(ops::patchify(px, cfg_.patch_size), patch_w_, patch_b_);

  // [CLS ; patches] + positions
  Tensor h({B, T, d}, dev);
  const Tensor cls = ops::weight_tensor(class_emb_);
  for (int64_t b = 0; b < B; ++b) {
    ops::copy_rows(cls, 0, h, b * T, 1);
    ops::copy_rows(emb, b * (T - 1), h, b * T + 1, T - 1);
  }
  ops::add_broadcast(h, ops::weight_tensor(pos_emb_));

  const int heads = cfg_.num_heads, hd = static_cast<int>(d / heads);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (const Layer& L : layers_) {
    Tensor x = h;
    ops::layer_norm(x, L.ln1_w, L.ln1_b, cfg_.layer_norm_eps);
    const Tensor qkv = ops::linear(x, L.qkv_w, L.qkv_b);  // [B, T, 3d]: Q | K | V
    Tensor ctx({B, T, d}, dev);
    for (int64_t b = 0; b < B; ++b) {
      const float* base = qkv.data_ptr() + b * T * 3 * d;
      ops::attention({.device = dev, .q = base, .ldq = 3 * d, .tq = T, .k = base + d, .ldk = 3 * d, .v = base + 2 * d,
                      .ldv = 3 * d, .tk = T, .heads = heads, .head_dim = hd, .scale = scale,
                      .out = ctx.data_ptr() + b * T * d, .ldo = d});
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
