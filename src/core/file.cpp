#include "core/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace blip2 {

std::string size_str(size_t bytes) {
  if (bytes >= (size_t(1) << 20) && bytes % (size_t(1) << 20) == 0) return std::to_string(bytes >> 20) + " MiB";
  return std::to_string(bytes) + " bytes";
}

std::string read_file(const std::string& path, size_t max_bytes, ErrorKind kind, const std::string& what) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(kind, path + ": cannot open " + what + ": " + std::strerror(errno));
  // The descriptor is closed on every path out, errors included.
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  const auto too_large = [&]() {
    fail(kind, path + ": " + what + " is larger than " + size_str(max_bytes) + " (not a file of this kind?)");
  };
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(kind, path + ": cannot read " + what + ": " + std::strerror(errno));
  if (S_ISDIR(st.st_mode)) fail(kind, path + ": cannot read " + what + ": it is a directory");
  if (S_ISREG(st.st_mode) && static_cast<uint64_t>(st.st_size) > max_bytes) too_large();
  std::string bytes;
  if (S_ISREG(st.st_mode)) bytes.reserve(static_cast<size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail(kind, path + ": cannot read " + what + ": " + std::strerror(errno));
    if (n == 0) break;
    if (bytes.size() + static_cast<size_t>(n) > max_bytes) too_large();  // a device, a pipe, or a growing file
    bytes.append(buf, static_cast<size_t>(n));
  }
  return bytes;
}

}  // namespace blip2
