// blip2: the command-line tool. Thin: parse options, call the library, print. Errors surface here once,
// as one message on stderr and an exit status that says what kind of error it was.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "generate/chat.h"
#include "generate/generate.h"
#include "image/image.h"
#include "io/safetensors.h"
#include "model/blip2.h"
#include "model/retrieval.h"
#include "text/text_stream.h"
#include "commands.h"

#if defined(__GLIBC__)
#include <malloc.h>  // mallopt
#endif

using namespace blip2;

namespace {

constexpr const char* kExitCodes =
    "Exit status: 0 success, 1 internal error, 2 bad usage or options, 3 bad model directory\n"
    "(config, weights, tokenizer), 4 bad input (image, prompt).";

std::string default_model_dir() {
  const char* env = std::getenv("BLIP2_MODEL");
  return (env && *env) ? env : BLIP2_BUNDLED_MODEL_DIR;
}

// Global options (before the subcommand): weight format and threads, for every command that loads a model.
LoadOptions g_load;
std::string g_weights = "stored";
std::string g_vision_weights, g_qformer_weights, g_lm_weights;  // empty: tower_format()'s default
std::string g_device = "cpu";

// The global options as LoadOptions (parsed when a command runs, after CLI11 has filled them in).
LoadOptions global_load_options() {
  LoadOptions lo = g_load;
  lo.weights = parse_weight_format(g_weights);
  if (!g_vision_weights.empty()) lo.vision_weights = parse_weight_format(g_vision_weights);
  if (!g_qformer_weights.empty()) lo.qformer_weights = parse_weight_format(g_qformer_weights);
  if (!g_lm_weights.empty()) lo.lm_weights = parse_weight_format(g_lm_weights);
  lo.device = parse_device(g_device);
  return lo;
}

std::unique_ptr<Blip2Model> load_model(const std::string& dir) {
  const bool tty = isatty(STDERR_FILENO);
  // On a terminal: one line, rewritten as loading advances (each percent), then the time it took.
  int shown = -1;
  const auto start = std::chrono::steady_clock::now();
  auto progress = [&](const Checkpoint::LoadProgress& p) {
    const int pct = p.bytes_total ? static_cast<int>(100 * p.bytes_taken / p.bytes_total) : 0;
    if (!tty || pct == shown) return;
    shown = pct;
    std::fprintf(stderr, "\rloading %s: %d/%d files, weights %3d%% of %.2f GB", dir.c_str(), p.shards_opened,
                 p.shards, pct, static_cast<double>(p.bytes_total) / 1e9);
  };
  auto model = std::make_unique<Blip2Model>(dir, global_load_options(), progress);
  if (tty && shown >= 0)
    std::fprintf(stderr, " (%.1f s)\n",
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return model;
}

struct Pairs {
  std::vector<std::string> images, prompts;
};

Tensor load_pixels(const Blip2Model& model, const std::vector<std::string>& paths) {
  std::vector<RgbImage> imgs;
  for (const auto& p : paths) imgs.push_back(load_image(p));
  return preprocess_images(imgs, model.config().vision.image_size);
}

// Options shared by generate, caption, ask and chat. Decoding options take Hugging Face's names; an option
// left out comes from --preset, else from the checkpoint's generation_config.json, else Hugging Face's default.
struct GenerateArgs {
  std::string model = default_model_dir();
  std::string preset, early_stopping;
  GenerationOptions given;  // the values of the options given on the command line
  uint64_t seed = 0;
  bool do_sample = false;
  bool json = false;
  std::map<std::string, CLI::Option*> opts;
  bool has(const std::string& name) const { return opts.at(name)->count() > 0; }
};

void add_generate_options(CLI::App* cmd, GenerateArgs& a) {
  cmd->add_option("--model", a.model, "Model directory (Hugging Face layout); default $BLIP2_MODEL or the bundled tiny model")
      ->capture_default_str();
  GenerationOptions& g = a.given;
  const auto opt = [&](const std::string& name, auto& value, const std::string& help) {
    a.opts[name] = cmd->add_option(name, value, help)->group("Decoding (Hugging Face names; defaults from generation_config.json)");
  };
  opt("--max-new-tokens", g.max_new_tokens, "Most tokens to generate, end-of-sequence included (default 20)");
  opt("--min-new-tokens", g.min_new_tokens, "End-of-sequence is suppressed until this many tokens (default 0)");
  opt("--min-length", g.min_length, "The same, counted with the decoder start token (default 0)");
  opt("--num-beams", g.num_beams, "Beam search with this many beams; 1 = greedy or sampling (default 1)");
  opt("--length-penalty", g.length_penalty,
      "Beam search: a finished beam scores sum_logprobs / length^this; negative favours short (default 1)");
  a.opts["--early-stopping"] =
      cmd->add_option("--early-stopping", a.early_stopping,
                      "Beam search: when an input is done: false (Hugging Face's heuristic), true (as soon as "
                      "--num-beams hypotheses end) or never (only when no beam can still win) (default false)")
          ->check(CLI::IsMember({"true", "false", "never"}))
          ->group("Decoding (Hugging Face names; defaults from generation_config.json)");
  opt("--repetition-penalty", g.repetition_penalty, "> 1 discourages tokens already generated (default 1 = off)");
  opt("--no-repeat-ngram-size", g.no_repeat_ngram_size, "No n-gram of this size appears twice (default 0 = off)");
  opt("--num-return-sequences", g.num_return_sequences,
      "Sequences per input: best beams (at most --num-beams) or independent samples (default 1)");
  a.opts["--do-sample"] = cmd->add_flag("--do-sample", a.do_sample, "Sample instead of taking the most likely tokens")
                              ->group("Decoding (Hugging Face names; defaults from generation_config.json)");
  opt("--temperature", g.temperature, "Sampling: divide the logits by this, > 0 (default 1)");
  opt("--top-k", g.top_k, "Sampling: keep the k most likely tokens; 0 = off (default 50)");
  opt("--top-p", g.top_p, "Sampling: keep the most likely tokens holding this probability, in (0, 1] (default 1 = off)");
  opt("--seed", a.seed, "Sampling: the random seed; the same seed gives the same text (default: a random one)");
  a.opts["--preset"] =
      cmd->add_option("--preset", a.preset,
                      "LAVIS settings: caption (5 beams, <= 30 new tokens, min_length 1) or vqa (5 beams, <= 10 new "
                      "tokens, min_length 1, length_penalty -1, prompt \"Question: {prompt} Answer:\"); options given "
                      "with it override it")
          ->check(CLI::IsMember({"caption", "vqa"}))
          ->group("Decoding (Hugging Face names; defaults from generation_config.json)");
  cmd->add_flag("--json", a.json, "Print JSON with ids, text and score of every returned sequence");
}

// The decoding options of a command: checkpoint defaults, then the preset, then the options given. Options the
// chosen strategy would ignore are contradictions. Checked before any work (Error(Usage)).
GenerationOptions resolve_options(const GenerateArgs& a) {
  GenerationOptions o = generation_defaults(a.model);
  if (!a.preset.empty()) apply_preset(o, a.preset);
  const GenerationOptions& g = a.given;
  if (a.has("--max-new-tokens")) o.max_new_tokens = g.max_new_tokens;
  if (a.has("--min-new-tokens")) o.min_new_tokens = g.min_new_tokens;
  if (a.has("--min-length")) o.min_length = g.min_length;
  if (a.has("--num-beams")) o.num_beams = g.num_beams;
  if (a.has("--length-penalty")) o.length_penalty = g.length_penalty;
  if (a.has("--early-stopping"))
    o.early_stopping = a.early_stopping == "true"    ? EarlyStopping::Always
                       : a.early_stopping == "never" ? EarlyStopping::Never
                                                     : EarlyStopping::Heuristic;
  if (a.has("--repetition-penalty")) o.repetition_penalty = g.repetition_penalty;
  if (a.has("--no-repeat-ngram-size")) o.no_repeat_ngram_size = g.no_repeat_ngram_size;
  if (a.has("--num-return-sequences")) o.num_return_sequences = g.num_return_sequences;
  if (a.has("--do-sample")) o.do_sample = true;
  if (a.has("--temperature")) o.temperature = g.temperature;
  if (a.has("--top-k")) o.top_k = g.top_k;
  if (a.has("--top-p")) o.top_p = g.top_p;
  if (a.has("--seed")) o.seed = a.seed;
  if (!o.do_sample)
    for (const char* name : {"--temperature", "--top-k", "--top-p", "--seed"})
      if (a.has(name)) fail(ErrorKind::Usage, std::string(name) + " only applies when sampling: add --do-sample");
  for (const char* name : {"--length-penalty", "--early-stopping"})
    if (o.num_beams == 1 && a.has(name))
      fail(ErrorKind::Usage, std::string(name) + " only applies to beam search: add --num-beams (more than 1)");
  validate(o);
  return o;
}

nlohmann::ordered_json sequences_json(const Blip2Model& model, const std::vector<GeneratedSequence>& seqs) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (const auto& s : seqs)
    out.push_back({{"ids", s.ids}, {"text", model.tokenizer().decode(s.ids)}, {"score", s.score}});
  return out;
}

void print_json(const nlohmann::ordered_json& j) {
  std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n" << std::flush;
}

// Streaming is possible where a chosen token is final: greedy and sampling, one sequence, text output.
bool can_stream(const GenerateArgs& a, const GenerationOptions& o, size_t batch) {
  return !a.json && batch == 1 && o.num_beams == 1 && o.num_return_sequences == 1;
}

// Generates for encoded pairs and prints the results (text: one line per sequence; --json: the caller's).
std::vector<std::vector<GeneratedSequence>> generate_and_print_text(const Blip2Model& model, const Encoded& enc,
                                                                    const GenerateArgs& a, const GenerationOptions& o) {
  const size_t batch = static_cast<size_t>(enc.batch());
  const bool stream = can_stream(a, o, batch);
  TextStream ts(model.tokenizer());
  const auto print = [](const std::string& text) { std::cout << text << std::flush; };
  const auto results = generate([&](int expand) { return model.start_decoder(enc, expand); },
                                static_cast<int>(batch), o, model.special_tokens(),
                                stream ? TokenCallback([&](int, int32_t tok) { print(ts.put(tok)); }) : TokenCallback());
  if (stream) {
    print(ts.end(results[0][0].ids) + "\n");
  } else if (!a.json) {
    for (const auto& r : results)
      for (const auto& s : r) std::cout << model.tokenizer().decode(s.ids) << "\n";
    std::cout << std::flush;
  }
  return results;
}

// `question_prompts`: the prompts are generate's --prompt values, which --preset vqa turns into its template
// (caption and ask build their prompts themselves).
int run_generate(const GenerateArgs& a, Pairs pairs, bool question_prompts = false) {
  if (pairs.images.empty()) fail(ErrorKind::Usage, "no (image, prompt) pairs given: pass --image and --prompt");
  if (pairs.images.size() != pairs.prompts.size())
    fail(ErrorKind::Usage, "each --image needs one --prompt (got " + std::to_string(pairs.images.size()) +
                               " images and " + std::to_string(pairs.prompts.size()) + " prompts)");
  const GenerationOptions o = resolve_options(a);
  if (question_prompts)
    for (auto& p : pairs.prompts) p = preset_prompt(a.preset, p);
  const auto model = load_model(a.model);
  // Pairs run kGenerateChunk at a time: images, activations and decoder state for the whole list at once took
  // 2 GB for 1000 pairs. A pair's answer does not depend on the others in its batch (test_caption_batch).
  constexpr size_t kGenerateChunk = 16;
  nlohmann::ordered_json out;
  out["results"] = nlohmann::ordered_json::array();
  for (size_t begin = 0; begin < pairs.images.size(); begin += kGenerateChunk) {
    const size_t end = std::min(pairs.images.size(), begin + kGenerateChunk);
    const std::vector<std::string> images(pairs.images.begin() + begin, pairs.images.begin() + end),
        texts(pairs.prompts.begin() + begin, pairs.prompts.begin() + end);
    const Encoded enc = model->encode(load_pixels(*model, images), model->tokenize(texts));
    const auto results = generate_and_print_text(*model, enc, a, o);
    if (!a.json) continue;
    for (size_t i = 0; i < results.size(); ++i) {
      nlohmann::ordered_json r;
      r["image"] = images[i];
      r["prompt"] = texts[i];
      r["sequences"] = sequences_json(*model, results[i]);
      out["results"].push_back(r);
    }
  }
  if (a.json) print_json(out);
  return 0;
}

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

// A conversation about one image, one question per input line. The image is encoded once (vision encoder and
// Q-Former); each question runs only the T5 encoder over [image queries ; conversation so far] and the decoder.
int run_chat(const GenerateArgs& a, const std::string& first_image) {
  const GenerationOptions o = resolve_options(a);
  const auto model = load_model(a.model);
  const bool interactive = isatty(STDIN_FILENO);
  std::string image = first_image;
  Encoded img = model->encode_image(load_pixels(*model, {image}));
  std::vector<ChatTurn> history;
  int status = 0, turn = 0;
  const auto note = [&](const std::string& msg) {
    if (interactive) std::cerr << msg << "\n";
  };
  const auto report = [&](const Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    status = static_cast<int>(e.kind());
  };
  note("Ask about " + image + ", one question per line. /reset forgets the conversation, /image PATH switches "
       "to another image, /quit ends.");
  std::string line;
  while (true) {
    if (interactive) std::cerr << "> " << std::flush;
    if (!std::getline(std::cin, line)) break;
    line = trim(line);
    if (line.empty()) continue;
    if (line == "/quit" || line == "/exit") break;
    if (line == "/reset") {
      history.clear();
      note("(conversation forgotten)");
      continue;
    }
    if (line == "/image" || line.rfind("/image ", 0) == 0) {
      const std::string path = trim(line.substr(6));
      try {
        if (path.empty()) fail(ErrorKind::Usage, "/image needs a path: /image PATH");
        img = model->encode_image(load_pixels(*model, {path}));
        image = path;
        history.clear();
        note("(now about " + image + "; conversation forgotten)");
      } catch (const Error& e) {
        report(e);
      }
      continue;
    }
    if (line[0] == '/') {
      report(Error(ErrorKind::Usage, "unknown command " + line + " (commands: /reset, /image PATH, /quit)"));
      continue;
    }
    try {
      size_t kept = 0;
      const std::string prompt = fit_chat_prompt(
          history, line, model->max_prompt_tokens(),
          [&](const std::string& p) { return static_cast<int64_t>(model->tokenizer().encode(p).size()); }, &kept);
      if (kept < history.size()) note("(the oldest " + std::to_string(history.size() - kept) + " turn(s) no longer fit)");
      const Encoded enc = model->encode_prompts(img, model->tokenize({prompt}));
      const auto results = generate_and_print_text(*model, enc, a, o);
      // The history keeps the answer without surrounding spaces (OPT's begin with one), as LAVIS strips them.
      std::string answer = model->tokenizer().decode(results[0][0].ids);
      answer.erase(0, answer.find_first_not_of(' '));
      answer.erase(answer.find_last_not_of(' ') + 1);
      ++turn;
      if (a.json) {
        nlohmann::ordered_json j;
        j["turn"] = turn;
        j["image"] = image;
        j["question"] = line;
        j["prompt"] = prompt;
        j["sequences"] = sequences_json(*model, results[0]);
        j["image_encodings"] = model->image_encodings();
        print_json(j);
      }
      history.push_back({line, answer});
    } catch (const Error& e) {
      if (e.kind() == ErrorKind::Internal) throw;
      report(e);
    }
  }
  return status;
}

std::vector<int32_t> parse_ids(const std::string& s) {
  if (s.empty() || s.front() == ',' || s.back() == ',' || s.find(",,") != std::string::npos)
    fail(ErrorKind::Usage, "--decoder-input-ids: '" + s + "' has an empty entry (expected e.g. 0,17,5)");
  std::vector<int32_t> ids;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    try {
      size_t used = 0;
      const long v = std::stol(tok, &used);
      if (used != tok.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(tok);
      ids.push_back(static_cast<int32_t>(v));
    } catch (const std::exception&) {
      fail(ErrorKind::Usage, "--decoder-input-ids: '" + tok + "' is not a token id (expected e.g. 0,17,5)");
    }
  }
  if (ids.empty()) fail(ErrorKind::Usage, "--decoder-input-ids is empty");
  return ids;
}

// Writes every stage's tensor, by the reference's names: for T5 the encoder output and the logits
// teacher-forced on the decoder ids; for OPT the logits at every prompt position (no decoder ids).
int run_inspect(const std::string& model_dir, const Pairs& pairs, const std::vector<std::string>& dec_ids_arg,
                const std::string& out_path) {
  if (pairs.images.empty() || pairs.images.size() != pairs.prompts.size())
    fail(ErrorKind::Usage, "inspect needs one --prompt per --image");
  const size_t B = pairs.images.size();
  if (!(dec_ids_arg.size() <= 1 || dec_ids_arg.size() == B))
    fail(ErrorKind::Usage, "give --decoder-input-ids once for all pairs or once per pair");
  std::vector<std::vector<int32_t>> dec_ids(B, std::vector<int32_t>{0});
  for (size_t b = 0; b < B && !dec_ids_arg.empty(); ++b) dec_ids[b] = parse_ids(dec_ids_arg[dec_ids_arg.size() == 1 ? 0 : b]);
  for (const auto& d : dec_ids)
    if (d.size() != dec_ids[0].size()) fail(ErrorKind::Usage, "--decoder-input-ids lists must have equal lengths");

  if (load_config(model_dir).task == Blip2Task::Retrieval)
    return run_retrieval_inspect(model_dir, global_load_options(), pairs.images, pairs.prompts, out_path);
  const auto model = load_model(model_dir);
  const bool causal = model->config().family != LanguageFamily::T5;  // OPT, LLaMA
  if (causal && !dec_ids_arg.empty())
    fail(ErrorKind::Usage,
         "--decoder-input-ids is for T5 models; a decoder-only model's (OPT, LLaMA) logits are those of the prompt "
         "positions");
  const int64_t V = model->config().lm_vocab_size();
  for (const auto& d : dec_ids)
    for (int32_t id : d)
      if (id >= V) fail(ErrorKind::Usage, "--decoder-input-ids: id " + std::to_string(id) + " is outside the vocabulary");
  const Encoded enc = model->encode(load_pixels(*model, pairs.images), model->tokenize(pairs.prompts));
  Tensor logits;
  if (causal) {
    logits = model->prompt_logits(enc);
  } else {
    auto dec = model->start_decoder(enc);
    const int64_t steps = static_cast<int64_t>(dec_ids[0].size());
    logits = Tensor({static_cast<int64_t>(B), steps, V});
    for (int64_t t = 0; t < steps; ++t) {
      std::vector<int32_t> tok(B);
      for (size_t b = 0; b < B; ++b) tok[b] = dec_ids[b][t];
      const Tensor l = on_host(dec->step(tok));
      for (size_t b = 0; b < B; ++b)
        std::copy(l.ptr() + b * V, l.ptr() + (b + 1) * V, logits.ptr() + (b * steps + t) * V);
    }
  }
  const Tensor vision = on_host(enc.vision_last_hidden_state), qformer = on_host(enc.qformer_last_hidden_state),
               projection = on_host(enc.language_projection), encoder = on_host(enc.encoder_last_hidden_state);
  std::vector<NamedTensor> out = {
      {"vision_last_hidden_state", &vision}, {"qformer_last_hidden_state", &qformer}, {"language_projection", &projection}};
  if (!causal) out.push_back({"encoder_last_hidden_state", &encoder});
  out.push_back({"logits", &logits});
  // InstructBLIP: the Q-Former's BERT ids of each prompt, as float32 [B, L] (right-padded with [PAD]).
  Tensor qformer_ids;
  if (enc.qformer_input.batch > 0) {
    qformer_ids = Tensor({enc.qformer_input.batch, enc.qformer_input.length});
    std::copy(enc.qformer_input.ids.begin(), enc.qformer_input.ids.end(), qformer_ids.data.begin());
    out.push_back({"qformer_input_ids", &qformer_ids});
  }
  write_safetensors(out_path, out);
  std::cerr << "wrote " << out_path << "\n";
  return 0;
}

// CLI11 reports a mistyped command as "A subcommand is required"; name the word and the choices instead.
// The first argument that is neither an option nor a global option's value is the command.
void reject_unknown_command(const CLI::App& app, int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--weights" || a == "--vision-weights" || a == "--qformer-weights" || a == "--lm-weights" ||
        a == "--precision" || a == "--int4-group" || a == "--threads" || a == "--device") {
      ++i;  // its value
      continue;
    }
    if (!a.empty() && a[0] == '-') continue;
    std::string names;
    for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; })) {
      if (sub->get_name() == a) return;
      names += (names.empty() ? "" : ", ") + sub->get_name();
    }
    fail(ErrorKind::Usage, "unknown command '" + a + "' (commands: " + names + "; see --help)");
  }
}

