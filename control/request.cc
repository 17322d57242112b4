#include "control/request.h"

#include <exception>
#include <string>

namespace siterep::control {

nlohmann::json Ok(nlohmann::json result) { return {{"ok", true}, {"result", std::move(result)}}; }

nlohmann::json Refused(std::string_view name, std::string_view message) {
  return {{"ok", false}, {"error", name}, {"message", message}};
}

std::string ReplyLine(const nlohmann::json& reply) {
  return reply.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

nlohmann::json AnswerRequest(std::string_view received, const RequestHandler& handler) {
  if (size_t nl = received.find('\n'); nl != std::string_view::npos) received = received.substr(0, nl);
  nlohmann::json request = nlohmann::json::parse(received, nullptr, /*allow_exceptions=*/false);
  if (request.is_discarded() || !request.is_object() || !request.contains("op") ||
      !request["op"].is_string()) {
    return Refused("bad-request", "a request is one JSON object with a string \"op\"");
  }
  try {
    return handler(request);
  } catch (const nlohmann::json::exception& e) {
    // A field of the wrong type, read by the handler: the client's error.
    return Refused("bad-request", e.what());
  } catch (const std::exception& e) {
    return Refused("bad-request", e.what());
  }
}

}  // namespace siterep::control
