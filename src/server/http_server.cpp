#include "server/http_server.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <sstream>

#include "core/error.h"
#include "core/file.h"
#include "image/image.h"
#include "server/web_page.h"

namespace blip2::server {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kJson = "application/json";

// Chat and retrieval responses the handler on this thread has finished but httplib has not yet written:
// the logger, which httplib calls on the same thread once the response is out, takes them off in_flight_.
// (Shutdown waits on in_flight_ before closing connections; taken off at the handler's end, a response
// could be cut off unwritten and the client see a reset instead of its 503.)
thread_local int t_unwritten = 0;

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(e.to_json().dump(-1, ' ', false, json::error_handler_t::replace), kJson);
}

std::string status_type(int status) {
  return status >= 500 ? "server_error" : status == 401 ? "authentication_error" : "invalid_request_error";
}

// The socket of the connection a request came on, found by its two endpoints (httplib does not hand it to
// handlers); -1 if not found. Used to notice a client that went away while its answer is computed.
int connection_fd(const httplib::Request& req) {
  for (int fd = 3; fd < 65536; ++fd) {
    sockaddr_storage peer{}, self{};
    socklen_t pl = sizeof peer, sl = sizeof self;
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &pl) != 0) {
      if (errno == EBADF && fd > 4096) break;
      continue;
    }
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&self), &sl) != 0) continue;
    char host[NI_MAXHOST], port[NI_MAXSERV], lport[NI_MAXSERV];
    if (getnameinfo(reinterpret_cast<sockaddr*>(&peer), pl, host, sizeof host, port, sizeof port,
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0 ||
        getnameinfo(reinterpret_cast<sockaddr*>(&self), sl, nullptr, 0, lport, sizeof lport, NI_NUMERICSERV) != 0)
      continue;
    if (req.remote_addr == host && std::to_string(req.remote_port) == port &&
        std::to_string(req.local_port) == lport)
      return fd;
  }
  return -1;
}

