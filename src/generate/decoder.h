// What every decoding strategy needs from a language model: the logits after each row's prefix, then one
// step of next-token logits at a time over a cache the decoder owns, and a way to reorder that cache when
// beams are re-ranked (or rows leave), and another decoder's rows joining (continuous batching). Encoder-
// decoders (T5) and decoder-only models (OPT) differ only in what the prefix is.
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
  // The ids row r's sequence starts from, which the logits processors count as already there (T5: the
  // decoder start token; OPT: the prompt ids, padding included, as Hugging Face's input_ids).
  virtual std::vector<int32_t> prefix(int row) const = 0;
  // Next-token logits [rows, vocab] after the prefix (T5 feeds the start token; OPT runs the whole prompt).
  // Called once, before any step. Logits are on the model's device: on_host() brings them to the host, or
  // ops::greedy_pick() picks there.
  virtual Tensor start() = 0;
  // Feeds one token per row; returns next-token logits [rows, vocab] (on the model's device).
  virtual Tensor step(const std::vector<int32_t>& tokens) = 0;
  // After this call, row r continues what row src[r] held (its cache and position): beam search re-ranking,
  // and, with src shorter than rows(), dropping the rows no one takes (continuous batching).
  virtual void reorder(const std::vector<int>& src) = 0;
  // Continuous batching: takes over `other`'s rows, after this decoder's own, each at its own position
  // (`other` must be a started decoder of the same model; it is left with no rows).
  virtual void append(Decoder&& other) = 0;
};

}  // namespace blip2
