/* blip2.h: the engine's C interface, for programs in any language that can call C.
 *
 * An opaque model handle, plain parameter structs with documented defaults, and one call that turns an
 * image (PNG or JPEG bytes) and a prompt into text. Everything the C++ library does is behind it: both
 * language-model families, every weight format, every decoding strategy. Errors come back as a status
 * (the CLI's exit codes) plus a message naming the file, tensor or option at fault; nothing throws and
 * nothing aborts.
 *
 *   blip2_model* m = NULL;
 *   char* err = NULL;
 *   if (blip2_model_load("blip2-flan-t5-xl", NULL, &m, &err) != BLIP2_OK) { puts(err); blip2_string_free(err); }
 *   blip2_generate_params p = blip2_generate_default_params(m);
 *   char* text = NULL;
 *   blip2_generate(m, jpeg, jpeg_size, "Question: what is this? Answer:", &p, &text, &err);
 *   puts(text);
 *   blip2_string_free(text);
 *   blip2_model_free(m);
 *
 * A model may be used from several threads, one call at a time per model (calls on one model serialize).
 *
 * Image–text retrieval checkpoints (Blip2ForImageTextRetrieval, e.g. Salesforce/blip2-itm-vit-g) load with
 * the same call and answer blip2_match, blip2_embed_image and blip2_embed_text (docs/RETRIEVAL.md); each kind
 * of checkpoint refuses the other kind's calls with BLIP2_ERROR_USAGE and a message saying what it can do.
 */
#ifndef BLIP2_H
#define BLIP2_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct blip2_model blip2_model;

/* The same numbers as the blip2 tool's exit status. */
typedef enum {
  BLIP2_OK = 0,
  BLIP2_ERROR_INTERNAL = 1,
  BLIP2_ERROR_USAGE = 2, /* bad parameters */
  BLIP2_ERROR_MODEL = 3, /* bad model directory: config, weights, tokenizer */
  BLIP2_ERROR_INPUT = 4  /* bad image or prompt */
} blip2_status;

typedef struct {
  const char* weights; /* linear-layer weights after loading: "stored" (the file's bytes, no copy; default),
                          "f32", "f16", "bf16", "int8" or "int4" */
  const char* vision_weights; /* the vision encoder's weights, same choices; NULL (default): as `weights`,
                                 except "int8" for "int4" (faster and more accurate for the ViT) */
  int int4_group;      /* int4: weights per scale, 32, 64 (default) or 128 */
  int threads;         /* worker threads for the whole process; 0 (default) = all cores */
  const char* qformer_weights; /* the Q-Former's (and language projection's) weights; NULL: as `weights` */
  const char* lm_weights;      /* the language model's weights; NULL: as `weights` */
  const char* precision;       /* NULL, or "lavis": ViT f16, Q-Former f32, language model bf16 (T5) or f16
                                  (OPT); the per-tower fields override it */
  const char* device;  /* where the model runs: "cpu" (NULL, the default), "cuda", "cuda:N" (a build with
                          CUDA; one GPU per process) or "emulated" (the device code path on the CPU, for tests) */
} blip2_load_params;

blip2_load_params blip2_load_default_params(void);

/* Loads a Hugging Face BLIP-2 checkpoint directory (Flan-T5 or OPT, as its config.json says). `params` may
 * be NULL (the defaults). On success *model is the handle; on failure it is NULL and *error (if error is not
 * NULL) a message to free with blip2_string_free. */
blip2_status blip2_model_load(const char* model_dir, const blip2_load_params* params, blip2_model** model,
                              char** error);
void blip2_model_free(blip2_model* model);

/* Decoding parameters, with Hugging Face's names and meanings. */
typedef struct {
  int max_new_tokens;        /* most tokens generated, end-of-sequence included */
  int min_new_tokens;        /* end-of-sequence suppressed until this many */
  int num_beams;             /* 1: greedy or sampling; more: beam search */
  float length_penalty;      /* beam search: score = sum_logprobs / length^length_penalty */
  int early_stopping;        /* beam search: 0 Hugging Face's heuristic (false), 1 as soon as num_beams
                                hypotheses end (true), 2 only when no beam can still win ("never") */
  float repetition_penalty;  /* > 1 discourages tokens already present; 1 = off */
  int no_repeat_ngram_size;  /* > 0: no n-gram of this size twice; 0 = off */
  int do_sample;             /* non-zero: sample instead of taking the most likely tokens */
  float temperature;         /* sampling: logits / temperature */
  int top_k;                 /* sampling: keep the k most likely tokens; 0 = off */
  float top_p;               /* sampling: keep the tokens holding this probability; 1 = off */
  int has_seed;              /* non-zero: `seed` makes sampling reproducible; 0: a random seed */
  uint64_t seed;
} blip2_generate_params;

/* The model's defaults: Hugging Face's, overridden by its generation_config.json (greedy, 20 new tokens
 * unless the checkpoint says otherwise). */
blip2_generate_params blip2_generate_default_params(const blip2_model* model);

/* Text for one image and one prompt ("" for a caption; "Question: ... Answer:" for a question). `image` holds
 * the bytes of a PNG or JPEG file. `params` may be NULL (the model's defaults). On success *text is the
 * generated text (UTF-8, special tokens dropped), to free with blip2_string_free. */
blip2_status blip2_generate(blip2_model* model, const uint8_t* image, size_t image_size, const char* prompt,
                            const blip2_generate_params* params, char** text, char** error);

/* The same, calling `on_text` with each new piece of text as it is decided (greedy and sampling; beam search
 * calls it once, with the whole text, at the end). The pieces joined equal *text.
 * The callback runs on the calling thread, inside the call: it must not call back into the same model. A
 * blip2_generate or blip2_generate_stream on that model from the callback returns BLIP2_ERROR_USAGE instead
 * of waiting for itself; blip2_model_free on it is undefined behaviour. Other models may be used. */
typedef void (*blip2_text_callback)(const char* piece, void* user_data);
blip2_status blip2_generate_stream(blip2_model* model, const uint8_t* image, size_t image_size, const char* prompt,
                                   const blip2_generate_params* params, blip2_text_callback on_text, void* user_data,
                                   char** text, char** error);

/* Retrieval checkpoints: the embedding width E (256 for blip2-itm-vit-g) and the number Q of embeddings an
 * image gives (one per query, 32); both 0 for a captioning checkpoint. */
int blip2_embedding_size(const blip2_model* model);
int blip2_image_embedding_count(const blip2_model* model);

/* One image (PNG or JPEG bytes) against one text. *itm_probability: the ITM head's probability that they
 * match (image and text through the Q-Former together). *itc_similarity: the ITC similarity, the largest
 * cosine between the image's Q embeddings and the text's. Either output may be NULL. */
blip2_status blip2_match(blip2_model* model, const uint8_t* image, size_t image_size, const char* text,
                         float* itm_probability, float* itc_similarity, char** error);

/* Unit-length embeddings into `out`, which holds `capacity` floats: an image gives Q rows of E (row-major,
 * Q·E floats), a text one row of E. Too small a `capacity` is BLIP2_ERROR_USAGE, and nothing is written. */
blip2_status blip2_embed_image(blip2_model* model, const uint8_t* image, size_t image_size, float* out,
                               size_t capacity, char** error);
blip2_status blip2_embed_text(blip2_model* model, const char* text, float* out, size_t capacity, char** error);

void blip2_string_free(char* s);

#ifdef __cplusplus
}
#endif

#endif /* BLIP2_H */
