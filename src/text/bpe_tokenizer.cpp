#include "text/bpe_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "core/error.h"
#include "core/file.h"

namespace blip2 {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// GPT-2's pre-tokenization regex, as HF's ByteLevel pre-tokenizer uses it:
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// with \s spelled out as Unicode White_Space ([\t-\r\x{85}\p{Z}]), which is what \s means to onig (HF
// tokenizers) and to Python's `regex` (the slow tokenizer). PCRE2's own \s under UCP also takes U+180E.
constexpr const char* kPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\t-\r\x{85}\p{Z}\p{L}\p{N}]+)"
    R"(|[\t-\r\x{85}\p{Z}]+(?![^\t-\r\x{85}\p{Z}])|[\t-\r\x{85}\p{Z}]+)";

// Largest id accepted from a file: far above any real vocabulary, low enough that a corrupt number cannot
// make us allocate gigabytes for the id tables.
constexpr int64_t kMaxId = 1 << 24;

// A word cache this large is cleared rather than grown (long generations of unusual text); longer words are
// not cached (HF's limit too).
constexpr size_t kMaxCacheEntries = 1 << 16;
constexpr size_t kMaxCachedWordBytes = 256;

// bytes_to_unicode(): printable Latin-1 bytes stand for themselves, the other 68 bytes (controls, space,
// 0x7F-0xA0, 0xAD) get code points 256, 257, ... in byte order. Every byte-level token is spelled in these.
std::vector<uint32_t> byte_to_code_point() {
  std::vector<uint32_t> cp(256);
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    cp[b] = printable ? static_cast<uint32_t>(b) : next++;
  }
  return cp;
}

