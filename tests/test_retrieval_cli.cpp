// blip2 match / embed / inspect with the retrieval fixture, as a process: the numbers are the reference's,
// the outputs have their documented shapes, and each kind of checkpoint refuses the other's commands with a
// message naming what it does (exit status 3).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli_runner.h"
#include "io/safetensors.h"
#include "support.h"

using namespace blip2;
using namespace blip2::test;
namespace fs = std::filesystem;

namespace {

const std::string kItm = kFixtures + "/tiny-blip2-itm";
const std::string kImages = kFixtures + "/images/";

fs::path temp_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("blip2-rcli-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

TEST(RetrievalCli, MatchPrintsTheReferenceScores) {
  const auto cases = read_json(kItm + "/reference.json")["cases"];
  const auto& c = cases["cross"];  // coffee.png with each of the three texts: rows 0..2
  std::vector<std::string> args = {"match", "--model", kItm, kImages + "coffee.png"};
  for (const auto& t : c["texts"]) args.push_back(t.get<std::string>());
  args.push_back("--json");
  const CliRun r = run_cli(args);
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["results"].size(), 3u);
  for (size_t t = 0; t < 3; ++t) {
    EXPECT_EQ(j["results"][t]["text"], c["texts"][t]);
    EXPECT_NEAR(j["results"][t]["itm_probability"].get<double>(), c["itm_probability"][t].get<double>(), 1e-5);
    EXPECT_NEAR(j["results"][t]["itm_logits"][1].get<double>(), c["itm_logits"][t][1].get<double>(), 1e-4);
    EXPECT_NEAR(j["results"][t]["itc_similarity"].get<double>(), c["itc_logits_per_image"][0][t].get<double>(), 1e-5);
  }
  args.pop_back();
  const CliRun table = run_cli(args);
  ASSERT_EQ(table.status, 0) << table.err;
  EXPECT_NE(table.out.find("a cup of coffee"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("match"), std::string::npos) << table.out;
}

TEST(RetrievalCli, EmbedWritesJsonlAndNpyForImagesAndTexts) {
  const fs::path d = temp_dir("embed");
  fs::create_directories(d / "imgs");
  for (const char* n : {"chelsea.png", "astronaut.png", "truncated.jpg"}) fs::copy_file(kImages + n, d / "imgs" / n);
  // Images from a folder, batch 2: one corrupt image is recorded and the exit status says so.
  const CliRun r = run_cli({"embed", "--model", kItm, (d / "imgs").string(), "--batch", "2"});
  EXPECT_EQ(r.status, 4) << r.err;
  std::istringstream lines(r.out);
  int ok = 0, failed = 0;
  for (std::string line; std::getline(lines, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("error")) {
      ++failed;
      continue;
    }
    ++ok;
    EXPECT_EQ(j["embedding"].size(), 8u);
    EXPECT_EQ(j["embedding"][0].size(), 32u);
  }
  EXPECT_EQ(ok, 2);
  EXPECT_EQ(failed, 1);
  // The reference's image embeddings, in the .npy (sorted: astronaut, chelsea).
  const CliRun n = run_cli({"embed", "--model", kItm, kImages + "chelsea.png", kImages + "astronaut.png", "--output",
                            (d / "img.npy").string()});
  ASSERT_EQ(n.status, 0) << n.err;
  const std::string npy = slurp(d / "img.npy");
  ASSERT_GT(npy.size(), 128u);
  EXPECT_EQ(npy.substr(0, 6), "\x93NUMPY");
  EXPECT_NE(npy.find("'shape': (2, 8, 32)"), std::string::npos);
  const size_t header = 10 + (static_cast<uint8_t>(npy[8]) | static_cast<uint8_t>(npy[9]) << 8);
  ASSERT_EQ(npy.size(), header + 2 * 8 * 32 * 4);
  const SafetensorsFile ref(kItm + "/reference.safetensors");
  const Tensor want = ref.tensor("pair/image_embeds");  // chelsea, astronaut
  Tensor got({2, 8, 32});
  std::memcpy(got.ptr(), npy.data() + header, 2 * 8 * 32 * 4);
  EXPECT_LE(compare(got, want).rel, kMaxRel);
  EXPECT_EQ(slurp(d / "img.npy.keys.jsonl"), "\"" + kImages + "chelsea.png\"\n\"" + kImages + "astronaut.png\"\n");
  // Texts from a list file.
  std::ofstream(d / "texts.txt") << "a cat lying on a blanket\nan astronaut standing next to a rocket in the morning\n";
  const CliRun t = run_cli({"embed", "--model", kItm, "--text", "@" + (d / "texts.txt").string(), "--output",
                            (d / "txt.safetensors").string()});
  ASSERT_EQ(t.status, 0) << t.err;
  const SafetensorsFile out((d / "txt.safetensors").string());
  EXPECT_LE(compare(out.tensor("embeddings"), ref.tensor("pair/text_embeds")).rel, kMaxRel);
  fs::remove_all(d);
}

TEST(RetrievalCli, InspectWritesTheEightTensors) {
  const fs::path d = temp_dir("inspect");
  const auto cases = read_json(kItm + "/reference.json")["cases"];
  const SafetensorsFile ref(kItm + "/reference.safetensors");
  for (const std::string name : {"cross", "pair"}) {
    const auto& c = cases[name];
    std::vector<std::string> args = {"inspect", "--model", kItm, "--out", (d / (name + ".safetensors")).string()};
    for (const auto& p : c["pairs"]) {
      args.push_back("--image");
      args.push_back(kImages + c["images"][p[0].get<size_t>()].get<std::string>());
      args.push_back("--prompt");
      args.push_back(c["texts"][p[1].get<size_t>()].get<std::string>());
    }
    const CliRun r = run_cli(args);
    ASSERT_EQ(r.status, 0) << r.err;
    const SafetensorsFile got((d / (name + ".safetensors")).string());
    for (const char* t : {"vision_last_hidden_state", "itm_logits", "itm_probability", "image_embeds", "text_embeds",
                          "itc_logits_per_image", "qformer_itm_hidden_state", "qformer_text_hidden_state"}) {
      const Tensor g = got.tensor(t), w = ref.tensor(name + "/" + t);
      ASSERT_EQ(g.shape, w.shape) << name << "/" << t;
      // Hidden states hold padding rows: compare the tensors whose every element is meaningful.
      if (std::string(t).rfind("qformer_", 0) != 0) {
        EXPECT_LE(compare(g, w).rel, 1e-4) << name << "/" << t;
      }
    }
  }
  fs::remove_all(d);
}

TEST(RetrievalCli, EachKindOfCheckpointNamesWhatItDoes) {
  const CliRun cap = run_cli({"caption", "--model", kItm, kImages + "chelsea.png"});
  EXPECT_EQ(cap.status, 3);
  EXPECT_NE(cap.err.find("retrieval"), std::string::npos) << cap.err;
  EXPECT_NE(cap.err.find("blip2 match"), std::string::npos) << cap.err;
  const CliRun gen = run_cli({"generate", "--model", kItm, "--image", kImages + "chelsea.png", "--prompt", ""});
  EXPECT_EQ(gen.status, 3);
  const CliRun m = run_cli({"match", "--model", BLIP2_TINY_T5_DIR, kImages + "chelsea.png", "a cat"});
  EXPECT_EQ(m.status, 3);
  EXPECT_NE(m.err.find("captioning"), std::string::npos) << m.err;
  const CliRun e = run_cli({"embed", "--model", BLIP2_TINY_T5_DIR, "--text", "a cat"});
  EXPECT_EQ(e.status, 3);
  const CliRun bad = run_cli({"embed", "--model", kItm, "--text", "a", "--format", "npy"});
  EXPECT_EQ(bad.status, 2);
  EXPECT_NE(bad.err.find("--output"), std::string::npos) << bad.err;
}

TEST(RetrievalCli, BenchTimesImageAndTextEmbeddings) {
  const CliRun r = run_cli({"bench", "--model", kItm, "--batch", "2", "--sweep", "3", "--repeat", "1", "--warmup", "0",
                            "--json"});
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["task"], "retrieval");
  ASSERT_EQ(j["image_embeddings"].size(), 3u);  // batches 1, 2, 3
  EXPECT_GT(j["best_images_per_second"].get<double>(), 0);
  ASSERT_EQ(j["text_embeddings"].size(), 2u);
  EXPECT_GT(j["text_embeddings"][0]["texts_per_second"].get<double>(), 0);
}

}  // namespace
