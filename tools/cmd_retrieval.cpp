// The image–text retrieval commands (a Blip2ForImageTextRetrieval checkpoint, docs/RETRIEVAL.md):
//   blip2 match IMAGE TEXT...   ITM probability and ITC similarity of the image with each text
//   blip2 embed INPUT...        image (or, with --text, text) embeddings of many inputs, batched
// and `blip2 inspect` for such a checkpoint (the fixture's eight tensors).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "batch/caption_run.h"
#include "batch/inputs.h"
#include "commands.h"
#include "core/error.h"
#include "image/image.h"
#include "io/safetensors.h"
#include "model/retrieval.h"
#include "progress.h"

using namespace blip2;
using nlohmann::ordered_json;

namespace {

std::string dump(const ordered_json& j) { return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

ordered_json rows_json(const float* x, int64_t n) { return ordered_json(std::vector<float>(x, x + n)); }

// One embedding as JSON: a text's [E] vector, an image's [Q][E] (one vector per query).
ordered_json embedding_json(const Tensor& t, int64_t item) {
  const int64_t per = t.size() / t.dim(0), E = t.last();
  if (t.shape.size() == 2) return rows_json(t.ptr() + item * per, E);
  ordered_json rows = ordered_json::array();
  for (int64_t q = 0; q < per / E; ++q) rows.push_back(rows_json(t.ptr() + item * per + q * E, E));
  return rows;
}

// A float32 .npy file (format 1.0: magic, header dict padded to a multiple of 64 bytes, data).
void write_npy(const std::string& path, const Shape& shape, const std::vector<float>& data) {
  std::string dims;
  for (int64_t d : shape) dims += (dims.empty() ? "" : ", ") + std::to_string(d);
  if (shape.size() == 1) dims += ",";  // a 1-tuple: "(3,)"
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail(ErrorKind::Usage, "cannot write " + path);
  const uint16_t len = static_cast<uint16_t>(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  const char le[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  out.write(le, 2);
  out << header;
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(float)));
  if (!out) fail(ErrorKind::Input, "error writing " + path);
}

std::unique_ptr<RetrievalModel> load_retrieval(const std::string& dir, const LoadOptions& options) {
  return std::make_unique<RetrievalModel>(dir, options);
}

Tensor pixels_of(const RetrievalModel& m, const std::vector<std::string>& paths) {
  std::vector<RgbImage> imgs;
  for (const auto& p : paths) imgs.push_back(load_image(p));
  return preprocess_images(imgs, m.config().vision.image_size);
}

int run_match(const std::string& model_dir, const LoadOptions& lo, const std::string& image,
              const std::vector<std::string>& texts, bool json) {
  const auto model = load_retrieval(model_dir, lo);
  const TokenBatch tokens = model->tokenize(texts);
  const Tensor vision = model->encode_vision(pixels_of(*model, {image}));
  const MatchScores itm = model->match(gather_items(vision, std::vector<int64_t>(texts.size(), 0)), tokens);
  const Tensor itc = RetrievalModel::similarity(model->image_embeds(vision), model->text_embeds(tokens).text_embeds);
  if (json) {
    ordered_json j;
    j["image"] = image;
    j["results"] = ordered_json::array();
    for (size_t t = 0; t < texts.size(); ++t)
      j["results"].push_back({{"text", texts[t]},
                              {"itm_probability", itm.itm_probability[t]},
                              {"itm_logits", rows_json(itm.itm_logits.ptr() + t * 2, 2)},
                              {"itc_similarity", itc.ptr()[t]}});
    std::cout << dump(j) << "\n";
    return 0;
  }
  std::printf("%s\n%8s  %8s  %s\n", image.c_str(), "match", "cosine", "text");
  for (size_t t = 0; t < texts.size(); ++t)
    std::printf("%8.4f  %8.4f  %s\n", itm.itm_probability[t], itc.ptr()[t], texts[t].c_str());
  return 0;
}

struct EmbedArgs {
  std::string model, output, format;
  std::vector<std::string> inputs;
  bool text = false;
  int batch = 8;
  double progress_interval = 10;
};

// Where embeddings go: jsonl records (a file or standard output) as they are made, or one .npy /
// .safetensors array of the successful inputs in order (their keys in OUTPUT.keys.jsonl) at the end.
class EmbeddingSink {
 public:
  EmbeddingSink(const EmbedArgs& a, const Shape& item_shape) : item_shape_(item_shape) {
    format_ = a.format;
    if (format_.empty()) {
      const std::string ext = std::filesystem::path(a.output).extension().string();
      format_ = ext == ".npy" ? "npy" : ext == ".safetensors" ? "safetensors" : "jsonl";
    }
    if (format_ != "jsonl" && a.output.empty()) fail(ErrorKind::Usage, "--format " + format_ + " needs --output FILE");
    path_ = a.output;
    if (format_ == "jsonl" && !path_.empty() && path_ != "-") {
      file_.open(path_, std::ios::trunc);
      if (!file_) fail(ErrorKind::Usage, "cannot write " + path_);
    }
  }
  void add(const std::string& key, const Tensor& embeds, int64_t item, bool text) {
    if (format_ == "jsonl") {
      ordered_json j;
      j[text ? "text" : "input"] = key;
      j["embedding"] = embedding_json(embeds, item);
      (file_.is_open() ? static_cast<std::ostream&>(file_) : std::cout) << dump(j) << "\n";
      return;
    }
    const int64_t per = embeds.size() / embeds.dim(0);
    rows_.insert(rows_.end(), embeds.ptr() + item * per, embeds.ptr() + (item + 1) * per);
    keys_.push_back(key);
  }
  void fail_item(const std::string& key, const std::string& why) {
    if (format_ != "jsonl") return;  // the arrays hold the successful inputs; failures are in the summary
    ordered_json j;
    j["input"] = key;
    j["error"] = why;
    (file_.is_open() ? static_cast<std::ostream&>(file_) : std::cout) << dump(j) << "\n";
  }
  void finish() {
    if (format_ == "jsonl") {
      std::cout << std::flush;
      return;
    }
    Shape shape{static_cast<int64_t>(keys_.size())};
    shape.insert(shape.end(), item_shape_.begin(), item_shape_.end());
    if (format_ == "npy") {
      write_npy(path_, shape, rows_);
    } else {
      Tensor t(shape);
      std::copy(rows_.begin(), rows_.end(), t.ptr());
      write_safetensors(path_, {{"embeddings", &t}});
    }
    const std::string keys_path = path_ + ".keys.jsonl";
    std::ofstream k(keys_path, std::ios::trunc);
    for (const auto& key : keys_) k << dump(ordered_json(key)) << "\n";
    if (!k) fail(ErrorKind::Input, "error writing " + keys_path);
  }

 private:
  Shape item_shape_;
  std::string format_, path_;
  std::ofstream file_;
  std::vector<float> rows_;
  std::vector<std::string> keys_;
};

// Texts of --text: each INPUT, or each line of an @FILE.
std::vector<std::string> expand_texts(const std::vector<std::string>& inputs) {
  std::vector<std::string> texts;
  for (const auto& in : inputs) {
    if (in.empty() || in[0] != '@') {
      texts.push_back(in);
      continue;
    }
    std::ifstream f(in.substr(1));
    if (!f) fail(ErrorKind::Input, "cannot read the text list " + in.substr(1));
    for (std::string line; std::getline(f, line);) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (!line.empty()) texts.push_back(line);
    }
  }
  return texts;
}

int run_embed(const EmbedArgs& a, const LoadOptions& lo) {
  std::vector<batch::InputItem> items;
  std::vector<std::string> texts;
  if (a.text) texts = expand_texts(a.inputs);
  else items = batch::expand_inputs(a.inputs);
  const size_t total = a.text ? texts.size() : items.size();
  const auto model = load_retrieval(a.model, lo);
  const int64_t E = model->embedding_size();
  EmbeddingSink sink(a, a.text ? Shape{E} : Shape{model->config().num_query_tokens, E});
  tools::ProgressPrinter printer(a.progress_interval);
  const auto start = std::chrono::steady_clock::now();
  size_t done = 0, failed = 0;
  std::vector<std::pair<std::string, std::string>> failures;
  const auto progress = [&] {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double rate = s > 0 ? static_cast<double>(done) / s : 0;
    char buf[160];
    std::snprintf(buf, sizeof buf, "%zu/%zu %s, %.2f/s, ETA %s", done, total, a.text ? "texts" : "images", rate,
                  tools::duration_text(rate > 0 ? static_cast<double>(total - done) / rate : -1).c_str());
    printer(done >= total, std::string(buf) + (failed ? ", " + std::to_string(failed) + " failed" : ""));
  };
  for (size_t first = 0; first < total; first += static_cast<size_t>(a.batch)) {
    const size_t last = std::min(total, first + static_cast<size_t>(a.batch));
    if (a.text) {
      const std::vector<std::string> part(texts.begin() + first, texts.begin() + last);
      const Tensor e = model->text_embeds(model->tokenize(part)).text_embeds;
      for (size_t i = 0; i < part.size(); ++i) sink.add(part[i], e, static_cast<int64_t>(i), true);
    } else {
      std::vector<RgbImage> imgs;
      std::vector<std::string> keys;
      for (size_t i = first; i < last; ++i) {
        try {
          const std::string bytes = batch::read_item(items[i]);
          imgs.push_back(decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), items[i].name()));
          keys.push_back(items[i].key);
        } catch (const Error& e) {
          if (e.kind() != ErrorKind::Input) throw;
          ++failed;
          failures.emplace_back(items[i].key, e.what());
          sink.fail_item(items[i].key, e.what());
        }
      }
      if (!imgs.empty()) {
        const Tensor e =
            model->image_embeds(model->encode_vision(preprocess_images(imgs, model->config().vision.image_size)));
        for (size_t i = 0; i < keys.size(); ++i) sink.add(keys[i], e, static_cast<int64_t>(i), false);
      }
    }
    done = last;
    progress();
  }
  sink.finish();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "embedded %zu %s (%zu failed) in %.1f s\n", done - failed, a.text ? "texts" : "images", failed, s);
  for (const auto& [key, why] : failures) std::fprintf(stderr, "failed: %s: %s\n", key.c_str(), why.c_str());
  return failed ? static_cast<int>(ErrorKind::Input) : 0;
}

}  // namespace

