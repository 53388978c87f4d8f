// Pre-quantized checkpoints (blip2 quantize): a quantized copy loads mapped and computes bit for bit what the
// original computes when it is converted at load with the same options, on every model family; broken or
// mismatched quantized files fail with the file and tensor named.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "cli_runner.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "io/config.h"
#include "io/make_random.h"
#include "model/load_options.h"
#include "io/safetensors.h"
#include "model/quantize.h"
#include "model/retrieval.h"
#include "support.h"
#include "temp_dir.h"

using namespace blip2;
using namespace blip2::test;
namespace fs = std::filesystem;

namespace {

const std::string kT5 = BLIP2_TINY_T5_DIR, kOpt = std::string(BLIP2_TINY_T5_DIR) + "/../tiny-blip2-opt";
const std::string kVicuna = kFixtures + "/tiny-instructblip-vicuna", kItm = kFixtures + "/tiny-blip2-itm";

LoadOptions with_weights(WeightFormat f, int group = kDefaultInt4Group) {
  LoadOptions o;
  o.weights = f;
  o.int4_group = group;
  return o;
}

void expect_same_bits(const Tensor& got_any, const Tensor& want_any, const std::string& what) {
  const Tensor got = on_host(got_any), want = on_host(want_any);
  ASSERT_EQ(got.shape, want.shape) << what;
  ASSERT_GT(want.size(), 0) << what;
  EXPECT_EQ(std::memcmp(got.data.data(), want.data.data(), want.data.size() * sizeof(float)), 0)
      << what << " differs (max abs " << compare(got, want).max_abs << ")";
}

// Every stage of a captioning model for two images and prompts, and its logits.
std::vector<std::pair<std::string, Tensor>> stages(const Blip2Model& m) {
  const Tensor pixels = fixture_pixels({"chelsea.png", "astronaut.png"}, m.config().vision.image_size);
  const Encoded e = m.encode(pixels, m.tokenize({"a photo of", "Question: what is it? Answer:"}));
  std::vector<std::pair<std::string, Tensor>> out = {{"vision", e.vision_last_hidden_state},
                                                     {"qformer", e.qformer_last_hidden_state},
                                                     {"projection", e.language_projection}};
  if (m.config().family == LanguageFamily::T5) {
    out.emplace_back("encoder", e.encoder_last_hidden_state);
    out.emplace_back("logits", forced_logits(m, e, {{0, 5, 9}, {0, 7, 3}}));
  } else {
    out.emplace_back("logits", m.prompt_logits(e));
  }
  return out;
}

struct Case {
  const char* name;
  std::string dir;
  LoadOptions options;
};

TEST(QuantizedCheckpoint, LoadsAndComputesBitForBitAsConvertingAtLoad) {
  LoadOptions mixed;  // per tower, as a user may choose
  mixed.vision_weights = WeightFormat::F16;
  mixed.qformer_weights = WeightFormat::I8;
  mixed.lm_weights = WeightFormat::I4;
  mixed.int4_group = 32;
  // Models with activation outliers, whose language model keeps float columns (Weight::float_columns).
  TempDir outliers;
  MakeRandomOptions mo;
  mo.outliers.enabled = true;
  make_random_checkpoint("tiny", outliers.path("t5"), mo);
  make_random_checkpoint("tiny-opt", outliers.path("opt"), mo);
  for (const Case& c : {Case{"t5-outliers-int4", outliers.path("t5"), with_weights(WeightFormat::I4)},
                        Case{"opt-outliers-int8", outliers.path("opt"), with_weights(WeightFormat::I8)},
                        Case{"t5-int4", kT5, with_weights(WeightFormat::I4)},
                        Case{"t5-int8", kT5, with_weights(WeightFormat::I8)},
                        Case{"opt-int4-g128", kOpt, with_weights(WeightFormat::I4, 128)},
                        Case{"opt-mixed", kOpt, mixed},
                        Case{"vicuna-int8", kVicuna, with_weights(WeightFormat::I8)}}) {
    SCOPED_TRACE(c.name);
    TempDir out;
    const QuantizeSummary s = quantize_checkpoint(c.dir, out.path(), c.options, false);
    EXPECT_GT(s.quantized, 10u);
    size_t float_columns = 0;
    const SafetensorsFile written(out.path("model.safetensors"));
    for (const auto& [name, e] : written.entries())
      float_columns += name.ends_with(kColumnsSuffix);
    EXPECT_EQ(float_columns > 0, c.dir.starts_with(outliers.path())) << float_columns;
    EXPECT_EQ(s.file_bytes, fs::file_size(out.path("model.safetensors")));
    EXPECT_LT(s.file_bytes, s.source_bytes);
    const Blip2Model converted(c.dir, c.options);
    const Blip2Model mapped(out.path());  // default options: every tensor used as stored
    EXPECT_TRUE(mapped.checkpoint().prequantized());
    // What a product streams is the same: the formats match tensor by tensor.
    EXPECT_EQ(mapped.checkpoint().taken_bytes(), converted.checkpoint().taken_bytes());
    const auto want = stages(converted), got = stages(mapped);
    for (size_t i = 0; i < want.size(); ++i) expect_same_bits(got[i].second, want[i].second, want[i].first);
    // Asking for the stored formats explicitly is the same load.
    const Blip2Model again(out.path(), c.options);
    expect_same_bits(stages(again).back().second, want.back().second, "logits with the options repeated");
  }
}

TEST(QuantizedCheckpoint, RetrievalCheckpointsToo) {
  TempDir out;
  quantize_checkpoint(kItm, out.path(), with_weights(WeightFormat::I8), false);
  const RetrievalModel converted(kItm, with_weights(WeightFormat::I8)), mapped(out.path());
  const Tensor pixels = fixture_pixels({"chelsea.png"}, converted.config().vision.image_size);
  const TokenBatch texts = converted.tokenize({"a cat on a couch"});
  const Tensor vc = converted.encode_vision(pixels), vm = mapped.encode_vision(pixels);
  expect_same_bits(vm, vc, "vision");
  expect_same_bits(mapped.image_embeds(vm), converted.image_embeds(vc), "image_embeds");
  expect_same_bits(mapped.text_embeds(texts).text_embeds, converted.text_embeds(texts).text_embeds, "text_embeds");
  expect_same_bits(mapped.match(vm, texts).itm_logits, converted.match(vc, texts).itm_logits, "itm_logits");
}

template <class F>
std::string error_of(ErrorKind kind, F&& f) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "expected an error";
  return "";
}

