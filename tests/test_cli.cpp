// The command-line tool, run as a real process (posix_spawn, no shell): outputs against the fixtures, help,
// and every kind of bad invocation, which must end with the right exit status and one clear message.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>

#include "io/safetensors.h"

extern char** environ;

using namespace blip2;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const std::string kFixtures = BLIP2_FIXTURES_DIR;
const std::string kImages = kFixtures + "/images/";
const std::string kModel = BLIP2_TINY_T5_DIR;
const std::string kCli = BLIP2_CLI_PATH;

// ---------------------------------------------------------------------------------------------------------
// Running the tool.

struct CliRun {
  int status = -1;      // exit status, when it exited
  int signal = 0;       // the signal that ended it, when one did
  bool timed_out = false;
  std::string out, err;
  std::vector<std::string> args;

  bool exited() const { return signal == 0 && !timed_out && status >= 0; }
  // For failure messages.
  std::string describe() const {
    std::string cmd = "blip2";
    for (const auto& a : args) cmd += " '" + (a.size() > 80 ? a.substr(0, 80) + "...(" + std::to_string(a.size()) + " chars)" : a) + "'";
    return cmd + "\n  status " + std::to_string(status) + (signal ? ", signal " + std::to_string(signal) : "") +
           (timed_out ? ", timed out" : "") + "\n  stdout: " + out.substr(0, 2000) + "\n  stderr: " + err.substr(0, 2000);
  }
};

using EnvChanges = std::vector<std::pair<std::string, std::optional<std::string>>>;  // nullopt: unset

// Runs the CLI with `args` (each passed as one argv entry), stdin from /dev/null, stdout and stderr captured.
// BLIP2_MODEL is unset unless `env` sets it, so a developer's environment cannot change the results.
CliRun run_cli(const std::vector<std::string>& args, const EnvChanges& env = {}, int timeout_s = 120) {
  CliRun r;
  r.args = args;
  int out_pipe[2], err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0 || pipe2(err_pipe, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe2: " << std::strerror(errno);
    return r;
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, out_pipe[1], 1);
  posix_spawn_file_actions_adddup2(&fa, err_pipe[1], 2);

  std::vector<std::string> argv_s = {kCli};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);

  std::vector<std::string> env_s;
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    const std::string name = kv.substr(0, kv.find('='));
    bool replaced = name == "BLIP2_MODEL";
    for (const auto& [n, v] : env) replaced = replaced || n == name;
    if (!replaced) env_s.push_back(kv);
  }
  for (const auto& [n, v] : env)
    if (v) env_s.push_back(n + "=" + *v);
  std::vector<char*> envp;
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);

  pid_t pid = 0;
  const int rc = posix_spawn(&pid, kCli.c_str(), &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  close(out_pipe[1]);
  close(err_pipe[1]);
  if (rc != 0) {
    close(out_pipe[0]);
    close(err_pipe[0]);
    ADD_FAILURE() << "posix_spawn " << kCli << ": " << std::strerror(rc);
    return r;
  }

  // Read both pipes until both close, so a chatty child never blocks on a full pipe.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&r.out, &r.err};
  int open_fds = 2;
  char buf[65536];
  while (open_fds > 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      r.timed_out = true;
      kill(pid, SIGKILL);
      break;
    }
    const int n = poll(fds, 2, static_cast<int>(left.count()));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      const ssize_t got = read(fds[i].fd, buf, sizeof buf);
      if (got > 0) {
        sinks[i]->append(buf, static_cast<size_t>(got));
      } else if (got == 0 || errno != EINTR) {
        close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (auto& f : fds)
    if (f.fd >= 0) close(f.fd);
  int st = 0;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(st)) r.status = WEXITSTATUS(st);
  if (WIFSIGNALED(st)) r.signal = WTERMSIG(st);
  return r;
}

std::vector<std::string> lines(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string line;
  while (std::getline(ss, line)) out.push_back(line);
  return out;
}

