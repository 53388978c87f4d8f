// The OPT (GPT-2 byte-level BPE) tokenizer against transformers' ids for every text of the fixture's
// tokenization_reference.json, from each file layout a checkpoint may ship; added tokens such as "<image>";
// decoding; bytes that are not UTF-8; and the errors for missing or malformed files.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "core/error.h"
#include "text/bpe_tokenizer.h"
#include "text/text_stream.h"
#include "text/tokenizer.h"

using namespace blip2;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The tokenizer files live with the bundled model; the expected ids with the fixture references.
const std::string kFixture = BLIP2_BUNDLED_OPT_DIR;
const std::string kReference = std::string(BLIP2_FIXTURES_DIR) + "/tiny-blip2-opt";

struct Case {
  std::string text;
  std::vector<int32_t> ids;
  std::string decoded;
};

std::vector<Case> reference_cases() {
  std::ifstream in(kReference + "/tokenization_reference.json");
  const json j = json::parse(in);
  std::vector<Case> cases;
  for (const auto& c : j)
    cases.push_back({c["text"].get<std::string>(), c["ids_without_bos"].get<std::vector<int32_t>>(),
                     c["decode"].get<std::string>()});
  return cases;
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

// A fresh directory for tokenizer files, removed afterwards.
class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() / ("blip2-bpe-test-" + std::to_string(::getpid()) + "-" + std::to_string(++counter));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string str() const { return path_.string(); }
  void copy(const std::string& name) const { fs::copy_file(kFixture + "/" + name, path_ / name); }
  void write(const std::string& name, const std::string& text) const {
    std::ofstream(path_ / name, std::ios::binary) << text;
  }
  void write(const std::string& name, const json& j) const { write(name, j.dump()); }

 private:
  fs::path path_;
};

// Loads `dir`, expecting Error(Model) whose message contains every string of `needles`.
void expect_model_error(const std::string& dir, const std::vector<std::string>& needles) {
  try {
    BpeTokenizer::load(dir);
    FAIL() << "expected an error loading " << dir;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Model) << e.what();
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

void expect_reference(const BpeTokenizer& tok) {
  const auto cases = reference_cases();
  ASSERT_GE(cases.size(), 9u);
  for (const auto& c : cases) {
    EXPECT_EQ(tok.encode(c.text), c.ids) << "text: " << c.text;
    EXPECT_EQ(tok.decode(c.ids), c.decoded) << "text: " << c.text;
  }
}

TEST(BpeTokenizer, EncodesAndDecodesLikeTransformers) {
  const auto tok = BpeTokenizer::load(kFixture);  // vocab.json + merges.txt (+ tokenizer.json's added tokens)
  expect_reference(tok);
}

TEST(BpeTokenizer, TokenizerJsonAloneGivesTheSameIds) {
  TempDir dir;
  dir.copy("tokenizer.json");
  expect_reference(BpeTokenizer::load(dir.str()));
}

TEST(BpeTokenizer, MergesAsStringsInTokenizerJson) {
  // Older tokenizer.json files spell merges "a b"; the fixture has the newer ["a", "b"].
  json j = read_json(kFixture + "/tokenizer.json");
  ASSERT_TRUE(j["model"]["merges"][0].is_array());
  for (auto& m : j["model"]["merges"]) m = m[0].get<std::string>() + " " + m[1].get<std::string>();
  TempDir dir;
  dir.write("tokenizer.json", j);
  expect_reference(BpeTokenizer::load(dir.str()));
}

TEST(BpeTokenizer, VocabAndMergesAloneGiveTheSameIds) {
  TempDir dir;
  dir.copy("vocab.json");
  dir.copy("merges.txt");
  dir.copy("tokenizer_config.json");
  expect_reference(BpeTokenizer::load(dir.str()));
}

TEST(BpeTokenizer, SpecialTokensAndRoles) {
  const auto tok = BpeTokenizer::load(kFixture);
  EXPECT_EQ(tok.vocab_size(), 1000);
  EXPECT_EQ(tok.token_id("<s>"), 0);
  EXPECT_EQ(tok.token_id("<pad>"), 1);
  EXPECT_EQ(tok.token_id("</s>"), 2);
  EXPECT_EQ(tok.token_id("<unk>"), 3);
  EXPECT_EQ(tok.token_id("Ġthe"), tok.encode(" the").at(0));
  EXPECT_FALSE(tok.token_id("no such token").has_value());
  EXPECT_EQ(tok.bos_id(), 2);  // OPT: "</s>" is BOS and EOS
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.pad_id(), 1);
  EXPECT_EQ(tok.unk_id(), 3);
  for (int32_t id : {0, 1, 2, 3}) EXPECT_TRUE(tok.is_special(id)) << id;
  for (int32_t id : {4, 68, 999, 1000, -1}) EXPECT_FALSE(tok.is_special(id)) << id;
}

