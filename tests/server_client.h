// A small client for the server's tests and load test: requests over real loopback sockets with httplib,
// request bodies built from fixture images, and server-sent events split into their JSON payloads.
#pragma once
#include <httplib.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "server/base64.h"

namespace blip2::testing {

using nlohmann::json;

inline std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

inline json image_part_bytes(const std::string& bytes, const std::string& type = "image/png") {
  return {{"type", "image_url"}, {"image_url", {{"url", "data:" + type + ";base64," + server::base64_encode(bytes)}}}};
}
inline json image_part(const std::string& path) {
  return image_part_bytes(slurp(path), path.ends_with(".jpg") ? "image/jpeg" : "image/png");
}
inline json text_part(const std::string& text) { return {{"type", "text"}, {"text", text}}; }

// {"messages": [{"role": "user", "content": [image, text]}], ...extra}
inline json ask(const std::string& image_path, const std::string& question, json extra = json::object()) {
  json j = std::move(extra);
  j["messages"] = json::array({{{"role", "user"}, {"content", json::array({image_part(image_path), text_part(question)})}}});
  return j;
}

struct Reply {
  int status = 0;          // 0: no response (connection failed)
  std::string body;
  httplib::Headers headers;
  std::vector<json> events;  // streams: the payload of every "data:" event but [DONE]
  bool done = false;         // streams: ended with data: [DONE]
  json json_body() const { return json::parse(body, nullptr, false); }
};

inline std::vector<json> parse_sse(const std::string& body, bool* done) {
  std::vector<json> out;
  size_t pos = 0;
  while (true) {
    const size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) break;
    const std::string ev = body.substr(pos, end - pos);
    pos = end + 2;
    if (ev.rfind("data: ", 0) != 0) continue;
    if (ev == "data: [DONE]") {
      if (done) *done = true;
      continue;
    }
    out.push_back(json::parse(ev.substr(6), nullptr, false));
  }
  return out;
}

// POST /v1/chat/completions (or `path`) with a JSON body string.
inline Reply post(httplib::Client& cli, const std::string& body, const std::string& path = "/v1/chat/completions",
                  const std::string& content_type = "application/json", const httplib::Headers& headers = {}) {
  Reply r;
  auto res = cli.Post(path.c_str(), headers, body, content_type.c_str());
  if (!res) return r;
  r.status = res->status;
  r.body = res->body;
  r.headers = res->headers;
  r.events = parse_sse(r.body, &r.done);
  return r;
}
inline Reply post(httplib::Client& cli, const json& body) { return post(cli, body.dump()); }

inline Reply get(httplib::Client& cli, const std::string& path) {
  Reply r;
  auto res = cli.Get(path.c_str());
  if (!res) return r;
  r.status = res->status;
  r.body = res->body;
  r.headers = res->headers;
  return r;
}

// The text of each choice: from message.content, or joined from a stream's deltas.
inline std::vector<std::string> choice_texts(const Reply& r) {
  std::vector<std::string> out;
  const auto put = [&](size_t i, const std::string& s) {
    if (out.size() <= i) out.resize(i + 1);
    out[i] += s;
  };
  if (!r.events.empty()) {
    for (const json& e : r.events)
      if (e.contains("choices"))
        for (const json& c : e["choices"])
          if (c["delta"].contains("content")) put(c["index"].get<size_t>(), c["delta"]["content"].get<std::string>());
    return out;
  }
  const json j = r.json_body();
  if (j.is_object() && j.contains("choices"))
    for (const json& c : j["choices"]) put(c["index"].get<size_t>(), c["message"]["content"].get<std::string>());
  return out;
}

}  // namespace blip2::testing
