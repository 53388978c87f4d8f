// Generation: every decoding setting of the tiny-blip2-t5 fixture reproduced token for token (greedy, beam
// search with length penalties, repetition penalty, no-repeat n-grams, min_new_tokens, max_new_tokens,
// several returned sequences, a batch whose items finish at different times), the sampling properties, the
// logits processors one by one, and option validation.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <unistd.h>

#include "core/error.h"
#include "generate/generate.h"
#include "image/image.h"
#include "model/blip2.h"

using namespace blip2;

namespace {

const std::string kFixtures = BLIP2_FIXTURES_DIR;

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// Reference sequences start with the decoder start token and may continue past the first eos with padding.
std::vector<int32_t> trim(const std::vector<int32_t>& seq, int32_t eos = 1) {
  std::vector<int32_t> out;
  for (size_t i = 1; i < seq.size(); ++i) {
    out.push_back(seq[i]);
    if (seq[i] == eos) break;
  }
  return out;
}

// Hugging Face generate() keyword arguments -> options.
GenerationOptions options_from_kwargs(const nlohmann::json& kw) {
  GenerationOptions o;
  for (const auto& [k, v] : kw.items()) {
    if (k == "do_sample") o.do_sample = v.get<bool>();
    else if (k == "num_beams") o.num_beams = v.get<int>();
    else if (k == "max_new_tokens") o.max_new_tokens = v.get<int>();
    else if (k == "min_new_tokens") o.min_new_tokens = v.get<int>();
    else if (k == "length_penalty") o.length_penalty = v.get<double>();
    else if (k == "repetition_penalty") o.repetition_penalty = v.get<double>();
    else if (k == "no_repeat_ngram_size") o.no_repeat_ngram_size = v.get<int>();
    else if (k == "num_return_sequences") o.num_return_sequences = v.get<int>();
    else ADD_FAILURE() << "unhandled generate() argument " << k;
  }
  return o;
}

class Fixture {
 public:
  static Fixture& get() {
    static Fixture f;
    return f;
  }
  Blip2Model model{BLIP2_TINY_T5_DIR};
  nlohmann::json cases = read_json(kFixtures + "/tiny-blip2-t5/reference.json")["cases"];

  const Encoded& encoded(const std::string& name) {
    auto it = enc_.find(name);
    if (it != enc_.end()) return it->second;
    const auto& c = cases[name];
    std::vector<RgbImage> imgs;
    for (const auto& img : c["images"]) imgs.push_back(load_image(kFixtures + "/images/" + img.get<std::string>()));
    const PromptBatch p = model.tokenize(c["prompts"].get<std::vector<std::string>>());
    return enc_.emplace(name, model.encode(preprocess_images(imgs, 224), p)).first->second;
  }

  std::vector<std::vector<GeneratedSequence>> run(const std::string& name, const GenerationOptions& o,
                                                  const TokenCallback& cb = nullptr) {
    const Encoded& e = encoded(name);
    const int batch = static_cast<int>(e.encoder_last_hidden_state.dim(0));
    return generate([&](int expand) { return model.start_decoder(e, expand); }, batch, o, SpecialTokens{}, cb);
  }