// A successful run: status 0, nothing on stderr (not a terminal: no progress), stdout is one JSON line.
json json_output(const CliRun& r) {
  EXPECT_TRUE(r.exited() && r.status == 0) << r.describe();
  EXPECT_EQ(r.err, "") << r.describe();
  EXPECT_EQ(lines(r.out).size(), 1u) << r.describe();
  EXPECT_TRUE(!r.out.empty() && r.out.back() == '\n') << r.describe();
  json j = json::parse(r.out, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << r.describe();
  return j;
}

// ---------------------------------------------------------------------------------------------------------
// The fixtures.

const json& cases() {
  static const json c = [] {
    std::ifstream in(kFixtures + "/tiny-blip2-t5/reference.json");
    return json::parse(in)["cases"];
  }();
  return c;
}

// The reference's greedy sequence i of a case, as the tool prints it: without the start token, up to and
// including the first end-of-sequence token.
std::vector<int32_t> greedy_ids(const std::string& case_name, size_t i) {
  const auto seq = cases()[case_name]["generate"]["greedy"]["sequences"][i].get<std::vector<int32_t>>();
  std::vector<int32_t> out;
  for (size_t k = 1; k < seq.size(); ++k) {
    out.push_back(seq[k]);
    if (seq[k] == 1) break;
  }
  return out;
}

std::string greedy_text(const std::string& case_name, size_t i) {
  return cases()[case_name]["generate"]["greedy"]["text"][i].get<std::string>();
}

int max_new_tokens(const std::string& case_name) {
  return cases()[case_name]["generate"]["greedy"]["kwargs"]["max_new_tokens"].get<int>();
}

class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    std::random_device rd;
    path_ = fs::temp_directory_path() / ("blip2-cli-test-" + std::to_string(getpid()) + "-" +
                                         std::to_string(counter++) + "-" + std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

  // A copy of the bundled tiny model in this directory.
  std::string copy_model(const std::string& name = "model") const {
    const fs::path dst = path_ / name;
    fs::create_directories(dst);
    for (const auto& e : fs::directory_iterator(kModel)) fs::copy_file(e.path(), dst / e.path().filename());
    return dst.string();
  }

 private:
  fs::path path_;
};

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  ASSERT_TRUE(out) << path;
}