// The quantized T5's model.safetensors rewritten with `edit` applied to its entries (name -> dtype, shape,
// bytes) and metadata.
struct Rewrite {
  std::map<std::string, std::tuple<std::string, Shape, std::string>> tensors;
  std::map<std::string, std::string> metadata;
  explicit Rewrite(const std::string& file) {
    const SafetensorsFile f(file);
    for (const auto& [n, e] : f.entries())
      tensors[n] = {e.dtype, e.shape, std::string(reinterpret_cast<const char*>(e.data), e.nbytes)};
    metadata = f.metadata();
  }
  void write(const std::string& file) const {
    SafetensorsWriter w;
    for (const auto& [n, t] : tensors) w.add_bytes(n, std::get<0>(t), std::get<1>(t), std::get<2>(t).data());
    for (const auto& [k, v] : metadata) w.set_metadata(k, v);
    w.write(file, nullptr);
  }
};

// The error loading a copy of checkpoint `good` (with `options`) whose model.safetensors went through `edit`
// gives; `needs` must be in the file before the edit.
std::string error_of_edited(const std::string& good, const std::string& needs,
                            const std::function<void(Rewrite&)>& edit, const LoadOptions& options = {}) {
  TempDir dir;
  for (const auto& e : fs::directory_iterator(good))
    if (e.path().filename() != "model.safetensors") fs::copy(e.path(), dir.path(e.path().filename().string()));
  Rewrite r(good + "/model.safetensors");
  if (!r.tensors.count(needs)) {
    ADD_FAILURE() << "the test's tensor " << needs << " is not in the file";
    return "";
  }
  edit(r);
  r.write(dir.path("model.safetensors"));
  return error_of(ErrorKind::Model, [&] { Blip2Model m(dir.path(), options); });
}

