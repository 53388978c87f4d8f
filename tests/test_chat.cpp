// Chat about an image (blip2 chat driven through a pipe, and the pieces it is made of), and the decoding
// options of generate / caption / ask on the command line: results, presets, and bad options rejected
// before any work.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "generate/chat.h"
#include "generate/generate.h"
#include "image/image.h"
#include "model/blip2.h"
#include "cli_runner.h"

using namespace blip2;
using blip2::test::CliRun;
using blip2::test::run_cli;
using nlohmann::json;

namespace {

const std::string kFixtures = BLIP2_FIXTURES_DIR;
const std::string kImages = kFixtures + "/images/";
const std::string kModel = BLIP2_TINY_T5_DIR;
const std::string kCat = kImages + "chelsea.png";
const std::string kRocket = kImages + "rocket.jpg";

std::vector<json> json_lines(const std::string& s) {
  std::vector<json> out;
  std::istringstream in(s);
  std::string line;
  while (std::getline(in, line)) out.push_back(json::parse(line));
  return out;
}

Blip2Model& model() {
  static Blip2Model m(kModel);
  return m;
}

Tensor pixels(const std::string& path) { return preprocess_images({load_image(path)}, 224); }

// What generate gives for one image and prompt, from scratch (image and prompt encoded together).
std::vector<int32_t> fresh_answer(const std::string& image, const std::string& prompt, int max_new_tokens) {
  const Encoded e = model().encode(pixels(image), model().tokenize({prompt}));
  GenerationOptions o;
  o.max_new_tokens = max_new_tokens;
  return generate([&](int expand) { return model().start_decoder(e, expand); }, 1, o, SpecialTokens{})[0][0].ids;
}

// ---- Chat: prompts -------------------------------------------------------------------------------------

TEST(ChatPrompt, Format) {
  EXPECT_EQ(chat_prompt({}, "what is this?"), "Question: what is this? Answer:");
  const std::vector<ChatTurn> h = {{"q1", "a1"}, {"q2", "a2"}};
  EXPECT_EQ(chat_prompt(h, "q3"), "Question: q1 Answer: a1. Question: q2 Answer: a2. Question: q3 Answer:");
  EXPECT_EQ(chat_prompt(h, "q3", 1), "Question: q2 Answer: a2. Question: q3 Answer:");
}

TEST(ChatPrompt, DropsTheOldestTurnsThatDoNotFit) {
  const Tokenizer& tok = model().tokenizer();
  const auto count = [&](const std::string& p) { return static_cast<int64_t>(tok.encode(p).size()); };
  std::vector<ChatTurn> h;
  for (int i = 0; i < 6; ++i) h.push_back({"question number " + std::to_string(i), "answer " + std::to_string(i)});
  size_t kept = 99;
  const std::string all = fit_chat_prompt(h, "last?", 512, count, &kept);
  EXPECT_EQ(kept, 6u);
  EXPECT_EQ(all, chat_prompt(h, "last?"));
  // A limit that holds exactly the two newest turns.
  const int64_t two = count(chat_prompt(h, "last?", 4));
  const std::string cut = fit_chat_prompt(h, "last?", two, count, &kept);
  EXPECT_EQ(kept, 2u);
  EXPECT_EQ(cut, chat_prompt(h, "last?", 4));
  EXPECT_LE(count(cut), two);
  EXPECT_GT(count(chat_prompt(h, "last?", 3)), two);
  // Not even the question fits: an input error.
  try {
    fit_chat_prompt(h, "a question far too long for the limit", 5, count);
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input);
    EXPECT_NE(std::string(e.what()).find("too long"), std::string::npos);
  }
}

// ---- Chat: the image encoded once ----------------------------------------------------------------------

