// What every decoding strategy needs from a language model: one step of next-token logits over a cache
// the decoder owns, and a way to reorder that cache when beams are re-ranked.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace blip2 {

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual int rows() const = 0;          // sequences decoded side by side (batch × beams)
  virtual int64_t vocab_size() const = 0;
  // Feeds one token per row; returns next-token logits [rows, vocab].
  virtual Tensor step(const std::vector<int32_t>& tokens) = 0;
  // After this call, row r continues what row src[r] held (beam search). src[r] must stay within the
  // same batch item.
  virtual void reorder(const std::vector<int>& src) = 0;
};

}  // namespace blip2
