// A pre-quantized checkpoint's model.safetensors (blip2 quantize): NAME.int8 / NAME.int4_gG data with their
// _scales, the layout version in the metadata. Each quantized tensor is taken with the shape its data implies
// and read back whole through Weight::to_f32 (the loader's checks must keep every read inside the mapping);
// the float tensors as stored; then the check for unused tensors.
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static blip2::fuzz::DirWithInput d("model.safetensors");
  d.input.set(data, size);
  blip2::fuzz::expect_clean([&] {
    blip2::Checkpoint ck(d.dir.path());
    const blip2::SafetensorsFile file(d.dir.path() + "/model.safetensors");
    std::vector<float> values;
    for (const auto& [name, e] : file.entries()) {
      const size_t dot = name.rfind('.');
      if (dot == std::string::npos || e.shape.size() != 2) continue;
      const std::string suffix = name.substr(dot + 1);
      const bool int8 = suffix == "int8", int4 = suffix.rfind("int4_g", 0) == 0;
      if (!int8 && !int4) continue;
      const int64_t cols = int8 ? e.shape[1] : 2 * e.shape[1];
      const blip2::Weight w = ck.take(name.substr(0, dot), {e.shape[0], cols});
      values.resize(static_cast<size_t>(w.rows() * w.cols()));
      w.to_f32(0, static_cast<int64_t>(values.size()), values.data());
    }
    for (const auto& [name, shape] : ck.stored_shapes()) (void)ck.take(name, shape);
    ck.check_all_used();
  });
  return 0;
}
