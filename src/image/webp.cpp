#include "image/webp.h"

#include <webp/decode.h>

#include <cstring>
#include <memory>

#include "core/error.h"

namespace blip2 {

namespace {

[[noreturn]] void bad(const std::string& name, const std::string& what) { fail(ErrorKind::Input, name + ": " + what); }

const char* status_text(VP8StatusCode s) {
  switch (s) {
    case VP8_STATUS_OUT_OF_MEMORY: return "out of memory";
    case VP8_STATUS_INVALID_PARAM: return "invalid parameter";
    case VP8_STATUS_BITSTREAM_ERROR: return "bitstream error";
    case VP8_STATUS_UNSUPPORTED_FEATURE: return "unsupported feature";
    case VP8_STATUS_SUSPENDED: return "suspended";
    case VP8_STATUS_USER_ABORT: return "aborted";
    case VP8_STATUS_NOT_ENOUGH_DATA: return "not enough data";
    default: return "error";
  }
}

}  // namespace

bool is_webp(const uint8_t* d, size_t n) {
  return n >= 12 && std::memcmp(d, "RIFF", 4) == 0 && std::memcmp(d + 8, "WEBP", 4) == 0;
}

RgbImage decode_webp(const uint8_t* data, size_t size, const std::string& name, int64_t max_pixels) {
  WebPDecoderConfig config;
  if (!WebPInitDecoderConfig(&config)) bad(name, "cannot initialise the WebP decoder (libwebp version mismatch)");
  VP8StatusCode st = WebPGetFeatures(data, size, &config.input);
  if (st != VP8_STATUS_OK) bad(name, std::string("corrupt or truncated WebP: ") + status_text(st));
  if (config.input.has_animation) bad(name, "animated WebP is not supported (extract a frame first)");
  const int64_t w = config.input.width, h = config.input.height;
  const std::string dims = std::to_string(w) + "x" + std::to_string(h);
  if (w <= 0 || h <= 0) bad(name, "image has zero size (" + dims + ")");
  if (w * h > max_pixels)
    bad(name, "image too large (" + dims + " pixels, the limit is " + std::to_string(max_pixels) + ")");
  // RGBA, not premultiplied, default options (fancy upsampling, no dithering): Pillow's decoder output.
  config.output.colorspace = MODE_RGBA;
  st = WebPDecode(data, size, &config);
  std::unique_ptr<WebPDecBuffer, void (*)(WebPDecBuffer*)> out(&config.output, WebPFreeDecBuffer);
  if (st != VP8_STATUS_OK) bad(name, std::string("corrupt or truncated WebP: ") + status_text(st));
  RgbImage img;
  img.width = static_cast<int>(w);
  img.height = static_cast<int>(h);
  try {
    img.pixels.resize(static_cast<size_t>(w * h * 3));
  } catch (const std::bad_alloc&) {
    bad(name, "not enough memory to decode the image");
  }
  const WebPRGBABuffer& buf = config.output.u.RGBA;
  for (int64_t y = 0; y < h; ++y) {
    const uint8_t* src = buf.rgba + y * buf.stride;
    uint8_t* dst = img.pixels.data() + y * w * 3;
    for (int64_t x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) dst[x * 3 + c] = src[x * 4 + c];  // alpha dropped, as convert("RGB")
  }
  return img;
}

}  // namespace blip2
