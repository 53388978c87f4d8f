// Soak test of `blip2 serve` (not part of CI; scripts/soak.sh runs it): the server in this process on a free
// loopback port, under mixed load for N minutes from several client threads: valid requests (plain, streamed,
// several choices, beams) whose answers must equal their one-by-one answers; invalid ones that must get their
// exact 4xx; bodies and images at and just past every size limit; clients that disconnect mid-stream, send
// their headers slowly or pipeline requests. Every 10 s it prints counts and this process's RSS.
// Exit status 1 on any unexpected answer, or when RSS grew by more than --max-rss-growth-mb from the end of the
// warm-up (the first minute) to the end.
//
//   soak_server [--minutes 10] [--clients 6] [--max-tokens 12] [--max-rss-growth-mb 64]
#include <arpa/inet.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "generate/generate.h"
#include "model/blip2.h"
#include "server/http_server.h"
#include "server_client.h"

using namespace blip2;
using namespace blip2::server;
using namespace blip2::testing;
using Clock = std::chrono::steady_clock;

namespace {

double rss_mib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

int connect_loopback(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd >= 0 && connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) return fd;
  if (fd >= 0) close(fd);
  return -1;
}

void send_all(int fd, const std::string& s) {
  for (size_t at = 0; at < s.size();) {
    const ssize_t n = send(fd, s.data() + at, s.size() - at, MSG_NOSIGNAL);
    if (n <= 0) return;
    at += static_cast<size_t>(n);
  }
}

std::string read_some(int fd, double seconds, size_t enough) {
  std::string out;
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  char buf[4096];
  while (Clock::now() < until && out.size() < enough) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 50) <= 0) continue;
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

struct Valid {
  json body;
  std::vector<std::string> texts;  // the one-by-one answer
};

struct Stats {
  std::mutex mu;
  std::map<std::string, int64_t> done;  // scenario -> count
  int64_t unexpected = 0;
  void count(const std::string& scenario, bool ok, const std::string& detail) {
    std::lock_guard<std::mutex> lock(mu);
    ++done[scenario];
    if (!ok && ++unexpected <= 20) std::printf("UNEXPECTED %s: %s\n", scenario.c_str(), detail.substr(0, 300).c_str());
  }
};

}  // namespace