std::function<int()> add_retrieval_commands(CLI::App& app, std::function<LoadOptions()> load_options,
                                            std::string default_model) {
  struct MatchArgs {
    std::string model, image;
    std::vector<std::string> texts;
    bool json = false;
  };
  auto m = std::make_shared<MatchArgs>();
  m->model = default_model;
  auto* mc = app.add_subcommand("match", "Image-text matching (a retrieval checkpoint): the ITM probability and "
                                         "the ITC cosine similarity of an image with each text");
  mc->add_option("--model", m->model, "Retrieval model directory (Blip2ForImageTextRetrieval)")->capture_default_str();
  mc->add_option("IMAGE", m->image, "Image file")->required();
  mc->add_option("TEXT", m->texts, "Texts to score against the image")->required();
  mc->add_flag("--json", m->json, "One JSON object: {image, results: [{text, itm_probability, itm_logits, itc_similarity}]}");
  mc->footer("match: softmax of the ITM head (queries and text through the Q-Former together), column \"match\".\n"
             "cosine: the largest cosine between the image's query embeddings and the text's [CLS] embedding (ITC).");

  auto e = std::make_shared<EmbedArgs>();
  e->model = default_model;
  auto* ec = app.add_subcommand("embed", "Embeddings of many images (or texts, --text) with a retrieval checkpoint");
  ec->add_option("--model", e->model, "Retrieval model directory (Blip2ForImageTextRetrieval)")->capture_default_str();
  ec->add_option("INPUT", e->inputs,
                 "Images: files, directories (recursive), @LISTs, WebDataset .tar shards (as blip2 caption); with "
                 "--text: texts, or @FILE with one text per line")
      ->required();
  ec->add_flag("--text", e->text, "The inputs are texts: one [CLS] embedding each");
  ec->add_option("--output", e->output, "File to write (default: jsonl on standard output)");
  ec->add_option("--format", e->format, "jsonl, npy or safetensors (default: from --output's extension, else jsonl)")
      ->check(CLI::IsMember({"jsonl", "npy", "safetensors"}));
  ec->add_option("--batch", e->batch, "Inputs per forward pass")->check(CLI::Range(1, 256))->capture_default_str();
  ec->add_option("--progress-interval", e->progress_interval, "Seconds between progress lines when stderr is not a terminal")
      ->check(CLI::PositiveNumber)->capture_default_str();
  ec->footer("Each image gives num_query_tokens unit vectors [Q, E] (E = image_text_hidden_size, 256 for\n"
             "blip2-itm-vit-g); each text one unit vector [E]. similarity(image, text) = max over the image's rows\n"
             "of row . text. jsonl: {\"input\"|\"text\", \"embedding\"} per input ({\"input\", \"error\"} for an\n"
             "unreadable image); npy / safetensors (tensor \"embeddings\"): [N, Q, E] or [N, E] over the inputs\n"
             "that succeeded, their names in OUTPUT.keys.jsonl. Exit status 4 when an image failed.");
  return [m, e, mc, ec, load_options]() -> int {
    if (*mc) return run_match(m->model, load_options(), m->image, m->texts, m->json);
    if (*ec) return run_embed(*e, load_options());
    return -1;
  };
}

