// A safetensors file: the header length, the JSON header and every entry's dtype, shape and offsets.
#include "fuzz_util.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static blip2::fuzz::MemFile file;
  file.set(data, size);
  blip2::fuzz::expect_clean([&] {
    blip2::SafetensorsFile f(file.path());
    // Read every tensor the header accepted: its offsets must lie inside the mapping.
    for (const auto& [name, e] : f.entries()) {
      if (e.dtype == "F32" || e.dtype == "F16" || e.dtype == "BF16") (void)f.tensor(name);
    }
  });
  return 0;
}