// True when the peer has closed its side (or the connection failed).
bool peer_closed(int fd) {
  if (fd < 0) return false;
  pollfd p{fd, POLLRDHUP, 0};
  return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

std::string completion_id() {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t start = static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
  std::ostringstream s;
  s << "chatcmpl-" << std::hex << start << "-" << counter.fetch_add(1);
  return s.str();
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// Tokens of a prompt, stopping once past `limit` and tokenizing at most kChunk bytes at a time: tokenizing
// costs memory in proportion to the text (a 15 MB question took 3.7 GB before it was refused). Longer text is
// counted in chunks cut before a space, where both tokenizers split words anyway (GPT-2's pre-tokenizer gives
// the space to the next word; SentencePiece splits on whitespace), less the BOS or EOS each encode() adds.
// Exact up to kChunk bytes, which any prompt within the limits is; beyond, a cut inside a run of spaces or
// of a word without spaces can miscount by a token or two, on text that is thousands of tokens over.
int64_t count_prompt_tokens(const Tokenizer& tok, const std::string& text, int64_t limit) {
  constexpr size_t kChunk = 16 << 10;
  if (text.size() <= kChunk) return static_cast<int64_t>(tok.encode(text).size());
  const int64_t added = static_cast<int64_t>(tok.encode("").size());
  int64_t n = added;
  for (size_t at = 0; at < text.size() && n <= limit;) {
    size_t cut = std::min(text.size(), at + kChunk);
    if (cut < text.size()) {
      const size_t space = text.rfind(' ', cut);
      if (space != std::string::npos && space > at) cut = space;
      else
        while (cut > at + 1 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;  // not mid-character
    }
    n += static_cast<int64_t>(tok.encode(text.substr(at, cut - at)).size()) - added;
    at = cut;
  }
  return n;
}

const std::vector<std::string> kPaths = {"/",          "/health",       "/metrics", "/v1/models", "/v1/chat/completions",
                                         "/v1/embeddings", "/v1/match"};

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// The host part of a Host header or address: no port, no IPv6 brackets, no final dot, lower case.
std::string host_part(const std::string& h) {
  std::string host = h;
  if (!host.empty() && host[0] == '[') {
    const size_t close = host.find(']');
    if (close == std::string::npos) return "";  // malformed: matches nothing
    host = host.substr(1, close - 1);
  } else if (std::count(host.begin(), host.end(), ':') == 1) {
    host = host.substr(0, host.find(':'));
  }
  if (!host.empty() && host.back() == '.') host.pop_back();
  return lower(host);
}

}  // namespace

bool host_allowed(const std::string& host_header, const std::string& listen_host,
                  const std::vector<std::string>& allowed) {
  if (host_header.empty()) return true;
  const std::string host = host_part(host_header);
  const std::string suffix = ".localhost";
  if (host == "localhost" ||
      (host.size() > suffix.size() && host.compare(host.size() - suffix.size(), suffix.size(), suffix) == 0))
    return true;
  in_addr v4{};
  in6_addr v6{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1 && (ntohl(v4.s_addr) >> 24) == 127) return true;
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1 &&
      (IN6_IS_ADDR_LOOPBACK(&v6) || (IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127)))
    return true;
  const std::string listen = host_part(listen_host);
  if (!host.empty() && host == listen && listen != "0.0.0.0" && listen != "::") return true;
  return std::any_of(allowed.begin(), allowed.end(), [&](const std::string& a) { return host_part(a) == host; });
}

struct HttpServer::Counters {
  std::mutex mu;
  std::map<std::pair<std::string, int>, int64_t> requests;  // (path, status) -> count
};

HttpServer::HttpServer(const Blip2Model& model, const GenerationOptions& defaults, const ServerOptions& options)
    : model_(&model), defaults_(defaults), opt_(options),
      scheduler_(std::make_unique<Scheduler>(model, options.scheduler)),
      http_(std::make_unique<GuardedHttpServer>()), counters_(std::make_unique<Counters>()) {
  setup();
}

HttpServer::HttpServer(const RetrievalModel& model, const ServerOptions& options)
    : retrieval_(&model),
      retrieval_api_(std::make_unique<RetrievalApi>(model, options.limits, options.scheduler.image_cache_bytes,
                                                    options.model_id)),
      opt_(options), http_(std::make_unique<GuardedHttpServer>()), counters_(std::make_unique<Counters>()) {
  setup();
}

void HttpServer::setup() {
  const int threads = opt_.http_threads > 0 ? opt_.http_threads
                                            : opt_.scheduler.max_queue + opt_.scheduler.max_batch_rows + kSpareConnections;
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  http_->set_payload_max_length(opt_.limits.max_body_bytes);
  http_->set_read_timeout(30, 0);
  http_->set_write_timeout(30, 0);
  http_->set_header_timeout(opt_.header_timeout_s);
  // httplib's 5 requests per connection would close a pipelining client's connection under its later requests.
  http_->set_keep_alive_max_count(100);
  // httplib's default socket options set SO_REUSEPORT, with which a second server binds a busy port without
  // a word and the kernel splits the connections between the two. SO_REUSEADDR alone still allows a restart
  // over connections in TIME_WAIT. The socket is noted for bind(), which raises its listen backlog.
  http_->set_socket_options([this](socket_t sock) {
    const int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    listen_fd_ = sock;
  });
  routes();
}

HttpServer::~HttpServer() {
  if (http_->is_running()) http_->stop();
}

int HttpServer::bind() {
  if (opt_.port == 0) {
    port_ = http_->bind_to_any_port(opt_.host);
  } else {
    port_ = http_->bind_to_port(opt_.host, opt_.port) ? opt_.port : -1;
  }
  if (port_ <= 0)
    fail(ErrorKind::Usage, "cannot listen on " + opt_.host + ":" + std::to_string(opt_.port) +
                               " (address in use, or not an address of this machine)");
  // httplib listens with a backlog of 5: under load, connections beyond it are dropped and retried a second
  // later (a ~1 s p99). Calling listen() again on the listening socket sets the new backlog (capped by the
  // kernel's somaxconn).
  if (::listen(listen_fd_, kListenBacklog) != 0)
    fail(ErrorKind::Internal, "cannot set the listen backlog: " + std::string(std::strerror(errno)));
  return port_;
}

void HttpServer::serve() { http_->listen_after_bind(); }

void HttpServer::wait_until_listening() const {
  while (!http_->is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

void HttpServer::shutdown() {
  draining_ = true;
  // One deadline for everything: running requests, then writing their responses. Requests still running at
  // the deadline end with a 503, whose responses get a moment to be written.
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(opt_.drain_timeout_s));
  if (scheduler_) scheduler_->drain(until);
  const auto written = std::max(until, Clock::now() + std::chrono::milliseconds(500));
  while (in_flight_ > 0 && Clock::now() < written) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  http_->stop();
  // Connections still open (a client sending a body or headers slowly, an answer not read) would hold the
  // worker threads, which stopping joins, for up to their read and write timeouts.
  http_->close_connections();
}

void HttpServer::routes() {
  httplib::Server& s = *http_;
  s.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    // /health stays open to probes, which send the pod's address as Host.
    if (opt_.api_key.empty() && req.path != "/health" &&
        !host_allowed(req.get_header_value("Host"), opt_.host, opt_.allowed_hosts)) {
      send_error(res, ApiError(403, "Host '" + printable(req.get_header_value("Host")) +
                                        "' is not allowed: a server without --api-key answers only loopback names "
                                        "and addresses (DNS rebinding); add the name with --allowed-host",
                               "", "host_not_allowed", "invalid_request_error"));
      return httplib::Server::HandlerResponse::Handled;
    }
    if (!opt_.api_key.empty() && req.path.rfind("/v1/", 0) == 0 &&
        req.get_header_value("Authorization") != "Bearer " + opt_.api_key) {
      send_error(res, ApiError(401, "missing or wrong API key: send \"Authorization: Bearer KEY\"", "",
                               "invalid_api_key", "authentication_error"));
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  // Errors httplib produces itself (no route, body too large, malformed request line) get OpenAI's shape.
  s.set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    const bool known = std::find(kPaths.begin(), kPaths.end(), req.path) != kPaths.end();
    if (res.status == 404 && known) res.status = 405;
    std::string msg = res.status == 404   ? "no such endpoint: " + req.path
                      : res.status == 405 ? req.method + " is not allowed on " + req.path
                      : res.status == 413 ? "request body too large"
                                          : "bad request (HTTP " + std::to_string(res.status) + ")";
    const std::string code = res.status == 404 ? "not_found" : res.status == 405 ? "method_not_allowed"
                             : res.status == 413 ? "body_too_large" : "";
    send_error(res, ApiError(res.status, msg, "", code, status_type(res.status)));
    return httplib::Server::HandlerResponse::Handled;
  }));
  s.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    send_error(res, ApiError(500, "internal error: " + what, "", "internal_error", "server_error"));
  });
  // httplib calls the logger after it has written the response, on the thread that ran the handler.
  s.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    in_flight_ -= t_unwritten;
    t_unwritten = 0;
    const bool known = std::find(kPaths.begin(), kPaths.end(), req.path) != kPaths.end();
    std::lock_guard<std::mutex> lock(counters_->mu);
    ++counters_->requests[{known ? req.path : "other", res.status}];
  });

  s.Get("/", [](const httplib::Request&, httplib::Response& res) { res.set_content(kWebPage, "text/html; charset=utf-8"); });
  s.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (draining_) {
      res.status = 503;
      res.set_content(R"({"status":"draining"})", kJson);
    } else {
      res.set_content(R"({"status":"ok"})", kJson);
    }
  });
  s.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_text(), "text/plain; version=0.0.4; charset=utf-8");
  });
  s.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    static const int64_t created = unix_now();
    const json j = {{"object", "list"},
                    {"data", json::array({{{"id", opt_.model_id}, {"object", "model"}, {"created", created},
                                           {"owned_by", "blip2"}}})}};
    res.set_content(dump(j), kJson);
  });
  // The body is read here rather than by httplib, whose limit counts the bytes received: a gzip or brotli body
  // inflated past it, and a chunked one was not counted at all. These are counted after decoding, as they
  // arrive, so no more than the limit is ever held.
  s.Post("/v1/chat/completions",
         [this](const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& read) {
           std::string body;
           if (read_body(req, res, read, body)) chat(req, body, res);
         });
  s.Post("/v1/embeddings", [this](const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& read) {
    std::string body;
    if (read_body(req, res, read, body)) retrieval(req, body, res, &RetrievalApi::embeddings);
  });
  s.Post("/v1/match", [this](const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& read) {
    std::string body;
    if (read_body(req, res, read, body)) retrieval(req, body, res, &RetrievalApi::match);
  });
}

