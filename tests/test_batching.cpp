// Continuous batching at the decoder level, for T5 and OPT: requests that join a running decoder batch
// between steps (Decoder::append) and leave it when done (Decoder::reorder with fewer rows) get exactly the
// tokens (and, to rounding, scores) they get alone from generate(), with greedy decoding, sampling and beam search mixed.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>

#include "generate/generate.h"
#include "image/image.h"
#include "model/blip2.h"

using namespace blip2;

namespace {

const std::string kImages = std::string(BLIP2_FIXTURES_DIR) + "/images/";

struct Request {
  std::string image, prompt;
  GenerationOptions options;
  int join_at;  // the batch step at which it arrives
};

Encoded encode(const Blip2Model& m, const Request& r) {
  return m.encode(preprocess_images({load_image(kImages + r.image)}, m.config().vision.image_size),
                  m.tokenize({r.prompt}));
}

std::vector<GeneratedSequence> alone(const Blip2Model& m, const Request& r) {
  const Encoded e = encode(m, r);
  return generate([&](int expand) { return m.start_decoder(e, expand); }, 1, r.options, m.special_tokens())[0];
}

// A small scheduler: joins each request at its step, steps every running row together, drops finished ones.
std::vector<std::vector<GeneratedSequence>> batched(const Blip2Model& m, const std::vector<Request>& reqs,
                                                    int* most_rows) {
  struct Running {
    size_t index;
    std::unique_ptr<Generation> gen;
  };
  std::vector<std::vector<GeneratedSequence>> out(reqs.size());
  std::unique_ptr<Decoder> dec;
  std::vector<Running> running;
  size_t joined = 0;
  *most_rows = 0;
  for (int t = 0; joined < reqs.size() || !running.empty(); ++t) {
    for (size_t i = 0; i < reqs.size(); ++i) {
      if (reqs[i].join_at != t) continue;
      const Encoded e = encode(m, reqs[i]);
      const int E = rows_per_item(reqs[i].options);
      auto d = m.start_decoder(e, E);
      std::vector<std::vector<int32_t>> prefixes;
      for (int r = 0; r < E; ++r) prefixes.push_back(d->prefix(r));
      auto gen = std::make_unique<Generation>(reqs[i].options, m.special_tokens(), d->vocab_size(), prefixes);
      gen->advance(d->start().ptr());
      if (gen->reordered()) d->reorder(gen->parents());
      if (dec) dec->append(std::move(*d));
      else dec = std::move(d);
      EXPECT_EQ(d ? d->rows() : 0, 0) << "append leaves the other decoder empty";
      running.push_back({i, std::move(gen)});
      ++joined;
    }
    if (running.empty()) continue;
    std::vector<int32_t> feed;
    for (const auto& r : running) feed.insert(feed.end(), r.gen->feed().begin(), r.gen->feed().end());
    EXPECT_EQ(static_cast<int>(feed.size()), dec->rows());
    *most_rows = std::max(*most_rows, dec->rows());
    const Tensor logits = dec->step(feed);
    std::vector<int> src;
    std::vector<Running> kept;
    int offset = 0;
    for (auto& r : running) {
      const int n = r.gen->rows();
      r.gen->advance(logits.ptr() + offset * logits.dim(1));
      if (r.gen->done()) {
        out[r.index] = r.gen->results();
      } else {
        for (int p : r.gen->parents()) src.push_back(offset + p);
        kept.push_back(std::move(r));
      }
      offset += n;
    }
    running = std::move(kept);
    if (running.empty()) dec.reset();
    else dec->reorder(src);
  }
  return out;
}

void check(const std::string& model_dir) {
  const Blip2Model m(model_dir);
  GenerationOptions greedy;
  greedy.max_new_tokens = 9;
  GenerationOptions sampled = greedy;
  sampled.do_sample = true;
  sampled.temperature = 0.8;
  sampled.top_k = 20;
  sampled.seed = 3;
  sampled.num_return_sequences = 2;
  sampled.max_new_tokens = 7;
  GenerationOptions beams = greedy;
  beams.num_beams = 3;
  beams.num_return_sequences = 2;
  beams.repetition_penalty = 1.2;
  beams.max_new_tokens = 6;
  GenerationOptions short_greedy = greedy;
  short_greedy.max_new_tokens = 2;
  short_greedy.no_repeat_ngram_size = 2;
  const std::vector<Request> reqs = {
      {"chelsea.png", "Question: what is this? Answer:", greedy, 0},
      {"rocket.jpg", "", beams, 0},
      {"coffee.png", "Question: what is in the cup, and who made it? Answer:", sampled, 2},
      {"chelsea.png", "a photo of", short_greedy, 3},
      {"astronaut.png", "Question: who? Answer:", beams, 6},  // (at most 8 rows at once: the matrix-vector kernels)
      {"camera.png", "", greedy, 12},  // after the batch has emptied
  };
  int most_rows = 0;
  const auto got = batched(m, reqs, &most_rows);
  EXPECT_GE(most_rows, 6) << "requests ran side by side";
  for (size_t i = 0; i < reqs.size(); ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    const auto want = alone(m, reqs[i]);
    ASSERT_EQ(got[i].size(), want.size());
    for (size_t k = 0; k < want.size(); ++k) {
      EXPECT_EQ(got[i][k].ids, want[k].ids);
      // The matrix-vector kernels take a different path for one row than for several, so a score may differ
      // in its last bits; the tokens may not.
      EXPECT_NEAR(got[i][k].score, want[k].score, 1e-5 * std::abs(want[k].score));
    }
  }
}

TEST(ContinuousBatching, T5RowsJoinAndLeaveWithTheirOwnAnswers) { check(BLIP2_TINY_T5_DIR); }
TEST(ContinuousBatching, OptRowsJoinAndLeaveWithTheirOwnAnswers) { check(BLIP2_BUNDLED_OPT_DIR); }

}  // namespace
