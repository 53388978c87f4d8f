#include "server/retrieval_api.h"

#include "core/error.h"
#include "image/image.h"
#include "ops/ops.h"

namespace blip2::server {

using nlohmann::json;

namespace {

json vector_json(const float* x, int64_t n) { return json(std::vector<float>(x, x + n)); }

// The URL of an image part: "data:..." or {"url": "data:..."}.
std::string image_url_of(const json& v, const std::string& param) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("url") && v["url"].is_string()) return v["url"].get<std::string>();
  bad_field(param, "'" + param + "' must be an image URL or an object {\"url\": ...}");
}

}  // namespace

RetrievalApi::RetrievalApi(const RetrievalModel& model, const Limits& limits, size_t image_cache_bytes,
                           std::string model_id)
    : model_(model), limits_(limits), model_id_(std::move(model_id)), cache_(image_cache_bytes) {}

TokenBatch RetrievalApi::tokenize(const std::vector<std::string>& texts, const std::string& param) const {
  try {
    return model_.tokenize(texts);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::Input) throw;
    throw ApiError(400, e.what(), param, "context_length_exceeded");
  }
}

std::shared_ptr<const Tensor> RetrievalApi::vision_of(const std::string& url, const std::string& param) {
  const std::string bytes = fetch_image(url, limits_);
  const std::string key = sha256_hex(bytes);
  if (auto hit = cache_.get(key)) return hit;
  Tensor pixels;
  try {
    const RgbImage img = decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "image",
                                      limits_.max_image_pixels);
    pixels = preprocess_images({img}, model_.config().vision.image_size);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::Input) throw;
    throw ApiError(400, e.what(), param, "invalid_image");
  }
  std::shared_ptr<const Tensor> v;
  {
    std::lock_guard<std::mutex> lock(run_);
    v = std::make_shared<const Tensor>(model_.encode_vision(pixels));
  }
  cache_.put(key, v);
  return v;
}

json RetrievalApi::embeddings(const std::string& body) {
  const json j = parse_json_body(body, limits_.max_json_depth);
  if (!j.is_object()) throw ApiError(400, "the request body must be a JSON object", "", "invalid_body");
  if (!j.contains("input")) bad_field("input", "'input' is required", "missing_field");
  if (j.contains("encoding_format") && j["encoding_format"] != "float")
    bad_field("encoding_format", "only \"float\" embeddings are served");
  // Each input: a text, or (is_image) an image URL.
  std::vector<std::pair<bool, std::string>> inputs;
  const json& in = j["input"];
  if (in.is_string()) {
    inputs.emplace_back(false, in.get<std::string>());
  } else if (in.is_array() && !in.empty()) {
    for (size_t i = 0; i < in.size(); ++i) {
      const json& v = in[i];
      const std::string p = "input[" + std::to_string(i) + "]";
      const std::string type =
          v.is_object() && v.contains("type") && v["type"].is_string() ? v["type"].get<std::string>() : "";
      if (v.is_string()) {
        inputs.emplace_back(false, v.get<std::string>());
      } else if (type == "text" && v.contains("text") && v["text"].is_string()) {
        inputs.emplace_back(false, v["text"].get<std::string>());
      } else if (type == "image_url" && v.contains("image_url")) {
        inputs.emplace_back(true, image_url_of(v["image_url"], p + ".image_url"));
      } else {
        bad_field(p, "'" + p + "' must be a string, {\"type\": \"text\", \"text\"} or {\"type\": \"image_url\", "
                     "\"image_url\": {\"url\"}} (token id arrays are not accepted)");
      }
    }
  } else {
    bad_field("input", "'input' must be a string or a non-empty array");
  }
  if (static_cast<int>(inputs.size()) > limits_.max_inputs)
    bad_field("input", "at most " + std::to_string(limits_.max_inputs) + " inputs per request", "too_many_inputs");

  std::vector<std::string> texts;
  std::vector<std::shared_ptr<const Tensor>> images;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].first) images.push_back(vision_of(inputs[i].second, "input[" + std::to_string(i) + "]"));
    else texts.push_back(inputs[i].second);
  }
  Tensor text_embeds, image_embeds;
  int64_t tokens = 0;
  if (!texts.empty()) {
    const TokenBatch b = tokenize(texts, "input");
    for (uint8_t m : b.mask) tokens += m;
    std::lock_guard<std::mutex> lock(run_);
    text_embeds = model_.text_embeds(b).text_embeds;
  }
  if (!images.empty()) {
    const Tensor& first = *images[0];
    const int64_t T = first.dim(1);
    Tensor vision({static_cast<int64_t>(images.size()), T, first.dim(2)}, first.device);
    for (size_t i = 0; i < images.size(); ++i) ops::copy_rows(*images[i], 0, vision, static_cast<int64_t>(i) * T, T);
    std::lock_guard<std::mutex> lock(run_);
    image_embeds = model_.image_embeds(vision);
  }
  json data = json::array();
  int64_t t = 0, im = 0;
  const int64_t E = model_.embedding_size(), Q = model_.config().num_query_tokens;
  for (size_t i = 0; i < inputs.size(); ++i) {
    json e;
    if (inputs[i].first) {
      e = json::array();
      for (int64_t q = 0; q < Q; ++q) e.push_back(vector_json(image_embeds.ptr() + (im * Q + q) * E, E));
      ++im;
    } else {
      e = vector_json(text_embeds.ptr() + t * E, E);
      ++t;
    }
    data.push_back({{"object", "embedding"}, {"index", i}, {"embedding", std::move(e)}});
  }
  return {{"object", "list"}, {"data", std::move(data)}, {"model", model_id_},
          {"usage", {{"prompt_tokens", tokens}, {"total_tokens", tokens}}}};
}

