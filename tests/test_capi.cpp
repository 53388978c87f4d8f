// The C interface (include/blip2.h): the fixture's answers through it, for both model families, and every
// kind of bad call coming back as a status and a message, never an exception or a crash.
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>

#include "blip2.h"
#include "io/safetensors.h"
#include "support.h"

using namespace blip2::test;

extern "C" int caption_from_c(const char* model_dir, const unsigned char* image, size_t size, char** text,
                              char** error);

namespace {

std::vector<uint8_t> file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

struct Model {
  blip2_model* m = nullptr;
  explicit Model(const char* dir) {
    char* err = nullptr;
    EXPECT_EQ(blip2_model_load(dir, nullptr, &m, &err), BLIP2_OK) << (err ? err : "");
    blip2_string_free(err);
  }
  ~Model() { blip2_model_free(m); }
};

// Greedy text of `family`'s fixture case through blip2_generate.
void expect_fixture_text(const char* model_dir, const std::string& family, const std::string& case_name) {
  const auto c = read_json(kFixtures + "/" + family + "/reference.json")["cases"][case_name];
  const auto& g = c["generate"]["greedy"];
  Model model(model_dir);
  ASSERT_NE(model.m, nullptr);
  blip2_generate_params p = blip2_generate_default_params(model.m);
  EXPECT_EQ(p.max_new_tokens, 20);  // Hugging Face's default; the fixtures' configs set none
  p.max_new_tokens = g["kwargs"]["max_new_tokens"].get<int>();
  const auto img = file_bytes(kFixtures + "/images/" + c["images"][0].get<std::string>());
  char *text = nullptr, *err = nullptr;
  ASSERT_EQ(blip2_generate(model.m, img.data(), img.size(), c["prompts"][0].get<std::string>().c_str(), &p, &text,
                           &err),
            BLIP2_OK)
      << (err ? err : "");
  EXPECT_EQ(std::string(text), g["text"][0].get<std::string>());
  blip2_string_free(text);
}

TEST(CApi, T5FixtureAnswers) {
  expect_fixture_text(BLIP2_TINY_T5_DIR, "tiny-blip2-t5", "caption");
  expect_fixture_text(BLIP2_TINY_T5_DIR, "tiny-blip2-t5", "vqa");
}

TEST(CApi, OptFixtureAnswers) { expect_fixture_text(BLIP2_BUNDLED_OPT_DIR, "tiny-blip2-opt", "vqa"); }

TEST(CApi, UsableFromC) {
  const auto img = file_bytes(kFixtures + "/images/chelsea.png");
  char *text = nullptr, *err = nullptr;
  ASSERT_EQ(caption_from_c(BLIP2_TINY_T5_DIR, img.data(), img.size(), &text, &err), BLIP2_OK) << (err ? err : "");
  // float16 weights: the fixture's greedy caption survives the conversion (tests/test_kernels.cpp measures how far)
  const auto c = read_json(kFixtures + "/tiny-blip2-t5/reference.json")["cases"]["caption"];
  EXPECT_EQ(std::string(text), c["generate"]["greedy"]["text"][0].get<std::string>());
  blip2_string_free(text);
}

TEST(CApi, StreamedPiecesJoinToTheText) {
  Model model(BLIP2_TINY_T5_DIR);
  const auto img = file_bytes(kFixtures + "/images/chelsea.png");
  for (int beams : {1, 3}) {
    blip2_generate_params p = blip2_generate_default_params(model.m);
    p.num_beams = beams;
    std::vector<std::string> pieces;
    char *text = nullptr, *err = nullptr;
    ASSERT_EQ(blip2_generate_stream(
                  model.m, img.data(), img.size(), "", &p,
                  [](const char* piece, void* user) { static_cast<std::vector<std::string>*>(user)->push_back(piece); },
                  &pieces, &text, &err),
              BLIP2_OK)
        << (err ? err : "");
    std::string joined;
    for (const auto& x : pieces) joined += x;
    EXPECT_EQ(joined, text) << beams;
    if (beams == 1) {
      EXPECT_GT(pieces.size(), 5u);  // token by token
    } else {
      EXPECT_EQ(pieces.size(), 1u);  // beams change their past: the whole text at the end
    }
    blip2_string_free(text);
  }
}

// A text callback that calls back into the model that is calling it gets an error, instead of waiting for ever
// on the model's lock; the outer call goes on and succeeds.
TEST(CApi, CallbackCallingTheSameModelGetsAnError) {
  Model model(BLIP2_TINY_T5_DIR);
  const auto img = file_bytes(kFixtures + "/images/chelsea.png");
  struct State {
    blip2_model* m;
    const std::vector<uint8_t>* img;
    int calls = 0;
    std::vector<blip2_status> statuses;
    std::string error;
  } st{model.m, &img, 0, {}, {}};
  const auto callback = [](const char*, void* user) {
    auto& s = *static_cast<State*>(user);
    if (s.calls++ > 0) return;
    char *text = nullptr, *err = nullptr;
    s.statuses.push_back(blip2_generate(s.m, s.img->data(), s.img->size(), "", nullptr, &text, &err));
    s.statuses.push_back(blip2_generate_stream(s.m, s.img->data(), s.img->size(), "", nullptr, nullptr, nullptr,
                                               &text, nullptr));
    if (err) s.error = err;
    blip2_string_free(err);
    blip2_string_free(text);
  };
  char *text = nullptr, *err = nullptr;
  ASSERT_EQ(blip2_generate_stream(model.m, img.data(), img.size(), "", nullptr, callback, &st, &text, &err), BLIP2_OK)
      << (err ? err : "");
  EXPECT_EQ(st.statuses, (std::vector<blip2_status>{BLIP2_ERROR_USAGE, BLIP2_ERROR_USAGE}));
  EXPECT_NE(st.error.find("callback"), std::string::npos) << st.error;
  blip2_string_free(text);
  // The model is usable again afterwards, from the same thread.
  ASSERT_EQ(blip2_generate(model.m, img.data(), img.size(), "", nullptr, &text, &err), BLIP2_OK) << (err ? err : "");
  blip2_string_free(text);
}

// A retrieval checkpoint through the same handle: ITM probabilities, ITC similarities and both embeddings equal
// the fixture's references (float32, from the image files' bytes), and each kind of checkpoint refuses the
// other's calls, saying what it can do.
TEST(CApi, RetrievalMatchesAndEmbedsAsTheReference) {
  const std::string dir = kFixtures + "/tiny-blip2-itm";
  const auto c = read_json(dir + "/reference.json")["cases"]["pair"];
  const blip2::SafetensorsFile ref(dir + "/reference.safetensors");
  const blip2::Tensor itm = ref.tensor("pair/itm_probability"), itc = ref.tensor("pair/itc_logits_per_image");
  const blip2::Tensor image_embeds = ref.tensor("pair/image_embeds"), text_embeds = ref.tensor("pair/text_embeds");
  Model model(dir.c_str());
  ASSERT_NE(model.m, nullptr);
  const int Q = blip2_image_embedding_count(model.m), E = blip2_embedding_size(model.m);
  ASSERT_EQ(image_embeds.shape, (blip2::Shape{2, Q, E}));
  const auto near = [](float got, float want) { return std::abs(got - want) <= 1e-5f * std::max(1.0f, std::abs(want)); };
  char* err = nullptr;
  for (size_t p = 0; p < c["pairs"].size(); ++p) {
    const size_t i = c["pairs"][p][0].get<size_t>(), t = c["pairs"][p][1].get<size_t>();
    const auto img = file_bytes(kFixtures + "/images/" + c["images"][i].get<std::string>());
    const std::string text = c["texts"][t].get<std::string>();
    float prob = -1, sim = -1;
    ASSERT_EQ(blip2_match(model.m, img.data(), img.size(), text.c_str(), &prob, &sim, &err), BLIP2_OK) << err;
    EXPECT_TRUE(near(prob, itm.ptr()[p])) << prob << " vs " << itm.ptr()[p];
    EXPECT_TRUE(near(sim, itc.ptr()[i * 2 + t])) << sim << " vs " << itc.ptr()[i * 2 + t];
    std::vector<float> e(static_cast<size_t>(Q * E));
    ASSERT_EQ(blip2_embed_image(model.m, img.data(), img.size(), e.data(), e.size(), &err), BLIP2_OK) << err;
    for (int k = 0; k < Q * E; ++k) ASSERT_TRUE(near(e[k], image_embeds.ptr()[i * Q * E + k])) << k;
    ASSERT_EQ(blip2_embed_text(model.m, text.c_str(), e.data(), static_cast<size_t>(E), &err), BLIP2_OK) << err;
    for (int k = 0; k < E; ++k) ASSERT_TRUE(near(e[k], text_embeds.ptr()[t * E + k])) << k;
  }
  const auto img = file_bytes(kFixtures + "/images/chelsea.png");
  // Too small a buffer: refused before anything is written.
  std::vector<float> small(static_cast<size_t>(E), 7.0f);
  EXPECT_EQ(blip2_embed_image(model.m, img.data(), img.size(), small.data(), small.size(), &err), BLIP2_ERROR_USAGE);
  EXPECT_NE(std::string(err).find("need"), std::string::npos) << err;
  blip2_string_free(err);
  EXPECT_EQ(small[0], 7.0f);
  EXPECT_EQ(blip2_embed_text(model.m, "a cat", small.data(), static_cast<size_t>(E - 1), &err), BLIP2_ERROR_USAGE);
  blip2_string_free(err);
  EXPECT_EQ(blip2_match(model.m, nullptr, 5, "a cat", nullptr, nullptr, &err), BLIP2_ERROR_USAGE);
  blip2_string_free(err);
  char* text = nullptr;
  EXPECT_EQ(blip2_generate(model.m, img.data(), img.size(), "", nullptr, &text, &err), BLIP2_ERROR_USAGE);
  EXPECT_NE(std::string(err).find("blip2_match"), std::string::npos) << err;
  blip2_string_free(err);
  // A captioning checkpoint: no embeddings, and the retrieval calls say why.
  Model captioner(BLIP2_TINY_T5_DIR);
  EXPECT_EQ(blip2_embedding_size(captioner.m), 0);
  EXPECT_EQ(blip2_image_embedding_count(captioner.m), 0);
  float prob = 0;
  EXPECT_EQ(blip2_match(captioner.m, img.data(), img.size(), "a cat", &prob, nullptr, &err), BLIP2_ERROR_USAGE);
  EXPECT_NE(std::string(err).find("captioning checkpoint"), std::string::npos) << err;
  blip2_string_free(err);
}

TEST(CApi, ErrorsAreStatusesWithMessages) {
  char* err = nullptr;
  blip2_model* m = reinterpret_cast<blip2_model*>(1);
  EXPECT_EQ(blip2_model_load("/no/such/model", nullptr, &m, &err), BLIP2_ERROR_MODEL);
  EXPECT_EQ(m, nullptr);
  ASSERT_NE(err, nullptr);
  EXPECT_NE(std::string(err).find("/no/such/model"), std::string::npos) << err;
  blip2_string_free(err);

  blip2_load_params lp = blip2_load_default_params();
  lp.weights = "int3";
  EXPECT_EQ(blip2_model_load(BLIP2_TINY_T5_DIR, &lp, &m, &err), BLIP2_ERROR_USAGE);
  EXPECT_NE(std::string(err).find("int3"), std::string::npos) << err;
  blip2_string_free(err);
  EXPECT_EQ(blip2_model_load(nullptr, nullptr, &m, nullptr), BLIP2_ERROR_USAGE);  // error may be NULL

  Model model(BLIP2_TINY_T5_DIR);
  char* text = nullptr;
  const auto truncated = file_bytes(kFixtures + "/images/truncated.jpg");
  EXPECT_EQ(blip2_generate(model.m, truncated.data(), truncated.size(), "", nullptr, &text, &err), BLIP2_ERROR_INPUT);
  EXPECT_EQ(text, nullptr);
  blip2_string_free(err);
  const uint8_t junk[] = {1, 2, 3};
  EXPECT_EQ(blip2_generate(model.m, junk, sizeof junk, "", nullptr, &text, &err), BLIP2_ERROR_INPUT);
  blip2_string_free(err);

  const auto img = file_bytes(kFixtures + "/images/chelsea.png");
  blip2_generate_params p = blip2_generate_default_params(model.m);
  p.max_new_tokens = 0;
  EXPECT_EQ(blip2_generate(model.m, img.data(), img.size(), "", &p, &text, &err), BLIP2_ERROR_USAGE);
  EXPECT_NE(std::string(err).find("max-new-tokens"), std::string::npos) << err;
  blip2_string_free(err);
  EXPECT_EQ(blip2_generate(nullptr, img.data(), img.size(), "", nullptr, &text, &err), BLIP2_ERROR_USAGE);
  blip2_string_free(err);
  EXPECT_EQ(blip2_generate(model.m, img.data(), img.size(), std::string(5000, 'a').c_str(), nullptr, &text, &err),
            BLIP2_ERROR_INPUT);
  blip2_string_free(err);
}

}  // namespace
