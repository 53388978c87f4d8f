#include "text/bert_tokenizer.h"

#include <unicode/uchar.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <map>
#include <optional>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file.h"

namespace blip2 {

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// The reference's WordpieceTokenizer.max_input_chars_per_word.
constexpr size_t kMaxWordChars = 100;

std::u32string utf8_to_u32(const std::string& s) {
  std::u32string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const int32_t n = static_cast<int32_t>(s.size());
  for (int32_t i = 0; i < n;) {
    UChar32 c;
    U8_NEXT(p, i, n, c);
    if (c < 0) fail(ErrorKind::Input, "text is not valid UTF-8 (at byte " + std::to_string(i - 1) + ")");
    out.push_back(static_cast<char32_t>(c));
  }
  return out;
}

std::string u32_to_utf8(const std::u32string& s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) {
    uint8_t buf[4];
    int32_t k = 0;
    U8_APPEND_UNSAFE(buf, k, static_cast<UChar32>(c));
    out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(k));
  }
  return out;
}

// ICU works in UTF-16; these convert around its calls.
std::u16string to_u16(const std::u32string& s) {
  std::u16string out;
  out.reserve(s.size());
  for (char32_t c : s) {
    if (c < 0x10000) {
      out.push_back(static_cast<char16_t>(c));
    } else {
      out.push_back(static_cast<char16_t>(U16_LEAD(c)));
      out.push_back(static_cast<char16_t>(U16_TRAIL(c)));
    }
  }
  return out;
}

std::u32string to_u32(const std::u16string& s) {
  std::u32string out;
  out.reserve(s.size());
  const int32_t n = static_cast<int32_t>(s.size());
  for (int32_t i = 0; i < n;) {
    UChar32 c;
    U16_NEXT(s.data(), i, n, c);
    out.push_back(static_cast<char32_t>(c));
  }
  return out;
}

std::u32string normalize(const std::u32string& s, bool compose) {
  UErrorCode err = U_ZERO_ERROR;
  const UNormalizer2* norm = compose ? unorm2_getNFCInstance(&err) : unorm2_getNFDInstance(&err);
  if (U_FAILURE(err)) fail(ErrorKind::Internal, std::string("ICU normaliser: ") + u_errorName(err));
  const std::u16string in = to_u16(s);
  std::u16string out(in.size() * 4 + 16, u'\0');  // NFD expands a character to at most 4 (18 in theory)
  int32_t len = unorm2_normalize(norm, reinterpret_cast<const UChar*>(in.data()), static_cast<int32_t>(in.size()),
                                 reinterpret_cast<UChar*>(out.data()), static_cast<int32_t>(out.size()), &err);
  if (err == U_BUFFER_OVERFLOW_ERROR) {
    err = U_ZERO_ERROR;
    out.assign(static_cast<size_t>(len), u'\0');
    len = unorm2_normalize(norm, reinterpret_cast<const UChar*>(in.data()), static_cast<int32_t>(in.size()),
                           reinterpret_cast<UChar*>(out.data()), len, &err);
  }
  if (U_FAILURE(err)) fail(ErrorKind::Internal, std::string("ICU normaliser: ") + u_errorName(err));
  out.resize(static_cast<size_t>(len));
  return to_u32(out);
}

// Python's str.lower() of one character (full case mapping: "İ" becomes two characters). The reference
// lower-cases the text one character at a time (a regex over single characters, to keep special tokens
// intact), so no context-dependent mapping (the final sigma) ever applies.
void lower_char(char32_t c, std::u32string& out) {
  if (c < 0x80) {
    out.push_back(c >= 'A' && c <= 'Z' ? c + 32 : c);
    return;
  }
  const std::u16string in = to_u16(std::u32string(1, c));
  UChar buf[8];
  UErrorCode err = U_ZERO_ERROR;
  const int32_t len = u_strToLower(buf, 8, reinterpret_cast<const UChar*>(in.data()),
                                   static_cast<int32_t>(in.size()), "", &err);
  if (U_FAILURE(err)) fail(ErrorKind::Internal, std::string("ICU lower-case: ") + u_errorName(err));
  out += to_u32(std::u16string(reinterpret_cast<const char16_t*>(buf), static_cast<size_t>(len)));
}

