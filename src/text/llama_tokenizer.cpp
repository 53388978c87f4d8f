#include "text/llama_tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file.h"
#include "text/sentencepiece_model.h"

namespace blip2 {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json read_json_file(const fs::path& path) {
  if (!fs::exists(path)) return json::object();
  json j = json::parse(read_file(path.string(), kMaxConfigFileBytes, ErrorKind::Model, "tokenizer file"), nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail(ErrorKind::Model, path.string() + ": not a JSON object");
  return j;
}

// A special token's text: a string, or {"content": ...} as special_tokens_map.json writes it.
std::optional<std::string> token_text(const json& j, const std::string& key) {
  if (!j.contains(key)) return std::nullopt;
  const json& v = j[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace

LlamaTokenizer::LlamaTokenizer(const std::string& dir) : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  const fs::path path = fs::path(dir) / "tokenizer.model";
  load_sentencepiece(*sp_, path.string(), "the LLaMA tokenizer needs tokenizer.model");
  const int pieces = sp_->GetPieceSize();
  vocab_size_ = pieces;

  // Added tokens (ids after the pieces, e.g. [PAD]): added_tokens.json and tokenizer_config's decoder table.
  const json config = read_json_file(fs::path(dir) / "tokenizer_config.json");
  const json added = read_json_file(fs::path(dir) / "added_tokens.json");
  std::map<std::string, int32_t> added_ids;
  const auto add = [&](const std::string& text, int64_t id) {
    if (id < 0 || id >= (1 << 24) || text.empty())
      fail(ErrorKind::Model, dir + ": added token \"" + text + "\" has a bad id " + std::to_string(id));
    added_ids[text] = static_cast<int32_t>(id);
    vocab_size_ = std::max<int>(vocab_size_, static_cast<int>(id) + 1);
  };
  for (const auto& [text, id] : added.items())
    if (id.is_number_integer()) add(text, id.get<int64_t>());
  if (config.contains("added_tokens_decoder") && config["added_tokens_decoder"].is_object())
    for (const auto& [id, tok] : config["added_tokens_decoder"].items())
      if (auto text = token_text(tok, "content")) add(*text, std::stoll(id));
  const auto id_of = [&](const std::string& text) -> int32_t {
    if (auto it = added_ids.find(text); it != added_ids.end()) return it->second;
    const int id = sp_->PieceToId(text);
    if (sp_->IdToPiece(id) != text)
      fail(ErrorKind::Model, dir + ": special token \"" + text + "\" is neither a piece nor an added token");
    return id;
  };
  // Every added token is split out of the text (the slow tokenizer's no-split tokens); the named special
  // tokens are skipped in decoding too. Both sets are the same here: the added tokens are special.
  specials_ = added_ids;
  const json map = read_json_file(fs::path(dir) / "special_tokens_map.json");
  for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token"}) {
    auto text = token_text(config, key);
    if (!text) text = token_text(map, key);
    if (!text) continue;
    const int32_t id = id_of(*text);
    specials_[*text] = id;
    if (std::string(key) == "bos_token") bos_ = id;
    if (std::string(key) == "pad_token") pad_ = id;
  }
  if (bos_ < 0) bos_ = sp_->bos_id();  // LlamaTokenizer's default "<s>"
  if (bos_ < 0) fail(ErrorKind::Model, dir + ": the tokenizer has no BOS token");
}

LlamaTokenizer::~LlamaTokenizer() = default;

std::vector<int32_t> LlamaTokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out{bos_};
  const auto encode_piece = [&](const std::string& s) {
    if (s.empty()) return;
    std::vector<int> ids;
    const auto status = sp_->Encode(s, &ids);
    if (!status.ok()) fail(ErrorKind::Input, "cannot tokenize prompt: " + status.ToString());
    out.insert(out.end(), ids.begin(), ids.end());
  };
  // Leftmost special token, the longest where several start at one place (the slow tokenizer's trie).
  size_t from = 0;
  while (from < text.size()) {
    size_t best = std::string::npos, len = 0;
    int32_t id = 0;
    for (const auto& [s, sid] : specials_) {
      const size_t at = text.find(s, from);
      if (at != std::string::npos && (at < best || (at == best && s.size() > len))) {
        best = at;
        len = s.size();
        id = sid;
      }
    }
    if (best == std::string::npos) break;
    encode_piece(text.substr(from, best - from));
    out.push_back(id);
    from = best + len;
  }
  encode_piece(text.substr(from));
  return out;
}

std::string LlamaTokenizer::decode(const std::vector<int32_t>& ids) const {
  // convert_tokens_to_string: the first kept piece loses its leading `▁` (the prefix space the tokenizer
  // added), then SentencePiece decodes the pieces (bytes joined, control pieces empty, <unk> as " ⁇ ").
  std::vector<std::string> pieces;
  for (int32_t id : ids) {
    if (id < 0 || id >= sp_->GetPieceSize()) continue;  // added tokens (all special) and out-of-range ids
    if (std::any_of(specials_.begin(), specials_.end(), [&](const auto& s) { return s.second == id; })) continue;
    pieces.push_back(sp_->IdToPiece(id));
  }
  static const std::string kSpace = "\xe2\x96\x81";  // ▁
  if (!pieces.empty() && pieces[0].compare(0, kSpace.size(), kSpace) == 0) pieces[0].erase(0, kSpace.size());
  std::string text;
  const auto status = sp_->Decode(pieces, &text);
  if (!status.ok()) fail(ErrorKind::Internal, "cannot decode ids: " + status.ToString());
  return text;
}

}  // namespace blip2