TEST(ChatModel, ImageAndPromptStagesComposeToEncode) {
  Blip2Model& m = model();
  const Tensor px = pixels(kCat);
  const PromptBatch p = m.tokenize({"Question: what is this? Answer:"});
  const int64_t before = m.image_encodings();
  const Encoded whole = m.encode(px, p);
  EXPECT_EQ(m.image_encodings(), before + 1);
  const Encoded image = m.encode_image(px);
  EXPECT_EQ(m.image_encodings(), before + 2);
  EXPECT_TRUE(image.encoder_last_hidden_state.data.empty());
  const Encoded a = m.encode_prompts(image, p);
  const Encoded b = m.encode_prompts(image, m.tokenize({"another prompt"}));
  EXPECT_EQ(m.image_encodings(), before + 2) << "prompts reuse the image encoding";
  EXPECT_EQ(a.vision_last_hidden_state.data, whole.vision_last_hidden_state.data);
  EXPECT_EQ(a.language_projection.data, whole.language_projection.data);
  EXPECT_EQ(a.encoder_last_hidden_state.data, whole.encoder_last_hidden_state.data);  // bit for bit
  EXPECT_EQ(a.input_mask, whole.input_mask);
  EXPECT_NE(b.encoder_last_hidden_state.shape, a.encoder_last_hidden_state.shape);
}

TEST(Chat, PipeReusesTheImageEncoding) {
  const CliRun r = run_cli({"chat", "--model", kModel, kCat, "--max-new-tokens", "6", "--json"},
                        "what is this?\nwhat color is it?\n\n  is it big?  \n");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.err, "") << "a pipe gets no banner or prompts";
  const auto turns = json_lines(r.out);
  ASSERT_EQ(turns.size(), 3u) << r.out;
  const std::vector<std::string> questions = {"what is this?", "what color is it?", "is it big?"};
  std::vector<std::string> answers;
  for (size_t i = 0; i < turns.size(); ++i) {
    SCOPED_TRACE(i);
    const json& t = turns[i];
    EXPECT_EQ(t["turn"], i + 1);
    EXPECT_EQ(t["image"], kCat);
    EXPECT_EQ(t["question"], questions[i]);
    EXPECT_EQ(t["image_encodings"], 1) << "the vision encoder and Q-Former ran once for the whole conversation";
    // The prompt: every earlier turn, then the question.
    std::string want = "";
    for (size_t k = 0; k < i; ++k) want += "Question: " + questions[k] + " Answer: " + answers[k] + ". ";
    want += "Question: " + questions[i] + " Answer:";
    EXPECT_EQ(t["prompt"], want);
    // The answer is what a fresh run on that prompt gives.
    const auto ids = t["sequences"][0]["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(ids, fresh_answer(kCat, want, 6));
    answers.push_back(t["sequences"][0]["text"].get<std::string>());
  }
}

// InstructBLIP's Q-Former reads the prompt, so what a conversation keeps is the vision encoder's output: it
// still runs once, and every answer is still what a fresh run on that turn's prompt gives.
TEST(Chat, InstructBlipKeepsTheVisionOutput) {
  const std::string vicuna = kFixtures + "/tiny-instructblip-vicuna";
  const CliRun r = run_cli({"chat", "--model", vicuna, kCat, "--max-new-tokens", "6", "--json"},
                           "what is this?\nwhat color is it?\n");
  ASSERT_EQ(r.status, 0) << r.err;
  const auto turns = json_lines(r.out);
  ASSERT_EQ(turns.size(), 2u) << r.out;
  const Blip2Model m(vicuna);
  for (const json& t : turns) {
    EXPECT_EQ(t["image_encodings"], 1);
    const Encoded e = m.encode(pixels(kCat), m.tokenize({t["prompt"].get<std::string>()}));
    GenerationOptions o;
    o.max_new_tokens = 6;
    const auto fresh = generate([&](int x) { return m.start_decoder(e, x); }, 1, o, m.special_tokens())[0][0].ids;
    EXPECT_EQ(t["sequences"][0]["ids"].get<std::vector<int32_t>>(), fresh);
  }
}

