// Fixture parity: every stage tensor of every case of tiny-blip2-t5 against Hugging Face transformers,
// and every greedy sequence exactly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "generate/generate.h"
#include "image/image.h"
#include "io/safetensors.h"
#include "model/blip2.h"
#include "support.h"

using namespace blip2;
using namespace blip2::test;

namespace {

class Blip2Fixture : public ::testing::TestWithParam<std::string> {
 protected:
  static void SetUpTestSuite() {
    model_ = new Blip2Model(BLIP2_TINY_T5_DIR);
    ref_ = new SafetensorsFile(kFixtures + "/tiny-blip2-t5/reference.safetensors");
    cases_ = new nlohmann::json(read_json(kFixtures + "/tiny-blip2-t5/reference.json")["cases"]);
  }
  static void TearDownTestSuite() {
    delete model_;
    delete ref_;
    delete cases_;
  }
  const nlohmann::json& c() const { return (*cases_)[GetParam()]; }

  Encoded encode() const {
    std::vector<RgbImage> imgs;
    for (const auto& name : c()["images"]) imgs.push_back(load_image(kFixtures + "/images/" + name.get<std::string>()));
    const PromptBatch p = model_->tokenize(c()["prompts"].get<std::vector<std::string>>());
    return model_->encode(preprocess_images(imgs, 224), p);
  }

  void expect_close(const std::string& stage, const Tensor& got) const {
    const Tensor want = ref_->tensor(GetParam() + "/" + stage);
    ASSERT_EQ(got.shape, want.shape) << stage;
    const Diff d = compare(got, want);
    std::printf("  %-14s %-26s rel %.3g  max_abs %.3g\n", GetParam().c_str(), stage.c_str(), d.rel, d.max_abs);
    EXPECT_LE(d.rel, kMaxRel) << stage;
    EXPECT_LE(d.max_abs, kMaxAbs) << stage;
  }

  static Blip2Model* model_;
  static SafetensorsFile* ref_;
  static nlohmann::json* cases_;
};

Blip2Model* Blip2Fixture::model_ = nullptr;
SafetensorsFile* Blip2Fixture::ref_ = nullptr;
nlohmann::json* Blip2Fixture::cases_ = nullptr;

TEST_P(Blip2Fixture, TokenizedPromptsMatch) {
  const PromptBatch p = model_->tokenize(c()["prompts"].get<std::vector<std::string>>());
  std::vector<std::vector<int32_t>> ids;
  std::vector<std::vector<int>> mask;
  for (int64_t b = 0; b < p.batch; ++b) {
    ids.emplace_back(p.ids.begin() + b * p.length, p.ids.begin() + (b + 1) * p.length);
    mask.emplace_back(p.mask.begin() + b * p.length, p.mask.begin() + (b + 1) * p.length);
  }
  EXPECT_EQ(ids, c()["input_ids"].get<std::vector<std::vector<int32_t>>>());
  EXPECT_EQ(mask, c()["attention_mask"].get<std::vector<std::vector<int>>>());
}

TEST_P(Blip2Fixture, EveryStageMatchesReference) {
  const Encoded e = encode();
  expect_close("vision_last_hidden_state", e.vision_last_hidden_state);
  expect_close("qformer_last_hidden_state", e.qformer_last_hidden_state);
  expect_close("language_projection", e.language_projection);
  expect_close("encoder_last_hidden_state", e.encoder_last_hidden_state);
  expect_close("forced_logits", forced_logits(*model_, e, c()["forced_decoder_input_ids"].get<std::vector<std::vector<int32_t>>>()));
  expect_close("greedy_logits", forced_logits(*model_, e, c()["generate"]["greedy"]["sequences"].get<std::vector<std::vector<int32_t>>>()));
}

// Reference sequences start with the decoder start token and may continue past the first eos with padding.
std::vector<int32_t> trim(const std::vector<int32_t>& seq, int32_t eos) {
  std::vector<int32_t> out;
  for (size_t i = 1; i < seq.size(); ++i) {
    out.push_back(seq[i]);
    if (seq[i] == eos) break;
  }
  return out;
}

TEST_P(Blip2Fixture, GreedySequencesExact) {
  const Encoded e = encode();
  const auto& g = c()["generate"]["greedy"];
  GenerationOptions o;
  o.max_new_tokens = g["kwargs"]["max_new_tokens"].get<int>();
  const auto results = generate([&](int expand) { return model_->start_decoder(e, expand); },
                                static_cast<int>(e.batch()), o,
                                SpecialTokens{});
  const auto want = g["sequences"].get<std::vector<std::vector<int32_t>>>();
  ASSERT_EQ(results.size(), want.size());
  for (size_t b = 0; b < want.size(); ++b) {
    EXPECT_EQ(results[b][0].ids, trim(want[b], 1)) << "item " << b;
    EXPECT_EQ(model_->tokenizer().decode(results[b][0].ids), g["text"][b].get<std::string>()) << "item " << b;
  }
}

INSTANTIATE_TEST_SUITE_P(TinyT5, Blip2Fixture, ::testing::Values("caption", "vqa", "seed_question", "batch2"));

// On the CPU a batch's images go through the vision encoder one at a time (vision.cpp: a batch's activations
// outgrew the cache), so each image's vision output is bit for bit what it gets alone, with float weights too
// (sgemm alone would block a batch's rows differently).
TEST(VisionBatch, EachImageGetsTheBitsItGetsAlone) {
  const Blip2Model m(BLIP2_TINY_T5_DIR);
  const std::vector<std::string> names = {"astronaut.png", "chelsea.png", "coffee.png"};
  std::vector<RgbImage> imgs;
  for (const auto& n : names) imgs.push_back(load_image(kFixtures + "/images/" + n));
  const Tensor batch = m.encode_image(preprocess_images(imgs, 224)).vision_last_hidden_state;
  ASSERT_EQ(batch.dim(0), 3);
  const int64_t per_image = batch.size() / 3;
  for (size_t i = 0; i < imgs.size(); ++i) {
    const Tensor alone = m.encode_image(preprocess_images({imgs[i]}, 224)).vision_last_hidden_state;
    ASSERT_EQ(alone.size(), per_image);
    EXPECT_TRUE(std::equal(alone.data.begin(), alone.data.end(), batch.data.begin() + i * per_image)) << names[i];
  }
}

}  // namespace