TEST(QuantizedCheckpoint, BrokenOrMismatchedFilesFailWithTheTensorNamed) {
  TempDir good;
  quantize_checkpoint(kT5, good.path(), with_weights(WeightFormat::I4), false);
  const std::string q = "language_model.encoder.block.0.layer.1.DenseReluDense.wo.weight";
  const std::string data = q + ".int4_g64", scales = data + "_scales";
  const auto broken = [&](const std::function<void(Rewrite&)>& edit, const std::string& expected) {
    const std::string e = error_of_edited(good.path(), data, edit);
    EXPECT_NE(e.find(expected), std::string::npos) << e;
  };
  broken([](Rewrite& r) { r.metadata.erase("blip2.quantized_layout"); },
         ".int8' is pre-quantized, but the file's metadata does not name blip2's quantized layout 2");
  broken([](Rewrite& r) { r.metadata["blip2.quantized_layout"] = "1"; }, "quantized layout 2");
  broken([&](Rewrite& r) { r.tensors.erase(scales); }, "has no scales tensor '" + scales + "'");
  broken([&](Rewrite& r) { std::get<0>(r.tensors[data]) = "I8"; }, "tensor '" + data + "' is I8 ");
  broken([&](Rewrite& r) {  // a file made for a narrower model: one byte column less
    auto& [dtype, shape, bytes] = r.tensors[data];
    bytes.resize(bytes.size() / shape[1] * (shape[1] - 32));
    shape[1] -= 32;
  }, "but I4 " + q);
  broken([&](Rewrite& r) { std::get<1>(r.tensors[scales]) = {std::get<1>(r.tensors[scales])[1], std::get<1>(r.tensors[scales])[0]}; },
         "tensor '" + scales + "' is F16");
  broken([&](Rewrite& r) { r.tensors[q] = {"F32", {1}, std::string(4, '\0')}; },
         "tensor '" + q + "' is stored twice");
  broken([&](Rewrite& r) { r.tensors[q + ".int8"] = r.tensors[data]; }, "is stored quantized twice");
  broken([&](Rewrite& r) {  // a norm weight cannot be quantized
    const std::string norm = "language_model.encoder.final_layer_norm.weight";
    r.tensors[norm + ".int8"] = r.tensors[data];
    r.tensors.erase(norm);
  }, "language_model.encoder.final_layer_norm.weight");
}

// A quantized weight's float columns are checked like its data: both tensors present, I32 indices ascending
// inside the row, F32 weights [rows, n].
TEST(QuantizedCheckpoint, BrokenFloatColumnsFailWithTheTensorNamed) {
  TempDir src, good;
  MakeRandomOptions mo;
  mo.outliers.enabled = true;
  make_random_checkpoint("tiny", src.path(), mo);
  quantize_checkpoint(src.path(), good.path(), with_weights(WeightFormat::I8), false);
  const std::string data = "language_model.encoder.block.0.layer.0.SelfAttention.q.weight.int8";
  const std::string columns = data + kColumnsSuffix, weights = data + kColumnWeightsSuffix;
  const auto broken = [&](const std::function<void(Rewrite&)>& edit, const std::string& expected) {
    const std::string e = error_of_edited(good.path(), columns, edit);
    EXPECT_NE(e.find(expected), std::string::npos) << e;
  };
  const auto set_index = [&](Rewrite& r, int k, int32_t v) {
    std::memcpy(std::get<2>(r.tensors[columns]).data() + 4 * k, &v, 4);
  };
  broken([&](Rewrite& r) { r.tensors.erase(weights); }, "has only one of '" + columns + "' and '" + weights + "'");
  broken([&](Rewrite& r) { r.tensors.erase(columns); }, "has only one of");
  broken([&](Rewrite& r) { std::get<0>(r.tensors[columns]) = "F32"; }, "tensor '" + columns + "' is F32");
  broken([&](Rewrite& r) { set_index(r, 0, -1); }, "holds column -1 at 0");
  broken([&](Rewrite& r) { set_index(r, 1, 1 << 20); }, "holds column 1048576 at 1: columns must ascend within [0, ");
  broken([&](Rewrite& r) {
    int32_t first;
    std::memcpy(&first, std::get<2>(r.tensors[columns]).data(), 4);
    set_index(r, 1, first);
  }, "at 1: columns must ascend");
  broken([&](Rewrite& r) {  // one column's weights missing
    auto& [dtype, shape, bytes] = r.tensors[weights];
    bytes.resize(bytes.size() / shape[1] * (shape[1] - 1));
    shape[1] -= 1;
  }, "tensor '" + weights + "' is F32");
}

