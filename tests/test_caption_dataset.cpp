// `blip2 caption` over a dataset, run as a real process: every caption must equal what `blip2 caption IMAGE`
// prints for that image alone (run separately: the expected values never come from the code under test),
// with every input kind, output format, resume, faults, shards and a SIGKILL in the middle of a run.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cli_runner.h"

using blip2::test::run_cli;
using blip2::test::slurp;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::string kImages = std::string(BLIP2_FIXTURES_DIR) + "/images/";
const std::string kT5 = BLIP2_TINY_T5_DIR;
const std::string kOpt = BLIP2_BUNDLED_OPT_DIR;

// A fresh directory per test, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() /
           ("blip2-capset-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string operator/(const std::string& rel) const { return (path / rel).string(); }
};

void copy_image(const std::string& fixture, const std::string& dest) {
  fs::create_directories(fs::path(dest).parent_path());
  fs::copy_file(kImages + fixture, dest, fs::copy_options::overwrite_existing);
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  size_t b = 0;
  while (b < text.size()) {
    const size_t e = text.find('\n', b);
    out.push_back(text.substr(b, e - b));
    if (e == std::string::npos) break;
    b = e + 1;
  }
  return out;
}

// What `blip2 caption IMAGE` prints for the image alone: one line per caption.
std::vector<std::string> alone(const std::string& image, std::vector<std::string> extra = {},
                               const std::string& model = kT5) {
  std::vector<std::string> args = {"caption", "--model", model, image};
  args.insert(args.end(), extra.begin(), extra.end());
  const auto r = run_cli(args);
  EXPECT_EQ(r.status, 0) << r.err;
  return lines_of(r.out);
}

// jsonl records by image key; fails on a duplicate.
std::map<std::string, json> records(const std::string& jsonl) {
  std::map<std::string, json> out;
  for (const auto& line : lines_of(jsonl)) {
    if (line.empty()) continue;
    const json j = json::parse(line);
    EXPECT_TRUE(out.emplace(j["image"].get<std::string>(), j).second) << "duplicate record " << line;
  }
  return out;
}

std::vector<std::string> texts(const json& rec) {
  std::vector<std::string> t;
  for (const auto& c : rec["captions"]) t.push_back(c["text"].get<std::string>());
  return t;
}

// A folder: images at two depths, a hidden file and folder, a non-image file, a corrupt JPEG.
void make_folder(const TempDir& d) {
  copy_image("chelsea.png", d / "set/b_chelsea.png");
  copy_image("rocket.jpg", d / "set/a_rocket.jpg");
  copy_image("logo.png", d / "set/sub/logo.png");
  copy_image("camera.png", d / "set/sub/deeper/camera.PNG");
  copy_image("coffee.png", d / "set/.hidden/coffee.png");
  copy_image("astronaut.png", d / "set/.astronaut.png");
  std::ofstream(d / "set/notes.md") << "not an image\n";
}
const std::vector<std::string> kFolderImages = {"set/a_rocket.jpg", "set/b_chelsea.png", "set/sub/deeper/camera.PNG",
                                                "set/sub/logo.png"};

}  // namespace

TEST(CaptionDataset, FolderJsonlEqualsEachImageAlone) {
  TempDir d;
  make_folder(d);
  const auto r = run_cli({"caption", "--model", kT5, d / "set", "--batch", "3"});
  ASSERT_EQ(r.status, 0) << r.err;
  const auto recs = records(r.out);
  ASSERT_EQ(recs.size(), kFolderImages.size()) << r.out;  // hidden files and folders, notes.md skipped
  for (const auto& rel : kFolderImages) {
    ASSERT_TRUE(recs.count(d / rel)) << rel;
    EXPECT_EQ(texts(recs.at(d / rel)), alone(d / rel)) << rel;
  }
  EXPECT_NE(r.err.find("captioned 4 images (0 failed"), std::string::npos) << r.err;
}

TEST(CaptionDataset, MixedInputsListsAndDuplicatesOnce) {
  TempDir d;
  make_folder(d);
  std::ofstream(d / "list.txt") << "# a comment\n" << d / "set/sub/logo.png" << "\r\n\n" << d / "set/sub" << "\n";
  const auto r = run_cli({"caption", "--model", kT5, "@" + (d / "list.txt"), d / "set/a_rocket.jpg",
                          d / "set/sub/logo.png", "--output", d / "out.jsonl"});
  ASSERT_EQ(r.status, 0) << r.err;
  const auto recs = records(slurp(d / "out.jsonl"));
  EXPECT_EQ(recs.size(), 3u);
  for (const auto& rel : {"set/sub/logo.png", "set/sub/deeper/camera.PNG", "set/a_rocket.jpg"})
    EXPECT_TRUE(recs.count(d / rel)) << rel;
}

