// Loading checkpoints, and rejecting bad ones: the safetensors reader and writer on well-formed and broken
// files, model directories with exactly one thing wrong each (weights, config, tokenizer, shard index),
// sharded checkpoints, and F16 / BF16 weights. Every input is built in a fresh temporary directory.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "core/error.h"
#include "core/file.h"
#include "generate/generate.h"
#include "image/image.h"
#include "io/checkpoint.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "model/blip2.h"
#include "model/t5.h"
#include "support.h"

using namespace blip2;
namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

namespace {

const std::string kFixtures = BLIP2_FIXTURES_DIR;
const std::string kTinyDir = BLIP2_TINY_T5_DIR;
const std::string kTinyWeights = kTinyDir + "/model.safetensors";

// ---------------------------------------------------------------------------------------------------------
// Helpers: temporary directories, raw bytes, hand-made safetensors files, error assertions.

class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    std::random_device rd;
    path_ = fs::temp_directory_path() / ("blip2-test-" + std::to_string(getpid()) + "-" +
                                         std::to_string(counter++) + "-" + std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out) << path;
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A safetensors file exactly as given: header length, header text, data. No checks, no padding.
std::string raw_safetensors(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

template <class T>
std::string bytes_of(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// A tensor in any dtype, as raw little-endian bytes.
struct RawTensor {
  std::string name, dtype;
  Shape shape;
  std::string bytes;
};

// Writes tensors of any dtype (the library's writer writes F32 only); pads the header so data starts at a
// multiple of 8, as the safetensors reference writer does.
void write_raw(const std::string& path, const std::vector<RawTensor>& tensors) {
  ordered_json h = ordered_json::object();
  uint64_t off = 0;
  std::string data;
  for (const auto& t : tensors) {
    h[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
    data += t.bytes;
  }
  std::string hs = h.dump();
  while (hs.size() % 8 != 0) hs.push_back(' ');
  write_bytes(path, raw_safetensors(hs, data));
}

// Every tensor of a file as float32, in the file's (sorted) order.
using Tensors = std::vector<std::pair<std::string, Tensor>>;

Tensors read_all(const std::string& path) {
  SafetensorsFile f(path);
  Tensors out;
  for (const auto& [name, e] : f.entries()) out.emplace_back(name, f.tensor(name));
  return out;
}

void write_all(const std::string& path, const Tensors& ts) {
  std::vector<NamedTensor> named;
  for (const auto& [name, t] : ts) named.push_back({name, &t});
  write_safetensors(path, named);
}

Tensor* find_tensor(Tensors& ts, const std::string& name) {
  for (auto& [n, t] : ts)
    if (n == name) return &t;
  ADD_FAILURE() << "the bundled model has no tensor " << name;
  return nullptr;
}

// float32 -> bfloat16 / float16, round to nearest even (NaN and overflow handled; weights never need it).
uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40);
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

uint16_t to_f16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  const uint32_t a = b & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00;      // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00;     // >= 65520 rounds to infinity
  if (a < 0x38800000u) {                          // below 2^-14: a float16 subnormal (or zero)
    float af;
    std::memcpy(&af, &a, 4);
    return sign | static_cast<uint16_t>(std::nearbyint(af * 16777216.0f));  // units of 2^-24
  }
  uint32_t m = a - (112u << 23);  // rebias the exponent from 127 to 15
  m += 0xfffu + ((m >> 13) & 1u);
  return sign | static_cast<uint16_t>(m >> 13);
}

std::string encode_as(const Tensor& t, const std::string& dtype) {
  if (dtype == "F32") return bytes_of(t.data);
  std::vector<uint16_t> h(t.data.size());
  for (size_t i = 0; i < h.size(); ++i) h[i] = dtype == "BF16" ? to_bf16(t.data[i]) : to_f16(t.data[i]);
  return bytes_of(h);
}

// The float32 values that `dtype` stores for t (what a correct loader must compute with).
Tensor rounded_to(const Tensor& t, const std::string& dtype) {
  Tensor r = t;
  for (auto& v : r.data) v = dtype == "BF16" ? bf16_to_f32(to_bf16(v)) : dtype == "F16" ? f16_to_f32(to_f16(v)) : v;
  return r;
}

// f() must throw blip2::Error of `kind` whose message contains every needle.
::testing::AssertionResult throws_error(const std::function<void()>& f, ErrorKind kind,
                                        const std::vector<std::string>& needles) {
  try {
    f();
  } catch (const Error& e) {
    const std::string msg = e.what();
    if (e.kind() != kind)
      return ::testing::AssertionFailure() << "error kind " << static_cast<int>(e.kind()) << " instead of "
                                           << static_cast<int>(kind) << ": " << msg;
    for (const auto& n : needles)
      if (msg.find(n) == std::string::npos)
        return ::testing::AssertionFailure() << "message lacks \"" << n << "\": " << msg;
    std::printf("  error: %s\n", msg.c_str());
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-blip2 exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

::testing::AssertionResult model_error(const std::string& dir, const std::vector<std::string>& needles) {
  return throws_error([&] { Blip2Model m(dir); }, ErrorKind::Model, needles);
}

::testing::AssertionResult file_error(const std::string& path, const std::vector<std::string>& needles) {
  std::vector<std::string> all = needles;
  all.push_back(path);  // every message names the file
  return throws_error([&] { SafetensorsFile f(path); }, ErrorKind::Model, all);
}

::testing::AssertionResult bitwise_equal(const Tensor& a, const Tensor& b) {
  if (a.shape != b.shape)
    return ::testing::AssertionFailure() << "shapes " << shape_str(a.shape) << " vs " << shape_str(b.shape);
  for (int64_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a.data[i], &b.data[i], 4) != 0)
      return ::testing::AssertionFailure() << "element " << i << ": " << a.data[i] << " vs " << b.data[i];
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------------------
// The safetensors reader and writer.

TEST(Safetensors, WriteThenReadRoundTrip) {
  TempDir tmp;
  const std::string path = tmp / "t.safetensors";
  Tensor a({2, 3}), scalar(Shape{}), empty({0, 4}), b({5});
  a.data = {1.5f, -2.25f, 0.0f, -0.0f, 1e-40f /* subnormal */, 3.4e38f};
  scalar.data = {42.0f};
  b.data = {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
            std::numeric_limits<float>::quiet_NaN(), 7.0f, -1e-7f};
  // Written order is not alphabetical, to check nothing depends on it.
  write_safetensors(path, {{"z.a", &a}, {"scalar", &scalar}, {"empty", &empty}, {"b", &b}});

  SafetensorsFile f(path);
  EXPECT_EQ(f.path(), path);
  ASSERT_EQ(f.entries().size(), 4u);
  const std::vector<std::pair<std::string, const Tensor*>> want = {
      {"z.a", &a}, {"scalar", &scalar}, {"empty", &empty}, {"b", &b}};
  for (const auto& [name, t] : want) {
    SCOPED_TRACE(name);
    const TensorEntry* e = f.find(name);
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->dtype, "F32");
    EXPECT_EQ(e->shape, t->shape);
    EXPECT_EQ(e->nbytes, static_cast<size_t>(t->size()) * 4);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(e->data) % 4, 0u) << "data must stay aligned";
    const Weight w = f.weight(name);
    EXPECT_EQ(w.dtype, DType::F32);
    EXPECT_EQ(w.shape, t->shape);
    EXPECT_TRUE(bitwise_equal(f.tensor(name), *t));
  }
  EXPECT_EQ(f.find("missing"), nullptr);
  EXPECT_TRUE(throws_error([&] { f.weight("missing"); }, ErrorKind::Model, {path, "no tensor named 'missing'"}));
  EXPECT_TRUE(throws_error([&] { f.tensor("missing"); }, ErrorKind::Model, {"'missing'"}));

  // The writer's output is a valid file for any reader: 8-aligned data start, header is the JSON object.
  const std::string raw = read_bytes(path);
  uint64_t hlen = 0;
  std::memcpy(&hlen, raw.data(), 8);
  EXPECT_EQ((8 + hlen) % 8, 0u);
  const json h = json::parse(raw.substr(8, hlen));
  EXPECT_EQ(h["z.a"]["data_offsets"], json({0, 24}));
  EXPECT_EQ(raw.size(), 8 + hlen + (6 + 1 + 0 + 5) * 4);
}

TEST(Safetensors, WeightsOutliveTheFileObject) {
  // A Weight keeps the mapping alive after its SafetensorsFile is gone (models hold weights, not files).
  TempDir tmp;
  Tensor t({3});
  t.data = {1, 2, 3};
  write_safetensors(tmp / "t.safetensors", {{"t", &t}});
  Weight w;
  {
    SafetensorsFile f(tmp / "t.safetensors");
    w = f.weight("t");
  }
  fs::remove(tmp / "t.safetensors");
  EXPECT_EQ(w.f32(), std::vector<float>({1, 2, 3}));
}

TEST(Safetensors, ReadsHandWrittenDtypesAndMetadata) {
  TempDir tmp;
  const std::string path = tmp / "t.safetensors";
  Tensor v({4});
  v.data = {1.0f, -0.5f, 3.140625f, 65504.0f};  // exact in F16; BF16 rounds 65504 to 65536
  const std::vector<uint16_t> f16 = {0x3c00, 0xb800, 0x4248, 0x7bff};
  const std::vector<uint16_t> bf16 = {0x3f80, 0xbf00, 0x4049, 0x4780};
  // Hand-written: __metadata__ first, an integer tensor the float accessors must refuse.
  const std::string header =
      R"({"__metadata__":{"format":"pt"},)"
      R"("h":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]},)"
      R"("i":{"dtype":"I64","shape":[1],"data_offsets":[16,24]}})";
  std::string padded = header;
  while ((padded.size() + 8) % 8 != 0) padded.push_back(' ');
  write_bytes(path, raw_safetensors(padded, bytes_of(f16) + bytes_of(bf16) + le64(7)));

  SafetensorsFile f(path);
  EXPECT_EQ(f.entries().size(), 3u) << "__metadata__ is not a tensor";
  EXPECT_EQ(f.find("__metadata__"), nullptr);
  EXPECT_EQ(f.weight("h").dtype, DType::F16);
  EXPECT_EQ(f.tensor("h").data, v.data);
  EXPECT_EQ(f.weight("b").dtype, DType::BF16);
  EXPECT_EQ(f.tensor("b").shape, Shape({2, 2}));
  EXPECT_EQ(f.tensor("b").data, std::vector<float>({1.0f, -0.5f, 3.140625f, 65536.0f}));
  ASSERT_NE(f.find("i"), nullptr);
  EXPECT_EQ(f.find("i")->dtype, "I64");
  EXPECT_EQ(f.find("i")->nbytes, 8u);
  EXPECT_TRUE(throws_error([&] { f.weight("i"); }, ErrorKind::Model, {path, "'i'", "I64", "expected F32, F16 or BF16"}));

  // The test's own converters agree with the library's decoders.
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(to_f16(v.data[i]), f16[i]);
    EXPECT_EQ(to_bf16(v.data[i]), bf16[i]);
  }
}

TEST(Safetensors, MissingFileOrDirectory) {
  TempDir tmp;
  EXPECT_TRUE(file_error(tmp / "nope.safetensors", {"cannot open"}));
  EXPECT_TRUE(file_error(tmp.str(), {"not a regular file"}));
}

TEST(Safetensors, TruncatedFiles) {
  TempDir tmp;
  const std::string full = read_bytes(kTinyWeights);
  uint64_t hlen = 0;
  std::memcpy(&hlen, full.data(), 8);
  ASSERT_GT(full.size(), 8 + hlen + 1000);
  const std::vector<std::pair<size_t, std::string>> cuts = {
      {0, "truncated safetensors file (0 bytes"},
      {4, "truncated safetensors file (4 bytes"},
      {8, "bad safetensors header length"},
      {8 + hlen / 2, "bad safetensors header length"},
      {8 + hlen - 1, "bad safetensors header length"},
      {8 + hlen + (full.size() - 8 - hlen) / 2, "lie outside the file's"},
      {full.size() - 1, "lie outside the file's"},
  };
  for (const auto& [size, why] : cuts) {
    SCOPED_TRACE("cut at " + std::to_string(size) + " of " + std::to_string(full.size()));
    const std::string path = tmp / ("cut" + std::to_string(size) + ".safetensors");
    write_bytes(path, full.substr(0, size));
    EXPECT_TRUE(file_error(path, {why, "truncated"}));
  }
  // A cut exactly at the end of the header leaves every tensor outside the (empty) data region.
  const std::string path = tmp / "header_only.safetensors";
  write_bytes(path, full.substr(0, 8 + hlen));
  EXPECT_TRUE(file_error(path, {"lie outside the file's 0 data bytes"}));
}

TEST(Safetensors, HeaderLengthBeyondTheFile) {
  TempDir tmp;
  const std::string body = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  for (uint64_t len : {uint64_t(body.size() + 5), uint64_t(1000), uint64_t(200) << 20,
                       std::numeric_limits<uint64_t>::max()}) {
    SCOPED_TRACE(len);
    const std::string path = tmp / "long.safetensors";
    write_bytes(path, le64(len) + body + std::string(4, '\0'));
    EXPECT_TRUE(file_error(path, {"bad safetensors header length " + std::to_string(len)}));
  }
}

TEST(Safetensors, DeeplyNestedHeaderIsRejectedWithoutOverflowingTheStack) {
  TempDir tmp;
  const size_t depth = 200000;
  const std::string arrays = std::string(depth, '[') + std::string(depth, ']');
  write_bytes(tmp / "a.safetensors", raw_safetensors(arrays, ""));
  EXPECT_TRUE(file_error(tmp / "a.safetensors", {"header is not a JSON object"}));
  std::string objects;
  for (size_t i = 0; i < depth; ++i) objects += "{\"a\":";
  objects += '1';
  objects.append(depth, '}');
  write_bytes(tmp / "o.safetensors", raw_safetensors(objects, ""));
  EXPECT_TRUE(file_error(tmp / "o.safetensors", {"tensor 'a': malformed header entry"}));
}

// One header per case, with data bytes enough for every offset it names.
struct BadHeader {
  const char* name;
  std::string header;
  std::string why;
};

class SafetensorsBadHeader : public ::testing::TestWithParam<BadHeader> {};

TEST_P(SafetensorsBadHeader, RejectedWithItsReason) {
  TempDir tmp;
  const std::string path = tmp / "bad.safetensors";
  write_bytes(path, raw_safetensors(GetParam().header, std::string(64, '\0')));
  EXPECT_TRUE(file_error(path, {GetParam().why}));
}

std::string entry(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return R"({"ok":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"t":{"dtype":)" + dtype + R"(,"shape":)" +
         shape + R"(,"data_offsets":)" + offsets + "}}";
}

INSTANTIATE_TEST_SUITE_P(
    Cases, SafetensorsBadHeader,
    ::testing::Values(
        BadHeader{"NotJson", "this is not json at all", "header is not a JSON object"},
        BadHeader{"TruncatedJson", R"({"t":{"dtype":"F32")", "header is not a JSON object"},
        BadHeader{"EmptyHeader", "", "header is not a JSON object"},
        BadHeader{"JsonArray", R"([{"dtype":"F32","shape":[1],"data_offsets":[0,4]}])", "header is not a JSON object"},
        BadHeader{"JsonString", R"("F32")", "header is not a JSON object"},
        BadHeader{"EntryNotObject", R"({"t":[1,2]})", "tensor 't': malformed header entry"},
        BadHeader{"NoDtype", R"({"t":{"shape":[1],"data_offsets":[0,4]}})", "tensor 't': malformed header entry"},
        BadHeader{"NoShape", R"({"t":{"dtype":"F32","data_offsets":[0,4]}})", "tensor 't': malformed header entry"},
        BadHeader{"NoOffsets", R"({"t":{"dtype":"F32","shape":[1]}})", "tensor 't': malformed header entry"},
        BadHeader{"ThreeOffsets", entry(R"("F32")", "[1]", "[0,4,8]"), "tensor 't': malformed header entry"},
        BadHeader{"DtypeNotString", entry("4", "[1]", "[8,12]"), "tensor 't': malformed header entry"},
        BadHeader{"ShapeNotArray", entry(R"("F32")", "4", "[8,12]"), "tensor 't': malformed header entry"},
        BadHeader{"OffsetsOutsideData", entry(R"("F32")", "[4]", "[56,72]"), "tensor 't': data offsets [56, 72) lie outside"},
        BadHeader{"OffsetsFarOutside", entry(R"("F32")", "[1]", "[18446744073709551611,18446744073709551615]"),
                  "tensor 't': data offsets"},
        BadHeader{"BeginAfterEnd", entry(R"("F32")", "[1]", "[12,8]"), "tensor 't': data offsets [12, 8) are reversed"},
        BadHeader{"NegativeOffset", entry(R"("F32")", "[1]", "[-4,0]"), "data_offsets must be non-negative integers"},
        BadHeader{"FractionalOffset", entry(R"("F32")", "[1]", "[8,12.0]"), "data_offsets must be non-negative integers"},
        BadHeader{"SizeMismatch", entry(R"("F32")", "[2,2]", "[8,20]"), "tensor 't': holds 12 bytes but F32 [2, 2] needs 16"},
        BadHeader{"SizeMismatchF16", entry(R"("F16")", "[3]", "[8,20]"), "holds 12 bytes but F16 [3] needs 6"},
        BadHeader{"UnknownDtype", entry(R"("Q4_K")", "[1]", "[8,12]"), "tensor 't': unknown dtype Q4_K"},
        BadHeader{"LowercaseDtype", entry(R"("f32")", "[1]", "[8,12]"), "unknown dtype f32"},
        BadHeader{"NegativeShape", entry(R"("F32")", "[-1,4]", "[8,12]"), "tensor 't': shape must hold non-negative integers"},
        BadHeader{"FractionalShape", entry(R"("F32")", "[1.5]", "[8,12]"), "shape must hold non-negative integers"},
        BadHeader{"StringShape", entry(R"("F32")", R"(["1"])", "[8,12]"), "shape must hold non-negative integers"},
        BadHeader{"NestedShape", entry(R"("F32")", "[[1]]", "[8,12]"), "shape must hold non-negative integers"},
        BadHeader{"HugeShape", entry(R"("F32")", "[4294967296,4294967296]", "[8,12]"), "tensor 't': shape too large"},
        BadHeader{"OverflowingShape", entry(R"("U8")", "[65536,65536,65536,65536,65536]", "[8,12]"), "shape too large"}),
    [](const ::testing::TestParamInfo<BadHeader>& info) { return std::string(info.param.name); });

// ---------------------------------------------------------------------------------------------------------
// Model directories: a copy of the bundled tiny model, then one thing changed.

class ModelDir {
 public:
  ModelDir() {
    for (const auto& e : fs::directory_iterator(kTinyDir)) fs::copy_file(e.path(), tmp_.path() / e.path().filename());
  }
  std::string str() const { return tmp_.str(); }
  std::string operator/(const std::string& f) const { return tmp_ / f; }

