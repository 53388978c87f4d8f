// PNG, JPEG and WebP decoding from memory (decode_image picks the decoder by signature), then the resize to
// the model's input size. The pixel limit is lowered so that a header claiming a large image is refused
// before it spends the fuzzer's memory budget, as the server's --max-image-pixels does.
#include "fuzz_util.h"
#include "image/image.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  blip2::fuzz::expect_clean([&] {
    const blip2::RgbImage img = blip2::decode_image(data, size, "fuzz input", 4'000'000);
    if (img.pixels.size() != size_t(img.width) * size_t(img.height) * 3) std::abort();
    (void)blip2::resize_bicubic(img, 16, 16);
  });
  return 0;
}