TEST(CaptionDataset, TxtBesideEachImageResumeAndOverwrite) {
  TempDir d;
  make_folder(d);
  const auto r = run_cli({"caption", "--model", kT5, d / "set", "--format", "txt", "--batch", "2"});
  ASSERT_EQ(r.status, 0) << r.err;
  for (const auto& rel : kFolderImages) {
    const std::string txt = fs::path(d / rel).replace_extension(".txt").string();
    ASSERT_TRUE(fs::exists(txt)) << txt;
    EXPECT_EQ(lines_of(slurp(txt)), alone(d / rel)) << rel;
  }
  // Nothing left behind but the caption files (no temporary files).
  int files = 0;
  for (const auto& e : fs::recursive_directory_iterator(d / "set")) files += e.is_regular_file();
  EXPECT_EQ(files, 7 + 4);  // 4 images, 2 hidden ones, notes.md; 4 captions
  // A re-run skips them all; a new image is the only one captioned.
  copy_image("one_pixel.png", d / "set/new.png");
  std::ofstream(d / "set/sub/logo.txt") << "kept\n";
  const auto again = run_cli({"caption", "--model", kT5, d / "set", "--format", "txt"});
  ASSERT_EQ(again.status, 0) << again.err;
  EXPECT_NE(again.err.find("4 already recorded, 1 to caption"), std::string::npos) << again.err;
  EXPECT_EQ(slurp(d / "set/sub/logo.txt"), "kept\n");
  EXPECT_EQ(lines_of(slurp(d / "set/new.txt")), alone(d / "set/new.png"));
  // --overwrite redoes them; --caption-extension names the files.
  const auto over = run_cli({"caption", "--model", kT5, d / "set", "--format", "txt", "--overwrite"});
  ASSERT_EQ(over.status, 0) << over.err;
  EXPECT_EQ(lines_of(slurp(d / "set/sub/logo.txt")), alone(d / "set/sub/logo.png"));
  const auto ext = run_cli({"caption", "--model", kT5, d / "set/a_rocket.jpg", "--format", "txt",
                            "--caption-extension", ".caption"});
  ASSERT_EQ(ext.status, 0) << ext.err;
  EXPECT_EQ(lines_of(slurp(d / "set/a_rocket.caption")), alone(d / "set/a_rocket.jpg"));
}

TEST(CaptionDataset, TxtRefusesTwoImagesWithOneCaptionFile) {
  TempDir d;
  copy_image("chelsea.png", d / "x/cat.png");
  copy_image("rocket.jpg", d / "x/cat.jpg");
  const auto r = run_cli({"caption", "--model", kT5, d / "x", "--format", "txt"});
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("cat.txt"), std::string::npos) << r.err;
}

TEST(CaptionDataset, CsvWithSeveralCaptionsPerImage) {
  TempDir d;
  make_folder(d);
  const std::vector<std::string> beams = {"--num-beams", "3", "--num-return-sequences", "2", "--max-new-tokens", "8"};
  std::vector<std::string> args = {"caption", "--model", kT5, d / "set", "--format", "csv", "--output", d / "o.csv"};
  args.insert(args.end(), beams.begin(), beams.end());
  const auto r = run_cli(args);
  ASSERT_EQ(r.status, 0) << r.err;
  const std::string text = slurp(d / "o.csv");
  const auto rows = lines_of(text);
  ASSERT_FALSE(rows.empty());
  EXPECT_EQ(rows[0], "image,caption,score,error");
  std::map<std::string, std::vector<std::string>> got;
  for (size_t i = 1; i < rows.size(); ++i) {
    if (rows[i].empty()) continue;
    // The fixtures' captions hold no comma or quote: image,caption,score,
    const auto a = rows[i].find(','), b = rows[i].rfind(',', rows[i].size() - 2);
    got[rows[i].substr(0, a)].push_back(rows[i].substr(a + 1, b - a - 1));
  }
  ASSERT_EQ(got.size(), kFolderImages.size());
  for (const auto& rel : kFolderImages) EXPECT_EQ(got[d / rel], alone(d / rel, beams)) << rel;
}

