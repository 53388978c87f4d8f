// The C interface (include/blip2.h) over the C++ library: converts parameters, catches every exception at
// the boundary and hands it back as a status and a message.
#include "blip2.h"

#include <cstdlib>
#include <cstring>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "core/error.h"
#include "generate/generate.h"
#include "image/image.h"
#include "model/blip2.h"
#include "model/retrieval.h"
#include "text/text_stream.h"

// One checkpoint: a captioning one (`model`) or an image–text retrieval one (`retrieval`), as its config says.
struct blip2_model {
  std::string dir;
  std::unique_ptr<blip2::Blip2Model> model;
  std::unique_ptr<blip2::RetrievalModel> retrieval;
  std::mutex busy;  // one call at a time per model
  // The thread inside a call (holding `busy`): a text callback that calls back into the same model would wait
  // on `busy` for ever; it gets an error instead.
  std::atomic<std::thread::id> caller{};
};

namespace {

char* copy_string(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

// Runs `body`, turning any exception into a status and *error.
template <class F>
blip2_status guarded(char** error, F&& body) {
  if (error) *error = nullptr;
  try {
    body();
    return BLIP2_OK;
  } catch (const blip2::Error& e) {
    if (error) *error = copy_string(e.what());
    return static_cast<blip2_status>(e.kind());
  } catch (const std::bad_alloc&) {
    if (error) *error = copy_string("out of memory");
  } catch (const std::exception& e) {
    if (error) *error = copy_string(e.what());
  }
  return BLIP2_ERROR_INTERNAL;
}

void usage_unless(bool ok, const std::string& what) {
  if (!ok) blip2::fail(blip2::ErrorKind::Usage, what);
}

// Holds the model for one call: calls on one model serialize, and a call from inside this model's own text
// callback fails at once instead of waiting for itself.
class Call {
 public:
  Call(blip2_model* m, const std::string& fn) : m_(m) {
    usage_unless(m != nullptr, fn + ": model is NULL");
    usage_unless(m->caller != std::this_thread::get_id(),
                 fn + ": called from this model's own text callback (a callback must not call back into the model "
                      "that is calling it)");
    lock_ = std::unique_lock<std::mutex>(m->busy);
    m->caller = std::this_thread::get_id();
  }
  ~Call() { m_->caller = std::thread::id(); }  // before the lock is released
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;

 private:
  blip2_model* m_;
  std::unique_lock<std::mutex> lock_;
};

const blip2::RetrievalModel& retrieval_of(const blip2_model* m, const std::string& fn) {
  usage_unless(m->retrieval != nullptr,
               fn + ": " + m->dir + " is a captioning checkpoint (use blip2_generate); matching and embeddings need "
                    "an image-text retrieval checkpoint (Blip2ForImageTextRetrieval, e.g. Salesforce/blip2-itm-vit-g)");
  return *m->retrieval;
}

// One image given as file bytes, as the vision encoder's input [1, 3, size, size].
blip2::Tensor pixels_of(const uint8_t* image, size_t image_size, int size, const std::string& fn) {
  usage_unless(image != nullptr || image_size == 0, fn + ": image is NULL");
  return blip2::preprocess_images({blip2::decode_image(image, image_size, "image")}, size);
}

blip2::Tensor encode_vision(const blip2::RetrievalModel& m, const uint8_t* image, size_t image_size,
                            const std::string& fn) {
  return m.encode_vision(pixels_of(image, image_size, m.config().vision.image_size, fn));
}

// Checked before any work: `out` must take `need` floats.
void check_out(const float* out, size_t capacity, size_t need, const std::string& fn) {
  usage_unless(out != nullptr, fn + ": out is NULL");
  usage_unless(capacity >= need, fn + ": out holds " + std::to_string(capacity) + " floats; the embeddings need " +
                                     std::to_string(need));
}

void copy_out(const blip2::Tensor& t, float* out, size_t need) {
  if (static_cast<size_t>(t.size()) != need) blip2::fail(blip2::ErrorKind::Internal, "embedding size mismatch");
  std::memcpy(out, t.ptr(), need * sizeof(float));
}

blip2_generate_params to_c(const blip2::GenerationOptions& o) {
  blip2_generate_params p;
  p.max_new_tokens = o.max_new_tokens;
  p.min_new_tokens = o.min_new_tokens;
  p.num_beams = o.num_beams;
  p.length_penalty = static_cast<float>(o.length_penalty);
  p.early_stopping = static_cast<int>(o.early_stopping);
  p.repetition_penalty = static_cast<float>(o.repetition_penalty);
  p.no_repeat_ngram_size = o.no_repeat_ngram_size;
  p.do_sample = o.do_sample ? 1 : 0;
  p.temperature = static_cast<float>(o.temperature);
  p.top_k = o.top_k;
  p.top_p = static_cast<float>(o.top_p);
  p.has_seed = o.seed ? 1 : 0;
  p.seed = o.seed.value_or(0);
  return p;
}

blip2::GenerationOptions from_c(const blip2_generate_params& p, blip2::GenerationOptions o) {
  o.max_new_tokens = p.max_new_tokens;
  o.min_new_tokens = p.min_new_tokens;
  o.num_beams = p.num_beams;
  o.length_penalty = p.length_penalty;
  usage_unless(p.early_stopping >= 0 && p.early_stopping <= 2, "early_stopping must be 0, 1 or 2");
  o.early_stopping = static_cast<blip2::EarlyStopping>(p.early_stopping);
  o.repetition_penalty = p.repetition_penalty;
  o.no_repeat_ngram_size = p.no_repeat_ngram_size;
  o.do_sample = p.do_sample != 0;
  o.temperature = p.temperature;
  o.top_k = p.top_k;
  o.top_p = p.top_p;
  o.seed = p.has_seed ? std::optional<uint64_t>(p.seed) : std::nullopt;
  return o;
}

}  // namespace

extern "C" {

blip2_load_params blip2_load_default_params(void) {
  return {"stored", nullptr, blip2::kDefaultInt4Group, 0, nullptr, nullptr, nullptr, nullptr};
}

blip2_status blip2_model_load(const char* model_dir, const blip2_load_params* params, blip2_model** model,
                              char** error) {
  if (model) *model = nullptr;
  return guarded(error, [&] {
    usage_unless(model_dir != nullptr, "blip2_model_load: model_dir is NULL");
    usage_unless(model != nullptr, "blip2_model_load: model is NULL");
    const blip2_load_params p = params ? *params : blip2_load_default_params();
    blip2::LoadOptions lo;
    lo.weights = blip2::parse_weight_format(p.weights ? p.weights : "stored");
    if (p.vision_weights) lo.vision_weights = blip2::parse_weight_format(p.vision_weights);
    if (p.qformer_weights) lo.qformer_weights = blip2::parse_weight_format(p.qformer_weights);
    if (p.lm_weights) lo.lm_weights = blip2::parse_weight_format(p.lm_weights);
    if (p.precision) lo.precision = p.precision;
    lo.int4_group = p.int4_group;
    lo.threads = p.threads;
    if (p.device) lo.device = blip2::parse_device(p.device);
    usage_unless(p.threads >= 0, "blip2_model_load: threads must be 0 (all cores) or positive");
    auto h = std::make_unique<blip2_model>();
    h->dir = model_dir;
    if (blip2::load_config(model_dir).task == blip2::Blip2Task::Retrieval)
      h->retrieval = std::make_unique<blip2::RetrievalModel>(model_dir, lo);
    else
      h->model = std::make_unique<blip2::Blip2Model>(model_dir, lo);
    *model = h.release();
  });
}

void blip2_model_free(blip2_model* model) { delete model; }

blip2_generate_params blip2_generate_default_params(const blip2_model* model) {
  blip2::GenerationOptions o;
  if (model) {
    try {
      o = blip2::generation_defaults(model->dir);
    } catch (...) {  // the file was readable at load; if it changed since, Hugging Face's defaults stand
    }
  }
  return to_c(o);
}

blip2_status blip2_generate_stream(blip2_model* model, const uint8_t* image, size_t image_size, const char* prompt,
                                   const blip2_generate_params* params, blip2_text_callback on_text, void* user_data,
                                   char** text, char** error) {
  if (text) *text = nullptr;
  return guarded(error, [&] {
    const Call call(model, "blip2_generate");
    usage_unless(image != nullptr || image_size == 0, "blip2_generate: image is NULL");
    usage_unless(text != nullptr, "blip2_generate: text is NULL");
    usage_unless(model->model != nullptr, "blip2_generate: " + model->dir +
                                              " is an image-text retrieval checkpoint (Blip2ForImageTextRetrieval): "
                                              "use blip2_match, blip2_embed_image or blip2_embed_text");
    const blip2::Blip2Model& m = *model->model;
    const blip2::GenerationOptions defaults = blip2::generation_defaults(model->dir);
    const blip2::GenerationOptions o = params ? from_c(*params, defaults) : defaults;
    blip2::validate(o);
    const blip2::Tensor pixels = pixels_of(image, image_size, m.config().vision.image_size, "blip2_generate");
    const blip2::Encoded enc = m.encode(pixels, m.tokenize({prompt ? prompt : ""}));
    // Streams the first sequence (the one returned) when each chosen token is final: not in beam search.
    blip2::TextStream stream(m.tokenizer());
    const auto emit = [&](const std::string& piece) {
      if (on_text && !piece.empty()) on_text(piece.c_str(), user_data);
    };
    blip2::TokenCallback on_token;
    if (on_text && o.num_beams == 1)
      on_token = [&](int row, int32_t token) {
        if (row == 0) emit(stream.put(token));
      };
    const auto results =
        blip2::generate([&](int expand) { return m.start_decoder(enc, expand); }, 1, o, m.special_tokens(), on_token);
    emit(stream.end(results[0][0].ids));
    char* out = copy_string(m.tokenizer().decode(results[0][0].ids));
    if (!out) throw std::bad_alloc();
    *text = out;
  });
}

blip2_status blip2_generate(blip2_model* model, const uint8_t* image, size_t image_size, const char* prompt,
                            const blip2_generate_params* params, char** text, char** error) {
  return blip2_generate_stream(model, image, image_size, prompt, params, nullptr, nullptr, text, error);
}

int blip2_embedding_size(const blip2_model* model) {
  return model && model->retrieval ? model->retrieval->embedding_size() : 0;
}

int blip2_image_embedding_count(const blip2_model* model) {
  return model && model->retrieval ? model->retrieval->config().num_query_tokens : 0;
}

blip2_status blip2_match(blip2_model* model, const uint8_t* image, size_t image_size, const char* text,
                         float* itm_probability, float* itc_similarity, char** error) {
  return guarded(error, [&] {
    const Call call(model, "blip2_match");
    const blip2::RetrievalModel& m = retrieval_of(model, "blip2_match");
    usage_unless(text != nullptr, "blip2_match: text is NULL");
    const blip2::Tensor vision = encode_vision(m, image, image_size, "blip2_match");
    const blip2::TokenBatch tokens = m.tokenize({text});
    // Both computed before either output is written: a failure leaves the caller's floats alone.
    const float itm = itm_probability ? m.match(vision, tokens).itm_probability.at(0) : 0.0f;
    const float itc =
        itc_similarity ? blip2::RetrievalModel::similarity(m.image_embeds(vision), m.text_embeds(tokens).text_embeds).ptr()[0]
                       : 0.0f;
    if (itm_probability) *itm_probability = itm;
    if (itc_similarity) *itc_similarity = itc;
  });
}

blip2_status blip2_embed_image(blip2_model* model, const uint8_t* image, size_t image_size, float* out,
                               size_t capacity, char** error) {
  return guarded(error, [&] {
    const Call call(model, "blip2_embed_image");
    const blip2::RetrievalModel& m = retrieval_of(model, "blip2_embed_image");
    const size_t need = static_cast<size_t>(m.config().num_query_tokens) * static_cast<size_t>(m.embedding_size());
    check_out(out, capacity, need, "blip2_embed_image");
    copy_out(m.image_embeds(encode_vision(m, image, image_size, "blip2_embed_image")), out, need);
  });
}

blip2_status blip2_embed_text(blip2_model* model, const char* text, float* out, size_t capacity, char** error) {
  return guarded(error, [&] {
    const Call call(model, "blip2_embed_text");
    const blip2::RetrievalModel& m = retrieval_of(model, "blip2_embed_text");
    usage_unless(text != nullptr, "blip2_embed_text: text is NULL");
    const size_t need = static_cast<size_t>(m.embedding_size());
    check_out(out, capacity, need, "blip2_embed_text");
    copy_out(m.text_embeds(m.tokenize({text})).text_embeds, out, need);
  });
}

void blip2_string_free(char* s) { std::free(s); }

}  // extern "C"
