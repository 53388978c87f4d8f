// Texts of a batch as ids: padded to the longest with the pad id, and a mask marking the real tokens.
#pragma once
#include <cstdint>
#include <vector>

namespace blip2 {

struct TokenBatch {
  int64_t batch = 0, length = 0;
  std::vector<int32_t> ids;   // [batch, length]
  std::vector<uint8_t> mask;  // [batch, length], 1 = token
};

}  // namespace blip2
