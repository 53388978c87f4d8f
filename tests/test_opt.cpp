// The OPT member of the family against Hugging Face transformers (tests/fixtures/tiny-blip2-opt): every
// stage tensor, the logits at every prompt position, the left-padded prompt layout, and every decoding
// setting of every case token for token; then checkpoints of other OPT layouts (image-token config, tied
// head, narrower embedding with project_in/out, post-norm blocks).
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <functional>
#include <map>
#include <random>

#include "core/error.h"
#include "generate/generate.h"
#include "io/safetensors.h"
#include "model/blip2.h"
#include "support.h"

using namespace blip2;
using namespace blip2::test;
namespace fs = std::filesystem;

namespace {

const std::string kOpt = BLIP2_BUNDLED_OPT_DIR;                 // the checkpoint (models/tiny-blip2-opt)
const std::string kOptRef = kFixtures + "/tiny-blip2-opt";       // what transformers made from it

struct OptFixture {
  Blip2Model model{kOpt};
  SafetensorsFile ref{kOptRef + "/reference.safetensors"};
  nlohmann::json cases = read_json(kOptRef + "/reference.json")["cases"];
  static OptFixture& get() {
    static OptFixture f;
    return f;
  }
};

Encoded encode_case(const Blip2Model& m, const nlohmann::json& c) {
  return m.encode(fixture_pixels(c["images"], 224), m.tokenize(c["prompts"].get<std::vector<std::string>>()));
}

std::vector<std::vector<GeneratedSequence>> run(const Blip2Model& m, const Encoded& e, const GenerationOptions& o) {
  return generate([&](int expand) { return m.start_decoder(e, expand); }, static_cast<int>(e.batch()), o,
                  m.special_tokens());
}

class OptCase : public ::testing::TestWithParam<std::string> {
 protected:
  const nlohmann::json& c() const { return OptFixture::get().cases[GetParam()]; }
  void expect_close(const std::string& stage, const Tensor& got) const {
    const Tensor want = OptFixture::get().ref.tensor(GetParam() + "/" + stage);
    ASSERT_EQ(got.shape, want.shape) << stage;
    const Diff d = compare(got, want);
    std::printf("  %-15s %-26s rel %.3g  max_abs %.3g\n", GetParam().c_str(), stage.c_str(), d.rel, d.max_abs);
    EXPECT_LE(d.rel, kMaxRel) << stage;
    EXPECT_LE(d.max_abs, kMaxAbs) << stage;
  }
};

TEST_P(OptCase, PromptsAreLeftPaddedWithBos) {
  const PromptBatch p = OptFixture::get().model.tokenize(c()["prompts"].get<std::vector<std::string>>());
  const auto ids = c()["input_ids"].get<std::vector<std::vector<int32_t>>>();
  const auto mask = c()["attention_mask"].get<std::vector<std::vector<int>>>();
  ASSERT_EQ(p.batch, static_cast<int64_t>(ids.size()));
  ASSERT_EQ(p.length, static_cast<int64_t>(ids[0].size()));
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t t = 0; t < p.length; ++t) {
      EXPECT_EQ(p.ids[b * p.length + t], ids[b][t]) << b << "," << t;
      EXPECT_EQ(p.mask[b * p.length + t], mask[b][t]) << b << "," << t;
    }
}

TEST_P(OptCase, EveryStageMatchesTheReference) {
  const Blip2Model& m = OptFixture::get().model;
  const Encoded e = encode_case(m, c());
  expect_close("vision_last_hidden_state", e.vision_last_hidden_state);
  expect_close("qformer_last_hidden_state", e.qformer_last_hidden_state);
  expect_close("language_projection", e.language_projection);
  expect_close("prompt_logits", m.prompt_logits(e));
}

