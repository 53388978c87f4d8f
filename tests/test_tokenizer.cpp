// The T5 tokenizer against transformers' ids for every text of tokenization_reference.json, and decoding.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "text/t5_tokenizer.h"
#include "text/text_stream.h"

#include <random>

using namespace blip2;

namespace {

TEST(T5Tokenizer, EncodesLikeTransformers) {
  const T5Tokenizer tok(BLIP2_TINY_T5_DIR);
  std::ifstream in(std::string(BLIP2_FIXTURES_DIR) + "/tiny-blip2-t5/tokenization_reference.json");
  const auto cases = nlohmann::json::parse(in);
  ASSERT_GE(cases.size(), 10u);
  for (const auto& c : cases) {
    const std::string text = c["text"].get<std::string>();
    EXPECT_EQ(tok.encode(text), c["sentencepiece_ids"].get<std::vector<int32_t>>()) << "text: " << text;
  }
}

TEST(T5Tokenizer, VocabularyLayout) {
  const T5Tokenizer tok(BLIP2_TINY_T5_DIR);
  EXPECT_EQ(tok.piece_count(), 1000);
  EXPECT_EQ(tok.vocab_size(), 1100);  // 100 sentinels after the pieces
  EXPECT_EQ(tok.piece(1099), "<extra_id_0>");
  EXPECT_EQ(tok.piece(1000), "<extra_id_99>");
  for (int32_t id : {0, 1, 2, 1000, 1099, 1100, 1151}) EXPECT_TRUE(tok.is_special(id)) << id;
  EXPECT_FALSE(tok.is_special(3));
}

TEST(T5Tokenizer, DecodeSkipsSpecialTokens) {
  const T5Tokenizer tok(BLIP2_TINY_T5_DIR);
  const auto ids = tok.encode("how many dogs are in the picture?");
  EXPECT_EQ(tok.decode(ids), "how many dogs are in the picture?");
  // pad, sentinels, padding rows of the embedding and eos leave no trace
  std::vector<int32_t> noisy = {0};
  noisy.insert(noisy.end(), ids.begin(), ids.end() - 1);
  for (int32_t id : {1050, 1120, 2, 1}) noisy.push_back(id);
  EXPECT_EQ(tok.decode(noisy), "how many dogs are in the picture?");
}

TEST(T5Tokenizer, StreamedPiecesJoinToTheFinalText) {
  // Random ids (byte pieces, specials and sentinels included), streamed one at a time: each piece extends the
  // text shown so far and the pieces join to decode(all ids).
  const T5Tokenizer tok(BLIP2_TINY_T5_DIR);
  std::mt19937 rng(15);
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<int32_t> ids;
    const int n = 1 + static_cast<int>(rng() % 12);
    for (int i = 0; i < n; ++i) ids.push_back(static_cast<int32_t>(rng() % 1152));
    const std::string want = tok.decode(ids);
    TextStream ts(tok);
    std::string shown;
    for (size_t i = 0; i <= ids.size(); ++i) {
      shown += i < ids.size() ? ts.put(ids[i]) : ts.end(ids);
      ASSERT_EQ(want.compare(0, shown.size(), shown), 0) << "shown \"" << shown << "\" of \"" << want << "\"";
    }
    ASSERT_EQ(shown, want);
  }
}

TEST(T5Tokenizer, MissingModelFileIsAModelError) {
  try {
    T5Tokenizer tok("/nonexistent-dir");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Model);
    EXPECT_NE(std::string(e.what()).find("spiece.model"), std::string::npos) << e.what();
  }
}

}  // namespace
