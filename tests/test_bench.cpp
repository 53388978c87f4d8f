// `blip2 bench` on the bundled tiny model, run as a real process: the JSON report has every stage with
// positive times, the ceilings and floors; bad options exit with status 2 before any work.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

extern char** environ;

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const std::string kCli = BLIP2_CLI_PATH;
const std::string kModel = BLIP2_TINY_T5_DIR;
const std::string kImage = std::string(BLIP2_FIXTURES_DIR) + "/images/chelsea.png";

struct CliRun {
  int status = -1;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Runs the CLI with `args`, stdin from /dev/null, stdout and stderr into files read back afterwards.
CliRun run_cli(const std::vector<std::string>& args) {
  const fs::path dir = fs::temp_directory_path() / ("blip2-bench-test-" + std::to_string(getpid()));
  fs::create_directories(dir);
  const std::string out = (dir / "out").string(), err = (dir / "err").string();
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<std::string> argv_s = {kCli};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  CliRun r;
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, kCli.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) {
    ADD_FAILURE() << "posix_spawn " << kCli << " failed";
    return r;
  }
  int st = 0;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.out = slurp(out);
  r.err = slurp(err);
  fs::remove_all(dir);
  return r;
}

const char* kStages[] = {"preprocess", "vision", "qformer", "prompt", "first_decode_step", "decode_per_token",
                         "total_per_caption"};

}  // namespace

TEST(Bench, JsonHasEveryStageAndTheFloors) {
  const CliRun r = run_cli({"--threads", "2", "bench", "--model", kModel, "--image", kImage, "--new-tokens", "4",
                         "--repeat", "2", "--warmup", "0", "--batch", "2", "--quick", "--json"});
  ASSERT_EQ(r.status, 0) << r.err;
  const json j = json::parse(r.out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << r.out;
  EXPECT_EQ(j["batch"], 2);
  EXPECT_EQ(j["new_tokens"], 4);
  EXPECT_EQ(j["threads"], 2);
  for (const char* s : kStages) {
    ASSERT_TRUE(j["stages"].contains(s)) << s;
    EXPECT_GT(j["stages"][s]["median_s"].get<double>(), 0.0) << s;
    EXPECT_GT(j["stages"][s]["min_s"].get<double>(), 0.0) << s;
    EXPECT_LE(j["stages"][s]["min_s"].get<double>(), j["stages"][s]["max_s"].get<double>()) << s;
  }
  EXPECT_EQ(j["stages"]["vision"]["samples"], 2);
  EXPECT_EQ(j["stages"]["decode_per_token"]["samples"], 2 * 3);  // steps after the first, per run
  EXPECT_GT(j["machine"]["read_bandwidth_gbs"].get<double>(), 0.0);
  EXPECT_GT(j["machine"]["sgemm_peak_gflops"].get<double>(), 0.0);
  EXPECT_GT(j["memory"]["peak_rss_gib"].get<double>(), 0.0);
  EXPECT_GT(j["memory"]["rss_after_load_gib"].get<double>(), 0.0);
  EXPECT_GT(j["floors"]["decode_step_bytes"].get<int64_t>(), 0);
  EXPECT_GT(j["floors"]["decode_fraction_of_floor"].get<double>(), 0.0);
  EXPECT_GT(j["floors"]["vision_flops"].get<double>(), 0.0);
  EXPECT_GT(j["floors"]["vision_fraction_of_peak"].get<double>(), 0.0);
  EXPECT_NE(r.err.find("bench:"), std::string::npos) << "progress goes to stderr";
}

TEST(Bench, DecodeBytesFollowTheWeightFormat) {
  const auto step_bytes = [](const std::string& weights) {
    const CliRun r = run_cli({"--weights", weights, "bench", "--model", kModel, "--new-tokens", "2", "--repeat", "1",
                           "--warmup", "0", "--quick", "--json"});
    EXPECT_EQ(r.status, 0) << r.err;
    const json j = json::parse(r.out, nullptr, false);
    return j.is_discarded() ? int64_t{0} : j["floors"]["decode_step_bytes"].get<int64_t>();
  };
  const int64_t f32 = step_bytes("f32"), i8 = step_bytes("int8"), i4 = step_bytes("int4");
  EXPECT_GT(f32, i8);
  EXPECT_GT(i8, i4);
  EXPECT_GT(i4, 0);
}

TEST(Bench, TextTableNamesEveryStage) {
  const CliRun r = run_cli({"bench", "--model", kModel, "--new-tokens", "3", "--repeat", "1", "--warmup", "0",
                         "--quick"});
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* label : {"preprocess", "vision encoder", "Q-Former", "prompt stage", "first decode step",
                            "decode per token", "total per caption", "floor", "peak RSS"})
    EXPECT_NE(r.out.find(label), std::string::npos) << label << "\n" << r.out;
}

TEST(Bench, BadOptionsExitWithStatus2) {
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"bench", "--batch", "0"}, {"bench", "--new-tokens", "0"}, {"bench", "--repeat", "0"},
        {"bench", "--batch", "two"}, {"bench", "--no-such-option"}, {"--weights", "int3", "bench"},
        {"--int4-group", "48", "bench"}, {"bench", "--warmup", "-1"}}) {
    const CliRun r = run_cli(args);
    std::string cmd;
    for (const auto& a : args) cmd += " " + a;
    EXPECT_EQ(r.status, 2) << cmd << "\n" << r.err;
    EXPECT_TRUE(r.out.empty()) << cmd;
    EXPECT_NE(r.err.find_first_not_of(" \n"), std::string::npos) << cmd << ": no message";
  }
}

TEST(Bench, MissingImageIsABadInput) {
  const CliRun r = run_cli({"bench", "--model", kModel, "--image", "/nonexistent/cat.png", "--bandwidth-mib", "16"});
  EXPECT_EQ(r.status, 4) << r.err;
  EXPECT_NE(r.err.find("/nonexistent/cat.png"), std::string::npos) << r.err;
}