// The body is read here rather than by httplib, whose limit counts the bytes received: a gzip or brotli body
// inflated past it, and a chunked one was not counted at all. These are counted after decoding, as they
// arrive, so no more than the limit is ever held.
bool HttpServer::read_body(const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& read,
                           std::string& body) const {
  bool over = false;
  const bool ok = read([&](const char* data, size_t n) {
    if (body.size() + n > opt_.limits.max_body_bytes) {
      over = true;
      return false;
    }
    body.append(data, n);
    return true;
  });
  // (a Content-Length over the limit: httplib refuses to read before any byte is counted)
  const std::string length = req.get_header_value("Content-Length");
  over = over || (!ok && !length.empty() && std::strtoull(length.c_str(), nullptr, 10) > opt_.limits.max_body_bytes);
  if (ok && !over) return true;
  res.set_header("Connection", "close");  // the rest of the body is not read
  send_error(res, over ? ApiError(413, "request body too large (the limit is " + size_str(opt_.limits.max_body_bytes) +
                                           ", counted decompressed)",
                                  "", "body_too_large")
                       : ApiError(400, "the request body could not be read (cut short, or a bad chunked, "
                                       "gzip or brotli encoding)", "", "invalid_body"));
  return false;
}

void HttpServer::retrieval(const httplib::Request& req, const std::string& body, httplib::Response& res,
                           json (RetrievalApi::*answer)(const std::string&)) {
  ++in_flight_;
  struct Leave {  // the request leaves in_flight_ once its response is written (t_unwritten)
    ~Leave() { ++t_unwritten; }
  } leave;
  try {
    if (!retrieval_api_)
      throw ApiError(400, task_description(Blip2Task::Generation) + ": use /v1/chat/completions", "",
                     "unsupported_endpoint");
    const std::string ct = req.get_header_value("Content-Type");
    if (ct.rfind("application/json", 0) != 0)
      throw ApiError(415, "Content-Type must be application/json (got '" + ct + "')", "", "unsupported_media_type");
    if (draining_) throw ApiError(503, "the server is shutting down", "", "shutting_down", "server_error");
    res.set_content(dump(((*retrieval_api_).*answer)(body)), kJson);
  } catch (const ApiError& e) {
    send_error(res, e);
  }
}

