// The BERT WordPiece tokenizer against transformers' slow BertTokenizer: every entry of the retrieval
// fixture's tokenization_reference.json and the Q-Former entries of InstructBLIP's (left truncation too).
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "text/bert_tokenizer.h"

using namespace blip2;

namespace {

const std::string kFixtures = BLIP2_FIXTURES_DIR;

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// Checks tokens, ids and decoding of each entry; returns how many were checked.
size_t check_entries(const BertTokenizer& tok, const nlohmann::json& entries) {
  size_t n = 0;
  for (const auto& e : entries) {
    const std::string text = e["text"].get<std::string>();
    const int max_length = e.value("truncation", false) ? e["max_length"].get<int>() : 0;
    if (e.contains("truncation_side")) {
      EXPECT_EQ(tok.truncation_side(), e["truncation_side"] == "left" ? BertTokenizer::Side::Left : BertTokenizer::Side::Right);
    }
    const std::vector<int32_t> ids = tok.encode(text, max_length);
    std::vector<std::string> tokens;
    for (int32_t id : ids) tokens.push_back(tok.id_to_token(id));
    EXPECT_EQ(tokens, e["tokens"].get<std::vector<std::string>>()) << "text: " << text;
    if (e.contains("ids")) {
      EXPECT_EQ(ids, e["ids"].get<std::vector<int32_t>>()) << "text: " << text;
    } else {  // the retrieval fixture lists tokens only: their ids are the vocabulary's
      std::vector<int32_t> want;
      for (const auto& t : e["tokens"]) want.push_back(tok.token_to_id(t.get<std::string>()));
      EXPECT_EQ(ids, want) << "text: " << text;
    }
    if (e.contains("decode_skip_special")) {
      EXPECT_EQ(tok.decode(ids), e["decode_skip_special"].get<std::string>()) << "text: " << text;
    }
    ++n;
  }
  return n;
}

TEST(BertTokenizer, RetrievalFixture) {
  const BertTokenizer tok = BertTokenizer::load(kFixtures + "/tiny-blip2-itm");
  EXPECT_EQ(tok.vocab_size(), 376);  // 375 in vocab.txt + [DEC]
  EXPECT_EQ(tok.cls_id(), 2);
  EXPECT_EQ(tok.sep_id(), 3);
  EXPECT_EQ(tok.pad_id(), 0);
  EXPECT_EQ(tok.unk_id(), 1);
  EXPECT_EQ(tok.token_to_id("[DEC]"), 375);
  EXPECT_EQ(tok.truncation_side(), BertTokenizer::Side::Right);
  EXPECT_EQ(tok.model_max_length(), 512);
  EXPECT_GE(check_entries(tok, read_json(kFixtures + "/tiny-blip2-itm/tokenization_reference.json")), 19u);
}

TEST(BertTokenizer, InstructBlipQFormerEntries) {
  const BertTokenizer tok = BertTokenizer::load(kFixtures + "/tiny-instructblip-t5/qformer_tokenizer");
  EXPECT_EQ(tok.truncation_side(), BertTokenizer::Side::Left);
  const auto ref = read_json(kFixtures + "/tiny-instructblip-t5/tokenization_reference.json");
  EXPECT_GE(check_entries(tok, ref["qformer"]), 20u);
}

// The retrieval cases' padded batches, as reference.json gives them.
TEST(BertTokenizer, BatchesPadOnTheRight) {
  const BertTokenizer tok = BertTokenizer::load(kFixtures + "/tiny-blip2-itm");
  const auto cases = read_json(kFixtures + "/tiny-blip2-itm/reference.json")["cases"];
  for (const auto& [name, c] : cases.items()) {
    const TokenBatch b = tok.encode_batch(c["texts"].get<std::vector<std::string>>());
    std::vector<int32_t> ids;
    std::vector<uint8_t> mask;
    for (const auto& row : c["input_ids"]) for (const auto& v : row) ids.push_back(v.get<int32_t>());
    for (const auto& row : c["attention_mask"]) for (const auto& v : row) mask.push_back(v.get<uint8_t>());
    EXPECT_EQ(b.ids, ids) << name;
    EXPECT_EQ(b.mask, mask) << name;
    EXPECT_EQ(b.length, static_cast<int64_t>(c["input_ids"][0].size())) << name;
  }
}

TEST(BertTokenizer, TruncatesFromTheConfiguredSide) {
  const BertTokenizer right = BertTokenizer::load(kFixtures + "/tiny-blip2-itm");
  const BertTokenizer left = BertTokenizer::load(kFixtures + "/tiny-instructblip-t5/qformer_tokenizer");
  const std::string text = "a photo of a dog and a cat";
  const auto full = right.encode(text);
  ASSERT_GT(full.size(), 5u);
  EXPECT_EQ(right.encode(text, 5), (std::vector<int32_t>{full[0], full[1], full[2], full[3], full.back()}));
  EXPECT_EQ(left.encode(text, static_cast<int>(full.size()) + 3), full);  // short enough: unchanged
  EXPECT_EQ(right.encode(text, 2), (std::vector<int32_t>{right.cls_id(), right.sep_id()}));
  EXPECT_THROW(right.encode(text, 1), Error);
}

TEST(BertTokenizer, RejectsBadInputAndFiles) {
  const BertTokenizer tok = BertTokenizer::load(kFixtures + "/tiny-blip2-itm");
  try {
    tok.encode(std::string("caf\xc3", 4));
    FAIL() << "invalid UTF-8 accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input);
  }
  try {
    BertTokenizer::load(kFixtures + "/images");
    FAIL() << "a folder without vocab.txt loaded";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Model);
    EXPECT_NE(std::string(e.what()).find("vocab.txt"), std::string::npos);
  }
  // Control characters vanish, unusual spaces separate words, NFC then accents stripped, CJK alone.
  EXPECT_EQ(tok.tokenize("a\x01" "cat"), tok.tokenize("acat"));
  EXPECT_EQ(tok.tokenize("a\xe2\x80\xa8" "cat"), tok.tokenize("a cat"));     // U+2028
  EXPECT_EQ(tok.tokenize("a\xc2\xa0" "cat"), tok.tokenize("a cat"));         // U+00A0 (Zs)
  EXPECT_EQ(tok.tokenize("cafe\xcc\x81"), tok.tokenize("caf\xc3\xa9"));      // e + combining acute
  EXPECT_EQ(tok.tokenize("\xe6\x97\xa5" "a"), (std::vector<std::string>{"[UNK]", "a"}));
}

}  // namespace
