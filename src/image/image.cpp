#include "image/image.h"

#include <png.h>

#include <cerrno>
#include <csetjmp>
#include <cstdio>  // before jpeglib.h, which uses FILE and size_t without declaring them
#include <cstring>
#include <jerror.h>
#include <jpeglib.h>

#include <algorithm>
#include <cmath>
#include <new>

#include "core/error.h"
#include "core/file.h"
#include "image/webp.h"

namespace blip2 {
namespace {

[[noreturn]] void bad_image(const std::string& name, const std::string& what) {
  fail(ErrorKind::Input, name + ": " + what);
}

// Checked before any pixel buffer exists, so a forged header cannot make us allocate gigabytes.
void check_dimensions(const std::string& name, int64_t w, int64_t h, int64_t max_pixels) {
  const std::string dims = std::to_string(w) + "x" + std::to_string(h);
  if (w <= 0 || h <= 0) bad_image(name, "image has zero size (" + dims + ")");
  if (w * h > max_pixels)
    bad_image(name, "image too large (" + dims + " pixels, the limit is " + std::to_string(max_pixels) + ")");
}

// Pixel buffers can still be large (raw samples plus RGB: up to ~1.3 GB at the pixel limit): running out of memory
// is reported as a problem with this input rather than escaping as std::bad_alloc.
std::vector<uint8_t> alloc_pixels(const std::string& name, size_t n) {
  try {
    return std::vector<uint8_t>(n);
  } catch (const std::bad_alloc&) {
    bad_image(name, "not enough memory to decode the image (" + std::to_string(n) + " bytes)");
  }
}

// ------------------------------------------------------------------------------------------------------------
// PNG (libpng, low-level API).
//
// libpng reports errors by longjmp. The functions that call setjmp (png_read_header, png_read_pixels) hold only
// trivially destructible locals, so no destructor is skipped; they return false with the message in the state,
// and the C++ caller throws after the setjmp frame is gone.

struct PngState {
  png_structp png = nullptr;
  png_infop info = nullptr;
  const uint8_t* data = nullptr;
  size_t size = 0;
  size_t pos = 0;
  char error[256] = {};
};

void png_read_from_memory(png_structp png, png_bytep out, size_t n) {
  auto* st = static_cast<PngState*>(png_get_io_ptr(png));
  if (n > st->size - st->pos) png_error(png, "unexpected end of file");
  std::memcpy(out, st->data + st->pos, n);
  st->pos += n;
}

void png_on_error(png_structp png, png_const_charp msg) {
  auto* st = static_cast<PngState*>(png_get_error_ptr(png));
  std::snprintf(st->error, sizeof st->error, "%s", msg);
  png_longjmp(png, 1);
}

// Warnings concern ancillary chunks (bad CRC, odd iCCP profile...): the pixels are fine and Pillow reads them.
void png_on_warning(png_structp, png_const_charp) {}

struct PngLayout {
  uint32_t width = 0, height = 0;
  int channels = 0;    // after the transforms below: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA
  int bit_depth = 0;   // 8, or 16 for 16-bit grayscale (kept to clip it as Pillow does)
  size_t rowbytes = 0;
};

bool png_read_header(PngState* st, PngLayout* out) {
  if (setjmp(png_jmpbuf(st->png))) return false;
  png_structp png = st->png;
  png_infop info = st->info;
  png_read_info(png, info);
  const int color = png_get_color_type(png, info);
  const int depth = png_get_bit_depth(png, info);
  // Pillow's convert("RGB") semantics: the palette gives the colours and its tRNS is ignored (we drop the alpha
  // channel libpng adds for it); gray below 8 bits is scaled to 0..255; no gamma, no background compositing.
  // png_set_expand is avoided on purpose: it would also turn a gray/RGB tRNS into an alpha channel.
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  // Pillow keeps the high byte of 16-bit RGB, RGBA and gray+alpha samples, but opens 16-bit gray as "I;16",
  // whose conversion to RGB clips values to 255 instead: that case stays 16-bit and is clipped below.
  if (depth == 16 && color != PNG_COLOR_TYPE_GRAY) png_set_strip_16(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  out->width = png_get_image_width(png, info);
  out->height = png_get_image_height(png, info);
  out->channels = png_get_channels(png, info);
  out->bit_depth = png_get_bit_depth(png, info);
  out->rowbytes = png_get_rowbytes(png, info);
  return true;
}

bool png_read_pixels(PngState* st, png_bytep* rows) {
  if (setjmp(png_jmpbuf(st->png))) return false;
  // png_read_end is not called: Pillow accepts a file whose IEND is missing. The image data itself is complete
  // and CRC-checked once the last row is read.
  png_read_image(st->png, rows);
  return true;
}

RgbImage decode_png(const uint8_t* data, size_t size, const std::string& name, int64_t max_pixels) {
  PngState st;
  st.data = data;
  st.size = size;
  st.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &st, png_on_error, png_on_warning);
  if (st.png) st.info = png_create_info_struct(st.png);
  struct Destroy {  // lives in this frame, which no longjmp crosses
    PngState& st;
    ~Destroy() { png_destroy_read_struct(&st.png, st.info ? &st.info : nullptr, nullptr); }
  } destroy{st};
  if (!st.png || !st.info) bad_image(name, "cannot initialise the PNG decoder");
  png_set_read_fn(st.png, &st, png_read_from_memory);

  PngLayout lay;
  if (!png_read_header(&st, &lay)) bad_image(name, std::string("corrupt or truncated PNG: ") + st.error);
  check_dimensions(name, lay.width, lay.height, max_pixels);
  const size_t w = lay.width, h = lay.height;
  const size_t bytes_per_pixel = static_cast<size_t>(lay.channels) * (lay.bit_depth / 8);
  if (lay.channels < 1 || lay.channels > 4 || (lay.bit_depth != 8 && lay.bit_depth != 16) ||
      (lay.bit_depth == 16 && lay.channels != 1) || lay.rowbytes != w * bytes_per_pixel)
    bad_image(name, "unsupported PNG layout");

  std::vector<uint8_t> raw = alloc_pixels(name, lay.rowbytes * h);
  std::vector<png_bytep> rows(h);
  for (size_t y = 0; y < h; ++y) rows[y] = raw.data() + y * lay.rowbytes;
  if (!png_read_pixels(&st, rows.data())) bad_image(name, std::string("corrupt or truncated PNG: ") + st.error);

  RgbImage img;
  img.width = static_cast<int>(w);
  img.height = static_cast<int>(h);
  if (lay.channels == 3) {  // already RGB: no copy
    img.pixels = std::move(raw);
    return img;
  }
  img.pixels = alloc_pixels(name, w * h * 3);
  uint8_t* o = img.pixels.data();
  const uint8_t* p = raw.data();
  for (size_t i = 0; i < w * h; ++i, o += 3) {
    if (lay.bit_depth == 16) {  // big-endian gray, clipped (see above)
      o[0] = o[1] = o[2] = p[0] != 0 ? 255 : p[1];
      p += 2;
    } else if (lay.channels <= 2) {  // gray or gray+alpha: replicate, drop alpha
      o[0] = o[1] = o[2] = p[0];
      p += lay.channels;
    } else {  // RGBA: drop alpha, no compositing
      o[0] = p[0], o[1] = p[1], o[2] = p[2];
      p += 4;
    }
  }
  return img;
}

// ------------------------------------------------------------------------------------------------------------
// JPEG (libjpeg-turbo). Same discipline as PNG: setjmp only in functions with trivial locals.

struct JpegState {
  jpeg_decompress_struct cinfo;
  jpeg_error_mgr err;
  std::jmp_buf jmp;
  char error[JMSG_LENGTH_MAX];
  bool created;
};

[[noreturn]] void jpeg_fail_with_message(j_common_ptr cinfo) {
  auto* st = static_cast<JpegState*>(cinfo->client_data);
  (*cinfo->err->format_message)(cinfo, st->error);
  std::longjmp(st->jmp, 1);
}

void jpeg_on_error(j_common_ptr cinfo) { jpeg_fail_with_message(cinfo); }

// libjpeg only *warns* about truncated or corrupt entropy data and then fills the rest of the image with grey;
// Pillow refuses such files, and so do we. The one warning tolerated is "extraneous bytes before marker":
// libjpeg resynchronises on the marker, no pixel is lost, and Pillow accepts these files.
void jpeg_on_message(j_common_ptr cinfo, int level) {
  if (level < 0 && cinfo->err->msg_code != JWRN_EXTRANEOUS_DATA) jpeg_fail_with_message(cinfo);
}

bool jpeg_read_header_info(JpegState* st, const uint8_t* data, size_t size) {
  if (setjmp(st->jmp)) return false;
  jpeg_create_decompress(&st->cinfo);
  st->created = true;
  jpeg_mem_src(&st->cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&st->cinfo, TRUE);
  return true;
}

bool jpeg_read_pixels(JpegState* st, uint8_t* out, size_t stride) {
  if (setjmp(st->jmp)) return false;
  jpeg_start_decompress(&st->cinfo);
  // The buffer was sized from the header; never write past it.
  if (st->cinfo.output_width * static_cast<size_t>(st->cinfo.output_components) != stride ||
      st->cinfo.output_height != st->cinfo.image_height) {
    std::snprintf(st->error, sizeof st->error, "unexpected output layout");
    return false;
  }
  while (st->cinfo.output_scanline < st->cinfo.output_height) {
    JSAMPROW row = out + st->cinfo.output_scanline * stride;
    jpeg_read_scanlines(&st->cinfo, &row, 1);
  }
  // Reads up to EOI, so a file cut after the last scanline's data is also caught.
  jpeg_finish_decompress(&st->cinfo);
  return true;
}

RgbImage decode_jpeg(const uint8_t* data, size_t size, const std::string& name, int64_t max_pixels) {
  JpegState st;
  std::memset(&st, 0, sizeof st);
  st.cinfo.err = jpeg_std_error(&st.err);
  st.err.error_exit = jpeg_on_error;
  st.err.emit_message = jpeg_on_message;
  st.cinfo.client_data = &st;  // kept by jpeg_create_decompress
  struct Destroy {
    JpegState& st;
    ~Destroy() {
      if (st.created) jpeg_destroy_decompress(&st.cinfo);
    }
  } destroy{st};

  if (!jpeg_read_header_info(&st, data, size)) bad_image(name, std::string("corrupt or truncated JPEG: ") + st.error);
  // Pillow picks its mode from the component count and lets libjpeg convert (default ISLOW DCT, fancy
  // upsampling): 1 -> L, 3 -> RGB (YCbCr or RGB coded), 4 -> CMYK (YCCK is converted to CMYK by libjpeg).
  const int comps = st.cinfo.num_components;
  switch (comps) {
    case 1: st.cinfo.out_color_space = JCS_GRAYSCALE; break;
    case 3: st.cinfo.out_color_space = JCS_RGB; break;
    case 4: st.cinfo.out_color_space = JCS_CMYK; break;
    default: bad_image(name, "unsupported JPEG with " + std::to_string(comps) + " components");
  }
  // No scaling is requested, so the output has the header's size.
  check_dimensions(name, st.cinfo.image_width, st.cinfo.image_height, max_pixels);
  const size_t w = st.cinfo.image_width, h = st.cinfo.image_height;
  std::vector<uint8_t> raw = alloc_pixels(name, w * h * comps);
  if (!jpeg_read_pixels(&st, raw.data(), w * comps))
    bad_image(name, std::string("corrupt or truncated JPEG: ") + st.error);

  RgbImage img;
  img.width = static_cast<int>(w);
  img.height = static_cast<int>(h);
  if (comps == 3) {
    img.pixels = std::move(raw);
    return img;
  }
  img.pixels = alloc_pixels(name, w * h * 3);
  uint8_t* o = img.pixels.data();
  const uint8_t* p = raw.data();
  for (size_t i = 0; i < w * h; ++i, o += 3, p += comps) {
    if (comps == 1) {
      o[0] = o[1] = o[2] = p[0];
    } else {
      // Pillow assumes Adobe's inverted CMYK ("CMYK;I"): ink = 255 - stored value. Its CMYK -> RGB is then
      // r = (255 - K) - C * (255 - K) / 255, with the division rounded as ((t >> 8) + t) >> 8, t = C*(255-K)+128.
      // With K = 255 - k_stored, 255 - K is just the stored k.
      const int nk = p[3];
      for (int c = 0; c < 3; ++c) {
        const int t = (255 - p[c]) * nk + 128;
        o[c] = static_cast<uint8_t>(nk - (((t >> 8) + t) >> 8));
      }
    }
  }
  return img;
}

// ------------------------------------------------------------------------------------------------------------
// Pillow BICUBIC resampling.

constexpr int kPrecisionBits = 22;  // fixed-point fraction bits of the filter weights

double bicubic_kernel(double x) {
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

// For each output position along one axis: the first input index, the tap count, and fixed-point weights.
// Weights are stored back to back (Pillow uses a fixed stride; that changes nothing but memory, and a fixed
// stride would be huge for extreme downscales).
struct AxisWeights {
  std::vector<int> first, count, offset;
  std::vector<int32_t> w;
};

AxisWeights bicubic_weights(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);  // widen the kernel when shrinking (antialiasing)
  const double support = 2.0 * filterscale;
  const double inv_filterscale = 1.0 / filterscale;  // Pillow multiplies by the reciprocal: same rounding here
  AxisWeights a;
  a.first.resize(out_size);
  a.count.resize(out_size);
  a.offset.resize(out_size);
  std::vector<double> k;
  for (int o = 0; o < out_size; ++o) {
    const double center = (o + 0.5) * scale;
    const int lo = std::max(static_cast<int>(center - support + 0.5), 0);
    const int hi = std::min(static_cast<int>(center + support + 0.5), in_size);
    const int n = hi - lo;
    k.assign(n, 0.0);
    double sum = 0.0;
    for (int i = 0; i < n; ++i) {
      k[i] = bicubic_kernel((i + lo - center + 0.5) * inv_filterscale);
      sum += k[i];
    }
    a.first[o] = lo;
    a.count[o] = n;
    a.offset[o] = static_cast<int>(a.w.size());
    for (int i = 0; i < n; ++i) {
      const double v = sum != 0.0 ? k[i] / sum : k[i];
      // Round half away from zero, as Pillow's normalisation to fixed point does.
      a.w.push_back(static_cast<int32_t>(v * (1 << kPrecisionBits) + (v < 0.0 ? -0.5 : 0.5)));
    }
  }
  return a;
}

inline uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;  // arithmetic shift: negative sums clamp to 0 below
  return static_cast<uint8_t>(std::clamp(v, 0, 255));
}

// Rows [row0, row0 + rows) of src, resampled along x.
void resample_horizontal(const RgbImage& src, int row0, int rows, const AxisWeights& a, int out_w, uint8_t* dst) {
  for (int y = 0; y < rows; ++y) {
    const uint8_t* in = src.pixels.data() + static_cast<size_t>(row0 + y) * src.width * 3;
    uint8_t* out = dst + static_cast<size_t>(y) * out_w * 3;
    for (int x = 0; x < out_w; ++x) {
      const int32_t* w = a.w.data() + a.offset[x];
      const uint8_t* p = in + static_cast<size_t>(a.first[x]) * 3;
      int32_t acc[3] = {1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1)};
      for (int i = 0; i < a.count[x]; ++i, p += 3)
        for (int c = 0; c < 3; ++c) acc[c] += p[c] * w[i];
      for (int c = 0; c < 3; ++c) out[x * 3 + c] = clip8(acc[c]);
    }
  }
}

