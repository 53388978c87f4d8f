// blip2 bench: times every stage of a caption separately, reports memory, and measures in the same run the
// machine's ceilings (read bandwidth, sgemm rate) to print each stage's floor and the fraction of it reached.
#include <sys/resource.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>

#include "commands.h"
#include "core/error.h"
#include "cuda/cuda.h"
#include "image/image.h"
#include "model/accuracy.h"
#include "model/blip2.h"
#include "model/retrieval.h"
#include "ops/kernels.h"
#include "ops/machine.h"
#include "ops/ops.h"
#include "ops/parallel.h"

using namespace blip2;

namespace {

using clk = std::chrono::steady_clock;

struct BenchArgs {
  std::string model, image, prompt;
  int batch = 1, new_tokens = 20, repeat = 3, warmup = 1, bw_mib = 1024;
  bool json = false, quick = false, accuracy = false;
  std::vector<int> sweep;  // batch sizes for the throughput sweep, after the main runs
};

// Progress, on stderr.
void note(const std::string& s) { std::fprintf(stderr, "bench: %s\n", s.c_str()); }

double since(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }

// ---- memory ------------------------------------------------------------------------------------------------

// A field of /proc/self/status in bytes (VmRSS, VmHWM), or -1.
int64_t status_bytes(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string key = std::string(field) + ":";
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0) return std::stoll(line.substr(key.size())) * 1024;
  return -1;
}

int64_t peak_rss() {
  const int64_t hwm = status_bytes("VmHWM");
  if (hwm >= 0) return hwm;
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;
}

// Resets the peak (VmHWM) to the current RSS, so that the ceiling measurements' buffers do not count.
bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.flush();
  return static_cast<bool>(out);
}

double gib(int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0); }

// ---- statistics --------------------------------------------------------------------------------------------

struct Stats {
  double mean = 0, median = 0, min = 0, max = 0;
  size_t n = 0;
};

Stats stats(std::vector<double> v) {
  Stats s;
  s.n = v.size();
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  s.mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
  s.median = v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  s.min = v.front();
  s.max = v.back();
  return s;
}

// ---- what the floors count ---------------------------------------------------------------------------------

// Bytes every decode step reads, counted over the loaded weights in their loaded format (scales included):
// every tensor of the language model's decoder stack (T5: language_model.decoder.*, OPT:
// language_model.model.decoder.*, LLaMA: language_model.model.layers.* and .norm) except the embedding tables, of which a step reads one row, and T5's
// cross-attention keys and values (EncDecAttention.k / .v, applied once to the encoder output); plus the
// LM head: lm_head, or the embedding table it is tied to.
int64_t decode_step_bytes(const Checkpoint& ck) {
  int64_t bytes = 0, lm_head = -1, tied = 0;
  for (const auto& [name, n] : ck.taken_bytes()) {
    const bool decoder = name.rfind("language_model.decoder.", 0) == 0 || name.rfind("language_model.model.", 0) == 0;
    const bool table = name.find("embed_tokens") != std::string::npos || name.find("embed_positions") != std::string::npos;
    if (name == "language_model.lm_head.weight") lm_head = static_cast<int64_t>(n);
    if (table || name == "language_model.shared.weight") tied = std::max(tied, static_cast<int64_t>(n));
    if (!decoder || table) continue;
    if (name.ends_with("EncDecAttention.k.weight") || name.ends_with("EncDecAttention.v.weight")) continue;
    bytes += static_cast<int64_t>(n);
  }
  return bytes + (lm_head >= 0 ? lm_head : tied);
}

// ---- the run -----------------------------------------------------------------------------------------------

// Stage names in order, as the JSON keys and the table's rows.
const std::vector<std::pair<std::string, std::string>> kStages = {
    {"preprocess", "preprocess (decode + resize)"},
    {"vision", "vision encoder"},
    {"qformer", "Q-Former + projection"},
    {"prompt", "prompt stage (LM encoder)"},
    {"first_decode_step", "first decode step"},
    {"decode_per_token", "decode per token"},
    {"total_per_caption", "total per caption"},
};

