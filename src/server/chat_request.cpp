#include "server/chat_request.h"

#include <arpa/inet.h>
#include <httplib.h>
#include <netdb.h>
#include <netinet/in.h>

#include <cmath>
#include <cstdio>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "server/base64.h"

namespace blip2::server {

using nlohmann::json;

namespace {

std::string type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    default: return "a number";
  }
}

[[noreturn]] void wrong_type(const std::string& param, const json& v, const std::string& want) {
  bad_field(param, "'" + param + "' must be " + want + ", got " + type_name(v), "invalid_type");
}

// A field that is absent or null counts as not given.
const json* field(const json& obj, const char* key) {
  const auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

int64_t get_int(const json& v, const std::string& param, int64_t lo, int64_t hi) {
  // 3.0 is accepted as 3 (JavaScript clients cannot tell them apart); 3.5 is not.
  int64_t n;
  if (v.is_number_integer()) {
    n = v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
            ? std::numeric_limits<int64_t>::max()
            : v.get<int64_t>();
  } else if (v.is_number_float() && std::isfinite(v.get<double>()) && v.get<double>() == std::floor(v.get<double>()) &&
             std::fabs(v.get<double>()) < 1e15) {
    n = static_cast<int64_t>(v.get<double>());
  } else {
    wrong_type(param, v, "an integer");
  }
  if (n < lo || n > hi)
    bad_field(param, "'" + param + "' must be between " + std::to_string(lo) + " and " + std::to_string(hi) +
                         " (got " + std::to_string(n) + ")");
  return n;
}

double get_number(const json& v, const std::string& param, double lo, double hi) {
  if (!v.is_number()) wrong_type(param, v, "a number");
  const double x = v.get<double>();
  if (!(x >= lo && x <= hi)) {
    std::ostringstream s;
    s << "'" << param << "' must be between " << lo << " and " << hi << " (got " << x << ")";
    bad_field(param, s.str());
  }
  return x;
}

bool get_bool(const json& v, const std::string& param) {
  if (!v.is_boolean()) wrong_type(param, v, "true or false");
  return v.get<bool>();
}

const std::string& get_string(const json& v, const std::string& param) {
  if (!v.is_string()) wrong_type(param, v, "a string");
  return v.get_ref<const std::string&>();
}

// One message's content: a string, or an array of text and image_url parts. Appends its text (parts
// joined by a space) and its image URLs.
void read_content(const json& content, const std::string& param, std::string& text, std::vector<std::string>& images) {
  const auto add_text = [&](const std::string& t) {
    if (t.empty()) return;
    if (!text.empty()) text += ' ';
    text += t;
  };
  if (content.is_string()) {
    add_text(content.get<std::string>());
    return;
  }
  if (!content.is_array()) wrong_type(param, content, "a string or an array of content parts");
  for (size_t i = 0; i < content.size(); ++i) {
    const json& part = content[i];
    const std::string p = param + "[" + std::to_string(i) + "]";
    if (!part.is_object()) wrong_type(p, part, "an object");
    const json* type = field(part, "type");
    if (!type) bad_field(p + ".type", "'" + p + ".type' is required (\"text\" or \"image_url\")", "missing_field");
    const std::string& t = get_string(*type, p + ".type");
    if (t == "text") {
      const json* tx = field(part, "text");
      if (!tx) bad_field(p + ".text", "'" + p + ".text' is required", "missing_field");
      add_text(get_string(*tx, p + ".text"));
    } else if (t == "image_url") {
      const json* iu = field(part, "image_url");
      if (!iu) bad_field(p + ".image_url", "'" + p + ".image_url' is required", "missing_field");
      if (iu->is_string()) {
        images.push_back(iu->get<std::string>());
      } else if (iu->is_object()) {
        const json* url = field(*iu, "url");
        if (!url) bad_field(p + ".image_url.url", "'" + p + ".image_url.url' is required", "missing_field");
        images.push_back(get_string(*url, p + ".image_url.url"));
      } else {
        wrong_type(p + ".image_url", *iu, "an object {\"url\": ...}");
      }
    } else {
      bad_field(p + ".type", "content part type '" + t + "' is not supported (use \"text\" or \"image_url\")",
                "unsupported_value");
    }
  }
}

}  // namespace