// src rows are indexed from a.first (already shifted when src is the horizontal pass's partial image).
void resample_vertical(const uint8_t* src, int width, const AxisWeights& a, int out_h, uint8_t* dst) {
  const size_t stride = static_cast<size_t>(width) * 3;
  for (int y = 0; y < out_h; ++y) {
    const int32_t* w = a.w.data() + a.offset[y];
    uint8_t* out = dst + y * stride;
    for (size_t x = 0; x < stride; ++x) {
      int32_t acc = 1 << (kPrecisionBits - 1);
      const uint8_t* p = src + a.first[y] * stride + x;
      for (int i = 0; i < a.count[y]; ++i, p += stride) acc += *p * w[i];
      out[x] = clip8(acc);
    }
  }
}

}  // namespace

RgbImage decode_image(const uint8_t* data, size_t size, const std::string& name, int64_t max_pixels) {
  static const uint8_t kPngSig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (size == 0) bad_image(name, "empty file, not a PNG or JPEG image");
  if (size >= 8 && std::memcmp(data, kPngSig, 8) == 0) return decode_png(data, size, name, std::min(max_pixels, kMaxImagePixels));
  if (size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF) return decode_jpeg(data, size, name, std::min(max_pixels, kMaxImagePixels));
  if (is_webp(data, size)) return decode_webp(data, size, name, std::min(max_pixels, kMaxImagePixels));
  bad_image(name, "not a PNG or JPEG image, nor WebP");
}

