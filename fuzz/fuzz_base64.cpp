// Strict base64: decoding accepts only canonical padded input, so whatever it accepts must encode back to
// exactly the input, and any bytes must survive encode then decode.
#include <string>

#include "fuzz_util.h"
#include "server/base64.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace blip2::server;
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  std::string why;
  const auto decoded = base64_decode(in, size, &why);
  if (decoded && base64_encode(*decoded) != in) std::abort();
  if (!decoded && why.empty()) std::abort();
  const auto limited = base64_decode(in, size / 2, &why);  // the output limit stops decoding early
  if (limited && limited->size() > size / 2) std::abort();
  const auto back = base64_decode(base64_encode(in), size);
  if (!back || *back != in) std::abort();
  return 0;
}
