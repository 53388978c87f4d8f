// Strict base64 (RFC 4648, standard alphabet, '=' padding required): anything else is an error, so a
// truncated or corrupted upload is reported instead of decoded into garbage.
#pragma once
#include <optional>
#include <string>
#include <string_view>

namespace blip2::server {

// The decoded bytes, or nullopt (with `why` set) for input that is not canonical padded base64.
// Whitespace is not allowed; decoding stops with an error as soon as the output would exceed max_bytes.
std::optional<std::string> base64_decode(std::string_view in, size_t max_bytes, std::string* why = nullptr);
std::string base64_encode(std::string_view in);

}  // namespace blip2::server
