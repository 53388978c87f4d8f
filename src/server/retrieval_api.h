// The retrieval endpoints of `blip2 serve` with a Blip2ForImageTextRetrieval checkpoint (docs/SERVER.md,
// docs/RETRIEVAL.md):
//   POST /v1/embeddings  OpenAI's shape: {"model", "input": "text" | ["text", ...] | [{"type": "text", "text"} |
//                        {"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}, ...],
//                        "encoding_format": "float"} -> {"object": "list", "data": [{"object": "embedding",
//                        "index", "embedding"}], "model", "usage"}. A text's embedding is one unit vector [E]; an
//                        image's is num_query_tokens unit vectors [Q][E] (similarity: the largest row · text).
//   POST /v1/match       {"model", "image_url": "data:..." | {"url"}, "texts": ["..."]} -> {"object": "list",
//                        "data": [{"object": "match", "index", "text", "itm_probability", "itm_logits",
//                        "itc_similarity"}], "model", "usage"}.
// Images go through the same fetch_image policy and limits as chat, and their ViT output is kept in the image
// cache (by the SHA-256 of the bytes), which both endpoints read. Everything wrong is an ApiError.
#pragma once
#include <memory>
#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

#include "model/retrieval.h"
#include "server/chat_request.h"
#include "server/image_cache.h"

namespace blip2::server {

class RetrievalApi {
 public:
  RetrievalApi(const RetrievalModel& model, const Limits& limits, size_t image_cache_bytes, std::string model_id);
  nlohmann::json embeddings(const std::string& body);
  nlohmann::json match(const std::string& body);
  ImageCache& cache() { return cache_; }

 private:
  // vision_last_hidden_state [1, T, Dv] of the image a URL names, from the cache or computed (and kept).
  std::shared_ptr<const Tensor> vision_of(const std::string& url, const std::string& param);
  TokenBatch tokenize(const std::vector<std::string>& texts, const std::string& param) const;

  const RetrievalModel& model_;
  Limits limits_;
  std::string model_id_;
  ImageCache cache_;
  std::mutex run_;  // one forward pass at a time: the kernels share one thread pool
};

}  // namespace blip2::server