  Tensors tensors() const { return read_all(tmp_ / "model.safetensors"); }
  void set_tensors(const Tensors& ts) const { write_all(tmp_ / "model.safetensors", ts); }
  void edit_tensors(const std::function<void(Tensors&)>& edit) const {
    Tensors ts = tensors();
    edit(ts);
    set_tensors(ts);
  }
  json config() const { return json::parse(read_bytes(tmp_ / "config.json")); }
  void set_config(const json& j) const { write_bytes(tmp_ / "config.json", j.dump(2)); }
  void edit_config(const std::function<void(json&)>& edit) const {
    json j = config();
    edit(j);
    set_config(j);
  }

 private:
  TempDir tmp_;
};

// What the checks compare between two loaded models: every stage and teacher-forced logits.
struct Outputs {
  Encoded enc;
  Tensor logits;  // [1, T, V] on the caption case's forced decoder ids
  std::vector<int32_t> greedy;
};

const Tensor& chelsea_pixels() {
  static const Tensor pixels = preprocess_images({load_image(kFixtures + "/images/chelsea.png")}, 224);
  return pixels;
}

std::vector<int32_t> forced_ids() {
  static const std::vector<int32_t> ids = [] {
    std::ifstream in(kFixtures + "/tiny-blip2-t5/reference.json");
    return json::parse(in)["cases"]["caption"]["forced_decoder_input_ids"][0].get<std::vector<int32_t>>();
  }();
  return ids;
}

Outputs run(const Blip2Model& m) {
  Outputs o;
  o.enc = m.encode(chelsea_pixels(), m.tokenize({"Question: what is this? Answer:"}));
  auto dec = m.start_decoder(o.enc);
  const std::vector<int32_t> ids = forced_ids();
  const int64_t V = dec->vocab_size(), T = static_cast<int64_t>(ids.size());
  o.logits = Tensor({1, T, V});
  for (int64_t t = 0; t < T; ++t) {
    const Tensor l = dec->step({ids[t]});
    std::copy(l.ptr(), l.ptr() + V, o.logits.ptr() + t * V);
  }
  GenerationOptions g;
  g.max_new_tokens = 12;
  o.greedy = generate([&](int expand) { return m.start_decoder(o.enc, expand); }, 1, g, SpecialTokens{})[0][0].ids;
  return o;
}

void expect_bitwise_same(const Outputs& a, const Outputs& b) {
  EXPECT_TRUE(bitwise_equal(a.enc.vision_last_hidden_state, b.enc.vision_last_hidden_state)) << "vision";
  EXPECT_TRUE(bitwise_equal(a.enc.qformer_last_hidden_state, b.enc.qformer_last_hidden_state)) << "qformer";
  EXPECT_TRUE(bitwise_equal(a.enc.language_projection, b.enc.language_projection)) << "projection";
  EXPECT_TRUE(bitwise_equal(a.enc.encoder_last_hidden_state, b.enc.encoder_last_hidden_state)) << "encoder";
  EXPECT_EQ(a.enc.input_mask, b.enc.input_mask);
  EXPECT_TRUE(bitwise_equal(a.logits, b.logits)) << "logits";
  EXPECT_EQ(a.greedy, b.greedy);
}

TEST(ModelDirectory, CopyOfTheBundledModelLoads) {
  // The baseline every mutation below departs from, and a check that the rewrite helper is lossless.
  ModelDir dir;
  dir.edit_tensors([](Tensors&) {});
  const Blip2Model copy(dir.str());
  const Blip2Model bundled(kTinyDir);
  expect_bitwise_same(run(copy), run(bundled));
}

TEST(ModelDirectory, LoadingReportsProgressUpToEveryByte) {
  std::vector<Checkpoint::LoadProgress> seen;
  LoadOptions lo;
  lo.weights = WeightFormat::I8;  // the converting load, where the time goes on a real model
  const Blip2Model m(BLIP2_TINY_T5_DIR, lo, [&](const Checkpoint::LoadProgress& p) { seen.push_back(p); });
  ASSERT_GT(seen.size(), 100u);  // once per tensor
  EXPECT_EQ(seen.front().shards_opened, 1);
  EXPECT_EQ(seen.front().shards, 1);
  for (size_t i = 1; i < seen.size(); ++i) EXPECT_GE(seen[i].bytes_taken, seen[i - 1].bytes_taken);
  EXPECT_EQ(seen.back().bytes_taken, seen.back().bytes_total);  // every tensor of the file is used
  // all of the file but its 8-byte length and JSON header
  const std::string file = std::string(BLIP2_TINY_T5_DIR) + "/model.safetensors";
  std::ifstream in(file, std::ios::binary);
  uint64_t header = 0;
  in.read(reinterpret_cast<char*>(&header), 8);
  EXPECT_EQ(seen.back().bytes_total, std::filesystem::file_size(file) - 8 - header);
}

TEST(ModelDirectory, MissingDirectory) {
  TempDir tmp;
  EXPECT_TRUE(model_error(tmp / "no-such-model", {tmp / "no-such-model", "model directory not found"}));
  write_bytes(tmp / "file", "x");
  EXPECT_TRUE(model_error(tmp / "file", {"model directory not found"}));
}

TEST(ModelDirectory, NoWeights) {
  ModelDir dir;
  fs::remove(dir / "model.safetensors");
  EXPECT_TRUE(model_error(dir.str(), {"no model.safetensors or model.safetensors.index.json"}));
}

TEST(ModelDirectory, TensorWithWrongShape) {
  ModelDir dir;
  const std::string name = "vision_model.encoder.layers.1.mlp.fc1.weight";
  dir.edit_tensors([&](Tensors& ts) {
    Tensor* t = find_tensor(ts, name);
    ASSERT_EQ(t->shape, Shape({128, 64}));
    t->shape = {64, 128};  // same element count: the shape itself must be checked, not just the size
  });
  EXPECT_TRUE(model_error(dir.str(), {dir / "model.safetensors", "'" + name + "'", "has shape [64, 128]",
                                      "config implies [128, 64]"}));
}

TEST(ModelDirectory, TensorWithWrongSize) {
  ModelDir dir;
  dir.edit_tensors([](Tensors& ts) { *find_tensor(ts, "language_projection.bias") = Tensor({63}); });
  EXPECT_TRUE(model_error(dir.str(), {"'language_projection.bias'", "[63]", "[64]"}));
}

TEST(ModelDirectory, MissingTensor) {
  ModelDir dir;
  const std::string name = "qformer.encoder.layer.2.crossattention.attention.value.bias";
  dir.edit_tensors([&](Tensors& ts) {
    const auto before = ts.size();
    std::erase_if(ts, [&](const auto& p) { return p.first == name; });
    ASSERT_EQ(ts.size(), before - 1);
  });
  EXPECT_TRUE(model_error(dir.str(), {"missing tensor", "'" + name + "'"}));
}

TEST(ModelDirectory, UnexpectedExtraTensor) {
  ModelDir dir;
  // A fourth vision layer: the config says three, so this checkpoint does not match it.
  dir.edit_tensors([](Tensors& ts) { ts.emplace_back("vision_model.encoder.layers.3.mlp.fc1.bias", Tensor({128})); });
  EXPECT_TRUE(model_error(dir.str(), {"1 tensor(s) the config does not account for",
                                      "vision_model.encoder.layers.3.mlp.fc1.bias"}));
}

TEST(ModelDirectory, ControlCharactersFromModelFilesArePrintedEscaped) {
  // A config value and a tensor name carrying terminal escape sequences (OSC title, C1 CSI, newline) reach
  // the message escaped: nothing in it can drive a terminal, and it stays one line.
  const auto expect_escaped = [](const std::string& dir, const std::string& escaped) {
    try {
      Blip2Model m(dir);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      const std::string w = e.what();
      for (const char* raw : {"\x1b", "\x07", "\n", "\xc2\x9b"}) EXPECT_EQ(w.find(raw), std::string::npos) << w;
      EXPECT_NE(w.find(escaped), std::string::npos) << w;
    }
  };
  const std::string evil = "blip\x1b]0;owned\x07\xc2\x9b" "31m\n";
  const std::string shown = "blip\\x1b]0;owned\\x07\\u009b31m\\x0a";
  ModelDir config;
  config.edit_config([&](json& j) { j["model_type"] = evil; });
  expect_escaped(config.str(), "model_type = \"" + shown + "\"");
  ModelDir weights;
  weights.edit_tensors([&](Tensors& ts) { ts.emplace_back(evil, Tensor({1})); });
  expect_escaped(weights.str(), shown);
}

TEST(ModelDirectory, IntegerTensorWhereFloatIsExpected) {
  for (const std::string dtype : {"I64", "U8"}) {
    SCOPED_TRACE(dtype);
    ModelDir dir;
    const std::string name = "language_projection.bias";
    std::vector<RawTensor> raw;
    for (const auto& [n, t] : dir.tensors()) {
      if (n != name) {
        raw.push_back({n, "F32", t.shape, bytes_of(t.data)});
      } else if (dtype == "I64") {
        raw.push_back({n, dtype, t.shape, bytes_of(std::vector<int64_t>(t.data.size(), 1))});
      } else {
        raw.push_back({n, dtype, t.shape, bytes_of(std::vector<uint8_t>(t.data.size(), 1))});
      }
    }
    write_raw(dir / "model.safetensors", raw);
    EXPECT_TRUE(model_error(dir.str(), {dir / "model.safetensors", "'" + name + "'", "has dtype " + dtype,
                                        "expected F32, F16 or BF16"}));
  }
}

TEST(ModelDirectory, CorruptWeightsFile) {
  ModelDir dir;
  const std::string bytes = read_bytes(dir / "model.safetensors");
  write_bytes(dir / "model.safetensors", bytes.substr(0, bytes.size() - 100));
  EXPECT_TRUE(model_error(dir.str(), {dir / "model.safetensors", "truncated"}));
}

TEST(ModelDirectory, MissingConfig) {
  ModelDir dir;
  fs::remove(dir / "config.json");
  EXPECT_TRUE(model_error(dir.str(), {dir / "config.json", "cannot open"}));
}

TEST(ModelDirectory, ConfigNotJson) {
  ModelDir dir;
  write_bytes(dir / "config.json", "{\"model_type\": \"blip-2\", \"vision_config\": {");
  EXPECT_TRUE(model_error(dir.str(), {dir / "config.json", "not valid JSON"}));
  write_bytes(dir / "config.json", "[1, 2]");
  EXPECT_TRUE(model_error(dir.str(), {dir / "config.json", "expected a JSON object"}));
}

TEST(ModelDirectory, EndlessOrHugeFilesAreRefusedAtTheirSizeCap) {
  // Each file the loader reads, replaced by /dev/zero (never ends) and by a sparse file just over its cap
  // (refused from its size): an error naming the file, not a read without end.
  struct Case {
    const char* file;
    const char* what;
    size_t cap;
  };
  for (const Case c : {Case{"config.json", "config file", kMaxConfigFileBytes},
                       Case{"generation_config.json", "config file", kMaxConfigFileBytes},
                       Case{"tokenizer_config.json", "config file", kMaxConfigFileBytes},
                       Case{"spiece.model", "tokenizer file", kMaxTokenizerFileBytes}}) {
    SCOPED_TRACE(c.file);
    ModelDir dir;
    fs::remove(dir / c.file);
    fs::create_symlink("/dev/zero", dir / c.file);
    const std::string why = std::string(c.what) + " is larger than " + size_str(c.cap);
    EXPECT_TRUE(model_error(dir.str(), {dir / c.file, why}));
    fs::remove(dir / c.file);
    write_bytes(dir / c.file, "");
    fs::resize_file(dir / c.file, c.cap + 1);
    EXPECT_TRUE(model_error(dir.str(), {dir / c.file, why}));
  }
}

TEST(ModelDirectory, EndlessShardIndexIsRefused) {
  ModelDir dir;
  fs::create_symlink("/dev/zero", dir / "model.safetensors.index.json");
  EXPECT_TRUE(model_error(dir.str(), {dir / "model.safetensors.index.json", "index file is larger than 16 MiB"}));
}

struct ConfigEdit {
  const char* name;
  std::function<void(json&)> edit;
  std::vector<std::string> needles;
};

class BadConfig : public ::testing::TestWithParam<ConfigEdit> {};

TEST_P(BadConfig, RejectedNamingTheField) {
  ModelDir dir;
  dir.edit_config(GetParam().edit);
  std::vector<std::string> needles = GetParam().needles;
  needles.push_back(dir / "config.json");
  EXPECT_TRUE(model_error(dir.str(), needles));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BadConfig,
    ::testing::Values(
        ConfigEdit{"ZeroHeads", [](json& j) { j["vision_config"]["num_attention_heads"] = 0; },
                   {"config.json: vision_config.num_attention_heads = 0 is out of range [1, 4096]"}},
        ConfigEdit{"NegativeHidden", [](json& j) { j["vision_config"]["hidden_size"] = -5; },
                   {"vision_config.hidden_size", "= -5 is out of range"}},
        ConfigEdit{"HugeHidden", [](json& j) { j["text_config"]["d_model"] = int64_t(1) << 40; },
                   {"text_config.d_model", "out of range"}},
        ConfigEdit{"HiddenHugeUnsigned", [](json& j) { j["vision_config"]["hidden_size"] = 18446744073709551615u; },
                   {"vision_config.hidden_size = 18446744073709551615 is out of range"}},
        ConfigEdit{"HiddenNotDivisible", [](json& j) { j["qformer_config"]["num_attention_heads"] = 5; },
                   {"qformer_config", "hidden_size (64) must be divisible by num_attention_heads (5)"}},
        ConfigEdit{"ImageNotDivisible", [](json& j) { j["vision_config"]["patch_size"] = 15; },
                   {"vision_config", "image_size (224) must be divisible by patch_size (15)"}},
        ConfigEdit{"EpsTooLarge", [](json& j) { j["vision_config"]["layer_norm_eps"] = 5; },
                   {"vision_config.layer_norm_eps", "must lie in (0, 1)"}},
        ConfigEdit{"EpsNegative", [](json& j) { j["text_config"]["layer_norm_epsilon"] = -1e-6; },
                   {"text_config.layer_norm_epsilon", "must lie in (0, 1)"}},
        ConfigEdit{"QueryTokensString", [](json& j) { j["num_query_tokens"] = "x"; },
                   {"config.json: num_query_tokens must be an integer, got \"x\""}},
        ConfigEdit{"LayersFloat", [](json& j) { j["text_config"]["num_layers"] = 3.5; },
                   {"text_config.num_layers", "must be an integer"}},
        ConfigEdit{"ActivationUnknown", [](json& j) { j["vision_config"]["hidden_act"] = "swish"; },
                   {"vision_config.hidden_act", "not a supported activation"}},
        ConfigEdit{"QkvBiasString", [](json& j) { j["vision_config"]["qkv_bias"] = "yes"; },
                   {"vision_config.qkv_bias", "must be true or false"}},
        ConfigEdit{"VisionConfigNotObject", [](json& j) { j["vision_config"] = 3; },
                   {"vision_config must be an object"}},
        ConfigEdit{"WrongModelType", [](json& j) { j["model_type"] = "blip"; },
                   {"model_type", "not a BLIP-2 checkpoint"}},
        ConfigEdit{"TextConfigMissing", [](json& j) { j.erase("text_config"); }, {"text_config is missing"}},
        ConfigEdit{"TextConfigUnknownFamily", [](json& j) { j["text_config"]["model_type"] = "llama"; },
                   {"config.json: text_config.model_type = \"llama\"", "Flan-T5 (\"t5\") or OPT (\"opt\")"}},
        ConfigEdit{"TextModelTypeMissing", [](json& j) { j["text_config"].erase("model_type"); },
                   {"text_config.model_type", "Flan-T5 (\"t5\") or OPT"}},
        ConfigEdit{"EosOutsideVocab", [](json& j) { j["text_config"]["eos_token_id"] = 5000; },
                   {"special token id 5000", "outside the vocabulary (1152)"}},
        // Below half the bucket count the logarithmic bucket goes negative (a read before the bias table);
        // at exactly half its log is zero and the bucket is NaN cast to an integer.
        ConfigEdit{"MaxDistanceBelowHalfTheBuckets",
                   [](json& j) { j["text_config"]["relative_attention_max_distance"] = 10; },
                   {"text_config.relative_attention_max_distance = 10 must be greater than half of "
                    "relative_attention_num_buckets (32)"}},
        ConfigEdit{"MaxDistanceHalfTheBuckets",
                   [](json& j) { j["text_config"]["relative_attention_max_distance"] = 16; },
                   {"text_config.relative_attention_max_distance = 16 must be greater than half"}},
        ConfigEdit{"TooFewBuckets", [](json& j) { j["text_config"]["relative_attention_num_buckets"] = 2; },
                   {"text_config.relative_attention_num_buckets = 2 is out of range [4, 65536]"}}),
    [](const ::testing::TestParamInfo<ConfigEdit>& info) { return std::string(info.param.name); });

TEST(ModelDirectory, EveryAcceptedBucketConfigIndexesInsideTheTable) {
  // The smallest max_distance the config accepts, for a few bucket counts: every relative position, both
  // directions, lands in [0, num_buckets).
  for (const int buckets : {4, 5, 32, 33, 1000}) {
    for (const int max_distance : {buckets / 2 + 1, buckets, 128}) {
      if (max_distance <= buckets / 2) continue;
      json j = json::parse(read_bytes(kTinyDir + "/config.json"));
      j["text_config"]["relative_attention_num_buckets"] = buckets;
      j["text_config"]["relative_attention_max_distance"] = max_distance;
      EXPECT_NO_THROW(parse_config(j.dump(), "config.json"));
      for (const bool bidirectional : {true, false})
        for (int64_t rel = -5000; rel <= 5000; ++rel) {
          const int b = t5_relative_bucket(rel, bidirectional, buckets, max_distance);
          ASSERT_TRUE(b >= 0 && b < buckets) << buckets << " buckets, max distance " << max_distance << ", rel "
                                             << rel << ": bucket " << b;
        }
    }
  }
}

TEST(ModelDirectory, NonFiniteLogitsAreAnErrorNotACaption) {
  // One weight of token 7's output row non-finite: only that logit is NaN or infinite, and greedy decoding
  // would still choose a token every step. Generation refuses it, naming the value and the token.
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    SCOPED_TRACE(bad);
    ModelDir dir;
    dir.edit_tensors([&](Tensors& ts) {
      for (auto& [name, t] : ts)
        if (name == "language_model.lm_head.weight") t.data[static_cast<size_t>(7 * t.dim(1))] = bad;
    });
    // On a device greedy decoding picks there (ops::greedy_pick): the pick's log-probability gives it away.
    for (const Device device : {Device::CPU, Device::Emulated}) {
      LoadOptions lo;
      lo.device.kind = device;
      const Blip2Model m(dir.str(), lo);
      const Encoded e = m.encode(chelsea_pixels(), m.tokenize({""}));
      for (const int beams : {1, 3}) {
        GenerationOptions g;
        g.num_beams = beams;
        const bool picked = device != Device::CPU && beams == 1;
        try {
          generate([&](int expand) { return m.start_decoder(e, expand); }, 1, g, SpecialTokens{});
          ADD_FAILURE() << "no error with " << beams << " beams on " << device_name(device);
        } catch (const Error& err) {
          EXPECT_EQ(err.kind(), ErrorKind::Model);
          const std::string where = picked ? "(row 0, step 1)" : "(token 7, step 1)";
          EXPECT_NE(std::string(err.what()).find(where + ": its weights or computation produce non-finite"),
                    std::string::npos) << err.what();
        }
      }
    }
  }
}

