#include "server/image_cache.h"

#include <openssl/evp.h>

#include "core/error.h"

namespace blip2::server {

std::string sha256_hex(std::string_view bytes) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(bytes.data(), bytes.size(), md, &len, EVP_sha256(), nullptr) != 1)
    fail(ErrorKind::Internal, "SHA-256 failed");
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out.push_back(kHex[md[i] >> 4]);
    out.push_back(kHex[md[i] & 15]);
  }
  return out;
}

std::shared_ptr<const Tensor> ImageCache::get(const std::string& key, bool count) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto it = index_.find(key);
  if (it == index_.end()) {
    misses_ += count;
    return nullptr;
  }
  hits_ += count;
  lru_.splice(lru_.begin(), lru_, it->second);
  return it->second->value;
}

void ImageCache::put(const std::string& key, std::shared_ptr<const Tensor> value) {
  const size_t bytes = static_cast<size_t>(value->size()) * sizeof(float) + key.size();
  std::lock_guard<std::mutex> lock(mu_);
  if (const auto it = index_.find(key); it != index_.end()) {
    bytes_ -= it->second->bytes;
    lru_.erase(it->second);
    index_.erase(it);
  }
  if (bytes > max_bytes_) return;
  lru_.push_front({key, std::move(value), bytes});
  index_[key] = lru_.begin();
  bytes_ += bytes;
  while (bytes_ > max_bytes_) {
    const Entry& last = lru_.back();
    bytes_ -= last.bytes;
    index_.erase(last.key);
    lru_.pop_back();
    ++evictions_;
  }
}

ImageCache::Stats ImageCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {hits_, misses_, evictions_, lru_.size(), bytes_, max_bytes_};
}

}  // namespace blip2::server