// A stand-in image when none is given: a smooth 640×480 gradient, so that preprocessing still resizes.
RgbImage synthetic_image() {
  RgbImage img;
  img.width = 640;
  img.height = 480;
  img.pixels.resize(static_cast<size_t>(img.width) * img.height * 3);
  for (int y = 0; y < img.height; ++y)
    for (int x = 0; x < img.width; ++x) {
      uint8_t* p = img.pixels.data() + (static_cast<size_t>(y) * img.width + x) * 3;
      p[0] = static_cast<uint8_t>(x * 255 / img.width);
      p[1] = static_cast<uint8_t>(y * 255 / img.height);
      p[2] = static_cast<uint8_t>((x + y) & 255);
    }
  return img;
}

// One caption batch, every stage timed; `times` gains one sample per stage (decode_per_token: one per step
// after the first) and, per compute-bound stage, one of the time inside its products ("KEY.linear",
// "KEY.attention"); `ops` gets each compute-bound stage's product operations (ops::product_counters; the
// same on every run; for decode_per_token the last step's, whose attention reads the most keys).
// The batch run_once captions: --batch copies of the image.
Tensor bench_pixels(const BenchArgs& a, int image_size) {
  std::vector<RgbImage> imgs;
  for (int b = 0; b < a.batch; ++b) imgs.push_back(a.image.empty() ? synthetic_image() : load_image(a.image));
  return preprocess_images(imgs, image_size);
}

void run_once(const Blip2Model& model, const BenchArgs& a, std::map<std::string, std::vector<double>>& times,
              std::map<std::string, ops::ProductCounters>& ops) {
  const auto start = clk::now();
  auto t = clk::now();
  const Tensor pixels = bench_pixels(a, model.config().vision.image_size);
  times["preprocess"].push_back(since(t));

  // On a GPU the work is queued: each stage waits for its own end, so that its time is its own.
  const Device dev = model.device();
  ops::ProductCounters before = ops::product_counters();
  const auto stage_done = [&](const std::string& key) {
    times[key].push_back(since(t));
    const ops::ProductCounters now = ops::product_counters(), in_stage = now - before;
    times[key + ".linear"].push_back(in_stage.linear_seconds);
    times[key + ".attention"].push_back(in_stage.attention_seconds);
    ops[key] = in_stage;
    before = now;
  };
  t = clk::now();
  Encoded img;
  img.vision_last_hidden_state = model.vision_model().forward(pixels);
  synchronize(dev);
  stage_done("vision");

  if (!model.config().instruct) {  // InstructBLIP's Q-Former reads the prompt: it runs in the prompt stage
    t = clk::now();
    img.qformer_last_hidden_state = model.qformer_model().forward(img.vision_last_hidden_state);
    img.language_projection = ops::linear(img.qformer_last_hidden_state, model.projection_weight(), model.projection_bias());
    synchronize(dev);
    stage_done("qformer");
  }

  t = clk::now();
  const Encoded enc = model.encode_prompts(img, model.tokenize(std::vector<std::string>(a.batch, a.prompt)));
  synchronize(dev);
  stage_done("prompt");

  // A fixed number of steps, end-of-sequence ignored: each step feeds every row its most likely token.
  t = clk::now();
  // The greedy pick where the logits are, as generate() makes it (on a GPU only ids come back).
  auto dec = model.start_decoder(enc);
  const auto pick = [](const Tensor& logits) {
    std::vector<int32_t> ids;
    for (const ops::Pick& p : ops::greedy_pick(logits)) ids.push_back(p.id);
    return ids;
  };
  std::vector<int32_t> tokens = pick(dec->start());
  stage_done("first_decode_step");
  for (int s = 1; s < a.new_tokens; ++s) {
    t = clk::now();
    tokens = pick(dec->step(tokens));
    stage_done("decode_per_token");  // with several rows a step is bound by arithmetic too
  }
  times["total_per_caption"].push_back(since(start) / a.batch);
}

nlohmann::ordered_json stats_json(const Stats& s) {
  return {{"mean_s", s.mean}, {"median_s", s.median}, {"min_s", s.min}, {"max_s", s.max}, {"samples", s.n}};
}