TEST(ModelDirectory, MissingFieldDefaultsToHuggingFaceAndMismatchesWeights) {
  // Without vision_config.hidden_size the HF default (1408) applies; the weights are 64 wide.
  ModelDir dir;
  dir.edit_config([](json& j) { j["vision_config"].erase("hidden_size"); });
  EXPECT_TRUE(model_error(dir.str(), {dir / "model.safetensors", "tensor 'vision_model.", "config implies [1408"}));
}

TEST(ModelDirectory, ConfigLayerCountMismatchesWeights) {
  ModelDir dir;
  dir.edit_config([](json& j) { j["text_config"]["num_layers"] = 4; });  // the checkpoint has 3 encoder blocks
  EXPECT_TRUE(model_error(dir.str(), {"missing tensor", "language_model.encoder.block.3."}));
  dir.edit_config([](json& j) { j["text_config"]["num_layers"] = 2; });  // ... and now one too many
  EXPECT_TRUE(model_error(dir.str(), {"does not account for", "language_model.encoder.block.2."}));
}

TEST(ModelDirectory, BadGenerationConfig) {
  ModelDir dir;
  write_bytes(dir / "generation_config.json", "not json");
  EXPECT_TRUE(model_error(dir.str(), {dir / "generation_config.json", "not valid JSON"}));
  write_bytes(dir / "generation_config.json", R"({"max_new_tokens": "many"})");
  EXPECT_TRUE(model_error(dir.str(), {dir / "generation_config.json", "max_new_tokens", "must be an integer"}));
}

