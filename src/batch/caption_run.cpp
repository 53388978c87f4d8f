#include "batch/caption_run.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "image/image.h"
#include "model/blip2.h"
#include "server/scheduler.h"

namespace blip2::batch {

using Clock = std::chrono::steady_clock;
using server::Job;
using server::Scheduler;

uint64_t image_seed(uint64_t base, const std::string& key) { return mix64(base ^ stable_hash(key)); }

std::string read_item(const InputItem& item) {
  std::ifstream in(item.path, std::ios::binary);
  if (!in) fail(ErrorKind::Input, "cannot open " + item.path);
  if (item.tar.empty()) {
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) fail(ErrorKind::Input, "error reading " + item.path);
    return bytes;
  }
  std::string bytes(item.size, '\0');
  in.seekg(static_cast<std::streamoff>(item.offset));
  in.read(bytes.data(), static_cast<std::streamsize>(item.size));
  if (static_cast<uint64_t>(in.gcount()) != item.size)
    fail(ErrorKind::Input, item.path + ": member " + item.member + " is cut short (truncated tar)");
  return bytes;
}

namespace {

// What the reader hands over: a job submitted to the scheduler, or the reason the image failed before.
struct Finished {
  size_t index;
  std::string error;  // empty: jobs[index] ended (Done or Failed)
};

}  // namespace

Summary caption_images(const Blip2Model& model, const std::vector<InputItem>& items, const RunOptions& ro,
                       const WriteRecord& write, const std::function<void(const Progress&)>& on_progress) {
  const GenerationOptions& g = ro.generation;
  const int batch = std::max(1, ro.batch);
  server::SchedulerOptions so;
  so.max_batch_rows = batch * rows_per_item(g);
  so.vision_batch = batch;
  so.image_cache_bytes = 0;  // every key (path) comes once
  // Images read ahead: enough to refill the decoder batch and fill the next vision pass while one runs.
  const size_t ahead = static_cast<size_t>(3 * batch + 2);
  so.max_queue = static_cast<int>(ahead) + 1;

  // Declared before the scheduler: its destructor may still end cancelled jobs, whose on_end uses them.
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Finished> finished;
  std::vector<std::shared_ptr<Job>> jobs(items.size());
  size_t in_flight = 0;
  bool stop = false;
  double read_seconds = 0;
  const auto t0 = Clock::now();
  const int size = model.config().vision.image_size;

  const auto hand_over = [&](Finished f) {
    {
      std::lock_guard<std::mutex> lock(mu);
      finished.push_back(std::move(f));
    }
    cv.notify_all();
  };
  Scheduler scheduler(model, so);
  std::thread reader([&] {
    for (size_t i = 0; i < items.size(); ++i) {
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stop || in_flight < ahead; });
        if (stop) return;
        ++in_flight;
      }
      const auto r0 = Clock::now();
      try {
        const std::string bytes = read_item(items[i]);
        const RgbImage img = decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), items[i].name());
        auto job = std::make_shared<Job>();
        job->image_key = items[i].name();
        job->pixels = preprocess_images({img}, size);
        job->prompt = ro.prompt;
        job->options = g;
        if (g.do_sample) job->options.seed = image_seed(g.seed.value_or(0), items[i].key);
        job->deadline = Clock::time_point::max();
        job->on_end = [&hand_over, i] { hand_over({i, {}}); };
        {
          std::lock_guard<std::mutex> lock(mu);
          jobs[i] = job;
          read_seconds += std::chrono::duration<double>(Clock::now() - r0).count();
        }
        scheduler.submit(job);
      } catch (const std::exception& e) {  // this image's fault (or the scheduler refusing it): recorded
        const std::string why = e.what();
        hand_over({i, why.empty() ? "unknown error" : why});
      }
    }
  });
  // On every way out: no new reads, jobs in flight cancelled, so the scheduler's destructor returns soon.
  struct Stop {
    std::mutex& mu;
    std::condition_variable& cv;
    bool& stop;
    std::thread& reader;
    std::vector<std::shared_ptr<Job>>& jobs;
    ~Stop() {
      {
        std::lock_guard<std::mutex> lock(mu);
        stop = true;
        for (auto& j : jobs)
          if (j) j->cancelled = true;
      }
      cv.notify_all();
      reader.join();
    }
  } stopper{mu, cv, stop, reader, jobs};

  Summary s;
  Progress& p = s.progress;
  p.total = items.size();
  while (p.done < items.size()) {
    Finished f;
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return !finished.empty(); });
      f = std::move(finished.front());
      finished.pop_front();
      if (f.error.empty()) job = std::move(jobs[f.index]);
    }
    Record r;
    r.key = items[f.index].key;
    if (!f.error.empty()) {
      r.error = f.error;
    } else if (job->error) {
      r.error = job->error->what();
    } else {
      for (const auto& c : job->choices) r.captions.push_back({c.text, c.score});
      if (g.do_sample) r.seed = job->options.seed;
    }
    write(items[f.index], r);
    ++p.done;
    if (r.failed()) {
      ++p.failed;
      s.failures.emplace_back(r.key, r.error);
    }
    p.captions += static_cast<int64_t>(r.captions.size());
    p.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    {
      std::lock_guard<std::mutex> lock(mu);
      --in_flight;
    }
    cv.notify_all();
    if (on_progress) on_progress(p);
  }
  const server::SchedulerStats st = scheduler.stats();
  {
    std::lock_guard<std::mutex> lock(mu);
    s.read_seconds = read_seconds;
  }
  s.vision_seconds = st.vision_seconds;
  s.prompt_seconds = st.prompt_seconds;
  s.decode_seconds = st.decode_seconds;
  s.vision_passes = st.vision_batches;
  s.images_encoded = st.images_encoded;
  s.decoder_steps = st.decoder_steps;
  s.generated_tokens = st.generated_tokens;
  return s;
}

}  // namespace blip2::batch