// A retrieval checkpoint: image embeddings (ViT + Q-Former + projection) per image at batch 1, --batch and
// each --sweep size, the best rate; text embeddings (text-only Q-Former pass) per text at batch 1 and --batch.
void run_retrieval_bench(const BenchArgs& a, const LoadOptions& lo) {
  note("loading " + a.model + " (retrieval, weights " + std::string(weight_format_name(lo.weights)) + ", device " +
       device_name(lo.device) + ")");
  const auto t_load = clk::now();
  const RetrievalModel model(a.model, lo);
  const double load_s = since(t_load);
  std::vector<int> batches = {1, a.batch};
  batches.insert(batches.end(), a.sweep.begin(), a.sweep.end());
  std::sort(batches.begin(), batches.end());
  batches.erase(std::unique(batches.begin(), batches.end()), batches.end());
  // The median over --repeat runs (after --warmup) of one call, in seconds.
  const auto time = [&](const std::function<void()>& f) {
    for (int i = 0; i < a.warmup; ++i) f();
    std::vector<double> s;
    for (int i = 0; i < a.repeat; ++i) {
      const auto t = clk::now();
      f();
      s.push_back(since(t));
    }
    std::sort(s.begin(), s.end());
    return s[s.size() / 2];
  };
  const RgbImage img = a.image.empty() ? synthetic_image() : load_image(a.image);
  nlohmann::ordered_json j;
  j["model"] = a.model;
  j["task"] = "retrieval";
  j["weights"] = weight_format_name(lo.weights);
  j["threads"] = par::threads();
  j["load_seconds"] = load_s;
  j["image_embeddings"] = nlohmann::ordered_json::array();
  double best = 0;
  int best_batch = 1;
  for (int b : batches) {
    note("image embeddings, batch " + std::to_string(b));
    const Tensor pixels = preprocess_images(std::vector<RgbImage>(static_cast<size_t>(b), img), model.config().vision.image_size);
    const double s = time([&] { model.image_embeds(model.encode_vision(pixels)); });  // ends on the host
    const double rate = b / s;
    if (rate > best) best = rate, best_batch = b;
    j["image_embeddings"].push_back({{"batch", b}, {"seconds", s}, {"seconds_per_image", s / b}, {"images_per_second", rate}});
  }
  j["best_images_per_second"] = best;
  j["best_batch"] = best_batch;
  const std::string text = a.prompt.empty() ? "a photo of a cat sitting on a blanket" : a.prompt;
  j["text_embeddings"] = nlohmann::ordered_json::array();
  for (int b : std::vector<int>{1, a.batch}) {
    note("text embeddings, batch " + std::to_string(b));
    const TokenBatch tokens = model.tokenize(std::vector<std::string>(static_cast<size_t>(b), text));
    const double s = time([&] { model.text_embeds(tokens); });
    j["text_embeddings"].push_back({{"batch", b}, {"tokens", tokens.length}, {"seconds", s}, {"seconds_per_text", s / b},
                                    {"texts_per_second", b / s}});
    if (a.batch == 1) break;
  }
  if (a.json) {
    std::cout << j.dump() << "\n";
    return;
  }
  std::printf("retrieval bench: %s, weights %s, %d threads (load %.1f s)\n", a.model.c_str(),
              weight_format_name(lo.weights), par::threads(), load_s);
  std::printf("%-18s %6s %12s %12s\n", "stage", "batch", "s/item", "items/s");
  for (const auto& r : j["image_embeddings"])
    std::printf("%-18s %6d %12.4f %12.2f\n", "image embedding", r["batch"].get<int>(),
                r["seconds_per_image"].get<double>(), r["images_per_second"].get<double>());
  for (const auto& r : j["text_embeddings"])
    std::printf("%-18s %6d %12.4f %12.2f\n", "text embedding", r["batch"].get<int>(),
                r["seconds_per_text"].get<double>(), r["texts_per_second"].get<double>());
  std::printf("best: %.2f images/s at batch %d\n", best, best_batch);
}

// --accuracy: the same checkpoint loaded as stored on the CPU (float32 activations over the stored weights,
// the reference every lossy format is measured against) and compared stage by stage, with the reference's
// greedy tokens forced for --new-tokens steps (model/accuracy.h).
AccuracyReport accuracy_against_stored(const Blip2Model& model, const BenchArgs& a) {
  if (model.checkpoint().prequantized())
    fail(ErrorKind::Usage, "--accuracy compares with the checkpoint as stored, which is pre-quantized here: "
                           "bench the float checkpoint it came from");
  note("accuracy: loading the reference (weights as stored, float32 activations, cpu)");
  LoadOptions stored;
  stored.threads = par::threads();
  const Blip2Model reference(a.model, stored);
  note("accuracy: " + std::to_string(a.new_tokens) + " forced steps");
  return compare_with_reference(reference, model, bench_pixels(a, model.config().vision.image_size),
                                std::vector<std::string>(static_cast<size_t>(a.batch), a.prompt), a.new_tokens);
}

