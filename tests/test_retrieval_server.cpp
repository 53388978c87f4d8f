// The retrieval endpoints over real loopback sockets (127.0.0.1): /v1/embeddings for texts and images (data
// URIs) and /v1/match give the fixture's reference numbers, the image cache serves both, and bad requests or
// the wrong kind of checkpoint get a 4xx in OpenAI's error shape.
#include <gtest/gtest.h>
#include <signal.h>

#include <thread>

#include "generate/generate.h"
#include "io/safetensors.h"
#include "model/blip2.h"
#include "model/retrieval.h"
#include "server/http_server.h"
#include "server_client.h"

using namespace blip2;
using namespace blip2::server;
using namespace blip2::testing;

namespace {

const std::string kFixtures = BLIP2_FIXTURES_DIR;
const std::string kItm = kFixtures + "/tiny-blip2-itm";
const std::string kCat = kFixtures + "/images/chelsea.png";
const std::string kAstronaut = kFixtures + "/images/astronaut.png";

RetrievalModel& model() {
  static RetrievalModel m(kItm);
  return m;
}

struct RetrievalServer {
  std::unique_ptr<HttpServer> srv;
  std::thread thread;
  int port = 0;
  explicit RetrievalServer(ServerOptions o = {}) {
    signal(SIGPIPE, SIG_IGN);
    o.host = "127.0.0.1";
    o.port = 0;
    srv = std::make_unique<HttpServer>(model(), o);
    port = srv->bind();
    thread = std::thread([this] { srv->serve(); });
    srv->wait_until_listening();
  }
  ~RetrievalServer() {
    srv->shutdown();
    thread.join();
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(120, 0);
    return c;
  }
};

// Largest |got - want| / max|want| over a vector.
double rel_error(const json& got, const float* want, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = got[i].get<double>() - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

json flatten(const json& rows) {
  json out = json::array();
  for (const auto& r : rows) for (const auto& v : r) out.push_back(v);
  return out;
}

void expect_error(const Reply& r, int status, const std::string& part) {
  EXPECT_EQ(r.status, status) << r.body;
  const json j = r.json_body();
  ASSERT_TRUE(j.is_object() && j.contains("error")) << r.body;
  EXPECT_NE(j["error"]["message"].get<std::string>().find(part), std::string::npos) << r.body;
}

TEST(RetrievalServer, EmbeddingsOfTextsAndImagesAreTheReferences) {
  RetrievalServer s;
  auto c = s.client();
  const SafetensorsFile ref(kItm + "/reference.safetensors");
  const Tensor text_ref = ref.tensor("pair/text_embeds"), image_ref = ref.tensor("pair/image_embeds");
  const json body = {{"model", "blip2-itm"},
                     {"input", json::array({text_part("a cat lying on a blanket"), image_part(kCat),
                                            "an astronaut standing next to a rocket in the morning",
                                            image_part(kAstronaut)})}};
  const Reply r = post(c, body.dump(), "/v1/embeddings");
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = r.json_body();
  EXPECT_EQ(j["object"], "list");
  EXPECT_EQ(j["model"], "blip2");
  ASSERT_EQ(j["data"].size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(j["data"][i]["object"], "embedding");
    EXPECT_EQ(j["data"][i]["index"], i);
  }
  const int64_t E = 32, Q = 8;
  ASSERT_EQ(j["data"][0]["embedding"].size(), static_cast<size_t>(E));
  ASSERT_EQ(j["data"][1]["embedding"].size(), static_cast<size_t>(Q));
  EXPECT_LE(rel_error(j["data"][0]["embedding"], text_ref.ptr(), E), 1e-5);
  EXPECT_LE(rel_error(j["data"][2]["embedding"], text_ref.ptr() + E, E), 1e-5);
  EXPECT_LE(rel_error(flatten(j["data"][1]["embedding"]), image_ref.ptr(), Q * E), 1e-5);
  EXPECT_LE(rel_error(flatten(j["data"][3]["embedding"]), image_ref.ptr() + Q * E, Q * E), 1e-5);
  EXPECT_EQ(j["usage"]["prompt_tokens"], 14 + 12);
  // A plain string is one text.
  const Reply one = post(c, json{{"input", "a cup of coffee"}}.dump(), "/v1/embeddings");
  ASSERT_EQ(one.status, 200) << one.body;
  EXPECT_EQ(one.json_body()["data"].size(), 1u);
}

TEST(RetrievalServer, MatchGivesTheReferenceScoresAndSharesTheImageCache) {
  RetrievalServer s;
  auto c = s.client();
  const SafetensorsFile ref(kItm + "/reference.safetensors");
  const Tensor prob = ref.tensor("pair/itm_probability"), itc = ref.tensor("pair/itc_logits_per_image");
  const json body = {{"model", "blip2-itm"},
                     {"image_url", image_part(kCat)["image_url"]},
                     {"texts", {"a cat lying on a blanket", "an astronaut standing next to a rocket in the morning"}}};
  const Reply r = post(c, body.dump(), "/v1/match");
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = r.json_body();
  ASSERT_EQ(j["data"].size(), 2u);
  EXPECT_EQ(j["data"][0]["object"], "match");
  EXPECT_NEAR(j["data"][0]["itm_probability"].get<double>(), prob.ptr()[0], 1e-5);
  EXPECT_NEAR(j["data"][0]["itc_similarity"].get<double>(), itc.ptr()[0], 1e-5);
  EXPECT_NEAR(j["data"][1]["itc_similarity"].get<double>(), itc.ptr()[1], 1e-5);
  const int64_t before = model().image_encodings();
  // The same image again, through the other endpoint: the cache answers.
  const Reply e = post(c, json{{"input", json::array({image_part(kCat)})}}.dump(), "/v1/embeddings");
  ASSERT_EQ(e.status, 200) << e.body;
  EXPECT_EQ(model().image_encodings(), before);
  const Reply m = get(c, "/metrics");
  EXPECT_NE(m.body.find("blip2_image_cache_hits_total 1"), std::string::npos) << m.body;
}

TEST(RetrievalServer, BadRequestsGet4xxAndTheServerKeepsServing) {
  ServerOptions o;
  o.limits.max_inputs = 3;
  RetrievalServer s(o);
  auto c = s.client();
  expect_error(post(c, "{", "/v1/embeddings"), 400, "");
  expect_error(post(c, json{{"model", "x"}}.dump(), "/v1/embeddings"), 400, "'input' is required");
  expect_error(post(c, json{{"input", json::array()}}.dump(), "/v1/embeddings"), 400, "non-empty");
  expect_error(post(c, json{{"input", json::array({1, 2, 3})}}.dump(), "/v1/embeddings"), 400, "token id arrays");
  expect_error(post(c, json{{"input", "a"}, {"encoding_format", "base64"}}.dump(), "/v1/embeddings"), 400, "float");
  expect_error(post(c, json{{"input", {"a", "b", "c", "d"}}}.dump(), "/v1/embeddings"), 400, "at most 3");
  expect_error(post(c, json{{"input", json::array({image_part_bytes("not an image")})}}.dump(), "/v1/embeddings"), 400, "");
  std::string long_text;
  for (int i = 0; i < 600; ++i) long_text += "a ";
  expect_error(post(c, json{{"input", long_text}}.dump(), "/v1/embeddings"), 400, "too long");
  expect_error(post(c, json{{"texts", {"a"}}}.dump(), "/v1/match"), 400, "'image_url' is required");
  expect_error(post(c, json{{"image_url", image_part(kCat)["image_url"]}, {"texts", "a"}}.dump(), "/v1/match"), 400, "texts");
  expect_error(post(c, json{{"input", "a"}}.dump(), "/v1/embeddings", "text/plain"), 415, "Content-Type");
  // Chat completions need a captioning checkpoint.
  expect_error(post(c, json{{"messages", json::array()}}.dump()), 400, "retrieval");
  const Reply ok = post(c, json{{"input", "still serving"}}.dump(), "/v1/embeddings");
  EXPECT_EQ(ok.status, 200) << ok.body;
}

TEST(RetrievalServer, ACaptioningServerNamesWhatItServes) {
  signal(SIGPIPE, SIG_IGN);
  const Blip2Model m(BLIP2_TINY_T5_DIR);
  ServerOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  HttpServer srv(m, generation_defaults(BLIP2_TINY_T5_DIR), o);
  const int port = srv.bind();
  std::thread t([&] { srv.serve(); });
  srv.wait_until_listening();
  httplib::Client c("127.0.0.1", port);
  expect_error(post(c, json{{"input", "a"}}.dump(), "/v1/embeddings"), 400, "captioning");
  expect_error(post(c, json{{"texts", {"a"}}}.dump(), "/v1/match"), 400, "captioning");
  srv.shutdown();
  t.join();
}

}  // namespace