TEST(Chat, ResetImageAndQuitCommands) {
  const CliRun r = run_cli({"chat", "--model", kModel, kCat, "--max-new-tokens", "4", "--json"},
                        "q one\n/reset\nq two\n/image " + kRocket + "\nq three\nq four\n/quit\nnever asked\n");
  ASSERT_EQ(r.status, 0) << r.err;
  const auto turns = json_lines(r.out);
  ASSERT_EQ(turns.size(), 4u) << r.out;
  EXPECT_EQ(turns[1]["prompt"], "Question: q two Answer:") << "/reset forgot q one";
  EXPECT_EQ(turns[1]["image_encodings"], 1);
  EXPECT_EQ(turns[2]["image"], kRocket);
  EXPECT_EQ(turns[2]["prompt"], "Question: q three Answer:") << "a new image starts a new conversation";
  EXPECT_EQ(turns[2]["image_encodings"], 2);
  EXPECT_EQ(turns[3]["image_encodings"], 2);
  EXPECT_EQ(turns[3]["prompt"], "Question: q three Answer: " + turns[2]["sequences"][0]["text"].get<std::string>() +
                                    ". Question: q four Answer:");
  EXPECT_EQ(turns[3]["sequences"][0]["ids"].get<std::vector<int32_t>>(),
            fresh_answer(kRocket, turns[3]["prompt"].get<std::string>(), 4));
}

TEST(Chat, PlainTextOneLinePerAnswerAndErrorsDoNotEndTheConversation) {
  const CliRun r = run_cli({"chat", "--model", kModel, kCat, "--max-new-tokens", "5"},
                        "what is this?\n/what\n/image /no/such.png\nand then?\n");
  EXPECT_EQ(r.status, 4) << "the last error's kind: " << r.err;
  std::istringstream out(r.out);
  std::vector<std::string> lines;
  for (std::string l; std::getline(out, l);) lines.push_back(l);
  ASSERT_EQ(lines.size(), 2u) << r.out;
  const Tokenizer& tok = model().tokenizer();
  const std::string a1 = tok.decode(fresh_answer(kCat, "Question: what is this? Answer:", 5));
  EXPECT_EQ(lines[0], a1);
  EXPECT_EQ(lines[1], tok.decode(fresh_answer(kCat, "Question: what is this? Answer: " + a1 +
                                                        ". Question: and then? Answer:", 5)))
      << "the failed /image kept the conversation";
  EXPECT_NE(r.err.find("/no/such.png"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("unknown command /what"), std::string::npos) << r.err;
}

TEST(Chat, BadImageOrOptionsFailBeforeReading) {
  CliRun r = run_cli({"chat", "--model", kModel, kImages + "truncated.jpg"}, "hello\n");
  EXPECT_EQ(r.status, 4);
  EXPECT_EQ(r.out, "");
  r = run_cli({"chat", "--model", kModel, kCat, "--num-beams", "0"}, "hello\n");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("--num-beams"), std::string::npos);
}

// ---- Decoding options on the command line --------------------------------------------------------------

json fixture_case(const std::string& name) {
  std::ifstream in(kFixtures + "/tiny-blip2-t5/reference.json");
  return json::parse(in)["cases"][name];
}

std::vector<int32_t> trim(const std::vector<int32_t>& seq) {
  std::vector<int32_t> out;
  for (size_t i = 1; i < seq.size(); ++i) {
    out.push_back(seq[i]);
    if (seq[i] == 1) break;
  }
  return out;
}

TEST(CliDecoding, BeamSearchWithSeveralSequencesAsJson) {
  const json c = fixture_case("batch2");
  const auto want = c["generate"]["beam5_ret3"]["sequences"].get<std::vector<std::vector<int32_t>>>();
  std::vector<std::string> args = {"generate", "--model", kModel, "--num-beams", "5", "--num-return-sequences", "3",
                                   "--max-new-tokens", "12", "--json"};
  for (size_t i = 0; i < 2; ++i)
    args.insert(args.end(), {"--image", kImages + c["images"][i].get<std::string>(), "--prompt", c["prompts"][i].get<std::string>()});
  const CliRun r = run_cli(args);
  ASSERT_EQ(r.status, 0) << r.err;
  const json j = json::parse(r.out);
  ASSERT_EQ(j["results"].size(), 2u);
  for (size_t b = 0; b < 2; ++b) {
    const json& seqs = j["results"][b]["sequences"];
    ASSERT_EQ(seqs.size(), 3u);
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(seqs[i]["ids"].get<std::vector<int32_t>>(), trim(want[b * 3 + i])) << b << "/" << i;
      EXPECT_EQ(seqs[i]["text"], c["generate"]["beam5_ret3"]["text"][b * 3 + i]);
      if (i) {
        EXPECT_GE(seqs[i - 1]["score"].get<double>(), seqs[i]["score"].get<double>());
      }
    }
  }
  // Text output: one line per sequence.
  args.erase(std::find(args.begin(), args.end(), "--json"));
  const CliRun t = run_cli(args);
  ASSERT_EQ(t.status, 0) << t.err;
  std::string lines;
  for (size_t k = 0; k < 6; ++k) lines += c["generate"]["beam5_ret3"]["text"][k].get<std::string>() + "\n";
  EXPECT_EQ(t.out, lines);
}

