// Shared by the fuzz targets. The parsers under test read files by path (they mmap or cap their reads), so an
// input is handed to them as a file: a memfd whose /proc/self/fd path they open, rewritten for every input,
// so that fuzzing does no disk I/O. A library error (blip2::Error, server::ApiError) is the expected outcome
// of a bad input; anything else escaping (std::out_of_range, a JSON type error...) aborts: the parser's
// contract is a clear error naming the input, and libFuzzer records the input that broke it.
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>

#include "core/error.h"

namespace blip2::fuzz {

class MemFile {
 public:
  MemFile() : fd_(memfd_create("blip2-fuzz", MFD_CLOEXEC)) {
    if (fd_ < 0) std::abort();
  }
  ~MemFile() { ::close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  void set(const void* data, size_t size) {
    if (ftruncate(fd_, 0) != 0) std::abort();
    const char* p = static_cast<const char*>(data);
    for (size_t done = 0; done < size;) {
      const ssize_t n = pwrite(fd_, p + done, size - done, static_cast<off_t>(done));
      if (n <= 0) std::abort();
      done += static_cast<size_t>(n);
    }
  }
  void set(std::string_view s) { set(s.data(), s.size()); }
  std::string path() const { return "/proc/self/fd/" + std::to_string(fd_); }

 private:
  int fd_;
};

// A private directory (under $TMPDIR) whose entries are symbolic links to memfds or small real files:
// for the loaders that take a model directory. Removed at exit.
class ScratchDir {
 public:
  ScratchDir() {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/blip2-fuzz-XXXXXX";
    if (!mkdtemp(templ.data())) std::abort();
    path_ = templ;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  void link(const std::string& name, const MemFile& f) const {
    std::filesystem::create_symlink(f.path(), std::filesystem::path(path_) / name);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A ScratchDir whose entry `name` is the input: for the targets fuzzing one file of a model directory.
struct DirWithInput {
  ScratchDir dir;
  MemFile input;
  explicit DirWithInput(const std::string& name) { dir.link(name, input); }
};

// Runs `f`, treating the library's own errors as the normal answer to a bad input.
template <class F>
void expect_clean(F&& f) {
  try {
    f();
  } catch (const blip2::Error&) {
  }
}

}  // namespace blip2::fuzz