 private:
  std::map<std::string, Encoded> enc_;
};

// ---- Every fixture setting, exactly --------------------------------------------------------------------

struct SettingCase {
  std::string name, setting;
};

void PrintTo(const SettingCase& c, std::ostream* os) { *os << c.name << "/" << c.setting; }

class FixtureSetting : public ::testing::TestWithParam<SettingCase> {};

TEST_P(FixtureSetting, SequencesExact) {
  Fixture& f = Fixture::get();
  const auto& g = f.cases[GetParam().name]["generate"][GetParam().setting];
  const GenerationOptions o = options_from_kwargs(g["kwargs"]);
  const auto results = f.run(GetParam().name, o);
  const auto want = g["sequences"].get<std::vector<std::vector<int32_t>>>();
  const size_t nrs = static_cast<size_t>(o.num_return_sequences);
  ASSERT_EQ(results.size() * nrs, want.size());
  for (size_t b = 0; b < results.size(); ++b) {
    ASSERT_EQ(results[b].size(), nrs);
    for (size_t i = 0; i < nrs; ++i) {
      EXPECT_EQ(results[b][i].ids, trim(want[b * nrs + i])) << "item " << b << " sequence " << i;
      EXPECT_EQ(f.model.tokenizer().decode(results[b][i].ids), g["text"][b * nrs + i].get<std::string>())
          << "item " << b << " sequence " << i;
    }
  }
}

std::vector<SettingCase> all_settings() {
  std::vector<SettingCase> out;
  const auto cases = read_json(kFixtures + "/tiny-blip2-t5/reference.json")["cases"];
  for (const auto& [name, c] : cases.items())
    for (const auto& [setting, g] : c["generate"].items()) out.push_back({name, setting});
  return out;
}

std::string setting_name(const ::testing::TestParamInfo<SettingCase>& p) {
  std::string s = p.param.name + "_" + p.param.setting;
  for (char& ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
}

INSTANTIATE_TEST_SUITE_P(TinyT5, FixtureSetting, ::testing::ValuesIn(all_settings()), setting_name);

TEST(Generate, FixtureCoversEverySetting) {
  // The issue's list of settings, so that a fixture regenerated without one is noticed.
  const auto cases = read_json(kFixtures + "/tiny-blip2-t5/reference.json")["cases"];
  for (const char* name : {"caption", "vqa", "seed_question", "batch2"})
    for (const char* s : {"greedy", "beam3", "beam5_lp2", "greedy_rep1.5", "greedy_ngram2", "beam3_min8",
                          "beam5_lpm1_max10", "beam5_ret3"})
      EXPECT_TRUE(cases[name]["generate"].contains(s)) << name << "/" << s;
}

TEST(Generate, BeamScoresAreSortedAndNormalised) {
  Fixture& f = Fixture::get();
  GenerationOptions o;
  o.num_beams = 5;
  o.num_return_sequences = 5;
  o.max_new_tokens = 12;
  for (const auto& seqs : f.run("batch2", o)) {
    ASSERT_EQ(seqs.size(), 5u);
    for (size_t i = 1; i < seqs.size(); ++i) EXPECT_GE(seqs[i - 1].score, seqs[i].score);
    for (const auto& s : seqs) {
      EXPECT_LT(s.score, 0.0f);
      EXPECT_GT(s.score, -20.0f);  // an average log-probability per token, not a sum over 12 tokens
    }
  }
}

TEST(Generate, GreedyStreamsEveryToken) {
  Fixture& f = Fixture::get();
  GenerationOptions o;
  o.max_new_tokens = 12;
  std::vector<std::vector<int32_t>> streamed(2);
  const auto results = f.run("batch2", o, [&](int row, int32_t tok) { streamed.at(row).push_back(tok); });
  for (size_t b = 0; b < 2; ++b) EXPECT_EQ(streamed[b], results[b][0].ids);
}

// ---- Sampling ------------------------------------------------------------------------------------------

std::vector<double> softmax(const std::vector<float>& s) {
  const float mx = *std::max_element(s.begin(), s.end());
  std::vector<double> p(s.size());
  double sum = 0;
  for (size_t i = 0; i < s.size(); ++i) sum += (p[i] = std::exp(double(s[i]) - mx));
  for (double& x : p) x /= sum;
  return p;
}

// Draws the first token `n` times, each from a fresh seed, and checks every token's frequency against
// `want` within 5 standard deviations (plus one count): a per-token bound that a correct sampler fails
// with probability well under 1e-4 over the whole vocabulary.
void expect_frequencies(const std::vector<float>& logits, const GenerationOptions& o, const std::vector<double>& want,
                        int n) {
  std::vector<int> count(logits.size(), 0);
  for (int seed = 0; seed < n; ++seed) {
    std::vector<float> s = logits;
    warp_scores(s.data(), static_cast<int64_t>(s.size()), o);
    std::mt19937_64 rng(static_cast<uint64_t>(seed));
    ++count[sample_token(s.data(), static_cast<int64_t>(s.size()), rng)];
  }
  for (size_t i = 0; i < logits.size(); ++i) {
    const double f = double(count[i]) / n, p = want[i];
    const double tol = 5.0 * std::sqrt(p * (1 - p) / n) + 1.0 / n;
    EXPECT_NEAR(f, p, tol) << "token " << i;
  }
}

TEST(Sampling, FrequenciesFollowTheSoftmax) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  std::vector<float> logits(40);
  for (float& x : logits) x = nd(rng);
  GenerationOptions o;
  o.do_sample = true;
  o.top_k = 0;
  expect_frequencies(logits, o, softmax(logits), 20000);
}

TEST(Sampling, TemperatureScalesTheLogits) {
  const std::vector<float> logits = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f, -3.0f};
  GenerationOptions o;
  o.do_sample = true;
  o.top_k = 0;
  o.temperature = 0.5;
  std::vector<float> scaled;
  for (float x : logits) scaled.push_back(x / 0.5f);
  expect_frequencies(logits, o, softmax(scaled), 20000);
  o.temperature = 3.0;
  scaled.clear();
  for (float x : logits) scaled.push_back(x / 3.0f);
  expect_frequencies(logits, o, softmax(scaled), 20000);
}