TEST_P(OptCase, EveryDecodingSettingIsExact) {
  const Blip2Model& m = OptFixture::get().model;
  const Encoded e = encode_case(m, c());
  int settings = 0;
  for (const auto& [name, g] : c()["generate"].items()) {
    const GenerationOptions o = options_from(g["kwargs"]);
    const auto results = run(m, e, o);
    const auto want = g["sequences"].get<std::vector<std::vector<int32_t>>>();
    const size_t n = static_cast<size_t>(o.num_return_sequences);
    ASSERT_EQ(results.size() * n, want.size()) << name;
    for (size_t b = 0; b < results.size(); ++b)
      for (size_t i = 0; i < n; ++i) {
        EXPECT_EQ(results[b][i].ids, want[b * n + i]) << name << " item " << b << " sequence " << i;
        if (g.contains("text")) {
          EXPECT_EQ(m.tokenizer().decode(results[b][i].ids), g["text"][b * n + i].get<std::string>()) << name;
        }
      }
    ++settings;
  }
  EXPECT_EQ(settings, 8);
}

INSTANTIATE_TEST_SUITE_P(Cases, OptCase, ::testing::Values("caption", "vqa", "batch2_leftpad"));

// The CPU weight formats on OPT: prompt logits against the float32 reference, and the greedy answer.
TEST(OptWeightFormats, AccuracyPerFormat) {
  const nlohmann::json& c = OptFixture::get().cases["vqa"];
  const Tensor want = OptFixture::get().ref.tensor("vqa/prompt_logits");
  const auto greedy = c["generate"]["greedy"]["sequences"][0].get<std::vector<int32_t>>();
  struct Case { WeightFormat format; double max_rel; bool same_greedy; };
  for (const Case& k : {Case{WeightFormat::F16, 2e-3, true}, Case{WeightFormat::BF16, 1e-2, true},
                        Case{WeightFormat::I8, 5e-2, true}, Case{WeightFormat::I4, 0.5, false}}) {
    LoadOptions lo;
    lo.weights = k.format;
    const Blip2Model m(kOpt, lo);
    const Encoded e = encode_case(m, c);
    const Diff d = compare(m.prompt_logits(e), want);
    GenerationOptions o;
    o.max_new_tokens = 12;
    const auto ids = run(m, e, o)[0][0].ids;
    size_t agree = 0;
    while (agree < ids.size() && agree < greedy.size() && ids[agree] == greedy[agree]) ++agree;
    std::printf("  %-5s prompt_logits rel %.3g  max_abs %.3g  greedy agrees for %zu/12 tokens\n",
                weight_format_name(k.format), d.rel, d.max_abs, agree);
    EXPECT_LE(d.rel, k.max_rel) << weight_format_name(k.format);
    if (k.same_greedy) {
      EXPECT_EQ(ids, greedy) << weight_format_name(k.format);
    }
  }
}

// ---- Other checkpoints of the OPT layout ------------------------------------------------------------------

// A writable copy of the tiny OPT model.
struct Variant : test::Variant {
  explicit Variant(const std::string& name) : test::Variant("opt-" + name, kOpt) {}
};

const nlohmann::json& vqa_case() { return OptFixture::get().cases["vqa"]; }

TEST(OptVariants, ImageTokenConfigGivesTheSameNumbers) {
  // Newer hub configs name an image token; the queries take its slots. Same logits, same greedy answer.
  Variant v("image-token");
  v.config["image_token_index"] = 1000;
  const Blip2Model m = v.load();
  const Blip2Model& base = OptFixture::get().model;
  const Encoded e = encode_case(m, vqa_case()), eb = encode_case(base, vqa_case());
  EXPECT_EQ(e.input_ids[0], 1000);
  EXPECT_EQ(e.input_ids[7], 1000);
  EXPECT_EQ(e.input_ids[8], 2);  // BOS after the 8 query slots
  const Diff d = compare(m.prompt_logits(e), base.prompt_logits(eb));
  EXPECT_EQ(d.max_abs, 0.0);
  GenerationOptions o;
  o.max_new_tokens = 12;
  EXPECT_EQ(run(m, e, o)[0][0].ids, vqa_case()["generate"]["greedy"]["sequences"][0].get<std::vector<int32_t>>());
  // An image token typed into the prompt is refused: the model sets the image's place.
  PromptBatch p = m.tokenize({"a photo of"});
  p.ids[1] = 1000;
  try {
    m.encode_prompts(m.encode_image(fixture_pixels(vqa_case()["images"], 224)), p);
    ADD_FAILURE() << "no error";
  } catch (const Error& err) {
    EXPECT_EQ(err.kind(), ErrorKind::Input);
    EXPECT_NE(std::string(err.what()).find("image token"), std::string::npos) << err.what();
  }
}

