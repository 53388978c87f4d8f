// blip2 caption over a dataset: inputs expanded (src/batch/inputs.h), what is already recorded skipped,
// this process's shard taken, then src/batch/caption_run.h captions the rest into the chosen output while a
// progress line and a final summary go to stderr.

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <iostream>
#include <nlohmann/json.hpp>

#include "batch/caption_run.h"
#include "batch/inputs.h"
#include "batch/outputs.h"
#include "commands.h"
#include "core/error.h"
#include "generate/generate.h"
#include "model/blip2.h"
#include "progress.h"

using namespace blip2;
using namespace blip2::batch;
using blip2::tools::duration_text;
using blip2::tools::ProgressPrinter;

namespace {

// "done/total images, R captions/s, ETA T[, F failed]"
std::string progress_text(const Progress& p) {
  const double rate = p.seconds > 0 ? static_cast<double>(p.captions) / p.seconds : 0;
  const double image_rate = p.seconds > 0 ? static_cast<double>(p.done) / p.seconds : 0;
  const double eta = image_rate > 0 ? static_cast<double>(p.total - p.done) / image_rate : -1;
  char buf[160];
  std::snprintf(buf, sizeof buf, "%zu/%zu images, %.2f captions/s, ETA %s", p.done, p.total, rate,
                duration_text(eta).c_str());
  std::string s = buf;
  if (p.failed) s += ", " + std::to_string(p.failed) + " failed";
  return s;
}

}  // namespace

void add_caption_dataset_options(CLI::App* c, CaptionDatasetArgs& a) {
  const char* grp = "Many images (any of these, a directory, an @LIST or several inputs)";
  a.options = {
      c->add_option("--format", a.format,
                    "txt: a caption file beside each image (see --caption-extension); jsonl: one object per image; "
                    "csv: image,caption,score,error")
          ->check(CLI::IsMember({"txt", "jsonl", "csv"}))->capture_default_str()->group(grp),
      c->add_option("--output", a.output, "jsonl/csv file to write (default: standard output); re-running skips the "
                                          "images it already holds")->group(grp),
      c->add_option("--caption-extension", a.caption_extension,
                    "txt: the caption file is the image's path with this extension (cat.jpg -> cat.txt)")
          ->capture_default_str()->group(grp),
      c->add_flag("--overwrite", a.overwrite, "Caption every image again (default: skip those already recorded)")
          ->group(grp),
      c->add_option("--batch", a.batch,
                    "Images through the vision encoder together; the decoder runs batch x (beams or sequences) rows, "
                    "an image that finishes being replaced at once")
          ->check(CLI::Range(1, 256))->capture_default_str()->group(grp),
      c->add_option("--shard", a.shard,
                    "K/N: caption only this process's share (by a hash of each image's path; 0 <= K < N), e.g. "
                    "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")->group(grp),
      c->add_option("--progress-interval", a.progress_interval,
                    "Seconds between progress lines when stderr is not a terminal")
          ->check(CLI::PositiveNumber)->capture_default_str()->group(grp),
  };
  c->footer(
      "One image and none of the options above: prints its caption(s), as before.\n"
      "Otherwise INPUTs are image files, directories (recursive, sorted; .png .jpg .jpeg .webp .tar; hidden\n"
      "names skipped), @LIST files (one path per line) and WebDataset shards (X.tar: KEY.jpg/.png/.webp beside\n"
      "KEY.json/.txt; captions in X.jsonl or X.csv beside each shard, --shard takes whole .tar files).\n"
      "Re-running the same command skips what is recorded (txt: the caption file exists; jsonl/csv: the image\n"
      "is in --output, failures included); killing it at any moment loses no finished caption and writes no\n"
      "half record. Unreadable or corrupt images are recorded with the reason (jsonl/csv \"error\") and the run\n"
      "goes on. With --do-sample each image is sampled with its own seed, derived from --seed (default 0) and\n"
      "its path, recorded in jsonl.\n"
      "Progress and a summary go to stderr; --json prints the summary as one JSON object on stdout.\n"
      "Exit status: 0 all captioned, 4 some image failed (the summary names them), else as for every command.\n"
      "Examples: blip2 caption photos/ --format txt\n"
      "          blip2 caption @list.txt --output captions.jsonl --batch 8 --preset caption\n"
      "          blip2 caption data/ --output part-$K.jsonl --shard $K/$N   (docs/CAPTIONING.md: Slurm, Kubernetes)");
}

bool caption_dataset_mode(const CaptionDatasetArgs& a, const std::vector<std::string>& inputs) {
  for (const CLI::Option* o : a.options)
    if (o->count() > 0) return true;
  if (inputs.size() != 1 || (!inputs[0].empty() && inputs[0][0] == '@') || is_shard_name(inputs[0])) return true;
  std::error_code ec;
  return std::filesystem::is_directory(inputs[0], ec);
}

