// Checkpoints of other shapes than the fixture's, checked against the fixture's reference tensors.
//
// No reference exists for other shapes, so each variant is built from the fixture checkpoint by a
// transformation that provably leaves the model's function unchanged (zero-padded heads, identity layers,
// a dropped key bias, tied aliases). The engine must then still agree with transformers at every stage,
// which it can only do if it reads the new shapes correctly. Variants that do change the function
// (gelu_new, fewer query tokens) are checked for the effect they must have.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>

#include "generate/generate.h"
#include "image/image.h"
#include "io/safetensors.h"
#include "model/blip2.h"
#include "support.h"

using namespace blip2;
using blip2::test::random_tensor;
namespace fs = std::filesystem;

namespace {

const std::string kFixtures = BLIP2_FIXTURES_DIR;

// A writable copy of the tiny T5 model.
struct Variant : test::Variant {
  explicit Variant(const std::string& name) : test::Variant("t5-" + name, BLIP2_TINY_T5_DIR) {}
};

struct Outputs {
  Encoded enc;
  Tensor logits;                 // teacher-forced on the case's forced_decoder_input_ids
  std::vector<int32_t> greedy;   // greedy ids of item 0
};

// Runs the fixture's "vqa" case (image + prompt) through a model.
Outputs run_vqa(const Blip2Model& m) {
  std::ifstream in(kFixtures + "/tiny-blip2-t5/reference.json");
  const auto c = nlohmann::json::parse(in)["cases"]["vqa"];
  const Tensor pixels =
      preprocess_images({load_image(kFixtures + "/images/" + c["images"][0].get<std::string>())}, 224);
  Outputs r;
  r.enc = m.encode(pixels, m.tokenize({c["prompts"][0].get<std::string>()}));
  const auto ids = c["forced_decoder_input_ids"][0].get<std::vector<int32_t>>();
  auto dec = m.start_decoder(r.enc);
  const int64_t V = dec->vocab_size(), T = static_cast<int64_t>(ids.size());
  r.logits = Tensor({1, T, V});
  for (int64_t t = 0; t < T; ++t) {
    const Tensor l = dec->step({ids[t]});
    std::copy(l.ptr(), l.ptr() + V, r.logits.ptr() + t * V);
  }
  GenerationOptions o;
  o.max_new_tokens = 12;
  r.greedy = generate([&](int e) { return m.start_decoder(r.enc, e); }, 1, o, {})[0][0].ids;
  return r;
}

std::vector<int32_t> reference_greedy() {
  std::ifstream in(kFixtures + "/tiny-blip2-t5/reference.json");
  auto seq = nlohmann::json::parse(in)["cases"]["vqa"]["generate"]["greedy"]["sequences"][0].get<std::vector<int32_t>>();
  return {seq.begin() + 1, seq.end()};
}

// Every stage of `r` equals transformers' reference for the vqa case.
void expect_matches_reference(const Outputs& r) {
  const SafetensorsFile ref(kFixtures + "/tiny-blip2-t5/reference.safetensors");
  const std::pair<const char*, const Tensor*> stages[] = {
      {"vision_last_hidden_state", &r.enc.vision_last_hidden_state},
      {"qformer_last_hidden_state", &r.enc.qformer_last_hidden_state},
      {"language_projection", &r.enc.language_projection},
      {"encoder_last_hidden_state", &r.enc.encoder_last_hidden_state},
      {"forced_logits", &r.logits}};
  for (const auto& [name, t] : stages) {
    const Tensor want = ref.tensor(std::string("vqa/") + name);
    ASSERT_EQ(t->shape, want.shape) << name;
    EXPECT_LE(test::compare(*t, want).rel, 1e-5) << name;
  }
  EXPECT_EQ(r.greedy, reference_greedy());
}

TEST(OtherShapes, ImageTokenConfigGivesTheSameNumbers) {
  // Newer hub configs name an image token (T5: 32100); the projected queries take its slots, which is
  // numerically the legacy layout: every stage and the greedy answer stay transformers' reference.
  Variant v("image-token");
  v.config["image_token_index"] = 1100;
  const Blip2Model m = v.load();
  const Outputs r = run_vqa(m);
  EXPECT_EQ(r.enc.input_ids[0], 1100);
  expect_matches_reference(r);
}

TEST(OtherShapes, HeadDimTimesHeadsDiffersFromDModel) {
  // d_kv 16 -> 24: each head gets 8 extra dims; q's extra rows are random, k's and v's zero, so scores and
  // contexts are unchanged; o's extra columns are random and multiply zeros.
  Variant v("dkv");
  const int64_t H = 4, old_dk = 16, new_dk = 24, d = 64;
  uint32_t seed = 1;
  for (auto& [name, t] : v.tensors) {
    if (name.rfind("language_model.", 0) != 0) continue;
    const bool attn = name.find("SelfAttention.") != std::string::npos || name.find("EncDecAttention.") != std::string::npos;
    if (!attn || name.find("relative_attention_bias") != std::string::npos) continue;
    const char kind = name[name.size() - 8];  // q / k / v / o before ".weight"
    Tensor n = kind == 'o' ? random_tensor({d, H * new_dk}, seed++) : Tensor({H * new_dk, d});
    if (kind == 'q') n = random_tensor({H * new_dk, d}, seed++);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < old_dk; ++i)
        for (int64_t j = 0; j < d; ++j) {
          if (kind == 'o') n.data[j * H * new_dk + h * new_dk + i] = t.data[j * H * old_dk + h * old_dk + i];
          else n.data[(h * new_dk + i) * d + j] = t.data[(h * old_dk + i) * d + j];
        }
    t = std::move(n);
  }
  v.config["text_config"]["d_kv"] = new_dk;
  expect_matches_reference(run_vqa(v.load()));
}

