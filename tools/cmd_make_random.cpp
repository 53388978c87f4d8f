// blip2 make-random: a checkpoint directory with random weights and the exact shapes of a real BLIP-2 model.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <memory>

#include "commands.h"
#include "core/error.h"
#include "io/make_random.h"

using namespace blip2;

namespace {

struct MakeRandomArgs {
  std::string like, out, dtype = "bf16", seed = "0";
  bool force = false, outliers = false, uncompensated = false;
};

uint64_t parse_seed(const std::string& s) {
  const bool digits = !s.empty() && s.size() <= 20 && s.find_first_not_of("0123456789") == std::string::npos;
  if (digits) {
    try {
      return std::stoull(s);
    } catch (const std::exception&) {
    }
  }
  fail(ErrorKind::Usage, "--seed '" + s + "': expected a non-negative integer below 2^64");
}

void run_make_random(const MakeRandomArgs& a) {
  if (a.like.empty()) fail(ErrorKind::Usage, "make-random: --like is required (xxl, xl, opt-2.7b, opt-6.7b, instructblip-flan-t5-xl, "
                                          "instructblip-flan-t5-xxl, instructblip-vicuna-7b, instructblip-vicuna-13b, "
                                          "blip2-itm-vit-g, tiny or tiny-opt)");
  if (a.out.empty()) fail(ErrorKind::Usage, "make-random: --out is required (the directory to write)");
  MakeRandomOptions opt;
  opt.dtype = parse_dtype_option(a.dtype);
  opt.seed = parse_seed(a.seed);
  opt.overwrite = a.force;
  opt.outliers.enabled = a.outliers || a.uncompensated;
  opt.outliers.compensate = !a.uncompensated;
  const RandomCheckpointPlan plan = plan_random_checkpoint(a.like, opt.dtype, opt.outliers, opt.seed);  // validates --like first
  const bool tty = isatty(STDERR_FILENO);
  const auto start = std::chrono::steady_clock::now();
  const auto seconds = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  int last_percent = -1;
  bool started = false;
  opt.progress = [&](const MakeRandomProgress& p) {
    if (!started) {  // printed once the directory checks have passed and writing has begun
      std::fprintf(stderr, "make-random: %s, %zu tensors, %lld parameters, %s, %d file(s) -> %s\n",
                   plan.name.c_str(), plan.tensors.size(), static_cast<long long>(plan.total_elements()),
                   dtype_name(opt.dtype), p.shards, a.out.c_str());
      for (const auto& n : plan.outlier_notes) std::fprintf(stderr, "make-random: outliers: %s\n", n.c_str());
      started = true;
    }
    const int percent = p.bytes_total ? static_cast<int>(100.0 * static_cast<double>(p.bytes_done) /
                                                         static_cast<double>(p.bytes_total))
                                      : 100;
    if (p.shard_finished) {
      const bool gb = p.bytes_total >= 1'000'000'000;
      std::fprintf(stderr, "%s[%d/%d] %s written: %zu/%zu tensors, %.2f/%.2f %s, %.1f s\n", tty ? "\r\033[K" : "",
                   p.shard, p.shards, p.file.c_str(), p.tensors_done, p.tensors_total,
                   static_cast<double>(p.bytes_done) / (gb ? 1e9 : 1e6),
                   static_cast<double>(p.bytes_total) / (gb ? 1e9 : 1e6), gb ? "GB" : "MB", seconds());
      last_percent = -1;
    } else if (tty && percent != last_percent) {
      std::fprintf(stderr, "\r\033[K[%d/%d] %s %3d%%", p.shard, p.shards, p.file.c_str(), percent);
      last_percent = percent;
    }
  };
  make_random_checkpoint(a.like, a.out, opt);
  std::fprintf(stderr, "make-random: done in %.1f s; load it with --model %s\n", seconds(), a.out.c_str());
}

}  // namespace

