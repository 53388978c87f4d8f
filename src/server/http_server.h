// `blip2 serve`: an OpenAI-compatible HTTP server over the scheduler. Thin: it checks and parses requests
// (chat_request.h), hands them to the scheduler, and writes responses (JSON, or server-sent events).
//   POST /v1/chat/completions   GET /v1/models   GET /health   GET /metrics   GET / (a chat page)
// With a retrieval checkpoint instead: POST /v1/embeddings and POST /v1/match (server/retrieval_api.h); each
// kind of checkpoint answers the other's endpoints with a 400 that says what it serves.
#pragma once
#include <atomic>
#include <memory>
#include <string>

#include <httplib.h>

#include "generate/generate.h"
#include "model/blip2.h"
#include "model/retrieval.h"
#include "server/chat_request.h"
#include "server/http_connection.h"
#include "server/retrieval_api.h"
#include "server/scheduler.h"


namespace blip2::server {

// Connections the kernel queues for accept() (the kernel caps it at net.core.somaxconn).
constexpr int kListenBacklog = 1024;

// Threads beyond those the queue and the running batch can use: for idle keep-alive connections and clients
// still sending their headers (each holds a thread until its header deadline), so that ~100 slow ones leave
// /health and the API reachable. An idle thread costs a stack's address space, hardly any memory.
constexpr int kSpareConnections = 256;

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;               // 0: any free port (bind() returns it)
  std::string api_key;           // non-empty: /v1/* needs "Authorization: Bearer KEY"
  std::string model_id = "blip2";
  int http_threads = 0;          // connections served at once; 0: max_queue + max_batch_rows + kSpareConnections
  double drain_timeout_s = 60;   // shutdown waits this long for running requests
  double header_timeout_s = 10;  // a request's line and headers must arrive within this (slowloris)
  // Host header values accepted besides loopback names and addresses and the listening address, when there is
  // no API key (DNS rebinding: see host_allowed).
  std::vector<std::string> allowed_hosts;
  Limits limits;
  SchedulerOptions scheduler;
};

// Whether a request's Host header may reach a server without an API key. A web page from another site can make
// the browser send requests to this server by rebinding its own DNS name to 127.0.0.1 (DNS rebinding); the
// browser then sends that name as Host. Accepted: no Host (not a browser), loopback names (localhost,
// *.localhost) and addresses (127.0.0.0/8, ::1), the address the server listens on when it is one, and the
// names in `allowed` (case-insensitive; a port in the header is ignored).
bool host_allowed(const std::string& host_header, const std::string& listen_host,
                  const std::vector<std::string>& allowed);

class HttpServer {
 public:
  HttpServer(const Blip2Model& model, const GenerationOptions& defaults, const ServerOptions& options);
  // Serves embeddings and match scores; the image cache takes options.scheduler.image_cache_bytes.
  HttpServer(const RetrievalModel& model, const ServerOptions& options);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds the listening socket; returns the port. Throws Error(Usage) when the address cannot be bound.
  int bind();
  // Serves until shutdown(). Call after bind().
  void serve();
  // Returns once serve() accepts connections.
  void wait_until_listening() const;
  // Drains: new chat requests get 503, queued and running ones finish and their responses are written
  // (up to drain_timeout_s), then serve() returns. Thread-safe; returns when done.
  void shutdown();

  Scheduler& scheduler() { return *scheduler_; }  // a captioning model's server only
  std::string metrics_text() const;

 private:
  struct Counters;
  void setup();  // the HTTP server's settings and routes, for either kind of model
  void routes();
  // The request body, counted as it arrives (decompressed) against max_body_bytes; false after answering
  // 413 or 400 itself.
  bool read_body(const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& read,
                 std::string& body) const;
  // A retrieval endpoint: checks, then `answer` (RetrievalApi) turns the body into the response JSON.
  void retrieval(const httplib::Request& req, const std::string& body, httplib::Response& res,
                 nlohmann::json (RetrievalApi::*answer)(const std::string&));
  void chat(const httplib::Request& req, const std::string& body, httplib::Response& res);
  void check_positions(const Job& job) const;  // throws ApiError(400)

  const Blip2Model* model_ = nullptr;          // a captioning model, or
  const RetrievalModel* retrieval_ = nullptr;  // a retrieval one
  std::unique_ptr<RetrievalApi> retrieval_api_;
  const GenerationOptions defaults_;
  ServerOptions opt_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<GuardedHttpServer> http_;
  std::unique_ptr<Counters> counters_;
  std::atomic<bool> draining_{false};
  std::atomic<int> in_flight_{0};  // chat requests whose response is not yet written
  int port_ = 0;
  int listen_fd_ = -1;  // the listening socket (httplib owns it)
};

}  // namespace blip2::server
