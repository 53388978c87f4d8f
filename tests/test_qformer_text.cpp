// The Q-Former's text path on the retrieval fixture, stage by stage from the reference's own ViT output:
// queries and text together (ITM's [P, Q + L, d]) and text alone (query_length 0, [B, L, d]), each to 1e-5
// relative over the valid positions (the README: positions past a text's length are padding). The plain
// BLIP-2 path stays what test_model checks.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "model/qformer.h"
#include "support.h"

using namespace blip2;
using namespace blip2::test;

namespace {

const std::string kItm = kFixtures + "/tiny-blip2-itm";

TokenBatch rows_of(const nlohmann::json& c, const std::vector<int64_t>& texts) {
  TokenBatch b;
  b.batch = static_cast<int64_t>(texts.size());
  b.length = static_cast<int64_t>(c["input_ids"][0].size());
  for (int64_t t : texts) {
    for (const auto& v : c["input_ids"][t]) b.ids.push_back(v.get<int32_t>());
    for (const auto& v : c["attention_mask"][t]) b.mask.push_back(v.get<uint8_t>());
  }
  return b;
}

// Rows [0, keep) of each item of a [B, T, d] tensor.
Tensor valid(const Tensor& t, int64_t b, int64_t keep) {
  const Tensor h = on_host(t);
  const int64_t T = h.dim(1), d = h.dim(2);
  Tensor out({keep, d});
  std::copy(h.ptr() + b * T * d, h.ptr() + (b * T + keep) * d, out.ptr());
  return out;
}

void expect_close(const std::string& what, const Tensor& got, const Tensor& want) {
  ASSERT_EQ(got.shape, want.shape) << what;
  const Diff d = compare(got, want);
  std::printf("  %-40s rel %.3g  max_abs %.3g\n", what.c_str(), d.rel, d.max_abs);
  EXPECT_LE(d.rel, kMaxRel) << what;
  EXPECT_LE(d.max_abs, kMaxAbs) << what;
}

class QFormerText : public ::testing::Test {
 protected:
  QFormerText() : cfg_(load_config(kItm)), ck_(kItm), q_(ck_, cfg_.qformer, cfg_.num_query_tokens, QFormerNames::retrieval()),
                  ref_(kItm + "/reference.safetensors"), cases_(read_json(kItm + "/reference.json")["cases"]) {}
  Blip2Config cfg_;
  Checkpoint ck_;
  QFormer q_;
  SafetensorsFile ref_;
  nlohmann::json cases_;
};

TEST_F(QFormerText, QueriesWithTextMatchTheReference) {
  ASSERT_TRUE(q_.has_text_input());
  const int64_t Q = cfg_.num_query_tokens;
  for (const auto& [name, c] : cases_.items()) {
    const Tensor vision = ref_.tensor(name + "/vision_last_hidden_state");
    const Tensor want = ref_.tensor(name + "/qformer_itm_hidden_state");
    const int64_t P = static_cast<int64_t>(c["pairs"].size()), T = vision.dim(1), w = vision.dim(2);
    Tensor images({P, T, w});
    std::vector<int64_t> texts;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t i = c["pairs"][p][0].get<int64_t>();
      std::copy(vision.ptr() + i * T * w, vision.ptr() + (i + 1) * T * w, images.ptr() + p * T * w);
      texts.push_back(c["pairs"][p][1].get<int64_t>());
    }
    const Tensor got = q_.forward(images, rows_of(c, texts));
    ASSERT_EQ(got.shape, want.shape) << name;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t keep = Q + c["text_lengths"][texts[p]].get<int64_t>();
      expect_close(name + " itm pair " + std::to_string(p), valid(got, p, keep), valid(want, p, keep));
    }
  }
}

TEST_F(QFormerText, TextAloneMatchesTheReference) {
  for (const auto& [name, c] : cases_.items()) {
    const Tensor want = ref_.tensor(name + "/qformer_text_hidden_state");
    std::vector<int64_t> texts;
    for (size_t t = 0; t < c["texts"].size(); ++t) texts.push_back(static_cast<int64_t>(t));
    const Tensor got = q_.forward_text(rows_of(c, texts), Device::CPU);
    ASSERT_EQ(got.shape, want.shape) << name;
    for (int64_t t = 0; t < got.dim(0); ++t) {
      const int64_t keep = c["text_lengths"][t].get<int64_t>();
      expect_close(name + " text " + std::to_string(t), valid(got, t, keep), valid(want, t, keep));
    }
  }
}

TEST_F(QFormerText, RejectsBadText) {
  const auto kind = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return e.kind();
    }
    return ErrorKind::Internal;
  };
  TokenBatch b;
  b.batch = 1;
  b.length = 2;
  b.ids = {2, 9999};
  b.mask = {1, 1};
  EXPECT_EQ(kind([&] { q_.forward_text(b, Device::CPU); }), ErrorKind::Input);  // id outside the vocabulary
  b.length = cfg_.qformer.max_position_embeddings + 1;
  b.ids.assign(static_cast<size_t>(b.length), 2);
  b.mask.assign(b.ids.size(), 1);
  EXPECT_EQ(kind([&] { q_.forward_text(b, Device::CPU); }), ErrorKind::Input);  // longer than the positions
  // A captioning layout has no text embeddings.
  Checkpoint ck(kItm);
  const QFormer plain(ck, cfg_.qformer, cfg_.num_query_tokens);
  EXPECT_FALSE(plain.has_text_input());
  b.length = 2;
  b.ids = {2, 3};
  b.mask = {1, 1};
  EXPECT_EQ(kind([&] { plain.forward_text(b, Device::CPU); }), ErrorKind::Usage);
}

}  // namespace