int run_caption_dataset(const CaptionDatasetArgs& a, const std::vector<std::string>& inputs, const std::string& prompt,
                        const GenerationOptions& options, bool json, const std::string& model_dir,
                        const std::function<std::unique_ptr<Blip2Model>(const std::string&)>& load) {
  // Everything that can be wrong with the command is checked before the model loads.
  const Format format = parse_format(a.format);
  const Shard shard = a.shard.empty() ? Shard{} : parse_shard(a.shard);
  std::vector<InputItem> all = expand_inputs(inputs);
  const bool any_file = std::any_of(all.begin(), all.end(), [](const InputItem& it) { return it.tar.empty(); });
  const bool any_tar = std::any_of(all.begin(), all.end(), [](const InputItem& it) { return !it.tar.empty(); });
  if (any_tar && format == Format::Txt)
    fail(ErrorKind::Usage, "WebDataset shards (.tar) are captioned into one jsonl or csv file beside each shard: "
                           "use --format jsonl or csv");
  if (any_tar && !any_file && !a.output.empty())
    fail(ErrorKind::Usage, "--output is for image files; each .tar shard's captions go beside it (SHARD.jsonl/.csv)");
  const bool stdout_records = any_file && format != Format::Txt && (a.output.empty() || a.output == "-");
  if (json && stdout_records)
    fail(ErrorKind::Usage, "--json prints the summary on standard output: give --output for the " + a.format + " records");
  // Image files go to --output (or beside each image); each shard's samples to a file beside the shard.
  std::unique_ptr<CaptionSink> file_sink;
  std::map<std::string, std::unique_ptr<CaptionSink>> shard_sinks;
  const auto sink_of = [&](const InputItem& it) -> CaptionSink& {
    if (it.tar.empty()) {
      if (!file_sink) file_sink = std::make_unique<CaptionSink>(format, a.output, a.caption_extension, a.overwrite);
      return *file_sink;
    }
    auto& s = shard_sinks[it.tar];
    if (!s) {
      const std::string out = std::filesystem::path(it.tar).replace_extension("." + a.format).string();
      s = std::make_unique<CaptionSink>(format, out, a.caption_extension, a.overwrite);
    }
    return *s;
  };
  std::vector<InputItem> todo;
  size_t other_shards = 0, skipped = 0;
  for (auto& it : all) {
    if (!in_shard(it.share_key(), shard)) ++other_shards;
    else if (sink_of(it).done(it)) ++skipped;
    else todo.push_back(std::move(it));
  }
  if (file_sink) file_sink->check_distinct(todo);
  std::fprintf(stderr, "%zu images%s: %zu already recorded, %zu to caption\n", all.size() - other_shards,
               a.shard.empty() ? "" : (" in shard " + a.shard + " (of " + std::to_string(all.size()) + ")").c_str(),
               skipped, todo.size());
  std::fflush(stderr);

  Summary s;
  if (!todo.empty()) {
    const auto model = load(model_dir);
    if (static_cast<int64_t>(model->tokenizer().encode(prompt).size()) > model->max_prompt_tokens())
      fail(ErrorKind::Input, "--prompt is longer than the model's " + std::to_string(model->max_prompt_tokens()) + " tokens");
    RunOptions ro;
    ro.batch = a.batch;
    ro.prompt = prompt;
    ro.generation = options;
    ProgressPrinter printer(a.progress_interval);
    s = caption_images(*model, todo, ro, [&](const InputItem& it, const Record& r) { sink_of(it).write(it, r); },
                       [&](const Progress& p) { printer(p.done >= p.total, progress_text(p)); });
  }
  const Progress& p = s.progress;
  const double rate = p.seconds > 0 ? static_cast<double>(p.captions) / p.seconds : 0;
  std::fprintf(stderr, "captioned %zu images (%zu failed, %zu skipped as already recorded) in %.1f s: %.3f captions/s\n",
               p.done - p.failed, p.failed, skipped, p.seconds, rate);
  if (p.done > 0)
    std::fprintf(stderr,
                 "time: read+preprocess %.1f s (own thread), vision %.1f s (%lld passes, %.1f images each), "
                 "prompt %.1f s, decode %.1f s (%lld steps, %lld tokens)\n",
                 s.read_seconds, s.vision_seconds, static_cast<long long>(s.vision_passes),
                 s.vision_passes ? static_cast<double>(s.images_encoded) / static_cast<double>(s.vision_passes) : 0.0,
                 s.prompt_seconds, s.decode_seconds, static_cast<long long>(s.decoder_steps),
                 static_cast<long long>(s.generated_tokens));
  const size_t listed = std::min<size_t>(s.failures.size(), 20);
  for (size_t i = 0; i < listed; ++i)
    std::fprintf(stderr, "failed: %s: %s\n", s.failures[i].first.c_str(), s.failures[i].second.c_str());
  if (s.failures.size() > listed) std::fprintf(stderr, "failed: ... and %zu more\n", s.failures.size() - listed);
  if (json) {
    nlohmann::ordered_json j;
    j["images"] = p.done - p.failed;
    j["failed"] = p.failed;
    j["skipped"] = skipped;
    j["other_shards"] = other_shards;
    j["captions"] = p.captions;
    j["seconds"] = p.seconds;
    j["captions_per_second"] = rate;
    j["stages_seconds"] = {{"read_preprocess", s.read_seconds}, {"vision", s.vision_seconds},
                           {"prompt", s.prompt_seconds}, {"decode", s.decode_seconds}};
    j["vision_passes"] = s.vision_passes;
    j["decoder_steps"] = s.decoder_steps;
    j["generated_tokens"] = s.generated_tokens;
    j["failures"] = nlohmann::ordered_json::array();
    for (const auto& [key, why] : s.failures) j["failures"].push_back({{"image", key}, {"error", why}});
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n" << std::flush;
  }
  return p.failed ? static_cast<int>(ErrorKind::Input) : 0;
}
