// How far a model's outputs are from a reference's on the same inputs (issue 14's accuracy gate): typically
// one checkpoint loaded twice, as stored (float32 activations over the stored weights, the reference) and
// in a lossy format (int8, int4, bf16...). One routine for the tests (test_outliers) and `bench --accuracy`.
#pragma once
#include <string>
#include <vector>

#include "model/blip2.h"

namespace blip2 {

struct AccuracyReport {
  // ‖got − want‖ / ‖want‖ over the batch, per stage the model has: vision, qformer, projection, and T5's
  // encoder.
  std::vector<std::pair<std::string, double>> stage_rel;
  // The reference's greedy continuation (steps tokens after the first logits) fed to both models: the
  // logits' relative error over every position and row, and how many of those positions pick the same top-1.
  double logits_rel = 0.0;
  int top1_agree = 0, positions = 0;
};

// `pixels` [B, 3, S, S] and one prompt per image; `steps` forced decode steps after the first logits.
AccuracyReport compare_with_reference(const Blip2Model& reference, const Blip2Model& model, const Tensor& pixels,
                                      const std::vector<std::string>& prompts, int steps);

}  // namespace blip2