TEST(BpeTokenizer, SpecialTokensInTextAreKeptWhole) {
  const auto tok = BpeTokenizer::load(kFixture);
  const auto a = tok.encode("a photo"), b = tok.encode(" of");
  std::vector<int32_t> expected = a;
  expected.push_back(2);
  expected.insert(expected.end(), b.begin(), b.end());
  expected.push_back(1);
  EXPECT_EQ(tok.encode("a photo</s> of<pad>"), expected);
  EXPECT_EQ(tok.encode("</s></s>"), (std::vector<int32_t>{2, 2}));
}

TEST(BpeTokenizer, DecodeSkipsSpecialTokens) {
  const auto tok = BpeTokenizer::load(kFixture);
  std::vector<int32_t> ids = {2};
  const auto text = tok.encode("a photo of a dog\n");
  ids.insert(ids.end(), text.begin(), text.end());
  for (int32_t id : {2, 1, 1, 0, 3}) ids.push_back(id);
  EXPECT_EQ(tok.decode(ids), "a photo of a dog\n");  // no strip(): that is the caller's (LAVIS's) business
  EXPECT_EQ(tok.decode(ids, false), "</s>a photo of a dog\n</s><pad><pad><s><unk>");
  EXPECT_EQ(tok.decode({5000, -3, 68}), "a");  // ids with no token are skipped, as HF does
  EXPECT_EQ(tok.token_bytes(2), "</s>");
  EXPECT_EQ(tok.token_bytes(tok.encode(" the").at(0)), " the");
  EXPECT_EQ(tok.token_bytes(5000), "");
}

// tokenizer.json with "<image>" appended after the vocabulary, as in the Nov-2024 Salesforce/blip2-opt-*.
json tokenizer_json_with_image(bool special) {
  json j = read_json(kFixture + "/tokenizer.json");
  j["added_tokens"].push_back({{"id", 1000}, {"content", "<image>"}, {"single_word", false}, {"lstrip", false},
                               {"rstrip", false}, {"normalized", false}, {"special", special}});
  return j;
}

TEST(BpeTokenizer, AddedImageTokenIsKeptWhole) {
  TempDir dir;
  dir.write("tokenizer.json", tokenizer_json_with_image(true));
  const auto tok = BpeTokenizer::load(dir.str());
  EXPECT_EQ(tok.vocab_size(), 1001);
  EXPECT_EQ(tok.token_id("<image>"), 1000);
  EXPECT_TRUE(tok.is_special(1000));
  const auto plain = tok.encode("a photo of");
  std::vector<int32_t> expected = {1000, 1000};
  expected.insert(expected.end(), plain.begin(), plain.end());
  expected.push_back(1000);
  EXPECT_EQ(tok.encode("<image><image>a photo of<image>"), expected);
  EXPECT_EQ(tok.decode(expected), "a photo of");
  EXPECT_EQ(tok.decode(expected, false), "<image><image>a photo of<image>");

  // Without the added token the same text is ordinary BPE.
  const auto base = BpeTokenizer::load(kFixture);
  EXPECT_GT(base.encode("<image>").size(), 1u);
  EXPECT_EQ(base.decode(base.encode("<image>a")), "<image>a");
}

