// The C interface (include/blip2.h): the fixture's answers through it, for both model families, and every
// kind of bad call coming back as a status and a message, never an exception or a crash.
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>

#include "blip2.h"
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