TEST(ModelDirectory, GenerationConfigTokenOutsideTheVocabulary) {
  // generation_config.json overrides the special ids; an id past the embedding table must be refused at
  // load time, not read out of bounds when decoding starts.
  for (const std::string key : {"decoder_start_token_id", "eos_token_id", "pad_token_id"}) {
    SCOPED_TRACE(key);
    ModelDir dir;
    json g = json::parse(read_bytes(dir / "generation_config.json"));
    g[key] = 5000;
    write_bytes(dir / "generation_config.json", g.dump());
    EXPECT_TRUE(model_error(dir.str(), {dir / "generation_config.json", "5000", "outside the vocabulary (1152)"}));
  }
  // A list of end ids (as Hugging Face allows) takes the first, which must be a valid id as well.
  ModelDir dir;
  write_bytes(dir / "generation_config.json", R"({"eos_token_id": [-1, 1]})");
  EXPECT_TRUE(model_error(dir.str(), {dir / "generation_config.json", "eos_token_id", "out of range"}));
  write_bytes(dir / "generation_config.json", R"({"eos_token_id": [1, 2]})");
  EXPECT_EQ(Blip2Model(dir.str()).config().text.eos_token_id, 1);
}

TEST(ModelDirectory, MissingTokenizer) {
  ModelDir dir;
  fs::remove(dir / "spiece.model");
  EXPECT_TRUE(model_error(dir.str(), {dir / "spiece.model", "tokenizer file missing"}));
}