// The model's own first-step distribution: the first generated token over many seeds.
TEST(Sampling, FirstTokenOfTheModelFollowsItsSoftmax) {
  Fixture& f = Fixture::get();
  const Encoded& e = f.encoded("vqa");
  auto dec = f.model.start_decoder(e);
  const Tensor l = dec->step({0});
  const std::vector<float> logits(l.data.begin(), l.data.end());
  GenerationOptions o;
  o.do_sample = true;
  o.top_k = 0;
  expect_frequencies(logits, o, softmax(logits), 20000);
  // Through the whole loop as well (one token, many seeds): the most likely token comes first about as often
  // as its probability says.
  const std::vector<double> p = softmax(logits);
  const int32_t best = static_cast<int32_t>(std::max_element(p.begin(), p.end()) - p.begin());
  o.max_new_tokens = 1;
  const int n = 400;
  int hits = 0;
  for (int seed = 0; seed < n; ++seed) {
    o.seed = static_cast<uint64_t>(seed);
    hits += f.run("vqa", o)[0][0].ids[0] == best;
  }
  EXPECT_NEAR(double(hits) / n, p[best], 5.0 * std::sqrt(p[best] * (1 - p[best]) / n) + 1.0 / n);
}

TEST(Sampling, TopKKeepsTheKBest) {
  std::vector<float> s = {0.1f, 3.0f, -2.0f, 2.5f, 1.0f, 2.5f};
  GenerationOptions o;
  o.top_k = 2;
  warp_scores(s.data(), 6, o);
  // 3.0 and the two tied 2.5s survive (ties with the k-th are kept, as the reference does)
  EXPECT_TRUE(std::isinf(s[0]) && std::isinf(s[2]) && std::isinf(s[4]));
  EXPECT_EQ(s[1], 3.0f);
  EXPECT_EQ(s[3], 2.5f);
  EXPECT_EQ(s[5], 2.5f);
}

