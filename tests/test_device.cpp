// The device layer, run end to end on each device the machine has:
//   emulated  always: the device code path (uploads, row copies, key/value caches on the device, downloads)
//             over the CPU kernels. Every stage must equal the CPU's bit for bit, so any step that reads or
//             writes device memory wrongly shows up, and Tensor::ptr() refusing device tensors catches host
//             code that would touch a GPU's memory.
//   cuda      where this build has CUDA and a GPU is present (skipped otherwise, saying why): every stage
//             within 1e-4 relative of transformers in float32, every decoding setting token for token;
//             f16 / bf16 / int8 stage errors and forced-logit top-1 agreement printed and bounded; batch
//             invariance; the server answering as the engine does alone.
// Plus the parts that need no device: parsing --device, Tensor semantics, the key/value cache, errors.
#include <gtest/gtest.h>

#include <csignal>
#include <map>
#include <memory>
#include <thread>

#include "core/error.h"
#include "cuda/cuda.h"
#include "generate/generate.h"
#include "model/load_options.h"
#include "ops/ops.h"
#include "server/http_server.h"
#include "server_client.h"
#include "support.h"

using namespace blip2;
using namespace blip2::test;

namespace {

const std::string kT5 = BLIP2_TINY_T5_DIR, kOpt = BLIP2_BUNDLED_OPT_DIR;
const std::string kT5Ref = kFixtures + "/tiny-blip2-t5", kOptRef = kFixtures + "/tiny-blip2-opt";
// InstructBLIP: each fixture folder is the model directory and its references together.
const std::string kInstructT5 = kFixtures + "/tiny-instructblip-t5", kVicuna = kFixtures + "/tiny-instructblip-vicuna";

// Models loaded once per (directory, device, format).
const Blip2Model& model(const std::string& dir, Device device, WeightFormat format = WeightFormat::AsStored) {
  static std::map<std::tuple<std::string, Device, WeightFormat>, std::unique_ptr<Blip2Model>> loaded;
  auto& m = loaded[{dir, device, format}];
  if (!m) {
    LoadOptions lo;
    lo.device.kind = device;
    lo.weights = format;
    if (format == WeightFormat::I8) lo.vision_weights = WeightFormat::I8;
    m = std::make_unique<Blip2Model>(dir, lo);
  }
  return *m;
}

// Skips the test when the device is a GPU this process cannot use.
#define SKIP_UNLESS_AVAILABLE(device)                                                                  \
  do {                                                                                                 \
    if ((device) == Device::CUDA && !ops::cuda_available())                                           \
      GTEST_SKIP() << "no GPU to test on (" << cuda::unavailable_reason() << ")";                       \
  } while (0)

// Stage tolerance against transformers: the CPU's on the emulated device (its kernels), 1e-4 on a GPU.
double stage_tolerance(Device d) { return d == Device::CUDA ? 1e-4 : kMaxRel; }

// One fixture case: the model family's directory and reference, the case's name.
struct Case {
  std::string dir, ref, name;
  bool t5() const { return dir == kT5 || dir == kInstructT5; }
  nlohmann::json json() const { return read_json(ref + "/reference.json")["cases"][name]; }
};
std::vector<Case> all_cases() {
  std::vector<Case> out;
  for (const char* n : {"caption", "vqa", "seed_question", "batch2"}) out.push_back({kT5, kT5Ref, n});
  for (const char* n : {"caption", "vqa", "batch2_leftpad"}) out.push_back({kOpt, kOptRef, n});
  for (const char* n : {"caption", "vqa", "seed_question", "batch2"}) out.push_back({kInstructT5, kInstructT5, n});
  for (const char* n : {"caption", "vqa", "batch2_leftpad"}) out.push_back({kVicuna, kVicuna, n});
  return out;
}

Encoded encode(const Blip2Model& m, const nlohmann::json& c) {
  return m.encode(fixture_pixels(c["images"], 224), m.tokenize(c["prompts"].get<std::vector<std::string>>()));
}

// Every stage of a case by the reference's names, on the host.
std::map<std::string, Tensor> stages(const Blip2Model& m, const Case& k) {
  const auto c = k.json();
  const Encoded e = encode(m, c);
  std::map<std::string, Tensor> s = {{"vision_last_hidden_state", on_host(e.vision_last_hidden_state)},
                                     {"qformer_last_hidden_state", on_host(e.qformer_last_hidden_state)},
                                     {"language_projection", on_host(e.language_projection)}};
  if (k.t5()) {
    s["encoder_last_hidden_state"] = on_host(e.encoder_last_hidden_state);
    s["forced_logits"] = forced_logits(m, e, c["forced_decoder_input_ids"].get<std::vector<std::vector<int32_t>>>());
  } else {
    s["prompt_logits"] = m.prompt_logits(e);
  }
  return s;
}

// Reference sequences: T5's start with the decoder start token and may continue past eos with padding;
// Vicuna's continue past its eos (1) with -1.
std::vector<int32_t> reference_ids(const Case& k, const std::vector<int32_t>& seq) {
  if (!k.t5() && k.dir != kVicuna) return seq;
  std::vector<int32_t> out;
  for (size_t i = k.t5() ? 1 : 0; i < seq.size(); ++i) {
    out.push_back(seq[i]);
    if (seq[i] == 1) break;
  }
  return out;
}

std::string case_name(const Case& k) {
  const char* family = k.dir == kInstructT5 ? "InstructT5_" : k.dir == kVicuna ? "Vicuna_" : k.t5() ? "T5_" : "OPT_";
  return family + k.name;
}

// ---- Fixture parity per device ------------------------------------------------------------------------

struct DeviceCase {
  Device device;
  Case c;
};
void PrintTo(const DeviceCase& d, std::ostream* os) { *os << device_name(d.device) << "/" << case_name(d.c); }
std::vector<DeviceCase> device_cases() {
  std::vector<DeviceCase> out;
  for (Device d : {Device::Emulated, Device::CUDA})
    for (const Case& c : all_cases()) out.push_back({d, c});
  return out;
}
std::string device_case_name(const ::testing::TestParamInfo<DeviceCase>& p) {
  return std::string(device_name(p.param.device)) + "_" + case_name(p.param.c);
}

class DeviceParity : public ::testing::TestWithParam<DeviceCase> {};

TEST_P(DeviceParity, EveryStageMatchesTheReference) {
  const auto& [device, k] = GetParam();
  SKIP_UNLESS_AVAILABLE(device);
  const auto got = stages(model(k.dir, device), k);
  const SafetensorsFile ref(k.ref + "/reference.safetensors");
  const auto cpu = device == Device::Emulated ? stages(model(k.dir, Device::CPU), k) : std::map<std::string, Tensor>{};
  for (const auto& [name, t] : got) {
    const Tensor want = ref.tensor(k.name + "/" + name);
    ASSERT_EQ(t.shape, want.shape) << name;
    const Diff d = compare(t, want);
    std::printf("  %-8s %-22s %-26s rel %.3g  max_abs %.3g\n", device_name(device), case_name(k).c_str(), name.c_str(),
                d.rel, d.max_abs);
    EXPECT_LE(d.rel, stage_tolerance(device)) << name;
    if (device == Device::Emulated) {
      EXPECT_EQ(t.data, cpu.at(name).data) << name << ": not the CPU's bits";
    }
  }
}

TEST_P(DeviceParity, EveryDecodingSettingIsExact) {
  const auto& [device, k] = GetParam();
  SKIP_UNLESS_AVAILABLE(device);
  const Blip2Model& m = model(k.dir, device);
  const auto c = k.json();
  const Encoded e = encode(m, c);
  int settings = 0;
  for (const auto& [name, g] : c["generate"].items()) {
    const GenerationOptions o = options_from(g["kwargs"]);
    const auto results = generate([&](int expand) { return m.start_decoder(e, expand); }, static_cast<int>(e.batch()), o,
                                  m.special_tokens());
    const auto want = g["sequences"].get<std::vector<std::vector<int32_t>>>();
    const size_t n = static_cast<size_t>(o.num_return_sequences);
    ASSERT_EQ(results.size() * n, want.size()) << name;
    for (size_t b = 0; b < results.size(); ++b)
      for (size_t i = 0; i < n; ++i)
        EXPECT_EQ(results[b][i].ids, reference_ids(k, want[b * n + i])) << name << " item " << b << " sequence " << i;
    ++settings;
  }
  EXPECT_GE(settings, 1);
}

INSTANTIATE_TEST_SUITE_P(Devices, DeviceParity, ::testing::ValuesIn(device_cases()), device_case_name);

// ---- Continuous batching and batch invariance on the device --------------------------------------------

}  // namespace
namespace blip2 {
void PrintTo(Device d, std::ostream* os) { *os << device_name(d); }
}  // namespace blip2
namespace {

class DeviceBatching : public ::testing::TestWithParam<Device> {};

// The scheduler's moves (beams re-ranked, rows leaving, another decoder's rows joining) give the same logits
// on the device as on the CPU, step by step.
TEST_P(DeviceBatching, RowsJoinLeaveAndReorderAsOnTheCpu) {
  const Device device = GetParam();
  SKIP_UNLESS_AVAILABLE(device);
  for (const std::string& dir : {kT5, kOpt}) {
    const Case k{dir, dir == kT5 ? kT5Ref : kOptRef, dir == kT5 ? "batch2" : "batch2_leftpad"};
    const auto c = k.json();
    std::vector<std::vector<Tensor>> logits(2);
    for (int side = 0; side < 2; ++side) {
      const Blip2Model& m = model(dir, side == 0 ? Device::CPU : device);
      const Encoded e = encode(m, c);
      auto dec = m.start_decoder(e, 2);  // two rows per item
      logits[side].push_back(on_host(dec->start()));
      logits[side].push_back(on_host(dec->step({5, 6, 7, 8})));
      dec->reorder({1, 1, 3});  // a row duplicated, one dropped
      logits[side].push_back(on_host(dec->step({9, 10, 11})));
      auto other = m.start_decoder(select_items(e, 0, 1));
      other->start();
      dec->append(std::move(*other));  // a row joins at its own position
      logits[side].push_back(on_host(dec->step({12, 13, 14, 15})));
    }
    for (size_t s = 0; s < logits[0].size(); ++s) {
      const Diff d = compare(logits[1][s], logits[0][s]);
      std::printf("  %-8s %s step %zu: rel %.3g against the CPU\n", device_name(device), case_name(k).c_str(), s, d.rel);
      if (device == Device::Emulated) EXPECT_EQ(logits[1][s].data, logits[0][s].data) << case_name(k) << " step " << s;
      else EXPECT_LE(d.rel, 1e-4) << case_name(k) << " step " << s;
    }
  }
}

// Each item of a batch gets the greedy and beam captions it gets alone.
TEST_P(DeviceBatching, BatchedItemsDecodeAsAlone) {
  const Device device = GetParam();
  SKIP_UNLESS_AVAILABLE(device);
  for (const std::string& dir : {kT5, kOpt}) {
    const Blip2Model& m = model(dir, device);
    const std::vector<std::string> images = {"chelsea.png", "coffee.png", "astronaut.png"};
    const std::vector<std::string> prompts = {"", "Question: what is this? Answer:", "a photo of"};
    for (int beams : {1, 3}) {
      GenerationOptions o;
      o.max_new_tokens = 8;
      o.num_beams = beams;
      const Encoded all = m.encode(fixture_pixels(images, 224), m.tokenize(prompts));
      const auto batched = generate([&](int e) { return m.start_decoder(all, e); }, 3, o, m.special_tokens());
      for (size_t i = 0; i < images.size(); ++i) {
        const Encoded one = m.encode(fixture_pixels(nlohmann::json::array({images[i]}), 224), m.tokenize({prompts[i]}));
        const auto alone = generate([&](int e) { return m.start_decoder(one, e); }, 1, o, m.special_tokens());
        EXPECT_EQ(batched[i][0].ids, alone[0][0].ids) << dir << " item " << i << " beams " << beams;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, DeviceBatching, ::testing::Values(Device::Emulated, Device::CUDA),
                         [](const auto& p) { return std::string(device_name(p.param)); });

// ---- Half precision and int8 on the device -------------------------------------------------------------

struct FormatCase {
  Device device;
  WeightFormat format;
  double max_logit_rel;  // bound on the forced logits' error against transformers' float32
};
void PrintTo(const FormatCase& f, std::ostream* os) { *os << device_name(f.device) << "/" << weight_format_name(f.format); }
class DeviceFormats : public ::testing::TestWithParam<FormatCase> {};

// Stage errors and top-1 agreement of forced logits with the float32 reference, T5 fixture. On the emulated
// device the numbers are the CPU's own (checked equal); on a GPU they are bounded and printed, to be
// recorded.
TEST_P(DeviceFormats, StageErrorsAndTop1Agreement) {
  const auto& [device, format, max_logit_rel] = GetParam();
  SKIP_UNLESS_AVAILABLE(device);
  const SafetensorsFile ref(kT5Ref + "/reference.safetensors");
  for (const char* name : {"caption", "vqa", "batch2"}) {
    const Case k{kT5, kT5Ref, name};
    const auto got = stages(model(kT5, device, format), k);
    const auto cpu = device == Device::Emulated ? stages(model(kT5, Device::CPU, format), k) : std::map<std::string, Tensor>{};
    for (const auto& [stage, t] : got) {
      const Tensor want = ref.tensor(k.name + "/" + stage);
      const Diff d = compare(t, want);
      std::printf("  %-8s %-5s %-8s %-26s rel %.3g\n", device_name(device), weight_format_name(format), name, stage.c_str(),
                  d.rel);
      if (device == Device::Emulated) {
        EXPECT_EQ(t.data, cpu.at(stage).data) << stage;
      }
      if (stage == "forced_logits") {
        EXPECT_LE(d.rel, max_logit_rel) << name;
        const int64_t V = want.last(), rows = want.rows();
        int agree = 0;
        for (int64_t r = 0; r < rows; ++r) {
          const float* a = t.data.data() + r * V;
          const float* b = want.data.data() + r * V;
          agree += std::max_element(a, a + V) - a == std::max_element(b, b + V) - b;
        }
        std::printf("  %-8s %-5s %-8s forced-logit top-1 agreement %d/%ld\n", device_name(device), weight_format_name(format),
                    name, agree, static_cast<long>(rows));
        EXPECT_GE(agree * 2, rows) << name << ": top-1 agrees on fewer than half the positions";
      }
    }
  }
}

// Bounds: about twice the CPU's measured error in the same format (docs/ARCHITECTURE.md's table), since the
// GPU rounds the activations to the weight's type too.
INSTANTIATE_TEST_SUITE_P(
    Devices, DeviceFormats,
    ::testing::Values(FormatCase{Device::Emulated, WeightFormat::F16, 1e-2}, FormatCase{Device::Emulated, WeightFormat::I8, 0.25},
                      FormatCase{Device::CUDA, WeightFormat::F16, 1e-2}, FormatCase{Device::CUDA, WeightFormat::BF16, 6e-2},
                      FormatCase{Device::CUDA, WeightFormat::I8, 0.25}),
    [](const auto& p) { return std::string(device_name(p.param.device)) + "_" + weight_format_name(p.param.format); });

// ---- The server on the device --------------------------------------------------------------------------

class DeviceServer : public ::testing::TestWithParam<Device> {};

TEST_P(DeviceServer, AnswersAsTheEngineDoesAlone) {
  const Device device = GetParam();
  SKIP_UNLESS_AVAILABLE(device);
  signal(SIGPIPE, SIG_IGN);
  const Blip2Model& m = model(kT5, device);
  server::ServerOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  server::HttpServer srv(m, generation_defaults(kT5), o);
  const int port = srv.bind();
  std::thread th([&] { srv.serve(); });
  srv.wait_until_listening();
  httplib::Client cli("127.0.0.1", port);
  cli.set_read_timeout(120, 0);
  const std::string image = kFixtures + "/images/chelsea.png";
  const auto reply = blip2::testing::post(cli, blip2::testing::ask(image, "what is this?", {{"max_tokens", 8}}));
  srv.shutdown();
  th.join();
  ASSERT_EQ(reply.status, 200) << reply.body;
  GenerationOptions g;
  g.max_new_tokens = 8;
  const Encoded e = m.encode(preprocess_images({load_image(image)}, 224), m.tokenize({"Question: what is this? Answer:"}));
  const auto alone = generate([&](int x) { return m.start_decoder(e, x); }, 1, g, m.special_tokens());
  EXPECT_EQ(blip2::testing::choice_texts(reply), std::vector<std::string>{m.tokenizer().decode(alone[0][0].ids)});
}

INSTANTIATE_TEST_SUITE_P(Devices, DeviceServer, ::testing::Values(Device::Emulated, Device::CUDA),
                         [](const auto& p) { return std::string(device_name(p.param)); });

// ---- What needs no device -------------------------------------------------------------------------------

TEST(DeviceSpec, ParsesTheNamesAndRejectsOthers) {
  EXPECT_EQ(parse_device("cpu").kind, Device::CPU);
  EXPECT_EQ(parse_device("CUDA").kind, Device::CUDA);
  EXPECT_EQ(parse_device("cuda").index, 0);
  EXPECT_EQ(parse_device("cuda:3").index, 3);
  EXPECT_EQ(parse_device("emulated").kind, Device::Emulated);
  EXPECT_EQ(device_name(parse_device("cuda:2")), "cuda:2");
  for (const char* bad : {"", "tpu", "cuda:", "cuda:-1", "cuda:x", "cuda:123456789", "cuda1"}) {
    try {
      parse_device(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Usage);
      EXPECT_NE(std::string(e.what()).find("cpu, cuda"), std::string::npos) << e.what();
    }
  }
}

TEST(DeviceTensor, HostCodeCannotReadDeviceMemory) {
  const Tensor host = random_tensor({3, 5}, 1);
  const Tensor dev = host.to(Device::Emulated);
  EXPECT_THROW((void)dev.ptr(), Error);
  EXPECT_NE(dev.data_ptr(), host.data_ptr());
  Tensor copy = dev;  // deep: a write to the copy leaves the original
  ops::scale(copy, 2.0f);
  EXPECT_EQ(on_host(dev).data, host.data);
  const Tensor doubled = on_host(copy);
  for (int64_t i = 0; i < host.size(); ++i) EXPECT_EQ(doubled.data[i], 2.0f * host.data[i]);
}

TEST(DeviceTensor, OpsRefuseOperandsOnTwoDevices) {
  Tensor a = random_tensor({2, 4}, 1);
  const Tensor b = random_tensor({2, 4}, 2).to(Device::Emulated);
  EXPECT_THROW(ops::add(a, b), Error);
  const std::vector<float> w(16, 0.5f);
  EXPECT_THROW(ops::linear(b, f32_weight(w, 4, 4)), Error);
}

TEST(DeviceTensor, RowCacheGrowsAndKeepsItsRows) {
  ops::RowCache cache(3, Device::Emulated);
  const Tensor src = random_tensor({40, 3}, 3);
  const Tensor dev = src.to(Device::Emulated);
  for (int64_t r = 0; r < 40; r += 5) cache.append(dev, r, 5);
  ASSERT_EQ(cache.rows(), 40);
  Tensor back({40, 3}, Device::Emulated);
  copy_bytes(back.data_ptr(), Device::Emulated, cache.data(), Device::Emulated, 40 * 3 * 4);
  EXPECT_EQ(on_host(back).data, src.data);
  ops::RowCache copy = cache;  // deep: appending to one leaves the other
  copy.append(dev, 0, 1);
  EXPECT_EQ(cache.rows(), 40);
  EXPECT_EQ(copy.rows(), 41);
}

TEST(DeviceErrors, CudaWithoutAGpuSaysWhy) {
  if (ops::cuda_available()) GTEST_SKIP() << "this machine has a GPU";
  LoadOptions lo;
  lo.device = parse_device("cuda");
  try {
    Blip2Model m(kT5, lo);
    ADD_FAILURE() << "loaded on cuda without a GPU";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Usage);
    const std::string msg = e.what();
    EXPECT_TRUE(msg.find("no CUDA support") != std::string::npos || msg.find("cannot run on cuda") != std::string::npos)
        << msg;
  }
}

TEST(DeviceErrors, Int4IsCpuOnly) {
  LoadOptions lo;
  lo.device = parse_device("cuda");
  lo.weights = WeightFormat::I4;
  EXPECT_THROW(weight_converter(lo, LanguageFamily::T5, false), Error);
  lo.weights = WeightFormat::I8;
  lo.lm_weights = WeightFormat::I4;
  EXPECT_THROW(weight_converter(lo, LanguageFamily::T5, false), Error);
}

}  // namespace