int main(int argc, char** argv) {
  double minutes = 10, max_growth = 64;
  int clients = 6, max_tokens = 12;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--minutes") minutes = std::stod(v);
    else if (a == "--clients") clients = std::stoi(v);
    else if (a == "--max-tokens") max_tokens = std::stoi(v);
    else if (a == "--max-rss-growth-mb") max_growth = std::stod(v);
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  signal(SIGPIPE, SIG_IGN);
  const std::string model_dir = BLIP2_TINY_T5_DIR, dir = std::string(BLIP2_FIXTURES_DIR) + "/images/";
  Blip2Model model(model_dir);
  ServerOptions so;
  so.port = 0;
  so.header_timeout_s = 2;
  so.limits.max_body_bytes = 1 << 20;
  so.limits.max_image_bytes = 512 << 10;
  HttpServer server(model, generation_defaults(model_dir), so);
  const int port = server.bind();
  std::thread serving([&] { server.serve(); });
  server.wait_until_listening();
  const auto client = [&] {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(300, 0);
    return c;
  };

  // The valid requests and their one-by-one answers.
  const std::vector<std::string> images = {"chelsea.png", "rocket.jpg", "coffee.png", "camera.png"};
  std::vector<Valid> valid;
  for (size_t i = 0; i < images.size(); ++i) {
    const std::string q = "what is in picture " + std::to_string(i) + "?";
    valid.push_back({ask(dir + images[i], q, {{"max_tokens", max_tokens}}), {}});
    valid.push_back({ask(dir + images[i], q, {{"max_tokens", max_tokens}, {"num_beams", 2}, {"n", 2}}), {}});
    valid.push_back({ask(dir + images[i], q, {{"max_tokens", max_tokens}, {"temperature", 0.8}, {"n", 2}, {"seed", 7}}), {}});
  }
  {
    auto cli = client();
    for (auto& v : valid) {
      const Reply r = post(cli, v.body);
      if (r.status != 200) {
        std::fprintf(stderr, "soak_server: baseline request failed: %d %s\n", r.status, r.body.c_str());
        return 1;
      }
      v.texts = choice_texts(r);
    }
  }
  // A body of exactly the limit (padded by an unknown field, which is ignored) and one byte more.
  json padded = valid[0].body;
  padded["pad"] = "";
  padded["pad"] = std::string(so.limits.max_body_bytes - padded.dump().size(), 'x');
  const std::string at_limit = padded.dump(), past_limit = at_limit + " ";
  const std::string big_image = std::string(so.limits.max_image_bytes + 1, '\x89');
  const std::vector<std::pair<std::string, int>> invalid = {
      {"{\"messages\": [", 400},
      {R"({"messages": "hello"})", 400},
      {R"({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@="}}]}]})", 400},
      {ask(dir + "chelsea.png", "q", {{"max_tokens", 100000}}).dump(), 400},
      {ask(dir + "chelsea.png", "q", {{"temperature", 0.001}}).dump(), 400},
      {json{{"messages", json::array({{{"role", "user"}, {"content", json::array({image_part_bytes("not an image")})}}})}}.dump(), 422},
      {json{{"messages", json::array({{{"role", "user"}, {"content", json::array({image_part_bytes(big_image)})}}})}}.dump(), 413},
      {past_limit, 413},
  };

  Stats stats;
  std::atomic<bool> stop{false};
  const auto start = Clock::now();
  std::vector<std::thread> ts;
  for (int c = 0; c < clients; ++c)
    ts.emplace_back([&, c] {
      std::mt19937 rng(static_cast<uint32_t>(c) * 7919u + 1);
      auto cli = client();
      while (!stop) {
        const int kind = static_cast<int>(rng() % 10);
        if (kind <= 3) {  // valid, plain or streamed
          const Valid& v = valid[rng() % valid.size()];
          json body = v.body;
          const bool stream = kind >= 2;
          if (stream) body["stream"] = true;
          const Reply r = post(cli, body);
          const bool ok = r.status == 200 && choice_texts(r) == v.texts && (!stream || r.done);
          stats.count(stream ? "valid streamed" : "valid", ok, std::to_string(r.status) + " " + r.body);
        } else if (kind == 4) {  // the body at its limit
          const Reply r = post(cli, at_limit);
          stats.count("body at the limit", r.status == 200 && choice_texts(r) == valid[0].texts,
                      std::to_string(r.status) + " " + r.body);
        } else if (kind <= 6) {  // invalid: its exact status
          const auto& [body, status] = invalid[rng() % invalid.size()];
          const Reply r = post(cli, body);
          stats.count("invalid", r.status == status, "expected " + std::to_string(status) + ", got " +
                                                          std::to_string(r.status) + " " + r.body);
        } else if (kind == 7) {  // a streaming client that goes away after the first bytes
          const int fd = connect_loopback(port);
          json body = valid[rng() % valid.size()].body;
          body["stream"] = true;
          const std::string b = body.dump();
          send_all(fd, "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       "Content-Length: " + std::to_string(b.size()) + "\r\n\r\n" + b);
          read_some(fd, 5, 1);
          close(fd);
          stats.count("disconnecting", fd >= 0, "cannot connect");
        } else if (kind == 8) {  // headers sent slowly, then given up
          const int fd = connect_loopback(port);
          send_all(fd, "GET /health HTTP/1.1\r\n");
          std::this_thread::sleep_for(std::chrono::milliseconds(300));
          send_all(fd, "Host: 127.0.0.1\r\n");
          close(fd);
          stats.count("slow headers", fd >= 0, "cannot connect");
        } else {  // pipelined GETs, answered in order
          const int fd = connect_loopback(port);
          send_all(fd, "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       "Connection: close\r\n\r\n");
          const std::string r = read_some(fd, 10, size_t(1) << 20);
          close(fd);
          const size_t a = r.find("\"status\":\"ok\""), b = r.find("\"object\":\"list\"");
          stats.count("pipelined", a != std::string::npos && b != std::string::npos && a < b, r);
        }
      }
    });

  std::vector<std::pair<double, double>> rss;  // (seconds, MiB)
  const double total_s = minutes * 60;
  for (double t = 0; t < total_s;) {
    std::this_thread::sleep_for(std::chrono::seconds(10));
    t = std::chrono::duration<double>(Clock::now() - start).count();
    rss.emplace_back(t, rss_mib());
    std::lock_guard<std::mutex> lock(stats.mu);
    int64_t n = 0;
    for (const auto& [k, v] : stats.done) n += v;
    std::printf("%6.0f s  requests %lld  unexpected %lld  RSS %.1f MiB\n", t, static_cast<long long>(n),
                static_cast<long long>(stats.unexpected), rss.back().second);
    std::fflush(stdout);
  }
  stop = true;
  for (auto& t : ts) t.join();
  server.shutdown();
  serving.join();

  // RSS from the end of the warm-up (the first sample past a minute, or a tenth of a short run) to the end.
  const double warm = std::min(60.0, total_s / 10);
  double after_warm = 0, peak = 0;
  for (const auto& [t, m] : rss) {
    if (t >= warm && after_warm == 0) after_warm = m;
    if (t >= warm) peak = std::max(peak, m);
  }
  std::printf("soak_server: %.1f min, %d clients, max_tokens %d\n", minutes, clients, max_tokens);
  int64_t n = 0;
  for (const auto& [k, v] : stats.done) {
    std::printf("  %-20s %8lld\n", k.c_str(), static_cast<long long>(v));
    n += v;
  }
  const double growth = rss.empty() ? 0 : rss.back().second - after_warm;
  std::printf("  total %lld requests, unexpected %lld; RSS after warm-up %.1f MiB, peak %.1f MiB, at the end %.1f MiB "
              "(growth %.1f MiB)\n",
              static_cast<long long>(n), static_cast<long long>(stats.unexpected), after_warm, peak,
              rss.empty() ? 0 : rss.back().second, growth);
  const bool ok = stats.unexpected == 0 && growth <= max_growth;
  std::printf("soak_server: %s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
