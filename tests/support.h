// Helpers the fixture tests share: reading the reference files and comparing tensors the way the fixture
// README measures agreement.
#pragma once
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "generate/generate.h"
#include "image/image.h"
#include "io/safetensors.h"
#include "model/blip2.h"

namespace blip2::test {

inline const std::string kFixtures = BLIP2_FIXTURES_DIR;

inline nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// ‖got − want‖ / ‖want‖ and the largest absolute difference of one element.
struct Diff {
  double rel = 0, max_abs = 0;
};

inline Diff compare(const Tensor& got_any, const Tensor& want_any) {
  const Tensor got = on_host(got_any), want = on_host(want_any);  // from whichever device they are on
  double num = 0, den = 0, mx = 0;
  for (int64_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got.data[i]) - want.data[i];
    num += d * d;
    den += static_cast<double>(want.data[i]) * want.data[i];
    mx = std::max(mx, std::abs(d));
  }
  return {std::sqrt(num / std::max(den, 1e-30)), mx};
}

// Tolerances from the fixture README: float32 on the CPU agrees to about 1e-5 relative, 1e-4 absolute.
constexpr double kMaxRel = 1e-5, kMaxAbs = 1e-4;

// Hugging Face generate() keyword arguments of a fixture setting -> options (HF's defaults for the rest).
inline GenerationOptions options_from(const nlohmann::json& kwargs) {
  GenerationOptions o;
  o.max_new_tokens = kwargs.at("max_new_tokens").get<int>();
  o.num_beams = kwargs.value("num_beams", 1);
  o.do_sample = kwargs.value("do_sample", false);
  o.length_penalty = kwargs.value("length_penalty", 1.0);
  o.repetition_penalty = kwargs.value("repetition_penalty", 1.0);
  o.no_repeat_ngram_size = kwargs.value("no_repeat_ngram_size", 0);
  o.min_new_tokens = kwargs.value("min_new_tokens", 0);
  o.num_return_sequences = kwargs.value("num_return_sequences", 1);
  return o;
}

// Teacher-forced logits [B, T, V] on the host for per-item decoder ids, through the decoder's steps (the code
// path generation uses).
inline Tensor forced_logits(const Blip2Model& m, const Encoded& e, const std::vector<std::vector<int32_t>>& ids) {
  auto dec = m.start_decoder(e);
  const int64_t B = static_cast<int64_t>(ids.size()), T = static_cast<int64_t>(ids[0].size()), V = dec->vocab_size();
  Tensor out({B, T, V});
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> tok;
    for (const auto& row : ids) tok.push_back(row[t]);
    const Tensor l = on_host(dec->step(tok));
    for (int64_t b = 0; b < B; ++b) std::copy(l.ptr() + b * V, l.ptr() + (b + 1) * V, out.ptr() + (b * T + t) * V);
  }
  return out;
}

// The pixel batch of fixture images (tests/fixtures/images/NAME), preprocessed at `size`.
inline Tensor fixture_pixels(const nlohmann::json& names, int size) {
  std::vector<RgbImage> imgs;
  for (const auto& n : names) imgs.push_back(load_image(kFixtures + "/images/" + n.get<std::string>()));
  return preprocess_images(imgs, size);
}

// Normal(0, std) values, reproducible from the seed.
inline Tensor random_tensor(const Shape& s, uint32_t seed, float std = 0.1f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, std);
  Tensor t(s);
  for (float& v : t.data) v = n(rng);
  return t;
}

// A writable copy of a model directory in a temporary folder: its tensors as float32 and its config as
// JSON, to edit, then written back by load().
struct Variant {
  std::filesystem::path dir;
  std::map<std::string, Tensor> tensors;
  nlohmann::json config;

  Variant(const std::string& name, const std::string& source) {
    namespace fs = std::filesystem;
    dir = fs::temp_directory_path() / ("blip2-variant-" + name + "-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
    for (const auto& e : fs::directory_iterator(source))
      if (e.path().filename() != "model.safetensors")  // folders too (InstructBLIP's qformer_tokenizer/)
        fs::copy(e.path(), dir / e.path().filename(), fs::copy_options::recursive);
    const SafetensorsFile f(source + "/model.safetensors");
    for (const auto& [n, entry] : f.entries()) tensors.emplace(n, f.tensor(n));
    config = read_json((dir / "config.json").string());
  }
  ~Variant() { std::filesystem::remove_all(dir); }
  Variant(const Variant&) = delete;
  Variant& operator=(const Variant&) = delete;

  // Writes config and weights; the directory then loads.
  void save() const {
    std::ofstream(dir / "config.json") << config.dump(2);
    std::vector<NamedTensor> list;
    for (const auto& [n, t] : tensors) list.push_back({n, &t});
    write_safetensors((dir / "model.safetensors").string(), list);
  }
  Blip2Model load() const {
    save();
    return Blip2Model(dir.string());
  }
};

}  // namespace blip2::test
