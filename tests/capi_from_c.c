/* The C interface used from a C translation unit (compiled as C11): proves the header is C and links. */
#include <stddef.h>

#include "blip2.h"

/* Loads `model_dir` with float16 weights and captions `image`; returns the status, *text the caption. */
int caption_from_c(const char* model_dir, const unsigned char* image, size_t size, char** text, char** error) {
  blip2_load_params lp = blip2_load_default_params();
  lp.weights = "f16";
  blip2_model* m = NULL;
  blip2_status s = blip2_model_load(model_dir, &lp, &m, error);
  if (s != BLIP2_OK) return (int)s;
  blip2_generate_params gp = blip2_generate_default_params(m);
  gp.max_new_tokens = 12;
  s = blip2_generate(m, image, size, "", &gp, text, error);
  blip2_model_free(m);
  return (int)s;
}