TEST(CliDecoding, EveryProcessorOption) {
  const json c = fixture_case("caption");
  for (const auto& [setting, extra] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"greedy_rep1.5", {"--repetition-penalty", "1.5"}},
           {"greedy_ngram2", {"--no-repeat-ngram-size", "2"}},
           {"beam3_min8", {"--num-beams", "3", "--min-new-tokens", "8"}},
           {"beam5_lp2", {"--num-beams", "5", "--length-penalty", "2"}}}) {
    std::vector<std::string> args = {"caption", "--model", kModel, kCat, "--max-new-tokens", "12", "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    const CliRun r = run_cli(args);
    ASSERT_EQ(r.status, 0) << setting << r.err;
    EXPECT_EQ(json::parse(r.out)["results"][0]["sequences"][0]["ids"].get<std::vector<int32_t>>(),
              trim(c["generate"][setting]["sequences"][0].get<std::vector<int32_t>>()))
        << setting;
  }
}

TEST(CliDecoding, VqaPresetIsLavisSetting) {
  // LAVIS VQA: 5 beams, <= 10 new tokens, length_penalty -1 — the fixture's beam5_lpm1_max10.
  const json c = fixture_case("batch2");
  const auto want = trim(c["generate"]["beam5_lpm1_max10"]["sequences"][0].get<std::vector<int32_t>>());
  const CliRun ask = run_cli({"ask", "--model", kModel, kRocket, "what is this?", "--preset", "vqa", "--json"});
  ASSERT_EQ(ask.status, 0) << ask.err;
  EXPECT_EQ(json::parse(ask.out)["results"][0]["sequences"][0]["ids"].get<std::vector<int32_t>>(), want);
  // generate --preset vqa takes --prompt as the question.
  const CliRun gen = run_cli({"generate", "--model", kModel, "--image", kRocket, "--prompt", "what is this?", "--preset",
                           "vqa", "--json"});
  ASSERT_EQ(gen.status, 0) << gen.err;
  const json g = json::parse(gen.out)["results"][0];
  EXPECT_EQ(g["prompt"], "Question: what is this? Answer:");
  EXPECT_EQ(g["sequences"][0]["ids"].get<std::vector<int32_t>>(), want);
  // Options given with a preset override it.
  const CliRun greedy = run_cli({"ask", "--model", kModel, kRocket, "what is this?", "--preset", "vqa", "--num-beams", "1",
                              "--max-new-tokens", "12", "--json"});
  ASSERT_EQ(greedy.status, 0) << greedy.err;
  EXPECT_EQ(json::parse(greedy.out)["results"][0]["sequences"][0]["ids"].get<std::vector<int32_t>>(),
            trim(c["generate"]["greedy"]["sequences"][0].get<std::vector<int32_t>>()));
  const CliRun cap = run_cli({"caption", "--model", kModel, kCat, "--preset", "caption"});
  EXPECT_EQ(cap.status, 0) << cap.err;
  EXPECT_EQ(std::count(cap.out.begin(), cap.out.end(), '\n'), 1);
}