TEST(Sampling, TopPKeepsTheSmallestSetAboveP) {
  // probabilities 0.5, 0.25, 0.125, 0.125
  const std::vector<float> base = {std::log(0.5f), std::log(0.25f), std::log(0.125f), std::log(0.125f)};
  GenerationOptions o;
  o.top_k = 0;
  auto kept = [&](double p) {
    std::vector<float> s = base;
    o.top_p = p;
    warp_scores(s.data(), 4, o);
    int n = 0;
    for (float x : s) n += !std::isinf(x);
    return n;
  };
  EXPECT_EQ(kept(0.4), 1);
  EXPECT_EQ(kept(0.5), 1);
  EXPECT_EQ(kept(0.6), 2);
  EXPECT_EQ(kept(0.75), 2);
  EXPECT_EQ(kept(0.8), 3);  // 1 - 0.8 = 0.2 >= 0.125: one of the two 0.125 goes, as in the reference
  EXPECT_EQ(kept(0.9), 4);
  EXPECT_EQ(kept(1.0), 4);
}

TEST(Sampling, TopK1IsGreedy) {
  Fixture& f = Fixture::get();
  GenerationOptions greedy;
  greedy.max_new_tokens = 12;
  for (const char* name : {"caption", "batch2"}) {
    const auto want = f.run(name, greedy);
    for (uint64_t seed : {1u, 2u, 3u}) {
      GenerationOptions o = greedy;
      o.do_sample = true;
      o.top_k = 1;
      o.seed = seed;
      const auto got = f.run(name, o);
      for (size_t b = 0; b < want.size(); ++b) EXPECT_EQ(got[b][0].ids, want[b][0].ids) << name << " seed " << seed;
    }
  }
}

TEST(Sampling, TinyTopPIsGreedy) {
  Fixture& f = Fixture::get();
  GenerationOptions greedy;
  greedy.max_new_tokens = 12;
  const auto want = f.run("vqa", greedy);
  for (uint64_t seed : {4u, 5u, 6u}) {
    GenerationOptions o = greedy;
    o.do_sample = true;
    o.top_k = 0;
    o.top_p = 1e-6;
    o.seed = seed;
    EXPECT_EQ(f.run("vqa", o)[0][0].ids, want[0][0].ids) << "seed " << seed;
  }
}

TEST(Sampling, SameSeedSameTextOtherSeedOtherText) {
  Fixture& f = Fixture::get();
  GenerationOptions o;
  o.do_sample = true;
  o.max_new_tokens = 12;
  o.num_return_sequences = 2;
  o.seed = 42;
  const auto a = f.run("batch2", o), b = f.run("batch2", o);
  ASSERT_EQ(a.size(), 2u);
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t j = 0; j < 2; ++j) {
      EXPECT_EQ(a[i][j].ids, b[i][j].ids);
      EXPECT_EQ(a[i][j].score, b[i][j].score);
    }
  // A random tiny model spreads its probability thinly: ten seeds cannot all give the same text.
  std::set<std::vector<int32_t>> distinct;
  for (uint64_t seed = 0; seed < 10; ++seed) {
    o.seed = seed;
    o.num_return_sequences = 1;
    distinct.insert(f.run("caption", o)[0][0].ids);
  }
  EXPECT_GT(distinct.size(), 1u);
}

TEST(Sampling, BeamSamplingIsReproducible) {
  Fixture& f = Fixture::get();
  GenerationOptions o;
  o.do_sample = true;
  o.num_beams = 3;
  o.num_return_sequences = 2;
  o.max_new_tokens = 8;
  o.seed = 9;
  const auto a = f.run("vqa", o), b = f.run("vqa", o);
  ASSERT_EQ(a[0].size(), 2u);
  EXPECT_EQ(a[0][0].ids, b[0][0].ids);
  EXPECT_EQ(a[0][1].ids, b[0][1].ids);
  EXPECT_GE(a[0][0].score, a[0][1].score);
}

// ---- Logits processors ---------------------------------------------------------------------------------

TEST(Processors, RepetitionPenaltyCoversTheStartToken) {
  std::vector<float> s = {2.0f, -2.0f, 4.0f, -1.0f, 1.0f};
  GenerationOptions o;
  o.repetition_penalty = 2.0;
  process_scores(s.data(), 5, {0, 3, 3, 2}, 1, o, SpecialTokens{.eos = 4, .pad = 0});
  EXPECT_EQ(s, (std::vector<float>{1.0f, -2.0f, 2.0f, -2.0f, 1.0f}));  // once per distinct token
}