json parse_json_body(const std::string& body, int max_depth) {
  struct TooDeep {};
  try {
    return json::parse(body, [max_depth](int depth, json::parse_event_t, json&) {
      if (depth > max_depth) throw TooDeep{};
      return true;
    });
  } catch (const TooDeep&) {
    throw ApiError(400, "request body nests deeper than " + std::to_string(max_depth) + " levels", "",
                   "json_too_deep");
  } catch (const json::exception& e) {
    throw ApiError(400, std::string("request body is not valid JSON: ") + e.what(), "", "invalid_json");
  }
}

ChatRequest parse_chat_request(const std::string& body, const GenerationOptions& defaults, const Limits& limits) {
  const json j = parse_json_body(body, limits.max_json_depth);
  if (!j.is_object()) throw ApiError(400, "request body must be a JSON object, got " + type_name(j), "", "invalid_type");
  ChatRequest r;
  GenerationOptions& o = r.options;
  o = defaults;
  o.num_return_sequences = 1;

  if (const json* m = field(j, "model")) r.model = get_string(*m, "model");
  if (const json* s = field(j, "stream")) r.stream = get_bool(*s, "stream");
  if (const json* so = field(j, "stream_options")) {
    if (!so->is_object()) wrong_type("stream_options", *so, "an object");
    if (const json* iu = field(*so, "include_usage")) r.include_usage = get_bool(*iu, "stream_options.include_usage");
  }

  // Lengths. max_completion_tokens is the newer name of max_tokens.
  for (const char* key : {"max_tokens", "max_completion_tokens"})
    if (const json* v = field(j, key)) o.max_new_tokens = static_cast<int>(get_int(*v, key, 1, limits.max_output_tokens));
  o.max_new_tokens = std::min(o.max_new_tokens, limits.max_output_tokens);
  if (const json* v = field(j, "min_tokens")) o.min_new_tokens = static_cast<int>(get_int(*v, "min_tokens", 0, limits.max_output_tokens));
  if (o.min_new_tokens > o.max_new_tokens)
    bad_field("min_tokens", "'min_tokens' (" + std::to_string(o.min_new_tokens) + ") must not exceed 'max_tokens' (" +
                                std::to_string(o.max_new_tokens) + ")");

  // Sampling: temperature 0 means the most likely tokens; above 0 (or top_p / top_k given) samples.
  const json* temperature = field(j, "temperature");
  const json* top_p = field(j, "top_p");
  const json* top_k = field(j, "top_k");
  if (temperature) {
    o.temperature = get_number(*temperature, "temperature", 0.0, 2.0);
    o.do_sample = o.temperature > 0.0;
    if (!o.do_sample) o.temperature = 1.0;
    if (o.do_sample && o.temperature < kMinSamplingTemperature) {
      std::ostringstream s;
      s << "'temperature' must be 0 (the most likely tokens) or at least " << kMinSamplingTemperature << " (got "
        << o.temperature << "): below, the softmax degenerates (tokens 1.5 logits behind the best can never be drawn)";
      bad_field("temperature", s.str());
    }
  }
  if (top_p) {
    o.top_p = get_number(*top_p, "top_p", 0.0, 1.0);
    if (o.top_p <= 0.0) bad_field("top_p", "'top_p' must be greater than 0");
    if (!temperature) o.do_sample = true;
  }
  if (top_k) {
    o.top_k = static_cast<int>(get_int(*top_k, "top_k", 0, 1 << 20));
    if (!temperature) o.do_sample = true;
  }
  if (const json* v = field(j, "seed")) o.seed = static_cast<uint64_t>(get_int(*v, "seed", 0, std::numeric_limits<int64_t>::max()));

  // This engine's own decoding options (Hugging Face's names).
  if (const json* v = field(j, "num_beams")) o.num_beams = static_cast<int>(get_int(*v, "num_beams", 1, limits.max_choices));
  if (const json* v = field(j, "repetition_penalty")) {
    o.repetition_penalty = get_number(*v, "repetition_penalty", 0.0, 100.0);
    if (o.repetition_penalty <= 0.0) bad_field("repetition_penalty", "'repetition_penalty' must be greater than 0");
  }
  if (const json* v = field(j, "length_penalty")) o.length_penalty = get_number(*v, "length_penalty", -100.0, 100.0);
  if (const json* v = field(j, "early_stopping")) {
    if (v->is_boolean()) o.early_stopping = v->get<bool>() ? EarlyStopping::Always : EarlyStopping::Heuristic;
    else if (*v == "never") o.early_stopping = EarlyStopping::Never;
    else bad_field("early_stopping", "'early_stopping' must be true, false or \"never\"");
  }
  if (const json* v = field(j, "no_repeat_ngram_size"))
    o.no_repeat_ngram_size = static_cast<int>(get_int(*v, "no_repeat_ngram_size", 0, 1024));

  const int n = field(j, "n") ? static_cast<int>(get_int(*field(j, "n"), "n", 1, limits.max_choices)) : 1;
  o.num_return_sequences = n;
  if (n > 1 && !o.do_sample && o.num_beams < n)
    bad_field("n", "'n' > 1 needs sampling ('temperature' > 0) or beam search ('num_beams' >= n): the most likely "
                   "answer is unique");
  if (o.num_beams > 1 && n > o.num_beams)
    bad_field("n", "'n' (" + std::to_string(n) + ") must not exceed 'num_beams' (" + std::to_string(o.num_beams) + ")");

  // Options of OpenAI's API this engine does not implement: refused when they would change the answer.
  for (const char* key : {"frequency_penalty", "presence_penalty"})
    if (const json* v = field(j, key); v && !(v->is_number() && v->get<double>() == 0.0))
      bad_field(key, std::string("'") + key + "' is not supported (use 'repetition_penalty')", "unsupported_parameter");
  for (const char* key : {"logprobs", "tools", "functions", "logit_bias", "stop", "response_format", "tool_choice"})
    if (const json* v = field(j, key); v && !(v->is_boolean() && !v->get<bool>()) && !(v->is_array() && v->empty()))
      bad_field(key, std::string("'") + key + "' is not supported by this server", "unsupported_parameter");

  try {
    validate(o);
  } catch (const Error& e) {
    bad_field("", e.what());
  }

  // Messages: [system…] user (assistant user)*; consecutive user messages are joined.
  const json* messages = field(j, "messages");
  if (!messages) bad_field("messages", "'messages' is required", "missing_field");
  if (!messages->is_array()) wrong_type("messages", *messages, "an array");
  if (messages->empty()) bad_field("messages", "'messages' must not be empty");
  if (static_cast<int>(messages->size()) > limits.max_messages)
    bad_field("messages", "too many messages: " + std::to_string(messages->size()) + ", the limit is " +
                              std::to_string(limits.max_messages));
  std::vector<std::string> images;
  std::string question, last_role;
  bool have_question = false;
  for (size_t i = 0; i < messages->size(); ++i) {
    const json& m = (*messages)[i];
    const std::string p = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) wrong_type(p, m, "an object");
    const json* role = field(m, "role");
    if (!role) bad_field(p + ".role", "'" + p + ".role' is required", "missing_field");
    const std::string& rl = get_string(*role, p + ".role");
    const json* content = field(m, "content");
    std::string text;
    if (rl == "system" || rl == "developer") {
      if (content) {  // checked, then left out: BLIP-2 has no system prompt
        std::vector<std::string> ignored;
        read_content(*content, p + ".content", text, ignored);
      }
      continue;
    }
    if (rl != "user" && rl != "assistant")
      bad_field(p + ".role", "role '" + rl + "' is not supported (use \"user\", \"assistant\" or \"system\")",
                "unsupported_value");
    if (!content) bad_field(p + ".content", "'" + p + ".content' is required", "missing_field");
    if (rl == "user") {
      read_content(*content, p + ".content", text, images);
      if (have_question && !question.empty() && !text.empty()) question += ' ';
      question += text;
      have_question = true;
    } else {
      std::vector<std::string> assistant_images;
      read_content(*content, p + ".content", text, assistant_images);
      if (!assistant_images.empty()) bad_field(p + ".content", "assistant messages cannot hold images");
      if (!have_question) bad_field(p, "an assistant message must follow a user message");
      r.history.push_back({question, text});
      question.clear();
      have_question = false;
    }
    last_role = rl;
  }
  if (last_role != "user") bad_field("messages", "the last message must be the user's");
  r.question = question;
  if (images.empty())
    bad_field("messages", "the conversation needs an image: add a content part {\"type\": \"image_url\", \"image_url\": "
                          "{\"url\": \"data:image/png;base64,...\"}}", "missing_image");
  for (const auto& u : images)
    if (u != images[0])
      bad_field("messages", "the conversation has " + std::to_string(images.size()) +
                                " different images; BLIP-2 answers about one image per conversation", "too_many_images");
  r.image_url = images[0];
  return r;
}