TEST(CaptionDataset, FaultsAreRecordedAndTheRunGoesOn) {
  TempDir d;
  copy_image("chelsea.png", d / "ok.png");
  copy_image("truncated.jpg", d / "truncated.jpg");
  std::ofstream(d / "text.png") << "not a png at all";
  const auto r = run_cli({"caption", "--model", kT5, d / "ok.png", d / "truncated.jpg", d / "text.png",
                          d / "missing.png", "--output", d / "o.jsonl"});
  EXPECT_EQ(r.status, 4) << r.err;
  const auto recs = records(slurp(d / "o.jsonl"));
  ASSERT_EQ(recs.size(), 4u);
  EXPECT_EQ(texts(recs.at(d / "ok.png")), alone(d / "ok.png"));
  for (const char* bad : {"truncated.jpg", "text.png", "missing.png"}) {
    const json& rec = recs.at(d / bad);
    ASSERT_TRUE(rec.contains("error")) << rec;
    EXPECT_FALSE(rec.contains("captions"));
    EXPECT_NE(r.err.find(std::string("failed: ") + (d / bad)), std::string::npos) << r.err;
  }
  EXPECT_NE(recs.at(d / "truncated.jpg")["error"].get<std::string>().find("truncated"), std::string::npos);
  EXPECT_NE(r.err.find("captioned 1 images (3 failed"), std::string::npos) << r.err;
}

TEST(CaptionDataset, ResumeSkipsRecordedAndCutsATornTail) {
  TempDir d;
  make_folder(d);
  const std::string out = d / "o.jsonl";
  ASSERT_EQ(run_cli({"caption", "--model", kT5, d / "set/a_rocket.jpg", d / "set/b_chelsea.png", "--output", out}).status, 0);
  // A torn record at the end (a write cut short): cut off, and that image captioned.
  { std::ofstream(out, std::ios::app) << "{\"image\":\"" << (d / "set/sub/logo.png") << "\",\"capt"; }
  const auto r = run_cli({"caption", "--model", kT5, d / "set", "--output", out, "--json"});
  ASSERT_EQ(r.status, 0) << r.err;
  const json summary = json::parse(r.out);
  EXPECT_EQ(summary["images"], 2);
  EXPECT_EQ(summary["skipped"], 2);
  EXPECT_EQ(summary["failed"], 0);
  EXPECT_GT(summary["captions_per_second"].get<double>(), 0);
  EXPECT_TRUE(summary["stages_seconds"].contains("vision"));
  const auto recs = records(slurp(out));
  ASSERT_EQ(recs.size(), 4u);
  for (const auto& rel : kFolderImages) EXPECT_EQ(texts(recs.at(d / rel)), alone(d / rel)) << rel;
  // --overwrite starts the file again.
  ASSERT_EQ(run_cli({"caption", "--model", kT5, d / "set/a_rocket.jpg", "--output", out, "--overwrite"}).status, 0);
  EXPECT_EQ(records(slurp(out)).size(), 1u);
}

TEST(CaptionDataset, SamplingSeedsArePerImageAndReproducible) {
  TempDir d;
  make_folder(d);
  const std::vector<std::string> sample = {"--do-sample", "--top-k", "0", "--seed", "7"};
  std::vector<std::string> args = {"caption", "--model", kT5, d / "set", "--batch", "4"};
  args.insert(args.end(), sample.begin(), sample.end());
  const auto r = run_cli(args);
  ASSERT_EQ(r.status, 0) << r.err;
  const auto recs = records(r.out);
  std::set<uint64_t> seeds;
  for (const auto& rel : kFolderImages) {
    const json& rec = recs.at(d / rel);
    const uint64_t seed = rec["seed"].get<uint64_t>();
    seeds.insert(seed);
    EXPECT_EQ(texts(rec), alone(d / rel, {"--do-sample", "--top-k", "0", "--seed", std::to_string(seed)})) << rel;
  }
  EXPECT_EQ(seeds.size(), kFolderImages.size());
  // Another batch size and one image at a time give the same captions.
  args[5] = "1";
  const auto again = records(run_cli(args).out);
  for (const auto& rel : kFolderImages) EXPECT_EQ(texts(again.at(d / rel)), texts(recs.at(d / rel)));
}