void run_bench(const BenchArgs& a, const LoadOptions& lo) {
  if (a.batch < 1 || a.batch > 4096) fail(ErrorKind::Usage, "--batch must be between 1 and 4096");
  if (a.new_tokens < 1 || a.new_tokens > 100000) fail(ErrorKind::Usage, "--new-tokens must be at least 1");
  if (a.repeat < 1 || a.repeat > 10000) fail(ErrorKind::Usage, "--repeat must be at least 1");
  if (a.warmup < 0 || a.warmup > 10000) fail(ErrorKind::Usage, "--warmup must be 0 or more");
  if (a.bw_mib < 16 || a.bw_mib > (1 << 20)) fail(ErrorKind::Usage, "--bandwidth-mib must be at least 16");
  for (int b : a.sweep)
    if (b < 1 || b > 4096) fail(ErrorKind::Usage, "--sweep batch sizes must be between 1 and 4096");
  const std::string weights = weight_format_name(lo.weights);
  if (!a.image.empty()) load_image(a.image);  // a bad image fails now, before minutes of measuring and loading
  if (load_config(a.model).task == Blip2Task::Retrieval) {
    if (a.accuracy) fail(ErrorKind::Usage, "--accuracy measures captioning checkpoints (stages and logits)");
    return run_retrieval_bench(a, lo);
  }

  // Ceilings first, before the model takes the memory; the peak RSS is then reset so that their buffers
  // do not count.
  par::set_threads(lo.threads);
  const int bw_mib = a.quick ? std::min(a.bw_mib, 64) : a.bw_mib;
  note("measuring read bandwidth (" + std::to_string(bw_mib) + " MiB, " + std::to_string(par::threads()) +
       " threads)");
  const double bw = machine::read_bandwidth(static_cast<size_t>(bw_mib) << 20, a.quick ? 2 : 5);
  note("measuring sgemm on the ViT's shapes");
  const auto sgemm = a.quick ? machine::sgemm_survey(1, 0.02) : machine::sgemm_survey();
  const double peak = machine::best_flops(sgemm);
  note("measuring the int8 dot-product peak (" + std::string(kern::isa_name()) + ")");
  const double int8_peak = a.quick ? machine::int8_dot_peak(1, 0.02) : machine::int8_dot_peak();
  const bool peak_reset = reset_peak_rss();

  note("loading " + a.model + " (weights " + weights + ", device " + device_name(lo.device) + ")");
  const auto t_load = clk::now();
  const Blip2Model model(a.model, lo);
  const double load_s = since(t_load);
  const int64_t rss_load = status_bytes("VmRSS"), peak_load = peak_rss();
  // On a GPU the floors are the GPU's: its memory bandwidth and its bf16 tensor-core rate, measured now.
  const bool gpu = model.device() == Device::CUDA;
  std::string gpu_name;
  double bw_floor = bw, peak_floor = peak;
  if (gpu) {
    gpu_name = cuda::device_description();
    note("measuring the GPU's memory bandwidth and bf16 product rate");
    bw_floor = cuda::memory_bandwidth(size_t{1} << 30);
    peak_floor = cuda::bf16_gemm_flops(8192);
  }

  std::map<std::string, std::vector<double>> times, discard;
  std::map<std::string, ops::ProductCounters> ops, sweep_ops;
  for (int i = 0; i < a.warmup; ++i) {
    note("warm-up run " + std::to_string(i + 1) + "/" + std::to_string(a.warmup));
    run_once(model, a, discard, ops);
  }
  for (int i = 0; i < a.repeat; ++i) {
    note("run " + std::to_string(i + 1) + "/" + std::to_string(a.repeat));
    run_once(model, a, times, ops);
  }
  // Throughput sweep: per batch size, one warm-up and `repeat` timed runs; captions/s from the whole batch's
  // time, the vision encoder's time per image.
  struct SweepRow {
    int batch;
    double per_caption_s, vision_per_image_s;
  };
  std::vector<SweepRow> sweep;
  for (int b : a.sweep) {
    note("sweep: batch " + std::to_string(b));
    BenchArgs ab = a;
    ab.batch = b;
    std::map<std::string, std::vector<double>> t;
    run_once(model, ab, discard, sweep_ops);
    for (int i = 0; i < a.repeat; ++i) run_once(model, ab, t, sweep_ops);
    sweep.push_back({b, stats(t["total_per_caption"]).median, stats(t["vision"]).median / b});
  }
  const int64_t rss_end = status_bytes("VmRSS"), peak_end = peak_rss();
  // After the memory figures, which the reference would inflate.
  std::optional<AccuracyReport> accuracy;
  if (a.accuracy) accuracy = accuracy_against_stored(model, a);

  std::map<std::string, Stats> st;
  for (const auto& [key, label] : kStages) st[key] = stats(times[key]);
  const Blip2Config& cfg = model.config();
  const int64_t step_bytes = decode_step_bytes(model.checkpoint());
  // Every weight in the format it is held in (what `blip2 quantize` with these options writes).
  uint64_t weight_bytes = 0;
  for (const auto& [name, n] : model.checkpoint().taken_bytes()) weight_bytes += n;
  // The format a tower's matrices are held in: the one asked for, or for "as stored" the stored one, which a
  // pre-quantized checkpoint (blip2 quantize) makes int8 / int4.
  const auto held_format = [&](Tower t) {
    const WeightFormat asked = tower_format(lo, t, cfg.family);
    if (asked != WeightFormat::AsStored) return asked;
    for (const auto& [name, dtype] : model.checkpoint().taken_dtypes())
      if (tower_of(name) == t && (dtype == DType::I8 || dtype == DType::I4))
        return dtype == DType::I8 ? WeightFormat::I8 : WeightFormat::I4;
    return asked;
  };
  const double decode_floor = static_cast<double>(step_bytes) / bw_floor;
  const double t_step = st["decode_per_token"].n ? st["decode_per_token"].median : st["first_decode_step"].median;
  // The compute-bound stages, each against the ceiling of the format its products ran in: int8/int4 weights
  // take the integer kernels at every row count (the int8 dot-product peak), float weights sgemm (its peak);
  // on a GPU, the bf16 product rate. The operations are counted as issued (ops::product_counters),
  // attention's included, which runs in sgemm whatever the weights. Each stage's time is split into its
  // linear products (the weights' format, against that ceiling), attention (against sgemm's) and the rest
  // (norms, activations, residual adds, copies), each the median over the runs.
  struct ComputeStage {
    std::string key, ceiling;
    double ops, peak, seconds;
    double linear_ops, linear_s, attention_ops, attention_s, attention_peak;
    double floor() const { return ops / peak; }
    double rest_s() const { return std::max(0.0, seconds - linear_s - attention_s); }
    // Each part's rate as a fraction of its ceiling (0 when it took no time).
    double linear_fraction() const { return linear_s > 0 ? linear_ops / peak / linear_s : 0.0; }
    double attention_fraction() const { return attention_s > 0 ? attention_ops / attention_peak / attention_s : 0.0; }
  };
  const auto ceiling_of = [&](Tower t) -> std::pair<std::string, double> {
    if (gpu) return {"bf16", peak_floor};
    const WeightFormat f = held_format(t);
    return f == WeightFormat::I8 || f == WeightFormat::I4 ? std::pair<std::string, double>{"int8", int8_peak}
                                                          : std::pair<std::string, double>{"sgemm", peak};
  };
  const double attention_peak = gpu ? peak_floor : peak;
  std::vector<ComputeStage> compute;
  for (const auto& [key, tower] : std::vector<std::pair<std::string, Tower>>{{"vision", Tower::Vision},
                                                                             {"qformer", Tower::QFormer},
                                                                             {"prompt", Tower::Language},
                                                                             {"first_decode_step", Tower::Language},
                                                                             {"decode_per_token", Tower::Language}}) {
    const ops::ProductCounters& w = ops[key];
    if (!st[key].n || w.ops() <= 0) continue;
    const auto [name, p] = ceiling_of(tower);
    compute.push_back({key, name, static_cast<double>(w.ops()), p, st[key].median, static_cast<double>(w.linear_ops),
                       stats(times[key + ".linear"]).median, static_cast<double>(w.attention_ops),
                       stats(times[key + ".attention"]).median, attention_peak});
  }
  const ComputeStage& vision = compute.front();
  const std::string image = a.image.empty() ? "(synthetic 640x480)" : a.image;

  if (a.json) {
    nlohmann::ordered_json j;
    j["model"] = a.model;
    j["weights"] = weights;
    for (Tower t : {Tower::Vision, Tower::QFormer, Tower::Language})
      j[std::string(tower_name(t)) + "_weights"] = weight_format_name(held_format(t));
    j["int4_group"] = lo.int4_group;
    j["threads"] = par::threads();
    j["device"] = device_name(lo.device);
    j["kernels"] = gpu ? "cuda" : kern::isa_name();
    j["image"] = image;
    j["prompt"] = a.prompt;
    j["batch"] = a.batch;
    j["new_tokens"] = a.new_tokens;
    j["repeat"] = a.repeat;
    j["warmup"] = a.warmup;
    j["quick"] = a.quick;
    nlohmann::ordered_json sg = nlohmann::ordered_json::array();
    for (const auto& s : sgemm) sg.push_back({{"m", s.m}, {"n", s.n}, {"k", s.k}, {"gflops", s.flops / 1e9}});
    j["machine"] = {{"cpu", machine::cpu_name()},
                    {"threads", par::threads()},
                    {"read_bandwidth_gbs", bw / 1e9},
                    {"sgemm_peak_gflops", peak / 1e9},
                    {"int8_dot_peak_gops", int8_peak / 1e9},
                    {"sgemm", sg}};
    if (gpu)
      j["gpu"] = {{"name", gpu_name},
                  {"memory_bandwidth_gbs", bw_floor / 1e9},
                  {"bf16_peak_tflops", peak_floor / 1e12}};
    j["memory"] = {{"load_s", load_s},
                   {"weights_gb", static_cast<double>(weight_bytes) / 1e9},
                   {"rss_after_load_gib", gib(rss_load)},
                   {"peak_rss_after_load_gib", gib(peak_load)},
                   {"rss_end_gib", gib(rss_end)},
                   {"peak_rss_gib", gib(peak_end)},
                   {"peak_counts_from", peak_reset ? "model load" : "process start"}};
    nlohmann::ordered_json stages;
    for (const auto& [key, label] : kStages) stages[key] = stats_json(st[key]);
    j["stages"] = stages;
    j["floors"] = {{"decode_step_bytes", step_bytes},
                   {"decode_step_floor_s", decode_floor},
                   {"decode_step_s", t_step},
                   {"decode_fraction_of_floor", decode_floor / t_step},
                   {"decode_achieved_gbs", static_cast<double>(step_bytes) / t_step / 1e9},
                   {"vision_flops", vision.ops},
                   {"vision_ceiling", vision.ceiling},
                   {"vision_floor_s", vision.floor()},
                   {"vision_s", vision.seconds},
                   {"vision_fraction_of_peak", vision.floor() / vision.seconds},
                   {"vision_achieved_gflops", vision.ops / vision.seconds / 1e9}};
    nlohmann::ordered_json cs = nlohmann::ordered_json::array();
    for (const auto& c : compute)
      cs.push_back({{"stage", c.key},
                    {"ops", c.ops},
                    {"ceiling", c.ceiling},
                    {"ceiling_gops", c.peak / 1e9},
                    {"floor_s", c.floor()},
                    {"seconds", c.seconds},
                    {"fraction_of_ceiling", c.floor() / c.seconds},
                    {"linear_ops", c.linear_ops},
                    {"linear_s", c.linear_s},
                    {"linear_fraction_of_ceiling", c.linear_fraction()},
                    {"attention_ops", c.attention_ops},
                    {"attention_s", c.attention_s},
                    {"attention_fraction_of_sgemm", c.attention_fraction()},
                    {"rest_s", c.rest_s()},
                    {"rest_share", c.rest_s() / c.seconds}});
    j["compute_stages"] = cs;
    if (!sweep.empty()) {
      nlohmann::ordered_json sw = nlohmann::ordered_json::array();
      for (const auto& r : sweep)
        sw.push_back({{"batch", r.batch},
                      {"per_caption_s", r.per_caption_s},
                      {"captions_per_s", 1.0 / r.per_caption_s},
                      {"vision_per_image_s", r.vision_per_image_s}});
      j["sweep"] = sw;
    }
    if (accuracy) {
      nlohmann::ordered_json stage_rel;
      for (const auto& [stage, rel] : accuracy->stage_rel) stage_rel[stage] = rel;
      j["accuracy"] = {{"reference", "the checkpoint as stored, float32 activations, cpu"},
                       {"stages_rel", stage_rel},
                       {"logits_rel", accuracy->logits_rel},
                       {"top1_agree", accuracy->top1_agree},
                       {"positions", accuracy->positions}};
    }
    std::cout << j.dump() << "\n" << std::flush;
    return;
  }

  const auto label_of = [&](const std::string& key) -> std::string {
    // InstructBLIP's Q-Former reads the prompt, so it runs (and is timed) in the prompt stage.
    if (key == "prompt" && cfg.instruct) return "Q-Former + prompt stage";
    for (const auto& [k, label] : kStages)
      if (k == key) return label;
    return key;
  };
  std::printf("blip2 bench: %s, weights %s%s (vision %s, qformer %s, lm %s), %d threads (%s kernels), batch %d, %d new tokens, %d runs (+%d warm-up)\n",
              a.model.c_str(), weights.c_str(),
              lo.weights == WeightFormat::I4 ? (" g" + std::to_string(lo.int4_group)).c_str() : "",
              weight_format_name(held_format(Tower::Vision)), weight_format_name(held_format(Tower::QFormer)),
              weight_format_name(held_format(Tower::Language)), par::threads(),
              gpu ? "cuda" : kern::isa_name(), a.batch, a.new_tokens, a.repeat, a.warmup);
  std::printf("image %s, prompt \"%s\"\n", image.c_str(), a.prompt.c_str());
  std::printf("machine: %s; read bandwidth %.2f GB/s; sgemm peak %.1f GFLOP/s (", machine::cpu_name().c_str(), bw / 1e9,
              peak / 1e9);
  for (size_t i = 0; i < sgemm.size(); ++i)
    std::printf("%s%ldx%ldx%ld %.0f", i ? ", " : "", static_cast<long>(sgemm[i].m), static_cast<long>(sgemm[i].n),
                static_cast<long>(sgemm[i].k), sgemm[i].flops / 1e9);
  std::printf("); int8 dot-product peak %.1f GOP/s\n", int8_peak / 1e9);
  std::printf("memory: load %.1f s, weights %.2f GB, RSS after load %.2f GiB, peak RSS %.2f GiB (since %s)\n\n",
              load_s, static_cast<double>(weight_bytes) / 1e9, gib(rss_load), gib(peak_end),
              peak_reset ? "model load" : "process start");
  std::printf("%-30s %11s %11s %11s %8s\n", "stage", "median ms", "mean ms", "min ms", "samples");
  for (const auto& [key, label] : kStages) {
    const Stats& s = st[key];
    if (!s.n) continue;
    std::printf("%-30s %11.2f %11.2f %11.2f %8zu\n", label_of(key).c_str(), 1e3 * s.median, 1e3 * s.mean, 1e3 * s.min, s.n);
  }
  if (gpu)
    std::printf("\ngpu: %s; memory bandwidth %.0f GB/s; bf16 products %.0f TFLOP/s\n", gpu_name.c_str(), bw_floor / 1e9,
                peak_floor / 1e12);
  std::printf("\nfloors (median times against this run's ceilings):\n");
  std::printf("  decode step: %.3f GB of weights read per step / %.2f GB/s = %.2f ms; measured %.2f ms: %.0f%% of the floor (%.2f GB/s)\n",
              static_cast<double>(step_bytes) / 1e9, bw_floor / 1e9, 1e3 * decode_floor, 1e3 * t_step, 100.0 * decode_floor / t_step,
              static_cast<double>(step_bytes) / t_step / 1e9);
  for (const auto& c : compute) {
    std::printf("  %s: %.1f G operations / %.1f G/s (%s peak) = %.3f s; measured %.3f s: %.0f%% of the %s peak (%.1f G/s)\n",
                label_of(c.key).c_str(), c.ops / 1e9, c.peak / 1e9, c.ceiling.c_str(), c.floor(), c.seconds,
                100.0 * c.floor() / c.seconds, c.ceiling.c_str(), c.ops / c.seconds / 1e9);
    if (c.linear_s > 0)
      std::printf("    of which: linear products %.3f s (%.0f%%) at %.0f%% of the %s peak; attention %.3f s (%.0f%%) at %.0f%% "
                  "of the %s peak; the rest (norms, activations, adds, copies) %.3f s (%.0f%%)\n",
                  c.linear_s, 100.0 * c.linear_s / c.seconds, 100.0 * c.linear_fraction(),
                  c.ceiling.c_str(), c.attention_s, 100.0 * c.attention_s / c.seconds,
                  100.0 * c.attention_fraction(),
                  gpu ? "bf16" : "sgemm", c.rest_s(), 100.0 * c.rest_s() / c.seconds);
  }
  if (accuracy) {
    std::printf("\naccuracy against the checkpoint as stored (float32 activations, cpu), relative error:\n ");
    for (const auto& [stage, rel] : accuracy->stage_rel) std::printf(" %s %.2e,", stage.c_str(), rel);
    std::printf(" logits %.2e (%d forced steps); top-1 agreement %d/%d\n", accuracy->logits_rel, a.new_tokens,
                accuracy->top1_agree, accuracy->positions);
  }
  if (!sweep.empty()) {
    std::printf("\nthroughput (%d new tokens per caption):\n%8s %14s %12s %22s\n", a.new_tokens, "batch",
                "per caption ms", "captions/s", "vision per image ms");
    for (const auto& r : sweep)
      std::printf("%8d %14.2f %12.1f %22.2f\n", r.batch, 1e3 * r.per_caption_s, 1.0 / r.per_caption_s,
                  1e3 * r.vision_per_image_s);
  }
}

}  // namespace

