#include "server/scheduler.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "ops/ops.h"
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

// A failure inside the engine: the request's own settings (an Error of kind Usage or Input: 400) when it is the
// only request the failed work was for (`own`), else a 500: a shared pass cannot blame one of its requests.
std::unique_ptr<ApiError> engine_error(const std::exception& e, bool own = true) {
  const auto* err = dynamic_cast<const Error*>(&e);
  if (own && err && (err->kind() == ErrorKind::Usage || err->kind() == ErrorKind::Input))
    return std::make_unique<ApiError>(400, e.what(), "", "invalid_value");
  return std::make_unique<ApiError>(500, std::string("generation failed: ") + e.what(), "", "internal_error",
                                    "server_error");
}

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

void Scheduler::check_room(bool counting_reserved) {
  if (draining_ || stopping_) {
    ++counters_.rejected;
    throw ApiError(503, "the server is shutting down", "", "shutting_down", "server_error");
  }
  const size_t waiting = queue_.size() + (counting_reserved ? static_cast<size_t>(reserved_) : 0);
  if (static_cast<int>(waiting) >= opt_.max_queue) {
    ++counters_.rejected;
    throw ApiError(503, "the server is busy: " + std::to_string(waiting) + " requests are waiting; retry later", "",
                   "queue_full", "server_error");
  }
}

Scheduler::Place Scheduler::reserve() {
  std::lock_guard<std::mutex> lock(mu_);
  check_room(true);
  ++reserved_;
  return Place(this);
}

Scheduler::Place::~Place() {
  if (!s_) return;
  std::lock_guard<std::mutex> lock(s_->mu_);
  --s_->reserved_;
}

void Scheduler::submit(const std::shared_ptr<Job>& job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    check_room(true);
    queue_.push_back(job);
  }
  cv_.notify_all();
}

void Scheduler::submit(const std::shared_ptr<Job>& job, Place place) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    --reserved_;
    place.s_ = nullptr;
    if (draining_ || stopping_) {
      ++counters_.rejected;
      throw ApiError(503, "the server is shutting down", "", "shutting_down", "server_error");
    }
    queue_.push_back(job);
  }
  cv_.notify_all();
}