json RetrievalApi::match(const std::string& body) {
  const json j = parse_json_body(body, limits_.max_json_depth);
  if (!j.is_object()) throw ApiError(400, "the request body must be a JSON object", "", "invalid_body");
  if (!j.contains("image_url")) bad_field("image_url", "'image_url' is required", "missing_field");
  const std::string url = image_url_of(j["image_url"], "image_url");
  if (!j.contains("texts") || !j["texts"].is_array() || j["texts"].empty())
    bad_field("texts", "'texts' must be a non-empty array of strings");
  std::vector<std::string> texts;
  for (const json& v : j["texts"]) {
    if (!v.is_string()) bad_field("texts", "'texts' must be a non-empty array of strings");
    texts.push_back(v.get<std::string>());
  }
  if (static_cast<int>(texts.size()) > limits_.max_inputs)
    bad_field("texts", "at most " + std::to_string(limits_.max_inputs) + " texts per request", "too_many_inputs");
  const TokenBatch b = tokenize(texts, "texts");
  const std::shared_ptr<const Tensor> vision = vision_of(url, "image_url");
  MatchScores itm;
  Tensor itc;
  {
    std::lock_guard<std::mutex> lock(run_);
    itm = model_.match(gather_items(*vision, std::vector<int64_t>(texts.size(), 0)), b);
    itc = RetrievalModel::similarity(model_.image_embeds(*vision), model_.text_embeds(b).text_embeds);
  }
  int64_t tokens = 0;
  for (uint8_t m : b.mask) tokens += m;
  json data = json::array();
  for (size_t i = 0; i < texts.size(); ++i)
    data.push_back({{"object", "match"},
                    {"index", i},
                    {"text", texts[i]},
                    {"itm_probability", itm.itm_probability[i]},
                    {"itm_logits", vector_json(itm.itm_logits.ptr() + i * 2, 2)},
                    {"itc_similarity", itc.ptr()[i]}});
  return {{"object", "list"}, {"data", std::move(data)}, {"model", model_id_},
          {"usage", {{"prompt_tokens", tokens}, {"total_tokens", tokens}}}};
}

}  // namespace blip2::server