TEST(CliDecoding, SamplingIsReproducibleWithASeed) {
  const std::vector<std::string> args = {"caption", "--model", kModel, kCat, "--do-sample", "--top-k", "20",
                                         "--temperature", "0.8", "--seed", "7", "--json"};
  const CliRun a = run_cli(args), b = run_cli(args);
  ASSERT_EQ(a.status, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  // Streaming (plain text, one sequence) prints the same text as the JSON holds.
  std::vector<std::string> plain(args.begin(), args.end() - 1);
  const CliRun p = run_cli(plain);
  EXPECT_EQ(p.out, json::parse(a.out)["results"][0]["sequences"][0]["text"].get<std::string>() + "\n");
  // Several samples per input.
  std::vector<std::string> three = args;
  three.insert(three.end(), {"--num-return-sequences", "3"});
  const CliRun t = run_cli(three);
  ASSERT_EQ(t.status, 0) << t.err;
  EXPECT_EQ(json::parse(t.out)["results"][0]["sequences"].size(), 3u);
}

struct BadOptions {
  const char* name;
  std::vector<std::string> extra;
  std::string needle;
};

void PrintTo(const BadOptions& b, std::ostream* os) { *os << b.name; }

class CliBadOptions : public ::testing::TestWithParam<BadOptions> {};

// Rejected with exit status 2, one message naming the option, nothing on stdout — and before any work: the
// model directory does not even exist (that would be status 3).
TEST_P(CliBadOptions, RejectedBeforeAnyWork) {
  for (const std::string cmd : {"generate", "caption", "ask", "chat"}) {
    std::vector<std::string> args = {cmd, "--model", "/nonexistent-model-dir"};
    if (cmd == "generate") args.insert(args.end(), {"--image", kCat, "--prompt", ""});
    if (cmd == "caption" || cmd == "ask" || cmd == "chat") args.push_back(kCat);
    if (cmd == "ask") args.push_back("what?");
    args.insert(args.end(), GetParam().extra.begin(), GetParam().extra.end());
    const CliRun r = run_cli(args, "hello\n");
    EXPECT_EQ(r.status, 2) << cmd << ": " << r.err;
    EXPECT_EQ(r.out, "") << cmd;
    EXPECT_NE(r.err.find(GetParam().needle), std::string::npos) << cmd << ": " << r.err;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CliBadOptions,
    ::testing::Values(
        BadOptions{"MoreSequencesThanBeams", {"--num-beams", "3", "--num-return-sequences", "4"}, "--num-return-sequences"},
        BadOptions{"SequencesWithGreedy", {"--num-return-sequences", "2"}, "--num-return-sequences"},
        BadOptions{"ZeroBeams", {"--num-beams", "0"}, "--num-beams"},
        BadOptions{"NegativeRepetitionPenalty", {"--repetition-penalty", "-1.2"}, "--repetition-penalty"},
        BadOptions{"ZeroRepetitionPenalty", {"--repetition-penalty", "0"}, "--repetition-penalty"},
        BadOptions{"NegativeNgram", {"--no-repeat-ngram-size", "-2"}, "--no-repeat-ngram-size"},
        BadOptions{"MinAboveMax", {"--min-new-tokens", "30", "--max-new-tokens", "10"}, "--min-new-tokens"},
        BadOptions{"TopPZero", {"--do-sample", "--top-p", "0"}, "--top-p"},
        BadOptions{"TopPAboveOne", {"--do-sample", "--top-p", "1.5"}, "--top-p"},
        BadOptions{"NegativeTopK", {"--do-sample", "--top-k", "-1"}, "--top-k"},
        BadOptions{"ZeroTemperature", {"--do-sample", "--temperature", "0"}, "--temperature"},
        BadOptions{"NegativeTemperature", {"--do-sample", "--temperature", "-0.5"}, "--temperature"},
        BadOptions{"TemperatureWithoutSampling", {"--temperature", "0.7"}, "--do-sample"},
        BadOptions{"SeedWithoutSampling", {"--seed", "3"}, "--do-sample"},
        BadOptions{"LengthPenaltyWithoutBeams", {"--length-penalty", "2"}, "--num-beams"},
        BadOptions{"EarlyStoppingWithoutBeams", {"--early-stopping", "true"}, "--num-beams"},
        BadOptions{"EarlyStoppingUnknown", {"--num-beams", "2", "--early-stopping", "soon"}, "--early-stopping"},
        BadOptions{"UnknownPreset", {"--preset", "poem"}, "--preset"},
        BadOptions{"BeamsNotANumber", {"--num-beams", "five"}, "five"}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