TEST(BpeTokenizer, AddedTokenFromSidecarFiles) {
  // vocab.json + merges.txt with "<image>" in added_tokens.json (no flags) and marked special by
  // tokenizer_config.json's added_tokens_decoder.
  TempDir dir;
  dir.copy("vocab.json");
  dir.copy("merges.txt");
  dir.write("added_tokens.json", json{{"<image>", 1000}});
  json cfg = read_json(kFixture + "/tokenizer_config.json");
  cfg["added_tokens_decoder"]["1000"] = {{"content", "<image>"}, {"lstrip", false}, {"normalized", false},
                                         {"rstrip", false}, {"single_word", false}, {"special", true}};
  dir.write("tokenizer_config.json", cfg);
  const auto tok = BpeTokenizer::load(dir.str());
  EXPECT_EQ(tok.vocab_size(), 1001);
  EXPECT_TRUE(tok.is_special(1000));
  const auto ids = tok.encode("<image>a photo of");
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], 1000);
  EXPECT_EQ(tok.decode(ids), "a photo of");

  // Only in added_tokens.json: matched whole, but not special, so decode keeps it.
  TempDir plain;
  plain.copy("vocab.json");
  plain.copy("merges.txt");
  plain.write("added_tokens.json", json{{"<image>", 1000}});
  const auto tok2 = BpeTokenizer::load(plain.str());
  EXPECT_FALSE(tok2.is_special(1000));
  EXPECT_EQ(tok2.encode("<image>a photo of"), ids);
  EXPECT_EQ(tok2.decode(ids), "<image>a photo of");
}

TEST(BpeTokenizer, LongestAddedTokenWinsAndStripFlags) {
  json j = read_json(kFixture + "/tokenizer.json");
  j["added_tokens"].push_back({{"id", 1000}, {"content", "<im>"}, {"special", true}});
  j["added_tokens"].push_back({{"id", 1001}, {"content", "<image>"}, {"special", true}});
  j["added_tokens"].push_back({{"id", 1002}, {"content", "[S]"}, {"special", false}, {"lstrip", true}, {"rstrip", true}});
  TempDir dir;
  dir.write("tokenizer.json", j);
  const auto tok = BpeTokenizer::load(dir.str());
  EXPECT_EQ(tok.encode("<image><im>"), (std::vector<int32_t>{1001, 1000}));
  const auto a = tok.encode("a"), b = tok.encode("b");
  EXPECT_EQ(tok.encode("a  [S] \nb"), (std::vector<int32_t>{a[0], 1002, b[0]}));
}

TEST(BpeTokenizer, CleanUpTokenizationSpacesWhenConfigured) {
  const std::string text = "Hello , world . it 's fine ?";
  TempDir dir;
  dir.copy("tokenizer.json");
  json cfg = read_json(kFixture + "/tokenizer_config.json");
  cfg["clean_up_tokenization_spaces"] = true;
  dir.write("tokenizer_config.json", cfg);
  const auto tok = BpeTokenizer::load(dir.str());
  EXPECT_EQ(tok.decode(tok.encode(text)), "Hello, world. it's fine?");
  const auto plain = BpeTokenizer::load(kFixture);  // the fixture's config leaves it unset: off
  EXPECT_EQ(plain.decode(plain.encode(text)), text);
}

// The OPT tokenizer of the fixture with clean_up_tokenization_spaces on, as the CLI, the server and the C API
// stream through it.
std::unique_ptr<Tokenizer> cleaning_opt_tokenizer(const TempDir& dir) {
  dir.copy("tokenizer.json");
  json cfg = read_json(kFixture + "/tokenizer_config.json");
  cfg["clean_up_tokenization_spaces"] = true;
  dir.write("tokenizer_config.json", cfg);
  Blip2Config c;
  c.family = LanguageFamily::OPT;
  return load_tokenizer(dir.str(), c);
}

// Streams ids one at a time; returns the pieces.
std::vector<std::string> stream_pieces(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  TextStream ts(tok);
  std::vector<std::string> pieces;
  for (int32_t id : ids) pieces.push_back(ts.put(id));
  pieces.push_back(ts.end(ids));
  return pieces;
}

std::string joined(const std::vector<std::string>& pieces) {
  std::string s;
  for (const auto& p : pieces) s += p;
  return s;
}

TEST(TextStream, CleanUpDoesNotDropTheRestOfTheAnswer) {
  // Tokens " you", " ", "?", " and": after " you " the "?" cleans the space away. The stream showed " you "
  // and then nothing more, as nothing after it extended what it had shown.
  TempDir dir;
  const auto tok = cleaning_opt_tokenizer(dir);
  std::vector<int32_t> ids;
  for (const char* piece : {" you", " ", "?", " and"})
    for (int32_t id : tok->encode(piece)) if (id != 2) ids.push_back(id);  // without the BOS encode adds
  ASSERT_EQ(tok->decode(ids), " you? and");
  const auto pieces = stream_pieces(*tok, ids);
  EXPECT_EQ(joined(pieces), " you? and");
  EXPECT_EQ(pieces[0], " you");  // shown as soon as nothing can change it
}