namespace {

// Resolves the URL's host, checks each address with non_public_address_kind, and makes the client connect to
// the first address allowed: the address checked is the address used (a second lookup could answer
// differently: DNS rebinding).
void pin_public_address(httplib::Client& cli, const std::string& authority, const Limits& limits) {
  if (authority.find('@') != std::string::npos)
    bad_field("image_url", "image URLs with user names or passwords are not fetched", "image_url_not_allowed");
  std::string host;
  if (!authority.empty() && authority[0] == '[') {
    const size_t close = authority.find(']');
    if (close == std::string::npos) bad_field("image_url", "not a valid image URL", "invalid_image_url");
    host = authority.substr(1, close - 1);
  } else {
    host = authority.substr(0, authority.find(':'));
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0 || !found)
    bad_field("image_url", "could not fetch the image: cannot resolve the host name", "image_fetch_failed");
  std::string chosen, refused;
  for (const addrinfo* a = found; a && chosen.empty(); a = a->ai_next) {
    char ip[INET6_ADDRSTRLEN] = {};
    const void* raw = a->ai_family == AF_INET ? static_cast<const void*>(&reinterpret_cast<const sockaddr_in*>(a->ai_addr)->sin_addr)
                                              : static_cast<const void*>(&reinterpret_cast<const sockaddr_in6*>(a->ai_addr)->sin6_addr);
    if (!inet_ntop(a->ai_family, raw, ip, sizeof ip)) continue;
    const std::string kind = non_public_address_kind(a->ai_addr);
    if (kind.empty() || limits.allow_private_image_hosts) chosen = ip;
    else if (refused.empty()) refused = "a " + kind + " address (" + ip + ")";
  }
  freeaddrinfo(found);
  if (chosen.empty())
    bad_field("image_url", "the image host resolves to " + refused + ", which is not fetched (start the server with "
                           "--allow-private-image-hosts to allow it)", "image_url_not_allowed");
  cli.set_hostname_addr_map({{host, chosen}});
}

}  // namespace

