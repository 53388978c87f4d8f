// blip2: the command-line tool. Thin: parse options, call the library, print. Errors surface here once,
// as one message on stderr and an exit status that says what kind of error it was.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "generate/generate.h"
#include "image/image.h"
#include "io/safetensors.h"
#include "model/blip2.h"

using namespace blip2;

namespace {

constexpr const char* kExitCodes =
    "Exit status: 0 success, 1 internal error, 2 bad usage or options, 3 bad model directory\n"
    "(config, weights, tokenizer), 4 bad input (image, prompt).";

std::string default_model_dir() {
  const char* env = std::getenv("BLIP2_MODEL");
  return (env && *env) ? env : BLIP2_BUNDLED_MODEL_DIR;
}

std::unique_ptr<Blip2Model> load_model(const std::string& dir) {
  const bool tty = isatty(STDERR_FILENO);
  auto progress = [&](int i, int n, const std::string& path) {
    if (tty) std::fprintf(stderr, "\rloading %s (%d/%d)%s", path.c_str(), i, n, i == n ? "\n" : "");
  };
  return std::make_unique<Blip2Model>(dir, progress);
}

struct Pairs {
  std::vector<std::string> images, prompts;
};

Tensor load_pixels(const Blip2Model& model, const std::vector<std::string>& paths) {
  std::vector<RgbImage> imgs;
  for (const auto& p : paths) imgs.push_back(load_image(p));
  return preprocess_images(imgs, model.config().vision.image_size);
}

// Options shared by generate, caption and ask.
struct GenerateArgs {
  std::string model = default_model_dir();
  GenerationOptions options;
  bool json = false;
};

void add_generate_options(CLI::App* cmd, GenerateArgs& a) {
  cmd->add_option("--model", a.model, "Model directory (Hugging Face layout); default $BLIP2_MODEL or the bundled tiny model")
      ->capture_default_str();
  cmd->add_option("--max-new-tokens", a.options.max_new_tokens, "Most tokens to generate, end-of-sequence included")
      ->capture_default_str();
  cmd->add_flag("--json", a.json, "Print one JSON object with ids, text and score of every result");
}

int run_generate(const GenerateArgs& a, const Pairs& pairs) {
  if (pairs.images.empty()) fail(ErrorKind::Usage, "no (image, prompt) pairs given: pass --image and --prompt");
  if (pairs.images.size() != pairs.prompts.size())
    fail(ErrorKind::Usage, "each --image needs one --prompt (got " + std::to_string(pairs.images.size()) +
                               " images and " + std::to_string(pairs.prompts.size()) + " prompts)");
  validate(a.options);
  const auto model = load_model(a.model);
  const PromptBatch prompts = model->tokenize(pairs.prompts);
  const Tensor pixels = load_pixels(*model, pairs.images);
  const Encoded enc = model->encode(pixels, prompts);
  const T5Config& tc = model->config().text;
  const auto results = generate([&](int expand) { return model->start_decoder(enc, expand); },
                                static_cast<int>(prompts.batch), a.options,
                                {tc.decoder_start_token_id, tc.eos_token_id, tc.pad_token_id});
  if (a.json) {
    nlohmann::ordered_json out;
    out["results"] = nlohmann::ordered_json::array();
    for (size_t i = 0; i < results.size(); ++i) {
      nlohmann::ordered_json r;
      r["image"] = pairs.images[i];
      r["prompt"] = pairs.prompts[i];
      r["sequences"] = nlohmann::ordered_json::array();
      for (const auto& s : results[i])
        r["sequences"].push_back({{"ids", s.ids}, {"text", model->tokenizer().decode(s.ids)}, {"score", s.score}});
      out["results"].push_back(r);
    }
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  } else {
    for (const auto& r : results) std::cout << model->tokenizer().decode(r[0].ids) << "\n";
  }
  return 0;
}

std::vector<int32_t> parse_ids(const std::string& s) {
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

// Writes every stage's tensor, by the reference's names, with logits teacher-forced on the decoder ids.
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

  const auto model = load_model(model_dir);
  const int64_t V = model->config().text.vocab_size;
  for (const auto& d : dec_ids)
    for (int32_t id : d)
      if (id >= V) fail(ErrorKind::Usage, "--decoder-input-ids: id " + std::to_string(id) + " is outside the vocabulary");
  const Encoded enc = model->encode(load_pixels(*model, pairs.images), model->tokenize(pairs.prompts));
  auto dec = model->start_decoder(enc);
  const int64_t steps = static_cast<int64_t>(dec_ids[0].size());
  Tensor logits({static_cast<int64_t>(B), steps, V});
  for (int64_t t = 0; t < steps; ++t) {
    std::vector<int32_t> tok(B);
    for (size_t b = 0; b < B; ++b) tok[b] = dec_ids[b][t];
    const Tensor l = dec->step(tok);
    for (size_t b = 0; b < B; ++b)
      std::copy(l.ptr() + b * V, l.ptr() + (b + 1) * V, logits.ptr() + (b * steps + t) * V);
  }
  write_safetensors(out_path, {{"vision_last_hidden_state", &enc.vision_last_hidden_state},
                               {"qformer_last_hidden_state", &enc.qformer_last_hidden_state},
                               {"language_projection", &enc.language_projection},
                               {"encoder_last_hidden_state", &enc.encoder_last_hidden_state},
                               {"logits", &logits}});
  std::cerr << "wrote " << out_path << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"blip2: BLIP-2 (EVA ViT-g -> Q-Former -> Flan-T5) image captioning and visual question "
               "answering on the CPU.\nA model directory is a Hugging Face checkpoint as downloaded "
               "(config.json, *.safetensors, spiece.model)."};
  app.footer(kExitCodes);
  app.require_subcommand(1);

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
  std::string cap_image;
  auto* c = app.add_subcommand("caption", "Caption one image (the prompt is empty)");
  add_generate_options(c, cap);
  c->add_option("IMAGE", cap_image, "Image file")->required();

  GenerateArgs ask;
  std::string ask_image, question;
  auto* a = app.add_subcommand("ask", "Answer a question about one image (prompt \"Question: Q Answer:\")");
  add_generate_options(a, ask);
  a->add_option("IMAGE", ask_image, "Image file")->required();
  a->add_option("QUESTION", question, "The question")->required();

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
      "language_projection [B,Q,d], encoder_last_hidden_state [B,Q+L,d], logits [B,len(ids),vocab].");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : static_cast<int>(ErrorKind::Usage);
  }

  try {
    if (*g) return run_generate(gen, pairs);
    if (*c) return run_generate(cap, {{cap_image}, {""}});
    if (*a) return run_generate(ask, {{ask_image}, {"Question: " + question + " Answer:"}});
    if (*in) return run_inspect(ins_model, ins_pairs, ins_dec, ins_out);
  } catch (const Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return static_cast<int>(e.kind());
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return static_cast<int>(ErrorKind::Internal);
  }
  return 0;
}
