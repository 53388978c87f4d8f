// Image decoding, Pillow-exact BICUBIC resize and normalisation, checked against the reference pixels that
// the Hugging Face / Pillow processor produced (tests/fixtures/pixels), plus malformed and synthetic inputs.
#include <gtest/gtest.h>
#include <png.h>
// jpeglib.h needs FILE and size_t declared before it.
#include <cstdio>
#include <jpeglib.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "image/image.h"
#include "io/safetensors.h"

namespace fs = std::filesystem;
using blip2::RgbImage;

namespace {

const std::string kFixtures = BLIP2_FIXTURES_DIR;
const std::string kImages = kFixtures + "/images/";

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  EXPECT_TRUE(f.good()) << "cannot open " << path;
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

nlohmann::json pixels_json() {
  std::ifstream f(kFixtures + "/pixels/pixels.json");
  return nlohmann::json::parse(f);
}

// A private scratch directory, removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            ("blip2_test_image_" + std::to_string(::getpid()) + "_" + info->name());
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string write(const std::string& name, const std::vector<uint8_t>& bytes) const {
    const std::string p = (path_ / name).string();
    std::ofstream f(p, std::ios::binary);
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    return p;
  }

 private:
  fs::path path_;
};

// Expects an Input error whose message starts with `name` and contains `what`.
template <class F>
void expect_input_error(F&& f, const std::string& name, const std::string& what = "") {
  try {
    f();
    ADD_FAILURE() << name << ": expected blip2::Error, nothing thrown";
  } catch (const blip2::Error& e) {
    EXPECT_EQ(e.kind(), blip2::ErrorKind::Input) << e.what();
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(name, 0), 0u) << "message should start with the image name: " << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << "message should mention '" << what << "': " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << name << ": expected blip2::Error, got " << e.what();
  }
}

RgbImage decode(const std::vector<uint8_t>& bytes, const std::string& name = "test") {
  return blip2::decode_image(bytes.data(), bytes.size(), name);
}

uint32_t crc32(const uint8_t* p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return ~c;
}

void put_be32(uint8_t* p, uint32_t v) {
  p[0] = v >> 24, p[1] = v >> 16, p[2] = v >> 8, p[3] = v;
}

// --- small encoders for synthetic inputs (the test's own use of libpng / libjpeg; no error recovery needed) ---

// Optional parts of a synthetic PNG.
struct PngExtras {
  bool interlace = false;
  std::vector<png_color> palette;
  std::vector<uint8_t> trns;  // palette alpha entries
};

std::vector<uint8_t> encode_png(int width, int height, int color_type, int bit_depth,
                                std::vector<std::vector<uint8_t>> rows, const PngExtras& s = {}) {
  std::vector<uint8_t> out;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(png);
  png_set_write_fn(
      png, &out,
      [](png_structp p, png_bytep d, size_t n) {
        auto* v = static_cast<std::vector<uint8_t>*>(png_get_io_ptr(p));
        v->insert(v->end(), d, d + n);
      },
      nullptr);
  png_set_IHDR(png, info, width, height, bit_depth, color_type,
               s.interlace ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  if (!s.palette.empty()) png_set_PLTE(png, info, s.palette.data(), static_cast<int>(s.palette.size()));
  if (!s.trns.empty()) png_set_tRNS(png, info, s.trns.data(), static_cast<int>(s.trns.size()), nullptr);
  std::vector<png_bytep> ptrs;
  for (auto& r : rows) ptrs.push_back(r.data());
  png_set_rows(png, info, ptrs.data());
  png_write_png(png, info, PNG_TRANSFORM_IDENTITY, nullptr);
  png_destroy_write_struct(&png, &info);
  return out;
}

// A JPEG of one flat colour per 8x8 block column, quality 100: flat blocks decode back exactly.
std::vector<uint8_t> encode_jpeg(int width, int height, int comps, J_COLOR_SPACE space,
                                 const std::vector<uint8_t>& pixels) {
  jpeg_compress_struct c;
  jpeg_error_mgr err;
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  unsigned char* buf = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&c, &buf, &size);
  c.image_width = width;
  c.image_height = height;
  c.input_components = comps;
  c.in_color_space = space;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 100, TRUE);
  for (int i = 0; i < c.num_components; ++i) c.comp_info[i].h_samp_factor = c.comp_info[i].v_samp_factor = 1;
  jpeg_start_compress(&c, TRUE);
  while (c.next_scanline < c.image_height) {
    JSAMPROW row = const_cast<uint8_t*>(pixels.data()) + c.next_scanline * width * comps;
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  std::vector<uint8_t> out(buf, buf + size);
  free(buf);
  return out;
}

