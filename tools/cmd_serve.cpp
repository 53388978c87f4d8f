// blip2 serve: the HTTP server (src/server) on a socket, until SIGTERM or SIGINT, which drain it first; a second
// one exits at once.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <thread>

#include "commands.h"
#include "core/error.h"
#include "generate/generate.h"
#include "model/blip2.h"
#include "model/retrieval.h"
#include "server/http_server.h"

using namespace blip2;
using namespace blip2::server;

namespace {

int g_signal_pipe[2] = {-1, -1};
std::atomic<int> g_signals{0};  // lock-free: safe in a signal handler

void on_signal(int sig) {
  if (g_signals.fetch_add(1) > 0) {
    // A second SIGTERM/SIGINT while draining (which can wait on slow clients): stop now, as asked.
    static const char msg[] = "blip2 serve: second signal: exiting without draining\n";
    [[maybe_unused]] const ssize_t m = write(STDERR_FILENO, msg, sizeof msg - 1);
    _exit(128 + sig);
  }
  const unsigned char b = static_cast<unsigned char>(sig);
  [[maybe_unused]] const ssize_t n = write(g_signal_pipe[1], &b, 1);
}

struct ServeArgs {
  std::string model;
  ServerOptions opt;
  double max_body_mb = 16, max_image_mb = 8, image_cache_mb = 256;
};

void run_serve(const ServeArgs& a, const std::function<std::unique_ptr<Blip2Model>(const std::string&)>& load,
               const std::function<std::unique_ptr<RetrievalModel>(const std::string&)>& load_retrieval) {
  // SIGTERM and SIGINT write their number to a pipe (any thread may receive them: libraries start threads
  // before main); a waiter thread reads it and drains the server. A peer that closes its socket must not
  // kill the server (SIGPIPE).
  if (pipe(g_signal_pipe) != 0) fail(ErrorKind::Internal, "pipe() failed");
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);

  ServerOptions opt = a.opt;
  const auto mb = [](double v, const char* name) {
    if (!(v > 0 && v <= 1 << 20)) fail(ErrorKind::Usage, std::string(name) + " must be a positive number of MiB");
    return static_cast<size_t>(v * 1024 * 1024);
  };
  opt.limits.max_body_bytes = mb(a.max_body_mb, "--max-body-mb");
  opt.limits.max_image_bytes = mb(a.max_image_mb, "--max-image-mb");
  opt.scheduler.image_cache_bytes = a.image_cache_mb == 0 ? 0 : mb(a.image_cache_mb, "--image-cache-mb");
  if (opt.port < 0 || opt.port > 65535) fail(ErrorKind::Usage, "--port must be between 0 and 65535");
  if (opt.scheduler.max_queue < 1 || opt.scheduler.max_batch_rows < 1)
    fail(ErrorKind::Usage, "--max-queue and --max-batch-rows must be at least 1");
  if (!(opt.scheduler.request_timeout_s > 0)) fail(ErrorKind::Usage, "--request-timeout must be positive");

  if (opt.model_id.empty()) opt.model_id = "blip2";
  // A retrieval checkpoint serves embeddings and match scores, a captioning one chat completions.
  std::unique_ptr<Blip2Model> model;
  std::unique_ptr<RetrievalModel> retrieval;
  std::unique_ptr<HttpServer> server;
  if (load_config(a.model).task == Blip2Task::Retrieval) {
    retrieval = load_retrieval(a.model);
    server = std::make_unique<HttpServer>(*retrieval, opt);
  } else {
    const GenerationOptions defaults = generation_defaults(a.model);
    model = load(a.model);
    server = std::make_unique<HttpServer>(*model, defaults, opt);
  }
  const int port = server->bind();
  std::fprintf(stderr, "blip2 serve: listening on http://%s:%d (model %s)\n", opt.host.c_str(), port, a.model.c_str());
  std::fflush(stderr);

  std::thread waiter([&] {
    unsigned char sig = 0;
    while (read(g_signal_pipe[0], &sig, 1) < 0 && errno == EINTR) {
    }
    std::fprintf(stderr, "blip2 serve: %s: finishing running requests\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    server->shutdown();
  });
  server->serve();
  waiter.join();
  std::fprintf(stderr, "blip2 serve: stopped\n");
}

}  // namespace