void add_make_random_command(CLI::App& app) {
  auto args = std::make_shared<MakeRandomArgs>();
  auto* sub = app.add_subcommand(
      "make-random",
      "Write a checkpoint directory with RANDOM weights and the exact shapes of a real BLIP-2 model");
  sub->add_option("--like", args->like,
                  "Model whose shapes to copy: xxl (Salesforce/blip2-flan-t5-xxl, 12.2 G parameters), xl "
                  "(Salesforce/blip2-flan-t5-xl, 3.9 G), opt-2.7b (Salesforce/blip2-opt-2.7b, 3.7 G), opt-6.7b "
                  "(Salesforce/blip2-opt-6.7b, 7.8 G), instructblip-flan-t5-xl, instructblip-flan-t5-xxl, "
                  "instructblip-vicuna-7b, instructblip-vicuna-13b (Salesforce/instructblip-*: the Q-Former reads "
                  "the prompt), blip2-itm-vit-g (Salesforce/blip2-itm-vit-g, image-text retrieval, 1.2 G), tiny or "
                  "tiny-opt (the bundled models/tiny-blip2-t5 and models/tiny-blip2-opt); the full names are "
                  "accepted too")
      ->type_name("xxl|xl|opt-2.7b|opt-6.7b|instructblip-...|blip2-itm-vit-g|tiny|tiny-opt");
  sub->add_option("--out", args->out, "Directory to write (created; must be empty unless --force)")->type_name("DIR");
  sub->add_option("--dtype", args->dtype, "Stored weight type: f32, bf16 or f16")
      ->type_name("f32|bf16|f16")
      ->capture_default_str();
  sub->add_option("--seed", args->seed, "Random seed; the same seed gives identical files")
      ->type_name("N")
      ->capture_default_str();
  OutlierOptions defaults;
  sub->add_flag("--outliers", args->outliers,
                "Give the language model the activation outliers of real LLMs (LLM.int8(), SmoothQuant): in every "
                "layer the norm weights feeding attention and the feed-forward get " +
                    std::to_string(defaults.residual_channels) + " of d_model channels x" +
                    std::to_string(static_cast<int>(defaults.residual_scale)) +
                    ", and the feed-forward's linear branch (T5 wi_1, OPT fc1 + bias, LLaMA up_proj) " +
                    std::to_string(defaults.ffn_channels) + " hidden channels x" +
                    std::to_string(static_cast<int>(defaults.ffn_scale)) +
                    " (so they enter wo / fc2 / down_proj that large). The weights reading those channels are "
                    "divided by as much, so the model computes what the clean one of the same seed does and "
                    "only its activations differ, as in a trained model. Channels are drawn from --seed, the "
                    "same in every layer; README.txt lists them. Default: off");
  sub->add_flag("--outliers-uncompensated", args->uncompensated,
                "--outliers without dividing the reading weights: the x" +
                    std::to_string(static_cast<int>(defaults.residual_scale)) +
                    " channels then reach q and k at full size and sharpen attention, a model that amplifies any "
                    "rounding (bf16 weights too); the --outliers models before compensation was added");
  sub->add_flag("--force", args->force,
                "Write into a non-empty directory, replacing the checkpoint files there (config, tokenizer, "
                "weights, index, README.txt); other files are left alone");
  sub->footer(
      "Writes the Hugging Face hub layout: config.json, generation_config.json, tokenizer_config.json,\n"
      "spiece.model, README.txt and model.safetensors, or shards model-0000K-of-0000N.safetensors of at most\n"
      "2 GB each with model.safetensors.index.json. Tensor names and shapes are the real checkpoint's;\n"
      "values are random, scaled to keep activations finite and O(1), so outputs are nonsense. The tokenizer\n"
      "is the tiny model's 1000-piece stand-in. Weights stream to disk (memory use stays small); sizes in\n"
      "bf16/f16: xxl 24.5 GB, xl 7.9 GB (twice that in f32). Progress goes to stderr.\n"
      "Example: blip2 make-random --like xl --out /tmp/blip2-xl-bf16 && blip2 caption cat.png --model "
      "/tmp/blip2-xl-bf16");
  sub->callback([args] { run_make_random(*args); });
}
