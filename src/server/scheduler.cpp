#include "server/scheduler.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "text/text_stream.h"

namespace blip2::server {

using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

void add_to_hist(std::vector<int64_t>& hist, int64_t v) {
  size_t i = 0;
  while (i < kBatchBuckets.size() && v > kBatchBuckets[i]) ++i;
  ++hist[i];
}

// Thrown from the token callback to abandon a request that was cancelled or ran out of time.
struct Abandon {};

}  // namespace

void Job::push(Event e) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(e));
  }
  cv_.notify_all();
}

void Job::wait(std::vector<Event>& out, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, timeout, [&] { return !events_.empty(); });
  while (!events_.empty()) {
    out.push_back(std::move(events_.front()));
    events_.pop_front();
  }
}

Scheduler::Scheduler(const Blip2Model& model, const SchedulerOptions& options)
    : model_(model), opt_(options), cache_(options.image_cache_bytes) {
  special_ = model.special_tokens();
  counters_.batch_rows_hist.assign(kBatchBuckets.size() + 1, 0);
  counters_.vision_batch_hist.assign(kBatchBuckets.size() + 1, 0);
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void Scheduler::submit(const std::shared_ptr<Job>& job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (draining_ || stopping_) {
      ++counters_.rejected;
      throw ApiError(503, "the server is shutting down", "", "shutting_down", "server_error");
    }
    if (static_cast<int>(queue_.size()) >= opt_.max_queue) {
      ++counters_.rejected;
      throw ApiError(503, "the server is busy: " + std::to_string(queue_.size()) +
                              " requests are waiting; retry later", "", "queue_full", "server_error");
    }
    queue_.push_back(job);
  }
  cv_.notify_all();
}

void Scheduler::drain() {
  std::unique_lock<std::mutex> lock(mu_);
  draining_ = true;
  idle_cv_.wait(lock, [&] { return queue_.empty() && running_requests_ == 0; });
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  SchedulerStats s = counters_;
  s.queued = static_cast<int64_t>(queue_.size());
  s.running_requests = running_requests_;
  s.running_rows = running_rows_;
  int64_t recent = 0;
  for (const auto& [t, n] : recent_tokens_)
    if (Clock::now() - t <= std::chrono::seconds(10)) recent += n;
  s.tokens_per_second = static_cast<double>(recent) / 10.0;
  s.cache = cache_.stats();
  return s;
}

void Scheduler::count_tokens(int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  counters_.generated_tokens += n;
  const auto now = Clock::now();
  recent_tokens_.emplace_back(now, n);
  while (!recent_tokens_.empty() && now - recent_tokens_.front().first > std::chrono::seconds(10))
    recent_tokens_.pop_front();
}

// Jobs from the front of the queue whose rows fit; cancelled and expired ones end here.
std::vector<std::shared_ptr<Job>> Scheduler::take_admissible(int free_rows) {
  std::vector<std::shared_ptr<Job>> out, dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    while (!queue_.empty()) {
      const auto& job = queue_.front();
      if (job->cancelled || Clock::now() > job->deadline) {
        dropped.push_back(job);
        queue_.pop_front();
        continue;
      }
      const int rows = rows_of(job->options);
      if (rows > free_rows && !(out.empty() && running_rows_ == 0)) break;  // a lone job always fits
      free_rows -= rows;
      running_rows_ += rows;
      ++running_requests_;
      ++counters_.admitted;
      out.push_back(job);
      queue_.pop_front();
    }
  }
  for (const auto& j : dropped) finish(*j, false);
  return out;
}

// Fills job->image for every job: from the cache, else by one vision pass over the distinct new images.
void Scheduler::encode_images(const std::vector<std::shared_ptr<Job>>& jobs) {
  std::vector<std::string> keys;
  std::vector<const Tensor*> pixels;
  for (const auto& j : jobs) {
    if (j->image) continue;
    if (auto hit = cache_.get(j->image_key, false)) {  // encoded since it was queued (counted as a miss)
      j->image = std::move(hit);
      j->cache_hit = true;
      continue;
    }
    if (std::find(keys.begin(), keys.end(), j->image_key) == keys.end()) {
      keys.push_back(j->image_key);
      pixels.push_back(&j->pixels);
    }
  }
  if (keys.empty()) return;
  const auto t0 = Clock::now();
  const int64_t B = static_cast<int64_t>(keys.size());
  const Shape one = pixels[0]->shape;
  Tensor batch({B, one[1], one[2], one[3]});
  const size_t per = static_cast<size_t>(pixels[0]->size());
  for (int64_t b = 0; b < B; ++b) std::memcpy(batch.ptr() + b * per, pixels[b]->ptr(), per * sizeof(float));
  const Encoded enc = model_.encode_image(batch);
  const Tensor& proj = enc.language_projection;  // [B, Q, d]
  const int64_t Q = proj.dim(1), d = proj.dim(2);
  for (int64_t b = 0; b < B; ++b) {
    auto t = std::make_shared<Tensor>(Shape{1, Q, d});
    std::memcpy(t->ptr(), proj.ptr() + b * Q * d, static_cast<size_t>(Q * d) * sizeof(float));
    cache_.put(keys[b], t);
    for (const auto& j : jobs)
      if (!j->image && j->image_key == keys[b]) {
        j->image = t;
        j->pixels = Tensor();
      }
  }
  std::lock_guard<std::mutex> lock(mu_);
  ++counters_.vision_batches;
  counters_.images_encoded += B;
  counters_.vision_seconds += seconds_since(t0);
  add_to_hist(counters_.vision_batch_hist, B);
  counters_.vision_batch_sum += B;
}