TEST(Processors, NoRepeatNgramBansCompletions) {
  GenerationOptions o;
  o.no_repeat_ngram_size = 2;
  std::vector<float> s(6, 0.0f);
  process_scores(s.data(), 6, {0, 3, 4, 3}, 1, o, SpecialTokens{});  // "3 4" was seen: after 3, ban 4
  for (int i = 0; i < 6; ++i) EXPECT_EQ(std::isinf(s[i]), i == 4) << i;
  o.no_repeat_ngram_size = 3;
  s.assign(6, 0.0f);
  process_scores(s.data(), 6, {0, 3, 4, 5, 3, 4}, 1, o, SpecialTokens{});  // "3 4 5" seen: after "3 4", ban 5
  for (int i = 0; i < 6; ++i) EXPECT_EQ(std::isinf(s[i]), i == 5) << i;
  s.assign(6, 0.0f);
  process_scores(s.data(), 6, {0, 3}, 1, o, SpecialTokens{});  // too short to complete a 3-gram
  for (float x : s) EXPECT_EQ(x, 0.0f);
}

TEST(Processors, MinNewTokensSuppressesEos) {
  GenerationOptions o;
  o.min_new_tokens = 2;
  const SpecialTokens sp{.eos = 1, .pad = 0};
  for (size_t prefix : {1, 4})  // a start token (T5), or a prompt (OPT): neither counts as new
    for (size_t generated = 0; generated < 4; ++generated) {
      std::vector<int32_t> tokens(generated + prefix, 5);
      tokens[0] = 0;
      std::vector<float> s(4, 0.0f);
      process_scores(s.data(), 4, tokens, prefix, o, sp);
      EXPECT_EQ(std::isinf(s[1]), generated < 2) << prefix << " " << generated;
    }
  // min_length counts the start token: 1 suppresses nothing (LAVIS's setting)
  o.min_new_tokens = 0;
  o.min_length = 1;
  std::vector<float> s(4, 0.0f);
  process_scores(s.data(), 4, {0}, 1, o, sp);
  EXPECT_FALSE(std::isinf(s[1]));
}

// A decoder whose logits depend only on the step (the same for every row): beam search over a scripted
// distribution, for what the fixtures cannot show (their tiny model almost never ends early).
class ScriptedDecoder final : public Decoder {
 public:
  ScriptedDecoder(std::vector<std::vector<float>> per_step, int rows) : steps_(std::move(per_step)), rows_(rows) {}
  int rows() const override { return rows_; }
  int64_t vocab_size() const override { return static_cast<int64_t>(steps_[0].size()); }
  std::vector<int32_t> prefix(int) const override { return {0}; }
  Tensor start() override { return logits(); }
  Tensor step(const std::vector<int32_t>&) override { return logits(); }
  void reorder(const std::vector<int>& src) override { rows_ = static_cast<int>(src.size()); }
  void append(Decoder&& other) override { rows_ += other.rows(); }

 private:
  Tensor logits() {
    const std::vector<float>& l = steps_.at(static_cast<size_t>(t_++));
    Tensor out({rows_, static_cast<int64_t>(l.size())});
    for (int r = 0; r < rows_; ++r) std::copy(l.begin(), l.end(), out.ptr() + r * static_cast<int64_t>(l.size()));
    return out;
  }
  std::vector<std::vector<float>> steps_;
  int rows_, t_ = 0;
};

