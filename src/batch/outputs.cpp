#include "batch/outputs.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "core/error.h"

namespace blip2::batch {

namespace fs = std::filesystem;

namespace {

std::string errno_text() { return std::strerror(errno); }

// Writes all of `s` (write(2) may write less, e.g. to a pipe).
void write_all(int fd, const std::string& s, const std::string& name) {
  size_t done = 0;
  while (done < s.size()) {
    const ssize_t n = ::write(fd, s.data() + done, s.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail(ErrorKind::Internal, "cannot write " + name + ": " + errno_text());
    done += static_cast<size_t>(n);
  }
}

std::string read_fd(int fd, const std::string& name) {
  std::string text;
  char buf[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail(ErrorKind::Input, "cannot read " + name + ": " + errno_text());
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  return text;
}

std::string score_text(float score) { return nlohmann::json(score).dump(); }

}  // namespace

Format parse_format(const std::string& name) {
  if (name == "txt") return Format::Txt;
  if (name == "jsonl") return Format::Jsonl;
  if (name == "csv") return Format::Csv;
  fail(ErrorKind::Usage, "--format '" + name + "': expected txt, jsonl or csv");
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\r\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

std::vector<std::vector<std::string>> parse_csv(const std::string& text) {
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> row;
  std::string field;
  bool quoted = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (quoted) {
      if (c != '"') field += c;
      else if (i + 1 < text.size() && text[i + 1] == '"') field += '"', ++i;
      else quoted = false;
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      row.push_back(std::move(field));
      field.clear();
    } else if (c == '\n') {
      if (!field.empty() && field.back() == '\r') field.pop_back();
      row.push_back(std::move(field));
      field.clear();
      rows.push_back(std::move(row));
      row.clear();
    } else {
      field += c;
    }
  }
  return rows;  // a record without its final line break is torn: left out
}

CaptionSink::CaptionSink(Format format, const std::string& output, const std::string& extension, bool overwrite)
    : format_(format), extension_(extension), output_(output), overwrite_(overwrite) {
  if (format_ == Format::Txt) {
    if (!output.empty())
      fail(ErrorKind::Usage, "--output is for --format jsonl or csv; txt writes a caption file beside each image");
    if (extension_.size() < 2 || extension_[0] != '.' || extension_.find('/') != std::string::npos)
      fail(ErrorKind::Usage, "--caption-extension '" + extension_ + "': expected a file extension such as .txt");
    return;
  }
  if (output.empty() || output == "-") {
    fd_ = 1;
    output_ = "standard output";
    if (format_ == Format::Csv) write_all(fd_, "image,caption,score,error\n", output_);
    return;
  }
  fd_ = ::open(output.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC | (overwrite ? O_TRUNC : 0), 0644);
  if (fd_ < 0) fail(ErrorKind::Input, "cannot open --output " + output + ": " + errno_text());
  if (flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd_);
    fd_ = -1;
    fail(ErrorKind::Input, "--output " + output + " is being written by another process (locked)");
  }
  load_existing(output);
}

CaptionSink::~CaptionSink() {
  if (fd_ > 2) ::close(fd_);
}

// Reads what earlier runs recorded; cuts a torn last record off, so that appending starts on a new line.
void CaptionSink::load_existing(const std::string& path) {
  const std::string text = read_fd(fd_, path);
  const size_t whole = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
  if (whole < text.size() && ftruncate(fd_, static_cast<off_t>(whole)) != 0)
    fail(ErrorKind::Input, "cannot cut the torn last record off " + path + ": " + errno_text());
  const std::string body = text.substr(0, whole);
  if (format_ == Format::Jsonl) {
    size_t begin = 0, number = 0;
    while (begin < body.size()) {
      const size_t end = body.find('\n', begin);
      const std::string line = body.substr(begin, end - begin);
      begin = end + 1;
      ++number;
      if (line.empty()) continue;
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object() || !j.contains("image") || !j["image"].is_string())
        fail(ErrorKind::Input, path + ":" + std::to_string(number) +
                                   ": not a record of blip2 caption (a JSON object with \"image\"); use another --output");
      recorded_.insert(j["image"].get<std::string>());
    }
  } else {
    const auto rows = parse_csv(body);
    for (size_t i = 0; i < rows.size(); ++i) {
      if (i == 0) {
        if (rows[0].empty() || rows[0][0] != "image")
          fail(ErrorKind::Input, path + " does not start with blip2 caption's CSV header; use another --output");
        continue;
      }
      if (!rows[i].empty() && !rows[i][0].empty()) recorded_.insert(rows[i][0]);
    }
    if (rows.empty()) write_all(fd_, "image,caption,score,error\n", path);
  }
}

std::string CaptionSink::caption_path(const std::string& image_path) const {
  return fs::path(image_path).replace_extension(extension_).string();
}

void CaptionSink::check_distinct(const std::vector<InputItem>& items) const {
  if (format_ != Format::Txt) return;
  std::unordered_map<std::string, std::string> owner;
  for (const auto& it : items) {
    const auto [pos, fresh] = owner.emplace(caption_path(it.path), it.path);
    if (!fresh)
      fail(ErrorKind::Usage, it.path + " and " + pos->second + " would both be captioned in " + pos->first +
                                 ": rename one, or use --format jsonl or csv");
    if (pos->first == it.path)
      fail(ErrorKind::Usage, "--caption-extension " + extension_ + " would overwrite the image " + it.path);
  }
}

bool CaptionSink::done(const InputItem& item) const {
  if (overwrite_) return false;
  if (format_ == Format::Txt) {
    std::error_code ec;
    return fs::exists(caption_path(item.path), ec);
  }
  return recorded_.count(item.key) > 0;
}

void CaptionSink::write(const InputItem& item, const Record& r) {
  if (format_ == Format::Txt) {
    if (r.failed()) return;
    std::string text;
    for (const auto& c : r.captions) text += c.text + "\n";
    // Temporary file in the same directory (rename is atomic only within a file system), hidden, so a scan
    // of the folder never takes it for an image.
    const fs::path dest = caption_path(item.path);
    const fs::path tmp = dest.parent_path() / ("." + dest.filename().string() + ".tmp" + std::to_string(::getpid()));
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) fail(ErrorKind::Input, "cannot write " + tmp.string() + ": " + errno_text());
    try {
      write_all(fd, text, tmp.string());
    } catch (...) {
      ::close(fd);
      ::unlink(tmp.c_str());
      throw;
    }
    ::close(fd);
    if (::rename(tmp.c_str(), dest.c_str()) != 0) {
      const std::string why = errno_text();
      ::unlink(tmp.c_str());
      fail(ErrorKind::Input, "cannot rename " + tmp.string() + " to " + dest.string() + ": " + why);
    }
    return;
  }
  std::string line;
  if (format_ == Format::Jsonl) {
    nlohmann::ordered_json j;
    j["image"] = r.key;
    if (r.failed()) {
      j["error"] = r.error;
    } else {
      j["captions"] = nlohmann::ordered_json::array();
      for (const auto& c : r.captions) j["captions"].push_back({{"text", c.text}, {"score", c.score}});
      if (r.seed) j["seed"] = *r.seed;
    }
    line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  } else if (r.failed()) {
    line = csv_field(r.key) + ",,," + csv_field(r.error) + "\n";
  } else {
    for (const auto& c : r.captions) line += csv_field(r.key) + "," + csv_field(c.text) + "," + score_text(c.score) + ",\n";
  }
  write_all(fd_, line, output_);  // one write: the record is there whole or not at all
}

}  // namespace blip2::batch
