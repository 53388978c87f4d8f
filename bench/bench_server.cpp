// Load test for `blip2 serve`: starts the server in this process on a free loopback port, encodes each image
// once (warm-up), sends the same set of chat requests one by one (baseline), then from many concurrent clients
// for several rounds, and reports
// throughput, latency, the server's batch sizes and this process's memory after each round.
// Exit status 1 when any request failed or answered differently from the baseline, or memory kept growing.
//
//   bench_server [--clients 32] [--requests 20] [--rounds 3] [--max-tokens 16] [--model DIR] [--threads N]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>

#include "generate/generate.h"
#include "ops/parallel.h"
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

double metric(const std::string& text, const std::string& name) {
  const size_t p = text.find("\n" + name + " ");
  return p == std::string::npos ? 0 : std::stod(text.substr(p + name.size() + 2));
}

struct Outcome {
  int status = 0;
  std::string text;
  double seconds = 0;
  int64_t tokens = 0;
};

Outcome send(httplib::Client& cli, const json& body) {
  const auto t0 = Clock::now();
  const Reply r = post(cli, body);
  Outcome o;
  o.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  o.status = r.status;
  if (r.status != 200) o.text = r.body.substr(0, 300);
  if (r.status == 200) {
    const auto texts = choice_texts(r);
    o.text = texts.empty() ? "" : texts[0];
    const json j = r.events.empty() ? r.json_body() : r.events.back();
    if (j.contains("usage")) o.tokens = j["usage"]["completion_tokens"].get<int64_t>();
  }
  return o;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(p * static_cast<double>(v.size() - 1))];
}

}  // namespace

