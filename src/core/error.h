// Errors: one exception type carrying a category (for the CLI's exit status) and a message that names the
// file, tensor or option at fault. Thrown anywhere in the library, caught once at the tool boundary.
#pragma once
#include <stdexcept>
#include <string>

namespace blip2 {

enum class ErrorKind {
  Usage = 2,   // bad command-line options or arguments
  Model = 3,   // model directory: config, weights, tokenizer
  Input = 4,   // user inputs: images, prompts
  Internal = 1,
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& msg) : std::runtime_error(msg), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

[[noreturn]] void fail(ErrorKind kind, const std::string& msg);

}  // namespace blip2