TEST(TextStream, PiecesAlwaysJoinToTheFinalTextWithCleanUp) {
  // Random token sequences over the characters the clean-up rules look at: every piece extends what was
  // shown, and the pieces join to decode(all ids), whatever comes next.
  TempDir dir;
  const auto tok = cleaning_opt_tokenizer(dir);
  const std::vector<std::string> alphabet = {" ", "'", "n", "t", "s", "m", "v", "e", "r", ".", "?", "!", ",", "a",
                                             " n't", " 's", " ' ", "don", "\xC3\xA9", "\xE2\x82", "\xAC", "x"};
  std::mt19937 rng(15);
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<int32_t> ids;
    const int n = 1 + static_cast<int>(rng() % 14);
    for (int i = 0; i < n; ++i)
      for (int32_t id : tok->encode(alphabet[rng() % alphabet.size()])) if (id != 2) ids.push_back(id);
    const std::string want = tok->decode(ids);
    const auto pieces = stream_pieces(*tok, ids);
    std::string shown;
    for (const auto& p : pieces) {
      shown += p;
      ASSERT_EQ(want.compare(0, shown.size(), shown), 0) << "shown \"" << shown << "\" of \"" << want << "\"";
    }
    ASSERT_EQ(shown, want);
  }
}

// Texts beyond the fixture's reference. The ids come from tokenizers.js 0.2.0 (@huggingface/tokenizers,
// HF's JavaScript port) on the fixture's tokenizer.json, not from transformers.
TEST(BpeTokenizer, MoreTextsAgainstAnIndependentImplementation) {
  const auto tok = BpeTokenizer::load(kFixture);
  const std::vector<Case> cases = {  // {text, ids, decoded}: decoded with clean-up off, "<s>" skipped
      {"Hello world!", {43, 72, 997, 82, 274, 277, 341, 4}, "Hello world!"},
      {"I'M here, you'RE there; we'll see. They'd've gone", {44, 10, 48, 224, 622, 15, 350, 10, 53, 40, 668, 30, 888, 10, 997, 268, 567, 17, 829, 92, 10, 71, 10, 365, 349, 929}, "I'M here, you'RE there; we'll see. They'd've gone"},
      {"'s's 'S", {790, 790, 224, 10, 54}, "'s's 'S"},
      {"''", {10, 10}, "''"},
      {"it 's", {272, 224, 10, 86}, "it 's"},
      {"a\xc2\xa0" "b", {68, 130, 258, 69}, "a\xc2\xa0" "b"},
      {"x\xe3\x80\x80y", {91, 163, 226, 226, 92}, "x\xe3\x80\x80y"},
      {"\xe0\xa5\xa7\xe0\xa5\xa8\xe0\xa5\xa9 and \xe2\x85\xab", {160, 102, 104, 160, 102, 105, 160, 102, 106, 306, 224, 162, 231, 108}, "\xe0\xa5\xa7\xe0\xa5\xa8\xe0\xa5\xa9 and \xe2\x85\xab"},
      {"\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd ok", {176, 257, 243, 239, 176, 257, 241, 125, 265, 78}, "\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd ok"},
      {"e\xcc\x81t\xc3\xa9", {72, 140, 227, 87, 131, 106}, "e\xcc\x81t\xc3\xa9"},
      {"tab\x09\x09 end  \x0a\x0a", {87, 894, 201, 201, 224, 531, 355, 202, 202}, "tab\x09\x09 end  \x0a\x0a"},
      {"  ", {355}, "  "},
      {"\x0a", {202}, "\x0a"},
      {" ", {224}, " "},
      {"end ", {531, 224}, "end "},
      {"a  b", {68, 224, 278}, "a  b"},
      {"a \x0a b", {68, 224, 202, 278}, "a \x0a b"},
      {"12 345 6789", {20, 21, 964, 23, 24, 224, 25, 26, 27, 28}, "12 345 6789"},
      {"3.14", {22, 17, 20, 23}, "3.14"},
      {"$100", {7, 20, 19, 19}, "$100"},
      {"C++20", {38, 14, 14, 21, 19}, "C++20"},
      {"What is in the image? Answer in one word.", {58, 75, 273, 315, 283, 264, 942, 704, 34, 798, 283, 930, 274, 277, 71, 17}, "What is in the image? Answer in one word."},
      {"na\xc3\xafve\xe2\x80\x94\xe2\x80\x9cquoted\xe2\x80\x9d\xe2\x80\xa6", {81, 68, 131, 111, 365, 162, 226, 246, 162, 226, 254, 617, 319, 294, 162, 226, 255, 162, 226, 103}, "na\xc3\xafve\xe2\x80\x94\xe2\x80\x9cquoted\xe2\x80\x9d\xe2\x80\xa6"},
      {"\xc3\x9cn\xc3\xaf" "c\xc3\xb6" "d\xc3\xa9 \xc3\x80\xc3\x89\xc3\x8e", {131, 254, 81, 131, 111, 70, 131, 118, 71, 131, 106, 224, 131, 226, 131, 235, 131, 240}, "\xc3\x9cn\xc3\xaf" "c\xc3\xb6" "d\xc3\xa9 \xc3\x80\xc3\x89\xc3\x8e"},
      {"\xed\x95\x9c\xea\xb5\xad\xec\x96\xb4 \xd1\x82\xd0\xb5\xd0\xba\xd1\x81\xd1\x82 \xd8\xa7\xd9\x84\xd8\xb9\xd8\xb1\xd8\xa8\xd9\x8a\xd8\xa9", {173, 247, 254, 170, 117, 259, 172, 248, 116, 224, 145, 228, 144, 117, 144, 122, 145, 227, 145, 228, 224, 152, 104, 153, 230, 152, 121, 152, 113, 152, 105, 153, 236, 152, 106}, "\xed\x95\x9c\xea\xb5\xad\xec\x96\xb4 \xd1\x82\xd0\xb5\xd0\xba\xd1\x81\xd1\x82 \xd8\xa7\xd9\x84\xd8\xb9\xd8\xb1\xd8\xa8\xd9\x8a\xd8\xa9"},
      {"<image>", {31, 441, 704, 33}, "<image>"},
      {"<s>x", {0, 91}, "x"},
      {"http://example.com/a_b?c=d&e=f", {75, 87, 87, 83, 29, 18, 18, 962, 417, 83, 298, 17, 677, 18, 68, 66, 69, 34, 70, 32, 71, 9, 72, 32, 73}, "http://example.com/a_b?c=d&e=f"},
      {"snake_case camelCase", {86, 81, 68, 709, 66, 70, 701, 271, 771, 79, 38, 701}, "snake_case camelCase"},
      {"a\x0d\x0a" "b", {68, 205, 202, 69}, "a\x0d\x0a" "b"},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(tok.encode(c.text), c.ids) << "text: " << c.text;
    EXPECT_EQ(tok.decode(c.ids), c.decoded) << "text: " << c.text;
  }
}

