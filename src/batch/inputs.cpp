#include "batch/inputs.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <system_error>
#include <unordered_set>

#include "core/error.h"

namespace blip2::batch {

namespace fs = std::filesystem;

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

bool is_image_ext(const std::string& ext) {  // with its dot
  const std::string e = lower(ext);
  return e == ".png" || e == ".jpg" || e == ".jpeg" || e == ".webp";
}

bool is_image_name(const fs::path& p) { return is_image_ext(p.extension().string()); }

// A tar header's numeric field: octal text, or base-256 (GNU) when the first byte's high bit is set.
uint64_t tar_number(const unsigned char* f, size_t n) {
  uint64_t v = 0;
  if (f[0] & 0x80) {
    for (size_t i = 1; i < n; ++i) v = (v << 8) | f[i];
    return v;
  }
  for (size_t i = 0; i < n && f[i]; ++i)
    if (f[i] >= '0' && f[i] <= '7') v = v * 8 + (f[i] - '0');
  return v;
}

bool tar_checksum_ok(const unsigned char* h) {
  uint64_t sum = 0;
  for (int i = 0; i < 512; ++i) sum += (i >= 148 && i < 156) ? ' ' : h[i];
  return sum == tar_number(h + 148, 8);
}

std::string c_string(const unsigned char* f, size_t n) {
  size_t len = 0;
  while (len < n && f[len]) ++len;
  return std::string(reinterpret_cast<const char*>(f), len);
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
    if (it->is_regular_file(ec) && (is_image_name(p) || is_shard_name(p.string()))) found.push_back(p.string());
  }
  if (ec) fail(ErrorKind::Input, "cannot read directory " + dir + ": " + ec.message());
  std::sort(found.begin(), found.end());
  return found;
}

void add_path(const std::string& arg, std::vector<InputItem>& out, std::unordered_set<std::string>& seen) {
  const auto add = [&](const std::string& path) {
    std::error_code ec;
    if (is_shard_name(path) && fs::is_regular_file(path, ec)) {
      for (auto& item : list_shard(path))
        if (seen.insert(item.name()).second) out.push_back(std::move(item));
    } else if (seen.insert(path).second) {
      InputItem item;
      item.key = item.path = path;
      out.push_back(std::move(item));
    }
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

bool is_shard_name(const std::string& path) { return lower(fs::path(path).extension().string()) == ".tar"; }

std::vector<InputItem> list_shard(const std::string& tar) {
  std::ifstream in(tar, std::ios::binary);
  if (!in) fail(ErrorKind::Input, "cannot open the shard " + tar);
  std::vector<InputItem> items;
  std::unordered_set<std::string> keys;
  std::string long_name;  // from a GNU 'L' member or a pax 'path' record, for the member that follows
  uint64_t pos = 0;
  unsigned char h[512];
  for (;;) {
    in.seekg(static_cast<std::streamoff>(pos));
    if (!in.read(reinterpret_cast<char*>(h), 512)) break;  // no end blocks: a cut tar ends here
    if (std::all_of(h, h + 512, [](unsigned char c) { return c == 0; })) break;
    if (!tar_checksum_ok(h))
      fail(ErrorKind::Input, tar + (pos == 0 ? ": not a tar file" : ": corrupt tar header at byte " + std::to_string(pos)));
    const uint64_t size = tar_number(h + 124, 12), data = pos + 512;
    const char type = static_cast<char>(h[156]);
    pos = data + (size + 511) / 512 * 512;
    if (type == 'L' || type == 'x') {
      std::string body(size, '\0');
      in.seekg(static_cast<std::streamoff>(data));
      if (!in.read(body.data(), static_cast<std::streamsize>(size))) break;
      if (type == 'L') {
        long_name = body.c_str();
      } else {  // pax records: "LEN key=value\n"
        for (size_t at = 0; at < body.size();) {
          const size_t sp = body.find(' ', at);
          const size_t len = sp == std::string::npos ? 0 : std::strtoull(body.c_str() + at, nullptr, 10);
          if (len == 0 || at + len > body.size()) break;
          const std::string rec = body.substr(sp + 1, at + len - sp - 2);
          if (rec.rfind("path=", 0) == 0) long_name = rec.substr(5);
          at += len;
        }
      }
      continue;
    }
    std::string name = long_name;
    long_name.clear();
    if (name.empty()) {
      name = c_string(h, 100);
      const std::string prefix = std::memcmp(h + 257, "ustar", 5) == 0 ? c_string(h + 345, 155) : "";
      if (!prefix.empty()) name = prefix + "/" + name;
    }
    if (type != '0' && type != '\0' && type != '7') continue;  // directories, links, ...
    // WebDataset: the key is the path up to the first dot of the file's name; the rest is the field.
    const size_t slash = name.rfind('/');
    const size_t dot = name.find('.', slash == std::string::npos ? 0 : slash + 1);
    if (dot == std::string::npos || !is_image_ext(name.substr(name.rfind('.')))) continue;
    const std::string key = name.substr(0, dot);
    if (!keys.insert(key).second) continue;  // the sample's first image
    InputItem item;
    item.key = key;
    item.path = item.tar = tar;
    item.member = name;
    item.offset = data;
    item.size = size;
    items.push_back(std::move(item));
  }
  return items;
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
