// The C interface (include/blip2.h) over the C++ library: converts parameters, catches every exception at
// the boundary and hands it back as a status and a message.
#include "blip2.h"

#include <cstdlib>
#include <cstring>
#include <memory>
#include <atomic>
#include <mutex>
#include <string>
#include <thread>

#include "core/error.h"
#include "generate/generate.h"
#include "image/image.h"
#include "model/blip2.h"
#include "text/text_stream.h"

struct blip2_model {
  std::string dir;
  std::unique_ptr<blip2::Blip2Model> model;
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

void usage_unless(bool ok, const char* what) {
  if (!ok) blip2::fail(blip2::ErrorKind::Usage, what);
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
    usage_unless(model != nullptr, "blip2_generate: model is NULL");
    usage_unless(image != nullptr || image_size == 0, "blip2_generate: image is NULL");
    usage_unless(text != nullptr, "blip2_generate: text is NULL");
    usage_unless(model->caller != std::this_thread::get_id(),
                 "blip2_generate: called from this model's own text callback (a callback must not call back into "
                 "the model that is calling it)");
    std::lock_guard<std::mutex> lock(model->busy);
    struct Caller {
      std::atomic<std::thread::id>& id;
      ~Caller() { id = std::thread::id(); }
    } caller{model->caller};
    model->caller = std::this_thread::get_id();
    const blip2::Blip2Model& m = *model->model;
    const blip2::GenerationOptions defaults = blip2::generation_defaults(model->dir);
    const blip2::GenerationOptions o = params ? from_c(*params, defaults) : defaults;
    blip2::validate(o);
    const blip2::Tensor pixels =
        blip2::preprocess_images({blip2::decode_image(image, image_size, "image")}, m.config().vision.image_size);
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

void blip2_string_free(char* s) { std::free(s); }

}  // extern "C"