TEST(OtherShapes, ExtraIdentityLayers) {
  // One more ViT layer and one more T5 encoder and decoder block whose output projections are zero:
  // residual blocks that add nothing. Their other weights are random.
  Variant v("layers");
  uint32_t seed = 100;
  auto add = [&](const std::string& name, const Shape& s, bool zero) {
    v.tensors[name] = zero ? Tensor(s) : random_tensor(s, seed++);
  };
  const std::string l = "vision_model.encoder.layers.3.";
  for (const char* n : {"layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias"}) add(l + n, {64}, false);
  add(l + "self_attn.qkv.weight", {192, 64}, false);
  add(l + "self_attn.qkv.bias", {192}, false);
  add(l + "self_attn.projection.weight", {64, 64}, true);
  add(l + "self_attn.projection.bias", {64}, true);
  add(l + "mlp.fc1.weight", {128, 64}, false);
  add(l + "mlp.fc1.bias", {128}, false);
  add(l + "mlp.fc2.weight", {64, 128}, true);
  add(l + "mlp.fc2.bias", {64}, true);
  v.config["vision_config"]["num_hidden_layers"] = 4;

  const std::string e = "language_model.encoder.block.3.layer.", dd = "language_model.decoder.block.2.layer.";
  for (const std::string& p : {e + "0.SelfAttention.", dd + "0.SelfAttention.", dd + "1.EncDecAttention."}) {
    for (const char* n : {"q", "k", "v"}) add(p + n + ".weight", {64, 64}, false);
    add(p + "o.weight", {64, 64}, true);
  }
  for (const std::string& p : {e + "0.", e + "1.", dd + "0.", dd + "1.", dd + "2."}) add(p + "layer_norm.weight", {64}, false);
  for (const std::string& p : {e + "1.DenseReluDense.", dd + "2.DenseReluDense."}) {
    add(p + "wi_0.weight", {128, 64}, false);
    add(p + "wi_1.weight", {128, 64}, false);
    add(p + "wo.weight", {64, 128}, true);
  }
  v.config["text_config"]["num_layers"] = 4;
  v.config["text_config"]["num_decoder_layers"] = 3;
  expect_matches_reference(run_vqa(v.load()));
}