// OPT's positions are a learned table: the image's query tokens, the prompt and every generated token but
// the last take one each. A request that would run past it is refused here rather than failing mid-batch.
void HttpServer::check_positions(const Job& job) const {
  const Blip2Config& c = model_->config();
  if (c.family != LanguageFamily::OPT) return;  // T5's relative positions have no end
  const int64_t room = int64_t(c.opt.max_position_embeddings) + 1 - c.num_query_tokens - job.prompt_tokens;
  if (job.options.max_new_tokens > room)
    throw ApiError(400, "'max_tokens' (" + std::to_string(job.options.max_new_tokens) + ") does not fit: the model has " +
                            std::to_string(c.opt.max_position_embeddings) + " positions, the image takes " +
                            std::to_string(c.num_query_tokens) + " and the prompt " +
                            std::to_string(job.prompt_tokens) + ", which leaves room for " +
                            std::to_string(std::max<int64_t>(room, 0)) + " tokens",
                   "max_tokens", "context_length_exceeded");
}

void HttpServer::chat(const httplib::Request& req, const std::string& body, httplib::Response& res) {
  ++in_flight_;
  struct Leave {  // the request leaves in_flight_ once its response is written (t_unwritten; a stream: when
                  // the content provider's releaser runs)
    bool owes = true;
    ~Leave() {
      if (owes) ++t_unwritten;
    }
  } leave;
  std::shared_ptr<Job> job;
  ChatRequest cr;
  try {
    if (!model_)
      throw ApiError(400, task_description(Blip2Task::Retrieval), "", "unsupported_endpoint");
    const std::string ct = req.get_header_value("Content-Type");
    if (ct.rfind("application/json", 0) != 0)
      throw ApiError(415, "Content-Type must be application/json (got '" + ct + "')", "", "unsupported_media_type");
    if (draining_) throw ApiError(503, "the server is shutting down", "", "shutting_down", "server_error");
    cr = parse_chat_request(body, defaults_, opt_.limits);
    job = std::make_shared<Job>();
    job->options = cr.options;
    // The prompt before the image: a question that is too long is refused before any image work.
    const int64_t max_prompt = opt_.limits.max_prompt_tokens > 0
                                   ? std::min(opt_.limits.max_prompt_tokens, model_->max_prompt_tokens())
                                   : model_->max_prompt_tokens();
    const auto count = [&](const std::string& p) { return count_prompt_tokens(model_->tokenizer(), p, max_prompt); };
    job->prompt = conversation_prompt(cr, max_prompt, count);
    job->prompt_tokens = count(job->prompt);
    check_positions(*job);

    Scheduler::Place place = scheduler_->reserve();  // before the image's bytes and pixels take memory
    const std::string bytes = fetch_image(cr.image_url, opt_.limits);
    job->deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                       std::chrono::duration<double>(opt_.scheduler.request_timeout_s));
    job->image_key = sha256_hex(bytes);
    job->image = scheduler_->cache().get(job->image_key);
    job->cache_hit = job->image != nullptr;
    if (!job->image) {
      try {
        const RgbImage img = decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "image",
                                          opt_.limits.max_image_pixels);
        job->pixels = preprocess_images({img}, model_->config().vision.image_size);
      } catch (const Error& e) {
        throw ApiError(422, std::string("cannot use the image: ") + e.what(), "image_url", "invalid_image");
      }
    }
    scheduler_->submit(job, std::move(place));
  } catch (const ApiError& e) {
    send_error(res, e);
    return;
  }

  const std::string id = completion_id(), model_id = opt_.model_id;
  const int64_t created = unix_now();
  const int n = job->options.num_return_sequences;
  res.set_header("X-Image-Cache", job->cache_hit ? "hit" : "miss");
  const auto usage = [job] {
    int64_t completion = 0;
    for (const auto& c : job->choices) completion += c.tokens;
    return json{{"prompt_tokens", job->prompt_tokens},
                {"completion_tokens", completion},
                {"total_tokens", job->prompt_tokens + completion}};
  };

  if (!cr.stream) {
    const int fd = connection_fd(req);
    std::vector<Job::Event> events;
    while (true) {
      job->wait(events, std::chrono::milliseconds(50));
      const bool done = !events.empty() && events.back().kind != Job::Event::Text;
      if (done) break;
      events.clear();
      if (peer_closed(fd)) job->cancelled = true;  // the scheduler ends it at its next step
    }
    if (events.back().kind == Job::Event::Failed) {
      send_error(res, *job->error);
      return;
    }
    json choices = json::array();
    for (int i = 0; i < n; ++i)
      choices.push_back({{"index", i},
                         {"message", {{"role", "assistant"}, {"content", job->choices[i].text}}},
                         {"logprobs", nullptr},
                         {"finish_reason", job->choices[i].finish_reason}});
    res.set_content(dump({{"id", id}, {"object", "chat.completion"}, {"created", created}, {"model", model_id},
                          {"choices", choices}, {"usage", usage()}}),
                    kJson);
    return;
  }

  // Server-sent events in OpenAI's chunk format, ending with "data: [DONE]".
  leave.owes = false;  // the releaser below takes over
  const bool include_usage = cr.include_usage;
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, job, id, model_id, created, n, include_usage, usage](size_t, httplib::DataSink& sink) {
        const auto chunk = [&](json choices, const json& extra = nullptr) {
          json j = {{"id", id}, {"object", "chat.completion.chunk"}, {"created", created}, {"model", model_id},
                    {"choices", std::move(choices)}};
          if (!extra.is_null()) j["usage"] = extra;
          const std::string s = "data: " + dump(j) + "\n\n";
          return sink.write(s.data(), s.size());
        };
        const auto delta = [](int i, json d, const json& finish = nullptr) {
          return json::array({{{"index", i}, {"delta", std::move(d)}, {"logprobs", nullptr}, {"finish_reason", finish}}});
        };
        for (int i = 0; i < n; ++i)
          if (!chunk(delta(i, {{"role", "assistant"}, {"content", ""}}))) return false;
        std::vector<Job::Event> events;
        while (true) {
          events.clear();
          job->wait(events, std::chrono::milliseconds(50));
          for (const auto& e : events) {
            if (e.kind == Job::Event::Text) {
              if (!chunk(delta(e.index, {{"content", e.text}}))) return false;
              continue;
            }
            if (e.kind == Job::Event::Done) {
              for (int i = 0; i < n; ++i)
                if (!chunk(delta(i, json::object(), job->choices[i].finish_reason))) return false;
              if (include_usage && !chunk(json::array(), usage())) return false;
            } else {
              const std::string s = "data: " + dump(job->error->to_json()) + "\n\n";
              if (!sink.write(s.data(), s.size())) return false;
            }
            const std::string end = "data: [DONE]\n\n";
            if (!sink.write(end.data(), end.size())) return false;
            sink.done();
            return true;
          }
          if (!sink.is_writable()) return false;
        }
      },
      [this, job](bool success) {
        if (!success) job->cancelled = true;
        --in_flight_;
      });
}