TEST(ModelDirectory, CorruptTokenizer) {
  ModelDir dir;
  std::mt19937 rng(1234);
  std::string junk(4096, '\0');
  for (auto& ch : junk) ch = static_cast<char>(rng() & 0xff);
  write_bytes(dir / "spiece.model", junk);
  EXPECT_TRUE(model_error(dir.str(), {dir / "spiece.model", "not a usable SentencePiece model: the protobuf is truncated or malformed"}));
  // A truncated real model too (a protobuf cut mid-field).
  write_bytes(dir / "spiece.model", read_bytes(kTinyDir + "/spiece.model").substr(0, 1000));
  EXPECT_TRUE(model_error(dir.str(), {dir / "spiece.model", "not a usable SentencePiece model: the protobuf is truncated or malformed"}));
  write_bytes(dir / "spiece.model", "");
  EXPECT_TRUE(model_error(dir.str(), {dir / "spiece.model"}));
}

// ---------------------------------------------------------------------------------------------------------
// Sharded checkpoints: model.safetensors.index.json and its shard files.

const char* kShard1 = "model-00001-of-00002.safetensors";
const char* kShard2 = "model-00002-of-00002.safetensors";

// Splits the directory's model.safetensors into two shards and an index, and removes the single file.
// Returns the index JSON (tensor name -> shard) so tests can break it.
json shard(const ModelDir& dir) {
  const Tensors ts = dir.tensors();
  Tensors a(ts.begin(), ts.begin() + ts.size() / 2), b(ts.begin() + ts.size() / 2, ts.end());
  write_all(dir / kShard1, a);
  write_all(dir / kShard2, b);
  json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
  for (const auto& [n, t] : a) index["weight_map"][n] = kShard1;
  for (const auto& [n, t] : b) index["weight_map"][n] = kShard2;
  write_bytes(dir / "model.safetensors.index.json", index.dump(2));
  fs::remove(dir / "model.safetensors");
  return index;
}

