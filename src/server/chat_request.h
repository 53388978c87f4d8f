// POST /v1/chat/completions: the request body, parsed and checked against the server's limits before any
// model work. Everything wrong with a request is an ApiError (400 and friends) naming the field.
#pragma once
#include <sys/socket.h>

#include <cstdint>
#include <string>
#include <vector>

#include "generate/chat.h"
#include "generate/generate.h"
#include "server/api_error.h"

namespace blip2::server {

// The server's limits and input policy (command-line options of `blip2 serve`).
struct Limits {
  size_t max_body_bytes = 16u << 20;       // whole request body (413 beyond)
  size_t max_image_bytes = 8u << 20;       // one encoded image, after base64 decoding (413 beyond)
  int64_t max_image_pixels = 40'000'000;   // width × height, checked from the header before decoding
  int max_json_depth = 16;                 // nesting of objects and arrays
  int max_messages = 64;
  int max_prompt_tokens = 0;               // text tokens of the conversation prompt; 0: the model's limit
  int max_output_tokens = 512;             // max_tokens may not exceed this
  int max_choices = 8;                     // n and num_beams may not exceed this
  int max_inputs = 64;                     // inputs of one /v1/embeddings request, texts of one /v1/match
  std::string local_image_dir;             // file:// image URLs allowed under this directory; empty: refused
  bool allow_remote_images = false;        // http(s):// image URLs fetched; off: refused
  bool allow_private_image_hosts = false;  // ... also from loopback, link-local and private addresses
  double remote_timeout_s = 10;            // the whole fetch of a remote image (a total, not per read)
};

struct ChatRequest {
  std::string image_url;          // as given (data:, file:// or http(s)://)
  std::vector<ChatTurn> history;  // earlier (question, answer) turns
  std::string question;           // the last user message's text; empty with no history: a caption
  GenerationOptions options;      // n is options.num_return_sequences
  bool stream = false;
  bool include_usage = false;     // stream_options.include_usage
  std::string model;              // as sent (not checked: one model is served)
};

// Parses a request body. `defaults`: the model's generation defaults (generation_config.json), which the
// request's fields override. Throws ApiError.
ChatRequest parse_chat_request(const std::string& body, const GenerationOptions& defaults, const Limits& limits);

// Parses JSON with a nesting limit; throws ApiError(400) for malformed or too-deep input.
nlohmann::json parse_json_body(const std::string& body, int max_depth);

// The encoded image bytes a URL names: a base64 data URL, or (when the limits allow it) a local file or a
// remote URL. Throws ApiError.
std::string fetch_image(const std::string& url, const Limits& limits);

// Where a remote image may be fetched from, decided on each address its host resolves to: the kind of an address
// that is not on the public internet ("loopback", "link-local", "private", "unspecified", "multicast",
// "reserved"; IPv4-mapped and NAT64 IPv6 addresses by the IPv4 address inside), or "" for a public one. The
// server fetches from the others only with allow_private_image_hosts: they reach the machine itself, its
// network and the cloud metadata endpoint (169.254.169.254).
std::string non_public_address_kind(const sockaddr* addr);

// The prompt of a request: the conversation so far and the question (blip2 chat's format), or "" for a
// lone image. Drops the oldest turns that do not fit `max_tokens`.
std::string conversation_prompt(const ChatRequest& r, int64_t max_tokens,
                                const std::function<int64_t(const std::string&)>& count_tokens);

}  // namespace blip2::server