TEST(Generate, EarlyStoppingModes) {
  // Two beams, length penalty 1, at most 4 tokens, eos = 1. Worked by hand (and by a Python model of Hugging
  // Face's _beam_search): a one-token hypothesis ends first; at step 2 the finished set is full with a
  // second, two-token one, so early_stopping=true stops there; the heuristic (false) sees the best running
  // beam, scored at the current length, still able to win and stops after step 3 with a better second
  // hypothesis; "never" scores it at the full 4 tokens and finds a better one yet at the last step.
  const std::vector<std::vector<float>> logits = {{-2.1f, -0.7f, -2.3f, -2.8f, -2.6f},
                                                  {-1.9f, 1.6f, 1.0f, 1.8f, -1.3f},
                                                  {-2.1f, 2.8f, 2.0f, 2.7f, -2.9f},
                                                  {-0.6f, 0.8f, 1.4f, 2.5f, 0.2f}};
  GenerationOptions o;
  o.num_beams = 2;
  o.num_return_sequences = 2;
  o.max_new_tokens = 4;
  const auto run = [&](EarlyStopping mode) {
    o.early_stopping = mode;
    return generate([&](int expand) { return std::make_unique<ScriptedDecoder>(logits, expand); }, 1, o,
                    SpecialTokens{})[0];
  };
  const auto heuristic = run(EarlyStopping::Heuristic), always = run(EarlyStopping::Always),
             never = run(EarlyStopping::Never);
  for (const auto* r : {&heuristic, &always, &never}) {
    ASSERT_EQ(r->size(), 2u);
    EXPECT_EQ((*r)[0].ids, std::vector<int32_t>({1}));  // the one-token hypothesis wins in every mode
    EXPECT_NEAR((*r)[0].score, -0.5426f, 1e-4);
  }
  EXPECT_EQ(always[1].ids.size(), 2u);
  EXPECT_NEAR(always[1].score, -1.4959f, 1e-4);
  EXPECT_EQ(heuristic[1].ids.size(), 3u);
  EXPECT_NEAR(heuristic[1].score, -1.2175f, 1e-4);
  EXPECT_EQ(never[1].ids.size(), 4u);
  EXPECT_NEAR(never[1].score, -1.065f, 1e-4);
}

TEST(Generate, MinAndMaxNewTokensBoundTheLength) {
  Fixture& f = Fixture::get();
  GenerationOptions o;
  o.max_new_tokens = 12;
  // batch2's second item ends after one token; with min_new_tokens 5 it cannot
  o.min_new_tokens = 5;
  const auto r = f.run("batch2", o);
  EXPECT_GE(r[1][0].ids.size(), 6u);
  for (size_t i = 0; i + 1 < r[1][0].ids.size(); ++i) EXPECT_NE(r[1][0].ids[i], 1);
  o.min_new_tokens = 0;
  o.max_new_tokens = 3;
  for (const auto& item : f.run("batch2", o)) EXPECT_LE(item[0].ids.size(), 3u);
}

// ---- Options -------------------------------------------------------------------------------------------

