// Subcommands of the blip2 tool that live in their own files. Each registers itself on the app; its
// callback does the work during parsing and reports failures as blip2::Error (the kind sets the exit status).
#pragma once

namespace CLI {
class App;
}

#include <functional>
#include <memory>
#include <string>

namespace blip2 {
class Blip2Model;
struct LoadOptions;
}

// `blip2 make-random --like xxl|xl|tiny --out DIR [--dtype f32|bf16|f16] [--seed N] [--force]`
void add_make_random_command(CLI::App& app);
// `blip2 [--weights F] [--threads N] bench [--model DIR] [--image PATH] [--prompt TEXT] [--batch N]
// [--new-tokens N] [--repeat N] [--warmup N] [--json]`: every stage timed, against the machine's ceilings.
// `load_options` gives the global options (--weights, --vision-weights, --int4-group, --threads).
void add_bench_command(CLI::App& app, std::function<blip2::LoadOptions()> load_options);

// `blip2 serve --model DIR [--host 127.0.0.1] [--port 8080] ...`: the OpenAI-compatible HTTP server.
// `load` loads a model directory with the global options (--weights, --threads).
void add_serve_command(CLI::App& app, std::function<std::unique_ptr<blip2::Blip2Model>(const std::string&)> load,
                       std::string default_model);
