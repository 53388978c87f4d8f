// WebP decoding through libwebp, as Pillow does it (its WebP plugin decodes through libwebp's WebPAnimDecoder,
// which runs WebPDecode with its default options into RGBA; convert("RGB") then drops the alpha).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "image/image.h"

namespace blip2 {

// "RIFF" .... "WEBP"
bool is_webp(const uint8_t* data, size_t size);
// Throws Error(Input) naming `name` for a corrupt, truncated or animated file and for one of more than
// `max_pixels`, checked from the header before any decoding.
RgbImage decode_webp(const uint8_t* data, size_t size, const std::string& name, int64_t max_pixels);

}  // namespace blip2
