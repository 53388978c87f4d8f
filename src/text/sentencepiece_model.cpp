#include "text/sentencepiece_model.h"

#include <sentencepiece_processor.h>

#include <cstdint>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "core/file.h"

namespace blip2 {
namespace {

// One field of a protobuf message in wire format: its number, wire type and payload.
struct WireField {
  uint32_t number = 0;
  int wire_type = 0;          // 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32
  std::string_view bytes;     // the payload of a length-delimited field
};

bool read_varint(std::string_view& in, uint64_t& value) {
  value = 0;
  for (int shift = 0; shift < 64 && !in.empty(); shift += 7) {
    const auto byte = static_cast<uint8_t>(in.front());
    in.remove_prefix(1);
    value |= static_cast<uint64_t>(byte & 0x7F) << shift;
    if (!(byte & 0x80)) return true;
  }
  return false;
}

// Calls visit(field) for each field of `message`; false if the wire format is broken (a truncated field,
// a group, which no SentencePiece message uses).
template <class Visit>
bool each_field(std::string_view message, Visit&& visit) {
  while (!message.empty()) {
    uint64_t tag = 0, length = 0;
    if (!read_varint(message, tag) || (tag >> 3) == 0 || (tag >> 3) > UINT32_MAX) return false;
    WireField field{static_cast<uint32_t>(tag >> 3), static_cast<int>(tag & 7), {}};
    switch (field.wire_type) {
      case 0: if (!read_varint(message, length)) return false; break;
      case 1: if (message.size() < 8) return false; message.remove_prefix(8); break;
      case 5: if (message.size() < 4) return false; message.remove_prefix(4); break;
      case 2:
        if (!read_varint(message, length) || length > message.size()) return false;
        field.bytes = message.substr(0, length);
        message.remove_prefix(length);
        break;
      default: return false;
    }
    visit(field);
  }
  return true;
}

// The ModelProto fields SentencePiece builds tries from (sentencepiece_model.proto): pieces (1) with their
// text (1), and the normalizer (3) and denormalizer (5) specs with their precompiled character map (2).
constexpr uint32_t kPieces = 1, kPieceText = 1, kNormalizer = 3, kDenormalizer = 5, kCharsMap = 2;

// A precompiled character map: a little-endian uint32 trie size, a Darts-clone double array of that many
// bytes (4-byte units), then the replacement strings, each ending with NUL, which the trie's values index.
// Returns what is wrong with it, or "" if every lookup SentencePiece can make stays inside it.
std::string charsmap_problem(std::string_view blob) {
  if (blob.empty()) return "";  // no map: the identity normalization
  uint32_t trie_bytes = 0;
  if (blob.size() < 4) return "shorter than its 4-byte header";
  std::memcpy(&trie_bytes, blob.data(), 4);
  blob.remove_prefix(4);
  if (trie_bytes > blob.size()) return "its trie runs past the end of the map";
  if (trie_bytes % 4 != 0) return "its trie is not a whole number of 4-byte units";
  const size_t units = trie_bytes / 4;
  const std::string_view strings = blob.substr(trie_bytes);
  if (units < 256 || units % 256 != 0) return "its trie is not a whole number of 256-unit blocks";
  if (strings.empty() || strings.back() != '\0') return "its replacement strings do not end with NUL";

  // A unit: bits 0-7 label (bit 31 set on value units), bit 8 "has a value", bits 10-31 the offset to its
  // children (shifted left 8 more when bit 9 is set). A search XORs a node's index with its offset and the
  // next byte, so each node's children block (index ^ offset, all 256 bytes) must lie inside the trie, and
  // the value unit of a node that has one must index a replacement string.
  const auto unit = [&](size_t i) {
    uint32_t u = 0;
    std::memcpy(&u, blob.data() + 4 * i, 4);
    return u;
  };
  const auto label = [](uint32_t u) { return u & ((1U << 31) | 0xFF); };
  const auto offset = [](uint32_t u) { return (u >> 10) << ((u & (1U << 9)) >> 6); };
  const auto has_value = [](uint32_t u) { return ((u >> 8) & 1) != 0; };
  const uint32_t root = unit(0);
  if (label(root) != 0 || has_value(root) || offset(root) == 0) return "its trie's root is not a node";
  for (size_t i = 0; i < units; ++i) {
    const uint32_t u = unit(i);
    if (label(u) > 0xFF) continue;  // a value unit, never searched from
    const size_t children = i ^ offset(u);
    if ((children | 0xFF) >= units) return "its trie points outside itself";
    if (has_value(u) && (unit(children) & 0x7FFFFFFF) >= strings.size())
      return "its trie points past the replacement strings";
  }
  return "";
}

}  // namespace

void check_sentencepiece_model(std::string_view proto, const std::string& path) {
  const auto broken = [&](const std::string& what) {
    fail(ErrorKind::Model, path + ": not a usable SentencePiece model: " + what);
  };
  // Protobuf keeps the last value of a repeated scalar field and merges repeated message fields, so the
  // charsmap that counts is the last one across every occurrence of its spec.
  std::string_view charsmaps[2];  // none: empty, which charsmap_problem accepts (the identity normalization)
  size_t pieces = 0;
  const bool parsed = each_field(proto, [&](const WireField& field) {
    if (field.number == kPieces) {
      if (field.wire_type != 2) broken("piece " + std::to_string(pieces) + " is not a message");
      std::string_view text;
      if (!each_field(field.bytes, [&](const WireField& f) {
            if (f.number == kPieceText) text = f.bytes;
          }))
        broken("piece " + std::to_string(pieces) + " is truncated");
      if (text.empty()) broken("piece " + std::to_string(pieces) + " is empty");
      if (text.find('\0') != std::string_view::npos) broken("piece " + std::to_string(pieces) + " contains a NUL byte");
      ++pieces;
    } else if (field.number == kNormalizer || field.number == kDenormalizer) {
      const int which = field.number == kNormalizer ? 0 : 1;
      if (field.wire_type != 2) broken("its normalizer spec is not a message");
      if (!each_field(field.bytes, [&](const WireField& f) {
            if (f.number == kCharsMap) charsmaps[which] = f.bytes;
          }))
        broken("its normalizer spec is truncated");
    }
  });
  if (!parsed) broken("the protobuf is truncated or malformed");
  if (pieces == 0) broken("it has no pieces");
  for (int which = 0; which < 2; ++which) {
    const std::string problem = charsmap_problem(charsmaps[which]);
    if (!problem.empty())
      broken(std::string(which == 0 ? "the normalizer" : "the denormalizer") + "'s character map: " + problem);
  }
}

void load_sentencepiece(sentencepiece::SentencePieceProcessor& sp, const std::string& path, const char* needed_by) {
  if (!std::filesystem::exists(path)) fail(ErrorKind::Model, path + ": tokenizer file missing (" + needed_by + ")");
  // Read here, under the tokenizer files' size cap, rather than by SentencePiece, which reads without one.
  const std::string proto = read_file(path, kMaxTokenizerFileBytes, ErrorKind::Model, "tokenizer file");
  check_sentencepiece_model(proto, path);
  const auto status = sp.LoadFromSerializedProto(proto);
  if (!status.ok()) fail(ErrorKind::Model, path + ": cannot load SentencePiece model: " + status.ToString());
}

}  // namespace blip2
