// Subcommands of the blip2 tool that live in their own files. Each registers itself on the app; its
// callback does the work during parsing and reports failures as blip2::Error (the kind sets the exit status).
#pragma once

namespace CLI {
class App;
class Option;
}

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace blip2 {
class Blip2Model;
class RetrievalModel;
struct LoadOptions;
struct GenerationOptions;
}

// `blip2 make-random --like xxl|xl|tiny --out DIR [--dtype f32|bf16|f16] [--seed N] [--force]`
void add_make_random_command(CLI::App& app);
// `blip2 quantize --model DIR --weights int8|int4 --out DIR2 [--force] [--json]`: a pre-quantized copy.
// `load_options` gives the global options (which may follow the command).
void add_quantize_command(CLI::App& app, std::function<blip2::LoadOptions()> load_options);
// `blip2 [--weights F] [--threads N] bench [--model DIR] [--image PATH] [--prompt TEXT] [--batch N]
// [--new-tokens N] [--repeat N] [--warmup N] [--json]`: every stage timed, against the machine's ceilings.
// `load_options` gives the global options (--weights, --vision-weights, --int4-group, --threads).
void add_bench_command(CLI::App& app, std::function<blip2::LoadOptions()> load_options);

// `blip2 serve --model DIR [--host 127.0.0.1] [--port 8080] ...`: the OpenAI-compatible HTTP server.
// `load` loads a model directory with the global options (--weights, --threads).
// A retrieval checkpoint is loaded with `load_retrieval` and served with /v1/embeddings and /v1/match.
void add_serve_command(CLI::App& app, std::function<std::unique_ptr<blip2::Blip2Model>(const std::string&)> load,
                       std::function<std::unique_ptr<blip2::RetrievalModel>(const std::string&)> load_retrieval,
                       std::string default_model);

// `blip2 caption INPUT...` over a dataset (tools/cmd_caption.cpp): the options it adds to the caption command
// (whose decoding options and --model come from blip2.cpp, shared with generate), and the run.
struct CaptionDatasetArgs {
  std::string format = "jsonl", output, caption_extension = ".txt", shard;
  int batch = 8;
  bool overwrite = false;
  double progress_interval = 10;
  std::vector<CLI::Option*> options;  // the options above, to tell whether any was given
};
void add_caption_dataset_options(CLI::App* caption, CaptionDatasetArgs& a);
// False for one image file and none of the dataset options: the one-image command, whose output is unchanged.
bool caption_dataset_mode(const CaptionDatasetArgs& a, const std::vector<std::string>& inputs);
// Returns the exit status: 0, or 4 when any image failed. `json`: the summary as one JSON object on stdout.
int run_caption_dataset(const CaptionDatasetArgs& a, const std::vector<std::string>& inputs, const std::string& prompt,
                        const blip2::GenerationOptions& options, bool json, const std::string& model_dir,
                        const std::function<std::unique_ptr<blip2::Blip2Model>(const std::string&)>& load);

// `blip2 match IMAGE TEXT...` and `blip2 embed INPUT...` for retrieval checkpoints (tools/cmd_retrieval.cpp).
// Returns the runner: after parsing, it runs whichever of the two was given and returns its exit status, or
// -1 when neither was.
std::function<int()> add_retrieval_commands(CLI::App& app, std::function<blip2::LoadOptions()> load_options,
                                            std::string default_model);
// `blip2 inspect` for a retrieval checkpoint: the pairs (image i with text i) give the ITM tensors; the
// distinct images and texts, in order of appearance, the image-side, text-side and ITC tensors.
int run_retrieval_inspect(const std::string& model_dir, const blip2::LoadOptions& options,
                          const std::vector<std::string>& images, const std::vector<std::string>& texts,
                          const std::string& out_path);
