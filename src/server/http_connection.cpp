#include "server/http_connection.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>

namespace blip2::server {

namespace {

using Clock = std::chrono::steady_clock;

// Rounded up: a poll() for this long does not end before t.
int ms_until(Clock::time_point t) {
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(t - Clock::now()).count();
  return static_cast<int>(std::clamp<int64_t>(ms, 0, 1 << 30));
}

// poll() for one event, retried on EINTR; true when the socket is ready (or failed: the next call says how).
bool wait_for(int sock, short events, int timeout_ms) {
  pollfd p{sock, events, 0};
  int r;
  while ((r = poll(&p, 1, timeout_ms)) < 0 && errno == EINTR) {
  }
  return r > 0;
}

void endpoint(int sock, bool peer, std::string& ip, int& port) {
  sockaddr_storage a{};
  socklen_t len = sizeof a;
  const int r = peer ? getpeername(sock, reinterpret_cast<sockaddr*>(&a), &len)
                     : getsockname(sock, reinterpret_cast<sockaddr*>(&a), &len);
  char host[NI_MAXHOST], serv[NI_MAXSERV];
  if (r != 0 || getnameinfo(reinterpret_cast<sockaddr*>(&a), len, host, sizeof host, serv, sizeof serv,
                            NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return;
  ip = host;
  port = std::atoi(serv);
}

// A connection's bytes, read ahead into a buffer that lives as long as the connection.
class ConnectionStream final : public httplib::Stream {
 public:
  ConnectionStream(int sock, int read_timeout_ms, int write_timeout_ms)
      : sock_(sock), read_timeout_ms_(read_timeout_ms), write_timeout_ms_(write_timeout_ms) {}

  bool is_readable() const override { return buffered() || wait_for(sock_, POLLIN, read_timeout_ms_); }
  bool is_writable() const override { return wait_for(sock_, POLLOUT, write_timeout_ms_); }

  ssize_t read(char* ptr, size_t size) override {
    if (!buffered()) {
      int timeout = read_timeout_ms_;
      bool deadline_first = false;  // the wait ends at the header deadline rather than at the read timeout
      if (header_deadline_) {
        const int left = ms_until(*header_deadline_);
        deadline_first = left <= timeout;
        timeout = std::min(timeout, left);
      }
      if (timeout == 0 || !wait_for(sock_, POLLIN, timeout)) {
        timed_out_ = deadline_first;
        return -1;
      }
      ssize_t n;
      while ((n = recv(sock_, buf_, sizeof buf_, 0)) < 0 && errno == EINTR) {
      }
      if (n <= 0) return n;
      begin_ = 0;
      end_ = static_cast<size_t>(n);
    }
    const size_t n = std::min(size, end_ - begin_);
    std::memcpy(ptr, buf_ + begin_, n);
    begin_ += n;
    return static_cast<ssize_t>(n);
  }

  ssize_t write(const char* ptr, size_t size) override {
    if (!is_writable()) return -1;
    ssize_t n;
    while ((n = send(sock_, ptr, size, MSG_NOSIGNAL)) < 0 && errno == EINTR) {
    }
    return n;
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override { endpoint(sock_, true, ip, port); }
  void get_local_ip_and_port(std::string& ip, int& port) const override { endpoint(sock_, false, ip, port); }
  socket_t socket() const override { return sock_; }

  bool buffered() const { return begin_ < end_; }
  void headers_due(Clock::time_point deadline) { header_deadline_ = deadline; }
  void headers_read() { header_deadline_.reset(); }
  bool timed_out() const { return timed_out_; }

 private:
  int sock_;
  int read_timeout_ms_, write_timeout_ms_;
  std::optional<Clock::time_point> header_deadline_;
  bool timed_out_ = false;
  char buf_[16 << 10];
  size_t begin_ = 0, end_ = 0;
};

}  // namespace

void GuardedHttpServer::close_connections() {
  std::lock_guard<std::mutex> lock(mu_);
  for (const socket_t sock : open_) shutdown(sock, SHUT_RDWR);
}

bool GuardedHttpServer::process_and_close_socket(socket_t sock) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    open_.insert(sock);
  }
  const auto header_timeout = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(header_timeout_s_));
  const int read_ms = static_cast<int>(read_timeout_sec_ * 1000 + read_timeout_usec_ / 1000);
  const int write_ms = static_cast<int>(write_timeout_sec_ * 1000 + write_timeout_usec_ / 1000);
  ConnectionStream strm(sock, read_ms, write_ms);
  bool ok = false;
  auto deadline = Clock::now() + header_timeout;  // the first request's, from the accept
  for (size_t left = keep_alive_max_count_; left > 0 && svr_sock_ != INVALID_SOCKET; --left) {
    if (left < keep_alive_max_count_) {
      // Between requests: wait for the next one (already buffered when pipelined), in short slices so that a
      // stopping server does not wait for idle connections.
      const auto idle_until = Clock::now() + std::chrono::seconds(keep_alive_timeout_sec_);
      bool ready = strm.buffered();
      while (!ready && svr_sock_ != INVALID_SOCKET && Clock::now() < idle_until)
        ready = wait_for(sock, POLLIN, std::min(100, ms_until(idle_until)));
      if (!ready || svr_sock_ == INVALID_SOCKET) break;
      deadline = Clock::now() + header_timeout;
    }
    strm.headers_due(deadline);
    bool closed = false;
    ok = process_request(strm, left == 1, closed, [&](httplib::Request&) { strm.headers_read(); });
    if (strm.timed_out()) {
      ++header_timeouts_;
      break;
    }
    if (!ok || closed) break;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    open_.erase(sock);
  }
  shutdown(sock, SHUT_RDWR);
  close(sock);
  return ok;
}

}  // namespace blip2::server
