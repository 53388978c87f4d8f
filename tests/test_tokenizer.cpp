// The T5 tokenizer against transformers' ids for every text of tokenization_reference.json, and decoding.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "text/sentencepiece_model.h"
#include "text/t5_tokenizer.h"
#include "text/text_stream.h"

#include <cstring>
#include <random>

#include "temp_dir.h"

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

// Protobuf wire format, enough to write SentencePiece ModelProtos: a varint, and a length-delimited field.
std::string varint(uint64_t v) {
  std::string out;
  for (; v >= 0x80; v >>= 7) out += static_cast<char>((v & 0x7F) | 0x80);
  return out + static_cast<char>(v);
}
std::string message_field(uint32_t number, const std::string& payload) {
  return varint(uint64_t(number) << 3 | 2) + varint(payload.size()) + payload;
}
// A piece (ModelProto field 1): its text (1) and type (3: 1 normal, 2 unknown).
std::string piece(const std::string& text, int type = 1) {
  return message_field(1, message_field(1, text) + varint(3 << 3) + varint(type));
}
// A normalizer spec (ModelProto field 3) with this precompiled character map (its field 2).
std::string normalizer(const std::string& charsmap) { return message_field(3, message_field(2, charsmap)); }

// The real nmt_nfkc character map that the T5 fixture's spiece.model carries.
std::string fixture_charsmap() {
  const std::string proto = test::read_bytes(std::string(BLIP2_TINY_T5_DIR) + "/spiece.model");
  const std::string name = message_field(1, "nmt_nfkc");
  const size_t at = proto.find(name);
  if (at == std::string::npos) throw std::runtime_error("the fixture's spiece.model has no nmt_nfkc normalizer");
  // The charsmap field follows the name: tag 0x12, a varint length, the bytes.
  std::string_view rest = std::string_view(proto).substr(at + name.size());
  if (rest.empty() || rest[0] != 0x12) throw std::runtime_error("the fixture's normalizer has no charsmap after its name");
  rest.remove_prefix(1);
  uint64_t length = 0;
  for (int shift = 0;; shift += 7) {
    const auto byte = static_cast<uint8_t>(rest[0]);
    rest.remove_prefix(1);
    length |= uint64_t(byte & 0x7F) << shift;
    if (!(byte & 0x80)) break;
  }
  return std::string(rest.substr(0, length));
}

std::string check_error(const std::string& proto) {
  try {
    check_sentencepiece_model(proto, "m.model");
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Model);
    return e.what();
  }
  return "";
}

TEST(SentencePieceModel, TheFixturesModelsPass) {
  for (const std::string& path : {std::string(BLIP2_TINY_T5_DIR) + "/spiece.model",
                                 std::string(BLIP2_FIXTURES_DIR) + "/tiny-instructblip-vicuna/tokenizer.model"})
    EXPECT_EQ(check_error(test::read_bytes(path)), "") << path;
  const std::string charsmap = fixture_charsmap();
  EXPECT_EQ(charsmap.size(), 237561u);  // the whole map was found
  EXPECT_EQ(check_error(piece("<unk>", 2) + piece("a") + normalizer(charsmap)), "");
}

// Each of these made Debian's libsentencepiece 0.1.97 abort (a NUL byte in a piece: fuzz_t5_model found
// it) or read outside the map on load or encode; each is refused first with what is wrong.
TEST(SentencePieceModel, PartsThatWouldCrashSentencePieceAreRefusedByName) {
  const std::string good = piece("<unk>", 2) + piece("a");
  EXPECT_NE(check_error(good + piece(std::string("b\0c", 3))).find("piece 2 contains a NUL byte"), std::string::npos);
  EXPECT_NE(check_error(good + piece("")).find("piece 2 is empty"), std::string::npos);
  EXPECT_NE(check_error("").find("it has no pieces"), std::string::npos);
  EXPECT_NE(check_error(good.substr(0, good.size() - 1)).find("truncated or malformed"), std::string::npos);

  const std::string map = fixture_charsmap();
  uint32_t trie_bytes = 0;
  std::memcpy(&trie_bytes, map.data(), 4);
  const auto with_map = [&](const std::string& m) { return check_error(good + normalizer(m)); };
  const auto expect = [&](const std::string& m, const std::string& what) {
    const std::string error = with_map(m);
    EXPECT_NE(error.find("the normalizer's character map: " + what), std::string::npos) << error;
  };
  // 0.1.97 checks the trie size against the map before taking off its own 4 bytes.
  std::string m = map;
  const uint32_t past_end = static_cast<uint32_t>(map.size() - 1);
  std::memcpy(m.data(), &past_end, 4);
  expect(m, "its trie runs past the end of the map");
  expect(map.substr(0, 3), "shorter than its 4-byte header");
  m = map;
  const uint32_t odd = trie_bytes - 2;
  std::memcpy(m.data(), &odd, 4);
  expect(m, "its trie is not a whole number of 4-byte units");
  m = map;
  m.back() = 'x';
  expect(m, "its replacement strings do not end with NUL");
  m = map.substr(0, 4 + trie_bytes) + std::string(1, '\0');  // values index strings that are gone
  expect(m, "its trie points past the replacement strings");
  m = map;
  const uint32_t far_root = (1u << 30) & ~0x3FFu;  // a root whose children block lies beyond the trie
  std::memcpy(m.data() + 4, &far_root, 4);
  expect(m, "its trie points outside itself");
  m = map;
  const uint32_t leaf_root = 1u << 8;
  std::memcpy(m.data() + 4, &leaf_root, 4);
  expect(m, "its trie's root is not a node");

  // Protobuf merges a repeated spec and keeps its last map: a broken map after the good one still counts.
  EXPECT_NE(check_error(good + normalizer(map) + normalizer(map.substr(0, 3))).find("4-byte header"),
            std::string::npos);
  EXPECT_NE(check_error(good + message_field(5, message_field(2, map.substr(0, 3)))).find("the denormalizer's"),
            std::string::npos);
}

TEST(SentencePieceModel, TheTokenizerRefusesABrokenModelWithItsPath) {
  test::TempDir dir;
  std::ofstream(dir.path("spiece.model"), std::ios::binary) << piece("<unk>", 2) + piece(std::string("\0a", 2));
  try {
    T5Tokenizer tok(dir.path());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Model);
    EXPECT_NE(std::string(e.what()).find(dir.path("spiece.model") + ": not a usable SentencePiece model: piece 1"),
              std::string::npos) << e.what();
  }
}

}  // namespace
