// The one error type of the HTTP API: a status code and OpenAI's error object
// {"error": {"message", "type", "param", "code"}}. Request parsing and the scheduler throw it; the HTTP layer
// turns it into the response.
#pragma once
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

namespace blip2::server {

struct ApiError : std::runtime_error {
  int status;
  std::string type, param, code;
  ApiError(int status, std::string message, std::string param = "", std::string code = "",
           std::string type = "invalid_request_error")
      : std::runtime_error(std::move(message)), status(status), type(std::move(type)), param(std::move(param)),
        code(std::move(code)) {}

  nlohmann::json to_json() const {
    const auto or_null = [](const std::string& s) { return s.empty() ? nlohmann::json() : nlohmann::json(s); };
    return {{"error", {{"message", what()}, {"type", type}, {"param", or_null(param)}, {"code", or_null(code)}}}};
  }
};

// A 400 about one field of the request.
[[noreturn]] inline void bad_field(const std::string& param, const std::string& message,
                                   const std::string& code = "invalid_value") {
  throw ApiError(400, message, param, code);
}

}  // namespace blip2::server