RgbImage pattern(int w, int h) {
  RgbImage img{w, h, std::vector<uint8_t>(static_cast<size_t>(w) * h * 3)};
  for (size_t i = 0; i < img.pixels.size(); ++i) img.pixels[i] = static_cast<uint8_t>((i * 37 + i / 7) % 256);
  return img;
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------
// Reference pixels: every image listed in pixels.json.

TEST(ImageReference, EveryListedImageMatchesPillow) {
  const auto meta = pixels_json();
  const int size = meta["size"];
  blip2::PixelNorm norm;
  for (int c = 0; c < 3; ++c) {
    EXPECT_EQ(norm.mean[c], meta["mean"][c].get<float>());
    EXPECT_EQ(norm.std[c], meta["std"][c].get<float>());
  }
  const blip2::SafetensorsFile ref(kFixtures + "/pixels/pixels.safetensors");
  int checked = 0;
  float worst = 0.0f;
  for (const auto& [name, info] : meta["images"].items()) {
    if (info.contains("error")) continue;  // covered by ListedErrorsAreRejected
    SCOPED_TRACE(name);
    const RgbImage img = blip2::load_image(kImages + name);
    EXPECT_EQ(img.width, info["size"][0].get<int>());
    EXPECT_EQ(img.height, info["size"][1].get<int>());
    ASSERT_EQ(img.pixels.size(), static_cast<size_t>(img.width) * img.height * 3);

    const RgbImage resized = blip2::resize_bicubic(img, size, size);
    const blip2::TensorEntry* u8 = ref.find(name + "/resized_u8");
    ASSERT_NE(u8, nullptr);
    ASSERT_EQ(u8->dtype, "U8");
    ASSERT_EQ(u8->shape, (blip2::Shape{size, size, 3}));
    ASSERT_EQ(u8->nbytes, resized.pixels.size());
    size_t differing = 0;
    int max_diff = 0;
    for (size_t i = 0; i < u8->nbytes; ++i) {
      const int d = std::abs(int(resized.pixels[i]) - int(u8->data[i]));
      differing += d != 0;
      max_diff = std::max(max_diff, d);
    }
    EXPECT_EQ(differing, 0u) << differing << " of " << u8->nbytes << " bytes differ, max diff " << max_diff;

    const blip2::Tensor pv = ref.tensor(name + "/pixel_values");
    ASSERT_EQ(pv.shape, (blip2::Shape{3, size, size}));
    std::vector<float> mine(pv.data.size());
    blip2::normalize_chw(resized, norm, mine.data());
    float max_abs = 0.0f;
    for (size_t i = 0; i < mine.size(); ++i) max_abs = std::max(max_abs, std::fabs(mine[i] - pv.data[i]));
    EXPECT_LE(max_abs, 1e-6f);
    worst = std::max(worst, max_abs);
    ++checked;
  }
  EXPECT_GT(checked, 0);
  RecordProperty("images_checked", checked);
  std::printf("checked %d images, pixel_values max abs diff %g\n", checked, double(worst));
}

TEST(ImageReference, PreprocessStacksTheBatch) {
  const auto meta = pixels_json();
  const int size = meta["size"];
  const blip2::SafetensorsFile ref(kFixtures + "/pixels/pixels.safetensors");
  const std::vector<std::string> names = {"chelsea.png", "camera.png", "rocket.jpg"};
  std::vector<RgbImage> imgs;
  for (const auto& n : names) imgs.push_back(blip2::load_image(kImages + n));
  const blip2::Tensor t = blip2::preprocess_images(imgs, size);
  ASSERT_EQ(t.shape, (blip2::Shape{3, 3, size, size}));
  const size_t per = 3 * static_cast<size_t>(size) * size;
  for (size_t b = 0; b < names.size(); ++b) {
    const blip2::Tensor pv = ref.tensor(names[b] + "/pixel_values");
    float max_abs = 0.0f;
    for (size_t i = 0; i < per; ++i) max_abs = std::max(max_abs, std::fabs(t.data[b * per + i] - pv.data[i]));
    EXPECT_LE(max_abs, 1e-6f) << names[b];
  }
}

TEST(ImageReference, ListedErrorsAreRejected) {
  const auto meta = pixels_json();
  int checked = 0;
  for (const auto& [name, info] : meta["images"].items()) {
    if (!info.contains("error")) continue;
    const std::string path = kImages + name;
    expect_input_error([&] { blip2::load_image(path); }, path, name);
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

TEST(ImageDecode, TruncatedJpegMessage) {
  const std::string path = kImages + "truncated.jpg";
  expect_input_error([&] { blip2::load_image(path); }, path, "corrupt or truncated JPEG");
}

// ------------------------------------------------------------------------------------------------------------
// Malformed inputs: always an Input error naming the image, never a crash or a partial image.

TEST(ImageDecode, MissingFile) {
  const std::string path = kImages + "no_such_file.png";
  expect_input_error([&] { blip2::load_image(path); }, path, "cannot open");
}

TEST(ImageDecode, EndlessFileIsRefusedAtTheSizeCap) {
  // /dev/zero never ends: reading stops at the cap with a message instead of filling memory.
  expect_input_error([&] { blip2::load_image("/dev/zero"); }, "/dev/zero", "image is larger than 256 MiB");
}

TEST(ImageDecode, LargeRegularFileIsRefusedBeforeReading) {
  TempDir dir;
  const std::string path = dir.write("huge.png", {});
  std::filesystem::resize_file(path, (size_t(256) << 20) + 1);  // sparse: refused from its size, never read
  expect_input_error([&] { blip2::load_image(path); }, path, "image is larger than 256 MiB");
}

TEST(ImageDecode, TextFileIsRejected) {
  TempDir dir;
  const std::string text = "this is not an image\n";
  const std::string path = dir.write("notes.txt", std::vector<uint8_t>(text.begin(), text.end()));
  expect_input_error([&] { blip2::load_image(path); }, path, "not a PNG or JPEG image");
}

TEST(ImageDecode, EmptyFileIsRejected) {
  TempDir dir;
  const std::string path = dir.write("empty.png", {});
  expect_input_error([&] { blip2::load_image(path); }, path, "not a PNG or JPEG image");
  expect_input_error([&] { blip2::decode_image(nullptr, 0, "empty"); }, "empty");
}

TEST(ImageDecode, PngCutInHalfIsRejected) {
  std::vector<uint8_t> bytes = read_bytes(kImages + "chelsea.png");
  bytes.resize(bytes.size() / 2);
  expect_input_error([&] { decode(bytes, "half.png"); }, "half.png", "corrupt or truncated PNG");
  // Cut inside the header chunks as well.
  for (size_t n : {8u, 12u, 20u, 33u, 40u}) {
    const std::vector<uint8_t> head(bytes.begin(), bytes.begin() + n);
    expect_input_error([&] { decode(head, "head.png"); }, "head.png");
  }
}

TEST(ImageDecode, JpegCutInHalfIsRejected) {
  for (const char* name : {"rocket.jpg", "hubble_deep_field.jpg"}) {
    std::vector<uint8_t> bytes = read_bytes(kImages + name);
    bytes.resize(bytes.size() / 2);
    expect_input_error([&] { decode(bytes, name); }, name, "corrupt or truncated JPEG");
  }
}

TEST(ImageDecode, PngCorruptIdatIsRejected) {
  std::vector<uint8_t> bytes = read_bytes(kImages + "chelsea.png");
  for (size_t i = bytes.size() / 2; i < bytes.size() / 2 + 64; ++i) bytes[i] ^= 0x5A;
  expect_input_error([&] { decode(bytes, "flipped.png"); }, "flipped.png", "corrupt");
}

TEST(ImageDecode, HugePngHeaderIsRejectedBeforeDecoding) {
  std::vector<uint8_t> bytes = read_bytes(kImages + "chelsea.png");
  // Signature (8) | IHDR length (4) | "IHDR" (4) | width (4) | height (4) | ... | CRC over type + 13 data bytes.
  ASSERT_EQ(std::memcmp(bytes.data() + 12, "IHDR", 4), 0);
  put_be32(&bytes[16], 100000);
  put_be32(&bytes[20], 100000);
  put_be32(&bytes[29], crc32(&bytes[12], 17));
  expect_input_error([&] { decode(bytes, "huge.png"); }, "huge.png", "too large");

  put_be32(&bytes[16], 0);  // libpng itself refuses a zero width
  put_be32(&bytes[29], crc32(&bytes[12], 17));
  expect_input_error([&] { decode(bytes, "zero.png"); }, "zero.png");
}

TEST(ImageDecode, HugeJpegHeaderIsRejectedBeforeDecoding) {
  std::vector<uint8_t> bytes = read_bytes(kImages + "rocket.jpg");
  // Find the start-of-frame marker (FFC0..FFC2) and patch its height and width to 65280 (below libjpeg's own
  // 65500 limit, so our pixel-count check is what refuses it).
  size_t i = 2;
  while (i + 9 < bytes.size() && !(bytes[i] == 0xFF && bytes[i + 1] >= 0xC0 && bytes[i + 1] <= 0xC2))
    i += 2 + (bytes[i + 2] << 8 | bytes[i + 3]);
  ASSERT_LT(i + 9, bytes.size());
  bytes[i + 5] = bytes[i + 7] = 0xFF;
  bytes[i + 6] = bytes[i + 8] = 0x00;
  expect_input_error([&] { decode(bytes, "huge.jpg"); }, "huge.jpg", "too large");
}

TEST(ImageDecode, GarbageAfterJpegSignatureIsRejected) {
  std::vector<uint8_t> bytes = {0xFF, 0xD8, 0xFF};
  for (int i = 0; i < 4096; ++i) bytes.push_back(static_cast<uint8_t>(i * 131 + 7));
  expect_input_error([&] { decode(bytes, "garbage.jpg"); }, "garbage.jpg", "JPEG");
  const std::vector<uint8_t> just_sig = {0xFF, 0xD8, 0xFF};
  expect_input_error([&] { decode(just_sig, "sig.jpg"); }, "sig.jpg", "JPEG");
}

TEST(ImageDecode, GarbageAfterPngSignatureIsRejected) {
  std::vector<uint8_t> bytes = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  for (int i = 0; i < 4096; ++i) bytes.push_back(static_cast<uint8_t>(i * 131 + 7));
  expect_input_error([&] { decode(bytes, "garbage.png"); }, "garbage.png", "PNG");
}

// Every prefix and many single-byte corruptions of small files: an Input error or a complete image, nothing
// else (run under the sanitizers to catch memory errors). A PNG cut only inside IEND still decodes, as in Pillow.
TEST(ImageDecode, PrefixesAndCorruptionsNeverCrash) {
  std::vector<uint8_t> jpeg_px(24 * 16 * 3);
  for (size_t i = 0; i < jpeg_px.size(); ++i) jpeg_px[i] = static_cast<uint8_t>(i * 7);
  const std::vector<std::vector<uint8_t>> files = {read_bytes(kImages + "palette_color.png"),
                                                   read_bytes(kImages + "one_pixel.png"),
                                                   encode_jpeg(24, 16, 3, JCS_RGB, jpeg_px)};
  for (const auto& file : files) {
    const RgbImage full = decode(file);
    auto check = [&](const std::vector<uint8_t>& bytes) {
      try {
        const RgbImage img = decode(bytes);
        EXPECT_EQ(img.width, full.width);
        EXPECT_EQ(img.height, full.height);
        EXPECT_EQ(img.pixels.size(), full.pixels.size());
      } catch (const blip2::Error& e) {
        EXPECT_EQ(e.kind(), blip2::ErrorKind::Input) << e.what();
      }
    };
    for (size_t n = 0; n < file.size(); ++n) {
      const std::vector<uint8_t> prefix(file.begin(), file.begin() + n);
      if (n + 12 < file.size()) {  // cut before IEND (PNG) or in the last data (JPEG): must be refused
        EXPECT_THROW(decode(prefix), blip2::Error) << "prefix of " << n << " bytes";
      } else {
        check(prefix);
      }
    }
    for (size_t i = 0; i < file.size(); i += 3) {
      std::vector<uint8_t> bad = file;
      bad[i] ^= static_cast<uint8_t>(0x41 + i);
      check(bad);
    }
  }
}

// Decoding by content: a PNG named .jpg is still a PNG.
TEST(ImageDecode, FormatIsChosenByContent) {
  TempDir dir;
  const std::string path = dir.write("really_a_png.jpg", read_bytes(kImages + "one_pixel.png"));
  const RgbImage img = blip2::load_image(path);
  EXPECT_EQ(img.width, 1);
  EXPECT_EQ(img.height, 1);
}

// ------------------------------------------------------------------------------------------------------------
// Conversions to RGB on synthetic files (Pillow's convert("RGB") rules).

TEST(ImageConvert, Rgb16KeepsTheHighByte) {
  std::vector<uint8_t> row = {0x12, 0x34, 0xAB, 0xCD, 0xFF, 0x01, 0x00, 0xFF, 0x80, 0x80, 0x01, 0x00};
  const RgbImage img = decode(encode_png(2, 1, PNG_COLOR_TYPE_RGB, 16, {row}));
  EXPECT_EQ(img.pixels, (std::vector<uint8_t>{0x12, 0xAB, 0xFF, 0x00, 0x80, 0x01}));
}

TEST(ImageConvert, Gray16IsClippedAsPillowDoes) {
  // Pillow opens 16-bit gray as I;16, and its conversion to RGB clips to 255 rather than taking the high byte.
  std::vector<uint8_t> row = {0x00, 0x07, 0x00, 0xFF, 0x01, 0x00, 0xFF, 0xFF};
  const RgbImage img = decode(encode_png(4, 1, PNG_COLOR_TYPE_GRAY, 16, {row}));
  EXPECT_EQ(img.pixels, (std::vector<uint8_t>{7, 7, 7, 255, 255, 255, 255, 255, 255, 255, 255, 255}));
}

TEST(ImageConvert, LowBitGrayIsScaled) {
  // 2-bit gray 0,1,2,3 -> 0,85,170,255 (Pillow's L;2).
  const RgbImage img = decode(encode_png(4, 1, PNG_COLOR_TYPE_GRAY, 2, {{0b00011011}}));
  EXPECT_EQ(img.pixels, (std::vector<uint8_t>{0, 0, 0, 85, 85, 85, 170, 170, 170, 255, 255, 255}));
  const RgbImage bw = decode(encode_png(2, 1, PNG_COLOR_TYPE_GRAY, 1, {{0b01000000}}));
  EXPECT_EQ(bw.pixels, (std::vector<uint8_t>{0, 0, 0, 255, 255, 255}));
}

TEST(ImageConvert, PaletteTransparencyIsIgnored) {
  PngExtras s;
  s.palette = {{10, 20, 30}, {200, 100, 50}, {1, 2, 3}};
  s.trns = {0, 128};  // entry 0 fully transparent: its colour must still come through, not composited
  const RgbImage img = decode(encode_png(3, 1, PNG_COLOR_TYPE_PALETTE, 4, {{0x01, 0x20}}, s));
  EXPECT_EQ(img.pixels, (std::vector<uint8_t>{10, 20, 30, 200, 100, 50, 1, 2, 3}));
}

TEST(ImageConvert, AlphaIsDroppedWithoutCompositing) {
  const RgbImage ga = decode(encode_png(2, 1, PNG_COLOR_TYPE_GRAY_ALPHA, 8, {{77, 0, 200, 255}}));
  EXPECT_EQ(ga.pixels, (std::vector<uint8_t>{77, 77, 77, 200, 200, 200}));
  const RgbImage rgba = decode(encode_png(1, 1, PNG_COLOR_TYPE_RGBA, 8, {{9, 99, 199, 0}}));
  EXPECT_EQ(rgba.pixels, (std::vector<uint8_t>{9, 99, 199}));
}

TEST(ImageConvert, InterlacedPngMatchesPlain) {
  const RgbImage src = pattern(13, 11);
  std::vector<std::vector<uint8_t>> rows;
  for (int y = 0; y < src.height; ++y)
    rows.emplace_back(src.pixels.begin() + y * 39, src.pixels.begin() + (y + 1) * 39);
  PngExtras s;
  s.interlace = true;
  const RgbImage img = decode(encode_png(13, 11, PNG_COLOR_TYPE_RGB, 8, rows, s));
  EXPECT_EQ(img.pixels, src.pixels);
}

TEST(ImageConvert, GrayJpegIsReplicated) {
  std::vector<uint8_t> px(16 * 8);
  for (int y = 0; y < 8; ++y)
    for (int x = 0; x < 16; ++x) px[y * 16 + x] = x < 8 ? 40 : 210;
  const RgbImage img = decode(encode_jpeg(16, 8, 1, JCS_GRAYSCALE, px));
  ASSERT_EQ(img.width, 16);
  for (int y = 0; y < 8; ++y)
    for (int x = 0; x < 16; ++x)
      for (int c = 0; c < 3; ++c) EXPECT_EQ(img.pixels[(y * 16 + x) * 3 + c], x < 8 ? 40 : 210);
}

TEST(ImageConvert, CmykJpegAsPillow) {
  // Flat 8x8 blocks of stored (c, m, y, k). Pillow inverts them (Adobe convention), then
  // R = (255 - K) * (1 - C / 255) rounded; with the inversion: R = k - round((255 - c) * k / 255).
  const std::vector<std::array<uint8_t, 4>> colours = {
      {255, 255, 255, 255}, {0, 0, 0, 255}, {100, 150, 200, 180}, {30, 60, 90, 0}, {255, 0, 128, 77}};
  const int w = 8 * static_cast<int>(colours.size()), h = 8;
  std::vector<uint8_t> px(static_cast<size_t>(w) * h * 4);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 4; ++c) px[(y * w + x) * 4 + c] = colours[x / 8][c];
  const RgbImage img = decode(encode_jpeg(w, h, 4, JCS_CMYK, px));
  ASSERT_EQ(img.width, w);
  for (size_t b = 0; b < colours.size(); ++b) {
    const int k = colours[b][3];
    for (int c = 0; c < 3; ++c) {
      const int expected = k - ((255 - colours[b][c]) * k * 2 + 255) / 510;
      EXPECT_EQ(img.pixels[(3 * w + 8 * b + 3) * 3 + c], expected) << "block " << b << " channel " << c;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Resize on synthetic images.

TEST(ImageResize, OddSizesGiveTheRequestedDimensions) {
  const std::vector<std::array<int, 4>> cases = {{1, 1, 224, 224}, {613, 37, 224, 224}, {37, 613, 224, 224},
                                                 {224, 1, 224, 224}, {5, 3, 2, 7},         {1000, 3, 1, 1},
                                                 {224, 300, 224, 224}, {300, 224, 224, 224}};
  for (const auto& [w, h, ow, oh] : cases) {
    const RgbImage out = blip2::resize_bicubic(pattern(w, h), ow, oh);
    EXPECT_EQ(out.width, ow);
    EXPECT_EQ(out.height, oh);
    EXPECT_EQ(out.pixels.size(), static_cast<size_t>(ow) * oh * 3) << w << "x" << h;
  }
}

TEST(ImageResize, SameSizeIsACopy) {
  const RgbImage src = pattern(31, 17);
  const RgbImage out = blip2::resize_bicubic(src, 31, 17);
  EXPECT_EQ(out.pixels, src.pixels);
}

TEST(ImageResize, FlatImageStaysFlat) {
  for (uint8_t v : {0, 1, 128, 254, 255}) {
    RgbImage src{57, 23, std::vector<uint8_t>(57 * 23 * 3, v)};
    for (const auto& [ow, oh] : std::vector<std::pair<int, int>>{{224, 224}, {3, 5}, {57, 200}, {10, 23}}) {
      const RgbImage out = blip2::resize_bicubic(src, ow, oh);
      EXPECT_TRUE(std::all_of(out.pixels.begin(), out.pixels.end(), [v](uint8_t p) { return p == v; }))
          << int(v) << " -> " << ow << "x" << oh;
    }
  }
}

TEST(ImageResize, OneAxisOnly) {
  // Each axis alone must equal the two-axis path with the other axis unchanged (the horizontal-only and
  // vertical-only code paths), and a 1x1 source upsamples to a flat image.
  const RgbImage src = pattern(40, 30);
  const RgbImage h = blip2::resize_bicubic(src, 17, 30);
  const RgbImage v = blip2::resize_bicubic(src, 40, 71);
  EXPECT_EQ(h.width, 17);
  EXPECT_EQ(v.height, 71);
  const RgbImage hv = blip2::resize_bicubic(h, 17, 71);
  const RgbImage both = blip2::resize_bicubic(src, 17, 71);
  EXPECT_EQ(hv.pixels, both.pixels);  // Pillow does horizontal first, then vertical on the uint8 result

  const RgbImage one{1, 1, {3, 140, 250}};
  const RgbImage big = blip2::resize_bicubic(one, 224, 224);
  for (size_t i = 0; i < big.pixels.size(); ++i) ASSERT_EQ(big.pixels[i], one.pixels[i % 3]);
}

TEST(ImageNormalize, Formula) {
  const RgbImage img{2, 1, {0, 128, 255, 10, 20, 30}};
  const blip2::PixelNorm norm;
  std::vector<float> out(6);
  blip2::normalize_chw(img, norm, out.data());
  for (int c = 0; c < 3; ++c)
    for (int x = 0; x < 2; ++x) {
      const float v = static_cast<float>(img.pixels[x * 3 + c] * (1.0 / 255.0));
      EXPECT_EQ(out[c * 2 + x], (v - norm.mean[c]) / norm.std[c]);
    }
}
