// The scheduler: one thread that owns the model and runs every request, with continuous batching. Requests
// wait in a bounded queue; at each step boundary the scheduler admits what fits in the decoder batch: it
// encodes their new images in one vision pass (through the image cache), runs their prompt stage together,
// starts their decoder rows and appends them to the running batch. Then one decoder step runs for every row
// of every running request, each request's Generation chooses its tokens, and finished, cancelled and
// expired requests leave the batch.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "generate/generate.h"
#include "model/blip2.h"
#include "server/api_error.h"
#include "server/image_cache.h"

namespace blip2::server {

struct SchedulerOptions {
  int max_queue = 64;               // requests waiting to start; a full queue answers 503
  int max_batch_rows = 32;          // decoder rows running together (a request takes n, or num_beams, rows)
  double request_timeout_s = 300;   // from arrival to the last token; then the request fails (503)
  size_t image_cache_bytes = 256u << 20;
  // Images per vision pass. 0: the images of the jobs admitted together. N > 0: when a job needs its image
  // encoded, queued jobs' images are encoded with it up to N in one pass, so that a batch whose rows free up
  // one at a time (continuous batching) still runs the vision encoder N images at a time (blip2 caption).
  int vision_batch = 0;
};

// One chat completion as the scheduler sees it. The HTTP layer fills the inputs, submits it, then reads
// events until Done or Failed; it sets `cancelled` when its client goes away.
struct Job {
  // ---- inputs
  std::string image_key;                    // sha256 of the image bytes
  std::shared_ptr<const Tensor> image;      // the cached image encoding (Blip2Model::image_state), or null: then `pixels`
  Tensor pixels;                            // [1, 3, S, S]
  std::string prompt;
  int64_t prompt_tokens = 0;
  GenerationOptions options;
  std::chrono::steady_clock::time_point deadline;
  std::atomic<bool> cancelled{false};

  // ---- outputs
  struct Event {
    enum Kind { Text, Done, Failed } kind = Text;
    int index = 0;     // Text: the choice
    std::string text;  // Text: what the choice's text gained
  };
  struct Choice {
    std::string text;
    std::string finish_reason;  // "stop" (end-of-sequence) or "length"
    int64_t tokens = 0;
    std::vector<int32_t> ids;  // generated ids, end-of-sequence included
    float score = 0;           // as GeneratedSequence::score
  };
  std::vector<Choice> choices;        // valid after Done
  bool cache_hit = false;             // the image encoding came from the cache
  std::unique_ptr<ApiError> error;    // set before Failed
  // Called (on the scheduler thread, after the Done or Failed event) when the job ends; for callers that
  // wait on many jobs at once. Must be quick and must not call the scheduler.
  std::function<void()> on_end;

  // Moves pending events into `out`, waiting up to `timeout` for one. Thread-safe.
  void wait(std::vector<Event>& out, std::chrono::milliseconds timeout);
  void push(Event e);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
};

struct SchedulerStats {
  int64_t queued = 0, running_requests = 0, running_rows = 0;
  int64_t admitted = 0, completed = 0, failed = 0, cancelled = 0, rejected = 0, timed_out = 0;
  int64_t generated_tokens = 0, decoder_steps = 0, vision_batches = 0, images_encoded = 0;
  double tokens_per_second = 0;         // generated tokens over the last 10 s of decoding
  std::vector<int64_t> batch_rows_hist; // decoder steps by rows, buckets kBatchBuckets (last: more)
  std::vector<int64_t> vision_batch_hist;
  int64_t batch_rows_sum = 0, vision_batch_sum = 0;
  double decode_seconds = 0, vision_seconds = 0, prompt_seconds = 0;
  ImageCache::Stats cache;
};
inline const std::vector<int> kBatchBuckets = {1, 2, 4, 8, 16, 32, 64};

class Scheduler {
 public:
  Scheduler(const Blip2Model& model, const SchedulerOptions& options);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // A place in the queue, held while a request's image is fetched and decoded so that the queue limit applies
  // before that memory is spent (8 concurrent near-limit images took 2.2 GB when they were decoded first).
  // Given back when dropped unless submit() took it.
  class Place {
   public:
    Place() = default;
    Place(Place&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
    Place& operator=(Place&&) = delete;
    ~Place();

   private:
    friend class Scheduler;
    explicit Place(Scheduler* s) : s_(s) {}
    Scheduler* s_ = nullptr;
  };
  // Throws ApiError(503) when the queue, places held included, is full or the server is draining.
  Place reserve();
  // Queues a job. Throws ApiError(503) when the queue is full or the server is draining.
  void submit(const std::shared_ptr<Job>& job);
  // Queues a job in a place reserved for it (never refused for a full queue).
  void submit(const std::shared_ptr<Job>& job, Place place);
  // Stops taking jobs (submit answers 503) and returns once every queued and running job has ended. Jobs
  // still queued or running at `until` end there, at the next decoder step, with a 503 (shutting_down).
  void drain(std::chrono::steady_clock::time_point until = std::chrono::steady_clock::time_point::max());
  ImageCache& cache() { return cache_; }
  SchedulerStats stats() const;
  const SchedulerOptions& options() const { return opt_; }

 private:
  struct Running;
  void loop();
  std::vector<std::shared_ptr<Job>> take_admissible(int free_rows);
  void encode_images(std::vector<std::shared_ptr<Job>> jobs);
  void admit();   // queued jobs that fit join the batch (their first token chosen)
  void step();    // one decoder step over the batch, then retire()
  void retire();  // finished, cancelled and expired requests leave; beams re-ranked
  void complete(Running& r);
  void finish(Job& job, bool ok);
  void fail_running(const std::exception& e);
  void fail_admitted(const std::vector<std::shared_ptr<Job>>& jobs, const std::exception& e);
  void count_tokens(int64_t n);

  const Blip2Model& model_;
  const SchedulerOptions opt_;
  ImageCache cache_;
  SpecialTokens special_;

  mutable std::mutex mu_;
  std::condition_variable cv_, idle_cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stopping_ = false, draining_ = false;
  int reserved_ = 0;  // places held by requests not yet submitted
  void check_room(bool counting_reserved);  // throws ApiError(503); called with mu_ held
  std::atomic<bool> cut_off_{false};  // the drain's deadline passed: every job ends now
  bool expired(const Job& job) const { return cut_off_ || std::chrono::steady_clock::now() > job.deadline; }
  int64_t running_requests_ = 0, running_rows_ = 0;
  SchedulerStats counters_;
  std::deque<std::pair<std::chrono::steady_clock::time_point, int64_t>> recent_tokens_;
  // The running batch, touched only by the scheduler thread: one decoder over every running request's rows,
  // in the order of `running_`.
  std::unique_ptr<Decoder> dec_;
  std::vector<std::unique_ptr<Running>> running_;
  std::thread thread_;
};

// Decoder rows a request takes: its beams, or its independent sequences.
inline int rows_of(const GenerationOptions& o) { return rows_per_item(o); }

}  // namespace blip2::server
