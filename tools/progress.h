// The progress line of the bulk commands (caption over a dataset, embed): on a terminal one line rewritten at
// most 5 times a second, otherwise a plain "progress: ..." line every `interval` seconds.
#pragma once
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>

namespace blip2::tools {

// "1h02m", "3m05s", "42s"; "?" when unknown.
inline std::string duration_text(double s) {
  if (!(s >= 0) || s > 1e8) return "?";
  const long t = static_cast<long>(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, t / 60 % 60);
  else if (t >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

class ProgressPrinter {
 public:
  explicit ProgressPrinter(double interval) : tty_(isatty(STDERR_FILENO)), interval_(interval) {}
  // `line` describes the state; `finished`: the last call (always shown on a terminal).
  void operator()(bool finished, const std::string& line) {
    const auto now = std::chrono::steady_clock::now();
    const double since = std::chrono::duration<double>(now - last_).count();
    if (!finished && since < (tty_ ? 0.2 : interval_)) return;
    last_ = now;
    if (tty_) {
      std::fprintf(stderr, "\r\033[K%s", line.c_str());
      shown_ = true;
    } else if (!finished) {
      std::fprintf(stderr, "progress: %s\n", line.c_str());
    }
    std::fflush(stderr);
  }
  ~ProgressPrinter() {
    if (shown_) std::fprintf(stderr, "\n");
  }
  ProgressPrinter(const ProgressPrinter&) = delete;
  ProgressPrinter& operator=(const ProgressPrinter&) = delete;

 private:
  bool tty_;
  double interval_;
  bool shown_ = false;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

}  // namespace blip2::tools
