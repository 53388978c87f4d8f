// Image encodings (the language projection of the Q-Former's output, [1, Q, d]) kept by a hash of the image's
// bytes, so that follow-up questions about the same picture skip the vision encoder and the Q-Former.
// Least recently used entries leave first when the total size would exceed the budget. Thread-safe.
#pragma once
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include "core/tensor.h"

namespace blip2::server {

// SHA-256 of `bytes`, as 64 hex digits: the cache key of an image.
std::string sha256_hex(std::string_view bytes);

class ImageCache {
 public:
  explicit ImageCache(size_t max_bytes) : max_bytes_(max_bytes) {}

  // The entry for `key` (now the most recent), or null. Counts a hit or a miss unless `count` is false.
  std::shared_ptr<const Tensor> get(const std::string& key, bool count = true);
  // Stores (or refreshes) an entry, then evicts the least recent ones beyond the budget. An entry larger
  // than the whole budget is not kept.
  void put(const std::string& key, std::shared_ptr<const Tensor> value);

  struct Stats {
    int64_t hits = 0, misses = 0, evictions = 0;
    size_t entries = 0, bytes = 0, max_bytes = 0;
  };
  Stats stats() const;

 private:
  struct Entry {
    std::string key;
    std::shared_ptr<const Tensor> value;
    size_t bytes;
  };
  mutable std::mutex mu_;
  size_t max_bytes_, bytes_ = 0;
  std::list<Entry> lru_;  // most recent first
  std::unordered_map<std::string, std::list<Entry>::iterator> index_;
  int64_t hits_ = 0, misses_ = 0, evictions_ = 0;
};

}  // namespace blip2::server