TEST(OptVariants, AbsentLmHeadIsTiedToTheEmbedding) {
  Variant tied("tied"), expl("explicit");
  tied.tensors.erase("language_model.lm_head.weight");
  expl.tensors["language_model.lm_head.weight"] = expl.tensors["language_model.model.decoder.embed_tokens.weight"];
  const Blip2Model a = tied.load(), b = expl.load();
  EXPECT_TRUE(a.tied_lm_head());
  EXPECT_FALSE(b.tied_lm_head());
  const Diff d = compare(a.prompt_logits(encode_case(a, vqa_case())), b.prompt_logits(encode_case(b, vqa_case())));
  EXPECT_EQ(d.max_abs, 0.0);
}

TEST(OptVariants, NarrowerEmbeddingWithProjectionsAndPostNormRun) {
  // word_embed_proj_dim 32 < hidden 64 (project_in / project_out, as opt-350m), and post-norm blocks.
  Variant v("narrow");
  v.config["text_config"]["word_embed_proj_dim"] = 32;
  v.config["text_config"]["do_layer_norm_before"] = false;
  auto& t = v.tensors;
  const std::string p = "language_model.model.decoder.";
  t[p + "embed_tokens.weight"] = random_tensor({1024, 32}, 1);
  t["language_model.lm_head.weight"] = random_tensor({1024, 32}, 2);
  t[p + "project_in.weight"] = random_tensor({64, 32}, 3);
  t[p + "project_out.weight"] = random_tensor({32, 64}, 4);
  t["language_projection.weight"] = random_tensor({32, 64}, 5);
  t["language_projection.bias"] = random_tensor({32}, 6);
  t.erase(p + "final_layer_norm.weight");  // post-norm OPT has no final norm
  t.erase(p + "final_layer_norm.bias");
  const Blip2Model m = v.load();
  const Encoded e = encode_case(m, OptFixture::get().cases["batch2_leftpad"]);
  const Tensor l = m.prompt_logits(e);
  EXPECT_EQ(l.shape, (Shape{2, 8 + 9, 1024}));
  for (float x : l.data) ASSERT_TRUE(std::isfinite(x));
  GenerationOptions o;
  o.max_new_tokens = 5;
  o.num_beams = 3;
  const auto r = run(m, e, o);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_FALSE(r[0][0].ids.empty());
  // Incremental decoding agrees with the full forward pass over the same tokens.
  auto dec = m.start_decoder(e);
  const Tensor first = dec->start();
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t v2 = 0; v2 < 1024; ++v2)
      ASSERT_NEAR(first.data[b * 1024 + v2], l.data[(b * 17 + 16) * 1024 + v2], 1e-4);
}

TEST(OptVariants, BadOptConfigsNameTheField) {
  const auto expect_model_error = [](const std::function<void(nlohmann::json&)>& edit, const std::string& what) {
    Variant v("bad");
    edit(v.config);
    v.save();
    try {
      Blip2Model m(v.dir.string());
      ADD_FAILURE() << "no error for " << what;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Model) << e.what();
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  expect_model_error([](auto& j) { j["text_config"]["enable_bias"] = false; }, "enable_bias");
  expect_model_error([](auto& j) { j["text_config"]["num_attention_heads"] = 5; }, "num_attention_heads");
  expect_model_error([](auto& j) { j["text_config"]["eos_token_id"] = 5000; }, "outside the vocabulary");
  expect_model_error([](auto& j) { j["text_config"]["ffn_dim"] = 100; }, "fc1.weight");  // the weights disagree
  expect_model_error([](auto& j) { j["image_token_index"] = 4096; }, "image_token_index");
  // 8 query slots + BOS + one generated token need 10 positions.
  expect_model_error([](auto& j) { j["text_config"]["max_position_embeddings"] = 9; },
                     "text_config.max_position_embeddings = 9 leaves no room for a prompt: it must be at least "
                     "num_query_tokens (8) + 2");
}

TEST(OptVariants, MissingTokenizerIsAModelError) {
  Variant v("no-tokenizer");
  v.save();
  for (const char* f : {"vocab.json", "merges.txt", "tokenizer.json"}) fs::remove(v.dir / f);
  try {
    Blip2Model m(v.dir.string());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Model) << e.what();
  }
}

}  // namespace