int run_retrieval_inspect(const std::string& model_dir, const LoadOptions& lo, const std::vector<std::string>& images,
                          const std::vector<std::string>& texts, const std::string& out_path) {
  if (images.empty() || images.size() != texts.size())
    fail(ErrorKind::Usage, "inspect needs one --prompt (the text) per --image");
  // Pairs as given; the image and text sides over the distinct images and texts, in order of appearance.
  std::vector<std::string> uimages, utexts;
  std::vector<int64_t> pair_image, pair_text;
  const auto index_of = [](std::vector<std::string>& v, const std::string& s) {
    const auto it = std::find(v.begin(), v.end(), s);
    if (it != v.end()) return static_cast<int64_t>(it - v.begin());
    v.push_back(s);
    return static_cast<int64_t>(v.size() - 1);
  };
  for (size_t p = 0; p < images.size(); ++p) {
    pair_image.push_back(index_of(uimages, images[p]));
    pair_text.push_back(index_of(utexts, texts[p]));
  }
  const auto model = load_retrieval(model_dir, lo);
  const Tensor vision = model->encode_vision(pixels_of(*model, uimages));
  std::vector<std::string> pair_texts;
  for (int64_t t : pair_text) pair_texts.push_back(utexts[static_cast<size_t>(t)]);
  const MatchScores itm = model->match(gather_items(vision, pair_image), model->tokenize(pair_texts));
  const Tensor image_embeds = model->image_embeds(vision);
  const TextEmbeddings te = model->text_embeds(model->tokenize(utexts));
  const Tensor itc = RetrievalModel::similarity(image_embeds, te.text_embeds);
  Tensor prob({static_cast<int64_t>(itm.itm_probability.size())});
  std::copy(itm.itm_probability.begin(), itm.itm_probability.end(), prob.ptr());
  const Tensor v = on_host(vision), itm_h = on_host(itm.qformer_itm_hidden_state),
               text_h = on_host(te.qformer_text_hidden_state);
  write_safetensors(out_path, {{"vision_last_hidden_state", &v},
                               {"itm_logits", &itm.itm_logits},
                               {"itm_probability", &prob},
                               {"qformer_itm_hidden_state", &itm_h},
                               {"image_embeds", &image_embeds},
                               {"text_embeds", &te.text_embeds},
                               {"qformer_text_hidden_state", &text_h},
                               {"itc_logits_per_image", &itc}});
  std::cerr << "wrote " << out_path << "\n";
  return 0;
}
