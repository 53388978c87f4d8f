// Random-weight checkpoints (`blip2 make-random`): the float32 -> F16/BF16 conversions and the streaming
// safetensors writer underneath, the planned shapes of XL and XXL against the spec's parameter counts
// (planning only: no big weights are written here), and tiny checkpoints written in every dtype, loaded by
// the real loader and run through the whole model.
#include <gtest/gtest.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "commands.h"
#include "core/error.h"
#include "image/image.h"
#include "io/checkpoint.h"
#include "io/config.h"
#include "io/make_random.h"
#include "io/safetensors.h"
#include "model/blip2.h"
#include "temp_dir.h"

using namespace blip2;
namespace fs = std::filesystem;

namespace {

const std::string kFixtures = BLIP2_FIXTURES_DIR;
const std::string kTinyDir = BLIP2_TINY_T5_DIR;

using test::read_bytes;

// Temporary directories named after this test file.
struct TempDir : test::TempDir {
  TempDir() : test::TempDir("blip2-make-random") {}
};

nlohmann::json read_json(const std::string& path) { return nlohmann::json::parse(read_bytes(path)); }

// Every file of a directory with its bytes.
std::map<std::string, std::string> dir_contents(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out[e.path().filename().string()] = read_bytes(e.path().string());
  return out;
}

template <class F>
ErrorKind error_kind(F&& f, std::string* msg = nullptr) {
  try {
    f();
  } catch (const Error& e) {
    if (msg) *msg = e.what();
    return e.kind();
  }
  ADD_FAILURE() << "no blip2::Error thrown";
  return ErrorKind::Internal;
}

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

bool all_finite(const Tensor& t) {
  for (float v : t.data)
    if (!std::isfinite(v)) return false;
  return true;
}
double rms(const Tensor& t) {
  double s = 0;
  for (float v : t.data) s += static_cast<double>(v) * v;
  return std::sqrt(s / std::max<int64_t>(1, t.size()));
}

MakeRandomOptions options(DType dtype, uint64_t seed = 0, uint64_t shard = kDefaultMaxShardBytes) {
  MakeRandomOptions o;
  o.dtype = dtype;
  o.seed = seed;
  o.max_shard_bytes = shard;  // the tokenizer: the bundled tiny model's of the family (the default)
  return o;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Conversions

TEST(HalfConversion, EveryF16ValueRoundTrips) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = f16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f)))) << h;
      continue;
    }
    ASSERT_EQ(f32_to_f16(f), h) << "f16 bits " << h << " value " << f;
  }
}

TEST(HalfConversion, F16RoundsToNearestEvenLikeTheCompiler) {
  // GCC's _Float16 conversion (libgcc) rounds to nearest even with subnormals and overflow: the oracle.
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> any;
  std::uniform_real_distribution<float> expo(-30.0f, 17.0f);
  for (int i = 0; i < 2000000; ++i) {
    float f;
    if (i % 2) f = float_of(any(rng));                                         // any bit pattern
    else f = std::ldexp(std::uniform_real_distribution<float>(1, 2)(rng), static_cast<int>(expo(rng)));  // half's range
    if (std::isnan(f)) continue;
    const _Float16 want = static_cast<_Float16>(f);
    uint16_t wb;
    std::memcpy(&wb, &want, 2);
    ASSERT_EQ(f32_to_f16(f), wb) << "value " << f << " bits " << bits_of(f);
  }
  // Named edges: max, overflow threshold (ties to even -> inf), smallest subnormal and its half (tie -> 0).
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65519.996f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);
  EXPECT_EQ(f32_to_f16(-1e9f), 0xfc00);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 ulp: tie -> even (2)
  EXPECT_EQ(f32_to_f16(std::ldexp(1023.5f, -24)), 0x0400);  // rounds up into the smallest normal
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie -> even
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
}