// The reference's character classes (tokenization_bert.py).
bool is_whitespace(char32_t c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || u_charType(static_cast<UChar32>(c)) == U_SPACE_SEPARATOR;
}
bool is_control(char32_t c) {
  if (c == '\t' || c == '\n' || c == '\r') return false;
  return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_C_MASK) != 0;
}
bool is_punctuation(char32_t c) {
  // ASCII symbols count as punctuation although Unicode files some ($, +, ^, `) under other categories.
  if ((c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126)) return true;
  return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_P_MASK) != 0;
}
bool is_cjk(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
         (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}
// Python's str.split() separators (what whitespace_tokenize splits at): after the clean-up only the line
// and paragraph separators are left besides the space.
bool is_split_space(char32_t c) {
  if (c == ' ' || (c >= 9 && c <= 13) || (c >= 0x1C && c <= 0x1F) || c == 0x85) return true;
  const int8_t t = u_charType(static_cast<UChar32>(c));
  return t == U_SPACE_SEPARATOR || t == U_LINE_SEPARATOR || t == U_PARAGRAPH_SEPARATOR;
}

json read_json(const fs::path& path) {
  const json j = json::parse(read_file(path.string(), kMaxConfigFileBytes, ErrorKind::Model, "tokenizer file"),
                             nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail(ErrorKind::Model, path.string() + ": not a JSON object");
  return j;
}

// A special token's text: "…" or {"content": "…", …}.
std::optional<std::string> token_text(const json& v, const std::string& where) {
  if (v.is_null()) return std::nullopt;
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  fail(ErrorKind::Model, where + " must be a string or an object with \"content\"");
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) s.replace(at, from.size(), to);
  return s;
}

}  // namespace