TEST(ShardedCheckpoint, LoadsAndMatchesTheSingleFile) {
  ModelDir dir;
  shard(dir);
  std::vector<int> opened;  // shards_opened at each report before the first tensor is taken
  const Blip2Model sharded(dir.str(), [&](const Checkpoint::LoadProgress& p) {
    EXPECT_EQ(p.shards, 2);
    if (p.bytes_taken == 0) opened.push_back(p.shards_opened);
  });
  EXPECT_EQ(opened, std::vector<int>({1, 2}));
  const Blip2Model single(kTinyDir);
  const Outputs a = run(sharded), b = run(single);
  expect_bitwise_same(a, b);
  EXPECT_EQ(a.greedy.size(), 12u);
}

TEST(ShardedCheckpoint, IndexWinsOverASingleFile) {
  // With both present, the index is used (as in transformers); a broken index is not papered over.
  ModelDir dir;
  const std::string single = read_bytes(dir / "model.safetensors");
  shard(dir);
  write_bytes(dir / "model.safetensors", single);
  fs::remove(dir / kShard2);
  EXPECT_TRUE(model_error(dir.str(), {"names shard " + std::string(kShard2) + ", which is missing"}));
}

TEST(ShardedCheckpoint, IndexNamesAMissingShard) {
  ModelDir dir;
  shard(dir);
  fs::remove(dir / kShard2);
  EXPECT_TRUE(model_error(dir.str(), {dir / "model.safetensors.index.json",
                                      "names shard " + std::string(kShard2) + ", which is missing"}));
}

