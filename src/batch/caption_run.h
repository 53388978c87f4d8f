// Captioning a list of images with one loaded model: a reader thread decodes and preprocesses images while
// the server's Scheduler (src/server/scheduler.h, the same continuous batching as `blip2 serve`) runs the
// vision encoder over --batch images at a time and keeps its decoder batch full, an image whose caption
// ends early being replaced at the next step. Records are written as images finish, in that order.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "batch/inputs.h"
#include "batch/outputs.h"
#include "generate/generate.h"

namespace blip2 {
class Blip2Model;
}

namespace blip2::batch {

struct RunOptions {
  int batch = 8;  // images per vision pass; the decoder runs up to batch × rows_per_item(generation) rows
  std::string prompt;
  GenerationOptions generation;  // resolved and validated; with do_sample, seed is the base of every image's
};

struct Progress {
  size_t done = 0, failed = 0, total = 0;  // images recorded (failed included), of them failed, to do
  int64_t captions = 0;                    // captions written
  double seconds = 0;                      // since the first image was read
};

struct Summary {
  Progress progress;
  std::vector<std::pair<std::string, std::string>> failures;  // key, reason
  // Where the time went: reading + decoding + resizing (reader thread, overlapping the rest), vision encoder
  // + Q-Former, prompt stage, decoder steps (the scheduler's own counters).
  double read_seconds = 0, vision_seconds = 0, prompt_seconds = 0, decode_seconds = 0;
  int64_t vision_passes = 0, images_encoded = 0, decoder_steps = 0, generated_tokens = 0;
};

// The seed an image is sampled with: derived from the base seed and the image's key, so that it does not
// depend on the order, the shard or what a resumed run skipped. `blip2 caption IMAGE --do-sample --seed S`
// with this S gives the same captions (the jsonl output records it).
uint64_t image_seed(uint64_t base, const std::string& key);

// An item's bytes: the file, or the member of its tar.
std::string read_item(const InputItem& item);

// Captions `items` and hands each record to `write` (on the calling thread) as it is ready; `on_progress`
// is called after each. Unreadable and undecodable images are recorded as failed and the run goes on.
// Throws what `write` throws (after stopping the work in flight).
using WriteRecord = std::function<void(const InputItem&, const Record&)>;
Summary caption_images(const Blip2Model& model, const std::vector<InputItem>& items, const RunOptions& options,
                       const WriteRecord& write, const std::function<void(const Progress&)>& on_progress);

}  // namespace blip2::batch