BertTokenizer BertTokenizer::load(const std::string& dir) {
  BertTokenizer t;
  const fs::path vocab_path = fs::path(dir) / "vocab.txt";
  if (!fs::exists(vocab_path)) fail(ErrorKind::Model, vocab_path.string() + ": not found (the BERT tokenizer's vocabulary)");
  const std::string text = read_file(vocab_path.string(), kMaxTokenizerFileBytes, ErrorKind::Model, "vocabulary");
  // One token per line, id = line number (Python's text-mode readlines: "\r\n" counts as "\n").
  for (size_t pos = 0; pos < text.size();) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string tok = text.substr(pos, end - pos);
    if (!tok.empty() && tok.back() == '\r') tok.pop_back();
    t.vocab_[tok] = static_cast<int32_t>(t.id_to_token_.size());  // a repeated token keeps its last id
    t.id_to_token_.push_back(std::move(tok));
    pos = end + 1;
  }
  if (t.id_to_token_.empty()) fail(ErrorKind::Model, vocab_path.string() + ": empty vocabulary");

  std::map<std::string, std::string> roles = {
      {"unk_token", "[UNK]"}, {"sep_token", "[SEP]"}, {"pad_token", "[PAD]"}, {"cls_token", "[CLS]"}, {"mask_token", "[MASK]"}};
  std::vector<std::string> extra_special;
  std::map<int32_t, std::pair<std::string, bool>> added;  // id -> (content, special)
  const auto read_roles = [&](const json& j, const std::string& file) {
    for (const char* key : {"unk_token", "sep_token", "pad_token", "cls_token", "mask_token", "bos_token", "eos_token"})
      if (j.contains(key)) {
        if (auto s = token_text(j[key], file + ": " + key)) roles[key] = *s;
        else roles.erase(key);
      }
    if (j.contains("additional_special_tokens") && j["additional_special_tokens"].is_array()) {
      extra_special.clear();
      for (const json& v : j["additional_special_tokens"])
        if (auto s = token_text(v, file + ": additional_special_tokens")) extra_special.push_back(*s);
    }
  };

  const fs::path cfg_path = fs::path(dir) / "tokenizer_config.json";
  if (fs::exists(cfg_path)) {
    const json c = read_json(cfg_path);
    const std::string where = cfg_path.string() + ": ";
    const auto flag = [&](const char* key, bool& out) {
      if (!c.contains(key) || c[key].is_null()) return;
      if (!c[key].is_boolean()) fail(ErrorKind::Model, where + key + " must be true or false");
      out = c[key].get<bool>();
    };
    flag("do_lower_case", t.lower_);
    // strip_accents: null (the default) follows do_lower_case.
    t.strip_accents_ = t.lower_;
    flag("strip_accents", t.strip_accents_);
    flag("tokenize_chinese_chars", t.chinese_chars_);
    flag("clean_up_tokenization_spaces", t.clean_up_spaces_);
    bool basic = true;
    flag("do_basic_tokenize", basic);
    if (!basic) fail(ErrorKind::Model, where + "do_basic_tokenize = false is not supported");
    if (c.contains("truncation_side") && !c["truncation_side"].is_null()) {
      const json& s = c["truncation_side"];
      if (s == "left") t.truncation_side_ = Side::Left;
      else if (s == "right") t.truncation_side_ = Side::Right;
      else fail(ErrorKind::Model, where + "truncation_side must be \"left\" or \"right\", got " + s.dump());
    }
    // A float (1e30) is transformers' "no limit" placeholder.
    if (c.contains("model_max_length") && c["model_max_length"].is_number_integer()) {
      const int64_t m = c["model_max_length"].get<int64_t>();
      if (m > 0 && m <= (1 << 30)) t.model_max_length_ = static_cast<int>(m);
    }
    read_roles(c, cfg_path.string());
    if (c.contains("added_tokens_decoder") && c["added_tokens_decoder"].is_object())
      for (const auto& [key, v] : c["added_tokens_decoder"].items()) {
        int64_t id = -1;
        try {
          id = std::stoll(key);
        } catch (const std::exception&) {
        }
        if (id < 0 || id >= (1 << 30)) fail(ErrorKind::Model, where + "added_tokens_decoder key \"" + key + "\" is not an id");
        const auto content = token_text(v, where + "added_tokens_decoder." + key);
        if (!content) fail(ErrorKind::Model, where + "added_tokens_decoder." + key + " has no content");
        const bool special = v.is_object() && v.value("special", false);
        added[static_cast<int32_t>(id)] = {*content, special};
      }
  }
  const fs::path map_path = fs::path(dir) / "special_tokens_map.json";
  if (fs::exists(map_path)) read_roles(read_json(map_path), map_path.string());
  const fs::path added_path = fs::path(dir) / "added_tokens.json";
  const json added_json = fs::exists(added_path) ? read_json(added_path) : json::object();
  for (const auto& [content, v] : added_json.items()) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= (1 << 30))
      fail(ErrorKind::Model, added_path.string() + ": \"" + content + "\" must map to an id");
    const int32_t id = static_cast<int32_t>(v.get<int64_t>());
    if (!added.count(id)) added[id] = {content, false};
  }

  // Every special role is an added token too (the reference adds them at init), found in the text whole.
  std::unordered_set<std::string> special_texts(extra_special.begin(), extra_special.end());
  for (const auto& [role, s] : roles) special_texts.insert(s);
  for (auto& [id, entry] : added)
    if (special_texts.count(entry.first)) entry.second = true;
  for (const auto& [id, entry] : added) {
    if (id >= static_cast<int32_t>(t.id_to_token_.size())) t.id_to_token_.resize(static_cast<size_t>(id) + 1);
    t.id_to_token_[static_cast<size_t>(id)] = entry.first;
    t.added_[entry.first] = id;
  }
  for (const std::string& s : special_texts) {
    if (t.added_.count(s)) continue;
    const auto v = t.vocab_.find(s);
    if (v == t.vocab_.end()) continue;  // a role naming no token: unusable, refused below if it matters
    t.added_[s] = v->second;
  }
  for (const auto& [s, id] : t.added_) {
    t.added_by_length_.push_back(s);
    if (special_texts.count(s)) t.special_ids_.insert(id);
  }
  std::sort(t.added_by_length_.begin(), t.added_by_length_.end(),
            [](const std::string& a, const std::string& b) { return a.size() != b.size() ? a.size() > b.size() : a < b; });
  t.vocab_size_ = static_cast<int>(t.id_to_token_.size());

  const auto role_id = [&](const char* role) {
    const auto r = roles.find(role);
    const auto a = r == roles.end() ? t.added_.end() : t.added_.find(r->second);
    if (a == t.added_.end())
      fail(ErrorKind::Model, dir + ": the BERT tokenizer's " + role + " is not in the vocabulary (vocab.txt)");
    return a->second;
  };
  t.cls_ = role_id("cls_token");
  t.sep_ = role_id("sep_token");
  t.pad_ = role_id("pad_token");
  t.unk_ = role_id("unk_token");
  return t;
}