TEST(CaptionDataset, OptFolderEqualsEachImageAlone) {
  TempDir d;
  make_folder(d);
  const auto r = run_cli({"caption", "--model", kOpt, d / "set", "--batch", "2", "--prompt", "a photo of"});
  ASSERT_EQ(r.status, 0) << r.err;
  const auto recs = records(r.out);
  ASSERT_EQ(recs.size(), kFolderImages.size());
  for (const auto& rel : kFolderImages)
    EXPECT_EQ(texts(recs.at(d / rel)), alone(d / rel, {"--prompt", "a photo of"}, kOpt)) << rel;
}

// The union of N shards is the one-process run: every image once, the same captions.
TEST(CaptionDataset, ShardsPartitionTheInputs) {
  TempDir d;
  for (int i = 0; i < 12; ++i)
    copy_image(i % 2 ? "logo.png" : "one_pixel.png", d / ("many/img" + std::to_string(i) + ".png"));
  const auto whole = run_cli({"caption", "--model", kT5, d / "many", "--max-new-tokens", "6"});
  ASSERT_EQ(whole.status, 0) << whole.err;
  const auto all = records(whole.out);
  ASSERT_EQ(all.size(), 12u);
  std::map<std::string, json> uni;
  for (int k = 0; k < 3; ++k) {
    const auto r = run_cli({"caption", "--model", kT5, d / "many", "--max-new-tokens", "6", "--shard",
                            std::to_string(k) + "/3"});
    ASSERT_EQ(r.status, 0) << r.err;
    const auto part = records(r.out);
    // The same share every time.
    EXPECT_EQ(records(run_cli({"caption", "--model", kT5, d / "many", "--max-new-tokens", "6", "--shard",
                                std::to_string(k) + "/3"}).out).size(), part.size());
    for (const auto& [key, rec] : part) EXPECT_TRUE(uni.emplace(key, rec).second) << key << " in two shards";
  }
  ASSERT_EQ(uni.size(), all.size());
  for (const auto& [key, rec] : all) EXPECT_EQ(texts(uni.at(key)), texts(rec)) << key;
}

TEST(CaptionDataset, UsageErrors) {
  TempDir d;
  copy_image("chelsea.png", d / "a.png");
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--shard", "3/3"}, "--shard"},
      {{"--shard", "x"}, "--shard"},
      {{"--format", "txt", "--output", d / "o.jsonl"}, "--output"},
      {{"--batch", "2", "--json"}, "--json"},
      {{"--format", "txt", "--caption-extension", "txt"}, "--caption-extension"},
      {{"--batch", "0"}, "--batch"},
  };
  for (const auto& [extra, word] : cases) {
    std::vector<std::string> args = {"caption", "--model", kT5, d / "a.png"};
    args.insert(args.end(), extra.begin(), extra.end());
    const auto r = run_cli(args);
    EXPECT_EQ(r.status, 2) << ::testing::PrintToString(extra) << r.err;
    EXPECT_NE(r.err.find(word), std::string::npos) << r.err;
  }
  const auto list = run_cli({"caption", "--model", kT5, "@" + (d / "no-such-list")});
  EXPECT_EQ(list.status, 4);
  EXPECT_NE(list.err.find("no-such-list"), std::string::npos) << list.err;
}