std::string HttpServer::metrics_text() const {
  SchedulerStats s;
  if (scheduler_) s = scheduler_->stats();
  else s.cache = retrieval_api_->cache().stats();  // a retrieval server: its requests and its image cache
  std::ostringstream o;
  const auto metric = [&](const char* name, const char* type, const char* help, auto value) {
    o << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n" << name << " " << value << "\n";
  };
  o << "# HELP blip2_http_requests_total HTTP requests answered, by path and status code.\n"
       "# TYPE blip2_http_requests_total counter\n";
  {
    std::lock_guard<std::mutex> lock(counters_->mu);
    for (const auto& [k, v] : counters_->requests)
      o << "blip2_http_requests_total{path=\"" << k.first << "\",code=\"" << k.second << "\"} " << v << "\n";
  }
  metric("blip2_queue_length", "gauge", "Chat requests waiting to start.", s.queued);
  metric("blip2_running_requests", "gauge", "Chat requests being decoded.", s.running_requests);
  metric("blip2_running_rows", "gauge", "Decoder rows in the running batch.", s.running_rows);
  metric("blip2_requests_admitted_total", "counter", "Chat requests that started decoding.", s.admitted);
  metric("blip2_requests_completed_total", "counter", "Chat requests answered.", s.completed);
  metric("blip2_requests_failed_total", "counter", "Chat requests that failed inside the engine.", s.failed);
  metric("blip2_requests_cancelled_total", "counter", "Chat requests whose client went away.", s.cancelled);
  metric("blip2_requests_timed_out_total", "counter", "Chat requests that ran out of time.", s.timed_out);
  metric("blip2_requests_rejected_total", "counter", "Chat requests refused with 503 (queue full, draining).", s.rejected);
  metric("blip2_header_timeouts_total", "counter", "Connections closed because a request's headers did not arrive in time.",
         http_->header_timeouts());
  metric("blip2_generated_tokens_total", "counter", "Tokens generated, over all choices.", s.generated_tokens);
  metric("blip2_tokens_per_second", "gauge", "Tokens generated per second over the last 10 seconds.", s.tokens_per_second);
  metric("blip2_decoder_steps_total", "counter", "Decoder steps run (each over the whole running batch).", s.decoder_steps);
  metric("blip2_images_encoded_total", "counter", "Images run through the vision encoder and Q-Former.", s.images_encoded);
  metric("blip2_image_cache_hits_total", "counter", "Image encodings found in the cache.", s.cache.hits);
  metric("blip2_image_cache_misses_total", "counter", "Image encodings not in the cache.", s.cache.misses);
  metric("blip2_image_cache_evictions_total", "counter", "Image encodings dropped to stay within the budget.", s.cache.evictions);
  metric("blip2_image_cache_entries", "gauge", "Image encodings in the cache.", s.cache.entries);
  metric("blip2_image_cache_bytes", "gauge", "Bytes held by the image cache.", s.cache.bytes);
  metric("blip2_decode_seconds_total", "counter", "Time spent in decoder steps.", s.decode_seconds);
  metric("blip2_vision_seconds_total", "counter", "Time spent encoding images.", s.vision_seconds);
  metric("blip2_prompt_seconds_total", "counter", "Time spent in the prompt stage (T5 encoder).", s.prompt_seconds);
  const auto histogram = [&](const char* name, const char* help, const std::vector<int64_t>& h, int64_t sum) {
    o << "# HELP " << name << " " << help << "\n# TYPE " << name << " histogram\n";
    int64_t acc = 0;
    for (size_t i = 0; i < h.size(); ++i) {
      acc += h[i];
      o << name << "_bucket{le=\"" << (i < kBatchBuckets.size() ? std::to_string(kBatchBuckets[i]) : "+Inf")
        << "\"} " << acc << "\n";
    }
    o << name << "_sum " << sum << "\n" << name << "_count " << acc << "\n";
  };
  histogram("blip2_batch_rows", "Decoder rows per decoder step.", s.batch_rows_hist, s.batch_rows_sum);
  histogram("blip2_vision_batch_images", "Images per vision encoder pass.", s.vision_batch_hist, s.vision_batch_sum);
  return o.str();
}

}  // namespace blip2::server
