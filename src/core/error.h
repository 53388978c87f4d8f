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
  // The message is stored printable (printable()): it quotes names and values from files and requests.
  Error(ErrorKind kind, const std::string& msg);
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

[[noreturn]] void fail(ErrorKind kind, const std::string& msg);

// `s` with its control characters (C0, DEL and UTF-8-encoded C1, newlines included) written as \xNN or
// \u00NN, so that a tensor name or config value carrying terminal escape sequences cannot drive the terminal
// an error is printed on, and every message stays one line.
std::string printable(const std::string& s);

}  // namespace blip2