namespace {
std::string seconds_str(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g s", s);
  return buf;
}
}  // namespace

std::string fetch_image(const std::string& url, const Limits& limits) {
  const auto too_large = [&](size_t n) {
    throw ApiError(413, "image is " + std::to_string(n) + " bytes, the limit is " + std::to_string(limits.max_image_bytes),
                   "image_url", "image_too_large");
  };
  if (url.rfind("data:", 0) == 0) {
    const size_t comma = url.find(',');
    const std::string header = url.substr(5, comma == std::string::npos ? 0 : comma - 5);
    if (comma == std::string::npos || header.size() < 7 || header.compare(header.size() - 7, 7, ";base64") != 0)
      bad_field("image_url", "image data URL must be base64: data:image/png;base64,...", "invalid_image_url");
    if (header.rfind("image/", 0) != 0)
      bad_field("image_url", "data URL media type '" + header.substr(0, header.size() - 7) + "' is not an image",
                "invalid_image_url");
    const std::string_view data(url.data() + comma + 1, url.size() - comma - 1);
    if (data.size() / 4 * 3 > limits.max_image_bytes + 2) too_large(data.size() / 4 * 3);
    // Decoded with 3 bytes to spare: the check above leaves at most that much over the limit, which must be a
    // 413 like the rest, not a base64 error.
    std::string why;
    auto bytes = base64_decode(data, limits.max_image_bytes + 3, &why);
    if (!bytes) bad_field("image_url", "image data is not valid base64: " + why, "invalid_base64");
    if (bytes->size() > limits.max_image_bytes) too_large(bytes->size());
    return std::move(*bytes);
  }
  if (url.rfind("file://", 0) == 0) {
    if (limits.local_image_dir.empty())
      bad_field("image_url", "local image files are disabled (start the server with --allowed-local-media DIR)",
                "image_url_not_allowed");
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::path root = fs::canonical(limits.local_image_dir, ec);
    const fs::path path = fs::weakly_canonical(fs::path(url.substr(7)), ec);
    const std::string rs = root.string() + "/", ps = path.string();
    if (ec || root.empty() || ps.compare(0, rs.size(), rs) != 0)
      bad_field("image_url", "image file is outside the allowed directory", "image_url_not_allowed");
    if (!fs::is_regular_file(path, ec)) bad_field("image_url", "no such image file", "image_not_found");
    const auto size = fs::file_size(path, ec);
    if (ec) bad_field("image_url", "cannot read the image file", "image_not_found");
    if (size > limits.max_image_bytes) too_large(size);
    std::ifstream in(path, std::ios::binary);
    std::string bytes(size, '\0');
    if (!in.read(bytes.data(), static_cast<std::streamsize>(size))) bad_field("image_url", "cannot read the image file", "image_not_found");
    return bytes;
  }
  if (url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0) {
    if (!limits.allow_remote_images)
      bad_field("image_url", "remote image URLs are disabled (start the server with --allow-remote-images, or send "
                             "the image as a data URL)", "image_url_not_allowed");
    const size_t scheme_end = url.find("://") + 3;
    const size_t path_start = url.find('/', scheme_end);
    const std::string origin = url.substr(0, path_start);
    const std::string path = path_start == std::string::npos ? "/" : url.substr(path_start);
    httplib::Client cli(origin);
    if (!cli.is_valid()) bad_field("image_url", "not a valid image URL", "invalid_image_url");
    pin_public_address(cli, origin.substr(scheme_end), limits);
    const auto t = std::chrono::duration<double>(limits.remote_timeout_s);
    cli.set_connection_timeout(std::chrono::duration_cast<std::chrono::microseconds>(t));
    cli.set_read_timeout(std::chrono::duration_cast<std::chrono::microseconds>(t));
    // httplib's timeouts bound each connect and each read: a server sending a byte now and then kept a fetch
    // going for minutes. A watchdog stops the client at the total deadline.
    std::mutex mu;
    std::condition_variable cv;
    bool finished = false, timed_out = false;
    std::thread watchdog([&] {
      std::unique_lock<std::mutex> lock(mu);
      if (!cv.wait_for(lock, t, [&] { return finished; })) {
        timed_out = true;
        cli.stop();
      }
    });
    std::string bytes;
    bool over = false;
    const auto res = cli.Get(path, [&](const char* data, size_t n) {
      if (bytes.size() + n > limits.max_image_bytes) {
        over = true;
        return false;
      }
      bytes.append(data, n);
      return true;
    });
    {
      std::lock_guard<std::mutex> lock(mu);
      finished = true;
    }
    cv.notify_all();
    watchdog.join();
    if (over) too_large(bytes.size() + 1);
    if (timed_out)
      bad_field("image_url", "could not fetch the image within " + seconds_str(limits.remote_timeout_s),
                "image_fetch_failed");
    if (!res) bad_field("image_url", "could not fetch the image: " + httplib::to_string(res.error()), "image_fetch_failed");
    if (res->status != 200)
      bad_field("image_url", "fetching the image returned HTTP " + std::to_string(res->status), "image_fetch_failed");
    return bytes;
  }
  bad_field("image_url", "image URLs must be data:image/...;base64 URLs", "invalid_image_url");
}