int main(int argc, char** argv) {
  int clients = 32, requests = 20, rounds = 3, max_tokens = 16, threads = 0;
  double max_rss_growth_mib = 64;
  std::string model_dir = BLIP2_TINY_T5_DIR;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--clients") clients = std::stoi(v);
    else if (a == "--requests") requests = std::stoi(v);
    else if (a == "--rounds") rounds = std::stoi(v);
    else if (a == "--max-tokens") max_tokens = std::stoi(v);
    else if (a == "--model") model_dir = v;
    else if (a == "--threads") threads = std::stoi(v);
    else if (a == "--max-rss-growth-mb") max_rss_growth_mib = std::stod(v);
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  signal(SIGPIPE, SIG_IGN);
  LoadOptions lo;
  lo.threads = threads;
  Blip2Model model(model_dir, lo);
  ServerOptions so;
  so.port = 0;
  so.scheduler.max_queue = std::max(64, clients * 2);
  HttpServer server(model, generation_defaults(model_dir), so);
  const int port = server.bind();
  std::thread serving([&] { server.serve(); });
  server.wait_until_listening();
  const auto client = [&] {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(600, 0);
    return c;
  };

  // The requests: client c's k-th asks question k about image (c + k) % images; every fourth streams.
  const std::string dir = std::string(BLIP2_FIXTURES_DIR) + "/images/";
  const std::vector<std::string> images = {"chelsea.png", "rocket.jpg", "coffee.png", "astronaut.png",
                                           "camera.png", "motorcycle_left.png", "hubble_deep_field.jpg"};
  std::vector<json> bodies;
  for (int c = 0; c < clients; ++c)
    for (int k = 0; k < requests; ++k) {
      json extra = {{"max_tokens", max_tokens}};
      if ((c + k) % 4 == 0) extra["stream"] = true;
      bodies.push_back(ask(dir + images[(c + k) % images.size()], "what is in picture " + std::to_string(k) + "?", extra));
    }
  const size_t total = bodies.size();
  std::printf("bench_server: %d clients x %d requests = %zu requests, max_tokens %d, model %s, %d threads\n", clients,
              requests, total, max_tokens, model_dir.c_str(), par::threads());
  std::fflush(stdout);

  // Warm-up (not timed): every image once, so that all runs below find its encoding in the cache and
  // compare decoding, not the first vision passes.
  auto cli = client();
  for (const auto& img : images)
    if (send(cli, ask(dir + img, "warm up", {{"max_tokens", 1}})).status != 200) {
      std::fprintf(stderr, "bench_server: warm-up request failed\n");
      return 1;
    }

  // Baseline: one by one.
  std::vector<Outcome> base(total);
  const auto t0 = Clock::now();
  for (size_t i = 0; i < total; ++i) base[i] = send(cli, bodies[i]);
  const double base_s = std::chrono::duration<double>(Clock::now() - t0).count();
  int64_t tokens = 0, errors = 0;
  for (const auto& o : base) {
    tokens += o.tokens;
    if (o.status != 200) ++errors;
  }
  std::vector<double> lat;
  for (const auto& o : base) lat.push_back(o.seconds);
  std::printf("one by one : %7.2f s  %7.1f req/s  %8.1f tokens/s  latency p50 %.3f s p95 %.3f s  errors %lld\n", base_s,
              static_cast<double>(total) / base_s, static_cast<double>(tokens) / base_s, percentile(lat, 0.5),
              percentile(lat, 0.95), static_cast<long long>(errors));
  const std::string m0 = cli.Get("/metrics")->body;

  // Concurrent rounds.
  std::vector<double> rss;
  double best = 0;
  int64_t mismatches = 0;
  for (int round = 1; round <= rounds; ++round) {
    std::vector<Outcome> out(total);
    std::vector<std::thread> ts;
    const auto r0 = Clock::now();
    for (int c = 0; c < clients; ++c)
      ts.emplace_back([&, c] {
        auto cl = client();
        for (int k = 0; k < requests; ++k) out[c * requests + k] = send(cl, bodies[c * requests + k]);
      });
    for (auto& t : ts) t.join();
    const double s = std::chrono::duration<double>(Clock::now() - r0).count();
    int64_t tok = 0, err = 0, diff = 0;
    lat.clear();
    for (size_t i = 0; i < total; ++i) {
      tok += out[i].tokens;
      lat.push_back(out[i].seconds);
      if (out[i].status != 200 && ++err == 1)
        std::printf("first error: status %d: %s\n", out[i].status, out[i].text.c_str());
      else if (out[i].text != base[i].text) ++diff;
    }
    errors += err;
    mismatches += diff;
    best = std::max(best, static_cast<double>(total) / s);
    rss.push_back(rss_mib());
    std::printf("concurrent %d: %6.2f s  %7.1f req/s  %8.1f tokens/s  latency p50 %.3f s p95 %.3f s  errors %lld  "
                "answers differing from one-by-one %lld  RSS %.1f MiB\n",
                round, s, static_cast<double>(total) / s, static_cast<double>(tok) / s, percentile(lat, 0.5),
                percentile(lat, 0.95), static_cast<long long>(err), static_cast<long long>(diff), rss.back());
    std::fflush(stdout);
  }
  const std::string m1 = cli.Get("/metrics")->body;
  const double steps = metric(m1, "blip2_batch_rows_count") - metric(m0, "blip2_batch_rows_count");
  const double rows = metric(m1, "blip2_batch_rows_sum") - metric(m0, "blip2_batch_rows_sum");
  const double vpass = metric(m1, "blip2_vision_batch_images_count");
  std::printf("batching   : %.2fx the one-by-one request rate; concurrent rounds averaged %.2f decoder rows per step; "
              "%.0f images encoded in %.0f vision passes; image cache hits %.0f, misses %.0f\n",
              best / (static_cast<double>(total) / base_s), steps > 0 ? rows / steps : 0,
              metric(m1, "blip2_images_encoded_total"), vpass, metric(m1, "blip2_image_cache_hits_total"),
              metric(m1, "blip2_image_cache_misses_total"));
  std::printf("scheduler  : decoder steps %.1f s, prompt stage %.1f s, vision %.1f s (all rounds, one by one included)\n",
              metric(m1, "blip2_decode_seconds_total"), metric(m1, "blip2_prompt_seconds_total"),
              metric(m1, "blip2_vision_seconds_total"));
  const double growth = rss.size() >= 2 ? rss.back() - rss.front() : 0;
  std::printf("memory     : RSS after each round");
  for (double r : rss) std::printf(" %.1f", r);
  std::printf(" MiB (growth from round 1 to %d: %.1f MiB)\n", rounds, growth);
  server.shutdown();
  serving.join();
  const bool ok = errors == 0 && mismatches == 0 && growth <= max_rss_growth_mib;
  std::printf("bench_server: %s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