double rel_diff(const Tensor& got, const Tensor& want, int64_t begin = 0, int64_t n = -1) {
  if (n < 0) n = want.size();
  double num = 0, den = 0;
  for (int64_t i = begin; i < begin + n; ++i) {
    const double d = static_cast<double>(got.data[i - begin]) - want.data[i];
    num += d * d;
    den += static_cast<double>(want.data[i]) * want.data[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// ---------------------------------------------------------------------------------------------------------
// Outputs.

TEST(Cli, GenerateCaptionJsonMatchesTheReference) {
  const std::string image = kImages + "chelsea.png";
  const CliRun r = run_cli({"generate", "--model", kModel, "--image", image, "--prompt", "", "--max-new-tokens",
                         std::to_string(max_new_tokens("caption")), "--json"});
  const json j = json_output(r);
  ASSERT_TRUE(j.contains("results") && j["results"].is_array()) << r.out;
  ASSERT_EQ(j["results"].size(), 1u);
  const json& res = j["results"][0];
  EXPECT_EQ(res["image"], image);
  EXPECT_EQ(res["prompt"], "");
  ASSERT_EQ(res["sequences"].size(), 1u);
  const json& s = res["sequences"][0];
  EXPECT_EQ(s["ids"].get<std::vector<int32_t>>(), greedy_ids("caption", 0));
  EXPECT_EQ(s["text"], greedy_text("caption", 0));
  ASSERT_TRUE(s["score"].is_number());
  EXPECT_LT(s["score"].get<double>(), 0.0) << "a sum of log-probabilities";
}

TEST(Cli, GenerateTwoPairsInOneBatch) {
  const auto& c = cases()["batch2"];
  std::vector<std::string> args = {"generate", "--model", kModel, "--max-new-tokens", std::to_string(max_new_tokens("batch2")), "--json"};
  for (size_t i = 0; i < c["images"].size(); ++i) {
    args.insert(args.end(), {"--image", kImages + c["images"][i].get<std::string>(), "--prompt", c["prompts"][i].get<std::string>()});
  }
  const CliRun r = run_cli(args);
  const json j = json_output(r);
  ASSERT_EQ(j["results"].size(), 2u) << r.out;
  for (size_t i = 0; i < 2; ++i) {
    SCOPED_TRACE(i);
    const json& res = j["results"][i];
    EXPECT_EQ(res["image"], kImages + c["images"][i].get<std::string>());
    EXPECT_EQ(res["prompt"], c["prompts"][i]);
    EXPECT_EQ(res["sequences"][0]["ids"].get<std::vector<int32_t>>(), greedy_ids("batch2", i));
    EXPECT_EQ(res["sequences"][0]["text"], greedy_text("batch2", i));
  }
  // The second item stops at end-of-sequence: its ids end with it.
  EXPECT_EQ(greedy_ids("batch2", 1).back(), 1);
}

// A long --image/--prompt list runs in chunks of 16 pairs: the answers are the single pair's, and peak memory
// does not grow with the list (1000 pairs took 2 GB when every image was decoded and encoded at once).
TEST(Cli, LongPairListsRunInBoundedChunks) {
  const std::string image = kImages + "chelsea.png";
  const auto pairs = [&](int n) {
    std::vector<std::string> args = {"generate", "--model", kModel, "--max-new-tokens", "2", "--json"};
    for (int i = 0; i < n; ++i) args.insert(args.end(), {"--image", image, "--prompt", "what is it?"});
    return args;
  };
  const json one = json_output(run_cli(pairs(1)));
  ASSERT_EQ(one["results"].size(), 1u);
  const auto max_rss_kb = [] {
    rusage u{};
    getrusage(RUSAGE_CHILDREN, &u);
    return u.ru_maxrss;
  };
  (void)run_cli(pairs(16));
  const long rss16 = max_rss_kb();
  const CliRun r = run_cli(pairs(64), {}, 600);
  const long rss64 = max_rss_kb();
  const json many = json_output(r);
  ASSERT_EQ(many["results"].size(), 64u) << r.describe();
  // (ids and text; the score's last bits depend on the batch's shape, as in any batched run)
  const json& want = one["results"][0]["sequences"][0];
  for (const json& res : many["results"]) {
    EXPECT_EQ(res["sequences"][0]["ids"], want["ids"]);
    EXPECT_EQ(res["sequences"][0]["text"], want["text"]);
  }
#ifndef __SANITIZE_ADDRESS__  // AddressSanitizer's quarantine keeps freed memory resident
  // 48 more images' pixels alone are 29 MB (224 x 224 x 3 floats each) when held at once.
  EXPECT_LT(rss64 - rss16, 12 * 1024) << "peak RSS " << rss16 << " KB for 16 pairs, " << rss64 << " KB for 64";
#endif
}

TEST(Cli, PlainOutputIsOneLinePerResult) {
  const auto& c = cases()["batch2"];
  const CliRun r = run_cli({"generate", "--model", kModel, "--max-new-tokens", "12", "--image",
                         kImages + c["images"][0].get<std::string>(), "--prompt", c["prompts"][0].get<std::string>(),
                         "--image", kImages + c["images"][1].get<std::string>(), "--prompt",
                         c["prompts"][1].get<std::string>()});
  ASSERT_TRUE(r.exited() && r.status == 0) << r.describe();
  EXPECT_EQ(r.err, "");
  EXPECT_EQ(r.out, greedy_text("batch2", 0) + "\n" + greedy_text("batch2", 1) + "\n");
}

TEST(Cli, CaptionAndAskUseBLIP2_MODEL) {
  TempDir tmp;
  const std::string model = tmp.copy_model();
  const EnvChanges env = {{"BLIP2_MODEL", model}};

  // caption IMAGE == generate with the empty prompt
  const CliRun cap = run_cli({"caption", kImages + "chelsea.png", "--max-new-tokens", "12", "--json"}, env);
  const json cj = json_output(cap);
  EXPECT_EQ(cj["results"][0]["prompt"], "");
  EXPECT_EQ(cj["results"][0]["sequences"][0]["ids"].get<std::vector<int32_t>>(), greedy_ids("caption", 0));
  const CliRun cap_plain = run_cli({"caption", kImages + "chelsea.png", "--max-new-tokens", "12"}, env);
  ASSERT_TRUE(cap_plain.exited() && cap_plain.status == 0) << cap_plain.describe();
  EXPECT_EQ(cap_plain.out, greedy_text("caption", 0) + "\n");

  // ask IMAGE QUESTION == generate with "Question: QUESTION Answer:"
  const CliRun ask = run_cli({"ask", kImages + "rocket.jpg", "what is this?", "--max-new-tokens", "12", "--json"}, env);
  const json aj = json_output(ask);
  EXPECT_EQ(aj["results"][0]["prompt"], "Question: what is this? Answer:");
  const auto ask_ids = aj["results"][0]["sequences"][0]["ids"].get<std::vector<int32_t>>();
  const CliRun gen = run_cli({"generate", "--model", model, "--image", kImages + "rocket.jpg", "--prompt",
                           "Question: what is this? Answer:", "--max-new-tokens", "12", "--json"});
  EXPECT_EQ(ask_ids, json_output(gen)["results"][0]["sequences"][0]["ids"].get<std::vector<int32_t>>());
  ASSERT_EQ(cases()["batch2"]["prompts"][0], "Question: what is this? Answer:");
  EXPECT_EQ(ask_ids, greedy_ids("batch2", 0)) << "the same pair as the first of the batch2 case";

  // The variable is really what they read: pointing it elsewhere fails naming that place ...
  const std::string nowhere = tmp / "no-such-model";
  for (const std::string cmd : {"caption", "ask"}) {
    std::vector<std::string> args = {cmd, kImages + "chelsea.png"};
    if (cmd == "ask") args.push_back("what?");
    const CliRun bad = run_cli(args, {{"BLIP2_MODEL", nowhere}});
    EXPECT_EQ(bad.status, 3) << bad.describe();
    EXPECT_NE(bad.err.find(nowhere), std::string::npos) << bad.describe();
  }
  // ... and --model wins over it.
  const CliRun explicit_model = run_cli({"caption", "--model", model, kImages + "chelsea.png", "--max-new-tokens", "12"},
                                     {{"BLIP2_MODEL", nowhere}});
  EXPECT_EQ(explicit_model.status, 0) << explicit_model.describe();
  EXPECT_EQ(explicit_model.out, greedy_text("caption", 0) + "\n");
}

TEST(Cli, PromptsReachTheModelVerbatim) {
  // Commas, quotes, non-ASCII, a leading dash and invalid UTF-8 are prompt text, not syntax; the JSON output
  // stays valid.
  for (const std::string prompt : {"a, b; \"c\" 'd' é ✓", "-x", "--not-an-option", "bad \xff\xfe utf-8"}) {
    SCOPED_TRACE(prompt);
    const CliRun r = run_cli({"generate", "--model", kModel, "--image", kImages + "chelsea.png", "--prompt", prompt,
                           "--max-new-tokens", "2", "--json"});
    const json j = json_output(r);
    if (prompt.find('\xff') == std::string::npos) {
      EXPECT_EQ(j["results"][0]["prompt"], prompt);
    }
    EXPECT_EQ(j["results"][0]["sequences"][0]["ids"].size(), 2u);
  }
}

// The reference tensors of a case, by stage name.
Tensor reference(const std::string& name) {
  static const SafetensorsFile ref(kFixtures + "/tiny-blip2-t5/reference.safetensors");
  return ref.tensor(name);
}

TEST(Cli, InspectWritesEveryStage) {
  TempDir tmp;
  const std::string out = tmp / "stages.safetensors";
  const auto forced = cases()["caption"]["forced_decoder_input_ids"][0].get<std::vector<int32_t>>();
  ASSERT_GE(forced.size(), 3u);
  const std::string ids = std::to_string(forced[0]) + "," + std::to_string(forced[1]) + "," + std::to_string(forced[2]);
  const CliRun r = run_cli({"inspect", "--model", kModel, "--image", kImages + "chelsea.png", "--prompt", "",
                         "--decoder-input-ids", ids, "--out", out});
  ASSERT_TRUE(r.exited() && r.status == 0) << r.describe();
  EXPECT_EQ(r.out, "");

  const SafetensorsFile f(out);
  std::vector<std::string> names;
  for (const auto& [n, e] : f.entries()) names.push_back(n);
  EXPECT_EQ(names, std::vector<std::string>({"encoder_last_hidden_state", "language_projection", "logits",
                                             "qformer_last_hidden_state", "vision_last_hidden_state"}));
  for (const std::string stage : {"vision_last_hidden_state", "qformer_last_hidden_state", "language_projection",
                                  "encoder_last_hidden_state"}) {
    SCOPED_TRACE(stage);
    const Tensor want = reference("caption/" + stage);
    const Tensor got = f.tensor(stage);
    ASSERT_EQ(got.shape, want.shape);
    const double rel = rel_diff(got, want);
    std::printf("  inspect %-26s rel %.3g\n", stage.c_str(), rel);
    EXPECT_LE(rel, 1e-5);
  }
  const Tensor want = reference("caption/forced_logits");  // [1, 11, V]
  const Tensor got = f.tensor("logits");
  ASSERT_EQ(want.shape.size(), 3u);
  ASSERT_EQ(got.shape, Shape({1, 3, want.shape[2]}));
  const double rel = rel_diff(got, want, 0, 3 * want.shape[2]);
  std::printf("  inspect %-26s rel %.3g\n", "logits[:, :3]", rel);
  EXPECT_LE(rel, 1e-5);
}

// The OPT family through the same commands: chosen from config.json, nothing else changes.
const std::string kOptModel = std::string(BLIP2_BUNDLED_OPT_DIR);
const json& opt_case(const std::string& name) {
  static const json cases = [] {
    std::ifstream in(kFixtures + "/tiny-blip2-opt/reference.json");
    return json::parse(in)["cases"];
  }();
  return cases[name];
}

TEST(Cli, OptGenerateLeftPaddedBatchMatchesTheReference) {
  const json& c = opt_case("batch2_leftpad");
  std::vector<std::string> args = {"generate", "--model", kOptModel, "--max-new-tokens", "12", "--json"};
  for (size_t i = 0; i < 2; ++i)
    for (const std::string flag : {"--image", "--prompt"})
      args.push_back(flag), args.push_back(flag == "--image" ? kImages + c["images"][i].get<std::string>()
                                                             : c["prompts"][i].get<std::string>());
  const json j = json_output(run_cli(args));
  ASSERT_EQ(j["results"].size(), 2u) << j.dump();
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(j["results"][i]["sequences"][0]["ids"], c["generate"]["greedy"]["sequences"][i]) << i;
    EXPECT_EQ(j["results"][i]["sequences"][0]["text"], c["generate"]["greedy"]["text"][i]) << i;
  }
}

TEST(Cli, OptInspectWritesPromptLogits) {
  TempDir tmp;
  const std::string out = tmp / "opt.safetensors";
  const json& c = opt_case("vqa");
  const CliRun r = run_cli({"inspect", "--model", kOptModel, "--image", kImages + c["images"][0].get<std::string>(),
                            "--prompt", c["prompts"][0].get<std::string>(), "--out", out});
  ASSERT_TRUE(r.exited() && r.status == 0) << r.describe();
  const SafetensorsFile f(out);
  const SafetensorsFile ref(kFixtures + "/tiny-blip2-opt/reference.safetensors");
  EXPECT_EQ(f.find("encoder_last_hidden_state"), nullptr);
  for (const auto& [stage, ref_name] : std::vector<std::pair<std::string, std::string>>{
           {"vision_last_hidden_state", "vqa/vision_last_hidden_state"},
           {"language_projection", "vqa/language_projection"},
           {"logits", "vqa/prompt_logits"}}) {
    const Tensor got = f.tensor(stage), want = ref.tensor(ref_name);
    ASSERT_EQ(got.shape, want.shape) << stage;
    EXPECT_LE(rel_diff(got, want), 1e-5) << stage;
  }
  // Decoder ids are T5's: refused for OPT before any work, as a usage error.
  const CliRun bad = run_cli({"inspect", "--model", kOptModel, "--image", kImages + "chelsea.png", "--prompt", "",
                              "--decoder-input-ids", "0", "--out", out});
  EXPECT_EQ(bad.status, 2) << bad.describe();
  EXPECT_NE(bad.err.find("OPT"), std::string::npos) << bad.err;
}

// InstructBLIP with Vicuna through the CLI, unchanged: generate --json's contract (new ids up to the first
// eos, which is text_config's 1) and inspect's stages, qformer_input_ids among them.
const std::string kVicuna = kFixtures + "/tiny-instructblip-vicuna";
const json& vicuna_case(const std::string& name) {
  static const json cases = [] {
    std::ifstream in(kVicuna + "/reference.json");
    return json::parse(in)["cases"];
  }();
  return cases[name];
}

TEST(Cli, VicunaGenerateLeftPaddedBatchMatchesTheReference) {
  const json& c = vicuna_case("batch2_leftpad");
  std::vector<std::string> args = {"generate", "--model", kVicuna, "--max-new-tokens", "12", "--json"};
  for (size_t i = 0; i < 2; ++i)
    for (const std::string flag : {"--image", "--prompt"})
      args.push_back(flag), args.push_back(flag == "--image" ? kImages + c["images"][i].get<std::string>()
                                                             : c["prompts"][i].get<std::string>());
  const json j = json_output(run_cli(args));
  ASSERT_EQ(j["results"].size(), 2u) << j.dump();
  for (size_t i = 0; i < 2; ++i) {
    std::vector<int32_t> want;  // the reference pads a finished row with -1 after its eos
    for (int32_t id : c["generate"]["greedy"]["sequences"][i].get<std::vector<int32_t>>()) {
      want.push_back(id);
      if (id == 1) break;
    }
    EXPECT_EQ(j["results"][i]["sequences"][0]["ids"].get<std::vector<int32_t>>(), want) << i;
    EXPECT_EQ(j["results"][i]["sequences"][0]["text"], c["generate"]["greedy"]["text"][i]) << i;
  }
}

TEST(Cli, VicunaInspectWritesEveryStageAndTheQFormerIds) {
  TempDir tmp;
  const std::string out = tmp / "vicuna.safetensors";
  const json& c = vicuna_case("vqa");
  const CliRun r = run_cli({"inspect", "--model", kVicuna, "--image", kImages + c["images"][0].get<std::string>(),
                            "--prompt", c["prompts"][0].get<std::string>(), "--out", out});
  ASSERT_TRUE(r.exited() && r.status == 0) << r.describe();
  const SafetensorsFile f(out);
  const SafetensorsFile ref(kVicuna + "/reference.safetensors");
  for (const auto& [stage, ref_name] : std::vector<std::pair<std::string, std::string>>{
           {"vision_last_hidden_state", "vqa/vision_last_hidden_state"},
           {"qformer_last_hidden_state", "vqa/qformer_last_hidden_state"},
           {"language_projection", "vqa/language_projection"},
           {"logits", "vqa/prompt_logits"}}) {
    const Tensor got = f.tensor(stage), want = ref.tensor(ref_name);
    ASSERT_EQ(got.shape, want.shape) << stage;
    EXPECT_LE(rel_diff(got, want), 1e-5) << stage;
  }
  const Tensor ids = f.tensor("qformer_input_ids");
  const auto want = c["qformer_input_ids"][0].get<std::vector<int32_t>>();
  ASSERT_EQ(ids.shape, (Shape{1, static_cast<int64_t>(want.size())}));
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(ids.data[i], static_cast<float>(want[i])) << i;
}

TEST(Cli, InspectBatchWithDecoderIdsPerPair) {
  // Two pairs of different prompt lengths (the second padded) and one decoder id list per pair.
  TempDir tmp;
  const std::string out = tmp / "stages.safetensors";
  const auto& c = cases()["batch2"];
  std::vector<std::string> args = {"inspect", "--model", kModel, "--out", out};
  for (size_t i = 0; i < 2; ++i) {
    std::string ids;
    for (int32_t id : c["forced_decoder_input_ids"][i].get<std::vector<int32_t>>()) {
      if (!ids.empty()) ids += ',';
      ids += std::to_string(id);
    }
    args.insert(args.end(), {"--image", kImages + c["images"][i].get<std::string>(), "--prompt",
                             c["prompts"][i].get<std::string>(), "--decoder-input-ids", ids});
  }
  const CliRun r = run_cli(args);
  ASSERT_TRUE(r.exited() && r.status == 0) << r.describe();
  const SafetensorsFile f(out);
  for (const auto& [stage, ref_name] : std::vector<std::pair<std::string, std::string>>{
           {"vision_last_hidden_state", "vision_last_hidden_state"},
           {"qformer_last_hidden_state", "qformer_last_hidden_state"},
           {"language_projection", "language_projection"},
           {"encoder_last_hidden_state", "encoder_last_hidden_state"},
           {"logits", "forced_logits"}}) {
    SCOPED_TRACE(stage);
    const Tensor want = reference("batch2/" + ref_name), got = f.tensor(stage);
    ASSERT_EQ(got.shape, want.shape);
    EXPECT_LE(rel_diff(got, want), 1e-5);
  }
}

TEST(Cli, HelpForTheAppAndEverySubcommand) {
  const std::vector<std::vector<std::string>> invocations = {
      {"--help"}, {"-h"}, {"generate", "--help"}, {"caption", "--help"}, {"ask", "--help"}, {"inspect", "--help"}};
  for (const auto& args : invocations) {
    SCOPED_TRACE(args[0]);
    const CliRun r = run_cli(args);
    EXPECT_TRUE(r.exited() && r.status == 0) << r.describe();
    EXPECT_NE(r.out.find("Usage:"), std::string::npos) << r.describe();
    EXPECT_EQ(r.err, "");
    if (args.size() == 2) EXPECT_NE(r.out.find(args[0]), std::string::npos) << "names the subcommand";
    else {
      EXPECT_NE(r.out.find("Exit status"), std::string::npos) << "documents the exit statuses";
      for (const char* sub : {"generate", "caption", "ask", "inspect"}) EXPECT_NE(r.out.find(sub), std::string::npos) << sub;
    }
  }
  // Help documents the options each subcommand takes.
  EXPECT_NE(run_cli({"generate", "--help"}).out.find("--max-new-tokens"), std::string::npos);
  EXPECT_NE(run_cli({"inspect", "--help"}).out.find("--decoder-input-ids"), std::string::npos);
  EXPECT_NE(run_cli({"ask", "--help"}).out.find("QUESTION"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------------------
// Errors: the right status, one clear message on stderr, nothing on stdout, never a crash.

void expect_clean_failure(const CliRun& r, int status, const std::string& needle) {
  ASSERT_FALSE(r.timed_out) << r.describe();
  ASSERT_EQ(r.signal, 0) << "crashed\n" << r.describe();
  EXPECT_TRUE(r.status == 2 || r.status == 3 || r.status == 4) << r.describe();
  EXPECT_EQ(r.status, status) << r.describe();
  EXPECT_EQ(r.out, "") << r.describe();
  const auto err = lines(r.err);
  ASSERT_FALSE(err.empty()) << "no message\n" << r.describe();
  EXPECT_NE(err[0].find(needle), std::string::npos) << "message lacks \"" << needle << "\"\n" << r.describe();
  // One message: the library's as a single "error: " line; the option parser's plus its hint to use --help.
  if (err[0].rfind("error: ", 0) == 0) EXPECT_EQ(err.size(), 1u) << r.describe();
  else {
    ASSERT_EQ(err.size(), 2u) << r.describe();
    EXPECT_NE(err[1].find("--help"), std::string::npos) << r.describe();
  }
  for (const char* crash : {"terminate called", "Sanitizer", "runtime error", "Assertion", "what():"})
    EXPECT_EQ(r.err.find(crash), std::string::npos) << r.describe();
}

struct CliError {
  const char* name;
  std::vector<std::string> args;
  int status;
  std::string needle;
};

std::vector<std::string> gen(std::vector<std::string> extra) {
  std::vector<std::string> a = {"generate", "--model", kModel};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

std::vector<std::string> ins(std::vector<std::string> extra) {
  std::vector<std::string> a = {"inspect", "--model", kModel, "--image", kImages + "chelsea.png", "--prompt", ""};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

std::string long_prompt() {
  std::string s;
  for (int i = 0; i < 5000; ++i) s += i ? " word" : "word";
  return s;
}

const std::string kCat = kImages + "chelsea.png";

class CliErrors : public ::testing::TestWithParam<CliError> {};

TEST_P(CliErrors, ExitWithStatusAndOneMessage) {
  const CliRun r = run_cli(GetParam().args);
  expect_clean_failure(r, GetParam().status, GetParam().needle);
  std::printf("  status %d: %s", r.status, r.err.c_str());
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CliErrors,
    ::testing::Values(
        // 4: bad inputs
        CliError{"TruncatedJpeg", gen({"--image", kImages + "truncated.jpg", "--prompt", ""}), 4, "truncated.jpg"},
        CliError{"TextFileAsImage", gen({"--image", kFixtures + "/README.md", "--prompt", ""}), 4, "not a PNG or JPEG image"},
        CliError{"EmptyFileAsImage", gen({"--image", "/dev/null", "--prompt", ""}), 4, "/dev/null"},
        CliError{"MissingImage", gen({"--image", kImages + "no-such.png", "--prompt", ""}), 4, "no-such.png: cannot open"},
        CliError{"DirectoryAsImage", gen({"--image", kImages, "--prompt", ""}), 4, "cannot read"},
        CliError{"EndlessImage", gen({"--image", "/dev/zero", "--prompt", ""}), 4, "/dev/zero: image is larger than 256 MiB"},
        CliError{"SecondImageBad", gen({"--image", kCat, "--prompt", "", "--image", kImages + "truncated.jpg", "--prompt", ""}), 4, "truncated.jpg"},
        CliError{"PromptTooLong", gen({"--image", kCat, "--prompt", long_prompt()}), 4, "prompt is too long"},
        CliError{"CaptionTruncatedJpeg", {"caption", "--model", kModel, kImages + "truncated.jpg"}, 4, "truncated.jpg"},
        // Settings that leave beam sampling fewer tokens than it draws: the input's fault, not an internal error.
        CliError{"BeamSamplingOutOfTokens",
                 {"caption", "--model", kModel, kCat, "--do-sample", "--num-beams", "2", "--top-p", "0.001"}, 4,
                 "beam sampling draws 4 tokens (2 × num_beams) but only 2 had a non-zero probability"},
        CliError{"AskQuestionTooLong", {"ask", "--model", kModel, kCat, long_prompt()}, 4, "prompt is too long"},
        // 2: usage
        CliError{"MoreImagesThanPrompts", gen({"--image", kCat, "--image", kCat, "--prompt", ""}), 2, "each --image needs one --prompt"},
        CliError{"MorePromptsThanImages", gen({"--image", kCat, "--prompt", "", "--prompt", "b"}), 2, "each --image needs one --prompt"},
        CliError{"UnknownOption", gen({"--image", kCat, "--prompt", "", "--bogus"}), 2, "--bogus"},
        CliError{"UnknownSubcommand", {"frobnicate"}, 2, "unknown command 'frobnicate'"},
        CliError{"UnknownSubcommandAfterGlobalOption", {"--threads", "1", "captoin"}, 2, "unknown command 'captoin'"},
        CliError{"NoSubcommand", {}, 2, "subcommand"},
        CliError{"MissingPrompt", gen({"--image", kCat}), 2, "--prompt is required"},
        CliError{"MissingImageOption", gen({"--prompt", ""}), 2, "--image is required"},
        CliError{"EmptyPromptList", {"generate"}, 2, "is required"},
        CliError{"EmptyPromptListWithModel", gen({}), 2, "is required"},
        CliError{"OptionWithoutValue", gen({"--image", kCat, "--prompt", "", "--max-new-tokens"}), 2, "--max-new-tokens"},
        CliError{"MaxNewTokensZero", gen({"--image", kCat, "--prompt", "", "--max-new-tokens", "0"}), 2, "--max-new-tokens"},
        CliError{"MaxNewTokensNegative", gen({"--image", kCat, "--prompt", "", "--max-new-tokens", "-3"}), 2, "--max-new-tokens"},
        CliError{"MaxNewTokensNotANumber", gen({"--image", kCat, "--prompt", "", "--max-new-tokens", "abc"}), 2, "abc"},
        CliError{"MaxNewTokensHuge", gen({"--image", kCat, "--prompt", "", "--max-new-tokens", "99999999999"}), 2, "--max-new-tokens"},
        CliError{"CaptionMissingImage", {"caption", "--model", kModel}, 2, "INPUT is required"},
        CliError{"AskMissingQuestion", {"ask", "--model", kModel, kCat}, 2, "QUESTION is required"},
        CliError{"AskExtraArgument", {"ask", "--model", kModel, kCat, "what?", "extra"}, 2, "extra"},
        CliError{"InspectMissingOut", ins({}), 2, "--out is required"},
        CliError{"BadDecoderIds", ins({"--decoder-input-ids", "0,x", "--out", "/tmp/never-written"}), 2, "'x' is not a token id"},
        CliError{"EmptyDecoderIds", ins({"--decoder-input-ids", "", "--out", "/tmp/never-written"}), 2, "--decoder-input-ids"},
        CliError{"TrailingCommaDecoderIds", ins({"--decoder-input-ids", "0,", "--out", "/tmp/never-written"}), 2, "empty entry"},
        CliError{"NegativeDecoderId", ins({"--decoder-input-ids", "0,-1", "--out", "/tmp/never-written"}), 2, "'-1'"},
        CliError{"DecoderIdOutsideVocab", ins({"--decoder-input-ids", "0,99999", "--out", "/tmp/never-written"}), 2, "outside the vocabulary"},
        CliError{"DecoderIdsPerPairCount", ins({"--decoder-input-ids", "0", "--decoder-input-ids", "0", "--out", "/tmp/never-written"}), 2, "--decoder-input-ids"},
        CliError{"InspectOutInMissingDir", ins({"--out", "/nonexistent-dir/x.safetensors"}), 2, "/nonexistent-dir/x.safetensors"},
        // 3: model directory
        CliError{"ModelDirMissing", {"generate", "--model", "/nonexistent-model-dir", "--image", kCat, "--prompt", ""}, 3, "/nonexistent-model-dir"},
        CliError{"ModelDirIsAFile", {"caption", "--model", kCat, kCat}, 3, "model directory not found"},
        CliError{"InspectModelDirMissing", {"inspect", "--model", "/nonexistent-model-dir", "--image", kCat, "--prompt", "", "--out", "/tmp/never-written"}, 3, "/nonexistent-model-dir"}),
    [](const ::testing::TestParamInfo<CliError>& info) { return std::string(info.param.name); });

TEST(Cli, BrokenModelDirectories) {
  TempDir tmp;
  const auto expect_model_failure = [&](const std::string& model, const std::string& needle) {
    const CliRun r = run_cli({"caption", "--model", model, kCat});
    expect_clean_failure(r, 3, needle);
    std::printf("  status %d: %s", r.status, r.err.c_str());
  };
  const std::string bad_json = tmp.copy_model("bad-json");
  write_text(bad_json + "/config.json", "{\"vision_config\": ");
  expect_model_failure(bad_json, "config.json: not valid JSON");

  const std::string bad_field = tmp.copy_model("bad-field");
  {
    std::ifstream in(kModel + "/config.json");
    json config = json::parse(in);
    config["vision_config"]["num_attention_heads"] = 0;
    write_text(bad_field + "/config.json", config.dump(2));
  }
  expect_model_failure(bad_field, "num_attention_heads = 0");

  const std::string no_weights = tmp.copy_model("no-weights");
  fs::remove(no_weights + "/model.safetensors");
  expect_model_failure(no_weights, "no model.safetensors");

  const std::string cut_weights = tmp.copy_model("cut-weights");
  fs::resize_file(cut_weights + "/model.safetensors", 1000);
  expect_model_failure(cut_weights, "model.safetensors");

  const std::string no_tokenizer = tmp.copy_model("no-tokenizer");
  fs::remove(no_tokenizer + "/spiece.model");
  expect_model_failure(no_tokenizer, "spiece.model");
}

}  // namespace
