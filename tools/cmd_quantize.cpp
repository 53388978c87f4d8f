// blip2 quantize: a pre-quantized copy of a checkpoint directory (model/quantize.h), which later loads mapped.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "core/error.h"
#include "model/quantize.h"

using namespace blip2;

namespace {

struct QuantizeArgs {
  std::string model, out;
  bool force = false, json = false;
};

void run_quantize(const QuantizeArgs& a, const LoadOptions& options) {
  if (a.model.empty()) fail(ErrorKind::Usage, "quantize: --model is required (the checkpoint directory to read)");
  if (a.out.empty()) fail(ErrorKind::Usage, "quantize: --out is required (the directory to write)");
  const bool tty = isatty(STDERR_FILENO);
  const auto start = std::chrono::steady_clock::now();
  const auto seconds = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  int shown = -1;
  bool was_writing = false;
  const auto progress = [&](const QuantizeProgress& p) {
    if (p.writing && !was_writing) {
      std::fprintf(stderr, "%sconverted in %.1f s; writing %.2f GB\n", tty ? "\r\033[K" : "", seconds(),
                   static_cast<double>(p.total) / 1e9);
      was_writing = true;
      shown = -1;
    }
    const int pct = p.total ? static_cast<int>(100 * p.done / p.total) : 100;
    if (!tty || pct == shown) return;
    shown = pct;
    std::fprintf(stderr, "\r\033[K%s %3d%%", p.writing ? "writing" : "converting", pct);
  };
  const QuantizeSummary s = quantize_checkpoint(a.model, a.out, options, a.force, progress);
  const double secs = seconds();
  if (tty) std::fprintf(stderr, "\r\033[K");
  std::fprintf(stderr, "quantize: %s -> %s (%s): %zu tensors, %zu quantized, %.2f GB from %.2f GB, %.1f s\n",
               a.model.c_str(), a.out.c_str(), s.formats.c_str(), s.tensors, s.quantized,
               static_cast<double>(s.file_bytes) / 1e9, static_cast<double>(s.source_bytes) / 1e9, secs);
  if (a.json)
    std::printf("%s\n", nlohmann::json{{"model", a.model},
                                       {"out", a.out},
                                       {"formats", s.formats},
                                       {"tensors", s.tensors},
                                       {"quantized", s.quantized},
                                       {"source_bytes", s.source_bytes},
                                       {"file_bytes", s.file_bytes},
                                       {"seconds", secs}}
                            .dump()
                            .c_str());
}

}  // namespace

void add_quantize_command(CLI::App& app, std::function<LoadOptions()> load_options) {
  auto args = std::make_shared<QuantizeArgs>();
  auto* sub = app.add_subcommand(
      "quantize", "Write a copy of a checkpoint with its weights in int8/int4 (or f16/bf16), which loads mapped");
  sub->fallthrough();  // --weights and the other global options may follow the command too
  sub->add_option("--model", args->model, "Checkpoint directory to read (float weights)")->type_name("DIR");
  sub->add_option("--out", args->out, "Directory to write (created; must be empty unless --force)")->type_name("DIR");
  sub->add_flag("--force", args->force, "Write into a non-empty directory, replacing the files it writes");
  sub->add_flag("--json", args->json, "Print a JSON summary on stdout (sizes in bytes, time in seconds)");
  sub->footer(
      "The format comes from the global options, which may also follow the command: --weights int8|int4 (the\n"
      "vision encoder then stays int8, as at load), --int4-group 32|64|128, --vision-weights, --qformer-weights,\n"
      "--lm-weights, --precision. The weights go through the same conversion as a load with those options and\n"
      "are written as the engine holds them: the result loads (with the default --weights stored) with no\n"
      "conversion, memory-mapped, and computes bit for bit what the original loaded with those options does.\n"
      "Writes OUT/model.safetensors (quantized matrices as NAME.int8 / NAME.int4_gG with NAME..._scales,\n"
      "the format in its metadata) and copies every other file (config, tokenizer). Progress goes to stderr.\n"
      "Example: blip2 quantize --model /tmp/blip2-xxl-bf16 --weights int4 --out /tmp/blip2-xxl-int4");
  sub->callback([args, load_options] { run_quantize(*args, load_options()); });
}