TEST(ShardedCheckpoint, IndexPlacesATensorInTheWrongShard) {
  ModelDir dir;
  json index = shard(dir);
  std::string moved;
  for (auto& [name, file] : index["weight_map"].items())
    if (file == kShard2) {
      moved = name;
      file = kShard1;
      break;
    }
  ASSERT_FALSE(moved.empty());
  write_bytes(dir / "model.safetensors.index.json", index.dump());
  EXPECT_TRUE(model_error(dir.str(), {dir / kShard1, "the index places tensor '" + moved + "' here",
                                      "the file lacks it"}));
}

TEST(ShardedCheckpoint, IndexLeavesATensorOut) {
  ModelDir dir;
  json index = shard(dir);
  index["weight_map"].erase("language_projection.weight");
  write_bytes(dir / "model.safetensors.index.json", index.dump());
  EXPECT_TRUE(model_error(dir.str(), {"missing tensor", "'language_projection.weight'"}));
}

TEST(ShardedCheckpoint, ACorruptShard) {
  ModelDir dir;
  shard(dir);
  write_bytes(dir / kShard2, read_bytes(dir / kShard2).substr(0, 4));
  EXPECT_TRUE(model_error(dir.str(), {dir / kShard2, "truncated"}));
}

TEST(ShardedCheckpoint, MalformedIndex) {
  ModelDir dir;
  json index = shard(dir);
  const std::string path = dir / "model.safetensors.index.json";
  for (const std::string& text : {std::string("{\"weight_map\": {"), std::string(""), std::string("[]"),
                                 std::string(R"({"metadata": {}})"), std::string(R"({"weight_map": []})")}) {
    SCOPED_TRACE(text);
    write_bytes(path, text);
    EXPECT_TRUE(model_error(dir.str(), {path, "malformed index"}));
  }
  write_bytes(path, R"({"weight_map": {"language_projection.weight": 3}})");
  EXPECT_TRUE(model_error(dir.str(), {path, "weight_map['language_projection.weight'] is not a file name"}));
  for (const std::string shard_name : {"../model.safetensors", "", "..", "/etc/passwd"}) {
    SCOPED_TRACE(shard_name);
    index["weight_map"]["language_projection.weight"] = shard_name;
    write_bytes(path, index.dump());
    EXPECT_TRUE(model_error(dir.str(), {path, "bad shard file name '" + shard_name + "'"}));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Half-precision weights: an F16 / BF16 copy (or one mixing dtypes) must compute exactly what float32
// weights holding the same rounded values compute; anything else means the half weights are misread.

class HalfPrecision : public ::testing::TestWithParam<std::string> {
 protected:
  // dtype of the i-th tensor (sorted by name) in the copy under test.
  std::string dtype_of(size_t i) const {
    if (GetParam() != "mixed") return GetParam();
    static const char* cycle[] = {"BF16", "F16", "F32"};
    return cycle[i % 3];
  }
};

TEST_P(HalfPrecision, LoadsAndMatchesRoundedFloat32Bitwise) {
  ModelDir half, rounded;
  const Tensors ts = half.tensors();
  std::vector<RawTensor> raw;
  Tensors rounded_ts;
  size_t changed = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& [name, t] = ts[i];
    raw.push_back({name, dtype_of(i), t.shape, encode_as(t, dtype_of(i))});
    rounded_ts.emplace_back(name, rounded_to(t, dtype_of(i)));
    if (rounded_ts.back().second.data != t.data) ++changed;
  }
  ASSERT_GT(changed, ts.size() / 2) << "rounding must change most tensors, or the comparison proves nothing";
  write_raw(half / "model.safetensors", raw);
  rounded.set_tensors(rounded_ts);

  const Blip2Model half_model(half.str());
  const Blip2Model rounded_model(rounded.str());
  const Blip2Model f32_model(kTinyDir);
  // The copy really holds half-precision weights (not silently widened by the test).
  {
    SafetensorsFile f(half / "model.safetensors");
    EXPECT_EQ(f.entries().at(ts[0].first).dtype, dtype_of(0));
    EXPECT_EQ(f.entries().at(ts[0].first).nbytes, static_cast<size_t>(ts[0].second.size()) * (dtype_of(0) == "F32" ? 4 : 2));
  }
  const Outputs h = run(half_model), r = run(rounded_model), f = run(f32_model);
  expect_bitwise_same(h, r);

  // And it runs sensibly: close to the float32 model, yet not identical to it.
  const double rel = test::compare(h.enc.encoder_last_hidden_state, f.enc.encoder_last_hidden_state).rel;
  const double rel_logits = test::compare(h.logits, f.logits).rel;
  std::printf("  %s vs float32: encoder rel %.3g, logits rel %.3g\n", GetParam().c_str(), rel, rel_logits);
  EXPECT_GT(rel, 0.0);
  EXPECT_LT(rel, GetParam() == "F16" ? 1e-2 : 5e-2);
  EXPECT_LT(rel_logits, GetParam() == "F16" ? 1e-2 : 5e-2);
  for (float v : h.logits.data) ASSERT_TRUE(std::isfinite(v));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, HalfPrecision, ::testing::Values("BF16", "F16", "mixed"),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

TEST(HalfPrecision, MisalignedHalfTensorIsRejected) {
  // A header whose length leaves BF16 data on an odd address: refused with a message, not read unaligned.
  TempDir tmp;
  const std::string path = tmp / "odd.safetensors";
  std::string header = R"({"t":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})";
  while ((header.size() + 8) % 2 == 0) header.push_back(' ');
  write_bytes(path, raw_safetensors(header, std::string("\x80\x3f\x00\x40", 4)));
  SafetensorsFile f(path);
  EXPECT_TRUE(throws_error([&] { f.weight("t"); }, ErrorKind::Model, {path, "'t'", "not aligned"}));
}

}  // namespace
