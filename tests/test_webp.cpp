// WebP decoding against Pillow: tests/fixtures/webp holds WebP files (lossy, lossless, with alpha, grey) and,
// beside each, X.webp.png: what Pillow 9.4 (libwebp 1.2.4) decoded, convert("RGB"), saved losslessly. Our
// decoding must equal it pixel for pixel; broken files must fail with a message naming them.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>

#include "core/error.h"
#include "image/image.h"

using namespace blip2;
namespace fs = std::filesystem;

namespace {

const std::string kWebp = std::string(BLIP2_FIXTURES_DIR) + "/webp/";

std::string bytes_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void expect_input_error(const std::string& bytes, const std::string& want, int64_t max_pixels = kMaxImagePixels) {
  try {
    decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "x.webp", max_pixels);
    ADD_FAILURE() << "no error, expected " << want;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input);
    EXPECT_NE(std::string(e.what()).find("x.webp: "), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(WebP, EveryFixtureDecodesAsPillowDoes) {
  int files = 0;
  for (const auto& e : fs::directory_iterator(kWebp)) {
    if (e.path().extension() != ".webp") continue;
    ++files;
    SCOPED_TRACE(e.path().filename().string());
    const RgbImage got = load_image(e.path().string());
    const RgbImage want = load_image(e.path().string() + ".png");
    ASSERT_EQ(got.width, want.width);
    ASSERT_EQ(got.height, want.height);
    EXPECT_EQ(got.pixels, want.pixels);
  }
  EXPECT_EQ(files, 4);
}

TEST(WebP, BrokenFilesFailWithTheirName) {
  const std::string good = bytes_of(kWebp + "chelsea_lossy.webp");
  expect_input_error(good.substr(0, good.size() / 2), "corrupt or truncated WebP");
  expect_input_error(good.substr(0, 20), "corrupt or truncated WebP");
  std::string flipped = good;
  for (size_t i = 40; i < flipped.size(); i += 7) flipped[i] = static_cast<char>(flipped[i] ^ 0x5a);
  expect_input_error(flipped, "WebP");
  expect_input_error(good, "image too large (160x120 pixels, the limit is 100)", 100);
}
