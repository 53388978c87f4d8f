// httplib's server with its connection handling replaced (httplib 0.11 lets a subclass take over a connection
// and still parses and routes each request itself):
//  * a request's headers must arrive within a total deadline. httplib only bounds each read, so a client
//    sending a header byte every few seconds held a worker thread for as long as it liked, and about 100 of
//    them made the server unreachable (slowloris). A connection past its deadline is closed.
//  * one buffered stream per connection, kept across its keep-alive requests. httplib makes a stream per
//    request and drops what it read ahead, so pipelined requests (sent before the previous answer) were lost
//    or read from the middle (a 414).
//  * an idle keep-alive connection is closed when the server stops, and close_connections() ends the others,
//    instead of holding shutdown up for their read and write timeouts.
#pragma once
#include <httplib.h>

#include <atomic>
#include <mutex>
#include <set>

namespace blip2::server {

class GuardedHttpServer : public httplib::Server {
 public:
  // Seconds from a request's first byte (from the connection's accept for its first request) until its
  // request line and headers must be complete.
  void set_header_timeout(double seconds) { header_timeout_s_ = seconds; }
  // Connections closed for headers past the deadline, since start.
  int64_t header_timeouts() const { return header_timeouts_; }
  // After stop(): shuts down every open connection's socket, so that their threads return at once.
  void close_connections();

 private:
  bool process_and_close_socket(socket_t sock) override;

  double header_timeout_s_ = 10;
  std::atomic<int64_t> header_timeouts_{0};
  std::mutex mu_;
  std::set<socket_t> open_;  // connections being served
};

}  // namespace blip2::server