void add_bench_command(CLI::App& app, std::function<LoadOptions()> load_options) {
  auto args = std::make_shared<BenchArgs>();
  const char* env = std::getenv("BLIP2_MODEL");
  args->model = (env && *env) ? env : BLIP2_BUNDLED_MODEL_DIR;
  auto* sub = app.add_subcommand(
      "bench", "Time every stage of a caption (preprocess, vision, Q-Former, prompt, decode) against the machine's "
               "measured bandwidth and matrix-multiply peak");
  sub->add_option("--model", args->model, "Model directory; default $BLIP2_MODEL or the bundled tiny model")
      ->capture_default_str();
  sub->add_option("--image", args->image, "Image file (PNG or JPEG); default a synthetic 640x480 image")
      ->type_name("PATH");
  sub->add_option("--prompt", args->prompt, "Prompt for every image (default \"\": a caption)");
  sub->add_option("--batch", args->batch, "Images (copies of --image) captioned together")->capture_default_str();
  sub->add_option("--sweep", args->sweep,
                  "Then captions/s at each of these batch sizes (e.g. 1,8,64,256), in the same process")
      ->delimiter(',');
  sub->add_option("--new-tokens", args->new_tokens,
                  "Decode steps per caption, end-of-sequence ignored (the first step included)")
      ->capture_default_str();
  sub->add_option("--repeat", args->repeat, "Timed runs; stage times are medians over them")->capture_default_str();
  sub->add_option("--warmup", args->warmup, "Untimed runs first (page-in, caches)")->capture_default_str();
  sub->add_option("--bandwidth-mib", args->bw_mib, "Buffer size for the read-bandwidth measurement")
      ->capture_default_str();
  sub->add_flag("--quick", args->quick,
                "Short ceiling measurements (64 MiB, one sgemm trial each): for tests, not for numbers");
  sub->add_flag("--json", args->json, "Print one JSON object instead of the table");
  sub->add_flag("--accuracy", args->accuracy,
                "Then each stage's relative error and the forced logits' top-1 agreement against the checkpoint "
                "as stored (loaded again, float32 activations; after the memory figures)");
  sub->footer(
      "Global options (--weights, --int4-group, --threads, --device) go before 'bench'. Progress goes to stderr.\n"
      "Floors: decode step = bytes of every weight a step reads (decoder stack without cross-attention K/V, plus\n"
      "the LM head; in the loaded format, scales included) / read bandwidth; vision, Q-Former, prompt stage and\n"
      "first step = their product operations as issued (2 per multiply-add, attention included) / the ceiling\n"
      "of the format their weights ran in: the int8 dot-product peak (a register-only loop of the integer\n"
      "kernels' instructions) for int8/int4, the best sgemm rate for float weights, bf16 products on a GPU.\n"
      "Peak RSS counts from the model load (VmHWM).\n"
      "Example: blip2 --weights int8 --threads 2 bench --model /tmp/blip2-xl-bf16 --image cat.png --json\n"
      "A retrieval checkpoint (Blip2ForImageTextRetrieval): image embeddings per image at batch 1, --batch and\n"
      "--sweep sizes (images/s, the best batch), text embeddings per text (--prompt is the text) at 1 and --batch.");
  sub->callback([args, load_options] { run_bench(*args, load_options()); });
}