void add_serve_command(CLI::App& app, std::function<std::unique_ptr<Blip2Model>(const std::string&)> load,
                       std::function<std::unique_ptr<RetrievalModel>(const std::string&)> load_retrieval,
                       std::string default_model) {
  auto args = std::make_shared<ServeArgs>();
  args->model = std::move(default_model);
  ServerOptions& o = args->opt;
  auto* sub = app.add_subcommand("serve", "Serve the model over HTTP: an OpenAI-compatible chat API and a web page");
  sub->add_option("--model", args->model, "Model directory (Hugging Face layout)")->capture_default_str();
  sub->add_option("--host", o.host, "Address to listen on (loopback by default; 0.0.0.0 for every interface)")
      ->capture_default_str();
  sub->add_option("--port", o.port, "Port to listen on; 0 picks a free one")->capture_default_str();
  sub->add_option("--api-key", o.api_key, "Require \"Authorization: Bearer KEY\" on /v1/* (default: none; $BLIP2_API_KEY keeps it out of ps)")
      ->envname("BLIP2_API_KEY");
  sub->add_option("--model-id", o.model_id, "Model name reported by /v1/models and in responses")->capture_default_str();
  const char* lim = "Limits";
  sub->add_option("--max-queue", o.scheduler.max_queue, "Requests waiting to start; beyond, 503")->capture_default_str()->group(lim);
  sub->add_option("--max-batch-rows", o.scheduler.max_batch_rows,
                  "Decoder rows run together (a request takes n, or num_beams, rows)")->capture_default_str()->group(lim);
  sub->add_option("--request-timeout", o.scheduler.request_timeout_s, "Seconds a request may take, queueing included")
      ->capture_default_str()->group(lim);
  sub->add_option("--image-cache-mb", args->image_cache_mb, "Memory for cached image encodings (MiB; 0: no cache)")
      ->capture_default_str()->group(lim);
  sub->add_option("--max-body-mb", args->max_body_mb, "Largest request body (MiB)")->capture_default_str()->group(lim);
  sub->add_option("--max-image-mb", args->max_image_mb, "Largest encoded image (MiB)")->capture_default_str()->group(lim);
  sub->add_option("--max-image-pixels", o.limits.max_image_pixels, "Largest image, width x height")
      ->capture_default_str()->group(lim);
  sub->add_option("--max-tokens", o.limits.max_output_tokens, "Largest max_tokens a request may ask for")
      ->capture_default_str()->group(lim);
  sub->add_option("--max-prompt-tokens", o.limits.max_prompt_tokens,
                  "Longest conversation prompt in tokens; older turns are dropped (0: the model's limit)")
      ->capture_default_str()->group(lim);
  sub->add_option("--max-n", o.limits.max_choices, "Largest n and num_beams")->capture_default_str()->group(lim);
  sub->add_option("--max-inputs", o.limits.max_inputs, "Most inputs of one /v1/embeddings or /v1/match request")
      ->check(CLI::Range(1, 4096))->capture_default_str()->group(lim);
  sub->add_option("--max-json-depth", o.limits.max_json_depth, "Deepest nesting of the request JSON")
      ->capture_default_str()->group(lim);
  sub->add_option("--allowed-local-media", o.limits.local_image_dir,
                  "Allow file:// image URLs inside this directory (default: refused)")->group(lim);
  sub->add_flag("--allow-remote-images", o.limits.allow_remote_images,
                "Fetch http(s):// image URLs (default: refused; only data: URLs are read)")->group(lim);
  sub->add_flag("--allow-private-image-hosts", o.limits.allow_private_image_hosts,
                "With --allow-remote-images, also fetch from loopback, link-local (cloud metadata) and private "
                "addresses (default: refused, checked on the resolved address)")->group(lim);
  sub->add_option("--http-threads", o.http_threads,
                  "Connections served at once (0: max-queue + max-batch-rows + " + std::to_string(server::kSpareConnections) + ")")
      ->capture_default_str()->group(lim);
  sub->add_option("--header-timeout", o.header_timeout_s,
                  "Seconds a request's line and headers may take to arrive; slower connections are closed")
      ->capture_default_str()->check(CLI::PositiveNumber)->group(lim);
  sub->add_option("--allowed-host", o.allowed_hosts,
                  "Without --api-key, also answer requests whose Host header is NAME (repeatable; default: only "
                  "loopback names and addresses, and the --host address)")->group(lim);
  sub->add_option("--drain-timeout", o.drain_timeout_s, "On SIGTERM, seconds to wait for running requests")
      ->capture_default_str()->group(lim);
  sub->footer(
      "Endpoints: POST /v1/chat/completions (OpenAI's format; images as data:image/...;base64 URLs), GET /v1/models,\n"
      "GET /health, GET /metrics (Prometheus), GET / (a page to chat about an image). See docs/SERVER.md.\n"
      "A retrieval checkpoint (Blip2ForImageTextRetrieval) serves POST /v1/embeddings and POST /v1/match instead\n"
      "(docs/RETRIEVAL.md); --max-inputs bounds the inputs of one request.\n"
      "Example: blip2 serve --port 8080, then open http://127.0.0.1:8080/");
  sub->callback([args, load, load_retrieval] { run_serve(*args, load, load_retrieval); });
}