void Scheduler::drain(Clock::time_point until) {
  std::unique_lock<std::mutex> lock(mu_);
  draining_ = true;
  const auto idle = [&] { return queue_.empty() && running_requests_ == 0; };
  if (until == Clock::time_point::max()) {
    idle_cv_.wait(lock, idle);
    return;
  }
  if (idle_cv_.wait_until(lock, until, idle)) return;
  cut_off_ = true;
  cv_.notify_all();
  idle_cv_.wait(lock, idle);
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
      if (job->cancelled || expired(*job)) {
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

// Fills job->image for every job: from the cache, else by one vision pass over the distinct new images
// (with options.vision_batch, queued jobs' images join that pass up to that many).
void Scheduler::encode_images(std::vector<std::shared_ptr<Job>> jobs) {
  const bool any_new = std::any_of(jobs.begin(), jobs.end(), [](const auto& j) { return !j->image; });
  if (any_new && opt_.vision_batch > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    int wanted = opt_.vision_batch - static_cast<int>(jobs.size());
    for (auto it = queue_.begin(); it != queue_.end() && wanted > 0; ++it)
      if (!(*it)->image && !(*it)->cancelled) {
        jobs.push_back(*it);  // the queued job's inputs are the scheduler's once submitted
        --wanted;
      }
  }
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
  const Tensor& state = model_.image_state(enc);  // [B, rows, width]: what no prompt changes
  const int64_t Q = state.dim(1), d = state.dim(2);
  for (int64_t b = 0; b < B; ++b) {
    auto t = std::make_shared<Tensor>(Shape{1, Q, d}, state.device);
    ops::copy_rows(state, b * Q, *t, 0, Q);
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
    if (job.on_end) job.on_end();
    return;
  }
  if (!job.error && cut_off_ && !job.cancelled)
    job.error = std::make_unique<ApiError>(503, "the server is shutting down (the request did not finish within "
                                                "the drain timeout)", "", "shutting_down", "server_error");
  if (!job.error)
    job.error = std::make_unique<ApiError>(
        job.cancelled ? 499 : 503, job.cancelled ? "the client went away" : "the request ran out of time", "",
        job.cancelled ? "cancelled" : "timeout", "server_error");
  job.push({Job::Event::Failed, 0, {}});
  if (job.on_end) job.on_end();
}

struct Scheduler::Running {
  std::shared_ptr<Job> job;
  std::vector<TextStream> streams;  // one per row (greedy and sampling stream as they go)
  std::unique_ptr<Generation> gen;
  bool failed = false;              // its Generation threw: job->error is set; it leaves at retire()
};

// Ends jobs that failed before joining the batch (their rows were counted by take_admissible).
void Scheduler::fail_admitted(const std::vector<std::shared_ptr<Job>>& jobs, const std::exception& e) {
  for (const auto& j : jobs) {
    j->error = engine_error(e, jobs.size() == 1);
    finish(*j, false);
  }
  std::lock_guard<std::mutex> lock(mu_);
  running_requests_ -= static_cast<int64_t>(jobs.size());
  for (const auto& j : jobs) running_rows_ -= rows_of(j->options);
}

// Starts the decoder rows of `jobs` (all taking `expand` rows) over their prompt stage `enc`, chooses their
// first tokens, and appends them to the running batch.
void Scheduler::admit() {
  int used = 0;
  for (const auto& r : running_) used += r->gen->rows();
  std::vector<std::shared_ptr<Job>> jobs = take_admissible(opt_.max_batch_rows - used);
  if (jobs.empty()) return;
  try {
    encode_images(jobs);
  } catch (const std::exception& e) {
    // One vision pass for all (the images were decoded and checked before queueing: nothing is expected to
    // fail here but the engine itself).
    fail_admitted(jobs, e);
    return;
  }
  // Jobs taking the same number of rows start together: one prompt-stage pass, one decoder start.
  std::stable_sort(jobs.begin(), jobs.end(),
                   [](const auto& a, const auto& b) { return rows_of(a->options) < rows_of(b->options); });
  const int64_t V = model_.config().lm_vocab_size();
  const bool t5 = model_.config().family == LanguageFamily::T5;
  const auto t0 = Clock::now();
  // T5: every new prompt through the encoder at once (right padding is masked: each answer is the same as
  // alone). OPT's prompt stage is only the embedding; its prompts run alone, since left padding would enter
  // what its logits processors see. If the shared pass fails, each prompt runs alone, so that only the one
  // at fault fails.
  Encoded all;
  bool together = false;
  if (t5 && jobs.size() > 1) {
    try {
      std::vector<std::string> prompts;
      Encoded img;
      const int64_t Q = jobs[0]->image->dim(1), d = jobs[0]->image->dim(2);
      Tensor& state = model_.image_state(img);
      state = Tensor({static_cast<int64_t>(jobs.size()), Q, d}, model_.device());
      for (size_t i = 0; i < jobs.size(); ++i) {
        ops::copy_rows(*jobs[i]->image, 0, state, static_cast<int64_t>(i) * Q, Q);
        prompts.push_back(jobs[i]->prompt);
      }
      all = model_.encode_prompts(img, model_.tokenize(prompts));
      together = true;
    } catch (const std::exception&) {
    }
  }
  for (size_t g0 = 0; g0 < jobs.size();) {
    size_t g1 = g0 + 1;
    const int E = rows_of(jobs[g0]->options);
    if (together)
      while (g1 < jobs.size() && rows_of(jobs[g1]->options) == E) ++g1;
    const std::vector<std::shared_ptr<Job>> members(jobs.begin() + static_cast<std::ptrdiff_t>(g0),
                                                    jobs.begin() + static_cast<std::ptrdiff_t>(g1));
    std::unique_ptr<Decoder> d;
    Tensor logits;
    try {
      Encoded enc;
      if (together) {
        enc = select_items(all, static_cast<int64_t>(g0), static_cast<int64_t>(g1));
      } else {
        Encoded img;
        model_.image_state(img) = *jobs[g0]->image;
        enc = model_.encode_prompts(img, model_.tokenize({jobs[g0]->prompt}));
      }
      d = model_.start_decoder(enc, E);
      logits = on_host(d->start());
    } catch (const std::exception& e) {
      fail_admitted(members, e);  // the group's one decoder pass: they fail together (alone unless T5 batched)
      g0 = g1;
      continue;
    }
    // Each request chooses its first tokens on its own: one that throws leaves, its rows dropped from `d`.
    std::vector<std::unique_ptr<Running>> group;
    std::vector<int> src;
    bool moved = false;
    for (size_t i = g0; i < g1; ++i) {
      try {
        auto r = std::make_unique<Running>();
        r->job = jobs[i];
        r->streams = std::vector<TextStream>(static_cast<size_t>(E), TextStream(model_.tokenizer()));
        const int base = static_cast<int>(i - g0) * E;
        std::vector<std::vector<int32_t>> prefixes;
        for (int e = 0; e < E; ++e) prefixes.push_back(d->prefix(base + e));
        TokenCallback cb;
        if (jobs[i]->options.num_beams == 1) {
          Running* p = r.get();
          cb = [p](int row, int32_t token) {
            const std::string piece = p->streams[row].put(token);
            if (!piece.empty()) p->job->push({Job::Event::Text, row, piece});
          };
        }
        r->gen = std::make_unique<Generation>(jobs[i]->options, special_, V, std::move(prefixes), nullptr, std::move(cb));
        r->gen->advance(logits.ptr() + static_cast<int64_t>(base) * V);
        moved = moved || r->gen->reordered();
        for (int e = 0; e < E; ++e) src.push_back(base + r->gen->parents()[e]);
        group.push_back(std::move(r));
      } catch (const std::exception& e) {
        fail_admitted({jobs[i]}, e);
        moved = true;  // its rows leave
      }
    }
    g0 = g1;
    if (group.empty()) continue;
    try {
      if (moved) d->reorder(src);
      if (dec_) dec_->append(std::move(*d));
      else dec_ = std::move(d);
    } catch (const std::exception& e) {
      std::vector<std::shared_ptr<Job>> left;
      for (const auto& r : group) left.push_back(r->job);
      fail_admitted(left, e);
      continue;
    }
    for (auto& r : group) running_.push_back(std::move(r));
  }
  std::lock_guard<std::mutex> lock(mu_);
  counters_.prompt_seconds += seconds_since(t0);
}

void Scheduler::step() {
  std::vector<int32_t> feed;
  for (const auto& r : running_) feed.insert(feed.end(), r->gen->feed().begin(), r->gen->feed().end());
  const auto t0 = Clock::now();
  try {
    const Tensor logits = on_host(dec_->step(feed));
    const int64_t V = logits.dim(1);
    int64_t offset = 0;
    for (const auto& r : running_) {
      // A request's own choice failing (e.g. beam sampling out of tokens) ends that request only.
      try {
        r->gen->advance(logits.ptr() + offset * V);
      } catch (const std::exception& e) {
        r->job->error = engine_error(e);
        r->failed = true;
      }
      offset += r->gen->rows();
    }
  } catch (const std::exception& e) {
    // The decoder step itself: its caches are shared by every row and may be half updated, so every running
    // request fails. What is known to fail here (OPT past its positions) is refused before queueing.
    fail_running(e);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    counters_.decode_seconds += seconds_since(t0);
    ++counters_.decoder_steps;
    add_to_hist(counters_.batch_rows_hist, static_cast<int64_t>(feed.size()));
    counters_.batch_rows_sum += static_cast<int64_t>(feed.size());
  }
  retire();
}

void Scheduler::retire() {
  std::vector<int> src;
  std::vector<std::unique_ptr<Running>> kept;
  bool changed = false;
  int offset = 0, left_rows = 0, gone = 0;
  for (auto& r : running_) {
    const int n = r->gen->rows();
    Job& job = *r->job;
    if (!r->failed && r->gen->done()) {
      complete(*r);
      changed = true;
      ++gone;
    } else if (r->failed || job.cancelled || expired(job)) {
      finish(job, false);
      changed = true;
      ++gone;
    } else {
      changed = changed || r->gen->reordered();
      for (int k = 0; k < n; ++k) src.push_back(offset + r->gen->parents()[k]);
      left_rows += n;
      kept.push_back(std::move(r));
    }
    offset += n;
  }
  running_ = std::move(kept);
  if (running_.empty()) {
    dec_.reset();
  } else if (changed) {
    dec_->reorder(src);
  }
  std::lock_guard<std::mutex> lock(mu_);
  running_requests_ -= gone;
  running_rows_ = left_rows;
}

void Scheduler::complete(Running& r) {
  Job& job = *r.job;
  const bool beam = job.options.num_beams > 1;
  const auto results = r.gen->results();
  int64_t tokens = 0;
  for (size_t i = 0; i < results.size(); ++i) {
    const GeneratedSequence& s = results[i];
    Job::Choice c;
    c.text = model_.tokenizer().decode(s.ids);
    c.tokens = static_cast<int64_t>(s.ids.size());
    c.ids = s.ids;
    c.score = s.score;
    c.finish_reason = !s.ids.empty() && s.ids.back() == special_.eos ? "stop" : "length";
    const std::string rest = beam ? c.text : r.streams[i].end(s.ids);
    if (!rest.empty()) job.push({Job::Event::Text, static_cast<int>(i), rest});
    tokens += c.tokens;
    job.choices.push_back(std::move(c));
  }
  count_tokens(tokens);
  finish(job, true);
}

void Scheduler::fail_running(const std::exception& e) {
  for (auto& r : running_) {
    r->job->error = engine_error(e, running_.size() == 1);
    finish(*r->job, false);
  }
  running_.clear();
  dec_.reset();
  std::lock_guard<std::mutex> lock(mu_);
  running_requests_ = 0;
  running_rows_ = 0;
}

void Scheduler::loop() {
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (running_.empty()) {
        if (queue_.empty()) idle_cv_.notify_all();
        cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (stopping_ && queue_.empty()) return;
      }
    }
    admit();
    if (!running_.empty()) step();
  }
}

}  // namespace blip2::server