namespace {

// The IPv4 ranges that are not public (RFC 6890's special-purpose registry, the parts a fetch must avoid).
std::string ipv4_kind(uint32_t a) {  // host byte order
  const auto in = [a](uint32_t net, int bits) { return bits == 0 || (a >> (32 - bits)) == (net >> (32 - bits)); };
  if (in(0x7F000000, 8)) return "loopback";                                       // 127.0.0.0/8
  if (in(0xA9FE0000, 16)) return "link-local";                                    // 169.254.0.0/16
  if (in(0x0A000000, 8) || in(0xAC100000, 12) || in(0xC0A80000, 16)) return "private";  // 10/8 172.16/12 192.168/16
  if (in(0x64400000, 10)) return "private";                                       // 100.64.0.0/10 (carrier NAT)
  if (in(0x00000000, 8)) return "unspecified";                                    // 0.0.0.0/8
  if (in(0xE0000000, 4)) return "multicast";                                      // 224.0.0.0/4
  if (in(0xF0000000, 4) || in(0xC0000000, 24) || in(0xC6120000, 15)) return "reserved";  // 240/4 192.0.0/24 198.18/15
  return "";
}

}  // namespace

std::string non_public_address_kind(const sockaddr* addr) {
  if (addr->sa_family == AF_INET)
    return ipv4_kind(ntohl(reinterpret_cast<const sockaddr_in*>(addr)->sin_addr.s_addr));
  if (addr->sa_family != AF_INET6) return "reserved";
  const uint8_t* b = reinterpret_cast<const sockaddr_in6*>(addr)->sin6_addr.s6_addr;
  const auto prefix = [b](std::initializer_list<uint8_t> p) { return std::equal(p.begin(), p.end(), b); };
  const auto v4_at = [b](int i) { return uint32_t(b[i]) << 24 | uint32_t(b[i + 1]) << 16 | uint32_t(b[i + 2]) << 8 | b[i + 3]; };
  if (prefix({0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF})) return ipv4_kind(v4_at(12));  // ::ffff:a.b.c.d
  if (prefix({0, 0x64, 0xFF, 0x9B, 0, 0, 0, 0, 0, 0, 0, 0})) return ipv4_kind(v4_at(12));  // 64:ff9b::a.b.c.d
  if (prefix({0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})) {  // ::/96: ::, ::1, and deprecated IPv4-compatible ones
    const uint32_t low = v4_at(12);
    return low == 1 ? "loopback" : low == 0 ? "unspecified" : "reserved";
  }
  if (b[0] == 0xFE && (b[1] & 0xC0) == 0x80) return "link-local";  // fe80::/10
  if (b[0] == 0xFE && (b[1] & 0xC0) == 0xC0) return "private";     // fec0::/10 (site-local, deprecated)
  if ((b[0] & 0xFE) == 0xFC) return "private";                     // fc00::/7 (unique local)
  if (b[0] == 0xFF) return "multicast";                            // ff00::/8
  return "";
}

std::string conversation_prompt(const ChatRequest& r, int64_t max_tokens,
                                const std::function<int64_t(const std::string&)>& count_tokens) {
  if (r.history.empty() && r.question.empty()) return "";
  try {
    return fit_chat_prompt(r.history, r.question, max_tokens, count_tokens);
  } catch (const Error& e) {
    bad_field("messages", e.what(), "context_length_exceeded");
  }
}

}  // namespace blip2::server