// The loader reads the norms and first feed-forward products of a float checkpoint to choose float columns
// before the model has checked them: mis-sized ones are skipped there, and the model's own checks name them.
TEST(QuantizedCheckpoint, MisSizedNormsFailWithTheTensorNamedWhenChoosingFloatColumns) {
  TempDir src;
  MakeRandomOptions mo;
  mo.outliers.enabled = true;
  make_random_checkpoint("tiny-opt", src.path(), mo);
  const std::string layer = "language_model.model.decoder.layers.0.";
  for (const std::string& t : {layer + "self_attn_layer_norm.bias", layer + "final_layer_norm.weight", layer + "fc1.bias"}) {
    for (WeightFormat f : {WeightFormat::I8, WeightFormat::I4}) {
      const std::string e = error_of_edited(src.path(), t, [&](Rewrite& r) {
        auto& [dtype, shape, bytes] = r.tensors[t];
        shape = {shape[0] - 1};
        bytes.resize(bytes.size() - 2);  // one bf16 element
      }, with_weights(f));
      EXPECT_NE(e.find(t), std::string::npos) << weight_format_name(f) << ": " << e;
    }
  }
}

// OPT's tied embedding (no lm_head stored): quantized as the head, while lookups read the stored float
// table, so input embeddings stay exact (transformers never quantizes embeddings); a float load shares one
// tensor. A pre-quantized copy stores the two under the names taken_bytes lists (the bit-for-bit test above
// covers the tied tiny-opt with outliers).
TEST(QuantizedCheckpoint, TiedEmbeddingKeepsItsFloatTableForLookups) {
  TempDir dir;
  make_random_checkpoint("tiny-opt", dir.path(), MakeRandomOptions{});
  const std::string embed = "language_model.model.decoder.embed_tokens.weight", head = "language_model.lm_head.weight";
  const Blip2Config cfg = load_config(dir.path());
  const Shape shape = {cfg.opt.vocab_size, cfg.opt.word_embed_proj_dim};
  {
    const auto ck = open_checkpoint(dir.path(), with_weights(WeightFormat::I4), cfg.family, nullptr);
    ASSERT_FALSE(ck->has(head));
    const auto tied = ck->take_tied_embedding(embed, head, shape);
    EXPECT_EQ(tied.head.dtype, DType::I4);
    EXPECT_EQ(tied.table.dtype, DType::BF16);
    EXPECT_EQ(tied.table.data, ck->stored(embed).data);  // the file's bytes, in place
    EXPECT_EQ(ck->taken_dtypes().at(head), DType::I4);
    EXPECT_EQ(ck->taken_dtypes().at(embed), DType::BF16);
  }
  {
    const auto ck = open_checkpoint(dir.path(), with_weights(WeightFormat::BF16), cfg.family, nullptr);
    const auto tied = ck->take_tied_embedding(embed, head, shape);
    EXPECT_EQ(tied.table.data, tied.head.data);
    EXPECT_FALSE(ck->taken_dtypes().count(head));
  }
  TempDir q;
  quantize_checkpoint(dir.path(), q.path(), with_weights(WeightFormat::I8), false);
  const Checkpoint quantized(q.path());
  EXPECT_TRUE(quantized.has(head));
  EXPECT_EQ(quantized.stored(embed).dtype, DType::BF16);
}

// Only a quantized tensor's data and scales are left out of the stored tensors: a float tensor whose name
// merely ends with "_scales" is an ordinary tensor (quantize writes it, the model may take it).
TEST(QuantizedCheckpoint, StoredShapesLeaveOutOnlyTheQuantizedParts) {
  TempDir dir;
  const Tensor a({2, 3}), s({2});
  write_safetensors(dir.path("model.safetensors"), {{"a", &a}, {"a_scales", &s}});
  Checkpoint ck(dir.path());
  EXPECT_EQ(ck.stored_shapes(), (std::map<std::string, Shape>{{"a", {2, 3}}, {"a_scales", {2}}}));
  TempDir q4;
  quantize_checkpoint(kT5, q4.path(), with_weights(WeightFormat::I4), false);
  const Checkpoint quantized(q4.path());
  const std::string wo = "language_model.encoder.block.0.layer.1.DenseReluDense.wo.weight";
  EXPECT_TRUE(quantized.has(wo));
  for (const auto& [name, shape] : quantized.stored_shapes())
    EXPECT_TRUE(name.find(".int8") == std::string::npos && name.find(".int4_g") == std::string::npos) << name;
  EXPECT_TRUE(quantized.stored_shapes().count("language_model.encoder.final_layer_norm.weight"));
}