void append_utf8(std::string& out, uint32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

// Looks at the UTF-8 sequence starting at p (n > 0 bytes left). Returns its length and sets *ok when it is a
// valid character (*cp = its code point); otherwise returns the length of the "maximal subpart" (the prefix
// that could have started a valid sequence, at least 1 byte) and clears *ok. Replacing each maximal subpart
// by one U+FFFD is what Python's errors="replace" and Rust's from_utf8_lossy both do.
size_t utf8_step(const unsigned char* p, size_t n, bool* ok, uint32_t* cp = nullptr) {
  const unsigned b = p[0];
  *ok = false;
  if (b < 0x80) {
    *ok = true;
    if (cp) *cp = b;
    return 1;
  }
  size_t len;
  unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  uint32_t c;
  if (b >= 0xC2 && b <= 0xDF) {
    len = 2;
    c = b & 0x1F;
  } else if (b >= 0xE0 && b <= 0xEF) {
    len = 3;
    c = b & 0x0F;
    if (b == 0xE0) lo = 0xA0;  // no overlong forms
    if (b == 0xED) hi = 0x9F;  // no surrogates
  } else if (b >= 0xF0 && b <= 0xF4) {
    len = 4;
    c = b & 0x07;
    if (b == 0xF0) lo = 0x90;  // no overlong forms
    if (b == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    return 1;  // a continuation byte or a byte that never appears in UTF-8
  }
  for (size_t i = 1; i < len; ++i) {
    if (i >= n) return i;
    const unsigned x = p[i];
    if (x < (i == 1 ? lo : 0x80u) || x > (i == 1 ? hi : 0xBFu)) return i;
    c = (c << 6) | (x & 0x3F);
  }
  *ok = true;
  if (cp) *cp = c;
  return len;
}

// Bytes as UTF-8 text, each invalid maximal subpart replaced by U+FFFD.
std::string utf8_lossy(const std::string& bytes) {
  std::string out;
  out.reserve(bytes.size());
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t i = 0;
  while (i < bytes.size()) {
    bool ok;
    const size_t len = utf8_step(p + i, bytes.size() - i, &ok);
    if (ok)
      out.append(bytes, i, len);
    else
      out += "\xEF\xBF\xBD";
    i += len;
  }
  return out;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (size_t pos = s.find(from); pos != std::string::npos; pos = s.find(from, pos + to.size()))
    s.replace(pos, from.size(), to);
}

// transformers' clean_up_tokenization: these replacements, in this order. Each only drops spaces.
const std::pair<std::string, std::string> kCleanupRules[] = {
    {" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"},
    {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};

void clean_up_tokenization(std::string& s) {
  for (const auto& [from, to] : kCleanupRules) replace_all(s, from, to);
}

// The longest prefix of `text` whose clean-up no text appended later can change: it ends after a character
// that occurs in no rule's pattern except as its last character. No pattern can then straddle the cut in any
// rule's input (the rules only drop spaces, so that character stays the last one before the cut, and a match
// holding it ends there), so clean(text[0, cut) + more) = clean(text[0, cut)) + clean(text[cut, end) + more).
// Without it, streamed text is lost: " you " is shown, then " ?" arrives and the text becomes " you?".
size_t cleanup_stable_length(const std::string& text) {
  static const std::string straddling = [] {
    std::string chars;
    for (const auto& [from, to] : kCleanupRules) chars += from.substr(0, from.size() - 1);
    return chars;
  }();
  size_t cut = text.size();
  while (cut > 0 && straddling.find(text[cut - 1]) != std::string::npos) --cut;
  return cut;
}

bool is_ascii_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

std::string read_tokenizer_file(const std::string& path) {
  return read_file(path, kMaxTokenizerFileBytes, ErrorKind::Model, "tokenizer file");
}

json read_json(const std::string& path) {
  const std::string text = read_tokenizer_file(path);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    fail(ErrorKind::Model, path + ": malformed JSON: " + e.what());
  }
}

int32_t json_id(const json& v, const std::string& where) {
  if (!v.is_number_integer()) fail(ErrorKind::Model, where + ": token id is not an integer");
  const int64_t id = v.get<int64_t>();
  if (id < 0 || id >= kMaxId)
    fail(ErrorKind::Model, where + ": token id " + std::to_string(id) + " out of range [0, " +
                               std::to_string(kMaxId) + ")");
  return static_cast<int32_t>(id);
}

// An optional field of a JSON object with the type checked: nlohmann's value() throws its own exception
// (with no file name) on a type mismatch. `where` is the prefix of the key in messages ("tokenizer.json: model.").
bool opt_bool(const json& obj, const char* key, bool fallback, const std::string& where) {
  if (!obj.contains(key) || obj[key].is_null()) return fallback;
  if (!obj[key].is_boolean()) fail(ErrorKind::Model, where + key + " is not a boolean");
  return obj[key].get<bool>();
}

std::string opt_string(const json& obj, const char* key, const std::string& where) {
  if (!obj.contains(key) || obj[key].is_null()) return "";
  if (!obj[key].is_string()) fail(ErrorKind::Model, where + key + " is not a string");
  return obj[key].get<std::string>();
}

// A special-token role's value: "</s>", {"content": "</s>", ...} or null.
std::optional<std::string> token_content(const json& v, const std::string& where) {
  if (v.is_null()) return std::nullopt;
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  fail(ErrorKind::Model, where + ": expected a token string or an object with \"content\"");
}

}  // namespace

struct BpeTokenizer::Impl {
  struct AddedToken {
    std::string content;
    int32_t id;
    bool special = false, lstrip = false, rstrip = false;
  };

  std::unordered_map<std::string, int32_t> vocab;  // token (spelled in byte-level characters) -> id
  std::vector<AddedToken> added;                   // matched whole in the text before BPE, longest first
  bool added_first_byte[256] = {};                 // bytes that can start an added token
  std::unordered_map<std::string, int32_t> added_ids;
  // (left id << 32 | right id) -> (rank, merged id)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;
  bool ignore_merges = false;  // tokenizer.json model.ignore_merges: a word found in the vocabulary is one token
  int32_t byte_id[256] = {};   // id of each byte's single-character token
  std::vector<uint32_t> byte_cp = byte_to_code_point();

  std::vector<std::string> bytes_of;  // id -> the token's bytes ("" when no token has the id)
  std::vector<uint8_t> special;       // id -> 1 if decode skips it
  bool clean_up_spaces = false;
  int32_t bos = -1, eos = -1, pad = -1, unk = -1;

  pcre2_code* re = nullptr;

  // Words seen before and their ids; encode is const and may run on several threads at once.
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  ~Impl() {
    if (re) pcre2_code_free(re);
  }

  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  // --- loading ---------------------------------------------------------------------------------------------

  void set_vocab(const json& v, const std::string& where) {
    if (!v.is_object()) fail(ErrorKind::Model, where + ": vocabulary is not a JSON object of token -> id");
    if (v.empty()) fail(ErrorKind::Model, where + ": vocabulary is empty");
    for (const auto& [token, id] : v.items()) vocab.emplace(token, json_id(id, where + ": \"" + token + "\""));
  }

  void add_merge(const std::string& a, const std::string& b, int32_t rank, const std::string& where) {
    int32_t ids[3];
    const std::string parts[3] = {a, b, a + b};
    for (int i = 0; i < 3; ++i) {
      const auto it = vocab.find(parts[i]);
      if (it == vocab.end())
        fail(ErrorKind::Model, where + ": merge \"" + a + " " + b + "\" names token \"" + parts[i] +
                                   "\", which is not in the vocabulary");
      ids[i] = it->second;
    }
    merges[pair_key(ids[0], ids[1])] = {rank, ids[2]};  // a repeated pair keeps its last rank, as HF
  }

  void read_merges_txt(const std::string& path) {
    std::istringstream in(read_tokenizer_file(path));
    std::string line;
    int32_t rank = 0;
    for (int line_no = 1; std::getline(in, line); ++line_no) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || line.rfind("#version", 0) == 0) continue;
      const size_t sp = line.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 == line.size() || line.find(' ', sp + 1) != std::string::npos)
        fail(ErrorKind::Model, path + ": line " + std::to_string(line_no) + ": expected two tokens separated by one space");
      add_merge(line.substr(0, sp), line.substr(sp + 1), rank++, path + ": line " + std::to_string(line_no));
    }
  }

  void read_tokenizer_json_model(const json& j, const std::string& path) {
    if (!j.is_object() || !j.contains("model") || !j["model"].is_object())
      fail(ErrorKind::Model, path + ": no \"model\" object");
    const json& m = j["model"];
    if (const std::string type = opt_string(m, "type", path + ": model."); !type.empty() && type != "BPE")
      fail(ErrorKind::Model, path + ": model.type is \"" + type + "\", expected \"BPE\"");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (!opt_string(m, key, path + ": model.").empty())
        fail(ErrorKind::Model, path + ": model." + key + " is not supported by the byte-level BPE tokenizer");
    // Only GPT-2's own pre-tokenization is implemented; anything else would tokenize silently wrong.
    if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null()) {
      const json& pt = j["pre_tokenizer"];
      if (!pt.is_object() || opt_string(pt, "type", path + ": pre_tokenizer.") != "ByteLevel")
        fail(ErrorKind::Model, path + ": pre_tokenizer is not ByteLevel (only GPT-2 byte-level BPE is supported)");
      if (opt_bool(pt, "add_prefix_space", false, path + ": pre_tokenizer."))
        fail(ErrorKind::Model, path + ": pre_tokenizer.add_prefix_space = true is not supported");
      if (!opt_bool(pt, "use_regex", true, path + ": pre_tokenizer."))
        fail(ErrorKind::Model, path + ": pre_tokenizer.use_regex = false is not supported");
    }
    if (!m.contains("vocab")) fail(ErrorKind::Model, path + ": model.vocab missing");
    set_vocab(m["vocab"], path + ": model.vocab");
    if (!m.contains("merges") || !m["merges"].is_array())
      fail(ErrorKind::Model, path + ": model.merges missing or not an array");
    ignore_merges = opt_bool(m, "ignore_merges", false, path + ": model.");
    int32_t rank = 0;
    for (const json& e : m["merges"]) {
      const std::string where = path + ": model.merges[" + std::to_string(rank) + "]";
      if (e.is_string()) {  // "a b"
        const std::string s = e.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || sp == 0 || sp + 1 == s.size() || s.find(' ', sp + 1) != std::string::npos)
          fail(ErrorKind::Model, where + ": expected \"a b\" (two tokens separated by one space)");
        add_merge(s.substr(0, sp), s.substr(sp + 1), rank, where);
      } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {  // ["a", "b"]
        add_merge(e[0].get<std::string>(), e[1].get<std::string>(), rank, where);
      } else {
        fail(ErrorKind::Model, where + ": expected \"a b\" or [\"a\", \"b\"]");
      }
      ++rank;
    }
  }

  // Adds or updates an added token. The first id seen for a content wins; flags accumulate (added_tokens.json
  // lists "<image>" without flags, added_tokens_decoder marks it special).
  void note_added(const std::string& content, int32_t id, bool is_special, bool lstrip, bool rstrip) {
    if (content.empty()) return;
    for (auto& a : added)
      if (a.content == content) {
        a.special |= is_special, a.lstrip |= lstrip, a.rstrip |= rstrip;
        return;
      }
    added.push_back({content, id, is_special, lstrip, rstrip});
  }

  void read_added_token_object(const json& t, const std::string& where, std::optional<int32_t> id) {
    if (!t.is_object() || !t.contains("content") || !t["content"].is_string())
      fail(ErrorKind::Model, where + ": expected an object with \"content\"");
    if (!id) {
      if (!t.contains("id")) fail(ErrorKind::Model, where + ": \"id\" missing");
      id = json_id(t["id"], where);
    }
    const auto flag = [&](const char* key) { return t.contains(key) && t[key].is_boolean() && t[key].get<bool>(); };
    note_added(t["content"].get<std::string>(), *id, flag("special"), flag("lstrip"), flag("rstrip"));
  }

  // A role (bos_token, ...) or additional special token: special, matched whole, if the vocabulary has it.
  int32_t note_role(const std::string& content) {
    for (auto& a : added)
      if (a.content == content) {
        a.special = true;
        return a.id;
      }
    const auto it = vocab.find(content);
    if (it == vocab.end()) return -1;  // HF would append it as a new token; no OPT checkpoint needs that
    note_added(content, it->second, true, false, false);
    return it->second;
  }

  void read_roles(const json& j, const std::string& path) {
    if (!j.is_object()) fail(ErrorKind::Model, path + ": not a JSON object");
    const std::pair<const char*, int32_t*> roles[] = {
        {"bos_token", &bos}, {"eos_token", &eos}, {"unk_token", &unk}, {"pad_token", &pad},
        {"sep_token", nullptr}, {"cls_token", nullptr}, {"mask_token", nullptr}};
    for (const auto& [key, slot] : roles) {
      if (!j.contains(key)) continue;
      const auto content = token_content(j[key], path + ": " + key);
      if (!content) continue;
      const int32_t id = note_role(*content);
      if (slot) *slot = id;
    }
    if (j.contains("additional_special_tokens") && !j["additional_special_tokens"].is_null()) {
      const json& extra = j["additional_special_tokens"];
      if (!extra.is_array()) fail(ErrorKind::Model, path + ": additional_special_tokens is not an array");
      for (const json& t : extra)
        if (const auto content = token_content(t, path + ": additional_special_tokens")) note_role(*content);
    }
  }

  void read_tokenizer_config(const json& j, const std::string& path) {
    if (!j.is_object()) fail(ErrorKind::Model, path + ": not a JSON object");
    if (j.contains("added_tokens_decoder")) {
      const json& d = j["added_tokens_decoder"];
      if (!d.is_object()) fail(ErrorKind::Model, path + ": added_tokens_decoder is not an object");
      for (const auto& [key, t] : d.items()) {
        const std::string where = path + ": added_tokens_decoder[\"" + key + "\"]";
        int64_t id = -1;
        try {
          size_t used = 0;
          id = std::stoll(key, &used);
          if (used != key.size()) id = -1;
        } catch (const std::exception&) {
        }
        if (id < 0 || id >= kMaxId) fail(ErrorKind::Model, where + ": key is not a token id");
        read_added_token_object(t, where, static_cast<int32_t>(id));
      }
    }
    clean_up_spaces = opt_bool(j, "clean_up_tokenization_spaces", false, path + ": ");
  }

  // Tables derived once everything is read, and the checks that need all of it.
  void finish(const std::string& model_dir) {
    int32_t max_id = -1;
    for (const auto& [token, id] : vocab) max_id = std::max(max_id, id);
    for (const auto& a : added) max_id = std::max(max_id, a.id);
    bytes_of.assign(static_cast<size_t>(max_id) + 1, std::string());
    special.assign(static_cast<size_t>(max_id) + 1, 0);

    // Inverse of bytes_to_unicode, for spelling tokens back as bytes.
    std::vector<int> cp_byte(512, -1);
    for (int b = 0; b < 256; ++b) cp_byte[byte_cp[b]] = b;
    // HF's ByteLevel decoder: a token whose characters all come from bytes_to_unicode becomes those bytes;
    // any other token (an added token such as "<image> " with a plain space) is taken as its UTF-8 text.
    const auto spell = [&](const std::string& token) {
      std::string out;
      const auto* p = reinterpret_cast<const unsigned char*>(token.data());
      for (size_t i = 0; i < token.size();) {
        bool ok;
        uint32_t cp = 0;
        i += utf8_step(p + i, token.size() - i, &ok, &cp);
        if (!ok || cp >= cp_byte.size() || cp_byte[cp] < 0) return token;
        out += static_cast<char>(cp_byte[cp]);
      }
      return out;
    };
    for (const auto& [token, id] : vocab) {
      if (!bytes_of[id].empty())
        fail(ErrorKind::Model, model_dir + ": vocabulary id " + std::to_string(id) + " is used by two tokens");
      bytes_of[id] = spell(token);
    }
    for (const auto& a : added) {
      bytes_of[a.id] = spell(a.content);
      special[a.id] = a.special;
      added_ids[a.content] = a.id;
      added_first_byte[static_cast<unsigned char>(a.content[0])] = true;
    }
    // Longest first, so that the longest added token starting at a position wins (HF's leftmost-longest).
    std::stable_sort(added.begin(), added.end(),
                     [](const AddedToken& x, const AddedToken& y) { return x.content.size() > y.content.size(); });

    for (int b = 0; b < 256; ++b) {
      std::string ch;
      append_utf8(ch, byte_cp[b]);
      const auto it = vocab.find(ch);
      if (it == vocab.end()) {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02X", b);
        fail(ErrorKind::Model, model_dir + ": the vocabulary has no token for byte " + hex + " (\"" + ch +
                                   "\"); not a byte-level BPE vocabulary");
      }
      byte_id[b] = it->second;
    }

    int err = 0;
    PCRE2_SIZE offset = 0;
    re = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kPattern), PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err,
                       &offset, nullptr);
    if (!re) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      fail(ErrorKind::Internal, std::string("cannot compile the pre-tokenization regex: ") +
                                    reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);  // a failure just means the interpreter runs instead
  }

  // --- encoding --------------------------------------------------------------------------------------------

  // BPE on one pre-token: start from one token per byte, then repeatedly merge the adjacent pair of lowest
  // rank (leftmost among equals). A heap of candidate pairs over a linked list keeps it O(n log n) for long
  // words; candidates made stale by an earlier merge are recognised by their ids and skipped.
  std::vector<int32_t> bpe(const unsigned char* p, size_t n) const {
    if (ignore_merges) {
      std::string word;
      for (size_t i = 0; i < n; ++i) append_utf8(word, byte_cp[p[i]]);
      if (const auto it = vocab.find(word); it != vocab.end()) return {it->second};
    }
    struct Sym {
      int32_t id, prev, next;
    };
    std::vector<Sym> sym(n);
    for (size_t i = 0; i < n; ++i)
      sym[i] = {byte_id[p[i]], static_cast<int32_t>(i) - 1, i + 1 < n ? static_cast<int32_t>(i) + 1 : -1};
    struct Cand {
      int32_t rank, pos, left, right, merged;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    const auto push = [&](int32_t pos) {
      if (pos < 0 || sym[pos].next < 0) return;
      const int32_t l = sym[pos].id, r = sym[sym[pos].next].id;
      if (const auto it = merges.find(pair_key(l, r)); it != merges.end())
        heap.push({it->second.first, pos, l, r, it->second.second});
    };
    for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int32_t>(i));
    while (!heap.empty()) {
      const Cand c = heap.top();
      heap.pop();
      Sym& s = sym[c.pos];
      if (s.id != c.left || s.next < 0 || sym[s.next].id != c.right) continue;  // stale
      Sym& gone = sym[s.next];
      s.id = c.merged;
      s.next = gone.next;
      if (gone.next >= 0) sym[gone.next].prev = c.pos;
      gone.id = -1;
      push(s.prev);
      push(c.pos);
    }
    std::vector<int32_t> ids;
    for (int32_t i = 0; i >= 0; i = sym[i].next) ids.push_back(sym[i].id);
    return ids;
  }

  void encode_word(const unsigned char* p, size_t n, std::vector<int32_t>& out) const {
    if (n == 0) return;
    if (n == 1) {
      out.push_back(byte_id[p[0]]);
      return;
    }
    if (n > kMaxCachedWordBytes) {
      const std::vector<int32_t> ids = bpe(p, n);
      out.insert(out.end(), ids.begin(), ids.end());
      return;
    }
    const std::string key(reinterpret_cast<const char*>(p), n);
    {
      std::lock_guard<std::mutex> lock(cache_mutex);
      if (const auto it = cache.find(key); it != cache.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> ids = bpe(p, n);
    out.insert(out.end(), ids.begin(), ids.end());
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (cache.size() >= kMaxCacheEntries) cache.clear();
    cache.emplace(key, std::move(ids));
  }

  // Pre-tokenizes a stretch of text with no added tokens in it and encodes each piece. Valid UTF-8 runs go
  // through the regex (validated here, so PCRE2 skips its own check, which would make every match O(n));
  // each run of invalid bytes is one piece of its own.
  void encode_chunk(const unsigned char* p, size_t n, std::vector<int32_t>& out, pcre2_match_data* md) const {
    size_t i = 0;
    while (i < n) {
      size_t j = i;
      bool ok = true;
      while (j < n) {  // [i, j): bytes of the same validity
        bool ok_here;
        const size_t len = utf8_step(p + j, n - j, &ok_here);
        if (j == i) ok = ok_here;
        if (ok_here != ok) break;
        j += len;
      }
      if (!ok) {
        encode_word(p + i, j - i, out);
      } else {
        size_t at = i;
        while (at < j) {
          const int rc = pcre2_match(re, p + i, j - i, at - i, PCRE2_NO_UTF_CHECK, md, nullptr);
          if (rc == PCRE2_ERROR_NOMATCH) {  // cannot happen: the alternatives cover every character
            encode_word(p + at, j - at, out);
            break;
          }
          if (rc < 0) {  // resource limits; tokenizing differently from HF would go unnoticed, so stop
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            fail(ErrorKind::Internal, std::string("pre-tokenization regex failed: ") + reinterpret_cast<const char*>(msg));
          }
          const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
          const size_t s = i + ov[0], e = i + ov[1];
          if (s > at) encode_word(p + at, s - at, out);  // an unmatched gap (also cannot happen) stays a piece
          if (e == s) {  // no empty matches in this pattern; step one character to be safe
            bool v;
            const size_t len = utf8_step(p + s, j - s, &v);
            encode_word(p + s, len, out);
            at = s + len;
            continue;
          }
          encode_word(p + s, e - s, out);
          at = e;
        }
      }
      i = j;
    }
  }

  std::vector<int32_t> encode(const std::string& text) const {
    std::vector<int32_t> out;
    const auto* p = reinterpret_cast<const unsigned char*>(text.data());
    const size_t n = text.size();
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md(
        pcre2_match_data_create_from_pattern(re, nullptr), &pcre2_match_data_free);
    if (!md) fail(ErrorKind::Internal, "out of memory creating regex match data");

    // Added tokens split the text first (leftmost, then longest); lstrip/rstrip tokens swallow the ASCII
    // whitespace beside them.
    size_t start = 0;  // first byte not yet encoded
    for (size_t i = 0; i < n && !added.empty();) {
      const AddedToken* hit = nullptr;
      if (added_first_byte[p[i]])
        for (const auto& a : added)
          if (text.compare(i, a.content.size(), a.content) == 0) {
            hit = &a;
            break;
          }
      if (!hit) {
        ++i;
        continue;
      }
      size_t before = i, after = i + hit->content.size();
      if (hit->lstrip)
        while (before > start && is_ascii_space(text[before - 1])) --before;
      if (hit->rstrip)
        while (after < n && is_ascii_space(text[after])) ++after;
      encode_chunk(p + start, before - start, out, md.get());
      out.push_back(hit->id);
      start = i = after;
    }
    encode_chunk(p + start, n - start, out, md.get());
    return out;
  }

  // The text before clean-up.
  std::string decode_raw(const std::vector<int32_t>& ids, bool skip_special) const {
    std::string bytes;
    for (int32_t id : ids) {
      if (id < 0 || static_cast<size_t>(id) >= bytes_of.size()) continue;  // HF skips ids with no token
      if (skip_special && special[id]) continue;
      bytes += bytes_of[id];
    }
    return utf8_lossy(bytes);
  }
  std::string decode(const std::vector<int32_t>& ids, bool skip_special, bool stable_only = false) const {
    std::string text = decode_raw(ids, skip_special);
    if (clean_up_spaces) {
      if (stable_only) text.resize(cleanup_stable_length(text));
      clean_up_tokenization(text);
    }
    return text;
  }
};

BpeTokenizer::BpeTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BpeTokenizer::BpeTokenizer(BpeTokenizer&&) noexcept = default;
BpeTokenizer& BpeTokenizer::operator=(BpeTokenizer&&) noexcept = default;
BpeTokenizer::~BpeTokenizer() = default;

BpeTokenizer BpeTokenizer::load(const std::string& model_dir) {
  if (!fs::is_directory(model_dir)) fail(ErrorKind::Model, model_dir + ": tokenizer directory not found");
  auto impl = std::make_unique<Impl>();
  const auto file = [&](const char* name) { return (fs::path(model_dir) / name).string(); };
  const std::string vocab_path = file("vocab.json"), merges_path = file("merges.txt"),
                    tj_path = file("tokenizer.json");
  const bool has_vocab = fs::exists(vocab_path), has_merges = fs::exists(merges_path),
             has_tj = fs::exists(tj_path);

  std::optional<json> tj;
  if (has_tj) tj = read_json(tj_path);
  if (has_vocab && has_merges) {
    impl->set_vocab(read_json(vocab_path), vocab_path);
    impl->read_merges_txt(merges_path);
  } else if (has_tj) {
    impl->read_tokenizer_json_model(*tj, tj_path);
  } else if (has_vocab || has_merges) {
    fail(ErrorKind::Model, (has_vocab ? merges_path : vocab_path) +
                               ": tokenizer file missing (the BPE tokenizer needs vocab.json and merges.txt, "
                               "or tokenizer.json)");
  } else {
    fail(ErrorKind::Model, model_dir + ": no tokenizer files (the BPE tokenizer needs vocab.json and merges.txt, "
                                       "or tokenizer.json)");
  }

  // Added and special tokens, from every file that has them.
  if (tj) {
    if (tj->contains("added_tokens") && !(*tj)["added_tokens"].is_null()) {
      const json& list = (*tj)["added_tokens"];
      if (!list.is_array()) fail(ErrorKind::Model, tj_path + ": added_tokens is not an array");
      for (size_t i = 0; i < list.size(); ++i)
        impl->read_added_token_object(list[i], tj_path + ": added_tokens[" + std::to_string(i) + "]", std::nullopt);
    }
  }
  if (const std::string path = file("added_tokens.json"); fs::exists(path)) {
    const json j = read_json(path);
    if (!j.is_object()) fail(ErrorKind::Model, path + ": not a JSON object of token -> id");
    for (const auto& [content, id] : j.items())
      impl->note_added(content, json_id(id, path + ": \"" + content + "\""), false, false, false);
  }
  std::optional<json> config;
  if (const std::string path = file("tokenizer_config.json"); fs::exists(path)) {
    config = read_json(path);
    impl->read_tokenizer_config(*config, path);
  }
  if (const std::string path = file("special_tokens_map.json"); fs::exists(path))
    impl->read_roles(read_json(path), path);
  if (config) impl->read_roles(*config, file("tokenizer_config.json"));  // the config's roles win

  impl->finish(model_dir);
  return BpeTokenizer(std::move(impl));
}

std::vector<int32_t> BpeTokenizer::encode(const std::string& text) const { return impl_->encode(text); }

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  return impl_->decode(ids, skip_special);
}

std::string BpeTokenizer::decode_stable(const std::vector<int32_t>& ids, bool skip_special) const {
  return impl_->decode(ids, skip_special, true);
}

std::string BpeTokenizer::token_bytes(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= impl_->bytes_of.size()) return "";
  return impl_->bytes_of[id];
}

std::optional<int32_t> BpeTokenizer::token_id(const std::string& token) const {
  if (const auto it = impl_->added_ids.find(token); it != impl_->added_ids.end()) return it->second;
  if (const auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

bool BpeTokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->special.size() && impl_->special[id];
}

int32_t BpeTokenizer::vocab_size() const { return static_cast<int32_t>(impl_->bytes_of.size()); }
int32_t BpeTokenizer::bos_id() const { return impl_->bos; }
int32_t BpeTokenizer::eos_id() const { return impl_->eos; }
int32_t BpeTokenizer::pad_id() const { return impl_->pad; }
int32_t BpeTokenizer::unk_id() const { return impl_->unk; }

}  // namespace blip2