TEST(HalfConversion, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(float_of(0x3f808000)), 0x3f80);  // tie, even below
  EXPECT_EQ(f32_to_bf16(float_of(0x3f818000)), 0x3f82);  // tie, even above
  EXPECT_EQ(f32_to_bf16(float_of(0x3f808001)), 0x3f81);
  EXPECT_EQ(f32_to_bf16(float_of(0x7f7fffff)), 0x7f80);  // rounds up to inf
  EXPECT_EQ(f32_to_bf16(-INFINITY), 0xff80);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(float_of(0x7f800001)))));  // NaN stays NaN
  EXPECT_EQ(f32_to_bf16(float_of(0x00010000)), 0x0001);  // subnormal
  std::mt19937 rng(3);
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 1000000; ++i) {
    const float f = float_of(any(rng));
    if (!std::isfinite(f) || std::fabs(f) > 3e38f) continue;
    const uint16_t b = f32_to_bf16(f);
    const double got = bf16_to_f32(b);
    // the nearest of the two neighbours, and even on a tie
    const double lo = bf16_to_f32(static_cast<uint16_t>(bits_of(f) >> 16));
    const double hi = bf16_to_f32(static_cast<uint16_t>((bits_of(f) >> 16) + 1));
    const double dl = std::fabs(f - lo), dh = std::fabs(hi - f);
    ASSERT_TRUE(got == lo || got == hi) << f;
    if (dl != dh) ASSERT_EQ(got, dl < dh ? lo : hi) << f;
    else ASSERT_EQ(b & 1, 0) << f;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Streaming writer

TEST(SafetensorsWriter, WritesWhatTheReaderReadsInAnyChunking) {
  TempDir tmp;
  SafetensorsWriter w;
  w.add("a", DType::F32, {3, 5});
  w.add("b", DType::BF16, {7});
  w.add("c", DType::F16, {2, 3});
  w.add("empty", DType::F32, {0, 4});
  w.add("scalar", DType::F16, {});
  w.set_metadata("note", "test");
  EXPECT_EQ(w.data_bytes(), 15u * 4 + 7 * 2 + 6 * 2 + 0 + 2);
  EXPECT_EQ(w.header().size() % 8, 0u);
  const auto value = [](size_t t, int64_t i) { return static_cast<float>(t) * 100.0f + static_cast<float>(i) * 0.37f - 1.0f; };
  std::vector<std::pair<size_t, int64_t>> calls;
  const auto fill = [&](size_t t, int64_t begin, int64_t n, float* out) {
    calls.emplace_back(t, begin);
    for (int64_t i = 0; i < n; ++i) out[i] = value(t, begin + i);
  };
  uint64_t last = 0;
  w.write(tmp.path("big.safetensors"), fill, [&](uint64_t done, uint64_t total) {
    EXPECT_GE(done, last);
    EXPECT_EQ(total, w.data_bytes());
    last = done;
  });
  EXPECT_EQ(last, w.data_bytes());
  calls.clear();
  w.write(tmp.path("small.safetensors"), fill, nullptr, 2);
  EXPECT_EQ(read_bytes(tmp.path("big.safetensors")), read_bytes(tmp.path("small.safetensors")));
  EXPECT_EQ(calls.front(), (std::pair<size_t, int64_t>{0, 0}));
  EXPECT_EQ(calls[1], (std::pair<size_t, int64_t>{0, 2}));  // in order, chunk by chunk
  EXPECT_EQ(fs::file_size(tmp.path("big.safetensors")), w.file_bytes());
  EXPECT_FALSE(fs::exists(tmp.path("big.safetensors.partial")));

  const SafetensorsFile f(tmp.path("small.safetensors"));
  ASSERT_EQ(f.entries().size(), 5u);
  EXPECT_EQ(f.find("b")->dtype, "BF16");
  EXPECT_EQ(f.find("c")->dtype, "F16");
  EXPECT_EQ(f.find("scalar")->shape, Shape{});
  const char* names[] = {"a", "b", "c"};
  for (size_t t = 0; t < 3; ++t) {
    const Tensor x = f.tensor(names[t]);
    for (int64_t i = 0; i < x.size(); ++i) {
      const float want = value(t, i);
      const float conv = t == 0 ? want : t == 1 ? bf16_to_f32(f32_to_bf16(want)) : f16_to_f32(f32_to_f16(want));
      EXPECT_EQ(x.data[i], conv) << names[t] << "[" << i << "]";
    }
  }
  const auto j = nlohmann::json::parse(w.header());
  EXPECT_EQ(j["__metadata__"]["format"], "pt");
  EXPECT_EQ(j["__metadata__"]["note"], "test");
}

TEST(SafetensorsWriter, RejectsBadDeclarationsAndCleansUpAfterAFailedFill) {
  SafetensorsWriter w;
  w.add("x", DType::F32, {4});
  EXPECT_EQ(error_kind([&] { w.add("x", DType::F32, {4}); }), ErrorKind::Internal);
  EXPECT_EQ(error_kind([&] { w.add("__metadata__", DType::F32, {4}); }), ErrorKind::Internal);
  EXPECT_EQ(error_kind([&] { w.add("neg", DType::F32, {-1}); }), ErrorKind::Internal);
  TempDir tmp;
  EXPECT_THROW(w.write(tmp.path("x.safetensors"),
                       [](size_t, int64_t, int64_t, float*) { throw std::runtime_error("fill failed"); }),
               std::runtime_error);
  EXPECT_TRUE(fs::is_empty(tmp.path()));
  EXPECT_EQ(error_kind([&] { w.write(tmp.path("no/such/dir/x.safetensors"), [](size_t, int64_t, int64_t, float*) {}); }),
            ErrorKind::Usage);
}

// ---------------------------------------------------------------------------------------------------------
// Plans: the real shapes, without writing weights

namespace {

int64_t sum_prefix(const RandomCheckpointPlan& p, const std::string& prefix) {
  int64_t n = 0;
  for (const auto& t : p.tensors)
    if (t.name.rfind(prefix, 0) == 0) n += numel(t.shape);
  return n;
}
Shape shape_of(const RandomCheckpointPlan& p, const std::string& name) {
  for (const auto& t : p.tensors)
    if (t.name == name) return t.shape;
  ADD_FAILURE() << "no planned tensor " << name;
  return {};
}

}  // namespace

TEST(RandomPlan, XxlAndXlHaveTheSpecParameterCounts) {
  const auto xxl = plan_random_checkpoint("xxl"), xl = plan_random_checkpoint("Salesforce/blip2-flan-t5-xl");
  EXPECT_EQ(xxl.name, "blip2-flan-t5-xxl");
  EXPECT_EQ(xl.name, "blip2-flan-t5-xl");
  // spec §10.2 (shared counted once, embed_tokens aliases not at all, lm_head untied)
  EXPECT_EQ(xxl.total_elements(), 12'229'596'672);
  EXPECT_EQ(xl.total_elements(), 3'942'446'592);
  // §10.1 per component
  for (const auto* p : {&xxl, &xl}) {
    EXPECT_EQ(sum_prefix(*p, "vision_model."), 985'952'256);
    EXPECT_EQ(sum_prefix(*p, "qformer.") + sum_prefix(*p, "query_tokens"), 105'162'240);
    EXPECT_EQ(sum_prefix(*p, "vision_model.encoder.layers.0."), 25'250'176);
  }
  EXPECT_EQ(sum_prefix(xl, "language_projection."), 1'574'912);
  EXPECT_EQ(sum_prefix(xxl, "language_projection."), 3'149'824);
  EXPECT_EQ(sum_prefix(xl, "language_model."), 2'849'757'184);
  EXPECT_EQ(sum_prefix(xxl, "language_model."), 11'135'332'352);
  EXPECT_EQ(sum_prefix(xl, "language_model.encoder."), 1'157'729'280);
  EXPECT_EQ(sum_prefix(xxl, "language_model.encoder."), 4'630'714'368);
  EXPECT_EQ(sum_prefix(xl, "language_model.decoder."), 1'560'431'616);
  EXPECT_EQ(sum_prefix(xxl, "language_model.decoder."), 6'241'425'408);
  EXPECT_EQ(sum_prefix(xxl, "language_model.encoder.block.0."), 192'946'176 + 32 * 64);
  EXPECT_EQ(sum_prefix(xxl, "language_model.decoder.block.1."), 260'059'136);

  // Appendix A key shapes
  EXPECT_EQ(shape_of(xxl, "vision_model.embeddings.patch_embedding.weight"), (Shape{1408, 3, 14, 14}));
  EXPECT_EQ(shape_of(xxl, "vision_model.embeddings.position_embedding"), (Shape{1, 257, 1408}));
  EXPECT_EQ(shape_of(xxl, "vision_model.encoder.layers.38.self_attn.qkv.weight"), (Shape{4224, 1408}));
  EXPECT_EQ(shape_of(xxl, "vision_model.encoder.layers.38.mlp.fc1.weight"), (Shape{6144, 1408}));
  EXPECT_EQ(shape_of(xxl, "query_tokens"), (Shape{1, 32, 768}));
  EXPECT_EQ(shape_of(xxl, "qformer.encoder.layer.10.crossattention.attention.key.weight"), (Shape{768, 1408}));
  EXPECT_EQ(shape_of(xxl, "language_projection.weight"), (Shape{4096, 768}));
  EXPECT_EQ(shape_of(xl, "language_projection.weight"), (Shape{2048, 768}));
  EXPECT_EQ(shape_of(xxl, "language_model.shared.weight"), (Shape{32128, 4096}));
  EXPECT_EQ(shape_of(xxl, "language_model.lm_head.weight"), (Shape{32128, 4096}));
  EXPECT_EQ(shape_of(xxl, "language_model.encoder.block.23.layer.1.DenseReluDense.wi_0.weight"), (Shape{10240, 4096}));
  EXPECT_EQ(shape_of(xl, "language_model.decoder.block.23.layer.2.DenseReluDense.wo.weight"), (Shape{2048, 5120}));
  EXPECT_EQ(shape_of(xl, "language_model.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            (Shape{32, 32}));
  EXPECT_EQ(shape_of(xxl, "language_model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            (Shape{32, 64}));

  // tensor counts: ViT 4 + 39*12 + 2; Q-Former 3 + 12*16 + 6*10; projection 2; T5 1 + 24*9+1+1 + 24*14+1+1 + 1
  const size_t want = (4 + 39 * 12 + 2) + (3 + 12 * 16 + 6 * 10) + 2 + (1 + 24 * 9 + 2 + 24 * 14 + 2 + 1);
  EXPECT_EQ(xxl.tensors.size(), want);
  EXPECT_EQ(xl.tensors.size(), want);
  std::set<std::string> names;
  for (const auto& t : xxl.tensors) {
    EXPECT_TRUE(names.insert(t.name).second) << "duplicate " << t.name;
    EXPECT_EQ(t.name.find("embed_tokens"), std::string::npos) << t.name;
  }
}

TEST(RandomPlan, ConfigIsAFullHubConfigThatImpliesThoseShapes) {
  for (const char* like : {"xxl", "xl"}) {
    const auto p = plan_random_checkpoint(like, DType::BF16);
    const Blip2Config c = parse_config(p.config_json, "config.json");
    const bool xxl = std::string(like) == "xxl";
    EXPECT_EQ(c.vision.hidden_size, 1408);
    EXPECT_EQ(c.vision.intermediate_size, 6144);
    EXPECT_EQ(c.vision.num_layers, 39);
    EXPECT_EQ(c.vision.num_heads, 16);
    EXPECT_EQ(c.vision.num_positions(), 257);
    EXPECT_EQ(c.qformer.hidden_size, 768);
    EXPECT_EQ(c.qformer.num_layers, 12);
    EXPECT_EQ(c.qformer.encoder_hidden_size, 1408);
    EXPECT_EQ(c.num_query_tokens, 32);
    EXPECT_EQ(c.text.d_model, xxl ? 4096 : 2048);
    EXPECT_EQ(c.text.d_ff, xxl ? 10240 : 5120);
    EXPECT_EQ(c.text.num_heads, xxl ? 64 : 32);
    EXPECT_EQ(c.text.d_kv, 64);
    EXPECT_EQ(c.text.num_layers, 24);
    EXPECT_EQ(c.text.num_decoder_layers, 24);
    EXPECT_EQ(c.text.vocab_size, 32128);
    EXPECT_TRUE(c.text.is_gated_act);
    EXPECT_EQ(c.text.act, Activation::GeluErf);  // dense_act_fn "gelu" wins over gated-gelu's tanh
    EXPECT_FLOAT_EQ(c.text.layer_norm_epsilon, 1e-6f);
    EXPECT_EQ(c.text.relative_attention_num_buckets, 32);
    EXPECT_EQ(c.text.relative_attention_max_distance, 128);
    EXPECT_EQ(c.text.decoder_start_token_id, 0);
    EXPECT_EQ(c.text.eos_token_id, 1);
    EXPECT_EQ(c.text.pad_token_id, 0);
    const auto j = nlohmann::json::parse(p.config_json);
    EXPECT_EQ(j["model_type"], "blip-2");
    EXPECT_EQ(j["text_config"]["model_type"], "t5");
    EXPECT_EQ(j["text_config"]["feed_forward_proj"], "gated-gelu");
    EXPECT_EQ(j["text_config"]["dense_act_fn"], "gelu");
    EXPECT_EQ(j["text_config"]["tie_word_embeddings"], false);
    EXPECT_EQ(j["tie_word_embeddings"], false);
    EXPECT_EQ(j["torch_dtype"], "bfloat16");
  }
}

TEST(RandomPlan, TinyPlanIsExactlyTheBundledTinyCheckpoint) {
  // The loader's own view: every tensor of the bundled tiny model (minus the tied embed_tokens aliases)
  // with its shape, against the plan; and the configs agree.
  const auto p = plan_random_checkpoint("tiny");
  const SafetensorsFile real(kTinyDir + "/model.safetensors");
  std::map<std::string, Shape> want, got;
  for (const auto& [name, e] : real.entries())
    if (name.find("embed_tokens") == std::string::npos) want[name] = e.shape;
  for (const auto& t : p.tensors) got[t.name] = t.shape;
  EXPECT_EQ(got, want);
  const Blip2Config a = p.config, b = load_config(kTinyDir);
  EXPECT_EQ(a.vision.hidden_size, b.vision.hidden_size);
  EXPECT_EQ(a.qformer.num_layers, b.qformer.num_layers);
  EXPECT_EQ(a.num_query_tokens, b.num_query_tokens);
  EXPECT_EQ(a.text.d_kv, b.text.d_kv);
  EXPECT_EQ(a.text.num_decoder_layers, b.text.num_decoder_layers);
  EXPECT_EQ(a.text.vocab_size, b.text.vocab_size);
}

TEST(RandomPlan, OptPlansHaveTheSpecParameterCounts) {
  const auto a = plan_random_checkpoint("opt-2.7b"), b = plan_random_checkpoint("Salesforce/blip2-opt-6.7b");
  EXPECT_EQ(a.name, "blip2-opt-2.7b");
  EXPECT_EQ(b.name, "blip2-opt-6.7b");
  // spec §10: totals (lm_head tied, so not stored), the OPT parts, one layer, the projection
  EXPECT_EQ(a.total_elements(), 3'744'761'856);
  EXPECT_EQ(b.total_elements(), 7'752'738'304);
  EXPECT_EQ(sum_prefix(a, "language_model."), 2'651'678'720);
  EXPECT_EQ(sum_prefix(b, "language_model."), 6'658'473'984);
  EXPECT_EQ(sum_prefix(a, "language_model.model.decoder.layers.31."), 78'676'480);
  EXPECT_EQ(sum_prefix(a, "language_model.model.decoder.embed_tokens."), 128'778'240);
  EXPECT_EQ(sum_prefix(a, "language_projection."), 1'968'640);
  EXPECT_EQ(sum_prefix(b, "language_projection."), 3'149'824);
  EXPECT_EQ(shape_of(a, "language_model.model.decoder.embed_positions.weight"), (Shape{2050, 2560}));
  EXPECT_EQ(shape_of(b, "language_model.model.decoder.layers.0.fc1.weight"), (Shape{16384, 4096}));
  for (const auto* p : {&a, &b}) {
    EXPECT_EQ(p->config.family, LanguageFamily::OPT);
    EXPECT_EQ(p->config.opt.eos_token_id, 50118);  // "\n", as BLIP-2 OPT stops
    for (const auto& t : p->tensors) EXPECT_EQ(t.name.find("lm_head"), std::string::npos) << t.name;
  }
}

TEST(RandomPlan, TinyOptPlanIsTheBundledTinyOptCheckpointWithATiedHead) {
  const auto p = plan_random_checkpoint("tiny-opt");
  const SafetensorsFile real(std::string(BLIP2_BUNDLED_OPT_DIR) + "/model.safetensors");
  std::map<std::string, Shape> want, got;
  for (const auto& [name, e] : real.entries())
    if (name != "language_model.lm_head.weight") want[name] = e.shape;  // the fixture's head is untied
  for (const auto& t : p.tensors) got[t.name] = t.shape;
  EXPECT_EQ(got, want);
}

// A tensor name with its layer numbers replaced by '#', so that a full-size plan compares with a tiny
// checkpoint of the same layout.
std::string name_pattern(const std::string& name) {
  std::string out;
  for (size_t i = 0; i < name.size(); ++i) {
    if (std::isdigit(static_cast<unsigned char>(name[i])) && i > 0 && name[i - 1] == '.') {
      while (i < name.size() && std::isdigit(static_cast<unsigned char>(name[i]))) ++i;
      out += '#';
      --i;
      continue;
    }
    out += name[i];
  }
  return out;
}

TEST(RandomPlan, InstructBlipPlansHaveTheHubLayoutAndLlamaCounts) {
  // Names: those transformers 4.44 saved for the tiny InstructBLIP fixtures, layer for layer.
  for (const auto& [like, fixture] : {std::pair{"instructblip-flan-t5-xl", "tiny-instructblip-t5"},
                                      {"Salesforce/instructblip-flan-t5-xxl", "tiny-instructblip-t5"},
                                      {"instructblip-vicuna-7b", "tiny-instructblip-vicuna"},
                                      {"instructblip-vicuna-13b", "tiny-instructblip-vicuna"}}) {
    const auto p = plan_random_checkpoint(like);
    EXPECT_TRUE(p.config.instruct) << like;
    const SafetensorsFile real(std::string(BLIP2_FIXTURES_DIR) + "/" + fixture + "/model.safetensors");
    std::set<std::string> want, got;
    for (const auto& [name, e] : real.entries()) want.insert(name_pattern(name));
    for (const auto& t : p.tensors) got.insert(name_pattern(t.name));
    EXPECT_EQ(got, want) << like;
  }
  // LLaMA-7B and -13B have 6,738,415,616 and 13,015,864,320 parameters with 32000 ids; Vicuna's [PAD] adds
  // one row to the embedding and one to the head.
  const auto v7 = plan_random_checkpoint("instructblip-vicuna-7b"), v13 = plan_random_checkpoint("instructblip-vicuna-13b");
  EXPECT_EQ(sum_prefix(v7, "language_model."), 6'738'415'616 + 2 * 4096);
  EXPECT_EQ(sum_prefix(v13, "language_model."), 13'015'864'320 + 2 * 5120);
  EXPECT_EQ(v7.config.family, LanguageFamily::Llama);
  EXPECT_EQ(v7.config.eos_token_id(), 1);  // the hub's text_config: bos 0, eos 1, pad -1
  EXPECT_EQ(shape_of(v7, "qformer.embeddings.word_embeddings.weight"), (Shape{30523, 768}));  // BERT + [DEC]
  EXPECT_EQ(shape_of(v13, "language_projection.weight"), (Shape{5120, 768}));
  EXPECT_EQ(shape_of(v13, "language_model.model.layers.39.mlp.down_proj.weight"), (Shape{5120, 13824}));
}

TEST(MakeRandom, TinyOptLoadsAndDecodesFinite) {
  TempDir tmp;
  const std::string dir = tmp.path("opt");
  make_random_checkpoint("tiny-opt", dir, options(DType::BF16, 3));
  for (const char* f : {"vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"})
    EXPECT_TRUE(fs::exists(fs::path(dir) / f)) << f;
  const Blip2Model model(dir);
  EXPECT_TRUE(model.tied_lm_head());
  const Tensor pixels = preprocess_images({load_image(kFixtures + "/images/chelsea.png")}, 224);
  const Encoded e = model.encode(pixels, model.tokenize({"a photo of"}));
  auto dec = model.start_decoder(e);
  Tensor logits = dec->start();
  for (int step = 0; step < 4; ++step) {
    ASSERT_TRUE(all_finite(logits)) << "step " << step;
    EXPECT_GT(rms(logits), 0.1);
    EXPECT_LT(rms(logits), 20.0);
    logits = dec->step({static_cast<int32_t>(std::max_element(logits.data.begin(), logits.data.end()) - logits.data.begin())});
  }
}

TEST(RandomPlan, BadNamesAreUsageErrors) {
  std::string msg;
  EXPECT_EQ(error_kind([] { plan_random_checkpoint("blip2-opt-13b"); }, &msg), ErrorKind::Usage);
  EXPECT_NE(msg.find("xxl"), std::string::npos) << msg;
  EXPECT_EQ(error_kind([] { parse_dtype_option("int8"); }), ErrorKind::Usage);
  EXPECT_EQ(canonical_model_like("SALESFORCE/BLIP2-FLAN-T5-XXL"), "blip2-flan-t5-xxl");
  EXPECT_EQ(canonical_model_like("tiny-blip2-t5"), "tiny-blip2-t5");
  EXPECT_EQ(parse_dtype_option("bfloat16"), DType::BF16);
  EXPECT_EQ(parse_dtype_option("F16"), DType::F16);
}

TEST(RandomValues, DependOnSeedNameAndIndexOnlyWithTheAskedScale) {
  const RandomInit init{0.5f, 2.0f, 10, 20};
  const uint64_t k = random_tensor_key(1, "t");
  std::vector<float> whole(100000), parts(100000);
  fill_random(init, k, 0, 100000, whole.data());
  for (int64_t b = 0; b < 100000; b += 777) fill_random(init, k, b, std::min<int64_t>(777, 100000 - b), parts.data() + b);
  EXPECT_EQ(whole, parts);
  for (int i = 10; i < 20; ++i) EXPECT_EQ(whole[i], 0.0f);
  double s = 0, s2 = 0, mx = 0;
  for (int i = 20; i < 100000; ++i) {
    s += whole[i];
    s2 += (whole[i] - 0.5) * (whole[i] - 0.5);
    mx = std::max(mx, std::fabs(whole[i] - 0.5));
  }
  EXPECT_NEAR(s / 99980, 0.5, 0.03);
  EXPECT_NEAR(std::sqrt(s2 / 99980), 2.0, 0.03);
  EXPECT_LE(mx, 2.0 * 3.47);
  EXPECT_NE(random_tensor_key(1, "t"), random_tensor_key(2, "t"));
  EXPECT_NE(random_tensor_key(1, "t"), random_tensor_key(1, "u"));
}

// ---------------------------------------------------------------------------------------------------------
// Tiny checkpoints on disk, through the whole model

namespace blip2 {
void PrintTo(DType t, std::ostream* os) { *os << dtype_name(t); }  // readable ctest names
}  // namespace blip2

class TinyRandom : public ::testing::TestWithParam<DType> {};

TEST_P(TinyRandom, LoadsAndRunsTheWholeModelFinite) {
  TempDir tmp;
  const std::string dir = tmp.path("m");
  std::vector<MakeRandomProgress> seen;
  MakeRandomOptions o = options(GetParam(), 5);
  o.progress = [&](const MakeRandomProgress& p) { seen.push_back(p); };
  make_random_checkpoint("tiny", dir, o);
  ASSERT_FALSE(seen.empty());
  EXPECT_TRUE(seen.back().shard_finished);
  EXPECT_EQ(seen.back().tensors_done, seen.back().tensors_total);
  EXPECT_EQ(seen.back().bytes_done, seen.back().bytes_total);
  for (const char* f : {"config.json", "generation_config.json", "tokenizer_config.json", "spiece.model", "README.txt",
                        "model.safetensors"})
    EXPECT_TRUE(fs::exists(fs::path(dir) / f)) << f;
  EXPECT_FALSE(fs::exists(fs::path(dir) / "model.safetensors.index.json"));  // one file: no index, as HF
  EXPECT_EQ(read_bytes(dir + "/spiece.model"), read_bytes(kTinyDir + "/spiece.model"));
  EXPECT_NE(read_bytes(dir + "/README.txt").find("random"), std::string::npos);

  const SafetensorsFile st(dir + "/model.safetensors");
  for (const auto& [name, e] : st.entries()) EXPECT_EQ(e.dtype, dtype_name(GetParam())) << name;
  // ViT qkv bias: q | 0 | v
  const Tensor qkv_b = st.tensor("vision_model.encoder.layers.1.self_attn.qkv.bias");
  for (int i = 0; i < 64; ++i) EXPECT_EQ(qkv_b.data[64 + i], 0.0f);
  EXPECT_NE(qkv_b.data[0], 0.0f);
  EXPECT_NE(qkv_b.data[128], 0.0f);

  const Blip2Model model(dir);  // checks every name and shape, and that nothing is left over
  const PromptBatch prompts = model.tokenize({"", "Question: what is in the picture? Answer:"});
  const Tensor pixels = preprocess_images(
      {load_image(kFixtures + "/images/chelsea.png"), load_image(kFixtures + "/images/astronaut.png")}, 224);
  const Encoded e = model.encode(pixels, prompts);
  for (const Tensor* t : {&e.vision_last_hidden_state, &e.qformer_last_hidden_state, &e.language_projection,
                          &e.encoder_last_hidden_state}) {
    EXPECT_TRUE(all_finite(*t));
    EXPECT_GT(rms(*t), 0.05);
    EXPECT_LT(rms(*t), 20.0);
  }
  auto dec = model.start_decoder(e);
  std::vector<int32_t> tok(2, 0);
  for (int step = 0; step < 5; ++step) {
    const Tensor logits = dec->step(tok);
    ASSERT_TRUE(all_finite(logits)) << "step " << step;
    EXPECT_GT(rms(logits), 0.1);
    EXPECT_LT(rms(logits), 20.0);
    for (int b = 0; b < 2; ++b) {
      const float* row = logits.ptr() + b * logits.dim(1);
      tok[b] = static_cast<int32_t>(std::max_element(row, row + logits.dim(1)) - row);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, TinyRandom, ::testing::Values(DType::F32, DType::BF16, DType::F16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(MakeRandom, ShardsAndIndexAreConsistent) {
  TempDir tmp;
  const std::string dir = tmp.path("m");
  make_random_checkpoint("tiny", dir, options(DType::F32, 0, 600'000));  // ~3.4 MB in f32: 6+ shards
  const auto index = read_json(dir + "/model.safetensors.index.json");
  const auto plan = plan_random_checkpoint("tiny");
  std::map<std::string, std::string> wm = index["weight_map"].get<std::map<std::string, std::string>>();
  EXPECT_EQ(wm.size(), plan.tensors.size());
  std::set<std::string> files;
  for (const auto& [n, f] : wm) files.insert(f);
  ASSERT_GE(files.size(), 5u);
  const int N = static_cast<int>(files.size());
  uint64_t total = 0;
  size_t count = 0;
  int k = 0;
  for (const auto& f : files) {
    char want[64];
    std::snprintf(want, sizeof want, "model-%05d-of-%05d.safetensors", ++k, N);
    EXPECT_EQ(f, want);
    const SafetensorsFile st(dir + "/" + f);
    EXPECT_LE(fs::file_size(dir + "/" + f), 600'000u + 65536);  // limit on data, plus the header
    for (const auto& [name, e] : st.entries()) {
      EXPECT_EQ(wm.at(name), f) << name;
      total += e.nbytes;
      ++count;
    }
  }
  EXPECT_EQ(count, wm.size());
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total);
  EXPECT_EQ(index["metadata"]["total_parameters"].get<int64_t>(), plan.total_elements());
  EXPECT_EQ(total, static_cast<uint64_t>(plan.total_elements()) * 4);
  for (const auto& e : fs::directory_iterator(dir))
    EXPECT_EQ(e.path().string().find(".partial"), std::string::npos) << e.path();

  // Each tensor's values are fill_random(seed, name): independent of sharding and order.
  const Checkpoint ck(dir);
  const SafetensorsFile any(dir + "/" + wm.at("language_model.shared.weight"));
  const Tensor shared = any.tensor("language_model.shared.weight");
  std::vector<float> want(shared.data.size());
  const auto& init = std::find_if(plan.tensors.begin(), plan.tensors.end(),
                                  [](const auto& t) { return t.name == "language_model.shared.weight"; })->init;
  fill_random(init, random_tensor_key(0, "language_model.shared.weight"), 0, static_cast<int64_t>(want.size()), want.data());
  EXPECT_EQ(shared.data, want);

  const Blip2Model model(dir);
  EXPECT_EQ(model.config().text.vocab_size, 1152);
}

TEST(MakeRandom, SameSeedSameBytesOtherSeedOtherBytes) {
  TempDir tmp;
  make_random_checkpoint("tiny", tmp.path("a"), options(DType::BF16, 42, 1'000'000));
  make_random_checkpoint("tiny", tmp.path("b"), options(DType::BF16, 42, 1'000'000));
  make_random_checkpoint("tiny", tmp.path("c"), options(DType::BF16, 43, 1'000'000));
  const auto a = dir_contents(tmp.path("a")), b = dir_contents(tmp.path("b")), c = dir_contents(tmp.path("c"));
  EXPECT_EQ(a, b);
  ASSERT_EQ(a.size(), c.size());
  for (const auto& [name, bytes] : a) {
    if (name.find("safetensors") != std::string::npos && name.find("index") == std::string::npos) {
      EXPECT_NE(bytes, c.at(name)) << name;
    } else if (name != "README.txt") {
      EXPECT_EQ(bytes, c.at(name)) << name;
    }
  }
}

TEST(MakeRandom, RefusesANonEmptyDirectoryUnlessOverwriting) {
  TempDir tmp;
  const std::string dir = tmp.path("m");
  make_random_checkpoint("tiny", dir, options(DType::F16, 0, 500'000));
  ASSERT_TRUE(fs::exists(dir + "/model.safetensors.index.json"));
  std::string msg;
  EXPECT_EQ(error_kind([&] { make_random_checkpoint("tiny", dir, options(DType::F16)); }, &msg), ErrorKind::Usage);
  EXPECT_NE(msg.find("--force"), std::string::npos) << msg;
  { std::ofstream(dir + "/keep.txt") << "mine"; }
  MakeRandomOptions o = options(DType::F32);
  o.overwrite = true;
  make_random_checkpoint("tiny", dir, o);  // now one file: the old shards and index must be gone
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors.index.json"));
  for (const auto& e : fs::directory_iterator(dir))
    EXPECT_NE(e.path().filename().string().rfind("model-", 0), 0u) << e.path();
  EXPECT_EQ(read_bytes(dir + "/keep.txt"), "mine");
  const Blip2Model model(dir);

  { std::ofstream(tmp.path("file")) << "x"; }
  EXPECT_EQ(error_kind([&] { make_random_checkpoint("tiny", tmp.path("file"), options(DType::F32)); }), ErrorKind::Usage);
  MakeRandomOptions no_tok = options(DType::F32);
  no_tok.tokenizer_dir = tmp.path("nowhere");
  EXPECT_EQ(error_kind([&] { make_random_checkpoint("tiny", tmp.path("n"), no_tok); }), ErrorKind::Model);
  EXPECT_EQ(error_kind([&] { make_random_checkpoint("huge", tmp.path("n"), "bf16", 0); }), ErrorKind::Usage);
  EXPECT_EQ(error_kind([&] { make_random_checkpoint("tiny", tmp.path("n"), "q4", 0); }), ErrorKind::Usage);
  EXPECT_FALSE(fs::exists(tmp.path("n")));
}

// ---------------------------------------------------------------------------------------------------------
// The subcommand (tools/cmd_make_random.cpp), driven through CLI11 as the tool does

namespace {

// Parses argv as `blip2 ...` with only make-random registered; the callback runs inside parse.
void run_cli(std::vector<std::string> args) {
  CLI::App app{"blip2"};
  add_make_random_command(app);
  args.insert(args.begin(), "blip2");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  app.parse(static_cast<int>(argv.size()), argv.data());
}

}  // namespace

TEST(MakeRandomCommand, WritesTinyAndReportsBadArgumentsAsUsageErrors) {
  TempDir tmp;
  const std::string out = tmp.path("cli");
  run_cli({"make-random", "--like", "tiny", "--out", out, "--dtype", "f16", "--seed", "9"});
  const Blip2Model model(out);
  EXPECT_EQ(SafetensorsFile(out + "/model.safetensors").find("query_tokens")->dtype, "F16");
  // same bytes as the library call with the same seed
  make_random_checkpoint("tiny", tmp.path("lib"), "f16", 9);
  EXPECT_EQ(read_bytes(out + "/model.safetensors"), read_bytes(tmp.path("lib") + "/model.safetensors"));

  EXPECT_EQ(error_kind([&] { run_cli({"make-random", "--like", "tiny", "--out", out}); }), ErrorKind::Usage);  // not empty
  run_cli({"make-random", "--like", "tiny", "--out", out, "--force"});  // default bf16
  EXPECT_EQ(SafetensorsFile(out + "/model.safetensors").find("query_tokens")->dtype, "BF16");
  EXPECT_EQ(error_kind([&] { run_cli({"make-random", "--like", "opt", "--out", tmp.path("x")}); }), ErrorKind::Usage);
  EXPECT_EQ(error_kind([&] { run_cli({"make-random", "--like", "xl", "--out", tmp.path("x"), "--dtype", "int4"}); }),
            ErrorKind::Usage);
  EXPECT_EQ(error_kind([&] { run_cli({"make-random", "--out", tmp.path("x")}); }), ErrorKind::Usage);
  EXPECT_EQ(error_kind([&] { run_cli({"make-random", "--like", "tiny"}); }), ErrorKind::Usage);
  EXPECT_FALSE(fs::exists(tmp.path("x")));
  for (const char* bad : {"-3", "x", "1e3", "99999999999999999999999"})
    EXPECT_EQ(error_kind([&] { run_cli({"make-random", "--like", "tiny", "--out", tmp.path("x"), "--seed", bad}); }),
              ErrorKind::Usage) << bad;
  EXPECT_FALSE(fs::exists(tmp.path("x")));
}
