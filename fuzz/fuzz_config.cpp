// config.json: every field, range checks included (a value that feeds an index must be refused here).
#include <string>

#include "fuzz_util.h"
#include "io/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  blip2::fuzz::expect_clean([&] { (void)blip2::parse_config(text, "config.json"); });
  return 0;
}