// SIGKILL in the middle of a run, then the same command again: every image recorded exactly once, every
// record whole, the captions those of a run that was never interrupted.
TEST(CaptionDataset, KillAndResumeLosesAndDuplicatesNothing) {
  TempDir d;
  const int n = 120;
  for (int i = 0; i < n; ++i)
    copy_image(i % 3 ? "palette_color.png" : "logo.png", d / ("many/img" + std::to_string(1000 + i) + ".png"));
  const std::string out = d / "o.jsonl";
  std::vector<std::string> args = {BLIP2_CLI_PATH, "caption", "--model", kT5, d / "many", "--output", out, "--batch", "2"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
  pid_t pid = 0;
  ASSERT_EQ(posix_spawn(&pid, BLIP2_CLI_PATH, &fa, nullptr, argv.data(), environ), 0);
  posix_spawn_file_actions_destroy(&fa);
  // Kill it once some records are there and before all are. (Whole lines are counted: a reader may see a
  // record being written, and a kill may tear the last one, which the resumed run cuts off.)
  const auto whole_lines = [&] {
    const std::string text = slurp(out);
    return static_cast<size_t>(std::count(text.begin(), text.end(), '\n'));
  };
  size_t seen = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    seen = whole_lines();
    if (seen >= 5) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  kill(pid, SIGKILL);
  int st = 0;
  waitpid(pid, &st, 0);
  ASSERT_TRUE(WIFSIGNALED(st)) << "the run ended before it was killed (" << seen << " records)";
  const size_t before = whole_lines();
  EXPECT_LT(before, static_cast<size_t>(n)) << "killed too late to test anything";

  const auto resumed = run_cli({"caption", "--model", kT5, d / "many", "--output", out, "--batch", "2"});
  ASSERT_EQ(resumed.status, 0) << resumed.err;
  EXPECT_NE(resumed.err.find(std::to_string(before) + " already recorded"), std::string::npos) << resumed.err;
  const auto recs = records(slurp(out));  // fails on a duplicate; every line parses
  ASSERT_EQ(recs.size(), static_cast<size_t>(n));
  const auto logo = alone(d / "many/img1000.png"), palette = alone(d / "many/img1001.png");
  for (int i = 0; i < n; ++i)
    EXPECT_EQ(texts(recs.at(d / ("many/img" + std::to_string(1000 + i) + ".png"))), i % 3 ? palette : logo) << i;
}

// Not a terminal: plain progress lines at the interval (done/total, captions/s, ETA), then the summary.
TEST(CaptionDataset, ProgressLinesWhenNotATerminal) {
  TempDir d;
  for (int i = 0; i < 6; ++i) copy_image("palette_color.png", d / ("p/" + std::to_string(i) + ".png"));
  const auto r = run_cli({"caption", "--model", kT5, d / "p", "--batch", "1", "--progress-interval", "0.000001"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.err.find('\r'), std::string::npos) << "no terminal line rewriting";
  int lines = 0;
  for (const auto& l : lines_of(r.err)) {
    if (l.rfind("progress: ", 0) != 0) continue;
    ++lines;
    EXPECT_NE(l.find("/6 images, "), std::string::npos) << l;
    EXPECT_NE(l.find(" captions/s, ETA "), std::string::npos) << l;
  }
  EXPECT_EQ(lines, 5) << r.err;  // after each image but the last, which the summary reports
  EXPECT_NE(r.err.find("captioned 6 images (0 failed, 0 skipped as already recorded) in "), std::string::npos) << r.err;
}

// A WebDataset shard as img2dataset writes it (tests/fixtures/webdataset/00000.tar: KEY.png/.jpg beside
// KEY.json and KEY.txt, a sample under a 120-character directory (a pax header), a corrupt JPEG, a sample
// without an image): captions in 00000.jsonl beside it, keyed by sample, equal to each image alone.
TEST(CaptionDataset, WebDatasetShard) {
  TempDir d;
  fs::create_directories(d / "shards");
  fs::copy_file(std::string(BLIP2_FIXTURES_DIR) + "/webdataset/00000.tar", d / "shards/00000.tar");
  const auto r = run_cli({"caption", "--model", kT5, d / "shards"});
  EXPECT_EQ(r.status, 4) << r.err;  // the corrupt JPEG
  const auto recs = records(slurp(d / "shards/00000.jsonl"));
  ASSERT_EQ(recs.size(), 4u) << slurp(d / "shards/00000.jsonl");
  EXPECT_EQ(texts(recs.at("000000000")), alone(kImages + "palette_color.png"));
  EXPECT_EQ(texts(recs.at("000000001")), alone(kImages + "one_pixel.png"));
  EXPECT_EQ(texts(recs.at(std::string(120, 'd') + "/000000003")), alone(kImages + "palette_color.png"));
  EXPECT_NE(recs.at("000000002")["error"].get<std::string>().find("00000.tar:000000002.jpg"), std::string::npos);
  // Resumed: nothing to do. csv: its own file. txt: refused. --shard takes or leaves the whole .tar.
  const auto again = run_cli({"caption", "--model", kT5, d / "shards/00000.tar"});
  EXPECT_NE(again.err.find("4 already recorded, 0 to caption"), std::string::npos) << again.err;
  ASSERT_EQ(run_cli({"caption", "--model", kT5, d / "shards/00000.tar", "--format", "csv"}).status, 4);
  EXPECT_EQ(lines_of(slurp(d / "shards/00000.csv")).size(), 1u + 4u);
  const auto txt = run_cli({"caption", "--model", kT5, d / "shards/00000.tar", "--format", "txt"});
  EXPECT_EQ(txt.status, 2);
  EXPECT_NE(txt.err.find("jsonl or csv"), std::string::npos) << txt.err;
  size_t taken = 0;
  for (int k = 0; k < 2; ++k) {
    const auto s = run_cli({"caption", "--model", kT5, d / "shards/00000.tar", "--overwrite", "--max-new-tokens", "2",
                            "--shard", std::to_string(k) + "/2", "--json"});
    taken += json::parse(s.out)["images"].get<size_t>() + json::parse(s.out)["failed"].get<size_t>();
    EXPECT_TRUE(json::parse(s.out)["other_shards"] == 0 || json::parse(s.out)["other_shards"] == 4) << s.out;
  }
  EXPECT_EQ(taken, 4u);
  // A shard cut in the middle of a member: the samples before it are captioned, that one fails.
  const std::string whole = slurp(d / "shards/00000.tar");
  const size_t cut = whole.find("\x89PNG", whole.find("000000001.png")) + 30;
  std::ofstream(d / "cut.tar", std::ios::binary) << whole.substr(0, cut);
  const auto c = run_cli({"caption", "--model", kT5, d / "cut.tar"});
  EXPECT_EQ(c.status, 4) << c.err;
  const auto cut_recs = records(slurp(d / "cut.jsonl"));
  ASSERT_EQ(cut_recs.size(), 2u);
  EXPECT_EQ(texts(cut_recs.at("000000000")), alone(kImages + "palette_color.png"));
  EXPECT_NE(cut_recs.at("000000001")["error"].get<std::string>().find("cut short"), std::string::npos);
}

// A .webp in a folder is captioned as its pixels decoded by Pillow (the fixture's .webp.png) are.
TEST(CaptionDataset, WebPImagesInAFolder) {
  TempDir d;
  const std::string webp = std::string(BLIP2_FIXTURES_DIR) + "/webp/";
  fs::create_directories(d / "w");
  fs::copy_file(webp + "chelsea_lossy.webp", d / "w/cat.webp");
  fs::copy_file(webp + "noise_lossy_alpha.webp", d / "w/noise.WEBP");
  const auto r = run_cli({"caption", "--model", kT5, d / "w"});
  ASSERT_EQ(r.status, 0) << r.err;
  const auto recs = records(r.out);
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(texts(recs.at(d / "w/cat.webp")), alone(webp + "chelsea_lossy.webp.png"));
  EXPECT_EQ(texts(recs.at(d / "w/noise.WEBP")), alone(webp + "noise_lossy_alpha.webp.png"));
}

// On a terminal: one progress line rewritten in place (carriage return, erase line), then the summary.
TEST(CaptionDataset, ProgressLineOnATerminal) {
  TempDir d;
  for (int i = 0; i < 4; ++i) copy_image("palette_color.png", d / ("t/" + std::to_string(i) + ".png"));
  const int master = posix_openpt(O_RDWR | O_NOCTTY);
  ASSERT_GE(master, 0);
  ASSERT_EQ(grantpt(master), 0);
  ASSERT_EQ(unlockpt(master), 0);
  const std::string slave = ptsname(master);
  std::vector<std::string> args = {BLIP2_CLI_PATH, "caption", "--model", kT5, d / "t", "--batch", "1",
                                    "--output", d / "o.jsonl"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 2, slave.c_str(), O_RDWR, 0);
  pid_t pid = 0;
  ASSERT_EQ(posix_spawn(&pid, BLIP2_CLI_PATH, &fa, nullptr, argv.data(), environ), 0);
  posix_spawn_file_actions_destroy(&fa);
  int st = 0;
  waitpid(pid, &st, 0);
  ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  std::string err;
  char buf[4096];
  fcntl(master, F_SETFL, O_NONBLOCK);
  for (ssize_t n; (n = read(master, buf, sizeof buf)) > 0;) err.append(buf, static_cast<size_t>(n));
  close(master);
  EXPECT_NE(err.find("\r\033[K4/4 images, "), std::string::npos) << err;
  EXPECT_NE(err.find(" captions/s, ETA "), std::string::npos) << err;
  EXPECT_EQ(err.find("progress: "), std::string::npos) << "plain lines are for pipes and files";
  EXPECT_NE(err.find("captioned 4 images (0 failed"), std::string::npos) << err;
}
