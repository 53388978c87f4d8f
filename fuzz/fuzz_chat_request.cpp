// POST /v1/chat/completions bodies: JSON nesting limit, every field's checks, the conversation prompt, and the
// image URL (data: URLs decoded; the default limits refuse file:// and http(s):// without touching the disk
// or the network).
#include <string>

#include "fuzz_util.h"
#include "server/chat_request.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace blip2::server;
  static const Limits limits = [] {
    Limits l;
    l.max_image_bytes = 1 << 16;  // the refusal path, and base64 at the limit, in inputs libFuzzer can reach
    return l;
  }();
  const std::string body(reinterpret_cast<const char*>(data), size);
  try {
    const ChatRequest r = parse_chat_request(body, blip2::GenerationOptions{}, limits);
    // A token count of one per 4 bytes stands in for a tokenizer (the tokenizers have targets of their own).
    const auto count = [](const std::string& p) { return static_cast<int64_t>(p.size() / 4); };
    const std::string prompt = conversation_prompt(r, 64, count);
    if (!r.history.empty() && count(prompt) > 64 && prompt.find(r.question) == std::string::npos) std::abort();
    (void)fetch_image(r.image_url, limits);
  } catch (const ApiError& e) {
    if (e.status < 400 || e.status > 499) std::abort();  // a request's fault is a 4xx, never a 5xx
  } catch (const blip2::Error&) {
  }
  return 0;
}
