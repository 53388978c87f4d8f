// Batch invariance of the path `blip2 caption` takes (the server's Scheduler with vision passes of --batch
// images, T5 prompts encoded together, decoder rows joining and leaving): for T5 and OPT, every image's
// sequences in a batch of 1 to 8, with prompts of different lengths, equal token for token what generate()
// gives for that image and prompt alone, with greedy decoding and with beam search.
#include <gtest/gtest.h>

#include <chrono>
#include <memory>

#include "generate/generate.h"
#include "image/image.h"
#include "model/blip2.h"
#include "server/scheduler.h"

using namespace blip2;
using namespace blip2::server;

namespace {

const std::string kImages = std::string(BLIP2_FIXTURES_DIR) + "/images/";

struct Item {
  std::string image, prompt;
};
const std::vector<Item> kItems = {
    {"chelsea.png", ""},
    {"rocket.jpg", "a photo of"},
    {"coffee.png", "Question: what is in the cup, and who made it, and when? Answer:"},
    {"astronaut.png", "a"},
    {"camera.png", "Question: what is this? Answer:"},
    {"logo.png", ""},
    {"motorcycle_left.png", "an old picture of a"},
    {"hubble_deep_field.jpg", "Question: how many galaxies are there in this picture of the sky? Answer:"},
};

Tensor pixels_of(const Blip2Model& m, const std::string& image) {
  return preprocess_images({load_image(kImages + image)}, m.config().vision.image_size);
}

std::vector<std::vector<int32_t>> alone(const Blip2Model& m, const Item& it, const GenerationOptions& o) {
  const Encoded e = m.encode(pixels_of(m, it.image), m.tokenize({it.prompt}));
  std::vector<std::vector<int32_t>> ids;
  const auto results = generate([&](int expand) { return m.start_decoder(e, expand); }, 1, o, m.special_tokens());
  for (const auto& s : results[0]) ids.push_back(s.ids);
  return ids;
}

void check(const std::string& model_dir) {
  const Blip2Model m(model_dir);
  GenerationOptions greedy;
  greedy.max_new_tokens = 10;
  GenerationOptions beam = greedy;
  beam.num_beams = 3;
  beam.num_return_sequences = 2;
  for (const GenerationOptions& o : {greedy, beam}) {
    std::vector<Tensor> pixels;  // ready before the first job is submitted, so that they queue together
    for (const auto& it : kItems) pixels.push_back(pixels_of(m, it.image));
    std::vector<std::vector<std::vector<int32_t>>> want;
    for (const auto& it : kItems) want.push_back(alone(m, it, o));
    for (int batch = 1; batch <= 8; ++batch) {
      SCOPED_TRACE("batch " + std::to_string(batch) + (o.num_beams > 1 ? ", beam search" : ", greedy"));
      SchedulerOptions so;
      so.vision_batch = batch;
      so.max_batch_rows = batch * rows_per_item(o);
      so.image_cache_bytes = 0;
      Scheduler sched(m, so);
      std::vector<std::shared_ptr<Job>> jobs;
      for (size_t i = 0; i < kItems.size(); ++i) {
        auto j = std::make_shared<Job>();
        j->image_key = std::to_string(i);
        j->pixels = pixels[i];
        j->prompt = kItems[i].prompt;
        j->options = o;
        j->deadline = std::chrono::steady_clock::time_point::max();
        sched.submit(j);
        jobs.push_back(j);
      }
      sched.drain();
      const SchedulerStats st = sched.stats();
      EXPECT_EQ(st.completed, static_cast<int64_t>(kItems.size()));
      EXPECT_LE(st.vision_batch_sum, static_cast<int64_t>(kItems.size()));
      if (batch > 1) {
        EXPECT_LT(st.vision_batches, static_cast<int64_t>(kItems.size())) << "images were encoded together";
      }
      for (size_t i = 0; i < kItems.size(); ++i) {
        ASSERT_FALSE(jobs[i]->error) << jobs[i]->error->what();
        ASSERT_EQ(jobs[i]->choices.size(), want[i].size()) << kItems[i].image;
        for (size_t k = 0; k < want[i].size(); ++k) EXPECT_EQ(jobs[i]->choices[k].ids, want[i][k]) << kItems[i].image;
      }
    }
  }
}

}  // namespace

TEST(CaptionBatchInvariance, T5) { check(BLIP2_TINY_T5_DIR); }
TEST(CaptionBatchInvariance, Opt) { check(BLIP2_BUNDLED_OPT_DIR); }