// \s in the pre-tokenization regex is Unicode White_Space, as for onig in HF tokenizers; PCRE2's own \s would
// also take U+180E (MONGOLIAN VOWEL SEPARATOR, a format character since Unicode 6.3). A vocabulary with a
// merge across "\u180e!" shows the split: punctuation run "\u180e!" (one token), not "\u180e" + "!".
TEST(BpeTokenizer, RegexWhitespaceIsUnicodeWhiteSpace) {
  json j = read_json(kFixture + "/tokenizer.json");
  // U+180E is E1 A0 8E; bytes_to_unicode spells it "\u00e1\u0142\u0130".
  const std::string c1 = "\xc3\xa1", c2 = "\xc5\x82", c3 = "\xc4\xb0";
  j["model"]["vocab"][c1 + c2] = 1000;
  j["model"]["vocab"][c1 + c2 + c3] = 1001;
  j["model"]["vocab"][c1 + c2 + c3 + "!"] = 1002;
  j["model"]["merges"].push_back({c1, c2});
  j["model"]["merges"].push_back({c1 + c2, c3});
  j["model"]["merges"].push_back({c1 + c2 + c3, "!"});
  TempDir dir;
  dir.write("tokenizer.json", j);
  const auto tok = BpeTokenizer::load(dir.str());
  EXPECT_EQ(tok.encode("x\xe1\xa0\x8e!"), (std::vector<int32_t>{91, 1002}));
  EXPECT_EQ(tok.encode("x\xe1\xa0\x8e !"), (std::vector<int32_t>{91, 1001, 224, 4}));
  EXPECT_EQ(tok.encode("x\u3000!"), (std::vector<int32_t>{91, 163, 226, 226, 4}));  // U+3000 is White_Space
}