RgbImage load_image(const std::string& path) {
  const std::string bytes = read_file(path, kMaxImageFileBytes, ErrorKind::Input, "image");
  return decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), path);
}

RgbImage resize_bicubic(const RgbImage& src, int width, int height) {
  if (width <= 0 || height <= 0 || src.width <= 0 || src.height <= 0 ||
      src.pixels.size() != static_cast<size_t>(src.width) * src.height * 3)
    fail(ErrorKind::Internal, "resize_bicubic: invalid image or size (" + std::to_string(src.width) + "x" +
                                  std::to_string(src.height) + " -> " + std::to_string(width) + "x" +
                                  std::to_string(height) + ")");
  if (width == src.width && height == src.height) return src;
  const bool need_h = width != src.width;
  const bool need_v = height != src.height;

  RgbImage out;
  out.width = width;
  out.height = height;
  out.pixels.resize(static_cast<size_t>(width) * height * 3);
  AxisWeights wy;
  if (need_v) wy = bicubic_weights(src.height, height);
  if (!need_v) {
    resample_horizontal(src, 0, src.height, bicubic_weights(src.width, width), width, out.pixels.data());
  } else if (!need_h) {
    resample_vertical(src.pixels.data(), width, wy, height, out.pixels.data());
  } else {
    // Only the source rows some output row reads go through the horizontal pass; the vertical weights are then
    // re-based onto that partial intermediate, which (like Pillow's) is rounded to uint8.
    const int y_first = wy.first.front();
    const int y_last = wy.first.back() + wy.count.back();
    std::vector<uint8_t> tmp(static_cast<size_t>(width) * (y_last - y_first) * 3);
    resample_horizontal(src, y_first, y_last - y_first, bicubic_weights(src.width, width), width, tmp.data());
    for (int& f : wy.first) f -= y_first;
    resample_vertical(tmp.data(), width, wy, height, out.pixels.data());
  }
  return out;
}

void normalize_chw(const RgbImage& img, const PixelNorm& norm, float* out) {
  const size_t plane = static_cast<size_t>(img.width) * img.height;
  for (int c = 0; c < 3; ++c) {
    float* o = out + c * plane;
    for (size_t i = 0; i < plane; ++i) {
      // As the reference processor: rescale in double, cast to float32, then normalise in float32.
      const float v = static_cast<float>(img.pixels[i * 3 + c] * (1.0 / 255.0));
      o[i] = (v - norm.mean[c]) / norm.std[c];
    }
  }
}

Tensor preprocess_images(const std::vector<RgbImage>& images, int size, const PixelNorm& norm) {
  Tensor t({static_cast<int64_t>(images.size()), 3, size, size});
  const size_t per_image = 3 * static_cast<size_t>(size) * size;
  for (size_t b = 0; b < images.size(); ++b)
    normalize_chw(resize_bicubic(images[b], size, size), norm, t.ptr() + b * per_image);
  return t;
}

}  // namespace blip2