void BertTokenizer::wordpiece(const std::u32string& word, std::vector<std::string>& out) const {
  if (word.size() > kMaxWordChars) {
    out.push_back(id_to_token_[static_cast<size_t>(unk_)]);
    return;
  }
  const size_t first = out.size();
  for (size_t start = 0; start < word.size();) {
    size_t end = word.size();
    bool found = false;
    for (; end > start; --end) {
      std::string piece = u32_to_utf8(word.substr(start, end - start));
      if (start > 0) piece = "##" + piece;
      if (vocab_.count(piece)) {
        out.push_back(std::move(piece));
        found = true;
        break;
      }
    }
    if (!found) {  // one uncovered part makes the whole word unknown
      out.resize(first);
      out.push_back(id_to_token_[static_cast<size_t>(unk_)]);
      return;
    }
    start = end;
  }
}

void BertTokenizer::basic_and_wordpiece(const std::string& text, std::vector<std::string>& out) const {
  const std::u32string in = utf8_to_u32(text);
  std::u32string lowered;
  if (lower_) {
    lowered.reserve(in.size());
    for (char32_t c : in) lower_char(c, lowered);
  }
  // Clean-up: drop NUL, U+FFFD and control characters, whitespace becomes a space; CJK ideographs stand
  // alone.
  std::u32string clean;
  for (char32_t c : lower_ ? lowered : in) {
    if (c == 0 || c == 0xFFFD || is_control(c)) continue;
    if (is_whitespace(c)) clean.push_back(U' ');
    else if (chinese_chars_ && is_cjk(c)) clean += std::u32string{U' ', c, U' '};
    else clean.push_back(c);
  }
  clean = normalize(clean, true);
  // The reference lower-cases each word again here; the text is lower-case already, and lower() of
  // lower-case text is itself, so only the accents remain to strip.
  std::u32string word;
  const auto flush = [&] {
    if (word.empty()) return;
    if (strip_accents_) {
      std::u32string kept;
      for (char32_t c : normalize(word, false))
        if (u_charType(static_cast<UChar32>(c)) != U_NON_SPACING_MARK) kept.push_back(c);
      word = std::move(kept);
    }
    std::u32string piece;
    for (char32_t c : word) {
      if (is_punctuation(c)) {
        if (!piece.empty()) wordpiece(piece, out);
        piece.clear();
        wordpiece(std::u32string(1, c), out);
      } else {
        piece.push_back(c);
      }
    }
    if (!piece.empty()) wordpiece(piece, out);
    word.clear();
  };
  for (char32_t c : clean) {
    if (is_split_space(c)) flush();
    else word.push_back(c);
  }
  flush();
}

std::vector<std::string> BertTokenizer::tokenize(const std::string& text) const {
  std::vector<std::string> out;
  size_t plain = 0;  // start of the text not yet tokenized
  for (size_t i = 0; i < text.size();) {
    const std::string* hit = nullptr;
    for (const std::string& s : added_by_length_)
      if (!s.empty() && text.compare(i, s.size(), s) == 0) {
        hit = &s;
        break;
      }
    if (!hit) {
      ++i;
      continue;
    }
    basic_and_wordpiece(text.substr(plain, i - plain), out);
    out.push_back(*hit);
    i += hit->size();
    plain = i;
  }
  basic_and_wordpiece(text.substr(plain), out);
  return out;
}