TEST(OtherShapes, SeparateQueryAndValueBiases) {
  // The pre-merge layout: q_bias and v_bias instead of qkv.bias. The key bias is dropped, which leaves
  // attention unchanged (it adds the same amount to every score of a query).
  Variant v("qvbias");
  for (int i = 0; i < 3; ++i) {
    const std::string p = "vision_model.encoder.layers." + std::to_string(i) + ".self_attn.";
    const Tensor b = v.tensors.at(p + "qkv.bias");
    Tensor q({64}), val({64});
    std::copy(b.data.begin(), b.data.begin() + 64, q.data.begin());
    std::copy(b.data.begin() + 128, b.data.end(), val.data.begin());
    v.tensors.erase(p + "qkv.bias");
    v.tensors[p + "q_bias"] = q;
    v.tensors[p + "v_bias"] = val;
  }
  expect_matches_reference(run_vqa(v.load()));
}

TEST(OtherShapes, EmbeddingAliasesAreInterchangeable) {
  for (const char* keep : {"language_model.shared.weight", "language_model.encoder.embed_tokens.weight",
                           "language_model.decoder.embed_tokens.weight"}) {
    Variant v("alias");
    for (const char* n : {"language_model.shared.weight", "language_model.encoder.embed_tokens.weight",
                          "language_model.decoder.embed_tokens.weight"})
      if (std::string(n) != keep) v.tensors.erase(n);
    SCOPED_TRACE(keep);
    expect_matches_reference(run_vqa(v.load()));
  }
}

TEST(OtherShapes, AbsentLmHeadMeansTiedWithRescale) {
  // Tied: logits = (h · d^-0.5) · sharedᵀ. The same function written as an explicit lm_head must agree.
  Variant tied("tied");
  tied.tensors.erase("language_model.lm_head.weight");
  const Outputs a = run_vqa(tied.load());
  EXPECT_TRUE(tied.load().tied_lm_head());

  Variant expl("explicit");
  Tensor head = expl.tensors.at("language_model.shared.weight");
  for (float& x : head.data) x /= std::sqrt(64.0f);
  expl.tensors["language_model.lm_head.weight"] = head;
  const Outputs b = run_vqa(expl.load());
  EXPECT_LE(test::compare(a.logits, b.logits).rel, 1e-6);
  EXPECT_EQ(a.greedy, b.greedy);
  // ... and it is not the untied model's answer
  EXPECT_GT(test::compare(a.logits, run_vqa(Variant("untied").load()).logits).rel, 1e-2);
}

TEST(OtherShapes, GeluNewIsHonoured) {
  // The tanh GELU moves logits by ~1e-3 but, on this fixture, leaves greedy sequences unchanged.
  Variant v("gelunew");
  v.config["text_config"]["dense_act_fn"] = "gelu_new";
  const Outputs r = run_vqa(v.load());
  const SafetensorsFile ref(kFixtures + "/tiny-blip2-t5/reference.safetensors");
  EXPECT_LE(test::compare(r.enc.language_projection, ref.tensor("vqa/language_projection")).rel, 1e-5);
  const double moved = test::compare(r.logits, ref.tensor("vqa/forced_logits")).rel;
  EXPECT_GT(moved, 1e-5) << "activation ignored";
  EXPECT_LT(moved, 1e-2);
  EXPECT_EQ(r.greedy, reference_greedy());
}

TEST(OtherShapes, FewerQueryTokens) {
  // 4 query tokens instead of 8: no reference exists, but every stage must take the new length.
  Variant v("queries");
  Tensor q({1, 4, 64});
  const Tensor& old = v.tensors.at("query_tokens");
  std::copy(old.data.begin(), old.data.begin() + 4 * 64, q.data.begin());
  v.tensors["query_tokens"] = q;
  v.config["num_query_tokens"] = 4;
  const Outputs r = run_vqa(v.load());
  EXPECT_EQ(r.enc.qformer_last_hidden_state.shape, (Shape{1, 4, 64}));
  EXPECT_EQ(r.enc.encoder_last_hidden_state.shape, (Shape{1, 4 + 16, 64}));
  EXPECT_EQ(r.greedy.size(), 12u);
}

}  // namespace
