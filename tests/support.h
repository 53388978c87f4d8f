// Helpers the fixture tests share: reading the reference files and comparing tensors the way the fixture
// README measures agreement.
#pragma once
#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "image/image.h"

namespace blip2::test {

inline const std::string kFixtures = BLIP2_FIXTURES_DIR;

inline nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// ‖got − want‖ / ‖want‖ and the largest absolute difference of one element.
struct Diff {
  double rel = 0, max_abs = 0;
};

inline Diff compare(const Tensor& got, const Tensor& want) {
  double num = 0, den = 0, mx = 0;
  for (int64_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got.data[i]) - want.data[i];
    num += d * d;
    den += static_cast<double>(want.data[i]) * want.data[i];
    mx = std::max(mx, std::abs(d));
  }
  return {std::sqrt(num / std::max(den, 1e-30)), mx};
}

// Tolerances from the fixture README: float32 on the CPU agrees to about 1e-5 relative, 1e-4 absolute.
constexpr double kMaxRel = 1e-5, kMaxAbs = 1e-4;

// The pixel batch of fixture images (tests/fixtures/images/NAME), preprocessed at `size`.
inline Tensor fixture_pixels(const nlohmann::json& names, int size) {
  std::vector<RgbImage> imgs;
  for (const auto& n : names) imgs.push_back(load_image(kFixtures + "/images/" + n.get<std::string>()));
  return preprocess_images(imgs, size);
}

}  // namespace blip2::test
