// What a decoder-only language model (OPT, LLaMA) gives its decoder, and that decoder, written once: a
// prefill of each item's input into a key/value cache, then one token per row at a time; rows reorder
// (beams), leave and join (continuous batching) with their caches.
#pragma once
#include <memory>
#include <vector>

#include "generate/decoder.h"
#include "ops/ops.h"

namespace blip2 {

class CausalLM {
 public:
  // The key/value cache of a set of sequences: per sequence, per layer, keys and values [t, width], and
  // which of its t positions are tokens (not padding).
  struct Cache {
    struct Seq {
      std::vector<ops::RowCache> k, v;  // [layer] -> [t, key/value width]
      std::vector<uint8_t> mask;        // [t]
      int64_t tokens = 0;               // positions with mask 1: the next token's position
    };
    std::vector<Seq> seqs;
    // B empty sequences, each with `layers` key and value caches of rows `width` wide on `device`.
    void reset(int64_t B, size_t layers, int64_t width, Device device);
    // Appends rows seq_start[s] .. seq_start[s + 1] of mask to sequence s (counting its tokens) and returns
    // each sequence's whole mask on `device`, for its attention.
    std::vector<Buffer> append_mask(const std::vector<int64_t>& seq_start, const uint8_t* mask, Device device);
  };

  // Where each input row sits: its position, and where each sequence's rows start (seq_start[s] ..
  // seq_start[s + 1]).
  struct RowPositions {
    std::vector<int64_t> pos, seq_start;
  };
  // A prefill of B items of T rows (mask [B*T]): positions are the mask's cumsum − 1, as both OPT and
  // LLaMA compute them; padding rows get `pad_position` (their keys are masked, so any valid index does).
  static RowPositions prefill_positions(const std::vector<uint8_t>& mask, int64_t B, int64_t T, int64_t pad_position);
  // One new row per cache sequence, at its next position (the cumsum continues: every generated token counts).
  static RowPositions step_positions(const Cache& cache);

  virtual ~CausalLM() = default;
  virtual int64_t vocab_size() const = 0;
  // Width of the input embeddings (what embed writes per id, and inputs_embeds' last dimension).
  virtual int64_t embed_width() const = 0;
  virtual Device device() const = 0;
  // Embedding rows for ids; out is on the model's device.
  virtual void embed(const int32_t* ids, int64_t n, float* out) const = 0;
  // Every item's input x [B, T, embed_width] (mask [B*T]: 1 = token, 0 = left padding) through the stack
  // into a fresh cache (one sequence per item); returns the final hidden states [B*T, ...].
  virtual Tensor prefill(const Tensor& x, const std::vector<uint8_t>& mask, Cache& cache) const = 0;
  // One new token per cache sequence, embeddings e [S, embed_width], at each sequence's next position;
  // returns its final hidden states [S, ...].
  virtual Tensor extend(const Tensor& e, Cache& cache) const = 0;
  // lm_head: final hidden states -> logits.
  virtual Tensor head(const Tensor& h) const = 0;
  // Logits at every position of inputs_embeds x [B, T, embed_width] under mask [B*T] -> [B, T, vocab] on the
  // host, as the reference's forward pass returns them.
  Tensor logits(const Tensor& x, const std::vector<uint8_t>& mask) const;
};

// A decoder that continues each batch item's input x / mask on `expand` rows per item. `prefix[b]` are item
// b's ids the logits processors count as already there.
std::unique_ptr<Decoder> start_causal_decoder(const CausalLM& m, const Tensor& x, const std::vector<uint8_t>& mask,
                                              std::vector<std::vector<int32_t>> prefix, int expand);

}  // namespace blip2