// Every image allocates and frees the same activation buffers (up to a few MiB each, per layer). glibc's
// defaults hand that memory back to the kernel (trimming the heap's top, or unmapping blocks over its moving
// mmap threshold) and fault it back in on the next allocation: measured 10–12 % of the vision encoder's time in
// `blip2 caption` (docs/PERFORMANCE.md, the fifth captioning run). So the heap keeps what it frees; blocks of 32 MiB
// and more (weights while they are converted at load) are still mapped on their own and returned at once.
void keep_freed_memory() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, INT_MAX);
#endif
}

}  // namespace

int main(int argc, char** argv) {
  keep_freed_memory();
  CLI::App app{"blip2: BLIP-2 (EVA ViT-g -> Q-Former -> Flan-T5 or OPT) image captioning and visual question "
               "answering on the CPU or an NVIDIA GPU (--device cuda).\nA model directory is a Hugging Face checkpoint as downloaded "
               "(config.json, *.safetensors, and spiece.model for T5 or vocab.json + merges.txt / tokenizer.json "
               "for OPT)."};
  app.footer(kExitCodes);
  app.require_subcommand(1);
  app.add_option("--weights", g_weights,
                 "Keep linear-layer weights as: stored (the file's bytes, no copy), f32, f16, bf16, int8 (per-row "
                 "scales) or int4 (group scales); converted once at load")
      ->capture_default_str();
  app.add_option("--vision-weights", g_vision_weights,
                 "The vision encoder's weights, in the same formats; default: as --weights, except int8 for int4 "
                 "(the ViT is bound by arithmetic, where int8 runs faster than int4 and is more accurate)");
  app.add_option("--qformer-weights", g_qformer_weights,
                 "The Q-Former's (and the language projection's) weights, same formats; default: as --weights");
  app.add_option("--lm-weights", g_lm_weights, "The language model's weights, same formats; default: as --weights");
  app.add_option("--precision", g_load.precision,
                 "A mix of tower formats that the options above override: lavis (as LAVIS runs the paper: ViT "
                 "f16, Q-Former f32, language model bf16 for T5 and f16 for OPT)");
  app.add_option("--int4-group", g_load.int4_group, "int4: weights per scale along the input (32, 64 or 128)")
      ->check(CLI::IsMember({32, 64, 128}))
      ->capture_default_str();
  app.add_option("--threads", g_load.threads, "Worker threads (kernels and OpenBLAS); 0 = all cores")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--device", g_device,
                 "Where the model runs: cpu, cuda (GPU 0), cuda:N (needs a build with -DBLIP2_CUDA=ON; weights "
                 "f32, f16, bf16 or int8), or emulated (the device code path on the CPU, for testing)")
      ->capture_default_str();

  GenerateArgs gen;
  Pairs pairs;
  auto* g = app.add_subcommand("generate", "Generate text for (image, prompt) pairs, run together as one batch");
  add_generate_options(g, gen);
  g->add_option("--image", pairs.images, "Image file (PNG or JPEG); repeat, one per --prompt")->required();
  g->add_option("--prompt", pairs.prompts, "Prompt for the image at the same position; \"\" for a caption")->required();
  g->footer(
      "Example: blip2 generate --image cat.png --prompt \"Question: what is this? Answer:\" --json\n"
      "JSON: {\"results\":[{\"image\":..,\"prompt\":..,\"sequences\":[{\"ids\":[..],\"text\":..,\"score\":..}]}]}\n"
      "ids exclude the decoder start token and end with the first end-of-sequence token.");

  GenerateArgs cap;
  std::vector<std::string> cap_inputs;
  std::string cap_prompt;
  CaptionDatasetArgs cap_set;
  auto* c = app.add_subcommand("caption", "Caption an image, or a dataset: image files, directories, @LISTs, .tar shards");
  add_generate_options(c, cap);
  c->add_option("INPUT", cap_inputs,
                "Image file, directory (recursive), @LIST (one path per line) or WebDataset .tar; several allowed")
      ->required();
  c->add_option("--prompt", cap_prompt, "Text the caption continues, e.g. \"a photo of\" (default: empty)");
  add_caption_dataset_options(c, cap_set);  // tools/cmd_caption.cpp

  GenerateArgs ask;
  std::string ask_image, question;
  auto* a = app.add_subcommand("ask", "Answer a question about one image (prompt \"Question: Q Answer:\")");
  add_generate_options(a, ask);
  a->add_option("IMAGE", ask_image, "Image file")->required();
  a->add_option("QUESTION", question, "The question")->required();

  GenerateArgs chat;
  std::string chat_image;
  auto* ch = app.add_subcommand("chat", "Talk about one image: one question per line from the terminal or a pipe");
  add_generate_options(ch, chat);
  ch->add_option("IMAGE", chat_image, "Image file")->required();
  ch->footer(
      "Each prompt holds the conversation so far: \"Question: Q1 Answer: A1. Question: Q2 Answer:\", dropping the\n"
      "oldest turns when it would exceed the model's prompt limit. The image is encoded once per conversation.\n"
      "Commands: /reset forgets the conversation, /image PATH switches to another image (and forgets), /quit ends.\n"
      "--json prints one object per answer: turn, image, question, prompt, sequences, image_encodings.");

  std::string ins_model = default_model_dir(), ins_out;
  Pairs ins_pairs;
  std::vector<std::string> ins_dec;
  auto* in = app.add_subcommand("inspect", "Write every stage's tensors to a safetensors file, to compare with "
                                           "Hugging Face transformers");
  in->add_option("--model", ins_model, "Model directory")->capture_default_str();
  in->add_option("--image", ins_pairs.images, "Image file; repeat, one per --prompt")->required();
  in->add_option("--prompt", ins_pairs.prompts, "Prompt for the image at the same position")->required();
  in->add_option("--decoder-input-ids", ins_dec,
                 "Comma-separated decoder input ids for teacher-forced logits (default 0); once, or once per pair");
  in->add_option("--out", ins_out, "Output .safetensors file")->required();
  in->footer(
      "Tensors (float32): vision_last_hidden_state [B,T_img,Dv], qformer_last_hidden_state [B,Q,Dq],\n"
      "language_projection [B,Q,d], then for T5 encoder_last_hidden_state [B,Q+L,d] and logits\n"
      "[B,len(ids),vocab] (teacher-forced decoder), for OPT and LLaMA logits [B,Q+L,vocab] (every prompt\n"
      "position); for InstructBLIP also qformer_input_ids [B,L] (the prompts' BERT ids, as float32).\n"
      "A retrieval checkpoint (--prompt is the text): vision_last_hidden_state, image_embeds over the distinct\n"
      "images, text_embeds and qformer_text_hidden_state over the distinct texts, itm_logits, itm_probability and\n"
      "qformer_itm_hidden_state per pair, itc_logits_per_image [images, texts].");

  add_make_random_command(app);  // runs its work inside parse(), hence one try block for both
  add_bench_command(app, global_load_options);        // likewise
  add_quantize_command(app, global_load_options);     // likewise
  add_serve_command(
      app, load_model, [](const std::string& dir) { return std::make_unique<RetrievalModel>(dir, global_load_options()); },
      default_model_dir());
  const auto run_retrieval = add_retrieval_commands(app, global_load_options, default_model_dir());

  try {
    reject_unknown_command(app, argc, argv);
    app.parse(argc, argv);
    if (*g) return run_generate(gen, pairs, true);
    if (*c && caption_dataset_mode(cap_set, cap_inputs))
      return run_caption_dataset(cap_set, cap_inputs, cap_prompt, resolve_options(cap), cap.json, cap.model, load_model);
    if (*c) return run_generate(cap, {{cap_inputs[0]}, {cap_prompt}});
    if (*a) return run_generate(ask, {{ask_image}, {"Question: " + question + " Answer:"}});
    if (*ch) return run_chat(chat, chat_image);
    if (*in) return run_inspect(ins_model, ins_pairs, ins_dec, ins_out);
    if (const int rc = run_retrieval(); rc >= 0) return rc;
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : static_cast<int>(ErrorKind::Usage);
  } catch (const Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return static_cast<int>(e.kind());
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return static_cast<int>(ErrorKind::Internal);
  }
  return 0;
}
