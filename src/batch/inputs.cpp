#include "batch/inputs.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <system_error>
#include <unordered_set>

#include "core/error.h"

namespace blip2::batch {

namespace fs = std::filesystem;

namespace {

bool is_image_name(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg" || ext == ".webp";
}

bool hidden(const fs::path& p) {
  const std::string name = p.filename().string();
  return !name.empty() && name[0] == '.';
}

// Every image file below `dir`, sorted by path (the byte order of the relative path).
std::vector<std::string> scan_directory(const std::string& dir) {
  std::vector<std::string> found;
  std::error_code ec;
  fs::recursive_directory_iterator it(dir, fs::directory_options::none, ec), end;
  if (ec) fail(ErrorKind::Input, "cannot read directory " + dir + ": " + ec.message());
  for (; it != end; it.increment(ec)) {
    if (ec) fail(ErrorKind::Input, "cannot read directory " + dir + ": " + ec.message());
    const fs::path& p = it->path();
    if (hidden(p)) {
      if (it->is_directory(ec)) it.disable_recursion_pending();
      continue;
    }
    if (it->is_regular_file(ec) && is_image_name(p)) found.push_back(p.string());
  }
  if (ec) fail(ErrorKind::Input, "cannot read directory " + dir + ": " + ec.message());
  std::sort(found.begin(), found.end());
  return found;
}

void add_path(const std::string& arg, std::vector<InputItem>& out, std::unordered_set<std::string>& seen) {
  const auto add = [&](const std::string& path) {
    if (seen.insert(path).second) out.push_back({path, path});
  };
  std::error_code ec;
  if (fs::is_directory(arg, ec)) {
    for (const auto& p : scan_directory(arg)) add(p);
  } else {
    add(arg);
  }
}

}  // namespace

std::vector<InputItem> expand_inputs(const std::vector<std::string>& args) {
  std::vector<InputItem> out;
  std::unordered_set<std::string> seen;
  for (const auto& arg : args) {
    if (arg.empty()) fail(ErrorKind::Usage, "an input is empty (expected an image, a directory or @LIST)");
    if (arg[0] != '@') {
      add_path(arg, out, seen);
      continue;
    }
    const std::string list = arg.substr(1);
    std::ifstream in(list);
    if (!in) fail(ErrorKind::Input, "cannot read the list " + list + " (from " + arg + ")");
    std::string line;
    int number = 0;
    while (std::getline(in, line)) {
      ++number;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || line[0] == '#') continue;
      if (line[0] == '@')
        fail(ErrorKind::Input, list + ":" + std::to_string(number) + ": a list cannot name another list (" + line + ")");
      add_path(line, out, seen);
    }
    if (in.bad()) fail(ErrorKind::Input, "error reading the list " + list);
  }
  return out;
}

uint64_t stable_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

Shard parse_shard(const std::string& text) {
  const size_t slash = text.find('/');
  const auto number = [&](const std::string& s, uint64_t& v) {
    if (s.empty() || s.size() > 9 || s.find_first_not_of("0123456789") != std::string::npos) return false;
    v = std::stoull(s);
    return true;
  };
  Shard sh;
  if (slash == std::string::npos || !number(text.substr(0, slash), sh.index) ||
      !number(text.substr(slash + 1), sh.count) || sh.count == 0 || sh.index >= sh.count)
    fail(ErrorKind::Usage, "--shard '" + text + "': expected K/N with 0 <= K < N (e.g. 0/4 ... 3/4)");
  return sh;
}

uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

bool in_shard(const std::string& key, const Shard& shard) { return mix64(stable_hash(key)) % shard.count == shard.index; }

}  // namespace blip2::batch
