#include "core/error.h"

namespace blip2 {

void fail(ErrorKind kind, const std::string& msg) { throw Error(kind, msg); }

}  // namespace blip2