int32_t BertTokenizer::token_to_id(const std::string& token) const {
  if (const auto a = added_.find(token); a != added_.end()) return a->second;
  const auto v = vocab_.find(token);
  return v == vocab_.end() ? unk_ : v->second;
}

std::string BertTokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= vocab_size_) return id_to_token_[static_cast<size_t>(unk_)];
  return id_to_token_[static_cast<size_t>(id)];
}

std::vector<int32_t> BertTokenizer::encode(const std::string& text) const { return encode(text, 0); }

std::vector<int32_t> BertTokenizer::encode(const std::string& text, int max_length) const {
  if (max_length != 0 && max_length < 2)
    fail(ErrorKind::Usage, "max_length " + std::to_string(max_length) + " leaves no room for [CLS] and [SEP]");
  std::vector<int32_t> body;
  for (const std::string& tok : tokenize(text)) body.push_back(token_to_id(tok));
  if (max_length > 0 && body.size() + 2 > static_cast<size_t>(max_length)) {
    const size_t drop = body.size() + 2 - static_cast<size_t>(max_length);
    if (truncation_side_ == Side::Left) body.erase(body.begin(), body.begin() + static_cast<std::ptrdiff_t>(drop));
    else body.resize(body.size() - drop);
  }
  std::vector<int32_t> ids{cls_};
  ids.insert(ids.end(), body.begin(), body.end());
  ids.push_back(sep_);
  return ids;
}

TokenBatch BertTokenizer::encode_batch(const std::vector<std::string>& texts, int max_length) const {
  TokenBatch b;
  std::vector<std::vector<int32_t>> all;
  for (const std::string& t : texts) {
    all.push_back(encode(t, max_length));
    b.length = std::max<int64_t>(b.length, static_cast<int64_t>(all.back().size()));
  }
  b.batch = static_cast<int64_t>(texts.size());
  b.ids.assign(static_cast<size_t>(b.batch * b.length), pad_);
  b.mask.assign(b.ids.size(), 0);
  for (int64_t i = 0; i < b.batch; ++i)
    for (size_t j = 0; j < all[static_cast<size_t>(i)].size(); ++j) {
      b.ids[static_cast<size_t>(i * b.length) + j] = all[static_cast<size_t>(i)][j];
      b.mask[static_cast<size_t>(i * b.length) + j] = 1;
    }
  return b;
}

std::string BertTokenizer::decode(const std::vector<int32_t>& ids) const {
  // Added tokens that are not special stand apart (the reference's "legacy added tokens"); the rest join
  // with spaces, "##" pieces glued to their predecessor.
  std::vector<std::string> parts;
  std::string run;
  const auto close_run = [&] {
    if (run.empty()) return;
    std::string s = replace_all(run, " ##", "");
    const size_t a = s.find_first_not_of(' '), z = s.find_last_not_of(' ');
    parts.push_back(a == std::string::npos ? "" : s.substr(a, z - a + 1));
    run.clear();
  };
  for (int32_t id : ids) {
    if (special_ids_.count(id)) continue;
    const std::string tok = id_to_token(id);
    if (added_.count(tok) && added_.at(tok) == id) {
      close_run();
      parts.push_back(tok);
      continue;
    }
    if (!run.empty()) run += ' ';
    run += tok;
  }
  close_run();
  std::string text;
  for (size_t i = 0; i < parts.size(); ++i) text += (i ? " " : "") + parts[i];
  if (clean_up_spaces_)
    for (const auto& [from, to] : std::initializer_list<std::pair<const char*, const char*>>{
             {" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"}, {" n't", "n't"}, {" 'm", "'m"},
             {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}})
      text = replace_all(text, from, to);
  return text;
}

}  // namespace blip2