void expect_usage(const GenerationOptions& o, const std::string& needle) {
  try {
    validate(o);
    ADD_FAILURE() << "accepted; expected an error naming " << needle;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Usage);
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Options, RejectsContradictionsAndRanges) {
  GenerationOptions o;
  validate(o);
  auto with = [](auto f) {
    GenerationOptions x;
    f(x);
    return x;
  };
  expect_usage(with([](auto& x) { x.num_beams = 0; }), "--num-beams");
  expect_usage(with([](auto& x) { x.num_beams = 3; x.num_return_sequences = 4; }), "--num-return-sequences");
  expect_usage(with([](auto& x) { x.num_return_sequences = 2; }), "--num-return-sequences");
  expect_usage(with([](auto& x) { x.num_return_sequences = 0; }), "--num-return-sequences");
  expect_usage(with([](auto& x) { x.repetition_penalty = -1.0; }), "--repetition-penalty");
  expect_usage(with([](auto& x) { x.repetition_penalty = 0.0; }), "--repetition-penalty");
  expect_usage(with([](auto& x) { x.length_penalty = NAN; }), "--length-penalty");
  expect_usage(with([](auto& x) { x.no_repeat_ngram_size = -1; }), "--no-repeat-ngram-size");
  expect_usage(with([](auto& x) { x.max_new_tokens = 0; }), "--max-new-tokens");
  expect_usage(with([](auto& x) { x.min_new_tokens = -1; }), "--min-new-tokens");
  expect_usage(with([](auto& x) { x.min_new_tokens = 30; }), "--min-new-tokens");
  expect_usage(with([](auto& x) { x.do_sample = true; x.temperature = 0.0; }), "--temperature");
  expect_usage(with([](auto& x) { x.do_sample = true; x.temperature = -1.0; }), "--temperature");
  expect_usage(with([](auto& x) { x.do_sample = true; x.temperature = 0.001; }), "--temperature must be at least 0.002");
  expect_usage(with([](auto& x) { x.do_sample = true; x.top_p = 0.0; }), "--top-p");
  expect_usage(with([](auto& x) { x.do_sample = true; x.top_p = 1.5; }), "--top-p");
  expect_usage(with([](auto& x) { x.do_sample = true; x.top_k = -1; }), "--top-k");
  // accepted: negative length penalty, several samples, as many sequences as beams
  validate(with([](auto& x) { x.num_beams = 5; x.length_penalty = -1.0; x.num_return_sequences = 5; }));
  validate(with([](auto& x) { x.do_sample = true; x.num_return_sequences = 4; x.top_p = 1.0; }));
  validate(with([](auto& x) { x.do_sample = true; x.temperature = 0.002; }));
}

TEST(Options, GenerationConfigSuppliesDefaults) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("blip2-gencfg-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  EXPECT_EQ(generation_defaults(dir.string()).max_new_tokens, 20);  // no file: Hugging Face's defaults
  std::ofstream(dir / "generation_config.json")
      << R"({"max_length": 31, "num_beams": 4, "length_penalty": -0.5, "do_sample": false, "top_k": 7,
            "temperature": null, "eos_token_id": 1})";
  const GenerationOptions o = generation_defaults(dir.string());
  EXPECT_EQ(o.max_new_tokens, 30);  // max_length counts the start token
  EXPECT_EQ(o.num_beams, 4);
  EXPECT_EQ(o.length_penalty, -0.5);
  EXPECT_EQ(o.top_k, 7);
  EXPECT_EQ(o.temperature, 1.0);
  std::ofstream(dir / "generation_config.json") << R"({"num_beams": "five"})";
  try {
    generation_defaults(dir.string());
    ADD_FAILURE() << "accepted a bad generation_config.json";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Model);
    EXPECT_NE(std::string(e.what()).find("num_beams"), std::string::npos);
  }
  fs::remove_all(dir);
  // The bundled model's file holds only token ids: Hugging Face's defaults.
  const GenerationOptions t = generation_defaults(BLIP2_TINY_T5_DIR);
  EXPECT_EQ(t.max_new_tokens, 20);
  EXPECT_EQ(t.num_beams, 1);
  EXPECT_FALSE(t.do_sample);
}

TEST(Options, PresetsAreLavisSettings) {
  GenerationOptions o;
  o.do_sample = true;
  o.repetition_penalty = 1.3;
  apply_preset(o, "caption");
  EXPECT_EQ(o.num_beams, 5);
  EXPECT_EQ(o.max_new_tokens, 30);
  EXPECT_EQ(o.min_length, 1);
  EXPECT_FALSE(o.do_sample);
  EXPECT_EQ(o.repetition_penalty, 1.0);
  apply_preset(o, "vqa");
  EXPECT_EQ(o.num_beams, 5);
  EXPECT_EQ(o.max_new_tokens, 10);
  EXPECT_EQ(o.length_penalty, -1.0);
  EXPECT_EQ(preset_prompt("vqa", "what is this?"), "Question: what is this? Answer:");
  EXPECT_EQ(preset_prompt("caption", ""), "");
  EXPECT_THROW(apply_preset(o, "poem"), Error);
}

}  // namespace