std::string concat_bytes(const BpeTokenizer& tok, const std::vector<int32_t>& ids) {
  std::string out;
  for (int32_t id : ids) out += tok.token_bytes(id);
  return out;
}

TEST(BpeTokenizer, InvalidUtf8IsEncodedLosslesslyAndDecodedWithReplacement) {
  const auto tok = BpeTokenizer::load(kFixture);
  const std::string fffd = "\xEF\xBF\xBD";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"\xff\xfe" "ab \xc3", fffd + fffd + "ab " + fffd},  // stray bytes; a lead byte at the end
      {"x\xe2\x98y", "x" + fffd + "y"},                    // truncated 3-byte sequence: one U+FFFD
      {"\xed\xa0\x80", fffd + fffd + fffd},                // a surrogate: three
      {"\xf0\x9f\x98", fffd},                              // truncated 4-byte sequence: one
      {"\xc0\xaf", fffd + fffd},                           // overlong: two
      {std::string("a\0b", 3), std::string("a\0b", 3)},    // NUL is a valid character
  };
  for (const auto& [bytes, text] : cases) {
    const auto ids = tok.encode(bytes);
    EXPECT_EQ(concat_bytes(tok, ids), bytes);
    EXPECT_EQ(tok.decode(ids), text);
  }
}

// Random byte strings (valid UTF-8 of all lengths, spaces, digits, and stray bytes): every byte comes back.
TEST(BpeTokenizer, RandomBytesRoundTrip) {
  const auto tok = BpeTokenizer::load(kFixture);
  std::mt19937 rng(1234);
  const std::vector<std::string> atoms = {"a", "b", "the", " ", "  ", "\t", "\n", "7", "'s", "'", "é", "日",
                                          "☃", "😀", "\xff", "\x80", "\xe2\x98", ",", "<s>", "</s", "\xc2\xa0"};
  for (int n = 0; n < 300; ++n) {
    std::string s;
    const int len = static_cast<int>(rng() % 40);
    for (int i = 0; i < len; ++i) s += atoms[rng() % atoms.size()];
    const auto ids = tok.encode(s);
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok.vocab_size()) << s;
    EXPECT_EQ(concat_bytes(tok, ids), s);
    EXPECT_EQ(tok.encode(s), ids);  // a second time, through the word cache
  }
}

TEST(BpeTokenizer, LongWordsAndConcurrentUse) {
  const auto tok = BpeTokenizer::load(kFixture);
  std::string word;
  for (int i = 0; i < 20000; ++i) word += "thereinat"[i % 9];
  const auto ids = tok.encode(word);
  EXPECT_LT(ids.size(), word.size() / 2);
  EXPECT_EQ(tok.decode(ids), word);

  const auto cases = reference_cases();
  std::vector<std::thread> threads;
  std::vector<int> failures(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 50; ++rep)
        for (const auto& c : cases) failures[t] += tok.encode(c.text) != c.ids;
    });
  for (auto& th : threads) th.join();
  for (int f : failures) EXPECT_EQ(f, 0);
}

TEST(BpeTokenizer, MoveKeepsTheTokenizer) {
  auto tok = BpeTokenizer::load(kFixture);
  BpeTokenizer moved = std::move(tok);
  expect_reference(moved);
}

// --- errors ------------------------------------------------------------------------------------------------

TEST(BpeTokenizer, MissingFilesAreModelErrors) {
  TempDir empty;
  expect_model_error(empty.str(), {empty.str(), "vocab.json", "merges.txt", "tokenizer.json"});
  expect_model_error("/nonexistent-dir", {"/nonexistent-dir"});
  TempDir only_vocab;
  only_vocab.copy("vocab.json");
  expect_model_error(only_vocab.str(), {"merges.txt", "missing"});
  TempDir only_merges;
  only_merges.copy("merges.txt");
  expect_model_error(only_merges.str(), {"vocab.json", "missing"});
}

