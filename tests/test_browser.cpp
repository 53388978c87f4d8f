// The web page in headless Chromium (Debian's `chromium`), driven over the DevTools protocol on a pipe
// (--remote-debugging-pipe: NUL-separated JSON messages on fds 3 and 4). The page loads, accepts an image
// dropped on it, streams an answer equal to the engine's, and carries the conversation into a second question.
// Chromium must be installed (CI installs it): without it this test fails rather than skips.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <thread>

#include "generate/chat.h"
#include "generate/generate.h"
#include "image/image.h"
#include "model/blip2.h"
#include "server/http_server.h"
#include "server_client.h"

extern char** environ;

using namespace blip2;
using namespace blip2::server;
using namespace blip2::testing;
namespace fs = std::filesystem;

namespace {

const std::string kCat = std::string(BLIP2_FIXTURES_DIR) + "/images/chelsea.png";

std::string find_chromium() {
  if (const char* env = std::getenv("BLIP2_CHROMIUM"); env && *env) return env;
  for (const char* p : {"/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"})
    if (fs::exists(p)) return p;
  return "";
}

// A headless browser and one page of it, over the DevTools protocol.
class Browser {
 public:
  explicit Browser(const std::string& exe) : profile_(fs::temp_directory_path() / ("blip2-chromium-" + std::to_string(getpid()))) {
    int to_chrome[2], from_chrome[2];
    if (pipe(to_chrome) != 0 || pipe(from_chrome) != 0) throw std::runtime_error("pipe failed");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, to_chrome[0], 3);
    posix_spawn_file_actions_adddup2(&fa, from_chrome[1], 4);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    std::vector<std::string> args = {exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                     "--no-first-run", "--remote-debugging-pipe",
                                     "--user-data-dir=" + profile_.string(), "about:blank"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const int rc = posix_spawn(&pid_, exe.c_str(), &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    close(to_chrome[0]);
    close(from_chrome[1]);
    out_ = to_chrome[1];
    in_ = from_chrome[0];
    if (rc != 0) throw std::runtime_error("cannot start " + exe);
  }
  ~Browser() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    close(out_);
    close(in_);
    std::error_code ec;
    fs::remove_all(profile_, ec);
  }