void Scheduler::finish(Job& job, bool ok) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (ok) {
      ++counters_.completed;
    } else if (job.cancelled) {
      ++counters_.cancelled;
    } else if (!job.error) {
      ++counters_.timed_out;
    } else {
      ++counters_.failed;
    }
  }
  if (ok) {
    job.push({Job::Event::Done, 0, {}});
    return;
  }
  if (!job.error)
    job.error = std::make_unique<ApiError>(
        job.cancelled ? 499 : 503, job.cancelled ? "the client went away" : "the request ran out of time", "",
        job.cancelled ? "cancelled" : "timeout", "server_error");
  job.push({Job::Event::Failed, 0, {}});
}

void Scheduler::run(const std::vector<std::shared_ptr<Job>>& jobs) {
  encode_images(jobs);
  // The prompt stage, one T5 encoder pass per job (the decoder runs one job at a time).
  for (const auto& job : jobs) {
    bool ok = false;
    try {
      const auto t0 = Clock::now();
      Encoded img;
      img.language_projection = *job->image;
      const Encoded enc = model_.encode_prompts(img, model_.tokenize({job->prompt}));
      {
        std::lock_guard<std::mutex> lock(mu_);
        counters_.prompt_seconds += seconds_since(t0);
      }
      const GenerationOptions& o = job->options;
      const bool beam = o.num_beams > 1;
      const int E = rows_of(o);
      std::vector<TextStream> streams(static_cast<size_t>(E), TextStream(model_.tokenizer()));
      const auto t1 = Clock::now();
      int64_t steps_tokens = 0;
      const auto results = generate(
          [&](int expand) { return model_.start_decoder(enc, expand); }, 1, o, special_,
          beam ? TokenCallback() : TokenCallback([&](int row, int32_t token) {
            if (job->cancelled || Clock::now() > job->deadline) throw Abandon{};
            ++steps_tokens;
            const std::string piece = streams[row].put(token);
            if (!piece.empty()) job->push({Job::Event::Text, row, piece});
          }));
      int64_t tokens = 0;
      for (int i = 0; i < static_cast<int>(results[0].size()); ++i) {
        const GeneratedSequence& s = results[0][i];
        Job::Choice c;
        c.text = model_.tokenizer().decode(s.ids);
        c.tokens = static_cast<int64_t>(s.ids.size());
        c.finish_reason = !s.ids.empty() && s.ids.back() == special_.eos ? "stop" : "length";
        const std::string rest = beam ? c.text : streams[i].end(s.ids);
        if (!rest.empty()) job->push({Job::Event::Text, i, rest});
        tokens += c.tokens;
        job->choices.push_back(std::move(c));
      }
      count_tokens(tokens);
      {
        std::lock_guard<std::mutex> lock(mu_);
        counters_.decode_seconds += seconds_since(t1);
        ++counters_.decoder_steps;
        add_to_hist(counters_.batch_rows_hist, E);
        counters_.batch_rows_sum += E;
      }
      ok = true;
    } catch (const Abandon&) {
    } catch (const std::exception& e) {
      job->error = std::make_unique<ApiError>(500, std::string("generation failed: ") + e.what(), "", "internal_error",
                                              "server_error");
    }
    finish(*job, ok);
    std::lock_guard<std::mutex> lock(mu_);
    --running_requests_;
    running_rows_ -= rows_of(job->options);
  }
}

void Scheduler::loop() {
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (queue_.empty() && running_requests_ == 0) idle_cv_.notify_all();
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_ && queue_.empty()) return;
    }
    auto jobs = take_admissible(opt_.max_batch_rows);
    if (jobs.empty()) continue;
    try {
      run(jobs);
    } catch (const std::exception& e) {  // the image stage failed: every job of the batch fails
      for (const auto& j : jobs) {
        if (!j->error)
          j->error = std::make_unique<ApiError>(500, std::string("image encoding failed: ") + e.what(), "",
                                                "internal_error", "server_error");
        finish(*j, false);
      }
      std::lock_guard<std::mutex> lock(mu_);
      running_requests_ = 0;
      running_rows_ = 0;
    }
  }
}

}  // namespace blip2::server
