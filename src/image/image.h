// Images: decoding (libpng, libjpeg-turbo), conversion to RGB as Pillow's convert("RGB") does it,
// Pillow's BICUBIC resize reproduced bit-exactly, and the BLIP-2 normalisation.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace blip2 {

// 8-bit RGB, row-major, interleaved (height × width × 3).
struct RgbImage {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> pixels;
};

// Largest image accepted (width × height), against decompression bombs.
constexpr int64_t kMaxImagePixels = 178956970;  // Pillow's MAX_IMAGE_PIXELS × 2, its error threshold

// Decodes PNG, JPEG or WebP bytes (chosen by signature, not by file name) to RGB:
// grayscale replicated, palette expanded, alpha dropped without compositing (Pillow's convert("RGB")).
// `name` is used in error messages. Throws Error(Input) on anything that is not a complete, valid image, and on
// images of more than `max_pixels` (at most kMaxImagePixels), checked from the header before any decoding.
RgbImage decode_image(const uint8_t* data, size_t size, const std::string& name,
                      int64_t max_pixels = kMaxImagePixels);
RgbImage load_image(const std::string& path);

// Pillow's Image.resize((width, height), BICUBIC) for 8-bit RGB: antialiased Keys cubic (a = -0.5),
// 22-bit fixed point, horizontal pass first with a uint8 intermediate.
RgbImage resize_bicubic(const RgbImage& src, int width, int height);

// CLIP normalisation used by BLIP-2.
struct PixelNorm {
  float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
  float std[3] = {0.26862954f, 0.26130258f, 0.27577711f};
};

// Writes (u8/255 - mean[c]) / std[c] as planar CHW float32 into out[3*h*w].
void normalize_chw(const RgbImage& img, const PixelNorm& norm, float* out);

// The whole BLIP-2 image processor for a batch: resize each to size×size, normalise, stack [B,3,size,size].
Tensor preprocess_images(const std::vector<RgbImage>& images, int size, const PixelNorm& norm = {});

}  // namespace blip2