TEST(QuantizedCheckpoint, UsageErrorsNameTheProblem) {
  TempDir q4;
  quantize_checkpoint(kT5, q4.path(), with_weights(WeightFormat::I4), false);
  // Loaded as another format: refused, not silently requantized.
  EXPECT_NE(error_of(ErrorKind::Usage, [&] { Blip2Model m(q4.path(), with_weights(WeightFormat::I8)); })
                .find("is pre-quantized as int4 (group 64), and cannot be loaded as int8"),
            std::string::npos);
  EXPECT_NE(error_of(ErrorKind::Usage, [&] { Blip2Model m(q4.path(), with_weights(WeightFormat::I4, 32)); })
                .find("cannot be loaded as int4 (group 32)"),
            std::string::npos);
  TempDir again;
  EXPECT_NE(error_of(ErrorKind::Usage, [&] { quantize_checkpoint(q4.path(), again.path(), with_weights(WeightFormat::I8), false); })
                .find("is pre-quantized already"),
            std::string::npos);
  EXPECT_NE(error_of(ErrorKind::Usage, [&] { quantize_checkpoint(kT5, q4.path(), with_weights(WeightFormat::I8), false); })
                .find("not empty (use --force"),
            std::string::npos);
  EXPECT_NE(error_of(ErrorKind::Usage, [&] { quantize_checkpoint(kT5, again.path(), LoadOptions{}, false); })
                .find("choose the format with --weights"),
            std::string::npos);
  EXPECT_TRUE(fs::is_empty(again.path()));
  // A folder inside the source is not copied into itself.
  TempDir source;
  for (const auto& e : fs::directory_iterator(kT5)) fs::copy(e.path(), source.path(e.path().filename().string()));
  quantize_checkpoint(source.path(), source.path("int8"), with_weights(WeightFormat::I8), false);
  EXPECT_FALSE(fs::exists(source.path("int8/int8")));
  EXPECT_NO_THROW(Blip2Model m(source.path("int8")));
  // --force replaces the files it writes.
  quantize_checkpoint(kT5, q4.path(), with_weights(WeightFormat::I8), true);
  EXPECT_NO_THROW(Blip2Model m(q4.path(), with_weights(WeightFormat::I8)));
}

TEST(QuantizedCheckpoint, TheCommandWritesALoadableCopyAndReportsIt) {
  TempDir out;
  // The global options may follow the command, as the usage writes it.
  const CliRun q = run_cli({"quantize", "--model", kT5, "--weights", "int4", "--out", out.path(), "--json"});
  ASSERT_EQ(q.status, 0) << q.err;
  const auto j = nlohmann::json::parse(q.out);
  EXPECT_EQ(j["formats"], "vision int8, qformer int4, lm int4");
  EXPECT_EQ(j["file_bytes"].get<uint64_t>(), fs::file_size(out.path("model.safetensors")));
  EXPECT_TRUE(fs::exists(out.path("spiece.model")));
  const CliRun mapped = run_cli({"caption", kFixtures + "/images/chelsea.png", "--model", out.path(), "--json"});
  const CliRun converted =
      run_cli({"--weights", "int4", "caption", kFixtures + "/images/chelsea.png", "--model", kT5, "--json"});
  ASSERT_EQ(mapped.status, 0) << mapped.err;
  EXPECT_EQ(mapped.out, converted.out);
  const CliRun no_format = run_cli({"quantize", "--model", kT5, "--out", out.path("x")});
  EXPECT_EQ(no_format.status, 2) << no_format.err;
  EXPECT_NE(no_format.err.find("choose the format with --weights"), std::string::npos) << no_format.err;
}

}  // namespace