  // Sends a command and returns its result (throws on a protocol error or after 60 s).
  json call(const std::string& method, json params = json::object(), const std::string& session = "") {
    const int id = next_id_++;
    json msg = {{"id", id}, {"method", method}, {"params", std::move(params)}};
    if (!session.empty()) msg["sessionId"] = session;
    const std::string s = msg.dump() + '\0';
    for (size_t done = 0; done < s.size();) {
      const ssize_t n = write(out_, s.data() + done, s.size() - done);
      if (n <= 0) throw std::runtime_error("write to chromium failed");
      done += static_cast<size_t>(n);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (true) {
      const size_t end = buf_.find('\0');
      if (end != std::string::npos) {
        const json reply = json::parse(buf_.substr(0, end));
        buf_.erase(0, end + 1);
        if (reply.contains("id") && reply["id"] == id) {
          if (reply.contains("error")) throw std::runtime_error(method + ": " + reply["error"].dump());
          return reply["result"];
        }
        continue;  // an event
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) throw std::runtime_error(method + ": no reply from chromium");
      pollfd p{in_, POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char chunk[65536];
      const ssize_t n = read(in_, chunk, sizeof chunk);
      if (n <= 0) throw std::runtime_error("chromium closed the pipe");
      buf_.append(chunk, static_cast<size_t>(n));
    }
  }

  // Opens `url` in a new page and attaches to it.
  void open(const std::string& url) {
    const std::string target = call("Target.createTarget", {{"url", url}})["targetId"];
    session_ = call("Target.attachToTarget", {{"targetId", target}, {"flatten", true}})["sessionId"];
  }
  // Evaluates JavaScript in the page (awaiting a promise) and returns its value.
  json eval(const std::string& expr) {
    const json r = call("Runtime.evaluate", {{"expression", expr}, {"awaitPromise", true}, {"returnByValue", true}}, session_);
    if (r.contains("exceptionDetails")) throw std::runtime_error("page script failed: " + r["exceptionDetails"].dump());
    return r["result"].contains("value") ? r["result"]["value"] : json();
  }
  // Polls `expr` until it is true (60 s at most).
  bool wait_for(const std::string& expr) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < deadline) {
      if (eval(expr) == true) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

 private:
  fs::path profile_;
  pid_t pid_ = -1;
  int out_ = -1, in_ = -1, next_id_ = 1;
  std::string buf_, session_;
};

std::string reference(Blip2Model& m, const std::string& prompt, int max_new_tokens) {
  const Encoded e = m.encode(preprocess_images({load_image(kCat)}, 224), m.tokenize({prompt}));
  GenerationOptions o;
  o.max_new_tokens = max_new_tokens;
  const auto out = generate([&](int expand) { return m.start_decoder(e, expand); }, 1, o, SpecialTokens{});
  return m.tokenizer().decode(out[0][0].ids);
}

TEST(Browser, PageTakesADroppedImageAndStreamsAnswers) {
  const std::string exe = find_chromium();
  ASSERT_FALSE(exe.empty()) << "chromium is not installed (apt-get install chromium; scripts/install-deps.sh does)";
  signal(SIGPIPE, SIG_IGN);
  Blip2Model model(BLIP2_TINY_T5_DIR);
  ServerOptions so;
  so.port = 0;
  HttpServer server(model, generation_defaults(BLIP2_TINY_T5_DIR), so);
  const int port = server.bind();
  std::thread serving([&] { server.serve(); });
  server.wait_until_listening();
  {
    Browser b(exe);
    b.open("http://127.0.0.1:" + std::to_string(port) + "/");
    ASSERT_TRUE(b.wait_for("document.readyState === 'complete' && !!document.getElementById('drop')"));
    EXPECT_EQ(b.eval("document.title"), "BLIP-2");
    EXPECT_EQ(b.eval("document.getElementById('send').disabled"), true) << "nothing to ask about yet";

    // Drop the image, as a person dragging a file onto the drop zone.
    const std::string b64 = base64_encode(slurp(kCat));
    b.eval("(() => { const bytes = Uint8Array.from(atob('" + b64 + "'), c => c.charCodeAt(0));"
           "const file = new File([bytes], 'chelsea.png', {type: 'image/png'});"
           "const dt = new DataTransfer(); dt.items.add(file);"
           "document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));"
           "return true; })()");
    ASSERT_TRUE(b.wait_for("!document.getElementById('send').disabled && !!document.querySelector('#drop img')"));

    const auto ask = [&](const std::string& q, int n) {
      b.eval("(() => { document.getElementById('question').value = " + json(q).dump() +
             "; document.getElementById('send').click(); return true; })()");
      const std::string sel = "document.querySelectorAll('.turn.answer, .turn.error')[" + std::to_string(n) + "]";
      EXPECT_TRUE(b.wait_for("!!" + sel + " && " + sel + ".dataset.state !== 'streaming'"));
      EXPECT_EQ(b.eval(sel + ".dataset.state"), "done") << b.eval(sel + ".textContent");
      return b.eval(sel + ".textContent").get<std::string>();
    };
    const std::string a1 = ask("what is this?", 0);
    EXPECT_EQ(a1, reference(model, "Question: what is this? Answer:", 30));
    const std::string a2 = ask("is it big?", 1);
    EXPECT_EQ(a2, reference(model, chat_prompt({{"what is this?", a1}}, "is it big?"), 30));
    EXPECT_EQ(b.eval("document.querySelectorAll('.turn.question').length"), 2);
  }
  const SchedulerStats s = server.scheduler().stats();
  EXPECT_EQ(s.completed, 2);
  EXPECT_EQ(s.cache.hits, 1) << "the second question reused the image encoding";
  server.shutdown();
  serving.join();
}

}  // namespace