TEST(BpeTokenizer, MalformedJsonIsAModelError) {
  TempDir dir;
  dir.write("vocab.json", std::string("{\"a\": 1,"));
  dir.copy("merges.txt");
  expect_model_error(dir.str(), {"vocab.json", "malformed JSON"});
  TempDir tj;
  tj.write("tokenizer.json", std::string("not json"));
  expect_model_error(tj.str(), {"tokenizer.json", "malformed JSON"});
  TempDir cfg;
  cfg.copy("tokenizer.json");
  cfg.write("tokenizer_config.json", std::string("{"));
  expect_model_error(cfg.str(), {"tokenizer_config.json", "malformed JSON"});
  TempDir not_object;
  not_object.write("vocab.json", std::string("[1, 2]"));
  not_object.copy("merges.txt");
  expect_model_error(not_object.str(), {"vocab.json", "not a JSON object"});
  TempDir bad_id;
  bad_id.write("vocab.json", std::string("{\"a\": \"one\"}"));
  bad_id.copy("merges.txt");
  expect_model_error(bad_id.str(), {"vocab.json", "\"a\"", "not an integer"});
}

TEST(BpeTokenizer, EndlessFilesAreRefusedAtTheSizeCap) {
  // Each tokenizer file in turn is /dev/zero: the read stops at the cap with a message naming the file.
  for (const char* name : {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"}) {
    SCOPED_TRACE(name);
    TempDir dir;
    for (const char* f : {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"})
      if (std::string(f) != name) dir.copy(f);
    fs::create_symlink("/dev/zero", fs::path(dir.str()) / name);
    expect_model_error(dir.str(), {std::string("/") + name, "tokenizer file is larger than 64 MiB"});
  }
}

TEST(BpeTokenizer, BadMergesAreModelErrors) {
  TempDir unknown;
  unknown.copy("vocab.json");
  unknown.write("merges.txt", std::string("#version: 0.2\ni n\nq zz\n"));
  expect_model_error(unknown.str(), {"merges.txt", "line 3", "\"zz\"", "not in the vocabulary"});
  TempDir three;
  three.copy("vocab.json");
  three.write("merges.txt", std::string("#version: 0.2\ni n g\n"));
  expect_model_error(three.str(), {"merges.txt", "line 2", "two tokens"});
  TempDir merged_unknown;  // both parts exist, their concatenation does not
  merged_unknown.copy("vocab.json");
  merged_unknown.write("merges.txt", std::string("q x\n"));
  expect_model_error(merged_unknown.str(), {"merges.txt", "line 1", "\"qx\""});

  json j = read_json(kFixture + "/tokenizer.json");
  j["model"]["merges"][5] = json::array({"Ġ", "nope"});
  TempDir tj;
  tj.write("tokenizer.json", j);
  expect_model_error(tj.str(), {"tokenizer.json", "model.merges[5]", "\"nope\""});
  j["model"]["merges"][5] = 17;
  tj.write("tokenizer.json", j);
  expect_model_error(tj.str(), {"tokenizer.json", "model.merges[5]"});
}

TEST(BpeTokenizer, UnsupportedOrIncompleteTokenizerJsonIsAModelError) {
  const json base = read_json(kFixture + "/tokenizer.json");
  TempDir dir;
  json j = base;
  j.erase("model");
  dir.write("tokenizer.json", j);
  expect_model_error(dir.str(), {"tokenizer.json", "model"});
  j = base;
  j["model"]["type"] = "Unigram";
  dir.write("tokenizer.json", j);
  expect_model_error(dir.str(), {"tokenizer.json", "Unigram"});
  j = base;
  j["pre_tokenizer"] = {{"type", "Metaspace"}};
  dir.write("tokenizer.json", j);
  expect_model_error(dir.str(), {"tokenizer.json", "pre_tokenizer"});
  j = base;
  j["model"]["vocab"].erase("Ā");  // byte 0x00's character
  dir.write("tokenizer.json", j);
  expect_model_error(dir.str(), {"0x00"});
  j = base;
  j["added_tokens"].push_back({{"id", "x"}, {"content", "<image>"}});
  dir.write("tokenizer.json", j);
  expect_model_error(dir.str(), {"tokenizer.json", "added_tokens[4]", "not an integer"});
}

}  // namespace
