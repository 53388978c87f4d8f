#include "server/base64.h"

#include <algorithm>
#include <array>
#include <cstdint>

namespace blip2::server {

namespace {

constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

constexpr std::array<int8_t, 256> make_table() {
  std::array<int8_t, 256> t{};
  for (auto& v : t) v = -1;
  for (int i = 0; i < 64; ++i) t[static_cast<unsigned char>(kAlphabet[i])] = static_cast<int8_t>(i);
  return t;
}
constexpr auto kTable = make_table();

std::optional<std::string> error(std::string* why, const std::string& msg) {
  if (why) *why = msg;
  return std::nullopt;
}

}  // namespace

std::optional<std::string> base64_decode(std::string_view in, size_t max_bytes, std::string* why) {
  if (in.size() % 4 != 0)
    return error(why, "length " + std::to_string(in.size()) + " is not a multiple of 4 (truncated or unpadded)");
  const size_t pad = in.size() >= 1 && in.back() == '=' ? (in.size() >= 2 && in[in.size() - 2] == '=' ? 2 : 1) : 0;
  const size_t out_size = in.size() / 4 * 3 - pad;
  if (out_size > max_bytes)
    return error(why, "decodes to " + std::to_string(out_size) + " bytes, the limit is " + std::to_string(max_bytes));
  std::string out;
  out.reserve(out_size);
  for (size_t i = 0; i < in.size(); i += 4) {
    const bool last = i + 4 == in.size();
    int v[4];
    for (int j = 0; j < 4; ++j) {
      const unsigned char c = static_cast<unsigned char>(in[i + j]);
      if (c == '=' && last && j >= 4 - static_cast<int>(pad)) {
        v[j] = 0;
        continue;
      }
      v[j] = kTable[c];
      if (v[j] < 0) return error(why, "invalid character at offset " + std::to_string(i + j));
    }
    const uint32_t n = (static_cast<uint32_t>(v[0]) << 18) | (v[1] << 12) | (v[2] << 6) | v[3];
    out.push_back(static_cast<char>(n >> 16));
    if (!(last && pad == 2)) out.push_back(static_cast<char>((n >> 8) & 0xFF));
    if (!(last && pad >= 1)) out.push_back(static_cast<char>(n & 0xFF));
    // Canonical form: the bits dropped by the padding must be zero.
    if (last && ((pad == 1 && (v[2] & 0x3)) || (pad == 2 && (v[1] & 0xF))))
      return error(why, "non-zero padding bits (not canonical base64)");
  }
  return out;
}

std::string base64_encode(std::string_view in) {
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  for (size_t i = 0; i < in.size(); i += 3) {
    const size_t n = std::min<size_t>(3, in.size() - i);
    uint32_t v = static_cast<uint32_t>(static_cast<unsigned char>(in[i])) << 16;
    if (n > 1) v |= static_cast<uint32_t>(static_cast<unsigned char>(in[i + 1])) << 8;
    if (n > 2) v |= static_cast<unsigned char>(in[i + 2]);
    out.push_back(kAlphabet[v >> 18]);
    out.push_back(kAlphabet[(v >> 12) & 63]);
    out.push_back(n > 1 ? kAlphabet[(v >> 6) & 63] : '=');
    out.push_back(n > 2 ? kAlphabet[v & 63] : '=');
  }
  return out;
}

}  // namespace blip2::server
